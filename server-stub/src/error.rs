//! Errors: [`ApiError`] is what a refused request answers (an HTTP response or a
//! WebSocket `error` frame, both with core's [`ErrorBody`]); [`StoreError`] is what the
//! storage layer fails with (always an `INTERNAL_ERROR` to clients).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use webwaka_realtime::protocol::{DecodeError, ErrorBody, ErrorCode};

/// Longest id (room, user, message, event, entity, type) accepted, in bytes: core's
/// limit, which the protocol types' `validate` functions check.
pub(crate) const MAX_ID_LEN: usize = webwaka_realtime::protocol::MAX_ID_BYTES;

/// Refuses an id longer than [`MAX_ID_LEN`] or holding a control character, naming the
/// field (for ids that no protocol type's `validate` covers: query parameters, paths,
/// headers, admin bodies).
pub(crate) fn check_id(path: &str, value: Option<&str>) -> Result<(), ApiError> {
    match value {
        Some(v) => Ok(webwaka_realtime::protocol::check_id(path, v)?),
        None => Ok(()),
    }
}

/// A refusal, in the protocol's one error shape.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{body}")]
pub struct ApiError {
    /// The body sent to the client.
    pub body: ErrorBody,
    /// `Retry-After` in seconds (SERVER_FULL, RATE_LIMIT).
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    /// An error with `code` and the human text `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            body: ErrorBody::new(code, message),
            retry_after_secs: None,
        }
    }

    /// `INVALID_REQUEST` naming the offending field in `details.path`.
    pub fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        let path = path.into();
        let message = message.into();
        Self::new(
            ErrorCode::InvalidRequest,
            format!("invalid {path}: {message}"),
        )
        .with_detail("path", path)
    }

    /// `AUTH_FAILED`.
    pub fn auth(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::AuthFailed, message)
    }

    /// `AUTHZ_FAILED`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::AuthzFailed, message)
    }

    /// `NOT_FOUND`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// `INTERNAL_ERROR` (the details stay in the server's log).
    pub fn internal() -> Self {
        Self::new(ErrorCode::InternalError, "internal server error")
    }

    /// `RATE_LIMIT` with `details.retryAfterMs` (and `Retry-After` over HTTP).
    pub fn rate_limited(retry_after_ms: u64) -> Self {
        Self {
            body: ErrorBody::rate_limited(retry_after_ms),
            retry_after_secs: Some(retry_after_ms.div_ceil(1000).max(1)),
        }
    }

    /// The same error with one more `details` entry.
    pub fn with_detail(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.body = self.body.with_detail(key, value);
        self
    }

    /// The error code.
    pub fn code(&self) -> ErrorCode {
        self.body.code
    }
}

impl From<DecodeError> for ApiError {
    fn from(err: DecodeError) -> Self {
        Self {
            body: ErrorBody::from(err),
            retry_after_secs: None,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            // The database is down or restarting: the client should come back soon
            // (503 with Retry-After; nothing was written, or the retry is deduplicated).
            StoreError::Unavailable(why) | StoreError::Conflict(why) => {
                tracing::warn!(%why, "storage unavailable");
                let mut error = ApiError::new(
                    ErrorCode::ServerFull,
                    "the database is unavailable: try again shortly",
                )
                .with_detail("reason", "STORAGE_UNAVAILABLE");
                error.retry_after_secs = Some(1);
                error
            }
            err => {
                tracing::error!(error = %err, "storage failed");
                ApiError::internal()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.body.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let code = self.body.code;
        let mut response = (status, axum::Json(self.body)).into_response();
        // For the dashboard's errors by code (read by the request's middleware).
        response.extensions_mut().insert(code);
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Why the storage layer failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL refused (a statement failed; the database itself is up).
    #[error("postgres: {0}")]
    Postgres(String),
    /// PostgreSQL refused a value a statement carried (SQLSTATE class 22, a data
    /// exception: e.g. a NUL in text): one of the rows is the cause, not the database.
    #[error("postgres refused a value: {0}")]
    DataRefused(String),
    /// The database cannot be reached or is restarting: retryable.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// A concurrent transaction won (deadlock or serialization failure): run it again.
    #[error("conflict with a concurrent transaction: {0}")]
    Conflict(String),
    /// The schema could not be brought up to date.
    #[error("migration: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    /// A stored JSON document did not decode.
    #[error("stored JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Filesystem trouble (data directory).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The writer thread is gone (shutting down).
    #[error("the storage writer has stopped")]
    WriterGone,
    /// The batch this write belonged to could not be committed.
    #[error("commit failed: {0}")]
    CommitFailed(String),
    /// Stored data breaks an invariant.
    #[error("corrupt data: {0}")]
    Corrupt(String),
}

/// A job's own refusal or a storage failure: what a job run on the writer returns.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The request is refused; nothing was written.
    #[error(transparent)]
    Refused(#[from] ApiError),
    /// Storage failed; nothing was written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for JobError {
    fn from(err: rusqlite::Error) -> Self {
        JobError::Store(StoreError::Sqlite(err))
    }
}

impl From<serde_json::Error> for JobError {
    fn from(err: serde_json::Error) -> Self {
        JobError::Store(StoreError::Json(err))
    }
}

impl From<JobError> for ApiError {
    fn from(err: JobError) -> Self {
        match err {
            JobError::Refused(api) => api,
            JobError::Store(store) => store.into(),
        }
    }
}
