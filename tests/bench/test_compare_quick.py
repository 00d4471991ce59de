"""tools/bench/compare_algorithms.py --quick end to end (the CI smoke test of the comparison study):
it trains each quick method through `python -m megatron_rpg.train` subprocesses, and the table,
results.json and the PNG it writes must parse and agree with each other."""
import json
import os
import re
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))
from compare_methods import QUICK_METHODS  # noqa: E402
from compare_report import sampled_tokens, steps_to_reach  # noqa: E402


def test_steps_to_reach_reads_the_trailing_five_step_mean():
    assert steps_to_reach([0.0, 1.0, 0.0, 0.0, 0.0, 0.0], 0.5) == 2  # (0 + 1) / 2
    assert steps_to_reach([0.0, 0.0, 1.0, 0.0, 0.0, 0.0], 0.34) is None  # best window mean 1/3
    assert steps_to_reach([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0], 0.6) == 8  # 3/5


def test_sampled_tokens_counts_svrpg_anchors_at_the_mean_length():
    steps = [{"num_tokens": 30.0, "num_sequences": 10.0}, {"num_tokens": 50.0, "num_sequences": 10.0,
                                                          "svrpg/anchor_sequences": 5.0}]
    assert sampled_tokens(steps) == 80.0 + 5.0 * 80.0 / 20.0


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    pytest.importorskip("matplotlib")
    output = str(tmp_path_factory.mktemp("compare"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "tools/bench/compare_algorithms.py", "--output", output, "--quick"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return output


def test_quick_study_writes_a_table_json_and_png_that_agree(quick_study):
    with open(os.path.join(quick_study, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    summary = {row["method"]: row for row in results["summary"]}
    assert sorted(summary) == sorted(QUICK_METHODS)
    for row in summary.values():
        assert row["task"] == "repeat-token" and row["seeds"] == 1 and row["train_iters"] == 8
        assert 0.0 <= row["heldout_mean"] <= 1.0
        # repeat-token responses never end early: every method samples 8 steps x 64 x 8 tokens
        assert row["sampled_tokens"] == 8 * 64 * 8
    for run in results["runs"]:  # the held-out score is the last evaluation in the run's own JSONL
        name = f"{run['task']}_{run['method']}_s{run['seed']}.jsonl"
        with open(os.path.join(quick_study, name), encoding="utf-8") as f:
            evals = [r for r in map(json.loads, f) if "eval/reward_mean" in r]
        assert [r["step"] for r in evals] == [0, 8]  # the trainer's default: before training and after the last step
        assert run["heldout"] == evals[-1]["eval/reward_mean"]
    trajectory = summary["r2vpo"]["lambda_trajectory"]
    assert trajectory[0] == [1, 1.0] and all(lam >= 0.0 for _, lam in trajectory)  # --r2vpo-lambda-init 1
    with open(os.path.join(quick_study, "results.md"), encoding="utf-8") as f:
        table = f.read()
    for method, row in summary.items():
        line = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
        mean = float(re.match(r"\| \S+ \| 1 \| ([0-9.]+) ± ([0-9.]+) \|", line).group(1))
        assert mean == pytest.approx(row["heldout_mean"], abs=5e-4)
    with open(os.path.join(quick_study, "curves.png"), "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    width, height = struct.unpack(">II", header[16:24])
    assert width > 300 and height > 200


def test_a_forked_run_is_the_run_of_the_command_line(quick_study, tmp_path):
    """The study forks its runs from a process that imported the trainer once: the same flags through
    `python -m megatron_rpg.train` must train bit-identically (same rewards, losses, gradients)."""
    with open(os.path.join(quick_study, f"repeat-token_{QUICK_METHODS[0]}_s0.result.json"), encoding="utf-8") as f:
        kept = json.load(f)
    argv = list(kept["argv"])
    own_log = str(tmp_path / "cli.jsonl")
    argv[argv.index("--log-jsonl") + 1] = own_log
    done = subprocess.run([sys.executable, "-m", "megatron_rpg.train", *argv], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(own_log, encoding="utf-8") as f:
        cli = [r for r in map(json.loads, f) if "reward_mean" in r]
    keys = ("reward_mean", "grad_norm", "kl_k3", "ratio_max", "num_tokens")
    assert [[r[k] for k in keys] for r in cli] == [[r[k] for k in keys] for r in kept["result"]["steps"]]


def test_report_only_tables_the_finished_runs_without_training(quick_study):
    with open(os.path.join(quick_study, "results.json"), encoding="utf-8") as f:
        before = json.load(f)
    done = subprocess.run([sys.executable, "tools/bench/compare_algorithms.py", "--output", quick_study, "--quick",
                           "--report-only"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(quick_study, "results.json"), encoding="utf-8") as f:
        after = json.load(f)
    assert after["runs"] == before["runs"] and after["summary"] == before["summary"] and after["missing"] == []
