//! `store_crash_child`: the child process of the store's crash and contention tests
//! (`tests/tests/store_crash.rs`, `tests/tests/store_contention.rs`).
//!
//! ```text
//! store_crash_child crash   <path> <seed>
//! store_crash_child contend <path> <name> <ops> <seed>
//! ```
//!
//! It works on the store file at `path` through two connections: a [`Store`] used
//! directly by the main thread, and a [`StoreWriter`] (a second connection on its own
//! thread) fed by several threads. It reports on stdout, one line per fact and only
//! after the API returned `Ok`, so that every line is a promise the store must keep:
//!
//! - `READY`: the store is open;
//! - `E <thread> <seq> <id>`: item `id` was enqueued with `seq` by `thread`;
//! - `F <id>`: it was marked in flight; `A <id>`: it was marked accepted;
//! - `DONE`: the loop ended by itself.
//!
//! `crash` enqueues (and takes and acks) in a loop until it is killed, or for at most
//! [`CRASH_MAX_SECS`] seconds. `contend` does `ops` mixed reads and writes, taking and
//! acking only items of its own lanes (named after `name`), and exits with an error on
//! the first failure, e.g. "database is locked". Every line is written with one
//! `write` call (shorter than a pipe's atomic size), so a kill never leaves a torn line
//! that looks complete.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use chrono::Utc;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use webwaka_realtime::store::{
    ItemKind, ItemState, NewItem, OutboxClass, Store, StoreConfig, StoreWriter,
};

/// How long `crash` runs when nobody kills it.
const CRASH_MAX_SECS: u64 = 30;
/// Bound on the loop of each thread of `crash`.
const CRASH_MAX_OPS: usize = 1_000_000;
/// Threads feeding the writer.
const WRITER_THREADS: usize = 3;
/// Bound on the run of `contend`.
const CONTEND_MAX_SECS: u64 = 60;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["crash", path, seed] => parse(seed).and_then(|seed| crash(path, seed)),
        ["contend", path, name, ops, seed] => parse(ops).and_then(|ops| {
            parse(seed)
                .and_then(|seed| contend(path, name, usize::try_from(ops).unwrap_or(0), seed))
        }),
        _ => Err(
            "usage: store_crash_child crash <path> <seed> | contend <path> <name> <ops> <seed>"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("store_crash_child: ERROR {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse(text: &str) -> Result<u64, String> {
    text.parse().map_err(|e| format!("{text:?}: {e}"))
}

/// Prints one line with one `write` call, and flushes.
fn say(line: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    out.write_all(format!("{line}\n").as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))
}

/// The bounds are far away: these tests are about crashes and locks, not bounds.
fn config() -> StoreConfig {
    StoreConfig {
        max_items: 100_000_000,
        max_bytes: 1 << 40,
        ..StoreConfig::default()
    }
}

fn item(lane: &str, n: usize) -> NewItem {
    NewItem::new(
        OutboxClass::C,
        ItemKind::Message,
        lane,
        json!({ "lane": lane, "n": n, "pad": "x".repeat(100) }),
    )
}

/// Starts `WRITER_THREADS` threads enqueueing through `writer` into lanes
/// `<prefix><t>` until `stop`, `deadline` or `max_ops` each.
fn start_writer_threads(
    writer: &StoreWriter,
    prefix: &str,
    max_ops: usize,
    deadline: Instant,
    stop: &Arc<AtomicBool>,
) -> Vec<thread::JoinHandle<Result<(), String>>> {
    (0..WRITER_THREADS)
        .map(|t| {
            let writer = writer.clone();
            let stop = Arc::clone(stop);
            let lane = format!("{prefix}{t}");
            thread::spawn(move || {
                for n in 0..max_ops {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        break;
                    }
                    let stored = writer
                        .enqueue(item(&lane, n), Utc::now())
                        .map_err(|e| format!("writer enqueue: {e}"))?;
                    say(&format!("E {lane} {} {}", stored.seq, stored.id))?;
                }
                Ok(())
            })
        })
        .collect()
}

fn join_all(handles: Vec<thread::JoinHandle<Result<(), String>>>) -> Result<(), String> {
    for h in handles {
        h.join()
            .map_err(|_| "a writer thread panicked".to_owned())??;
    }
    Ok(())
}

