"""Pure tensor math for the policy losses (no Megatron imports): RPG surrogates, clipping,
aggregation, KL estimators, and the enumeration tools that prove their gradients exact."""
from megatron_rpg.losses.aggregation import AGGREGATIONS, aggregate, aggregate_sum
from megatron_rpg.losses.clip import RPGClip
from megatron_rpg.losses.rpg import (DIVERGENCES, IS_LEVELS, STYLES, rpg_loss, rpg_loss_sum,
                                     rpg_per_token_loss)

__all__ = ["AGGREGATIONS", "DIVERGENCES", "IS_LEVELS", "STYLES", "RPGClip", "aggregate", "aggregate_sum",
           "rpg_loss", "rpg_loss_sum", "rpg_per_token_loss"]
# baselines/advantages exports are added below by their owner
from megatron_rpg.losses.advantages import (ADVANTAGE_ESTIMATORS, batch_normalized_advantages,
                                            compute_advantages, dr_grpo_advantages, grpo_advantages,
                                            group_mean_advantages, reinforce_pp_advantages,
                                            reinforce_pp_token_rewards, rloo_advantages, token_returns)
from megatron_rpg.losses.baselines import (DAPO_CLIP, KL_LEVELS, PPO_CLIP, dapo, grpo, grpo_is_kl,
                                           grpo_per_token_loss, ppo_clip, ppo_clip_per_token_loss,
                                           reinforce_pp)

__all__ += ["ADVANTAGE_ESTIMATORS", "batch_normalized_advantages", "compute_advantages", "dr_grpo_advantages",
            "grpo_advantages", "group_mean_advantages", "reinforce_pp_advantages",
            "reinforce_pp_token_rewards", "rloo_advantages", "token_returns",
            "DAPO_CLIP", "KL_LEVELS", "PPO_CLIP", "dapo", "grpo", "grpo_is_kl", "grpo_per_token_loss",
            "ppo_clip", "ppo_clip_per_token_loss", "reinforce_pp"]
from megatron_rpg.losses.policy_loss import (LOSS_FIELDS, POLICY_LOSSES, DAPOLoss, GRPOLoss, LossConfig,
                                             LossInputs, PolicyLoss, PPOClipLoss, R2VPOLoss, ReinforcePPLoss,
                                             RPGLoss, build_policy_loss)
from megatron_rpg.losses.r2vpo import R2VPO_LEVELS, R2VPOConfig, dual_ascent, r2vpo_per_token_loss

__all__ += ["LOSS_FIELDS", "POLICY_LOSSES", "DAPOLoss", "GRPOLoss", "LossConfig", "LossInputs", "PolicyLoss",
            "PPOClipLoss", "R2VPOLoss", "ReinforcePPLoss", "RPGLoss", "build_policy_loss",
            "R2VPO_LEVELS", "R2VPOConfig", "dual_ascent", "r2vpo_per_token_loss"]
