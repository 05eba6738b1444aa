//! Property tests of the reconciliation engine against a reference model.
//!
//! Histories are generated the way they happen: a few clients edit a few entities
//! offline (each edit increments the client's entry in its view of the entity's clock)
//! and now and then sync with each other (merging views). Timestamps are random, so
//! device clocks disagree with causality. The resulting set of operations is then fed
//! to replicas in random orders and batchings, with duplicates, and checked against a
//! model of what each strategy means, written here independently of the engine.

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use webwaka_realtime::protocol::{Operation, OperationType, ResolutionStrategy, Timestamp};
use webwaka_realtime::reconcile::{CounterMerge, EntityState, EntityValue, Outcome, Reconciler};
use webwaka_realtime::{ClockOrdering, VectorClock};

const CLIENTS: [&str; 4] = ["c0", "c1", "c2", "c3"];
const ENTITIES: [&str; 2] = ["e0", "e1"];
const FIELDS: [&str; 3] = ["a", "b", "c"];

fn at(secs: i64) -> Timestamp {
    Utc.timestamp_opt(1_780_000_000 + secs, 0).single().unwrap()
}

#[derive(Debug, Clone)]
enum Step {
    Edit {
        client: usize,
        entity: usize,
        kind: u8,
        fields: Vec<(usize, Option<i64>)>,
        ts: i64,
    },
    Sync {
        to: usize,
        from: usize,
    },
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..4usize, 0..2usize, 0..10u8, prop::collection::vec((0..3usize, prop::option::weighted(0.85, -5i64..6)), 1..3), 0..60i64)
            .prop_map(|(client, entity, kind, fields, ts)| Step::Edit { client, entity, kind, fields, ts }),
        1 => (0..4usize, 0..4usize).prop_map(|(to, from)| Step::Sync { to, from }),
    ]
}

/// Turns steps into operations with honest vector clocks. `numeric_only` makes every
/// patch value a number (counters).
fn build(steps: &[Step], numeric_only: bool) -> Vec<Operation> {
    let mut views = vec![vec![VectorClock::new(); ENTITIES.len()]; CLIENTS.len()];
    let mut ops = Vec::new();
    for step in steps {
        match step {
            Step::Sync { to, from } => {
                let other = views[*from].clone();
                for (mine, theirs) in views[*to].iter_mut().zip(&other) {
                    mine.merge(theirs);
                }
            }
            Step::Edit {
                client,
                entity,
                kind,
                fields,
                ts,
            } => {
                let clock = &mut views[*client][*entity];
                clock.increment(CLIENTS[*client]);
                let operation_type = match kind {
                    0 => OperationType::Create,
                    1 => OperationType::Delete,
                    _ => OperationType::Update,
                };
                let mut payload = Map::new();
                for (f, v) in fields {
                    let v = match (v, operation_type, numeric_only) {
                        (Some(v), _, _) => json!(v),
                        (None, _, true) | (None, OperationType::Create, _) => json!(0),
                        (None, _, false) => Value::Null,
                    };
                    payload.insert(FIELDS[*f].to_owned(), v);
                }
                ops.push(Operation {
                    operation_id: format!("op-{:03}", ops.len()),
                    client_id: CLIENTS[*client].into(),
                    tenant_id: "t".into(),
                    entity_type: "doc".into(),
                    entity_id: ENTITIES[*entity].into(),
                    operation_type,
                    payload: if operation_type == OperationType::Delete {
                        Value::Null
                    } else {
                        Value::Object(payload)
                    },
                    timestamp: at(*ts),
                    vector_clock: clock.clone(),
                    metadata: None,
                });
            }
        }
    }
    ops
}

// ---------------------------------------------------------------------------------
// The reference model: what the strategies mean, computed from the whole set at once.
// ---------------------------------------------------------------------------------

type Key = (Timestamp, u64, String, String);

fn before(a: &Operation, b: &Operation) -> bool {
    a.vector_clock.compare(&b.vector_clock) == ClockOrdering::Before
}

