//! uniffi exports of the WebWaka Realtime client for Swift (module `WebWakaRealtime`)
//! and Kotlin (package `com.webwaka.realtime`).
//!
//! What crosses (the generated bindings are in `bindings/`, see `docs/bindings.md`):
//!
//! | Rust | Kotlin / Swift | what |
//! |---|---|---|
//! | [`RealtimeClient`] | class | the client: async methods mirroring core's `Client` |
//! | [`TokenProvider`] | interface / protocol (app implements, async) | bearer tokens |
//! | [`ClientListener`] | interface / protocol (app implements) | updates, current state first |
//! | [`SubscriptionHandle`] | class | keeps a listener subscribed; cancel or drop it |
//! | [`Logger`], [`set_logger`], [`set_log_level`] | interface, functions | the SDK's log |
//! | [`RealtimeError`] | `RealtimeException` / `RealtimeError` | what went wrong, what to do |
//! | records and enums in [`types`], [`ClientOptions`] | data classes / structs, enums | values |
//!
//! Rules this layer keeps:
//! - every call runs on the SDK's own tokio runtime ([`runtime`]);
//! - the app's code (listener, logger, token provider) is never called while a lock of
//!   this crate is held, listeners and the logger only from threads of their own;
//! - error texts and log records carry no tokens or payloads.

uniffi::setup_scaffolding!();

mod client;
mod diagnostics;
mod error;
mod logging;
mod options;
mod runtime;
mod subscription;
mod token;
pub mod types;

#[cfg(test)]
mod tests;

pub use client::RealtimeClient;
pub use diagnostics::{LiveObjects, live_objects, ping};
pub use error::{CallbackError, RealtimeError};
pub use logging::{LogLevel, LogRecord, Logger, set_log_level, set_logger};
pub use options::{ClientOptions, Durability};
pub use subscription::{ClientListener, SubscriptionHandle};
pub use token::{TokenProvider, TokenRequest};

/// The version of the SDK this library was built from.
#[uniffi::export]
pub fn sdk_version() -> String {
    env!("CARGO_PKG_VERSION").to_owned()
}
