//! The offline store: where the SDK's promise that nothing is lost lives.
//!
//! One SQLite file (rusqlite, bundled SQLite) per installation holds:
//!
//! - the **identity**: the `clientId` made once and kept, and a small key/value for the
//!   client's own state (e.g. the transport last known to work);
//! - the **outbox** ([`outbox`]): every outbound item the app handed over, committed to
//!   disk before the call returns, ordered per lane, with its delivery state;
//! - the **entity cache** ([`entity`]): the server's state per entity, local edits not
//!   yet reconciled on top of it, and open conflicts;
//! - the **inbound cursor** ([`inbound`]): the last durable event processed and the ids
//!   recently seen, advanced in the same transaction as the event is applied.
//!
//! No network code lives here: the client drives the store through this small, typed,
//! synchronous API (on the writer's thread, [`writer`]). Time is always an argument, never read here,
//! so every path is testable without sleeping.
//!
//! ## Durability and concurrency
//!
//! The file is in WAL mode with `busy_timeout` set and foreign keys on. Writes go through
//! one connection; SQLite's WAL lets readers (another process's connection, e.g. an app
//! extension) read while it writes. `synchronous = FULL` is the default: a commit is on
//! the disk when the call returns, so a power cut cannot lose an item the app was told
//! is persisted. `NORMAL` ([`Durability::Normal`]) skips the fsync of each commit (WAL
//! still keeps the file consistent); a crash of the process loses nothing, a power cut
//! may lose the last commits. Apps that accept that for speed can choose it.
//!
//! A file that is not a database, or is corrupt, is a [`StoreError::Corrupt`] at open:
//! the file is moved aside (kept for recovery, never deleted) and the app is told where.
//!
//! ## Encryption at rest
//!
//! With [`StoreConfig::key`] the whole file is encrypted (SQLCipher; see [`cipher`]). A
//! file encrypted with another key, or opened without one, is a [`StoreError::WrongKey`]
//! and is left exactly as it was: never taken for corrupt, never moved. A plaintext store
//! opened with a key is encrypted once, in place. [`Store::rekey`] changes the key.

pub mod cipher;
#[cfg(feature = "encryption")]
mod crypto;
pub mod entity;
mod flush;
pub mod inbound;
pub mod outbox;
mod schema;
pub mod writer;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

pub use cipher::{KEY_BYTES, StoreKey};
pub use entity::{CachedEntity, LocalEdit, SyncOutcome, entity_lane};
pub use outbox::{
    DEFAULT_MAX_BYTES, DEFAULT_MAX_ITEMS, ItemKind, ItemState, NewItem, OutboxClass, OutboxItem,
};
pub use writer::{StoreWriter, WriterStats, Written};

use crate::protocol::Timestamp;

/// How hard a commit tries to reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous = FULL`: each commit is fsynced before it returns (the default).
    #[default]
    Full,
    /// `synchronous = NORMAL`: survives a process crash, not always a power cut.
    Normal,
}

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Commit durability.
    pub durability: Durability,
    /// The outbox refuses new items past this many pending ones.
    pub max_items: usize,
    /// The outbox refuses new items past this many pending bytes of bodies.
    pub max_bytes: u64,
    /// How long a writer waits for another process's lock before giving up.
    pub busy_timeout: Duration,
    /// Merge functions per entity type, as the server has them (CUSTOM_MERGE): local
    /// edits of these types are forecast with the same function (a counter's delta is
    /// added, not written over).
    pub merges:
        std::collections::BTreeMap<String, std::sync::Arc<dyn crate::reconcile::CustomMerge>>,
    /// The largest the database may grow, in bytes (SQLite's `max_page_count`); `None`:
    /// as large as the disk allows. A write that would grow it further fails with
    /// [`StorageFailure::Full`], as on a full disk.
    pub max_file_bytes: Option<u64>,
    /// Encrypts the whole file with this key (needs the `encryption` feature). `None`:
    /// plaintext SQLite.
    pub key: Option<StoreKey>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            durability: Durability::Full,
            max_items: DEFAULT_MAX_ITEMS,
            max_bytes: DEFAULT_MAX_BYTES,
            busy_timeout: Duration::from_secs(10),
            merges: std::collections::BTreeMap::new(),
            max_file_bytes: None,
            key: None,
        }
    }
}

