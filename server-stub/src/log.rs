//! The durable per-tenant log (PROTOCOL.md §3 "Delivery", §4 polling and publishing):
//! what is the same on both storage engines.
//!
//! Every durable message and bus event gets the tenant's next `sequence` and a UUIDv7
//! `eventId` and is stored as its `Event` JSON, with its audience (a recipient, a room,
//! or the whole tenant; the sender always sees what it sent). A [`Draft`] is what is
//! about to be appended; an engine gives it its sequence and [`Draft::render`] writes
//! the stored JSON and the frame that delivers it live, so both engines store the same
//! bytes. After the commit the engine hands the event to the [`crate::feed::Feed`],
//! which fans it out in sequence order.
//!
//! [`Log`] reads: polls, resumes and cursors are answered from the recent tail in
//! memory when it covers them, from storage otherwise, by the same visibility rule, so
//! a user gets each event once and in order whichever way it travels.

use std::sync::Arc;

use serde_json::value::RawValue;
use webwaka_realtime::protocol::event::{DEFAULT_SCHEMA_VERSION, MESSAGE_EVENT_TYPE};
use webwaka_realtime::protocol::{ErrorCode, Event, EventMetadata, ServerEvent, WebSocketMessage};

use crate::error::{ApiError, StoreError};
use crate::feed::Committed;
use crate::frames::{MessageOut, Rfc3339};
use crate::hub::{Audience, Delivery, Hub};
use crate::metrics::Metrics;
use crate::store::Storage;
use crate::tail::{CursorLookup, Tail, TailEvent};

/// Where an appended event sits in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Appended {
    pub(crate) event_id: String,
    pub(crate) seq: u64,
    /// True when the id was seen before: nothing was appended or delivered.
    pub(crate) duplicate: bool,
}

/// A bus event to append.
#[derive(Debug, Clone)]
pub(crate) struct NewEvent {
    pub(crate) event_id: Option<String>,
    pub(crate) event_type: String,
    pub(crate) payload: serde_json::Value,
    pub(crate) metadata: EventMetadata,
    pub(crate) schema_version: Option<String>,
    pub(crate) recipient_id: Option<String>,
    pub(crate) room_id: Option<String>,
    pub(crate) sender_id: Option<String>,
}

/// What is about to be appended to a tenant's log.
#[derive(Debug, Clone)]
pub(crate) enum Draft {
    /// A durable message (idempotent by sender and `messageId`); `exclude` is the
    /// sending connection, which gets an ack instead of the delivery.
    Message {
        message: WebSocketMessage,
        exclude: Option<u64>,
    },
    /// A bus event (idempotent by `eventId` when it names one).
    Event(NewEvent),
}

/// What makes an append a duplicate of an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Idempotency<'a> {
    /// A sender's message id.
    Message {
        sender: &'a str,
        message_id: &'a str,
    },
    /// A publisher's event id.
    Event(&'a str),
    /// Nothing: always appended.
    None,
}

/// A draft with its sequence: the stored row and the live frame.
#[derive(Debug)]
pub(crate) struct Rendered {
    /// The row (its JSON body included), as the tail keeps it.
    pub(crate) event: TailEvent,
    pub(crate) event_type: String,
    pub(crate) message_id: Option<String>,
    /// The frame that delivers it live.
    pub(crate) delivery: Arc<Delivery>,
    pub(crate) exclude: Option<u64>,
}

impl Rendered {
    /// What the feed gets after the commit.
    pub(crate) fn committed(self) -> Committed {
        Committed {
            event: self.event,
            delivery: self.delivery,
            exclude: self.exclude,
        }
    }
}

fn new_event_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// An [`Event`], borrowed, so that its JSON is written in one pass (a message as the
/// payload without first making it a `Value`, a published payload without copying
/// it). Same fields, names and order as [`Event`]; tests check that it decodes to the
/// same event and is written as core writes it.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct EventOut<'a, P: serde::Serialize + ?Sized> {
    event_id: &'a str,
    event_type: &'a str,
    tenant_id: &'a str,
    timestamp: Rfc3339<'a>,
    payload: &'a P,
    metadata: &'a EventMetadata,
    schema_version: &'a str,
    sequence: u64,
}

