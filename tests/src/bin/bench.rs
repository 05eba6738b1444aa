//! `bench`: runs the project's benchmarks and prints one table.
//!
//! `cargo run --release -p webwaka-e2e --bin bench [NAME…]` runs the named groups
//! (all when none is named). Groups: `reconcile`, `store`, `client`, `server`, `size`,
//! `socketio` (needs node and `scripts/install-node-deps.sh`), `wakeups` (over two
//! minutes: the client process's context switches idle and offline).

use std::process::ExitCode;

use webwaka_e2e::bench::{self, Row};

/// Counts allocations for the groups that report them (see `bench::alloc`).
#[global_allocator]
static ALLOCATOR: bench::alloc::Counting = bench::alloc::Counting;

const GROUPS: &[&str] = &[
    "reconcile",
    "store",
    "client",
    "server",
    "size",
    "socketio",
    "wakeups",
];

fn main() -> ExitCode {
    bench::alloc::installed();
    // The server benchmarks run the server and the raw relay as child processes.
    if let Ok(kind) = std::env::var(bench::server::CHILD_ENV)
        && (kind == bench::server::CHILD_SERVER || kind == bench::server::CHILD_RELAY)
    {
        return match bench::server::child(&kind) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench: {kind} child: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    if let Some(bad) = wanted.iter().find(|w| !GROUPS.contains(&w.as_str())) {
        eprintln!(
            "bench: unknown group {bad:?}; groups: {}",
            GROUPS.join(", ")
        );
        return ExitCode::from(2);
    }
    if cfg!(debug_assertions) {
        eprintln!("bench: warning: a debug build; run with --release for real figures");
    }
    let run = |g: &str| wanted.is_empty() || wanted.iter().any(|w| w == g);
    let mut rows: Vec<Row> = Vec::new();
    let mut failed = false;
    if run("reconcile") {
        rows.extend(bench::reconcile::run());
    }
    if run("store") {
        match bench::store::run() {
            Ok(store_rows) => rows.extend(store_rows),
            Err(e) => {
                eprintln!("bench: store: {e}");
                failed = true;
            }
        }
    }
    if run("client") {
        match bench::client::run() {
            Ok(client_rows) => rows.extend(client_rows),
            Err(e) => {
                eprintln!("bench: client: {e}");
                failed = true;
            }
        }
    }
    if run("server") {
        match bench::server::run() {
            Ok(server_rows) => rows.extend(server_rows),
            Err(e) => {
                eprintln!("bench: server: {e}");
                failed = true;
            }
        }
    }
    if run("socketio") {
        match bench::socketio::run() {
            Ok(socketio_rows) => rows.extend(socketio_rows),
            Err(e) => {
                eprintln!("bench: socketio: {e}");
                failed = true;
            }
        }
    }
    if run("wakeups") {
        match bench::wakeups::run() {
            Ok(wakeup_rows) => rows.extend(wakeup_rows),
            Err(e) => {
                eprintln!("bench: wakeups: {e}");
                failed = true;
            }
        }
    }
    if run("size") {
        match bench::client::library_size() {
            Ok(size_rows) => rows.extend(size_rows),
            Err(e) => {
                eprintln!("bench: size: {e}");
                failed = true;
            }
        }
    }
    println!();
    bench::print_table(&rows);
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
