//! The socket.io v4 endpoint (Engine.IO v4: WebSocket, and HTTP long-polling with its
//! upgrade) at `SOCKETIO_PATH` (default `/socket.io`), beside `/ws`: what web apps and
//! the original's clients (npm `socket.io-client`) connect to, with the original's
//! events and payloads (docs/socketio.md has the mapping).
//!
//! socketioxide speaks the protocol; this module is the glue, and only glue: the checks
//! before a connection is accepted, the handling of every event and the deliveries are
//! `session`'s and the hub's, the same code as `/ws` (`ws.rs`).
//!
//! - **Connecting.** The socket.io CONNECT runs [`authorize`] (a connect middleware):
//!   the token (`auth.token`, the `Authorization` header or the `token` query
//!   parameter), the tenant named (`X-Tenant-ID`, `tenantId` in the query or `auth`), a
//!   free slot, the cursor (`auth.lastEventId` or the query's). A refusal is the
//!   client's `connect_error`, whose `message` is `CODE: text` (socketioxide sends no
//!   `data` with a refusal). The middleware also registers the socket's event handler,
//!   so that nothing the client emits right after CONNECT can be missed.
//! - **One task per connection** ([`run`], the connect handler's future): it says
//!   `connected`, replays from the cursor, then waits on everything at once, as `/ws`'s
//!   task does: the client's events (in the order they arrived: socketioxide spawns a
//!   task per event, so the handler only queues them), the hub's deliveries, the
//!   token's expiry, the hub's kill switch, the disconnect, the server's shutdown.
//! - **Answers.** An event the client emitted with an acknowledgement callback gets its
//!   answer there (the data of `message_ack`, `room_joined`… or the error body);
//!   without one, the answer is emitted as the event of the same name, as on `/ws`.
//! - **Closing.** socket.io has no close codes: a connection the server closes (token
//!   expired, too slow, too many refusals) first gets an `error` whose
//!   `details.close` says why (`AUTH_EXPIRED`, `SLOW_CONSUMER`, `TOO_MANY_VIOLATIONS`),
//!   then a namespace disconnect. On shutdown the transports are closed (the client
//!   reconnects by itself).

use std::convert::Infallible;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use socketioxide::extract::{AckSender, SocketRef, TryData};
use socketioxide::handler::{ConnectHandler, FromMessage, Value as PacketValue};
use socketioxide::socket::Socket;
use socketioxide::{ParserConfig, SendError, SocketError, SocketIo};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use webwaka_realtime::protocol::{
    ADMIN_JUSTIFICATION_HEADER, ErrorBody, ErrorCode, Frame, ServerEvent, TENANT_HEADER,
};

use crate::app::App;
use crate::error::ApiError;
use crate::http::extract::{QueryMap, header_str};
use crate::hub::{Delivery, KillReason};
use crate::session::{Admitted, Answer, Handshake, Peer, Refusals, Replay};

/// The hub's and the metrics' name of this transport.
pub(crate) const TRANSPORT: &str = "socket.io";
/// Bytes of client events queued per connection, waiting for their turn, in frames of
/// `WS_MAX_FRAME_BYTES`: past that the client emits faster than the server answers, and
/// the next ones are refused (`RATE_LIMIT`). socketioxide reads a connection without
/// waiting for its handlers (no back-pressure, as in Node.js), so a burst of small
/// events (hundreds emitted in a loop) must fit.
const INCOMING_FRAMES: usize = 4;
/// Binary attachments accepted in one packet before socketioxide drops the connection
/// (binary data is refused anyway: events carry JSON).
const MAX_BINARIES: usize = 10;
/// How long an emit waits for room in the socket's outgoing buffer (a polling client
/// between two polls) before the connection counts as too slow.
const EMIT_PATIENCE: Duration = Duration::from_secs(5);
/// The wait between two attempts to emit into a full buffer.
const EMIT_RETRY: Duration = Duration::from_millis(5);

/// Engine.IO's `pingTimeout` (how long after a ping the pong may come): the silence
/// `WS_PING_TIMEOUT` allows beyond `WS_PING_INTERVAL`, so that a connection silent
/// for `WS_PING_TIMEOUT` is closed, as on `/ws` (at least a second).
pub(crate) fn engine_ping_timeout(config: &crate::config::Config) -> Duration {
    Duration::from_millis(
        config
            .ping_timeout_ms
            .saturating_sub(config.ping_interval_ms)
            .max(1000),
    )
}

