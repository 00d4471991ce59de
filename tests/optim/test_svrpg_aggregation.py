"""SVRPG is unbiased only when each pass's normaliser is a constant: exact enumeration, float64.

A tabular autoregressive policy (vocabulary 3, length 3) whose token 0 ends the response (EOS):
15 outcomes of 1, 2 or 3 response tokens. Every pass is the trainer's RPG loss (URKL, on-policy,
no clip) in megatron's (loss_sum, count) form, normalised per batch. Batches of B = 2 sequences are
enumerated exactly (all 15² ordered pairs, probability p(τ1)·p(τ2)), so the expectations below
include each batch's own normaliser:

    E[plain] = Σ_b P_θt(b)·∇[loss_b(θ_t)]
    E[v]     = E[plain] − Σ_b P_θt(b)·∇[ρ̄-weighted loss_b(θ̃)] + Σ_b' P_θ̃(b')·∇[loss_b'(θ̃)]

seq-mean-token-sum / seq-mean-token-mean: count = sequences with ≥ 1 response token = B for every
batch (each outcome has n ≥ 1), so every pass is a mean of per-sample terms f(τ) and
E_θt[ρ·f(τ; θ̃)] = E_θ̃[f(τ; θ̃)] = μ: E[v] = E[plain] exactly; with seq-mean-token-sum and
is_level="sequence" E[plain] is also the closed-form −∇J(θ_t), J = E[R] − β·KL(π_θ‖π_ref).
token-mean: count = Σ n_i varies with the batch, the snapshot pass keeps the inner batch's
count, and E[v] ≠ E[plain] (41 %, printed by the test): SnapshotLoss and rl_grad_fn refuse it.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from megatron_rpg.losses.aggregation import aggregate_sum
from megatron_rpg.losses.exact import TabularPolicy, flat_grad, relative_error
from megatron_rpg.losses.policy_loss import GRPOLoss, LossInputs, RPGLoss
from megatron_rpg.losses.svrpg import SVRPG_AGGREGATIONS, SnapshotLoss, snapshot_ratio, weight_token_loss
from megatron_rpg.optim.svrpg_passes import SVRPGPass

VOCAB, LENGTH, EOS, BETA, BATCH = 3, 3, 0, 0.3, 2


def _outcomes(policy):
    """Rows of policy.sequences that are distinct variable-length outcomes, and their response mask:
    tokens up to and including the first EOS (all tokens when there is none), only EOS after it."""
    seqs = policy.sequences
    is_eos = seqs == EOS
    before_first_eos = torch.cumsum(is_eos.long(), dim=1) - is_eos.long() == 0
    mask = before_first_eos  # positions up to and including the first EOS
    canonical = (~mask & ~is_eos).sum(dim=1) == 0  # only EOS after the end
    return canonical, mask[canonical]


class _Setup:
    def __init__(self):
        self.current = TabularPolicy(VOCAB, LENGTH, seed=0, scale=1.0)
        self.snapshot = self.current.perturbed(scale=0.6, seed=4)  # E_θt[n] = 1.26, E_θ̃[n] = 1.78
        self.reference = TabularPolicy(VOCAB, LENGTH, seed=2, scale=0.5)
        self.rows, self.mask = _outcomes(self.current)
        g = torch.Generator().manual_seed(3)
        self.reward = torch.randn(int(self.rows.sum()), generator=g, dtype=torch.float64)

    def token_logp(self, policy):
        logp = policy.token_logp()[self.rows]
        return torch.where(self.mask, logp, torch.zeros_like(logp))

    def prob(self, policy):
        return self.token_logp(policy).sum(-1).exp().detach()


def _rpg(aggregation, is_level):
    return RPGLoss(divergence="urkl", style="differentiable", beta=BETA, is_level=is_level, clip=None,
                   aggregation=aggregation)


def _plain_loss(token_logp, ref_logp, advantages, mask, loss):
    """On-policy loss of one batch: loss_sum / count (old log-probs := detached log-probs)."""
    loss_sum, count, _ = loss(LossInputs(token_logp, token_logp.detach(), advantages, mask, ref_logp=ref_logp))
    return loss_sum / count


def _snapshot_loss(snapshot_logp, current_logp, ref_logp, advantages, mask, loss):
    """The trainer's snapshot pass: SnapshotLoss on a batch drawn from θ_t (old log-probs θ_t's)."""
    snapshot = SnapshotLoss(loss, SVRPGPass("snapshot"))
    loss_sum, count, _ = snapshot(LossInputs(snapshot_logp, current_logp, advantages, mask, ref_logp=ref_logp))
    return loss_sum / count


def _today_snapshot_loss(snapshot_logp, current_logp, ref_logp, advantages, mask, loss):
    """The same math without SnapshotLoss's refusal (what the code did before it): for token-mean."""
    rho, _ = snapshot_ratio(snapshot_logp, current_logp, mask)
    per_token, _ = loss.per_token_loss(LossInputs(snapshot_logp, snapshot_logp.detach(), advantages, mask,
                                                  ref_logp=ref_logp))
    loss_sum, count = aggregate_sum(weight_token_loss(per_token, rho), mask, loss.aggregation)
    return loss_sum / count


