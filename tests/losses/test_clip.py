"""RPG-Style Clip: Algorithm 2's branch masks, Algorithm 1's dual-clip values, and that a clip which
never binds leaves the exact (unclipped) gradients untouched."""
import math

import pytest
import torch

from megatron_rpg.losses import RPGClip, rpg_loss, rpg_per_token_loss
from megatron_rpg.losses.clip import dual_clip_surrogate, reinforce_active_region
from megatron_rpg.losses.exact import TabularPolicy, flat_grad, relative_error

CLIP = RPGClip(eps_low=0.2, eps_high=0.28, dual_clip=3.0)
BETA = 0.3
# one weight inside every region: below 1−ε_low, inside the band (twice), between 1+ε_high and c, above c
WEIGHTS = (0.5, 0.9, 1.2, 1.5, 5.0)
ADVANTAGES = (1.3, -0.7, 0.0)
# Algorithm 2: active iff (A > 0 and w < 1+ε_high) or (A ≤ 0 and 1−ε_low ≤ w < c)
ACTIVE = {1.3: (True, True, True, False, False),
          -0.7: (False, True, True, True, False),
          0.0: (False, True, True, True, False)}


def grid():
    """Token-level batch [1, 15]: every (advantage, weight) pair; logp is the leaf, old_logp = 0 ⇒ w = e^logp."""
    adv = torch.tensor([[a for a in ADVANTAGES for _ in WEIGHTS]], dtype=torch.float64)
    log_w = torch.tensor([[math.log(w) for _ in ADVANTAGES for w in WEIGHTS]], dtype=torch.float64)
    return adv, log_w.clone().requires_grad_(True), torch.zeros_like(log_w)


@pytest.mark.parametrize("name", ["fkl", "ufkl", "rkl", "urkl"])
def test_reinforce_clip_gives_gradient_exactly_in_the_active_regions_with_clipped_kl_weight(name):
    adv, logp, old_logp = grid()
    per_token, metrics = rpg_per_token_loss(logp, old_logp, adv, divergence=name, style="reinforce", beta=BETA,
                                            clip=CLIP)
    (grad,) = torch.autograd.grad(per_token.sum(), logp)
    for k, (a, w) in enumerate((a, w) for a in ADVANTAGES for w in WEIGHTS):
        w_bar = min(max(w, 1 - CLIP.eps_low), 1 + CLIP.eps_high)
        kl_component = {"fkl": BETA, "ufkl": BETA * (1 - w_bar), "rkl": -BETA * w_bar * (math.log(w_bar) + 1),
                        "urkl": -BETA * w_bar * math.log(w_bar)}[name]
        active = ACTIVE[a][WEIGHTS.index(w)]
        expected = -(a * w + kl_component) if active else 0.0  # ∂(−sg(G)·ℓ)/∂ℓ = −G
        assert abs(float(grad[0, k]) - expected) <= 1e-12, (a, w, active)
    # inactive reasons: high (A>0, w ≥ 1+ε_high): 2 of 15; low (A≤0, w < 1−ε_low): 2; dual (A≤0, w ≥ c): 2
    assert [float(metrics[f"clip_frac_{r}"]) * 15 for r in ("low", "high", "dual")] == pytest.approx([2, 2, 2])


def test_reinforce_kl_outside_the_clip_is_unclipped_and_always_active():
    adv, logp, old_logp = grid()
    per_token, _ = rpg_per_token_loss(logp, old_logp, adv, divergence="urkl", style="reinforce", beta=BETA,
                                      clip=CLIP, kl_in_advantage=False)
    (grad,) = torch.autograd.grad(per_token.sum(), logp)
    for k, (a, w) in enumerate((a, w) for a in ADVANTAGES for w in WEIGHTS):
        policy = a * w if ACTIVE[a][WEIGHTS.index(w)] else 0.0
        assert abs(float(grad[0, k]) + policy - BETA * w * math.log(w)) <= 1e-12


def dual_clip_piecewise(adv_hat: float, r: float) -> tuple[float, float]:
    """Algorithm 1 written out region by region: (value, d value / d log r)."""
    if adv_hat >= 0:
        return (-adv_hat * r, -adv_hat * r) if r <= 1 + CLIP.eps_high else (-adv_hat * (1 + CLIP.eps_high), 0.0)
    if r < 1 - CLIP.eps_low:
        return -adv_hat * (1 - CLIP.eps_low), 0.0
    if r <= CLIP.dual_clip:
        return -adv_hat * r, -adv_hat * r
    return -CLIP.dual_clip * adv_hat, 0.0


