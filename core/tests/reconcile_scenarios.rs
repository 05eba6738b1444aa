//! Scenarios of the reconciliation engine, one behaviour per test: each strategy,
//! DELETE against UPDATE, duplicates, MANUAL conflicts, skewed device clocks, history
//! compaction and bad input.

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use serde_json::{Value, json};
use webwaka_realtime::VectorClock;
use webwaka_realtime::protocol::{Operation, OperationType, ResolutionStrategy, Timestamp};
use webwaka_realtime::reconcile::{ApplyError, CounterMerge, EntityState, Outcome, Reconciler};

use ResolutionStrategy::*;

fn at(secs: i64) -> Timestamp {
    Utc.timestamp_opt(1_780_000_000 + secs, 0).single().unwrap()
}

fn op(
    id: &str,
    client: &str,
    kind: OperationType,
    payload: Value,
    ts: i64,
    clock: &[(&str, u64)],
) -> Operation {
    Operation {
        operation_id: id.into(),
        client_id: client.into(),
        tenant_id: "t1".into(),
        entity_type: "doc".into(),
        entity_id: "d1".into(),
        operation_type: kind,
        payload,
        timestamp: at(ts),
        vector_clock: VectorClock::from_entries(clock.iter().map(|(k, v)| (*k, *v))),
        metadata: None,
    }
}

fn run(
    engine: &Reconciler,
    strategy: ResolutionStrategy,
    ops: &[Operation],
) -> (EntityState, Vec<Outcome>) {
    let mut state = EntityState::new("doc", "d1");
    let outcomes = ops
        .iter()
        .map(|o| {
            engine
                .apply(&mut state, o, Some(strategy), at(1000))
                .unwrap()
        })
        .collect();
    (state, outcomes)
}

use OperationType::{Create, Delete, Update};

/// Base `{title, body, tags}` by client `s`, then two concurrent edits by `a` and `b`.
fn fork(a_patch: Value, a_ts: i64, b_patch: Value, b_ts: i64) -> Vec<Operation> {
    vec![
        op(
            "o0",
            "s",
            Create,
            json!({"title": "t0", "body": "b0", "tags": {"x": 1}}),
            0,
            &[("s", 1)],
        ),
        op("oa", "a", Update, a_patch, a_ts, &[("s", 1), ("a", 1)]),
        op("ob", "b", Update, b_patch, b_ts, &[("s", 1), ("b", 1)]),
    ]
}

#[test]
fn test_lww_later_timestamp_wins_and_loser_is_discarded_whole() {
    let ops = fork(
        json!({"title": "A", "body": "bA"}),
        20,
        json!({"title": "B"}),
        10,
    );
    let (state, outcomes) = run(&Reconciler::default(), LastWriteWins, &ops);
    // `a` is later: its whole edit stands; nothing of `b` survives.
    assert_eq!(
        state.value().data,
        json!({"title": "A", "body": "bA", "tags": {"x": 1}})
    );
    let Outcome::Resolved(conflict) = &outcomes[2] else {
        panic!("{outcomes:?}")
    };
    assert_eq!(conflict.operations[0].operation_id, "ob");
    assert_eq!(conflict.operations[1].operation_id, "oa");
    assert_eq!(
        conflict.resolution.as_ref().unwrap().result,
        state.value().data
    );

    // Same edits, `b` later: `a`'s body change is gone too (LWW is per operation).
    let ops = fork(
        json!({"title": "A", "body": "bA"}),
        10,
        json!({"title": "B"}),
        20,
    );
    let (state, _) = run(&Reconciler::default(), LastWriteWins, &ops);
    assert_eq!(
        state.value().data,
        json!({"title": "B", "body": "b0", "tags": {"x": 1}})
    );
}

#[test]
fn test_lww_ties_break_by_client_id_then_operation_id() {
    let ops = fork(json!({"title": "A"}), 10, json!({"title": "B"}), 10);
    let (state, _) = run(&Reconciler::default(), LastWriteWins, &ops);
    assert_eq!(
        state.value().data["title"],
        "B",
        "greater clientId wins a tie"
    );
    let mut rev = ops.clone();
    rev.swap(1, 2);
    let (state2, _) = run(&Reconciler::default(), LastWriteWins, &rev);
    assert_eq!(state2.value(), state.value());
}

