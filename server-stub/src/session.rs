//! What every realtime connection does, whatever carries its frames: the checks before
//! a connection is accepted, its registration with the hub (presence on and off), and
//! the handling of each client event (PROTOCOL.md §3).
//!
//! `/ws` (`ws.rs`) and socket.io (`socketio.rs`) differ only in how frames travel and
//! how an answer goes back (a frame with the client's `ref`, or a socket.io event or
//! acknowledgement); tenancy, room policy, rate limits, presence, the audit of
//! cross-tenant attempts and the durable log are these functions, for both.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use webwaka_realtime::protocol::{
    ClientEvent, ErrorCode, Event, Frame, MessageAck, PresenceInfo, PresenceStatus, SendMessage,
    ServerEvent,
};

use crate::app::{App, Slot};
use crate::error::{ApiError, check_id};
use crate::http::extract::{Caller, authenticate, resolve_tenant};
use crate::hub::Registration;
use crate::log;
use crate::messaging::{Accepted, Queued};
use crate::store::Membership;

/// Refused frames within a minute after which a connection is closed.
const MAX_REFUSALS_PER_MINUTE: u32 = 100;
/// Events read per page while replaying.
const REPLAY_PAGE: u32 = 256;

/// What a client presents when it connects, whatever the transport.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Handshake<'a> {
    /// The path, for the audit of a failed authentication.
    pub(crate) path: &'a str,
    /// The `Authorization` header.
    pub(crate) authorization: Option<&'a str>,
    /// A token given otherwise (the `token` query parameter, socket.io's `auth.token`).
    pub(crate) token: Option<&'a str>,
    /// A tenant the request names, and where (`X-Tenant-ID`, `query.tenantId`).
    pub(crate) named_tenant: Option<(&'a str, &'static str)>,
    /// `X-Admin-Justification`.
    pub(crate) justification: Option<&'a str>,
    /// The cursor to resume from.
    pub(crate) last_event_id: Option<&'a str>,
    /// The client's installation id.
    pub(crate) client_id: Option<&'a str>,
}

/// What the checks before accepting a connection established.
pub(crate) struct Admitted {
    pub(crate) caller: Caller,
    pub(crate) client_id: String,
    /// The cursor to resume from, and its sequence.
    pub(crate) cursor: Option<(String, u64)>,
    /// The connection's place among `WS_MAX_CONNECTIONS`.
    pub(crate) slot: Slot,
}

/// The checks before a connection is accepted, in the contract's order: the token
/// (`AUTH_FAILED`), the tenant it names (`TENANT_VIOLATION`, or the super-admin rules),
/// a free slot (`SERVER_FULL`), the cursor (`CURSOR_EXPIRED`), the client id.
pub(crate) async fn admit(app: &Arc<App>, handshake: Handshake<'_>) -> Result<Admitted, ApiError> {
    let identity = authenticate(
        app,
        handshake.authorization,
        handshake.token,
        handshake.path,
    )
    .await?;
    let (named, via) = match handshake.named_tenant {
        Some((named, via)) => (Some(named), via),
        None => (None, webwaka_realtime::protocol::TENANT_HEADER),
    };
    let caller = resolve_tenant(
        app,
        identity,
        named,
        via,
        handshake.justification,
        "websocket",
    )
    .await?;
    let full = || {
        app.metrics.server_full.inc();
        let mut error = ApiError::new(ErrorCode::ServerFull, "the server is full: try again later");
        error.retry_after_secs = Some(1);
        error
    };
    if app.shutdown.is_cancelled() {
        return Err(full());
    }
    // A cursor from socket.io's `auth` bypasses the query's checks: refused by name
    // here, not passed to the database (PostgreSQL refuses a NUL in text).
    check_id("lastEventId", handshake.last_event_id)?;
    let slot = app.take_slot().ok_or_else(full)?;
    let cursor = match handshake
        .last_event_id
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        None => None,
        Some(cursor) => {
            let seq = app.log.find_cursor(&caller.tenant, cursor).await?;
            Some((cursor.to_owned(), seq))
        }
    };
    check_id("clientId", handshake.client_id)?;
    let client_id = handshake
        .client_id
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    Ok(Admitted {
        caller,
        client_id,
        cursor,
        slot,
    })
}

/// One accepted connection's identity: who, where, over what.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub(crate) tenant: String,
    pub(crate) user: String,
    pub(crate) roles: Vec<String>,
    pub(crate) conn_id: u64,
    /// `ws` or `socket.io` (the hub's directory and the metrics name it).
    pub(crate) transport: &'static str,
}

