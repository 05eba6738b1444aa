//! Consumer-group endpoints (roles `service` or `admin`): claim, ack, the DLQ and its
//! replay. The logic is in [`crate::bus`].

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};

use webwaka_realtime::protocol::{
    AckRequest, AckResponse, ClaimRequest, ClaimResponse, DlqReplayed, DlqResponse,
};

use crate::app::App;
use crate::auth::{ROLE_ADMIN, ROLE_SERVICE};
use crate::error::{ApiError, check_id};
use crate::http::extract::{Caller, JsonBody, QueryMap};
use crate::store::Claim;
use crate::time::now_ms;

/// Longest lease a claim may ask for (1 day).
const MAX_VISIBILITY_MS: u64 = 86_400_000;

/// A group name from the path (`default` means `EVENT_BUS_CONSUMER_GROUP`).
fn group_name(app: &App, group: &str) -> Result<String, ApiError> {
    let group = group.trim();
    if group.is_empty() || group.len() > 200 {
        return Err(ApiError::invalid("group", "must be 1 to 200 characters"));
    }
    check_id("group", Some(group))?;
    if group == "default" {
        return Ok(app.config.event_bus_consumer_group.clone());
    }
    Ok(group.to_owned())
}

/// `POST /api/eventbus/groups/{group}/claim`.
pub(crate) async fn claim(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(group): Path<String>,
    body: JsonBody<ClaimRequest>,
) -> Result<Json<ClaimResponse>, ApiError> {
    caller
        .check_named(
            &app,
            body.tenant_field.as_deref(),
            "body.tenantId",
            "eventbus",
        )
        .await?;
    caller.require_role(&[ROLE_SERVICE, ROLE_ADMIN])?;
    let request = body.value;
    request.validate()?;
    if request.visibility_timeout_ms == 0 || request.visibility_timeout_ms > MAX_VISIBILITY_MS {
        return Err(ApiError::invalid(
            "visibilityTimeoutMs",
            format!("must be from 1 to {MAX_VISIBILITY_MS}"),
        ));
    }
    let event_types = request.event_types.filter(|types| !types.is_empty());
    let claim = Claim {
        tenant: caller.tenant.clone(),
        group: group_name(&app, &group)?,
        consumer_id: request.consumer_id,
        max: request.max.min(app.config.event_bus_batch_size),
        visibility_ms: i64::try_from(request.visibility_timeout_ms).unwrap_or(i64::MAX),
        event_types,
    };
    let max_retries = app.config.event_bus_max_retries;
    let events = app.store.claim(claim, now_ms(), max_retries).await?;
    app.metrics.delivered("claim", events.len() as u64);
    Ok(Json(ClaimResponse { events }))
}

/// `POST /api/eventbus/groups/{group}/ack`.
pub(crate) async fn ack(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(group): Path<String>,
    body: JsonBody<AckRequest>,
) -> Result<Json<AckResponse>, ApiError> {
    caller
        .check_named(
            &app,
            body.tenant_field.as_deref(),
            "body.tenantId",
            "eventbus",
        )
        .await?;
    caller.require_role(&[ROLE_SERVICE, ROLE_ADMIN])?;
    if body.value.event_ids.len() > 10_000 {
        return Err(ApiError::invalid("eventIds", "at most 10000 ids per ack"));
    }
    let group = group_name(&app, &group)?;
    let tenant = caller.tenant.clone();
    let ids = body.value.event_ids;
    let acked = app.store.ack(&tenant, &group, ids).await?;
    Ok(Json(AckResponse { acked }))
}

/// `GET /api/eventbus/dlq[?group=]`.
pub(crate) async fn dlq(
    State(app): State<Arc<App>>,
    caller: Caller,
    query: QueryMap,
) -> Result<Json<DlqResponse>, ApiError> {
    caller.require_role(&[ROLE_SERVICE, ROLE_ADMIN])?;
    let group = query
        .get("group")
        .map(|g| group_name(&app, g))
        .transpose()?;
    // Leases that ran out since the last claim or sweep count before listing.
    let max_retries = app.config.event_bus_max_retries;
    app.store.expire_leases(now_ms(), max_retries).await?;
    let entries = app.store.dlq(&caller.tenant, group.as_deref()).await?;
    Ok(Json(DlqResponse { entries }))
}

/// `POST /api/eventbus/dlq/{dlqId}/replay`.
pub(crate) async fn replay(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(dlq_id): Path<String>,
) -> Result<Json<DlqReplayed>, ApiError> {
    caller.require_role(&[ROLE_SERVICE, ROLE_ADMIN])?;
    check_id("dlqId", Some(&dlq_id))?;
    let tenant = caller.tenant.clone();
    let id = dlq_id.clone();
    let (group, event_id) = app.store.replay(&tenant, &id).await?;
    Ok(Json(DlqReplayed {
        dlq_id,
        event_id,
        consumer_group: group,
        replayed: true,
    }))
}
