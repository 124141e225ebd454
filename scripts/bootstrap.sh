#!/usr/bin/env bash
# Create .venv with every dependency (illada[dev], editable). On a machine without an NVIDIA
# GPU, torch is the CPU build, so no CUDA packages are downloaded. Re-running is cheap: pip
# skips what is there. PYTHON picks the interpreter (3.11 or 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if ! "$PYTHON" -c 'import sys; assert sys.version_info[:2] in ((3, 11), (3, 12))' 2>/dev/null; then
  echo "bootstrap: $PYTHON is not a working Python 3.11 or 3.12 (set PYTHON=/path/to/python3.12)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
TORCH=torch==2.13.0  # what CI and the quickstart use; illada itself takes any torch>=2.6
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  "${pip[@]}" "$TORCH"
elif ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  # The CPU wheel: a local copy where pip's find-links has one, else PyTorch's CPU index.
  "${pip[@]}" "$TORCH+cpu" 2>/dev/null || "${pip[@]}" "$TORCH+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi
"${pip[@]}" -e '.[dev]'
