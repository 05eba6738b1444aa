//! The `message` frame the server sends most, written without `core::fmt`.
//!
//! [`message_frame`] writes exactly the bytes of core's
//! `ServerEvent::Message(m).encode(None)` (same fields, order and omissions; a test
//! compares them), but formats the timestamp by hand: chrono writes it through
//! `core::fmt` (`collect_str`), which was about a third of the cost of encoding a
//! delivery.

use serde::{Serialize, Serializer};
use serde_json::Value;
use webwaka_realtime::protocol::{InteractionClass, JsonObject, Timestamp, WebSocketMessage};

/// The text of the `message` frame delivering `m` (no `ref`).
pub(crate) fn message_frame(m: &WebSocketMessage) -> String {
    #[derive(Serialize)]
    struct Frame<'a> {
        event: &'static str,
        data: MessageOut<'a>,
    }
    let frame = Frame {
        event: "message",
        data: MessageOut::new(m),
    };
    // Strings, numbers and JSON values only: this cannot fail; core's encoder is the
    // fallback all the same.
    serde_json::to_string(&frame).unwrap_or_else(|_| {
        webwaka_realtime::protocol::ServerEvent::Message(m.clone()).encode(None)
    })
}

/// The text of the `message` frame around `data`, a message already written by
/// [`MessageOut`] (the same text as [`message_frame`]).
pub(crate) fn message_frame_around(data: &serde_json::value::RawValue) -> String {
    let data = data.get();
    let mut frame = String::with_capacity(data.len() + 28);
    frame.push_str(r#"{"event":"message","data":"#);
    frame.push_str(data);
    frame.push('}');
    frame
}

/// A [`WebSocketMessage`] as serialised, borrowed: same names, order and omissions.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MessageOut<'a> {
    message_id: &'a str,
    #[serde(rename = "type")]
    message_type: &'a str,
    interaction_class: InteractionClass,
    tenant_id: &'a str,
    sender_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    recipient_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room_id: Option<&'a str>,
    payload: &'a Value,
    timestamp: Rfc3339<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<&'a JsonObject>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sequence: Option<u64>,
}

impl<'a> MessageOut<'a> {
    /// The same message, placed at `sequence` of the log as `event_id`.
    pub(crate) fn placed(mut self, event_id: &'a str, sequence: u64) -> Self {
        self.event_id = Some(event_id);
        self.sequence = Some(sequence);
        self
    }

    pub(crate) fn new(m: &'a WebSocketMessage) -> Self {
        Self {
            message_id: &m.message_id,
            message_type: &m.message_type,
            interaction_class: m.interaction_class,
            tenant_id: &m.tenant_id,
            sender_id: &m.sender_id,
            recipient_id: m.recipient_id.as_deref(),
            room_id: m.room_id.as_deref(),
            payload: &m.payload,
            timestamp: Rfc3339(&m.timestamp),
            metadata: m.metadata.as_ref(),
            event_id: m.event_id.as_deref(),
            sequence: m.sequence,
        }
    }
}

/// A timestamp serialised as chrono does (RFC 3339, `Z`, fraction digits 0, 3, 6 or
/// 9 as needed), formatted without `core::fmt`.
#[derive(Clone, Copy)]
pub(crate) struct Rfc3339<'a>(pub(crate) &'a Timestamp);

impl Serialize for Rfc3339<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 32];
        match rfc3339(self.0, &mut buf) {
            Some(text) => serializer.serialize_str(text),
            // Years outside 0..=9999 and leap seconds: chrono's own way.
            None => self.0.serialize(serializer),
        }
    }
}

