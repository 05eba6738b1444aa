//! The records and enums that cross the FFI, and their conversions from core's types.
//!
//! Conventions (the same in Kotlin and Swift):
//! - JSON values (payloads, metadata, entity values) cross as JSON text, in fields named
//!   `...Json`; the app parses them with its own JSON library.
//! - Times are milliseconds since the Unix epoch (`...Ms`, `i64`), durations are
//!   milliseconds (`...Ms`, `u64`).
//! - Names never repeat a variant's name as a type's name (`ClientUpdate.MessageReceived`
//!   carries a `ReceivedMessage`), which Kotlin's nested sealed classes would shadow.

use std::time::Duration;

use serde_json::Value;
use webwaka_realtime::client as sdk;
use webwaka_realtime::machine;
use webwaka_realtime::protocol::{self, JsonObject, Timestamp};
use webwaka_realtime::store;

use crate::error::RealtimeError;

// ---------------------------------------------------------------------------------------
// Small conversions

/// Milliseconds since the epoch.
pub(crate) fn epoch_ms(t: Timestamp) -> i64 {
    t.timestamp_millis()
}

/// A duration in whole milliseconds (saturating).
pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Compact JSON text of a value.
pub(crate) fn json_text(value: &Value) -> String {
    value.to_string()
}

/// JSON text of an optional object.
fn object_text(object: &Option<JsonObject>) -> Option<String> {
    object
        .as_ref()
        .map(|o| json_text(&Value::Object(o.clone())))
}

/// Parses JSON text the app gave for `field`. The error says where the text is wrong,
/// never what it contains.
pub(crate) fn parse_json(field: &str, text: &str) -> Result<Value, RealtimeError> {
    serde_json::from_str(text).map_err(|e| RealtimeError::invalid(field, format!("not JSON: {e}")))
}

/// Parses optional JSON text that must be an object (metadata).
pub(crate) fn parse_object(
    field: &str,
    text: Option<&str>,
) -> Result<Option<JsonObject>, RealtimeError> {
    match text {
        None => Ok(None),
        Some(text) => match parse_json(field, text)? {
            Value::Object(o) => Ok(Some(o)),
            _ => Err(RealtimeError::invalid(field, "must be a JSON object")),
        },
    }
}

// ---------------------------------------------------------------------------------------
// Enums

/// Where the client stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum ConnectionState {
    /// Not connected; waiting to retry.
    Offline,
    /// Opening the WebSocket (and, if it is slow or refused, trying HTTP).
    Connecting,
    /// The WebSocket is up: everything flows in real time.
    Realtime,
    /// No WebSocket but HTTP works: receiving by polling, sending over HTTP.
    Polling,
    /// Continuity was lost: refreshing from the server.
    Resyncing,
    /// Offline for long: retrying slowly to spare the battery.
    Suspended,
    /// Shut down by the app.
    Closed,
    /// The credentials were refused: only a new token (`reauthenticate()`) leaves it.
    AuthFailed,
}

impl From<machine::ConnectionState> for ConnectionState {
    fn from(s: machine::ConnectionState) -> Self {
        use machine::ConnectionState as S;
        match s {
            S::Offline => Self::Offline,
            S::Connecting => Self::Connecting,
            S::Realtime => Self::Realtime,
            S::Polling => Self::Polling,
            S::Resyncing => Self::Resyncing,
            S::Suspended => Self::Suspended,
            S::Closed => Self::Closed,
            S::AuthFailed => Self::AuthFailed,
        }
    }
}

