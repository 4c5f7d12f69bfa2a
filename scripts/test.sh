#!/usr/bin/env bash
# Set up and run ckcore's whole test suite, the way CI does.
#
#   bash scripts/test.sh            # fresh venvs in .venv-test(-build), both test passes
#   CKCORE_VENV=/path bash scripts/test.sh
#
# 1. builds the sdist and, from it, the wheel (python -m build) in a build venv,
#    and there runs tests/from_source (kernels compiled with bounds checks);
#    then installs only the wheel into a fresh test venv without Cython
#    (tests run against the installed package, never the source tree);
# 2. runs the torch-free tests (tests/core, tests/hostile: --torch-free) with torch
#    NOT installed (ckcore must work without it);
# 3. installs torch 2.13.0 (CPU build) and runs the whole suite (tests/differential
#    and tests/multiprocess too); none of them may skip for lack of torch;
# 4. runs every benchmark once in quick mode (--benchmark-disable) so none rots.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
venv="${CKCORE_VENV:-$here/.venv-test}"
py="${PYTHON:-python3}"

step() { printf '\n=== %s ===\n' "$*"; }
# pip's machine-wide config names local index folders that may not all exist;
# drop its "Location ... is ignored" noise, keep every other message.
pipq() { "$1" -m pip install -q "${@:2}" 2> >(grep -v "^WARNING: Location '" >&2); }

step "build the sdist, and the wheel from the sdist, in a build environment"
build_venv="$venv-build"
rm -rf "$venv" "$build_venv" dist build
"$py" -m venv "$build_venv"
pipq "$build_venv/bin/python" "setuptools>=77" wheel "Cython>=3.1,<4" build
# --no-isolation: the build requirements above are the ones pyproject.toml names;
# building the wheel from the sdist proves the sdist carries every kernel source.
"$build_venv/bin/python" -m build --no-isolation --outdir dist . > "$here/dist-build.log" 2>&1 \
    || { tail -40 "$here/dist-build.log"; exit 1; }
ls dist

step "tests that compile kernel sources (bounds-checked build), in the build environment"
pipq "$build_venv/bin/python" "numpy>=1.24" "pytest>=7" "hypothesis>=6"
(cd "$build_venv" && "$build_venv/bin/python" -m pytest -p no:cacheprovider --rootdir "$here" \
    -c "$here/pyproject.toml" "$here/tests/from_source" -q)

step "fresh test environment: $venv (the wheel only: nothing is compiled here)"
"$py" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
pipq python "numpy>=1.24" "pytest>=7" "pytest-benchmark>=4" "hypothesis>=6" ruff cython-lint mypy
# --only-binary plus a compiler that always fails: installing ckcore must not build anything.
CC=false CXX=false pipq python --only-binary=:all: --no-deps dist/ckcore-*.whl

# Run from a folder outside the checkout so `import ckcore` finds the installed
# package only (a missing extension fails loudly instead of importing sources).
run_pytest() {
    (cd "$venv" && python -m pytest -p no:cacheprovider --rootdir "$here" -c "$here/pyproject.toml" "$@")
}

step "torch-free tests (torch not installed)"
if python -c "import torch" 2>/dev/null; then
    echo "torch is importable in the fresh venv: the torch-free pass would prove nothing" >&2
    exit 1
fi
run_pytest "$here/tests" --torch-free -q

step "install torch 2.13.0 (CPU)"
# The "+cpu" local version only exists as the CPU wheel this machine kind keeps on
# disk (pip's find-links); PyPI's plain 2.13.0 is a multi-GB CUDA build we never want.
pipq python "torch==2.13.0+cpu"
python -c "import torch; v = torch.__version__; assert v == '2.13.0+cpu', v; print('torch', v)"

step "full test suite"
run_pytest "$here/tests" -q --ignore="$here/tests/from_source"

step "benchmarks, quick mode (each body runs once)"
CKCORE_BENCH_QUICK=1 run_pytest "$here/bench" -q --benchmark-disable
