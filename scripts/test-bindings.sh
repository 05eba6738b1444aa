#!/usr/bin/env bash
# test-bindings.sh - test the Kotlin and Swift bindings against the built library and a
# real server, from a fresh checkout:
#
#   1. install the toolchains when absent (scripts/install-kotlin.sh, install-swift.sh);
#   2. build libwebwaka_realtime_ffi.so and check that the committed bindings match it
#      (scripts/gen-bindings.sh --check), build the server binary;
#   3. Kotlin: compile bindings/kotlin (generated code + tests) with kotlinc, run the
#      tests on the JVM;
#   4. Swift: `swift test` in bindings/swift (XCTest), inside the Swift chroot.
#
# Usage: scripts/test-bindings.sh [kotlin] [swift]      (default: both)
#
# The last line is `N passed, M failed` over both languages; the exit status is
# non-zero when anything failed. Runs as root (apt, chroot). Every server a test
# starts is stopped, also when a test run crashes (the runs record their servers'
# PIDs). Each test run is bounded to 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

langs=("$@")
[ "${#langs[@]}" -gt 0 ] || langs=(kotlin swift)
for l in "${langs[@]}"; do
    case "$l" in kotlin | swift) ;; *) echo "usage: $0 [kotlin] [swift]" >&2; exit 2 ;; esac
