"""The embedded rollout engine: samples from the training model itself, in the trainer's processes.

For machines without SGLang (CPU, tests, tiny models): it shares the megatron model, so it always
samples from the current weights (`update_weights` is a no-op) and works at any TP/PP/DP layout —
every step is one forward-only pass through megatron's schedule (`next_token_logits`), without a KV
cache, so a response of R tokens costs R full forwards. Use SGLang for real model sizes.

Sampling is reproducible: each call draws from a CPU generator seeded with (seed, DP rank, call
index), identical on the TP and PP ranks of one model replica (so they agree on every token without
a broadcast) and different across DP ranks (which sample their own prompts).
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_rpg.megatron.forward_backward import next_token_logits
from megatron_rpg.rollout.engine import Rollout, SamplingParams


class EmbeddedEngine:
    def __init__(self, model, *, vocab_size: int | None = None, seed: int = 0):
        self.model = model
        self.vocab_size = vocab_size
        self.seed = int(seed)
        self.calls = 0

    def update_weights(self) -> None:
        """Nothing to do: the engine reads the trainer's parameters directly."""

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> Rollout:
        if not prompts or any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
        prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        width = int(prompt_lengths.max()) + sampling.max_new_tokens
        tokens = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        engine_logp = torch.zeros(len(prompts), width, dtype=torch.float32)
        lengths = prompt_lengths.clone()
        running = torch.ones(len(prompts), dtype=torch.bool)
        generator = torch.Generator().manual_seed(self._call_seed() if sampling.seed is None else sampling.seed)
        stop_ids = torch.tensor(sampling.stop_token_ids, dtype=torch.long)
        for _ in range(sampling.max_new_tokens):
            current = int(lengths.max())
            logits = next_token_logits(self.model, tokens[:, :current], lengths, vocab_size=self.vocab_size)
            log_probs = torch.log_softmax(logits.cpu().double() / (sampling.temperature or 1.0), dim=-1)
            if sampling.temperature == 0:  # greedy
                sampled = log_probs.argmax(dim=-1)
            else:
                sampled = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(1)
            rows = running.nonzero().squeeze(1)
            tokens[rows, lengths[rows]] = sampled[rows]
            engine_logp[rows, lengths[rows]] = log_probs[rows, sampled[rows]].float()
            lengths[rows] += 1
            if sampling.stop_token_ids:
                running &= ~torch.isin(sampled, stop_ids)
            if not bool(running.any()):
                break
        response_lengths = lengths - prompt_lengths
        positions = torch.arange(width)
        loss_mask = ((positions >= prompt_lengths[:, None]) & (positions < lengths[:, None])).float()
        used = int(lengths.max())
        return Rollout(tokens=tokens[:, :used], loss_mask=loss_mask[:, :used],
                       engine_logp=engine_logp[:, :used], prompt_lengths=prompt_lengths,
                       response_lengths=response_lengths)

    def _call_seed(self) -> int:
        dp_rank = parallel_state.get_data_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
        self.calls += 1
        return (self.seed * 1_000_003 + dp_rank) * 1_000_003 + self.calls
