#!/usr/bin/env bash
# Creates (or reuses) .venv with the pinned CPU stack and installs megatron_rpg into it, editable.
# Idempotent: a second run only checks. Never pulls a CUDA torch: torch is pinned to the CPU 2.13.0 build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.megatron_rpg-installed
want="$(cat requirements-cpu.txt setup.py | sha1sum | cut -c1-12)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements-cpu.txt (torch 2.13.0 CPU, megatron-core 0.16.1, ...)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-cpu.txt 2>&1 | grep -v "is ignored: it is neither" || true
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored: it is neither" || true
  PYTHONWARNINGS=ignore .venv/bin/python -c "import torch, megatron.core, megatron_rpg; assert not torch.version.cuda, 'a CUDA build of torch got into the CPU venv: delete .venv and rerun with PIP_EXTRA_INDEX_URL pointing at the PyTorch CPU wheel index (this machine kind serves the CPU wheel of torch 2.13.0 from local disk)'"
  echo "$want" > "$stamp"
fi
echo "[setup] ready: $(PYTHONWARNINGS=ignore .venv/bin/python -c 'import torch, megatron.core as m; print("torch", torch.__version__, "| megatron-core", m.__version__)')"