/// Mounts the endpoint on `router` at `SOCKETIO_PATH` (unless it is off), and returns
/// socket.io's handle, which closes every socket.io connection when the server shuts
/// down.
pub(crate) fn mount(
    app: &Arc<App>,
    router: Router<Arc<App>>,
) -> (Router<Arc<App>>, Option<SocketIo>) {
    let config = &app.config;
    let Some(path) = config.socketio_path() else {
        return (router, None);
    };
    let path = path.to_owned();
    let frame = config.max_frame_bytes;
    let parser = ParserConfig::common()
        .max_incoming_binary_buf_size(frame)
        .max_incoming_binaries(MAX_BINARIES)
        .packet_completion_timeout(config.http_header_timeout());
    let (service, io) = SocketIo::builder()
        .req_path(path.clone())
        .ping_interval(config.ping_interval())
        .ping_timeout(engine_ping_timeout(config))
        // socketioxide's defaults are far larger (64 MiB WebSocket messages): the
        // server's one frame limit applies to both transports.
        .max_payload(u64::try_from(frame).unwrap_or(u64::MAX))
        .ws_max_message_size(frame)
        .ws_max_frame_size(frame)
        .ws_read_buffer_size(config.ws_read_buffer_bytes)
        .max_buffer_size(config.ws_send_queue)
        // An Engine.IO session that never joins the namespace ends like a request
        // that never finishes its headers.
        .connect_timeout(config.http_header_timeout())
        .with_parser(parser)
        .build_svc();
    let admit_app = Arc::clone(app);
    let run_app = Arc::clone(app);
    let on_connect = move |socket: SocketRef| {
        let app = Arc::clone(&run_app);
        run(app, socket)
    };
    let middleware = move |socket: SocketRef, TryData(auth): TryData<Value>| {
        let app = Arc::clone(&admit_app);
        async move { authorize(app, socket, auth).await }
    };
    io.ns("/", on_connect.with(middleware));
    // Engine.IO's requests are `{path}/?EIO=4&transport=…` (the client adds the slash).
    let router = router
        .route_service(&path, service.clone())
        .route_service(&format!("{path}/"), service);
    (router, Some(io))
}

/// A refused connection, as the client's `connect_error` `message`: `CODE: text`.
#[derive(Debug)]
pub(crate) struct Refusal(ErrorBody);

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.0.code.as_str(), self.0.error)
    }
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        Self(error.body)
    }
}

/// A client event as it arrived: the packet's JSON (`["event", data…]`), and where
/// its acknowledgement goes when the client asked for one.
struct Inbound {
    packet: PacketValue,
    ack: Option<AckSender>,
}

impl Inbound {
    /// Its size, as counted against the connection's queue.
    fn bytes(&self) -> usize {
        match &self.packet {
            PacketValue::Str(text, binaries) => {
                text.len() + binaries.iter().flatten().map(|b| b.len()).sum::<usize>()
            }
            PacketValue::Bytes(bytes) => bytes.len(),
        }
    }
}

/// A connection's queue of client events: unbounded in count, bounded in bytes.
#[derive(Clone)]
struct Incoming {
    /// Boxed: a channel allocates its first block of 32 slots at once, which for the
    /// event itself would be some 3 KiB per idle connection.
    tx: mpsc::UnboundedSender<Box<Inbound>>,
    queued: Arc<AtomicUsize>,
    budget: usize,
}

/// The packet of an event, taken whole (socketioxide's `FromMessage`).
struct RawPacket {
    packet: PacketValue,
    wants_ack: bool,
}

impl FromMessage<socketioxide::adapter::LocalAdapter> for RawPacket {
    type Error = Infallible;

    fn from_message(
        _socket: Arc<Socket>,
        packet: PacketValue,
        ack: Option<i64>,
    ) -> Result<Self, Infallible> {
        Ok(Self {
            packet,
            wants_ack: ack.is_some(),
        })
    }
}

/// What [`authorize`] hands to [`run`] through the socket's extensions.
struct Setup {
    admitted: Admitted,
    incoming: mpsc::UnboundedReceiver<Box<Inbound>>,
    /// Bytes in `incoming`.
    queued: Arc<AtomicUsize>,
    closed: CancellationToken,
}

/// [`Setup`] in a form socketioxide's extensions take (they must be `Clone`).
#[derive(Clone)]
struct Pending(Arc<Mutex<Option<Setup>>>);

