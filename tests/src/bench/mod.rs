//! The benchmark suite: each benchmark measures one figure and says how.
//!
//! Every benchmark returns [`Row`]s; the `bench` binary prints them as one table with
//! the median of several runs and the method, so a figure is never quoted without the
//! way it was obtained.

pub mod alloc;
pub mod client;
pub mod postgres;
pub mod reconcile;
pub mod server;
pub mod socketio;
pub mod store;
pub mod wakeups;

use std::time::Duration;

/// One line of the results table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured.
    pub name: String,
    /// The median figure, formatted with its unit.
    pub figure: String,
    /// How it was measured (workload, repetitions, what the clock spans).
    pub method: String,
}

/// The median of `samples` (which must not be empty; an empty slice gives zero).
pub fn median(samples: &mut [f64]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

/// The `p` quantile (0..=1) of `sorted` samples, nearest rank; zero when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `v` sorted ascending (for [`percentile`]).
pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// Whether `part` of a group is to run: the environment variable `var` (e.g.
/// `WEBWAKA_BENCH_STORE=single,take`) names the parts; unset or empty, all run.
pub fn wanted(var: &str, part: &str) -> bool {
    match std::env::var(var) {
        Ok(parts) if !parts.trim().is_empty() => parts.split(',').any(|p| p.trim() == part),
        _ => true,
    }
}

/// Operations per second for `count` operations taking `elapsed`.
pub fn per_second(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Formats a rate with thousands separators, e.g. `1,234,567/s`.
pub fn fmt_rate(rate: f64) -> String {
    let n = rate.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    format!("{out}/s")
}

/// Prints rows as a Markdown table.
pub fn print_table(rows: &[Row]) {
    println!("| benchmark | median | method |");
    println!("|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} |", r.name, r.figure, r.method);
    }
}
