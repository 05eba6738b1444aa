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
//!
//! Durable messages are pipelined: a connection queues each for the log and reads on,
//! up to [`MAX_QUEUED`] at a time, so that one commit carries several of its messages
//! (awaiting each before reading the next capped a connection at one message per
//! commit). The log stores and answers them in the order queued, and every other frame
//! waits until those before it are answered: a connection's answers still come in the
//! order of its frames.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use futures_util::{FutureExt, SinkExt};
use tokio::time::Instant;
use tracing::Instrument;
use webwaka_realtime::protocol::envelope::{AUTH_EXPIRED_CLOSE_REASON, close_code};
use webwaka_realtime::protocol::{
    ADMIN_JUSTIFICATION_HEADER, ClientEvent, ErrorCode, Frame, MessageAck, SendMessage,
    ServerEvent, TENANT_HEADER,
};

use crate::app::App;
use crate::error::ApiError;
use crate::http::extract::{QueryMap, header_str};
use crate::hub::KillReason;
use crate::messaging::Queued;
use crate::session::{Admitted, Answer, Handshake, Peer, Refusals, Replay, Sent, acked};

/// The hub's and the metrics' name of this transport.
pub(crate) const TRANSPORT: &str = "ws";
/// How long a closing connection waits for the client's close frame.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(1);
/// Most queued deliveries and ready frames handled after one wake-up before the
/// buffered output is flushed (and the other branches get a turn).
const MAX_BATCH: usize = 64;
/// Most durable messages of one connection queued for the log and not yet answered;
/// past it the connection reads no more frames until the oldest is answered.
const MAX_QUEUED: usize = 64;

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

/// The checks before the upgrade (shared with socket.io: [`crate::session::admit`]).
async fn prepare(
    app: &Arc<App>,
    headers: &HeaderMap,
    query: &QueryMap,
) -> Result<Admitted, ApiError> {
    let named_tenant = match (header_str(headers, TENANT_HEADER), query.get("tenantId")) {
        (Some(h), _) => Some((h, TENANT_HEADER)),
        (None, Some(q)) => Some((q, "query.tenantId")),
        (None, None) => None,
    };
    let handshake = Handshake {
        path: &app.config.ws_path,
        authorization: header_str(headers, header::AUTHORIZATION.as_str()),
        token: query.get("token"),
        named_tenant,
        justification: header_str(headers, ADMIN_JUSTIFICATION_HEADER),
        last_event_id: query.get("lastEventId"),
        client_id: query.get("clientId"),
    };
    crate::session::admit(app, handshake).await
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
    peer: Peer,
    /// The durable events this connection's client has.
    delivered: crate::session::Delivered,
    refusals: Refusals,
    last_heard: Instant,
    /// Durable messages queued for the log, oldest first, with their frames' `ref`.
    queued: VecDeque<(Queued, Option<Box<str>>)>,
}

