"""DAPO math reward shaping and the dynamic-sampling filter (Yu et al. 2025; docs/algorithms.md,
Advantages and aggregation).

Reward of a response of length L (tokens) under a generation limit L_max and a soft buffer L_buf:

    R = (+1 if correct else −1) + min(−(L − (L_max − L_buf)) / L_buf, 0)

The overlong penalty is 0 up to L_max − L_buf, falls linearly to −1 at L = L_max, and keeps falling
linearly beyond L_max (the formula of docs/algorithms.md; the DAPO paper writes −1 there, which is the
same value at every length a generator truncated at L_max can produce).

Dynamic sampling: a prompt group whose rewards are all equal has a group-relative advantage of 0
for every response, so it contributes no gradient; DAPO drops such groups and draws more prompts
until the batch is full, for a bounded number of passes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_rpg.losses.advantages import group_index
from megatron_rpg.losses.validation import check_range

DEFAULT_OVERLONG_BUFFER = 512


def correctness_reward(correct: torch.Tensor) -> torch.Tensor:
    """+1 for a correct response, −1 for a wrong one; `correct` is a bool tensor [n], returns float32."""
    if correct.dtype != torch.bool:
        raise ValueError(f"correct must be a bool tensor (True = verified correct), got dtype {correct.dtype}")
    return correct.to(torch.float32) * 2.0 - 1.0


def overlong_penalty(lengths: torch.Tensor, *, max_length: int,
                     buffer_length: int = DEFAULT_OVERLONG_BUFFER) -> torch.Tensor:
    """min(−(L − (L_max − L_buf))/L_buf, 0) per response; lengths [n] integer token counts, float32 out."""
    check_range("max_length", max_length, 1)
    check_range("buffer_length", buffer_length, 1)
    if not buffer_length < max_length:
        raise ValueError(f"buffer_length={buffer_length} must be smaller than max_length={max_length} "
                         f"(the penalty starts at max_length − buffer_length)")
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor of token counts, got dtype {lengths.dtype}")
    if bool((lengths < 0).any()):
        raise ValueError(f"lengths must be ≥ 0, got minimum {int(lengths.min())}")
    # integer excess first, one division last: exact at the boundaries
    excess = (lengths - (max_length - buffer_length)).to(torch.float64)
    return torch.clamp(-excess / buffer_length, max=0.0).to(torch.float32)


def dapo_math_reward(correct: torch.Tensor, lengths: torch.Tensor, *, max_length: int,
                     buffer_length: int = DEFAULT_OVERLONG_BUFFER,
                     use_overlong_penalty: bool = True) -> torch.Tensor:
    """±1 correctness plus (optionally) the overlong penalty; [n] float32."""
    if correct.shape != lengths.shape:
        raise ValueError(f"correct has shape {tuple(correct.shape)} but lengths has shape "
                         f"{tuple(lengths.shape)}; pass one entry per response")
    reward = correctness_reward(correct)
    if use_overlong_penalty:
        reward = reward + overlong_penalty(lengths, max_length=max_length, buffer_length=buffer_length)
    return reward


def informative_group_indices(rewards: torch.Tensor, group_ids: torch.Tensor | None = None, *,
                              group_size: int | None = None, atol: float = 0.0) -> torch.Tensor:
    """Indices (ascending) of the responses whose prompt group's rewards are not all equal.

    "All equal" means max − min ≤ atol (0 by default: exact equality). A group of one is never
    informative (its spread is 0).
    """
    check_range("atol", atol, 0.0)
    inverse, counts = group_index(rewards, group_ids, group_size=group_size)
    num_groups = len(counts)
    fill_high = torch.full((num_groups,), float("inf"), dtype=rewards.dtype, device=rewards.device)
    group_min = fill_high.scatter_reduce(0, inverse, rewards, reduce="amin")
    group_max = (-fill_high).scatter_reduce(0, inverse, rewards, reduce="amax")
    keep = (group_max - group_min > atol)[inverse]
    return torch.nonzero(keep, as_tuple=False).flatten()


@dataclass
class DynamicSamplingResult:
    """Kept groups (each as the callback returned it), and what it cost to find them."""

    groups: list = field(default_factory=list)
    passes: int = 0
    drawn_groups: int = 0
    full: bool = False


def fill_with_informative_groups(draw: Callable[[int], Sequence[tuple[torch.Tensor, Any]]],
                                 target_groups: int, *, max_passes: int = 3, atol: float = 0.0,
                                 allow_partial: bool = False) -> DynamicSamplingResult:
    """DAPO's resampling loop: call `draw(k)` until `target_groups` informative groups are collected.

    `draw(k)` generates k more prompt groups and returns a list of (rewards [group size], payload)
    pairs; groups whose rewards are all equal (max − min ≤ atol) are dropped, surplus groups beyond
    the target are discarded. After `max_passes` calls without filling the batch it raises
    ValueError (or returns the partial batch with full=False if `allow_partial`).
    """
    check_range("target_groups", target_groups, 1)
    check_range("max_passes", max_passes, 1)
    check_range("atol", atol, 0.0)
    result = DynamicSamplingResult()
    while len(result.groups) < target_groups and result.passes < max_passes:
        drawn = list(draw(target_groups - len(result.groups)))
        result.passes += 1
        result.drawn_groups += len(drawn)
        for rewards, payload in drawn:
            rewards = torch.as_tensor(rewards)
            if rewards.dim() != 1 or rewards.numel() == 0:
                raise ValueError(f"draw() must return (rewards [group size], payload) pairs; got rewards "
                                 f"of shape {tuple(rewards.shape)}")
            if float(rewards.max() - rewards.min()) > atol and len(result.groups) < target_groups:
                result.groups.append((rewards, payload))
    result.full = len(result.groups) == target_groups
    if not result.full and not allow_partial:
        raise ValueError(f"dynamic sampling found only {len(result.groups)} of target_groups="
                         f"{target_groups} groups with unequal rewards after max_passes={max_passes} "
                         f"({result.drawn_groups} groups drawn); raise max_passes, lower the batch "
                         f"size, or use easier/harder prompts")
    return result