def _expectations(setup, aggregation, is_level, snapshot_loss=_snapshot_loss):
    """(E[plain], E[v]) over all batches of BATCH sequences, exactly."""
    loss = _rpg(aggregation, is_level)
    cur, snap = setup.token_logp(setup.current), setup.token_logp(setup.snapshot)
    ref = setup.token_logp(setup.reference).detach()
    p_cur, p_snap = setup.prob(setup.current), setup.prob(setup.snapshot)
    assert float(p_cur.sum()) == pytest.approx(1.0, abs=1e-12)  # the outcomes are the sample space
    plain = snapshot = anchor = 0.0
    for batch in itertools.product(range(len(p_cur)), repeat=BATCH):
        b = list(batch)
        args = (ref[b], setup.reward[b], setup.mask[b], loss)
        plain = plain + p_cur[b].prod() * _plain_loss(cur[b], *args)
        snapshot = snapshot + p_cur[b].prod() * snapshot_loss(snap[b], cur[b].detach(), *args)
        anchor = anchor + p_snap[b].prod() * _plain_loss(snap[b], *args)
    plain_grad = flat_grad(plain, setup.current.params)
    v = plain_grad - flat_grad(snapshot, setup.snapshot.params) + flat_grad(anchor, setup.snapshot.params)
    return plain_grad, v


def _minus_grad_j(setup):
    logp = setup.token_logp(setup.current).sum(-1)
    prob = logp.exp()
    kl = (prob * (logp - setup.token_logp(setup.reference).sum(-1).detach())).sum()
    return -flat_grad((prob * setup.reward).sum() - BETA * kl, setup.current.params)


@pytest.mark.parametrize("is_level", ["sequence", "token"])
@pytest.mark.parametrize("aggregation", ["seq-mean-token-sum", "seq-mean-token-mean"])
def test_svrpg_is_unbiased_under_the_seq_mean_aggregations(aggregation, is_level):
    setup = _Setup()
    plain, v = _expectations(setup, aggregation, is_level)
    error = relative_error(v, plain)
    print(f"{aggregation}, is_level={is_level}: |E[v] − E[plain]| / |E[plain]| = {error:.2e}")
    assert error <= 1e-12
    if aggregation == "seq-mean-token-sum" and is_level == "sequence":
        assert relative_error(plain, _minus_grad_j(setup)) <= 1e-12


def test_svrpg_under_token_mean_is_biased_since_its_count_depends_on_the_batch():
    """The negative case behind refusing token-mean: the snapshot pass divides by θ_t's token count."""
    setup = _Setup()
    plain, v = _expectations(setup, "token-mean", "sequence", snapshot_loss=_today_snapshot_loss)
    bias = relative_error(v, plain)
    print(f"token-mean: |E[v] − E[plain]| / |E[plain]| = {bias:.3f}; first coordinates "
          f"E[plain] {plain[:3].tolist()}, E[v] {v[:3].tolist()}")
    assert bias > 0.1


def test_the_accepted_aggregations_are_the_proved_ones_and_token_mean_is_refused_by_name():
    assert set(SVRPG_AGGREGATIONS) == {"seq-mean-token-sum", "seq-mean-token-mean"}
    with pytest.raises(ValueError, match="aggregation 'token-mean' is biased.*Use aggregation 'seq-mean-token-sum'"):
        SnapshotLoss(_rpg("token-mean", "token"), SVRPGPass("snapshot"))
    with pytest.raises(ValueError, match="defined for the RPG losses; got loss 'grpo_is_kl'"):
        SnapshotLoss(GRPOLoss(importance_weighted_kl=True), SVRPGPass("snapshot"))
