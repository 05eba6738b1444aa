//! Presence (PROTOCOL.md §3, §6 "Presence"): the client's `presence_update` and the
//! server's `presence` announcement.
//!
//! Presence is `CLASS_A`: live only, never stored or replayed. A user's first connection
//! announces `online`, the last one closing announces `offline`; announcements go to the
//! users sharing a room with that user.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{JsonObject, Timestamp};

/// A user's presence status; lowercase on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceStatus {
    /// Connected and active.
    Online,
    /// Connected but idle.
    Away,
    /// No connection left (or the user said so).
    Offline,
}

impl PresenceStatus {
    /// The status as written on the wire, e.g. `"away"`.
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceStatus::Online => "online",
            PresenceStatus::Away => "away",
            PresenceStatus::Offline => "offline",
        }
    }
}

impl fmt::Display for PresenceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `data` of the client's `presence_update` frame (no answer is sent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PresenceUpdate {
    /// The status to announce.
    pub status: PresenceStatus,
    /// Free-form extra data passed on to observers (e.g. a status text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<JsonObject>,
}

/// `data` of the server's `presence` frame: one user's current presence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PresenceInfo {
    /// The user whose presence this is.
    pub user_id: String,
    /// The user's tenant (always the observer's).
    pub tenant_id: String,
    /// The current status.
    pub status: PresenceStatus,
    /// When the user was last seen active.
    pub last_active: Timestamp,
    /// The metadata of the user's last `presence_update`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<JsonObject>,
}
