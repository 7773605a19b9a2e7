#!/usr/bin/env bash
# Installs, idempotently, what `muster-bench` needs beyond the test
# environment (scripts/test-env.sh):
#   - the Debian packages prometheus-blackbox-exporter, which the `agents`
#     scenario runs beside muster-agent (the bench starts its own exporter
#     process with a config of its own; a service the package may have started
#     is left alone) and python3-venv;
#   - the Python peers pinned in scripts/bench-requirements.txt (celery,
#     procrastinate, ansible-runner), in a virtualenv of its own
#     ($MUSTER_BENCH_VENV, by default ~/.cache/muster/bench-venv), made once
#     and reused while that file is unchanged.
# It prints the virtualenv's python as its last line:
#   export MUSTER_BENCH_PYTHON=...
#
# Usage: scripts/bench-env.sh
set -euo pipefail

PACKAGES=(prometheus-blackbox-exporter python3 python3-venv)
HERE=$(cd "$(dirname "$0")" && pwd)
REQUIREMENTS=$HERE/bench-requirements.txt
VENV=${MUSTER_BENCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/muster/bench-venv}
# Debian's python3, the one python3-venv completes, whatever else is on PATH.
PYTHON=/usr/bin/python3

case ${1:-} in
    '') ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        printf 'bench-env.sh: error: unknown argument %s (try --help)\n' "$1" >&2
        exit 2
        ;;
esac

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    printf 'bench-env.sh: error: must run as root (or with sudo available) to install packages\n' >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    printf 'bench-env: %s already installed\n' "${PACKAGES[*]}" >&2
else
command -v apt-get >/dev/null 2>&1 || {
    printf 'bench-env.sh: error: apt-get not found; install %s by hand\n' "${missing[*]}" >&2
    exit 1
}
printf 'bench-env: installing %s\n' "${missing[*]}" >&2
"${SUDO[@]}" apt-get -q update
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get -q -y install --no-install-recommends "${missing[@]}"
command -v prometheus-blackbox-exporter >/dev/null 2>&1 || {
    printf 'bench-env.sh: error: prometheus-blackbox-exporter is not on PATH after installing\n' >&2
    exit 1
}
fi

want=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
have=$(cat "$VENV/.muster-requirements" 2>/dev/null || true)
if [ "$have" = "$want" ] && "$VENV/bin/python" -c 'import celery, procrastinate, ansible_runner' 2>/dev/null; then
    printf 'bench-env: Python peers present in %s\n' "$VENV" >&2
else
    printf 'bench-env: installing the Python peers into %s\n' "$VENV" >&2
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV" >&2 || {
        printf 'bench-env.sh: error: could not create a virtualenv in %s\n' "$VENV" >&2
        exit 1
    }
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQUIREMENTS" >&2 || {
        printf 'bench-env.sh: error: could not install %s into %s\n' "$REQUIREMENTS" "$VENV" >&2
        exit 1
    }
    "$VENV/bin/python" -c 'import celery, procrastinate, ansible_runner' || {
        printf 'bench-env.sh: error: the Python peers in %s do not import\n' "$VENV" >&2
        exit 1
    }
    printf '%s\n' "$want" >"$VENV/.muster-requirements"
fi
printf 'bench-env: done\n' >&2
printf 'export MUSTER_BENCH_PYTHON=%s\n' "$VENV/bin/python"
