//! Tests of the FFI layer in Rust, against a real server on a loopback port: the
//! listener's contract (current state first, order, a slow or throwing listener does
//! not stall the client, cancelling stops deliveries), the logger (records arrive,
//! nothing secret in them) and errors. The same scenarios run from Kotlin and Swift in
//! `bindings/`; these run in `cargo test` and pin the Rust side down.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use webwaka_server_stub::{Config, Options, RunningServer, Server};

use crate::error::CallbackError;
use crate::subscription::{self, ClientListener};
use crate::types::{ClientUpdate, ConnectionState, MessageTarget, OutgoingMessage};
use crate::{ClientOptions, RealtimeClient, RealtimeError, TokenProvider, TokenRequest};

/// A server on a loopback port with quick settings (as `tests/src/harness.rs`).
async fn server(dir: &std::path::Path) -> RunningServer {
    let mut config = Config::new(dir);
    config.port = 0;
    config.ping_interval_ms = 1_000;
    config.message_rate_limit = 100_000;
    config.poll_rate_limit = 100_000;
    config.reconciliation_rate_limit = 100_000;
    config.publish_rate_limit = 100_000;
    config.transaction_confirm_delay_ms = 50;
    config.shutdown_grace_ms = 500;
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    Server::with_listener(config, Options::default(), listener)
        .await
        .unwrap()
        .spawn()
}

/// A fixed token, as the app's provider would give it.
struct Fixed(String);

#[async_trait::async_trait]
impl TokenProvider for Fixed {
    async fn token(&self, _request: TokenRequest) -> Result<String, CallbackError> {
        Ok(self.0.clone())
    }
}

/// A well-formed token for clients that never reach a server (nobody checks it).
fn offline_token() -> String {
    webwaka_server_stub::auth::Keys::new(b"offline-tests", 0).mint("t1", "dave", &[], 3_600)
}

/// Options with test timings.
fn options(url: &str, store: &std::path::Path) -> ClientOptions {
    let mut o = ClientOptions::new(url, store.to_string_lossy());
    o.backoff_min_ms = Some(50);
    o.backoff_max_ms = Some(500);
    o.slow_connect_ms = Some(500);
    o.poll_interval_ms = Some(100);
    o.probe_min_ms = Some(200);
    o.probe_max_ms = Some(1_000);
    o.ack_timeout_ms = Some(2_000);
    o.request_timeout_ms = Some(5_000);
    o
}

/// Records every update; can be told to be slow or to throw.
#[derive(Default)]
struct Recorder {
    updates: Mutex<Vec<ClientUpdate>>,
    changed: Condvar,
    delay: Option<Duration>,
    throw: bool,
    calls: AtomicUsize,
}

impl ClientListener for Recorder {
    fn on_update(&self, update: ClientUpdate) -> Result<(), CallbackError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(d) = self.delay {
            std::thread::sleep(d);
        }
        self.updates.lock().unwrap().push(update);
        self.changed.notify_all();
        if self.throw {
            return Err(CallbackError::Failed {
                reason: "listener bug".into(),
            });
        }
        Ok(())
    }
}

impl Recorder {
    /// Waits (blocking, bounded) until `pred` holds for the updates so far.
    fn wait_for(&self, within: Duration, pred: impl Fn(&[ClientUpdate]) -> bool) -> bool {
        let deadline = Instant::now() + within;
        let mut updates = self.updates.lock().unwrap();
        loop {
            if pred(&updates) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            updates = self.changed.wait_timeout(updates, left).unwrap().0;
        }
    }

    fn snapshot(&self) -> Vec<ClientUpdate> {
        self.updates.lock().unwrap().clone()
    }
}

fn realtime(updates: &[ClientUpdate]) -> bool {
    updates.iter().any(|u| {
        matches!(
            u,
            ClientUpdate::StateChanged {
                to: ConnectionState::Realtime,
                ..
            } | ClientUpdate::CurrentState {
                state: ConnectionState::Realtime
            }
        )
    })
}

fn texts(updates: &[ClientUpdate]) -> Vec<String> {
    updates
        .iter()
        .filter_map(|u| match u {
            ClientUpdate::MessageReceived { message } => Some(message.payload_json.clone()),
            _ => None,
        })
        .collect()
}

fn chat(room: &str, n: usize) -> OutgoingMessage {
    OutgoingMessage {
        target: MessageTarget::Room {
            room_id: room.into(),
        },
        message_type: "chat.text".into(),
        payload_json: format!("{{\"n\":{n}}}"),
        class: None,
        metadata_json: None,
    }
}

