//! Test harness: a real server on a loopback port with its SQLite file in a temp
//! directory, an HTTP client, and a WebSocket client whose reads are all bounded in time.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use webwaka_server_stub::{Config, Options, RunningServer, Server};

/// The secret every test server uses.
pub const SECRET: &str = "integration-test-secret-0123456789";
/// How long a test waits for one expected frame.
pub const WAIT: Duration = Duration::from_secs(3);

/// Settings for tests: loopback, any port, short intervals.
pub fn test_config(dir: &std::path::Path) -> Config {
    let mut config = Config::new(dir);
    config.port = 0;
    config.jwt_secret = Some(SECRET.to_owned());
    config.ping_interval_ms = 200;
    config.ping_timeout_ms = 1_000;
    config.maintenance_interval_ms = 100;
    config.transaction_confirm_delay_ms = 100;
    config.shutdown_grace_ms = 2_000;
    config.log_level = "warn".to_owned();
    config
}

/// A server and the directory holding its database.
pub struct TestServer {
    pub server: Option<RunningServer>,
    pub config: Config,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

impl TestServer {
    /// Starts a server with the test settings, changed by `tweak`.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(dir.path());
        tweak(&mut config);
        Self::start_in(dir, config, Options::default()).await
    }

    /// Starts with a custom transaction processor.
    pub async fn start_with(tweak: impl FnOnce(&mut Config), options: Options) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(dir.path());
        tweak(&mut config);
        Self::start_in(dir, config, options).await
    }

    async fn start_in(dir: tempfile::TempDir, mut config: Config, options: Options) -> Self {
        webwaka_server_stub::telemetry::init(&config);
        webwaka_server_stub::testing::use_engine_under_test(&mut config).await;
        let server = Server::start_with(config.clone(), options)
            .await
            .expect("server starts");
        // reqwest without a TLS provider of its own (see Cargo.toml) needs a default.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            server: Some(server),
            config,
            dir,
            http: reqwest::Client::new(),
        }
    }

    pub fn running(&self) -> &RunningServer {
        self.server.as_ref().expect("server running")
    }

    /// Stops the server (graceful) and starts a new one on the same database.
    pub async fn restart(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        let server = Server::start_with(self.config.clone(), Options::default())
            .await
            .expect("server restarts");
        self.server = Some(server);
    }

    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }

    /// Runs SQL (valid on both engines) on the server's database, behind its back.
    pub async fn sql(&self, sql: &str) {
        webwaka_server_stub::testing::execute(&self.config, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The integer `sql` selects from the server's database.
    pub async fn sql_i64(&self, sql: &str) -> i64 {
        webwaka_server_stub::testing::query_i64(&self.config, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The engine this run exercises.
    pub fn engine(&self) -> webwaka_server_stub::Engine {
        webwaka_server_stub::testing::engine_under_test()
    }

    pub fn token(&self, tenant: &str, user: &str, roles: &[&str]) -> String {
        self.running().token(tenant, user, roles)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.running().http_url(), path)
    }

    /// GET with an optional token and extra headers; (status, JSON body or Null).
    pub async fn get(
        &self,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut request = self.http.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// POST a JSON body (or raw text when `body` is a string starting with `RAW:`).
    pub async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: Value,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut request = self.http.post(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        request = match &body {
            Value::String(s) if s.starts_with("RAW:") => request
                .header("content-type", "application/json")
                .body(s.trim_start_matches("RAW:").to_owned()),
            _ => request.json(&body),
        };
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Opens a WebSocket with `token` (query string `extra` appended) and reads
    /// `connected`.
    pub async fn ws(&self, token: &str) -> Ws {
        self.ws_query(token, "").await
    }

    pub async fn ws_query(&self, token: &str, extra: &str) -> Ws {
        let (mut ws, _) = self
            .ws_raw(Some(token), extra, &[])
            .await
            .expect("upgrade accepted");
        let connected = ws.next_frame().await;
        assert_eq!(connected["event"], "connected", "{connected}");
        ws.connected = connected["data"].clone();
        ws
    }

    /// Tries an upgrade; on refusal returns (HTTP status, body).
    pub async fn ws_raw(
        &self,
        token: Option<&str>,
        extra: &str,
        headers: &[(&str, &str)],
    ) -> Result<(Ws, ()), (u16, Value)> {
        let url = format!(
            "{}?{}",
            self.running().ws_url(),
            extra.trim_start_matches('&')
        );
        let mut request = url.into_client_request().expect("request");
        if let Some(token) = token.filter(|t| !t.is_empty()) {
            request.headers_mut().insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
            );
        }
        for (k, v) in headers {
            let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes())
                .expect("header name");
            request
                .headers_mut()
                .insert(name, HeaderValue::from_str(v).expect("header"));
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((stream, _)) => Ok((
                Ws {
                    stream,
                    connected: Value::Null,
                },
                (),
            )),
            Err(WsError::Http(response)) => {
                let status = response.status().as_u16();
                let body = response
                    .body()
                    .as_ref()
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or(Value::Null);
                Err((status, body))
            }
            Err(other) => panic!("upgrade failed: {other}"),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // Servers stopped explicitly are gone; others end with the runtime.
    }
}

/// A WebSocket client.
pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub connected: Value,
}

/// What the next read gave.
#[derive(Debug)]
pub enum Read {
    Frame(Value),
    Closed(Option<CloseFrame>),
    Timeout,
}

impl Ws {
    pub async fn send(&mut self, frame: Value) {
        self.stream
            .send(Message::Text(frame.to_string().into()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.stream.send(message).await.expect("send");
    }

    /// The next text frame, close, or a timeout after `wait` (pings are skipped).
    pub async fn read(&mut self, wait: Duration) -> Read {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = tokio::time::timeout_at(deadline, self.stream.next()).await;
            match next {
                Err(_) => return Read::Timeout,
                Ok(None) => return Read::Closed(None),
                Ok(Some(Err(_))) => return Read::Closed(None),
                Ok(Some(Ok(Message::Text(text)))) => {
                    return Read::Frame(serde_json::from_str(text.as_str()).expect("JSON frame"));
                }
                Ok(Some(Ok(Message::Close(frame)))) => return Read::Closed(frame),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The next text frame; panics on close or timeout.
    pub async fn next_frame(&mut self) -> Value {
        match self.read(WAIT).await {
            Read::Frame(frame) => frame,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// The next frame whose event is `event`, skipping others (presence, deliveries).
    pub async fn expect(&mut self, event: &str) -> Value {
        for _ in 0..50 {
            let frame = self.next_frame().await;
            if frame["event"] == event {
                return frame;
            }
        }
        panic!("no {event} frame within 50 frames");
    }

    /// Asserts that no frame of `event` arrives within `wait` (others are skipped).
    pub async fn expect_none(&mut self, event: &str, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            match self.read(left).await {
                Read::Frame(frame) if frame["event"] == event => {
                    panic!("unexpected {event}: {frame}")
                }
                Read::Frame(_) => continue,
                Read::Closed(_) | Read::Timeout => return,
            }
        }
    }

    /// Reads until the server closes; the close code.
    pub async fn expect_close(&mut self, wait: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read(left).await {
                Read::Frame(_) => continue,
                Read::Closed(frame) => return frame.map(|f| u16::from(f.code)),
                Read::Timeout => panic!("the server did not close within {wait:?}"),
            }
        }
    }

    /// Sends a frame and returns the answer carrying its `ref`.
    pub async fn call(&mut self, event: &str, data: Value, reference: &str) -> Value {
        self.send(json!({"event": event, "data": data, "ref": reference}))
            .await;
        for _ in 0..50 {
            let frame = self.next_frame().await;
            if frame["ref"] == reference {
                return frame;
            }
        }
        panic!("no answer to {reference}");
    }

    /// Pings and waits for the pong: proves the connection is still usable.
    pub async fn assert_usable(&mut self) {
        let pong = self.call("ping", Value::Null, "alive?").await;
        assert_eq!(pong["event"], "pong", "{pong}");
    }

    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}

/// A message frame's data.
pub fn message(recipient: Option<&str>, room: Option<&str>, text: &str) -> Value {
    let mut data = json!({"type": "chat.message", "payload": {"text": text}});
    if let Some(r) = recipient {
        data["recipientId"] = json!(r);
    }
    if let Some(r) = room {
        data["roomId"] = json!(r);
    }
    data
}

/// The audit entries of `tenant` as its admin sees them.
pub async fn audit_entries(ts: &TestServer, tenant: &str) -> Vec<Value> {
    let admin = ts.token(tenant, "auditor", &["admin"]);
    let (status, page) = ts
        .get("/api/admin/audit?limit=1000", Some(&admin), &[])
        .await;
    assert_eq!(status, 200, "{page}");
    page["entries"].as_array().cloned().unwrap_or_default()
}

/// Waits (bounded) until `check` holds.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}
