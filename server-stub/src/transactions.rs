//! Class D transactions (PROTOCOL.md §4, §6 "Transactions"): idempotent submission,
//! asynchronous confirmation by a pluggable [`TransactionProcessor`], status, and the
//! `transaction.confirmed` / `transaction.rejected` durable events.
//!
//! Submission stores the transaction as `PENDING` with its audit record in one write,
//! answers `202`, and hands it to the processor. The decision is stored with its audit
//! record and the event to the submitter, again in one write, and only while the
//! transaction is still pending: each transaction is decided once.
//!
//! **Who processes.** A pending transaction is held by one server instance at a time: a
//! lease ([`LEASE`]) taken when it is stored, renewed while the processor works, and
//! taken over by another instance's sweep when it runs out (its holder died).
//! Transactions still pending at shutdown are taken again at the next start. So every
//! transaction is decided exactly once, by whichever instance holds it, even with
//! several instances running the processor.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use webwaka_realtime::protocol::event::{
    TRANSACTION_CONFIRMED_EVENT_TYPE, TRANSACTION_REJECTED_EVENT_TYPE,
};
use webwaka_realtime::protocol::{
    AuditResult, ErrorCode, EventMetadata, JsonObject, TransactionAccepted, TransactionState,
    TransactionStatus,
};

use crate::audit::AuditRecord;
use crate::error::{ApiError, StoreError};
use crate::log::{Draft, NewEvent};
use crate::metrics::{Metrics, label};
use crate::store::Storage;
use crate::time::ms_to_time;

/// How long an instance holds a pending transaction without renewing.
pub(crate) const LEASE: Duration = Duration::from_secs(15);
/// How often a held lease is renewed while the processor works.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// Pending transactions taken per sweep.
const SWEEP_BATCH: u32 = 100;

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
    /// A new transaction, held by the submitting instance, to be processed.
    New(TransactionAccepted, PendingTransaction),
    /// The same key and body as before: the same answer.
    Replay(TransactionAccepted),
    /// The same key with another body (the refusal is audited, so it is not a job
    /// error, which would roll the audit record back).
    Conflict,
}

/// A transaction as stored, for its status.
#[derive(Debug, Clone)]
pub(crate) struct StoredStatus {
    /// The submitting user.
    pub(crate) user_id: String,
    pub(crate) status: TransactionState,
    pub(crate) reason: Option<String>,
    pub(crate) updated_ms: i64,
    pub(crate) audit_id: String,
}

/// A stored status name as a state.
pub(crate) fn parse_state(status: &str) -> Result<TransactionState, StoreError> {
    match status {
        "PENDING" => Ok(TransactionState::Pending),
        "CONFIRMED" => Ok(TransactionState::Confirmed),
        "REJECTED" => Ok(TransactionState::Rejected),
        other => Err(StoreError::Corrupt(format!("transaction status {other:?}"))),
    }
}

/// The audit record of a stored submission.
pub(crate) fn submit_record(s: &Submission, transaction_id: &str) -> AuditRecord {
    AuditRecord::new(
        &s.tenant,
        &s.user,
        "transaction.submit",
        "transaction",
        AuditResult::Success,
    )
    .resource_id(transaction_id)
    .meta("transactionType", s.transaction_type.as_str())
    .meta("idempotencyKey", s.key.as_str())
}

/// The audit record of a key reused with another body.
pub(crate) fn conflict_record(s: &Submission, transaction_id: &str) -> AuditRecord {
    AuditRecord::new(
        &s.tenant,
        &s.user,
        "transaction.idempotency_conflict",
        "transaction",
        AuditResult::Failure,
    )
    .resource_id(transaction_id)
    .meta("idempotencyKey", s.key.as_str())
}

/// A new transaction's id.
pub(crate) fn new_transaction_id() -> String {
    format!("txn-{}", uuid::Uuid::now_v7())
}

/// The pending transaction a stored request describes.
pub(crate) fn pending_from_request(
    transaction_id: String,
    tenant_id: String,
    user_id: String,
    request: &str,
) -> Result<PendingTransaction, StoreError> {
    let request: Value = serde_json::from_str(request)?;
    Ok(PendingTransaction {
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
    })
}

/// A decision as stored: the state, the reason, its audit record and the event type
/// told to the submitter.
pub(crate) struct DecisionParts {
    pub(crate) state: TransactionState,
    pub(crate) reason: Option<String>,
    pub(crate) record: AuditRecord,
    pub(crate) event_type: &'static str,
}

/// What storing `decision` about `pending` writes besides the status.
pub(crate) fn decision_parts(pending: &PendingTransaction, decision: Decision) -> DecisionParts {
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
    DecisionParts {
        state,
        reason,
        record,
        event_type,
    }
}

/// The durable event that tells the submitter of the decision.
pub(crate) fn decision_event(
    pending: &PendingTransaction,
    event_type: &str,
    status: &TransactionStatus,
) -> Result<Draft, StoreError> {
    let mut metadata = EventMetadata::from_source("transaction-processor");
    metadata.user_id = Some(pending.user_id.clone());
    Ok(Draft::Event(NewEvent {
        event_id: None,
        event_type: event_type.to_owned(),
        payload: serde_json::to_value(status)?,
        metadata,
        schema_version: None,
        recipient_id: Some(pending.user_id.clone()),
        room_id: None,
        sender_id: None,
    }))
}

