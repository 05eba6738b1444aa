//! PROTOCOL.md §4: `POST /api/messages`, polling and publishing.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{TestServer, message};

#[tokio::test]
async fn http_messages_are_durable_idempotent_and_checked() {
    let ts = TestServer::start(|c| c.http_max_body_bytes = 8192).await;
    let alice = ts.token("t1", "alice", &[]);
    let bob = ts.token("t1", "bob", &[]);
    let mut b = ts.ws(&bob).await;
    let mut body = message(Some("bob"), None, "offline hello");
    body["messageId"] = json!("3f2b8c4d-1e6a-4b7f-8c9d-0a1b2c3d4e5f");
    body["interactionClass"] = json!("CLASS_B");
    let (status, first) = ts
        .post("/api/messages", Some(&alice), body.clone(), &[])
        .await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["messageId"], "3f2b8c4d-1e6a-4b7f-8c9d-0a1b2c3d4e5f");
    let got = b.expect("message").await;
    assert_eq!(got["data"]["sequence"], first["sequence"]);
    let (status, again) = ts.post("/api/messages", Some(&alice), body, &[]).await;
    assert_eq!((status, &again), (201, &first));
    b.expect_none("message", Duration::from_millis(300)).await;
    // Bad inputs, each named.
    let cases: Vec<(Value, &str)> = vec![
        (json!("RAW:{broken"), "input"),
        (json!("RAW:"), "input"),
        (json!({"payload": 1, "recipientId": "bob"}), "type"),
        (json!({"type": "t", "recipientId": "bob"}), "payload"),
        (json!({"type": "t", "payload": 1}), "recipientId"),
        (
            json!({"type": "t", "payload": 1, "recipientId": "b", "roomId": "r"}),
            "roomId",
        ),
        (
            json!({"type": "t", "payload": 1, "recipientId": "b", "interactionClass": "CLASS_A"}),
            "interactionClass",
        ),
        (
            json!({"type": "t", "payload": 1, "recipientId": "b", "interactionClass": "CLASS_D"}),
            "interactionClass",
        ),
        (
            json!({"type": "t", "payload": 1, "recipientId": "b", "interactionClass": "nope"}),
            "interactionClass",
        ),
    ];
    for (body, path) in cases {
        let (status, error) = ts
            .post("/api/messages", Some(&alice), body.clone(), &[])
            .await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["code"], "INVALID_REQUEST");
        assert_eq!(error["details"]["path"], path, "{body}: {error}");
    }
    let huge = message(Some("bob"), None, &"x".repeat(10_000));
    let (status, error) = ts.post("/api/messages", Some(&alice), huge, &[]).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (413, Some("PAYLOAD_TOO_LARGE"))
    );
    let mut other = message(Some("bob"), None, "x");
    other["tenantId"] = json!("t2");
    let (status, error) = ts.post("/api/messages", Some(&alice), other, &[]).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (403, Some("TENANT_VIOLATION"))
    );
    let (status, error) = ts
        .post(
            "/api/messages",
            Some(&alice),
            message(None, Some("closed"), "x"),
            &[],
        )
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (403, Some("AUTHZ_FAILED"))
    );
    // None of the refusals reached the log.
    let (_, page) = ts.get("/api/events/poll", Some(&bob), &[]).await;
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
    // Unknown endpoints and methods answer in the error shape.
    let (status, error) = ts.get("/api/nope", Some(&alice), &[]).await;
    assert_eq!((status, error["code"].as_str()), (404, Some("NOT_FOUND")));
    let (status, error) = ts.get("/api/messages", Some(&alice), &[]).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("INVALID_REQUEST"))
    );
}

#[tokio::test]
async fn polling_pages_through_what_the_user_may_see() {
    let ts = TestServer::start(|_| {}).await;
    let alice = ts.token("t1", "alice", &[]);
    let bob = ts.token("t1", "bob", &[]);
    let carol = ts.token("t1", "carol", &[]);
    let mut ids = Vec::new();
    for i in 0..5 {
        let (_, ack) = ts
            .post(
                "/api/messages",
                Some(&alice),
                message(Some("bob"), None, &format!("m{i}")),
                &[],
            )
            .await;
        ids.push(ack["eventId"].as_str().unwrap().to_owned());
    }
    // Not carol's.
    let (_, page) = ts.get("/api/events/poll", Some(&carol), &[]).await;
    assert_eq!(
        page,
        json!({"events": [], "hasMore": false, "nextEventId": null})
    );
    // Bob pages 2 at a time.
    let (status, page) = ts.get("/api/events/poll?limit=2", Some(&bob), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(page["hasMore"], true);
    assert_eq!(page["events"][0]["eventType"], "message");
    assert_eq!(page["events"][0]["payload"]["payload"]["text"], "m0");
    assert_eq!(page["nextEventId"], ids[1].as_str());
    let mut cursor = page["nextEventId"].as_str().unwrap().to_owned();
    let mut seen = 2;
    for _ in 0..5 {
        let (_, page) = ts
            .get(
                &format!("/api/events/poll?limit=2&lastEventId={cursor}"),
                Some(&bob),
                &[],
            )
            .await;
        let n = page["events"].as_array().unwrap().len();
        seen += n;
        if n == 0 {
            assert_eq!(page["nextEventId"], cursor.as_str());
            assert_eq!(page["hasMore"], false);
            break;
        }
        cursor = page["nextEventId"].as_str().unwrap().to_owned();
    }
    assert_eq!(seen, 5);
    // The sender sees its own (its other devices catch up).
    let (_, page) = ts.get("/api/events/poll", Some(&alice), &[]).await;
    assert_eq!(page["events"].as_array().unwrap().len(), 5);
    // Bad parameters and cursors.
    for q in ["limit=0", "limit=1001", "limit=x"] {
        let (status, error) = ts
            .get(&format!("/api/events/poll?{q}"), Some(&bob), &[])
            .await;
        assert_eq!(status, 400, "{q}");
        assert_eq!(error["details"]["path"], "limit");
    }
    let (status, error) = ts
        .get("/api/events/poll?lastEventId=unknown", Some(&bob), &[])
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (410, Some("CURSOR_EXPIRED"))
    );
    // Another tenant's event id is unknown here.
    let other = ts.token("t2", "bob", &[]);
    let (status, _) = ts
        .get(
            &format!("/api/events/poll?lastEventId={}", ids[0]),
            Some(&other),
            &[],
        )
        .await;
    assert_eq!(status, 410);
}