@pytest.mark.parametrize("kl_in_advantage", [True, False])
@pytest.mark.parametrize("name", ["fkl", "ufkl", "rkl", "urkl"])
def test_differentiable_dual_clip_matches_the_formula_in_every_region(name, kl_in_advantage):
    adv, logp, old_logp = grid()
    per_token, _ = rpg_per_token_loss(logp, old_logp, adv, divergence=name, style="differentiable", beta=BETA,
                                      clip=CLIP, kl_in_advantage=kl_in_advantage)
    (grad,) = torch.autograd.grad(per_token.sum(), logp)
    for k, (a, w) in enumerate((a, w) for a in ADVANTAGES for w in WEIGHTS):
        lw = math.log(w)  # = ℓ, since ℓ_old = 0
        # the KL term T (value) and K = dT/dℓ of the docs/algorithms.md table, π_ref = π_old
        term, weight = {"fkl": (-lw, -1.0), "ufkl": (w - 1 - lw, w - 1), "rkl": (w * lw, w * (lw + 1)),
                        "urkl": (w * lw - w, w * lw)}[name]
        if kl_in_advantage and name in ("rkl", "urkl"):  # Algorithm 1: Â = A − β·K/w (detached), all clipped
            value, slope = dual_clip_piecewise(a - BETA * weight / w, w)
        else:  # Â = A; β·T outside the clip, unclipped
            value, slope = dual_clip_piecewise(a, w)
            value, slope = value + BETA * term, slope + BETA * weight
        assert abs(float(per_token[0, k].detach()) - value) <= 1e-12, (a, w)
        assert abs(float(grad[0, k]) - slope) <= 1e-12, (a, w)


