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
//!
//! This file holds the loop, its state and the app's commands; each part of the work
//! has a file of its own: [`session`] (the WebSocket), [`inbound`] (deliveries recorded
//! in order, polling, resync), [`gate`] (what durable deliveries wait behind while a
//! poll, catch-up or resync records events), [`outbound`] (the outbox, transactions), [`entities`]
//! (reconcile and pull), [`reports`] (what the spawned tasks report), and
//! [`housekeeping`] (the one deadline the loop sleeps until, pruning).

mod entities;
mod gate;
mod housekeeping;
mod inbound;
mod outbound;
mod reports;
mod session;

use entities::*;
use gate::{Gate, Slot};
use outbound::*;

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
/// The rooms left while the server could not be told (sent again on every connection
/// until the server answers `room_left`).
const ROOMS_LEFT_KEY: &str = "client.rooms_left";
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

/// Frames read from the WebSocket and not yet handled, at most: beyond, the socket's
/// reader waits (the server's send queue, then its slow-consumer limit, take the rest).
const WS_EVENT_BUFFER: usize = 256;
/// How long the id of an event received is kept (for refusing a redelivery): longer
/// than a server keeps its events (7 days by default).
const SEEN_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// The newest ids of events received are kept whatever their age (a busy month's
/// worth for most apps; a resync after longer than the server keeps events pages only
/// through what it kept).
const SEEN_KEEP: usize = 100_000;
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
    load_room_set(store, ROOMS_KEY)
}

/// The rooms the user left that the server may not know of yet.
pub(crate) fn load_rooms_left(store: &mut Store) -> Result<BTreeSet<String>, StoreError> {
    load_room_set(store, ROOMS_LEFT_KEY)
}

/// Records the user's wish to be in `room` (`join`) or out of it. A leave is kept until
/// the server confirms it: membership is the user's on the server, and a leave the
/// socket could not carry (offline) would otherwise be lost. Written in an order that a
/// crash between the two writes leaves harmless: a join is undone first from the
/// leaves, a leave is recorded first (a room in both is joined, then left).
pub(crate) fn want_room(store: &mut Store, room: &str, join: bool) -> Result<(), StoreError> {
    let mut rooms = load_rooms(store)?;
    let mut left = load_rooms_left(store)?;
    if join {
        if left.remove(room) {
            save_room_set(store, ROOMS_LEFT_KEY, &left)?;
        }
        rooms.insert(room.to_owned());
    } else {
        if left.insert(room.to_owned()) {
            save_room_set(store, ROOMS_LEFT_KEY, &left)?;
        }
        rooms.remove(room);
    }
    save_room_set(store, ROOMS_KEY, &rooms)
}

/// The server confirmed a leave (or refused a join): nothing more to tell it.
pub(crate) fn forget_room(
    store: &mut Store,
    room: &str,
    refused_join: bool,
) -> Result<(), StoreError> {
    if refused_join {
        let mut rooms = load_rooms(store)?;
        if rooms.remove(room) {
            save_room_set(store, ROOMS_KEY, &rooms)?;
        }
    } else {
        let mut left = load_rooms_left(store)?;
        if left.remove(room) {
            save_room_set(store, ROOMS_LEFT_KEY, &left)?;
        }
    }
    Ok(())
}

fn load_room_set(store: &mut Store, key: &str) -> Result<BTreeSet<String>, StoreError> {
    match store.kv_get(key)? {
        None => Ok(BTreeSet::new()),
        Some(text) => serde_json::from_str(&text).map_err(|e| StoreError::Invalid {
            field: "rooms",
            message: e.to_string(),
        }),
    }
}

fn save_room_set(store: &mut Store, key: &str, rooms: &BTreeSet<String>) -> Result<(), StoreError> {
    let text = serde_json::to_string(rooms).map_err(|e| StoreError::Invalid {
        field: "rooms",
        message: e.to_string(),
    })?;
    store.kv_set(key, Some(&text))
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
    /// A new item heads its lane (nothing older of its lane is pending): send it now
    /// if it can go, else as [`Command::Pump`].
    Enqueued(Box<OutboxItem>),
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
    Poll(Slot, Result<bool, HttpError>),
    Resync(Slot, Result<(), HttpError>),
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
    CaughtUp(u64, Slot, Result<bool, HttpError>),
    /// An inbound task's gate slot was dropped without its report being handled (the
    /// task aborted or panicked): what waited behind it may go.
    SlotDropped,
}

