#!/usr/bin/env bash
# The README's first command: set up the CPU environment and run the main job.
# Until the trainer lands, the main job is the exact-gradient verification report of every RPG loss
# (python -m megatron_rpg.losses.verify): it enumerates tiny policies in float64 and prints the
# relative error of E[∇L] against −∇J for each variant.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_cpu.sh
exec .venv/bin/python -m megatron_rpg.losses.verify "$@"
