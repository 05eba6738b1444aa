//! What server instances sharing one PostgreSQL database tell each other besides the
//! log: room membership changes, presence, live (`CLASS_A`) messages, the chaos
//! layer's switches and kicks, and that they are alive. With SQLite there is one
//! instance and [`Node`] sends nothing.
//!
//! Notices travel on the database's `NOTIFY` channel (`webwaka_cluster`), in commit
//! order, to every instance listening; each ignores its own. They are live facts, not
//! stored: one sent while the database is down is lost, so every instance (re)joining
//! says `hello` and sends its whole presence (`snapshot`), and every other instance
//! answers with its own. An instance not heard from for [`DEAD_AFTER`] (it was
//! killed) is forgotten: its users go offline.
//!
//! **Per instance, by decision:** WebSocket connections and their slots
//! (`WS_MAX_CONNECTIONS` per instance), rate limits (one budget per instance), the
//! log's tail in memory (each instance's own, filled by its feed). **Shared:** every
//! stored fact, memberships (through the feed), presence (through these notices).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use webwaka_realtime::protocol::PresenceInfo;

use crate::chaos::{Chaos, ChaosSettings, Target};
use crate::dashboard::RemoteConnection;
use crate::hub::{Audience, Delivery, Hub, KillReason};

/// How often an instance says it is alive.
pub(crate) const ALIVE_EVERY: Duration = Duration::from_secs(2);
/// Silence after which an instance counts as gone.
pub(crate) const DEAD_AFTER: Duration = Duration::from_secs(7);
/// The largest notice PostgreSQL carries (8,000 bytes), with room to spare.
pub(crate) const MAX_NOTICE: usize = 7_900;

/// A notice on the cluster channel. `i` is always the sending instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub(crate) enum ClusterNotice {
    /// A room membership began or ended (applied by the feed).
    Member {
        i: String,
        t: String,
        u: String,
        r: String,
        joined: bool,
    },
    /// A user's presence on instance `i` (`p: None`: no connection there any more).
    Presence {
        i: String,
        t: String,
        u: String,
        p: Option<PresenceInfo>,
    },
    /// A part of instance `i`'s whole presence; the last part replaces what was known
    /// of `i`.
    Snapshot {
        i: String,
        /// Which snapshot (parts of one share it).
        s: String,
        last: bool,
        p: Vec<PresenceInfo>,
    },
    /// Instance `i` (re)joined: everyone sends their snapshot.
    Hello { i: String },
    /// Instance `i` is alive.
    Alive { i: String },
    /// Instance `i` stops: forget it.
    Bye { i: String },
    /// A live message to deliver to this instance's connections of its audience.
    Live {
        i: String,
        t: String,
        room: Option<String>,
        users: Vec<String>,
        frame: String,
    },
    /// A change of the chaos layer.
    Chaos { i: String, c: ChaosNotice },
    /// A dashboard on instance `i` is open: everyone sends their connections.
    Watching { i: String },
    /// A part of instance `i`'s connections, for the dashboards; the last part
    /// completes list `s`.
    Connections {
        i: String,
        s: String,
        last: bool,
        c: Vec<RemoteConnection>,
    },
}

/// What changed in the chaos layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "a", rename_all = "snake_case")]
pub(crate) enum ChaosNotice {
    /// New switches.
    Set { settings: ChaosSettings },
    /// Everything off.
    Reset,
    /// Drop these connections.
    Drop {
        tenant: Option<String>,
        user: Option<String>,
    },
    /// Tokens issued before `cutoff` (seconds) are expired.
    Expire { cutoff: i64 },
}

impl ClusterNotice {
    /// The sending instance.
    pub(crate) fn sender(&self) -> &str {
        match self {
            ClusterNotice::Member { i, .. }
            | ClusterNotice::Presence { i, .. }
            | ClusterNotice::Snapshot { i, .. }
            | ClusterNotice::Hello { i }
            | ClusterNotice::Alive { i }
            | ClusterNotice::Bye { i }
            | ClusterNotice::Live { i, .. }
            | ClusterNotice::Chaos { i, .. }
            | ClusterNotice::Watching { i }
            | ClusterNotice::Connections { i, .. } => i,
        }
    }
}

