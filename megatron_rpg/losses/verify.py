"""`python -m megatron_rpg.losses.verify`: the exactness claims of the losses, checked by enumeration.

Every row compares a loss's exact expected gradient, Σ_x π_old(x)·∇L(x) over all 27 sequences of a
TabularPolicy (vocab 3, length 3, float64), with the gradient of the objective it claims to follow,
computed in closed form by autograd, and prints ‖a − b‖/‖b‖. Exit status 1 if any row exceeds 1e-9.

Adding checks (other loss modules): write a function `() -> list[VerifyRow]` in your own module and
register it in the block marked "registered checks" at the end of this file with one import and one
`CHECKS.append(...)` line. `main()` runs every function in CHECKS, in order.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_rpg.losses.aggregation import aggregate, aggregate_sum
from megatron_rpg.losses.clip import RPGClip
from megatron_rpg.losses.exact import TabularPolicy, flat_grad, relative_error
from megatron_rpg.losses.rpg import DIVERGENCES, STYLES, rpg_loss, rpg_per_token_loss

TOLERANCE = 1e-9
BETA = 0.7


@dataclass(frozen=True)
class VerifyRow:
    name: str             # which variant
    claim: str            # what equality the row checks
    relative_error: float


def divergence(name: str, log_p: torch.Tensor, log_q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Closed-form D(p, q) over `dim` (q = π_ref): KL(q‖p), +Σ(p−q), KL(p‖q), +Σ(q−p)."""
    p, q = log_p.exp(), log_q.exp()
    forward, reverse = (q * (log_q - log_p)).sum(dim), (p * (log_p - log_q)).sum(dim)
    mass = (p - q).sum(dim)
    return {"fkl": forward, "ufkl": forward + mass, "rkl": reverse, "urkl": reverse - mass}[name]