/// The connection's task. Not an `async fn`: the set-up runs here, before the future
/// exists, so that what it consumes (the socket and the admission, moved into the
/// connection) is not kept a second time in the future for the connection's whole life
/// (an `async fn` keeps its arguments; this saved an idle connection about 800 bytes).
fn run(
    app: Arc<App>,
    socket: WebSocket,
    admitted: Admitted,
) -> impl std::future::Future<Output = ()> + Send {
    let Admitted {
        caller,
        client_id,
        cursor,
        slot,
    } = admitted;
    let (peer, registration) = crate::session::open(&app, &caller, TRANSPORT, &client_id);
    let span = tracing::info_span!(
        "ws",
        conn = registration.conn_id,
        tenant = %caller.tenant,
        user = %caller.identity.user_id,
    );
    let exp = caller.identity.exp;
    drop(caller);
    let mut conn = Connection {
        peer,
        app,
        socket,
        delivered: crate::session::Delivered::default(),
        refusals: Refusals::new(),
        last_heard: Instant::now(),
        queued: VecDeque::new(),
    };
    async move {
        tracing::debug!(client_id = %client_id, "connected");
        // Boxed: the first frames (and a replay) need a large future, once.
        let mut flow = Box::pin(conn.start(client_id, cursor)).await;
        if let Flow::Continue = flow {
            flow = conn.serve(registration.inbox, registration.kill, exp).await;
        }
        if let Flow::Close(code, reason) = flow {
            // The acks of messages already queued go first (briefly: the close is
            // due; a message left unanswered is resent by its client, and the log
            // keeps one copy).
            let _ = tokio::time::timeout(CLOSE_HANDSHAKE, Box::pin(conn.settle())).await;
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
        crate::session::close(&conn.app, &conn.peer);
        tracing::debug!(reason = flow_name(&flow), "disconnected");
        drop(slot);
    }
    .instrument(span)
}

/// The answer to the oldest queued message (cancel-safe; pending while none is queued).
async fn oldest_stored(
    queued: &mut VecDeque<(Queued, Option<Box<str>>)>,
    app: &App,
) -> Result<MessageAck, ApiError> {
    match queued.front_mut() {
        Some((oldest, _)) => oldest.stored(&app.log.metrics).await,
        None => std::future::pending().await,
    }
}

fn flow_name(flow: &Flow) -> &'static str {
    match flow {
        Flow::Continue => "continue",
        Flow::Close(_, reason) => reason,
        Flow::Stop => "socket closed",
    }
}

impl Connection {
    /// The connection's first frames: `connected`, then what a resume asked for.
    async fn start(&mut self, client_id: String, cursor: Option<(String, u64)>) -> Flow {
        let connected = crate::session::connected(&self.app, &self.peer, client_id);
        if let f @ (Flow::Stop | Flow::Close(..)) = self.send(&connected, None).await {
            return f;
        }
        match cursor {
            Some((cursor, seq)) => Box::pin(self.replay(cursor, seq, None)).await,
            None => Flow::Continue,
        }
    }

