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
//! what the platform's `FULL` commit would do, encrypted stores included: `fsync` on
//! every unix platform (the bundled SQLite is built without `HAVE_FDATASYNC`, so its
//! VFS calls `fsync` for `fdatasync`; turning it on measured no faster here,
//! 2026-12-07). The flush passes `SQLITE_SYNC_NORMAL`, as a `FULL` commit without
//! `PRAGMA fullfsync` does: nothing sets that pragma, and with it Apple platforms would
//! use `F_FULLFSYNC` for commits but not for this flush.
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

    /// Commits made from now on are written, not flushed (`synchronous = NORMAL`),
    /// until [`Store::restore_synchronous`]. No-op unless [`Store::flushes_by_hand`].
    pub(crate) fn lower_synchronous(&self) -> Result<(), StoreError> {
        if !self.flushes_by_hand() {
            return Ok(());
        }
        // Marked first: should the statement fail halfway, the writer still restores.
        self.sync_lowered.set(true);
        // Not a cached statement: SQLite applies this pragma while preparing it, and
        // marks it to run once, so a cached one is parsed again on every run anyway.
        self.conn.execute_batch("PRAGMA synchronous = NORMAL")?;
        Ok(())
    }

    /// Puts `synchronous` back to what the store's durability asks, if it was lowered.
    /// An error leaves it marked lowered ([`Store::sync_lowered`]).
    pub(crate) fn restore_synchronous(&self) -> Result<(), StoreError> {
        if !self.sync_lowered.get() {
            return Ok(());
        }
        self.conn.execute_batch("PRAGMA synchronous = FULL")?;
        self.sync_lowered.set(false);
        Ok(())
    }

    /// Whether commits are still unflushed because `synchronous` could not be restored:
    /// the writer then takes no more work (nothing could be promised durable).
    pub(crate) fn sync_lowered(&self) -> bool {
        self.sync_lowered.get()
    }

    /// Runs `write` with its commits unflushed (`synchronous = NORMAL`), whatever the
    /// store's durability, then restores it (also when `write` fails or panics). For
    /// writes whose loss to a power cut is harmless and whose fsync would only cost
    /// time and energy: an ack's `accepted` (lost, the item is sent again with the same
    /// id, and the server, which dedupes by that id, answers the same ack). A crash of
    /// the app loses none of them.
    pub(crate) fn unflushed<R>(
        &mut self,
        write: impl FnOnce(&mut Store) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.lower_synchronous()?;
        // Restored whatever `write` does, a panic included (the writer thread goes on
        // after a caught panic, and must not go on at NORMAL).
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write(self)));
        // A failure leaves the store marked lowered: the writer stops on it.
        let restored = self.restore_synchronous();
        let written = match result {
            Ok(written) => written?,
            Err(panic_payload) => std::panic::resume_unwind(panic_payload),
        };
        restored?;
        Ok(written)
    }

    /// Flushes the write-ahead log to disk as a `synchronous = FULL` commit does: every
    /// frame committed before this call survives a power cut once it returns `Ok`.
    /// In memory there is nothing to flush (`Ok`); a file store without an open log, or
    /// whose file cannot sync, is an error (it is always in WAL mode, and a commit was
    /// just made: a missing log means something is broken).
    pub(crate) fn flush_wal(&self) -> Result<(), StoreError> {
        if self.path.is_none() {
            return Ok(());
        }
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
            return Err(failed(ffi::SQLITE_IOERR, "no log is open"));
        }
        // SAFETY: `file` is the open log's `sqlite3_file`, owned by the connection and
        // valid until the connection closes the log, which cannot happen during this
        // call (we hold the connection). An unopened file has null methods.
        let sync = unsafe { (*file).pMethods.as_ref() }.and_then(|methods| methods.xSync);
        let Some(sync) = sync else {
            return Err(failed(ffi::SQLITE_IOERR, "the log's file cannot sync"));
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

    fn level(store: &Store) -> i64 {
        store
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_file_store_lowers_flushes_and_restores_and_an_in_memory_one_has_nothing_to_flush() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s.db"), StoreConfig::default()).unwrap();
        assert!(store.flushes_by_hand());
        store.lower_synchronous().unwrap();
        assert_eq!(level(&store), 1, "NORMAL while lowered");
        assert!(store.sync_lowered());
        store
            .conn
            .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        store.flush_wal().unwrap();
        store.restore_synchronous().unwrap();
        assert_eq!(level(&store), 2, "FULL again");
        assert!(!store.sync_lowered());

        let memory = Store::open_in_memory(StoreConfig::default()).unwrap();
        assert!(!memory.flushes_by_hand());
        memory.lower_synchronous().unwrap();
        assert!(!memory.sync_lowered(), "nothing to lower in memory");
        memory.flush_wal().unwrap();
    }

    #[test]
    fn unflushed_restores_the_level_after_an_error_and_after_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path().join("s.db"), StoreConfig::default()).unwrap();
        let seen = store.unflushed(|s| Ok(level(s))).unwrap();
        assert_eq!(seen, 1, "the write ran at NORMAL");
        assert_eq!(level(&store), 2);
        let failed: Result<(), StoreError> =
            store.unflushed(|_| Err(StoreError::NotFound("x".into())));
        assert!(failed.is_err());
        assert_eq!(level(&store), 2, "restored after an error");
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = store.unflushed(|_| -> Result<(), StoreError> { panic!("boom") });
        }));
        assert!(panicked.is_err());
        assert_eq!(level(&store), 2, "restored after a panic");
        assert!(!store.sync_lowered());
        let again = store.unflushed(|s| Ok(level(s))).unwrap();
        assert_eq!(again, 1, "lowered again on the next write");
        assert_eq!(level(&store), 2);
    }
}
