#!/usr/bin/env bash
# Creates (or reuses) .venv-sglang: a separate environment holding a real SGLang server for the tests of
# the SGLang rollout engine. Separate from .venv because sglang 0.5.23 pins torch 2.14.1 (CUDA build;
# it runs on CPU). Idempotent: a stamp file records what was installed; a second run only checks.
# On CPU SGLang also needs the import stand-in tests/sglang_stub (put on PYTHONPATH by the tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SGLANG_VERSION=${SGLANG_VERSION:-0.5.23}
venv=.venv-sglang
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup-sglang] creating $venv with $($PY --version)"
  "$PY" -m venv "$venv"
fi
stamp=$venv/.sglang-installed
want="sglang==$SGLANG_VERSION"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup-sglang] installing $want (about 200 packages, ~11 GB, a few minutes)"
  start=$(date +%s)
  # the local indexes warn about every package they lack; keep pip's real messages
  if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check "$want" 2>&1 \
      | { grep -v "is ignored: it is neither" || true; }; then
    echo "[setup-sglang] pip install $want failed" >&2
    exit 1
  fi
  echo "[setup-sglang] installed in $(( $(date +%s) - start )) s"
fi
# the server's import path on CPU: sglang with the sgl_kernel stand-in first (as the tests start it)
version="$(PYTHONPATH=tests/sglang_stub SGLANG_USE_CPU_ENGINE=1 PYTHONWARNINGS=ignore "$venv/bin/python" -c \
  'import sglang, torch, sglang.srt.entrypoints.http_server; print("sglang", sglang.__version__, "| torch", torch.__version__)')"
echo "$want" > "$stamp"
echo "[setup-sglang] ready: $version"
