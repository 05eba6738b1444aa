//! The group-commit writer: one thread owns the [`Store`]; enqueues made at the same
//! time by many threads share one transaction, so one fsync.
//!
//! ## Why a thread
//!
//! A durable enqueue costs one commit, and with `synchronous = FULL` a commit costs one
//! fsync of the WAL: the disk's flush rate, not SQLite, bounds how many single-item
//! enqueues a second can hold. The only way past that bound is to put many items in one
//! commit. Callers enqueue one item at a time, from many threads (an app's tasks, the
//! FFI), so someone has to gather them: that is this thread. A rusqlite `Connection` is
//! `Send` but not `Sync`, so one owner thread is also the plain way to share it.
//!
//! ## How a batch is written
//!
//! Callers push jobs on a queue and wait (or are called back). The thread takes
//! everything queued, at most [`MAX_BATCH`] jobs, and runs them in order:
//!
//! - consecutive enqueues go into **one** `BEGIN IMMEDIATE` transaction, each item in
//!   its own savepoint: an item refused on its own merits ([`StoreError::QueueFull`],
//!   [`StoreError::Duplicate`], an unencodable body) is rolled back alone and only its
//!   caller hears about it; the others commit together;
//! - a storage failure (I/O error, disk full, the lock held by another process past the
//!   busy timeout) rolls the whole transaction back and every item of it gets the
//!   error: no caller is told `Ok` unless its item was committed;
//! - a [`StoreWriter::with_store`] job runs alone, between groups, so it sees every
//!   enqueue made before it and none made after.
//!
//! While the thread commits one batch the next one fills up, so the batch size adapts
//! to the load by itself: one caller gets one-item commits (no added latency, no
//! timer), a thousand callers share a few fsyncs.
//!
//! The thread is the bottleneck, so it does as little per item as it can: callers of
//! the blocking [`StoreWriter::enqueue`] all wait on one condition variable that the
//! thread signals once per group, not once per item.
//!
//! ## Shutdown
//!
//! [`StoreWriter::close`], or dropping the last handle, refuses new work
//! ([`StoreError::WriterClosed`]), lets the thread finish everything already queued,
//! and joins it; the `Store` is dropped (closed) on its thread. Should the thread ever
//! stop otherwise (a panic in its own code), whatever is still queued is answered
//! `WriterClosed`: no caller waits forever.
//!
//! ```
//! use serde_json::json;
//! use webwaka_realtime::store::{ItemKind, NewItem, OutboxClass, Store, StoreConfig, StoreWriter};
//!
//! let store = Store::open_in_memory(StoreConfig::default())?;
//! let writer = StoreWriter::new(store)?;
//! let item = NewItem::new(OutboxClass::C, ItemKind::Message, "room:1", json!({"text": "hi"}));
//! let stored = writer.enqueue(item, chrono::Utc::now())?;
//! let depth = writer.with_store(|store| store.depth())??;
//! assert_eq!(depth.items, 1);
//! writer.close()?;
//! # let _ = stored;
//! # Ok::<(), webwaka_realtime::store::StoreError>(())
//! ```

use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::{self, JoinHandle, ThreadId};

use rusqlite::TransactionBehavior;

use super::outbox::{self, NewItem, OutboxItem};
use super::{Store, StoreConfig, StoreError};
use crate::protocol::Timestamp;

/// The most jobs the thread takes from the queue for one batch (one transaction).
pub const MAX_BATCH: usize = 1024;

/// What the caller of [`StoreWriter::submit`] is called back with.
type Reply = Box<dyn FnOnce(Result<OutboxItem, StoreError>) + Send>;
/// What [`StoreWriter::submit_written`] calls once the item is committed, before the
/// flush.
type WrittenHook = Box<dyn FnOnce(Written<'_>) + Send>;

/// An item just committed by the writer, told to [`StoreWriter::submit_written`]'s hook
/// before the commit is flushed to disk.
#[derive(Debug, Clone, Copy)]
pub struct Written<'a> {
    /// The item as stored.
    pub item: &'a OutboxItem,
    /// It is the first pending item of its lane (nothing older of its lane is waiting,
    /// failed for now, or on the wire): it may be sent at once.
    pub lane_head: bool,
}
/// A closure run on the writer thread.
type Task = Box<dyn FnOnce(&mut Store) + Send>;

/// One request to the writer thread.
enum Job {
    Enqueue {
        item: NewItem,
        now: Timestamp,
        written: Option<WrittenHook>,
        reply: Reply,
    },
    Run(Task),
}

/// The queue between callers and the thread.
struct Queue {
    jobs: VecDeque<Job>,
    /// Set by `close`: no new jobs; the thread ends once `jobs` is empty.
    closed: bool,
}

/// What callers and the thread share.
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a job is queued or the writer is closed.
    wake: Condvar,
    /// Signalled once per group, after its replies are in: blocking callers wait on it.
    replied: Arc<Replied>,
    batches: AtomicU64,
    items: AtomicU64,
    /// Set when a flush failed (or `synchronous` could not be restored): from then on
    /// every job is refused with [`StoreError::FlushFailed`].
    failed: std::sync::OnceLock<String>,
}

/// Where blocking callers wait for their replies. One signal per group wakes them all:
/// the writer does not pay a wake-up per item (it did: 22 against 12 µs per item).
#[derive(Default)]
struct Replied {
    /// Counts the signals; its mutex is the one the condition variable needs.
    signals: Mutex<u64>,
    done: Condvar,
}

impl Replied {
    fn signal(&self) {
        *self.signals.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.done.notify_all();
    }
}

