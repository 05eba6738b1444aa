//! Counts of the SDK's live objects and threads, for leak tests and the app's
//! diagnostics: every client, subscription handle, pump task and listener thread
//! holds a [`Live`] guard while it exists.

use std::sync::atomic::{AtomicU64, Ordering};

/// Clients not yet freed.
pub(crate) static CLIENTS: AtomicU64 = AtomicU64::new(0);
/// Subscription handles not yet freed.
pub(crate) static SUBSCRIPTIONS: AtomicU64 = AtomicU64::new(0);
/// Subscription pump tasks still running.
pub(crate) static PUMPS: AtomicU64 = AtomicU64::new(0);
/// Listener delivery threads still running.
pub(crate) static LISTENER_THREADS: AtomicU64 = AtomicU64::new(0);

/// Counts one live object in `counter` until dropped.
#[derive(Debug)]
pub(crate) struct Live(&'static AtomicU64);

impl Live {
    /// Counts one more.
    pub(crate) fn new(counter: &'static AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Live(counter)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How many of the SDK's objects are alive now. After the app released every client
/// and subscription, all four drop back to zero (the threads and tasks within a
/// moment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Record)]
pub struct LiveObjects {
    /// Clients not yet freed.
    pub clients: u64,
    /// Subscription handles not yet freed.
    pub subscriptions: u64,
    /// Subscription pump tasks still running.
    pub pumps: u64,
    /// Listener delivery threads still running.
    pub listener_threads: u64,
}

/// The counts now.
#[uniffi::export]
pub fn live_objects() -> LiveObjects {
    LiveObjects {
        clients: CLIENTS.load(Ordering::Acquire),
        subscriptions: SUBSCRIPTIONS.load(Ordering::Acquire),
        pumps: PUMPS.load(Ordering::Acquire),
        listener_threads: LISTENER_THREADS.load(Ordering::Acquire),
    }
}

/// Returns `value` at once: an async call that does nothing, for measuring the cost of
/// one FFI round trip from Kotlin or Swift (`docs/bindings.md` has the figures).
#[uniffi::export]
pub async fn ping(value: u64) -> u64 {
    value
}
