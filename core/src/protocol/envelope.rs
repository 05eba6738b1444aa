//! The WebSocket layer (PROTOCOL.md §3, §6 "ref", "Numbers"): the [`Frame`] envelope,
//! the typed [`ClientEvent`] (client → server) and [`ServerEvent`] (server → client),
//! the [`Connected`] greeting, and the endpoint's constants (query parameters, close
//! codes, heartbeat defaults).
//!
//! Every text frame is one JSON object `{"event": name, "data": object or null,
//! "ref"?: string}`. The server copies a frame's `ref` into the envelope of its answer
//! (`message_ack`, `room_joined`, `room_left`, `resumed`, `pong`, `error`); an `error`
//! also repeats it in `data.ref`.
//!
//! Decoding is lenient where a newer peer may say more: an unknown event name decodes to
//! an `Unknown` variant (never an error) and unknown fields are ignored. It is strict
//! where a value would be wrong: malformed JSON, a frame that is not an object, a missing
//! or non-string `event`, or bad `data` for a known event are [`DecodeError`]s naming the
//! field (`input`, `event`, `ref`, `data`, `data.roomId`, …).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::error::ErrorBody;
use super::event::Event;
use super::message::{InteractionClass, MessageAck, SendMessage, WebSocketMessage};
use super::presence::{PresenceInfo, PresenceUpdate};
use super::{DecodeError, JsonObject, Timestamp, decode_value};

/// Default path of the WebSocket endpoint (`WS_PATH`).
pub const DEFAULT_WS_PATH: &str = "/ws";
/// Query parameter carrying the token when no `Authorization` header can be set.
pub const TOKEN_QUERY_PARAM: &str = "token";
/// Query parameter carrying the SDK installation's persistent client id.
pub const CLIENT_ID_QUERY_PARAM: &str = "clientId";
/// Query parameter asking the server to resume after this event on connect.
pub const LAST_EVENT_ID_QUERY_PARAM: &str = "lastEventId";
/// Default largest accepted frame, in bytes (`WS_MAX_FRAME_BYTES`, 1 MiB).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Default interval between server pings, in milliseconds (`WS_PING_INTERVAL`).
pub const DEFAULT_PING_INTERVAL_MS: u64 = 30_000;
/// Default silence after which a connection is closed, in milliseconds
/// (`WS_PING_TIMEOUT`).
pub const DEFAULT_PING_TIMEOUT_MS: u64 = 60_000;
/// Close reason sent with [`close_code::POLICY_VIOLATION`] when the token expired.
pub const AUTH_EXPIRED_CLOSE_REASON: &str = "AUTH_EXPIRED";

/// WebSocket close codes used by the server.
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// Policy: the token expired (reason `AUTH_EXPIRED`) or repeated violations.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A frame was over the size limit.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The server is full; try again later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// One WebSocket text frame: `{"event", "data", "ref"?}`, before its `data` is typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    /// The event name, e.g. `join_room`.
    pub event: String,
    /// The event's data: an object, or `null` (also when absent).
    #[serde(default)]
    pub data: Value,
    /// The client's correlation token, copied into the answer.
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

impl Frame {
    /// A frame for `event` with `data` and no `ref`.
    pub fn new(event: impl Into<String>, data: Value) -> Self {
        Self {
            event: event.into(),
            data,
            reference: None,
        }
    }

    /// The same frame carrying `reference` as its `ref`.
    pub fn with_ref(mut self, reference: impl Into<String>) -> Self {
        self.reference = Some(reference.into());
        self
    }

