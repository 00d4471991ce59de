"""How each megatron-core GPTModel tensor (local spec) is split over tensor-parallel ranks.

    full = full_from_tp_shards("decoder.layers.0.mlp.linear_fc1.weight", [shard_rank0, shard_rank1])
    shard = tp_shard("decoder.layers.0.mlp.linear_fc1.weight", full, rank=1, size=2)

- column-parallel (dim 0): embedding (VocabParallelEmbedding), output_layer, linear_qkv weight and
  bias (whole query groups per rank, see hf_mapping), linear_fc1;
- row-parallel (dim 1): linear_proj, linear_fc2;
- replicated: every layer norm (input, pre-MLP, q/k, final).
SwiGLU fc1 is the one non-contiguous case: rank r holds [gate_r; up_r], so the full
[gate; up] = [gate_0; ...; gate_{t-1}; up_0; ...; up_{t-1}], NOT the concatenation of the shards.
A plain `torch.cat(shards)` of fc1 would silently interleave gate and up rows.
Exactness: only slicing and concatenation; `full_from_tp_shards(n, [tp_shard(n, w, r, t) for r]) == w`.
"""
from __future__ import annotations

import torch

_ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_COLUMN_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight",
                    "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                    "mlp.linear_fc1.weight")
_REPLICATED = ("layernorm.weight",)  # input_/pre_mlp_/q_/k_/final_layernorm
_SWIGLU = "mlp.linear_fc1.weight"


def tp_split_dim(megatron_name: str) -> int | None:
    """0 (column-parallel), 1 (row-parallel) or None (replicated on every TP rank)."""
    if megatron_name.endswith(_ROW_PARALLEL):
        return 1
    if megatron_name.endswith(_COLUMN_PARALLEL):
        return 0
    if megatron_name.endswith(_REPLICATED):
        return None
    raise ValueError(f"megatron tensor {megatron_name!r} has no known tensor-parallel layout; "
                     f"expected a GPTModel local-spec parameter name")


def full_from_tp_shards(megatron_name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor from the TP ranks' local shards, in rank order."""
    dim = tp_split_dim(megatron_name)
    if dim is None:
        return shards[0]
    if megatron_name.endswith(_SWIGLU):
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return torch.cat([gate for gate, _ in halves] + [up for _, up in halves], dim=0)
    return torch.cat(shards, dim=dim)


def tp_shard(megatron_name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """TP rank `rank`'s local part of a full tensor (what megatron holds at that rank)."""
    dim = tp_split_dim(megatron_name)
    if dim is None:
        return full
    if full.shape[dim] % size:
        raise ValueError(f"{megatron_name!r} has {full.shape[dim]} entries on dim {dim}, not divisible "
                         f"by tensor_model_parallel_size={size}")
    if megatron_name.endswith(_SWIGLU):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return full.chunk(size, dim=dim)[rank]
