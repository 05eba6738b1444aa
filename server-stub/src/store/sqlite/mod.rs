//! The SQLite engine: the server's default, one database file in the data directory.
//!
//! Writes go to one writer thread ([`db::Db::write`]) that commits many jobs together;
//! reads run on a pool of read-only connections on Tokio's blocking threads. The SQL
//! lives in one module per area: [`log`], [`bus`], [`entities`], [`transactions`],
//! [`audit`], rooms here.

pub(crate) mod audit;
mod bus;
pub(crate) mod db;
mod entities;
mod log;
mod transactions;

use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::{Connection, params};
use webwaka_realtime::protocol::{
    AuditLogEntry, ClaimedEvent, DlqEntry, ReconciliationRequest, ReconciliationResponse,
};
use webwaka_realtime::reconcile::{EntityState, Reconciler};

use self::db::Db;
use super::{Claim, Engine, Membership, PendingAppend, Storage, StorageFigures};
use crate::audit::{AuditRecord, ChainCheck};
use crate::config::Config;
use crate::error::{JobError, StoreError};
use crate::feed::Feed;
use crate::log::{Draft, Stored, Viewer};
use crate::time::now_ms;
use crate::transactions::{Decision, PendingTransaction, StoredStatus, Submission, Submitted};

/// The SQLite store.
pub(crate) struct SqliteStore {
    db: Arc<Db>,
    feed: Arc<Feed>,
    /// Reconciliation rounds beside the writer before one on it.
    rounds: usize,
}

impl SqliteStore {
    /// Opens (creating when needed) the database in `config`'s data directory.
    pub(crate) fn open(config: &Config, feed: Arc<Feed>) -> Result<Self, StoreError> {
        let db = Arc::new(Db::open(&config.database_path(), config.durability)?);
        // One file, one server: what an earlier run was processing is this run's.
        let conn = Connection::open(config.database_path())?;
        conn.execute(
            "UPDATE transactions SET owner = NULL, lease_until_ms = NULL
             WHERE status = 'PENDING'",
            [],
        )?;
        // The hub starts with every stored membership.
        let mut stmt = conn.prepare("SELECT tenant, user_id, room_id FROM room_members")?;
        let rows = stmt.query_map([], |row| {
            Ok(Membership {
                tenant: row.get(0)?,
                user: row.get(1)?,
                room: row.get(2)?,
            })
        })?;
        for membership in rows {
            feed.membership(&membership?, true);
        }
        drop(stmt);
        let rounds = if config.reconciliation_parallel {
            super::OPTIMISTIC_ROUNDS
        } else {
            0
        };
        Ok(Self { db, feed, rounds })
    }

    /// Runs `read` on a pooled read-only connection, on one of Tokio's blocking
    /// threads.
    async fn read<T, F>(&self, read: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || db.read(read))
            .await
            .map_err(|_| StoreError::WriterGone)?
    }
}

/// The answer of a job that never refuses (only storage can fail it).
fn plain<T>(result: Result<T, JobError>) -> Result<T, StoreError> {
    result.map_err(|error| match error {
        JobError::Store(error) => error,
        JobError::Refused(refusal) => {
            StoreError::Corrupt(format!("a storage job refused: {}", refusal.body.error))
        }
    })
}

/// Counts rows with `sql`.
fn count(conn: &Connection, sql: &str) -> Result<i64, StoreError> {
    Ok(conn.query_row(sql, [], |r| r.get(0))?)
}

#[async_trait]
impl Storage for SqliteStore {
    fn engine(&self) -> Engine {
        Engine::Sqlite
    }

    async fn queue_append(&self, tenant: &str, draft: Draft) -> Result<PendingAppend, JobError> {
        let feed = Arc::clone(&self.feed);
        let tenant = tenant.to_owned();
        // A message's append is one statement, after which it cannot fail: no
        // savepoint of its own.
        let guarded = matches!(draft, Draft::Event(_));
        Ok(self
            .db
            .queue(move |w| log::append(w, &feed, &tenant, draft), guarded)?)
    }

    async fn cursor(&self, tenant: &str, event_id: &str) -> Result<Option<(u64, i64)>, StoreError> {
        let (tenant, event_id) = (tenant.to_owned(), event_id.to_owned());
        self.read(move |conn| log::cursor(conn, &tenant, &event_id))
            .await
    }

