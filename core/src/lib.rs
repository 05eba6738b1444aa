//! # WebWaka Realtime
//!
//! An offline-first realtime SDK. Losing realtime degrades the experience, never
//! correctness (INV-010): nothing a user did is lost, offline, when the app is killed
//! mid-send, or when the server restarts.
//!
//! The crate is layered so that its pure parts stand alone:
//!
//! - [`protocol`]: every type that crosses the wire between SDK and server (v1).
//! - [`clock`]: vector clocks that order edits across replicas.
//! - [`reconcile`]: the reconciliation engine, pure (time is an input), shared by the
//!   SDK and the server.
//!
//! - `client` (feature `client`): the async [`client::Client`] an app uses.
//! - `machine` (feature `client`): the connection state machine, sans-IO.
//! - `store` (feature `store`): the SQLite offline store.
//!
//! The first three build with `default-features = false` (no tokio, reqwest or rusqlite).
//! The offline store and the async client sit behind the default `client` feature.

#[cfg(feature = "client")]
pub mod client;
pub mod clock;
#[cfg(feature = "client")]
pub mod machine;
pub mod protocol;
pub mod reconcile;
#[cfg(feature = "store")]
pub mod store;

pub use clock::{ClockOrdering, VectorClock};
