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
//!
//! With several instances, a dashboard on one of them asks the others for their
//! connections (`ClusterNotice::Watching`, every other second while it is open). Each
//! instance asked captures as if a dashboard of its own were open, for
//! [`REMOTE_WATCH_MS`] after the last request, and answers with its connections and
//! their last frames ([`RemoteConnection`]); the page shows those in place of the bare
//! presence it knows of the other instance's users.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
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
/// How long a request from another instance's dashboard keeps this one capturing, ms.
pub(crate) const REMOTE_WATCH_MS: i64 = 10_000;
/// How long another instance's list of connections is shown after it came, ms.
const REMOTE_FRESH_MS: i64 = 5_000;
/// Chart samples kept for a page that opens (one every [`CHART_SAMPLE_EVERY`]: five
/// minutes).
const CHART_SAMPLES: usize = 60;
/// How often the charts' totals are sampled, whether or not a page is open (a timer,
/// not work per message).
pub(crate) const CHART_SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// Connections an instance lists for the other instances' dashboards.
pub(crate) const REMOTE_ROWS_MAX: usize = 200;
/// Longest frame text in such a list (a notice holds at most 8,000 bytes).
const REMOTE_TEXT_MAX: usize = 160;

/// One connection of another instance, as its dashboards see it (short field names:
/// it travels in cluster notices).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RemoteConnection {
    /// Tenant.
    pub(crate) t: String,
    /// User.
    pub(crate) u: String,
    /// The client's id.
    pub(crate) c: String,
    /// Transport (`ws`, `socket.io`).
    pub(crate) x: String,
    /// Connected since, ms.
    pub(crate) s: i64,
    /// The last frame in, (ms, text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) i: Option<(i64, String)>,
    /// The last frame out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) o: Option<(i64, String)>,
}

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
    /// Every tenant's totals together (the every-tenant view).
    all: Totals,
    /// The same per tenant (a tenant's page sees its own only).
    tenants: HashMap<Box<str>, Totals>,
}

/// What one tenant did while watched.
#[derive(Debug, Default, Clone, PartialEq)]
struct Totals {
    messages: u64,
    polls: u64,
    errors: BTreeMap<&'static str, u64>,
}

/// Tenants whose totals are kept while watched.
const TENANTS_MAX: usize = 10_000;

impl Captured {
    /// Counts with `count` in every tenant's totals and in `tenant`'s when known (none
    /// kept past [`TENANTS_MAX`] tenants).
    fn count(&mut self, tenant: Option<&str>, count: impl Fn(&mut Totals)) {
        count(&mut self.all);
        if let Some(tenant) = tenant
            && (self.tenants.contains_key(tenant) || self.tenants.len() < TENANTS_MAX)
        {
            count(self.tenants.entry(tenant.into()).or_default());
        }
    }
}

/// The dashboards' view of the server's live facts.
pub(crate) struct Watch {
    watchers: AtomicUsize,
    tx: broadcast::Sender<Arc<Item>>,
    captured: Mutex<Captured>,
    /// Until when (ms) another instance's dashboard watches; 0: none.
    remote_until: AtomicI64,
    /// The other instances' connections: instance → (when received, ms; the list).
    remote: Mutex<HashMap<String, (i64, Vec<RemoteConnection>)>>,
    /// The charts' last minutes, oldest first, for a page that opens.
    samples: Mutex<std::collections::VecDeque<ChartSample>>,
}

