//! A property test of the outbox against an in-memory model: random sequences of
//! enqueue (several lanes, past the bounds, duplicate ids, batches), take and ack (one
//! by one and batched), confirm, reject, fail, dead, retry, discard, prune, reopen and
//! the passing of time, run on a real SQLite file and on a plain `Vec` model written
//! from the documented rules (not from the SQL). After every step the store's
//! observable state (every item with every field, per-state lists, depth, next
//! sendable items) and every result or error must equal the model's.

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Value, json};
use webwaka_realtime::protocol::Timestamp;
use webwaka_realtime::store::{
    ItemKind, ItemState, NewItem, OutboxClass, OutboxItem, Store, StoreConfig, StoreError,
};

const LANES: [&str; 3] = ["room:a", "room:b", "tx"];
/// Small bounds so that random runs reach them often.
const MAX_ITEMS: usize = 6;
const MAX_BYTES: u64 = 150;
const STATES: [ItemState; 6] = [
    ItemState::Persisted,
    ItemState::InFlight,
    ItemState::Accepted,
    ItemState::Confirmed,
    ItemState::Rejected,
    ItemState::Dead,
];

fn at(secs: i64) -> Timestamp {
    Utc.timestamp_opt(1_780_000_000 + secs, 0).single().unwrap()
}

/// A body of a known stored size: `{"t":"xx…"}` is 8 bytes plus the text.
fn body(len: usize) -> (Value, u64) {
    (json!({ "t": "x".repeat(len) }), 8 + len as u64)
}

/// The three kinds of stored item, by class.
fn class_kind(class: u8) -> (OutboxClass, ItemKind) {
    match class % 3 {
        0 => (OutboxClass::B, ItemKind::Message),
        1 => (OutboxClass::C, ItemKind::Operation),
        _ => (OutboxClass::D, ItemKind::Transaction),
    }
}

/// One step of a run.
#[derive(Debug, Clone)]
enum Op {
    /// Enqueue a new item.
    Enqueue {
        lane: usize,
        class: u8,
        len: usize,
    },
    /// Enqueue an item reusing a known id (stored or not).
    EnqueueKnownId {
        pick: Index,
        lane: usize,
        len: usize,
    },
    /// `enqueue_many` of new items (all or none).
    EnqueueMany {
        lane: usize,
        lens: Vec<usize>,
    },
    /// `next_sendable(limit)`, then `mark_in_flight` on each.
    Take {
        limit: usize,
    },
    /// The same in one call: `take_sendable(limit)`.
    TakeBatch {
        limit: usize,
    },
    /// `mark_accepted_many` of several known ids (some unknown or refused).
    AckMany {
        picks: Vec<Index>,
    },
    /// `mark_in_flight` on any known id.
    Send {
        pick: Index,
    },
    /// `mark_accepted`, with or without a server reference.
    Ack {
        pick: Index,
        with_ref: bool,
    },
    Confirm {
        pick: Index,
    },
    Reject {
        pick: Index,
    },
    /// `mark_failed`, retry after `delay` seconds.
    Fail {
        pick: Index,
        delay: i64,
    },
    Dead {
        pick: Index,
    },
    Retry {
        pick: Index,
    },
    Discard {
        pick: Index,
    },
    /// `prune_settled` of what last changed more than `age` seconds ago.
    Prune {
        age: i64,
    },
    /// Close the store and open the file again.
    Reopen,
    Advance {
        secs: i64,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let lane = 0..LANES.len();
    prop_oneof![
        5 => (lane.clone(), 0u8..3, 0usize..30)
            .prop_map(|(lane, class, len)| Op::Enqueue { lane, class, len }),
        1 => (any::<Index>(), lane.clone(), 0usize..30)
            .prop_map(|(pick, lane, len)| Op::EnqueueKnownId { pick, lane, len }),
        1 => (lane, prop::collection::vec(0usize..30, 1..4))
            .prop_map(|(lane, lens)| Op::EnqueueMany { lane, lens }),
        3 => (1usize..4).prop_map(|limit| Op::Take { limit }),
        2 => (1usize..4).prop_map(|limit| Op::TakeBatch { limit }),
        2 => prop::collection::vec(any::<Index>(), 1..4).prop_map(|picks| Op::AckMany { picks }),
        1 => any::<Index>().prop_map(|pick| Op::Send { pick }),
        3 => (any::<Index>(), any::<bool>()).prop_map(|(pick, with_ref)| Op::Ack { pick, with_ref }),
        1 => any::<Index>().prop_map(|pick| Op::Confirm { pick }),
        1 => any::<Index>().prop_map(|pick| Op::Reject { pick }),
        2 => (any::<Index>(), 0i64..5).prop_map(|(pick, delay)| Op::Fail { pick, delay }),
        1 => any::<Index>().prop_map(|pick| Op::Dead { pick }),
        1 => any::<Index>().prop_map(|pick| Op::Retry { pick }),
        1 => any::<Index>().prop_map(|pick| Op::Discard { pick }),
        1 => (0i64..4).prop_map(|age| Op::Prune { age }),
        1 => Just(Op::Reopen),
        2 => (1i64..4).prop_map(|secs| Op::Advance { secs }),
    ]
}

/// An item as the model keeps it.
#[derive(Debug, Clone)]
struct MItem {
    seq: i64,
    id: String,
    class: OutboxClass,
    kind: ItemKind,
    lane: String,
    body: Value,
    bytes: u64,
    state: ItemState,
    attempts: u32,
    next_attempt: i64,
    last_error: Option<String>,
    server_ref: Option<String>,
    created: i64,
    updated: i64,
}

impl MItem {
    /// What the store should report for it.
    fn expected(&self) -> OutboxItem {
        OutboxItem {
            seq: self.seq,
            id: self.id.clone(),
            class: self.class,
            kind: self.kind,
            lane: self.lane.clone(),
            body: self.body.clone(),
            bytes: self.bytes,
            state: self.state,
            attempts: self.attempts,
            next_attempt_at: at(self.next_attempt),
            last_error: self.last_error.clone(),
            server_ref: self.server_ref.clone(),
            created_at: at(self.created),
            updated_at: at(self.updated),
        }
    }

