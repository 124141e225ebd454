#!/usr/bin/env bash
# The GPU check of issue 14 on a plain PyTorch GPU box (Python 3.12, no Ray, TE or Apex):
# throughput of illada vs plain eager vs plain compiled, and the memory planner vs the
# allocator for two 1b layouts. A few minutes on one H200. See bench/gpu_check.py.
#
#   bench/gpu_check.sh --fetch-wheels   # here, with PyPI: the packages such a box lacks, into .whl/
#   bench/gpu_check.sh                  # there: installs .whl/ (if present) and runs the check
#   bench/gpu_check.sh --dry-run        # anywhere: tiny preset on the CPU
#
# --fetch-wheels also git-ignores .whl/ (info/exclude); carry it with the run (carry: [".whl"]). Output goes to stdout and, when $OUT is set,
# to $OUT/gpu_check.log and $OUT/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."

# What bench/gpu_check.py imports that a plain PyTorch image lacks (the versions pinned in
# pyproject.toml or installed by it). mlflow, Ray and Transformer Engine are not needed.
WHEELS=(megatron-core==0.16.1 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 zstandard==0.25.0)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    exclude="$(git rev-parse --git-path info/exclude)"  # the wheels travel as an ignored, carried folder
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "${WHEELS[@]}"
    ls -la .whl
    exit 0
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/illada-site .whl/*.whl
    export PYTHONPATH="/tmp/illada-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ -n "${OUT:-}" ]]; then
    python3 bench/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
else
    python3 bench/gpu_check.py "$@"
fi
