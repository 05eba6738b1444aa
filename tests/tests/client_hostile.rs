//! A hostile or broken server never crashes the client (issue 13, part 2). A front on
//! loopback stands between the client and the real server: in `Pass` it forwards bytes,
//! otherwise it answers itself, on both transports, with edge values: huge, negative
//! and non-numeric retry hints; 200 answers whose JSON is garbage; a WebSocket that
//! sends nonsense (unknown events, ids over 256 bytes, sequences going backwards,
//! invalid UTF-8, a 100 MiB frame cut short, an absurd heartbeat interval and
//! timestamps);
//! endless slow answers and redirect loops; entity snapshots whose checksum does not
//! match their data. For each, the client must not panic (its
//! supervisor keeps answering), must not lose or duplicate an accepted item, and must go
//! on working once the server behaves.

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::Message;
use webwaka_e2e::harness::{
    TestServer, client_config, direct, messages, open_client, texts, wait_state, wait_until,
};
use webwaka_realtime::client::{Client, Next, Subscription, Update};
use webwaka_realtime::machine::{ConnectionState, MAX_SERVER_DELAY};

/// How the front answers new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// Forward to the real server.
    Pass,
    /// 503 with `Retry-After` and `retryAfterMs` far beyond any sane wait.
    HugeHints,
    /// 503 with negative, fractional, non-numeric and date hints.
    BadHints,
    /// 200 with garbage bodies; the WebSocket upgrade answered with a plain 200.
    Garbage,
    /// A WebSocket that opens, then sends nonsense and breaks off mid-frame.
    WsNonsense,
    /// The upgrade never answered; polls that trickle forever; sends redirected in a loop.
    Slow,
    /// Everything forwarded, but the snapshots in reconcile answers and snapshot fetches
    /// come back with a wrong checksum.
    BadSnapshots,
}

