"""Pure tensor math for the policy losses (no Megatron imports): RPG surrogates, clipping,
aggregation, KL estimators, and the enumeration tools that prove their gradients exact."""
from megatron_rpg.losses.aggregation import AGGREGATIONS, aggregate, aggregate_sum
from megatron_rpg.losses.clip import RPGClip
from megatron_rpg.losses.rpg import (DIVERGENCES, IS_LEVELS, STYLES, rpg_loss, rpg_loss_sum,
                                     rpg_per_token_loss)

__all__ = ["AGGREGATIONS", "DIVERGENCES", "IS_LEVELS", "STYLES", "RPGClip", "aggregate", "aggregate_sum",
           "rpg_loss", "rpg_loss_sum", "rpg_per_token_loss"]
# baselines/advantages exports are added below by their owner
