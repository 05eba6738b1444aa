//! The embedded SQLite database: one writer thread, a few reader connections, and the
//! schema.
//!
//! **One writer.** Every change goes through [`Db::write`], which hands a closure to a
//! dedicated thread that owns the only write connection. The thread takes every job
//! waiting in its queue, runs each in its own savepoint inside one transaction, and
//! commits once (group commit): many concurrent writers cost one commit, and a job that
//! fails is rolled back alone. Only after the commit does the thread run the jobs'
//! *effects* (live fan-out to WebSocket connections), in commit order, and then answer
//! the callers. So a client never hears of something that is not stored, and deliveries
//! leave in sequence order.
//!
//! **Readers.** Reads (polls, snapshots, audit pages) use a small pool of read-only
//! connections directly on the calling task: SQLite in WAL mode lets them run beside the
//! writer, and a short indexed read is cheaper than a hop to another thread.
//!
//! **Checkpoints** (folding the WAL into the database file, which syncs it) run on a
//! thread of their own, so that no commit waits for the disk.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags};
use rusqlite_migration::{M, Migrations};
use tokio::sync::oneshot;

use crate::config::Durability;
use crate::error::{JobError, StoreError};

/// Most jobs committed together.
const MAX_BATCH: usize = 512;
/// Read connections in the pool.
const READERS: usize = 4;
/// How long the checkpointer gathers commits before a checkpoint.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// WAL pages after which the writer checkpoints by itself (backstop; 40 MiB).
const WRITER_AUTOCHECKPOINT: i64 = 10_000;

