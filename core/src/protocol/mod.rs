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

/// The deepest nesting of objects and arrays an app's payload may have. JSON readers
/// bound nesting (serde_json reads 127 levels; the payload sits a few levels inside a
/// frame or a stored item): a deeper payload would be stored and then never read back.
pub const MAX_PAYLOAD_DEPTH: usize = 64;

/// How deeply `value` nests objects and arrays (a scalar: 0, `{}`: 1, `{"a": []}`: 2).
/// Walks with a stack of its own, so a value of any depth is measured without
/// recursion.
pub fn nesting_depth(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(a) => Box::new(a.iter()),
            Value::Object(o) => Box::new(o.values()),
            _ => continue,
        };
        let depth = depth.saturating_add(1);
        deepest = deepest.max(depth);
        stack.extend(children.map(|c| (c, depth)));
    }
    deepest
}

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

/// The longest id the protocol accepts, in bytes: room, user, message, event, entity
/// and type ids, client and consumer ids. Longer ones are refused by the `validate`
/// functions, naming the field.
pub const MAX_ID_BYTES: usize = 256;

/// Refuses `value` when it is longer than [`MAX_ID_BYTES`] or holds a control
/// character ([`check_printable`]), naming `field`.
pub fn check_id(field: &str, value: &str) -> Result<(), DecodeError> {
    if value.len() > MAX_ID_BYTES {
        return Err(DecodeError::new(
            field,
            format!("at most {MAX_ID_BYTES} bytes, got {}", value.len()),
        ));
    }
    check_printable(field, value)
}

/// Refuses `value` when it holds a control character (U+0000–U+001F, U+007F–U+009F:
/// PostgreSQL stores no NUL in text, and none belongs in an id or a name), naming
/// `field`.
pub fn check_printable(field: &str, value: &str) -> Result<(), DecodeError> {
    match value.char_indices().find(|(_, c)| c.is_control()) {
        Some((at, c)) => Err(DecodeError::new(
            field,
            format!(
                "must not contain control characters, got U+{:04X} at byte {at}",
                u32::from(c)
            ),
        )),
        None => Ok(()),
    }
}

/// The same for an optional id.
pub(crate) fn check_opt_id(field: &str, value: Option<&str>) -> Result<(), DecodeError> {
    value.map_or(Ok(()), |v| check_id(field, v))
}

fn path_error(err: serde_path_to_error::Error<serde_json::Error>) -> DecodeError {
    let path = err.path().to_string();
    let inner = err.into_inner();
    // serde_json appends " at line L column C" to data errors; the path says more.
    let mut message = inner.to_string();
    if let Some(cut) = message.rfind(" at line ") {
        message.truncate(cut);
    }
    // A missing field is reported at the object that lacks it: name the field itself
    // (`operations[0]` → `operations[0].entityId`).
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'));
    // `.` is the whole value; `?` means serde could not tell (e.g. the text ended).
    let path = match (path.as_str(), missing) {
        (".", Some(field)) => field.to_owned(),
        (".", None) | ("?", _) => "input".to_owned(),
        (_, Some(field)) => format!("{path}.{field}"),
        (_, None) => path,
    };
    DecodeError { path, message }
}

/// Decodes a protocol value from JSON text; the error names the offending field (a
/// missing field by its own path, e.g. `operations[0].entityId`).
pub fn decode<T: DeserializeOwned>(json: &str) -> Result<T, DecodeError> {
    // Fast path: plain serde. Only a failure pays for tracking the path (again).
    if let Ok(value) = serde_json::from_str(json) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_str(json);
    let value = serde_path_to_error::deserialize(&mut de).map_err(path_error)?;
    de.end()
        .map_err(|e| DecodeError::new("input", format!("trailing characters: {e}")))?;
    Ok(value)
}

