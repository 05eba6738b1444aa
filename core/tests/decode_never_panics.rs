//! No input makes a decoder panic: arbitrary text, arbitrary JSON, frames of every known
//! event with random data, and fixtures with a random part replaced, removed or cut off
//! all give `Ok` or `Err`.
//!
//! Where decoding succeeds, two more things are checked: validation and re-encoding do not
//! panic either, and decoding is stable (decode → encode → decode gives the same value,
//! and frames reach a fixed point after one round).

// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::fmt::Debug;
use std::fs;
use std::path::PathBuf;
use std::sync::LazyLock;

use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use webwaka_realtime::protocol::{
    self, AckRequest, AckResponse, AuditLogEntry, AuditPage, AuditVerify, ClaimRequest,
    ClaimResponse, ClientEvent, Conflict, Connected, DlqEntry, DlqResponse, ErrorBody, Event,
    EventMetadata, Frame, Health, MessageAccepted, MessageAck, Operation, PollResponse,
    PresenceInfo, PresenceUpdate, PublishEvent, Published, ReconciliationRequest,
    ReconciliationResponse, SendMessage, ServerEvent, ServiceHealth, StateSnapshot,
    TransactionAccepted, TransactionRequest, TransactionStatus, WebSocketMessage,
};

const CASES: u32 = 512;

/// Every fixture, parsed.
static FIXTURES: LazyLock<Vec<Value>> = LazyLock::new(|| {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|path| serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap())
        .collect()
});

/// Field names the protocol uses, so random objects hit real fields.
const KEYS: &[&str] = &[
    "event",
    "data",
    "ref",
    "messageId",
    "type",
    "interactionClass",
    "recipientId",
    "roomId",
    "payload",
    "metadata",
    "status",
    "lastEventId",
    "replayed",
    "serverTime",
    "connectionId",
    "clientId",
    "interactionClasses",
    "pingInterval",
    "pingTimeout",
    "eventId",
    "eventType",
    "tenantId",
    "senderId",
    "timestamp",
    "schemaVersion",
    "sequence",
    "source",
    "userId",
    "lastActive",
    "error",
    "code",
    "details",
    "retryAfterMs",
    "events",
    "hasMore",
    "nextEventId",
    "operations",
    "operationId",
    "entityType",
    "entityId",
    "operationType",
    "vectorClock",
    "requestId",
    "requestedAt",
    "strategy",
    "data",
    "deleted",
    "checksum",
    "services",
    "websocket",
    "storage",
    "entries",
    "valid",
    "hash",
    "prevHash",
];

/// Strings with meaning somewhere in the protocol.
const WORDS: &[&str] = &[
    "",
    "message",
    "join_room",
    "leave_room",
    "presence_update",
    "resume",
    "ping",
    "connected",
    "event",
    "presence",
    "message_ack",
    "room_joined",
    "room_left",
    "resumed",
    "pong",
    "error",
    "CLASS_A",
    "CLASS_B",
    "CLASS_C",
    "CLASS_D",
    "CLASS_X",
    "online",
    "away",
    "offline",
    "RATE_LIMIT",
    "NOT_FOUND",
    "UPDATE",
    "CREATE",
    "DELETE",
    "LAST_WRITE_WINS",
    "MANUAL",
    "PENDING",
    "healthy",
    "SUPER_ADMIN",
    "2026-01-30T10:00:00Z",
    "2026-01-30T10:00:00.123+01:00",
    "2026-13-45T99:00:00Z",
    "9999-12-31T23:59:59.999999999Z",
    "-0001-01-01T00:00:00Z",
];

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(WORDS).prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

fn arb_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1000i32..1000).prop_map(Value::from),
        // Quarters are exact in binary, so re-encoding keeps them equal.
        any::<i32>().prop_map(|n| Value::from(f64::from(n) / 4.0)),
        arb_string().prop_map(Value::String),
    ]
}

fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(KEYS).prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    arb_leaf().prop_recursive(5, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((arb_key(), inner), 0..8)
                .prop_map(|entries| Value::Object(entries.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Frames whose `event` is usually a known name, with random `data` and `ref`.
fn arb_frame() -> impl Strategy<Value = Value> {
    let names: Vec<&'static str> = ClientEvent::NAMES
        .iter()
        .chain(ServerEvent::NAMES.iter())
        .copied()
        .collect();
    let event = prop_oneof![
        6 => proptest::sample::select(names).prop_map(Value::from),
        1 => arb_json(),
    ];
    let reference = prop_oneof![
        2 => Just(None),
        2 => "[a-z0-9-]{0,8}".prop_map(|r| Some(Value::String(r))),
        1 => arb_json().prop_map(Some),
    ];
    (event, prop::option::weighted(0.9, arb_json()), reference).prop_map(
        |(event, data, reference)| {
            let mut frame = Map::new();
            frame.insert("event".into(), event);
            if let Some(data) = data {
                frame.insert("data".into(), data);
            }
            if let Some(reference) = reference {
                frame.insert("ref".into(), reference);
            }
            Value::Object(frame)
        },
    )
}

/// Replaces (or removes) the node reached by following `path` (indices taken modulo
/// each container's size).
fn mutate(value: &mut Value, path: &[usize], remove: bool, replacement: Value) {
    match (path.split_first(), value) {
        (Some((&index, rest)), Value::Object(map)) if !map.is_empty() => {
            let key = map.keys().nth(index % map.len()).unwrap().clone();
            if rest.is_empty() && remove {
                map.remove(&key);
            } else {
                mutate(map.get_mut(&key).unwrap(), rest, remove, replacement);
            }
        }
        (Some((&index, rest)), Value::Array(items)) if !items.is_empty() => {
            let index = index % items.len();
            if rest.is_empty() && remove {
                items.remove(index);
            } else {
                mutate(&mut items[index], rest, remove, replacement);
            }
        }
        (_, value) => *value = replacement,
    }
}

/// A fixture with one node replaced by random JSON or removed.
fn arb_mutated_fixture() -> impl Strategy<Value = Value> {
    (
        any::<prop::sample::Index>(),
        prop::collection::vec(any::<usize>(), 0..6),
        any::<bool>(),
        arb_json(),
    )
        .prop_map(|(which, path, remove, replacement)| {
            let mut value = which.get(&FIXTURES).clone();
            mutate(&mut value, &path, remove, replacement);
            value
        })
}

/// Decodes `text` as `T`; when that works, `check` and re-encoding must not panic and
/// the value must survive a round trip.
fn body<T>(text: &str, check: impl Fn(&T))
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    if let Ok(decoded) = protocol::decode::<T>(text) {
        check(&decoded);
        let again: T = protocol::decode_value(serde_json::to_value(&decoded).unwrap())
            .unwrap_or_else(|e| panic!("re-decoding {decoded:?}: {e}"));
        assert_eq!(again, decoded);
    }
}

/// Feeds `text` to every decoder.
fn decode_everything(text: &str) {
    if let Ok((event, reference)) = ClientEvent::decode(text) {
        let _ = event.validate();
        let once = event.encode(reference.as_deref());
        let (again, again_ref) = ClientEvent::decode(&once).unwrap();
        assert_eq!((&again, &again_ref), (&event, &reference));
    }
    if let Ok((event, reference)) = ServerEvent::decode(text) {
        // An error frame may gain `data.ref` on the first round; then it is stable.
        let once = event.encode(reference.as_deref());
        let (again, again_ref) = ServerEvent::decode(&once).unwrap();
        assert_eq!(again_ref, reference);
        assert_eq!(again.encode(again_ref.as_deref()), once);
    }
    if let Ok(frame) = Frame::decode(text) {
        assert_eq!(Frame::decode(&frame.encode()).unwrap(), frame);
    }

    body::<SendMessage>(text, |m| {
        let _ = m.validate();
    });
    body::<WebSocketMessage>(text, |_| ());
    body::<MessageAck>(text, |_| ());
    body::<MessageAccepted>(text, |_| ());
    body::<PresenceUpdate>(text, |_| ());
    body::<PresenceInfo>(text, |_| ());
    body::<Connected>(text, |_| ());
    body::<Event>(text, |e| {
        let _ = e.message();
    });
    body::<EventMetadata>(text, |_| ());
    body::<PollResponse>(text, |_| ());
    body::<PublishEvent>(text, |p| {
        let _ = p.validate();
    });
    body::<Published>(text, |_| ());
    body::<ClaimRequest>(text, |c| {
        let _ = c.validate();
    });
    body::<ClaimResponse>(text, |_| ());
    body::<AckRequest>(text, |_| ());
    body::<AckResponse>(text, |_| ());
    body::<DlqEntry>(text, |_| ());
    body::<DlqResponse>(text, |_| ());
    body::<ErrorBody>(text, |e| {
        let _ = (e.retry_after_ms(), e.path(), e.to_string());
    });
    body::<TransactionRequest>(text, |_| ());
    body::<TransactionAccepted>(text, |_| ());
    body::<TransactionStatus>(text, |_| ());
    body::<Health>(text, |_| ());
    body::<ServiceHealth>(text, |_| ());
    body::<AuditLogEntry>(text, |_| ());
    body::<AuditPage>(text, |_| ());
    body::<AuditVerify>(text, |_| ());
    body::<ReconciliationRequest>(text, |r| {
        for op in &r.operations {
            let _ = op.validate();
        }
    });
    body::<ReconciliationResponse>(text, |r| {
        for snapshot in &r.delta_updates {
            let _ = snapshot.checksum_is_valid();
        }
    });
    body::<Operation>(text, |o| {
        let _ = o.validate();
    });
    body::<StateSnapshot>(text, |s| {
        let _ = s.checksum_is_valid();
    });
    body::<Conflict>(text, |_| ());
    body::<Frame>(text, |_| ());
}

/// Feeds a JSON value to every decoder, as text and as a parsed value.
fn decode_value_everything(value: &Value) {
    decode_everything(&value.to_string());
    let _ = Frame::from_value(value.clone());
    let _ = protocol::decode_value::<ReconciliationRequest>(value.clone());
    let _ = protocol::decode_value::<Event>(value.clone());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn arbitrary_text(text in any::<String>()) {
        decode_everything(&text);
    }

    #[test]
    fn json_looking_text(text in r#"[{}\[\]":,0-9a-zA-Z_ .+-]{0,160}"#) {
        decode_everything(&text);
    }

    #[test]
    fn arbitrary_json(value in arb_json()) {
        decode_value_everything(&value);
    }

    #[test]
    fn frames_of_known_events(frame in arb_frame()) {
        decode_value_everything(&frame);
    }

    #[test]
    fn mutated_fixtures(value in arb_mutated_fixture()) {
        decode_value_everything(&value);
    }

    #[test]
    fn truncated_fixtures(which in any::<prop::sample::Index>(), cut in any::<prop::sample::Index>()) {
        let text = which.get(&FIXTURES).to_string();
        let mut end = cut.index(text.len() + 1);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        decode_everything(&text[..end]);
    }
}

#[test]
fn every_fixture_passes_every_decoder() {
    assert!(FIXTURES.len() > 30);
    for fixture in FIXTURES.iter() {
        decode_value_everything(fixture);
    }
}
