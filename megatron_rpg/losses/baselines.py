"""Baseline policy losses to compare RPG against: PPO-clip, GRPO (original and corrected KL), DAPO,
REINFORCE++. Same conventions as rpg_loss: per-token tensors [batch, seq]; logp carries gradient,
old_logp/ref_logp are detached here; advantages [batch] or [batch, seq]; mask marks response tokens
(None: all); ref_logp=None means π_ref = π_old; `aggregation` as in aggregation.py, with num_global_tokens / num_global_sequences for an
exact global mean; every function returns (loss, metrics). The `*_per_token_loss` forms return the
[batch, seq] loss (zero at padding) for Megatron's per-token-loss contract (aggregate_sum).

Token-level importance weight w_t = exp(ℓ_t − ℓ_old,t); the PPO-clip surrogate per token is
    p_t = max(−A_t·w_t, −A_t·clip(w_t, 1−ε_low, 1+ε_high)),  with the dual clip min(p_t, −c·A_t) if A_t < 0
(clip.dual_clip_surrogate; c = clip.dual_clip, None disables it).

GRPO's KL term on δ = log π_ref − log π_θ (per token, or per sequence with kl_level="sequence"):
    grpo        β·k3(δ)                 k3(δ) = e^δ − 1 − δ,   ∇ = β·(1 − π_ref/π_θ)·∇ℓ
    grpo_is_kl  β·w·k3(δ)               ∇ = β·w·log(π_θ/π_ref)·∇ℓ
Exactness claims, under x ∼ π_old (proved by enumeration in tests/losses/test_baselines.py):
- kl_level="sequence" (or responses of one token): grpo's KL term has E[∇] = β·∇KL(π_ref‖π_θ), the
  FORWARD KL, at θ = θ_old only — not the β·∇KL(π_θ‖π_ref) GRPO intends. grpo_is_kl's has
  E[∇] = β·∇KL(π_θ‖π_ref) exactly at ANY θ.
- kl_level="token" (the original GRPO): with prefixes x_<t ∼ π_old held fixed,
  grpo:       E[∇] = β·∇_θ Σ_t E_{x_<t}[KL(π_ref(·|x_<t)‖π_θ(·|x_<t))]   at θ = θ_old only;
  grpo_is_kl: E[∇] = β·∇_θ Σ_t E_{x_<t}[KL(π_θ(·|x_<t)‖π_ref(·|x_<t))]   at any θ.
  For responses of ≥ 2 tokens neither is ∇KL(π_θ‖π_ref) of the sequence distribution, even on-policy:
  a per-token term misses the effect of x_t on the KL of the tokens after it.
The sequence-level KL term L_i of a response is spread evenly over its n_i tokens (L_i/n_i each, as in
rpg.py), so seq-mean-token-sum over one response gives exactly β·k3 resp. β·w·k3.
"""
from __future__ import annotations

import torch

from megatron_rpg.losses.aggregation import AGGREGATIONS, aggregate
from megatron_rpg.losses.clip import ClipRegions, RPGClip, dual_clip_surrogate
from megatron_rpg.losses.kl import k3
from megatron_rpg.losses.validation import check_choice, check_policy_inputs, check_range

KL_LEVELS = ("token", "sequence")
PPO_CLIP = RPGClip(eps_low=0.2, eps_high=0.2, dual_clip=None)
DAPO_CLIP = RPGClip(eps_low=0.2, eps_high=0.28, dual_clip=None)  # clip-higher (Yu et al. 2025)


def _validate(logp, old_logp, advantages, mask, clip, aggregation, ref_logp=None, beta=0.0,
              kl_level="token"):
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_choice("kl_level", kl_level, KL_LEVELS)
    check_range("beta", beta, 0.0)
    if not isinstance(clip, RPGClip):
        raise ValueError(f"clip={clip!r} must be an RPGClip(eps_low, eps_high, dual_clip); "
                         f"e.g. RPGClip(0.2, 0.2, None) for PPO")
    return check_policy_inputs(logp, old_logp, advantages, mask, ref_logp)


