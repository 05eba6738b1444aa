//! The live directory: who is connected, who is in which room, and who is present.
//!
//! Per tenant it keeps every user that has a connection or a room membership: the
//! user's rooms (a cache of the `room_members` table, loaded at start and updated after
//! each committed join or leave), their open connections (each a bounded queue of
//! pre-encoded frames) and their presence. Fan-out encodes a frame once and queues the
//! same bytes on every target connection; a connection whose queue is full is closed
//! (it catches up with `resume`), so one slow client never holds up the others.
//!
//! Tenants never mix: every lookup starts from the tenant, so equal user or room ids in
//! two tenants are unrelated.
//!
//! **Several instances.** Memberships are the same on every instance (the feed applies
//! every instance's changes). Connections are each instance's own; a user's presence on
//! another instance is kept beside (`remote`, per instance, from the cluster channel),
//! so that a user is online while connected anywhere, and each instance tells only its
//! own connections: every user hears of a change once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use webwaka_realtime::protocol::{
    JsonObject, PresenceInfo, PresenceStatus, ServerEvent, Timestamp,
};

use crate::metrics::Metrics;

/// One frame queued for a connection: its text and, for durable deliveries, its
/// sequence (so that a connection never sends the same event twice).
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) seq: Option<u64>,
    pub(crate) text: Utf8Bytes,
}

impl Delivery {
    /// A frame for `event`, durable when `seq` is set.
    pub(crate) fn new(event: &ServerEvent, seq: Option<u64>) -> Arc<Self> {
        Self::text(event.encode(None), seq)
    }

    /// A frame already encoded, durable when `seq` is set.
    pub(crate) fn text(text: String, seq: Option<u64>) -> Arc<Self> {
        Arc::new(Self {
            seq,
            text: Utf8Bytes::from(text),
        })
    }
}

/// The sending side of a connection's queue.
pub(crate) type Outbox = mpsc::Sender<Arc<Delivery>>;

/// Who a delivery goes to: the members of `room`, the listed `users`, or the whole
/// tenant. A user in both the room and the list gets it once.
#[derive(Debug, Clone, Default)]
pub(crate) struct Audience {
    /// Every connection of the tenant.
    pub(crate) everyone: bool,
    /// The room whose members receive it.
    pub(crate) room: Option<String>,
    /// Users who receive it (besides the room's members).
    pub(crate) users: Vec<String>,
}

impl Audience {
    /// These users.
    pub(crate) fn users(users: Vec<String>) -> Self {
        Self {
            users,
            ..Self::default()
        }
    }
}

struct Conn {
    id: u64,
    /// What carries it: `ws` or `socket.io`.
    transport: &'static str,
    /// When it was registered (ms since the epoch), and the client's id: for the
    /// dashboard (about 60 bytes a connection).
    since_ms: i64,
    client_id: Box<str>,
    outbox: Outbox,
    kill: CancellationToken,
    /// When the connection's token was issued (seconds; `None`: not said).
    iat: Option<i64>,
    /// Why `kill` was cancelled.
    reason: KillReason,
}

/// Why the hub closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum KillReason {
    /// Its delivery queue overflowed (close 1013, it resumes from its cursor).
    #[default]
    SlowConsumer,
    /// The chaos layer dropped it: no close frame, as if the network failed.
    Dropped,
    /// The chaos layer expired its token (close 1008 `AUTH_EXPIRED`).
    AuthExpired,
}

#[derive(Debug, Clone, PartialEq)]
struct Presence {
    status: PresenceStatus,
    last_active: Timestamp,
    metadata: Option<JsonObject>,
}

impl Presence {
    fn info(&self, tenant: &str, user: &str) -> PresenceInfo {
        PresenceInfo {
            user_id: user.to_owned(),
            tenant_id: tenant.to_owned(),
            status: self.status,
            last_active: self.last_active,
            metadata: self.metadata.clone(),
        }
    }

    fn of(info: &PresenceInfo) -> Self {
        Self {
            status: info.status,
            last_active: info.last_active,
            metadata: info.metadata.clone(),
        }
    }
}

