#!/usr/bin/env bash
# The README's first command: set up the CPU environment and run the main job, a tiny RPG training
# run (examples/tiny_cpu.yaml: a random 2-layer model learns the repeat-token task on real
# megatron-core in CPU mode, one thread: a tiny model gains nothing from more, and a busy machine
# loses much). The progress bar shows the reward rising from about 0.07 (random) towards 1; the run
# ends with the held-out evaluation's line `eval accuracy: before A -> after B` and where its metrics
# log and plot were written (runs/tiny_cpu-<time>/metrics.jsonl and .png). Extra arguments go to the
# trainer (e.g. --train-iters 300).
# The exact-gradient report of every loss: .venv/bin/python -m megatron_rpg.losses.verify
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_cpu.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run_dir=runs/tiny_cpu-$(date +%Y%m%d-%H%M%S)
mkdir -p "$run_dir"
exec .venv/bin/python -m megatron_rpg.train --config examples/tiny_cpu.yaml --log-jsonl "$run_dir/metrics.jsonl" "$@"
