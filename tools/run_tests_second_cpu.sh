#!/usr/bin/env bash
# The float32 equality tests once more under a second set of torch CPU kernels, so their bounds are
# shown to hold for another summation order than this machine's (tests/float_bounds.py).
# Rule: torch runs the best kernels the CPU supports (torch.backends.cpu.get_cpu_capability()); the
# second pass forces ATEN_CPU_CAPABILITY=default (no vector-ISA kernels) unless that already is the
# machine's, in which case no other kernel set exists and there is nothing to rerun.
# Extra arguments go to pytest; its exit status is this script's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_cpu.sh >/dev/null
capability() { PYTHONWARNINGS=ignore .venv/bin/python -c \
  "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"; }
machine=$(capability)
if [ "$machine" = default ]; then
  echo "[second-cpu] this CPU runs torch's default kernels only: no second capability to test"
  exit 0
fi
export ATEN_CPU_CAPABILITY=default
[ "$(capability)" = default ] || { echo "[second-cpu] torch ignored ATEN_CPU_CAPABILITY=default" >&2; exit 1; }
echo "[second-cpu] machine's capability: $machine; rerunning the equality tests with ATEN_CPU_CAPABILITY=default"
exec bash tools/run_tests.sh -q tests/test_float_bounds.py tests/distributed/test_parallel_equality.py \
  tests/megatron/test_forward_backward.py tests/optim/test_svrpg_direction.py \
  tests/optim/test_svrpg_distributed.py tests/optim/test_svrpg_rl_step.py tests/optim/test_svrpg_fp16.py \
  tests/megatron/test_cpu_mode.py tests/megatron/test_logprobs.py tests/megatron/test_models.py \
  tests/rollout/test_lean_forward.py tests/rollout/test_lean_decode.py "$@"
