//! The offline store: outbox transitions, lanes, bounds, identity, cursor and dedupe,
//! corruption handling. Real SQLite files in a temporary directory.

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]

use chrono::{Duration, TimeZone, Utc};
use serde_json::json;
use webwaka_realtime::protocol::Timestamp;
use webwaka_realtime::store::{
    ItemKind, ItemState, NewItem, OutboxClass, Store, StoreConfig, StoreError,
};

fn at(secs: i64) -> Timestamp {
    Utc.timestamp_opt(1_780_000_000 + secs, 0).single().unwrap()
}

fn msg(lane: &str, n: u32) -> NewItem {
    NewItem::new(
        OutboxClass::C,
        ItemKind::Message,
        lane,
        json!({"text": format!("m{n}")}),
    )
}

fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(dir.path().join("sdk.db"), StoreConfig::default()).unwrap()
}

#[test]
fn test_every_outbox_transition() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let item = store.enqueue(msg("room:1", 1), at(0)).unwrap();
    assert_eq!(item.state, ItemState::Persisted);

    let sent = store.mark_in_flight(&item.id, at(1)).unwrap();
    assert_eq!((sent.state, sent.attempts), (ItemState::InFlight, 1));
    let failed = store
        .mark_failed(&item.id, "timeout", at(10), at(2))
        .unwrap();
    assert_eq!(failed.state, ItemState::Persisted);
    assert_eq!(failed.last_error.as_deref(), Some("timeout"));
    assert_eq!(failed.next_attempt_at, at(10));
    assert!(
        store.next_sendable(at(5), 10).unwrap().is_empty(),
        "waits for its retry time"
    );
    assert_eq!(store.next_sendable(at(10), 10).unwrap().len(), 1);

    store.mark_in_flight(&item.id, at(11)).unwrap();
    let acked = store.mark_accepted(&item.id, Some("42"), at(12)).unwrap();
    assert_eq!(
        (acked.state, acked.server_ref.as_deref()),
        (ItemState::Accepted, Some("42"))
    );
    // A second ack is harmless; going back is refused.
    assert_eq!(
        store
            .mark_accepted(&item.id, Some("42"), at(13))
            .unwrap()
            .state,
        ItemState::Accepted
    );
    assert!(matches!(
        store.mark_in_flight(&item.id, at(14)),
        Err(StoreError::InvalidState {
            state: ItemState::Accepted,
            ..
        })
    ));
    // Messages are not transactions.
    assert!(matches!(
        store.mark_confirmed(&item.id, at(15)),
        Err(StoreError::InvalidState { .. })
    ));

    // Dead → retry → persisted with attempts reset; dead → discard removes it.
    let other = store.enqueue(msg("room:1", 2), at(20)).unwrap();
    store.mark_in_flight(&other.id, at(21)).unwrap();
    let dead = store
        .mark_dead(&other.id, "PAYLOAD_TOO_LARGE", at(22))
        .unwrap();
    assert_eq!(dead.state, ItemState::Dead);
    assert_eq!(store.list(Some(ItemState::Dead)).unwrap().len(), 1);
    let again = store.retry(&other.id, at(23)).unwrap();
    assert_eq!((again.state, again.attempts), (ItemState::Persisted, 0));
    assert!(matches!(
        store.discard(&other.id),
        Err(StoreError::InvalidState { .. })
    ));
    store
        .mark_dead(&other.id, "still too large", at(24))
        .unwrap();
    store.discard(&other.id).unwrap();
    assert!(store.get(&other.id).unwrap().is_none());
    assert!(matches!(
        store.retry("nope", at(25)),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn test_transactions_end_confirmed_or_rejected_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let tx = store
        .enqueue(
            NewItem::new(
                OutboxClass::D,
                ItemKind::Transaction,
                "tx",
                json!({"amount": 5}),
            ),
            at(0),
        )
        .unwrap();
    store.mark_in_flight(&tx.id, at(1)).unwrap();
    store.mark_accepted(&tx.id, Some("txn-1"), at(2)).unwrap();
    let confirmed = store.mark_confirmed(&tx.id, at(3)).unwrap();
    assert_eq!(confirmed.state, ItemState::Confirmed);
    assert_eq!(
        store.mark_confirmed(&tx.id, at(4)).unwrap().updated_at,
        at(3),
        "second confirmation is a no-op"
    );
    assert!(matches!(
        store.mark_rejected(&tx.id, "late", at(5)),
        Err(StoreError::InvalidState { .. })
    ));
}

#[test]
fn test_a_failing_item_holds_back_only_its_own_lane() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let a1 = store.enqueue(msg("a", 1), at(0)).unwrap();
    let a2 = store.enqueue(msg("a", 2), at(0)).unwrap();
    let b1 = store.enqueue(msg("b", 1), at(0)).unwrap();
    let heads: Vec<_> = store
        .next_sendable(at(0), 10)
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(
        heads,
        [a1.id.clone(), b1.id.clone()],
        "one head per lane, oldest first"
    );

    store.mark_in_flight(&a1.id, at(1)).unwrap();
    store.mark_failed(&a1.id, "503", at(100), at(2)).unwrap();
    let heads: Vec<_> = store
        .next_sendable(at(3), 10)
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(
        heads,
        vec![b1.id.clone()],
        "lane a waits behind a1; b goes on"
    );

    // A dead head leaves its lane: a2 becomes sendable.
    store.mark_dead(&a1.id, "rejected", at(4)).unwrap();
    let heads: Vec<_> = store
        .next_sendable(at(5), 10)
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(heads, [a2.id.clone(), b1.id.clone()]);
    assert_eq!(
        store.next_sendable(at(5), 1).unwrap().len(),
        1,
        "limit is honoured"
    );
}

