//! One entity's reconciliation state, and how an operation changes it.
//!
//! [`EntityState`] keeps the entity's current value, its merged vector clock, and the
//! recent operations (the *history*) sorted by [`OpKey`]. The current value is always
//! the fold of that history over a *base* (the value before the oldest retained
//! operation), each operation applied by its strategy's step:
//!
//! - LAST_WRITE_WINS: an operation applies on top of the state it was made against,
//!   i.e. the state after the greatest operation it causally follows (its *parent*).
//!   The winner of concurrent edits is the greater key; the loser is not in the
//!   winner's lineage, so none of its fields survive.
//! - FIELD_LEVEL_MERGE and MANUAL: each operation's merge patch applies on top of
//!   everything before it in key order, so per top-level field the greatest writer wins
//!   and fields written on one side only are kept (an LWW-map).
//! - CUSTOM_MERGE: the registered [`CustomMerge`] step, in key order.
//!
//! Because the fold depends only on the set of operations (not their arrival order),
//! replicas that saw the same operations hold the same value.
//!
//! # What keeps an operation's cost independent of the history's length
//!
//! The decisions are those of the engine before issue 16 (kept as `reference.rs` and
//! compared with this one by `tests/reconcile_differential.rs`); what changed is what
//! each decision costs:
//!
//! - **Indexes** (`Index`): hash tables of the retained operations by id and by
//!   vector clock answer "seen before?" and "clock reused?" in O(1) (were scans).
//! - **The fold's states** (`Fold`): the state after each retained operation, with,
//!   for an operation concurrent with an earlier one, the clock of everything applied
//!   up to it and the state its author saw. An operation that sorts last applies on
//!   top of the last state; one that sorts at position `p` refolds only the operations
//!   from `p` on, starting from the state before `p` (the whole history was refolded).
//! - **In-place patches with undo records** (`EntityState::patch_last`): the usual
//!   step (an UPDATE that saw everything, appended last, under LAST_WRITE_WINS,
//!   FIELD_LEVEL_MERGE or MANUAL) patches the value where it is instead of copying it
//!   (a copy of an 8-field object was 17 allocations), and its fold entry keeps the
//!   fields it replaced rather than the state before it. A state not kept is rebuilt
//!   when a slower path needs it: the next kept state, copied once, with the patches
//!   in between undone, so its cost grows with the operations after it, not with the
//!   history. Other steps (concurrent, CUSTOM_MERGE, CREATE, DELETE) keep their state.
//! - **Scans from the end**: a concurrent operation looks for its rival, its greatest
//!   predecessor and its successors walking back from the newest operation; every
//!   successor sorts after the greatest predecessor, so the walk stops there once the
//!   rival is found (or once it passes an applied predecessor that saw everything
//!   applied before it: no earlier operation can be the rival). It visits the
//!   operations after its place and those it is concurrent with, not the history.
//! - **Local re-keying**: when an operation arrives after operations that saw it, only
//!   those successors' effective times can rise (to the newcomer's): they are raised and
//!   the tail re-sorted (every key was recomputed, comparing every pair). Keys that are
//!   not what a full recomputation gives (checked once after a compaction or a load)
//!   are recomputed in full, as before.
//! - **All-or-nothing batches without copies** (`Journal`): a batch changes the
//!   states in place; each entity remembers its small fields and, lazily, the part of
//!   its history an operation changed (from that operation's place on), and puts them
//!   back if a later operation of the batch fails (each entity was copied whole). The
//!   value before the batch is not held while the fold can rebuild it (holding it
//!   would make the first in-place patch copy it); whether the batch changed the value
//!   is decided from the fields its patches replaced.
//! - **Shared operations**: an operation is stored once (`Arc<Operation>`), vector
//!   clocks are shared arrays ([`VectorClock`]), so copying them is a reference count.

use std::collections::HashSet;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use hashbrown::{DefaultHashBuilder, HashTable};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::merge::{CustomMerge, MergeError, MergeInput};
use super::order::OpKey;
use crate::clock::{ClockOrdering, VectorClock};
use crate::protocol::{
    Conflict, ConflictResolution, Operation, OperationType, ResolutionStrategy, Timestamp,
};

/// An entity's value: its data, or a tombstone.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntityValue {
    /// The data (`null` when never created or deleted).
    pub data: Value,
    /// True once deleted (and not re-created since).
    pub deleted: bool,
}

impl EntityValue {
    /// A live entity holding `data`.
    pub fn live(data: Value) -> Self {
        Self {
            data,
            deleted: false,
        }
    }

    /// A tombstone.
    pub fn tombstone() -> Self {
        Self {
            data: Value::Null,
            deleted: true,
        }
    }

    /// The entity after `op` applied plainly: CREATE replaces, UPDATE merge-patches
    /// (on a tombstone or nothing it starts from `{}`), DELETE leaves a tombstone.
    pub fn apply_plain(&self, op: &Operation) -> EntityValue {
        match op.operation_type {
            OperationType::Create => EntityValue::live(op.payload.clone()),
            OperationType::Update => {
                let mut data = if self.deleted {
                    Value::Null
                } else {
                    self.data.clone()
                };
                json_patch::merge(&mut data, &op.payload);
                EntityValue::live(data)
            }
            OperationType::Delete => EntityValue::tombstone(),
        }
    }
}

impl EntityValue {
    /// [`EntityValue::apply_plain`] with [`merge_patch`]: the engine's step (the
    /// reference engine keeps `apply_plain`, so that the differential test also
    /// compares the two merge patches).
    fn after(&self, op: &Operation) -> EntityValue {
        match op.operation_type {
            OperationType::Update => {
                let mut data = if self.deleted {
                    Value::Null
                } else {
                    self.data.clone()
                };
                merge_patch(&mut data, &op.payload);
                EntityValue::live(data)
            }
            _ => self.apply_plain(op),
        }
    }
}

/// An RFC 7386 merge patch, exactly as `json_patch::merge`, but a field the document
/// has is patched where it is: `json_patch` makes an entry for every field of the patch,
/// which copies its name (an allocation per field for each operation applied).
fn merge_patch(doc: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *doc = patch.clone();
        return;
    };
    if !doc.is_object() {
        *doc = Value::Object(serde_json::Map::new());
    }
    let Value::Object(map) = doc else {
        return; // an object since the line above
    };
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key.as_str());
        } else if let Some(slot) = map.get_mut(key.as_str()) {
            merge_patch(slot, value);
        } else {
            let mut slot = Value::Null;
            merge_patch(&mut slot, value);
            map.insert(key.clone(), slot);
        }
    }
}

/// Where a retained operation sorts: the parts of its [`OpKey`] that are not in the
/// operation itself (the tie-breaks, `clientId` and `operationId`, are read from it:
/// a key costs no copy of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Key {
    pub(crate) effective_time: Timestamp,
    pub(crate) depth: u64,
}

/// One retained operation of an entity's history.
///
/// Its JSON form is `{key, strategy, held, op}`, the key whole ([`OpKey`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LoggedOp {
    pub(crate) key: Key,
    /// The strategy it was applied with (a request may override the entity type's).
    pub(crate) strategy: ResolutionStrategy,
    /// Held by an open MANUAL conflict: remembered, but not part of the value.
    pub(crate) held: bool,
    /// The operation, shared with the indexes (re-keying copies the key, not this).
    pub(crate) op: Arc<Operation>,
}

impl LoggedOp {
    /// Its place in the total order ([`OpKey`]'s order, without copying the ids).
    pub(crate) fn order(&self, other: &LoggedOp) -> std::cmp::Ordering {
        self.key
            .cmp(&other.key)
            .then_with(|| self.op.client_id.cmp(&other.op.client_id))
            .then_with(|| self.op.operation_id.cmp(&other.op.operation_id))
    }

    /// Its whole key.
    pub(crate) fn op_key(&self) -> OpKey {
        OpKey {
            effective_time: self.key.effective_time,
            depth: self.key.depth,
            client_id: self.op.client_id.clone(),
            operation_id: self.op.operation_id.clone(),
        }
    }
}

/// The JSON form of a [`LoggedOp`], written.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LoggedRef<'a> {
    key: KeyRef<'a>,
    strategy: ResolutionStrategy,
    held: bool,
    op: &'a Operation,
}

/// An [`OpKey`] written from its parts.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KeyRef<'a> {
    effective_time: Timestamp,
    depth: u64,
    client_id: &'a str,
    operation_id: &'a str,
}

/// The JSON form of a [`LoggedOp`], read. The key's ids are the operation's (the
/// engine never wrote others); the operation's own are kept.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoggedStored {
    key: StoredKey,
    strategy: ResolutionStrategy,
    held: bool,
    op: Arc<Operation>,
}