struct Front {
    addr: SocketAddr,
    scenario: Arc<Mutex<Scenario>>,
    live: Arc<Mutex<Vec<AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Front {
    async fn start(target: SocketAddr) -> Front {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scenario = Arc::new(Mutex::new(Scenario::Pass));
        let live: Arc<Mutex<Vec<AbortHandle>>> = Arc::new(Mutex::new(Vec::new()));
        let counter = Arc::new(AtomicU64::new(0));
        let (s, l) = (scenario.clone(), live.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let now = *s.lock().unwrap();
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let handle = tokio::spawn(async move {
                    let _ = serve(stream, target, now, n).await;
                });
                l.lock().unwrap().push(handle.abort_handle());
            }
        });
        Front {
            addr,
            scenario,
            live,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers new connections so, and drops every live one.
    fn set(&self, scenario: Scenario) {
        *self.scenario.lock().unwrap() = scenario;
        for handle in self.live.lock().unwrap().drain(..) {
            handle.abort();
        }
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.task.abort();
        for handle in self.live.lock().unwrap().drain(..) {
            handle.abort();
        }
    }
}

/// Reads one request head and its `Content-Length` body (so that closing afterwards
/// does not reset the answer away).
async fn read_request(stream: &mut TcpStream) -> std::io::Result<String> {
    Ok(read_request_bytes(stream).await?.0)
}

/// [`read_request`], also giving every byte read (head and body).
async fn read_request_bytes(stream: &mut TcpStream) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err(std::io::Error::other("head too long"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() - head_end < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((head, buf))
}

/// Sends `request` to `target` asking it to close after answering, and returns the
/// answer's status (`200 OK`) and body.
async fn forward(target: SocketAddr, request: &[u8]) -> std::io::Result<(String, Vec<u8>)> {
    let line_end = request
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or_else(|| std::io::Error::other("no request line"))?;
    let mut upstream = TcpStream::connect(target).await?;
    upstream.write_all(&request[..line_end + 2]).await?;
    upstream.write_all(b"Connection: close\r\n").await?;
    upstream.write_all(&request[line_end + 2..]).await?;
    let mut answer = Vec::new();
    upstream.read_to_end(&mut answer).await?;
    let head_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no answer head"))?;
    let head = String::from_utf8_lossy(&answer[..head_end]).into_owned();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_once(' '))
        .map(|(_, s)| s.to_owned())
        .unwrap_or_default();
    Ok((status, answer[head_end + 4..].to_vec()))
}

fn is_upgrade(head: &str) -> bool {
    head.to_ascii_lowercase().contains("upgrade: websocket")
}

async fn answer(stream: &mut TcpStream, status: &str, headers: &str, body: &str) {
    let text = format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(text.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn serve(
    mut stream: TcpStream,
    target: SocketAddr,
    scenario: Scenario,
    n: u64,
) -> std::io::Result<()> {
    if scenario == Scenario::Pass {
        let mut upstream = TcpStream::connect(target).await?;
        tokio::io::copy_bidirectional(&mut stream, &mut upstream).await?;
        return Ok(());
    }
    if scenario == Scenario::WsNonsense {
        // Only the upgrade is answered (by tungstenite); HTTP gets a plain 500.
        let mut peek = [0u8; 4096];
        let seen = stream.peek(&mut peek).await?;
        if !is_upgrade(&String::from_utf8_lossy(&peek[..seen])) {
            read_request(&mut stream).await?;
            answer(&mut stream, "500 Internal Server Error", "", "{}").await;
            return Ok(());
        }
        return ws_nonsense(stream).await;
    }
    if scenario == Scenario::BadSnapshots {
        // WebSockets pass; each HTTP request is forwarded alone and answered on a
        // connection closed after it (so that every request is looked at).
        let mut peek = [0u8; 4096];
        let seen = stream.peek(&mut peek).await?;
        if is_upgrade(&String::from_utf8_lossy(&peek[..seen])) {
            let mut upstream = TcpStream::connect(target).await?;
            tokio::io::copy_bidirectional(&mut stream, &mut upstream).await?;
            return Ok(());
        }
        let (head, request) = read_request_bytes(&mut stream).await?;
        let (status, body) = forward(target, &request).await?;
        if !head.contains(" /api/reconciliation/") {
            answer(&mut stream, &status, "", &String::from_utf8_lossy(&body)).await;
            return Ok(());
        }
        let mut json: serde_json::Value =
            serde_json::from_slice(&body).map_err(std::io::Error::other)?;
        let broken = serde_json::json!("0badc0de");
        if let Some(deltas) = json.get_mut("deltaUpdates").and_then(|d| d.as_array_mut()) {
            for delta in deltas {
                delta["checksum"] = broken.clone();
            }
        } else if json.get("checksum").is_some() {
            json["checksum"] = broken;
        }
        answer(&mut stream, &status, "", &json.to_string()).await;
        return Ok(());
    }
    let head = read_request(&mut stream).await?;
    let upgrade = is_upgrade(&head);
    match scenario {
        Scenario::HugeHints => {
            let header = [
                "99999999999999999999999",
                "18446744073709551615",
                "9300000000000",
            ][(n % 3) as usize];
            let detail = ["1e300", "18446744073709551615", "8300000000000000"][(n % 3) as usize];
            let body = format!(
                r#"{{"error":"full","code":"SERVER_FULL","status":503,"details":{{"retryAfterMs":{detail}}}}}"#
            );
            answer(
                &mut stream,
                "503 Service Unavailable",
                &format!("Retry-After: {header}\r\n"),
                &body,
            )
            .await;
        }
        Scenario::BadHints => {
            let header = ["-5", "1.5", "soon", "Wed, 21 Oct 2015 07:28:00 GMT"][(n % 4) as usize];
            let detail = ["-1", "\"10\"", "null", "-1e300"][(n % 4) as usize];
            let body = format!(
                r#"{{"error":"full","code":"SERVER_FULL","status":503,"details":{{"retryAfterMs":{detail}}}}}"#
            );
            answer(
                &mut stream,
                "503 Service Unavailable",
                &format!("Retry-After: {header}\r\n"),
                &body,
            )
            .await;
        }
        Scenario::Garbage => {
            let body = [
                r#"{"events": [1, 2"#,
                "not json at all",
                r#"{"events":"nope","hasMore":7}"#,
                "",
                r#"{"messageId":null,"sequence":-1}"#,
            ][(n % 5) as usize];
            answer(&mut stream, "200 OK", "", body).await;
        }
        Scenario::Slow => {
            if upgrade {
                // Never answered: the connect timeout must end it.
                tokio::time::sleep(Duration::from_secs(60)).await;
            } else if head.starts_with("POST") {
                // A redirect to itself, forever.
                let first = head.lines().next().unwrap_or_default();
                let path = first.split_whitespace().nth(1).unwrap_or("/");
                answer(
                    &mut stream,
                    "302 Found",
                    &format!("Location: {path}\r\n"),
                    "",
                )
                .await;
            } else {
                // Headers, then a body that trickles and never ends.
                stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{\"events\":[",
                    )
                    .await?;
                for _ in 0..120 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    stream.write_all(b" ").await?;
                }
            }
        }
        Scenario::Pass | Scenario::WsNonsense | Scenario::BadSnapshots => {}
    }
    Ok(())
}

/// A WebSocket that opens properly, then sends what no server should.
async fn ws_nonsense(stream: TcpStream) -> std::io::Result<()> {
    let mut ws = tokio_tungstenite::accept_async(stream)
        .await
        .map_err(std::io::Error::other)?;
    let long_id = "x".repeat(300);
    let frames = [
        // A heartbeat interval and a server time far out of range.
        r#"{"event":"connected","data":{"connectionId":"c","clientId":"c","serverTime":"+262142-12-31T23:59:59Z","interactionClasses":["CLASS_C"],"pingInterval":18446744073709551615,"pingTimeout":18446744073709551615}}"#.to_owned(),
        r#"{"event":"connected","data":{"connectionId":"c","clientId":"c","serverTime":"2026-01-30T10:15:00.004Z","interactionClasses":["CLASS_C"],"pingInterval":1,"pingTimeout":1}}"#.to_owned(),
        r#"{"event":"surprise","data":{"anything":[1,2,3]}}"#.to_owned(),
        format!(
            r#"{{"event":"message","data":{{"messageId":"{long_id}","type":"dm","interactionClass":"CLASS_C","tenantId":"t1","senderId":"mallory","payload":{{"text":"long"}},"timestamp":"2026-01-30T10:15:02.123Z","eventId":"{long_id}","sequence":5}}}}"#
        ),
        // Sequences going backwards and repeated.
        r#"{"event":"event","data":{"eventId":"e-9","eventType":"x.y","tenantId":"t1","timestamp":"2026-01-30T10:16:40.500Z","payload":{},"sequence":9}}"#.to_owned(),
        r#"{"event":"event","data":{"eventId":"e-3","eventType":"x.y","tenantId":"t1","timestamp":"2026-01-30T10:16:40.500Z","payload":{},"sequence":3}}"#.to_owned(),
        r#"{"event":"event","data":{"eventId":"e-9","eventType":"x.y","tenantId":"t1","timestamp":"2026-01-30T10:16:40.500Z","payload":{},"sequence":9}}"#.to_owned(),
        r#"{"event":"error","data":{"error":"slow down","code":"RATE_LIMIT","status":429,"ref":"nobody","details":{"retryAfterMs":1e300}}}"#.to_owned(),
        r#"{"event":"message_ack","data":{"messageId":"not-ours","sequence":18446744073709551615}}"#.to_owned(),
        "{ not json".to_owned(),
    ];
    for frame in frames {
        ws.send(Message::Text(frame.into()))
            .await
            .map_err(std::io::Error::other)?;
    }
    ws.flush().await.map_err(std::io::Error::other)?;
    let raw = ws.get_mut();
    // Invalid UTF-8 in a text frame, then a frame of 100 MiB (past the client's frame
    // limit) of which only 64 KiB ever come.
    raw.write_all(&[0x81, 0x02, 0xff, 0xfe]).await?;
    let mut huge = vec![0x81, 0x7f];
    huge.extend_from_slice(&(100u64 * 1024 * 1024).to_be_bytes());
    huge.extend(std::iter::repeat_n(b' ', 64 * 1024));
    raw.write_all(&huge).await?;
    raw.flush().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// Message texts `sub` delivers until `quiet` passes with none.
async fn drain_texts(sub: &mut Subscription, quiet: Duration) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(next) = tokio::time::timeout(quiet, sub.next()).await {
        match next {
            Next::Update(u) => {
                if let Some(m) = messages(*u) {
                    out.extend(texts(&[m]));
                }
            }
            Next::Missed(n) => panic!("the test subscriber missed {n} updates"),
            Next::Closed => break,
        }
    }
    out
}

fn counts(texts: &[String]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for t in texts {
        *out.entry(t.clone()).or_insert(0) += 1;
    }
    out
}

/// The supervisor still answers (a panic in it would close the client).
async fn alive(client: &Client) {
    let metrics = client.metrics().await;
    assert!(metrics.is_ok(), "the client stopped answering: {metrics:?}");
    assert!(
        !matches!(
            client.connection_state(),
            ConnectionState::Closed | ConnectionState::AuthFailed
        ),
        "{:?}",
        client.connection_state()
    );
}

/// A server, a front before it, alice through the front and bob directly, both in
/// Realtime (the directory and the server live as long as the tuple).
async fn behind_front() -> (tempfile::TempDir, TestServer, Front, Client, Client) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let front = Front::start(server.addr).await;
    let alice = open_client(
        client_config(&front.url(), &dir.path().join("alice.db")),
        server.token("t1", "alice"),
    )
    .await;
    let bob = open_client(
        client_config(&server.url(), &dir.path().join("bob.db")),
        server.token("t1", "bob"),
    )
    .await;
    for c in [&alice, &bob] {
        assert!(wait_state(c, ConnectionState::Realtime, Duration::from_secs(10)).await);
    }
    (dir, server, front, alice, bob)
}

/// Alice talks to the real server through the front, which turns `scenario` for a
/// while; bob talks to the server directly. Messages both ways during the trouble, then
/// the front behaves again (unless `recovers` is false): each arrives exactly once.
async fn survives(scenario: Scenario, recovers: bool) {
    let (_dir, _server, front, alice, bob) = behind_front().await;
    let mut alice_sub = alice.subscribe();
    let mut bob_sub = bob.subscribe();
    let mut retry_hints = Vec::new();

    front.set(scenario);
    for n in 0..5 {
        alice
            .send_message(direct("bob", &format!("a{n}")))
            .await
            .unwrap();
        bob.send_message(direct("alice", &format!("b{n}")))
            .await
            .unwrap();
    }
    // The trouble lasts a few seconds; the client keeps answering all along.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        alive(&alice).await;
    }
    while let Ok(Next::Update(u)) =
        tokio::time::timeout(Duration::from_millis(10), alice_sub.next()).await
    {
        if let Update::State(s) = *u {
            retry_hints.extend(s.next_retry_in);
        }
    }
    assert!(
        retry_hints.iter().all(|d| *d <= MAX_SERVER_DELAY),
        "no retry beyond {MAX_SERVER_DELAY:?}: {retry_hints:?}"
    );
    let queued: Vec<_> = alice.outbox(None).await.unwrap();
    assert_eq!(queued.len(), 5, "every accepted send is kept");
    if matches!(scenario, Scenario::Garbage | Scenario::WsNonsense) {
        let metrics = alice.metrics().await.unwrap();
        assert!(
            metrics.protocol_errors > 0,
            "the broken answers are counted: {metrics:?}"
        );
    }

