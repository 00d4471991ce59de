"""Wrap megatron model chunks in megatron's DDP and build the megatron Adam optimizer, configured so
that the gradient of one `rl_forward_backward` call is the exact GLOBAL token mean.

    model, optimizer = setup_model_and_optimizer([gpt_model], lr=1e-6, clip_grad=1.0,
                                                 use_distributed_optimizer=True)

What "exact global token mean" needs from megatron-core 0.16.1 (docs/architecture.md, "The loss seam"):
- `TransformerConfig.calculate_per_token_loss = True`: the schedule leaves each micro-batch's loss
  sum alone (no `/ num_tokens`, no `/ num_microbatches`) and sums the returned token counts;
- `DistributedDataParallelConfig(average_in_collective=False)`: DDP's pre-reduction scale is 1 and
  the reduce(-scatter) uses SUM, so after the DP reduction the grad buffer holds Σ∇(loss sums);
- `config.finalize_model_grads_func = finalize_model_grads`: after the last micro-batch it
  broadcasts the token count from the last pipeline stage, all-reduces it over DP×CP and multiplies
  the grad buffers by 1/N.  Net gradient:

      g = (1/N) · Σ_{DP ranks} Σ_{micro-batches} ∇ Σ_t mask_t · loss_t,   N = Σ_{DP} Σ_{mb} Σ_t mask_t,

  i.e. the gradient of the token mean over the whole global batch, independent of how tokens are
  split into micro-batches, pipeline stages or DP ranks (up to float summation order);
- `config.grad_scale_func = optimizer.scale_loss` (loss scaling for fp16; ×1 otherwise) and
  `config.no_sync_func = ddp.no_sync` (grads of micro-batches accumulate locally; the DP reduction
  runs once, in finalize).
"""
from __future__ import annotations

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_rpg.losses.validation import check_range


