//! The supervisor: the one task per client that owns the connection.
//!
//! It drives the sans-IO [`Machine`]: it feeds it what the transports report and the
//! timers, and carries out its actions (open the WebSocket, poll, resync, refresh the
//! token, flush the outbox). Everything slow (HTTP calls, the WebSocket handshake, the
//! token provider) runs in spawned tasks that report back on one channel, so the loop
//! never blocks and there is never a second reconnect loop.
//!
//! Delivery rules it enforces:
//!
//! - messages go over the WebSocket in Realtime and over `POST /api/messages` otherwise,
//!   one in flight per lane (the outbox hands out lane heads only), the same id on every
//!   attempt;
//! - entity operations always go over HTTP, in batches, to the reconcile endpoint;
//! - Class D transactions always go over HTTP with their idempotency key; their outcome
//!   is learnt from events and from the status endpoint;
//! - inbound durable events are recorded (cursor + dedupe, one transaction) before the
//!   app hears of them, whichever transport brought them.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::http::{HttpApi, HttpError, is_not_found, retry_after_detail};
use super::token::{Claims, TokenCell, TokenError};
use super::types::{ClockOffset, OutboxUpdate, StateUpdate, TransactionUpdate, Update};
use super::ws::{self, ConnectError, WsEvent, WsHandle};
use super::{ClientConfig, ClientError, ClientMetrics, StoreHandle};
use crate::machine::{
    Action, ConnectionState, Failure, MAX_SERVER_DELAY, Machine, clamp_retry_hint, item_delay,
};
use crate::protocol::event::MESSAGE_EVENT_TYPE;
use crate::protocol::{
    ClientEvent, ErrorBody, ErrorCode, Event, Operation, ReconciliationRequest, SendMessage,
    ServerEvent, TransactionRequest, TransactionState, TransactionStatus, WebSocketMessage,
};
use crate::store::{ItemKind, ItemState, OutboxItem, Store, StoreError};

/// Key/value entry of the rooms the user wants to be in.
const ROOMS_KEY: &str = "client.rooms";
/// The first wait before inbound events the store could not record are fetched again;
/// it doubles while the store keeps failing, up to [`STORAGE_RETRY_MAX`].
const STORAGE_RETRY_MIN: Duration = Duration::from_secs(1);
const STORAGE_RETRY_MAX: Duration = Duration::from_secs(60);
/// The shortest and longest per-item retry delays (see [`item_backoff`]).
const ITEM_RETRY_MIN: Duration = Duration::from_millis(500);
const ITEM_RETRY_MAX: Duration = Duration::from_secs(30);
/// Events per poll request.
const POLL_LIMIT: u32 = 500;
/// Pages fetched at most by one resync catch-up.
const RESYNC_MAX_PAGES: usize = 10_000;
/// HTTP message sends in flight at most.
const HTTP_SEND_WINDOW: usize = 16;

/// How often settled outbox items older than `settled_retention` are deleted (at most).
const PRUNE_INTERVAL: Duration = Duration::from_secs(600);

/// The supervisor's clock: tokio's, so that tests in paused (virtual) time drive it; the
/// same as [`Instant::now`] otherwise.
fn mono_now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// `at + wait` without overflow (a wait too long for the clock is cut to an hour).
fn later(at: Instant, wait: Duration) -> Instant {
    at.checked_add(wait)
        .or_else(|| at.checked_add(MAX_SERVER_DELAY))
        .unwrap_or(at)
}

/// The monotonic instant of a wall-clock time (`now` if it has passed).
fn instant_of(at: chrono::DateTime<chrono::Utc>) -> Instant {
    let wait = at
        .signed_duration_since(now_wall())
        .to_std()
        .unwrap_or_default();
    later(mono_now(), wait)
}

/// The rooms the user wants to be in (kept across restarts).
pub(crate) fn load_rooms(store: &mut Store) -> Result<BTreeSet<String>, StoreError> {
    match store.kv_get(ROOMS_KEY)? {
        None => Ok(BTreeSet::new()),
        Some(text) => serde_json::from_str(&text).map_err(|e| StoreError::Invalid {
            field: "rooms",
            message: e.to_string(),
        }),
    }
}

/// Saves the rooms the user wants to be in.
pub(crate) fn save_rooms(store: &mut Store, rooms: &BTreeSet<String>) -> Result<(), StoreError> {
    let text = serde_json::to_string(rooms).map_err(|e| StoreError::Invalid {
        field: "rooms",
        message: e.to_string(),
    })?;
    store.kv_set(ROOMS_KEY, Some(&text))
}

/// Hints from the host app.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Hint {
    NetworkAvailable,
    NetworkLost,
    Foreground,
    Background,
}

/// What the API asks of the supervisor.
#[derive(Debug)]
pub(crate) enum Command {
    /// Something new is in the outbox.
    Pump,
    /// Send a live-only frame now, or answer `NotConnected`.
    Live {
        event: ClientEvent,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    /// Join or leave a room (already recorded in the store).
    Room {
        room_id: String,
        join: bool,
    },
    /// Pull entity changes now.
    PullEntities,
    /// Local edits were made: send them (in a batch) when connected.
    Reconcile,
    Hint(Hint),
    Reauthenticate,
    Metrics(oneshot::Sender<Result<ClientMetrics, ClientError>>),
    Shutdown(oneshot::Sender<()>),
}

/// What the spawned tasks report.
#[derive(Debug)]
enum Io {
    /// The WebSocket attempt failed (success arrives as `WsEvent::Opened`).
    WsFailed(u64, ConnectError),
    Token(Result<(), TokenError>),
    Poll(Result<bool, HttpError>),
    Resync(Result<(), HttpError>),
    /// An HTTP work item finished; `failure` when the server or network failed it.
    HttpDone {
        id: Option<String>,
        failure: Option<Failure>,
        /// When the item is due again, if it failed for now.
        retry_at: Option<chrono::DateTime<chrono::Utc>>,
        /// The answer broke the protocol.
        protocol_error: bool,
    },
    /// A reconcile ended: `Ok(true)` when it sent operations or brought changes.
    /// A reconcile or pull ended.
    Pulled(Result<Pulled, HttpError>),
    /// The catch-up of a connection opened without a cursor ended: `Ok(true)` when it
    /// reached the end of the log.
    CaughtUp(u64, Result<bool, HttpError>),
}

impl Io {
    /// True for a report of an answer that broke the protocol (garbage JSON, a 200
    /// with the wrong shape).
    fn protocol_error(&self) -> bool {
        let error = match self {
            Io::Poll(Err(e))
            | Io::Resync(Err(e))
            | Io::Pulled(Err(e))
            | Io::CaughtUp(_, Err(e)) => e,
            _ => return false,
        };
        matches!(error, HttpError::Protocol(_))
    }
}

/// What a reconcile or pull did.
#[derive(Debug)]
pub(crate) struct Pulled {
    /// Something changed (sent, pulled, or a conflict): pull again soon.
    changed: bool,
    /// Snapshots the server sent whose checksum did not match their data: refused,
    /// fetched again, counted as protocol errors.
    bad_snapshots: usize,
}

/// The supervisor's state. See the module docs.
pub(crate) struct Supervisor {
    cfg: ClientConfig,
    ws_url: String,
    /// TLS for `wss://` (shared with the HTTP client).
    tls: Arc<rustls::ClientConfig>,
    machine: Machine,
    store: StoreHandle,
    http: HttpApi,
    tokens: Arc<TokenCell>,
    updates: broadcast::Sender<Update>,
    state_tx: watch::Sender<ConnectionState>,
    clock: Arc<Mutex<ClockOffset>>,
    client_id: String,
    commands: mpsc::UnboundedReceiver<Command>,
    io_tx: mpsc::UnboundedSender<Io>,
    io_rx: mpsc::UnboundedReceiver<Io>,
    ws_tx: mpsc::UnboundedSender<(u64, WsEvent)>,
    ws_rx: mpsc::UnboundedReceiver<(u64, WsEvent)>,
    tasks: JoinSet<()>,
    ws: Option<WsHandle>,
    /// Generation of the current WebSocket attempt; reports of older ones are ignored.
    ws_gen: u64,
    /// Rooms a `join_room` frame was sent for on the current connection: each is sent
    /// once per connection (every join is answered with the room's presence, so a second
    /// one would report every member's presence twice).
    rooms_joined: HashSet<String>,
    /// The current attempt asked the server to resume from a cursor (`lastEventId`).
    /// Without one, the server's stream starts wherever the connection happens to be
    /// registered: what came before must be caught up by polling, after `connected`.
    ws_carried_cursor: bool,
    /// The generation whose `connected` starts a catch-up.
    catch_up_gen: Option<u64>,
    /// Messages sent over the WebSocket, awaiting their ack.
    ws_in_flight: HashMap<String, Instant>,
    /// Pings sent, for the clock offset.
    pings: HashMap<String, (Instant, chrono::DateTime<chrono::Utc>)>,
    /// HTTP work items in flight (message sends, transaction submissions and checks).
    http_in_flight: BTreeSet<String>,
    reconcile_in_flight: bool,
    /// Ops sent one per request after a batch was refused as invalid, to find the bad one.
    isolate_ops: bool,
    /// When entity changes were last pulled (`None`: pull at the next chance).
    last_pull: Option<Instant>,
    /// The wait between pulls: `entity_pull_interval`, doubled after each pull that
    /// found nothing new, up to `entity_pull_idle_max`; back to the start on any
    /// change, local edit or new connection.
    pull_interval: Duration,
    last_tx_check: Option<Instant>,
    /// Accepted transactions may be waiting for their decision: checked every
    /// `transaction_check_interval` until a look finds none undecided.
    tx_pending: bool,
    /// The earliest time an outbox item that failed for now is due again (items due
    /// at once are sent on the events that free their lane: acks, answers).
    outbox_due: Option<Instant>,
    /// Times the loop woke up (any event or deadline), for the energy figures.
    wakeups: u64,
    /// The store could not record a durable WebSocket delivery: until this time, such
    /// deliveries are not taken (the cursor did not move); then a catch-up from the
    /// cursor fetches them again.
    inbound_stalled: Option<Instant>,
    /// The wait before the next such catch-up.
    storage_retry: Duration,
    /// Storage failures met by the supervisor (inbound events, reconcile answers).
    storage_failures: u64,
    /// Answers and frames from the server that broke the protocol.
    protocol_errors: u64,
    /// When settled outbox items were last pruned.
    last_prune: Option<Instant>,
    /// Inbound streams must not interleave: the cursor only moves forward, so an event
    /// processed from one stream would make an older one of the other look like a
    /// replay. While a poll, a catch-up or a resync is processing events
    /// (`inbound_tasks` > 0), the WebSocket's durable deliveries wait here, then go
    /// through the same dedupe in their order.
    held_back: Vec<ServerEvent>,
    inbound_tasks: usize,
    shutdown: Option<oneshot::Sender<()>>,
}

fn now_wall() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

/// `now + wait` on the wall clock without overflow: a wait longer than
/// [`MAX_SERVER_DELAY`] (which no configured or clamped wait is) is cut to it.
fn wall_later(now: chrono::DateTime<chrono::Utc>, wait: Duration) -> chrono::DateTime<chrono::Utc> {
    let wait = chrono::Duration::from_std(wait.min(MAX_SERVER_DELAY)).unwrap_or_default();
    now.checked_add_signed(wait).unwrap_or(now)
}

/// The oldest settlement time still kept with a retention of `retention`: `None` when
/// nothing can be that old (a retention beyond the calendar, e.g. `u64::MAX` ms from
/// Swift's `UInt64.max`, means forever, not zero).
fn prune_before(
    now: chrono::DateTime<chrono::Utc>,
    retention: Duration,
) -> Option<chrono::DateTime<chrono::Utc>> {
    let retention = chrono::Duration::from_std(retention).ok()?;
    now.checked_sub_signed(retention)
}

impl Supervisor {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: ClientConfig,
        ws_url: String,
        tls: Arc<rustls::ClientConfig>,
        store: StoreHandle,
        tokens: Arc<TokenCell>,
        updates: broadcast::Sender<Update>,
        state_tx: watch::Sender<ConnectionState>,
        clock: Arc<Mutex<ClockOffset>>,
        client_id: String,
        commands: mpsc::UnboundedReceiver<Command>,
    ) -> Result<Self, HttpError> {
        let http = HttpApi::new(&cfg.server_url, cfg.request_timeout, tls.clone())?;
        let (io_tx, io_rx) = mpsc::unbounded_channel();
        let (ws_tx, ws_rx) = mpsc::unbounded_channel();
        Ok(Self {
            machine: Machine::new(cfg.machine.clone(), mono_now()),
            pull_interval: cfg.entity_pull_interval,
            cfg,
            ws_url,
            tls,
            store,
            http,
            tokens,
            updates,
            state_tx,
            clock,
            client_id,
            commands,
            io_tx,
            io_rx,
            ws_tx,
            ws_rx,
            tasks: JoinSet::new(),
            ws: None,
            ws_gen: 0,
            rooms_joined: HashSet::new(),
            ws_carried_cursor: false,
            catch_up_gen: None,
            ws_in_flight: HashMap::new(),
            pings: HashMap::new(),
            http_in_flight: BTreeSet::new(),
            reconcile_in_flight: false,
            isolate_ops: false,
            last_pull: None,
            last_tx_check: None,
            tx_pending: true,
            outbox_due: None,
            wakeups: 0,
            inbound_stalled: None,
            storage_retry: STORAGE_RETRY_MIN,
            storage_failures: 0,
            protocol_errors: 0,
            last_prune: None,
            held_back: Vec::new(),
            inbound_tasks: 0,
            shutdown: None,
        })
    }

