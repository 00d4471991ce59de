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
    (the same as greedy=True with temperature 1: the argmax token, its engine_logp the temperature-1
    log-prob); stop_token_ids: a response ends after emitting any of them (it is part of the
    response), () = always max_new_tokens. A model may have several end ids (Llama 3, chat-templated
    Qwen): pass them all. greedy: take the most likely token instead of sampling (tests, benchmarks,
    evaluation); engine_logp is still its log-prob at `temperature`. top_k (0: off) and top_p (1.0:
    off) truncate the tempered distribution before sampling (`truncated_log_probs`); engine_logp is
    then the log-prob under the truncated, renormalised distribution — the one actually sampled.
    seed: the call's sampling generator seed, the same on every rank (evaluation); None: the
    engine's own per-call stream."""
    max_new_tokens: int
    temperature: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    greedy: bool = False
    top_k: int = 0
    top_p: float = 1.0
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
        if not isinstance(self.greedy, bool):
            raise ValueError(f"greedy={self.greedy!r}; it must be True or False")
        if self.temperature == 0:  # greedy; its log-probs at temperature 1 (engines divide by `temperature or 1`)
            object.__setattr__(self, "greedy", True)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}; it must be an integer >= 0 (0: no top-k truncation)")
        check_range("top_p", self.top_p, 0.0, 1.0, low_inclusive=False)

    @property
    def truncates(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0


def truncated_log_probs(log_probs: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Log-probs [n, V] of the distribution renormalised over the kept tokens (−inf elsewhere):
    the top_k most likely (0: all), then among those the smallest most-likely-first set whose
    probability reaches top_p (at least one token; ties at the boundary are broken by token id, as
    torch.sort does). Applied after the temperature, as SGLang and vLLM do."""
    sorted_logp, order = torch.sort(log_probs, dim=-1, descending=True, stable=True)
    keep_sorted = torch.ones_like(sorted_logp, dtype=torch.bool)
    if top_k > 0:
        keep_sorted[:, top_k:] = False
    if top_p < 1.0:
        probs = torch.where(keep_sorted, sorted_logp.exp(), torch.zeros_like(sorted_logp))
        probs = probs / probs.sum(dim=-1, keepdim=True)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        keep_sorted &= before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = torch.where(keep, log_probs, torch.full_like(log_probs, float("-inf")))
    return kept - torch.logsumexp(kept, dim=-1, keepdim=True)


@dataclasses.dataclass
class Rollout:
    tokens: torch.Tensor          # [n, s] long, prompt then response, right-padded with 0
    loss_mask: torch.Tensor       # [n, s] float32, 1 at response tokens
    engine_logp: torch.Tensor     # [n, s] float32 (float64 from a float64 model), the engine's response log-probs
    prompt_lengths: torch.Tensor  # [n] long
    response_lengths: torch.Tensor  # [n] long

    def responses(self) -> list[list[int]]:
        """The response token ids of each row (stop token included when it was emitted)."""
        return [self.tokens[i, p:p + r].tolist()
                for i, (p, r) in enumerate(zip(self.prompt_lengths.tolist(), self.response_lengths.tolist()))]


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> Rollout: ...

    def end_of_rollouts(self) -> None:
        """This rank's last generate of a rollout phase (a step's draw, an evaluation) is done; every
        rank calls it once per phase (the SGLang engine's data-parallel replicas wait here for each
        other, taking part in each other's fault recovery: rollout/sglang_recovery.py)."""

    def update_weights(self) -> dict:
        """Make the engine sample from the trainer's current weights (a no-op when it shares them);
        returns metrics of the sync (e.g. sync_s, sync_bytes), {} when there is nothing to sync."""

    def close(self) -> None:
        """Release what the engine holds (the SGLang engine stops the servers it launched)."""
