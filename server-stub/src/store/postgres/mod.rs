//! The PostgreSQL engine (`DATABASE_URL=postgres://…`): the same state as the SQLite
//! file, in a database that several server instances share.
//!
//! - **Client and pool:** `tokio-postgres` (pipelined, prepared statements cached per
//!   connection) with `deadpool-postgres`. Every session gets a `statement_timeout`
//!   (`DATABASE_STATEMENT_TIMEOUT_MS`) and, when set, `synchronous_commit`.
//! - **Schema:** refinery migrations, applied in turns ([`schema`]).
//! - **The log:** appends lock the tenant's counter row to their commit, so sequences
//!   become visible in order; durable messages are committed in groups ([`append`]).
//! - **Between instances:** every append notifies the others (`LISTEN`/`NOTIFY`); each
//!   instance's listener hands the events to its feed, which fans them out live in
//!   order; a periodic look at every tenant's head catches whatever a lost
//!   notification missed ([`listen`]).
//! - **Locks instead of one writer:** a consumer group's row is locked for a claim
//!   (leases are exclusive), a transaction's row for its decision (decided once), the
//!   tenant's entity counter for a reconciliation (versions in commit order), and a
//!   transaction-scoped advisory lock for the audit chain's head (one chain).
//! - **Failures:** a database that cannot be reached, is restarting or refuses
//!   connections is [`StoreError::Unavailable`] (503 with `Retry-After`); deadlocks and
//!   serialization failures run the transaction again.

pub(super) mod append;
mod listen;
mod schema;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use webwaka_realtime::protocol::{
    AuditLogEntry, ClaimedEvent, ConsumerInfo, DlqEntry, Event, ReconciliationRequest,
    ReconciliationResponse, TransactionAccepted, TransactionState, TransactionStatus,
};
use webwaka_realtime::reconcile::{EntityKey, EntityState, Reconciler};

use self::append::AppendJob;
use super::{Claim, Engine, LEASE_EXPIRED, Membership, PendingAppend, Storage, StorageFigures};
use crate::audit::{AuditRecord, ChainCheck, ChainVerifier, GENESIS_HASH, entry_from_row, seal};
use crate::cluster::Node;
use crate::config::{Config, SynchronousCommit};
use crate::error::{ApiError, JobError, StoreError};
use crate::feed::Feed;
use crate::log::{Draft, Stored, Viewer};
use crate::tail::TailEvent;
use crate::time::{ms_to_time, now_ms};
use crate::transactions::{
    Decision, PendingTransaction, StoredStatus, Submission, Submitted, conflict_record,
    decision_event, decision_parts, new_transaction_id, parse_state, pending_from_request,
    submit_record,
};

/// Runs of a transaction before a deadlock or serialization failure is given up on.
const MAX_ATTEMPTS: u32 = 5;
/// The transaction-scoped advisory lock on the audit chain's head ("audit" in ASCII).
const AUDIT_LOCK: i64 = 0x0061_7564_6974;
/// Appends queued for the appender before senders wait.
const APPEND_QUEUE: usize = 8192;

/// Classifies a PostgreSQL error: the database gone or restarting is retryable
/// ([`StoreError::Unavailable`]), a deadlock or serialization failure runs again
/// ([`StoreError::Conflict`]), a value refused is [`StoreError::DataRefused`], anything
/// else is a failed statement.
pub(crate) fn pg_error(error: tokio_postgres::Error) -> StoreError {
    let Some(state) = error.code() else {
        // No SQLSTATE: the connection (closed, refused, timed out, I/O).
        return StoreError::Unavailable(error.to_string());
    };
    let code = state.code();
    if *state == SqlState::T_R_SERIALIZATION_FAILURE || *state == SqlState::T_R_DEADLOCK_DETECTED {
        StoreError::Conflict(error.to_string())
    } else if code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || *state == SqlState::QUERY_CANCELED
        || *state == SqlState::READ_ONLY_SQL_TRANSACTION
    {
        StoreError::Unavailable(error.to_string())
    } else if code.starts_with("22") {
        StoreError::DataRefused(error.to_string())
    } else {
        StoreError::Postgres(error.to_string())
    }
}

/// A connection that could not be had from the pool.
fn pool_error(error: deadpool_postgres::PoolError) -> StoreError {
    match error {
        deadpool_postgres::PoolError::Backend(error) => pg_error(error),
        other => StoreError::Unavailable(format!("no database connection: {other}")),
    }
}

/// Errors a transaction can end with: they tell whether it should run again.
pub(super) trait Retry {
    /// True for a deadlock or serialization failure.
    fn is_conflict(&self) -> bool;
}

impl Retry for StoreError {
    fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict(_))
    }
}

impl Retry for JobError {
    fn is_conflict(&self) -> bool {
        matches!(self, JobError::Store(StoreError::Conflict(_)))
    }
}

/// Runs `$body` (an expression using the transaction `$tx`) in a transaction from
/// `$pool` and commits; runs it again (up to `MAX_ATTEMPTS`) on a deadlock or
/// serialization failure. Evaluates to the body's result.
macro_rules! retry_transaction {
    ($pool:expr, |$tx:ident| $body:expr) => {{
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let mut client = match $pool.get().await {
                Ok(client) => client,
                Err(error) => break Err($crate::store::postgres::pool_error_of(error).into()),
            };
            let $tx = match client.transaction().await {
                Ok(tx) => tx,
                Err(error) => break Err($crate::store::postgres::pg_error(error).into()),
            };
            let result = $body;
            match result {
                Ok(value) => match $tx.commit().await {
                    Ok(()) => break Ok(value),
                    Err(error) => {
                        let error = $crate::store::postgres::pg_error(error);
                        if $crate::store::postgres::Retry::is_conflict(&error)
                            && attempt < $crate::store::postgres::max_attempts()
                        {
                            continue;
                        }
                        break Err(error.into());
                    }
                },
                Err(error) => {
                    let _ = $tx.rollback().await;
                    if $crate::store::postgres::Retry::is_conflict(&error)
                        && attempt < $crate::store::postgres::max_attempts()
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(
                            u64::from(attempt) * 5,
                        ))
                        .await;
                        continue;
                    }
                    break Err(error);
                }
            }
        }
    }};
}
pub(crate) use retry_transaction;