def _setting():
    old = TabularPolicy(3, 3, seed=0)
    reward = torch.randn(27, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return old, old.perturbed(0.6, seed=1), old.perturbed(0.6, seed=2), reward


def rpg_sequence_level_rows() -> list[VerifyRow]:
    """Sequence level, θ ≠ θ_old, batch of one sequence: E_old[∇L] = −∇J(θ)."""
    old, theta, separate, reward = _setting()
    old_logp, old_prob = old.token_logp().detach(), old.sequence_logp().detach().exp()
    rows = []
    for reference, ref in (("ref=old", old), ("ref=fixed", separate)):
        ref_logp = None if ref is old else ref.token_logp().detach()
        for style in STYLES:
            for name in DIVERGENCES:
                logp = theta.token_logp()
                surrogate = sum(old_prob[i] * rpg_loss(
                    logp[i:i + 1], old_logp[i:i + 1], reward[i:i + 1], divergence=name, style=style, beta=BETA,
                    ref_logp=None if ref_logp is None else ref_logp[i:i + 1], is_level="sequence",
                    aggregation="seq-mean-token-sum")[0] for i in range(27))
                log_p = theta.sequence_logp()
                objective = (log_p.exp() * reward).sum() - BETA * divergence(name, log_p, ref.sequence_logp().detach(), 0)
                rows.append(VerifyRow(f"sequence {style:14s} {name:4s} {reference}", "E_old[∇L] = −∇J, θ ≠ θ_old",
                                      relative_error(flat_grad(surrogate, theta.params),
                                                     -flat_grad(objective, theta.params))))
    return rows


def _token_objective(theta, old, ref, reward, name):
    """J_tok(θ) = E_θ[R] − β·Σ_t E_{x_<t∼π_old}[D(π_θ(·|x_<t), π_ref(·|x_<t))]."""
    prefix_weight = old.sequence_logp().detach().exp()[:, None]
    per_position = divergence(name, theta.next_token_logp(), ref.next_token_logp().detach())
    return (theta.sequence_logp().exp() * reward).sum() - BETA * (prefix_weight * per_position).sum()


def rpg_token_level_rows() -> list[VerifyRow]:
    """Token level: exact for J_tok at θ = θ_old; its β part exact at any θ."""
    old, theta, separate, reward = _setting()
    old_prob = old.sequence_logp().detach().exp()
    rows = []
    cases = [("θ = θ_old", old, reward, "ref=old", old), ("θ = θ_old", old, reward, "ref=fixed", separate),
             ("β part, θ ≠ θ_old", theta, torch.zeros_like(reward), "ref=fixed", separate)]
    for where, policy, r, reference, ref in cases:
        for style in STYLES:
            for name in DIVERGENCES:
                per_token, _ = rpg_per_token_loss(policy.token_logp(), old.token_logp().detach(), r,
                                                  divergence=name, style=style, beta=BETA,
                                                  ref_logp=None if ref is old else ref.token_logp().detach())
                surrogate = (old_prob * per_token.sum(dim=1)).sum()
                objective = _token_objective(policy, old, ref, r, name)
                rows.append(VerifyRow(f"token    {style:14s} {name:4s} {reference}", f"E_old[∇ΣL_t] = −∇J_tok, {where}",
                                      relative_error(flat_grad(surrogate, policy.params),
                                                     -flat_grad(objective, policy.params))))
    return rows


def on_policy_rows() -> list[VerifyRow]:
    """π_ref = π_old, θ = θ_old, R = 0: per sample ∇L = β·K·∇ℓ with K = −1, 0, 1, 0 (fkl, ufkl, rkl, urkl)."""
    old = TabularPolicy(3, 3, seed=0)
    rows = []
    for level in ("token", "sequence"):
        for style in STYLES:
            for name in DIVERGENCES:
                k = {"fkl": -1.0, "ufkl": 0.0, "rkl": 1.0, "urkl": 0.0}[name]
                worst = 0.0
                for i in range(27):
                    logp = old.token_logp()[i:i + 1]
                    loss, _ = rpg_loss(logp, logp.detach(), torch.zeros(1, dtype=torch.float64), divergence=name,
                                       style=style, beta=BETA, is_level=level, aggregation="seq-mean-token-sum")
                    score = flat_grad(logp.sum(), old.params)
                    # vanishing rows: ‖∇L‖ relative to β‖∇ℓ‖ (the scale a non-vanishing term would have)
                    error = (relative_error(flat_grad(loss, old.params), BETA * k * score) if k else
                             float(flat_grad(loss, old.params).norm() / (BETA * score.norm())))
                    worst = max(worst, error)
                claim = "per-sample ∇L = 0" if k == 0 else f"per-sample ∇L = {'−' if k < 0 else '+'}β∇ℓ ≠ 0"
                rows.append(VerifyRow(f"{level:8s} {style:14s} {name:4s} on-policy", claim, worst))
    return rows


def clip_and_aggregation_rows() -> list[VerifyRow]:
    """A clip that never binds leaves the gradient unchanged; global-count splits are exact."""
    old, theta, separate, reward = _setting()
    wide = RPGClip(eps_low=1 - 1e-12, eps_high=1e12, dual_clip=1e12)
    rows = []
    for style in STYLES:
        worst = 0.0
        for name in DIVERGENCES:
            for level in ("token", "sequence"):
                grads = [flat_grad(rpg_loss(theta.token_logp(), old.token_logp().detach(), reward, divergence=name,
                                            style=style, beta=BETA, ref_logp=separate.token_logp().detach(),
                                            is_level=level, clip=clip)[0], theta.params) for clip in (None, wide)]
                worst = max(worst, relative_error(grads[1], grads[0]))
        rows.append(VerifyRow(f"clip     {style:14s} all  wide clip", "∇L(wide clip) = ∇L(no clip)", worst))
    per_token = torch.randn(27, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mask = torch.rand(27, 3, generator=torch.Generator().manual_seed(6)) < 0.7
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        parts = [slice(0, 10), slice(10, 11), slice(11, 27)]
        count = sum(int(aggregate_sum(per_token[p], mask[p], mode)[1]) for p in parts)
        key = "num_global_tokens" if mode == "token-mean" else "num_global_sequences"
        split = sum(aggregate(per_token[p], mask[p], mode, **{key: count}) for p in parts)
        whole = aggregate(per_token, mask, mode)
        rows.append(VerifyRow(f"aggregate {mode}", "Σ micro-batches (global count) = whole batch",
                              relative_error(split.reshape(1), whole.reshape(1))))
    return rows


CHECKS: list[Callable[[], list[VerifyRow]]] = [rpg_sequence_level_rows, rpg_token_level_rows, on_policy_rows,
                                               clip_and_aggregation_rows]

# ---- registered checks (other loss modules: one import + one CHECKS.append line each) ----
from megatron_rpg.losses.verify_baselines import group_baseline_rows, grpo_kl_rows  # noqa: E402
CHECKS.extend([grpo_kl_rows, group_baseline_rows])
from megatron_rpg.losses.verify_r2vpo import r2vpo_rows  # noqa: E402
CHECKS.append(r2vpo_rows)


def format_table(rows: list[VerifyRow]) -> str:
    width = max(len(r.name) for r in rows)
    claim_width = max(len(r.claim) for r in rows)
    lines = [f"{'variant':{width}s}  {'claim':{claim_width}s}  rel. error  ok",
             "-" * (width + claim_width + 18)]
    lines += [f"{r.name:{width}s}  {r.claim:{claim_width}s}  {r.relative_error:9.2e}  "
              f"{'yes' if r.relative_error <= TOLERANCE else 'NO'}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run every registered check, print the table, return 0 if all rows are within 1e-9."""
    rows = [row for check in CHECKS for row in check()]
    print(format_table(rows))
    failed = [r for r in rows if not r.relative_error <= TOLERANCE]  # `not <=` also catches NaN
    print(f"\n{len(rows)} rows, {len(failed)} above {TOLERANCE:g}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
