//! The entity cache: what the app reads while offline, and how offline edits become
//! outbox operations.
//!
//! Per entity (`entityType`, `entityId`) the cache keeps:
//!
//! - the **base**: the server's last known state (value, tombstone, version, clock), as a
//!   snapshot or delta delivered it;
//! - the **pending operations**: local edits the server has not reconciled yet, in the
//!   order they were made (each is also an outbox item of class C, same id);
//! - the **value**: the base with the pending operations applied on top (optimistic), and
//!   the clock the next local edit descends from;
//! - the **open conflicts** the server reported (MANUAL), until settled.
//!
//! A local edit is one transaction: read the entity, make the operation (its clock is
//! the entity's clock with this installation's entry incremented), apply it to the
//! value, record it as pending and enqueue it. A crash leaves either all of that or none.
//!
//! A new base (snapshot or delta) replaces the old one when it is not older (by
//! version); pending operations that the base's clock already covers are dropped (the
//! server has them: applied, discarded by its strategy, or held in a conflict), and the
//! rest are re-applied on top, in order. The server's answer decides; the local value is
//! only a forecast of it.

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use super::outbox::{self, ItemKind, NewItem, OutboxClass, OutboxItem};
use super::{Store, StoreError, from_ms, to_ms};
use crate::VectorClock;
use crate::protocol::reconciliation::parse_version;
use crate::protocol::{
    Conflict, JsonObject, Operation, OperationType, ReconciliationResponse, StateSnapshot,
    Timestamp,
};
use crate::reconcile::{CustomMerge, EntityValue, MergeInput};

/// The outbox lane of an entity's operations: one lane per entity keeps its edits in
/// order while other entities' edits go ahead.
pub fn entity_lane(entity_type: &str, entity_id: &str) -> String {
    format!("entity:{entity_type}/{entity_id}")
}

/// The cache's key/value entry holding the tenant entity counter last pulled
/// (`lastKnownVersion` of the next pull).
const SYNC_VERSION_KEY: &str = "entity.sync_version";

/// A local edit the app makes: create, update (a JSON merge patch) or delete.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalEdit {
    /// The tenant (from the session's token).
    pub tenant_id: String,
    /// The entity's type.
    pub entity_type: String,
    /// The entity's id.
    pub entity_id: String,
    /// What kind of change.
    pub operation_type: OperationType,
    /// CREATE: the whole value (an object); UPDATE: a merge patch (an object); DELETE:
    /// ignored.
    pub payload: Value,
    /// Optional metadata carried with the operation.
    pub metadata: Option<JsonObject>,
}

/// One cached entity.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedEntity {
    /// The entity's type.
    pub entity_type: String,
    /// The entity's id.
    pub entity_id: String,
    /// The value the app sees: the base with pending operations applied.
    pub value: EntityValue,
    /// The clock the next local edit descends from.
    pub clock: VectorClock,
    /// The server's last known state.
    pub base: EntityValue,
    /// The server's version of the base (0: never seen from the server).
    pub base_version: u64,
    /// The base's clock.
    pub base_clock: VectorClock,
    /// Local operations not yet reconciled, oldest first.
    pub pending: Vec<Operation>,
    /// Open conflicts the server reported, oldest first.
    pub conflicts: Vec<Conflict>,
    /// When the cache entry last changed.
    pub updated_at: Timestamp,
}

impl CachedEntity {
    fn empty(entity_type: &str, entity_id: &str, now: Timestamp) -> Self {
        Self {
            entity_type: entity_type.into(),
            entity_id: entity_id.into(),
            value: EntityValue::default(),
            clock: VectorClock::new(),
            base: EntityValue::default(),
            base_version: 0,
            base_clock: VectorClock::new(),
            pending: Vec::new(),
            conflicts: Vec::new(),
            updated_at: now,
        }
    }

