//! Appends to the log on PostgreSQL, and the notification that tells every instance.
//!
//! **Order.** An append first locks its tenant's counter row (`tenant_seq`) and holds it
//! until its commit, so the next append of the tenant waits: a tenant's sequences are
//! handed out one commit after another, and a commit is visible to every new snapshot
//! before the lock is released. A reader therefore never sees sequence N+1 while N is
//! still in flight (a plain `SEQUENCE` hands numbers out at once and lets a later one
//! commit first, which would make a poller's cursor skip the earlier one for good).
//! Duplicates are checked under the same lock, so no second instance can store the
//! same message id meanwhile. Tenants are locked in name order: two instances'
//! batches never wait on each other in a cycle.
//!
//! **Group commit.** Durable messages from every connection of this instance go to one
//! appender task ([`appender`]) that takes whatever is queued (up to [`MAX_BATCH`]) and
//! appends it in one transaction of four round trips: begin; the lock and the
//! duplicate check (sent together); one statement that inserts the rows, moves the
//! counters and notifies; commit. Under load one commit carries many messages; alone, a
//! message still waits for no one.
//!
//! **Notification.** The same statement sends, per tenant, a `NOTIFY` on
//! [`LOG_CHANNEL`] naming the tenant's new head and, when they fit in PostgreSQL's
//! 8,000 bytes, the new rows themselves: another instance then delivers them without
//! reading the log at all. Notifications are delivered at commit, in commit order.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use deadpool_postgres::{Pool, Transaction};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{pg_error, retry_transaction};
use crate::error::{JobError, StoreError};
use crate::feed::{Committed, Feed};
use crate::log::{Appended, Draft, Idempotency};
use crate::tail::TailEvent;

/// The channel every instance listens on for appends.
pub(super) const LOG_CHANNEL: &str = "webwaka_log";
/// Most appends committed together.
const MAX_BATCH: usize = 512;
/// The largest notification payload sent with its rows (PostgreSQL refuses 8,000).
const MAX_PAYLOAD: usize = 7_900;

/// One append waiting for the appender.
pub(super) struct AppendJob {
    pub(super) tenant: String,
    pub(super) draft: Draft,
    pub(super) reply: oneshot::Sender<Result<Appended, JobError>>,
}

/// A notification of appends to one tenant's log.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct LogNotice {
    /// The instance that appended.
    pub(super) i: String,
    /// The tenant.
    pub(super) t: String,
    /// The tenant's last sequence after the commit.
    pub(super) h: u64,
    /// The appended rows, when they fit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) e: Vec<NoticeRow>,
}

/// One row in a notification: (seq, eventId, createdMs, recipient, room, sender, body).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct NoticeRow(
    u64,
    String,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
);

impl NoticeRow {
    fn of(e: &TailEvent) -> Self {
        let s = |v: &Option<Box<str>>| v.as_deref().map(str::to_owned);
        Self(
            e.seq,
            e.event_id.to_string(),
            e.created_ms,
            s(&e.recipient),
            s(&e.room),
            s(&e.sender),
            e.body.to_string(),
        )
    }

    /// The row as the tail keeps it.
    pub(super) fn event(self) -> TailEvent {
        TailEvent {
            seq: self.0,
            event_id: self.1.into(),
            created_ms: self.2,
            recipient: self.3.map(Into::into),
            room: self.4.map(Into::into),
            sender: self.5.map(Into::into),
            body: Arc::new(self.6),
        }
    }
}

/// What appending some drafts in one transaction did.
pub(super) struct Appends {
    /// One answer per draft, in order.
    pub(super) answers: Vec<Result<Appended, JobError>>,
    /// What to hand to the feed after the commit: per tenant, in sequence order.
    pub(super) committed: BTreeMap<String, Vec<Committed>>,
}

impl Appends {
    /// Hands the committed events to the feed (after the commit).
    pub(super) fn publish(&mut self, feed: &Feed) {
        for (tenant, events) in std::mem::take(&mut self.committed) {
            feed.committed(&tenant, events);
        }
    }
}

