#!/usr/bin/env bash
# Installs, idempotently, what `muster-bench` needs beyond the test
# environment (scripts/test-env.sh): the Debian package
# prometheus-blackbox-exporter, which the `agents` scenario runs beside
# muster-agent. The bench starts its own exporter process with a config of
# its own; a service the package may have started is left alone.
#
# Usage: scripts/bench-env.sh
set -euo pipefail

PACKAGES=(prometheus-blackbox-exporter)

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
    printf 'bench-env: %s already installed\n' "${PACKAGES[*]}"
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || {
    printf 'bench-env.sh: error: apt-get not found; install %s by hand\n' "${missing[*]}" >&2
    exit 1
}
printf 'bench-env: installing %s\n' "${missing[*]}"
"${SUDO[@]}" apt-get -q update
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get -q -y install --no-install-recommends "${missing[@]}"
command -v prometheus-blackbox-exporter >/dev/null 2>&1 || {
    printf 'bench-env.sh: error: prometheus-blackbox-exporter is not on PATH after installing\n' >&2
    exit 1
}
printf 'bench-env: done\n'
