//! The WebSocket endpoint (PROTOCOL.md §3): checks before the upgrade, then one task
//! per connection.
//!
//! Before upgrading: the token (`AUTH_FAILED` 401), the tenant named in `X-Tenant-ID`
//! (`TENANT_VIOLATION`, or super-admin rules), a free slot (`SERVER_FULL` 503 with
//! `Retry-After`), and the `lastEventId` cursor (`CURSOR_EXPIRED` 410).
//!
//! After: one task owns the socket and waits on everything at once: frames from the
//! client, deliveries queued by the hub, the ping timer, the token's expiry, and the
//! server's shutdown. Buffers are sized on purpose (a small read buffer, a small write
//! buffer) so that an idle connection costs little memory.
//!
//! Writes are batched: answers and deliveries are buffered, and after each wake-up the
//! task also handles whatever else is ready at once (queued deliveries, frames already
//! received), then writes it all with one flush. Under load that is one write system
//! call for many frames; one frame alone is written at once, as before.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use futures_util::{FutureExt, SinkExt};
use serde_json::Value;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument;
use webwaka_realtime::protocol::envelope::{AUTH_EXPIRED_CLOSE_REASON, close_code};
use webwaka_realtime::protocol::{
    ADMIN_JUSTIFICATION_HEADER, ClientEvent, Connected, ErrorCode, Frame, InteractionClass,
    PresenceInfo, PresenceStatus, SendMessage, ServerEvent, TENANT_HEADER,
};

use crate::app::{App, Slot};
use crate::error::{ApiError, check_id_len};
use crate::http::extract::{Caller, QueryMap, authenticate, header_str, resolve_tenant};
use crate::hub::KillReason;
use crate::log;

/// Refused frames within a minute after which a connection is closed (1008).
const MAX_REFUSALS_PER_MINUTE: u32 = 100;
/// How long a closing connection waits for the client's close frame.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(1);
/// Events read per page while replaying.
const REPLAY_PAGE: u32 = 256;
/// Most queued deliveries and ready frames handled after one wake-up before the
/// buffered output is flushed (and the other branches get a turn).
const MAX_BATCH: usize = 64;

/// `GET {WS_PATH}`: the checks, then the upgrade.
pub(crate) async fn handler(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    query: QueryMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // The chaos layer may play a proxy that lets only plain HTTP through.
    if app.chaos.as_ref().is_some_and(|c| c.refuses_websocket()) {
        let mut error = ApiError::new(
            ErrorCode::ServerFull,
            "chaos: WebSocket upgrades are refused (use polling)",
        )
        .with_detail("chaos", "REFUSE_WEBSOCKET");
        error.retry_after_secs = Some(1);
        return error.into_response();
    }
    match prepare(&app, &headers, &query).await {
        Err(error) => error.into_response(),
        Ok(prepared) => match upgrade {
            Err(rejection) => ApiError::invalid("upgrade", rejection.body_text()).into_response(),
            Ok(upgrade) => {
                let config = &app.config;
                let tasks = app.ws_tasks.clone();
                let app = Arc::clone(&app);
                upgrade
                    .read_buffer_size(config.ws_read_buffer_bytes)
                    .write_buffer_size(config.ws_write_buffer_bytes)
                    .max_message_size(config.max_frame_bytes)
                    .max_frame_size(config.max_frame_bytes)
                    .on_upgrade(move |socket| tasks.track_future(run(app, socket, prepared)))
            }
        },
    }
}

/// What the checks before the upgrade established.
struct Prepared {
    caller: Caller,
    client_id: String,
    cursor: Option<(String, u64)>,
    slot: Slot,
}

