//! The audit log (INV-003): an append-only table in which every entry is chained to
//! the previous one by a hash, so that changing, removing or reordering an entry is
//! detectable.
//!
//! `hash = sha256_hex(prevHash ‖ JCS(entry without hash and prevHash))`, with the
//! genesis `prevHash` of 64 zeros. The tables also refuse UPDATE and DELETE (triggers on
//! both engines), but the chain is what proves integrity: [`ChainVerifier`] recomputes
//! it. What is here is the same on both engines; an engine finds the chain's head under
//! a lock (one writer thread, or a PostgreSQL lock held to the commit), [`seal`]s the
//! record onto it and stores the row.

use serde_json::Value;
use sha2::{Digest, Sha256};
use webwaka_realtime::protocol::{ActorType, AuditLogEntry, AuditResult, JsonObject};

use crate::error::StoreError;

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

/// Places `record` after the entry (`last_seq`, `prev_hash`) at the chain's head: the
/// entry, and its content as stored (JSON without `hash` and `prevHash`).
pub(crate) fn seal(
    record: AuditRecord,
    last_seq: u64,
    prev_hash: String,
) -> Result<(AuditLogEntry, String), StoreError> {
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
        prev_hash,
    };
    let content = content_of(&entry)?;
    entry.hash = chain_hash(&entry.prev_hash, &content);
    Ok((entry, content.to_string()))
}

/// An entry from its stored row.
pub(crate) fn entry_from_row(
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

/// Recomputes the chain one stored row at a time, in sequence order.
#[derive(Debug)]
pub(crate) struct ChainVerifier {
    expected_prev: String,
    expected_seq: u64,
    entries: u64,
    first_bad: Option<(u64, String)>,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self {
            expected_prev: GENESIS_HASH.to_owned(),
            expected_seq: 1,
            entries: 0,
            first_bad: None,
        }
    }
}

impl ChainVerifier {
    /// Checks the next row: its sequence, its link to the previous one, its hash.
    pub(crate) fn row(&mut self, sequence: u64, body: &str, hash: String, prev: &str) {
        self.entries += 1;
        if self.first_bad.is_some() {
            return;
        }
        let problem = if sequence != self.expected_seq {
            Some(format!(
                "expected sequence {}, found {sequence}",
                self.expected_seq
            ))
        } else if prev != self.expected_prev {
            Some("prevHash does not match the previous entry's hash".to_owned())
        } else {
            match serde_json::from_str::<Value>(body) {
                Err(e) => Some(format!("unreadable entry: {e}")),
                Ok(content) => {
                    let seq_in_body = content.get("sequence").and_then(Value::as_u64);
                    if seq_in_body != Some(sequence) {
                        Some("the entry's sequence was changed".to_owned())
                    } else if chain_hash(prev, &content) != hash {
                        Some("hash does not match the entry's content".to_owned())
                    } else {
                        None
                    }
                }
            }
        };
        if let Some(problem) = problem {
            self.first_bad = Some((sequence, problem));
        }
        self.expected_prev = hash;
        self.expected_seq = sequence + 1;
    }

    /// The verdict.
    pub(crate) fn finish(self) -> ChainCheck {
        ChainCheck {
            valid: self.first_bad.is_none(),
            entries: self.entries,
            first_bad: self.first_bad,
        }
    }
}
