"""The optional kl_clamp of rpg_loss acts on the per-sample KL value V (E_{π_old}[V] = D, ∇V = ∇T):
inactive it changes no gradient; FKL keeps its gradient on realistic sequence log-probs (its T = −u·ℓ is
an NLL, far above 10); where |V| > kl_clamp the KL gradient is zero, identically in both styles."""
import math

import pytest
import torch

from megatron_rpg.losses import RPGClip, rpg_loss
from megatron_rpg.losses.exact import TabularPolicy, flat_grad
from megatron_rpg.losses.rpg import kl_value

DIVERGENCES = ("fkl", "ufkl", "rkl", "urkl")
STYLES = ("differentiable", "reinforce")
WIDE = RPGClip(eps_low=1 - 1e-12, eps_high=1e12, dual_clip=1e12)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_kl_value_is_an_unbiased_per_sample_estimate_of_the_divergence(name):
    # E_{π_old}[V] = D(π_θ, π_ref) by enumeration over the 9 sequences, θ, π_old, π_ref all different
    old = TabularPolicy(3, 2, seed=0)
    theta, ref = old.perturbed(0.7, seed=1), old.perturbed(0.7, seed=2)
    log_p, log_old, log_q = (policy.sequence_logp().detach() for policy in (theta, old, ref))
    p, q = log_p.exp(), log_q.exp()
    forward, reverse = (q * (log_q - log_p)).sum(), (p * (log_p - log_q)).sum()
    closed_form = {"fkl": forward, "ufkl": forward + (p - q).sum(), "rkl": reverse, "urkl": reverse + (q - p).sum()}
    estimate = (log_old.exp() * kl_value(name, log_p - log_old, log_q - log_old)).sum()
    assert float(closed_form[name]) > 1e-2
    assert float(estimate) == pytest.approx(float(closed_form[name]), rel=1e-12, abs=0.0)


