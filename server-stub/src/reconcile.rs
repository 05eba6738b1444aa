//! Reconciliation and snapshots (PROTOCOL.md §5): core's engine
//! ([`webwaka_realtime::reconcile::Reconciler`]) applied to entity state stored per
//! tenant. No second implementation lives here, only storage around the engine.
//!
//! Each entity is stored as core's `EntityState` (JSON) with its version. A request
//! loads the entities it touches, runs `apply_batch` (all or nothing), gives every
//! entity whose value changed the next value of the tenant's change counter, stores
//! them, and answers with the snapshots of what it touched and of what changed after
//! the client's `lastKnownVersion`. It runs on the writer thread, so requests of one
//! tenant are applied one after another.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};
use webwaka_realtime::protocol::reconciliation::parse_version;
use webwaka_realtime::protocol::{
    Operation, ReconciliationRequest, ReconciliationResponse, StateSnapshot, Timestamp, checksum,
};
use webwaka_realtime::reconcile::{ApplyError, EntityKey, EntityState};

use crate::app::App;
use crate::db::Writer;
use crate::error::{ApiError, JobError, StoreError};

/// The snapshot of an entity's state, taken at `now`.
pub(crate) fn snapshot(tenant: &str, state: &EntityState, now: Timestamp) -> StateSnapshot {
    let value = state.value();
    let data = if value.deleted {
        serde_json::Value::Null
    } else {
        value.data.clone()
    };
    StateSnapshot {
        snapshot_id: format!(
            "snap-{}-{}-{}",
            state.entity_type(),
            state.entity_id(),
            state.version()
        ),
        tenant_id: tenant.to_owned(),
        entity_type: state.entity_type().to_owned(),
        entity_id: state.entity_id().to_owned(),
        version: state.version().to_string(),
        vector_clock: state.clock().clone(),
        checksum: checksum(&data),
        data,
        deleted: value.deleted,
        created_at: now,
    }
}

/// One stored entity, if it exists and has ever changed.
pub(crate) fn load(
    conn: &Connection,
    tenant: &str,
    entity_type: &str,
    entity_id: &str,
) -> Result<Option<EntityState>, StoreError> {
    let state = conn
        .prepare_cached(
            "SELECT state FROM entities WHERE tenant = ?1 AND entity_type = ?2 AND entity_id = ?3",
        )?
        .query_row(params![tenant, entity_type, entity_id], |row| {
            row.get::<_, String>(0)
        })
        .optional()?;
    match state {
        None => Ok(None),
        Some(json) => Ok(Some(serde_json::from_str(&json)?)),
    }
}

/// Checks a request before it reaches the writer: sizes, fields, versions. Tenant ids
/// are checked by the handler (they are audited).
pub(crate) fn validate(
    app: &App,
    request: &ReconciliationRequest,
) -> Result<Option<u64>, ApiError> {
    if request.request_id.trim().is_empty() {
        return Err(ApiError::invalid("requestId", "must not be empty"));
    }
    if request.operations.len() > app.config.reconciliation_max_queue_size {
        return Err(ApiError::invalid(
            "operations",
            format!(
                "{} operations is more than RECONCILIATION_MAX_QUEUE_SIZE ({}): send smaller batches",
                request.operations.len(),
                app.config.reconciliation_max_queue_size
            ),
        ));
    }
    // Ids (lengths included) and every operation, named `operations[i].field`.
    request.validate()?;
    request
        .last_known_version
        .as_deref()
        .map(|v| parse_version("lastKnownVersion", v))
        .transpose()
        .map_err(ApiError::from)
}

fn apply_error(error: ApplyError, ops: &[Operation]) -> ApiError {
    let at = |id: &str| {
        ops.iter()
            .position(|op| op.operation_id == id)
            .map_or_else(|| "operations".to_owned(), |i| format!("operations[{i}]"))
    };
    match error {
        ApplyError::Invalid {
            operation_id,
            error,
        } => ApiError::invalid(
            format!("{}.{}", at(&operation_id), error.path),
            error.message,
        ),
        ApplyError::NoMergeFunction { entity_type } => ApiError::invalid(
            "strategy",
            format!(
                "CUSTOM_MERGE needs a merge function for entity type {entity_type:?}, and none is registered (RECONCILIATION_COUNTER_TYPES)"
            ),
        ),
        ApplyError::ClockReused {
            operation_id,
            other,
        } => ApiError::invalid(
            format!("{}.vectorClock", at(&operation_id)),
            format!("reuses the vector clock of operation {other:?}"),
        ),
        ApplyError::Merge(merge) => {
            ApiError::invalid(format!("{}.payload", at(&merge.operation_id)), merge.reason)
        }
        ApplyError::WrongEntity { .. } => {
            tracing::error!(%error, "the engine was handed the wrong entity");
            ApiError::internal()
        }
    }
}

