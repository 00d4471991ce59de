"""RPG: KL-regularised policy-gradient surrogates with exact gradients (docs/algorithms.md,
1. RPG surrogates).

Objective J(θ) = E_{x∼π_θ}[R(x)] − β·D(π_θ, π_ref); samples x ∼ π_old. With ℓ = log π_θ(x),
w = π_θ/π_old (carries gradient), u = π_ref/π_old (detached; u ≡ 1 when π_ref = π_old, the default)
and ρ = w/u = π_θ/π_ref, every divergence has a differentiable regulariser term T and a KL gradient
weight K with ∇T = K·∇ℓ and E_{π_old}[∇T] = ∇D exactly:

    divergence  D                                  T (differentiable)        K
    fkl   KL(π_ref‖π_θ)                            −u·ℓ                      −u
    ufkl  KL(π_ref‖π_θ) + Σ(π_θ − π_ref)           u·(ρ − 1 − log ρ)         w − u
    rkl   KL(π_θ‖π_ref)                            w·log ρ                   w·(log ρ + 1)
    urkl  KL(π_θ‖π_ref) + Σ(π_ref − π_θ)           w·log ρ − w               w·log ρ

    style="differentiable":  L = −w·R + β·T
    style="reinforce":       L = −sg(ψ)·ℓ,   ψ = w·R − β·K
With u ≡ 1 these are exactly the table of docs/algorithms.md (1. RPG surrogates) (UFKL's T is then the k3 estimator).

Exactness claims (proved by enumeration in tests/losses/test_rpg_*.py and `python -m
megatron_rpg.losses.verify`):
- is_level="sequence": w = exp(Σ_t m_t·(ℓ_t − ℓ_old,t)) is the weight of the unit D is defined on, so
  E_{π_old}[∇L] = −∇J(θ) at ANY θ (clip=None).
- is_level="token": per-token w_t, ℓ_t, u_t. The expectation of Σ_t ∇L_t under π_old equals
  −∇J_tok(θ) at θ = θ_old, where J_tok(θ) = E_{π_θ}[R] − β·Σ_t E_{x_<t∼π_old}[D(π_θ(·|x_<t), π_ref(·|x_<t))]
  (per-position divergences with the prefix distribution held at π_old); the β part alone is exact
  for that J_tok at any θ.
- On-policy (π_ref = π_old, θ = θ_old, w ≡ 1): the per-sample KL gradient is β·K·∇ℓ with K = 0 for
  ufkl and urkl (they vanish per sample), K = +1 for rkl (+β·∇ℓ: only its expectation vanishes, since
  E_{π_old}[∇ℓ] = 0) and K = −1 for fkl (−β·∇ℓ, an NLL term on the model's own samples; likewise zero
  only in expectation). (The RPG paper lists rkl among the per-sample vanishing ones; its own table
  gives K = w·(log w + 1) = 1 at w = 1, and the enumeration confirms the table.)

Sequence-level layout over tokens: the sequence loss L_i is spread evenly over its n_i response
tokens (each carries L_i/n_i), so seq-mean-token-sum gives mean_i L_i (for a batch of one sequence,
exactly L(x) of the table), seq-mean-token-mean gives mean_i L_i/n_i and token-mean Σ_i L_i/N_tok.
Sequence level needs every token of a sequence in one call (context parallelism must all-reduce
Σ_t m_t·(ℓ_t − ℓ_old,t) first).

RPG-Style Clip (see clip.py): differentiable style follows Algorithm 1: with kl_in_advantage=True the
rkl/urkl KL weight is folded into the detached regularised advantage Â = R − β·K/w (= R − β(log ρ + 1)
resp. R − β·log ρ) and the dual clip is applied to −Â·w; fkl/ufkl keep Â = R with β·T outside the
clip (so for them both settings coincide). kl_in_advantage=False always puts β·T outside, unclipped.
REINFORCE style follows Algorithm 2: ψ = A·sg(w) + C(w̄) with C = −β·K evaluated at the clipped weight
w̄ (ρ̄ = w̄/u), gradient only in the active region; with kl_in_advantage=False the KL part uses the
unclipped w and is always active. A clip that never binds gives the unclipped (exact) gradients.

kl_clamp (off by default; the public code uses 10) acts on the per-sample KL value V, an unbiased
estimate of D (E_{π_old}[V] = D) that differs from T by a θ-independent constant, so ∇V = ∇T = K·∇ℓ:

    fkl   V = −u·log ρ = T + u·ℓ_ref   (ℓ_ref = log π_ref(x), detached; with u ≡ 1, V = −log w)
    ufkl  V = T,   rkl  V = T,   urkl  V = T + u = w·log ρ − w + u

(FKL's T = −u·ℓ is a negative log-likelihood, > 10 for almost every sequence; clamping it would
silently drop the FKL gradient, hence V.) The differentiable style uses β·clamp(V, ±kl_clamp), whose
gradient is β·K·∇ℓ where |V| ≤ kl_clamp and zero where |V| > kl_clamp (inside, its value differs from
β·T by a constant); the REINFORCE weight K and the Â-folded KL are zeroed where |V| > kl_clamp, so every style
and placement keeps the same gradient as the clamped differentiable term. kl_clamp=None uses T itself.
"""
from __future__ import annotations

