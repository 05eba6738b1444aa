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

/// The server's clock as estimated from `connected` and `pong`, NTP-style: of the last
/// [`CLOCK_SAMPLES`] samples, the one with the shortest round trip wins. Old samples
/// leave the window, so that a device clock set or corrected since is followed within a
/// few heartbeats; a new connection starts a new window. A `connected` frame is a
/// one-way sample (its round trip is not known) and counts only until a pong comes.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClockOffset {
    /// (round trip, or `None` for a one-way sample; server minus device in ms).
    recent: std::collections::VecDeque<(Option<Duration>, i64)>,
}

/// How many recent samples the clock estimate chooses from (NTP's clock filter keeps
/// eight): four minutes of heartbeats at the default 30 s.
pub(crate) const CLOCK_SAMPLES: usize = 8;

impl ClockOffset {
    /// A sample: the request left at `sent` (device clock), the answer carried
    /// `server_time` and arrived after `rtt`.
    pub(crate) fn sample(&mut self, sent: Timestamp, rtt: Duration, server_time: Timestamp) {
        let half = chrono::Duration::from_std(rtt.checked_div(2).unwrap_or_default());
        let midpoint = sent
            .checked_add_signed(half.unwrap_or_default())
            .unwrap_or(sent);
        self.push(Some(rtt), offset_ms(server_time, midpoint));
    }

    /// A new connection's `connected`, which carried `server_time` and arrived at
    /// `received`: the window starts again from it.
    pub(crate) fn sample_connected(&mut self, received: Timestamp, server_time: Timestamp) {
        self.recent.clear();
        self.push(None, offset_ms(server_time, received));
    }

    fn push(&mut self, rtt: Option<Duration>, offset: i64) {
        if self.recent.len() >= CLOCK_SAMPLES {
            self.recent.pop_front();
        }
        self.recent.push_back((rtt, offset));
    }

    /// Server minus device, in milliseconds.
    pub(crate) fn offset_ms(&self) -> Option<i64> {
        self.recent
            .iter()
            .min_by_key(|(rtt, _)| rtt.unwrap_or(Duration::MAX))
            .map(|(_, offset)| *offset)
    }

    /// The server's time now, by the estimate.
    pub(crate) fn server_now(&self) -> Timestamp {
        let now = chrono::Utc::now();
        chrono::Duration::try_milliseconds(self.offset_ms().unwrap_or(0))
            .and_then(|offset| now.checked_add_signed(offset))
            .unwrap_or(now)
    }
}

/// `server_time` minus `device_time`, in ms. Both are valid timestamps, so the
/// difference is representable; a server time far off (a broken server) gives a far
/// offset that `server_now` bounds.
fn offset_ms(server_time: Timestamp, device_time: Timestamp) -> i64 {
    server_time
        .signed_duration_since(device_time)
        .num_milliseconds()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::arithmetic_side_effects)]

    use super::*;

    fn at(ms: i64) -> Timestamp {
        chrono::DateTime::from_timestamp_millis(1_800_000_000_000 + ms).unwrap()
    }

    #[test]
    fn a_pong_replaces_the_one_way_estimate_of_connected() {
        let mut clock = ClockOffset::default();
        // `connected` left the server 40 ms before it arrived: one way, biased.
        clock.sample_connected(at(1_040), at(1_000));
        assert_eq!(clock.offset_ms(), Some(-40));
        // A pong with a 20 ms round trip: the server's time at its midpoint.
        clock.sample(at(2_000), Duration::from_millis(20), at(2_010));
        assert_eq!(clock.offset_ms(), Some(0));
        // A slower one does not displace it.
        clock.sample(at(3_000), Duration::from_millis(200), at(3_500));
        assert_eq!(clock.offset_ms(), Some(0));
    }

    #[test]
    fn a_device_clock_set_back_is_followed_within_the_window() {
        let mut clock = ClockOffset::default();
        clock.sample(at(0), Duration::from_millis(2), at(1));
        assert_eq!(clock.offset_ms(), Some(0));
        // The device clock goes back an hour: later samples see the server an hour
        // ahead, over slower round trips than the first.
        let hour = 3_600_000;
        for i in 0..CLOCK_SAMPLES as i64 {
            clock.sample(
                at(i * 30_000),
                Duration::from_millis(10),
                at(i * 30_000 + 5 + hour),
            );
            let expected = if i + 1 < CLOCK_SAMPLES as i64 {
                0
            } else {
                hour
            };
            assert_eq!(clock.offset_ms(), Some(expected), "after {} samples", i + 1);
        }
        // A new connection starts a new window at once.
        clock.sample_connected(at(0), at(7));
        assert_eq!(clock.offset_ms(), Some(7));
    }
}
