//! The async client: what a Rust app uses, and what the Swift and Kotlin bindings wrap.
//!
//! ```text
//!   app ──calls──▶ Client ──commit──▶ Store (SQLite: outbox, cursor, entity cache)
//!                    │                   ▲
//!                    └─commands─▶ Supervisor (one task) ─┘
//!                                   │  drives Machine (sans-IO state machine)
//!                                   ├─ WebSocket (ws.rs)      realtime
//!                                   └─ HTTP (http.rs)         polling, sends, reconcile, Class D
//!   app ◀──Update stream (subscribe)──┘
//! ```
//!
//! Every call that hands something durable to the client (a message, an entity edit, a
//! transaction) commits it to the store before it returns; the supervisor then delivers
//! it whenever some transport works, retrying with the same id until the server accepts
//! it. Live-only things (presence, typing: Class A) are sent only when the WebSocket is
//! up and are never stored. Class D transactions have no way to the WebSocket: they are
//! only ever sent over HTTP with their idempotency key.

// Time and counters here are fed from outside (the server, the app): no operator that
// can overflow or panic.
#![warn(clippy::arithmetic_side_effects)]

mod error;
mod http;
mod supervisor;
pub mod tls;
mod token;
mod types;
mod ws;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use error::ClientError;
pub use http::HttpError;
pub use token::{
    Claims, SharedTokenProvider, StaticToken, TokenError, TokenFuture, TokenProvider, TokenRequest,
};
pub use types::{
    ClientMetrics, MessageClass, OutboxUpdate, OutgoingMessage, StateUpdate, Target,
    TransactionUpdate, Update,
};

use crate::machine::{ConnectionState, MachineConfig};
use crate::protocol::{
    Conflict, InteractionClass, JsonObject, OperationType, PresenceStatus, SendMessage,
    TransactionRequest,
};
use crate::store::{
    CachedEntity, ItemKind, ItemState, LocalEdit, NewItem, OutboxClass, OutboxItem, Store,
    StoreConfig, StoreWriter, Written,
};
use supervisor::{Command, Supervisor};
use types::ClockOffset;

/// How a client is set up.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server's base URL, e.g. `http://127.0.0.1:3000`.
    pub server_url: String,
    /// The WebSocket path (`WS_PATH`).
    pub ws_path: String,
    /// The SQLite file of this installation.
    pub store_path: PathBuf,
    /// The store's settings (durability, outbox bounds).
    pub store: StoreConfig,
    /// Timings of the connection state machine.
    pub machine: MachineConfig,
    /// Bound of each HTTP request.
    pub request_timeout: Duration,
    /// Bound of each request to the token provider: one that does not answer in time
    /// counts as no token (`AuthFailed` until `reauthenticate`), instead of holding
    /// the client's requests for good.
    pub token_timeout: Duration,
    /// Largest message payload accepted (encoded JSON bytes); larger is refused at the
    /// call, before anything is stored (the server's frame limit is 1 MiB).
    pub max_payload_bytes: usize,
    /// Operations per reconciliation request.
    pub reconcile_batch: usize,
    /// Messages sent over the WebSocket and not yet acknowledged, at most.
    pub send_window: usize,
    /// An unacknowledged message is sent again after this.
    pub ack_timeout: Duration,
    /// How often entity changes are pulled while connected and something changes.
    pub entity_pull_interval: Duration,
    /// The longest wait between entity pulls while nothing changes: each pull that finds
    /// nothing new doubles the wait from `entity_pull_interval` up to this, so that an
    /// idle client does not keep the device awake; a change, a local edit, a new
    /// connection or the app coming to the foreground starts again from the short one.
    pub entity_pull_idle_max: Duration,
    /// How often the status of accepted, undecided transactions is checked while
    /// connected (only while there are some).
    pub transaction_check_interval: Duration,
    /// Capacity of each subscriber's update buffer.
    pub update_buffer: usize,
    /// How long settled outbox items (accepted messages and operations, confirmed or
    /// rejected transactions) stay readable through `item()` and `outbox()` before they
    /// are deleted; `None` keeps them forever (the file then grows with every item ever
    /// sent). Dead items and undecided transactions are always kept.
    pub settled_retention: Option<Duration>,
    /// Extra trusted root certificates (PEM) for an `https://` server whose
    /// certificate is not issued under the bundled public roots (a private CA, a test
    /// server). The public roots stay trusted.
    pub tls_root_certificates: Vec<String>,
}