async fn prepare(
    app: &Arc<App>,
    headers: &HeaderMap,
    query: &QueryMap,
) -> Result<Prepared, ApiError> {
    let identity = authenticate(
        app,
        header_str(headers, header::AUTHORIZATION.as_str()),
        query.get("token"),
        &app.config.ws_path,
    )
    .await?;
    let (named, via) = match (header_str(headers, TENANT_HEADER), query.get("tenantId")) {
        (Some(h), _) => (Some(h), TENANT_HEADER),
        (None, Some(q)) => (Some(q), "query.tenantId"),
        (None, None) => (None, TENANT_HEADER),
    };
    let caller = resolve_tenant(
        app,
        identity,
        named,
        via,
        header_str(headers, ADMIN_JUSTIFICATION_HEADER),
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
    let slot = app.take_slot().ok_or_else(full)?;
    let cursor = match query
        .get("lastEventId")
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        None => None,
        Some(cursor) => {
            let cutoff = log::retention_cutoff(app.config.event_bus_retention_period_ms);
            let seq = log::find_cursor(app, &caller.tenant, cursor, cutoff)?;
            Some((cursor.to_owned(), seq))
        }
    };
    check_id_len("clientId", query.get("clientId"))?;
    let client_id = query
        .get("clientId")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    Ok(Prepared {
        caller,
        client_id,
        cursor,
        slot,
    })
}

/// What the connection loop should do next.
#[derive(Debug, Clone, Copy)]
enum Flow {
    Continue,
    Close(u16, &'static str),
    /// The socket is gone.
    Stop,
}

/// One connection.
struct Connection {
    app: Arc<App>,
    socket: WebSocket,
    tenant: String,
    user: String,
    roles: Vec<String>,
    conn_id: u64,
    /// Greatest durable sequence sent on this connection.
    last_seq: u64,
    refusals: u32,
    refusal_window: Instant,
    last_heard: Instant,
}

async fn run(app: Arc<App>, socket: WebSocket, prepared: Prepared) {
    let Prepared {
        caller,
        client_id,
        cursor,
        slot,
    } = prepared;
    let registration = app.hub.register(
        &caller.tenant,
        caller.user(),
        caller.identity.iat,
        app.config.ws_send_queue,
    );
    let span = tracing::info_span!(
        "ws",
        conn = registration.conn_id,
        tenant = %caller.tenant,
        user = %caller.identity.user_id,
    );
    let mut conn = Connection {
        tenant: caller.tenant.clone(),
        user: caller.identity.user_id.clone(),
        roles: caller.identity.roles.clone(),
        conn_id: registration.conn_id,
        app,
        socket,
        last_seq: 0,
        refusals: 0,
        refusal_window: Instant::now(),
        last_heard: Instant::now(),
    };
    let exp = caller.identity.exp;
    async move {
        conn.app.metrics.active_connections.inc();
        tracing::debug!(client_id = %client_id, "connected");
        if registration.first
            && let Some(info) =
                conn.app
                    .hub
                    .set_presence(&conn.tenant, &conn.user, PresenceStatus::Online, None)
        {
            conn.app.hub.announce(&info, None);
        }
        let flow = conn
            .serve(
                registration.inbox,
                registration.kill,
                client_id,
                cursor,
                exp,
            )
            .await;
        if let Flow::Close(code, reason) = flow {
            let sent = conn
                .socket
                .send(Message::Close(Some(CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(reason),
                })))
                .await;
            // Let the client answer the close (a clean handshake), briefly: dropping
            // the socket with unread data would reset it and could lose our frame.
            if sent.is_ok() {
                let _ = tokio::time::timeout(CLOSE_HANDSHAKE, async {
                    while let Some(Ok(message)) = conn.socket.recv().await {
                        if matches!(message, Message::Close(_)) {
                            break;
                        }
                    }
                })
                .await;
            }
        }
        let last = conn
            .app
            .hub
            .unregister(&conn.tenant, &conn.user, conn.conn_id);
        if last {
            let info = PresenceInfo {
                user_id: conn.user.clone(),
                tenant_id: conn.tenant.clone(),
                status: PresenceStatus::Offline,
                last_active: chrono::Utc::now(),
                metadata: None,
            };
            conn.app.hub.announce(&info, None);
        }
        conn.app.metrics.active_connections.dec();
        tracing::debug!(reason = flow_name(&flow), "disconnected");
        drop(slot);
    }
    .instrument(span)
    .await;
}

