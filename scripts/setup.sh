#!/usr/bin/env bash
# Set up letstalk-rt in the current Python environment (a venv is recommended).
#
#   bash scripts/setup.sh          runtime: torch (kept if present), then the package
#   bash scripts/setup.sh --dev    also the test dependencies
#
# torch: an existing install is kept (so a CUDA build stays). Otherwise, with an NVIDIA driver present
# pip's default (CUDA) build is installed; on a CPU-only machine the pinned CPU build is installed
# (TORCH_SPEC overrides, e.g. TORCH_SPEC="torch==2.5.1+cpu"), so no gigabytes of CUDA wheels are pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
  "$PY" -m pip install "${TORCH_SPEC:-torch}"
else
  "$PY" -m pip install "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install -e ".${extras}"
echo "setup: done ($("$PY" -c 'import letstalk_rt; print("letstalk-rt", letstalk_rt.__version__)'))"