/// Effective time: own timestamp raised to that of everything the operation follows.
fn keys(ops: &[&Operation]) -> HashMap<String, Key> {
    let mut sorted: Vec<&Operation> = ops.to_vec();
    sorted.sort_by_key(|o| o.vector_clock.depth());
    let mut eff: HashMap<String, Timestamp> = HashMap::new();
    for o in &sorted {
        let t = sorted
            .iter()
            .filter(|p| before(p, o))
            .map(|p| eff[&p.operation_id])
            .fold(o.timestamp, Timestamp::max);
        eff.insert(o.operation_id.clone(), t);
    }
    ops.iter()
        .map(|o| {
            let k = (
                eff[&o.operation_id],
                o.vector_clock.depth(),
                o.client_id.clone(),
                o.operation_id.clone(),
            );
            (o.operation_id.clone(), k)
        })
        .collect()
}

/// LAST_WRITE_WINS: the greatest operation applied on the state its author saw, i.e.
/// the model value of the greatest operation it follows.
fn model_lww(ops: &[&Operation]) -> EntityValue {
    let keys = keys(ops);
    fn value_of(o: &Operation, ops: &[&Operation], keys: &HashMap<String, Key>) -> EntityValue {
        let parent = ops
            .iter()
            .filter(|p| {
                p.operation_id != o.operation_id && o.vector_clock.descends_from(&p.vector_clock)
            })
            .max_by_key(|p| &keys[&p.operation_id]);
        let seen = parent.map_or_else(EntityValue::default, |p| value_of(p, ops, keys));
        seen.apply_plain(o)
    }
    ops.iter()
        .max_by_key(|o| &keys[&o.operation_id])
        .map_or_else(EntityValue::default, |m| value_of(m, ops, &keys))
}

/// FIELD_LEVEL_MERGE with scalar values: per field, the greatest write since the last
/// create/delete wins; deleted when the greatest operation is a delete.
fn model_flm(ops: &[&Operation]) -> EntityValue {
    let keys = keys(ops);
    let k = |o: &Operation| keys[&o.operation_id].clone();
    let Some(last) = ops.iter().max_by_key(|o| k(o)) else {
        return EntityValue::default();
    };
    if last.operation_type == OperationType::Delete {
        return EntityValue::tombstone();
    }
    let reset = ops
        .iter()
        .filter(|o| o.operation_type != OperationType::Update)
        .max_by_key(|o| k(o));
    let mut data = Map::new();
    for field in FIELDS {
        let writer = ops
            .iter()
            .filter(|o| o.operation_type == OperationType::Update && o.payload.get(field).is_some())
            .filter(|o| reset.is_none_or(|r| k(o) > k(r)))
            .max_by_key(|o| k(o));
        let value = match (writer, reset) {
            (Some(w), _) => w.payload[field].clone(),
            (None, Some(r)) if r.operation_type == OperationType::Create => {
                r.payload.get(field).cloned().unwrap_or(Value::Null)
            }
            _ => Value::Null,
        };
        if !value.is_null() {
            data.insert(field.to_owned(), value);
        }
    }
    EntityValue::live(Value::Object(data))
}

/// CUSTOM_MERGE with the counter: every operation in key order, deltas added.
fn model_counter(ops: &[&Operation]) -> EntityValue {
    let keys = keys(ops);
    let mut sorted = ops.to_vec();
    sorted.sort_by_key(|o| keys[&o.operation_id].clone());
    let mut value = EntityValue::default();
    for o in sorted {
        value = match o.operation_type {
            OperationType::Update => {
                let mut data = match &value.data {
                    Value::Object(m) if !value.deleted => m.clone(),
                    _ => Map::new(),
                };
                for (f, d) in o.payload.as_object().unwrap() {
                    let cur = data.get(f).and_then(Value::as_i64).unwrap_or(0);
                    data.insert(f.clone(), json!(cur + d.as_i64().unwrap()));
                }
                EntityValue::live(Value::Object(data))
            }
            _ => value.apply_plain(o),
        };
    }
    value
}

fn by_entity(ops: &[Operation]) -> BTreeMap<String, Vec<&Operation>> {
    let mut map: BTreeMap<String, Vec<&Operation>> = BTreeMap::new();
    for o in ops {
        map.entry(o.entity_id.clone()).or_default().push(o);
    }
    map
}

