"""tests/float_bounds.py's rule: a float32 sum in another order passes (on any CPU), a real error fails.

The data is a sum of nearly cancelling float32 terms, the case where a bound relative to the result
sits at the rounding floor: the terms are ~1 and the sum ~1e-3 of them.
"""
from __future__ import annotations

import pytest
import torch

from tests.float_bounds import (CEILING, EPS32, MULTIPLE, assert_float32_equal, distance, float32_bound, norm,
                                ratio_to_bound_per_row)


def _cancelling_terms(n: int = 4096) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    terms = torch.randn(n, generator=generator, dtype=torch.float64)
    return (terms - terms.mean() + 1e-3 / n).float()  # float32 terms of size ~1, summing to ~1e-3


def _sums(terms):
    """Reference, float64 reference, and another float32 summation order of the same terms."""
    want = float(terms.sum())
    want64 = float(terms.double().sum())
    got = float(terms.flip(0).reshape(64, -1).sum(1).sum())  # reversed, in 64 partial sums
    return got, want, want64


def test_another_float32_summation_order_is_within_the_bound():
    terms = _cancelling_terms()
    got, want, want64 = _sums(terms)
    scale = norm(terms)  # the size of the summed terms, not of the ~1e-3 sum
    assert got != want  # the orders do round differently
    assert_float32_equal(got, want, float32_bound(want, want64, scale), "sum")


def test_a_dropped_term_fails_the_bound():
    terms = _cancelling_terms()
    _, want, want64 = _sums(terms)
    bound = float32_bound(want, want64, norm(terms))
    dropped = float(terms[1:].sum())  # a term of ~1 missing, as a lost micro-batch would be
    with pytest.raises(AssertionError, match="bound"):
        assert_float32_equal(dropped, want, bound, "sum")


def test_the_bound_is_the_measured_rounding_times_the_multiple_above_the_floor():
    assert float32_bound(1.0 + 1e-6, 1.0, scale=1.0) == pytest.approx(MULTIPLE * 1e-6)
    # a rounding that cancelled to 0 by luck still gets the floor of EPS32 × the terms' size
    assert float32_bound(2.0, 2.0, scale=10.0) == MULTIPLE * EPS32 * 10.0
    assert float32_bound(torch.ones(4), torch.ones(4, dtype=torch.float64)) == MULTIPLE * EPS32 * 2.0


def test_a_bound_above_the_ceiling_is_refused():
    # such a "rounding" means the float64 reference is another computation; the bound would hide bugs
    with pytest.raises(AssertionError, match="not the same computation"):
        float32_bound(1.0 + 2 * CEILING, 1.0, scale=1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        float32_bound(torch.ones(3), torch.ones(4))


def test_the_per_row_rule_catches_an_error_in_one_row_that_the_whole_tensor_norm_dilutes():
    rows = torch.stack([_cancelling_terms(256) for _ in range(64)])  # 64 rows of size ~16 each
    want64 = rows.double() + 1e-7 * torch.randn(rows.shape, generator=torch.Generator().manual_seed(1),
                                                dtype=torch.float64)
    got = rows.clone()
    got[3, 0] += 3e-5  # one entry off by far more than its row's rounding
    assert distance(got, rows) <= float32_bound(rows, want64)  # diluted over the whole tensor
    assert ratio_to_bound_per_row(got, rows, want64) > 1.0
    assert ratio_to_bound_per_row(rows, rows, want64) == 0.0