/// A duplicate's key: (tenant, kind, key, second key).
type Key = (String, &'static str, String, String);

fn key_of(tenant: &str, draft: &Draft) -> Option<Key> {
    match draft.idempotency() {
        Idempotency::Message { sender, message_id } => Some((
            tenant.to_owned(),
            "m",
            message_id.to_owned(),
            sender.to_owned(),
        )),
        Idempotency::Event(id) => Some((tenant.to_owned(), "e", id.to_owned(), String::new())),
        Idempotency::None => None,
    }
}

/// Appends `drafts` (tenant, draft) inside `tx`, which the caller commits; the feed is
/// told by the caller after the commit ([`Appends::publish`]).
pub(super) async fn append_in(
    tx: &Transaction<'_>,
    instance: &str,
    drafts: &[(String, Draft)],
) -> Result<Appends, StoreError> {
    // Lock the tenants' counters, in name order, and read them.
    let mut tenants: Vec<&str> = drafts.iter().map(|(t, _)| t.as_str()).collect();
    tenants.sort_unstable();
    tenants.dedup();
    let lock = tx
        .prepare_cached(
            "INSERT INTO tenant_seq (tenant, last_seq)
             SELECT t, 0 FROM unnest($1::text[]) AS t ORDER BY t
             ON CONFLICT (tenant) DO UPDATE SET last_seq = tenant_seq.last_seq
             RETURNING tenant, last_seq",
        )
        .await
        .map_err(pg_error)?;
    // Duplicates stored before (the locks keep anyone else from storing one now). The
    // lookup is sent right behind the lock, without waiting for its answer (one round
    // trip for both): PostgreSQL runs them in order, so it looks once the lock is held.
    let keys: Vec<Key> = drafts.iter().filter_map(|(t, d)| key_of(t, d)).collect();
    let mut stored: HashMap<Key, (String, u64)> = HashMap::new();
    let (locked, found) =
        futures_util::future::try_join(tx.query(&lock, &[&tenants]), find_stored(tx, &keys))
            .await
            .map_err(pg_error)?;
    let mut heads: HashMap<String, u64> = HashMap::new();
    for row in locked {
        heads.insert(row.get(0), row.get::<_, i64>(1) as u64);
    }
    for row in found {
        let kind: String = row.get(1);
        let kind = if kind == "m" { "m" } else { "e" };
        stored.insert(
            (row.get(0), kind, row.get(2), row.get(3)),
            (row.get(4), row.get::<_, i64>(5) as u64),
        );
    }

    // Sequences and rows.
    let mut answers = Vec::with_capacity(drafts.len());
    let mut committed: BTreeMap<String, Vec<Committed>> = BTreeMap::new();
    let mut rows: Vec<(String, crate::log::Rendered)> = Vec::new();
    for (tenant, draft) in drafts {
        let key = key_of(tenant, draft);
        if let Some((event_id, seq)) = key.as_ref().and_then(|k| stored.get(k)) {
            answers.push(Ok(Appended {
                event_id: event_id.clone(),
                seq: *seq,
                duplicate: true,
            }));
            continue;
        }
        let head = heads.entry(tenant.clone()).or_insert(0);
        let seq = *head + 1;
        let rendered = draft.render(tenant, seq)?;
        *head = seq;
        let event_id = rendered.event.event_id.to_string();
        // A second copy later in this same batch is a duplicate of this one.
        if let Some(key) = key {
            stored.insert(key, (event_id.clone(), seq));
        }
        answers.push(Ok(Appended {
            event_id,
            seq,
            duplicate: false,
        }));
        rows.push((tenant.clone(), rendered));
    }
    if rows.is_empty() {
        return Ok(Appends { answers, committed });
    }
    // One statement: the rows, the counters, the notifications.
    let mut c_tenant = Vec::with_capacity(rows.len());
    let mut c_seq = Vec::with_capacity(rows.len());
    let mut c_id = Vec::with_capacity(rows.len());
    let mut c_type = Vec::with_capacity(rows.len());
    let mut c_created = Vec::with_capacity(rows.len());
    let mut c_recipient = Vec::with_capacity(rows.len());
    let mut c_room = Vec::with_capacity(rows.len());
    let mut c_sender = Vec::with_capacity(rows.len());
    let mut c_message = Vec::with_capacity(rows.len());
    let mut c_body = Vec::with_capacity(rows.len());
    for (tenant, r) in &rows {
        let e = &r.event;
        c_tenant.push(tenant.as_str());
        c_seq.push(e.seq as i64);
        c_id.push(&*e.event_id);
        c_type.push(r.event_type.as_str());
        c_created.push(e.created_ms);
        c_recipient.push(e.recipient.as_deref());
        c_room.push(e.room.as_deref());
        c_sender.push(e.sender.as_deref());
        c_message.push(r.message_id.as_deref());
        c_body.push(e.body.as_str());
    }
    let mut touched: BTreeMap<&str, Vec<&TailEvent>> = BTreeMap::new();
    for (tenant, r) in &rows {
        touched.entry(tenant.as_str()).or_default().push(&r.event);
    }
    let mut h_tenant = Vec::with_capacity(touched.len());
    let mut h_last = Vec::with_capacity(touched.len());
    let mut notices = Vec::with_capacity(touched.len());
    for (tenant, events) in &touched {
        let head = events.last().map_or(0, |e| e.seq);
        h_tenant.push(*tenant);
        h_last.push(head as i64);
        notices.push(notice(instance, tenant, head, events));
    }
    let write = tx
        .prepare_cached(
            "WITH ins AS (
                 INSERT INTO events (tenant, seq, event_id, event_type, created_ms, recipient_id,
                                     room_id, sender_id, message_id, body)
                 SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::int8[],
                                      $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])),
             upd AS (
                 UPDATE tenant_seq AS s SET last_seq = u.last
                 FROM unnest($11::text[], $12::int8[]) AS u(tenant, last)
                 WHERE s.tenant = u.tenant)
             SELECT pg_notify($13, p) FROM unnest($14::text[]) AS p",
        )
        .await
        .map_err(pg_error)?;
    tx.query(
        &write,
        &[
            &c_tenant,
            &c_seq,
            &c_id,
            &c_type,
            &c_created,
            &c_recipient,
            &c_room,
            &c_sender,
            &c_message,
            &c_body,
            &h_tenant,
            &h_last,
            &LOG_CHANNEL,
            &notices,
        ],
    )
    .await
    .map_err(pg_error)?;
    for (tenant, r) in rows {
        committed.entry(tenant).or_default().push(r.committed());
    }
    Ok(Appends { answers, committed })
}

