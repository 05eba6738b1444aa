//! Server benchmarks (issue 4, "Performance"): the real server on loopback, driven by
//! raw tokio-tungstenite clients and a minimal HTTP/1.1 client speaking the protocol.
//!
//! The server runs in a child process (this bench binary run again with
//! `WEBWAKA_BENCH_CHILD=server`: the same `webwaka_server_stub::Server` as the release
//! binary, on a default multi-threaded tokio runtime like `main.rs`), so that its CPU
//! time (`/proc/PID/stat`, utime + stime) and resident memory (`VmRSS`) are its own and
//! nobody else's. The raw WebSocket baseline (a tokio-tungstenite relay) runs in a
//! child process of the same kind (`WEBWAKA_BENCH_CHILD=relay`), so both sides of each
//! comparison are measured the same way in the same run.
//!
//! Figures: message round trip p50/p99 against the raw relay; messages per second with
//! 100 connections and server CPU per message; fan-out of one room message to 1,000
//! members; polls per second with 50 keep-alive clients; memory per idle connection at
//! 10,000 connections; memory per silent connection (connected, nothing sent) and how
//! many the server holds before it sheds. Every wait is bounded in time and every loop in count; every
//! child is stopped (killed when it does not stop) also when a benchmark fails.

use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use webwaka_realtime::protocol::{ClientEvent, InteractionClass, SendMessage, ServerEvent};
use webwaka_server_stub::{Config, Keys, Options, Server};

use super::{Row, fmt_rate, median, percentile, sorted, wanted};

/// The environment variable that turns the bench binary into a child process (the
/// same variable the client benchmarks use for their memory probe).
pub const CHILD_ENV: &str = "WEBWAKA_BENCH_CHILD";

/// `WEBWAKA_BENCH_CHILD` value: run the server.
pub const CHILD_SERVER: &str = "server";
/// `WEBWAKA_BENCH_CHILD` value: run the raw tokio-tungstenite relay.
pub const CHILD_RELAY: &str = "relay";
/// The server child's data directory.
const DIR_ENV: &str = "WEBWAKA_BENCH_SERVER_DIR";
/// Names the server benchmarks to run (`roundtrip,throughput,fanout,poll,idle,silent`, or
/// `live` / `durable` for one class of `throughput`; all when unset), and makes each
/// child's pid visible on stderr (for `perf`).
pub const ONLY_ENV: &str = "WEBWAKA_BENCH_SERVER";
/// The JWT secret of the server child.
pub(super) const SECRET: &str = "server-bench-secret-0123456789abcdef";
/// Every benchmark user is in this tenant.
pub(super) const TENANT: &str = "bench";

/// Round trips measured per path (after [`WARMUP`] unmeasured ones).
pub(super) const ROUND_TRIPS: usize = 2_000;
pub(super) const WARMUP: usize = 200;
/// Rounds the round trips are measured in (each path in turn).
pub(super) const ROUNDS: usize = 20;
/// Runs of the throughput and poll benchmarks (each on a fresh server; the median is
/// reported with the range).
pub(super) const RUNS: usize = 3;
/// Connections of the throughput benchmark, messages each sends, and how many of its
/// messages may await their `message_ack` at once.
pub(super) const THROUGHPUT_CONNS: usize = 100;
pub(super) const THROUGHPUT_PER_CONN: usize = 1_000;
pub(super) const THROUGHPUT_WINDOW: usize = 16;
/// Members of the fan-out room, and the messages sent to it (one at a time).
pub(super) const FANOUT_MEMBERS: usize = 1_000;
pub(super) const FANOUT_RUNS: usize = 21;
/// Keep-alive HTTP clients polling, and how long they poll (after a warm-up).
pub(super) const POLL_CLIENTS: usize = 50;
const POLL_WARMUP: Duration = Duration::from_millis(500);
const POLL_TIME: Duration = Duration::from_secs(3);
/// Idle connections held, and what the issue asks to extrapolate to.
const IDLE_CONNS: usize = 10_000;
const IDLE_EXTRAPOLATE: usize = 50_000;
/// Idle connections opened before the memory baseline (runtime threads, caches).
const IDLE_WARM: usize = 100;
/// Silent connections opened past the server's cap (each must be closed at accept).
const SILENT_PAST_CAP: usize = 200;
/// Silent connections opened and closed before the memory baseline.
const SILENT_WARM: usize = 100;
/// Connections opened at once while setting up many.
const CONNECT_BATCH: usize = 100;
/// The longest any single wait of a benchmark may take.
const WAIT: Duration = Duration::from_secs(20);

/// A WebSocket client connection.
pub(super) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

// ---------------------------------------------------------------------------------
// The child processes
// ---------------------------------------------------------------------------------

/// The child side: runs the server or the relay until its stdin closes. Prints
/// `addr=IP:PORT` on stdout once it listens.
pub fn child(kind: &str) -> Result<(), String> {
    // The same runtime as `main.rs`: multi-threaded, one worker per core.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let stop = stdin_closed();
        match kind {
            CHILD_SERVER => {
                let dir = std::env::var(DIR_ENV).map_err(|_| format!("{DIR_ENV} is not set"))?;
                let mut config = server_config(Path::new(&dir));
                super::postgres::configure_child(&mut config).await?;
                webwaka_server_stub::telemetry::init(&config);
                let server = Server::bind(config, Options::default())
                    .await
                    .map_err(|e| e.to_string())?;
                announce(server.local_addr())?;
                server
                    .run(async move {
                        let _ = stop.await;
                    })
                    .await;
                Ok(())
            }
            CHILD_RELAY => {
                let listener = TcpListener::bind(("127.0.0.1", 0))
                    .await
                    .map_err(|e| e.to_string())?;
                announce(listener.local_addr().map_err(|e| e.to_string())?)?;
                tokio::select! {
                    _ = stop => {}
                    () = relay(listener) => {}
                }
                Ok(())
            }
            other => Err(format!("unknown child kind {other:?}")),
        }
    })
}

/// The server's settings in the benchmark: the defaults, on a free loopback port, with
/// the per-user message limit off (each benchmark user sends far more than 100 a
/// minute) and the poll limit raised out of the way (it is still checked).
fn server_config(dir: &Path) -> Config {
    let mut config = Config::new(dir);
    config.port = 0;
    config.jwt_secret = Some(SECRET.to_owned());
    config.message_rate_limit = 0;
    config.poll_rate_limit = 1_000_000_000;
    config.reconciliation_rate_limit = 0;
    config.log_level = "warn".to_owned();
    if let Some(bytes) = std::env::var(TAIL_ENV).ok().and_then(|v| v.parse().ok()) {
        config.event_bus_tail_bytes = bytes;
    }
    // The reconcile part's setting, as the server binary reads it.
    if let Ok(parallel) = std::env::var("RECONCILIATION_PARALLEL") {
        config.reconciliation_parallel = parallel != "false";
    }
    config
}

