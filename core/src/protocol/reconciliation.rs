//! Reconciliation on the wire: operations, conflicts, requests, responses, snapshots
//! (PROTOCOL.md §5 and §6).
//!
//! The engine that interprets these lives in [`crate::reconcile`]; this file only says
//! what they look like as JSON.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{DecodeError, JsonObject, Timestamp, check_id};
use crate::clock::VectorClock;

/// What an operation does to its entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OperationType {
    /// Sets the whole value (the payload); also re-creates a deleted entity.
    Create,
    /// Applies the payload as a JSON merge patch (RFC 7386): fields set, `null` removes.
    Update,
    /// Deletes the entity, leaving a tombstone; the payload is ignored.
    Delete,
}

/// How concurrent operations on one entity are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ResolutionStrategy {
    /// The later operation wins whole; the losing concurrent one is discarded, fields too.
    LastWriteWins,
    /// Per top-level field: fields changed on one side are kept, fields changed on both
    /// sides go to the later operation.
    FieldLevelMerge,
    /// A merge function registered for the entity type decides.
    CustomMerge,
    /// No winner: the conflict is returned unresolved and the value is kept until an
    /// operation whose clock dominates both sides arrives.
    Manual,
}

/// One client edit of one entity. `operationId` is its idempotency key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Client-made id (UUIDv7 from the SDK); resending it never applies it twice.
    pub operation_id: String,
    /// The replica that made the edit (its entry in `vector_clock` was incremented).
    pub client_id: String,
    /// The tenant; must be the caller's.
    pub tenant_id: String,
    /// The kind of entity, e.g. `document`; selects the per-type strategy.
    pub entity_type: String,
    /// The entity's id, unique within tenant and type.
    pub entity_id: String,
    /// Create, update (merge patch) or delete.
    pub operation_type: OperationType,
    /// The value (create), the merge patch (update) or ignored (delete).
    #[serde(default)]
    pub payload: Value,
    /// When the edit was made, by the server-corrected clock of the client.
    pub timestamp: Timestamp,
    /// What the edit saw: the entity's clock with the client's own entry incremented.
    #[serde(default)]
    pub vector_clock: VectorClock,
    /// Free-form extra data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<JsonObject>,
}

/// The largest vector-clock counter an operation may carry: 2^53, the largest integer
/// every JSON implementation reads exactly (JavaScript's `Number.MAX_SAFE_INTEGER` + 1).
/// It also keeps clock depths (sums of counters) far from `u64` overflow.
pub const MAX_CLOCK_COUNTER: u64 = 1 << 53;

impl Operation {
    /// Checks what serde cannot: ids are non-blank, at most [`super::MAX_ID_BYTES`]
    /// long and free of control characters, the author counts itself in the clock, counters are
    /// at most [`MAX_CLOCK_COUNTER`] and a create's value is an object.
    ///
    /// The error names the field (`operationId`, `entityId`, …).
    pub fn validate(&self) -> Result<(), DecodeError> {
        for (field, value) in [
            ("operationId", &self.operation_id),
            ("clientId", &self.client_id),
            ("tenantId", &self.tenant_id),
            ("entityType", &self.entity_type),
            ("entityId", &self.entity_id),
        ] {
            if value.trim().is_empty() {
                return Err(DecodeError::new(field, "must not be empty"));
            }
            check_id(field, value)?;
        }
        if self.vector_clock.get(&self.client_id) == 0 {
            return Err(DecodeError::new(
                "vectorClock",
                format!(
                    "must count the operation itself: the entry of clientId {:?} must be at least 1",
                    self.client_id
                ),
            ));
        }
        if let Some((replica, counter)) = self
            .vector_clock
            .iter()
            .find(|(_, counter)| *counter > MAX_CLOCK_COUNTER)
        {
            return Err(DecodeError::new(
                format!("vectorClock.{replica}"),
                format!(
                    "{counter} is above the largest counter allowed ({MAX_CLOCK_COUNTER}, 2^53)"
                ),
            ));
        }
        match self.operation_type {
            OperationType::Create if !self.payload.is_object() => Err(DecodeError::new(
                "payload",
                "a CREATE payload must be a JSON object (the whole value)",
            )),
            OperationType::Update if !self.payload.is_object() => Err(DecodeError::new(
                "payload",
                "an UPDATE payload must be a JSON object (a merge patch)",
            )),
            _ => Ok(()),
        }
    }
}

