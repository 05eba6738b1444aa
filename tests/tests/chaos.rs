//! Fault injection: several clients do random work (room and direct messages, presence,
//! offline counter and document edits, Class D transactions) while a seeded random
//! schedule breaks their network through a proxy each (refused WebSockets, refused or
//! black-holed connections, cuts, resets, frozen sockets, latency, throttled
//! bandwidth), turns on the server's chaos switch (failed and rate-limited HTTP
//! requests, acknowledgements dropped after the commit, reconciliation timeouts, a
//! user's connections dropped, tokens expired early) and restarts the server. Then the
//! network heals and the invariants must hold:
//!
//! - every message an SDK call accepted reaches each recipient exactly once, in order
//!   per sender and target;
//! - every entity operation is applied exactly once: each counter equals the sum of
//!   every delta any client committed, and every replica equals the server's snapshot;
//! - every Class D transaction is confirmed, once, with one server id;
//! - no Class A item was ever stored; outboxes drain; nothing is left dead.
//!
//! With several instances ([`invariants_hold_across_instances_under_a_random_schedule_of_faults`]):
//! three server processes on one private PostgreSQL cluster behind a round-robin load
//! balancer (each client's faulty proxy in front of it); the schedule also SIGKILLs
//! instances (brought back a few steps later, or at once), restarts one gracefully, and
//! stops PostgreSQL (a clean stop or an immediate one, as a crash) and starts it again.
//! The chaos switch is driven over HTTP and reaches every instance.
//!
//! Seeded and bounded: `WEBWAKA_CHAOS_SEED` replays a run, `WEBWAKA_CHAOS_STEPS` makes
//! it longer (default 30 steps, about 20 s), `WEBWAKA_CHAOS_MINUTES` runs new seeds for
//! that long (the soak run). A failure prints the seed and the history.
//! `WEBWAKA_CHAOS_LOG=DIR` also keeps the SDK's and server's logs (`RUST_LOG`, default
//! debug for both) of each failed scenario in `DIR/chaos-SEED.log`.

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use webwaka_e2e::cluster::{Children, PgCluster};
use webwaka_e2e::harness::{
    TestServer, client_config, env_u64, is_settled, wait_state, wait_until,
};
use webwaka_e2e::proxy::{Balance, Mode, Proxy};
use webwaka_realtime::client::{
    Client, Next, OutgoingMessage, Target, TokenError, TokenRequest, Update,
};
use webwaka_realtime::machine::ConnectionState;
use webwaka_realtime::protocol::{PresenceStatus, StateSnapshot};
use webwaka_realtime::reconcile::CounterMerge;
use webwaka_realtime::store::{ItemKind, ItemState};
use webwaka_server_stub::chaos::Target as ChaosTarget;
use webwaka_server_stub::{ChaosControl, ChaosSettings, DropAcks, HttpFailures, Keys};

const USERS: [&str; 3] = ["ana", "ben", "cho"];
const ROOM: &str = "chaos";
const COUNTERS: [&str; 2] = ["c1", "c2"];
const DOCS: [&str; 2] = ["d1", "d2"];

/// What one client received, per (sender, target) lane: the message numbers in order.
type Inbox = Arc<std::sync::Mutex<BTreeMap<(String, String), Vec<u64>>>>;

struct Node {
    user: &'static str,
    client: Client,
    proxy: Proxy,
    inbox: Inbox,
}

