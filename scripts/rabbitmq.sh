#!/usr/bin/env bash
# RabbitMQ 4.0 for tests, without Docker: Debian trixie's rabbitmq-server (4.0.x on
# Erlang 27) in a debootstrap'ed chroot, as one node or a three-node cluster.
#
#   scripts/rabbitmq.sh start [1|3]   build the root if not cached, start the nodes that
#                                     are not running, cluster them (3), wait until ready
#   scripts/rabbitmq.sh stop          stop every node of this script, unmount; keeps the root and data
#   scripts/rabbitmq.sh ctl N ARGS…   rabbitmqctl -n rgN@localhost ARGS… inside the chroot
#   scripts/rabbitmq.sh status        one line per node
#   scripts/rabbitmq.sh reset         stop, then delete the nodes' data (a fresh cluster forms next start)
#   scripts/rabbitmq.sh build         only build (cache) the root
#   scripts/rabbitmq.sh start-auth    start rg4@localhost, a standalone node for the TLS and
#                                     OAuth 2 tests (below), with its certificates and keys
#
# Node N (1..3) is rgN@localhost, AMQP on 127.0.0.1:567(2+N) (guest/guest allowed from
# loopback), Erlang distribution on 2567(2+N), all registered with the chroot's own epmd on
# port 4370, so the host's broker (rabbit@localhost, 5672, epmd 4369) is never involved.
# Node data lives in ROOT/var/lib/rabbitmq/rgN; it survives `stop` and reboots.
#
# rg4@localhost (start-auth) is not clustered: AMQP on 127.0.0.1:5676, AMQPS on 5686 with
# verify_peer and fail_if_no_peer_cert (a client certificate signed by the fixture's CA is
# required), EXTERNAL (user = the certificate's CN) besides PLAIN, and the OAuth 2 backend
# (audience "rabbitmq", RS256 tokens signed with the fixture's key, then internal users).
# Its fixture, made with openssl at first start: ROOT/var/lib/rabbitmq/rg4/fixture/
#   ca.pem ca.key             the CA the broker trusts for client certificates
#   server.pem server.key     the broker's certificate (CN and DNS name localhost, no IP)
#   jwt.key jwt.pub.pem       the key tokens are signed with, and the one the broker checks
#
# Needs: root, flock, debootstrap (apt-get install -y debootstrap) and a Debian mirror the
# first time (45-75 s to build, 370 MB). A half-built root (ROOT.partial) is never used.
# Environment:
#   RG_RABBITMQ4_ROOT    cached root (default /var/cache/rabbit-guard/rabbitmq4-trixie)
#   RG_DEBIAN_MIRROR     mirror for debootstrap (default http://deb.debian.org/debian)
#   RG_RABBITMQ4_WAIT    seconds to wait for the nodes (default 120)
set -euo pipefail