    /// Parses one text frame. Errors: malformed JSON or a non-object (`input`), a
    /// missing or non-string `event` (`event`), a non-string `ref` (`ref`).
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| DecodeError::new("input", format!("malformed JSON: {e}")))?;
        Self::from_value(value)
    }

    /// Reads a frame from an already parsed JSON value (see [`Frame::decode`]).
    pub fn from_value(value: Value) -> Result<Self, DecodeError> {
        let Value::Object(mut object) = value else {
            return Err(DecodeError::new(
                "input",
                format!(
                    "a frame must be a JSON object, got {}",
                    super::json_kind(&value)
                ),
            ));
        };
        let event = match object.remove("event") {
            Some(Value::String(event)) => event,
            None => return Err(DecodeError::new("event", "missing field `event`")),
            Some(other) => {
                return Err(DecodeError::new(
                    "event",
                    format!("must be a string, got {}", super::json_kind(&other)),
                ));
            }
        };
        let data = object.remove("data").unwrap_or(Value::Null);
        let reference = match object.remove("ref") {
            None | Some(Value::Null) => None,
            Some(Value::String(reference)) => Some(reference),
            Some(other) => {
                return Err(DecodeError::new(
                    "ref",
                    format!("must be a string, got {}", super::json_kind(&other)),
                ));
            }
        };
        Ok(Self {
            event,
            data,
            reference,
        })
    }

    /// The frame as a JSON value (`data` always present, `ref` only when set).
    pub fn to_value(&self) -> Value {
        let mut object = JsonObject::new();
        object.insert("event".into(), Value::String(self.event.clone()));
        object.insert("data".into(), self.data.clone());
        if let Some(reference) = &self.reference {
            object.insert("ref".into(), Value::String(reference.clone()));
        }
        Value::Object(object)
    }

    /// The frame as JSON text, ready to send.
    pub fn encode(&self) -> String {
        // Serialising strings and a `Value` cannot fail; the fallback keeps this total.
        serde_json::to_string(self).unwrap_or_else(|_| self.to_value().to_string())
    }
}

/// `data` of the server's `connected` frame: the first frame of every connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Connected {
    /// The server's id of this connection.
    pub connection_id: String,
    /// The client id in use: the one from the query, or one the server made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The server's clock, for the client's clock-offset estimate.
    pub server_time: Timestamp,
    /// The classes allowed over this connection (`CLASS_A`, `CLASS_B`, `CLASS_C`);
    /// names this version does not know are skipped.
    #[serde(deserialize_with = "known_classes")]
    pub interaction_classes: Vec<InteractionClass>,
    /// How often the server pings, in milliseconds.
    pub ping_interval: u64,
    /// Silence after which either side gives the connection up, in milliseconds.
    pub ping_timeout: u64,
}

/// Reads a list of class names, skipping names from a newer protocol version.
fn known_classes<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<InteractionClass>, D::Error> {
    let names = Vec::<String>::deserialize(deserializer)?;
    Ok(names
        .iter()
        .filter_map(|name| InteractionClass::from_wire(name))
        .collect())
}

/// A typed client → server frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// `message`: send a message to a user or a room; answered by `message_ack`.
    Message(SendMessage),
    /// `join_room`: become a member of a room; answered by `room_joined`.
    JoinRoom {
        /// The room.
        room_id: String,
    },
    /// `leave_room`: stop being a member; answered by `room_left`.
    LeaveRoom {
        /// The room.
        room_id: String,
    },
    /// `presence_update`: announce a status; not answered.
    PresenceUpdate(PresenceUpdate),
    /// `resume`: replay the durable deliveries after a cursor; ends with `resumed`.
    Resume {
        /// The last event the client has processed.
        last_event_id: String,
    },
    /// `ping`: answered by `pong`; `data` is ignored.
    Ping,
    /// An event this version does not know, kept as it came.
    Unknown {
        /// Its name.
        event: String,
        /// Its data, untouched.
        data: Value,
    },
}

/// `data` of `join_room`, `leave_room`, `room_joined` and `room_left`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RoomData {
    room_id: String,
}

/// `data` of `resume`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResumeData {
    last_event_id: String,
}

/// `data` of `resumed`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResumedData {
    #[serde(default)]
    last_event_id: Option<String>,
    replayed: u64,
}

