//! The HTTP side of the protocol (PROTOCOL.md §4), as the client uses it: polling,
//! sending messages when the WebSocket is down, reconciliation, snapshots and Class D
//! transactions. A thin typed layer over `reqwest`; errors are classified so that the
//! supervisor knows whether to retry, refresh the token, or give an item up.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::machine::{Failure, clamp_retry_hint};
use crate::protocol::error::RETRY_AFTER_MS_DETAIL;
use crate::protocol::transaction::IDEMPOTENCY_KEY_HEADER;
use crate::protocol::{
    ErrorBody, ErrorCode, MessageAccepted, PollResponse, ReconciliationRequest,
    ReconciliationResponse, SendMessage, StateSnapshot, TransactionAccepted, TransactionRequest,
    TransactionStatus,
};

/// How an HTTP call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HttpError {
    /// No answer: refused, reset, timed out.
    #[error("network: {0}")]
    Network(String),
    /// The server answered with an error.
    #[error("{status}: {}", body.as_ref().map_or("(no error body)", |b| b.error.as_str()))]
    Status {
        /// The HTTP status.
        status: u16,
        /// The error body, when the server sent one.
        body: Option<ErrorBody>,
        /// `Retry-After` (seconds) or `details.retryAfterMs`, when given.
        retry_after: Option<Duration>,
    },
    /// The answer was not what the protocol says.
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// The answer came, but the local store could not record it: not the network's or
    /// the server's fault (the connection state does not change for it).
    #[error("local storage: {0}")]
    Storage(crate::client::ClientError),
}

impl HttpError {
    /// The error code the server gave, if any.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            HttpError::Status { body: Some(b), .. } => Some(b.code),
            _ => None,
        }
    }

    /// What this says about the connection, for the state machine.
    pub fn failure(&self) -> Failure {
        match self {
            HttpError::Network(_) => Failure::Network,
            HttpError::Status { status: 401, .. } => Failure::Auth,
            HttpError::Status {
                status: 503,
                retry_after,
                ..
            } => Failure::ServerFull {
                retry_after: *retry_after,
            },
            _ => Failure::Server,
        }
    }

    /// True when sending the same request again cannot succeed: the item is dead
    /// (bad input, forbidden, idempotency conflict). Auth, rate limits, timeouts and
    /// server errors are temporary.
    pub fn is_permanent(&self) -> bool {
        match self {
            HttpError::Status { status, .. } => {
                (400..500).contains(status) && !matches!(status, 401 | 408 | 425 | 429)
            }
            HttpError::Protocol(_) | HttpError::Storage(_) | HttpError::Network(_) => false,
        }
    }

    /// When the server asked to wait before retrying.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            HttpError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The HTTP client: each request bounded by `timeout`, idle connections kept 30 s.
fn build_client(
    timeout: Duration,
    tls: &rustls::ClientConfig,
) -> Result<reqwest::Client, HttpError> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls.clone())
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| HttpError::Network(e.to_string()))
}

