//! Class D transactions (PROTOCOL.md §4, §6 "Transactions"): `POST /api/transactions`
//! and `GET /api/transactions/{id}`.
//!
//! Critical transactions never travel over realtime. The client submits one with an
//! [`IDEMPOTENCY_KEY_HEADER`]; the server answers `202` [`TransactionAccepted`] and later
//! confirms or rejects it, which the client reads as a [`TransactionStatus`] (polled, or
//! as the payload of a `transaction.confirmed` / `transaction.rejected` event).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{JsonObject, Timestamp};

/// Header carrying the client's idempotency key (required on `POST /api/transactions`).
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

/// Body of `POST /api/transactions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransactionRequest {
    /// What kind of transaction, e.g. `payment.transfer`.
    pub transaction_type: String,
    /// Its content: any JSON value (required).
    pub payload: Value,
    /// Free-form extra data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<JsonObject>,
}

/// Where a transaction is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TransactionState {
    /// Received, not decided yet.
    Pending,
    /// Carried out.
    Confirmed,
    /// Refused; `reason` says why.
    Rejected,
}

impl TransactionState {
    /// The state as written on the wire, e.g. `"PENDING"`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransactionState::Pending => "PENDING",
            TransactionState::Confirmed => "CONFIRMED",
            TransactionState::Rejected => "REJECTED",
        }
    }

    /// True once the transaction is decided (confirmed or rejected).
    pub fn is_final(self) -> bool {
        self != TransactionState::Pending
    }
}

impl fmt::Display for TransactionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Body of the `202` answer to `POST /api/transactions` (the same for a replay with the
/// same key and body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransactionAccepted {
    /// The server's id of the transaction.
    pub transaction_id: String,
    /// Always `PENDING` on acceptance.
    pub status: TransactionState,
    /// When the server received it.
    pub received_at: Timestamp,
    /// The audit record of the submission.
    pub audit_id: String,
}

/// Answer to `GET /api/transactions/{id}`, and payload of the
/// `transaction.confirmed` / `transaction.rejected` events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransactionStatus {
    /// The server's id of the transaction.
    pub transaction_id: String,
    /// Its current state.
    pub status: TransactionState,
    /// Why it was rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the state last changed.
    pub updated_at: Timestamp,
    /// The audit record of the last change.
    pub audit_id: String,
}