#[derive(Default)]
struct User {
    rooms: HashSet<String>,
    conns: Vec<Conn>,
    /// The presence set by this instance's connections (while it has some).
    presence: Option<Presence>,
    /// The presence each other instance reports (while the user is connected there).
    remote: HashMap<String, Presence>,
    /// Hashes of the ids of the user's latest live (`CLASS_A`) messages, to drop
    /// resends (comparing 64 hashes is much cheaper than 64 strings; a false match
    /// needs a 64-bit collision between two of one user's last 64 ids).
    /// Behind its own lock, so that checking a live message takes only the directory's
    /// read lock (a write lock per live message held every other reader up).
    recent_live: std::sync::Mutex<VecDeque<u64>>,
}

impl User {
    /// Connected here or on another instance.
    fn online(&self) -> bool {
        !self.conns.is_empty() || !self.remote.is_empty()
    }

    /// The presence others see: the latest set anywhere.
    fn current(&self) -> Option<&Presence> {
        let here = self.presence.as_ref().filter(|_| !self.conns.is_empty());
        here.into_iter()
            .chain(self.remote.values())
            .max_by_key(|p| p.last_active)
    }

    /// Nothing left to keep.
    fn idle(&self) -> bool {
        self.rooms.is_empty() && self.conns.is_empty() && self.remote.is_empty()
    }
}

/// Live message ids remembered per user.
const RECENT_LIVE: usize = 64;

#[derive(Default)]
struct Tenant {
    users: HashMap<String, User>,
    rooms: HashMap<String, HashSet<String>>,
}

/// The directory of live connections, rooms and presence.
pub(crate) struct Hub {
    tenants: RwLock<HashMap<String, Tenant>>,
    next_conn: AtomicU64,
    metrics: Arc<Metrics>,
    /// Keys of the live-id hashes (random per server).
    id_hasher: std::collections::hash_map::RandomState,
}

/// A connection's registration: its id and its queue's receiving side.
pub(crate) struct Registration {
    pub(crate) conn_id: u64,
    pub(crate) inbox: mpsc::Receiver<Arc<Delivery>>,
    pub(crate) kill: CancellationToken,
    /// True when this is the user's first connection on this instance.
    pub(crate) first_here: bool,
    /// True when the user had no connection on any instance (just came online).
    pub(crate) first_anywhere: bool,
}

/// What closing a connection meant for its user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unregistered {
    /// It was the user's last connection on this instance.
    pub(crate) last_here: bool,
    /// The user has no connection left on any instance (went offline).
    pub(crate) last_anywhere: bool,
}

