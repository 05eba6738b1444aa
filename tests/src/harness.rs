//! Test harness: a real server on a loopback port with its SQLite data in a temporary
//! directory, real clients with their own store files, and bounded waits.
//!
//! Used by the end-to-end tests and the benchmarks. Everything binds to 127.0.0.1 only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use webwaka_realtime::client::{
    Client, ClientConfig, Next, OutgoingMessage, StaticToken, Target, Update,
};
use webwaka_realtime::machine::{ConnectionState, MachineConfig};
use webwaka_server_stub::{Config, Options, RunningServer, Server};

/// A server the test can stop and start again on the same port and data.
pub struct TestServer {
    /// Its data directory (kept across restarts).
    pub data_dir: PathBuf,
    /// Its address (kept across restarts).
    pub addr: SocketAddr,
    running: Option<RunningServer>,
    configure: Arc<dyn Fn(&mut Config) + Send + Sync>,
}

/// Settings that make a test server quick: short heartbeats, generous rate limits,
/// fast transaction decisions.
pub fn test_config(data_dir: &Path) -> Config {
    let mut config = Config::new(data_dir);
    config.port = 0;
    config.ping_interval_ms = 1_000;
    config.ping_timeout_ms = 5_000;
    config.message_rate_limit = 100_000;
    config.poll_rate_limit = 100_000;
    config.reconciliation_rate_limit = 100_000;
    config.publish_rate_limit = 100_000;
    config.transaction_confirm_delay_ms = 50;
    config.shutdown_grace_ms = 2_000;
    config
}

impl TestServer {
    /// Starts a server in `data_dir` with [`test_config`] changed by `configure`.
    pub async fn start_with(
        data_dir: &Path,
        configure: impl Fn(&mut Config) + Send + Sync + 'static,
    ) -> Self {
        // Tests build their own reqwest clients; reqwest has the SDK's TLS without a
        // provider of its own and needs the default the SDK installs.
        webwaka_realtime::client::tls::install_default_provider();
        let mut config = test_config(data_dir);
        configure(&mut config);
        // The engine this run exercises (a fresh PostgreSQL database, kept across
        // restarts, or the SQLite file in `data_dir`).
        webwaka_server_stub::testing::use_engine_under_test(&mut config).await;
        let database_url = config.database_url.clone();
        let configure: Arc<dyn Fn(&mut Config) + Send + Sync> = Arc::new(move |c: &mut Config| {
            configure(c);
            c.database_url = database_url.clone();
        });
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let running = Server::with_listener(config, Options::default(), listener)
            .await
            .expect("server starts")
            .spawn();
        Self {
            data_dir: data_dir.to_path_buf(),
            addr,
            running: Some(running),
            configure,
        }
    }

    /// Starts a server in `data_dir` with [`test_config`].
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, |_| {}).await
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A token for `user` of `tenant`.
    pub fn token(&self, tenant: &str, user: &str) -> String {
        self.running
            .as_ref()
            .expect("the server is running")
            .token(tenant, user, &[])
    }

    /// A token for `user` of `tenant` that expires after `ttl_secs`.
    pub fn token_expiring(&self, tenant: &str, user: &str, ttl_secs: i64) -> String {
        self.running
            .as_ref()
            .expect("the server is running")
            .keys()
            .mint(tenant, user, &[], ttl_secs)
    }

    /// The server's signing keys (the same across restarts: the secret is in the config).
    pub fn keys(&self) -> webwaka_server_stub::Keys {
        self.running
            .as_ref()
            .expect("the server is running")
            .keys()
            .clone()
    }

    /// The chaos layer's controls, when the server was configured with `chaos = true`.
    pub fn chaos(&self) -> Option<webwaka_server_stub::ChaosControl> {
        self.running.as_ref().and_then(RunningServer::chaos)
    }

    /// Stops the server gracefully (its data stays).
    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }

    /// Starts it again on the same port with the same data.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut config = test_config(&self.data_dir);
        (self.configure)(&mut config);
        config.port = self.addr.port();
        // The port was just released; retry briefly if the OS has not freed it yet.
        for attempt in 0..50 {
            match Server::bind(config.clone(), Options::default()).await {
                Ok(server) => {
                    self.running = Some(server.spawn());
                    return;
                }
                Err(e) if attempt < 49 => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("restart failed: {e}"),
            }
        }
    }
}

/// Client timings for tests: quick retries and probes, so that recoveries take
/// fractions of a second instead of the production defaults.
pub fn fast_machine() -> MachineConfig {
    MachineConfig {
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        slow_connect: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(3),
        ping_interval: Duration::from_secs(1),
        pong_timeout: Duration::from_secs(3),
        poll_interval: Duration::from_millis(100),
        probe_min: Duration::from_millis(200),
        probe_max: Duration::from_secs(1),
        stable_after: Duration::from_secs(2),
        ..MachineConfig::default()
    }
}

