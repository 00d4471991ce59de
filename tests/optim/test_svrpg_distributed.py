"""SVRPG on real megatron-core (CPU, gloo): parallel layouts give the single-process parameters.

After an anchor phase and 3 inner steps (lr 1e-2 so θ_t drifts visibly from θ̃):
- DP=2 with the distributed optimizer (θ̃/μ sharded over DP) == DP=1;
- DP=2 with the non-distributed optimizer (full-size θ̃/μ) == DP=1;
- TP=2 (TP-split θ̃/μ shards, vocab-parallel log-probs) == TP=1, with either optimizer;
and the reported norms ‖g(θ_t)‖, ‖ρ̄·g(θ̃) − μ‖, ‖v‖ agree across layouts (global, not per-shard);
‖v‖ is the norm megatron's own clipping computes from the same grads (TP duplicates counted once).
With Dual-Clip on (ρ̄ = clip(ρ, 0.8, min(2, cap 1.5)), some but not all sequences clipped) DP=2
with the distributed optimizer == DP=1 in parameters and in the rank-combined ρ statistics (mean,
min, max, clip fraction) and norms.
"Equal" for float32 results is tests/float_bounds.py's bound: 4× the single-process run's float32
rounding, measured as the distance between the same run in float32 and in float64 (both without
gradient clipping, which megatron applies to float32 grads only; see float32_bounds). Initial
weights and the clip fraction (a count) are compared exactly.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
from megatron_rpg.optim.svrpg_config import SVRPGConfig
from tests.distributed.harness import run_on_ranks
from tests.float_bounds import assert_float32_equal, distance, float32_bound, norm
from tests.optim import svrpg_training as T

pytestmark = pytest.mark.distributed
CONFIG = SVRPGConfig(enabled=True, inner_steps=3, anchor_batch_size=T.ANCHOR_BATCH)
CLIPPED = SVRPGConfig(enabled=True, inner_steps=3, anchor_batch_size=T.ANCHOR_BATCH,
                      rho_clip=(0.8, 2.0), rho_cap=1.5)
# (TP, distributed optimizer, bf16 params, Dual-Clip); DP = world / TP
LAYOUTS_1 = [(1, True, False, False), (1, False, False, False), (1, True, True, False),
             (1, True, False, True)]
LAYOUTS_2 = [(1, True, False, False), (1, False, False, False), (2, True, False, False),
             (2, False, False, False), (1, True, True, False), (1, True, False, True)]
RATIO_METRICS = ("svrpg/rho_mean", "svrpg/log_rho_min", "svrpg/log_rho_max",
                 "svrpg/rho_clip_fraction")
NORM_METRICS = ("svrpg/current_grad_norm", "svrpg/control_variate_norm", "svrpg/direction_norm")
# The float32 rounding references, run single-process without gradient clipping: (Dual-Clip, float64)
REFERENCE_RUNS = [(False, False), (False, True), (True, False), (True, True)]
# log ρ sums ~2·(SEQ − 1) per-token log-probs of size ~log VOCAB (a near-uniform policy at
# initialisation): the size of the terms a ratio statistic is computed from (the bound's floor)
LOG_RHO_TERMS = math.sqrt(2 * (T.SEQ - 1)) * math.log(T.VOCAB)


def _train(tp, use_dist_opt, bf16, clipped, clip_grad=1.0, float64=False):
    initialize_parallel(tensor_model_parallel_size=tp, seed=1234)
    try:
        ddp, _, svrpg = T.build(use_dist_opt, CLIPPED if clipped else CONFIG, bf16=bf16,
                                clip_grad=clip_grad, float64=float64)
        initial = T.full_params(ddp)
        metrics = []
        T.run_steps(svrpg, T.make_grad_fn(ddp), range(3), metrics)
        final = T.full_params(ddp)
        with svrpg.snapshot_loaded():  # θ̃ was taken at the start, before any step
            inside = T.full_params(ddp)
        return {"initial": initial, "final": final, "metrics": metrics,
                "extra_bytes": svrpg.extra_memory_bytes(), "inside_snapshot": inside,
                "after_snapshot": T.full_params(ddp)}
    finally:
        destroy_parallel()


def _layouts_body(rank, world_size, layouts, references=()):
    results = {layout: _train(*layout) for layout in layouts}
    for clipped, float64 in references:
        results["float64" if float64 else "float32", clipped] = _train(
            1, True, False, clipped, clip_grad=0.0, float64=float64)
    return results


def _relative(a, b):
    a, b = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def runs():
    single = run_on_ranks(_layouts_body, world_size=1, args=(LAYOUTS_1, REFERENCE_RUNS))[0]
    double = run_on_ranks(_layouts_body, world_size=2, args=(LAYOUTS_2,))
    return single, double


def float32_bounds(single, clipped: bool) -> dict:
    """tests/float_bounds.py's bound on each float32 result of the single-process run (Dual-Clip or
    not), from the unclipped runs in float32 and float64: a parameter's from its 3-step update
    (final − initial; floor scale ‖final‖, the update being of float32 parameters), each step's norms
    and ratio statistics from the same runs (ratio floor scale: LOG_RHO_TERMS·max(1, ρ_max))."""
    run32, run64 = single["float32", clipped], single["float64", clipped]
    params = {name: float32_bound(run32["final"][name] - run32["initial"][name],
                                  run64["final"][name] - run64["initial"][name],
                                  scale=norm(run32["final"][name])) for name in run32["final"]}
    metrics = []
    for got, want in zip(run32["metrics"], run64["metrics"]):
        rho_size = LOG_RHO_TERMS * max(1.0, math.exp(want["svrpg/log_rho_max"]))
        metrics.append({key: float32_bound(got[key], want[key], None if key in NORM_METRICS else rho_size)
                        for key in NORM_METRICS + RATIO_METRICS[:3]})
    return {"params": params, "metrics": metrics}


def _assert_same_run(result, reference, bounds, keys):
    worst = max((distance(result["final"][n], ref) / bounds["params"][n], n)
                for n, ref in reference["final"].items())
    print(f"parameters: largest difference / bound {worst[0]:.3g} ({worst[1]})")
    for name, ref in reference["final"].items():
        assert_float32_equal(result["final"][name], ref, bounds["params"][name], name + " after 3 steps")
    for got, want, step_bounds in zip(result["metrics"], reference["metrics"], bounds["metrics"]):
        for key in keys:
            assert_float32_equal(got[key], want[key], step_bounds[key], key)


@pytest.mark.parametrize("layout", LAYOUTS_2[:4],
                         ids=["dp2-distopt", "dp2-plain-opt", "tp2-distopt", "tp2-plain-opt"])
def test_svrpg_two_rank_layout_gives_single_process_parameters(runs, layout):
    single, double = runs
    reference = single[(1, layout[1], False, False)]
    bounds = float32_bounds(single, clipped=False)
    for rank_result in double:
        result = rank_result[layout]
        for name, ref in reference["initial"].items():  # the same seeded initialisation, split
            assert np.array_equal(result["initial"][name], ref), f"{name} initial weights differ"
        for name in reference["final"]:  # the three steps moved every weight far beyond its bound
            moved = norm(reference["final"][name] - reference["initial"][name])
            assert moved > 100 * bounds["params"][name], name
        _assert_same_run(result, reference, bounds, NORM_METRICS + ("svrpg/rho_mean",))


@pytest.mark.parametrize("layout", [(1, True, False, False), (1, False, False, False),
                                    (2, True, False, False), (2, False, False, False)],
                         ids=["dp2-distopt", "dp2-plain-opt", "tp2-distopt", "tp2-plain-opt"])
def test_direction_norm_is_the_grad_norm_megatron_clips_with(runs, layout):
    """clip_grad=1.0 < ‖v‖: the wrapped step() returns its pre-clip norm of the same grads."""
    single, double = runs
    # megatron's float32 norm of the same grads: within ‖v‖'s float32 rounding (which also holds
    # the grads' own rounding); a per-shard norm or a TP duplicate counted twice is ~30 % off
    bounds = float32_bounds(single, clipped=False)["metrics"]
    for rank_result in double:
        for metrics, step_bounds in zip(rank_result[layout]["metrics"], bounds):
            assert metrics["grad_norm"] > 1.0  # clipping active: the norm is the one it acts on
            assert_float32_equal(metrics["svrpg/direction_norm"], metrics["grad_norm"],
                                 step_bounds["svrpg/direction_norm"], "direction_norm")


def test_dual_clip_dp2_gives_single_process_parameters_and_rank_combined_ratio_statistics(runs):
    single, double = runs
    reference = single[(1, True, False, True)]
    fractions = [m["svrpg/rho_clip_fraction"] for m in reference["metrics"]]
    print(f"Dual-Clip fractions per inner step: {fractions}")
    assert fractions[0] == 0.0 and all(0.0 < f < 1.0 for f in fractions[1:])  # some, not all
    unclipped = single[(1, True, False, False)]
    assert any(_relative(reference["final"][n], unclipped["final"][n]) > 1e-4
               for n in reference["final"])  # the clipping changed the steps
    bounds = float32_bounds(single, clipped=True)
    for rank_result in double:
        result = rank_result[(1, True, False, True)]
        _assert_same_run(result, reference, bounds, RATIO_METRICS[:3] + NORM_METRICS)
        for got, want in zip(result["metrics"], reference["metrics"]):
            assert got["svrpg/rho_clip_fraction"] == want["svrpg/rho_clip_fraction"]


def test_snapshot_swap_loads_the_snapshot_and_restores_current_weights_bit_exactly(runs):
    single, double = runs
    for result in [*single.values(), *(r[layout] for r in double for layout in LAYOUTS_2)]:
        for name, value in result["initial"].items():
            assert np.array_equal(result["inside_snapshot"][name], value), name
            assert np.array_equal(result["after_snapshot"][name], result["final"][name]), name


def test_distributed_optimizer_shards_hold_eight_bytes_per_parameter_over_dp(runs):
    single, double = runs
    full = single[(1, True, False, False)]["extra_bytes"]
    assert full == 8 * sum(t.size for t in single[(1, True, False, False)]["final"].values())
    dp2 = [r[(1, True, False, False)]["extra_bytes"] for r in double]
    assert sum(dp2) == full and max(dp2) <= full // 2 + 8 * 64  # each rank ~half (bucket padding)
    assert all(r[(1, False, False, False)]["extra_bytes"] == full for r in double)  # plain: full
    assert all(r[(1, True, True, False)]["extra_bytes"] == b for r, b in zip(double, dp2))  # fp32


def test_bf16_params_with_fp32_main_shards_track_the_single_process_run(runs):
    """bf16 model, fp32 main shards (shard_fp32_from_float16_groups): DP=2 == DP=1 to bf16 rounding
    of the whole parameter vector (bf16 keeps 8 bits: one rounding step is 2^-8 ≈ 4e-3 relative),
    while the three steps moved it by far more."""
    single, double = runs
    reference = single[(1, True, True, False)]
    flat = lambda params: np.concatenate([v.ravel() for _, v in sorted(params.items())])
    moved = _relative(flat(reference["final"]), flat(reference["initial"]))
    for rank_result in double:
        error = _relative(flat(rank_result[(1, True, True, False)]["final"]), flat(reference["final"]))
        print(f"bf16 DP=2 vs DP=1: relative error {error:.2e}, moved {moved:.2e}")
        assert error <= 4e-3 < moved, (error, moved)
