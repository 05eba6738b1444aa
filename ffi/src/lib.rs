//! uniffi exports of the WebWaka Realtime client for Swift (module `WebWakaRealtime`)
//! and Kotlin (package `com.webwaka.realtime`).
//!
//! Not built yet: the FFI surface follows the async client. Until then this crate only
//! re-exports the core crate's version so that the workspace layout is complete.

/// The version of the SDK this library was built from.
pub fn sdk_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
