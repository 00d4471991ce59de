"""SVRPG math: the snapshot importance ratio ρ, its Dual-Clip truncation, and the control variate.

SVRPG (Papini et al. 2018; the SVRPG-for-LLM note, with the ratio direction fixed by
docs/algorithms.md, 2. SVRPG). With a snapshot θ̃, its anchor gradient μ = E_{τ∼π_θ̃}[g(τ; θ̃)] and a small batch
D_S drawn from the current policy π_θt:

    v_t = (1/|D_S|)·Σ_{τ∈D_S} [ g(τ; θ_t) − ρ(τ)·g(τ; θ̃) ] + μ,      ρ(τ) = π_θ̃(τ) / π_θt(τ).

Exactness claim: since τ ∼ π_θt, E[ρ·g(τ; θ̃)] = Σ_τ π_θ̃(τ)·g(τ; θ̃) = μ, so E[v_t] = E[g(τ; θ_t)]
= ∇J(θ_t) exactly, for any θ_t ≠ θ̃ (proved by enumeration in tests/optim/test_svrpg_math.py).
The note's direction π_θt/π_θ̃ is biased (same test, negative case).

ρ is a *sequence-level* ratio: log ρ = Σ_t mask_t·(log π_θ̃(x_t|x_<t) − log π_θt(x_t|x_<t)), exp
taken once at the end (a product of hundreds of token ratios under/overflows in linear space).
Dual-Clip truncation clips log ρ to [log ρ_low, log min(ρ_high, c)]: it bounds the variance of the
control variate and costs a bias (measured and reported by the tests and the benchmark).
ρ is a constant weight (no gradient): the snapshot pass differentiates only g(τ; θ̃).

Normalisers (the aggregation; proved by enumeration over whole batches in
tests/optim/test_svrpg_aggregation.py): each pass divides its loss sum by its own batch's count, and
the snapshot pass by the inner batch's (it runs on that batch). v is unbiased only if that count is
the same constant for every batch a pass can draw:
- seq-mean-token-sum, seq-mean-token-mean: count = sequences with ≥ 1 response token = the number
  of sampled sequences, since every sampled response has ≥ 1 token (the rollout engine generates at
  least one; rows without response tokens are padding, not samples). Each pass is then a mean of
  per-sample terms f(τ) and E_{τ∼π_θt}[ρ·f(τ; θ̃)] = E_{π_θ̃}[f(τ; θ̃)] = μ: E[v] = E[plain gradient]
  exactly (for seq-mean-token-sum with the RPG losses that is −∇J(θ_t)).
- token-mean: count = Σ_i n_i depends on the batch, so E[ρ̄·g(θ̃)] = E_θ̃[G]/E_θt[n] while
  μ = E_θ̃[G]/E_θ̃[n] (G a sequence's token-loss sum): biased (41 % in the enumeration) and refused
  (`check_svrpg_aggregation`).

Pure tensor math: no Megatron here. The Megatron wrapper (megatron_rpg/optim/svrpg.py) applies
`combine_control_variate` shard by shard in the main-grad buffer.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from megatron_rpg.losses.policy_loss import LossInputs, PolicyLoss, RPGLoss
from megatron_rpg.losses.validation import check_finite, check_same_shape

SVRPG_AGGREGATIONS = ("seq-mean-token-sum", "seq-mean-token-mean")  # constant per-pass count


@dataclass(frozen=True)
class RatioClip:
    """Dual-Clip truncation of ρ: ρ̄ = clip(ρ, low, min(high, cap)). `None` bounds are open."""

    low: float | None = None
    high: float | None = None
    cap: float | None = None

    def __post_init__(self):
        for name in ("low", "high", "cap"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0
                                          and math.isfinite(value)):
                raise ValueError(f"RatioClip.{name} must be a positive finite number or None, got "
                                 f"{value!r}; ρ is a ratio of probabilities, so its bounds are > 0")
        upper = self.upper
        if self.low is not None and upper is not None and not self.low < upper:
            raise ValueError(f"RatioClip low={self.low} must be below min(high, cap)={upper}; "
                             f"e.g. low=0.5, high=2.0")

    @property
    def upper(self) -> float | None:
        bounds = [b for b in (self.high, self.cap) if b is not None]
        return min(bounds) if bounds else None

    @property
    def active(self) -> bool:
        return self.low is not None or self.upper is not None


NO_CLIP = RatioClip()


def sequence_log_ratio(numerator_token_logp: torch.Tensor, denominator_token_logp: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """log(π_num(τ)/π_den(τ)) = Σ_t mask_t·(ℓ_num,t − ℓ_den,t) per sequence; inputs [B, T] -> [B].

    Masked-out positions never enter (they may hold −inf or NaN, e.g. padding). Summed in at least float32 (bf16 log-probs summed over thousands of tokens lose whole units).
    """
    check_same_shape("denominator_token_logp", denominator_token_logp,
                     "numerator_token_logp", numerator_token_logp)
    if numerator_token_logp.dim() != 2:
        raise ValueError(f"token log-probs must be [batch, seq], got shape "
                         f"{tuple(numerator_token_logp.shape)}")
    dtype = torch.promote_types(numerator_token_logp.dtype, torch.float32)
    diff = numerator_token_logp.to(dtype) - denominator_token_logp.to(dtype)
    if mask is not None:
        check_same_shape("mask", mask, "numerator_token_logp", numerator_token_logp)
        keep = mask.bool()
        check_finite("token log-prob difference", diff, mask=keep)
        # where, not diff·mask: a −inf/NaN log-prob at a padded position would give −inf·0 = NaN
        diff = torch.where(keep, diff, torch.zeros((), dtype=dtype, device=diff.device))
    else:
        check_finite("token log-prob difference", diff)
    return diff.sum(dim=-1)


def snapshot_ratio(snapshot_token_logp: torch.Tensor, current_token_logp: torch.Tensor,
                   mask: torch.Tensor | None = None, clip: RatioClip = NO_CLIP
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """ρ̄(τ) = clip(π_θ̃(τ)/π_θt(τ)) for samples τ drawn from π_θt, detached; returns (ρ̄ [B], stats).

    `current_token_logp` are the behaviour log-probs of the inner batch (the policy that sampled it,
    θ_t); `snapshot_token_logp` the snapshot's log-probs of the same tokens. Clipping is done in log
    space. Stats: mean/min/max of the unclipped ρ (in log space for min/max) and the clipped fraction
    over the `num_sequences` rows with ≥ 1 masked token; rows without any (padding) have ρ = 1 by
    construction and are left out (none left: mean and fraction NaN, min +inf, max −inf).
    """
    log_rho = sequence_log_ratio(snapshot_token_logp.detach(), current_token_logp.detach(), mask)
    low = math.log(clip.low) if clip.low is not None else None
    high = math.log(clip.upper) if clip.upper is not None else None
    clipped_log_rho = log_rho.clamp(min=low, max=high) if clip.active else log_rho
    clipped = (clipped_log_rho != log_rho)
    rows = mask.bool().any(dim=-1) if mask is not None else torch.ones_like(log_rho, dtype=torch.bool)
    real_log_rho, real_clipped = log_rho[rows], clipped[rows]
    count = int(real_log_rho.numel())
    stats = {
        "num_sequences": count,
        "rho_mean": real_log_rho.exp().mean().item() if count else math.nan,
        "log_rho_min": real_log_rho.min().item() if count else math.inf,
        "log_rho_max": real_log_rho.max().item() if count else -math.inf,
        "rho_clip_fraction": real_clipped.to(torch.float32).mean().item() if count else math.nan,
    }
    return clipped_log_rho.exp(), stats


def weight_token_loss(token_loss: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """The snapshot pass's loss: ρ̄(τ)·ℓ_t(τ; θ̃) per token [B, T], so ∇ = ρ̄·g(τ; θ̃) per sample.

    `token_loss` is the trainer's on-policy surrogate at θ̃ (old log-probs = detached snapshot
    log-probs, so its gradient is g(τ; θ̃)); aggregation over tokens then stays the trainer's.
    """
    if rho.dim() != 1 or rho.shape[0] != token_loss.shape[0]:
        raise ValueError(f"rho must be [batch]={token_loss.shape[0]}, got shape {tuple(rho.shape)}")
    return token_loss * rho.detach().to(token_loss.dtype).unsqueeze(-1)


def combine_control_variate(current_grad: torch.Tensor, weighted_snapshot_grad: torch.Tensor,
                            anchor_mean: torch.Tensor, out: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """v = g(θ_t) − ρ̄·g(θ̃) + μ (each already a batch mean). `out` may alias `current_grad`."""
    check_same_shape("weighted_snapshot_grad", weighted_snapshot_grad, "current_grad", current_grad)
    check_same_shape("anchor_mean", anchor_mean, "current_grad", current_grad)
    if out is None:
        return current_grad - weighted_snapshot_grad + anchor_mean
    return out.copy_(current_grad).sub_(weighted_snapshot_grad).add_(anchor_mean)


def check_svrpg_aggregation(aggregation: str) -> None:
    """ValueError unless SVRPG is unbiased under `aggregation` (module docstring: constant counts)."""
    if aggregation not in SVRPG_AGGREGATIONS:
        raise ValueError(
            f"SVRPG with aggregation {aggregation!r} is biased: its count (response tokens) differs "
            f"between the inner batch from π_θt and the anchor batch from π_θ̃, so E[v] ≠ ∇J. Use "
            f"aggregation 'seq-mean-token-sum' (exact −∇J for the RPG losses) or 'seq-mean-token-mean'")


class SnapshotLoss(PolicyLoss):
    """SVRPG's snapshot pass as a loss: the model holds θ̃, the batch was drawn from θ_t.

        loss_sum = aggregate_sum(ρ̄_i·l_it(θ̃)),   count = the inner loss's count on the same batch,

    l_it(θ̃) the inner RPG loss on-policy at θ̃ (old log-probs := detached logp, so its gradient is
    g(τ; θ̃)) and ρ̄_i = svrpg_pass.ratio(logp, old_logp, mask) = clip(π_θ̃(τ_i)/π_θt(τ_i)), detached
    (old_logp are the sampler θ_t's). ∇(loss_sum / count) = mean_i ρ̄_i·g(τ_i; θ̃), unbiased for μ
    under the SVRPG_AGGREGATIONS (module docstring). Refuses a non-RPG inner loss and token-mean."""

    def __init__(self, inner: PolicyLoss, svrpg_pass):
        if not isinstance(inner, RPGLoss):
            raise ValueError(f"SVRPG's snapshot pass is defined for the RPG losses; got loss "
                             f"{getattr(inner, 'name', '') or type(inner).__name__!r}: use loss 'rpg' with SVRPG")
        check_svrpg_aggregation(inner.aggregation)
        self.inner, self.svrpg_pass = inner, svrpg_pass
        self.aggregation = inner.aggregation
        self.name = "svrpg_snapshot/" + inner.name

    @property
    def metric_units(self) -> str:
        return self.inner.metric_units

    def per_token_loss(self, inputs: LossInputs):
        rho = self.svrpg_pass.ratio(inputs.logp, inputs.old_logp, inputs.mask)
        on_policy = dataclasses.replace(inputs, old_logp=inputs.logp.detach())
        per_token, metrics = self.inner.per_token_loss(on_policy)
        return weight_token_loss(per_token, rho), metrics