/// `data` of `pong`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PongData {
    server_time: Timestamp,
}

impl ClientEvent {
    /// The event names this version knows, client → server.
    pub const NAMES: [&'static str; 6] = [
        "message",
        "join_room",
        "leave_room",
        "presence_update",
        "resume",
        "ping",
    ];

    /// The event name on the wire.
    pub fn name(&self) -> &str {
        match self {
            ClientEvent::Message(_) => "message",
            ClientEvent::JoinRoom { .. } => "join_room",
            ClientEvent::LeaveRoom { .. } => "leave_room",
            ClientEvent::PresenceUpdate(_) => "presence_update",
            ClientEvent::Resume { .. } => "resume",
            ClientEvent::Ping => "ping",
            ClientEvent::Unknown { event, .. } => event,
        }
    }

    /// Parses one text frame into the event and its `ref`.
    ///
    /// A server that must answer a bad frame with its `ref` uses [`Frame::decode`] and
    /// then [`ClientEvent::from_frame`] instead, keeping the frame's `ref`.
    pub fn decode(text: &str) -> Result<(Self, Option<String>), DecodeError> {
        let mut frame = Frame::decode(text)?;
        let reference = frame.reference.take();
        Ok((Self::from_frame(frame)?, reference))
    }

    /// Types a frame's `data` by its event name; an unknown name gives
    /// [`ClientEvent::Unknown`]. The frame's `ref` is dropped.
    pub fn from_frame(frame: Frame) -> Result<Self, DecodeError> {
        let Frame { event, data, .. } = frame;
        Ok(match event.as_str() {
            "message" => ClientEvent::Message(decode_data(data)?),
            "join_room" => ClientEvent::JoinRoom {
                room_id: decode_data::<RoomData>(data)?.room_id,
            },
            "leave_room" => ClientEvent::LeaveRoom {
                room_id: decode_data::<RoomData>(data)?.room_id,
            },
            "presence_update" => ClientEvent::PresenceUpdate(decode_data(data)?),
            "resume" => ClientEvent::Resume {
                last_event_id: decode_data::<ResumeData>(data)?.last_event_id,
            },
            "ping" => ClientEvent::Ping,
            _ => ClientEvent::Unknown { event, data },
        })
    }

    /// Checks what decoding cannot (see [`SendMessage::validate`]); room ids and
    /// cursors must not be blank, longer than [`super::MAX_ID_BYTES`] nor hold a control
    /// character. Paths are relative to the frame (`data.roomId`).
    pub fn validate(&self) -> Result<(), DecodeError> {
        match self {
            ClientEvent::Message(message) => message
                .validate()
                .map_err(|e| DecodeError::new(format!("data.{}", e.path), e.message)),
            ClientEvent::JoinRoom { room_id } | ClientEvent::LeaveRoom { room_id } => {
                if room_id.trim().is_empty() {
                    return Err(DecodeError::new("data.roomId", "must not be empty"));
                }
                super::check_id("data.roomId", room_id)
            }
            ClientEvent::Resume { last_event_id } => {
                if last_event_id.trim().is_empty() {
                    return Err(DecodeError::new("data.lastEventId", "must not be empty"));
                }
                super::check_id("data.lastEventId", last_event_id)
            }
            _ => Ok(()),
        }
    }

    /// The frame for this event, carrying `reference` as its `ref`.
    pub fn to_frame(&self, reference: Option<&str>) -> Frame {
        let data = match self {
            ClientEvent::Message(message) => to_data(message),
            ClientEvent::JoinRoom { room_id } | ClientEvent::LeaveRoom { room_id } => {
                to_data(&RoomData {
                    room_id: room_id.clone(),
                })
            }
            ClientEvent::PresenceUpdate(update) => to_data(update),
            ClientEvent::Resume { last_event_id } => to_data(&ResumeData {
                last_event_id: last_event_id.clone(),
            }),
            ClientEvent::Ping => Value::Null,
            ClientEvent::Unknown { data, .. } => data.clone(),
        };
        Frame {
            event: self.name().to_owned(),
            data,
            reference: reference.map(str::to_owned),
        }
    }