    async fn visible_after(
        &self,
        tenant: &str,
        viewer: Viewer<'_>,
        after: u64,
        cutoff_ms: i64,
        limit: u32,
    ) -> Result<Vec<Stored>, StoreError> {
        let tenant = tenant.to_owned();
        let user = match viewer {
            Viewer::User(user) => Some(user.to_owned()),
            Viewer::Everything => None,
        };
        self.read(move |conn| {
            let viewer = user.as_deref().map_or(Viewer::Everything, Viewer::User);
            log::visible_after(conn, &tenant, viewer, after, cutoff_ms, limit)
        })
        .await
    }

    async fn last_seq(&self, tenant: &str) -> Result<u64, StoreError> {
        let tenant = tenant.to_owned();
        self.read(move |conn| Ok(log::last_seq(conn, &tenant)?))
            .await
    }

    async fn purge(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        plain(self.db.write(move |w| log::purge(w, cutoff_ms)).await)
    }

    async fn set_membership(&self, m: Membership, joined: bool) -> Result<(), StoreError> {
        let feed = Arc::clone(&self.feed);
        plain(
            self.db
                .write(move |w| {
                    let sql = if joined {
                        "INSERT OR IGNORE INTO room_members (tenant, user_id, room_id, joined_ms)
                     VALUES (?1, ?2, ?3, ?4)"
                    } else {
                        "DELETE FROM room_members
                     WHERE tenant = ?1 AND user_id = ?2 AND room_id = ?3 AND ?4 IS NOT NULL"
                    };
                    w.conn.prepare_cached(sql)?.execute(params![
                        m.tenant,
                        m.user,
                        m.room,
                        now_ms()
                    ])?;
                    w.after_commit(move || feed.membership(&m, joined));
                    Ok(())
                })
                .await,
        )
    }

    async fn claim(
        &self,
        claim: Claim,
        now_ms: i64,
        max_retries: u32,
    ) -> Result<Vec<ClaimedEvent>, JobError> {
        self.db
            .write(move |w| bus::claim(w, &claim, now_ms, max_retries))
            .await
    }

    async fn ack(
        &self,
        tenant: &str,
        group: &str,
        event_ids: Vec<String>,
    ) -> Result<u64, StoreError> {
        let (tenant, group) = (tenant.to_owned(), group.to_owned());
        plain(
            self.db
                .write(move |w| bus::ack(w, &tenant, &group, &event_ids))
                .await,
        )
    }

    async fn expire_leases(&self, now_ms: i64, max_retries: u32) -> Result<u64, StoreError> {
        plain(
            self.db
                .write(move |w| bus::expire_leases(w, None, now_ms, max_retries))
                .await,
        )
    }

    async fn dlq(&self, tenant: &str, group: Option<&str>) -> Result<Vec<DlqEntry>, StoreError> {
        let (tenant, group) = (tenant.to_owned(), group.map(str::to_owned));
        self.read(move |conn| bus::dlq(conn, &tenant, group.as_deref()))
            .await
    }

    async fn replay(&self, tenant: &str, dlq_id: &str) -> Result<(String, String), JobError> {
        let (tenant, dlq_id) = (tenant.to_owned(), dlq_id.to_owned());
        self.db
            .write(move |w| bus::replay(w, &tenant, &dlq_id))
            .await
    }

    async fn lag(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        self.read(bus::lag).await
    }

    async fn deliveries(&self, tenant: &str) -> Result<crate::store::GroupDeliveries, StoreError> {
        let tenant = tenant.to_owned();
        self.read(move |conn| bus::deliveries(conn, &tenant)).await
    }

