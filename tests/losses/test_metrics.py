"""The detached metrics of rpg_loss and the baseline losses (kl_k3, ratio_mean, ratio_max,
log_ratio_mean) equal direct computations over the response tokens only: padding, here holding a
huge log-ratio and a NaN, must not count."""
import math

import pytest
import torch

from megatron_rpg.losses import rpg_loss
from megatron_rpg.losses.baselines import dapo, grpo, grpo_is_kl, ppo_clip, reinforce_pp
from megatron_rpg.losses.clip import RPGClip

MASK = [[1, 1, 1, 0], [1, 1, 0, 0]]
LOGP = [[-0.3, -1.2, -0.8, 40.0], [-2.0, -0.1, float("nan"), 30.0]]
OLD = [[-0.5, -1.0, -1.1, 0.0], [-1.6, -0.4, 0.0, float("nan")]]
REF = [[-0.2, -1.5, -0.6, float("nan")], [-1.9, -0.7, 5.0, 0.0]]


def tensors():
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.float64)
    return as_tensor(LOGP).requires_grad_(True), as_tensor(OLD), as_tensor(REF), torch.tensor(MASK, dtype=torch.bool)


def response(rows):
    """Values at the response tokens only, row by row."""
    return [[v for v, m in zip(row, mask) if m] for row, mask in zip(rows, MASK)]


def expected_metrics(log_ratios, ref_log_ratios):
    """Direct formulas over a flat list of units: log w = ℓ − ℓ_old, δ = ℓ_ref − ℓ, k3 = e^δ − 1 − δ."""
    ratios = [math.exp(v) for v in log_ratios]
    return {"kl_k3": sum(math.expm1(d) - d for d in ref_log_ratios) / len(ref_log_ratios),
            "ratio_mean": sum(ratios) / len(ratios), "ratio_max": max(ratios),
            "log_ratio_mean": sum(log_ratios) / len(log_ratios)}


def token_units(ref):
    logp, old = response(LOGP), response(OLD)
    log_w = [a - b for ra, rb in zip(logp, old) for a, b in zip(ra, rb)]
    delta = [c - a for ra, rc in zip(logp, response(ref)) for a, c in zip(ra, rc)]
    return log_w, delta


def sequence_units(ref):
    logp, old = response(LOGP), response(OLD)
    log_w = [sum(ra) - sum(rb) for ra, rb in zip(logp, old)]
    delta = [sum(rc) - sum(ra) for ra, rc in zip(logp, response(ref))]
    return log_w, delta


def assert_metrics(metrics, expected, keys):
    for key in keys:
        assert float(metrics[key]) == pytest.approx(expected[key], rel=1e-13, abs=0.0), key


@pytest.mark.parametrize("with_ref", [True, False])
@pytest.mark.parametrize("is_level", ["token", "sequence"])
@pytest.mark.parametrize("style", ["differentiable", "reinforce"])
def test_rpg_metrics_are_the_direct_means_over_response_units(style, is_level, with_ref):
    logp, old, ref, mask = tensors()
    _, metrics = rpg_loss(logp, old, torch.tensor([0.5, -1.0], dtype=torch.float64), divergence="urkl",
                          style=style, beta=0.1, ref_logp=ref if with_ref else None, mask=mask, is_level=is_level,
                          clip=RPGClip())
    units = token_units if is_level == "token" else sequence_units
    log_w, delta = units(REF if with_ref else OLD)  # ref_logp=None: π_ref = π_old
    expected = expected_metrics(log_w, delta)
    assert_metrics(metrics, expected, ("kl_k3", "ratio_mean", "ratio_max", "log_ratio_mean"))
    assert all(math.isfinite(float(value)) for value in metrics.values())


@pytest.mark.parametrize("loss_name", ["ppo_clip", "dapo", "reinforce_pp", "grpo token", "grpo sequence",
                                       "grpo_is_kl token"])
def test_baseline_metrics_are_the_direct_means_over_response_tokens(loss_name):
    logp, old, ref, mask = tensors()
    adv = torch.tensor([0.5, -1.0], dtype=torch.float64)
    name, _, kl_level = loss_name.partition(" ")
    if name in ("grpo", "grpo_is_kl"):
        loss_fn = grpo if name == "grpo" else grpo_is_kl
        _, metrics = loss_fn(logp, old, ref, adv, mask=mask, kl_level=kl_level)
    elif name == "reinforce_pp":
        _, metrics = reinforce_pp(logp, old, adv[:, None].expand(2, 4).clone(), mask=mask)
    else:
        _, metrics = {"ppo_clip": ppo_clip, "dapo": dapo}[name](logp, old, adv, mask=mask)
    log_w, delta = token_units(REF)
    expected = expected_metrics(log_w, delta)
    assert_metrics(metrics, expected, ("ratio_mean", "ratio_max", "log_ratio_mean"))
    # the GRPO KL metric is the per-token k3 mean, whatever the level of the KL term in the loss
    assert ("kl_k3" in metrics) == name.startswith("grpo")
    if "kl_k3" in metrics:
        assert_metrics(metrics, expected, ("kl_k3",))
