//! Two processes on one store file (an app and its extension): two `store_crash_child
//! contend` processes start at the same moment on a new file (both create and migrate
//! it), then enqueue, take, ack, read, write key/values and record inbound events,
//! each through two connections (direct and the group-commit writer). Both must finish
//! without an error, in particular without "database is locked", and the file must be
//! sound and hold everything both were told was stored.

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{ChildGuard, Promises, arg, seed, temp_store};
use webwaka_realtime::store::{ItemState, Store, StoreConfig};

/// Operations of each process's main thread per round (its writer threads add some).
const OPS: usize = 400;
/// Rounds: each on a new file, so the simultaneous creation is tested each time, and
/// the last one again on the file of the one before.
const ROUNDS: usize = 3;

#[test]
fn test_two_processes_share_one_file_without_lock_errors() {
    let seed = seed("store contention test");
    let mut rng = StdRng::seed_from_u64(seed);
    let (_dir, path) = temp_store();
    for round in 0..ROUNDS {
        if round + 1 < ROUNDS {
            // A new file for every round but the last.
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
        let ops = OPS.to_string();
        let seeds = [
            rng.random::<u64>().to_string(),
            rng.random::<u64>().to_string(),
        ];
        let mut children = [
            ChildGuard::spawn(&["contend", arg(&path), "app", &ops, &seeds[0]]),
            ChildGuard::spawn(&["contend", arg(&path), "ext", &ops, &seeds[1]]),
        ];
        let mut all = Promises::default();
        for (name, child) in ["app", "ext"].iter().zip(children.iter_mut()) {
            let status = child.wait(Duration::from_secs(90));
            let (lines, stderr) = child.output();
            assert!(
                !stderr.to_lowercase().contains("locked"),
                "round {round}: {name}: {stderr}"
            );
            let status = status.unwrap_or_else(|| panic!("round {round}: {name} timed out"));
            assert!(status.success(), "round {round}: {name} failed: {stderr}");
            let mut promises = Promises::default();
            promises.read(&lines);
            assert!(promises.done, "round {round}: {name} did not finish");
            all.enqueued.extend(promises.enqueued);
            all.accepted.extend(promises.accepted);
        }
        let store = Store::open(&path, StoreConfig::default()).unwrap();
        store.integrity_check().unwrap();
        for (id, (_, seq)) in &all.enqueued {
            let item = store
                .get(id)
                .unwrap()
                .unwrap_or_else(|| panic!("round {round}: {id} lost"));
            assert_eq!(item.seq, *seq);
        }
        for id in &all.accepted {
            assert_eq!(store.get(id).unwrap().unwrap().state, ItemState::Accepted);
        }
        println!(
            "round {round}: {} items enqueued, {} acked by two processes",
            all.enqueued.len(),
            all.accepted.len()
        );
    }
}
