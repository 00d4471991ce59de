"""Policy losses as objects: one seam between the trainer's forward-backward and the loss math.

    loss = build_policy_loss(LossConfig(name="grpo", beta=0.04))        # or GRPOLoss(beta=0.04)
    loss_sum, count, metrics = loss(LossInputs(logp, old_logp, advantages, mask, ref_logp=ref))

Every loss returns megatron's per-token-loss pair (loss_sum, count) (aggregation.py): the loss of a
global batch is Σ loss_sum / Σ count over its micro-batches and data-parallel ranks, exact for each
aggregation. `metrics` are detached means over the loss's `metric_units` ("token": response tokens;
"sequence": sequences with ≥ 1 response token), "*_max" entries maxima.

| name | object | computes | exactness (proved in tests/losses) |
|---|---|---|---|
| rpg | RPGLoss | rpg.rpg_per_token_loss | −∇J: sequence level, no clip, any θ; token level at θ_old (rpg.py) |
| grpo | GRPOLoss | baselines.grpo_per_token_loss | its KL gradient targets the forward KL (baselines.py) |
| grpo_is_kl | GRPOLoss(importance_weighted_kl=True) | the same with β·w·k3 | the KL gradient is ∇KL(π_θ‖π_ref) |
| dapo | DAPOLoss | PPO-clip, clip-higher, token-mean only | on-policy REINFORCE at θ = θ_old |
| ppo_clip | PPOClipLoss | baselines.ppo_clip_per_token_loss | on-policy REINFORCE at θ = θ_old |
| reinforce_pp | ReinforcePPLoss | PPO-clip on per-token advantages [batch, seq] | as ppo_clip, KL folded into the advantages |
| r2vpo | R2VPOLoss | r2vpo.r2vpo_per_token_loss, λ by dual ascent in after_step | the Lagrangian's gradient at any θ (sequence level); χ² (r2vpo.py) |

Each object's loss_sum / count equals its function's aggregated loss bit for bit (same operations).
With `LossInputs.rollout_is_weight` (--rollout-is-correction) every object multiplies its whole
per-token loss, policy and KL/penalty terms alike, by that detached weight before aggregating
(`_weighted`); wrappers (SVRPG's SnapshotLoss, CAPOLoss) call the inner object's per_token_loss and
so apply it exactly once.
`LossConfig` is the flat, frozen description the trainer builds from its flags; `LOSS_FIELDS` names
the fields each loss reads (a field set away from its default that the loss does not read is an
error in build_policy_loss, and a flag error in the trainer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from megatron_rpg.losses.aggregation import AGGREGATIONS, aggregate_sum
from megatron_rpg.losses.baselines import (DAPO_CLIP, KL_LEVELS, PPO_CLIP, grpo_per_token_loss,
                                           ppo_clip_per_token_loss)
from megatron_rpg.losses.clip import RPGClip
from megatron_rpg.losses.r2vpo import R2VPOConfig, dual_ascent, r2vpo_per_token_loss
from megatron_rpg.losses.rollout_is import apply_rollout_is_weight
from megatron_rpg.losses.rpg import DIVERGENCES, IS_LEVELS, STYLES, rpg_per_token_loss
from megatron_rpg.losses.validation import check_choice, check_range

METRIC_UNITS = ("token", "sequence")
RPG_DEFAULT_CLIP = RPGClip(eps_low=0.2, eps_high=0.28, dual_clip=10.0)  # the paper's runs


@dataclass
class LossInputs:
    """One micro-batch's tensors, [batch, seq] aligned per token (advantages [batch] or [batch, seq]).

    logp carries gradient; old_logp (behaviour policy), ref_logp (None: π_ref = π_old) and
    engine_logp (the rollout engine's own log-probs, None if not kept) are detached inputs; mask marks
    response tokens (None: all). It will carry more for losses that need it (final hidden states or
    logits for CAPO's curvature-aware masking)."""

    logp: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    engine_logp: torch.Tensor | None = None
    staleness: torch.Tensor | None = None  # [batch] steps since each row was sampled (None: all 0)
    # [batch, seq] the rollout IS correction's detached weight ŵ (losses/rollout_is.py; None: off):
    # every loss here multiplies its whole per-token loss by it (docs/algorithms.md, rollout IS)
    rollout_is_weight: torch.Tensor | None = None
    # for a loss with `needs_hidden_states` (CAPO), on the fused output layer: the final hidden states
    # [batch, seq, H] (position t predicts tokens[t + 1]), this rank's output weight [V/TP, H], the tokens
    hidden: torch.Tensor | None = None
    output_weight: torch.Tensor | None = None
    tokens: torch.Tensor | None = None


class PolicyLoss:
    """Base of the loss objects: `per_token_loss(inputs) -> ([batch, seq] loss, metrics)`, aggregated
    by `__call__` into (loss_sum, count, metrics) with `aggregate_sum(per_token, mask, aggregation)`.

    after_step(global_metrics) runs once per RL step, after its optimizer steps, with the step's
    global metrics, and returns metrics of its own (for losses with state, e.g. a Lagrange
    multiplier); state_dict() / load_state_dict() are that state's interface (the trainer's
    checkpoints store it in trainer_state.json: R2VPOLoss's λ)."""

    name: str = ""
    aggregation: str = "token-mean"

    @property
    def metric_units(self) -> str:
        """What the metrics are means over: "token" (response tokens) or "sequence"."""
        return "token"

    def per_token_loss(self, inputs: LossInputs) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError(f"{type(self).__name__} must define per_token_loss(inputs)")

    def __call__(self, inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor, dict]:
        per_token, metrics = self.per_token_loss(inputs)
        loss_sum, count = aggregate_sum(per_token, inputs.mask, self.aggregation)
        return loss_sum, count, metrics

    def after_step(self, global_metrics: dict) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}; the checkpoint "
                             f"was written with another loss")