/// The parts of a stored [`OpKey`] that are read (the ids are skipped).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredKey {
    effective_time: Timestamp,
    depth: u64,
}

impl Serialize for LoggedOp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        LoggedRef {
            key: KeyRef {
                effective_time: self.key.effective_time,
                depth: self.key.depth,
                client_id: &self.op.client_id,
                operation_id: &self.op.operation_id,
            },
            strategy: self.strategy,
            held: self.held,
            op: &self.op,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for LoggedOp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = LoggedStored::deserialize(deserializer)?;
        Ok(Self {
            key: Key {
                effective_time: s.key.effective_time,
                depth: s.key.depth,
            },
            strategy: s.strategy,
            held: s.held,
            op: s.op,
        })
    }
}

/// An entity's reconciliation state: what the server keeps per entity (and what a
/// replica needs to apply operations the same way).
///
/// Its JSON form (the fields up to `open_conflicts`) is the one the engine has always
/// written; the indexes and caches after them are rebuilt from it.
#[derive(Clone)]
pub struct EntityState {
    entity_type: String,
    entity_id: String,
    value: Arc<EntityValue>,
    version: u64,
    /// Merged clock of every operation seen (applied, discarded, held or compacted).
    clock: VectorClock,
    /// The value before the oldest retained operation.
    base: Arc<EntityValue>,
    /// Merged clock of the compacted operations.
    base_clock: VectorClock,
    /// Greatest effective time among compacted operations.
    base_time: Option<Timestamp>,
    /// Retained operations, sorted by key.
    history: Vec<Arc<LoggedOp>>,
    /// MANUAL conflicts not yet settled by a dominating operation.
    open_conflicts: Vec<Conflict>,
    /// The retained operations by id and by clock.
    index: Index,
    /// The fold's state after each retained operation; `None` until first needed
    /// (after a load, a failed batch, or a change of merge function).
    fold: Option<Fold>,
    /// Whether every retained key is what a full re-keying would compute; `None` when
    /// not known (after a load or a compaction), checked when first needed.
    keys_canonical: Option<bool>,
    /// What to restore if the batch being applied fails.
    /// (Boxed: inline, it made every state in a map larger, and moving states in and
    /// out of a map costlier than the box's allocation.)
    journal: Option<Box<Journal>>,
}

/// The retained operations by id (duplicates) and by vector clock (reused clocks).
#[derive(Clone, Default)]
struct Index {
    hasher: DefaultHashBuilder,
    ids: HashTable<Arc<Operation>>,
    clocks: HashTable<Arc<Operation>>,
}

impl Index {
    fn build(history: &[Arc<LoggedOp>]) -> Self {
        let mut index = Self::default();
        for l in history {
            index.insert(&l.op);
        }
        index
    }

    fn find_id(&self, id: &str) -> Option<&Arc<Operation>> {
        let hash = self.hasher.hash_one(id);
        self.ids.find(hash, |o| o.operation_id == id)
    }

    fn find_clock(&self, clock: &VectorClock) -> Option<&Arc<Operation>> {
        let hash = self.clock_hash(clock);
        self.clocks.find(hash, |o| o.vector_clock == *clock)
    }

    fn clock_hash(&self, clock: &VectorClock) -> u64 {
        clock_hash(&self.hasher, clock)
    }

    fn insert(&mut self, op: &Arc<Operation>) {
        let hasher = &self.hasher;
        self.ids
            .insert_unique(hasher.hash_one(&*op.operation_id), op.clone(), |o| {
                hasher.hash_one(&*o.operation_id)
            });
        self.clocks
            .insert_unique(self.clock_hash(&op.vector_clock), op.clone(), |o| {
                clock_hash(hasher, &o.vector_clock)
            });
    }

    fn remove(&mut self, op: &Arc<Operation>) {
        let id_hash = self.hasher.hash_one(&*op.operation_id);
        if let Ok(entry) = self.ids.find_entry(id_hash, |o| Arc::ptr_eq(o, op)) {
            entry.remove();
        }
        let hash = self.clock_hash(&op.vector_clock);
        if let Ok(entry) = self.clocks.find_entry(hash, |o| Arc::ptr_eq(o, op)) {
            entry.remove();
        }
    }
}

/// The hash of a clock in the index: each entry's counter, and of its replica id only
/// the length and the last byte (hashing every id's bytes cost more than the rest of
/// a look-up). Clocks that differ in one client's entry (`{a: 5, b: 1}`, `{a: 5, c: 1}`:
/// clients editing from the same state) still hash apart as long as their ids differ
/// in length or last byte; equality always decides.
fn clock_hash(hasher: &DefaultHashBuilder, clock: &VectorClock) -> u64 {
    let mut h = hasher.build_hasher();
    for (replica, counter) in clock.iter() {
        h.write_usize(replica.len());
        h.write_u8(replica.as_bytes().last().copied().unwrap_or(0));
        h.write_u64(counter);
    }
    h.finish()
}

/// The fold of the history over the base, cached: `entries[i]` is (or rebuilds) the
/// state after `history[i]` exactly as a fold from the base computes it.
#[derive(Clone)]
struct Fold {
    /// The merge function the states were computed with (a CUSTOM_MERGE step's result
    /// depends on it): another one empties the cache.
    merge: Option<Arc<dyn CustomMerge>>,
    entries: Vec<FoldEntry>,
}

/// The fold after one operation.
///
/// Its state is kept, or (`None`) it is the next entry's state with the next entry's
/// `undo` applied: an operation that patched the value in place ([`EntityState::patch_last`])
/// keeps the fields it replaced, not a copy of the whole value from before it. The last
/// entry always keeps its state (the fold's head).
#[derive(Clone)]
struct FoldEntry {
    /// The state after the operation (a held one repeats the state before it); `None`:
    /// not kept (see [`EntityState::fold_state`]).
    state: Option<Arc<EntityValue>>,
    /// Set when the operation patched the state before it in place: for each field of
    /// its payload (an object), in order, the field as it was (`None`: absent).
    undo: Option<Vec<Option<Value>>>,
    /// Set for an applied operation concurrent with an earlier applied one.
    concurrent: Option<Box<Concurrent>>,
}

impl FoldEntry {
    /// An entry that keeps its state.
    fn kept(state: Arc<EntityValue>, concurrent: Option<Box<Concurrent>>) -> Self {
        Self {
            state: Some(state),
            undo: None,
            concurrent,
        }
    }
}

/// Applies `op`'s payload (an object) to `value` (a live object) in place, as
/// [`EntityValue::after`] would on a copy; returns each payload field as it was.
fn patch_in_place(value: &mut EntityValue, op: &Operation) -> Vec<Option<Value>> {
    let (Value::Object(patch), Value::Object(map)) = (&op.payload, &mut value.data) else {
        return Vec::new(); // checked by the caller
    };
    let mut olds = Vec::with_capacity(patch.len());
    for (field, change) in patch {
        if change.is_null() {
            olds.push(map.remove(field.as_str()));
        } else if let Some(slot) = map.get_mut(field.as_str()) {
            if change.is_object() {
                olds.push(Some(slot.clone()));
                merge_patch(slot, change);
            } else {
                olds.push(Some(std::mem::replace(slot, change.clone())));
            }
        } else {
            let mut slot = Value::Null;
            merge_patch(&mut slot, change);
            map.insert(field.clone(), slot);
            olds.push(None);
        }
    }
    olds
}

/// Puts back the fields `op` (an UPDATE whose payload is an object) replaced in
/// `value`, from `olds` (see [`FoldEntry::undo`]), last field first.
fn undo_patch(value: &mut EntityValue, op: &Operation, olds: &[Option<Value>]) {
    let (Value::Object(patch), Value::Object(map)) = (&op.payload, &mut value.data) else {
        return; // the in-place path ran only on an object patching an object
    };
    for ((field, _), old) in patch.iter().zip(olds).rev() {
        match old {
            Some(old) => match map.get_mut(field.as_str()) {
                Some(slot) => *slot = old.clone(),
                None => {
                    map.insert(field.clone(), old.clone());
                }
            },
            None => {
                map.remove(field.as_str());
            }
        }
    }
}

/// What the fold knew of an operation concurrent with an earlier applied one.
#[derive(Clone)]
struct Concurrent {
    /// Merged clock of the base and every applied operation up to this one. (For an
    /// operation that saw everything before it, that is its own clock.)
    applied: VectorClock,
    /// The state its author saw: the state after its parent.
    seen: Arc<EntityValue>,
}

