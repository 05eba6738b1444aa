//! The durable per-tenant log (PROTOCOL.md §3 "Delivery", §4 polling and publishing).
//!
//! Every durable message and bus event gets the tenant's next `sequence` and a UUIDv7
//! `eventId` and is stored as its `Event` JSON, with its audience (a recipient, a room,
//! or the whole tenant; the sender always sees what it sent). Appends run on the
//! writer thread; after the commit the event is fanned out to live connections, in
//! sequence order. Polls and resumes read the same rows, so a user gets each event once
//! and in order whichever way it travels.

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};
use webwaka_realtime::protocol::event::{DEFAULT_SCHEMA_VERSION, MESSAGE_EVENT_TYPE};
use webwaka_realtime::protocol::{ErrorCode, Event, EventMetadata, ServerEvent, WebSocketMessage};

use crate::app::App;
use crate::db::{Writer, now_ms};
use crate::error::{ApiError, JobError, StoreError};
use crate::frames::{MessageOut, Rfc3339};
use crate::hub::{Audience, Delivery, Hub};
use crate::metrics::Metrics;
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

/// What the live fan-out needs besides the event.
pub(crate) struct Fanout {
    pub(crate) hub: Arc<Hub>,
    /// Gets every committed event, in order.
    pub(crate) tail: Arc<Tail>,
    pub(crate) metrics: Arc<Metrics>,
    /// The sending connection (it gets an ack instead).
    pub(crate) exclude: Option<u64>,
}

/// The last sequence handed out in `tenant`'s log: the greatest in the log or, when
/// retention emptied the log's end, the one [`purge`] recorded in `tenant_seq` before
/// deleting it. (Appends write no counter row: the log's own primary key is the
/// counter, read once per tenant by the writer and then kept in its cache.)
pub(crate) fn last_seq(conn: &Connection, tenant: &str) -> rusqlite::Result<u64> {
    conn.prepare_cached(
        "SELECT max(coalesce((SELECT max(seq) FROM events WHERE tenant = ?1), 0),
                    coalesce((SELECT last_seq FROM tenant_seq WHERE tenant = ?1), 0))",
    )?
    .query_row([tenant], |row| row.get::<_, i64>(0))
    .map(|n| n as u64)
}

/// Hands out the tenant's next sequence (in the writer's cache; the event row that
/// uses it is what makes it durable).
fn next_seq(w: &mut Writer<'_>, tenant: &str) -> Result<u64, JobError> {
    if let Some(last) = w.cache.tenant_seq.get_mut(tenant) {
        *last += 1;
        return Ok(*last);
    }
    let next = last_seq(w.conn, tenant)? + 1;
    w.cache.tenant_seq.insert(tenant.to_owned(), next);
    Ok(next)
}

/// Gives back the sequence [`next_seq`] just handed out, unused.
fn unuse_seq(w: &mut Writer<'_>, tenant: &str, seq: u64) {
    if let Some(last) = w.cache.tenant_seq.get_mut(tenant)
        && *last == seq
    {
        *last -= 1;
    }
}

/// The columns of one event row besides its JSON body.
struct Row<'a> {
    tenant: &'a str,
    seq: u64,
    event_id: &'a str,
    event_type: &'a str,
    created_ms: i64,
    recipient: Option<&'a str>,
    room: Option<&'a str>,
    sender: Option<&'a str>,
    message_id: Option<&'a str>,
}

/// Stores one event row; `body` is the event's JSON. Returns the event as the log's
/// tail keeps it, or `None`, having written nothing, when the sender's message id is
/// stored already (the unique index finds it in the same descent that inserts, so
/// appends need no lookup first); any other conflict is an error.
fn insert(w: &Writer<'_>, row: &Row<'_>, body: String) -> Result<Option<TailEvent>, JobError> {
    let inserted = w
        .conn
        .prepare_cached(
            "INSERT INTO events (tenant, seq, event_id, event_type, created_ms, recipient_id,
                                 room_id, sender_id, message_id, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (tenant, message_id, sender_id) WHERE message_id IS NOT NULL
             DO NOTHING",
        )?
        .execute(params![
            row.tenant,
            row.seq as i64,
            row.event_id,
            row.event_type,
            row.created_ms,
            row.recipient,
            row.room,
            row.sender,
            row.message_id,
            body,
        ])?;
    Ok((inserted == 1).then(|| TailEvent {
        seq: row.seq,
        event_id: row.event_id.into(),
        created_ms: row.created_ms,
        recipient: row.recipient.map(Into::into),
        room: row.room.map(Into::into),
        sender: row.sender.map(Into::into),
        body: Arc::new(body),
    }))
}