/// The rows of the keys' duplicates stored before: (tenant, kind, key, second key,
/// event id, seq). Each kind of key is looked up through its own unique index (an OR of
/// the two in one join would scan the log).
async fn find_stored(
    tx: &Transaction<'_>,
    keys: &[Key],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let (mut m_tenant, mut m_id, mut m_sender) = (Vec::new(), Vec::new(), Vec::new());
    let (mut e_tenant, mut e_id) = (Vec::new(), Vec::new());
    for (tenant, kind, k1, k2) in keys {
        if *kind == "m" {
            m_tenant.push(tenant.as_str());
            m_id.push(k1.as_str());
            m_sender.push(k2.as_str());
        } else {
            e_tenant.push(tenant.as_str());
            e_id.push(k1.as_str());
        }
    }
    let find = tx
        .prepare_cached(
            "SELECT k.tenant, 'm', k.k1, k.k2, e.event_id, e.seq
             FROM unnest($1::text[], $2::text[], $3::text[]) AS k(tenant, k1, k2)
             JOIN events e ON e.tenant = k.tenant AND e.message_id = k.k1
                          AND e.sender_id = k.k2
             WHERE e.message_id IS NOT NULL
             UNION ALL
             SELECT k.tenant, 'e', k.k1, '', e.event_id, e.seq
             FROM unnest($4::text[], $5::text[]) AS k(tenant, k1)
             JOIN events e ON e.tenant = k.tenant AND e.event_id = k.k1",
        )
        .await?;
    tx.query(&find, &[&m_tenant, &m_id, &m_sender, &e_tenant, &e_id])
        .await
}

