"""Rows of `python -m megatron_rpg.losses.verify` for the baseline losses and advantage estimators.

Each row compares an exact expectation over every enumerated sample (float64) with the gradient it
claims to equal (claims and the level at which each holds: baselines.py and advantages.py docstrings):
- grpo's KL term, on-policy, sequence level and one-token responses: β·∇KL(π_ref‖π_θ), the FORWARD
  KL (the mismatch: GRPO means the reverse one; tests/losses/test_baselines.py shows they differ);
  token level: the per-position forward KL with prefixes held at π_old.
- grpo_is_kl's KL term at θ ≠ θ_old: β·∇KL(π_θ‖π_ref) (sequence level, one token); per-position
  reverse KL (token level). The whole grpo_is_kl loss with a sequence KL, on-policy: −∇(E[R] − β·KL).
- RLOO is unbiased for a group of n; the group mean (RPG, Dr.GRPO) scales ∇E[R] by (n − 1)/n.
"""
from __future__ import annotations

import itertools

import torch

from megatron_rpg.losses.advantages import compute_advantages
from megatron_rpg.losses.baselines import grpo, grpo_is_kl
from megatron_rpg.losses.clip import RPGClip
from megatron_rpg.losses.exact import TabularPolicy, flat_grad, relative_error

BETA = 0.7
NEVER_BINDS = RPGClip(eps_low=1 - 1e-12, eps_high=1e12, dual_clip=None)


def _expected_loss(loss_fn, theta, old, ref, advantages, kl_level, clip=NEVER_BINDS):
    """Σ_x π_old(x)·L(x), each x a batch of one response with seq-mean-token-sum (its whole loss)."""
    logp, old_logp, ref_logp = theta.token_logp(), old.token_logp().detach(), ref.token_logp().detach()
    old_prob = old.sequence_logp().detach().exp()
    return sum(old_prob[i] * loss_fn(logp[i:i + 1], old_logp[i:i + 1], ref_logp[i:i + 1], advantages[i:i + 1],
                                     beta=BETA, clip=clip, kl_level=kl_level,
                                     aggregation="seq-mean-token-sum")[0] for i in range(len(old_prob)))


def _policies(vocab, length):
    old = TabularPolicy(vocab, length, seed=11, scale=0.8)
    return old, old.perturbed(0.5, seed=12), old.perturbed(0.9, seed=13)


def grpo_kl_rows():
    # imported here: verify.py imports this module at its end (and twice under `python -m`)
    from megatron_rpg.losses.verify import VerifyRow, divergence

    rows = []
    for label, vocab, length, kl_level in (("one token", 5, 1, "token"), ("sequence ", 3, 3, "sequence")):
        old, theta, ref = _policies(vocab, length)
        zero = torch.zeros(vocab ** length, dtype=torch.float64)
        for name, loss_fn, policy, target, where in (
                ("grpo      ", grpo, old, "fkl", "θ = θ_old"), ("grpo_is_kl", grpo_is_kl, theta, "rkl", "θ ≠ θ_old")):
            got = flat_grad(_expected_loss(loss_fn, policy, old, ref, zero, kl_level), policy.params)
            truth = BETA * flat_grad(divergence(target, policy.sequence_logp(), ref.sequence_logp().detach(), 0),
                                     policy.params)
            kl = "KL(π_ref‖π_θ)" if target == "fkl" else "KL(π_θ‖π_ref)"
            rows.append(VerifyRow(f"{name} KL {label}", f"E_old[∇β·k3 term] = β∇{kl}, {where}",
                                  relative_error(got, truth)))
    old, theta, ref = _policies(3, 3)
    zero = torch.zeros(27, dtype=torch.float64)
    prefix_weight = old.sequence_logp().detach().exp()[:, None]
    for name, loss_fn, policy, target, where in (
            ("grpo      ", grpo, old, "fkl", "θ = θ_old"), ("grpo_is_kl", grpo_is_kl, theta, "rkl", "θ ≠ θ_old")):
        got = flat_grad(_expected_loss(loss_fn, policy, old, ref, zero, "token"), policy.params)
        per_position = divergence(target, policy.next_token_logp(), ref.next_token_logp().detach())
        truth = BETA * flat_grad((prefix_weight * per_position).sum(), policy.params)
        rows.append(VerifyRow(f"{name} KL token    ", f"= β∇Σ_t E_{{x<t∼old}}[{target} at x<t], {where}",
                              relative_error(got, truth)))
    reward = torch.linspace(-1.0, 2.0, 27, dtype=torch.float64)
    got = flat_grad(_expected_loss(grpo_is_kl, old, old, ref, reward, "sequence"), old.params)
    log_p = old.sequence_logp()
    objective = (log_p.exp() * reward).sum() - BETA * divergence("rkl", log_p, ref.sequence_logp().detach(), 0)
    rows.append(VerifyRow("grpo_is_kl loss sequence", "E_old[∇L] = −∇(E[R] − β·KL(π_θ‖π_ref)), θ = θ_old",
                          relative_error(got, -flat_grad(objective, old.params))))
    return rows


def group_baseline_rows():
    from megatron_rpg.losses.verify import VerifyRow

    policy = TabularPolicy(4, 1, seed=5)
    outcome_reward = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=torch.float64)
    logp = policy.sequence_logp()
    true_gradient = flat_grad((logp.exp() * outcome_reward).sum(), policy.params)
    rows = []
    for n in (2, 3):
        draws = torch.tensor(list(itertools.product(range(4), repeat=n)))  # every group of n i.i.d. draws
        draw_prob = logp.detach()[draws].sum(dim=1).exp()
        for estimator, scale in (("rloo", 1.0), ("rpg", (n - 1) / n)):
            advantages = compute_advantages(estimator, outcome_reward[draws].flatten(), group_size=n)
            surrogate = (draw_prob[:, None] * advantages.view_as(draws) * logp[draws]).sum() / n
            rows.append(VerifyRow(f"advantage {estimator:4s} group of {n}",
                                  f"E[(1/n)ΣA_i∇ℓ_i] = {'' if scale == 1 else f'({n - 1}/{n})·'}∇E[R]",
                                  relative_error(flat_grad(surrogate, policy.params), scale * true_gradient)))
    return rows
