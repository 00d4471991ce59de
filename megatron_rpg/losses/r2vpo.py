"""R²VPO: ratio-variance regularised policy optimisation (docs/algorithms.md, 3a. R²VPO).

Hard ratio clipping is replaced by a constraint on the variance of the importance ratio. With
w = π_θ/π_b (π_b the behaviour policy: π_old for this step's rollout, an older policy for a reused
batch) and E_b[w] = 1, Var_b(w) = E_b[(w − 1)²], the primal-dual objective (minimised over θ) is

    L(θ, λ) = −E_b[w·A] + λ·(E_b[(w − 1)²] − δ),     λ ← max(0, λ + η_λ·(Var̂(w) − δ))

per unit: ℓ_unit = −w·A + λ·((w − 1)² − δ), no clip. λ is held fixed during a step's gradient
passes and moved once per RL step by projected dual ascent on the step's measured
Var̂(w) = mean of (w − 1)² over the step's units (over every data-parallel rank: the trainer's
global metrics). The paper's exact update rule is not public (only its abstract is): this is our
stated form, and every constant is a setting (R2VPOConfig: δ, η_λ, λ_0, the level, the stale-data
window and its truncation).

Levels (`level`): "token": w_t = π_θ(x_t|x_<t)/π_b(x_t|x_<t) per response token; "sequence":
w = exp(Σ_t m_t·(ℓ_t − ℓ_b,t)), the product of the token ratios, with the sequence's loss spread
evenly over its tokens (as rpg.py does: seq-mean-token-sum over one sequence gives ℓ_unit).

Exactness (proved by enumeration in tests/losses/test_r2vpo_exact.py, float64):
- sequence level, at any θ: E_b[∇ℓ_unit] = ∇[−E_{π_θ}[A] + λ·(χ²(π_θ‖π_b) − δ)], and
  E_b[(w − 1)²] = χ²(π_θ‖π_b) = Σ_x π_θ(x)²/π_b(x) − 1 exactly;
- token level, at any θ: Σ_t E_b[(w_t − 1)²] = Σ_t E_{x_<t∼π_b}[χ²(π_θ(·|x_<t)‖π_b(·|x_<t))] (the
  per-position χ² with prefixes held at π_b), and Σ_t E_b[w_t·A] = Σ_t E_{x∼π_b^(t)}[A], the return
  of the policy that follows π_b except at position t, where it follows π_θ (equal to ∇E_{π_θ}[A]
  in gradient only at θ = θ_b: the usual first-order surrogate);
- stale data: a reused sample is weighted by its own ratio π_θ/π_b, so its policy term has
  E_b[∇(−w·A)] = −∇E_{π_θ}[A] at any θ (sequence level): unbiased for the current objective; its
  variance term targets χ²(π_θ‖π_b), the divergence from the policy that drew it (the constraint
  then keeps π_θ close to every behaviour policy in the window, weighted by its share of the units);
- truncated stale weights (`stale_clip` c): w̃ = min(w, c) in value, with ∇w̃ = min(w, c)·∇ℓ
  (formed as exp(ℓ − ℓ_b − sg(ℓ − ℓ_b − log c)) where w > c: no overflow). Per unit
  ∇ℓ_unit = f(w)·∇ℓ with f(w) = w·(−A + 2λ(w − 1)), so the truncation's bias is exactly
      E_b[∇ℓ̃] − E_b[∇ℓ] = E_b[1{w > c}·(f(c) − f(w))·∇ℓ].
  This step's own rollout (staleness 0) is never truncated.

Inputs: `staleness` ([batch], steps since each row was sampled; None: all fresh) marks the reused
rows; old_logp holds each row's behaviour log-probs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_rpg.losses.validation import check_choice, check_policy_inputs, check_range

R2VPO_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class R2VPOConfig:
    """level: "token" or "sequence" ratios; delta: δ, the variance budget; dual_lr: η_λ; lambda_init:
    λ at step 0; stale_clip: c, truncation of a reused sample's ratio (None: untruncated);
    reuse_steps: how many past rollout batches the trainer keeps and reuses (0: none; read by the
    trainer's loop, training/stale_batches.py). Untuned starting points, stated rather than taken
    from the paper (it does not publish them)."""

    level: str = "token"
    delta: float = 0.01
    dual_lr: float = 10.0
    lambda_init: float = 1.0
    stale_clip: float | None = None
    reuse_steps: int = 0

    def __post_init__(self):  # messages name the trainer's flags (training/flags.py: --r2vpo-*)
        check_choice("--r2vpo-level", self.level, R2VPO_LEVELS)
        for name in ("delta", "dual_lr", "lambda_init"):
            value, flag = getattr(self, name), _flag(name)
            if not math.isfinite(value):
                raise ValueError(f"{flag}={value!r} must be a finite number >= 0")
            check_range(flag, value, 0.0)
        if self.stale_clip is not None:
            check_range("--r2vpo-stale-clip", self.stale_clip, 0.0, low_inclusive=False)
        if isinstance(self.reuse_steps, bool) or not isinstance(self.reuse_steps, int) or self.reuse_steps < 0:
            raise ValueError(f"--r2vpo-reuse-steps={self.reuse_steps!r} must be an integer >= 0 (0: no reuse)")
        if self.stale_clip is not None and self.reuse_steps == 0:
            raise ValueError(f"--r2vpo-stale-clip={self.stale_clip} truncates reused samples, but "
                             f"--r2vpo-reuse-steps=0 reuses none: set --r2vpo-reuse-steps >= 1 or drop it")


def _flag(field: str) -> str:
    return "--r2vpo-" + field.replace("_", "-")


def dual_ascent(multiplier: float, ratio_var: float, delta: float, dual_lr: float) -> float:
    """Projected dual ascent: max(0, λ + η_λ·(Var̂ − δ)); ValueError for a non-finite Var̂ (an
    overflowed ratio must not silently reset λ)."""
    if not math.isfinite(ratio_var):
        raise ValueError(f"the measured ratio variance is {ratio_var}: a ratio overflowed (sequence-level "
                         f"ratios of long responses, or a diverged policy); lower the learning rate or use "
                         f"level 'token'")
    return max(0.0, multiplier + dual_lr * (ratio_var - delta))


def _unit_log_ratios(logp, old_logp, mask, level):
    """(log w per unit, unit mask): per token, or summed over each sequence's response tokens."""
    dtype = torch.promote_types(logp.dtype, torch.float32)  # never form ratios in 16-bit
    zeros = torch.zeros(logp.shape, dtype=dtype, device=logp.device)
    # where(), not a product: padding may hold NaN/inf (only response positions are checked)
    log_w = torch.where(mask, logp.to(dtype) - old_logp.detach().to(dtype), zeros)
    if level == "token":
        return log_w, mask
    return log_w.sum(dim=1), mask.any(dim=1)


def _unit_advantages(advantages, mask, level, dtype):
    advantages = advantages.detach().to(dtype)
    if level == "token":
        adv = advantages[:, None].expand(mask.shape) if advantages.dim() == 1 else advantages
        return torch.where(mask, adv, torch.zeros_like(adv))
    if advantages.dim() == 1:
        return advantages
    first = mask.to(torch.long).argmax(dim=1, keepdim=True)  # one advantage per sequence: must be constant
    per_row = advantages.gather(1, first)
    if bool(((advantages != per_row) & mask).any()):
        raise ValueError("advantages varies along the response tokens of a sequence; level='sequence' needs "
                         "one advantage per sequence ([batch], or constant over the mask)")
    return torch.where(mask.any(dim=1), per_row[:, 0], torch.zeros_like(per_row[:, 0]))


def r2vpo_per_token_loss(logp, old_logp, advantages, *, multiplier: float, config: R2VPOConfig, mask=None,
                         staleness=None):
    """Per-token loss [batch, seq] (zero at padding) of ℓ_unit = −w·A + λ·((w − 1)² − δ) and detached
    metrics (means over the level's units): r2vpo/ratio_var (Var̂), ratio_mean, ratio_max,
    r2vpo/stale_fraction, r2vpo/stale_clip_frac. multiplier: λ; staleness: [batch] or None."""
    check_range("multiplier", multiplier, 0.0)
    mask = check_policy_inputs(logp, old_logp, advantages, mask)
    log_w, unit_mask = _unit_log_ratios(logp, old_logp, mask, config.level)
    stale = torch.zeros(logp.shape[0], dtype=torch.bool, device=logp.device)
    if staleness is not None:
        if tuple(staleness.shape) != (logp.shape[0],):
            raise ValueError(f"staleness has shape {tuple(staleness.shape)}; pass one value per row "
                             f"({logp.shape[0]},), 0 for this step's rollout")
        stale = staleness.to(logp.device) > 0
    stale = (stale[:, None].expand(mask.shape) if config.level == "token" else stale) & unit_mask
    truncated = torch.zeros_like(stale)
    if config.stale_clip is not None:
        log_c = math.log(config.stale_clip)
        truncated = stale & (log_w.detach() > log_c)
        # value c, gradient c·∇ℓ: the log-ratio shifted by a detached constant
        log_w = torch.where(truncated, log_w - (log_w.detach() - log_c), log_w)
    w = torch.exp(log_w)
    adv = _unit_advantages(advantages, mask, config.level, log_w.dtype)
    excess = torch.expm1(log_w)  # w − 1 without cancellation near w = 1
    unit_loss = -w * adv + multiplier * (excess.square() - config.delta)
    unit_loss = torch.where(unit_mask, unit_loss, torch.zeros_like(unit_loss))
    if config.level == "token":
        per_token = unit_loss
    else:
        tokens = mask.sum(dim=1, keepdim=True).clamp(min=1).to(unit_loss.dtype)
        per_token = torch.where(mask, unit_loss[:, None] / tokens, torch.zeros_like(mask, dtype=unit_loss.dtype))
    return per_token, _metrics(log_w.detach(), unit_mask, stale, truncated)


def _metrics(log_w, unit_mask, stale, truncated):
    log_w = log_w.double()  # (w − 1)² of a large sequence ratio overflows float32 first
    count = unit_mask.sum().clamp(min=1)

    def mean(value):
        return torch.where(unit_mask, value.to(log_w.dtype), torch.zeros_like(log_w)).sum() / count

    ratio = torch.exp(log_w)
    metrics = {"r2vpo/ratio_var": mean(torch.expm1(log_w).square()), "ratio_mean": mean(ratio),
               "ratio_max": torch.where(unit_mask, ratio, torch.zeros_like(ratio)).amax(),
               "log_ratio_mean": mean(log_w), "r2vpo/stale_fraction": mean(stale),
               "r2vpo/stale_clip_frac": mean(truncated)}
    return {key: value.detach() for key, value in metrics.items()}
