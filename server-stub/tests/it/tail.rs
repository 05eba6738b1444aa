//! The log's recent tail in memory answers polls and resumes exactly as SQLite does:
//! the same seeded traffic goes to a server without a tail, one with a tail too small
//! to hold it all (so some cursors fall before it) and one with the default tail, and
//! every page from every cursor of every user must be the same on all three.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::common::{TestServer, Ws, message};

const USERS: usize = 5;
/// The viewer number of a justified super admin (every event of the tenant).
const ROOT: usize = USERS;
const ROOMS: usize = 3;
const OPS: usize = 120;

/// What an event is, independent of the server's ids and clocks.
fn identity(event: &Value) -> Value {
    json!([
        event["sequence"],
        event["eventType"],
        event["payload"]["messageId"],
        event["payload"]["i"],
    ])
}

struct Side {
    ts: TestServer,
}

impl Side {
    async fn start(tail_bytes: usize) -> Self {
        let ts = TestServer::start(|c| {
            c.event_bus_tail_bytes = tail_bytes;
            c.message_rate_limit = 100_000;
            c.poll_rate_limit = 100_000;
            c.publish_rate_limit = 100_000;
        })
        .await;
        Self { ts }
    }

    async fn socket(&self, user: usize) -> Ws {
        self.ts
            .ws(&self.ts.token("t1", &format!("u{user}"), &[]))
            .await
    }

    async fn poll(&self, user: usize, cursor: Option<&str>, limit: usize) -> Value {
        let query = match cursor {
            Some(c) => format!("/api/events/poll?limit={limit}&lastEventId={c}"),
            None => format!("/api/events/poll?limit={limit}"),
        };
        let (status, page) = if user == ROOT {
            let root = self.ts.token("platform", "root", &["super_admin"]);
            let headers = [
                ("X-Tenant-ID", "t1"),
                ("X-Admin-Justification", "tail test"),
            ];
            self.ts.get(&query, Some(&root), &headers).await
        } else {
            let token = self.ts.token("t1", &format!("u{user}"), &[]);
            self.ts.get(&query, Some(&token), &[]).await
        };
        assert_eq!(status, 200, "{page}");
        page
    }

    /// Log pages read (from the tail, from SQLite), from `/metrics`.
    async fn reads(&self) -> (u64, u64) {
        let text = self
            .ts
            .http
            .get(self.ts.url("/metrics"))
            .send()
            .await
            .unwrap();
        let text = text.text().await.unwrap();
        let count = |source: &str| {
            let prefix = format!("webwaka_log_reads_total{{source=\"{source}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {prefix} in {text}"))
        };
        (count("tail"), count("storage"))
    }
}

/// One seeded operation, drawn once and applied to every side.
enum Op {
    Join(usize, String),
    Leave(usize, String),
    Direct(usize, usize),
    ToRoom(usize, String),
    /// Published by a service: to a user, a room, or everyone (never both: refused).
    Publish(Option<usize>, Option<String>),
}

fn draw(rng: &mut StdRng) -> Op {
    let user = rng.random_range(0..USERS);
    let room = format!("r{}", rng.random_range(0..ROOMS));
    match rng.random_range(0..10) {
        0 | 1 => Op::Join(user, room),
        2 => Op::Leave(user, room),
        3..=6 => Op::Direct(user, rng.random_range(0..USERS)),
        7 => Op::ToRoom(user, room),
        _ => match rng.random_range(0..3) {
            0 => Op::Publish(Some(user), None),
            1 => Op::Publish(None, Some(room)),
            _ => Op::Publish(None, None),
        },
    }
}