/// Why the connection state changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum StateReason {
    /// The app opened the client.
    Start,
    /// The WebSocket opened.
    WebSocketOpened,
    /// Opening the WebSocket failed.
    WebSocketFailed,
    /// The open WebSocket closed or broke.
    WebSocketLost,
    /// No answer to a ping in time.
    HeartbeatLost,
    /// The server is shutting down or full.
    ServerGoingAway,
    /// An HTTP request succeeded.
    HttpWorks,
    /// HTTP requests failed.
    HttpFailed,
    /// The retry timer fired.
    RetryTimer,
    /// The app said the network is available.
    NetworkAvailable,
    /// The app said the network is gone.
    NetworkLost,
    /// The app came to the foreground.
    Foreground,
    /// Offline for long.
    LongOffline,
    /// The server no longer has the events after the client's cursor.
    CursorExpired,
    /// The resync finished.
    ResyncDone,
    /// The server refused the token and refreshing it did not help.
    AuthRejected,
    /// A new token arrived.
    NewToken,
    /// The app shut the client down.
    Shutdown,
    /// The app has been in the background for `backgroundLingerMs`: the connection is
    /// closed and the client does nothing on its own until the app returns or asks.
    Background,
    /// The app asked for something while in the background: the client connects for it.
    AppRequest,
}

impl From<machine::Reason> for StateReason {
    fn from(r: machine::Reason) -> Self {
        use machine::Reason as R;
        match r {
            R::Start => Self::Start,
            R::WebSocketOpened => Self::WebSocketOpened,
            R::WebSocketFailed => Self::WebSocketFailed,
            R::WebSocketLost => Self::WebSocketLost,
            R::HeartbeatLost => Self::HeartbeatLost,
            R::ServerGoingAway => Self::ServerGoingAway,
            R::HttpWorks => Self::HttpWorks,
            R::HttpFailed => Self::HttpFailed,
            R::RetryTimer => Self::RetryTimer,
            R::NetworkAvailable => Self::NetworkAvailable,
            R::NetworkLost => Self::NetworkLost,
            R::Foreground => Self::Foreground,
            R::LongOffline => Self::LongOffline,
            R::CursorExpired => Self::CursorExpired,
            R::ResyncDone => Self::ResyncDone,
            R::AuthRejected => Self::AuthRejected,
            R::NewToken => Self::NewToken,
            R::Shutdown => Self::Shutdown,
            R::Background => Self::Background,
            R::AppRequest => Self::AppRequest,
        }
    }
}

/// How a message or item travels (the four interaction classes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum InteractionClass {
    /// Live only (presence, typing): never stored.
    ClassA,
    /// Event streams: durable, polled when the WebSocket is down.
    ClassB,
    /// Chat and collaboration: durable, queued offline.
    ClassC,
    /// Critical transactions: HTTP only, with an idempotency key.
    ClassD,
}

impl From<protocol::InteractionClass> for InteractionClass {
    fn from(c: protocol::InteractionClass) -> Self {
        use protocol::InteractionClass as C;
        match c {
            C::ClassA => Self::ClassA,
            C::ClassB => Self::ClassB,
            C::ClassC => Self::ClassC,
            C::ClassD => Self::ClassD,
        }
    }
}

impl From<store::OutboxClass> for InteractionClass {
    fn from(c: store::OutboxClass) -> Self {
        match c {
            store::OutboxClass::B => Self::ClassB,
            store::OutboxClass::C => Self::ClassC,
            store::OutboxClass::D => Self::ClassD,
        }
    }
}

/// The durable classes a message may be sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum MessageClass {
    /// Class B: an event stream (feeds, notifications).
    Stream,
    /// Class C: chat and collaboration.
    Chat,
}

impl From<MessageClass> for sdk::MessageClass {
    fn from(c: MessageClass) -> Self {
        match c {
            MessageClass::Stream => sdk::MessageClass::Stream,
            MessageClass::Chat => sdk::MessageClass::Chat,
        }
    }
}

/// A user's presence status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum PresenceStatus {
    /// Connected and active.
    Online,
    /// Connected but idle.
    Away,
    /// Gone.
    Offline,
}

impl From<protocol::PresenceStatus> for PresenceStatus {
    fn from(s: protocol::PresenceStatus) -> Self {
        match s {
            protocol::PresenceStatus::Online => Self::Online,
            protocol::PresenceStatus::Away => Self::Away,
            protocol::PresenceStatus::Offline => Self::Offline,
        }
    }
}