impl Fanout {
    /// After the commit: the event joins the log's tail (in commit order), then goes
    /// to the live connections of its audience.
    fn publish(
        self,
        w: &mut Writer<'_>,
        tenant: String,
        recent: TailEvent,
        audience: Audience,
        delivery: Arc<Delivery>,
    ) {
        w.after_commit(move || {
            self.tail.push(&tenant, recent);
            self.metrics.events_published.inc();
            let sent = self
                .hub
                .deliver(&tenant, &audience, &delivery, self.exclude);
            self.metrics.delivered("ws", sent);
        });
    }
}

/// A durable message's [`Event`], borrowed, so that its JSON is written in one pass
/// (the message as the payload without first making it a `Value`). Same fields, names
/// and order as [`Event`]; a test checks that it decodes to the same event.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct MessageEvent<'a> {
    event_id: &'a str,
    event_type: &'a str,
    tenant_id: &'a str,
    timestamp: Rfc3339<'a>,
    payload: &'a serde_json::value::RawValue,
    metadata: &'a EventMetadata,
    schema_version: &'a str,
    sequence: u64,
}

fn new_event_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Appends a durable message (idempotent by sender and `messageId`) and fans it out
/// after the commit: to the room's members or the recipient, and the sender's other
/// connections.
pub(crate) fn append_message(
    w: &mut Writer<'_>,
    fanout: Fanout,
    mut message: WebSocketMessage,
) -> Result<Appended, JobError> {
    let tenant = message.tenant_id.clone();
    let seq = next_seq(w, &tenant)?;
    let event_id = new_event_id();
    message.event_id = Some(event_id.clone());
    message.sequence = Some(seq);
    let mut metadata = EventMetadata::from_source(message.sender_id.clone());
    metadata.user_id = Some(message.sender_id.clone());
    // The message is written once: the event's payload and the delivery frame's data.
    let data = serde_json::value::to_raw_value(&MessageOut::new(&message))?;
    let body = serde_json::to_string(&MessageEvent {
        event_id: &event_id,
        event_type: MESSAGE_EVENT_TYPE,
        tenant_id: &tenant,
        timestamp: Rfc3339(&message.timestamp),
        payload: &data,
        metadata: &metadata,
        schema_version: DEFAULT_SCHEMA_VERSION,
        sequence: seq,
    })?;
    let inserted = insert(
        w,
        &Row {
            tenant: &tenant,
            seq,
            event_id: &event_id,
            event_type: MESSAGE_EVENT_TYPE,
            created_ms: message.timestamp.timestamp_millis(),
            recipient: message.recipient_id.as_deref(),
            room: message.room_id.as_deref(),
            sender: Some(&message.sender_id),
            message_id: Some(&message.message_id),
        },
        body,
    )?;
    let Some(recent) = inserted else {
        // This sender's message id is stored already: answer with the stored one.
        unuse_seq(w, &tenant, seq);
        let (event_id, seq) = w
            .conn
            .prepare_cached(
                "SELECT event_id, seq FROM events
                 WHERE tenant = ?1 AND sender_id = ?2 AND message_id = ?3",
            )?
            .query_row(
                params![tenant, message.sender_id, message.message_id],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)),
            )?;
        return Ok(Appended {
            event_id,
            seq: seq as u64,
            duplicate: true,
        });
    };
    let audience = Audience {
        everyone: false,
        room: message.room_id.clone(),
        users: match &message.recipient_id {
            Some(recipient) => vec![recipient.clone(), message.sender_id.clone()],
            None => vec![message.sender_id.clone()],
        },
    };
    let delivery = Delivery::text(crate::frames::message_frame_around(&data), Some(seq));
    fanout.publish(w, tenant, recent, audience, delivery);
    Ok(Appended {
        event_id,
        seq,
        duplicate: false,
    })
}

