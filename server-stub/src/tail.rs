//! The recent end of each tenant's log, in memory: what polls and resumes read when the
//! cursor is recent (the usual case: a client polls from where its last page ended).
//!
//! Every event appended to a tenant's log is pushed here by the writer thread after its
//! commit, in sequence order (after-commit effects run in commit order, and nothing is
//! pushed for a batch that failed). A tenant's tail therefore knows a sequence,
//! `covers_after`, such that every committed event of the tenant with a greater sequence
//! is in it. A read whose cursor is in the tail (or, with no cursor, a tail that covers
//! the whole log) is answered from memory; any other read goes to SQLite. The tail is
//! only ever a faster path to the same answer: same visibility rule, same retention
//! cutoff, same order (tests compare both paths).
//!
//! Bounded per tenant by bytes ([`Tail::new`]); the oldest events leave first and
//! `covers_after` moves up with them. The tail starts empty at each start of the server
//! and covers a tenant from its first append on (reads from older cursors use SQLite).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Bytes an entry costs besides its strings (the entry, its map slot, the `Arc`s).
const ENTRY_OVERHEAD: usize = 160;

/// One committed event, as the log stores it.
#[derive(Debug, Clone)]
pub(crate) struct TailEvent {
    pub(crate) seq: u64,
    pub(crate) event_id: Arc<str>,
    pub(crate) created_ms: i64,
    pub(crate) recipient: Option<Box<str>>,
    pub(crate) room: Option<Box<str>>,
    pub(crate) sender: Option<Box<str>>,
    /// The event's JSON, as stored (shared, not copied: the writer hands over the
    /// string it inserted).
    pub(crate) body: Arc<String>,
}

impl TailEvent {
    fn cost(&self) -> usize {
        let len = |s: &Option<Box<str>>| s.as_deref().map_or(0, str::len);
        ENTRY_OVERHEAD
            + self.body.len()
            + 2 * self.event_id.len()
            + len(&self.recipient)
            + len(&self.room)
            + len(&self.sender)
    }
}

/// What the tail knows of a cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CursorLookup {
    /// In the tail: its sequence and creation time.
    Found { seq: u64, created_ms: i64 },
    /// Not in the tail: ask SQLite.
    Unknown,
}

/// One tenant's recent events.
#[derive(Debug, Default)]
struct TenantTail {
    /// Every committed event with a greater sequence is in `events`.
    covers_after: u64,
    events: VecDeque<TailEvent>,
    /// Event id → (sequence, creation time), for the events in `events`.
    ids: HashMap<Arc<str>, (u64, i64)>,
    bytes: usize,
}

impl TenantTail {
    fn pop_front(&mut self) {
        if let Some(old) = self.events.pop_front() {
            self.ids.remove(&old.event_id);
            self.bytes -= old.cost();
            self.covers_after = old.seq;
        }
    }
}

/// The recent tail of every tenant's log.
#[derive(Debug)]
pub(crate) struct Tail {
    tenants: RwLock<HashMap<String, Arc<RwLock<TenantTail>>>>,
    max_bytes: usize,
}

impl Tail {
    /// A tail keeping at most `max_bytes` per tenant (0: keep nothing, every read goes
    /// to SQLite).
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            tenants: RwLock::new(HashMap::new()),
            max_bytes,
        }
    }

    fn tenant(&self, tenant: &str) -> Option<Arc<RwLock<TenantTail>>> {
        self.tenants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(tenant)
            .cloned()
    }

    /// Records a committed event. Called by the writer thread after the commit, in
    /// sequence order for each tenant.
    pub(crate) fn push(&self, tenant: &str, event: TailEvent) {
        if self.max_bytes == 0 {
            return;
        }
        let slot = match self.tenant(tenant) {
            Some(slot) => slot,
            None => {
                let mut tenants = self
                    .tenants
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                Arc::clone(tenants.entry(tenant.to_owned()).or_insert_with(|| {
                    // Everything before this first event is in SQLite only.
                    Arc::new(RwLock::new(TenantTail {
                        covers_after: event.seq.saturating_sub(1),
                        ..TenantTail::default()
                    }))
                }))
            }
        };
        let mut tail = write(&slot);
        let last = tail.events.back().map_or(tail.covers_after, |e| e.seq);
        if event.seq <= last {
            // Cannot happen while pushes come in commit order; if it ever did, the
            // tail would no longer be complete: start it again from this event.
            tracing::warn!(
                tenant,
                seq = event.seq,
                last,
                "log tail out of order; restarted"
            );
            *tail = TenantTail {
                covers_after: event.seq.saturating_sub(1),
                ..TenantTail::default()
            };
        }
        tail.bytes += event.cost();
        tail.ids
            .insert(Arc::clone(&event.event_id), (event.seq, event.created_ms));
        tail.events.push_back(event);
        while tail.bytes > self.max_bytes && !tail.events.is_empty() {
            tail.pop_front();
        }
    }

    /// Where event `event_id` sits, if the tail has it.
    pub(crate) fn cursor(&self, tenant: &str, event_id: &str) -> CursorLookup {
        let Some(slot) = self.tenant(tenant) else {
            return CursorLookup::Unknown;
        };
        let tail = read(&slot);
        match tail.ids.get(event_id) {
            Some(&(seq, created_ms)) => CursorLookup::Found { seq, created_ms },
            None => CursorLookup::Unknown,
        }
    }

    /// Up to `limit` events after `after_seq` created at or after `cutoff_ms` for which
    /// `visible` holds, in sequence order; `None` when the tail does not cover
    /// everything after `after_seq` (ask SQLite).
    pub(crate) fn after<T>(
        &self,
        tenant: &str,
        after_seq: u64,
        cutoff_ms: i64,
        limit: usize,
        visible: impl Fn(&TailEvent) -> bool,
        mut take: impl FnMut(&TailEvent) -> T,
    ) -> Option<Vec<T>> {
        let slot = self.tenant(tenant)?;
        let tail = read(&slot);
        if after_seq < tail.covers_after {
            return None;
        }
        // Sequences increase along the deque: skip to the first one after the cursor.
        let start = tail.events.partition_point(|e| e.seq <= after_seq);
        Some(
            tail.events
                .range(start..)
                .filter(|e| e.created_ms >= cutoff_ms && visible(e))
                .take(limit)
                .map(&mut take)
                .collect(),
        )
    }
}

