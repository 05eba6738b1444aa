//! The reconciliation engine (`bench reconcile`), measured against the engine it
//! replaced (`reconcile::reference`, the code before issue 16) in the same run.
//!
//! Parts (`WEBWAKA_BENCH_RECONCILE=throughput,memory,history`, all by default):
//!
//! - **throughput**: operations reconciled per second for each strategy, over 100,000
//!   operations on 1,000 entities with about 10 % concurrent edits; with the CPU time
//!   and the allocations per operation. The workload is made before the clock starts:
//!   10 clients edit 1,000 entities, 100 operations each. Before an edit a client
//!   normally syncs the entity (its view of the clock becomes the entity's); one edit
//!   in ten is made from its stale view instead, which is concurrent with whatever
//!   other clients wrote meanwhile. Operations arrive interleaved across entities, each
//!   entity's in the order they were made, in requests of 100 operations
//!   (`Reconciler::apply_batch`, as the server runs it). Runs of the two engines
//!   alternate.
//! - **memory**: bytes allocated per retained operation once that workload is applied
//!   (100 retained per entity), per engine.
//! - **history**: the cost of one operation as the retained history per entity grows
//!   (10 to 10,000 operations) and the share of concurrent operations (0, 10, 50 %).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use webwaka_realtime::VectorClock;
use webwaka_realtime::protocol::Timestamp;
use webwaka_realtime::protocol::{Operation, OperationType, ResolutionStrategy};
use webwaka_realtime::reconcile::{
    BatchOutcome, CounterMerge, EntityKey, EntityState, Reconciler, reference,
};

use super::{Row, alloc, fmt_rate, median, per_second, wanted};

/// Selects parts of this group.
pub const ONLY_ENV: &str = "WEBWAKA_BENCH_RECONCILE";

const ENTITIES: usize = 1_000;
const OPS_PER_ENTITY: usize = 100;
const CLIENTS: usize = 10;
const STALE_EDITS: f64 = 0.10;
const BATCH: usize = 100;
const RUNS: usize = 5;

/// The workload, and how many of its operations are concurrent with an earlier one.
///
/// Shared (`Arc`), as the server decodes a request for the engine.
pub fn workload(seed: u64, numeric: bool) -> (Vec<Arc<Operation>>, usize) {
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
            out.push(Arc::new(ops[i].clone()));
        }
    }
    (out, concurrent)
}

/// Which engine a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    New,
    Reference,
}

impl Which {
    fn label(self) -> &'static str {
        match self {
            Which::New => "",
            Which::Reference => ", reference engine",
        }
    }
}

/// The entity states of one engine.
enum States {
    New(BTreeMap<EntityKey, EntityState>),
    Reference(BTreeMap<EntityKey, reference::EntityState>),
}

impl States {
    fn new(which: Which) -> States {
        match which {
            Which::New => States::New(BTreeMap::new()),
            Which::Reference => States::Reference(BTreeMap::new()),
        }
    }

    fn apply(
        &mut self,
        engine: &Reconciler,
        batch: &[Arc<Operation>],
        strategy: ResolutionStrategy,
        now: Timestamp,
    ) -> Result<BatchOutcome, String> {
        match self {
            States::New(states) => engine.apply_batch(states, batch, Some(strategy), now),
            States::Reference(states) => {
                reference::apply_batch(engine, states, batch, Some(strategy), now)
            }
        }
        .map_err(|e| e.to_string())
    }

    fn retained(&self) -> usize {
        match self {
            States::New(states) => states.values().map(EntityState::history_len).sum(),
            States::Reference(states) => states.values().map(|s| s.history_len()).sum(),
        }
    }
}

/// CPU time (user + system) of the calling thread, from `/proc/thread-self/stat`
/// (10 ms resolution: summed over runs of a second or more).
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // Fields after the command name (in parentheses) start at field 3; utime and
    // stime are fields 14 and 15, in USER_HZ (100 on Linux). Read without collecting
    // the fields: a large allocation here would make the allocator consolidate the
    // previous run's frees inside the measured CPU time.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Runs the reconciliation benchmarks (see the module docs for the parts).
pub fn run() -> Vec<Row> {
    let mut rows = Vec::new();
    if wanted(ONLY_ENV, "throughput") {
        rows.extend(throughput());
    }
    if wanted(ONLY_ENV, "memory") {
        rows.extend(memory());
    }
    if wanted(ONLY_ENV, "history") {
        rows.extend(history());
    }
    rows
}

/// What the throughput runs of one engine measured.
#[derive(Default)]
struct Runs {
    rates: Vec<f64>,
    cpu: Duration,
    cpu_known: bool,
    ops: usize,
    allocations: Option<u64>,
    conflicts: usize,
}

