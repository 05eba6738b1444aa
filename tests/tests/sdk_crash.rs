//! Crash tests with real processes: the app (`sdk_crash_child`) is killed with SIGKILL
//! at random moments while it sends messages, reconciles counter edits and submits
//! Class D transactions, and restarted on the same store, many times. Then it drains,
//! and the promises must hold:
//!
//! - every message whose id the app printed (the SDK call had returned) reached the
//!   recipient exactly once, and all of the app's messages arrived in order, none twice;
//! - the counter on the server equals the sum of the deltas of every operation in the
//!   app's store (each applied exactly once), and every printed operation is there;
//! - every printed transaction reached the server once (accepted with its id, usually
//!   already confirmed);
//! - the store passes `PRAGMA integrity_check`.
//!
//! Bounded for CI (8 kills by default); `WEBWAKA_CRASH_KILLS` for more; the seed is
//! printed and `WEBWAKA_CRASH_SEED` replays it.

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use webwaka_e2e::harness::{
    ChildGuard, TestServer, client_config, env_u64, lines_of, open_client, wait_state,
};
use webwaka_realtime::client::{Next, Update};
use webwaka_realtime::machine::ConnectionState;
use webwaka_realtime::protocol::StateSnapshot;
use webwaka_realtime::store::{ItemKind, ItemState, Store, StoreConfig};