impl From<PresenceStatus> for protocol::PresenceStatus {
    fn from(s: PresenceStatus) -> Self {
        match s {
            PresenceStatus::Online => Self::Online,
            PresenceStatus::Away => Self::Away,
            PresenceStatus::Offline => Self::Offline,
        }
    }
}

/// What an outbox item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum OutboxItemKind {
    /// A message.
    Message,
    /// An entity edit (reconciled in batches).
    Operation,
    /// A Class D transaction.
    Transaction,
}

impl From<store::ItemKind> for OutboxItemKind {
    fn from(k: store::ItemKind) -> Self {
        match k {
            store::ItemKind::Message => Self::Message,
            store::ItemKind::Operation => Self::Operation,
            store::ItemKind::Transaction => Self::Transaction,
        }
    }
}

/// Where an outbox item is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum OutboxItemState {
    /// Committed on the device, waiting to be sent (again).
    Persisted,
    /// Handed to a transport; no answer yet.
    InFlight,
    /// The server has it.
    Accepted,
    /// A transaction the server confirmed.
    Confirmed,
    /// A transaction the server rejected (`lastError` says why).
    Rejected,
    /// Failed for good: `retry()` or `discard()` it.
    Dead,
}

impl From<store::ItemState> for OutboxItemState {
    fn from(s: store::ItemState) -> Self {
        use store::ItemState as S;
        match s {
            S::Persisted => Self::Persisted,
            S::InFlight => Self::InFlight,
            S::Accepted => Self::Accepted,
            S::Confirmed => Self::Confirmed,
            S::Rejected => Self::Rejected,
            S::Dead => Self::Dead,
        }
    }
}

impl From<OutboxItemState> for store::ItemState {
    fn from(s: OutboxItemState) -> Self {
        use store::ItemState as S;
        match s {
            OutboxItemState::Persisted => S::Persisted,
            OutboxItemState::InFlight => S::InFlight,
            OutboxItemState::Accepted => S::Accepted,
            OutboxItemState::Confirmed => S::Confirmed,
            OutboxItemState::Rejected => S::Rejected,
            OutboxItemState::Dead => S::Dead,
        }
    }
}

/// A Class D transaction's status on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum TransactionStatus {
    /// Received, not decided yet.
    Pending,
    /// Carried out.
    Confirmed,
    /// Refused.
    Rejected,
}

impl From<protocol::TransactionState> for TransactionStatus {
    fn from(s: protocol::TransactionState) -> Self {
        match s {
            protocol::TransactionState::Pending => Self::Pending,
            protocol::TransactionState::Confirmed => Self::Confirmed,
            protocol::TransactionState::Rejected => Self::Rejected,
        }
    }
}

/// What an entity edit does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum OperationType {
    /// Sets the whole value.
    Create,
    /// Applies a JSON merge patch.
    Update,
    /// Deletes (a tombstone remains).
    Delete,
}

impl From<protocol::OperationType> for OperationType {
    fn from(t: protocol::OperationType) -> Self {
        match t {
            protocol::OperationType::Create => Self::Create,
            protocol::OperationType::Update => Self::Update,
            protocol::OperationType::Delete => Self::Delete,
        }
    }
}

/// How the server resolves concurrent edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum ResolutionStrategy {
    /// The later edit wins whole.
    LastWriteWins,
    /// Per top-level field.
    FieldLevelMerge,
    /// A merge function registered for the type decides.
    CustomMerge,
    /// No winner: the app resolves the conflict (`resolveConflict`).
    Manual,
}

impl From<protocol::ResolutionStrategy> for ResolutionStrategy {
    fn from(s: protocol::ResolutionStrategy) -> Self {
        use protocol::ResolutionStrategy as S;
        match s {
            S::LastWriteWins => Self::LastWriteWins,
            S::FieldLevelMerge => Self::FieldLevelMerge,
            S::CustomMerge => Self::CustomMerge,
            S::Manual => Self::Manual,
        }
    }
}

// ---------------------------------------------------------------------------------------
// What the app sends

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum MessageTarget {
    /// Every member of a room (join it first).
    Room {
        /// The room.
        room_id: String,
    },
    /// One user, on all of their devices.
    User {
        /// The user.
        user_id: String,
    },
}

