#!/usr/bin/env bash
# Create .venv in the repo root and install the project with pinned versions (constraints.txt).
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
# torch is pinned to the CPU/CUDA build that matches the machine (see ../shared/notes/stack.md)
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[dev]'
echo "environment ready: $(.venv/bin/python --version), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
