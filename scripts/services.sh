#!/usr/bin/env bash
# Makes sure the local PostgreSQL and RabbitMQ are up, starting them if not,
# and waits until both answer. Used by .ci/run, scripts/test.sh and scripts/run.sh.
set -euo pipefail

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if ! pg_up; then
  echo "services: starting PostgreSQL" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
if ! amqp_up; then
  echo "services: starting RabbitMQ" >&2
  rabbitmq-server -detached || true
fi

for _ in $(seq 1 120); do
  if pg_up && amqp_up; then
    # The AMQP port opens a little before the broker accepts logins.
    if rabbitmq-diagnostics -q check_running >/dev/null 2>&1 || [ -z "$(command -v rabbitmq-diagnostics)" ]; then
      exit 0
    fi
  fi
  sleep 1
done
echo "services: PostgreSQL (127.0.0.1:5432) or RabbitMQ (127.0.0.1:5672) did not come up" >&2
exit 1
