//! Encryption at rest, end to end: a client with a key keeps no plaintext in its store's
//! file, WAL or shared-memory file while it works against the real server; a wrong key
//! or none is a typed error that leaves the file alone; the key can be rotated; a
//! plaintext store is encrypted at its first open with a key, keeping everything.

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]
#![cfg(feature = "encryption")]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use webwaka_e2e::harness::{
    TestServer, client_config, collect, direct, open_client, wait_state, wait_until,
};
use webwaka_realtime::client::{Client, ClientError, StaticToken, Update};
use webwaka_realtime::machine::ConnectionState;
use webwaka_realtime::store::{ItemState, StoreKey};

const WITHIN: Duration = Duration::from_secs(15);

fn key(byte: u8) -> StoreKey {
    StoreKey::from_bytes(&[byte; 32]).unwrap()
}

/// The store's three files (those that exist) and whether `marker` is in any of them.
fn files_holding(db: &Path, marker: &str) -> Vec<PathBuf> {
    ["", "-wal", "-shm"]
        .iter()
        .map(|suffix| PathBuf::from(format!("{}{suffix}", db.display())))
        .filter(|path| {
            std::fs::read(path)
                .is_ok_and(|bytes| bytes.windows(marker.len()).any(|w| w == marker.as_bytes()))
        })
        .collect()
}

/// Opens a client on `db` against `url` (an unused port: offline) with `key`.
async fn open_with(url: &str, db: &Path, key: Option<StoreKey>) -> Result<Client, ClientError> {
    let mut config = client_config(url, db);
    config.store.key = key;
    Client::open(config, Arc::new(StaticToken("unused".into()))).await
}

/// Sends a message, submits a transaction and edits an entity, each carrying `marker`,
/// from alice to bob, and waits until all are done on both sides, both clients still
/// open (so the WAL holds the latest pages).
async fn work_with_marker(alice: &Client, bob: &Client, marker: &str) {
    assert!(wait_state(alice, ConnectionState::Realtime, WITHIN).await);
    assert!(wait_state(bob, ConnectionState::Realtime, WITHIN).await);
    let mut bob_updates = bob.subscribe();
    let message = alice.send_message(direct("bob", marker)).await.unwrap();
    let transaction = alice
        .submit_transaction("payment", json!({ "note": marker }), None)
        .await
        .unwrap();
    alice
        .create_entity("note", "n1", json!({ "text": marker }))
        .await
        .unwrap();
    let got = collect(&mut bob_updates, 1, WITHIN, |u| match u {
        Update::Message(m) => Some(m.payload["text"].as_str().unwrap_or("").to_owned()),
        _ => None,
    })
    .await;
    assert_eq!(got, vec![marker.to_owned()]);
    let done = wait_until(WITHIN, || async {
        let m = alice.item(&message.id).await.unwrap().unwrap();
        let t = alice.item(&transaction.id).await.unwrap().unwrap();
        m.state == ItemState::Accepted
            && t.state == ItemState::Confirmed
            && alice
                .outbox(Some(ItemState::Persisted))
                .await
                .unwrap()
                .is_empty()
    })
    .await;
    assert!(done, "alice's work was accepted and confirmed");
    // Bob pulls the entity too (its value then sits in his entity cache).
    bob.sync_entities().unwrap();
    let pulled = wait_until(WITHIN, || async {
        bob.entity("note", "n1").await.unwrap().is_some()
    })
    .await;
    assert!(pulled, "bob has the entity");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_store_holds_no_plaintext_in_its_file_wal_or_shm() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    // Each round in a tenant of its own: a new installation of bob would otherwise get
    // the first round's message too.
    let open = |tenant: &str, name: &str, user: &str, key: Option<StoreKey>| {
        let mut config = client_config(&server.url(), &dir.path().join(name));
        config.store.key = key;
        open_client(config, server.token(tenant, user))
    };

    // The check can fail: without a key the same work leaves the marker in the files.
    let plain_marker = "PLAINTEXT-MARKER-4b1d0c7e";
    let alice = open("t1", "plain-alice.db", "alice", None).await;
    let bob = open("t1", "plain-bob.db", "bob", None).await;
    work_with_marker(&alice, &bob, plain_marker).await;
    for db in ["plain-alice.db", "plain-bob.db"] {
        assert!(
            !files_holding(&dir.path().join(db), plain_marker).is_empty(),
            "a plaintext store shows the marker ({db})"
        );
    }
    alice.shutdown().await;
    bob.shutdown().await;

    let marker = "SECRET-MARKER-93c2aa61";
    let alice = open("t2", "alice.db", "alice", Some(key(1))).await;
    let bob = open("t2", "bob.db", "bob", Some(key(2))).await;
    work_with_marker(&alice, &bob, marker).await;
    for db in ["alice.db", "bob.db"] {
        let path = dir.path().join(db);
        let wal = std::fs::metadata(format!("{}-wal", path.display())).unwrap();
        assert!(
            wal.len() > 0,
            "the WAL holds pages while the client is open"
        );
        assert_eq!(
            files_holding(&path, marker),
            Vec::<PathBuf>::new(),
            "no plaintext while open ({db})"
        );
    }
    alice.shutdown().await;
    bob.shutdown().await;
    for db in ["alice.db", "bob.db"] {
        let path = dir.path().join(db);
        assert_eq!(
            files_holding(&path, marker),
            Vec::<PathBuf>::new(),
            "no plaintext after shutdown ({db})"
        );
        assert!(
            !std::fs::read(&path)
                .unwrap()
                .starts_with(b"SQLite format 3"),
            "not even the header"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_or_none_is_a_typed_error_and_the_file_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sdk.db");
    let offline = "http://127.0.0.1:9";
    let client = open_with(offline, &db, Some(key(7))).await.unwrap();
    let item = client
        .send_message(direct("bob", "kept through wrong keys"))
        .await
        .unwrap();
    let client_id = client.client_id().to_owned();
    client.shutdown().await;
    let before = std::fs::read(&db).unwrap();

    for (attempt, expected_text) in [
        (Some(key(8)), "the key given does not open it"),
        (None, "no key was given"),
    ] {
        let err = open_with(offline, &db, attempt).await.unwrap_err();
        let ClientError::WrongKey(text) = &err else {
            panic!("expected WrongKey, got {err:?}")
        };
        assert!(text.contains(expected_text), "{text}");
        assert_eq!(std::fs::read(&db).unwrap(), before, "the file is untouched");
    }
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("corrupt"))
        .collect();
    assert!(aside.is_empty(), "nothing was moved aside: {aside:?}");

    // The right key opens it with everything in it.
    let client = open_with(offline, &db, Some(key(7))).await.unwrap();
    assert_eq!(client.client_id(), client_id);
    assert!(client.item(&item.id).await.unwrap().is_some());
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_changes_the_key_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sdk.db");
    let offline = "http://127.0.0.1:9";
    let client = open_with(offline, &db, Some(key(1))).await.unwrap();
    let item = client.send_message(direct("bob", "before")).await.unwrap();
    client.rekey(key(2)).await.unwrap();
    // Still usable after the change, and what is written now is under the new key.
    let later = client.send_message(direct("bob", "after")).await.unwrap();
    client.shutdown().await;

    let err = open_with(offline, &db, Some(key(1))).await.unwrap_err();
    assert!(matches!(err, ClientError::WrongKey(_)), "{err:?}");
    let client = open_with(offline, &db, Some(key(2))).await.unwrap();
    assert!(client.item(&item.id).await.unwrap().is_some());
    assert!(client.item(&later.id).await.unwrap().is_some());
    client.shutdown().await;

    // A plaintext store cannot be rekeyed: it is encrypted by opening it with a key.
    let plain = open_with(offline, &dir.path().join("plain.db"), None)
        .await
        .unwrap();
    let err = plain.rekey(key(3)).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::InvalidInput { field, .. } if field == "key"),
        "{err:?}"
    );
    plain.shutdown().await;
}

