"""--loss r2vpo through the real trainer (tiny preset, CPU, one process; docs/algorithms.md, 3a. R²VPO).

Properties proved:
- it trains: every step takes finite, non-zero optimizer steps, logs Var̂(w) and λ (history and
  JSONL), and λ follows the dual ascent rule from the logged Var̂ exactly, step to step;
- --r2vpo-reuse-steps 2 trains on the last two rollout batches too: the reused share of the
  units is 0, 1/2, 2/3, 2/3 over the first steps, and --r2vpo-stale-clip truncates some of them;
- a run saved after step 2 and resumed in a new process continues bit-exactly: the same metrics
  (λ, Var̂, the reused share, rewards, gradient norms) and final weights as the uninterrupted run,
  so λ and the kept batches are restored from the checkpoint.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from tests.distributed.harness import run_on_ranks

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DELTA, DUAL_LR = 0.01, 5.0
R2VPO = ["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "--no-progress", "--no-eval", "--seed", "0",
         "--loss", "r2vpo", "--r2vpo-reuse-steps", 2, "--r2vpo-stale-clip", 1.2, "--r2vpo-delta", DELTA,
         "--r2vpo-dual-lr", DUAL_LR, "--r2vpo-lambda-init", 0.5]


def _args(*extra):
    from megatron_rpg.training.config import parse_train_config
    return parse_train_config([str(x) for x in R2VPO + list(extra)])


def _weights(directory):
    from megatron_rpg.megatron.optimizer_setup import bare_model
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rpg.training.build import build_model_and_optimizer

    initialize_parallel(1, 1, seed=9)
    model, _, _ = build_model_and_optimizer(_args("--load", directory, "--finetune"))
    weights = {name: p.detach().clone() for name, p in bare_model(model[0]).named_parameters()}
    destroy_parallel()
    return weights


def body(rank, world_size, workdir):
    from megatron_rpg.training.loop import train

    torch.set_num_threads(1)
    path = {name: os.path.join(workdir, name) for name in ("full", "half", "resumed")}
    log = os.path.join(workdir, "full.jsonl")
    out = {"full": train(_args("--train-iters", 4, "--save", path["full"], "--log-jsonl", log))}
    with open(log, encoding="utf-8") as f:
        out["log"] = [json.loads(line) for line in f]
    train(_args("--train-iters", 2, "--save", path["half"]))
    out["resumed"] = train(_args("--train-iters", 4, "--load", path["half"], "--save", path["resumed"]))
    out["weights"] = {name: _weights(path[name]) for name in ("full", "resumed")}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_on_ranks(body, world_size=1, args=(str(tmp_path_factory.mktemp("r2vpo")),))[0]


def test_r2vpo_trains_and_logs_the_ratio_variance_and_lambda(runs):
    steps = runs["full"]
    for step in steps:
        assert math.isfinite(step["grad_norm"]) and step["grad_norm"] > 0
        assert step["r2vpo/ratio_var"] > 0  # the second mini-batch and the reused rows are off-policy
    assert steps[0]["r2vpo/lambda"] == 0.5
    for step, following in zip(steps, steps[1:]):
        assert step["r2vpo/lambda_next"] == max(0.0, step["r2vpo/lambda"] + DUAL_LR * (step["r2vpo/ratio_var"] - DELTA))
        assert following["r2vpo/lambda"] == step["r2vpo/lambda_next"]
    assert [line["r2vpo/lambda"] for line in runs["log"]] == [step["r2vpo/lambda"] for step in steps]
    assert [line["r2vpo/ratio_var"] for line in runs["log"]] == [step["r2vpo/ratio_var"] for step in steps]


def test_reuse_trains_on_the_last_two_batches_and_truncates_some_ratios(runs):
    steps = runs["full"]
    assert [step["r2vpo/stale_fraction"] for step in steps] == pytest.approx([0, 1 / 2, 2 / 3, 2 / 3], abs=1e-12)
    assert [step["num_tokens"] for step in steps] == [512.0, 1024.0, 1536.0, 1536.0]
    assert steps[0]["r2vpo/stale_clip_frac"] == 0 and max(step["r2vpo/stale_clip_frac"] for step in steps) > 0
    # only reused rows are truncated: no more than the reused share
    assert all(step["r2vpo/stale_clip_frac"] <= step["r2vpo/stale_fraction"] for step in steps)


def test_a_resumed_r2vpo_run_continues_lambda_and_the_kept_batches_bit_exactly(runs):
    full, resumed = runs["full"], runs["resumed"]
    assert [step["step"] for step in resumed] == [3, 4]
    for ours, reference in zip(resumed, full[2:]):
        assert ours.keys() == reference.keys()
        for name in ours:
            if name != "elapsed_s":
                assert ours[name] == reference[name], name
    weights = runs["weights"]
    assert weights["full"].keys() == weights["resumed"].keys()
    for name, tensor in weights["full"].items():
        assert torch.equal(weights["resumed"][name], tensor), name
