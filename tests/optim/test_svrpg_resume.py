"""A run saved after inner step 2 and resumed in NEW processes continues exactly (bit-identical).

DP=2 with the distributed optimizer and with the plain optimizer (full-size θ̃/μ), m = 3 inner
steps: anchor, steps 0 1 | save | 2, anchor, 3 4.
The checkpoint is megatron's sharded `torch_dist` checkpoint: the model's sharded state dict plus
`SVRPGOptimizer.sharded_state_dict` (Adam's dp_reshardable state, θ̃ and μ mirrored under
`svrpg.distributed.*`, and the inner-step counter). The uninterrupted run and the resumed run must
give identical parameters, and the resumed run must cross a snapshot refresh at the same step.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from megatron.core import dist_checkpointing

from megatron_rpg.megatron.compat import init_optimizer_states_for_loading
from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
from megatron_rpg.optim.svrpg_config import SVRPGConfig
from tests.distributed.harness import run_on_ranks
from tests.optim import svrpg_training as T

pytestmark = pytest.mark.distributed

CONFIG = SVRPGConfig(enabled=True, inner_steps=3, anchor_batch_size=T.ANCHOR_BATCH)
METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("svrpg_resume"))
    uninterrupted = run_on_ranks(_run_body, world_size=2, args=(root, False))
    resumed = run_on_ranks(_run_body, world_size=2, args=(root, True))  # new processes
    return uninterrupted, resumed


def _sharded_state(ddp, svrpg, is_loading):
    model_sd = ddp[0].module.sharded_state_dict()
    return {"model": model_sd,
            "optimizer": svrpg.sharded_state_dict(model_sd, is_loading=is_loading, metadata=METADATA)}


def _run_body(rank, world_size, checkpoint_root, resume):
    return {dist_opt: _run(f"{checkpoint_root}/distopt_{dist_opt}", resume, dist_opt)
            for dist_opt in (True, False)}


def _run(checkpoint_dir, resume, use_distributed_optimizer):
    os.makedirs(checkpoint_dir, exist_ok=True)
    initialize_parallel(seed=1234)
    try:
        ddp, _, svrpg = T.build(use_distributed_optimizer, CONFIG)
        grad_fn = T.make_grad_fn(ddp)
        anchors = []
        if resume:
            # A fresh torch Adam has no state to load into (megatron-LM's loader does the same).
            init_optimizer_states_for_loading(svrpg.optimizer)
            loaded = dist_checkpointing.load(_sharded_state(ddp, svrpg, True), checkpoint_dir)
            ddp[0].module.load_state_dict(loaded["model"])
            svrpg.load_state_dict(loaded["optimizer"])
            steps = range(2, 5)
        else:
            T.run_steps(svrpg, grad_fn, range(2))
            assert svrpg.inner_step == 2
            dist_checkpointing.save(_sharded_state(ddp, svrpg, False), checkpoint_dir)
            steps = range(2, 5)
        state_at_start = (svrpg.inner_step, torch.cat(svrpg.snapshot).numpy().copy(),
                          torch.cat(svrpg.anchor_mean).numpy().copy())
        for step in steps:
            anchors.append(svrpg.needs_anchor)
            T.run_steps(svrpg, grad_fn, [step])
        return {"params": T.full_params(ddp), "anchors": anchors, "inner_step": state_at_start[0],
                "snapshot": state_at_start[1], "anchor_mean": state_at_start[2]}
    finally:
        destroy_parallel()


@pytest.mark.parametrize("use_distributed_optimizer", [True, False], ids=["distopt", "plain-opt"])
def test_resumed_run_in_new_processes_matches_the_uninterrupted_run_bit_exactly(runs, use_distributed_optimizer):
    uninterrupted, resumed = runs
    for before, after in zip(uninterrupted, resumed):
        before, after = before[use_distributed_optimizer], after[use_distributed_optimizer]
        assert after["inner_step"] == before["inner_step"] == 2
        assert np.array_equal(after["snapshot"], before["snapshot"])  # θ̃ shards, bit-exact
        assert np.array_equal(after["anchor_mean"], before["anchor_mean"])  # μ shards
        assert after["anchors"] == before["anchors"] == [False, True, False]
        for name, value in before["params"].items():
            assert np.array_equal(after["params"][name], value), name