/// What went wrong in the store. Nothing already committed is lost by any of these.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file was not a usable database; it was moved to `moved_to` and a new one made.
    #[error(
        "the store at {path} was unreadable ({reason}); it was moved to {moved_to} and a new store was created"
    )]
    Corrupt {
        /// The store's path.
        path: PathBuf,
        /// Where the old file now is.
        moved_to: PathBuf,
        /// What SQLite said.
        reason: String,
    },
    /// The database was written by a newer SDK (its schema version is ahead of ours).
    #[error("the store's schema version {found} is newer than this SDK's {supported}")]
    TooNew {
        /// The file's version.
        found: usize,
        /// The newest version this SDK knows.
        supported: usize,
    },
    /// The outbox is full; nothing was dropped, the new item was refused.
    #[error("the outbox is full: {limit}")]
    QueueFull {
        /// Which limit, e.g. `10000 items` or `16777216 bytes`.
        limit: String,
    },
    /// No item with this id.
    #[error("no outbox item {0}")]
    NotFound(String),
    /// The item is not in a state that allows this change.
    #[error("outbox item {id} is {state}, cannot {action}")]
    InvalidState {
        /// The item.
        id: String,
        /// Its state.
        state: ItemState,
        /// What was asked.
        action: &'static str,
    },
    /// An item with this id exists already (ids are the server's dedupe keys).
    #[error("outbox item {0} exists already")]
    Duplicate(String),
    /// A value could not be encoded or decoded.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// SQLite failed (disk full, I/O error, locked past the busy timeout, …).
    #[error("storage error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The file is encrypted and the key given (or none) does not open it. Nothing was
    /// changed and the file was not moved: open it again with its key.
    #[error(
        "the store at {path} is encrypted and {}; nothing was changed",
        if *.keyed { "the key given does not open it" } else { "no key was given" }
    )]
    WrongKey {
        /// The store's path.
        path: PathBuf,
        /// Whether a key was given (the wrong one) or none.
        keyed: bool,
    },
    /// A migration failed.
    #[error("schema migration failed: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    /// The file could not be moved aside or created.
    #[error("file error: {0}")]
    Io(#[from] std::io::Error),
    /// The [`StoreWriter`] was closed (or its thread stopped): the request was not run.
    #[error("the store writer is closed")]
    WriterClosed,
    /// The disk failed to flush a commit (an I/O error of the device, as a
    /// `synchronous = FULL` commit of SQLite would report it). The writer takes no more
    /// work: after a failed flush the OS may already have dropped what it could not
    /// write, so nothing later can be promised durable. Open the store again.
    #[error(
        "the disk failed to flush the store ({0}); the store takes no more work until it is opened again"
    )]
    FlushFailed(String),
}

/// What kind of storage failure a [`StoreError`] is: the app can say "storage full"
/// rather than "offline".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageFailure {
    /// The disk (or the store's `max_file_bytes`) is full: nothing new can be written
    /// until space is freed.
    Full,
    /// The file is damaged (or not a database).
    Corrupt,
    /// Any other failure of SQLite or the file system (I/O error, locked, read-only).
    Io,
    /// The file is encrypted and the key given (or none) does not open it.
    WrongKey,
}

impl StoreError {
    /// The kind of storage failure this is; `None` for errors about the request itself
    /// (not found, invalid state or input, queue full).
    pub fn storage_failure(&self) -> Option<StorageFailure> {
        match self {
            StoreError::Sqlite(e) => Some(sqlite_failure(e)),
            StoreError::Migration(rusqlite_migration::Error::RusqliteError { err, .. }) => {
                Some(sqlite_failure(err))
            }
            StoreError::Migration(_) | StoreError::WriterClosed | StoreError::FlushFailed(_) => {
                Some(StorageFailure::Io)
            }
            StoreError::Corrupt { .. } => Some(StorageFailure::Corrupt),
            StoreError::WrongKey { .. } => Some(StorageFailure::WrongKey),
            StoreError::Io(e) if e.kind() == std::io::ErrorKind::StorageFull => {
                Some(StorageFailure::Full)
            }
            StoreError::Io(_) => Some(StorageFailure::Io),
            StoreError::TooNew { .. }
            | StoreError::QueueFull { .. }
            | StoreError::NotFound(_)
            | StoreError::InvalidState { .. }
            | StoreError::Duplicate(_)
            | StoreError::Invalid { .. } => None,
        }
    }
}

