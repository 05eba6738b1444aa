//! End-to-end tests of the SDK and server together, and the benchmark suite.
//!
//! - `tests/`: end-to-end tests (`cargo nextest run -p webwaka-e2e`).
//! - [`bench`]: the benchmarks behind every figure the project publishes, run with one
//!   command: `cargo run --release -p webwaka-e2e --bin bench` (see docs/benchmarks.md).

pub mod bench;
pub mod cluster;
pub mod harness;
pub mod proxy;
pub mod tls;
