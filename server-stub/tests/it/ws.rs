//! PROTOCOL.md §3: the WebSocket, every client event and every bad input.

use std::time::Duration;

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{Read, TestServer, message};

#[tokio::test]
async fn connected_ping_and_bad_frames_leave_the_connection_usable() {
    let ts = TestServer::start(|_| {}).await;
    let token = ts.token("t1", "alice", &[]);
    let mut ws = ts.ws_query(&token, "clientId=install-1").await;
    let c = &ws.connected;
    assert!(c["connectionId"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(c["clientId"], "install-1");
    assert_eq!(
        c["interactionClasses"],
        json!(["CLASS_A", "CLASS_B", "CLASS_C"])
    );
    assert_eq!(c["pingInterval"], 200);
    assert_eq!(c["pingTimeout"], 1000);
    assert!(c["serverTime"].is_string());
    // Without clientId the server makes one.
    let other = ts.ws(&token).await;
    assert!(
        other.connected["clientId"]
            .as_str()
            .is_some_and(|s| s.len() >= 32)
    );

    let pong = ws.call("ping", Value::Null, "p1").await;
    assert_eq!(pong["event"], "pong");
    assert!(pong["data"]["serverTime"].is_string());

    // Malformed JSON: no ref can be read, so the error carries none.
    ws.send_raw(Message::Text("{not json".into())).await;
    let error = ws.expect("error").await;
    assert_eq!(error["data"]["code"], "INVALID_REQUEST");
    assert_eq!(error["data"]["status"], 400);
    assert_eq!(error["data"]["details"]["path"], "input");
    // Not an object.
    ws.send_raw(Message::Text("[1,2]".into())).await;
    assert_eq!(ws.expect("error").await["data"]["code"], "INVALID_REQUEST");
    // Binary frame.
    ws.send_raw(Message::Binary(vec![1u8, 2, 3].into())).await;
    assert_eq!(ws.expect("error").await["data"]["code"], "INVALID_REQUEST");
    // Unknown event, with its ref in the envelope and in data.
    let error = ws.call("teleport", json!({}), "u1").await;
    assert_eq!(error["event"], "error");
    assert_eq!(error["data"]["code"], "INVALID_REQUEST");
    assert_eq!(error["data"]["ref"], "u1");
    // Missing fields are named.
    let error = ws
        .call("message", json!({"payload": 1, "roomId": "r"}), "m1")
        .await;
    assert_eq!(error["data"]["details"]["path"], "data.type", "{error}");
    let error = ws.call("join_room", json!({}), "j1").await;
    assert_eq!(error["data"]["details"]["path"], "data.roomId");
    let error = ws
        .call("message", json!({"type": "t", "payload": 1}), "m2")
        .await;
    assert_eq!(error["data"]["details"]["path"], "data.recipientId");
    let error = ws
        .call(
            "message",
            json!({"type": "t", "payload": 1, "roomId": "r", "interactionClass": "CLASS_Q"}),
            "m3",
        )
        .await;
    assert_eq!(error["data"]["details"]["path"], "data.interactionClass");
    let error = ws
        .call("presence_update", json!({"status": "sleepy"}), "p2")
        .await;
    assert_eq!(error["data"]["code"], "INVALID_REQUEST");
    let error = ws.call("resume", json!({"lastEventId": ""}), "r1").await;
    assert_eq!(error["data"]["details"]["path"], "data.lastEventId");
    // CLASS_D is never realtime.
    let mut d = message(Some("bob"), None, "pay");
    d["interactionClass"] = json!("CLASS_D");
    let error = ws.call("message", d, "d1").await;
    assert_eq!(error["data"]["code"], "REALTIME_NOT_ALLOWED");
    assert_eq!(error["data"]["status"], 422);
    ws.assert_usable().await;
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let ts = TestServer::start(|c| c.max_frame_bytes = 4096).await;
    let token = ts.token("t1", "alice", &[]);
    let mut ws = ts.ws(&token).await;
    let big = "x".repeat(8192);
    ws.send(json!({"event": "message", "data": message(Some("bob"), None, &big)}))
        .await;
    assert_eq!(ws.expect_close(Duration::from_secs(3)).await, Some(1009));
    // The server is fine: a new connection works.
    let mut again = ts.ws(&token).await;
    again.assert_usable().await;
}

/// A connection's durable messages are queued for the log without waiting for each
/// other's commit, yet every frame is answered in the order sent: acks, a refusal, a
/// live message's ack and a pong after the messages before them.
#[tokio::test]
async fn frames_sent_back_to_back_are_answered_in_their_order() {
    let ts = TestServer::start(|_| {}).await;
    let mut alice = ts.ws(&ts.token("t1", "alice", &[])).await;
    let mut bob = ts.ws(&ts.token("t1", "bob", &[])).await;
    let mut expected = Vec::new();
    for i in 0..40 {
        let reference = format!("m-{i}");
        let data = match i {
            // Not a member of this room: refused.
            13 => message(None, Some("closed-room"), "refused"),
            // Live: acked at once by itself, but answered after those before it.
            27 => {
                let mut live = message(Some("bob"), None, "typing");
                live["interactionClass"] = json!("CLASS_A");
                live
            }
            _ => message(Some("bob"), None, &format!("text {i}")),
        };
        alice
            .send(json!({"event": "message", "data": data, "ref": reference}))
            .await;
        expected.push(reference);
    }
    alice
        .send(json!({"event": "ping", "data": null, "ref": "last"}))
        .await;
    expected.push("last".to_owned());
    let mut answered = Vec::new();
    let mut sequences = Vec::new();
    while answered.len() < expected.len() {
        let frame = alice.next_frame().await;
        let Some(reference) = frame["ref"].as_str() else {
            continue;
        };
        let event = frame["event"].as_str().unwrap_or_default().to_owned();
        match reference {
            "m-13" => assert_eq!(event, "error", "{frame}"),
            "last" => assert_eq!(event, "pong", "{frame}"),
            _ => assert_eq!(event, "message_ack", "{frame}"),
        }
        if let Some(seq) = frame["data"]["sequence"].as_u64() {
            sequences.push(seq);
        }
        answered.push(reference.to_owned());
    }
    assert_eq!(answered, expected, "answers in the order of the frames");
    assert_eq!(sequences.len(), 38, "every durable message stored");
    assert!(
        sequences.windows(2).all(|w| w[0] < w[1]),
        "stored in the order sent: {sequences:?}"
    );
    // Bob gets the 38 stored ones in order (and the live one among them).
    let mut delivered = Vec::new();
    while delivered.len() < 38 {
        let frame = bob.expect("message").await;
        if let Some(seq) = frame["data"]["sequence"].as_u64() {
            delivered.push(seq);
        }
    }
    assert_eq!(delivered, sequences);
}

#[tokio::test]
async fn direct_messages_are_durable_acked_and_delivered_once() {
    let ts = TestServer::start(|_| {}).await;
    let alice = ts.token("t1", "alice", &[]);
    let bob = ts.token("t1", "bob", &[]);
    let mut a1 = ts.ws(&alice).await;
    let mut a2 = ts.ws(&alice).await;
    let mut b = ts.ws(&bob).await;
    let mut data = message(Some("bob"), None, "hello");
    data["messageId"] = json!("7c9e6679-7425-40de-944b-e07fc1f90ae7");
    data["metadata"] = json!({"clientTime": "x"});
    let ack = a1.call("message", data.clone(), "c-1").await;
    assert_eq!(ack["event"], "message_ack", "{ack}");
    assert_eq!(
        ack["data"]["messageId"],
        "7c9e6679-7425-40de-944b-e07fc1f90ae7"
    );
    let seq = ack["data"]["sequence"].as_u64().unwrap();
    assert!(ack["data"]["eventId"].is_string());
    let got = b.expect("message").await["data"].clone();
    assert_eq!(got["senderId"], "alice");
    assert_eq!(got["tenantId"], "t1");
    assert_eq!(got["recipientId"], "bob");
    assert_eq!(got["payload"]["text"], "hello");
    assert_eq!(got["interactionClass"], "CLASS_C");
    assert_eq!(got["sequence"], seq);
    assert_eq!(got["eventId"], ack["data"]["eventId"]);
    assert_eq!(got["metadata"]["clientTime"], "x");
    // The sender's other connection gets it; the sending one only the ack.
    assert_eq!(a2.expect("message").await["data"]["sequence"], seq);
    a1.expect_none("message", Duration::from_millis(300)).await;
    // A resend is acked again with the same ids and never delivered twice.
    let again = a1.call("message", data, "c-2").await;
    assert_eq!(again["data"], ack["data"]);
    b.expect_none("message", Duration::from_millis(300)).await;
    // CLASS_A: live only, acked without eventId.
    let mut live = message(Some("bob"), None, "typing");
    live["interactionClass"] = json!("CLASS_A");
    live["messageId"] = json!("live-1");
    let ack = a1.call("message", live.clone(), "c-3").await;
    assert!(ack["data"].get("eventId").is_none(), "{ack}");
    let got = b.expect("message").await;
    assert_eq!(got["data"]["interactionClass"], "CLASS_A");
    assert!(got["data"].get("sequence").is_none());
    // A live resend is acked and not delivered again either.
    let ack = a1.call("message", live, "c-4").await;
    assert_eq!(ack["data"]["messageId"], "live-1");
    b.expect_none("message", Duration::from_millis(300)).await;
    // Only the durable one is in the log.
    let (_, page) = ts.get("/api/events/poll", Some(&bob), &[]).await;
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn rooms_need_membership_follow_the_policy_and_survive_reconnects() {
    let ts = TestServer::start(|c| c.room_policy = "ops:=ops|admin".into()).await;
    let alice = ts.token("t1", "alice", &[]);
    let bob = ts.token("t1", "bob", &[]);
    let opsy = ts.token("t1", "olga", &["ops"]);
    let mut a = ts.ws(&alice).await;
    let mut b = ts.ws(&bob).await;
    // Posting to a room one is not in.
    let error = a
        .call("message", message(None, Some("lobby"), "hi"), "r0")
        .await;
    assert_eq!(error["data"]["code"], "AUTHZ_FAILED");
    // Policy.
    let error = a
        .call("join_room", json!({"roomId": "ops:pager"}), "j0")
        .await;
    assert_eq!(error["data"]["code"], "AUTHZ_FAILED");
    let mut o = ts.ws(&opsy).await;
    let joined = o
        .call("join_room", json!({"roomId": "ops:pager"}), "j1")
        .await;
    assert_eq!(joined["event"], "room_joined");
    // Open rooms.
    assert_eq!(
        a.call("join_room", json!({"roomId": "lobby"}), "j2").await["data"]["roomId"],
        "lobby"
    );
    assert_eq!(
        b.call("join_room", json!({"roomId": "lobby"}), "j3").await["event"],
        "room_joined"
    );
    let ack = a
        .call("message", message(None, Some("lobby"), "hi all"), "r1")
        .await;
    assert_eq!(ack["event"], "message_ack");
    let got = b.expect("message").await;
    assert_eq!(got["data"]["roomId"], "lobby");
    // Membership belongs to the user: bob reconnects and still gets room messages.
    b.close().await;
    let mut b = ts.ws(&bob).await;
    a.call("message", message(None, Some("lobby"), "again"), "r2")
        .await;
    assert_eq!(
        b.expect("message").await["data"]["payload"]["text"],
        "again"
    );
    // Leaving.
    assert_eq!(
        b.call("leave_room", json!({"roomId": "lobby"}), "l1").await["event"],
        "room_left"
    );
    a.call("message", message(None, Some("lobby"), "gone?"), "r3")
        .await;
    b.expect_none("message", Duration::from_millis(300)).await;
    let error = b
        .call("message", message(None, Some("lobby"), "x"), "r4")
        .await;
    assert_eq!(error["data"]["code"], "AUTHZ_FAILED");
}

#[tokio::test]
async fn presence_goes_to_users_sharing_a_room_and_never_to_oneself() {
    let ts = TestServer::start(|_| {}).await;
    let alice = ts.token("t1", "alice", &[]);
    let bob = ts.token("t1", "bob", &[]);
    let carol = ts.token("t1", "carol", &[]);
    let mut a = ts.ws(&alice).await;
    a.call("join_room", json!({"roomId": "team"}), "j").await;
    let mut c = ts.ws(&carol).await; // shares no room: hears nothing
    let mut b = ts.ws(&bob).await;
    let joined = b.call("join_room", json!({"roomId": "team"}), "j").await;
    assert_eq!(joined["event"], "room_joined");
    // The joiner gets the room's online members...
    let p = b.expect("presence").await;
    assert_eq!(
        (p["data"]["userId"].as_str(), p["data"]["status"].as_str()),
        (Some("alice"), Some("online"))
    );
    // ...and alice hears bob, who shared no room with her before.
    let p = a.expect("presence").await;
    assert_eq!(
        (p["data"]["userId"].as_str(), p["data"]["status"].as_str()),
        (Some("bob"), Some("online"))
    );
    b.send(json!({"event": "presence_update", "data": {"status": "away", "metadata": {"statusText": "lunch"}}}))
        .await;
    let p = a.expect("presence").await;
    assert_eq!(p["data"]["status"], "away");
    assert_eq!(p["data"]["metadata"]["statusText"], "lunch");
    assert_eq!(p["data"]["tenantId"], "t1");
    // A second connection of bob is not announced; the last one closing is.
    let b2 = ts.ws(&bob).await;
    b2.close().await;
    a.expect_none("presence", Duration::from_millis(300)).await;
    b.close().await;
    let p = a.expect("presence").await;
    assert_eq!(
        (p["data"]["userId"].as_str(), p["data"]["status"].as_str()),
        (Some("bob"), Some("offline"))
    );
    c.expect_none("presence", Duration::from_millis(200)).await;
    // Alice never hears about herself.
    a.expect_none("presence", Duration::from_millis(200)).await;
}

#[tokio::test]
async fn resume_replays_missed_deliveries_in_order() {
    let ts = TestServer::start(|_| {}).await;
    let alice = ts.token("t1", "alice", &[]);
    let bob = ts.token("t1", "bob", &[]);
    let mut a = ts.ws(&alice).await;
    let mut b = ts.ws(&bob).await;
    a.call("message", message(Some("bob"), None, "m1"), "1")
        .await;
    let first = b.expect("message").await["data"]["eventId"]
        .as_str()
        .unwrap()
        .to_owned();
    b.close().await;
    let mut seqs = Vec::new();
    for i in 2..=4 {
        let ack = a
            .call(
                "message",
                message(Some("bob"), None, &format!("m{i}")),
                &i.to_string(),
            )
            .await;
        seqs.push(ack["data"]["sequence"].as_u64().unwrap());
    }
    // Reconnect with the cursor in the query: the three missed, then `resumed`.
    let mut b = ts.ws_query(&bob, &format!("lastEventId={first}")).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = b.expect("message").await;
        got.push(m["data"]["sequence"].as_u64().unwrap());
    }
    assert_eq!(got, seqs);
    let resumed = b.expect("resumed").await;
    assert_eq!(resumed["data"]["replayed"], 3);
    let last = resumed["data"]["lastEventId"].as_str().unwrap().to_owned();
    // A resume frame from the newest cursor replays nothing and echoes the cursor.
    let resumed = b.call("resume", json!({"lastEventId": last}), "r").await;
    assert_eq!(resumed["event"], "resumed");
    assert_eq!(resumed["data"]["replayed"], 0);
    assert_eq!(resumed["data"]["lastEventId"], last.as_str());
    // Live delivery continues without duplicates.
    a.call("message", message(Some("bob"), None, "m5"), "5")
        .await;
    assert_eq!(b.expect("message").await["data"]["payload"]["text"], "m5");
    b.expect_none("message", Duration::from_millis(200)).await;
    // Unknown cursors.
    let error = b.call("resume", json!({"lastEventId": "nope"}), "x").await;
    assert_eq!(error["data"]["code"], "CURSOR_EXPIRED");
    assert_eq!(error["data"]["status"], 410);
    let (status, body) = ts
        .ws_raw(Some(&bob), "lastEventId=nope", &[])
        .await
        .err()
        .expect("410");
    assert_eq!(
        (status, body["code"].as_str()),
        (410, Some("CURSOR_EXPIRED"))
    );
}

#[tokio::test]
async fn silent_connections_are_closed_and_pings_are_sent() {
    let ts = TestServer::start(|c| {
        c.ping_interval_ms = 100;
        c.ping_timeout_ms = 400;
    })
    .await;
    let token = ts.token("t1", "alice", &[]);
    // A client that reads sees pings (and answers them) and stays open.
    let mut live = ts.ws(&token).await;
    let mut pinged = false;
    for _ in 0..20 {
        use futures_util::StreamExt;
        match tokio::time::timeout(Duration::from_millis(500), live.stream.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => {
                pinged = true;
                break;
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pinged);
    // Reading (which answers pings) keeps it open well past the timeout.
    for _ in 0..8 {
        live.assert_usable().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A client that reads nothing answers no ping: closed after the timeout.
    let mut silent = ts.ws(&token).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        silent.expect_close(Duration::from_secs(2)).await,
        Some(1000)
    );
}

#[tokio::test]
async fn the_message_rate_limit_answers_retry_after_and_spares_refused_frames() {
    let ts = TestServer::start(|c| c.message_rate_limit = 3).await;
    let token = ts.token("t1", "alice", &[]);
    let mut ws = ts.ws(&token).await;
    // Refused frames use no budget.
    for i in 0..5 {
        let error = ws
            .call(
                "message",
                json!({"type": "t", "payload": 1}),
                &format!("bad{i}"),
            )
            .await;
        assert_eq!(error["data"]["code"], "INVALID_REQUEST");
    }
    for i in 0..3 {
        let ack = ws
            .call(
                "message",
                message(Some("bob"), None, "x"),
                &format!("ok{i}"),
            )
            .await;
        assert_eq!(ack["event"], "message_ack", "{ack}");
    }
    let error = ws
        .call("message", message(Some("bob"), None, "x"), "over")
        .await;
    assert_eq!(error["data"]["code"], "RATE_LIMIT");
    assert_eq!(error["data"]["status"], 429);
    assert!(error["data"]["details"]["retryAfterMs"].as_u64().unwrap() > 0);
    ws.assert_usable().await;
    // HTTP messages share the budget.
    let (status, body) = ts
        .post(
            "/api/messages",
            Some(&token),
            message(Some("bob"), None, "x"),
            &[],
        )
        .await;
    assert_eq!((status, body["code"].as_str()), (429, Some("RATE_LIMIT")));
}

#[tokio::test]
async fn server_full_is_503_and_not_an_auth_failure() {
    let ts = TestServer::start(|c| c.max_connections = 1).await;
    let token = ts.token("t1", "alice", &[]);
    let first = ts.ws(&token).await;
    let (status, body) = ts.ws_raw(Some(&token), "", &[]).await.err().expect("full");
    assert_eq!(status, 503);
    assert_eq!(body["code"], "SERVER_FULL");
    // A bad token is still AUTH_FAILED, even when full.
    let (status, _) = ts.ws_raw(Some("bad"), "", &[]).await.err().expect("401");
    assert_eq!(status, 401);
    first.close().await;
    // The slot comes back.
    let mut ok = None;
    for _ in 0..40 {
        if let Ok((ws, ())) = ts.ws_raw(Some(&token), "", &[]).await {
            ok = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok.is_some());
}

#[tokio::test]
async fn a_join_past_max_rooms_per_user_is_refused() {
    let ts = TestServer::start(|c| c.max_rooms_per_user = 3).await;
    let mut a = ts.ws(&ts.token("t1", "alice", &[])).await;
    for room in ["r1", "r2", "r3"] {
        let joined = a.call("join_room", json!({"roomId": room}), room).await;
        assert_eq!(joined["event"], "room_joined", "{joined}");
    }
    let refused = a.call("join_room", json!({"roomId": "r4"}), "r4").await;
    assert_eq!(refused["data"]["code"], "AUTHZ_FAILED", "{refused}");
    let details = &refused["data"]["details"];
    assert_eq!(details["reason"], "MAX_ROOMS_PER_USER", "{refused}");
    assert_eq!(
        (details["roomId"].as_str(), details["maxRooms"].as_u64()),
        (Some("r4"), Some(3))
    );
    // A room one is in may be joined again; one left makes room for another.
    let again = a.call("join_room", json!({"roomId": "r1"}), "again").await;
    assert_eq!(again["event"], "room_joined", "{again}");
    let left = a.call("leave_room", json!({"roomId": "r1"}), "leave").await;
    assert_eq!(left["event"], "room_left", "{left}");
    let joined = a
        .call("join_room", json!({"roomId": "r4"}), "r4-again")
        .await;
    assert_eq!(joined["event"], "room_joined", "{joined}");
    // Another user has a cap of their own.
    let mut b = ts.ws(&ts.token("t1", "bob", &[])).await;
    let joined = b.call("join_room", json!({"roomId": "r5"}), "b").await;
    assert_eq!(joined["event"], "room_joined", "{joined}");
}

#[tokio::test]
async fn an_expired_token_closes_with_1008() {
    let ts = TestServer::start(|c| c.jwt_leeway_ms = 0).await;
    let token = ts.running().keys().mint("t1", "alice", &[], 1);
    let mut ws = ts.ws(&token).await;
    let deadline = Duration::from_secs(4);
    let code = loop {
        match ws.read(deadline).await {
            Read::Closed(frame) => {
                let frame = frame.expect("close frame");
                assert_eq!(frame.reason.as_str(), "AUTH_EXPIRED");
                break u16::from(frame.code);
            }
            Read::Frame(_) => continue,
            Read::Timeout => panic!("not closed"),
        }
    };
    assert_eq!(code, 1008);
}

#[tokio::test]
async fn shutdown_closes_websockets_with_1001() {
    let mut ts = TestServer::start(|_| {}).await;
    let token = ts.token("t1", "alice", &[]);
    let mut ws = ts.ws(&token).await;
    let stop = tokio::spawn(async move {
        ts.stop().await;
        ts
    });
    assert_eq!(ws.expect_close(Duration::from_secs(3)).await, Some(1001));
    let _ts = stop.await.unwrap();
}

#[tokio::test]
async fn tenants_never_mix_on_the_websocket() {
    let ts = TestServer::start(|_| {}).await;
    let alice_a = ts.token("tenant-a", "alice", &[]);
    let bob_a = ts.token("tenant-a", "bob", &[]);
    let bob_b = ts.token("tenant-b", "bob", &[]);
    let mut a = ts.ws(&alice_a).await;
    let mut ba = ts.ws(&bob_a).await;
    let mut bb = ts.ws(&bob_b).await;
    // Same room id in two tenants: two rooms.
    a.call("join_room", json!({"roomId": "general"}), "1").await;
    ba.call("join_room", json!({"roomId": "general"}), "2")
        .await;
    bb.call("join_room", json!({"roomId": "general"}), "3")
        .await;
    a.call("message", message(None, Some("general"), "room"), "4")
        .await;
    a.call("message", message(Some("bob"), None, "direct"), "5")
        .await;
    assert_eq!(
        ba.expect("message").await["data"]["payload"]["text"],
        "room"
    );
    assert_eq!(
        ba.expect("message").await["data"]["payload"]["text"],
        "direct"
    );
    bb.expect_none("message", Duration::from_millis(300)).await;
    bb.expect_none("presence", Duration::from_millis(10)).await;
    // A frame naming another tenant is a violation; the connection stays usable.
    let mut data = message(Some("bob"), None, "sneaky");
    data["tenantId"] = json!("tenant-b");
    let error = a.call("message", data, "6").await;
    assert_eq!(error["data"]["code"], "TENANT_VIOLATION");
    let error = a
        .call(
            "join_room",
            json!({"roomId": "general", "tenantId": "tenant-b"}),
            "7",
        )
        .await;
    assert_eq!(error["data"]["code"], "TENANT_VIOLATION");
    bb.expect_none("message", Duration::from_millis(200)).await;
    a.assert_usable().await;
    // Tenant B's log holds nothing.
    let (_, page) = ts.get("/api/events/poll", Some(&bob_b), &[]).await;
    assert_eq!(page["events"], json!([]));
}

#[tokio::test]
async fn repeated_violations_close_with_1008() {
    let ts = TestServer::start(|_| {}).await;
    let token = ts.token("t1", "alice", &[]);
    let mut ws = ts.ws(&token).await;
    for i in 0..100 {
        let error = ws.call("nonsense", json!({}), &format!("n{i}")).await;
        assert_eq!(error["event"], "error");
    }
    // The 101st refusal within a minute closes the connection.
    ws.send(json!({"event": "nonsense", "data": {}, "ref": "last"}))
        .await;
    assert_eq!(ws.expect_close(Duration::from_secs(3)).await, Some(1008));
}

#[tokio::test]
async fn a_client_too_slow_to_read_is_closed_with_1013_and_resumes() {
    let ts = TestServer::start(|c| c.ws_send_queue = 2).await;
    let svc = ts.token("t1", "svc", &["service"]);
    let bob = ts.token("t1", "bob", &[]);
    let mut slow = ts.ws(&bob).await;
    // Far more than the socket buffers hold while bob reads nothing.
    let blob = "x".repeat(200_000);
    let mut last = String::new();
    for i in 0..60 {
        let (status, published) = ts
            .post(
                "/api/events",
                Some(&svc),
                json!({"eventType": "blob", "payload": {"i": i, "blob": blob}}),
                &[],
            )
            .await;
        assert_eq!(status, 201);
        last = published["eventId"].as_str().unwrap().to_owned();
    }
    // The server gave up on the connection: a close with 1013 when the client reads
    // up to it in time; if the client reads only after the server's close handshake
    // timed out, its late pongs meet a closed socket and the rest is reset.
    let code = tokio::time::timeout(Duration::from_secs(10), async {
        use futures_util::StreamExt;
        while let Some(next) = slow.stream.next().await {
            match next {
                Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .expect("closed in time");
    assert!(matches!(code, Some(1013) | None), "{code:?}");
    // Nothing is lost: a poll from the start has all 60.
    let mut count = 0;
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let path = match &cursor {
            Some(c) => format!("/api/events/poll?limit=1000&lastEventId={c}"),
            None => "/api/events/poll?limit=1000".to_owned(),
        };
        let (_, page) = ts.get(&path, Some(&bob), &[]).await;
        let n = page["events"].as_array().unwrap().len();
        count += n;
        cursor = page["nextEventId"].as_str().map(str::to_owned);
        if n == 0 || page["hasMore"] == false {
            break;
        }
    }
    assert_eq!(count, 60);
    assert_eq!(cursor.as_deref(), Some(last.as_str()));
}

#[tokio::test]
async fn a_silent_user_goes_offline_for_the_others() {
    let ts = TestServer::start(|c| {
        c.ping_interval_ms = 100;
        c.ping_timeout_ms = 300;
    })
    .await;
    let alice = ts.token("t1", "alice", &[]);
    let bob = ts.token("t1", "bob", &[]);
    let mut a = ts.ws(&alice).await;
    a.call("join_room", json!({"roomId": "team"}), "j").await;
    let mut b = ts.ws(&bob).await;
    b.call("join_room", json!({"roomId": "team"}), "j").await;
    let p = a.expect("presence").await;
    assert_eq!(p["data"]["status"], "online");
    // Bob stops reading (so stops answering pings); alice keeps reading.
    let mut offline = None;
    for _ in 0..30 {
        match a.read(Duration::from_millis(100)).await {
            Read::Frame(f) if f["event"] == "presence" => {
                offline = Some(f);
                break;
            }
            _ => {}
        }
    }
    let offline = offline.expect("bob's offline presence");
    assert_eq!(offline["data"]["userId"], "bob");
    assert_eq!(offline["data"]["status"], "offline");
    drop(b);
}

#[tokio::test]
async fn odd_frames_are_refused_and_never_hurt_the_server() {
    let ts = TestServer::start(|_| {}).await;
    let token = ts.token("t1", "alice", &[]);
    let mut ws = ts.ws(&token).await;
    let long = "r".repeat(300);
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let frames = [
        "null".to_owned(),
        "\"text\"".to_owned(),
        "{}".to_owned(),
        r#"{"event": null}"#.to_owned(),
        r#"{"event": "message", "data": []}"#.to_owned(),
        r#"{"event": "message", "data": {"type": 5, "payload": 1, "roomId": "r"}}"#.to_owned(),
        r#"{"event": "ping", "ref": 17}"#.to_owned(),
        r#"{"event": "join_room", "data": {"roomId": "a", "tenantId": 5}}"#.to_owned(),
        format!(r#"{{"event": "join_room", "data": {{"roomId": "{long}"}}}}"#),
        format!(
            r#"{{"event": "message", "data": {{"type": "t", "payload": 1, "recipientId": "{long}"}}}}"#
        ),
        format!(
            r#"{{"event": "message", "data": {{"type": "t", "payload": {deep}, "recipientId": "b"}}}}"#
        ),
        "{\"event\": \"ping\"} trailing".to_owned(),
        "\u{feff}{\"event\": \"ping\"}".to_owned(),
    ];
    for frame in frames {
        ws.send_raw(Message::Text(frame.clone().into())).await;
        let error = ws.expect("error").await;
        assert_eq!(
            error["data"]["code"], "INVALID_REQUEST",
            "{frame:.80}: {error}"
        );
    }
    ws.assert_usable().await;
    let (status, health) = ts.get("/health", None, &[]).await;
    assert_eq!((status, health["status"].as_str()), (200, Some("healthy")));
    // Over HTTP too.
    let long_id = message(Some(&long), None, "x");
    let (status, error) = ts.post("/api/messages", Some(&token), long_id, &[]).await;
    assert_eq!(
        (status, error["details"]["path"].as_str()),
        (400, Some("recipientId"))
    );
    let (status, _) = ts
        .ws_raw(Some(&token), &format!("clientId={long}"), &[])
        .await
        .err()
        .expect("400");
    assert_eq!(status, 400);
}