    fn emit(&self, update: Update) {
        // No subscriber is fine: the store holds the truth.
        let _ = self.updates.send(update);
    }

    /// The loop: until shut down.
    pub(crate) async fn run(mut self) {
        self.machine.start(mono_now());
        loop {
            self.drain_actions().await;
            if self.machine.state() == ConnectionState::Closed {
                break;
            }
            // No fixed tick: the loop sleeps until the earliest thing it has to do.
            let deadline = self.next_deadline().map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => self.on_deadline().await,
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command).await,
                    // Every `Client` handle was dropped without `shutdown()`: stop too,
                    // rather than keep a store and sockets alive for no one.
                    None => self.machine.shutdown(mono_now()),
                },
                Some((generation, event)) = self.ws_rx.recv() => self.on_ws(generation, event).await,
                Some(io) = self.io_rx.recv() => self.on_io(io).await,
            }
            self.wakeups = self.wakeups.saturating_add(1);
            // Finished tasks are reaped here rather than woken up for: each reports on
            // a channel already.
            while self.tasks.try_join_next().is_some() {}
        }
        self.tasks.abort_all();
        // Closed before `shutdown()` returns, so that the API refuses new work at once.
        self.commands.close();
        if let Some(done) = self.shutdown.take() {
            let _ = done.send(());
        }
        info!(client_id = %self.client_id, "client shut down");
    }

    async fn drain_actions(&mut self) {
        while let Some(action) = self.machine.poll_action() {
            self.execute(action).await;
        }
    }

    async fn execute(&mut self, action: Action) {
        match action {
            Action::OpenWebSocket => self.open_ws().await,
            Action::CloseWebSocket => self.close_ws(),
            Action::SendPing => self.send_ping(),
            Action::Poll => self.spawn_poll().await,
            Action::Resync => self.spawn_resync(),
            Action::RefreshToken => {
                let tokens = self.tokens.clone();
                let io = self.io_tx.clone();
                self.tasks.spawn(async move {
                    let _ = io.send(Io::Token(tokens.refresh().await));
                });
            }
            // The route follows from the state when the items go (the WebSocket in
            // Realtime with the socket open, HTTP otherwise), not when the flush was asked.
            Action::Flush(_) => self.pump().await,
            Action::StateChanged(change) => {
                info!(from = ?change.from, to = ?change.to, reason = ?change.reason, "connection state");
                // The update first, then the watch: whoever saw the new state in the
                // watch and then subscribes does not get this change twice.
                self.emit(Update::State(StateUpdate {
                    from: change.from,
                    to: change.to,
                    reason: change.reason,
                    next_retry_in: change
                        .next_retry_at
                        .map(|t| t.saturating_duration_since(change.at)),
                }));
                let _ = self.state_tx.send(change.to);
                if change.to.is_connected() && !change.from.is_connected() {
                    // Some transport works again: catch up with entity changes and
                    // transaction outcomes too, and look for items due later.
                    self.last_pull = None;
                    self.pull_interval = self.cfg.entity_pull_interval;
                    self.tx_pending = true;
                    self.find_outbox_due().await;
                }
            }
        }
    }

    // ---- WebSocket ------------------------------------------------------------------------

    async fn open_ws(&mut self) {
        self.ws_gen = self.ws_gen.wrapping_add(1);
        self.rooms_joined.clear();
        let generation = self.ws_gen;
        let cursor = self
            .store
            .call(|s| s.cursor())
            .await
            .ok()
            .flatten()
            .map(|c| c.last_event_id);
        let mut url = format!("{}?clientId={}", self.ws_url, self.client_id);
        self.ws_carried_cursor = cursor.is_some();
        if let Some(cursor) = cursor {
            url.push_str(&format!("&lastEventId={cursor}"));
        }
        let tokens = self.tokens.clone();
        let io = self.io_tx.clone();
        let report = self.ws_tx.clone();
        let timeout = self.cfg.machine.connect_timeout;
        let max_frame = crate::protocol::envelope::DEFAULT_MAX_FRAME_BYTES;
        let tls = self.tls.clone();
        self.tasks.spawn(async move {
            let open = |token: String| {
                let (url, tls, report) = (&url, tls.clone(), report.clone());
                async move {
                    let params = ws::Params {
                        url,
                        token: &token,
                        max_frame,
                        timeout,
                        tls,
                    };
                    ws::open(params, generation, report).await
                }
            };
            let result = match tokens.get_tagged().await {
                Err(e) => Err(ConnectError::Failed(Failure::Auth, e.to_string())),
                // A token replaced while the upgrade was refused: once more with the
                // current one (as `with_token` does for HTTP).
                Ok((token, used)) => match open(token).await {
                    Err(ConnectError::Failed(Failure::Auth, why)) => {
                        match tokens.replaced_since(used).await {
                            Some(current) => open(current).await,
                            None => Err(ConnectError::Failed(Failure::Auth, why)),
                        }
                    }
                    other => other,
                },
            };
            if let Err(e) = result {
                let _ = io.send(Io::WsFailed(generation, e));
            }
        });
    }

    /// A poll, catch-up or resync finished processing: when none is left, the held
    /// WebSocket deliveries are processed, in order.
    async fn inbound_done(&mut self) {
        self.inbound_tasks = self.inbound_tasks.saturating_sub(1);
        if self.inbound_tasks > 0 {
            return;
        }
        let mut pending = std::mem::take(&mut self.held_back).into_iter();
        while let Some(event) = pending.next() {
            Box::pin(self.on_frame(event, None)).await;
            if self.inbound_tasks > 0 {
                // Another inbound task started meanwhile: the rest waits again, first.
                let mut rest: Vec<ServerEvent> = pending.collect();
                rest.append(&mut self.held_back);
                self.held_back = rest;
                return;
            }
        }
    }

    /// Catches up a connection that was opened without a cursor (first run, after a
    /// resync that found no events, or a cursor that only appeared while the
    /// connection was opening): polls from the cursor until the end of the log, while
    /// the connection's deliveries wait (held back). Started on `connected`, which the
    /// server sends once the connection is registered for deliveries, so that the
    /// polls are answered after that point: every event is in a page or delivered
    /// live (a catch-up started when the upgrade answered could be answered before
    /// the registration, and the events in between were lost).
    async fn catch_up(&mut self, generation: u64) {
        self.inbound_tasks = self.inbound_tasks.saturating_add(1);
        let (store, http, tokens, io, updates) = self.task_parts();
        self.tasks.spawn(async move {
            let mut result = Ok(false);
            for _ in 0..RESYNC_MAX_PAGES {
                match poll_once(&store, &http, &tokens, &updates).await {
                    Ok(true) => continue,
                    Ok(false) => {
                        result = Ok(true);
                        break;
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            let _ = io.send(Io::CaughtUp(generation, result));
        });
    }

    fn close_ws(&mut self) {
        // Abandons an attempt too: its reports carry an old generation.
        self.ws_gen = self.ws_gen.wrapping_add(1);
        self.rooms_joined.clear();
        // Not recorded, so not lost: the next connection resumes from the cursor.
        self.held_back.clear();
        if let Some(ws) = self.ws.take() {
            ws.close();
        }
        self.pings.clear();
    }

    fn send_frame(&mut self, event: &ClientEvent, reference: Option<&str>) -> bool {
        match &self.ws {
            Some(ws) => ws.send(event.encode(reference)),
            None => false,
        }
    }

    /// Sends `join_room` for `room_id` unless it was sent on this connection already.
    fn join_once(&mut self, room_id: String) {
        if self.rooms_joined.contains(&room_id) {
            return;
        }
        let event = ClientEvent::JoinRoom {
            room_id: room_id.clone(),
        };
        if self.send_frame(&event, None) {
            self.rooms_joined.insert(room_id);
        }
    }

    fn send_ping(&mut self) {
        let reference = uuid::Uuid::now_v7().to_string();
        if self.send_frame(&ClientEvent::Ping, Some(&reference)) {
            self.pings.insert(reference, (mono_now(), now_wall()));
        }
    }

    async fn on_ws(&mut self, generation: u64, event: WsEvent) {
        let now = mono_now();
        if let WsEvent::Opened(handle) = event {
            if generation != self.ws_gen {
                handle.close(); // an abandoned attempt: close what it opened
                return;
            }
            self.ws = Some(handle);
            self.machine.on_ws_open(now);
            self.catch_up_gen = (!self.ws_carried_cursor).then_some(generation);
            return;
        }
        if generation != self.ws_gen || self.ws.is_none() {
            return;
        }
        match event {
            WsEvent::Opened(_) => {}
            WsEvent::Activity => self.machine.on_ws_activity(now),
            WsEvent::Undecodable(e) => {
                self.protocol_errors = self.protocol_errors.saturating_add(1);
                self.machine.on_ws_activity(now);
                warn!(error = %e, "undecodable frame ignored");
            }
            WsEvent::Closed(kind, reason) => {
                info!(%reason, "WebSocket closed");
                self.ws = None;
                self.held_back.clear();
                self.requeue_ws_in_flight("the connection closed before the ack")
                    .await;
                self.machine.on_ws_closed(now, kind);
            }
            WsEvent::Frame(event, reference) => {
                self.machine.on_ws_activity(now);
                self.on_frame(*event, reference).await;
            }
        }
    }

    async fn on_frame(&mut self, event: ServerEvent, reference: Option<String>) {
        if self.inbound_tasks > 0
            && matches!(event, ServerEvent::Message(_) | ServerEvent::Event(_))
        {
            self.held_back.push(event);
            return;
        }
        match event {
            ServerEvent::Connected(c) => {
                if self.catch_up_gen.take() == Some(self.ws_gen) {
                    self.catch_up(self.ws_gen).await;
                }
                // Clamped by the machine: a hostile interval neither floods nor stops
                // the heartbeat.
                self.machine
                    .set_ping_interval(Duration::from_millis(c.ping_interval));
                let sent = now_wall();
                if let Ok(mut clock) = self.clock.lock() {
                    clock.sample(sent, Duration::ZERO, c.server_time);
                }
                // Rooms belong to the user on the server; joining again is harmless
                // and makes sure intents made offline take effect.
                if let Ok(rooms) = self.store.call(load_rooms).await {
                    for room_id in rooms {
                        self.join_once(room_id);
                    }
                }
            }
            ServerEvent::Message(m) => self.on_inbound_message(m).await,
            ServerEvent::Event(e) => self.on_inbound_event(e).await,
            ServerEvent::Presence(p) => self.emit(Update::Presence(p)),
            ServerEvent::MessageAck(ack) => {
                self.ws_in_flight.remove(&ack.message_id);
                let id = ack.message_id.clone();
                let server_ref = ack.sequence.map(|s| s.to_string());
                let now = now_wall();
                match self
                    .store
                    .call(move |s| s.mark_accepted(&id, server_ref.as_deref(), now))
                    .await
                {
                    Ok(item) => self.emit(Update::Outbox((&item).into())),
                    Err(e) => debug!(error = %e, "ack for an item not in the outbox"),
                }
                self.pump().await;
            }
            ServerEvent::RoomJoined { room_id } => self.emit(Update::Room {
                room_id,
                joined: true,
                error: None,
            }),
            ServerEvent::RoomLeft { room_id } => self.emit(Update::Room {
                room_id,
                joined: false,
                error: None,
            }),
            ServerEvent::Resumed {
                last_event_id,
                replayed,
            } => debug!(?last_event_id, replayed, "resumed"),
            ServerEvent::Pong { server_time } => {
                if let Some((sent_at, sent_wall)) =
                    reference.as_ref().and_then(|r| self.pings.remove(r))
                    && let Ok(mut clock) = self.clock.lock()
                {
                    clock.sample(
                        sent_wall,
                        mono_now().saturating_duration_since(sent_at),
                        server_time,
                    );
                }
            }
            ServerEvent::Error(body) => self.on_ws_error(body, reference).await,
            ServerEvent::Unknown { event, .. } => debug!(%event, "unknown event ignored"),
        }
    }

    async fn on_ws_error(&mut self, body: ErrorBody, reference: Option<String>) {
        let reference = reference.or_else(|| body.reference.clone());
        warn!(code = ?body.code, error = %body.error, ?reference, "server refused a frame");
        if body.code == ErrorCode::CursorExpired {
            self.machine.on_cursor_expired(mono_now());
            return;
        }
        let Some(id) = reference else { return };
        if self.ws_in_flight.remove(&id).is_some() {
            let retry_after = retry_after_detail(&body);
            let permanent = matches!(
                body.code,
                ErrorCode::InvalidRequest
                    | ErrorCode::AuthzFailed
                    | ErrorCode::TenantViolation
                    | ErrorCode::PayloadTooLarge
                    | ErrorCode::RealtimeNotAllowed
                    | ErrorCode::NotFound
            );
            let reason = format!("{}: {}", body.code, body.error);
            let now = now_wall();
            let result = if permanent {
                self.store
                    .call(move |s| s.mark_dead(&id, &reason, now))
                    .await
            } else {
                let wait = retry_after.unwrap_or_else(|| item_backoff(1));
                let at = wall_later(now, wait);
                self.note_outbox_due(at);
                self.store
                    .call(move |s| s.mark_failed(&id, &reason, at, now))
                    .await
            };
            if let Ok(item) = result {
                self.emit(Update::Outbox((&item).into()));
            }
        } else if matches!(body.code, ErrorCode::AuthzFailed) {
            // A refused join (room policy): tell the app and stop re-joining it.
            if let Some(room_id) = body
                .details
                .as_ref()
                .and_then(|d| d.get("roomId"))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
            {
                let room = room_id.clone();
                let _ = self
                    .store
                    .call(move |s| {
                        let mut rooms = load_rooms(s)?;
                        rooms.remove(&room);
                        save_rooms(s, &rooms)
                    })
                    .await;
                self.emit(Update::Room {
                    room_id,
                    joined: false,
                    error: Some(body.error),
                });
            }
        }
    }

    async fn requeue_ws_in_flight(&mut self, reason: &str) {
        let ids: Vec<String> = self.ws_in_flight.drain().map(|(id, _)| id).collect();
        if ids.is_empty() {
            return;
        }
        let reason = reason.to_owned();
        let now = now_wall();
        let requeued = self
            .store
            .call(move |s| {
                for id in ids {
                    // Already accepted through another path (or still `persisted`:
                    // WebSocket sends are in flight in memory only): nothing to do.
                    let _ = s.mark_failed(&id, &reason, now, now);
                }
                Ok(())
            })
            .await;
        if let Err(e) = requeued {
            // They are `persisted` in the store anyway and go again on the next flush.
            warn!(error = %e, "could not requeue unacknowledged sends");
        }
    }

    // ---- inbound --------------------------------------------------------------------------

    async fn on_inbound_message(&mut self, m: WebSocketMessage) {
        match (&m.event_id, m.interaction_class.is_durable()) {
            (Some(event_id), true) => {
                if self.inbound_stalled.is_some() {
                    return; // fetched again from the cursor once the store takes it
                }
                let event_id = event_id.clone();
                let result =
                    process_inbound(&self.store, event_id, m.sequence, Update::Message(m)).await;
                self.on_inbound_result(result);
            }
            // Live (Class A), or a server that did not make it durable: as it comes.
            _ => self.emit(Update::Message(m)),
        }
    }

    async fn on_inbound_event(&mut self, e: Event) {
        if self.inbound_stalled.is_some() {
            return; // fetched again from the cursor once the store takes it
        }
        let result = process_event(&self.store, e).await;
        self.on_inbound_result(result);
    }

    /// Emits what a durable inbound item gave, or, when the store could not record it,
    /// stops taking durable deliveries from the WebSocket: the cursor stayed before
    /// it, so a catch-up from the cursor fetches it (and what follows) again, after
    /// `storage_retry`, doubling while the store keeps failing.
    fn on_inbound_result(&mut self, result: Result<Vec<Update>, ClientError>) {
        match result {
            Ok(updates) => {
                for u in updates {
                    self.emit(u);
                }
            }
            Err(e) => self.stall_inbound(&e),
        }
    }

    fn stall_inbound(&mut self, error: &ClientError) {
        self.storage_failures = self.storage_failures.saturating_add(1);
        // Not recorded, so not lost: the catch-up fetches them again.
        self.held_back.clear();
        if self.inbound_stalled.is_none() {
            warn!(error = %error, retry_in = ?self.storage_retry, "could not record an inbound event; fetching again later");
            self.inbound_stalled = Some(later(mono_now(), self.storage_retry));
            self.storage_retry = self.storage_retry.saturating_mul(2).min(STORAGE_RETRY_MAX);
        }
    }

    // ---- polling and resync ---------------------------------------------------------------

    async fn spawn_poll(&mut self) {
        self.inbound_tasks = self.inbound_tasks.saturating_add(1);
        let store = self.store.clone();
        let http = self.http.clone();
        let tokens = self.tokens.clone();
        let io = self.io_tx.clone();
        let updates = self.updates.clone();
        self.tasks.spawn(async move {
            let result = poll_once(&store, &http, &tokens, &updates).await;
            let _ = io.send(Io::Poll(result));
        });
    }

    fn spawn_resync(&mut self) {
        self.inbound_tasks = self.inbound_tasks.saturating_add(1);
        let store = self.store.clone();
        let http = self.http.clone();
        let tokens = self.tokens.clone();
        let io = self.io_tx.clone();
        let updates = self.updates.clone();
        let client_id = self.client_id.clone();
        self.tasks.spawn(async move {
            let result = resync(&store, &http, &tokens, &updates, &client_id).await;
            let _ = io.send(Io::Resync(result));
        });
    }

    // ---- outbound -------------------------------------------------------------------------

    /// Sends what can be sent now: messages over the WebSocket in Realtime (socket open),
    /// over HTTP otherwise; transactions always over HTTP; operations in batches
    /// elsewhere ([`Self::spawn_reconcile`]).
    async fn pump(&mut self) {
        let state = self.machine.state();
        if !state.is_connected() {
            return;
        }
        let realtime = state == ConnectionState::Realtime && self.ws.is_some();
        let window = self.cfg.send_window.max(1);
        let now = now_wall();
        let heads = match self
            .store
            .call(move |s| s.next_sendable(now, window.saturating_mul(4)))
            .await
        {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, "outbox read failed");
                return;
            }
        };
        for item in heads {
            match item.kind {
                ItemKind::Message if realtime => {
                    // A head already on the wire keeps its lane waiting for the ack.
                    if self.ws_in_flight.contains_key(&item.id) || self.ws_in_flight.len() >= window
                    {
                        continue;
                    }
                    self.send_over_ws(item).await;
                }
                ItemKind::Message => {
                    if self.http_in_flight.len() < HTTP_SEND_WINDOW {
                        self.send_over_http(item).await;
                    }
                }
                ItemKind::Transaction => {
                    if self.http_in_flight.len() < HTTP_SEND_WINDOW {
                        self.submit_transaction(item).await;
                    }
                }
                // Operations go in batches to the reconcile endpoint (on an edit, and
                // on the tick), not one by one.
                ItemKind::Operation => {}
            }
        }
    }

    /// Reads a message item's body and marks it in flight; `None` when it cannot be
    /// sent (an unreadable body makes it dead; a refused transition leaves it).
    async fn start_message(&mut self, item: &OutboxItem) -> Option<(SendMessage, OutboxItem)> {
        let message: SendMessage = match serde_json::from_value(item.body.clone()) {
            Ok(m) => m,
            Err(e) => {
                self.kill(&item.id, format!("unreadable message body: {e}"))
                    .await;
                return None;
            }
        };
        let id = item.id.clone();
        let now = now_wall();
        let sent = self
            .store
            .call(move |s| s.mark_in_flight(&id, now))
            .await
            .ok()?;
        Some((message, sent))
    }

    /// Sends a message over the WebSocket. Its "in flight" state is kept in memory only
    /// (the store still says `persisted`): a crash resends it with the same id, which
    /// is what recovering `in_flight` at open would do anyway, and the send costs no
    /// commit (no fsync). The ack commits `accepted`.
    async fn send_over_ws(&mut self, item: OutboxItem) {
        let message: SendMessage = match serde_json::from_value(item.body.clone()) {
            Ok(m) => m,
            Err(e) => {
                self.kill(&item.id, format!("unreadable message body: {e}"))
                    .await;
                return;
            }
        };
        if self.send_frame(&ClientEvent::Message(message), Some(&item.id)) {
            self.ws_in_flight.insert(item.id.clone(), mono_now());
            let mut update = OutboxUpdate::from(&item);
            update.state = ItemState::InFlight;
            self.emit(Update::Outbox(update));
        }
    }

    async fn kill(&mut self, id: &str, reason: String) {
        let id = id.to_owned();
        let now = now_wall();
        if let Ok(item) = self
            .store
            .call(move |s| s.mark_dead(&id, &reason, now))
            .await
        {
            self.emit(Update::Outbox((&item).into()));
        }
    }

    async fn send_over_http(&mut self, item: OutboxItem) {
        let Some((message, sent)) = self.start_message(&item).await else {
            return;
        };
        self.emit(Update::Outbox((&sent).into()));
        self.http_in_flight.insert(item.id.clone());
        let (store, http, tokens, io, updates) = self.task_parts();
        self.tasks.spawn(async move {
            let result = with_token(&tokens, |token| {
                let (http, message) = (&http, &message);
                async move { http.post_message(&token, message).await }
            })
            .await;
            let protocol_error = matches!(result, Err(HttpError::Protocol(_)));
            let (failure, retry_at) = settle_http(
                &store,
                &updates,
                &sent,
                result.map(|a| a.sequence.to_string()),
            )
            .await;
            let _ = io.send(Io::HttpDone {
                id: Some(sent.id.clone()),
                failure,
                retry_at,
                protocol_error,
            });
        });
    }

    async fn submit_transaction(&mut self, item: OutboxItem) {
        let request: TransactionRequest = match serde_json::from_value(item.body.clone()) {
            Ok(r) => r,
            Err(e) => {
                self.kill(&item.id, format!("unreadable transaction body: {e}"))
                    .await;
                return;
            }
        };
        let id = item.id.clone();
        let now = now_wall();
        let Ok(sent) = self.store.call(move |s| s.mark_in_flight(&id, now)).await else {
            return;
        };
        self.http_in_flight.insert(item.id.clone());
        // Its decision is checked for until it comes.
        self.tx_pending = true;
        let (store, http, tokens, io, updates) = self.task_parts();
        self.tasks.spawn(async move {
            let result = with_token(&tokens, |token| {
                let (http, id, request) = (&http, &sent.id, &request);
                async move { http.submit_transaction(&token, id, request).await }
            })
            .await;
            let accepted = result.as_ref().ok().map(|a| a.transaction_id.clone());
            let protocol_error = matches!(result, Err(HttpError::Protocol(_)));
            let (failure, retry_at) =
                settle_http(&store, &updates, &sent, result.map(|a| a.transaction_id)).await;
            if let Some(transaction_id) = accepted {
                let _ = updates.send(Update::Transaction(TransactionUpdate {
                    id: sent.id.clone(),
                    transaction_id: Some(transaction_id),
                    status: TransactionState::Pending,
                    reason: None,
                }));
            }
            let _ = io.send(Io::HttpDone {
                id: Some(sent.id.clone()),
                failure,
                retry_at,
                protocol_error,
            });
        });
    }

    /// Checks the status of accepted, undecided transactions (events may have been
    /// missed while offline; the status endpoint is the truth).
    async fn check_transactions(&mut self) {
        let Ok(undecided) = self.store.call(|s| s.undecided_transactions()).await else {
            return;
        };
        if undecided.is_empty() && self.http_in_flight.is_empty() {
            // Nothing to wait for: no more checks until a transaction is submitted. Not
            // while HTTP work is out: a submission in flight is not accepted yet, and
            // once accepted (its answer may even have been lost and resent) its
            // decision is checked for like any other.
            self.tx_pending = false;
        }
        for item in undecided {
            let Some(transaction_id) = item.server_ref.clone() else {
                continue;
            };
            let key = format!("check:{}", item.id);
            if self.http_in_flight.contains(&key) || self.http_in_flight.len() >= HTTP_SEND_WINDOW {
                continue;
            }
            self.http_in_flight.insert(key.clone());
            let (store, http, tokens, io, updates) = self.task_parts();
            self.tasks.spawn(async move {
                let mut failure = None;
                let mut protocol_error = false;
                let status = with_token(&tokens, |token| {
                    let (http, transaction_id) = (&http, &transaction_id);
                    async move { http.transaction_status(&token, transaction_id).await }
                })
                .await;
                match status {
                    Ok(status) => {
                        for u in settle_transaction(&store, &item.id, status).await {
                            let _ = updates.send(u);
                        }
                    }
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => {
                        protocol_error = matches!(e, HttpError::Protocol(_));
                        failure = Some(e.failure());
                    }
                }
                let _ = io.send(Io::HttpDone {
                    id: Some(key),
                    failure,
                    retry_at: None,
                    protocol_error,
                });
            });
        }
    }

    fn task_parts(
        &self,
    ) -> (
        StoreHandle,
        HttpApi,
        Arc<TokenCell>,
        mpsc::UnboundedSender<Io>,
        broadcast::Sender<Update>,
    ) {
        (
            self.store.clone(),
            self.http.clone(),
            self.tokens.clone(),
            self.io_tx.clone(),
            self.updates.clone(),
        )
    }

    /// Sends pending entity operations (a batch) or, when `pull` and none are pending,
    /// asks for the entity changes since the last pull.
    async fn spawn_reconcile(&mut self, pull: bool) {
        if self.reconcile_in_flight || !self.machine.state().is_connected() {
            return;
        }
        let limit = if self.isolate_ops {
            1
        } else {
            self.cfg.reconcile_batch.max(1)
        };
        let now = now_wall();
        let Ok(ops) = self
            .store
            .call(move |s| {
                // One reconcile at a time: an operation still in flight now is left from
                // one whose answer could not be stored (nor the operation requeued).
                for stale in s.list(Some(ItemState::InFlight))? {
                    if stale.kind == ItemKind::Operation {
                        s.mark_failed(&stale.id, "requeued after a failed reconcile", now, now)?;
                    }
                }
                let items: Vec<OutboxItem> = s
                    .list(Some(ItemState::Persisted))?
                    .into_iter()
                    .filter(|i| i.kind == ItemKind::Operation && i.next_attempt_at <= now)
                    .take(limit)
                    .collect();
                let mut taken = Vec::with_capacity(items.len());
                for item in &items {
                    taken.push(s.mark_in_flight(&item.id, now)?);
                }
                Ok(taken)
            })
            .await
        else {
            return;
        };
        if ops.is_empty() && !pull {
            return;
        }
        self.reconcile_in_flight = true;
        self.last_pull = Some(mono_now());
        let (store, http, tokens, io, updates) = self.task_parts();
        let client_id = self.client_id.clone();
        let isolate = self.isolate_ops;
        self.tasks.spawn(async move {
            let result =
                reconcile(&store, &http, &tokens, &updates, &client_id, ops, isolate).await;
            let _ = io.send(Io::Pulled(result));
        });
    }

    // ---- reports --------------------------------------------------------------------------

    async fn on_io(&mut self, io: Io) {
        let now = mono_now();
        if io.protocol_error() {
            self.protocol_errors = self.protocol_errors.saturating_add(1);
        }
        match io {
            Io::WsFailed(generation, error) => {
                if generation != self.ws_gen {
                    return; // an abandoned attempt
                }
                match error {
                    ConnectError::CursorExpired => {
                        // The poll that follows gets the same answer and starts the resync.
                        self.machine.on_ws_failed(now, Failure::Server);
                    }
                    ConnectError::Failed(failure, reason) => {
                        debug!(%reason, "WebSocket attempt failed");
                        self.machine.on_ws_failed(now, failure);
                    }
                }
            }
            Io::Token(Ok(())) => self.machine.on_token(now),
            Io::Token(Err(e)) => {
                warn!(error = %e, "the token provider gave no token");
                self.machine.on_token_unavailable(now);
            }
            Io::Poll(Ok(more)) => {
                self.inbound_done().await;
                self.machine.on_poll_ok(now, more);
            }
            Io::Poll(Err(HttpError::Storage(e))) => {
                // The server answered; the store could not take the page. The cursor did
                // not move: the next poll fetches it again.
                warn!(error = %e, "could not record polled events");
                self.storage_failures = self.storage_failures.saturating_add(1);
                self.inbound_done().await;
                self.machine.on_poll_ok(now, false);
            }
            Io::Poll(Err(e)) if e.code() == Some(ErrorCode::CursorExpired) => {
                self.inbound_done().await;
                self.machine.on_poll_cursor_expired(now);
            }
            Io::Poll(Err(e)) => {
                debug!(error = %e, "poll failed");
                self.inbound_done().await;
                self.machine.on_poll_failed(now, e.failure());
            }
            Io::Resync(Ok(())) => {
                self.inbound_done().await;
                self.machine.on_resync_done(now);
            }
            Io::Resync(Err(e)) => {
                warn!(error = %e, "resync failed");
                self.inbound_done().await;
                self.machine.on_resync_failed(now, e.failure());
            }
            Io::HttpDone {
                id,
                failure,
                retry_at,
                protocol_error,
            } => {
                if protocol_error {
                    self.protocol_errors = self.protocol_errors.saturating_add(1);
                }
                if let Some(id) = id {
                    self.http_in_flight.remove(&id);
                }
                if let Some(at) = retry_at {
                    self.note_outbox_due(at);
                }
                match failure {
                    Some(f) => self.machine.on_http_failed(now, f),
                    None => self.machine.on_http_ok(now),
                }
                // A slot is free: what waited for it goes now (a refused item's lane
                // goes on too).
                self.pump().await;
            }
            Io::CaughtUp(generation, Err(HttpError::Storage(e))) => {
                // The connection is fine; the store is not: try again later, keeping it.
                if generation == self.ws_gen {
                    self.inbound_tasks = self.inbound_tasks.saturating_sub(1);
                    self.stall_inbound(&e);
                } else {
                    self.inbound_done().await;
                }
            }
            Io::CaughtUp(generation, result) => match result {
                Err(_) | Ok(false) if generation == self.ws_gen => {
                    // Without the whole catch-up the held deliveries could skip
                    // events: drop them and the connection; the next one resumes from
                    // the cursor (or catches up again).
                    match result {
                        Err(e) => warn!(error = %e, "catch-up failed; reconnecting"),
                        Ok(_) => warn!("catch-up did not reach the end; reconnecting"),
                    }
                    self.inbound_tasks = self.inbound_tasks.saturating_sub(1);
                    self.close_ws();
                    self.machine
                        .on_ws_closed(now, crate::machine::CloseKind::Lost);
                }
                _ => {
                    if generation == self.ws_gen && matches!(result, Ok(true)) {
                        self.storage_retry = STORAGE_RETRY_MIN;
                    }
                    self.inbound_done().await;
                }
            },
            Io::Pulled(result) => {
                self.reconcile_in_flight = false;
                let bad_snapshots = result.as_ref().map_or(0, |p| p.bad_snapshots);
                if bad_snapshots > 0 {
                    warn!(
                        bad_snapshots,
                        "the server sent snapshots whose checksum does not match their data"
                    );
                    self.protocol_errors = self
                        .protocol_errors
                        .saturating_add(u64::try_from(bad_snapshots).unwrap_or(u64::MAX));
                }
                match result {
                    Ok(Pulled { changed, .. }) => {
                        self.isolate_ops = false;
                        self.pull_interval = if changed {
                            self.cfg.entity_pull_interval
                        } else {
                            // Nothing new: pull less often while idle.
                            self.pull_interval
                                .saturating_mul(2)
                                .min(self.cfg.entity_pull_idle_max)
                                .max(self.cfg.entity_pull_interval)
                        };
                        self.machine.on_http_ok(now);
                        self.spawn_reconcile(false).await;
                    }
                    Err(e) => {
                        if let HttpError::Storage(error) = &e {
                            // Not the server's fault: the connection state stays.
                            warn!(%error, "could not store a reconcile answer");
                            self.storage_failures = self.storage_failures.saturating_add(1);
                        } else if e.is_permanent() {
                            // One bad operation must not hold back the others: isolate it.
                            self.isolate_ops = true;
                        } else {
                            self.machine.on_http_failed(now, e.failure());
                        }
                        // The operations went back to the queue, due a little later.
                        // (at the earliest; the store says when the next one is due)
                        self.note_outbox_due(wall_later(now_wall(), ITEM_RETRY_MIN));
                    }
                }
            }
        }
    }

    /// The earliest time something is due: the machine's timers, an unacknowledged
    /// WebSocket send, pruning, and, while connected, an outbox item due again, the next
    /// entity pull and (only while one is undecided) the next transaction check. `None`:
    /// nothing until an event.
    fn next_deadline(&self) -> Option<Instant> {
        let mut deadlines = vec![self.machine.poll_timeout()];
        deadlines.push(
            self.ws_in_flight
                .values()
                .min()
                .map(|sent| later(*sent, self.cfg.ack_timeout)),
        );
        if let Some(retention) = self.cfg.settled_retention {
            let interval = prune_interval(retention);
            deadlines.push(Some(
                self.last_prune
                    .map_or_else(mono_now, |t| later(t, interval)),
            ));
        }
        if self.machine.state().is_connected() {
            deadlines.push(self.inbound_stalled);
            deadlines.push(self.outbox_due);
            if !self.reconcile_in_flight {
                deadlines.push(Some(
                    self.last_pull
                        .map_or_else(mono_now, |t| later(t, self.pull_interval)),
                ));
            }
            if self.tx_pending {
                deadlines.push(Some(self.last_tx_check.map_or_else(mono_now, |t| {
                    later(t, self.cfg.transaction_check_interval)
                })));
            }
        }
        deadlines.into_iter().flatten().min()
    }

    /// Does what is due at a deadline (see [`Self::next_deadline`]).
    async fn on_deadline(&mut self) {
        let now = mono_now();
        if self.machine.poll_timeout().is_some_and(|t| t <= now) {
            self.machine.handle_timeout(now);
        }
        // Unacknowledged WebSocket sends: try again (same id; the server dedupes).
        let stale: Vec<String> = self
            .ws_in_flight
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) >= self.cfg.ack_timeout)
            .map(|(id, _)| id.clone())
            .collect();
        let resend = !stale.is_empty();
        if resend {
            for id in &stale {
                self.ws_in_flight.remove(id);
            }
            let wall = now_wall();
            let requeued = self
                .store
                .call(move |s| {
                    for id in stale {
                        // Already accepted through another path: nothing to do.
                        let _ = s.mark_failed(&id, "no ack in time", wall, wall);
                    }
                    Ok(())
                })
                .await;
            if let Err(e) = requeued {
                warn!(error = %e, "could not requeue unacknowledged sends");
            }
        }
        self.prune_settled(now).await;
        if !self.machine.state().is_connected() {
            return;
        }
        if self.inbound_stalled.is_some_and(|t| t <= now) {
            self.inbound_stalled = None;
            // Fetch what the store could not take, from the cursor (a connection that
            // polls does so anyway).
            if self.ws.is_some() && self.machine.state() == ConnectionState::Realtime {
                self.catch_up(self.ws_gen).await;
            }
        }
        let outbox_due = self.outbox_due.is_some_and(|t| t <= now);
        if outbox_due {
            self.outbox_due = None;
        }
        if resend || outbox_due {
            self.pump().await;
        }
        if self
            .last_pull
            .is_none_or(|t| now.saturating_duration_since(t) >= self.pull_interval)
        {
            // Set here too: a pull that could not start is not tried again at once.
            self.last_pull = Some(now);
            self.spawn_reconcile(true).await;
        } else if outbox_due {
            self.spawn_reconcile(false).await;
        }
        if outbox_due {
            self.find_outbox_due().await;
        }
        if self.tx_pending
            && self.last_tx_check.is_none_or(|t| {
                now.saturating_duration_since(t) >= self.cfg.transaction_check_interval
            })
        {
            self.last_tx_check = Some(now);
            self.check_transactions().await;
        }
    }

    /// An outbox item is due again at `at`: wake up then (if nothing else sends it).
    fn note_outbox_due(&mut self, at: chrono::DateTime<chrono::Utc>) {
        let at = instant_of(at);
        self.outbox_due = Some(self.outbox_due.map_or(at, |t| t.min(at)));
    }

    /// Looks in the store for the next item due later than now (left by an earlier run,
    /// or failed while another was due), so that it is not waited for in vain.
    async fn find_outbox_due(&mut self) {
        let wall = now_wall();
        match self.store.call(move |s| s.next_attempt_after(wall)).await {
            Ok(Some(at)) => self.note_outbox_due(at),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "outbox read failed"),
        }
    }

    /// Deletes outbox items settled longer ago than `settled_retention` (accepted
    /// messages and operations, decided transactions), every `PRUNE_INTERVAL`, so that
    /// the outbox holds what is still to do plus a recent history, not everything ever
    /// sent. Dead items and undecided transactions are never pruned.
    async fn prune_settled(&mut self, now: Instant) {
        let Some(retention) = self.cfg.settled_retention else {
            return;
        };
        let interval = prune_interval(retention);
        if self
            .last_prune
            .is_some_and(|t| now.saturating_duration_since(t) < interval)
        {
            return;
        }
        self.last_prune = Some(now);
        let Some(before) = prune_before(now_wall(), retention) else {
            return; // kept forever
        };
        match self.store.call(move |s| s.prune_settled(before)).await {
            Ok(0) => {}
            Ok(n) => debug!(pruned = n, "settled outbox items pruned"),
            Err(e) => warn!(error = %e, "pruning settled outbox items failed"),
        }
    }

    async fn on_command(&mut self, command: Command) {
        let now = mono_now();
        match command {
            Command::Pump => self.pump().await,
            Command::Live { event, reply } => {
                let sent = self.machine.state() == ConnectionState::Realtime
                    && self.send_frame(&event, None);
                let _ = reply.send(if sent {
                    Ok(())
                } else {
                    Err(ClientError::NotConnected)
                });
            }
            // Offline: the intent is stored and applied on the next connection.
            Command::Room {
                room_id,
                join: true,
            } => self.join_once(room_id),
            Command::Room {
                room_id,
                join: false,
            } => {
                self.rooms_joined.remove(&room_id);
                self.send_frame(&ClientEvent::LeaveRoom { room_id }, None);
            }
            Command::PullEntities => {
                self.pull_interval = self.cfg.entity_pull_interval;
                self.spawn_reconcile(true).await;
            }
            Command::Reconcile => {
                // Someone is editing: pull at the short interval again.
                self.pull_interval = self.cfg.entity_pull_interval;
                self.spawn_reconcile(false).await;
            }
            Command::Hint(Hint::NetworkAvailable) => self.machine.network_available(now),
            Command::Hint(Hint::NetworkLost) => self.machine.network_lost(now),
            Command::Hint(Hint::Foreground) => {
                // Back in front of the user: fresh entities soon.
                self.pull_interval = self.cfg.entity_pull_interval;
                self.machine.foreground(now);
            }
            Command::Hint(Hint::Background) => self.machine.background(now),
            Command::Reauthenticate => {
                let tokens = self.tokens.clone();
                let io = self.io_tx.clone();
                self.tasks.spawn(async move {
                    let _ = io.send(Io::Token(tokens.refresh().await));
                });
            }
            Command::Metrics(reply) => {
                let _ = reply.send(self.metrics().await);
            }
            Command::Shutdown(reply) => {
                self.shutdown = Some(reply);
                self.machine.shutdown(now);
            }
        }
    }

    async fn metrics(&self) -> Result<ClientMetrics, ClientError> {
        let items = self.store.call(|s| s.list(None)).await?;
        let pending: Vec<&OutboxItem> = items
            .iter()
            .filter(|i| {
                matches!(
                    i.state,
                    ItemState::Persisted | ItemState::InFlight | ItemState::Dead
                )
            })
            .collect();
        let now = now_wall();
        Ok(ClientMetrics {
            state: self.machine.state(),
            outbox_items: pending.len(),
            outbox_bytes: pending.iter().map(|i| i.bytes).sum(),
            oldest_item_age: pending
                .iter()
                .map(|i| i.created_at)
                .min()
                .and_then(|t| now.signed_duration_since(t).to_std().ok()),
            max_attempts: pending.iter().map(|i| i.attempts).max().unwrap_or(0),
            dead_items: pending
                .iter()
                .filter(|i| i.state == ItemState::Dead)
                .count(),
            time_in_states: self.machine.time_in_states(mono_now()).to_vec(),
            supervisor_wakeups: self.wakeups,
            storage_failures: self.storage_failures,
            protocol_errors: self.protocol_errors,
            clock_offset_ms: self.clock.lock().ok().and_then(|c| c.offset_ms()),
            retry_attempts: self.machine.retry_attempts(),
        })
    }
}

