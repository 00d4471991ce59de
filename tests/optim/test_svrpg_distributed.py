"""SVRPG on real megatron-core (CPU, gloo): parallel layouts give the single-process parameters.

After an anchor phase and 3 inner steps (lr 1e-2 so θ_t drifts visibly from θ̃):
- DP=2 with the distributed optimizer (θ̃/μ sharded over DP) == DP=1, relative error ≤ 1e-6;
- DP=2 with the non-distributed optimizer (full-size θ̃/μ) == DP=1;
- TP=2 (TP-split θ̃/μ shards, vocab-parallel log-probs) == TP=1;
and the reported norms ‖g(θ_t)‖, ‖ρ̄·g(θ̃) − μ‖, ‖v‖ agree across layouts (global, not per-shard).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
from megatron_rpg.optim.svrpg_config import SVRPGConfig
from tests.distributed.harness import run_on_ranks
from tests.optim import svrpg_training as T

pytestmark = pytest.mark.distributed
CONFIG = SVRPGConfig(enabled=True, inner_steps=3, anchor_batch_size=T.ANCHOR_BATCH)
LAYOUTS_1 = [(1, True), (1, False)]
LAYOUTS_2 = [(1, True), (1, False), (2, True)]  # (TP, distributed optimizer); DP = world / TP


def _train(tp, use_dist_opt):
    initialize_parallel(tensor_model_parallel_size=tp, seed=1234)
    try:
        ddp, _, svrpg = T.build(use_dist_opt, CONFIG)
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


def _layouts_body(rank, world_size, layouts):
    return {layout: _train(*layout) for layout in layouts}


def _relative(a, b):
    a, b = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def runs():
    single = run_on_ranks(_layouts_body, world_size=1, args=(LAYOUTS_1,))[0]
    double = run_on_ranks(_layouts_body, world_size=2, args=(LAYOUTS_2,))
    return single, double


@pytest.mark.parametrize("layout", LAYOUTS_2, ids=["dp2-distopt", "dp2-plain-opt", "tp2-distopt"])
def test_svrpg_two_rank_layout_gives_single_process_parameters(runs, layout):
    single, double = runs
    reference = single[(1, layout[1])]
    for rank_result in double:
        result = rank_result[layout]
        for name, ref in reference["initial"].items():
            assert _relative(result["initial"][name], ref) <= 1e-6, f"{name} initial weights differ"
        moved = max(_relative(reference["final"][n], reference["initial"][n]) for n in reference["final"])
        assert moved > 1e-3  # the three steps changed the weights, so equality below means something
        for name, ref in reference["final"].items():
            assert _relative(result["final"][name], ref) <= 1e-6, f"{name} after 3 inner steps"
        for got, want in zip(result["metrics"], reference["metrics"]):
            for key in ("svrpg/current_grad_norm", "svrpg/control_variate_norm",
                        "svrpg/direction_norm", "svrpg/rho_mean"):
                assert got[key] == pytest.approx(want[key], rel=1e-5), key


def test_snapshot_swap_loads_the_snapshot_and_restores_current_weights_bit_exactly(runs):
    single, double = runs
    for result in [*single.values(), *(r[layout] for r in double for layout in LAYOUTS_2)]:
        for name, value in result["initial"].items():
            assert np.array_equal(result["inside_snapshot"][name], value), name
            assert np.array_equal(result["after_snapshot"][name], result["final"][name]), name


def test_distributed_optimizer_shards_hold_eight_bytes_per_parameter_over_dp(runs):
    single, double = runs
    full = single[(1, True)]["extra_bytes"]
    assert full == 8 * sum(t.size for t in single[(1, True)]["final"].values())
    dp2 = [r[(1, True)]["extra_bytes"] for r in double]
    assert sum(dp2) == full and max(dp2) <= full // 2 + 8 * 64  # each rank ~half (bucket padding)
    assert all(r[(1, False)]["extra_bytes"] == full for r in double)  # plain optimizer: full copies
