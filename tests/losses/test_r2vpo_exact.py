"""R²VPO proved by enumeration, float64 (losses/r2vpo.py; docs/algorithms.md, 3a. R²VPO).

A TabularPolicy (vocab 3, length 3: 27 sequences); θ, π_old and an older behaviour policy π_b all
differ. Surrogate side: Σ_x π_b(x)·∇ℓ(x) of the loss function's per-token loss (every row one
enumerated sequence, every position a response token), the exact expectation under the policy that
drew the rows. Truth side: closed forms from the enumerated distributions, differentiated by autograd.

Properties proved:
- sequence level, θ ≠ θ_old: E_old[∇ℓ] = ∇[−E_θ[A] + λ(χ²(π_θ‖π_old) − δ)]; E_old[(w − 1)²] = χ²;
- token level, θ ≠ θ_old: E_old[Σ_t ∇ℓ_t] = ∇ of −Σ_t (return of "π_old except π_θ at t") +
  λ·(Σ_t E_{x_<t∼π_old}[χ²(π_θ(·|x_<t)‖π_old(·|x_<t))] − T·δ), and the variance sum is that χ² sum;
- a batch mixing fresh rows (π_old) and stale rows (π_b, each weighted by π_θ/π_b): the policy term's
  expected gradient is −∇E_θ[A] exactly (unbiased), the whole gradient that of the stated mixture
  Lagrangian; truncated at c, the expected gradient moves by exactly E_b[1{w > c}(f(c) − f(w))∇ℓ];
- λ by projected dual ascent rises by η(Var̂ − δ) while Var̂ > δ, falls otherwise, stops at 0 and is
  never negative; its state round-trips.
"""
import math

import pytest
import torch

from megatron_rpg.losses import (GRPOLoss, LossConfig, LossInputs, R2VPOConfig, R2VPOLoss, build_policy_loss,
                                 dual_ascent, r2vpo_per_token_loss)
from megatron_rpg.losses.exact import flat_grad, relative_error
from megatron_rpg.losses.verify_r2vpo import (DELTA, LAMBDA, chi2_per_position, chi2_sequence, expected_loss,
                                              mixed_batch, mixed_returns, r2vpo_rows)
from megatron_rpg.losses.verify_r2vpo import setting as _setting

TOLERANCE = 1e-12
N, T = 27, 3


@pytest.fixture(scope="module")
def setting():
    return _setting()  # π_old, θ (perturbed 0.6), π_b (another 0.6 perturbation), advantages


def _per_token(theta, behaviour_logp, advantage, level, staleness=None, stale_clip=None, multiplier=LAMBDA):
    reuse = 0 if stale_clip is None else 1
    config = R2VPOConfig(level=level, delta=DELTA, stale_clip=stale_clip, reuse_steps=reuse)
    per_token, _ = r2vpo_per_token_loss(theta.token_logp(), behaviour_logp, advantage, multiplier=multiplier,
                                        config=config, staleness=staleness)
    return per_token


def test_sequence_level_gradient_is_the_lagrangians_at_theta_not_old(setting):
    old, theta, _, advantage = setting
    old_logp = old.token_logp().detach()
    surrogate = flat_grad(expected_loss(theta, old_logp, advantage, "sequence"), theta.params)
    returns = (theta.sequence_logp().exp() * advantage).sum()
    lagrangian = -returns + LAMBDA * (chi2_sequence(theta, old) - DELTA)
    assert (theta.sequence_logp() - old.sequence_logp()).detach().abs().max() > 0.5  # far from θ_old
    assert relative_error(surrogate, flat_grad(lagrangian, theta.params)) <= TOLERANCE