    if !recovers {
        // The server asked for patience: an hour at most, not forever, not never.
        assert!(
            matches!(
                alice.connection_state(),
                ConnectionState::Offline | ConnectionState::Connecting
            ),
            "{:?}",
            alice.connection_state()
        );
        assert!(
            retry_hints
                .iter()
                .any(|d| *d > Duration::from_secs(60) && *d <= MAX_SERVER_DELAY),
            "the huge hint was taken, clamped: {retry_hints:?}"
        );
        for c in [&alice, &bob] {
            c.shutdown().await;
        }
        return;
    }

    front.set(Scenario::Pass);
    alice.network_available();
    assert!(
        wait_state(&alice, ConnectionState::Realtime, Duration::from_secs(30)).await,
        "back to Realtime once the server behaves: {:?}",
        alice.connection_state()
    );
    alice.send_message(direct("bob", "after")).await.unwrap();
    let to_bob = counts(&drain_texts(&mut bob_sub, Duration::from_secs(5)).await);
    for text in ["a0", "a1", "a2", "a3", "a4", "after"] {
        assert_eq!(
            to_bob.get(text),
            Some(&1),
            "alice's {text} reached bob once"
        );
    }
    let to_alice = counts(&drain_texts(&mut alice_sub, Duration::from_secs(5)).await);
    for n in 0..5 {
        assert_eq!(
            to_alice.get(&format!("b{n}")),
            Some(&1),
            "bob's b{n} reached alice once: {to_alice:?}"
        );
    }
    for c in [&alice, &bob] {
        c.shutdown().await;
    }
}

