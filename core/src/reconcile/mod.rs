//! The reconciliation engine: how offline edits of shared entities become one state.
//!
//! Pure: no IO, no clock reads (the current time is an argument). The server runs it on
//! every `POST /api/reconciliation/reconcile`; the SDK shares it so that both sides
//! agree on what an operation means.
//!
//! For each incoming [`Operation`] the engine decides:
//!
//! - **duplicate**: its id was seen (or it is older than the retained history): nothing
//!   changes, and it is still reported as settled, so a resent request is harmless;
//! - **apply**: it saw every applied operation of the entity (its clock descends from
//!   theirs), so it applies on top;
//! - **conflict**: it is concurrent with an applied operation. LAST_WRITE_WINS,
//!   FIELD_LEVEL_MERGE and CUSTOM_MERGE resolve it at once and report the resolved
//!   conflict; MANUAL keeps the value, holds the operation aside and reports the conflict
//!   open until an operation whose clock dominates both sides arrives.
//!
//! Every replica that knows the same operations ends with the same value, whatever the
//! order and batching in which they arrived: operations take effect in one total order
//! that extends causality ([`order`]), and each strategy is a deterministic step in that
//! order ([`entity`]). A causally later operation therefore always wins over what it saw,
//! whatever the device clocks said.

pub mod entity;
pub mod merge;
pub mod order;
#[cfg(any(test, feature = "reference-engine"))]
#[doc(hidden)]
pub mod reference;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

pub use entity::{ApplyError, EntityState, EntityValue, Outcome};
pub use merge::{CounterMerge, CustomMerge, MergeError, MergeInput};
pub use order::OpKey;

use crate::protocol::{Conflict, Operation, ResolutionStrategy, Timestamp};
use entity::StepContext;

/// Default number of operations retained per entity (see [`Reconciler::max_history`]).
pub const DEFAULT_MAX_HISTORY: usize = 256;

/// Identifies an entity within a tenant: `(entityType, entityId)`.
pub type EntityKey = (String, String);

/// The engine's configuration: strategies and merge functions per entity type.
#[derive(Debug, Clone)]
pub struct Reconciler {
    default_strategy: ResolutionStrategy,
    strategies: HashMap<String, ResolutionStrategy>,
    merges: HashMap<String, Arc<dyn CustomMerge>>,
    max_history: usize,
}

impl Default for Reconciler {
    fn default() -> Self {
        Self::new(ResolutionStrategy::LastWriteWins)
    }
}

/// What one batch of operations did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchOutcome {
    /// Conflicts detected, in request order (resolved, or open for MANUAL).
    pub conflicts: Vec<Conflict>,
    /// Operations settled: applied, resolved (winning or losing) or duplicate. Shared
    /// with the entities' histories (an operation is stored once).
    pub resolved_operations: Vec<Arc<Operation>>,
    /// Entities whose value changed.
    pub changed: BTreeSet<EntityKey>,
    /// Entities the batch touched (changed or not).
    pub touched: BTreeSet<EntityKey>,
}

/// An operation handed to [`Reconciler::apply_batch`]: owned (the engine then keeps a
/// copy of it) or already shared (the engine keeps the same `Arc`, without a copy: the
/// server decodes a request into shared operations).
pub trait BatchOperation {
    /// The operation.
    fn operation(&self) -> &Operation;
    /// The operation, shared.
    fn shared(&self) -> Arc<Operation>;
}

impl BatchOperation for Operation {
    fn operation(&self) -> &Operation {
        self
    }

    fn shared(&self) -> Arc<Operation> {
        Arc::new(self.clone())
    }
}

impl BatchOperation for Arc<Operation> {
    fn operation(&self) -> &Operation {
        self
    }

    fn shared(&self) -> Arc<Operation> {
        self.clone()
    }
}

impl Reconciler {
    /// An engine whose default strategy is `default_strategy`.
    pub fn new(default_strategy: ResolutionStrategy) -> Self {
        Self {
            default_strategy,
            strategies: HashMap::new(),
            merges: HashMap::new(),
            max_history: DEFAULT_MAX_HISTORY,
        }
    }

    /// Uses `strategy` for `entity_type` unless a request names another.
    pub fn with_strategy(
        mut self,
        entity_type: impl Into<String>,
        strategy: ResolutionStrategy,
    ) -> Self {
        self.strategies.insert(entity_type.into(), strategy);
        self
    }

    /// Registers the CUSTOM_MERGE function of `entity_type` (and makes CUSTOM_MERGE its
    /// strategy unless one was set).
    pub fn with_merge(
        mut self,
        entity_type: impl Into<String>,
        merge: Arc<dyn CustomMerge>,
    ) -> Self {
        let entity_type = entity_type.into();
        self.strategies
            .entry(entity_type.clone())
            .or_insert(ResolutionStrategy::CustomMerge);
        self.merges.insert(entity_type, merge);
        self
    }

    /// Retains at most `max_history` operations per entity (at least 4). Older ones are
    /// folded into the entity's base; an operation concurrent with them is then treated
    /// as if it had seen them.
    pub fn with_max_history(mut self, max_history: usize) -> Self {
        self.max_history = max_history.max(4);
        self
    }

    /// The merge function registered for `entity_type`, if any.
    pub(crate) fn merge_for(&self, entity_type: &str) -> Option<&Arc<dyn CustomMerge>> {
        self.merges.get(entity_type)
    }