#[test]
fn test_field_level_merge_keeps_one_sided_fields_and_lww_on_shared_ones() {
    let ops = fork(
        json!({"title": "A", "tags": {"y": 2}}),
        10,
        json!({"body": "bB", "title": "B", "tags": {"z": 3}}),
        20,
    );
    let (state, outcomes) = run(&Reconciler::default(), FieldLevelMerge, &ops);
    // body: only b changed it. title and tags: both changed, b is later; a nested object
    // is one value, so tags is b's version of it ({"x":1} patched by b), not a mix.
    assert_eq!(
        state.value().data,
        json!({"title": "B", "body": "bB", "tags": {"x": 1, "z": 3}})
    );
    assert!(matches!(outcomes[2], Outcome::Resolved(_)));

    // Disjoint fields: both edits survive, in either arrival order.
    let ops = fork(json!({"title": "A"}), 30, json!({"body": "bB"}), 20);
    let mut rev = ops.clone();
    rev.swap(1, 2);
    for order in [ops, rev] {
        let (state, _) = run(&Reconciler::default(), FieldLevelMerge, &order);
        assert_eq!(
            state.value().data,
            json!({"title": "A", "body": "bB", "tags": {"x": 1}})
        );
    }
}

#[test]
fn test_delete_against_concurrent_update_follows_the_strategy() {
    let base = op("o0", "s", Create, json!({"n": 1, "m": 1}), 0, &[("s", 1)]);
    let del = |ts| op("od", "a", Delete, Value::Null, ts, &[("s", 1), ("a", 1)]);
    let upd = |ts| {
        op(
            "ou",
            "b",
            Update,
            json!({"n": 2}),
            ts,
            &[("s", 1), ("b", 1)],
        )
    };

    // LWW, delete later: a tombstone, whichever arrives first.
    for ops in [
        vec![base.clone(), del(20), upd(10)],
        vec![base.clone(), upd(10), del(20)],
    ] {
        let (state, _) = run(&Reconciler::default(), LastWriteWins, &ops);
        assert!(state.value().deleted);
        assert_eq!(state.value().data, Value::Null);
    }
    // LWW, update later: the delete is discarded whole; the entity lives on, patched.
    let (state, _) = run(
        &Reconciler::default(),
        LastWriteWins,
        &[base.clone(), del(10), upd(20)],
    );
    assert!(!state.value().deleted);
    assert_eq!(state.value().data, json!({"n": 2, "m": 1}));
    // FIELD_LEVEL_MERGE, update later: the delete removed every field, the update's
    // field is the later write of `n`: only it survives.
    let (state, _) = run(
        &Reconciler::default(),
        FieldLevelMerge,
        &[base.clone(), del(10), upd(20)],
    );
    assert!(!state.value().deleted);
    assert_eq!(state.value().data, json!({"n": 2}));
    // A create after a delete re-creates.
    let recreate = op(
        "oc",
        "a",
        Create,
        json!({"new": true}),
        5,
        &[("s", 1), ("a", 2)],
    );
    let (state, _) = run(
        &Reconciler::default(),
        LastWriteWins,
        &[base, del(10), recreate],
    );
    assert_eq!(state.value().data, json!({"new": true}));
}

#[test]
fn test_causally_later_operation_wins_even_with_an_earlier_device_clock() {
    // b saw a but its device clock is an hour behind: it still wins.
    let a = op("oa", "a", Update, json!({"title": "A"}), 3600, &[("a", 1)]);
    let b = op(
        "ob",
        "b",
        Update,
        json!({"title": "B"}),
        0,
        &[("a", 1), ("b", 1)],
    );
    for strategy in [LastWriteWins, FieldLevelMerge, Manual] {
        for ops in [vec![a.clone(), b.clone()], vec![b.clone(), a.clone()]] {
            let (state, outcomes) = run(&Reconciler::default(), strategy, &ops);
            assert_eq!(state.value().data, json!({"title": "B"}), "{strategy:?}");
            assert!(
                outcomes.iter().all(|o| *o == Outcome::Applied),
                "{outcomes:?}"
            );
        }
    }
}

#[test]
fn test_duplicates_change_nothing() {
    let ops = fork(json!({"title": "A"}), 10, json!({"title": "B"}), 20);
    let engine = Reconciler::default();
    let (mut state, _) = run(&engine, LastWriteWins, &ops);
    let before = state.clone();
    for o in &ops {
        assert_eq!(
            engine.apply(&mut state, o, None, at(2000)).unwrap(),
            Outcome::Duplicate
        );
    }
    assert_eq!(state, before);
}

