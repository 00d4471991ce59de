"""k-estimators of KL divergence on a log-ratio (Schulman's k1/k2/k3).

With δ = log(π_ref/π_θ) evaluated on samples x ~ π_θ:
    k1 = −δ            (unbiased for KL(π_θ‖π_ref), high variance)
    k2 = ½·δ²          (biased, low variance)
    k3 = e^δ − 1 − δ   (unbiased for KL(π_θ‖π_ref), non-negative; "k3 is exactly the unnormalised KL")
Exactness (proved by enumeration in tests/losses/test_kl.py, float64): E_{π_θ}[k1] = E_{π_θ}[k3] =
KL(π_θ‖π_ref) exactly, since E_{π_θ}[e^δ] = Σ π_ref = 1; E_{π_θ}[k2] ≠ KL(π_θ‖π_ref) in general.
"""
from __future__ import annotations

import torch

from megatron_rpg.losses.validation import check_choice

KL_ESTIMATORS = ("k1", "k2", "k3")


def k1(log_ratio_ref_over_policy: torch.Tensor) -> torch.Tensor:
    """k1 = −δ, δ = log(π_ref/π_θ)."""
    return -log_ratio_ref_over_policy


def k2(log_ratio_ref_over_policy: torch.Tensor) -> torch.Tensor:
    """k2 = ½·δ²."""
    return 0.5 * log_ratio_ref_over_policy.square()


def k3(log_ratio_ref_over_policy: torch.Tensor) -> torch.Tensor:
    """k3 = e^δ − 1 − δ, formed with expm1 (no cancellation for small δ)."""
    delta = log_ratio_ref_over_policy
    return torch.expm1(delta) - delta


def kl_estimate(log_ratio_ref_over_policy: torch.Tensor, estimator: str) -> torch.Tensor:
    """The named estimator ("k1", "k2" or "k3") of δ = log(π_ref/π_θ), elementwise."""
    check_choice("estimator", estimator, KL_ESTIMATORS)
    return {"k1": k1, "k2": k2, "k3": k3}[estimator](log_ratio_ref_over_policy)
