#!/usr/bin/env bash
# The whole test suite on CPU: sets up .venv (tools/setup_cpu.sh) and runs pytest on 2 workers.
# Extra arguments go to pytest (e.g. `bash tools/run_tests.sh tests/losses -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_cpu.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# --dist loadfile: a file's tests share module-scoped spawned fixtures; spreading them over workers
# would run each spawn once per worker
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