    async fn entity(
        &self,
        tenant: &str,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<EntityState>, StoreError> {
        let (t, et, id) = (
            tenant.to_owned(),
            entity_type.to_owned(),
            entity_id.to_owned(),
        );
        self.read(move |conn| entities::load(conn, &t, &et, &id))
            .await
    }

    async fn reconcile(
        &self,
        tenant: &str,
        request: ReconciliationRequest,
        last_known: Option<u64>,
        reconciler: Arc<Reconciler>,
    ) -> Result<ReconciliationResponse, JobError> {
        let tenant: Arc<str> = tenant.into();
        let request = Arc::new(request);
        let keys = Arc::new(crate::reconcile::touched(&request));
        // The engine beside the writer, on a blocking thread: requests for other
        // entities are applied in parallel, and the writer only stores.
        for _ in 0..self.rounds {
            let (t, k) = (Arc::clone(&tenant), Arc::clone(&keys));
            let read = self
                .read(move |conn| entities::read(conn, &t, k.iter()))
                .await?;
            let (r, q) = (Arc::clone(&reconciler), Arc::clone(&request));
            let prepared = tokio::task::spawn_blocking(move || {
                crate::reconcile::prepare(&r, read, &q, chrono::Utc::now())
            })
            .await
            .map_err(|_| StoreError::WriterGone)?
            .map_err(entities::prepare_error)?;
            let (t, id) = (Arc::clone(&tenant), request.request_id.clone());
            let answer = self
                .db
                .write(move |w| entities::commit(w, &t, prepared, id, last_known))
                .await?;
            if let Some(answer) = answer {
                return Ok(answer);
            }
        }
        let request = Arc::unwrap_or_clone(request);
        self.db
            .write(move |w| {
                entities::reconcile_locked(w, &reconciler, &tenant, request, last_known)
            })
            .await
    }

    async fn submit_transaction(
        &self,
        submission: Submission,
        owner: &str,
        lease_ms: i64,
    ) -> Result<Submitted, JobError> {
        let owner = owner.to_owned();
        self.db
            .write(move |w| transactions::submit(w, submission, &owner, lease_ms))
            .await
    }

    async fn take_pending(
        &self,
        owner: &str,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<PendingTransaction>, StoreError> {
        let owner = owner.to_owned();
        plain(
            self.db
                .write(move |w| transactions::take_pending(w, &owner, lease_ms, limit))
                .await,
        )
    }

    async fn renew_lease(
        &self,
        owner: &str,
        transaction_id: &str,
        lease_ms: i64,
    ) -> Result<(), StoreError> {
        let (owner, id) = (owner.to_owned(), transaction_id.to_owned());
        plain(
            self.db
                .write(move |w| transactions::renew(w, &owner, &id, lease_ms))
                .await,
        )
    }

    async fn release(&self, owner: &str) -> Result<(), StoreError> {
        let owner = owner.to_owned();
        plain(
            self.db
                .write(move |w| {
                    w.conn
                        .prepare_cached(
                            "UPDATE transactions SET owner = NULL, lease_until_ms = NULL
                             WHERE owner = ?1 AND status = 'PENDING'",
                        )?
                        .execute([owner])?;
                    Ok(())
                })
                .await,
        )
    }

    async fn decide(
        &self,
        pending: &PendingTransaction,
        decision: Decision,
    ) -> Result<bool, JobError> {
        let feed = Arc::clone(&self.feed);
        let pending = pending.clone();
        self.db
            .write(move |w| transactions::decide(w, &feed, &pending, decision))
            .await
    }

    async fn transaction(
        &self,
        tenant: &str,
        transaction_id: &str,
    ) -> Result<Option<StoredStatus>, StoreError> {
        let (tenant, id) = (tenant.to_owned(), transaction_id.to_owned());
        self.read(move |conn| transactions::status(conn, &tenant, &id))
            .await
    }

    async fn audit(&self, record: AuditRecord) -> Result<AuditLogEntry, StoreError> {
        plain(self.db.write(move |w| audit::append(w, record)).await)
    }

    async fn audit_page(
        &self,
        tenant: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<AuditLogEntry>, StoreError> {
        let tenant = tenant.to_owned();
        self.read(move |conn| audit::page(conn, &tenant, before, limit))
            .await
    }

    async fn audit_verify(&self) -> Result<ChainCheck, StoreError> {
        self.read(audit::verify).await
    }

    async fn figures(&self) -> Result<StorageFigures, StoreError> {
        self.read(|conn| {
            Ok(StorageFigures {
                log_length: count(conn, "SELECT count(*) FROM events")?,
                consumer_groups: count(conn, "SELECT count(*) FROM consumer_groups")?,
                dlq_size: count(conn, "SELECT count(*) FROM dlq")?,
                entities: count(conn, "SELECT count(*) FROM entities")?,
                database_bytes: count(
                    conn,
                    "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
                )?,
            })
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        plain(self.db.write(|_| Ok(())).await)
    }

    async fn shutdown(&self) {
        let db = Arc::clone(&self.db);
        let _ = tokio::task::spawn_blocking(move || db.shutdown()).await;
    }
}
