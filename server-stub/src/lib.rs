//! The local WebWaka Realtime server (axum) that the SDK talks to.
//!
//! Not built yet: it uses `webwaka-realtime` without default features, i.e. only the
//! wire protocol, vector clocks and the reconciliation engine.

pub use webwaka_realtime::protocol;
