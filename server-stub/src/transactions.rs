//! Class D transactions (PROTOCOL.md §4, §6 "Transactions"): idempotent submission,
//! asynchronous confirmation by a pluggable [`TransactionProcessor`], status, and the
//! `transaction.confirmed` / `transaction.rejected` durable events.
//!
//! Submission stores the transaction as `PENDING` with its audit record in one write,
//! answers `202`, and hands it to the processor. The decision is stored with its audit
//! record and the event to the submitter, again in one write. Transactions still
//! pending at shutdown are handed to the processor again at the next start.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use sha2::{Digest, Sha256};
use webwaka_realtime::protocol::event::{
    TRANSACTION_CONFIRMED_EVENT_TYPE, TRANSACTION_REJECTED_EVENT_TYPE,
};
use webwaka_realtime::protocol::{
    AuditResult, ErrorCode, EventMetadata, JsonObject, TransactionAccepted, TransactionState,
    TransactionStatus,
};

use crate::app::App;
use crate::audit::{self, AuditRecord};
use crate::db::{Writer, ms_to_time, now_ms};
use crate::error::{ApiError, JobError, StoreError};
use crate::log::{self, Fanout, NewEvent};
use crate::metrics::label;

/// A transaction waiting for a decision, as the processor sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingTransaction {
    /// The server's id.
    pub transaction_id: String,
    /// The tenant.
    pub tenant_id: String,
    /// The submitting user.
    pub user_id: String,
    /// e.g. `payment.transfer`.
    pub transaction_type: String,
    /// The request's payload.
    pub payload: Value,
    /// The request's metadata.
    pub metadata: Option<JsonObject>,
}

/// What the processor decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Carried out.
    Confirm,
    /// Refused, with the reason given to the user.
    Reject(String),
}

/// Decides transactions. The server calls [`process`](Self::process) once per pending
/// transaction (again after a restart if no decision was stored).
pub trait TransactionProcessor: Send + Sync + 'static {
    /// Decides `transaction`.
    fn process(
        &self,
        transaction: PendingTransaction,
    ) -> Pin<Box<dyn Future<Output = Decision> + Send + 'static>>;
}

/// The default processor: waits `delay`, then rejects the types in `reject` and
/// confirms everything else, so apps can exercise both outcomes locally
/// (`TRANSACTION_CONFIRM_DELAY_MS`, `TRANSACTION_REJECT_TYPES`).
#[derive(Debug, Clone)]
pub struct DelayProcessor {
    delay: Duration,
    reject: HashSet<String>,
}

impl DelayProcessor {
    /// A processor deciding after `delay`, rejecting the `reject` types.
    pub fn new(delay: Duration, reject: HashSet<String>) -> Self {
        Self { delay, reject }
    }
}

impl TransactionProcessor for DelayProcessor {
    fn process(
        &self,
        transaction: PendingTransaction,
    ) -> Pin<Box<dyn Future<Output = Decision> + Send + 'static>> {
        let delay = self.delay;
        let reject = self.reject.contains(&transaction.transaction_type);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            if reject {
                Decision::Reject(format!(
                    "transaction type {:?} is configured to be rejected (TRANSACTION_REJECT_TYPES)",
                    transaction.transaction_type
                ))
            } else {
                Decision::Confirm
            }
        })
    }
}

