//! The durable outbox: every outbound item the app handed over, until the server has it.
//!
//! An item is committed before `enqueue` returns. Its id (a UUIDv7 made by the SDK) is
//! the server's dedupe key and never changes: every retry, after restarts and transport
//! switches, resends the same id. Items are ordered per **lane** (a room, a recipient,
//! an entity): only the head of a lane is sent, so a failing item holds back its own lane
//! and no other.
//!
//! States: `persisted → in_flight → accepted` (the server has it, with its sequence or
//! transaction id); a Class D transaction goes on to `confirmed` or `rejected`. A
//! permanent failure makes an item `dead` with its reason: it leaves its lane (later items
//! go on), and the app can list, retry or discard it. An item `in_flight` when the process
//! died is `persisted` again at the next open (it is resent with the same id).
//!
//! Class A (presence, typing) has no [`OutboxClass`]: it cannot be stored.

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::Value;

use super::{Store, StoreConfig, StoreError, from_ms, to_ms};
use crate::protocol::Timestamp;

/// Default bound on pending items (the original's `RECONCILIATION_MAX_QUEUE_SIZE`).
pub const DEFAULT_MAX_ITEMS: usize = 10_000;
/// Default bound on the bytes of pending item bodies (64 MiB).
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// The interaction classes that can be stored (Class A cannot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutboxClass {
    /// Event streams.
    B,
    /// Chat and collaboration.
    C,
    /// Critical transactions (sent over HTTP only).
    D,
}

/// What an item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ItemKind {
    /// A message (`message` frame or `POST /api/messages`).
    Message,
    /// An entity operation (reconciled in batches).
    Operation,
    /// A Class D transaction (`POST /api/transactions`).
    Transaction,
}

/// Where an item is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ItemState {
    /// Committed, waiting to be sent (again).
    Persisted,
    /// Handed to a transport; no answer yet.
    InFlight,
    /// The server has it (with its sequence or transaction id).
    Accepted,
    /// A transaction the server confirmed.
    Confirmed,
    /// A transaction the server rejected.
    Rejected,
    /// Failed for good; waits for the app to retry or discard it.
    Dead,
}

