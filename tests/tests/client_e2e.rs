//! End to end: the real client against the real server on loopback, with real SQLite
//! files. The flows a user sees: chat between two clients, a server that goes away and
//! comes back, a WebSocket that cannot be had (polling), offline edits that conflict and
//! converge, Class D transactions across a client restart, a full outbox after restart.

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::json;
use webwaka_e2e::harness::{
    TestServer, client_config, collect, direct, messages, open_client, realtime_pair, texts,
    wait_state, wait_until,
};
use webwaka_realtime::client::{ClientError, OutgoingMessage, Target, Update};
use webwaka_realtime::machine::ConnectionState;
use webwaka_realtime::protocol::PresenceStatus;
use webwaka_realtime::store::{ItemKind, ItemState};

const WITHIN: Duration = Duration::from_secs(15);

fn chat(room: &str, text: &str) -> OutgoingMessage {
    OutgoingMessage::new(
        Target::Room(room.into()),
        "chat.text",
        json!({ "text": text }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_chat_in_a_room_in_order_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (alice, bob) = realtime_pair(&server, dir.path()).await;
    let mut bob_updates = bob.subscribe();
    alice.join_room("general").await.unwrap();
    bob.join_room("general").await.unwrap();
    collect(&mut bob_updates, 1, WITHIN, |u| match u {
        Update::Room { joined: true, .. } => Some(()),
        _ => None,
    })
    .await;
    // Alice must be a member before she posts: wait for her join too.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut handles = Vec::new();
    for i in 0..20 {
        handles.push(
            alice
                .send_message(chat("general", &format!("m{i}")))
                .await
                .unwrap(),
        );
    }
    let got = collect(&mut bob_updates, 20, WITHIN, messages).await;
    let expected: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(texts(&got), expected, "in order, exactly once");
    assert!(
        got.iter()
            .all(|m| m.sender_id == "alice" && m.sequence.is_some())
    );
    for h in handles {
        let item = alice
            .wait_settled(&h.id, &[ItemState::Accepted], WITHIN)
            .await
            .unwrap();
        assert_eq!(item.state, ItemState::Accepted);
        assert!(item.server_ref.is_some(), "the server's sequence is kept");
    }
    // Nothing more arrives (no duplicates).
    let extra = collect(&mut bob_updates, 1, Duration::from_millis(500), messages).await;
    assert!(extra.is_empty(), "duplicate delivery: {extra:?}");

    alice.shutdown().await;
    bob.shutdown().await;
}

/// Sends from many tasks at once into one lane: their items are committed in groups,
/// the heads handed straight to the supervisor while the store flushes, the rest pumped.
/// Every message arrives once, in the lane's order, and goes on the wire once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_into_one_lane_arrive_in_its_order_and_go_out_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let (alice, bob) = realtime_pair(&server, dir.path()).await;
    let mut at_alice = alice.subscribe();
    let mut at_bob = bob.subscribe();
    let (tasks, each) = (4, 25);
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let alice = alice.clone();
        set.spawn(async move {
            for i in 0..each {
                alice
                    .send_message(direct("bob", &format!("t{t}-{i}")))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(done) = set.join_next().await {
        done.unwrap();
    }
    let got = texts(&collect(&mut at_bob, tasks * each, WITHIN, messages).await);
    // The lane's order is the outbox's (its `seq`, the order of the commits).
    let mut sent = alice.outbox(None).await.unwrap();
    sent.sort_by_key(|item| item.seq);
    let order: Vec<String> = sent
        .iter()
        .map(|item| item.body["payload"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(order.len(), tasks * each);
    assert_eq!(got, order, "bob gets the lane in its order, each once");
    // On the wire once each: one InFlight per item (the connection never dropped).
    let mut in_flight = std::collections::HashMap::<String, usize>::new();
    let updates = collect(
        &mut at_alice,
        usize::MAX,
        Duration::from_millis(500),
        |u| match u {
            Update::Outbox(o) if o.state == ItemState::InFlight => Some(o.id),
            _ => None,
        },
    )
    .await;
    for id in updates {
        *in_flight.entry(id).or_default() += 1;
    }
    assert_eq!(in_flight.len(), tasks * each, "every item went out");
    assert!(
        in_flight.values().all(|n| *n == 1),
        "an item sent twice: {in_flight:?}"
    );
    alice.shutdown().await;
    bob.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_only_items_are_dropped_when_not_connected_and_never_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&dir.path().join("server")).await;
    let alice = open_client(
        client_config(&server.url(), &dir.path().join("alice.db")),
        server.token("t1", "alice"),
    )
    .await;
    assert!(wait_state(&alice, ConnectionState::Realtime, WITHIN).await);
    alice
        .set_presence(PresenceStatus::Online, None)
        .await
        .unwrap();
    server.stop().await;
    assert!(
        wait_state(&alice, ConnectionState::Offline, WITHIN).await,
        "the client notices the server went away"
    );
    let err = alice
        .send_live(Target::Room("general".into()), "typing", json!({}))
        .await
        .unwrap_err();
    assert_eq!(err, ClientError::NotConnected);
    assert_eq!(
        alice
            .set_presence(PresenceStatus::Away, None)
            .await
            .unwrap_err(),
        ClientError::NotConnected
    );
    assert!(
        alice.outbox(None).await.unwrap().is_empty(),
        "nothing stored"
    );
    alice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_while_the_server_is_down_are_delivered_after_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&dir.path().join("server")).await;
    let alice = open_client(
        client_config(&server.url(), &dir.path().join("alice.db")),
        server.token("t1", "alice"),
    )
    .await;
    let bob = open_client(
        client_config(&server.url(), &dir.path().join("bob.db")),
        server.token("t1", "bob"),
    )
    .await;
    assert!(wait_state(&alice, ConnectionState::Realtime, WITHIN).await);
    assert!(wait_state(&bob, ConnectionState::Realtime, WITHIN).await);
    let mut bob_updates = bob.subscribe();

    alice
        .send_message(OutgoingMessage::new(
            Target::User("bob".into()),
            "dm",
            json!({"text": "before"}),
        ))
        .await
        .unwrap();
    let got = collect(&mut bob_updates, 1, WITHIN, messages).await;
    assert_eq!(texts(&got), ["before"]);

    server.stop().await;
    assert!(wait_state(&alice, ConnectionState::Offline, WITHIN).await);
    for i in 0..10 {
        alice
            .send_message(OutgoingMessage::new(
                Target::User("bob".into()),
                "dm",
                json!({"text": format!("offline {i}")}),
            ))
            .await
            .unwrap();
    }
    assert_eq!(
        alice
            .outbox(Some(ItemState::Persisted))
            .await
            .unwrap()
            .len(),
        10
    );

    server.restart().await;
    let got = collect(&mut bob_updates, 10, WITHIN, messages).await;
    let expected: Vec<String> = (0..10).map(|i| format!("offline {i}")).collect();
    assert_eq!(texts(&got), expected, "all queued messages, in order, once");
    let extra = collect(&mut bob_updates, 1, Duration::from_millis(800), messages).await;
    assert!(extra.is_empty(), "duplicate delivery: {extra:?}");
    alice.shutdown().await;
    bob.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_websocket_the_client_polls_and_sends_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    // Alice's WebSocket path leads nowhere: she can only use HTTP.
    let mut config = client_config(&server.url(), &dir.path().join("alice.db"));
    config.ws_path = "/no-websocket-here".into();
    let alice = open_client(config, server.token("t1", "alice")).await;
    let bob = open_client(
        client_config(&server.url(), &dir.path().join("bob.db")),
        server.token("t1", "bob"),
    )
    .await;
    assert!(wait_state(&alice, ConnectionState::Polling, WITHIN).await);
    assert!(wait_state(&bob, ConnectionState::Realtime, WITHIN).await);
    let mut alice_updates = alice.subscribe();
    let mut bob_updates = bob.subscribe();

    // Alice → Bob over POST /api/messages; Bob → Alice arrives by polling.
    let sent = alice
        .send_message(OutgoingMessage::new(
            Target::User("bob".into()),
            "dm",
            json!({"text": "over http"}),
        ))
        .await
        .unwrap();
    assert_eq!(
        texts(&collect(&mut bob_updates, 1, WITHIN, messages).await),
        ["over http"]
    );
    let item = alice
        .wait_settled(&sent.id, &[ItemState::Accepted], WITHIN)
        .await
        .unwrap();
    assert_eq!(item.state, ItemState::Accepted);
    for i in 0..5 {
        bob.send_message(OutgoingMessage::new(
            Target::User("alice".into()),
            "dm",
            json!({"text": format!("r{i}")}),
        ))
        .await
        .unwrap();
    }
    let got = collect(&mut alice_updates, 5, WITHIN, messages).await;
    assert_eq!(texts(&got), ["r0", "r1", "r2", "r3", "r4"]);
    assert_eq!(alice.connection_state(), ConnectionState::Polling);
    alice.shutdown().await;
    bob.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_on_two_clients_converge_with_last_write_wins() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&dir.path().join("server")).await;
    let a = open_client(
        client_config(&server.url(), &dir.path().join("a.db")),
        server.token("t1", "alice"),
    )
    .await;
    let b = open_client(
        client_config(&server.url(), &dir.path().join("b.db")),
        server.token("t1", "bob"),
    )
    .await;
    assert!(wait_state(&a, ConnectionState::Realtime, WITHIN).await);
    assert!(wait_state(&b, ConnectionState::Realtime, WITHIN).await);
    a.create_entity("doc", "d1", json!({"title": "start", "body": "x"}))
        .await
        .unwrap();
    // B sees the document.
    let seen = wait_until(WITHIN, || async {
        b.entity("doc", "d1")
            .await
            .unwrap()
            .is_some_and(|e| e.value.data["title"] == "start")
    })
    .await;
    assert!(seen, "the create reached the other client");

    server.stop().await;
    assert!(wait_state(&a, ConnectionState::Offline, WITHIN).await);
    assert!(wait_state(&b, ConnectionState::Offline, WITHIN).await);
    // Concurrent offline edits: each sees its own at once.
    let ea = a
        .update_entity("doc", "d1", json!({"title": "from a"}))
        .await
        .unwrap();
    assert_eq!(ea.value.data["title"], "from a");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let eb = b
        .update_entity("doc", "d1", json!({"title": "from b", "body": "y"}))
        .await
        .unwrap();
    assert_eq!(eb.value.data["title"], "from b");

    server.restart().await;
    let converged = wait_until(WITHIN, || async {
        let va = a
            .entity("doc", "d1")
            .await
            .unwrap()
            .map(|e| (e.value.data, e.pending.len()));
        let vb = b
            .entity("doc", "d1")
            .await
            .unwrap()
            .map(|e| (e.value.data, e.pending.len()));
        va.is_some() && va == vb && va.as_ref().is_some_and(|(_, p)| *p == 0)
    })
    .await;
    let va = a.entity("doc", "d1").await.unwrap().unwrap();
    assert!(
        converged,
        "replicas differ: {:?} vs {:?}",
        va,
        b.entity("doc", "d1").await.unwrap()
    );
    // The later write (B's) wins whole under LWW.
    assert_eq!(va.value.data, json!({"title": "from b", "body": "y"}));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_survives_a_client_restart_and_is_confirmed_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&dir.path().join("server")).await;
    let store = dir.path().join("alice.db");
    let token = server.token("t1", "alice");
    server.stop().await;
    // Submitted while the server is down; the app is then killed (shut down here).
    let id = {
        let alice = open_client(client_config(&server.url(), &store), token.clone()).await;
        let item = alice
            .submit_transaction("payment.transfer", json!({"amount": 100}), None)
            .await
            .unwrap();
        assert_eq!(
            item.state,
            ItemState::Persisted,
            "durable before the call returned"
        );
        alice.shutdown().await;
        item.id
    };
    server.restart().await;
    let alice = open_client(client_config(&server.url(), &store), token).await;
    let item = alice
        .wait_settled(&id, &[ItemState::Confirmed, ItemState::Rejected], WITHIN)
        .await
        .unwrap();
    assert_eq!(item.state, ItemState::Confirmed);
    let transaction_id = item.server_ref.clone().unwrap();
    // The server's transaction id is kept with the item across restarts.
    let again = alice.item(&id).await.unwrap().unwrap();
    assert_eq!(again.server_ref.as_deref(), Some(transaction_id.as_str()));
    alice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_restarted_with_a_full_outbox_sends_it_all() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&dir.path().join("server")).await;
    let token_a = server.token("t1", "alice");
    let bob = open_client(
        client_config(&server.url(), &dir.path().join("bob.db")),
        server.token("t1", "bob"),
    )
    .await;
    let store = dir.path().join("alice.db");
    server.stop().await;
    {
        let mut config = client_config(&server.url(), &store);
        config.store.max_items = 200;
        let alice = open_client(config, token_a.clone()).await;
        for i in 0..200 {
            alice
                .send_message(OutgoingMessage::new(
                    Target::User("bob".into()),
                    "dm",
                    json!({"text": format!("q{i}")}),
                ))
                .await
                .unwrap();
        }
        let err = alice
            .send_message(OutgoingMessage::new(
                Target::User("bob".into()),
                "dm",
                json!({"text": "one too many"}),
            ))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::QueueFull { .. }), "{err}");
        alice.shutdown().await;
    }
    server.restart().await;
    assert!(wait_state(&bob, ConnectionState::Realtime, WITHIN).await);
    let mut bob_updates = bob.subscribe();
    let mut config = client_config(&server.url(), &store);
    config.store.max_items = 200;
    let alice = open_client(config, token_a).await;
    let got = collect(&mut bob_updates, 200, Duration::from_secs(30), messages).await;
    let expected: Vec<String> = (0..200).map(|i| format!("q{i}")).collect();
    assert_eq!(texts(&got), expected);
    let settled = wait_until(WITHIN, || async {
        alice
            .outbox(Some(ItemState::Persisted))
            .await
            .unwrap()
            .is_empty()
            && alice
                .outbox(Some(ItemState::InFlight))
                .await
                .unwrap()
                .is_empty()
    })
    .await;
    assert!(settled, "the outbox drained");
    alice.shutdown().await;
    bob.shutdown().await;
}