// ---------------------------------------------------------------------------------
// Replicas.
// ---------------------------------------------------------------------------------

fn engine() -> Reconciler {
    Reconciler::default().with_merge("counter-doc", Arc::new(CounterMerge))
}

/// Applies `ops` in the given order, in batches of the given sizes, each batch once
/// more with probability given by `dups`.
fn replica(
    ops: &[Operation],
    strategy: ResolutionStrategy,
    batches: &[usize],
    dups: &[bool],
) -> BTreeMap<(String, String), EntityState> {
    let engine = engine();
    let mut states = BTreeMap::new();
    let mut rest = ops;
    let mut i = 0;
    while !rest.is_empty() {
        let n = batches.get(i).copied().unwrap_or(1).clamp(1, rest.len());
        let (batch, tail) = rest.split_at(n);
        engine
            .apply_batch(&mut states, batch, Some(strategy), at(999))
            .unwrap();
        if dups.get(i).copied().unwrap_or(false) {
            let out = engine
                .apply_batch(&mut states, batch, Some(strategy), at(999))
                .unwrap();
            assert!(out.changed.is_empty(), "a resent batch changed state");
            assert!(
                out.conflicts.is_empty(),
                "a resent batch reported conflicts"
            );
        }
        rest = tail;
        i += 1;
    }
    states
}

fn counter_ops(ops: Vec<Operation>) -> Vec<Operation> {
    ops.into_iter()
        .map(|mut o| {
            o.entity_type = "counter-doc".into();
            o
        })
        .collect()
}

/// A generated history, two shuffles of it, batch sizes and which batches to resend.
type Case = (
    Vec<Operation>,
    Vec<Operation>,
    Vec<Operation>,
    Vec<usize>,
    Vec<bool>,
);

fn arb_case(numeric_only: bool) -> impl Strategy<Value = Case> {
    prop::collection::vec(arb_step(), 1..40).prop_flat_map(move |steps| {
        let ops = build(&steps, numeric_only);
        (
            Just(ops.clone()),
            Just(ops.clone()).prop_shuffle(),
            Just(ops).prop_shuffle(),
            prop::collection::vec(1..6usize, 0..40),
            prop::collection::vec(prop::bool::weighted(0.2), 0..40),
        )
    })
}

