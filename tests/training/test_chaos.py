"""tools/chaos/kill_resume.py on the tiny config: 3 trainers killed with SIGKILL (two aimed inside a
save) and rerun with the same --load DIR --save DIR resume to checkpoints bitwise equal to an
uninterrupted run's (model, optimizer, sampling state, HF export bytes), with no damaged checkpoint,
no staging folder left and no child process of the killed trainer alive."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_killed_trainers_resume_bitwise_equal_with_nothing_left_behind(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "chaos", "kill_resume.py"), "--trials", "3",
                           "--steps", "4", "--save-interval", "1", "--in-save-fraction", "0.67", "--seed", "1",
                           "--workdir", str(tmp_path / "chaos")],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    table = dict((name.strip(), int(count)) for name, count in re.findall(r"^\| ([^|]+?) +\| +(\d+) \|$",
                                                                         done.stdout, re.M))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert table["trials"] == 3 and table["clean resumes"] == 3 and table["bitwise equal to the reference"] == 3
    assert table["killed inside a save"] + table["killed between saves"] >= 2, done.stdout  # kills really happened
    assert table["corrupted (damaged checkpoint or failed resume)"] == 0
    assert table["leftover staging folders"] == 0 and table["leftover child processes"] == 0