/// This instance in the cluster: what it tells the others, and what it does with
/// what they tell.
pub(crate) struct Node {
    instance: Arc<str>,
    hub: Arc<Hub>,
    chaos: Option<Arc<Chaos>>,
    /// Notices to send (the engine's sender takes them); `None` with one instance.
    out: Option<mpsc::UnboundedSender<String>>,
    /// When each other instance was last heard.
    peers: Mutex<HashMap<String, Instant>>,
    /// Snapshot parts received, per (instance, snapshot).
    parts: Mutex<HashMap<(String, String), Vec<PresenceInfo>>>,
    /// Connection list parts received, per (instance, list).
    connection_parts: Mutex<HashMap<(String, String), Vec<RemoteConnection>>>,
    /// When this instance last asked for the others' connections, and last answered
    /// such a request: however many dashboards are open, at most one of each per
    /// [`CONNECTIONS_EVERY`].
    asked: Mutex<Option<Instant>>,
    answered: Mutex<Option<Instant>>,
    /// The dashboards (other instances' live messages show too, while one is open).
    watch: Arc<crate::dashboard::Watch>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// How often the connection lists for the dashboards are asked for.
const CONNECTIONS_EVERY: Duration = Duration::from_secs(2);

/// True, and notes now, when `last` is unset or at least `every` ago.
fn once_per(last: &Mutex<Option<Instant>>, every: Duration) -> bool {
    let now = Instant::now();
    let mut last = lock(last);
    if last.is_some_and(|at| now.duration_since(at) < every) {
        return false;
    }
    *last = Some(now);
    true
}

impl Node {
    /// This instance; `out` takes the notices to send (none with a single instance).
    pub(crate) fn new(
        instance: Arc<str>,
        hub: Arc<Hub>,
        chaos: Option<Arc<Chaos>>,
        out: Option<mpsc::UnboundedSender<String>>,
        watch: Arc<crate::dashboard::Watch>,
    ) -> Self {
        Self {
            watch,
            instance,
            hub,
            chaos,
            out,
            peers: Mutex::new(HashMap::new()),
            parts: Mutex::new(HashMap::new()),
            connection_parts: Mutex::new(HashMap::new()),
            asked: Mutex::new(None),
            answered: Mutex::new(None),
        }
    }

    /// This instance's name.
    pub(crate) fn instance(&self) -> &str {
        &self.instance
    }

    /// True when other instances may be listening.
    pub(crate) fn clustered(&self) -> bool {
        self.out.is_some()
    }

    fn send(&self, notice: &ClusterNotice) {
        let Some(out) = &self.out else {
            return;
        };
        match serde_json::to_string(notice) {
            Ok(text) if text.len() <= MAX_NOTICE => {
                let _ = out.send(text);
            }
            Ok(text) => {
                tracing::debug!(bytes = text.len(), "a cluster notice is too large to send");
            }
            Err(error) => tracing::warn!(%error, "a cluster notice does not encode"),
        }
    }

    fn me(&self) -> String {
        self.instance.to_string()
    }

    /// `user`'s presence on this instance changed (`None`: no connection here any
    /// more).
    pub(crate) fn presence(&self, tenant: &str, user: &str, info: Option<&PresenceInfo>) {
        self.send(&ClusterNotice::Presence {
            i: self.me(),
            t: tenant.to_owned(),
            u: user.to_owned(),
            p: info.cloned(),
        });
    }

    /// A live message, for the other instances' connections of `audience`. Messages
    /// over a notice's size reach this instance's connections only.
    pub(crate) fn live(&self, tenant: &str, audience: &Audience, frame: &str) {
        self.send(&ClusterNotice::Live {
            i: self.me(),
            t: tenant.to_owned(),
            room: audience.room.clone(),
            users: audience.users.clone(),
            frame: frame.to_owned(),
        });
    }

