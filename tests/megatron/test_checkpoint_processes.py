"""Megatron's checkpoint writer leaves no process behind a killed trainer: its result queue lives in
the trainer (no spawned Manager server, no resource_tracker), and a process the trainer forks (as
the writer does per file bucket) is killed when the trainer dies."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = """
import os, queue, sys, time
from megatron_rpg.megatron.checkpoint_processes import writer_processes_die_with_trainer
from megatron.core.dist_checkpointing.strategies import filesystem_async
writer_processes_die_with_trainer()
assert isinstance(filesystem_async._get_write_results_queue(), queue.Queue)
child = os.fork()
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_a_forked_writer_dies_with_its_killed_trainer_and_no_manager_is_started():
    trainer = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    try:
        child = psutil.Process(int(trainer.stdout.readline()))
        assert [p.pid for p in psutil.Process(trainer.pid).children(recursive=True)] == [child.pid]  # no Manager
        trainer.kill()
        trainer.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.05)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        trainer.kill()