/// Runs blocking waits off the async test's worker.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_get_the_state_first_then_messages_in_order_and_slow_or_throwing_ones_stall_nothing()
 {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir.path().join("server")).await;
    let url = server.http_url();
    let alice = RealtimeClient::open(
        options(&url, &dir.path().join("alice.db")),
        Arc::new(Fixed(server.token("t1", "alice", &[]))),
    )
    .await
    .unwrap();
    let bob = RealtimeClient::open(
        options(&url, &dir.path().join("bob.db")),
        Arc::new(Fixed(server.token("t1", "bob", &[]))),
    )
    .await
    .unwrap();

    // Bob has three listeners: a normal one, a slow one (queue of 2, so it misses
    // updates) and one that throws every time.
    let normal = Arc::new(Recorder::default());
    let slow = Arc::new(Recorder {
        delay: Some(Duration::from_millis(300)),
        ..Recorder::default()
    });
    let throwing = Arc::new(Recorder {
        throw: true,
        ..Recorder::default()
    });
    let _n = bob.subscribe(normal.clone()).unwrap();
    let _s = subscription::subscribe(&bob.client, slow.clone(), 2).unwrap();
    let _t = bob.subscribe(throwing.clone()).unwrap();
    let alice_updates = Arc::new(Recorder::default());
    let _a = alice.subscribe(alice_updates.clone()).unwrap();

    for r in [&normal, &throwing, &alice_updates] {
        let r = r.clone();
        let first = blocking(move || {
            assert!(r.wait_for(Duration::from_secs(10), realtime), "no Realtime");
            r.snapshot()[0].clone()
        })
        .await;
        assert!(
            matches!(first, ClientUpdate::CurrentState { .. }),
            "{first:?}"
        );
    }
    alice.join_room("r1".into()).await.unwrap();
    bob.join_room("r1".into()).await.unwrap();
    let joined = normal.clone();
    assert!(
        blocking(move || joined.wait_for(Duration::from_secs(10), |u| u
            .iter()
            .any(|u| matches!(u, ClientUpdate::RoomChanged { joined: true, .. }))))
        .await
    );

    let started = Instant::now();
    for n in 0..20 {
        alice.send_message(chat("r1", n)).await.unwrap();
    }
    let want: Vec<String> = (0..20).map(|n| format!("{{\"n\":{n}}}")).collect();
    for r in [&normal, &throwing] {
        let (r, want) = (r.clone(), want.clone());
        assert!(
            blocking(move || r.wait_for(Duration::from_secs(10), |u| texts(u) == want)).await,
            "messages missing or out of order"
        );
    }
    // The slow listener (300 ms a call) would need 6 s for 20 messages: the others
    // got everything long before, and it is still behind.
    assert!(slow.calls.load(Ordering::SeqCst) < 20);
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    // It reports what it skipped, with the state, once it catches up.
    let slow2 = slow.clone();
    assert!(
        blocking(move || slow2.wait_for(Duration::from_secs(15), |u| u
            .iter()
            .any(|u| matches!(u, ClientUpdate::Missed { count, state: ConnectionState::Realtime } if *count > 0))))
        .await,
        "{:?}",
        slow.snapshot()
    );
    assert!(throwing.calls.load(Ordering::SeqCst) >= 20);

    alice.shutdown().await.unwrap();
    bob.shutdown().await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_subscription_gets_nothing_more_and_frees_its_thread() {
    let dir = tempfile::tempdir().unwrap();
    // Nobody listens on port 1: the client stays offline and keeps retrying.
    let client = RealtimeClient::open(
        options("http://127.0.0.1:1", &dir.path().join("c.db")),
        Arc::new(Fixed(offline_token())),
    )
    .await
    .unwrap();
    let recorder = Arc::new(Recorder::default());
    let handle = client.subscribe(recorder.clone()).unwrap();
    let r = recorder.clone();
    assert!(
        blocking(move || r.wait_for(Duration::from_secs(5), |u| u.len() >= 2)).await,
        "the first state changes: {:?}",
        recorder.snapshot()
    );
    handle.cancel();
    assert!(handle.is_finished());
    let calls = recorder.calls.load(Ordering::SeqCst);
    // Offline, the client retries every 50-500 ms: each retry is a state change.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(recorder.calls.load(Ordering::SeqCst), calls);
    client.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_typed_and_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let client = RealtimeClient::open(
        options("http://127.0.0.1:1", &dir.path().join("c.db")),
        Arc::new(Fixed(offline_token())),
    )
    .await
    .unwrap();
    let mut bad = chat("r1", 0);
    bad.payload_json = "{not json".into();
    assert!(matches!(
        client.send_message(bad).await,
        Err(RealtimeError::InvalidInput { field, .. }) if field == "payloadJson"
    ));
    assert!(matches!(
        client.retry("no-such-item".into()).await,
        Err(RealtimeError::NotFound { .. })
    ));
    assert_eq!(
        client
            .send_live(
                MessageTarget::Room {
                    room_id: "r1".into()
                },
                "typing".into(),
                "{}".into()
            )
            .await,
        Err(RealtimeError::NotConnected)
    );
    // Durable items are accepted offline.
    let item = client.send_message(chat("r1", 1)).await.unwrap();
    assert_eq!(item.kind, crate::types::OutboxItemKind::Message);
    client.shutdown().await.unwrap();
    assert_eq!(
        client.metrics().await.map(|_| ()),
        Err(RealtimeError::Closed)
    );
    let bad_options = RealtimeClient::open(
        options("", &dir.path().join("c.db")),
        Arc::new(Fixed(offline_token())),
    )
    .await;
    assert!(matches!(
        bad_options.map(|_| ()),
        Err(RealtimeError::InvalidInput { field, .. }) if field == "serverUrl"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_logger_gets_the_sdks_records_and_never_the_token() {
    use crate::{LogLevel, LogRecord, Logger, set_logger};

    #[derive(Default)]
    struct Sink(Mutex<Vec<LogRecord>>);
    impl Logger for Sink {
        fn log(&self, record: LogRecord) -> Result<(), CallbackError> {
            self.0.lock().unwrap().push(record);
            Ok(())
        }
    }

    let sink = Arc::new(Sink::default());
    set_logger(Some(sink.clone()), LogLevel::Debug, true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir.path().join("server")).await;
    let token = server.token("t1", "carol", &[]);
    let client = RealtimeClient::open(
        options(&server.http_url(), &dir.path().join("c.db")),
        Arc::new(Fixed(token.clone())),
    )
    .await
    .unwrap();
    let recorder = Arc::new(Recorder::default());
    let _sub = client.subscribe(recorder.clone()).unwrap();
    assert!(blocking(move || recorder.wait_for(Duration::from_secs(10), realtime)).await);
    client.shutdown().await.unwrap();
    server.shutdown().await;
    // The logger thread delivers shortly after.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && !sink
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.message.contains("client shut down"))
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    set_logger(None, LogLevel::Off, false).unwrap();
    let records = sink.0.lock().unwrap().clone();
    assert!(
        records
            .iter()
            .any(|r| r.message.contains("connection state") && r.level == LogLevel::Info),
        "{records:#?}"
    );
    let signature = token.rsplit('.').next().unwrap();
    for r in &records {
        assert!(
            !r.message.contains(signature),
            "token in a log record: {r:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_may_cancel_its_own_subscription() {
    /// Cancels its own handle on the first update.
    #[derive(Default)]
    struct SelfCancelling {
        handle: Mutex<Option<Arc<crate::SubscriptionHandle>>>,
        calls: AtomicUsize,
    }
    impl ClientListener for SelfCancelling {
        fn on_update(&self, _update: ClientUpdate) -> Result<(), CallbackError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            // Wait (bounded) for the test to hand the handle over.
            for _ in 0..500 {
                if let Some(h) = self.handle.lock().unwrap().as_ref() {
                    h.cancel();
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let client = RealtimeClient::open(
        options("http://127.0.0.1:1", &dir.path().join("c.db")),
        Arc::new(Fixed(offline_token())),
    )
    .await
    .unwrap();
    let listener = Arc::new(SelfCancelling::default());
    let handle = client.subscribe(listener.clone()).unwrap();
    *listener.handle.lock().unwrap() = Some(handle.clone());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !handle.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(handle.is_finished());
    // The offline client keeps changing state; the listener hears nothing more.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(listener.calls.load(Ordering::SeqCst), 1);
    // Break the cycle listener -> handle (the app's job when it keeps one like this).
    listener.handle.lock().unwrap().take();
    client.shutdown().await.unwrap();
}