def _weighted(inputs: LossInputs, result: tuple[torch.Tensor, dict]) -> tuple[torch.Tensor, dict]:
    """(ŵ·per_token, metrics): the rollout IS weight on a loss function's (per_token, metrics)."""
    per_token, metrics = result
    return apply_rollout_is_weight(per_token, inputs.rollout_is_weight), metrics


def _check_clip(loss_name: str, clip, allow_none: bool) -> None:
    if clip is None and allow_none:
        return
    if not isinstance(clip, RPGClip):
        extra = " or None (no clip)" if allow_none else " (it is defined with a clip)"
        raise ValueError(f"{loss_name}: clip={clip!r} must be an RPGClip(eps_low, eps_high, dual_clip){extra}")


@dataclass
class RPGLoss(PolicyLoss):
    """RPG (rpg.py's module docstring has the formulas): differentiable L = −w·R + β·T or REINFORCE
    L = −sg(ψ)·ℓ, ψ = w·R − β·K, with w the token (is_level="token") or sequence importance weight.
    clip: an RPGClip (RPG-Style Clip, Algorithm 1 or 2 by style), or None: no clip, the exact
    unclipped surrogate. kl_in_advantage: β·KL inside the clipped advantage (the paper) or outside;
    kl_clamp: clamp of the per-sample KL value (None: off)."""

    divergence: str = "urkl"
    style: str = "differentiable"
    beta: float = 1e-4
    is_level: str = "token"
    clip: RPGClip | None = None
    aggregation: str = "token-mean"
    kl_in_advantage: bool = True
    kl_clamp: float | None = None
    name = "rpg"

    def __post_init__(self):
        check_choice("divergence", self.divergence, DIVERGENCES)
        check_choice("style", self.style, STYLES)
        check_choice("is_level", self.is_level, IS_LEVELS)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        check_range("beta", self.beta, 0.0)
        _check_clip("rpg", self.clip, allow_none=True)
        if self.kl_clamp is not None:
            check_range("kl_clamp", self.kl_clamp, 0.0, low_inclusive=False)

    @property
    def metric_units(self) -> str:
        return "token" if self.is_level == "token" else "sequence"

    def per_token_loss(self, inputs):
        return _weighted(inputs, rpg_per_token_loss(
            inputs.logp, inputs.old_logp, inputs.advantages, divergence=self.divergence, style=self.style,
            beta=self.beta, ref_logp=inputs.ref_logp, mask=inputs.mask, is_level=self.is_level,
            clip=self.clip, aggregation=self.aggregation, kl_in_advantage=self.kl_in_advantage,
            kl_clamp=self.kl_clamp))


