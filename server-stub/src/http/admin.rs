//! `GET /api/admin/audit` and `GET /api/admin/audit/verify` (roles `admin`,
//! `super_admin`). Reading the audit log is itself audited.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use webwaka_realtime::protocol::{AuditPage, AuditResult, AuditVerify};

use crate::app::App;
use crate::audit::AuditRecord;
use crate::auth::{ROLE_ADMIN, ROLE_SUPER_ADMIN};
use crate::error::ApiError;
use crate::http::extract::{Caller, QueryMap};

/// The audit record of a read by `caller`.
fn read_record(caller: &Caller, action: &str) -> AuditRecord {
    let mut record = AuditRecord::new(
        &caller.identity.tenant_id,
        caller.user(),
        action,
        "audit_log",
        AuditResult::Success,
    )
    .target(&caller.tenant);
    if caller.justification.is_some() {
        record = record.super_admin(caller.justification.as_deref());
    }
    record
}

/// `GET /api/admin/audit?limit=&before=`: newest first.
pub(crate) async fn page(
    State(app): State<Arc<App>>,
    caller: Caller,
    query: QueryMap,
) -> Result<Json<AuditPage>, ApiError> {
    caller.require_role(&[ROLE_ADMIN, ROLE_SUPER_ADMIN])?;
    let limit = query.int("limit", 1, 1000, 100)? as u32;
    let before = match query.get("before") {
        None | Some("") => None,
        Some(_) => Some(query.int("before", 1, i64::MAX as u64, 0)?),
    };
    let entries = app.store.audit_page(&caller.tenant, before, limit).await?;
    let mut record = read_record(&caller, "audit.read").meta("limit", limit);
    if let Some(before) = before {
        record = record.meta("before", before);
    }
    app.audit(record).await?;
    Ok(Json(AuditPage { entries }))
}

/// `GET /api/admin/audit/verify`: recomputes the whole chain.
pub(crate) async fn verify(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> Result<Json<AuditVerify>, ApiError> {
    caller.require_role(&[ROLE_ADMIN, ROLE_SUPER_ADMIN])?;
    let check = app.store.audit_verify().await?;
    if let Some((sequence, problem)) = &check.first_bad {
        tracing::error!(sequence, problem, "the audit chain does not verify");
    }
    app.audit(read_record(&caller, "audit.verify").meta("valid", check.valid))
        .await?;
    Ok(Json(AuditVerify {
        valid: check.valid,
        entries: check.entries,
    }))
}
