"""SVRPG settings: one dataclass and its validation (the trainer's `--svrpg-*` flags fill it:
training/flags.py, training/config.py).

    svrpg = SVRPGOptimizer(optimizer, SVRPGConfig(enabled=True, inner_steps=4, anchor_batch_size=256))

Defaults (m = 4 inner steps, an anchor batch of 256 sequences, no clipping) are starting points;
tools/bench/svrpg.py measures the variance/bias trade-off behind them (docs/benchmarks.md).
--svrpg-anchor-batch-size is |D_L|: the trainer draws that many sequences from π_θ̃ at each refresh
and SVRPGOptimizer.anchor() checks the anchor batches it was given add up to it.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_rpg.losses.svrpg import RatioClip


@dataclass(frozen=True)
class SVRPGConfig:
    """enabled: use SVRPG; inner_steps: m, optimiser steps per snapshot; anchor_batch_size: |D_L| in
    sequences (the anchor gradient μ is their mean); rho_clip: (ρ_low, ρ_high) Dual-Clip bounds or
    None; rho_cap: c, a hard cap on ρ (None: none); update_ref: π_ref ← π_θ̃ at each snapshot."""

    enabled: bool = False
    inner_steps: int = 4
    anchor_batch_size: int = 256
    rho_clip: tuple[float, float] | None = None
    rho_cap: float | None = None
    update_ref: bool = False

    def __post_init__(self):
        for name in ("inner_steps", "anchor_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--svrpg-{name.replace('_', '-')} must be a positive integer, "
                                 f"got {value!r}")
        if self.rho_clip is not None and len(self.rho_clip) != 2:
            raise ValueError(f"--svrpg-rho-clip takes two numbers LOW HIGH, got {self.rho_clip!r}")
        self.ratio_clip  # validates the bounds (0 < low < min(high, cap)) with a clear message

    @property
    def ratio_clip(self) -> RatioClip:
        low, high = self.rho_clip if self.rho_clip is not None else (None, None)
        return RatioClip(low=low, high=high, cap=self.rho_cap)
