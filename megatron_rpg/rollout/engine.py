"""What every rollout engine returns, and how it is asked: the seam between sampling and training.

    engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.0)) -> Rollout

A `Rollout` uses the trainer's micro-batch convention (megatron/forward_backward.py): `tokens`
right-padded `[n, s]`, `loss_mask` 1 at response tokens, `engine_logp` aligned with `tokens`
(engine_logp[i, t] = log π(tokens[i, t] | tokens[i, <t]) at the sampling temperature, 0 elsewhere),
so the trainer can compare the engine's log-probs with its own (the train/inference mismatch).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import torch

from megatron_rpg.losses.validation import check_range


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """max_new_tokens: response length cap; temperature > 0 (1.0 = the policy itself), or 0: greedy
    (the argmax token; its engine_logp is then the temperature-1 log-prob); stop_token_ids: a
    response ends after emitting any of them (it is part of the response), () = always
    max_new_tokens. A model may have several end ids (Llama 3, chat-templated Qwen): pass them all.
    seed: the call's sampling generator seed, the same on every rank (evaluation); None: the
    engine's own per-call stream."""
    max_new_tokens: int
    temperature: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}; it must be a positive integer")
        if not (self.temperature == 0 or math.isfinite(self.temperature)):
            raise ValueError(f"temperature={self.temperature!r}; it must be 0 (greedy) or a finite number > 0")
        check_range("temperature", self.temperature, 0.0)
        ids = tuple(self.stop_token_ids) if isinstance(self.stop_token_ids, (list, tuple)) else None
        if ids is None or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r}; it must be a tuple of token ids (ints ≥ 0)")
        object.__setattr__(self, "stop_token_ids", ids)


@dataclasses.dataclass
class Rollout:
    tokens: torch.Tensor          # [n, s] long, prompt then response, right-padded with 0
    loss_mask: torch.Tensor       # [n, s] float32, 1 at response tokens
    engine_logp: torch.Tensor     # [n, s] float32, the engine's log-probs of the response tokens
    prompt_lengths: torch.Tensor  # [n] long
    response_lengths: torch.Tensor  # [n] long

    def responses(self) -> list[list[int]]:
        """The response token ids of each row (stop token included when it was emitted)."""
        return [self.tokens[i, p:p + r].tolist()
                for i, (p, r) in enumerate(zip(self.prompt_lengths.tolist(), self.response_lengths.tolist()))]


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> Rollout: ...

    def update_weights(self) -> None:
        """Make the engine sample from the trainer's current weights (a no-op when it shares them)."""
