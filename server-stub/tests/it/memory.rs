//! A regression guard on the server's memory per idle WebSocket connection (the issue
//! asks for at most 8 KiB): the real binary in its own process, N idle connections,
//! the growth of its resident memory divided by N.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::common::SECRET;

/// Connections opened (the sandbox allows about 20,000 open files per process).
const CONNECTIONS: usize = 2000;
/// The bound checked, in bytes per idle connection: the 8 KiB for an optimised
/// build; unoptimised builds (plain `cargo test`) carry larger futures.
const BOUND: u64 = if cfg!(debug_assertions) {
    14 * 1024
} else {
    8 * 1024
};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn idle_connections_cost_little_memory() {
    if !std::path::Path::new("/proc/self/status").exists() {
        return; // not Linux: nothing to measure with
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_webwaka-server-stub"))
            .env("WS_PORT", "0")
            .env("DATA_DIR", dir.path())
            .env("JWT_SECRET", SECRET)
            .env("LOG_LEVEL", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let stdout = child.0.stdout.take().unwrap();
    // Read the banner for the address, and keep draining stdout after it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.trim().strip_prefix("listening") {
                let addr = rest
                    .split_whitespace()
                    .next()
                    .map(|u| u.trim_start_matches("http://").to_owned());
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(10))
        .ok()
        .flatten()
        .expect("the banner names the address");
    let token = webwaka_server_stub::Keys::new(SECRET.as_bytes(), 0).mint("t1", "idle", &[], 3600);
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0);
    let connect = |i: usize| {
        let mut request = format!("ws://{addr}/ws?clientId=c{i}")
            .into_client_request()
            .unwrap();
        request.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        async move {
            let (mut ws, _) =
                tokio_tungstenite::connect_async_with_config(request, Some(config), false)
                    .await
                    .unwrap();
            // Read `connected`, so the connection is fully set up.
            let _ = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
            ws
        }
    };
    // Warm up (runtime threads, caches), then measure the growth.
    let mut warm = Vec::new();
    for i in 0..50 {
        warm.push(connect(i).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kib(pid);
    let mut conns = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        conns.push(connect(1000 + i).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss_kib(pid);
    let per_conn = (after.saturating_sub(before) * 1024) / CONNECTIONS as u64;
    eprintln!(
        "server memory per idle connection: {per_conn} bytes ({before} KiB -> {after} KiB for {CONNECTIONS})"
    );
    assert!(
        per_conn <= BOUND,
        "{per_conn} bytes per idle connection is over the {BOUND} bound"
    );
    drop(conns);
    drop(warm);
}
