"""SVRPG's θ̃, μ and counters in megatron's sharded (dist_checkpointing) checkpoint: the tensors under
the prefix `svrpg` in optim/shard_checkpoint.py's layout (that of the distributed optimizer's own
dp_reshardable state), the counters as one ShardedObject.

Exactness claim: a save/load round trip restores θ̃ and μ bit-exactly (tests/optim/test_svrpg_resume).
"""
from __future__ import annotations

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_rpg.optim.shard_checkpoint import load_shard_tensors, shard_tensors_state


def _tensors(svrpg) -> dict:
    return {"snapshot": svrpg.snapshot, "anchor_mean": svrpg.anchor_mean}


def svrpg_sharded_state(svrpg) -> dict:
    state = shard_tensors_state(svrpg.optimizer, svrpg.slots, _tensors(svrpg), "svrpg")
    counters = {"inner_step": svrpg.inner_step, "has_snapshot": svrpg.has_snapshot,
                "inner_steps": svrpg.config.inner_steps}
    state["counters"] = ShardedObject("svrpg.counters", counters, (1,), (0,),
                                      replica_id=torch.distributed.get_rank())
    return state


@torch.no_grad()
def load_svrpg_state(svrpg, loaded: dict) -> None:
    """Copy a loaded `svrpg_sharded_state` (same structure, tensors filled in) into `svrpg`."""
    load_shard_tensors(svrpg.optimizer, svrpg.slots, _tensors(svrpg), loaded, what="SVRPG")
    counters = loaded["counters"]
    if counters["inner_steps"] != svrpg.config.inner_steps:
        raise ValueError(f"checkpoint was written with --svrpg-inner-steps {counters['inner_steps']}, "
                         f"this run has {svrpg.config.inner_steps}; resume with the same value")
    svrpg.inner_step = int(counters["inner_step"])
    svrpg.has_snapshot = bool(counters["has_snapshot"])
