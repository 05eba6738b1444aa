//! A client's `message` frame decoded in one pass, straight into its typed value.
//!
//! The general path (core's `Frame::decode`, then `ClientEvent::from_frame`) parses the
//! text into a `serde_json::Value` tree, takes it apart and decodes the `data` object a
//! second time into a [`SendMessage`]. For the frame that matters most (`message`, most
//! of the traffic) this reads the text once into the typed value instead.
//!
//! It only ever accepts: anything it does not take exactly as the general path would
//! (another event, a missing or mistyped field, a duplicate key, an array for an
//! object, a `tenantId` that is not the connection's) makes it give up (`None`), and
//! the caller decodes the frame the general way, which gives the same value or the
//! same, well-named error. So the two paths cannot disagree on a frame they both take.

use std::fmt;

use serde::Deserializer as _;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;
use webwaka_realtime::protocol::{InteractionClass, JsonObject, SendMessage};

/// A decoded `message` frame: the message and its `ref` (its data named no tenant, or
/// the connection's own).
#[derive(Debug)]
pub(crate) struct MessageFrame {
    pub(crate) message: SendMessage,
    pub(crate) reference: Option<String>,
}

/// Decodes `text` as a `message` frame of a connection of `tenant`, or `None` when the
/// general path must decide (see the module documentation).
pub(crate) fn decode_message(text: &str, tenant: &str) -> Option<MessageFrame> {
    let mut de = serde_json::Deserializer::from_str(text);
    let frame = de.deserialize_map(FrameVisitor { tenant }).ok()?;
    // Trailing characters (other than whitespace) are an error on the general path.
    de.end().ok()?;
    Some(frame)
}

/// Keys of the frame object.
enum FrameKey {
    Event,
    Data,
    Ref,
    Other,
}

/// Keys of the `data` object.
enum DataKey {
    MessageId,
    Type,
    InteractionClass,
    RecipientId,
    RoomId,
    Payload,
    Metadata,
    TenantId,
    Other,
}

struct KeyVisitor<K>(fn(&str) -> K);

impl<K> Visitor<'_> for KeyVisitor<K> {
    type Value = K;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<K, E> {
        Ok((self.0)(v))
    }
}

struct KeySeed<K>(fn(&str) -> K);

impl<'de, K> DeserializeSeed<'de> for KeySeed<K> {
    type Value = K;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<K, D::Error> {
        d.deserialize_identifier(KeyVisitor(self.0))
    }
}

fn frame_key(k: &str) -> FrameKey {
    match k {
        "event" => FrameKey::Event,
        "data" => FrameKey::Data,
        "ref" => FrameKey::Ref,
        _ => FrameKey::Other,
    }
}

fn data_key(k: &str) -> DataKey {
    match k {
        "messageId" => DataKey::MessageId,
        "type" => DataKey::Type,
        "interactionClass" => DataKey::InteractionClass,
        "recipientId" => DataKey::RecipientId,
        "roomId" => DataKey::RoomId,
        "payload" => DataKey::Payload,
        "metadata" => DataKey::Metadata,
        "tenantId" => DataKey::TenantId,
        _ => DataKey::Other,
    }
}

/// Gives up: the general path decides.
fn give_up<E: de::Error>() -> E {
    E::custom("not for the one-pass path")
}

struct FrameVisitor<'t> {
    tenant: &'t str,
}

impl<'de> Visitor<'de> for FrameVisitor<'_> {
    type Value = MessageFrame;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a frame object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut event, mut data, mut reference) = (false, None, None);
        while let Some(key) = map.next_key_seed(KeySeed(frame_key))? {
            match key {
                FrameKey::Event => {
                    // A repeated key: the general path keeps the last one; give up.
                    if event {
                        return Err(give_up());
                    }
                    // Borrowed: a name written with escapes goes the general way.
                    let name: &'de str = map.next_value()?;
                    if name != "message" {
                        return Err(give_up());
                    }
                    event = true;
                }
                FrameKey::Data => {
                    if data.is_some() {
                        return Err(give_up());
                    }
                    data = Some(map.next_value_seed(DataSeed {
                        tenant: self.tenant,
                    })?);
                }
                FrameKey::Ref => {
                    if reference.is_some() {
                        return Err(give_up());
                    }
                    // `null` is no reference (`Some(None)`: seen, so a repeat gives up).
                    let value: Option<String> = map.next_value()?;
                    reference = Some(value);
                }
                FrameKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        match (event, data) {
            (true, Some(message)) => Ok(MessageFrame {
                message,
                reference: reference.flatten(),
            }),
            _ => Err(give_up()),
        }
    }
}

struct DataSeed<'t> {
    tenant: &'t str,
}