/// Registers an accepted connection with the hub (its queue of deliveries), and
/// announces the user online when this is their first connection.
pub(crate) fn open(
    app: &App,
    caller: &Caller,
    transport: &'static str,
    client_id: &str,
) -> (Peer, Registration) {
    let registration = app.hub.register(
        &caller.tenant,
        caller.user(),
        caller.identity.iat,
        app.config.ws_send_queue,
        transport,
        client_id,
    );
    let peer = Peer {
        tenant: caller.tenant.clone(),
        user: caller.identity.user_id.clone(),
        roles: caller.identity.roles.clone(),
        conn_id: registration.conn_id,
        transport,
    };
    app.metrics.active_connections.inc();
    // Online: told here when the user was connected nowhere before, and to the other
    // instances when this is the user's first connection here.
    if registration.first_here
        && let Some(info) =
            app.hub
                .set_presence(&peer.tenant, &peer.user, PresenceStatus::Online, None)
    {
        if registration.first_anywhere {
            app.hub.announce(&info, None);
        }
        app.node.presence(&peer.tenant, &peer.user, Some(&info));
    }
    (peer, registration)
}

/// Unregisters a closed connection, and announces the user offline when it was their
/// last connection anywhere.
pub(crate) fn close(app: &App, peer: &Peer) {
    app.watch.closed(peer.conn_id);
    let gone = app.hub.unregister(&peer.tenant, &peer.user, peer.conn_id);
    if gone.last_here {
        app.node.presence(&peer.tenant, &peer.user, None);
    }
    if gone.last_anywhere {
        let info = PresenceInfo {
            user_id: peer.user.clone(),
            tenant_id: peer.tenant.clone(),
            status: PresenceStatus::Offline,
            last_active: chrono::Utc::now(),
            metadata: None,
        };
        app.hub.announce(&info, None);
    }
    app.metrics.active_connections.dec();
}

/// The `connected` greeting.
pub(crate) fn connected(app: &App, peer: &Peer, client_id: String) -> ServerEvent {
    let config = &app.config;
    ServerEvent::Connected(webwaka_realtime::protocol::Connected {
        connection_id: format!("conn-{}", peer.conn_id),
        client_id: Some(client_id),
        server_time: chrono::Utc::now(),
        interaction_classes: webwaka_realtime::protocol::InteractionClass::REALTIME.to_vec(),
        ping_interval: config.ping_interval_ms,
        ping_timeout: config.ping_timeout_ms,
    })
}

/// How a client event is answered; the transport sends it its own way.
#[derive(Debug)]
pub(crate) enum Answer {
    /// This answer (`message_ack`, `room_left`, `pong`).
    Reply(ServerEvent),
    /// `room_joined`, then the presence of the room's online members.
    Joined {
        room_id: String,
        present: Vec<PresenceInfo>,
    },
    /// The durable deliveries after this cursor, then `resumed` (see [`Replay`]).
    Replay { cursor: String, after_seq: u64 },
    /// Nothing on `/ws` (`presence_update`); the presence set, for a socket.io
    /// acknowledgement.
    Presence(Option<PresenceInfo>),
    /// Nothing: the chaos layer dropped the acknowledgement of a stored message.
    Dropped,
    /// Refused with this error.
    Refused(ApiError),
}

impl Peer {
    /// Checks the `tenantId` a frame's data names (`TENANT_VIOLATION`, audited) and
    /// types the frame by its event name.
    pub(crate) async fn decode(&self, app: &App, frame: Frame) -> Result<ClientEvent, ApiError> {
        match frame.data.get("tenantId") {
            None | Some(Value::Null) => {}
            Some(Value::String(named)) if *named == self.tenant => {}
            Some(Value::String(named)) => {
                return Err(app
                    .tenant_violation(
                        &self.tenant,
                        &self.user,
                        named,
                        "data.tenantId",
                        &frame.event,
                    )
                    .await);
            }
            Some(_) => return Err(ApiError::invalid("data.tenantId", "must be a string")),
        }
        let event = ClientEvent::from_frame(frame)?;
        // Shape, targets and id lengths (core's checks, fields named `data.…`).
        event.validate()?;
        Ok(event)
    }