// ---- work done in tasks (free functions: no supervisor state) -----------------------------

/// Records one durable inbound item and returns what the app should hear (nothing when it
/// was seen before). Own messages (sent by this installation) are recorded, not repeated.
async fn process_inbound(
    store: &StoreHandle,
    event_id: String,
    sequence: Option<u64>,
    update: Update,
) -> Result<Vec<Update>, ClientError> {
    let own_id = match &update {
        Update::Message(m) => Some(m.message_id.clone()),
        _ => None,
    };
    let now = now_wall();
    let result = store
        .call(move |s| {
            let new = s.record_inbound(&event_id, sequence, now)?;
            let own = match &own_id {
                Some(id) => s.get(id)?.is_some(),
                None => false,
            };
            Ok(new && !own)
        })
        .await;
    // Not recorded (`Err`): the cursor did not move; the caller makes sure it is
    // fetched again (resume, poll or catch-up) before anything after it.
    Ok(if result? { vec![update] } else { Vec::new() })
}

/// Records one durable bus event (a message, a transaction outcome, or an app event).
async fn process_event(store: &StoreHandle, e: Event) -> Result<Vec<Update>, ClientError> {
    let event_id = e.event_id.clone();
    let sequence = e.sequence;
    if e.event_type == MESSAGE_EVENT_TYPE {
        return match e.message() {
            Some(Ok(m)) => process_inbound(store, event_id, sequence, Update::Message(m)).await,
            _ => {
                warn!(%event_id, "a message event without a readable message");
                process_inbound(store, event_id, sequence, Update::Event(e)).await
            }
        };
    }
    if matches!(
        e.event_type.as_str(),
        "transaction.confirmed" | "transaction.rejected"
    ) && let Ok(status) = serde_json::from_value::<TransactionStatus>(e.payload.clone())
    {
        let mut out = process_inbound(store, event_id, sequence, Update::Event(e)).await?;
        let transaction_id = status.transaction_id.clone();
        let item = store
            .call(move |s| s.find_by_server_ref(ItemKind::Transaction, &transaction_id))
            .await
            .ok()
            .flatten();
        if let Some(item) = item {
            out.extend(settle_transaction(store, &item.id, status).await);
        }
        return Ok(out);
    }
    process_inbound(store, event_id, sequence, Update::Event(e)).await
}

