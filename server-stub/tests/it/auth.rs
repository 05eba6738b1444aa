//! PROTOCOL.md §1: tokens, tenancy, super admin; every refusal before any work.

use serde_json::{Value, json};

use crate::common::{TestServer, audit_entries};

fn b64url(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Tokens that must all be refused, with a label.
fn bad_tokens(ts: &TestServer) -> Vec<(&'static str, String)> {
    let keys = ts.running().keys();
    let far = chrono::Utc::now().timestamp() + 3600;
    let unsigned = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(format!(r#"{{"tenantId":"t1","userId":"u1","exp":{far}}}"#).as_bytes())
    );
    let other = webwaka_server_stub::Keys::new(b"some-other-secret-0123456789abcdef", 0);
    vec![
        ("garbage", "not-a-jwt".to_owned()),
        ("alg none", unsigned),
        ("wrong secret", other.mint("t1", "u1", &[], 3600)),
        ("expired", keys.mint("t1", "u1", &[], -3600)),
        ("no tenant", keys.sign(&json!({"userId": "u1", "exp": far}))),
        ("no user", keys.sign(&json!({"tenantId": "t1", "exp": far}))),
        (
            "no exp",
            keys.sign(&json!({"tenantId": "t1", "userId": "u1"})),
        ),
        (
            "blank tenant",
            keys.sign(&json!({"tenantId": " ", "userId": "u1", "exp": far})),
        ),
    ]
}

#[tokio::test]
async fn health_and_metrics_need_no_token() {
    let ts = TestServer::start(|_| {}).await;
    let (status, health) = ts.get("/health", None, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "healthy");
    for service in ["websocket", "eventbus", "reconciliation", "storage"] {
        assert_eq!(health["services"][service]["status"], "healthy", "{health}");
    }
    let text = ts
        .http
        .get(ts.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "webwaka_ws_active_connections",
        "webwaka_messages_in",
        "webwaka_messages_out",
        "webwaka_message_latency_seconds",
        "webwaka_events_published",
        "webwaka_events_delivered",
        "webwaka_dlq_size",
        "webwaka_reconciliation_requests",
        "webwaka_reconciliation_conflicts",
        "webwaka_rate_limit_refusals",
        "webwaka_tenant_violations",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_on_http_and_websocket() {
    let ts = TestServer::start(|c| c.jwt_leeway_ms = 0).await;
    let (status, body) = ts.get("/api/events/poll", None, &[]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("AUTH_FAILED")),
        "{body}"
    );
    let (status, body) = ts.ws_raw(None, "", &[]).await.err().expect("refused");
    assert_eq!((status, body["code"].as_str()), (401, Some("AUTH_FAILED")));
    for (label, token) in bad_tokens(&ts) {
        let (status, body) = ts.get("/api/events/poll", Some(&token), &[]).await;
        assert_eq!(status, 401, "{label}: {body}");
        assert_eq!(body["code"], "AUTH_FAILED", "{label}");
        assert_eq!(body["status"], 401, "{label}");
        let (status, body) = ts.ws_raw(Some(&token), "", &[]).await.err().expect(label);
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("AUTH_FAILED")),
            "{label}"
        );
        // The token in the query parameter is checked the same way.
        let (status, _) = ts
            .ws_raw(None, &format!("token={token}"), &[])
            .await
            .err()
            .expect(label);
        assert_eq!(status, 401, "{label}");
    }
    // `sub` stands in for `userId`; a good token in the query works.
    let keys = ts.running().keys();
    let far = chrono::Utc::now().timestamp() + 3600;
    let sub = keys.sign(&json!({"tenantId": "t1", "sub": "s1", "exp": far}));
    let (status, _) = ts.get("/api/events/poll", Some(&sub), &[]).await;
    assert_eq!(status, 200);
    let ws = ts.ws_query("", &format!("token={sub}")).await;
    assert!(ws.connected["connectionId"].is_string());
    // Failures are audited (actor unknown).
    let failures = ts
        .sql_i64("SELECT count(*) FROM audit_log WHERE body LIKE '%auth.failed%'")
        .await;
    assert!(failures >= 20, "{failures}");
}

#[tokio::test]
async fn naming_another_tenant_is_a_violation_through_every_header_door() {
    let ts = TestServer::start(|_| {}).await;
    let alice = ts.token("tenant-a", "alice", &[]);
    let other = [("X-Tenant-ID", "tenant-b")];
    for path in [
        "/api/events/poll",
        "/api/reconciliation/snapshot/task/t1",
        "/api/transactions/txn-1",
        "/api/eventbus/dlq",
    ] {
        let (status, body) = ts.get(path, Some(&alice), &other).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(body["code"], "TENANT_VIOLATION", "{path}");
    }
    let (status, body) = ts
        .get("/api/events/poll?tenantId=tenant-b", Some(&alice), &[])
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("TENANT_VIOLATION"))
    );
    for (path, body) in [
        (
            "/api/messages",
            json!({"type": "t", "payload": 1, "recipientId": "bob"}),
        ),
        ("/api/events", json!({"eventType": "x.y", "payload": 1})),
        (
            "/api/transactions",
            json!({"transactionType": "pay", "payload": {}}),
        ),
    ] {
        let (status, answer) = ts
            .post(
                path,
                Some(&alice),
                body,
                &[("X-Tenant-ID", "tenant-b"), ("Idempotency-Key", "k")],
            )
            .await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (403, Some("TENANT_VIOLATION")),
            "{path}"
        );
    }
    // The upgrade too, before upgrading.
    let (status, body) = ts
        .ws_raw(Some(&alice), "", &other)
        .await
        .err()
        .expect("refused");
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("TENANT_VIOLATION"))
    );
    // The same tenant named explicitly is fine.
    let (status, _) = ts
        .get(
            "/api/events/poll",
            Some(&alice),
            &[("X-Tenant-ID", "tenant-a")],
        )
        .await;
    assert_eq!(status, 200);
    // Every attempt is an audit record, readable by admins of both tenants.
    let entries = audit_entries(&ts, "tenant-a").await;
    let violations: Vec<&Value> = entries
        .iter()
        .filter(|e| e["action"] == "security.tenant_violation")
        .collect();
    assert!(violations.len() >= 9, "{}", violations.len());
    let v = violations[0];
    assert_eq!(v["tenantId"], "tenant-a");
    assert_eq!(v["targetTenantId"], "tenant-b");
    assert_eq!(v["actorId"], "alice");
    assert_eq!(v["result"], "FAILURE");
    let seen_by_b = audit_entries(&ts, "tenant-b").await;
    assert!(
        seen_by_b
            .iter()
            .any(|e| e["action"] == "security.tenant_violation")
    );
}

