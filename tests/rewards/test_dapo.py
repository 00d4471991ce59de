"""DAPO reward shaping at the boundary lengths and the dynamic-sampling filter."""
import pytest
import torch

from megatron_rpg.rewards.dapo import (correctness_reward, dapo_math_reward, fill_with_informative_groups,
                                       informative_group_indices, overlong_penalty)

L_MAX, L_BUF = 4096, 512


def test_correct_is_plus_one_and_wrong_is_minus_one():
    correct = torch.tensor([True, False, True])
    assert torch.equal(correctness_reward(correct), torch.tensor([1.0, -1.0, 1.0]))


def test_overlong_penalty_is_zero_up_to_the_buffer_start_linear_inside_and_minus_one_at_the_limit():
    start = L_MAX - L_BUF
    lengths = torch.tensor([0, start - 1, start, start + 1, start + L_BUF // 2, L_MAX, L_MAX + L_BUF // 4])
    penalty = overlong_penalty(lengths, max_length=L_MAX, buffer_length=L_BUF)
    # the formula min(−(L − (L_max − L_buf))/L_buf, 0), evaluated in exact rational arithmetic
    formula = [min(-(int(length) - start) / L_BUF, 0.0) for length in lengths]
    assert penalty.tolist() == formula
    assert penalty[:3].tolist() == [0.0, 0.0, 0.0]       # no penalty up to and at L_max − L_buf
    assert float(penalty[5]) == -1.0                      # exactly −1 at L_max
    assert float(penalty[6]) < -1.0                       # keeps falling linearly beyond L_max
    assert bool((penalty[2:].diff() < 0).all())           # strictly decreasing inside the buffer


def test_dapo_math_reward_adds_the_penalty_to_the_correctness_reward_and_can_switch_it_off():
    correct = torch.tensor([True, False, True, False])
    lengths = torch.tensor([10, L_MAX - L_BUF + 128, L_MAX, L_MAX])
    reward = dapo_math_reward(correct, lengths, max_length=L_MAX, buffer_length=L_BUF)
    assert torch.equal(reward, correctness_reward(correct)
                       + overlong_penalty(lengths, max_length=L_MAX, buffer_length=L_BUF))
    assert reward.tolist() == [1.0, -1.25, 0.0, -2.0]
    plain = dapo_math_reward(correct, lengths, max_length=L_MAX, use_overlong_penalty=False)
    assert torch.equal(plain, correctness_reward(correct))


@pytest.mark.parametrize("call, argument", [
    (lambda: overlong_penalty(torch.tensor([1]), max_length=512, buffer_length=512), "buffer_length=512"),
    (lambda: overlong_penalty(torch.tensor([1]), max_length=100, buffer_length=0), "buffer_length"),
    (lambda: overlong_penalty(torch.tensor([1.0]), max_length=100, buffer_length=10), "lengths"),
    (lambda: overlong_penalty(torch.tensor([-1]), max_length=100, buffer_length=10), "lengths"),
    (lambda: correctness_reward(torch.tensor([1, 0])), "correct"),
    (lambda: dapo_math_reward(torch.tensor([True]), torch.tensor([1, 2]), max_length=100), "lengths"),
    (lambda: informative_group_indices(torch.zeros(3), group_size=2), "group_size"),
    (lambda: informative_group_indices(torch.zeros(3), torch.zeros(3, dtype=torch.long), atol=-1.0),
     "atol"),
    (lambda: fill_with_informative_groups(lambda k: [], 4, max_passes=0), "max_passes"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


def test_filter_keeps_exactly_the_groups_whose_rewards_are_not_all_equal_with_unsorted_ids():
    group_ids = torch.tensor([4, 1, 4, 9, 1, 3, 9, 4, 1, 6, 6])
    rewards = torch.tensor([1.0, -1.0, 1.0, 0.5, -1.0, 1.0, -0.5, -1.0, -1.0, 0.25, 0.25])
    kept = informative_group_indices(rewards, group_ids)
    expected = [i for i, g in enumerate(group_ids.tolist())
                if len({float(rewards[j]) for j in range(len(rewards)) if int(group_ids[j]) == g}) > 1]
    assert kept.tolist() == expected == [0, 2, 3, 6, 7]   # groups 4 and 9; 1, 6 tied, 3 a singleton
    # with a tolerance, a spread of 1.0 (group 9) no longer counts as informative
    assert informative_group_indices(rewards, group_ids, atol=1.0).tolist() == [0, 2, 7]
    by_size = informative_group_indices(torch.tensor([1.0, 1.0, 0.0, 1.0, -1.0, -1.0]), group_size=2)
    assert by_size.tolist() == [2, 3]


def scripted_draw(batches):
    """A generator stand-in that returns the next scripted list of groups on each call."""
    calls = []

    def draw(k):
        calls.append(k)
        return batches[len(calls) - 1]
    return draw, calls


def test_resampling_collects_informative_groups_until_full_and_drops_the_surplus():
    tied, mixed = torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0])
    draw, calls = scripted_draw([[(tied, "a"), (mixed, "b"), (tied, "c")],
                                 [(mixed, "d"), (mixed, "e"), (mixed, "f")]])
    result = fill_with_informative_groups(draw, 3, max_passes=5)
    assert [payload for _, payload in result.groups] == ["b", "d", "e"]
    assert calls == [3, 2]                      # asks only for what is still missing
    assert (result.passes, result.drawn_groups, result.full) == (2, 6, True)


def test_resampling_is_bounded_and_raises_or_returns_the_partial_batch():
    tied, mixed = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="max_passes=2"):
        fill_with_informative_groups(scripted_draw([[(tied, 0)], [(mixed, 1)], [(mixed, 2)]])[0], 2,
                                     max_passes=2)
    draw, calls = scripted_draw([[(tied, 0), (mixed, 1)], [(tied, 2)], [(mixed, 3)]])
    result = fill_with_informative_groups(draw, 3, max_passes=2, allow_partial=True)
    assert [payload for _, payload in result.groups] == [1]
    assert (result.passes, len(calls), result.full) == (2, 2, False)
