"""--capo on --loss grpo through the real trainer (tiny preset, CPU, one process; docs/algorithms.md, CAPO).

Properties proved:
- it trains with masks: every step logs per-level and total rejection rates in [0, 1] (history and
  JSONL), total = the sum of the levels, some tokens rejected and some kept over the run, and the
  optimizer steps stay finite and non-zero;
- thresholds no token can exceed (τ_F = τ_H = 1e9) train bit for bit as plain --loss grpo: the masks
  and the hidden-state seam change nothing else (same rewards, losses, gradient norms, weights);
- flags: a --capo-* flag without --capo, and --capo with --svrpg, are refused naming the flag.
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
GRPO = ["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "--no-progress", "--no-eval", "--seed", "0",
        "--loss", "grpo", "--advantage-estimator", "grpo", "--train-iters", 3]
CAPO = ["--capo", "--capo-levels", "token", "sequence", "--capo-hessian-symmetric", "--capo-top-k", 8]
LEVELS = ("token", "sequence")


def _args(*extra):
    from megatron_rpg.training.config import parse_train_config
    return parse_train_config([str(x) for x in GRPO + list(extra)])


def body(rank, world_size, workdir):
    from megatron_rpg.training.loop import train

    torch.set_num_threads(1)
    log = os.path.join(workdir, "capo.jsonl")
    out = {"capo": train(_args(*CAPO, "--capo-tau-f", 0.02, "--capo-tau-h", 0.2, "--log-jsonl", log)),
           "plain": train(_args()), "open": train(_args(*CAPO, "--capo-tau-f", 1e9, "--capo-tau-h", 1e9))}
    with open(log, encoding="utf-8") as f:
        out["log"] = [json.loads(line) for line in f]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_on_ranks(body, world_size=1, args=(str(tmp_path_factory.mktemp("capo")),))[0]


def test_capo_rejects_some_tokens_and_logs_the_rates(runs):
    steps = runs["capo"]
    for step, line in zip(steps, runs["log"]):
        rates = [step[f"capo_rejected_{level}"] for level in LEVELS]
        assert all(0 <= rate <= 1 for rate in rates)
        assert step["capo_rejected_total"] == pytest.approx(sum(rates), abs=1e-12)
        assert line["capo_rejected_total"] == step["capo_rejected_total"]
        assert math.isfinite(step["grad_norm"]) and step["grad_norm"] > 0
    totals = [step["capo_rejected_total"] for step in steps]
    print("capo rejection rates per step:", [{level: round(step[f"capo_rejected_{level}"], 4) for level in LEVELS}
                                              for step in steps])
    assert max(totals) > 0 and min(totals) < 1


def test_thresholds_nothing_exceeds_train_exactly_as_plain_grpo(runs):
    for open_step, plain_step in zip(runs["open"], runs["plain"]):
        assert open_step["capo_rejected_total"] == 0
        for key, value in plain_step.items():
            if key not in ("step_time", "time", "elapsed_s") and not key.endswith("_s"):
                assert open_step[key] == value, key


def test_capo_flags_are_checked():
    with pytest.raises(SystemExit):
        _args("--capo-tau-h", 0.1)
    with pytest.raises(SystemExit):
        _args("--capo", "--svrpg")
