import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import run_on_ranks


def _all_reduce_rank(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on purpose")
    return rank


def test_harness_runs_a_collective_on_two_gloo_ranks():
    assert run_on_ranks(_all_reduce_rank, world_size=2) == [3.0, 3.0]


def test_harness_reraises_a_rank_failure_with_its_traceback():
    with pytest.raises(RuntimeError, match="(?s)rank 1 failed.*boom on purpose"):
        run_on_ranks(_fail_on_rank_one, world_size=2, timeout_s=60)
