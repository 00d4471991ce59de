"""A lean KV-cache decoder: the same megatron weights run through a functional transformer layer.

    decoder = decoder_for(model, prompts, max_new_tokens=16, vocab_size=V)   # lean, or CachedDecoder
    logits = decoder.prefill()        # [b, V] float32: the logits of the token after each prompt
    logits = decoder.step(sampled)    # [b, V]: after one more token per row ([b] ids)

megatron's cached decode (kv_cache.py) goes through the forward-only schedule, GPTModel, the
TransformerBlock and every module's Python per token, and its StaticInferenceContext re-applies RoPE
to, and GQA-expands, the whole key/value history at every step. On tiny models that Python is the
cost, not the arithmetic. `LeanDecoder` reads the GPTModel's own parameters (nothing is copied, so it
always decodes the current weights) and computes, per layer, what megatron's local-spec layer does:

    h = x + W_proj · attn(RoPE(q), RoPE(k), v),   (q, k, v) = split(W_qkv · rms(x) + b_qkv)
    y = h + W_fc2 · (silu(gate) ⊙ up),            (gate, up) = split(W_fc1 · rms(h))

with q/k RMSNorm per head when the model has it (Qwen3), scores `q·kᵀ/√d` with masked keys filled
with −10000 (megatron's masked softmax), RoPE by column (megatron's, from the model's own
`rotary_pos_emb`, so llama3 scaling is included), and logits `W_out · rms(y)` at the last position
only. Keys are cached after RoPE, per KV group (no GQA expansion): one step attends a `[b, groups,
heads/group, 1, d]` query to the `[b, groups, 1, S, d]` cache. Prompts of different lengths are
left-aligned to the longest with their pads masked, exactly as in kv_cache.py, so the two decoders
see the same positions and masks and differ only by float rounding (tested: greedy tokens equal,
log-probs within tests/float_bounds.py's rule).

What it covers is checked up front (`lean_decode_unsupported`): one model chunk, TP = 1, PP = 1, the
local (non-TE) layer spec with RMSNorm, SwiGLU, no linear biases except the QKV bias, RoPE without
interleaving over the whole head, float32 parameters. Anything else (TP > 1, PP > 1, Transformer
Engine, bf16, ...) decodes with megatron's CachedDecoder; `decoder_for` says why in the returned
decoder's `fallback_reason`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from megatron_rpg.megatron.forward_backward import _model_chunks, _unpadded_vocab_size
from megatron_rpg.megatron.kv_cache import CachedDecoder, LeftPaddedBatch
from megatron_rpg.megatron.optimizer_setup import bare_model

MASKED_SCORE = -10000.0  # what megatron's local masked softmax writes at a masked key


def lean_decode_unsupported(model) -> str | None:
    """None when LeanDecoder computes what megatron's forward computes for `model`, else the reason."""
    try:
        chunks = _model_chunks(model)
    except NotImplementedError as error:
        return str(error)
    if parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if tp != 1 or pp != 1:
            return f"tensor/pipeline parallel sizes {tp}/{pp}: the lean decoder runs one whole model (TP = PP = 1)"
        if parallel_state.get_context_parallel_world_size() != 1:
            return "context parallelism: the lean decoder runs whole sequences"
    gpt = bare_model(chunks[0])
    config = gpt.config
    checks = (
        (gpt.pre_process and gpt.post_process, "the model is one pipeline stage of several"),
        (config.transformer_impl == "local", f"transformer_impl={config.transformer_impl!r} (only the local spec)"),
        (config.normalization == "RMSNorm" and not config.layernorm_zero_centered_gamma,
         f"normalization={config.normalization!r} (only RMSNorm)"),
        (config.gated_linear_unit and config.activation_func is F.silu, "the MLP is not SwiGLU"),
        (not config.add_bias_linear, "add_bias_linear=True (only the QKV bias is supported)"),
        (getattr(config, "num_moe_experts", None) in (None, 0), "a mixture-of-experts MLP"),
        (gpt.position_embedding_type == "rope" and not config.rotary_interleaved,
         f"position_embedding_type={gpt.position_embedding_type!r} (only non-interleaved RoPE)"),
        (config.softmax_scale is None and not config.apply_query_key_layer_scaling, "a custom softmax scale"),
        (not config.fp32_residual_connection, "fp32_residual_connection=True"),
        (not getattr(config, "attention_output_gate", False), "gated attention"),
        (config.params_dtype == torch.float32 and not (config.bf16 or config.fp16),
         f"params_dtype={config.params_dtype} (the lean decoder is verified in float32 only)"),
    )
    for ok, reason in checks:
        if not ok:
            return reason
    if type(gpt.rotary_pos_emb).__name__ != "RotaryEmbedding" or getattr(gpt, "mrope_section", None):
        return f"rotary embedding {type(gpt.rotary_pos_emb).__name__} (only megatron's RotaryEmbedding)"
    for layer in gpt.decoder.layers:
        attention = layer.self_attention
        norms = [layer.input_layernorm, layer.pre_mlp_layernorm]
        optional = [attention.q_layernorm, attention.k_layernorm]  # IdentityOp without qk-norm
        if not all(isinstance(norm, torch.nn.RMSNorm) for norm in norms) \
                or not all(_optional_norm(norm) is not False for norm in optional):
            return "a norm other than torch's RMSNorm (the local spec's)"
        if not hasattr(attention, "linear_qkv"):
            return "the attention has no fused QKV projection"
    if gpt.decoder.final_layernorm is None:
        return "no final layer norm"
    return None