ROOT=${RG_RABBITMQ4_ROOT:-/var/cache/rabbit-guard/rabbitmq4-trixie}
ROOT=${ROOT%/}
MIRROR=${RG_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=trixie
WAIT=${RG_RABBITMQ4_WAIT:-120}
EPMD_PORT=4370
DATA=/var/lib/rabbitmq # inside the root; also the rabbitmq user's HOME (.erlang.cookie)
LOCK="$(dirname "$ROOT")/.$(basename "$ROOT").lock"

log() { printf '[rabbitmq.sh] %s\n' "$*" >&2; }
die() {
    printf '[rabbitmq.sh] FAILED: %s\n' "$*" >&2
    exit 1
}

node() { echo "rg$1@localhost"; }
amqp_port() { echo $((5672 + $1)); }
dist_port() { echo $((25672 + $1)); }
node_dir() { echo "$DATA/rg$1"; } # inside the root

AUTH=4
AUTH_TLS_PORT=5686
fixture_dir() { echo "$DATA/rg$AUTH/fixture"; } # inside the root

require_root() { [ "$(id -u)" = 0 ] || die "must run as root (chroot, mount)"; }

have_root() { [ -x "$ROOT/usr/lib/rabbitmq/bin/rabbitmq-server" ] && [ -f "$ROOT/.rg-complete" ]; }

# Mount points at or below $1, deepest first.
mounts_under() {
    awk -v p="$1" '$2 == p || index($2, p "/") == 1 { print $2 }' /proc/mounts | sort -r
}

build_root() {
    if have_root; then return 0; fi
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install -y debootstrap)"
    local tmp="$ROOT.partial" started=$SECONDS m
    mkdir -p "$(dirname "$ROOT")"
    if [ -e "$tmp" ]; then
        log "removing a half-built root $tmp"
        for m in $(mounts_under "$tmp"); do umount -l "$m"; done
        rm -rf --one-file-system "$tmp"
    fi
    log "building the RabbitMQ 4 root (debootstrap $SUITE from $MIRROR) into $tmp; log: $ROOT.build.log"
    if ! debootstrap --variant=minbase --include=rabbitmq-server "$SUITE" "$tmp" "$MIRROR" >"$ROOT.build.log" 2>&1; then
        tail -n 20 "$ROOT.build.log" >&2
        for m in $(mounts_under "$tmp"); do umount -l "$m"; done
        die "debootstrap failed (see $ROOT.build.log)"
    fi
    for m in $(mounts_under "$tmp"); do umount -l "$m"; done
    [ -x "$tmp/usr/lib/rabbitmq/bin/rabbitmq-server" ] || die "debootstrap finished but $tmp has no rabbitmq-server"
    # Erlang resolves the node host name "localhost" through /etc/hosts; minbase writes none.
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$tmp/etc/hosts"
    # Debian's package would start the broker through invoke-rc.d; nothing runs here, but make sure.
    rm -f "$tmp/var/lib/rabbitmq/.erlang.cookie"
    chroot "$tmp" dpkg-query -W -f='${Version}\n' rabbitmq-server >"$tmp/.rg-complete"
    mv "$tmp" "$ROOT"
    log "root built in $((SECONDS - started)) s: rabbitmq-server $(cat "$ROOT/.rg-complete")"
}

mount_root() {
    mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
    mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
}

umount_root() {
    local m
    for m in $(mounts_under "$ROOT"); do
        umount "$m" 2>/dev/null || umount -l "$m"
    done
}

# uid:gid of the chroot's rabbitmq user (it may differ from the host's rabbitmq user).
rabbit_ids() {
    awk -F: '$1 == "rabbitmq" { print $3 ":" $4 }' "$ROOT/etc/passwd"
}

# Run a command in the chroot as its rabbitmq user, with a clean environment.
in_root() {
    local ids
    ids=$(rabbit_ids)
    [ -n "$ids" ] || die "no rabbitmq user in $ROOT/etc/passwd"
    chroot --userspec="$ids" "$ROOT" /usr/bin/env -i \
        HOME="$DATA" PATH=/usr/lib/rabbitmq/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 LC_ALL=C.UTF-8 \
        ERL_EPMD_PORT="$EPMD_PORT" ERL_EPMD_ADDRESS=127.0.0.1 "$@"
}

rabbitmqctl_in_root() { in_root /usr/lib/rabbitmq/bin/rabbitmqctl "$@"; }

ensure_cookie() {
    local f="$ROOT$DATA/.erlang.cookie"
    if [ ! -s "$f" ]; then
        od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$f"
    fi
    chroot "$ROOT" chown rabbitmq:rabbitmq "$DATA/.erlang.cookie"
    chmod 400 "$f"
}

# Node names registered with the chroot's epmd (the Erlang VMs that are up).
registered() {
    have_root || return 0
    mountpoint -q "$ROOT/proc" || return 0 # nodes run only with the root's /proc mounted
    in_root epmd -port "$EPMD_PORT" -names 2>/dev/null | awk '$1 == "name" { print $2 }' || true
}