#[tokio::test]
async fn the_poll_limit_answers_429_with_retry_after() {
    let ts = TestServer::start(|c| c.poll_rate_limit = 2).await;
    let bob = ts.token("t1", "bob", &[]);
    for _ in 0..2 {
        assert_eq!(ts.get("/api/events/poll", Some(&bob), &[]).await.0, 200);
    }
    let response = ts
        .http
        .get(ts.url("/api/events/poll"))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    assert!(response.headers().get("retry-after").is_some());
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "RATE_LIMIT");
    assert!(body["details"]["retryAfterMs"].as_u64().unwrap() > 0);
    // Snapshots count as polling.
    let (status, _) = ts
        .get("/api/reconciliation/snapshot/t/x", Some(&bob), &[])
        .await;
    assert_eq!(status, 429);
    // Another user has a budget of their own.
    let carol = ts.token("t1", "carol", &[]);
    assert_eq!(ts.get("/api/events/poll", Some(&carol), &[]).await.0, 200);
}

#[tokio::test]
async fn publishing_needs_a_role_is_idempotent_and_reaches_its_audience() {
    let ts = TestServer::start(|_| {}).await;
    let service = ts.token("t1", "orders", &["service"]);
    let alice = ts.token("t1", "alice", &[]);
    let bob = ts.token("t1", "bob", &[]);
    let mut a = ts.ws(&alice).await;
    let event = json!({
        "eventId": "9b2d4f6a-8c1e-4a3b-9d5f-7e0c2b4a6d8f",
        "eventType": "order.placed",
        "payload": {"orderId": "o-1"},
        "metadata": {"correlationId": "c-1", "region": "eu"},
    });
    let (status, error) = ts
        .post("/api/events", Some(&alice), event.clone(), &[])
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (403, Some("AUTHZ_FAILED"))
    );
    let (status, published) = ts
        .post("/api/events", Some(&service), event.clone(), &[])
        .await;
    assert_eq!(status, 201, "{published}");
    assert_eq!(published["eventId"], "9b2d4f6a-8c1e-4a3b-9d5f-7e0c2b4a6d8f");
    let (status, again) = ts.post("/api/events", Some(&service), event, &[]).await;
    assert_eq!((status, &again), (201, &published));
    // Tenant-wide: everyone's WebSocket and poll.
    let got = a.expect("event").await["data"].clone();
    assert_eq!(got["eventType"], "order.placed");
    assert_eq!(got["metadata"]["source"], "orders");
    assert_eq!(got["metadata"]["region"], "eu");
    assert_eq!(got["schemaVersion"], "1.0");
    assert_eq!(got["sequence"], published["sequence"]);
    a.expect_none("event", Duration::from_millis(200)).await;
    let (_, page) = ts.get("/api/events/poll", Some(&bob), &[]).await;
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
    // Targeted: only the recipient.
    let (status, _) = ts
        .post(
            "/api/events",
            Some(&service),
            json!({"eventType": "note.private", "payload": null, "recipientId": "bob", "metadata": {"source": "notes"}}),
            &[],
        )
        .await;
    assert_eq!(status, 201);
    a.expect_none("event", Duration::from_millis(200)).await;
    let (_, page) = ts.get("/api/events/poll", Some(&bob), &[]).await;
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    assert_eq!(page["events"][1]["metadata"]["source"], "notes");
    // Bad inputs.
    for (body, path) in [
        (json!({"payload": 1}), "eventType"),
        (json!({"eventType": " ", "payload": 1}), "eventType"),
        (json!({"eventType": "message", "payload": 1}), "eventType"),
        (
            json!({"eventType": "x", "payload": 1, "recipientId": "a", "roomId": "b"}),
            "roomId",
        ),
        (
            json!({"eventType": "x", "payload": 1, "metadata": {"source": 5}}),
            "metadata.source",
        ),
    ] {
        let (status, error) = ts
            .post("/api/events", Some(&service), body.clone(), &[])
            .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(error["details"]["path"], path, "{body}: {error}");
    }
    let (status, error) = ts
        .post(
            "/api/events",
            Some(&service),
            json!({"eventType": "x", "payload": 1, "tenantId": "t2"}),
            &[],
        )
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (403, Some("TENANT_VIOLATION"))
    );
}

