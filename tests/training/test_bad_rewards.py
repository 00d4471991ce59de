"""A bad reward is a fault of one response, not of the run (--on-bad-reward; rewards/guard.py), on
tiny single-process runs (real megatron-core, CPU) whose task returns NaN for response 0 and 1e300
for response 1 of the first group at every draw.

Properties proved:
- `min` (the default): both runs go on; response 0 gets the task's minimum reward, 1e300 is clamped
  to REWARD_LIMIT, both counted (bad_rewards, clamped_rewards), every advantage finite;
- `mask`: response 0 has an all-zero loss mask and advantage 0 (zero weight in the step) and its
  group's other advantages are the estimator's on the group without it (float64 closed form);
- `error`: the run stops with a ValueError naming the response and the flag.
Seen failing on main: the run aborted with "rewards contains 1 non-finite value(s)".
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.distributed.harness import run_on_ranks

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = ["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "--no-progress", "--seed", "0",
         "--train-iters", "2", "--rollout-batch-size", "2", "--micro-batch-size", "8"]  # 16 sequences a step


def body(rank, world_size):
    from megatron_rpg.data.synthetic import RepeatTokenTask
    from megatron_rpg.training import loop
    from megatron_rpg.training.config import parse_train_config

    torch.set_num_threads(1)
    reward = RepeatTokenTask.reward

    def faulty(self, responses, targets):
        rewards = reward(self, responses, targets).clone()
        rewards[0], rewards[1] = float("nan"), 1e300
        return rewards

    RepeatTokenTask.reward = faulty
    recorded = []
    to_micro_batches = loop.to_micro_batches

    def recording(config, groups):
        micro_batches = to_micro_batches(config, groups)
        recorded.append(([{key: value.clone() for key, value in group.items() if torch.is_tensor(value)}
                          for group in groups], [dict(mb) for mb in micro_batches]))
        return micro_batches

    loop.to_micro_batches = recording
    out = {}
    for policy in ("min", "mask"):
        recorded.clear()
        out[policy] = {"history": loop.train(parse_train_config(QUICK + ["--on-bad-reward", policy])),
                       "steps": list(recorded)}
    try:
        loop.train(parse_train_config(QUICK + ["--on-bad-reward", "error"]))
        out["error"] = None
    except ValueError as error:
        out["error"] = str(error)
    return out


@pytest.fixture(scope="module")
def runs():
    return run_on_ranks(body, world_size=1, timeout_s=600)[0]


@pytest.mark.parametrize("policy", ["min", "mask"])
def test_a_nan_and_a_1e300_reward_do_not_abort_the_run(runs, policy):
    from megatron_rpg.rewards.guard import REWARD_LIMIT

    history = runs[policy]["history"]
    assert [step["step"] for step in history] == [1, 2]
    for step in history:
        assert step["bad_rewards"] == 1.0 and step["clamped_rewards"] == 1.0
        assert step["reward_over_budget"] == 0.0  # reported; the toy task has no time budget
        assert all(torch.isfinite(torch.tensor(value)) for value in step.values() if isinstance(value, float))
    for groups, micro_batches in runs[policy]["steps"]:
        assert groups[0]["rewards"][1] == REWARD_LIMIT
        assert bool(groups[0]["bad_rewards"][0]) and not bool(groups[0]["bad_rewards"][1:].any())
        assert all(bool(torch.isfinite(mb["advantages"]).all()) for mb in micro_batches)


def test_min_gives_the_bad_response_the_task_minimum(runs):
    from megatron_rpg.data.synthetic import RepeatTokenTask

    for groups, _ in runs["min"]["steps"]:
        assert groups[0]["rewards"][0] == RepeatTokenTask.reward_range[0]
        assert bool(groups[0]["reward_keep"].all())


def test_mask_gives_the_bad_response_zero_weight(runs):
    from megatron_rpg.losses import compute_advantages

    for groups, micro_batches in runs["mask"]["steps"]:
        first = micro_batches[0]
        assert float(first["loss_mask"][0].abs().sum()) == 0.0 and float(first["advantages"][0]) == 0.0
        assert float(first["loss_mask"][1:].sum()) > 0  # only that response
        assert groups[0]["reward_keep"].tolist() == [False] + [True] * (len(groups[0]["rewards"]) - 1)
        others = groups[0]["rewards"][1:].double()
        expected = compute_advantages("rpg", others, group_size=len(others))  # the group without it
        size = len(groups[0]["rewards"])
        assert torch.allclose(first["advantages"][1:size].double(), expected.float().double(), rtol=0, atol=0)


def test_error_stops_the_run_naming_the_response(runs):
    assert runs["error"] is not None
    assert "response 0" in runs["error"] and "nan" in runs["error"] and "--on-bad-reward" in runs["error"]


def test_the_flag_sets_the_rollout_config_and_refuses_other_values(capsys):
    from megatron_rpg.training.config import parse_train_config

    assert parse_train_config(["--model-preset", "tiny"]).rollout.on_bad_reward == "min"
    assert parse_train_config(["--model-preset", "tiny", "--on-bad-reward", "mask"]).rollout.on_bad_reward == "mask"
    with pytest.raises(SystemExit):
        parse_train_config(["--model-preset", "tiny", "--on-bad-reward", "skip"])
    assert "--on-bad-reward" in capsys.readouterr().err