fn throughput() -> Vec<Row> {
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
        let mut runs = [Runs::default(), Runs::default()];
        for run in 0..RUNS {
            // Alternate which engine goes first.
            let order = if run % 2 == 0 {
                [Which::New, Which::Reference]
            } else {
                [Which::Reference, Which::New]
            };
            for which in order {
                let r = &mut runs[which as usize];
                let mut states = States::new(which);
                let now = Utc::now();
                let cpu_before = thread_cpu();
                let start = Instant::now();
                let mut conflicts = 0;
                for batch in ops.chunks(BATCH) {
                    match states.apply(&engine, batch, strategy, now) {
                        Ok(out) => conflicts += out.conflicts.len(),
                        Err(e) => {
                            eprintln!("bench reconcile: {strategy:?}: {e}");
                            return rows;
                        }
                    }
                }
                let elapsed = start.elapsed();
                if let (Some(before), Some(after)) = (cpu_before, thread_cpu()) {
                    r.cpu += after.saturating_sub(before);
                    r.cpu_known = true;
                }
                r.rates.push(per_second(ops.len(), elapsed));
                r.ops += ops.len();
                r.conflicts = conflicts;
            }
        }
        // Allocations: one more run of each, untimed (counting costs time).
        for which in [Which::New, Which::Reference] {
            let mut states = States::new(which);
            let now = Utc::now();
            if alloc::start().is_some() {
                for batch in ops.chunks(BATCH) {
                    let _ = states.apply(&engine, batch, strategy, now);
                }
                runs[which as usize].allocations = Some(alloc::stop().allocations);
            }
        }
        let reference_rate = median(&mut runs[1].rates.clone());
        for which in [Which::New, Which::Reference] {
            let r = &mut runs[which as usize];
            let rate = median(&mut r.rates);
            let cpu = if r.cpu_known {
                format!(
                    "CPU {:.2} µs/op",
                    r.cpu.as_secs_f64() * 1e6 / r.ops.max(1) as f64
                )
            } else {
                "CPU unknown".to_owned()
            };
            let allocations = r.allocations.map_or(String::new(), |a| {
                format!(", {:.1} allocations/op", a as f64 / ops.len() as f64)
            });
            let versus = if which == Which::New {
                format!(", {:.1}× the reference", rate / reference_rate.max(1e-9))
            } else {
                String::new()
            };
            rows.push(Row {
                name: format!("reconcile {strategy:?}{}", which.label()),
                figure: format!("{} ({cpu}{allocations}{versus})", fmt_rate(rate)),
                method: format!(
                    "{} ops on {ENTITIES} entities, {:.1} % concurrent ({} conflicts), requests of {BATCH}, median of {RUNS} runs alternating with the other engine's, one thread; CPU: thread utime+stime over the {RUNS} runs ÷ ops; allocations: one more run, counted by the bench binary's allocator",
                    ops.len(),
                    100.0 * text_concurrent as f64 / text_ops.len() as f64,
                    r.conflicts,
                ),
            });
        }
    }
    rows
}

/// Bytes allocated per retained operation once the throughput workload is applied.
fn memory() -> Vec<Row> {
    let (ops, _) = workload(7, false);
    let engine = Reconciler::default();
    let mut rows = Vec::new();
    for which in [Which::New, Which::Reference] {
        let now = Utc::now();
        if alloc::start().is_none() {
            return rows;
        }
        let mut states = States::new(which);
        for batch in ops.chunks(BATCH) {
            if let Err(e) = states.apply(&engine, batch, ResolutionStrategy::FieldLevelMerge, now) {
                alloc::stop();
                eprintln!("bench reconcile: memory: {e}");
                return rows;
            }
        }
        let counts = alloc::stop();
        let retained = states.retained();
        rows.push(Row {
            name: format!("reconcile: memory per retained operation{}", which.label()),
            figure: format!("{:.0} B", counts.live_bytes as f64 / retained.max(1) as f64),
            method: format!(
                "bytes left allocated (counted by the bench binary's allocator) after applying the throughput workload with FieldLevelMerge ({} ops, {retained} retained on {ENTITIES} entities: the states, their indexes and caches, the map of states) ÷ retained operations; each operation carries a CREATE of 8 fields or an UPDATE of 1–2, a 10-client clock",
                ops.len()
            ),
        });
    }
    rows
}

const HISTORIES: [usize; 4] = [10, 100, 1_000, 10_000];
const SHARES: [f64; 3] = [0.0, 0.10, 0.50];
const HISTORY_MEASURED: usize = 20_000;
const HISTORY_REFERENCE_MEASURED: usize = 2_000;
const HISTORY_RUNS: usize = 3;
const HISTORY_CLIENTS: usize = 8;
const HISTORY_BATCH: usize = 10;

