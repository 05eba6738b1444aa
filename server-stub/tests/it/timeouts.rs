//! Connections that never finish (issue 17): the header and idle timeouts close them on
//! time while a normal client is served; nothing cuts a request in flight or a
//! WebSocket; `HTTP_MAX_CONNECTIONS` sheds connections past it at accept while upgraded
//! WebSockets and polls go on. Raw sockets on loopback, every wait bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::common::{TestServer, eventually, message};

/// How late after its deadline a close may come on a loaded two-core machine (the
/// server closes at the deadline; this only bounds the test's wait).
const LATE: Duration = Duration::from_secs(2);
/// How early a close may come: none (tokio timers never fire early, and the server's
/// clock starts at its accept, after the client's connect returned); 5 ms for rounding.
const EARLY: Duration = Duration::from_millis(5);

/// Connections a test has connecting at once: well within the listen backlog, so that
/// no handshake is dropped and retried a second later (which the timings would see).
const CONNECTING: usize = 64;

/// Raises this process's open-file limit to its hard limit: the tests open thousands
/// of sockets, and each loopback connection costs two descriptors here.
fn raise_open_files() {
    if let Some(Err(error)) = webwaka_server_stub::raise_descriptor_limit() {
        panic!("cannot raise the open-file limit: {error}");
    }
}

fn addr(ts: &TestServer) -> SocketAddr {
    ts.running().local_addr()
}

/// Reads (and drops) whatever comes until the peer closes; the time from `since` then,
/// or `None` when it is still open after `wait`.
async fn closed_after(stream: &mut TcpStream, since: Instant, wait: Duration) -> Option<Duration> {
    let deadline = since + wait;
    let mut sink = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(since.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// Reads one HTTP/1.1 response (headers and a `Content-Length` body): its status and
/// body.
async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            let n = stream.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed before the response ended: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            let Some(end) = text.find("\r\n\r\n") else {
                continue;
            };
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                let status = text[9..12].parse().expect("status");
                return (status, text[end + 4..end + 4 + length].to_owned());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("a response within 5 s")
}

/// `GET path` on an open keep-alive connection (with `token`): status and JSON body.
async fn get_on(stream: &mut TcpStream, path: &str, token: Option<&str>) -> (u16, Value) {
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let (status, body) = read_response(stream).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// A line of `/metrics` read on an open keep-alive connection.
async fn metric_on(stream: &mut TcpStream, line_prefix: &str) -> u64 {
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (_, text) = read_response(stream).await;
    let prefix = format!("{line_prefix} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_prefix} in {text}"))
}

/// A counter of `/metrics` (`webwaka_http_connections_closed_total{reason="…"}`, or
/// a plain name).
async fn metric(ts: &TestServer, line_prefix: &str) -> u64 {
    let text = ts
        .http
        .get(ts.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("{line_prefix} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_prefix} in {text}"))
}

fn closed_by(reason: &str) -> String {
    format!("webwaka_http_connections_closed_total{{reason=\"{reason}\"}}")
}

/// What each kind of unfinished connection sends before it goes quiet (or drips).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Nothing at all.
    Silent,
    /// Half a request line.
    Partial,
    /// A request line, then one header byte every 100 ms, for ever.
    Drip,
    /// A WebSocket upgrade request without the blank line that ends its headers.
    Upgrade,
}

