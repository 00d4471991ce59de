#!/usr/bin/env bash
# RPG (URKL, RPG-Style Clip) on a Qwen2.5-7B-class model: one node, 8 GPUs, torchrun.
#   pip install -e .[gpu]                      # Transformer Engine (Python 3.12 / CUDA machines)
#   python tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-7B --output ckpt/qwen2.5-7b \
#       --tensor-model-parallel-size 4
#   bash examples/train_rpg_7b.sh [more flags, e.g. --svrpg --num-mini-batches 1 --rpg-aggregation seq-mean-token-sum]
# The settings are in examples/rpg_7b.yaml (TP=4 x DP=2, bf16, distributed optimizer); flags given
# here override them. Rollouts use the embedded engine (the training model samples itself, no KV
# cache): correct at this size but slow; the SGLang engine is the fast path once it lands.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron's TP comm/compute overlap
exec torchrun --nproc-per-node "${GPUS_PER_NODE:-8}" -m megatron_rpg.train --config examples/rpg_7b.yaml "$@"
