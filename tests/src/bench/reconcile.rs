//! Reconciliation throughput: operations reconciled per second by the engine, for each
//! strategy, over 100,000 operations on 1,000 entities with about 10 % concurrent edits.
//!
//! The workload is made before the clock starts: 10 clients edit 1,000 entities, 100
//! operations each. Before an edit a client normally syncs the entity (its view of the
//! clock becomes the entity's); one edit in ten is made from its stale view instead,
//! which is concurrent with whatever other clients wrote meanwhile. Operations arrive
//! interleaved across entities, each entity's in the order they were made, in requests
//! of 100 operations (`Reconciler::apply_batch`, as the server runs it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::{TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use webwaka_realtime::VectorClock;
use webwaka_realtime::protocol::{Operation, OperationType, ResolutionStrategy};
use webwaka_realtime::reconcile::{CounterMerge, EntityKey, EntityState, Reconciler};

use super::{Row, fmt_rate, median, per_second};

const ENTITIES: usize = 1_000;
const OPS_PER_ENTITY: usize = 100;
const CLIENTS: usize = 10;
const STALE_EDITS: f64 = 0.10;
const BATCH: usize = 100;
const RUNS: usize = 5;

/// The workload, and how many of its operations are concurrent with an earlier one.
pub fn workload(seed: u64, numeric: bool) -> (Vec<Operation>, usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let base = Utc
        .timestamp_opt(1_780_000_000, 0)
        .single()
        .unwrap_or_default();
    let mut per_entity: Vec<Vec<Operation>> = Vec::with_capacity(ENTITIES);
    let mut concurrent = 0;
    for e in 0..ENTITIES {
        let mut entity_clock = VectorClock::new();
        let mut views = vec![VectorClock::new(); CLIENTS];
        let mut ops = Vec::with_capacity(OPS_PER_ENTITY);
        for i in 0..OPS_PER_ENTITY {
            let c = rng.random_range(0..CLIENTS);
            let client = format!("client-{c}");
            if i == 0 || !rng.random_bool(STALE_EDITS) {
                views[c] = entity_clock.clone();
            }
            views[c].increment(&client);
            let clock = views[c].clone();
            if clock.is_concurrent_with(&entity_clock) {
                concurrent += 1;
            }
            entity_clock.merge(&clock);
            let (operation_type, payload) = if i == 0 {
                let fields: Map<String, Value> =
                    (0..8).map(|f| (format!("f{f}"), json!(0))).collect();
                (OperationType::Create, Value::Object(fields))
            } else {
                let mut patch = Map::new();
                for _ in 0..rng.random_range(1..3) {
                    let v = if numeric {
                        json!(rng.random_range(-3..4))
                    } else {
                        json!(format!("v{}", rng.random_range(0..1000)))
                    };
                    patch.insert(format!("f{}", rng.random_range(0..8)), v);
                }
                (OperationType::Update, Value::Object(patch))
            };
            ops.push(Operation {
                operation_id: format!("op-{e}-{i}"),
                client_id: client,
                tenant_id: "bench".into(),
                entity_type: "doc".into(),
                entity_id: format!("entity-{e}"),
                operation_type,
                payload,
                timestamp: base
                    + chrono::Duration::milliseconds((i * 1000 + rng.random_range(0..5000)) as i64),
                vector_clock: clock,
                metadata: None,
            });
        }
        per_entity.push(ops);
    }
    // Interleave: round-robin over entities, each entity's operations in order.
    let mut out = Vec::with_capacity(ENTITIES * OPS_PER_ENTITY);
    for i in 0..OPS_PER_ENTITY {
        for ops in &per_entity {
            out.push(ops[i].clone());
        }
    }
    (out, concurrent)
}

/// Runs the reconciliation benchmark for every strategy.
pub fn run() -> Vec<Row> {
    let (text_ops, text_concurrent) = workload(7, false);
    let (num_ops, _) = workload(7, true);
    let engine = Reconciler::default().with_merge("doc", Arc::new(CounterMerge));
    let mut rows = Vec::new();
    for strategy in [
        ResolutionStrategy::LastWriteWins,
        ResolutionStrategy::FieldLevelMerge,
        ResolutionStrategy::CustomMerge,
        ResolutionStrategy::Manual,
    ] {
        let ops = if strategy == ResolutionStrategy::CustomMerge {
            &num_ops
        } else {
            &text_ops
        };
        let mut rates = Vec::with_capacity(RUNS);
        let mut conflicts = 0;
        for _ in 0..RUNS {
            let mut states: BTreeMap<EntityKey, EntityState> = BTreeMap::new();
            let now = Utc::now();
            let start = Instant::now();
            conflicts = 0;
            for batch in ops.chunks(BATCH) {
                match engine.apply_batch(&mut states, batch, Some(strategy), now) {
                    Ok(out) => conflicts += out.conflicts.len(),
                    Err(e) => {
                        eprintln!("bench reconcile: {strategy:?}: {e}");
                        return rows;
                    }
                }
            }
            rates.push(per_second(ops.len(), start.elapsed()));
        }
        rows.push(Row {
            name: format!("reconcile {strategy:?}"),
            figure: fmt_rate(median(&mut rates)),
            method: format!(
                "{} ops on {ENTITIES} entities, {:.1} % concurrent ({conflicts} conflicts), requests of {BATCH}, median of {RUNS} runs, one thread",
                ops.len(),
                100.0 * text_concurrent as f64 / text_ops.len() as f64,
            ),
        });
    }
    rows
}
