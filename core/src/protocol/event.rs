//! The event bus on the wire (PROTOCOL.md §4, §6 "Publishing", "Consumer groups",
//! "DLQ"): the [`Event`], polling, publishing, consumer-group claims and acks, and the
//! dead-letter queue.
//!
//! Every durable delivery is an [`Event`] in the tenant's ordered log, with a `sequence`.
//! A durable message is an event with `eventType` [`MESSAGE_EVENT_TYPE`] whose payload is
//! the [`WebSocketMessage`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::message::WebSocketMessage;
use super::{DecodeError, JsonObject, Timestamp, check_id, check_opt_id, decode_value};

/// `eventType` of an event that carries a durable message as its payload.
pub const MESSAGE_EVENT_TYPE: &str = "message";
/// `eventType` of the event telling a user their transaction was confirmed.
pub const TRANSACTION_CONFIRMED_EVENT_TYPE: &str = "transaction.confirmed";
/// `eventType` of the event telling a user their transaction was rejected.
pub const TRANSACTION_REJECTED_EVENT_TYPE: &str = "transaction.rejected";
/// `schemaVersion` the server sets when a publisher gives none.
pub const DEFAULT_SCHEMA_VERSION: &str = "1.0";
/// Page size of `GET /api/events/poll` when `limit` is absent.
pub const DEFAULT_POLL_LIMIT: u32 = 100;
/// Largest `limit` of `GET /api/events/poll`.
pub const MAX_POLL_LIMIT: u32 = 1000;

/// Where an event came from and what it relates to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventMetadata {
    /// Groups the events of one logical flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The event that caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// Distributed-tracing id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The producer, e.g. `order-service` (the publisher's userId by default).
    pub source: String,
    /// The user on whose behalf the event was produced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Any other keys, kept as they are.
    #[serde(flatten)]
    pub extra: JsonObject,
}

impl EventMetadata {
    /// Metadata naming only its `source`.
    pub fn from_source(source: impl Into<String>) -> Self {
        Self {
            correlation_id: None,
            causation_id: None,
            trace_id: None,
            source: source.into(),
            user_id: None,
            extra: JsonObject::new(),
        }
    }
}

/// One durable event of a tenant's log: `data` of the server's `event` frame, and an
/// item of polls, claims and the DLQ.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// The event's id (UUID); the cursor for polls and resumes.
    pub event_id: String,
    /// Dotted type, e.g. `order.placed`, or [`MESSAGE_EVENT_TYPE`].
    pub event_type: String,
    /// The tenant whose log holds it.
    pub tenant_id: String,
    /// When the server accepted it.
    pub timestamp: Timestamp,
    /// The content: any JSON value.
    #[serde(default)]
    pub payload: Value,
    /// Where it came from.
    pub metadata: EventMetadata,
    /// Version of the payload's schema, e.g. `1.0`.
    pub schema_version: String,
    /// Its position in the tenant's log (always set by this server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
}

impl Event {
    /// The durable message this event carries, when its type is [`MESSAGE_EVENT_TYPE`];
    /// an error names the offending field under `payload`.
    pub fn message(&self) -> Option<Result<WebSocketMessage, DecodeError>> {
        if self.event_type != MESSAGE_EVENT_TYPE {
            return None;
        }
        Some(decode_value(self.payload.clone()).map_err(|e| {
            let path = if e.path == "input" {
                "payload".to_owned()
            } else {
                format!("payload.{}", e.path)
            };
            DecodeError::new(path, e.message)
        }))
    }
}

/// Answer to `GET /api/events/poll?lastEventId=&limit=`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PollResponse {
    /// The events after the cursor, in sequence order.
    #[serde(default)]
    pub events: Vec<Event>,
    /// True when more events are waiting after this page.
    pub has_more: bool,
    /// The cursor to send next time: the last event of the page, or the cursor sent
    /// when the page is empty (`null` when none was sent).
    #[serde(default)]
    pub next_event_id: Option<String>,
}

/// Body of `POST /api/events` (roles `service` or `admin`): publish one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishEvent {
    /// Idempotency key; the server makes one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// Dotted type, e.g. `order.placed` (required).
    pub event_type: String,
    /// The content: any JSON value (required, `null` allowed).
    pub payload: Value,
    /// [`EventMetadata`] fields; `source` defaults to the caller's userId, so it is a
    /// plain object here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<JsonObject>,
    /// Payload schema version; [`DEFAULT_SCHEMA_VERSION`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<String>,
    /// Must be the caller's tenant when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// Deliver to this user only (at most one of this and `room_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_id: Option<String>,
    /// Deliver to this room's members only (at most one of this and `recipient_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_id: Option<String>,
}

impl PublishEvent {
    /// Checks what serde cannot: a non-blank `eventType`, at most one target, and no id
    /// longer than [`super::MAX_ID_BYTES`] or holding a control character.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.event_type.trim().is_empty() {
            return Err(DecodeError::new("eventType", "must not be empty"));
        }
        if self.recipient_id.is_some() && self.room_id.is_some() {
            return Err(DecodeError::new(
                "roomId",
                "at most one of recipientId and roomId may be set, got both",
            ));
        }
        check_id("eventType", &self.event_type)?;
        check_opt_id("eventId", self.event_id.as_deref())?;
        check_opt_id("recipientId", self.recipient_id.as_deref())?;
        check_opt_id("roomId", self.room_id.as_deref())
    }
}

