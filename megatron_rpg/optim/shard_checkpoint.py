"""Per-rank fp32 tensors shaped like an optimizer's main shards (SVRPG's θ̃ and μ, the reference
policy's weights) in megatron's sharded (dist_checkpointing) checkpoint, under a key prefix.

Distributed optimizer: the layout mirrors DistributedOptimizer's `dp_reshardable` param state
(`sharded_param_state_dp_reshardable`) under `PREFIX.distributed.` instead of
`optimizer.distributed.`: one global flat tensor per (DP group, grad buffer, dtype, bucket) and
tensor name, of length `numel_unpadded`, each rank writing its shard of every parameter at
`dp_rank·local_numel + gbuf_local_start`, gaps filled with padding pieces so the global tensor is
fully covered. Every rank saves and loads only its own bytes (no gather).
Non-distributed optimizers: full-size copies, identical on every DP rank, saved once per (TP, PP)
rank as a ShardedObject (`PREFIX.replicated.tp_T.pp_P.NAME`) with replica id = DP rank.

Exactness claim: a save/load round trip restores the tensors bit-exactly (tests/optim/test_svrpg_resume,
tests/training/test_reference_policy).
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_rpg.megatron.compat import distributed_buckets, flat_sharded_tensor, sub_optimizers


def _distributed_pieces(tensors: dict, opt: DistributedOptimizer, slot_index: dict, prefix: str) -> list:
    """[(slot index or None for padding, tensor name, ShardedTensor)] for one distributed optimizer."""
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
        key = (f"{prefix}.distributed.dp_group_idx_{layout.dp_group_index}"
               f".gbuf_idx_{bucket.gbuf_index}.dtype_{bucket.dtype}.bucket_idx_{bucket.bucket_index}")
        for name, by_slot in tensors.items():
            for start, end, idx in cover:
                data = by_slot[idx] if idx is not None else torch.zeros(end - start, dtype=torch.float32)
                pieces.append((idx, name, flat_sharded_tensor(f"{key}.{name}", data, unpadded,
                                                              rank_start + start, replica_id)))
    return pieces


def shard_tensors_state(optimizer, slots, tensors: dict, prefix: str) -> dict:
    """The sharded state of `tensors` ({name: one fp32 tensor per slot, sized like slot.main})."""
    slot_index = {id(s.model_param): i for i, s in enumerate(slots)}
    state = {"distributed": [], "replicated": {}}
    covered = set()
    for opt in sub_optimizers(optimizer):
        if isinstance(opt, DistributedOptimizer):
            for idx, name, piece in _distributed_pieces(tensors, opt, slot_index, prefix):
                state["distributed"].append(piece)
                covered.add(idx)
    rest = [i for i in range(len(slots)) if i not in covered]
    if rest:
        tp = parallel_state.get_tensor_model_parallel_rank()
        pp = parallel_state.get_pipeline_model_parallel_rank()
        dp = parallel_state.get_data_parallel_rank(with_context_parallel=True)
        for name, by_slot in tensors.items():
            state["replicated"][name] = ShardedObject(f"{prefix}.replicated.tp_{tp}.pp_{pp}.{name}",
                                                      {str(i): by_slot[i] for i in rest}, (1,), (0,), replica_id=dp)
    return state


@torch.no_grad()
def load_shard_tensors(optimizer, slots, tensors: dict, loaded: dict, *, what: str) -> None:
    """Copy a loaded `shard_tensors_state` (same structure, tensors filled in) into `tensors`."""
    slot_index = {id(s.model_param): i for i, s in enumerate(slots)}
    layout = [(idx, name) for opt in sub_optimizers(optimizer) if isinstance(opt, DistributedOptimizer)
              for idx, name, _ in _distributed_pieces(tensors, opt, slot_index, "")]
    if len(layout) != len(loaded["distributed"]):
        raise ValueError(f"the {what} checkpoint has {len(loaded['distributed'])} shard pieces, this run "
                         f"expects {len(layout)}: the model or parallel layout changed")
    for (idx, name), tensor in zip(layout, loaded["distributed"]):
        if idx is not None:
            tensors[name][idx].copy_(tensor)
    for name, by_slot in loaded["replicated"].items():
        for i, tensor in by_slot.items():
            tensors[name][int(i)].copy_(tensor)
