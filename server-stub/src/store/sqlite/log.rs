//! The durable log in SQLite: the `events` table, its sequence counter, reads by
//! visibility, retention.

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};

use super::db::Writer;
use crate::error::{JobError, StoreError};
use crate::feed::Feed;
use crate::log::{Appended, Draft, Idempotency, Rendered, Stored, Viewer};

/// The last sequence handed out in `tenant`'s log: the greatest in the log or, when
/// retention emptied the log's end, the one [`purge`] recorded in `tenant_seq` before
/// deleting it. (Appends write no counter row: the log's own primary key is the
/// counter, read once per tenant by the writer and then kept in its cache.)
pub(super) fn last_seq(conn: &Connection, tenant: &str) -> rusqlite::Result<u64> {
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

/// Stores one rendered event; false, having written nothing, when the sender's
/// message id is stored already (the unique index finds it in the same descent that
/// inserts, so appends need no lookup first). Any other conflict is an error.
fn insert(w: &Writer<'_>, tenant: &str, r: &Rendered) -> Result<bool, JobError> {
    let e = &r.event;
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
            tenant,
            e.seq as i64,
            &*e.event_id,
            r.event_type,
            e.created_ms,
            e.recipient.as_deref(),
            e.room.as_deref(),
            e.sender.as_deref(),
            r.message_id,
            e.body.as_str(),
        ])?;
    Ok(inserted == 1)
}

/// Appends `draft` to `tenant`'s log on the writer (idempotent) and hands it to the
/// feed after the commit.
pub(super) fn append(
    w: &mut Writer<'_>,
    feed: &Arc<Feed>,
    tenant: &str,
    draft: Draft,
) -> Result<Appended, JobError> {
    if let Idempotency::Event(event_id) = draft.idempotency()
        && let Some(seq) = w
            .conn
            .prepare_cached("SELECT seq FROM events WHERE tenant = ?1 AND event_id = ?2")?
            .query_row(params![tenant, event_id], |row| row.get::<_, i64>(0))
            .optional()?
    {
        return Ok(Appended {
            event_id: event_id.to_owned(),
            seq: seq as u64,
            duplicate: true,
        });
    }
    let message_key = match draft.idempotency() {
        Idempotency::Message { sender, message_id } => {
            Some((sender.to_owned(), message_id.to_owned()))
        }
        _ => None,
    };
    let seq = next_seq(w, tenant)?;
    let rendered = draft.render(tenant, seq)?;
    if !insert(w, tenant, &rendered)? {
        // This sender's message id is stored already: answer with the stored one.
        unuse_seq(w, tenant, seq);
        let (sender, message_id) = message_key.unwrap_or_default();
        let (event_id, seq) = w
            .conn
            .prepare_cached(
                "SELECT event_id, seq FROM events
                 WHERE tenant = ?1 AND message_id = ?2 AND sender_id = ?3",
            )?
            .query_row(params![tenant, message_id, sender], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })?;
        return Ok(Appended {
            event_id,
            seq: seq as u64,
            duplicate: true,
        });
    }
    let appended = Appended {
        event_id: rendered.event.event_id.to_string(),
        seq,
        duplicate: false,
    };
    let feed = Arc::clone(feed);
    let tenant = tenant.to_owned();
    let committed = rendered.committed();
    w.after_commit(move || feed.committed(&tenant, vec![committed]));
    Ok(appended)
}

/// The sequence and creation time of event `event_id`, if it is stored.
pub(super) fn cursor(
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

/// Up to `limit` events after `after_seq` that `viewer` may see, in sequence order.
pub(super) fn visible_after(
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
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Deletes events older than `cutoff_ms` (in chunks) and the consumer-group
/// deliveries that pointed at them. Returns how many events went.
pub(super) fn purge(w: &mut Writer<'_>, cutoff_ms: i64) -> Result<u64, JobError> {
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
