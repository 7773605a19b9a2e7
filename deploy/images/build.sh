#!/usr/bin/env bash
# Builds the local container images Muster's runners and tests use, from
# Debian packages only (no registry pulls):
#
#   muster/ansible:bookworm  Debian bookworm with ansible-core, python3,
#                            openssh-client, bash and ca-certificates
#   muster/busybox:latest    a static busybox with /bin/sh and /tmp, for fast
#                            script tests
#
# An image whose tag already exists is reused unless --force is given.
#
# Usage: deploy/images/build.sh [--force] [ansible|busybox ...]
#
# The Debian mirror is taken from the machine's own apt sources file
# (MUSTER_APT_SOURCES, default /etc/apt/sources.list.d/debian.sources), so
# the build needs no network access beyond that mirror.
set -euo pipefail

SOURCES=${MUSTER_APT_SOURCES:-/etc/apt/sources.list.d/debian.sources}
SUITE=bookworm
ANSIBLE_IMAGE=muster/ansible:bookworm
BUSYBOX_IMAGE=muster/busybox:latest
IMAGE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

die() {
    printf 'build.sh: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

force=0
wanted=()
for arg in "$@"; do
    case $arg in
        --force | -f) force=1 ;;
        -h | --help) usage; exit 0 ;;
        ansible | busybox) wanted+=("$arg") ;;
        *) die "unknown argument '$arg' (try --help)" ;;
    esac
done
if [ ${#wanted[@]} -eq 0 ]; then
    wanted=(ansible busybox)
fi

command -v docker >/dev/null 2>&1 || die "docker is not installed"
command -v mmdebstrap >/dev/null 2>&1 ||
    die "mmdebstrap is not installed (apt-get install mmdebstrap)"
[ -r "$SOURCES" ] || die "apt sources file $SOURCES not found"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 ||
    die "cannot reach the Docker daemon (is it running, and may this user use it?)"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/muster-images.XXXXXX")
cleanup() {
    rm -rf --one-file-system "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

image_exists() {
    docker image inspect "$1" >/dev/null 2>&1
}

image_id() {
    docker image inspect --format '{{.Id}}' "$1" 2>/dev/null || true
}

image_size() {
    local bytes
    bytes=$(docker image inspect --format '{{.Size}}' "$1")
    if command -v numfmt >/dev/null 2>&1; then
        numfmt --to=si --suffix=B --format='%.1f' "$bytes"
    else
        printf '%s bytes' "$bytes"
    fi
}

# run_logged LOGNAME CMD...: runs CMD with its output in a log file, shown
# only if the command fails.
run_logged() {
    local log="$tmp/$1.log"
    shift
    if ! "$@" >"$log" 2>&1; then
        printf 'build.sh: command failed: %s\n--- last lines of its output ---\n' "$*" >&2
        tail -n 40 "$log" >&2
        return 1
    fi
}

# Removes the image an old tag pointed to, once a rebuild moved the tag
# away from it (best effort: a container may still use it).
drop_replaced() {
    local old=$1 tag=$2
    if [ -n "$old" ] && [ "$old" != "$(image_id "$tag")" ]; then
        docker image rm "$old" >/dev/null 2>&1 || true
    fi
}

build_ansible() {
    local tar="$tmp/ansible.tar"
    local hooks=()
    # Set up merged /usr with the usr-is-merged package; without this hook apt
    # satisfies init-system-helpers with usrmerge, which drags in perl.
    if [ -d /usr/share/mmdebstrap/hooks/merged-usr ]; then
        hooks+=(--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr)
    fi
    # Runs inside mmdebstrap's shell, with the root file system in $1.
    # shellcheck disable=SC2016
    local strip_logs='cd "$1" && rm -rf var/log/apt/* var/log/dpkg.log var/log/alternatives.log \
        var/log/bootstrap.log var/cache/debconf/*-old var/lib/dpkg/*-old var/cache/ldconfig/aux-cache'
    run_logged mmdebstrap-ansible mmdebstrap \
        --variant=minbase \
        "${hooks[@]}" \
        --include=ansible-core,python3,openssh-client,bash,ca-certificates \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/lintian/*' \
        --dpkgopt='path-exclude=/usr/share/linda/*' \
        --customize-hook="$strip_logs" \
        "$SUITE" "$tar" "$SOURCES"
    run_logged import-ansible docker import \
        --change "ENV PATH=$IMAGE_PATH" \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        --message "muster ansible image (Debian $SUITE)" \
        "$tar" "$ANSIBLE_IMAGE"
    run_logged check-ansible docker run --rm --network none "$ANSIBLE_IMAGE" ansible-playbook --version
}

build_busybox() {
    local tar="$tmp/busybox-deb.tar" root="$tmp/busybox-root" member applet
    # The extract variant only unpacks the named package: no dpkg, no apt.
    run_logged mmdebstrap-busybox mmdebstrap \
        --variant=extract --include=busybox-static \
        "$SUITE" "$tar" "$SOURCES"
    member=$(tar -tf "$tar" | grep -E '^\./(usr/)?s?bin/busybox$' | head -n 1) ||
        die "busybox binary not found in the busybox-static package"
    mkdir -p "$tmp/busybox-deb"
    tar -xf "$tar" -C "$tmp/busybox-deb" "$member"

    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,var/tmp,proc,sys,dev}
    chmod 1777 "$root/tmp" "$root/var/tmp"
    chmod 0700 "$root/root"
    install -m 0755 "$tmp/busybox-deb/$member" "$root/bin/busybox"
    # One absolute symlink per applet, at the path busybox itself lists.
    while read -r applet; do
        applet=${applet#/}
        case $applet in
            bin/busybox | linuxrc) continue ;; # linuxrc: init for initrds
        esac
        mkdir -p "$root/$(dirname "$applet")"
        ln -sfn /bin/busybox "$root/$applet"
    done < <("$root/bin/busybox" --list-full)
    local a
    for a in sh sleep echo cat; do
        [ -L "$root/bin/$a" ] || die "busybox has no '$a' applet"
    done
    printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' \
        'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >"$root/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' >"$root/etc/group"

    tar -C "$root" --numeric-owner --owner=0 --group=0 -cf "$tmp/busybox.tar" .
    run_logged import-busybox docker import \
        --change "ENV PATH=$IMAGE_PATH" \
        --change 'CMD ["/bin/sh"]' \
        --message "muster busybox image (busybox-static from Debian $SUITE)" \
        "$tmp/busybox.tar" "$BUSYBOX_IMAGE"
    run_logged check-busybox docker run --rm --network none "$BUSYBOX_IMAGE" \
        sh -c 'test -d /tmp && echo ok | cat && sleep 0'
}

for name in "${wanted[@]}"; do
    case $name in
        ansible) tag=$ANSIBLE_IMAGE ;;
        busybox) tag=$BUSYBOX_IMAGE ;;
    esac
    if [ "$force" -eq 0 ] && image_exists "$tag"; then
        printf '%s: reused (%s)\n' "$tag" "$(image_size "$tag")"
        continue
    fi
    old=$(image_id "$tag")
    printf '%s: building...\n' "$tag" >&2
    start=$SECONDS
    "build_$name"
    drop_replaced "$old" "$tag"
    printf '%s: built in %ss (%s)\n' "$tag" "$((SECONDS - start))" "$(image_size "$tag")"
done
