"""The lean training forward: whole sequences through lean_layers.py's functional layers, with
autograd, in place of megatron's GPTModel modules in the RL forward-backward and the forward-only
log-prob passes (forward_backward.py's fused output path).

    reason = select_model_forward(model, "auto")     # None: lean from now on; else why megatron's runs
    loss, metrics = rl_forward_backward(model, micro_batches, loss)   # unchanged call

At hidden 64 and 2 layers a training forward through megatron's TransformerBlock is Python-bound
(module calls, hooks, [s, b, h] transposes); the same arithmetic as a dozen torch calls per layer
costs a fraction. What it computes is megatron's forward with the fused output layer: the final
layer-normed hidden states `[b, s, H]` and the output weight `[V, H]` (the embedding when tied), so
fused_output.py's log-probs and everything after are unchanged. The micro-batch's inputs mean what
they mean to megatron's local spec: `attention_mask` None → causal; a boolean mask (True = masked,
`[b or 1, 1, s, s]`) replaces the causal mask, masked scores set to −10000 before the softmax
(megatron's masked_fill, so a fully masked row averages every value, as megatron's does);
`position_ids` do not reach a RoPE model's attention in megatron (GPTModel's RoPE reads only the
sequence length: positions 0..s−1), nor here.

Gradients: every weight enters as the `nn.Parameter` itself (`F.linear(x, W)`), so megatron DDP's
grad-accumulation hooks move each gradient into `main_grad` as after megatron's own forward, and
the schedule, loss normalisation and finalize_model_grads are megatron's, unchanged (tested: loss
and every gradient equal megatron's at float64 rounding for Qwen2 / Qwen3 / Llama 3 tied, one
trainer step with DP = 2 and the distributed optimizer equal).

Coverage (`lean_forward_unsupported`): lean_layers_unsupported's checks (TP = PP = CP = 1, local
spec, RMSNorm, SwiGLU, RoPE, ...) in float32 or float64, plus what training adds: no dropout
(hidden_dropout / attention_dropout > 0 would need megatron's RNG streams), no activation
recompute, no sequence parallelism, FP8 or multi-token prediction, and a DDP wrapper without
overlap_param_gather (its forward pre-hooks gather parameters megatron's modules would wait for).
`select_model_forward(model, "lean")` on an uncovered model is a ValueError naming the reason;
"auto" keeps megatron's forward and returns the reason; "megatron" always keeps it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_rpg.losses.validation import check_choice
from megatron_rpg.megatron.lean_layers import MASKED_SCORE, LeanLayers, lean_layers_unsupported
from megatron_rpg.megatron.optimizer_setup import bare_model

MODEL_FORWARD_CHOICES = ("auto", "megatron", "lean")
_ATTRIBUTE = "lean_forward"  # on the bare GPTModel: its LeanForward, or None for megatron's forward


def lean_forward_unsupported(model) -> str | None:
    """None when LeanForward computes megatron's training forward for `model`, else the reason."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    reason = lean_layers_unsupported(chunks, (torch.float32, torch.float64))
    if reason is not None:
        return reason
    config = bare_model(chunks[0]).config
    ddp_config = getattr(chunks[0], "ddp_config", None)
    checks = (
        (not config.hidden_dropout and not config.attention_dropout,
         f"hidden_dropout={config.hidden_dropout}, attention_dropout={config.attention_dropout} "
         f"(the lean forward has no dropout)"),
        (config.recompute_granularity is None, f"recompute_granularity={config.recompute_granularity!r}"),
        (not config.sequence_parallel, "sequence_parallel=True"),
        (not config.fp8, f"fp8={config.fp8!r}"),
        (not getattr(config, "mtp_num_layers", None), "multi-token prediction"),
        (ddp_config is None or not ddp_config.overlap_param_gather,
         "overlap_param_gather=True (its forward pre-hooks gather the parameters)"),
    )
    for ok, reason in checks:
        if not ok:
            return reason
    return None


def select_model_forward(model, choice: str) -> str | None:
    """Which forward forward_backward.py's fused path runs for `model` from now on: "lean",
    "megatron", or "auto" (lean when covered). Returns why megatron's forward runs under "auto"
    (None when lean runs, or for "megatron"); "lean" on an uncovered model: ValueError with the reason."""
    check_choice("model_forward", choice, MODEL_FORWARD_CHOICES)
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    reason = None if choice == "megatron" else lean_forward_unsupported(chunks)
    if choice == "lean" and reason is not None:
        raise ValueError(f"--model-forward lean does not cover this model: {reason}; use --model-forward "
                         f"auto (megatron's forward where the lean one does not apply) or megatron")
    lean = choice != "megatron" and reason is None
    for chunk in chunks:
        gpt = bare_model(chunk)
        setattr(gpt, _ATTRIBUTE, LeanForward(gpt) if lean else None)
    return reason


def lean_forward_of(model_chunk):
    """The chunk's LeanForward when select_model_forward chose it, else None (megatron's forward)."""
    return getattr(bare_model(model_chunk), _ATTRIBUTE, None)


class LeanForward:
    """`forward(tokens, attention_mask)` → (final hidden states `[b, s, H]`, output weight `[V, H]`)."""

    def __init__(self, gpt):
        self.layers = LeanLayers(gpt)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None):
        lean = self.layers
        length = tokens.shape[1]
        cos, sin = lean.rope_tables(length)
        masked = None if attention_mask is None else _boolean_mask(attention_mask, tokens.shape)
        def attention(index, query, key, value):
            if masked is None:
                return lean.attend(query, key, value, is_causal=True)
            return _masked_attention(lean, query, key, value, masked)

        hidden = lean.run_layers(lean.embed(tokens), cos, sin, attention)
        return lean.final_norm(hidden), lean.output_weight()


def _boolean_mask(attention_mask: torch.Tensor, shape) -> torch.Tensor:
    batch, length = shape
    if attention_mask.dtype != torch.bool or attention_mask.dim() != 4 \
            or attention_mask.shape[1] != 1 or attention_mask.shape[0] not in (1, batch) \
            or tuple(attention_mask.shape[2:]) != (length, length):
        raise ValueError(f"attention_mask has dtype {attention_mask.dtype} and shape {tuple(attention_mask.shape)}; "
                         f"pass a boolean [b or 1, 1, s, s] = [{batch}, 1, {length}, {length}] mask, True = masked")
    return attention_mask


def _masked_attention(lean: LeanLayers, query, key, value, masked):
    """megatron's local attention with an explicit mask: scores masked_fill(−10000), then softmax."""
    if lean.per_group > 1:
        key = key.repeat_interleave(lean.per_group, dim=1)
        value = value.repeat_interleave(lean.per_group, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * lean.scale
    probs = F.softmax(scores.masked_fill(masked, MASKED_SCORE), dim=-1)
    return torch.matmul(probs, value).transpose(1, 2).flatten(2)