/// The schema, as numbered migrations (never edit one that shipped; add a new one).
const MIGRATIONS: &[&str] = &[
    r#"
-- The last sequence handed out per tenant (kept even when retention empties the log).
CREATE TABLE tenant_seq (
    tenant   TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL
) WITHOUT ROWID;

-- The durable log: every durable message and bus event of every tenant.
-- Audience: recipient_id (a user), room_id (a room's members), or neither (the whole
-- tenant); the sender always sees what it sent.
CREATE TABLE events (
    tenant       TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    event_id     TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    created_ms   INTEGER NOT NULL,
    recipient_id TEXT,
    room_id      TEXT,
    sender_id    TEXT,
    message_id   TEXT,
    body         TEXT NOT NULL,
    PRIMARY KEY (tenant, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX events_by_id ON events (tenant, event_id);
CREATE UNIQUE INDEX events_by_message ON events (tenant, sender_id, message_id)
    WHERE message_id IS NOT NULL;
CREATE INDEX events_by_time ON events (created_ms);

-- Room membership belongs to the user (survives reconnects and restarts).
CREATE TABLE room_members (
    tenant    TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    room_id   TEXT NOT NULL,
    joined_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, user_id, room_id)
) WITHOUT ROWID;

-- Consumer groups and their deliveries (state: leased, pending, acked, dead).
CREATE TABLE consumer_groups (
    tenant     TEXT NOT NULL,
    grp        TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    scan_from  INTEGER NOT NULL,
    PRIMARY KEY (tenant, grp)
) WITHOUT ROWID;
CREATE TABLE group_deliveries (
    tenant           TEXT NOT NULL,
    grp              TEXT NOT NULL,
    seq              INTEGER NOT NULL,
    event_id         TEXT NOT NULL,
    state            TEXT NOT NULL,
    delivery_count   INTEGER NOT NULL,
    consumer_id      TEXT,
    lease_expires_ms INTEGER,
    first_failed_ms  INTEGER,
    last_failed_ms   INTEGER,
    body             TEXT,
    PRIMARY KEY (tenant, grp, seq)
) WITHOUT ROWID;
CREATE INDEX deliveries_by_state ON group_deliveries (tenant, grp, state, seq);
CREATE INDEX deliveries_by_lease ON group_deliveries (state, lease_expires_ms);
CREATE TABLE dlq (
    dlq_id          TEXT PRIMARY KEY,
    tenant          TEXT NOT NULL,
    grp             TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    event_id        TEXT NOT NULL,
    body            TEXT NOT NULL,
    failure_reason  TEXT NOT NULL,
    retry_count     INTEGER NOT NULL,
    first_failed_ms INTEGER NOT NULL,
    last_failed_ms  INTEGER NOT NULL,
    consumer_id     TEXT NOT NULL,
    created_ms      INTEGER NOT NULL
);
CREATE INDEX dlq_by_tenant ON dlq (tenant, created_ms);

-- Reconciliation: core's EntityState per entity, as JSON, and the tenant counter.
CREATE TABLE entities (
    tenant      TEXT NOT NULL,
    entity_type TEXT NOT NULL,
    entity_id   TEXT NOT NULL,
    version     INTEGER NOT NULL,
    state       TEXT NOT NULL,
    PRIMARY KEY (tenant, entity_type, entity_id)
) WITHOUT ROWID;
CREATE INDEX entities_by_version ON entities (tenant, version);
CREATE TABLE entity_counters (
    tenant  TEXT PRIMARY KEY,
    counter INTEGER NOT NULL
) WITHOUT ROWID;

-- Class D transactions; the idempotency key is scoped to tenant and user.
CREATE TABLE transactions (
    transaction_id  TEXT PRIMARY KEY,
    tenant          TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    body_hash       TEXT NOT NULL,
    request         TEXT NOT NULL,
    status          TEXT NOT NULL,
    reason          TEXT,
    received_ms     INTEGER NOT NULL,
    updated_ms      INTEGER NOT NULL,
    submit_audit_id TEXT NOT NULL,
    audit_id        TEXT NOT NULL
);
CREATE UNIQUE INDEX transactions_by_key ON transactions (tenant, user_id, idempotency_key);
CREATE INDEX transactions_by_status ON transactions (status);

-- The audit log: one hash chain per server, append-only.
CREATE TABLE audit_log (
    sequence         INTEGER PRIMARY KEY,
    audit_id         TEXT NOT NULL UNIQUE,
    tenant_id        TEXT NOT NULL,
    target_tenant_id TEXT,
    body             TEXT NOT NULL,
    hash             TEXT NOT NULL,
    prev_hash        TEXT NOT NULL
);
CREATE INDEX audit_by_tenant ON audit_log (tenant_id, sequence);
CREATE INDEX audit_by_target ON audit_log (target_tenant_id, sequence);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"#,
    r#"
-- What a user may see, by audience, in log order: a poll or a resume reads its own
-- events through these instead of scanning every event of the tenant after its cursor.
CREATE INDEX events_by_recipient ON events (tenant, recipient_id, seq)
    WHERE recipient_id IS NOT NULL;
CREATE INDEX events_by_room ON events (tenant, room_id, seq)
    WHERE room_id IS NOT NULL;
CREATE INDEX events_by_sender ON events (tenant, sender_id, seq)
    WHERE sender_id IS NOT NULL;
CREATE INDEX events_to_everyone ON events (tenant, seq)
    WHERE recipient_id IS NULL AND room_id IS NULL;
"#,
    r#"
-- Undone: every durable message paid two more scattered index pages per commit (by
-- recipient and by sender), which cost more than the polls they sped up.
DROP INDEX events_by_recipient;
DROP INDEX events_by_room;
DROP INDEX events_by_sender;
DROP INDEX events_to_everyone;
"#,
    r#"
-- Idempotency by (sender, messageId), with the message id first: the SDK's ids are
-- UUIDv7, so new entries land at the index's right edge (one page per commit) instead
-- of a page per sender; a lookup names all three columns either way.
DROP INDEX events_by_message;
CREATE UNIQUE INDEX events_by_message_id ON events (tenant, message_id, sender_id)
    WHERE message_id IS NOT NULL;
"#,
    r#"
-- Who is processing a pending transaction, and until when (several instances share a
-- PostgreSQL database; one SQLite file has one server, which takes them all at start).
ALTER TABLE transactions ADD COLUMN owner TEXT;
ALTER TABLE transactions ADD COLUMN lease_until_ms INTEGER;
"#,
    r#"
-- An entity's current value, version and clock, beside its whole state: what a
-- reconciliation answer lists for the entities changed after the client's version,
-- read without the retained history (NULL in rows stored before: the state is read).
ALTER TABLE entities ADD COLUMN current TEXT;
"#,
];

/// What the writer thread remembers between jobs. Cleared whenever a job or a commit
/// fails, so it never outlives a rollback.
#[derive(Debug, Default)]
pub(crate) struct WriterCache {
    /// Last sequence per tenant.
    pub(crate) tenant_seq: HashMap<String, u64>,
    /// Last audit entry: (sequence, hash).
    pub(crate) audit_head: Option<(u64, String)>,
}

/// Something to do after the batch is committed (live fan-out).
type Effect = Box<dyn FnOnce() + Send>;

/// What one job can touch: the write connection (inside the batch's transaction), the
/// cache, and the list of effects to run after the commit.
pub(crate) struct Writer<'a> {
    /// The write connection, inside the job's savepoint.
    pub(crate) conn: &'a Connection,
    /// State kept between jobs.
    pub(crate) cache: &'a mut WriterCache,
    effects: Vec<Effect>,
}

