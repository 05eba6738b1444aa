//! Wake-ups of a client process (issue 13): the context switches of all its threads,
//! summed from `/proc/PID/task/*/status` (`voluntary_ctxt_switches` +
//! `nonvoluntary_ctxt_switches`), in three states:
//!
//! - idle and connected (Realtime, a heartbeat every 30 s, nothing sent);
//! - offline in Suspended (nobody listens; `suspend_after` shortened to reach it soon,
//!   its retry timing as in production);
//! - backgrounded (`background()` called while connected; parked after the linger),
//!   the server still up and pinging: what is left is what the app asks for.
//!
//! The client runs alone in a child process (`bin/client_wakeups.rs`, built with the
//! `mobile` profile apps embed), so that the server and this benchmark are not counted;
//! the server runs here, on loopback. Not run by the tests or CI: it takes 23 minutes
//! (`WEBWAKA_BENCH_WAKEUPS=suspended,background` measures only the states named).
//! `tests/tests/client_wakeups.rs` guards the supervisor's share in virtual time.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use webwaka_realtime::client::ClientConfig;
use webwaka_realtime::machine::ConnectionState;

use super::{Row, wanted};

/// Names the states to measure, e.g. `suspended,background` (unset: all three).
const ONLY_ENV: &str = "WEBWAKA_BENCH_WAKEUPS";
use crate::harness::{TestServer, wait_state};

/// Idle and connected: measured over this, after this long settled (the entity pulls
/// have backed off from 10 s to over 5 min by then: the steady state).
const CONNECTED_SETTLE: Duration = Duration::from_secs(330);
const CONNECTED_WINDOW: Duration = Duration::from_secs(120);
/// Suspended: measured over this, long enough to hold two of its retries (every
/// 2.5–5 min).
const SUSPENDED_SETTLE: Duration = Duration::from_secs(15);
const SUSPENDED_WINDOW: Duration = Duration::from_secs(600);
/// Backgrounded: measured over this, after the 10 s linger and as long again.
const BACKGROUND_SETTLE: Duration = Duration::from_secs(20);
const BACKGROUND_WINDOW: Duration = Duration::from_secs(300);

/// Context switches per thread id of process `pid`.
fn switches(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let total: u64 = status
            .lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches:")
                    || l.starts_with("nonvoluntary_ctxt_switches:")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        out.insert(task.file_name().to_string_lossy().into_owned(), total);
    }
    out
}

