//! The reconciliation engine against the engine it replaced (`reconcile::reference`,
//! the code before issue 16, kept unchanged): the same random workloads, fed to both in
//! the same batches, must give the same results, batch after batch.
//!
//! Compared after every batch: the `Result` (the conflicts reported, the operations
//! settled, the entities changed and touched, or the same error), and every entity's
//! state in its JSON form (value, version, clock, base, the retained history with each
//! operation's key and held flag, open conflicts).
//!
//! The workloads are made to disagree where the engines differ in how they work:
//! clients that sync rarely (many conflicts, long concurrent branches), device clocks
//! that disagree with causality, arrival in any order (operations that arrive after
//! operations that saw them), duplicates, reused clocks, made-up clocks, malformed
//! operations and merge
//! functions that refuse (a failed batch must leave every state as it was), requests
//! that override the strategy (one entity's history mixes strategies), a merge
//! function that looks at its `concurrent` input, a small retained history (frequent
//! compactions, with open MANUAL conflicts), states saved to JSON and loaded again
//! between batches (cold caches), and single operations through `Reconciler::apply`.
//!
//! `WEBWAKA_RECONCILE_DIFF_CASES` sets the number of cases (default 200, what CI runs);
//! e.g. `WEBWAKA_RECONCILE_DIFF_CASES=20000 cargo test -p webwaka-realtime --release
//! --test reconcile_differential` for a long run.

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use webwaka_realtime::VectorClock;
use webwaka_realtime::protocol::{Operation, OperationType, ResolutionStrategy, Timestamp};
use webwaka_realtime::reconcile::{
    CounterMerge, CustomMerge, EntityKey, EntityState, EntityValue, MergeError, MergeInput,
    Reconciler, reference,
};

const CLIENTS: [&str; 5] = ["c0", "c1", "c2", "c3", "c4"];
/// `(entityType, entityId)`: "counter" has CounterMerge, "flagged" a merge function that
/// counts the steps it was told were concurrent.
const ENTITIES: [(&str, &str); 4] = [
    ("doc", "d0"),
    ("doc", "d1"),
    ("counter", "k0"),
    ("flagged", "f0"),
];
const FIELDS: [&str; 3] = ["a", "b", "c"];
const STRATEGIES: [ResolutionStrategy; 4] = [
    ResolutionStrategy::LastWriteWins,
    ResolutionStrategy::FieldLevelMerge,
    ResolutionStrategy::CustomMerge,
    ResolutionStrategy::Manual,
];

fn at(secs: i64) -> Timestamp {
    Utc.timestamp_opt(1_780_000_000 + secs, 0).single().unwrap()
}

/// A merge function whose result depends on its `concurrent` input: a merge patch,
/// plus a count of the steps made as concurrent in field `conc`.
#[derive(Debug)]
struct FlagMerge;

impl CustomMerge for FlagMerge {
    fn apply(&self, input: MergeInput<'_>) -> Result<EntityValue, MergeError> {
        let mut value = input.current.apply_plain(input.operation);
        if let Value::Object(map) = &mut value.data {
            let before = input
                .current
                .data
                .get("conc")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            map.insert("conc".into(), json!(before + i64::from(input.concurrent)));
        }
        Ok(value)
    }
}

fn engine(default: ResolutionStrategy, max_history: usize) -> Reconciler {
    Reconciler::new(default)
        .with_merge("counter", Arc::new(CounterMerge))
        .with_merge("flagged", Arc::new(FlagMerge))
        .with_max_history(max_history)
}

#[derive(Debug, Clone)]
enum Step {
    Edit {
        client: usize,
        entity: usize,
        kind: u8,
        fields: Vec<(usize, u8, i64)>,
        ts: i64,
    },
    Sync {
        to: usize,
        from: usize,
    },
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..5usize, 0..4usize, 0..12u8, prop::collection::vec((0..3usize, 0..10u8, -5i64..6), 1..3), 0..40i64)
            .prop_map(|(client, entity, kind, fields, ts)| Step::Edit { client, entity, kind, fields, ts }),
        1 => (0..5usize, 0..5usize).prop_map(|(to, from)| Step::Sync { to, from }),
    ]
}

