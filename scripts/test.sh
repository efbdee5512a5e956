#!/usr/bin/env bash
# Runs every test: unit tests and the end-to-end tests, which start the real
# chatq binaries against the local PostgreSQL and RabbitMQ.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
# The end-to-end tests start the binaries as processes: build them first.
cargo build --workspace --bins
# Each e2e test starts 3+ processes; bound the parallelism on small machines.
cargo test --workspace -- --test-threads="${CHATQ_TEST_THREADS:-4}"
