//! The chaos layer (issue 7): off unless enabled, admin only, and each switch and
//! action doing what it says — over HTTP and from Rust.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use webwaka_server_stub::chaos::Target;
use webwaka_server_stub::{ChaosSettings, Config, DropAcks, HttpFailures, Server};

use crate::common::{Read, TestServer, audit_entries, message};

const CHAOS: &str = "/api/admin/chaos";

/// A server with the chaos layer on.
async fn chaos_server(tweak: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start(|c| {
        c.chaos = true;
        tweak(c);
    })
    .await
}

/// PUT or DELETE with a token; (status, JSON body).
async fn call(ts: &TestServer, method: &str, path: &str, token: &str, body: Value) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let response = ts
        .http
        .request(method, ts.url(path))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn chaos_is_off_unless_enabled_and_never_in_production() {
    let ts = TestServer::start(|_| {}).await;
    assert!(ts.running().chaos().is_none());
    let admin = ts.token("t1", "root", &["admin"]);
    let (status, body) = ts.get(CHAOS, Some(&admin), &[]).await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("CHAOS=1"),
        "{body}"
    );
    let (status, _) = ts
        .post(
            &format!("{CHAOS}/drop-connections"),
            Some(&admin),
            json!({}),
            &[],
        )
        .await;
    assert_eq!(status, 404);
    // Production mode refuses to start with it.
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::common::test_config(dir.path());
    config.chaos = true;
    config.mode = webwaka_server_stub::config::Mode::Production;
    let error = Server::start(config).await.err().expect("refused");
    assert!(error.to_string().contains("CHAOS"), "{error}");
}

#[tokio::test]
async fn only_admins_drive_it_and_bad_settings_name_their_field() {
    let ts = chaos_server(|_| {}).await;
    let user = ts.token("t1", "alice", &[]);
    let admin = ts.token("t1", "root", &["admin"]);
    let (status, body) = ts.get(CHAOS, Some(&user), &[]).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("AUTHZ_FAILED")));
    let (status, state) = ts.get(CHAOS, Some(&admin), &[]).await;
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["refuseWebSocket"], false, "{state}");
    assert_eq!(state["latencyMs"], 0);
    assert_eq!(state["httpFailures"], Value::Null);
    for (body, path) in [
        (json!({"latencyMs": 60_001}), "latencyMs"),
        (
            json!({"httpFailures": {"fraction": 0.5, "status": 404}}),
            "httpFailures.status",
        ),
        (json!({"dropAcks": {"fraction": 2.0}}), "dropAcks.fraction"),
        (json!({"latency": 5}), "latency"),
    ] {
        let (status, error) = call(&ts, "PUT", CHAOS, &admin, body).await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["details"]["path"], path, "{error}");
    }
    // Refused settings changed nothing.
    assert_eq!(
        ts.running().chaos().unwrap().state().settings,
        ChaosSettings::default()
    );
    // A change is audited.
    let (status, state) = call(&ts, "PUT", CHAOS, &admin, json!({"latencyMs": 1})).await;
    assert_eq!((status, state["latencyMs"].as_u64()), (200, Some(1)));
    let (status, state) = call(&ts, "DELETE", CHAOS, &admin, Value::Null).await;
    assert_eq!((status, state["latencyMs"].as_u64()), (200, Some(0)));
    let actions: Vec<String> = audit_entries(&ts, "t1")
        .await
        .iter()
        .map(|e| e["action"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(actions.contains(&"chaos.set".to_owned()), "{actions:?}");
    assert!(actions.contains(&"chaos.reset".to_owned()), "{actions:?}");
}

#[tokio::test]
async fn refused_upgrades_leave_polling_working() {
    let ts = chaos_server(|_| {}).await;
    let admin = ts.token("t1", "root", &["admin"]);
    let alice = ts.token("t1", "alice", &[]);
    let (status, _) = call(&ts, "PUT", CHAOS, &admin, json!({"refuseWebSocket": true})).await;
    assert_eq!(status, 200);
    let Err((status, body)) = ts.ws_raw(Some(&alice), "", &[]).await else {
        panic!("the upgrade went through");
    };
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "SERVER_FULL");
    assert_eq!(body["details"]["chaos"], "REFUSE_WEBSOCKET");
    assert_eq!(ts.get("/api/events/poll", Some(&alice), &[]).await.0, 200);
    // From Rust, off again: upgrades work.
    ts.running().chaos().unwrap().refuse_websocket(false);
    let mut ws = ts.ws(&alice).await;
    ws.assert_usable().await;
}