impl<'de> DeserializeSeed<'de> for DataSeed<'_> {
    type Value = SendMessage;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<SendMessage, D::Error> {
        // A map only: the general path's decoder would also take an array for the
        // struct, with other rules; such a frame goes the general way.
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DataSeed<'_> {
    type Value = SendMessage;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a message object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SendMessage, A::Error> {
        // Each field: `None` until seen (a second sighting gives up, like serde's
        // derive, whose error sends the frame the general way).
        let mut message_id: Option<Option<String>> = None;
        let mut message_type: Option<String> = None;
        let mut class: Option<InteractionClass> = None;
        let mut recipient_id: Option<Option<String>> = None;
        let mut room_id: Option<Option<String>> = None;
        let mut payload: Option<Value> = None;
        let mut metadata: Option<Option<JsonObject>> = None;
        let mut tenant_seen = false;
        fn once<T, E: de::Error>(slot: &mut Option<T>, value: T) -> Result<(), E> {
            if slot.is_some() {
                return Err(give_up());
            }
            *slot = Some(value);
            Ok(())
        }
        while let Some(key) = map.next_key_seed(KeySeed(data_key))? {
            match key {
                DataKey::MessageId => once(&mut message_id, map.next_value()?)?,
                DataKey::Type => once(&mut message_type, map.next_value()?)?,
                DataKey::InteractionClass => once(&mut class, map.next_value()?)?,
                DataKey::RecipientId => once(&mut recipient_id, map.next_value()?)?,
                DataKey::RoomId => once(&mut room_id, map.next_value()?)?,
                DataKey::Payload => once(&mut payload, map.next_value()?)?,
                DataKey::Metadata => once(&mut metadata, map.next_value()?)?,
                DataKey::TenantId => {
                    // Absent, `null` or the connection's own tenant: fine. Anything
                    // else (another tenant: a violation to audit; not a string: an
                    // error) is the general path's to answer.
                    // Borrowed: one written with escapes goes the general way.
                    let named: Option<&'de str> = map.next_value()?;
                    if tenant_seen || named.is_some_and(|n| n != self.tenant) {
                        return Err(give_up());
                    }
                    tenant_seen = true;
                }
                DataKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        // `type` and `payload` are required (`payload` may be `null`).
        let (Some(message_type), Some(payload)) = (message_type, payload) else {
            return Err(give_up());
        };
        Ok(SendMessage {
            message_id: message_id.flatten(),
            message_type,
            interaction_class: class.unwrap_or_default(),
            recipient_id: recipient_id.flatten(),
            room_id: room_id.flatten(),
            payload,
            metadata: metadata.flatten(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use webwaka_realtime::protocol::{ClientEvent, Frame};

    /// What the general path makes of `text`: the message and its ref, when it is an
    /// acceptable message frame of tenant `t`.
    fn general(text: &str) -> Option<(SendMessage, Option<String>)> {
        let frame = Frame::decode(text).ok()?;
        match frame.data.get("tenantId") {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) if t == "t" => {}
            Some(_) => return None,
        }
        let reference = frame.reference.clone();
        match ClientEvent::from_frame(frame).ok()? {
            ClientEvent::Message(m) => Some((m, reference)),
            _ => None,
        }
    }

    #[test]
    fn takes_only_what_the_general_path_takes_and_the_same_way() {
        let cases = [
            r#"{"event":"message","data":{"type":"chat","recipientId":"b","payload":{"x":[1,2.5,"s\"q"]}}}"#,
            r#"{"ref":"r1","event":"message","data":{"messageId":"m","type":"chat","interactionClass":"CLASS_A","roomId":"r","payload":null,"metadata":{"k":1}}}"#,
            r#" {"data":{"type":"chat","recipientId":"b","payload":1,"tenantId":"t","extra":[{}]},"event":"message","ref":null,"x":1} "#,
            r#"{"event":"message","data":{"type":"chat","recipientId":"b","payload":1,"tenantId":null}}"#,
            r#"{"event":"message","data":{"type":"chat","recipientId":"b","payload":1,"tenantId":"other"}}"#,
            r#"{"event":"message","data":{"type":"chat","recipientId":"b","payload":1,"tenantId":7}}"#,
            r#"{"event":"message","data":{"type":"chat","recipientId":"b"}}"#,
            r#"{"event":"message","data":{"recipientId":"b","payload":1}}"#,
            r#"{"event":"message","data":{"type":"chat","type":"x","recipientId":"b","payload":1}}"#,
            r#"{"event":"message","event":"ping","data":{"type":"chat","recipientId":"b","payload":1}}"#,
            r#"{"event":"message","data":["m","chat","CLASS_C","b",null,1,null]}"#,
            r#"{"event":"message","data":{"type":"chat","recipientId":"b","payload":1,"interactionClass":"CLASS_X"}}"#,
            r#"{"event":"message","data":{"type":"chat","recipientId":"b","payload":1,"interactionClass":null}}"#,
            r#"{"event":"message","data":{"type":"chat","recipientId":"b","payload":1},"ref":5}"#,
            r#"{"event":"message","data":{"type":"chat","recipientId":"b","payload":1}} x"#,
            r#"{"event":"message","data":null}"#,
            r#"{"event":"message"}"#,
            r#"{"event":"ping"}"#,
            r#"{"event":"join_room","data":{"roomId":"r"}}"#,
            r#"{"event":"mess\u0061ge","data":{"typ\u0065":"chat","recipientId":"b","payload":"\u00e9"}}"#,
            r#"[1]"#,
            r#"{"#,
        ];
        for (i, text) in cases.iter().enumerate() {
            let fast = decode_message(text, "t").map(|f| (f.message, f.reference));
            let slow = general(text);
            if let Some(fast) = &fast {
                assert_eq!(Some(fast), slow.as_ref(), "{text}");
            }
            // The plain message frames (the first four) are taken; the rest (repeated
            // keys, escaped names, bad input) may go the general way.
            if i < 4 {
                assert!(fast.is_some(), "not taken: {text}");
            }
        }
    }
}