/// Alice's direct message to Bob over HTTP; its acknowledgement.
async fn alice_to_bob(ts: &TestServer, text: &str) -> Value {
    let alice = ts.token("t1", "alice", &[]);
    let (status, ack) = ts
        .post(
            "/api/messages",
            Some(&alice),
            message(Some("bob"), None, text),
            &[],
        )
        .await;
    assert_eq!(status, 201, "{ack}");
    ack
}

#[tokio::test]
async fn events_older_than_retention_are_gone_and_their_cursors_expire() {
    let mut ts = TestServer::start(|c| {
        c.event_bus_retention_period_ms = 1_000;
        c.maintenance_interval_ms = 50;
    })
    .await;
    let alice = ts.token("t1", "alice", &[]);
    let ack = alice_to_bob(&ts, "soon gone").await;
    let id = ack["eventId"].as_str().unwrap().to_owned();
    let (status, _) = ts
        .get(
            &format!("/api/events/poll?lastEventId={id}"),
            Some(&alice),
            &[],
        )
        .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let (status, error) = ts
        .get(
            &format!("/api/events/poll?lastEventId={id}"),
            Some(&alice),
            &[],
        )
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (410, Some("CURSOR_EXPIRED"))
    );
    let (status, _) = ts
        .ws_raw(Some(&alice), &format!("lastEventId={id}"), &[])
        .await
        .err()
        .expect("410 before the upgrade");
    assert_eq!(status, 410);
    let (_, page) = ts.get("/api/events/poll", Some(&alice), &[]).await;
    assert_eq!(page["events"], json!([]));
    // Sequences do not restart after the log emptied.
    let ack2 = alice_to_bob(&ts, "next").await;
    assert_eq!(
        ack2["sequence"].as_u64(),
        ack["sequence"].as_u64().map(|s| s + 1)
    );
    // Nor after a restart, when the only record of the purged sequences is the
    // counter purge kept.
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let (_, page) = ts.get("/api/events/poll", Some(&alice), &[]).await;
    assert_eq!(
        page["events"],
        json!([]),
        "the second message is purged too"
    );
    ts.restart().await;
    let ack3 = alice_to_bob(&ts, "after restart").await;
    assert_eq!(
        ack3["sequence"].as_u64(),
        ack["sequence"].as_u64().map(|s| s + 2)
    );
}

#[tokio::test]
async fn a_justified_super_admin_polls_every_event_of_the_tenant() {
    let ts = TestServer::start(|_| {}).await;
    let alice = ts.token("t-b", "alice", &[]);
    ts.post(
        "/api/messages",
        Some(&alice),
        message(Some("bob"), None, "private"),
        &[],
    )
    .await;
    let root = ts.token("platform", "root", &["super_admin"]);
    let (status, page) = ts
        .get(
            "/api/events/poll",
            Some(&root),
            &[
                ("X-Tenant-ID", "t-b"),
                ("X-Admin-Justification", "incident 12"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
    assert_eq!(page["events"][0]["tenantId"], "t-b");
}

#[tokio::test]
async fn publish_and_reconciliation_have_their_own_limits() {
    let ts = TestServer::start(|c| {
        c.publish_rate_limit = 2;
        c.reconciliation_rate_limit = 1;
    })
    .await;
    let svc = ts.token("t1", "svc", &["service"]);
    for _ in 0..2 {
        let (status, _) = ts
            .post(
                "/api/events",
                Some(&svc),
                json!({"eventType": "a.b", "payload": 1}),
                &[],
            )
            .await;
        assert_eq!(status, 201);
    }
    let (status, error) = ts
        .post(
            "/api/events",
            Some(&svc),
            json!({"eventType": "a.b", "payload": 1}),
            &[],
        )
        .await;
    assert_eq!((status, error["code"].as_str()), (429, Some("RATE_LIMIT")));
    let pull = json!({"requestId": "r", "clientId": "c", "tenantId": "t1", "operations": [], "requestedAt": "2026-01-30T10:00:00Z"});
    let (status, _) = ts
        .post(
            "/api/reconciliation/reconcile",
            Some(&svc),
            pull.clone(),
            &[],
        )
        .await;
    assert_eq!(status, 200);
    let (status, error) = ts
        .post("/api/reconciliation/reconcile", Some(&svc), pull, &[])
        .await;
    assert_eq!((status, error["code"].as_str()), (429, Some("RATE_LIMIT")));
    // The published events were not affected by the refusal.
    let (_, page) = ts.get("/api/events/poll", Some(&svc), &[]).await;
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
}
