#!/usr/bin/env bash
# Set up the chapter: a Python environment in ./.venv with tilemoe installed (editable) and the
# test tools. Safe to run again: it only reinstalls when the build files changed.
#
# - An active virtualenv or conda environment is used as it is (.venv then links to it).
# - Otherwise .venv is a new venv that also sees the packages of the Python that made it, so
#   a PyTorch already installed there (a CUDA build, say) is kept and used.
# - With no PyTorch anywhere, it installs $TILEMOE_TORCH (default torch==2.13.0, the version CI
#   tests with). To pick a specific build (CPU-only, a CUDA version), install PyTorch first the
#   way pytorch.org describes; this script keeps it.
# - With nvcc on PATH the CUDA extension tilemoe._C is compiled (sm_80, sm_90a, sm_100a; set
#   CUDAARCHS="90a" to build fewer); without it tilemoe installs as pure Python.
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    { echo "setup.sh: Python >= 3.10 is needed, $python is $("$python" --version 2>&1)" >&2; exit 1; }

active=${VIRTUAL_ENV:-${CONDA_PREFIX:-}}
if [ -n "$active" ] && [ "$(cd "$active" && pwd -P)" != "$(pwd -P)/.venv" ]; then
    [ -L .venv ] || [ ! -e .venv ] || { echo "setup.sh: an environment is active ($active) but ./.venv exists; remove one" >&2; exit 1; }
    ln -sfn "$active" .venv
    echo "setup.sh: using the active environment $active (.venv links to it)"
elif [ ! -x .venv/bin/python ]; then
    echo "setup.sh: creating .venv"
    "$python" -m venv --system-site-packages .venv ||
        { echo "setup.sh: could not create a venv; on Debian/Ubuntu: apt-get install python3-venv" >&2; exit 1; }
fi
py=.venv/bin/python

if ! "$py" -c 'import torch' 2>/dev/null; then
    echo "setup.sh: no PyTorch found; installing ${TILEMOE_TORCH:-torch==2.13.0}"
    "$py" -m pip install ${TILEMOE_TORCH:-torch==2.13.0}
fi

stamp=.venv/.tilemoe-installed
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml CMakeLists.txt csrc -newer "$stamp" -print -quit)" ]; then
    echo "setup.sh: installing tilemoe (editable) with its test and plot extras"
    "$py" -m pip install -e ".[test,plot]"
    touch "$stamp"
fi
"$py" -c 'import torch, tilemoe, tilemoe.cuda as c; r = c.unavailable_reason() or "available"; print(f"setup.sh: ready - torch {torch.__version__}, tilemoe {tilemoe.__version__}, cuda backend: {r}")'