def _clipped_policy_term(logp, old_logp, advantages, mask, clip):
    """PPO-clip surrogate per token (zero at padding), log w_t and the clip regions."""
    zeros = torch.zeros_like(old_logp)
    # where(), not a product: padding may hold NaN/inf (only response positions are checked)
    ell = torch.where(mask, logp, zeros)
    log_w = ell - torch.where(mask, old_logp.detach(), zeros)
    adv = advantages.detach()
    adv = torch.where(mask, adv[:, None].expand_as(logp) if adv.dim() == 1 else adv, zeros)
    surrogate, regions = dual_clip_surrogate(adv, log_w, clip)
    return torch.where(mask, surrogate, zeros), ell, log_w, regions


def _metrics(mask, log_w, regions: ClipRegions, kl_per_token=None):
    count = mask.sum().clamp(min=1)

    def mean(value):
        return torch.where(mask, value.to(log_w.dtype), torch.zeros_like(log_w)).sum() / count

    ratio = torch.exp(log_w)
    metrics = {"ratio_mean": mean(ratio), "ratio_max": torch.where(mask, ratio, torch.zeros_like(ratio)).amax(),
               "log_ratio_mean": mean(log_w),
               "clip_frac_low": mean(regions.low & mask), "clip_frac_high": mean(regions.high & mask),
               "clip_frac_dual": mean(regions.dual & mask)}
    if kl_per_token is not None:
        metrics["kl_k3"] = mean(kl_per_token)
    return {key: value.detach() for key, value in metrics.items()}


def ppo_clip_per_token_loss(logp, old_logp, advantages, *, mask=None, clip=PPO_CLIP,
                            aggregation="token-mean"):
    """PPO-clip (optional dual clip via clip.dual_clip) per token → ([batch, seq] loss, metrics)."""
    mask = _validate(logp, old_logp, advantages, mask, clip, aggregation)
    per_token, _, log_w, regions = _clipped_policy_term(logp, old_logp, advantages, mask, clip)
    return per_token, _metrics(mask, log_w.detach(), regions)


def ppo_clip(logp, old_logp, advantages, *, mask=None, clip=PPO_CLIP, aggregation="token-mean",
             num_global_tokens=None, num_global_sequences=None):
    """PPO-clip loss: aggregate_t max(−A_t·w_t, −A_t·clip(w_t, 1−ε_low, 1+ε_high)) [dual clip if set].

    Token-level ratios: with one advantage per response, a clip that does not bind and
    seq-mean-token-sum over one response, E_{π_old}[∇L] = −∇E_{π_θ}[A] at θ = θ_old (w ≡ 1 and
    Σ_t ∇ℓ_t = ∇log π_θ(x)); away from θ_old per-token ratios are biased. Default ε = 0.2, no dual clip.
    """
    per_token, metrics = ppo_clip_per_token_loss(logp, old_logp, advantages, mask=mask, clip=clip,
                                                 aggregation=aggregation)
    return _finish(per_token, metrics, mask, aggregation, num_global_tokens, num_global_sequences)


def dapo(logp, old_logp, advantages, *, mask=None, clip=DAPO_CLIP, num_global_tokens=None):
    """DAPO loss: PPO-clip with clip-higher (ε_low = 0.2, ε_high = 0.28), token-mean over the (global)
    batch, no KL term (no reference policy). Pair with rewards/dapo.py (±1 reward, overlong penalty,
    dynamic sampling) and group-mean advantages."""
    per_token, metrics = ppo_clip_per_token_loss(logp, old_logp, advantages, mask=mask, clip=clip,
                                                 aggregation="token-mean")
    return _finish(per_token, metrics, mask, "token-mean", num_global_tokens, None)


def reinforce_pp(logp, old_logp, token_advantages, *, mask=None, clip=PPO_CLIP,
                 aggregation="token-mean", num_global_tokens=None, num_global_sequences=None):
    """REINFORCE++ loss side: PPO-clip on per-token advantages [batch, seq] with no KL term in the loss.

    The KL (k1 against π_ref) is already in the advantages: build them with
    advantages.reinforce_pp_advantages (k1-shaped token rewards → token returns → batch normalisation).
    """
    if token_advantages.dim() != 2:
        raise ValueError(f"token_advantages must be per-token [batch, seq] (from reinforce_pp_advantages), "
                         f"got shape {tuple(token_advantages.shape)}")
    return ppo_clip(logp, old_logp, token_advantages, mask=mask, clip=clip, aggregation=aggregation,
                    num_global_tokens=num_global_tokens, num_global_sequences=num_global_sequences)