/// Applies a checked request (on the writer) and builds the answer.
pub(crate) fn apply(
    w: &mut Writer<'_>,
    app: &Arc<App>,
    tenant: &str,
    request: ReconciliationRequest,
    last_known: Option<u64>,
) -> Result<ReconciliationResponse, JobError> {
    let now = chrono::Utc::now();
    let mut states: BTreeMap<EntityKey, EntityState> = BTreeMap::new();
    for op in &request.operations {
        let key = (op.entity_type.clone(), op.entity_id.clone());
        if states.contains_key(&key) {
            continue;
        }
        if let Some(state) = load(w.conn, tenant, &op.entity_type, &op.entity_id)? {
            states.insert(key, state);
        }
    }
    let outcome = app
        .reconciler
        .apply_batch(&mut states, &request.operations, request.strategy, now)
        .map_err(|e| JobError::Refused(apply_error(e, &request.operations)))?;
    let mut counter: u64 = w
        .conn
        .prepare_cached("SELECT counter FROM entity_counters WHERE tenant = ?1")?
        .query_row([tenant], |row| row.get::<_, i64>(0))
        .optional()?
        .map_or(0, |n| n as u64);
    let start_counter = counter;
    for key in &outcome.changed {
        if let Some(state) = states.get_mut(key) {
            counter += 1;
            state.set_version(counter);
        }
    }
    let mut upsert = w.conn.prepare_cached(
        "INSERT INTO entities (tenant, entity_type, entity_id, version, state)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (tenant, entity_type, entity_id)
         DO UPDATE SET version = excluded.version, state = excluded.state",
    )?;
    for key in &outcome.touched {
        if let Some(state) = states.get(key)
            && state.version() > 0
        {
            upsert.execute(params![
                tenant,
                key.0,
                key.1,
                state.version() as i64,
                serde_json::to_string(state)?
            ])?;
        }
    }
    drop(upsert);
    if counter != start_counter {
        w.conn
            .prepare_cached(
                "INSERT INTO entity_counters (tenant, counter) VALUES (?1, ?2)
                 ON CONFLICT (tenant) DO UPDATE SET counter = excluded.counter",
            )?
            .execute(params![tenant, counter as i64])?;
    }
    // The deltas: what the request touched, and what changed after lastKnownVersion
    // (every entity of the tenant when the client knows no version).
    let mut seen: BTreeSet<EntityKey> = BTreeSet::new();
    let mut deltas = Vec::new();
    for key in &outcome.touched {
        if let Some(state) = states.get(key)
            && state.version() > 0
            && seen.insert(key.clone())
        {
            deltas.push(snapshot(tenant, state, now));
        }
    }
    {
        let mut stmt = w.conn.prepare_cached(
            "SELECT entity_type, entity_id, state FROM entities
             WHERE tenant = ?1 AND version > ?2 ORDER BY version",
        )?;
        let after = last_known.map_or(0, |v| v.min(i64::MAX as u64) as i64);
        let rows = stmt.query_map(params![tenant, after], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
            ))
        })?;
        for row in rows {
            let (entity_type, entity_id, json) = row?;
            let key = (entity_type, entity_id);
            if seen.insert(key) {
                let state: EntityState = serde_json::from_str(&json)?;
                deltas.push(snapshot(tenant, &state, now));
            }
        }
    }
    deltas.sort_by(|a, b| {
        let va = a.version.parse::<u64>().unwrap_or(0);
        let vb = b.version.parse::<u64>().unwrap_or(0);
        va.cmp(&vb)
            .then_with(|| a.entity_type.cmp(&b.entity_type))
            .then_with(|| a.entity_id.cmp(&b.entity_id))
    });
    app.metrics.reconciliation_requests.inc();
    app.metrics
        .reconciliation_conflicts
        .inc_by(outcome.conflicts.len() as u64);
    Ok(ReconciliationResponse {
        request_id: request.request_id,
        conflicts: outcome.conflicts,
        resolved_operations: outcome.resolved_operations,
        current_version: counter.to_string(),
        delta_updates: deltas,
        completed_at: chrono::Utc::now(),
    })
}