def test_token_level_gradient_is_the_stated_lagrangians_at_theta_not_old(setting):
    old, theta, _, advantage = setting
    old_logp = old.token_logp().detach()
    surrogate = flat_grad(expected_loss(theta, old_logp, advantage, "token"), theta.params)
    lagrangian = -mixed_returns(theta, old, advantage) + LAMBDA * (chi2_per_position(theta, old) - T * DELTA)
    assert relative_error(surrogate, flat_grad(lagrangian, theta.params)) <= TOLERANCE
    # and not the gradient of the sequence-level objective (the token surrogate is first order)
    exact = flat_grad(-(theta.sequence_logp().exp() * advantage).sum(), theta.params)
    policy_only = flat_grad(expected_loss(theta, old_logp, advantage, "token", multiplier=0.0), theta.params)
    assert relative_error(policy_only, exact) > 1e-2


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_the_variance_term_is_the_chi2_divergence(setting, level):
    old, theta, _, _ = setting
    old_logp = old.token_logp().detach()
    _, metrics = r2vpo_per_token_loss(theta.token_logp(), old_logp, torch.zeros(N, dtype=torch.float64),
                                      multiplier=LAMBDA, config=R2VPOConfig(level=level))
    # the batch is every sequence once: Σ_x π_old(x)·(w − 1)² needs the π_old weights, so recompute per unit
    log_w = theta.token_logp().detach() - old_logp
    log_w = log_w.sum(dim=1, keepdim=True) if level == "sequence" else log_w
    weighted = (old_logp.sum(dim=1, keepdim=True).exp() * torch.expm1(log_w).square()).sum()
    truth = (chi2_sequence(theta, old) if level == "sequence" else chi2_per_position(theta, old)).detach()
    assert abs(float(weighted - truth)) <= TOLERANCE * float(truth.detach())
    # the metric is the plain batch mean of the same quantity
    assert float(metrics["r2vpo/ratio_var"]) == pytest.approx(float(torch.expm1(log_w).square().mean()), rel=1e-14)


def _mixture_expectation(theta, old, behaviour, advantage, level, stale_clip=None, multiplier=LAMBDA):
    """½·E_old[Σ_t ℓ_t] + ½·E_b[Σ_t ℓ_t] from one call on the mixed batch (its rows' own weights)."""
    behaviour_logp, staleness = mixed_batch(old, behaviour)
    return expected_loss(theta, behaviour_logp, advantage, level, staleness=staleness, stale_clip=stale_clip,
                         multiplier=multiplier)


def test_reweighted_stale_samples_give_the_current_objectives_gradient(setting):
    old, theta, behaviour, advantage = setting
    returns = (theta.sequence_logp().exp() * advantage).sum()
    # policy term alone (λ = 0): unbiased for −∇E_θ[A] whatever policy drew the stale rows
    policy = flat_grad(_mixture_expectation(theta, old, behaviour, advantage, "sequence", multiplier=0.0),
                       theta.params)
    assert relative_error(policy, flat_grad(-returns, theta.params)) <= TOLERANCE
    # whole loss: the variance term targets each row's own behaviour policy, by its share of the units
    whole = flat_grad(_mixture_expectation(theta, old, behaviour, advantage, "sequence"), theta.params)
    lagrangian = -returns + LAMBDA * (0.5 * chi2_sequence(theta, old) + 0.5 * chi2_sequence(theta, behaviour)
                                      - DELTA)
    assert relative_error(whole, flat_grad(lagrangian, theta.params)) <= TOLERANCE


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_truncated_stale_weights_have_the_stated_bias(setting, level):
    old, theta, behaviour, advantage = setting
    clip = 1.5
    truncated = flat_grad(_mixture_expectation(theta, old, behaviour, advantage, level, stale_clip=clip),
                          theta.params)
    untruncated = flat_grad(_mixture_expectation(theta, old, behaviour, advantage, level), theta.params)
    # closed form: ½·E_b[Σ_units 1{w > c}·(f(c) − f(w))·∇ℓ], f(w) = w·(−A + 2λ(w − 1));
    # the fresh rows are never truncated
    ell, ell_b = theta.token_logp(), behaviour.token_logp().detach()
    if level == "sequence":
        ell, ell_b = ell.sum(dim=1, keepdim=True), ell_b.sum(dim=1, keepdim=True)
    w = (ell.detach() - ell_b).exp()
    adv = advantage[:, None]

    def f(ratio):
        return ratio * (-adv + 2 * LAMBDA * (ratio - 1))

    above = w > clip
    assert 0 < int(above.sum()) < above.numel()  # the truncation binds on some units, not all
    coefficient = torch.where(above, f(torch.full_like(w, clip)) - f(w), torch.zeros_like(w))
    prob_b = ell_b.sum(dim=1, keepdim=True).exp() if level == "token" else ell_b.exp()
    bias = flat_grad(0.5 * (prob_b * coefficient * ell).sum(), theta.params)
    assert relative_error(truncated - untruncated, bias) <= 1e-11
    assert float(bias.norm()) > 1e-2 * float(untruncated.norm())  # a bias that matters


def test_truncation_leaves_this_steps_rollout_untouched(setting):
    old, theta, _, advantage = setting
    old_logp = old.token_logp().detach()
    fresh = torch.zeros(N, dtype=torch.long)
    plain = _per_token(theta, old_logp, advantage, "sequence", staleness=fresh)
    clipped = _per_token(theta, old_logp, advantage, "sequence", staleness=fresh, stale_clip=1.01)
    assert torch.equal(plain, clipped)