/// A blocking caller's reply: filled by the writer, or with `WriterClosed` if the job is
/// dropped without being run (the thread stopped), so that the caller never waits for
/// a reply that cannot come.
struct ReplySlot {
    result: Arc<Mutex<Option<Result<OutboxItem, StoreError>>>>,
    replied: Arc<Replied>,
    filled: bool,
}

impl ReplySlot {
    fn fill(mut self, result: Result<OutboxItem, StoreError>) {
        *self.result.lock().unwrap_or_else(PoisonError::into_inner) = Some(result);
        self.filled = true;
        // The writer signals once for the whole group (see `commit_group`).
    }
}

/// Waits until `result` is filled (see [`ReplySlot`]).
fn wait_for(
    result: &Mutex<Option<Result<OutboxItem, StoreError>>>,
    replied: &Replied,
) -> Result<OutboxItem, StoreError> {
    // Check and wait under the signal's mutex: a signal cannot slip in between.
    // Bounded: the slot is filled when the group commits, or when the job is dropped
    // unrun (see `ReplySlot`); each fill is followed by a signal.
    let mut signals = replied
        .signals
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    loop {
        if let Some(outcome) = result.lock().unwrap_or_else(PoisonError::into_inner).take() {
            return outcome;
        }
        signals = replied
            .done
            .wait(signals)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

impl Drop for ReplySlot {
    fn drop(&mut self) {
        if !self.filled {
            *self.result.lock().unwrap_or_else(PoisonError::into_inner) =
                Some(Err(StoreError::WriterClosed));
            self.replied.signal();
        }
    }
}

impl Shared {
    /// The error every job gets once a flush failed.
    fn failure(&self) -> Option<StoreError> {
        self.failed.get().cloned().map(StoreError::FlushFailed)
    }

    /// Whether a flush failed (checked for every job: no lock, no copy).
    fn has_failed(&self) -> bool {
        self.failed.get().is_some()
    }

    /// Records the first failure; later ones change nothing.
    fn fail(&self, why: String) {
        let _ = self.failed.set(why);
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // No code that can panic runs under this lock, but a poisoned lock must not
        // turn into a panic of every caller: the queue is still consistent.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Owns the thread; dropped when the last [`StoreWriter`] handle is.
struct Owner {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    thread_id: ThreadId,
}

impl Owner {
    /// Refuses new jobs, lets the thread drain the queue, and joins it.
    fn shutdown(&self) -> Result<(), StoreError> {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
        if thread::current().id() == self.thread_id {
            // Called from a job on the writer thread: it cannot wait for itself. The
            // thread ends by itself once the queue is drained.
            return Ok(());
        }
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match handle {
            Some(handle) => handle.join().map_err(|_| StoreError::WriterClosed),
            None => Ok(()),
        }
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        // Nobody is left to hear about a failure here; `close` reports it.
        off_worker(|| {
            let _ = self.shutdown();
        });
    }
}

/// Runs `wait` (a wait for the writer thread) so that it does not hold a worker of a
/// multi-threaded tokio runtime: dropped there (the last client handle going away in
/// a task), the worker's other tasks move to another thread meanwhile. (One context
/// is not handled: a multi-threaded runtime's handle entered with `Handle::enter` on a
/// thread that runs a current-thread runtime, where `block_in_place` panics. Nothing
/// in the SDK or its bindings does that.)
fn off_worker(wait: impl FnOnce()) {
    #[cfg(feature = "client")]
    if tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
    {
        tokio::task::block_in_place(wait);
        return;
    }
    wait();
}

/// How much work the writer did: `items / batches` is the mean group size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriterStats {
    /// Enqueue transactions committed (or attempted).
    pub batches: u64,
    /// Items in them (accepted or refused).
    pub items: u64,
}

/// A handle to the store's writer thread: clone it freely, share it between threads.
///
/// See the [module documentation](self) for the design.
#[derive(Clone)]
pub struct StoreWriter {
    owner: Arc<Owner>,
}

impl std::fmt::Debug for StoreWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreWriter")
            .field("thread", &self.owner.thread_id)
            .field("stats", &self.stats())
            .finish()
    }
}

impl StoreWriter {
    /// Moves `store` to a new writer thread.
    pub fn new(store: Store) -> Result<StoreWriter, StoreError> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                closed: false,
            }),
            wake: Condvar::new(),
            replied: Arc::new(Replied::default()),
            batches: AtomicU64::new(0),
            items: AtomicU64::new(0),
            failed: std::sync::OnceLock::new(),
        });
        let for_thread = Arc::clone(&shared);
        let handle = thread::Builder::new()
            .name("webwaka-store-writer".into())
            .spawn(move || {
                let mut store = store;
                // `run` returns when closed and drained. Should it panic (a bug: user
                // code is caught where it runs), the writer closes and every job still
                // queued is answered `WriterClosed` instead of being waited for forever.
                let outcome =
                    panic::catch_unwind(AssertUnwindSafe(|| run(&mut store, &for_thread)));
                let left: Vec<Job> = {
                    let mut queue = for_thread.lock();
                    queue.closed = true;
                    queue.jobs.drain(..).collect()
                };
                for job in left {
                    if let Job::Enqueue { reply, .. } = job {
                        let _ = panic::catch_unwind(AssertUnwindSafe(move || {
                            reply(Err(StoreError::WriterClosed))
                        }));
                    }
                    // A `Run` job dropped unrun: its caller sees `WriterClosed`.
                }
                for_thread.replied.signal();
                if let Err(panic_payload) = outcome {
                    panic::resume_unwind(panic_payload);
                }
            })?;
        let thread_id = handle.thread().id();
        Ok(StoreWriter {
            owner: Arc::new(Owner {
                shared,
                thread: Mutex::new(Some(handle)),
                thread_id,
            }),
        })
    }

    /// Opens the store at `path` ([`Store::open`]) and starts its writer thread.
    pub fn open(path: impl AsRef<Path>, config: StoreConfig) -> Result<StoreWriter, StoreError> {
        StoreWriter::new(Store::open(path, config)?)
    }

    /// Commits `item` to the outbox, in a transaction shared with whatever else is
    /// being enqueued now; when this returns `Ok`, it is on disk. Blocks until then.
    ///
    /// Errors as [`Store::enqueue`], and [`StoreError::WriterClosed`] after `close`.
    /// Called from inside [`StoreWriter::with_store`] (the writer's own thread) it
    /// would wait for itself: it returns [`StoreError::Invalid`] instead.
    pub fn enqueue(&self, item: NewItem, now: Timestamp) -> Result<OutboxItem, StoreError> {
        self.refuse_on_writer_thread("enqueue")?;
        let replied = Arc::clone(&self.owner.shared.replied);
        let result = Arc::new(Mutex::new(None));
        let slot = ReplySlot {
            result: Arc::clone(&result),
            replied: Arc::clone(&replied),
            filled: false,
        };
        self.submit(item, now, move |outcome| slot.fill(outcome));
        wait_for(&result, &replied)
    }

    /// Queues `item` and returns at once; `reply` is called with the result once the
    /// item's transaction is committed (or failed), on the writer thread, so it must be
    /// quick: e.g. completing a oneshot channel that an async caller awaits.
    ///
    /// After `close`, `reply` is called at once, on this thread, with
    /// [`StoreError::WriterClosed`]. A panic in `reply` is contained (the writer goes on).
    pub fn submit(
        &self,
        item: NewItem,
        now: Timestamp,
        reply: impl FnOnce(Result<OutboxItem, StoreError>) + Send + 'static,
    ) {
        let job = Job::Enqueue {
            item,
            now,
            written: None,
            reply: Box::new(reply),
        };
        if let Some(Job::Enqueue { reply, .. }) = self.push(job) {
            reply(Err(StoreError::WriterClosed));
        }
    }

    /// [`StoreWriter::submit`], and `written` is called (on the writer thread, so it must
    /// be quick) as soon as the item is committed: readers of the store see it, and it
    /// may be sent. With [`Durability::Full`](super::Durability::Full) that is before
    /// the commit is flushed to disk (see `store::flush`); `reply` comes after the
    /// flush, as always. Not called when the item is refused or the commit fails.
    ///
    /// Should the flush itself fail (an I/O error of the disk), every caller of the
    /// group gets [`StoreError::FlushFailed`], although its item was written, and the
    /// writer takes no more work ([`StoreWriter::failure`]): nothing of the group is
    /// read back or sent afterwards. An item whose `written` hook already ran may have
    /// been sent meanwhile; that is the price of not waiting for the flush. A full disk
    /// or a full outbox fails the write itself, before `written`.
    pub fn submit_written(
        &self,
        item: NewItem,
        now: Timestamp,
        written: impl FnOnce(Written<'_>) + Send + 'static,
        reply: impl FnOnce(Result<OutboxItem, StoreError>) + Send + 'static,
    ) {
        let job = Job::Enqueue {
            item,
            now,
            written: Some(Box::new(written)),
            reply: Box::new(reply),
        };
        if let Some(Job::Enqueue { reply, .. }) = self.push(job) {
            reply(Err(StoreError::WriterClosed));
        }
    }

    /// Runs `f` on the writer thread with the store, after every job queued before it
    /// and before any queued after it, and returns what `f` returned. Any store
    /// operation other than enqueue (take, ack, list, …) goes through here.
    ///
    /// A panic in `f` is caught on the writer thread (which goes on) and resumed here.
    /// Errors: [`StoreError::WriterClosed`] after `close`; [`StoreError::Invalid`] when
    /// called from the writer's own thread (inside another `with_store`).
    pub fn with_store<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Store) -> R + Send + 'static,
    {
        self.refuse_on_writer_thread("with_store")?;
        let (tx, rx) = mpsc::sync_channel(1);
        let task: Task = Box::new(move |store: &mut Store| {
            let result = panic::catch_unwind(AssertUnwindSafe(|| f(store)));
            let _ = tx.send(result);
        });
        if self.push(Job::Run(task)).is_some() {
            return Err(StoreError::WriterClosed);
        }
        match rx.recv() {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(panic_payload)) => panic::resume_unwind(panic_payload),
            Err(_) => Err(self.failure().unwrap_or(StoreError::WriterClosed)),
        }
    }

    /// Queues `f` to run on the writer thread, ordered as [`StoreWriter::with_store`],
    /// and returns at once; `reply` gets what `f` returned, or the panic `f` raised, on
    /// the writer thread (so it must be quick: completing a channel an async caller
    /// awaits). An async caller waits for its reply without holding any thread.
    ///
    /// After `close` (or should the thread have stopped), and after a failed flush,
    /// `reply` is never called: it is dropped, which a channel's receiver sees as
    /// closed ([`StoreWriter::failure`] then says why).
    pub fn run_then<R, F>(&self, f: F, reply: impl FnOnce(thread::Result<R>) + Send + 'static)
    where
        R: Send + 'static,
        F: FnOnce(&mut Store) -> R + Send + 'static,
    {
        let task: Task = Box::new(move |store: &mut Store| {
            let result = panic::catch_unwind(AssertUnwindSafe(|| f(store)));
            // A panic in `reply` must not stop the writer.
            let _ = panic::catch_unwind(AssertUnwindSafe(move || reply(result)));
        });
        // Closed: the task, and with it `reply`, is dropped here.
        let _ = self.push(Job::Run(task));
    }

    /// Refuses new work, waits until everything queued is done, and stops the thread
    /// (the store is closed). Every handle sees the writer closed. Calling it again is
    /// harmless. [`StoreError::WriterClosed`] if the thread had died (a bug).
    pub fn close(&self) -> Result<(), StoreError> {
        self.owner.shutdown()
    }

    /// Why the writer takes no more work after a failed flush
    /// ([`StoreError::FlushFailed`]); `None` while it works.
    pub fn failure(&self) -> Option<StoreError> {
        self.owner.shared.failure()
    }

    /// How many enqueue transactions and items the writer has handled so far.
    pub fn stats(&self) -> WriterStats {
        let shared = &self.owner.shared;
        WriterStats {
            batches: shared.batches.load(Ordering::Relaxed),
            items: shared.items.load(Ordering::Relaxed),
        }
    }

    /// Queues `job`; gives it back when the writer is closed.
    fn push(&self, job: Job) -> Option<Job> {
        let shared = &self.owner.shared;
        {
            let mut queue = shared.lock();
            if queue.closed {
                return Some(job);
            }
            queue.jobs.push_back(job);
        }
        shared.wake.notify_one();
        None
    }

    fn refuse_on_writer_thread(&self, what: &str) -> Result<(), StoreError> {
        if thread::current().id() == self.owner.thread_id {
            return Err(StoreError::Invalid {
                field: "StoreWriter",
                message: format!(
                    "{what} called on the writer's own thread (inside with_store) would wait \
                     for itself; use the store given to the closure"
                ),
            });
        }
        Ok(())
    }
}

