"""rewards/guard.py: a NaN/inf reward is one response's fault (min, mask or error); finite rewards
beyond ±REWARD_LIMIT are clamped; the result is float64, finite, and counted."""
from __future__ import annotations

import pytest
import torch

from megatron_rpg.rewards.guard import ON_BAD_REWARD, REWARD_LIMIT, guard_rewards

RAW = torch.tensor([0.5, float("nan"), 1e300, float("-inf"), -1e300, 0.25, float("inf"), 1.0], dtype=torch.float64)
BAD = [False, True, False, True, False, False, True, False]


def test_min_gives_each_bad_response_the_minimum_and_clamps_the_rest():
    guarded = guard_rewards(RAW, minimum=-2.0, on_bad_reward="min")
    assert guarded.rewards.dtype == torch.float64
    assert guarded.rewards.tolist() == [0.5, -2.0, REWARD_LIMIT, -2.0, -REWARD_LIMIT, 0.25, -2.0, 1.0]
    assert guarded.bad.tolist() == BAD and guarded.keep.all()
    assert guarded.clamped.tolist() == [False, False, True, False, True, False, False, False]


def test_mask_marks_the_bad_responses_and_keeps_every_stored_value_finite():
    guarded = guard_rewards(RAW, minimum=0.0, on_bad_reward="mask")
    assert guarded.keep.tolist() == [not bad for bad in BAD]
    assert bool(torch.isfinite(guarded.rewards).all())


def test_without_a_stated_minimum_the_lowest_finite_reward_of_the_batch_is_used():
    assert guard_rewards(RAW, minimum=None).rewards[1] == -REWARD_LIMIT
    assert guard_rewards(torch.tensor([float("nan")] * 2), minimum=None).rewards.tolist() == [0.0, 0.0]


def test_error_names_the_first_bad_response_and_the_flag():
    named = r"response 1 \(of 8 this draw\) is nan \(3 non-finite in all\).*--on-bad-reward"
    with pytest.raises(ValueError, match=named):
        guard_rewards(RAW, minimum=0.0, on_bad_reward="error")
    finite = guard_rewards(RAW.nan_to_num(0.0, 0.0, 0.0), minimum=0.0, on_bad_reward="error")
    assert not finite.bad.any()


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="on_bad_reward='drop'"):
        guard_rewards(RAW, minimum=0.0, on_bad_reward="drop")
    assert ON_BAD_REWARD == ("min", "mask", "error")
    for minimum in (float("nan"), float("-inf"), -2 * REWARD_LIMIT):
        with pytest.raises(ValueError, match="minimum="):
            guard_rewards(RAW, minimum=minimum)

