//! The audit chain in SQLite: one writer thread appends, so the head it caches is the
//! chain's head.

use rusqlite::{Connection, OptionalExtension, params};
use webwaka_realtime::protocol::AuditLogEntry;

use super::db::Writer;
use crate::audit::{AuditRecord, ChainCheck, ChainVerifier, GENESIS_HASH, entry_from_row, seal};
use crate::error::{JobError, StoreError};

/// Appends `record` to the chain (inside the caller's write job).
pub(super) fn append(w: &mut Writer<'_>, record: AuditRecord) -> Result<AuditLogEntry, JobError> {
    let (last_seq, prev_hash) = match w.cache.audit_head.clone() {
        Some(head) => head,
        None => w
            .conn
            .prepare_cached("SELECT sequence, hash FROM audit_log ORDER BY sequence DESC LIMIT 1")?
            .query_row([], |row| Ok((row.get::<_, i64>(0)? as u64, row.get(1)?)))
            .optional()?
            .unwrap_or((0, GENESIS_HASH.to_owned())),
    };
    let (entry, content) = seal(record, last_seq, prev_hash)?;
    w.conn
        .prepare_cached(
            "INSERT INTO audit_log (sequence, audit_id, tenant_id, target_tenant_id, body, hash, prev_hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            entry.sequence as i64,
            entry.audit_id,
            entry.tenant_id,
            entry.target_tenant_id,
            content,
            entry.hash,
            entry.prev_hash,
        ])?;
    w.cache.audit_head = Some((entry.sequence, entry.hash.clone()));
    Ok(entry)
}

/// A page of the entries that concern `tenant` (as actor's or target tenant), newest
/// first, with `sequence < before`.
pub(super) fn page(
    conn: &Connection,
    tenant: &str,
    before: Option<u64>,
    limit: u32,
) -> Result<Vec<AuditLogEntry>, StoreError> {
    let before = before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
    let mut stmt = conn.prepare_cached(
        "SELECT body, hash, prev_hash FROM audit_log
         WHERE (tenant_id = ?1 OR target_tenant_id = ?1) AND sequence < ?2
         ORDER BY sequence DESC LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![tenant, before, i64::from(limit)], |row| {
        Ok((row.get::<_, String>(0)?, row.get(1)?, row.get(2)?))
    })?;
    let mut entries = Vec::new();
    for row in rows {
        let (body, hash, prev) = row?;
        entries.push(entry_from_row(&body, hash, prev)?);
    }
    Ok(entries)
}

/// Recomputes the whole chain.
pub(super) fn verify(conn: &Connection) -> Result<ChainCheck, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT sequence, body, hash, prev_hash FROM audit_log ORDER BY sequence",
    )?;
    let mut rows = stmt.query([])?;
    let mut verifier = ChainVerifier::default();
    while let Some(row) = rows.next()? {
        let body: String = row.get(1)?;
        let prev: String = row.get(3)?;
        verifier.row(row.get::<_, i64>(0)? as u64, &body, row.get(2)?, &prev);
    }
    Ok(verifier.finish())
}

/// Verifies the audit chain of the database file at `path` (the `verify-audit`
/// subcommand), opening it read-only.
pub(crate) fn verify_file(path: &std::path::Path) -> Result<ChainCheck, StoreError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    verify(&conn)
}