done
started=$SECONDS
wants() { case " ${langs[*]} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

step() { printf '\n==> %s  (at %d s)\n' "$*" "$((SECONDS - started))"; }
die() { echo "test-bindings: error: $*" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/test-bindings.XXXXXX")"
pids="$work/server-pids"
: >"$pids"
# Stop any server a test run left behind (only our PIDs, only if still that binary).
cleanup() {
    local pid
    while read -r pid; do
        [ -n "$pid" ] || continue
        if grep -q webwaka-server-stub "/proc/$pid/cmdline" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            sleep 1
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done <"$pids"
    rm -rf "$work"
}
trap cleanup EXIT

step "toolchains"
if wants kotlin; then eval "$(scripts/install-kotlin.sh)"; echo "kotlinc $(tr -d '[:space:]' <"$KOTLIN_HOME/build.txt"), JNA $JNA_JAR"; fi
if wants swift; then eval "$(scripts/install-swift.sh)"; echo "Swift $SWIFT_VERSION in $SWIFT_CHROOT"; fi

step "library, bindings freshness, server"
scripts/gen-bindings.sh --check
cargo build --quiet --locked -p webwaka-server-stub --bin webwaka-server-stub
target_dir="$(cargo metadata --format-version 1 --no-deps --locked \
    | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)"
lib_dir="$target_dir/debug"
server_bin="$lib_dir/webwaka-server-stub"
[ -f "$lib_dir/libwebwaka_realtime_ffi.so" ] && [ -x "$server_bin" ] || die "build outputs missing in $lib_dir"

total_passed=0
total_failed=0
summary=()

# record LANG LOG: reads the runner's `N passed, M failed` line from LOG.
record() {
    local lang="$1" log="$2" line p f
    line="$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -n 1 || true)"
    if [ -z "$line" ]; then
        p=0 f=1
        summary+=("$lang: no result line (the run crashed or timed out)")
    else
        p="${line%% passed*}"
        f="${line#*, }"; f="${f%% failed*}"
        summary+=("$lang: $line")
    fi
    total_passed=$((total_passed + p))
    total_failed=$((total_failed + f))
}

if wants kotlin; then
    step "Kotlin: compile"
    kt="$root/bindings/kotlin"
    build="$kt/build"
    mkdir -p "$build"
    # kotlinc is a JVM program run once: C1-only JIT and the serial GC halve its time.
    kotlinc_flags=(-J-XX:TieredStopAtLevel=1 -J-XX:+UseSerialGC -nowarn)
    kotlinc_version="$(tr -d '[:space:]' <"$KOTLIN_HOME/build.txt")"
    generated="$kt/src/main/kotlin/com/webwaka/realtime/webwaka_realtime_ffi.kt"
    mapfile -t test_sources < <(find "$kt/src/test/kotlin" -name '*.kt' | sort)
    # The generated file is large (about 30 s to compile on 2 cores): compiled once
    # into bindings.jar and reused until it or the compiler changes.
    stamp="$(cat "$generated" | sha256sum | cut -d' ' -f1) $kotlinc_version"
    if [ ! -f "$build/bindings.jar" ] || [ "$(cat "$build/bindings.stamp" 2>/dev/null)" != "$stamp" ]; then
        rm -f "$build/bindings.jar" "$build/bindings.stamp"
        "$KOTLINC" "${kotlinc_flags[@]}" "$generated" -cp "$UNIFFI_KOTLIN_CLASSPATH" -d "$build/bindings.jar" \
            >"$work/kotlinc-bindings.log" 2>&1 || { cat "$work/kotlinc-bindings.log" >&2; die "kotlinc failed (bindings)"; }
        printf '%s' "$stamp" >"$build/bindings.stamp"
        echo "compiled the generated bindings"
    else
        echo "generated bindings unchanged: reusing bindings.jar"
    fi
    tests_stamp="$(cat "${test_sources[@]}" | sha256sum | cut -d' ' -f1) $stamp"
    if [ ! -f "$build/tests.jar" ] || [ "$(cat "$build/tests.stamp" 2>/dev/null)" != "$tests_stamp" ]; then
        rm -f "$build/tests.jar" "$build/tests.stamp"
        "$KOTLINC" "${kotlinc_flags[@]}" "${test_sources[@]}" -cp "$build/bindings.jar:$UNIFFI_KOTLIN_CLASSPATH" \
            -d "$build/tests.jar" >"$work/kotlinc-tests.log" 2>&1 \
            || { cat "$work/kotlinc-tests.log" >&2; die "kotlinc failed (tests)"; }
        printf '%s' "$tests_stamp" >"$build/tests.stamp"
        echo "compiled the tests"
    else
        echo "tests unchanged: reusing tests.jar"
    fi

    step "Kotlin: tests (JVM, real server)"
    set +e
    timeout --kill-after=10 600 java \
        -Dwebwaka.server="$server_bin" \
        -Dwebwaka.pidFile="$pids" \
        -Djna.library.path="$lib_dir" \
        -cp "$build/tests.jar:$build/bindings.jar:$UNIFFI_KOTLIN_RUN_CLASSPATH" \
        com.webwaka.realtime.test.TestsKt 2>&1 | tee "$work/kotlin.log"
    set -e
    record kotlin "$work/kotlin.log"
fi

if wants swift; then
    step "Swift: build (SwiftPM, chroot)"
    binds=()
    case "$target_dir/" in "$root"/*) ;; *) binds=(-b "$target_dir") ;; esac
    run_swift() { "$SWIFT_RUN" ${binds[@]+"${binds[@]}"} "$@"; }
    run_swift swift build --package-path bindings/swift --build-tests -Xlinker "-L$lib_dir" \
        >"$work/swift-build.log" 2>&1 || { cat "$work/swift-build.log" >&2; die "swift build failed"; }
    tail -n 1 "$work/swift-build.log"

    step "Swift: tests (XCTest, real server)"
    set +e
    # The chroot has its own /tmp: the PID file lives in the project's build folder.
    swift_pids="$root/bindings/swift/.build/server-pids"
    : >"$swift_pids"
    timeout --kill-after=10 600 "$SWIFT_RUN" ${binds[@]+"${binds[@]}"} \
        -e LD_LIBRARY_PATH="$lib_dir" \
        -e WEBWAKA_SERVER="$server_bin" \
        -e WEBWAKA_PID_FILE="$swift_pids" \
        swift test --package-path bindings/swift --skip-build --disable-swift-testing \
        2>&1 | tee "$work/swift.log"
    set -e
    cat "$swift_pids" >>"$pids"
    # XCTest's own summary is `Executed N tests, with M failures`: turn it into the
    # common closing line.
    executed="$(grep -E 'Executed [0-9]+ tests?, with [0-9]+ failures?' "$work/swift.log" | tail -n 1 || true)"
    if [ -n "$executed" ]; then
        n="$(sed -E 's/.*Executed ([0-9]+) tests?.*/\1/' <<<"$executed")"
        m="$(sed -E 's/.*with ([0-9]+) failures?.*/\1/' <<<"$executed")"
        echo "$((n - m)) passed, $m failed" >>"$work/swift.log"
    fi
    record swift "$work/swift.log"
fi

step "summary ($((SECONDS - started)) s)"
printf '%s\n' "${summary[@]}"
echo "$total_passed passed, $total_failed failed"
[ "$total_failed" -eq 0 ]
