#!/usr/bin/env bash
# Runs every test of the project from a fresh checkout: formatting, lints, the Rust
# test suites of every crate (unit, property, end-to-end, fault injection and crash
# tests), doc tests, the Swift and Kotlin bindings' tests, the socket.io suite (node
# --test, with npm's socket.io-client), and the no-default-features
# build of the protocol crate. It installs nothing by hand: every toolchain a test needs is set up
# by the project's own scripts. One cargo target dir, one build.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "protocol, clocks and reconciliation build alone (no tokio, reqwest, rusqlite)"
cargo build -p webwaka-realtime --no-default-features --locked

step "doc tests"
cargo test --workspace --locked --doc

# The Swift and Kotlin bindings, compiled and run against the real library and a real
# server. The first run installs kotlinc + JNA and a Swift chroot (scripts/install-*.sh).
step "Swift and Kotlin bindings"
./scripts/test-bindings.sh

# A throw-away PostgreSQL cluster for this run (installed first if missing), stopped
# on exit: the server's tests run on both engines.
step "PostgreSQL cluster for the tests"
pg_dir=$(mktemp -d /tmp/webwaka-pg.XXXXXX)
trap './scripts/pg-cluster.sh stop "$pg_dir" immediate || true; rm -rf "$pg_dir"' EXIT
WEBWAKA_TEST_PG_URL=$(./scripts/pg-cluster.sh start "$pg_dir")
export WEBWAKA_TEST_PG_URL
echo "$WEBWAKA_TEST_PG_URL"

run_tests() {
    if cargo nextest --version >/dev/null 2>&1; then
        cargo nextest run --locked --no-fail-fast "$@"
    else
        echo "(cargo-nextest not found: using cargo test)"
        cargo test --locked --no-fail-fast "$@"
    fi
}

# The server's integration tests, and the end-to-end tests of SDK and server, again
# with every server on PostgreSQL (a database of its own per test). The multi-instance
# tests (always PostgreSQL) run with the rest below.
step "tests on PostgreSQL"
WEBWAKA_TEST_DATABASE=postgres run_tests -p webwaka-server-stub --test it \
    -p webwaka-e2e --test client_e2e --test client_faults

# socket.io clients (npm socket.io-client, installed from the lockfile) against the
# real server binary: the original README's example and the socket.io suite, with the
# Rust SDK (sdk_peer) on the other end of some tests.
step "socket.io tests (node --test)"
./scripts/install-node-deps.sh
cargo build --locked -p webwaka-server-stub --bin webwaka-server-stub -p webwaka-e2e --bin sdk_peer
(cd tests/socketio && node --test --test-concurrency=1)

# The dashboard's browser tests (tests/tests/dashboard.rs) drive Debian's chromium
# through chromedriver: installed here when missing; without them those tests fail.
step "chromium and chromedriver for the dashboard's browser tests"
./scripts/install-chromium.sh

# Last, so that the closing summary line is the test runner's.
step "tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
else
    echo "(cargo-nextest not found: using cargo test)"
    cargo test --workspace --locked --no-fail-fast --lib --bins --tests
fi