/// PostgreSQL stores no NUL in text: an id holding a control character is refused by
/// name, and a tenant named with one is audited escaped (the record is written).
#[tokio::test]
async fn control_characters_are_refused_in_ids_and_escaped_in_the_audit() {
    let ts = TestServer::start(|_| {}).await;
    let alice = ts.token("tenant-a", "alice", &["service"]);
    for (path, body, field) in [
        (
            "/api/messages",
            json!({"type": "t", "payload": 1, "recipientId": "bob", "messageId": "m\u{0}1"}),
            "messageId",
        ),
        (
            "/api/messages",
            json!({"type": "t", "payload": 1, "roomId": "r\n"}),
            "roomId",
        ),
        (
            "/api/events",
            json!({"eventType": "x.y", "payload": 1, "eventId": "e\u{0}"}),
            "eventId",
        ),
    ] {
        let (status, answer) = ts.post(path, Some(&alice), body, &[]).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (400, Some("INVALID_REQUEST")),
            "{path}: {answer}"
        );
        assert_eq!(answer["details"]["path"], field, "{answer}");
    }
    // In a query parameter and in a path (percent-encoded).
    for (path, field) in [
        ("/api/events/poll?lastEventId=e%001", "lastEventId"),
        ("/api/reconciliation/snapshot/task/t%001", "entityId"),
        ("/api/transactions/txn%0A1", "transactionId"),
    ] {
        let (status, answer) = ts.get(path, Some(&alice), &[]).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (400, Some("INVALID_REQUEST")),
            "{path}: {answer}"
        );
        assert_eq!(answer["details"]["path"], field, "{answer}");
    }
    let (status, answer) = ts
        .post(
            "/api/messages",
            Some(&alice),
            json!({"tenantId": "tenant-b\u{0}x", "type": "t", "payload": 1, "recipientId": "bob"}),
            &[],
        )
        .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (403, Some("TENANT_VIOLATION")),
        "{answer}"
    );
    let entries = audit_entries(&ts, "tenant-a").await;
    let violation = entries
        .iter()
        .find(|e| e["action"] == "security.tenant_violation")
        .expect("the violation is audited");
    assert_eq!(
        violation["targetTenantId"], "tenant-b\\u{0}x",
        "{violation}"
    );
}

