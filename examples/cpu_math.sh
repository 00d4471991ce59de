#!/usr/bin/env bash
# The math path end to end on a CPU: build a tiny random Qwen2 HF model and tokenizer
# (tools/make_tiny_hf_model.py), convert it (tools/convert_hf_to_megatron.py), then train it with
# examples/cpu_math.yaml on the arithmetic prompts of examples/data/. A random model answers almost
# nothing right, so expect rewards near -1: this shows the plumbing, not learning. With your own model:
#   python tools/convert_hf_to_megatron.py --hf-dir MY_HF_MODEL --output ckpt/my-model
#   .venv/bin/python -m megatron_rpg.train --config examples/cpu_math.yaml --load ckpt/my-model
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_cpu.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
if [ ! -d ckpt/tiny-math ]; then
  .venv/bin/python tools/make_tiny_hf_model.py --output ckpt/tiny-math-hf --text examples/data/arithmetic_train.jsonl
  .venv/bin/python tools/convert_hf_to_megatron.py --hf-dir ckpt/tiny-math-hf --output ckpt/tiny-math
fi
exec .venv/bin/python -m megatron_rpg.train --config examples/cpu_math.yaml "$@"
