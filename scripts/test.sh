#!/usr/bin/env bash
# Runs every test, from a fresh clone: makes sure a RabbitMQ answers at
# AMQP_ADDR (starting one as scripts/try.sh does), starts the 3-node
# RabbitMQ 4.0 cluster the cluster tests use and the RabbitMQ 4.0 node with
# TLS, EXTERNAL and OAuth 2 the TLS and OAuth 2 tests use (scripts/rabbitmq.sh,
# a Debian chroot on 127.0.0.1:5673-5676 and 5686; root on Debian/Ubuntu),
# installs the tools the tests call (kill, openssl; rabbitmqctl comes with
# the broker), then runs:
#   the forks' own tests (vendor/),
#   cargo test --all-features -- --include-ignored   against AMQP_ADDR,
#   scripts/outside-app.sh                           an application crate built outside the checkout,
#   cargo test --all-features -- --include-ignored   against RabbitMQ 4.0 (the cluster's first node).
# Each test uses queues of its own and deletes them. What it started keeps
# running (the second run is quicker); it says how to stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/broker.sh
source scripts/broker.sh

ensure_cargo
ensure_kill
ensure_broker
if ! command -v rabbitmqctl >/dev/null && [ -z "${RABBITMQCTL:-}" ]; then
    if [ "${BROKER_STARTED:-}" = "docker compose down" ]; then
        export RABBITMQCTL="docker compose exec -T rabbitmq rabbitmqctl"
    else
        log "warning: rabbitmqctl not found (set RABBITMQCTL to a command that runs it); the broker-side tests will fail"
    fi
fi
ensure_cluster

log "the forks' own tests (RabbitMQ at $AMQP_ADDR)"
cargo test -p rabbit-guard-amq-protocol-types -p rabbit-guard-amq-protocol -p rabbit-guard-lapin

log "cargo test --all-features -- --include-ignored (RabbitMQ at $AMQP_ADDR)"
cargo test --all-features -- --include-ignored

log "an application crate outside the checkout builds on rabbit-guard and passes its tests (scripts/outside-app.sh)"
bash scripts/outside-app.sh

log "cargo test --all-features -- --include-ignored (RabbitMQ 4.0: the cluster's first node)"
AMQP_ADDR="amqp://guest:guest@127.0.0.1:5673/%2f" RABBITMQCTL="bash scripts/rabbitmq.sh ctl 1" \
    cargo test --all-features -- --include-ignored

log "all tests passed"
log "still running: the RabbitMQ 4.0 cluster (scripts/rabbitmq.sh stop)${BROKER_STARTED:+, the broker at $AMQP_ADDR ($BROKER_STARTED)}"