@pytest.mark.parametrize("clip", [None, RPGClip()])
@pytest.mark.parametrize("is_level", ["token", "sequence"])
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", DIVERGENCES)
def test_an_inactive_kl_clamp_leaves_the_gradient_bit_for_bit_unchanged(name, style, is_level, clip):
    old = TabularPolicy(3, 2, seed=0)
    theta, ref = old.perturbed(0.5, seed=1), old.perturbed(0.5, seed=2)
    advantages = torch.randn(9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads = []
    for kl_clamp in (None, 1e6):
        loss, _ = rpg_loss(theta.token_logp(), old.token_logp().detach(), advantages, divergence=name, style=style,
                           beta=0.7, ref_logp=ref.token_logp().detach(), is_level=is_level, clip=clip,
                           kl_clamp=kl_clamp)
        grads.append(flat_grad(loss, theta.params))
    assert float(grads[0].norm()) > 1e-3
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("style", STYLES)
def test_fkl_keeps_its_kl_gradient_under_kl_clamp_10_on_a_sequence_log_prob_of_minus_24(style, with_ref):
    # ℓ = Σ_t ℓ_t = −24, log w = 0.3: T = −ℓ = 24 would be outside ±10, but V = −u·log ρ is small
    logp = torch.full((1, 4), -6.0, dtype=torch.float64, requires_grad=True)
    old_logp = torch.full((1, 4), -6.075, dtype=torch.float64)
    ref_logp = torch.full((1, 4), -6.1, dtype=torch.float64) if with_ref else None
    u = math.exp(4 * (-6.1 + 6.075)) if with_ref else 1.0
    assert -float(logp.detach().sum()) == 24.0
    grads = {}
    for kl_clamp in (None, 10.0):
        loss, _ = rpg_loss(logp, old_logp, torch.zeros(1, dtype=torch.float64), divergence="fkl", style=style,
                           beta=0.5, ref_logp=ref_logp, is_level="sequence", aggregation="seq-mean-token-sum",
                           kl_clamp=kl_clamp)
        (grads[kl_clamp],) = torch.autograd.grad(loss, logp)
    # ∇_ℓt (β·V) = −β·u for every token (seq-mean-token-sum over one sequence: the whole L)
    assert torch.allclose(grads[10.0], torch.full((1, 4), -0.5 * u, dtype=torch.float64), rtol=1e-14, atol=0)
    assert torch.equal(grads[10.0], grads[None])


# log w per divergence (π_ref = π_old, so ρ = w) where |V| > 10: fkl V = −log w = 12; at log w = 3,
# ufkl V = e³ − 1 − 3 ≈ 16.1, rkl V = 3e³ ≈ 60.3, urkl V = 3e³ − e³ + 1 ≈ 41.2
OUTSIDE = {"fkl": -12.0, "ufkl": 3.0, "rkl": 3.0, "urkl": 3.0}
INSIDE = 0.4  # |V| < 1 for all four


@pytest.mark.parametrize("kl_in_advantage", [True, False])
@pytest.mark.parametrize("clip", [None, WIDE])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_kl_gradient_is_zero_where_the_kl_value_is_outside_the_clamp_and_equal_in_both_styles(name, clip,
                                                                                             kl_in_advantage):
    log_w = torch.tensor([OUTSIDE[name], INSIDE], dtype=torch.float64)
    w = log_w.exp()
    v = {"fkl": -log_w, "ufkl": w - 1 - log_w, "rkl": w * log_w, "urkl": w * log_w - w + 1}[name]
    assert float(v[0].abs()) > 10 > float(v[1].abs())
    k_inside = {"fkl": -1.0, "ufkl": w[1] - 1, "rkl": w[1] * (log_w[1] + 1), "urkl": w[1] * log_w[1]}[name]
    grads = {}
    for style in STYLES:
        for kl_clamp in (None, 10.0):
            logp = log_w[:, None].clone().requires_grad_(True)  # two token-level units, ℓ_old = 0 ⇒ log w = ℓ
            loss, _ = rpg_loss(logp, torch.zeros_like(logp), torch.zeros(2, dtype=torch.float64), divergence=name,
                               style=style, beta=1.0, clip=clip, kl_in_advantage=kl_in_advantage,
                               kl_clamp=kl_clamp, aggregation="seq-mean-token-sum")
            (grads[style, kl_clamp],) = torch.autograd.grad(loss, logp)
    for style in STYLES:
        clamped, unclamped = grads[style, 10.0][:, 0], grads[style, None][:, 0]
        # seq-mean-token-sum over 2 one-token sequences: each unit's gradient is β·K/2
        assert float(clamped[0]) == 0.0 and abs(float(unclamped[0])) > 1e-3
        assert float(clamped[1]) == pytest.approx(float(k_inside) / 2, rel=1e-12) == float(unclamped[1])
    assert torch.allclose(grads["differentiable", 10.0], grads["reinforce", 10.0], rtol=1e-15, atol=0)


@pytest.mark.parametrize("clip", [None, RPGClip(eps_low=0.9, eps_high=100.0, dual_clip=200.0)])
def test_kl_clamp_drops_the_kl_gradient_where_the_kl_value_exceeds_it_in_both_styles(clip):
    # per-token log ρ = log w: 0.5 (rkl value w·log w ≈ 0.82, inside ±5) and 3.0 (≈ 60, outside)
    logp = torch.tensor([[0.5, 3.0]], dtype=torch.float64, requires_grad=True)
    old_logp, adv = torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    grads = {}
    for style in STYLES:
        for clamp in (None, 5.0):
            loss, _ = rpg_loss(logp, old_logp, adv, divergence="rkl", style=style, beta=1.0, clip=clip,
                               kl_clamp=clamp, aggregation="seq-mean-token-sum")
            (grads[style, clamp],) = torch.autograd.grad(loss, logp)
    for style in STYLES:
        unclamped, clamped = grads[style, None][0], grads[style, 5.0][0]
        # inside: unchanged, = β·w·(log w + 1); outside: zero (the unclamped one is not)
        assert float(clamped[0]) == pytest.approx(math.exp(0.5) * 1.5, rel=1e-14) == float(unclamped[0])
        assert float(clamped[1]) == 0.0 and float(unclamped[1]) > 1.0
    assert torch.equal(grads["differentiable", 5.0], grads["reinforce", 5.0])