fn child(server: &str, store: &std::path::Path, token: &str, seed: u64, mode: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sdk_crash_child"))
        .args([
            server,
            store.to_str().unwrap(),
            token,
            &seed.to_string(),
            mode,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_app_keeps_every_promise_after_restart() {
    let seed = env_u64("WEBWAKA_CRASH_SEED").unwrap_or_else(rand::random);
    let kills = env_u64("WEBWAKA_CRASH_KILLS").unwrap_or(8);
    eprintln!("sdk crash test: seed {seed}, {kills} kills (WEBWAKA_CRASH_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(&dir.path().join("server"), |c| {
        c.reconciliation_counter_types = "counter".into();
        c.transaction_confirm_delay_ms = 20;
    })
    .await;
    let alice_token = server.token("t1", "alice");
    let store = dir.path().join("alice.db");

    // Bob records what arrives from alice.
    let bob = open_client(
        client_config(&server.url(), &dir.path().join("bob.db")),
        server.token("t1", "bob"),
    )
    .await;
    assert!(wait_state(&bob, ConnectionState::Realtime, Duration::from_secs(15)).await);
    let received: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
    let record = received.clone();
    let mut sub = bob.subscribe();
    tokio::spawn(async move {
        loop {
            match sub.next().await {
                Next::Update(u) => {
                    if let Update::Message(m) = *u
                        && m.sender_id == "alice"
                    {
                        record
                            .lock()
                            .unwrap()
                            .push(m.payload["n"].as_u64().unwrap());
                    }
                }
                Next::Missed(n) => panic!("missed {n} updates"),
                Next::Closed => return,
            }
        }
    });
    // The counter exists before the app edits it.
    bob.create_entity("counter", "k", json!({ "v": 0 }))
        .await
        .unwrap();

    // Kill the app at random moments, many times, on the same store.
    let mut printed_msgs: Vec<(String, u64)> = Vec::new();
    let mut printed_ops: Vec<(String, i64)> = Vec::new();
    let mut printed_txs: Vec<String> = Vec::new();
    for round in 0..kills {
        let mut guard = ChildGuard(Some(child(
            &server.url(),
            &store,
            &alice_token,
            seed.wrapping_add(round),
            "work",
        )));
        let stdout = guard.0.as_mut().unwrap().stdout.take().unwrap();
        let mut lines = lines_of(stdout);
        let run_for = Duration::from_millis(rng.random_range(200..2500));
        let deadline = tokio::time::Instant::now() + run_for;
        loop {
            match tokio::time::timeout_at(deadline, lines.recv()).await {
                Err(_) => break,
                Ok(Some(line)) => {
                    let parts: Vec<&str> = line.split(' ').collect();
                    match parts.as_slice() {
                        ["msg", id, n] => printed_msgs.push(((*id).into(), n.parse().unwrap())),
                        ["op", id, d] => printed_ops.push(((*id).into(), d.parse().unwrap())),
                        ["tx", id] => printed_txs.push((*id).into()),
                        _ => panic!("unexpected line from the app: {line}"),
                    }
                }
                Ok(None) => break, // the app ended (it should not before the kill)
            }
        }
        // SIGKILL: no destructor, no flush, no goodbye.
        let mut c = guard.0.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
        // Lines printed before the kill may still be in the pipe.
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_millis(100), lines.recv()).await
        {
            let parts: Vec<&str> = line.split(' ').collect();
            match parts.as_slice() {
                ["msg", id, n] => printed_msgs.push(((*id).into(), n.parse().unwrap())),
                ["op", id, d] => printed_ops.push(((*id).into(), d.parse().unwrap())),
                ["tx", id] => printed_txs.push((*id).into()),
                _ => {}
            }
        }
    }
    eprintln!(
        "printed before the kills: {} messages, {} operations, {} transactions",
        printed_msgs.len(),
        printed_ops.len(),
        printed_txs.len()
    );

    // The last start drains the outbox.
    let drain = child(&server.url(), &store, &alice_token, seed, "drain");
    let out = tokio::task::spawn_blocking(move || drain.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "the drain run failed (seed {seed})");

    // What the app's store holds now.
    let store = Store::open(&store, StoreConfig::default()).unwrap();
    store.integrity_check().unwrap();
    let items = store.list(None).unwrap();
    let by_id: BTreeMap<&str, _> = items.iter().map(|i| (i.id.as_str(), i)).collect();

    // Messages: every printed one is in the store and accepted; bob got every message
    // of the store exactly once, in the order they were sent.
    let stored_msgs: Vec<u64> = items
        .iter()
        .filter(|i| i.kind == ItemKind::Message)
        .map(|i| i.body["payload"]["n"].as_u64().unwrap())
        .collect();
    for (id, _) in &printed_msgs {
        let item = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("printed message {id} lost (seed {seed})"));
        assert_eq!(item.state, ItemState::Accepted, "seed {seed}");
    }
    let delivered = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if received.lock().unwrap().len() >= stored_msgs.len() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = received.lock().unwrap().clone();
    assert!(
        delivered.is_ok() && got == stored_msgs,
        "seed {seed}: bob got {} of {} messages, or out of order / twice",
        got.len(),
        stored_msgs.len()
    );
    let unique: BTreeSet<u64> = got.iter().copied().collect();
    assert_eq!(
        unique.len(),
        got.len(),
        "a message delivered twice (seed {seed})"
    );

    // Operations: every printed one is in the store; the server's counter is the sum of
    // every stored delta (each applied exactly once).
    let stored_ops: Vec<i64> = items
        .iter()
        .filter(|i| i.kind == ItemKind::Operation)
        .map(|i| i.body["payload"]["v"].as_i64().unwrap())
        .collect();
    for (id, _) in &printed_ops {
        assert!(
            by_id.contains_key(id.as_str()),
            "printed operation {id} lost (seed {seed})"
        );
    }
    let want: i64 = stored_ops.iter().sum();
    let token = server.token("t1", "bob");
    let http = reqwest::Client::new();
    let snapshot: StateSnapshot = http
        .get(format!(
            "{}/api/reconciliation/snapshot/counter/k",
            server.url()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        snapshot.data["v"].as_i64(),
        Some(want),
        "counter (seed {seed})"
    );

    // Transactions: every printed one confirmed.
    for id in &printed_txs {
        let item = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("printed transaction {id} lost (seed {seed})"));
        // The server has it exactly once (its id), and its decision has arrived.
        assert_eq!(
            item.state,
            ItemState::Confirmed,
            "transaction {id} (seed {seed})"
        );
        assert!(item.server_ref.is_some());
    }
    eprintln!(
        "checked: {} messages delivered once in order, {} operations applied once, {} transactions confirmed once",
        stored_msgs.len(),
        stored_ops.len(),
        printed_txs.len()
    );
    bob.shutdown().await;
}
