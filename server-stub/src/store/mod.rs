//! The storage interface: everything the server keeps, behind one trait with two
//! engines.
//!
//! - [`sqlite`]: the embedded default, one file in the data directory, one process.
//! - [`postgres`]: `DATABASE_URL=postgres://…`, several instances sharing one database.
//!
//! Domain code (messaging, rooms, transactions, reconciliation, the HTTP handlers)
//! holds an `Arc<dyn Storage>` and never sees SQL. What is the same on both engines
//! lives beside the trait: an event's JSON is written by [`crate::log::Draft`], an
//! audit entry is sealed by [`crate::audit`], reconciliation is core's engine; an
//! engine only stores and reads.
//!
//! **After the commit.** An engine reports what it committed to the [`Feed`]: the
//! events it appended (the feed hands them to the log's in-memory tail and to the live
//! connections, in sequence order) and the room memberships it changed. A caller hears
//! of a write only after its commit, so a client is never told of something that is not
//! stored.
//!
//! **Never on the async workers.** Every call is `async`: SQLite runs its statements on
//! its own threads (one writer, a pool of readers, each call handed over), PostgreSQL
//! on its connections. A slow disk or a long query (verifying the whole audit chain,
//! counting rows for `/health`) never blocks a Tokio worker.

pub(crate) mod postgres;
pub(crate) mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use webwaka_realtime::protocol::{
    AuditLogEntry, ClaimedEvent, DlqEntry, ReconciliationRequest, ReconciliationResponse,
};
use webwaka_realtime::reconcile::{EntityState, Reconciler};

use crate::audit::{AuditRecord, ChainCheck};
use crate::error::{JobError, StoreError};
use crate::feed::Feed;
use crate::log::{Appended, Draft, Stored, Viewer};
use crate::transactions::{Decision, PendingTransaction, StoredStatus, Submission, Submitted};

/// Which engine a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Embedded SQLite (the default).
    Sqlite,
    /// PostgreSQL (`DATABASE_URL`).
    Postgres,
}

impl Engine {
    /// `sqlite` or `postgres`, as metrics and `/health` name it.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Sqlite => "sqlite",
            Engine::Postgres => "postgres",
        }
    }
}

/// A room membership: `user` of `tenant` is in `room`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Membership {
    pub(crate) tenant: String,
    pub(crate) user: String,
    pub(crate) room: String,
}

/// A claim's parameters, already checked.
#[derive(Debug, Clone)]
pub(crate) struct Claim {
    pub(crate) tenant: String,
    pub(crate) group: String,
    pub(crate) consumer_id: String,
    pub(crate) max: u32,
    pub(crate) visibility_ms: i64,
    /// The event types wanted (`None`: all).
    pub(crate) event_types: Option<Vec<String>>,
}

/// How many times a reconciliation is prepared beside the storage's lock before it is
/// prepared under it (see [`crate::reconcile`]).
pub(crate) const OPTIMISTIC_ROUNDS: usize = 3;

/// Why an expired lease is dead-lettered.
pub(crate) const LEASE_EXPIRED: &str = "lease expired without ack";

/// A tenant's consumer-group deliveries, for the dashboard.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct GroupDeliveries {
    /// Per group and state (`leased`, `pending`, `acked`, `dead`): events, and how many
    /// times they were delivered in all.
    pub(crate) counts: Vec<GroupCount>,
    /// Leases held and redeliveries waiting (at most [`OPEN_DELIVERIES`]), by group and
    /// sequence.
    pub(crate) open: Vec<OpenDelivery>,
}

/// Open deliveries listed per tenant.
pub(crate) const OPEN_DELIVERIES: u32 = 200;

/// Events of a group in one state.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct GroupCount {
    pub(crate) group: String,
    pub(crate) state: String,
    pub(crate) events: i64,
    pub(crate) deliveries: i64,
}

/// A lease held, or a redelivery waiting.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OpenDelivery {
    pub(crate) group: String,
    pub(crate) seq: i64,
    pub(crate) event_id: String,
    pub(crate) state: String,
    pub(crate) delivery_count: i64,
    pub(crate) consumer_id: Option<String>,
    pub(crate) lease_expires_ms: Option<i64>,
}