/// Writes `t` into `buf`, or `None` for what only chrono's formatter handles.
fn rfc3339<'b>(t: &Timestamp, buf: &'b mut [u8; 32]) -> Option<&'b str> {
    use chrono::{Datelike, Timelike};
    let year = t.year();
    let nano = t.nanosecond();
    if !(0..=9999).contains(&year) || nano >= 1_000_000_000 {
        return None;
    }
    fn two(buf: &mut [u8], at: usize, n: u32) {
        buf[at] = b'0' + (n / 10 % 10) as u8;
        buf[at + 1] = b'0' + (n % 10) as u8;
    }
    let year = year as u32;
    two(buf, 0, year / 100);
    two(buf, 2, year % 100);
    buf[4] = b'-';
    two(buf, 5, t.month());
    buf[7] = b'-';
    two(buf, 8, t.day());
    buf[10] = b'T';
    two(buf, 11, t.hour());
    buf[13] = b':';
    two(buf, 14, t.minute());
    buf[16] = b':';
    two(buf, 17, t.second());
    let mut len = 19;
    let (digits, mut frac) = if nano == 0 {
        (0, 0)
    } else if nano.is_multiple_of(1_000_000) {
        (3, nano / 1_000_000)
    } else if nano.is_multiple_of(1_000) {
        (6, nano / 1_000)
    } else {
        (9, nano)
    };
    if digits > 0 {
        buf[len] = b'.';
        for i in (0..digits).rev() {
            buf[len + 1 + i] = b'0' + (frac % 10) as u8;
            frac /= 10;
        }
        len += 1 + digits;
    }
    buf[len] = b'Z';
    len += 1;
    std::str::from_utf8(&buf[..len]).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use chrono::TimeZone;
    use webwaka_realtime::protocol::ServerEvent;

    #[test]
    fn timestamps_are_written_as_chrono_writes_them() {
        let base = chrono::Utc
            .with_ymd_and_hms(2026, 11, 26, 9, 5, 7)
            .single()
            .unwrap();
        let mut times = vec![chrono::Utc::now(), base];
        for nanos in [
            1,
            999,
            1_000,
            120_000,
            1_000_000,
            7_000_000,
            123_456_789,
            999_999_999,
        ] {
            times.push(base + chrono::Duration::nanoseconds(nanos));
        }
        times.push(
            chrono::Utc
                .with_ymd_and_hms(1, 1, 1, 0, 0, 0)
                .single()
                .unwrap(),
        );
        times.push(
            chrono::Utc
                .with_ymd_and_hms(9999, 12, 31, 23, 59, 59)
                .single()
                .unwrap(),
        );
        times.push(
            chrono::Utc
                .with_ymd_and_hms(10000, 1, 1, 0, 0, 0)
                .single()
                .unwrap(),
        );
        times.push(
            chrono::Utc
                .with_ymd_and_hms(-5, 1, 1, 0, 0, 0)
                .single()
                .unwrap(),
        );
        for t in times {
            assert_eq!(
                serde_json::to_string(&Rfc3339(&t)).unwrap(),
                serde_json::to_string(&t).unwrap()
            );
        }
    }

    #[test]
    fn message_frames_are_core_s_bytes() {
        let mut m = WebSocketMessage {
            message_id: "m\"1".into(),
            message_type: "chat.text".into(),
            interaction_class: InteractionClass::ClassA,
            tenant_id: "t".into(),
            sender_id: "alice".into(),
            recipient_id: Some("bob".into()),
            room_id: None,
            payload: serde_json::json!({"text": "hé \n", "n": [1, 2.5, null]}),
            timestamp: chrono::Utc::now(),
            metadata: None,
            event_id: None,
            sequence: None,
        };
        assert_eq!(
            message_frame(&m),
            ServerEvent::Message(m.clone()).encode(None)
        );
        m.recipient_id = None;
        m.room_id = Some("room".into());
        m.metadata = serde_json::json!({"k": {"v": 1}}).as_object().cloned();
        m.event_id = Some("e1".into());
        m.sequence = Some(42);
        m.interaction_class = InteractionClass::ClassC;
        m.payload = Value::Null;
        assert_eq!(
            message_frame(&m),
            ServerEvent::Message(m.clone()).encode(None)
        );
        // The durable path writes the message once and wraps it.
        let data = serde_json::value::to_raw_value(&MessageOut::new(&m)).unwrap();
        assert_eq!(message_frame_around(&data), message_frame(&m));
    }
}
