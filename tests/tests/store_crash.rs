//! The store's crash test with real processes: `store_crash_child` enqueues (directly
//! and through the group-commit writer, from several threads), takes and acks in a
//! loop, printing each fact only after the API returned; this test kills it with
//! SIGKILL at random moments, many times on the same file, and after each kill reopens
//! the store and checks that every promise was kept:
//!
//! - every printed id is there exactly once, with the seq the API returned; each
//!   thread's items are in the order it enqueued them; nothing printed in an earlier
//!   round was lost;
//! - nothing is in flight after open (in flight at the crash → persisted again), every
//!   printed ack is still accepted;
//! - at most a few items are there that were never printed (committed, then killed
//!   before the print): never more than the writes that can be in progress at once;
//! - `PRAGMA integrity_check` is ok.
//!
//! Iterations: 30 by default (well under a minute in a debug build on two cores);
//! `WEBWAKA_CRASH_ITERATIONS=N` for more. The seed is printed and can be replayed
//! with `WEBWAKA_CRASH_SEED`.

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{ChildGuard, Promises, arg, seed, temp_store};
use webwaka_realtime::store::{ItemState, Store, StoreConfig};

const DEFAULT_ITERATIONS: usize = 30;
/// Writes that can be committed but not yet printed when the child dies: one per
/// writer thread (each waits for its own item), and one `enqueue_many` of up to four.
const MAX_UNPRINTED_PER_KILL: usize = 3 + 4;

fn iterations() -> usize {
    std::env::var("WEBWAKA_CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_ITERATIONS)
}

#[test]
fn test_sigkill_at_random_moments_loses_nothing() {
    let seed = seed("store crash test");
    let mut rng = StdRng::seed_from_u64(seed);
    let (_dir, path) = temp_store();
    let iterations = iterations();
    let started = Instant::now();
    // Every id known to be in the store (printed, or found after a kill).
    let mut known: HashSet<String> = HashSet::new();
    let mut all = Promises::default();
    let mut kills_before_ready = 0;
    for round in 0..iterations {
        let child_seed = rng.random::<u64>().to_string();
        let mut child = ChildGuard::spawn(&["crash", arg(&path), &child_seed]);
        // Anywhere from during the open (one kill in five aims there) to well into
        // the loop.
        let delay = if rng.random_bool(0.2) {
            rng.random_range(0..20)
        } else {
            rng.random_range(0..250)
        };
        std::thread::sleep(Duration::from_millis(delay));
        child.kill();
        let (lines, stderr) = child.output();
        let mut promises = Promises::default();
        promises.read(&lines);
        assert!(
            !promises.done,
            "round {round}: the child ended by itself: {stderr}"
        );
        assert!(
            !stderr.contains("ERROR"),
            "round {round}: the child failed: {stderr}"
        );
        if !promises.ready {
            kills_before_ready += 1;
        }
        let found = check(&path, &promises, &all, &known, round);
        known.extend(found);
        known.extend(promises.enqueued.keys().cloned());
        all.enqueued.extend(promises.enqueued);
        all.accepted.extend(promises.accepted);
    }
    println!(
        "{iterations} kills ({kills_before_ready} during open), {} items printed, {} in the \
         store, {:.1} s",
        all.enqueued.len(),
        known.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        !all.enqueued.is_empty(),
        "the children never got to enqueue"
    );
}

/// Reopens the store after a kill and checks the promises of this round (`now`) and
/// of the earlier ones (`before`, `known`). Returns the ids found in the store.
fn check(
    path: &std::path::Path,
    now: &Promises,
    before: &Promises,
    known: &HashSet<String>,
    round: usize,
) -> Vec<String> {
    let store = Store::open(path, StoreConfig::default())
        .unwrap_or_else(|e| panic!("round {round}: reopen failed: {e}"));
    store
        .integrity_check()
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
    let items = store.list(None).unwrap();

    // Exactly once, seq increasing (list is in seq order).
    let mut seen = HashSet::new();
    for w in items.windows(2) {
        assert!(w[0].seq < w[1].seq, "round {round}: seq not increasing");
    }
    for item in &items {
        assert!(
            seen.insert(item.id.as_str()),
            "round {round}: {} twice",
            item.id
        );
        assert_ne!(
            item.state,
            ItemState::InFlight,
            "round {round}: {} still in flight after open",
            item.id
        );
    }
    let by_id: std::collections::HashMap<&str, &webwaka_realtime::store::OutboxItem> =
        items.iter().map(|i| (i.id.as_str(), i)).collect();

    // Every printed id, with the seq the API returned; nothing from earlier lost.
    for (id, (thread, seq)) in now.enqueued.iter().chain(before.enqueued.iter()) {
        let item = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("round {round}: {id} (printed by {thread}) is lost"));
        assert_eq!(item.seq, *seq, "round {round}: {id} has another seq");
    }
    for id in known {
        assert!(
            by_id.contains_key(id.as_str()),
            "round {round}: {id} was there before, is lost now"
        );
    }
    // Each thread's items in the order it enqueued them.
    for (thread, ids) in &now.by_thread {
        let seqs: Vec<i64> = ids.iter().map(|id| by_id[id.as_str()].seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "round {round}: {thread}'s items out of order"
        );
    }
    // Acks are durable; in flight at the crash is persisted (or acked) after it.
    for id in now.accepted.iter().chain(before.accepted.iter()) {
        assert_eq!(
            by_id[id.as_str()].state,
            ItemState::Accepted,
            "round {round}: ack of {id} lost"
        );
    }
    for id in &now.in_flight {
        let item = by_id[id.as_str()];
        assert!(
            matches!(item.state, ItemState::Persisted | ItemState::Accepted),
            "round {round}: {id} is {}",
            item.state
        );
        assert!(item.attempts >= 1, "round {round}: {id} lost its attempt");
    }
    // Committed but never printed: only what could be in progress at the kill.
    let unprinted = items
        .iter()
        .filter(|i| !known.contains(&i.id) && !now.enqueued.contains_key(&i.id))
        .count();
    assert!(
        unprinted <= MAX_UNPRINTED_PER_KILL,
        "round {round}: {unprinted} items nobody was told about"
    );
    items.into_iter().map(|i| i.id).collect()
}
