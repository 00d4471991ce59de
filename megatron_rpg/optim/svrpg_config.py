"""SVRPG settings: one dataclass, its command-line flags (`--svrpg-*`) and their validation.

    parser = argparse.ArgumentParser(); add_svrpg_args(parser)
    svrpg = SVRPGOptimizer.from_args(optimizer, parser.parse_args())   # None without --svrpg

Defaults (m = 4 inner steps, an anchor batch of 256 sequences, no clipping) are starting points;
tools/bench/svrpg.py measures the variance/bias trade-off behind them (docs/benchmarks.md).
--svrpg-anchor-batch-size is |D_L|: the trainer draws that many sequences from π_θ̃ at each refresh
and SVRPGOptimizer.anchor() checks the anchor batches it was given add up to it.
"""
from __future__ import annotations

import argparse
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

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SVRPGConfig":
        return cls(enabled=args.svrpg, inner_steps=args.svrpg_inner_steps,
                   anchor_batch_size=args.svrpg_anchor_batch_size,
                   rho_clip=tuple(args.svrpg_rho_clip) if args.svrpg_rho_clip else None,
                   rho_cap=args.svrpg_rho_cap, update_ref=args.svrpg_update_ref)


def add_svrpg_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    defaults = SVRPGConfig()
    group = parser.add_argument_group("svrpg", "variance-reduced policy gradient (docs/algorithms.md, 2. SVRPG)")
    group.add_argument("--svrpg", action="store_true", help="enable the SVRPG optimizer wrapper")
    group.add_argument("--svrpg-inner-steps", type=int, default=defaults.inner_steps,
                       help="optimizer steps between snapshot refreshes (m)")
    group.add_argument("--svrpg-anchor-batch-size", type=int, default=defaults.anchor_batch_size,
                       help="sequences drawn from the snapshot policy for the anchor gradient μ")
    group.add_argument("--svrpg-rho-clip", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       default=None, help="Dual-Clip truncation of ρ = π_θ̃/π_θt to [LOW, HIGH]")
    group.add_argument("--svrpg-rho-cap", type=float, default=None,
                       help="hard cap c on ρ (applied with --svrpg-rho-clip's HIGH: min(HIGH, c))")
    group.add_argument("--svrpg-update-ref", action="store_true",
                       help="set the reference policy to the snapshot at every refresh "
                            "(ref_logp from SVRPGOptimizer.reference_logprobs)")
    return parser
