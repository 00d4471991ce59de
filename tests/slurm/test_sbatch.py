"""The tiny Slurm job on a real one-node Slurm cluster (tests/slurm/cluster.sh starts slurmctld,
slurmd and munged on this machine; CI runs as root on Debian, where it installs slurm-wlm if needed).

examples/slurm/train_tiny_cpu.sbatch runs the same launcher as the 7B job (torchrun per node,
--save = --load = $CHECKPOINT_DIR), at TP=2 over gloo. Proven: `sbatch --wait` trains and
checkpoints; `scontrol requeue` of the finished job resumes from its latest checkpoint (which has
reached --train-iters: it trains nothing and ends COMPLETED) instead of training again from step 0.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
SBATCH = REPO / "examples" / "slurm" / "train_tiny_cpu.sbatch"


def _why_no_cluster() -> str | None:
    if os.geteuid() != 0:
        return "the Slurm daemons need root (CI runs as root)"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "neither Slurm nor apt-get (to install Debian's slurm-wlm) is on this machine"
    return None


pytestmark = pytest.mark.skipif(_why_no_cluster() is not None, reason=str(_why_no_cluster()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(CLUSTER), "start", str(state)], capture_output=True, text=True,
                             timeout=300)
    assert started.returncode == 0, started.stderr
    env = dict(os.environ, SLURM_CONF=started.stdout.strip())
    yield env
    subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
    subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True)


def _job_state(env, job: str) -> dict:
    shown = subprocess.run(["scontrol", "show", "job", job, "-o"], env=env, capture_output=True, text=True,
                           check=True).stdout
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


def _wait_for_end(env, job: str, restarts: int, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _job_state(env, job)
        if int(state["Restarts"]) >= restarts and state["JobState"] in ("COMPLETED", "FAILED", "CANCELLED",
                                                                        "TIMEOUT", "NODE_FAIL"):
            return state
        time.sleep(1)
    raise AssertionError(f"job {job} did not end within {timeout} s: {_job_state(env, job)}")


def _steps(jsonl: Path) -> list[int]:
    return [json.loads(line)["step"] for line in jsonl.read_text().splitlines()]


def test_sbatch_trains_checkpoints_and_a_requeue_resumes(cluster, tmp_path):
    checkpoints, log, jsonl = tmp_path / "checkpoints", tmp_path / "job.out", tmp_path / "metrics.jsonl"
    env = dict(cluster, CHECKPOINT_DIR=str(checkpoints), PYTHON=sys.executable, SAVE_INTERVAL="2",
               SBATCH_OUTPUT=str(log), SBATCH_OPEN_MODE="append", RDZV_PORT="29613")
    submitted = subprocess.run(["sbatch", "--wait", "--parsable", str(SBATCH), "--train-iters", "4",
                                "--log-jsonl", str(jsonl), "--no-progress", "--no-eval"],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = log.read_text() if log.exists() else ""
    assert submitted.returncode == 0, f"{submitted.stderr}\n{output}"
    job = submitted.stdout.strip().split(";")[0]
    assert _steps(jsonl) == [1, 2, 3, 4], output
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (checkpoints / "iter_0000004").is_dir()
    saved = sorted(p.name for p in checkpoints.iterdir())

    subprocess.run(["scontrol", "requeue", job], env=env, check=True, capture_output=True, text=True)
    state = _wait_for_end(env, job, restarts=1)
    output = log.read_text()
    assert state["JobState"] == "COMPLETED", output
    assert "restart 1" in output and "nothing to train" in output.split("restart 1", 1)[1], output
    assert _steps(jsonl) == [1, 2, 3, 4], "the requeued job trained again instead of resuming"
    assert sorted(p.name for p in checkpoints.iterdir()) == saved
