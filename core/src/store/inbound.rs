//! The inbound cursor and dedupe: each durable event reaches the app exactly once.
//!
//! The cursor is the last durable event processed (its id, which the server resumes
//! from, and its log sequence). Recording an event, remembering its id and advancing the
//! cursor are one transaction, together with whatever applying it writes, so a crash
//! can neither skip nor repeat an event. Ids seen recently are kept to drop duplicates
//! that arrive by two transports; an event at or below the cursor's sequence is a replay
//! whether or not its id is still remembered, so pruning old ids never lets one through.

use rusqlite::{OptionalExtension, Transaction, params};

use super::{Store, StoreError, to_ms};
use crate::protocol::Timestamp;

/// Where the inbound stream stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The last durable event processed (sent as `lastEventId`).
    pub last_event_id: String,
    /// Its sequence in the tenant log, when known.
    pub last_sequence: Option<u64>,
}

impl Store {
    /// The cursor, `None` before the first durable event.
    pub fn cursor(&self) -> Result<Option<Cursor>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT last_event_id, last_sequence FROM inbound_cursor WHERE id = 1",
                [],
                |r| {
                    Ok(Cursor {
                        last_event_id: r.get(0)?,
                        last_sequence: r
                            .get::<_, Option<i64>>(1)?
                            .and_then(|s| u64::try_from(s).ok()),
                    })
                },
            )
            .optional()?)
    }

    /// Records durable event `event_id` (log `sequence`) as processed and advances the
    /// cursor; `Ok(false)` when it was seen already (nothing changed).
    pub fn record_inbound(
        &mut self,
        event_id: &str,
        sequence: Option<u64>,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        self.process_inbound(event_id, sequence, now, |_| Ok(()))
    }

    /// Like [`Store::record_inbound`], running `apply` in the same transaction first:
    /// if `apply` fails, nothing is recorded and the event will be processed again.
    pub(crate) fn process_inbound(
        &mut self,
        event_id: &str,
        sequence: Option<u64>,
        now: Timestamp,
        apply: impl FnOnce(&Transaction<'_>) -> Result<(), StoreError>,
    ) -> Result<bool, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Cached statements: this runs for every event received (parsing the SQL each
        // time cost about as much as running it).
        let seen: bool = tx
            .prepare_cached("SELECT 1 FROM seen_ids WHERE id = ?1")?
            .query_row([event_id], |_| Ok(true))
            .optional()?
            .unwrap_or(false);
        // None: no cursor; Some(None): a cursor without a sequence.
        let cursor: Option<Option<i64>> = tx
            .prepare_cached("SELECT last_sequence FROM inbound_cursor WHERE id = 1")?
            .query_row([], |r| r.get(0))
            .optional()?;
        let cursor_seq = cursor.flatten();
        let seq = stored_sequence(sequence);
        let replay = matches!((seq, cursor_seq), (Some(s), Some(c)) if s <= c);
        if replay {
            return Ok(false);
        }
        let now_ms = to_ms(now);
        if seen {
            // Processed before, but past the cursor: the cursor was cleared (a resync
            // pages from the oldest event retained again) or is older. Events come in
            // log order, so the cursor moves past it, applying nothing; otherwise a
            // resync interrupted once would fetch its first page again forever.
            let beyond =
                cursor.is_none() || matches!((seq, cursor_seq), (Some(s), Some(c)) if s > c);
            if !beyond {
                return Ok(false);
            }
        } else {
            apply(&tx)?;
            tx.prepare_cached("INSERT INTO seen_ids (id, seen_ms) VALUES (?1, ?2)")?
                .execute(params![event_id, now_ms])?;
        }
        tx.prepare_cached(
            "INSERT INTO inbound_cursor (id, last_event_id, last_sequence, updated_ms)
             VALUES (1, ?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET last_event_id = excluded.last_event_id,
                 last_sequence = COALESCE(excluded.last_sequence, last_sequence),
                 updated_ms = excluded.updated_ms",
        )?
        .execute(params![event_id, seq, now_ms])?;
        tx.commit()?;
        Ok(!seen)
    }

    /// Forgets seen ids older than `before`, keeping at least the newest `keep`. Events
    /// at or below the cursor stay refused by their sequence.
    pub fn prune_seen(&self, before: Timestamp, keep: usize) -> Result<usize, StoreError> {
        // The age of the `keep`-th newest id (a walk down the age index, not a set of
        // every id kept): nothing to prune when there are no more than `keep`.
        let newest_kept = match keep.checked_sub(1) {
            None => i64::MAX,
            Some(offset) => {
                let offset = i64::try_from(offset).unwrap_or(i64::MAX);
                let found: Option<i64> = self
                    .conn
                    .query_row(
                        "SELECT seen_ms FROM seen_ids ORDER BY seen_ms DESC LIMIT 1 OFFSET ?1",
                        [offset],
                        |r| r.get(0),
                    )
                    .optional()?;
                let Some(ms) = found else {
                    return Ok(0);
                };
                ms
            }
        };
        Ok(self.conn.execute(
            "DELETE FROM seen_ids WHERE seen_ms < MIN(?1, ?2)",
            params![to_ms(before), newest_kept],
        )?)
    }

    /// Sets the cursor after a resynchronisation from snapshots (the server said the old
    /// one expired): events before `event_id` are not expected any more.
    pub fn reset_cursor(
        &self,
        event_id: &str,
        sequence: Option<u64>,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let seq = stored_sequence(sequence);
        self.conn.execute(
            "INSERT INTO inbound_cursor (id, last_event_id, last_sequence, updated_ms)
             VALUES (1, ?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET last_event_id = excluded.last_event_id,
                 last_sequence = excluded.last_sequence, updated_ms = excluded.updated_ms",
            params![event_id, seq, to_ms(now)],
        )?;
        Ok(())
    }

    /// Forgets the cursor (after a resynchronisation whose old cursor expired): the next
    /// poll starts at the beginning of the server's retention. The seen ids stay (those
    /// not pruned yet: see `prune_seen`), so events already processed are still
    /// recognised.
    pub fn clear_cursor(&self) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM inbound_cursor WHERE id = 1", [])?;
        Ok(())
    }
}

/// A log sequence as the cursor stores it. One beyond SQLite's integers (above 2^63 − 1:
/// no server counts that far, a broken one might send it) is kept as no sequence, so
/// that the event is recorded by its id and does not become a cursor every later event
/// would be below (clamped, it would have been).
fn stored_sequence(sequence: Option<u64>) -> Option<i64> {
    sequence.and_then(|s| i64::try_from(s).ok())
}