    /// The retained-history bound.
    pub fn max_history(&self) -> usize {
        self.max_history
    }

    /// The strategy for `entity_type`: the request's, else the type's, else the default.
    pub fn strategy_for(
        &self,
        entity_type: &str,
        requested: Option<ResolutionStrategy>,
    ) -> ResolutionStrategy {
        requested
            .or_else(|| self.strategies.get(entity_type).copied())
            .unwrap_or(self.default_strategy)
    }

    /// Applies one operation to its entity's state. On error the state is unchanged.
    pub fn apply(
        &self,
        state: &mut EntityState,
        op: &Operation,
        requested: Option<ResolutionStrategy>,
        now: Timestamp,
    ) -> Result<Outcome, ApplyError> {
        self.apply_shared(state, &Arc::new(op.clone()), requested, now)
    }

    fn apply_shared(
        &self,
        state: &mut EntityState,
        op: &Arc<Operation>,
        requested: Option<ResolutionStrategy>,
        now: Timestamp,
    ) -> Result<Outcome, ApplyError> {
        let entity_type = &op.entity_type;
        let ctx = StepContext {
            strategy: self.strategy_for(entity_type, requested),
            merge: self.merge_for(entity_type),
            max_history: self.max_history,
            now,
        };
        state.apply(op, &ctx)
    }

    /// Applies `ops` in order to the entities in `states` (missing ones are created).
    ///
    /// All or nothing: on error (or if a merge function panics) `states` is as it
    /// was. The entities are changed in place (taken out of the map while the batch
    /// runs); each remembers what to restore until the batch ends, so a batch costs
    /// what its operations cost, not a copy of every entity it touches.
    pub fn apply_batch<O: BatchOperation>(
        &self,
        states: &mut BTreeMap<EntityKey, EntityState>,
        ops: &[O],
        requested: Option<ResolutionStrategy>,
        now: Timestamp,
    ) -> Result<BatchOutcome, ApplyError> {
        let mut out = BatchOutcome::default();
        // Fail early when CUSTOM_MERGE is asked of a type without a merge function.
        for op in ops.iter().map(O::operation) {
            if self.strategy_for(&op.entity_type, requested) == ResolutionStrategy::CustomMerge
                && !self.merges.contains_key(&op.entity_type)
            {
                return Err(ApplyError::NoMergeFunction {
                    entity_type: op.entity_type.clone(),
                });
            }
        }
        // The entities touched, taken out of `states` until the batch ends (in
        // first-touch order), each with its journal. If the batch fails (or a merge
        // function panics), the guard puts them back as they were.
        // Sized for the most entities the batch can touch: growing a list of states
        // moves them all, each time.
        let mut batch = Batch {
            states,
            touched: Vec::with_capacity(ops.len()),
        };
        let mut slot_of: hashbrown::HashMap<(&str, &str), usize> =
            hashbrown::HashMap::with_capacity(ops.len());
        for given in ops {
            let op = given.operation();
            let slot = match slot_of.get(&(op.entity_type.as_str(), op.entity_id.as_str())) {
                Some(&slot) => slot,
                None => {
                    let key = (op.entity_type.clone(), op.entity_id.clone());
                    // An existing entity gives its stored key back: the one made for
                    // the look-up then goes to the `touched` set.
                    let (key, spare, mut state, created) = match batch.states.remove_entry(&key) {
                        Some((stored, state)) => (stored, Some(key), state, false),
                        None => {
                            let state = EntityState::new(&op.entity_type, &op.entity_id);
                            (key, None, state, true)
                        }
                    };
                    state.begin();
                    batch.touched.push(Touched {
                        key,
                        spare,
                        state,
                        created,
                    });
                    slot_of.insert(
                        (op.entity_type.as_str(), op.entity_id.as_str()),
                        batch.touched.len() - 1,
                    );
                    batch.touched.len() - 1
                }
            };
            // On error the guard rolls every touched entity back.
            let op = given.shared();
            let outcome = self.apply_shared(&mut batch.touched[slot].state, &op, requested, now)?;
            match outcome {
                Outcome::Applied | Outcome::Duplicate => out.resolved_operations.push(op),
                Outcome::Resolved(conflict) => {
                    out.resolved_operations.push(op);
                    out.conflicts.push(conflict);
                }
                Outcome::Held(conflict) => out.conflicts.push(conflict),
            }
        }
        for mut t in std::mem::take(&mut batch.touched) {
            if t.state.commit() {
                out.changed.insert(t.key.clone());
            }
            out.touched.insert(t.spare.unwrap_or_else(|| t.key.clone()));
            batch.states.insert(t.key, t.state);
        }
        Ok(out)
    }
}

/// The entities a batch took out of the caller's map. Dropped with entities still in
/// it (an error, or a panic in a merge function), it rolls them back and puts them
/// back, so that the map is as it was before the batch.
struct Batch<'a> {
    states: &'a mut BTreeMap<EntityKey, EntityState>,
    touched: Vec<Touched>,
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        for mut t in std::mem::take(&mut self.touched) {
            if !t.created {
                t.state.rollback();
                self.states.insert(t.key, t.state);
            }
        }
    }
}

/// An entity a batch touched.
struct Touched {
    key: EntityKey,
    /// A second copy of the key, when one was made for nothing.
    spare: Option<EntityKey>,
    state: EntityState,
    /// It did not exist before the batch (not put back if the batch fails).
    created: bool,
}
