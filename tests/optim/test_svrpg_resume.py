"""A run saved after inner step 2 and resumed in NEW processes continues exactly (bit-identical).

DP=2 with the distributed optimizer, m = 3 inner steps: anchor, steps 0 1 | save | 2, anchor, 3 4.
The checkpoint is megatron's sharded `torch_dist` checkpoint: the model's sharded state dict plus
`SVRPGOptimizer.sharded_state_dict` (Adam's dp_reshardable state, θ̃ and μ mirrored under
`svrpg.distributed.*`, and the inner-step counter). The uninterrupted run and the resumed run must
give identical parameters, and the resumed run must cross a snapshot refresh at the same step.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from megatron.core import dist_checkpointing

from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
from megatron_rpg.optim.svrpg_config import SVRPGConfig
from tests.distributed.harness import run_on_ranks
from tests.optim import svrpg_training as T

pytestmark = pytest.mark.distributed
CONFIG = SVRPGConfig(enabled=True, inner_steps=3, anchor_batch_size=T.ANCHOR_BATCH)
METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _sharded_state(ddp, svrpg, is_loading):
    model_sd = ddp[0].module.sharded_state_dict()
    return {"model": model_sd,
            "optimizer": svrpg.sharded_state_dict(model_sd, is_loading=is_loading, metadata=METADATA)}


def _run_body(rank, world_size, checkpoint_dir, resume):
    initialize_parallel(seed=1234)
    try:
        ddp, _, svrpg = T.build(True, CONFIG)
        grad_fn = T.make_grad_fn(ddp)
        anchors = []
        if resume:
            # A fresh torch Adam has no state to load into (megatron-LM's loader does the same).
            for opt in svrpg.optimizer.chained_optimizers:
                opt._init_optimizer_states_with_dummy_values()
            loaded = dist_checkpointing.load(_sharded_state(ddp, svrpg, True), checkpoint_dir)
            ddp[0].module.load_state_dict(loaded["model"])
            svrpg.load_state_dict(loaded["optimizer"])
            steps = range(2, 5)
        else:
            T.run_steps(svrpg, grad_fn, range(2))
            assert svrpg.inner_step == 2
            dist_checkpointing.save(_sharded_state(ddp, svrpg, False), checkpoint_dir)
            steps = range(2, 5)
        state_at_start = (svrpg.inner_step, [s.clone() for s in svrpg.snapshot[:3]])
        for step in steps:
            anchors.append(svrpg.needs_anchor)
            T.run_steps(svrpg, grad_fn, [step])
        return {"params": T.full_params(ddp), "anchors": anchors, "inner_step": state_at_start[0],
                "snapshot_head": [s.numpy() for s in state_at_start[1]]}
    finally:
        destroy_parallel()


def test_resumed_run_in_new_processes_matches_the_uninterrupted_run_bit_exactly(tmp_path):
    uninterrupted = run_on_ranks(_run_body, world_size=2, args=(str(tmp_path), False))
    resumed = run_on_ranks(_run_body, world_size=2, args=(str(tmp_path), True))
    for before, after in zip(uninterrupted, resumed):
        assert after["inner_step"] == before["inner_step"] == 2
        for a, b in zip(after["snapshot_head"], before["snapshot_head"]):
            assert np.array_equal(a, b)  # θ̃ shard restored bit-exactly
        assert after["anchors"] == before["anchors"] == [False, True, False]
        for name, value in before["params"].items():
            assert np.array_equal(after["params"][name], value), name
