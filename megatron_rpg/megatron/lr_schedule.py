"""The learning-rate schedule: megatron-core's own OptimizerParamScheduler (Megatron-LM's warm-up
and decay), counted in RL steps (`--train-iters`).

    scheduler = build_lr_scheduler(optimizer, LRSchedule(lr=1e-6, warmup_iters=10, decay_style="cosine",
                                                         decay_iters=500, min_lr=1e-7))
    ... one RL step (its --num-mini-batches optimizer steps all use the current lr) ...
    scheduler.step(1)

The learning rate of step s (s = 0, 1, ...: the number of RL steps already taken):
    warm-up, s ≤ W:      lr_init + (lr − lr_init) · s / W             (W = --lr-warmup-iters > 0)
    constant:            lr
    linear / cosine:     min_lr + c · (lr − min_lr), c = 1 − r or ½(1 + cos πr), r = (s − W) / (D − W)
    after s > D:         min_lr                                       (D = --lr-decay-iters)
Like verl's (and unlike Megatron-LM's per-optimizer-step count), one unit is one RL step, the unit of
--train-iters; the count is the step number itself, so a resumed run sets it from the checkpoint's
step (`scheduler.step(start)`) and continues the schedule exactly. Weight decay stays constant;
megatron's parameter groups give biases and 1-D weights (norms) none (wd_mult 0), as Megatron-LM does.
"""
from __future__ import annotations

import dataclasses

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

LR_DECAY_STYLES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    lr: float
    weight_decay: float = 0.0
    min_lr: float = 0.0
    warmup_iters: int = 0
    warmup_init: float = 0.0
    decay_style: str = "constant"
    decay_iters: int = 1

    def __post_init__(self):
        if self.decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"--lr-decay-style {self.decay_style!r} must be one of {list(LR_DECAY_STYLES)}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr {self.min_lr} must lie in [0, --lr {self.lr}]")
        if not 0 <= self.warmup_init <= self.lr:
            raise ValueError(f"--lr-warmup-init {self.warmup_init} must lie in [0, --lr {self.lr}]")
        if self.decay_iters < 1:
            raise ValueError(f"--lr-decay-iters {self.decay_iters} must be >= 1")
        if not 0 <= self.warmup_iters < self.decay_iters:
            raise ValueError(f"--lr-warmup-iters {self.warmup_iters} must lie in [0, --lr-decay-iters "
                             f"{self.decay_iters}) (the decay starts after the warm-up)")


def build_lr_scheduler(optimizer, schedule: LRSchedule) -> OptimizerParamScheduler:
    """Megatron's scheduler over `optimizer`'s parameter groups; it sets the lr of step 0 at once."""
    return OptimizerParamScheduler(
        optimizer, init_lr=schedule.warmup_init, max_lr=schedule.lr, min_lr=schedule.min_lr,
        lr_warmup_steps=schedule.warmup_iters, lr_decay_steps=schedule.decay_iters,
        lr_decay_style=schedule.decay_style, start_wd=schedule.weight_decay, end_wd=schedule.weight_decay,
        wd_incr_steps=schedule.decay_iters, wd_incr_style="constant")


def current_lr(optimizer) -> float:
    """The lr of the parameter groups that follow the default schedule (what Megatron-LM logs)."""
    for group in optimizer.param_groups:
        if group.get("default_config", True):
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])
