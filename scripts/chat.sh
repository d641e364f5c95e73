#!/usr/bin/env bash
# Quick start: install Yanray into .venv and talk to it in this terminal (`yanray chat`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/yanray chat "$@"