#[tokio::test]
async fn huge_retry_hints_are_clamped_to_an_hour_without_a_panic() {
    survives(Scenario::HugeHints, false).await;
}

#[tokio::test]
async fn negative_and_non_numeric_retry_hints_are_ignored() {
    survives(Scenario::BadHints, true).await;
}

#[tokio::test]
async fn garbage_json_in_200_answers_moves_nothing() {
    survives(Scenario::Garbage, true).await;
}

#[tokio::test]
async fn a_websocket_sending_nonsense_is_survived() {
    survives(Scenario::WsNonsense, true).await;
}

#[tokio::test]
async fn endless_slow_answers_and_redirect_loops_are_bounded() {
    survives(Scenario::Slow, true).await;
}

/// Snapshots whose checksum does not match their data are refused, counted, and pulled
/// again: the sync version does not move past them, so once the server behaves the
/// entity arrives (before, the version moved on and the entity never came again).
#[tokio::test]
async fn snapshots_with_a_wrong_checksum_are_refused_and_pulled_again() {
    let (_dir, _server, front, alice, bob) = behind_front().await;
    front.set(Scenario::BadSnapshots);
    let real = serde_json::json!({ "text": "real" });
    bob.create_entity("note", "n1", real.clone()).await.unwrap();
    let refused = wait_until(Duration::from_secs(15), || async {
        alice.sync_entities().unwrap();
        alice.metrics().await.unwrap().protocol_errors > 0
    })
    .await;
    assert!(refused, "the broken snapshots are counted");
    assert_eq!(
        alice.entity("note", "n1").await.unwrap(),
        None,
        "nothing of a broken snapshot is stored"
    );
    alive(&alice).await;

    front.set(Scenario::Pass);
    alice.network_available();
    let arrived = wait_until(Duration::from_secs(15), || async {
        let _ = alice.sync_entities();
        alice
            .entity("note", "n1")
            .await
            .unwrap()
            .is_some_and(|e| e.value.data == real)
    })
    .await;
    assert!(arrived, "pulled again once the server behaves");
    for c in [&alice, &bob] {
        c.shutdown().await;
    }
}
