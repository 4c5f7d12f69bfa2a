#!/usr/bin/env bash
# The first job, out of the box: build ckcore into a fresh venv and plan a reshard.
#   bash scripts/demo.sh [example args...]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CKCORE_VENV:-$here/.venv-demo}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q "setuptools>=64" wheel "Cython>=3.1,<4" "numpy>=1.24"
python -m pip install -q --no-build-isolation "$here"
cd "$venv"   # run against the installed package, not the source tree
python "$here/examples/reshard_plan.py" "$@"
echo
# The main job: a 70B-class model saved FSDP-64 and loaded FSDP-8 x TP-8, every
# rank planned, ckcore timed beside torch when torch is installed.
ckcore demo --top 4
