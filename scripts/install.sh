#!/usr/bin/env bash
# Create .venv (if missing) and install Yanray into it, editable; "dev" adds the test tools.
# Sourced by chat.sh and test.sh. Downloads packages only, never a model.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1 && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # No NVIDIA GPU here: take torch's CPU build (on this project's machines it lies on disk),
  # not the multi-gigabyte CUDA build a plain "torch" would bring. A GPU host gets CUDA torch
  # from the plain requirement in pyproject.toml.
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
.venv/bin/python -m pip install -q -e ".${extra}"
