"""Where SVRPG's per-rank state (and the reference policy's weights) lives: the fp32 main-param
shards a megatron optimizer owns.

A `ShardSlot` pairs one model parameter with
- `main`: the optimizer's fp32 main copy of the part this rank owns (DistributedOptimizer: the
  `shard_fp32_from_float16_groups` / `shard_fp32_groups` entry, P/DP elements in all; the
  non-distributed Float16/FP32 optimizers: the whole parameter), flattened;
- `grad`: the slice of `param.main_grad` (the DDP grad buffer) that holds this rank's reduced
  gradient for exactly those elements (`compat.param_shard_range`).
θ̃ and μ are fp32 tensors of the same sizes, so SVRPG's extra memory is 8·P/DP bytes.

`publish_main_params` makes the model compute with whatever the main shards hold, exactly as the
optimizer does after its own step: `compat.copy_main_params_to_model_params` (casts to bf16/fp16,
quantises FP8 shards) and, for the distributed optimizer, an all-gather of the param buffer
(`start_param_sync(force_sync=True)`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import FP32Optimizer, Float16OptimizerWithFloat16Params
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from megatron_rpg.megatron.compat import (copy_main_params_to_model_params, distributed_main_shards,
                                          float16_main_params, optimizer_model_chunks, optimizer_tp_group,
                                          param_shard_range, sub_optimizers, uses_precision_aware_optimizer)


@dataclass
class ShardSlot:
    model_param: torch.Tensor
    main: torch.Tensor  # fp32, flat, the optimizer's own storage (writes change θ_t)
    grad: torch.Tensor  # flat view into the DDP grad buffer (bf16/fp32)
    counts_in_norm: bool  # False for tensor-parallel duplicates and shared (tied) params


def _flat_main_grad(model_param: torch.Tensor) -> torch.Tensor:
    if not hasattr(model_param, "main_grad"):
        raise ValueError("SVRPG needs parameters wrapped by megatron's DistributedDataParallel "
                         "(param.main_grad in the grad buffer); wrap the model with DDP first")
    return model_param.main_grad.view(-1)


def _slot(opt, model_param, main, grad) -> ShardSlot:
    # The model param carries `tensor_model_parallel`/`shared`: FP32Optimizer's (and
    # fp32_from_fp32_groups') main is `p.data`, a plain tensor without them.
    counts = (param_is_not_shared(model_param)
              and param_is_not_tensor_parallel_duplicate(model_param, optimizer_tp_group(opt)))
    return ShardSlot(model_param, main.view(-1), grad, counts)


def optimizer_slots(opt) -> list[ShardSlot]:
    """The (model param, fp32 main shard, grad shard) triples of one non-chained optimizer."""
    if isinstance(opt, DistributedOptimizer):
        if opt.ddp_config.overlap_param_gather:
            raise ValueError("SVRPG swaps weights into the model and all-gathers them itself; "
                             "set DistributedDataParallelConfig(overlap_param_gather=False)")
        if uses_precision_aware_optimizer(opt) or opt.ddp_config.use_megatron_fsdp:
            raise ValueError("SVRPG needs the main params in the optimizer's shard groups: turn off "
                             "use_precision_aware_optimizer and megatron FSDP")
        slots = []
        for model_param, main in distributed_main_shards(opt):
            owned = param_shard_range(opt, model_param)
            slots.append(_slot(opt, model_param, main, _flat_main_grad(model_param)[owned.start:owned.stop]))
        return slots
    if isinstance(opt, Float16OptimizerWithFloat16Params):
        return [_slot(opt, model_param, main, _flat_main_grad(model_param))
                for model_param, main in float16_main_params(opt)]
    if isinstance(opt, FP32Optimizer):
        return [_slot(opt, p, p.data, _flat_main_grad(p))
                for group in opt.optimizer.param_groups for p in group["params"]]
    raise ValueError(f"SVRPG wraps megatron's DistributedOptimizer, Float16OptimizerWithFloat16Params "
                     f"or FP32Optimizer (as built by get_megatron_optimizer), got {type(opt).__name__}")


@torch.no_grad()
def publish_main_params(optimizer) -> None:
    """Model params ← main shards (cast/quantise as the optimizer does), then all-gather over DP."""
    chunks = []
    for opt in sub_optimizers(optimizer):
        if isinstance(opt, FP32Optimizer):
            continue  # main params are the model params themselves
        copy_main_params_to_model_params(opt)
        if isinstance(opt, DistributedOptimizer):
            chunks += [c for c in optimizer_model_chunks(opt) if all(c is not k for k in chunks)]
    for chunk in chunks:
        chunk.start_param_sync(force_sync=True)


@torch.no_grad()
def swap_(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchange the contents of two equal-size fp32 tensors (one transient copy of one parameter)."""
    tmp = a.clone()
    a.copy_(b)
    b.copy_(tmp)


@contextmanager
def weights_swapped_in(optimizer, slots: list[ShardSlot], weights: list[torch.Tensor], *,
                       publish_on_exit: bool = True):
    """The model computes with `weights` (fp32, one per slot) inside the block: they are swapped into
    the main shards and published; on exit the main shards are swapped back bit-exactly (so
    `weights` hold what they held), and published again — on a normal exit only if publish_on_exit
    (an optimizer step that follows publishes anyway), always on an exception (no step follows, and
    the model params and the other DP ranks' gathered shards would keep `weights`)."""
    for slot, weight in zip(slots, weights):
        swap_(slot.main, weight)
    publish_main_params(optimizer)
    failed = True
    try:
        yield
        failed = False
    finally:
        for slot, weight in zip(slots, weights):
            swap_(slot.main, weight)
        if publish_on_exit or failed:
            publish_main_params(optimizer)
