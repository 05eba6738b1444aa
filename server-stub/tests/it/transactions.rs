//! PROTOCOL.md §4, §6: Class D transactions.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};
use webwaka_server_stub::{Decision, Options, PendingTransaction, TransactionProcessor};

use crate::common::{TestServer, audit_entries, eventually};

async fn status_of(ts: &TestServer, token: &str, id: &str) -> (u16, Value) {
    ts.get(&format!("/api/transactions/{id}"), Some(token), &[])
        .await
}

#[tokio::test]
async fn submit_is_idempotent_and_confirmed_asynchronously() {
    let ts = TestServer::start(|c| c.transaction_reject_types = "payment.refund".into()).await;
    let alice = ts.token("t1", "alice", &[]);
    let mut ws = ts.ws(&alice).await;
    let body = json!({"transactionType": "payment.transfer", "payload": {"amount": 250000, "currency": "NGN"}});
    let path = "/api/transactions";
    let (status, error) = ts.post(path, Some(&alice), body.clone(), &[]).await;
    assert_eq!(
        (status, error["details"]["path"].as_str()),
        (400, Some("Idempotency-Key"))
    );
    let key = [("Idempotency-Key", "pay-0007")];
    let (status, accepted) = ts.post(path, Some(&alice), body.clone(), &key).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["status"], "PENDING");
    assert!(accepted["auditId"].as_str().unwrap().starts_with("aud-"));
    // Same key, same body: the same answer (key order does not matter).
    let reordered = json!({"payload": {"currency": "NGN", "amount": 250000}, "transactionType": "payment.transfer"});
    let (status, again) = ts.post(path, Some(&alice), reordered, &key).await;
    assert_eq!((status, &again), (202, &accepted));
    // Same key, other body.
    let (status, error) = ts
        .post(
            path,
            Some(&alice),
            json!({"transactionType": "payment.transfer", "payload": {"amount": 1}}),
            &key,
        )
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (409, Some("IDEMPOTENCY_CONFLICT"))
    );
    // Another user's same key is another transaction.
    let bob = ts.token("t1", "bob", &[]);
    let (status, bobs) = ts.post(path, Some(&bob), body.clone(), &key).await;
    assert_eq!(status, 202);
    assert_ne!(bobs["transactionId"], accepted["transactionId"]);
    // Confirmed after the delay; the event arrives over the WebSocket.
    let id = accepted["transactionId"].as_str().unwrap().to_owned();
    let event = ws.expect("event").await;
    assert_eq!(event["data"]["eventType"], "transaction.confirmed");
    assert_eq!(event["data"]["payload"]["transactionId"], id.as_str());
    assert_eq!(event["data"]["payload"]["status"], "CONFIRMED");
    let (status, st) = status_of(&ts, &alice, &id).await;
    assert_eq!(status, 200);
    assert_eq!(st["status"], "CONFIRMED");
    assert_ne!(st["auditId"], accepted["auditId"]);
    // And in the poll.
    let (_, page) = ts.get("/api/events/poll", Some(&alice), &[]).await;
    assert!(
        page["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["eventType"] == "transaction.confirmed")
    );
    // Visibility: bob cannot read alice's, an admin can, another tenant cannot.
    assert_eq!(status_of(&ts, &bob, &id).await.0, 404);
    let admin = ts.token("t1", "root", &["admin"]);
    assert_eq!(status_of(&ts, &admin, &id).await.0, 200);
    let other = ts.token("t2", "alice", &["admin"]);
    assert_eq!(status_of(&ts, &other, &id).await.0, 404);
    // A configured rejection.
    let (status, refund) = ts
        .post(
            path,
            Some(&alice),
            json!({"transactionType": "payment.refund", "payload": {}}),
            &[("Idempotency-Key", "r-1")],
        )
        .await;
    assert_eq!(status, 202);
    let rid = refund["transactionId"].as_str().unwrap().to_owned();
    eventually("the refund is rejected", || {
        let (ts, alice, rid) = (&ts, alice.clone(), rid.clone());
        async move { status_of(ts, &alice, &rid).await.1["status"] == "REJECTED" }
    })
    .await;
    let (_, st) = status_of(&ts, &alice, &rid).await;
    assert!(st["reason"].as_str().unwrap().contains("payment.refund"));
    // Every step is audited.
    let entries = audit_entries(&ts, "t1").await;
    let actions: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    for action in [
        "transaction.submit",
        "transaction.confirm",
        "transaction.reject",
        "transaction.idempotency_conflict",
    ] {
        assert!(actions.contains(&action), "{action} missing: {actions:?}");
    }
    // Bad inputs.
    for (body, path_expected) in [
        (json!({"payload": {}}), "transactionType"),
        (
            json!({"transactionType": " ", "payload": {}}),
            "transactionType",
        ),
        (json!({"transactionType": "x"}), "payload"),
    ] {
        let (status, error) = ts
            .post(
                path,
                Some(&alice),
                body.clone(),
                &[("Idempotency-Key", "bad")],
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(error["details"]["path"], path_expected, "{error}");
    }
    let (status, error) = ts
        .post(
            path,
            Some(&alice),
            json!({"transactionType": "x", "payload": {}, "tenantId": "t2"}),
            &[("Idempotency-Key", "k")],
        )
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (403, Some("TENANT_VIOLATION"))
    );
}