/// The socket.io CONNECT's checks (a connect middleware): those of `/ws`'s upgrade.
async fn authorize(
    app: Arc<App>,
    socket: SocketRef,
    auth: Result<Value, socketioxide::ParserError>,
) -> Result<(), Refusal> {
    let parts = socket.req_parts();
    let query = QueryMap::from_uri(&parts.uri)?;
    let auth = match auth {
        Ok(Value::Object(map)) => map,
        Ok(Value::Null) => serde_json::Map::new(),
        Ok(_) => return Err(ApiError::invalid("auth", "must be an object").into()),
        Err(error) => return Err(ApiError::invalid("auth", error.to_string()).into()),
    };
    let auth_str = |name: &'static str| -> Result<Option<&str>, ApiError> {
        match auth.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(ApiError::invalid(
                format!("auth.{name}"),
                "must be a string",
            )),
        }
    };
    let auth_token = auth_str("token")?.filter(|t| !t.trim().is_empty());
    // `auth.token` first (the original read it first), else the header, else the query.
    let (authorization, token) = match auth_token {
        Some(token) => (None, Some(token)),
        None => (
            header_str(&parts.headers, axum::http::header::AUTHORIZATION.as_str()),
            query.get("token"),
        ),
    };
    let named_tenant = match (
        header_str(&parts.headers, TENANT_HEADER),
        query.get("tenantId"),
        auth_str("tenantId")?,
    ) {
        (Some(h), _, _) => Some((h, TENANT_HEADER)),
        (None, Some(q), _) => Some((q, "query.tenantId")),
        (None, None, Some(a)) => Some((a, "auth.tenantId")),
        (None, None, None) => None,
    };
    let path = app.config.socketio_path().unwrap_or_default().to_owned();
    let handshake = Handshake {
        path: &path,
        authorization,
        token,
        named_tenant,
        justification: header_str(&parts.headers, ADMIN_JUSTIFICATION_HEADER),
        last_event_id: auth_str("lastEventId")?.or_else(|| query.get("lastEventId")),
        client_id: auth_str("clientId")?.or_else(|| query.get("clientId")),
    };
    let admitted = crate::session::admit(&app, handshake).await?;
    // The handlers are in place before the client hears it is connected: what it
    // emits at once is queued, in order, until the connection's task takes it.
    let (tx, incoming) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let queue = Incoming {
        tx,
        queued: Arc::clone(&queued),
        budget: app.config.max_frame_bytes.saturating_mul(INCOMING_FRAMES),
    };
    // The socket comes with each call: a clone kept in its own handler would never be
    // freed.
    socket.on_fallback(move |socket: SocketRef, ack: AckSender, raw: RawPacket| {
        queue.push(&socket, raw, ack);
        std::future::ready(())
    });
    let closed = CancellationToken::new();
    let on_close = closed.clone();
    socket.on_disconnect(move || {
        on_close.cancel();
        std::future::ready(())
    });
    let setup = Setup {
        admitted,
        incoming,
        queued,
        closed,
    };
    socket
        .extensions
        .insert(Pending(Arc::new(Mutex::new(Some(setup)))));
    Ok(())
}

impl Incoming {
    /// Queues a client event for the connection's task; refuses it at once when the
    /// queue is over its budget (the client emits faster than the server answers).
    fn push(&self, socket: &SocketRef, raw: RawPacket, ack: AckSender) {
        let inbound = Inbound {
            packet: raw.packet,
            ack: raw.wants_ack.then_some(ack),
        };
        let bytes = inbound.bytes();
        let before = self.queued.fetch_add(bytes, Ordering::AcqRel);
        if before > 0 && before + bytes > self.budget {
            self.queued.fetch_sub(bytes, Ordering::AcqRel);
            let body = ApiError::rate_limited(1000)
                .with_detail(
                    "reason",
                    "events arrive faster than this connection's earlier ones are answered",
                )
                .body;
            // Ahead of the answers still queued: the acknowledgement (or the
            // `error`) says which event it is about only when it is an
            // acknowledgement.
            let _ = match inbound.ack {
                Some(ack) => ack.send(&body),
                None => socket.emit("error", &body),
            };
            return;
        }
        if self.tx.send(Box::new(inbound)).is_err() {
            // The connection is closing: nothing to answer.
            self.queued.fetch_sub(bytes, Ordering::AcqRel);
        }
    }
}