def setup_model_and_optimizer(model_chunks, *, lr: float, weight_decay: float = 0.0,
                              adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                              clip_grad: float = 1.0, use_distributed_optimizer: bool = False,
                              grad_reduce_in_fp32: bool = True, check_for_nan_in_grad: bool = False,
                              min_lr: float = 0.0):
    """Returns `(ddp_model_chunks, optimizer)`: a list of megatron `DistributedDataParallel` modules
    (one per model chunk) and the megatron optimizer (a `ChainedOptimizer` around Adam, distributed
    over the DP group when `use_distributed_optimizer`). Mutates the chunks' shared
    `TransformerConfig` (per-token loss on; finalize / grad-scale / no-sync hooks set).

    clip_grad: global gradient-norm clip (0 disables). weight_decay is decoupled (AdamW) as in
    megatron. min_lr is the floor of a decaying schedule (megatron/lr_schedule.py), kept by megatron in
    each parameter group. bf16/fp16 training follows the model config (`config.bf16` / `config.fp16`).
    """
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if not chunks:
        raise ValueError("model_chunks is empty; pass the megatron model chunk(s) built for this rank")
    for index, chunk in enumerate(chunks):
        if isinstance(chunk, DistributedDataParallel):
            raise ValueError(f"model_chunks[{index}] is already wrapped in DistributedDataParallel; "
                             f"pass the bare GPTModel chunk(s)")
        if not hasattr(chunk, "config"):
            raise ValueError(f"model_chunks[{index}] ({type(chunk).__name__}) has no megatron "
                             f"`config`; pass megatron-core model chunks (e.g. from build_gpt_model)")
    check_range("lr", lr, 0.0)
    check_range("weight_decay", weight_decay, 0.0)
    check_range("clip_grad", clip_grad, 0.0)
    check_range("adam_eps", adam_eps, 0.0, low_inclusive=False)
    for name, beta in zip(("adam_betas[0]", "adam_betas[1]"), adam_betas):
        check_range(name, beta, 0.0, 1.0, high_inclusive=False)

    config = chunks[0].config
    if config.num_moe_experts and not config.calculate_per_token_loss:
        # MoE routers read the flag when they are built; flipping it now would mis-scale aux losses.
        raise ValueError("this MoE model was built with calculate_per_token_loss=False; build it "
                         "with calculate_per_token_loss=True for the exact global token mean")
    config.calculate_per_token_loss = True  # DDP reads it in __init__: set before wrapping

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=False,  # one reduction in finalize_model_grads, after the last micro-batch
        use_distributed_optimizer=use_distributed_optimizer,
        average_in_collective=False,  # SUM over DP; the 1/N comes from the global token count
        check_for_nan_in_grad=check_for_nan_in_grad,
    )
    # Only the first chunk is bucketed (megatron's rule for virtual pipeline chunks).
    ddp_chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                          disable_bucketing=index > 0)
                  for index, chunk in enumerate(chunks)]
    for chunk in ddp_chunks:
        chunk.broadcast_params()  # DP replicas start from rank 0's weights

    optimizer_config = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay, adam_beta1=adam_betas[0],
        adam_beta2=adam_betas[1], adam_eps=adam_eps, clip_grad=clip_grad,
        use_distributed_optimizer=use_distributed_optimizer,
        bf16=bool(config.bf16), fp16=bool(config.fp16), params_dtype=config.params_dtype,
    )
    optimizer = get_megatron_optimizer(optimizer_config, ddp_chunks)

    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [chunk.no_sync for chunk in ddp_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return ddp_chunks, optimizer


_SETUP_HINT = ("wrap the bare model with megatron_rpg.megatron.optimizer_setup."
               "setup_model_and_optimizer, which sets it")


def check_global_mean_setup(chunk, *, forward_only: bool = False) -> None:
    """ValueError naming the field when `chunk` lacks a setting the exact global mean relies on (the
    module docstring); without them megatron silently normalises per micro-batch (and per DP rank).
    Forward-only needs only calculate_per_token_loss (else megatron divides the returned loss sum)."""
    config = getattr(chunk, "config", None)
    if config is None:
        raise ValueError(f"the model chunk ({type(chunk).__name__}) has no megatron `config`; pass "
                         f"megatron-core model chunks wrapped by setup_model_and_optimizer")
    if config.calculate_per_token_loss is not True:
        raise ValueError(f"model config calculate_per_token_loss={config.calculate_per_token_loss!r}; "
                         f"the exact global mean needs True (else megatron divides each micro-batch's "
                         f"loss by its own token count): {_SETUP_HINT}, or set the field to True "
                         f"before wrapping in DistributedDataParallel")
    if forward_only:
        return
    ddp_config = getattr(chunk, "ddp_config", None)
    if ddp_config is None:
        raise ValueError(f"the model chunk ({type(chunk).__name__}) is not wrapped in megatron's "
                         f"DistributedDataParallel (no grad buffers); {_SETUP_HINT}")
    if ddp_config.average_in_collective is not False:
        raise ValueError(f"DDP config average_in_collective={ddp_config.average_in_collective!r}; the "
                         f"exact global mean needs False (SUM over DP, then one 1/N): {_SETUP_HINT}, "
                         f"or wrap with DistributedDataParallelConfig(average_in_collective=False)")
    if config.finalize_model_grads_func is None:
        raise ValueError("model config finalize_model_grads_func=None; the exact global mean needs "
                         "megatron.core.distributed.finalize_model_grads (DP reduction and the 1/N "
                         f"scaling): {_SETUP_HINT}, or set the field to finalize_model_grads")


def bare_model(chunk):
    """The GPTModel inside megatron's wrappers (DistributedDataParallel, Float16Module)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def zero_grad_buffers(ddp_model_chunks) -> None:
    """Zero the DDP grad buffers (`param.main_grad`) and drop `param.grad` before a new gradient is
    accumulated. Dropping matters: megatron's fp32 optimizer step sets `param.grad = param.main_grad`
    and leaves it so; autograd would then accumulate the next backward into main_grad itself and
    DDP's hook add it a second time (the first micro-batch after every step counted twice), which is
    why megatron-LM's train_step also calls optimizer.zero_grad()."""
    for chunk in ddp_model_chunks:
        chunk.zero_grad_buffer()
        for param in chunk.parameters():
            param.grad = None


__all__ = ["bare_model", "check_global_mean_setup", "setup_model_and_optimizer", "zero_grad_buffers"]