@dataclass
class GRPOLoss(PolicyLoss):
    """GRPO: PPO-clip per token + β·k3(log π_ref − log π_θ) (importance_weighted_kl=False, "grpo":
    the original, whose KL gradient targets KL(π_ref‖π_θ)) or + β·w·k3 ("grpo_is_kl": exact
    ∇KL(π_θ‖π_ref)); per token or per sequence (kl_level). baselines.py has the claims."""

    beta: float = 0.04
    clip: RPGClip = PPO_CLIP
    kl_level: str = "token"
    aggregation: str = "seq-mean-token-mean"
    importance_weighted_kl: bool = False

    def __post_init__(self):
        check_range("beta", self.beta, 0.0)
        check_choice("kl_level", self.kl_level, KL_LEVELS)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        _check_clip(self.name, self.clip, allow_none=False)

    @property
    def name(self) -> str:
        return "grpo_is_kl" if self.importance_weighted_kl else "grpo"

    def per_token_loss(self, inputs):
        return _weighted(inputs, grpo_per_token_loss(
            inputs.logp, inputs.old_logp, inputs.ref_logp, inputs.advantages, mask=inputs.mask,
            beta=self.beta, clip=self.clip, kl_level=self.kl_level,
            importance_weighted_kl=self.importance_weighted_kl, aggregation=self.aggregation))


@dataclass
class PPOClipLoss(PolicyLoss):
    """PPO-clip per token: max(−A·w_t, −A·clip(w_t, 1−ε_low, 1+ε_high)), optional dual clip; no KL."""

    clip: RPGClip = PPO_CLIP
    aggregation: str = "token-mean"
    name = "ppo_clip"

    def __post_init__(self):
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        _check_clip(self.name, self.clip, allow_none=False)

    def per_token_loss(self, inputs):
        return _weighted(inputs, ppo_clip_per_token_loss(inputs.logp, inputs.old_logp, inputs.advantages,
                                                         mask=inputs.mask, clip=self.clip,
                                                         aggregation=self.aggregation))


@dataclass
class DAPOLoss(PPOClipLoss):
    """DAPO: PPO-clip with clip-higher (ε_low 0.2, ε_high 0.28), token-mean over the global batch
    (by definition: not a parameter), no KL term."""

    clip: RPGClip = DAPO_CLIP
    aggregation: str = field(default="token-mean", init=False)
    name = "dapo"


@dataclass
class ReinforcePPLoss(PPOClipLoss):
    """REINFORCE++'s loss side: PPO-clip on per-token advantages [batch, seq] (the k1 KL is already in
    them: advantages.reinforce_pp_advantages); no KL term here. `beta` is that KL's coefficient, kept
    for whoever builds the advantages (the trainer: training/rollouts.attach_token_advantages)."""

    beta: float = 1e-4
    name = "reinforce_pp"

    def __post_init__(self):
        super().__post_init__()
        check_range("beta", self.beta, 0.0)

    def per_token_loss(self, inputs):
        if inputs.advantages.dim() != 2:
            raise ValueError(f"loss 'reinforce_pp' takes per-token advantages [batch, seq] (from "
                             f"reinforce_pp_advantages), got shape {tuple(inputs.advantages.shape)}")
        return super().per_token_loss(inputs)


@dataclass
class R2VPOLoss(PolicyLoss):
    """R²VPO (r2vpo.py has the formulas): ℓ_unit = −w·A + λ·((w − 1)² − δ), no clip; λ starts at
    config.lambda_init and after each RL step moves by projected dual ascent on the step's global
    Var̂(w) (the "r2vpo/ratio_var" metric): λ ← max(0, λ + η_λ·(Var̂ − δ)). State: {"lambda": λ}."""

    config: R2VPOConfig = R2VPOConfig()
    aggregation: str = "token-mean"
    name = "r2vpo"

    def __post_init__(self):
        if not isinstance(self.config, R2VPOConfig):
            raise ValueError(f"r2vpo: config={self.config!r} must be an R2VPOConfig")
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        self.multiplier = float(self.config.lambda_init)

    @property
    def metric_units(self) -> str:
        return self.config.level

    def per_token_loss(self, inputs):
        return _weighted(inputs, r2vpo_per_token_loss(inputs.logp, inputs.old_logp, inputs.advantages,
                                                      multiplier=self.multiplier, config=self.config,
                                                      mask=inputs.mask, staleness=inputs.staleness))

    def after_step(self, global_metrics: dict) -> dict:
        if "r2vpo/ratio_var" not in global_metrics:
            raise ValueError(f"r2vpo: after_step needs the step's global 'r2vpo/ratio_var' metric, got "
                             f"{sorted(global_metrics)}")
        used = self.multiplier
        self.multiplier = dual_ascent(used, float(global_metrics["r2vpo/ratio_var"]), self.config.delta,
                                      self.config.dual_lr)
        return {"r2vpo/lambda": used, "r2vpo/lambda_next": self.multiplier}

    def state_dict(self) -> dict:
        return {"lambda": self.multiplier}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"lambda"}:
            raise ValueError(f"r2vpo: the checkpoint's loss state is {sorted(state)}, not R²VPO's ['lambda'] "
                             f"(it was written with another loss); resume with that loss, or --finetune")
        value = float(state["lambda"])
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"r2vpo: the checkpoint's λ = {value} is not a finite number >= 0")
        self.multiplier = value


