//! The entity cache: local edits in one transaction, replay of pending edits over a new
//! server base, reconciliation responses, conflicts, discarding, and surviving a reopen.
//! The "server" in these tests is core's own reconciliation engine, as the real server
//! uses it. Real SQLite files in a temporary directory.

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use chrono::{TimeZone, Utc};
use serde_json::{Value, json};
use webwaka_realtime::VectorClock;
use webwaka_realtime::protocol::{
    Conflict, Operation, OperationType, ReconciliationResponse, ResolutionStrategy, StateSnapshot,
    Timestamp, checksum,
};
use webwaka_realtime::reconcile::{EntityKey, EntityState, Reconciler};
use webwaka_realtime::store::{
    ItemKind, ItemState, LocalEdit, OutboxClass, Store, StoreConfig, StoreError, entity_lane,
};

fn at(secs: i64) -> Timestamp {
    Utc.timestamp_opt(1_780_000_000 + secs, 0).single().unwrap()
}

fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(dir.path().join("sdk.db"), StoreConfig::default()).unwrap()
}

fn edit(kind: OperationType, id: &str, payload: Value) -> LocalEdit {
    LocalEdit {
        tenant_id: "t1".into(),
        entity_type: "doc".into(),
        entity_id: id.into(),
        operation_type: kind,
        payload,
        metadata: None,
    }
}

use OperationType::{Create, Delete, Update};

/// A snapshot as the server makes it from its engine state.
fn snapshot_of(state: &EntityState) -> StateSnapshot {
    let data = if state.value().deleted {
        Value::Null
    } else {
        state.value().data.clone()
    };
    StateSnapshot {
        snapshot_id: uuid::Uuid::now_v7().to_string(),
        tenant_id: "t1".into(),
        entity_type: state.entity_type().into(),
        entity_id: state.entity_id().into(),
        version: state.version().to_string(),
        vector_clock: state.clock().clone(),
        checksum: checksum(&data),
        data,
        deleted: state.value().deleted,
        created_at: at(100),
    }
}

/// A tiny server: core's engine over a map of entities, with a tenant version counter.
struct Server {
    engine: Reconciler,
    states: BTreeMap<EntityKey, EntityState>,
    version: u64,
}

impl Server {
    fn new(strategy: ResolutionStrategy) -> Self {
        Self {
            engine: Reconciler::new(strategy),
            states: BTreeMap::new(),
            version: 0,
        }
    }

    fn reconcile(&mut self, ops: &[Operation]) -> ReconciliationResponse {
        let out = self
            .engine
            .apply_batch(&mut self.states, ops, None, at(50))
            .unwrap();
        for key in &out.changed {
            self.version += 1;
            self.states.get_mut(key).unwrap().set_version(self.version);
        }
        ReconciliationResponse {
            request_id: "r".into(),
            conflicts: out.conflicts,
            resolved_operations: out.resolved_operations,
            current_version: self.version.to_string(),
            delta_updates: out
                .touched
                .iter()
                .map(|k| snapshot_of(&self.states[k]))
                .collect(),
            completed_at: at(50),
        }
    }

    fn value(&self, id: &str) -> Value {
        self.states[&("doc".to_string(), id.to_string())]
            .value()
            .data
            .clone()
    }
}

/// An operation by another client, `other`, on `doc/id`.
fn foreign(
    id: &str,
    kind: OperationType,
    payload: Value,
    ts: i64,
    clock: &[(&str, u64)],
) -> Operation {
    Operation {
        operation_id: uuid::Uuid::now_v7().to_string(),
        client_id: "other".into(),
        tenant_id: "t1".into(),
        entity_type: "doc".into(),
        entity_id: id.into(),
        operation_type: kind,
        payload,
        timestamp: at(ts),
        vector_clock: VectorClock::from_entries(clock.iter().map(|(k, v)| (*k, *v))),
        metadata: None,
    }
}

#[test]
fn a_local_edit_is_applied_recorded_and_enqueued_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let me = store.client_id().to_owned();
    let (op, item, entity) = store
        .local_edit(edit(Create, "d1", json!({"title": "a", "n": 1})), at(0))
        .unwrap();
    assert_eq!(
        op.vector_clock,
        VectorClock::from_entries([(me.as_str(), 1)])
    );
    assert_eq!(item.id, op.operation_id, "the outbox item is the operation");
    assert_eq!(
        (item.class, item.kind, item.lane.as_str()),
        (
            OutboxClass::C,
            ItemKind::Operation,
            entity_lane("doc", "d1").as_str()
        )
    );
    assert_eq!(entity.value.data, json!({"title": "a", "n": 1}));
    assert_eq!(entity.pending, vec![op.clone()]);

    let (op2, _, entity) = store
        .local_edit(edit(Update, "d1", json!({"n": 2, "title": null})), at(1))
        .unwrap();
    assert_eq!(
        op2.vector_clock.get(&me),
        2,
        "each edit descends from the last"
    );
    assert_eq!(entity.value.data, json!({"n": 2}), "merge patch applied");
    assert_eq!(store.entity("doc", "d1").unwrap().unwrap(), entity);

    let (_, _, entity) = store
        .local_edit(edit(Delete, "d1", json!({"ignored": 1})), at(2))
        .unwrap();
    assert!(entity.value.deleted);
    assert_eq!(entity.value.data, Value::Null);
    assert_eq!(entity.pending.len(), 3);
    assert_eq!(store.depth().unwrap().items, 3);
}

