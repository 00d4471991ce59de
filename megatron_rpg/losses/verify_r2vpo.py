"""Rows of `python -m megatron_rpg.losses.verify` for R²VPO (r2vpo.py's claims), and the closed forms
they (and tests/losses/test_r2vpo_exact.py) compare with, on a TabularPolicy (vocab 3, length 3):
- χ²(π_θ‖π_b) of the sequence distribution and the per-position χ² sum with prefixes from π_b;
- the token surrogate's objective: Σ_t the return of the policy following π_b except at position t;
- expected losses Σ_x π_b(x)·Σ_t ℓ_t(x) of fresh, stale and mixed batches.
"""
from __future__ import annotations

import torch

from megatron_rpg.losses.exact import TabularPolicy, flat_grad, relative_error
from megatron_rpg.losses.r2vpo import R2VPOConfig, r2vpo_per_token_loss

LAMBDA, DELTA = 0.8, 0.05  # λ of the order of the reward part: both parts of the gradient count


def chi2_sequence(theta: TabularPolicy, behaviour: TabularPolicy) -> torch.Tensor:
    """χ²(π_θ‖π_b) = Σ_x π_θ(x)²/π_b(x) − 1 over the enumerated sequences."""
    return (2 * theta.sequence_logp() - behaviour.sequence_logp().detach()).exp().sum() - 1


def chi2_per_position(theta: TabularPolicy, behaviour: TabularPolicy) -> torch.Tensor:
    """Σ_t E_{x_<t∼π_b}[χ²(π_θ(·|x_<t)‖π_b(·|x_<t))] from the whole next-token distributions."""
    prefix_weight = behaviour.sequence_logp().detach().exp()  # Σ_x π_b(x)·f(x_<t) = E_{x_<t∼π_b}[f]
    chi2 = (2 * theta.next_token_logp() - behaviour.next_token_logp().detach()).exp().sum(-1) - 1  # [N, T]
    return (prefix_weight[:, None] * chi2).sum()


def mixed_returns(theta: TabularPolicy, behaviour: TabularPolicy, advantage: torch.Tensor) -> torch.Tensor:
    """Σ_t E_{x∼π_b^(t)}[A]: π_b^(t) follows π_b at every position but t, where it follows π_θ."""
    ell, ell_b = theta.token_logp(), behaviour.token_logp().detach()
    total = 0.0
    for t in range(theta.length):
        total = total + ((ell_b.sum(dim=1) - ell_b[:, t] + ell[:, t]).exp() * advantage).sum()
    return total


def expected_loss(theta, behaviour_logp, advantage, level, *, staleness=None, stale_clip=None, multiplier=LAMBDA):
    """Σ_x π_b(x)·Σ_t ℓ_t(x) over the rows (each an enumerated sequence drawn by its own π_b), divided
    by the number of row blocks (1 fresh; 2 for a mixed batch of fresh + stale copies)."""
    blocks = behaviour_logp.shape[0] // theta.sequences.shape[0]
    config = R2VPOConfig(level=level, delta=DELTA, stale_clip=stale_clip, reuse_steps=0 if stale_clip is None else 1)
    per_token, _ = r2vpo_per_token_loss(torch.cat([theta.token_logp()] * blocks), behaviour_logp,
                                        torch.cat([advantage] * blocks), multiplier=multiplier, config=config,
                                        staleness=staleness)
    return (behaviour_logp.sum(dim=1).exp() * per_token.sum(dim=1)).sum() / blocks


def mixed_batch(old: TabularPolicy, behaviour: TabularPolicy):
    """(behaviour log-probs, staleness): every sequence once fresh (π_old), once stale (π_b)."""
    n = old.sequences.shape[0]
    logp = torch.cat([old.token_logp(), behaviour.token_logp()]).detach()
    return logp, torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])


def setting():
    old = TabularPolicy(3, 3, seed=0)
    advantage = torch.randn(27, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return old, old.perturbed(0.6, seed=1), old.perturbed(0.6, seed=2), advantage


def r2vpo_rows():
    from megatron_rpg.losses.verify import VerifyRow  # verify.py imports this module at its end

    old, theta, behaviour, advantage = setting()
    old_logp = old.token_logp().detach()
    returns = (theta.sequence_logp().exp() * advantage).sum()
    rows = []
    for level, truth in (("sequence", -returns + LAMBDA * (chi2_sequence(theta, old) - DELTA)),
                         ("token", -mixed_returns(theta, old, advantage)
                          + LAMBDA * (chi2_per_position(theta, old) - theta.length * DELTA))):
        got = flat_grad(expected_loss(theta, old_logp, advantage, level), theta.params)
        claim = "∇(−E_θ[A] + λ(χ²(θ‖old) − δ))" if level == "sequence" else "∇(−Σ_t J_t + λ(Σ_t χ²_t − Tδ))"
        rows.append(VerifyRow(f"r2vpo {level}", f"E_old[∇ℓ] = {claim}, θ ≠ θ_old",
                              relative_error(got, flat_grad(truth, theta.params))))
    logp, staleness = mixed_batch(old, behaviour)
    policy = flat_grad(expected_loss(theta, logp, advantage, "sequence", staleness=staleness, multiplier=0.0),
                       theta.params)
    rows.append(VerifyRow("r2vpo stale sequence", "fresh + stale rows, λ = 0: E[∇ℓ] = −∇E_θ[A]",
                          relative_error(policy, -flat_grad(returns, theta.params))))
    mixture = -returns + LAMBDA * (0.5 * chi2_sequence(theta, old) + 0.5 * chi2_sequence(theta, behaviour) - DELTA)
    whole = flat_grad(expected_loss(theta, logp, advantage, "sequence", staleness=staleness), theta.params)
    rows.append(VerifyRow("r2vpo stale sequence", "E[∇ℓ] = ∇(−E_θ[A] + λ(½χ²(θ‖old) + ½χ²(θ‖b) − δ))",
                          relative_error(whole, flat_grad(mixture, theta.params))))
    return rows
