"""The evaluation statistics (training/eval_metrics.py) against exact references.

Properties proved:
- pass@k equals the closed form 1 − C(n − c, k)/C(n, k) in exact rational arithmetic, for every
  (n ≤ 12, c, k), within a bound derived from the float64 computation;
- it equals the fraction of k-subsets of the n responses that hold a correct one, by enumerating
  every subset of every correct/incorrect pattern (n ≤ 7);
- it stays exact where the binomials overflow a float64 (n = 2000) and keeps its relative precision
  when pass@k is tiny (c = 1, k = 1 of n = 10^6);
- Mean@K is the mean over prompts of c/K, on known counts; pass@1 = Mean@K;
- eval_summary reports the reward, length and truncation means over every response.
"""
from __future__ import annotations

import itertools
import math
import sys
from fractions import Fraction

import pytest
import torch

from megatron_rpg.training.eval_metrics import COLUMNS, eval_summary, pass_at_k, pass_at_k_values

U = sys.float_info.epsilon / 2  # float64 unit roundoff


def _exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def _bound(n: int, c: int, k: int) -> float:
    """|computed − exact| for −expm1(Σ of c terms log1p(−k/i)): each term carries ≤ 2u relative error
    (the division, log1p), fsum adds ≤ u, expm1 ≤ u of its result; the sum's error δS moves the result
    by exp(S)·δS = (1 − p)·δS. With a factor 4 of slack."""
    p = float(_exact(n, c, k))
    if p == 1.0:
        return 0.0
    s = abs(math.log1p(-p))
    return 4 * ((3 * U * s) * (1 - p) + 2 * U * p)


@pytest.mark.parametrize("n", range(1, 13))
def test_pass_at_k_equals_the_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert abs(pass_at_k(n, c, k) - float(_exact(n, c, k))) <= _bound(n, c, k) + U, (n, c, k)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_is_the_fraction_of_k_subsets_holding_a_correct_response(n):
    for pattern in itertools.product((False, True), repeat=n):
        c = sum(pattern)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            hit = Fraction(sum(any(pattern[i] for i in subset) for subset in subsets), len(subsets))
            assert hit == _exact(n, c, k)
            assert abs(pass_at_k(n, c, k) - float(hit)) <= _bound(n, c, k) + U


@pytest.mark.parametrize("n, c, k", [(2000, 3, 1000), (2000, 1000, 17), (2000, 0, 5), (2000, 1999, 2)])
def test_pass_at_k_is_exact_where_the_binomials_overflow_a_float(n, c, k):
    assert math.comb(n, n // 2) > sys.float_info.max  # a ratio of float binomials would overflow here
    assert abs(pass_at_k(n, c, k) - float(_exact(n, c, k))) <= _bound(n, c, k) + U


def test_a_tiny_pass_at_k_keeps_its_relative_precision():
    n = 10 ** 6
    assert abs(pass_at_k(n, 1, 1) / 1e-6 - 1) <= 8 * U  # 1 − (1 − k/n): no cancellation


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)


def test_the_reported_k_are_powers_of_two_and_the_sample_count():
    assert pass_at_k_values(1) == []
    assert pass_at_k_values(8) == [2, 4, 8]
    assert pass_at_k_values(32) == [2, 4, 8, 16, 32]
    assert pass_at_k_values(12) == [2, 4, 8, 12]


def test_eval_summary_on_known_counts():
    # 3 prompts x 4 responses: 0, 1 and 4 correct; rewards, lengths and truncations summed per prompt
    table = torch.tensor([[0, 0.5, 12, 4], [1, 1.0, 10, 1], [4, 4.0, 8, 0]], dtype=torch.float64)
    assert table.shape[1] == COLUMNS
    metrics = eval_summary(table, samples=4)
    assert metrics["eval/accuracy"] == pytest.approx((0 + 1 / 4 + 1) / 3, abs=1e-15)  # Mean@4
    assert metrics["eval/pass@2"] == pytest.approx((0 + 1 / 2 + 1) / 3, abs=1e-15)  # 1 − C(3,2)/C(4,2) = 1/2
    assert metrics["eval/pass@4"] == pytest.approx((0 + 1 + 1) / 3, abs=1e-15)
    assert sum(pass_at_k(4, c, 1) for c in (0, 1, 4)) / 3 == pytest.approx(metrics["eval/accuracy"], abs=1e-15)
    assert metrics["eval/reward_mean"] == 5.5 / 12
    assert metrics["eval/response_length_mean"] == 30 / 12
    assert metrics["eval/truncation_rate"] == 5 / 12
    assert metrics["eval/prompts"] == 3 and metrics["eval/samples_per_prompt"] == 4
    with pytest.raises(ValueError, match="per_prompt must be"):
        eval_summary(torch.zeros(0, COLUMNS), samples=4)