#[tokio::test]
async fn connections_are_dropped_per_user_per_tenant_or_all() {
    let ts = chaos_server(|_| {}).await;
    let admin = ts.token("t1", "root", &["admin"]);
    let mut alice = ts.ws(&ts.token("t1", "alice", &[])).await;
    let mut bob = ts.ws(&ts.token("t1", "bob", &[])).await;
    let mut carol = ts.ws(&ts.token("t2", "carol", &[])).await;
    let drop = format!("{CHAOS}/drop-connections");
    let (status, r) = ts
        .post(&drop, Some(&admin), json!({"userId": "bob"}), &[])
        .await;
    assert_eq!((status, r["closed"].as_u64()), (200, Some(1)), "{r}");
    // Abruptly: no close frame.
    match bob.read(Duration::from_secs(3)).await {
        Read::Closed(frame) => assert!(frame.is_none(), "{frame:?}"),
        other => panic!("bob still connected: {other:?}"),
    }
    alice.assert_usable().await;
    // No body: every connection of the caller's tenant, not the other tenant's.
    let response = ts
        .http
        .post(ts.url(&drop))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(matches!(
        alice.read(Duration::from_secs(3)).await,
        Read::Closed(None)
    ));
    carol.assert_usable().await;
    // From Rust: everyone.
    let closed = ts
        .running()
        .chaos()
        .unwrap()
        .drop_connections(Target::Everyone);
    assert_eq!(closed, 1);
    assert!(matches!(
        carol.read(Duration::from_secs(3)).await,
        Read::Closed(None)
    ));
    // They can come back.
    let mut again = ts.ws(&ts.token("t1", "bob", &[])).await;
    again.assert_usable().await;
}

#[tokio::test]
async fn latency_is_added_to_requests_and_frames_but_not_to_the_controls() {
    let ts = chaos_server(|_| {}).await;
    let admin = ts.token("t1", "root", &["admin"]);
    let alice = ts.token("t1", "alice", &[]);
    let mut ws = ts.ws(&alice).await;
    let control = ts.running().chaos().unwrap();
    control
        .set_latency(Duration::from_millis(300), Duration::ZERO)
        .unwrap();
    let t = Instant::now();
    assert_eq!(ts.get("/api/events/poll", Some(&alice), &[]).await.0, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    let t = Instant::now();
    ws.assert_usable().await;
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    // The controls answer at once, even with a long latency.
    control
        .set_latency(Duration::from_secs(10), Duration::ZERO)
        .unwrap();
    let t = Instant::now();
    let (status, state) = ts.get(CHAOS, Some(&admin), &[]).await;
    assert_eq!((status, state["latencyMs"].as_u64()), (200, Some(10_000)));
    let (status, _) = call(&ts, "DELETE", CHAOS, &admin, Value::Null).await;
    assert_eq!(status, 200);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(ts.get("/health", None, &[]).await.0 == 200);
}

#[tokio::test]
async fn http_failures_are_seeded_and_change_nothing() {
    let ts = chaos_server(|c| c.poll_rate_limit = 0).await;
    let admin = ts.token("t1", "root", &["admin"]);
    let alice = ts.token("t1", "alice", &[]);
    let bob = ts.token("t1", "bob", &[]);
    let settings = json!({"httpFailures": {"fraction": 0.5, "status": 503, "seed": 42}});
    let mut runs = Vec::new();
    for _ in 0..2 {
        // Setting it again restarts the decisions from the seed.
        assert_eq!(
            call(&ts, "PUT", CHAOS, &admin, settings.clone()).await.0,
            200
        );
        let mut statuses = Vec::new();
        for _ in 0..40 {
            statuses.push(ts.get("/api/events/poll", Some(&alice), &[]).await.0);
        }
        runs.push(statuses);
    }
    assert_eq!(runs[0], runs[1], "same seed, same failures");
    let failed = runs[0].iter().filter(|s| **s == 503).count();
    assert!((5..=35).contains(&failed), "{failed} of 40 failed at 0.5");
    assert!(runs[0].iter().all(|s| *s == 200 || *s == 503));
    // 429 carries its retry delay; a failed request is not applied.
    let settings = json!({"httpFailures": {"fraction": 1.0, "status": 429, "seed": 1}});
    assert_eq!(call(&ts, "PUT", CHAOS, &admin, settings).await.0, 200);
    let (status, body) = ts
        .post(
            "/api/messages",
            Some(&alice),
            json!({"type": "t", "recipientId": "bob", "payload": 1, "messageId": "m1"}),
            &[],
        )
        .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["details"]["retryAfterMs"], 1000);
    assert_eq!(body["details"]["chaos"], "HTTP_FAILURE");
    ts.running().chaos().unwrap().fail_http(None).unwrap();
    let (_, page) = ts.get("/api/events/poll", Some(&bob), &[]).await;
    assert_eq!(page["events"], json!([]), "{page}");
    // Rust: 500s.
    ts.running()
        .chaos()
        .unwrap()
        .fail_http(Some(HttpFailures {
            fraction: 1.0,
            status: 500,
            seed: 0,
        }))
        .unwrap();
    let (status, body) = ts.get("/api/events/poll", Some(&bob), &[]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (500, Some("INTERNAL_ERROR"))
    );
}

