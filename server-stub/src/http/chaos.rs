//! The chaos layer over HTTP (role `admin`; see [`crate::chaos`]), and the middleware
//! that adds its latency and HTTP failures.
//!
//! - `GET /api/admin/chaos`: the state;
//! - `PUT /api/admin/chaos`: replaces the switches (absent fields: off);
//! - `DELETE /api/admin/chaos`: everything off (tokens no longer expire early);
//! - `POST /api/admin/chaos/drop-connections` `{"userId"?: "bob"}`: drops the caller's
//!   tenant's WebSocket connections (or one user's) without a close frame;
//! - `POST /api/admin/chaos/expire-tokens`: tokens issued before now count as expired.
//!
//! When the server runs without `CHAOS=1` every one of them answers 404 `NOT_FOUND`
//! saying so. Every change is an audit record (`chaos.*`). These endpoints never meet
//! the layer's own latency or failures, so it can always be switched off.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use webwaka_realtime::protocol::{AuditResult, decode};

use crate::app::App;
use crate::audit::AuditRecord;
use crate::auth::ROLE_ADMIN;
use crate::chaos::{ChaosControl, ChaosSettings, ChaosState, Target};
use crate::error::{ApiError, check_id};
use crate::http::extract::{Caller, JsonBody};

/// Where the chaos endpoints live.
pub(crate) const PATH: &str = "/api/admin/chaos";

/// Body of `drop-connections`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct DropRequest {
    /// Only this user's connections (of the caller's tenant).
    #[serde(default)]
    user_id: Option<String>,
}

/// Answer of `drop-connections` and `expire-tokens`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Closed {
    /// Connections closed.
    closed: usize,
    /// `expire-tokens`: tokens issued before this (seconds since the epoch) are expired.
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens_expired_before: Option<i64>,
}

/// The enabled layer, or 404 saying how to enable it; and the caller must be an admin.
fn layer(app: &App, caller: &Caller) -> Result<ChaosControl, ApiError> {
    let chaos = ChaosControl::of(app.chaos.as_ref(), &app.hub, &app.node).ok_or_else(|| {
        ApiError::not_found(
            "the chaos layer is off: start the server with CHAOS=1 (development only)",
        )
    })?;
    caller.require_role(&[ROLE_ADMIN])?;
    Ok(chaos)
}

/// Audits a chaos change by `caller`.
async fn audit(app: &App, caller: &Caller, action: &str, what: serde_json::Value) {
    let record = AuditRecord::new(
        &caller.identity.tenant_id,
        caller.user(),
        action,
        "chaos",
        AuditResult::Success,
    )
    .meta("change", what);
    if let Err(error) = app.audit(record).await {
        tracing::warn!(%error, "cannot audit a chaos change");
    }
}

/// `GET /api/admin/chaos`.
pub(crate) async fn get(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> Result<Json<ChaosState>, ApiError> {
    Ok(Json(layer(&app, &caller)?.state()))
}

/// `PUT /api/admin/chaos`: the new switches, all at once.
pub(crate) async fn put(
    State(app): State<Arc<App>>,
    caller: Caller,
    body: JsonBody<ChaosSettings>,
) -> Result<Json<ChaosState>, ApiError> {
    let chaos = layer(&app, &caller)?;
    chaos
        .set(body.value)
        .map_err(|e| ApiError::invalid(e.field, e.message))?;
    audit(&app, &caller, "chaos.set", body.raw).await;
    Ok(Json(chaos.state()))
}

/// `DELETE /api/admin/chaos`: everything off.
pub(crate) async fn delete(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> Result<Json<ChaosState>, ApiError> {
    let chaos = layer(&app, &caller)?;
    chaos.reset();
    audit(&app, &caller, "chaos.reset", serde_json::Value::Null).await;
    Ok(Json(chaos.state()))
}

/// `POST /api/admin/chaos/drop-connections` (the body is optional).
pub(crate) async fn drop_connections(
    State(app): State<Arc<App>>,
    caller: Caller,
    body: Bytes,
) -> Result<Json<Closed>, ApiError> {
    let chaos = layer(&app, &caller)?;
    let request: DropRequest = if body.iter().all(u8::is_ascii_whitespace) {
        DropRequest::default()
    } else {
        let text = std::str::from_utf8(&body)
            .map_err(|_| ApiError::invalid("input", "the body is not UTF-8"))?;
        decode(text)?
    };
    check_id("userId", request.user_id.as_deref())?;
    let target = match &request.user_id {
        Some(user) => Target::User {
            tenant: &caller.tenant,
            user,
        },
        None => Target::Tenant(&caller.tenant),
    };
    let closed = chaos.drop_connections(target);
    audit(
        &app,
        &caller,
        "chaos.drop_connections",
        serde_json::json!({"userId": request.user_id, "closed": closed}),
    )
    .await;
    Ok(Json(Closed {
        closed,
        tokens_expired_before: None,
    }))
}

/// `POST /api/admin/chaos/expire-tokens`.
pub(crate) async fn expire_tokens(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> Result<Json<Closed>, ApiError> {
    let chaos = layer(&app, &caller)?;
    let (closed, cutoff) = chaos.expire_tokens_at();
    audit(
        &app,
        &caller,
        "chaos.expire_tokens",
        serde_json::json!({"before": cutoff, "closed": closed}),
    )
    .await;
    Ok(Json(Closed {
        closed,
        tokens_expired_before: Some(cutoff),
    }))
}

/// The middleware (installed only with `CHAOS=1`): every request but the chaos
/// endpoints, the dashboard, `/health` and `/metrics` waits the added latency; then a seeded fraction
/// of `/api/*` requests fails before it is handled.
pub(crate) async fn middleware(
    State(app): State<Arc<App>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let exempt = path.starts_with(PATH)
        || path.starts_with("/dashboard")
        || path == "/health"
        || path == "/metrics";
    if let Some(chaos) = app.chaos.as_ref().filter(|_| !exempt) {
        let api = path.starts_with("/api/");
        chaos.wait().await;
        if api && let Some(error) = chaos.http_failure() {
            return error.into_response();
        }
    }
    next.run(request).await
}