/// What an entity must restore if the batch being applied fails: its small fields,
/// and the history from `from` on as it was (before `from` nothing has changed since
/// the batch began; an operation that changes the history at `p < from` first saves
/// `history[p..from]` here).
#[derive(Clone)]
struct Journal {
    /// The value before the batch; `None` while the fold can give it back (it was the
    /// fold's head, and only appends have happened since, see
    /// [`EntityState::keep_value_before`]): holding it would make the first in-place
    /// patch of each entity in a batch copy it.
    value: Option<Arc<EntityValue>>,
    clock: VectorClock,
    base: Arc<EntityValue>,
    base_clock: VectorClock,
    base_time: Option<Timestamp>,
    open_conflicts: Vec<Conflict>,
    keys_canonical: Option<bool>,
    from: usize,
    saved: Vec<Arc<LoggedOp>>,
    /// A compaction removed operations from the indexes: rebuild them.
    reindex: bool,
}

/// The JSON form of an [`EntityState`] (field order is the wire order).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StoredRef<'a> {
    entity_type: &'a str,
    entity_id: &'a str,
    value: &'a EntityValue,
    version: u64,
    clock: &'a VectorClock,
    base: &'a EntityValue,
    base_clock: &'a VectorClock,
    base_time: Option<Timestamp>,
    history: &'a [Arc<LoggedOp>],
    open_conflicts: &'a [Conflict],
}

/// The JSON form of an [`EntityState`], read.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stored {
    entity_type: String,
    entity_id: String,
    value: EntityValue,
    version: u64,
    clock: VectorClock,
    base: EntityValue,
    base_clock: VectorClock,
    base_time: Option<Timestamp>,
    history: Vec<Arc<LoggedOp>>,
    open_conflicts: Vec<Conflict>,
}

impl Serialize for EntityState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        StoredRef {
            entity_type: &self.entity_type,
            entity_id: &self.entity_id,
            value: &self.value,
            version: self.version,
            clock: &self.clock,
            base: &self.base,
            base_clock: &self.base_clock,
            base_time: self.base_time,
            history: &self.history,
            open_conflicts: &self.open_conflicts,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for EntityState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = Stored::deserialize(deserializer)?;
        Ok(Self {
            index: Index::build(&s.history),
            entity_type: s.entity_type,
            entity_id: s.entity_id,
            value: Arc::new(s.value),
            version: s.version,
            clock: s.clock,
            base: Arc::new(s.base),
            base_clock: s.base_clock,
            base_time: s.base_time,
            history: s.history,
            open_conflicts: s.open_conflicts,
            fold: None,
            keys_canonical: None,
            journal: None,
        })
    }
}

impl PartialEq for EntityState {
    /// Equal when the JSON forms are (the caches are not compared).
    fn eq(&self, other: &Self) -> bool {
        self.entity_type == other.entity_type
            && self.entity_id == other.entity_id
            && self.value == other.value
            && self.version == other.version
            && self.clock == other.clock
            && self.base == other.base
            && self.base_clock == other.base_clock
            && self.base_time == other.base_time
            && self.history == other.history
            && self.open_conflicts == other.open_conflicts
    }
}

impl fmt::Debug for EntityState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntityState")
            .field("entity_type", &self.entity_type)
            .field("entity_id", &self.entity_id)
            .field("value", &self.value)
            .field("version", &self.version)
            .field("clock", &self.clock)
            .field("base", &self.base)
            .field("base_clock", &self.base_clock)
            .field("base_time", &self.base_time)
            .field("history", &self.history)
            .field("open_conflicts", &self.open_conflicts)
            .finish_non_exhaustive()
    }
}

/// How the engine settled one incoming operation.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Applied without conflict.
    Applied,
    /// Already seen (same id, or older than the retained history): nothing changed.
    Duplicate,
    /// Concurrent with an applied operation; the strategy resolved it.
    Resolved(Conflict),
    /// Concurrent with an applied operation under MANUAL: kept aside, value unchanged,
    /// until an operation that dominates both arrives.
    Held(Conflict),
}

/// Why an operation could not be applied. Nothing changed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApplyError {
    /// The operation names another entity than the state it was applied to.
    #[error("operation {operation_id} is for {found}, not {expected}")]
    WrongEntity {
        /// The operation.
        operation_id: String,
        /// The state's `entityType/entityId`.
        expected: String,
        /// The operation's `entityType/entityId`.
        found: String,
    },
    /// CUSTOM_MERGE was asked for an entity type that has no merge function.
    #[error("no merge function is registered for entity type {entity_type:?}")]
    NoMergeFunction {
        /// The entity type.
        entity_type: String,
    },
    /// The operation is malformed (see [`Operation::validate`]).
    #[error("operation {operation_id} is invalid: {error}")]
    Invalid {
        /// The operation refused.
        operation_id: String,
        /// What is wrong, naming the field.
        error: crate::protocol::DecodeError,
    },
    /// The operation carries the same vector clock as a different operation already
    /// seen. Every operation counts itself in its author's entry, so two operations can
    /// never share a clock: one of them is malformed (a client that reused a counter).
    #[error("operation {operation_id} reuses the vector clock of operation {other}")]
    ClockReused {
        /// The operation refused.
        operation_id: String,
        /// The operation seen earlier with the same clock.
        other: String,
    },
    /// The merge function refused the operation.
    #[error(transparent)]
    Merge(#[from] MergeError),
}

/// What the engine needs from its configuration to apply one operation.
pub(crate) struct StepContext<'a> {
    pub(crate) strategy: ResolutionStrategy,
    /// The merge function registered for the entity's type, if any.
    pub(crate) merge: Option<&'a Arc<dyn CustomMerge>>,
    pub(crate) max_history: usize,
    pub(crate) now: Timestamp,
}

/// What the walk back from the newest operation found about an incoming operation
/// that did not see everything.
#[derive(Debug, Default)]
struct Scan {
    /// The greatest applied operation concurrent with it.
    rival: Option<usize>,
    /// The greatest operation it causally follows.
    pred: Option<usize>,
    /// The first operation that causally follows it (it arrived after them).
    first_successor: Option<usize>,
    /// It saw the last applied operation (or there is none).
    follows_last_applied: bool,
}

/// What a compaction knew of a kept operation's fold step, to reuse its state when
/// the new fold gives it the same inputs.
struct Hint {
    current: Arc<EntityValue>,
    seen: Arc<EntityValue>,
    concurrent: bool,
    state: Arc<EntityValue>,
}

impl EntityState {
    /// A new, never-written entity.
    pub fn new(entity_type: impl Into<String>, entity_id: impl Into<String>) -> Self {
        Self {
            entity_type: entity_type.into(),
            entity_id: entity_id.into(),
            value: Arc::default(),
            version: 0,
            clock: VectorClock::new(),
            base: Arc::default(),
            base_clock: VectorClock::new(),
            base_time: None,
            history: Vec::new(),
            open_conflicts: Vec::new(),
            index: Index::default(),
            fold: None,
            keys_canonical: Some(true),
            journal: None,
        }
    }

    /// The entity's type.
    pub fn entity_type(&self) -> &str {
        &self.entity_type
    }

    /// The entity's id.
    pub fn entity_id(&self) -> &str {
        &self.entity_id
    }

    /// The current value.
    pub fn value(&self) -> &EntityValue {
        &self.value
    }

    /// The version the owner gave the last change (the tenant counter on the server).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Records the version of the latest change.
    pub fn set_version(&mut self, version: u64) {
        self.version = version;
    }

    /// The merged clock of every operation seen.
    pub fn clock(&self) -> &VectorClock {
        &self.clock
    }

    /// Open MANUAL conflicts, oldest first.
    pub fn open_conflicts(&self) -> &[Conflict] {
        &self.open_conflicts
    }

    /// How many operations are retained.
    pub fn history_len(&self) -> usize {
        self.history.len()
    }

    /// The retained operations in the order they take effect, with their keys and
    /// whether an open MANUAL conflict holds them out of the value.
    pub fn operations(&self) -> impl Iterator<Item = (OpKey, &Operation, bool)> {
        self.history.iter().map(|l| (l.op_key(), &*l.op, l.held))
    }

    /// True when `operation_id` was seen and is still retained.
    pub fn has_seen(&self, operation_id: &str) -> bool {
        self.index.find_id(operation_id).is_some()
    }

    /// Starts a batch: until [`Self::commit`], [`Self::rollback`] can undo every change.
    pub(crate) fn begin(&mut self) {
        let head = self.fold.as_ref().and_then(|fold| self.head(fold));
        let rebuildable = head.is_some_and(|head| Arc::ptr_eq(head, &self.value));
        self.journal = Some(Box::new(Journal {
            value: (!rebuildable).then(|| self.value.clone()),
            clock: self.clock.clone(),
            base: self.base.clone(),
            base_clock: self.base_clock.clone(),
            base_time: self.base_time,
            open_conflicts: self.open_conflicts.clone(),
            keys_canonical: self.keys_canonical,
            from: self.history.len(),
            saved: Vec::new(),
            reindex: false,
        }));
    }

