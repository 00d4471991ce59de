"""The learning-rate schedule (megatron/lr_schedule.py: megatron-core's OptimizerParamScheduler,
counted in RL steps) through the trainer.

Proved: each step's logged lr equals the closed form of warm-up + linear/cosine decay written out
here independently; a run resumed from a checkpoint continues the schedule (and the run) exactly;
biases and norms get no weight decay while matrices get --weight-decay; flags without effect are
refused.
"""
from __future__ import annotations

import math
import os
import re

import pytest
import torch

from megatron_rpg.training.config import parse_train_config
from tests.distributed.harness import run_on_ranks

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = ["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "--no-progress", "--seed", "0"]
LR, MIN_LR, WARMUP, DECAY = 0.003, 0.0005, 2, 5
SCHEDULE = {"cosine": ["--lr-warmup-iters", WARMUP, "--lr-warmup-init", 0.001, "--lr-decay-style", "cosine",
                       "--lr-decay-iters", DECAY, "--min-lr", MIN_LR],
            "linear": ["--lr-warmup-iters", WARMUP, "--lr-decay-style", "linear", "--min-lr", MIN_LR]}


def closed_form(style: str, step: int, *, decay: int, init: float) -> float:
    """lr of RL step `step` (0-based: steps already taken)."""
    if step <= WARMUP:
        return init + (LR - init) * step / WARMUP
    if step > decay:
        return MIN_LR
    ratio = (step - WARMUP) / (decay - WARMUP)
    coefficient = 1 - ratio if style == "linear" else 0.5 * (1 + math.cos(math.pi * ratio))
    return MIN_LR + coefficient * (LR - MIN_LR)


def _config(*extra):
    return parse_train_config(QUICK + [str(x) for x in extra])


def runs_body(rank, world_size, workdir):
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rpg.training.build import build_lr_scheduler_at, build_model_and_optimizer
    from megatron_rpg.training.loop import train

    torch.set_num_threads(1)
    out = {style: train(_config("--train-iters", 7, *flags)) for style, flags in SCHEDULE.items()}
    half = os.path.join(workdir, "half")
    train(_config("--train-iters", 3, "--save", half, *SCHEDULE["cosine"]))
    out["resumed"] = train(_config("--train-iters", 7, "--load", half, *SCHEDULE["cosine"]))
    initialize_parallel(1, 1, seed=0)
    config = _config("--weight-decay", 0.1, *SCHEDULE["linear"])
    model, optimizer, _ = build_model_and_optimizer(config)
    build_lr_scheduler_at(config, optimizer, 0)
    out["decay_by_shape"] = sorted({(p.dim(), group["weight_decay"]) for group in optimizer.param_groups
                                    for p in group["params"]})
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_on_ranks(runs_body, world_size=1, args=(str(tmp_path_factory.mktemp("lr")),))[0]


@pytest.mark.parametrize("style", ["cosine", "linear"])
def test_each_steps_lr_is_the_closed_form_of_warmup_and_decay(runs, style):
    decay, init = (DECAY, 0.001) if style == "cosine" else (7, 0.0)  # linear decays over --train-iters
    logged = [step["lr"] for step in runs[style]]
    assert logged == pytest.approx([closed_form(style, s, decay=decay, init=init) for s in range(7)],
                                   rel=1e-15, abs=0)
    assert logged[0] == init and logged[WARMUP] == LR


def test_a_resumed_run_continues_the_schedule_and_the_run_exactly(runs):
    full, resumed = runs["cosine"], runs["resumed"]
    assert [s["step"] for s in resumed] == [4, 5, 6, 7]
    for ours, reference in zip(resumed, full[3:]):
        assert (ours["lr"], ours["reward_mean"], ours["grad_norm"]) == \
            (reference["lr"], reference["reward_mean"], reference["grad_norm"])


def test_biases_and_norms_get_no_weight_decay_matrices_do(runs):
    assert runs["decay_by_shape"] == [(1, 0.0), (2, 0.1)]


@pytest.mark.parametrize("argv, message", [
    (["--min-lr", "1e-7"], "--min-lr has no effect with --lr-decay-style constant"),
    (["--lr-decay-iters", "9"], "--lr-decay-iters has no effect with --lr-decay-style constant"),
    (["--lr-warmup-init", "1e-7"], "--lr-warmup-init has no effect without --lr-warmup-iters > 0"),
    (["--lr-decay-style", "cosine", "--min-lr", "1"], r"--min-lr 1.0 must lie in \[0, --lr 0.003\]"),
    (["--lr-warmup-iters", "150"], r"--lr-warmup-iters 150 must lie in \[0, --lr-decay-iters 150\)"),
    (["--lr-decay-style", "step"], "invalid choice: 'step'"),
])
def test_schedule_flags_that_cannot_work_are_refused_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_train_config(QUICK + argv)
    error = capsys.readouterr().err
    assert re.search(message, error), error