#[tokio::test]
async fn dropped_acks_are_stored_and_the_resend_is_deduplicated() {
    let ts = chaos_server(|_| {}).await;
    let admin = ts.token("t1", "root", &["admin"]);
    let mut alice = ts.ws(&ts.token("t1", "alice", &[])).await;
    let mut bob = ts.ws(&ts.token("t1", "bob", &[])).await;
    let drop_all = json!({"dropAcks": {"fraction": 1.0, "seed": 3}});
    assert_eq!(call(&ts, "PUT", CHAOS, &admin, drop_all).await.0, 200);
    // WebSocket: delivered, never acknowledged.
    let mut data = message(Some("bob"), None, "hi");
    data["messageId"] = json!("m-ws");
    alice
        .send(json!({"event": "message", "data": data, "ref": "r1"}))
        .await;
    let delivered = bob.expect("message").await;
    alice
        .expect_none("message_ack", Duration::from_millis(500))
        .await;
    // The resend, acknowledgements back: the same event, not delivered again.
    ts.running().chaos().unwrap().drop_acks(None).unwrap();
    let ack = alice.call("message", data.clone(), "r2").await;
    assert_eq!(ack["event"], "message_ack", "{ack}");
    assert_eq!(ack["data"]["eventId"], delivered["data"]["eventId"]);
    bob.expect_none("message", Duration::from_millis(500)).await;
    // HTTP: 500 ACK_DROPPED, stored; the resend gets the 201 with the same event.
    ts.running()
        .chaos()
        .unwrap()
        .drop_acks(Some(DropAcks {
            fraction: 1.0,
            seed: 0,
        }))
        .unwrap();
    let alice_token = ts.token("t1", "alice", &[]);
    let body = json!({"type": "t", "recipientId": "bob", "payload": 2, "messageId": "m-http"});
    let (status, error) = ts
        .post("/api/messages", Some(&alice_token), body.clone(), &[])
        .await;
    assert_eq!(status, 500, "{error}");
    assert_eq!(error["details"]["chaos"], "ACK_DROPPED");
    let first = bob.expect("message").await;
    ts.running().chaos().unwrap().drop_acks(None).unwrap();
    let (status, accepted) = ts
        .post("/api/messages", Some(&alice_token), body, &[])
        .await;
    assert_eq!(status, 201, "{accepted}");
    assert_eq!(accepted["eventId"], first["data"]["eventId"]);
    bob.expect_none("message", Duration::from_millis(500)).await;
    let bob_token = ts.token("t1", "bob", &[]);
    let (_, page) = ts.get("/api/events/poll", Some(&bob_token), &[]).await;
    assert_eq!(page["events"].as_array().unwrap().len(), 2, "{page}");
}

