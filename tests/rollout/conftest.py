"""The rollout tests' spawned runs, shared by test_embedded.py, test_kv_cache.py, test_lean_forward.py
and test_sglang_collective.py: one single-process run and one two-rank run (TP=2, PP=2, DP=2 in turn),
each building its models once."""
from __future__ import annotations

import pytest

from tests.distributed.harness import run_on_ranks
from tests.rollout.spawned_runs import single_process_body, two_rank_body


@pytest.fixture(scope="session")
def single():
    return run_on_ranks(single_process_body, world_size=1)[0]


@pytest.fixture(scope="session")
def two_ranks():
    return run_on_ranks(two_rank_body, world_size=2)