    /// A change of the chaos layer, for the other instances.
    pub(crate) fn chaos(&self, change: ChaosNotice) {
        self.send(&ClusterNotice::Chaos {
            i: self.me(),
            c: change,
        });
    }

    /// A dashboard here is open: asks the other instances for their connections (at
    /// most once per [`CONNECTIONS_EVERY`], whatever the number of dashboards).
    pub(crate) fn watching(&self) {
        if self.clustered() && once_per(&self.asked, CONNECTIONS_EVERY) {
            self.send(&ClusterNotice::Watching { i: self.me() });
        }
    }

    /// Sends this instance's connections (for the dashboards), in parts that fit a
    /// notice.
    fn send_connections(&self) {
        let all = self.watch.local_connections(&self.hub);
        self.send_in_parts(all, |i, s, last, c| ClusterNotice::Connections {
            i,
            s,
            last,
            c,
        });
    }

    /// Sends `items` as notices made by `notice(instance, list id, last, part)`, each
    /// part small enough for a notice; the last part (possibly empty) says `last`.
    fn send_in_parts<T: Serialize>(
        &self,
        items: Vec<T>,
        notice: impl Fn(String, String, bool, Vec<T>) -> ClusterNotice,
    ) {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut part: Vec<T> = Vec::new();
        let mut size = 0;
        for item in items {
            let cost = serde_json::to_string(&item).map_or(0, |t| t.len() + 1);
            if size + cost > MAX_NOTICE - 200 && !part.is_empty() {
                self.send(&notice(
                    self.me(),
                    id.clone(),
                    false,
                    std::mem::take(&mut part),
                ));
                size = 0;
            }
            size += cost;
            part.push(item);
        }
        self.send(&notice(self.me(), id, true, part));
    }

    /// The listener (re)joined the channel: hello, and this instance's whole presence.
    pub(crate) fn joined(&self) {
        self.send(&ClusterNotice::Hello { i: self.me() });
        self.snapshot();
    }

    /// Sends this instance's whole presence, in parts that fit a notice.
    fn snapshot(&self) {
        let all = self.hub.local_presence();
        self.send_in_parts(all, |i, s, last, p| ClusterNotice::Snapshot {
            i,
            s,
            last,
            p,
        });
    }

    /// Says this instance is alive, and forgets instances silent for too long.
    pub(crate) fn tick(&self) {
        if !self.clustered() {
            return;
        }
        self.send(&ClusterNotice::Alive { i: self.me() });
        let now = Instant::now();
        let dead: Vec<String> = {
            let mut peers = lock(&self.peers);
            let dead = peers
                .iter()
                .filter(|(_, heard)| now.duration_since(**heard) > DEAD_AFTER)
                .map(|(i, _)| i.clone())
                .collect::<Vec<_>>();
            for i in &dead {
                peers.remove(i);
            }
            dead
        };
        for instance in dead {
            tracing::warn!(%instance, "an instance went silent; its users are offline");
            self.forget(&instance);
        }
    }

    /// This instance stops.
    pub(crate) fn bye(&self) {
        self.send(&ClusterNotice::Bye { i: self.me() });
    }

    fn forget(&self, instance: &str) {
        self.watch.forget_remote(instance);
        lock(&self.connection_parts).retain(|(i, _), _| i != instance);
        for info in self.hub.forget_instance(instance) {
            self.hub.announce(&info, None);
        }
    }

