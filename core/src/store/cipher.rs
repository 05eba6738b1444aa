//! Encryption at rest: the store's key ([`StoreKey`]), applying it to a connection,
//! telling an encrypted file from a damaged one, encrypting a store that was plaintext,
//! and rotating the key.
//!
//! With a key, the whole file is encrypted by SQLCipher (AES-256 per page with an HMAC;
//! the WAL's pages too; temporary tables stay in memory). The key is used raw (SQLCipher's
//! `x'…'` form): 32 random bytes the app keeps in the Keychain or the Keystore, so that
//! opening costs no passphrase derivation. SQLCipher comes with the `encryption` feature;
//! a build without it refuses a key with a clear error rather than writing plaintext.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use zeroize::Zeroizing;

use super::StoreError;

/// The bytes of a [`StoreKey`].
pub const KEY_BYTES: usize = 32;

/// The page size of an encrypted store, in bytes: the plaintext store's (see
/// `PAGE_SIZE` in the store), not SQLCipher's default of 4 KiB. It is the cipher's unit
/// and must be set before the first read of every open, so it is fixed for good: another
/// SQLCipher tool opens the file with `PRAGMA cipher_page_size = 2048`. Half the bytes
/// per page is half the bytes encrypted, authenticated and written per commit.
pub const CIPHER_PAGE_SIZE: u32 = 2048;

/// The first 16 bytes of every plaintext SQLite file.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// The key that encrypts a store: 32 random bytes (AES-256). Make it once per
/// installation with a secure random generator and keep it in the platform's key store;
/// losing it loses what the store held that the server does not have. Wiped from memory
/// when dropped; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreKey(Zeroizing<[u8; KEY_BYTES]>);

impl StoreKey {
    /// A key from its 32 bytes; any other length is refused (naming the length found).
    pub fn from_bytes(bytes: &[u8]) -> Result<StoreKey, StoreError> {
        let array: [u8; KEY_BYTES] = bytes.try_into().map_err(|_| StoreError::Invalid {
            field: "key",
            message: format!(
                "must be {KEY_BYTES} bytes (a raw AES-256 key), got {}",
                bytes.len()
            ),
        })?;
        Ok(StoreKey(Zeroizing::new(array)))
    }

    /// SQLCipher's raw-key form, `x'<64 hex digits>'`, as a value to bind or quote.
    fn raw(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("x'{}'", hex::encode(*self.0)))
    }
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(…)")
    }
}

/// Whether this build's SQLite is SQLCipher (it answers `PRAGMA cipher_version`).
pub fn encryption_available(conn: &Connection) -> Result<bool, StoreError> {
    let version: Option<String> = conn
        .query_row("PRAGMA cipher_version", [], |r| r.get(0))
        .optional()?;
    Ok(version.is_some())
}

/// Sets `key` on a connection just opened, before anything reads the file.
pub(super) fn apply_key(conn: &Connection, key: &StoreKey) -> Result<(), StoreError> {
    #[cfg(feature = "encryption")]
    super::crypto::provider_linked();
    if !encryption_available(conn)? {
        return Err(StoreError::Invalid {
            field: "key",
            message: "this build of the SDK has no encryption (the `encryption` feature is off)"
                .into(),
        });
    }
    // SQLCipher writes its own failures (a wrong key's "hmac check failed") to stderr
    // (logcat on Android); they reach the app as typed errors instead.
    conn.execute_batch("PRAGMA cipher_log_level = NONE;")?;
    key_pragma(conn, "key", key)?;
    conn.execute_batch(&format!("PRAGMA cipher_page_size = {CIPHER_PAGE_SIZE};"))?;
    Ok(())
}

/// What a file that SQLite called "not a database" most likely is.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Unreadable {
    /// A plaintext SQLite file (its header says so).
    Plaintext,
    /// Encrypted with another key (or opened without one): pages of whole sizes and a
    /// random salt where the header would be. Never quarantined.
    Encrypted,
    /// Neither: damaged.
    Damaged,
}