fn check_converges(
    strategy: ResolutionStrategy,
    model: fn(&[&Operation]) -> EntityValue,
    (ops, p1, p2, batches, dups): Case,
) -> Result<(), TestCaseError> {
    let r0 = replica(&ops, strategy, &[1], &[]);
    let r1 = replica(&p1, strategy, &batches, &dups);
    let r2 = replica(&p2, strategy, &[usize::MAX], &[true]);
    for (entity, entity_ops) in by_entity(&ops) {
        let expected = model(&entity_ops);
        for (name, r) in [
            ("in order", &r0),
            ("shuffled, batched", &r1),
            ("shuffled, one batch", &r2),
        ] {
            let state = r.values().find(|s| s.entity_id() == entity).unwrap();
            prop_assert_eq!(
                state.value(),
                &expected,
                "{} replica, entity {}",
                name,
                entity
            );
            let clock = entity_ops
                .iter()
                .fold(VectorClock::new(), |c, o| c.merged(&o.vector_clock));
            prop_assert_eq!(state.clock(), &clock);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn lww_replicas_converge_to_the_model(case in arb_case(false)) {
        check_converges(ResolutionStrategy::LastWriteWins, model_lww, case)?;
    }

    #[test]
    fn field_level_merge_replicas_converge_to_the_model(case in arb_case(false)) {
        check_converges(ResolutionStrategy::FieldLevelMerge, model_flm, case)?;
    }

    #[test]
    fn counter_merge_replicas_converge_to_the_model(case in arb_case(true)) {
        let (a, b, c, d, e) = case;
        check_converges(ResolutionStrategy::CustomMerge, model_counter, (counter_ops(a), counter_ops(b), counter_ops(c), d, e))?;
    }

    /// The order in which operations take effect extends causality, whatever the
    /// timestamps: an operation sorts after everything it saw.
    #[test]
    fn effect_order_extends_causality(case in arb_case(false)) {
        let (_, shuffled, ..) = case;
        let states = replica(&shuffled, ResolutionStrategy::FieldLevelMerge, &[3], &[]);
        for state in states.values() {
            let order: Vec<_> = state.operations().map(|(k, o, _)| (k.clone(), o.clone())).collect();
            prop_assert!(order.windows(2).all(|w| w[0].0 < w[1].0));
            for (i, (_, a)) in order.iter().enumerate() {
                for (_, b) in &order[..i] {
                    prop_assert!(!before(a, b), "{} took effect before {} which it saw", b.operation_id, a.operation_id);
                }
            }
        }
    }

    /// An operation whose clock dominates the entity's always applies, and wins over
    /// everything it saw even when its device clock is the earliest of all.
    #[test]
    fn a_dominating_operation_always_applies(case in arb_case(false), strategy_ix in 0..3usize, kind in 0..3u8) {
        let strategy = [ResolutionStrategy::LastWriteWins, ResolutionStrategy::FieldLevelMerge, ResolutionStrategy::Manual][strategy_ix];
        let (ops, shuffled, ..) = case;
        let engine = engine();
        let mut states = replica(&shuffled, strategy, &[2], &[]);
        for (entity, entity_ops) in by_entity(&ops) {
            let mut clock = entity_ops.iter().fold(VectorClock::new(), |c, o| c.merged(&o.vector_clock));
            clock.increment("late");
            let (operation_type, payload) = match kind {
                0 => (OperationType::Update, json!({"a": "final", "b": null})),
                1 => (OperationType::Create, json!({"c": "fresh"})),
                _ => (OperationType::Delete, Value::Null),
            };
            let last = Operation {
                operation_id: "op-final".into(),
                client_id: "late".into(),
                tenant_id: "t".into(),
                entity_type: "doc".into(),
                entity_id: entity.clone(),
                operation_type,
                payload: payload.clone(),
                timestamp: at(-1000),
                vector_clock: clock,
                metadata: None,
            };
            let state = states.get_mut(&("doc".to_owned(), entity.clone())).unwrap();
            prop_assert_eq!(engine.apply(state, &last, Some(strategy), at(999)).unwrap(), Outcome::Applied);
            let value = state.value();
            match operation_type {
                OperationType::Update => {
                    prop_assert_eq!(&value.data["a"], "final");
                    prop_assert!(value.data.get("b").is_none());
                    prop_assert!(!value.deleted);
                }
                OperationType::Create => prop_assert_eq!(value, &EntityValue::live(payload)),
                OperationType::Delete => prop_assert_eq!(value, &EntityValue::tombstone()),
            }
            prop_assert!(state.open_conflicts().is_empty(), "a dominating write settles MANUAL conflicts");
        }
    }

    /// MANUAL never loses either side: every operation is settled or in a conflict, and
    /// every held operation's conflict carries both it and the value's side.
    #[test]
    fn manual_never_loses_a_side(case in arb_case(false)) {
        let (_, shuffled, ..) = case;
        let engine = engine();
        let mut states = BTreeMap::new();
        for op in &shuffled {
            let out = engine.apply_batch(&mut states, std::slice::from_ref(op), Some(ResolutionStrategy::Manual), at(999)).unwrap();
            let settled = out.resolved_operations.iter().any(|o| o.operation_id == op.operation_id);
            let held: Vec<_> = out.conflicts.iter().filter(|c| c.resolution.is_none()).collect();
            prop_assert!(settled == held.is_empty(), "{} is either settled or held", op.operation_id);
            for c in held {
                prop_assert_eq!(c.operations.len(), 2);
                prop_assert_eq!(&c.operations[0], op);
                prop_assert!(c.operations[1].vector_clock.is_concurrent_with(&op.vector_clock));
                let state = &states[&(op.entity_type.clone(), op.entity_id.clone())];
                prop_assert!(state.open_conflicts().iter().any(|o| o.conflict_id == c.conflict_id));
                // The held side is remembered, the value is not its.
                prop_assert!(state.operations().any(|(_, o, held)| held && o == op));
            }
        }
    }
}
