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

struct Presence {
    status: PresenceStatus,
    last_active: Timestamp,
    metadata: Option<JsonObject>,
}

#[derive(Default)]
struct User {
    rooms: HashSet<String>,
    conns: Vec<Conn>,
    presence: Option<Presence>,
    /// Hashes of the ids of the user's latest live (`CLASS_A`) messages, to drop
    /// resends (comparing 64 hashes is much cheaper than 64 strings; a false match
    /// needs a 64-bit collision between two of one user's last 64 ids).
    /// Behind its own lock, so that checking a live message takes only the directory's
    /// read lock (a write lock per live message held every other reader up).
    recent_live: std::sync::Mutex<VecDeque<u64>>,
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
    /// True when this is the user's first connection (the user just came online).
    pub(crate) first: bool,
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

    /// Loads stored memberships (at start).
    pub(crate) fn load_memberships(&self, rows: Vec<(String, String, String)>) {
        let mut tenants = self.write();
        for (tenant, user, room) in rows {
            let t = tenants.entry(tenant).or_default();
            t.rooms
                .entry(room.clone())
                .or_default()
                .insert(user.clone());
            t.users.entry(user).or_default().rooms.insert(room);
        }
    }

    /// Registers a new connection of `user` (token issued at `iat`) with a queue of
    /// `capacity` frames.
    pub(crate) fn register(
        &self,
        tenant: &str,
        user: &str,
        iat: Option<i64>,
        capacity: usize,
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
        let first = u.conns.is_empty();
        u.conns.push(Conn {
            id: conn_id,
            outbox,
            kill: kill.clone(),
            iat,
            reason: KillReason::SlowConsumer,
        });
        if first {
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
            first,
        }
    }

    /// Removes a connection; true when it was the user's last (the user went offline).
    pub(crate) fn unregister(&self, tenant: &str, user: &str, conn_id: u64) -> bool {
        let mut tenants = self.write();
        let Some(t) = tenants.get_mut(tenant) else {
            return false;
        };
        let Some(u) = t.users.get_mut(user) else {
            return false;
        };
        let before = u.conns.len();
        u.conns.retain(|c| c.id != conn_id);
        let last = before > 0 && u.conns.is_empty();
        if last {
            u.presence = None;
            if u.rooms.is_empty() {
                t.users.remove(user);
            }
        }
        last
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
        let t = tenants.entry(tenant.to_owned()).or_default();
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

    /// Records that `user` left `room`.
    pub(crate) fn remove_member(&self, tenant: &str, room: &str, user: &str) {
        let mut tenants = self.write();
        let Some(t) = tenants.get_mut(tenant) else {
            return;
        };
        if let Some(members) = t.rooms.get_mut(room) {
            members.remove(user);
            if members.is_empty() {
                t.rooms.remove(room);
            }
        }
        if let Some(u) = t.users.get_mut(user) {
            u.rooms.remove(room);
            if u.rooms.is_empty() && u.conns.is_empty() {
                t.users.remove(user);
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
        let now = chrono::Utc::now();
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
            .filter_map(|m| {
                let u = t.users.get(m)?;
                let p = u.presence.as_ref()?;
                if u.conns.is_empty() {
                    return None;
                }
                Some(PresenceInfo {
                    user_id: m.clone(),
                    tenant_id: tenant.to_owned(),
                    status: p.status,
                    last_active: p.last_active,
                    metadata: p.metadata.clone(),
                })
            })
            .collect()
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