impl From<MessageTarget> for sdk::Target {
    fn from(t: MessageTarget) -> Self {
        match t {
            MessageTarget::Room { room_id } => sdk::Target::Room(room_id),
            MessageTarget::User { user_id } => sdk::Target::User(user_id),
        }
    }
}

/// A durable message (Class B or C): queued when offline, delivered exactly once.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct OutgoingMessage {
    /// Where to.
    pub target: MessageTarget,
    /// The app's type, e.g. `chat.text`.
    pub message_type: String,
    /// The content, as JSON text (any JSON value).
    pub payload_json: String,
    /// Class B or C; absent means `CHAT` (Class C).
    #[uniffi(default)]
    pub class: Option<MessageClass>,
    /// Extra data, as the text of a JSON object.
    #[uniffi(default)]
    pub metadata_json: Option<String>,
}

impl OutgoingMessage {
    /// Core's message, with the JSON parsed (errors name the field).
    pub(crate) fn into_core(self) -> Result<sdk::OutgoingMessage, RealtimeError> {
        Ok(sdk::OutgoingMessage {
            target: self.target.into(),
            message_type: self.message_type,
            payload: parse_json("payloadJson", &self.payload_json)?,
            class: self.class.unwrap_or(MessageClass::Chat).into(),
            metadata: parse_object("metadataJson", self.metadata_json.as_deref())?,
        })
    }
}

/// How to settle an open conflict.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum ConflictChoice {
    /// Keep the value the server holds now.
    KeepServer,
    /// Keep this device's side.
    KeepMine,
    /// Write this value (JSON text of the whole new value; `null` deletes).
    Value {
        /// The value.
        value_json: String,
    },
}

impl ConflictChoice {
    /// Core's resolution, with the JSON parsed.
    pub(crate) fn into_core(self) -> Result<sdk::Resolution, RealtimeError> {
        Ok(match self {
            ConflictChoice::KeepServer => sdk::Resolution::KeepServer,
            ConflictChoice::KeepMine => sdk::Resolution::KeepMine,
            ConflictChoice::Value { value_json } => {
                sdk::Resolution::Value(parse_json("valueJson", &value_json)?)
            }
        })
    }
}

// ---------------------------------------------------------------------------------------
// What the app receives

/// A message delivered to this user.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct ReceivedMessage {
    /// The message's id.
    pub message_id: String,
    /// The sender's type, e.g. `chat.text`.
    pub message_type: String,
    /// The class it was sent with.
    pub interaction_class: InteractionClass,
    /// The tenant.
    pub tenant_id: String,
    /// The sending user.
    pub sender_id: String,
    /// The recipient of a direct message.
    pub recipient_id: Option<String>,
    /// The room of a room message.
    pub room_id: Option<String>,
    /// The content, as JSON text.
    pub payload_json: String,
    /// When the server accepted it (ms since the epoch).
    pub timestamp_ms: i64,
    /// The sender's extra data, as JSON text of an object.
    pub metadata_json: Option<String>,
    /// Its event id in the tenant's log (durable classes only).
    pub event_id: Option<String>,
    /// Its position in the tenant's log (durable classes only).
    pub sequence: Option<u64>,
}

impl From<protocol::WebSocketMessage> for ReceivedMessage {
    fn from(m: protocol::WebSocketMessage) -> Self {
        Self {
            payload_json: json_text(&m.payload),
            metadata_json: object_text(&m.metadata),
            message_id: m.message_id,
            message_type: m.message_type,
            interaction_class: m.interaction_class.into(),
            tenant_id: m.tenant_id,
            sender_id: m.sender_id,
            recipient_id: m.recipient_id,
            room_id: m.room_id,
            timestamp_ms: epoch_ms(m.timestamp),
            event_id: m.event_id,
            sequence: m.sequence,
        }
    }
}