macro_rules! sql_enum {
    ($ty:ident { $($variant:ident => $text:literal),* $(,)? }) => {
        impl $ty {
            /// The name stored in the database.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $text),* }
            }

            fn parse(text: &str) -> Result<Self, StoreError> {
                match text {
                    $($text => Ok($ty::$variant),)*
                    other => Err(StoreError::Invalid {
                        field: stringify!($ty),
                        message: format!("unknown value {other:?}"),
                    }),
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

sql_enum!(OutboxClass { B => "CLASS_B", C => "CLASS_C", D => "CLASS_D" });
sql_enum!(ItemKind { Message => "message", Operation => "operation", Transaction => "transaction" });
sql_enum!(ItemState {
    Persisted => "persisted",
    InFlight => "in_flight",
    Accepted => "accepted",
    Confirmed => "confirmed",
    Rejected => "rejected",
    Dead => "dead",
});

/// An item to enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewItem {
    /// Its id; the server's dedupe key (a UUIDv7 when the SDK makes it).
    pub id: String,
    /// Its interaction class.
    pub class: OutboxClass,
    /// What it is.
    pub kind: ItemKind,
    /// Its ordering key.
    pub lane: String,
    /// What to send (JSON).
    pub body: Value,
}

impl NewItem {
    /// An item with a fresh UUIDv7 id.
    pub fn new(class: OutboxClass, kind: ItemKind, lane: impl Into<String>, body: Value) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            class,
            kind,
            lane: lane.into(),
            body,
        }
    }
}

/// An item as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxItem {
    /// Enqueue order (global, increasing).
    pub seq: i64,
    /// Its id (the server's dedupe key).
    pub id: String,
    /// Its interaction class.
    pub class: OutboxClass,
    /// What it is.
    pub kind: ItemKind,
    /// Its ordering key.
    pub lane: String,
    /// What to send.
    pub body: Value,
    /// Size of the body in bytes, as counted against the bound.
    pub bytes: u64,
    /// Its state.
    pub state: ItemState,
    /// How many times it was handed to a transport.
    pub attempts: u32,
    /// Not sent before this time.
    pub next_attempt_at: Timestamp,
    /// The last failure, or the reason it is dead or rejected.
    pub last_error: Option<String>,
    /// The server's sequence or transaction id, once accepted.
    pub server_ref: Option<String>,
    /// When it was enqueued.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

const COLUMNS: &str = "seq, id, class, kind, lane, body, bytes, state, attempts, next_attempt_ms, \
                       last_error, server_ref, created_ms, updated_ms";

fn read_item(row: &Row<'_>) -> rusqlite::Result<(OutboxItem, String, String, String, String)> {
    let body: String = row.get(5)?;
    let item = OutboxItem {
        seq: row.get(0)?,
        id: row.get(1)?,
        class: OutboxClass::B,
        kind: ItemKind::Message,
        lane: row.get(4)?,
        body: Value::Null,
        bytes: u64::try_from(row.get::<_, i64>(6)?).unwrap_or(0),
        state: ItemState::Persisted,
        attempts: u32::try_from(row.get::<_, i64>(8)?).unwrap_or(u32::MAX),
        next_attempt_at: from_ms(row.get(9)?),
        last_error: row.get(10)?,
        server_ref: row.get(11)?,
        created_at: from_ms(row.get(12)?),
        updated_at: from_ms(row.get(13)?),
    };
    Ok((item, row.get(2)?, row.get(3)?, row.get(7)?, body))
}

fn finish(raw: (OutboxItem, String, String, String, String)) -> Result<OutboxItem, StoreError> {
    let (mut item, class, kind, state, body) = raw;
    item.class = OutboxClass::parse(&class)?;
    item.kind = ItemKind::parse(&kind)?;
    item.state = ItemState::parse(&state)?;
    item.body = serde_json::from_str(&body).map_err(|e| StoreError::Invalid {
        field: "body",
        message: e.to_string(),
    })?;
    Ok(item)
}

/// Longer than any wait the client schedules (an hour at most: a server's hint is
/// clamped to it, an item's own backoff is 30 s). An item due further away than this
/// was scheduled by a wall clock that has since gone back (corrected by the network,
/// set by the user): it is due now, or its lane would wait out the clock's error.
pub(crate) const LONGEST_WAIT_MS: i64 = 2 * 3600 * 1000;

/// Whether an item due at `next_attempt_at` may go at `now` (see [`LONGEST_WAIT_MS`]).
pub(crate) fn is_due(next_attempt_at: Timestamp, now: Timestamp) -> bool {
    let (at, now) = (to_ms(next_attempt_at), to_ms(now));
    at <= now || at > now.saturating_add(LONGEST_WAIT_MS)
}

/// The earliest next attempt of a waiting item due after `?1` (now, in ms); one further
/// than `LONGEST_WAIT_MS` is due now (a clock gone back), not waited for.
const NEXT_ATTEMPT_AFTER: &str = "SELECT MIN(next_attempt_ms) FROM outbox
     WHERE in_lane = 1 AND state = 'persisted' AND next_attempt_ms > ?1
       AND next_attempt_ms <= ?1 + 7200000 -- LONGEST_WAIT_MS";

/// The items that may be sent now, as the table `sendable(seq)` for the statement that
/// follows (`?1`: now in ms, `?2`: the limit): the head of each lane if it is persisted
/// and due, oldest first. The heads are found by walking the lanes that hold items (one
/// seek per lane in the partial index `outbox_by_lane`, whose condition is `in_lane =
/// 1`: persisted or in flight) rather than by grouping every pending item:
/// O(lanes × log n), not O(n). `INDEXED BY`: a plan that reads every pending row is
/// never chosen.
const SENDABLE_HEADS: &str = "
    WITH RECURSIVE lanes(lane) AS (
        SELECT MIN(lane) FROM outbox INDEXED BY outbox_by_lane WHERE in_lane = 1
        UNION ALL
        SELECT (SELECT MIN(o.lane) FROM outbox AS o INDEXED BY outbox_by_lane
                 WHERE o.in_lane = 1 AND o.lane > lanes.lane)
          FROM lanes WHERE lanes.lane IS NOT NULL
    ),
    heads(seq) AS (
        SELECT (SELECT MIN(o.seq) FROM outbox AS o INDEXED BY outbox_by_lane
                 WHERE o.in_lane = 1 AND o.lane = lanes.lane)
          FROM lanes WHERE lanes.lane IS NOT NULL
    ),
    sendable(seq) AS (
        SELECT seq FROM outbox
         WHERE seq IN heads AND state = 'persisted'
           AND (next_attempt_ms <= ?1 OR next_attempt_ms > ?1 + 7200000) -- LONGEST_WAIT_MS
         ORDER BY seq LIMIT ?2
    )";

/// How much the outbox holds that is not yet settled (persisted, in flight or dead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxDepth {
    /// Pending items.
    pub items: usize,
    /// Their body bytes.
    pub bytes: u64,
}

impl Store {
    /// Commits `item` to the outbox; when this returns `Ok`, it is on disk.
    ///
    /// Refused with [`StoreError::QueueFull`] when the bound on items or bytes would be
    /// passed, and [`StoreError::Duplicate`] when the id exists.
    pub fn enqueue(&mut self, item: NewItem, now: Timestamp) -> Result<OutboxItem, StoreError> {
        let mut out = self.enqueue_many(vec![item], now)?;
        out.pop().ok_or(StoreError::Invalid {
            field: "enqueue",
            message: "no item was stored".into(),
        })
    }

    /// Commits several items in one transaction (one fsync): group commit. All or none.
    pub fn enqueue_many(
        &mut self,
        items: Vec<NewItem>,
        now: Timestamp,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        in_write_transaction(&self.conn, || {
            insert_items(&self.conn, items, now, &self.config)
        })
    }

    /// The item `id`, if stored.
    pub fn get(&self, id: &str) -> Result<Option<OutboxItem>, StoreError> {
        self.conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM outbox WHERE id = ?1"))?
            .query_row([id], read_item)
            .optional()?
            .map(finish)
            .transpose()
    }

