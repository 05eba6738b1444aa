//! The recent end of each tenant's log, in memory: what polls and resumes read when the
//! cursor is recent (the usual case: a client polls from where its last page ended).
//!
//! Every event appended to a tenant's log is pushed here by the writer thread after its
//! commit, in sequence order (after-commit effects run in commit order, and nothing is
//! pushed for a transaction that did not commit). A tenant's tail therefore knows a
//! sequence, `covers_after`, such that every committed event of the tenant with a
//! greater sequence is in it. A read whose cursor is in the tail (or, with no cursor, a
//! tail that covers the whole log) is answered from memory; any other read goes to
//! SQLite. The tail is only ever a faster path to the same answer: same visibility
//! rule, same retention cutoff, same order (tests compare both paths).
//!
//! A tenant's sequences are contiguous (the log's greatest sequence is its counter,
//! and a sequence handed out for a write that did not happen is handed out again), so
//! a push that does not follow the tail's last event by exactly one means a push was
//! missed: the tail starts again from that event rather than claim what it lacks.
//!
//! Bounded by bytes across all tenants ([`Tail::new`]): the oldest events of the whole
//! server leave first (a queue in commit order), and expired ones at each maintenance
//! tick ([`Tail::expire`]); a tenant's `covers_after` moves up with its oldest event.
//! The tail starts empty at each start of the server.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Bytes an event costs besides its strings: the entry, its slot in the id map and in
/// the server-wide queue, the allocations' headers (measured figures are near this).
const ENTRY_OVERHEAD: usize = 256;

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
            + self.body.capacity()
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
    /// Event id → sequence, for the events in `events`.
    ids: HashMap<Arc<str>, u64>,
}

impl TenantTail {
    /// Drops the oldest event; returns its cost.
    fn pop_front(&mut self) -> usize {
        match self.events.pop_front() {
            Some(old) => {
                self.ids.remove(&old.event_id);
                self.covers_after = old.seq;
                old.cost()
            }
            None => 0,
        }
    }

    /// Drops every event and covers from after `seq`; returns what they cost.
    fn restart(&mut self, seq: u64) -> usize {
        let freed = self.events.iter().map(TailEvent::cost).sum();
        *self = TenantTail {
            covers_after: seq,
            ..TenantTail::default()
        };
        freed
    }
}

type Slot = Arc<RwLock<TenantTail>>;

/// Every pushed event in commit order, for the server-wide budget.
#[derive(Debug, Default)]
struct Order {
    /// (tenant, sequence) of each event pushed; entries whose event already left its
    /// tenant (expired, restarted) are skipped when they reach the front.
    queue: VecDeque<(Slot, u64)>,
    bytes: usize,
}

/// The recent tail of every tenant's log.
#[derive(Debug)]
pub(crate) struct Tail {
    tenants: RwLock<HashMap<String, Slot>>,
    order: Mutex<Order>,
    max_bytes: usize,
}