    /// The JSON text of this event's frame, carrying `reference` as its `ref`.
    ///
    /// Written in one pass from the typed data (no intermediate [`Value`]); the JSON is
    /// the same as [`ClientEvent::to_frame`]'s, fields in declaration order.
    pub fn encode(&self, reference: Option<&str>) -> String {
        let name = self.name();
        let text = match self {
            ClientEvent::Message(message) => encode_frame(name, message, reference),
            ClientEvent::JoinRoom { room_id } | ClientEvent::LeaveRoom { room_id } => {
                encode_frame(name, &RoomDataRef { room_id }, reference)
            }
            ClientEvent::PresenceUpdate(update) => encode_frame(name, update, reference),
            ClientEvent::Resume { last_event_id } => {
                encode_frame(name, &ResumeDataRef { last_event_id }, reference)
            }
            ClientEvent::Ping => encode_frame(name, &Value::Null, reference),
            ClientEvent::Unknown { data, .. } => encode_frame(name, data, reference),
        };
        text.unwrap_or_else(|| self.to_frame(reference).encode())
    }
}

/// A frame as written: the event name, its typed `data`, and the `ref` when set.
#[derive(Serialize)]
struct FrameOut<'a, T: Serialize + ?Sized> {
    event: &'a str,
    data: &'a T,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a str>,
}

/// `data` of the room events, borrowed.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RoomDataRef<'a> {
    room_id: &'a str,
}

/// `data` of `resume`, borrowed.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResumeDataRef<'a> {
    last_event_id: &'a str,
}

/// Writes a frame straight from typed data; `None` if serialisation failed (the
/// protocol types cannot fail; callers fall back to the `Value` path).
fn encode_frame<T: Serialize + ?Sized>(
    event: &str,
    data: &T,
    reference: Option<&str>,
) -> Option<String> {
    serde_json::to_string(&FrameOut {
        event,
        data,
        reference,
    })
    .ok()
}

/// A typed server → client frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerEvent {
    /// `connected`: the greeting, first frame of every connection.
    Connected(Connected),
    /// `message`: a message for this user (from another user, or the user's own from
    /// another connection).
    Message(WebSocketMessage),
    /// `event`: a durable bus event for this user.
    Event(Event),
    /// `presence`: a user sharing a room changed presence.
    Presence(PresenceInfo),
    /// `message_ack`: a `message` was accepted (stored, when durable).
    MessageAck(MessageAck),
    /// `room_joined`: answer to `join_room`.
    RoomJoined {
        /// The room.
        room_id: String,
    },
    /// `room_left`: answer to `leave_room`.
    RoomLeft {
        /// The room.
        room_id: String,
    },
    /// `resumed`: the replay asked for by `resume` (or the `lastEventId` query) is done.
    Resumed {
        /// The last event replayed: the new cursor (the request's when none was).
        last_event_id: Option<String>,
        /// How many deliveries were replayed.
        replayed: u64,
    },
    /// `pong`: answer to `ping`.
    Pong {
        /// The server's clock.
        server_time: Timestamp,
    },
    /// `error`: a frame was refused; the connection stays open.
    Error(ErrorBody),
    /// An event this version does not know, kept as it came.
    Unknown {
        /// Its name.
        event: String,
        /// Its data, untouched.
        data: Value,
    },
}

impl ServerEvent {
    /// The event names this version knows, server → client.
    pub const NAMES: [&'static str; 10] = [
        "connected",
        "message",
        "event",
        "presence",
        "message_ack",
        "room_joined",
        "room_left",
        "resumed",
        "pong",
        "error",
    ];

