"""SVRPG's θ̃, μ and counters in megatron's sharded (dist_checkpointing) checkpoint.

Distributed optimizer: the layout mirrors DistributedOptimizer's `dp_reshardable` param state
(`sharded_param_state_dp_reshardable`) under the prefix `svrpg.distributed.` instead of
`optimizer.distributed.`: one global flat tensor per (DP group, grad buffer, dtype, bucket) and key
("snapshot", "anchor_mean"), of length `numel_unpadded`, each rank writing its shard of every
parameter at `dp_rank·local_numel + gbuf_local_start`, gaps filled with padding pieces so the global
tensor is fully covered. Every rank saves and loads only its own bytes (no gather).
Non-distributed optimizers: full-size copies, identical on every DP rank, saved once per
(TP, PP) rank as a ShardedObject with replica id = DP rank.

Exactness claim: a save/load round trip restores θ̃ and μ bit-exactly (tests/optim/test_svrpg_resume).
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_rpg.megatron.compat import distributed_buckets, flat_sharded_tensor, sub_optimizers

_STATE_KEYS = ("snapshot", "anchor_mean")


def _distributed_pieces(svrpg, opt: DistributedOptimizer, slot_index: dict) -> list:
    """[(slot index or None for padding, state key, ShardedTensor)] for one distributed optimizer."""
    layout = distributed_buckets(opt)
    replica_id = (layout.instance_id, 0, 0)
    pieces = []
    for bucket in layout.buckets:
        unpadded, local_numel = bucket.numel_unpadded, bucket.local_numel
        rank_start = layout.dp_rank * local_numel
        owned = sorted((start, end, slot_index[id(p)]) for start, end, p in bucket.param_ranges)
        # Pieces (start, end, slot or None) covering [0, local_numel) ∩ the unpadded tensor.
        cover, cursor = [], 0
        for start, end, idx in owned + [(local_numel, local_numel, None)]:
            gap_end = min(start, unpadded - rank_start)
            if gap_end > cursor:
                cover.append((cursor, gap_end, None))
            if idx is not None:
                cover.append((start, end, idx))
            cursor = end
        prefix = (f"svrpg.distributed.dp_group_idx_{layout.dp_group_index}"
                  f".gbuf_idx_{bucket.gbuf_index}.dtype_{bucket.dtype}.bucket_idx_{bucket.bucket_index}")
        for name in _STATE_KEYS:
            for start, end, idx in cover:
                data = (getattr(svrpg, name)[idx] if idx is not None
                        else torch.zeros(end - start, dtype=torch.float32))
                pieces.append((idx, name, flat_sharded_tensor(f"{prefix}.{name}", data, unpadded,
                                                              rank_start + start, replica_id)))
    return pieces


def svrpg_sharded_state(svrpg) -> dict:
    slot_index = {id(s.model_param): i for i, s in enumerate(svrpg.slots)}
    state = {"distributed": [], "replicated": {}}
    covered = set()
    for opt in sub_optimizers(svrpg.optimizer):
        if isinstance(opt, DistributedOptimizer):
            for idx, name, piece in _distributed_pieces(svrpg, opt, slot_index):
                state["distributed"].append(piece)
                covered.add(idx)
    rest = [i for i in range(len(svrpg.slots)) if i not in covered]
    if rest:
        tp = parallel_state.get_tensor_model_parallel_rank()
        pp = parallel_state.get_pipeline_model_parallel_rank()
        dp = parallel_state.get_data_parallel_rank(with_context_parallel=True)
        for name in _STATE_KEYS:
            state["replicated"][name] = ShardedObject(
                f"svrpg.replicated.tp_{tp}.pp_{pp}.{name}",
                {str(i): getattr(svrpg, name)[i] for i in rest}, (1,), (0,), replica_id=dp)
    counters = {"inner_step": svrpg.inner_step, "has_snapshot": svrpg.has_snapshot,
                "inner_steps": svrpg.config.inner_steps}
    state["counters"] = ShardedObject("svrpg.counters", counters, (1,), (0,),
                                      replica_id=torch.distributed.get_rank())
    return state


@torch.no_grad()
def load_svrpg_state(svrpg, loaded: dict) -> None:
    """Copy a loaded `svrpg_sharded_state` (same structure, tensors filled in) into `svrpg`."""
    slot_index = {id(s.model_param): i for i, s in enumerate(svrpg.slots)}
    layout = [(idx, name) for opt in sub_optimizers(svrpg.optimizer)
              if isinstance(opt, DistributedOptimizer)
              for idx, name, _ in _distributed_pieces(svrpg, opt, slot_index)]
    if len(layout) != len(loaded["distributed"]):
        raise ValueError(f"SVRPG checkpoint has {len(loaded['distributed'])} shard pieces, this run "
                         f"expects {len(layout)}: the model or parallel layout changed")
    for (idx, name), tensor in zip(layout, loaded["distributed"]):
        if idx is not None:
            getattr(svrpg, name)[idx].copy_(tensor)
    for name, by_slot in loaded["replicated"].items():
        for i, tensor in by_slot.items():
            getattr(svrpg, name)[int(i)].copy_(tensor)
    counters = loaded["counters"]
    if counters["inner_steps"] != svrpg.config.inner_steps:
        raise ValueError(f"checkpoint was written with --svrpg-inner-steps {counters['inner_steps']}, "
                         f"this run has {svrpg.config.inner_steps}; resume with the same value")
    svrpg.inner_step = int(counters["inner_step"])
    svrpg.has_snapshot = bool(counters["has_snapshot"])