#[test]
fn a_refused_edit_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(
        dir.path().join("sdk.db"),
        StoreConfig {
            max_items: 1,
            ..StoreConfig::default()
        },
    )
    .unwrap();
    let err = store
        .local_edit(edit(Update, "d1", json!([1, 2])), at(0))
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid { field: "operation", message } if message.contains("payload")),
        "{err}"
    );
    assert_eq!(store.entity("doc", "d1").unwrap(), None);

    store
        .local_edit(edit(Create, "d1", json!({"a": 1})), at(0))
        .unwrap();
    let err = store
        .local_edit(edit(Update, "d1", json!({"a": 2})), at(1))
        .unwrap_err();
    assert!(matches!(err, StoreError::QueueFull { .. }), "{err}");
    let entity = store.entity("doc", "d1").unwrap().unwrap();
    assert_eq!(
        entity.value.data,
        json!({"a": 1}),
        "the refused edit is not shown"
    );
    assert_eq!(entity.pending.len(), 1);
}

#[test]
fn pending_edits_are_replayed_over_a_new_base_and_dropped_once_covered() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let mut server = Server::new(ResolutionStrategy::FieldLevelMerge);

    let (create, _, _) = store
        .local_edit(
            edit(Create, "d1", json!({"title": "t", "body": "b"})),
            at(0),
        )
        .unwrap();
    // The create reaches the server; the next local edit has not yet.
    let response = server.reconcile(std::slice::from_ref(&create));
    let (upd, _, _) = store
        .local_edit(edit(Update, "d1", json!({"title": "mine"})), at(2))
        .unwrap();
    // Meanwhile another client changed the body on the server.
    let theirs = foreign(
        "d1",
        Update,
        json!({"body": "theirs"}),
        3,
        &[(create.client_id.as_str(), 1), ("other", 1)],
    );
    let response2 = server.reconcile(std::slice::from_ref(&theirs));

    store.apply_reconcile_response(&response, at(4)).unwrap();
    let entity = store.entity("doc", "d1").unwrap().unwrap();
    assert_eq!(
        entity.pending,
        vec![upd.clone()],
        "the create is covered by the base"
    );
    assert_eq!(entity.value.data, json!({"title": "mine", "body": "b"}));
    assert_eq!(
        store.get(&create.operation_id).unwrap().unwrap().state,
        ItemState::Accepted
    );

    let outcome = store.apply_reconcile_response(&response2, at(5)).unwrap();
    let entity = &outcome.entities[0];
    assert_eq!(
        entity.value.data,
        json!({"title": "mine", "body": "theirs"}),
        "the new base with the pending edit on top"
    );
    assert_eq!(entity.base_version, 2);

    // The pending edit reaches the server; the answer settles it.
    let response3 = server.reconcile(std::slice::from_ref(&upd));
    let outcome = store.apply_reconcile_response(&response3, at(6)).unwrap();
    let entity = &outcome.entities[0];
    assert!(entity.pending.is_empty());
    assert_eq!(
        entity.value.data,
        server.value("d1"),
        "the cache equals the server"
    );
    assert_eq!(store.entity_sync_version().unwrap().as_deref(), Some("3"));

    // A stale response (an older pull arriving late) changes nothing.
    let stale = store.apply_reconcile_response(&response, at(7)).unwrap();
    assert!(stale.entities.is_empty());
    assert_eq!(
        store.entity("doc", "d1").unwrap().unwrap().value.data,
        server.value("d1")
    );
    assert_eq!(
        store.entity_sync_version().unwrap().as_deref(),
        Some("3"),
        "never rewinds"
    );
}