    /// Recomputes the value and clock from the base and the pending operations, each
    /// applied as the server would (the type's merge function, else a plain patch). A
    /// pending operation the merge function refuses shows no effect.
    fn replay(&mut self, merges: &Merges) {
        let mut value = self.base.clone();
        let mut clock = self.base_clock.clone();
        for op in &self.pending {
            if let Ok(next) = forecast(merges, &value, op) {
                value = next;
            }
            clock.merge(&op.vector_clock);
        }
        self.value = value;
        self.clock = clock;
    }
}

/// Merge functions per entity type ([`super::StoreConfig::merges`]).
type Merges = std::collections::BTreeMap<String, std::sync::Arc<dyn CustomMerge>>;

/// `op` applied to `value` as the server would apply it in order.
fn forecast(merges: &Merges, value: &EntityValue, op: &Operation) -> Result<EntityValue, String> {
    match merges.get(&op.entity_type) {
        Some(merge) => merge
            .apply(MergeInput {
                current: value,
                operation: op,
                concurrent: false,
            })
            .map_err(|e| e.reason),
        None => Ok(value.apply_plain(op)),
    }
}

/// What applying a reconciliation response changed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SyncOutcome {
    /// The entities the response's snapshots updated, as they are now.
    pub entities: Vec<CachedEntity>,
    /// Snapshots refused because their checksum did not match their data.
    pub bad_checksums: Vec<String>,
}

fn json_err(field: &'static str) -> impl Fn(serde_json::Error) -> StoreError {
    move |e| StoreError::Invalid {
        field,
        message: e.to_string(),
    }
}

fn load(
    conn: &Connection,
    entity_type: &str,
    entity_id: &str,
) -> Result<Option<CachedEntity>, StoreError> {
    type Raw = (String, bool, i64, String, String, bool, String, i64);
    let raw: Option<Raw> = conn
        .prepare_cached(
            "SELECT base_data, base_deleted, base_version, base_clock, data, deleted, clock,
                    updated_ms
               FROM entities WHERE entity_type = ?1 AND entity_id = ?2",
        )?
        .query_row(params![entity_type, entity_id], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        })
        .optional()?;
    let Some((base_data, base_deleted, base_version, base_clock, data, deleted, clock, updated)) =
        raw
    else {
        return Ok(None);
    };
    let pending = {
        let mut stmt = conn.prepare_cached(
            "SELECT body FROM entity_pending WHERE entity_type = ?1 AND entity_id = ?2
              ORDER BY seq",
        )?;
        let bodies = stmt
            .query_map(params![entity_type, entity_id], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        bodies
            .iter()
            .map(|b| serde_json::from_str(b).map_err(json_err("entity_pending.body")))
            .collect::<Result<Vec<Operation>, _>>()?
    };
    let conflicts = load_conflicts(conn, Some((entity_type, entity_id)))?;
    Ok(Some(CachedEntity {
        entity_type: entity_type.into(),
        entity_id: entity_id.into(),
        value: EntityValue {
            data: serde_json::from_str(&data).map_err(json_err("entities.data"))?,
            deleted,
        },
        clock: serde_json::from_str(&clock).map_err(json_err("entities.clock"))?,
        base: EntityValue {
            data: serde_json::from_str(&base_data).map_err(json_err("entities.base_data"))?,
            deleted: base_deleted,
        },
        base_version: u64::try_from(base_version).unwrap_or(0),
        base_clock: serde_json::from_str(&base_clock).map_err(json_err("entities.base_clock"))?,
        pending,
        conflicts,
        updated_at: from_ms(updated),
    }))
}

fn load_conflicts(
    conn: &Connection,
    entity: Option<(&str, &str)>,
) -> Result<Vec<Conflict>, StoreError> {
    let bodies: Vec<String> = match entity {
        Some((t, i)) => conn
            .prepare_cached(
                "SELECT body FROM entity_conflicts WHERE entity_type = ?1 AND entity_id = ?2
                  ORDER BY detected_ms, conflict_id",
            )?
            .query_map(params![t, i], |r| r.get(0))?
            .collect::<Result<_, _>>()?,
        None => conn
            .prepare_cached("SELECT body FROM entity_conflicts ORDER BY detected_ms, conflict_id")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?,
    };
    bodies
        .iter()
        .map(|b| serde_json::from_str(b).map_err(json_err("entity_conflicts.body")))
        .collect()
}