fn flow_name(flow: &Flow) -> &'static str {
    match flow {
        Flow::Continue => "continue",
        Flow::Close(_, reason) => reason,
        Flow::Stop => "socket closed",
    }
}

impl Connection {
    async fn serve(
        &mut self,
        mut inbox: tokio::sync::mpsc::Receiver<Arc<crate::hub::Delivery>>,
        kill: tokio_util::sync::CancellationToken,
        client_id: String,
        cursor: Option<(String, u64)>,
        exp: i64,
    ) -> Flow {
        let app = Arc::clone(&self.app);
        let config = &app.config;
        let ping_interval = config.ping_interval();
        let ping_timeout = config.ping_timeout();
        let connected = ServerEvent::Connected(Connected {
            connection_id: format!("conn-{}", self.conn_id),
            client_id: Some(client_id),
            server_time: chrono::Utc::now(),
            interaction_classes: InteractionClass::REALTIME.to_vec(),
            ping_interval: config.ping_interval_ms,
            ping_timeout: config.ping_timeout_ms,
        });
        if let f @ (Flow::Stop | Flow::Close(..)) = self.send(&connected, None).await {
            return f;
        }
        if let Some((cursor, seq)) = cursor {
            match Box::pin(self.replay(&cursor, seq, None)).await {
                Flow::Continue => {}
                other => return other,
            }
        }
        // The token's end (with the leeway it was accepted with).
        let leeway = i64::try_from(config.jwt_leeway_ms / 1000).unwrap_or(0);
        let remaining = (exp + leeway - chrono::Utc::now().timestamp()).max(0);
        let expiry = tokio::time::sleep(Duration::from_secs(remaining.unsigned_abs()));
        tokio::pin!(expiry);
        let mut ticker = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Made once: a cancellation future registers itself (under a lock) when first
        // polled, which is worth doing once per connection, not once per frame.
        let shutdown = self.app.shutdown.clone();
        let shutdown = shutdown.cancelled();
        tokio::pin!(shutdown);
        let kill = kill.cancelled();
        tokio::pin!(kill);
        loop {
            // Whatever else is ready now, then one flush of everything buffered.
            match self.drain_ready(&mut inbox).await {
                Flow::Continue => {}
                other => return other,
            }
            let flow = tokio::select! {
                biased;
                () = &mut shutdown => Flow::Close(close_code::GOING_AWAY, "server shutting down"),
                () = &mut kill => match app.hub.kill_reason(&self.tenant, &self.user, self.conn_id) {
                    KillReason::SlowConsumer => Flow::Close(close_code::TRY_AGAIN_LATER, "SLOW_CONSUMER"),
                    // Chaos: gone without a word, as if the network failed.
                    KillReason::Dropped => Flow::Stop,
                    KillReason::AuthExpired => {
                        Flow::Close(close_code::POLICY_VIOLATION, AUTH_EXPIRED_CLOSE_REASON)
                    }
                },
                _ = &mut expiry => Flow::Close(close_code::POLICY_VIOLATION, AUTH_EXPIRED_CLOSE_REASON),
                _ = ticker.tick() => {
                    if self.last_heard.elapsed() >= ping_timeout {
                        Flow::Close(close_code::NORMAL, "PING_TIMEOUT")
                    } else if self.socket.send(Message::Ping(Default::default())).await.is_err() {
                        Flow::Stop
                    } else {
                        Flow::Continue
                    }
                }
                delivery = inbox.recv() => match delivery {
                    None => Flow::Stop,
                    Some(delivery) => self.deliver(&delivery).await,
                },
                frame = self.socket.recv() => match frame {
                    None => Flow::Stop,
                    Some(Err(error)) => read_error(error),
                    Some(Ok(message)) => {
                        self.last_heard = Instant::now();
                        // Boxed: frame handling needs a large future, and keeping it
                        // out of this loop keeps every idle connection's task small.
                        Box::pin(self.on_message(message)).await
                    }
                },
            };
            match flow {
                Flow::Continue => {}
                other => return other,
            }
        }
    }