fn sqlite_failure(e: &rusqlite::Error) -> StorageFailure {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => StorageFailure::Full,
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
            StorageFailure::Corrupt
        }
        _ => StorageFailure::Io,
    }
}

/// The SDK's SQLite store. Synchronous: call it from a blocking task.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: Option<PathBuf>,
    config: StoreConfig,
    client_id: String,
    /// Set while the connection's `synchronous` is lower than `config.durability` asks
    /// (see `flush.rs`); the writer refuses work if it cannot be put back.
    sync_lowered: std::cell::Cell<bool>,
}

const CLIENT_ID_KEY: &str = "client_id";
/// The page size of a new store file, in bytes.
const PAGE_SIZE: u32 = 2048;
const KV_PREFIX: &str = "kv.";

impl Store {
    /// Opens (or creates) the store at `path`, migrating it to the current schema.
    ///
    /// A file that is not a usable database is moved aside and a new store is created:
    /// the error [`StoreError::Corrupt`] says so. Call `open` again to use the new
    /// store; the old file is kept for recovery.
    ///
    /// With [`StoreConfig::key`], a plaintext store is encrypted first (once, in place).
    /// An encrypted file the key does not open (or opened without a key) is
    /// [`StoreError::WrongKey`], and the file is left alone.
    pub fn open(path: impl AsRef<Path>, config: StoreConfig) -> Result<Store, StoreError> {
        let path = path.as_ref().to_path_buf();
        let e = match Self::open_file(&path, &config) {
            Err(StoreError::Sqlite(e)) if is_corruption(&e) => e,
            other => return other,
        };
        match (cipher::classify(&path), &config.key) {
            (cipher::Unreadable::Encrypted, key) => Err(StoreError::WrongKey {
                path,
                keyed: key.is_some(),
            }),
            (cipher::Unreadable::Plaintext, Some(key)) => {
                // A store from before the app set a key: encrypt it, then open it. A
                // damaged plaintext file fails here and is moved aside as below.
                let encrypted = cipher::encrypt_plaintext(&path, key)
                    .and_then(|()| Self::open_file(&path, &config));
                match encrypted {
                    Err(StoreError::Sqlite(e)) if is_corruption(&e) => Self::corrupt(path, &e),
                    other => other,
                }
            }
            _ => Self::corrupt(path, &e),
        }
    }

    /// Moves a damaged file aside and says so.
    fn corrupt(path: PathBuf, e: &rusqlite::Error) -> Result<Store, StoreError> {
        let moved_to = move_aside(&path)?;
        Err(StoreError::Corrupt {
            path,
            moved_to,
            reason: e.to_string(),
        })
    }

    /// An in-memory store (tests, tools); nothing survives it.
    pub fn open_in_memory(config: StoreConfig) -> Result<Store, StoreError> {
        let conn = Connection::open_in_memory()?;
        Self::init(conn, None, config)
    }

    fn open_file(path: &Path, config: &StoreConfig) -> Result<Store, StoreError> {
        if config.key.is_some() {
            // A key rotation the app was stopped in left its copy (the store itself is
            // as it was).
            cipher::remove_leftovers(path)?;
        }
        let conn = Self::connect(path, config)?;
        Self::init(conn, Some(path.to_path_buf()), config.clone())
    }

