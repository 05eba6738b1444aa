//! The HTTP API (PROTOCOL.md §4): the router, a span per request, and the fallbacks
//! that keep even unknown paths in the protocol's error shape.

pub(crate) mod admin;
pub(crate) mod chaos;
pub(crate) mod eventbus;
pub(crate) mod events;
pub(crate) mod extract;
pub(crate) mod health;
pub(crate) mod reconcile;
pub(crate) mod transactions;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tracing::Instrument;

use crate::app::App;
use crate::error::ApiError;

/// Every route of the server, WebSocket and socket.io included; with socket.io's handle
/// (`None` when `SOCKETIO_PATH` turns it off), which closes its connections on
/// shutdown.
pub(crate) fn router(app: Arc<App>) -> (Router, Option<socketioxide::SocketIo>) {
    let ws_path = app.config.ws_path.clone();
    let body_limit = app.config.http_max_body_bytes;
    let router = Router::new()
        .route(&ws_path, get(crate::ws::handler))
        .route("/health", get(health::health))
        .route("/metrics", get(health::metrics))
        .route("/api/events/poll", get(events::poll))
        .route("/api/events", post(events::publish))
        .route("/api/messages", post(events::send_message))
        .route("/api/eventbus/groups/{group}/claim", post(eventbus::claim))
        .route("/api/eventbus/groups/{group}/ack", post(eventbus::ack))
        .route("/api/eventbus/dlq", get(eventbus::dlq))
        .route("/api/eventbus/dlq/{dlq_id}/replay", post(eventbus::replay))
        .route("/api/reconciliation/reconcile", post(reconcile::reconcile))
        .route(
            "/api/reconciliation/snapshot/{entity_type}/{entity_id}",
            get(reconcile::snapshot),
        )
        .route("/api/transactions", post(transactions::submit))
        .route(
            "/api/transactions/{transaction_id}",
            get(transactions::status),
        )
        .route("/api/admin/audit", get(admin::page))
        .route("/api/admin/audit/verify", get(admin::verify))
        .route(
            chaos::PATH,
            get(chaos::get).put(chaos::put).delete(chaos::delete),
        )
        .route(
            "/api/admin/chaos/drop-connections",
            post(chaos::drop_connections),
        )
        .route("/api/admin/chaos/expire-tokens", post(chaos::expire_tokens));
    let router = crate::dashboard::routes(router);
    let (router, socketio) = crate::socketio::mount(&app, router);
    let router = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit));
    // The chaos layer's latency and failures, only when it is enabled.
    let router = if app.chaos.is_some() {
        router.layer(middleware::from_fn_with_state(
            Arc::clone(&app),
            chaos::middleware,
        ))
    } else {
        router
    };
    let router = router
        .layer(middleware::from_fn_with_state(
            Arc::clone(&app),
            trace_request,
        ))
        .with_state(app);
    (router, socketio)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::invalid("method", "this endpoint does not take this method")
}

/// A span per request (method, path, a request number) and one line when it ends.
/// Errors are counted by code for the dashboard, while one is open.
async fn trace_request(
    axum::extract::State(app): axum::extract::State<Arc<App>>,
    request: Request,
    next: Next,
) -> Response {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!(
        "request",
        id,
        method = %request.method(),
        path = %request.uri().path(),
    );
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    if let Some(code) = response
        .extensions()
        .get::<webwaka_realtime::protocol::ErrorCode>()
    {
        app.error_answered(None, *code);
    }
    span.in_scope(|| {
        tracing::debug!(
            status = response.status().as_u16(),
            micros = started.elapsed().as_micros() as u64,
            "request done"
        );
    });
    response
}
