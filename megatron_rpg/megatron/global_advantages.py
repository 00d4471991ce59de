"""batch_norm advantages over the global batch: the mean and std of the rewards of every DP rank.

    A_i = (R_i − mean)/(std + eps),  mean = Σ_kept R / N,  std² = Σ_kept (R − mean)² / (N − 1)

over the N kept responses of all DP ranks (two all-reduces over the DP group, in float64); responses
not kept (dynamic sampling's uninformative filler groups) get A = 0 and do not enter the statistics.
The formula is losses/advantages.standardize's; this is only its DP reduction.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_rpg.losses.advantages import standardize
from megatron_rpg.megatron.parallel import training_device


def _dp_sum(values: torch.Tensor) -> torch.Tensor:
    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) == 1:
        return values
    reduced = values.to(training_device())  # NCCL reduces CUDA tensors
    dist.all_reduce(reduced, group=group)
    return reduced.cpu()


def global_batch_norm_advantages(rewards: torch.Tensor, keep: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """This rank's advantages [n] (float64) from its rewards [n] and keep mask [n], normalised with
    the statistics of the kept rewards of every DP rank; all zero when no rank kept any."""
    rewards, keep = rewards.double(), keep.bool()
    count, total = _dp_sum(torch.stack([keep.sum().double(), rewards[keep].sum()])).tolist()
    if count == 0:
        return torch.zeros_like(rewards)
    if count < 2:
        raise ValueError(f"batch normalisation needs at least 2 rewards over the global batch to estimate a "
                         f"std, got {int(count)}; use more prompts or samples per prompt, or a group estimator")
    mean = total / count
    squares = _dp_sum((rewards[keep] - mean).square().sum().reshape(1))
    std = (squares[0] / (count - 1)).sqrt()
    return standardize(rewards, torch.tensor(mean, dtype=torch.float64), std, keep, eps=eps)