/// A rotation that cannot finish (another connection holds the store's write lock past
/// the busy timeout) fails and changes nothing: the store stays under the old key,
/// usable, with everything in it. SQLCipher's own `PRAGMA rekey` reported success then,
/// left the file under the old key, and wrote later pages under the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rekey_that_cannot_finish_fails_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sdk.db");
    let mut config = client_config("http://127.0.0.1:9", &db);
    config.store.key = Some(key(1));
    config.store.busy_timeout = Duration::from_millis(300);
    let client = Client::open(config, Arc::new(StaticToken("unused".into())))
        .await
        .unwrap();
    let item = client.send_message(direct("bob", "before")).await.unwrap();

    let other = rusqlite::Connection::open(&db).unwrap();
    other
        .execute_batch(&format!(
            "PRAGMA key = \"x'{}'\"; PRAGMA cipher_page_size = 2048; BEGIN IMMEDIATE;",
            "01".repeat(32)
        ))
        .unwrap();
    let err = client.rekey(key(2)).await.unwrap_err();
    assert!(err.is_storage(), "{err:?}");
    other.execute_batch("ROLLBACK").unwrap();
    drop(other);

    // Still usable, under the old key.
    let later = client.send_message(direct("bob", "after")).await.unwrap();
    client.shutdown().await;
    assert!(
        !dir.path().join("sdk.db-rekeying").exists(),
        "no copy left behind"
    );
    let err = open_with("http://127.0.0.1:9", &db, Some(key(2)))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::WrongKey(_)), "{err:?}");
    let client = open_with("http://127.0.0.1:9", &db, Some(key(1)))
        .await
        .unwrap();
    assert!(client.item(&item.id).await.unwrap().is_some());
    assert!(client.item(&later.id).await.unwrap().is_some());
    // Once nothing holds it, the rotation goes through.
    client.rekey(key(2)).await.unwrap();
    client.shutdown().await;
    let client = open_with("http://127.0.0.1:9", &db, Some(key(2)))
        .await
        .unwrap();
    assert!(client.item(&later.id).await.unwrap().is_some());
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_store_is_encrypted_at_its_first_open_with_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sdk.db");
    let offline = "http://127.0.0.1:9";
    let marker = "PLAINTEXT-BEFORE-THE-KEY-7f00";
    let client = open_with(offline, &db, None).await.unwrap();
    let mut ids = Vec::new();
    for n in 0..20 {
        let item = client
            .send_message(direct("bob", &format!("{marker} {n}")))
            .await
            .unwrap();
        ids.push(item.id);
    }
    let client_id = client.client_id().to_owned();
    client.shutdown().await;
    assert!(!files_holding(&db, marker).is_empty(), "plaintext before");

    let client = open_with(offline, &db, Some(key(5))).await.unwrap();
    assert_eq!(client.client_id(), client_id, "the same installation");
    let outbox = client.outbox(None).await.unwrap();
    assert_eq!(
        outbox.iter().map(|i| i.id.clone()).collect::<Vec<_>>(),
        ids,
        "every item, in order"
    );
    assert_eq!(files_holding(&db, marker), Vec::<PathBuf>::new());
    assert!(
        !Path::new(&format!("{}-encrypting", db.display())).exists(),
        "no copy left behind"
    );
    client.shutdown().await;
    // From now on it needs the key.
    let err = open_with(offline, &db, None).await.unwrap_err();
    assert!(matches!(err, ClientError::WrongKey(_)), "{err:?}");
}
