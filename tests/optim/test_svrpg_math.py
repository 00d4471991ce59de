"""SVRPG's estimator is unbiased with ρ = π_θ̃/π_θt, by exact enumeration in float64
(docs/algorithms.md: 2. SVRPG; How a loss is proved).

A tabular autoregressive policy (vocabulary 3, length 3: 27 sequences) with a reward table and a
fixed reference π_ref. Objective J(θ) = E_{π_θ}[R] − β·KL(π_θ‖π_ref). The per-sample surrogate is
the REINFORCE-style RKL loss L(τ; θ) = −sg(ψ)·log π_θ(τ), ψ = R − β·(log π_θ(τ)/π_ref(τ) + 1), whose
on-policy expectation is −∇J(θ). The exact expectation of the SVRPG direction over τ ∼ π_θt is

    E[v] = Σ_τ π_θt(τ)·[∇L(τ; θ_t) − ρ(τ)·∇L(τ; θ̃)] + Σ_τ π_θ̃(τ)·∇L(τ; θ̃)

(μ is the anchor gradient in the large-batch limit), and must equal −∇J(θ_t) with θ_t ≠ θ̃.
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_rpg.losses.exact import TabularPolicy, flat_grad, relative_error
from megatron_rpg.losses.svrpg import (NO_CLIP, RatioClip, combine_control_variate,
                                       snapshot_ratio, weight_token_loss)
from tests.float_bounds import assert_float32_equal, float32_bound

BETA = 0.3
VOCAB, LENGTH = 3, 3


def _setup():
    current = TabularPolicy(VOCAB, LENGTH, seed=0, scale=1.0)
    snapshot = current.perturbed(scale=0.4, seed=1)  # θ̃ lags θ_t by a visible step
    reference = TabularPolicy(VOCAB, LENGTH, seed=2, scale=0.5)
    g = torch.Generator().manual_seed(3)
    reward = torch.randn(current.sequences.shape[0], generator=g, dtype=torch.float64)
    return current, snapshot, reference, reward


def _sample_token_loss(policy, reference, reward):
    """[N, T] per-token loss whose token sum is L(τ; θ) = −sg(ψ)·log π_θ(τ)."""
    token_logp = policy.token_logp()
    seq_logp = token_logp.sum(-1)
    ref_seq_logp = reference.sequence_logp().detach()
    psi = reward - BETA * (seq_logp.detach() - ref_seq_logp + 1.0)
    return -psi.unsqueeze(-1) * token_logp


def _exact_objective_grad(policy, reference, reward):
    seq_logp = policy.sequence_logp()
    prob = seq_logp.exp()
    kl = (prob * (seq_logp - reference.sequence_logp().detach())).sum()
    return flat_grad((prob * reward).sum() - BETA * kl, policy.params)


def _expected_direction(current, snapshot, reference, reward, clip, note_direction=False):
    cur_token_logp = current.token_logp()
    snap_token_logp = snapshot.token_logp()
    p_cur = cur_token_logp.sum(-1).exp().detach()
    p_snap = snap_token_logp.sum(-1).exp().detach()
    if note_direction:  # the SVRPG note's ratio π_θt/π_θ̃: a documented negative case
        rho, _ = snapshot_ratio(cur_token_logp, snap_token_logp, clip=clip)
    else:
        rho, stats = snapshot_ratio(snap_token_logp, cur_token_logp, clip=clip)
    cur_loss = _sample_token_loss(current, reference, reward).sum(-1)
    snap_token_loss = _sample_token_loss(snapshot, reference, reward)
    weighted_snap_loss = weight_token_loss(snap_token_loss, rho).sum(-1)
    current_grad = flat_grad((p_cur * cur_loss).sum(), current.params)
    weighted_snapshot_grad = flat_grad((p_cur * weighted_snap_loss).sum(), snapshot.params)
    anchor_mean = flat_grad((p_snap * snap_token_loss.sum(-1)).sum(), snapshot.params)
    return combine_control_variate(current_grad, weighted_snapshot_grad, anchor_mean)


def test_svrpg_direction_is_unbiased_for_the_objective_gradient_with_snapshot_over_current_ratio():
    current, snapshot, reference, reward = _setup()
    expected_v = _expected_direction(current, snapshot, reference, reward, NO_CLIP)
    minus_grad_j = -_exact_objective_grad(current, reference, reward)
    log_rho = (snapshot.sequence_logp() - current.sequence_logp()).detach()
    assert log_rho.abs().max() > 0.5  # θ_t ≠ θ̃: ratios far from 1
    assert relative_error(expected_v, minus_grad_j) <= 1e-9


def test_note_ratio_direction_current_over_snapshot_is_biased():
    current, snapshot, reference, reward = _setup()
    expected_v = _expected_direction(current, snapshot, reference, reward, NO_CLIP,
                                     note_direction=True)
    minus_grad_j = -_exact_objective_grad(current, reference, reward)
    assert relative_error(expected_v, minus_grad_j) > 0.05


@pytest.mark.parametrize("clip", [RatioClip(0.8, 1.25), RatioClip(0.5, 2.0, cap=1.5)])
def test_dual_clip_truncation_bias_is_nonzero_and_bounded_by_the_unclipped_control_variate(clip):
    """Clipping trades bias for variance: E[v] moves off −∇J, by less than the whole control variate."""
    current, snapshot, reference, reward = _setup()
    _, stats = snapshot_ratio(snapshot.token_logp(), current.token_logp(), clip=clip)
    assert 0.0 < stats["rho_clip_fraction"] < 1.0
    minus_grad_j = -_exact_objective_grad(current, reference, reward)
    bias = relative_error(_expected_direction(current, snapshot, reference, reward, clip),
                          minus_grad_j)
    print(f"SVRPG Dual-Clip bias {clip}: relative error of E[v] vs ∇J = {bias:.3e}, "
          f"clip fraction {stats['rho_clip_fraction']:.3f}")
    assert 1e-6 < bias < 1.0


def test_snapshot_equal_to_current_policy_gives_unit_ratio_and_no_clipping():
    """θ̃ = θ_t: ρ ≡ 1 exactly, so the per-sample terms g(θ_t) − ρ·g(θ̃) cancel (v = μ)."""
    current, _, reference, reward = _setup()
    rho, stats = snapshot_ratio(current.token_logp(), current.token_logp(), clip=RatioClip(0.8, 1.2))
    assert torch.equal(rho, torch.ones_like(rho)) and stats["rho_clip_fraction"] == 0.0


def test_ratio_is_a_sequence_level_product_computed_in_log_space():
    lp_a = torch.full((2, 4000), -1.0, dtype=torch.float32)
    lp_b = torch.full((2, 4000), -1.0 - 1e-4, dtype=torch.float32)
    mask = torch.ones_like(lp_a)
    mask[1, 2000:] = 0
    rho, _ = snapshot_ratio(lp_a, lp_b, mask)
    # the same sum-then-exp on the float32 inputs, in float32 and in float64 (tests/float_bounds.py);
    # the inputs' own rounding puts exp(0.4) 6.6e-5 relative away, so that is checked at 1e-4
    want, want64 = (((a - b) * mask).sum(-1).exp() for a, b in ((lp_a, lp_b), (lp_a.double(), lp_b.double())))
    assert_float32_equal(rho, want, float32_bound(want, want64), "rho")
    assert torch.allclose(rho, torch.tensor([0.4, 0.2]).exp(), rtol=1e-4)  # a product in log space


def test_bad_inputs_raise_value_errors_naming_the_value():
    with pytest.raises(ValueError, match="low"):
        RatioClip(2.0, 1.0)
    with pytest.raises(ValueError, match="cap"):
        RatioClip(0.5, 2.0, cap=-1.0)
    with pytest.raises(ValueError, match="shape"):
        snapshot_ratio(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="rho"):
        weight_token_loss(torch.zeros(2, 3), torch.ones(3))


def _rpg_sample_token_loss(policy, reference, reward, divergence, style):
    """[N, T] per-token RPG loss at θ with old log-probs := sg(log π_θ): the on-policy g(τ; θ)."""
    from megatron_rpg.losses.rpg import rpg_per_token_loss

    token_logp = policy.token_logp()
    per_token, _ = rpg_per_token_loss(
        token_logp, token_logp.detach(), reward, divergence=divergence, style=style, beta=BETA,
        ref_logp=reference.token_logp().detach(), is_level="sequence",
        aggregation="seq-mean-token-sum")
    return per_token


@pytest.mark.parametrize("style", ["differentiable", "reinforce"])
@pytest.mark.parametrize("divergence", ["fkl", "ufkl", "rkl", "urkl"])
def test_svrpg_with_every_rpg_loss_has_the_plain_on_policy_expectation(divergence, style):
    """E_{τ∼π_θt}[g(θ_t) − ρ·g(θ̃)] + E_{τ∼π_θ̃}[g(θ̃)] = E_{τ∼π_θt}[g(θ_t)] for the real RPG losses."""
    current, snapshot, reference, reward = _setup()
    cur_token_logp, snap_token_logp = current.token_logp(), snapshot.token_logp()
    p_cur = cur_token_logp.sum(-1).exp().detach()
    p_snap = snap_token_logp.sum(-1).exp().detach()
    rho, _ = snapshot_ratio(snap_token_logp, cur_token_logp)
    cur_loss = _rpg_sample_token_loss(current, reference, reward, divergence, style).sum(-1)
    snap_token_loss = _rpg_sample_token_loss(snapshot, reference, reward, divergence, style)
    plain = flat_grad((p_cur * cur_loss).sum(), current.params)
    weighted = flat_grad((p_cur * weight_token_loss(snap_token_loss, rho).sum(-1)).sum(),
                         snapshot.params)
    anchor_mean = flat_grad((p_snap * snap_token_loss.sum(-1)).sum(), snapshot.params)
    expected_v = combine_control_variate(plain, weighted, anchor_mean)
    assert relative_error(anchor_mean, plain) > 0.05  # the control variate is not trivially zero
    assert relative_error(expected_v, plain) <= 1e-9


@pytest.mark.parametrize("bad", [float("-inf"), float("inf"), float("nan")])
def test_masked_positions_holding_inf_or_nan_never_enter_the_ratio(bad):
    """Padding may hold −inf log-probs (or NaN): a mask·diff product would turn them into NaN."""
    snapshot = torch.tensor([[0.0, -1.0, -2.0, -0.5], [0.0, -0.3, -0.2, -0.1]])
    current = torch.tensor([[0.0, -1.5, -1.0, -0.5], [0.0, -0.1, -0.4, -0.2]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]], dtype=torch.float32)
    expected, _ = snapshot_ratio(snapshot, current, mask)
    padded_snapshot, padded_current = snapshot.clone(), current.clone()
    padded_snapshot[mask == 0] = bad
    padded_current[0, 3] = bad
    rho, stats = snapshot_ratio(padded_snapshot, padded_current, mask, RatioClip(0.5, 2.0))
    assert torch.isfinite(rho).all() and all(map(lambda v: v == v, stats.values()))
    assert torch.equal(snapshot_ratio(padded_snapshot, padded_current, mask)[0], expected)
    assert torch.allclose(expected, torch.tensor([0.5 - 1.0, -0.2]).exp())


def test_inf_at_an_unmasked_position_is_an_error_naming_the_log_probs():
    snapshot = torch.tensor([[0.0, float("-inf"), -1.0]])
    with pytest.raises(ValueError, match="log-prob difference"):
        snapshot_ratio(snapshot, torch.zeros(1, 3), torch.tensor([[0.0, 1.0, 1.0]]))


def _ratio_batch_with_a_padding_row():
    """Rows 0, 2 hold response tokens with log ρ = 0.4 and 1.0; row 1 has none (padding)."""
    snapshot = torch.tensor([[0.0, -0.6, -1.0], [0.0, -5.0, -5.0], [0.0, -0.5, -0.5]])
    current = torch.tensor([[0.0, -1.0, -1.0], [0.0, -1.0, -1.0], [0.0, -1.0, -1.0]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 0], [0, 1, 1]], dtype=torch.float32)
    return snapshot, current, mask


REAL_ROW_STATS = {"rho_mean": (math.exp(0.4) + math.exp(1.0)) / 2, "log_rho_min": 0.4,
                  "log_rho_max": 1.0, "rho_clip_fraction": 1.0}  # both above log 1.2


def test_ratio_statistics_leave_out_rows_without_response_tokens():
    snapshot, current, mask = _ratio_batch_with_a_padding_row()
    rho, stats = snapshot_ratio(snapshot, current, mask, RatioClip(0.8, 1.2))
    assert rho[1] == 1.0  # the padding row's ρ = 1 is no sample: counting it pulls the stats to 1
    assert stats["num_sequences"] == 2
    for key, value in REAL_ROW_STATS.items():
        assert stats[key] == pytest.approx(value, rel=1e-6), key


def test_svrpg_pass_ratio_metrics_count_sequences_with_response_tokens_only():
    from megatron_rpg.optim.svrpg_passes import SVRPGPass, ratio_metrics

    snapshot, current, mask = _ratio_batch_with_a_padding_row()
    svrpg_pass = SVRPGPass("snapshot", RatioClip(0.8, 1.2))
    svrpg_pass.ratio(snapshot, current, mask)
    svrpg_pass.ratio(snapshot[1:2], current[1:2], mask[1:2])  # a micro-batch of padding only
    metrics = ratio_metrics(svrpg_pass.ratio_stats, torch.device("cpu"))
    assert set(metrics) == {f"svrpg/{key}" for key in REAL_ROW_STATS}
    for key, value in REAL_ROW_STATS.items():
        assert metrics[f"svrpg/{key}"] == pytest.approx(value, rel=1e-6), key