/// The notification of `events` appended to `tenant`: with the rows when they fit.
fn notice(instance: &str, tenant: &str, head: u64, events: &[&TailEvent]) -> String {
    // The rows' bodies alone already too large (a busy batch): the head only, without
    // first encoding every row in vain.
    let bodies = events
        .iter()
        .map(|e| e.body.len())
        .fold(0, usize::saturating_add);
    let rows = if bodies > MAX_PAYLOAD {
        Vec::new()
    } else {
        events.iter().map(|e| NoticeRow::of(e)).collect()
    };
    let mut notice = LogNotice {
        i: instance.to_owned(),
        t: tenant.to_owned(),
        h: head,
        e: rows,
    };
    let text = serde_json::to_string(&notice).unwrap_or_default();
    if text.len() <= MAX_PAYLOAD && !text.is_empty() {
        return text;
    }
    // Too large: the head only; the listeners read the rows from the log.
    notice.e.clear();
    serde_json::to_string(&notice).unwrap_or_default()
}

/// The appender: takes what is queued, appends it in one transaction, hands the events
/// to the feed after the commit, and answers. Ends when every sender is gone.
pub(super) async fn appender(
    pool: Pool,
    feed: Arc<Feed>,
    instance: Arc<str>,
    mut queue: mpsc::Receiver<AppendJob>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let jobs: Vec<AppendJob> = std::mem::take(&mut batch);
        let (drafts, replies): (Vec<(String, Draft)>, Vec<_>) = jobs
            .into_iter()
            .map(|j| ((j.tenant, j.draft), j.reply))
            .unzip();
        match commit(&pool, &feed, &instance, &drafts).await {
            Ok(appends) => answer(&feed, appends, replies),
            // A value refused (a data exception, SQLSTATE class 22): one draft is the
            // cause, so each goes again alone and only the culprits fail. Any other
            // failure (the database overloaded, a permission, a missing table) would
            // fail every draft again, one transaction each: it fails the batch.
            Err(StoreError::DataRefused(why)) if drafts.len() > 1 => {
                tracing::warn!(
                    error = %why,
                    drafts = drafts.len(),
                    "a batch of appends was refused; appending its drafts one by one"
                );
                for (draft, reply) in drafts.iter().zip(replies) {
                    match commit(&pool, &feed, &instance, std::slice::from_ref(draft)).await {
                        Ok(appends) => answer(&feed, appends, vec![reply]),
                        Err(error) => {
                            let _ = reply.send(Err(JobError::Store(error)));
                        }
                    }
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(JobError::Store(clone_error(&error))));
                }
            }
        }
    }
}

/// Appends `drafts` in one transaction (run again on a conflict); the feed expects
/// their events until the commit, and forgets them when it fails.
async fn commit(
    pool: &Pool,
    feed: &Feed,
    instance: &str,
    drafts: &[(String, Draft)],
) -> Result<Appends, StoreError> {
    let result: Result<Appends, StoreError> = retry_transaction!(pool, |tx| {
        let appends = append_in(&tx, instance, drafts).await;
        // Before the commit: a read-back of these rows (another path to the feed)
        // delivers these versions, which know their sending connection.
        if let Ok(appends) = &appends {
            for (tenant, events) in &appends.committed {
                feed.expect(tenant, events);
            }
        }
        appends
    });
    if result.is_err() {
        for (tenant, _) in drafts {
            feed.unexpect(tenant);
        }
    }
    result
}

/// Hands committed appends to the feed and answers their jobs, in order.
fn answer(
    feed: &Feed,
    mut appends: Appends,
    replies: Vec<oneshot::Sender<Result<Appended, JobError>>>,
) {
    appends.publish(feed);
    for (reply, answer) in replies.into_iter().zip(appends.answers) {
        let _ = reply.send(answer);
    }
}