impl ClientConfig {
    /// Defaults for a server at `server_url` and a store at `store_path`.
    pub fn new(server_url: impl Into<String>, store_path: impl Into<PathBuf>) -> Self {
        Self {
            server_url: server_url.into(),
            ws_path: crate::protocol::envelope::DEFAULT_WS_PATH.to_owned(),
            store_path: store_path.into(),
            store: StoreConfig::default(),
            machine: MachineConfig::default(),
            request_timeout: Duration::from_secs(15),
            token_timeout: Duration::from_secs(30),
            max_payload_bytes: 512 * 1024,
            reconcile_batch: 100,
            send_window: 64,
            ack_timeout: Duration::from_secs(10),
            entity_pull_interval: Duration::from_secs(10),
            entity_pull_idle_max: Duration::from_secs(15 * 60),
            transaction_check_interval: Duration::from_secs(5),
            update_buffer: 4096,
            settled_retention: Some(Duration::from_secs(24 * 3600)),
            tls_root_certificates: Vec::new(),
        }
    }

    fn ws_url(&self) -> String {
        let base = self.server_url.trim_end_matches('/');
        let base = if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            base.to_owned()
        };
        format!("{base}{}", self.ws_path)
    }
}

/// The store shared by the API and the supervisor: owned by its writer thread
/// ([`StoreWriter`]), so that sends made at the same time (many tasks, the FFI's
/// threads) share one commit, so one fsync (group commit). Callers await a oneshot
/// channel that the writer thread completes ([`reply`]): no async worker is held, and
/// on a multi-threaded runtime no thread of tokio's blocking pool is woken just to wait
/// (that hand-over cost about 30 µs a call on the round trip's path).
#[derive(Debug, Clone)]
pub(crate) struct StoreHandle(StoreWriter);

impl StoreHandle {
    /// Moves `store` to its writer thread.
    pub(crate) fn new(store: Store) -> Result<StoreHandle, ClientError> {
        Ok(StoreHandle(StoreWriter::new(store)?))
    }