/// Opens one connection of `kind` (at most [`CONNECTING`] of them connecting at once)
/// and waits (at most `header + LATE`) for the server to close it; how long after the
/// connect began that was.
async fn unfinished(
    addr: SocketAddr,
    kind: Kind,
    token: String,
    header: Duration,
    connecting: Arc<Semaphore>,
) -> Duration {
    let permit = connecting.acquire_owned().await.expect("semaphore");
    // Before the connect: the server's clock starts later, at its accept.
    let opened = Instant::now();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    drop(permit);
    let first = match kind {
        Kind::Silent => String::new(),
        Kind::Partial => "GET /heal".to_owned(),
        Kind::Drip => "GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ".to_owned(),
        Kind::Upgrade => format!(
            "GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        ),
    };
    if !first.is_empty() {
        stream.write_all(first.as_bytes()).await.expect("write");
    }
    let wait = header + LATE;
    if kind != Kind::Drip {
        return closed_after(&mut stream, opened, wait)
            .await
            .unwrap_or_else(|| panic!("{kind:?} still open after {wait:?}"));
    }
    // Drip until the server closes: a read sees the end, or a write fails.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut sink = [0u8; 64];
    loop {
        tokio::select! {
            read = stream.read(&mut sink) => {
                if matches!(read, Ok(0) | Err(_)) {
                    return opened.elapsed();
                }
            }
            _ = tick.tick() => {
                if stream.write_all(b"a").await.is_err() {
                    return opened.elapsed();
                }
            }
        }
        assert!(
            opened.elapsed() < wait,
            "the drip still open after {wait:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_requests_are_closed_on_time_while_a_client_is_served() {
    raise_open_files();
    const EACH: usize = 150;
    let header = Duration::from_millis(1_000);
    let ts = TestServer::start(|c| {
        c.http_header_timeout_ms = 1_000;
        c.http_idle_timeout_ms = 5_000;
        c.http_max_connections = Some(10_000);
        // The WebSocket must not be closed by its own ping timeout (1 s in the tests)
        // when the test's runtime is busy opening connections.
        c.ping_timeout_ms = 10_000;
    })
    .await;
    let token = ts.token("t1", "alice", &[]);
    let mut ws = ts.ws(&token).await;
    let mut attackers = JoinSet::new();
    let connecting = Arc::new(Semaphore::new(CONNECTING));
    for kind in [Kind::Silent, Kind::Partial, Kind::Drip, Kind::Upgrade] {
        for _ in 0..EACH {
            let (addr, token, connecting) = (addr(&ts), token.clone(), Arc::clone(&connecting));
            attackers.spawn(async move {
                (
                    kind,
                    unfinished(addr, kind, token, header, connecting).await,
                )
            });
        }
    }
    // A normal client throughout: polls on a keep-alive connection, and the WebSocket.
    let started = Instant::now();
    let mut served = 0;
    while !attackers.is_empty() {
        let (status, body) = ts.get("/api/events/poll", Some(&token), &[]).await;
        assert_eq!(status, 200, "{body}");
        served += 1;
        ws.assert_usable().await;
        // Reap the attackers that are done (without waiting on the others).
        while let Some(done) = attackers.try_join_next() {
            let (kind, after) = done.expect("attacker task");
            assert!(
                after + EARLY >= header && after <= header + LATE,
                "{kind:?} closed after {after:?}, the header timeout is {header:?}"
            );
        }
        assert!(started.elapsed() < Duration::from_secs(30), "bounded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        served >= 10,
        "the client was served throughout ({served} polls)"
    );
    assert_eq!(
        metric(&ts, &closed_by("header_timeout")).await,
        4 * EACH as u64
    );
    assert_eq!(metric(&ts, &closed_by("idle_timeout")).await, 0);
    // The WebSocket lived past the timeouts, and the poll connection too.
    ws.assert_usable().await;
}

#[tokio::test]
async fn a_keep_alive_connection_waits_the_idle_timeout_then_the_header_timeout() {
    let header = Duration::from_millis(500);
    let idle = Duration::from_millis(1_500);
    let ts = TestServer::start(|c| {
        c.http_header_timeout_ms = 500;
        c.http_idle_timeout_ms = 1_500;
    })
    .await;
    let request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";

    // Idle between requests for longer than the header timeout: still served.
    let mut stream = TcpStream::connect(addr(&ts)).await.unwrap();
    stream.write_all(request).await.unwrap();
    assert_eq!(read_response(&mut stream).await.0, 200);
    tokio::time::sleep(header + Duration::from_millis(300)).await;
    // Before the request: its response (the start of the idle wait) ends after it.
    let asked = Instant::now();
    stream.write_all(request).await.unwrap();
    assert_eq!(read_response(&mut stream).await.0, 200);
    // Then idle for good: closed at the idle timeout after the response.
    let after = closed_after(&mut stream, asked, idle + LATE)
        .await
        .expect("an idle connection is closed");
    assert!(
        after + EARLY >= idle && after <= idle + LATE,
        "idle connection closed after {after:?}"
    );

    // The first byte of a next request starts its header timeout.
    let mut stream = TcpStream::connect(addr(&ts)).await.unwrap();
    stream.write_all(request).await.unwrap();
    assert_eq!(read_response(&mut stream).await.0, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let began = Instant::now();
    stream.write_all(b"GET /hea").await.unwrap();
    let after = closed_after(&mut stream, began, header + LATE)
        .await
        .expect("an unfinished second request is closed");
    assert!(
        after + EARLY >= header && after <= header + LATE,
        "unfinished second request closed after {after:?}"
    );

    assert_eq!(metric(&ts, &closed_by("idle_timeout")).await, 1);
    assert_eq!(metric(&ts, &closed_by("header_timeout")).await, 1);
}

#[tokio::test]
async fn requests_in_flight_and_websockets_outlive_the_timeouts() {
    let ts = TestServer::start(|c| {
        c.http_header_timeout_ms = 300;
        c.http_idle_timeout_ms = 300;
        // Each chunk comes well within it: the body makes progress.
        c.http_body_timeout_ms = 400;
        // The WebSocket reads nothing while the slow request runs: its own ping
        // timeout (1 s in the tests) must not be what closes it.
        c.ping_timeout_ms = 10_000;
    })
    .await;
    let alice = ts.token("t1", "alice", &[]);
    let mut bob = ts.ws(&ts.token("t1", "bob", &[])).await;

    // A request whose body takes 1.5 s to arrive: its headers are in, so it is in
    // flight, and neither timeout cuts it; each chunk restarts the body timeout.
    let body = json!({"type": "t", "recipientId": "bob", "payload": {"text": "slow"}}).to_string();
    let mut stream = TcpStream::connect(addr(&ts)).await.unwrap();
    let head = format!(
        "POST /api/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.as_bytes().chunks(body.len().div_ceil(10)) {
        tokio::time::sleep(Duration::from_millis(150)).await;
        stream.write_all(chunk).await.unwrap();
    }
    assert_eq!(read_response(&mut stream).await.0, 201);
    let delivered = bob.expect("message").await;
    assert_eq!(delivered["data"]["payload"]["text"], "slow", "{delivered}");

    // The WebSocket, quiet for three times both timeouts, is still usable.
    tokio::time::sleep(Duration::from_millis(900)).await;
    bob.assert_usable().await;
    assert_eq!(metric(&ts, &closed_by("header_timeout")).await, 0);
    assert_eq!(metric(&ts, &closed_by("body_timeout")).await, 0);
}

#[tokio::test]
async fn a_request_body_that_never_comes_is_closed_at_the_body_timeout() {
    let body_timeout = Duration::from_millis(500);
    let ts = TestServer::start(|c| {
        c.http_body_timeout_ms = 500;
        // A socket.io long poll waits 1.5 s for the server's ping: longer than the
        // body timeout, and not cut by it.
        c.ping_interval_ms = 1_500;
        c.ping_timeout_ms = 5_000;
    })
    .await;
    let alice = ts.token("t1", "alice", &[]);

    // socket.io needs no token for an Engine.IO session.
    let mut polling = TcpStream::connect(addr(&ts)).await.unwrap();
    polling
        .write_all(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, open) = read_response(&mut polling).await;
    assert_eq!(status, 200, "{open}");
    let open: Value =
        serde_json::from_str(open.strip_prefix('0').expect("an open packet")).unwrap();
    let sid = open["sid"].as_str().expect("a sid").to_owned();

    // Headers announcing 100 bytes, then nothing: to socket.io, and to a JSON endpoint.
    let heads = [
        format!(
            "POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n\
             Content-Type: text/plain;charset=UTF-8\r\nContent-Length: 100\r\n\r\n"
        ),
        format!(
            "POST /api/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        ),
    ];
    let mut stalled = Vec::new();
    for head in &heads {
        let mut stream = TcpStream::connect(addr(&ts)).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        stalled.push((stream, Instant::now()));
    }
    for (mut stream, began) in stalled {
        let after = closed_after(&mut stream, began, body_timeout + LATE)
            .await
            .expect("a stalled body's connection is closed");
        assert!(
            after + EARLY >= body_timeout && after <= body_timeout + LATE,
            "closed after {after:?}, the body timeout is {body_timeout:?}"
        );
    }
    assert_eq!(metric(&ts, &closed_by("body_timeout")).await, 2);

    // A long poll waits for the server, not for a body: after the first ping (sent at
    // once) and its pong, the next ping comes 1.5 s later, three body timeouts.
    // (The session above was closed with its stalled POST: a new one.)
    polling
        .write_all(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, open) = read_response(&mut polling).await;
    assert_eq!(status, 200, "{open}");
    let open: Value =
        serde_json::from_str(open.strip_prefix('0').expect("an open packet")).unwrap();
    let sid = open["sid"].as_str().expect("a sid");
    let poll =
        format!("GET /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n\r\n");
    polling.write_all(poll.as_bytes()).await.unwrap();
    let (status, packet) = read_response(&mut polling).await;
    assert_eq!((status, packet.as_str()), (200, "2"), "the first ping");
    let pong = format!(
        "POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n\
         Content-Type: text/plain;charset=UTF-8\r\nContent-Length: 1\r\n\r\n3"
    );
    polling.write_all(pong.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut polling).await.0, 200, "the pong");
    let asked = Instant::now();
    polling.write_all(poll.as_bytes()).await.unwrap();
    let (status, packet) = read_response(&mut polling).await;
    assert_eq!((status, packet.as_str()), (200, "2"), "the next ping");
    assert!(
        asked.elapsed() >= 2 * body_timeout,
        "the long poll waited {:?}",
        asked.elapsed()
    );
    assert_eq!(metric(&ts, &closed_by("body_timeout")).await, 2);
}

#[tokio::test]
async fn with_the_defaults_a_silent_connection_is_closed_after_ten_seconds() {
    let ts = TestServer::start(|_| {}).await;
    assert_eq!(ts.config.http_header_timeout_ms, 10_000);
    assert_eq!(ts.config.http_idle_timeout_ms, 60_000);
    assert_eq!(ts.config.http_body_timeout_ms, 30_000);
    let opened = Instant::now();
    let mut silent = TcpStream::connect(addr(&ts)).await.unwrap();
    // Served meanwhile.
    let (status, _) = ts.get("/health", None, &[]).await;
    assert_eq!(status, 200);
    let header = Duration::from_secs(10);
    let after = closed_after(&mut silent, opened, header + LATE)
        .await
        .expect("closed by the default header timeout");
    assert!(
        after + EARLY >= header && after <= header + LATE,
        "closed after {after:?}"
    );
    assert_eq!(metric(&ts, &closed_by("header_timeout")).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_sheds_connections_past_it_while_websockets_and_polls_go_on() {
    raise_open_files();
    const CAP: usize = 1_000;
    const MORE: usize = 300;
    let ts = TestServer::start(|c| {
        c.http_max_connections = Some(CAP);
        // Nothing expires during the test (the WebSockets read nothing while the
        // silent connections are opened: their ping timeout is raised too).
        c.http_header_timeout_ms = 60_000;
        c.http_idle_timeout_ms = 60_000;
        c.ping_timeout_ms = 60_000;
    })
    .await;
    let mut alice = ts.ws(&ts.token("t1", "alice", &[])).await;
    let mut bob = ts.ws(&ts.token("t1", "bob", &[])).await;
    let bob_token = ts.token("t1", "bob", &[]);
    // A poll client on one keep-alive connection (written by hand, so that no pool
    // opens a second connection behind the test's back). It is the only connection
    // counted: upgraded WebSockets leave the count.
    let mut poller = TcpStream::connect(addr(&ts)).await.unwrap();
    let (status, health) = get_on(&mut poller, "/health", None).await;
    assert_eq!(status, 200);
    let figures = &health["services"]["websocket"];
    assert_eq!(figures["httpConnections"], 1, "{health}");
    assert_eq!(figures["activeConnections"], 2, "{health}");
    assert_eq!(figures["maxHttpConnections"], CAP, "{health}");
    assert!(figures["descriptorLimit"].as_u64().unwrap() > 0, "{health}");

    // Fill the cap with silent connections.
    let mut silent = Vec::with_capacity(CAP);
    for _ in 1..CAP {
        silent.push(TcpStream::connect(addr(&ts)).await.unwrap());
    }
    for _ in 0..100 {
        let (_, health) = get_on(&mut poller, "/health", None).await;
        if health["services"]["websocket"]["httpConnections"] == CAP {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Past it, every new connection is closed at once (not left in the backlog).
    let mut shed = JoinSet::new();
    for _ in 0..MORE {
        let addr = addr(&ts);
        shed.spawn(async move {
            let mut stream = TcpStream::connect(addr)
                .await
                .expect("accepted, then closed");
            closed_after(&mut stream, Instant::now(), Duration::from_secs(5)).await
        });
    }
    while let Some(done) = shed.join_next().await {
        let after = done.unwrap().expect("a connection past the cap is closed");
        assert!(after < Duration::from_secs(5), "closed after {after:?}");
    }
    // So is a new WebSocket's handshake.
    assert!(
        tokio_tungstenite::connect_async(ts.running().ws_url())
            .await
            .is_err()
    );

    // Meanwhile the WebSockets and the poll client go on.
    let sent = alice
        .call("message", message(Some("bob"), None, "still here"), "r1")
        .await;
    assert_eq!(sent["event"], "message_ack", "{sent}");
    let delivered = bob.expect("message").await;
    assert_eq!(delivered["data"]["payload"]["text"], "still here");
    let (status, page) = get_on(&mut poller, "/api/events/poll", Some(&bob_token)).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        page["events"][0]["payload"]["payload"]["text"], "still here",
        "{page}"
    );
    assert_eq!(
        metric_on(&mut poller, &closed_by("shed")).await,
        MORE as u64 + 1
    );
    assert_eq!(
        metric_on(&mut poller, "webwaka_http_connections").await,
        CAP as u64
    );
    let (_, health) = get_on(&mut poller, "/health", None).await;
    let websocket = &health["services"]["websocket"];
    assert_eq!(websocket["status"], "degraded", "{health}");
    assert!(
        websocket["message"]
            .as_str()
            .unwrap()
            .contains("HTTP_MAX_CONNECTIONS"),
        "{health}"
    );

    // Once the silent ones go, connections are admitted again.
    drop(silent);
    eventually("the silent connections are gone", || async {
        let (_, health) = ts.get("/health", None, &[]).await;
        health["services"]["websocket"]["httpConnections"] == 2 // poller + this one
    })
    .await;
    let mut carol = ts.ws(&ts.token("t1", "carol", &[])).await;
    carol.assert_usable().await;
}

#[tokio::test]
async fn shutdown_closes_unfinished_and_idle_connections_at_once_and_answers_requests_in_flight() {
    let mut ts = TestServer::start(|c| {
        c.shutdown_grace_ms = 5_000;
    })
    .await;
    let alice = ts.token("t1", "alice", &[]);
    let mut silent = TcpStream::connect(addr(&ts)).await.unwrap();
    let mut idle = TcpStream::connect(addr(&ts)).await.unwrap();
    assert_eq!(get_on(&mut idle, "/health", None).await.0, 200);
    // A request in flight: its headers in, its body still coming.
    let body = json!({"type": "t", "recipientId": "bob", "payload": 1}).to_string();
    let mut busy = TcpStream::connect(addr(&ts)).await.unwrap();
    let head = format!(
        "POST /api/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    busy.write_all(head.as_bytes()).await.unwrap();
    let (first, rest) = body.as_bytes().split_at(body.len() / 2);
    busy.write_all(first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let stopping = Instant::now();
    let stop = async {
        ts.stop().await;
        stopping.elapsed()
    };
    let finish = async {
        // The connections without a request close at once, well within the grace.
        for stream in [&mut silent, &mut idle] {
            let after = closed_after(stream, stopping, Duration::from_secs(2)).await;
            assert!(after.is_some(), "closed on shutdown");
        }
        // The request in flight is answered, then its connection closes.
        busy.write_all(rest).await.unwrap();
        let (status, _) = read_response(&mut busy).await;
        let closed = closed_after(&mut busy, stopping, Duration::from_secs(2)).await;
        (status, closed)
    };
    let (stopped_after, (status, closed)) = tokio::join!(stop, finish);
    assert_eq!(status, 201);
    assert!(closed.is_some(), "closed after its response");
    assert!(
        stopped_after < Duration::from_secs(4),
        "the grace (5 s) was not waited out: {stopped_after:?}"
    );
}

/// The real binary, as an operator starts it: the banner names the descriptor limit and
/// both caps, and a burst past `HTTP_MAX_CONNECTIONS` is shed with one log line, not one
/// per connection.
#[tokio::test]
async fn the_banner_names_the_caps_and_shedding_is_logged_once() {
    use std::io::BufRead;
    raise_open_files();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_webwaka-server-stub"))
        .env("WS_PORT", port.to_string())
        .env("DATA_DIR", dir.path())
        .env("JWT_SECRET", "a-test-secret-of-enough-bytes")
        .env("HTTP_MAX_CONNECTIONS", "8")
        .env("LOG_FORMAT", "json")
        .env_remove("DATABASE_URL")
        .env_remove("WEBWAKA_MODE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Both streams into one channel, tagged, read on threads of their own.
    let (tx, rx) = std::sync::mpsc::channel::<(bool, String)>();
    for (is_log, stream) in [
        (
            false,
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        ),
        (true, Box::new(child.stderr.take().unwrap())),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                if tx.send((is_log, line)).is_err() {
                    return;
                }
            }
        });
    }
    let kill = |mut child: std::process::Child| {
        let _ = child.kill();
        let _ = child.wait();
    };
    let mut banner = None;
    while let Ok((is_log, line)) = rx.recv_timeout(Duration::from_secs(30)) {
        if !is_log && line.trim_start().starts_with("connections") {
            banner = Some(line);
            break;
        }
    }
    let Some(banner) = banner else {
        kill(child);
        panic!("no connections line in the banner");
    };
    let limit = webwaka_server_stub::descriptor_limit();
    let expected = match limit {
        Some(limit) => format!("descriptors {limit}"),
        None => "descriptors unlimited".to_owned(),
    };
    assert!(banner.contains(&expected), "{banner}");
    assert!(banner.contains("HTTP_MAX_CONNECTIONS 8 "), "{banner}");
    assert!(banner.contains("WS_MAX_CONNECTIONS 50000"), "{banner}");

    // Fill the cap with silent connections, then 40 more, which are shed.
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    for _ in 0..40 {
        let mut shed = TcpStream::connect(addr).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), shed.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "a connection past the cap stayed open"
        );
    }
    // Whatever the server logs about it has been written by the time a request past
    // the burst is answered; give the log thread a moment more.
    drop(held);
    let mut served = false;
    for _ in 0..100 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
        if out.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "the server serves again once the burst is gone");
    let mut shedding_lines = 0;
    while let Ok((is_log, line)) = rx.recv_timeout(Duration::from_millis(500)) {
        if is_log && line.contains("HTTP_MAX_CONNECTIONS reached") {
            shedding_lines += 1;
        }
    }
    kill(child);
    assert_eq!(
        shedding_lines, 1,
        "one line for one burst of 40 shed connections"
    );
}