impl Draft {
    /// What makes this draft a duplicate.
    pub(crate) fn idempotency(&self) -> Idempotency<'_> {
        match self {
            Draft::Message { message, .. } => Idempotency::Message {
                sender: &message.sender_id,
                message_id: &message.message_id,
            },
            Draft::Event(new) => match &new.event_id {
                Some(id) => Idempotency::Event(id),
                None => Idempotency::None,
            },
        }
    }

    /// The stored JSON and live frame of this draft as event `seq` of `tenant` (the
    /// draft is kept: an engine that must run a transaction again renders it again).
    pub(crate) fn render(&self, tenant: &str, seq: u64) -> Result<Rendered, StoreError> {
        let boxed = |s: &Option<String>| s.as_deref().map(Into::into);
        match self {
            Draft::Message { message, exclude } => {
                let event_id = new_event_id();
                let mut metadata = EventMetadata::from_source(message.sender_id.clone());
                metadata.user_id = Some(message.sender_id.clone());
                // Written once: the event's payload and the delivery frame's data.
                let data = serde_json::value::to_raw_value(
                    &MessageOut::new(message).placed(&event_id, seq),
                )?;
                let body = serde_json::to_string(&EventOut {
                    event_id: &event_id,
                    event_type: MESSAGE_EVENT_TYPE,
                    tenant_id: tenant,
                    timestamp: Rfc3339(&message.timestamp),
                    payload: &*data,
                    metadata: &metadata,
                    schema_version: DEFAULT_SCHEMA_VERSION,
                    sequence: seq,
                })?;
                let delivery =
                    Delivery::text(crate::frames::message_frame_around(&data), Some(seq));
                Ok(Rendered {
                    event: TailEvent {
                        seq,
                        event_id: event_id.into(),
                        created_ms: message.timestamp.timestamp_millis(),
                        recipient: boxed(&message.recipient_id),
                        room: boxed(&message.room_id),
                        sender: Some(message.sender_id.as_str().into()),
                        body: Arc::new(body),
                    },
                    event_type: MESSAGE_EVENT_TYPE.to_owned(),
                    message_id: Some(message.message_id.clone()),
                    delivery,
                    exclude: *exclude,
                })
            }
            Draft::Event(new) => {
                let event_id = new.event_id.clone().unwrap_or_else(new_event_id);
                let now = chrono::Utc::now();
                let body = serde_json::to_string(&EventOut {
                    event_id: &event_id,
                    event_type: &new.event_type,
                    tenant_id: tenant,
                    timestamp: Rfc3339(&now),
                    payload: &new.payload,
                    metadata: &new.metadata,
                    schema_version: new
                        .schema_version
                        .as_deref()
                        .unwrap_or(DEFAULT_SCHEMA_VERSION),
                    sequence: seq,
                })?;
                let delivery = Delivery::text(event_frame_around(&body), Some(seq));
                Ok(Rendered {
                    event: TailEvent {
                        seq,
                        event_id: event_id.into(),
                        created_ms: now.timestamp_millis(),
                        recipient: boxed(&new.recipient_id),
                        room: boxed(&new.room_id),
                        sender: boxed(&new.sender_id),
                        body: Arc::new(body),
                    },
                    event_type: new.event_type.clone(),
                    message_id: None,
                    delivery,
                    exclude: None,
                })
            }
        }
    }
}

