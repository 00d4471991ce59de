"""megatron_rpg: Regularized Policy Gradient (RPG) and SVRPG reinforcement learning on megatron-core."""
from megatron_rpg.megatron.fallback_warnings import collapse_fallback_warnings

__version__ = "0.1.0"
collapse_fallback_warnings()  # megatron-core's six Apex/TE warnings -> one