/// The outcome chosen for a conflict (absent while a MANUAL conflict is open).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConflictResolution {
    /// The strategy that decided.
    pub strategy: ResolutionStrategy,
    /// When it was decided.
    pub resolved_at: Timestamp,
    /// The user who decided (manual resolutions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_by: Option<String>,
    /// The entity's value after the resolution (`null` for a tombstone).
    pub result: Value,
    /// Free-form extra data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<JsonObject>,
}

/// Two concurrent operations on one entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Conflict {
    /// Deterministic id derived from the two operation ids.
    pub conflict_id: String,
    /// The entity's type.
    pub entity_type: String,
    /// The entity's id.
    pub entity_id: String,
    /// The incoming operation, then the applied operation it is concurrent with.
    pub operations: Vec<Operation>,
    /// When the conflict was detected.
    pub detected_at: Timestamp,
    /// How it was resolved; `None` for an open MANUAL conflict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<ConflictResolution>,
}

/// `POST /api/reconciliation/reconcile` body: a batch of offline edits, and/or a pull.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconciliationRequest {
    /// Client-made id of this request.
    pub request_id: String,
    /// The SDK installation that sends it.
    pub client_id: String,
    /// The tenant; must be the caller's.
    pub tenant_id: String,
    /// The tenant entity-change counter the client has seen; deltas are what changed after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_known_version: Option<String>,
    /// The operations, applied in this order; empty for a pure pull. Shared: the
    /// server's engine keeps them without a copy.
    #[serde(default)]
    pub operations: Vec<Arc<Operation>>,
    /// When the client sent it.
    pub requested_at: Timestamp,
    /// Overrides the per-type and default strategies for this request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<ResolutionStrategy>,
}

impl ReconciliationRequest {
    /// Checks what serde cannot: `requestId` and `clientId` at most
    /// [`super::MAX_ID_BYTES`] long and free of control characters, and every operation ([`Operation::validate`]); an
    /// operation's error is named within the request (`operations[2].entityId`).
    pub fn validate(&self) -> Result<(), DecodeError> {
        check_id("requestId", &self.request_id)?;
        check_id("clientId", &self.client_id)?;
        for (i, op) in self.operations.iter().enumerate() {
            op.validate()
                .map_err(|e| DecodeError::new(format!("operations[{i}].{}", e.path), e.message))?;
        }
        Ok(())
    }
}

/// Answer to a [`ReconciliationRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconciliationResponse {
    /// The request's id.
    pub request_id: String,
    /// Conflicts detected while applying the request (resolved, or open for MANUAL).
    #[serde(default)]
    pub conflicts: Vec<Conflict>,
    /// Every operation the server settled: applied, discarded by a strategy, or duplicate.
    #[serde(default)]
    pub resolved_operations: Vec<Arc<Operation>>,
    /// The tenant's entity-change counter after the request.
    pub current_version: String,
    /// Snapshots of every entity the request touched or that changed after
    /// `lastKnownVersion`.
    #[serde(default)]
    pub delta_updates: Vec<StateSnapshot>,
    /// When the server finished.
    pub completed_at: Timestamp,
}

/// The server's state of one entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateSnapshot {
    /// Id of this snapshot.
    pub snapshot_id: String,
    /// The tenant.
    pub tenant_id: String,
    /// The entity's type.
    pub entity_type: String,
    /// The entity's id.
    pub entity_id: String,
    /// The tenant counter's value at the entity's last change.
    pub version: String,
    /// The entity's merged clock.
    #[serde(default)]
    pub vector_clock: VectorClock,
    /// The value; `null` for a tombstone.
    pub data: Value,
    /// True when the entity is deleted.
    #[serde(default)]
    pub deleted: bool,
    /// When the snapshot was taken.
    pub created_at: Timestamp,
    /// Lowercase hex SHA-256 of the RFC 8785 canonical form of `data`.
    pub checksum: String,
}