/// Running the processor: storage, the processor, and this instance's name as the
/// holder of the transactions it processes.
#[derive(Clone)]
pub(crate) struct Transactions {
    pub(crate) store: Arc<dyn Storage>,
    pub(crate) processor: Arc<dyn TransactionProcessor>,
    pub(crate) metrics: Arc<Metrics>,
    /// This instance, as a lease holder.
    pub(crate) owner: Arc<str>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) background: TaskTracker,
}

impl Transactions {
    /// Stores a submission and, when it is new, hands it to the processor. Runs on a
    /// task of its own: if the client goes away mid-request the handler is dropped,
    /// but a transaction that reached storage must still be decided.
    pub(crate) async fn submit(&self, submission: Submission) -> Result<Submitted, ApiError> {
        let this = self.clone();
        let task = tokio::spawn(async move {
            let lease = i64::try_from(LEASE.as_millis()).unwrap_or(i64::MAX);
            let submitted = this
                .store
                .submit_transaction(submission, &this.owner, lease)
                .await?;
            if let Submitted::New(_, pending) = &submitted {
                this.metrics
                    .transactions
                    .get_or_create(&label("outcome", "submitted"))
                    .inc();
                this.spawn_processing(pending.clone());
            }
            Ok::<_, ApiError>(submitted)
        });
        task.await.map_err(|_| ApiError::internal())?
    }

    /// Takes the pending transactions no live instance holds and processes them (at
    /// start, and at each maintenance tick). Returns how many were taken.
    pub(crate) async fn sweep(&self) -> Result<usize, StoreError> {
        let lease = i64::try_from(LEASE.as_millis()).unwrap_or(i64::MAX);
        let taken = self
            .store
            .take_pending(&self.owner, lease, SWEEP_BATCH)
            .await?;
        let n = taken.len();
        if n > 0 {
            tracing::info!(count = n, "taking over pending transactions");
        }
        for pending in taken {
            self.spawn_processing(pending);
        }
        Ok(n)
    }

    /// Hands `pending` (held by this instance) to the processor on a background task,
    /// renewing the hold while it works, then stores the decision.
    pub(crate) fn spawn_processing(&self, pending: PendingTransaction) {
        let this = self.clone();
        self.background.spawn(async move {
            let process = this.processor.process(pending.clone());
            tokio::pin!(process);
            let mut renew = tokio::time::interval_at(
                tokio::time::Instant::now() + RENEW_EVERY,
                RENEW_EVERY,
            );
            let lease = i64::try_from(LEASE.as_millis()).unwrap_or(i64::MAX);
            let decision = loop {
                tokio::select! {
                    decision = &mut process => break decision,
                    // Still PENDING in the database: decided after the next start, or
                    // by another instance once the hold runs out.
                    _ = this.shutdown.cancelled() => return,
                    _ = renew.tick() => {
                        if let Err(error) = this.store.renew_lease(&this.owner, &pending.transaction_id, lease).await {
                            tracing::warn!(%error, transaction_id = %pending.transaction_id, "renewing a transaction's hold failed");
                        }
                    }
                }
            };
            // A decision that cannot be stored now (storage busy or failing) is tried
            // again a few times; if it still fails, the transaction stays PENDING and
            // is taken again when its hold runs out.
            for attempt in 1..=DECIDE_ATTEMPTS {
                match this.store.decide(&pending, decision.clone()).await {
                    Ok(decided) => {
                        if decided {
                            let outcome = if matches!(decision, Decision::Confirm) {
                                "confirmed"
                            } else {
                                "rejected"
                            };
                            this.metrics
                                .transactions
                                .get_or_create(&label("outcome", outcome))
                                .inc();
                        }
                        return;
                    }
                    Err(error) => {
                        tracing::error!(%error, attempt, transaction_id = %pending.transaction_id,
                            "storing a transaction decision failed");
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))) => {}
                    _ = this.shutdown.cancelled() => return,
                }
            }
        });
    }

    /// A transaction's status, if `tenant` has it; `NOT_FOUND` for anyone but its
    /// submitter and the tenant's admins.
    pub(crate) async fn status(
        &self,
        tenant: &str,
        user: &str,
        is_admin: bool,
        transaction_id: &str,
    ) -> Result<TransactionStatus, ApiError> {
        let not_found = || ApiError::not_found(format!("no transaction {transaction_id:?}"));
        let Some(stored) = self.store.transaction(tenant, transaction_id).await? else {
            return Err(not_found());
        };
        if stored.user_id != user && !is_admin {
            return Err(not_found());
        }
        Ok(TransactionStatus {
            transaction_id: transaction_id.to_owned(),
            status: stored.status,
            reason: stored.reason,
            updated_at: ms_to_time(stored.updated_ms),
            audit_id: stored.audit_id,
        })
    }
}

/// How many times a decision is offered to storage before waiting for a retake.
const DECIDE_ATTEMPTS: u32 = 5;

/// The `IDEMPOTENCY_CONFLICT` answer.
pub(crate) fn conflict(key: &str) -> ApiError {
    ApiError::new(
        ErrorCode::IdempotencyConflict,
        "Idempotency-Key reused with a different body",
    )
    .with_detail("idempotencyKey", key)
}