/// The hash a replay must match: SHA-256 of the canonical JSON of the body.
pub(crate) fn body_hash(body: &Value) -> String {
    let bytes = serde_jcs::to_vec(body)
        .or_else(|_| serde_json::to_vec(body))
        .unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

/// A submission, checked.
pub(crate) struct Submission {
    pub(crate) tenant: String,
    pub(crate) user: String,
    pub(crate) key: String,
    pub(crate) hash: String,
    pub(crate) request: Value,
    pub(crate) transaction_type: String,
    pub(crate) payload: Value,
    pub(crate) metadata: Option<JsonObject>,
}

/// What a submission did.
pub(crate) enum Submitted {
    /// A new transaction, to be processed.
    New(TransactionAccepted, PendingTransaction),
    /// The same key and body as before: the same answer.
    Replay(TransactionAccepted),
    /// The same key with another body (the refusal is audited, so it is not a job
    /// error, which would roll the audit record back).
    Conflict,
}

/// Stores a submission (on the writer).
pub(crate) fn submit(w: &mut Writer<'_>, s: Submission) -> Result<Submitted, JobError> {
    let existing = w
        .conn
        .prepare_cached(
            "SELECT transaction_id, body_hash, received_ms, submit_audit_id FROM transactions
             WHERE tenant = ?1 AND user_id = ?2 AND idempotency_key = ?3",
        )?
        .query_row(params![s.tenant, s.user, s.key], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
                row.get::<_, String>(3)?,
            ))
        })
        .optional()?;
    if let Some((transaction_id, hash, received, audit_id)) = existing {
        if hash == s.hash {
            return Ok(Submitted::Replay(TransactionAccepted {
                transaction_id,
                status: TransactionState::Pending,
                received_at: ms_to_time(received),
                audit_id,
            }));
        }
        let record = AuditRecord::new(
            &s.tenant,
            &s.user,
            "transaction.idempotency_conflict",
            "transaction",
            AuditResult::Failure,
        )
        .resource_id(transaction_id)
        .meta("idempotencyKey", s.key.as_str());
        audit::append(w, record)?;
        return Ok(Submitted::Conflict);
    }
    let transaction_id = format!("txn-{}", uuid::Uuid::now_v7());
    let received = now_ms();
    let record = AuditRecord::new(
        &s.tenant,
        &s.user,
        "transaction.submit",
        "transaction",
        AuditResult::Success,
    )
    .resource_id(transaction_id.as_str())
    .meta("transactionType", s.transaction_type.as_str())
    .meta("idempotencyKey", s.key.as_str());
    let entry = audit::append(w, record)?;
    w.conn
        .prepare_cached(
            "INSERT INTO transactions (transaction_id, tenant, user_id, idempotency_key, body_hash,
                                       request, status, reason, received_ms, updated_ms,
                                       submit_audit_id, audit_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'PENDING', NULL, ?7, ?7, ?8, ?8)",
        )?
        .execute(params![
            transaction_id,
            s.tenant,
            s.user,
            s.key,
            s.hash,
            s.request.to_string(),
            received,
            entry.audit_id,
        ])?;
    Ok(Submitted::New(
        TransactionAccepted {
            transaction_id: transaction_id.clone(),
            status: TransactionState::Pending,
            received_at: ms_to_time(received),
            audit_id: entry.audit_id,
        },
        PendingTransaction {
            transaction_id,
            tenant_id: s.tenant,
            user_id: s.user,
            transaction_type: s.transaction_type,
            payload: s.payload,
            metadata: s.metadata,
        },
    ))
}

/// Hands `pending` to the processor on a background task, then stores the decision.
pub(crate) fn spawn_processing(app: &Arc<App>, pending: PendingTransaction) {
    spawn_processing_on(app, pending, &tokio::runtime::Handle::current());
}

/// [`spawn_processing`] from outside the runtime (the storage writer's thread, after
/// the commit that stored the submission).
pub(crate) fn spawn_processing_on(
    app: &Arc<App>,
    pending: PendingTransaction,
    runtime: &tokio::runtime::Handle,
) {
    let app2 = Arc::clone(app);
    app.background.spawn_on(
        async move {
            let decision = tokio::select! {
                decision = app2.processor.process(pending.clone()) => decision,
                // Still PENDING in the database: decided after the next start.
                _ = app2.shutdown.cancelled() => return,
            };
            // A decision that cannot be stored now (storage busy or failing) is tried
            // again a few times; if it still fails, the transaction stays PENDING and
            // is handed to the processor again at the next start.
            for attempt in 1..=DECIDE_ATTEMPTS {
                match decide(&app2, pending.clone(), decision.clone()).await {
                    Ok(()) => return,
                    Err(error) => {
                        tracing::error!(%error, attempt, transaction_id = %pending.transaction_id,
                            "storing a transaction decision failed");
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))) => {}
                    _ = app2.shutdown.cancelled() => return,
                }
            }
        },
        runtime,
    );
}

/// How many times a decision is offered to storage before waiting for a restart.
const DECIDE_ATTEMPTS: u32 = 5;