/// Set on a server child: `EVENT_BUS_TAIL_BYTES` for it (the poll benchmark's SQLite
/// row sets 0).
const TAIL_ENV: &str = "WEBWAKA_BENCH_TAIL_BYTES";

/// Prints the address the parent waits for.
fn announce(addr: SocketAddr) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "addr={addr}").map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())
}

/// Completes when stdin reaches its end: the parent closed it, or died.
fn stdin_closed() -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        let _ = tx.send(());
    });
    rx
}

/// The raw relay: connections come in pairs (sender, then recipient); every frame the
/// sender sends is written to the recipient by the same task. Nothing else.
async fn relay(listener: TcpListener) {
    // One handshake at a time: the sender's completes before the recipient connects.
    // The parent opens a handful of connections; a failed handshake ends that pair.
    loop {
        let (Some(mut a), Some(mut b)) = (handshake(&listener).await, handshake(&listener).await)
        else {
            // Not a pair: wait a little (an accept error may repeat) and start over.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            while let Some(Ok(message)) = a.next().await {
                if message.is_close() || b.send(message).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Accepts one connection and completes its WebSocket handshake (bounded in time).
async fn handshake(listener: &TcpListener) -> Option<WebSocketStream<TcpStream>> {
    let (stream, _) = listener.accept().await.ok()?;
    let _ = stream.set_nodelay(true);
    tokio::time::timeout(WAIT, tokio_tungstenite::accept_async(stream))
        .await
        .ok()?
        .ok()
}

/// A child process (server or relay), stopped when dropped: stdin closed, then killed
/// if it has not exited within a few seconds.
pub(super) struct ChildProc {
    child: Child,
    stdin: Option<ChildStdin>,
    pub(super) addr: SocketAddr,
    /// The server's data directory (removed after the child).
    _dir: Option<tempfile::TempDir>,
}

impl ChildProc {
    /// Starts this binary as a `kind` child and waits for its address.
    pub(super) fn spawn(kind: &str) -> Result<Self, String> {
        Self::spawn_with(kind, &[])
    }

    /// [`ChildProc::spawn`] with extra environment variables for the child (a server
    /// child also gets the engine settings of [`super::postgres::Engine::env`]).
    pub(super) fn spawn_with(kind: &str, env: &[(&str, &str)]) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let dir = if kind == CHILD_SERVER {
            Some(tempfile::tempdir().map_err(|e| e.to_string())?)
        } else {
            None
        };
        let mut command = Command::new(exe);
        if kind == CHILD_SERVER {
            command.envs(super::postgres::engine_env());
        }
        command
            .envs(env.iter().copied())
            .env(CHILD_ENV, kind)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(dir) = &dir {
            command.env(DIR_ENV, dir.path());
        }
        let mut child = command.spawn().map_err(|e| e.to_string())?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        // From here on, `proc` kills the child if anything fails.
        let mut proc = Self {
            child,
            stdin,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            _dir: dir,
        };
        let stdout = stdout.ok_or("the child has no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Read the address, then keep draining so the child never blocks on stdout.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.trim().strip_prefix("addr=") {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(WAIT)
            .map_err(|_| format!("the {kind} child did not say where it listens"))?;
        proc.addr = addr
            .parse()
            .map_err(|e| format!("bad address {addr}: {e}"))?;
        if std::env::var_os(ONLY_ENV).is_some() {
            eprintln!("bench: {kind} child pid {} on {}", proc.pid(), proc.addr);
        }
        Ok(proc)
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time (user + system) the child used so far, in seconds.
    pub(super) fn cpu_secs(&self) -> Result<f64, String> {
        proc_cpu_secs(self.pid()).map(|(cpu, _)| cpu)
    }

    /// The child's resident memory, in KiB.
    pub(super) fn rss_kib(&self) -> Result<u64, String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .map_err(|e| e.to_string())?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| "no VmRSS".to_owned())
    }

    /// Stops the child: closes its stdin (it shuts down gracefully), waits up to 10 s,
    /// then kills it.
    pub(super) fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.shut();
        }
    }
}

/// CPU time (user + system) process `pid` used so far, in seconds, and its parent.
pub(super) fn proc_cpu_secs(pid: u32) -> Result<(f64, u32), String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    // Fields after the command name (which is in parentheses and may hold spaces):
    // state is field 3, ppid field 4, utime field 14, stime field 15.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or("unreadable /proc/PID/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| -> Result<u64, String> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| "unreadable /proc/PID/stat".to_owned())
    };
    let ppid = u32::try_from(field(4)?).unwrap_or(0);
    Ok((
        (field(14)? + field(15)?) as f64 / clock_ticks_per_sec(),
        ppid,
    ))
}

/// `getconf CLK_TCK` (the unit of `/proc/PID/stat` times); 100 when unknown.
pub(super) fn clock_ticks_per_sec() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

// ---------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------

/// A token of the server child for `user`.
pub(super) fn token(user: &str) -> String {
    Keys::new(SECRET.as_bytes(), 0).mint(TENANT, user, &[], 86_400)
}

/// Client settings: small buffers (thousands of these live in this process).
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Opens a WebSocket to the server as `user` and reads `connected`.
pub(super) async fn connect_user(addr: SocketAddr, user: &str) -> Result<Ws, String> {
    let url = format!("ws://{addr}/ws?token={}&clientId={user}", token(user));
    let (mut ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true),
    )
    .await
    .map_err(|_| format!("{user}: connect timed out"))?
    .map_err(|e| format!("{user}: {e}"))?;
    match next_event(&mut ws).await? {
        ServerEvent::Connected(_) => Ok(ws),
        other => Err(format!("{user}: expected connected, got {}", other.name())),
    }
}