/// Applies a transaction's status to its outbox item; the update when it changed.
async fn settle_transaction(
    store: &StoreHandle,
    id: &str,
    status: TransactionStatus,
) -> Vec<Update> {
    let id = id.to_owned();
    let now = now_wall();
    let state = status.status;
    let reason = status.reason.clone();
    let item_id = id.clone();
    let changed = store
        .call(move |s| {
            let before = s.get(&item_id)?;
            let after = match state {
                TransactionState::Confirmed => s.mark_confirmed(&item_id, now)?,
                TransactionState::Rejected => {
                    s.mark_rejected(&item_id, reason.as_deref().unwrap_or("rejected"), now)?
                }
                TransactionState::Pending => return Ok(None),
            };
            Ok((before.map(|b| b.state) != Some(after.state)).then_some(after))
        })
        .await;
    match changed {
        Ok(Some(item)) => vec![
            Update::Outbox((&item).into()),
            Update::Transaction(TransactionUpdate {
                id,
                transaction_id: Some(status.transaction_id),
                status: state,
                reason: status.reason,
            }),
        ],
        Ok(None) => Vec::new(),
        Err(e) => {
            debug!(error = %e, "transaction status not applied");
            Vec::new()
        }
    }
}

/// Records the outcome of an HTTP send; the failure for the state machine, if the
/// network or server failed it, and when the item is due again.
async fn settle_http(
    store: &StoreHandle,
    updates: &broadcast::Sender<Update>,
    item: &OutboxItem,
    result: Result<String, HttpError>,
) -> (Option<Failure>, Option<chrono::DateTime<chrono::Utc>>) {
    let id = item.id.clone();
    let now = now_wall();
    let attempts = item.attempts;
    let mut retry_at = None;
    let (outcome, failure) = match result {
        Ok(server_ref) => (
            store
                .call(move |s| s.mark_accepted(&id, Some(&server_ref), now))
                .await,
            None,
        ),
        Err(e) if e.is_permanent() => {
            let reason = e.to_string();
            (
                store.call(move |s| s.mark_dead(&id, &reason, now)).await,
                None,
            )
        }
        Err(e) => {
            let wait = e
                .retry_after()
                .map(clamp_retry_hint)
                .unwrap_or_else(|| item_backoff(attempts));
            let at = wall_later(now, wait);
            retry_at = Some(at);
            let reason = e.to_string();
            let failure = e.failure();
            (
                store
                    .call(move |s| s.mark_failed(&id, &reason, at, now))
                    .await,
                Some(failure),
            )
        }
    };
    if let Ok(item) = outcome {
        let _ = updates.send(Update::Outbox(OutboxUpdate::from(&item)));
    }
    (failure, retry_at)
}

