"""examples/cpu_math.sh's path, end to end: tools/make_tiny_hf_model.py builds an HF folder whose
tokenizer fits its embedding (loaded back: the same size), tools/convert_hf_to_megatron.py converts
it, and the trainer runs examples/cpu_math.yaml on it (math task, DAPO reward, arithmetic prompts)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args, **env):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **env))


@pytest.mark.distributed
def test_the_cpu_math_example_builds_converts_and_trains(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    hf_dir, megatron_dir, log = tmp_path / "hf", tmp_path / "megatron", tmp_path / "run.jsonl"
    made = _run("tools/make_tiny_hf_model.py", "--output", str(hf_dir), "--text", "examples/data/arithmetic_train.jsonl")
    assert made.returncode == 0, made.stderr
    assert len(AutoTokenizer.from_pretrained(hf_dir)) == AutoConfig.from_pretrained(hf_dir).vocab_size
    assert all(os.stat(hf_dir / name).st_mode & 0o777 == 0o644 for name in os.listdir(hf_dir))
    converted = _run("tools/convert_hf_to_megatron.py", "--hf-dir", str(hf_dir), "--output", str(megatron_dir))
    assert converted.returncode == 0, converted.stderr
    trained = _run("-m", "megatron_rpg.train", "--config", "examples/cpu_math.yaml", "--load", str(megatron_dir),
                   "--train-iters", "2", "--no-progress", "--log-jsonl", str(log))
    assert trained.returncode == 0, trained.stderr[-3000:]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [line for line in lines if "reward_mean" in line]  # the training steps (step 0: the first eval)
    assert [s["step"] for s in steps] == [1, 2]
    assert lines[0]["step"] == 0 and 0 <= lines[0]["eval/accuracy"] <= 1 and "eval/accuracy" in steps[-1]
    assert all(-2.0 <= s["reward_mean"] <= 1.0 for s in steps)  # DAPO: ±1 and the overlong penalty