/// The same failure, for every job of a batch.
fn clone_error(error: &StoreError) -> StoreError {
    match error {
        StoreError::Unavailable(why) => StoreError::Unavailable(why.clone()),
        StoreError::Conflict(why) => StoreError::Unavailable(why.clone()),
        other => StoreError::Postgres(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use webwaka_realtime::protocol::{InteractionClass, WebSocketMessage};

    fn message(tenant: &str, message_id: &str) -> Draft {
        Draft::Message {
            message: WebSocketMessage {
                message_id: message_id.to_owned(),
                message_type: "chat".to_owned(),
                interaction_class: InteractionClass::ClassB,
                tenant_id: tenant.to_owned(),
                sender_id: "alice".to_owned(),
                recipient_id: Some("bob".to_owned()),
                room_id: None,
                payload: serde_json::json!({"text": "hi"}),
                timestamp: chrono::Utc::now(),
                metadata: None,
                event_id: None,
                sequence: None,
            },
            exclude: None,
        }
    }

    /// A draft PostgreSQL refuses (a NUL in its id; validation keeps clients from
    /// sending one) fails alone: the other tenant's draft of the same batch is stored
    /// and answered. On the engine under test (SQLite stores a NUL, so both are).
    #[tokio::test(flavor = "current_thread")]
    async fn a_draft_the_database_refuses_fails_alone_in_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::config::Config::new(dir.path());
        crate::testing::use_engine_under_test(&mut config).await;
        let postgres = config.database_url.is_some();
        let app = crate::app::App::new(config, None).await.unwrap();
        // Queued back to back on this one thread: the appender, which runs only when
        // this task waits, takes both in one batch.
        let bad = app
            .store
            .queue_append("t1", message("t1", "m\0x"))
            .await
            .unwrap();
        let good = app
            .store
            .queue_append("t2", message("t2", "m-good"))
            .await
            .unwrap();
        let wait = std::time::Duration::from_secs(30);
        let bad = tokio::time::timeout(wait, bad).await.unwrap().unwrap();
        let good = tokio::time::timeout(wait, good).await.unwrap().unwrap();
        assert_eq!(bad.is_err(), postgres, "{bad:?}");
        let good = good.unwrap();
        assert_eq!((good.seq, good.duplicate), (1, false));
        let stored = app.store.cursor("t2", &good.event_id).await.unwrap();
        assert_eq!(stored.map(|(seq, _)| seq), Some(1));
        // The refused tenant's log is unchanged, and takes a good draft next.
        let next = app
            .store
            .append("t1", message("t1", "m-next"))
            .await
            .unwrap();
        assert_eq!(next.seq, if postgres { 1 } else { 2 });
    }

    fn event(seq: u64, body_len: usize) -> TailEvent {
        TailEvent {
            seq,
            event_id: format!("e{seq}").into(),
            created_ms: 1,
            recipient: Some("bob".into()),
            room: None,
            sender: Some("alice".into()),
            body: Arc::new(format!("{{\"t\":\"{}\"}}", "x".repeat(body_len))),
        }
    }

    fn read(text: &str) -> LogNotice {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn a_notice_carries_its_rows_when_they_fit_and_the_head_alone_otherwise() {
        let small: Vec<TailEvent> = (1..=3).map(|s| event(s, 100)).collect();
        let refs: Vec<&TailEvent> = small.iter().collect();
        let n = read(&notice("i1", "t1", 3, &refs));
        assert_eq!((n.i.as_str(), n.t.as_str(), n.h), ("i1", "t1", 3));
        let seqs: Vec<u64> = n.e.into_iter().map(|r| r.event().seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        // Bodies over the limit: the head only (not encoded first).
        let big: Vec<TailEvent> = (1..=40).map(|s| event(s, 250)).collect();
        let refs: Vec<&TailEvent> = big.iter().collect();
        let text = notice("i1", "t1", 40, &refs);
        assert!(text.len() < 200, "{text}");
        let n = read(&text);
        assert_eq!(n.h, 40);
        assert!(n.e.is_empty());
        // Under the limit by the bodies, over it once encoded: the head only as well.
        let edge: Vec<TailEvent> = (1..=30).map(|s| event(s, 250)).collect();
        let refs: Vec<&TailEvent> = edge.iter().collect();
        let text = notice("i1", "t1", 30, &refs);
        assert!(text.len() <= MAX_PAYLOAD);
        assert!(read(&text).e.is_empty());
    }
}
