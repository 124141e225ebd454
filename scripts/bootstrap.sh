#!/usr/bin/env bash
# Create .venv with every dependency. On a machine without an NVIDIA GPU, torch is the CPU
# build, so no CUDA packages are downloaded. Re-running is cheap: pip skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if ! command -v "$PYTHON" >/dev/null; then
  echo "bootstrap: $PYTHON not found; megatron-core 0.16 needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  "${pip[@]}" "torch==2.13.0"
else
  # The CPU wheel: a local find-links copy where the machine has one, else PyTorch's CPU index.
  "${pip[@]}" "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi
"${pip[@]}" -e '.[dev]'
