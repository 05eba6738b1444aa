//! A commit written now and flushed a moment later: how the writer lets a new outbox
//! item be sent while its fsync is still running.
//!
//! With `synchronous = FULL` (the default, [`Durability::Full`]) SQLite fsyncs the
//! write-ahead log inside every commit, and only then does the commit return. For a
//! send that fsync is on the critical path: the item cannot go to the server before its
//! commit returns. But nothing needs the fsync before the *send*: the write itself must
//! come first (a send refused for a full disk must never reach anyone, and `SQLITE_FULL`
//! comes from the write), while a message sent before its flush is harmless, because
//! the server deduplicates by `messageId`. What the fsync guards is the promise made to
//! the caller: "when `send_message` returns, the item survives a power cut".
//!
//! So the writer commits its enqueue groups at `synchronous = NORMAL` (the frames are
//! written to the WAL, visible to readers, not yet flushed), lets the supervisor send,
//! flushes the WAL itself, and only then answers the callers. The flush is SQLite's own
//! (`xSync` of the WAL's file handle, with the flags a `FULL` commit uses), so it does
//! what the platform's `FULL` commit would do (`fdatasync` on Linux and Android, `fsync`
//! on Apple platforms unless `PRAGMA fullfsync` is set), encrypted stores included.
//! After it, the committed frames are exactly as durable as after a `FULL` commit: a
//! crash before it loses nothing either (the frames are in the OS's page cache), only
//! a power cut could, and nobody was told `Ok` yet.
//!
//! rusqlite has no call for this, so it goes through SQLite's C API: one
//! `sqlite3_file_control` and one call of the VFS method. The `unsafe` is confined to
//! [`Store::flush_wal`].

#![allow(unsafe_code)] // Two calls into SQLite's C API (see above).

use rusqlite::ffi;

use super::{Durability, Store, StoreError};

impl Store {
    /// Whether the writer should commit its enqueue groups unflushed and flush the WAL
    /// itself afterwards: a file-backed store at [`Durability::Full`]. (In memory there
    /// is nothing to flush; at `Normal` commits are not flushed anyway.)
    pub(crate) fn flushes_by_hand(&self) -> bool {
        self.path.is_some() && self.config.durability == Durability::Full
    }

    /// Sets `PRAGMA synchronous` for the commits that follow on this connection.
    pub(crate) fn set_synchronous(&self, durability: Durability) -> Result<(), StoreError> {
        let level = match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        self.conn
            .execute_batch(&format!("PRAGMA synchronous = {level}"))?;
        Ok(())
    }

    /// Runs `write` with its commits unflushed (`synchronous = NORMAL`), whatever the
    /// store's durability, then restores it. For writes whose loss to a power cut is
    /// harmless and whose fsync would only cost time and energy: an ack's `accepted`
    /// (lost, the item is sent again with the same id, and the server, which dedupes
    /// by that id, answers the same ack). A crash of the app loses none of them.
    pub fn unflushed<R>(
        &mut self,
        write: impl FnOnce(&mut Store) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        if !self.flushes_by_hand() {
            return write(self);
        }
        self.set_synchronous(Durability::Normal)?;
        let result = write(self);
        let restored = self.set_synchronous(Durability::Full);
        let written = result?;
        restored?;
        Ok(written)
    }

    /// Flushes the write-ahead log to disk as a `synchronous = FULL` commit does: every
    /// frame committed before this call survives a power cut once it returns `Ok`.
    /// Nothing to do (`Ok`) when no log is open.
    pub(crate) fn flush_wal(&self) -> Result<(), StoreError> {
        let failed = |code: i32, what: &str| {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(
                ffi::Error::new(code),
                Some(format!("flushing the write-ahead log: {what}")),
            ))
        };
        let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
        // SAFETY: `handle()` is this connection's live `sqlite3*`, used on the thread
        // that owns the connection (`Store` is not `Sync`) while no statement of it
        // runs. SQLITE_FCNTL_JOURNAL_POINTER writes one `sqlite3_file*` (the WAL's, in
        // WAL mode; null when none is open) to the pointer given, which points to
        // `file`.
        let rc = unsafe {
            ffi::sqlite3_file_control(
                self.conn.handle(),
                c"main".as_ptr(),
                ffi::SQLITE_FCNTL_JOURNAL_POINTER,
                (&raw mut file).cast(),
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(failed(rc, "no handle to the log"));
        }
        if file.is_null() {
            return Ok(());
        }
        // SAFETY: `file` is the open log's `sqlite3_file`, owned by the connection and
        // valid until the connection closes the log, which cannot happen during this
        // call (we hold the connection). An unopened file has null methods.
        let sync = unsafe { (*file).pMethods.as_ref() }.and_then(|methods| methods.xSync);
        let Some(sync) = sync else {
            return Ok(());
        };
        // SAFETY: the VFS's own sync of its own open file, with the flags SQLite's
        // pager passes for a `FULL` commit in WAL mode without `fullfsync`
        // (`SQLITE_SYNC_NORMAL`).
        let rc = unsafe { sync(file, ffi::SQLITE_SYNC_NORMAL) };
        if rc != ffi::SQLITE_OK {
            return Err(failed(rc, "the flush failed"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    #[test]
    fn a_file_store_flushes_its_log_and_an_in_memory_one_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s.db"), StoreConfig::default()).unwrap();
        assert!(store.flushes_by_hand());
        store.set_synchronous(Durability::Normal).unwrap();
        store
            .conn
            .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        store.flush_wal().unwrap();
        store.set_synchronous(Durability::Full).unwrap();
        let level: i64 = store
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(level, 2, "FULL again");

        let memory = Store::open_in_memory(StoreConfig::default()).unwrap();
        assert!(!memory.flushes_by_hand());
        memory.flush_wal().unwrap();
    }
}
