//! The reconciliation engine as it was before issue 16, kept unchanged as the reference
//! that the differential test (`core/tests/reconcile_differential.rs`) and the
//! `bench reconcile` group compare the engine with.
//!
//! Only built for tests and with the `reference-engine` feature. Its [`EntityState`]
//! has the same JSON form as [`super::EntityState`]: a state written by either loads
//! in the other. Do not optimise this file: its value is that it is the old code.

#![allow(missing_docs, unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::merge::{CustomMerge, MergeInput};
use super::order::OpKey;
use super::{
    ApplyError, BatchOperation, BatchOutcome, EntityKey, EntityValue, Outcome, Reconciler,
};
use crate::clock::{ClockOrdering, VectorClock};
use crate::protocol::{
    Conflict, ConflictResolution, Operation, OperationType, ResolutionStrategy, Timestamp,
};

/// Applies one operation to its entity's state, as `Reconciler::apply` did.
pub fn apply(
    engine: &Reconciler,
    state: &mut EntityState,
    op: &Operation,
    requested: Option<ResolutionStrategy>,
    now: Timestamp,
) -> Result<Outcome, ApplyError> {
    let ctx = StepContext {
        strategy: engine.strategy_for(&op.entity_type, requested),
        merge: engine.merge_for(&op.entity_type),
        max_history: engine.max_history(),
        now,
    };
    state.apply(op, &ctx)
}

/// Applies `ops` in order, all or nothing, as `Reconciler::apply_batch` did.
pub fn apply_batch<O: BatchOperation>(
    engine: &Reconciler,
    states: &mut BTreeMap<EntityKey, EntityState>,
    ops: &[O],
    requested: Option<ResolutionStrategy>,
    now: Timestamp,
) -> Result<BatchOutcome, ApplyError> {
    let mut out = BatchOutcome::default();
    for op in ops.iter().map(O::operation) {
        if engine.strategy_for(&op.entity_type, requested) == ResolutionStrategy::CustomMerge
            && engine.merge_for(&op.entity_type).is_none()
        {
            return Err(ApplyError::NoMergeFunction {
                entity_type: op.entity_type.clone(),
            });
        }
    }
    let mut before: BTreeMap<EntityKey, EntityValue> = BTreeMap::new();
    let mut work: BTreeMap<EntityKey, EntityState> = BTreeMap::new();
    for given in ops {
        let op = given.operation();
        let key = (op.entity_type.clone(), op.entity_id.clone());
        let state = work.entry(key.clone()).or_insert_with(|| {
            states
                .get(&key)
                .cloned()
                .unwrap_or_else(|| EntityState::new(&op.entity_type, &op.entity_id))
        });
        if !before.contains_key(&key) {
            before.insert(key.clone(), state.value().clone());
        }
        let outcome = apply(engine, state, op, requested, now)?;
        out.touched.insert(key);
        match outcome {
            Outcome::Applied | Outcome::Duplicate => out.resolved_operations.push(given.shared()),
            Outcome::Resolved(conflict) => {
                out.resolved_operations.push(given.shared());
                out.conflicts.push(conflict);
            }
            Outcome::Held(conflict) => out.conflicts.push(conflict),
        }
    }
    states.extend(work);
    for (key, old) in before {
        if states.get(&key).is_some_and(|s| *s.value() != old) {
            out.changed.insert(key);
        }
    }
    Ok(out)
}

/// One retained operation of an entity's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoggedOp {
    key: OpKey,
    /// The strategy it was applied with (a request may override the entity type's).
    strategy: ResolutionStrategy,
    /// Held by an open MANUAL conflict: remembered, but not part of the value.
    held: bool,
    op: Operation,
}

/// An entity's reconciliation state: what the server keeps per entity (and what a
/// replica needs to apply operations the same way).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntityState {
    entity_type: String,
    entity_id: String,
    value: EntityValue,
    version: u64,
    /// Merged clock of every operation seen (applied, discarded, held or compacted).
    clock: VectorClock,
    /// The value before the oldest retained operation.
    base: EntityValue,
    /// Merged clock of the compacted operations.
    base_clock: VectorClock,
    /// Greatest effective time among compacted operations.
    base_time: Option<Timestamp>,
    /// Retained operations, sorted by key. Shared, so that copying a state (to apply a
    /// batch all-or-nothing) costs a reference count per operation, not a deep copy.
    history: Vec<Arc<LoggedOp>>,
    /// MANUAL conflicts not yet settled by a dominating operation.
    open_conflicts: Vec<Conflict>,
}

/// What the engine needs from its configuration to apply one operation.
struct StepContext<'a> {
    strategy: ResolutionStrategy,
    /// The merge function registered for the entity's type, if any.
    merge: Option<&'a Arc<dyn CustomMerge>>,
    max_history: usize,
    now: Timestamp,
}

