//! Reconciliation and snapshots (PROTOCOL.md §5): core's engine
//! ([`webwaka_realtime::reconcile::Reconciler`]) applied to entity state stored per
//! tenant. No second implementation lives here, only storage around the engine.
//!
//! Each entity is stored as core's `EntityState` (JSON) with its version. A request
//! loads the entities it touches, runs `apply_batch` (all or nothing), gives every
//! entity whose value changed the next value of the tenant's change counter, stores
//! them, and answers with the snapshots of what it touched and of what changed after
//! the client's `lastKnownVersion`.
//!
//! **Both cores.** The engine's work runs off the storage's lock, so that requests for
//! different entities are applied in parallel: a request reads the entities it touches,
//! is [`prepare`]d on them (core's engine, on a blocking thread), and is then committed
//! under the tenant's lock (SQLite's one writer; a PostgreSQL row lock on the tenant's
//! counter) only if every entity it read is still exactly as read ([`Prepared::
//! is_current`]); otherwise it is prepared again on what is there now. After a few such
//! rounds (a hot entity) it is prepared under the lock itself. Either way the result is
//! that of applying the requests one after another in commit order, and versions are
//! given out at the commit, in commit order. [`Prepared`] and [`respond`] are what both
//! engines share.

use std::collections::{BTreeMap, BTreeSet};

use webwaka_realtime::clock::VectorClock;
use webwaka_realtime::protocol::reconciliation::parse_version;
use webwaka_realtime::protocol::{
    Operation, ReconciliationRequest, ReconciliationResponse, StateSnapshot, Timestamp, checksum,
};
use webwaka_realtime::reconcile::{
    ApplyError, BatchOutcome, EntityKey, EntityState, EntityValue, Reconciler,
};

use crate::error::ApiError;

/// The snapshot of an entity's state, taken at `now`.
pub(crate) fn snapshot(tenant: &str, state: &EntityState, now: Timestamp) -> StateSnapshot {
    snapshot_of(
        tenant,
        state.entity_type(),
        state.entity_id(),
        state.value(),
        state.version(),
        state.clock(),
        now,
    )
}

fn snapshot_of(
    tenant: &str,
    entity_type: &str,
    entity_id: &str,
    value: &EntityValue,
    version: u64,
    clock: &VectorClock,
    now: Timestamp,
) -> StateSnapshot {
    let data = if value.deleted {
        serde_json::Value::Null
    } else {
        value.data.clone()
    };
    StateSnapshot {
        snapshot_id: format!("snap-{entity_type}-{entity_id}-{version}"),
        tenant_id: tenant.to_owned(),
        entity_type: entity_type.to_owned(),
        entity_id: entity_id.to_owned(),
        version: version.to_string(),
        vector_clock: clock.clone(),
        checksum: checksum(&data),
        data,
        deleted: value.deleted,
        created_at: now,
    }
}

/// What an answer needs of a stored entity that changed after the client's
/// `lastKnownVersion`: read from the stored `EntityState` JSON, whose retained history
/// (most of its bytes) is skipped, not decoded. An answer can list every entity of the
/// tenant; decoding their whole states made each request cost milliseconds under load.
/// Stored beside the state (column `current`, the same fields first in the state's
/// JSON), so that this read skips the state altogether.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Current {
    entity_type: String,
    entity_id: String,
    value: EntityValue,
    version: u64,
    clock: VectorClock,
}

/// The [`Current`] JSON of `state`, stored with it.
pub(crate) fn current_json(state: &EntityState) -> Result<String, serde_json::Error> {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct CurrentRef<'a> {
        entity_type: &'a str,
        entity_id: &'a str,
        value: &'a EntityValue,
        version: u64,
        clock: &'a VectorClock,
    }
    serde_json::to_string(&CurrentRef {
        entity_type: state.entity_type(),
        entity_id: state.entity_id(),
        value: state.value(),
        version: state.version(),
        clock: state.clock(),
    })
}

