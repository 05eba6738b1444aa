//! `POST /api/reconciliation/reconcile` and
//! `GET /api/reconciliation/snapshot/{entityType}/{entityId}`. The logic is in
//! [`crate::reconcile`].

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use webwaka_realtime::protocol::{ReconciliationRequest, ReconciliationResponse, StateSnapshot};

use crate::app::App;
use crate::error::ApiError;
use crate::http::extract::{Caller, JsonBody};

/// `POST /api/reconciliation/reconcile`.
pub(crate) async fn reconcile(
    State(app): State<Arc<App>>,
    caller: Caller,
    body: JsonBody<ReconciliationRequest>,
) -> Result<Json<ReconciliationResponse>, ApiError> {
    let request = body.value;
    caller
        .check_named(
            &app,
            Some(&request.tenant_id),
            "body.tenantId",
            "reconciliation",
        )
        .await?;
    for (i, op) in request.operations.iter().enumerate() {
        caller
            .check_named(
                &app,
                Some(&op.tenant_id),
                &format!("operations[{i}].tenantId"),
                "reconciliation",
            )
            .await?;
    }
    let last_known = crate::reconcile::validate(&app, &request)?;
    app.limits
        .reconcile
        .check(&app.metrics, &caller.tenant, caller.user())?;
    let tenant = caller.tenant.clone();
    let app2 = Arc::clone(&app);
    let work = app
        .db
        .write(move |w| crate::reconcile::apply(w, &app2, &tenant, request, last_known));
    let timeout = Duration::from_millis(app.config.reconciliation_processing_timeout_ms);
    // Chaos: the work is done, but the answer is the timeout, when the timeout is up.
    if app.chaos.as_ref().is_some_and(|c| c.reconcile_times_out()) {
        let deadline = tokio::time::Instant::now() + timeout;
        let applied = tokio::time::timeout(timeout, work).await.is_ok();
        tokio::time::sleep_until(deadline).await;
        tracing::warn!(applied, "chaos: reconciliation answered with a timeout");
        return Err(timeout_error().with_detail("chaos", "RECONCILE_TIMEOUT"));
    }
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => Ok(Json(result?)),
        Err(_) => {
            tracing::warn!("reconciliation timed out");
            Err(timeout_error())
        }
    }
}

/// What a client gets when reconciliation runs past its time.
fn timeout_error() -> ApiError {
    ApiError::internal().with_detail("reason", "RECONCILIATION_PROCESSING_TIMEOUT")
}

/// `GET /api/reconciliation/snapshot/{entityType}/{entityId}` (counts as polling).
pub(crate) async fn snapshot(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((entity_type, entity_id)): Path<(String, String)>,
) -> Result<Json<StateSnapshot>, ApiError> {
    app.limits
        .poll
        .check(&app.metrics, &caller.tenant, caller.user())?;
    let state = app
        .db
        .read(|conn| crate::reconcile::load(conn, &caller.tenant, &entity_type, &entity_id))?;
    match state {
        Some(state) if state.version() > 0 => Ok(Json(crate::reconcile::snapshot(
            &caller.tenant,
            &state,
            chrono::Utc::now(),
        ))),
        _ => Err(ApiError::not_found(format!(
            "no entity {entity_type}/{entity_id}"
        ))),
    }
}
