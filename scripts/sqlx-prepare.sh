#!/usr/bin/env bash
# Regenerates .sqlx/, the query data the sqlx macros of common/src/db check
# their SQL against at compile time (builds are offline: .cargo/config.toml
# sets SQLX_OFFLINE=true). With --check, regenerates it aside and fails if
# the committed .sqlx/ differs in any way (CI: .ci/run).
#
# Each run makes a scratch database on the local PostgreSQL, applies
# migrations/ to it, runs `cargo sqlx prepare --workspace` against it and
# drops it, so the queries are checked against exactly what the migrations
# build. CHATQ_SQLX_SERVER_URL names another server (default: the local one,
# trust auth, as in scripts/services.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

check=()
case "${1:-}" in
  "") ;;
  --check) check=(--check) ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

sqlx_root=/var/tmp/sqlx-cli
export PATH="$sqlx_root/bin:$PATH"
if [ ! -x "$sqlx_root/bin/cargo-sqlx" ]; then
  echo "sqlx-prepare: installing sqlx-cli 0.9.0 into $sqlx_root" >&2
  cargo install sqlx-cli --version 0.9.0 --locked --no-default-features --features postgres \
    --root "$sqlx_root"
fi

server="${CHATQ_SQLX_SERVER_URL:-postgres://postgres@127.0.0.1:5432}"
export DATABASE_URL="$server/chatq_sqlx_prepare_$$"
drop() { sqlx database drop -y --no-dotenv >/dev/null 2>&1 || true; }
trap drop EXIT
drop
sqlx database create --no-dotenv
sqlx migrate run --no-dotenv --source migrations >/dev/null

out=$(mktemp)
trap 'drop; rm -f "$out"' EXIT
# prepare runs `cargo check` with SQLX_OFFLINE=false and this DATABASE_URL.
status=0
cargo sqlx prepare --no-dotenv --workspace "${check[@]}" 2>&1 | tee "$out" || status=$?
if [ "$status" -ne 0 ]; then
  echo "sqlx-prepare: .sqlx is out of date with the queries or the migrations; run scripts/sqlx-prepare.sh and commit .sqlx/" >&2
  exit "$status"
fi
# sqlx only warns about query files no query uses any more: fail on them too.
if [ ${#check[@]} -gt 0 ] && grep -q "potentially unused queries" "$out"; then
  echo "sqlx-prepare: .sqlx holds query files no query uses; run scripts/sqlx-prepare.sh and commit .sqlx/" >&2
  exit 1
fi