/// Checks a request before it reaches the writer: sizes, fields, versions. Tenant ids
/// are checked by the handler (they are audited).
pub(crate) fn validate(
    max_operations: usize,
    request: &ReconciliationRequest,
) -> Result<Option<u64>, ApiError> {
    if request.request_id.trim().is_empty() {
        return Err(ApiError::invalid("requestId", "must not be empty"));
    }
    if request.operations.len() > max_operations {
        return Err(ApiError::invalid(
            "operations",
            format!(
                "{} operations is more than RECONCILIATION_MAX_QUEUE_SIZE ({}): send smaller batches",
                request.operations.len(),
                max_operations
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

fn apply_error(error: ApplyError, ops: &[std::sync::Arc<Operation>]) -> ApiError {
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

/// The stored JSON of the entities a request touches, as read (`None`: not stored).
pub(crate) type Read = BTreeMap<EntityKey, Option<String>>;

/// The entities `request` touches.
pub(crate) fn touched(request: &ReconciliationRequest) -> Vec<EntityKey> {
    let keys: BTreeSet<EntityKey> = request
        .operations
        .iter()
        .map(|op| (op.entity_type.clone(), op.entity_id.clone()))
        .collect();
    keys.into_iter().collect()
}

/// What applying a request did: the engine's outcome and the tenant's counter after.
pub(crate) struct Applied {
    pub(crate) outcome: BatchOutcome,
    pub(crate) counter: u64,
}

/// A request applied by the engine to the entities as [`Read`], before versions are
/// given out.
pub(crate) struct Prepared {
    read: Read,
    states: BTreeMap<EntityKey, EntityState>,
    outcome: BatchOutcome,
    now: Timestamp,
}

/// Why a request could not be prepared.
pub(crate) enum PrepareError {
    /// The request is refused (nothing is stored).
    Refused(ApiError),
    /// A stored entity does not decode.
    Stored(serde_json::Error),
}

/// Applies `request` to the entities as `read` (all or nothing): the engine's work,
/// which needs no lock.
pub(crate) fn prepare(
    reconciler: &Reconciler,
    read: Read,
    request: &ReconciliationRequest,
    now: Timestamp,
) -> Result<Prepared, PrepareError> {
    let mut states = BTreeMap::new();
    for (key, json) in &read {
        if let Some(json) = json {
            let state: EntityState = serde_json::from_str(json).map_err(PrepareError::Stored)?;
            states.insert(key.clone(), state);
        }
    }
    let outcome = reconciler
        .apply_batch(&mut states, &request.operations, request.strategy, now)
        .map_err(|e| PrepareError::Refused(apply_error(e, &request.operations)))?;
    Ok(Prepared {
        read,
        states,
        outcome,
        now,
    })
}

impl Prepared {
    /// The entities it read.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &EntityKey> {
        self.read.keys()
    }

    /// True when the entities, read again under the lock, are as this was prepared on.
    pub(crate) fn is_current(&self, now: &Read) -> bool {
        self.read == *now
    }

    /// Gives every entity whose value changed the next value of the tenant's
    /// `counter` (under the lock); the entities to store are [`Committed::to_store`].
    pub(crate) fn commit(self, counter: u64) -> Committed {
        let Prepared {
            mut states,
            outcome,
            now,
            ..
        } = self;
        let mut next = counter;
        for key in &outcome.changed {
            if let Some(state) = states.get_mut(key) {
                next += 1;
                state.set_version(next);
            }
        }
        Committed {
            applied: Applied {
                outcome,
                counter: next,
            },
            states,
            now,
        }
    }
}

/// A prepared request with its versions, ready to store.
pub(crate) struct Committed {
    pub(crate) applied: Applied,
    pub(crate) states: BTreeMap<EntityKey, EntityState>,
    pub(crate) now: Timestamp,
}

impl Committed {
    /// Every touched entity that has a version, to store.
    pub(crate) fn to_store(&self) -> impl Iterator<Item = (&EntityKey, &EntityState)> {
        to_store(&self.applied, &self.states)
    }

    /// The answer, with `later`: what changed after the client's version, read after
    /// the request was stored.
    pub(crate) fn respond(
        self,
        tenant: &str,
        request_id: String,
        later: Vec<Current>,
    ) -> ReconciliationResponse {
        respond(
            tenant,
            request_id,
            self.applied,
            &self.states,
            later,
            self.now,
        )
    }
}

/// The entities to store: every touched one that has a version.
fn to_store<'a>(
    applied: &'a Applied,
    states: &'a BTreeMap<EntityKey, EntityState>,
) -> impl Iterator<Item = (&'a EntityKey, &'a EntityState)> {
    applied
        .outcome
        .touched
        .iter()
        .filter_map(|key| Some((key, states.get(key)?)))
        .filter(|(_, state)| state.version() > 0)
}

/// The answer: the snapshots of what the request touched and of what changed after
/// the client's `lastKnownVersion` (`later`, read after the request was stored), by
/// version.
fn respond(
    tenant: &str,
    request_id: String,
    applied: Applied,
    states: &BTreeMap<EntityKey, EntityState>,
    later: Vec<Current>,
    now: Timestamp,
) -> ReconciliationResponse {
    let mut seen: BTreeSet<EntityKey> = BTreeSet::new();
    let mut deltas = Vec::new();
    for (key, state) in to_store(&applied, states) {
        if seen.insert(key.clone()) {
            deltas.push(snapshot(tenant, state, now));
        }
    }
    for c in later {
        if !seen.contains(&(c.entity_type.clone(), c.entity_id.clone())) {
            deltas.push(snapshot_of(
                tenant,
                &c.entity_type,
                &c.entity_id,
                &c.value,
                c.version,
                &c.clock,
                now,
            ));
            seen.insert((c.entity_type, c.entity_id));
        }
    }
    deltas.sort_by(|a, b| {
        let va = a.version.parse::<u64>().unwrap_or(0);
        let vb = b.version.parse::<u64>().unwrap_or(0);
        va.cmp(&vb)
            .then_with(|| a.entity_type.cmp(&b.entity_type))
            .then_with(|| a.entity_id.cmp(&b.entity_id))
    });
    ReconciliationResponse {
        request_id,
        conflicts: applied.outcome.conflicts,
        resolved_operations: applied.outcome.resolved_operations,
        current_version: applied.counter.to_string(),
        delta_updates: deltas,
        completed_at: chrono::Utc::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row stored before the `current` column is read from its whole state; a row
    /// stored since, from `current`: both give the same snapshot.
    #[test]
    fn the_current_column_and_the_whole_state_give_the_same_snapshot() {
        let state = EntityState::new("doc", "d1");
        let whole: Current = serde_json::from_str(&serde_json::to_string(&state).unwrap())
            .expect("a whole state reads as Current");
        let current: Current =
            serde_json::from_str(&current_json(&state).unwrap()).expect("current reads");
        let now = chrono::Utc::now();
        let a = snapshot_of(
            "t1",
            &whole.entity_type,
            &whole.entity_id,
            &whole.value,
            whole.version,
            &whole.clock,
            now,
        );
        let b = snapshot_of(
            "t1",
            &current.entity_type,
            &current.entity_id,
            &current.value,
            current.version,
            &current.clock,
            now,
        );
        assert_eq!(a, b);
        assert_eq!(a, snapshot("t1", &state, now));
    }
}
