"""RPG-Style Clip: truncated importance sampling with a dual clip (docs/algorithms.md, RPG-Style Clip).

All functions take the log importance weight log w (token- or sequence-level) and work in log space,
so a sequence-level weight exp(Σ_t ℓ_t − ℓ_old,t) is never formed where it could overflow.

Algorithm 1 (fully differentiable), with r = w and a detached regularised advantage Â:
    p = max(−Â·r, −Â·clip(r, 1−ε_low, 1+ε_high));   loss = p if Â ≥ 0 else min(p, −c·Â).
Piecewise: Â ≥ 0: −Â·r for r ≤ 1+ε_high, constant −Â·(1+ε_high) above (no gradient).
           Â < 0: constant −Â·(1−ε_low) for r < 1−ε_low, −Â·r for 1−ε_low ≤ r ≤ c, constant −c·Â above.

Algorithm 2 (REINFORCE-style): gradient flows through a unit only in its active region
    A > 0 and w < 1+ε_high,   or   A ≤ 0 and 1−ε_low ≤ w < c,
and the KL component uses the clipped weight w̄ = clip(w, 1−ε_low, 1+ε_high).
With a clip so wide that no region binds, both reduce to the unclipped RPG losses (exact gradients).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from megatron_rpg.losses.validation import check_range


@dataclass(frozen=True)
class RPGClip:
    """ε_low ∈ [0, 1), ε_high ≥ 0, not both 0, dual-clip constant c > 1 (None: no dual clip). Paper defaults."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = 10.0

    def __post_init__(self):
        check_range("clip.eps_low", self.eps_low, 0.0, 1.0, high_inclusive=False)
        check_range("clip.eps_high", self.eps_high, 0.0)
        if self.eps_low == 0 and self.eps_high == 0:
            raise ValueError("eps_low = eps_high = 0 clips every ratio to 1: the clipped loss has no gradient "
                             "once θ ≠ θ_old (a constant loss); give positive bounds, or use no clip "
                             "(--rpg-no-clip)")
        if self.dual_clip is not None:
            check_range("clip.dual_clip", self.dual_clip, 1.0, low_inclusive=False)

    @property
    def log_low(self) -> float:
        return math.log1p(-self.eps_low)

    @property
    def log_high(self) -> float:
        return math.log1p(self.eps_high)

    @property
    def log_dual(self) -> float:
        return math.inf if self.dual_clip is None else math.log(self.dual_clip)


class ClipRegions(NamedTuple):
    """Boolean masks (per unit) of where each bound binds; used for gradients and clip-fraction metrics."""

    low: torch.Tensor
    high: torch.Tensor
    dual: torch.Tensor


def clipped_log_weight(log_w: torch.Tensor, clip: RPGClip) -> torch.Tensor:
    """log w̄ = clamp(log w, log(1−ε_low), log(1+ε_high)); zero gradient where it binds."""
    return log_w.clamp(clip.log_low, clip.log_high)


def dual_clip_surrogate(adv_hat: torch.Tensor, log_w: torch.Tensor, clip: RPGClip
                        ) -> tuple[torch.Tensor, ClipRegions]:
    """Algorithm 1 per unit: loss = p if Â ≥ 0 else min(p, −c·Â), p = max(−Â·r, −Â·clip(r)).

    adv_hat must be detached (it is an advantage, not a loss term). r is formed from log w capped at
    max(log(1+ε_high), log c): beyond that cap every branch above is constant in r, so the cap changes
    neither value nor gradient and keeps exp() finite for sequence-level weights.
    """
    cap = max(clip.log_high, clip.log_dual)
    ratio = torch.exp(log_w.clamp(max=cap)) if math.isfinite(cap) else torch.exp(log_w)
    clipped_ratio = torch.exp(clipped_log_weight(log_w, clip))
    p = torch.maximum(-adv_hat * ratio, -adv_hat * clipped_ratio)
    negative = adv_hat < 0
    if clip.dual_clip is not None:
        loss = torch.where(negative, torch.minimum(p, -clip.dual_clip * adv_hat), p)
    else:
        loss = p
    with torch.no_grad():
        regions = ClipRegions(low=negative & (log_w < clip.log_low),
                              high=~negative & (log_w > clip.log_high),
                              dual=negative & (log_w > clip.log_dual))
    return loss, regions


def reinforce_active_region(advantages: torch.Tensor, log_w: torch.Tensor, clip: RPGClip
                            ) -> tuple[torch.Tensor, ClipRegions]:
    """Algorithm 2: active = (A > 0 and w < 1+ε_high) or (A ≤ 0 and 1−ε_low ≤ w < c).

    Returns the active mask and the reasons a unit is inactive (high: A > 0 and w ≥ 1+ε_high;
    low: A ≤ 0 and w < 1−ε_low; dual: A ≤ 0 and w ≥ c).
    """
    with torch.no_grad():
        positive = advantages > 0
        high = positive & (log_w >= clip.log_high)
        low = ~positive & (log_w < clip.log_low)
        dual = ~positive & (log_w >= clip.log_dual)
        active = ~(high | low | dual)
    return active, ClipRegions(low=low, high=high, dual=dual)
