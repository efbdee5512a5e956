#!/usr/bin/env bash
# Runs every test: unit tests and the end-to-end tests, which start the real
# chatq binaries against the local PostgreSQL and RabbitMQ.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
# Python tools of the e2e tests, in a venv outside the clone so it is made
# once per machine (and again when a pin changes): the official openai SDK,
# for the facade's tests (tests/python), and schemathesis, which tests the
# api against its own OpenAPI document (tests/tests/schemathesis.rs).
venv="${CHATQ_VENV:-/var/tmp/chatq-venv}"
pins=("openai==3.57.0" "schemathesis==4.32.5")
if ! "$venv/bin/python" - "${pins[@]}" >/dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import version
sys.exit(any(version(n) != v for n, v in (p.split("==") for p in sys.argv[1:])))
PY
then
  if ! python3 -m venv --clear "$venv" >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv) >/dev/null
    python3 -m venv --clear "$venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}"
fi
export CHATQ_TEST_PYTHON="$venv/bin/python"
# The end-to-end tests start the binaries as processes: build them first.
cargo build --workspace --bins
# Each e2e test starts 3+ processes; bound the parallelism on small machines.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast -- --test-threads="${CHATQ_TEST_THREADS:-4}" 2>&1 | tee "$log" || status=$?
# Load tests (marked #[ignore]) run alone, one at a time, after the rest.
cargo test --workspace --no-fail-fast -- --ignored --test-threads=1 2>&1 | tee -a "$log" || status=$?
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
