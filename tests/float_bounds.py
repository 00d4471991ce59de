"""Bounds for float32 equality claims, derived from the computation itself.

A test claims that a float32 result `got` (another parallel layout, schedule or code path) equals a
float32 reference `want`. Float32 rounding follows the summation order, and that differs between
CPUs (torch picks its vectorised kernels by ATEN_CPU_CAPABILITY: default, avx2, avx512), so a fixed
bound at one machine's rounding is a flaky test on another. The rule, for scalars and tensors (the
2-norm of the difference):

    ‖got − want‖ ≤ MULTIPLE · max(‖want − want64‖, EPS32 · scale)

- want64 is the same reference computation on the same inputs in float64: ‖want − want64‖ is the
  float32 reference's own rounding, measured.
- MULTIPLE = 4: got and want are two float32 computations of one value whose rounding is of the same
  order; ‖got − want‖ ≤ ‖got − want64‖ + ‖want − want64‖ leaves got's rounding 3× the measured one.
- EPS32 · scale is the floor for a measurement that is small by luck (one scalar's rounding can cancel
  to ~0 on one CPU and not on another): scale is the magnitude of the terms the value is computed
  from — for a sum or mean of nearly cancelling terms, their size (the 2-norm of the terms), not the
  result's (default: ‖want64‖).
- CEILING: a bound over CEILING · scale is refused, so the check still catches real bugs (a dropped
  micro-batch or a per-rank mean moves results by ≥ 1e-3 relative); a larger measured rounding means
  the float64 reference is not the same computation.
Where the claim is exact equality, run both sides in float64 and compare at float64 rounding instead.
"""
from __future__ import annotations

import torch

EPS32 = float(torch.finfo(torch.float32).eps)  # 1.19e-7
EPS64 = float(torch.finfo(torch.float64).eps)  # 2.22e-16
MULTIPLE = 4.0
CEILING = 1e-4


def _float64(value) -> torch.Tensor:
    # a Python float must not pass through torch's default float32 dtype on the way
    return torch.as_tensor(value, dtype=torch.float64 if isinstance(value, (int, float)) else None).double()


def distance(a, b) -> float:
    """‖a − b‖ (2-norm, in float64) of two scalars, arrays or tensors of one shape."""
    a, b = _float64(a), _float64(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).norm())


def norm(a) -> float:
    return float(_float64(a).norm())


def float32_bound(want, want64, scale: float | None = None) -> float:
    """The bound on ‖got − want‖ for a float32 `got` claimed equal to the float32 `want` (module
    docstring); `want64` is the same computation in float64."""
    scale = norm(want64) if scale is None else float(scale)
    measured = distance(want, want64)
    bound = MULTIPLE * max(measured, EPS32 * scale)
    if bound > CEILING * scale:
        raise AssertionError(f"float32 rounding {measured:.3g} measured against float64 exceeds "
                             f"{CEILING:g} × scale {scale:.3g}: the float64 reference is not the same "
                             f"computation as the float32 one")
    return bound


def assert_float32_equal(got, want, bound: float, name: str = "") -> None:
    difference = distance(got, want)
    assert difference <= bound, (f"{name}: ‖float32 result − float32 reference‖ = {difference:.3g} > "
                                 f"bound {bound:.3g} ({MULTIPLE:g}× the reference's float32 rounding, "
                                 f"tests/float_bounds.py)")


def ratio_to_bound_per_row(got, want, want64) -> float:
    """The largest ‖got − want‖ / float32_bound(want, want64) over the rows of the last dimension
    (e.g. each position's vocabulary logits): ≤ 1 is the rule applied to every row on its own, so an
    error at one position is not diluted by the others."""
    rows = [_float64(t).reshape(-1, _float64(t).shape[-1]) for t in (got, want, want64)]
    return max(distance(g, w) / float32_bound(w, w64) for g, w, w64 in zip(*rows))
