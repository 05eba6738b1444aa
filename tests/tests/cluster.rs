//! Several server instances on one PostgreSQL database (issue 12): what a user sees
//! must not depend on which instance their connection reached.
//!
//! Each test gets a fresh database on the run's cluster (`WEBWAKA_TEST_PG_URL`, started
//! by `scripts/test-all.sh`); the database-restart test starts a private cluster of its
//! own. Instances run in process ([`Instances`]) or as child processes that a test can
//! SIGKILL ([`Children`]); clients reach them directly or through the test's load
//! balancer.

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use webwaka_e2e::cluster::{Children, Instances, PgCluster, token};
use webwaka_e2e::harness::{
    client_config, collect, exchange, messages, open_client, texts, wait_state, wait_until,
};
use webwaka_e2e::proxy::Balance;
use webwaka_realtime::client::{OutgoingMessage, Target};
use webwaka_realtime::machine::ConnectionState;
use webwaka_realtime::store::ItemState;

const WITHIN: Duration = Duration::from_secs(20);

/// A raw WebSocket to one instance.
struct Ws(
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
);

impl Ws {
    async fn open(base: &str, token: &str, query: &str) -> Ws {
        let url = format!(
            "{}/ws?token={token}&{query}",
            base.replacen("http://", "ws://", 1)
        );
        let (stream, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let mut ws = Ws(stream);
        let connected = ws.next().await.unwrap();
        assert_eq!(connected["event"], "connected", "{connected}");
        ws
    }

    async fn send(&mut self, event: &str, data: Value, reference: &str) {
        let frame = json!({"event": event, "data": data, "ref": reference});
        self.0
            .send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
    }

    /// The next frame (`None`: closed, or no frame within 5 s).
    async fn next(&mut self) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, self.0.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).ok(),
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => {
                    return None;
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The next frame matching `want` (others skipped; at most 200 frames).
    async fn expect(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..200 {
            match self.next().await {
                Some(frame) if want(&frame) => return frame,
                Some(_) => continue,
                None => panic!("no {what}: the connection closed or went silent"),
            }
        }
        panic!("no {what} within 200 frames");
    }

    /// Sends a frame and waits for the answer carrying its `ref`.
    async fn call(&mut self, event: &str, data: Value, reference: &str) -> Value {
        self.send(event, data, reference).await;
        self.expect(reference, |f| f["ref"] == reference).await
    }

    /// Frames until the connection closes (at most 10 s): true if it did.
    async fn closes(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            if self.next().await.is_none() {
                return true;
            }
        }
        false
    }
}