/// Operations with honest clocks: each client edits from its own view of each entity.
fn build(steps: &[Step]) -> Vec<Operation> {
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
                for (f, shape, n) in fields {
                    let v = match shape {
                        0 => Value::Null,
                        1 => json!(format!("s{n}")),
                        2 => json!({ "x": n }),
                        _ => json!(n),
                    };
                    payload.insert(FIELDS[*f].to_owned(), v);
                }
                let (entity_type, entity_id) = ENTITIES[*entity];
                ops.push(Operation {
                    operation_id: format!("op-{:03}", ops.len()),
                    client_id: CLIENTS[*client].into(),
                    tenant_id: "t".into(),
                    entity_type: entity_type.into(),
                    entity_id: entity_id.into(),
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

/// Something added to the arrival sequence besides the operations themselves.
#[derive(Debug, Clone)]
enum Noise {
    /// An operation again, same id.
    Resend(usize),
    /// Another id with an operation's clock.
    ReusedClock(usize),
    /// An operation whose author does not count itself in its clock.
    Malformed(usize),
    /// An operation that saw everything before it in the sequence.
    Dominating(usize, i64),
    /// An operation with a made-up clock (a client that lies about what it saw).
    Forged(usize, Vec<(usize, u64)>),
}

fn arb_noise() -> impl Strategy<Value = (usize, Noise)> {
    (
        0..200usize,
        prop_oneof![
            4 => (0..200usize).prop_map(Noise::Resend),
            1 => (0..200usize).prop_map(Noise::ReusedClock),
            1 => (0..200usize).prop_map(Noise::Malformed),
            2 => (0..4usize, -10i64..50).prop_map(|(e, ts)| Noise::Dominating(e, ts)),
            2 => (0..200usize, prop::collection::vec((0..5usize, 1..12u64), 0..4))
                .prop_map(|(i, entries)| Noise::Forged(i, entries)),
        ],
    )
}

/// The arrival sequence: the operations in a random order, with the noise inserted.
fn arrival(ops: &[Operation], shuffled: &[Operation], noise: &[(usize, Noise)]) -> Vec<Operation> {
    let mut out: Vec<Operation> = shuffled.to_vec();
    if ops.is_empty() {
        return out;
    }
    for (n, (at_index, kind)) in noise.iter().enumerate() {
        let place = at_index % (out.len() + 1);
        let extra = match kind {
            Noise::Resend(i) => out[..place].get(i % place.max(1)).cloned(),
            Noise::ReusedClock(i) => {
                let mut o = ops[i % ops.len()].clone();
                o.operation_id = format!("reuse-{n}");
                o.timestamp = at(7);
                Some(o)
            }
            Noise::Malformed(i) => {
                let mut o = ops[i % ops.len()].clone();
                o.operation_id = format!("bad-{n}");
                o.client_id = "nobody".into();
                Some(o)
            }
            Noise::Dominating(e, ts) => {
                let (entity_type, entity_id) = ENTITIES[*e];
                let mut clock = out[..place]
                    .iter()
                    .filter(|o| o.entity_id == entity_id)
                    .fold(VectorClock::new(), |c, o| c.merged(&o.vector_clock));
                for _ in 0..=n {
                    clock.increment("late");
                }
                Some(Operation {
                    operation_id: format!("late-{n}"),
                    client_id: "late".into(),
                    tenant_id: "t".into(),
                    entity_type: entity_type.into(),
                    entity_id: entity_id.into(),
                    operation_type: OperationType::Update,
                    payload: json!({ "a": n as i64, "b": null }),
                    timestamp: at(*ts),
                    vector_clock: clock,
                    metadata: None,
                })
            }
            Noise::Forged(i, entries) => {
                let mut o = ops[i % ops.len()].clone();
                o.operation_id = format!("forged-{n}");
                let author = (o.client_id.clone(), 1 + (n as u64 % 3));
                o.vector_clock = VectorClock::from_entries(
                    entries
                        .iter()
                        .map(|(c, k)| (CLIENTS[*c].to_owned(), *k))
                        .chain([author]),
                );
                Some(o)
            }
        };
        if let Some(extra) = extra {
            out.insert(place, extra);
        }
    }
    out
}

/// How one batch is sent.
#[derive(Debug, Clone)]
struct Send {
    size: usize,
    /// The request's strategy (`None`: per entity type).
    requested: Option<usize>,
    /// 0: `apply_batch`; 1: one `Reconciler::apply` per operation; 2: save the new
    /// engine's states to JSON and load them first; 3: both engines load the JSON the
    /// other wrote.
    how: u8,
}

fn arb_send() -> impl Strategy<Value = Send> {
    (
        1..8usize,
        prop::option::weighted(0.3, 0..4usize),
        prop_oneof![6 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)],
    )
        .prop_map(|(size, requested, how)| Send {
            size,
            requested,
            how,
        })
}

#[derive(Debug, Clone)]
struct Case {
    arrivals: Vec<Operation>,
    sends: Vec<Send>,
    default: usize,
    max_history: usize,
}

fn arb_case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(arb_step(), 1..90),
        prop::collection::vec(arb_noise(), 0..16),
    )
        .prop_flat_map(|(steps, noise)| {
            let ops = build(&steps);
            (
                Just(ops.clone()),
                Just(ops).prop_shuffle(),
                Just(noise),
                prop::collection::vec(arb_send(), 1..40),
                0..4usize,
                prop_oneof![3 => 4..12usize, 1 => Just(256usize)],
            )
        })
        .prop_map(|(ops, shuffled, noise, sends, default, max_history)| Case {
            arrivals: arrival(&ops, &shuffled, &noise),
            sends,
            default,
            max_history,
        })
}