fn read(slot: &RwLock<TenantTail>) -> RwLockReadGuard<'_, TenantTail> {
    slot.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write(slot: &RwLock<TenantTail>) -> RwLockWriteGuard<'_, TenantTail> {
    slot.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn event(seq: u64, body_len: usize) -> TailEvent {
        TailEvent {
            seq,
            event_id: format!("e{seq}").into(),
            created_ms: seq as i64 * 10,
            recipient: None,
            room: None,
            sender: None,
            body: Arc::new("x".repeat(body_len)),
        }
    }

    fn seqs(tail: &Tail, after: u64, cutoff: i64, limit: usize) -> Option<Vec<u64>> {
        tail.after("t", after, cutoff, limit, |_| true, |e| e.seq)
    }

    #[test]
    fn a_tail_covers_from_its_first_event() {
        let tail = Tail::new(1 << 20);
        assert_eq!(seqs(&tail, 0, 0, 10), None, "unknown tenant");
        tail.push("t", event(5, 10));
        tail.push("t", event(6, 10));
        assert_eq!(seqs(&tail, 3, 0, 10), None, "event 4 may exist: SQLite");
        assert_eq!(seqs(&tail, 4, 0, 10), Some(vec![5, 6]));
        assert_eq!(seqs(&tail, 5, 0, 10), Some(vec![6]));
        assert_eq!(seqs(&tail, 6, 0, 10), Some(vec![]));
        assert_eq!(seqs(&tail, 4, 0, 1), Some(vec![5]));
        assert_eq!(seqs(&tail, 4, 60, 10), Some(vec![6]), "cutoff applies");
        assert_eq!(
            tail.cursor("t", "e5"),
            CursorLookup::Found {
                seq: 5,
                created_ms: 50
            }
        );
        assert_eq!(tail.cursor("t", "e4"), CursorLookup::Unknown);
        assert_eq!(tail.cursor("u", "e5"), CursorLookup::Unknown);

        // A tenant whose first event is 1 is covered from the start.
        let fresh = Tail::new(1 << 20);
        fresh.push("t", event(1, 10));
        assert_eq!(seqs(&fresh, 0, 0, 10), Some(vec![1]));
    }

    #[test]
    fn eviction_moves_the_coverage_up() {
        let one = event(1, 100).cost();
        let tail = Tail::new(3 * one);
        for seq in 1..=5 {
            tail.push("t", event(seq, 100));
        }
        // Events 1 and 2 left: a cursor at 1 needs SQLite, one at 2 does not.
        assert_eq!(seqs(&tail, 1, 0, 10), None);
        assert_eq!(seqs(&tail, 2, 0, 10), Some(vec![3, 4, 5]));
        assert_eq!(tail.cursor("t", "e2"), CursorLookup::Unknown);
        assert!(matches!(
            tail.cursor("t", "e3"),
            CursorLookup::Found { seq: 3, .. }
        ));
        // An event larger than the whole budget leaves nothing, and covers up to it.
        tail.push("t", event(6, 4 * one));
        assert_eq!(seqs(&tail, 5, 0, 10), None);
        assert_eq!(seqs(&tail, 6, 0, 10), Some(vec![]));
    }

    #[test]
    fn an_out_of_order_push_restarts_the_tail() {
        let tail = Tail::new(1 << 20);
        tail.push("t", event(5, 1));
        tail.push("t", event(6, 1));
        tail.push("t", event(6, 1));
        assert_eq!(seqs(&tail, 4, 0, 10), None);
        assert_eq!(seqs(&tail, 5, 0, 10), Some(vec![6]));
    }

    #[test]
    fn a_zero_budget_keeps_nothing() {
        let tail = Tail::new(0);
        tail.push("t", event(1, 1));
        assert_eq!(seqs(&tail, 0, 0, 10), None);
    }

    #[test]
    fn visibility_filters_and_the_limit_counts_visible_events() {
        let tail = Tail::new(1 << 20);
        for seq in 1..=10 {
            tail.push("t", event(seq, 1));
        }
        let even = tail.after("t", 0, 0, 3, |e| e.seq % 2 == 0, |e| e.seq);
        assert_eq!(even, Some(vec![2, 4, 6]));
    }
}