/// A durable event of the tenant's log (Class B streams).
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct BusEvent {
    /// The event's id.
    pub event_id: String,
    /// Dotted type, e.g. `order.placed`.
    pub event_type: String,
    /// The tenant.
    pub tenant_id: String,
    /// When the server accepted it (ms since the epoch).
    pub timestamp_ms: i64,
    /// The content, as JSON text.
    pub payload_json: String,
    /// The producer, e.g. `order-service`.
    pub source: String,
    /// All metadata (source, correlation and causation ids, extra keys), as JSON text.
    pub metadata_json: String,
    /// The payload's schema version.
    pub schema_version: String,
    /// Its position in the tenant's log.
    pub sequence: Option<u64>,
}

impl From<protocol::Event> for BusEvent {
    fn from(e: protocol::Event) -> Self {
        Self {
            payload_json: json_text(&e.payload),
            metadata_json: serde_json::to_string(&e.metadata).unwrap_or_else(|_| "{}".into()),
            source: e.metadata.source,
            event_id: e.event_id,
            event_type: e.event_type,
            tenant_id: e.tenant_id,
            timestamp_ms: epoch_ms(e.timestamp),
            schema_version: e.schema_version,
            sequence: e.sequence,
        }
    }
}

/// A user's presence, as announced to the users sharing a room with them.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct UserPresence {
    /// The user.
    pub user_id: String,
    /// The tenant.
    pub tenant_id: String,
    /// The status.
    pub status: PresenceStatus,
    /// When the user was last active (ms since the epoch).
    pub last_active_ms: i64,
    /// The user's presence metadata, as JSON text of an object.
    pub metadata_json: Option<String>,
}

impl From<protocol::PresenceInfo> for UserPresence {
    fn from(p: protocol::PresenceInfo) -> Self {
        Self {
            metadata_json: object_text(&p.metadata),
            user_id: p.user_id,
            tenant_id: p.tenant_id,
            status: p.status.into(),
            last_active_ms: epoch_ms(p.last_active),
        }
    }
}

/// An outbox item: the handle of a message, entity edit or transaction the app handed
/// over, with its delivery status.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct OutboxItem {
    /// The item's id: the message id, operation id or idempotency key.
    pub id: String,
    /// Enqueue order (increasing).
    pub seq: i64,
    /// Its class (B, C or D).
    pub class: InteractionClass,
    /// What it is.
    pub kind: OutboxItemKind,
    /// Where it is in its life.
    pub state: OutboxItemState,
    /// How many times it was handed to a transport.
    pub attempts: u32,
    /// Size of its body in bytes.
    pub bytes: u64,
    /// The last failure, or why it is dead or rejected.
    pub last_error: Option<String>,
    /// The server's sequence or transaction id, once accepted.
    pub server_ref: Option<String>,
    /// When it was handed over (ms since the epoch).
    pub created_at_ms: i64,
    /// When it last changed (ms since the epoch).
    pub updated_at_ms: i64,
}

impl From<store::OutboxItem> for OutboxItem {
    fn from(i: store::OutboxItem) -> Self {
        Self {
            id: i.id,
            seq: i.seq,
            class: i.class.into(),
            kind: i.kind.into(),
            state: i.state.into(),
            attempts: i.attempts,
            bytes: i.bytes,
            last_error: i.last_error,
            server_ref: i.server_ref,
            created_at_ms: epoch_ms(i.created_at),
            updated_at_ms: epoch_ms(i.updated_at),
        }
    }
}

/// An outbox item changed state.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct OutboxChange {
    /// The item's id.
    pub id: String,
    /// What it is.
    pub kind: OutboxItemKind,
    /// Its new state.
    pub state: OutboxItemState,
    /// The server's sequence or transaction id, once accepted.
    pub server_ref: Option<String>,
    /// The last error, or why it is dead or rejected.
    pub error: Option<String>,
}

impl From<sdk::OutboxUpdate> for OutboxChange {
    fn from(u: sdk::OutboxUpdate) -> Self {
        Self {
            id: u.id,
            kind: u.kind.into(),
            state: u.state.into(),
            server_ref: u.server_ref,
            error: u.error,
        }
    }
}