impl Writer<'_> {
    /// Runs `effect` after the batch is committed (not at all if this job fails).
    pub(crate) fn after_commit(&mut self, effect: impl FnOnce() + Send + 'static) {
        self.effects.push(Box::new(effect));
    }
}

/// A job's answer, sent once the batch's fate is known (`None`: committed).
type Reply = Box<dyn FnOnce(Option<String>) + Send>;
/// One job on the writer's queue.
type Job = Box<dyn FnOnce(&mut Writer<'_>) -> (bool, Reply) + Send>;

/// A job and whether it runs in a savepoint of its own (see [`Db::queue`]).
struct Queued {
    job: Job,
    guarded: bool,
}

enum Msg {
    Job(Queued),
    Stop(std::sync::mpsc::Sender<()>),
}

/// The database: the writer's queue and the reader pool.
pub(crate) struct Db {
    queue: Mutex<Option<mpsc::Sender<Msg>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a connection leaves it usable; carry on.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn open_connection(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let sync = match durability {
        Durability::Normal => "NORMAL",
        Durability::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    stable_plans(&conn)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Turns on SQLite's query planner stability guarantee: plans never depend on bound
/// values. Without it (the bundled SQLite has STAT4), a statement whose plan looked at
/// a bound value (a `LIMIT ?`, a `?6 OR …`) is re-prepared on every run after a new
/// binding, which made a cached poll query cost as much as parsing it afresh.
fn stable_plans(conn: &Connection) -> Result<(), StoreError> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

/// Brings the schema at `conn` up to date.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let migrations = Migrations::new(MIGRATIONS.iter().map(|sql| M::up(sql)).collect());
    migrations.to_latest(conn)?;
    Ok(())
}

impl Db {
    /// Opens (creating when needed) the database at `path` and starts the writer.
    pub(crate) fn open(path: &Path, durability: Durability) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)?;
        }
        let mut conn = open_connection(path, durability)?;
        migrate(&mut conn)?;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let reader = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            reader.busy_timeout(std::time::Duration::from_secs(5))?;
            stable_plans(&reader)?;
            reader.set_prepared_statement_cache_capacity(64);
            readers.push(Mutex::new(reader));
        }
        // Checkpoints run on their own thread and connection (see `checkpointer`).
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT)?;
        let checkpoint_conn = open_connection(path, durability)?;
        let (kick, kicked) = mpsc::sync_channel::<()>(1);
        let checkpointer = std::thread::Builder::new()
            .name("webwaka-db-checkpoint".into())
            .spawn(move || checkpointer(checkpoint_conn, kicked))?;
        let (tx, rx) = mpsc::channel::<Msg>();
        let thread = std::thread::Builder::new()
            .name("webwaka-db-writer".into())
            .spawn(move || writer_loop(conn, rx, kick, checkpointer))?;
        Ok(Self {
            queue: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            readers,
            next_reader: AtomicUsize::new(0),
        })
    }

    /// Runs `job` on the writer thread inside a transaction; its effects run after the
    /// commit, then the result comes back. A failed job changes nothing.
    pub(crate) async fn write<T, F>(&self, job: F) -> Result<T, JobError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Writer<'_>) -> Result<T, JobError> + Send + 'static,
    {
        self.submit(job, true).await
    }

    async fn submit<T, F>(&self, job: F, guarded: bool) -> Result<T, JobError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Writer<'_>) -> Result<T, JobError> + Send + 'static,
    {
        self.queue(job, guarded)?
            .await
            .map_err(|_| JobError::Store(StoreError::WriterGone))?
    }

    /// Queues `job` and returns its answer to await: jobs run, and are answered, in
    /// the order queued. `guarded`: as [`Db::write`], in a savepoint of its own.
    /// Unguarded is for a job whose writes are a single statement, after which it
    /// cannot fail (a durable message's append): a failed statement undoes itself, so
    /// a failing job has written nothing; what is saved is the savepoint's copy of
    /// every page the job touches (with a savepoint per job, about a tenth of the
    /// writer's time per message). Should such a job panic anyway, the whole batch is
    /// rolled back and its jobs fail.
    pub(crate) fn queue<T, F>(
        &self,
        job: F,
        guarded: bool,
    ) -> Result<oneshot::Receiver<Result<T, JobError>>, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Writer<'_>) -> Result<T, JobError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, JobError>>();
        let boxed: Job = Box::new(move |writer| {
            let result = job(writer);
            let ok = result.is_ok();
            let reply: Reply = Box::new(move |commit_error| {
                let result = match (result, commit_error) {
                    (Ok(value), None) => Ok(value),
                    (Ok(_), Some(error)) => Err(StoreError::CommitFailed(error).into()),
                    (Err(error), _) => Err(error),
                };
                let _ = tx.send(result);
            });
            (ok, reply)
        });
        {
            let queue = lock(&self.queue);
            let sender = queue.as_ref().ok_or(StoreError::WriterGone)?;
            sender
                .send(Msg::Job(Queued {
                    job: boxed,
                    guarded,
                }))
                .map_err(|_| StoreError::WriterGone)?;
        }
        Ok(rx)
    }

    /// Runs `read` on a pooled read-only connection, on the calling thread.
    pub(crate) fn read<T>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        // Take a free connection if there is one; otherwise wait for "ours".
        for i in 0..self.readers.len() {
            let slot = &self.readers[(start + i) % self.readers.len()];
            if let Ok(conn) = slot.try_lock() {
                return read(&conn);
            }
        }
        let conn = lock(&self.readers[start % self.readers.len()]);
        read(&conn)
    }

    /// Stops the writer after the jobs already queued, checkpoints the WAL and waits
    /// for the thread. Later writes fail with [`StoreError::WriterGone`].
    pub(crate) fn shutdown(&self) {
        let sender = lock(&self.queue).take();
        if let Some(sender) = sender {
            let (ack_tx, ack_rx) = std::sync::mpsc::channel();
            if sender.send(Msg::Stop(ack_tx)).is_ok() {
                let _ = ack_rx.recv();
            }
        }
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn writer_loop(
    conn: Connection,
    rx: mpsc::Receiver<Msg>,
    kick: mpsc::SyncSender<()>,
    checkpointer: JoinHandle<()>,
) {
    let mut cache = WriterCache::default();
    let mut kick = Some(kick);
    let mut checkpointer = Some(checkpointer);
    loop {
        let mut stop = None;
        let mut batch = Vec::new();
        match rx.recv() {
            Ok(Msg::Job(job)) => batch.push(job),
            Ok(Msg::Stop(ack)) => stop = Some(ack),
            Err(_) => return,
        }
        while stop.is_none() && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Job(job)) => batch.push(job),
                Ok(Msg::Stop(ack)) => stop = Some(ack),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            run_batch(&conn, &mut cache, batch);
            // Tell the checkpointer the WAL grew (a full channel: it knows already).
            if let Some(kick) = &kick {
                let _ = kick.try_send(());
            }
        }
        if let Some(ack) = stop {
            // Stop the checkpointer, then fold the WAL back into the database file.
            drop(kick.take());
            if let Some(thread) = checkpointer.take() {
                let _ = thread.join();
            }
            if let Err(error) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
                tracing::warn!(%error, "WAL checkpoint at shutdown failed");
            }
            let _ = ack.send(());
            return;
        }
    }
}

