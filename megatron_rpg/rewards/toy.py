"""Rewards of the synthetic tasks (data/synthetic.py): exact, cheap, and learnable by a tiny model."""
from __future__ import annotations

import torch


def match_fraction_reward(responses: list[list[int]], targets: list[int]) -> torch.Tensor:
    """R_i = fraction of response i's tokens equal to targets[i] (0 for an empty response), in [0, 1]."""
    if len(responses) != len(targets):
        raise ValueError(f"got {len(responses)} responses but {len(targets)} targets; pass one target "
                         f"per response")
    return torch.tensor([sum(token == target for token in response) / len(response) if response else 0.0
                         for response, target in zip(responses, targets)], dtype=torch.float64)
