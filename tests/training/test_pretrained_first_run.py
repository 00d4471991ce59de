"""A requeue-friendly job: --load DIR --save DIR --pretrained-checkpoint P (Megatron-LM's names).

Proved: the first run (DIR empty) starts from P's weights (its first step equals a --load P
--finetune run's, bit for bit) and saves into DIR; the same command again resumes from DIR's latest
checkpoint: with --train-iters reached it trains nothing and exits 0 (a finished job requeued), with
a larger --train-iters it continues from the saved step.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.distributed.harness import run_on_ranks

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = ["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "--no-progress", "--no-eval", "--seed", "0"]


def body(rank, world_size, workdir):
    from megatron_rpg.train import main
    from megatron_rpg.training.config import parse_train_config
    from megatron_rpg.training.loop import train

    torch.set_num_threads(1)
    pretrained, job = os.path.join(workdir, "pretrained"), os.path.join(workdir, "job")
    args = lambda *extra: parse_train_config(QUICK + [str(x) for x in extra])  # noqa: E731
    train(args("--train-iters", 1, "--save", pretrained, "--seed", 5))  # weights that differ from step 0's
    out = {"reference": train(args("--train-iters", 1, "--load", pretrained, "--finetune"))}
    requeueable = ["--load", job, "--save", job, "--pretrained-checkpoint", pretrained]
    out["first"] = train(args("--train-iters", 2, *requeueable))
    out["saved"] = sorted(os.listdir(job))
    out["again_exit"] = main(QUICK + ["--train-iters", "2", *requeueable])
    out["continued"] = train(args("--train-iters", 3, *requeueable))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_on_ranks(body, world_size=1, args=(str(tmp_path_factory.mktemp("requeue")),))[0]


def test_the_first_run_starts_from_the_pretrained_weights_and_saves_into_the_job_folder(runs):
    assert [s["step"] for s in runs["first"]] == [1, 2]
    first, reference = runs["first"][0], runs["reference"][0]
    assert (first["reward_mean"], first["grad_norm"]) == (reference["reward_mean"], reference["grad_norm"])
    assert "iter_0000002" in runs["saved"] and "latest_checkpointed_iteration.txt" in runs["saved"]


def test_the_same_command_again_resumes_instead_of_starting_over(runs):
    assert runs["again_exit"] == 0  # finished: nothing to train, not an error
    assert [s["step"] for s in runs["continued"]] == [3]


def test_pretrained_checkpoint_without_load_and_save_is_refused(capsys):
    from megatron_rpg.training.config import parse_train_config

    with pytest.raises(SystemExit):
        parse_train_config(QUICK + ["--pretrained-checkpoint", "somewhere"])
    assert "--pretrained-checkpoint is read only on a first run of --load DIR --save DIR" in capsys.readouterr().err