/// Appends a bus event to `tenant`'s log (idempotent by `eventId`) and fans it out
/// after the commit.
pub(crate) fn append_event(
    w: &mut Writer<'_>,
    fanout: Fanout,
    tenant: &str,
    new: NewEvent,
) -> Result<(Appended, Event), JobError> {
    if let Some(event_id) = &new.event_id {
        let existing = w
            .conn
            .prepare_cached("SELECT seq, body FROM events WHERE tenant = ?1 AND event_id = ?2")?
            .query_row(params![tenant, event_id], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })
            .optional()?;
        if let Some((seq, body)) = existing {
            let event: Event = serde_json::from_str(&body)?;
            return Ok((
                Appended {
                    event_id: event_id.clone(),
                    seq: seq as u64,
                    duplicate: true,
                },
                event,
            ));
        }
    }
    let seq = next_seq(w, tenant)?;
    let event_id = new.event_id.unwrap_or_else(new_event_id);
    let event = Event {
        event_id: event_id.clone(),
        event_type: new.event_type,
        tenant_id: tenant.to_owned(),
        timestamp: chrono::Utc::now(),
        payload: new.payload,
        metadata: new.metadata,
        schema_version: new
            .schema_version
            .unwrap_or_else(|| DEFAULT_SCHEMA_VERSION.to_owned()),
        sequence: Some(seq),
    };
    let body = serde_json::to_string(&event)?;
    let inserted = insert(
        w,
        &Row {
            tenant,
            seq,
            event_id: &event.event_id,
            event_type: &event.event_type,
            created_ms: event.timestamp.timestamp_millis(),
            recipient: new.recipient_id.as_deref(),
            room: new.room_id.as_deref(),
            sender: new.sender_id.as_deref(),
            message_id: None,
        },
        body,
    )?;
    // A bus event has no message id: its insert cannot be refused as a duplicate.
    let recent = inserted.ok_or(StoreError::Sqlite(rusqlite::Error::StatementChangedRows(0)))?;
    let mut users: Vec<String> = new.recipient_id.iter().cloned().collect();
    users.extend(new.sender_id.iter().cloned());
    let audience = Audience {
        everyone: new.recipient_id.is_none() && new.room_id.is_none(),
        room: new.room_id,
        users,
    };
    let delivery = Delivery::new(&ServerEvent::Event(event.clone()), Some(seq));
    fanout.publish(w, tenant.to_owned(), recent, audience, delivery);
    Ok((
        Appended {
            event_id,
            seq,
            duplicate: false,
        },
        event,
    ))
}

/// The sequence of cursor `event_id` in `tenant`'s log if it is still retained
/// (created at or after `cutoff_ms`), otherwise `CURSOR_EXPIRED`: from the recent tail
/// when the cursor is in it, from SQLite otherwise.
pub(crate) fn find_cursor(
    app: &App,
    tenant: &str,
    event_id: &str,
    cutoff_ms: i64,
) -> Result<u64, ApiError> {
    match cursor_in_tail(app, tenant, event_id, cutoff_ms) {
        Some(judged) => judged,
        None => {
            let found = app.db.read(|conn| stored_cursor(conn, tenant, event_id))?;
            judge_cursor(event_id, found, cutoff_ms)
        }
    }
}

/// [`find_cursor`]'s answer from the recent tail; `None` when the tail does not have
/// the cursor (ask SQLite).
fn cursor_in_tail(
    app: &App,
    tenant: &str,
    event_id: &str,
    cutoff_ms: i64,
) -> Option<Result<u64, ApiError>> {
    match app.tail.cursor(tenant, event_id) {
        CursorLookup::Found { seq, created_ms } => {
            Some(judge_cursor(event_id, Some((seq, created_ms)), cutoff_ms))
        }
        CursorLookup::Unknown => None,
    }
}

/// The sequence and creation time of event `event_id` in SQLite, if it is there.
fn stored_cursor(
    conn: &Connection,
    tenant: &str,
    event_id: &str,
) -> Result<Option<(u64, i64)>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT seq, created_ms FROM events WHERE tenant = ?1 AND event_id = ?2")?
        .query_row(params![tenant, event_id], |row| {
            Ok((row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)?))
        })
        .optional()?)
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

