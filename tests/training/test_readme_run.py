"""The README's first command (examples/cpu_demo.sh: the trainer on examples/tiny_cpu.yaml with a
--log-jsonl file), here with 6 steps, run as a user runs it: a new process.

Properties proved:
- it ends with the line `eval accuracy: before A -> after B (...)`, A and B the first and last
  evaluations logged in the JSONL (step 0 and the last step), preceded by where the logs and the
  plot were written; the plot is a PNG, and so is `python -m megatron_rpg.plot RUN.jsonl -o X`'s;
- every JSONL line is strict JSON;
- megatron-core's Apex/TE fallback news is one warning, not six, and no other megatron warning shows;
- --log-samples' triples are the decoded prompt, response and reward of the step's first responses.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.distributed  # spawns a trainer process
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    pytest.importorskip("matplotlib", reason="matplotlib is pinned in requirements-cpu.txt")
    folder = tmp_path_factory.mktemp("demo")
    log = str(folder / "metrics.jsonl")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO] + env.get("PYTHONPATH", "").split(os.pathsep)))
    done = subprocess.run([sys.executable, "-m", "megatron_rpg.train", "--config", "examples/tiny_cpu.yaml",
                           "--log-jsonl", log, "--train-iters", "6", "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, log


def test_the_demo_script_runs_this_configuration():
    text = open(os.path.join(REPO, "examples", "cpu_demo.sh")).read()
    assert re.search(r"-m megatron_rpg\.train --config examples/tiny_cpu\.yaml --log-jsonl \"\$run_dir/metrics\.jsonl\" \"\$@\"", text)


def test_the_run_ends_with_the_eval_line_and_says_where_logs_and_plot_are(demo_run):
    done, log = demo_run
    lines = done.stdout.strip().splitlines()
    match = re.fullmatch(r"eval accuracy: before (\d\.\d{3}) -> after (\d\.\d{3}) \(Mean@8 over 32 held-out "
                         r"prompts, steps 0 -> 6, temperature 1; correct: .*reward 1\)\)", lines[-1])
    assert match, lines[-1]
    assert lines[-2] == f"logs: {log} | plot: {log[:-len('.jsonl')]}.png"
    with open(log[:-len(".jsonl")] + ".png", "rb") as f:
        assert f.read(8) == PNG_MAGIC
    with open(log, encoding="utf-8") as f:
        records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}")) for line in f]
    assert [r["step"] for r in records] == list(range(7))
    evaluated = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in evaluated] == [0, 6]
    assert match.groups() == tuple(f"{r['eval/accuracy']:.3f}" for r in evaluated)


def test_apex_and_te_fallback_is_one_warning(demo_run):
    stderr = demo_run[0].stderr
    assert stderr.count("Transformer Engine and Apex are not installed") == 1, stderr
    assert "Falling back" not in stderr and "full scope is deprecated" not in stderr


def test_plot_command_writes_a_png(demo_run, tmp_path, capsys):
    from megatron_rpg.plot import main

    out = str(tmp_path / "again.png")
    assert main([demo_run[1], "-o", out]) == 0
    assert capsys.readouterr().out.strip() == f"plot: {out}"
    with open(out, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    empty = tmp_path / "empty.jsonl"
    empty.write_text("not json\n")
    assert main([str(empty)]) == 2


def test_logged_samples_are_the_decoded_first_responses():
    from megatron_rpg.data.synthetic import RepeatTokenTask
    from megatron_rpg.training.rollouts import decoded_samples

    group = dict(tokens=torch.tensor([[3, 3, 3, 0], [3, 5, 3, 3]]), prompt_lengths=torch.tensor([1, 1]),
                 response_lengths=torch.tensor([2, 3]), rewards=torch.tensor([1.0, 2 / 3], dtype=torch.float64))
    samples = decoded_samples([group, group], RepeatTokenTask(16), 3)
    assert samples == [{"prompt": "3", "response": "3 3", "reward": 1.0},
                       {"prompt": "3", "response": "5 3 3", "reward": 2 / 3},
                       {"prompt": "3", "response": "3 3", "reward": 1.0}]