async fn open_node(
    entry: std::net::SocketAddr,
    keys: Keys,
    dir: &std::path::Path,
    user: &'static str,
) -> Node {
    let proxy = Proxy::start(entry).await.unwrap();
    let mut config = client_config(&proxy.url(), &dir.join(format!("{user}.db")));
    config
        .store
        .merges
        .insert("counter".into(), Arc::new(CounterMerge));
    // A fresh token on every request, as an app's auth layer gives (the chaos switch
    // expires tokens early).
    let tokens = move |_: TokenRequest| {
        let token = keys.mint("t1", user, &[], 3600);
        async move { Ok::<_, TokenError>(token) }
    };
    let client = Client::open(config, Arc::new(tokens)).await.unwrap();
    let inbox: Inbox = Arc::default();
    let mut sub = client.subscribe();
    let record = inbox.clone();
    tokio::spawn(async move {
        loop {
            match sub.next().await {
                Next::Update(u) => {
                    // Live (Class A) typing indicators are not part of the ledger.
                    if let Update::Message(m) = *u
                        && m.message_type == "chat"
                    {
                        let target = m.room_id.clone().map_or_else(
                            || format!("@{}", m.recipient_id.unwrap_or_default()),
                            |r| format!("#{r}"),
                        );
                        let n = m.payload["n"].as_u64().unwrap_or(u64::MAX);
                        record
                            .lock()
                            .unwrap()
                            .entry((m.sender_id.clone(), target))
                            .or_default()
                            .push(n);
                    }
                }
                Next::Missed(n) => panic!("a test subscriber missed {n} updates"),
                Next::Closed => return,
            }
        }
    });
    Node {
        user,
        client,
        proxy,
        inbox,
    }
}

/// Where the current scenario's logs go, when `WEBWAKA_CHAOS_LOG` asks for them.
static LOG_FILE: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);

/// A writer into [`LOG_FILE`] (nothing when no file is open).
struct ScenarioLog;

