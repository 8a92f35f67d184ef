# Sourced by scripts/try.sh, scripts/test.sh and .ci/run: finding (or
# starting) the RabbitMQ at AMQP_ADDR, and the tools around it.
#
#   ensure_cargo     cargo is there, or say how to get it
#   ensure_broker    a broker answers at AMQP_ADDR: the one already running,
#                    else Docker Compose's (when a Docker engine answers),
#                    else the distribution's rabbitmq-server (Debian/Ubuntu,
#                    root or sudo), else exit 1 saying what to install
#   ensure_cluster   the 3-node RabbitMQ 4.0 on 127.0.0.1:5673-5675
#                    (scripts/rabbitmq.sh; root on Debian/Ubuntu)
#   ensure_kill      kill(1), which the CLI tests send signals with
#
# Each says what it starts, and leaves a running broker running.

export AMQP_ADDR="${AMQP_ADDR:-amqp://guest:guest@127.0.0.1:5672/%2f}"

log() { printf '==> %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi
}

can_be_root() {
    [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null && sudo -n true 2>/dev/null; }
}

apt_install() {
    log "installing $* (apt)"
    as_root apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q "$@" >/dev/null
}

# host and port of AMQP_ADDR (amqp://user:pass@host:port/vhost)
amqp_host_port() {
    local hostport="${AMQP_ADDR#*://}"
    hostport="${hostport##*@}"
    hostport="${hostport%%/*}"
    broker_host="${hostport%%:*}"
    broker_port="${hostport##*:}"
    [ "$broker_port" = "$hostport" ] && broker_port=5672
    return 0
}

broker_answers() {
    amqp_host_port
    (exec 3<>"/dev/tcp/$broker_host/$broker_port") 2>/dev/null
}

wait_for_broker() {
    local what=$1 seconds=${2:-120}
    for _ in $(seq 1 "$seconds"); do
        if broker_answers; then
            log "RabbitMQ is up at $broker_host:$broker_port ($what)"
            return 0
        fi
        sleep 1
    done
    echo "RabbitMQ ($what) did not answer at $broker_host:$broker_port within ${seconds}s" >&2
    return 1
}

ensure_cargo() {
    command -v cargo >/dev/null && return 0
    echo "cargo is not installed: install Rust with https://rustup.rs (curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh), then run this again" >&2
    exit 1
}

docker_engine_answers() {
    command -v docker >/dev/null && docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1
}

is_debian_like() {
    [ -f /etc/debian_version ] && command -v apt-get >/dev/null
}

ensure_broker() {
    if broker_answers; then
        log "RabbitMQ answers at $broker_host:$broker_port"
        return 0
    fi
    local local_addr=false
    case "$broker_host" in 127.0.0.1 | localhost | ::1) local_addr=true ;; esac
    if ! $local_addr; then
        echo "no RabbitMQ answers at $broker_host:$broker_port (AMQP_ADDR): start it, or unset AMQP_ADDR to use a local one" >&2
        exit 1
    fi
    if docker_engine_answers && [ "$broker_port" = 5672 ]; then
        log "starting RabbitMQ with Docker Compose (docker compose up -d rabbitmq; stop it with docker compose down)"
        docker compose up -d rabbitmq
        wait_for_broker "docker compose" 180 || exit 1
        BROKER_STARTED="docker compose down"
        return 0
    fi
    if is_debian_like && can_be_root && [ "$broker_port" = 5672 ]; then
        command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
        if ! broker_answers; then
            log "starting the distribution's RabbitMQ (rabbitmq-server -detached; stop it with rabbitmqctl stop)"
            as_root rabbitmq-server -detached >/dev/null 2>&1 || true
        fi
        wait_for_broker "rabbitmq-server" 120 || exit 1
        BROKER_STARTED="rabbitmqctl stop"
        return 0
    fi
    cat >&2 <<EOF
No RabbitMQ answers at $broker_host:$broker_port, and none can be started here.
Any one of these will do, then run this again:
  - Docker: install Docker Engine with its compose plugin (https://docs.docker.com/engine/install/);
    this script then runs 'docker compose up -d rabbitmq'.
  - Debian or Ubuntu, as root or with sudo: this script installs and starts rabbitmq-server itself.
  - Anywhere else: install RabbitMQ (https://www.rabbitmq.com/docs/download) and start it,
    or set AMQP_ADDR=amqp://USER:PASSWORD@HOST:PORT/%2f to a broker you have.
EOF
    exit 1
}

ensure_cluster() {
    if ! is_debian_like || ! can_be_root; then
        cat >&2 <<EOF
The cluster tests need the 3-node RabbitMQ 4.0 that scripts/rabbitmq.sh runs in a
Debian chroot, which needs root (or sudo) on Debian or Ubuntu. Run this there.
EOF
        exit 1
    fi
    command -v debootstrap >/dev/null || apt_install debootstrap
    log "RabbitMQ 4.0 cluster on 127.0.0.1:5673-5675 (scripts/rabbitmq.sh start 3; stop it with scripts/rabbitmq.sh stop)"
    as_root bash scripts/rabbitmq.sh start 3
    command -v openssl >/dev/null || apt_install openssl
    log "RabbitMQ 4.0 with TLS, EXTERNAL and OAuth 2 on 127.0.0.1:5676/5686 for the TLS and OAuth 2 tests (scripts/rabbitmq.sh start-auth)"
    as_root bash scripts/rabbitmq.sh start-auth
}

ensure_kill() {
    # `command -v kill` finds the shell's builtin; the tests run the program.
    type -P kill >/dev/null || apt_install procps
}