def grpo_per_token_loss(logp, old_logp, ref_logp, advantages, *, mask=None, beta=0.04, clip=PPO_CLIP,
                        kl_level="token", importance_weighted_kl=False, aggregation="seq-mean-token-mean"):
    """GRPO per token: PPO-clip surrogate + β·[w·]k3(log π_ref − log π_θ) (see the module docstring)."""
    mask = _validate(logp, old_logp, advantages, mask, clip, aggregation, ref_logp, beta, kl_level)
    policy, ell, log_w, regions = _clipped_policy_term(logp, old_logp, advantages, mask, clip)
    zeros = torch.zeros_like(old_logp)
    ref = old_logp if ref_logp is None else ref_logp  # None: π_ref = π_old, as in rpg_loss
    log_ref_over_policy = torch.where(mask, ref.detach(), zeros) - ell
    if kl_level == "token":
        kl = k3(log_ref_over_policy)
        if importance_weighted_kl:
            kl = torch.exp(log_w) * kl
    else:
        sequence_kl = k3(log_ref_over_policy.sum(dim=1))
        if importance_weighted_kl:
            sequence_kl = torch.exp(log_w.sum(dim=1)) * sequence_kl
        tokens = mask.sum(dim=1, keepdim=True).clamp(min=1).to(sequence_kl.dtype)
        kl = sequence_kl[:, None] / tokens  # spread evenly over the response's tokens
    per_token = policy + beta * torch.where(mask, kl, zeros)
    return per_token, _metrics(mask, log_w.detach(), regions, k3(log_ref_over_policy.detach()))


def grpo(logp, old_logp, ref_logp, advantages, *, mask=None, beta=0.04, clip=PPO_CLIP, kl_level="token",
         aggregation="seq-mean-token-mean", num_global_tokens=None, num_global_sequences=None):
    """Original GRPO (Shao et al. 2024): PPO-clip + β·k3(π_ref/π_θ) per token with NO importance weight.

    On samples from π_old its KL gradient targets the forward KL(π_ref‖π_θ) (module docstring): kept to
    reproduce GRPO, not to be trusted. Defaults: β = 0.04, ε = 0.2, seq-mean-token-mean.
    """
    per_token, metrics = grpo_per_token_loss(logp, old_logp, ref_logp, advantages, mask=mask, beta=beta,
                                             clip=clip, kl_level=kl_level, aggregation=aggregation)
    return _finish(per_token, metrics, mask, aggregation, num_global_tokens, num_global_sequences)


def grpo_is_kl(logp, old_logp, ref_logp, advantages, *, mask=None, beta=0.04, clip=PPO_CLIP,
               kl_level="token", aggregation="seq-mean-token-mean", num_global_tokens=None,
               num_global_sequences=None):
    """GRPO with the KL term importance-weighted: β·w·k3(π_ref/π_θ), w differentiable.

    E_{π_old}[∇(w·k3)] = ∇KL(π_θ‖π_ref) exactly at any θ for kl_level="sequence" (or one-token
    responses); per position with prefixes held at π_old for kl_level="token" (module docstring).
    """
    per_token, metrics = grpo_per_token_loss(logp, old_logp, ref_logp, advantages, mask=mask, beta=beta,
                                             clip=clip, kl_level=kl_level, importance_weighted_kl=True,
                                             aggregation=aggregation)
    return _finish(per_token, metrics, mask, aggregation, num_global_tokens, num_global_sequences)


def _finish(per_token, metrics, mask, aggregation, num_global_tokens, num_global_sequences):
    loss = aggregate(per_token, mask, aggregation, num_global_tokens=num_global_tokens,
                     num_global_sequences=num_global_sequences)
    metrics["loss"] = loss.detach()
    return loss, metrics
