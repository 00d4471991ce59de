"""k1/k2/k3 KL estimators: values against their closed forms, and by enumeration over a small softmax
(float64) E_{π_θ}[k1] = E_{π_θ}[k3] = KL(π_θ‖π_ref) exactly, E_{π_θ}[k2] not (it is biased)."""
import math

import pytest
import torch

from megatron_rpg.losses.kl import KL_ESTIMATORS, k1, k2, k3, kl_estimate

DELTAS = (-3.0, -0.5, -1e-9, 0.0, 1e-9, 0.7, 2.5)  # δ = log(π_ref/π_θ)
CLOSED_FORMS = {"k1": lambda d: -d, "k2": lambda d: 0.5 * d * d, "k3": lambda d: math.expm1(d) - d}


@pytest.mark.parametrize("name", KL_ESTIMATORS)
def test_estimators_and_kl_estimate_match_their_closed_forms_elementwise(name):
    delta = torch.tensor(DELTAS, dtype=torch.float64)
    expected = torch.tensor([CLOSED_FORMS[name](d) for d in DELTAS], dtype=torch.float64)
    direct = {"k1": k1, "k2": k2, "k3": k3}[name](delta)
    assert torch.allclose(direct, expected, rtol=1e-15, atol=0.0)
    assert torch.equal(kl_estimate(delta, name), direct)


def test_k3_is_non_negative_and_keeps_precision_for_tiny_log_ratios():
    delta = torch.tensor(DELTAS, dtype=torch.float64)
    assert bool((k3(delta) >= 0).all())
    # e^δ − 1 − δ ≈ δ²/2 for |δ| ≪ 1: a naive exp(δ) − 1 − δ would return 0 or rounding noise here
    tiny = torch.tensor([1e-6], dtype=torch.float64)
    assert float(k3(tiny)) == pytest.approx(0.5e-12 + 1e-18 / 6, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k1_and_k3_are_unbiased_for_the_reverse_kl_by_enumeration_and_k2_is_not(seed):
    generator = torch.Generator().manual_seed(seed)
    log_theta = torch.log_softmax(torch.randn(6, generator=generator, dtype=torch.float64), dim=0)
    log_ref = torch.log_softmax(torch.randn(6, generator=generator, dtype=torch.float64), dim=0)
    p_theta = log_theta.exp()
    reverse_kl = float((p_theta * (log_theta - log_ref)).sum())  # KL(π_θ‖π_ref), closed form
    delta = log_ref - log_theta
    expectation = {name: float((p_theta * kl_estimate(delta, name)).sum()) for name in KL_ESTIMATORS}
    assert reverse_kl > 1e-2  # the two policies differ: the check is not 0 = 0
    assert expectation["k1"] == pytest.approx(reverse_kl, rel=1e-13, abs=0.0)
    assert expectation["k3"] == pytest.approx(reverse_kl, rel=1e-13, abs=0.0)
    assert abs(expectation["k2"] - reverse_kl) > 1e-4


def test_kl_estimate_unknown_name_raises_value_error_naming_it_and_the_accepted_values():
    with pytest.raises(ValueError, match=r"estimator='k4'.*accepted values: \['k1', 'k2', 'k3'\]"):
        kl_estimate(torch.zeros(2), "k4")
