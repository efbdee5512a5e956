#!/usr/bin/env bash
# Runs every test: unit tests and the end-to-end tests, which start the real
# chatq binaries against the local PostgreSQL and RabbitMQ.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
# The end-to-end tests start the binaries as processes: build them first.
cargo build --workspace --bins
# Each e2e test starts 3+ processes; bound the parallelism on small machines.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast -- --test-threads="${CHATQ_TEST_THREADS:-4}" 2>&1 | tee "$log" || status=$?
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