#[test]
fn test_bounds_refuse_new_items_and_drop_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        max_items: 3,
        ..StoreConfig::default()
    };
    let mut store = Store::open(dir.path().join("b.db"), config).unwrap();
    for n in 0..3 {
        store.enqueue(msg("l", n), at(0)).unwrap();
    }
    let err = store.enqueue(msg("l", 9), at(0)).unwrap_err();
    assert!(
        matches!(&err, StoreError::QueueFull { limit } if limit == "3 items"),
        "{err}"
    );
    assert_eq!(store.depth().unwrap().items, 3);
    // Settling one makes room.
    let first = store.next_sendable(at(0), 1).unwrap().remove(0);
    store.mark_accepted(&first.id, None, at(1)).unwrap();
    store.enqueue(msg("l", 10), at(2)).unwrap();

    let config = StoreConfig {
        max_bytes: 20,
        ..StoreConfig::default()
    }; // one 13-byte body fits, two do not
    let mut small = Store::open(dir.path().join("s.db"), config).unwrap();
    small.enqueue(msg("l", 1), at(0)).unwrap();
    let err = small.enqueue(msg("l", 2), at(0)).unwrap_err();
    assert!(
        matches!(&err, StoreError::QueueFull { limit } if limit == "20 bytes"),
        "{err}"
    );

    // A batch that does not fit is refused whole.
    let mut store = Store::open(
        dir.path().join("g.db"),
        StoreConfig {
            max_items: 2,
            ..StoreConfig::default()
        },
    )
    .unwrap();
    assert!(
        store
            .enqueue_many(vec![msg("l", 1), msg("l", 2), msg("l", 3)], at(0))
            .is_err()
    );
    assert_eq!(store.depth().unwrap().items, 0);
}

#[test]
fn test_duplicate_ids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let item = msg("l", 1);
    store.enqueue(item.clone(), at(0)).unwrap();
    assert!(matches!(
        store.enqueue(item, at(1)),
        Err(StoreError::Duplicate(_))
    ));
}

#[test]
fn test_identity_and_state_survive_reopen_and_in_flight_is_resent() {
    let dir = tempfile::tempdir().unwrap();
    let (client_id, id) = {
        let mut store = open(&dir);
        store.kv_set("transport", Some("websocket")).unwrap();
        let item = store.enqueue(msg("l", 1), at(0)).unwrap();
        store.mark_in_flight(&item.id, at(1)).unwrap();
        (store.client_id().to_owned(), item.id)
    };
    let store = open(&dir);
    assert_eq!(store.client_id(), client_id);
    assert!(uuid::Uuid::parse_str(&client_id).is_ok());
    assert_eq!(
        store.kv_get("transport").unwrap().as_deref(),
        Some("websocket")
    );
    let item = store.get(&id).unwrap().unwrap();
    assert_eq!(
        (item.state, item.attempts),
        (ItemState::Persisted, 1),
        "in flight at the crash: resent"
    );
    assert_eq!(
        store.schema_version().unwrap(),
        Store::latest_schema_version()
    );
    store.integrity_check().unwrap();
}

