#!/usr/bin/env bash
# What every sbatch script of ours runs: one torchrun per node (rendezvous on the first node of the
# job), the trainer with a YAML config and extra flags, checkpoints in $CHECKPOINT_DIR used as both
# --save and --load, so a requeued or preempted job resumes from its latest checkpoint by itself.
#   bash examples/slurm/torchrun_on_slurm.sh CONFIG [trainer flags]      (inside an sbatch job)
# Environment: PROCS_PER_NODE (ranks per node, default 8 = GPUs), CHECKPOINT_DIR (required),
# PYTHON (default .venv/bin/python when it exists, else python3), RDZV_PORT (default 29500).
set -euo pipefail
config=${1:?usage: torchrun_on_slurm.sh CONFIG [trainer flags]}
shift
: "${SLURM_JOB_ID:?run inside a Slurm job (sbatch), not directly}"
: "${CHECKPOINT_DIR:?set CHECKPOINT_DIR: the folder the job saves to and resumes from}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
echo "[slurm] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: ${SLURM_NNODES} node(s) x ${PROCS_PER_NODE:-8} ranks, checkpoints in $CHECKPOINT_DIR"
exec srun --ntasks-per-node 1 "$PYTHON" -m torch.distributed.run \
    --nnodes "$SLURM_NNODES" --nproc-per-node "${PROCS_PER_NODE:-8}" \
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$head_node:${RDZV_PORT:-29500}" \
    -m megatron_rpg.train --config "$config" --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" "$@"