    /// Handles a decoded client event.
    pub(crate) async fn handle(&self, app: &App, event: ClientEvent) -> Answer {
        match event {
            ClientEvent::Message(message) => self.send(app, message).await,
            ClientEvent::JoinRoom { room_id } => {
                let membership = self.membership(&room_id);
                match crate::rooms::join(
                    app.store.as_ref(),
                    &app.hub,
                    &app.policy,
                    membership,
                    &self.roles,
                    app.config.max_rooms_per_user,
                )
                .await
                {
                    Err(error) => Answer::Refused(error),
                    Ok(present) => Answer::Joined { room_id, present },
                }
            }
            ClientEvent::LeaveRoom { room_id } => {
                let membership = self.membership(&room_id);
                match crate::rooms::leave(app.store.as_ref(), membership).await {
                    Err(error) => Answer::Refused(error),
                    Ok(()) => Answer::Reply(ServerEvent::RoomLeft { room_id }),
                }
            }
            ClientEvent::PresenceUpdate(update) => {
                let info =
                    app.hub
                        .set_presence(&self.tenant, &self.user, update.status, update.metadata);
                if let Some(info) = &info {
                    app.hub.announce(info, None);
                    app.node.presence(&self.tenant, &self.user, Some(info));
                }
                Answer::Presence(info)
            }
            ClientEvent::Resume { last_event_id } => {
                match app.log.find_cursor(&self.tenant, &last_event_id).await {
                    Err(error) => Answer::Refused(error),
                    Ok(after_seq) => Answer::Replay {
                        cursor: last_event_id,
                        after_seq,
                    },
                }
            }
            ClientEvent::Ping => Answer::Reply(ServerEvent::Pong {
                server_time: chrono::Utc::now(),
            }),
            ClientEvent::Unknown { event, .. } => Answer::Refused(ApiError::invalid(
                "event",
                format!("unknown event {event:?}"),
            )),
        }
    }

    /// A `message`, decoded and checked: the class (`CLASS_D` is never realtime), then
    /// the send (membership, the per-user budget, the log).
    pub(crate) async fn send(&self, app: &App, message: SendMessage) -> Answer {
        match self.submit(app, message).await {
            Sent::Answer(answer) => answer,
            Sent::Queued(mut queued) => acked(app, queued.stored(&app.log.metrics).await),
        }
    }

    /// [`Peer::send`] up to the point where a durable message is queued for the log
    /// (see [`crate::messaging::submit`]); [`acked`] makes the answer once it is stored.
    pub(crate) async fn submit(&self, app: &App, message: SendMessage) -> Sent {
        if !message.interaction_class.realtime_allowed() {
            let error = ApiError::new(
                ErrorCode::RealtimeNotAllowed,
                "CLASS_D is never sent over realtime: use POST /api/transactions",
            )
            .with_detail("path", "data.interactionClass");
            return Sent::Answer(Answer::Refused(error));
        }
        let origin = crate::messaging::Origin {
            tenant: &self.tenant,
            user: &self.user,
            connection: Some(self.conn_id),
            transport: self.transport,
        };
        match crate::messaging::submit(&app.log, &app.node, &app.limits, origin, message).await {
            Ok(Accepted::Acked(ack)) => Sent::Answer(acked(app, Ok(ack))),
            Ok(Accepted::Queued(queued)) => Sent::Queued(queued),
            Err(error) => Sent::Answer(Answer::Refused(error)),
        }
    }

    fn membership(&self, room: &str) -> Membership {
        Membership {
            tenant: self.tenant.clone(),
            user: self.user.clone(),
            room: room.to_owned(),
        }
    }
}

/// What [`Peer::submit`] did with a message.
#[expect(
    clippy::large_enum_variant,
    reason = "short-lived, moved once; an `Answer` is as large wherever it is returned"
)]
pub(crate) enum Sent {
    /// Answered already.
    Answer(Answer),
    /// Queued for the log: [`acked`] answers it once stored.
    Queued(Queued),
}

/// The answer to a sent message, once it was stored (or refused).
pub(crate) fn acked(app: &App, stored: Result<MessageAck, ApiError>) -> Answer {
    match stored {
        // The message itself is not queued for this connection (the fan-out skips it),
        // so the connection's last sequence stays: an event of a lower sequence may
        // still be waiting in its queue.
        // Chaos: stored and delivered, but the sender never hears of it.
        Ok(_) if crate::chaos::drops_ack(app.chaos.as_ref()) => Answer::Dropped,
        Ok(ack) => Answer::Reply(ServerEvent::MessageAck(ack)),
        Err(error) => Answer::Refused(error),
    }
}