#[test]
fn test_cursor_and_dedupe() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    assert_eq!(store.cursor().unwrap(), None);
    assert!(store.record_inbound("e1", Some(1), at(0)).unwrap());
    assert!(store.record_inbound("e2", Some(2), at(1)).unwrap());
    assert!(
        !store.record_inbound("e2", Some(2), at(2)).unwrap(),
        "same id twice"
    );
    let cursor = store.cursor().unwrap().unwrap();
    assert_eq!(
        (cursor.last_event_id.as_str(), cursor.last_sequence),
        ("e2", Some(2))
    );
    // Pruned ids stay refused: the cursor's sequence covers them.
    assert_eq!(store.prune_seen(at(100), 0).unwrap(), 2);
    assert!(!store.record_inbound("e1", Some(1), at(3)).unwrap());
    assert!(store.record_inbound("e3", Some(3), at(4)).unwrap());
    drop(store);
    let store = open(&dir);
    assert_eq!(store.cursor().unwrap().unwrap().last_event_id, "e3");
}

/// A resync clears the cursor and pages from the oldest retained event again; events
/// processed before move the cursor without being applied again, so an interrupted
/// resync goes on from where it stopped instead of fetching its first page forever.
#[test]
fn test_events_seen_before_move_a_cleared_cursor_without_being_applied_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    for i in 1..=3 {
        assert!(
            store
                .record_inbound(&format!("e{i}"), Some(i), at(0))
                .unwrap()
        );
    }
    store.clear_cursor().unwrap();
    assert!(
        !store.record_inbound("e1", Some(1), at(1)).unwrap(),
        "seen: not new"
    );
    assert_eq!(store.cursor().unwrap().unwrap().last_event_id, "e1");
    assert!(!store.record_inbound("e2", Some(2), at(1)).unwrap());
    assert_eq!(store.cursor().unwrap().unwrap().last_sequence, Some(2));
    // Behind the cursor now: a replay, nothing moves back.
    assert!(!store.record_inbound("e1", Some(1), at(1)).unwrap());
    assert_eq!(store.cursor().unwrap().unwrap().last_event_id, "e2");
    assert!(!store.record_inbound("e3", Some(3), at(1)).unwrap());
    assert!(store.record_inbound("e4", Some(4), at(1)).unwrap(), "new");
    let cursor = store.cursor().unwrap().unwrap();
    assert_eq!(
        (cursor.last_event_id.as_str(), cursor.last_sequence),
        ("e4", Some(4))
    );
}

/// A sequence beyond SQLite's integers (a broken server) is not clamped into a cursor
/// that every later event would fall below: the event is recorded by its id.
#[test]
fn test_a_sequence_out_of_range_does_not_shut_out_later_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    assert!(store.record_inbound("a", Some(4), at(0)).unwrap());
    assert!(store.record_inbound("huge", Some(u64::MAX), at(0)).unwrap());
    assert!(
        store.record_inbound("b", Some(5), at(0)).unwrap(),
        "not a replay"
    );
    assert!(
        !store.record_inbound("huge", Some(u64::MAX), at(0)).unwrap(),
        "seen"
    );
    assert_eq!(store.cursor().unwrap().unwrap().last_sequence, Some(5));
}

/// A body nested deeper than the reader takes back is refused at the insert: stored,
/// it would stop every read of the outbox.
#[test]
fn test_a_body_nested_too_deep_is_refused_and_the_outbox_still_reads() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let mut deep = json!(1);
    for _ in 0..130 {
        deep = json!([deep]);
    }
    let err = store
        .enqueue(
            NewItem::new(OutboxClass::C, ItemKind::Message, "room:1", deep),
            at(0),
        )
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid { field: "body", .. }),
        "{err:?}"
    );
    let fine = store.enqueue(msg("room:2", 1), at(0)).unwrap();
    let sendable: Vec<String> = store
        .next_sendable(at(0), 10)
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(sendable, vec![fine.id]);
}

/// An item scheduled by a wall clock that was ahead (then corrected back) would hold
/// its lane for the clock's error: one due further away than any wait the client sets
/// is due now.
#[test]
fn test_an_item_scheduled_by_a_clock_gone_back_is_due_now() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let item = store.enqueue(msg("room:1", 1), at(0)).unwrap();
    let next = store.enqueue(msg("room:1", 2), at(0)).unwrap();
    store.mark_in_flight(&item.id, at(1)).unwrap();
    // Failed while the clock read a year ahead: due a year from now.
    store
        .mark_failed(&item.id, "500", at(1) + Duration::days(365), at(1))
        .unwrap();
    let sendable: Vec<String> = store
        .next_sendable(at(2), 10)
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(sendable, vec![item.id.clone()]);
    assert_eq!(
        store.next_attempt_after(at(2)).unwrap(),
        None,
        "nothing to wait for"
    );
    // A wait within the longest the client sets is kept.
    store.mark_in_flight(&item.id, at(2)).unwrap();
    store
        .mark_failed(&item.id, "500", at(2) + Duration::minutes(30), at(2))
        .unwrap();
    assert!(
        store.next_sendable(at(3), 10).unwrap().is_empty(),
        "{next:?}"
    );
}

