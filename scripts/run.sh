#!/usr/bin/env bash
# Runs the whole chatq system on this machine: migrations, chatq-api,
# two chatq-worker processes and chatq-mock-llm, against the local
# PostgreSQL and RabbitMQ. Prints the URL, an API key and a curl session.
# Ctrl-C stops everything.
#
# Environment (all optional): CHATQ_API_ADDR (127.0.0.1:8080),
# CHATQ_MOCK_ADDR (127.0.0.1:8090), DATABASE_URL
# (postgres://postgres@127.0.0.1:5432/chatq), AMQP_URL, CHATQ_QUEUE_PREFIX
# (chatq), CHATQ_WORKERS (2), OPENAI_BASE_URL/OPENAI_API_KEY (use a real LLM
# instead of the mock), CHATQ_PROFILE (debug|release, default release).
set -euo pipefail
cd "$(dirname "$0")/.."

export CHATQ_API_ADDR="${CHATQ_API_ADDR:-127.0.0.1:8080}"
export CHATQ_MOCK_ADDR="${CHATQ_MOCK_ADDR:-127.0.0.1:8090}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/chatq}"
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export CHATQ_QUEUE_PREFIX="${CHATQ_QUEUE_PREFIX:-chatq}"
export CHATQ_ADMIN_TOKEN="${CHATQ_ADMIN_TOKEN:-admin-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
workers="${CHATQ_WORKERS:-2}"
profile="${CHATQ_PROFILE:-release}"
use_mock=1
if [ -n "${OPENAI_BASE_URL:-}" ]; then use_mock=0; else export OPENAI_BASE_URL="http://$CHATQ_MOCK_ADDR/v1"; fi

scripts/services.sh

echo "building ($profile)..." >&2
if [ "$profile" = release ]; then cargo build --release --workspace --bins >&2; else cargo build --workspace --bins >&2; fi
bin="${CARGO_TARGET_DIR:-target}/$profile"

# The database itself must exist before migrations can run.
db_name="${DATABASE_URL##*/}"; db_name="${db_name%%\?*}"
server_url="${DATABASE_URL%/*}/postgres"
if ! psql "$DATABASE_URL" -Atc 'select 1' >/dev/null 2>&1; then
  psql "$server_url" -qc "create database \"$db_name\"" >/dev/null
fi
"$bin/chatq-api" migrate

pids=()
stop() {
  trap - INT TERM EXIT
  echo; echo "stopping..." >&2
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped" >&2
}
trap stop INT TERM EXIT

logs="${TMPDIR:-/tmp}/chatq-logs"; mkdir -p "$logs"
if [ "$use_mock" = 1 ]; then
  "$bin/chatq-mock-llm" >"$logs/mock-llm.out" 2>"$logs/mock-llm.log" & pids+=($!)
fi
CHATQ_MIGRATE_ON_START=false "$bin/chatq-api" >"$logs/api.out" 2>"$logs/api.log" & pids+=($!)
for i in $(seq 1 "$workers"); do
  # Each worker its own metrics port: 9091, 9092, ...
  CHATQ_WORKER_METRICS_ADDR="127.0.0.1:$((9090 + i))" \
    "$bin/chatq-worker" >"$logs/worker-$i.out" 2>"$logs/worker-$i.log" & pids+=($!)
done

url="http://$CHATQ_API_ADDR"
for _ in $(seq 1 100); do
  curl -fs "$url/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fs "$url/readyz" >/dev/null || { echo "the api did not become ready; see $logs/api.log" >&2; exit 1; }

key=$(curl -fs -X POST "$url/admin/v1/api-keys" -H "Authorization: Bearer $CHATQ_ADMIN_TOKEN" \
  -H 'Content-Type: application/json' -d '{"tenant": "local"}' | sed -E 's/.*"key":"([^"]+)".*/\1/')

# Prove the pipeline works end to end before handing over.
job=$(curl -fs -X POST "$url/v1/chat" -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
  -d '{"content": "Hello, chatq!"}' | sed -E 's/^\{"id":"([^"]+)".*/\1/')
reply=$(curl -fs "$url/v1/jobs/$job?wait=30" -H "Authorization: Bearer $key")

cat <<EOT

chatq is running: api $url, $workers workers, LLM $OPENAI_BASE_URL
logs: $logs/   admin token: $CHATQ_ADMIN_TOKEN

A first job went through:
$reply

Try it (copy-paste):

export CHATQ_URL=$url CHATQ_KEY=$key
JOB=\$(curl -s -X POST "\$CHATQ_URL/v1/chat" -H "Authorization: Bearer \$CHATQ_KEY" \\
  -H 'Content-Type: application/json' -d '{"content": "What is a message queue?"}' \\
  | sed -E 's/^\{"id":"([^"]+)".*/\1/')
curl -s "\$CHATQ_URL/v1/jobs/\$JOB?wait=30" -H "Authorization: Bearer \$CHATQ_KEY"; echo

Ctrl-C stops everything.
EOT
wait