def decoder_for(model, prompts: list[list[int]], max_new_tokens: int, *, vocab_size: int | None = None,
                lean: bool = True):
    """A LeanDecoder when `lean` and the model is covered, else megatron's CachedDecoder with
    `fallback_reason` set (None when the lean path was not asked for)."""
    reason = lean_decode_unsupported(model) if lean else None
    if lean and reason is None:
        return LeanDecoder(model, prompts, max_new_tokens, vocab_size=vocab_size)
    decoder = CachedDecoder(model, prompts, max_new_tokens, vocab_size=vocab_size)
    decoder.fallback_reason = reason
    return decoder


class LeanDecoder(LeftPaddedBatch):
    """One batch of prompts decoded against a cache of `max(len) + max_new_tokens − 1` positions
    (as CachedDecoder). Call `prefill()` once, then `step()` per token."""

    fallback_reason = None

    def __init__(self, model, prompts: list[list[int]], max_new_tokens: int, *, vocab_size: int | None = None):
        super().__init__(prompts, max_new_tokens)
        reason = lean_decode_unsupported(model)
        if reason is not None:
            raise ValueError(f"the lean decoder does not cover this model: {reason}; use CachedDecoder")
        chunks = _model_chunks(model)
        self.gpt = bare_model(chunks[0])
        self.vocab_size = _unpadded_vocab_size(chunks, vocab_size)
        config = self.gpt.config
        self.groups = config.num_query_groups or config.num_attention_heads
        self.per_group = config.num_attention_heads // self.groups
        self.head_dim = config.kv_channels
        self.scale = 1.0 / math.sqrt(self.head_dim)
        weight = self.gpt.embedding.word_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        freqs = self.gpt.rotary_pos_emb(self.max_length)[:, 0, 0].to(self.device)  # [S, d], megatron's own
        self.cos, self.sin = torch.cos(freqs).to(self.dtype), torch.sin(freqs).to(self.dtype)
        batch = len(prompts)
        shape = (batch, self.groups, self.max_length, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.gpt.decoder.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.gpt.decoder.layers]
        # [b, 1, 1, S]: MASKED_SCORE at a row's pad columns (megatron masks the same keys), else 0
        columns = torch.arange(self.max_length, device=self.device)
        pads = columns[None, :] < self.padding.to(self.device)[:, None]
        self.pad_bias = torch.zeros(pads.shape, dtype=self.dtype, device=self.device).masked_fill(
            pads, MASKED_SCORE)[:, None, None, :]

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        return self._forward(self._prompt_tokens().to(self.device))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed `tokens` `[b]` (one per row, at the next position) and return the logits after them."""
        return self._forward(self._step_tokens(tokens)[:, None].to(self.device))

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        start, new = self.written, tokens.shape[1]
        if start + new > self.max_length:
            raise RuntimeError(f"the KV cache holds {self.max_length} positions; {start} are used and {new} more were fed")
        end = start + new
        bias = self.pad_bias[..., :end]
        if new > 1:  # a query never attends to a later column
            columns = torch.arange(end, device=self.device)
            later = (columns[None, :] > columns[start:end, None])[None, None]
            bias = bias.masked_fill(later, MASKED_SCORE)
        cos, sin = self.cos[start:end], self.sin[start:end]
        hidden = F.embedding(tokens, self.gpt.embedding.word_embeddings.weight)  # [b, s, H]
        for index, layer in enumerate(self.gpt.decoder.layers):
            hidden = hidden + self._attention(layer, _rms(layer.input_layernorm, hidden), index, start, end,
                                              bias, cos, sin)
            hidden = hidden + self._mlp(layer.mlp, _rms(layer.pre_mlp_layernorm, hidden))
        self.written = end
        last = _rms(self.gpt.decoder.final_layernorm, hidden[:, -1])
        logits = F.linear(last, self._output_weight()).float()
        return logits[:, :self.vocab_size] if self.vocab_size is not None else logits

    def _attention(self, layer, x, index, start, end, bias, cos, sin):
        attention = layer.self_attention
        batch, new = x.shape[:2]
        qkv = F.linear(x, attention.linear_qkv.weight, attention.linear_qkv.bias)
        # megatron's fused layout: per KV group, its heads/group queries, then its key, then its value
        qkv = qkv.view(batch, new, self.groups, (self.per_group + 2) * self.head_dim)
        query, key, value = qkv.split([self.per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        query = query.reshape(batch, new, self.groups * self.per_group, self.head_dim)  # head g·(q/g) + j
        if _optional_norm(attention.q_layernorm) is not None:
            query = _rms(attention.q_layernorm, query)
        if _optional_norm(attention.k_layernorm) is not None:
            key = _rms(attention.k_layernorm, key)
        rope_cos, rope_sin = cos[None, :, None, :], sin[None, :, None, :]
        self.keys[index][:, :, start:end] = _rope(key, rope_cos, rope_sin).transpose(1, 2)
        self.values[index][:, :, start:end] = value.transpose(1, 2)
        # query head h attends to KV group h // (heads/group): megatron's repeat_interleave expansion
        context = F.scaled_dot_product_attention(
            _rope(query, rope_cos, rope_sin).transpose(1, 2), self.keys[index][:, :, :end],
            self.values[index][:, :, :end], attn_mask=bias, scale=self.scale, enable_gqa=True)
        return F.linear(context.transpose(1, 2).reshape(batch, new, -1), attention.linear_proj.weight)

    @staticmethod
    def _mlp(mlp, x):
        gate, up = F.linear(x, mlp.linear_fc1.weight).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, mlp.linear_fc2.weight)

    def _output_weight(self):
        gpt = self.gpt
        return gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights \
            else gpt.output_layer.weight


def _optional_norm(norm):
    """The RMSNorm, None for no norm (megatron's IdentityOp or None), False for anything else."""
    if isinstance(norm, torch.nn.RMSNorm):
        return norm
    return None if norm is None or type(norm).__name__ == "IdentityOp" else False


def _rms(norm, x):
    return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)


def _rope(t, cos, sin):
    """megatron's non-interleaved RoPE: t·cos + rotate_half(t)·sin, rotate_half(x1, x2) = (−x2, x1)."""
    first, second = t.chunk(2, dim=-1)
    return t * cos + torch.cat((-second, first), dim=-1) * sin
