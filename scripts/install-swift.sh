#!/usr/bin/env bash
# install-swift.sh - provide a Linux Swift toolchain on a Debian 12 (bookworm) host,
# for compiling and running the uniffi-generated Swift bindings in bindings/swift/
# and their XCTest tests (`swift test`). Used by scripts/test-bindings.sh.
#
# Bookworm has no Swift package; Debian 13 (trixie) has "swiftlang" (Swift 6.0.x).
# This script debootstraps a minimal trixie into $SWIFT_CHROOT and installs
# swiftlang + libc6-dev inside it (about 45 s and 2.5 GB, once). Run Swift commands
# there with scripts/swift-chroot.sh, which bind-mounts the project at the same path.
#
# Usage (as root; safe to run any number of times):
#   eval "$(scripts/install-swift.sh)"     # or: ... >/dev/null && . /opt/trixie-swift.env
#
# On success stdout carries only "export NAME=value" lines (also written to
# $SWIFT_CHROOT.env); all install output goes to a log that is shown on failure.
#
# Settings (environment):
#   SWIFT_CHROOT   chroot folder                     (default /opt/trixie-swift)
#   SWIFT_SUITE    Debian suite to bootstrap         (default trixie)
#   DEBIAN_MIRROR  Debian archive URL                (default: the host's apt source, else http://deb.debian.org/debian)
#   SWIFT_PACKAGES packages installed in the chroot  (default "swiftlang libc6-dev")
set -euo pipefail

SWIFT_CHROOT="${SWIFT_CHROOT:-/opt/trixie-swift}"
SWIFT_CHROOT="${SWIFT_CHROOT%/}"
SWIFT_SUITE="${SWIFT_SUITE:-trixie}"
SWIFT_PACKAGES="${SWIFT_PACKAGES:-swiftlang libc6-dev}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUNNER="$HERE/swift-chroot.sh"
ENV_FILE="$SWIFT_CHROOT.env"
BOOT_STAMP="$SWIFT_CHROOT/.setup-swift-bootstrapped"
DONE_STAMP="$SWIFT_CHROOT/.setup-swift-done"
WANT_STAMP="suite=$SWIFT_SUITE packages=$SWIFT_PACKAGES"

LOG="$(mktemp "${TMPDIR:-/tmp}/install-swift.XXXXXX")"
trap 'rm -f "$LOG"' EXIT

die() {
    echo "install-swift: error: $*" >&2
    if [ -s "$LOG" ]; then
        echo "install-swift: ---- last 40 lines of the install log ----" >&2
        tail -n 40 "$LOG" >&2
    fi
    exit 1
}

quiet() { "$@" >>"$LOG" 2>&1 || die "command failed: $*"; }

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# Is anything mounted at or below the chroot (e.g. a swift-chroot.sh run that is
# still going, or a leftover manual mount)? Deleting the chroot then would follow
# bind mounts into real project folders, so we refuse.
mounts_below_chroot() { awk -v r="$SWIFT_CHROOT" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/mounts; }

host_mirror() {
    local url=""
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
        url="$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }' \
            /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)"
    fi
    if [ -z "$url" ] && [ -f /etc/apt/sources.list ]; then
        url="$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\/.*\/debian\/?$/) { print $i; exit } }' \
            /etc/apt/sources.list | head -n1)"
    fi
    echo "${url:-http://deb.debian.org/debian}"
}

print_env() {
    local ver
    ver="$(cat "$DONE_STAMP.version" 2>/dev/null || true)"
    env_text="$(cat <<EOF
export SWIFT_CHROOT="$SWIFT_CHROOT"
export SWIFT_VERSION="$ver"
export SWIFT_RUN="$RUNNER"
EOF
)"
    printf '%s\n' "$env_text" >"$ENV_FILE.tmp" && mv -f "$ENV_FILE.tmp" "$ENV_FILE" || die "cannot write $ENV_FILE"
    printf '%s\n' "$env_text"
}

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot and mount need it)"
command -v dpkg-query >/dev/null 2>&1 || die "this script expects a Debian host (dpkg/apt)"
[ -f "$RUNNER" ] || die "missing $RUNNER (keep swift-chroot.sh next to this script)"

# Fast path: already set up with the same settings.
if [ -f "$DONE_STAMP" ] && [ "$(cat "$DONE_STAMP")" = "$WANT_STAMP" ] \
    && [ -x "$SWIFT_CHROOT/usr/bin/swiftc" ]; then
    print_env
    exit 0
fi

# 1. debootstrap on the host.
if ! command -v debootstrap >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends debootstrap >>"$LOG" 2>&1; then
        quiet apt-get update -q
        quiet apt-get install -y -q --no-install-recommends debootstrap
    fi
fi
[ -f "/usr/share/debootstrap/scripts/$SWIFT_SUITE" ] \
    || die "this debootstrap does not know suite '$SWIFT_SUITE' (/usr/share/debootstrap/scripts/$SWIFT_SUITE missing)"

# 2. Minimal Debian root (once).
if [ ! -f "$BOOT_STAMP" ]; then
    if [ -e "$SWIFT_CHROOT" ]; then
        busy="$(mounts_below_chroot)"
        [ -z "$busy" ] || die "$SWIFT_CHROOT has mounts below it, not removing a half-made chroot: $busy"
        rm -rf --one-file-system "$SWIFT_CHROOT" || die "cannot remove half-made $SWIFT_CHROOT"
    fi
    mkdir -p "$(dirname "$SWIFT_CHROOT")"
    mirror="$(host_mirror)"
    echo "debootstrap --variant=minbase $SWIFT_SUITE $SWIFT_CHROOT $mirror" >>"$LOG"
    quiet debootstrap --variant=minbase "$SWIFT_SUITE" "$SWIFT_CHROOT" "$mirror"
    touch "$BOOT_STAMP"
fi

# 3. Swift packages inside the chroot, in a private mount namespace so that the
#    /proc mount disappears by itself when we are done.
cp -fL /etc/resolv.conf "$SWIFT_CHROOT/etc/resolv.conf" 2>/dev/null || true
rm -f "$DONE_STAMP"
cat >"$SWIFT_CHROOT/tmp/setup-swift-inner.sh" <<EOF
set -e
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
apt-get update -q
apt-get install -y -q --no-install-recommends $SWIFT_PACKAGES
apt-get clean
rm -rf /var/lib/apt/lists/*
cd /tmp
printf 'print("swift ok")\n' >setup-swift-check.swift
swiftc setup-swift-check.swift -o setup-swift-check
./setup-swift-check
rm -f setup-swift-check setup-swift-check.swift
swiftc --version 2>&1 | sed -n 's/.*Swift version \([^ ]*\).*/\1/p' >/setup-swift-version
EOF
quiet unshare --mount --propagation private sh -c \
    'mount -t proc proc "$1/proc" && exec chroot "$1" /bin/sh /tmp/setup-swift-inner.sh' sh "$SWIFT_CHROOT"
rm -f "$SWIFT_CHROOT/tmp/setup-swift-inner.sh"
mv -f "$SWIFT_CHROOT/setup-swift-version" "$DONE_STAMP.version" || die "Swift check inside the chroot left no version file"
[ -s "$DONE_STAMP.version" ] || die "could not read the Swift version inside the chroot"
printf '%s' "$WANT_STAMP" >"$DONE_STAMP"
print_env
