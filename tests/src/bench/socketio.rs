//! The `socketio` group (issue 14): socket.io clients (npm `socket.io-client`, driven by
//! `tests/socketio/bench-client.mjs`) against our `/socket.io`, the same work over our
//! `/ws` (npm `ws` client), and the Node.js socket.io server relaying the same messages
//! (`tests/socketio/bench-server.mjs`, the original's stack), each in the same run.
//!
//! Each server runs in a process of its own (ours: this binary as the server child,
//! like the `server` group; Node.js: `node bench-server.mjs`), so that its CPU time
//! (`/proc/PID/stat`, utime + stime) and resident memory (`VmRSS`) are its own. The
//! driver connects and warms up, says `ready`, the CPU time (or memory) is read, the
//! driver runs the measured part on `go` and reports, the CPU time (or memory) is read
//! again. Equal work: live (`CLASS_A`) messages against Node.js's relay, which stores
//! nothing; durable (`CLASS_C`) messages, which ours stores before acking, reported
//! apart. Needs `node` and `scripts/install-node-deps.sh`.
//!
//! Figures: round trip p50/p99 and server CPU per message (a message to a user echoed
//! back, 2,000 round trips after 200 unmeasured); fan-out of a room message to 1,000
//! members (time to the last delivery, server CPU per fan-out; 20 after 3); memory per
//! idle connection (2,000 WebSocket connections opened after 20).

use std::io::{BufRead, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

use super::server::{CHILD_SERVER, ChildProc, SECRET, TENANT, clock_ticks_per_sec};
use super::{Row, median, percentile, sorted, wanted};

/// Names the parts to run (`roundtrip,fanout,idle`; all when unset).
pub const ONLY_ENV: &str = "WEBWAKA_BENCH_SOCKETIO";
const ROUND_TRIPS: usize = 2_000;
const ROUND_TRIP_WARMUP: usize = 200;
const FANOUT_MEMBERS: usize = 1_000;
const FANOUTS: usize = 20;
const FANOUT_WARMUP: usize = 3;
const IDLE_CONNECTIONS: usize = 2_000;
/// Longest wait for a driver's line.
const WAIT: Duration = Duration::from_secs(300);

/// The three servers compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Ours, at `/socket.io`.
    SocketIo,
    /// Ours, at `/ws`.
    Ws,
    /// Node.js socket.io 4 (the reference relay).
    Node,
}

impl Target {
    const ALL: [Target; 3] = [Target::SocketIo, Target::Ws, Target::Node];

    fn label(self) -> &'static str {
        match self {
            Target::SocketIo => "our /socket.io",
            Target::Ws => "our /ws",
            Target::Node => "Node.js socket.io",
        }
    }

    /// The driver's `kind`.
    fn kind(self) -> &'static str {
        match self {
            Target::SocketIo => "socketio",
            Target::Ws => "ws",
            Target::Node => "node",
        }
    }
}

/// `tests/socketio`, with its packages installed.
fn socketio_dir() -> Result<PathBuf, String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("socketio");
    if !dir.join("node_modules/socket.io").is_dir() {
        return Err(
            "the Node.js packages are not installed: run scripts/install-node-deps.sh".into(),
        );
    }
    Ok(dir)
}

/// A server under test: ours (the server child) or Node.js's.
enum Server {
    Ours(ChildProc),
    Node(NodeProc),
}

impl Server {
    fn start(target: Target) -> Result<Self, String> {
        Ok(match target {
            Target::SocketIo | Target::Ws => Server::Ours(ChildProc::spawn(CHILD_SERVER)?),
            Target::Node => Server::Node(NodeProc::spawn()?),
        })
    }

    fn pid(&self) -> u32 {
        match self {
            Server::Ours(p) => p.pid(),
            Server::Node(p) => p.child.id(),
        }
    }

    fn url(&self) -> String {
        match self {
            Server::Ours(p) => format!("http://{}", p.addr),
            Server::Node(p) => format!("http://{}", p.addr),
        }
    }

    fn cpu_secs(&self) -> Result<f64, String> {
        cpu_secs(self.pid())
    }