/// The charts' totals at one moment (`/metrics` counters, kept whether or not a page
/// is open).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct ChartSample {
    /// When, ms.
    pub(crate) at: i64,
    /// Open WebSockets.
    pub(crate) connections: i64,
    /// Messages accepted so far (every transport).
    pub(crate) messages: u64,
    /// Polls answered so far.
    pub(crate) polls: u64,
    /// Errors answered so far.
    pub(crate) errors: u64,
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
            lock(&self.watch.remote).clear();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
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
            remote_until: AtomicI64::new(0),
            remote: Mutex::new(HashMap::new()),
            samples: Mutex::new(std::collections::VecDeque::with_capacity(CHART_SAMPLES)),
        }
    }

    /// Keeps one more chart sample (the oldest goes past [`CHART_SAMPLES`]).
    pub(crate) fn sample(&self, sample: ChartSample) {
        let mut samples = lock(&self.samples);
        if samples.len() >= CHART_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The chart samples of the last minutes, oldest first.
    pub(crate) fn samples(&self) -> Vec<ChartSample> {
        lock(&self.samples).iter().copied().collect()
    }

    fn captured(&self) -> MutexGuard<'_, Captured> {
        self.captured.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True while a dashboard is open: the only work a hook does otherwise.
    #[inline]
    pub(crate) fn watching(&self) -> bool {
        self.watchers.load(Ordering::Relaxed) > 0
    }

    /// True while connections' frames are kept: a dashboard here, or another
    /// instance's asking for this one's connections. (Another instance's dashboard
    /// needs nothing else from here: the messages, events and polls it shows come to it
    /// through the log and the cluster channel.)
    #[inline]
    pub(crate) fn capturing(&self) -> bool {
        self.watching() || self.watched_from_afar()
    }

    /// True while another instance's dashboard watches (one more atomic load when none
    /// has since the last expiry; the clock is read only while one does).
    #[inline]
    fn watched_from_afar(&self) -> bool {
        let until = self.remote_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if until > now_ms() {
            return true;
        }
        // Expired: back to the single load, and forget what was captured for it.
        if self
            .remote_until
            .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
            && self.watchers.load(Ordering::Acquire) == 0
        {
            *self.captured() = Captured::default();
        }
        false
    }

    /// Another instance's dashboard asked for this instance's connections: capture as
    /// if watched here, for [`REMOTE_WATCH_MS`].
    pub(crate) fn watched_remotely(&self) {
        self.remote_until
            .store(now_ms().saturating_add(REMOTE_WATCH_MS), Ordering::Relaxed);
    }

    /// This instance's connections for the others' dashboards: at most
    /// [`REMOTE_ROWS_MAX`], with their last frames cut short.
    pub(crate) fn local_connections(&self, hub: &Hub) -> Vec<RemoteConnection> {
        let short = |f: &Option<(i64, String)>| {
            f.as_ref().map(|(at, text)| {
                let mut end = text.len().min(REMOTE_TEXT_MAX);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                (*at, text[..end].to_owned())
            })
        };
        let conns = hub.local_connections(REMOTE_ROWS_MAX);
        let captured = self.captured();
        conns
            .into_iter()
            .map(|c| {
                let frames = c.conn_id.and_then(|id| captured.frames.get(&id));
                RemoteConnection {
                    t: c.tenant,
                    u: c.user,
                    c: c.client_id.unwrap_or_default(),
                    x: c.transport.to_owned(),
                    s: c.since_ms.unwrap_or_default(),
                    i: frames.and_then(|f| short(&f.last_in)),
                    o: frames.and_then(|f| short(&f.last_out)),
                }
            })
            .collect()
    }

    /// `instance`'s connections, as it listed them just now.
    pub(crate) fn remote_connections_of(&self, instance: &str, list: Vec<RemoteConnection>) {
        if self.watchers.load(Ordering::Relaxed) == 0 {
            return; // nobody here to show them to
        }
        lock(&self.remote).insert(instance.to_owned(), (now_ms(), list));
    }

    /// The other instances' lists received lately (older ones are dropped).
    pub(crate) fn remote_connections(&self) -> HashMap<String, Vec<RemoteConnection>> {
        let now = now_ms();
        let mut remote = lock(&self.remote);
        remote.retain(|_, (at, _)| now - *at <= REMOTE_FRESH_MS);
        remote
            .iter()
            .map(|(instance, (_, list))| (instance.clone(), list.clone()))
            .collect()
    }

    /// `instance` left the cluster.
    pub(crate) fn forget_remote(&self, instance: &str) {
        lock(&self.remote).remove(instance);
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
        if self.capturing() {
            self.frame(conn, text, true);
        }
    }

    /// A frame sent to connection `conn`.
    pub(crate) fn frame_out(&self, conn: u64, text: &str) {
        if self.capturing() {
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
        if self.capturing() {
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
        let mut captured = self.captured();
        captured.count(Some(tenant), |t| t.polls += 1);
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

    /// An error answered with `code`, to a caller of `tenant` when known (an HTTP
    /// error is counted for every tenant's view only: the answer does not say whose).
    pub(crate) fn error(&self, tenant: Option<&str>, code: &'static str) {
        if self.watching() {
            self.captured()
                .count(tenant, |t| *t.errors.entry(code).or_insert(0) += 1);
        }
    }

    /// Totals while watched, of one tenant or (`None`) of all: messages accepted,
    /// polls answered, errors by code.
    pub(crate) fn totals(&self, tenant: Option<&str>) -> (u64, u64, BTreeMap<&'static str, u64>) {
        let captured = self.captured();
        let totals = match tenant {
            None => Some(&captured.all),
            Some(t) => captured.tenants.get(t),
        };
        totals
            .map(|t| (t.messages, t.polls, t.errors.clone()))
            .unwrap_or_default()
    }

    /// A message of `tenant` accepted (any class).
    pub(crate) fn message_in(&self, tenant: &str) {
        if self.watching() {
            self.captured().count(Some(tenant), |t| t.messages += 1);
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
        let item = EventItem {
            tenant,
            seq: event.seq,
            event_id: &event.event_id,
            body: &event.body,
            at: event.created_ms,
            sender: event.sender.as_deref(),
            room: event.room.as_deref(),
            recipient: event.recipient.as_deref(),
            everyone: audience.everyone,
            recipients: recipients(hub, tenant, audience),
        };
        self.publish(tenant, item.json());
    }
}

/// A committed event as the tail shows it: as it passes (with how each recipient got
/// it), or read back from the log when a page opens.
pub(crate) struct EventItem<'a> {
    pub(crate) tenant: &'a str,
    pub(crate) seq: u64,
    pub(crate) event_id: &'a str,
    /// The stored `Event` JSON.
    pub(crate) body: &'a str,
    pub(crate) at: i64,
    pub(crate) sender: Option<&'a str>,
    pub(crate) room: Option<&'a str>,
    pub(crate) recipient: Option<&'a str>,
    pub(crate) everyone: bool,
    /// `{user, delivery}` of each recipient shown.
    pub(crate) recipients: Vec<serde_json::Value>,
}

impl EventItem<'_> {
    /// The item's JSON, with the event's type and, for a message, its own type read
    /// from the body.
    pub(crate) fn json(self) -> serde_json::Value {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Head<'a> {
            #[serde(default)]
            event_type: String,
            #[serde(default, borrow)]
            payload: Option<&'a serde_json::value::RawValue>,
        }
        /// A message's own type (`chat.message`).
        #[derive(serde::Deserialize)]
        struct PayloadHead {
            #[serde(rename = "type")]
            message_type: String,
        }
        let (event_type, payload) = serde_json::from_str::<Head<'_>>(self.body)
            .map(|h| (h.event_type, h.payload))
            .unwrap_or_default();
        // Only a message's payload is the message (other events' are the publisher's).
        let message_type = payload
            .filter(|_| event_type == webwaka_realtime::protocol::event::MESSAGE_EVENT_TYPE)
            .and_then(|p| serde_json::from_str::<PayloadHead>(p.get()).ok())
            .map(|p| p.message_type);
        json!({
            "kind": "event",
            "tenant": self.tenant,
            "seq": self.seq,
            "eventId": self.event_id,
            "type": event_type,
            "messageType": message_type,
            "at": self.at,
            "sender": self.sender,
            "room": self.room,
            "recipient": self.recipient,
            "everyone": self.everyone,
            "recipients": self.recipients,
            "body": cut(self.body),
        })
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
        watch.error(Some("t"), "AUTH_FAILED");
        watch.message_in("t");
        assert!(watch.frames().is_empty());
        assert_eq!(watch.totals(None), (0, 0, BTreeMap::new()));
        assert_eq!(watch.totals(Some("t")), (0, 0, BTreeMap::new()));
        let watcher = watch.subscribe();
        watch.frame_in(1, "hello");
        watch.frame_in(1, r#"{"event":"ping","data":null}"#);
        watch.frame_out(1, &"x".repeat(5000));
        watch.polled("t", "u");
        watch.error(Some("t"), "AUTH_FAILED");
        watch.error(None, "AUTH_FAILED");
        watch.message_in("t");
        watch.message_in("other");
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
        // Every tenant's view counts everything; a tenant's, its own only.
        let (messages, polls, errors) = watch.totals(None);
        assert_eq!(
            (messages, polls, errors.get("AUTH_FAILED")),
            (2, 1, Some(&2))
        );
        let (messages, polls, errors) = watch.totals(Some("t"));
        assert_eq!(
            (messages, polls, errors.get("AUTH_FAILED")),
            (1, 1, Some(&1))
        );
        assert_eq!(watch.totals(Some("nobody")), (0, 0, BTreeMap::new()));
        drop(watcher);
        assert!(!watch.watching());
        assert!(watch.frames().is_empty());
        assert!(watch.last_polls().is_empty());
    }
}