    /// Runs `f` with the store on its thread and returns what it returned. `f` runs
    /// even if the caller stops waiting.
    pub(crate) async fn call<R, F>(&self, f: F) -> Result<R, ClientError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Store) -> Result<R, crate::store::StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.0.run_then(f, move |result| {
            let _ = tx.send(result);
        });
        match reply(rx).await {
            Some(Ok(result)) => result.map_err(ClientError::from),
            // Not resumed here: the caller may be the supervisor's own task, which a
            // panic would end for good (no more reconnects, a frozen state).
            Some(Err(panic_payload)) => Err(ClientError::StorageIo(format!(
                "a store call panicked: {}",
                panic_text(panic_payload.as_ref())
            ))),
            None => Err(self.closed().into()),
        }
    }

    /// Runs a write the supervisor must hear about and tells it `then` from the store's
    /// thread, as soon as the write has committed. A caller's future can be dropped
    /// midway (a cancelled task, an app's own timeout) while the write still commits;
    /// a wake-up sent after `.await` would then be lost, and with no tick the item
    /// would wait for the next unrelated event.
    pub(crate) async fn write_then<R, F>(
        &self,
        commands: &mpsc::UnboundedSender<Command>,
        then: Command,
        f: F,
    ) -> Result<R, ClientError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Store) -> Result<R, crate::store::StoreError> + Send + 'static,
    {
        let commands = commands.clone();
        self.call(move |s| {
            let written = f(s)?;
            // A closed channel means the client is shutting down; the write is kept and
            // the next start sends it.
            let _ = commands.send(then);
            Ok(written)
        })
        .await
    }

    /// Why the writer answered nothing: it failed a flush, or it was closed.
    fn closed(&self) -> crate::store::StoreError {
        self.0
            .failure()
            .unwrap_or(crate::store::StoreError::WriterClosed)
    }

    /// Commits a new outbox item, in one transaction with whatever else is being sent
    /// at the same moment (group commit), and returns once it is on disk.
    ///
    /// With `send_early` the supervisor hears of it from the store's thread as soon as
    /// it is written: the item itself when it heads its lane (sent at once, while the
    /// store flushes it to disk), otherwise a [`Command::Pump`]. Without, it hears a
    /// `Pump` once the item is on disk (a transaction: nothing of it may leave before
    /// it is durable). Telling from the store's thread, as [`StoreHandle::write_then`]
    /// does, means a caller that stops waiting loses no wake-up.
    pub(crate) async fn enqueue(
        &self,
        commands: &mpsc::UnboundedSender<Command>,
        item: NewItem,
        now: chrono::DateTime<chrono::Utc>,
        send_early: bool,
    ) -> Result<OutboxItem, ClientError> {
        let commands = commands.clone();
        let (tx, rx) = oneshot::channel();
        if send_early {
            let written = move |w: Written<'_>| {
                // A closed channel means the client is shutting down; the item is kept
                // and the next start sends it.
                let _ = commands.send(if w.lane_head {
                    Command::Enqueued(Box::new(w.item.clone()))
                } else {
                    Command::Pump
                });
            };
            self.0.submit_written(item, now, written, move |result| {
                let _ = tx.send(result);
            });
        } else {
            self.0.submit(item, now, move |result| {
                if result.is_ok() {
                    let _ = commands.send(Command::Pump);
                }
                let _ = tx.send(result);
            });
        }
        match reply(rx).await {
            Some(result) => result.map_err(ClientError::from),
            None => Err(self.closed().into()),
        }
    }
}

/// A panic's message, for an error.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

/// Waits for the writer thread's reply; `None` if it was dropped unsent (the writer
/// closed). On a multi-threaded runtime (the SDK's own, and most apps') the task just
/// awaits the channel. On a current-thread runtime the wait runs on tokio's blocking
/// pool instead: that is the only kind of runtime whose clock can be paused
/// (`tokio::time::pause`, virtual-time tests), and a pending blocking task is how tokio
/// learns that work is in progress, so that its paused clock does not jump ahead while
/// the store works. (It costs one more thread hand-over per call.)
async fn reply<T: Send + 'static>(rx: oneshot::Receiver<T>) -> Option<T> {
    let current_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
    if current_thread {
        return tokio::task::spawn_blocking(move || rx.blocking_recv().ok())
            .await
            .ok()
            .flatten();
    }
    rx.await.ok()
}

struct Shared {
    config: ClientConfig,
    store: StoreHandle,
    commands: mpsc::UnboundedSender<Command>,
    updates: broadcast::Sender<Update>,
    state: watch::Receiver<ConnectionState>,
    clock: Arc<Mutex<ClockOffset>>,
    tokens: Arc<token::TokenCell>,
    client_id: String,
}

/// The client. Cheap to clone; all clones drive one connection.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server_url", &self.shared.config.server_url)
            .field("client_id", &self.shared.client_id)
            .field("state", &*self.shared.state.borrow())
            .finish()
    }
}

/// A subscription to the client's updates. Lagging far behind drops the oldest
/// updates for this subscriber ([`Subscription::next`] says how many); the store
/// always has the truth (outbox, entities).
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<Update>,
}

/// What [`Subscription::next`] gives.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// An update.
    Update(Box<Update>),
    /// This subscriber fell behind and missed this many updates.
    Missed(u64),
    /// The client shut down.
    Closed,
}