    fn rss_kib(&self) -> Result<u64, String> {
        rss_kib(self.pid())
    }

    fn stop(self) {
        match self {
            Server::Ours(p) => p.stop(),
            Server::Node(p) => drop(p),
        }
    }
}

/// `node bench-server.mjs`, stopped (stdin closed, then killed) when dropped.
struct NodeProc {
    child: Child,
    stdin: Option<ChildStdin>,
    addr: String,
}

impl NodeProc {
    fn spawn() -> Result<Self, String> {
        let dir = socketio_dir()?;
        let mut child = Command::new("node")
            .arg("bench-server.mjs")
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("node: {e}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut proc = Self {
            child,
            stdin,
            addr: String::new(),
        };
        let lines = spawn_reader(stdout);
        let line = lines
            .recv_timeout(WAIT)
            .map_err(|_| "the Node.js server did not say where it listens".to_owned())?;
        proc.addr = line
            .strip_prefix("addr=")
            .ok_or_else(|| format!("unexpected line {line:?}"))?
            .to_owned();
        Ok(proc)
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        for _ in 0..250 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `stdout` line by line on a thread of its own.
fn spawn_reader(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// CPU time (user + system) of process `pid` so far, in seconds.
fn cpu_secs(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or("unreadable /proc/PID/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `after` starts at field 3.
    let ticks = |i: usize| -> Result<u64, String> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| "unreadable /proc/PID/stat".to_owned())
    };
    Ok((ticks(14)? + ticks(15)?) as f64 / clock_ticks_per_sec())
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> Result<u64, String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS".to_owned())
}

/// One run of the driver: `ready`, then `before()`, `go`, `done {json}`, `after()`.
fn drive<T>(
    server: &Server,
    target: Target,
    mode: &str,
    settings: Value,
    mut measure: impl FnMut(&Server) -> Result<T, String>,
) -> Result<(T, T, Value), String> {
    let dir = socketio_dir()?;
    let mut settings = settings;
    settings["url"] = json!(server.url());
    settings["kind"] = json!(target.kind());
    settings["secret"] = json!(SECRET);
    settings["tenant"] = json!(TENANT);
    let mut child = Command::new("node")
        .arg("bench-client.mjs")
        .arg(mode)
        .current_dir(&dir)
        .env("BENCH", settings.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("node: {e}"))?;
    let result = (|| {
        let mut stdin = child.stdin.take().ok_or("no stdin")?;
        let lines = spawn_reader(child.stdout.take().ok_or("no stdout")?);
        let next = || {
            lines
                .recv_timeout(WAIT)
                .map_err(|_| format!("the {mode} driver stopped answering ({})", target.label()))
        };
        let ready = next()?;
        if ready != "ready" {
            return Err(format!("unexpected line {ready:?}"));
        }
        let before = measure(server)?;
        writeln!(stdin, "go").map_err(|e| e.to_string())?;
        let done = next()?;
        let report = done
            .strip_prefix("done ")
            .ok_or_else(|| format!("unexpected line {done:?}"))?;
        let report: Value = serde_json::from_str(report).map_err(|e| e.to_string())?;
        let after = measure(server)?;
        drop(stdin);
        Ok((before, after, report))
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn numbers(report: &Value, key: &str) -> Vec<f64> {
    report[key]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

/// Runs the group.
pub fn run() -> Result<Vec<Row>, String> {
    socketio_dir()?;
    let mut rows = Vec::new();
    if wanted(ONLY_ENV, "roundtrip") {
        rows.extend(round_trips()?);
    }
    if wanted(ONLY_ENV, "fanout") {
        rows.extend(fanouts()?);
    }
    if wanted(ONLY_ENV, "idle") {
        rows.extend(idle()?);
    }
    Ok(rows)
}

fn round_trips() -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    let runs: Vec<(Target, &str)> = Target::ALL
        .iter()
        .map(|t| (*t, "CLASS_A"))
        .chain([(Target::SocketIo, "CLASS_C"), (Target::Ws, "CLASS_C")])
        .collect();
    for (target, class) in runs {
        let server = Server::start(target)?;
        let settings = json!({
            "interactionClass": class,
            "count": ROUND_TRIPS,
            "warmup": ROUND_TRIP_WARMUP,
        });
        let (before, after, report) =
            drive(&server, target, "roundtrip", settings, Server::cpu_secs)?;
        server.stop();
        let samples = sorted(numbers(&report, "samplesUs"));
        let messages = report["messages"].as_f64().unwrap_or(1.0).max(1.0);
        let cpu_us = (after - before) * 1e6 / messages;
        let what = if class == "CLASS_A" {
            "live"
        } else {
            "durable"
        };
        rows.push(Row {
            name: format!("socket.io group: round trip, {what}, {}", target.label()),
            figure: format!(
                "p50 {:.0} µs, p99 {:.0} µs; {cpu_us:.1} µs server CPU per message",
                percentile(&samples, 0.5),
                percentile(&samples, 0.99)
            ),
            method: format!(
                "a {class} message to a user, echoed back by its recipient: {ROUND_TRIPS} sequential \
                 round trips after {ROUND_TRIP_WARMUP} unmeasured, timed in the sending Node.js \
                 client ({}); server CPU = utime + stime of the server process (/proc/PID/stat) \
                 over the measured round trips ÷ the {} messages relayed",
                client_of(target),
                2 * ROUND_TRIPS
            ),
        });
    }
    Ok(rows)
}

fn client_of(target: Target) -> &'static str {
    match target {
        Target::Ws => "npm ws 8.23",
        Target::SocketIo | Target::Node => "npm socket.io-client 4.8.4, WebSocket transport",
    }
}

fn fanouts() -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    let runs: Vec<(Target, &str)> = Target::ALL
        .iter()
        .map(|t| (*t, "CLASS_A"))
        .chain([(Target::SocketIo, "CLASS_C")])
        .collect();
    for (target, class) in runs {
        let server = Server::start(target)?;
        let settings = json!({
            "interactionClass": class,
            "members": FANOUT_MEMBERS,
            "count": FANOUTS,
            "warmup": FANOUT_WARMUP,
        });
        let (before, after, report) = drive(&server, target, "fanout", settings, Server::cpu_secs)?;
        server.stop();
        let mut samples = numbers(&report, "samplesMs");
        let cpu_ms = (after - before) * 1e3 / FANOUTS as f64;
        let what = if class == "CLASS_A" {
            "live"
        } else {
            "durable"
        };
        rows.push(Row {
            name: format!(
                "socket.io group: fan-out to {FANOUT_MEMBERS}, {what}, {}",
                target.label()
            ),
            figure: format!(
                "{:.1} ms to the last member; {cpu_ms:.2} ms server CPU per fan-out",
                median(&mut samples)
            ),
            method: format!(
                "one {class} room message to {FANOUT_MEMBERS} members, each its own user and \
                 connection ({}, one Node.js process): median over {FANOUTS} (after \
                 {FANOUT_WARMUP}) of the time from the emit to the last member's receipt; server \
                 CPU (/proc/PID/stat) over the {FANOUTS} ÷ {FANOUTS}",
                client_of(target)
            ),
        });
    }
    Ok(rows)
}

fn idle() -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for target in Target::ALL {
        let server = Server::start(target)?;
        let settings = json!({ "connections": IDLE_CONNECTIONS });
        let (before, after, _) = drive(&server, target, "idle", settings, Server::rss_kib)?;
        server.stop();
        let per = after.saturating_sub(before) as f64 / IDLE_CONNECTIONS as f64;
        let target_note = match target {
            Target::SocketIo => "; target ≤ 16 KiB",
            _ => "",
        };
        rows.push(Row {
            name: format!("socket.io group: memory per idle connection, {}", target.label()),
            figure: format!("{per:.2} KiB{target_note}"),
            method: format!(
                "server VmRSS after − before opening {IDLE_CONNECTIONS} idle connections (each its \
                 own user; {}; after 20 unmeasured), 1 s after the last connected, ÷ {IDLE_CONNECTIONS}",
                client_of(target)
            ),
        });
    }
    Ok(rows)
}