/// A Class D transaction progressed.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct TransactionChange {
    /// The idempotency key (the outbox item's id).
    pub id: String,
    /// The server's transaction id, once it has one.
    pub transaction_id: Option<String>,
    /// Where it is.
    pub status: TransactionStatus,
    /// Why it was rejected.
    pub reason: Option<String>,
}

impl From<sdk::TransactionUpdate> for TransactionChange {
    fn from(u: sdk::TransactionUpdate) -> Self {
        Self {
            id: u.id,
            transaction_id: u.transaction_id,
            status: u.status.into(),
            reason: u.reason,
        }
    }
}

/// One side of a conflict: an edit of the entity.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct EntityOperation {
    /// The edit's id.
    pub operation_id: String,
    /// The installation that made it.
    pub client_id: String,
    /// True when this installation made it ("mine").
    pub is_local: bool,
    /// Create, update or delete.
    pub operation_type: OperationType,
    /// The value (create) or merge patch (update), as JSON text.
    pub payload_json: String,
    /// When it was made (ms since the epoch, server-corrected clock).
    pub timestamp_ms: i64,
}

impl EntityOperation {
    fn new(op: &protocol::Operation, local_client: &str) -> Self {
        Self {
            operation_id: op.operation_id.clone(),
            client_id: op.client_id.clone(),
            is_local: op.client_id == local_client,
            operation_type: op.operation_type.into(),
            payload_json: json_text(&op.payload),
            timestamp_ms: epoch_ms(op.timestamp),
        }
    }
}

/// How a conflict was resolved.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct ConflictOutcome {
    /// The strategy that decided.
    pub strategy: ResolutionStrategy,
    /// When (ms since the epoch).
    pub resolved_at_ms: i64,
    /// The user who decided (manual resolutions).
    pub resolved_by: Option<String>,
    /// The entity's value after the resolution, as JSON text (`null`: deleted).
    pub result_json: String,
}

/// Two concurrent edits of one entity, with both sides.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct EntityConflict {
    /// The conflict's id (for `resolveConflict`).
    pub conflict_id: String,
    /// The entity's type.
    pub entity_type: String,
    /// The entity's id.
    pub entity_id: String,
    /// The incoming edit, then the applied edit it is concurrent with.
    pub operations: Vec<EntityOperation>,
    /// When it was detected (ms since the epoch).
    pub detected_at_ms: i64,
    /// How it was resolved; absent while a MANUAL conflict is open.
    pub outcome: Option<ConflictOutcome>,
}

impl EntityConflict {
    /// The conflict as the app sees it; `local_client` marks this installation's side.
    pub(crate) fn new(c: &protocol::Conflict, local_client: &str) -> Self {
        Self {
            conflict_id: c.conflict_id.clone(),
            entity_type: c.entity_type.clone(),
            entity_id: c.entity_id.clone(),
            operations: c
                .operations
                .iter()
                .map(|o| EntityOperation::new(o, local_client))
                .collect(),
            detected_at_ms: epoch_ms(c.detected_at),
            outcome: c.resolution.as_ref().map(|r| ConflictOutcome {
                strategy: r.strategy.into(),
                resolved_at_ms: epoch_ms(r.resolved_at),
                resolved_by: r.resolved_by.clone(),
                result_json: json_text(&r.result),
            }),
        }
    }
}

/// An entity as cached on this device: the server's state with this device's pending
/// edits applied on top.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct CachedEntity {
    /// The entity's type.
    pub entity_type: String,
    /// The entity's id.
    pub entity_id: String,
    /// The value the app shows, as JSON text (`null` when deleted or never created).
    pub value_json: String,
    /// True once deleted.
    pub deleted: bool,
    /// The server's last known value, as JSON text.
    pub server_value_json: String,
    /// The server's version of that value (0: never seen from the server).
    pub server_version: u64,
    /// Local edits not yet reconciled with the server (0: in sync).
    pub pending_edits: u32,
    /// Open conflicts on this entity.
    pub conflicts: Vec<EntityConflict>,
    /// When the cache entry last changed (ms since the epoch).
    pub updated_at_ms: i64,
}

