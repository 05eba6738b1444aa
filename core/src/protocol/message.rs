//! Messages between users (PROTOCOL.md §3, §4): interaction classes, the client's
//! `message` ([`SendMessage`], also the body of `POST /api/messages`), the delivered
//! [`WebSocketMessage`], and the two acknowledgements.
//!
//! `CLASS_A` messages are live only; `CLASS_B` and `CLASS_C` are durable: each gets an
//! `eventId` and a `sequence` from the tenant's ordered log before it is acknowledged.
//! `CLASS_D` (critical transactions) never travels over realtime.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{DecodeError, JsonObject, Timestamp, check_id, check_opt_id};

/// How a message may travel, and whether it is stored.
///
/// Strict on the wire: an unknown class is a [`DecodeError`] naming the field.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InteractionClass {
    /// Live presence-like traffic: never stored, never replayed.
    ClassA,
    /// Event streaming: realtime preferred, durable, with an async fallback.
    ClassB,
    /// Low-latency interaction: realtime for experience, durable for correctness.
    #[default]
    ClassC,
    /// Critical transactions: realtime not allowed (use `/api/transactions`).
    ClassD,
}

impl InteractionClass {
    /// The classes a server offers over the WebSocket (`connected.interactionClasses`).
    pub const REALTIME: [InteractionClass; 3] = [
        InteractionClass::ClassA,
        InteractionClass::ClassB,
        InteractionClass::ClassC,
    ];

    /// The class as written on the wire, e.g. `"CLASS_B"`.
    pub fn as_str(self) -> &'static str {
        match self {
            InteractionClass::ClassA => "CLASS_A",
            InteractionClass::ClassB => "CLASS_B",
            InteractionClass::ClassC => "CLASS_C",
            InteractionClass::ClassD => "CLASS_D",
        }
    }

    /// Parses a wire name; `None` for an unknown class.
    pub fn from_wire(name: &str) -> Option<Self> {
        match name {
            "CLASS_A" => Some(InteractionClass::ClassA),
            "CLASS_B" => Some(InteractionClass::ClassB),
            "CLASS_C" => Some(InteractionClass::ClassC),
            "CLASS_D" => Some(InteractionClass::ClassD),
            _ => None,
        }
    }

    /// True for classes that may travel over the WebSocket (all but `CLASS_D`).
    pub fn realtime_allowed(self) -> bool {
        self != InteractionClass::ClassD
    }

    /// True for classes stored in the tenant's log and replayed (`CLASS_B`, `CLASS_C`).
    pub fn is_durable(self) -> bool {
        matches!(self, InteractionClass::ClassB | InteractionClass::ClassC)
    }
}

impl fmt::Display for InteractionClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `data` of the client's `message` frame, and the body of `POST /api/messages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SendMessage {
    /// Client-made UUID; a resent id is acknowledged again and never delivered twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Free-form message type, e.g. `chat.message`.
    #[serde(rename = "type")]
    pub message_type: String,
    /// The class; `CLASS_C` when absent.
    #[serde(default)]
    pub interaction_class: InteractionClass,
    /// The user a direct message goes to (exactly one of this and `room_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_id: Option<String>,
    /// The room a message goes to (exactly one of this and `recipient_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_id: Option<String>,
    /// The content: any JSON value (required, `null` allowed).
    pub payload: Value,
    /// Free-form extra data, delivered with the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<JsonObject>,
}

impl SendMessage {
    /// Checks what serde cannot: a non-blank `type` and `messageId`, exactly one of
    /// `recipientId` / `roomId`, non-blank, and no id longer than
    /// [`super::MAX_ID_BYTES`] or holding a control character.
    ///
    /// The error names the field (`type`, `messageId`, `recipientId` or `roomId`),
    /// relative to the message.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.message_type.trim().is_empty() {
            return Err(DecodeError::new("type", "must not be empty"));
        }
        if let Some(id) = &self.message_id
            && id.trim().is_empty()
        {
            return Err(DecodeError::new(
                "messageId",
                "must not be empty when present",
            ));
        }
        match (&self.recipient_id, &self.room_id) {
            (Some(_), Some(_)) => Err(DecodeError::new(
                "roomId",
                "exactly one of recipientId and roomId may be set, got both",
            )),
            (None, None) => Err(DecodeError::new(
                "recipientId",
                "exactly one of recipientId and roomId is required, got neither",
            )),
            (Some(recipient), None) if recipient.trim().is_empty() => {
                Err(DecodeError::new("recipientId", "must not be empty"))
            }
            (None, Some(room)) if room.trim().is_empty() => {
                Err(DecodeError::new("roomId", "must not be empty"))
            }
            _ => {
                check_id("type", &self.message_type)?;
                check_opt_id("messageId", self.message_id.as_deref())?;
                check_opt_id("recipientId", self.recipient_id.as_deref())?;
                check_opt_id("roomId", self.room_id.as_deref())
            }
        }
    }
}

