//! Updates to the app: the foreign [`ClientListener`] trait and the
//! [`SubscriptionHandle`] that keeps one listener subscribed.
//!
//! ```text
//!   Client ──broadcast──▶ pump task (SDK runtime) ──bounded queue──▶ delivery thread ──▶ listener
//! ```
//!
//! Each subscription has its own pump and its own delivery thread:
//! - the pump reads the client's update stream and never waits for the app: when the
//!   queue is full it counts what it had to skip and, as soon as there is room, tells
//!   the listener with [`ClientUpdate::Missed`] (with the connection state then);
//! - the delivery thread is the only place the listener is called, with no Rust lock
//!   held; a slow listener only delays its own queue, a throwing one is logged and
//!   keeps receiving.
//!
//! The first update is always [`ClientUpdate::CurrentState`]. Cancelling (or dropping)
//! the handle stops the pump; no callback starts after `cancel()` returns (one already
//! running finishes), the thread ends and the listener is released.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use webwaka_realtime::client::{Client, Next, Subscription};
use webwaka_realtime::machine;

use crate::diagnostics::{self, Live};
use crate::error::{CallbackError, RealtimeError};
use crate::runtime;
use crate::types::ClientUpdate;

/// Updates queued for one listener, at most; past that they are counted as missed.
pub(crate) const QUEUE_CAPACITY: usize = 1024;

/// While updates are waiting to be reported as missed, the pump retries this often.
const MISSED_RETRY: Duration = Duration::from_millis(50);

/// Receives the client's updates. Implemented by the app; called on a thread of the
/// SDK's own (one per subscription), one update at a time, in order. Hop to the UI
/// thread yourself. Throwing is logged and changes nothing.
#[uniffi::export(foreign)]
pub trait ClientListener: Send + Sync {
    /// One update.
    fn on_update(&self, update: ClientUpdate) -> Result<(), CallbackError>;
}

/// Keeps a listener subscribed. Cancel it, or drop it (Swift: release it; Kotlin:
/// `close()` it), to unsubscribe: keep a reference for as long as updates are wanted.
#[derive(uniffi::Object)]
pub struct SubscriptionHandle {
    cancelled: Arc<AtomicBool>,
    pump: tokio::task::AbortHandle,
    _live: Live,
}

#[uniffi::export]
impl SubscriptionHandle {
    /// Stops the deliveries. No callback starts after this returns; one already
    /// running finishes. Safe to call more than once, and from inside the listener.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.pump.abort();
    }

    /// True once cancelled, or once the client is gone and its last updates were
    /// queued (they may still be in delivery).
    pub fn is_finished(&self) -> bool {
        self.cancelled.load(Ordering::Acquire) || self.pump.is_finished()
    }
}

impl Drop for SubscriptionHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Subscribes `listener` to `client`'s updates, with a queue of `capacity`.
pub(crate) fn subscribe(
    client: &Client,
    listener: Arc<dyn ClientListener>,
    capacity: usize,
) -> Result<SubscriptionHandle, RealtimeError> {
    let runtime = runtime::handle()?;
    // Subscribe before reading the state, so that no change falls between the two.
    let updates = client.subscribe();
    let state = client.watch_state();
    let client_id = client.client_id().to_owned();
    let (queue, queued) = mpsc::channel(capacity.max(1));
    let cancelled = Arc::new(AtomicBool::new(false));

    let thread_cancelled = cancelled.clone();
    let thread_live = Live::new(&diagnostics::LISTENER_THREADS);
    std::thread::Builder::new()
        .name("webwaka-listener".into())
        .spawn(move || {
            let _live = thread_live;
            deliver(queued, listener, &thread_cancelled);
        })
        .map_err(|e| RealtimeError::internal(format!("cannot start a listener thread: {e}")))?;

    let pump = runtime.spawn(pump(updates, state, client_id, queue));
    Ok(SubscriptionHandle {
        cancelled,
        pump: pump.abort_handle(),
        _live: Live::new(&diagnostics::SUBSCRIPTIONS),
    })
}

/// The delivery thread: calls the listener with each queued update until the queue
/// closes (the pump ended) or the subscription is cancelled.
fn deliver(
    mut queued: mpsc::Receiver<ClientUpdate>,
    listener: Arc<dyn ClientListener>,
    cancelled: &AtomicBool,
) {
    while let Some(update) = queued.blocking_recv() {
        if cancelled.load(Ordering::Acquire) {
            break;
        }
        match catch_unwind(AssertUnwindSafe(|| listener.on_update(update))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "a listener threw; it keeps its subscription")
            }
            Err(_) => tracing::warn!("a listener call panicked; it keeps its subscription"),
        }
    }
}

/// The queue towards one delivery thread, and what could not be put in it.
struct Queue {
    tx: mpsc::Sender<ClientUpdate>,
    state: watch::Receiver<machine::ConnectionState>,
    missed: u64,
}

impl Queue {
    /// Reports the skipped updates, if any and if there is room now. True when nothing
    /// is left to report.
    fn flush_missed(&mut self) -> bool {
        if self.missed == 0 {
            return true;
        }
        match self.tx.try_reserve() {
            Ok(permit) => {
                permit.send(ClientUpdate::Missed {
                    count: self.missed,
                    state: (*self.state.borrow()).into(),
                });
                self.missed = 0;
                true
            }
            Err(_) => false,
        }
    }

    /// Queues `update`, or counts it as missed when the listener is behind.
    fn offer(&mut self, update: ClientUpdate) {
        if !self.flush_missed() {
            self.missed += 1;
            return;
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(update) {
            self.missed += 1;
        }
    }
}

/// The pump: the current state first, then every update, until the client is gone or
/// the delivery thread ended.
async fn pump(
    mut updates: Subscription,
    state: watch::Receiver<machine::ConnectionState>,
    client_id: String,
    tx: mpsc::Sender<ClientUpdate>,
) {
    let _live = Live::new(&diagnostics::PUMPS);
    let current = (*state.borrow()).into();
    let mut queue = Queue {
        tx,
        state,
        missed: 0,
    };
    queue.offer(ClientUpdate::CurrentState { state: current });
    while !queue.tx.is_closed() {
        let next = if queue.missed > 0 {
            // Wake up now and then to report the skipped updates once there is room.
            match tokio::time::timeout(MISSED_RETRY, updates.next()).await {
                Ok(next) => next,
                Err(_) => {
                    queue.flush_missed();
                    continue;
                }
            }
        } else {
            updates.next().await
        };
        match next {
            Next::Update(update) => queue.offer(ClientUpdate::new(*update, &client_id)),
            Next::Missed(n) => queue.missed += n,
            Next::Closed => break,
        }
    }
    // The client is gone: report what was skipped if the listener catches up in time.
    for _ in 0..20 {
        if queue.flush_missed() || queue.tx.is_closed() {
            break;
        }
        tokio::time::sleep(MISSED_RETRY).await;
    }
}