impl CachedEntity {
    /// The entity as the app sees it; `local_client` marks this installation's sides.
    pub(crate) fn new(e: &store::CachedEntity, local_client: &str) -> Self {
        Self {
            entity_type: e.entity_type.clone(),
            entity_id: e.entity_id.clone(),
            value_json: json_text(&e.value.data),
            deleted: e.value.deleted,
            server_value_json: json_text(&e.base.data),
            server_version: e.base_version,
            pending_edits: u32::try_from(e.pending.len()).unwrap_or(u32::MAX),
            conflicts: e
                .conflicts
                .iter()
                .map(|c| EntityConflict::new(c, local_client))
                .collect(),
            updated_at_ms: epoch_ms(e.updated_at),
        }
    }
}

/// Time spent in one connection state.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct StateTime {
    /// The state.
    pub state: ConnectionState,
    /// Milliseconds spent in it since the client opened.
    pub millis: u64,
}

/// Figures for the app's diagnostics.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ClientMetrics {
    /// The connection state.
    pub state: ConnectionState,
    /// Outbox items not yet settled.
    pub outbox_items: u64,
    /// Their bytes.
    pub outbox_bytes: u64,
    /// Age of the oldest unsettled item, in ms.
    pub oldest_item_age_ms: Option<u64>,
    /// Most attempts of any unsettled item.
    pub max_attempts: u32,
    /// Dead items waiting for the app's decision.
    pub dead_items: u64,
    /// Time spent in each state since the client opened.
    pub time_in_states: Vec<StateTime>,
    /// Estimated server clock minus device clock, in ms.
    pub clock_offset_ms: Option<i64>,
    /// Connection attempts since the last success.
    pub retry_attempts: u32,
    /// Times the client's background task woke up since it opened (energy use).
    pub supervisor_wakeups: u64,
    /// Times the store failed to record what the server sent (fetched again later):
    /// non-zero means storage trouble (full disk), not the network.
    pub storage_failures: u64,
    /// Answers and frames from the server that broke the protocol: a broken or hostile
    /// server, not the network.
    pub protocol_errors: u64,
}

impl From<sdk::ClientMetrics> for ClientMetrics {
    fn from(m: sdk::ClientMetrics) -> Self {
        Self {
            state: m.state.into(),
            outbox_items: m.outbox_items as u64,
            outbox_bytes: m.outbox_bytes,
            oldest_item_age_ms: m.oldest_item_age.map(duration_ms),
            max_attempts: m.max_attempts,
            dead_items: m.dead_items as u64,
            time_in_states: m
                .time_in_states
                .into_iter()
                .map(|(state, d)| StateTime {
                    state: state.into(),
                    millis: duration_ms(d),
                })
                .collect(),
            clock_offset_ms: m.clock_offset_ms,
            retry_attempts: m.retry_attempts,
            supervisor_wakeups: m.supervisor_wakeups,
            storage_failures: m.storage_failures,
            protocol_errors: m.protocol_errors,
        }
    }
}