    /// The event name on the wire.
    pub fn name(&self) -> &str {
        match self {
            ServerEvent::Connected(_) => "connected",
            ServerEvent::Message(_) => "message",
            ServerEvent::Event(_) => "event",
            ServerEvent::Presence(_) => "presence",
            ServerEvent::MessageAck(_) => "message_ack",
            ServerEvent::RoomJoined { .. } => "room_joined",
            ServerEvent::RoomLeft { .. } => "room_left",
            ServerEvent::Resumed { .. } => "resumed",
            ServerEvent::Pong { .. } => "pong",
            ServerEvent::Error(_) => "error",
            ServerEvent::Unknown { event, .. } => event,
        }
    }

    /// Parses one text frame into the event and the `ref` it answers (for an `error`
    /// without an envelope `ref`, its `data.ref`).
    pub fn decode(text: &str) -> Result<(Self, Option<String>), DecodeError> {
        let mut frame = Frame::decode(text)?;
        let reference = frame.reference.take();
        let event = Self::from_frame(frame)?;
        let reference = match (&event, reference) {
            (ServerEvent::Error(body), None) => body.reference.clone(),
            (_, reference) => reference,
        };
        Ok((event, reference))
    }

    /// Types a frame's `data` by its event name; an unknown name gives
    /// [`ServerEvent::Unknown`]. The frame's `ref` is dropped.
    pub fn from_frame(frame: Frame) -> Result<Self, DecodeError> {
        let Frame { event, data, .. } = frame;
        Ok(match event.as_str() {
            "connected" => ServerEvent::Connected(decode_data(data)?),
            "message" => ServerEvent::Message(decode_data(data)?),
            "event" => ServerEvent::Event(decode_data(data)?),
            "presence" => ServerEvent::Presence(decode_data(data)?),
            "message_ack" => ServerEvent::MessageAck(decode_data(data)?),
            "room_joined" => ServerEvent::RoomJoined {
                room_id: decode_data::<RoomData>(data)?.room_id,
            },
            "room_left" => ServerEvent::RoomLeft {
                room_id: decode_data::<RoomData>(data)?.room_id,
            },
            "resumed" => {
                let resumed: ResumedData = decode_data(data)?;
                ServerEvent::Resumed {
                    last_event_id: resumed.last_event_id,
                    replayed: resumed.replayed,
                }
            }
            "pong" => ServerEvent::Pong {
                server_time: decode_data::<PongData>(data)?.server_time,
            },
            "error" => ServerEvent::Error(decode_data(data)?),
            _ => ServerEvent::Unknown { event, data },
        })
    }

    /// The frame for this event, carrying `reference` as its `ref`. An `error` whose
    /// body has no `ref` gets `reference` in `data.ref` too.
    pub fn to_frame(&self, reference: Option<&str>) -> Frame {
        let data = match self {
            ServerEvent::Connected(connected) => to_data(connected),
            ServerEvent::Message(message) => to_data(message),
            ServerEvent::Event(event) => to_data(event),
            ServerEvent::Presence(presence) => to_data(presence),
            ServerEvent::MessageAck(ack) => to_data(ack),
            ServerEvent::RoomJoined { room_id } | ServerEvent::RoomLeft { room_id } => {
                to_data(&RoomData {
                    room_id: room_id.clone(),
                })
            }
            ServerEvent::Resumed {
                last_event_id,
                replayed,
            } => to_data(&ResumedData {
                last_event_id: last_event_id.clone(),
                replayed: *replayed,
            }),
            ServerEvent::Pong { server_time } => to_data(&PongData {
                server_time: *server_time,
            }),
            ServerEvent::Error(body) if body.reference.is_none() && reference.is_some() => {
                let mut body = body.clone();
                body.reference = reference.map(str::to_owned);
                to_data(&body)
            }
            ServerEvent::Error(body) => to_data(body),
            ServerEvent::Unknown { data, .. } => data.clone(),
        };
        Frame {
            event: self.name().to_owned(),
            data,
            reference: reference.map(str::to_owned),
        }
    }