/// Opens a WebSocket to the raw relay.
pub(super) async fn connect_raw(addr: SocketAddr) -> Result<Ws, String> {
    let url = format!("ws://{addr}/");
    let (ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true),
    )
    .await
    .map_err(|_| "relay: connect timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// The next text frame's text (pings are answered by tungstenite and skipped).
async fn next_text(ws: &mut Ws) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    for _ in 0..1_000 {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err("no frame in time".into()),
            Ok(None) => return Err("connection closed".into()),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(Some(Ok(Message::Text(text)))) => return Ok(text.as_str().to_owned()),
            Ok(Some(Ok(Message::Close(frame)))) => return Err(format!("closed: {frame:?}")),
            Ok(Some(Ok(_))) => {}
        }
    }
    Err("only control frames".into())
}

/// The next server event, decoded with core's decoder.
async fn next_event(ws: &mut Ws) -> Result<ServerEvent, String> {
    let text = next_text(ws).await?;
    ServerEvent::decode(&text)
        .map(|(event, _)| event)
        .map_err(|e| e.to_string())
}

/// Reads until an event named `name` (skipping presence and the like).
pub(super) async fn expect_event(ws: &mut Ws, name: &str) -> Result<ServerEvent, String> {
    for _ in 0..10_000 {
        let event = next_event(ws).await?;
        if event.name() == name {
            return Ok(event);
        }
        if let ServerEvent::Error(body) = &event {
            return Err(format!("expected {name}, got error {body}"));
        }
    }
    Err(format!("no {name} within 10,000 frames"))
}

/// A `message` frame from the client, encoded with core's encoder.
pub(super) fn message_frame(
    id: &str,
    class: InteractionClass,
    recipient: Option<&str>,
    room: Option<&str>,
) -> String {
    ClientEvent::Message(SendMessage {
        message_id: Some(id.to_owned()),
        message_type: "chat.text".to_owned(),
        interaction_class: class,
        recipient_id: recipient.map(str::to_owned),
        room_id: room.map(str::to_owned),
        payload: json!({"text": "hello, this is a benchmark message"}),
        metadata: None,
    })
    .encode(Some(id))
}

/// Opens `n` connections (users `{prefix}{i}`), [`CONNECT_BATCH`] at a time.
async fn connect_many(addr: SocketAddr, prefix: &str, n: usize) -> Result<Vec<Ws>, String> {
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let end = (start + CONNECT_BATCH).min(n);
        let mut set = tokio::task::JoinSet::new();
        for i in start..end {
            let user = format!("{prefix}{i}");
            set.spawn(async move { (i, connect_user(addr, &user).await) });
        }
        let mut batch = Vec::with_capacity(end - start);
        while let Some(joined) = set.join_next().await {
            let (i, ws) = joined.map_err(|e| e.to_string())?;
            batch.push((i, ws?));
        }
        batch.sort_by_key(|(i, _)| *i);
        out.extend(batch.into_iter().map(|(_, ws)| ws));
        start = end;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------
// The benchmarks
// ---------------------------------------------------------------------------------

/// Runs the server benchmarks.
pub fn run() -> Result<Vec<Row>, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // `WEBWAKA_BENCH_SERVER=poll,idle` runs only those (for profiling one of them).
    let only = std::env::var(ONLY_ENV).unwrap_or_default();
    let wanted = |name: &str| wanted(ONLY_ENV, name);
    runtime.block_on(async {
        let mut rows = Vec::new();
        if wanted("roundtrip") {
            rows.extend(round_trip().await?);
        }
        // `live` or `durable` alone: one class of the throughput benchmark.
        let classes: Vec<_> = [
            ("CLASS_C (durable)", InteractionClass::ClassC, "durable"),
            ("CLASS_A (live)", InteractionClass::ClassA, "live"),
        ]
        .into_iter()
        .filter(|(_, _, short)| wanted("throughput") || (!only.is_empty() && wanted(short)))
        .map(|(name, class, _)| (name, class))
        .collect();
        if !classes.is_empty() {
            rows.extend(throughput(&classes).await?);
        }
        if wanted("fanout") {
            rows.extend(fanout().await?);
        }
        if wanted("poll") {
            rows.extend(polls().await?);
        }
        if wanted("reconcile") {
            rows.extend(reconciles().await?);
        }
        if wanted("idle") {
            rows.extend(idle().await?);
        }
        if wanted("silent") {
            rows.extend(silent().await?);
        }
        // The same on PostgreSQL, and on several instances (a private cluster).
        if wanted("postgres") {
            rows.extend(super::postgres::run().await?);
        }
        Ok(rows)
    })
}

/// `count` messages one at a time from `sender` to `recipient`, the `i`-th made by
/// `next(first + i)`; the clock runs from the send to the recipient's read of the
/// frame. With `expect_ack`, the sender's `message_ack` is read after the clock stops.
pub(super) async fn round_trips(
    sender: &mut Ws,
    recipient: &mut Ws,
    next: impl Fn(usize) -> String,
    first: usize,
    count: usize,
    expect_ack: bool,
) -> Result<Vec<f64>, String> {
    let mut samples = Vec::with_capacity(count);
    for i in first..first + count {
        let frame = next(i);
        let t = Instant::now();
        sender
            .send(Message::Text(frame.into()))
            .await
            .map_err(|e| e.to_string())?;
        let text = next_text(recipient).await?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        if expect_ack {
            // Outside the clock: the delivery is a `message`, the sender gets its ack.
            if !text.contains("\"event\":\"message\"") {
                return Err(format!("expected a message, got {text}"));
            }
            expect_event(sender, "message_ack").await?;
        }
    }
    Ok(samples)
}

