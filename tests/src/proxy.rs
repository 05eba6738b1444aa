//! A fault-injecting TCP proxy between clients and the server, on loopback.
//!
//! Tests point clients at the proxy and change its [`Mode`] or act on the live
//! connections to simulate the networks mobile apps meet:
//!
//! - [`Mode::Pass`]: forward everything;
//! - [`Mode::RefuseWebSocket`]: answer WebSocket upgrade requests with 503 (a corporate
//!   proxy or captive portal that lets plain HTTP through), forward the rest;
//! - [`Mode::Refuse`]: close new connections at once (server down, connection refused);
//! - [`Mode::BlackHole`]: accept new connections and never answer (a dead route, no RST);
//! - [`Proxy::cut_all`]: drop every live connection (the network changed);
//! - [`Proxy::freeze_all`]: stop forwarding on the live connections without closing
//!   them (the OS still reports them open: only heartbeats can tell);
//! - [`Proxy::reset_all`]: reset every live connection (RST, a forgetful middlebox);
//! - [`Proxy::set_latency`]: delay every chunk, each way;
//! - [`Proxy::set_throttle`]: limit the bandwidth of each direction (a weak signal).
//!
//! With several targets ([`Proxy::balance`]) it is the load balancer in front of
//! several server instances: each new connection goes to the next target in turn
//! ([`Balance::RoundRobin`]), or, [`Balance::Sticky`], to the target a key picks (the
//! `lb` query parameter of the connection's first request, hashed, like nginx's
//! `hash $arg_lb consistent`: socket.io's long-polling requests must all reach the
//! instance that holds their session). A target that refuses connections is skipped,
//! as a load balancer's passive health check would; [`Proxy::set_target_up`] takes one
//! out of (or back into) rotation.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How the proxy treats new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward.
    Pass,
    /// Refuse WebSocket upgrades with 503; forward other requests.
    RefuseWebSocket,
    /// Close at once.
    Refuse,
    /// Accept and never answer.
    BlackHole,
}

/// How a proxy with several targets picks one for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// The next target in turn.
    RoundRobin,
    /// The target the `lb` query parameter's hash picks (round robin without one).
    Sticky,
}

#[derive(Debug)]
struct Shared {
    /// The targets and whether each is in rotation.
    targets: Mutex<Vec<(SocketAddr, bool)>>,
    balance: Balance,
    next: AtomicU64,
    mode: Mutex<Mode>,
    latency_ms: AtomicU64,
    /// Bandwidth per direction of each connection, bytes per second (0: unlimited).
    throttle_bps: AtomicU64,
    /// Set by `reset_all` before it bumps the epoch: the cut connections end with a
    /// TCP reset instead of a close.
    reset: std::sync::atomic::AtomicBool,
    /// Bumped by `cut_all`: connections of an older epoch end.
    epoch: watch::Sender<u64>,
    /// True while live connections must not forward.
    frozen: watch::Sender<bool>,
    accepted: AtomicU64,
}

/// The proxy. Dropping it stops accepting (live connections end with their peers).
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_all();
    }
}