/// A processor that rejects everything and counts its calls.
#[derive(Debug, Default)]
struct Counting(AtomicUsize);

impl TransactionProcessor for Counting {
    fn process(
        &self,
        t: PendingTransaction,
    ) -> Pin<Box<dyn std::future::Future<Output = Decision> + Send>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { Decision::Reject(format!("no funds for {}", t.transaction_type)) })
    }
}

#[tokio::test]
async fn the_processor_is_pluggable() {
    let processor = Arc::new(Counting::default());
    let options = Options {
        processor: Some(processor.clone()),
    };
    let ts = TestServer::start_with(|_| {}, options).await;
    let alice = ts.token("t1", "alice", &[]);
    let (_, accepted) = ts
        .post(
            "/api/transactions",
            Some(&alice),
            json!({"transactionType": "pay", "payload": {}}),
            &[("Idempotency-Key", "k1")],
        )
        .await;
    let id = accepted["transactionId"].as_str().unwrap().to_owned();
    eventually("rejected by the custom processor", || {
        let (ts, alice, id) = (&ts, alice.clone(), id.clone());
        async move { status_of(ts, &alice, &id).await.1["reason"] == "no funds for pay" }
    })
    .await;
    assert_eq!(processor.0.load(Ordering::SeqCst), 1);
}

/// A client that disconnects while its submission is being stored (an app killed, a
/// network cut) must not leave the transaction pending forever: what was committed is
/// decided, whether or not the handler lived to answer.
#[tokio::test]
async fn a_submission_whose_client_vanished_is_still_decided() {
    use tokio::io::AsyncWriteExt;

    let ts = TestServer::start(|c| c.transaction_confirm_delay_ms = 5).await;
    let alice = ts.token("t1", "alice", &[]);
    let addr = ts.running().local_addr();
    let body = json!({"transactionType": "pay", "payload": {"amount": 1}}).to_string();
    const CUTS: usize = 40;
    for i in 0..CUTS {
        let request = format!(
            "POST /api/transactions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {alice}\r\n\
             content-type: application/json\r\nidempotency-key: cut-{i}\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        socket.write_all(request.as_bytes()).await.unwrap();
        // Gone before the answer: the server sees the connection close mid-request.
        tokio::time::sleep(std::time::Duration::from_micros(50 * (i as u64 % 8))).await;
        drop(socket);
    }
    // The app comes back and submits each again with its key: the same transaction
    // (or a new one if the first never reached storage), decided either way.
    for i in 0..CUTS {
        let key = format!("cut-{i}");
        let (status, accepted) = ts
            .post(
                "/api/transactions",
                Some(&alice),
                serde_json::from_str(&body).unwrap(),
                &[("Idempotency-Key", key.as_str())],
            )
            .await;
        assert_eq!(status, 202, "{accepted}");
        let id = accepted["transactionId"].as_str().unwrap().to_owned();
        eventually(&format!("transaction {key} decided"), || {
            let (ts, alice, id) = (&ts, alice.clone(), id.clone());
            async move { status_of(ts, &alice, &id).await.1["status"] == "CONFIRMED" }
        })
        .await;
    }
}
