"""megatron_rpg: Regularized Policy Gradient (RPG) and SVRPG reinforcement learning on megatron-core."""
__version__ = "0.1.0"