async fn apply(side: &Side, op: &Op, n: usize) {
    match op {
        Op::Join(user, room) | Op::Leave(user, room) => {
            let event = if matches!(op, Op::Join(..)) {
                "join_room"
            } else {
                "leave_room"
            };
            let mut ws = side.socket(*user).await;
            let answer = ws
                .call(event, json!({"roomId": room}), &format!("r{n}"))
                .await;
            assert_ne!(answer["event"], "error", "{answer}");
            ws.close().await;
        }
        Op::Direct(from, to) => {
            let token = side.ts.token("t1", &format!("u{from}"), &[]);
            let mut body = message(Some(&format!("u{to}")), None, &format!("d{n}"));
            body["messageId"] = json!(format!("m{n}"));
            let (status, answer) = side.ts.post("/api/messages", Some(&token), body, &[]).await;
            assert_eq!(status, 201, "{answer}");
        }
        Op::ToRoom(from, room) => {
            let token = side.ts.token("t1", &format!("u{from}"), &[]);
            let mut body = message(None, Some(room), &format!("r{n}"));
            body["messageId"] = json!(format!("m{n}"));
            // Refused unless a member: the same on every side.
            let _ = side.ts.post("/api/messages", Some(&token), body, &[]).await;
        }
        Op::Publish(user, room) => {
            let service = side.ts.token("t1", "svc", &["service"]);
            let mut body = json!({"eventType": "bus.test", "payload": {"i": n}});
            if let Some(user) = user {
                body["recipientId"] = json!(format!("u{user}"));
            }
            if let Some(room) = room {
                body["roomId"] = json!(room);
            }
            let (status, answer) = side.ts.post("/api/events", Some(&service), body, &[]).await;
            assert_eq!(status, 201, "{answer}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_and_resumes_from_the_tail_equal_polls_from_sqlite() {
    let seed: u64 = std::env::var("WEBWAKA_TAIL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    // SQLite only; a tail of about a dozen events; the default tail.
    let sides = [
        Side::start(0).await,
        Side::start(12 * 700).await,
        Side::start(webwaka_server_stub::config::defaults::EVENT_BUS_TAIL_BYTES).await,
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    for n in 0..OPS {
        let op = draw(&mut rng);
        for side in &sides {
            apply(side, &op, n).await;
        }
    }
    for user in 0..=ROOT {
        // Everything the user may see, from the start of retention, on each side.
        let all: Vec<Vec<Value>> = {
            let mut all = Vec::new();
            for side in &sides {
                let page = side.poll(user, None, 1000).await;
                all.push(page["events"].as_array().unwrap().clone());
            }
            all
        };
        let ids = |events: &[Value]| events.iter().map(identity).collect::<Vec<_>>();
        assert_eq!(ids(&all[0]), ids(&all[1]), "seed {seed}, user u{user}");
        assert_eq!(ids(&all[0]), ids(&all[2]), "seed {seed}, user u{user}");
        assert!(!all[0].is_empty(), "seed {seed}: u{user} saw nothing");
        // From every cursor, pages of 3: the same events, `hasMore` and next cursor.
        for at in 0..all[0].len() {
            let mut pages = Vec::new();
            for (side, events) in sides.iter().zip(&all) {
                let cursor = events[at]["eventId"].as_str().unwrap();
                let page = side.poll(user, Some(cursor), 3).await;
                let next = page["nextEventId"].as_str().unwrap().to_owned();
                let position = events.iter().position(|e| e["eventId"] == next.as_str());
                pages.push((
                    ids(page["events"].as_array().unwrap()),
                    page["hasMore"].clone(),
                    position,
                ));
            }
            assert_eq!(pages[0], pages[1], "seed {seed}, u{user} after #{at}");
            assert_eq!(pages[0], pages[2], "seed {seed}, u{user} after #{at}");
        }
        if user == ROOT {
            continue;
        }
        // A resume over the WebSocket from the middle replays the same events.
        let at = all[0].len() / 2;
        let mut replays = Vec::new();
        for (side, events) in sides.iter().zip(&all) {
            let cursor = events[at]["eventId"].as_str().unwrap();
            let mut ws = side.socket(user).await;
            ws.send(json!({"event": "resume", "data": {"lastEventId": cursor}, "ref": "res"}))
                .await;
            let mut replayed = Vec::new();
            for _ in 0..OPS + 10 {
                let frame = ws.next_frame().await;
                match frame["event"].as_str() {
                    Some("resumed") => break,
                    Some("message" | "event") => replayed.push(frame["data"]["sequence"].clone()),
                    _ => {}
                }
            }
            ws.close().await;
            replays.push(replayed);
        }
        assert_eq!(replays[0], replays[1], "seed {seed}, u{user} resume");
        assert_eq!(replays[0], replays[2], "seed {seed}, u{user} resume");
        assert_eq!(replays[0].len(), all[0].len() - at - 1);
    }
    // Each side read where it should: SQLite only; both (the oldest cursors fell
    // before the small tail); the tail for every cursor (reads from the start of the
    // log too, since it covers the whole log).
    let reads = [
        sides[0].reads().await,
        sides[1].reads().await,
        sides[2].reads().await,
    ];
    assert_eq!(reads[0].0, 0, "{reads:?}");
    assert!(reads[0].1 > 0, "{reads:?}");
    assert!(reads[1].0 > 0 && reads[1].1 > 0, "{reads:?}");
    assert!(reads[2].0 > 0 && reads[2].1 == 0, "{reads:?}");
}
