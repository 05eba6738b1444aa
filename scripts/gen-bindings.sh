#!/usr/bin/env bash
# gen-bindings.sh - regenerate the Kotlin and Swift bindings in bindings/ from the built
# library (uniffi "library mode": the API is read from libwebwaka_realtime_ffi.so
# itself, so the bindings always match the code that was compiled).
#
# Usage:
#   scripts/gen-bindings.sh            build the library, regenerate, write bindings/
#   scripts/gen-bindings.sh --check    build, regenerate into a temporary folder and fail
#                                      (exit 1, with the diff) when bindings/ is stale
#
# Output (both modes): the generated files go to
#   bindings/kotlin/src/main/kotlin/com/webwaka/realtime/webwaka_realtime_ffi.kt
#   bindings/swift/Sources/WebWakaRealtime/WebWakaRealtime.swift
#   bindings/swift/Sources/WebWakaRealtimeFFI/{WebWakaRealtimeFFI.h,module.modulemap}
# Everything else in bindings/ (tests, Package.swift, scripts) is hand-written.
#
# Settings (environment): CARGO_TARGET_DIR is honoured (via cargo metadata).
set -euo pipefail
cd "$(dirname "$0")/.."

check=false
case "${1:-}" in
    "") ;;
    --check) check=true ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

die() { echo "gen-bindings: error: $*" >&2; exit 1; }

target_dir="$(cargo metadata --format-version 1 --no-deps --locked \
    | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)" \
    || die "cargo metadata failed"
[ -n "$target_dir" ] || die "cargo metadata gave no target directory"
lib="$target_dir/debug/libwebwaka_realtime_ffi.so"

# The library and the generator, in one cargo invocation (the generator is this crate's
# bin, so its uniffi version is the library's).
cargo build --quiet --locked -p webwaka-realtime-ffi --lib --bin uniffi-bindgen \
    || die "cargo build failed"
[ -f "$lib" ] || die "no library at $lib after the build"
bindgen="$target_dir/debug/uniffi-bindgen"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/gen-bindings.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

for language in kotlin swift; do
    # --no-format: no ktlint/swift-format here; the output is deterministic as is.
    "$bindgen" generate --no-format --library "$lib" --language "$language" \
        --out-dir "$tmp/raw-$language" >"$tmp/bindgen-$language.log" 2>&1 \
        || { cat "$tmp/bindgen-$language.log" >&2; die "uniffi-bindgen ($language) failed"; }
done

# Lay the files out as the Kotlin sources and the Swift package expect them.
out="$tmp/bindings"
kt_dir="$out/kotlin/src/main/kotlin/com/webwaka/realtime"
swift_dir="$out/swift/Sources/WebWakaRealtime"
ffi_dir="$out/swift/Sources/WebWakaRealtimeFFI"
mkdir -p "$kt_dir" "$swift_dir" "$ffi_dir"
cp "$tmp/raw-kotlin/com/webwaka/realtime/webwaka_realtime_ffi.kt" "$kt_dir/" \
    || die "uniffi-bindgen wrote no Kotlin file where expected"
cp "$tmp/raw-swift/WebWakaRealtime.swift" "$swift_dir/" \
    || die "uniffi-bindgen wrote no Swift file where expected"
cp "$tmp/raw-swift/WebWakaRealtimeFFI.h" "$ffi_dir/" || die "no FFI header generated"
# SwiftPM wants the module map of a system library target named module.modulemap.
cp "$tmp/raw-swift/WebWakaRealtimeFFI.modulemap" "$ffi_dir/module.modulemap" \
    || die "no module map generated"

generated=(
    "kotlin/src/main/kotlin/com/webwaka/realtime/webwaka_realtime_ffi.kt"
    "swift/Sources/WebWakaRealtime/WebWakaRealtime.swift"
    "swift/Sources/WebWakaRealtimeFFI/WebWakaRealtimeFFI.h"
    "swift/Sources/WebWakaRealtimeFFI/module.modulemap"
)

if $check; then
    stale=()
    for f in "${generated[@]}"; do
        if ! cmp -s "$out/$f" "bindings/$f"; then
            stale+=("$f")
            diff -u "bindings/$f" "$out/$f" 2>&1 | head -n 40 >&2 || true
        fi
    done
    if [ "${#stale[@]}" -gt 0 ]; then
        echo "gen-bindings: the committed bindings are stale: ${stale[*]}" >&2
        echo "gen-bindings: run scripts/gen-bindings.sh and commit bindings/" >&2
        exit 1
    fi
    echo "bindings are up to date (${#generated[@]} generated files)"
else
    for f in "${generated[@]}"; do
        mkdir -p "bindings/$(dirname "$f")"
        cp "$out/$f" "bindings/$f"
    done
    echo "regenerated ${#generated[@]} files in bindings/"
fi