/// The three paths (raw relay, durable, live) measured in alternation, a slice of each
/// per round, so that all three meet the same load on a shared machine.
async fn round_trip() -> Result<Vec<Row>, String> {
    let relay = ChildProc::spawn(CHILD_RELAY)?;
    let server = ChildProc::spawn(CHILD_SERVER)?;
    let mut a = connect_raw(relay.addr).await?;
    let mut b = connect_raw(relay.addr).await?;
    let mut alice = connect_user(server.addr, "alice").await?;
    let mut bob = connect_user(server.addr, "bob").await?;
    let raw_frame = message_frame("m", InteractionClass::ClassC, Some("bob"), None);
    let raw_next = |_| raw_frame.clone();
    let durable_next = |i: usize| {
        message_frame(
            &format!("c-{i}"),
            InteractionClass::ClassC,
            Some("bob"),
            None,
        )
    };
    let live_next = |i: usize| {
        message_frame(
            &format!("a-{i}"),
            InteractionClass::ClassA,
            Some("bob"),
            None,
        )
    };
    // Warm-up, unmeasured.
    round_trips(&mut a, &mut b, raw_next, 0, WARMUP, false).await?;
    round_trips(&mut alice, &mut bob, durable_next, 0, WARMUP, true).await?;
    round_trips(&mut alice, &mut bob, live_next, 0, WARMUP, true).await?;
    let per_round = ROUND_TRIPS / ROUNDS;
    let (mut raw, mut durable, mut live) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let first = WARMUP + round * per_round;
        raw.extend(round_trips(&mut a, &mut b, raw_next, first, per_round, false).await?);
        durable
            .extend(round_trips(&mut alice, &mut bob, durable_next, first, per_round, true).await?);
        live.extend(round_trips(&mut alice, &mut bob, live_next, first, per_round, true).await?);
    }
    drop((a, b, alice, bob));
    relay.stop();
    server.stop();
    let (raw, durable, live) = (sorted(raw), sorted(durable), sorted(live));

    let (raw50, raw99) = (percentile(&raw, 0.5), percentile(&raw, 0.99));
    let row = |name: &str, s: &[f64]| {
        let (p50, p99) = (percentile(s, 0.5), percentile(s, 0.99));
        Row {
            name: name.into(),
            figure: format!(
                "p50 {p50:.0} µs ({:.2}× raw), p99 {p99:.0} µs ({:.2}× raw); target ≤ 1.3× / ≤ 2×",
                p50 / raw50,
                p99 / raw99
            ),
            method: format!(
                "{ROUND_TRIPS} direct messages one at a time (after {WARMUP} unmeasured), raw \
                 tokio-tungstenite clients speaking the protocol; clock from the sender's \
                 write to the recipient's read of the `message` frame; server in its own \
                 process; measured in {ROUNDS} rounds alternating with the baseline"
            ),
        }
    };
    Ok(vec![
        Row {
            name: "server: raw WebSocket relay (baseline)".into(),
            figure: format!("p50 {raw50:.0} µs, p99 {raw99:.0} µs"),
            method: format!(
                "{ROUND_TRIPS} frames (after {WARMUP}), client → tokio-tungstenite relay task \
                 in its own process → second client; same frame text, same rounds"
            ),
        },
        row(
            "server: round trip, CLASS_C (durable, stored first)",
            &durable,
        ),
        row("server: round trip, CLASS_A (live)", &live),
    ])
}

/// What one throughput run found.
pub(super) struct Throughput {
    pub(super) rate: f64,
    /// The servers' CPU per message.
    pub(super) cpu_us_per_message: f64,
    /// The rest's (the database's) CPU per message.
    pub(super) other_us_per_message: f64,
    pub(super) messages: usize,
}

/// [`THROUGHPUT_CONNS`] connections, each sending [`THROUGHPUT_PER_CONN`] direct
/// messages of `class` to the next user round the ring, at most
/// [`THROUGHPUT_WINDOW`] awaiting their ack; the clock runs until every message has
/// been delivered.
async fn throughput_run(class: InteractionClass) -> Result<Throughput, String> {
    let server = ChildProc::spawn(CHILD_SERVER)?;
    throughput_on(vec![server], class, || Ok(0.0)).await
}

/// [`throughput_run`] on `servers` (connection `i` on server `i % n`: with several
/// instances a message's sender and recipient are on different ones); `other_cpu` is
/// CPU seconds used so far by anything else that takes part (the database).
pub(super) async fn throughput_on(
    servers: Vec<ChildProc>,
    class: InteractionClass,
    other_cpu: impl Fn() -> Result<f64, String>,
) -> Result<Throughput, String> {
    let mut conns = Vec::with_capacity(THROUGHPUT_CONNS);
    for i in 0..THROUGHPUT_CONNS {
        let server = &servers[i % servers.len()];
        conns.push(connect_user(server.addr, &format!("t{i}")).await?);
    }
    let total = THROUGHPUT_CONNS * THROUGHPUT_PER_CONN;
    let delivered = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let servers_cpu = || -> Result<f64, String> {
        servers
            .iter()
            .map(ChildProc::cpu_secs)
            .sum::<Result<f64, String>>()
    };
    let cpu_before = servers_cpu()?;
    let other_before = other_cpu()?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, ws) in conns.into_iter().enumerate() {
        let (mut tx, mut rx) = ws.split();
        let window = Arc::new(tokio::sync::Semaphore::new(THROUGHPUT_WINDOW));
        let recipient = format!("t{}", (i + 1) % THROUGHPUT_CONNS);
        let w = Arc::clone(&window);
        tasks.spawn(async move {
            for _ in 0..THROUGHPUT_PER_CONN {
                let permit = tokio::time::timeout(WAIT, w.acquire())
                    .await
                    .map_err(|_| "no ack in time".to_owned())?
                    .map_err(|e| e.to_string())?;
                permit.forget();
                // A UUIDv7 id, as the SDK makes them.
                let id = uuid::Uuid::now_v7().to_string();
                let frame = message_frame(&id, class, Some(&recipient), None);
                tx.send(Message::Text(frame.into()))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        });
        let delivered = Arc::clone(&delivered);
        let done = Arc::clone(&done);
        tasks.spawn(async move {
            // Acks open the window; deliveries are counted. Each connection gets as many
            // of each as it sends.
            let (mut acks, mut messages) = (0, 0);
            while acks < THROUGHPUT_PER_CONN || messages < THROUGHPUT_PER_CONN {
                let frame = tokio::time::timeout(WAIT, rx.next()).await.map_err(|_| {
                    format!("conn {i}: stalled at {acks} acks, {messages} messages")
                })?;
                let Some(Ok(Message::Text(text))) = frame else {
                    match frame {
                        Some(Ok(_)) => continue,
                        _ => return Err(format!("conn {i}: closed")),
                    }
                };
                if text.starts_with("{\"event\":\"message_ack\"") {
                    acks += 1;
                    window.add_permits(1);
                } else if text.starts_with("{\"event\":\"message\"") {
                    messages += 1;
                    if delivered.fetch_add(1, Ordering::AcqRel) + 1 == total {
                        done.notify_one();
                    }
                } else {
                    return Err(format!("conn {i}: unexpected {text}"));
                }
            }
            Ok(())
        });
    }
    // Until every message is delivered; a task's error ends the run at once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        tokio::select! {
            () = done.notified() => break,
            joined = tasks.join_next() => match joined {
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => return Err(format!("throughput: {e}")),
                Some(Err(e)) => return Err(format!("throughput: {e}")),
                None => break,
            },
            () = tokio::time::sleep_until(deadline) => {
                return Err("throughput: not every message was delivered in 120 s".into());
            }
        }
    }
    let elapsed = started.elapsed();
    let cpu = servers_cpu()? - cpu_before;
    let other = other_cpu()? - other_before;
    if delivered.load(Ordering::Acquire) < total {
        return Err("throughput: not every message was delivered".into());
    }
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(|e| e.to_string())??;
    }
    for server in servers {
        server.stop();
    }
    Ok(Throughput {
        rate: total as f64 / elapsed.as_secs_f64(),
        cpu_us_per_message: cpu * 1e6 / total as f64,
        other_us_per_message: other * 1e6 / total as f64,
        messages: total,
    })
}

