"""Incremental decoding with megatron-core's own static KV cache, through megatron's schedule.

    decoder = CachedDecoder(model, prompts, max_new_tokens=16, vocab_size=V)
    logits = decoder.prefill()       # [b, V]: the logits of the token after each prompt
    logits = decoder.step(sampled)   # [b, V]: after one more token per row ([b] ids)

The prompts run through the model once (prefill); each step then runs one position per row,
attending to the keys and values cached so far. The cache is megatron's `StaticInferenceContext`
(compat.static_kv_cache): GPTModel keeps only the last position's hidden state before the output
layer, so logits are `[b, 1, V]`, never `[b, s, V]`, and gathers them over TP itself
(`runtime_gather_output`). Every forward goes through megatron's forward-only schedule, so with
PP > 1 the stages pass `[s, b, hidden]` activations (`[1, b, hidden]` per step) by p2p, each stage
caching its own layers; the last stage's logits are broadcast to all stages, as in
`forward_logits`: every rank of a model replica gets the same `[b, V]` tensor (float32; float64 for a float64 model).

Prompts of different lengths: megatron's static cache has one write offset for the whole batch, so
the prompts are left-aligned to the longest one (row i gets pad_i = L − len_i leading pads). Every
forward masks the padded key positions (a boolean attention mask, True = masked, which the local
spec's softmax fills with −10000, i.e. probability exactly 0), so a row attends to its own tokens
only. RoPE rotates row i's tokens by their column, i.e. its positions shifted by pad_i: attention
scores depend on position differences only, so nothing changes but float rounding; position_ids
are the row's own (0 at its first token), for models with learned absolute position embeddings.
Batches without padding pass no mask (the causal softmax builds its own).
"""
from __future__ import annotations

import torch

from megatron_rpg.megatron.compat import advance_kv_cache, static_kv_cache
from megatron_rpg.megatron.forward_backward import (
    _broadcast_from_last_stage, _forward_only, _model_chunks, _unpadded_vocab_size, output_dtype)
from megatron_rpg.megatron.optimizer_setup import bare_model


class LeftPaddedBatch:
    """The batch layout every decoder here shares: the prompts left-padded to the longest (row i gets
    pad_i = L − len_i leading pads), a cache of `L + max_new_tokens − 1` positions (the last sampled
    token is never fed back), `prefill()` once, then `step()` per token; `written` counts the cached
    positions (the same for every row)."""

    def __init__(self, prompts: list[list[int]], max_new_tokens: int):
        if not prompts or any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
        self.prompts = prompts
        lengths = torch.tensor([len(prompt) for prompt in prompts], dtype=torch.long)
        self.width = int(lengths.max())
        self.padding = self.width - lengths
        self.max_length = self.width + max_new_tokens - 1
        self.written = 0

    def _prompt_tokens(self) -> torch.Tensor:
        """`[b, L]` left-padded prompt ids (pads are id 0; the attention masks them)."""
        if self.written:
            raise RuntimeError("prefill() runs once, before any step()")
        tokens = torch.zeros(len(self.prompts), self.width, dtype=torch.long)
        for row, prompt in enumerate(self.prompts):
            tokens[row, int(self.padding[row]):] = torch.tensor(prompt, dtype=torch.long)
        return tokens

    def _step_tokens(self, tokens) -> torch.Tensor:
        """`tokens` as `[b]` ids, checked: one per row, after prefill()."""
        if not self.written:
            raise RuntimeError("step() needs prefill() first")
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.shape != (len(self.prompts),):
            raise ValueError(f"step takes one token per row: shape ({len(self.prompts)},); got {tuple(tokens.shape)}")
        return tokens


class CachedDecoder(LeftPaddedBatch):
    """One batch of prompts decoded with megatron's static KV cache (LeftPaddedBatch's layout)."""

    def __init__(self, model, prompts: list[list[int]], max_new_tokens: int, *, vocab_size: int | None = None):
        super().__init__(prompts, max_new_tokens)
        self.chunks = _model_chunks(model)
        self.vocab_size = _unpadded_vocab_size(self.chunks, vocab_size)
        self.padded = bool(self.padding.any())
        self.context = static_kv_cache(len(prompts), self.max_length)

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        tokens = self._prompt_tokens()
        columns = torch.arange(self.width)
        positions = (columns[None, :] - self.padding[:, None]).clamp(min=0)
        mask = None
        if self.padded:
            causal = columns[None, :] > columns[:, None]                # [q, k]: a future key
            padding = columns[None, :] < self.padding[:, None]          # [b, k]: a row's pad key
            mask = (causal[None] | padding[:, None, :])[:, None]        # [b, 1, q, k]
        return self._forward(tokens, positions, mask)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed `tokens` `[b]` (one per row, at the next position) and return the logits after them."""
        tokens = self._step_tokens(tokens)
        positions = (self.written - self.padding)[:, None]
        mask = None
        if self.padded:
            mask = (torch.arange(self.written + 1)[None, :] < self.padding[:, None])[:, None, None, :]
        return self._forward(tokens[:, None], positions, mask)

    def _forward(self, tokens, positions, mask) -> torch.Tensor:
        if self.written + tokens.shape[1] > self.max_length:
            raise RuntimeError(f"the KV cache holds {self.max_length} positions; "
                               f"{self.written} are used and {tokens.shape[1]} more were fed")
        batch = {"tokens": tokens, "position_ids": positions}
        if mask is not None:
            batch["attention_mask"] = mask
        vocab_size = self.vocab_size

        def collect(micro_batch, logits, non_loss_data=False):
            last = logits[:, -1].to(dtype)  # [b, V], already gathered over TP by the model
            return last[:, :vocab_size] if vocab_size is not None else last

        dtype = output_dtype(self.chunks)
        store = _forward_only(self.chunks, [batch], collect,
                              model_kwargs={"inference_context": self.context, "runtime_gather_output": True})
        advance_kv_cache(self.context, tokens.shape[1])
        self.written += tokens.shape[1]
        width = vocab_size if vocab_size is not None else int(bare_model(self.chunks[0]).vocab_size)
        return _broadcast_from_last_stage(store[0] if store else None, (len(self.prompts), width), dtype)