impl Proxy {
    /// Starts a proxy on a free loopback port forwarding to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Proxy> {
        Self::balance(vec![target], Balance::RoundRobin).await
    }

    /// Starts a load balancer on a free loopback port in front of `targets`.
    pub async fn balance(targets: Vec<SocketAddr>, balance: Balance) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            targets: Mutex::new(targets.into_iter().map(|t| (t, true)).collect()),
            balance,
            next: AtomicU64::new(0),
            mode: Mutex::new(Mode::Pass),
            latency_ms: AtomicU64::new(0),
            throttle_bps: AtomicU64::new(0),
            reset: std::sync::atomic::AtomicBool::new(false),
            epoch: watch::channel(0).0,
            frozen: watch::channel(false).0,
            accepted: AtomicU64::new(0),
        });
        let accept_shared = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let _ = socket.set_nodelay(true);
                accept_shared.accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(handle(socket, accept_shared.clone()));
            }
        });
        Ok(Proxy { addr, shared, task })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How new connections are treated from now on.
    pub fn set_mode(&self, mode: Mode) {
        if let Ok(mut m) = self.shared.mode.lock() {
            *m = mode;
        }
    }

    /// Delay added to every chunk, each way.
    pub fn set_latency(&self, latency: Duration) {
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        self.shared.latency_ms.store(ms, Ordering::Relaxed);
    }

    /// Limits each direction of every connection to `bytes_per_sec` (`None`: no limit).
    pub fn set_throttle(&self, bytes_per_sec: Option<u64>) {
        self.shared
            .throttle_bps
            .store(bytes_per_sec.unwrap_or(0), Ordering::Relaxed);
    }

    /// Drops every live connection (each side sees the connection closed).
    pub fn cut_all(&self) {
        self.shared.reset.store(false, Ordering::Relaxed);
        self.shared.epoch.send_modify(|e| *e += 1);
    }

    /// Resets every live connection: each side sees a TCP reset (RST), as when a NAT or
    /// a middlebox forgets the connection.
    pub fn reset_all(&self) {
        self.shared.reset.store(true, Ordering::Relaxed);
        self.shared.epoch.send_modify(|e| *e += 1);
    }

    /// Stops (`true`) or resumes (`false`) forwarding on every live connection.
    pub fn freeze_all(&self, frozen: bool) {
        self.shared.frozen.send_replace(frozen);
    }

    /// Takes target `index` out of rotation (`false`) or puts it back.
    pub fn set_target_up(&self, index: usize, up: bool) {
        if let Ok(mut targets) = self.shared.targets.lock()
            && let Some(target) = targets.get_mut(index)
        {
            target.1 = up;
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

async fn handle(mut client: TcpStream, shared: Arc<Shared>) {
    let mode = shared.mode.lock().map(|m| *m).unwrap_or(Mode::Pass);
    let mut epoch = shared.epoch.subscribe();
    let born = *epoch.borrow_and_update();
    match mode {
        Mode::Refuse => return,
        Mode::BlackHole => {
            // Keep the socket open, read and discard, until cut.
            let mut buf = [0u8; 4096];
            loop {
                tokio::select! {
                    r = client.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return },
                    _ = epoch.changed() => return,
                }
            }
        }
        Mode::Pass | Mode::RefuseWebSocket => {}
    }
    // Read the first request's head, to recognise a WebSocket upgrade.
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let is_upgrade = String::from_utf8_lossy(&head)
        .to_ascii_lowercase()
        .contains("upgrade: websocket");
    if mode == Mode::RefuseWebSocket && is_upgrade {
        let _ = client
            .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await;
        return;
    }
    let Some(mut server) = connect_target(&shared, &head).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    if server.write_all(&head).await.is_err() {
        return;
    }
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let mut up = std::pin::pin!(pump(cr, sw, shared.clone(), born));
    let mut down = std::pin::pin!(pump(sr, cw, shared.clone(), born));
    // When either direction ends, the connection ends; after a reset the other
    // direction is let to see it too (dropping it now would close, not reset).
    let up_ended = tokio::select! {
        () = &mut up => true,
        () = &mut down => false,
    };
    if shared.reset.load(Ordering::Relaxed) {
        let rest = async { if up_ended { down.await } else { up.await } };
        let _ = tokio::time::timeout(Duration::from_secs(1), rest).await;
    }
}

/// Connects to the target for a connection whose first request is `head`: the sticky
/// key's target or the next in turn, trying the others (in order) when it refuses.
async fn connect_target(shared: &Shared, head: &[u8]) -> Option<TcpStream> {
    let targets: Vec<SocketAddr> = shared
        .targets
        .lock()
        .map(|t| t.iter().filter(|(_, up)| *up).map(|(a, _)| *a).collect())
        .unwrap_or_default();
    if targets.is_empty() {
        return None;
    }
    let n = targets.len() as u64;
    let first = match (shared.balance, sticky_key(head)) {
        (Balance::Sticky, Some(key)) => {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            key.hash(&mut hasher);
            hasher.finish() % n
        }
        _ => shared.next.fetch_add(1, Ordering::Relaxed) % n,
    };
    for i in 0..n {
        let target = targets[((first + i) % n) as usize];
        if let Ok(server) = TcpStream::connect(target).await {
            return Some(server);
        }
    }
    None
}

/// The `lb` query parameter of the request line in `head`.
fn sticky_key(head: &[u8]) -> Option<String> {
    let line = head.split(|b| *b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let target = line.split(' ').nth(1)?;
    let (_, query) = target.split_once('?')?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("lb="))
        .map(str::to_owned)
}

/// Ends one direction after a cut: closed (FIN), or reset when `reset_all` asked. A
/// reset sets SO_LINGER 0 on both sockets and leaves the write half without its
/// shutdown (which would send a FIN first), so that the closing sends RST.
fn cut(from: tokio::net::tcp::OwnedReadHalf, to: tokio::net::tcp::OwnedWriteHalf, shared: &Shared) {
    if shared.reset.load(Ordering::Relaxed) {
        let _ = from.as_ref().set_zero_linger();
        let _ = to.as_ref().set_zero_linger();
        to.forget();
    }
    drop(from);
}

/// Copies one direction, honouring latency, freezes and cuts.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
    born: u64,
) {
    let mut epoch = shared.epoch.subscribe();
    let mut frozen = shared.frozen.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if *epoch.borrow_and_update() != born {
            return cut(from, to, &shared);
        }
        // While frozen, read nothing (the peer's data waits in kernel buffers).
        while *frozen.borrow_and_update() {
            tokio::select! {
                r = frozen.changed() => if r.is_err() { return },
                _ = epoch.changed() => return,
            }
        }
        // Throttled: small reads, each followed by the time it takes at that rate.
        let throttle = shared.throttle_bps.load(Ordering::Relaxed);
        let chunk = if throttle > 0 {
            usize::try_from(throttle / 20)
                .unwrap_or(buf.len())
                .clamp(64, buf.len())
        } else {
            buf.len()
        };
        let n = tokio::select! {
            r = from.read(&mut buf[..chunk]) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = epoch.changed() => return cut(from, to, &shared),
            _ = frozen.changed() => continue,
        };
        let latency = shared.latency_ms.load(Ordering::Relaxed);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        let n_bytes = u64::try_from(n).unwrap_or(u64::MAX);
        if let Some(us) = n_bytes.saturating_mul(1_000_000).checked_div(throttle) {
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
        if *frozen.borrow() {
            // Frozen while this chunk was in hand: hold it until thawed.
            while *frozen.borrow_and_update() {
                tokio::select! {
                    r = frozen.changed() => if r.is_err() { return },
                    _ = epoch.changed() => return,
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An echo server on loopback.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn reset_all_ends_live_connections_with_a_reset() {
        let proxy = Proxy::start(echo().await).await.unwrap();
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = client.read(&mut buf).await.unwrap();
        assert!(n > 0, "echoed through the proxy");
        proxy.reset_all();
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .unwrap();
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );
    }

    #[tokio::test]
    async fn a_balancer_takes_turns_sticks_to_a_key_and_skips_a_dead_target() {
        // Three "instances" that answer with their number.
        let mut targets = Vec::new();
        for i in 0..3u8 {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            targets.push(listener.local_addr().unwrap());
            tokio::spawn(async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let mut buf = [0u8; 1024];
                        let _ = socket.read(&mut buf).await;
                        let _ = socket.write_all(&[b'0' + i]).await;
                    });
                }
            });
        }
        let ask = |addr: SocketAddr, path: &'static str| async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut buf = [0u8; 1];
            c.read_exact(&mut buf).await.unwrap();
            buf[0]
        };
        let lb = Proxy::balance(targets.clone(), Balance::Sticky)
            .await
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(ask(lb.addr(), "/x").await);
        }
        seen.sort_unstable();
        assert_eq!(seen, b"012", "round robin without a key");
        let a = ask(lb.addr(), "/socket.io/?lb=alice&t=1").await;
        for _ in 0..5 {
            assert_eq!(ask(lb.addr(), "/socket.io/?t=2&lb=alice").await, a);
        }
        lb.set_target_up(usize::from(a - b'0'), false);
        for _ in 0..3 {
            assert_ne!(ask(lb.addr(), "/socket.io/?lb=alice").await, a);
        }
    }

    #[tokio::test]
    async fn a_throttle_bounds_the_rate() {
        let proxy = Proxy::start(echo().await).await.unwrap();
        proxy.set_throttle(Some(20_000));
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        let head = b"GET / HTTP/1.1\r\n\r\n";
        let body = vec![b'x'; 8_000];
        let started = std::time::Instant::now();
        client.write_all(head).await.unwrap();
        client.write_all(&body).await.unwrap();
        let mut got = 0;
        let mut buf = [0u8; 4096];
        while got < head.len() + body.len() {
            got += client.read(&mut buf).await.unwrap();
        }
        // 8 KB at 20 KB/s each way: at least 0.4 s (the head went through unthrottled
        // reads, so the body alone is counted).
        assert!(
            started.elapsed() >= Duration::from_millis(350),
            "{:?}",
            started.elapsed()
        );
    }
}