/// Enqueues, takes and acks until killed (or the time is up).
fn crash(path: &str, seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut store = Store::open(path, config()).map_err(|e| format!("open: {e}"))?;
    let writer = StoreWriter::open(path, config()).map_err(|e| format!("open writer: {e}"))?;
    say("READY")?;
    let deadline = Instant::now() + Duration::from_secs(CRASH_MAX_SECS);
    let stop = Arc::new(AtomicBool::new(false));
    let threads = start_writer_threads(&writer, "w", CRASH_MAX_OPS, deadline, &stop);
    let main_loop = (|| {
        for n in 0..CRASH_MAX_OPS {
            if Instant::now() > deadline {
                break;
            }
            let now = Utc::now();
            let lane = format!("main{}", n % 4);
            match rng.random_range(0..10) {
                0..=4 => {
                    let stored = store
                        .enqueue(item(&lane, n), now)
                        .map_err(|e| format!("enqueue: {e}"))?;
                    say(&format!("E main {} {}", stored.seq, stored.id))?;
                }
                5..=6 => {
                    let batch = (0..rng.random_range(1..=4)).map(|k| item(&lane, n * 10 + k));
                    let stored = store
                        .enqueue_many(batch.collect(), now)
                        .map_err(|e| format!("enqueue_many: {e}"))?;
                    for s in stored {
                        say(&format!("E main {} {}", s.seq, s.id))?;
                    }
                }
                _ => {
                    let heads = store
                        .next_sendable(now, 4)
                        .map_err(|e| format!("next_sendable: {e}"))?;
                    for head in heads {
                        store
                            .mark_in_flight(&head.id, now)
                            .map_err(|e| format!("mark_in_flight: {e}"))?;
                        say(&format!("F {}", head.id))?;
                        // Some stay in flight: they must be persisted after a crash.
                        if rng.random_bool(0.7) {
                            store
                                .mark_accepted(&head.id, Some("srv"), now)
                                .map_err(|e| format!("mark_accepted: {e}"))?;
                            say(&format!("A {}", head.id))?;
                        }
                    }
                }
            }
        }
        Ok::<(), String>(())
    })();
    stop.store(true, Ordering::Relaxed);
    let joined = join_all(threads);
    main_loop?;
    joined?;
    writer.close().map_err(|e| format!("close: {e}"))?;
    say("DONE")
}

/// `ops` mixed operations on a file another process uses at the same time.
fn contend(path: &str, name: &str, ops: usize, seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut store = Store::open(path, config()).map_err(|e| format!("open: {e}"))?;
    let writer = StoreWriter::open(path, config()).map_err(|e| format!("open writer: {e}"))?;
    say("READY")?;
    let deadline = Instant::now() + Duration::from_secs(CONTEND_MAX_SECS);
    let stop = Arc::new(AtomicBool::new(false));
    let prefix = format!("{name}-w");
    let threads = start_writer_threads(&writer, &prefix, ops / 4, deadline, &stop);
    let mine = |lane: &str| lane.starts_with(name);
    let main_loop = (|| {
        for n in 0..ops {
            if Instant::now() > deadline {
                return Err("out of time".to_owned());
            }
            let now = Utc::now();
            let lane = format!("{name}-main{}", n % 3);
            match rng.random_range(0..10) {
                0..=2 => {
                    let stored = store
                        .enqueue(item(&lane, n), now)
                        .map_err(|e| format!("enqueue: {e}"))?;
                    say(&format!("E {name} {} {}", stored.seq, stored.id))?;
                }
                3 => {
                    let stored = store
                        .enqueue_many(vec![item(&lane, n), item(&lane, n + ops)], now)
                        .map_err(|e| format!("enqueue_many: {e}"))?;
                    for s in stored {
                        say(&format!("E {name} {} {}", s.seq, s.id))?;
                    }
                }
                4..=5 => {
                    // Take and ack only our own items: the other process does its own.
                    let heads = store
                        .next_sendable(now, 100)
                        .map_err(|e| format!("next_sendable: {e}"))?;
                    for head in heads.into_iter().filter(|h| mine(&h.lane)).take(5) {
                        store
                            .mark_in_flight(&head.id, now)
                            .map_err(|e| format!("mark_in_flight: {e}"))?;
                        store
                            .mark_accepted(&head.id, Some("srv"), now)
                            .map_err(|e| format!("mark_accepted: {e}"))?;
                        say(&format!("A {}", head.id))?;
                    }
                }
                6 => {
                    let persisted = store
                        .list(Some(ItemState::Persisted))
                        .map_err(|e| format!("list: {e}"))?;
                    let depth = store.depth().map_err(|e| format!("depth: {e}"))?;
                    // Both read in one process can disagree (the other writes between).
                    let _ = (persisted.len(), depth.items);
                }
                7 => {
                    store
                        .kv_set(&format!("{name}.last"), Some(&n.to_string()))
                        .map_err(|e| format!("kv_set: {e}"))?;
                    let back = store
                        .kv_get(&format!("{name}.last"))
                        .map_err(|e| format!("kv_get: {e}"))?;
                    if back.as_deref() != Some(n.to_string().as_str()) {
                        return Err(format!("kv_get returned {back:?}, wrote {n}"));
                    }
                }
                8 => {
                    store
                        .record_inbound(&format!("{name}-event-{n}"), None, now)
                        .map_err(|e| format!("record_inbound: {e}"))?;
                }
                _ => {
                    // A read through the writer's connection, ordered with its enqueues.
                    writer
                        .with_store(|s| s.depth().map(|d| d.items))
                        .map_err(|e| format!("with_store: {e}"))?
                        .map_err(|e| format!("writer depth: {e}"))?;
                }
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let joined = join_all(threads);
    main_loop?;
    joined?;
    writer.close().map_err(|e| format!("close: {e}"))?;
    store
        .integrity_check()
        .map_err(|e| format!("integrity: {e}"))?;
    say("DONE")
}