/// The `event` frame around a stored event's JSON: core's
/// `ServerEvent::Event(event).encode(None)`, without decoding the event (a test
/// compares them).
fn event_frame_around(body: &str) -> String {
    let mut frame = String::with_capacity(body.len() + 26);
    frame.push_str(r#"{"event":"event","data":"#);
    frame.push_str(body);
    frame.push('}');
    frame
}

/// Who receives a stored event live: its room's members, its recipient and its
/// sender; the whole tenant when it names neither recipient nor room.
pub(crate) fn audience_of(event: &TailEvent) -> Audience {
    let mut users = Vec::with_capacity(2);
    users.extend(event.recipient.as_deref().map(str::to_owned));
    if let Some(sender) = event.sender.as_deref()
        && event.recipient.as_deref() != Some(sender)
    {
        users.push(sender.to_owned());
    }
    Audience {
        everyone: event.recipient.is_none() && event.room.is_none(),
        room: event.room.as_deref().map(str::to_owned),
        users,
    }
}

/// The frame that delivers a stored event live, from its stored JSON: `message` (the
/// payload as it is) for a durable message, `event` otherwise. The same bytes as the
/// frame made when it was appended.
pub(crate) fn delivery_of(event: &TailEvent) -> Arc<Delivery> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Head<'a> {
        #[serde(borrow)]
        event_type: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        payload: &'a RawValue,
    }
    let text = match serde_json::from_str::<Head<'_>>(&event.body) {
        Ok(head) if head.event_type == MESSAGE_EVENT_TYPE => {
            crate::frames::message_frame_around(head.payload)
        }
        _ => event_frame_around(&event.body),
    };
    Delivery::text(text, Some(event.seq))
}

/// The frame that delivers a stored event on a resume: `message` for a durable
/// message, `event` otherwise.
pub(crate) fn frame_for(event: Event) -> ServerEvent {
    match event.message() {
        Some(Ok(message)) => ServerEvent::Message(message),
        _ => ServerEvent::Event(event),
    }
}

/// Whose view of the log a read takes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Viewer<'a> {
    /// A user: tenant-wide events, their own, theirs as recipient, their rooms'.
    User(&'a str),
    /// A super admin acting in the tenant (with a justification): every event.
    Everything,
}

/// One stored event as read back: its sequence, its id and its `Event` JSON (shared
/// with the log's tail when read from there).
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) seq: u64,
    pub(crate) event_id: Arc<str>,
    pub(crate) body: Arc<String>,
}

/// The retention cutoff: events created before it are gone (or about to be).
pub(crate) fn retention_cutoff(retention_ms: u64) -> i64 {
    crate::time::now_ms().saturating_sub(i64::try_from(retention_ms).unwrap_or(i64::MAX))
}

/// A cursor found at (sequence, creation time), or not found: its sequence or why not.
fn judge_cursor(
    event_id: &str,
    found: Option<(u64, i64)>,
    cutoff_ms: i64,
) -> Result<u64, ApiError> {
    match found {
        Some((seq, created)) if created >= cutoff_ms => Ok(seq),
        Some(_) => Err(ApiError::new(
            ErrorCode::CursorExpired,
            "lastEventId is older than the retention period: refresh from snapshots",
        )
        .with_detail("lastEventId", event_id)),
        None => Err(ApiError::new(
            ErrorCode::CursorExpired,
            "lastEventId is unknown (or no longer retained): refresh from snapshots",
        )
        .with_detail("lastEventId", event_id)),
    }
}

/// Reading and appending to the log: storage, the recent tail in front of it, the hub
/// (room memberships decide what a user sees) and the metrics.
pub(crate) struct Log {
    pub(crate) store: Arc<dyn Storage>,
    pub(crate) tail: Arc<Tail>,
    pub(crate) hub: Arc<Hub>,
    pub(crate) metrics: Arc<Metrics>,
    /// `EVENT_BUS_RETENTION_PERIOD`, ms.
    pub(crate) retention_ms: u64,
    /// The dashboards (messages and live messages are shown while one is open).
    pub(crate) watch: Arc<crate::dashboard::Watch>,
}

impl Log {
    /// The retention cutoff now.
    pub(crate) fn cutoff(&self) -> i64 {
        retention_cutoff(self.retention_ms)
    }

    /// Appends `draft` to `tenant`'s log (see [`Storage::append`]).
    pub(crate) async fn append(&self, tenant: &str, draft: Draft) -> Result<Appended, ApiError> {
        Ok(self.store.append(tenant, draft).await?)
    }