impl std::io::Write for ScenarioLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match LOG_FILE.lock().unwrap().as_mut() {
            Some(file) => file.write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match LOG_FILE.lock().unwrap().as_mut() {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

/// Installs the log subscriber when `WEBWAKA_CHAOS_LOG` names a directory.
fn log_dir() -> Option<std::path::PathBuf> {
    let dir = std::path::PathBuf::from(std::env::var_os("WEBWAKA_CHAOS_LOG")?);
    std::fs::create_dir_all(&dir).unwrap();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("webwaka_realtime=debug,webwaka_server_stub=debug")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(|| ScenarioLog)
        .init();
    Some(dir)
}

/// What one scenario checked.
#[derive(Debug, Default)]
struct Stats {
    faults: u64,
    messages: u64,
    operations: u64,
    transactions: u64,
    entities: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariants_hold_after_a_random_schedule_of_faults() {
    soak(false).await;
}

/// Three instances on PostgreSQL: the same invariants, with instance kills and database
/// restarts in the schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariants_hold_across_instances_under_a_random_schedule_of_faults() {
    soak(true).await;
}

/// One scenario in CI; `WEBWAKA_CHAOS_MINUTES=30` keeps running new seeds for that long
/// (the soak run), stopping at the first violation.
async fn soak(cluster: bool) {
    let minutes = env_u64("WEBWAKA_CHAOS_MINUTES");
    let steps = env_u64("WEBWAKA_CHAOS_STEPS").unwrap_or(30);
    let log_dir = log_dir();
    let what = if cluster {
        "chaos (3 instances)"
    } else {
        "chaos"
    };
    let started = std::time::Instant::now();
    let mut total = Stats::default();
    let mut iterations = 0u64;
    loop {
        let seed = match (iterations, env_u64("WEBWAKA_CHAOS_SEED")) {
            (0, Some(seed)) => seed,
            _ => rand::random(),
        };
        let log = log_dir
            .as_ref()
            .map(|d| d.join(format!("chaos-{seed}.log")));
        if let Some(path) = &log {
            *LOG_FILE.lock().unwrap() = Some(std::fs::File::create(path).unwrap());
        }
        let stats = scenario(seed, steps, cluster).await;
        // Held: its log is not needed (a failure panics above and keeps it).
        if let Some(path) = &log {
            *LOG_FILE.lock().unwrap() = None;
            let _ = std::fs::remove_file(path);
        }
        iterations += 1;
        eprintln!(
            "{what}: scenario {iterations} (seed {seed}) held: {} faults, {} deliveries, {} \
             operations, {} transactions checked",
            stats.faults, stats.messages, stats.operations, stats.transactions
        );
        total.faults += stats.faults;
        total.messages += stats.messages;
        total.operations += stats.operations;
        total.transactions += stats.transactions;
        total.entities += stats.entities;
        let budget = Duration::from_secs(minutes.unwrap_or(0) * 60);
        if started.elapsed() >= budget {
            break;
        }
    }
    eprintln!(
        "{what}: {iterations} scenarios of {steps} steps in {:.1} min: {} faults injected; \
         checked {} message deliveries, {} entity operations, {} transactions, {} entity \
         replicas; 0 violations",
        started.elapsed().as_secs_f64() / 60.0,
        total.faults,
        total.messages,
        total.operations,
        total.transactions,
        total.entities
    );
}

/// One seeded scenario; panics (with the seed and the history) on a violation.
/// Schedules that once broke an invariant, replayed in every run (their timing is not
/// reproduced exactly: each failed most runs before its fix).
///
/// - 3818896131717837062 (the 30-minute soak, 2026-11-27): a client without a cursor
///   got a poll answered before its WebSocket was registered (the poll waited in a
///   frozen proxy), connected without `lastEventId`, and took the late page for its
///   catch-up: the events committed in between were never delivered. Fixed by
///   catching up every connection opened without a cursor, after `connected`.
const REGRESSION_SEEDS: [u64; 1] = [3_818_896_131_717_837_062];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_that_once_failed_hold() {
    for seed in REGRESSION_SEEDS {
        let stats = scenario(seed, 30, false).await;
        eprintln!(
            "chaos: regression seed {seed} held: {} faults, {} \
             deliveries",
            stats.faults, stats.messages
        );
    }
}

/// One scenario's server side: one server (the run's engine), or three instances on a
/// private PostgreSQL cluster behind a load balancer.
enum Deployment {
    Single(TestServer),
    Cluster {
        pg: PgCluster,
        children: Children,
        balancer: Proxy,
        /// Instances killed, and the step at which each comes back.
        down: Vec<(usize, u64)>,
    },
}

impl Deployment {
    async fn start(cluster: bool, dir: &std::path::Path) -> Self {
        if !cluster {
            let server = TestServer::start_with(&dir.join("server"), |c| {
                c.reconciliation_counter_types = "counter".into();
                c.transaction_confirm_delay_ms = 20;
                c.chaos = true;
            })
            .await;
            return Deployment::Single(server);
        }
        let pg = PgCluster::start();
        let database = webwaka_server_stub::testing::fresh_database(&pg.url)
            .await
            .unwrap();
        let children = Children::start_with(
            std::path::Path::new(env!("CARGO_BIN_EXE_server_child")),
            &database,
            3,
            &[
                ("CHAOS", "1"),
                ("RECONCILIATION_COUNTER_TYPES", "counter"),
                ("TRANSACTION_CONFIRM_DELAY_MS", "20"),
            ],
        );
        let balancer = Proxy::balance(children.addrs(), Balance::RoundRobin)
            .await
            .unwrap();
        Deployment::Cluster {
            pg,
            children,
            balancer,
            down: Vec::new(),
        }
    }

    /// Where clients connect.
    fn entry(&self) -> std::net::SocketAddr {
        match self {
            Deployment::Single(server) => server.addr,
            Deployment::Cluster { balancer, .. } => balancer.addr(),
        }
    }

    fn keys(&self) -> Keys {
        match self {
            Deployment::Single(server) => server.keys(),
            Deployment::Cluster { .. } => webwaka_e2e::cluster::keys(),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.entry())
    }

    /// The chaos switch: in process, or over HTTP on a running instance (it tells the
    /// others).
    fn chaos(&self) -> Switch {
        match self {
            Deployment::Single(server) => Switch::Local(server.chaos().expect("chaos is on")),
            Deployment::Cluster { children, .. } => {
                let up = (0..3).find(|i| children.is_up(*i)).unwrap_or(0);
                Switch::Http(children.url(up))
            }
        }
    }

    async fn stop(self) {
        match self {
            Deployment::Single(mut server) => server.stop().await,
            Deployment::Cluster { mut children, .. } => {
                for i in 0..3 {
                    children.stop(i);
                }
            }
        }
    }
}

/// The chaos switch of a deployment.
enum Switch {
    Local(ChaosControl),
    Http(String),
}

impl Switch {
    fn admin() -> String {
        webwaka_e2e::cluster::token("t1", "chaos-admin", &["admin"])
    }

    async fn update(&self, change: impl FnOnce(&mut ChaosSettings)) {
        match self {
            Switch::Local(control) => control.update(change).unwrap(),
            Switch::Http(url) => {
                let http = reqwest::Client::new();
                let state: Value = match http
                    .get(format!("{url}/api/admin/chaos"))
                    .bearer_auth(Self::admin())
                    .send()
                    .await
                {
                    Ok(r) => r.json().await.unwrap_or(Value::Null),
                    Err(_) => return,
                };
                let mut settings: ChaosSettings = serde_json::from_value(json!({
                    "refuseWebSocket": state["refuseWebSocket"],
                    "latencyMs": state["latencyMs"],
                    "jitterMs": state["jitterMs"],
                    "httpFailures": state["httpFailures"],
                    "dropAcks": state["dropAcks"],
                    "reconcileTimeout": state["reconcileTimeout"],
                }))
                .unwrap_or_default();
                change(&mut settings);
                let _ = http
                    .put(format!("{url}/api/admin/chaos"))
                    .bearer_auth(Self::admin())
                    .json(&settings)
                    .send()
                    .await;
            }
        }
    }

    async fn post(&self, path: &str, body: Value) {
        if let Switch::Http(url) = self {
            let _ = reqwest::Client::new()
                .post(format!("{url}/api/admin/chaos/{path}"))
                .bearer_auth(Self::admin())
                .json(&body)
                .send()
                .await;
        }
    }

    async fn fail_http(&self, failures: HttpFailures) {
        self.update(|s| s.http_failures = Some(failures)).await;
    }

    async fn drop_acks(&self, drop: DropAcks) {
        self.update(|s| s.drop_acks = Some(drop)).await;
    }

    async fn reconcile_timeout(&self) {
        self.update(|s| s.reconcile_timeout = true).await;
    }

    async fn drop_connections(&self, user: &str) {
        match self {
            Switch::Local(control) => {
                control.drop_connections(ChaosTarget::User { tenant: "t1", user });
            }
            Switch::Http(_) => self.post("drop-connections", json!({"userId": user})).await,
        }
    }

    async fn expire_tokens(&self) {
        match self {
            Switch::Local(control) => {
                control.expire_tokens();
            }
            Switch::Http(_) => self.post("expire-tokens", Value::Null).await,
        }
    }

    async fn reset(&self) {
        match self {
            Switch::Local(control) => control.reset(),
            Switch::Http(url) => {
                let _ = reqwest::Client::new()
                    .delete(format!("{url}/api/admin/chaos"))
                    .bearer_auth(Self::admin())
                    .send()
                    .await;
            }
        }
    }
}

async fn scenario(seed: u64, steps: u64, cluster: bool) -> Stats {
    let mut stats = Stats::default();
    let mut rng = StdRng::seed_from_u64(seed);
    let mode = if cluster { "3 instances" } else { "1 server" };
    let mut history: Vec<String> = vec![format!("seed {seed}, {steps} steps, {mode}")];
    let dir = tempfile::tempdir().unwrap();
    let mut server = Deployment::start(cluster, dir.path()).await;

    let mut nodes = Vec::new();
    for user in USERS {
        nodes.push(open_node(server.entry(), server.keys(), dir.path(), user).await);
    }
    for node in &nodes {
        assert!(
            wait_state(
                &node.client,
                ConnectionState::Realtime,
                Duration::from_secs(15)
            )
            .await
        );
        node.client.join_room(ROOM).await.unwrap();
    }
    // Everyone is in the room before the first room message; the counters exist
    // everywhere (at 0) before the first increment, so that every later write is a delta.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for counter in COUNTERS {
        nodes[0]
            .client
            .create_entity("counter", counter, json!({ "v": 0 }))
            .await
            .unwrap();
    }
    for node in &nodes {
        let ready = wait_until(Duration::from_secs(15), || async {
            let mut all = true;
            for counter in COUNTERS {
                all &= node
                    .client
                    .entity("counter", counter)
                    .await
                    .unwrap()
                    .is_some_and(|e| e.pending.is_empty());
            }
            all
        })
        .await;
        assert!(ready, "the counters reached {}", node.user);
    }

    // What the SDK calls accepted.
    let mut sent: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
    let mut deltas: HashMap<&str, i64> = HashMap::new();
    let mut transactions: Vec<(usize, String)> = Vec::new();
    let mut next_n = 0u64;

    for step in 0..steps {
        // Killed instances due back.
        if let Deployment::Cluster { children, down, .. } = &mut server {
            down.retain(|(i, back)| {
                if *back <= step {
                    children.restart(*i);
                    false
                } else {
                    true
                }
            });
        }
        // A fault, or a repair (with several instances, also kills and database
        // restarts: the single server's schedules stay as they were).
        let victim = rng.random_range(0..nodes.len());
        let fault = rng.random_range(0..if cluster { 19 } else { 16 });
        let chaos = server.chaos();
        let what = match fault {
            0 => {
                nodes[victim].proxy.set_mode(Mode::RefuseWebSocket);
                nodes[victim].proxy.cut_all();
                "refuse WebSocket + cut".to_owned()
            }
            1 => {
                nodes[victim].proxy.set_mode(Mode::Refuse);
                nodes[victim].proxy.cut_all();
                "refuse everything + cut".to_owned()
            }
            2 => {
                nodes[victim].proxy.set_mode(Mode::BlackHole);
                nodes[victim].proxy.cut_all();
                "black hole + cut".to_owned()
            }
            3 => {
                nodes[victim].proxy.freeze_all(true);
                "freeze".to_owned()
            }
            4 => {
                let ms = rng.random_range(10..200);
                nodes[victim].proxy.set_latency(Duration::from_millis(ms));
                format!("latency {ms} ms")
            }
            5 if rng.random_bool(0.4) => match &mut server {
                Deployment::Single(server) => {
                    server.restart().await;
                    "server restart".to_owned()
                }
                Deployment::Cluster { children, .. } => {
                    let i = rng.random_range(0..3);
                    if children.is_up(i) {
                        children.stop(i);
                        children.restart(i);
                    }
                    format!("instance {i} restarted")
                }
            },
            6 => {
                nodes[victim].proxy.reset_all();
                "reset (RST)".to_owned()
            }
            7 => {
                let bps = rng.random_range(2_000..50_000);
                nodes[victim].proxy.set_throttle(Some(bps));
                format!("throttle {bps} B/s")
            }
            8 => {
                let fraction = rng.random_range(0.1..0.4);
                let status = [500, 503, 429][rng.random_range(0..3)];
                chaos
                    .fail_http(HttpFailures {
                        fraction,
                        status,
                        seed: rng.random(),
                    })
                    .await;
                format!(
                    "server: {status} on {:.0} % of HTTP requests",
                    fraction * 100.0
                )
            }
            9 => {
                let fraction = rng.random_range(0.2..0.5);
                chaos
                    .drop_acks(DropAcks {
                        fraction,
                        seed: rng.random(),
                    })
                    .await;
                format!("server: drop {:.0} % of acknowledgements", fraction * 100.0)
            }
            10 => {
                chaos.reconcile_timeout().await;
                "server: reconciliation times out".to_owned()
            }
            11 if rng.random_bool(0.5) => {
                chaos.drop_connections(nodes[victim].user).await;
                "server: drop the user's connections".to_owned()
            }
            11 => {
                chaos.expire_tokens().await;
                "server: expire every token".to_owned()
            }
            16 | 18 => {
                let i = rng.random_range(0..3);
                let back = step
                    + if fault == 18 {
                        0
                    } else {
                        rng.random_range(1..4)
                    };
                if let Deployment::Cluster { children, down, .. } = &mut server
                    && children.is_up(i)
                {
                    children.kill(i);
                    if back == step {
                        children.restart(i);
                    } else {
                        down.push((i, back));
                    }
                }
                format!("SIGKILL instance {i}, back at step {back}")
            }
            17 => {
                let how = if rng.random_bool(0.5) {
                    "fast"
                } else {
                    "immediate"
                };
                let ms = rng.random_range(200..2_000);
                if let Deployment::Cluster { pg, .. } = &server {
                    pg.stop(how);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    pg.restart();
                }
                format!("PostgreSQL stopped ({how}) for {ms} ms")
            }
            _ => {
                let p = &nodes[victim].proxy;
                p.set_mode(Mode::Pass);
                p.freeze_all(false);
                p.set_latency(Duration::ZERO);
                p.set_throttle(None);
                if rng.random_bool(0.3) {
                    chaos.reset().await;
                    "heal + server chaos off".to_owned()
                } else {
                    "heal".to_owned()
                }
            }
        };
        if !what.starts_with("heal") {
            stats.faults += 1;
        }
        history.push(format!("step {step}: {what} ({})", nodes[victim].user));

        // Random work by every client.
        for (i, node) in nodes.iter().enumerate() {
            for _ in 0..rng.random_range(1..4) {
                let kind = rng.random_range(0..10);
                match kind {
                    0..=3 => {
                        let (target, key) = if rng.random_bool(0.5) {
                            (Target::Room(ROOM.into()), format!("#{ROOM}"))
                        } else {
                            let to = USERS[(i + 1 + rng.random_range(0..2)) % USERS.len()];
                            (Target::User(to.into()), format!("@{to}"))
                        };
                        next_n += 1;
                        let message = OutgoingMessage::new(target, "chat", json!({ "n": next_n }));
                        if node.client.send_message(message).await.is_ok() {
                            sent.entry((node.user.to_owned(), key))
                                .or_default()
                                .push(next_n);
                        }
                    }
                    4 => {
                        // Class A: sent if live, else refused at once; never stored.
                        let _ = node.client.set_presence(PresenceStatus::Online, None).await;
                        let _ = node
                            .client
                            .send_live(Target::Room(ROOM.into()), "typing", json!({}))
                            .await;
                    }
                    5..=7 => {
                        let counter = COUNTERS[rng.random_range(0..COUNTERS.len())];
                        let delta = rng.random_range(-5i64..10);
                        if node
                            .client
                            .update_entity("counter", counter, json!({ "v": delta }))
                            .await
                            .is_ok()
                        {
                            *deltas.entry(counter).or_default() += delta;
                            stats.operations += 1;
                        }
                    }
                    8 => {
                        let doc = DOCS[rng.random_range(0..DOCS.len())];
                        let _ = node
                            .client
                            .update_entity("doc", doc, json!({ node.user: step }))
                            .await;
                    }
                    _ => {
                        let item = node
                            .client
                            .submit_transaction("payment", json!({ "amount": step }), None)
                            .await
                            .unwrap();
                        transactions.push((i, item.id));
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..600))).await;
    }

    // The network heals, every instance is back, and chaos is off everywhere.
    history.push("heal all".into());
    if let Deployment::Cluster { children, down, .. } = &mut server {
        for (i, _) in down.drain(..) {
            children.restart(i);
        }
        for i in 0..3 {
            Switch::Http(children.url(i)).reset().await;
        }
    } else {
        server.chaos().reset().await;
    }
    for node in &nodes {
        node.proxy.set_mode(Mode::Pass);
        node.proxy.freeze_all(false);
        node.proxy.set_latency(Duration::ZERO);
        node.proxy.set_throttle(None);
        node.client.network_available();
    }
    let report = |why: &str, history: &[String]| -> String {
        format!(
            "{why}\nreplay with WEBWAKA_CHAOS_SEED={seed} WEBWAKA_CHAOS_STEPS={steps}\nhistory:\n  {}",
            history.join("\n  ")
        )
    };

    // Outboxes drain (nothing persisted, in flight or dead; transactions decided).
    for node in &nodes {
        let drained = wait_until(Duration::from_secs(60), || async {
            let items = node.client.outbox(None).await.unwrap();
            items.iter().all(is_settled)
        })
        .await;
        let left: Vec<_> = node
            .client
            .outbox(None)
            .await
            .unwrap()
            .into_iter()
            .filter(|i| !is_settled(i))
            .map(|i| {
                // When it was last changed and when it is due, from now: a retry
                // schedule that ran late, or one never run, tell different stories.
                let now = chrono::Utc::now();
                format!(
                    "{:?} {:?} {:?}, {} attempts, updated {} ms ago, due in {} ms",
                    i.kind,
                    i.state,
                    i.last_error,
                    i.attempts,
                    (now - i.updated_at).num_milliseconds(),
                    (i.next_attempt_at - now).num_milliseconds()
                )
            })
            .collect();
        let metrics = if drained {
            String::new()
        } else {
            format!("{:?}", node.client.metrics().await)
        };
        assert!(
            drained,
            "{}",
            report(
                &format!("{}'s outbox did not drain: {left:?}\n{metrics}", node.user),
                &history
            )
        );
        // No Class A item was ever stored: only messages, operations and transactions.
        assert!(
            node.client
                .outbox(None)
                .await
                .unwrap()
                .iter()
                .all(|i| { i.kind != ItemKind::Message || i.body["type"] == "chat" })
        );
    }

    // Messages: exactly once, in order, to every recipient.
    let _all_delivered = wait_until(Duration::from_secs(30), || async {
        nodes
            .iter()
            .all(|node| expected_inbox(node.user, &sent) == *node.inbox.lock().unwrap())
    })
    .await;
    for node in &nodes {
        let got = node.inbox.lock().unwrap().clone();
        let want = expected_inbox(node.user, &sent);
        stats.messages += want.values().map(|v| v.len() as u64).sum::<u64>();
        assert!(
            got == want,
            "{}",
            report(
                &format!("{} received {got:?}\nexpected {want:?}", node.user),
                &history
            )
        );
    }

    // Transactions: each confirmed, with one server id.
    stats.transactions = transactions.len() as u64;
    for (i, id) in &transactions {
        let item = nodes[*i].client.item(id).await.unwrap().unwrap();
        assert_eq!(
            item.state,
            ItemState::Confirmed,
            "{}",
            report(&format!("transaction {id} is {:?}", item.state), &history)
        );
        assert!(item.server_ref.is_some());
    }

    // Entities: every replica equals the server's snapshot; counters add up.
    let http = reqwest::Client::new();
    let token = server.keys().mint("t1", "ana", &[], 3600);
    for (entity_type, ids) in [("counter", &COUNTERS[..]), ("doc", &DOCS[..])] {
        for id in ids {
            let url = format!(
                "{}/api/reconciliation/snapshot/{entity_type}/{id}",
                server.url()
            );
            let resp = http.get(&url).bearer_auth(&token).send().await.unwrap();
            if resp.status() == 404 {
                continue; // never written
            }
            let snapshot: StateSnapshot = resp.json().await.unwrap();
            let converged = wait_until(Duration::from_secs(20), || async {
                let mut all = true;
                for node in &nodes {
                    node.client.sync_entities().unwrap();
                    let value = node.client.entity(entity_type, *id).await.unwrap();
                    all &= value
                        .is_some_and(|e| e.value.data == snapshot.data && e.pending.is_empty());
                }
                all
            })
            .await;
            let values: Vec<Option<Value>> = {
                let mut v = Vec::new();
                for node in &nodes {
                    v.push(
                        node.client
                            .entity(entity_type, *id)
                            .await
                            .unwrap()
                            .map(|e| e.value.data),
                    );
                }
                v
            };
            assert!(
                converged,
                "{}",
                report(
                    &format!(
                        "{entity_type}/{id}: server {} but replicas {values:?}",
                        snapshot.data
                    ),
                    &history
                )
            );
        }
    }
    for counter in COUNTERS {
        let entity = nodes[0]
            .client
            .entity("counter", counter)
            .await
            .unwrap()
            .unwrap();
        let value = entity.value.data["v"].as_i64().unwrap_or(i64::MIN);
        let want = deltas.get(counter).copied().unwrap_or(0);
        assert_eq!(
            value,
            want,
            "{}",
            report(
                &format!("counter {counter}: every delta exactly once"),
                &history
            )
        );
    }

    stats.entities = (nodes.len() * (COUNTERS.len() + DOCS.len())) as u64;
    for node in &nodes {
        node.client.shutdown().await;
    }
    server.stop().await;
    stats
}

/// Who should have received what: room messages go to every member but the sender;
/// direct messages to their recipient.
fn expected_inbox(
    user: &str,
    sent: &BTreeMap<(String, String), Vec<u64>>,
) -> BTreeMap<(String, String), Vec<u64>> {
    sent.iter()
        .filter(|((sender, target), _)| {
            sender != user && (target == &format!("#{ROOM}") || target == &format!("@{user}"))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}