    /// Ends a batch, keeping its changes; whether the value differs from the value
    /// before it.
    pub(crate) fn commit(&mut self) -> bool {
        let Some(j) = self.journal.take() else {
            return false;
        };
        let j = *j;
        match j.value {
            Some(before) => !Arc::ptr_eq(&before, &self.value) && *before != *self.value,
            None => self.changed_since(j.from),
        }
    }

    /// Whether the value differs from the fold's state after `history[from - 1]` (the
    /// base when `from` is 0): the value before a batch whose operations, from `from`
    /// on, were all appended. When they all patched in place (or were held), only the
    /// fields they patched are compared, each with itself before its first patch.
    fn changed_since(&self, from: usize) -> bool {
        let Some(fold) = &self.fold else {
            return true; // cannot happen: a batch without a fold keeps its value
        };
        let n = fold.entries.len().min(self.history.len());
        if from >= n {
            return false;
        }
        let patched = (from..n).all(|k| self.history[k].held || fold.entries[k].undo.is_some());
        if !patched {
            let before = self.state_before(fold, from);
            return !Arc::ptr_eq(&before, &self.value) && *before != *self.value;
        }
        // Patched in place (or held, which changes nothing).
        let mut patches = (from..n).filter(|&k| fold.entries[k].undo.is_some());
        if patches.next().is_none() {
            return false;
        }
        let Value::Object(map) = &self.value.data else {
            return true; // cannot happen: patched in place, an object
        };
        // Fields already compared (with the oldest value they had): a list, since a
        // batch patches an entity a few times at most. Not needed for one patch (a
        // payload names each field once).
        let several = patches.next().is_some();
        let mut compared: Vec<&str> = Vec::new();
        for k in from..n {
            let (Some(olds), Value::Object(patch)) =
                (&fold.entries[k].undo, &self.history[k].op.payload)
            else {
                continue;
            };
            for ((field, _), old) in patch.iter().zip(olds) {
                if several {
                    if compared.contains(&field.as_str()) {
                        continue;
                    }
                    compared.push(field);
                }
                if map.get(field.as_str()) != old.as_ref() {
                    return true;
                }
            }
        }
        false
    }

    /// Ends a batch, undoing its changes: the state is again as at [`Self::begin`].
    pub(crate) fn rollback(&mut self) {
        let Some(j) = self.journal.take() else {
            return;
        };
        let j = *j;
        let only_appended = j.saved.is_empty() && !j.reindex;
        // The value before, from the fold if the journal did not keep it (then the batch
        // only appended): rebuilt before the entries it is rebuilt from go.
        // The state of the entry that is last again, while the entries after it (and
        // the operations their undos name) are still there.
        let head = match (&self.fold, j.from.checked_sub(1)) {
            (Some(fold), Some(last)) if only_appended && last < fold.entries.len() => {
                Some(self.fold_state(fold, last))
            }
            _ => None,
        };
        // The value before, from the fold if the journal did not keep it (then the batch
        // only appended): the head itself, one rebuilt state for both, so that the value
        // is again the fold's head (the in-place path needs them to be one).
        let before = match (&j.value, &head) {
            (Some(value), _) => value.clone(),
            (None, Some(head)) => head.clone(),
            (None, None) => match &self.fold {
                Some(fold) => self.state_before(fold, j.from),
                None => self.value.clone(), // cannot happen: see `keep_value_before`
            },
        };
        // Every operation the batch added sits at `from` or after (one placed before
        // it first moved `from` there): out of the indexes with the rest of the tail,
        // and the saved tail back in. (Not a list of the added ones: that was an
        // allocation per entity and request, for a rollback that rarely comes.)
        if !j.reindex {
            for l in &self.history[j.from.min(self.history.len())..] {
                self.index.remove(&l.op);
            }
            for l in &j.saved {
                self.index.insert(&l.op);
            }
        }
        self.history.truncate(j.from);
        self.history.extend(j.saved);
        if j.reindex {
            self.index = Index::build(&self.history);
        }
        // Entries before `from` were computed over the same operations; past it the
        // cache is dropped (rebuilt when next needed). The new last entry keeps its
        // state (the head): the entry after it, whose undo could rebuild it, goes.
        match &mut self.fold {
            Some(fold) if only_appended => {
                fold.entries.truncate(j.from);
                if let (Some(last), Some(head)) = (fold.entries.last_mut(), head) {
                    last.state = Some(head);
                }
            }
            _ => self.fold = None,
        }
        self.value = before;
        self.clock = j.clock;
        self.base = j.base;
        self.base_clock = j.base_clock;
        self.base_time = j.base_time;
        self.open_conflicts = j.open_conflicts;
        self.keys_canonical = j.keys_canonical;
    }

    /// The fold's head: the state after its last entry (the base when it has none).
    /// `None` only if the last entry did not keep its state, which the fold never
    /// allows.
    fn head<'a>(&'a self, fold: &'a Fold) -> Option<&'a Arc<EntityValue>> {
        match fold.entries.last() {
            Some(last) => last.state.as_ref(),
            None => Some(&self.base),
        }
    }

    /// The fold's state after `history[i]`: kept, or rebuilt from the next kept state
    /// by undoing the in-place patches in between (one copy, then field moves: the cost
    /// grows with the operations after `i`, not with the history).
    fn fold_state(&self, fold: &Fold, i: usize) -> Arc<EntityValue> {
        if let Some(state) = fold.entries.get(i).and_then(|e| e.state.as_ref()) {
            return state.clone();
        }
        let kept = (i.saturating_add(1)..fold.entries.len())
            .find_map(|j| fold.entries[j].state.as_ref().map(|state| (j, state)));
        let Some((j, state)) = kept else {
            debug_assert!(false, "the fold's last entry keeps its state");
            return self.value.clone();
        };
        let mut value = EntityValue::clone(state);
        for k in (i.saturating_add(1)..=j).rev() {
            self.undo_entry(fold, k, &mut value);
        }
        Arc::new(value)
    }

    /// Turns the state after `history[k]` into the state before it, by the entry's undo
    /// record (nothing when it has none: its state is kept, not patched).
    fn undo_entry(&self, fold: &Fold, k: usize, value: &mut EntityValue) {
        if let (Some(olds), Some(l)) = (
            fold.entries.get(k).and_then(|e| e.undo.as_ref()),
            self.history.get(k),
        ) {
            undo_patch(value, &l.op, olds);
        }
    }

    /// The fold's state before `history[at]`: after `history[at - 1]`, or the base.
    fn state_before(&self, fold: &Fold, at: usize) -> Arc<EntityValue> {
        match at.checked_sub(1) {
            Some(i) => self.fold_state(fold, i),
            None => self.base.clone(),
        }
    }

    /// Makes entry `i` keep its state, before the entries after it (whose undos can
    /// rebuild it) are replaced or dropped.
    fn keep_state(&mut self, i: usize) {
        let Some(fold) = &self.fold else {
            return;
        };
        if fold.entries.get(i).is_none_or(|e| e.state.is_some()) {
            return;
        }
        let state = self.fold_state(fold, i);
        if let Some(entry) = self.fold.as_mut().and_then(|f| f.entries.get_mut(i)) {
            entry.state = Some(state);
        }
    }

    /// Makes every entry keep its state (before a compaction, which reads them all).
    fn densify(&mut self) {
        let Some(fold) = &self.fold else {
            return;
        };
        if fold.entries.iter().all(|e| e.state.is_some()) {
            return;
        }
        // From the head back: each state not kept is the next one with its undo.
        let mut states: Vec<Arc<EntityValue>> = Vec::with_capacity(fold.entries.len());
        let mut next: Option<Arc<EntityValue>> = None;
        for k in (0..fold.entries.len()).rev() {
            let state = match (&fold.entries[k].state, &next) {
                (Some(state), _) => state.clone(),
                (None, Some(after)) => {
                    let mut value = EntityValue::clone(after);
                    self.undo_entry(fold, k + 1, &mut value);
                    Arc::new(value)
                }
                (None, None) => break, // cannot happen: the last entry keeps its state
            };
            next = Some(state.clone());
            states.push(state);
        }
        let Some(fold) = self.fold.as_mut() else {
            return;
        };
        if states.len() != fold.entries.len() {
            debug_assert!(false, "the fold's last entry keeps its state");
            self.fold = None;
            return;
        }
        for (entry, state) in fold.entries.iter_mut().zip(states.into_iter().rev()) {
            entry.state = Some(state);
            entry.undo = None;
        }
    }