    /// The JSON text of this event's frame, carrying `reference` as its `ref`.
    ///
    /// Written in one pass from the typed data (no intermediate [`Value`]: the server
    /// encodes every frame it sends with this); the JSON is the same as
    /// [`ServerEvent::to_frame`]'s, fields in declaration order.
    pub fn encode(&self, reference: Option<&str>) -> String {
        let name = self.name();
        let text = match self {
            ServerEvent::Connected(connected) => encode_frame(name, connected, reference),
            ServerEvent::Message(message) => encode_frame(name, message, reference),
            ServerEvent::Event(event) => encode_frame(name, event, reference),
            ServerEvent::Presence(presence) => encode_frame(name, presence, reference),
            ServerEvent::MessageAck(ack) => encode_frame(name, ack, reference),
            ServerEvent::RoomJoined { room_id } | ServerEvent::RoomLeft { room_id } => {
                encode_frame(name, &RoomDataRef { room_id }, reference)
            }
            ServerEvent::Resumed {
                last_event_id,
                replayed,
            } => encode_frame(
                name,
                &ResumedData {
                    last_event_id: last_event_id.clone(),
                    replayed: *replayed,
                },
                reference,
            ),
            ServerEvent::Pong { server_time } => encode_frame(
                name,
                &PongData {
                    server_time: *server_time,
                },
                reference,
            ),
            // The `ref` goes into `data.ref` too.
            ServerEvent::Error(body) if body.reference.is_none() && reference.is_some() => {
                let body = ErrorBody {
                    reference: reference.map(str::to_owned),
                    ..body.clone()
                };
                encode_frame(name, &body, reference)
            }
            ServerEvent::Error(body) => encode_frame(name, body, reference),
            ServerEvent::Unknown { data, .. } => encode_frame(name, data, reference),
        };
        text.unwrap_or_else(|| self.to_frame(reference).encode())
    }
}

/// Decodes a frame's `data`; error paths are relative to the frame (`data.roomId`; a
/// missing field is named by [`decode_value`] already).
fn decode_data<T: DeserializeOwned>(data: Value) -> Result<T, DecodeError> {
    decode_value(data).map_err(|err| {
        let path = if err.path == "input" {
            "data".to_owned()
        } else {
            format!("data.{}", err.path)
        };
        DecodeError::new(path, err.message)
    })
}