impl Hub {
    /// An empty directory.
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            tenants: RwLock::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            metrics,
            id_hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Tenant>> {
        self.tenants.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, Tenant>> {
        self.tenants.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection of `user` (token issued at `iat`, client `client_id`)
    /// over `transport` (`ws`, `socket.io`) with a queue of `capacity` frames.
    pub(crate) fn register(
        &self,
        tenant: &str,
        user: &str,
        iat: Option<i64>,
        capacity: usize,
        transport: &'static str,
        client_id: &str,
    ) -> Registration {
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (outbox, inbox) = mpsc::channel(capacity.max(1));
        let kill = CancellationToken::new();
        let mut tenants = self.write();
        let u = tenants
            .entry(tenant.to_owned())
            .or_default()
            .users
            .entry(user.to_owned())
            .or_default();
        let first_here = u.conns.is_empty();
        let first_anywhere = !u.online();
        u.conns.push(Conn {
            id: conn_id,
            transport,
            since_ms: crate::time::now_ms(),
            client_id: client_id.into(),
            outbox,
            kill: kill.clone(),
            iat,
            reason: KillReason::SlowConsumer,
        });
        if first_here {
            u.presence = Some(Presence {
                status: PresenceStatus::Online,
                last_active: chrono::Utc::now(),
                metadata: None,
            });
        }
        Registration {
            conn_id,
            inbox,
            kill,
            first_here,
            first_anywhere,
        }
    }

    /// How many connections this instance holds, by transport (`ws`, `socket.io`).
    pub(crate) fn connections_by_transport(
        &self,
    ) -> std::collections::BTreeMap<&'static str, usize> {
        let tenants = self.read();
        let mut out = std::collections::BTreeMap::new();
        for t in tenants.values() {
            for u in t.users.values() {
                for conn in &u.conns {
                    *out.entry(conn.transport).or_insert(0) += 1;
                }
            }
        }
        out
    }

    /// The connections of `tenant` (every tenant: `None`) for the dashboard: this
    /// instance's, and the users other instances report connected there.
    pub(crate) fn connections(&self, tenant: Option<&str>) -> Vec<ConnectionView> {
        let tenants = self.read();
        let mut out = Vec::new();
        for (name, t) in tenants.iter() {
            if tenant.is_some_and(|wanted| wanted != name) {
                continue;
            }
            for (user, u) in &t.users {
                for conn in &u.conns {
                    out.push(ConnectionView::local(name, user, conn));
                }
                for (instance, presence) in &u.remote {
                    out.push(ConnectionView {
                        tenant: name.clone(),
                        user: user.clone(),
                        conn_id: None,
                        client_id: None,
                        transport: "remote",
                        since_ms: Some(presence.last_active.timestamp_millis()),
                        instance: Some(instance.clone()),
                    });
                }
            }
        }
        out
    }

    /// At most `limit` of this instance's own connections (any tenant), for the other
    /// instances' dashboards.
    pub(crate) fn local_connections(&self, limit: usize) -> Vec<ConnectionView> {
        let tenants = self.read();
        let mut out = Vec::new();
        for (name, t) in tenants.iter() {
            for (user, u) in &t.users {
                for conn in &u.conns {
                    if out.len() >= limit {
                        return out;
                    }
                    out.push(ConnectionView::local(name, user, conn));
                }
            }
        }
        out
    }

    /// The rooms of `tenant` (every tenant: `None`), each with its members and their
    /// presence (`None`: offline).
    pub(crate) fn rooms(&self, tenant: Option<&str>) -> Vec<RoomView> {
        let tenants = self.read();
        let mut out = Vec::new();
        for (name, t) in tenants.iter() {
            if tenant.is_some_and(|wanted| wanted != name) {
                continue;
            }
            for (room, members) in &t.rooms {
                let mut members: Vec<(String, Option<PresenceInfo>)> = members
                    .iter()
                    .map(|m| {
                        let presence = t.users.get(m).and_then(User::current);
                        (m.clone(), presence.map(|p| p.info(name, m)))
                    })
                    .collect();
                members.sort_by(|a, b| a.0.cmp(&b.0));
                out.push(RoomView {
                    tenant: name.clone(),
                    room: room.clone(),
                    members,
                });
            }
        }
        out.sort_by(|a, b| (&a.tenant, &a.room).cmp(&(&b.tenant, &b.room)));
        out
    }

    /// The users `audience` reaches (at most `max`): each with their connections here
    /// and whether another instance reports them connected.
    pub(crate) fn audience_status(
        &self,
        tenant: &str,
        audience: &Audience,
        max: usize,
    ) -> Vec<(String, usize, bool)> {
        let tenants = self.read();
        let Some(t) = tenants.get(tenant) else {
            return audience
                .users
                .iter()
                .take(max)
                .map(|u| (u.clone(), 0, false))
                .collect();
        };
        let mut users: Vec<&String> = Vec::new();
        if audience.everyone {
            users.extend(t.users.iter().filter(|(_, u)| u.online()).map(|(n, _)| n));
        } else {
            if let Some(members) = audience.room.as_ref().and_then(|r| t.rooms.get(r)) {
                users.extend(members.iter());
            }
            users.extend(audience.users.iter());
        }
        users.sort();
        users.dedup();
        users
            .into_iter()
            .take(max)
            .map(|name| match t.users.get(name) {
                Some(u) => (name.clone(), u.conns.len(), !u.remote.is_empty()),
                None => (name.clone(), 0, false),
            })
            .collect()
    }

    /// Removes a connection: whether it was the user's last here, and anywhere.
    pub(crate) fn unregister(&self, tenant: &str, user: &str, conn_id: u64) -> Unregistered {
        let none = Unregistered {
            last_here: false,
            last_anywhere: false,
        };
        let mut tenants = self.write();
        let Some(t) = tenants.get_mut(tenant) else {
            return none;
        };
        let Some(u) = t.users.get_mut(user) else {
            return none;
        };
        let before = u.conns.len();
        u.conns.retain(|c| c.id != conn_id);
        let last_here = before > 0 && u.conns.is_empty();
        if !last_here {
            return none;
        }
        u.presence = None;
        let last_anywhere = !u.online();
        if u.idle() {
            t.users.remove(user);
        }
        Unregistered {
            last_here,
            last_anywhere,
        }
    }

    /// Another instance reports `user`'s presence there (`None`: no connection there
    /// any more). Returns what this instance's connections should be told, if anything:
    /// the user came online, changed presence, or went offline everywhere.
    pub(crate) fn remote_presence(
        &self,
        instance: &str,
        tenant: &str,
        user: &str,
        presence: Option<&PresenceInfo>,
    ) -> Option<PresenceInfo> {
        let mut tenants = self.write();
        let t = tenants.entry(tenant.to_owned()).or_default();
        let u = t.users.entry(user.to_owned()).or_default();
        let before = u.current().cloned();
        match presence {
            Some(info) => {
                u.remote.insert(instance.to_owned(), Presence::of(info));
            }
            None => {
                u.remote.remove(instance);
            }
        }
        let after = u.current().cloned();
        if u.idle() {
            t.users.remove(user);
        }
        presence_change(tenant, user, before, after)
    }

    /// Forgets everything another instance reported (it stopped, or went silent).
    /// Returns the users who went offline with it.
    pub(crate) fn forget_instance(&self, instance: &str) -> Vec<PresenceInfo> {
        let mut tenants = self.write();
        let mut gone = Vec::new();
        for (tenant, t) in tenants.iter_mut() {
            t.users.retain(|user, u| {
                if u.remote.remove(instance).is_some() && !u.online() {
                    gone.push(offline(tenant, user));
                }
                !u.idle()
            });
        }
        gone
    }

    /// The users another instance reported as connected there.
    pub(crate) fn remote_users(&self, instance: &str) -> Vec<(String, String)> {
        let tenants = self.read();
        let mut out = Vec::new();
        for (tenant, t) in tenants.iter() {
            for (user, u) in &t.users {
                if u.remote.contains_key(instance) {
                    out.push((tenant.clone(), user.clone()));
                }
            }
        }
        out
    }

    /// The presence of every user connected to this instance (for another instance
    /// that asks).
    pub(crate) fn local_presence(&self) -> Vec<PresenceInfo> {
        let tenants = self.read();
        let mut out = Vec::new();
        for (tenant, t) in tenants.iter() {
            for (user, u) in &t.users {
                if let Some(p) = u.presence.as_ref().filter(|_| !u.conns.is_empty()) {
                    out.push(p.info(tenant, user));
                }
            }
        }
        out
    }

    /// Closes the connections of `target` for `reason` (only those whose token was
    /// issued before `issued_before`, when given). Returns how many.
    pub(crate) fn kill(
        &self,
        target: crate::chaos::Target<'_>,
        reason: KillReason,
        issued_before: Option<i64>,
    ) -> usize {
        use crate::chaos::Target;
        let mut tenants = self.write();
        let mut killed = 0;
        let mut kill_user = |u: &mut User| {
            for conn in &mut u.conns {
                let old = issued_before.is_none_or(|cutoff| conn.iat.is_none_or(|i| i < cutoff));
                if old && !conn.kill.is_cancelled() {
                    conn.reason = reason;
                    conn.kill.cancel();
                    killed += 1;
                }
            }
        };
        match target {
            Target::Everyone => {
                for t in tenants.values_mut() {
                    t.users.values_mut().for_each(&mut kill_user);
                }
            }
            Target::Tenant(tenant) => {
                if let Some(t) = tenants.get_mut(tenant) {
                    t.users.values_mut().for_each(&mut kill_user);
                }
            }
            Target::User { tenant, user } => {
                if let Some(u) = tenants.get_mut(tenant).and_then(|t| t.users.get_mut(user)) {
                    kill_user(u);
                }
            }
        }
        killed
    }

    /// Why connection `conn_id` was closed by the hub.
    pub(crate) fn kill_reason(&self, tenant: &str, user: &str, conn_id: u64) -> KillReason {
        self.read()
            .get(tenant)
            .and_then(|t| t.users.get(user))
            .and_then(|u| u.conns.iter().find(|c| c.id == conn_id))
            .map_or(KillReason::SlowConsumer, |c| c.reason)
    }

    /// True when `user` is a member of `room`.
    pub(crate) fn is_member(&self, tenant: &str, room: &str, user: &str) -> bool {
        self.read()
            .get(tenant)
            .and_then(|t| t.rooms.get(room))
            .is_some_and(|members| members.contains(user))
    }

    /// How many rooms `user` is a member of.
    pub(crate) fn room_count(&self, tenant: &str, user: &str) -> usize {
        self.read()
            .get(tenant)
            .and_then(|t| t.users.get(user))
            .map_or(0, |u| u.rooms.len())
    }

    /// The rooms `user` is a member of, copied (`None`: none), so that a caller can
    /// scan with them without holding the directory's lock.
    pub(crate) fn rooms_of(&self, tenant: &str, user: &str) -> Option<HashSet<String>> {
        self.read()
            .get(tenant)
            .and_then(|t| t.users.get(user))
            .filter(|u| !u.rooms.is_empty())
            .map(|u| u.rooms.clone())
    }

    /// Users sharing at least one room with `user` (not `user`).
    pub(crate) fn sharing_users(&self, tenant: &str, user: &str) -> HashSet<String> {
        let tenants = self.read();
        let Some(t) = tenants.get(tenant) else {
            return HashSet::new();
        };
        sharing(t, user)
    }

    /// Records that `user` joined `room`.
    pub(crate) fn add_member(&self, tenant: &str, room: &str, user: &str) {
        let mut tenants = self.write();
        add_member(tenants.entry(tenant.to_owned()).or_default(), room, user);
    }

    /// Records that `user` joined `room` and, when the user is online (here or on
    /// another instance), tells this instance's connections of the members who shared
    /// no room with them before (`before`: who did, taken before the join).
    pub(crate) fn join_announcing(
        &self,
        tenant: &str,
        room: &str,
        user: &str,
        before: &HashSet<String>,
    ) {
        self.add_member(tenant, room, user);
        let (me, newly) = {
            let tenants = self.read();
            let Some(t) = tenants.get(tenant) else {
                return;
            };
            let Some(me) = t
                .users
                .get(user)
                .and_then(|u| u.current())
                .map(|p| p.info(tenant, user))
            else {
                return;
            };
            let newly: HashSet<String> = t
                .rooms
                .get(room)
                .into_iter()
                .flatten()
                .filter(|m| m.as_str() != user && !before.contains(*m))
                .filter(|m| t.users.get(*m).is_some_and(|u| !u.conns.is_empty()))
                .cloned()
                .collect();
            (me, newly)
        };
        if !newly.is_empty() {
            self.announce(&me, Some(&newly));
        }
    }

    /// Records that `user` left `room`.
    pub(crate) fn remove_member(&self, tenant: &str, room: &str, user: &str) {
        let mut tenants = self.write();
        if let Some(t) = tenants.get_mut(tenant) {
            remove_member(t, room, user);
        }
    }

    /// Makes the memberships known here exactly `all` (after a listener missed the
    /// other instances' changes for a while).
    pub(crate) fn sync_memberships(&self, all: Vec<crate::store::Membership>) {
        // tenant → user → rooms
        let mut want: HashMap<String, HashMap<String, HashSet<String>>> = HashMap::new();
        for m in all {
            want.entry(m.tenant)
                .or_default()
                .entry(m.user)
                .or_default()
                .insert(m.room);
        }
        let mut tenants = self.write();
        for (tenant, t) in tenants.iter_mut() {
            let wanted = want.get(tenant);
            let mut gone = Vec::new();
            for (user, u) in &t.users {
                for room in &u.rooms {
                    let kept = wanted
                        .and_then(|w| w.get(user))
                        .is_some_and(|rooms| rooms.contains(room));
                    if !kept {
                        gone.push((user.clone(), room.clone()));
                    }
                }
            }
            for (user, room) in gone {
                remove_member(t, &room, &user);
            }
        }
        for (tenant, users) in want {
            let t = tenants.entry(tenant).or_default();
            for (user, rooms) in users {
                for room in rooms {
                    add_member(t, &room, &user);
                }
            }
        }
    }

    /// True when `user` sent live message `message_id` lately (a resend, not to be
    /// delivered again); otherwise remembers it. Bounded per user.
    pub(crate) fn live_resend(&self, tenant: &str, user: &str, message_id: &str) -> bool {
        use std::hash::BuildHasher;
        let hash = self.id_hasher.hash_one(message_id);
        let tenants = self.read();
        let Some(u) = tenants.get(tenant).and_then(|t| t.users.get(user)) else {
            return false;
        };
        let mut recent = u.recent_live.lock().unwrap_or_else(|p| p.into_inner());
        if recent.contains(&hash) {
            return true;
        }
        if recent.len() >= RECENT_LIVE {
            recent.pop_front();
        }
        recent.push_back(hash);
        false
    }

    /// Queues `delivery` on every connection of `audience`, except `exclude`. Returns
    /// how many connections it was queued on.
    pub(crate) fn deliver(
        &self,
        tenant: &str,
        audience: &Audience,
        delivery: &Arc<Delivery>,
        exclude: Option<u64>,
    ) -> u64 {
        let tenants = self.read();
        let Some(t) = tenants.get(tenant) else {
            return 0;
        };
        let mut sent = 0;
        let mut send_user = |u: &User| {
            for conn in &u.conns {
                if Some(conn.id) == exclude {
                    continue;
                }
                match conn.outbox.try_send(Arc::clone(delivery)) {
                    Ok(()) => sent += 1,
                    // Too slow (or closing): close it; it will resume from its cursor.
                    Err(_) => conn.kill.cancel(),
                }
            }
        };
        if audience.everyone {
            t.users.values().for_each(&mut send_user);
        } else {
            let members = audience.room.as_ref().and_then(|room| t.rooms.get(room));
            if let Some(members) = members {
                for member in members {
                    if let Some(u) = t.users.get(member) {
                        send_user(u);
                    }
                }
            }
            // A user listed twice gets it once. The list is one or two users for a
            // message, but every user sharing a room for a presence announcement: a
            // set then, not a scan of the list so far (quadratic in a big room).
            let mut seen: HashSet<&str> = HashSet::new();
            let short = audience.users.len() <= 8;
            for (i, user) in audience.users.iter().enumerate() {
                let in_room = members.is_some_and(|m| m.contains(user));
                let repeated = if short {
                    audience.users[..i].contains(user)
                } else {
                    !seen.insert(user)
                };
                if !in_room
                    && !repeated
                    && let Some(u) = t.users.get(user)
                {
                    send_user(u);
                }
            }
        }
        self.metrics.messages_out.inc_by(sent);
        sent
    }

    /// Sets `user`'s presence and returns it (`None` when the user has no connection).
    pub(crate) fn set_presence(
        &self,
        tenant: &str,
        user: &str,
        status: PresenceStatus,
        metadata: Option<JsonObject>,
    ) -> Option<PresenceInfo> {
        let mut tenants = self.write();
        let u = tenants.get_mut(tenant)?.users.get_mut(user)?;
        if u.conns.is_empty() {
            return None;
        }
        // Never earlier than what another instance reported: the latest set wins.
        let now = u
            .remote
            .values()
            .map(|p| p.last_active)
            .max()
            .map_or_else(chrono::Utc::now, |latest| latest.max(chrono::Utc::now()));
        u.presence = Some(Presence {
            status,
            last_active: now,
            metadata: metadata.clone(),
        });
        Some(PresenceInfo {
            user_id: user.to_owned(),
            tenant_id: tenant.to_owned(),
            status,
            last_active: now,
            metadata,
        })
    }

    /// Sends `info` (about `info.user_id`) to the users sharing a room with that user,
    /// or to `only` when given; never to the user's own connections.
    pub(crate) fn announce(&self, info: &PresenceInfo, only: Option<&HashSet<String>>) {
        let tenant = info.tenant_id.as_str();
        let targets: Vec<String> = match only {
            Some(users) => users.iter().cloned().collect(),
            None => self
                .sharing_users(tenant, &info.user_id)
                .into_iter()
                .collect(),
        };
        let targets: Vec<String> = targets.into_iter().filter(|u| *u != info.user_id).collect();
        if targets.is_empty() {
            return;
        }
        let delivery = Delivery::new(&ServerEvent::Presence(info.clone()), None);
        self.deliver(tenant, &Audience::users(targets), &delivery, None);
    }

    /// The presence of the online members of `room`, except `except`.
    pub(crate) fn room_presence(
        &self,
        tenant: &str,
        room: &str,
        except: &str,
    ) -> Vec<PresenceInfo> {
        let tenants = self.read();
        let Some(t) = tenants.get(tenant) else {
            return Vec::new();
        };
        let Some(members) = t.rooms.get(room) else {
            return Vec::new();
        };
        members
            .iter()
            .filter(|m| m.as_str() != except)
            .filter_map(|m| Some(t.users.get(m)?.current()?.info(tenant, m)))
            .collect()
    }
}

/// A connection as the dashboard shows it.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionView {
    pub(crate) tenant: String,
    pub(crate) user: String,
    /// This instance's connection id (`None`: on another instance).
    pub(crate) conn_id: Option<u64>,
    pub(crate) client_id: Option<String>,
    /// `ws`, `socket.io`, or `remote` (another instance's).
    pub(crate) transport: &'static str,
    /// Since when (another instance's: its user's last presence change).
    pub(crate) since_ms: Option<i64>,
    /// The other instance holding it.
    pub(crate) instance: Option<String>,
}

