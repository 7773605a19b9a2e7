#!/usr/bin/env bash
# Sets up, idempotently, everything Muster's test suite needs on this machine,
# reusing whatever is already there:
#
#   - Debian packages: postgresql, redis-server, mmdebstrap, python3, python3-venv,
#     iproute2 (network namespaces of the agent's ICMP tests)
#   - PostgreSQL 15 (cluster 15/main) running on 127.0.0.1:5432, with a role
#     muster/muster (LOGIN, CREATEDB) reachable over TCP with a password
#   - redis-server answering on 127.0.0.1:6379
#   - the local container images (deploy/images/build.sh)
#   - schemathesis, at the versions scripts/schemathesis-requirements.txt pins,
#     in a virtualenv of its own ($MUSTER_VENV, by default
#     ~/.cache/muster/venv), made once and reused while that file is unchanged
#
# At the end it prints the environment the tests read, as export lines.
#
# Usage: scripts/test-env.sh [--print-env]
#
#   --print-env  progress goes to stderr and only the export lines to stdout:
#                eval "$(scripts/test-env.sh --print-env)"
set -euo pipefail

PG_VERSION=15
PG_CLUSTER=main
PG_PORT=5432
REDIS_PORT=6379
DATABASE_URL="postgres://muster:muster@127.0.0.1:${PG_PORT}/postgres"
REDIS_URL="redis://127.0.0.1:${REDIS_PORT}/"
PACKAGES=(postgresql redis-server mmdebstrap python3 python3-venv iproute2)
# Debian's python3, the one python3-venv completes, whatever else is on PATH.
PYTHON=/usr/bin/python3
VENV=${MUSTER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/muster/venv}
REQUIREMENTS=scripts/schemathesis-requirements.txt

print_env=0
for arg in "$@"; do
    case $arg in
        --print-env) print_env=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            printf 'test-env.sh: error: unknown argument %s (try --help)\n' "$arg" >&2
            exit 2
            ;;
    esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf 'test-env: %s\n' "$*"; }
die() {
    printf 'test-env.sh: error: %s\n' "$*" >&2
    exit 1
}
on_error() {
    printf 'test-env.sh: error: exit %s at line %s: %s\n' "$1" "$2" "$3" >&2
}
set -E
trap 'on_error $? "$LINENO" "$BASH_COMMAND"' ERR

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    die "must run as root (or with sudo available) to install packages and start services"
fi

as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && sudo -u postgres -- "$@")
    fi
}

logdir=$(mktemp -d "${TMPDIR:-/tmp}/muster-test-env.XXXXXX")
trap 'rm -rf "$logdir"' EXIT

# run_logged NAME CMD...: output goes to a log, shown only on failure.
run_logged() {
    local log="$logdir/$1.log"
    shift
    if ! "$@" >"$log" 2>&1; then
        printf 'test-env.sh: command failed: %s\n--- last lines of its output ---\n' "$*" >&2
        tail -n 40 "$log" >&2
        return 1
    fi
}

# detached CMD...: runs CMD, with stdin from /dev/null, and with no file
# descriptor open but 0-2, for commands that leave a daemon behind: a daemon
# holding a pipe inherited from whoever runs this script would keep that
# pipe's reader waiting for it.
detached() {
    (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            if [ "$fd" -gt 2 ] 2>/dev/null; then
                eval "exec $fd>&-" 2>/dev/null || true
            fi
        done
        exec "$@" </dev/null
    )
}

# wait_for SECONDS CMD...: retries CMD every 0.2s until it succeeds.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# State of cluster $PG_VERSION/$PG_CLUSTER as pg_lsclusters shows it (online,
# down, ...), empty if there is no such cluster.
cluster_status() {
    pg_lsclusters -h 2>/dev/null |
        awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1 == v && $2 == c { print $4 }'
}

redis_up() {
    [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]
}

