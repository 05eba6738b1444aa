//! The store's schema as numbered migrations (rusqlite_migration).
//!
//! Never edit a migration that has shipped: add the next one. The test
//! `migrating_every_version_equals_a_fresh_database` builds a database at every earlier
//! version, migrates it, and checks that its schema equals a fresh one.

use rusqlite_migration::{M, Migrations};

/// The migrations, oldest first. Version N is the state after the N-th.
pub(crate) const MIGRATIONS: &[M<'static>] = &[
    // 1: identity, outbox, inbound cursor and dedupe.
    M::up(
        "CREATE TABLE meta (
            key   TEXT PRIMARY KEY NOT NULL,
            value TEXT NOT NULL
         ) STRICT;

         CREATE TABLE outbox (
            seq             INTEGER PRIMARY KEY AUTOINCREMENT,
            id              TEXT NOT NULL UNIQUE,
            class           TEXT NOT NULL CHECK (class IN ('CLASS_B', 'CLASS_C', 'CLASS_D')),
            kind            TEXT NOT NULL CHECK (kind IN ('message', 'operation', 'transaction')),
            lane            TEXT NOT NULL,
            body            TEXT NOT NULL,
            bytes           INTEGER NOT NULL,
            state           TEXT NOT NULL CHECK (state IN
                                ('persisted', 'in_flight', 'accepted', 'confirmed', 'rejected', 'dead')),
            attempts        INTEGER NOT NULL DEFAULT 0,
            next_attempt_ms INTEGER NOT NULL,
            last_error      TEXT,
            server_ref      TEXT,
            created_ms      INTEGER NOT NULL,
            updated_ms      INTEGER NOT NULL
         ) STRICT;
         CREATE INDEX outbox_by_lane ON outbox (lane, seq) WHERE state IN ('persisted', 'in_flight');
         CREATE INDEX outbox_by_state ON outbox (state, seq);

         CREATE TABLE inbound_cursor (
            id            INTEGER PRIMARY KEY CHECK (id = 1),
            last_event_id TEXT NOT NULL,
            last_sequence INTEGER,
            updated_ms    INTEGER NOT NULL
         ) STRICT;

         CREATE TABLE seen_ids (
            id      TEXT PRIMARY KEY NOT NULL,
            seen_ms INTEGER NOT NULL
         ) STRICT, WITHOUT ROWID;
         CREATE INDEX seen_ids_by_age ON seen_ids (seen_ms);",
    ),
    // 2: the entity cache: the server's base per entity, the optimistic local value,
    // local operations not yet reconciled, and open conflicts.
    M::up(
        "CREATE TABLE entities (
            entity_type  TEXT NOT NULL,
            entity_id    TEXT NOT NULL,
            base_data    TEXT NOT NULL,
            base_deleted INTEGER NOT NULL,
            base_version INTEGER NOT NULL,
            base_clock   TEXT NOT NULL,
            data         TEXT NOT NULL,
            deleted      INTEGER NOT NULL,
            clock        TEXT NOT NULL,
            updated_ms   INTEGER NOT NULL,
            PRIMARY KEY (entity_type, entity_id)
         ) STRICT, WITHOUT ROWID;

         CREATE TABLE entity_pending (
            seq          INTEGER PRIMARY KEY AUTOINCREMENT,
            operation_id TEXT NOT NULL UNIQUE,
            entity_type  TEXT NOT NULL,
            entity_id    TEXT NOT NULL,
            body         TEXT NOT NULL,
            FOREIGN KEY (entity_type, entity_id)
                REFERENCES entities (entity_type, entity_id) ON DELETE CASCADE
         ) STRICT;
         CREATE INDEX entity_pending_by_entity ON entity_pending (entity_type, entity_id, seq);

         CREATE TABLE entity_conflicts (
            conflict_id TEXT PRIMARY KEY NOT NULL,
            entity_type TEXT NOT NULL,
            entity_id   TEXT NOT NULL,
            body        TEXT NOT NULL,
            detected_ms INTEGER NOT NULL
         ) STRICT;
         CREATE INDEX entity_conflicts_by_entity ON entity_conflicts (entity_type, entity_id);",
    ),
    // 3: the outbox's pending count and bytes (persisted, in flight or dead), kept by
    // triggers so that checking the bounds at each enqueue reads one row instead of
    // counting the whole outbox. Triggers see every change, whoever makes it. (`=`/`OR`
    // rather than `IN (…)`: SQLite builds a temporary table per row for a 3-value `IN`.)
    M::up(
        "CREATE TABLE outbox_depth (
            id    INTEGER PRIMARY KEY CHECK (id = 1),
            items INTEGER NOT NULL,
            bytes INTEGER NOT NULL
         ) STRICT;
         INSERT INTO outbox_depth (id, items, bytes)
            SELECT 1, COUNT(*), COALESCE(SUM(bytes), 0) FROM outbox
             WHERE state IN ('persisted', 'in_flight', 'dead');

         CREATE TRIGGER outbox_depth_insert AFTER INSERT ON outbox
            WHEN NEW.state = 'persisted' OR NEW.state = 'in_flight' OR NEW.state = 'dead'
         BEGIN
            UPDATE outbox_depth SET items = items + 1, bytes = bytes + NEW.bytes WHERE id = 1;
         END;

         CREATE TRIGGER outbox_depth_delete AFTER DELETE ON outbox
            WHEN OLD.state = 'persisted' OR OLD.state = 'in_flight' OR OLD.state = 'dead'
         BEGIN
            UPDATE outbox_depth SET items = items - 1, bytes = bytes - OLD.bytes WHERE id = 1;
         END;

         CREATE TRIGGER outbox_depth_update AFTER UPDATE OF state, bytes ON outbox
            WHEN (OLD.state = 'persisted' OR OLD.state = 'in_flight' OR OLD.state = 'dead')
                 != (NEW.state = 'persisted' OR NEW.state = 'in_flight' OR NEW.state = 'dead')
              OR OLD.bytes != NEW.bytes
         BEGIN
            UPDATE outbox_depth
               SET items = items
                     - (OLD.state = 'persisted' OR OLD.state = 'in_flight' OR OLD.state = 'dead')
                     + (NEW.state = 'persisted' OR NEW.state = 'in_flight' OR NEW.state = 'dead'),
                   bytes = bytes
                     - CASE WHEN OLD.state = 'persisted' OR OLD.state = 'in_flight'
                                 OR OLD.state = 'dead' THEN OLD.bytes ELSE 0 END
                     + CASE WHEN NEW.state = 'persisted' OR NEW.state = 'in_flight'
                                 OR NEW.state = 'dead' THEN NEW.bytes ELSE 0 END
             WHERE id = 1;
         END;",
    ),
    // 4: the outbox rebuilt with its CHECK constraints written as `=`/`OR`. SQLite
    // evaluates a CHECK `IN (…)` of three or more values by building a temporary table
    // on every insert and update: that cost more than the rest of the insert (about 43
    // against 17 µs a row). Every row keeps its seq, and the AUTOINCREMENT high-water
    // mark is kept, so that no seq ever handed out (of a discarded item too) comes back.
    // The indexes and the depth triggers of migration 3 are made again as they were.
    M::up(
        "CREATE TABLE outbox_new (
            seq             INTEGER PRIMARY KEY AUTOINCREMENT,
            id              TEXT NOT NULL UNIQUE,
            class           TEXT NOT NULL
                            CHECK (class = 'CLASS_B' OR class = 'CLASS_C' OR class = 'CLASS_D'),
            kind            TEXT NOT NULL
                            CHECK (kind = 'message' OR kind = 'operation' OR kind = 'transaction'),
            lane            TEXT NOT NULL,
            body            TEXT NOT NULL,
            bytes           INTEGER NOT NULL,
            state           TEXT NOT NULL
                            CHECK (state = 'persisted' OR state = 'in_flight' OR state = 'accepted'
                                   OR state = 'confirmed' OR state = 'rejected' OR state = 'dead'),
            attempts        INTEGER NOT NULL DEFAULT 0,
            next_attempt_ms INTEGER NOT NULL,
            last_error      TEXT,
            server_ref      TEXT,
            created_ms      INTEGER NOT NULL,
            updated_ms      INTEGER NOT NULL
         ) STRICT;
         INSERT INTO outbox_new (seq, id, class, kind, lane, body, bytes, state, attempts,
                                 next_attempt_ms, last_error, server_ref, created_ms, updated_ms)
            SELECT seq, id, class, kind, lane, body, bytes, state, attempts,
                   next_attempt_ms, last_error, server_ref, created_ms, updated_ms
              FROM outbox;
         DELETE FROM sqlite_sequence WHERE name = 'outbox_new';
         INSERT INTO sqlite_sequence (name, seq)
            SELECT 'outbox_new', seq FROM sqlite_sequence WHERE name = 'outbox';
         DROP TABLE outbox;
         ALTER TABLE outbox_new RENAME TO outbox;
         CREATE INDEX outbox_by_lane ON outbox (lane, seq) WHERE state IN ('persisted', 'in_flight');
         CREATE INDEX outbox_by_state ON outbox (state, seq);
         UPDATE outbox_depth
            SET items = (SELECT COUNT(*) FROM outbox
                          WHERE state IN ('persisted', 'in_flight', 'dead')),
                bytes = (SELECT COALESCE(SUM(bytes), 0) FROM outbox
                          WHERE state IN ('persisted', 'in_flight', 'dead'))
          WHERE id = 1;

         CREATE TRIGGER outbox_depth_insert AFTER INSERT ON outbox
            WHEN NEW.state = 'persisted' OR NEW.state = 'in_flight' OR NEW.state = 'dead'
         BEGIN
            UPDATE outbox_depth SET items = items + 1, bytes = bytes + NEW.bytes WHERE id = 1;
         END;

         CREATE TRIGGER outbox_depth_delete AFTER DELETE ON outbox
            WHEN OLD.state = 'persisted' OR OLD.state = 'in_flight' OR OLD.state = 'dead'
         BEGIN
            UPDATE outbox_depth SET items = items - 1, bytes = bytes - OLD.bytes WHERE id = 1;
         END;

         CREATE TRIGGER outbox_depth_update AFTER UPDATE OF state, bytes ON outbox
            WHEN (OLD.state = 'persisted' OR OLD.state = 'in_flight' OR OLD.state = 'dead')
                 != (NEW.state = 'persisted' OR NEW.state = 'in_flight' OR NEW.state = 'dead')
              OR OLD.bytes != NEW.bytes
         BEGIN
            UPDATE outbox_depth
               SET items = items
                     - (OLD.state = 'persisted' OR OLD.state = 'in_flight' OR OLD.state = 'dead')
                     + (NEW.state = 'persisted' OR NEW.state = 'in_flight' OR NEW.state = 'dead'),
                   bytes = bytes
                     - CASE WHEN OLD.state = 'persisted' OR OLD.state = 'in_flight'
                                 OR OLD.state = 'dead' THEN OLD.bytes ELSE 0 END
                     + CASE WHEN NEW.state = 'persisted' OR NEW.state = 'in_flight'
                                 OR NEW.state = 'dead' THEN NEW.bytes ELSE 0 END
             WHERE id = 1;
         END;",
    ),
    // 5: fewer pages written per enqueue and per state change.
    //
    // - `in_lane` (1 when persisted or in flight, as a CHECK keeps it) is what the lane
    //   index filters on. Its condition used to name `state`, so every state change,
    //   also persisted → in flight within the lane, deleted and re-inserted the item's
    //   lane entry; now only a change that leaves or re-enters the lane touches it.
    // - The state index holds only the rare states (in flight, dead, confirmed,
    //   rejected): persisted items are found through the lane index and accepted ones
    //   are most of the table. An enqueue no longer writes it, an ack no longer adds to
    //   it.
    // - No AUTOINCREMENT: it rewrote `sqlite_sequence` on every enqueue. The high-water
    //   mark moves to `outbox_depth.last_seq` (the row the depth triggers write anyway),
    //   which the store reads to number new items: a seq once handed out, of an item
    //   discarded or pruned since too, still never comes back.
    //
    // Rows keep their seq and every field.
    M::up(
        "ALTER TABLE outbox_depth ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0;
         UPDATE outbox_depth
            SET last_seq = MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0),
                               COALESCE((SELECT MAX(seq) FROM outbox), 0))
          WHERE id = 1;

         CREATE TABLE outbox_new (
            seq             INTEGER PRIMARY KEY,
            id              TEXT NOT NULL UNIQUE,
            class           TEXT NOT NULL
                            CHECK (class = 'CLASS_B' OR class = 'CLASS_C' OR class = 'CLASS_D'),
            kind            TEXT NOT NULL
                            CHECK (kind = 'message' OR kind = 'operation' OR kind = 'transaction'),
            lane            TEXT NOT NULL,
            body            TEXT NOT NULL,
            bytes           INTEGER NOT NULL,
            state           TEXT NOT NULL
                            CHECK (state = 'persisted' OR state = 'in_flight' OR state = 'accepted'
                                   OR state = 'confirmed' OR state = 'rejected' OR state = 'dead'),
            in_lane         INTEGER NOT NULL
                            CHECK (in_lane = (state = 'persisted' OR state = 'in_flight')),
            attempts        INTEGER NOT NULL DEFAULT 0,
            next_attempt_ms INTEGER NOT NULL,
            last_error      TEXT,
            server_ref      TEXT,
            created_ms      INTEGER NOT NULL,
            updated_ms      INTEGER NOT NULL
         ) STRICT;
         INSERT INTO outbox_new (seq, id, class, kind, lane, body, bytes, state, in_lane,
                                 attempts, next_attempt_ms, last_error, server_ref,
                                 created_ms, updated_ms)
            SELECT seq, id, class, kind, lane, body, bytes, state,
                   state = 'persisted' OR state = 'in_flight',
                   attempts, next_attempt_ms, last_error, server_ref, created_ms, updated_ms
              FROM outbox;
         DROP TABLE outbox;
         ALTER TABLE outbox_new RENAME TO outbox;
         CREATE INDEX outbox_by_lane ON outbox (lane, seq) WHERE in_lane = 1;
         CREATE INDEX outbox_by_rare_state ON outbox (state, seq)
            WHERE state = 'in_flight' OR state = 'dead' OR state = 'confirmed'
               OR state = 'rejected';

         CREATE TRIGGER outbox_depth_insert AFTER INSERT ON outbox
         BEGIN
            UPDATE outbox_depth
               SET items = items
                     + (NEW.state = 'persisted' OR NEW.state = 'in_flight' OR NEW.state = 'dead'),
                   bytes = bytes
                     + CASE WHEN NEW.state = 'persisted' OR NEW.state = 'in_flight'
                                 OR NEW.state = 'dead' THEN NEW.bytes ELSE 0 END,
                   last_seq = MAX(last_seq, NEW.seq)
             WHERE id = 1;
         END;

         CREATE TRIGGER outbox_depth_delete AFTER DELETE ON outbox
            WHEN OLD.state = 'persisted' OR OLD.state = 'in_flight' OR OLD.state = 'dead'
         BEGIN
            UPDATE outbox_depth SET items = items - 1, bytes = bytes - OLD.bytes WHERE id = 1;
         END;

         CREATE TRIGGER outbox_depth_update AFTER UPDATE OF state, bytes ON outbox
            WHEN (OLD.state = 'persisted' OR OLD.state = 'in_flight' OR OLD.state = 'dead')
                 != (NEW.state = 'persisted' OR NEW.state = 'in_flight' OR NEW.state = 'dead')
              OR OLD.bytes != NEW.bytes
         BEGIN
            UPDATE outbox_depth
               SET items = items
                     - (OLD.state = 'persisted' OR OLD.state = 'in_flight' OR OLD.state = 'dead')
                     + (NEW.state = 'persisted' OR NEW.state = 'in_flight' OR NEW.state = 'dead'),
                   bytes = bytes
                     - CASE WHEN OLD.state = 'persisted' OR OLD.state = 'in_flight'
                                 OR OLD.state = 'dead' THEN OLD.bytes ELSE 0 END
                     + CASE WHEN NEW.state = 'persisted' OR NEW.state = 'in_flight'
                                 OR NEW.state = 'dead' THEN NEW.bytes ELSE 0 END
             WHERE id = 1;
         END;",
    ),
    // 6: the client asks, every few seconds, for the transactions still undecided, and
    // looks each confirmation up by the server's transaction id: both had to read the
    // whole table (accepted items included). Two partial indexes over transactions.
    M::up(
        "CREATE INDEX outbox_undecided ON outbox (seq)
            WHERE kind = 'transaction' AND state = 'accepted';
         CREATE INDEX outbox_transaction_ref ON outbox (server_ref)
            WHERE kind = 'transaction';",
    ),
    // 7: an item whose attempt failed on the network (no answer from the server) is
    // marked as waiting for it: a working transport makes it due at once instead of at
    // the end of its backoff, after a restart too (the mark was kept in memory before).
    M::up(
        "ALTER TABLE outbox ADD COLUMN waits_network INTEGER NOT NULL DEFAULT 0
            CHECK (waits_network IN (0, 1));",
    ),
];