/// A transport failure, with its causes: reqwest's own message ("error sending
/// request") does not say whether the connection was refused, reset or timed out.
fn network_error(e: reqwest::Error) -> HttpError {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    // Bounded: a cause chain is a few links long.
    for _ in 0..8 {
        let Some(cause) = source else { break };
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    HttpError::Network(text)
}

/// The HTTP API of one server.
#[derive(Debug, Clone)]
pub(crate) struct HttpApi {
    client: reqwest::Client,
    base: String,
    timeout: Duration,
    tls: std::sync::Arc<rustls::ClientConfig>,
}

impl HttpApi {
    /// An API client for `base` (e.g. `http://127.0.0.1:3000`), each request bounded by
    /// `timeout`, `https://` with `tls`.
    pub(crate) fn new(
        base: &str,
        timeout: Duration,
        tls: std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<Self, HttpError> {
        Ok(Self {
            client: build_client(timeout, &tls)?,
            base: base.trim_end_matches('/').to_owned(),
            timeout,
            tls,
        })
    }

    /// The same API with a new connection pool: after the network changed, a kept-alive
    /// connection may be bound to the old interface or lead to a peer that is gone,
    /// and a request sent on it fails or hangs until its timeout. Browsers close their
    /// idle sockets on a network change for the same reason. Requests under way keep
    /// the pool they started with.
    pub(crate) fn fresh(&self) -> Result<Self, HttpError> {
        Ok(Self {
            client: build_client(self.timeout, &self.tls)?,
            ..self.clone()
        })
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        token: &str,
        query: &[(&str, String)],
        headers: &[(&str, &str)],
        body: Option<&B>,
    ) -> Result<T, HttpError> {
        let mut req = self
            .client
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(token)
            .query(query);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(network_error)?;
        let status = resp.status();
        let header_retry = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(retry_after_header);
        let bytes = resp.bytes().await.map_err(network_error)?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|e| HttpError::Protocol(format!("{path}: {e}")));
        }
        let body: Option<ErrorBody> = serde_json::from_slice(&bytes).ok();
        let detail_retry = body.as_ref().and_then(retry_after_detail);
        Err(HttpError::Status {
            status: status.as_u16(),
            body,
            retry_after: detail_retry.or(header_retry),
        })
    }

    /// `GET /api/events/poll`.
    pub(crate) async fn poll(
        &self,
        token: &str,
        last_event_id: Option<&str>,
        limit: u32,
    ) -> Result<PollResponse, HttpError> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(id) = last_event_id {
            query.push(("lastEventId", id.to_owned()));
        }
        self.call::<(), _>(Method::GET, "/api/events/poll", token, &query, &[], None)
            .await
    }

    /// `POST /api/messages`.
    pub(crate) async fn post_message(
        &self,
        token: &str,
        message: &SendMessage,
    ) -> Result<MessageAccepted, HttpError> {
        self.call(
            Method::POST,
            "/api/messages",
            token,
            &[],
            &[],
            Some(message),
        )
        .await
    }

    /// `POST /api/reconciliation/reconcile`.
    pub(crate) async fn reconcile(
        &self,
        token: &str,
        request: &ReconciliationRequest,
    ) -> Result<ReconciliationResponse, HttpError> {
        self.call(
            Method::POST,
            "/api/reconciliation/reconcile",
            token,
            &[],
            &[],
            Some(request),
        )
        .await
    }

    /// `GET /api/reconciliation/snapshot/{type}/{id}`.
    pub(crate) async fn snapshot(
        &self,
        token: &str,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<StateSnapshot, HttpError> {
        let path = format!(
            "/api/reconciliation/snapshot/{}/{}",
            encode_segment(entity_type),
            encode_segment(entity_id)
        );
        self.call::<(), _>(Method::GET, &path, token, &[], &[], None)
            .await
    }

    /// `POST /api/transactions` with its idempotency key.
    pub(crate) async fn submit_transaction(
        &self,
        token: &str,
        idempotency_key: &str,
        request: &TransactionRequest,
    ) -> Result<TransactionAccepted, HttpError> {
        self.call(
            Method::POST,
            "/api/transactions",
            token,
            &[],
            &[(IDEMPOTENCY_KEY_HEADER, idempotency_key)],
            Some(request),
        )
        .await
    }

    /// `GET /api/transactions/{id}`.
    pub(crate) async fn transaction_status(
        &self,
        token: &str,
        transaction_id: &str,
    ) -> Result<TransactionStatus, HttpError> {
        let path = format!("/api/transactions/{}", encode_segment(transaction_id));
        self.call::<(), _>(Method::GET, &path, token, &[], &[], None)
            .await
    }
}