/// The writer thread: takes batches until the writer is closed and the queue is empty.
/// (Not bounded in count: it lives as long as the handles; it blocks while idle.)
fn run(store: &mut Store, shared: &Shared) {
    loop {
        let batch: Vec<Job> = {
            let mut queue = shared.lock();
            while queue.jobs.is_empty() && !queue.closed {
                queue = shared
                    .wake
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if queue.jobs.is_empty() {
                return; // closed, and nothing left to do
            }
            let n = queue.jobs.len().min(MAX_BATCH);
            queue.jobs.drain(..n).collect()
        };
        run_batch(store, shared, batch);
    }
}

/// An enqueue waiting for its group's commit.
struct Pending {
    item: NewItem,
    now: Timestamp,
    written: Option<WrittenHook>,
    reply: Reply,
}

/// Runs `batch` in order: runs of enqueues as one transaction each, tasks alone.
fn run_batch(store: &mut Store, shared: &Shared, batch: Vec<Job>) {
    let mut group: Vec<Pending> = Vec::new();
    for job in batch {
        if shared.has_failed() {
            // A flush failed: nothing more is done with the store. (A job of the
            // group still pending is answered by `commit_group`.)
            commit_group(store, shared, std::mem::take(&mut group));
            refuse(shared, job);
            continue;
        }
        match job {
            Job::Enqueue {
                item,
                now,
                written,
                reply,
            } => group.push(Pending {
                item,
                now,
                written,
                reply,
            }),
            Job::Run(task) => {
                commit_group(store, shared, std::mem::take(&mut group));
                // The task catches its own panics (see `with_store`).
                task(store);
                if store.sync_lowered() && store.restore_synchronous().is_err() {
                    shared.fail("synchronous = FULL could not be restored".into());
                }
            }
        }
    }
    commit_group(store, shared, group);
}

/// Answers a job the writer refuses after a failed flush: an enqueue hears why; a task
/// is dropped unrun (its caller sees the reply channel closed, and asks why).
fn refuse(shared: &Shared, job: Job) {
    if let Job::Enqueue { reply, .. } = job {
        let error = shared.failure().unwrap_or(StoreError::WriterClosed);
        let _ = panic::catch_unwind(AssertUnwindSafe(move || reply(Err(error))));
    }
    shared.replied.signal();
}

/// Commits `group` in one transaction and replies to each caller: the `written` hooks
/// right after the commit, the replies once it is on disk. At
/// [`Durability::Full`](super::Durability::Full) the commit is made unflushed and the
/// log flushed after the hooks (see `store::flush`), so that a new item goes out while
/// the disk flushes.
fn commit_group(store: &mut Store, shared: &Shared, group: Vec<Pending>) {
    if group.is_empty() {
        return;
    }
    let n = group.len();
    shared.batches.fetch_add(1, Ordering::Relaxed);
    shared.items.fetch_add(n as u64, Ordering::Relaxed);
    let mut replies = Vec::with_capacity(n);
    let mut hooks = Vec::with_capacity(n);
    let mut items = Vec::with_capacity(n);
    for p in group {
        replies.push(p.reply);
        items.push((p.item, p.now, p.written.is_some()));
        hooks.push(p.written);
    }
    // Unflushed only if the level could be lowered; otherwise a plain `FULL` commit.
    let by_hand = store.flushes_by_hand() && store.lower_synchronous().is_ok();
    let mut outcomes = match write_group(store, items) {
        Ok(outcomes) => outcomes,
        // Rolled back: nothing of the group is stored, every caller hears why.
        Err(e) => (0..n).map(|_| Err(replicate(&e))).collect(),
    };
    for (hook, outcome) in hooks.into_iter().zip(&outcomes) {
        if let (Some(hook), Ok((item, lane_head))) = (hook, outcome) {
            let written = Written {
                item,
                lane_head: *lane_head,
            };
            // A panicking hook must not take the writer down.
            let _ = panic::catch_unwind(AssertUnwindSafe(move || hook(written)));
        }
    }
    if by_hand && let Err(e) = store.flush_wal() {
        // The items are written but not durable, and after a failed flush the OS may
        // have dropped what it could not write, so a later flush proves nothing: no
        // caller is told `Ok`, and the writer takes no more work (nor does anyone read
        // the items back to send them). A lane's head may already be on its way to
        // the server (the hook ran): its caller hears the same error.
        shared.fail(e.to_string());
        for outcome in outcomes.iter_mut().filter(|o| o.is_ok()) {
            *outcome = Err(shared.failure().unwrap_or(StoreError::WriterClosed));
        }
    }
    if store.restore_synchronous().is_err() {
        // Later commits would be unflushed while reported durable.
        shared.fail("synchronous = FULL could not be restored".into());
    }
    for (reply, outcome) in replies.into_iter().zip(outcomes) {
        let outcome = outcome.map(|(item, _)| item);
        // A panicking callback must not take the writer (and every later caller) down.
        let _ = panic::catch_unwind(AssertUnwindSafe(move || reply(outcome)));
    }
    // One wake-up for every blocking caller of the group.
    shared.replied.signal();
}

/// One stored item of a group, and whether it heads its lane (asked for by a
/// `written` hook only; `false` otherwise).
type Stored = (OutboxItem, bool);

/// Inserts each item in its own savepoint of one immediate transaction and commits it.
/// `Ok` holds one outcome per item, in order; `Err` means nothing was committed.
fn write_group(
    store: &mut Store,
    items: Vec<(NewItem, Timestamp, bool)>,
) -> Result<Vec<Result<Stored, StoreError>>, StoreError> {
    let config = &store.config;
    let tx = store
        .conn
        .transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Counted once: the immediate transaction holds the write lock, so nobody else
    // changes the outbox until commit, and each insert advances the count.
    let mut depth = outbox::pending_depth(&tx)?;
    let mut outcomes = Vec::with_capacity(items.len());
    // The savepoint statements are prepared once (rusqlite's `Savepoint` would parse
    // their text for every item).
    let run = |sql: &str| -> Result<(), StoreError> {
        tx.prepare_cached(sql)?.execute([])?;
        Ok(())
    };
    for (item, now, ask_head) in items {
        run("SAVEPOINT writer_item")?;
        match outbox::insert_counted(&tx, vec![item], now, config, &mut depth) {
            Ok(mut stored) => {
                run("RELEASE writer_item")?;
                let Some(stored) = stored.pop() else {
                    outcomes.push(Err(StoreError::Invalid {
                        field: "enqueue",
                        message: "no item was stored".into(),
                    }));
                    continue;
                };
                let head = ask_head && outbox::is_lane_head(&tx, &stored)?;
                outcomes.push(Ok((stored, head)));
            }
            // Refused on its own merits: only this item is rolled back.
            Err(
                e @ (StoreError::QueueFull { .. }
                | StoreError::Duplicate(_)
                | StoreError::Invalid { .. }),
            ) => {
                run("ROLLBACK TO writer_item")?;
                run("RELEASE writer_item")?;
                outcomes.push(Err(e));
            }
            // Anything else is the storage failing: the transaction cannot be trusted
            // (SQLite may have rolled it back already); the whole group fails.
            Err(e) => return Err(e),
        }
    }
    tx.commit()?;
    Ok(outcomes)
}

/// A copy of `e` for each caller of a failed group (`StoreError` is not `Clone`:
/// rusqlite's errors are not). SQLite failures keep their code and message.
fn replicate(e: &StoreError) -> StoreError {
    match e {
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(code, message)) => {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(*code, message.clone()))
        }
        StoreError::Io(io) => StoreError::Io(std::io::Error::new(io.kind(), io.to_string())),
        StoreError::QueueFull { limit } => StoreError::QueueFull {
            limit: limit.clone(),
        },
        StoreError::WriterClosed => StoreError::WriterClosed,
        StoreError::FlushFailed(why) => StoreError::FlushFailed(why.clone()),
        other => StoreError::Invalid {
            field: "group commit",
            message: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ItemKind, ItemState, OutboxClass};
    use chrono::{TimeZone, Utc};
    use serde_json::json;
    use std::sync::Barrier;
    use std::time::Duration;

    fn at(secs: i64) -> Timestamp {
        Utc.timestamp_opt(1_780_000_000 + secs, 0).single().unwrap()
    }

    fn msg(lane: &str, n: usize) -> NewItem {
        NewItem::new(OutboxClass::C, ItemKind::Message, lane, json!({ "n": n }))
    }

    fn file_store(dir: &tempfile::TempDir, config: StoreConfig) -> Store {
        Store::open(dir.path().join("w.db"), config).unwrap()
    }

    /// Holds the writer thread inside a `with_store` job until the returned sender is
    /// used, so that jobs queued meanwhile form one batch.
    fn hold(writer: &StoreWriter) -> mpsc::Sender<()> {
        let (release, wait) = mpsc::channel::<()>();
        let (started, is_started) = mpsc::channel::<()>();
        let w = writer.clone();
        thread::spawn(move || {
            w.with_store(move |_| {
                started.send(()).unwrap();
                // Bounded: a test that forgets to release fails instead of hanging.
                let _ = wait.recv_timeout(Duration::from_secs(10));
            })
            .unwrap();
        });
        is_started.recv_timeout(Duration::from_secs(10)).unwrap();
        release
    }

    /// Submits `item` and returns a receiver for its reply.
    fn submit(
        writer: &StoreWriter,
        item: NewItem,
    ) -> mpsc::Receiver<Result<OutboxItem, StoreError>> {
        let (tx, rx) = mpsc::channel();
        writer.submit(item, at(0), move |r| tx.send(r).unwrap());
        rx
    }

    fn recv<T>(rx: &mpsc::Receiver<T>) -> T {
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    #[test]
    fn concurrent_enqueues_are_all_committed_in_per_thread_order() {
        let dir = tempfile::tempdir().unwrap();
        let writer = StoreWriter::new(file_store(&dir, StoreConfig::default())).unwrap();
        let threads = 8;
        let per_thread = 40;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let writer = writer.clone();
                let barrier = Arc::clone(&barrier);
                thread::spawn(move || {
                    barrier.wait();
                    (0..per_thread)
                        .map(|n| writer.enqueue(msg(&format!("t{t}"), n), at(0)).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            let stored = h.join().unwrap();
            assert!(
                stored.windows(2).all(|w| w[0].seq < w[1].seq),
                "one thread's items keep its order"
            );
        }
        let stats = writer.stats();
        assert_eq!(stats.items, (threads * per_thread) as u64);
        assert!(stats.batches <= stats.items);
        writer.close().unwrap();
        let store = file_store(&dir, StoreConfig::default());
        assert_eq!(store.list(None).unwrap().len(), threads * per_thread);
        store.integrity_check().unwrap();
    }

    #[test]
    fn items_queued_together_share_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let writer = StoreWriter::new(file_store(&dir, StoreConfig::default())).unwrap();
        let release = hold(&writer);
        let before = writer.stats();
        let replies: Vec<_> = (0..100).map(|n| submit(&writer, msg("l", n))).collect();
        release.send(()).unwrap();
        let stored: Vec<OutboxItem> = replies.iter().map(|rx| recv(rx).unwrap()).collect();
        assert!(stored.windows(2).all(|w| w[0].seq < w[1].seq));
        let after = writer.stats();
        assert_eq!(
            after.batches - before.batches,
            1,
            "one commit for 100 items"
        );
        assert_eq!(after.items - before.items, 100);
    }

    #[test]
    fn a_refused_item_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            max_items: 3,
            ..StoreConfig::default()
        };
        let writer = StoreWriter::new(file_store(&dir, config.clone())).unwrap();
        let release = hold(&writer);
        let a = msg("l", 1);
        let replies = [
            submit(&writer, a.clone()),
            submit(&writer, a.clone()), // the same id again
            submit(&writer, msg("l", 2)),
            submit(&writer, msg("l", 3)),
            submit(&writer, msg("l", 4)), // a fourth pending item: over the bound
        ];
        release.send(()).unwrap();
        let results: Vec<_> = replies.iter().map(recv).collect();
        assert!(results[0].is_ok());
        assert!(matches!(&results[1], Err(StoreError::Duplicate(id)) if *id == a.id));
        assert!(results[2].is_ok() && results[3].is_ok());
        assert!(matches!(&results[4], Err(StoreError::QueueFull { limit }) if limit == "3 items"));
        assert_eq!(writer.stats().batches, 1);
        let depth = writer.with_store(|s| s.depth().unwrap()).unwrap();
        assert_eq!(depth.items, 3);
    }

    #[test]
    fn a_storage_failure_fails_the_whole_group_and_stores_nothing() {
        let writer =
            StoreWriter::new(Store::open_in_memory(StoreConfig::default()).unwrap()).unwrap();
        // Make every write fail with a SQLite error, as a full disk would.
        writer
            .with_store(|s| s.conn.execute_batch("PRAGMA query_only = 1").unwrap())
            .unwrap();
        let release = hold(&writer);
        let replies: Vec<_> = (0..3).map(|n| submit(&writer, msg("l", n))).collect();
        release.send(()).unwrap();
        for rx in &replies {
            assert!(matches!(recv(rx), Err(StoreError::Sqlite(_))));
        }
        writer
            .with_store(|s| s.conn.execute_batch("PRAGMA query_only = 0").unwrap())
            .unwrap();
        assert_eq!(writer.with_store(|s| s.depth().unwrap()).unwrap().items, 0);
        // The writer goes on.
        writer.enqueue(msg("l", 9), at(1)).unwrap();
    }

    #[test]
    fn with_store_is_ordered_with_enqueues() {
        let writer =
            StoreWriter::new(Store::open_in_memory(StoreConfig::default()).unwrap()).unwrap();
        let release = hold(&writer);
        let item = msg("l", 1);
        let id = item.id.clone();
        let reply = submit(&writer, item);
        let w = writer.clone();
        let seen = thread::spawn(move || {
            w.with_store(move |s| {
                let stored = s.get(&id).unwrap().unwrap();
                s.mark_in_flight(&stored.id, at(1)).unwrap().state
            })
            .unwrap()
        });
        // Give the with_store call time to be queued behind the enqueue.
        thread::sleep(Duration::from_millis(50));
        release.send(()).unwrap();
        recv(&reply).unwrap();
        assert_eq!(seen.join().unwrap(), ItemState::InFlight);
    }

    #[test]
    fn close_finishes_queued_work_then_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let writer = StoreWriter::new(file_store(&dir, StoreConfig::default())).unwrap();
        let release = hold(&writer);
        let replies: Vec<_> = (0..10).map(|n| submit(&writer, msg("l", n))).collect();
        let w = writer.clone();
        let closing = thread::spawn(move || w.close());
        thread::sleep(Duration::from_millis(50));
        release.send(()).unwrap();
        closing.join().unwrap().unwrap();
        for rx in &replies {
            recv(rx).unwrap();
        }
        assert!(matches!(
            writer.enqueue(msg("l", 99), at(1)),
            Err(StoreError::WriterClosed)
        ));
        assert!(matches!(
            recv(&submit(&writer, msg("l", 100))),
            Err(StoreError::WriterClosed)
        ));
        assert!(matches!(
            writer.with_store(|_| ()),
            Err(StoreError::WriterClosed)
        ));
        writer.close().unwrap();
        // The store was closed on its thread: the file opens with all ten items.
        let store = file_store(&dir, StoreConfig::default());
        assert_eq!(store.depth().unwrap().items, 10);
    }

    #[test]
    fn dropping_the_last_handle_drains_and_joins() {
        let dir = tempfile::tempdir().unwrap();
        let writer = StoreWriter::new(file_store(&dir, StoreConfig::default())).unwrap();
        let other = writer.clone();
        let replies: Vec<_> = (0..20).map(|n| submit(&writer, msg("l", n))).collect();
        drop(writer);
        other.enqueue(msg("l", 20), at(0)).unwrap(); // still open: one handle is left
        drop(other);
        for rx in &replies {
            recv(rx).unwrap();
        }
        let store = file_store(&dir, StoreConfig::default());
        assert_eq!(store.depth().unwrap().items, 21);
    }

    #[test]
    fn a_panic_in_with_store_reaches_the_caller_and_the_writer_goes_on() {
        let writer =
            StoreWriter::new(Store::open_in_memory(StoreConfig::default()).unwrap()).unwrap();
        let w = writer.clone();
        let caught = thread::spawn(move || w.with_store(|_| panic!("boom"))).join();
        assert!(caught.is_err(), "the panic is resumed in the caller");
        // A panicking reply callback is contained too.
        writer.submit(msg("l", 0), at(0), |_| panic!("callback"));
        writer.enqueue(msg("l", 1), at(0)).unwrap();
        assert_eq!(writer.with_store(|s| s.depth().unwrap()).unwrap().items, 2);
    }

    #[test]
    fn reentrant_calls_are_refused_instead_of_deadlocking() {
        let writer =
            StoreWriter::new(Store::open_in_memory(StoreConfig::default()).unwrap()).unwrap();
        let inner = writer.clone();
        let (enqueued, nested) = writer
            .with_store(move |_| (inner.enqueue(msg("l", 1), at(0)), inner.with_store(|_| ())))
            .unwrap();
        assert!(matches!(enqueued, Err(StoreError::Invalid { .. })));
        assert!(matches!(nested, Err(StoreError::Invalid { .. })));
        // submit does not wait, so it is fine from the writer thread.
        let inner = writer.clone();
        let rx = writer
            .with_store(move |_| {
                let (tx, rx) = mpsc::channel();
                inner.submit(msg("l", 2), at(0), move |r| tx.send(r).unwrap());
                rx
            })
            .unwrap();
        recv(&rx).unwrap();
    }

    #[test]
    fn a_blocking_caller_whose_job_is_dropped_unrun_hears_writer_closed() {
        let replied = Arc::new(Replied::default());
        let result = Arc::new(Mutex::new(None));
        let slot = ReplySlot {
            result: Arc::clone(&result),
            replied: Arc::clone(&replied),
            filled: false,
        };
        let waiter = {
            let (result, replied) = (Arc::clone(&result), Arc::clone(&replied));
            thread::spawn(move || wait_for(&result, &replied))
        };
        thread::sleep(Duration::from_millis(20));
        drop(slot); // as when the writer thread stops with the job still queued
        assert!(matches!(
            waiter.join().unwrap(),
            Err(StoreError::WriterClosed)
        ));
    }

    /// The last handle dropped in a task of a one-worker runtime: while the drop waits
    /// for the queue to drain, the runtime's other tasks still run (the worker is
    /// handed over). Here the queued job finishes only once such a task ran: blocking
    /// the worker instead, it would time out.
    #[cfg(feature = "client")]
    #[test]
    fn dropping_the_last_handle_on_a_runtime_worker_lets_its_other_tasks_run() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let writer =
            StoreWriter::new(Store::open_in_memory(StoreConfig::default()).unwrap()).unwrap();
        let (signal_tx, signal_rx) = mpsc::channel::<()>();
        let (seen_tx, seen_rx) = mpsc::channel::<bool>();
        writer.submit(msg("d", 1), at(0), move |_| {
            let ran = signal_rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .is_ok();
            let _ = seen_tx.send(ran);
        });
        runtime.block_on(async move {
            tokio::spawn(async move {
                // Queued behind this task on the only worker.
                let other = tokio::spawn(async move {
                    let _ = signal_tx.send(());
                });
                drop(writer);
                other.await.unwrap();
            })
            .await
            .unwrap();
        });
        assert!(
            seen_rx.recv().unwrap(),
            "another task of the runtime ran while the drop waited"
        );
    }

    #[test]
    fn close_from_the_writer_thread_does_not_deadlock() {
        let writer =
            StoreWriter::new(Store::open_in_memory(StoreConfig::default()).unwrap()).unwrap();
        let inner = writer.clone();
        writer.with_store(move |_| inner.close()).unwrap().unwrap();
        assert!(matches!(
            writer.enqueue(msg("l", 1), at(0)),
            Err(StoreError::WriterClosed)
        ));
    }

    #[test]
    fn the_written_hook_runs_between_commit_and_reply_and_tells_lane_heads() {
        let dir = tempfile::tempdir().unwrap();
        let writer = StoreWriter::new(file_store(&dir, StoreConfig::default())).unwrap();
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let release = hold(&writer);
        let mut replies = Vec::new();
        // Two in lane `a` (the second waits behind the first), one in lane `b`; one
        // group, so the first of `a` is still pending when the second is written.
        for (lane, n) in [("a", 1), ("a", 2), ("b", 3)] {
            let (hook_log, reply_log) = (Arc::clone(&log), Arc::clone(&log));
            let (tx, rx) = mpsc::channel();
            writer.submit_written(
                msg(lane, n),
                at(0),
                move |w| {
                    let n = &w.item.body["n"];
                    hook_log
                        .lock()
                        .unwrap()
                        .push(format!("written {n} head={}", w.lane_head));
                },
                move |r| {
                    let n = r.as_ref().map(|i| i.body["n"].to_string());
                    reply_log.lock().unwrap().push(format!("reply {n:?}"));
                    tx.send(r).unwrap();
                },
            );
            replies.push(rx);
        }
        release.send(()).unwrap();
        for rx in &replies {
            recv(rx).unwrap();
        }
        assert_eq!(
            *log.lock().unwrap(),
            [
                "written 1 head=true",
                "written 2 head=false",
                "written 3 head=true",
                "reply Ok(\"1\")",
                "reply Ok(\"2\")",
                "reply Ok(\"3\")",
            ],
            "every hook before any reply (the flush comes between), heads per lane"
        );
        // The store went back to FULL after the group's unflushed commit.
        let level = writer
            .with_store(|s| {
                s.conn
                    .query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0))
            })
            .unwrap()
            .unwrap();
        assert_eq!(level, 2);
        // Settling the first of `a` leaves the second pending: a new item of `a` does
        // not head the lane.
        assert!(replies[0].try_recv().is_err(), "one reply per item");
        writer
            .with_store(|s| {
                let id = s.list(None)?[0].id.clone();
                s.mark_in_flight(&id, at(1))?;
                s.mark_accepted(&id, None, at(1))
            })
            .unwrap()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        writer.submit_written(
            msg("a", 4),
            at(2),
            move |w| tx.send(w.lane_head).unwrap(),
            |r| drop(r.unwrap()),
        );
        assert!(!recv(&rx), "item 2 of lane a is still pending before it");
    }

    #[test]
    fn the_written_hook_is_not_called_for_a_refused_item() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            max_items: 1,
            ..StoreConfig::default()
        };
        let writer = StoreWriter::new(file_store(&dir, config)).unwrap();
        writer.enqueue(msg("l", 0), at(0)).unwrap();
        let (hook_tx, hook_rx) = mpsc::channel();
        let (tx, rx) = mpsc::channel();
        writer.submit_written(
            msg("l", 1),
            at(0),
            move |_| hook_tx.send(()).unwrap(),
            move |r| tx.send(r).unwrap(),
        );
        assert!(matches!(recv(&rx), Err(StoreError::QueueFull { .. })));
        assert!(
            hook_rx.try_recv().is_err(),
            "no hook for an item not stored"
        );
    }

    #[test]
    fn run_then_replies_with_the_result_or_the_panic_and_drops_the_reply_when_closed() {
        let writer =
            StoreWriter::new(Store::open_in_memory(StoreConfig::default()).unwrap()).unwrap();
        let (tx, rx) = mpsc::channel();
        let sent = tx.clone();
        writer.run_then(
            |s| s.depth().map(|d| d.items),
            move |r| sent.send(r).unwrap(),
        );
        assert_eq!(recv(&rx).unwrap().unwrap(), 0);
        let sent = tx.clone();
        writer.run_then(
            |_| -> usize { panic!("boom") },
            move |r| sent.send(r.map(|_| 0).map(Ok)).unwrap(),
        );
        assert!(recv(&rx).is_err(), "the panic is handed to the caller");
        // The writer goes on after the panic.
        assert_eq!(
            writer
                .with_store(|s| s.depth().map(|d| d.items))
                .unwrap()
                .unwrap(),
            0
        );
        writer.close().unwrap();
        let (closed_tx, closed_rx) = mpsc::channel::<()>();
        writer.run_then(|_| 1, move |_| drop(closed_tx));
        assert!(
            matches!(
                closed_rx.recv_timeout(Duration::from_secs(10)),
                Err(mpsc::RecvTimeoutError::Disconnected)
            ),
            "after close the reply is dropped unrun"
        );
    }

    #[test]
    fn after_a_failed_flush_every_job_is_refused_with_why() {
        let dir = tempfile::tempdir().unwrap();
        let writer = StoreWriter::new(file_store(&dir, StoreConfig::default())).unwrap();
        writer.enqueue(msg("l", 0), at(0)).unwrap();
        assert!(writer.failure().is_none());
        // What `commit_group` does when the flush fails (a disk's I/O error cannot be
        // made to happen here).
        writer.owner.shared.fail("EIO".into());
        assert!(matches!(
            writer.enqueue(msg("l", 1), at(0)),
            Err(StoreError::FlushFailed(why)) if why == "EIO"
        ));
        assert!(matches!(
            writer.with_store(|s| s.depth()),
            Err(StoreError::FlushFailed(_))
        ));
        let (tx, rx) = mpsc::channel::<()>();
        writer.run_then(|s| s.depth().map(|d| d.items), move |_| drop(tx));
        assert!(
            matches!(
                rx.recv_timeout(Duration::from_secs(10)),
                Err(mpsc::RecvTimeoutError::Disconnected)
            ),
            "a task is dropped unrun"
        );
        assert!(matches!(writer.failure(), Some(StoreError::FlushFailed(_))));
        writer.close().unwrap();
        let store = file_store(&dir, StoreConfig::default());
        assert_eq!(
            store.list(None).unwrap().len(),
            1,
            "only the first was stored"
        );
    }
}