/// A caller that stops waiting (a cancelled task, the app's own timeout) after the
/// store took the item must not strand it: the supervisor hears of the write from the
/// store's thread. Before, the wake-up was sent after the `.await` and lost with the
/// dropped future; with no tick the item waited for an unrelated event (the server
/// crash suite, seed 14155720862188548672).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_whose_caller_stopped_waiting_still_go_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let alice = open_client(
        client_config(&server.url(), &dir.path().join("alice.db")),
        server.token("t1", "alice"),
    )
    .await;
    assert!(wait_state(&alice, ConnectionState::Realtime, WITHIN).await);
    // One message the usual way first: once it is accepted, the flush that follows the
    // connection is over and nothing else is due to send the outbox.
    let first = alice.send_message(direct("bob", "first")).await.unwrap();
    let accepted = wait_until(WITHIN, || async {
        alice.item(&first.id).await.unwrap().unwrap().state == ItemState::Accepted
    })
    .await;
    assert!(accepted, "the first message was sent");
    // A zero timeout polls each call once (it reaches the store's thread) and drops it.
    // One at a time: an HTTP round of one would pump the other along.
    let settled = |kind: ItemKind, want: ItemState| {
        let alice = alice.clone();
        let first = first.id.clone();
        async move {
            wait_until(WITHIN, || async {
                let items = alice.outbox(None).await.unwrap();
                items
                    .iter()
                    .filter(|i| i.id != first)
                    .any(|i| i.kind == kind && i.state == want)
            })
            .await
        }
    };
    let _ = tokio::time::timeout(Duration::ZERO, alice.send_message(direct("bob", "hi"))).await;
    assert!(
        settled(ItemKind::Message, ItemState::Accepted).await,
        "the message was sent: {:?}",
        alice.outbox(None).await.unwrap()
    );
    let _ = tokio::time::timeout(
        Duration::ZERO,
        alice.submit_transaction("payment", json!({ "amount": 1 }), None),
    )
    .await;
    assert!(
        settled(ItemKind::Transaction, ItemState::Confirmed).await,
        "the transaction was submitted and confirmed: {:?}",
        alice.outbox(None).await.unwrap()
    );
    alice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shutdown_nothing_new_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let alice = open_client(
        client_config(&server.url(), &dir.path().join("alice.db")),
        server.token("t1", "alice"),
    )
    .await;
    alice.shutdown().await;
    assert_eq!(alice.connection_state(), ConnectionState::Closed);
    let err = alice
        .send_message(chat("general", "late"))
        .await
        .unwrap_err();
    assert_eq!(err, ClientError::Closed);
    let err = alice
        .submit_transaction("payment", json!({}), None)
        .await
        .unwrap_err();
    assert_eq!(err, ClientError::Closed);
    assert!(alice.outbox(None).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_items_are_pruned_after_their_retention() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let mut config = client_config(&server.url(), &dir.path().join("alice.db"));
    config.settled_retention = Some(Duration::ZERO);
    let alice = open_client(config, server.token("t1", "alice")).await;
    assert!(wait_state(&alice, ConnectionState::Realtime, WITHIN).await);
    let message = alice.send_message(direct("bob", "hi")).await.unwrap();
    let tx = alice
        .submit_transaction("payment", json!({ "amount": 1 }), None)
        .await
        .unwrap();
    // Accepted, confirmed, then gone: the outbox keeps what is still to do.
    let gone = wait_until(WITHIN, || async {
        alice.item(&tx.id).await.unwrap().is_none()
            && alice.item(&message.id).await.unwrap().is_none()
    })
    .await;
    assert!(gone, "the settled message and transaction were pruned");
    assert!(alice.outbox(None).await.unwrap().is_empty());
    alice.shutdown().await;
}

