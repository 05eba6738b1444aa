//! The v1 wire protocol between the SDK and the server, as Rust types.
//!
//! Every type that crosses the wire lives here, with serde names exactly as on the wire
//! (camelCase fields, SCREAMING_SNAKE enums). Decoding is lenient where a newer peer may
//! say more (unknown fields are ignored, an unknown WebSocket event decodes to an
//! `Unknown` variant) and strict where a value would be wrong (an unknown interaction
//! class, a negative clock counter): those are [`DecodeError`]s that name the field.
//!
//! This module needs no tokio, reqwest or rusqlite; it builds with
//! `default-features = false`. `docs/protocol.md` describes the protocol as built.

pub mod audit;
pub mod envelope;
pub mod error;
pub mod event;
pub mod health;
pub mod message;
pub mod presence;
pub mod reconciliation;
pub mod transaction;

pub use reconciliation::{
    Conflict, ConflictResolution, Operation, OperationType, ReconciliationRequest,
    ReconciliationResponse, ResolutionStrategy, StateSnapshot, checksum,
};

use serde::de::DeserializeOwned;

/// A point in time on the wire: an RFC 3339 UTC string.
pub type Timestamp = chrono::DateTime<chrono::Utc>;

/// A JSON object (string keys), as used for `metadata` fields.
pub type JsonObject = serde_json::Map<String, serde_json::Value>;

/// Input that is not a valid protocol value; names where it went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {path}: {message}")]
pub struct DecodeError {
    /// Where in the input the problem is, e.g. `operations[0].vectorClock.c1`
    /// (`input` when the whole value is wrong, e.g. malformed JSON).
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

impl DecodeError {
    /// An error at `path` saying `message`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// A JSON value's kind, for error messages ("a string", "an object", …).
pub(crate) fn json_kind(value: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn path_error(err: serde_path_to_error::Error<serde_json::Error>) -> DecodeError {
    let path = err.path().to_string();
    let path = if path == "." {
        "input".to_owned()
    } else {
        path
    };
    let inner = err.into_inner();
    // serde_json appends " at line L column C" to data errors; the path says more.
    let mut message = inner.to_string();
    if let Some(cut) = message.rfind(" at line ") {
        message.truncate(cut);
    }
    DecodeError { path, message }
}

/// Decodes a protocol value from JSON text; the error names the offending field.
pub fn decode<T: DeserializeOwned>(json: &str) -> Result<T, DecodeError> {
    let mut de = serde_json::Deserializer::from_str(json);
    let value = serde_path_to_error::deserialize(&mut de).map_err(path_error)?;
    de.end()
        .map_err(|e| DecodeError::new("input", format!("trailing characters: {e}")))?;
    Ok(value)
}

/// Decodes a protocol value from an already parsed JSON value.
pub fn decode_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, DecodeError> {
    serde_path_to_error::deserialize(value).map_err(path_error)
}

pub use audit::{
    ADMIN_JUSTIFICATION_HEADER, ActorType, AuditLogEntry, AuditPage, AuditResult, AuditVerify,
    TENANT_HEADER,
};
pub use envelope::{ClientEvent, Connected, Frame, ServerEvent};
pub use error::{ErrorBody, ErrorCode};
pub use event::{
    AckRequest, AckResponse, ClaimRequest, ClaimResponse, ClaimedEvent, ConsumerInfo, DlqEntry,
    DlqResponse, Event, EventMetadata, PollResponse, PublishEvent, Published,
};
pub use health::{Health, HealthServices, HealthState, ServiceHealth};
pub use message::{InteractionClass, MessageAccepted, MessageAck, SendMessage, WebSocketMessage};
pub use presence::{PresenceInfo, PresenceStatus, PresenceUpdate};
pub use transaction::{
    IDEMPOTENCY_KEY_HEADER, TransactionAccepted, TransactionRequest, TransactionState,
    TransactionStatus,
};
