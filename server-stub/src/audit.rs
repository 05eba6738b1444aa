//! The audit log (INV-003): an append-only table in which every entry is chained to
//! the previous one by a hash, so that changing, removing or reordering an entry is
//! detectable.
//!
//! `hash = sha256_hex(prevHash ‖ JCS(entry without hash and prevHash))`, with the
//! genesis `prevHash` of 64 zeros. The table also refuses UPDATE and DELETE (triggers),
//! but the chain is what proves integrity: [`verify`] recomputes it.

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use sha2::{Digest, Sha256};
use webwaka_realtime::protocol::{ActorType, AuditLogEntry, AuditResult, JsonObject};

use crate::db::Writer;
use crate::error::{JobError, StoreError};

/// `prevHash` of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An audit record before it has a place in the chain.
#[derive(Debug, Clone)]
pub(crate) struct AuditRecord {
    pub(crate) tenant_id: String,
    pub(crate) target_tenant_id: Option<String>,
    pub(crate) actor_type: ActorType,
    pub(crate) actor_id: String,
    pub(crate) action: String,
    pub(crate) resource: String,
    pub(crate) resource_id: Option<String>,
    pub(crate) result: AuditResult,
    pub(crate) justification: Option<String>,
    pub(crate) metadata: Option<JsonObject>,
}

impl AuditRecord {
    /// A record of `action` on `resource` by user `actor_id` of `tenant_id`.
    pub(crate) fn new(
        tenant_id: &str,
        actor_id: &str,
        action: &str,
        resource: &str,
        result: AuditResult,
    ) -> Self {
        Self {
            tenant_id: tenant_id.to_owned(),
            target_tenant_id: None,
            actor_type: ActorType::User,
            actor_id: actor_id.to_owned(),
            action: action.to_owned(),
            resource: resource.to_owned(),
            resource_id: None,
            result,
            justification: None,
            metadata: None,
        }
    }

    /// The same record by a system component.
    pub(crate) fn system(mut self) -> Self {
        self.actor_type = ActorType::System;
        self
    }

    /// The same record naming the tenant acted upon (when not the actor's).
    pub(crate) fn target(mut self, tenant: &str) -> Self {
        if tenant != self.tenant_id {
            self.target_tenant_id = Some(tenant.to_owned());
        }
        self
    }

    /// The same record naming the resource's id.
    pub(crate) fn resource_id(mut self, id: impl Into<String>) -> Self {
        self.resource_id = Some(id.into());
        self
    }

    /// The same record with one more metadata entry.
    pub(crate) fn meta(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.metadata
            .get_or_insert_with(JsonObject::new)
            .insert(key.to_owned(), value.into());
        self
    }

    /// The same record by a super admin, with the justification given (if any).
    pub(crate) fn super_admin(mut self, justification: Option<&str>) -> Self {
        self.actor_type = ActorType::SuperAdmin;
        self.justification = justification.map(str::to_owned);
        self
    }
}

/// The hash of `entry`'s content chained to `prev_hash`.
fn chain_hash(prev_hash: &str, content: &Value) -> String {
    let canonical = serde_jcs::to_vec(content)
        .or_else(|_| serde_json::to_vec(content))
        .unwrap_or_default();
    let mut hasher = Sha256::new();
    hasher.update(prev_hash.as_bytes());
    hasher.update(&canonical);
    hex::encode(hasher.finalize())
}

/// The entry as stored and hashed: everything but `hash` and `prevHash`.
fn content_of(entry: &AuditLogEntry) -> Result<Value, serde_json::Error> {
    let mut value = serde_json::to_value(entry)?;
    if let Value::Object(map) = &mut value {
        map.remove("hash");
        map.remove("prevHash");
    }
    Ok(value)
}