impl StateSnapshot {
    /// True when `checksum` matches `data`.
    pub fn checksum_is_valid(&self) -> bool {
        checksum(&self.data) == self.checksum
    }
}

/// Lowercase hex SHA-256 of the RFC 8785 (JCS) canonical form of `data`.
pub fn checksum(data: &Value) -> String {
    use sha2::{Digest, Sha256};
    // A `serde_json::Value` always canonicalises (it holds no non-finite numbers);
    // should that ever change, hashing the plain serialisation keeps this total.
    let bytes = serde_jcs::to_vec(data)
        .or_else(|_| serde_json::to_vec(data))
        .unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

/// Parses a version string (`"42"`) as the tenant counter.
pub fn parse_version(field: &str, version: &str) -> Result<u64, DecodeError> {
    version.parse::<u64>().map_err(|_| {
        DecodeError::new(
            field,
            format!("a version is a non-negative integer as a string, got {version:?}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::decode;
    use serde_json::json;

    #[test]
    fn checksum_is_over_the_canonical_form() {
        // Key order and whitespace do not change the checksum.
        let a = json!({"b": 1, "a": [1, 2, {"y": null, "x": "é"}]});
        let b: Value =
            serde_json::from_str(r#"{ "a" : [1,2,{"x":"é","y":null}], "b":1 }"#).unwrap();
        assert_eq!(checksum(&a), checksum(&b));
        // Known answer: sha256 of `{"a":1}`.
        assert_eq!(
            checksum(&json!({"a": 1})),
            "015abd7f5cc57a2dd94b7590f04ad8084273905ee33ec5cebeae62276a97f862"
        );
    }

    #[test]
    fn an_operation_missing_its_entity_id_names_the_field() {
        let err = decode::<ReconciliationRequest>(
            r#"{"requestId":"r","clientId":"c","tenantId":"t","requestedAt":"2026-01-30T10:00:00Z",
                "operations":[{"operationId":"o","clientId":"c","tenantId":"t","entityType":"doc",
                "operationType":"UPDATE","payload":{},"timestamp":"2026-01-30T10:00:00Z","vectorClock":{"c":1}}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.path, "operations[0].entityId");
        assert!(err.message.contains("entityId"), "{err}");
    }

    #[test]
    fn a_negative_clock_counter_names_the_entry() {
        let err = decode::<Operation>(
            r#"{"operationId":"o","clientId":"c","tenantId":"t","entityType":"doc","entityId":"d",
                "operationType":"UPDATE","payload":{},"timestamp":"2026-01-30T10:00:00Z","vectorClock":{"c":-3}}"#,
        )
        .unwrap_err();
        assert_eq!(err.path, "vectorClock.c");
        assert!(
            err.message.contains("non-negative integer, got -3"),
            "{err}"
        );
    }

    #[test]
    fn validate_rejects_blank_ids_and_non_object_patches() {
        let mut op: Operation = decode(
            r#"{"operationId":"o","clientId":"c","tenantId":"t","entityType":"doc","entityId":" ",
                "operationType":"UPDATE","payload":{},"timestamp":"2026-01-30T10:00:00Z","vectorClock":{"c":1}}"#,
        )
        .unwrap();
        assert_eq!(op.validate().unwrap_err().path, "entityId");
        op.entity_id = "d".into();
        assert!(op.validate().is_ok());
        op.payload = json!([1]);
        assert_eq!(op.validate().unwrap_err().path, "payload");
        op.operation_type = OperationType::Delete;
        assert!(op.validate().is_ok());
        op.vector_clock = crate::VectorClock::from_entries([("other", 2)]);
        assert_eq!(op.validate().unwrap_err().path, "vectorClock");
        op.vector_clock =
            crate::VectorClock::from_entries([("c", 1), ("x", MAX_CLOCK_COUNTER + 1)]);
        assert_eq!(op.validate().unwrap_err().path, "vectorClock.x");
        op.vector_clock = crate::VectorClock::from_entries([("c", MAX_CLOCK_COUNTER)]);
        assert!(op.validate().is_ok());
    }
}