    /// Before a change that the fold cannot undo (a change of the history before its
    /// end, a compaction, dropping the fold): the batch's journal keeps the value
    /// before the batch, if it did not yet.
    fn keep_value_before(&mut self) {
        let Some(j) = &self.journal else {
            return;
        };
        if j.value.is_some() {
            return;
        }
        // Rebuilt into the fold's entry too, so that the journal and the fold hold one
        // state (a rollback makes it the value and the head again).
        if let Some(last) = j.from.checked_sub(1) {
            self.keep_state(last);
        }
        let Some(j) = &self.journal else {
            return;
        };
        let before = match &self.fold {
            Some(fold) => self.state_before(fold, j.from),
            None => self.value.clone(), // cannot happen: a rebuildable value needs the fold
        };
        if let Some(j) = self.journal.as_mut() {
            j.value = Some(before);
        }
    }

    /// The usual step, without copying the value: an UPDATE whose payload is an
    /// object, appended last, that saw every applied operation, by a strategy whose
    /// step is then a plain merge patch (LAST_WRITE_WINS, FIELD_LEVEL_MERGE, MANUAL),
    /// on a live object that is the fold's head. The value is patched in place, and the
    /// fold keeps the fields it replaced instead of the state before. False (and
    /// nothing changed) when that does not apply.
    /// `saw_all`: the operation's clock descends from every clock seen (the caller
    /// checked it), so from every applied one too.
    fn patch_last(&mut self, logged: &LoggedOp, saw_all: bool) -> bool {
        let op = &logged.op;
        if logged.held
            || logged.strategy == ResolutionStrategy::CustomMerge
            || op.operation_type != OperationType::Update
            || !op.payload.is_object()
            || self.value.deleted
            || !self.value.data.is_object()
        {
            return false;
        }
        let Some(fold) = &self.fold else {
            return false;
        };
        if !self
            .head(fold)
            .is_some_and(|head| Arc::ptr_eq(head, &self.value))
        {
            return false;
        }
        // Concurrent with an earlier applied operation, it keeps what its author saw
        // (the state before it): that is the copying path. (Usually known already: an
        // operation that saw everything seen is concurrent with nothing.)
        if !saw_all {
            let last_applied = self.history.iter().rposition(|l| !l.held);
            if !op
                .vector_clock
                .descends_from(self.applied_through(last_applied, &fold.entries))
            {
                return false;
            }
        }
        let Some(fold) = self.fold.as_mut() else {
            return false;
        };
        // The state before is now this entry's undo applied to the state after. (Not
        // for a held entry: it shares the state before it, and a compaction's reuse of
        // unchanged steps compares states by identity; the patch then copies the value.)
        if let Some(last) = fold.entries.last_mut()
            && self.history.last().is_some_and(|l| !l.held)
        {
            last.state = None;
        }
        let olds = patch_in_place(Arc::make_mut(&mut self.value), op);
        fold.entries.push(FoldEntry {
            state: Some(self.value.clone()),
            undo: Some(olds),
            concurrent: None,
        });
        true
    }

    /// Applies one operation (see the module docs). On error nothing changed.
    pub(crate) fn apply(
        &mut self,
        shared: &Arc<Operation>,
        ctx: &StepContext<'_>,
    ) -> Result<Outcome, ApplyError> {
        let op: &Operation = shared;
        op.validate().map_err(|error| ApplyError::Invalid {
            operation_id: op.operation_id.clone(),
            error,
        })?;
        if op.entity_type != self.entity_type || op.entity_id != self.entity_id {
            return Err(ApplyError::WrongEntity {
                operation_id: op.operation_id.clone(),
                expected: format!("{}/{}", self.entity_type, self.entity_id),
                found: format!("{}/{}", op.entity_type, op.entity_id),
            });
        }
        if ctx.strategy == ResolutionStrategy::CustomMerge && ctx.merge.is_none() {
            return Err(ApplyError::NoMergeFunction {
                entity_type: self.entity_type.clone(),
            });
        }
        self.check_fold_merge(ctx.merge);
        // Seen before: by id while retained; by clock once compacted (an operation the
        // compacted history dominates was part of it).
        if self.has_seen(&op.operation_id)
            || (!self.base_clock.is_empty() && self.base_clock.descends_from(&op.vector_clock))
        {
            // A resent operation that an open MANUAL conflict holds is still held.
            let open = self.open_conflicts.iter().find(|c| {
                c.operations
                    .first()
                    .is_some_and(|o| o.operation_id == op.operation_id)
            });
            return Ok(match open {
                Some(conflict) => Outcome::Held(conflict.clone()),
                None => Outcome::Duplicate,
            });
        }
        if let Some(other) = self.index.find_clock(&op.vector_clock) {
            return Err(ApplyError::ClockReused {
                operation_id: op.operation_id.clone(),
                other: other.operation_id.clone(),
            });
        }

        // The usual case: the operation saw everything retained, so it sorts last and
        // follows the last applied operation.
        let in_order = op.vector_clock.descends_from(&self.clock);
        let scan = if in_order {
            Scan {
                follows_last_applied: true,
                ..Scan::default()
            }
        } else {
            self.scan(&op.vector_clock)
        };
        // The applied operation it is concurrent with (the greatest, if several).
        let rival = scan.rival.map(|i| self.history[i].op.clone());
        let held = rival.is_some() && ctx.strategy == ResolutionStrategy::Manual;
        let has_successor = scan.first_successor.is_some();
        let key = if in_order {
            self.key_after_all(op)
        } else {
            self.key_for(op, scan.pred)
        };
        let logged = Arc::new(LoggedOp {
            key,
            strategy: ctx.strategy,
            held,
            op: shared.clone(),
        });
        let fast = !has_successor
            && scan.follows_last_applied
            && self.history.last().is_none_or(|l| l.order(&logged).is_lt());
        if fast {
            self.apply_last(logged, rival.is_some(), in_order, ctx)?;
        } else {
            self.insert(logged, scan.first_successor, ctx)?;
        }
        self.clock.merge(&op.vector_clock);

        // A MANUAL conflict is settled once an applied operation dominates both sides.
        // The held side stays out of the value: the settling operation chose for it.
        if !held {
            self.open_conflicts.retain(|c| {
                !c.operations
                    .iter()
                    .all(|o| op.vector_clock.descends_from(&o.vector_clock))
            });
        }
        let outcome = match rival {
            None => Outcome::Applied,
            Some(rival) => {
                let conflict = Conflict {
                    conflict_id: conflict_id(&op.operation_id, &rival.operation_id),
                    entity_type: self.entity_type.clone(),
                    entity_id: self.entity_id.clone(),
                    operations: vec![op.clone(), (*rival).clone()],
                    detected_at: ctx.now,
                    resolution: (!held).then(|| ConflictResolution {
                        strategy: ctx.strategy,
                        resolved_at: ctx.now,
                        resolved_by: None,
                        result: self.value.data.clone(),
                        metadata: None,
                    }),
                };
                if held {
                    self.open_conflicts.push(conflict.clone());
                    Outcome::Held(conflict)
                } else {
                    Outcome::Resolved(conflict)
                }
            }
        };
        // After the conflict is recorded, so that a just-held operation is kept.
        self.compact(ctx);
        Ok(outcome)
    }

    /// Keeps the fold cache only if it was computed with `merge`; starts one for an
    /// empty history.
    fn check_fold_merge(&mut self, merge: Option<&Arc<dyn CustomMerge>>) {
        let same = |cached: Option<&Arc<dyn CustomMerge>>| match (cached, merge) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        if self.history.is_empty() {
            self.fold = Some(Fold {
                merge: merge.cloned(),
                entries: Vec::new(),
            });
        } else if self.fold.as_ref().is_some_and(|f| !same(f.merge.as_ref())) {
            self.keep_value_before();
            self.fold = None;
        }
    }

    /// Walks back from the newest operation to find `clock`'s rival, greatest
    /// predecessor and first successor. Successors all sort after the greatest
    /// predecessor (keys extend causality), so the walk ends there once the rival is
    /// found, or once it passes an applied predecessor that saw everything applied
    /// before it (no earlier applied operation is then concurrent with `clock`).
    fn scan(&self, clock: &VectorClock) -> Scan {
        let mut scan = Scan {
            follows_last_applied: true,
            ..Scan::default()
        };
        let mut met_applied = false;
        let mut no_rival_before = false;
        for (i, l) in self.history.iter().enumerate().rev() {
            let ordering = l.op.vector_clock.compare(clock);
            if !l.held && !met_applied {
                met_applied = true;
                scan.follows_last_applied =
                    matches!(ordering, ClockOrdering::Before | ClockOrdering::Equal);
            }
            match ordering {
                ClockOrdering::Before => {
                    scan.pred.get_or_insert(i);
                    if !l.held
                        && self
                            .fold
                            .as_ref()
                            .is_some_and(|f| f.entries[i].concurrent.is_none())
                    {
                        no_rival_before = true;
                    }
                }
                ClockOrdering::After => scan.first_successor = Some(i),
                ClockOrdering::Concurrent if !l.held => {
                    scan.rival.get_or_insert(i);
                }
                ClockOrdering::Concurrent | ClockOrdering::Equal => {}
            }
            if scan.pred.is_some() && (scan.rival.is_some() || no_rival_before) {
                break;
            }
        }
        scan
    }