impl EntityState {
    /// A new, never-written entity.
    pub fn new(entity_type: impl Into<String>, entity_id: impl Into<String>) -> Self {
        Self {
            entity_type: entity_type.into(),
            entity_id: entity_id.into(),
            value: EntityValue::default(),
            version: 0,
            clock: VectorClock::new(),
            base: EntityValue::default(),
            base_clock: VectorClock::new(),
            base_time: None,
            history: Vec::new(),
            open_conflicts: Vec::new(),
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
    pub fn operations(&self) -> impl Iterator<Item = (&OpKey, &Operation, bool)> {
        self.history.iter().map(|l| (&l.key, &l.op, l.held))
    }

    /// True when `operation_id` was seen and is still retained.
    pub fn has_seen(&self, operation_id: &str) -> bool {
        self.history
            .iter()
            .any(|l| l.op.operation_id == operation_id)
    }

    /// Applies one operation (see the module docs). On error nothing changed.
    fn apply(&mut self, op: &Operation, ctx: &StepContext<'_>) -> Result<Outcome, ApplyError> {
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

        if let Some(other) = self
            .history
            .iter()
            .find(|l| l.op.vector_clock == op.vector_clock)
        {
            return Err(ApplyError::ClockReused {
                operation_id: op.operation_id.clone(),
                other: other.op.operation_id.clone(),
            });
        }

        // The usual case: the operation saw everything retained, so it sorts last and
        // follows the last applied operation.
        let in_order = op.vector_clock.descends_from(&self.clock);
        // Otherwise: the applied operation it is concurrent with (the greatest, if several).
        let rival = if in_order {
            None
        } else {
            self.history
                .iter()
                .rev()
                .find(|l| !l.held && l.op.vector_clock.is_concurrent_with(&op.vector_clock))
                .map(|l| l.op.clone())
        };
        let held = rival.is_some() && ctx.strategy == ResolutionStrategy::Manual;
        let has_successor = !in_order
            && self
                .history
                .iter()
                .any(|l| op.vector_clock.compare(&l.op.vector_clock) == ClockOrdering::Before);
        let logged = LoggedOp {
            key: if in_order {
                self.key_after_all(op)
            } else {
                self.key_for(op)
            },
            strategy: ctx.strategy,
            held,
            op: op.clone(),
        };
        let follows_last_applied = self
            .history
            .iter()
            .rev()
            .find(|l| !l.held)
            .is_none_or(|l| op.vector_clock.descends_from(&l.op.vector_clock));
        let fast = !has_successor
            && follows_last_applied
            && self.history.last().is_none_or(|l| l.key < logged.key);

        if fast {
            if !held {
                let merge = ctx
                    .merge
                    .filter(|_| ctx.strategy == ResolutionStrategy::CustomMerge);
                self.value = step(&self.value, &self.value, &logged, rival.is_some(), merge)?;
            }
            self.history.push(Arc::new(logged));
        } else {
            let backup = self.history.clone();
            let pos = self.history.partition_point(|l| l.key < logged.key);
            self.history.insert(pos, Arc::new(logged));
            if has_successor {
                // It precedes retained operations: their effective times may rise.
                self.rekey();
            }
            if !held || has_successor {
                match self.fold(ctx) {
                    Ok(value) => self.value = value,
                    Err(e) => {
                        self.history = backup;
                        return Err(e);
                    }
                }
            }
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
                    operations: vec![op.clone(), rival],
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

    /// The key of an operation that descends from every retained one: its effective
    /// time is at least the greatest so far (the last key's, or the compacted base's).
    fn key_after_all(&self, op: &Operation) -> OpKey {
        let effective = self
            .history
            .last()
            .map(|l| l.key.effective_time)
            .into_iter()
            .chain(self.base_time)
            .fold(op.timestamp, Timestamp::max);
        OpKey {
            effective_time: effective,
            depth: op.vector_clock.depth(),
            client_id: op.client_id.clone(),
            operation_id: op.operation_id.clone(),
        }
    }

    /// The key of `op` among the retained history.
    fn key_for(&self, op: &Operation) -> OpKey {
        OpKey {
            effective_time: self.effective_time(op, &self.history),
            depth: op.vector_clock.depth(),
            client_id: op.client_id.clone(),
            operation_id: op.operation_id.clone(),
        }
    }

    /// `op`'s timestamp raised to the effective time of every operation in `keyed` it
    /// causally follows (and of the compacted base, when it follows that).
    fn effective_time(&self, op: &Operation, keyed: &[Arc<LoggedOp>]) -> Timestamp {
        let clock = &op.vector_clock;
        let base = self
            .base_time
            .filter(|_| clock.descends_from(&self.base_clock));
        keyed
            .iter()
            .filter(|l| l.op.vector_clock.compare(clock) == ClockOrdering::Before)
            .map(|l| l.key.effective_time)
            .chain(base)
            .fold(op.timestamp, Timestamp::max)
    }

    /// Recomputes every retained key (in causal-depth order, so that predecessors are
    /// keyed first) and re-sorts the history.
    fn rekey(&mut self) {
        self.history
            .sort_by(|a, b| a.key.depth.cmp(&b.key.depth).then(a.key.cmp(&b.key)));
        for i in 0..self.history.len() {
            let effective = self.effective_time(&self.history[i].op, &self.history[..i]);
            if self.history[i].key.effective_time != effective {
                Arc::make_mut(&mut self.history[i]).key.effective_time = effective;
            }
        }
        self.history.sort_by(|a, b| a.key.cmp(&b.key));
    }

    /// The value after every retained operation, each applied by its strategy's step,
    /// starting from the base.
    fn fold(&self, ctx: &StepContext<'_>) -> Result<EntityValue, ApplyError> {
        Ok(self
            .fold_states(ctx)?
            .pop()
            .unwrap_or_else(|| self.base.clone()))
    }

    /// The state after each retained operation (held ones repeat the state before).
    /// The last entry is the current value.
    fn fold_states(&self, ctx: &StepContext<'_>) -> Result<Vec<EntityValue>, ApplyError> {
        let mut states: Vec<EntityValue> = Vec::with_capacity(self.history.len());
        let mut current = self.base.clone();
        // Merged clock of the applied operations so far, and the last one's index.
        let mut applied = self.base_clock.clone();
        let mut last_applied: Option<usize> = None;
        for (i, l) in self.history.iter().enumerate() {
            if !l.held {
                let clock = &l.op.vector_clock;
                // Earlier operations in key order are never causally after this one, so
                // it is concurrent with one of them exactly when it misses part of
                // their merged clock.
                let concurrent = !clock.descends_from(&applied);
                // Parent: the greatest applied operation this one causally follows.
                let parent = if concurrent {
                    (0..i).rev().find(|&j| {
                        !self.history[j].held
                            && clock.descends_from(&self.history[j].op.vector_clock)
                    })
                } else {
                    last_applied
                };
                let seen = parent.map_or(&self.base, |j| &states[j]);
                current = step(&current, seen, l, concurrent, ctx.merge)?;
                applied.merge(clock);
                last_applied = Some(i);
            }
            states.push(current.clone());
        }
        Ok(states)
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
        let Ok(states) = self.fold_states(ctx) else {
            // Cannot happen for a deterministic merge (the same steps succeeded when the
            // operations were applied); keeping everything is always safe.
            return;
        };
        let open: Vec<&str> = self
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
                Some(i) != last_applied && !(l.held && open.contains(&l.op.operation_id.as_str()))
            })
            .collect();
        let mut excess = self.history.len() - max * 3 / 4;
        let seen_by_all_kept = |excess: usize| {
            let mut removed_clock = VectorClock::new();
            let mut left = excess;
            let mut kept_clocks = Vec::new();
            for (l, r) in self.history.iter().zip(&removable) {
                if left > 0 && *r {
                    left -= 1;
                    removed_clock.merge(&l.op.vector_clock);
                } else if !l.held {
                    kept_clocks.push(&l.op.vector_clock);
                }
            }
            kept_clocks.iter().all(|c| c.descends_from(&removed_clock))
        };
        while excess > 0 && !seen_by_all_kept(excess) {
            excess -= 1;
        }
        if excess == 0 {
            return;
        }
        let mut last_removed = None;
        let mut kept = Vec::with_capacity(max);
        let history = std::mem::take(&mut self.history);
        for (i, (l, r)) in history.into_iter().zip(removable).enumerate() {
            if excess > 0 && r {
                excess -= 1;
                if !l.held {
                    last_removed = Some(i);
                }
                self.base_clock.merge(&l.op.vector_clock);
                if self.base_time.is_none_or(|t| t < l.key.effective_time) {
                    self.base_time = Some(l.key.effective_time);
                }
            } else {
                kept.push(l);
            }
        }
        self.history = kept;
        if let Some(i) = last_removed {
            self.base = states[i].clone();
        }
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
        ResolutionStrategy::LastWriteWins => Ok(seen.apply_plain(&l.op)),
        ResolutionStrategy::Manual => Ok(current.apply_plain(&l.op)),
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
        return current.apply_plain(op);
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
        let mut value = seen_fields
            .and_then(|m| m.get(field))
            .cloned()
            .unwrap_or(Value::Null);
        json_patch::merge(&mut value, change);
        data.insert(field.clone(), value);
    }
    EntityValue::live(Value::Object(data))
}

/// A conflict's id: the same two operations give the same id on every replica.
fn conflict_id(a: &str, b: &str) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let name = format!("{lo}\u{1f}{hi}");
    uuid::Uuid::new_v5(&CONFLICT_NAMESPACE, name.as_bytes()).to_string()
}

/// Namespace of conflict ids (a fixed random UUID).
const CONFLICT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6f1d_3a4e_9b2c_4d5e_8f70_a1b2_c3d4_e5f6);
