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

The layer math is lean_layers.py's (shared with the lean training forward); this module adds the
cache. What it covers is checked up front (`lean_decode_unsupported`: lean_layers_unsupported's
checks in float32): one model chunk, TP = 1, PP = 1, the local (non-TE) layer spec with RMSNorm,
SwiGLU, no linear biases except the QKV bias, RoPE without interleaving over the whole head. Anything else (TP > 1, PP > 1, Transformer
Engine, bf16, ...) decodes with megatron's CachedDecoder; `decoder_for` says why in the returned
decoder's `fallback_reason`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_rpg.megatron.forward_backward import _model_chunks, _unpadded_vocab_size
from megatron_rpg.megatron.kv_cache import CachedDecoder, LeftPaddedBatch
from megatron_rpg.megatron.lean_layers import MASKED_SCORE, LeanLayers, lean_layers_unsupported
from megatron_rpg.megatron.optimizer_setup import bare_model

__all__ = ["MASKED_SCORE", "LeanDecoder", "decoder_for", "lean_decode_unsupported"]


def lean_decode_unsupported(model) -> str | None:
    """None when LeanDecoder computes what megatron's forward computes for `model`, else the reason."""
    try:
        chunks = _model_chunks(model)
    except NotImplementedError as error:
        return str(error)
    return lean_layers_unsupported(chunks, (torch.float32,))


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
        self.lean = LeanLayers(self.gpt)
        self.vocab_size = _unpadded_vocab_size(chunks, vocab_size)
        self.device, self.dtype = self.lean.device, self.lean.dtype
        self.cos, self.sin = self.lean.rope_tables(self.max_length)
        batch = len(prompts)
        shape = (batch, self.lean.groups, self.max_length, self.lean.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.lean.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.lean.layers]
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
        lean = self.lean
        cos, sin = self.cos[start:end], self.sin[start:end]
        def cached_attention(index, query, key, value):
            self.keys[index][:, :, start:end] = key  # cached after RoPE, per KV group
            self.values[index][:, :, start:end] = value
            return lean.attend(query, self.keys[index][:, :, :end], self.values[index][:, :, :end], bias=bias)

        hidden = lean.run_layers(lean.embed(tokens), cos, sin, cached_attention)  # [b, s, H]
        self.written = end
        logits = F.linear(lean.final_norm(hidden[:, -1]), lean.output_weight()).float()
        return logits[:, :self.vocab_size] if self.vocab_size is not None else logits
