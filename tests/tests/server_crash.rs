//! Crash test of the server: it is killed with SIGKILL at random moments while a client
//! sends messages, and restarted on the same port and data, several times. Nothing the
//! server acknowledged is lost, and every message the sending app handed to its SDK
//! reaches the recipient exactly once, in order.
//!
//! Bounded for CI (4 kills by default); `WEBWAKA_SERVER_KILLS` for more; the seed is
//! printed and `WEBWAKA_CRASH_SEED` replays it.

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use webwaka_e2e::harness::{ChildGuard, client_config, env_u64, open_client, wait_state};
use webwaka_realtime::client::{Next, OutgoingMessage, Target, Update};
use webwaka_realtime::machine::ConnectionState;
use webwaka_realtime::store::ItemState;

fn start_server(dir: &std::path::Path, port: u16) -> ChildGuard {
    let mut child = Command::new(env!("CARGO_BIN_EXE_server_child"))
        .args([dir.to_str().unwrap(), &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for "listening" (or give up after 10 s; the clients retry anyway).
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        // Keep draining so the child never blocks on a full pipe.
        for _ in lines {}
    });
    let _ = rx.recv_timeout(Duration::from_secs(10));
    ChildGuard(Some(child))
}

/// A secret both the test and every server run agree on (dev mode keeps it in the
/// data directory; the tokens are minted with the in-process keys of a throwaway
/// server on the same data directory).
async fn token(dir: &std::path::Path, user: &str) -> String {
    let server = webwaka_e2e::harness::TestServer::start(dir).await;
    let token = server.token("t1", user);
    let mut server = server;
    server.stop().await;
    token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_the_server_is_killed() {
    let seed = env_u64("WEBWAKA_CRASH_SEED").unwrap_or_else(rand::random);
    let kills = env_u64("WEBWAKA_SERVER_KILLS").unwrap_or(4);
    eprintln!("server crash test: seed {seed}, {kills} kills");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let alice_token = token(&data, "alice").await;
    let bob_token = token(&data, "bob").await;
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let mut server = start_server(&data, port);

    let alice = open_client(
        client_config(&url, &dir.path().join("alice.db")),
        alice_token,
    )
    .await;
    let bob = open_client(client_config(&url, &dir.path().join("bob.db")), bob_token).await;
    assert!(wait_state(&bob, ConnectionState::Realtime, Duration::from_secs(15)).await);
    let received: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
    let record = received.clone();
    let mut sub = bob.subscribe();
    tokio::spawn(async move {
        loop {
            match sub.next().await {
                Next::Update(u) => {
                    if let Update::Message(m) = *u {
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

    // Alice sends steadily while the server dies and comes back (the task is stopped
    // after the last restart; what her outbox holds is the ledger).
    let sender = {
        let alice = alice.clone();
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for n in 0..100_000u64 {
                let message =
                    OutgoingMessage::new(Target::User("bob".into()), "crash", json!({ "n": n }));
                if alice.send_message(message).await.is_ok() {
                    sent.push(n);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            sent
        })
    };
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        // SIGKILL: no graceful shutdown, no flush.
        drop(server);
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..700))).await;
        server = start_server(&data, port);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    sender.abort();
    let _ = sender.await;

    // Everything alice's outbox holds was delivered once, in order.
    let settled = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let items = alice.outbox(None).await.unwrap();
            if items.iter().all(|i| i.state == ItemState::Accepted) {
                return items;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let settled = match settled {
        Ok(items) => items,
        Err(_) => {
            // Say what is stuck and where the client stands, so a failure is readable.
            let items = alice.outbox(None).await.unwrap();
            let stuck: Vec<String> = items
                .iter()
                .filter(|i| i.state != ItemState::Accepted)
                .take(5)
                .map(|i| {
                    format!(
                        "{} {:?} attempts {} next {} error {:?}",
                        i.id, i.state, i.attempts, i.next_attempt_at, i.last_error
                    )
                })
                .collect();
            panic!(
                "alice's outbox did not drain (seed {seed}); state {:?}; stuck: {stuck:#?}",
                alice.connection_state()
            )
        }
    };
    let sent: Vec<u64> = settled
        .iter()
        .map(|i| i.body["payload"]["n"].as_u64().unwrap())
        .collect();
    let all = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if received.lock().unwrap().len() >= sent.len() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = received.lock().unwrap().clone();
    assert!(
        all.is_ok() && got == sent,
        "seed {seed}: bob got {} messages, alice's outbox holds {} (lost, twice or out of order)",
        got.len(),
        sent.len()
    );
    eprintln!(
        "checked: {} messages across {kills} server kills, each once, in order",
        sent.len()
    );
    alice.shutdown().await;
    bob.shutdown().await;
    drop(server);
}
