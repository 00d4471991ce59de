"""Any policy loss by name, in the (loss_sum, count, metrics) form of megatron's per-token-loss
contract (aggregation.py), so the RL forward-backward runs RPG and the baselines alike:

    loss_sum, count, metrics = policy_loss_sum(logp, old_logp, advantages, loss="grpo", beta=0.04, ...)

| loss | function | its keyword arguments (defaults as there) |
|---|---|---|
| rpg | rpg.rpg_loss_sum | divergence, style, beta, is_level, clip, aggregation, kl_in_advantage, kl_clamp |
| grpo | baselines.grpo_per_token_loss | beta, clip, kl_level, aggregation (default seq-mean-token-mean) |
| grpo_is_kl | the same with importance_weighted_kl=True | as grpo |
| dapo | baselines.ppo_clip_per_token_loss, clip-higher | clip (default 0.2/0.28); token-mean only |
| ppo_clip | baselines.ppo_clip_per_token_loss | clip (default 0.2), aggregation |
| reinforce_pp | PPO-clip on per-token advantages [batch, seq] (advantages.reinforce_pp_advantages) | clip, aggregation |
The exactness claims are those of each function (their docstrings, tests/losses).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_rpg.losses.aggregation import aggregate_sum
from megatron_rpg.losses.baselines import DAPO_CLIP, PPO_CLIP, grpo_per_token_loss, ppo_clip_per_token_loss
from megatron_rpg.losses.rpg import rpg_loss_sum
from megatron_rpg.losses.validation import check_choice

POLICY_LOSSES = ("rpg", "grpo", "grpo_is_kl", "dapo", "ppo_clip", "reinforce_pp")
_ACCEPTED = {
    "rpg": {"divergence", "style", "beta", "is_level", "clip", "aggregation", "kl_in_advantage", "kl_clamp"},
    "grpo": {"beta", "clip", "kl_level", "aggregation"},
    "grpo_is_kl": {"beta", "clip", "kl_level", "aggregation"},
    "dapo": {"clip", "aggregation"},
    "ppo_clip": {"clip", "aggregation"},
    "reinforce_pp": {"clip", "aggregation"},
}


# TEMPORARY (coordinator's branch, replaced by the loss-object seam at merge)
LOSS_FIELDS = {name: frozenset(fields) for name, fields in _ACCEPTED.items()}


@dataclass(frozen=True)
class LossConfig:
    name: str = "rpg"
    divergence: str = "urkl"
    style: str = "differentiable"
    beta: float = 1e-4
    aggregation: str = "token-mean"
    is_level: str = "token"
    clip: object = None
    kl_in_advantage: bool = True
    kl_clamp: float | None = None
    kl_level: str = "token"


def policy_loss_sum(logp, old_logp, advantages, *, loss: str = "rpg", ref_logp=None, mask=None, **kwargs):
    """(loss_sum, count, metrics) of the named loss; ValueError naming an argument the loss does not take."""
    check_choice("loss", loss, POLICY_LOSSES)
    unknown = sorted(set(kwargs) - _ACCEPTED[loss])
    if unknown:
        raise ValueError(f"loss={loss!r} does not take {unknown}; it takes {sorted(_ACCEPTED[loss])}")
    if loss == "rpg":
        return rpg_loss_sum(logp, old_logp, advantages, ref_logp=ref_logp, mask=mask, **kwargs)
    if loss in ("grpo", "grpo_is_kl"):
        aggregation = kwargs.pop("aggregation", "seq-mean-token-mean")
        kwargs.setdefault("clip", PPO_CLIP)
        per_token, metrics = grpo_per_token_loss(logp, old_logp, ref_logp, advantages, mask=mask,
                                                 importance_weighted_kl=loss == "grpo_is_kl",
                                                 aggregation=aggregation, **kwargs)
    else:
        aggregation = kwargs.get("aggregation", "token-mean")
        if loss == "dapo" and aggregation != "token-mean":
            raise ValueError(f"loss='dapo' is defined with token-mean aggregation, got {aggregation!r}; "
                             f"use loss='ppo_clip' for another aggregation")
        if loss == "reinforce_pp" and advantages.dim() != 2:
            raise ValueError(f"loss='reinforce_pp' takes per-token advantages [batch, seq] (from "
                             f"reinforce_pp_advantages), got shape {tuple(advantages.shape)}")
        clip = kwargs.get("clip", DAPO_CLIP if loss == "dapo" else PPO_CLIP)
        per_token, metrics = ppo_clip_per_token_loss(logp, old_logp, advantages, mask=mask, clip=clip,
                                                     aggregation=aggregation)
    loss_sum, count = aggregate_sum(per_token, mask, aggregation)
    return loss_sum, count, metrics