#[test]
fn test_manual_keeps_the_value_reports_both_sides_and_settles_on_a_dominating_write() {
    let ops = fork(json!({"title": "A"}), 10, json!({"title": "B"}), 20);
    let engine = Reconciler::new(Manual);
    let (mut state, outcomes) = run(&engine, Manual, &ops);
    let Outcome::Held(conflict) = &outcomes[2] else {
        panic!("{outcomes:?}")
    };
    assert!(conflict.resolution.is_none());
    let ids: Vec<_> = conflict
        .operations
        .iter()
        .map(|o| o.operation_id.as_str())
        .collect();
    assert_eq!(ids, ["ob", "oa"], "both sides are in the conflict");
    assert_eq!(conflict.operations[0].payload, json!({"title": "B"}));
    assert_eq!(state.value().data["title"], "A", "the value is kept");
    assert_eq!(state.open_conflicts().len(), 1);

    // An edit that saw only one side does not settle it.
    let a2 = op(
        "oa2",
        "a",
        Update,
        json!({"body": "x"}),
        30,
        &[("s", 1), ("a", 2)],
    );
    assert_eq!(
        engine.apply(&mut state, &a2, None, at(40)).unwrap(),
        Outcome::Applied
    );
    assert_eq!(state.open_conflicts().len(), 1);

    // A client that saw both writes the chosen value: it applies and settles the conflict.
    let resolve = op(
        "or",
        "b",
        Create,
        json!({"title": "B", "body": "x"}),
        5,
        &[("s", 1), ("a", 2), ("b", 2)],
    );
    assert_eq!(
        engine.apply(&mut state, &resolve, None, at(50)).unwrap(),
        Outcome::Applied
    );
    assert_eq!(state.value().data, json!({"title": "B", "body": "x"}));
    assert!(state.open_conflicts().is_empty());
}

#[test]
fn test_counter_merge_adds_concurrent_deltas() {
    let engine = Reconciler::default().with_merge("doc", Arc::new(CounterMerge));
    let ops = [
        op(
            "o0",
            "s",
            Create,
            json!({"likes": 10, "label": "x"}),
            0,
            &[("s", 1)],
        ),
        op(
            "oa",
            "a",
            Update,
            json!({"likes": 2}),
            10,
            &[("s", 1), ("a", 1)],
        ),
        op(
            "ob",
            "b",
            Update,
            json!({"likes": -1, "label": "y"}),
            5,
            &[("s", 1), ("b", 1)],
        ),
        op(
            "oc",
            "c",
            Update,
            json!({"likes": 5}),
            7,
            &[("s", 1), ("c", 1)],
        ),
    ];
    for perm in [[0, 1, 2, 3], [0, 3, 2, 1], [2, 0, 3, 1]] {
        let ordered: Vec<_> = perm.iter().map(|&i| ops[i].clone()).collect();
        let mut state = EntityState::new("doc", "d1");
        for o in &ordered {
            // No strategy in the request: the type's registered CUSTOM_MERGE applies.
            engine.apply(&mut state, o, None, at(100)).unwrap();
        }
        assert_eq!(
            state.value().data,
            json!({"likes": 16, "label": "y"}),
            "{perm:?}"
        );
    }
}

#[test]
fn test_bad_input_is_an_error_and_changes_nothing() {
    let engine = Reconciler::default().with_merge("doc", Arc::new(CounterMerge));
    let mut state = EntityState::new("doc", "d1");
    engine
        .apply(
            &mut state,
            &op("o0", "s", Create, json!({"likes": "many"}), 0, &[("s", 1)]),
            None,
            at(1),
        )
        .unwrap();
    let before = state.clone();
    let err = engine
        .apply(
            &mut state,
            &op("o1", "s", Update, json!({"likes": 1}), 1, &[("s", 2)]),
            None,
            at(2),
        )
        .unwrap_err();
    assert!(err.to_string().contains("payload.likes"), "{err}");
    assert_eq!(state, before);

    let mut other = op("o2", "s", Update, json!({}), 1, &[("s", 2)]);
    other.entity_id = "d2".into();
    assert!(matches!(
        engine.apply(&mut state, &other, None, at(2)),
        Err(ApplyError::WrongEntity { .. })
    ));
    let plain = Reconciler::default();
    let err = plain
        .apply(
            &mut state,
            &op("o3", "s", Update, json!({}), 1, &[("s", 2)]),
            Some(CustomMerge),
            at(2),
        )
        .unwrap_err();
    assert_eq!(
        err,
        ApplyError::NoMergeFunction {
            entity_type: "doc".into()
        }
    );
    assert_eq!(state, before);
}