def test_kl_in_advantage_changes_the_sign_of_the_regularised_advantage():
    # A = 0.05 > 0 but β·log w = 0.3·log 1.2 > 0.05: Â < 0, so the A < 0 branch (no upper clip) applies
    logp = torch.tensor([[math.log(1.2)]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([0.05], dtype=torch.float64)
    clip = RPGClip(eps_low=0.2, eps_high=0.1, dual_clip=3.0)
    loss, _ = rpg_loss(logp, torch.zeros_like(logp), adv, divergence="urkl", style="differentiable", beta=BETA,
                       clip=clip)
    adv_hat = 0.05 - BETA * math.log(1.2)
    assert adv_hat < 0 and abs(float(loss.detach()) - (-adv_hat * 1.2)) <= 1e-12


@pytest.mark.parametrize("is_level", ["token", "sequence"])
@pytest.mark.parametrize("kl_in_advantage", [True, False])
@pytest.mark.parametrize("style", ["differentiable", "reinforce"])
@pytest.mark.parametrize("name", ["fkl", "ufkl", "rkl", "urkl"])
def test_a_clip_that_never_binds_gives_the_unclipped_gradient(name, style, kl_in_advantage, is_level):
    old = TabularPolicy(3, 2, seed=0)
    theta, ref = old.perturbed(0.5, seed=1), old.perturbed(0.5, seed=2)
    advantages = torch.randn(9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    wide = RPGClip(eps_low=1 - 1e-12, eps_high=1e12, dual_clip=1e12)
    grads = []
    for clip in (None, wide):
        loss, metrics = rpg_loss(theta.token_logp(), old.token_logp().detach(), advantages, divergence=name,
                                 style=style, beta=BETA, ref_logp=ref.token_logp().detach(), is_level=is_level,
                                 clip=clip, kl_in_advantage=kl_in_advantage)
        grads.append(flat_grad(loss, theta.params))
        assert float(metrics["clip_frac_low"] + metrics["clip_frac_high"] + metrics["clip_frac_dual"]) == 0.0
    assert float(grads[0].norm()) > 1e-3
    assert relative_error(grads[1], grads[0]) <= 1e-12


@pytest.mark.parametrize("style", ["differentiable", "reinforce"])
def test_sequence_level_clip_works_in_log_space_without_overflow(style):
    # Σ_t (ℓ_t − ℓ_old,t) = 800: exp() would overflow, but every clipped branch is constant there
    logp = torch.full((2, 4), -1.0, dtype=torch.float64, requires_grad=True)
    old_logp = torch.full((2, 4), -201.0, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    per_token, metrics = rpg_per_token_loss(logp, old_logp, adv, divergence="urkl", style=style, beta=0.0,
                                            is_level="sequence", clip=CLIP)
    (grad,) = torch.autograd.grad(per_token.sum(), logp)
    assert torch.isfinite(per_token).all() and float(grad.abs().max()) == 0.0
    if style == "differentiable":  # A > 0: −A·(1+ε_high); A < 0: −c·A, spread over 4 tokens
        expected = torch.tensor([-(1 + CLIP.eps_high), CLIP.dual_clip], dtype=torch.float64)
        assert torch.allclose(per_token.detach().sum(dim=1), expected, rtol=0, atol=1e-12)
    assert float(metrics["clip_frac_high"]) == 0.5 and float(metrics["clip_frac_dual"]) == 0.5


@pytest.mark.parametrize("kwargs, name", [({"eps_low": 1.0}, "clip.eps_low"), ({"eps_low": -0.1}, "clip.eps_low"),
                                          ({"eps_high": -0.1}, "clip.eps_high"), ({"dual_clip": 1.0}, "clip.dual_clip")])
def test_bad_clip_parameters_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        RPGClip(**kwargs)


# Boundaries, exactly representable in float64 (log w = log(1.25) == log1p(0.25) etc., checked below):
# ε_low = 0.5, ε_high = 0.25, c = 4 ⇒ 1−ε_low = 0.5, 1+ε_high = 1.25, c = 4.
EDGE_CLIP = RPGClip(eps_low=0.5, eps_high=0.25, dual_clip=4.0)
EDGE_WEIGHTS = (0.5, 1.25, 4.0)
# Algorithm 2 at the edges: A > 0 and w < 1.25 (so w = 1.25 is out); A ≤ 0 and 0.5 ≤ w < 4 (0.5 in, 4 out)
EDGE_ACTIVE = {1.0: (True, False, False), -1.0: (True, True, False), 0.0: (True, True, False)}


def edge_grid():
    adv = torch.tensor([[a for a in EDGE_ACTIVE for _ in EDGE_WEIGHTS]], dtype=torch.float64)
    log_w = torch.log(torch.tensor([[w for _ in EDGE_ACTIVE for w in EDGE_WEIGHTS]], dtype=torch.float64))
    # the boundaries are hit exactly, not within rounding (else the test could not see >= vs >)
    assert [float(v) for v in log_w[0, :3]] == [EDGE_CLIP.log_low, EDGE_CLIP.log_high, EDGE_CLIP.log_dual]
    assert torch.exp(log_w).tolist() == [[w for _ in EDGE_ACTIVE for w in EDGE_WEIGHTS]]
    return adv, log_w


def test_reinforce_active_region_is_closed_at_one_minus_eps_low_and_open_at_one_plus_eps_high_and_c():
    adv, log_w = edge_grid()
    active, regions = reinforce_active_region(adv, log_w, EDGE_CLIP)
    expected = [EDGE_ACTIVE[a][i] for a in EDGE_ACTIVE for i in range(len(EDGE_WEIGHTS))]
    assert active[0].tolist() == expected
    # reasons: high only for A > 0 at w ∈ {1.25, 4}; low never (w = 0.5 is inside); dual for A ≤ 0 at w = 4
    assert regions.high[0].tolist() == [False, True, True] + [False] * 6
    assert regions.low[0].tolist() == [False] * 9
    assert regions.dual[0].tolist() == [False] * 3 + [False, False, True] * 2


@pytest.mark.parametrize("name", ["fkl", "ufkl", "rkl", "urkl"])
def test_reinforce_loss_gradient_at_the_exact_clip_boundaries_follows_algorithm_2(name):
    adv, log_w = edge_grid()
    logp = log_w.clone().requires_grad_(True)
    per_token, metrics = rpg_per_token_loss(logp, torch.zeros_like(logp), adv, divergence=name, style="reinforce",
                                            beta=BETA, clip=EDGE_CLIP)
    (grad,) = torch.autograd.grad(per_token.sum(), logp)
    for k, (a, w) in enumerate((a, w) for a in EDGE_ACTIVE for w in EDGE_WEIGHTS):
        w_bar = min(max(w, 0.5), 1.25)
        kl_component = {"fkl": BETA, "ufkl": BETA * (1 - w_bar), "rkl": -BETA * w_bar * (math.log(w_bar) + 1),
                        "urkl": -BETA * w_bar * math.log(w_bar)}[name]
        expected = -(a * w + kl_component) if EDGE_ACTIVE[a][EDGE_WEIGHTS.index(w)] else 0.0
        assert abs(float(grad[0, k]) - expected) <= 1e-12, (a, w)
    assert [float(metrics[f"clip_frac_{r}"]) * 9 for r in ("low", "high", "dual")] == pytest.approx([0, 2, 2])


def test_differentiable_clip_regions_do_not_bind_exactly_at_the_boundaries():
    # Algorithm 1 (Â = 0 counts as Â ≥ 0): Â ≥ 0 is −Â·r up to and including r = 1+ε_high;
    # Â < 0 is −Â·r for 1−ε_low ≤ r ≤ c. So at the edges only Â ≥ 0 with r = c > 1+ε_high is clipped.
    adv, log_w = edge_grid()
    loss, regions = dual_clip_surrogate(adv, log_w, EDGE_CLIP)
    assert regions.high[0].tolist() == [False, False, True, False, False, False, False, False, True]
    assert not bool(regions.low.any() | regions.dual.any())
    assert loss[0].tolist() == [-0.5, -1.25, -1.25, 0.5, 1.25, 4.0, 0.0, 0.0, 0.0]
    # one ulp past each boundary (below 0.5, above 1.25 and 4) the matching region binds
    past = torch.nextafter(log_w, torch.tensor([[-1.0, 1.0, 1.0] * 3], dtype=torch.float64) * math.inf)
    _, regions = dual_clip_surrogate(adv, past, EDGE_CLIP)
    assert regions.high[0].tolist() == [False, True, True, False, False, False, False, True, True]
    assert regions.low[0].tolist() == [False, False, False, True, False, False, False, False, False]
    assert regions.dual[0].tolist() == [False, False, False, False, False, True, False, False, False]