async fn throughput(classes: &[(&str, InteractionClass)]) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for &(name, class) in classes {
        // A fresh server per run; the median run of each figure is reported.
        let (mut rates, mut cpus) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let t = throughput_run(class).await?;
            rates.push(t.rate);
            cpus.push(t.cpu_us_per_message);
        }
        let method = format!(
            "{THROUGHPUT_CONNS} WebSocket connections (one user each) each send \
             {THROUGHPUT_PER_CONN} direct messages to the next user, at most \
             {THROUGHPUT_WINDOW} awaiting their message_ack; clock until all \
             {} are delivered; load generator on the same 2 cores; median of {RUNS} runs",
            THROUGHPUT_CONNS * THROUGHPUT_PER_CONN
        );
        let (rate, cpu) = (median(&mut rates), median(&mut cpus));
        rows.push(Row {
            name: format!("server: messages/s, 100 connections, {name}"),
            figure: format!(
                "{} (runs {}–{})",
                fmt_rate(rate),
                fmt_rate(rates[0]),
                fmt_rate(rates[RUNS - 1])
            ),
            method: method.clone(),
        });
        rows.push(Row {
            name: format!("server: CPU per message, {name}"),
            figure: format!(
                "{cpu:.1} µs (runs {:.1}–{:.1}; target ≤ 7; Node.js original ≈ 10)",
                cpus[0],
                cpus[RUNS - 1]
            ),
            method: format!(
                "same runs: server process utime + stime (/proc/PID/stat) over the run ÷ \
                 messages (each: frame in, stored if durable, ack out, delivery out); \
                 median of {RUNS}"
            ),
        });
    }
    Ok(rows)
}

/// One room of [`FANOUT_MEMBERS`] members; a sender sends one message at a time to
/// it; the clock runs from the send until the last member has read it.
async fn fanout() -> Result<Vec<Row>, String> {
    let server = ChildProc::spawn(CHILD_SERVER)?;
    let (p50, max, per_fanout_us) = fanout_on(vec![server]).await?;
    Ok(vec![Row {
        name: "server: fan-out to 1,000 room members".into(),
        figure: format!(
            "p50 {p50:.2} ms, max {max:.2} ms (target ≤ 8 ms p50); server CPU {:.1} ms per \
             fan-out ({:.1} µs per member)",
            per_fanout_us / 1e3,
            per_fanout_us / FANOUT_MEMBERS as f64
        ),
        method: format!(
            "{FANOUT_MEMBERS} WebSocket connections (one user each) in one room; one CLASS_C \
             message at a time to the room, {FANOUT_RUNS} runs; clock from the sender's write \
             to the last member's read; readers in this process on the same 2 cores"
        ),
    }])
}

/// One room of [`FANOUT_MEMBERS`] members, member `i` on server `i % n`, the sender on
/// the first; (p50 ms, max ms, servers' CPU µs per fan-out).
pub(super) async fn fanout_on(servers: Vec<ChildProc>) -> Result<(f64, f64, f64), String> {
    /// What a member's reader reports.
    enum Seen {
        Joined,
        Run(usize, Instant),
    }
    let room = "fanout";
    let mut members = Vec::with_capacity(FANOUT_MEMBERS);
    for i in 0..FANOUT_MEMBERS {
        let server = &servers[i % servers.len()];
        members.push(connect_user(server.addr, &format!("f{i}")).await?);
    }
    let server = &servers[0];
    let servers_cpu = || -> Result<f64, String> {
        servers
            .iter()
            .map(ChildProc::cpu_secs)
            .sum::<Result<f64, String>>()
    };
    // A reader per member reads everything from the start (joins make a storm of
    // presence announcements that must be drained) and reports `room_joined` and the
    // marker of each run.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Seen>();
    let frames = Arc::new(AtomicU64::new(0));
    let mut readers = tokio::task::JoinSet::new();
    let mut sinks = Vec::with_capacity(FANOUT_MEMBERS);
    for ws in members {
        let (sink, mut stream) = ws.split();
        sinks.push(sink);
        let tx = tx.clone();
        let frames = Arc::clone(&frames);
        readers.spawn(async move {
            let mut next_run = 0;
            while next_run < FANOUT_RUNS {
                let Ok(Some(Ok(frame))) = tokio::time::timeout(WAIT * 6, stream.next()).await
                else {
                    return;
                };
                frames.fetch_add(1, Ordering::Relaxed);
                let Message::Text(text) = frame else {
                    continue;
                };
                if text.contains(&format!("\"fanout-{next_run}\"")) {
                    let _ = tx.send(Seen::Run(next_run, Instant::now()));
                    next_run += 1;
                } else if text.starts_with("{\"event\":\"room_joined\"") {
                    let _ = tx.send(Seen::Joined);
                }
            }
        });
    }
    drop(tx);
    let join = |r: &str| {
        ClientEvent::JoinRoom {
            room_id: room.to_owned(),
        }
        .encode(Some(r))
    };
    for sink in &mut sinks {
        sink.send(Message::Text(join("join").into()))
            .await
            .map_err(|e| e.to_string())?;
    }
    for _ in 0..FANOUT_MEMBERS {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(Seen::Joined)) => {}
            _ => return Err("fan-out: not every member joined".into()),
        }
    }
    let mut sender = connect_user(server.addr, "fanout-sender").await?;
    sender
        .send(Message::Text(join("join").into()))
        .await
        .map_err(|e| e.to_string())?;
    expect_event(&mut sender, "room_joined").await?;
    // Wait (bounded) until the presence storm is over: no frame for 500 ms.
    let mut last = u64::MAX;
    for _ in 0..120 {
        let now = frames.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The sender reads its own presence announcements too; drop what is pending.
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), sender.next()).await {}
    let mut samples = Vec::with_capacity(FANOUT_RUNS);
    let cpu_before = servers_cpu()?;
    for r in 0..FANOUT_RUNS {
        let frame = message_frame(
            &format!("fanout-{r}"),
            InteractionClass::ClassC,
            None,
            Some(room),
        );
        let t = Instant::now();
        sender
            .send(Message::Text(frame.into()))
            .await
            .map_err(|e| e.to_string())?;
        let mut last = t;
        for _ in 0..FANOUT_MEMBERS {
            match tokio::time::timeout(WAIT, rx.recv()).await {
                Ok(Some(Seen::Run(run, at))) if run == r => last = last.max(at),
                Ok(Some(_)) => return Err(format!("fan-out: unexpected report during run {r}")),
                _ => return Err(format!("fan-out: run {r} did not reach every member")),
            }
        }
        samples.push((last - t).as_secs_f64() * 1e3);
        expect_event(&mut sender, "message_ack").await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu = servers_cpu()? - cpu_before;
    readers.abort_all();
    while readers.join_next().await.is_some() {}
    drop((sender, sinks));
    for server in servers {
        server.stop();
    }
    let s = sorted(samples);
    Ok((
        percentile(&s, 0.5),
        s.last().copied().unwrap_or(0.0),
        cpu * 1e6 / FANOUT_RUNS as f64,
    ))
}