/// The chat example's start, twice: open, join the room at once, listen. Each online
/// member's presence is reported once (a second `join_room` on the same connection,
/// from the stored rooms and from the call, made it twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_a_room_reports_each_members_presence_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let bob = open_client(
        client_config(&server.url(), &dir.path().join("bob.db")),
        server.token("t1", "bob"),
    )
    .await;
    assert!(wait_state(&bob, ConnectionState::Realtime, WITHIN).await);
    bob.join_room("general").await.unwrap();
    let mut bob_updates = bob.subscribe();
    collect(&mut bob_updates, 1, WITHIN, |u| match u {
        Update::Room { joined: true, .. } => Some(()),
        _ => None,
    })
    .await;
    // The first run (no stored room), then a second with the room stored.
    for run in 0..2 {
        let alice = open_client(
            client_config(&server.url(), &dir.path().join("alice.db")),
            server.token("t1", "alice"),
        )
        .await;
        let mut updates = alice.subscribe();
        alice.join_room("general").await.unwrap();
        assert!(wait_state(&alice, ConnectionState::Realtime, WITHIN).await);
        let bobs = |u: Update| match u {
            Update::Presence(p) if p.user_id == "bob" => Some(p.status),
            _ => None,
        };
        // The first report may be slow on a loaded machine; a second would come soon
        // after it.
        let seen = collect(&mut updates, 1, WITHIN, bobs).await;
        assert_eq!(
            seen,
            vec![PresenceStatus::Online],
            "run {run}: bob's presence"
        );
        let again = collect(&mut updates, 1, Duration::from_secs(2), bobs).await;
        assert_eq!(again, vec![], "run {run}: bob's presence reported twice");
        alice.shutdown().await;
    }
    bob.shutdown().await;
}