    /// The connection's life after [`Self::start`]: deliveries out, frames in, pings,
    /// until it closes, the token ends, the hub kills it or the server stops.
    async fn serve(
        &mut self,
        mut inbox: tokio::sync::mpsc::Receiver<Arc<crate::hub::Delivery>>,
        kill: tokio_util::sync::CancellationToken,
        exp: i64,
    ) -> Flow {
        let app = Arc::clone(&self.app);
        let config = &app.config;
        let ping_interval = config.ping_interval();
        let ping_timeout = config.ping_timeout();
        let token_end = crate::auth::token_end(exp, config);
        // One timer for the next ping and the token's end, whichever comes first (an
        // `Interval` and a second `Sleep` cost an idle connection about 270 bytes more).
        let mut next_ping = Instant::now() + ping_interval;
        let timer = tokio::time::sleep_until(next_ping.min(token_end));
        tokio::pin!(timer);
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
                () = &mut kill => match app.hub.kill_reason(&self.peer.tenant, &self.peer.user, self.peer.conn_id) {
                    KillReason::SlowConsumer => Flow::Close(close_code::TRY_AGAIN_LATER, "SLOW_CONSUMER"),
                    // Chaos: gone without a word, as if the network failed.
                    KillReason::Dropped => Flow::Stop,
                    KillReason::AuthExpired => {
                        Flow::Close(close_code::POLICY_VIOLATION, AUTH_EXPIRED_CLOSE_REASON)
                    }
                },
                () = &mut timer => {
                    let now = Instant::now();
                    if now >= token_end {
                        Flow::Close(close_code::POLICY_VIOLATION, AUTH_EXPIRED_CLOSE_REASON)
                    } else if self.last_heard.elapsed() >= ping_timeout {
                        Flow::Close(close_code::NORMAL, "PING_TIMEOUT")
                    } else {
                        // The next ping a whole interval after this one (a late tick
                        // delays the ones after it, as `MissedTickBehavior::Delay`).
                        next_ping = now + ping_interval;
                        timer.as_mut().reset(next_ping.min(token_end));
                        if self.socket.send(Message::Ping(Default::default())).await.is_err() {
                            Flow::Stop
                        } else {
                            Flow::Continue
                        }
                    }
                }
                delivery = inbox.recv() => match delivery {
                    None => Flow::Stop,
                    Some(delivery) => self.deliver(&delivery).await,
                },
                stored = oldest_stored(&mut self.queued, &app), if !self.queued.is_empty() => {
                    // Boxed, as frames are: an idle connection's task stays small.
                    Box::pin(self.answer_oldest(stored)).await
                }
                frame = self.socket.recv(), if self.queued.len() < MAX_QUEUED => match frame {
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
            // Messages the log has answered meanwhile.
            while let Some(stored) = self
                .queued
                .front_mut()
                .and_then(|(queued, _)| queued.stored(&self.app.log.metrics).now_or_never())
            {
                progressed = true;
                let flow = Box::pin(self.answer_oldest(stored)).await;
                if let f @ (Flow::Stop | Flow::Close(..)) = flow {
                    return f;
                }
            }
            // A frame already received (or already in the read buffer); `recv` is
            // cancel-safe, so giving up on a pending one loses nothing.
            if self.queued.len() >= MAX_QUEUED {
                // Reads no more until the oldest queued message is answered.
            } else if let Some(frame) = self.socket.recv().now_or_never() {
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
        if let Some(seq) = delivery.seq
            && !self.delivered.live(seq)
        {
            return Flow::Continue;
        }
        self.feed(Message::Text(delivery.text.clone())).await
    }

    /// Buffers `event` (written at the next flush, or sooner when the buffer is full).
    async fn send(&mut self, event: &ServerEvent, reference: Option<&str>) -> Flow {
        let text = event.encode(reference);
        self.feed(Message::Text(Utf8Bytes::from(text))).await
    }

    async fn feed(&mut self, message: Message) -> Flow {
        if let Message::Text(text) = &message {
            self.app.watch.frame_out(self.peer.conn_id, text.as_str());
        }
        match self.socket.feed(message).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop,
        }
    }

    /// Answers a refused frame with an `error` (the connection stays open, unless the
    /// client keeps sending refused frames).
    async fn refuse(&mut self, error: ApiError, reference: Option<&str>) -> Flow {
        if let f @ Flow::Stop = self.send_error(error, reference).await {
            return f;
        }
        if self.refusals.refused() {
            return Flow::Close(close_code::POLICY_VIOLATION, "TOO_MANY_VIOLATIONS");
        }
        Flow::Continue
    }

    /// Answers the oldest queued message, now stored (or refused).
    async fn answer_oldest(&mut self, stored: Result<MessageAck, ApiError>) -> Flow {
        let reference = self.queued.pop_front().and_then(|(_, r)| r);
        let answer = acked(&self.app, stored);
        self.answer(answer, reference.as_deref()).await
    }

    /// Waits until every queued message is answered, and answers them.
    async fn settle(&mut self) -> Flow {
        let app = Arc::clone(&self.app);
        while !self.queued.is_empty() {
            let stored = oldest_stored(&mut self.queued, &app).await;
            if let f @ (Flow::Stop | Flow::Close(..)) = self.answer_oldest(stored).await {
                return f;
            }
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
                if let f @ (Flow::Stop | Flow::Close(..)) = self.settle().await {
                    return f;
                }
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
        self.app.watch.frame_in(self.peer.conn_id, text);
        // Most frames are messages: read those in one pass into their typed value. Any
        // frame that pass does not take exactly as the general path would (including
        // every bad one) is decoded below instead.
        if let Some(frame) = crate::wsframe::decode_message(text, &self.peer.tenant) {
            let event = ClientEvent::Message(frame.message);
            let r = frame.reference.as_deref();
            // Shape, targets and id lengths (core's checks, fields named `data.…`).
            if let Err(error) = event.validate() {
                if let f @ (Flow::Stop | Flow::Close(..)) = self.settle().await {
                    return f;
                }
                return self.refuse(error.into(), r).await;
            }
            if let ClientEvent::Message(message) = event {
                return self.on_send(message, r).await;
            }
        }
        // Any other frame is answered after the messages queued before it.
        if let f @ (Flow::Stop | Flow::Close(..)) = self.settle().await {
            return f;
        }
        let mut frame = match Frame::decode(text) {
            Ok(frame) => frame,
            Err(error) => return self.refuse(error.into(), None).await,
        };
        let reference = frame.reference.take();
        let r = reference.as_deref();
        let app = Arc::clone(&self.app);
        let answer = match self.peer.decode(&app, frame).await {
            Ok(event) => self.peer.handle(&app, event).await,
            Err(error) => Answer::Refused(error),
        };
        self.answer(answer, r).await
    }

    /// A `message` frame, decoded and checked: a durable one is queued for the log
    /// and answered once stored; any other answer waits for those queued before it.
    async fn on_send(&mut self, message: SendMessage, r: Option<&str>) -> Flow {
        let app = Arc::clone(&self.app);
        match self.peer.submit(&app, message).await {
            Sent::Queued(queued) => {
                self.queued.push_back((queued, r.map(Into::into)));
                Flow::Continue
            }
            Sent::Answer(answer) => {
                if let f @ (Flow::Stop | Flow::Close(..)) = self.settle().await {
                    return f;
                }
                self.answer(answer, r).await
            }
        }
    }

    /// Sends the answer to a frame, carrying its `ref`.
    async fn answer(&mut self, answer: Answer, r: Option<&str>) -> Flow {
        match answer {
            Answer::Reply(event) => self.send(&event, r).await,
            Answer::Joined { room_id, present } => {
                if let f @ Flow::Stop = self.send(&ServerEvent::RoomJoined { room_id }, r).await {
                    return f;
                }
                for info in present {
                    if let f @ Flow::Stop = self.send(&ServerEvent::Presence(info), None).await {
                        return f;
                    }
                }
                Flow::Continue
            }
            Answer::Replay { cursor, after_seq } => {
                Box::pin(self.replay(cursor, after_seq, r)).await
            }
            Answer::Presence(_) | Answer::Dropped => Flow::Continue,
            Answer::Refused(error) => self.refuse(error, r).await,
        }
    }

    /// Sends the durable deliveries after `after_seq` that this user may see, up to the
    /// log's head now, then `resumed`.
    async fn replay(&mut self, cursor: String, after_seq: u64, reference: Option<&str>) -> Flow {
        let app = Arc::clone(&self.app);
        // The client has everything up to its cursor: a live delivery of an earlier
        // event (another instance's feed catching up) would be a duplicate, out of order.
        self.delivered.resumed_after(after_seq);
        let mut replay = match Replay::start(&app, &self.peer, cursor, after_seq).await {
            Ok(replay) => replay,
            Err(error) => return self.replay_failed(error, reference).await,
        };
        loop {
            match replay.next_page(&app, &self.peer).await {
                Err(error) => return self.replay_failed(error, reference).await,
                Ok(None) => break,
                Ok(Some(page)) => {
                    for (seq, event) in page {
                        self.delivered.replayed(seq);
                        if let f @ Flow::Stop = self.send(&event, None).await {
                            return f;
                        }
                    }
                }
            }
        }
        self.send(&replay.finish(&app), reference).await
    }

    /// A replay that could not be read to its end (the storage is unavailable) ends the
    /// connection after saying why: left open, its live deliveries would move the
    /// client's cursor past the events it has not been sent. Closed with 1013, the
    /// client comes back later with its cursor and resumes.
    async fn replay_failed(&mut self, error: ApiError, reference: Option<&str>) -> Flow {
        if let f @ Flow::Stop = self.send_error(error, reference).await {
            return f;
        }
        Flow::Close(close_code::TRY_AGAIN_LATER, "RESUME_FAILED")
    }

    /// Sends `error` as an `error` frame answering `reference` (counted by code for a
    /// watching dashboard).
    async fn send_error(&mut self, error: ApiError, reference: Option<&str>) -> Flow {
        self.app
            .error_answered(Some(&self.peer.tenant), error.body.code);
        let mut body = error.body;
        if let Some(r) = reference {
            body = body.with_ref(r);
        }
        self.send(&ServerEvent::Error(body), reference).await
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
