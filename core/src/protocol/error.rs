//! The one error shape of the protocol (PROTOCOL.md §2): an HTTP error body and the
//! `data` of a WebSocket `error` frame are both an [`ErrorBody`].
//!
//! `{"error": "human text", "code": "RATE_LIMIT", "status": 429, "ref"?: "...",
//! "details"?: {...}}`. The [`ErrorCode`] is what programs branch on; `error` is for
//! people. A code this version does not know decodes to [`ErrorCode::Unknown`], so a
//! newer server never makes an error unreadable.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{DecodeError, JsonObject};

/// Machine-readable error code, with its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// 401: missing, malformed, wrongly signed or expired token.
    AuthFailed,
    /// 403: authenticated, but not allowed (role, room policy, missing justification).
    AuthzFailed,
    /// 403: the request named a tenant other than the token's.
    TenantViolation,
    /// 400: the request is malformed or breaks a protocol rule.
    InvalidRequest,
    /// 404: no such resource (or not visible to the caller).
    NotFound,
    /// 409: an idempotency key was reused with a different body.
    IdempotencyConflict,
    /// 410: the cursor is older than retention (or unknown); refresh from snapshots.
    CursorExpired,
    /// 413: the frame or body is over the size limit.
    PayloadTooLarge,
    /// 422: `CLASS_D` traffic sent over realtime; use `/api/transactions`.
    RealtimeNotAllowed,
    /// 429: rate limit exceeded; `details.retryAfterMs` says when to retry.
    RateLimit,
    /// 503: the server refuses new connections for now.
    ServerFull,
    /// 500: the server failed.
    InternalError,
    /// A code this version does not know (from a newer peer); encodes as `UNKNOWN`.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Every known code (not [`ErrorCode::Unknown`]).
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::AuthFailed,
        ErrorCode::AuthzFailed,
        ErrorCode::TenantViolation,
        ErrorCode::InvalidRequest,
        ErrorCode::NotFound,
        ErrorCode::IdempotencyConflict,
        ErrorCode::CursorExpired,
        ErrorCode::PayloadTooLarge,
        ErrorCode::RealtimeNotAllowed,
        ErrorCode::RateLimit,
        ErrorCode::ServerFull,
        ErrorCode::InternalError,
    ];

    /// The HTTP status this code is answered with (500 for [`ErrorCode::Unknown`]).
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::AuthFailed => 401,
            ErrorCode::AuthzFailed | ErrorCode::TenantViolation => 403,
            ErrorCode::InvalidRequest => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::IdempotencyConflict => 409,
            ErrorCode::CursorExpired => 410,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::RealtimeNotAllowed => 422,
            ErrorCode::RateLimit => 429,
            ErrorCode::ServerFull => 503,
            ErrorCode::InternalError | ErrorCode::Unknown => 500,
        }
    }

    /// The code as written on the wire, e.g. `"RATE_LIMIT"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::AuthFailed => "AUTH_FAILED",
            ErrorCode::AuthzFailed => "AUTHZ_FAILED",
            ErrorCode::TenantViolation => "TENANT_VIOLATION",
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::IdempotencyConflict => "IDEMPOTENCY_CONFLICT",
            ErrorCode::CursorExpired => "CURSOR_EXPIRED",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::RealtimeNotAllowed => "REALTIME_NOT_ALLOWED",
            ErrorCode::RateLimit => "RATE_LIMIT",
            ErrorCode::ServerFull => "SERVER_FULL",
            ErrorCode::InternalError => "INTERNAL_ERROR",
            ErrorCode::Unknown => "UNKNOWN",
        }
    }

    /// True when retrying the same request later may succeed (rate limit, server full,
    /// internal error).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::RateLimit | ErrorCode::ServerFull | ErrorCode::InternalError
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Key of `details` that carries the retry delay of a `RATE_LIMIT` error.
pub const RETRY_AFTER_MS_DETAIL: &str = "retryAfterMs";

/// The error body: HTTP error responses and the `data` of a WebSocket `error` frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Human-readable text; not meant for matching.
    pub error: String,
    /// What went wrong, for programs.
    pub code: ErrorCode,
    /// The HTTP-equivalent status (also on WebSocket errors).
    pub status: u16,
    /// The `ref` of the client frame this answers (WebSocket only).
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Machine-readable extra data, e.g. `retryAfterMs` or the offending `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<JsonObject>,
}

impl ErrorBody {
    /// An error with `code`, its HTTP status and the human text `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: message.into(),
            code,
            status: code.http_status(),
            reference: None,
            details: None,
        }
    }

    /// A `RATE_LIMIT` error saying when to retry (`details.retryAfterMs`).
    pub fn rate_limited(retry_after_ms: u64) -> Self {
        Self::new(ErrorCode::RateLimit, "rate limit exceeded")
            .with_detail(RETRY_AFTER_MS_DETAIL, retry_after_ms)
    }

    /// The same error answering the client frame that carried `reference`.
    pub fn with_ref(mut self, reference: impl Into<String>) -> Self {
        self.reference = Some(reference.into());
        self
    }

    /// The same error with `details` replaced.
    pub fn with_details(mut self, details: JsonObject) -> Self {
        self.details = Some(details);
        self
    }

    /// The same error with one more `details` entry.
    pub fn with_detail(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.details
            .get_or_insert_with(JsonObject::new)
            .insert(key.into(), value.into());
        self
    }

    /// `details.retryAfterMs`, when present and a non-negative integer.
    pub fn retry_after_ms(&self) -> Option<u64> {
        self.details.as_ref()?.get(RETRY_AFTER_MS_DETAIL)?.as_u64()
    }

    /// `details.path`: the field an `INVALID_REQUEST` is about, when known.
    pub fn path(&self) -> Option<&str> {
        self.details.as_ref()?.get("path")?.as_str()
    }
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.status, self.error)
    }
}

impl std::error::Error for ErrorBody {}

impl From<DecodeError> for ErrorBody {
    /// An `INVALID_REQUEST` naming the offending field in `details.path`.
    fn from(err: DecodeError) -> Self {
        let path = err.path.clone();
        ErrorBody::new(ErrorCode::InvalidRequest, err.to_string()).with_detail("path", path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::decode;

    #[test]
    fn every_code_round_trips_and_has_its_status() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(decode::<ErrorCode>(&json).unwrap(), code);
        }
        assert_eq!(ErrorCode::RealtimeNotAllowed.http_status(), 422);
        assert_eq!(ErrorCode::CursorExpired.http_status(), 410);
    }

    #[test]
    fn an_unknown_code_decodes_to_unknown() {
        let body: ErrorBody =
            decode(r#"{"error":"slow down","code":"QUOTA_SPENT","status":402}"#).unwrap();
        assert_eq!(body.code, ErrorCode::Unknown);
        assert_eq!(body.status, 402);
    }

    #[test]
    fn rate_limited_carries_retry_after() {
        let body = ErrorBody::rate_limited(1500).with_ref("r1");
        assert_eq!(body.retry_after_ms(), Some(1500));
        assert_eq!(body.status, 429);
        assert_eq!(body.to_string(), "RATE_LIMIT (429): rate limit exceeded");
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(json["ref"], "r1");
        assert_eq!(json["details"]["retryAfterMs"], 1500);
    }

    #[test]
    fn a_decode_error_becomes_invalid_request_with_its_path() {
        let body = ErrorBody::from(DecodeError::new("data.roomId", "missing field `roomId`"));
        assert_eq!(body.code, ErrorCode::InvalidRequest);
        assert_eq!(body.path(), Some("data.roomId"));
    }
}