/// The body of a server event, as socket.io data.
#[derive(Deserialize)]
struct Outgoing<'a> {
    #[serde(borrow)]
    event: &'a str,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// What the connection's loop should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    /// Tell the client why (an `error` with this code and `details.close`), then
    /// disconnect it.
    Close(ErrorCode, &'static str),
    /// Disconnect it without a word (the chaos layer's dropped connection).
    Drop,
    /// The socket is gone (or the server is shutting down, closing every transport).
    Stop,
}

/// One socket.io connection, once connected.
struct Connection {
    app: Arc<App>,
    socket: SocketRef,
    peer: Peer,
    /// The durable events this connection's client has.
    delivered: crate::session::Delivered,
    refusals: Refusals,
    /// Bytes of client events queued (see [`Incoming`]).
    queued: Arc<AtomicUsize>,
}

/// The connect handler: the set-up, then the future of the connection's whole life.
/// Not an `async fn`, so that what the set-up consumes is not kept a second time in
/// the future while the connection lives (see `ws::run`).
fn run(app: Arc<App>, socket: SocketRef) -> impl std::future::Future<Output = ()> + Send {
    use futures_util::future::Either;
    let setup = socket
        .extensions
        .get::<Pending>()
        .and_then(|pending| pending.0.lock().ok()?.take());
    socket.extensions.remove::<Pending>();
    let Some(Setup {
        admitted,
        incoming,
        queued,
        closed,
    }) = setup
    else {
        // Connected without passing `authorize`: cannot happen (the middleware runs
        // first); refuse to serve it rather than trust it.
        tracing::error!("socket.io connection without its checks: disconnected");
        let _ = socket.disconnect();
        return Either::Left(std::future::ready(()));
    };
    let Admitted {
        caller,
        client_id,
        cursor,
        slot,
    } = admitted;
    let (peer, registration) = crate::session::open(&app, &caller, TRANSPORT, &client_id);
    let span = tracing::info_span!(
        "socketio",
        conn = registration.conn_id,
        tenant = %caller.tenant,
        user = %caller.identity.user_id,
    );
    let mut conn = Connection {
        app,
        socket,
        peer,
        delivered: crate::session::Delivered::default(),
        refusals: Refusals::new(),
        queued,
    };
    let exp = caller.identity.exp;
    drop(caller);
    Either::Right(async move {
        tracing::debug!(client_id = %client_id, transport = ?conn.socket.transport_type(), "connected");
        // Boxed: the first frames (and a replay) need a large future, once.
        let mut flow = Box::pin(conn.start(client_id, cursor)).await;
        if let Flow::Continue = flow {
            flow = conn
                .serve(registration.inbox, registration.kill, incoming, closed, exp)
                .await;
        }
        match flow {
            Flow::Close(code, reason) => {
                let body = ErrorBody::new(code, close_text(reason)).with_detail("close", reason);
                let _ = conn.socket.emit("error", &body);
                let _ = conn.socket.clone().disconnect();
            }
            Flow::Drop => {
                let _ = conn.socket.clone().disconnect();
            }
            Flow::Continue | Flow::Stop => {}
        }
        crate::session::close(&conn.app, &conn.peer);
        tracing::debug!(?flow, "disconnected");
        drop(slot);
    }
    .instrument(span))
}

/// The human text of a close.
fn close_text(reason: &str) -> &'static str {
    match reason {
        "AUTH_EXPIRED" => "the token expired: reconnect with a new one",
        "SLOW_CONSUMER" => {
            "deliveries piled up faster than this connection took them: reconnect with auth.lastEventId to catch up"
        }
        "TOO_MANY_VIOLATIONS" => "too many refused events within a minute",
        "RESUME_FAILED" => {
            "the events after auth.lastEventId could not be read now: reconnect with it shortly"
        }
        _ => "the server closed the connection",
    }
}

impl Connection {
    /// The connection's first events: `connected`, then what `auth.lastEventId` asked
    /// for.
    async fn start(&mut self, client_id: String, cursor: Option<(String, u64)>) -> Flow {
        let connected = crate::session::connected(&self.app, &self.peer, client_id);
        if let f @ (Flow::Stop | Flow::Close(..) | Flow::Drop) = self.emit_event(&connected).await {
            return f;
        }
        match cursor {
            Some((cursor, seq)) => Box::pin(self.replay(cursor, seq, None)).await,
            None => Flow::Continue,
        }
    }