# True when the port answers the AMQP 0-9-1 header with a frame (Connection.Start).
amqp_up() {
    local port=$1 first
    first=$(timeout 5 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "AMQP\x00\x00\x09\x01" >&3
        head -c 1 <&3 | od -An -tx1' _ "$port" 2>/dev/null) || return 1
    [ "${first// /}" = 01 ]
}

# The auth node's certificates and keys (once; kept with its data).
make_fixture() {
    local f="$ROOT$(fixture_dir)"
    [ -s "$f/jwt.pub.pem" ] && return 0
    command -v openssl >/dev/null || die "openssl is not installed (apt-get install -y openssl)"
    mkdir -p "$f"
    log "making the auth node's certificates and keys in $f"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=rabbit-guard test CA" \
        -keyout "$f/ca.key" -out "$f/ca.pem" >/dev/null 2>&1
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
        -keyout "$f/server.key" -out "$f/server.csr" >/dev/null 2>&1
    printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$f/server.ext"
    openssl x509 -req -in "$f/server.csr" -CA "$f/ca.pem" -CAkey "$f/ca.key" -CAcreateserial \
        -days 3650 -extfile "$f/server.ext" -out "$f/server.pem" >/dev/null 2>&1
    openssl genrsa -out "$f/jwt.key" 2048 >/dev/null 2>&1
    openssl rsa -in "$f/jwt.key" -pubout -out "$f/jwt.pub.pem" >/dev/null 2>&1
    [ -s "$f/jwt.pub.pem" ] || die "openssl could not make the fixture in $f"
    chmod 644 "$f"/*
}

node_config() {
    local n=$1 f
    f=$(fixture_dir)
    printf 'listeners.tcp.default = %s\nloopback_users = none\n' "$(amqp_port "$n")"
    [ "$n" = "$AUTH" ] || return 0
    cat <<EOF
listeners.ssl.default = $AUTH_TLS_PORT
ssl_options.cacertfile = $f/ca.pem
ssl_options.certfile = $f/server.pem
ssl_options.keyfile = $f/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
ssl_cert_login_from = common_name
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = AMQPLAIN
auth_mechanisms.3 = EXTERNAL
auth_backends.1 = rabbit_auth_backend_oauth2
auth_backends.2 = internal
auth_oauth2.resource_server_id = rabbitmq
auth_oauth2.default_key = rg-test
auth_oauth2.signing_keys.rg-test = $f/jwt.pub.pem
log.file.level = debug
EOF
}

start_node() {
    local n=$1 dir conf ids
    dir=$(node_dir "$n")
    conf="$ROOT$dir/rabbitmq.conf"
    mkdir -p "$ROOT$dir/log" "$ROOT$dir/mnesia"
    node_config "$n" >"$conf"
    if [ "$n" = "$AUTH" ]; then
        echo '[rabbitmq_auth_mechanism_ssl,rabbitmq_auth_backend_oauth2].' >"$ROOT$dir/enabled_plugins"
    fi
    chroot "$ROOT" chown -R rabbitmq:rabbitmq "$dir"
    ids=$(rabbit_ids)
    log "starting $(node "$n") (amqp $(amqp_port "$n"), dist $(dist_port "$n")); console: $ROOT$dir/log/console.log"
    # setsid: the node outlives this script and its caller's process group; 9>&-: the node
    # (and the epmd it spawns) must not inherit the lock.
    setsid chroot --userspec="$ids" "$ROOT" /usr/bin/env -i \
        HOME="$DATA" PATH=/usr/lib/rabbitmq/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 LC_ALL=C.UTF-8 \
        ERL_EPMD_PORT="$EPMD_PORT" ERL_EPMD_ADDRESS=127.0.0.1 \
        RABBITMQ_NODENAME="$(node "$n")" \
        RABBITMQ_NODE_PORT="$(amqp_port "$n")" \
        RABBITMQ_DIST_PORT="$(dist_port "$n")" \
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
        RABBITMQ_MNESIA_BASE="$dir/mnesia" \
        RABBITMQ_LOG_BASE="$dir/log" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        /usr/lib/rabbitmq/bin/rabbitmq-server >>"$ROOT$dir/log/console.log" 2>&1 </dev/null 9>&- &
}

# Running nodes in the cluster as node N sees it (one name a line), from the public CLI.
running_nodes() {
    rabbitmqctl_in_root -n "$(node "$1")" -q cluster_status --formatter json 2>/dev/null |
        grep -o '"running_nodes":\[[^]]*\]' | grep -o 'rg[0-9]@localhost' || true
}

wait_amqp() {
    local deadline=$1 n
    shift
    for n in "$@"; do
        until amqp_up "$(amqp_port "$n")"; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                tail -n 15 "$ROOT$(node_dir "$n")/log/console.log" >&2 2>/dev/null || true
                die "$(node "$n") did not answer AMQP on 127.0.0.1:$(amqp_port "$n") within ${WAIT} s (logs: $ROOT$(node_dir "$n")/log)"
            fi
            sleep 1
        done
    done
}

# Processes whose root directory is the chroot (nodes, epmd, helpers).
root_pids() {
    local real p r
    real=$(readlink -f "$ROOT")
    for p in /proc/[0-9]*; do
        r=$(readlink "$p/root" 2>/dev/null) || continue
        [ "$r" = "$real" ] && echo "${p#/proc/}"
    done
    return 0
}

topology_file() { echo "$ROOT$DATA/rg-topology"; }

wipe_data() {
    local n
    for n in 1 2 3 4; do
        rm -rf --one-file-system "$ROOT$(node_dir "$n")"
    done
    rm -f "$(topology_file)"
}

# Nodes among $@ whose VM is registered with the chroot's epmd.
up_among() {
    local up n
    up=$(registered)
    for n in "$@"; do
        if grep -qx "rg$n" <<<"$up"; then echo "$n"; fi
    done
}

# Stop the nodes given (those that are up) in parallel, and wait (bounded) until they are gone.
stop_vms() {
    local n nodes waited=0
    nodes=$(up_among "$@")
    [ -n "$nodes" ] || return 0
    for n in $nodes; do
        log "stopping $(node "$n")"
        rabbitmqctl_in_root -n "$(node "$n")" -q stop >/dev/null 2>&1 &
    done
    wait || true
    # shellcheck disable=SC2086
    while [ -n "$(up_among $nodes)" ] && [ "$waited" -lt 60 ]; do
        sleep 0.5
        waited=$((waited + 1))
    done
}

do_stop() {
    [ -d "$ROOT" ] || {
        log "no root at $ROOT: nothing to stop"
        return 0
    }
    local pids waited=0
    # rg2 and rg3 first, rg1 last: the node that stops last boots first on its own next time.
    stop_vms 2 3 "$AUTH"
    stop_vms 1
    pids=$(root_pids)
    if [ -n "$pids" ]; then
        # Whatever is left in the chroot (its epmd, a node that did not stop).
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        while [ -n "$(root_pids)" ] && [ "$waited" -lt 20 ]; do
            sleep 0.5
            waited=$((waited + 1))
        done
        pids=$(root_pids)
        if [ -n "$pids" ]; then
            log "killing leftover processes in the root: $pids"
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
            sleep 1
        fi
    fi
    umount_root
    [ -z "$(root_pids)" ] || die "processes still running in $ROOT: $(root_pids | tr '\n' ' ')"
    log "stopped"
}

do_start() {
    local want=$1 nodes n up started=$SECONDS deadline topo mnesia_dir
    case "$want" in
    1) nodes="1" ;;
    3) nodes="1 2 3" ;;
    *) die "usage: $0 start [1|3]" ;;
    esac
    build_root
    mount_root
    ensure_cookie

    topo=$(cat "$(topology_file)" 2>/dev/null || true)
    up=$(registered)
    if [ "$want" = 1 ] && { [ "$topo" = 3 ] || grep -qx 'rg[23]' <<<"$up"; }; then
        log "1 node wanted but the data (or running nodes) are a 3-node cluster's: stop and reset first"
        do_stop
        wipe_data
        mount_root
        up=""
    elif [ "$want" = 3 ] && [ "$topo" != 3 ]; then
        for n in 2 3; do
            grep -qx "rg$n" <<<"$up" || rm -rf --one-file-system "$ROOT$(node_dir "$n")"
        done
    fi
    echo "$want" >"$(topology_file)"

    # One node after the other: nodes of a cluster that boot at the same time can fail the
    # boot-time consistency check ({case_clause,{error,{node_not_running,...}}}).
    deadline=$((started + WAIT))
    for n in $nodes; do
        if grep -qx "rg$n" <<<"$up"; then
            amqp_up "$(amqp_port "$n")" || {
                # Up but no listener: after stop_app, or still booting (start_app then waits).
                log "$(node "$n") is up without AMQP: start_app"
                rabbitmqctl_in_root -n "$(node "$n")" -q start_app >/dev/null 2>&1 || true
            }
        else
            mnesia_dir="$(node_dir 1)/mnesia/$(node 1)"
            if [ "$n" = 1 ] && [ -z "$(up_among 2 3)" ] && [ -d "$ROOT$mnesia_dir" ]; then
                # rg1 boots on its own tables instead of waiting (up to 5 min) for peers that
                # start after it. After `stop` it stopped last anyway; this is for a reboot or
                # a kill, where every node would wait for the others (`rabbitmqctl force_boot`).
                touch "$ROOT$mnesia_dir/force_load"
                chroot "$ROOT" chown rabbitmq:rabbitmq "$mnesia_dir/force_load"
            fi
            start_node "$n"
        fi
        wait_amqp "$deadline" "$n"
    done

    if [ "$want" = 3 ]; then
        for n in 2 3; do
            if ! running_nodes "$n" | grep -qx 'rg1@localhost'; then
                log "joining $(node "$n") to $(node 1)"
                rabbitmqctl_in_root -n "$(node "$n")" -q stop_app >/dev/null ||
                    die "stop_app on $(node "$n") failed"
                rabbitmqctl_in_root -n "$(node "$n")" -q reset >/dev/null ||
                    die "reset on $(node "$n") failed"
                rabbitmqctl_in_root -n "$(node "$n")" -q join_cluster "$(node 1)" >/dev/null ||
                    die "join_cluster $(node 1) on $(node "$n") failed"
                rabbitmqctl_in_root -n "$(node "$n")" -q start_app >/dev/null ||
                    die "start_app on $(node "$n") failed"
            fi
        done
        wait_amqp "$deadline" 1 2 3
        until [ "$(running_nodes 1 | sort -u | wc -l)" = 3 ]; do
            [ "$SECONDS" -lt "$deadline" ] ||
                die "cluster_status on $(node 1) does not show 3 running nodes within ${WAIT} s: $(running_nodes 1 | tr '\n' ' ')"
            sleep 1
        done
        log "cluster of 3 ready (rg1..rg3@localhost, amqp 5673-5675) in $((SECONDS - started)) s"
    else
        log "$(node 1) ready (amqp 127.0.0.1:5673) in $((SECONDS - started)) s"
    fi
}

# The standalone auth node (TLS, EXTERNAL, OAuth 2), with its fixture.
do_start_auth() {
    local started=$SECONDS deadline
    build_root
    mount_root
    ensure_cookie
    make_fixture
    deadline=$((started + WAIT))
    if grep -qx "rg$AUTH" <<<"$(registered)"; then
        amqp_up "$(amqp_port "$AUTH")" ||
            rabbitmqctl_in_root -n "$(node "$AUTH")" -q start_app >/dev/null 2>&1 || true
    else
        start_node "$AUTH"
    fi
    wait_amqp "$deadline" "$AUTH"
    until (exec 3<>"/dev/tcp/127.0.0.1/$AUTH_TLS_PORT") 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || die "$(node "$AUTH") did not open AMQPS on 127.0.0.1:$AUTH_TLS_PORT within ${WAIT} s"
        sleep 1
    done
    log "$(node "$AUTH") ready (amqp 127.0.0.1:$(amqp_port "$AUTH"), amqps $AUTH_TLS_PORT; fixture $ROOT$(fixture_dir)) in $((SECONDS - started)) s"
}

do_status() {
    local up n state
    if ! have_root; then
        echo "no RabbitMQ 4 root at $ROOT (not built)"
        return 0
    fi
    up=$(registered)
    for n in 1 2 3 "$AUTH"; do
        if grep -qx "rg$n" <<<"$up"; then
            if amqp_up "$(amqp_port "$n")"; then state="running (amqp 127.0.0.1:$(amqp_port "$n") up)"; else state="node up, amqp $(amqp_port "$n") not answering (app stopped or booting)"; fi
        else
            state="not running"
        fi
        echo "$(node "$n"): $state"
    done
}

with_lock() {
    mkdir -p "$(dirname "$LOCK")"
    exec 9>"$LOCK"
    flock -w 600 9 || die "could not lock $LOCK within 600 s"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
start)
    require_root
    with_lock
    [ $# -le 1 ] || die "usage: $0 start [1|3]"
    do_start "${1:-1}"
    ;;
stop)
    require_root
    with_lock
    do_stop
    ;;
reset)
    require_root
    with_lock
    do_stop
    if [ -d "$ROOT" ]; then wipe_data; fi
    log "data of rg1..rg4 deleted (root kept)"
    ;;
start-auth)
    require_root
    with_lock
    do_start_auth
    ;;
build)
    require_root
    with_lock
    build_root
    ;;
ctl)
    require_root
    [ $# -ge 1 ] && [[ $1 =~ ^[1234]$ ]] || die "usage: $0 ctl 1|2|3|4 ARGS…"
    have_root || die "no RabbitMQ 4 root at $ROOT (run: $0 start)"
    n=$1
    shift
    rabbitmqctl_in_root -n "$(node "$n")" "$@"
    ;;
status)
    require_root
    do_status
    ;;
*)
    die "usage: $0 start [1|3] | start-auth | stop | ctl N ARGS… | status | reset | build"
    ;;
esac