/// Body of the `201` answer to `POST /api/events`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Published {
    /// The event's id (the publisher's, or made by the server).
    pub event_id: String,
    /// Its position in the tenant's log.
    pub sequence: u64,
}

/// Body of `POST /api/eventbus/groups/{group}/claim`: lease up to `max` events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRequest {
    /// The consumer within the group taking the lease.
    pub consumer_id: String,
    /// Most events to lease.
    pub max: u32,
    /// How long the lease lasts before the events are redelivered, in milliseconds.
    pub visibility_timeout_ms: u64,
    /// Only events of these types (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_types: Option<Vec<String>>,
}

impl ClaimRequest {
    /// Checks what serde cannot: a non-blank `consumerId`, `max` ≥ 1, and no id (the
    /// consumer's, an event type) longer than [`super::MAX_ID_BYTES`] or holding a
    /// control character.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.consumer_id.trim().is_empty() {
            return Err(DecodeError::new("consumerId", "must not be empty"));
        }
        if self.max == 0 {
            return Err(DecodeError::new("max", "must be at least 1"));
        }
        check_id("consumerId", &self.consumer_id)?;
        for (i, event_type) in self.event_types.iter().flatten().enumerate() {
            check_id(&format!("eventTypes[{i}]"), event_type)?;
        }
        Ok(())
    }
}

/// One leased event of a [`ClaimResponse`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimedEvent {
    /// The event.
    pub event: Event,
    /// How many times it has been delivered to this group, this one included.
    pub delivery_count: u32,
    /// When the lease ends and the event becomes claimable again unless acked.
    pub lease_expires_at: Timestamp,
}

/// Answer to a claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimResponse {
    /// The leased events, in sequence order (possibly none).
    #[serde(default)]
    pub events: Vec<ClaimedEvent>,
}

/// Body of `POST /api/eventbus/groups/{group}/ack`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AckRequest {
    /// The events the consumer has processed.
    pub event_ids: Vec<String>,
}

/// Answer to an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AckResponse {
    /// How many of the ids were leased to the group and are now done.
    pub acked: u64,
}

/// Which consumer failed a dead-lettered event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerInfo {
    /// The consumer that held the last lease.
    pub consumer_id: String,
    /// Its group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_group: Option<String>,
}

/// An event that exhausted its retries in a consumer group (ORIGIN.md §2.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DlqEntry {
    /// The entry's id (for replay).
    pub dlq_id: String,
    /// The event, unchanged.
    pub original_event: Event,
    /// Why it failed, e.g. `lease expired without ack`.
    pub failure_reason: String,
    /// A stack trace, when the consumer reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_stack_trace: Option<String>,
    /// Number of failed deliveries.
    pub retry_count: u32,
    /// When the first delivery failed.
    pub first_failed_at: Timestamp,
    /// When the last delivery failed.
    pub last_failed_at: Timestamp,
    /// Who failed it.
    pub consumer_info: ConsumerInfo,
}

/// Answer to `GET /api/eventbus/dlq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DlqResponse {
    /// The dead-lettered events.
    #[serde(default)]
    pub entries: Vec<DlqEntry>,
}

/// Answer to `POST /api/eventbus/dlq/{dlqId}/replay`: the entry left the DLQ and its
/// event is claimable again in its group (a fresh delivery count).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DlqReplayed {
    /// The replayed DLQ entry.
    pub dlq_id: String,
    /// Its event.
    pub event_id: String,
    /// The group it is redelivered to.
    pub consumer_group: String,
    /// Always `true` in a success answer.
    pub replayed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::decode;

    #[test]
    fn metadata_keeps_extra_keys() {
        let meta: EventMetadata =
            decode(r#"{"source":"orders","traceId":"t1","region":"eu","n":3}"#).unwrap();
        assert_eq!(meta.source, "orders");
        assert_eq!(meta.trace_id.as_deref(), Some("t1"));
        assert_eq!(meta.extra.len(), 2);
        let back = serde_json::to_value(&meta).unwrap();
        assert_eq!(back["region"], "eu");
        assert_eq!(back["traceId"], "t1");
    }

    #[test]
    fn a_message_event_yields_its_message() {
        let event: Event = decode(
            r#"{"eventId":"e1","eventType":"message","tenantId":"t","timestamp":"2026-01-30T10:00:00Z",
                "payload":{"messageId":"m","type":"chat","interactionClass":"CLASS_C","tenantId":"t",
                "senderId":"u","roomId":"r","payload":1,"timestamp":"2026-01-30T10:00:00Z"},
                "metadata":{"source":"u"},"schemaVersion":"1.0","sequence":4}"#,
        )
        .unwrap();
        let msg = event.message().unwrap().unwrap();
        assert_eq!(msg.message_id, "m");
        let mut bad = event.clone();
        bad.payload["interactionClass"] = "CLASS_Z".into();
        assert_eq!(
            bad.message().unwrap().unwrap_err().path,
            "payload.interactionClass"
        );
        bad.event_type = "order.placed".into();
        assert!(bad.message().is_none());
    }

    #[test]
    fn empty_poll_page_keeps_null_cursor() {
        let page = PollResponse {
            events: vec![],
            has_more: false,
            next_event_id: None,
        };
        assert_eq!(
            serde_json::to_string(&page).unwrap(),
            r#"{"events":[],"hasMore":false,"nextEventId":null}"#
        );
    }
}