    /// The key of an operation that descends from every retained one: its effective
    /// time is at least the greatest so far (the last key's, or the compacted base's).
    fn key_after_all(&self, op: &Operation) -> Key {
        let effective = self
            .history
            .last()
            .map(|l| l.key.effective_time)
            .into_iter()
            .chain(self.base_time)
            .fold(op.timestamp, Timestamp::max);
        Key {
            effective_time: effective,
            depth: op.vector_clock.depth(),
        }
    }

    /// The key of `op`, whose greatest retained predecessor is `pred`: its timestamp
    /// raised to the effective time of every operation it follows. Effective times
    /// grow along the history, so the greatest predecessor's is the greatest of them.
    fn key_for(&self, op: &Operation, pred: Option<usize>) -> Key {
        let base = self
            .base_time
            .filter(|_| op.vector_clock.descends_from(&self.base_clock));
        let effective = pred
            .map(|i| self.history[i].key.effective_time)
            .into_iter()
            .chain(base)
            .fold(op.timestamp, Timestamp::max);
        Key {
            effective_time: effective,
            depth: op.vector_clock.depth(),
        }
    }

    /// Appends an operation that sorts last and saw the last applied one (`saw_all`:
    /// and every operation seen).
    fn apply_last(
        &mut self,
        logged: Arc<LoggedOp>,
        rival: bool,
        saw_all: bool,
        ctx: &StepContext<'_>,
    ) -> Result<(), ApplyError> {
        if self.patch_last(&logged, saw_all) {
            self.index.insert(&logged.op);
            self.history.push(logged);
            return Ok(());
        }
        let value = if logged.held {
            None
        } else {
            let merge = ctx
                .merge
                .filter(|_| ctx.strategy == ResolutionStrategy::CustomMerge);
            Some(Arc::new(step(
                &self.value,
                &self.value,
                &logged,
                rival,
                merge,
            )?))
        };
        let entry = self
            .fold
            .as_ref()
            .and_then(|fold| self.last_entry(fold, &logged, rival, value.as_ref(), ctx));
        match (self.fold.as_mut(), entry) {
            (Some(fold), Some(entry)) => fold.entries.push(entry),
            (None, _) => {}
            (Some(_), None) => {
                self.keep_value_before();
                self.fold = None;
            }
        }
        self.index.insert(&logged.op);
        self.history.push(logged);
        if let Some(value) = value {
            self.value = value;
        }
        Ok(())
    }

    /// The fold's entry for `logged` appended last: usually the new value itself.
    /// `None` when the fold cannot be extended (then it is dropped).
    fn last_entry(
        &self,
        fold: &Fold,
        logged: &LoggedOp,
        rival: bool,
        value: Option<&Arc<EntityValue>>,
        ctx: &StepContext<'_>,
    ) -> Option<FoldEntry> {
        let current = self.head(fold)?;
        if logged.held {
            return Some(FoldEntry::kept(current.clone(), None));
        }
        let n = self.history.len();
        let last_applied = (0..n).rev().find(|&j| !self.history[j].held);
        let applied = self.applied_through(last_applied, &fold.entries);
        let clock = &logged.op.vector_clock;
        let concurrent = !clock.descends_from(applied);
        // Its parent is the last applied operation (it saw it), whose state is the
        // current one: the fast path computed the same step unless it passed another
        // `concurrent` to a merge function or its value is not the fold's.
        let state = match value {
            Some(value)
                if Arc::ptr_eq(&self.value, current)
                    && (concurrent == rival
                        || logged.strategy != ResolutionStrategy::CustomMerge) =>
            {
                value.clone()
            }
            _ => Arc::new(step(current, current, logged, concurrent, ctx.merge).ok()?),
        };
        Some(FoldEntry::kept(
            state,
            concurrent.then(|| {
                Box::new(Concurrent {
                    applied: applied.merged(clock),
                    seen: current.clone(),
                })
            }),
        ))
    }

