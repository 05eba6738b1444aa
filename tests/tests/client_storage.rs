//! A full disk is not a network failure (issue 13, part 3). The client's store is
//! capped with `StoreConfig::max_file_bytes` (SQLite's `max_page_count`: a write that
//! would grow the file fails with `SQLITE_FULL`, as on a full disk; a test may not mount
//! a small filesystem in CI), and filled to the cap from a second connection to the same
//! file. Sends are refused with `StorageFull`, inbound events that cannot be recorded do
//! not move the cursor, reconcile answers that cannot be applied are pulled again, the
//! connection stays up; once space is freed, nothing accepted is lost or duplicated.
//! Real server on loopback, real SQLite files.

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use webwaka_e2e::harness::{
    TestServer, client_config, direct, messages, open_client, texts, wait_state, wait_until,
};
use webwaka_realtime::client::{Client, ClientError, Next, Update};
use webwaka_realtime::machine::ConnectionState;
use webwaka_realtime::store::{ItemKind, ItemState, NewItem, OutboxClass, Store, StoreConfig};

const CAP_BYTES: u64 = 1024 * 1024;

/// Grows the database at `path` past `CAP_BYTES` from a connection of its own (no cap):
/// the capped client can then allocate no new page.
fn fill(path: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute_batch("CREATE TABLE filler (b BLOB NOT NULL)")
        .unwrap();
    for _ in 0..1_000 {
        let (pages, size): (i64, i64) = conn
            .query_row(
                "SELECT page_count, page_size FROM pragma_page_count, pragma_page_size",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        if u64::try_from(pages * size).unwrap() > CAP_BYTES + 64 * 1024 {
            return conn;
        }
        conn.execute("INSERT INTO filler (b) VALUES (zeroblob(32768))", [])
            .unwrap();
    }
    panic!("could not fill the store");
}

/// Every message text `sub` delivers until `within` passes with no new one.
async fn drain_texts(
    sub: &mut webwaka_realtime::client::Subscription,
    within: Duration,
) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(next) = tokio::time::timeout(within, sub.next()).await {
        match next {
            Next::Update(u) => {
                if let Some(m) = messages(*u) {
                    out.extend(texts(&[m]));
                }
            }
            Next::Missed(n) => panic!("the test subscriber missed {n} updates"),
            Next::Closed => break,
        }
    }
    out
}

fn counts(texts: &[String]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for t in texts {
        *out.entry(t.clone()).or_insert(0) += 1;
    }
    out
}

async fn storage_failures(client: &Client) -> u64 {
    client.metrics().await.unwrap().storage_failures
}

#[tokio::test]
async fn a_full_store_refuses_sends_keeps_the_cursor_and_recovers_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let alice_db = dir.path().join("alice.db");
    let mut config = client_config(&server.url(), &alice_db);
    config.store.max_file_bytes = Some(CAP_BYTES);
    let alice = open_client(config, server.token("t1", "alice")).await;
    let bob = open_client(
        client_config(&server.url(), &dir.path().join("bob.db")),
        server.token("t1", "bob"),
    )
    .await;
    for c in [&alice, &bob] {
        assert!(wait_state(c, ConnectionState::Realtime, Duration::from_secs(10)).await);
    }
    let mut alice_sub = alice.subscribe();
    let mut bob_sub = bob.subscribe();

    let filler = fill(&alice_db);

    // Sending: refused with StorageFull once no page is left; what was accepted stays.
    let mut accepted = Vec::new();
    let mut refused = None;
    for n in 0..5_000 {
        let text = format!("a{n}");
        match alice.send_message(direct("bob", &text)).await {
            Ok(_) => accepted.push(text),
            Err(e) => {
                refused = Some((text, e));
                break;
            }
        }
    }
    let (refused_text, error) = refused.expect("the full store refused a send");
    assert!(
        matches!(error, ClientError::StorageFull(_)),
        "a typed storage error, not {error:?}"
    );
    assert!(error.is_storage());

    // Receiving: bob's messages cannot all be recorded; the connection stays up.
    for n in 0..300 {
        bob.send_message(direct("alice", &format!("b{n}")))
            .await
            .unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(20), || async {
            storage_failures(&alice).await > 0
        })
        .await,
        "some inbound event met the full store"
    );
    // Reconciling: an entity made by bob cannot be stored by alice yet.
    bob.create_entity("note", "n1", json!({"title": "from bob"}))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        alice.connection_state(),
        ConnectionState::Realtime,
        "a full disk is not a network failure"
    );

    // Space comes back.
    filler.execute_batch("DROP TABLE filler").unwrap();
    drop(filler);
    alice
        .send_message(direct("bob", "after"))
        .await
        .expect("sends are taken again");
    accepted.push("after".into());

    assert!(
        wait_until(Duration::from_secs(30), || async {
            alice.entity("note", "n1").await.unwrap().is_some()
        })
        .await,
        "the entity is pulled again once it can be stored"
    );

    // Nothing accepted is lost or duplicated, either way.
    let to_alice = counts(&drain_texts(&mut alice_sub, Duration::from_secs(8)).await);
    for n in 0..300 {
        assert_eq!(
            to_alice.get(&format!("b{n}")),
            Some(&1),
            "bob's b{n} reached alice exactly once"
        );
    }
    let to_bob = counts(&drain_texts(&mut bob_sub, Duration::from_secs(5)).await);
    for text in &accepted {
        assert_eq!(
            to_bob.get(text),
            Some(&1),
            "alice's {text} reached bob once"
        );
    }
    assert_eq!(
        to_bob.get(&refused_text),
        None,
        "the refused send was never sent"
    );
    for c in [&alice, &bob] {
        c.shutdown().await;
    }
}