impl Io {
    /// True for a report of an answer that broke the protocol (garbage JSON, a 200
    /// with the wrong shape).
    fn protocol_error(&self) -> bool {
        let error = match self {
            Io::Poll(_, Err(e))
            | Io::Resync(_, Err(e))
            | Io::Pulled(Err(e))
            | Io::CaughtUp(_, _, Err(e)) => e,
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
    ws_tx: mpsc::Sender<(u64, WsEvent)>,
    ws_rx: mpsc::Receiver<(u64, WsEvent)>,
    tasks: JoinSet<()>,
    ws: Option<WsHandle>,
    /// Generation of the current WebSocket attempt; reports of older ones are ignored.
    ws_gen: u64,
    /// Rooms a `join_room` frame was sent for on the current connection, and whether
    /// the server answered it yet: each is sent once per connection (every join is
    /// answered with the room's presence, so a second one would report every member's
    /// presence twice), and only a refusal of an unanswered join is a refused join (a
    /// refused live message to a room names the room too).
    rooms_joined: HashMap<String, bool>,
    /// The catch-up of the current connection, while it runs.
    catch_up_task: Option<tokio::task::AbortHandle>,
    /// The current attempt asked the server to resume from a cursor (`lastEventId`).
    /// Without one, the server's stream starts wherever the connection happens to be
    /// registered: what came before must be caught up by polling, after `connected`.
    ws_carried_cursor: bool,
    /// Messages sent over the WebSocket, awaiting their ack.
    ws_in_flight: HashMap<String, Instant>,
    /// The highest outbox `seq` a pump has read: an item at or below it was seen by a
    /// pump (sent, or left for a reason), so a late `Command::Enqueued` of it must not
    /// send it again (its ack may even have been handled already).
    pumped_through: i64,
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
    /// Durable deliveries wait here while a poll, a catch-up or a resync records events
    /// (see [`gate`]).
    inbound: Gate,
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
        let inbound = Gate::new(io_tx.clone());
        let (ws_tx, ws_rx) = mpsc::channel(WS_EVENT_BUFFER);
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
            rooms_joined: HashMap::new(),
            catch_up_task: None,
            ws_carried_cursor: false,
            ws_in_flight: HashMap::new(),
            pumped_through: 0,
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
            inbound,
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
                    self.retry_network_waits().await;
                    self.find_outbox_due().await;
                }
            }
        }
    }

    async fn on_command(&mut self, command: Command) {
        let now = mono_now();
        if matches!(
            command,
            Command::Pump
                | Command::Enqueued(_)
                | Command::Room { .. }
                | Command::PullEntities
                | Command::Reconcile
        ) {
            // The app wants something of the server: in the background, connect for it.
            self.machine.on_app_request(now);
        }
        match command {
            Command::Pump => self.pump().await,
            Command::Enqueued(item) => self.send_new(*item).await,
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
            Command::Hint(Hint::NetworkAvailable) => {
                self.renew_http_pool();
                self.machine.network_available(now);
                // Connected already (the machine changes nothing then): what waited
                // for the network goes now.
                if self.machine.state().is_connected() {
                    self.retry_network_waits().await;
                }
            }
            Command::Hint(Hint::NetworkLost) => {
                self.renew_http_pool();
                self.machine.network_lost(now);
            }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::arithmetic_side_effects)]

    use super::inbound::{process_event, process_inbound};
    use super::*;
    use crate::store::{NewItem, OutboxClass, StoreConfig};

    fn memory_store() -> StoreHandle {
        let store = Store::open_in_memory(StoreConfig::default()).unwrap();
        StoreHandle::new(store).unwrap()
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
        // The writer is held busy until the caller has left, so that the first poll
        // cannot find the write done (it could on a loaded machine otherwise).
        let (release, held) = std::sync::mpsc::channel::<()>();
        store.0.run_then(
            move |_| {
                let _ = held.recv_timeout(Duration::from_secs(10));
            },
            |_| {},
        );
        let (tx, mut rx) = mpsc::unbounded_channel();
        let write = store.write_then(&tx, Command::Pump, |s| {
            let body = serde_json::json!({"text": "hi"});
            s.enqueue(
                NewItem::new(OutboxClass::C, ItemKind::Message, "room:1", body),
                now_wall(),
            )
        });
        // Polled once (the write is handed to the store's thread), then dropped.
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
        release.send(()).unwrap();
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
                                clock.sample_connected(now_wall(), c.server_time);
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