#[test]
fn test_seen_ids_are_pruned_by_age_keeping_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    for i in 1..=5 {
        assert!(store.record_inbound(&format!("e{i}"), None, at(i)).unwrap());
    }
    // Old enough: e1 and e2; but the newest four are kept.
    assert_eq!(store.prune_seen(at(3), 4).unwrap(), 1);
    assert!(
        !store.record_inbound("e2", None, at(9)).unwrap(),
        "still known"
    );
    assert!(
        store.record_inbound("e1", None, at(9)).unwrap(),
        "forgotten"
    );
    // More to keep than there are: nothing goes.
    assert_eq!(store.prune_seen(at(100), 10).unwrap(), 0);
    assert_eq!(store.prune_seen(at(100), 2).unwrap(), 3);
}

#[test]
fn test_a_corrupt_file_is_moved_aside_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sdk.db");
    std::fs::write(
        &path,
        b"this is not a database, it is a text file of some length......",
    )
    .unwrap();
    let err = Store::open(&path, StoreConfig::default()).unwrap_err();
    let StoreError::Corrupt { moved_to, .. } = &err else {
        panic!("{err}")
    };
    assert!(moved_to.exists(), "the old file is kept");
    assert!(std::fs::read(moved_to).unwrap().starts_with(b"this is not"));
    // Opening again gives a fresh, working store.
    let mut store = Store::open(&path, StoreConfig::default()).unwrap();
    store.enqueue(msg("l", 1), at(0)).unwrap();
}

#[test]
fn test_settled_items_are_pruned_but_unconfirmed_transactions_stay() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let m = store.enqueue(msg("l", 1), at(0)).unwrap();
    store.mark_accepted(&m.id, Some("1"), at(1)).unwrap();
    let t = store
        .enqueue(
            NewItem::new(OutboxClass::D, ItemKind::Transaction, "tx", json!({})),
            at(0),
        )
        .unwrap();
    store.mark_accepted(&t.id, Some("txn"), at(1)).unwrap();
    assert_eq!(
        store.prune_settled(at(0) + Duration::seconds(60)).unwrap(),
        1
    );
    assert!(store.get(&m.id).unwrap().is_none());
    assert!(
        store.get(&t.id).unwrap().is_some(),
        "waits for its confirmation"
    );
}

#[test]
fn test_undecided_transactions_and_lookups_by_server_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let m = store.enqueue(msg("l", 1), at(0)).unwrap();
    store.mark_accepted(&m.id, Some("7"), at(1)).unwrap();
    let tx = |store: &mut Store| {
        store
            .enqueue(
                NewItem::new(OutboxClass::D, ItemKind::Transaction, "tx", json!({})),
                at(0),
            )
            .unwrap()
    };
    let (t1, t2, t3) = (tx(&mut store), tx(&mut store), tx(&mut store));
    assert!(
        store.undecided_transactions().unwrap().is_empty(),
        "none accepted yet"
    );
    store.mark_accepted(&t1.id, Some("txn-1"), at(1)).unwrap();
    store.mark_accepted(&t2.id, Some("txn-2"), at(1)).unwrap();
    let ids = |items: Vec<webwaka_realtime::store::OutboxItem>| {
        items.into_iter().map(|i| i.id).collect::<Vec<_>>()
    };
    // Accepted transactions only, oldest first: not the message, not the unsent one.
    assert_eq!(
        ids(store.undecided_transactions().unwrap()),
        [t1.id.clone(), t2.id.clone()]
    );
    store.mark_confirmed(&t1.id, at(2)).unwrap();
    assert_eq!(ids(store.undecided_transactions().unwrap()), [t2.id]);
    // Found by the server's id whatever their state; a message's sequence is not a
    // transaction id.
    let found = store
        .find_by_server_ref(ItemKind::Transaction, "txn-1")
        .unwrap()
        .unwrap();
    assert_eq!(found.id, t1.id);
    assert!(
        store
            .find_by_server_ref(ItemKind::Transaction, "7")
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store
            .find_by_server_ref(ItemKind::Message, "7")
            .unwrap()
            .unwrap()
            .id,
        m.id
    );
    assert!(store.get(&t3.id).unwrap().is_some());
}