impl Subscription {
    /// The next update.
    pub async fn next(&mut self) -> Next {
        match self.rx.recv().await {
            Ok(u) => Next::Update(Box::new(u)),
            Err(broadcast::error::RecvError::Lagged(n)) => Next::Missed(n),
            Err(broadcast::error::RecvError::Closed) => Next::Closed,
        }
    }
}

/// How to settle an open conflict.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// Keep the value the server holds now.
    KeepServer,
    /// Keep this installation's side of the conflict.
    KeepMine,
    /// Write this value (a whole new value for the entity).
    Value(Value),
}

impl Client {
    /// Opens the store at `config.store_path` (creating it) and starts connecting.
    ///
    /// Must be called within a tokio runtime. Items left in the outbox by an earlier
    /// run are sent as soon as a transport works.
    pub async fn open(
        config: ClientConfig,
        tokens: SharedTokenProvider,
    ) -> Result<Client, ClientError> {
        // Bad input is refused before anything is opened.
        let tls = tls::client_config(&config.tls_root_certificates)?;
        let path = config.store_path.clone();
        let store_config = config.store.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(path, store_config))
            .await
            .map_err(|e| ClientError::StorageIo(format!("store task failed: {e}")))??;
        let client_id = store.client_id().to_owned();
        let store = StoreHandle::new(store)?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (updates, _) = broadcast::channel(config.update_buffer.max(16));
        let (state_tx, state) = watch::channel(ConnectionState::Offline);
        let clock = Arc::new(Mutex::new(ClockOffset::default()));
        let tokens = Arc::new(token::TokenCell::new(tokens, config.token_timeout));
        let supervisor = Supervisor::new(
            config.clone(),
            config.ws_url(),
            tls,
            store.clone(),
            tokens.clone(),
            updates.clone(),
            state_tx,
            clock.clone(),
            client_id.clone(),
            command_rx,
        )
        .map_err(|e| ClientError::InvalidInput {
            field: "server_url".into(),
            message: e.to_string(),
        })?;
        tokio::spawn(supervisor.run());
        Ok(Client {
            shared: Arc::new(Shared {
                config,
                store,
                commands,
                updates,
                state,
                clock,
                tokens,
                client_id,
            }),
        })
    }

    /// After `shutdown()` the client takes nothing new (not even into the outbox):
    /// [`ClientError::Closed`]. Open a new client to go on.
    fn ensure_open(&self) -> Result<(), ClientError> {
        if self.shared.commands.is_closed() {
            Err(ClientError::Closed)
        } else {
            Ok(())
        }
    }

    fn command(&self, command: Command) -> Result<(), ClientError> {
        self.shared
            .commands
            .send(command)
            .map_err(|_| ClientError::Closed)
    }

    /// This installation's `clientId`.
    pub fn client_id(&self) -> &str {
        &self.shared.client_id
    }

    /// The connection state now.
    pub fn connection_state(&self) -> ConnectionState {
        *self.shared.state.borrow()
    }

    /// A watch of the connection state (the current value, then each change).
    pub fn watch_state(&self) -> watch::Receiver<ConnectionState> {
        self.shared.state.clone()
    }

    /// Subscribes to every update from now on.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            rx: self.shared.updates.subscribe(),
        }
    }

    /// The server's time, by the client's estimate of the clock offset.
    pub fn server_time(&self) -> crate::protocol::Timestamp {
        self.shared
            .clock
            .lock()
            .map(|c| c.server_now())
            .unwrap_or_else(|_| chrono::Utc::now())
    }

    fn check_payload(&self, field: &str, value: &Value) -> Result<usize, ClientError> {
        let depth = crate::protocol::nesting_depth(value);
        if depth > crate::protocol::MAX_PAYLOAD_DEPTH {
            return Err(ClientError::InvalidInput {
                field: field.into(),
                message: format!(
                    "nested {depth} levels deep, over the limit of {}",
                    crate::protocol::MAX_PAYLOAD_DEPTH
                ),
            });
        }
        let size = serde_json::to_vec(value)
            .map_err(|e| ClientError::InvalidInput {
                field: field.into(),
                message: e.to_string(),
            })?
            .len();
        if size > self.shared.config.max_payload_bytes {
            return Err(ClientError::InvalidInput {
                field: field.into(),
                message: format!(
                    "{size} bytes is over the limit of {} bytes",
                    self.shared.config.max_payload_bytes
                ),
            });
        }
        Ok(size)
    }

    /// Sends a durable message (Class B or C): committed to the outbox before this
    /// returns, then delivered whenever a transport works, in order within its target.
    /// Follow it with [`Client::item`] or the [`Update::Outbox`] stream.
    pub async fn send_message(&self, message: OutgoingMessage) -> Result<OutboxItem, ClientError> {
        self.ensure_open()?;
        self.check_payload("payload", &message.payload)?;
        let id = uuid::Uuid::now_v7().to_string();
        let (class, wire_class) = match message.class {
            MessageClass::Stream => (OutboxClass::B, InteractionClass::ClassB),
            MessageClass::Chat => (OutboxClass::C, InteractionClass::ClassC),
        };
        let lane = message.target.lane();
        let (recipient_id, room_id) = match message.target {
            Target::Room(r) => (None, Some(r)),
            Target::User(u) => (Some(u), None),
        };
        let wire = SendMessage {
            message_id: Some(id.clone()),
            message_type: message.message_type,
            interaction_class: wire_class,
            recipient_id,
            room_id,
            payload: message.payload,
            metadata: message.metadata,
        };
        wire.validate()?;
        let body = serde_json::to_value(&wire).map_err(|e| ClientError::InvalidInput {
            field: "message".into(),
            message: e.to_string(),
        })?;
        let item = NewItem {
            id,
            class,
            kind: ItemKind::Message,
            lane,
            body,
        };
        let now = chrono::Utc::now();
        self.shared
            .store
            .enqueue(&self.shared.commands, item, now, true)
            .await
    }

    /// Sends a live-only message (Class A: typing indicators, cursors). Sent only when
    /// the WebSocket is up; otherwise [`ClientError::NotConnected`] at once. Never stored.
    pub async fn send_live(
        &self,
        target: Target,
        message_type: impl Into<String>,
        payload: Value,
    ) -> Result<(), ClientError> {
        self.check_payload("payload", &payload)?;
        let (recipient_id, room_id) = match target {
            Target::Room(r) => (None, Some(r)),
            Target::User(u) => (Some(u), None),
        };
        let wire = SendMessage {
            message_id: Some(uuid::Uuid::now_v7().to_string()),
            message_type: message_type.into(),
            interaction_class: InteractionClass::ClassA,
            recipient_id,
            room_id,
            payload,
            metadata: None,
        };
        wire.validate()?;
        let (reply, rx) = oneshot::channel();
        self.command(Command::Live {
            event: crate::protocol::ClientEvent::Message(wire),
            reply,
        })?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Announces this user's presence to the users sharing a room (Class A: live only).
    pub async fn set_presence(
        &self,
        status: PresenceStatus,
        metadata: Option<JsonObject>,
    ) -> Result<(), ClientError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Live {
            event: crate::protocol::ClientEvent::PresenceUpdate(crate::protocol::PresenceUpdate {
                status,
                metadata,
            }),
            reply,
        })?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Joins a room. The membership is remembered and re-established after every
    /// reconnect; the server's answer (or refusal by its room policy) arrives as
    /// [`Update::Room`].
    pub async fn join_room(&self, room_id: impl Into<String>) -> Result<(), ClientError> {
        let room_id = room_id.into();
        if room_id.trim().is_empty() {
            return Err(ClientError::InvalidInput {
                field: "roomId".into(),
                message: "must not be empty".into(),
            });
        }
        self.change_rooms(room_id, true).await
    }

    /// Leaves a room (and stops re-joining it). Offline, the leave is kept and sent on
    /// the next connection, until the server confirms it.
    pub async fn leave_room(&self, room_id: impl Into<String>) -> Result<(), ClientError> {
        self.change_rooms(room_id.into(), false).await
    }

    async fn change_rooms(&self, room_id: String, join: bool) -> Result<(), ClientError> {
        self.ensure_open()?;
        let room = room_id.clone();
        self.shared
            .store
            .call(move |s| supervisor::want_room(s, &room, join))
            .await?;
        self.command(Command::Room { room_id, join })
    }

    /// The rooms this client is (or will be, once connected) a member of.
    pub async fn rooms(&self) -> Result<Vec<String>, ClientError> {
        let rooms = self.shared.store.call(supervisor::load_rooms).await?;
        Ok(rooms.into_iter().collect())
    }

    /// Submits a Class D transaction (payment, order): committed with its idempotency
    /// key before this returns, then sent over HTTP only, retried with the same key
    /// until the server accepts it; its confirmation or rejection arrives as
    /// [`Update::Transaction`] (and is kept across restarts: see [`Client::item`]).
    pub async fn submit_transaction(
        &self,
        transaction_type: impl Into<String>,
        payload: Value,
        metadata: Option<JsonObject>,
    ) -> Result<OutboxItem, ClientError> {
        let transaction_type = transaction_type.into();
        self.ensure_open()?;
        if transaction_type.trim().is_empty() {
            return Err(ClientError::InvalidInput {
                field: "transactionType".into(),
                message: "must not be empty".into(),
            });
        }
        self.check_payload("payload", &payload)?;
        let request = TransactionRequest {
            transaction_type,
            payload,
            metadata,
        };
        let body = serde_json::to_value(&request).map_err(|e| ClientError::InvalidInput {
            field: "transaction".into(),
            message: e.to_string(),
        })?;
        let id = uuid::Uuid::now_v7().to_string();
        let item = NewItem {
            // Each transaction is its own lane: one stuck payment holds back no other.
            lane: format!("transaction:{id}"),
            id,
            class: OutboxClass::D,
            kind: ItemKind::Transaction,
            body,
        };
        let now = chrono::Utc::now();
        self.shared
            .store
            .enqueue(&self.shared.commands, item, now, false)
            .await
    }

    async fn edit(
        &self,
        entity_type: String,
        entity_id: String,
        operation_type: OperationType,
        payload: Value,
    ) -> Result<CachedEntity, ClientError> {
        for (field, value) in [("entityType", &entity_type), ("entityId", &entity_id)] {
            self.ensure_open()?;
            if value.trim().is_empty() {
                return Err(ClientError::InvalidInput {
                    field: field.into(),
                    message: "must not be empty".into(),
                });
            }
        }
        self.check_payload("payload", &payload)?;
        let claims = self.shared.tokens.claims().await?;
        let edit = LocalEdit {
            tenant_id: claims.tenant_id,
            entity_type,
            entity_id,
            operation_type,
            payload,
            metadata: None,
        };
        let now = self.server_time();
        let (_, _, entity) = self
            .shared
            .store
            .write_then(&self.shared.commands, Command::Reconcile, move |s| {
                s.local_edit(edit, now)
            })
            .await?;
        let _ = self.shared.updates.send(Update::Entity(entity.clone()));
        Ok(entity)
    }

    /// Creates (or replaces) an entity with `value` (an object): applied locally at once,
    /// reconciled with the server whenever it is reachable.
    pub async fn create_entity(
        &self,
        entity_type: impl Into<String>,
        entity_id: impl Into<String>,
        value: Value,
    ) -> Result<CachedEntity, ClientError> {
        self.edit(
            entity_type.into(),
            entity_id.into(),
            OperationType::Create,
            value,
        )
        .await
    }

    /// Updates an entity with a JSON merge patch (fields set; `null` removes a field).
    pub async fn update_entity(
        &self,
        entity_type: impl Into<String>,
        entity_id: impl Into<String>,
        patch: Value,
    ) -> Result<CachedEntity, ClientError> {
        self.edit(
            entity_type.into(),
            entity_id.into(),
            OperationType::Update,
            patch,
        )
        .await
    }

    /// Deletes an entity (a tombstone remains).
    pub async fn delete_entity(
        &self,
        entity_type: impl Into<String>,
        entity_id: impl Into<String>,
    ) -> Result<CachedEntity, ClientError> {
        self.edit(
            entity_type.into(),
            entity_id.into(),
            OperationType::Delete,
            Value::Null,
        )
        .await
    }

    /// The cached entity (local edits included), if known.
    pub async fn entity(
        &self,
        entity_type: impl Into<String>,
        entity_id: impl Into<String>,
    ) -> Result<Option<CachedEntity>, ClientError> {
        let (t, i) = (entity_type.into(), entity_id.into());
        self.shared.store.call(move |s| s.entity(&t, &i)).await
    }

    /// The ids of the cached entities of a type.
    pub async fn entity_ids(
        &self,
        entity_type: impl Into<String>,
    ) -> Result<Vec<String>, ClientError> {
        let t = entity_type.into();
        self.shared.store.call(move |s| s.entity_ids(&t)).await
    }

    /// Asks for the server's entity changes now (they are also pulled periodically).
    pub fn sync_entities(&self) -> Result<(), ClientError> {
        self.command(Command::PullEntities)
    }

    /// The open conflicts (MANUAL strategy), oldest first.
    pub async fn conflicts(&self) -> Result<Vec<Conflict>, ClientError> {
        self.shared.store.call(|s| s.open_conflicts()).await
    }

    /// Settles an open conflict by writing a value that supersedes both sides.
    pub async fn resolve_conflict(
        &self,
        conflict_id: &str,
        resolution: Resolution,
    ) -> Result<CachedEntity, ClientError> {
        let conflicts = self.conflicts().await?;
        let conflict = conflicts
            .into_iter()
            .find(|c| c.conflict_id == conflict_id)
            .ok_or_else(|| ClientError::NotFound(format!("conflict {conflict_id}")))?;
        let (t, i) = (conflict.entity_type.clone(), conflict.entity_id.clone());
        let current = self
            .entity(t.clone(), i.clone())
            .await?
            .ok_or_else(|| ClientError::NotFound(format!("entity {t}/{i}")))?;
        let mine = conflict
            .operations
            .iter()
            .find(|o| o.client_id == self.shared.client_id);
        let value = match resolution {
            Resolution::KeepServer => current.value.data.clone(),
            Resolution::KeepMine => {
                let op = mine.ok_or_else(|| {
                    ClientError::InvalidState(
                        "this installation has no side in the conflict".into(),
                    )
                })?;
                // The value as of the server's state with this side applied on top.
                current.base.apply_plain(op).data
            }
            Resolution::Value(v) => v,
        };
        // A CREATE carries the whole value; its clock descends from every side seen.
        let entity = if value.is_null() {
            self.delete_entity(t, i).await?
        } else {
            self.create_entity(t, i, value).await?
        };
        let id = conflict_id.to_owned();
        self.shared
            .store
            .call(move |s| s.clear_conflict(&id))
            .await?;
        Ok(entity)
    }

    /// One outbox item (a message, operation or transaction handle).
    pub async fn item(&self, id: &str) -> Result<Option<OutboxItem>, ClientError> {
        let id = id.to_owned();
        self.shared.store.call(move |s| s.get(&id)).await
    }

    /// The outbox, optionally in one state only.
    pub async fn outbox(&self, state: Option<ItemState>) -> Result<Vec<OutboxItem>, ClientError> {
        self.shared.store.call(move |s| s.list(state)).await
    }

    /// Changes the key that encrypts the store (see `StoreConfig::key`); see
    /// [`Store::rekey`](crate::store::Store::rekey): until this returns the file is
    /// under the old key, after it under `new_key`, never a mix. Keep both keys where
    /// the app keeps them until it returns, and open the client with the new one from
    /// then on. A plaintext store is refused here: open it with a key to encrypt it.
    pub async fn rekey(&self, new_key: crate::store::StoreKey) -> Result<(), ClientError> {
        self.ensure_open()?;
        self.shared.store.call(move |s| s.rekey(new_key)).await
    }

    /// Sends a dead item again (the app decided the cause is fixed).
    pub async fn retry(&self, id: &str) -> Result<OutboxItem, ClientError> {
        self.ensure_open()?;
        let id = id.to_owned();
        let now = chrono::Utc::now();
        let item = self
            .shared
            .store
            .write_then(&self.shared.commands, Command::Pump, move |s| {
                s.retry(&id, now)
            })
            .await?;
        let _ = self.shared.updates.send(Update::Outbox((&item).into()));
        Ok(item)
    }

    /// Gives a dead item up for good.
    pub async fn discard(&self, id: &str) -> Result<OutboxItem, ClientError> {
        let id = id.to_owned();
        let item = self.shared.store.call(move |s| s.discard(&id)).await?;
        Ok(item)
    }

    /// Waits until item `id` is settled (accepted, confirmed, rejected or dead) or
    /// `timeout` passes; returns the item as it then is.
    pub async fn wait_settled(
        &self,
        id: &str,
        want: &[ItemState],
        timeout: Duration,
    ) -> Result<OutboxItem, ClientError> {
        let mut sub = self.subscribe();
        let now = tokio::time::Instant::now();
        // A timeout too long for the clock waits (practically) forever.
        let deadline = now
            .checked_add(timeout)
            .or_else(|| now.checked_add(Duration::from_secs(u64::from(u32::MAX))))
            .unwrap_or(now);
        loop {
            let item = self
                .item(id)
                .await?
                .ok_or_else(|| ClientError::NotFound(id.to_owned()))?;
            if want.contains(&item.state) {
                return Ok(item);
            }
            // Wake on any update about this item (or a missed batch), re-read the store.
            loop {
                match tokio::time::timeout_at(deadline, sub.next()).await {
                    Err(_) => return Ok(item),
                    Ok(Next::Closed) => return Err(ClientError::Closed),
                    Ok(Next::Missed(_)) => break,
                    Ok(Next::Update(u)) => match *u {
                        Update::Outbox(o) if o.id == id => break,
                        Update::Transaction(t) if t.id == id => break,
                        _ => {}
                    },
                }
            }
        }
    }

    /// Figures for diagnostics.
    pub async fn metrics(&self) -> Result<ClientMetrics, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Metrics(reply))?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// The host app says the network is available: retry at once.
    pub fn network_available(&self) {
        let _ = self.command(Command::Hint(supervisor::Hint::NetworkAvailable));
    }

    /// The host app says the network is gone.
    pub fn network_lost(&self) {
        let _ = self.command(Command::Hint(supervisor::Hint::NetworkLost));
    }

    /// The app came to the foreground: check the connection at once.
    pub fn foreground(&self) {
        let _ = self.command(Command::Hint(supervisor::Hint::Foreground));
    }

    /// The app went to the background.
    pub fn background(&self) {
        let _ = self.command(Command::Hint(supervisor::Hint::Background));
    }

    /// Asks the token provider for a fresh token and connects again (the way out of
    /// `AuthFailed`).
    pub fn reauthenticate(&self) {
        let _ = self.command(Command::Reauthenticate);
    }

    /// Stops the client: closes the connection and the supervisor. What is in the outbox
    /// stays there for the next run.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.command(Command::Shutdown(reply)).is_ok() {
            let _ = rx.await;
        }
    }
}
