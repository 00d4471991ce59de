"""Where the real SGLang server's environment is, and whether the tests that need it can run.

tools/setup_sglang_cpu.sh creates .venv-sglang (SGLang 0.5.23 with its own torch 2.14.1). The whole-suite
command, tools/run_tests.sh without arguments, installs it *while* the rest of the suite runs and tells
the tests where the installer reports its outcome (MEGATRON_RPG_SGLANG_SETUP_STATUS: a file that holds
"ok" or "failed" once it is done; MEGATRON_RPG_SGLANG_SETUP_LOG: its log). require_sglang() waits for
that outcome, so the SGLang tests start as soon as the environment is ready and never see half of it.
Without .venv-sglang the tests skip, unless MEGATRON_RPG_REQUIRE_SGLANG=1 (the whole suite, CI) makes
that a failure. The server runs with the import stand-in tests/sglang_stub first on its PYTHONPATH.
"""
from __future__ import annotations

import os
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SGLANG_PYTHON = os.path.join(REPO, ".venv-sglang", "bin", "python")
STUB = os.path.join(REPO, "tests", "sglang_stub")
SETUP_WAIT_S = 1800.0


def _log_tail(chars: int = 3000) -> str:
    log = os.environ.get("MEGATRON_RPG_SGLANG_SETUP_LOG")
    if not log or not os.path.isfile(log):
        return "(no set-up log)"
    with open(log, errors="replace") as handle:
        return handle.read()[-chars:]


def _wait_for_setup(status_path: str) -> None:
    deadline = time.monotonic() + SETUP_WAIT_S
    while not os.path.isfile(status_path):
        if time.monotonic() > deadline:
            pytest.fail(f"tools/setup_sglang_cpu.sh did not finish within {SETUP_WAIT_S:.0f} s; its log ends:\n"
                        + _log_tail())
        time.sleep(2.0)
    with open(status_path) as handle:
        outcome = handle.read().strip()
    if outcome != "ok":
        pytest.fail(f"tools/setup_sglang_cpu.sh failed ({outcome!r}); its log ends:\n" + _log_tail())


def require_sglang() -> None:
    status_path = os.environ.get("MEGATRON_RPG_SGLANG_SETUP_STATUS")
    if status_path:
        _wait_for_setup(status_path)
    if os.path.isfile(SGLANG_PYTHON):
        return
    message = f"{SGLANG_PYTHON} is absent: run tools/setup_sglang_cpu.sh for the real-SGLang tests"
    if os.environ.get("MEGATRON_RPG_REQUIRE_SGLANG") == "1":
        pytest.fail(message + " (MEGATRON_RPG_REQUIRE_SGLANG=1)")
    pytest.skip(message)