/// `data` of the server's `message` frame: a message as delivered to its recipients.
///
/// Durable messages also appear in polls and replays as an
/// [`Event`](super::event::Event) with `eventType` `message` and this as `payload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebSocketMessage {
    /// The message's id (the client's, or made by the server).
    pub message_id: String,
    /// Free-form message type, e.g. `chat.message`.
    #[serde(rename = "type")]
    pub message_type: String,
    /// The class it was sent with.
    pub interaction_class: InteractionClass,
    /// The tenant (the sender's, from the token).
    pub tenant_id: String,
    /// The sending user (from the token).
    pub sender_id: String,
    /// The recipient of a direct message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_id: Option<String>,
    /// The room of a room message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_id: Option<String>,
    /// The content: any JSON value.
    #[serde(default)]
    pub payload: Value,
    /// When the server accepted it.
    pub timestamp: Timestamp,
    /// The sender's extra data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<JsonObject>,
    /// The event id in the tenant's log (durable classes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// The position in the tenant's log (durable classes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
}

/// `data` of the server's `message_ack` frame: the message was accepted (and, when
/// durable, stored) — not that it was delivered.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageAck {
    /// The acknowledged message.
    pub message_id: String,
    /// Its event id in the tenant's log (durable classes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// Its position in the tenant's log (durable classes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
}

/// Body of the `201` answer to `POST /api/messages` (always durable).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageAccepted {
    /// The accepted message.
    pub message_id: String,
    /// Its event id in the tenant's log.
    pub event_id: String,
    /// Its position in the tenant's log.
    pub sequence: u64,
}

impl From<MessageAccepted> for MessageAck {
    fn from(accepted: MessageAccepted) -> Self {
        MessageAck {
            message_id: accepted.message_id,
            event_id: Some(accepted.event_id),
            sequence: Some(accepted.sequence),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::decode;

    fn message(extra: &str) -> Result<SendMessage, DecodeError> {
        decode(&format!(
            r#"{{"type":"chat.message","payload":{{"text":"hi"}}{extra}}}"#
        ))
    }

    #[test]
    fn class_defaults_to_c_and_unknown_class_is_an_error() {
        let msg = message(r#","roomId":"r1""#).unwrap();
        assert_eq!(msg.interaction_class, InteractionClass::ClassC);
        assert!(msg.validate().is_ok());
        let err = message(r#","roomId":"r1","interactionClass":"CLASS_X""#).unwrap_err();
        assert_eq!(err.path, "interactionClass");
    }

    #[test]
    fn validate_requires_exactly_one_target() {
        let both = message(r#","roomId":"r1","recipientId":"u2""#).unwrap();
        assert_eq!(both.validate().unwrap_err().path, "roomId");
        let neither = message("").unwrap();
        assert_eq!(neither.validate().unwrap_err().path, "recipientId");
        let blank = message(r#","roomId":" ""#).unwrap();
        assert_eq!(blank.validate().unwrap_err().path, "roomId");
    }

    #[test]
    fn payload_is_required_but_may_be_null() {
        assert!(decode::<SendMessage>(r#"{"type":"t","payload":null,"roomId":"r"}"#).is_ok());
        let err = decode::<SendMessage>(r#"{"type":"t","roomId":"r"}"#).unwrap_err();
        assert!(err.message.contains("payload"), "{err}");
    }

    #[test]
    fn class_properties() {
        assert!(InteractionClass::ClassB.is_durable());
        assert!(!InteractionClass::ClassA.is_durable());
        assert!(!InteractionClass::ClassD.realtime_allowed());
        for class in InteractionClass::REALTIME {
            assert_eq!(InteractionClass::from_wire(class.as_str()), Some(class));
        }
    }
}