/// A page of the log for a poll: up to `limit` events after cursor `cursor` (from the
/// start of retention when `None`) that `viewer` may see. Answered from the recent
/// tail when it has the cursor and everything after it; otherwise the cursor and the
/// page are read from SQLite in one go, on one pooled connection.
pub(crate) fn page(
    app: &App,
    tenant: &str,
    viewer: Viewer<'_>,
    cursor: Option<&str>,
    cutoff_ms: i64,
    limit: u32,
) -> Result<Vec<Stored>, ApiError> {
    let after = match cursor {
        None => Some(0),
        Some(cursor) => cursor_in_tail(app, tenant, cursor, cutoff_ms).transpose()?,
    };
    if let Some(page) = from_tail(app, tenant, viewer, after, cutoff_ms, limit) {
        return Ok(page);
    }
    app.db.read(|conn| {
        let after = match cursor {
            None => 0,
            Some(cursor) => {
                match judge_cursor(cursor, stored_cursor(conn, tenant, cursor)?, cutoff_ms) {
                    Ok(seq) => seq,
                    Err(refused) => return Ok(Err(refused)),
                }
            }
        };
        visible_after(conn, tenant, viewer, after, cutoff_ms, limit).map(Ok)
    })?
}

/// Up to `limit` events after `after_seq` that `viewer` may see, in sequence order:
/// from the recent tail when it covers them, from SQLite otherwise.
pub(crate) fn read_after(
    app: &App,
    tenant: &str,
    viewer: Viewer<'_>,
    after_seq: u64,
    cutoff_ms: i64,
    limit: u32,
) -> Result<Vec<Stored>, StoreError> {
    match from_tail(app, tenant, viewer, Some(after_seq), cutoff_ms, limit) {
        Some(page) => Ok(page),
        None => app
            .db
            .read(|conn| visible_after(conn, tenant, viewer, after_seq, cutoff_ms, limit)),
    }
}

/// [`visible_after`]'s answer from the recent tail, if it covers `after_seq` (`None`:
/// a cursor the tail does not know); counts the read as from the tail or, when this
/// gives `None`, from SQLite. The same rule: addressed to everyone, to the user, sent
/// by the user, or to a room the user is a member of now (the hub mirrors the stored
/// memberships).
fn from_tail(
    app: &App,
    tenant: &str,
    viewer: Viewer<'_>,
    after_seq: Option<u64>,
    cutoff_ms: i64,
    limit: u32,
) -> Option<Vec<Stored>> {
    let page = after_seq.and_then(|after| tail_page(app, tenant, viewer, after, cutoff_ms, limit));
    app.metrics.log_read(page.is_some());
    page
}

fn tail_page(
    app: &App,
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
        Viewer::Everything => app
            .tail
            .after(tenant, after_seq, cutoff_ms, limit, |_| true, take),
        Viewer::User(user) => {
            // The user's rooms now, copied so that no writer of the hub waits for the
            // scan (usually a handful, often none).
            let rooms = app.hub.rooms_of(tenant, user);
            let visible = |e: &TailEvent| {
                (e.recipient.is_none() && e.room.is_none())
                    || e.recipient.as_deref() == Some(user)
                    || e.sender.as_deref() == Some(user)
                    || e.room
                        .as_deref()
                        .is_some_and(|room| rooms.as_ref().is_some_and(|r| r.contains(room)))
            };
            app.tail
                .after(tenant, after_seq, cutoff_ms, limit, visible, take)
        }
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

/// Up to `limit` events after `after_seq` that `viewer` may see, in sequence order,
/// read from SQLite.
fn visible_after(
    conn: &Connection,
    tenant: &str,
    viewer: Viewer<'_>,
    after_seq: u64,
    cutoff_ms: i64,
    limit: u32,
) -> Result<Vec<Stored>, StoreError> {
    // One pass over the tenant's log after the cursor, in order, keeping what the
    // viewer may see: addressed to everyone, to them, sent by them, to their rooms (a
    // justified super admin: everything). Indexes per audience would read less, but
    // every durable message paid for them at each commit, more than polls gained.
    let (user, everything) = match viewer {
        Viewer::User(user) => (user, false),
        Viewer::Everything => ("", true),
    };
    let sql = "SELECT seq, event_id, body FROM events
         WHERE tenant = ?1 AND seq > ?2 AND created_ms >= ?5
           AND (?6 OR (recipient_id IS NULL AND room_id IS NULL)
                OR recipient_id = ?3 OR sender_id = ?3
                OR room_id IN (SELECT room_id FROM room_members WHERE tenant = ?1 AND user_id = ?3))
         ORDER BY seq LIMIT ?4";
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(
        params![
            tenant,
            after_seq as i64,
            user,
            i64::from(limit),
            cutoff_ms,
            everything
        ],
        |row| {
            Ok(Stored {
                seq: row.get::<_, i64>(0)? as u64,
                event_id: row.get::<_, String>(1)?.into(),
                body: Arc::new(row.get(2)?),
            })
        },
    )?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row?);
    }
    Ok(out)
}

