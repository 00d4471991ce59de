"""Rollout importance-sampling correction: the train/rollout mismatch as a detached per-token weight.

The rollout engine samples from its own distribution q (its kernels, precision, and for the embedded
engine with top-k/top-p the truncated distribution); the losses assume the samples came from
p = π_old, whose log-probs the trainer recomputes. With the engine's own log-probs the ratio

    token level:     w_t = p(y_t | y_<t) / q(y_t | y_<t) = exp(old_logp_t − engine_logp_t)
    sequence level:  w   = p(y) / q(y) = exp(Σ_t m_t·(old_logp_t − engine_logp_t))   (one per response)

re-weights them: the corrected loss is l'_t = sg(ŵ_t)·l_t for every response token t (the sequence
weight broadcast to the response's tokens), ŵ the weight after

    --rollout-is-correction tis:  ŵ = min(w, C)                     (truncated IS)
    --rollout-is-correction mis:  ŵ = w·1[low ≤ w ≤ C]              (masked IS: outside, no loss at all)

C = --rollout-is-threshold, low = --rollout-is-threshold-low (mis only; default 1/C, the band
[1/C, C] symmetric in log w). What the expectation over engine samples then is, for any function f of
the response (the loss of one response, or its gradient) — proved by enumeration in
tests/losses/test_rollout_is_exact.py:

    sequence level, no bound:  E_q[w·f] = E_p[f]                                        (exact)
    tis:                       E_q[min(w, C)·f] = E_p[min(1, C/w)·f]
                               (bias −E_p[(1 − C/w)⁺·f]: responses the engine under-samples by more
                               than a factor C count for only C/w of their weight)
    mis:                       E_q[w·1[low ≤ w ≤ C]·f] = E_p[1[low ≤ w ≤ C]·f]
                               (the expectation over p restricted to the kept band, not renormalised)
    token level:               E_q[ŵ_t·f_t] = E_{m_t}[(ŵ_t / w_t)·f_t],
                               m_t(y) = q(y_<t)·p(y_t | y_<t)·q(y_>t | y_≤t)

The token weight corrects the distribution of token t given its prefix only: the prefix (and, for
a loss that reads the whole response, such as a sequence advantage, the suffix) stays distributed as
the engine sampled it. It is exact for one-token responses, and in general only approximately E_p
(the same test measures the gap); it is the variance-cheaper choice, as the sequence weight is a
product over all tokens.

Weights are computed in float64 in log space (a product of thousands of token ratios overflows in
linear space): log w is clamped at log C before exp, so ŵ ≤ C even where exp(log w) overflows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_rpg.losses.validation import check_choice, check_same_shape

ROLLOUT_IS_CORRECTIONS = ("none", "tis", "mis")
ROLLOUT_IS_LEVELS = ("token", "sequence")
DEFAULT_THRESHOLD = 2.0  # verl's rollout_is_threshold and slime's --tis-clip default


@dataclass(frozen=True)
class RolloutISConfig:
    """--rollout-is-correction / -level / -threshold / -threshold-low. threshold_low None: 1/threshold
    (mis); tis reads no lower bound. Bounds: threshold C ≥ 1 (with C < 1 a token on which engine and
    trainer agree, w = 1, would be truncated or masked too) and, for mis, 0 ≤ low ≤ 1 (low = 0: no
    lower bound)."""

    correction: str = "none"
    level: str = "token"
    threshold: float = DEFAULT_THRESHOLD
    threshold_low: float | None = None

    def __post_init__(self):  # the messages name the trainer's flags (training/flags.py)
        check_choice("--rollout-is-correction", self.correction, ROLLOUT_IS_CORRECTIONS)
        check_choice("--rollout-is-level", self.level, ROLLOUT_IS_LEVELS)
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold >= 1):
            raise ValueError(f"--rollout-is-threshold={self.threshold!r} must be a finite number >= 1 (the largest "
                             f"weight kept; w = 1 where engine and trainer agree, so C < 1 would cut those "
                             f"tokens too); e.g. {DEFAULT_THRESHOLD}")
        if self.threshold_low is not None:
            if self.correction != "mis":
                raise ValueError(f"--rollout-is-threshold-low={self.threshold_low} is read only with "
                                 f"--rollout-is-correction mis (tis truncates from above only)")
            low = self.threshold_low
            if not (isinstance(low, (int, float)) and math.isfinite(low) and 0 <= low <= 1 and low < self.threshold):
                raise ValueError(f"--rollout-is-threshold-low={low!r} must lie in [0, 1] and below "
                                 f"--rollout-is-threshold {self.threshold} (0: no lower bound); default "
                                 f"1/threshold = {1 / self.threshold:g}")

    @property
    def enabled(self) -> bool:
        return self.correction != "none"

    @property
    def low(self) -> float:
        """mis's lower bound: threshold_low, or 1/threshold when not given."""
        return 1.0 / self.threshold if self.threshold_low is None else float(self.threshold_low)


def rollout_is_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor,
                       config: RolloutISConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ŵ, outside, log w), float64 [batch, seq]; outside the mask ŵ = 1 (a padding token's loss is
    left as it was), outside False, log w 0.

    ŵ: the weight multiplied into each response token's loss (module docstring; the sequence weight
    repeated on every token of its response); outside: True where the raw weight w left the kept
    range (tis: w > C, truncated; mis: w outside [low, C], masked); log w: the raw log-weight (the
    sequence's sum on each of its tokens). Inputs are detached; config.correction must not be "none"."""
    check_same_shape("engine_logp", engine_logp, "old_logp", old_logp)
    check_same_shape("mask", mask, "old_logp", old_logp)
    if not config.enabled:
        raise ValueError("rollout_is_weights needs a correction ('tis' or 'mis'), got 'none'")
    keep = mask.detach().bool()
    log_w = torch.where(keep, old_logp.detach().double() - engine_logp.detach().double(), 0.0)
    if not bool(torch.isfinite(log_w[keep]).all()):
        raise ValueError("old_logp − engine_logp is not finite at a response token (a NaN or −inf log-prob from the "
                         "trainer or the engine); the importance weight is undefined there")
    if config.level == "sequence":
        log_w = torch.where(keep, log_w.sum(dim=-1, keepdim=True).expand_as(log_w), 0.0)
    log_c = math.log(config.threshold)
    if config.correction == "tis":
        outside = keep & (log_w > log_c)
        weight = torch.exp(log_w.clamp(max=log_c))
    else:
        low = config.low
        below = (log_w < math.log(low)) if low > 0 else torch.zeros_like(keep)
        outside = keep & ((log_w > log_c) | below)
        weight = torch.where(outside, 0.0, torch.exp(log_w.clamp(max=log_c)))
    return torch.where(keep, weight, 1.0), outside, log_w


def apply_rollout_is_weight(per_token: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """l'_t = sg(ŵ_t)·l_t (per_token unchanged, the same tensor, for weight None: no correction)."""
    if weight is None:
        return per_token
    check_same_shape("rollout_is_weight", weight, "the per-token loss", per_token)
    return per_token * weight.detach().to(per_token.dtype)