    /// Whether an item with this id is in the outbox (in any state), without reading it.
    pub fn contains(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM outbox WHERE id = ?1")?
            .exists([id])?)
    }

    /// Items in `state` (all when `None`), in enqueue order.
    pub fn list(&self, state: Option<ItemState>) -> Result<Vec<OutboxItem>, StoreError> {
        // The state is written into the statement (one cached statement per state):
        // SQLite uses a partial index only when the query's own terms imply its
        // condition, which a bound value cannot.
        let sql = match state {
            None => format!("SELECT {COLUMNS} FROM outbox ORDER BY seq"),
            // Persisted items are in their lanes: the lane index holds them.
            Some(ItemState::Persisted) => format!(
                "SELECT {COLUMNS} FROM outbox INDEXED BY outbox_by_lane
                  WHERE in_lane = 1 AND state = 'persisted' ORDER BY seq"
            ),
            // In `outbox_by_rare_state`, or (accepted) most of the table.
            Some(s) => format!(
                "SELECT {COLUMNS} FROM outbox WHERE state = '{}' ORDER BY seq",
                s.as_str()
            ),
        };
        let rows = self
            .conn
            .prepare_cached(&sql)?
            .query_map([], read_item)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(finish).collect()
    }

    /// The heads of the lanes that may be sent now, across lanes, oldest first: at most
    /// `limit`, one per lane. A lane whose head is in flight, or waits for its next
    /// attempt, sends nothing; dead items are out of their lane.
    pub fn next_sendable(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "{SENDABLE_HEADS} SELECT {COLUMNS} FROM outbox WHERE seq IN sendable ORDER BY seq"
        ))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(params![to_ms(now), limit], read_item)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(finish).collect()
    }

    /// Takes the items that may be sent now ([`Store::next_sendable`]) and marks them in
    /// flight ([`Store::mark_in_flight`]), all in one transaction: one commit for the
    /// lot instead of one per item.
    pub fn take_sendable(
        &mut self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        // One statement: the heads are chosen and marked (as `mark_in_flight` does:
        // one more attempt) in one pass, and come back changed.
        let mut stmt = self.conn.prepare_cached(&format!(
            "{SENDABLE_HEADS}
             UPDATE outbox SET state = 'in_flight', attempts = attempts + 1, updated_ms = ?1
              WHERE seq IN sendable
             RETURNING {COLUMNS}"
        ))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(params![to_ms(now), limit], read_item)?
            .collect::<Result<Vec<_>, _>>()?;
        let mut taken = rows
            .into_iter()
            .map(finish)
            .collect::<Result<Vec<_>, _>>()?;
        // RETURNING gives no order: oldest first, as next_sendable.
        taken.sort_by_key(|item| item.seq);
        Ok(taken)
    }

    /// [`Store::mark_accepted`] for each `(id, server_ref)`, in one transaction: one
    /// commit for the lot. Each ack has its own result (an unknown id or a refused
    /// transition fails that ack only); `Err` is a storage failure, and then nothing
    /// was changed.
    pub fn mark_accepted_many(
        &mut self,
        acks: &[(&str, Option<&str>)],
        now: Timestamp,
    ) -> Result<Vec<Result<OutboxItem, StoreError>>, StoreError> {
        in_write_transaction(&self.conn, || {
            let mut results = Vec::with_capacity(acks.len());
            for (id, server_ref) in acks {
                match self.mark_accepted(id, *server_ref, now) {
                    Err(StoreError::Sqlite(e)) => return Err(e.into()),
                    other => results.push(other),
                }
            }
            Ok(results)
        })
    }

    /// How much is pending (persisted, in flight or dead).
    pub fn depth(&self) -> Result<OutboxDepth, StoreError> {
        pending_depth(&self.conn)
    }

    /// Marks `id` as handed to a transport (one more attempt).
    pub fn mark_in_flight(&self, id: &str, now: Timestamp) -> Result<OutboxItem, StoreError> {
        let change = Change {
            attempts: Attempts::Bump,
            ..Change::to(ItemState::InFlight)
        };
        self.transition(id, &[ItemState::Persisted], "send", now, change)
    }

    /// Marks `id` accepted by the server, with its sequence or transaction id. An ack
    /// that arrives twice (a resend, or two transports) changes nothing the second time.
    pub fn mark_accepted(
        &self,
        id: &str,
        server_ref: Option<&str>,
        now: Timestamp,
    ) -> Result<OutboxItem, StoreError> {
        let change = Change {
            server_ref,
            ..Change::to(ItemState::Accepted)
        };
        let from = [ItemState::Persisted, ItemState::InFlight];
        match self.transition(id, &from, "accept", now, change) {
            // Accepted already: the ack came twice; nothing changes.
            Err(StoreError::InvalidState {
                state: ItemState::Accepted,
                ..
            }) => self.require(id),
            other => other,
        }
    }

    /// A failed attempt that may succeed later: back to `persisted`, not before `retry_at`.
    pub fn mark_failed(
        &self,
        id: &str,
        error: &str,
        retry_at: Timestamp,
        now: Timestamp,
    ) -> Result<OutboxItem, StoreError> {
        self.fail(id, error, retry_at, now, false)
    }

    /// A failed attempt that got no answer from the server (the network failed it):
    /// as [`Store::mark_failed`], and the item waits for the network as well as for its
    /// time: [`Store::network_back`] makes it due at once. Any later change of the item
    /// (sent again, settled, failed otherwise) ends that wait.
    pub fn mark_failed_on_network(
        &self,
        id: &str,
        error: &str,
        retry_at: Timestamp,
        now: Timestamp,
    ) -> Result<OutboxItem, StoreError> {
        self.fail(id, error, retry_at, now, true)
    }

    fn fail(
        &self,
        id: &str,
        error: &str,
        retry_at: Timestamp,
        now: Timestamp,
        waits_network: bool,
    ) -> Result<OutboxItem, StoreError> {
        let change = Change {
            error: Some(error),
            retry_at: Some(retry_at),
            waits_network,
            ..Change::to(ItemState::Persisted)
        };
        let from = [ItemState::Persisted, ItemState::InFlight];
        self.transition(id, &from, "fail", now, change)
    }

    /// A permanent failure: the item is dead, with `reason`; its lane goes on.
    pub fn mark_dead(
        &self,
        id: &str,
        reason: &str,
        now: Timestamp,
    ) -> Result<OutboxItem, StoreError> {
        let change = Change {
            error: Some(reason),
            ..Change::to(ItemState::Dead)
        };
        let from = [ItemState::Persisted, ItemState::InFlight];
        self.transition(id, &from, "give up on", now, change)
    }

    /// A transaction the server confirmed (a second confirmation changes nothing).
    pub fn mark_confirmed(&self, id: &str, now: Timestamp) -> Result<OutboxItem, StoreError> {
        self.settle_transaction(id, ItemState::Confirmed, None, "confirm", now)
    }

    /// A transaction the server rejected, with its reason (a second rejection changes
    /// nothing).
    pub fn mark_rejected(
        &self,
        id: &str,
        reason: &str,
        now: Timestamp,
    ) -> Result<OutboxItem, StoreError> {
        self.settle_transaction(id, ItemState::Rejected, Some(reason), "reject", now)
    }

    fn settle_transaction(
        &self,
        id: &str,
        to: ItemState,
        reason: Option<&str>,
        action: &'static str,
        now: Timestamp,
    ) -> Result<OutboxItem, StoreError> {
        let current = self.require(id)?;
        if current.state == to {
            return Ok(current);
        }
        if current.kind != ItemKind::Transaction {
            return Err(StoreError::InvalidState {
                id: id.to_owned(),
                state: current.state,
                action,
            });
        }
        let change = Change {
            error: reason,
            ..Change::to(to)
        };
        let from = [
            ItemState::Persisted,
            ItemState::InFlight,
            ItemState::Accepted,
        ];
        self.transition(id, &from, action, now, change)
    }

    /// Gives a dead item another chance: `persisted`, attempts reset, sendable now. It
    /// keeps its id and its place in its lane.
    pub fn retry(&self, id: &str, now: Timestamp) -> Result<OutboxItem, StoreError> {
        let change = Change {
            attempts: Attempts::Reset,
            retry_at: Some(now),
            ..Change::to(ItemState::Persisted)
        };
        self.transition(id, &[ItemState::Dead], "retry", now, change)
    }

    /// The item of `kind` the server knows as `server_ref` (e.g. a transaction id).
    pub fn find_by_server_ref(
        &self,
        kind: ItemKind,
        server_ref: &str,
    ) -> Result<Option<OutboxItem>, StoreError> {
        // The kind is written into the statement so that, for transactions, SQLite can
        // use the partial index `outbox_transaction_ref` (a bound value cannot imply a
        // partial index's condition).
        let raw = self
            .conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM outbox WHERE kind = '{}' AND server_ref = ?1
                 ORDER BY seq DESC LIMIT 1",
                kind.as_str()
            ))?
            .query_row(params![server_ref], read_item)
            .optional()?;
        raw.map(finish).transpose()
    }

    /// Transactions the server accepted and has not yet decided, oldest first (the
    /// client checks their status while connected).
    pub fn undecided_transactions(&self) -> Result<Vec<OutboxItem>, StoreError> {
        let rows = self
            .conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM outbox INDEXED BY outbox_undecided
                  WHERE kind = 'transaction' AND state = 'accepted' ORDER BY seq"
            ))?
            .query_map([], read_item)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(finish).collect()
    }

    /// The earliest next attempt of a waiting item (persisted) that is due after `now`:
    /// when the client has something to retry, so that it sleeps until then.
    pub fn next_attempt_after(&self, now: Timestamp) -> Result<Option<Timestamp>, StoreError> {
        let ms: Option<i64> = self
            .conn
            .prepare_cached(
                // `in_lane = 1` (persisted or in flight) lets the lane index's partial
                // condition apply: only what is still to do is read.
                NEXT_ATTEMPT_AFTER,
            )?
            .query_row(params![to_ms(now)], |row| row.get(0))?;
        Ok(ms.map(from_ms))
    }

    /// The network is back: the items that wait for it (failed on the network, see
    /// [`Store::mark_failed_on_network`], and due after `now`) are due at `now`, in one
    /// statement; how many were. Their history (attempts, last error) is kept.
    pub fn network_back(&self, now: Timestamp) -> Result<usize, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                // `in_lane = 1` (persisted or in flight): the lane index's partial
                // condition applies, only what is still to do is read.
                "UPDATE outbox SET next_attempt_ms = ?1, waits_network = 0
                  WHERE in_lane = 1 AND state = 'persisted' AND waits_network = 1
                    AND next_attempt_ms > ?1",
            )?
            .execute(params![to_ms(now)])?)
    }

    /// Removes a dead item for good (the app decided). Only dead items can be discarded.
    pub fn discard(&self, id: &str) -> Result<OutboxItem, StoreError> {
        let item = self.require(id)?;
        if item.state != ItemState::Dead {
            return Err(StoreError::InvalidState {
                id: id.to_owned(),
                state: item.state,
                action: "discard",
            });
        }
        // An entity operation also leaves the entity's pending edits, in the same
        // transaction, so that the cached value no longer shows it.
        let tx = self.conn.unchecked_transaction()?;
        tx.execute("DELETE FROM outbox WHERE id = ?1 AND state = 'dead'", [id])?;
        if item.kind == ItemKind::Operation {
            Store::drop_pending_on(&tx, id, &self.config.merges, item.updated_at)?;
        }
        tx.commit()?;
        Ok(item)
    }

    /// Deletes settled items (accepted, confirmed, rejected) last changed before `before`.
    /// Returns how many.
    pub fn prune_settled(&self, before: Timestamp) -> Result<usize, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM outbox WHERE state IN ('accepted', 'confirmed', 'rejected')
             AND updated_ms < ?1 AND NOT (kind = 'transaction' AND state = 'accepted')",
            [to_ms(before)],
        )?)
    }

    /// At open: items that were in flight when the process stopped are sent again.
    pub(super) fn recover_in_flight(&self) -> Result<usize, StoreError> {
        Ok(self.conn.execute(
            "UPDATE outbox SET state = 'persisted' WHERE state = 'in_flight'",
            [],
        )?)
    }

    fn require(&self, id: &str) -> Result<OutboxItem, StoreError> {
        self.get(id)?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))
    }

    /// Moves `id` from one of the states `from` as `change` says; other states are
    /// refused with `InvalidState`. Atomic: the row is read, checked and written in one
    /// write transaction (the caller's, or one of its own).
    ///
    /// Read, then write by `seq`, rather than one `UPDATE … RETURNING`: SQLite gathers
    /// RETURNING rows in a temporary table, opened and freed per call, which cost more
    /// than the update itself. The changed item is the read one with the change applied.
    fn transition(
        &self,
        id: &str,
        from: &[ItemState],
        action: &'static str,
        now: Timestamp,
        change: Change<'_>,
    ) -> Result<OutboxItem, StoreError> {
        in_write_transaction(&self.conn, || {
            self.transition_in_transaction(id, from, action, now, change)
        })
    }

    fn transition_in_transaction(
        &self,
        id: &str,
        from: &[ItemState],
        action: &'static str,
        now: Timestamp,
        change: Change<'_>,
    ) -> Result<OutboxItem, StoreError> {
        let mut item = self.require(id)?;
        if !from.contains(&item.state) {
            return Err(StoreError::InvalidState {
                id: id.to_owned(),
                state: item.state,
                action,
            });
        }
        let attempts = match change.attempts {
            Attempts::Keep => "attempts",
            Attempts::Bump => "attempts + 1",
            Attempts::Reset => "0",
        };
        // `in_lane` is set only by a change that may leave or re-enter the lane: setting
        // it (even to its value) rewrites the item's entry in the lane index.
        let in_lane = if in_lane(change.state) && from.iter().all(|s| in_lane(*s)) {
            ""
        } else if in_lane(change.state) {
            "in_lane = 1,"
        } else {
            "in_lane = 0,"
        };
        // Every change but a failure on the network ends a wait for the network.
        let sql = format!(
            "UPDATE outbox SET state = ?2, {in_lane} attempts = {attempts}, updated_ms = ?3,
                    last_error = COALESCE(?4, last_error),
                    next_attempt_ms = COALESCE(?5, next_attempt_ms),
                    server_ref = COALESCE(?6, server_ref),
                    waits_network = ?7
             WHERE seq = ?1"
        );
        let now_ms = to_ms(now);
        let retry_ms = change.retry_at.map(to_ms);
        let changed = self.conn.prepare_cached(&sql)?.execute(params![
            item.seq,
            change.state.as_str(),
            now_ms,
            change.error,
            retry_ms,
            change.server_ref,
            change.waits_network
        ])?;
        if changed != 1 {
            // Read in this write transaction a moment ago: cannot happen.
            return Err(StoreError::NotFound(id.to_owned()));
        }
        item.state = change.state;
        item.attempts = match change.attempts {
            Attempts::Keep => item.attempts,
            Attempts::Bump => item.attempts.saturating_add(1),
            Attempts::Reset => 0,
        };
        item.updated_at = from_ms(now_ms);
        if let Some(error) = change.error {
            item.last_error = Some(error.to_owned());
        }
        if let Some(ms) = retry_ms {
            item.next_attempt_at = from_ms(ms);
        }
        if let Some(server_ref) = change.server_ref {
            item.server_ref = Some(server_ref.to_owned());
        }
        Ok(item)
    }
}