    /// Handles what is ready without waiting: queued deliveries and frames already
    /// received (at most [`MAX_BATCH`] of each round), then flushes the buffered output
    /// with one write.
    async fn drain_ready(
        &mut self,
        inbox: &mut tokio::sync::mpsc::Receiver<Arc<crate::hub::Delivery>>,
    ) -> Flow {
        for _ in 0..MAX_BATCH {
            let mut progressed = false;
            for _ in 0..MAX_BATCH {
                let Ok(delivery) = inbox.try_recv() else {
                    break;
                };
                progressed = true;
                if let f @ (Flow::Stop | Flow::Close(..)) = self.deliver(&delivery).await {
                    return f;
                }
            }
            // A frame already received (or already in the read buffer); `recv` is
            // cancel-safe, so giving up on a pending one loses nothing.
            if let Some(frame) = self.socket.recv().now_or_never() {
                progressed = true;
                let flow = match frame {
                    None => Flow::Stop,
                    Some(Err(error)) => read_error(error),
                    Some(Ok(message)) => {
                        self.last_heard = Instant::now();
                        Box::pin(self.on_message(message)).await
                    }
                };
                if let f @ (Flow::Stop | Flow::Close(..)) = flow {
                    return f;
                }
            }
            if !progressed {
                break;
            }
        }
        match self.socket.flush().await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop,
        }
    }

    /// Buffers a queued delivery, unless this connection already sent that event.
    async fn deliver(&mut self, delivery: &crate::hub::Delivery) -> Flow {
        if let Some(seq) = delivery.seq {
            if seq <= self.last_seq {
                return Flow::Continue;
            }
            self.last_seq = seq;
        }
        self.feed(Message::Text(delivery.text.clone())).await
    }

    /// Buffers `event` (written at the next flush, or sooner when the buffer is full).
    async fn send(&mut self, event: &ServerEvent, reference: Option<&str>) -> Flow {
        let text = event.encode(reference);
        self.feed(Message::Text(Utf8Bytes::from(text))).await
    }

    async fn feed(&mut self, message: Message) -> Flow {
        match self.socket.feed(message).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop,
        }
    }

    /// Answers a refused frame with an `error` (the connection stays open, unless the
    /// client keeps sending refused frames).
    async fn refuse(&mut self, error: ApiError, reference: Option<&str>) -> Flow {
        let mut body = error.body;
        if let Some(r) = reference {
            body = body.with_ref(r);
        }
        if let f @ Flow::Stop = self.send(&ServerEvent::Error(body), reference).await {
            return f;
        }
        if self.refusal_window.elapsed() >= Duration::from_secs(60) {
            self.refusal_window = Instant::now();
            self.refusals = 0;
        }
        self.refusals += 1;
        if self.refusals > MAX_REFUSALS_PER_MINUTE {
            return Flow::Close(close_code::POLICY_VIOLATION, "TOO_MANY_VIOLATIONS");
        }
        Flow::Continue
    }

    async fn on_message(&mut self, message: Message) -> Flow {
        if let Some(chaos) = &self.app.chaos
            && matches!(message, Message::Text(_) | Message::Binary(_))
        {
            chaos.wait().await;
        }
        match message {
            Message::Text(text) => self.on_text(text.as_str()).await,
            Message::Binary(_) => {
                self.refuse(
                    ApiError::invalid(
                        "input",
                        "binary frames are not accepted: send JSON text frames",
                    ),
                    None,
                )
                .await
            }
            Message::Ping(_) | Message::Pong(_) => Flow::Continue,
            Message::Close(_) => Flow::Stop,
        }
    }

    async fn on_text(&mut self, text: &str) -> Flow {
        // Most frames are messages: read those in one pass into their typed value. Any
        // frame that pass does not take exactly as the general path would (including
        // every bad one) is decoded below instead.
        if let Some(frame) = crate::wsframe::decode_message(text, &self.tenant) {
            let event = ClientEvent::Message(frame.message);
            let r = frame.reference.as_deref();
            // Shape, targets and id lengths (core's checks, fields named `data.…`).
            if let Err(error) = event.validate() {
                return self.refuse(error.into(), r).await;
            }
            if let ClientEvent::Message(message) = event {
                return self.on_send(message, r).await;
            }
        }
        let frame = match Frame::decode(text) {
            Ok(frame) => frame,
            Err(error) => return self.refuse(error.into(), None).await,
        };
        let reference = frame.reference.clone();
        let r = reference.as_deref();
        match frame.data.get("tenantId") {
            None | Some(Value::Null) => {}
            Some(Value::String(named)) if *named == self.tenant => {}
            Some(Value::String(named)) => {
                let named = named.clone();
                let resource = frame.event.clone();
                let error = self
                    .app
                    .tenant_violation(&self.tenant, &self.user, &named, "data.tenantId", &resource)
                    .await;
                return self.refuse(error, r).await;
            }
            Some(_) => {
                return self
                    .refuse(ApiError::invalid("data.tenantId", "must be a string"), r)
                    .await;
            }
        }
        let event = match ClientEvent::from_frame(frame) {
            Ok(event) => event,
            Err(error) => return self.refuse(error.into(), r).await,
        };
        // Shape, targets and id lengths (core's checks, fields named `data.…`).
        if let Err(error) = event.validate() {
            return self.refuse(error.into(), r).await;
        }
        match event {
            ClientEvent::Message(message) => self.on_send(message, r).await,
            ClientEvent::JoinRoom { room_id } => {
                let app = Arc::clone(&self.app);
                match crate::rooms::join(&app, &self.tenant, &self.user, &self.roles, &room_id)
                    .await
                {
                    Err(error) => self.refuse(error, r).await,
                    Ok(present) => {
                        if let f @ Flow::Stop =
                            self.send(&ServerEvent::RoomJoined { room_id }, r).await
                        {
                            return f;
                        }
                        for info in present {
                            if let f @ Flow::Stop =
                                self.send(&ServerEvent::Presence(info), None).await
                            {
                                return f;
                            }
                        }
                        Flow::Continue
                    }
                }
            }
            ClientEvent::LeaveRoom { room_id } => {
                let app = Arc::clone(&self.app);
                match crate::rooms::leave(&app, &self.tenant, &self.user, &room_id).await {
                    Err(error) => self.refuse(error, r).await,
                    Ok(()) => self.send(&ServerEvent::RoomLeft { room_id }, r).await,
                }
            }
            ClientEvent::PresenceUpdate(update) => {
                if let Some(info) = self.app.hub.set_presence(
                    &self.tenant,
                    &self.user,
                    update.status,
                    update.metadata,
                ) {
                    self.app.hub.announce(&info, None);
                }
                Flow::Continue
            }
            ClientEvent::Resume { last_event_id } => {
                let cutoff = log::retention_cutoff(self.app.config.event_bus_retention_period_ms);
                match log::find_cursor(&self.app, &self.tenant, &last_event_id, cutoff) {
                    Err(error) => self.refuse(error, r).await,
                    Ok(seq) => self.replay(&last_event_id, seq, r).await,
                }
            }
            ClientEvent::Ping => {
                self.send(
                    &ServerEvent::Pong {
                        server_time: chrono::Utc::now(),
                    },
                    r,
                )
                .await
            }
            ClientEvent::Unknown { event, .. } => {
                let error = ApiError::invalid("event", format!("unknown event {event:?}"));
                self.refuse(error, r).await
            }
        }
    }

    /// A `message` frame, decoded and checked: the class, then the send.
    async fn on_send(&mut self, message: SendMessage, r: Option<&str>) -> Flow {
        if !message.interaction_class.realtime_allowed() {
            let error = ApiError::new(
                ErrorCode::RealtimeNotAllowed,
                "CLASS_D is never sent over realtime: use POST /api/transactions",
            )
            .with_detail("path", "data.interactionClass");
            return self.refuse(error, r).await;
        }
        let app = Arc::clone(&self.app);
        match crate::messaging::send(
            &app,
            &self.tenant,
            &self.user,
            message,
            Some(self.conn_id),
            "ws",
        )
        .await
        {
            // The message itself is not queued for this connection (the
            // fan-out skips it), so `last_seq` stays: an event of a lower
            // sequence may still be waiting in the queue.
            // Chaos: stored and delivered, but the sender never hears of it.
            Ok(_) if crate::chaos::drops_ack(&self.app) => Flow::Continue,
            Ok(ack) => self.send(&ServerEvent::MessageAck(ack), r).await,
            Err(error) => self.refuse(error, r).await,
        }
    }

    /// Sends the durable deliveries after `after_seq` that this user may see, up to the
    /// log's head now, then `resumed`.
    async fn replay(&mut self, cursor: &str, after_seq: u64, reference: Option<&str>) -> Flow {
        let app = Arc::clone(&self.app);
        let cutoff = log::retention_cutoff(app.config.event_bus_retention_period_ms);
        let head = match app.db.read(|conn| Ok(log::last_seq(conn, &self.tenant)?)) {
            Ok(head) => head,
            Err(error) => return self.refuse(error.into(), reference).await,
        };
        let mut after = after_seq;
        let mut replayed = 0u64;
        let mut last_id: Option<String> = None;
        while after < head {
            let rows = match log::read_after(
                &app,
                &self.tenant,
                log::Viewer::User(&self.user),
                after,
                cutoff,
                REPLAY_PAGE,
            ) {
                Ok(rows) => rows,
                Err(error) => return self.refuse(error.into(), reference).await,
            };
            let full_page = rows.len() == REPLAY_PAGE as usize;
            for log::Stored { seq, body, .. } in rows {
                if seq > head {
                    after = head;
                    break;
                }
                after = seq;
                let event: webwaka_realtime::protocol::Event = match serde_json::from_str(&body) {
                    Ok(event) => event,
                    Err(error) => {
                        tracing::error!(%error, seq, "stored event does not decode");
                        continue;
                    }
                };
                last_id = Some(event.event_id.clone());
                replayed += 1;
                self.last_seq = self.last_seq.max(seq);
                if let f @ Flow::Stop = self.send(&log::frame_for(event), None).await {
                    return f;
                }
            }
            if !full_page {
                break;
            }
        }
        app.metrics.delivered("resume", replayed);
        let resumed = ServerEvent::Resumed {
            last_event_id: Some(last_id.unwrap_or_else(|| cursor.to_owned())),
            replayed,
        };
        self.send(&resumed, reference).await
    }
}

/// What a read error means: a frame over the limit closes with 1009; anything else
/// means the socket is gone.
fn read_error(error: axum::Error) -> Flow {
    use tungstenite::error::{CapacityError, Error as WsError};
    let inner = error.into_inner();
    match inner.downcast_ref::<WsError>() {
        Some(WsError::Capacity(CapacityError::MessageTooLong { .. })) => {
            Flow::Close(close_code::MESSAGE_TOO_BIG, "PAYLOAD_TOO_LARGE")
        }
        _ => Flow::Stop,
    }
}
