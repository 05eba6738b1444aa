//! The SDK's own tokio runtime: where every client's supervisor, its store calls and
//! the subscription pumps run, whatever thread the app calls from.
//!
//! The exported async methods are marked `async_runtime = "tokio"` (so that any tokio
//! call in their own body works), but their work is spawned here and awaited: the
//! futures the app's Kotlin coroutines or Swift tasks poll only wait for a join
//! handle. This keeps the client independent of which thread or executor the app uses,
//! and lets `Drop` shut a client down from any thread.
//!
//! One worker thread: a mobile app runs one or two clients, and their work is I/O (store
//! calls go to the store's own writer thread). With two workers every wake-up handed work to the
//! other, parked one: a connection attempt while Suspended cost 19 context switches
//! with two workers and 7 with one (the wake-up probe, `bench wakeups`), which is what
//! keeps a phone awake. The runtime lives as long as the process.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Handle, Runtime};

use crate::error::RealtimeError;

/// Worker threads of the runtime.
const WORKER_THREADS: usize = 1;

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// The runtime's handle, started on first use.
pub(crate) fn handle() -> Result<Handle, RealtimeError> {
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .thread_name("webwaka-rt")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the SDK's runtime: {e}"))
    });
    match runtime {
        Ok(runtime) => Ok(runtime.handle().clone()),
        Err(e) => Err(RealtimeError::internal(e.clone())),
    }
}

/// Runs `work` on the runtime and waits for its result. If the caller stops waiting
/// (the coroutine or task is cancelled), the work still completes: a message being
/// committed is never torn.
pub(crate) async fn run<T, F>(work: F) -> Result<T, RealtimeError>
where
    F: Future<Output = Result<T, RealtimeError>> + Send + 'static,
    T: Send + 'static,
{
    handle()?
        .spawn(work)
        .await
        .map_err(|e| RealtimeError::internal(format!("an SDK task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_on_the_sdk_runtime_from_a_plain_thread() {
        let name = block_on_bare(run(async {
            Ok(std::thread::current().name().map(str::to_owned))
        }));
        assert_eq!(name, Ok(Some("webwaka-rt".to_owned())));
    }

    /// Polls a future to completion on this thread without any runtime, as the
    /// foreign executors do.
    fn block_on_bare<F: Future>(future: F) -> F::Output {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a bare runtime");
        runtime.block_on(future)
    }
}
