#!/usr/bin/env bash
# Run the storage-heavy tests again on PostgreSQL (asyncpg), in a throwaway cluster on
# 127.0.0.1. Skipped, with a line saying so, where PostgreSQL's server is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
  echo "PostgreSQL server not installed here; the PostgreSQL pass is skipped."
  exit 0
fi
dir=$(mktemp -d /tmp/yanray-pg.XXXXXX)
port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_owner=()
if [ "$(id -u)" = 0 ]; then
  chown postgres "$dir"          # the server refuses to run as root
  as_owner=(runuser -u postgres --)
fi
stop() {
  "${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap stop EXIT
"${as_owner[@]}" "$bin/initdb" -D "$dir/data" -A trust -U yanray >"$dir/initdb.log" 2>&1
"${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
  -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
"${as_owner[@]}" "$bin/createdb" -h 127.0.0.1 -p "$port" -U yanray yanray
TEST_POSTGRES_URL="postgresql+asyncpg://yanray@127.0.0.1:$port/yanray" \
  .venv/bin/pytest -q tests/test_core.py tests/test_toolloop.py tests/test_limits.py tests/test_i18n.py \
  tests/test_migrations.py tests/test_workers.py "$@"