/// How often settled items are pruned: every [`PRUNE_INTERVAL`], and a short retention
/// is kept short (pruned at least once per retention period, at most once a second).
fn prune_interval(retention: Duration) -> Duration {
    PRUNE_INTERVAL.min(retention.max(Duration::from_secs(1)))
}

/// Per-item retry delay after `attempts` tries: the machine's schedule (backon's
/// envelope from 0.5 s doubling to 30 s, full jitter, so that the items of many clients
/// failing together are not retried together).
fn item_backoff(attempts: u32) -> Duration {
    item_delay(ITEM_RETRY_MIN, ITEM_RETRY_MAX, attempts.saturating_add(1))
}

/// The error of a request made without a token (the provider gave none).
fn no_token() -> HttpError {
    HttpError::Status {
        status: 401,
        body: None,
        retry_after: None,
    }
}

/// Runs `call` with the current token. A 401 for a token that was replaced while the
/// request was out (another request's refusal brought a fresh one meanwhile) is not a
/// refusal of the current token: the call is made once more, with the current one.
/// Only a refusal of the current token reaches the state machine (which refreshes it
/// once, then gives up with `AuthFailed`).
async fn with_token<T, F, Fut>(tokens: &TokenCell, call: F) -> Result<T, HttpError>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<T, HttpError>>,
{
    let (token, used) = tokens.get_tagged().await.map_err(|e| {
        debug!(error = %e, "no token");
        no_token()
    })?;
    let result = call(token).await;
    if matches!(&result, Err(e) if e.failure() == Failure::Auth)
        && let Some(current) = tokens.replaced_since(used).await
    {
        return call(current).await;
    }
    result
}