/// [`pool_error`], for the macro.
pub(crate) fn pool_error_of(error: deadpool_postgres::PoolError) -> StoreError {
    pool_error(error)
}

/// [`MAX_ATTEMPTS`], for the macro.
pub(crate) const fn max_attempts() -> u32 {
    MAX_ATTEMPTS
}

/// The connection settings `url` and `config` describe.
fn pg_config(url: &str, config: &Config) -> Result<tokio_postgres::Config, StoreError> {
    let mut pg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| StoreError::Postgres(format!("DATABASE_URL is not a PostgreSQL URL: {e}")))?;
    let mut options = pg.get_options().unwrap_or_default().to_owned();
    options.push_str(&format!(
        " -c statement_timeout={}",
        config.database_statement_timeout_ms
    ));
    if let Some(sync) = config.database_synchronous_commit {
        let value = match sync {
            SynchronousCommit::On => "on",
            SynchronousCommit::Off => "off",
        };
        options.push_str(&format!(" -c synchronous_commit={value}"));
    }
    pg.options(options.trim())
        .application_name("webwaka-server-stub")
        .connect_timeout(Duration::from_millis(config.database_connect_timeout_ms))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10));
    Ok(pg)
}

/// The PostgreSQL store.
pub(crate) struct PgStore {
    pool: Pool,
    feed: Arc<Feed>,
    instance: Arc<str>,
    appends: std::sync::Mutex<Option<mpsc::Sender<AppendJob>>>,
    appender: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Reconciliation rounds outside the locks before one under them.
    rounds: usize,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl PgStore {
    /// Connects, migrates, starts listening to the other instances and the appender.
    /// Fails with a one-line error when the database cannot be reached, refuses the
    /// credentials, or was migrated by a newer server.
    pub(crate) async fn open(
        url: &str,
        config: &Config,
        feed: Arc<Feed>,
        node: Arc<Node>,
        outbox: mpsc::UnboundedReceiver<String>,
    ) -> Result<Self, StoreError> {
        let pg = pg_config(url, config)?;
        schema::migrate(&pg).await?;
        let manager = Manager::from_config(
            pg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let connect = Duration::from_millis(config.database_connect_timeout_ms);
        let pool = Pool::builder(manager)
            .max_size(config.database_pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(connect))
            .create_timeout(Some(connect))
            .recycle_timeout(Some(connect))
            .build()
            .map_err(|e| StoreError::Postgres(format!("connection pool: {e}")))?;
        let instance: Arc<str> = node.instance().into();
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        // Listening first: nothing committed after the baseline is missed.
        let (ready_tx, ready) = oneshot::channel();
        tasks.spawn(listen::run(listen::Listener {
            config: pg,
            feed: Arc::clone(&feed),
            node,
            instance: Arc::clone(&instance),
            stop: stop.clone(),
            ready: Some(ready_tx),
        }));
        tasks.spawn(listen::send(pool.clone(), outbox, stop.clone()));
        ready
            .await
            .map_err(|_| StoreError::Unavailable("the listener stopped".into()))??;
        tasks.spawn(listen::catch_up(
            pool.clone(),
            Arc::clone(&feed),
            Duration::from_millis(config.cluster_catch_up_ms),
            stop.clone(),
        ));
        let (appends, queue) = mpsc::channel(APPEND_QUEUE);
        let appender = tokio::spawn(append::appender(
            pool.clone(),
            Arc::clone(&feed),
            Arc::clone(&instance),
            queue,
        ));
        Ok(Self {
            pool,
            feed,
            instance,
            appends: std::sync::Mutex::new(Some(appends)),
            appender: std::sync::Mutex::new(Some(appender)),
            rounds: if config.reconciliation_parallel {
                super::OPTIMISTIC_ROUNDS
            } else {
                0
            },
            stop,
            tasks,
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Runs one query on a pooled connection and returns its rows.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(pg_error)?;
        client.query(&stmt, params).await.map_err(pg_error)
    }
}

/// Appends `record` to the audit chain inside `tx`: the head is read under a
/// transaction-scoped advisory lock, so concurrent writers on every instance make one
/// chain.
async fn audit_in(
    tx: &deadpool_postgres::Transaction<'_>,
    record: AuditRecord,
) -> Result<AuditLogEntry, StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_LOCK])
        .await
        .map_err(pg_error)?;
    let head = tx
        .prepare_cached("SELECT sequence, hash FROM audit_log ORDER BY sequence DESC LIMIT 1")
        .await
        .map_err(pg_error)?;
    let (last, prev) = match tx.query_opt(&head, &[]).await.map_err(pg_error)? {
        Some(row) => (row.get::<_, i64>(0) as u64, row.get::<_, String>(1)),
        None => (0, GENESIS_HASH.to_owned()),
    };
    let (entry, content) = seal(record, last, prev)?;
    let insert = tx
        .prepare_cached(
            "INSERT INTO audit_log (sequence, audit_id, tenant_id, target_tenant_id, body, hash, prev_hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .await
        .map_err(pg_error)?;
    tx.execute(
        &insert,
        &[
            &(entry.sequence as i64),
            &entry.audit_id,
            &entry.tenant_id,
            &entry.target_tenant_id,
            &content,
            &entry.hash,
            &entry.prev_hash,
        ],
    )
    .await
    .map_err(pg_error)?;
    Ok(entry)
}

/// A stored row as the tail keeps it (columns: seq, event_id, created_ms, recipient,
/// room, sender, body).
fn tail_event(row: &tokio_postgres::Row) -> TailEvent {
    TailEvent {
        seq: row.get::<_, i64>(0) as u64,
        event_id: row.get::<_, String>(1).into(),
        created_ms: row.get(2),
        recipient: row.get::<_, Option<String>>(3).map(Into::into),
        room: row.get::<_, Option<String>>(4).map(Into::into),
        sender: row.get::<_, Option<String>>(5).map(Into::into),
        body: Arc::new(row.get(6)),
    }
}

/// Up to `limit` events of `tenant` after `after` (the feed's catch-up).
pub(super) async fn events_after(
    pool: &Pool,
    tenant: &str,
    after: u64,
    limit: u32,
) -> Result<Vec<TailEvent>, StoreError> {
    let client = pool.get().await.map_err(pool_error)?;
    let stmt = client
        .prepare_cached(
            "SELECT seq, event_id, created_ms, recipient_id, room_id, sender_id, body FROM events
             WHERE tenant = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .await
        .map_err(pg_error)?;
    let rows = client
        .query(&stmt, &[&tenant, &(after as i64), &i64::from(limit)])
        .await
        .map_err(pg_error)?;
    Ok(rows.iter().map(tail_event).collect())
}

/// The last sequence of every tenant's log.
pub(super) async fn heads(
    client: &tokio_postgres::Client,
) -> Result<Vec<(String, u64)>, StoreError> {
    let rows = client
        .query("SELECT tenant, last_seq FROM tenant_seq", &[])
        .await
        .map_err(pg_error)?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
        .collect())
}

/// The stored JSON of `keys` (a pooled connection or a transaction; in a transaction
/// the rows are locked to its end).
async fn read_entities<C: deadpool_postgres::GenericClient>(
    client: &C,
    tenant: &str,
    keys: &[EntityKey],
) -> Result<crate::reconcile::Read, StoreError> {
    let (types, ids): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(t, i)| (t.as_str(), i.as_str())).unzip();
    let rows = client
        .query(
            "SELECT e.entity_type, e.entity_id, e.state FROM entities e
             JOIN unnest($2::text[], $3::text[]) AS k(t, i)
               ON e.entity_type = k.t AND e.entity_id = k.i
             WHERE e.tenant = $1
             ORDER BY e.entity_type, e.entity_id
             FOR UPDATE OF e",
            &[&tenant, &types, &ids],
        )
        .await
        .map_err(pg_error)?;
    let mut read: crate::reconcile::Read = keys.iter().map(|k| (k.clone(), None)).collect();
    for row in rows {
        read.insert((row.get(0), row.get(1)), Some(row.get(2)));
    }
    Ok(read)
}

/// Prepares `request` on `read` on a blocking thread (the engine is CPU work).
async fn prepare_off(
    reconciler: &Arc<Reconciler>,
    read: crate::reconcile::Read,
    request: &Arc<ReconciliationRequest>,
) -> Result<crate::reconcile::Prepared, JobError> {
    let (reconciler, request) = (Arc::clone(reconciler), Arc::clone(request));
    tokio::task::spawn_blocking(move || {
        crate::reconcile::prepare(&reconciler, read, &request, chrono::Utc::now())
    })
    .await
    .map_err(|_| JobError::Refused(ApiError::internal()))?
    .map_err(|error| match error {
        crate::reconcile::PrepareError::Refused(refusal) => JobError::Refused(refusal),
        crate::reconcile::PrepareError::Stored(error) => JobError::Store(StoreError::Json(error)),
    })
}

/// Every stored membership.
pub(super) async fn memberships(
    client: &tokio_postgres::Client,
) -> Result<Vec<Membership>, StoreError> {
    let rows = client
        .query("SELECT tenant, user_id, room_id FROM room_members", &[])
        .await
        .map_err(pg_error)?;
    Ok(rows
        .iter()
        .map(|r| Membership {
            tenant: r.get(0),
            user: r.get(1),
            room: r.get(2),
        })
        .collect())
}

/// Expires the leases that ran out before `now_ms` (of one group, or all), skipping
/// rows another instance is expiring at the same moment. Returns how many went to
/// the DLQ.
async fn expire_in(
    tx: &deadpool_postgres::Transaction<'_>,
    scope: Option<(&str, &str)>,
    now_ms: i64,
    max_retries: u32,
) -> Result<u64, StoreError> {
    let (tenant, grp) = scope.unwrap_or(("", ""));
    let find = tx
        .prepare_cached(
            "SELECT d.tenant, d.grp, d.seq, d.event_id, d.delivery_count, d.consumer_id,
                    d.first_failed_ms, COALESCE(d.body, e.body)
             FROM group_deliveries d
             LEFT JOIN events e ON e.tenant = d.tenant AND e.seq = d.seq
             WHERE d.state = 'leased' AND d.lease_expires_ms <= $1
               AND ($2 = '' OR (d.tenant = $2 AND d.grp = $3))
             FOR UPDATE OF d SKIP LOCKED",
        )
        .await
        .map_err(pg_error)?;
    let rows = tx
        .query(&find, &[&now_ms, &tenant, &grp])
        .await
        .map_err(pg_error)?;
    let mut dead = 0;
    for row in rows {
        let (tenant, grp, seq): (String, String, i64) = (row.get(0), row.get(1), row.get(2));
        let event_id: String = row.get(3);
        let count: i64 = row.get(4);
        let consumer: Option<String> = row.get(5);
        let first_failed: i64 = row.get::<_, Option<i64>>(6).unwrap_or(now_ms);
        let body: Option<String> = row.get(7);
        let Some(body) = body else {
            // The event is gone (retention): nothing left to deliver.
            tx.execute(
                "DELETE FROM group_deliveries WHERE tenant = $1 AND grp = $2 AND seq = $3",
                &[&tenant, &grp, &seq],
            )
            .await
            .map_err(pg_error)?;
            continue;
        };
        if count > i64::from(max_retries) {
            tx.execute(
                "UPDATE group_deliveries SET state = 'dead', lease_expires_ms = NULL,
                        first_failed_ms = $4, last_failed_ms = $5
                 WHERE tenant = $1 AND grp = $2 AND seq = $3",
                &[&tenant, &grp, &seq, &first_failed, &now_ms],
            )
            .await
            .map_err(pg_error)?;
            tx.execute(
                "INSERT INTO dlq (dlq_id, tenant, grp, seq, event_id, body, failure_reason,
                                  retry_count, first_failed_ms, last_failed_ms, consumer_id, created_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $10)",
                &[
                    &format!("dlq-{}", uuid::Uuid::now_v7()),
                    &tenant,
                    &grp,
                    &seq,
                    &event_id,
                    &body,
                    &LEASE_EXPIRED,
                    &count,
                    &first_failed,
                    &now_ms,
                    &consumer.unwrap_or_default(),
                ],
            )
            .await
            .map_err(pg_error)?;
            dead += 1;
        } else {
            tx.execute(
                "UPDATE group_deliveries SET state = 'pending', lease_expires_ms = NULL,
                        first_failed_ms = $4, last_failed_ms = $5
                 WHERE tenant = $1 AND grp = $2 AND seq = $3",
                &[&tenant, &grp, &seq, &first_failed, &now_ms],
            )
            .await
            .map_err(pg_error)?;
        }
    }
    Ok(dead)
}

