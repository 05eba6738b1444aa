//! The app that gets killed: a client that sends messages, edits a counter entity and
//! submits Class D transactions in a loop, printing each item's id only after the SDK
//! call returned (so the parent knows what the SDK promised to keep). Used by
//! `tests/tests/sdk_crash.rs`, which kills it with SIGKILL at random moments.
//!
//! `sdk_crash_child SERVER_URL STORE TOKEN SEED work|drain`
//!
//! - `work`: loop until killed (bounded: 20,000 items or 120 s);
//! - `drain`: open, wait until the outbox is settled (at most 180 s), print `drained`.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use webwaka_realtime::client::{Client, OutgoingMessage, StaticToken, Target};
use webwaka_realtime::reconcile::CounterMerge;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        eprintln!("usage: sdk_crash_child SERVER_URL STORE TOKEN SEED work|drain");
        std::process::exit(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(run(&args[1], &args[2], &args[3], &args[4], &args[5]));
    std::process::exit(code);
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn run(server: &str, store: &str, token: &str, seed: &str, mode: &str) -> i32 {
    let mut config = webwaka_e2e::harness::client_config(server, std::path::Path::new(store));
    config
        .store
        .merges
        .insert("counter".into(), Arc::new(CounterMerge));
    let client = match Client::open(config, Arc::new(StaticToken(token.to_owned()))).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("open: {e}");
            return 1;
        }
    };
    if mode == "drain" {
        let deadline = Instant::now() + Duration::from_secs(180);
        while Instant::now() < deadline {
            // Messages and operations accepted, transactions decided.
            let settled = client
                .outbox(None)
                .await
                .is_ok_and(|items| items.iter().all(webwaka_e2e::harness::is_settled));
            if settled {
                say("drained".into());
                client.shutdown().await;
                return 0;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("the outbox did not drain");
        return 1;
    }
    // Wait until the counter (made by the parent) is in the cache: every edit is then a
    // delta on top of it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.entity("counter", "k").await.ok().flatten().is_none() {
        if Instant::now() > deadline {
            eprintln!("the counter never arrived");
            return 1;
        }
        let _ = client.sync_entities();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut rng = StdRng::seed_from_u64(seed.parse().unwrap_or(0));
    let started = Instant::now();
    for _ in 0..20_000 {
        if started.elapsed() > Duration::from_secs(120) {
            break;
        }
        match rng.random_range(0..10) {
            0..=5 => {
                let n: u64 = rng.random();
                let message =
                    OutgoingMessage::new(Target::User("bob".into()), "crash", json!({ "n": n }));
                if let Ok(item) = client.send_message(message).await {
                    say(format!("msg {} {n}", item.id));
                }
            }
            6..=8 => {
                let delta = rng.random_range(-3i64..10);
                if let Ok(entity) = client
                    .update_entity("counter", "k", json!({ "v": delta }))
                    .await
                    && let Some(op) = entity.pending.last()
                {
                    say(format!("op {} {delta}", op.operation_id));
                }
            }
            _ => {
                if let Ok(item) = client
                    .submit_transaction("payment", json!({ "amount": 1 }), None)
                    .await
                {
                    say(format!("tx {}", item.id));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..15))).await;
    }
    client.shutdown().await;
    0
}
