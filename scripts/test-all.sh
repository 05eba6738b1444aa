#!/usr/bin/env bash
# Runs every test of the project from a fresh checkout: formatting, lints, the Rust
# test suites of every crate (unit, property, end-to-end, fault injection and crash
# tests), doc tests, the Swift and Kotlin bindings' tests, and the no-default-features
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

# Last, so that the closing summary line is the test runner's.
step "tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
else
    echo "(cargo-nextest not found: using cargo test)"
    cargo test --workspace --locked --no-fail-fast --lib --bins --tests
fi