#[tokio::test]
async fn super_admin_needs_a_justification_and_is_audited_either_way() {
    let ts = TestServer::start(|_| {}).await;
    let bob = ts.token("tenant-b", "bob", &[]);
    let (status, _) = ts
        .post(
            "/api/messages",
            Some(&bob),
            json!({"type": "note", "payload": {"n": 1}, "recipientId": "bob"}),
            &[],
        )
        .await;
    assert_eq!(status, 201);
    let root = ts.token("platform", "root", &["super_admin"]);
    let (status, body) = ts
        .get(
            "/api/events/poll",
            Some(&root),
            &[("X-Tenant-ID", "tenant-b")],
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("AUTHZ_FAILED")),
        "{body}"
    );
    let (status, body) = ts
        .get(
            "/api/events/poll",
            Some(&root),
            &[("X-Tenant-ID", "tenant-b"), ("X-Admin-Justification", "  ")],
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = ts
        .get(
            "/api/admin/audit",
            Some(&root),
            &[
                ("X-Tenant-ID", "tenant-b"),
                ("X-Admin-Justification", "ticket #4471"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let entries = audit_entries(&ts, "tenant-b").await;
    let accesses: Vec<&Value> = entries
        .iter()
        .filter(|e| e["action"] == "admin.cross_tenant_access")
        .collect();
    assert_eq!(accesses.len(), 3, "{entries:?}");
    assert!(accesses.iter().any(|e| e["result"] == "SUCCESS"
        && e["justification"] == "ticket #4471"
        && e["actorType"] == "SUPER_ADMIN"));
    assert_eq!(
        accesses.iter().filter(|e| e["result"] == "FAILURE").count(),
        2
    );
    // Reading the audit log is audited too.
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "audit.read" && e["justification"] == "ticket #4471")
    );
    // On the WebSocket: the connection acts in the named tenant.
    let (status, _) = ts
        .ws_raw(Some(&root), "", &[("X-Tenant-ID", "tenant-b")])
        .await
        .err()
        .expect("refused without justification");
    assert_eq!(status, 403);
    let (mut ws, ()) = ts
        .ws_raw(
            Some(&root),
            "",
            &[
                ("X-Tenant-ID", "tenant-b"),
                ("X-Admin-Justification", "ticket #4471"),
            ],
        )
        .await
        .ok()
        .expect("upgrade");
    assert_eq!(ws.next_frame().await["event"], "connected");
    // A non-admin cannot read the audit log.
    let (status, body) = ts.get("/api/admin/audit", Some(&bob), &[]).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("AUTHZ_FAILED")));
}

#[tokio::test]
async fn the_token_command_refuses_a_secret_the_server_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let short = "fifteen-bytes!!";
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_webwaka-server-stub"))
        .args(["token", "--tenant", "demo", "--user", "alice"])
        .env("JWT_SECRET", short)
        .env("DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "no token printed: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("JWT_SECRET") && stderr.contains("16"),
        "{stderr}"
    );
    // The server refuses the same secret.
    let mut config = crate::common::test_config(dir.path());
    config.jwt_secret = Some(short.to_owned());
    let error = webwaka_server_stub::Server::start(config)
        .await
        .err()
        .expect("refused");
    assert!(error.to_string().contains("JWT_SECRET"), "{error}");
}

/// Failed authentications need no token, so their audit is bounded: a burst, then one
/// a second; the rest are counted, and the next record says how many it stands for
/// (each was a durable write every tenant waited behind, for good).
#[tokio::test]
async fn a_flood_of_failed_authentications_is_audited_in_a_bounded_number_of_records() {
    let ts = TestServer::start(|_| {}).await;
    let count = || ts.sql_i64("SELECT count(*) FROM audit_log WHERE body LIKE '%auth.failed%'");
    let before = count().await;
    let started = std::time::Instant::now();
    for _ in 0..150 {
        let (status, _) = ts.get("/api/events/poll", Some("not-a-token"), &[]).await;
        assert_eq!(status, 401);
    }
    let seconds = i64::try_from(started.elapsed().as_secs()).unwrap();
    let written = count().await - before;
    assert!(
        (50..=50 + seconds + 1).contains(&written),
        "{written} records for 150 failures in {seconds} s"
    );
    // A second on, the next failure is audited and says how many went unrecorded.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (status, _) = ts.get("/api/events/poll", Some("not-a-token"), &[]).await;
    assert_eq!(status, 401);
    let summarised = ts
        .sql_i64("SELECT count(*) FROM audit_log WHERE body LIKE '%skippedBefore%'")
        .await;
    assert!(summarised >= 1, "no record counts the skipped ones");
}