    /// The merged clock of the base and every applied operation up to `last_applied`.
    fn applied_through<'a>(
        &'a self,
        last_applied: Option<usize>,
        entries: &'a [FoldEntry],
    ) -> &'a VectorClock {
        match last_applied {
            None => &self.base_clock,
            Some(q) => match &entries[q].concurrent {
                Some(c) => &c.applied,
                None => &self.history[q].op.vector_clock,
            },
        }
    }

    /// Inserts an operation that does not simply go last: re-keys its successors (if
    /// it arrived after them) and refolds from the first place that changed.
    fn insert(
        &mut self,
        logged: Arc<LoggedOp>,
        first_successor: Option<usize>,
        ctx: &StepContext<'_>,
    ) -> Result<(), ApplyError> {
        // It may change the history before the batch's first operation: the journal
        // keeps the value before the batch.
        self.keep_value_before();
        let pos = self.history.partition_point(|l| l.order(&logged).is_lt());
        let has_successor = first_successor.is_some();
        let mut start = first_successor.map_or(pos, |s| s.min(pos));
        let mut tail: Vec<Arc<LoggedOp>> = Vec::with_capacity(self.history.len() - start + 1);
        tail.extend_from_slice(&self.history[start..pos]);
        tail.push(logged.clone());
        tail.extend_from_slice(&self.history[pos..]);
        let mut keys_canonical = self.keys_canonical;
        if has_successor {
            if self.keys_canonical() {
                // Only its successors' effective times change: they rise to its own.
                let effective = logged.key.effective_time;
                let clock = &logged.op.vector_clock;
                for l in &mut tail {
                    if l.key.effective_time < effective
                        && clock.compare(&l.op.vector_clock) == ClockOrdering::Before
                    {
                        Arc::make_mut(l).key.effective_time = effective;
                    }
                }
                tail.sort_by(|a, b| a.order(b));
            } else {
                let mut all = self.history[..start].to_vec();
                all.append(&mut tail);
                tail = all;
                start = 0;
                self.rekey_all(&mut tail);
                keys_canonical = Some(true);
            }
        }
        let refold = !logged.held || has_successor;
        if refold && self.fold.is_none() {
            let mut all = self.history[..start].to_vec();
            all.append(&mut tail);
            tail = all;
            start = 0;
        }
        // The entry before the new ones keeps its state (the fold reads it, and the
        // entry after it, whose undo could rebuild it, is replaced).
        if let Some(last_kept) = start.checked_sub(1) {
            self.keep_state(last_kept);
        }
        let entries = match &self.fold {
            Some(fold) if refold => Some(self.fold_tail(
                &self.history[..start],
                &fold.entries[..start],
                &tail,
                ctx.merge,
                None,
            )?),
            Some(fold) => {
                // A held operation without successors changes no other step: it
                // repeats the state before it.
                let before = self.state_before(fold, start);
                let mut entries = Vec::with_capacity(fold.entries.len() - start + 1);
                entries.push(FoldEntry::kept(before, None));
                entries.extend_from_slice(&fold.entries[start..]);
                Some(entries)
            }
            None if refold => Some(self.fold_tail(&[], &[], &tail, ctx.merge, None)?),
            None => None,
        };

        self.save_tail(start);
        self.history.truncate(start);
        self.history.append(&mut tail);
        match entries {
            Some(mut entries) => {
                let fold = self.fold.get_or_insert_with(|| Fold {
                    merge: ctx.merge.cloned(),
                    entries: Vec::new(),
                });
                fold.entries.truncate(start);
                fold.entries.append(&mut entries);
                if refold {
                    self.value = match fold.entries.last() {
                        Some(last) => last.state.clone().unwrap_or_else(|| self.value.clone()),
                        None => self.base.clone(),
                    };
                }
            }
            None => self.fold = None,
        }
        self.keys_canonical = keys_canonical;
        self.index.insert(&logged.op);
        Ok(())
    }

    /// Before the history changes from `start` on: saves what the batch's journal
    /// does not have yet.
    fn save_tail(&mut self, start: usize) {
        if let Some(j) = self.journal.as_mut()
            && start < j.from
        {
            let mut saved = self.history[start..j.from].to_vec();
            saved.append(&mut j.saved);
            j.saved = saved;
            j.from = start;
        }
    }

    /// Whether every retained key is what [`Self::rekey_all`] would compute: each
    /// effective time is the operation's timestamp raised to its greatest
    /// predecessor's (and the base's, when it follows the base). Checked once after a
    /// load or a compaction, then kept up to date.
    fn keys_canonical(&mut self) -> bool {
        if let Some(known) = self.keys_canonical {
            return known;
        }
        let h = &self.history;
        let canonical = (0..h.len()).all(|i| {
            let clock = &h[i].op.vector_clock;
            let pred = (0..i)
                .rev()
                .find(|&j| h[j].op.vector_clock.compare(clock) == ClockOrdering::Before);
            let base = self
                .base_time
                .filter(|_| clock.descends_from(&self.base_clock));
            let effective = pred
                .map(|j| h[j].key.effective_time)
                .into_iter()
                .chain(base)
                .fold(h[i].op.timestamp, Timestamp::max);
            effective == h[i].key.effective_time
        });
        self.keys_canonical = Some(canonical);
        canonical
    }

    /// Recomputes every key of `history` (in causal-depth order, so that predecessors
    /// are keyed first) and re-sorts it: the engine's original re-keying, for keys not
    /// known to be canonical.
    fn rekey_all(&self, history: &mut [Arc<LoggedOp>]) {
        history.sort_by(|a, b| a.key.depth.cmp(&b.key.depth).then(a.order(b)));
        for i in 0..history.len() {
            let clock = &history[i].op.vector_clock;
            let base = self
                .base_time
                .filter(|_| clock.descends_from(&self.base_clock));
            let effective = history[..i]
                .iter()
                .filter(|l| l.op.vector_clock.compare(clock) == ClockOrdering::Before)
                .map(|l| l.key.effective_time)
                .chain(base)
                .fold(history[i].op.timestamp, Timestamp::max);
            if history[i].key.effective_time != effective {
                Arc::make_mut(&mut history[i]).key.effective_time = effective;
            }
        }
        history.sort_by(|a, b| a.order(b));
    }

    /// The fold's entries for `tail`, which follows `prefix` (whose entries are
    /// `done`): each applied operation's strategy step on the state before it, given
    /// the state its author saw (its parent's). `hints` (one per tail operation) are
    /// steps known from before a compaction: a step with the same inputs keeps its
    /// state instead of being run again.
    fn fold_tail(
        &self,
        prefix: &[Arc<LoggedOp>],
        done: &[FoldEntry],
        tail: &[Arc<LoggedOp>],
        merge: Option<&Arc<dyn CustomMerge>>,
        hints: Option<&[Option<Hint>]>,
    ) -> Result<Vec<FoldEntry>, ApplyError> {
        let start = prefix.len();
        let op_at = |i: usize| {
            if i < start {
                &prefix[i]
            } else {
                &tail[i - start]
            }
        };
        let mut out: Vec<FoldEntry> = Vec::with_capacity(tail.len());
        // The prefix's entries are the fold's (`done` is the start of them): their
        // states, kept or rebuilt.
        let prefix_state = |j: usize| match &self.fold {
            Some(fold) if j < done.len() => self.fold_state(fold, j),
            _ => self.base.clone(), // cannot happen: `done` is the fold's
        };
        let mut current = start
            .checked_sub(1)
            .map_or_else(|| self.base.clone(), prefix_state);
        let mut last_applied = (0..start).rev().find(|&j| !prefix[j].held);
        for (k, l) in tail.iter().enumerate() {
            let i = start + k;
            if l.held {
                out.push(FoldEntry::kept(current.clone(), None));
                continue;
            }
            // After a compaction, an operation that saw everything applied before it
            // still does (it saw every removed one), so it still follows the last
            // applied operation: with the same state before it, its step is the same.
            if let Some(h) = hints.and_then(|h| h[k].as_ref())
                && !h.concurrent
                && Arc::ptr_eq(&h.current, &current)
            {
                current = h.state.clone();
                out.push(FoldEntry::kept(h.state.clone(), None));
                last_applied = Some(i);
                continue;
            }
            let clock = &l.op.vector_clock;
            let entry_at = |j: usize| if j < start { &done[j] } else { &out[j - start] };
            let applied = match last_applied {
                None => &self.base_clock,
                Some(q) => match &entry_at(q).concurrent {
                    Some(c) => &c.applied,
                    None => &op_at(q).op.vector_clock,
                },
            };
            // Earlier operations in key order are never causally after this one, so
            // it is concurrent with one of them exactly when it misses part of their
            // merged clock.
            let concurrent = !clock.descends_from(applied);
            // Parent: the greatest applied operation this one causally follows.
            let parent = if concurrent {
                (0..i).rev().find(|&j| {
                    let o = op_at(j);
                    !o.held && clock.descends_from(&o.op.vector_clock)
                })
            } else {
                last_applied
            };
            let seen = match parent {
                None => self.base.clone(),
                Some(j) if j < start => prefix_state(j),
                Some(j) => out[j - start]
                    .state
                    .clone()
                    .unwrap_or_else(|| current.clone()),
            };
            let applied_after = concurrent.then(|| applied.merged(clock));
            let hint = hints.and_then(|h| h[k].as_ref()).filter(|h| {
                Arc::ptr_eq(&h.current, &current)
                    && Arc::ptr_eq(&h.seen, &seen)
                    && h.concurrent == concurrent
            });
            let state = match hint {
                Some(h) => h.state.clone(),
                None => Arc::new(step(&current, &seen, l, concurrent, merge)?),
            };
            current = state.clone();
            out.push(FoldEntry::kept(
                state,
                applied_after.map(|applied| Box::new(Concurrent { applied, seen })),
            ));
            last_applied = Some(i);
        }
        Ok(out)
    }

    /// Moves the oldest operations into the base once the history is longer than
    /// `max_history` (down to three quarters of it, so the cost is amortised). Held
    /// operations of open conflicts stay. Past that horizon an old, concurrent
    /// operation is treated as if it had seen the compacted ones (docs/protocol.md).
    fn compact(&mut self, ctx: &StepContext<'_>) {
        let max = ctx.max_history.max(4);
        if self.history.len() <= max {
            return;
        }
        if self.fold.is_none() {
            match self.fold_tail(&[], &[], &self.history, ctx.merge, None) {
                Ok(entries) => {
                    self.fold = Some(Fold {
                        merge: ctx.merge.cloned(),
                        entries,
                    });
                }
                // Cannot happen for a deterministic merge (the same steps succeeded when
                // the operations were applied); keeping everything is always safe.
                Err(_) => return,
            }
        }
        let open: HashSet<&str> = self
            .open_conflicts
            .iter()
            .flat_map(|c| c.operations.iter().map(|o| o.operation_id.as_str()))
            .collect();
        // Remove the `excess` oldest removable operations, but only as far as every
        // operation kept (and applied) saw all removed ones: then each kept operation's
        // parent is kept or is the last removed, whose state becomes the base. Removing
        // fewer is always safe.
        // The last applied operation stays too: a later concurrent one must find its rival.
        let last_applied = self.history.iter().rposition(|l| !l.held);
        let removable: Vec<bool> = self
            .history
            .iter()
            .enumerate()
            .map(|(i, l)| {
                Some(i) != last_applied && !(l.held && open.contains(l.op.operation_id.as_str()))
            })
            .collect();
        drop(open);
        let excess = self.removable_count(&removable, self.history.len() - max * 3 / 4);
        if excess == 0 {
            return;
        }
        // It reads every state and rebuilds the fold: the batch's journal keeps the
        // value before, and every entry its state.
        self.keep_value_before();
        self.densify();
        let Some(states) = self.fold.as_ref().and_then(|fold| {
            fold.entries
                .iter()
                .map(|e| e.state.clone())
                .collect::<Option<Vec<_>>>()
        }) else {
            return; // cannot happen after `densify`; keeping everything is safe
        };
        self.save_tail(0);
        if let Some(j) = self.journal.as_mut() {
            j.reindex = true;
        }
        let Some(fold) = self.fold.take() else {
            return;
        };
        let history = std::mem::take(&mut self.history);
        let mut left = excess;
        let mut last_removed = None;
        let mut kept = Vec::with_capacity(max);
        let mut hints = Vec::with_capacity(max);
        for (i, (l, r)) in history.into_iter().zip(removable).enumerate() {
            if left > 0 && r {
                left -= 1;
                if !l.held {
                    last_removed = Some(i);
                }
                self.base_clock.merge(&l.op.vector_clock);
                if self.base_time.is_none_or(|t| t < l.key.effective_time) {
                    self.base_time = Some(l.key.effective_time);
                }
                self.index.remove(&l.op);
            } else {
                let current = i.checked_sub(1).map_or(&self.base, |p| &states[p]);
                let entry = &fold.entries[i];
                hints.push((!l.held).then(|| {
                    Hint {
                        current: current.clone(),
                        seen: entry
                            .concurrent
                            .as_ref()
                            .map_or_else(|| current.clone(), |c| c.seen.clone()),
                        concurrent: entry.concurrent.is_some(),
                        state: states[i].clone(),
                    }
                }));
                kept.push(l);
            }
        }
        self.history = kept;
        if let Some(i) = last_removed {
            self.base = states[i].clone();
        }
        self.fold = self
            .fold_tail(&[], &[], &self.history, ctx.merge, Some(&hints))
            .ok()
            .map(|entries| Fold {
                merge: ctx.merge.cloned(),
                entries,
            });
        // Keys of kept operations that did not see every removed one may no longer be
        // what a re-keying computes: checked when next needed.
        self.keys_canonical = None;
    }

    /// How many of the removable operations (in order) a compaction removes: the
    /// greatest count up to `excess` such that every kept applied operation saw every
    /// removed one.
    fn removable_count(&self, removable: &[bool], excess: usize) -> usize {
        // Usually every kept operation saw the oldest `excess`: one pass.
        if self.seen_by_all_kept(removable, excess) {
            return excess;
        }
        // Otherwise fewer. Removing the first `e` removable ones is allowed when the
        // entry-wise minimum of the kept applied clocks is at least the merge of the
        // removed clocks: prefix merges and a running minimum, from the greatest `e` down.
        let positions: Vec<usize> = (0..removable.len()).filter(|&i| removable[i]).collect();
        let top = excess.min(positions.len()).saturating_sub(1);
        if top == 0 {
            return 0;
        }
        let mut prefix: Vec<VectorClock> = Vec::with_capacity(top + 1);
        let mut merged = VectorClock::new();
        prefix.push(merged.clone());
        for &p in &positions[..top] {
            merged.merge(&self.history[p].op.vector_clock);
            prefix.push(merged.clone());
        }
        // Kept when `top` are removed: applied operations not among the first `top`.
        let mut minimum: Option<Vec<(&str, u64)>> = None;
        let first_kept_removable = positions[top];
        for (i, l) in self.history.iter().enumerate() {
            if !l.held && (!removable[i] || i >= first_kept_removable) {
                minimum = Some(entrywise_min(minimum, &l.op.vector_clock));
            }
        }
        for e in (1..=top).rev() {
            let ok = match &minimum {
                None => true,
                Some(min) => prefix[e].iter().all(|(replica, counter)| {
                    min.binary_search_by(|(k, _)| (*k).cmp(replica))
                        .is_ok_and(|i| min[i].1 >= counter)
                }),
            };
            if ok {
                return e;
            }
            // One fewer removed: the `e`-th removable one is kept.
            let l = &self.history[positions[e - 1]];
            if !l.held {
                minimum = Some(entrywise_min(minimum, &l.op.vector_clock));
            }
        }
        0
    }

    /// The compaction check: every kept applied operation saw the first `excess`
    /// removable ones.
    fn seen_by_all_kept(&self, removable: &[bool], excess: usize) -> bool {
        let mut removed_clock = VectorClock::new();
        let mut left = excess;
        for (l, r) in self.history.iter().zip(removable) {
            if left > 0 && *r {
                left -= 1;
                removed_clock.merge(&l.op.vector_clock);
            }
        }
        let mut left = excess;
        self.history.iter().zip(removable).all(|(l, r)| {
            if left > 0 && *r {
                left -= 1;
                true
            } else {
                l.held || l.op.vector_clock.descends_from(&removed_clock)
            }
        })
    }
}

