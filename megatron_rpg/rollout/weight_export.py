"""The one weight exporter: the live megatron model (its TP/PP shards on every rank) → HF-named full
tensors, in buckets of at most `bucket_bytes` of one dtype, for a rollout engine's weight update
(SGLang's update_weights_from_tensor / _from_distributed) or an HF checkpoint of the live model.

    for bucket in export_hf_buckets(model, hf_config, bucket_bytes=512 * 2**20):
        engine.update_weights_from_tensor(bucket.named_tensors)

Per parameter of this rank's model chunks (global layer numbers, as checkpoint/hf_mapping names them):
1. TP: all-gather over the tensor-parallel group, then `tp_layout.full_from_tp_shards` (SwiGLU fc1:
   rank r holds [gate_r; up_r], re-split into [gate; up]).
2. PP: the stages take turns: stage s broadcasts the list of its tensors (name, shape, dtype), then
   each tensor, over the pipeline group; every rank yields the whole model, one tensor at a time.
3. megatron → HF: `hf_mapping.megatron_tensor_to_hf` (fused QKV split per the HF layout, vocab padding
   stripped); with tied embeddings the last stage's output_layer.weight, megatron's copy of the
   embedding, is not exported (HF re-ties lm_head), so the embedding goes out once.
4. Buckets: consecutive tensors of one dtype while their bytes stay ≤ bucket_bytes (a larger tensor is
   a bucket of its own).
With `this_stage_only=True` step 2 is skipped: every rank yields only its own stage's tensors (the TP
peers of a stage all yield them; the distributed sync sends each stage's from that stage's first rank,
with no PP traffic), and the check that every mapped tensor was exported runs over the PP group.
Data-parallel replicas hold identical weights (the optimizer all-gathers them after its step) and
export identically with no DP communication. Memory: one full tensor (plus its TP shards) at a time,
plus the bucket being filled. Exactness: only gathers, slices and concatenations: the tensors equal
tools/convert_megatron_to_hf.py's output of a checkpoint of the same weights bit for bit
(tests/rollout/test_weight_export.py at TP=2, PP=2, DP=2).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_rpg.checkpoint.hf_mapping import megatron_tensor_to_hf, tensor_rules
from megatron_rpg.checkpoint.tp_layout import full_from_tp_shards, tp_split_dim
from megatron_rpg.megatron.optimizer_setup import bare_model

DEFAULT_BUCKET_BYTES = 512 * 2**20  # --update-weight-buffer-size


@dataclasses.dataclass
class WeightBucket:
    dtype: torch.dtype
    named_tensors: list[tuple[str, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for _, tensor in self.named_tensors)


def _global_name(gpt, local_name: str) -> str:
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)", local_name)
    if match is None:
        return local_name
    layer = gpt.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{match.group(2)}"  # layer_number: global, from 1


def _local_full_tensors(model_chunks, exported: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's parameters as full (TP-gathered) tensors under their global megatron names."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = dist.get_world_size(tp_group)
    for chunk in model_chunks:
        gpt = bare_model(chunk)
        for local_name, param in gpt.named_parameters():
            name = _global_name(gpt, local_name)
            if name not in exported:
                continue
            shard = param.detach().contiguous()
            if tp_size == 1 or tp_split_dim(name) is None:
                yield name, shard
                continue
            shards = [torch.empty_like(shard) for _ in range(tp_size)]
            dist.all_gather(shards, shard, group=tp_group)
            yield name, full_from_tp_shards(name, shards)


def _full_tensors(model_chunks, exported: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every stage's full tensors on every rank: the stages take turns broadcasting theirs."""
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_size = dist.get_world_size(pp_group)
    if pp_size == 1:
        yield from _local_full_tensors(model_chunks, exported)
        return
    my_stage = parallel_state.get_pipeline_model_parallel_rank()
    for stage in range(pp_size):
        source = dist.get_global_rank(pp_group, stage)
        mine = list(_local_full_tensors(model_chunks, exported)) if stage == my_stage else []
        listing = [[(name, tuple(t.shape), t.dtype) for name, t in mine]]
        dist.broadcast_object_list(listing, src=source, group=pp_group)
        for index, (name, shape, dtype) in enumerate(listing[0]):
            tensor = mine[index][1] if stage == my_stage else \
                torch.empty(shape, dtype=dtype, device=_device(model_chunks))
            dist.broadcast(tensor, src=source, group=pp_group)
            yield name, tensor


def _device(model_chunks) -> torch.device:
    return next(bare_model(model_chunks[0]).parameters()).device


def export_hf_tensors(model_chunks, hf_config, *, this_stage_only: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for the whole model, on every rank (collective: every rank iterates);
    with this_stage_only, this pipeline stage's tensors only (collective over the stage's TP group,
    then over the PP group for the completeness check)."""
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    rules = {rule.megatron_name: rule for rule in tensor_rules(hf_config)}
    seen = set()
    full = _local_full_tensors if this_stage_only else _full_tensors
    for name, tensor in full(chunks, set(rules)):
        seen.add(name)
        yield from megatron_tensor_to_hf(hf_config, name, tensor, rules=rules)
    if this_stage_only:
        seen = _union_over_stages(seen)
    missing = sorted(set(rules) - seen)
    if missing:
        raise ValueError(f"the model has no parameters {missing[:4]}{'...' if len(missing) > 4 else ''} that "
                         f"its HF config ({hf_config.model_type}) maps; was it built from this config?")


def _union_over_stages(names: set[str]) -> set[str]:
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp_group) == 1:
        return names
    every = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(every, sorted(names), group=pp_group)
    return set().union(*every)


def export_hf_buckets(model_chunks, hf_config, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                      this_stage_only: bool = False) -> Iterator[WeightBucket]:
    """export_hf_tensors grouped into WeightBuckets (module docstring, step 4)."""
    if bucket_bytes < 1:
        raise ValueError(f"--update-weight-buffer-size {bucket_bytes} must be a positive number of bytes")
    bucket = None
    for name, tensor in export_hf_tensors(model_chunks, hf_config, this_stage_only=this_stage_only):
        size = tensor.numel() * tensor.element_size()
        if bucket is not None and (bucket.dtype != tensor.dtype or bucket.nbytes + size > bucket_bytes):
            yield bucket
            bucket = None
        if bucket is None:
            bucket = WeightBucket(tensor.dtype, [])
        bucket.named_tensors.append((name, tensor))
    if bucket is not None:
        yield bucket
