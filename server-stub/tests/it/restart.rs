//! Every state the server keeps survives a restart in the middle of a conversation.

use serde_json::{Value, json};

use crate::common::{TestServer, eventually, message};

#[tokio::test]
async fn a_restart_in_the_middle_loses_nothing_and_sequences_continue() {
    // A long confirmation delay: the transaction is still pending at the restart.
    let mut ts = TestServer::start(|c| c.transaction_confirm_delay_ms = 300).await;
    let alice = ts.token("t1", "alice", &[]);
    let bob = ts.token("t1", "bob", &[]);
    let svc = ts.token("t1", "svc", &["service"]);
    let mut a = ts.ws(&alice).await;
    let mut b = ts.ws(&bob).await;
    a.call("join_room", json!({"roomId": "team"}), "1").await;
    b.call("join_room", json!({"roomId": "team"}), "2").await;
    let mut last_seq = 0;
    for i in 0..3 {
        let ack = a
            .call(
                "message",
                message(None, Some("team"), &format!("before {i}")),
                &format!("m{i}"),
            )
            .await;
        last_seq = ack["data"]["sequence"].as_u64().unwrap();
    }
    ts.post(
        "/api/reconciliation/reconcile",
        Some(&alice),
        json!({"requestId": "r", "clientId": "c1", "tenantId": "t1", "requestedAt": "2026-01-30T10:00:00Z",
               "operations": [{"operationId": "o1", "clientId": "c1", "tenantId": "t1", "entityType": "doc",
                               "entityId": "d1", "operationType": "CREATE", "payload": {"v": 1},
                               "timestamp": "2026-01-30T10:00:00Z", "vectorClock": {"c1": 1}}]}),
        &[],
    )
    .await;
    let (_, tx) = ts
        .post(
            "/api/transactions",
            Some(&alice),
            json!({"transactionType": "pay", "payload": {}}),
            &[("Idempotency-Key", "k")],
        )
        .await;
    let tx_id = tx["transactionId"].as_str().unwrap().to_owned();
    ts.post(
        "/api/eventbus/groups/g/claim",
        Some(&svc),
        json!({"consumerId": "w", "max": 1, "visibilityTimeoutMs": 60000}),
        &[],
    )
    .await;
    let (_, audit_before) = ts
        .get(
            "/api/admin/audit/verify",
            Some(&ts.token("t1", "root", &["admin"])),
            &[],
        )
        .await;
    let last_event = b.expect("message").await;
    let _ = last_event;
    drop(a);
    drop(b);

    ts.restart().await;

    // Sequences continue.
    let mut a = ts.ws(&alice).await;
    let ack = a
        .call("message", message(None, Some("team"), "after"), "m9")
        .await;
    assert_eq!(ack["event"], "message_ack", "{ack}");
    assert_eq!(ack["data"]["sequence"].as_u64().unwrap(), last_seq + 1);
    // Membership survived: bob gets room messages without joining again.
    let mut b = ts.ws(&bob).await;
    a.call("message", message(None, Some("team"), "after 2"), "m10")
        .await;
    assert_eq!(
        b.expect("message").await["data"]["payload"]["text"],
        "after 2"
    );
    // The log survived: bob's poll has every message, in order.
    let (_, page) = ts.get("/api/events/poll", Some(&bob), &[]).await;
    let texts: Vec<Value> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["eventType"] == "message")
        .map(|e| e["payload"]["payload"]["text"].clone())
        .collect();
    assert_eq!(
        texts,
        vec![
            json!("before 0"),
            json!("before 1"),
            json!("before 2"),
            json!("after"),
            json!("after 2")
        ]
    );
    // Entities survived.
    let (status, snap) = ts
        .get("/api/reconciliation/snapshot/doc/d1", Some(&alice), &[])
        .await;
    assert_eq!((status, &snap["data"]), (200, &json!({"v": 1})));
    // The pending transaction is decided after the restart.
    eventually("the transaction is confirmed after the restart", || {
        let (ts, alice, id) = (&ts, alice.clone(), tx_id.clone());
        async move {
            ts.get(&format!("/api/transactions/{id}"), Some(&alice), &[])
                .await
                .1["status"]
                == "CONFIRMED"
        }
    })
    .await;
    // The consumer group's lease survived: nothing new to claim but the rest.
    let (_, claimed) = ts
        .post(
            "/api/eventbus/groups/g/claim",
            Some(&svc),
            json!({"consumerId": "w", "max": 100, "visibilityTimeoutMs": 60000}),
            &[],
        )
        .await;
    let first_seq = claimed["events"][0]["event"]["sequence"].as_u64().unwrap();
    assert!(
        first_seq > 1,
        "the leased first event is not handed out again"
    );
    // The audit chain continued and still verifies.
    let (_, audit_after) = ts
        .get(
            "/api/admin/audit/verify",
            Some(&ts.token("t1", "root", &["admin"])),
            &[],
        )
        .await;
    assert_eq!(audit_after["valid"], true);
    assert!(audit_after["entries"].as_u64() > audit_before["entries"].as_u64());
}