#[tokio::test]
async fn an_operation_whose_body_cannot_be_read_goes_dead_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let db = dir.path().join("alice.db");
    // An operation left in the outbox that no longer decodes (an older SDK, a bug).
    let bad_id = {
        let mut store = Store::open(&db, StoreConfig::default()).unwrap();
        store
            .enqueue(
                NewItem::new(
                    OutboxClass::C,
                    ItemKind::Operation,
                    "entity:note/n1",
                    json!({"not": "an operation"}),
                ),
                chrono::Utc::now(),
            )
            .unwrap()
            .id
    };
    let alice = open_client(
        client_config(&server.url(), &db),
        server.token("t1", "alice"),
    )
    .await;
    let mut sub = alice.subscribe();
    let dead = alice
        .wait_settled(&bad_id, &[ItemState::Dead], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(dead.state, ItemState::Dead);
    let reason = dead.last_error.clone().unwrap_or_default();
    assert!(reason.contains("unreadable operation body"), "{reason}");
    // Dead once, not tried again and again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let item = alice.item(&bad_id).await.unwrap().unwrap();
    assert_eq!(
        (item.state, item.attempts),
        (ItemState::Dead, dead.attempts)
    );
    // Other edits go on.
    alice
        .create_entity("note", "n2", json!({"title": "fine"}))
        .await
        .unwrap();
    let mut settled = false;
    for _ in 0..200 {
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Next::Update(u)) => {
                if let Update::Outbox(o) = *u
                    && o.id != bad_id
                    && o.state == ItemState::Accepted
                {
                    settled = true;
                    break;
                }
            }
            _ => break,
        }
    }
    assert!(settled, "a good operation after it is reconciled");
    alice.shutdown().await;
}

/// A payload nested deeper than JSON readers take back would be stored and then stop
/// every read of the outbox: it is refused at the call, naming the field, and the
/// outbox goes on.
#[tokio::test]
async fn a_payload_nested_too_deep_is_refused_and_the_outbox_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let alice = open_client(
        client_config(&server.url(), &dir.path().join("alice.db")),
        server.token("t1", "alice"),
    )
    .await;
    let mut deep = json!("bottom");
    for _ in 0..130 {
        deep = json!({ "in": deep });
    }
    let mut message = direct("bob", "never");
    message.payload = deep;
    let err = alice.send_message(message).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::InvalidInput { field, message }
            if field == "payload" && message.contains("130 levels")),
        "{err:?}"
    );
    assert!(
        alice.outbox(None).await.unwrap().is_empty(),
        "nothing stored"
    );
    let sent = alice.send_message(direct("bob", "fine")).await.unwrap();
    let accepted = alice
        .wait_settled(&sent.id, &[ItemState::Accepted], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(accepted.state, ItemState::Accepted);
    alice.shutdown().await;
}