/// Looks at the first bytes and the length of the file at `path`.
pub(super) fn classify(path: &Path) -> Unreadable {
    use std::io::Read;
    let mut head = [0u8; 16];
    let read = std::fs::File::open(path).and_then(|mut f| {
        f.read_exact(&mut head)?;
        f.metadata()
    });
    let Ok(meta) = read else {
        return Unreadable::Damaged;
    };
    if &head == SQLITE_MAGIC {
        return Unreadable::Plaintext;
    }
    // SQLCipher's pages are 512 to 65536 bytes, and the file starts with a random
    // 16-byte salt: a file of whole 512-byte blocks that starts with a salt is taken
    // for encrypted. A text file, a truncated file or zeros are damaged.
    let len = meta.len();
    if len >= 512 && len % 512 == 0 && head.iter().any(|b| *b != 0) {
        Unreadable::Encrypted
    } else {
        Unreadable::Damaged
    }
}

/// `path` with `suffix` appended to its file name.
pub(super) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Rewrites the plaintext store at `path` encrypted with `key`, crash-safe: the copy is
/// made beside it (`-encrypting`), synced, then renamed over the original. A crash
/// before the rename leaves the plaintext store as it was (and a stale copy, made
/// again next time); after it, the encrypted one.
///
/// The old file's blocks are freed, not overwritten: on flash storage they may linger
/// until reused. An app that needs none left sets the key from the first open.
pub(super) fn encrypt_plaintext(path: &Path, key: &StoreKey) -> Result<(), StoreError> {
    let copy = with_suffix(path, "-encrypting");
    remove_stale(&copy)?;
    remove_stale(&with_suffix(&copy, "-journal"))?;
    {
        let plain = Connection::open(path)?;
        export(&plain, &copy, key)?;
        plain.close().map_err(|(_, e)| e)?;
    }
    std::fs::File::open(&copy)?.sync_all()?;
    replace_with(&copy, path)
}

/// Writes a copy of the encrypted store open on `conn` (at `path`) under `new_key`,
/// beside it (`-rekeying`), checks that the new key opens it whole, and syncs it: the
/// caller closes `conn` and renames the copy over the original. Until that rename the
/// store is as it was, under its old key.
///
/// Not SQLCipher's `PRAGMA rekey`: it reports success whatever happens (a lock held
/// elsewhere, a full disk roll the rewrite back and it still returns `SQLITE_OK`), and
/// after such a rollback the connection goes on writing pages under the new key into a
/// file under the old one: a file no key opens whole.
pub(super) fn export_rekeyed(
    conn: &Connection,
    path: &Path,
    new_key: &StoreKey,
) -> Result<PathBuf, StoreError> {
    let copy = with_suffix(path, "-rekeying");
    remove_stale(&copy)?;
    let result = export(conn, &copy, new_key).and_then(|()| {
        // The copy opens with the new key (read-only: a copy that vanished meanwhile is
        // an error, not a new empty database), every page reads back, and it holds the
        // store's schema at its version.
        let check = Connection::open_with_flags(
            &copy,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        apply_key(&check, new_key)?;
        let verdict: String = check.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        let shape = |c: &Connection| -> rusqlite::Result<(i64, i64)> {
            c.query_row(
                "SELECT (SELECT COUNT(*) FROM sqlite_master), user_version FROM pragma_user_version",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        };
        let (copied, original) = (shape(&check)?, shape(conn)?);
        if verdict != "ok" || copied != original {
            return Err(StoreError::Invalid {
                field: "key",
                message: format!(
                    "the store rewritten under the new key did not check: {verdict}, \
                     {copied:?} schema entries and version against {original:?}"
                ),
            });
        }
        check.close().map_err(|(_, e)| e)?;
        std::fs::File::open(&copy)?.sync_all()?;
        Ok(())
    });
    match result {
        Ok(()) => Ok(copy),
        Err(e) => {
            // The original is untouched; the partial copy goes.
            let _ = remove_stale(&copy);
            Err(e)
        }
    }
}

/// Everything committed on `conn` in the main file, then copied to `copy` under `key`
/// with the schema version (sqlcipher_export copies the schema and rows, not
/// `user_version`).
fn export(conn: &Connection, copy: &Path, key: &StoreKey) -> Result<(), StoreError> {
    checkpoint_whole(conn)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let copy_text = copy.to_str().ok_or_else(|| StoreError::Invalid {
        field: "store path",
        message: "is not valid UTF-8".into(),
    })?;
    conn.execute(
        "ATTACH DATABASE ?1 AS rewritten KEY ?2",
        rusqlite::params![copy_text, key.raw().as_str()],
    )?;
    let copied = conn
        .execute_batch(&format!(
            "PRAGMA rewritten.cipher_page_size = {CIPHER_PAGE_SIZE};"
        ))
        .and_then(|()| conn.query_row("SELECT sqlcipher_export('rewritten')", [], |_| Ok(())))
        .and_then(|()| conn.execute_batch(&format!("PRAGMA rewritten.user_version = {version};")));
    // Detached whatever happened, so that the connection is as it was.
    let detached = conn.execute_batch("DETACH DATABASE rewritten;");
    copied?;
    detached?;
    Ok(())
}

/// `PRAGMA wal_checkpoint(TRUNCATE)`, refused unless it checkpointed the whole log (a
/// reader elsewhere, e.g. an app extension with the file open, can hold part of it:
/// SQLite then reports busy in the result, not as an error).
fn checkpoint_whole(conn: &Connection) -> Result<(), StoreError> {
    let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
    if busy != 0 {
        return Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("another connection has the store open: its log could not be checkpointed".into()),
        )));
    }
    Ok(())
}

