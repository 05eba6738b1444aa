//! PROTOCOL.md §4, §6: consumer groups, leases, redelivery, the DLQ and replay.

use serde_json::{Value, json};

use crate::common::{TestServer, eventually};

async fn publish(ts: &TestServer, token: &str, event_type: &str, n: u32) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let (status, body) = ts
            .post(
                "/api/events",
                Some(token),
                json!({"eventType": event_type, "payload": {"i": i}}),
                &[],
            )
            .await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["eventId"].as_str().unwrap().to_owned());
    }
    ids
}

async fn claim(ts: &TestServer, token: &str, group: &str, body: Value) -> Vec<Value> {
    let (status, answer) = ts
        .post(
            &format!("/api/eventbus/groups/{group}/claim"),
            Some(token),
            body,
            &[],
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    answer["events"].as_array().cloned().unwrap()
}

#[tokio::test]
async fn claim_ack_and_filters() {
    let ts = TestServer::start(|_| {}).await;
    let svc = ts.token("t1", "billing", &["service"]);
    let user = ts.token("t1", "alice", &[]);
    let ids = publish(&ts, &svc, "order.placed", 3).await;
    publish(&ts, &svc, "order.cancelled", 1).await;
    // Roles.
    let (status, error) = ts
        .post(
            "/api/eventbus/groups/g/claim",
            Some(&user),
            json!({"consumerId": "c", "max": 1, "visibilityTimeoutMs": 1000}),
            &[],
        )
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (403, Some("AUTHZ_FAILED"))
    );
    // Bad claims.
    for (body, path) in [
        (
            json!({"consumerId": "", "max": 1, "visibilityTimeoutMs": 1000}),
            "consumerId",
        ),
        (
            json!({"consumerId": "c", "max": 0, "visibilityTimeoutMs": 1000}),
            "max",
        ),
        (
            json!({"consumerId": "c", "max": 1, "visibilityTimeoutMs": 0}),
            "visibilityTimeoutMs",
        ),
        (json!({"consumerId": "c", "max": 1}), "visibilityTimeoutMs"),
    ] {
        let (status, error) = ts
            .post(
                "/api/eventbus/groups/g/claim",
                Some(&svc),
                body.clone(),
                &[],
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(error["details"]["path"], path, "{body}: {error}");
    }
    // A filtered claim takes only its types; a new group starts at the oldest event.
    let got = claim(&ts, &svc, "billing", json!({"consumerId": "w1", "max": 10, "visibilityTimeoutMs": 60000, "eventTypes": ["order.placed"]})).await;
    let got_ids: Vec<&str> = got
        .iter()
        .map(|c| c["event"]["eventId"].as_str().unwrap())
        .collect();
    assert_eq!(got_ids, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        got.iter()
            .all(|c| c["deliveryCount"] == 1 && c["leaseExpiresAt"].is_string())
    );
    // Leased events are not handed out again while the lease runs.
    let rest = claim(
        &ts,
        &svc,
        "billing",
        json!({"consumerId": "w2", "max": 10, "visibilityTimeoutMs": 60000}),
    )
    .await;
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["event"]["eventType"], "order.cancelled");
    // Ack counts only what was leased to the group.
    let (status, acked) = ts
        .post(
            "/api/eventbus/groups/billing/ack",
            Some(&svc),
            json!({"eventIds": [ids[0], ids[1], "unknown"]}),
            &[],
        )
        .await;
    assert_eq!((status, acked["acked"].as_u64()), (200, Some(2)));
    // Another group sees everything from the start.
    let all = claim(
        &ts,
        &svc,
        "audit",
        json!({"consumerId": "a", "max": 100, "visibilityTimeoutMs": 60000}),
    )
    .await;
    assert_eq!(all.len(), 4);
}

#[tokio::test]
async fn a_consumer_that_never_acks_gets_redeliveries_then_the_dlq_and_replay() {
    let ts = TestServer::start(|c| c.event_bus_max_retries = 2).await;
    let svc = ts.token("t1", "billing", &["service"]);
    let ids = publish(&ts, &svc, "order.placed", 1).await;
    let lease = json!({"consumerId": "w1", "max": 5, "visibilityTimeoutMs": 50});
    // Delivered 1 + 2 times, never acked.
    for expected in 1..=3u64 {
        let mut got = Vec::new();
        for _ in 0..40 {
            got = claim(&ts, &svc, "billing", lease.clone()).await;
            if !got.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        }
        assert_eq!(got.len(), 1, "delivery {expected}");
        assert_eq!(got[0]["deliveryCount"], expected);
        assert_eq!(got[0]["event"]["eventId"], ids[0].as_str());
    }
    // Then it moves to the DLQ (the maintenance sweep or the next claim finds it).
    let mut entries = Vec::new();
    eventually("the event reaches the DLQ", || {
        let ts = &ts;
        let svc = svc.clone();
        async move {
            let (_, dlq) = ts.get("/api/eventbus/dlq", Some(&svc), &[]).await;
            !dlq["entries"].as_array().unwrap().is_empty()
        }
    })
    .await;
    let (status, dlq) = ts.get("/api/eventbus/dlq", Some(&svc), &[]).await;
    assert_eq!(status, 200);
    entries.extend(dlq["entries"].as_array().unwrap().iter().cloned());
    assert_eq!(entries.len(), 1);
    let entry = &entries[0];
    assert_eq!(entry["originalEvent"]["eventId"], ids[0].as_str());
    assert_eq!(entry["retryCount"], 3);
    assert_eq!(entry["failureReason"], "lease expired without ack");
    assert_eq!(
        entry["consumerInfo"],
        json!({"consumerId": "w1", "consumerGroup": "billing"})
    );
    assert!(entry["firstFailedAt"].is_string() && entry["lastFailedAt"].is_string());
    // Not claimable any more.
    assert!(claim(&ts, &svc, "billing", lease.clone()).await.is_empty());
    // The DLQ size is a metric.
    let text = ts
        .http
        .get(ts.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("webwaka_dlq_size 1"), "{text}");
    assert!(
        text.contains(r#"webwaka_consumer_lag{tenant="t1",group="billing"} 0"#),
        "{text}"
    );
    // Replay: the same event, a fresh budget, the entry gone.
    let dlq_id = entry["dlqId"].as_str().unwrap();
    let (status, answer) = ts
        .post(
            &format!("/api/eventbus/dlq/{dlq_id}/replay"),
            Some(&svc),
            Value::Null,
            &[],
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let got = claim(
        &ts,
        &svc,
        "billing",
        json!({"consumerId": "w2", "max": 5, "visibilityTimeoutMs": 60000}),
    )
    .await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["event"]["eventId"], ids[0].as_str());
    assert_eq!(got[0]["deliveryCount"], 1);
    let (_, dlq) = ts.get("/api/eventbus/dlq", Some(&svc), &[]).await;
    assert_eq!(dlq["entries"], json!([]));
    let (status, _) = ts
        .post(
            &format!("/api/eventbus/dlq/{dlq_id}/replay"),
            Some(&svc),
            Value::Null,
            &[],
        )
        .await;
    assert_eq!(status, 404);
    // Another tenant sees none of it.
    let other = ts.token("t2", "billing", &["service"]);
    assert!(
        claim(
            &ts,
            &other,
            "billing",
            json!({"consumerId": "w", "max": 5, "visibilityTimeoutMs": 1000})
        )
        .await
        .is_empty()
    );
}
