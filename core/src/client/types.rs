//! The client's public values: what the app sends, and the [`Update`]s it receives.

use std::time::Duration;

use serde_json::Value;

use crate::machine::{ConnectionState, Reason};
use crate::protocol::{
    Conflict, Event, JsonObject, PresenceInfo, Timestamp, TransactionState, WebSocketMessage,
};
use crate::store::{CachedEntity, ItemKind, ItemState, OutboxItem};

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every member of a room (the user must have joined it).
    Room(String),
    /// One user, on all of their connections.
    User(String),
}

impl Target {
    /// The outbox lane: messages to the same place keep their order.
    pub(crate) fn lane(&self) -> String {
        match self {
            Target::Room(r) => format!("room:{r}"),
            Target::User(u) => format!("user:{u}"),
        }
    }
}

/// The durable classes a message may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MessageClass {
    /// Class B: an event stream (e.g. a feed, notifications).
    Stream,
    /// Class C: chat and collaboration (the default).
    #[default]
    Chat,
}

/// A message the app sends (Class B or C: durable, queued when offline).
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingMessage {
    /// Where to.
    pub target: Target,
    /// The app's type, e.g. `chat.text`.
    pub message_type: String,
    /// The content.
    pub payload: Value,
    /// Class B or C.
    pub class: MessageClass,
    /// Optional extra data.
    pub metadata: Option<JsonObject>,
}

impl OutgoingMessage {
    /// A Class C message to `target`.
    pub fn new(target: Target, message_type: impl Into<String>, payload: Value) -> Self {
        Self {
            target,
            message_type: message_type.into(),
            payload,
            class: MessageClass::Chat,
            metadata: None,
        }
    }
}

/// A change of an outbox item (sent, accepted, dead, confirmed …).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxUpdate {
    /// The item's id (the message id, operation id or idempotency key).
    pub id: String,
    /// What it is.
    pub kind: ItemKind,
    /// Its new state.
    pub state: ItemState,
    /// The server's sequence or transaction id, once accepted.
    pub server_ref: Option<String>,
    /// The last error, or why it is dead or rejected.
    pub error: Option<String>,
}

impl From<&OutboxItem> for OutboxUpdate {
    fn from(item: &OutboxItem) -> Self {
        Self {
            id: item.id.clone(),
            kind: item.kind,
            state: item.state,
            server_ref: item.server_ref.clone(),
            error: item.last_error.clone(),
        }
    }
}

/// A connection state change, as the app sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateUpdate {
    /// The state before.
    pub from: ConnectionState,
    /// The state now.
    pub to: ConnectionState,
    /// Why.
    pub reason: Reason,
    /// How long until the next attempt (Offline, Suspended) or WebSocket probe (Polling).
    pub next_retry_in: Option<Duration>,
}

/// A Class D transaction's progress.
#[derive(Debug, Clone, PartialEq)]
pub struct TransactionUpdate {
    /// The idempotency key (the handle's id).
    pub id: String,
    /// The server's transaction id, once it has one.
    pub transaction_id: Option<String>,
    /// Where it is.
    pub status: TransactionState,
    /// Why it was rejected.
    pub reason: Option<String>,
}

/// Everything the client tells the app, in one stream ([`crate::client::Client::subscribe`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The connection state changed.
    State(StateUpdate),
    /// A message arrived (durable ones exactly once, in order; live ones as they come).
    Message(WebSocketMessage),
    /// A bus event arrived (exactly once, in order).
    Event(Event),
    /// A user sharing a room changed presence.
    Presence(PresenceInfo),
    /// An outbox item changed state.
    Outbox(OutboxUpdate),
    /// An entity's cached value changed.
    Entity(CachedEntity),
    /// The server reported a conflict (resolved by its strategy, or open for MANUAL).
    Conflict(Conflict),
    /// A transaction progressed.
    Transaction(TransactionUpdate),
    /// Continuity was lost: the server no longer had the events after the client's
    /// cursor. Entities were refreshed from the server; events before the oldest the
    /// server still had were missed.
    Discontinuity {
        /// Why.
        reason: String,
    },
    /// A room join or leave was answered.
    Room {
        /// The room.
        room_id: String,
        /// Member now.
        joined: bool,
        /// Why a join was refused.
        error: Option<String>,
    },
}

/// Figures about the client, for the app's diagnostics.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientMetrics {
    /// The connection state.
    pub state: ConnectionState,
    /// Outbox items not yet settled (persisted, in flight, dead).
    pub outbox_items: usize,
    /// Their bytes.
    pub outbox_bytes: u64,
    /// Age of the oldest unsettled item.
    pub oldest_item_age: Option<Duration>,
    /// Most attempts of any unsettled item.
    pub max_attempts: u32,
    /// Dead items waiting for the app's decision.
    pub dead_items: usize,
    /// Time spent in each state since the client opened.
    pub time_in_states: Vec<(ConnectionState, Duration)>,
    /// Estimated server clock minus device clock, in milliseconds.
    pub clock_offset_ms: Option<i64>,
    /// Connection attempts since the retry schedule last started afresh (a socket that
    /// held for `stable_after`, a hint, or Polling; not a socket that broke at once).
    pub retry_attempts: u32,
    /// Times the client's supervisor task woke up (an event or a deadline) since the
    /// client opened: what an idle client costs in wake-ups.
    pub supervisor_wakeups: u64,
    /// Times the store failed to record what the server sent (inbound events, reconcile
    /// answers); each is fetched again later. Non-zero: storage trouble, not network.
    pub storage_failures: u64,
    /// Answers and frames from the server that broke the protocol (garbage JSON, a
    /// frame that does not decode): a broken or hostile server, not the network.
    pub protocol_errors: u64,
}

/// The server's clock as estimated from `connected` and `pong` (NTP-style: the sample
/// with the shortest round trip wins), so that nothing is ordered by a skewed device
/// clock.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ClockOffset {
    best: Option<(Duration, i64)>,
}

impl ClockOffset {
    /// A sample: the request left at `sent` (device clock), the answer carried
    /// `server_time` and arrived after `rtt`.
    pub(crate) fn sample(&mut self, sent: Timestamp, rtt: Duration, server_time: Timestamp) {
        let half = chrono::Duration::from_std(rtt.checked_div(2).unwrap_or_default());
        let midpoint = sent
            .checked_add_signed(half.unwrap_or_default())
            .unwrap_or(sent);
        // Both ends are valid timestamps, so the difference is representable; a server
        // time far off (a broken server) gives a far offset that `server_now` bounds.
        let offset = server_time
            .signed_duration_since(midpoint)
            .num_milliseconds();
        match self.best {
            Some((best_rtt, _)) if best_rtt <= rtt => {}
            _ => self.best = Some((rtt, offset)),
        }
    }

    /// Server minus device, in milliseconds.
    pub(crate) fn offset_ms(&self) -> Option<i64> {
        self.best.map(|(_, o)| o)
    }

    /// The server's time now, by the estimate.
    pub(crate) fn server_now(&self) -> Timestamp {
        let now = chrono::Utc::now();
        chrono::Duration::try_milliseconds(self.offset_ms().unwrap_or(0))
            .and_then(|offset| now.checked_add_signed(offset))
            .unwrap_or(now)
    }
}