/// Renames the checked copy over the store at `path` (its connection closed), drops the
/// old file's log, and makes the rename durable. An error means the rename did not
/// happen (the store is as it was); after it, nothing fails: the old log was emptied by
/// the checkpoint, so one left behind (its removal failed) is only tidied up later.
pub(super) fn replace_with(copy: &Path, path: &Path) -> Result<(), StoreError> {
    std::fs::rename(copy, path)?;
    for suffix in ["-wal", "-shm"] {
        if let Err(e) = remove_stale(&with_suffix(path, suffix)) {
            tracing::warn!(error = %e, suffix, "could not remove the old store's log");
        }
    }
    sync_parent(path);
    Ok(())
}

/// Removes what an interrupted rewrite left beside the store at `path` (a copy made but
/// never renamed: the store itself was not changed).
pub(super) fn remove_leftovers(path: &Path) -> Result<(), StoreError> {
    for suffix in ["-rekeying", "-rekeying-journal"] {
        remove_stale(&with_suffix(path, suffix))?;
    }
    Ok(())
}

/// Makes a rename in `path`'s directory durable (best effort where a directory cannot
/// be opened).
fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
}

/// `PRAGMA <pragma> = "x'…'"`. PRAGMA takes no bound parameters: the key goes in as a
/// quoted literal (hex digits only, so nothing to escape), built and dropped in wiped
/// memory.
fn key_pragma(conn: &Connection, pragma: &str, key: &StoreKey) -> Result<(), StoreError> {
    let sql = Zeroizing::new(format!("PRAGMA {pragma} = \"{}\";", key.raw().as_str()));
    conn.execute_batch(&sql)?;
    Ok(())
}