    /// The connection's life after [`Self::start`].
    async fn serve(
        &mut self,
        mut inbox: mpsc::Receiver<Arc<Delivery>>,
        kill: CancellationToken,
        mut incoming: mpsc::UnboundedReceiver<Box<Inbound>>,
        closed: CancellationToken,
        exp: i64,
    ) -> Flow {
        let app = Arc::clone(&self.app);
        let expiry = tokio::time::sleep_until(crate::auth::token_end(exp, &app.config));
        tokio::pin!(expiry);
        let shutdown = app.shutdown.clone();
        let shutdown = shutdown.cancelled();
        tokio::pin!(shutdown);
        let kill = kill.cancelled();
        tokio::pin!(kill);
        let closed = closed.cancelled();
        tokio::pin!(closed);
        loop {
            let flow = tokio::select! {
                biased;
                // The endpoint closes every transport on shutdown (the client
                // reconnects by itself): nothing to say here.
                () = &mut shutdown => Flow::Stop,
                () = &mut closed => Flow::Stop,
                () = &mut kill => match app.hub.kill_reason(&self.peer.tenant, &self.peer.user, self.peer.conn_id) {
                    KillReason::SlowConsumer => Flow::Close(ErrorCode::ServerFull, "SLOW_CONSUMER"),
                    KillReason::Dropped => Flow::Drop,
                    KillReason::AuthExpired => Flow::Close(ErrorCode::AuthFailed, "AUTH_EXPIRED"),
                },
                _ = &mut expiry => Flow::Close(ErrorCode::AuthFailed, "AUTH_EXPIRED"),
                delivery = inbox.recv() => match delivery {
                    None => Flow::Stop,
                    Some(delivery) => self.deliver(&delivery).await,
                },
                inbound = incoming.recv() => match inbound {
                    None => Flow::Stop,
                    // Boxed: event handling needs a large future, and keeping it out of
                    // this loop keeps every idle connection's task small.
                    Some(inbound) => Box::pin(self.on_event(*inbound)).await,
                },
            };
            match flow {
                Flow::Continue => {}
                other => return other,
            }
        }
    }