/// Leases events to a group, under the group's row lock (claims are exclusive).
async fn claim_in(
    tx: &deadpool_postgres::Transaction<'_>,
    claim: &Claim,
    now_ms: i64,
    max_retries: u32,
) -> Result<Vec<ClaimedEvent>, JobError> {
    let (tenant, grp) = (claim.tenant.as_str(), claim.group.as_str());
    tx.execute(
        "INSERT INTO consumer_groups (tenant, grp, created_ms, scan_from) VALUES ($1, $2, $3, 0)
         ON CONFLICT (tenant, grp) DO NOTHING",
        &[&tenant, &grp, &now_ms],
    )
    .await
    .map_err(pg_error)?;
    let scan_from: i64 = tx
        .query_one(
            "SELECT scan_from FROM consumer_groups WHERE tenant = $1 AND grp = $2 FOR UPDATE",
            &[&tenant, &grp],
        )
        .await
        .map_err(pg_error)?
        .get(0);
    expire_in(tx, Some((tenant, grp)), now_ms, max_retries).await?;
    let limit = i64::from(claim.max);
    let types: Option<Vec<String>> = claim.event_types.clone();
    // (seq, body, is_redelivery)
    let mut candidates: Vec<(i64, String, bool)> = Vec::new();
    let pending = tx
        .prepare_cached(
            "SELECT d.seq, COALESCE(d.body, e.body) AS b
             FROM group_deliveries d
             LEFT JOIN events e ON e.tenant = d.tenant AND e.seq = d.seq
             WHERE d.tenant = $1 AND d.grp = $2 AND d.state = 'pending'
               AND COALESCE(d.body, e.body) IS NOT NULL
               AND ($3::text[] IS NULL
                    OR (COALESCE(d.body, e.body)::json ->> 'eventType') = ANY($3))
             ORDER BY d.seq LIMIT $4",
        )
        .await
        .map_err(pg_error)?;
    for row in tx
        .query(&pending, &[&tenant, &grp, &types, &limit])
        .await
        .map_err(pg_error)?
    {
        candidates.push((row.get(0), row.get(1), true));
    }
    let fresh = tx
        .prepare_cached(
            "SELECT e.seq, e.body FROM events e
             WHERE e.tenant = $1 AND e.seq > $2
               AND NOT EXISTS (SELECT 1 FROM group_deliveries d
                               WHERE d.tenant = e.tenant AND d.grp = $3 AND d.seq = e.seq)
               AND ($4::text[] IS NULL OR e.event_type = ANY($4))
             ORDER BY e.seq LIMIT $5",
        )
        .await
        .map_err(pg_error)?;
    for row in tx
        .query(&fresh, &[&tenant, &scan_from, &grp, &types, &limit])
        .await
        .map_err(pg_error)?
    {
        candidates.push((row.get(0), row.get(1), false));
    }
    candidates.sort_by_key(|(seq, _, _)| *seq);
    candidates.truncate(claim.max as usize);
    let lease_until = now_ms.saturating_add(claim.visibility_ms);
    let mut out = Vec::with_capacity(candidates.len());
    let mut new_scan = None;
    for (seq, body, redelivery) in candidates {
        let event: Event = serde_json::from_str(&body).map_err(StoreError::from)?;
        let count: i64 =
            if redelivery {
                tx.query_one(
                    "UPDATE group_deliveries
                 SET state = 'leased', delivery_count = delivery_count + 1,
                     consumer_id = $4, lease_expires_ms = $5
                 WHERE tenant = $1 AND grp = $2 AND seq = $3
                 RETURNING delivery_count",
                    &[&tenant, &grp, &seq, &claim.consumer_id, &lease_until],
                )
                .await
                .map_err(pg_error)?
                .get(0)
            } else {
                tx.execute(
                "INSERT INTO group_deliveries (tenant, grp, seq, event_id, state, delivery_count,
                                               consumer_id, lease_expires_ms)
                 VALUES ($1, $2, $3, $4, 'leased', 1, $5, $6)",
                &[&tenant, &grp, &seq, &event.event_id, &claim.consumer_id, &lease_until],
            )
            .await
            .map_err(pg_error)?;
                new_scan = Some(seq);
                1
            };
        out.push(ClaimedEvent {
            event,
            delivery_count: u32::try_from(count).unwrap_or(u32::MAX),
            lease_expires_at: ms_to_time(lease_until),
        });
    }
    if claim.event_types.is_none()
        && let Some(seq) = new_scan
    {
        tx.execute(
            "UPDATE consumer_groups SET scan_from = $3 WHERE tenant = $1 AND grp = $2",
            &[&tenant, &grp, &seq],
        )
        .await
        .map_err(pg_error)?;
    }
    Ok(out)
}