/// One poll from the cursor: records and emits the events; `Ok(more)`.
async fn poll_once(
    store: &StoreHandle,
    http: &HttpApi,
    tokens: &TokenCell,
    updates: &broadcast::Sender<Update>,
) -> Result<bool, HttpError> {
    let cursor = store
        .call(|s| s.cursor())
        .await
        .map_err(HttpError::Storage)?
        .map(|c| c.last_event_id);
    let page = with_token(tokens, |token| {
        let cursor = cursor.as_deref();
        async move { http.poll(&token, cursor, POLL_LIMIT).await }
    })
    .await?;
    for event in page.events {
        // A failure stops the page: nothing after an unrecorded event is recorded, so
        // the cursor stays before it and the next poll fetches it again.
        for u in process_event(store, event)
            .await
            .map_err(HttpError::Storage)?
        {
            let _ = updates.send(u);
        }
    }
    Ok(page.has_more)
}

/// Continuity was lost: refresh every entity from the server, then catch up with the
/// events still retained, and tell the app.
async fn resync(
    store: &StoreHandle,
    http: &HttpApi,
    tokens: &TokenCell,
    updates: &broadcast::Sender<Update>,
    client_id: &str,
) -> Result<(), HttpError> {
    store
        .call(|s| {
            s.reset_entity_sync_version()?;
            s.clear_cursor()
        })
        .await
        .map_err(HttpError::Storage)?;
    reconcile(store, http, tokens, updates, client_id, Vec::new(), false).await?;
    for _ in 0..RESYNC_MAX_PAGES {
        if !poll_once(store, http, tokens, updates).await? {
            break;
        }
    }
    let _ = updates.send(Update::Discontinuity {
        reason: "the server no longer had the events after this client's cursor; \
                 entities were refreshed and events resumed from the oldest retained"
            .into(),
    });
    Ok(())
}