#[tokio::test]
async fn reconcile_times_out_after_applying() {
    let ts = chaos_server(|c| c.reconciliation_processing_timeout_ms = 300).await;
    let alice = ts.token("t1", "alice", &[]);
    let op = json!({
        "operationId": "o1", "clientId": "c1", "tenantId": "t1", "entityType": "task",
        "entityId": "task-1", "operationType": "CREATE", "payload": {"title": "Ship"},
        "timestamp": "2026-01-30T09:00:00Z", "vectorClock": {"c1": 1},
    });
    let request = json!({
        "requestId": "req-1", "clientId": "c1", "tenantId": "t1",
        "operations": [op], "requestedAt": "2026-01-30T10:20:00Z",
    });
    let path = "/api/reconciliation/reconcile";
    ts.running().chaos().unwrap().reconcile_timeout(true);
    let t = Instant::now();
    let (status, error) = ts.post(path, Some(&alice), request.clone(), &[]).await;
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(status, 500, "{error}");
    assert_eq!(
        error["details"]["reason"],
        "RECONCILIATION_PROCESSING_TIMEOUT"
    );
    assert_eq!(error["details"]["chaos"], "RECONCILE_TIMEOUT");
    // It was applied.
    let (status, snapshot) = ts
        .get(
            "/api/reconciliation/snapshot/task/task-1",
            Some(&alice),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{snapshot}");
    assert_eq!(snapshot["data"]["title"], "Ship");
    // The resend is harmless: same version.
    ts.running().chaos().unwrap().reconcile_timeout(false);
    let (status, r) = ts.post(path, Some(&alice), request, &[]).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["currentVersion"], snapshot["version"]);
}

#[tokio::test]
async fn expired_tokens_are_refused_and_their_connections_closed() {
    let ts = chaos_server(|_| {}).await;
    let keys = ts.running().keys().clone();
    let now = chrono::Utc::now().timestamp();
    // Tokens issued a while ago (valid for an hour more).
    let old = |user: &str, roles: &[&str]| {
        keys.sign(&json!({
            "tenantId": "t1", "userId": user, "roles": roles, "iat": now - 10, "exp": now + 3600,
        }))
    };
    let alice_old = old("alice", &[]);
    let admin_old = old("root", &["admin"]);
    let mut ws = ts.ws(&alice_old).await;
    assert_eq!(
        ts.get("/api/events/poll", Some(&alice_old), &[]).await.0,
        200
    );
    let (status, r) = ts
        .post(
            &format!("{CHAOS}/expire-tokens"),
            Some(&admin_old),
            json!({}),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["closed"], 1);
    assert_eq!(ws.expect_close(Duration::from_secs(3)).await, Some(1008));
    let (status, body) = ts.get("/api/events/poll", Some(&alice_old), &[]).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("AUTH_FAILED")));
    assert!(ts.ws_raw(Some(&alice_old), "", &[]).await.is_err());
    // A token issued now works.
    let fresh = ts.token("t1", "alice", &[]);
    assert_eq!(ts.get("/api/events/poll", Some(&fresh), &[]).await.0, 200);
    let mut ws = ts.ws(&fresh).await;
    ws.assert_usable().await;
    // Reset: old tokens are fine again.
    let admin = ts.token("t1", "root", &["admin"]);
    assert_eq!(call(&ts, "DELETE", CHAOS, &admin, Value::Null).await.0, 200);
    assert_eq!(
        ts.get("/api/events/poll", Some(&alice_old), &[]).await.0,
        200
    );
    // From Rust (the fresh connection may go too, if a second has passed).
    let mut old_ws = ts.ws(&alice_old).await;
    assert!(ts.running().chaos().unwrap().expire_tokens() >= 1);
    assert_eq!(
        old_ws.expect_close(Duration::from_secs(3)).await,
        Some(1008)
    );
    drop(ws);
}