    /// A connection to the file at `path`, keyed (not yet configured).
    fn connect(path: &Path, config: &StoreConfig) -> Result<Connection, StoreError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(path, flags)?;
        if let Some(key) = &config.key {
            cipher::apply_key(&conn, key)?;
        }
        Ok(conn)
    }

    fn init(
        mut conn: Connection,
        path: Option<PathBuf>,
        config: StoreConfig,
    ) -> Result<Store, StoreError> {
        Self::configure(&conn, path.is_some(), &config)?;
        let found: usize = conn
            .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))?
            .try_into()
            .unwrap_or(usize::MAX);
        if found > schema::latest_version() {
            return Err(StoreError::TooNew {
                found,
                supported: schema::latest_version(),
            });
        }
        migrate(&mut conn)?;
        Self::cap_file_size(&conn, &config)?;
        let client_id = Self::load_or_make_client_id(&conn)?;
        let store = Store {
            conn,
            path,
            config,
            client_id,
            sync_lowered: std::cell::Cell::new(false),
        };
        store.recover_in_flight()?;
        Ok(store)
    }

    /// The connection's settings, before anything else runs on it: timeouts, the
    /// statement cache, query plans, page size, WAL, durability.
    fn configure(conn: &Connection, file: bool, config: &StoreConfig) -> Result<(), StoreError> {
        conn.busy_timeout(config.busy_timeout)?;
        // Room for every statement of the outbox and entity cache (default 16): the hot
        // paths use prepared statements from this cache instead of parsing SQL per call.
        conn.set_prepared_statement_cache_capacity(64);
        // Stable query plans: without this, SQLite (built with STAT4) marks a statement
        // whose plan looked at a bound value (e.g. `LIMIT ?2`) to be parsed and planned
        // again every time that parameter is bound: `take_sendable` did, on every call.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            true,
        )?;
        // Reading the header first turns "not a database" into an error here.
        let _: i64 = conn.query_row("PRAGMA schema_version", [], |r| r.get(0))?;
        // A new file gets 2 KiB pages (SQLite's default is 4 KiB): a single-item
        // enqueue writes 4 pages to the WAL and fsyncs them, and half the bytes per
        // commit brought it nearer the disk's own fsync rate (about 0.74 → 0.85-0.9 ×
        // in alternating runs), at some cost to batched state changes (take+ack about
        // 25 → 29 µs of CPU per item). A file that exists keeps its page size.
        // An encrypted file's page size is the cipher's, set with the key
        // (`cipher::CIPHER_PAGE_SIZE`, the same 2 KiB).
        if config.key.is_none() {
            conn.execute_batch(&format!("PRAGMA page_size = {PAGE_SIZE};"))?;
        }
        let mode = set_wal(conn, config.busy_timeout)?;
        if file && !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Invalid {
                field: "journal_mode",
                message: format!("SQLite refused WAL mode (got {mode})"),
            });
        }
        let sync = match config.durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.execute_batch(&format!(
            "PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON;"
        ))?;
        Ok(())
    }

    /// `StoreConfig::max_file_bytes` as SQLite's `max_page_count`.
    fn cap_file_size(conn: &Connection, config: &StoreConfig) -> Result<(), StoreError> {
        if let Some(bytes) = config.max_file_bytes {
            // SQLite keeps the count at least at the file's current size.
            let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            let page_size = u64::try_from(page_size)
                .unwrap_or(u64::from(PAGE_SIZE))
                .max(1);
            let pages = bytes.div_ceil(page_size).max(1);
            let _: i64 = conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                r.get(0)
            })?;
        }
        Ok(())
    }

    fn load_or_make_client_id(conn: &Connection) -> Result<String, StoreError> {
        let existing: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [CLIENT_ID_KEY],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(id) = existing {
            return Ok(id);
        }
        let id = uuid::Uuid::now_v7().to_string();
        // INSERT OR IGNORE + re-read: two processes opening a new file agree on one id.
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)",
            params![CLIENT_ID_KEY, id],
        )?;
        Ok(conn.query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [CLIENT_ID_KEY],
            |r| r.get(0),
        )?)
    }

    /// This installation's `clientId`: made at the first open, then kept.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The file's path (`None` in memory).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The schema version this SDK creates and migrates to.
    pub fn latest_schema_version() -> usize {
        schema::latest_version()
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<usize, StoreError> {
        let v: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        Ok(usize::try_from(v).unwrap_or(0))
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Reads the client's own value under `key`.
    pub fn kv_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [format!("{KV_PREFIX}{key}")],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Stores the client's own value under `key` (`None` removes it).
    pub fn kv_set(&self, key: &str, value: Option<&str>) -> Result<(), StoreError> {
        let key = format!("{KV_PREFIX}{key}");
        match value {
            Some(v) => self.conn.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, v],
            )?,
            None => self
                .conn
                .execute("DELETE FROM meta WHERE key = ?1", [key])?,
        };
        Ok(())
    }

    /// Whether the file is encrypted (opened with a key).
    pub fn is_encrypted(&self) -> bool {
        self.config.key.is_some()
    }

    /// Changes the key of an encrypted store to `new_key`. The store is rewritten under
    /// the new key into a copy beside it, the copy is checked with the new key and
    /// synced, then renamed over the store in one step: until `Ok` the file is under the
    /// old key, after it under the new one, and a crash between leaves one or the other,
    /// never a mix (keep both keys until this returns; see `docs/client.md`). Another
    /// process sharing the file must close it meanwhile (the file is replaced) and open
    /// it with the new key afterwards; one reading or writing it now makes this fail
    /// (busy) and change nothing. A plaintext store is encrypted by opening it with a
    /// key, not by this.
    pub fn rekey(&mut self, new_key: StoreKey) -> Result<(), StoreError> {
        let (Some(path), Some(_)) = (self.path.clone(), &self.config.key) else {
            return Err(StoreError::Invalid {
                field: "key",
                message: "the store is not encrypted: open it with a key to encrypt it".into(),
            });
        };
        let copy = cipher::export_rekeyed(&self.conn, &path, &new_key)?;
        // The old connection goes before the rename: its log's name is the new file's.
        let old = std::mem::replace(&mut self.conn, Connection::open_in_memory()?);
        let renamed = match old.close() {
            Ok(()) => cipher::replace_with(&copy, &path),
            Err((_, e)) => Err(e.into()),
        };
        match &renamed {
            // From the rename on, the file is under the new key, whatever follows.
            Ok(()) => self.config.key = Some(new_key),
            Err(_) => {
                let _ = cipher::remove_leftovers(&path);
            }
        }
        // Open again, under the key the file has now.
        let config = self.config.clone();
        let reopened = Self::connect(&path, &config).and_then(|conn| {
            Self::configure(&conn, true, &config)?;
            Self::cap_file_size(&conn, &config)?;
            Ok(conn)
        });
        match (renamed, reopened) {
            (renamed, Ok(conn)) => {
                self.conn = conn;
                renamed
            }
            (Ok(()), Err(e)) => Err(StoreError::Invalid {
                field: "key",
                message: format!(
                    "the key was changed, but the store could not be opened again ({e}): \
                     open the client again with the new key"
                ),
            }),
            (Err(e), Err(_)) => Err(e),
        }
    }

    /// Runs SQLite's `PRAGMA integrity_check`; `Ok(())` when the file is sound.
    pub fn integrity_check(&self) -> Result<(), StoreError> {
        let result: String = self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if result == "ok" {
            Ok(())
        } else {
            Err(StoreError::Invalid {
                field: "integrity_check",
                message: result,
            })
        }
    }
}

