//! What the dashboard captures while it is open ([`Watch`]).
//!
//! Every hook on a hot path (a frame in or out, a committed event, a live message, a
//! poll, an error) first loads one atomic, the number of open dashboards, and returns
//! when it is zero: with no dashboard open the server does no extra work per message
//! and keeps nothing more per connection. While one is open, the hooks send a summary
//! to the dashboards' broadcast channel (dropped when nobody is subscribed or a
//! dashboard is too slow: the page is a view, never a queue) and keep the last frame
//! in and out of each connection (heartbeats aside), the time of each user's last poll and the errors by
//! code; all of it is forgotten when the last dashboard closes.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::json;
use tokio::sync::broadcast;

use crate::hub::{Audience, Hub};
use crate::tail::TailEvent;

/// Longest text kept of a frame or an event body.
const TEXT_MAX: usize = 600;
/// Items a slow dashboard may lag behind before it skips some.
const CHANNEL: usize = 1024;
/// Connections whose last frames are kept (bounded whatever the load).
const FRAMES_MAX: usize = 10_000;
/// Users whose last poll time is kept.
const POLLS_MAX: usize = 10_000;

/// One thing that happened, for the dashboards watching its tenant.
#[derive(Debug)]
pub(crate) struct Item {
    /// The tenant it belongs to.
    pub(crate) tenant: Box<str>,
    /// Its JSON, as the page reads it (`{"kind": "event", ...}`).
    pub(crate) json: String,
}

/// The last frames of one connection.
#[derive(Debug, Default, Clone)]
pub(crate) struct Frames {
    pub(crate) last_in: Option<(i64, String)>,
    pub(crate) last_out: Option<(i64, String)>,
}

#[derive(Default)]
struct Captured {
    frames: HashMap<u64, Frames>,
    /// (tenant, user) → when the user last polled, ms.
    polls: HashMap<(Box<str>, Box<str>), i64>,
    /// Errors answered, by code.
    errors: BTreeMap<&'static str, u64>,
}

/// The dashboards' view of the server's live facts.
pub(crate) struct Watch {
    watchers: AtomicUsize,
    tx: broadcast::Sender<Arc<Item>>,
    captured: Mutex<Captured>,
    /// Messages accepted while watched.
    messages: AtomicU64,
    /// Polls answered while watched.
    polls: AtomicU64,
}

/// A dashboard's registration: counts as watching until dropped.
pub(crate) struct Watcher {
    watch: Arc<Watch>,
    pub(crate) items: broadcast::Receiver<Arc<Item>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if self.watch.watchers.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last one closed: forget what was captured for it.
            *self.watch.captured() = Captured::default();
        }
    }
}

fn now_ms() -> i64 {
    crate::time::now_ms()
}