/// Copies committed pages from the WAL into the database file, off the writer thread.
///
/// SQLite's automatic checkpoint runs inside the commit that crosses its threshold, and
/// a checkpoint syncs the database file: one commit in a thousand waited milliseconds
/// for the disk (the tail of every latency figure). Here the writer only kicks this
/// thread after its commits; it waits [`CHECKPOINT_EVERY`] to gather more, then runs a
/// passive checkpoint (never blocks the writer or readers) on its own connection. The
/// writer keeps a high automatic threshold ([`WRITER_AUTOCHECKPOINT`]) as a backstop in
/// case this thread falls behind. Ends when the writer drops its side.
fn checkpointer(conn: Connection, kicked: mpsc::Receiver<()>) {
    while kicked.recv().is_ok() {
        std::thread::sleep(CHECKPOINT_EVERY);
        if let Err(error) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(%error, "WAL checkpoint failed");
        }
    }
}

/// Runs one transaction-control statement (`BEGIN`, `SAVEPOINT`, …) from the statement
/// cache: they run for every job, and parsing them each time cost more than running.
fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Runs a batch of jobs: in one transaction, committed once, then the effects of what
/// was committed, then the answers. (In more than one transaction only when SQLite
/// undid one by itself or a job without a savepoint panicked: see [`run_transaction`].)
fn run_batch(conn: &Connection, cache: &mut WriterCache, batch: Vec<Queued>) {
    let mut jobs = batch.into_iter().peekable();
    // Bounded: each round takes at least one job off the queue (or all of them).
    while jobs.peek().is_some() {
        run_transaction(conn, cache, &mut jobs);
    }
}