/// Writes the entity's row (not its pending operations or conflicts).
fn save(conn: &Connection, e: &CachedEntity) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO entities (entity_type, entity_id, base_data, base_deleted, base_version,
                               base_clock, data, deleted, clock, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (entity_type, entity_id) DO UPDATE SET
            base_data = excluded.base_data, base_deleted = excluded.base_deleted,
            base_version = excluded.base_version, base_clock = excluded.base_clock,
            data = excluded.data, deleted = excluded.deleted, clock = excluded.clock,
            updated_ms = excluded.updated_ms",
    )?
    .execute(params![
        e.entity_type,
        e.entity_id,
        to_json(&e.base.data)?,
        e.base.deleted,
        i64::try_from(e.base_version).unwrap_or(i64::MAX),
        to_json(&e.base_clock)?,
        to_json(&e.value.data)?,
        e.value.deleted,
        to_json(&e.clock)?,
        to_ms(e.updated_at),
    ])?;
    Ok(())
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(json_err("entity"))
}

/// Applies one server snapshot to the cache on `conn`: replaces the base unless the
/// snapshot is older, drops the pending operations it covers, replays the rest.
/// Returns the entity as now cached, or `None` when the snapshot was older than the cache.
fn apply_snapshot_on(
    conn: &Connection,
    snapshot: &StateSnapshot,
    merges: &Merges,
    now: Timestamp,
) -> Result<Option<CachedEntity>, StoreError> {
    let version = parse_version("version", &snapshot.version).map_err(|e| StoreError::Invalid {
        field: "version",
        message: e.to_string(),
    })?;
    let mut entity = load(conn, &snapshot.entity_type, &snapshot.entity_id)?
        .unwrap_or_else(|| CachedEntity::empty(&snapshot.entity_type, &snapshot.entity_id, now));
    if version < entity.base_version {
        // A stale snapshot (an older pull overtaken by a newer one): keep what we have.
        return Ok(None);
    }
    entity.base = EntityValue {
        data: if snapshot.deleted {
            Value::Null
        } else {
            snapshot.data.clone()
        },
        deleted: snapshot.deleted,
    };
    entity.base_version = version;
    entity.base_clock = snapshot.vector_clock.clone();
    // Pending operations the server's clock covers are part of the base now.
    let (covered, kept): (Vec<Operation>, Vec<Operation>) = std::mem::take(&mut entity.pending)
        .into_iter()
        .partition(|op| snapshot.vector_clock.descends_from(&op.vector_clock));
    entity.pending = kept;
    {
        let mut delete =
            conn.prepare_cached("DELETE FROM entity_pending WHERE operation_id = ?1")?;
        for op in &covered {
            delete.execute([&op.operation_id])?;
        }
    }
    entity.replay(merges);
    entity.updated_at = now;
    save(conn, &entity)?;
    Ok(Some(entity))
}

