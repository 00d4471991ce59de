"""The embedded rollout engine: samples from the training model itself, in the trainer's processes.

For machines without SGLang (CPU, tests, tiny models): it shares the megatron model, so it always
samples from the current weights (`update_weights` is a no-op) and works at any TP/PP/DP layout.
With `kv_cache=True` (the default) each micro-batch of prompts runs through the model once (prefill)
and then one position per new token against megatron-core's static KV cache
(megatron/kv_cache.py), with logits at the last position only; a response of R tokens costs one
prefill and R − 1 single-position forwards. With `lean_decode=True` (the default) those forwards run
the same weights through megatron/lean_decode.py's functional layer instead of megatron's modules
(the Python per token is the cost on small models); a model it does not cover (TP > 1, PP > 1, TE,
bf16, ...) decodes with megatron's cache, and `fallback_reason` says why. `kv_cache=False` recomputes the whole prefix for every
token (`next_token_logits`; R full forwards), kept as the reference the cache is tested and
benchmarked against. `micro_batch_size` sequences are generated at a time (None: all), which bounds
the KV cache and activation memory; micro-batches run one after another.

Sampling is reproducible: each call draws from a CPU generator seeded with (seed, DP rank, call
index), identical on the TP and PP ranks of one model replica (so they agree on every token without
a broadcast) and different across DP ranks (which sample their own prompts). Each step draws once for
all rows of the micro-batch (rows that already stopped included), so with one micro-batch the draws
are those of the recompute path, and the two give the same tokens up to float rounding of the logits;
a smaller micro-batch size gives another (equally distributed) draw, while greedy tokens stay the same.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_rpg.megatron.forward_backward import next_token_logits, output_dtype
from megatron_rpg.megatron.lean_decode import decoder_for
from megatron_rpg.rollout.engine import Rollout, SamplingParams, truncated_log_probs


class EmbeddedEngine:
    def __init__(self, model, *, vocab_size: int | None = None, seed: int = 0,
                 micro_batch_size: int | None = None, kv_cache: bool = True, lean_decode: bool = True):
        if micro_batch_size is not None and (isinstance(micro_batch_size, bool)
                                             or not isinstance(micro_batch_size, int) or micro_batch_size < 1):
            raise ValueError(f"micro_batch_size={micro_batch_size!r}; it must be a positive integer "
                             f"(sequences generated at a time) or None (all at once)")
        self.model = model
        self.vocab_size = vocab_size
        self.seed = int(seed)
        self.micro_batch_size = micro_batch_size
        self.kv_cache = bool(kv_cache)
        self.lean_decode = bool(lean_decode)
        self.fallback_reason = None  # why the last cached decode ran megatron's path although lean_decode was asked
        self.calls = 0

    def update_weights(self) -> dict:
        """Nothing to do: the engine reads the trainer's parameters directly (no sync metrics)."""
        return {}

    def close(self) -> None:
        """Nothing to release."""

    def end_of_rollouts(self) -> None:
        """Nothing to wait for: each rank generates from its own parameters."""

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> Rollout:
        if not prompts or any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
        prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        width = int(prompt_lengths.max()) + sampling.max_new_tokens
        tokens = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        engine_logp = torch.zeros(len(prompts), width, dtype=output_dtype(self.model))  # float64 for a float64 model
        lengths = prompt_lengths.clone()
        generator = torch.Generator().manual_seed(self._call_seed() if sampling.seed is None else sampling.seed)
        size = self.micro_batch_size or len(prompts)
        for start in range(0, len(prompts), size):
            rows = slice(start, start + size)  # views: the micro-batch writes into the whole batch's tensors
            self._generate_micro_batch(prompts[rows], tokens[rows], engine_logp[rows], lengths[rows],
                                       sampling, generator)
        response_lengths = lengths - prompt_lengths
        positions = torch.arange(width)
        loss_mask = ((positions >= prompt_lengths[:, None]) & (positions < lengths[:, None])).float()
        used = int(lengths.max())
        return Rollout(tokens=tokens[:, :used], loss_mask=loss_mask[:, :used],
                       engine_logp=engine_logp[:, :used], prompt_lengths=prompt_lengths,
                       response_lengths=response_lengths)

    def _generate_micro_batch(self, prompts, tokens, engine_logp, lengths, sampling, generator) -> None:
        running = torch.ones(len(prompts), dtype=torch.bool)
        stop_ids = torch.tensor(sampling.stop_token_ids, dtype=torch.long)
        decoder = None
        if self.kv_cache:
            decoder = decoder_for(self.model, prompts, sampling.max_new_tokens, vocab_size=self.vocab_size,
                                  lean=self.lean_decode)
            self.fallback_reason = decoder.fallback_reason
        sampled = None
        for _ in range(sampling.max_new_tokens):
            if decoder is None:
                logits = next_token_logits(self.model, tokens[:, :int(lengths.max())], lengths,
                                           vocab_size=self.vocab_size)
            else:  # a stopped row is fed its (discarded) sample too: the batch keeps one cache offset
                logits = decoder.prefill() if sampled is None else decoder.step(sampled)
            log_probs = torch.log_softmax(logits.cpu().double() / (sampling.temperature or 1.0), dim=-1)
            if sampling.truncates:  # --rollout-top-k/-top-p: sample (and report) the truncated distribution
                log_probs = truncated_log_probs(log_probs, top_k=sampling.top_k, top_p=sampling.top_p)
            if sampling.greedy:
                sampled = log_probs.argmax(dim=-1)
            else:
                sampled = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(1)
            rows = running.nonzero().squeeze(1)
            tokens[rows, lengths[rows]] = sampled[rows]
            engine_logp[rows, lengths[rows]] = log_probs[rows, sampled[rows]].to(engine_logp.dtype)
            lengths[rows] += 1
            if sampling.stop_token_ids:
                running &= ~torch.isin(sampled, stop_ids)
            if not bool(running.any()):
                break

    def _call_seed(self) -> int:
        dp_rank = parallel_state.get_data_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
        self.calls += 1
        return (self.seed * 1_000_003 + dp_rank) * 1_000_003 + self.calls