impl Tail {
    /// A tail keeping at most about `max_bytes` of events for all tenants together (0:
    /// keep nothing, every read goes to SQLite).
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            tenants: RwLock::new(HashMap::new()),
            order: Mutex::new(Order::default()),
            max_bytes,
        }
    }

    fn tenant(&self, tenant: &str) -> Option<Slot> {
        self.tenants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(tenant)
            .cloned()
    }

    fn order(&self) -> MutexGuard<'_, Order> {
        self.order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
        let mut order = self.order();
        let seq = event.seq;
        let cost = event.cost();
        {
            let mut tail = write(&slot);
            let last = tail.events.back().map_or(tail.covers_after, |e| e.seq);
            if seq != last + 1 {
                // A push was missed (or came twice): the tail would no longer be
                // complete. Start it again from this event.
                tracing::warn!(tenant, seq, last, "log tail not contiguous; restarted");
                order.bytes -= tail.restart(seq.saturating_sub(1));
            }
            tail.ids.insert(Arc::clone(&event.event_id), seq);
            tail.events.push_back(event);
        }
        order.bytes += cost;
        order.queue.push_back((slot, seq));
        // The server-wide budget: the oldest events of all tenants leave first.
        while order.bytes > self.max_bytes {
            let Some((oldest, oldest_seq)) = order.queue.pop_front() else {
                break;
            };
            let mut tail = write(&oldest);
            if tail.events.front().is_some_and(|e| e.seq == oldest_seq) {
                order.bytes -= tail.pop_front();
            }
        }
    }

    /// Drops the events created before `cutoff_ms` from the front of every tenant's
    /// tail, and tenants left with nothing (run at each maintenance tick).
    pub(crate) fn expire(&self, cutoff_ms: i64) {
        let mut order = self.order();
        let mut tenants = self
            .tenants
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tenants.retain(|_, slot| {
            let mut tail = write(slot);
            while tail
                .events
                .front()
                .is_some_and(|e| e.created_ms < cutoff_ms)
            {
                order.bytes -= tail.pop_front();
            }
            !tail.events.is_empty()
        });
        // Entries for events that left: skip them now rather than when the budget is
        // reached (they would otherwise pile up on a quiet server).
        while let Some((slot, seq)) = order.queue.front() {
            let gone = read(slot).events.front().is_none_or(|e| e.seq > *seq);
            if !gone {
                break;
            }
            order.queue.pop_front();
        }
    }

    /// Where event `event_id` sits, if the tail has it.
    pub(crate) fn cursor(&self, tenant: &str, event_id: &str) -> CursorLookup {
        let Some(slot) = self.tenant(tenant) else {
            return CursorLookup::Unknown;
        };
        let tail = read(&slot);
        let Some(&seq) = tail.ids.get(event_id) else {
            return CursorLookup::Unknown;
        };
        // Sequences increase along the deque.
        let at = tail.events.partition_point(|e| e.seq < seq);
        match tail.events.get(at) {
            Some(e) => CursorLookup::Found {
                seq,
                created_ms: e.created_ms,
            },
            None => CursorLookup::Unknown,
        }
    }

    /// Up to `limit` events after `after_seq` created at or after `cutoff_ms` for which
    /// `visible` holds, in sequence order, as `take` makes them (under the tenant's
    /// read lock: keep both cheap); `None` when the tail does not cover everything
    /// after `after_seq` (ask SQLite).
    pub(crate) fn after<T>(
        &self,
        tenant: &str,
        after_seq: u64,
        cutoff_ms: i64,
        limit: usize,
        visible: impl Fn(&TailEvent) -> bool,
        take: impl FnMut(&TailEvent) -> T,
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
                .map(take)
                .collect(),
        )
    }

    /// Bytes held now (the budget's measure).
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.order().bytes
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

    fn seqs_of(tail: &Tail, tenant: &str, after: u64) -> Option<Vec<u64>> {
        tail.after(tenant, after, 0, 100, |_| true, |e| e.seq)
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
    fn the_budget_drops_the_oldest_events_of_the_whole_server() {
        let one = event(1, 100).cost();
        let tail = Tail::new(3 * one);
        tail.push("a", event(1, 100));
        tail.push("b", event(1, 100));
        tail.push("a", event(2, 100));
        assert_eq!(tail.bytes(), 3 * one);
        // Over budget: a's event 1 (the oldest pushed) leaves, then b's.
        tail.push("a", event(3, 100));
        assert_eq!(seqs_of(&tail, "a", 0), None);
        assert_eq!(seqs_of(&tail, "a", 1), Some(vec![2, 3]));
        assert_eq!(seqs_of(&tail, "b", 0), Some(vec![1]));
        tail.push("a", event(4, 100));
        assert_eq!(seqs_of(&tail, "b", 0), None);
        assert_eq!(seqs_of(&tail, "b", 1), Some(vec![]));
        assert_eq!(tail.cursor("b", "e1"), CursorLookup::Unknown);
        assert_eq!(seqs_of(&tail, "a", 1), Some(vec![2, 3, 4]));
        assert_eq!(tail.bytes(), 3 * one);
        // An event larger than the whole budget leaves nothing, and covers up to it.
        tail.push("a", event(5, 4 * one));
        assert_eq!(seqs_of(&tail, "a", 4), None);
        assert_eq!(seqs_of(&tail, "a", 5), Some(vec![]));
        assert_eq!(tail.bytes(), 0);
    }

    #[test]
    fn a_missed_or_repeated_push_restarts_the_tail() {
        let tail = Tail::new(1 << 20);
        tail.push("t", event(5, 1));
        tail.push("t", event(6, 1));
        // 7 never came: the tail cannot answer for it any more.
        tail.push("t", event(8, 1));
        assert_eq!(seqs(&tail, 5, 0, 10), None);
        assert_eq!(seqs(&tail, 7, 0, 10), Some(vec![8]));
        assert_eq!(tail.cursor("t", "e6"), CursorLookup::Unknown);
        tail.push("t", event(8, 1));
        assert_eq!(seqs(&tail, 7, 0, 10), Some(vec![8]));
        assert_eq!(tail.bytes(), event(8, 1).cost());
    }

    #[test]
    fn expired_events_and_empty_tenants_leave() {
        let tail = Tail::new(1 << 20);
        for seq in 1..=4 {
            tail.push("a", event(seq, 1));
        }
        tail.push("b", event(1, 1));
        // Created at 10 × seq: a cutoff of 25 drops a's 1 and 2, and b entirely.
        tail.expire(25);
        assert_eq!(seqs_of(&tail, "a", 1), None);
        assert_eq!(seqs_of(&tail, "a", 2), Some(vec![3, 4]));
        assert_eq!(seqs_of(&tail, "b", 1), None, "b is gone");
        assert_eq!(tail.bytes(), 2 * event(3, 1).cost());
        // a's entries for 1 and 2 are gone from the queue; b's waits behind a's 3 and 4
        // (skipped when it reaches the front).
        assert_eq!(tail.order().queue.len(), 3);
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