/// Stores a decision: status, audit record, and the durable event to the submitter.
async fn decide(
    app: &Arc<App>,
    pending: PendingTransaction,
    decision: Decision,
) -> Result<(), ApiError> {
    let fanout = Fanout {
        hub: Arc::clone(&app.hub),
        tail: Arc::clone(&app.tail),
        metrics: Arc::clone(&app.metrics),
        exclude: None,
    };
    let outcome = if matches!(decision, Decision::Confirm) {
        "confirmed"
    } else {
        "rejected"
    };
    app.db
        .write(move |w| {
            let status: Option<String> = w
                .conn
                .prepare_cached("SELECT status FROM transactions WHERE transaction_id = ?1")?
                .query_row([&pending.transaction_id], |row| row.get(0))
                .optional()?;
            if status.as_deref() != Some("PENDING") {
                return Ok(());
            }
            let (state, reason, action, event_type) = match decision {
                Decision::Confirm => (
                    TransactionState::Confirmed,
                    None,
                    "transaction.confirm",
                    TRANSACTION_CONFIRMED_EVENT_TYPE,
                ),
                Decision::Reject(reason) => (
                    TransactionState::Rejected,
                    Some(reason),
                    "transaction.reject",
                    TRANSACTION_REJECTED_EVENT_TYPE,
                ),
            };
            let mut record = AuditRecord::new(
                &pending.tenant_id,
                "transaction-processor",
                action,
                "transaction",
                if state == TransactionState::Confirmed {
                    AuditResult::Success
                } else {
                    AuditResult::Failure
                },
            )
            .system()
            .resource_id(pending.transaction_id.as_str())
            .meta("userId", pending.user_id.as_str());
            if let Some(reason) = &reason {
                record = record.meta("reason", reason.as_str());
            }
            let entry = audit::append(w, record)?;
            let updated = now_ms();
            w.conn
                .prepare_cached(
                    "UPDATE transactions SET status = ?2, reason = ?3, updated_ms = ?4, audit_id = ?5
                     WHERE transaction_id = ?1",
                )?
                .execute(params![
                    pending.transaction_id,
                    state.as_str(),
                    reason,
                    updated,
                    entry.audit_id
                ])?;
            let status = TransactionStatus {
                transaction_id: pending.transaction_id.clone(),
                status: state,
                reason,
                updated_at: ms_to_time(updated),
                audit_id: entry.audit_id,
            };
            let mut metadata = EventMetadata::from_source("transaction-processor");
            metadata.user_id = Some(pending.user_id.clone());
            log::append_event(
                w,
                fanout,
                &pending.tenant_id,
                NewEvent {
                    event_id: None,
                    event_type: event_type.to_owned(),
                    payload: serde_json::to_value(&status)?,
                    metadata,
                    schema_version: None,
                    recipient_id: Some(pending.user_id.clone()),
                    room_id: None,
                    sender_id: None,
                },
            )?;
            Ok(())
        })
        .await?;
    app.metrics
        .transactions
        .get_or_create(&label("outcome", outcome))
        .inc();
    Ok(())
}

/// The transactions still pending (handed to the processor at start).
pub(crate) fn pending(conn: &Connection) -> Result<Vec<PendingTransaction>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT transaction_id, tenant, user_id, request FROM transactions
         WHERE status = 'PENDING' ORDER BY received_ms",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, String>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (transaction_id, tenant_id, user_id, request) = row?;
        let request: Value = serde_json::from_str(&request)?;
        out.push(PendingTransaction {
            transaction_id,
            tenant_id,
            user_id,
            transaction_type: request
                .get("transactionType")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            payload: request.get("payload").cloned().unwrap_or(Value::Null),
            metadata: request.get("metadata").and_then(Value::as_object).cloned(),
        });
    }
    Ok(out)
}

/// A transaction's status, if `tenant` has it; `NOT_FOUND` for anyone but its
/// submitter and the tenant's admins.
pub(crate) fn status(
    conn: &Connection,
    tenant: &str,
    user: &str,
    is_admin: bool,
    transaction_id: &str,
) -> Result<TransactionStatus, ApiError> {
    let row = conn
        .prepare_cached(
            "SELECT user_id, status, reason, updated_ms, audit_id FROM transactions
             WHERE transaction_id = ?1 AND tenant = ?2",
        )
        .and_then(|mut stmt| {
            stmt.query_row(params![transaction_id, tenant], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, Option<String>>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, String>(4)?,
                ))
            })
            .optional()
        })
        .map_err(StoreError::from)?;
    let not_found = || ApiError::not_found(format!("no transaction {transaction_id:?}"));
    let Some((owner, status, reason, updated, audit_id)) = row else {
        return Err(not_found());
    };
    if owner != user && !is_admin {
        return Err(not_found());
    }
    let status = match status.as_str() {
        "PENDING" => TransactionState::Pending,
        "CONFIRMED" => TransactionState::Confirmed,
        "REJECTED" => TransactionState::Rejected,
        other => {
            return Err(StoreError::Corrupt(format!("transaction status {other:?}")).into());
        }
    };
    Ok(TransactionStatus {
        transaction_id: transaction_id.to_owned(),
        status,
        reason,
        updated_at: ms_to_time(updated),
        audit_id,
    })
}

/// The `IDEMPOTENCY_CONFLICT` answer.
pub(crate) fn conflict(key: &str) -> ApiError {
    ApiError::new(
        ErrorCode::IdempotencyConflict,
        "Idempotency-Key reused with a different body",
    )
    .with_detail("idempotencyKey", key)
}
