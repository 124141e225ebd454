#!/usr/bin/env bash
# Install illada[data] (not editable) into .venv312 with Python 3.12 and run the given tests
# there: the data stack and the command line need no torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-}
for candidate in "$PY312" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
  if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    PY312=$candidate
    break
  fi
  PY312=
done
if [ -z "$PY312" ]; then
  echo "python312-check: no Python 3.12 found (set PY312=/path/to/python3.12)" >&2
  exit 1
fi
rm -rf .venv312
"$PY312" -m venv .venv312
.venv312/bin/python -m pip install --quiet --disable-pip-version-check '.[data,test]'
.venv312/bin/python -m pytest -p no:cacheprovider "$@"