/// Whether an item in `state` holds its place in its lane (column `in_lane`).
fn in_lane(state: ItemState) -> bool {
    matches!(state, ItemState::Persisted | ItemState::InFlight)
}

/// Runs `f` in a write transaction: the caller's when one is open on `conn` (it
/// commits), else one of its own (`BEGIN IMMEDIATE`), committed when `f` succeeds and
/// rolled back when it fails. Its `BEGIN` and `COMMIT` are cached statements (rusqlite's
/// `Transaction` parses them on every use).
fn in_write_transaction<T>(
    conn: &Connection,
    f: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    if !conn.is_autocommit() {
        return f();
    }
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    let result = f().and_then(|value| {
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(value)
    });
    if result.is_err() && !conn.is_autocommit() {
        // Nothing of `f` is kept; a failed rollback leaves nothing more to undo.
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

/// The deepest body the outbox stores: an app's payload at its limit
/// ([`crate::protocol::MAX_PAYLOAD_DEPTH`]) inside its item, well under what the JSON
/// reader takes back.
const MAX_BODY_DEPTH: usize = 100;

/// What a state transition changes besides the state.
struct Change<'a> {
    state: ItemState,
    attempts: Attempts,
    error: Option<&'a str>,
    retry_at: Option<Timestamp>,
    server_ref: Option<&'a str>,
    /// Failed on the network: due as soon as it is back (see `network_back`).
    waits_network: bool,
}

enum Attempts {
    Keep,
    Bump,
    Reset,
}

impl Change<'_> {
    fn to(state: ItemState) -> Self {
        Change {
            state,
            attempts: Attempts::Keep,
            error: None,
            retry_at: None,
            server_ref: None,
            waits_network: false,
        }
    }
}