/// Sends `ops` (items in flight) and pulls the changes since the last known version;
/// applies the answer to the store in one transaction.
async fn reconcile(
    store: &StoreHandle,
    http: &HttpApi,
    tokens: &TokenCell,
    updates: &broadcast::Sender<Update>,
    client_id: &str,
    ops: Vec<OutboxItem>,
    isolate: bool,
) -> Result<Pulled, HttpError> {
    let now = now_wall();

    let requeue = |store: StoreHandle, ops: Vec<OutboxItem>, reason: String, dead: bool| async move {
        let wall = now_wall();
        let requeued = store
            .call(move |s| {
                for op in ops {
                    if dead {
                        s.mark_dead(&op.id, &reason, now)?;
                    } else {
                        let at = wall_later(wall, item_backoff(op.attempts));
                        s.mark_failed(&op.id, &reason, at, now)?;
                    }
                }
                Ok(())
            })
            .await;
        if let Err(e) = requeued {
            // Left in flight: the next reconcile requeues them.
            warn!(error = %e, "could not requeue entity operations");
        }
    };
    // An operation whose body does not decode can never be sent: dead, with the reason
    // (it used to be dropped from the request and requeued, again and again).
    let mut operations: Vec<Operation> = Vec::with_capacity(ops.len());
    let mut readable = Vec::with_capacity(ops.len());
    for op in ops {
        match serde_json::from_value::<Operation>(op.body.clone()) {
            Ok(operation) => {
                operations.push(operation);
                readable.push(op);
            }
            Err(e) => {
                let reason = format!("unreadable operation body: {e}");
                let id = op.id.clone();
                match store.call(move |s| s.mark_dead(&id, &reason, now)).await {
                    Ok(item) => {
                        let _ = updates.send(Update::Outbox((&item).into()));
                    }
                    // Left in flight: the next reconcile requeues it and tries again.
                    Err(e) => warn!(error = %e, "could not mark an unreadable operation dead"),
                }
            }
        }
    }
    let ops = readable;
    let token = match tokens.get().await {
        Ok(t) => t,
        Err(_) => {
            requeue(store.clone(), ops, "no token".into(), false).await;
            return Err(HttpError::Status {
                status: 401,
                body: None,
                retry_after: None,
            });
        }
    };
    let sent_any = !ops.is_empty();
    let claims = Claims::read(&token).map_err(HttpError::Protocol)?;
    let last_known_version = store
        .call(|s| s.entity_sync_version())
        .await
        .map_err(HttpError::Storage)?;
    let request = ReconciliationRequest {
        request_id: uuid::Uuid::now_v7().to_string(),
        client_id: client_id.to_owned(),
        tenant_id: claims.tenant_id,
        last_known_version,
        operations,
        requested_at: now,
        strategy: None,
    };
    let response = match with_token(tokens, |token| {
        let request = &request;
        async move { http.reconcile(&token, request).await }
    })
    .await
    {
        Ok(r) => r,
        Err(e) => {
            let dead = e.is_permanent() && isolate && ops.len() == 1;
            requeue(store.clone(), ops, e.to_string(), dead).await;
            return Err(e);
        }
    };
    let applied_at = now_wall();
    let resp = response.clone();
    let outcome = match store
        .call(move |s| s.apply_reconcile_response(&resp, applied_at))
        .await
    {
        Ok(outcome) => outcome,
        Err(e) => {
            // Nothing of the answer was applied (one transaction): the operations go
            // back to the queue (or, if even that fails, the next reconcile requeues
            // them) and the same changes are pulled again later.
            requeue(store.clone(), ops, e.to_string(), false).await;
            return Err(HttpError::Storage(e));
        }
    };
    let changed = sent_any || !outcome.entities.is_empty() || !response.conflicts.is_empty();
    for entity in outcome.entities {
        let _ = updates.send(Update::Entity(entity));
    }
    for conflict in response.conflicts {
        let _ = updates.send(Update::Conflict(conflict));
    }
    // Every sent operation is now settled; one the answer did not mention (it should
    // not happen) goes back to the queue rather than staying in flight forever.
    for op in ops {
        let id = op.id.clone();
        let at = now_wall();
        let item = store
            .call(move |s| match s.get(&id)? {
                Some(i) if i.state == ItemState::InFlight => s
                    .mark_failed(&id, "not settled by the server's answer", at, at)
                    .map(Some),
                other => Ok(other),
            })
            .await;
        if let Ok(Some(item)) = item {
            let _ = updates.send(Update::Outbox((&item).into()));
        }
    }
    // Snapshots whose checksum did not match: counted, and each fetched again at once
    // (the sync version did not move, so the next pull asks for them too).
    let bad_snapshots = outcome.bad_checksums.len();
    for key in outcome.bad_checksums {
        let Some((entity_type, entity_id)) = key.split_once('/') else {
            continue;
        };
        if let Ok(snapshot) = http.snapshot(&token, entity_type, entity_id).await {
            let at = now_wall();
            if let Ok(Some(entity)) = store.call(move |s| s.apply_snapshot(&snapshot, at)).await {
                let _ = updates.send(Update::Entity(entity));
            }
        }
    }
    Ok(Pulled {
        changed,
        bad_snapshots,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::arithmetic_side_effects)]

    use super::*;
    use crate::store::{NewItem, OutboxClass, StoreConfig};

    fn memory_store() -> StoreHandle {
        let store = Store::open_in_memory(StoreConfig::default()).unwrap();
        StoreHandle(Arc::new(Mutex::new(store)))
    }

    async fn in_flight_message(store: &StoreHandle) -> OutboxItem {
        store
            .call(|s| {
                let body = serde_json::json!({"text": "hi"});
                let item = s.enqueue(
                    NewItem::new(OutboxClass::C, ItemKind::Message, "room:1", body),
                    now_wall(),
                )?;
                s.mark_in_flight(&item.id, now_wall())
            })
            .await
            .unwrap()
    }

    /// The supervisor hears of a write even when its caller stopped waiting: the
    /// wake-up goes from the store's thread once the write commits, not after the
    /// caller's `.await` (a dropped future used to strand the item until an unrelated
    /// event).
    #[tokio::test]
    async fn a_write_whose_caller_left_still_wakes_the_supervisor() {
        let store = memory_store();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let write = store.write_then(&tx, Command::Pump, |s| {
            let body = serde_json::json!({"text": "hi"});
            s.enqueue(
                NewItem::new(OutboxClass::C, ItemKind::Message, "room:1", body),
                now_wall(),
            )
        });
        // Polled once (the write is handed to the blocking pool), then dropped.
        let mut write = Box::pin(write);
        let first = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(write.as_mut(), cx))
        })
        .await;
        assert!(
            first.is_pending(),
            "the write cannot finish on its first poll"
        );
        drop(write);
        let woken = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap();
        assert!(matches!(woken, Some(Command::Pump)));
        let items = store.call(|s| s.list(None)).await.unwrap();
        assert_eq!(items.len(), 1, "the write committed");
    }

    /// Before the clamp, `now + chrono::Duration` overflowed and panicked for a hint
    /// around 8.3e15 ms, and a hint above i64::MAX ms became 0 (a retry at once).
    #[tokio::test]
    async fn a_huge_retry_hint_neither_panics_nor_retries_at_once() {
        let store = memory_store();
        let (updates, _) = broadcast::channel(16);
        for hint in [
            Duration::from_millis(8_300_000_000_000_000),
            Duration::from_millis(u64::MAX),
            Duration::MAX,
        ] {
            let item = in_flight_message(&store).await;
            let error = HttpError::Status {
                status: 503,
                body: None,
                retry_after: Some(hint),
            };
            let before = now_wall();
            let (failure, retry_at) = settle_http(&store, &updates, &item, Err(error)).await;
            assert!(matches!(failure, Some(Failure::ServerFull { .. })));
            assert!(retry_at.is_some());
            let id = item.id.clone();
            let after = store.call(move |s| s.get(&id)).await.unwrap().unwrap();
            assert_eq!(after.state, ItemState::Persisted);
            assert!(after.next_attempt_at > before, "not retried at once");
            assert!(
                after.next_attempt_at
                    <= now_wall() + chrono::Duration::from_std(MAX_SERVER_DELAY).unwrap(),
                "at most {MAX_SERVER_DELAY:?} away"
            );
        }
    }

    /// `UInt64.max` ms from Swift means "forever": before, it became a retention of 0
    /// and pruned every settled item.
    #[test]
    fn a_retention_beyond_the_calendar_keeps_items_forever() {
        let now = now_wall();
        assert_eq!(prune_before(now, Duration::from_millis(u64::MAX)), None);
        assert_eq!(prune_before(now, Duration::MAX), None);
        // Within chrono's range but before its earliest date: forever too.
        assert_eq!(
            prune_before(now, Duration::from_millis(i64::MAX as u64 - 1)),
            None
        );
        assert_eq!(
            prune_before(now, Duration::from_secs(3600)),
            Some(now - chrono::Duration::hours(1))
        );
        assert_eq!(prune_before(now, Duration::ZERO), Some(now));
    }

    #[test]
    fn wall_clock_waits_never_overflow() {
        let now = now_wall();
        assert_eq!(
            wall_later(now, Duration::MAX),
            now + chrono::Duration::from_std(MAX_SERVER_DELAY).unwrap()
        );
        assert_eq!(
            wall_later(now, Duration::from_secs(2)),
            now + chrono::Duration::seconds(2)
        );
    }

    /// Arbitrary server frames (well-formed templates with arbitrary values, and
    /// arbitrary text) through the client's inbound path: decode, record (cursor +
    /// dedupe) and the state machine's reaction to the hints they carry. Never a
    /// panic; no hint beyond `MAX_SERVER_DELAY`; the cursor only names a recorded event;
    /// an event is reported to the app at most once. Bounded (64 cases) for CI.
    mod inbound_properties {
        use proptest::prelude::*;

        use super::*;
        use crate::machine::{MIN_SERVER_DELAY, MachineConfig};

        fn json_value() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<u64>().prop_map(|n| n.to_string()),
                any::<i64>().prop_map(|n| n.to_string()),
                any::<f64>()
                    .prop_filter("JSON has no NaN", |f| f.is_finite())
                    .prop_map(|f| format!("{f:e}")),
                "[a-z0-9 .:+-]{0,12}".prop_map(|t| format!("\"{t}\"")),
                Just("null".to_owned()),
                Just("1e300".to_owned()),
            ]
        }

        fn id() -> impl Strategy<Value = String> {
            prop_oneof![
                "e-[0-9]{1,2}",
                "[a-zA-Z0-9_-]{200,320}",
                Just(String::new())
            ]
        }

        fn time() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("2026-01-30T10:15:00.004Z".to_owned()),
                Just("+262142-12-31T23:59:59Z".to_owned()),
                Just("-262143-01-01T00:00:00Z".to_owned()),
                Just("1970-01-01T00:00:00Z".to_owned()),
                "[0-9T:.Z-]{0,30}",
            ]
        }

        fn frame() -> impl Strategy<Value = String> {
            prop_oneof![
                (id(), json_value(), time()).prop_map(|(id, seq, t)| format!(
                    r#"{{"event":"event","data":{{"eventId":"{id}","eventType":"x.y","tenantId":"t","timestamp":"{t}","payload":{{}},"sequence":{seq}}}}}"#
                )),
                (id(), json_value(), time()).prop_map(|(id, seq, t)| format!(
                    r#"{{"event":"message","data":{{"messageId":"{id}","type":"dm","interactionClass":"CLASS_C","tenantId":"t","senderId":"s","payload":{{"text":"x"}},"timestamp":"{t}","eventId":"{id}","sequence":{seq}}}}}"#
                )),
                (json_value(), time()).prop_map(|(ping, t)| format!(
                    r#"{{"event":"connected","data":{{"connectionId":"c","clientId":"c","serverTime":"{t}","interactionClasses":["CLASS_C"],"pingInterval":{ping},"pingTimeout":{ping}}}}}"#
                )),
                json_value().prop_map(|hint| format!(
                    r#"{{"event":"error","data":{{"error":"e","code":"SERVER_FULL","status":503,"details":{{"retryAfterMs":{hint}}}}}}}"#
                )),
                "[a-z]{1,8}".prop_map(|e| format!(r#"{{"event":"{e}","data":{{}}}}"#)),
                any::<String>(),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_frames_never_panic_the_inbound_path(
                frames in proptest::collection::vec(frame(), 1..24),
                headers in proptest::collection::vec(".{0,24}", 0..6),
            ) {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let store = memory_store();
                    let start = Instant::now();
                    let mut now = start;
                    let mut machine = Machine::new(MachineConfig::default(), now);
                    machine.start(now);
                    machine.on_ws_open(now);
                    let mut clock = ClockOffset::default();
                    let mut reported = std::collections::HashSet::new();
                    let mut recorded = std::collections::HashSet::new();
                    for header in &headers {
                        if let Some(d) = crate::client::http::retry_after_header(header) {
                            assert!((MIN_SERVER_DELAY..=MAX_SERVER_DELAY).contains(&d));
                        }
                    }
                    for text in frames {
                        let Ok((event, _)) = ServerEvent::decode(&text) else {
                            continue;
                        };
                        let (id, result) = match event {
                            ServerEvent::Event(e) => {
                                let id = e.event_id.clone();
                                (Some(id), process_event(&store, e).await)
                            }
                            ServerEvent::Message(m) => match m.event_id.clone() {
                                Some(id) => {
                                    let sequence = m.sequence;
                                    let r = process_inbound(
                                        &store,
                                        id.clone(),
                                        sequence,
                                        Update::Message(m),
                                    )
                                    .await;
                                    (Some(id), r)
                                }
                                None => (None, Ok(Vec::new())),
                            },
                            ServerEvent::Connected(c) => {
                                machine.set_ping_interval(Duration::from_millis(c.ping_interval));
                                clock.sample(now_wall(), Duration::from_millis(3), c.server_time);
                                let _ = clock.server_now();
                                (None, Ok(Vec::new()))
                            }
                            ServerEvent::Error(body) => {
                                let hint = retry_after_detail(&body);
                                if let Some(d) = hint {
                                    assert!((MIN_SERVER_DELAY..=MAX_SERVER_DELAY).contains(&d));
                                }
                                machine.on_http_failed(now, Failure::ServerFull { retry_after: hint });
                                (None, Ok(Vec::new()))
                            }
                            _ => (None, Ok(Vec::new())),
                        };
                        if let (Some(id), Ok(updates)) = (id, result) {
                            recorded.insert(id.clone());
                            if !updates.is_empty() {
                                assert!(reported.insert(id.clone()), "{id} reported twice");
                            }
                        }
                        // The machine's next deadline is never absurd; fire it.
                        if let Some(t) = machine.poll_timeout() {
                            assert!(t <= now + MAX_SERVER_DELAY + MAX_SERVER_DELAY);
                            now = now.max(t);
                            machine.handle_timeout(now);
                        }
                        while machine.poll_action().is_some() {}
                    }
                    if let Some(cursor) = store.call(|s| s.cursor()).await.unwrap() {
                        assert!(recorded.contains(&cursor.last_event_id), "the cursor names a recorded event");
                    }
                });
            }
        }
    }
}