/// Switches between two samples: threads present in both count their difference; a
/// thread born in between counts all of its own (a thread that ended in between is
/// not counted: the figure is a lower bound when threads come and go).
fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> u64 {
    after
        .iter()
        .map(|(tid, n)| n.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

/// Runs the probe in `mode` against `url` until it prints `ready`, lets it settle,
/// measures it over `window` and stops it: (switches per hour, threads at the end).
async fn measure(
    exe: &std::path::Path,
    (mode, settle, window): (&str, Duration, Duration),
    url: &str,
    token: &str,
) -> Result<(f64, usize), String> {
    let mut child = Command::new(exe)
        .args([mode, url, token])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("probe: {e}"))?;
    let guard_pid = child.id();
    let stdout = child.stdout.take().ok_or("probe: no stdout")?;
    let ready = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.trim() == "ready")
    });
    let ready = tokio::time::timeout(Duration::from_secs(120), ready).await;
    let result = match ready {
        Ok(Ok(true)) => {
            tokio::time::sleep(settle).await;
            let before = switches(guard_pid);
            tokio::time::sleep(window).await;
            let after = switches(guard_pid);
            let per_hour = delta(&before, &after) as f64 * 3600.0 / window.as_secs_f64();
            Ok((per_hour, after.len()))
        }
        _ => Err(format!("probe ({mode}) never became ready")),
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Builds the probe, runs both states, returns their rows.
pub fn run() -> Result<Vec<Row>, String> {
    // The profile apps embed.
    let exe = super::client::cargo_artifact(
        "mobile",
        &["-p", "webwaka-e2e", "--bin", "client_wakeups"],
        "client_wakeups",
    )?;
    let exe = exe.as_path();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let server = TestServer::start_with(dir.path(), |c| {
            c.ping_interval_ms = 30_000;
            c.ping_timeout_ms = 120_000;
        })
        .await;
        let token = server.token("bench", "probe");
        let mut rows = Vec::new();
        if wanted(ONLY_ENV, "connected") {
            let state = ("connected", CONNECTED_SETTLE, CONNECTED_WINDOW);
            let (connected, threads) = measure(exe, state, &server.url(), &token).await?;
            rows.push(Row {
                name: "client: wake-ups per hour, idle and connected".into(),
                figure: format!("{connected:.0}/h (target ≤ 500; {threads} threads)"),
                method: format!(
                    "separate process linking only the client (bin client_wakeups, `mobile` profile): tokio runtime (1 worker, as the SDK's) + one client in Realtime against the local server on loopback, the server pinging every 30 s (the client, hearing it, sends no pings of its own), nothing sent; context switches of all its threads (/proc/PID/task/*/status, voluntary + nonvoluntary) over {} s after {} s settled (entity pulls backed off), × 3600/{}",
                    CONNECTED_WINDOW.as_secs(),
                    CONNECTED_SETTLE.as_secs(),
                    CONNECTED_WINDOW.as_secs()
                ),
            });
        }
        if wanted(ONLY_ENV, "suspended") {
            // Nothing listens on port 9 of loopback.
            let state = ("suspended", SUSPENDED_SETTLE, SUSPENDED_WINDOW);
            let (suspended, _) = measure(exe, state, "http://127.0.0.1:9", &token).await?;
            rows.push(Row {
                name: "client: wake-ups per hour, offline in Suspended".into(),
                figure: format!("{suspended:.0}/h (target ≤ 100)"),
                method: format!(
                    "same probe, server unreachable (loopback port 9), suspend_after 5 s to reach Suspended soon (retries every 2.5–5 min as in production); same count over {} s after {} s in Suspended",
                    SUSPENDED_WINDOW.as_secs(),
                    SUSPENDED_SETTLE.as_secs()
                ),
            });
        }
        if wanted(ONLY_ENV, "background") {
            let state = ("background", BACKGROUND_SETTLE, BACKGROUND_WINDOW);
            let (background, _) = measure(exe, state, &server.url(), &token).await?;
            rows.push(Row {
                name: "client: wake-ups per hour, backgrounded".into(),
                figure: format!("{background:.0}/h (target: only what the app asks; here nothing)"),
                method: format!(
                    "same probe, connected to the local server (still pinging every 30 s), then background() and parked after the 10 s linger (connection closed, no timers); the app asks for nothing; same count over {} s after {} s",
                    BACKGROUND_WINDOW.as_secs(),
                    BACKGROUND_SETTLE.as_secs()
                ),
            });
        }
        Ok(rows)
    })
}

/// The probe (in the child process): opens one client in `mode` (`connected`,
/// `suspended` or `background`), prints `ready` once there, then idles until killed.
pub fn child(mode: &str, url: &str, token: &str) -> Result<(), String> {
    // As the SDK's own runtime (ffi/src/runtime.rs): one worker;
    // `WEBWAKA_PROBE_WORKERS` compares with more.
    let workers = std::env::var("WEBWAKA_PROBE_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut config = ClientConfig::new(url, dir.path().join("probe.db"));
        config.machine.ping_interval = Duration::from_secs(30);
        let want = match mode {
            "connected" => ConnectionState::Realtime,
            "suspended" => {
                config.machine.suspend_after = Duration::from_secs(5);
                ConnectionState::Suspended
            }
            "background" => ConnectionState::Realtime,
            other => return Err(format!("unknown mode {other:?}")),
        };
        let client = webwaka_realtime::client::Client::open(
            config,
            std::sync::Arc::new(webwaka_realtime::client::StaticToken(token.to_owned())),
        )
        .await
        .map_err(|e| e.to_string())?;
        if !wait_state(&client, want, Duration::from_secs(90)).await {
            return Err(format!("not {want:?} but {:?}", client.connection_state()));
        }
        if mode == "background" {
            client.background();
            let linger = Duration::from_secs(30);
            if !wait_state(&client, ConnectionState::Offline, linger).await {
                return Err(format!("not parked: {:?}", client.connection_state()));
            }
        }
        println!("ready");
        // Until killed (bounded all the same).
        tokio::time::sleep(Duration::from_secs(7200)).await;
        client.shutdown().await;
        Ok(())
    })
}