/// A minimal keep-alive HTTP/1.1 client: one request at a time on one connection.
struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl HttpConn {
    async fn open(addr: SocketAddr) -> Result<Self, String> {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(8192),
        })
    }

    /// Sends `request` (complete bytes) and reads one response; returns its status and
    /// body.
    async fn call(&mut self, request: &[u8]) -> Result<(u16, Vec<u8>), String> {
        self.stream
            .write_all(request)
            .await
            .map_err(|e| e.to_string())?;
        self.buf.clear();
        // Headers: read until the blank line.
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if self.buf.len() > 64 * 1024 {
                return Err("response headers too long".into());
            }
            let mut chunk = [0u8; 8192];
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).map_err(|e| e.to_string())?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or("no status")?;
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .ok_or("no content-length")?;
        while self.buf.len() < head_end + length {
            let mut chunk = [0u8; 8192];
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed in the body".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok((status, self.buf[head_end..head_end + length].to_vec()))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reconciliation clients at once, operations per request, and how long they run.
const RECONCILE_CLIENTS: usize = 100;
const RECONCILE_OPS: usize = 10;
const RECONCILE_TIME: Duration = Duration::from_secs(4);

/// Reconcile requests/s with [`RECONCILE_CLIENTS`] clients at once, each on entities of
/// its own: the engine beside the storage's lock (the default) against every request
/// under it (`RECONCILIATION_PARALLEL=false`, as the server did before), alternating.
async fn reconciles() -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        on.push(reconcile_run(true).await?);
        off.push(reconcile_run(false).await?);
    }
    for (name, runs) in [
        ("in parallel beside the writer (default)", &mut on),
        (
            "one after another on the writer (RECONCILIATION_PARALLEL=false)",
            &mut off,
        ),
    ] {
        let mut rates: Vec<f64> = runs.iter().map(|r| r.0).collect();
        let mut cpus: Vec<f64> = runs.iter().map(|r| r.1).collect();
        let (rate, cpu) = (median(&mut rates), median(&mut cpus));
        rows.push(Row {
            name: format!("server: reconcile requests/s, {RECONCILE_CLIENTS} clients, {name}"),
            figure: format!(
                "{} (runs {}–{}; {cpu:.0} µs server CPU per request)",
                fmt_rate(rate),
                fmt_rate(rates[0]),
                fmt_rate(rates[RUNS - 1])
            ),
            method: format!(
                "{RECONCILE_CLIENTS} HTTP/1.1 keep-alive clients (a user each) send \
                 POST /api/reconciliation/reconcile one after another, {RECONCILE_OPS} \
                 updates of the client's own entity each (FIELD_LEVEL_MERGE, each \
                 causally after the last), lastKnownVersion from the previous answer; \
                 {} s; server CPU utime+stime ÷ requests; the two settings alternate; \
                 median of {RUNS}",
                RECONCILE_TIME.as_secs()
            ),
        });
    }
    Ok(rows)
}

