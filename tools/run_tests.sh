#!/usr/bin/env bash
# The whole test suite on CPU, what CI runs (.ci/run calls exactly this):
#   1. tools/setup_cpu.sh creates .venv (pinned CPU stack) if needed;
#   2. tools/setup_sglang_cpu.sh creates .venv-sglang (a real SGLang server for the SGLang engine tests)
#      in the background while the suite runs: those tests wait for it (tests/rollout/sglang_env.py)
#      and must run (MEGATRON_RPG_REQUIRE_SGLANG=1), so a broken install fails the suite;
#   3. pytest on 2 workers;
#   4. tools/run_tests_second_cpu.sh: the float32 equality tests again under a second set of CPU kernels.
# With arguments it only runs pytest with them (e.g. `bash tools/run_tests.sh tests/losses -x`); the
# SGLang tests then run if .venv-sglang exists and skip otherwise.
# MEGATRON_RPG_SGLANG=skip: the whole suite without installing SGLang (its tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_cpu.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# --dist loadfile: a file's tests share module-scoped spawned fixtures; spreading them over workers
# would run each spawn once per worker
pytest=(.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile --durations=15)
if [ $# -gt 0 ]; then
  exec "${pytest[@]}" "$@"
fi

setup_pid=
if [ "${MEGATRON_RPG_SGLANG:-}" != skip ]; then
  state=$(mktemp -d)
  export MEGATRON_RPG_SGLANG_SETUP_STATUS=$state/status MEGATRON_RPG_SGLANG_SETUP_LOG=$state/setup.log
  export MEGATRON_RPG_REQUIRE_SGLANG=1
  echo "[tests] setting up .venv-sglang in the background (log: $MEGATRON_RPG_SGLANG_SETUP_LOG)"
  ( if bash tools/setup_sglang_cpu.sh >"$MEGATRON_RPG_SGLANG_SETUP_LOG" 2>&1; then outcome=ok; else outcome=failed; fi
    echo "$outcome" >"$MEGATRON_RPG_SGLANG_SETUP_STATUS.part" && mv "$MEGATRON_RPG_SGLANG_SETUP_STATUS.part" "$MEGATRON_RPG_SGLANG_SETUP_STATUS" ) &
  setup_pid=$!
fi
status=0
"${pytest[@]}" || status=$?
if [ -n "$setup_pid" ]; then
  wait "$setup_pid" || true
  echo "[tests] SGLang set-up: $(cat "$MEGATRON_RPG_SGLANG_SETUP_STATUS" 2>/dev/null || echo 'no outcome'); $(tail -n 2 "$MEGATRON_RPG_SGLANG_SETUP_LOG" | tr '\n' ' ')"
fi
[ "$status" = 0 ] || exit "$status"
exec bash tools/run_tests_second_cpu.sh