    /// Persisted, in flight or dead: counted against the bounds.
    fn pending(&self) -> bool {
        matches!(
            self.state,
            ItemState::Persisted | ItemState::InFlight | ItemState::Dead
        )
    }

    /// Persisted or in flight: holds its lane.
    fn in_lane(&self) -> bool {
        matches!(self.state, ItemState::Persisted | ItemState::InFlight)
    }
}

/// What an operation is expected to return.
#[derive(Debug, PartialEq)]
enum Expect {
    Ok(OutboxItem),
    NotFound,
    InvalidState(ItemState),
    Duplicate,
    QueueFull(String),
}

/// The store's answer, in the model's terms.
fn observed(result: Result<OutboxItem, StoreError>) -> Expect {
    match result {
        Ok(item) => Expect::Ok(item),
        Err(StoreError::NotFound(_)) => Expect::NotFound,
        Err(StoreError::InvalidState { state, .. }) => Expect::InvalidState(state),
        Err(StoreError::Duplicate(_)) => Expect::Duplicate,
        Err(StoreError::QueueFull { limit }) => Expect::QueueFull(limit),
        Err(other) => panic!("unexpected error {other}"),
    }
}

/// The model: items in enqueue order, and the clock.
#[derive(Debug, Default)]
struct Model {
    items: Vec<MItem>,
    /// Every id ever used (stored, refused, discarded, pruned) and one never used.
    known_ids: Vec<String>,
    now: i64,
    last_seq: i64,
}

impl Model {
    fn new() -> Self {
        Model {
            known_ids: vec!["never-stored".into()],
            ..Model::default()
        }
    }

    fn pick(&self, pick: &Index) -> String {
        pick.get(&self.known_ids).clone()
    }

    fn find(&mut self, id: &str) -> Option<&mut MItem> {
        self.items.iter_mut().find(|i| i.id == id)
    }

    fn depth(&self) -> (usize, u64) {
        let pending = self.items.iter().filter(|i| i.pending());
        (pending.clone().count(), pending.map(|i| i.bytes).sum())
    }

    /// Why a batch of items with these sizes and ids would be refused, if it would.
    /// Checked item by item: the count bound, then the bytes bound, then the id.
    fn refusal(&self, batch: &[(String, u64)]) -> Option<Expect> {
        let (mut count, mut bytes) = self.depth();
        let mut ids: Vec<&str> = self.items.iter().map(|i| i.id.as_str()).collect();
        for (id, size) in batch {
            if count + 1 > MAX_ITEMS {
                return Some(Expect::QueueFull(format!("{MAX_ITEMS} items")));
            }
            if bytes + size > MAX_BYTES {
                return Some(Expect::QueueFull(format!("{MAX_BYTES} bytes")));
            }
            if ids.contains(&id.as_str()) {
                return Some(Expect::Duplicate);
            }
            ids.push(id);
            count += 1;
            bytes += size;
        }
        None
    }

