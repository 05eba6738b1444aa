//! The dashboard's feed (`/dashboard/api/stream`, server-sent events) and its endpoints,
//! on each engine: who may watch what, the durable facts read through storage, and the
//! live items. The page itself is tested in a browser (`tests/tests/dashboard.rs`).

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{TestServer, audit_entries, message};

/// An open feed, read event by event.
struct Feed {
    response: reqwest::Response,
    buffer: String,
}

impl Feed {
    async fn open(ts: &TestServer, query: &str) -> Result<Self, u16> {
        let response = ts
            .http
            .get(ts.url(&format!("/dashboard/api/stream?{query}")))
            .send()
            .await
            .unwrap();
        if response.status() != 200 {
            return Err(response.status().as_u16());
        }
        let kind = response.headers()["content-type"].to_str().unwrap();
        assert!(kind.starts_with("text/event-stream"), "{kind}");
        Ok(Self {
            response,
            buffer: String::new(),
        })
    }

    /// The next event named `name` (its data as JSON), within 10 s.
    async fn next(&mut self, name: &str) -> Value {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                while let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    let mut event = "message";
                    let mut data = String::new();
                    for line in block.lines() {
                        if let Some(e) = line.strip_prefix("event: ") {
                            event = e;
                        } else if let Some(d) = line.strip_prefix("data: ") {
                            data.push_str(d);
                        }
                    }
                    if event == name {
                        return serde_json::from_str(&data).unwrap();
                    }
                }
                let chunk = self
                    .response
                    .chunk()
                    .await
                    .unwrap()
                    .expect("the feed goes on");
                self.buffer.push_str(&String::from_utf8_lossy(&chunk));
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {name} event within 10 s"))
    }
}