/// Appends `record` to the chain (inside the caller's write job).
pub(crate) fn append(w: &mut Writer<'_>, record: AuditRecord) -> Result<AuditLogEntry, JobError> {
    let (last_seq, prev_hash) = match w.cache.audit_head.clone() {
        Some(head) => head,
        None => w
            .conn
            .prepare_cached("SELECT sequence, hash FROM audit_log ORDER BY sequence DESC LIMIT 1")?
            .query_row([], |row| Ok((row.get::<_, i64>(0)? as u64, row.get(1)?)))
            .optional()?
            .unwrap_or((0, GENESIS_HASH.to_owned())),
    };
    let sequence = last_seq + 1;
    let mut entry = AuditLogEntry {
        audit_id: format!("aud-{sequence:06}"),
        sequence,
        timestamp: chrono::Utc::now(),
        tenant_id: record.tenant_id,
        target_tenant_id: record.target_tenant_id,
        actor_type: record.actor_type,
        actor_id: record.actor_id,
        action: record.action,
        resource: record.resource,
        resource_id: record.resource_id,
        result: record.result,
        justification: record.justification,
        metadata: record.metadata,
        hash: String::new(),
        prev_hash: prev_hash.clone(),
    };
    let content = content_of(&entry)?;
    entry.hash = chain_hash(&prev_hash, &content);
    w.conn
        .prepare_cached(
            "INSERT INTO audit_log (sequence, audit_id, tenant_id, target_tenant_id, body, hash, prev_hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            sequence as i64,
            entry.audit_id,
            entry.tenant_id,
            entry.target_tenant_id,
            content.to_string(),
            entry.hash,
            entry.prev_hash,
        ])?;
    w.cache.audit_head = Some((sequence, entry.hash.clone()));
    Ok(entry)
}

fn entry_from_row(
    body: &str,
    hash: String,
    prev_hash: String,
) -> Result<AuditLogEntry, StoreError> {
    let mut value: Value = serde_json::from_str(body)?;
    if let Value::Object(map) = &mut value {
        map.insert("hash".into(), Value::String(hash));
        map.insert("prevHash".into(), Value::String(prev_hash));
    }
    Ok(serde_json::from_value(value)?)
}

/// A page of the entries that concern `tenant` (as actor's or target tenant), newest
/// first, with `sequence < before`.
pub(crate) fn page(
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

/// The result of checking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainCheck {
    /// True when every link and hash checks out.
    pub valid: bool,
    /// Entries checked.
    pub entries: u64,
    /// The first entry that does not check out, and why.
    pub first_bad: Option<(u64, String)>,
}

/// Recomputes the whole chain.
pub(crate) fn verify(conn: &Connection) -> Result<ChainCheck, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT sequence, body, hash, prev_hash FROM audit_log ORDER BY sequence",
    )?;
    let mut rows = stmt.query([])?;
    let mut expected_prev = GENESIS_HASH.to_owned();
    let mut expected_seq = 1u64;
    let mut entries = 0u64;
    let mut first_bad = None;
    while let Some(row) = rows.next()? {
        let sequence = row.get::<_, i64>(0)? as u64;
        let body: String = row.get(1)?;
        let hash: String = row.get(2)?;
        let prev: String = row.get(3)?;
        entries += 1;
        if first_bad.is_some() {
            continue;
        }
        let problem = if sequence != expected_seq {
            Some(format!(
                "expected sequence {expected_seq}, found {sequence}"
            ))
        } else if prev != expected_prev {
            Some("prevHash does not match the previous entry's hash".to_owned())
        } else {
            match serde_json::from_str::<Value>(&body) {
                Err(e) => Some(format!("unreadable entry: {e}")),
                Ok(content) => {
                    let seq_in_body = content.get("sequence").and_then(Value::as_u64);
                    if seq_in_body != Some(sequence) {
                        Some("the entry's sequence was changed".to_owned())
                    } else if chain_hash(&prev, &content) != hash {
                        Some("hash does not match the entry's content".to_owned())
                    } else {
                        None
                    }
                }
            }
        };
        if let Some(problem) = problem {
            first_bad = Some((sequence, problem));
        }
        expected_prev = hash;
        expected_seq = sequence + 1;
    }
    Ok(ChainCheck {
        valid: first_bad.is_none(),
        entries,
        first_bad,
    })
}

/// Verifies the audit chain of the database file at `path` (the `verify-audit`
/// subcommand), opening it read-only.
pub fn verify_file(path: &std::path::Path) -> Result<ChainCheck, StoreError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    verify(&conn)
}