def test_one_sequence_loss_is_the_formula(setting):
    old, theta, _, advantage = setting
    i = 4
    logp, old_logp = theta.token_logp()[i:i + 1], old.token_logp().detach()[i:i + 1]
    per_token, _ = r2vpo_per_token_loss(logp, old_logp, advantage[i:i + 1], multiplier=LAMBDA,
                                        config=R2VPOConfig(level="sequence", delta=DELTA))
    w = (logp.detach().sum() - old_logp.sum()).exp()
    expected = -w * advantage[i] + LAMBDA * ((w - 1) ** 2 - DELTA)
    assert abs(float((per_token.sum() - expected).detach())) <= 1e-14 * max(1.0, abs(float(expected.detach())))


def test_dual_ascent_rises_above_delta_falls_below_and_stops_at_zero():
    loss = R2VPOLoss(config=R2VPOConfig(delta=0.05, dual_lr=2.0, lambda_init=0.3))
    variances = [0.2, 0.09, 0.06] + [0.0, 0.02] * 6 + [0.01, 0.05, 0.3]
    trajectory = [loss.multiplier]
    for var in variances:
        reported = loss.after_step({"r2vpo/ratio_var": var})
        assert reported["r2vpo/lambda"] == trajectory[-1]
        trajectory.append(loss.multiplier)
        assert reported["r2vpo/lambda_next"] == loss.multiplier
    for before, after, var in zip(trajectory, trajectory[1:], variances):
        assert after >= 0.0
        assert after == max(0.0, before + 2.0 * (var - 0.05))
        if var > 0.05:
            assert after > before
        elif before > 0:
            assert after <= before
    assert trajectory[1:4] == pytest.approx([0.6, 0.68, 0.7], abs=1e-15)
    assert 0.0 in trajectory and trajectory[-1] > 0  # reached 0, stayed there, rose again above δ
    zero = trajectory.index(0.0)
    assert all(value == 0.0 for value in trajectory[zero:-1])
    with pytest.raises(ValueError, match="ratio variance is nan"):
        dual_ascent(1.0, math.nan, 0.05, 2.0)


def test_lambda_state_round_trips_and_refuses_other_losses_state():
    loss = R2VPOLoss(config=R2VPOConfig(lambda_init=0.25))
    loss.after_step({"r2vpo/ratio_var": 0.123456789})
    resumed = R2VPOLoss(config=R2VPOConfig(lambda_init=0.25))
    resumed.load_state_dict(loss.state_dict())
    assert resumed.multiplier == loss.multiplier != 0.25
    with pytest.raises(ValueError, match="another loss"):
        resumed.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        GRPOLoss().load_state_dict(loss.state_dict())
    with pytest.raises(ValueError, match="needs the step's global"):
        loss.after_step({"ratio_mean": 1.0})


def test_config_and_build_refuse_bad_settings():
    with pytest.raises(ValueError, match="--r2vpo-level"):
        R2VPOConfig(level="batch")
    with pytest.raises(ValueError, match="--r2vpo-delta=-0.1"):
        R2VPOConfig(delta=-0.1)
    with pytest.raises(ValueError, match="--r2vpo-reuse-steps=0 reuses none"):
        R2VPOConfig(stale_clip=2.0)
    with pytest.raises(ValueError, match="--r2vpo-reuse-steps=-1"):
        R2VPOConfig(reuse_steps=-1)
    with pytest.raises(ValueError, match="does not read \\['r2vpo'\\]"):
        build_policy_loss(LossConfig(name="rpg", r2vpo=R2VPOConfig(delta=0.2)))
    loss = build_policy_loss(LossConfig(name="r2vpo", aggregation="seq-mean-token-sum",
                                        r2vpo=R2VPOConfig(level="sequence", lambda_init=0.5)))
    assert isinstance(loss, R2VPOLoss) and loss.multiplier == 0.5 and loss.metric_units == "sequence"
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="staleness has shape"):
        loss(LossInputs(logp, logp, torch.zeros(2), staleness=torch.zeros(3)))
    with pytest.raises(ValueError, match="advantages varies"):
        loss(LossInputs(logp, logp, torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]])))


def test_the_verify_report_rows_hold():
    rows = r2vpo_rows()
    assert len(rows) == 4 and all(row.relative_error <= TOLERANCE for row in rows), rows