@dataclass(frozen=True)
class LossConfig:
    """The loss a trainer asks for, flat (one field per flag); build_policy_loss turns it into an object.

    clip: an RPGClip, or None for THE LOSS'S OWN DEFAULT clip: rpg RPG_DEFAULT_CLIP (0.2, 0.28, c = 10),
    grpo/grpo_is_kl/ppo_clip/reinforce_pp PPO_CLIP (0.2, 0.2), dapo DAPO_CLIP (0.2, 0.28).
    no_clip=True: rpg without any clip (the exact unclipped surrogate); clip must then be None, and the
    baselines refuse it (they are defined with their clip). kl_level is GRPO's; the other fields are
    RPGLoss's; r2vpo is R2VPOLoss's settings (with aggregation). LOSS_FIELDS[name] lists the fields
    each loss reads."""

    name: str = "rpg"
    divergence: str = "urkl"
    style: str = "differentiable"
    beta: float = 1e-4
    aggregation: str = "token-mean"
    is_level: str = "token"
    clip: RPGClip | None = None
    no_clip: bool = False
    kl_in_advantage: bool = True
    kl_clamp: float | None = None
    kl_level: str = "token"
    r2vpo: R2VPOConfig = R2VPOConfig()


_GRPO_FIELDS = frozenset({"beta", "clip", "kl_level", "aggregation"})
_PPO_FIELDS = frozenset({"clip", "aggregation"})
LOSS_FIELDS: dict[str, frozenset[str]] = {
    "rpg": frozenset({"divergence", "style", "beta", "is_level", "clip", "no_clip", "aggregation",
                      "kl_in_advantage", "kl_clamp"}),
    "grpo": _GRPO_FIELDS,
    "grpo_is_kl": _GRPO_FIELDS,
    "dapo": _PPO_FIELDS,  # aggregation: token-mean only (anything else is refused)
    "ppo_clip": _PPO_FIELDS,
    "reinforce_pp": _PPO_FIELDS | {"beta"},  # beta: the k1 coefficient of its token rewards
    "r2vpo": frozenset({"r2vpo", "aggregation"}),
}
POLICY_LOSSES = tuple(LOSS_FIELDS)


def build_policy_loss(config: LossConfig) -> PolicyLoss:
    """The PolicyLoss `config` describes; ValueError naming a field the loss does not read that is set
    away from its default, or a value the loss refuses."""
    if not isinstance(config, LossConfig):
        raise ValueError(f"build_policy_loss takes a LossConfig, got {type(config).__name__}")
    check_choice("loss", config.name, POLICY_LOSSES)
    reads = LOSS_FIELDS[config.name]
    unused = sorted(f.name for f in fields(config)
                    if f.name != "name" and f.name not in reads and getattr(config, f.name) != f.default)
    if unused:
        raise ValueError(f"loss {config.name!r} does not read {unused} (set away from the default); it "
                         f"reads {sorted(reads)}: drop them")
    if config.name == "rpg":
        if config.no_clip and config.clip is not None:
            raise ValueError(f"no_clip=True with clip={config.clip!r}: choose one")
        clip = None if config.no_clip else config.clip or RPG_DEFAULT_CLIP
        return RPGLoss(divergence=config.divergence, style=config.style, beta=config.beta,
                       is_level=config.is_level, clip=clip, aggregation=config.aggregation,
                       kl_in_advantage=config.kl_in_advantage, kl_clamp=config.kl_clamp)
    if config.name in ("grpo", "grpo_is_kl"):
        return GRPOLoss(beta=config.beta, clip=config.clip or PPO_CLIP, kl_level=config.kl_level,
                        aggregation=config.aggregation, importance_weighted_kl=config.name == "grpo_is_kl")
    if config.name == "dapo":
        if config.aggregation != "token-mean":
            raise ValueError(f"loss 'dapo' is defined with token-mean aggregation, got "
                             f"{config.aggregation!r}; use loss 'ppo_clip' for another aggregation")
        return DAPOLoss(clip=config.clip or DAPO_CLIP)
    if config.name == "r2vpo":
        return R2VPOLoss(config=config.r2vpo, aggregation=config.aggregation)
    if config.name == "reinforce_pp":
        return ReinforcePPLoss(clip=config.clip or PPO_CLIP, aggregation=config.aggregation, beta=config.beta)
    return PPOClipLoss(clip=config.clip or PPO_CLIP, aggregation=config.aggregation)
