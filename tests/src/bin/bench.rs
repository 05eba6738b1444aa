//! `bench`: runs the project's benchmarks and prints one table.
//!
//! `cargo run --release -p webwaka-e2e --bin bench [NAME…]` runs the named groups
//! (all when none is named). Groups: `reconcile`.

use std::process::ExitCode;

use webwaka_e2e::bench::{self, Row};

const GROUPS: &[&str] = &["reconcile"];

fn main() -> ExitCode {
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
    if run("reconcile") {
        rows.extend(bench::reconcile::run());
    }
    println!();
    bench::print_table(&rows);
    ExitCode::SUCCESS
}