#[test]
fn test_compaction_keeps_the_value_and_still_recognises_old_operations() {
    let small = Reconciler::default().with_max_history(16);
    let big = Reconciler::default();
    // 200 edits alternating between two clients, each having seen all before it.
    let mut clock = VectorClock::new();
    let mut ops = Vec::new();
    for i in 0..200u64 {
        let client = if i % 2 == 0 { "a" } else { "b" };
        clock.increment(client);
        let mut o = op(
            &format!("o{i}"),
            client,
            Update,
            json!({"n": i, format!("f{}", i % 7): i}),
            i as i64,
            &[],
        );
        o.vector_clock = clock.clone();
        ops.push(o);
    }
    let (s1, _) = run(&small, FieldLevelMerge, &ops);
    let (s2, _) = run(&big, FieldLevelMerge, &ops);
    assert_eq!(s1.value(), s2.value());
    assert!(s1.history_len() <= 16, "{}", s1.history_len());
    let mut s1b = s1.clone();
    assert_eq!(
        small.apply(&mut s1b, &ops[3], None, at(9)).unwrap(),
        Outcome::Duplicate
    );
    assert_eq!(s1b, s1);
}

#[test]
fn test_batch_is_all_or_nothing_and_reports_changes() {
    let engine = Reconciler::default().with_merge("counter", Arc::new(CounterMerge));
    let mut states = BTreeMap::new();
    let good = op("o0", "s", Create, json!({"n": 1}), 0, &[("s", 1)]);
    let out = engine
        .apply_batch(&mut states, std::slice::from_ref(&good), None, at(1))
        .unwrap();
    assert_eq!(out.changed.len(), 1);
    assert_eq!(out.resolved_operations.len(), 1);

    // The first two operations are fine; the third adds 1 to a string: the batch fails.
    let ok = op("o3", "s", Update, json!({"n": 5}), 2, &[("s", 2)]);
    let mut stringy = op("o1", "s", Create, json!({"n": "x"}), 1, &[("s", 1)]);
    stringy.entity_type = "counter".into();
    let mut delta = op("o4", "s", Update, json!({"n": 1}), 3, &[("s", 2)]);
    delta.entity_type = "counter".into();
    let before = states.clone();
    let err = engine
        .apply_batch(&mut states, &[ok, stringy, delta], None, at(3))
        .unwrap_err();
    assert!(matches!(err, ApplyError::Merge(_)), "{err}");
    assert_eq!(states, before, "a failed batch changes nothing");

    // A duplicate-only batch changes nothing and reports it as settled.
    let out = engine
        .apply_batch(&mut states, &[good], None, at(4))
        .unwrap();
    assert!(out.changed.is_empty());
    assert_eq!(out.resolved_operations.len(), 1);
}

#[test]
fn test_compaction_never_changes_what_a_retained_operation_was_applied_to() {
    // x2 is on a branch that y, w1, w2 never saw; compacting x1 and x2 must not make
    // x2's field reappear when a later, losing operation forces a refold.
    let ops = [
        op("x1", "c", Create, json!({"a": 1}), 1, &[("c", 1)]),
        op("x2", "c", Update, json!({"b": 2}), 2, &[("c", 2)]),
        op("y", "d", Update, json!({"y": 1}), 3, &[("c", 1), ("d", 1)]),
        op("w1", "d", Update, json!({"w": 1}), 4, &[("c", 1), ("d", 2)]),
        op("w2", "d", Update, json!({"w": 2}), 5, &[("c", 1), ("d", 3)]),
        op("v", "e", Update, json!({"v": 1}), 0, &[("e", 1)]),
    ];
    let small = Reconciler::default().with_max_history(4);
    let (s_small, _) = run(&small, LastWriteWins, &ops);
    let (s_big, _) = run(&Reconciler::default(), LastWriteWins, &ops);
    assert_eq!(s_small.value(), s_big.value());
    assert_eq!(s_big.value().data, json!({"a": 1, "w": 2, "y": 1}));
}

#[test]
fn test_held_manual_operations_are_never_compacted_and_stay_held_when_resent() {
    let engine = Reconciler::new(Manual).with_max_history(4);
    let mut ops = vec![
        op("o0", "s", Create, json!({"v": 0}), 0, &[("s", 1)]),
        op(
            "oa",
            "a",
            Update,
            json!({"v": "a"}),
            100,
            &[("s", 1), ("a", 1)],
        ),
    ];
    for (i, c) in ["hb", "hc", "hd", "he", "hf"].iter().enumerate() {
        ops.push(op(
            c,
            &format!("b{i}"),
            Update,
            json!({"v": c}),
            10,
            &[("s", 1), (&format!("b{i}"), 1)],
        ));
    }
    let (mut state, outcomes) = run(&engine, Manual, &ops);
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Held(_)))
            .count(),
        5,
        "{outcomes:#?}"
    );
    assert_eq!(state.open_conflicts().len(), 5);
    for held in &ops[2..] {
        assert!(
            state
                .operations()
                .any(|(_, o, h)| h && o.operation_id == held.operation_id)
        );
        let again = engine.apply(&mut state, held, None, at(200)).unwrap();
        assert!(matches!(again, Outcome::Held(_)), "{again:?}");
    }
}

