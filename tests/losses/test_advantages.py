"""Advantage estimators against direct per-group loops, and their (un)biasedness by enumeration."""
import itertools
import math

import pytest
import torch

from megatron_rpg.losses.advantages import (ADVANTAGE_ESTIMATORS, batch_normalized_advantages,
                                            compute_advantages, dr_grpo_advantages, grpo_advantages,
                                            group_mean_advantages, reinforce_pp_advantages,
                                            reinforce_pp_token_rewards, rloo_advantages, token_returns)
from megatron_rpg.losses.exact import TabularPolicy, flat_grad, relative_error

EPS = 1e-6


def direct_advantages(estimator, rewards, group_ids):
    """Reference: one Python loop per prompt group, written from the formulas."""
    out = [0.0] * len(rewards)
    for gid in set(group_ids):
        members = [i for i, g in enumerate(group_ids) if g == gid]
        values = [rewards[i] for i in members]
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 1.0
        for i in members:
            if n == 1:  # a group of one has no baseline
                out[i] = rewards[i] / (1.0 + EPS) if estimator == "grpo" else rewards[i]
            elif estimator in ("rpg", "dr_grpo"):
                out[i] = rewards[i] - mean
            elif estimator == "grpo":
                out[i] = (rewards[i] - mean) / (std + EPS)
            elif estimator == "rloo":
                out[i] = rewards[i] - (sum(values) - rewards[i]) / (n - 1)
    return torch.tensor(out, dtype=torch.float64)


def mixed_batch():
    """Unsorted ids, groups of sizes 1, 2, 3, 4 and one all-equal group."""
    gen = torch.Generator().manual_seed(0)
    group_ids = [7, 2, 7, 9, 2, 5, 7, 11, 11, 11, 9, 9, 9]
    rewards = torch.randn(len(group_ids), generator=gen, dtype=torch.float64).tolist()
    for i, g in enumerate(group_ids):
        if g == 11:
            rewards[i] = 0.5  # all equal: GRPO's std is 0
    return rewards, group_ids


@pytest.mark.parametrize("estimator", ["rpg", "dr_grpo", "grpo", "rloo"])
def test_group_estimator_matches_a_direct_per_group_loop_with_unsorted_ids_singletons_and_ties(estimator):
    rewards, group_ids = mixed_batch()
    got = compute_advantages(estimator, torch.tensor(rewards, dtype=torch.float64),
                             torch.tensor(group_ids), eps=EPS)
    expected = direct_advantages(estimator, rewards, group_ids)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    tied = torch.tensor([g == 11 for g in group_ids])
    assert torch.equal(got[tied], torch.zeros(int(tied.sum()), dtype=torch.float64))


@pytest.mark.parametrize("function", [group_mean_advantages, dr_grpo_advantages, grpo_advantages,
                                      rloo_advantages])
def test_group_size_is_the_same_as_contiguous_group_ids(function):
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    by_size = function(rewards, group_size=4)
    by_ids = function(rewards, torch.arange(12) // 4)
    assert torch.equal(by_size, by_ids)
    # relabelling and permuting the batch permutes the advantages (up to summation-order rounding)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(2))
    permuted = function(rewards[perm], (torch.arange(12) // 4 * 13 + 5)[perm])
    assert torch.allclose(permuted, by_ids[perm], rtol=1e-12, atol=1e-15)


def test_batch_normalisation_matches_direct_mean_and_bessel_std_and_zeroes_the_padding():
    values = torch.randn(3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    kept = [float(v) for v, m in zip(values.flatten(), mask.flatten()) if m]
    mean = sum(kept) / len(kept)
    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / (len(kept) - 1))
    got = batch_normalized_advantages(values, mask, eps=EPS)
    expected = torch.where(mask, (values - mean) / (std + EPS), torch.zeros_like(values))
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14)
    rewards = values[0]
    assert torch.allclose(compute_advantages("batch_norm", rewards, group_size=1, eps=EPS),
                          (rewards - rewards.mean()) / (rewards.std() + EPS), rtol=1e-12)


def expected_group_gradient(estimator, group_size):
    """E over n i.i.d. draws from a K-outcome softmax of (1/n)·Σ_i A_i·∇log π(x_i), by enumeration."""
    policy = TabularPolicy(4, 1, seed=5)
    outcome_reward = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=torch.float64)
    logp = policy.sequence_logp()  # [K]
    tuples = torch.tensor(list(itertools.product(range(4), repeat=group_size)))  # [K**n, n]
    tuple_prob = logp.detach()[tuples].sum(dim=1).exp()
    advantages = compute_advantages(estimator, outcome_reward[tuples].flatten(), group_size=group_size)
    surrogate = (tuple_prob[:, None] * advantages.view_as(tuples) * logp[tuples]).sum() / group_size
    true_gradient = flat_grad((logp.exp() * outcome_reward).sum(), policy.params)
    return flat_grad(surrogate, policy.params), true_gradient


@pytest.mark.parametrize("group_size", [2, 3])
def test_rloo_is_unbiased_and_the_group_mean_scales_the_gradient_by_n_minus_1_over_n(group_size):
    rloo, true_gradient = expected_group_gradient("rloo", group_size)
    assert relative_error(rloo, true_gradient) <= 1e-12
    group_mean, _ = expected_group_gradient("rpg", group_size)
    assert relative_error(group_mean, (group_size - 1) / group_size * true_gradient) <= 1e-12
    assert relative_error(group_mean, true_gradient) >= 1.0 / group_size - 1e-9


def test_reinforce_pp_rewards_returns_and_advantages_match_a_direct_loop_with_left_padding():
    gen = torch.Generator().manual_seed(4)
    old_logp = -torch.rand(3, 5, generator=gen, dtype=torch.float64)
    ref_logp = -torch.rand(3, 5, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 0, 1, 0]])
    scores = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    beta, gamma = 0.05, 0.9
    rewards = reinforce_pp_token_rewards(scores, old_logp, ref_logp, mask, beta=beta)
    returns = token_returns(rewards, mask, gamma=gamma)
    expected_rewards = torch.zeros_like(old_logp)
    expected_returns = torch.zeros_like(old_logp)
    for b in range(3):
        positions = [t for t in range(5) if mask[b, t]]
        for t in positions:
            expected_rewards[b, t] = -beta * float(old_logp[b, t] - ref_logp[b, t])
        expected_rewards[b, positions[-1]] += float(scores[b])
        for k, t in enumerate(positions):
            expected_returns[b, t] = sum(gamma ** j * float(expected_rewards[b, s])
                                         for j, s in enumerate(positions[k:]))
    assert torch.allclose(rewards, expected_rewards, rtol=1e-13, atol=1e-15)
    assert torch.allclose(returns, expected_returns, rtol=1e-13, atol=1e-15)
    advantages = reinforce_pp_advantages(scores, old_logp, ref_logp, mask, beta=beta, gamma=gamma)
    assert torch.allclose(advantages, batch_normalized_advantages(expected_returns, mask), rtol=1e-12)


