//! Client benchmarks (issue 5): how fast the SDK falls back and climbs up, its message
//! round trip against a raw WebSocket baseline measured in the same run, and its
//! memory when idle and with 10,000 queued items.
//!
//! Everything runs on loopback against the real server (in-process) with real SQLite
//! files on disk. The memory figures come from a child process linking only the client
//! (`bin/client_memory.rs`), so that the server and the benchmark are not counted.
//!
//! `WEBWAKA_BENCH_CLIENT=round_trip,failover` runs only the named parts: `round_trip`,
//! `failover`, `herd` (the return after a server restart), `sends` (send_message from
//! one task and from many at once: the group commit), `memory`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use webwaka_realtime::client::{
    Client, ClientConfig, Next, OutgoingMessage, StaticToken, Subscription, Target, Update,
};
use webwaka_realtime::machine::{ConnectionState, MachineConfig};
use webwaka_realtime::protocol::InteractionClass;
use webwaka_realtime::store::Durability;

use super::{Row, percentile, server, sorted, wanted};
use crate::harness::{TestServer, wait_state};
use crate::proxy::{Mode, Proxy};

/// The environment variable that turns the bench binary into a child process of a
/// benchmark (the server benchmarks use it).
pub const CHILD_ENV: &str = "WEBWAKA_BENCH_CHILD";

/// Names the parts to run, e.g. `round_trip,memory` (unset: all).
const ONLY_ENV: &str = "WEBWAKA_BENCH_CLIENT";

/// Round trips measured per path.
const ROUND_TRIPS: usize = 500;
/// Failovers measured.
const FAILOVERS: usize = 5;
/// Clients in the reconnect-spread measurement.
const HERD: usize = 40;

/// Runs the client benchmarks.
pub fn run() -> Result<Vec<Row>, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut rows = runtime.block_on(async {
        let mut rows = Vec::new();
        if wanted(ONLY_ENV, "round_trip") {
            rows.extend(round_trip().await?);
        }
        if wanted(ONLY_ENV, "failover") {
            rows.extend(failover().await?);
        }
        if wanted(ONLY_ENV, "herd") {
            rows.extend(herd_return().await?);
        }
        if wanted(ONLY_ENV, "sends") {
            rows.extend(sends().await?);
        }
        Ok::<_, String>(rows)
    })?;
    if wanted(ONLY_ENV, "memory") {
        rows.extend(memory()?);
    }
    Ok(rows)
}

/// Sends stored per run of [`sends`].
const SENDS: usize = 2000;
/// Tasks sending at once in the concurrent run.
const SEND_TASKS: usize = 64;

/// `send_message` rates, offline (nothing is sent; each call returns once its item is
/// committed, `synchronous=FULL`): from one task, one call after the other (one commit
/// each), and from [`SEND_TASKS`] tasks at once, whose items the store's writer thread
/// commits together (group commit). Median of 3 runs each, alternating.
async fn sends() -> Result<Vec<Row>, String> {
    async fn run(tasks: usize) -> Result<(f64, f64), String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut cfg = ClientConfig::new("http://127.0.0.1:9", dir.path().join("sends.db"));
        cfg.store.durability = Durability::Full;
        let client = Arc::new(open(cfg, "unused".into()).await?);
        let cpu = super::store::process_cpu();
        let started = Instant::now();
        let per_task = SENDS / tasks;
        let mut set = tokio::task::JoinSet::new();
        for t in 0..tasks {
            let client = client.clone();
            set.spawn(async move {
                for i in 0..per_task {
                    let message = OutgoingMessage::new(
                        Target::User(format!("u{t}")),
                        "bench",
                        json!({"text": "x".repeat(150), "i": i}),
                    );
                    client
                        .send_message(message)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Ok::<_, String>(())
            });
        }
        while let Some(done) = set.join_next().await {
            done.map_err(|e| e.to_string())??;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = match (cpu, super::store::process_cpu()) {
            (Some(before), Some(after)) => after.saturating_sub(before).as_secs_f64(),
            _ => f64::NAN,
        };
        let sent = (per_task * tasks) as f64;
        client.shutdown().await;
        Ok((sent / elapsed, cpu / sent * 1e6))
    }
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        one.push(run(1).await?);
        many.push(run(SEND_TASKS).await?);
    }
    let median = |runs: &mut Vec<(f64, f64)>| {
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        runs[runs.len() / 2]
    };
    let (one, many) = (median(&mut one), median(&mut many));
    let method = format!(
        "Client::send_message of {SENDS} 200-byte direct messages, client offline (nothing \
         sent), store synchronous=FULL on disk: each call returns once its item is \
         committed; CPU: this process (the client's store thread included); median of 3 \
         runs each, alternating"
    );
    Ok(vec![
        Row {
            name: "client: send_message, one task (one commit each)".into(),
            figure: format!("{:.0}/s (CPU {:.0} µs/send)", one.0, one.1),
            method: method.clone(),
        },
        Row {
            name: format!("client: send_message, {SEND_TASKS} tasks at once (group commit)"),
            figure: format!(
                "{:.0}/s (CPU {:.0} µs/send), {:.1} × one task",
                many.0,
                many.1,
                many.0 / one.0
            ),
            method,
        },
    ])
}

