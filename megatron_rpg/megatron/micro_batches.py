"""What a micro-batch handed to megatron/forward_backward.py must look like, checked before any
forward: a list of dicts of right-padded `[b, s]` tensors — `tokens` always; for a training step also
`loss_mask` (0/1, position 0 never in the loss), `old_logp` and `advantages` (`[b]` or `[b, s]`), and
optionally `ref_logp` / `engine_logp` / `rollout_is_weight` aligned with the tokens. With pipeline parallelism every
micro-batch has the same shape (megatron sizes its p2p buffers once per schedule).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from megatron.core import parallel_state

from megatron_rpg.losses.validation import check_choice

REQUIRED_KEYS = ("tokens", "loss_mask", "old_logp", "advantages")


def check_packing(packing: str) -> None:
    if packing == "thd":
        raise NotImplementedError(
            "packing='thd' (sequences packed into one row with cu_seqlens) is not implemented: it needs "
            "Transformer Engine's fused attention with PackedSeqParams, i.e. a CUDA GPU, and no GPU "
            "test exists for it yet; use packing='padding' (right-padded [b, s] micro-batches)")
    check_choice("packing", packing, ("padding", "thd"))


def check_micro_batches(micro_batches, *, need_loss_inputs: bool) -> list[dict]:
    if isinstance(micro_batches, Mapping) or not isinstance(micro_batches, (list, tuple)) \
            or not micro_batches:
        raise ValueError(f"micro_batches must be a non-empty list of dicts of [b, s] tensors, got "
                         f"{type(micro_batches).__name__}")
    keys = REQUIRED_KEYS if need_loss_inputs else ("tokens",)
    for index, micro_batch in enumerate(micro_batches):
        where = f"micro_batches[{index}]"
        missing = [key for key in keys if key not in micro_batch]
        if missing:
            raise ValueError(f"{where} lacks {missing}; a micro-batch needs {list(keys)}")
        not_tensors = [key for key, value in micro_batch.items() if not isinstance(value, torch.Tensor)]
        if not_tensors:
            raise ValueError(f"{where} values {not_tensors} are not tensors; pass [b, s] (or [b]) tensors")
        tokens = micro_batch["tokens"]
        if tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(f"{where}['tokens'] has shape {tuple(tokens.shape)} and dtype "
                             f"{tokens.dtype}; pass integer token ids of shape [b, s]")
        if need_loss_inputs:
            _check_loss_inputs(where, micro_batch)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        shapes = {tuple(mb["tokens"].shape) for mb in micro_batches}
        if len(shapes) > 1:  # p2p receive buffers are sized once per schedule from (s, b)
            raise ValueError(f"micro-batch token shapes {sorted(shapes)} differ; with pipeline "
                             f"parallelism pad every micro-batch to the same [b, s]")
    return list(micro_batches)


def _check_loss_inputs(where, micro_batch) -> None:
    tokens, mask = micro_batch["tokens"], micro_batch["loss_mask"]
    for key in ("loss_mask", "old_logp") + tuple(k for k in ("ref_logp", "engine_logp", "rollout_is_weight")
                                                if k in micro_batch):
        if tuple(micro_batch[key].shape) != tuple(tokens.shape):
            raise ValueError(f"{where}['{key}'] has shape {tuple(micro_batch[key].shape)}; it must "
                             f"match tokens {tuple(tokens.shape)} (per-token, aligned with tokens)")
    if bool((mask[:, 0] != 0).any()):
        raise ValueError(f"{where}['loss_mask'][:, 0] is non-zero; position 0 has no log-prob "
                         f"(no previous token): mask it out (prompt tokens are never in the loss)")
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{where}['loss_mask'] has values other than 0 and 1; pass a 0/1 mask")
    if "staleness" in micro_batch and tuple(micro_batch["staleness"].shape) != (tokens.shape[0],):
        raise ValueError(f"{where}['staleness'] has shape {tuple(micro_batch['staleness'].shape)}; pass [b] "
                         f"({tokens.shape[0]},): steps since each row was sampled")
    advantages = micro_batch["advantages"]
    if tuple(advantages.shape) not in ((tokens.shape[0],), tuple(tokens.shape)):
        raise ValueError(f"{where}['advantages'] has shape {tuple(advantages.shape)}; pass [b] "
                         f"({tokens.shape[0]},) or [b, s] {tuple(tokens.shape)}")
