"""A checkpoint save that fails on rank 0 fails on every rank (none waits forever in a collective),
and the previous checkpoint at --save stays whole (real megatron-core, 2 gloo ranks, DP=2)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.distributed.harness import run_on_ranks

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def body(rank, world_size, save_dir):
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rpg.training import checkpointing
    from megatron_rpg.training.build import build_model_and_optimizer
    from megatron_rpg.training.config import parse_train_config

    torch.set_num_threads(1)
    args = parse_train_config(["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "--save", save_dir])
    initialize_parallel(1, 1, seed=0)
    model, optimizer, hf_config = build_model_and_optimizer(args)
    checkpointing.save_checkpoint(model, optimizer, None, hf_config, args, step=1, rank_state={"rank": rank})
    if rank == 0:  # the metadata write fails after the collective write of the tensors
        def broken(*_, **__):
            raise OSError("disk full (simulated)")
        checkpointing.describe_checkpoint = broken
    try:
        checkpointing.save_checkpoint(model, optimizer, None, hf_config, args, step=2, rank_state={"rank": rank})
        outcome = "saved"
    except (OSError, RuntimeError) as error:
        outcome = f"{type(error).__name__}: {error}"
    destroy_parallel()
    return outcome


def test_a_failed_save_fails_on_every_rank_and_keeps_the_previous_checkpoint(tmp_path):
    save_dir = str(tmp_path / "ckpt")
    outcomes = run_on_ranks(body, world_size=2, args=(save_dir,), timeout_s=300)
    assert outcomes[0] == "OSError: disk full (simulated)"
    assert outcomes[1].startswith("RuntimeError: rank 0 could not finish the checkpoint") and "disk full" in outcomes[1]
    with open(os.path.join(save_dir, "trainer_state.json")) as f:
        assert json.load(f)["step"] == 1  # the first checkpoint, untouched
    leftovers = [name for name in os.listdir(tmp_path) if name != "ckpt"]
    assert leftovers == []  # the failed staging folder was removed