/// What `/health` and `/metrics` read from storage.
#[derive(Debug, Clone, Default)]
pub(crate) struct StorageFigures {
    /// Events in the log.
    pub(crate) log_length: i64,
    /// Consumer groups.
    pub(crate) consumer_groups: i64,
    /// DLQ entries.
    pub(crate) dlq_size: i64,
    /// Stored entities.
    pub(crate) entities: i64,
    /// Bytes the database takes.
    pub(crate) database_bytes: i64,
}

/// The answer to a queued append ([`Storage::queue_append`]); closed unanswered when
/// the store's writer stopped.
pub(crate) type PendingAppend = tokio::sync::oneshot::Receiver<Result<Appended, JobError>>;

/// Everything the server keeps. Implemented by [`sqlite::SqliteStore`] and
/// [`postgres::PgStore`]; the protocol behaves the same on both (the server's
/// integration tests run against each).
#[async_trait]
pub(crate) trait Storage: Send + Sync + 'static {
    /// Which engine this is.
    fn engine(&self) -> Engine;

    // ---- The durable log (PROTOCOL.md §3 "Delivery", §4 polling and publishing).

    /// Appends `draft` to `tenant`'s log with the tenant's next sequence, unless it is a
    /// duplicate (a sender's `messageId` or a publisher's `eventId` stored before: then
    /// the stored one is answered and nothing is appended). Reports the event to the
    /// feed after the commit.
    async fn append(&self, tenant: &str, draft: Draft) -> Result<Appended, JobError> {
        self.queue_append(tenant, draft)
            .await?
            .await
            .map_err(|_| JobError::Store(StoreError::WriterGone))?
    }

    /// [`Storage::append`] in two steps: queues the append and returns once it is
    /// queued, with the answer to await. Appends are stored, and answered, in the
    /// order they were queued, so a caller (a connection sending several messages) can
    /// queue the next before the last is answered. Dropping the answer does not cancel
    /// the append.
    async fn queue_append(&self, tenant: &str, draft: Draft) -> Result<PendingAppend, JobError>;

    /// The sequence and creation time of event `event_id`, if stored.
    async fn cursor(&self, tenant: &str, event_id: &str) -> Result<Option<(u64, i64)>, StoreError>;

    /// Up to `limit` events after `after` created at or after `cutoff_ms` that `viewer`
    /// may see, in sequence order.
    async fn visible_after(
        &self,
        tenant: &str,
        viewer: Viewer<'_>,
        after: u64,
        cutoff_ms: i64,
        limit: u32,
    ) -> Result<Vec<Stored>, StoreError>;

    /// The last sequence handed out in `tenant`'s log (0: none).
    async fn last_seq(&self, tenant: &str) -> Result<u64, StoreError>;

    /// Deletes events created before `cutoff_ms` (a chunk at a time) and the
    /// consumer-group deliveries that pointed at them. Returns how many events went.
    async fn purge(&self, cutoff_ms: i64) -> Result<u64, StoreError>;

    // ---- Rooms.

    /// Stores that `membership` begins (`joined`) or ends; the feed learns of it after
    /// the commit (on every instance).
    async fn set_membership(&self, membership: Membership, joined: bool) -> Result<(), StoreError>;

    // ---- Consumer groups and the DLQ (PROTOCOL.md §6 "Consumer groups").

    /// Leases up to `claim.max` events to the group: first those waiting for
    /// redelivery, then new ones, in sequence order. Leases are exclusive.
    async fn claim(
        &self,
        claim: Claim,
        now_ms: i64,
        max_retries: u32,
    ) -> Result<Vec<ClaimedEvent>, JobError>;

    /// Acknowledges `event_ids` for the group; how many were leased to it.
    async fn ack(
        &self,
        tenant: &str,
        group: &str,
        event_ids: Vec<String>,
    ) -> Result<u64, StoreError>;

    /// Expires every lease that ran out before `now_ms`; how many went to the DLQ.
    async fn expire_leases(&self, now_ms: i64, max_retries: u32) -> Result<u64, StoreError>;

    /// The tenant's DLQ entries (of one group when given), oldest first.
    async fn dlq(&self, tenant: &str, group: Option<&str>) -> Result<Vec<DlqEntry>, StoreError>;

    /// Makes a DLQ entry's event claimable again by its group; (group, eventId).
    async fn replay(&self, tenant: &str, dlq_id: &str) -> Result<(String, String), JobError>;

    /// Events not yet acked (or dead-lettered), per (tenant, group).
    async fn lag(&self) -> Result<Vec<(String, String, i64)>, StoreError>;

    /// The tenant's deliveries per group and state, and its open leases (the dashboard).
    async fn deliveries(&self, tenant: &str) -> Result<GroupDeliveries, StoreError>;

    // ---- Entities (PROTOCOL.md §5).

    /// One stored entity, if it exists.
    async fn entity(
        &self,
        tenant: &str,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<EntityState>, StoreError>;

    /// Applies a checked reconciliation request with `reconciler` (all or nothing);
    /// versions are assigned in commit order per tenant.
    async fn reconcile(
        &self,
        tenant: &str,
        request: ReconciliationRequest,
        last_known: Option<u64>,
        reconciler: Arc<Reconciler>,
    ) -> Result<ReconciliationResponse, JobError>;

    // ---- Class D transactions (PROTOCOL.md §6 "Transactions").

    /// Stores a submission (idempotent by tenant, user and key) with its audit record;
    /// a new transaction is held by `owner` for `lease_ms`.
    async fn submit_transaction(
        &self,
        submission: Submission,
        owner: &str,
        lease_ms: i64,
    ) -> Result<Submitted, JobError>;

    /// Takes up to `limit` pending transactions for `owner` to process: those no one
    /// holds, or whose holder's lease ran out. Each is held by `owner` for `lease_ms`.
    async fn take_pending(
        &self,
        owner: &str,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<PendingTransaction>, StoreError>;

    /// Extends `owner`'s hold of a pending transaction by `lease_ms` from now.
    async fn renew_lease(
        &self,
        owner: &str,
        transaction_id: &str,
        lease_ms: i64,
    ) -> Result<(), StoreError>;

    /// Lets go of every pending transaction `owner` holds (at shutdown: the next
    /// instance to look takes them at once).
    async fn release(&self, owner: &str) -> Result<(), StoreError>;

    /// Stores `decision` for a pending transaction (status, audit record, and the
    /// durable event to the submitter) once: false when it was decided already.
    async fn decide(
        &self,
        pending: &PendingTransaction,
        decision: Decision,
    ) -> Result<bool, JobError>;

    /// A transaction of `tenant`, as stored.
    async fn transaction(
        &self,
        tenant: &str,
        transaction_id: &str,
    ) -> Result<Option<StoredStatus>, StoreError>;

    // ---- The audit log (INV-003).

    /// Appends `record` to the hash chain.
    async fn audit(&self, record: AuditRecord) -> Result<AuditLogEntry, StoreError>;

    /// The entries that concern `tenant`, newest first, with `sequence < before`.
    async fn audit_page(
        &self,
        tenant: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<AuditLogEntry>, StoreError>;

    /// Recomputes the whole chain.
    async fn audit_verify(&self) -> Result<ChainCheck, StoreError>;

    // ---- Operations.

    /// Figures for `/health` and `/metrics`.
    async fn figures(&self) -> Result<StorageFigures, StoreError>;

    /// True when a write can be committed now (for `/health`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// The connection pool's (size, idle, waiting), for engines that have one.
    fn pool_status(&self) -> Option<(usize, usize, usize)> {
        None
    }

    /// Finishes what is queued and closes (the writer's queue, the pool).
    async fn shutdown(&self);
}

/// Opens the engine `config` names: PostgreSQL when `DATABASE_URL` is set (with
/// `node`'s notices to send in `outbox`), else the SQLite file in the data directory.
pub(crate) async fn open(
    config: &crate::config::Config,
    feed: Arc<Feed>,
    node: Arc<crate::cluster::Node>,
    outbox: tokio::sync::mpsc::UnboundedReceiver<String>,
) -> Result<Arc<dyn Storage>, StoreError> {
    match config.database_url.as_deref() {
        Some(url) => Ok(Arc::new(
            postgres::PgStore::open(url, config, feed, node, outbox).await?,
        )),
        None => Ok(Arc::new(sqlite::SqliteStore::open(config, feed)?)),
    }
}