/// The entry-wise minimum of `acc` (`None`: no clock yet) and `clock`, as sorted
/// `(replica, counter)` pairs; a replica missing from either counts 0 and is dropped.
fn entrywise_min<'a>(
    acc: Option<Vec<(&'a str, u64)>>,
    clock: &'a VectorClock,
) -> Vec<(&'a str, u64)> {
    match acc {
        None => clock.iter().collect(),
        Some(acc) => acc
            .into_iter()
            .filter_map(|(replica, counter)| {
                let theirs = clock.get(replica);
                (theirs > 0).then_some((replica, counter.min(theirs)))
            })
            .collect(),
    }
}

/// One fold step: the entity after `l` given the `current` value (after everything
/// before it in key order) and the value its author `seen` (its LWW parent).
fn step(
    current: &EntityValue,
    seen: &EntityValue,
    l: &LoggedOp,
    concurrent: bool,
    merge: Option<&Arc<dyn CustomMerge>>,
) -> Result<EntityValue, ApplyError> {
    match l.strategy {
        ResolutionStrategy::LastWriteWins => Ok(seen.after(&l.op)),
        ResolutionStrategy::Manual => Ok(current.after(&l.op)),
        ResolutionStrategy::FieldLevelMerge => Ok(field_level_step(current, seen, &l.op)),
        ResolutionStrategy::CustomMerge => match merge {
            Some(merge) => Ok(merge.apply(MergeInput {
                current,
                operation: &l.op,
                concurrent,
            })?),
            None => Err(ApplyError::NoMergeFunction {
                entity_type: l.op.entity_type.clone(),
            }),
        },
    }
}

/// FIELD_LEVEL_MERGE: each top-level field of an UPDATE becomes the author's version
/// of that field (its merge patch over the field as the author saw it); every other
/// field stays as it is. CREATE and DELETE change every field.
fn field_level_step(current: &EntityValue, seen: &EntityValue, op: &Operation) -> EntityValue {
    let (OperationType::Update, Value::Object(patch)) = (op.operation_type, &op.payload) else {
        return current.after(op);
    };
    let mut data = match &current.data {
        Value::Object(map) if !current.deleted => map.clone(),
        _ => serde_json::Map::new(),
    };
    let seen_fields = match &seen.data {
        Value::Object(map) if !seen.deleted => Some(map),
        _ => None,
    };
    for (field, change) in patch {
        if change.is_null() {
            data.remove(field);
            continue;
        }
        // A merge patch that is not an object replaces what it patches (RFC 7386):
        // the field as the author saw it is then not copied only to be dropped.
        let value = if change.is_object() {
            let mut value = seen_fields
                .and_then(|m| m.get(field))
                .cloned()
                .unwrap_or(Value::Null);
            merge_patch(&mut value, change);
            value
        } else {
            change.clone()
        };
        // A field the value has is replaced where it is (its name is not copied).
        match data.get_mut(field) {
            Some(slot) => *slot = value,
            None => {
                data.insert(field.clone(), value);
            }
        }
    }
    EntityValue::live(Value::Object(data))
}

/// A conflict's id: the same two operations give the same id on every replica.
pub(crate) fn conflict_id(a: &str, b: &str) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let name = format!("{lo}\u{1f}{hi}");
    uuid::Uuid::new_v5(&CONFLICT_NAMESPACE, name.as_bytes()).to_string()
}

/// Namespace of conflict ids (a fixed random UUID).
const CONFLICT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6f1d_3a4e_9b2c_4d5e_8f70_a1b2_c3d4_e5f6);

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::Value;

    /// Small JSON documents: nested objects over a few names (so that patches meet
    /// fields the document has), nulls, scalars and arrays.
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-3i64..3).prop_map(Value::from),
            "[a-c]{0,2}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::btree_map("[a-d]", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// An UPDATE of `payload` (the other fields do not matter to a patch).
    fn update(payload: Value) -> crate::protocol::Operation {
        crate::protocol::Operation {
            operation_id: "op".into(),
            client_id: "c".into(),
            tenant_id: "t".into(),
            entity_type: "doc".into(),
            entity_id: "d".into(),
            operation_type: crate::protocol::OperationType::Update,
            payload,
            timestamp: chrono::DateTime::UNIX_EPOCH,
            vector_clock: crate::clock::VectorClock::new(),
            metadata: None,
        }
    }

    fn object() -> impl Strategy<Value = Value> {
        prop::collection::btree_map("[a-d]", json(), 0..5)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    }

    proptest! {
        /// A patch in place gives what a patched copy gives, and its undo record puts
        /// the value back exactly (the fold rebuilds states from these records).
        #[test]
        fn a_patch_in_place_and_its_undo_are_exact(doc in object(), patch in object()) {
            let op = update(patch);
            let before = super::EntityValue::live(doc);
            let mut value = before.clone();
            let olds = super::patch_in_place(&mut value, &op);
            prop_assert_eq!(&value, &before.after(&op));
            super::undo_patch(&mut value, &op, &olds);
            prop_assert_eq!(
                serde_json::to_string(&value).unwrap(),
                serde_json::to_string(&before).unwrap()
            );
        }

        /// The engine's merge patch is `json_patch::merge`, field for field.
        #[test]
        fn merge_patch_is_json_patch_merge(doc in json(), patch in json()) {
            let mut ours = doc.clone();
            super::merge_patch(&mut ours, &patch);
            let mut theirs = doc;
            json_patch::merge(&mut theirs, &patch);
            prop_assert_eq!(
                serde_json::to_string(&ours).unwrap(),
                serde_json::to_string(&theirs).unwrap()
            );
        }
    }
}
