#!/usr/bin/env bash
# See it work: makes sure a RabbitMQ answers at AMQP_ADDR (default
# amqp://guest:guest@127.0.0.1:5672/%2f), starting one if none does (Docker
# Compose when a Docker engine answers, else the distribution's
# rabbitmq-server on Debian/Ubuntu as root), builds the release binary and
# runs `rabbit-guard demo` (about 40 s): a flaky dependency, the breaker
# pausing consumption at the broker, nothing lost. Arguments go to the demo
# (--fail-for 20s, --workers 3, …). Idempotent: the second run reuses the
# broker and the build.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/broker.sh
source scripts/broker.sh

ensure_cargo
ensure_broker
log "building the release binary (cargo build --release; a few minutes the first time)"
cargo build --release --bin rabbit-guard
log "rabbit-guard demo $*"
status=0
target/release/rabbit-guard demo --url "$AMQP_ADDR" "$@" || status=$?
if [ -n "${BROKER_STARTED:-}" ]; then
    log "the broker started for this demo is still running; stop it with: $BROKER_STARTED"
fi
exit $status
