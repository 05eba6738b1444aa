//! `POST /api/reconciliation/reconcile` and
//! `GET /api/reconciliation/snapshot/{entityType}/{entityId}`. The logic is in
//! [`crate::reconcile`].

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use webwaka_realtime::protocol::{ReconciliationRequest, ReconciliationResponse, StateSnapshot};

use crate::app::App;
use crate::error::{ApiError, check_id};
use crate::http::extract::{Caller, JsonBody};

/// `POST /api/reconciliation/reconcile`.
pub(crate) async fn reconcile(
    State(app): State<Arc<App>>,
    caller: Caller,
    body: JsonBody<ReconciliationRequest>,
) -> Result<Json<ReconciliationResponse>, ApiError> {
    // Required by the contract (`[]` for a pure pull): a missing list is not an empty one.
    if body.raw.get("operations").is_none() {
        return Err(ApiError::invalid(
            "operations",
            "is required (send [] to only pull changes)",
        ));
    }
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
    let last_known =
        crate::reconcile::validate(app.config.reconciliation_max_queue_size, &request)?;
    app.limits
        .reconcile
        .check(&app.metrics, &caller.tenant, caller.user())?;
    let tenant = caller.tenant.clone();
    let store = Arc::clone(&app.store);
    let reconciler = Arc::clone(&app.reconciler);
    let metrics = Arc::clone(&app.metrics);
    // On a task of its own: applied once started, whether or not anyone waits.
    let work = tokio::spawn(async move {
        let response = store
            .reconcile(&tenant, request, last_known, reconciler)
            .await?;
        metrics.reconciliation_requests.inc();
        metrics
            .reconciliation_conflicts
            .inc_by(response.conflicts.len() as u64);
        Ok::<_, ApiError>(response)
    });
    let work = async move { work.await.map_err(|_| ApiError::internal())? };
    let timeout = Duration::from_millis(app.config.reconciliation_processing_timeout_ms);
    // Chaos: the work is done, but the answer is the timeout, when the timeout is up.
    if app.chaos.as_ref().is_some_and(|c| c.reconcile_times_out()) {
        let deadline = tokio::time::Instant::now() + timeout;
        let applied = work.await.is_ok();
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
    check_id("entityType", Some(&entity_type))?;
    check_id("entityId", Some(&entity_id))?;
    app.limits
        .poll
        .check(&app.metrics, &caller.tenant, caller.user())?;
    let state = app
        .store
        .entity(&caller.tenant, &entity_type, &entity_id)
        .await?;
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