fn presence_of<'a>(user: &'a str, status: &'a str) -> impl Fn(&Value) -> bool + 'a {
    move |f| {
        f["event"] == "presence" && f["data"]["userId"] == user && f["data"]["status"] == status
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cross_instances_once_and_in_order() {
    let cluster = Instances::start(3, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let users = ["alice", "bob", "carol"];
    let mut clients = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let client = open_client(
            client_config(&cluster.url(i), &dir.path().join(format!("{user}.db"))),
            token("t1", user, &[]),
        )
        .await;
        assert!(wait_state(&client, ConnectionState::Realtime, WITHIN).await);
        client.join_room("team").await.unwrap();
        clients.push(client);
    }
    // Direct messages between every pair, each pair on two instances.
    exchange((&clients[0], "alice"), (&clients[1], "bob"), 25, WITHIN).await;
    exchange((&clients[1], "bob"), (&clients[2], "carol"), 25, WITHIN).await;
    exchange((&clients[2], "carol"), (&clients[0], "alice"), 25, WITHIN).await;
    // Room messages: everyone gets everyone else's, in one order (the log's), once.
    let mut subs: Vec<_> = clients.iter().map(|c| c.subscribe()).collect();
    for round in 0..10 {
        for (i, client) in clients.iter().enumerate() {
            client
                .send_message(OutgoingMessage::new(
                    Target::Room("team".into()),
                    "chat",
                    json!({"text": format!("{}{round}", users[i])}),
                ))
                .await
                .unwrap();
        }
    }
    let mut orders = Vec::new();
    for (i, sub) in subs.iter_mut().enumerate() {
        let got = collect(sub, 20, WITHIN, |u| {
            messages(u).filter(|m| m.room_id.as_deref() == Some("team"))
        })
        .await;
        assert_eq!(got.len(), 20, "{} got {:?}", users[i], texts(&got));
        let seqs: Vec<u64> = got.iter().filter_map(|m| m.sequence).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        // Per sender, in the order sent.
        for (j, sender) in users.iter().enumerate() {
            if i == j {
                continue;
            }
            let theirs: Vec<String> = texts(&got)
                .into_iter()
                .filter(|t| t.starts_with(sender))
                .collect();
            let want: Vec<String> = (0..10).map(|r| format!("{sender}{r}")).collect();
            assert_eq!(theirs, want, "{} from {sender}", users[i]);
        }
        orders.push(got);
    }
    for client in &clients {
        client.shutdown().await;
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_rooms_policy_and_kicks_work_across_instances() {
    let cluster = Instances::start(3, |c| {
        c.room_policy = "ops:=ops".into();
        c.chaos = true;
    })
    .await;
    let alice_token = token("t1", "alice", &[]);
    let bob_token = token("t1", "bob", &[]);
    let mut alice = Ws::open(&cluster.url(0), &alice_token, "").await;
    let joined = alice
        .call("join_room", json!({"roomId": "lobby"}), "j1")
        .await;
    assert_eq!(joined["event"], "room_joined", "{joined}");
    // Bob connects to another instance and joins: alice hears he is online, once;
    // bob hears alice is.
    let mut bob = Ws::open(&cluster.url(1), &bob_token, "").await;
    let joined = bob
        .call("join_room", json!({"roomId": "lobby"}), "j2")
        .await;
    assert_eq!(joined["event"], "room_joined", "{joined}");
    bob.expect("alice online", presence_of("alice", "online"))
        .await;
    alice
        .expect("bob online", presence_of("bob", "online"))
        .await;
    // A presence change on instance 1 reaches instance 0.
    bob.send("presence_update", json!({"status": "away"}), "p1")
        .await;
    alice.expect("bob away", presence_of("bob", "away")).await;
    // A live message and a room message cross.
    let live = json!({"type": "typing", "interactionClass": "CLASS_A", "roomId": "lobby", "payload": {"on": true}});
    bob.send("message", live, "m1").await;
    let typing = alice
        .expect("bob's typing", |f| {
            f["event"] == "message" && f["data"]["type"] == "typing"
        })
        .await;
    assert_eq!(typing["data"]["senderId"], "bob");
    // The room policy holds on every instance.
    let refused = bob
        .call("join_room", json!({"roomId": "ops:pager"}), "j3")
        .await;
    assert_eq!(refused["data"]["code"], "AUTHZ_FAILED", "{refused}");
    // A third connection on the third instance: bob is still online after his
    // connection on instance 1 closes (he is connected elsewhere), offline after both.
    let mut bob2 = Ws::open(&cluster.url(2), &bob_token, "").await;
    drop(bob);
    tokio::time::sleep(Duration::from_millis(500)).await;
    bob2.call("ping", Value::Null, "still").await;
    // Chaos kicks issued on instance 0 reach instance 2.
    let chaos = cluster.servers[0].chaos().unwrap();
    chaos.drop_connections(webwaka_server_stub::chaos::Target::User {
        tenant: "t1",
        user: "bob",
    });
    assert!(
        bob2.closes().await,
        "bob's connection on instance 2 was dropped"
    );
    alice
        .expect("bob offline", presence_of("bob", "offline"))
        .await;
    // Expiring tokens on instance 0 closes alice's connection there and refuses her
    // old token on every instance.
    let mut carol = Ws::open(&cluster.url(1), &token("t1", "carol", &[]), "").await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    chaos.expire_tokens();
    assert!(
        carol.closes().await,
        "carol's old token was expired on instance 1"
    );
    assert!(alice.closes().await);
    let refused = reqwest::Client::new()
        .get(format!("{}/api/events/poll", cluster.url(2)))
        .bearer_auth(&alice_token)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    chaos.reset();
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_become_visible_in_order_to_a_poller() {
    // Many publishers on three instances; a poller on one of them must see every
    // sequence, none skipped: a cursor never jumps past one still in flight.
    let cluster = Instances::start(3, |c| c.publish_rate_limit = 100_000).await;
    let service = token("t1", "svc", &["service"]);
    let http = reqwest::Client::new();
    let publishers: Vec<_> = (0..6)
        .map(|p| {
            let (http, url, service) = (http.clone(), cluster.url(p % 3), service.clone());
            tokio::spawn(async move {
                for n in 0..40 {
                    let r = http
                        .post(format!("{url}/api/events"))
                        .bearer_auth(&service)
                        .json(&json!({"eventType": "tick", "payload": {"p": p, "n": n}}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status().as_u16(), 201);
                }
            })
        })
        .collect();
    let total = 6 * 40;
    let mut seen: Vec<u64> = Vec::new();
    let mut cursor: Option<String> = None;
    let deadline = tokio::time::Instant::now() + WITHIN;
    while seen.len() < total && tokio::time::Instant::now() < deadline {
        let mut url = format!("{}/api/events/poll?limit=7", cluster.url(1));
        if let Some(c) = &cursor {
            url.push_str(&format!("&lastEventId={c}"));
        }
        let page: Value = http
            .get(url)
            .bearer_auth(&service)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for event in page["events"].as_array().unwrap() {
            seen.push(event["sequence"].as_u64().unwrap());
        }
        if let Some(next) = page["nextEventId"].as_str() {
            cursor = Some(next.to_owned());
        }
    }
    for p in publishers {
        p.await.unwrap();
    }
    let want: Vec<u64> = (1..=total as u64).collect();
    assert_eq!(seen, want, "a poller saw every sequence, once, in order");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_exclusive_transactions_decided_once_and_the_audit_chain_is_one() {
    let cluster = Instances::start(3, |c| {
        c.publish_rate_limit = 100_000;
        c.transaction_confirm_delay_ms = 50;
    })
    .await;
    let http = reqwest::Client::new();
    let service = token("t1", "svc", &["service"]);
    for n in 0..60 {
        let r = http
            .post(format!("{}/api/events", cluster.url(n % 3)))
            .bearer_auth(&service)
            .json(&json!({"eventType": "job", "payload": {"n": n}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
    }
    // Six consumers on three instances claim concurrently with long leases: no event
    // is leased twice; acked, every one is seen exactly once.
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let (http, url, service) = (http.clone(), cluster.url(w % 3), service.clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..40 {
                    let claimed: Value = http
                        .post(format!("{url}/api/eventbus/groups/workers/claim"))
                        .bearer_auth(&service)
                        .json(&json!({"consumerId": format!("w{w}"), "max": 5, "visibilityTimeoutMs": 60_000}))
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    let events = claimed["events"].as_array().cloned().unwrap_or_default();
                    if events.is_empty() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    let ids: Vec<String> = events
                        .iter()
                        .map(|e| e["event"]["eventId"].as_str().unwrap().to_owned())
                        .collect();
                    let r = http
                        .post(format!("{url}/api/eventbus/groups/workers/ack"))
                        .bearer_auth(&service)
                        .json(&json!({"eventIds": ids}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status().as_u16(), 200);
                    got.extend(ids);
                }
                got
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    let distinct: HashSet<&String> = all.iter().collect();
    assert_eq!(distinct.len(), all.len(), "an event was leased twice");
    assert_eq!(all.len(), 60, "every event was claimed");

    // Transactions submitted on every instance (each runs the processor): each is
    // decided once — one status, one decision event, one audit record of it.
    let mut ids = Vec::new();
    for n in 0..12 {
        let r: Value = http
            .post(format!("{}/api/transactions", cluster.url(n % 3)))
            .bearer_auth(token("t1", "payer", &[]))
            .header("Idempotency-Key", format!("k{n}"))
            .json(&json!({"transactionType": "payment", "payload": {"n": n}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(r["transactionId"].as_str().unwrap().to_owned());
    }
    let payer = token("t1", "payer", &[]);
    let decided = wait_until(WITHIN, || async {
        let mut all = true;
        for (n, id) in ids.iter().enumerate() {
            let s: Value = http
                .get(format!(
                    "{}/api/transactions/{id}",
                    cluster.url((n + 1) % 3)
                ))
                .bearer_auth(&payer)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            all &= s["status"] == "CONFIRMED";
        }
        all
    })
    .await;
    assert!(decided, "every transaction confirmed");
    // Another round of sweeps on every instance changes nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let page: Value = http
        .get(format!("{}/api/events/poll?limit=1000", cluster.url(2)))
        .bearer_auth(&payer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut decisions: BTreeMap<String, usize> = BTreeMap::new();
    for e in page["events"].as_array().unwrap() {
        if e["eventType"] == "transaction.confirmed" {
            *decisions
                .entry(e["payload"]["transactionId"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    assert_eq!(decisions.len(), 12, "{decisions:?}");
    assert!(decisions.values().all(|n| *n == 1), "{decisions:?}");
    // Audited writers on every instance at once (violations are audited): one chain.
    let violators: Vec<_> = (0..30)
        .map(|n| {
            let (http, url) = (http.clone(), cluster.url(n % 3));
            tokio::spawn(async move {
                http.get(format!("{url}/api/events/poll"))
                    .bearer_auth(token("t1", "mallory", &[]))
                    .header("X-Tenant-ID", "t2")
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    for v in violators {
        assert_eq!(v.await.unwrap(), 403);
    }
    let admin = token("t1", "root", &["admin"]);
    let verify: Value = http
        .get(format!("{}/api/admin/audit/verify", cluster.url(1)))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(verify["valid"], true, "{verify}");
    // 12 submits, 12 confirmations, 30 violations at least.
    assert!(verify["entries"].as_u64().unwrap() >= 54, "{verify}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_and_resumes_work_from_any_instance_with_any_cursor() {
    let cluster = Instances::start(3, |_| {}).await;
    let http = reqwest::Client::new();
    let alice = token("t1", "alice", &[]);
    let bob = token("t1", "bob", &[]);
    let mut acks = Vec::new();
    for n in 0..9 {
        let ack: Value = http
            .post(format!("{}/api/messages", cluster.url(n % 3)))
            .bearer_auth(&alice)
            .json(&json!({"type": "dm", "recipientId": "bob", "payload": {"n": n}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        acks.push(ack["eventId"].as_str().unwrap().to_owned());
    }
    // A cursor from any instance, polled on every instance, gives the same page: at
    // once on the instance that appended, within the notification's delay on the
    // others (an instance's tail catches up by itself; a poll never skips an event,
    // it may only be a moment behind).
    let poll = |i: usize, cursor: String| {
        let (http, url, bob) = (http.clone(), cluster.url(i), bob.clone());
        async move {
            let page: Value = http
                .get(format!("{url}/api/events/poll?lastEventId={cursor}"))
                .bearer_auth(&bob)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            page["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["payload"]["payload"]["n"].as_u64().unwrap())
                .collect::<Vec<u64>>()
        }
    };
    for (k, cursor) in acks.iter().enumerate() {
        let want: Vec<u64> = (k as u64 + 1..9).collect();
        for i in 0..3 {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            let mut page = poll(i, cursor.clone()).await;
            while page != want && tokio::time::Instant::now() < deadline {
                // Behind, never ahead or out of order.
                assert!(want.starts_with(&page), "cursor {k} on {i}: {page:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                page = poll(i, cursor.clone()).await;
            }
            assert_eq!(page, want, "cursor {k} on instance {i}");
        }
    }
    // A resume on another instance replays what was missed, then `resumed`.
    let mut ws = Ws::open(&cluster.url(2), &bob, &format!("lastEventId={}", acks[4])).await;
    let mut replayed = Vec::new();
    loop {
        let frame = ws.next().await.unwrap();
        if frame["event"] == "resumed" {
            assert_eq!(frame["data"]["replayed"], 4);
            break;
        }
        if frame["event"] == "message" {
            replayed.push(frame["data"]["payload"]["n"].as_u64().unwrap());
        }
    }
    assert_eq!(replayed, vec![5, 6, 7, 8]);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_and_transactions_through_a_load_balancer() {
    let cluster = Instances::start(3, |c| {
        c.reconciliation_type_strategies = "task=FIELD_LEVEL_MERGE".into();
    })
    .await;
    let lb = cluster.balancer(Balance::RoundRobin).await;
    let dir = tempfile::tempdir().unwrap();
    let a = open_client(
        client_config(&lb.url(), &dir.path().join("a.db")),
        token("t1", "alice", &[]),
    )
    .await;
    let b = open_client(
        client_config(&lb.url(), &dir.path().join("b.db")),
        token("t1", "bob", &[]),
    )
    .await;
    assert!(wait_state(&a, ConnectionState::Realtime, WITHIN).await);
    assert!(wait_state(&b, ConnectionState::Realtime, WITHIN).await);
    a.create_entity("task", "t1", json!({"title": "draft", "done": false}))
        .await
        .unwrap();
    let seen = wait_until(WITHIN, || async {
        b.entity("task", "t1")
            .await
            .unwrap()
            .is_some_and(|e| e.value.data["title"] == "draft")
    })
    .await;
    assert!(seen, "the create crossed instances");
    // Both go offline, edit different fields, and come back (to whichever instance
    // the balancer picks): the fields merge on every replica.
    a.network_lost();
    b.network_lost();
    a.update_entity("task", "t1", json!({"title": "final"}))
        .await
        .unwrap();
    b.update_entity("task", "t1", json!({"done": true}))
        .await
        .unwrap();
    lb.cut_all();
    a.network_available();
    b.network_available();
    let converged = wait_until(WITHIN, || async {
        let want = json!({"title": "final", "done": true});
        let va = a.entity("task", "t1").await.unwrap();
        let vb = b.entity("task", "t1").await.unwrap();
        va.is_some_and(|e| e.value.data == want && e.pending.is_empty())
            && vb.is_some_and(|e| e.value.data == want && e.pending.is_empty())
    })
    .await;
    assert!(
        converged,
        "{:?} vs {:?}",
        a.entity("task", "t1").await.unwrap(),
        b.entity("task", "t1").await.unwrap()
    );
    // A transaction through the balancer is confirmed once.
    let item = a
        .submit_transaction("payment.transfer", json!({"amount": 7}), None)
        .await
        .unwrap();
    let item = a
        .wait_settled(
            &item.id,
            &[ItemState::Confirmed, ItemState::Rejected],
            WITHIN,
        )
        .await
        .unwrap();
    assert_eq!(item.state, ItemState::Confirmed);
    a.shutdown().await;
    b.shutdown().await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_traffic_loses_nothing_acknowledged() {
    let database = webwaka_e2e::cluster::fresh_database().await;
    let mut children = Children::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_server_child")),
        &database,
        3,
    );
    let lb = webwaka_e2e::proxy::Proxy::balance(children.addrs(), Balance::RoundRobin)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = open_client(
        client_config(&lb.url(), &dir.path().join("a.db")),
        token("t1", "alice", &[]),
    )
    .await;
    let b = open_client(
        client_config(&lb.url(), &dir.path().join("b.db")),
        token("t1", "bob", &[]),
    )
    .await;
    assert!(wait_state(&a, ConnectionState::Realtime, WITHIN).await);
    assert!(wait_state(&b, ConnectionState::Realtime, WITHIN).await);
    let n = 60;
    let mut at_b = b.subscribe();
    let sender = {
        let a = a.clone();
        tokio::spawn(async move {
            for i in 0..n {
                a.send_message(webwaka_e2e::harness::direct("bob", &format!("m{i}")))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    // Kill instance 1 mid-traffic, and bring it back later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    children.kill(1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    children.restart(1);
    sender.await.unwrap();
    let got = texts(&collect(&mut at_b, n, Duration::from_secs(40), messages).await);
    let want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "bob got every message once, in order");
    // Everything alice sent is acknowledged (nothing left in her outbox).
    let settled = wait_until(WITHIN, || async {
        a.outbox(None)
            .await
            .unwrap()
            .iter()
            .all(webwaka_e2e::harness::is_settled)
    })
    .await;
    assert!(settled);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_under_traffic_loses_nothing_acknowledged() {
    let pg = PgCluster::start();
    let database = webwaka_server_stub::testing::fresh_database(&pg.url)
        .await
        .unwrap();
    let cluster = Instances::start_on(database, 2, |c| {
        c.database_connect_timeout_ms = 1_000;
    })
    .await;
    let http = reqwest::Client::new();
    let dir = tempfile::tempdir().unwrap();
    let a = open_client(
        client_config(&cluster.url(0), &dir.path().join("a.db")),
        token("t1", "alice", &[]),
    )
    .await;
    let b = open_client(
        client_config(&cluster.url(1), &dir.path().join("b.db")),
        token("t1", "bob", &[]),
    )
    .await;
    assert!(wait_state(&a, ConnectionState::Realtime, WITHIN).await);
    assert!(wait_state(&b, ConnectionState::Realtime, WITHIN).await);
    let mut at_b = b.subscribe();
    let mut sent = 0;
    for (round, mode) in ["fast", "immediate"].into_iter().enumerate() {
        for i in 0..10 {
            a.send_message(webwaka_e2e::harness::direct(
                "bob",
                &format!("r{round}-{i}"),
            ))
            .await
            .unwrap();
            sent += 1;
        }
        pg.stop(mode);
        // Unhealthy, and writes refused with a retryable 503.
        let unhealthy = wait_until(WITHIN, || async {
            http.get(format!("{}/health", cluster.url(0)))
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 503)
        })
        .await;
        assert!(unhealthy, "{mode}: /health reports the database");
        let refused = http
            .post(format!("{}/api/messages", cluster.url(1)))
            .bearer_auth(token("t1", "carol", &[]))
            .json(&json!({"type": "dm", "recipientId": "bob", "payload": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status().as_u16(), 503, "{mode}");
        assert!(refused.headers().contains_key("retry-after"), "{mode}");
        // Sent while the database is down: kept by the SDK, sent when it is back.
        for i in 10..20 {
            a.send_message(webwaka_e2e::harness::direct(
                "bob",
                &format!("r{round}-{i}"),
            ))
            .await
            .unwrap();
            sent += 1;
        }
        pg.restart();
        let healthy = wait_until(WITHIN, || async {
            http.get(format!("{}/health", cluster.url(1)))
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 200)
        })
        .await;
        assert!(healthy, "{mode}: the instances recovered by themselves");
    }
    let got = texts(&collect(&mut at_b, sent, Duration::from_secs(60), messages).await);
    let want: Vec<String> = (0..2)
        .flat_map(|r| (0..20).map(move |i| format!("r{r}-{i}")))
        .collect();
    assert_eq!(got, want, "every message once, in order");
    a.shutdown().await;
    b.shutdown().await;
    cluster.stop().await;
}

/// Found by the 30-minute soak: a resume whose events could not be read (PostgreSQL
/// down, the cursor still in the instance's tail) was answered with an `error` and the
/// connection left open, so its live deliveries moved the client's cursor past the
/// events it was never sent. Now the connection closes with 1013 `RESUME_FAILED`, and
/// the same cursor resumes once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_the_database_cannot_serve_closes_the_connection() {
    let pg = PgCluster::start();
    let database = webwaka_server_stub::testing::fresh_database(&pg.url)
        .await
        .unwrap();
    let cluster = Instances::start_on(database, 1, |c| {
        c.database_connect_timeout_ms = 1_000;
    })
    .await;
    let http = reqwest::Client::new();
    let alice = token("t1", "alice", &[]);
    let bob = token("t1", "bob", &[]);
    let mut acks = Vec::new();
    for n in 0..3 {
        let ack: Value = http
            .post(format!("{}/api/messages", cluster.url(0)))
            .bearer_auth(&alice)
            .json(&json!({"type": "dm", "recipientId": "bob", "payload": {"n": n}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        acks.push(ack["eventId"].as_str().unwrap().to_owned());
    }
    pg.stop("fast");
    let query = format!("lastEventId={}", acks[0]);
    let mut ws = Ws::open(&cluster.url(0), &bob, &query).await;
    let error = ws.next().await.expect("an error before the close");
    assert_eq!(error["event"], "error", "{error}");
    assert_eq!(error["data"]["code"], "SERVER_FULL", "{error}");
    let close = tokio::time::timeout(WITHIN, async {
        while let Some(frame) = ws.0.next().await {
            match frame {
                Ok(Message::Close(close)) => return close,
                Ok(Message::Text(t)) => panic!("nothing may follow the error: {t}"),
                Ok(_) => {}
                Err(e) => panic!("no close frame: {e}"),
            }
        }
        None
    })
    .await
    .unwrap()
    .expect("a close frame");
    assert_eq!(u16::from(close.code), 1013);
    assert_eq!(close.reason.as_str(), "RESUME_FAILED");
    // The database back, the same cursor resumes with what was missed.
    pg.restart();
    let resumed = wait_until(WITHIN, || async {
        http.get(format!("{}/health", cluster.url(0)))
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 200)
    })
    .await;
    assert!(resumed, "the instance recovered");
    let mut ws = Ws::open(&cluster.url(0), &bob, &query).await;
    let mut replayed = Vec::new();
    loop {
        let frame = ws.next().await.expect("a replay, then resumed");
        if frame["event"] == "resumed" {
            break;
        }
        if frame["event"] == "message" {
            replayed.push(frame["data"]["payload"]["n"].as_u64().unwrap());
        }
    }
    assert_eq!(replayed, vec![1, 2]);
    cluster.stop().await;
}