/// Inserts `items` on `conn` (a transaction or savepoint the caller commits), checking
/// the bounds against what is pending. All or nothing: on error the caller rolls back.
pub(crate) fn insert_items(
    tx: &Connection,
    items: Vec<NewItem>,
    now: Timestamp,
    config: &StoreConfig,
) -> Result<Vec<OutboxItem>, StoreError> {
    let mut depth = pending_depth(tx)?;
    insert_counted(tx, items, now, config, &mut depth)
}

/// What is pending (counted against the bounds), read on `conn`. Inside a write
/// transaction it stays true until the caller changes it. One row, kept by triggers on
/// `outbox` (schema migration 3): no count of the outbox.
pub(crate) fn pending_depth(conn: &Connection) -> Result<OutboxDepth, StoreError> {
    let (count, bytes): (i64, i64) = conn
        .prepare_cached("SELECT items, bytes FROM outbox_depth WHERE id = 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(OutboxDepth {
        items: usize::try_from(count).unwrap_or(usize::MAX),
        bytes: u64::try_from(bytes).unwrap_or(u64::MAX),
    })
}

/// Whether `item` (just inserted, in `tx`) is the first pending item of its lane: then,
/// being new, it is due now, and nothing in its lane is waiting or on the wire before
/// it (a message sent over the WebSocket stays `persisted` here until its ack).
pub(crate) fn is_lane_head(tx: &Connection, item: &OutboxItem) -> Result<bool, StoreError> {
    let older: bool = tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM outbox INDEXED BY outbox_by_lane
                             WHERE in_lane = 1 AND lane = ?1 AND seq < ?2)",
        )?
        .query_row(params![item.lane, item.seq], |r| r.get(0))?;
    Ok(!older)
}