    /// Emits a queued delivery, unless this connection already sent that event.
    async fn deliver(&mut self, delivery: &Delivery) -> Flow {
        if let Some(seq) = delivery.seq
            && !self.delivered.live(seq)
        {
            return Flow::Continue;
        }
        // The hub queues `/ws` frames (encoded once for every connection): their event
        // and their data, as they are, become the socket.io event.
        match serde_json::from_str::<Outgoing<'_>>(delivery.text.as_str()) {
            Ok(out) => self.emit(out.event, out.data).await,
            Err(error) => {
                tracing::error!(%error, "a queued frame does not decode");
                Flow::Continue
            }
        }
    }

    /// Emits `event` as the socket.io event of the same name.
    async fn emit_event(&self, event: &ServerEvent) -> Flow {
        let frame = event.to_frame(None);
        self.emit(&frame.event, &frame.data).await
    }

    /// Emits, waiting (at most [`EMIT_PATIENCE`]) while the socket's buffer is full.
    async fn emit<T: Serialize + ?Sized>(&self, event: &str, data: &T) -> Flow {
        if self.app.watch.capturing() {
            let data = serde_json::to_string(data).unwrap_or_default();
            let text = format!("{event} {data}");
            self.app.watch.frame_out(self.peer.conn_id, &text);
        }
        match self.socket.emit(event, data) {
            Ok(()) => Flow::Continue,
            // Boxed: the wait's timer would otherwise sit in every idle connection's
            // task.
            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                Box::pin(self.emit_when_room(event, data)).await
            }
            Err(error) => emit_failed(error, event),
        }
    }

    /// [`Connection::emit`] into a full buffer: tries again every [`EMIT_RETRY`].
    async fn emit_when_room<T: Serialize + ?Sized>(&self, event: &str, data: &T) -> Flow {
        let started = tokio::time::Instant::now();
        loop {
            if started.elapsed() >= EMIT_PATIENCE {
                return Flow::Close(ErrorCode::ServerFull, "SLOW_CONSUMER");
            }
            tokio::time::sleep(EMIT_RETRY).await;
            match self.socket.emit(event, data) {
                Ok(()) => return Flow::Continue,
                Err(SendError::Socket(SocketError::InternalChannelFull)) => {}
                Err(error) => return emit_failed(error, event),
            }
        }
    }

    /// Sends the answer to a client event: to its acknowledgement when it asked for
    /// one, else as the event of the answer's name.
    async fn respond(&self, event: &ServerEvent, ack: Option<AckSender>) -> Flow {
        match ack {
            None => self.emit_event(event).await,
            Some(ack) => {
                let frame = event.to_frame(None);
                acked(ack.send(&frame.data))
            }
        }
    }

    /// Answers a refused event with its error (the connection stays, unless the client
    /// keeps sending refused events).
    async fn refuse(&mut self, error: ApiError, ack: Option<AckSender>) -> Flow {
        self.app
            .error_answered(Some(&self.peer.tenant), error.body.code);
        let flow = match ack {
            None => self.emit("error", &error.body).await,
            Some(ack) => acked(ack.send(&error.body)),
        };
        if flow == Flow::Stop {
            return flow;
        }
        if self.refusals.refused() {
            return Flow::Close(ErrorCode::RateLimit, "TOO_MANY_VIOLATIONS");
        }
        flow
    }

    async fn on_event(&mut self, inbound: Inbound) -> Flow {
        self.queued.fetch_sub(inbound.bytes(), Ordering::AcqRel);
        let Inbound { packet, ack } = inbound;
        if let Some(chaos) = &self.app.chaos {
            chaos.wait().await;
        }
        let frame = match frame_of(&packet) {
            Ok(frame) => frame,
            Err(error) => return self.refuse(error, ack).await,
        };
        if self.app.watch.capturing() {
            let text = format!("{} {}", frame.event, frame.data);
            self.app.watch.frame_in(self.peer.conn_id, &text);
        }
        let app = Arc::clone(&self.app);
        let answer = match self.peer.decode(&app, frame).await {
            Ok(event) => self.peer.handle(&app, event).await,
            Err(error) => Answer::Refused(error),
        };
        match answer {
            Answer::Reply(event) => self.respond(&event, ack).await,
            Answer::Joined { room_id, present } => {
                if let f @ (Flow::Stop | Flow::Close(..) | Flow::Drop) = self
                    .respond(&ServerEvent::RoomJoined { room_id }, ack)
                    .await
                {
                    return f;
                }
                for info in present {
                    if let f @ (Flow::Stop | Flow::Close(..) | Flow::Drop) =
                        self.emit_event(&ServerEvent::Presence(info)).await
                    {
                        return f;
                    }
                }
                Flow::Continue
            }
            Answer::Replay { cursor, after_seq } => {
                Box::pin(self.replay(cursor, after_seq, ack)).await
            }
            Answer::Presence(info) => match ack {
                None => Flow::Continue,
                Some(ack) => acked(ack.send(&info)),
            },
            // The chaos layer dropped the acknowledgement: the client never hears.
            Answer::Dropped => Flow::Continue,
            Answer::Refused(error) => self.refuse(error, ack).await,
        }
    }

    /// Emits the durable deliveries after `after_seq` that this user may see, up to the
    /// log's head now, then `resumed` (to the acknowledgement, when asked for).
    async fn replay(&mut self, cursor: String, after_seq: u64, ack: Option<AckSender>) -> Flow {
        let app = Arc::clone(&self.app);
        // The client has everything up to its cursor: a live delivery of an earlier
        // event (another instance's feed catching up) would be a duplicate, out of order.
        self.delivered.resumed_after(after_seq);
        let mut replay = match Replay::start(&app, &self.peer, cursor, after_seq).await {
            Ok(replay) => replay,
            Err(error) => return Self::replay_failed(&error),
        };
        loop {
            match replay.next_page(&app, &self.peer).await {
                Err(error) => return Self::replay_failed(&error),
                Ok(None) => break,
                Ok(Some(page)) => {
                    for (seq, event) in page {
                        self.delivered.replayed(seq);
                        if let f @ (Flow::Stop | Flow::Close(..) | Flow::Drop) =
                            self.emit_event(&event).await
                        {
                            return f;
                        }
                    }
                }
            }
        }
        self.respond(&replay.finish(&app), ack).await
    }

    /// A replay that could not be read to its end (the storage is unavailable) ends the
    /// connection with the error's code: left open, its live deliveries would move the
    /// client's cursor past the events it has not been sent. The client reconnects with
    /// its cursor and resumes.
    fn replay_failed(error: &ApiError) -> Flow {
        tracing::debug!(code = ?error.body.code, "a replay failed: disconnecting");
        Flow::Close(error.body.code, "RESUME_FAILED")
    }
}

