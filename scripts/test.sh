#!/usr/bin/env bash
# Install Yanray with its dev tools into .venv, then run lint, type checks and the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k telegram`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
if [ ! -f tests/fixtures/chatglm3/tokenizer.model ]; then
  echo "tests/fixtures/chatglm3 is missing: the model tests cannot run" >&2
  exit 1
fi
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
ruff format --check .
# mypy sees the packages under their import names (yanray.bot, ...) through a tree of links.
mkdir -p build/typecheck/yanray
for package in errors bot engine adapters storage; do
  ln -sfn "../../../$package" "build/typecheck/yanray/$package"
done
MYPYPATH=build/typecheck mypy -p yanray.errors -p yanray.bot -p yanray.engine -p yanray.adapters -p yanray.storage
pytest -q "$@"
# the storage-heavy tests once more on PostgreSQL, where its server is installed
bash scripts/postgres-tests.sh