/// Decodes a protocol value from an already parsed JSON value; errors as [`decode`]'s.
pub fn decode_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, DecodeError> {
    // Fast path from a borrowed value; only a failure pays for tracking the path.
    if let Ok(decoded) = T::deserialize(&value) {
        return Ok(decoded);
    }
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
    DlqReplayed, DlqResponse, Event, EventMetadata, PollResponse, PublishEvent, Published,
};
pub use health::{Health, HealthServices, HealthState, ServiceHealth};
pub use message::{InteractionClass, MessageAccepted, MessageAck, SendMessage, WebSocketMessage};
pub use presence::{PresenceInfo, PresenceStatus, PresenceUpdate};
pub use transaction::{
    IDEMPOTENCY_KEY_HEADER, TransactionAccepted, TransactionRequest, TransactionState,
    TransactionStatus,
};

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_missing_field_is_named_in_the_path() {
        let err = decode::<SendMessage>(r#"{"payload":1}"#).unwrap_err();
        assert_eq!(err.path, "type");
        let request = json!({
            "requestId": "r", "clientId": "c", "tenantId": "t",
            "requestedAt": "2026-01-30T10:20:00Z",
            "operations": [{
                "operationId": "o1", "clientId": "c", "tenantId": "t", "entityType": "task",
                "operationType": "CREATE", "payload": {}, "timestamp": "2026-01-30T09:00:00Z",
                "vectorClock": {"c": 1},
            }],
        });
        let err = decode_value::<ReconciliationRequest>(request.clone()).unwrap_err();
        assert_eq!(err.path, "operations[0].entityId");
        assert_eq!(err.message, "missing field `entityId`");
        let err = decode::<ReconciliationRequest>(&request.to_string()).unwrap_err();
        assert_eq!(err.path, "operations[0].entityId");
        // Other errors keep their path.
        let err = decode::<SendMessage>(r#"{"type":5,"payload":1}"#).unwrap_err();
        assert_eq!(err.path, "type");
        assert_eq!(decode::<SendMessage>("{").unwrap_err().path, "input");
    }

    #[test]
    fn ids_longer_than_the_limit_are_refused_by_field() {
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let fits = "é".repeat(MAX_ID_BYTES / 2); // 256 bytes
        let message = |room: &str| SendMessage {
            message_id: Some("m".into()),
            message_type: "chat".into(),
            interaction_class: InteractionClass::ClassC,
            recipient_id: None,
            room_id: Some(room.into()),
            payload: serde_json::Value::Null,
            metadata: None,
        };
        assert!(message(&fits).validate().is_ok());
        let err = message(&long).validate().unwrap_err();
        assert_eq!(err.path, "roomId");
        assert_eq!(err.message, "at most 256 bytes, got 257");
        let mut m = message("r");
        m.message_id = Some(long.clone());
        assert_eq!(m.validate().unwrap_err().path, "messageId");
        let event = ClientEvent::JoinRoom {
            room_id: long.clone(),
        };
        assert_eq!(event.validate().unwrap_err().path, "data.roomId");
        let event = ClientEvent::Message(message(&long));
        assert_eq!(event.validate().unwrap_err().path, "data.roomId");
        let event = ClientEvent::Resume {
            last_event_id: long.clone(),
        };
        assert_eq!(event.validate().unwrap_err().path, "data.lastEventId");
        let publish: PublishEvent =
            decode(&json!({"eventType": "a.b", "payload": 1, "eventId": long}).to_string())
                .unwrap();
        assert_eq!(publish.validate().unwrap_err().path, "eventId");
        let claim = ClaimRequest {
            consumer_id: "c".into(),
            max: 1,
            visibility_timeout_ms: 1,
            event_types: Some(vec!["a".into(), long.clone()]),
        };
        assert_eq!(claim.validate().unwrap_err().path, "eventTypes[1]");
        let request = json!({
            "requestId": "r", "clientId": "c", "tenantId": "t",
            "requestedAt": "2026-01-30T10:20:00Z",
            "operations": [{
                "operationId": "o1", "clientId": "c", "tenantId": "t", "entityType": "task",
                "entityId": long, "operationType": "CREATE", "payload": {},
                "timestamp": "2026-01-30T09:00:00Z", "vectorClock": {"c": 1},
            }],
        });
        let mut request: ReconciliationRequest = decode_value(request).unwrap();
        assert_eq!(
            request.operations[0].validate().unwrap_err().path,
            "entityId"
        );
        assert_eq!(
            request.validate().unwrap_err().path,
            "operations[0].entityId"
        );
        request.operations.clear();
        assert!(request.validate().is_ok());
        request.request_id = long;
        assert_eq!(request.validate().unwrap_err().path, "requestId");
    }

    #[test]
    fn nesting_depth_counts_objects_and_arrays_at_any_depth() {
        assert_eq!(nesting_depth(&json!(1)), 0);
        assert_eq!(nesting_depth(&json!({})), 1);
        assert_eq!(nesting_depth(&json!({"a": [1, {"b": []}], "c": 2})), 4);
        // Deeper than any recursive walk's stack would allow.
        let mut deep = json!(0);
        for _ in 0..100_000 {
            // Not `json!([deep])`: that serializes `deep` again, recursively.
            deep = serde_json::Value::Array(vec![deep]);
        }
        assert_eq!(nesting_depth(&deep), 100_000);
        // serde_json's own drop of it recurses: take it apart first.
        let mut v = deep;
        while let serde_json::Value::Array(mut a) = v {
            v = a.pop().unwrap_or_default();
        }
    }

    #[test]
    fn ids_with_control_characters_are_refused_by_field() {
        let message = |id: &str, recipient: &str| SendMessage {
            message_id: Some(id.into()),
            message_type: "chat".into(),
            interaction_class: InteractionClass::ClassC,
            recipient_id: Some(recipient.into()),
            room_id: None,
            payload: json!({"text": "a\u{0}b is fine in a payload"}),
            metadata: None,
        };
        assert!(message("m-1", "bob").validate().is_ok());
        assert!(message("é ü 名前", "bob").validate().is_ok(), "not ASCII");
        let err = message("m\u{0}1", "bob").validate().unwrap_err();
        assert_eq!(err.path, "messageId");
        assert_eq!(
            err.message,
            "must not contain control characters, got U+0000 at byte 1"
        );
        for bad in ["\n", "\t", "\u{1f}", "\u{7f}", "\u{85}"] {
            let err = message("m", &format!("bob{bad}")).validate().unwrap_err();
            assert_eq!(err.path, "recipientId", "{bad:?}");
        }
        let event = ClientEvent::JoinRoom {
            room_id: "r\u{0}".into(),
        };
        assert_eq!(event.validate().unwrap_err().path, "data.roomId");
        let publish: PublishEvent =
            decode(&json!({"eventType": "a.b", "payload": 1, "eventId": "e\u{0}"}).to_string())
                .unwrap();
        assert_eq!(publish.validate().unwrap_err().path, "eventId");
        let publish: PublishEvent =
            decode(&json!({"eventType": "a\u{0}b", "payload": 1}).to_string()).unwrap();
        assert_eq!(publish.validate().unwrap_err().path, "eventType");
        let request = json!({
            "requestId": "r", "clientId": "c", "tenantId": "t",
            "requestedAt": "2026-01-30T10:20:00Z",
            "operations": [{
                "operationId": "o1", "clientId": "c", "tenantId": "t\u{0}", "entityType": "task",
                "entityId": "e", "operationType": "CREATE", "payload": {},
                "timestamp": "2026-01-30T09:00:00Z", "vectorClock": {"c": 1},
            }],
        });
        let request: ReconciliationRequest = decode_value(request).unwrap();
        assert_eq!(
            request.validate().unwrap_err().path,
            "operations[0].tenantId"
        );
    }
}