/// [`insert_items`] with the pending `depth` given by the caller (read once per write
/// transaction with [`pending_depth`]) and advanced by what is inserted: a group of many
/// inserts in one transaction counts the outbox once, not once per item.
pub(crate) fn insert_counted(
    tx: &Connection,
    items: Vec<NewItem>,
    now: Timestamp,
    config: &StoreConfig,
    depth: &mut OutboxDepth,
) -> Result<Vec<OutboxItem>, StoreError> {
    let max_items = config.max_items;
    let max_bytes = config.max_bytes;
    let mut count = depth.items;
    let mut bytes = depth.bytes;
    let mut stored = Vec::with_capacity(items.len());
    {
        let mut insert = tx.prepare_cached(
            // The next seq after the highest ever handed out (kept by the insert
            // trigger in `outbox_depth`, a row this insert writes anyway).
            "INSERT INTO outbox (seq, id, class, kind, lane, body, bytes, state, in_lane,
                                 attempts, next_attempt_ms, created_ms, updated_ms)
             VALUES ((SELECT last_seq + 1 FROM outbox_depth WHERE id = 1),
                     ?1, ?2, ?3, ?4, ?5, ?6, 'persisted', 1, 0, ?7, ?7, ?7)",
        )?;
        for item in items {
            // A body the reader could not parse back (serde_json reads 127 levels) would
            // stop every read of the outbox: refused here, whoever built it.
            let depth = crate::protocol::nesting_depth(&item.body);
            if depth > MAX_BODY_DEPTH {
                return Err(StoreError::Invalid {
                    field: "body",
                    message: format!("nested {depth} levels deep, over {MAX_BODY_DEPTH}"),
                });
            }
            let body = serde_json::to_string(&item.body).map_err(|e| StoreError::Invalid {
                field: "body",
                message: e.to_string(),
            })?;
            let size = body.len() as u64;
            if count + 1 > max_items {
                return Err(StoreError::QueueFull {
                    limit: format!("{max_items} items"),
                });
            }
            if bytes.saturating_add(size) > max_bytes {
                return Err(StoreError::QueueFull {
                    limit: format!("{max_bytes} bytes"),
                });
            }
            let now_ms = to_ms(now);
            let result = insert.execute(params![
                item.id,
                item.class.as_str(),
                item.kind.as_str(),
                item.lane,
                body,
                size as i64,
                now_ms
            ]);
            match result {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    return Err(StoreError::Duplicate(item.id));
                }
                other => other?,
            };
            count += 1;
            bytes += size;
            stored.push(OutboxItem {
                seq: tx.last_insert_rowid(),
                id: item.id,
                class: item.class,
                kind: item.kind,
                lane: item.lane,
                body: item.body,
                bytes: size,
                state: ItemState::Persisted,
                attempts: 0,
                next_attempt_at: from_ms(now_ms),
                last_error: None,
                server_ref: None,
                created_at: from_ms(now_ms),
                updated_at: from_ms(now_ms),
            });
        }
    }
    *depth = OutboxDepth {
        items: count,
        bytes,
    };
    Ok(stored)
}