fn remove_stale(path: &Path) -> Result<(), std::io::Error> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_key_is_32_bytes_and_never_printed() {
        let err = StoreKey::from_bytes(&[1; 31]).unwrap_err();
        assert!(err.to_string().contains("got 31"), "{err}");
        let key = StoreKey::from_bytes(&[0xab; 32]).unwrap();
        assert_eq!(format!("{key:?}"), "StoreKey(…)");
        assert_eq!(key.raw().as_str(), format!("x'{}'", "ab".repeat(32)));
    }

    #[test]
    fn files_are_told_apart_by_header_and_length() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            classify(&path)
        };
        let mut plain = SQLITE_MAGIC.to_vec();
        plain.resize(4096, 0);
        assert_eq!(file("plain", &plain), Unreadable::Plaintext);
        let salted: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(file("salted", &salted), Unreadable::Encrypted);
        assert_eq!(file("text", b"not a database at all"), Unreadable::Damaged);
        assert_eq!(file("zeros", &[0; 4096]), Unreadable::Damaged);
        assert_eq!(file("cut", &salted[..1000]), Unreadable::Damaged);
        assert_eq!(classify(&dir.path().join("missing")), Unreadable::Damaged);
    }

    /// The store of a test: a keyed file at `path` holding one row.
    #[cfg(feature = "encryption")]
    fn fixture_key() -> StoreKey {
        StoreKey::from_bytes(&(0..32).collect::<Vec<u8>>()).unwrap()
    }

    /// An encrypted file SQLCipher 4.14 wrote with its OpenSSL provider (2 KiB cipher
    /// pages, the key `00 01 … 1f`), made by
    /// `a_keyed_file_this_build_writes_reads_back_only_with_its_key` in a build
    /// with `LIBSQLITE3_FLAGS=""`. This build's provider reads it: the bytes on disk do
    /// not depend on the provider.
    #[cfg(feature = "encryption")]
    #[test]
    fn a_store_written_with_openssl_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("openssl.db");
        std::fs::write(
            &path,
            include_bytes!("../../tests/fixtures/sqlcipher-openssl.db"),
        )
        .unwrap();
        assert_eq!(classify(&path), Unreadable::Encrypted);
        let conn = Connection::open(&path).unwrap();
        apply_key(&conn, &fixture_key()).unwrap();
        let text: String = conn.query_row("SELECT v FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(text, "written by SQLCipher with OpenSSL");
        let wrong = Connection::open(&path).unwrap();
        apply_key(&wrong, &StoreKey::from_bytes(&[9; 32]).unwrap()).unwrap();
        let read = wrong.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0));
        assert!(read.is_err(), "another key read the file: {read:?}");
    }

    /// This build writes a keyed file of the fixture's shape that it reads back, and
    /// only with its key. With `WEBWAKA_CIPHER_FIXTURE` set, the file is also copied
    /// there: how the fixture above was made (in a build with `LIBSQLITE3_FLAGS=""`,
    /// i.e. SQLCipher's OpenSSL provider).
    #[cfg(feature = "encryption")]
    #[test]
    fn a_keyed_file_this_build_writes_reads_back_only_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("written.db");
        let text = "written by SQLCipher with OpenSSL";
        {
            let conn = Connection::open(&path).unwrap();
            apply_key(&conn, &fixture_key()).unwrap();
            conn.execute_batch("CREATE TABLE t(v TEXT); PRAGMA journal_mode = DELETE;")
                .unwrap();
            conn.execute("INSERT INTO t(v) VALUES (?1)", [text])
                .unwrap();
        }
        assert_eq!(classify(&path), Unreadable::Encrypted);
        let conn = Connection::open(&path).unwrap();
        apply_key(&conn, &fixture_key()).unwrap();
        let read: String = conn.query_row("SELECT v FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(read, text);
        let wrong = Connection::open(&path).unwrap();
        apply_key(&wrong, &StoreKey::from_bytes(&[9; 32]).unwrap()).unwrap();
        assert!(
            wrong
                .query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
                .is_err()
        );
        if let Some(out) = std::env::var_os("WEBWAKA_CIPHER_FIXTURE") {
            std::fs::copy(&path, out).unwrap();
        }
    }

    /// This build's SQLCipher uses the SDK's provider (`.cargo/config.toml`), not
    /// OpenSSL's: the library carries no libcrypto.
    #[cfg(all(feature = "encryption", not(target_vendor = "apple")))]
    #[test]
    fn sqlcipher_uses_the_sdk_provider() {
        let conn = Connection::open_in_memory().unwrap();
        apply_key(&conn, &fixture_key()).unwrap();
        let provider: String = conn
            .query_row("PRAGMA cipher_provider", [], |r| r.get(0))
            .unwrap();
        assert!(provider.starts_with("webwaka-rust"), "{provider}");
    }
}