/// `PRAGMA journal_mode = WAL`, returning the mode SQLite reports.
///
/// Switching a new file to WAL takes an exclusive lock; when two processes open a new
/// file together, each can hold the shared lock the other waits on, and SQLite answers
/// "database is locked" at once instead of calling the busy handler. Once the file is
/// in WAL (it stays so) this is a plain read. Retried with short sleeps, for at most
/// `timeout`.
fn set_wal(conn: &Connection, timeout: Duration) -> Result<String, StoreError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)) {
            Ok(mode) => return Ok(mode),
            Err(e)
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Migrates to the latest schema, also when another process does it at the same time.
///
/// Two processes opening a new file together both read version 0 and both run the
/// first migration; the second one's transaction fails ("table … already exists") and
/// rolls back whole (each run is one transaction). When the version moved meanwhile,
/// running again reads what the other committed and does the rest, if anything.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version = |conn: &Connection| -> Result<i64, StoreError> {
        Ok(conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
    };
    // Each retry follows a version change: at most one per migration.
    let mut retries = schema::latest_version();
    loop {
        let before = version(conn)?;
        match schema::migrations().to_latest(conn) {
            Ok(()) => return Ok(()),
            Err(e) if retries > 0 && version(conn)? != before => {
                retries -= 1;
                let _ = e; // another process migrated: try again from its version
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Milliseconds since the Unix epoch, as stored.
pub(crate) fn to_ms(t: Timestamp) -> i64 {
    t.timestamp_millis()
}

/// The time stored as `ms`.
pub(crate) fn from_ms(ms: i64) -> Timestamp {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

/// Moves `path` (and its WAL and shared-memory files) to `path.corrupt-N`.
fn move_aside(path: &Path) -> Result<PathBuf, std::io::Error> {
    let mut n = 1;
    let target = loop {
        let mut candidate = path.as_os_str().to_owned();
        candidate.push(format!(".corrupt-{n}"));
        let candidate = PathBuf::from(candidate);
        if !candidate.exists() {
            break candidate;
        }
        n += 1;
    };
    std::fs::rename(path, &target)?;
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let side = PathBuf::from(side);
        if side.exists() {
            let mut dest = target.as_os_str().to_owned();
            dest.push(suffix);
            std::fs::rename(&side, PathBuf::from(dest))?;
        }
    }
    Ok(target)
}