fn config(url: &str, store: &std::path::Path, machine: MachineConfig) -> ClientConfig {
    let mut c = ClientConfig::new(url, store);
    c.machine = machine;
    c
}

async fn open(config: ClientConfig, token: String) -> Result<Client, String> {
    Client::open(config, Arc::new(StaticToken(token)))
        .await
        .map_err(|e| e.to_string())
}

/// Waits for the next message at `sub`, at most `within`.
async fn next_message(sub: &mut Subscription, within: Duration) -> Option<Instant> {
    tokio::time::timeout(within, async {
        loop {
            match sub.next().await {
                Next::Update(u) if matches!(*u, Update::Message(_)) => return Some(Instant::now()),
                Next::Closed => return None,
                _ => {}
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// Sender SDK → server → recipient SDK, one message at a time, with the stores at
/// `durability`; users `{prefix}-a` and `{prefix}-b` (new ones per run: a client
/// without a cursor catches up from the log's start).
/// Round trips and, of each, the `send_message` call alone (the durable enqueue). The
/// arrival is timed by a task of its own: with `FULL` the message may arrive before
/// `send_message` returns (the sender's flush overlaps the send).
async fn sdk_samples(
    server: SocketAddr,
    durability: Durability,
    prefix: &str,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let url = format!("http://{server}");
    let (sender, recipient) = (format!("{prefix}-a"), format!("{prefix}-b"));
    let mut ca = config(&url, &dir.path().join("a.db"), MachineConfig::default());
    ca.store.durability = durability;
    let mut cb = config(&url, &dir.path().join("b.db"), MachineConfig::default());
    cb.store.durability = durability;
    let a = open(ca, server::token(&sender)).await?;
    let b = open(cb, server::token(&recipient)).await?;
    for c in [&a, &b] {
        if !wait_state(c, ConnectionState::Realtime, Duration::from_secs(10)).await {
            return Err("round trip: not realtime".into());
        }
    }
    let mut at_b = b.subscribe();
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel();
    let arrivals = tokio::spawn(async move {
        // Bounded by the subscription: it closes when `b` shuts down.
        loop {
            match at_b.next().await {
                Next::Update(u)
                    if matches!(*u, Update::Message(_))
                        && arrived_tx.send(Instant::now()).is_err() =>
                {
                    return;
                }
                Next::Closed => return,
                _ => {}
            }
        }
    });
    let mut samples = Vec::with_capacity(ROUND_TRIPS);
    let mut call_samples = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..ROUND_TRIPS + 20 {
        let t = Instant::now();
        a.send_message(OutgoingMessage::new(
            Target::User(recipient.clone()),
            "chat.text",
            json!({"text": "hello", "i": i}),
        ))
        .await
        .map_err(|e| e.to_string())?;
        let returned = Instant::now();
        let Ok(Some(at)) = tokio::time::timeout(Duration::from_secs(5), arrived.recv()).await
        else {
            return Err("round trip: message not delivered".into());
        };
        if i >= 20 {
            // The first ones warm caches and connections.
            samples.push((at - t).as_secs_f64() * 1e6);
            call_samples.push((returned - t).as_secs_f64() * 1e6);
        }
    }
    a.shutdown().await;
    b.shutdown().await;
    arrivals.abort();
    Ok((samples, call_samples))
}

/// What the server's durability adds to a round trip: direct messages between two raw
/// protocol clients, `CLASS_C` (stored before delivery) and `CLASS_A` (live) in
/// alternating slices; the difference of their medians is the server's commit.
async fn server_commit_samples(server: SocketAddr) -> Result<(Vec<f64>, Vec<f64>), String> {
    let mut sender = server::connect_user(server, "commit-a").await?;
    let mut recipient = server::connect_user(server, "commit-b").await?;
    let frame = |class: InteractionClass, tag: &'static str| {
        move |i: usize| server::message_frame(&format!("{tag}-{i}"), class, Some("commit-b"), None)
    };
    let (durable, live) = (
        frame(InteractionClass::ClassC, "c"),
        frame(InteractionClass::ClassA, "a"),
    );
    let (sender, recipient) = (&mut sender, &mut recipient);
    server::round_trips(sender, recipient, &durable, 0, 20, true).await?;
    server::round_trips(sender, recipient, &live, 0, 20, true).await?;
    let (mut stored, mut not_stored) = (Vec::new(), Vec::new());
    let per_round = ROUND_TRIPS / 10;
    for round in 0..10 {
        let first = 20 + round * per_round;
        stored.extend(
            server::round_trips(sender, recipient, &durable, first, per_round, true).await?,
        );
        not_stored
            .extend(server::round_trips(sender, recipient, &live, first, per_round, true).await?);
    }
    Ok((stored, not_stored))
}

/// Bytes a recipient's commit writes to its log: the seen id's row and index entry and
/// the cursor's row, three 2 KiB pages, each with its 24-byte frame header.
const COMMIT_BYTES: usize = 3 * (2048 + 24);

/// `fdatasync` as the recipient's store meets it: [`COMMIT_BYTES`] appended to a file
/// in a directory of the same file system, then flushed, [`ROUND_TRIPS`] times. A new
/// log grows like this until its first checkpoint (1,000 pages: about a third of the
/// way into a run above); after it, commits overwrite the log, whose flush is cheaper
/// (no change of the file's size to journal), so this errs on the generous side.
fn fdatasync_samples(dir: &std::path::Path) -> Result<Vec<f64>, String> {
    use std::io::Write;
    let path = dir.join("fdatasync-probe");
    let mut file = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    let block = vec![0x5a_u8; COMMIT_BYTES];
    let mut samples = Vec::with_capacity(ROUND_TRIPS);
    for _ in 0..ROUND_TRIPS + 20 {
        file.write_all(&block).map_err(|e| e.to_string())?;
        let t = Instant::now();
        file.sync_data().map_err(|e| e.to_string())?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let _ = std::fs::remove_file(&path);
    Ok(samples.split_off(20))
}

/// The SDK round trip against its target, all parts measured in this run: p50 at most
/// the recipient's `fdatasync` + the server's commit + two raw relays (issue 13).
async fn round_trip() -> Result<Vec<Row>, String> {
    // Server and relay in their own processes, as the server's round-trip benchmark
    // runs them: the three parties of a round trip are not one process in real life.
    let relay = server::ChildProc::spawn(server::CHILD_RELAY)?;
    let server_proc = server::ChildProc::spawn(server::CHILD_SERVER)?;
    let addr = server_proc.addr;
    let (mut ra, mut rb) = (
        server::connect_raw(relay.addr).await?,
        server::connect_raw(relay.addr).await?,
    );
    let raw_frame = server::message_frame("m", InteractionClass::ClassC, Some("b"), None);
    let raw_next = |_| raw_frame.clone();
    server::round_trips(&mut ra, &mut rb, raw_next, 0, 20, false).await?;
    let raw = server::round_trips(&mut ra, &mut rb, raw_next, 0, ROUND_TRIPS, false).await?;
    let (normal, normal_calls) = sdk_samples(addr, Durability::Normal, "normal").await?;
    let (full, full_calls) = sdk_samples(addr, Durability::Full, "full").await?;
    let (stored, live) = server_commit_samples(addr).await?;
    drop((ra, rb));
    relay.stop();
    server_proc.stop();
    let probe_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let fsync = sorted(fdatasync_samples(probe_dir.path())?);
    let (raw, normal, full) = (sorted(raw), sorted(normal), sorted(full));
    let (normal_calls, full_calls) = (sorted(normal_calls), sorted(full_calls));
    let (stored, live) = (sorted(stored), sorted(live));
    let (raw50, raw99) = (percentile(&raw, 0.5), percentile(&raw, 0.99));
    let commit = (percentile(&stored, 0.5) - percentile(&live, 0.5)).max(0.0);
    let fsync50 = percentile(&fsync, 0.5);
    let target = fsync50 + commit + 2.0 * raw50;
    let row = |name: &str, s: &[f64]| {
        let p50 = percentile(s, 0.5);
        Row {
            name: name.into(),
            figure: format!(
                "p50 {p50:.0} µs ({:.1}× raw), p99 {:.0} µs ({:.1}× raw); target p50 ≤ {target:.0} µs: {}",
                p50 / raw50,
                percentile(s, 0.99),
                percentile(s, 0.99) / raw99,
                if p50 <= target { "met" } else { "not met" }
            ),
            method: format!(
                "{ROUND_TRIPS} messages one at a time (after 20), send_message → server → the \
                 other client's update stream (timed by a task of its own); server in its \
                 own process, both clients in this one; loopback; target = the parts below, \
                 same run"
            ),
        }
    };
    Ok(vec![
        Row {
            name: "client: raw WebSocket relay (baseline)".into(),
            figure: format!("p50 {raw50:.0} µs, p99 {raw99:.0} µs"),
            method: format!(
                "{ROUND_TRIPS} text frames (after 20), tokio-tungstenite client → relay task in \
                 its own process → second client, same run"
            ),
        },
        Row {
            name: "client: the recipient's fdatasync".into(),
            figure: format!(
                "p50 {fsync50:.0} µs, p99 {:.0} µs",
                percentile(&fsync, 0.99)
            ),
            method: format!(
                "{ROUND_TRIPS} × ({COMMIT_BYTES} bytes appended to a file beside the stores, \
                 then fdatasync: what a recipient's commit writes to its growing log)"
            ),
        },
        Row {
            name: "client: the server's commit".into(),
            figure: format!(
                "p50 {commit:.0} µs (durable round trip p50 {:.0} µs − live {:.0} µs)",
                percentile(&stored, 0.5),
                percentile(&live, 0.5)
            ),
            method: format!(
                "same server, same run: {ROUND_TRIPS} CLASS_C and {ROUND_TRIPS} CLASS_A direct \
                 messages between two raw protocol clients, alternating in 10 slices; the \
                 difference of the medians (stored before delivery, at the server's default \
                 synchronous=NORMAL)"
            ),
        },
        row("client: SDK round trip, stores synchronous=NORMAL", &normal),
        row(
            "client: SDK round trip, stores synchronous=FULL (default)",
            &full,
        ),
        Row {
            name: "client: of which the send_message call (durable enqueue)".into(),
            figure: format!(
                "p50 {:.0} µs NORMAL, {:.0} µs FULL",
                percentile(&normal_calls, 0.5),
                percentile(&full_calls, 0.5)
            ),
            method: "same runs: from the call to its return (the item committed to the outbox \
                     and, with FULL, flushed; the send does not wait for the flush)"
                .into(),
        },
    ])
}

/// WebSocket dies (and cannot come back) → first message delivered over polling; then
/// the network heals → Realtime again. Default client settings.
async fn failover() -> Result<Vec<Row>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let server = TestServer::start(&dir.path().join("server")).await;
    let proxy = Proxy::start(server.addr).await.map_err(|e| e.to_string())?;
    let alice = open(
        config(
            &proxy.url(),
            &dir.path().join("a.db"),
            MachineConfig::default(),
        ),
        server.token("bench", "alice"),
    )
    .await?;
    let bob = open(
        config(
            &server.url(),
            &dir.path().join("b.db"),
            MachineConfig::default(),
        ),
        server.token("bench", "bob"),
    )
    .await?;
    let mut down = Vec::new();
    let mut up = Vec::new();
    for i in 0..FAILOVERS {
        for c in [&alice, &bob] {
            if !wait_state(c, ConnectionState::Realtime, Duration::from_secs(90)).await {
                return Err("failover: not realtime".into());
            }
        }
        // Let the connection settle (a probe that just succeeded starts the hysteresis).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut at_alice = alice.subscribe();
        proxy.set_mode(Mode::RefuseWebSocket);
        let t = Instant::now();
        proxy.cut_all();
        bob.send_message(OutgoingMessage::new(
            Target::User("alice".into()),
            "chat.text",
            json!({"text": "during failover", "i": i}),
        ))
        .await
        .map_err(|e| e.to_string())?;
        let Some(arrived) = next_message(&mut at_alice, Duration::from_secs(30)).await else {
            return Err("failover: message not delivered".into());
        };
        down.push((arrived - t).as_secs_f64() * 1e3);
        if !wait_state(&alice, ConnectionState::Polling, Duration::from_secs(10)).await {
            return Err(format!(
                "failover: not polling but {:?}",
                alice.connection_state()
            ));
        }
        proxy.set_mode(Mode::Pass);
        let healed = Instant::now();
        if !wait_state(&alice, ConnectionState::Realtime, Duration::from_secs(90)).await {
            return Err("failover: did not climb back".into());
        }
        up.push(healed.elapsed().as_secs_f64() * 1e3);
    }
    alice.shutdown().await;
    bob.shutdown().await;
    let down = sorted(down);
    let up = sorted(up);
    Ok(vec![
        Row {
            name: "client: WebSocket dies → first message over polling".into(),
            figure: format!(
                "median {:.0} ms (max {:.0} ms; target ≤ 2000)",
                percentile(&down, 0.5),
                down.last().copied().unwrap_or(0.0)
            ),
            method: format!(
                "{FAILOVERS} runs, default settings; a proxy cuts the socket and refuses upgrades, the peer sends at once; clock from the cut to the message at the app"
            ),
        },
        Row {
            name: "client: network heals → Realtime (WebSocket probe)".into(),
            figure: format!(
                "median {:.0} ms (max {:.0} ms)",
                percentile(&up, 0.5),
                up.last().copied().unwrap_or(0.0)
            ),
            method: "same runs; from the proxy passing upgrades again to Realtime: the probe schedule (2 s + up to 2 s jitter, growing while it flaps) plus one round trip".into(),
        },
    ])
}

/// Many clients lose the server; it returns. How long after its scheduled retry does
/// each client reach Realtime, and how spread are the reconnects (no burst)?
async fn herd_return() -> Result<Vec<Row>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut server = TestServer::start(&dir.path().join("server")).await;
    let mut clients = Vec::new();
    for i in 0..HERD {
        let c = open(
            config(
                &server.url(),
                &dir.path().join(format!("c{i}.db")),
                MachineConfig::default(),
            ),
            server.token("bench", &format!("user{i}")),
        )
        .await?;
        clients.push(c);
    }
    for c in &clients {
        if !wait_state(c, ConnectionState::Realtime, Duration::from_secs(30)).await {
            return Err("herd: not realtime".into());
        }
    }
    // One recorder per client, so that each change is timed when it happens.
    let recorders: Vec<_> = clients
        .iter()
        .map(|c| {
            let mut sub = c.subscribe();
            tokio::spawn(async move {
                let mut scheduled: Option<Instant> = None;
                let realtime = tokio::time::timeout(Duration::from_secs(60), async {
                    loop {
                        match sub.next().await {
                            Next::Update(u) => {
                                if let Update::State(s) = *u {
                                    if let Some(wait) = s.next_retry_in {
                                        scheduled = Some(Instant::now() + wait);
                                    }
                                    if s.to == ConnectionState::Realtime {
                                        return Some(Instant::now());
                                    }
                                }
                            }
                            Next::Missed(_) => {}
                            Next::Closed => return None,
                        }
                    }
                })
                .await
                .ok()
                .flatten();
                (scheduled, realtime)
            })
        })
        .collect();
    server.stop().await;
    // Let the clients fail a few times so that their schedules have grown.
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.restart().await;
    let restarted_at = Instant::now();
    // For each client: its last scheduled retry, and when it was Realtime again.
    let mut overheads = Vec::new();
    let mut reconnects = Vec::new();
    for recorder in recorders {
        let Ok((scheduled, Some(at))) = recorder.await else {
            return Err("herd: a client did not come back".into());
        };
        reconnects.push((at.saturating_duration_since(restarted_at)).as_secs_f64() * 1e3);
        let due = scheduled.map_or(restarted_at, |s| s.max(restarted_at));
        overheads.push((at.saturating_duration_since(due)).as_secs_f64() * 1e3);
    }
    for c in &clients {
        c.shutdown().await;
    }
    server.stop().await;
    let overheads = sorted(overheads);
    let reconnects = sorted(reconnects);
    Ok(vec![
        Row {
            name: "client: server returns → Realtime, after the scheduled retry".into(),
            figure: format!(
                "median {:.1} ms, p90 {:.1} ms",
                percentile(&overheads, 0.5),
                percentile(&overheads, 0.9)
            ),
            method: format!(
                "{HERD} clients, default settings; server stopped 3 s then restarted; per client: Realtime time minus max(restart, its last scheduled retry)"
            ),
        },
        Row {
            name: "client: reconnect spread after a server restart".into(),
            figure: format!(
                "p10 {:.0} ms, p50 {:.0} ms, p90 {:.0} ms after restart",
                percentile(&reconnects, 0.1),
                percentile(&reconnects, 0.5),
                percentile(&reconnects, 0.9)
            ),
            method: format!(
                "same {HERD} clients: full jitter spreads the reconnects instead of a burst"
            ),
        },
    ])
}

/// A memory figure of this process from `/proc/self/status`, in KiB (`VmRSS`: all
/// resident memory; `RssAnon`: heap and stacks, without the binary's code pages).
pub fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Builds and runs the memory probe (`client_memory`, a binary with only the client
/// linked) and reads its figures.
fn memory() -> Result<Vec<Row>, String> {
    // The profile apps embed.
    let exe = cargo_artifact(
        "mobile",
        &["-p", "webwaka-e2e", "--bin", "client_memory"],
        "client_memory",
    )?;
    let out = std::process::Command::new(exe)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "memory probe failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    let (Some(idle), Some(queued), Some(idle_anon), Some(queued_anon)) = (
        field("idle_kib="),
        field("queued_kib="),
        field("idle_anon_kib="),
        field("queued_anon_kib="),
    ) else {
        return Err(format!("memory probe said: {text}"));
    };
    let mib = |k: u64| k as f64 / 1024.0;
    Ok(vec![
        Row {
            name: "client: memory when idle".into(),
            figure: format!(
                "{:.1} MiB RSS, of which {:.1} MiB heap (target ≤ 10)",
                mib(idle),
                mib(idle_anon)
            ),
            method: "separate process linking only the client (bin client_memory, built with the `mobile` profile apps embed: opt-level s, fat LTO): tokio runtime (1 worker, as the SDK's) + one open client (store, supervisor), offline, after 2 s; VmRSS (code pages included) and RssAnon (heap and stacks)".into(),
        },
        Row {
            name: "client: memory with 10,000 queued items".into(),
            figure: format!(
                "{:.1} MiB RSS, of which {:.1} MiB heap (target ≤ 20)",
                mib(queued),
                mib(queued_anon)
            ),
            method: "same process after send_message × 10,000 (200-byte payloads) while offline; VmRSS and RssAnon".into(),
        },
    ])
}

/// The memory probe (in the child process): prints `idle_kib=` and `queued_kib=`.
pub fn memory_child() -> Result<(), String> {
    // One worker, as the SDK's own runtime (`ffi/src/runtime.rs`) that apps get.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        // Nothing listens on port 9 of loopback: the client stays offline.
        let mut config = ClientConfig::new("http://127.0.0.1:9", dir.path().join("m.db"));
        config.store.durability = Durability::Normal;
        let token = fake_token();
        let client = open(config, token).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle = status_kib("VmRSS:").unwrap_or(0);
        let idle_anon = status_kib("RssAnon:").unwrap_or(0);
        let payload = "x".repeat(180);
        for i in 0..10_000 {
            client
                .send_message(OutgoingMessage::new(
                    Target::Room("general".into()),
                    "chat.text",
                    json!({"text": payload, "i": i}),
                ))
                .await
                .map_err(|e| e.to_string())?;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let queued = status_kib("VmRSS:").unwrap_or(0);
        let queued_anon = status_kib("RssAnon:").unwrap_or(0);
        client.shutdown().await;
        println!("idle_kib={idle}");
        println!("idle_anon_kib={idle_anon}");
        println!("queued_kib={queued}");
        println!("queued_anon_kib={queued_anon}");
        Ok(())
    })
}

/// A well-formed (unsigned) token: the probe never reaches a server.
fn fake_token() -> String {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.sig",
        b64(r#"{"alg":"HS256","typ":"JWT"}"#),
        b64(r#"{"tenantId":"bench","userId":"probe","exp":4102444800}"#)
    )
}

/// Builds with `cargo build --profile <profile> <args>` (the cargo running this bench)
/// and returns `file` in that profile's output directory, next to the bench's own.
pub(crate) fn cargo_artifact(
    profile: &str,
    args: &[&str],
    file: &str,
) -> Result<std::path::PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = std::process::Command::new(&cargo)
        .args(["build", "--quiet", "--profile", profile])
        .args(args)
        .status()
        .map_err(|e| format!("cargo: {e}"))?;
    if !built.success() {
        return Err(format!(
            "cargo build --profile {profile} {} failed",
            args.join(" ")
        ));
    }
    // target/<profile of the bench>/bench → target/<profile>/<file>.
    std::env::current_exe()
        .map_err(|e| e.to_string())?
        .parent()
        .and_then(|dir| dir.parent())
        .map(|target| target.join(profile).join(file))
        .ok_or_else(|| "no target directory above the bench binary".into())
}

/// The size of the library apps link (`libwebwaka_realtime_ffi.so`), as built and
/// stripped: with the release profile, and with the `mobile` profile apps embed, built
/// as `scripts/build-android.sh` builds it. SQLCipher's crypto is the SDK's own provider
/// (ring and RustCrypto's AES, `core/src/store/crypto.rs`) in both: no libcrypto.
/// Builds each first (the same target dir; the first vendored OpenSSL build, which
/// Android's link needs but which links nothing in, takes minutes).
pub fn library_size() -> Result<Vec<Row>, String> {
    let variants: [(&str, &[&str], &str); 2] = [
        (
            "release",
            &["-p", "webwaka-realtime-ffi", "--lib"],
            "release profile; TLS (rustls, ring) and SQLCipher with the SDK's crypto \
             provider built in, no libcrypto",
        ),
        (
            "mobile",
            &[
                "-p",
                "webwaka-realtime-ffi",
                "--lib",
                "--features",
                "vendored-openssl",
            ],
            "mobile profile (opt-level s, fat LTO, one codegen unit, no debug info), as apps \
             ship it: TLS and SQLCipher with its crypto all linked statically, no libcrypto \
             (the feature only satisfies libsqlite3-sys's link on Android); target ≤ 8 MiB",
        ),
    ];
    let mut rows = Vec::new();
    for (profile, args, what) in variants {
        let target = cargo_artifact(profile, args, "libwebwaka_realtime_ffi.so")?;
        let built = std::fs::metadata(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        let stripped_path = std::env::temp_dir().join("webwaka-bench-lib-stripped.so");
        let stripped = std::process::Command::new("strip")
            .arg("-o")
            .arg(&stripped_path)
            .arg(&target)
            .status()
            .ok()
            .filter(|s| s.success())
            .and_then(|_| std::fs::metadata(&stripped_path).ok())
            .map(|m| m.len());
        let _ = std::fs::remove_file(&stripped_path);
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        rows.push(Row {
            name: format!("cdylib size, {profile} (libwebwaka_realtime_ffi.so, x86_64 Linux)"),
            figure: match stripped {
                Some(s) => format!(
                    "{:.1} MiB stripped ({:.1} MiB as built)",
                    mib(s),
                    mib(built.len())
                ),
                None => format!("{:.1} MiB as built", mib(built.len())),
            },
            method: format!(
                "cargo build --profile {profile} {}, then strip; {what}",
                args.join(" ")
            ),
        });
    }
    Ok(rows)
}