/// Serialises a protocol value as frame `data`.
fn to_data<T: Serialize>(value: &T) -> Value {
    // The protocol types only hold string-keyed maps, strings, integers and JSON values,
    // so this cannot fail; `null` keeps the function total.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_errors_name_the_field() {
        assert_eq!(Frame::decode("{").unwrap_err().path, "input");
        assert_eq!(Frame::decode("[1]").unwrap_err().path, "input");
        assert_eq!(Frame::decode(r#"{"data":{}}"#).unwrap_err().path, "event");
        assert_eq!(Frame::decode(r#"{"event":3}"#).unwrap_err().path, "event");
        assert_eq!(
            Frame::decode(r#"{"event":"ping","ref":7}"#)
                .unwrap_err()
                .path,
            "ref"
        );
        let frame = Frame::decode(r#"{"event":"ping"}"#).unwrap();
        assert_eq!(frame.data, Value::Null);
        assert_eq!(frame.encode(), r#"{"event":"ping","data":null}"#);
    }

    #[test]
    fn direct_encoding_equals_the_value_path() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-30T10:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let server = [
            ServerEvent::RoomJoined {
                room_id: "r".into(),
            },
            ServerEvent::Resumed {
                last_event_id: None,
                replayed: 3,
            },
            ServerEvent::Pong { server_time: now },
            ServerEvent::MessageAck(MessageAck {
                message_id: "m".into(),
                event_id: Some("e".into()),
                sequence: Some(7),
            }),
            ServerEvent::Error(ErrorBody::new(
                super::super::error::ErrorCode::NotFound,
                "x",
            )),
            ServerEvent::Unknown {
                event: "later".into(),
                data: serde_json::json!({"a": [1, 2]}),
            },
        ];
        for event in &server {
            for reference in [None, Some("r1")] {
                let direct: Value = serde_json::from_str(&event.encode(reference)).unwrap();
                assert_eq!(direct, event.to_frame(reference).to_value(), "{event:?}");
            }
        }
        let client = [
            ClientEvent::JoinRoom {
                room_id: "r".into(),
            },
            ClientEvent::Resume {
                last_event_id: "e".into(),
            },
            ClientEvent::Ping,
        ];
        for event in &client {
            for reference in [None, Some("r1")] {
                let direct: Value = serde_json::from_str(&event.encode(reference)).unwrap();
                assert_eq!(direct, event.to_frame(reference).to_value(), "{event:?}");
            }
        }
    }

    /// CI found this with the fuzzing test: an `error` with an envelope `ref` but none
    /// in `data` was written with sorted keys the first time and in declaration order
    /// once it had gained `data.ref`, so encoding was not stable.
    #[test]
    fn an_error_gaining_data_ref_is_encoded_stably() {
        let text = r#"{"event":"error","data":{"error":"slow down","code":"RATE_LIMIT","status":429,"details":{"retryAfterMs":1200}},"ref":"c-18"}"#;
        let (event, reference) = ServerEvent::decode(text).unwrap();
        let once = event.encode(reference.as_deref());
        assert_eq!(
            once,
            r#"{"event":"error","data":{"error":"slow down","code":"RATE_LIMIT","status":429,"ref":"c-18","details":{"retryAfterMs":1200}},"ref":"c-18"}"#
        );
        let (again, again_ref) = ServerEvent::decode(&once).unwrap();
        assert_eq!(again.encode(again_ref.as_deref()), once);
    }

    #[test]
    fn a_missing_room_id_is_named() {
        let err = ClientEvent::decode(r#"{"event":"join_room","data":{}}"#).unwrap_err();
        assert_eq!(err.path, "data.roomId");
        let err = ClientEvent::decode(r#"{"event":"join_room","data":null}"#).unwrap_err();
        assert_eq!(err.path, "data");
        let err = ClientEvent::decode(r#"{"event":"join_room","data":{"roomId":5}}"#).unwrap_err();
        assert_eq!(err.path, "data.roomId");
    }

    #[test]
    fn an_error_frame_gets_the_ref_in_both_places() {
        let event = ServerEvent::Error(ErrorBody::new(
            super::super::error::ErrorCode::NotFound,
            "no such room",
        ));
        let frame = event.to_frame(Some("r9"));
        assert_eq!(frame.reference.as_deref(), Some("r9"));
        assert_eq!(frame.data["ref"], "r9");
        let (_, reference) = ServerEvent::decode(&frame.encode()).unwrap();
        assert_eq!(reference.as_deref(), Some("r9"));
    }

    #[test]
    fn connected_skips_unknown_classes() {
        let connected: Connected = crate::protocol::decode(
            r#"{"connectionId":"c","serverTime":"2026-01-30T10:00:00Z",
                "interactionClasses":["CLASS_A","CLASS_Q"],"pingInterval":1,"pingTimeout":2}"#,
        )
        .unwrap();
        assert_eq!(
            connected.interaction_classes,
            vec![InteractionClass::ClassA]
        );
    }

    #[test]
    fn validate_names_fields_relative_to_the_frame() {
        let (event, _) = ClientEvent::decode(
            r#"{"event":"message","data":{"type":"t","payload":1,"roomId":"r","recipientId":"u"}}"#,
        )
        .unwrap();
        assert_eq!(event.validate().unwrap_err().path, "data.roomId");
        let (event, _) =
            ClientEvent::decode(r#"{"event":"leave_room","data":{"roomId":""}}"#).unwrap();
        assert_eq!(event.validate().unwrap_err().path, "data.roomId");
    }
}
