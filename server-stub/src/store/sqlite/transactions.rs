//! Class D transactions in SQLite.

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};
use webwaka_realtime::protocol::{TransactionAccepted, TransactionState, TransactionStatus};

use super::db::Writer;
use crate::error::{JobError, StoreError};
use crate::feed::Feed;
use crate::time::{ms_to_time, now_ms};
use crate::transactions::{
    Decision, PendingTransaction, StoredStatus, Submission, Submitted, conflict_record,
    decision_event, decision_parts, new_transaction_id, parse_state, pending_from_request,
    submit_record,
};

/// Stores a submission (on the writer), held by `owner` for `lease_ms` when new.
pub(super) fn submit(
    w: &mut Writer<'_>,
    s: Submission,
    owner: &str,
    lease_ms: i64,
) -> Result<Submitted, JobError> {
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
        super::audit::append(w, conflict_record(&s, &transaction_id))?;
        return Ok(Submitted::Conflict);
    }
    let transaction_id = new_transaction_id();
    let received = now_ms();
    let entry = super::audit::append(w, submit_record(&s, &transaction_id))?;
    w.conn
        .prepare_cached(
            "INSERT INTO transactions (transaction_id, tenant, user_id, idempotency_key, body_hash,
                                       request, status, reason, received_ms, updated_ms,
                                       submit_audit_id, audit_id, owner, lease_until_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'PENDING', NULL, ?7, ?7, ?8, ?8, ?9, ?10)",
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
            owner,
            received.saturating_add(lease_ms),
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

/// Takes up to `limit` pending transactions that no one holds (or whose hold ran out)
/// for `owner`.
pub(super) fn take_pending(
    w: &mut Writer<'_>,
    owner: &str,
    lease_ms: i64,
    limit: u32,
) -> Result<Vec<PendingTransaction>, JobError> {
    let now = now_ms();
    let mut stmt = w.conn.prepare_cached(
        "UPDATE transactions SET owner = ?1, lease_until_ms = ?2
         WHERE transaction_id IN (
             SELECT transaction_id FROM transactions
             WHERE status = 'PENDING' AND (lease_until_ms IS NULL OR lease_until_ms < ?3)
             ORDER BY received_ms LIMIT ?4)
         RETURNING transaction_id, tenant, user_id, request",
    )?;
    let rows = stmt.query_map(
        params![owner, now.saturating_add(lease_ms), now, i64::from(limit)],
        |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
            ))
        },
    )?;
    let mut out = Vec::new();
    for row in rows {
        let (transaction_id, tenant, user, request) = row?;
        out.push(pending_from_request(
            transaction_id,
            tenant,
            user,
            &request,
        )?);
    }
    Ok(out)
}

/// Extends `owner`'s hold of a pending transaction.
pub(super) fn renew(
    w: &mut Writer<'_>,
    owner: &str,
    transaction_id: &str,
    lease_ms: i64,
) -> Result<(), JobError> {
    w.conn
        .prepare_cached(
            "UPDATE transactions SET lease_until_ms = ?3
             WHERE transaction_id = ?1 AND owner = ?2 AND status = 'PENDING'",
        )?
        .execute(params![
            transaction_id,
            owner,
            now_ms().saturating_add(lease_ms)
        ])?;
    Ok(())
}

/// Stores a decision: status, audit record, and the durable event to the submitter,
/// once (false when the transaction was decided already).
pub(super) fn decide(
    w: &mut Writer<'_>,
    feed: &Arc<Feed>,
    pending: &PendingTransaction,
    decision: Decision,
) -> Result<bool, JobError> {
    let status: Option<String> = w
        .conn
        .prepare_cached("SELECT status FROM transactions WHERE transaction_id = ?1")?
        .query_row([&pending.transaction_id], |row| row.get(0))
        .optional()?;
    if status.as_deref() != Some("PENDING") {
        return Ok(false);
    }
    let parts = decision_parts(pending, decision);
    let entry = super::audit::append(w, parts.record)?;
    let updated = now_ms();
    w.conn
        .prepare_cached(
            "UPDATE transactions SET status = ?2, reason = ?3, updated_ms = ?4, audit_id = ?5,
                                     owner = NULL, lease_until_ms = NULL
             WHERE transaction_id = ?1",
        )?
        .execute(params![
            pending.transaction_id,
            parts.state.as_str(),
            parts.reason,
            updated,
            entry.audit_id
        ])?;
    let status = TransactionStatus {
        transaction_id: pending.transaction_id.clone(),
        status: parts.state,
        reason: parts.reason,
        updated_at: ms_to_time(updated),
        audit_id: entry.audit_id,
    };
    let draft = decision_event(pending, parts.event_type, &status)?;
    super::log::append(w, feed, &pending.tenant_id, draft)?;
    Ok(true)
}

/// A transaction of `tenant`, as stored.
pub(super) fn status(
    conn: &Connection,
    tenant: &str,
    transaction_id: &str,
) -> Result<Option<StoredStatus>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT user_id, status, reason, updated_ms, audit_id FROM transactions
             WHERE transaction_id = ?1 AND tenant = ?2",
        )?
        .query_row(params![transaction_id, tenant], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, Option<String>>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, String>(4)?,
            ))
        })
        .optional()?;
    row.map(|(user_id, status, reason, updated_ms, audit_id)| {
        Ok(StoredStatus {
            user_id,
            status: parse_state(&status)?,
            reason,
            updated_ms,
            audit_id,
        })
    })
    .transpose()
}
