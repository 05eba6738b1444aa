//! The wire format, pinned by fixtures: every file in `tests/fixtures/` decodes into its
//! protocol type, keeps its meaning (a few fields are checked, so a renamed field
//! fails), and re-encodes to the same JSON (so any change of the wire form shows up).

// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use webwaka_realtime::protocol::{
    self, AckRequest, AckResponse, ActorType, AuditPage, AuditResult, AuditVerify, ClaimRequest,
    ClaimResponse, ClientEvent, DlqReplayed, DlqResponse, ErrorBody, ErrorCode, Frame, Health,
    HealthState, InteractionClass, MessageAccepted, OperationType, PollResponse, PresenceStatus,
    PublishEvent, Published, ReconciliationRequest, ReconciliationResponse, ResolutionStrategy,
    SendMessage, ServerEvent, StateSnapshot, TransactionAccepted, TransactionRequest,
    TransactionState, TransactionStatus,
};

/// Every fixture file (without `.json`); each is exercised by a test below.
const FIXTURES: &[&str] = &[
    "ws_client_message",
    "ws_client_join_room",
    "ws_client_leave_room",
    "ws_client_presence_update",
    "ws_client_resume",
    "ws_client_ping",
    "ws_server_connected",
    "ws_server_message",
    "ws_server_event",
    "ws_server_presence",
    "ws_server_message_ack",
    "ws_server_room_joined",
    "ws_server_room_left",
    "ws_server_resumed",
    "ws_server_pong",
    "ws_server_error",
    "http_poll_response",
    "http_send_message_request",
    "http_message_accepted",
    "http_publish_request",
    "http_published",
    "http_claim_request",
    "http_claim_response",
    "http_ack_request",
    "http_ack_response",
    "http_dlq_response",
    "http_dlq_replayed",
    "http_reconcile_request",
    "http_reconcile_response",
    "http_state_snapshot",
    "http_transaction_request",
    "http_transaction_accepted",
    "http_transaction_status",
    "http_health",
    "http_audit_page",
    "http_audit_verify",
    "http_error",
];

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn text(name: &str) -> String {
    let path = fixtures_dir().join(format!("{name}.json"));
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn value(name: &str) -> Value {
    serde_json::from_str(&text(name)).unwrap()
}

/// Decodes an HTTP body fixture and checks it re-encodes to the same JSON.
fn body<T: Serialize + DeserializeOwned>(name: &str) -> T {
    let decoded: T = protocol::decode(&text(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        serde_json::to_value(&decoded).unwrap(),
        value(name),
        "{name} re-encodes differently"
    );
    decoded
}

/// Decodes a client frame fixture and checks it re-encodes to the same JSON.
fn client(name: &str) -> (ClientEvent, Option<String>) {
    let (event, reference) =
        ClientEvent::decode(&text(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let encoded: Value = serde_json::from_str(&event.encode(reference.as_deref())).unwrap();
    assert_eq!(encoded, value(name), "{name} re-encodes differently");
    event.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
    (event, reference)
}

/// Decodes a server frame fixture and checks it re-encodes to the same JSON.
fn server(name: &str) -> (ServerEvent, Option<String>) {
    let (event, reference) =
        ServerEvent::decode(&text(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let encoded: Value = serde_json::from_str(&event.encode(reference.as_deref())).unwrap();
    assert_eq!(encoded, value(name), "{name} re-encodes differently");
    (event, reference)
}

#[test]
fn every_fixture_file_is_listed() {
    let on_disk: BTreeSet<String> = fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter_map(|name| name.strip_suffix(".json").map(str::to_owned))
        .collect();
    let listed: BTreeSet<String> = FIXTURES.iter().map(|name| (*name).to_owned()).collect();
    assert_eq!(on_disk, listed);
}

#[test]
fn every_frame_fixture_is_a_plain_frame() {
    for name in FIXTURES.iter().filter(|name| name.starts_with("ws_")) {
        let frame = Frame::decode(&text(name)).unwrap();
        let encoded: Value = serde_json::from_str(&frame.encode()).unwrap();
        assert_eq!(encoded, value(name), "{name}");
    }
}

// ---- client → server frames -------------------------------------------------------

#[test]
fn client_message() {
    let (event, reference) = client("ws_client_message");
    assert_eq!(reference.as_deref(), Some("c-17"));
    let ClientEvent::Message(message) = event else {
        panic!("not a message: {event:?}")
    };
    assert_eq!(
        message.message_id.as_deref(),
        Some("7c9e6679-7425-40de-944b-e07fc1f90ae7")
    );
    assert_eq!(message.message_type, "chat.message");
    assert_eq!(message.interaction_class, InteractionClass::ClassC);
    assert_eq!(message.room_id.as_deref(), Some("project-apollo"));
    assert_eq!(message.recipient_id, None);
    assert_eq!(message.payload["mentions"][0], "user-bo");
    assert!(message.metadata.unwrap().contains_key("clientTime"));
}

#[test]
fn client_join_room() {
    let (event, reference) = client("ws_client_join_room");
    assert_eq!(
        event,
        ClientEvent::JoinRoom {
            room_id: "project-apollo".into()
        }
    );
    assert_eq!(reference.as_deref(), Some("c-15"));
}

#[test]
fn client_leave_room() {
    let (event, _) = client("ws_client_leave_room");
    assert_eq!(
        event,
        ClientEvent::LeaveRoom {
            room_id: "project-apollo".into()
        }
    );
}

#[test]
fn client_presence_update() {
    let (event, reference) = client("ws_client_presence_update");
    assert_eq!(reference, None);
    let ClientEvent::PresenceUpdate(update) = event else {
        panic!("not a presence update: {event:?}")
    };
    assert_eq!(update.status, PresenceStatus::Away);
    assert_eq!(update.metadata.unwrap()["statusText"], "In a meeting");
}

#[test]
fn client_resume() {
    let (event, _) = client("ws_client_resume");
    assert_eq!(
        event,
        ClientEvent::Resume {
            last_event_id: "01947a3e-8b52-7c1d-a0f4-3e2b9c6d5a18".into()
        }
    );
}

#[test]
fn client_ping() {
    let (event, reference) = client("ws_client_ping");
    assert_eq!(event, ClientEvent::Ping);
    assert_eq!(reference.as_deref(), Some("c-30"));
}

// ---- server → client frames -------------------------------------------------------

#[test]
fn server_connected() {
    let (event, reference) = server("ws_server_connected");
    assert_eq!(reference, None);
    let ServerEvent::Connected(connected) = event else {
        panic!("not connected: {event:?}")
    };
    assert_eq!(connected.connection_id, "conn-5f1d2a9e");
    assert_eq!(
        connected.client_id.as_deref(),
        Some("0f8e2c1a-5b7d-4e3f-9a21-6c4d8b2e1f30")
    );
    assert_eq!(connected.interaction_classes, InteractionClass::REALTIME);
    assert_eq!(connected.ping_interval, 30_000);
    assert_eq!(connected.ping_timeout, 60_000);
    assert_eq!(
        connected.server_time.to_rfc3339(),
        "2026-01-30T10:15:00.004+00:00"
    );
}

#[test]
fn server_message() {
    let (event, _) = server("ws_server_message");
    let ServerEvent::Message(message) = event else {
        panic!("not a message: {event:?}")
    };
    assert_eq!(message.message_id, "7c9e6679-7425-40de-944b-e07fc1f90ae7");
    assert_eq!(message.tenant_id, "tenant-acme");
    assert_eq!(message.sender_id, "user-ada");
    assert_eq!(message.room_id.as_deref(), Some("project-apollo"));
    assert_eq!(message.interaction_class, InteractionClass::ClassC);
    assert_eq!(message.sequence, Some(1042));
    assert_eq!(
        message.event_id.as_deref(),
        Some("01947a3e-8b52-7c1d-a0f4-3e2b9c6d5a18")
    );
}

#[test]
fn server_event() {
    let (event, _) = server("ws_server_event");
    let ServerEvent::Event(event) = event else {
        panic!("not an event: {event:?}")
    };
    assert_eq!(event.event_type, "order.placed");
    assert_eq!(event.schema_version, "1.0");
    assert_eq!(event.sequence, Some(1043));
    assert_eq!(event.metadata.source, "order-service");
    assert_eq!(event.metadata.correlation_id.as_deref(), Some("corr-5521"));
    assert_eq!(event.metadata.causation_id.as_deref(), Some("cmd-8812"));
    assert_eq!(event.metadata.user_id.as_deref(), Some("user-bo"));
    assert_eq!(event.metadata.extra["region"], "eu-west-1");
    assert_eq!(event.payload["total"]["currency"], "NGN");
}

#[test]
fn server_presence() {
    let (event, _) = server("ws_server_presence");
    let ServerEvent::Presence(presence) = event else {
        panic!("not presence: {event:?}")
    };
    assert_eq!(presence.user_id, "user-bo");
    assert_eq!(presence.tenant_id, "tenant-acme");
    assert_eq!(presence.status, PresenceStatus::Online);
}

#[test]
fn server_message_ack() {
    let (event, reference) = server("ws_server_message_ack");
    assert_eq!(reference.as_deref(), Some("c-17"));
    let ServerEvent::MessageAck(ack) = event else {
        panic!("not an ack: {event:?}")
    };
    assert_eq!(ack.message_id, "7c9e6679-7425-40de-944b-e07fc1f90ae7");
    assert_eq!(ack.sequence, Some(1042));
}

#[test]
fn server_room_joined_and_left() {
    let (joined, reference) = server("ws_server_room_joined");
    assert_eq!(
        joined,
        ServerEvent::RoomJoined {
            room_id: "project-apollo".into()
        }
    );
    assert_eq!(reference.as_deref(), Some("c-15"));
    let (left, reference) = server("ws_server_room_left");
    assert_eq!(
        left,
        ServerEvent::RoomLeft {
            room_id: "project-apollo".into()
        }
    );
    assert_eq!(reference.as_deref(), Some("c-21"));
}

#[test]
fn server_resumed() {
    let (event, reference) = server("ws_server_resumed");
    assert_eq!(
        event,
        ServerEvent::Resumed {
            last_event_id: Some("01947a3f-1c04-7d2e-b815-4f3c0d7e6b29".into()),
            replayed: 2
        }
    );
    assert_eq!(reference.as_deref(), Some("c-2"));
}

#[test]
fn server_pong() {
    let (event, reference) = server("ws_server_pong");
    let ServerEvent::Pong { server_time } = event else {
        panic!("not a pong: {event:?}")
    };
    assert_eq!(server_time.to_rfc3339(), "2026-01-30T10:15:30.012+00:00");
    assert_eq!(reference.as_deref(), Some("c-30"));
}

#[test]
fn server_error() {
    let (event, reference) = server("ws_server_error");
    assert_eq!(reference.as_deref(), Some("c-18"));
    let ServerEvent::Error(body) = event else {
        panic!("not an error: {event:?}")
    };
    assert_eq!(body.code, ErrorCode::RateLimit);
    assert_eq!(body.status, 429);
    assert_eq!(body.reference.as_deref(), Some("c-18"));
    assert_eq!(body.retry_after_ms(), Some(1200));
}

// ---- HTTP bodies ------------------------------------------------------------------

#[test]
fn poll_response() {
    let page: PollResponse = body("http_poll_response");
    assert!(!page.has_more);
    assert_eq!(
        page.next_event_id.as_deref(),
        Some("01947a3f-1c04-7d2e-b815-4f3c0d7e6b29")
    );
    assert_eq!(page.events.len(), 2);
    assert_eq!(page.events[0].sequence, Some(1042));
    assert_eq!(page.events[1].sequence, Some(1043));
    // A durable message in a poll carries the same WebSocketMessage as the live frame.
    let message = page.events[0].message().unwrap().unwrap();
    let (live, _) = server("ws_server_message");
    assert_eq!(ServerEvent::Message(message), live);
    assert!(page.events[1].message().is_none());
}

#[test]
fn send_message_request() {
    let message: SendMessage = body("http_send_message_request");
    assert_eq!(message.interaction_class, InteractionClass::ClassB);
    assert_eq!(message.recipient_id.as_deref(), Some("user-bo"));
    assert_eq!(message.room_id, None);
    message.validate().unwrap();
}

#[test]
fn message_accepted() {
    let accepted: MessageAccepted = body("http_message_accepted");
    assert_eq!(accepted.message_id, "3f2b8c4d-1e6a-4b7f-8c9d-0a1b2c3d4e5f");
    assert_eq!(accepted.sequence, 1044);
}

#[test]
fn publish_request_and_published() {
    let publish: PublishEvent = body("http_publish_request");
    assert_eq!(publish.event_type, "inventory.low");
    assert_eq!(publish.room_id.as_deref(), Some("warehouse-lagos"));
    assert_eq!(publish.schema_version.as_deref(), Some("1.0"));
    assert_eq!(
        publish.metadata.as_ref().unwrap()["source"],
        "inventory-service"
    );
    publish.validate().unwrap();
    let published: Published = body("http_published");
    assert_eq!(
        publish.event_id.as_deref(),
        Some(published.event_id.as_str())
    );
    assert_eq!(published.sequence, 1045);
}

#[test]
fn claim_request_and_response() {
    let claim: ClaimRequest = body("http_claim_request");
    assert_eq!(claim.consumer_id, "billing-worker-1");
    assert_eq!(claim.max, 10);
    assert_eq!(claim.visibility_timeout_ms, 30_000);
    assert_eq!(claim.event_types, Some(vec!["order.placed".to_owned()]));
    claim.validate().unwrap();
    let response: ClaimResponse = body("http_claim_response");
    assert_eq!(response.events.len(), 1);
    assert_eq!(response.events[0].delivery_count, 1);
    assert_eq!(response.events[0].event.event_type, "order.placed");
}

#[test]
fn ack_request_and_response() {
    let ack: AckRequest = body("http_ack_request");
    assert_eq!(ack.event_ids, vec!["01947a3f-1c04-7d2e-b815-4f3c0d7e6b29"]);
    let acked: AckResponse = body("http_ack_response");
    assert_eq!(acked.acked, 1);
}

#[test]
fn dlq_response() {
    let dlq: DlqResponse = body("http_dlq_response");
    let entry = &dlq.entries[0];
    assert_eq!(entry.dlq_id, "dlq-2c7e9a41");
    assert_eq!(entry.retry_count, 4);
    assert_eq!(entry.failure_reason, "lease expired without ack");
    assert!(entry.failure_stack_trace.is_some());
    assert_eq!(
        entry.consumer_info.consumer_group.as_deref(),
        Some("billing")
    );
    assert_eq!(entry.original_event.event_type, "order.placed");
    assert!(entry.first_failed_at < entry.last_failed_at);
}

#[test]
fn dlq_replayed() {
    let replayed: DlqReplayed = body("http_dlq_replayed");
    assert_eq!(replayed.dlq_id, "dlq-2c7e9a41");
    assert_eq!(replayed.event_id, "01947a3f-1c04-7d2e-b815-4f3c0d7e6b29");
    assert_eq!(replayed.consumer_group, "billing");
    assert!(replayed.replayed);
}

#[test]
fn reconcile_request() {
    let request: ReconciliationRequest = body("http_reconcile_request");
    assert_eq!(request.last_known_version.as_deref(), Some("87"));
    assert_eq!(request.strategy, Some(ResolutionStrategy::FieldLevelMerge));
    assert_eq!(request.operations.len(), 2);
    assert_eq!(request.operations[0].operation_type, OperationType::Update);
    assert_eq!(request.operations[1].operation_type, OperationType::Create);
    assert_eq!(
        request.operations[0]
            .vector_clock
            .get("0f8e2c1a-5b7d-4e3f-9a21-6c4d8b2e1f30"),
        4
    );
    for operation in &request.operations {
        operation.validate().unwrap();
    }
}

#[test]
fn reconcile_response() {
    let response: ReconciliationResponse = body("http_reconcile_response");
    assert_eq!(response.current_version, "91");
    let conflict = &response.conflicts[0];
    assert_eq!(conflict.entity_id, "task-311");
    assert_eq!(conflict.operations.len(), 2);
    assert!(
        conflict.operations[0]
            .vector_clock
            .is_concurrent_with(&conflict.operations[1].vector_clock)
    );
    let resolution = conflict.resolution.as_ref().unwrap();
    assert_eq!(resolution.strategy, ResolutionStrategy::FieldLevelMerge);
    assert_eq!(resolution.result, response.delta_updates[0].data);
    assert_eq!(response.resolved_operations.len(), 2);
    for snapshot in &response.delta_updates {
        assert!(snapshot.checksum_is_valid(), "{}", snapshot.entity_id);
    }
}

#[test]
fn state_snapshot() {
    let snapshot: StateSnapshot = body("http_state_snapshot");
    assert_eq!(snapshot.entity_type, "task");
    assert_eq!(snapshot.version, "90");
    assert!(!snapshot.deleted);
    assert_eq!(snapshot.data["title"], "Ship v1.0");
    assert_eq!(snapshot.checksum, protocol::checksum(&snapshot.data));
    assert!(snapshot.checksum_is_valid());
}

#[test]
fn transactions() {
    let request: TransactionRequest = body("http_transaction_request");
    assert_eq!(request.transaction_type, "payment.transfer");
    assert_eq!(request.payload["amount"], 250_000);
    let accepted: TransactionAccepted = body("http_transaction_accepted");
    assert_eq!(accepted.status, TransactionState::Pending);
    assert_eq!(accepted.audit_id, "aud-000512");
    let status: TransactionStatus = body("http_transaction_status");
    assert_eq!(status.transaction_id, accepted.transaction_id);
    assert_eq!(status.status, TransactionState::Rejected);
    assert!(status.status.is_final());
    assert_eq!(status.reason.as_deref(), Some("insufficient funds"));
}

#[test]
fn health() {
    let health: Health = body("http_health");
    assert_eq!(health.status, HealthState::Degraded);
    assert_eq!(health.status.http_status(), 200);
    assert_eq!(health.services.websocket.status, HealthState::Healthy);
    assert_eq!(health.services.websocket.metrics["activeConnections"], 1287);
    assert_eq!(health.services.storage.status, HealthState::Degraded);
    assert_eq!(
        health.services.storage.message.as_deref(),
        Some("disk 91% full")
    );
    assert_eq!(health.version, "0.1.0");
}

#[test]
fn audit_page_and_verify() {
    let page: AuditPage = body("http_audit_page");
    let [newest, older] = &page.entries[..] else {
        panic!("two entries expected")
    };
    assert_eq!(newest.actor_type, ActorType::SuperAdmin);
    assert_eq!(newest.target_tenant_id.as_deref(), Some("tenant-acme"));
    assert!(newest.justification.is_some());
    assert_eq!(newest.result, AuditResult::Success);
    assert_eq!(newest.prev_hash, older.hash);
    assert!(newest.sequence > older.sequence);
    assert_eq!(older.result, AuditResult::Failure);
    assert_eq!(older.resource_id.as_deref(), Some("tenant-globex"));
    let verify: AuditVerify = body("http_audit_verify");
    assert!(verify.valid);
    assert_eq!(verify.entries, 514);
}

#[test]
fn error_body() {
    let error: ErrorBody = body("http_error");
    assert_eq!(error.code, ErrorCode::IdempotencyConflict);
    assert_eq!(error.status, ErrorCode::IdempotencyConflict.http_status());
    assert_eq!(error.reference, None);
    assert_eq!(error.retry_after_ms(), None);
}

// ---- leniency and strictness ------------------------------------------------------

#[test]
fn unknown_event_names_decode_to_unknown() {
    let text = r#"{"event":"typing_started","data":{"roomId":"r1"},"ref":"c-9"}"#;
    let (event, reference) = ClientEvent::decode(text).unwrap();
    assert_eq!(
        event,
        ClientEvent::Unknown {
            event: "typing_started".into(),
            data: json!({"roomId": "r1"})
        }
    );
    assert_eq!(reference.as_deref(), Some("c-9"));
    let encoded: Value = serde_json::from_str(&event.encode(Some("c-9"))).unwrap();
    assert_eq!(encoded, serde_json::from_str::<Value>(text).unwrap());

    let (event, _) = ServerEvent::decode(r#"{"event":"room_closed","data":null}"#).unwrap();
    assert_eq!(
        event,
        ServerEvent::Unknown {
            event: "room_closed".into(),
            data: Value::Null
        }
    );
    // A server-only name sent to the server is unknown there, and vice versa.
    let (event, _) = ClientEvent::decode(r#"{"event":"pong","data":{}}"#).unwrap();
    assert!(matches!(event, ClientEvent::Unknown { .. }));
    let (event, _) = ServerEvent::decode(r#"{"event":"join_room","data":{}}"#).unwrap();
    assert!(matches!(event, ServerEvent::Unknown { .. }));
}

#[test]
fn unknown_extra_fields_are_ignored() {
    for name in FIXTURES {
        let mut extended = value(name);
        let object = extended.as_object_mut().unwrap();
        object.insert("addedInV2".into(), json!({"nested": [1, 2]}));
        if let Some(Value::Object(data)) = object.get_mut("data") {
            data.insert("anotherNewField".into(), json!("x"));
        }
        let extended = extended.to_string();
        if name.starts_with("ws_client_") {
            assert_eq!(
                ClientEvent::decode(&extended).unwrap(),
                ClientEvent::decode(&text(name)).unwrap(),
                "{name}"
            );
        } else if name.starts_with("ws_server_") {
            assert_eq!(
                ServerEvent::decode(&extended).unwrap(),
                ServerEvent::decode(&text(name)).unwrap(),
                "{name}"
            );
        }
    }
    // And in HTTP bodies, including nested objects.
    let mut page = value("http_poll_response");
    page["cursorTtlMs"] = json!(604_800_000);
    page["events"][1]["priority"] = json!("high");
    let page: PollResponse = protocol::decode(&page.to_string()).unwrap();
    assert_eq!(page, protocol::decode(&text("http_poll_response")).unwrap());
}

#[test]
fn an_unknown_interaction_class_names_the_field() {
    let mut frame = value("ws_client_message");
    frame["data"]["interactionClass"] = json!("CLASS_X");
    let err = ClientEvent::decode(&frame.to_string()).unwrap_err();
    assert_eq!(err.path, "data.interactionClass");
    assert!(err.message.contains("CLASS_X"), "{err}");

    let mut frame = value("ws_server_message");
    frame["data"]["interactionClass"] = json!("CLASS_X");
    let err = ServerEvent::decode(&frame.to_string()).unwrap_err();
    assert_eq!(err.path, "data.interactionClass");

    // An error body for it names the field too.
    let error = ErrorBody::from(err);
    assert_eq!(error.code, ErrorCode::InvalidRequest);
    assert_eq!(error.path(), Some("data.interactionClass"));
}

#[test]
fn a_message_to_both_a_user_and_a_room_fails_validation() {
    let mut frame = value("ws_client_message");
    frame["data"]["recipientId"] = json!("user-bo");
    let (event, _) = ClientEvent::decode(&frame.to_string()).unwrap();
    let err = event.validate().unwrap_err();
    assert_eq!(err.path, "data.roomId");
    assert!(err.message.contains("recipientId"), "{err}");

    let mut body = value("http_send_message_request");
    body["roomId"] = json!("project-apollo");
    let message: SendMessage = protocol::decode(&body.to_string()).unwrap();
    assert_eq!(message.validate().unwrap_err().path, "roomId");
}

#[test]
fn bad_frames_are_errors_naming_the_field() {
    for (text, path) in [
        ("not json", "input"),
        ("[]", "input"),
        (r#""message""#, "input"),
        (r#"{"data":{"roomId":"r"}}"#, "event"),
        (r#"{"event":null}"#, "event"),
        (
            r#"{"event":"join_room","data":{"roomId":"r"},"ref":3}"#,
            "ref",
        ),
        (r#"{"event":"join_room","data":{}}"#, "data.roomId"),
        (r#"{"event":"join_room"}"#, "data"),
        (
            r#"{"event":"resume","data":{"lastEventId":7}}"#,
            "data.lastEventId",
        ),
        (
            r#"{"event":"presence_update","data":{"status":"busy"}}"#,
            "data.status",
        ),
        (
            r#"{"event":"message","data":{"payload":1,"roomId":"r"}}"#,
            "data.type",
        ),
    ] {
        let err = ClientEvent::decode(text).unwrap_err();
        assert_eq!(err.path, path, "{text}: {err}");
    }
    let err = ServerEvent::decode(r#"{"event":"resumed","data":{"lastEventId":"e"}}"#).unwrap_err();
    assert_eq!(err.path, "data.replayed");
    let err =
        ServerEvent::decode(r#"{"event":"pong","data":{"serverTime":"yesterday"}}"#).unwrap_err();
    assert_eq!(err.path, "data.serverTime");
}

#[test]
fn ping_needs_no_data_and_ignores_any() {
    for text in [
        r#"{"event":"ping"}"#,
        r#"{"event":"ping","data":null}"#,
        r#"{"event":"ping","data":{"x":1}}"#,
    ] {
        assert_eq!(
            ClientEvent::decode(text).unwrap(),
            (ClientEvent::Ping, None)
        );
    }
    assert_eq!(
        ClientEvent::Ping.encode(None),
        r#"{"event":"ping","data":null}"#
    );
}

#[test]
fn an_unknown_error_code_still_decodes() {
    let (event, reference) = ServerEvent::decode(
        r#"{"event":"error","data":{"error":"quota","code":"QUOTA_EXCEEDED","status":402,"ref":"c-4"}}"#,
    )
    .unwrap();
    let ServerEvent::Error(body) = event else {
        panic!("not an error")
    };
    assert_eq!(body.code, ErrorCode::Unknown);
    // The ref comes from data.ref when the envelope has none.
    assert_eq!(reference.as_deref(), Some("c-4"));
}