/// A client config for `server_url` with its store at `store`, test timings.
pub fn client_config(server_url: &str, store: &Path) -> ClientConfig {
    let mut config = ClientConfig::new(server_url, store);
    config.machine = fast_machine();
    config.request_timeout = Duration::from_secs(5);
    config.entity_pull_interval = Duration::from_millis(300);
    config.entity_pull_idle_max = Duration::from_secs(1);
    config.transaction_check_interval = Duration::from_millis(200);
    config.ack_timeout = Duration::from_secs(2);
    config
}

/// Opens a client with a fixed token.
pub async fn open_client(config: ClientConfig, token: String) -> Client {
    Client::open(config, Arc::new(StaticToken(token)))
        .await
        .expect("client opens")
}

/// Alice and bob of tenant `t1`, with stores in `dir`, both Realtime against `server`.
pub async fn realtime_pair(server: &TestServer, dir: &Path) -> (Client, Client) {
    let mut pair = Vec::with_capacity(2);
    for user in ["alice", "bob"] {
        let config = client_config(&server.url(), &dir.join(format!("{user}.db")));
        let client = open_client(config, server.token("t1", user)).await;
        assert!(
            wait_state(&client, ConnectionState::Realtime, Duration::from_secs(15)).await,
            "{user} not Realtime"
        );
        pair.push(client);
    }
    let bob = pair.pop().expect("two clients");
    let alice = pair.pop().expect("two clients");
    (alice, bob)
}

/// Waits until the client is in `state`, at most `within`.
pub async fn wait_state(client: &Client, state: ConnectionState, within: Duration) -> bool {
    let mut watch = client.watch_state();
    tokio::time::timeout(within, async {
        loop {
            if *watch.borrow_and_update() == state {
                return;
            }
            if watch.changed().await.is_err() {
                return;
            }
        }
    })
    .await
    .is_ok()
        && client.connection_state() == state
}

/// Collects updates matching `keep` until `count` are in or `within` passes.
pub async fn collect<T>(
    sub: &mut webwaka_realtime::client::Subscription,
    count: usize,
    within: Duration,
    mut keep: impl FnMut(Update) -> Option<T>,
) -> Vec<T> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, async {
        while out.len() < count {
            match sub.next().await {
                Next::Update(u) => {
                    if let Some(t) = keep(*u) {
                        out.push(t);
                    }
                }
                Next::Missed(n) => panic!("the test subscriber missed {n} updates"),
                Next::Closed => return,
            }
        }
    })
    .await;
    out
}

/// Polls `check` every 50 ms until it holds or `within` passes; whether it held.
pub async fn wait_until<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The message an update carries, if it is one (for [`collect`]).
pub fn messages(update: Update) -> Option<webwaka_realtime::protocol::WebSocketMessage> {
    match update {
        Update::Message(m) => Some(m),
        _ => None,
    }
}

/// The `text` field of each message's payload.
pub fn texts(messages: &[webwaka_realtime::protocol::WebSocketMessage]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m.payload["text"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// A number from the environment (test sizes, seeds).
pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Kills a child process when dropped, also when a test fails half-way.
pub struct ChildGuard(pub Option<std::process::Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The lines a child prints, read on a thread (the pipe is blocking).
pub fn lines_of(stdout: std::process::ChildStdout) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// True when an outbox item needs nothing more: a message or operation the server
/// accepted, a transaction it confirmed or rejected.
pub fn is_settled(item: &webwaka_realtime::store::OutboxItem) -> bool {
    use webwaka_realtime::store::{ItemKind, ItemState};
    match item.kind {
        ItemKind::Transaction => matches!(item.state, ItemState::Confirmed | ItemState::Rejected),
        _ => item.state == ItemState::Accepted,
    }
}

/// A direct message `{"text": text}` of type `dm` to `user`.
pub fn direct(user: &str, text: &str) -> OutgoingMessage {
    OutgoingMessage::new(
        Target::User(user.into()),
        "dm",
        serde_json::json!({ "text": text }),
    )
}

/// Two users each send `n` direct messages (`a0…`, `b0…`) to the other; each must get
/// the other's, in order, exactly once, within `within`.
pub async fn exchange(a: (&Client, &str), b: (&Client, &str), n: usize, within: Duration) {
    let (mut at_a, mut at_b) = (a.0.subscribe(), b.0.subscribe());
    for i in 0..n {
        a.0.send_message(direct(b.1, &format!("a{i}")))
            .await
            .expect("a's message is taken");
        b.0.send_message(direct(a.1, &format!("b{i}")))
            .await
            .expect("b's message is taken");
    }
    let got_b = texts(&collect(&mut at_b, n, within, messages).await);
    let got_a = texts(&collect(&mut at_a, n, within, messages).await);
    let want = |p: &str| (0..n).map(|i| format!("{p}{i}")).collect::<Vec<_>>();
    assert_eq!(got_b, want("a"), "{} received", b.1);
    assert_eq!(got_a, want("b"), "{} received", a.1);
}