    /// Queues `draft` for `tenant`'s log and returns its answer to await (see
    /// [`Storage::queue_append`]).
    pub(crate) async fn queue_append(
        &self,
        tenant: &str,
        draft: Draft,
    ) -> Result<crate::store::PendingAppend, ApiError> {
        Ok(self.store.queue_append(tenant, draft).await?)
    }

    /// The sequence of cursor `event_id` if it is still retained, otherwise
    /// `CURSOR_EXPIRED`: from the recent tail when the cursor is in it, from storage
    /// otherwise.
    pub(crate) async fn find_cursor(&self, tenant: &str, event_id: &str) -> Result<u64, ApiError> {
        let cutoff = self.cutoff();
        match self.cursor_in_tail(tenant, event_id, cutoff) {
            Some(judged) => judged,
            None => {
                let found = self.store.cursor(tenant, event_id).await?;
                judge_cursor(event_id, found, cutoff)
            }
        }
    }

    /// [`Log::find_cursor`]'s answer from the recent tail; `None` when the tail does
    /// not have the cursor (ask storage).
    fn cursor_in_tail(
        &self,
        tenant: &str,
        event_id: &str,
        cutoff_ms: i64,
    ) -> Option<Result<u64, ApiError>> {
        match self.tail.cursor(tenant, event_id) {
            CursorLookup::Found { seq, created_ms } => {
                Some(judge_cursor(event_id, Some((seq, created_ms)), cutoff_ms))
            }
            CursorLookup::Unknown => None,
        }
    }

    /// A page of the log for a poll: up to `limit` events after cursor `cursor` (from
    /// the start of retention when `None`) that `viewer` may see.
    pub(crate) async fn page(
        &self,
        tenant: &str,
        viewer: Viewer<'_>,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Stored>, ApiError> {
        let after = match cursor {
            None => 0,
            Some(cursor) => self.find_cursor(tenant, cursor).await?,
        };
        Ok(self.read_after(tenant, viewer, after, limit).await?)
    }

    /// Up to `limit` events after `after_seq` that `viewer` may see, in sequence order:
    /// from the recent tail when it covers them, from storage otherwise.
    pub(crate) async fn read_after(
        &self,
        tenant: &str,
        viewer: Viewer<'_>,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<Stored>, StoreError> {
        let cutoff = self.cutoff();
        let page = self.tail_page(tenant, viewer, after_seq, cutoff, limit);
        self.metrics.log_read(page.is_some());
        match page {
            Some(page) => Ok(page),
            None => {
                self.store
                    .visible_after(tenant, viewer, after_seq, cutoff, limit)
                    .await
            }
        }
    }