impl ConnectionView {
    /// One of this instance's own connections.
    fn local(tenant: &str, user: &str, conn: &Conn) -> Self {
        Self {
            tenant: tenant.to_owned(),
            user: user.to_owned(),
            conn_id: Some(conn.id),
            client_id: Some(conn.client_id.to_string()),
            transport: conn.transport,
            since_ms: Some(conn.since_ms),
            instance: None,
        }
    }
}

/// A room as the dashboard shows it.
#[derive(Debug, Clone)]
pub(crate) struct RoomView {
    pub(crate) tenant: String,
    pub(crate) room: String,
    pub(crate) members: Vec<(String, Option<PresenceInfo>)>,
}

/// An offline announcement.
fn offline(tenant: &str, user: &str) -> PresenceInfo {
    PresenceInfo {
        user_id: user.to_owned(),
        tenant_id: tenant.to_owned(),
        status: PresenceStatus::Offline,
        last_active: chrono::Utc::now(),
        metadata: None,
    }
}

/// What to announce when a user's visible presence went from `before` to `after`.
fn presence_change(
    tenant: &str,
    user: &str,
    before: Option<Presence>,
    after: Option<Presence>,
) -> Option<PresenceInfo> {
    match (before, after) {
        (None, None) => None,
        (Some(_), None) => Some(offline(tenant, user)),
        (None, Some(p)) => Some(p.info(tenant, user)),
        (Some(b), Some(a)) => {
            (b.status != a.status || b.metadata != a.metadata).then(|| a.info(tenant, user))
        }
    }
}

fn add_member(t: &mut Tenant, room: &str, user: &str) {
    t.rooms
        .entry(room.to_owned())
        .or_default()
        .insert(user.to_owned());
    t.users
        .entry(user.to_owned())
        .or_default()
        .rooms
        .insert(room.to_owned());
}

fn remove_member(t: &mut Tenant, room: &str, user: &str) {
    if let Some(members) = t.rooms.get_mut(room) {
        members.remove(user);
        if members.is_empty() {
            t.rooms.remove(room);
        }
    }
    if let Some(u) = t.users.get_mut(user) {
        u.rooms.remove(room);
        if u.idle() {
            t.users.remove(user);
        }
    }
}

fn sharing(t: &Tenant, user: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    if let Some(u) = t.users.get(user) {
        for room in &u.rooms {
            if let Some(members) = t.rooms.get(room) {
                out.extend(members.iter().filter(|m| *m != user).cloned());
            }
        }
    }
    out
}