/// A `Retry-After` header's delay (delta-seconds), kept within
/// [`clamp_retry_hint`]'s bounds: a huge one waits an hour, not forever (nor, past
/// `i64`, not at all). A negative, fractional or non-numeric value, or an HTTP date, is
/// ignored (`None`): the client's own backoff applies.
pub(crate) fn retry_after_header(value: &str) -> Option<Duration> {
    let digits = value.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // All digits: only too many of them fails to parse, which is "huge".
    let secs = digits.parse::<u64>().unwrap_or(u64::MAX);
    Some(clamp_retry_hint(Duration::from_secs(secs)))
}

/// An error body's `details.retryAfterMs`, kept within [`clamp_retry_hint`]'s bounds;
/// `None` when absent, negative or not a number.
pub(crate) fn retry_after_detail(body: &ErrorBody) -> Option<Duration> {
    let value = body.details.as_ref()?.get(RETRY_AFTER_MS_DETAIL)?;
    let ms = match value.as_u64() {
        Some(ms) => ms,
        // A number too large for u64 (1e300): huge. A negative one: ignored.
        None => match value.as_f64() {
            Some(f) if f.is_finite() && f >= 0.0 => u64::MAX,
            _ => return None,
        },
    };
    Some(clamp_retry_hint(Duration::from_millis(ms)))
}

/// Percent-encodes one path segment (ids are usually UUIDs, but entity ids are the
/// app's and may hold anything).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// True for a status the server uses when the resource is simply not there.
pub(crate) fn is_not_found(e: &HttpError) -> bool {
    matches!(e, HttpError::Status { status, .. } if *status == StatusCode::NOT_FOUND.as_u16())
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode_segment("a b/c%"), "a%20b%2Fc%25");
        assert_eq!(encode_segment("doc-1_x.y~"), "doc-1_x.y~");
    }

    #[test]
    fn retry_hints_are_clamped_and_bad_ones_ignored() {
        use crate::machine::{MAX_SERVER_DELAY, MIN_SERVER_DELAY};
        assert_eq!(retry_after_header(" 20 "), Some(Duration::from_secs(20)));
        assert_eq!(retry_after_header("0"), Some(MIN_SERVER_DELAY));
        for huge in ["3601", "18446744073709551615", "99999999999999999999999999"] {
            assert_eq!(retry_after_header(huge), Some(MAX_SERVER_DELAY), "{huge}");
        }
        for bad in [
            "",
            "-5",
            "1.5",
            "soon",
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "+3",
        ] {
            assert_eq!(retry_after_header(bad), None, "{bad:?}");
        }
        let body = |v: serde_json::Value| {
            let mut details = serde_json::Map::new();
            details.insert(RETRY_AFTER_MS_DETAIL.to_owned(), v);
            ErrorBody {
                details: Some(details),
                ..ErrorBody::new(ErrorCode::RateLimit, "slow down")
            }
        };
        let detail = |v| retry_after_detail(&body(v));
        assert_eq!(
            detail(serde_json::json!(2500)),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(detail(serde_json::json!(u64::MAX)), Some(MAX_SERVER_DELAY));
        assert_eq!(detail(serde_json::json!(1e300)), Some(MAX_SERVER_DELAY));
        assert_eq!(detail(serde_json::json!(8.3e15)), Some(MAX_SERVER_DELAY));
        assert_eq!(detail(serde_json::json!(0)), Some(MIN_SERVER_DELAY));
        assert_eq!(detail(serde_json::json!(-1)), None);
        assert_eq!(detail(serde_json::json!("10")), None);
        assert_eq!(detail(serde_json::json!(null)), None);
    }

    #[test]
    fn errors_are_classified() {
        let status = |s: u16| HttpError::Status {
            status: s,
            body: None,
            retry_after: None,
        };
        assert!(status(400).is_permanent());
        assert!(status(409).is_permanent());
        assert!(!status(401).is_permanent());
        assert!(!status(429).is_permanent());
        assert!(!status(500).is_permanent());
        assert!(!HttpError::Network("x".into()).is_permanent());
        assert_eq!(status(401).failure(), Failure::Auth);
        assert_eq!(HttpError::Network("x".into()).failure(), Failure::Network);
    }
}