/// Reads until the feed ends (`true`) or `wait` passes (`false`).
async fn ends_within(feed: &mut Feed, wait: Duration) -> bool {
    tokio::time::timeout(wait, async {
        while let Ok(Some(chunk)) = feed.response.chunk().await {
            feed.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .is_ok()
}

/// As `/ws`, the feed ends at its token's `exp` (with the leeway), and when the chaos
/// layer expires the tokens issued before now, saying so with an `expired` event.
#[tokio::test]
async fn the_feed_ends_when_its_token_expires() {
    let ts = TestServer::start(|c| {
        c.jwt_leeway_ms = 1_000;
        c.chaos = true;
    })
    .await;
    let keys = ts.running().keys();
    let short = keys.mint("t1", "ops", &["admin".to_owned()], 1);
    let opened = std::time::Instant::now();
    let mut feed = Feed::open(&ts, &format!("token={short}")).await.unwrap();
    feed.next("snapshot").await;
    // exp is within a second of now (whole seconds), plus the 1 s leeway.
    assert!(
        ends_within(&mut feed, Duration::from_secs(6)).await,
        "the feed outlived its token"
    );
    let lasted = opened.elapsed();
    assert!(
        lasted >= Duration::from_millis(900),
        "ended after {lasted:?}"
    );
    assert!(feed.buffer.contains("event: expired"), "{}", feed.buffer);

    // A long token, expired by the chaos layer: ended at the next snapshot (1 s).
    let long = ts.token("t1", "ops", &["admin"]);
    let mut feed = Feed::open(&ts, &format!("token={long}")).await.unwrap();
    feed.next("snapshot").await;
    // The chaos cutoff is the current second: a token minted in it is not before it.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    ts.running().chaos().unwrap().expire_tokens();
    assert!(
        ends_within(&mut feed, Duration::from_secs(4)).await,
        "the feed outlived the chaos expiry"
    );
    assert!(feed.buffer.contains("event: expired"), "{}", feed.buffer);
}

#[tokio::test]
async fn only_admins_watch_their_tenant_and_a_super_admin_every_tenant_with_a_justification() {
    let ts = TestServer::start(|_| {}).await;
    let user = ts.token("t1", "alice", &[]);
    let admin = ts.token("t1", "ops", &["admin"]);
    let root = ts.token("t0", "root", &["super_admin"]);
    assert_eq!(Feed::open(&ts, "").await.err(), Some(401));
    assert_eq!(
        Feed::open(&ts, &format!("token={user}")).await.err(),
        Some(403)
    );
    assert_eq!(
        Feed::open(&ts, &format!("token={admin}&tenant=t2"))
            .await
            .err(),
        Some(403),
        "an admin watches their own tenant only"
    );
    assert_eq!(
        Feed::open(&ts, &format!("token={admin}&tenant=*"))
            .await
            .err(),
        Some(403)
    );
    assert_eq!(
        Feed::open(&ts, &format!("token={root}&tenant=*"))
            .await
            .err(),
        Some(403),
        "every tenant needs a justification"
    );
    let mut feed = Feed::open(
        &ts,
        &format!("token={root}&tenant=*&justification=incident+42"),
    )
    .await
    .unwrap();
    let snapshot = feed.next("snapshot").await;
    assert!(snapshot["connections"].is_array(), "{snapshot}");
    // Granted and refused, both audited.
    let entries = audit_entries(&ts, "t0").await;
    let access: Vec<&Value> = entries
        .iter()
        .filter(|e| e["action"] == "admin.cross_tenant_access" && e["targetTenantId"] == "*")
        .collect();
    assert_eq!(access.len(), 2, "{entries:?}");
    assert!(access.iter().any(|e| e["justification"] == "incident 42"));
    assert!(entries.iter().any(|e| e["action"] == "dashboard.watch"));
    let (status, session) = ts.get("/dashboard/api/session", Some(&admin), &[]).await;
    assert_eq!((status, session["scope"].as_str()), (200, Some("t1")));
}

#[tokio::test]
async fn the_feed_shows_connections_events_with_their_recipients_and_consumer_groups() {
    let ts = TestServer::start(|_| {}).await;
    let admin = ts.token("t1", "ops", &["admin"]);
    let svc = ts.token("t1", "billing", &["service"]);
    // A lease held by a group, read through storage.
    let (status, published) = ts
        .post(
            "/api/events",
            Some(&svc),
            json!({"eventType": "order.placed", "payload": {}}),
            &[],
        )
        .await;
    assert_eq!(status, 201, "{published}");
    let (status, claimed) = ts
        .post(
            "/api/eventbus/groups/billing/claim",
            Some(&svc),
            json!({"consumerId": "w1", "max": 5, "visibilityTimeoutMs": 60000}),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{claimed}");
    let mut bob = ts.ws(&ts.token("t1", "bob", &[])).await;
    let mut feed = Feed::open(&ts, &format!("token={admin}")).await.unwrap();
    let snapshot = feed.next("snapshot").await;
    let connections = snapshot["connections"].as_array().unwrap();
    assert_eq!(connections.len(), 1, "{snapshot}");
    assert_eq!(connections[0]["user"], "bob");
    assert_eq!(connections[0]["transport"], "ws");
    assert!(connections[0]["clientId"].is_string() && connections[0]["since"].is_i64());
    let durable = feed.next("durable").await;
    let open = &durable["deliveries"][0]["open"];
    assert_eq!(open[0]["state"], "leased", "{durable}");
    assert_eq!(open[0]["consumerId"], "w1");
    assert_eq!(open[0]["deliveryCount"], 1);
    assert_eq!(open[0]["eventId"], published["eventId"]);
    assert_eq!(durable["groups"][0]["group"], "billing");

    // A message to bob (connected) and carol (not): one live, one awaiting a poll.
    let alice = ts.token("t1", "alice", &[]);
    for to in ["bob", "carol"] {
        let (status, body) = ts
            .post(
                "/api/messages",
                Some(&alice),
                message(Some(to), None, "hi"),
                &[],
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let item = feed.next("item").await;
        assert_eq!(item["kind"], "event", "{item}");
        assert_eq!(item["sender"], "alice");
        let recipients = item["recipients"].as_array().unwrap();
        let of = |user: &str| {
            recipients
                .iter()
                .find(|r| r["user"] == user)
                .map(|r| r["delivery"].clone())
        };
        assert_eq!(of("alice"), Some(json!("awaiting poll")), "{item}");
        let expected = if to == "bob" { "live" } else { "awaiting poll" };
        assert_eq!(of(to), Some(json!(expected)), "{item}");
    }
    bob.expect("message").await;
    // The connection's last frames, captured while watched.
    let snapshot = feed.next("snapshot").await;
    let out = &snapshot["connections"][0]["lastOut"]["text"];
    assert!(
        out.as_str().unwrap().contains("\"event\":\"message\""),
        "{snapshot}"
    );
    bob.close().await;
}

/// Kills the server child when dropped (also when the test fails).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_dev_banner_prints_a_link_that_logs_in() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_webwaka-server-stub"))
            .env("WS_PORT", port.to_string())
            .env("DATA_DIR", dir.path())
            .env("WEBWAKA_MODE", "dev")
            .env_remove("JWT_SECRET")
            .env_remove("DATABASE_URL")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut link = None;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) {
        if let Some(at) = line.find("http://")
            && line.contains("/dashboard#token=")
        {
            link = Some(line[at..].trim().to_owned());
            break;
        }
    }
    let link = link.expect("the banner prints the dashboard's link");
    let (page, token) = link.split_once("#token=").unwrap();
    assert_eq!(page, format!("http://127.0.0.1:{port}/dashboard"));
    // (In a workspace build reqwest has no TLS provider of its own.)
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let response = http.get(page).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let session: Value = http
        .get(format!("http://127.0.0.1:{port}/dashboard/api/session"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(session["tenant"], "demo", "{session}");
    assert_eq!(session["roles"], json!(["admin"]), "{session}");
    drop(child);
}