setup() {
    # --- Debian packages -----------------------------------------------------
    local missing=() pkg status cluster_port out
    for pkg in "${PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        step "installing ${missing[*]}"
        command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install ${missing[*]} by hand"
        export DEBIAN_FRONTEND=noninteractive
        run_logged apt-update "${SUDO[@]}" apt-get -q update ||
            die "apt-get update failed"
        run_logged apt-install "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get -q -y install --no-install-recommends "${missing[@]}" ||
            die "could not install ${missing[*]}"
    else
        step "packages present: ${PACKAGES[*]}"
    fi

    # --- PostgreSQL ----------------------------------------------------------
    command -v pg_lsclusters >/dev/null 2>&1 || die "pg_lsclusters not found (postgresql-common missing?)"
    status=$(cluster_status)
    if [ -z "$status" ]; then
        step "creating PostgreSQL cluster $PG_VERSION/$PG_CLUSTER"
        run_logged pg-create "${SUDO[@]}" pg_createcluster --port "$PG_PORT" "$PG_VERSION" "$PG_CLUSTER" ||
            die "could not create PostgreSQL cluster $PG_VERSION/$PG_CLUSTER"
        status=$(cluster_status)
    fi
    cluster_port=$(pg_lsclusters -h | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1 == v && $2 == c { print $3 }')
    [ "$cluster_port" = "$PG_PORT" ] ||
        die "PostgreSQL cluster $PG_VERSION/$PG_CLUSTER listens on port $cluster_port, not $PG_PORT"
    case $status in
        online*) step "PostgreSQL $PG_VERSION/$PG_CLUSTER already running" ;;
        *)
            step "starting PostgreSQL $PG_VERSION/$PG_CLUSTER"
            run_logged pg-start detached "${SUDO[@]}" pg_ctlcluster --skip-systemctl-redirect \
                "$PG_VERSION" "$PG_CLUSTER" start ||
                die "could not start PostgreSQL (see /var/log/postgresql/postgresql-$PG_VERSION-$PG_CLUSTER.log)"
            ;;
    esac
    wait_for 30 pg_isready -q -h 127.0.0.1 -p "$PG_PORT" ||
        die "PostgreSQL does not accept connections on 127.0.0.1:$PG_PORT"

    run_logged pg-role as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres -c "
    DO \$\$
    BEGIN
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'muster') THEN
            CREATE ROLE muster LOGIN CREATEDB PASSWORD 'muster';
        ELSE
            ALTER ROLE muster LOGIN CREATEDB PASSWORD 'muster';
        END IF;
    END
    \$\$;" || die "could not create the PostgreSQL role muster"
    if ! out=$(psql -X -qAt "$DATABASE_URL" -c 'select 1' 2>&1) || [ "$out" != 1 ]; then
        die "cannot log in as muster over TCP ($out); pg_hba.conf must allow scram-sha-256 or md5 for host connections from 127.0.0.1"
    fi
    step "PostgreSQL ready: role muster can log in on 127.0.0.1:$PG_PORT"

    # --- Redis ---------------------------------------------------------------
    if redis_up; then
        step "Redis already answering on 127.0.0.1:$REDIS_PORT"
    else
        step "starting redis-server on 127.0.0.1:$REDIS_PORT"
        run_logged redis-start detached "${SUDO[@]}" redis-server --daemonize yes \
            --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
            --dir /tmp --logfile "${TMPDIR:-/tmp}/muster-test-redis.log" ||
            die "could not start redis-server"
        wait_for 15 redis_up ||
            die "redis-server does not answer on 127.0.0.1:$REDIS_PORT (see ${TMPDIR:-/tmp}/muster-test-redis.log)"
        step "Redis ready"
    fi

    # --- container images ----------------------------------------------------
    command -v docker >/dev/null 2>&1 || die "docker is not installed"
    docker version --format '{{.Server.Version}}' >/dev/null 2>&1 ||
        die "cannot reach the Docker daemon (is dockerd running?)"
    deploy/images/build.sh || die "building the container images failed"

    # --- schemathesis ----------------------------------------------------------
    # The virtualenv records the digest of the requirements it was made
    # from; another digest, or a virtualenv that no longer runs, is made anew.
    local want have
    want=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
    have=$(cat "$VENV/.muster-requirements" 2>/dev/null || true)
    if [ "$have" = "$want" ] && "$VENV/bin/st" --version >/dev/null 2>&1; then
        step "schemathesis present in $VENV"
    else
        "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
            die "schemathesis needs Python 3.10 or later; $PYTHON is $("$PYTHON" --version 2>&1)"
        step "installing schemathesis into $VENV"
        rm -rf "$VENV"
        mkdir -p "$(dirname "$VENV")"
        run_logged venv "$PYTHON" -m venv "$VENV" ||
            die "could not create a virtualenv in $VENV"
        run_logged pip-install "$VENV/bin/pip" install --quiet --disable-pip-version-check \
            --requirement "$REQUIREMENTS" ||
            die "could not install schemathesis (from $REQUIREMENTS) into $VENV"
        "$VENV/bin/st" --version >/dev/null 2>&1 || die "schemathesis in $VENV does not run"
        "$VENV/bin/python" -c 'import prometheus_client.parser' ||
            die "prometheus-client in $VENV does not import"
        printf '%s\n' "$want" >"$VENV/.muster-requirements"
        step "schemathesis ready: $("$VENV/bin/st" --version)"
    fi

    step "environment ready"
}

# With --print-env all progress goes to stderr, so that stdout carries only
# the export lines. Services started here never get our stdout: a daemon
# holding it open would keep `$(scripts/test-env.sh --print-env)` waiting.
if [ "$print_env" -eq 1 ]; then
    setup </dev/null >&2
else
    setup </dev/null
fi

# --- environment for the tests ---------------------------------------------
printf 'export MUSTER_TEST_DATABASE_URL=%s\n' "$DATABASE_URL"
printf 'export MUSTER_TEST_REDIS_URL=%s\n' "$REDIS_URL"
printf 'export MUSTER_SCHEMATHESIS=%s\n' "$VENV/bin/st"
printf 'export MUSTER_TEST_PYTHON=%s\n' "$VENV/bin/python"