/// One reconcile run: (requests/s, server CPU µs per request).
pub(super) async fn reconcile_run(parallel: bool) -> Result<(f64, f64), String> {
    let setting = if parallel { "true" } else { "false" };
    let server = ChildProc::spawn_with(CHILD_SERVER, &[("RECONCILIATION_PARALLEL", setting)])?;
    let count = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_at = Instant::now() + POLL_WARMUP + RECONCILE_TIME;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..RECONCILE_CLIENTS {
        let mut conn = HttpConn::open(server.addr).await?;
        let (addr, token) = (server.addr, token(&format!("r{c}")));
        let (count, measuring) = (Arc::clone(&count), Arc::clone(&measuring));
        tasks.spawn(async move {
            let client = format!("r{c}");
            let mut n = 0u64;
            let mut last_known: Option<String> = None;
            while Instant::now() < stop_at {
                let ops: Vec<serde_json::Value> = (0..RECONCILE_OPS)
                    .map(|_| {
                        n += 1;
                        let kind = if n == 1 { "CREATE" } else { "UPDATE" };
                        json!({
                            "operationId": format!("{client}-{n}"), "clientId": client,
                            "tenantId": TENANT, "entityType": "doc",
                            "entityId": format!("doc-{client}"), "operationType": kind,
                            "payload": {format!("f{}", n % 8): n},
                            "timestamp": "2026-12-01T00:00:00Z",
                            "vectorClock": {client.as_str(): n},
                        })
                    })
                    .collect();
                let mut body = json!({
                    "requestId": format!("{client}-r{n}"), "clientId": client,
                    "tenantId": TENANT, "operations": ops,
                    "requestedAt": "2026-12-01T00:00:00Z",
                    "strategy": "FIELD_LEVEL_MERGE",
                });
                if let Some(v) = &last_known {
                    body["lastKnownVersion"] = json!(v);
                }
                let body = body.to_string();
                let request = format!(
                    "POST /api/reconciliation/reconcile HTTP/1.1\r\nHost: {addr}\r\n\
                     Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let (status, answer) = tokio::time::timeout(WAIT, conn.call(request.as_bytes()))
                    .await
                    .map_err(|_| "reconcile timed out".to_owned())??;
                if status != 200 {
                    return Err(format!(
                        "reconcile answered {status}: {}",
                        String::from_utf8_lossy(&answer)
                    ));
                }
                let answer: serde_json::Value =
                    serde_json::from_slice(&answer).map_err(|e| e.to_string())?;
                last_known = answer["currentVersion"].as_str().map(str::to_owned);
                if measuring.load(Ordering::Relaxed) {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok::<_, String>(())
        });
    }
    tokio::time::sleep(POLL_WARMUP).await;
    let cpu_before = server.cpu_secs()?;
    let t = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(RECONCILE_TIME).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t.elapsed();
    let n = count.load(Ordering::Relaxed);
    let cpu = server.cpu_secs()? - cpu_before;
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(|e| e.to_string())??;
    }
    server.stop();
    Ok((
        n as f64 / elapsed.as_secs_f64(),
        cpu * 1e6 / n.max(1) as f64,
    ))
}

/// [`RUNS`] poll runs on fresh servers; the median.
async fn polls() -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for from_tail in [true, false] {
        let (mut rates, mut cpus) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let (rate, cpu) = poll_run(from_tail).await?;
            rates.push(rate);
            cpus.push(cpu);
        }
        let (rate, cpu) = (median(&mut rates), median(&mut cpus));
        let (name, source) = if from_tail {
            (
                "server: polls/s, 50 keep-alive clients",
                "the cursor and the page from the log's recent tail in memory (the usual \
                 case: each cursor is recent), room memberships from the hub",
            )
        } else {
            (
                "server: polls/s, 50 keep-alive clients, tail off (SQLite)",
                "EVENT_BUS_TAIL_BYTES=0: cursor and page read from SQLite (the page scans \
                 the tenant's log after the cursor: here ~50 events on average)",
            )
        };
        rows.push(Row {
            name: name.into(),
            figure: format!(
                "{} (runs {}–{}; {cpu:.1} µs server CPU per poll; target ≥ 50,000/s)",
                fmt_rate(rate),
                fmt_rate(rates[0]),
                fmt_rate(rates[RUNS - 1])
            ),
            method: format!(
                "{POLL_CLIENTS} HTTP/1.1 keep-alive connections (one user each, minimal \
                 client), GET /api/events/poll with the user's cursor, one event back as \
                 JSON: token check, rate-limit check, {source}; {} s after {} ms warm-up; \
                 load generator on the same 2 cores; median of {RUNS} runs",
                POLL_TIME.as_secs(),
                POLL_WARMUP.as_millis()
            ),
        });
    }
    Ok(rows)
}