/// Marks `id` accepted with `server_ref` when it is still pending (persisted, in flight
/// or dead): the server has it, whichever way it arrived. Settled items are left as
/// they are. Returns whether it changed.
pub(crate) fn accept_if_pending(
    conn: &Connection,
    id: &str,
    server_ref: &str,
    now: Timestamp,
) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached(
            "UPDATE outbox SET state = 'accepted', in_lane = 0, server_ref = ?2, updated_ms = ?3
              WHERE id = ?1 AND (state = 'persisted' OR state = 'in_flight' OR state = 'dead')",
        )?
        .execute(params![id, server_ref, to_ms(now)])?
        > 0)
}

#[cfg(test)]
mod tests {
    use super::super::schema;
    use rusqlite::Connection;

    fn counted(conn: &Connection) -> (i64, i64) {
        conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM outbox
              WHERE state IN ('persisted', 'in_flight', 'dead')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    }

    fn kept(conn: &Connection) -> (i64, i64) {
        conn.query_row(
            "SELECT items, bytes FROM outbox_depth WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    }

    /// Migration 3 counts what an older file already holds, and the triggers keep the
    /// count equal to a real count through inserts, state changes, size changes and
    /// deletes.
    #[test]
    fn the_depth_counter_starts_from_existing_rows_and_follows_every_change() {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::migrations().to_version(&mut conn, 2).unwrap();
        let states = [
            "persisted",
            "in_flight",
            "accepted",
            "confirmed",
            "rejected",
            "dead",
        ];
        for (n, state) in states.iter().cycle().take(60).enumerate() {
            conn.execute(
                "INSERT INTO outbox (id, class, kind, lane, body, bytes, state,
                                     next_attempt_ms, created_ms, updated_ms)
                 VALUES (?1, 'CLASS_C', 'message', 'l', '{}', ?2, ?3, 0, 0, 0)",
                rusqlite::params![format!("id{n}"), n as i64 + 1, state],
            )
            .unwrap();
        }
        schema::migrations().to_latest(&mut conn).unwrap();
        assert_eq!(kept(&conn), counted(&conn));
        assert_eq!(kept(&conn).0, 30);

        for n in 0..60 {
            let id = format!("id{n}");
            let change = match n % 4 {
                0 => "UPDATE outbox SET state = 'accepted', in_lane = 0 WHERE id = ?1",
                1 => {
                    "UPDATE outbox SET state = 'dead', in_lane = 0, bytes = bytes + 7 WHERE id = ?1"
                }
                2 => "DELETE FROM outbox WHERE id = ?1",
                _ => "UPDATE outbox SET state = 'persisted', in_lane = 1 WHERE id = ?1",
            };
            conn.execute(change, [&id]).unwrap();
            assert_eq!(kept(&conn), counted(&conn), "after {change} on {id}");
        }
    }

    /// Migration 4 rebuilds the table: every row stays as it was, and a seq handed out
    /// before (here to items deleted since) is never handed out again.
    #[test]
    fn rebuilding_the_outbox_keeps_rows_and_the_sequence() {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::migrations().to_version(&mut conn, 3).unwrap();
        for n in 0..10 {
            conn.execute(
                "INSERT INTO outbox (id, class, kind, lane, body, bytes, state, attempts,
                                     next_attempt_ms, last_error, server_ref, created_ms,
                                     updated_ms)
                 VALUES (?1, 'CLASS_D', 'transaction', 'l', '{}', 2, ?2, 3, 4, 'e', 'r', 5, 6)",
                rusqlite::params![format!("id{n}"), ["persisted", "dead"][n % 2]],
            )
            .unwrap();
        }
        conn.execute("DELETE FROM outbox WHERE seq > 7", [])
            .unwrap();
        let dump = |conn: &Connection| -> Vec<String> {
            let mut stmt = conn
                .prepare(
                    "SELECT seq, id, class, kind, lane, body, bytes, state, attempts,
                                 next_attempt_ms, last_error, server_ref, created_ms, updated_ms
                            FROM outbox ORDER BY seq",
                )
                .unwrap();
            stmt.query_map([], |r| {
                Ok((0..14)
                    .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                    .collect::<Vec<_>>()
                    .join("|"))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
        };
        let before = dump(&conn);
        schema::migrations().to_version(&mut conn, 4).unwrap();
        assert_eq!(dump(&conn), before);
        assert_eq!(kept(&conn), counted(&conn));
        conn.execute(
            "INSERT INTO outbox (id, class, kind, lane, body, bytes, state, next_attempt_ms,
                                 created_ms, updated_ms)
             VALUES ('new', 'CLASS_C', 'message', 'l', '{}', 2, 'persisted', 0, 0, 0)",
            [],
        )
        .unwrap();
        let seq: i64 = conn
            .query_row("SELECT seq FROM outbox WHERE id = 'new'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            seq, 11,
            "past the 10 handed out before, not after the 7 left"
        );
        // The constraints still hold.
        assert!(
            conn.execute("UPDATE outbox SET state = 'lost' WHERE id = 'new'", [])
                .is_err()
        );
    }

    /// Migration 5 rebuilds the table without AUTOINCREMENT and with `in_lane`: every
    /// row and field stays, `in_lane` says whether the item holds its lane, the depth
    /// is kept, and a seq handed out before (here to items deleted since) is never
    /// handed out again, also by the store's own enqueue.
    #[test]
    fn migration_5_keeps_rows_and_the_high_water_mark() {
        use super::super::{Store, StoreConfig};
        use super::{ItemKind, ItemState, NewItem, OutboxClass};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v4.db");
        let mut conn = Connection::open(&path).unwrap();
        schema::migrations().to_version(&mut conn, 4).unwrap();
        let states = [
            "persisted",
            "in_flight",
            "accepted",
            "confirmed",
            "rejected",
            "dead",
        ];
        for n in 0..14 {
            conn.execute(
                "INSERT INTO outbox (id, class, kind, lane, body, bytes, state, attempts,
                                     next_attempt_ms, last_error, server_ref, created_ms,
                                     updated_ms)
                 VALUES (?1, 'CLASS_D', 'transaction', ?2, '{}', ?3, ?4, ?5, 4, 'e', 'r', 5, 6)",
                rusqlite::params![
                    format!("id{n}"),
                    format!("lane{}", n % 2),
                    n as i64 + 2,
                    states[n % 6],
                    n as i64
                ],
            )
            .unwrap();
        }
        conn.execute("DELETE FROM outbox WHERE seq > 12", [])
            .unwrap();
        let columns = "seq, id, class, kind, lane, body, bytes, state, attempts, \
                       next_attempt_ms, last_error, server_ref, created_ms, updated_ms";
        let dump = |conn: &Connection| -> Vec<String> {
            let mut stmt = conn
                .prepare(&format!("SELECT {columns} FROM outbox ORDER BY seq"))
                .unwrap();
            stmt.query_map([], |r| {
                Ok((0..14)
                    .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                    .collect::<Vec<_>>()
                    .join("|"))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
        };
        let before = dump(&conn);
        let depth_before = kept(&conn);
        schema::migrations().to_version(&mut conn, 5).unwrap();
        assert_eq!(dump(&conn), before);
        assert_eq!(kept(&conn), depth_before);
        assert_eq!(kept(&conn), counted(&conn));
        let wrong_lane: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM outbox
                  WHERE in_lane != (state = 'persisted' OR state = 'in_flight')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(wrong_lane, 0);
        let last_seq: i64 = conn
            .query_row("SELECT last_seq FROM outbox_depth WHERE id = 1", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(last_seq, 14, "the 14 handed out, not the 12 left");
        // A state change that forgets `in_lane` is refused.
        assert!(
            conn.execute(
                "UPDATE outbox SET state = 'accepted' WHERE state = 'persisted'",
                []
            )
            .is_err()
        );
        drop(conn);

        let config = StoreConfig {
            max_items: 1000,
            ..StoreConfig::default()
        };
        let mut store = Store::open(&path, config).unwrap();
        let now = chrono::Utc::now();
        let new = store
            .enqueue(
                NewItem::new(
                    OutboxClass::C,
                    ItemKind::Message,
                    "lane0",
                    serde_json::json!({}),
                ),
                now,
            )
            .unwrap();
        assert_eq!(new.seq, 15);
        // In flight at the last close: persisted again, found through the lane index.
        let persisted: Vec<i64> = store
            .list(Some(ItemState::Persisted))
            .unwrap()
            .iter()
            .map(|i| i.seq)
            .collect();
        assert_eq!(persisted, vec![1, 2, 7, 8, 15]);
        let dead: Vec<i64> = store
            .list(Some(ItemState::Dead))
            .unwrap()
            .iter()
            .map(|i| i.seq)
            .collect();
        assert_eq!(dead, vec![6, 12]);
        let heads: Vec<i64> = store
            .next_sendable(now, 10)
            .unwrap()
            .iter()
            .map(|i| i.seq)
            .collect();
        assert_eq!(heads, vec![1, 2]);
        store.integrity_check().unwrap();
        // A file that existed keeps its page size; a new one gets the store's.
        let page_size = |store: &Store| -> i64 {
            store
                .conn
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(page_size(&store), 4096);
        let new_file = Store::open(dir.path().join("new.db"), StoreConfig::default()).unwrap();
        assert_eq!(page_size(&new_file), i64::from(super::super::PAGE_SIZE));
    }

    #[test]
    fn the_statements_use_the_longest_wait() {
        use super::{LONGEST_WAIT_MS, NEXT_ATTEMPT_AFTER, SENDABLE_HEADS, is_due};
        let literal = format!("?1 + {LONGEST_WAIT_MS}");
        assert!(SENDABLE_HEADS.contains(&literal));
        assert!(NEXT_ATTEMPT_AFTER.contains(&literal));
        let now = chrono::Utc::now();
        assert!(is_due(now, now));
        assert!(!is_due(now + chrono::Duration::hours(1), now));
        assert!(
            is_due(now + chrono::Duration::days(365), now),
            "a clock gone back"
        );
    }
}