#[test]
fn test_a_batch_that_replays_a_failing_stored_merge_changes_nothing() {
    let engine = Reconciler::default().with_merge("doc", Arc::new(CounterMerge));
    let mut states = BTreeMap::new();
    let base = [
        op("c0", "c", Create, json!({"likes": 0}), 10, &[("c", 1)]),
        op("c1", "c", Update, json!({"likes": 1}), 20, &[("c", 2)]),
    ];
    engine
        .apply_batch(&mut states, &base, None, at(30))
        .unwrap();
    let before = states.clone();
    let mut other = op("z", "z", Create, json!({}), 1, &[("z", 1)]);
    other.entity_id = "d2".into();
    // Sorts before c1: the refold replays c1's delta on a string and fails.
    let poison = op("p", "d", Create, json!({"likes": "x"}), 15, &[("d", 1)]);
    let err = engine.apply_batch(&mut states, &[other, poison], Some(LastWriteWins), at(40));
    assert!(err.is_err());
    assert_eq!(states, before, "nothing of the batch was kept");
}

#[test]
fn an_operation_reusing_another_ones_clock_is_refused_and_changes_nothing() {
    let engine = Reconciler::new(LastWriteWins);
    let (mut state, _) = run(
        &engine,
        LastWriteWins,
        &[op("o1", "a", Create, json!({"n": 1}), 0, &[("a", 1)])],
    );
    let before = state.clone();
    let reused = op("o2", "a", Update, json!({"n": 2}), 5, &[("a", 1)]);
    let err = engine
        .apply(&mut state, &reused, None, at(1000))
        .unwrap_err();
    assert_eq!(
        err,
        ApplyError::ClockReused {
            operation_id: "o2".into(),
            other: "o1".into()
        }
    );
    assert_eq!(state.value(), before.value());
    assert_eq!(state.history_len(), 1);
}

#[test]
fn a_malformed_operation_is_refused_by_the_engine_naming_the_field() {
    let engine = Reconciler::new(LastWriteWins);
    let mut state = EntityState::new("doc", "d1");
    let no_own_entry = op("o1", "a", Create, json!({"n": 1}), 0, &[("b", 1)]);
    match engine.apply(&mut state, &no_own_entry, None, at(1000)) {
        Err(ApplyError::Invalid {
            operation_id,
            error,
        }) => {
            assert_eq!(operation_id, "o1");
            assert_eq!(error.path, "vectorClock");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_eq!(state.history_len(), 0);
}

/// The stored form of a retained operation is the one the engine has always written:
/// `{key: {effectiveTime, depth, clientId, operationId}, strategy, held, op}`, its key
/// whole (the state keeps only the effective time and depth, and reads the ids from
/// the operation). Read back, it gives the same state and the same JSON.
#[test]
fn a_stored_state_keeps_its_json_form_and_reads_back_the_same() {
    let engine = Reconciler::default();
    let ops = [
        op("op-1", "s", Create, json!({"title": "a"}), 10, &[("s", 1)]),
        op(
            "op-2",
            "a",
            Update,
            json!({"title": "b"}),
            5,
            &[("s", 1), ("a", 1)],
        ),
    ];
    let (state, _) = run(&engine, LastWriteWins, &ops);
    let text = serde_json::to_string(&state).unwrap();
    // The second operation's timestamp (5) is raised to its predecessor's (10).
    let second = format!(
        r#"{{"key":{{"effectiveTime":{},"depth":2,"clientId":"a","operationId":"op-2"}},"strategy":"LAST_WRITE_WINS","held":false,"op":"#,
        serde_json::to_string(&at(10)).unwrap()
    );
    assert!(text.contains(&second), "{text}");
    let first = format!(
        r#"{{"key":{{"effectiveTime":{},"depth":1,"clientId":"s","operationId":"op-1"}},"#,
        serde_json::to_string(&at(10)).unwrap()
    );
    assert!(text.contains(&first), "{text}");
    let read: EntityState = serde_json::from_str(&text).unwrap();
    assert_eq!(read, state);
    assert_eq!(serde_json::to_string(&read).unwrap(), text);
    let keys: Vec<_> = read
        .operations()
        .map(|(k, o, _)| (k, o.operation_id.clone()))
        .collect();
    assert_eq!(keys[1].0.client_id, "a");
    assert_eq!(keys[1].0.effective_time, at(10));
    assert_eq!(keys[1].1, "op-2");
}