#[async_trait]
impl Storage for PgStore {
    fn engine(&self) -> Engine {
        Engine::Postgres
    }

    async fn queue_append(&self, tenant: &str, draft: Draft) -> Result<PendingAppend, JobError> {
        let (reply, answer) = oneshot::channel();
        let queue = self
            .appends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(StoreError::WriterGone)?;
        queue
            .send(AppendJob {
                tenant: tenant.to_owned(),
                draft,
                reply,
            })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        Ok(answer)
    }

    async fn cursor(&self, tenant: &str, event_id: &str) -> Result<Option<(u64, i64)>, StoreError> {
        let rows = self
            .query(
                "SELECT seq, created_ms FROM events WHERE tenant = $1 AND event_id = $2",
                &[&tenant, &event_id],
            )
            .await?;
        Ok(rows
            .first()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1))))
    }

    async fn visible_after(
        &self,
        tenant: &str,
        viewer: Viewer<'_>,
        after: u64,
        cutoff_ms: i64,
        limit: u32,
    ) -> Result<Vec<Stored>, StoreError> {
        let (user, everything) = match viewer {
            Viewer::User(user) => (user, false),
            Viewer::Everything => ("", true),
        };
        let rows = self
            .query(
                "SELECT seq, event_id, body FROM events
                 WHERE tenant = $1 AND seq > $2 AND created_ms >= $5
                   AND ($6 OR (recipient_id IS NULL AND room_id IS NULL)
                        OR recipient_id = $3 OR sender_id = $3
                        OR room_id IN (SELECT room_id FROM room_members
                                       WHERE tenant = $1 AND user_id = $3))
                 ORDER BY seq LIMIT $4",
                &[
                    &tenant,
                    &(after as i64),
                    &user,
                    &i64::from(limit),
                    &cutoff_ms,
                    &everything,
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Stored {
                seq: r.get::<_, i64>(0) as u64,
                event_id: r.get::<_, String>(1).into(),
                body: Arc::new(r.get(2)),
            })
            .collect())
    }

    async fn last_seq(&self, tenant: &str) -> Result<u64, StoreError> {
        let rows = self
            .query(
                "SELECT last_seq FROM tenant_seq WHERE tenant = $1",
                &[&tenant],
            )
            .await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0) as u64))
    }

    async fn purge(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        // tenant_seq is the counter: deleting old events never moves it.
        let rows = self
            .query(
                "WITH gone AS (
                     DELETE FROM events WHERE (tenant, seq) IN
                       (SELECT tenant, seq FROM events WHERE created_ms < $1 LIMIT 5000)
                     RETURNING tenant, seq),
                 deliveries AS (
                     DELETE FROM group_deliveries d USING gone g
                     WHERE d.body IS NULL AND d.tenant = g.tenant AND d.seq = g.seq)
                 SELECT count(*) FROM gone",
                &[&cutoff_ms],
            )
            .await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0) as u64))
    }

    async fn set_membership(&self, m: Membership, joined: bool) -> Result<(), StoreError> {
        // A joiner is in the hub before the commit, so that no room message committed
        // after the join can pass them by; a failed join takes it back.
        let was_member = self.feed.is_member(&m);
        let before = self.feed.sharing(&m);
        if joined {
            self.feed.membership_after(&m, true, None);
        }
        let notice = listen::membership_notice(&self.instance, &m, joined);
        let result: Result<(), StoreError> = retry_transaction!(self.pool, |tx| {
            let sql = if joined {
                "INSERT INTO room_members (tenant, user_id, room_id, joined_ms)
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING"
            } else {
                "DELETE FROM room_members
                 WHERE tenant = $1 AND user_id = $2 AND room_id = $3 AND $4::int8 IS NOT NULL"
            };
            let changed = async {
                tx.execute(sql, &[&m.tenant, &m.user, &m.room, &now_ms()])
                    .await
                    .map_err(pg_error)?;
                tx.execute(
                    "SELECT pg_notify($1, $2)",
                    &[&listen::CLUSTER_CHANNEL, &notice],
                )
                .await
                .map_err(pg_error)?;
                Ok::<_, StoreError>(())
            };
            changed.await
        });
        match result {
            Ok(()) => {
                self.feed.membership_after(&m, joined, Some(&before));
                Ok(())
            }
            Err(error) => {
                if joined && !was_member {
                    self.feed.membership(&m, false);
                }
                Err(error)
            }
        }
    }

    async fn claim(
        &self,
        claim: Claim,
        now_ms: i64,
        max_retries: u32,
    ) -> Result<Vec<ClaimedEvent>, JobError> {
        retry_transaction!(self.pool, |tx| claim_in(&tx, &claim, now_ms, max_retries)
            .await)
    }

    async fn ack(
        &self,
        tenant: &str,
        group: &str,
        event_ids: Vec<String>,
    ) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE group_deliveries SET state = 'acked', lease_expires_ms = NULL
                 WHERE tenant = $1 AND grp = $2 AND event_id = ANY($3)
                   AND state IN ('leased', 'pending')",
                &[&tenant, &group, &event_ids],
            )
            .await
            .map_err(pg_error)?;
        Ok(n)
    }

    async fn expire_leases(&self, now_ms: i64, max_retries: u32) -> Result<u64, StoreError> {
        retry_transaction!(self.pool, |tx| expire_in(&tx, None, now_ms, max_retries)
            .await)
    }

    async fn dlq(&self, tenant: &str, group: Option<&str>) -> Result<Vec<DlqEntry>, StoreError> {
        let rows = self
            .query(
                "SELECT dlq_id, body, failure_reason, retry_count, first_failed_ms,
                        last_failed_ms, consumer_id, grp
                 FROM dlq WHERE tenant = $1 AND ($2::text IS NULL OR grp = $2)
                 ORDER BY created_ms, dlq_id LIMIT 1000",
                &[&tenant, &group],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let body: String = row.get(1);
            out.push(DlqEntry {
                dlq_id: row.get(0),
                original_event: serde_json::from_str(&body)?,
                failure_reason: row.get(2),
                failure_stack_trace: None,
                retry_count: u32::try_from(row.get::<_, i64>(3)).unwrap_or(u32::MAX),
                first_failed_at: ms_to_time(row.get(4)),
                last_failed_at: ms_to_time(row.get(5)),
                consumer_info: ConsumerInfo {
                    consumer_id: row.get(6),
                    consumer_group: Some(row.get(7)),
                },
            });
        }
        Ok(out)
    }

    async fn replay(&self, tenant: &str, dlq_id: &str) -> Result<(String, String), JobError> {
        retry_transaction!(self.pool, |tx| {
            let work = async {
                let Some(entry) = tx
                    .query_opt(
                        "DELETE FROM dlq WHERE tenant = $1 AND dlq_id = $2
                         RETURNING grp, seq, event_id, body",
                        &[&tenant, &dlq_id],
                    )
                    .await
                    .map_err(pg_error)?
                else {
                    return Err(JobError::Refused(ApiError::not_found(format!(
                        "no DLQ entry {dlq_id:?}"
                    ))));
                };
                let (grp, seq, event_id, body): (String, i64, String, String) =
                    (entry.get(0), entry.get(1), entry.get(2), entry.get(3));
                tx.execute(
                    "INSERT INTO group_deliveries (tenant, grp, seq, event_id, state, delivery_count, body)
                     VALUES ($1, $2, $3, $4, 'pending', 0, $5)
                     ON CONFLICT (tenant, grp, seq) DO UPDATE SET
                        state = 'pending', delivery_count = 0, consumer_id = NULL,
                        lease_expires_ms = NULL, first_failed_ms = NULL, last_failed_ms = NULL,
                        body = excluded.body",
                    &[&tenant, &grp, &seq, &event_id, &body],
                )
                .await
                .map_err(pg_error)?;
                Ok((grp, event_id))
            };
            work.await
        })
    }

    async fn lag(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let rows = self
            .query(
                "SELECT g.tenant, g.grp,
                        (SELECT count(*) FROM events e WHERE e.tenant = g.tenant AND NOT EXISTS
                            (SELECT 1 FROM group_deliveries d
                             WHERE d.tenant = e.tenant AND d.grp = g.grp AND d.seq = e.seq
                               AND d.state IN ('acked', 'dead')))
                 FROM consumer_groups g",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    async fn deliveries(&self, tenant: &str) -> Result<crate::store::GroupDeliveries, StoreError> {
        use crate::store::{GroupCount, GroupDeliveries, OPEN_DELIVERIES, OpenDelivery};
        let counts = self
            .query(
                "SELECT grp, state, count(*), sum(delivery_count)::bigint FROM group_deliveries
                 WHERE tenant = $1 GROUP BY grp, state ORDER BY grp, state",
                &[&tenant],
            )
            .await?
            .iter()
            .map(|r| GroupCount {
                group: r.get(0),
                state: r.get(1),
                events: r.get(2),
                deliveries: r.get(3),
            })
            .collect();
        let open = self
            .query(
                "SELECT grp, seq, event_id, state, delivery_count, consumer_id, lease_expires_ms
                 FROM group_deliveries WHERE tenant = $1 AND state IN ('leased', 'pending')
                 ORDER BY grp, seq LIMIT $2",
                &[&tenant, &i64::from(OPEN_DELIVERIES)],
            )
            .await?
            .iter()
            .map(|r| OpenDelivery {
                group: r.get(0),
                seq: r.get(1),
                event_id: r.get(2),
                state: r.get(3),
                delivery_count: r.get(4),
                consumer_id: r.get(5),
                lease_expires_ms: r.get(6),
            })
            .collect();
        Ok(GroupDeliveries { counts, open })
    }

    async fn entity(
        &self,
        tenant: &str,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<EntityState>, StoreError> {
        let rows = self
            .query(
                "SELECT state FROM entities
                 WHERE tenant = $1 AND entity_type = $2 AND entity_id = $3",
                &[&tenant, &entity_type, &entity_id],
            )
            .await?;
        match rows.first() {
            None => Ok(None),
            Some(row) => Ok(Some(serde_json::from_str(row.get::<_, &str>(0))?)),
        }
    }

    async fn reconcile(
        &self,
        tenant: &str,
        request: ReconciliationRequest,
        last_known: Option<u64>,
        reconciler: Arc<Reconciler>,
    ) -> Result<ReconciliationResponse, JobError> {
        let request = Arc::new(request);
        let keys = crate::reconcile::touched(&request);
        // The engine outside any transaction, on a blocking thread, on the entities
        // as read; the commit locks the tenant's counter and the entities, and stores
        // only if they are unchanged. The last round prepares under those locks.
        for round in 0..=self.rounds {
            let locked = round == self.rounds;
            let mut prepared = if locked {
                None
            } else {
                let read = read_entities(&self.client().await?, tenant, &keys).await?;
                Some(prepare_off(&reconciler, read, &request).await?)
            };
            let answer: Result<Option<ReconciliationResponse>, JobError> = retry_transaction!(
                self.pool,
                |tx| {
                    let work = async {
                        // The tenant's counter, locked to the commit: versions in
                        // commit order.
                        let counter: i64 = tx
                            .query_one(
                                "INSERT INTO entity_counters (tenant, counter) VALUES ($1, 0)
                                 ON CONFLICT (tenant) DO UPDATE SET counter = entity_counters.counter
                                 RETURNING counter",
                                &[&tenant],
                            )
                            .await
                            .map_err(pg_error)?
                            .get(0);
                        let now = read_entities(&tx, tenant, &keys).await?;
                        // (Run again after a deadlock: prepared under the locks.)
                        let prepared = match prepared.take() {
                            Some(prepared) if prepared.is_current(&now) => prepared,
                            Some(_) => return Ok::<_, JobError>(None),
                            None => prepare_off(&reconciler, now, &request).await?,
                        };
                        let committed = prepared.commit(counter as u64);
                        let mut k_type = Vec::new();
                        let mut k_id = Vec::new();
                        let mut k_version = Vec::new();
                        let mut k_state = Vec::new();
                        let mut k_current = Vec::new();
                        for (key, state) in committed.to_store() {
                            k_type.push(key.0.as_str());
                            k_id.push(key.1.as_str());
                            k_version.push(state.version() as i64);
                            k_state.push(serde_json::to_string(state).map_err(StoreError::from)?);
                            k_current.push(
                                crate::reconcile::current_json(state).map_err(StoreError::from)?,
                            );
                        }
                        if !k_type.is_empty() {
                            tx.execute(
                                "INSERT INTO entities
                                     (tenant, entity_type, entity_id, version, state, current)
                                 SELECT $1, * FROM unnest($2::text[], $3::text[], $4::int8[],
                                                          $5::text[], $6::text[])
                                 ON CONFLICT (tenant, entity_type, entity_id)
                                 DO UPDATE SET version = excluded.version, state = excluded.state,
                                               current = excluded.current",
                                &[&tenant, &k_type, &k_id, &k_version, &k_state, &k_current],
                            )
                            .await
                            .map_err(pg_error)?;
                        }
                        if committed.applied.counter as i64 != counter {
                            tx.execute(
                                "UPDATE entity_counters SET counter = $2 WHERE tenant = $1",
                                &[&tenant, &(committed.applied.counter as i64)],
                            )
                            .await
                            .map_err(pg_error)?;
                        }
                        let after = last_known.map_or(0, |v| v.min(i64::MAX as u64) as i64);
                        let rows = tx
                            .query(
                                "SELECT coalesce(current, state) FROM entities
                                 WHERE tenant = $1 AND version > $2 ORDER BY version",
                                &[&tenant, &after],
                            )
                            .await
                            .map_err(pg_error)?;
                        let mut later = Vec::with_capacity(rows.len());
                        for row in rows {
                            later.push(
                                serde_json::from_str(row.get::<_, &str>(0))
                                    .map_err(StoreError::from)?,
                            );
                        }
                        Ok(Some(committed.respond(
                            tenant,
                            request.request_id.clone(),
                            later,
                        )))
                    };
                    work.await
                }
            );
            if let Some(answer) = answer? {
                return Ok(answer);
            }
        }
        Err(StoreError::Corrupt("entities changed under their locks".into()).into())
    }

    async fn submit_transaction(
        &self,
        s: Submission,
        owner: &str,
        lease_ms: i64,
    ) -> Result<Submitted, JobError> {
        retry_transaction!(self.pool, |tx| {
            let work = async {
                // One submission of a key at a time, on every instance.
                tx.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                    &[&format!(
                        "txn\u{1}{}\u{1}{}\u{1}{}",
                        s.tenant, s.user, s.key
                    )],
                )
                .await
                .map_err(pg_error)?;
                if let Some(row) = tx
                    .query_opt(
                        "SELECT transaction_id, body_hash, received_ms, submit_audit_id
                         FROM transactions
                         WHERE tenant = $1 AND user_id = $2 AND idempotency_key = $3",
                        &[&s.tenant, &s.user, &s.key],
                    )
                    .await
                    .map_err(pg_error)?
                {
                    let transaction_id: String = row.get(0);
                    let hash: String = row.get(1);
                    if hash == s.hash {
                        return Ok(Submitted::Replay(TransactionAccepted {
                            transaction_id,
                            status: TransactionState::Pending,
                            received_at: ms_to_time(row.get(2)),
                            audit_id: row.get(3),
                        }));
                    }
                    audit_in(&tx, conflict_record(&s, &transaction_id)).await?;
                    return Ok(Submitted::Conflict);
                }
                let transaction_id = new_transaction_id();
                let received = now_ms();
                let entry = audit_in(&tx, submit_record(&s, &transaction_id)).await?;
                tx.execute(
                    "INSERT INTO transactions (transaction_id, tenant, user_id, idempotency_key,
                                               body_hash, request, status, reason, received_ms,
                                               updated_ms, submit_audit_id, audit_id, owner,
                                               lease_until_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, 'PENDING', NULL, $7, $7, $8, $8, $9, $10)",
                    &[
                        &transaction_id,
                        &s.tenant,
                        &s.user,
                        &s.key,
                        &s.hash,
                        &s.request.to_string(),
                        &received,
                        &entry.audit_id,
                        &owner,
                        &received.saturating_add(lease_ms),
                    ],
                )
                .await
                .map_err(pg_error)?;
                Ok::<_, JobError>(Submitted::New(
                    TransactionAccepted {
                        transaction_id: transaction_id.clone(),
                        status: TransactionState::Pending,
                        received_at: ms_to_time(received),
                        audit_id: entry.audit_id,
                    },
                    PendingTransaction {
                        transaction_id,
                        tenant_id: s.tenant.clone(),
                        user_id: s.user.clone(),
                        transaction_type: s.transaction_type.clone(),
                        payload: s.payload.clone(),
                        metadata: s.metadata.clone(),
                    },
                ))
            };
            work.await
        })
    }

    async fn take_pending(
        &self,
        owner: &str,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<PendingTransaction>, StoreError> {
        let now = now_ms();
        let rows = self
            .query(
                "UPDATE transactions SET owner = $1, lease_until_ms = $2
                 WHERE transaction_id IN (
                     SELECT transaction_id FROM transactions
                     WHERE status = 'PENDING' AND (lease_until_ms IS NULL OR lease_until_ms < $3)
                     ORDER BY received_ms LIMIT $4
                     FOR UPDATE SKIP LOCKED)
                 RETURNING transaction_id, tenant, user_id, request",
                &[
                    &owner,
                    &now.saturating_add(lease_ms),
                    &now,
                    &i64::from(limit),
                ],
            )
            .await?;
        rows.iter()
            .map(|r| pending_from_request(r.get(0), r.get(1), r.get(2), r.get::<_, &str>(3)))
            .collect()
    }

    async fn renew_lease(
        &self,
        owner: &str,
        transaction_id: &str,
        lease_ms: i64,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE transactions SET lease_until_ms = $3
                 WHERE transaction_id = $1 AND owner = $2 AND status = 'PENDING'",
                &[&transaction_id, &owner, &now_ms().saturating_add(lease_ms)],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn release(&self, owner: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE transactions SET owner = NULL, lease_until_ms = NULL
                 WHERE owner = $1 AND status = 'PENDING'",
                &[&owner],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn decide(
        &self,
        pending: &PendingTransaction,
        decision: Decision,
    ) -> Result<bool, JobError> {
        let instance = Arc::clone(&self.instance);
        let outcome = retry_transaction!(self.pool, |tx| {
            let work = async {
                let status: Option<String> = tx
                    .query_opt(
                        "SELECT status FROM transactions WHERE transaction_id = $1 FOR UPDATE",
                        &[&pending.transaction_id],
                    )
                    .await
                    .map_err(pg_error)?
                    .map(|r| r.get(0));
                if status.as_deref() != Some("PENDING") {
                    return Ok(None);
                }
                let parts = decision_parts(pending, decision.clone());
                let entry = audit_in(&tx, parts.record).await?;
                let updated = now_ms();
                tx.execute(
                    "UPDATE transactions SET status = $2, reason = $3, updated_ms = $4,
                            audit_id = $5, owner = NULL, lease_until_ms = NULL
                     WHERE transaction_id = $1",
                    &[
                        &pending.transaction_id,
                        &parts.state.as_str(),
                        &parts.reason,
                        &updated,
                        &entry.audit_id,
                    ],
                )
                .await
                .map_err(pg_error)?;
                let status = TransactionStatus {
                    transaction_id: pending.transaction_id.clone(),
                    status: parts.state,
                    reason: parts.reason,
                    updated_at: ms_to_time(updated),
                    audit_id: entry.audit_id,
                };
                let draft = decision_event(pending, parts.event_type, &status)?;
                let appends =
                    append::append_in(&tx, &instance, &[(pending.tenant_id.clone(), draft)])
                        .await?;
                Ok::<_, JobError>(Some(appends))
            };
            work.await
        })?;
        match outcome {
            None => Ok(false),
            Some(mut appends) => {
                appends.publish(&self.feed);
                Ok(true)
            }
        }
    }

    async fn transaction(
        &self,
        tenant: &str,
        transaction_id: &str,
    ) -> Result<Option<StoredStatus>, StoreError> {
        let rows = self
            .query(
                "SELECT user_id, status, reason, updated_ms, audit_id FROM transactions
                 WHERE transaction_id = $1 AND tenant = $2",
                &[&transaction_id, &tenant],
            )
            .await?;
        rows.first()
            .map(|r| {
                Ok(StoredStatus {
                    user_id: r.get(0),
                    status: parse_state(r.get::<_, &str>(1))?,
                    reason: r.get(2),
                    updated_ms: r.get(3),
                    audit_id: r.get(4),
                })
            })
            .transpose()
    }

    async fn audit(&self, record: AuditRecord) -> Result<AuditLogEntry, StoreError> {
        retry_transaction!(self.pool, |tx| audit_in(&tx, record.clone()).await)
    }

    async fn audit_page(
        &self,
        tenant: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<AuditLogEntry>, StoreError> {
        let before = before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
        let rows = self
            .query(
                "SELECT body, hash, prev_hash FROM audit_log
                 WHERE (tenant_id = $1 OR target_tenant_id = $1) AND sequence < $2
                 ORDER BY sequence DESC LIMIT $3",
                &[&tenant, &before, &i64::from(limit)],
            )
            .await?;
        rows.iter()
            .map(|r| entry_from_row(r.get::<_, &str>(0), r.get(1), r.get(2)))
            .collect()
    }

    async fn audit_verify(&self) -> Result<ChainCheck, StoreError> {
        verify_on(&self.pool).await
    }

    async fn figures(&self) -> Result<StorageFigures, StoreError> {
        let rows = self
            .query(
                "SELECT
                   (SELECT CASE WHEN reltuples > 100000 THEN reltuples::int8
                                ELSE (SELECT count(*) FROM events) END
                      FROM pg_class WHERE oid = 'events'::regclass),
                   (SELECT count(*) FROM consumer_groups),
                   (SELECT count(*) FROM dlq),
                   (SELECT CASE WHEN reltuples > 100000 THEN reltuples::int8
                                ELSE (SELECT count(*) FROM entities) END
                      FROM pg_class WHERE oid = 'entities'::regclass),
                   pg_database_size(current_database())",
                &[],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Postgres("no figures".into()))?;
        Ok(StorageFigures {
            log_length: row.get(0),
            consumer_groups: row.get(1),
            dlq_size: row.get(2),
            entities: row.get(3),
            database_bytes: row.get(4),
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        // A read-write transaction, as a write would need (a standby refuses).
        client
            .batch_execute("BEGIN READ WRITE; SELECT 1; COMMIT")
            .await
            .map_err(pg_error)
    }

    fn pool_status(&self) -> Option<(usize, usize, usize)> {
        let status = self.pool.status();
        Some((status.size, status.available, status.waiting))
    }

    async fn shutdown(&self) {
        // The appender finishes what is queued, then the listeners stop.
        drop(
            self.appends
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        let appender = self
            .appender
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(appender) = appender {
            let _ = tokio::time::timeout(Duration::from_secs(5), appender).await;
        }
        self.tasks.close();
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
        self.pool.close();
    }
}

/// Recomputes the audit chain, a page of rows at a time.
async fn verify_on(pool: &Pool) -> Result<ChainCheck, StoreError> {
    const PAGE: i64 = 1000;
    let client = pool.get().await.map_err(pool_error)?;
    let stmt = client
        .prepare_cached(
            "SELECT sequence, body, hash, prev_hash FROM audit_log
             WHERE sequence > $1 ORDER BY sequence LIMIT $2",
        )
        .await
        .map_err(pg_error)?;
    let mut verifier = ChainVerifier::default();
    let mut after = 0i64;
    loop {
        let rows = client
            .query(&stmt, &[&after, &PAGE])
            .await
            .map_err(pg_error)?;
        for row in &rows {
            let sequence: i64 = row.get(0);
            verifier.row(
                sequence as u64,
                row.get::<_, &str>(1),
                row.get(2),
                row.get::<_, &str>(3),
            );
            after = sequence;
        }
        if rows.len() < PAGE as usize {
            break;
        }
    }
    Ok(verifier.finish())
}

/// Verifies the audit chain of the database at `url` (the `verify-audit` command).
pub(crate) async fn verify_audit(url: &str, config: &Config) -> Result<ChainCheck, StoreError> {
    let pg = pg_config(url, config)?;
    let pool = Pool::builder(Manager::new(pg, NoTls))
        .max_size(1)
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| StoreError::Postgres(format!("connection pool: {e}")))?;
    verify_on(&pool).await
}
