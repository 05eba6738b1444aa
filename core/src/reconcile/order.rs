//! The total order in which operations on one entity take effect.
//!
//! Replicas receive operations in different orders; to end equal they must agree on
//! one order. [`OpKey`] is that order. It extends causality (an operation always sorts
//! after every operation it saw, whatever the device clocks said), and among concurrent
//! operations it follows the timestamps, with deterministic tie-breaks:
//!
//! 1. **effective timestamp**: the operation's own `timestamp`, raised to the greatest
//!    effective timestamp of any operation it causally follows. This is a hybrid logical
//!    clock computed from the operations themselves: a device whose clock lags cannot
//!    make its causally later edit lose to what it overwrote.
//! 2. **causal depth** (the sum of the vector clock): breaks equal timestamps in favour
//!    of the operation that saw more, and keeps the order causal on exact ties.
//! 3. greater `clientId`, then greater `operationId` (PROTOCOL.md §5's tie-break).
//!
//! Any two distinct operations compare unequal (their ids differ), so every replica that
//! knows the same operations sorts them the same way.

use serde::{Deserialize, Serialize};

use crate::protocol::Timestamp;

/// Where an operation sorts among the operations of its entity (ascending = earlier).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OpKey {
    /// The operation's timestamp raised to those of the operations it follows.
    pub effective_time: Timestamp,
    /// Sum of the operation's vector clock.
    pub depth: u64,
    /// The operation's client id.
    pub client_id: String,
    /// The operation's id.
    pub operation_id: String,
}
