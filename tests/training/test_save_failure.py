"""A checkpoint save that fails on one rank fails on every rank (none waits forever in a collective),
the previous checkpoint stays the latest at --save, whole, and the failed staging folder is removed (real megatron-core, 2 gloo ranks, DP=2): rank 0
failing to write the metadata, rank 1 failing to collect its state (before the collective write),
rank 1 failing as its write returns."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.distributed.harness import run_on_ranks

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def body(rank, world_size, save_dir, where="rank0_metadata"):
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rpg.training import checkpointing
    from megatron_rpg.training.build import build_model_and_optimizer
    from megatron_rpg.training.config import parse_train_config

    torch.set_num_threads(1)
    args = parse_train_config(["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "--save", save_dir])
    initialize_parallel(1, 1, seed=0)
    model, optimizer, hf_config = build_model_and_optimizer(args)
    checkpointing.save_checkpoint(model, optimizer, None, hf_config, args, step=1, rank_state={"rank": rank})
    def broken(*_, **__):
        raise OSError("disk full (simulated)")

    if where == "rank0_metadata" and rank == 0:  # after the collective write of the tensors
        checkpointing.describe_checkpoint = broken
    if where == "rank1_state" and rank == 1:  # before it: rank 0 would wait in the write
        checkpointing._sharded_state = broken
    if where == "rank1_write" and rank == 1:  # its write done, the failure raised as it returns
        write = checkpointing.dist_checkpointing.save

        def write_then_fail(*args_, **kwargs):
            write(*args_, **kwargs)
            broken()
        checkpointing.dist_checkpointing = type("Failing", (), {"save": staticmethod(write_then_fail)})
    try:
        checkpointing.save_checkpoint(model, optimizer, None, hf_config, args, step=2, rank_state={"rank": rank})
        outcome = "saved"
    except (OSError, RuntimeError) as error:
        outcome = f"{type(error).__name__}: {error}"
    destroy_parallel()
    return outcome


def _assert_previous_checkpoint_kept(tmp_path, save_dir):
    from megatron_rpg.checkpoint.integrity import verify_checkpoint

    with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "1\n"
    with open(os.path.join(save_dir, "iter_0000001", "trainer_state.json")) as f:
        assert json.load(f)["step"] == 1  # the first checkpoint, untouched
    verify_checkpoint(os.path.join(save_dir, "iter_0000001"))
    assert os.listdir(tmp_path) == ["ckpt"]
    assert sorted(os.listdir(save_dir)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]  # no staging left


@pytest.mark.parametrize("where, what", [("rank1_state", "collect the checkpoint state"),
                                         ("rank1_write", "write the checkpoint")])
def test_a_save_failing_on_rank_1_fails_on_every_rank_and_keeps_the_previous_checkpoint(tmp_path, where, what):
    save_dir = str(tmp_path / "ckpt")
    outcomes = run_on_ranks(body, world_size=2, args=(save_dir, where), timeout_s=120)
    assert outcomes[1] == "OSError: disk full (simulated)"
    assert outcomes[0] == f"RuntimeError: rank 1 could not {what}: OSError: disk full (simulated)"
    _assert_previous_checkpoint_kept(tmp_path, save_dir)


def test_a_failed_save_fails_on_every_rank_and_keeps_the_previous_checkpoint(tmp_path):
    save_dir = str(tmp_path / "ckpt")
    outcomes = run_on_ranks(body, world_size=2, args=(save_dir,), timeout_s=300)
    assert outcomes[0] == "OSError: disk full (simulated)"
    assert outcomes[1].startswith("RuntimeError: rank 0 could not finish the checkpoint") and "disk full" in outcomes[1]
    _assert_previous_checkpoint_kept(tmp_path, save_dir)
