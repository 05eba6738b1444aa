//! Memory: thousands of clients and subscriptions are created and dropped through the
//! FFI layer's public API, and nothing stays behind: the live-object counts return to
//! zero, the open file descriptors (each client's SQLite store holds three) return to
//! where they were, and the resident memory grows by less than a bound.
//!
//! Its own test binary, so that no other test shares the process while RSS is read.
//! The clients point at a loopback port nobody listens on: this test is about the
//! objects' lifetimes, not the network (the Kotlin and Swift tests repeat it across
//! the FFI with a real server).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use webwaka_realtime_ffi::{
    CallbackError, ClientListener, ClientOptions, Durability, LiveObjects, RealtimeClient,
    TokenProvider, TokenRequest, live_objects, types::ClientUpdate,
};

/// Clients opened and dropped in the measured phase.
const CLIENTS: usize = 2_000;
/// Subscriptions per client (one cancelled, the others dropped).
const SUBSCRIPTIONS_PER_CLIENT: usize = 2;
/// Clients opened before the first measurement (allocator and runtime warm-up).
const WARM_UP: usize = 200;
/// Store files used in turn (a dropped client closes its store in the background).
const STORE_FILES: usize = 16;
/// Most the resident memory may grow over the measured phase.
const RSS_BOUND_KIB: u64 = 16 * 1024;

struct Token(String);

#[async_trait::async_trait]
impl TokenProvider for Token {
    async fn token(&self, _request: TokenRequest) -> Result<String, CallbackError> {
        Ok(self.0.clone())
    }
}

struct Ignore;

impl ClientListener for Ignore {
    fn on_update(&self, _update: ClientUpdate) -> Result<(), CallbackError> {
        Ok(())
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Waits (bounded) until every client, subscription, pump and listener thread is gone.
fn wait_all_freed(within: Duration) -> LiveObjects {
    let deadline = Instant::now() + within;
    loop {
        let live = live_objects();
        let zero = LiveObjects {
            clients: 0,
            subscriptions: 0,
            pumps: 0,
            listener_threads: 0,
        };
        if live == zero || Instant::now() > deadline {
            return live;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Opens a client, subscribes, cancels or drops the subscriptions, and drops the
/// client; every fourth client is shut down explicitly, the others only dropped.
async fn one_round(i: usize, dir: &std::path::Path, token: &Arc<Token>) {
    let mut options = ClientOptions::new(
        "http://127.0.0.1:1",
        dir.join(format!("store-{}.db", i % STORE_FILES))
            .to_string_lossy(),
    );
    options.durability = Some(Durability::Normal);
    options.backoff_min_ms = Some(50);
    options.backoff_max_ms = Some(200);
    let client = RealtimeClient::open(options, token.clone()).await.unwrap();
    let mut handles = Vec::new();
    for _ in 0..SUBSCRIPTIONS_PER_CLIENT {
        handles.push(client.subscribe(Arc::new(Ignore)).unwrap());
    }
    handles[0].cancel();
    drop(handles);
    if i.is_multiple_of(4) {
        client.shutdown().await.unwrap();
    }
    drop(client);
}

#[test]
fn thousands_of_clients_and_subscriptions_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let token = Arc::new(Token(
        webwaka_server_stub::auth::Keys::new(b"memory-test", 0).mint("t1", "u1", &[], 3_600),
    ));
    // The app's side: a plain executor polling the FFI futures (the SDK runs its own).
    let executor = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    executor.block_on(async {
        for i in 0..WARM_UP {
            one_round(i, dir.path(), &token).await;
        }
    });
    let live = wait_all_freed(Duration::from_secs(20));
    assert_eq!(
        live.clients + live.subscriptions + live.pumps,
        0,
        "{live:?}"
    );
    // Let the background shutdowns close their stores.
    std::thread::sleep(Duration::from_millis(500));
    let (rss_before, fds_before) = (rss_kib(), open_fds());

    let started = Instant::now();
    executor.block_on(async {
        for i in WARM_UP..WARM_UP + CLIENTS {
            one_round(i, dir.path(), &token).await;
        }
    });
    let elapsed = started.elapsed();
    let live = wait_all_freed(Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    let (rss_after, fds_after) = (rss_kib(), open_fds());

    eprintln!(
        "{CLIENTS} clients and {} subscriptions in {elapsed:.1?}: RSS {rss_before} -> {rss_after} KiB, \
         fds {fds_before} -> {fds_after}, live after: {live:?}",
        CLIENTS * SUBSCRIPTIONS_PER_CLIENT
    );
    assert_eq!(
        live,
        LiveObjects {
            clients: 0,
            subscriptions: 0,
            pumps: 0,
            listener_threads: 0
        }
    );
    assert!(
        fds_after <= fds_before + 2,
        "file descriptors leaked: {fds_before} -> {fds_after}"
    );
    assert!(
        rss_after <= rss_before + RSS_BOUND_KIB,
        "resident memory grew by {} KiB (bound {RSS_BOUND_KIB} KiB)",
        rss_after.saturating_sub(rss_before)
    );
}