/// `text` cut to [`TEXT_MAX`] bytes (at a character boundary).
fn cut(text: &str) -> String {
    if text.len() <= TEXT_MAX {
        return text.to_owned();
    }
    let mut end = TEXT_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

impl Watch {
    /// Nobody watching yet.
    pub(crate) fn new() -> Self {
        let (tx, _) = broadcast::channel(CHANNEL);
        Self {
            watchers: AtomicUsize::new(0),
            tx,
            captured: Mutex::new(Captured::default()),
            messages: AtomicU64::new(0),
            polls: AtomicU64::new(0),
        }
    }

    fn captured(&self) -> MutexGuard<'_, Captured> {
        self.captured.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True while a dashboard is open: the only work a hook does otherwise.
    #[inline]
    pub(crate) fn watching(&self) -> bool {
        self.watchers.load(Ordering::Relaxed) > 0
    }

    /// Registers a dashboard.
    pub(crate) fn subscribe(self: &Arc<Self>) -> Watcher {
        let items = self.tx.subscribe();
        self.watchers.fetch_add(1, Ordering::AcqRel);
        Watcher {
            watch: Arc::clone(self),
            items,
        }
    }

    fn publish(&self, tenant: &str, json: serde_json::Value) {
        // No receiver (the last dashboard just closed): nothing to do.
        let _ = self.tx.send(Arc::new(Item {
            tenant: tenant.into(),
            json: json.to_string(),
        }));
    }

    /// A frame received by connection `conn`.
    pub(crate) fn frame_in(&self, conn: u64, text: &str) {
        if self.watching() {
            self.frame(conn, text, true);
        }
    }

    /// A frame sent to connection `conn`.
    pub(crate) fn frame_out(&self, conn: u64, text: &str) {
        if self.watching() {
            self.frame(conn, text, false);
        }
    }

    fn frame(&self, conn: u64, text: &str, incoming: bool) {
        // Heartbeats would hide the frame worth seeing (one every ping interval).
        if text.starts_with(r#"{"event":"ping""#) || text.starts_with(r#"{"event":"pong""#) {
            return;
        }
        let entry = (now_ms(), cut(text));
        let mut captured = self.captured();
        if captured.frames.len() >= FRAMES_MAX && !captured.frames.contains_key(&conn) {
            return;
        }
        let frames = captured.frames.entry(conn).or_default();
        if incoming {
            frames.last_in = Some(entry);
        } else {
            frames.last_out = Some(entry);
        }
    }

    /// Connection `conn` closed.
    pub(crate) fn closed(&self, conn: u64) {
        if self.watching() {
            self.captured().frames.remove(&conn);
        }
    }

    /// The last frames of every connection seen while watched.
    pub(crate) fn frames(&self) -> HashMap<u64, Frames> {
        self.captured().frames.clone()
    }

    /// `user` of `tenant` polled.
    pub(crate) fn polled(&self, tenant: &str, user: &str) {
        if !self.watching() {
            return;
        }
        self.polls.fetch_add(1, Ordering::Relaxed);
        let mut captured = self.captured();
        if captured.polls.len() < POLLS_MAX {
            captured
                .polls
                .insert((tenant.into(), user.into()), now_ms());
        }
    }

    /// When each user last polled (while watched): ((tenant, user), ms).
    pub(crate) fn last_polls(&self) -> Vec<((String, String), i64)> {
        self.captured()
            .polls
            .iter()
            .map(|((t, u), at)| ((t.to_string(), u.to_string()), *at))
            .collect()
    }

    /// An error answered with `code`.
    pub(crate) fn error(&self, code: &'static str) {
        if self.watching() {
            *self.captured().errors.entry(code).or_insert(0) += 1;
        }
    }

    /// Totals while watched: messages accepted, polls answered, errors by code.
    pub(crate) fn totals(&self) -> (u64, u64, BTreeMap<&'static str, u64>) {
        (
            self.messages.load(Ordering::Relaxed),
            self.polls.load(Ordering::Relaxed),
            self.captured().errors.clone(),
        )
    }

    /// A message accepted (any class).
    pub(crate) fn message_in(&self) {
        if self.watching() {
            self.messages.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A live (`CLASS_A`) message passing, never stored.
    pub(crate) fn live(&self, tenant: &str, hub: &Hub, audience: &Audience, frame: &str) {
        if !self.watching() {
            return;
        }
        self.publish(
            tenant,
            json!({
                "kind": "live",
                "tenant": tenant,
                "at": now_ms(),
                "room": audience.room,
                "recipients": recipients(hub, tenant, audience),
                "frame": cut(frame),
            }),
        );
    }

    /// A committed event delivered by the feed: its recipients, and whether each got
    /// it live (a connection here or on another instance) or waits for a poll.
    pub(crate) fn event(&self, tenant: &str, hub: &Hub, event: &TailEvent, audience: &Audience) {
        if !self.watching() {
            return;
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Head {
            #[serde(default)]
            event_type: String,
        }
        let event_type = serde_json::from_str::<Head>(&event.body)
            .map(|h| h.event_type)
            .unwrap_or_default();
        self.publish(
            tenant,
            json!({
                "kind": "event",
                "tenant": tenant,
                "seq": event.seq,
                "eventId": &*event.event_id,
                "type": event_type,
                "at": event.created_ms,
                "sender": event.sender.as_deref(),
                "room": event.room.as_deref(),
                "recipient": event.recipient.as_deref(),
                "everyone": audience.everyone,
                "recipients": recipients(hub, tenant, audience),
                "body": cut(&event.body),
            }),
        );
    }
}

/// The audience's users (at most 50) and how each gets it.
fn recipients(hub: &Hub, tenant: &str, audience: &Audience) -> Vec<serde_json::Value> {
    hub.audience_status(tenant, audience, 50)
        .into_iter()
        .map(|(user, here, remote)| {
            let delivery = if here > 0 {
                "live"
            } else if remote {
                "live (other instance)"
            } else {
                "awaiting poll"
            };
            json!({"user": user, "delivery": delivery, "connections": here})
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_captured_unless_watched_and_all_is_forgotten_after() {
        let watch = Arc::new(Watch::new());
        watch.frame_in(1, "hello");
        watch.polled("t", "u");
        watch.error("AUTH_FAILED");
        watch.message_in();
        assert!(watch.frames().is_empty());
        assert_eq!(watch.totals(), (0, 0, BTreeMap::new()));
        let watcher = watch.subscribe();
        watch.frame_in(1, "hello");
        watch.frame_in(1, r#"{"event":"ping","data":null}"#);
        watch.frame_out(1, &"x".repeat(5000));
        watch.polled("t", "u");
        watch.error("AUTH_FAILED");
        let frames = watch.frames();
        assert_eq!(
            frames[&1].last_in.as_ref().map(|f| f.1.as_str()),
            Some("hello")
        );
        assert!(
            frames[&1]
                .last_out
                .as_ref()
                .is_some_and(|f| f.1.len() < 700)
        );
        assert_eq!(watch.last_polls().len(), 1);
        assert_eq!(watch.totals().2.get("AUTH_FAILED"), Some(&1));
        drop(watcher);
        assert!(!watch.watching());
        assert!(watch.frames().is_empty());
        assert!(watch.last_polls().is_empty());
    }
}