    /// A notice from another instance (membership notices go to the feed instead).
    pub(crate) fn receive(&self, notice: ClusterNotice) {
        if notice.sender() == &*self.instance {
            return;
        }
        if !matches!(notice, ClusterNotice::Bye { .. }) {
            lock(&self.peers).insert(notice.sender().to_owned(), Instant::now());
        }
        match notice {
            ClusterNotice::Member { .. } | ClusterNotice::Alive { .. } => {}
            ClusterNotice::Presence { i, t, u, p } => {
                if let Some(info) = self.hub.remote_presence(&i, &t, &u, p.as_ref()) {
                    self.hub.announce(&info, None);
                }
            }
            ClusterNotice::Snapshot { i, s, last, p } => {
                let mut parts = lock(&self.parts);
                parts.entry((i.clone(), s.clone())).or_default().extend(p);
                if !last {
                    return;
                }
                let all = parts.remove(&(i.clone(), s)).unwrap_or_default();
                // Partial snapshots of an instance that started a newer one are stale.
                parts.retain(|(instance, _), _| *instance != i);
                drop(parts);
                self.replace(&i, all);
            }
            ClusterNotice::Hello { .. } => self.snapshot(),
            ClusterNotice::Bye { i } => {
                lock(&self.peers).remove(&i);
                self.forget(&i);
            }
            ClusterNotice::Live {
                t,
                room,
                users,
                frame,
                ..
            } => {
                let audience = Audience {
                    everyone: false,
                    room,
                    users,
                };
                if self.watch.watching() {
                    self.watch.live(&t, &self.hub, &audience, &frame);
                }
                self.hub
                    .deliver(&t, &audience, &Delivery::text(frame, None), None);
            }
            ClusterNotice::Chaos { c, .. } => self.apply_chaos(c),
            ClusterNotice::Watching { .. } => {
                self.watch.watched_remotely();
                // Several instances' dashboards asking: one answer serves them all.
                if once_per(&self.answered, CONNECTIONS_EVERY / 2) {
                    self.send_connections();
                }
            }
            ClusterNotice::Connections { i, s, last, c } => {
                let mut parts = lock(&self.connection_parts);
                parts.entry((i.clone(), s.clone())).or_default().extend(c);
                if !last {
                    return;
                }
                let all = parts.remove(&(i.clone(), s)).unwrap_or_default();
                parts.retain(|(instance, _), _| *instance != i);
                drop(parts);
                self.watch.remote_connections_of(&i, all);
            }
        }
    }

    /// Makes what is known of `instance`'s presence exactly `all`.
    fn replace(&self, instance: &str, all: Vec<PresenceInfo>) {
        let mut now: HashMap<(String, String), PresenceInfo> = all
            .into_iter()
            .map(|p| ((p.tenant_id.clone(), p.user_id.clone()), p))
            .collect();
        for (tenant, user) in self.hub.remote_users(instance) {
            if !now.contains_key(&(tenant.clone(), user.clone()))
                && let Some(info) = self.hub.remote_presence(instance, &tenant, &user, None)
            {
                self.hub.announce(&info, None);
            }
        }
        for ((tenant, user), info) in now.drain() {
            if let Some(info) = self
                .hub
                .remote_presence(instance, &tenant, &user, Some(&info))
            {
                self.hub.announce(&info, None);
            }
        }
    }

    fn apply_chaos(&self, change: ChaosNotice) {
        let Some(chaos) = &self.chaos else {
            return;
        };
        match change {
            ChaosNotice::Set { settings } => {
                if let Err(error) = chaos.set(settings) {
                    tracing::warn!(%error, "another instance's chaos settings are refused");
                }
            }
            ChaosNotice::Reset => chaos.reset(),
            ChaosNotice::Drop { tenant, user } => {
                let target = match (&tenant, &user) {
                    (Some(tenant), Some(user)) => Target::User { tenant, user },
                    (Some(tenant), None) => Target::Tenant(tenant),
                    _ => Target::Everyone,
                };
                self.hub.kill(target, KillReason::Dropped, None);
            }
            ChaosNotice::Expire { cutoff } => {
                chaos.expire_tokens_before(cutoff);
                self.hub
                    .kill(Target::Everyone, KillReason::AuthExpired, Some(cutoff));
            }
        }
    }
}
