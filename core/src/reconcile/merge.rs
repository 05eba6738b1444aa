//! CUSTOM_MERGE: merge functions that an embedder registers per entity type, and the
//! built-in [`CounterMerge`].
//!
//! A merge function is a step: given the entity as it stands after every earlier
//! operation (in the engine's total order, see [`super::order`]) and the next operation,
//! it returns the entity after that operation. The engine replays steps in the same
//! order on every replica, so any deterministic function converges; a commutative one
//! (like a counter) also gives the same result whichever concurrent edit came first.

use std::fmt::Debug;

use serde_json::{Map, Value};

use super::EntityValue;
use crate::protocol::{Operation, OperationType};

/// Why a merge function refused an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("merge refused operation {operation_id}: {reason}")]
pub struct MergeError {
    /// The refused operation.
    pub operation_id: String,
    /// Why, naming the field when one is at fault.
    pub reason: String,
}

/// What a merge function sees for one step.
#[derive(Debug, Clone, Copy)]
pub struct MergeInput<'a> {
    /// The entity after every earlier operation.
    pub current: &'a EntityValue,
    /// The operation to apply.
    pub operation: &'a Operation,
    /// True when the operation is concurrent with an earlier applied one (a conflict).
    pub concurrent: bool,
}

/// A merge function for one entity type (the CUSTOM_MERGE strategy).
///
/// It must be deterministic: the same input gives the same output on every replica.
pub trait CustomMerge: Send + Sync + Debug {
    /// Returns the entity after `input.operation`.
    fn apply(&self, input: MergeInput<'_>) -> Result<EntityValue, MergeError>;
}

/// A counter entity: numeric fields of an UPDATE are deltas added to the current value.
///
/// `CREATE {"likes": 3}` sets the value; `UPDATE {"likes": 2}` adds 2 (and `-1`
/// subtracts 1), so concurrent increments all count, in any order. Non-numeric fields of
/// an UPDATE are a merge patch as usual (`null` removes the field). A numeric delta on a
/// field that holds something other than a number is refused.
#[derive(Debug, Clone, Copy, Default)]
pub struct CounterMerge;

impl CustomMerge for CounterMerge {
    fn apply(&self, input: MergeInput<'_>) -> Result<EntityValue, MergeError> {
        let op = input.operation;
        match op.operation_type {
            OperationType::Create | OperationType::Delete => Ok(input.current.apply_plain(op)),
            OperationType::Update => {
                let Value::Object(patch) = &op.payload else {
                    return Err(MergeError {
                        operation_id: op.operation_id.clone(),
                        reason: "payload: an UPDATE payload must be an object".into(),
                    });
                };
                let mut data = match &input.current.data {
                    Value::Object(map) if !input.current.deleted => map.clone(),
                    _ => Map::new(),
                };
                for (field, delta) in patch {
                    match delta {
                        Value::Number(delta) => {
                            let sum =
                                add_numbers(data.get(field), delta).ok_or_else(|| MergeError {
                                    operation_id: op.operation_id.clone(),
                                    reason: format!(
                                        "payload.{field}: a delta needs a numeric field, found {}",
                                        data.get(field)
                                            .map_or("nothing", crate::protocol::json_kind)
                                    ),
                                })?;
                            data.insert(field.clone(), sum);
                        }
                        Value::Null => {
                            data.remove(field);
                        }
                        other => {
                            let slot = data.entry(field.clone()).or_insert(Value::Null);
                            json_patch::merge(slot, other);
                        }
                    }
                }
                Ok(EntityValue::live(Value::Object(data)))
            }
        }
    }
}

/// `current + delta`, exact for integers, `None` when `current` is not a number.
fn add_numbers(current: Option<&Value>, delta: &serde_json::Number) -> Option<Value> {
    let current = match current {
        None | Some(Value::Null) => return Some(Value::Number(delta.clone())),
        Some(Value::Number(n)) => n,
        Some(_) => return None,
    };
    if let Some(sum) = current
        .as_i64()
        .zip(delta.as_i64())
        .and_then(|(a, b)| a.checked_add(b))
    {
        return Some(Value::from(sum));
    }
    let sum = current.as_f64()? + delta.as_f64()?;
    serde_json::Number::from_f64(sum).map(Value::Number)
}
