//! The audit log and tenancy headers (PROTOCOL.md §1, §6 "Audit", "Super admin"):
//! `GET /api/admin/audit` and `GET /api/admin/audit/verify`.
//!
//! The server keeps one hash chain of [`AuditLogEntry`]s: each entry's `hash` covers its
//! content and the previous entry's hash (`prevHash`), so `verify` can tell whether the
//! log was altered. Cross-tenant reads by a super admin name the target tenant in
//! [`TENANT_HEADER`] and explain themselves in [`ADMIN_JUSTIFICATION_HEADER`].

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{JsonObject, Timestamp};

/// Header naming a tenant; any tenant other than the token's is a `TENANT_VIOLATION`,
/// except for a super admin with a justification.
pub const TENANT_HEADER: &str = "X-Tenant-ID";
/// Header a super admin must set (non-blank) to act in another tenant.
pub const ADMIN_JUSTIFICATION_HEADER: &str = "X-Admin-Justification";

/// Who performed an audited action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ActorType {
    /// A user of the tenant.
    User,
    /// The server itself (e.g. a transaction processor).
    System,
    /// A super admin, possibly acting in another tenant.
    SuperAdmin,
}

impl ActorType {
    /// The actor type as written on the wire, e.g. `"SUPER_ADMIN"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ActorType::User => "USER",
            ActorType::System => "SYSTEM",
            ActorType::SuperAdmin => "SUPER_ADMIN",
        }
    }
}

impl fmt::Display for ActorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether an audited action was carried out or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuditResult {
    /// Carried out.
    Success,
    /// Refused or failed.
    Failure,
}

/// One record of the audit log, with its place in the hash chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditLogEntry {
    /// The record's id.
    pub audit_id: String,
    /// Its position in the server's chain; `before` pages by it.
    pub sequence: u64,
    /// When the action happened.
    pub timestamp: Timestamp,
    /// The actor's tenant.
    pub tenant_id: String,
    /// The tenant acted upon, when different from the actor's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_tenant_id: Option<String>,
    /// Kind of actor.
    pub actor_type: ActorType,
    /// The acting user (or system component).
    pub actor_id: String,
    /// What was done, e.g. `transaction.submit`, `security.tenant_violation`.
    pub action: String,
    /// The kind of thing acted upon, e.g. `transaction`.
    pub resource: String,
    /// The thing acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// Carried out or refused.
    pub result: AuditResult,
    /// The super admin's `X-Admin-Justification`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
    /// Free-form extra data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<JsonObject>,
    /// Lowercase hex SHA-256 of this entry chained to `prev_hash`.
    pub hash: String,
    /// The previous entry's `hash` (the chain's fixed genesis value for the first entry).
    pub prev_hash: String,
}

/// Answer to `GET /api/admin/audit?limit=&before=`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditPage {
    /// The entries, newest first.
    #[serde(default)]
    pub entries: Vec<AuditLogEntry>,
}

/// Answer to `GET /api/admin/audit/verify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditVerify {
    /// True when every entry's hash and chain link check out.
    pub valid: bool,
    /// How many entries were checked.
    pub entries: u64,
}
