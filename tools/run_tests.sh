#!/usr/bin/env bash
# The whole test suite on CPU: sets up .venv (tools/setup_cpu.sh) and runs pytest on 2 workers.
# Extra arguments go to pytest (e.g. `bash tools/run_tests.sh tests/losses -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_cpu.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --durations=15 "$@"