#[test]
fn an_open_conflict_is_kept_until_resolved_and_its_operation_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let mut server = Server::new(ResolutionStrategy::Manual);
    let base = foreign("d1", Create, json!({"v": 0}), 0, &[("other", 1)]);
    store
        .apply_reconcile_response(&server.reconcile(std::slice::from_ref(&base)), at(1))
        .unwrap();

    let (mine, _, _) = store
        .local_edit(edit(Update, "d1", json!({"v": "mine"})), at(2))
        .unwrap();
    let theirs = foreign("d1", Update, json!({"v": "theirs"}), 3, &[("other", 2)]);
    server.reconcile(std::slice::from_ref(&theirs));
    let response = server.reconcile(std::slice::from_ref(&mine));
    assert_eq!(response.conflicts.len(), 1);
    let conflict: &Conflict = &response.conflicts[0];
    assert!(conflict.resolution.is_none());

    store.apply_reconcile_response(&response, at(4)).unwrap();
    let entity = store.entity("doc", "d1").unwrap().unwrap();
    assert_eq!(
        entity.conflicts,
        vec![conflict.clone()],
        "both sides kept for the app"
    );
    assert!(
        entity.pending.is_empty(),
        "the server holds it: not pending any more"
    );
    assert_eq!(
        entity.value.data,
        json!({"v": "theirs"}),
        "MANUAL keeps the value"
    );
    assert_eq!(
        store.get(&mine.operation_id).unwrap().unwrap().state,
        ItemState::Accepted
    );
    assert_eq!(store.open_conflicts().unwrap().len(), 1);

    // The app settles it with an edit that dominates both sides.
    let (settle, _, _) = store
        .local_edit(edit(Update, "d1", json!({"v": "agreed"})), at(5))
        .unwrap();
    assert!(settle.vector_clock.descends_from(&mine.vector_clock));
    assert!(settle.vector_clock.descends_from(&theirs.vector_clock));
    let response = server.reconcile(std::slice::from_ref(&settle));
    store.apply_reconcile_response(&response, at(6)).unwrap();
    assert_eq!(server.value("d1"), json!({"v": "agreed"}));
    assert_eq!(
        store.entity("doc", "d1").unwrap().unwrap().value.data,
        json!({"v": "agreed"})
    );
    assert!(store.clear_conflict(&conflict.conflict_id).unwrap());
    assert!(store.open_conflicts().unwrap().is_empty());
}

#[test]
fn a_snapshot_with_a_bad_checksum_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let mut state = EntityState::new("doc", "d1");
    state.set_version(1);
    let mut snap = snapshot_of(&state);
    snap.data = json!({"tampered": true});
    let err = store.apply_snapshot(&snap, at(0)).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Invalid {
                field: "checksum",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(store.entity("doc", "d1").unwrap(), None);

    let response = ReconciliationResponse {
        request_id: "r".into(),
        conflicts: vec![],
        resolved_operations: vec![],
        current_version: "1".into(),
        delta_updates: vec![snap],
        completed_at: at(0),
    };
    let outcome = store.apply_reconcile_response(&response, at(0)).unwrap();
    assert_eq!(outcome.bad_checksums, vec!["doc/d1".to_string()]);
    assert_eq!(store.entity("doc", "d1").unwrap(), None);
    // The sync version stays where it was: past it, the next pull would never bring
    // the refused entity again.
    assert_eq!(store.entity_sync_version().unwrap(), None);
    let good = ReconciliationResponse {
        delta_updates: vec![snapshot_of(&state)],
        ..response
    };
    store.apply_reconcile_response(&good, at(1)).unwrap();
    assert!(store.entity("doc", "d1").unwrap().is_some());
    assert_eq!(store.entity_sync_version().unwrap().as_deref(), Some("1"));
}

#[test]
fn discarding_a_dead_operation_takes_it_out_of_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    store
        .local_edit(edit(Create, "d1", json!({"a": 1})), at(0))
        .unwrap();
    let (bad, _, entity) = store
        .local_edit(edit(Update, "d1", json!({"a": 2})), at(1))
        .unwrap();
    assert_eq!(entity.value.data, json!({"a": 2}));
    store
        .mark_dead(&bad.operation_id, "refused by the server", at(2))
        .unwrap();
    store.discard(&bad.operation_id).unwrap();
    let entity = store.entity("doc", "d1").unwrap().unwrap();
    assert_eq!(entity.value.data, json!({"a": 1}));
    assert_eq!(entity.pending.len(), 1);
}

#[test]
fn the_cache_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (op, entity) = {
        let mut store = open(&dir);
        let (op, _, entity) = store
            .local_edit(edit(Create, "d1", json!({"a": 1})), at(0))
            .unwrap();
        (op, entity)
    };
    let mut store = open(&dir);
    assert_eq!(store.entity("doc", "d1").unwrap().unwrap(), entity);
    assert_eq!(store.entity_ids("doc").unwrap(), vec!["d1".to_string()]);
    let (next, _, _) = store
        .local_edit(edit(Update, "d1", json!({"b": 1})), at(1))
        .unwrap();
    assert!(next.vector_clock.descends_from(&op.vector_clock));
    assert_eq!(next.client_id, op.client_id, "same installation");
}

#[test]
fn a_counter_type_is_forecast_with_its_merge_function() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig::default();
    config.merges.insert(
        "doc".into(),
        std::sync::Arc::new(webwaka_realtime::reconcile::CounterMerge),
    );
    let mut store = Store::open(dir.path().join("sdk.db"), config).unwrap();
    store
        .local_edit(edit(Create, "d1", json!({"n": 10, "s": "text"})), at(0))
        .unwrap();
    let (_, _, entity) = store
        .local_edit(edit(Update, "d1", json!({"n": 5})), at(1))
        .unwrap();
    assert_eq!(entity.value.data["n"], json!(15), "a delta is added");
    let (_, _, entity) = store
        .local_edit(edit(Update, "d1", json!({"n": -3})), at(2))
        .unwrap();
    assert_eq!(entity.value.data["n"], json!(12));
    // A delta on a non-number is refused at once, as the server would refuse it.
    let err = store
        .local_edit(edit(Update, "d1", json!({"s": 1})), at(3))
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Invalid {
                field: "operation",
                ..
            }
        ),
        "{err}"
    );
}