/// Everything a listener receives, in order. The first update of every subscription
/// is `CurrentState`.
#[derive(Debug, Clone, PartialEq, uniffi::Enum)]
pub enum ClientUpdate {
    /// The connection state when the subscription started (always first).
    CurrentState {
        /// The state.
        state: ConnectionState,
    },
    /// The connection state changed.
    StateChanged {
        /// The state before.
        from: ConnectionState,
        /// The state now.
        to: ConnectionState,
        /// Why.
        reason: StateReason,
        /// Milliseconds until the next attempt (Offline, Suspended) or WebSocket probe
        /// (Polling).
        next_retry_in_ms: Option<u64>,
    },
    /// A message arrived (durable ones exactly once and in order).
    MessageReceived {
        /// The message.
        message: ReceivedMessage,
    },
    /// An event of the tenant's log arrived (exactly once, in order).
    EventReceived {
        /// The event.
        event: BusEvent,
    },
    /// A user sharing a room changed presence.
    PresenceChanged {
        /// Their presence.
        presence: UserPresence,
    },
    /// An outbox item (message, edit, transaction) changed state.
    OutboxChanged {
        /// The change.
        change: OutboxChange,
    },
    /// An entity's cached value changed (a local edit, or the server's).
    EntityChanged {
        /// The entity now.
        entity: CachedEntity,
    },
    /// The server reported a conflict (resolved by its strategy, or open for MANUAL).
    ConflictReported {
        /// The conflict.
        conflict: EntityConflict,
    },
    /// A Class D transaction progressed.
    TransactionChanged {
        /// The change.
        change: TransactionChange,
    },
    /// Continuity was lost; entities were refreshed, older events were missed.
    Discontinuity {
        /// Why.
        reason: String,
    },
    /// A room join or leave was answered.
    RoomChanged {
        /// The room.
        room_id: String,
        /// Member now.
        joined: bool,
        /// Why a join was refused.
        error: Option<String>,
    },
    /// This listener fell behind and `count` updates were skipped: re-read what the
    /// app shows (outbox, entities). `state` is the connection state now.
    Missed {
        /// How many updates were skipped.
        count: u64,
        /// The connection state now.
        state: ConnectionState,
    },
}

impl ClientUpdate {
    /// The app's view of a core update; `local_client` marks this installation's sides
    /// of conflicts.
    pub(crate) fn new(update: sdk::Update, local_client: &str) -> Self {
        match update {
            sdk::Update::State(s) => ClientUpdate::StateChanged {
                from: s.from.into(),
                to: s.to.into(),
                reason: s.reason.into(),
                next_retry_in_ms: s.next_retry_in.map(duration_ms),
            },
            sdk::Update::Message(m) => ClientUpdate::MessageReceived { message: m.into() },
            sdk::Update::Event(e) => ClientUpdate::EventReceived { event: e.into() },
            sdk::Update::Presence(p) => ClientUpdate::PresenceChanged { presence: p.into() },
            sdk::Update::Outbox(o) => ClientUpdate::OutboxChanged { change: o.into() },
            sdk::Update::Entity(e) => ClientUpdate::EntityChanged {
                entity: CachedEntity::new(&e, local_client),
            },
            sdk::Update::Conflict(c) => ClientUpdate::ConflictReported {
                conflict: EntityConflict::new(&c, local_client),
            },
            sdk::Update::Transaction(t) => ClientUpdate::TransactionChanged { change: t.into() },
            sdk::Update::Discontinuity { reason } => ClientUpdate::Discontinuity { reason },
            sdk::Update::Room {
                room_id,
                joined,
                error,
            } => ClientUpdate::RoomChanged {
                room_id,
                joined,
                error,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_name_the_field_and_never_echo_the_text() {
        let err = parse_json("payloadJson", "{\"secret\": tok").unwrap_err();
        match err {
            RealtimeError::InvalidInput { field, problem } => {
                assert_eq!(field, "payloadJson");
                assert!(!problem.contains("secret"), "{problem}");
                assert!(!problem.contains("tok"), "{problem}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_object("metadataJson", Some("[1]")),
            Err(RealtimeError::invalid(
                "metadataJson",
                "must be a JSON object"
            ))
        );
        assert_eq!(parse_object("metadataJson", None), Ok(None));
    }

    #[test]
    fn an_outgoing_message_defaults_to_chat() {
        let m = OutgoingMessage {
            target: MessageTarget::Room {
                room_id: "r".into(),
            },
            message_type: "chat.text".into(),
            payload_json: r#"{"text":"hi"}"#.into(),
            class: None,
            metadata_json: Some(r#"{"k":1}"#.into()),
        }
        .into_core()
        .unwrap();
        assert_eq!(m.class, sdk::MessageClass::Chat);
        assert_eq!(m.target, sdk::Target::Room("r".into()));
        assert_eq!(m.payload, serde_json::json!({"text": "hi"}));
        assert_eq!(m.metadata.unwrap()["k"], 1);
    }
}
