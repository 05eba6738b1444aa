//! The live dashboard (issue 15) in a real headless Chromium, driven over WebDriver
//! (chromedriver, fantoccini): what a developer sees must follow what the server does,
//! without a reload, and the page must reach nothing but the server.
//!
//! Chromium and chromedriver come from Debian (`scripts/install-chromium.sh`, run by
//! `scripts/test-all.sh`); when they are missing these tests fail, saying so. Each
//! test starts its own chromedriver on a free loopback port and its own Chromium with a
//! fresh profile, and kills both at the end (also when it fails). Every wait is
//! bounded; the bounds are generous and nothing is timed (timings belong in `bench`).
//!
//! With `WEBWAKA_SCREENSHOTS_DIR` set, the tests save screenshots there (the ones in
//! `docs/dashboard/` come from such a run).

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use webwaka_e2e::cluster::{Instances, free_port};
use webwaka_e2e::harness::{
    ChildGuard, client_config, direct, open_client, test_config, wait_state,
};
use webwaka_realtime::client::Target;
use webwaka_realtime::machine::ConnectionState;
use webwaka_server_stub::{Config, Options, RunningServer, Server};

/// How long the page may take to show something (generous: a shared 2-core machine).
const WITHIN: Duration = Duration::from_secs(30);
/// How long one whole test may take.
const TEST_BOUND: Duration = Duration::from_secs(240);

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// A headless Chromium driven through its own chromedriver.
struct Browser {
    client: Option<Client>,
    /// chromedriver, in a process group of its own with the Chromium it starts
    /// (killed and reaped when dropped).
    _driver: ChildGuard,
    group: u32,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn launch() -> Self {
        for path in [CHROMEDRIVER, CHROMIUM] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: run scripts/install-chromium.sh (the dashboard's browser \
                 tests never skip)"
            );
        }
        let port = free_port();
        let mut command = Command::new(CHROMEDRIVER);
        command
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group: killing the group at the end takes Chromium with it.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().expect("chromedriver starts");
        let group = child.id();
        let driver = ChildGuard(Some(child));
        let up = tokio::time::timeout(Duration::from_secs(20), async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(up.is_ok(), "chromedriver did not listen within 20 s");
        let profile = tempfile::tempdir().expect("a profile directory");
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--window-size=1200,900".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({"binary": CHROMIUM, "args": args}),
        );
        // The DevTools events of the page, network requests among them (read with
        // `Browser::requests`).
        capabilities.insert("goog:loggingPrefs".into(), json!({"performance": "ALL"}));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = tokio::time::timeout(
            Duration::from_secs(60),
            ClientBuilder::new(connector)
                .capabilities(capabilities)
                .connect(&format!("http://127.0.0.1:{port}")),
        )
        .await
        .expect("a Chromium session within 60 s")
        .expect("a Chromium session");
        Self {
            client: Some(client),
            _driver: driver,
            group,
            _profile: profile,
        }
    }

    fn page(&self) -> &Client {
        self.client.as_ref().expect("the browser is open")
    }

    /// Every network request made by the documents under `page` since the last call
    /// (HTTP, fetch, SSE and WebSocket), from Chromium's DevTools events in
    /// chromedriver's performance log: what the browser actually sent, not what the
    /// page's timing API kept. (The browser's own new-tab page, before the test
    /// navigates, is another document.)
    async fn requests(&self, page: &str) -> Vec<String> {
        let log = self.page().issue_cmd(PerformanceLog).await.unwrap();
        let entries = log.as_array().cloned().unwrap_or_default();
        let mut urls = Vec::new();
        for entry in entries {
            let Some(text) = entry["message"].as_str() else {
                continue;
            };
            let event: Value = serde_json::from_str(text).unwrap();
            let event = &event["message"];
            match event["method"].as_str() {
                Some("Network.requestWillBeSent")
                    if event["params"]["documentURL"]
                        .as_str()
                        .is_some_and(|d| d.starts_with(page)) =>
                {
                    urls.push(
                        event["params"]["request"]["url"]
                            .as_str()
                            .unwrap()
                            .to_owned(),
                    );
                }
                // The page's own WebSockets (the dashboard uses none; any would show).
                Some("Network.webSocketCreated") => {
                    urls.push(event["params"]["url"].as_str().unwrap().to_owned());
                }
                _ => {}
            }
        }
        urls
    }

    /// Ends the session (Chromium quits), then the driver.
    async fn close(mut self) {
        if let Some(client) = self.client.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), client.close()).await;
        }
    }

    /// Opens the dashboard of `base` logged in with `token` (in the link's fragment, as
    /// the banner prints it) and waits until its feed is live.
    async fn open_dashboard(&self, base: &str, token: &str) {
        self.page()
            .goto(&format!("{base}/dashboard#token={token}"))
            .await
            .unwrap();
        self.wait_text("#status", "live").await;
    }

    /// The text of `css` (empty when absent).
    async fn text(&self, css: &str) -> String {
        match self.page().find(Locator::Css(css)).await {
            Ok(element) => element.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Waits until `css`'s text contains `wanted`.
    async fn wait_text(&self, css: &str, wanted: &str) -> String {
        let deadline = tokio::time::Instant::now() + WITHIN;
        loop {
            let text = self.text(css).await;
            if text.contains(wanted) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{css} never showed {wanted:?}; it shows {text:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many elements match `css`.
    async fn count(&self, css: &str) -> usize {
        self.page()
            .find_all(Locator::Css(css))
            .await
            .map_or(0, |all| all.len())
    }

    /// Waits until `css` matches something (`present`) or nothing.
    async fn wait_present(&self, css: &str, present: bool) {
        let deadline = tokio::time::Instant::now() + WITHIN;
        while (self.count(css).await > 0) != present {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{css} still {} after {WITHIN:?}",
                if present { "absent" } else { "present" }
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Types `text` into the input `css`.
    async fn type_into(&self, css: &str, text: &str) {
        self.page()
            .find(Locator::Css(css))
            .await
            .unwrap()
            .send_keys(text)
            .await
            .unwrap();
    }

    async fn click(&self, css: &str) {
        self.page()
            .find(Locator::Css(css))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    /// Saves a screenshot of the window as `name`.png when `WEBWAKA_SCREENSHOTS_DIR` is
    /// set.
    async fn screenshot(&self, name: &str) {
        self.screenshot_of(name, None).await;
    }

    /// The same, of the element `css` only (when given).
    async fn screenshot_of(&self, name: &str, css: Option<&str>) {
        let Some(dir) = std::env::var_os("WEBWAKA_SCREENSHOTS_DIR") else {
            return;
        };
        let png = match css {
            None => self.page().screenshot().await.unwrap(),
            Some(css) => {
                // Into view first: an element's screenshot is cut to the window.
                self.page()
                    .execute(
                        "document.querySelector(arguments[0]).scrollIntoView({block: 'start'});",
                        vec![json!(css)],
                    )
                    .await
                    .unwrap();
                let element = self.page().find(Locator::Css(css)).await.unwrap();
                element.screenshot().await.unwrap()
            }
        };
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Whatever is left of the group (Chromium, its helpers), then the driver.
        // (`driver`, dropped next, reaps chromedriver.)
        // `--` first: procps' kill reads a bare negative number as an option. Never a
        // group below 2 (`-1` would mean every process).
        if self.group > 1 {
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{}", self.group)])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A server on SQLite in `dir` (its own file: the audit test tampers with a copy).
async fn server(dir: &Path, configure: impl Fn(&mut Config)) -> RunningServer {
    webwaka_realtime::client::tls::install_default_provider();
    let mut config = test_config(dir);
    config.jwt_secret = Some("dashboard-test-secret-0123456789abcdef".to_owned());
    configure(&mut config);
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    Server::with_listener(config, Options::default(), listener)
        .await
        .expect("the server starts")
        .spawn()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A raw WebSocket to `base` as the token's user.
async fn ws(
    base: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!("{}/ws?token={token}", base.replacen("http://", "ws://", 1));
    let (mut stream, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        first.to_text().unwrap().contains("\"connected\""),
        "{first}"
    );
    stream
}

async fn bounded(test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(TEST_BOUND, test)
        .await
        .expect("the test finished within its bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_tail_and_connections_follow_the_clients_and_the_page_stays_on_the_server() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), |_| {}).await;
        let base = server.http_url();
        let browser = Browser::launch().await;
        browser
            .open_dashboard(&base, &server.token("acme", "ops", &["admin"]))
            .await;

        // A connection appears when an SDK client connects.
        let stores = tempfile::tempdir().unwrap();
        let alice = open_client(
            client_config(&base, &stores.path().join("alice.db")),
            server.token("acme", "alice", &[]),
        )
        .await;
        let bob = open_client(
            client_config(&base, &stores.path().join("bob.db")),
            server.token("acme", "bob", &[]),
        )
        .await;
        browser
            .wait_present(
                "#connections tr[data-user='alice'][data-transport='ws']",
                true,
            )
            .await;
        browser
            .wait_present("#connections tr[data-user='bob']", true)
            .await;

        // Its message streams into the tail, without a reload, with its recipient.
        alice
            .send_message(direct("bob", "hello from alice"))
            .await
            .unwrap();
        let row = browser.wait_text("#events", "hello from alice").await;
        assert!(row.contains("message"), "{row}");
        browser.wait_text("#events", "bob: live").await;
        // The last frames in and out of the connection are shown while watching.
        browser
            .wait_text(
                "#connections tr[data-user='alice']",
                "\"event\":\"message_ack\"",
            )
            .await;
        // A class A message, never stored, as it passes.
        assert!(
            wait_state(&bob, ConnectionState::Realtime, WITHIN).await,
            "bob is connected"
        );
        bob.send_live(
            Target::User("alice".into()),
            "typing",
            json!({"typing": true}),
        )
        .await
        .unwrap();
        browser
            .wait_text("#events", "CLASS_A (live, not stored)")
            .await;
        browser.wait_text("#events", "\"typing\":true").await;
        browser.screenshot("live").await;

        // It disappears when the client drops (its WebSocket at once; the row of a user
        // who polled lately, after that stops being recent).
        alice.shutdown().await;
        drop(alice);
        browser
            .wait_present(
                "#connections tr[data-user='alice'][data-transport='ws']",
                false,
            )
            .await;
        browser
            .wait_present("#connections tr[data-user='alice']", false)
            .await;
        browser
            .wait_present("#connections tr[data-user='bob']", true)
            .await;

        // Every request the browser sent went to the server (its DevTools events).
        let sent = browser.requests(&format!("{base}/dashboard")).await;
        assert!(
            sent.iter().any(|u| u.ends_with("/dashboard/app.js")),
            "the log holds the page's requests: {sent:?}"
        );
        let origin = base.replacen("http://", "", 1);
        for url in &sent {
            assert!(
                url.starts_with(&format!("http://{origin}/"))
                    || url.starts_with(&format!("ws://{origin}/")),
                "a request outside the server: {url} (all: {sent:?})"
            );
        }
        // And what the page's timing API kept says the same.
        let urls = browser
            .page()
            .execute(
                "return [location.href].concat(performance.getEntriesByType('navigation'), \
                 performance.getEntriesByType('resource')).map(e => e.name || e);",
                vec![],
            )
            .await
            .unwrap();
        let urls: Vec<String> = serde_json::from_value(urls).unwrap();
        assert!(urls.len() >= 3, "the page, its script and styles: {urls:?}");
        for url in &urls {
            assert!(
                url.starts_with(&format!("{base}/")),
                "a request outside the server: {url} (all: {urls:?})"
            );
        }
        // And the policy says nothing else may be reached.
        for path in ["/dashboard", "/dashboard/app.js", "/dashboard/app.css"] {
            let response = http().get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(response.status(), 200);
            let csp = response.headers()["content-security-policy"]
                .to_str()
                .unwrap()
                .to_owned();
            assert!(csp.contains("default-src 'none'"), "{csp}");
            assert!(csp.contains("connect-src 'self'"), "{csp}");
            assert!(csp.contains("script-src 'self'"), "{csp}");
            let body = response.bytes().await.unwrap();
            assert!(
                !String::from_utf8_lossy(&body).contains("https://"),
                "{path}"
            );
        }
        bob.shutdown().await;
        browser.close().await;
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_from_the_page_delivers_the_event_again() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), |c| c.event_bus_max_retries = 1).await;
        let base = server.http_url();
        let http = http();
        let svc = server.token("acme", "billing", &["service"]);
        let published: Value = http
            .post(format!("{base}/api/events"))
            .bearer_auth(&svc)
            .json(&json!({"eventType": "order.placed", "payload": {"n": 1}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let event_id = published["eventId"].as_str().unwrap().to_owned();
        let claim = || async {
            let answer: Value = http
                .post(format!("{base}/api/eventbus/groups/billing/claim"))
                .bearer_auth(&svc)
                .json(
                    &json!({"consumerId": "w1", "max": 5, "visibilityTimeoutMs": 50,
                    "eventTypes": ["order.placed"]}),
                )
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            answer["events"].as_array().cloned().unwrap_or_default()
        };
        // Claimed and never acked until it is dead-lettered.
        let mut dead = false;
        for _ in 0..200 {
            let _ = claim().await;
            let dlq: Value = http
                .get(format!("{base}/api/eventbus/dlq"))
                .bearer_auth(&svc)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if !dlq["entries"].as_array().unwrap().is_empty() {
                dead = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        assert!(dead, "the event never reached the DLQ");
        assert!(
            claim().await.is_empty(),
            "dead-lettered events are not claimable"
        );

        let browser = Browser::launch().await;
        browser
            .open_dashboard(&base, &server.token("acme", "ops", &["admin"]))
            .await;
        browser.wait_text("#dlq", &event_id).await;
        browser.wait_text("#groups", "billing").await;
        browser.wait_text("#groups", "dead 1").await;
        // A Class D transaction, with its status and the audit entries of each step.
        let submitted: Value = http
            .post(format!("{base}/api/transactions"))
            .bearer_auth(server.token("acme", "alice", &[]))
            .header("Idempotency-Key", "pay-1")
            .json(&json!({"transactionType": "payment.transfer", "payload": {"amount": 5}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let transaction = submitted["transactionId"].as_str().unwrap().to_owned();
        let shown = browser
            .wait_text(
                &format!("#transactions [data-transaction-id='{transaction}']"),
                "CONFIRMED",
            )
            .await;
        assert!(shown.contains("transaction.submit"), "{shown}");
        assert!(shown.contains("transaction.confirm"), "{shown}");
        browser
            .screenshot_of("dlq", Some("section:has(#dlq)"))
            .await;
        browser
            .screenshot_of("transactions", Some("section:has(#transactions)"))
            .await;
        browser.click("#dlq button.replay").await;
        browser.wait_text("#dlq-result", "replayed").await;
        // Delivered again to the group.
        let mut again = Vec::new();
        for _ in 0..100 {
            again = claim().await;
            if !again.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(again.len(), 1, "the replayed event is claimable");
        assert_eq!(again[0]["event"]["eventId"], event_id.as_str());
        browser.wait_present("#dlq tbody tr", false).await;
        browser.close().await;
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_shows_valid_then_where_a_tampered_copy_breaks() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), |_| {}).await;
        let base = server.http_url();
        let admin = server.token("acme", "ops", &["admin"]);
        // Some audit entries: reads of the audit log, a refused cross-tenant attempt.
        for _ in 0..3 {
            let status = http()
                .get(format!("{base}/api/admin/audit"))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(status, 200);
        }
        let browser = Browser::launch().await;
        browser.open_dashboard(&base, &admin).await;
        browser.click("#verify-audit").await;
        let shown = browser.wait_text("#audit-result", "valid").await;
        assert!(!shown.contains("broken"), "{shown}");
        browser
            .screenshot_of("audit", Some("section:has(#verify-audit)"))
            .await;
        browser.close().await;
        server.shutdown().await;

        // A copy of the database with entry 2 rewritten.
        let copy = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
            }
        }
        let db = copy.path().join("webwaka.sqlite3");
        assert!(db.exists(), "the server's SQLite file");
        {
            let conn = rusqlite::Connection::open(&db).unwrap();
            conn.execute_batch(
                "DROP TRIGGER audit_log_no_update;
                 UPDATE audit_log SET body = replace(body, 'audit.read', 'audit.erased')
                 WHERE sequence = 2;",
            )
            .unwrap();
            let changed: String = conn
                .query_row("SELECT body FROM audit_log WHERE sequence = 2", [], |r| {
                    r.get(0)
                })
                .unwrap();
            assert!(changed.contains("audit.erased"), "{changed}");
        }
        let tampered = server_on(copy.path()).await;
        let base = tampered.http_url();
        let browser = Browser::launch().await;
        browser
            .open_dashboard(&base, &tampered.token("acme", "ops", &["admin"]))
            .await;
        browser.click("#verify-audit").await;
        let shown = browser
            .wait_text("#audit-result", "broken at entry 2")
            .await;
        assert!(!shown.starts_with("valid"), "{shown}");
        browser
            .screenshot_of("audit-broken", Some("section:has(#verify-audit)"))
            .await;
        browser.close().await;
        tampered.shutdown().await;
    })
    .await;
}

/// chromedriver's `POST /session/{id}/se/log {"type": "performance"}`.
#[derive(Debug)]
struct PerformanceLog;

impl fantoccini::wd::WebDriverCompatibleCommand for PerformanceLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _request_url: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({"type": "performance"}).to_string()),
        )
    }
}

/// A server on the data in `dir` as it is.
async fn server_on(dir: &Path) -> RunningServer {
    server(dir, |_| {}).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chaos_switch_on_the_page_takes_effect_on_a_connected_client() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        // Carol's socket is not read while the browser starts (seconds on a loaded
        // machine), so it answers no ping: the test settings' 5 s ping timeout would
        // close it before the page lists it.
        let server = server(dir.path(), |c| {
            c.chaos = true;
            c.ping_timeout_ms = 120_000;
        })
        .await;
        let base = server.http_url();
        let mut carol = ws(&base, &server.token("acme", "carol", &[])).await;
        let browser = Browser::launch().await;
        browser
            .open_dashboard(&base, &server.token("acme", "ops", &["admin"]))
            .await;
        browser
            .wait_present("#connections tr[data-user='carol']", true)
            .await;
        browser.wait_text("#chaos-state", "refuseWebSocket").await;
        browser.screenshot_of("chaos", Some("#chaos")).await;

        // Drop connections: carol's WebSocket ends, without a close frame.
        browser.click("#chaos-drop").await;
        let ended = tokio::time::timeout(WITHIN, async {
            loop {
                match carol.next().await {
                    None | Some(Err(_)) => return true,
                    Some(Ok(Message::Close(_))) => return false,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await
        .expect("carol's connection ended");
        assert!(
            ended,
            "dropped without a close frame, as if the network failed"
        );
        browser
            .wait_present("#connections tr[data-user='carol']", false)
            .await;

        // A switch: WebSocket upgrades refused (the client has to fall back to polling).
        browser.click("#chaos-refuse-ws").await;
        browser.click("#chaos-apply").await;
        browser
            .wait_text("#chaos-state", "\"refuseWebSocket\": true")
            .await;
        let url = format!(
            "{}/ws?token={}",
            base.replacen("http://", "ws://", 1),
            server.token("acme", "carol", &[])
        );
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 503);
            }
            other => panic!("the upgrade should be refused: {:?}", other.map(|_| ())),
        }
        browser.click("#chaos-reset").await;
        browser
            .wait_text("#chaos-state", "\"refuseWebSocket\": false")
            .await;
        let mut again = ws(&base, &server.token("acme", "carol", &[])).await;

        // One user's connections only: erin's ends, carol's stays.
        let mut erin = ws(&base, &server.token("acme", "erin", &[])).await;
        browser
            .wait_present("#connections tr[data-user='erin']", true)
            .await;
        browser.type_into("#chaos-drop-user", "erin").await;
        browser.click("#chaos-drop").await;
        let erin_ended = tokio::time::timeout(WITHIN, async {
            while let Some(Ok(_)) = erin.next().await {}
        })
        .await;
        assert!(erin_ended.is_ok(), "erin's connection was not dropped");
        again.send(Message::Ping(vec![1].into())).await.unwrap();
        let carol_alive = tokio::time::timeout(WITHIN, async {
            loop {
                match again.next().await {
                    Some(Ok(Message::Pong(_))) => return true,
                    Some(Ok(_)) => {}
                    _ => return false,
                }
            }
        })
        .await;
        assert_eq!(carol_alive, Ok(true), "carol's connection went too");

        // Tokens issued until now expire: an older token is refused from then on.
        let old_token = server.token("acme", "frank", &[]);
        tokio::time::sleep(Duration::from_millis(1100)).await; // issued a second before
        browser.click("#chaos-expire").await;
        let url = format!(
            "{}/ws?token={old_token}",
            base.replacen("http://", "ws://", 1)
        );
        let deadline = tokio::time::Instant::now() + WITHIN;
        loop {
            match tokio_tungstenite::connect_async(url.as_str()).await {
                Err(tokio_tungstenite::tungstenite::Error::Http(response))
                    if response.status() == 401 =>
                {
                    break;
                }
                Ok((mut accepted, _)) => {
                    let _ = accepted.close(None).await;
                }
                Err(other) => panic!("unexpected: {other}"),
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "a token issued before the click is still accepted"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = again.close(None).await;
        browser.close().await;
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_the_admin_role_is_refused() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), |_| {}).await;
        let base = server.http_url();
        let user = server.token("acme", "alice", &[]);
        let browser = Browser::launch().await;
        browser
            .page()
            .goto(&format!("{base}/dashboard#token={user}"))
            .await
            .unwrap();
        let error = browser.wait_text("#error", "AUTHZ_FAILED").await;
        assert!(error.contains("admin"), "{error}");
        assert_eq!(browser.count("#board:not([hidden])").await, 0);
        browser.screenshot("refused").await;
        browser.close().await;
        // The feed itself refuses it too.
        let response = http()
            .get(format!("{base}/dashboard/api/stream?token={user}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403);
        // And an admin cannot watch another tenant.
        let admin = server.token("acme", "ops", &["admin"]);
        let response = http()
            .get(format!(
                "{base}/dashboard/api/stream?token={admin}&tenant=other"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403);
        server.shutdown().await;
    })
    .await;
}

/// Two instances on one PostgreSQL database (`WEBWAKA_TEST_PG_URL`, started by
/// `scripts/test-all.sh`): one page shows the connections of both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_show_their_connections_on_one_page() {
    bounded(async {
        let instances = Instances::start(2, |_| {}).await;
        let (a, b) = (instances.url(0), instances.url(1));
        let token = webwaka_e2e::cluster::token;
        let mut on_a = ws(&a, &token("acme", "alice", &[])).await;
        let mut on_b = ws(&b, &token("acme", "bob", &[])).await;
        let browser = Browser::launch().await;
        browser
            .open_dashboard(&a, &token("acme", "ops", &["admin"]))
            .await;
        let here = instances.servers[0].instance().to_owned();
        let there = instances.servers[1].instance().to_owned();
        browser
            .wait_present(
                &format!("#connections tr[data-user='alice'][data-instance='{here}']"),
                true,
            )
            .await;
        browser
            .wait_present(
                &format!("#connections tr[data-user='bob'][data-instance='{there}']"),
                true,
            )
            .await;
        browser
            .screenshot_of("instances", Some("section:has(#connections)"))
            .await;
        // A live message sent on the other instance passes this one too.
        let frame = json!({"event": "message", "ref": "r1", "data": {
            "type": "typing", "interactionClass": "CLASS_A", "recipientId": "alice",
            "payload": {"from": "the other instance"}}});
        on_b.send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
        browser.wait_text("#events", "the other instance").await;
        browser.wait_text("#events", "alice: live").await;
        // The other instance answers for its own connections: bob's row there has his
        // transport and the last frame he sent, as a local one would.
        let bob_there = format!(
            "#connections tr[data-user='bob'][data-instance='{there}'][data-transport='ws']"
        );
        browser.wait_present(&bob_there, true).await;
        browser.wait_text(&bob_there, "the other instance").await;
        // And bob's goes away when he leaves the other instance.
        let _ = on_b.close(None).await;
        browser
            .wait_present("#connections tr[data-user='bob']", false)
            .await;
        let _ = on_a.close(None).await;
        browser.close().await;
        instances.stop().await;
    })
    .await;
}

/// A raw WebSocket whose frames are read all the time (so that the server's pings
/// are answered while the test waits), kept for [`Peer::until`].
struct Peer {
    sink: futures_util::stream::SplitSink<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        Message,
    >,
    frames: tokio::sync::mpsc::UnboundedReceiver<Value>,
    reader: tokio::task::JoinHandle<()>,
}

impl Peer {
    async fn open(base: &str, token: &str) -> Peer {
        let (sink, mut stream) = ws(base, token).await.split();
        let (tx, frames) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                if let Ok(text) = message.to_text()
                    && let Ok(frame) = serde_json::from_str::<Value>(text)
                    && tx.send(frame).is_err()
                {
                    return;
                }
            }
        });
        Peer {
            sink,
            frames,
            reader,
        }
    }

    /// Sends one frame.
    async fn send(&mut self, event: &str, data: Value, reference: &str) {
        let frame = json!({"event": event, "data": data, "ref": reference});
        self.sink
            .send(Message::text(frame.to_string()))
            .await
            .unwrap();
    }

    /// Sends a `message` frame and waits for its ack.
    async fn message_acked(&mut self, data: Value, reference: &str) {
        self.send("message", data, reference).await;
        self.until("message_ack", |f| f["event"] == "message_ack")
            .await;
    }

    /// Waits for a frame that satisfies `wanted` (bounded by [`WITHIN`]).
    async fn until(&mut self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WITHIN;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.frames.recv())
                .await
                .unwrap_or_else(|_| panic!("no frame {what} within {WITHIN:?}"))
                .expect("the connection stays open");
            if wanted(&frame) {
                return frame;
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Browser {
    /// Sets the tail filter `id` to `text` as typing would (an `input` event).
    async fn filter(&self, id: &str, text: &str) {
        self.page()
            .execute(
                "const e = document.querySelector('#filter-' + arguments[0]); \
                 e.value = arguments[1]; e.dispatchEvent(new Event('input'));",
                vec![json!(id), json!(text)],
            )
            .await
            .unwrap();
    }

    /// Waits until `css`'s text no longer contains `unwanted`.
    async fn wait_text_gone(&self, css: &str, unwanted: &str) -> String {
        let deadline = tokio::time::Instant::now() + WITHIN;
        loop {
            let text = self.text(css).await;
            if !text.contains(unwanted) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{css} still shows {unwanted:?}: {text:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The attribute `name` of `css`.
    async fn attribute(&self, css: &str, name: &str) -> Option<String> {
        let element = self.page().find(Locator::Css(css)).await.ok()?;
        element.attr(name).await.ok().flatten()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_presence_and_the_tail_filters_follow_the_clients_and_the_page_opens_with_the_past() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), |_| {}).await;
        let started = tokio::time::Instant::now();
        let base = server.http_url();
        let mut alice = Peer::open(&base, &server.token("acme", "alice", &[])).await;
        let mut bob = Peer::open(&base, &server.token("acme", "bob", &[])).await;
        for (peer, reference) in [(&mut alice, "j1"), (&mut bob, "j2")] {
            peer.send("join_room", json!({"roomId": "r1"}), reference)
                .await;
            peer.until("room_joined", |f| f["event"] == "room_joined")
                .await;
        }
        // Before any page is open: a direct message, stored in the log.
        alice
            .message_acked(
                json!({"type": "note.direct", "recipientId": "bob", "payload": {"text": "before the page"}}),
                "m1",
            )
            .await;
        // And one in another tenant.
        let mut carol = Peer::open(&base, &server.token("other", "carol", &[])).await;
        carol
            .message_acked(
                json!({"type": "note.direct", "recipientId": "dave", "payload": {"text": "other tenant's"}}),
                "m0",
            )
            .await;
        // The charts are sampled every 5 s whether or not a page is open: wait until
        // two samples span the message (a wait, not a measurement).
        tokio::time::sleep_until(started + Duration::from_secs(6)).await;

        // A super admin watching every tenant (justified) gets the instance's charts.
        let browser = Browser::launch().await;
        let root = server.token("acme", "root", &["super_admin"]);
        browser
            .open_dashboard(&base, &format!("{root}&tenant=*&justification=debugging"))
            .await;
        // The page opens with the log's newest events and the charts' last minutes.
        let tail = browser.wait_text("#events", "before the page").await;
        assert!(tail.contains("bob: before this page opened"), "{tail}");
        browser.wait_text("#events", "other tenant's").await;
        let deadline = tokio::time::Instant::now() + WITHIN;
        loop {
            let peak: f64 = browser
                .attribute("#chart-messages", "data-peak")
                .await
                .and_then(|p| p.parse().ok())
                .unwrap_or(0.0);
            if peak > 0.0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the messages chart starts with the messages sent before"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Rooms with their members' presence, live.
        let room = "#rooms tr[data-room='r1']";
        browser.wait_text(room, "alice · online").await;
        browser.wait_text(room, "bob · online").await;
        bob.send("presence_update", json!({"status": "away"}), "p1")
            .await;
        browser.wait_text(room, "bob · away").await;

        // Two more messages: one to the room, one direct to alice.
        alice
            .send(
                "message",
                json!({"type": "chat.message", "roomId": "r1", "payload": {"text": "in the room"}}),
                "m2",
            )
            .await;
        bob.send(
            "message",
            json!({"type": "chat.message", "recipientId": "alice", "payload": {"text": "bob to alice"}}),
            "m3",
        )
        .await;
        browser.wait_text("#events", "in the room").await;
        browser.wait_text("#events", "bob to alice").await;
        browser.screenshot("rooms").await;

        // The tail's filters: by type, room, user and tenant.
        browser.filter("type", "note").await;
        let shown = browser.wait_text_gone("#events", "in the room").await;
        assert!(shown.contains("before the page"), "{shown}");
        assert!(!shown.contains("bob to alice"), "{shown}");
        browser.filter("type", "").await;
        browser.filter("room", "r1").await;
        let shown = browser.wait_text_gone("#events", "bob to alice").await;
        assert!(shown.contains("in the room"), "{shown}");
        assert!(!shown.contains("before the page"), "{shown}");
        browser.filter("room", "").await;
        browser.filter("user", "bob").await;
        let shown = browser.wait_text("#events", "bob to alice").await;
        assert!(shown.contains("before the page"), "as recipient: {shown}");
        browser.filter("user", "zed").await;
        browser.wait_present("#events tbody tr", false).await;
        browser.filter("user", "").await;
        browser.filter("tenant", "nobody").await;
        browser.wait_present("#events tbody tr", false).await;
        browser.filter("tenant", "other").await;
        let shown = browser.wait_text_gone("#events", "bob to alice").await;
        assert!(shown.contains("other tenant's"), "{shown}");
        browser.filter("tenant", "acme").await;
        let shown = browser.wait_text("#events", "bob to alice").await;
        assert!(!shown.contains("other tenant's"), "{shown}");
        browser.filter("tenant", "").await;

        // Leaving the room takes bob out of it.
        bob.send("leave_room", json!({"roomId": "r1"}), "l1").await;
        browser.wait_text_gone(room, "bob ·").await;
        browser.wait_text(room, "alice · online").await;

        // A tenant's admin sees its own events only, and no instance-wide chart: its
        // charts start when its page opens, from its tenant's totals. (Away first: a
        // link that differs only in its fragment would not load the page again.)
        browser.page().goto("about:blank").await.unwrap();
        browser
            .open_dashboard(&base, &server.token("acme", "ops", &["admin"]))
            .await;
        let tail = browser.wait_text("#events", "before the page").await;
        assert!(!tail.contains("other tenant's"), "{tail}");
        browser.wait_present("#rooms tr[data-room='r1']", true).await;
        let points: usize = browser
            .attribute("#chart-messages", "data-points")
            .await
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        assert!(points <= 3, "no history: {points} points at once");
        let peak = browser.attribute("#chart-messages", "data-peak").await;
        assert_eq!(peak.as_deref(), Some("0"), "nothing sent since it opened");

        browser.close().await;
        server.shutdown().await;
    })
    .await;
}