fn json_of<S: serde::Serialize>(states: &BTreeMap<EntityKey, S>) -> Value {
    Value::Array(
        states
            .iter()
            .map(|(k, s)| json!([k.0, k.1, serde_json::to_value(s).unwrap()]))
            .collect(),
    )
}

fn reload<T: serde::de::DeserializeOwned>(json: &Value) -> BTreeMap<EntityKey, T> {
    json.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                (
                    e[0].as_str().unwrap().to_owned(),
                    e[1].as_str().unwrap().to_owned(),
                ),
                serde_json::from_value(e[2].clone()).unwrap(),
            )
        })
        .collect()
}

fn check(case: Case) -> Result<(), TestCaseError> {
    let engine = engine(STRATEGIES[case.default], case.max_history);
    let mut new: BTreeMap<EntityKey, EntityState> = BTreeMap::new();
    let mut old: BTreeMap<EntityKey, reference::EntityState> = BTreeMap::new();
    let mut rest: &[Operation] = &case.arrivals;
    let mut version = 0;
    for (b, send) in case.sends.iter().cycle().enumerate() {
        if rest.is_empty() {
            break;
        }
        let (batch, tail) = rest.split_at(send.size.min(rest.len()));
        rest = tail;
        let requested = send.requested.map(|i| STRATEGIES[i]);
        let now = at(1000 + b as i64);
        match send.how {
            2 => new = reload(&json_of(&new)),
            3 => {
                let (from_new, from_old) = (json_of(&new), json_of(&old));
                new = reload(&from_old);
                old = reload(&from_new);
            }
            _ => {}
        }
        if send.how == 1 {
            for op in batch {
                let key = (op.entity_type.clone(), op.entity_id.clone());
                let n = new
                    .entry(key.clone())
                    .or_insert_with(|| EntityState::new(&key.0, &key.1));
                let o = old
                    .entry(key.clone())
                    .or_insert_with(|| reference::EntityState::new(&key.0, &key.1));
                let got = engine.apply(n, op, requested, now);
                let want = reference::apply(&engine, o, op, requested, now);
                prop_assert_eq!(
                    &got,
                    &want,
                    "batch {}: Reconciler::apply of {}",
                    b,
                    op.operation_id
                );
            }
        } else {
            let got = engine.apply_batch(&mut new, batch, requested, now);
            let want = reference::apply_batch(&engine, &mut old, batch, requested, now);
            prop_assert_eq!(&got, &want, "batch {}: the outcomes differ", b);
            // The owner numbers changed entities, as the server does.
            if let Ok(out) = got {
                for key in &out.changed {
                    version += 1;
                    new.get_mut(key).unwrap().set_version(version);
                    old.get_mut(key).unwrap().set_version(version);
                }
            }
        }
        prop_assert_eq!(
            json_of(&new),
            json_of(&old),
            "batch {}: the states differ",
            b
        );
    }
    for (key, state) in &new {
        let reference = &old[key];
        for op in &case.arrivals {
            prop_assert_eq!(
                state.has_seen(&op.operation_id),
                reference.has_seen(&op.operation_id)
            );
        }
        prop_assert_eq!(state.history_len(), reference.history_len());
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("WEBWAKA_RECONCILE_DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn the_engine_gives_the_results_of_the_reference_engine(case in arb_case()) {
        check(case)?;
    }
}

/// A merge function that panics on the operation whose id is `op-panic`.
#[derive(Debug)]
struct PanickingMerge;

impl CustomMerge for PanickingMerge {
    fn apply(&self, input: MergeInput<'_>) -> Result<EntityValue, MergeError> {
        assert_ne!(
            input.operation.operation_id, "op-panic",
            "the merge function panicked"
        );
        Ok(input.current.apply_plain(input.operation))
    }
}

/// A batch is all or nothing even when a merge function panics half-way: the entities
/// it had already changed (taken out of the map while it runs) are put back as they
/// were, as the reference engine (which worked on copies) leaves them.
#[test]
fn a_panicking_merge_function_leaves_the_states_as_they_were() {
    let engine = Reconciler::default().with_merge("panicky", Arc::new(PanickingMerge));
    let op = |id: &str, entity: &str, client: &str, counter: u64| Operation {
        operation_id: id.into(),
        client_id: client.into(),
        tenant_id: "t".into(),
        entity_type: "panicky".into(),
        entity_id: entity.into(),
        operation_type: OperationType::Update,
        payload: json!({ "a": id }),
        timestamp: at(counter as i64),
        vector_clock: VectorClock::from_entries([(client, counter)]),
        metadata: None,
    };
    let mut new: BTreeMap<EntityKey, EntityState> = BTreeMap::new();
    let mut old: BTreeMap<EntityKey, reference::EntityState> = BTreeMap::new();
    let first = [op("op-1", "x", "c0", 1), op("op-2", "y", "c0", 1)];
    engine.apply_batch(&mut new, &first, None, at(0)).unwrap();
    reference::apply_batch(&engine, &mut old, &first, None, at(0)).unwrap();
    let before = json_of(&new);
    assert_eq!(before, json_of(&old));

    // Changes x and y, creates z, then panics on x.
    let second = [
        op("op-3", "x", "c0", 2),
        op("op-4", "y", "c0", 2),
        op("op-5", "z", "c0", 1),
        op("op-panic", "x", "c0", 3),
    ];
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let new_result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        engine.apply_batch(&mut new, &second, None, at(1))
    }));
    let old_result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        reference::apply_batch(&engine, &mut old, &second, None, at(1))
    }));
    std::panic::set_hook(hook);
    assert!(new_result.is_err() && old_result.is_err(), "both panicked");
    assert_eq!(json_of(&new), before, "the states are as before the batch");
    assert_eq!(json_of(&new), json_of(&old));

    // And they go on working: the same batch without the panic applies.
    let third = &second[..3];
    let got = engine.apply_batch(&mut new, third, None, at(2)).unwrap();
    let want = reference::apply_batch(&engine, &mut old, third, None, at(2)).unwrap();
    assert_eq!(got, want);
    assert_eq!(json_of(&new), json_of(&old));
}