import torch

from megatron_rpg.losses.aggregation import AGGREGATIONS, aggregate, aggregate_sum
from megatron_rpg.losses.clip import (RPGClip, clipped_log_weight, dual_clip_surrogate,
                                      reinforce_active_region)
from megatron_rpg.losses.kl import k3
from megatron_rpg.losses.validation import check_choice, check_policy_inputs, check_range

DIVERGENCES = ("fkl", "ufkl", "rkl", "urkl")
STYLES = ("differentiable", "reinforce")
IS_LEVELS = ("token", "sequence")


def kl_surrogate_term(divergence: str, log_w: torch.Tensor, log_u: torch.Tensor, ell: torch.Tensor):
    """T of the module table: ∇T = K·∇ℓ and E_{π_old}[∇T] = ∇D. log_w = ℓ − ℓ_old, log_u = ℓ_ref − ℓ_old."""
    w, u, log_rho = torch.exp(log_w), torch.exp(log_u), log_w - log_u
    if divergence == "fkl":
        return -u * ell
    if divergence == "ufkl":
        return w - u - u * log_rho
    if divergence == "rkl":
        return w * log_rho
    return w * log_rho - w


def kl_value(divergence: str, log_w: torch.Tensor, log_u: torch.Tensor) -> torch.Tensor:
    """V of the module docstring: E_{π_old}[V] = D and V − T is constant in θ (∇V = ∇T); what kl_clamp clamps."""
    w, u, log_rho = torch.exp(log_w), torch.exp(log_u), log_w - log_u
    if divergence == "fkl":
        return -u * log_rho
    if divergence == "ufkl":
        return w - u - u * log_rho
    if divergence == "rkl":
        return w * log_rho
    return w * log_rho - w + u


def kl_gradient_weight(divergence: str, log_w: torch.Tensor, log_u: torch.Tensor) -> torch.Tensor:
    """K of the module table (the REINFORCE-style KL weight, ψ = w·R − β·K)."""
    w, u, log_rho = torch.exp(log_w), torch.exp(log_u), log_w - log_u
    if divergence == "fkl":
        return -u
    if divergence == "ufkl":
        return w - u
    if divergence == "rkl":
        return w * (log_rho + 1)
    return w * log_rho


def _inside_clamp(divergence, log_w, log_u, kl_clamp):
    """|V| ≤ kl_clamp: where the clamped KL keeps its gradient (the one mask every style and placement uses)."""
    with torch.no_grad():
        return kl_value(divergence, log_w, log_u).abs() <= kl_clamp


def _kl_weight(divergence, log_w, log_u, kl_clamp):
    """K, zeroed where |V| > kl_clamp: the gradient of clamp(V, ±kl_clamp), so both styles agree."""
    weight = kl_gradient_weight(divergence, log_w, log_u)
    if kl_clamp is None:
        return weight
    inside = _inside_clamp(divergence, log_w, log_u, kl_clamp)
    return torch.where(inside, weight, torch.zeros_like(weight))


def _kl_term(divergence, log_w, log_u, ell, kl_clamp):
    """β-free KL loss term: T unclamped; clamp(V, ±kl_clamp) if clamped (gradient ∇T inside, zero outside)."""
    term = kl_surrogate_term(divergence, log_w, log_u, ell)
    if kl_clamp is None:
        return term
    value = kl_value(divergence, log_w, log_u).detach()
    # inside: value V on T's autograd graph (∇V = ∇T), so an inactive clamp changes no gradient bit
    return torch.where(_inside_clamp(divergence, log_w, log_u, kl_clamp), term + (value - term.detach()),
                       value.clamp(-kl_clamp, kl_clamp))


