//! Entities and reconciliation in SQLite: core's `EntityState` as JSON per entity and a
//! change counter per tenant. The engine runs off the writer ([`crate::reconcile`]):
//! here are the reads, and the commit on the writer thread, which stores a prepared
//! request only if what it read is unchanged and gives out versions in commit order.

use rusqlite::{Connection, OptionalExtension, params};
use webwaka_realtime::protocol::{ReconciliationRequest, ReconciliationResponse};
use webwaka_realtime::reconcile::{EntityKey, EntityState, Reconciler};

use super::db::Writer;
use crate::error::{JobError, StoreError};
use crate::reconcile::{PrepareError, Prepared, Read, prepare};

/// One stored entity, if it exists.
pub(super) fn load(
    conn: &Connection,
    tenant: &str,
    entity_type: &str,
    entity_id: &str,
) -> Result<Option<EntityState>, StoreError> {
    match load_json(conn, tenant, entity_type, entity_id)? {
        None => Ok(None),
        Some(json) => Ok(Some(serde_json::from_str(&json)?)),
    }
}

fn load_json(
    conn: &Connection,
    tenant: &str,
    entity_type: &str,
    entity_id: &str,
) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached(
        "SELECT state FROM entities WHERE tenant = ?1 AND entity_type = ?2 AND entity_id = ?3",
    )?
    .query_row(params![tenant, entity_type, entity_id], |row| row.get(0))
    .optional()
}

/// The stored JSON of `keys`.
pub(super) fn read<'a>(
    conn: &Connection,
    tenant: &str,
    keys: impl IntoIterator<Item = &'a EntityKey>,
) -> Result<Read, StoreError> {
    let mut read = Read::new();
    for key in keys {
        read.insert(key.clone(), load_json(conn, tenant, &key.0, &key.1)?);
    }
    Ok(read)
}

/// Stores `prepared` if the entities it read are unchanged, and answers; `None`:
/// something changed since, prepare it again.
pub(super) fn commit(
    w: &mut Writer<'_>,
    tenant: &str,
    prepared: Prepared,
    request_id: String,
    last_known: Option<u64>,
) -> Result<Option<ReconciliationResponse>, JobError> {
    let now = read(w.conn, tenant, prepared.keys())?;
    if !prepared.is_current(&now) {
        return Ok(None);
    }
    let counter: u64 = w
        .conn
        .prepare_cached("SELECT counter FROM entity_counters WHERE tenant = ?1")?
        .query_row([tenant], |row| row.get::<_, i64>(0))
        .optional()?
        .map_or(0, |n| n as u64);
    let committed = prepared.commit(counter);
    let mut upsert = w.conn.prepare_cached(
        "INSERT INTO entities (tenant, entity_type, entity_id, version, state, current)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (tenant, entity_type, entity_id)
         DO UPDATE SET version = excluded.version, state = excluded.state,
                       current = excluded.current",
    )?;
    for (key, state) in committed.to_store() {
        upsert.execute(params![
            tenant,
            key.0,
            key.1,
            state.version() as i64,
            serde_json::to_string(state)?,
            crate::reconcile::current_json(state)?
        ])?;
    }
    drop(upsert);
    if committed.applied.counter != counter {
        w.conn
            .prepare_cached(
                "INSERT INTO entity_counters (tenant, counter) VALUES (?1, ?2)
                 ON CONFLICT (tenant) DO UPDATE SET counter = excluded.counter",
            )?
            .execute(params![tenant, committed.applied.counter as i64])?;
    }
    // What changed after lastKnownVersion (every entity of the tenant when the client
    // knows no version).
    let mut later = Vec::new();
    {
        let mut stmt = w.conn.prepare_cached(
            "SELECT coalesce(current, state) FROM entities
             WHERE tenant = ?1 AND version > ?2 ORDER BY version",
        )?;
        let after = last_known.map_or(0, |v| v.min(i64::MAX as u64) as i64);
        let rows = stmt.query_map(params![tenant, after], |row| row.get::<_, String>(0))?;
        for row in rows {
            later.push(serde_json::from_str(&row?)?);
        }
    }
    Ok(Some(committed.respond(tenant, request_id, later)))
}

/// Reads, prepares and commits a request all on the writer (for an entity so hot that
/// preparing it beside the writer kept losing the race).
pub(super) fn reconcile_locked(
    w: &mut Writer<'_>,
    reconciler: &Reconciler,
    tenant: &str,
    request: ReconciliationRequest,
    last_known: Option<u64>,
) -> Result<ReconciliationResponse, JobError> {
    let read = read(w.conn, tenant, &crate::reconcile::touched(&request))?;
    let prepared =
        prepare(reconciler, read, &request, chrono::Utc::now()).map_err(prepare_error)?;
    commit(w, tenant, prepared, request.request_id, last_known)?
        .ok_or_else(|| StoreError::Corrupt("entities changed under the writer".into()).into())
}

/// A preparation's failure as a job's.
pub(super) fn prepare_error(error: PrepareError) -> JobError {
    match error {
        PrepareError::Refused(refusal) => JobError::Refused(refusal),
        PrepareError::Stored(error) => JobError::Store(StoreError::Json(error)),
    }
}
