//! A counting global allocator for the benchmarks that report allocations per
//! operation and bytes per retained operation.
//!
//! The `bench` binary installs [`Counting`] as its global allocator. It forwards every
//! call to the server's allocator (mimalloc; the system allocator with the
//! `system-allocator` feature) and, only between [`start`] and [`stop`], counts the
//! calls and the bytes: the other groups (and the server child processes the binary
//! runs) pay one relaxed load per allocation, not a shared counter's contention.
//!
//! Hand-written rather than a crate: it is a dozen lines around the allocator, and the
//! crates that do this (`stats_alloc`, `dhat`) either are unmaintained or record far
//! more than a count.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// What the counting allocator forwards to: the server's allocator (mimalloc, see
/// `server-stub/src/main.rs`), so that the server groups (whose server is this binary,
/// run as a child) and the engine's figures are the server's; the system allocator
/// with the `system-allocator` feature, for what the SDK meets in an app.
#[cfg(not(feature = "system-allocator"))]
static INNER: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[cfg(feature = "system-allocator")]
static INNER: std::alloc::System = std::alloc::System;

/// `INNER`, counting while [`start`]ed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counting;

// SAFETY: every method forwards to `INNER` with the same arguments; the counters are
// plain atomics and allocate nothing.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(1, layout.size() as i64);
        // SAFETY: the caller's contract is `INNER`'s (a `GlobalAlloc`'s).
        unsafe { INNER.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(1, layout.size() as i64);
        // SAFETY: as above.
        unsafe { INNER.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(0, -(layout.size() as i64));
        // SAFETY: as above.
        unsafe { INNER.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(1, new_size as i64 - layout.size() as i64);
        // SAFETY: as above.
        unsafe { INNER.realloc(ptr, layout, new_size) }
    }
}

fn count(calls: u64, bytes: i64) {
    if COUNTING.load(Relaxed) {
        ALLOCATIONS.fetch_add(calls, Relaxed);
        LIVE_BYTES.fetch_add(bytes, Relaxed);
    }
}

/// Tells the benchmarks that [`Counting`] is the global allocator (the `bench` binary
/// calls it first); without it they report no allocation figures.
pub fn installed() {
    INSTALLED.store(true, Relaxed);
}

/// What was counted between [`start`] and [`stop`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    /// Allocation calls (`realloc` included).
    pub allocations: u64,
    /// Bytes allocated minus bytes freed (what the window left allocated).
    pub live_bytes: i64,
}

/// Starts counting from zero. `None` when the counting allocator is not installed.
pub fn start() -> Option<()> {
    if !INSTALLED.load(Relaxed) {
        return None;
    }
    ALLOCATIONS.store(0, Relaxed);
    LIVE_BYTES.store(0, Relaxed);
    COUNTING.store(true, Relaxed);
    Some(())
}

/// Stops counting and returns the counts since [`start`].
pub fn stop() -> Counts {
    COUNTING.store(false, Relaxed);
    Counts {
        allocations: ALLOCATIONS.load(Relaxed),
        live_bytes: LIVE_BYTES.load(Relaxed),
    }
}