/// The frame that delivers a stored event over the WebSocket: `message` for a durable
/// message, `event` otherwise.
pub(crate) fn frame_for(event: Event) -> ServerEvent {
    match event.message() {
        Some(Ok(message)) => ServerEvent::Message(message),
        _ => ServerEvent::Event(event),
    }
}

/// Deletes events older than `cutoff_ms` (in chunks) and the consumer-group
/// deliveries that pointed at them. Returns how many events went.
pub(crate) fn purge(w: &mut Writer<'_>, cutoff_ms: i64) -> Result<u64, JobError> {
    // The log's greatest sequence is its counter ([`last_seq`]): first keep it for
    // every tenant losing events in this chunk, in case the whole end of its log goes.
    // (The chunk is the same 5,000 rows the delete takes: never the whole backlog.)
    w.conn
        .prepare_cached(
            "INSERT INTO tenant_seq (tenant, last_seq)
             SELECT t.tenant, (SELECT max(seq) FROM events e WHERE e.tenant = t.tenant)
               FROM (SELECT DISTINCT tenant FROM
                       (SELECT tenant FROM events WHERE created_ms < ?1 LIMIT 5000)) t
              WHERE true
             ON CONFLICT (tenant) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)",
        )?
        .execute([cutoff_ms])?;
    let removed = w
        .conn
        .prepare_cached(
            "DELETE FROM events WHERE (tenant, seq) IN
               (SELECT tenant, seq FROM events WHERE created_ms < ?1 LIMIT 5000)",
        )?
        .execute([cutoff_ms])?;
    if removed > 0 {
        w.conn
            .prepare_cached(
                "DELETE FROM group_deliveries WHERE body IS NULL AND NOT EXISTS
                   (SELECT 1 FROM events e WHERE e.tenant = group_deliveries.tenant
                                             AND e.seq = group_deliveries.seq)",
            )?
            .execute([])?;
    }
    Ok(removed as u64)
}

/// The retention cutoff: events created before it are gone (or about to be).
pub(crate) fn retention_cutoff(retention_ms: u64) -> i64 {
    now_ms().saturating_sub(i64::try_from(retention_ms).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The one-pass body of a durable message decodes to the event the `Value` path
    /// makes.
    #[test]
    fn a_message_event_body_is_the_event() {
        let message = WebSocketMessage {
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
            event_id: Some("e1".into()),
            sequence: Some(9),
        };
        let mut metadata = EventMetadata::from_source("alice");
        metadata.user_id = Some("alice".into());
        let body = serde_json::to_string(&MessageEvent {
            event_id: "e1",
            event_type: MESSAGE_EVENT_TYPE,
            tenant_id: "t",
            timestamp: Rfc3339(&message.timestamp),
            payload: &serde_json::value::to_raw_value(&MessageOut::new(&message)).unwrap(),
            metadata: &metadata,
            schema_version: DEFAULT_SCHEMA_VERSION,
            sequence: 9,
        })
        .unwrap();
        let expected = Event {
            event_id: "e1".into(),
            event_type: MESSAGE_EVENT_TYPE.into(),
            tenant_id: "t".into(),
            timestamp: message.timestamp,
            payload: serde_json::to_value(&message).unwrap(),
            metadata,
            schema_version: DEFAULT_SCHEMA_VERSION.into(),
            sequence: Some(9),
        };
        assert_eq!(serde_json::from_str::<Event>(&body).unwrap(), expected);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap(),
            serde_json::to_value(&expected).unwrap()
        );
    }
}
