"""SVRPG with fp16 params and megatron's loss scaler (Float16Module + fp32 main shards, CPU).

The grad buffer holds S·v during the wrapped step (S: the loss scale); μ is stored unscaled, so v/S
must not depend on S. Runs of 3 inner steps from the same fp16 weights (deterministic batches):
- dynamic scaler (megatron's default initial scale 2^32): the anchor pass overflows, is redone at
  backed-off scales until finite, then every inner step succeeds, and v/S matches the float32 run
  from the same weights to fp16 rounding; the reported norms are of v, not S·v;
- constant S = 2^12 gives the same steps as S = 1 up to fp16 rounding;
- anchor at S = 2^8, inner steps at S = 2^12 (a loss-scale change between anchor and inner step)
  gives the steps of S = 2^12 throughout (powers of two: exact unless a gradient under/overflows).
The reported norms equal ‖v/S‖ within tests/float_bounds.py's bound on a float32 norm of the same
values (4× torch's float32 norm's rounding of v/S, measured against its float64 norm).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from megatron.core.optimizer.grad_scaler import ConstantGradScaler

from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
from megatron_rpg.optim.svrpg_config import SVRPGConfig
from megatron_rpg.megatron.compat import sub_optimizers
from tests.distributed.harness import run_on_ranks
from tests.float_bounds import assert_float32_equal, float32_bound
from tests.optim import svrpg_training as T

pytestmark = pytest.mark.distributed
CONFIG = SVRPGConfig(enabled=True, inner_steps=3, anchor_batch_size=T.ANCHOR_BATCH)


def _set_constant_scale(optimizer, scale):
    for opt in sub_optimizers(optimizer):
        opt.grad_scaler = ConstantGradScaler(scale)


def _run(fp16, anchor_scale=None, step_scale=None, weights=None):
    """3 inner steps; returns v/S at each step (flat, float64), metrics, grad norms, parameters."""
    ddp, optimizer, svrpg = T.build(True, CONFIG, fp16=fp16)
    if weights is not None:  # the fp16 run's weights, exactly (fp16 values are float32 values)
        with torch.no_grad():
            for p, w in zip(ddp[0].module.parameters(), weights):
                p.copy_(w)
    if anchor_scale is not None:
        _set_constant_scale(optimizer, anchor_scale)
    initial_scale = float(optimizer.get_loss_scale())
    directions, wrapped_prepare = [], optimizer.prepare_grads

    def spy_prepare():  # the first stage of the (guarded) optimizer step: the direction handed to it
        scale = float(optimizer.get_loss_scale())
        directions.append(torch.cat([s.grad.double() / scale for s in svrpg.slots]))
        return wrapped_prepare()

    optimizer.prepare_grads = spy_prepare
    grad_fn = T.make_grad_fn(ddp)
    anchor = svrpg.anchor(grad_fn, [T.global_batch(10_000, T.ANCHOR_BATCH)])
    scale_after_anchor = float(optimizer.get_loss_scale())
    if step_scale is not None:
        _set_constant_scale(optimizer, step_scale)
    results = []
    for step in range(3):
        ok, grad_norm, _, metrics = svrpg.step(grad_fn, T.global_batch(step, T.GLOBAL_BATCH))
        results.append((ok, None if grad_norm is None else float(grad_norm), metrics))
    return {"initial_scale": initial_scale, "scale_after_anchor": scale_after_anchor,
            "anchor": anchor, "steps": results, "v": [d.numpy() for d in directions],
            "mu_finite": all(bool(torch.isfinite(m).all()) for m in svrpg.anchor_mean),
            "params": np.concatenate([p.detach().double().reshape(-1).numpy()
                                      for p in ddp[0].module.parameters()])}


def _fp16_start_weights():
    ddp, _, _ = T.build(True, CONFIG, fp16=True)
    return [p.detach().float().clone() for p in ddp[0].module.parameters()]


def _body(rank, world_size):
    initialize_parallel(seed=1234)
    try:
        return {"dynamic": _run(fp16=True),
                "float32": _run(fp16=False, weights=_fp16_start_weights()),
                "S1": _run(fp16=True, anchor_scale=1.0),
                "S4096": _run(fp16=True, anchor_scale=2.0**12),
                "changed": _run(fp16=True, anchor_scale=2.0**8, step_scale=2.0**12)}
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def runs():
    return run_on_ranks(_body, world_size=1)[0]


def _relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_dynamic_scale_anchor_overflow_is_redone_at_a_backed_off_scale(runs):
    dynamic = runs["dynamic"]
    assert dynamic["initial_scale"] == 2.0**32 > dynamic["scale_after_anchor"]
    assert dynamic["mu_finite"] and np.isfinite(dynamic["anchor"]["svrpg/anchor_grad_norm"])
    assert all(ok for ok, _, _ in dynamic["steps"])


@pytest.mark.parametrize("run", ["dynamic", "S1", "S4096", "changed"])
def test_unscaled_fp16_direction_matches_the_float32_direction_to_fp16_rounding(runs, run):
    """fp16 keeps 11 bits (2^-11 ≈ 5e-4 per rounding); measured 6e-4..1e-3 over the 3 steps."""
    for got, want in zip(runs[run]["v"], runs["float32"]["v"]):
        assert _relative(got, want) <= 3e-3


@pytest.mark.parametrize("run", ["dynamic", "S4096"])
def test_reported_norms_are_of_the_unscaled_direction(runs, run):
    """Both are float32 sums of squares of v/S (the wrapper's per-parameter dots, megatron's clip
    norm): compared with torch's float32 norm of v/S, bounded by that norm's measured rounding; the
    scaled S·v's norm would be ≥ 2^12× off."""
    for (ok, grad_norm, metrics), v in zip(runs[run]["steps"], runs[run]["v"]):
        want = float(torch.from_numpy(v).float().norm())
        bound = float32_bound(want, float(np.linalg.norm(v)))
        assert ok
        assert_float32_equal(metrics["svrpg/direction_norm"], want, bound, "direction_norm")
        assert_float32_equal(grad_norm, want, bound, "megatron's grad_norm")


def test_constant_loss_scale_gives_the_unit_scale_steps_up_to_fp16_rounding(runs):
    for got, want in zip(runs["S4096"]["v"], runs["S1"]["v"]):
        assert _relative(got, want) <= 3e-3
    assert _relative(runs["S4096"]["params"], runs["S1"]["params"]) <= 1e-3


def test_loss_scale_change_between_anchor_and_inner_steps_changes_nothing(runs):
    """μ is stored unscaled: anchoring at 2^8 then stepping at 2^12 == 2^12 throughout (a μ kept
    at the anchor's scale would be 16× too small in v)."""
    # not float32 rounding: scaling by 2^k is exact, only fp16 gradients underflowing at 2^8 and not
    # at 2^12 differ (measured 8e-12 relative); 1e-6 is far below the 16× error of a scaled μ
    for got, want in zip(runs["changed"]["v"], runs["S4096"]["v"]):
        assert _relative(got, want) <= 1e-6
    assert _relative(runs["changed"]["params"], runs["S4096"]["params"]) <= 1e-6