#[test]
fn test_the_next_attempt_after_now_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    assert_eq!(store.next_attempt_after(at(0)).unwrap(), None);
    let a = store.enqueue(msg("room:1", 1), at(0)).unwrap();
    let b = store.enqueue(msg("room:2", 2), at(0)).unwrap();
    // Due now: nothing later.
    assert_eq!(store.next_attempt_after(at(0)).unwrap(), None);
    store.mark_in_flight(&a.id, at(1)).unwrap();
    store.mark_failed(&a.id, "500", at(30), at(1)).unwrap();
    store.mark_in_flight(&b.id, at(1)).unwrap();
    store.mark_failed(&b.id, "500", at(10), at(1)).unwrap();
    assert_eq!(store.next_attempt_after(at(1)).unwrap(), Some(at(10)));
    assert_eq!(store.next_attempt_after(at(10)).unwrap(), Some(at(30)));
    assert_eq!(store.next_attempt_after(at(30)).unwrap(), None);
}

#[test]
fn test_items_that_failed_on_the_network_are_due_when_it_is_back_and_nothing_else_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let waiting = store.enqueue(msg("room:1", 1), at(0)).unwrap();
    let refused = store.enqueue(msg("room:2", 2), at(0)).unwrap();
    let sent = store.enqueue(msg("room:3", 3), at(0)).unwrap();
    let due = store.enqueue(msg("room:4", 4), at(0)).unwrap();
    let answered = store.enqueue(msg("room:5", 5), at(0)).unwrap();
    store.mark_in_flight(&waiting.id, at(1)).unwrap();
    store
        .mark_failed_on_network(&waiting.id, "network: timed out", at(30), at(1))
        .unwrap();
    // A server's refusal keeps its schedule.
    store.mark_in_flight(&refused.id, at(1)).unwrap();
    store
        .mark_failed(&refused.id, "503", at(30), at(1))
        .unwrap();
    // Failed on the network, then sent again (in flight now).
    store.mark_in_flight(&sent.id, at(1)).unwrap();
    store
        .mark_failed_on_network(&sent.id, "network: timed out", at(1), at(1))
        .unwrap();
    store.mark_in_flight(&sent.id, at(1)).unwrap();
    // Failed on the network, then sent again and refused by the server: its wait is
    // the server's now.
    store.mark_in_flight(&answered.id, at(1)).unwrap();
    store
        .mark_failed_on_network(&answered.id, "network: timed out", at(1), at(1))
        .unwrap();
    store.mark_in_flight(&answered.id, at(1)).unwrap();
    store
        .mark_failed(&answered.id, "503", at(40), at(1))
        .unwrap();

    // Only the one waiting for the network moves.
    assert_eq!(store.network_back(at(2)).unwrap(), 1);
    let after = store.get(&waiting.id).unwrap().unwrap();
    assert_eq!(after.next_attempt_at, at(2));
    assert_eq!((after.state, after.attempts), (ItemState::Persisted, 1));
    assert_eq!(
        after.last_error.as_deref(),
        Some("network: timed out"),
        "its history is kept"
    );
    assert_eq!(
        store.get(&refused.id).unwrap().unwrap().next_attempt_at,
        at(30)
    );
    assert_eq!(
        store.get(&answered.id).unwrap().unwrap().next_attempt_at,
        at(40)
    );
    assert_eq!(
        store.get(&sent.id).unwrap().unwrap().state,
        ItemState::InFlight
    );
    assert_eq!(store.get(&due.id).unwrap().unwrap().next_attempt_at, at(0));
    let sendable: Vec<String> = store
        .next_sendable(at(2), 10)
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(sendable, vec![waiting.id, due.id]);
    assert_eq!(store.network_back(at(2)).unwrap(), 0, "nothing waits now");
}

#[test]
fn test_a_wait_for_the_network_outlives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let item = {
        let mut store = open(&dir);
        let item = store.enqueue(msg("room:1", 1), at(0)).unwrap();
        store.mark_in_flight(&item.id, at(1)).unwrap();
        store
            .mark_failed_on_network(&item.id, "network: connection refused", at(30), at(1))
            .unwrap();
        item
    };
    let store = open(&dir);
    assert_eq!(store.network_back(at(2)).unwrap(), 1);
    assert_eq!(store.get(&item.id).unwrap().unwrap().next_attempt_at, at(2));
}