    /// Records an item the store accepted with `seq` (which must grow).
    fn stored(&mut self, new: &NewItem, bytes: u64, seq: i64) -> OutboxItem {
        assert!(seq > self.last_seq, "seq {seq} after {}", self.last_seq);
        self.last_seq = seq;
        let item = MItem {
            seq,
            id: new.id.clone(),
            class: new.class,
            kind: new.kind,
            lane: new.lane.clone(),
            body: new.body.clone(),
            bytes,
            state: ItemState::Persisted,
            attempts: 0,
            next_attempt: self.now,
            last_error: None,
            server_ref: None,
            created: self.now,
            updated: self.now,
        };
        let expected = item.expected();
        self.items.push(item);
        expected
    }

    /// The heads of the lanes that may be sent now, oldest first, at most `limit`.
    fn sendable(&self, limit: usize) -> Vec<OutboxItem> {
        let mut heads: Vec<&MItem> = Vec::new();
        for item in &self.items {
            if item.in_lane() && !heads.iter().any(|h| h.lane == item.lane) {
                heads.push(item);
            }
        }
        heads
            .into_iter()
            .filter(|h| h.state == ItemState::Persisted && h.next_attempt <= self.now)
            .take(limit)
            .map(MItem::expected)
            .collect()
    }

    /// Moves `id` to `to` if its state is one of `from`, applying `change`.
    fn transition(
        &mut self,
        id: &str,
        from: &[ItemState],
        to: ItemState,
        change: impl FnOnce(&mut MItem),
    ) -> Expect {
        let now = self.now;
        let Some(item) = self.find(id) else {
            return Expect::NotFound;
        };
        if !from.contains(&item.state) {
            return Expect::InvalidState(item.state);
        }
        item.state = to;
        item.updated = now;
        change(item);
        Expect::Ok(item.expected())
    }

    fn send(&mut self, id: &str) -> Expect {
        self.transition(id, &[ItemState::Persisted], ItemState::InFlight, |i| {
            i.attempts += 1
        })
    }

    fn ack(&mut self, id: &str, server_ref: Option<&str>) -> Expect {
        match self.find(id) {
            None => return Expect::NotFound,
            // A second ack changes nothing.
            Some(i) if i.state == ItemState::Accepted => return Expect::Ok(i.expected()),
            Some(_) => {}
        }
        let from = [ItemState::Persisted, ItemState::InFlight];
        self.transition(id, &from, ItemState::Accepted, |i| {
            if let Some(r) = server_ref {
                i.server_ref = Some(r.to_owned());
            }
        })
    }

    /// Confirm or reject a transaction.
    fn settle(&mut self, id: &str, to: ItemState, reason: Option<&str>) -> Expect {
        match self.find(id) {
            None => return Expect::NotFound,
            Some(i) if i.state == to => return Expect::Ok(i.expected()),
            Some(i) if i.kind != ItemKind::Transaction => return Expect::InvalidState(i.state),
            Some(_) => {}
        }
        let from = [
            ItemState::Persisted,
            ItemState::InFlight,
            ItemState::Accepted,
        ];
        self.transition(id, &from, to, |i| {
            if let Some(r) = reason {
                i.last_error = Some(r.to_owned());
            }
        })
    }

    fn discard(&mut self, id: &str) -> Expect {
        let Some(pos) = self.items.iter().position(|i| i.id == id) else {
            return Expect::NotFound;
        };
        if self.items[pos].state != ItemState::Dead {
            return Expect::InvalidState(self.items[pos].state);
        }
        Expect::Ok(self.items.remove(pos).expected())
    }

    /// Removes settled items last changed before `before`, except transactions that
    /// are only accepted (they wait for their confirmation). Returns how many.
    fn prune(&mut self, before: i64) -> usize {
        let old = self.items.len();
        self.items.retain(|i| {
            let settled = matches!(
                i.state,
                ItemState::Accepted | ItemState::Confirmed | ItemState::Rejected
            );
            let waits = i.kind == ItemKind::Transaction && i.state == ItemState::Accepted;
            !(settled && !waits && i.updated < before)
        });
        old - self.items.len()
    }