/// The migrations as the crate's runner wants them.
pub(crate) fn migrations() -> Migrations<'static> {
    Migrations::from_slice(MIGRATIONS)
}

/// The schema version a fresh database ends at.
pub(crate) fn latest_version() -> usize {
    MIGRATIONS.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    /// The schema as SQLite reports it, in a stable order.
    fn dump(conn: &Connection) -> Vec<(String, String, String)> {
        let mut stmt = conn
            .prepare("SELECT type, name, COALESCE(sql, '') FROM sqlite_master ORDER BY type, name")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// The rows of the store's own bookkeeping tables (the depth counter, and what
    /// AUTOINCREMENT keeps).
    fn rows(conn: &Connection) -> Vec<String> {
        let mut stmt = conn
            .prepare(
                "SELECT 'depth', items, bytes, last_seq FROM outbox_depth
                 UNION ALL SELECT name, seq, NULL, NULL FROM sqlite_sequence",
            )
            .unwrap();
        stmt.query_map([], |r| {
            Ok((0..4)
                .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                .collect::<Vec<_>>()
                .join("|"))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    #[test]
    fn migrations_are_valid() {
        migrations().validate().unwrap();
    }

    #[test]
    fn migrating_every_version_equals_a_fresh_database() {
        let mut fresh = Connection::open_in_memory().unwrap();
        migrations().to_latest(&mut fresh).unwrap();
        for version in 0..latest_version() {
            let mut old = Connection::open_in_memory().unwrap();
            migrations().to_version(&mut old, version).unwrap();
            migrations().to_latest(&mut old).unwrap();
            assert_eq!(dump(&old), dump(&fresh), "from version {version}");
            let v: i64 = old
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(v as usize, latest_version());
            // The rows the migrations make, not only the schema: the depth counter and
            // its high-water mark start as in a fresh file, and the file is sound.
            assert_eq!(rows(&old), rows(&fresh), "from version {version}");
            let check: String = old
                .query_row("PRAGMA integrity_check", [], |r| r.get(0))
                .unwrap();
            assert_eq!(check, "ok", "from version {version}");
        }
    }
}