/// Counts a connection's refused frames: past [`MAX_REFUSALS_PER_MINUTE`] within a
/// minute, the connection is to be closed.
#[derive(Debug)]
pub(crate) struct Refusals {
    count: u32,
    window: Instant,
}

impl Refusals {
    pub(crate) fn new() -> Self {
        Self {
            count: 0,
            window: Instant::now(),
        }
    }

    /// Counts one refusal; true when the connection must be closed.
    pub(crate) fn refused(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(60) {
            self.window = Instant::now();
            self.count = 0;
        }
        self.count += 1;
        self.count > MAX_REFUSALS_PER_MINUTE
    }
}

/// A replay: the durable deliveries after a cursor that the user may see, up to the
/// log's head when it started, page by page; then `resumed`.
#[derive(Debug)]
pub(crate) struct Replay {
    cursor: String,
    after: u64,
    head: u64,
    replayed: u64,
    last_id: Option<String>,
    done: bool,
}

/// The durable events a connection's client has: a live delivery at or below the
/// greatest is a duplicate (a replay sent it, or the client resumed past it).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Delivered {
    last_seq: u64,
}

impl Delivered {
    /// The client resumes after `after_seq`: it has every event up to it.
    pub(crate) fn resumed_after(&mut self, after_seq: u64) {
        self.last_seq = self.last_seq.max(after_seq);
    }

    /// A replayed event `seq` was sent.
    pub(crate) fn replayed(&mut self, seq: u64) {
        self.last_seq = self.last_seq.max(seq);
    }

    /// True (and noted) when a live delivery of `seq` is new to the client.
    pub(crate) fn live(&mut self, seq: u64) -> bool {
        if seq <= self.last_seq {
            return false;
        }
        self.last_seq = seq;
        true
    }
}

impl Replay {
    /// Starts replaying `peer`'s deliveries after `after_seq` (the sequence of
    /// `cursor`), up to the log's head now.
    pub(crate) async fn start(
        app: &App,
        peer: &Peer,
        cursor: String,
        after_seq: u64,
    ) -> Result<Self, ApiError> {
        let head = app.store.last_seq(&peer.tenant).await?;
        Ok(Self {
            cursor,
            after: after_seq,
            head,
            replayed: 0,
            last_id: None,
            done: after_seq >= head,
        })
    }

    /// The next page of deliveries (sequence and frame), `None` when done.
    pub(crate) async fn next_page(
        &mut self,
        app: &App,
        peer: &Peer,
    ) -> Result<Option<Vec<(u64, ServerEvent)>>, ApiError> {
        if self.done {
            return Ok(None);
        }
        let rows = app
            .log
            .read_after(
                &peer.tenant,
                log::Viewer::User(&peer.user),
                self.after,
                REPLAY_PAGE,
            )
            .await?;
        let full_page = rows.len() == REPLAY_PAGE as usize;
        let mut page = Vec::with_capacity(rows.len());
        for log::Stored { seq, body, .. } in rows {
            if seq > self.head {
                self.done = true;
                break;
            }
            self.after = seq;
            let event: Event = match serde_json::from_str(&body) {
                Ok(event) => event,
                Err(error) => {
                    tracing::error!(%error, seq, "stored event does not decode");
                    continue;
                }
            };
            self.last_id = Some(event.event_id.clone());
            self.replayed += 1;
            page.push((seq, log::frame_for(event)));
        }
        if !full_page || self.after >= self.head {
            self.done = true;
        }
        Ok(Some(page))
    }

    /// `resumed`: the last event replayed (the cursor when none was), and how many.
    pub(crate) fn finish(self, app: &App) -> ServerEvent {
        app.metrics.delivered("resume", self.replayed);
        ServerEvent::Resumed {
            last_event_id: Some(self.last_id.unwrap_or(self.cursor)),
            replayed: self.replayed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client resuming after 10 on an instance whose feed is behind: events up to 10
    /// reaching the connection live afterwards are not sent again, even when the
    /// replay had nothing to send.
    #[test]
    fn live_deliveries_up_to_the_resume_cursor_are_duplicates() {
        let mut sent = Delivered::default();
        sent.resumed_after(10);
        assert!(!sent.live(7), "before the cursor");
        assert!(!sent.live(10), "the cursor itself");
        assert!(sent.live(11));
        assert!(!sent.live(11), "once");
        // Replayed events count as sent; a later resume from an earlier cursor lowers
        // nothing.
        sent.replayed(15);
        assert!(!sent.live(14));
        sent.resumed_after(5);
        assert!(!sent.live(15));
        assert!(sent.live(16));
    }
}
