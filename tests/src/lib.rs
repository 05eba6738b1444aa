//! End-to-end tests of the SDK and server together, and the benchmark suite
//! (`cargo run --release -p webwaka-e2e --bin bench`).