/// One entity's operations: `share` of them made from a view that misses the last 1–4
/// operations (by a client that wrote none of them), with a timestamp that sorts them
/// before those (so each has 1–4 operations after its place); the rest saw everything.
fn history_workload(count: usize, share: f64, seed: u64) -> Vec<Arc<Operation>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let base = Utc
        .timestamp_opt(1_780_000_000, 0)
        .single()
        .unwrap_or_default();
    let at = |i: usize| base + chrono::Duration::milliseconds(i as i64 * 1000);
    let mut entity_clock = VectorClock::new();
    let mut after: Vec<VectorClock> = Vec::with_capacity(count);
    let mut authors: Vec<usize> = Vec::with_capacity(count);
    let mut ops = Vec::with_capacity(count);
    for i in 0..count {
        let missed = rng.random_range(1..=4usize);
        let stale = i > missed + 1 && share > 0.0 && rng.random_bool(share);
        let (client, mut clock, timestamp) = if stale {
            let recent = &authors[i - missed..];
            let first = rng.random_range(0..HISTORY_CLIENTS);
            let client = (0..HISTORY_CLIENTS)
                .map(|k| (first + k) % HISTORY_CLIENTS)
                .find(|c| !recent.contains(c))
                .unwrap_or(first);
            let view = after[i - missed - 1].clone();
            let timestamp = at(i - missed) - chrono::Duration::milliseconds(500);
            (client, view, timestamp)
        } else {
            let client = rng.random_range(0..HISTORY_CLIENTS);
            (client, entity_clock.clone(), at(i))
        };
        let client_id = format!("client-{client}");
        clock.increment(&client_id);
        entity_clock.merge(&clock);
        let (operation_type, payload) = if i == 0 {
            let fields: Map<String, Value> = (0..8).map(|f| (format!("f{f}"), json!(0))).collect();
            (OperationType::Create, Value::Object(fields))
        } else {
            let mut patch = Map::new();
            for _ in 0..rng.random_range(1..3) {
                patch.insert(
                    format!("f{}", rng.random_range(0..8)),
                    json!(format!("v{}", rng.random_range(0..1000))),
                );
            }
            (OperationType::Update, Value::Object(patch))
        };
        ops.push(Arc::new(Operation {
            operation_id: format!("op-{i}"),
            client_id,
            tenant_id: "bench".into(),
            entity_type: "doc".into(),
            entity_id: "entity".into(),
            operation_type,
            payload,
            timestamp,
            vector_clock: clock,
            metadata: None,
        }));
        after.push(entity_clock.clone());
        authors.push(client);
    }
    ops
}

/// Nanoseconds per operation of the last `measured` operations of `ops`, after the
/// others were applied (untimed).
fn history_run(
    which: Which,
    engine: &Reconciler,
    strategy: ResolutionStrategy,
    ops: &[Arc<Operation>],
    measured: usize,
) -> Result<f64, String> {
    let (prefill, timed) = ops.split_at(ops.len() - measured);
    let mut states = States::new(which);
    let now = Utc::now();
    for batch in prefill.chunks(HISTORY_BATCH) {
        states.apply(engine, batch, strategy, now)?;
    }
    let start = Instant::now();
    for batch in timed.chunks(HISTORY_BATCH) {
        states.apply(engine, batch, strategy, now)?;
    }
    Ok(start.elapsed().as_secs_f64() * 1e9 / measured as f64)
}

fn history() -> Vec<Row> {
    let mut rows = Vec::new();
    let fmt_ns = |ns: f64| {
        if ns >= 10_000.0 {
            format!("{:.0} µs", ns / 1000.0)
        } else {
            format!("{:.2} µs", ns / 1000.0)
        }
    };
    for strategy in [
        ResolutionStrategy::LastWriteWins,
        ResolutionStrategy::FieldLevelMerge,
    ] {
        for which in [Which::New, Which::Reference] {
            for history in HISTORIES {
                let measured = match which {
                    Which::New => HISTORY_MEASURED,
                    Which::Reference if history <= 1_000 => HISTORY_REFERENCE_MEASURED,
                    Which::Reference => continue,
                };
                let engine = Reconciler::new(strategy).with_max_history(history);
                let mut cells = Vec::new();
                for share in SHARES {
                    let ops = history_workload(2 * history + 100 + measured, share, 11);
                    let runs = if which == Which::New { HISTORY_RUNS } else { 1 };
                    let mut samples = Vec::with_capacity(runs);
                    for _ in 0..runs {
                        match history_run(which, &engine, strategy, &ops, measured) {
                            Ok(ns) => samples.push(ns),
                            Err(e) => {
                                eprintln!("bench reconcile: history: {e}");
                                return rows;
                            }
                        }
                    }
                    cells.push(format!(
                        "{:.0} %: {}",
                        share * 100.0,
                        fmt_ns(median(&mut samples))
                    ));
                }
                rows.push(Row {
                    name: format!(
                        "reconcile per op, history {history} ({strategy:?}{})",
                        which.label()
                    ),
                    figure: cells.join(" · "),
                    method: format!(
                        "one entity, max_history {history} (between {} and {history} retained after the first compaction), {} ops applied first, then {measured} timed in requests of {HISTORY_BATCH}; the given share of ops misses the last 1–4 ops and sorts before them, the rest saw everything; {HISTORY_CLIENTS} clients, UPDATEs of 1–2 of 8 fields; wall time ÷ ops, {}",
                        history * 3 / 4,
                        2 * history + 100,
                        if which == Which::New {
                            format!("median of {HISTORY_RUNS} runs")
                        } else {
                            "one run".to_owned()
                        }
                    ),
                });
            }
        }
    }
    rows
}