impl Store {
    /// Makes a local edit, all in one transaction: the operation (a fresh UUIDv7 id; its
    /// clock descends from the entity's, with this installation's entry incremented) is
    /// applied to the cached value, recorded as pending and enqueued in the outbox
    /// (class C, the entity's lane, the same id).
    ///
    /// Refused, with nothing changed, when the payload has the wrong shape (named in
    /// the error) or the outbox is full.
    pub fn local_edit(
        &mut self,
        edit: LocalEdit,
        now: Timestamp,
    ) -> Result<(Operation, OutboxItem, CachedEntity), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut entity = load(&tx, &edit.entity_type, &edit.entity_id)?
            .unwrap_or_else(|| CachedEntity::empty(&edit.entity_type, &edit.entity_id, now));
        let mut clock = entity.clock.clone();
        clock.increment(&self.client_id);
        let op = Operation {
            operation_id: uuid::Uuid::now_v7().to_string(),
            client_id: self.client_id.clone(),
            tenant_id: edit.tenant_id,
            entity_type: edit.entity_type,
            entity_id: edit.entity_id,
            operation_type: edit.operation_type,
            payload: match edit.operation_type {
                OperationType::Delete => Value::Null,
                _ => edit.payload,
            },
            timestamp: now,
            vector_clock: clock,
            metadata: edit.metadata,
        };
        op.validate().map_err(|e| StoreError::Invalid {
            field: "operation",
            message: e.to_string(),
        })?;
        // The merge function of the type (a counter) must accept it, as the server will.
        forecast(&self.config.merges, &entity.value, &op).map_err(|reason| {
            StoreError::Invalid {
                field: "operation",
                message: reason,
            }
        })?;
        let body = serde_json::to_value(&op).map_err(json_err("operation"))?;
        let item = NewItem {
            id: op.operation_id.clone(),
            class: OutboxClass::C,
            kind: ItemKind::Operation,
            lane: entity_lane(&op.entity_type, &op.entity_id),
            body,
        };
        entity.pending.push(op.clone());
        entity.replay(&self.config.merges);
        entity.updated_at = now;
        save(&tx, &entity)?;
        tx.prepare_cached(
            "INSERT INTO entity_pending (operation_id, entity_type, entity_id, body)
             VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![
            op.operation_id,
            op.entity_type,
            op.entity_id,
            serde_json::to_string(&op).map_err(json_err("operation"))?
        ])?;
        let mut stored = outbox::insert_items(&tx, vec![item], now, &self.config)?;
        tx.commit()?;
        let item = stored.pop().ok_or(StoreError::Invalid {
            field: "enqueue",
            message: "no item was stored".into(),
        })?;
        Ok((op, item, entity))
    }

    /// The cached entity, if any edit or server state has touched it.
    pub fn entity(
        &self,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<CachedEntity>, StoreError> {
        load(&self.conn, entity_type, entity_id)
    }

    /// The ids of the cached entities of `entity_type`, in id order.
    pub fn entity_ids(&self, entity_type: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT entity_id FROM entities WHERE entity_type = ?1 ORDER BY entity_id",
            )?
            .query_map([entity_type], |r| r.get(0))?
            .collect::<Result<_, _>>()?)
    }

    /// Every open conflict, oldest first.
    pub fn open_conflicts(&self) -> Result<Vec<Conflict>, StoreError> {
        load_conflicts(&self.conn, None)
    }

    /// Forgets an open conflict (the app settled it, e.g. by writing a dominating edit).
    /// Returns false when it was not open.
    pub fn clear_conflict(&self, conflict_id: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM entity_conflicts WHERE conflict_id = ?1",
            [conflict_id],
        )? > 0)
    }

    /// Applies one server snapshot (see the module docs). Returns the entity as now
    /// cached, or `None` when the snapshot was older than the cache. A snapshot whose
    /// checksum does not match its data is refused.
    pub fn apply_snapshot(
        &mut self,
        snapshot: &StateSnapshot,
        now: Timestamp,
    ) -> Result<Option<CachedEntity>, StoreError> {
        if !snapshot.checksum_is_valid() {
            return Err(StoreError::Invalid {
                field: "checksum",
                message: format!(
                    "snapshot of {}/{} does not match its data",
                    snapshot.entity_type, snapshot.entity_id
                ),
            });
        }
        let tx = self.conn.transaction()?;
        let out = apply_snapshot_on(&tx, snapshot, &self.config.merges, now)?;
        tx.commit()?;
        Ok(out)
    }

    /// Applies a reconciliation response in one transaction: every delta snapshot (a bad
    /// checksum skips that snapshot and is reported), the open conflicts (kept until
    /// settled; a resolved conflict closes an open one with the same id), the sent
    /// operations the server settled are marked accepted in the outbox, and the tenant
    /// version becomes the next pull's `lastKnownVersion`, but only when every snapshot
    /// was stored: past a refused one, the next pull would never bring that entity
    /// again (until it changed), so the version stays and the next pull asks again.
    pub fn apply_reconcile_response(
        &mut self,
        response: &ReconciliationResponse,
        now: Timestamp,
    ) -> Result<SyncOutcome, StoreError> {
        let tx = self.conn.transaction()?;
        let mut out = SyncOutcome::default();
        for snapshot in &response.delta_updates {
            if !snapshot.checksum_is_valid() {
                out.bad_checksums
                    .push(format!("{}/{}", snapshot.entity_type, snapshot.entity_id));
                continue;
            }
            if let Some(entity) = apply_snapshot_on(&tx, snapshot, &self.config.merges, now)? {
                out.entities.push(entity);
            }
        }
        for conflict in &response.conflicts {
            if conflict.resolution.is_some() {
                tx.execute(
                    "DELETE FROM entity_conflicts WHERE conflict_id = ?1",
                    [&conflict.conflict_id],
                )?;
            } else {
                tx.execute(
                    "INSERT INTO entity_conflicts (conflict_id, entity_type, entity_id, body,
                                                   detected_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (conflict_id) DO UPDATE SET body = excluded.body",
                    params![
                        conflict.conflict_id,
                        conflict.entity_type,
                        conflict.entity_id,
                        serde_json::to_string(conflict).map_err(json_err("conflict"))?,
                        to_ms(conflict.detected_at)
                    ],
                )?;
            }
        }
        // The operations the server settled (applied, discarded or duplicate) and those
        // an open conflict holds are all accepted: the server has them.
        let held = response
            .conflicts
            .iter()
            .filter_map(|c| c.operations.first());
        let settled = response.resolved_operations.iter().map(|op| &**op);
        for op in settled.chain(held) {
            outbox::accept_if_pending(&tx, &op.operation_id, &response.current_version, now)?;
        }
        if out.bad_checksums.is_empty() {
            set_sync_version(&tx, &response.current_version)?;
        }
        tx.commit()?;
        Ok(out)
    }

    /// The tenant entity counter last pulled: the next pull's `lastKnownVersion`.
    pub fn entity_sync_version(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [SYNC_VERSION_KEY],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Forgets the sync version, so that the next pull fetches every entity (after the
    /// server said the client's version is unknown, or to rebuild the cache).
    pub fn reset_entity_sync_version(&self) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM meta WHERE key = ?1", [SYNC_VERSION_KEY])?;
        Ok(())
    }

    /// Drops a pending operation whose outbox item was discarded, and replays the
    /// entity's value without it. Called by [`Store::discard`].
    pub(crate) fn drop_pending_on(
        conn: &Connection,
        operation_id: &str,
        merges: &Merges,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let owner: Option<(String, String)> = conn
            .query_row(
                "SELECT entity_type, entity_id FROM entity_pending WHERE operation_id = ?1",
                [operation_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((entity_type, entity_id)) = owner else {
            return Ok(());
        };
        conn.execute(
            "DELETE FROM entity_pending WHERE operation_id = ?1",
            [operation_id],
        )?;
        if let Some(mut entity) = load(conn, &entity_type, &entity_id)? {
            entity.replay(merges);
            entity.updated_at = now;
            save(conn, &entity)?;
        }
        Ok(())
    }
}

/// Only moves forward: a stale response cannot rewind the pull cursor.
fn set_sync_version(conn: &Connection, version: &str) -> Result<(), StoreError> {
    let new = parse_version("currentVersion", version).map_err(|e| StoreError::Invalid {
        field: "currentVersion",
        message: e.to_string(),
    })?;
    let old: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [SYNC_VERSION_KEY],
            |r| r.get(0),
        )
        .optional()?;
    if old
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|old| old >= new)
    {
        return Ok(());
    }
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![SYNC_VERSION_KEY, new.to_string()],
    )?;
    Ok(())
}
