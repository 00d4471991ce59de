"""The guard between a task's rewards and the advantages: a bad reward is a fault of one response,
never of the run.

    guarded = guard_rewards(rewards, minimum=task.reward_range[0], on_bad_reward="min")
    guarded.rewards   # float64 [n], finite, within ±REWARD_LIMIT
    guarded.keep      # bool [n]: False for a masked response (zero weight in the step)

- a non-finite reward (NaN, ±inf) is bad; per --on-bad-reward: `min` gives the response the task's
  minimum reward, `mask` masks it out (keep False; its stored reward is the minimum, unused),
  `error` raises ValueError naming the response;
- a finite reward beyond ±REWARD_LIMIT is clamped to it (counted): float32 then holds every
  advantage the estimators can make of such rewards (at most a few times the limit).
"""
from __future__ import annotations

import dataclasses

import torch

ON_BAD_REWARD = ("min", "mask", "error")
REWARD_LIMIT = 1e6


@dataclasses.dataclass
class GuardedRewards:
    rewards: torch.Tensor   # float64 [n]
    keep: torch.Tensor      # bool [n]: False = masked out
    bad: torch.Tensor       # bool [n]: the task's reward was NaN or ±inf
    clamped: torch.Tensor   # bool [n]: finite but beyond ±REWARD_LIMIT


def guard_rewards(rewards: torch.Tensor, *, minimum: float | None, on_bad_reward: str = "min") -> GuardedRewards:
    """Rewards [n] made safe for the advantages (module docstring). `minimum`: the task's lowest
    reward (None: the lowest finite reward of this batch, 0 if there is none)."""
    if on_bad_reward not in ON_BAD_REWARD:
        raise ValueError(f"on_bad_reward={on_bad_reward!r}; use one of {list(ON_BAD_REWARD)}")
    if minimum is not None and not abs(minimum) <= REWARD_LIMIT:  # NaN fails too
        raise ValueError(f"minimum={minimum} must be a finite reward within ±{REWARD_LIMIT:g} (the task's "
                         f"reward_range[0])")
    rewards = torch.as_tensor(rewards).to(torch.float64).flatten()
    bad = ~torch.isfinite(rewards)
    if on_bad_reward == "error" and bool(bad.any()):
        index = int(torch.nonzero(bad)[0])
        raise ValueError(f"the reward of response {index} (of {rewards.numel()} this draw) is "
                         f"{float(rewards[index])} ({int(bad.sum())} non-finite in all); --on-bad-reward "
                         f"error stops the run: fix the reward, or use --on-bad-reward min or mask")
    clamped = ~bad & (rewards.abs() > REWARD_LIMIT)
    if minimum is None:
        finite = rewards[~bad]
        minimum = float(finite.clamp(-REWARD_LIMIT, REWARD_LIMIT).min()) if finite.numel() else 0.0
    safe = torch.where(bad, torch.full_like(rewards, minimum), rewards.clamp(-REWARD_LIMIT, REWARD_LIMIT))
    keep = ~bad if on_bad_reward == "mask" else torch.ones_like(bad)
    return GuardedRewards(rewards=safe, keep=keep, bad=bad, clamped=clamped)
