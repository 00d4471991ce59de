"""The optimizer step behind a finiteness guard: a step whose loss, gradient norm or optimizer state is
not finite is skipped, with parameters and Adam state left bit-identical.

    outcome = guarded_step(optimizer, loss=loss_value)
    outcome.updated, outcome.grad_norm, outcome.skipped      # skipped: why, or None

What megatron-core 0.16.1's own `optimizer.step()` checks, and what it misses:
- fp16 (a dynamic loss scaler): `prepare_grads` unscales the gradients and all-reduces `found_inf`;
  on an overflow megatron skips the step and backs the loss scale off. Kept as is.
- fp32 and bf16 (no grad scaler): nothing. `ChainedOptimizer.step` computes the norm, clips by
  max_norm / (norm + 1e-6) (an inf norm multiplies every gradient by 0, inf entries become NaN) and
  steps anyway: the moments decay and weight decay applies on a step that carries no signal; with
  --clip-grad 0 an inf gradient enters Adam's moments, which then freeze the weights for good.
This function runs megatron's steps one by one (prepare_grads, get_grad_norm, the clip of
`ChainedOptimizer.step`, step_with_ready_grads) with the checks between them:
1. megatron's found_inf (fp16 overflow; while the loss scale can still be lowered this is megatron's
   normal loss-scale search, reported as cause "overflow", which the trainer does not count towards
   --max-skipped-steps);
2. the loss (when given) is finite;
3. the global gradient norm is finite. megatron all-reduces it as a float32 sum of squares, so a
   finite norm also means every g² that Adam's second moment takes is finite (a gradient of 1e20
   is already an inf norm: skipped, where megatron's clip would have zeroed it);
4. every parameter (fp32 main copy) and Adam state tensor is finite (a state made non-finite
   before: loaded from a damaged checkpoint). From a finite state, a finite clipped gradient and a
   bounded --lr, Adam's update stays finite, so the check before each step is the check after the
   previous one.
Decisions agree on every rank: the norm is all-reduced by megatron, the state check over the
optimizer's grad-stats group (the whole world for the distributed optimizer, whose shards differ).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_rpg.megatron.compat import loss_scale_at_minimum, sub_optimizers


@dataclass(frozen=True)
class StepOutcome:
    """updated: the parameters moved; grad_norm: the global norm before clipping (None when megatron's
    loss scaler found inf first); skipped: why the step was skipped (None when it was not), and what
    was not finite: cause "overflow" (fp16 loss-scale search), "overflow_at_min_scale", "loss",
    "grad_norm" or "state"; or "nothing_kept": not taken, as the loss kept no token (nothing_kept_outcome)."""

    updated: bool
    grad_norm: float | None
    num_zeros: float | None = None
    skipped: str | None = None
    cause: str | None = None


@torch.no_grad()
def guarded_step(optimizer, *, loss: float | None = None) -> StepOutcome:
    """megatron's optimizer step (clip, Adam) unless something is non-finite (module docstring)."""
    if optimizer.prepare_grads():  # fp16: unscaled, found_inf all-reduced, loss scale backed off
        if loss_scale_at_minimum(optimizer):  # nothing left to back off: the gradient itself is not finite
            return StepOutcome(False, None, skipped="fp16 overflow at the minimum loss scale (megatron's found_inf)",
                               cause="overflow_at_min_scale")
        return StepOutcome(False, None, skipped="fp16 loss-scale overflow (megatron's found_inf)", cause="overflow")
    if loss is not None and not math.isfinite(float(loss)):
        return StepOutcome(False, None, skipped=f"non-finite loss {float(loss)}", cause="loss")
    grad_norm = float(optimizer.get_grad_norm())
    clip = float(optimizer.config.clip_grad)
    if not math.isfinite(grad_norm):
        return StepOutcome(False, grad_norm, skipped=f"non-finite gradient norm {grad_norm}",
                           cause="grad_norm")
    bad = non_finite_state_tensors(optimizer)
    if bad:
        return StepOutcome(False, grad_norm, skipped=f"{bad} non-finite parameter / Adam state tensor(s)",
                           cause="state")
    if clip > 0.0:
        _clip(optimizer, clip, grad_norm)
    num_zeros = optimizer.count_zeros() if optimizer.config.log_num_zeros_in_grad else None
    return StepOutcome(bool(optimizer.step_with_ready_grads()), grad_norm, num_zeros)


def nothing_kept_outcome() -> StepOutcome:
    """The step not taken for a mini-batch whose loss kept no token on any rank (--capo rejected them
    all): its gradient is exactly 0, parameters and Adam state stay as they are (training/update.py)."""
    return StepOutcome(False, 0.0, skipped="the loss kept no token (--capo rejected every response token)",
                       cause="nothing_kept")


def _clip(optimizer, max_norm: float, grad_norm: float) -> None:
    """The clip of megatron's ChainedOptimizer.step: every sub-optimizer's gradients by the global norm."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for sub in sub_optimizers(optimizer):
        if getattr(sub, "is_stub_optimizer", False):
            continue
        parameters = sub.get_parameters()
        if parameters:
            clip_grad_by_total_norm_fp32(parameters, max_norm=max_norm, total_norm=grad_norm,
                                         use_decoupled_grad=sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)


def state_tensors(optimizer) -> list[torch.Tensor]:
    """The tensors an optimizer step reads and writes: each sub-optimizer's (main) parameters and
    the floating-point tensors of its torch optimizer's state (Adam's exp_avg, exp_avg_sq, step)."""
    tensors = []
    for sub in sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                tensors.append(param)
                tensors.extend(value for value in inner.state.get(param, {}).values()
                               if isinstance(value, torch.Tensor) and value.is_floating_point())
    return tensors


def non_finite_state_tensors(optimizer) -> int:
    """How many state tensors (state_tensors) hold an inf or NaN, summed over the ranks of the
    optimizer's grad-stats group (so every rank takes the same decision)."""
    tensors = state_tensors(optimizer)
    device = tensors[0].device if tensors else torch.device("cpu")
    count = torch.zeros(1, dtype=torch.float64, device=device)
    for tensor in tensors:
        count += (~torch.isfinite(tensor).all()).double()
    if dist.is_initialized():
        dist.all_reduce(count, group=optimizer.get_grad_stats_parallel_group())
    return int(count.item())


__all__ = ["StepOutcome", "guarded_step", "nothing_kept_outcome", "non_finite_state_tensors", "state_tensors"]