@pytest.mark.parametrize("call, argument", [
    (lambda: group_mean_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.long)), "group_ids"),
    (lambda: group_mean_advantages(torch.zeros(4), torch.zeros(4)), "group_ids"),
    (lambda: group_mean_advantages(torch.zeros(4)), "group_size"),
    (lambda: group_mean_advantages(torch.zeros(4), torch.zeros(4, dtype=torch.long), group_size=2),
     "group_size"),
    (lambda: grpo_advantages(torch.zeros(6), group_size=4), "group_size=4"),
    (lambda: rloo_advantages(torch.zeros(6), group_size=0), "group_size"),
    (lambda: rloo_advantages(torch.zeros(2, 3), group_size=3), "rewards"),
    (lambda: rloo_advantages(torch.tensor([1.0, float("nan")]), group_size=2), "rewards"),
    (lambda: grpo_advantages(torch.zeros(4), group_size=2, eps=0.0), "eps"),
    (lambda: compute_advantages("ppo", torch.zeros(4), group_size=2), "estimator"),
    (lambda: batch_normalized_advantages(torch.zeros(1)), "at least 2"),
    (lambda: token_returns(torch.zeros(2, 3), torch.ones(2, 3), gamma=1.5), "gamma"),
    (lambda: reinforce_pp_token_rewards(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3),
                                        torch.ones(2, 3), beta=-0.1), "beta"),
    (lambda: reinforce_pp_token_rewards(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3),
                                        torch.tensor([[1, 1, 0], [0, 0, 0]]), beta=0.1), "mask"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


def test_dispatch_by_name_calls_the_named_estimator():
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0, 2.0, 2.0])
    direct = {"rpg": group_mean_advantages(rewards, group_size=3),
              "dr_grpo": dr_grpo_advantages(rewards, group_size=3),
              "grpo": grpo_advantages(rewards, group_size=3),
              "rloo": rloo_advantages(rewards, group_size=3),
              "batch_norm": batch_normalized_advantages(rewards)}
    assert set(direct) == set(ADVANTAGE_ESTIMATORS)
    for name, expected in direct.items():
        assert torch.equal(compute_advantages(name, rewards, group_size=3), expected)


@pytest.mark.parametrize("estimator", ["rpg", "grpo", "rloo", "batch_norm"])
def test_float32_rewards_near_the_float32_maximum_give_finite_advantages_equal_to_the_float64_closed_form(estimator):
    """On main: the float32 group sums overflowed (3e38 + 3.2e38 = inf) and the advantages were NaN.
    Bound: one rounding of the float64 result to float32 (2^-24 relative) plus the float64 error,
    ≤ 2^-40 of the largest advantage (sums of ≤ 8 values: ≤ 2^-50 relative to the largest reward;
    the cancellation in R − mean loses < 6 bits here, min |R − mean| ≥ max |R| / 34)."""
    values = [3.0e38, 3.2e38, 3.4e38, 2.8e38, 1.0e38, 3.0e38, 3.4e38, 2.0e38]  # every A fits float32
    rewards = torch.tensor(values, dtype=torch.float32)
    exact_inputs = rewards.double().tolist()  # the float32 values themselves
    got = compute_advantages(estimator, rewards, group_size=4, eps=EPS)
    if estimator == "batch_norm":
        mean = sum(exact_inputs) / len(exact_inputs)
        std = math.sqrt(sum((v - mean) ** 2 for v in exact_inputs) / (len(exact_inputs) - 1))
        expected = torch.tensor([(v - mean) / (std + EPS) for v in exact_inputs], dtype=torch.float64)
    else:
        expected = direct_advantages(estimator, exact_inputs, [0, 0, 0, 0, 1, 1, 1, 1])
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    bound = 2.0**-24 * expected.abs() + 2.0**-40 * float(expected.abs().max())
    assert bool(((got.double() - expected).abs() <= bound).all()), (got, expected)