def _differentiable_unit_loss(ell, log_w, log_u, adv, divergence, beta, clip, kl_in_advantage, kl_clamp):
    if clip is None:
        return -torch.exp(log_w) * adv + beta * _kl_term(divergence, log_w, log_u, ell, kl_clamp), None
    if kl_in_advantage and divergence in ("rkl", "urkl"):
        with torch.no_grad():
            # Â = A − β·K/w; K/w = log ρ + 1 (rkl) or log ρ (urkl), formed without dividing by w
            kl_per_weight = (log_w - log_u) + (1.0 if divergence == "rkl" else 0.0)
            if kl_clamp is not None:
                inside = _inside_clamp(divergence, log_w, log_u, kl_clamp)
                kl_per_weight = torch.where(inside, kl_per_weight, torch.zeros_like(kl_per_weight))
            adv_hat = adv - beta * kl_per_weight
        return dual_clip_surrogate(adv_hat, log_w, clip)
    policy_loss, regions = dual_clip_surrogate(adv, log_w, clip)
    return policy_loss + beta * _kl_term(divergence, log_w, log_u, ell, kl_clamp), regions


def _reinforce_unit_loss(ell, log_w, log_u, adv, divergence, beta, clip, kl_in_advantage, kl_clamp):
    with torch.no_grad():
        psi, regions = _reinforce_weight(log_w, log_u, adv, divergence, beta, clip, kl_in_advantage, kl_clamp)
    return -psi * ell, regions


def _reinforce_weight(log_w, log_u, adv, divergence, beta, clip, kl_in_advantage, kl_clamp):
    """ψ = w·A − β·K (no clip), or Algorithm 2's G = A·w + C(w̄) restricted to the active region."""
    if clip is None:
        return torch.exp(log_w) * adv - beta * _kl_weight(divergence, log_w, log_u, kl_clamp), None
    active, regions = reinforce_active_region(adv, log_w, clip)
    # active units have w < max(1+ε_high, c), so capping there changes nothing they use and keeps
    # exp() finite for inactive sequence-level weights (which get no gradient anyway)
    capped_w = torch.exp(log_w.clamp(max=max(clip.log_high, clip.log_dual)))
    policy = torch.where(active, capped_w * adv, torch.zeros_like(adv))
    if kl_in_advantage:  # Algorithm 2: C = −β·K(w̄) inside the active region only
        kl = _kl_weight(divergence, clipped_log_weight(log_w, clip), log_u, kl_clamp)
        return torch.where(active, policy - beta * kl, torch.zeros_like(adv)), regions
    # public-code placement: unclipped KL weight, always active
    return policy - beta * _kl_weight(divergence, log_w, log_u, kl_clamp), regions


def _validate(logp, old_logp, advantages, divergence, style, beta, ref_logp, mask, is_level, clip,
              aggregation, kl_clamp):
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("style", style, STYLES)
    check_choice("is_level", is_level, IS_LEVELS)
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_range("beta", beta, 0.0)
    if clip is not None and not isinstance(clip, RPGClip):
        raise ValueError(f"clip={clip!r} must be an RPGClip(eps_low, eps_high, dual_clip) or None")
    if kl_clamp is not None:
        check_range("kl_clamp", kl_clamp, 0.0, low_inclusive=False)
    return check_policy_inputs(logp, old_logp, advantages, mask, ref_logp)


def _sequence_advantages(advantages, mask):
    if advantages.dim() == 1:
        return advantages
    big = torch.finfo(advantages.dtype).max
    high = torch.where(mask, advantages, -big).amax(dim=1)
    low = torch.where(mask, advantages, big).amin(dim=1)
    if bool(((high != low) & mask.any(dim=1)).any()):
        raise ValueError("advantages varies along the response tokens of a sequence; is_level='sequence' "
                         "needs one advantage per sequence ([batch], or constant over the mask)")
    return torch.where(mask.any(dim=1), high, torch.zeros_like(high))