/// What a failed emit means for the connection.
fn emit_failed(error: SendError, event: &str) -> Flow {
    match error {
        SendError::Socket(SocketError::Closed) => Flow::Stop,
        SendError::Socket(SocketError::InternalChannelFull) => {
            Flow::Close(ErrorCode::ServerFull, "SLOW_CONSUMER")
        }
        SendError::Serialize(error) => {
            tracing::error!(%error, event, "an event does not serialise");
            Flow::Continue
        }
    }
}

/// What sending an acknowledgement means for the connection.
fn acked(result: Result<(), SendError>) -> Flow {
    match result {
        Ok(()) => Flow::Continue,
        Err(SendError::Socket(SocketError::Closed)) => Flow::Stop,
        Err(SendError::Socket(SocketError::InternalChannelFull)) => {
            Flow::Close(ErrorCode::ServerFull, "SLOW_CONSUMER")
        }
        Err(SendError::Serialize(error)) => {
            tracing::error!(%error, "an acknowledgement does not serialise");
            Flow::Continue
        }
    }
}

/// Reads an event packet (`["event", data]`) as a `/ws` frame, refusing what `/ws`
/// refuses: binary data, malformed JSON, more than one argument.
fn frame_of(packet: &PacketValue) -> Result<Frame, ApiError> {
    let PacketValue::Str(text, binaries) = packet else {
        return Err(binary_refused());
    };
    if binaries.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(binary_refused());
    }
    let args: Vec<Value> = serde_json::from_str(text.as_str())
        .map_err(|e| ApiError::invalid("input", format!("malformed JSON: {e}")))?;
    let mut args = args.into_iter();
    let event = match args.next() {
        Some(Value::String(event)) => event,
        _ => return Err(ApiError::invalid("event", "must be a string")),
    };
    let data = args.next().unwrap_or(Value::Null);
    let extra = args.count();
    if extra > 0 {
        return Err(ApiError::invalid(
            "input",
            format!(
                "an event takes one argument (its data object), got {}",
                extra + 1
            ),
        ));
    }
    Ok(Frame {
        event,
        data,
        reference: None,
    })
}

fn binary_refused() -> ApiError {
    ApiError::invalid(
        "input",
        "binary data is not accepted: emit JSON (strings, numbers, objects)",
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn packet(text: &str) -> PacketValue {
        PacketValue::Str(text.to_owned().into(), None)
    }

    #[test]
    fn an_event_packet_reads_as_a_ws_frame() {
        let frame = frame_of(&packet(r#"["join_room",{"roomId":"general"}]"#)).unwrap();
        assert_eq!(frame.event, "join_room");
        assert_eq!(frame.data["roomId"], "general");
        let frame = frame_of(&packet(r#"["ping"]"#)).unwrap();
        assert_eq!((frame.event.as_str(), frame.data), ("ping", Value::Null));
    }

    #[test]
    fn bad_packets_are_refused_naming_what_is_wrong() {
        let path =
            |text: &str| frame_of(&packet(text)).unwrap_err().body.details.unwrap()["path"].clone();
        assert_eq!(path(r#"["message",{"type":"#), "input");
        assert_eq!(path(r#"[3,{}]"#), "event");
        assert_eq!(path(r#"["message",{},{}]"#), "input");
        let binary = PacketValue::Str(
            r#"["message",{"_placeholder":true,"num":0}]"#.to_owned().into(),
            Some(vec![axum::body::Bytes::from_static(b"x")].into()),
        );
        assert!(frame_of(&binary).unwrap_err().body.error.contains("binary"));
    }

    #[test]
    fn a_refusal_reads_code_colon_text() {
        let refusal = Refusal::from(ApiError::auth("token expired"));
        assert_eq!(refusal.to_string(), "AUTH_FAILED: token expired");
    }

    #[test]
    fn the_engine_ping_timeout_is_the_silence_beyond_the_interval() {
        let mut config = crate::config::Config::new("x");
        assert_eq!(engine_ping_timeout(&config), Duration::from_secs(30));
        config.ping_interval_ms = 200;
        config.ping_timeout_ms = 1_000;
        assert_eq!(engine_ping_timeout(&config), Duration::from_secs(1));
    }
}