/// [`POLL_CLIENTS`] keep-alive connections, one user each, polling with their cursor in
/// a loop: each poll returns the one event after the cursor (`from_tail`: the server keeps
/// its default log tail; otherwise none). Returns polls per second and server CPU µs
/// per poll.
pub(super) async fn poll_run(from_tail: bool) -> Result<(f64, f64), String> {
    let server = if from_tail {
        ChildProc::spawn(CHILD_SERVER)?
    } else {
        ChildProc::spawn_with(CHILD_SERVER, &[(TAIL_ENV, "0")])?
    };
    // Two messages to each polling user; each polls from the first (one event back).
    let mut sender = connect_user(server.addr, "poll-sender").await?;
    let mut cursors = Vec::with_capacity(POLL_CLIENTS);
    for i in 0..POLL_CLIENTS {
        let user = format!("p{i}");
        let mut first = None;
        for k in 0..2 {
            let id = format!("poll-{i}-{k}");
            let frame = message_frame(&id, InteractionClass::ClassC, Some(&user), None);
            sender
                .send(Message::Text(frame.into()))
                .await
                .map_err(|e| e.to_string())?;
            if let ServerEvent::MessageAck(ack) = expect_event(&mut sender, "message_ack").await?
                && k == 0
            {
                first = ack.event_id;
            }
        }
        cursors.push(first.ok_or("no event id in the ack")?);
    }
    drop(sender);
    let count = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_at = Instant::now() + POLL_WARMUP + POLL_TIME;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, cursor) in cursors.into_iter().enumerate() {
        let mut conn = HttpConn::open(server.addr).await?;
        let request = format!(
            "GET /api/events/poll?lastEventId={cursor}&limit=100 HTTP/1.1\r\n\
             Host: {}\r\nAuthorization: Bearer {}\r\n\r\n",
            server.addr,
            token(&format!("p{i}"))
        )
        .into_bytes();
        let count = Arc::clone(&count);
        let measuring = Arc::clone(&measuring);
        tasks.spawn(async move {
            let mut checked = false;
            while Instant::now() < stop_at {
                let (status, body) = tokio::time::timeout(WAIT, conn.call(&request))
                    .await
                    .map_err(|_| "poll timed out".to_owned())??;
                if status != 200 {
                    return Err(format!(
                        "poll answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    ));
                }
                if !checked {
                    // Once per client: the answer is a real page with one event.
                    let page: webwaka_realtime::protocol::PollResponse =
                        serde_json::from_slice(&body).map_err(|e| e.to_string())?;
                    if page.events.len() != 1 {
                        return Err(format!("poll gave {} events", page.events.len()));
                    }
                    checked = true;
                }
                if measuring.load(Ordering::Relaxed) {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok::<_, String>(())
        });
    }
    tokio::time::sleep(POLL_WARMUP).await;
    let cpu_before = server.cpu_secs()?;
    let t = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(POLL_TIME).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t.elapsed();
    let n = count.load(Ordering::Relaxed);
    let cpu = server.cpu_secs()? - cpu_before;
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(|e| e.to_string())??;
    }
    server.stop();
    Ok((
        n as f64 / elapsed.as_secs_f64(),
        cpu * 1e6 / n.max(1) as f64,
    ))
}

/// The open-file limit of this process (soft), from `/proc/self/limits`.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// [`IDLE_CONNS`] idle WebSocket connections (one user each); the server child's RSS
/// growth divided by the connections.
pub(super) async fn idle() -> Result<Vec<Row>, String> {
    let limit = open_file_limit().unwrap_or(0);
    if limit < (IDLE_CONNS + IDLE_WARM + 200) as u64 {
        return Err(format!(
            "the open-file limit ({limit}) is too low for {IDLE_CONNS} connections"
        ));
    }
    let server = ChildProc::spawn(CHILD_SERVER)?;
    let warm = connect_many(server.addr, "w", IDLE_WARM).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss_kib()?;
    let started = Instant::now();
    let conns = connect_many(server.addr, "i", IDLE_CONNS).await?;
    let connect_time = started.elapsed();
    // Keep them alive: a task per connection answers the server's pings.
    let mut holders = tokio::task::JoinSet::new();
    for mut ws in conns.into_iter().chain(warm) {
        holders.spawn(async move {
            while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT * 6, ws.next()).await {}
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = server.rss_kib()?;
    holders.abort_all();
    while holders.join_next().await.is_some() {}
    server.stop();
    let per_conn = (after.saturating_sub(before) * 1024) as f64 / IDLE_CONNS as f64;
    let at_50k = per_conn * IDLE_EXTRAPOLATE as f64 / (1024.0 * 1024.0);
    Ok(vec![Row {
        name: "server: memory per idle connection".into(),
        figure: format!(
            "{:.2} KiB ({before} → {after} KiB RSS for {IDLE_CONNS}; 50,000 ≈ {at_50k:.0} MiB \
             more; target ≤ 8 KiB, Node.js original ≈ 15)",
            per_conn / 1024.0
        ),
        method: format!(
            "server child process; {IDLE_WARM} connections first (runtime warm), then VmRSS \
             before and 1 s after opening {IDLE_CONNS} more (one user each, `connected` read, \
             pings answered), opened in {:.1} s; growth ÷ {IDLE_CONNS}; open-file limit {limit}",
            connect_time.as_secs_f64()
        ),
    }])
}

/// Opens `n` plain TCP connections that send nothing, [`CONNECT_BATCH`] at a time.
async fn open_silent(addr: SocketAddr, n: usize) -> Result<Vec<TcpStream>, String> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let batch = CONNECT_BATCH.min(n - out.len());
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            set.spawn(async move { tokio::time::timeout(WAIT, TcpStream::connect(addr)).await });
        }
        while let Some(joined) = set.join_next().await {
            let stream = joined
                .map_err(|e| e.to_string())?
                .map_err(|_| "a connect timed out".to_owned())?
                .map_err(|e| e.to_string())?;
            out.push(stream);
        }
    }
    Ok(out)
}

/// True when the server has closed `stream` (a read sees the end or an error within
/// `wait`).
async fn closed_by_server(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(wait, stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// A counter of the Prometheus text `metrics`, e.g. `name{label="x"}`.
fn counter(metrics: &str, name: &str) -> Option<u64> {
    let prefix = format!("{name} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// The server with its default settings (`HTTP_HEADER_TIMEOUT` 10 s,
/// `HTTP_MAX_CONNECTIONS` derived from its open-file limit): silent connections up to
/// its cap and the growth of its resident memory per connection; then
/// [`SILENT_PAST_CAP`] more, which it must close as it accepts them.
async fn silent() -> Result<Vec<Row>, String> {
    let server = ChildProc::spawn(CHILD_SERVER)?;
    // One keep-alive connection for /health and /metrics: it counts as one of the cap.
    let mut http = HttpConn::open(server.addr).await?;
    let (status, body) = http
        .call(b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await?;
    let health: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("/health ({status}): {e}"))?;
    let figures = &health["services"]["websocket"];
    let cap = figures["maxHttpConnections"]
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| format!("no maxHttpConnections in {health}"))?;
    let descriptors = figures["descriptorLimit"]
        .as_u64()
        .map_or_else(|| "none".to_owned(), |n| n.to_string());
    let own_limit = open_file_limit().unwrap_or(0);
    if own_limit < (cap + SILENT_PAST_CAP + 200) as u64 {
        return Err(format!(
            "this process's open-file limit ({own_limit}) is too low for {cap} connections"
        ));
    }
    let warm = open_silent(server.addr, SILENT_WARM).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.rss_kib()?;
    let started = Instant::now();
    let held_count = cap - 1;
    let mut held = open_silent(server.addr, held_count).await?;
    let opened_in = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.rss_kib()?;
    // Past the cap: each is closed at accept.
    let mut past = open_silent(server.addr, SILENT_PAST_CAP).await?;
    let mut closed_at_once = 0;
    for stream in &mut past {
        if closed_by_server(stream, Duration::from_secs(1)).await {
            closed_at_once += 1;
        }
    }
    // The held ones are all still open (a read would block) ...
    let mut still_open = 0;
    for stream in &mut held {
        let mut byte = [0u8; 1];
        if matches!(stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        {
            still_open += 1;
        }
    }
    // ... and all within the header timeout, or the figures mean something else.
    let within = started.elapsed();
    if within >= Duration::from_secs(9) {
        return Err(format!(
            "holding {held_count} took {within:?}: the 10 s header timeout would close them"
        ));
    }
    let (_, metrics) = http
        .call(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await?;
    let metrics = String::from_utf8_lossy(&metrics);
    let shed = counter(
        &metrics,
        "webwaka_http_connections_closed_total{reason=\"shed\"}",
    )
    .unwrap_or(0);
    drop((held, past, http));
    server.stop();
    let per_conn = (after.saturating_sub(before) * 1024) as f64 / held_count as f64;
    Ok(vec![
        Row {
            name: "server: memory per silent connection".into(),
            figure: format!(
                "{:.2} KiB ({before} → {after} KiB RSS for {held_count}; the cap full ≈ {:.0} MiB)",
                per_conn / 1024.0,
                per_conn * held_count as f64 / (1024.0 * 1024.0)
            ),
            method: format!(
                "server child process, default settings; {SILENT_WARM} silent connections \
                 opened and closed first (runtime warm), then VmRSS before and 0.5 s after \
                 opening {held_count} TCP connections that send nothing ({CONNECT_BATCH} \
                 connecting at a time, opened in {:.1} s, all within the 10 s header \
                 timeout); growth ÷ {held_count}",
                opened_in.as_secs_f64()
            ),
        },
        Row {
            name: "server: silent connections held before shedding".into(),
            figure: format!(
                "{still_open} held of HTTP_MAX_CONNECTIONS {cap} (derived: ¼ of the \
                 descriptor limit {descriptors} less 64); the next {SILENT_PAST_CAP}: \
                 {closed_at_once} closed at accept, {shed} counted as shed"
            ),
            method: format!(
                "same run: one keep-alive connection (/health, /metrics) + {held_count} silent \
                 ones fill the cap; each held one checked open (a read would block), then \
                 {SILENT_PAST_CAP} more opened, each checked closed within 1 s; shed from \
                 webwaka_http_connections_closed_total; this process's open-file limit \
                 {own_limit}"
            ),
        },
    ])
}
