#!/usr/bin/env bash
# swift-chroot.sh - run a command with the Swift toolchain that install-swift.sh
# installed in a Debian trixie chroot (e.g. `swift test` in bindings/swift/).
#
# Usage: swift-chroot.sh [-b DIR]... [-e NAME=VALUE]... [--] COMMAND [ARG...]
#
#   The current folder and every -b DIR are bind-mounted into the chroot at the
#   SAME absolute path, and COMMAND runs in the current folder, so relative and
#   absolute paths (-L target/debug, .build/, the Rust .so) mean the same inside.
#   Mounts (and /proc) live in a private mount namespace: they vanish when
#   COMMAND ends, nothing is left mounted, parallel runs do not interfere.
#   COMMAND gets a clean environment (PATH, HOME=/root, LANG=C.UTF-8, TERM, CI)
#   plus each -e NAME=VALUE, e.g. -e LD_LIBRARY_PATH="$PWD/target/debug".
#   The exit status is COMMAND's.
#
# Settings (environment): SWIFT_CHROOT (default /opt/trixie-swift)
set -euo pipefail

ROOT="${SWIFT_CHROOT:-/opt/trixie-swift}"
ROOT="${ROOT%/}"

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "swift-chroot: error: $*" >&2; exit 2; }

binds=()
envs=()
while [ $# -gt 0 ]; do
    case "$1" in
        -b | --bind)
            [ $# -ge 2 ] || die "$1 needs a folder"
            binds+=("$2"); shift 2 ;;
        -e | --env)
            [ $# -ge 2 ] || die "$1 needs NAME=VALUE"
            case "$2" in [A-Za-z_]*=*) ;; *) die "bad $1 '$2' (want NAME=VALUE)" ;; esac
            envs+=("$2"); shift 2 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
[ $# -gt 0 ] || die "no command given (try: swift-chroot.sh swiftc --version)"
[ "$(id -u)" -eq 0 ] || die "must run as root (chroot and mount need it)"
[ -x "$ROOT/usr/bin/swiftc" ] || die "no Swift toolchain in $ROOT; run scripts/install-swift.sh first"
command -v unshare >/dev/null 2>&1 || die "unshare (util-linux) not found"

cwd="$(pwd -P)"
resolved=()
for d in "$cwd" ${binds[@]+"${binds[@]}"}; do
    [ -d "$d" ] || die "not a folder: $d"
    r="$(cd "$d" && pwd -P)"
    [ "$r" != / ] || die "refusing to bind-mount /"
    case "$ROOT/" in "$r"/*) die "refusing to bind-mount $r: it contains the chroot $ROOT" ;; esac
    case "$r/" in "$ROOT"/*) die "$r is inside the chroot; run from (and bind) folders outside $ROOT" ;; esac
    resolved+=("$r")
done
# parents before children, duplicates dropped, so no mount hides another
mapfile -t sorted < <(printf '%s\n' "${resolved[@]}" | awk '{ print length($0) "\t" $0 }' | sort -n -u | cut -f2-)

inner='
set -e
root=$1; cwd=$2; nb=$3; shift 3
mount -t proc proc "$root/proc"
i=0
while [ "$i" -lt "$nb" ]; do
    mkdir -p "$root$1"
    mount --bind "$1" "$root$1"
    shift; i=$((i + 1))
done
ne=$1; shift
envs=()
i=0
while [ "$i" -lt "$ne" ]; do envs+=("$1"); shift; i=$((i + 1)); done
exec chroot "$root" /usr/bin/env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 ${TERM:+TERM=$TERM} ${CI:+CI=$CI} ${envs[@]+"${envs[@]}"} \
    /bin/sh -c '\''cd "$1" && shift && exec "$@"'\'' sh "$cwd" "$@"
'
exec unshare --mount --propagation private -- bash -c "$inner" bash \
    "$ROOT" "$cwd" "${#sorted[@]}" "${sorted[@]}" "${#envs[@]}" ${envs[@]+"${envs[@]}"} "$@"