    /// At open, what was in flight is persisted again (nothing else changes).
    fn reopen(&mut self) {
        for i in &mut self.items {
            if i.state == ItemState::InFlight {
                i.state = ItemState::Persisted;
            }
        }
    }
}

fn config() -> StoreConfig {
    StoreConfig {
        max_items: MAX_ITEMS,
        max_bytes: MAX_BYTES,
        ..StoreConfig::default()
    }
}

/// Runs one step on both and compares what they return.
fn step(store: &mut Option<Store>, path: &std::path::Path, model: &mut Model, op: &Op) {
    let now = at(model.now);
    // Reopen needs the store by value; everything else borrows it.
    if let Op::Reopen = op {
        drop(store.take());
        *store = Some(Store::open(path, config()).unwrap());
        model.reopen();
        return;
    }
    let s = store.as_mut().unwrap();
    match op {
        Op::Enqueue { lane, class, len } => {
            let (class, kind) = class_kind(*class);
            let (value, size) = body(*len);
            let new = NewItem::new(class, kind, LANES[*lane], value);
            enqueue_one(s, model, new, size);
        }
        Op::EnqueueKnownId { pick, lane, len } => {
            let (value, size) = body(*len);
            let mut new = NewItem::new(OutboxClass::C, ItemKind::Message, LANES[*lane], value);
            new.id = model.pick(pick);
            enqueue_one(s, model, new, size);
        }
        Op::EnqueueMany { lane, lens } => {
            let batch: Vec<(NewItem, u64)> = lens
                .iter()
                .map(|len| {
                    let (value, size) = body(*len);
                    let new = NewItem::new(OutboxClass::B, ItemKind::Message, LANES[*lane], value);
                    (new, size)
                })
                .collect();
            let keys: Vec<(String, u64)> = batch
                .iter()
                .map(|(n, size)| (n.id.clone(), *size))
                .collect();
            model
                .known_ids
                .extend(keys.iter().map(|(id, _)| id.clone()));
            let expected = model.refusal(&keys);
            let result = s.enqueue_many(batch.iter().map(|(n, _)| n.clone()).collect(), now);
            match (expected, result) {
                (None, Ok(stored)) => {
                    assert_eq!(stored.len(), batch.len());
                    for ((new, size), got) in batch.iter().zip(stored) {
                        let want = model.stored(new, *size, got.seq);
                        assert_eq!(got, want);
                    }
                }
                (Some(want), Err(e)) => assert_eq!(observed(Err(e)), want),
                (want, got) => panic!("enqueue_many: expected {want:?}, got {got:?}"),
            }
        }
        Op::Take { limit } => {
            let got = s.next_sendable(now, *limit).unwrap();
            assert_eq!(got, model.sendable(*limit), "next_sendable({limit})");
            for item in got {
                let want = model.send(&item.id);
                assert_eq!(observed(s.mark_in_flight(&item.id, now)), want);
            }
        }
        Op::TakeBatch { limit } => {
            let want: Vec<Expect> = model
                .sendable(*limit)
                .iter()
                .map(|head| model.send(&head.id))
                .collect();
            let got: Vec<Expect> = s
                .take_sendable(now, *limit)
                .unwrap()
                .into_iter()
                .map(Expect::Ok)
                .collect();
            assert_eq!(got, want, "take_sendable({limit})");
        }
        Op::AckMany { picks } => {
            let ids: Vec<String> = picks.iter().map(|p| model.pick(p)).collect();
            let acks: Vec<(&str, Option<&str>)> =
                ids.iter().map(|id| (id.as_str(), Some("many"))).collect();
            // In order: an id acked twice in one call is a no-op the second time.
            let want: Vec<Expect> = ids.iter().map(|id| model.ack(id, Some("many"))).collect();
            let got: Vec<Expect> = s
                .mark_accepted_many(&acks, now)
                .unwrap()
                .into_iter()
                .map(observed)
                .collect();
            assert_eq!(got, want, "mark_accepted_many({ids:?})");
        }
        Op::Send { pick } => {
            let id = model.pick(pick);
            let want = model.send(&id);
            assert_eq!(observed(s.mark_in_flight(&id, now)), want, "send {id}");
        }
        Op::Ack { pick, with_ref } => {
            let id = model.pick(pick);
            let server_ref = with_ref.then(|| format!("ref-{id}"));
            let want = model.ack(&id, server_ref.as_deref());
            let got = observed(s.mark_accepted(&id, server_ref.as_deref(), now));
            assert_eq!(got, want, "ack {id}");
        }
        Op::Confirm { pick } => {
            let id = model.pick(pick);
            let want = model.settle(&id, ItemState::Confirmed, None);
            assert_eq!(observed(s.mark_confirmed(&id, now)), want, "confirm {id}");
        }
        Op::Reject { pick } => {
            let id = model.pick(pick);
            let want = model.settle(&id, ItemState::Rejected, Some("refused"));
            let got = observed(s.mark_rejected(&id, "refused", now));
            assert_eq!(got, want, "reject {id}");
        }
        Op::Fail { pick, delay } => {
            let id = model.pick(pick);
            let retry_at = model.now + delay;
            let from = [ItemState::Persisted, ItemState::InFlight];
            let want = model.transition(&id, &from, ItemState::Persisted, |i| {
                i.last_error = Some("timeout".into());
                i.next_attempt = retry_at;
            });
            let got = observed(s.mark_failed(&id, "timeout", at(retry_at), now));
            assert_eq!(got, want, "fail {id}");
        }
        Op::Dead { pick } => {
            let id = model.pick(pick);
            let from = [ItemState::Persisted, ItemState::InFlight];
            let want = model.transition(&id, &from, ItemState::Dead, |i| {
                i.last_error = Some("gone".into());
            });
            assert_eq!(observed(s.mark_dead(&id, "gone", now)), want, "dead {id}");
        }
        Op::Retry { pick } => {
            let id = model.pick(pick);
            let retry_now = model.now;
            // Back in its lane, attempts reset, sendable now; the last error is kept.
            let want = model.transition(&id, &[ItemState::Dead], ItemState::Persisted, |i| {
                i.attempts = 0;
                i.next_attempt = retry_now;
            });
            assert_eq!(observed(s.retry(&id, now)), want, "retry {id}");
        }
        Op::Discard { pick } => {
            let id = model.pick(pick);
            let want = model.discard(&id);
            assert_eq!(observed(s.discard(&id)), want, "discard {id}");
        }
        Op::Prune { age } => {
            let before = model.now - age;
            let want = model.prune(before);
            assert_eq!(s.prune_settled(at(before)).unwrap(), want, "prune");
        }
        Op::Advance { secs } => model.now += secs,
        Op::Reopen => unreachable!("handled above"),
    }
}

/// Enqueues one item on both and compares.
fn enqueue_one(s: &mut Store, model: &mut Model, new: NewItem, size: u64) {
    model.known_ids.push(new.id.clone());
    let expected = model.refusal(&[(new.id.clone(), size)]);
    let result = s.enqueue(new.clone(), at(model.now));
    match (expected, result) {
        (None, Ok(got)) => {
            let want = model.stored(&new, size, got.seq);
            assert_eq!(got, want);
        }
        (Some(want), Err(e)) => assert_eq!(observed(Err(e)), want, "enqueue {}", new.id),
        (want, got) => panic!("enqueue: expected {want:?}, got {got:?}"),
    }
}

/// Compares everything the store shows with the model.
fn check(store: &Store, model: &Model) {
    let now = at(model.now);
    let all: Vec<OutboxItem> = model.items.iter().map(MItem::expected).collect();
    assert_eq!(store.list(None).unwrap(), all, "list");
    for state in STATES {
        let ids: Vec<String> = store
            .list(Some(state))
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        let want: Vec<String> = model
            .items
            .iter()
            .filter(|i| i.state == state)
            .map(|i| i.id.clone())
            .collect();
        assert_eq!(ids, want, "list({state})");
    }
    let depth = store.depth().unwrap();
    assert_eq!((depth.items, depth.bytes), model.depth(), "depth");
    assert_eq!(store.next_sendable(now, 100).unwrap(), model.sendable(100));
    assert_eq!(store.next_sendable(now, 1).unwrap(), model.sendable(1));
    for item in &model.items {
        assert_eq!(store.get(&item.id).unwrap(), Some(item.expected()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn test_outbox_matches_its_model(ops in prop::collection::vec(op_strategy(), 1..50)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.db");
        let mut store = Some(Store::open(&path, config()).unwrap());
        let mut model = Model::new();
        for op in &ops {
            step(&mut store, &path, &mut model, op);
            check(store.as_ref().unwrap(), &model);
        }
        store.as_ref().unwrap().integrity_check().unwrap();
    }
}