    /// The visibility rule on the recent tail: addressed to everyone, to the user, sent
    /// by the user, or to a room the user is a member of now (the hub mirrors the
    /// stored memberships). `None`: the tail does not cover `after_seq`.
    fn tail_page(
        &self,
        tenant: &str,
        viewer: Viewer<'_>,
        after_seq: u64,
        cutoff_ms: i64,
        limit: u32,
    ) -> Option<Vec<Stored>> {
        // Shared, not copied, under the tail's lock.
        let take = |e: &TailEvent| Stored {
            seq: e.seq,
            event_id: Arc::clone(&e.event_id),
            body: Arc::clone(&e.body),
        };
        let limit = limit as usize;
        match viewer {
            Viewer::Everything => {
                self.tail
                    .after(tenant, after_seq, cutoff_ms, limit, |_| true, take)
            }
            Viewer::User(user) => {
                // The user's rooms now, copied so that no writer of the hub waits for
                // the scan (usually a handful, often none).
                let rooms = self.hub.rooms_of(tenant, user);
                let visible = |e: &TailEvent| {
                    (e.recipient.is_none() && e.room.is_none())
                        || e.recipient.as_deref() == Some(user)
                        || e.sender.as_deref() == Some(user)
                        || e.room
                            .as_deref()
                            .is_some_and(|room| rooms.as_ref().is_some_and(|r| r.contains(room)))
                };
                self.tail
                    .after(tenant, after_seq, cutoff_ms, limit, visible, take)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn message() -> WebSocketMessage {
        WebSocketMessage {
            message_id: "m1".into(),
            message_type: "chat.text".into(),
            interaction_class: webwaka_realtime::protocol::InteractionClass::ClassC,
            tenant_id: "t".into(),
            sender_id: "alice".into(),
            recipient_id: Some("bob".into()),
            room_id: None,
            payload: serde_json::json!({"text": "hi", "n": [1, 2]}),
            timestamp: chrono::Utc::now(),
            metadata: None,
            event_id: None,
            sequence: None,
        }
    }

    /// The one-pass body of a durable message decodes to the event the `Value` path
    /// makes, and its frame is core's.
    #[test]
    fn a_message_event_body_is_the_event() {
        let m = message();
        let rendered = Draft::Message {
            message: m.clone(),
            exclude: Some(3),
        }
        .render("t", 9)
        .unwrap();
        let body = rendered.event.body.as_str();
        let event: Event = serde_json::from_str(body).unwrap();
        let mut delivered = m.clone();
        delivered.event_id = Some(event.event_id.clone());
        delivered.sequence = Some(9);
        let mut metadata = EventMetadata::from_source("alice");
        metadata.user_id = Some("alice".into());
        let expected = Event {
            event_id: event.event_id.clone(),
            event_type: MESSAGE_EVENT_TYPE.into(),
            tenant_id: "t".into(),
            timestamp: m.timestamp,
            payload: serde_json::to_value(&delivered).unwrap(),
            metadata,
            schema_version: DEFAULT_SCHEMA_VERSION.into(),
            sequence: Some(9),
        };
        assert_eq!(event, expected);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(body).unwrap(),
            serde_json::to_value(&expected).unwrap()
        );
        assert_eq!(
            rendered.delivery.text.as_str(),
            ServerEvent::Message(delivered).encode(None)
        );
        assert_eq!(rendered.exclude, Some(3));
        assert_eq!(rendered.message_id.as_deref(), Some("m1"));
    }

    /// A frame rebuilt from the stored row (another instance's event, a catch-up read)
    /// is the frame made at the append, for messages and for events.
    #[test]
    fn a_stored_event_is_delivered_with_the_frame_of_its_append() {
        let rendered = Draft::Message {
            message: message(),
            exclude: None,
        }
        .render("t", 4)
        .unwrap();
        assert_eq!(
            delivery_of(&rendered.event).text,
            rendered.delivery.text,
            "message"
        );
        let rendered = Draft::Event(NewEvent {
            event_id: Some("e-7".into()),
            event_type: "order.placed".into(),
            payload: serde_json::json!({"a": "\"quoted\"", "n": 1.5}),
            metadata: EventMetadata::from_source("svc"),
            schema_version: None,
            recipient_id: None,
            room_id: Some("ops".into()),
            sender_id: Some("svc".into()),
        })
        .render("t", 5)
        .unwrap();
        let event: Event = serde_json::from_str(&rendered.event.body).unwrap();
        assert_eq!(
            rendered.delivery.text.as_str(),
            ServerEvent::Event(event).encode(None)
        );
        assert_eq!(delivery_of(&rendered.event).text, rendered.delivery.text);
        assert_eq!(rendered.event.event_id.as_ref(), "e-7");
    }

    #[test]
    fn the_audience_of_a_row() {
        let rendered = Draft::Message {
            message: message(),
            exclude: None,
        }
        .render("t", 1)
        .unwrap();
        let audience = audience_of(&rendered.event);
        assert!(!audience.everyone);
        assert_eq!(audience.users, ["bob", "alice"]);
        let mut everyone = rendered.event.clone();
        everyone.recipient = None;
        everyone.sender = None;
        assert!(audience_of(&everyone).everyone);
    }
}