def rpg_per_token_loss(logp, old_logp, advantages, *, divergence, style, beta, ref_logp=None, mask=None,
                       is_level="token", clip=None, aggregation="token-mean", kl_in_advantage=True,
                       kl_clamp=None):
    """Per-token loss [batch, seq] (zero at padding) and detached metrics; see the module docstring."""
    mask = _validate(logp, old_logp, advantages, divergence, style, beta, ref_logp, mask, is_level, clip,
                     aggregation, kl_clamp)
    # ratios are exp(ℓ − ℓ_old): never form them in 16-bit precision
    dtype = torch.promote_types(logp.dtype, torch.float32)
    zeros = torch.zeros(logp.shape, dtype=dtype, device=logp.device)
    # where(), not a product: padding may hold NaN/inf (only response positions are checked)
    ell = torch.where(mask, logp.to(dtype), zeros)
    ell_old = torch.where(mask, old_logp.detach().to(dtype), zeros)
    ell_ref = ell_old if ref_logp is None else torch.where(mask, ref_logp.detach().to(dtype), zeros)
    advantages = advantages.detach().to(dtype)
    if is_level == "token":
        adv = advantages[:, None].expand_as(logp) if advantages.dim() == 1 else advantages
        adv = torch.where(mask, adv, zeros)
        unit_mask = mask
    else:
        adv = _sequence_advantages(advantages, mask)
        ell, ell_old, ell_ref = ell.sum(dim=1), ell_old.sum(dim=1), ell_ref.sum(dim=1)
        unit_mask = mask.any(dim=1)
    log_w, log_u = ell - ell_old, ell_ref - ell_old
    unit_loss_fn = _differentiable_unit_loss if style == "differentiable" else _reinforce_unit_loss
    unit_loss, regions = unit_loss_fn(ell, log_w, log_u, adv, divergence, beta, clip, kl_in_advantage,
                                      kl_clamp)
    if is_level == "token":
        per_token = torch.where(mask, unit_loss, zeros)
    else:
        tokens = mask.sum(dim=1, keepdim=True).clamp(min=1).to(unit_loss.dtype)
        per_token = torch.where(mask, unit_loss[:, None] / tokens, zeros)
    return per_token, _metrics(log_w.detach(), (ell_ref - ell).detach(), unit_mask, regions)


def _metrics(log_w, log_ref_over_policy, unit_mask, regions):
    count = unit_mask.sum().clamp(min=1)

    def mean(value):
        return torch.where(unit_mask, value.to(log_w.dtype), torch.zeros_like(log_w)).sum() / count

    ratio = torch.exp(log_w)
    metrics = {"kl_k3": mean(k3(log_ref_over_policy)), "ratio_mean": mean(ratio),
               "ratio_max": torch.where(unit_mask, ratio, torch.zeros_like(ratio)).amax(),
               "log_ratio_mean": mean(log_w)}
    for name in ("low", "high", "dual"):
        bound = torch.zeros_like(unit_mask) if regions is None else getattr(regions, name)
        metrics[f"clip_frac_{name}"] = mean(bound)
    return {key: value.detach() for key, value in metrics.items()}


def rpg_loss_sum(logp, old_logp, advantages, *, divergence, style, beta, ref_logp=None, mask=None,
                 is_level="token", clip=None, aggregation="token-mean", kl_in_advantage=True, kl_clamp=None):
    """(loss_sum, count, metrics) for Megatron's per-token-loss contract: the global loss is
    Σ loss_sum / Σ count over all micro-batches and data-parallel ranks (see aggregation.py)."""
    per_token, metrics = rpg_per_token_loss(
        logp, old_logp, advantages, divergence=divergence, style=style, beta=beta, ref_logp=ref_logp,
        mask=mask, is_level=is_level, clip=clip, aggregation=aggregation, kl_in_advantage=kl_in_advantage,
        kl_clamp=kl_clamp)
    loss_sum, count = aggregate_sum(per_token, mask, aggregation)
    return loss_sum, count, metrics


def rpg_loss(logp, old_logp, advantages, *, divergence, style, beta, ref_logp=None, mask=None,
             is_level="token", clip=None, aggregation="token-mean", kl_in_advantage=True, kl_clamp=None,
             num_global_tokens=None, num_global_sequences=None):
    """RPG loss (formulas and exactness claims in the module docstring) → (loss, metrics).

    logp [batch, seq] carries gradient; old_logp/ref_logp are detached here (ref_logp=None: π_ref = π_old);
    advantages [batch] or [batch, seq]; mask marks response tokens (None: all). num_global_tokens
    (token-mean) / num_global_sequences (seq-mean modes) make the mean exact over a global batch.
    With is_level="sequence", clip=None, aggregation="seq-mean-token-sum" and one sequence the loss is
    L(x) of the table and E_{π_old}[∇L] = −∇J(θ) at any θ.
    """
    per_token, metrics = rpg_per_token_loss(
        logp, old_logp, advantages, divergence=divergence, style=style, beta=beta, ref_logp=ref_logp,
        mask=mask, is_level=is_level, clip=clip, aggregation=aggregation, kl_in_advantage=kl_in_advantage,
        kl_clamp=kl_clamp)
    loss = aggregate(per_token, mask, aggregation, num_global_tokens=num_global_tokens,
                     num_global_sequences=num_global_sequences)
    metrics["loss"] = loss.detach()
    return loss, metrics