/// Forgets what the writer remembers: after anything was rolled back.
fn forget(cache: &mut WriterCache) {
    cache.tenant_seq.clear();
    cache.audit_head = None;
}

/// Runs jobs from `jobs` in one transaction until there are no more, then commits.
///
/// Stops early, failing the jobs it ran (nothing of theirs is committed, fanned out or
/// acknowledged) and leaving the rest to the next transaction, when the transaction is
/// gone: SQLite may roll a whole transaction back by itself on some errors (`FULL`,
/// `IOERR`, `NOMEM`, `BUSY`), and a job without a savepoint that panicked left unknown
/// writes, so it is rolled back here. No job ever runs outside a transaction: one that
/// did would commit on its own, unseen by the log's tail and the live fan-out.
fn run_transaction(
    conn: &Connection,
    cache: &mut WriterCache,
    jobs: &mut std::iter::Peekable<std::vec::IntoIter<Queued>>,
) {
    if let Err(error) = exec(conn, "BEGIN IMMEDIATE") {
        tracing::error!(%error, "cannot begin a write transaction");
        forget(cache);
        // Run nothing. A job's answer is made by running it, so the jobs are dropped:
        // their callers see WriterGone.
        jobs.for_each(drop);
        return;
    }
    let mut effects: Vec<Effect> = Vec::new();
    let mut replies: Vec<Reply> = Vec::new();
    let mut lost = None;
    for Queued { job, guarded } in jobs.by_ref() {
        if guarded && exec(conn, "SAVEPOINT job").is_err() {
            // Cannot isolate the job: skip it (its caller sees WriterGone).
            if conn.is_autocommit() {
                lost = Some("the transaction was lost");
                break;
            }
            continue;
        }
        let mut writer = Writer {
            conn,
            cache: &mut *cache,
            effects: Vec::new(),
        };
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut writer)));
        let job_effects = std::mem::take(&mut writer.effects);
        let failed = match (outcome, guarded) {
            (Ok((true, reply)), guarded) => {
                if guarded {
                    let _ = exec(conn, "RELEASE job");
                }
                effects.extend(job_effects);
                replies.push(reply);
                false
            }
            (Ok((false, reply)), guarded) => {
                // Without a savepoint, its one statement failed and undid itself.
                if guarded {
                    let _ = exec(conn, "ROLLBACK TO job").and_then(|()| exec(conn, "RELEASE job"));
                }
                replies.push(reply);
                true
            }
            (Err(_), true) => {
                tracing::error!("a storage job panicked; it was rolled back");
                let _ = exec(conn, "ROLLBACK TO job").and_then(|()| exec(conn, "RELEASE job"));
                true
            }
            (Err(_), false) => {
                tracing::error!("a storage job panicked; its transaction was rolled back");
                let _ = conn.execute_batch("ROLLBACK");
                lost = Some("the transaction was rolled back: a job panicked");
                break;
            }
        };
        if failed {
            forget(cache);
            if conn.is_autocommit() {
                tracing::error!("SQLite rolled the transaction back after a failed job");
                lost = Some("the transaction was rolled back by SQLite after an error");
                break;
            }
        }
    }
    if let Some(why) = lost {
        forget(cache);
        for reply in replies {
            reply(Some(why.to_owned()));
        }
        return;
    }
    match exec(conn, "COMMIT") {
        Ok(()) => {
            for effect in effects {
                // One effect's panic must not cost the others (the log's tail, the
                // fan-out of other events).
                if std::panic::catch_unwind(AssertUnwindSafe(effect)).is_err() {
                    tracing::error!("an after-commit effect panicked");
                }
            }
            for reply in replies {
                reply(None);
            }
        }
        Err(error) => {
            tracing::error!(%error, "commit failed");
            let _ = conn.execute_batch("ROLLBACK");
            forget(cache);
            for reply in replies {
                reply(Some(error.to_string()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;

    /// Stores a row in `tenant_seq` (a table with a unique key, handy to write to).
    fn put(conn: &Connection, key: &str, n: i64) -> Result<(), JobError> {
        conn.execute(
            "INSERT INTO tenant_seq VALUES (?1, ?2)",
            rusqlite::params![key, n],
        )?;
        Ok(())
    }

    /// Rows in `tenant_seq`.
    fn count(db: &Db) -> i64 {
        db.read(|c| Ok(c.query_row("SELECT count(*) FROM tenant_seq", [], |r| r.get(0))?))
            .unwrap()
    }

    #[tokio::test]
    async fn a_failed_job_is_rolled_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.sqlite3"), Durability::Normal).unwrap();
        db.write(|w| put(w.conn, "a", 1)).await.unwrap();
        let failed = db
            .write(|w| {
                put(w.conn, "b", 1)?;
                Err::<(), _>(JobError::Refused(crate::error::ApiError::internal()))
            })
            .await;
        assert!(failed.is_err());
        assert_eq!(count(&db), 1);
        // The audit log refuses updates.
        let update = db
            .write(|w| {
                w.conn.execute(
                    "INSERT INTO audit_log VALUES (1, 'a', 't', NULL, '{}', 'h', 'p')",
                    [],
                )?;
                w.conn.execute("UPDATE audit_log SET body = 'x'", [])?;
                Ok(())
            })
            .await;
        assert!(update.is_err());
        db.shutdown();
    }

    /// Each job's name and answer (`None`: committed).
    type Answers = Arc<Mutex<Vec<(char, Option<String>)>>>;

    /// A job for [`run_batch`] whose answer lands in `answers`.
    fn queued(
        guarded: bool,
        answers: &Answers,
        name: char,
        job: impl FnOnce(&Connection) -> Result<(), JobError> + Send + 'static,
    ) -> Queued {
        let answers = Arc::clone(answers);
        Queued {
            guarded,
            job: Box::new(move |w: &mut Writer<'_>| {
                let ok = job(w.conn).is_ok();
                let reply: Reply = Box::new(move |commit_error| {
                    let answer = if ok {
                        commit_error
                    } else {
                        Some("failed".into())
                    };
                    lock(&answers).push((name, answer));
                });
                (ok, reply)
            }),
        }
    }

    #[test]
    fn a_transaction_sqlite_undid_fails_its_jobs_and_the_rest_get_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sqlite3");
        Db::open(&path, Durability::Normal).unwrap().shutdown();
        let conn = Connection::open(&path).unwrap();
        let answers = Arc::new(Mutex::new(Vec::new()));
        let insert = |key: &'static str| move |c: &Connection| put(c, key, 1);
        let batch = vec![
            queued(false, &answers, 'a', insert("a")),
            queued(true, &answers, 'b', insert("b")),
            // As SQLite does on SQLITE_FULL or IOERR: the whole transaction is gone.
            queued(false, &answers, 'x', |c| {
                c.execute_batch("ROLLBACK")?;
                Err(JobError::Refused(crate::error::ApiError::internal()))
            }),
            queued(false, &answers, 'c', insert("c")),
            queued(true, &answers, 'd', insert("d")),
        ];
        run_batch(&conn, &mut WriterCache::default(), batch);
        let answers = lock(&answers).clone();
        let answer = |name| {
            answers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, a)| a.clone())
        };
        // a and b ran in the lost transaction: they fail (they are not stored); c and
        // d ran in a new one and are committed, neither of them on its own.
        assert!(matches!(answer('a'), Some(Some(_))), "{answers:?}");
        assert!(matches!(answer('b'), Some(Some(_))), "{answers:?}");
        assert!(matches!(answer('x'), Some(Some(_))), "{answers:?}");
        assert_eq!(answer('c'), Some(None), "{answers:?}");
        assert_eq!(answer('d'), Some(None), "{answers:?}");
        let mut stored = conn
            .prepare("SELECT tenant FROM tenant_seq ORDER BY tenant")
            .unwrap();
        let stored: Vec<String> = stored
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(stored, ["c", "d"]);
        assert!(conn.is_autocommit(), "no transaction left open");
    }

    /// Runs `job` without a savepoint of its own.
    async fn write_one<T: Send + 'static>(
        db: &Db,
        job: impl FnOnce(&mut Writer<'_>) -> Result<T, JobError> + Send + 'static,
    ) -> Result<T, JobError> {
        db.queue(job, false)?
            .await
            .map_err(|_| JobError::Store(StoreError::WriterGone))?
    }

    #[tokio::test]
    async fn unguarded_jobs_commit_fail_alone_and_a_panic_undoes_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.sqlite3"), Durability::Normal).unwrap();
        write_one(&db, |w| put(w.conn, "a", 1)).await.unwrap();
        // Its one statement fails (the key exists) and undoes itself.
        let failed = write_one(&db, |w| put(w.conn, "a", 2)).await;
        assert!(failed.is_err());
        assert_eq!(count(&db), 1);
        // A panic after a write: the job's batch is rolled back, the writer goes on.
        let panicked = write_one(&db, |w| -> Result<(), JobError> {
            put(w.conn, "b", 1)?;
            panic!("a bug after the write");
        })
        .await;
        assert!(panicked.is_err());
        assert_eq!(count(&db), 1);
        db.write(|w| put(w.conn, "c", 1)).await.unwrap();
        assert_eq!(count(&db), 2);
        db.shutdown();
    }
}
