//! `GET /health` (PROTOCOL.md §4, §6 "Health"): the server's overall and per-service
//! health. No token needed; `200` when healthy or degraded, `503` when unhealthy.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{JsonObject, Timestamp};

/// Health of the server or of one service; lowercase on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// Working normally.
    Healthy,
    /// Working with reduced capacity or guarantees.
    Degraded,
    /// Not working.
    Unhealthy,
}

impl HealthState {
    /// The state as written on the wire, e.g. `"degraded"`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Healthy => "healthy",
            HealthState::Degraded => "degraded",
            HealthState::Unhealthy => "unhealthy",
        }
    }

    /// The HTTP status `/health` answers with: 200, or 503 when unhealthy.
    pub fn http_status(self) -> u16 {
        match self {
            HealthState::Healthy | HealthState::Degraded => 200,
            HealthState::Unhealthy => 503,
        }
    }
}

impl fmt::Display for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Health of one service: `{status, message?, ...metrics}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceHealth {
    /// The service's state.
    pub status: HealthState,
    /// Why it is not healthy, or other human text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Service-specific figures, e.g. `activeConnections`, side by side with `status`.
    #[serde(flatten)]
    pub metrics: JsonObject,
}

impl ServiceHealth {
    /// A service in `status`, with no message or metrics.
    pub fn new(status: HealthState) -> Self {
        Self {
            status,
            message: None,
            metrics: JsonObject::new(),
        }
    }
}

/// The services `/health` reports on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthServices {
    /// WebSocket connections and fan-out.
    pub websocket: ServiceHealth,
    /// The event log, polling and consumer groups.
    pub eventbus: ServiceHealth,
    /// The reconciliation engine.
    pub reconciliation: ServiceHealth,
    /// Persistent storage.
    pub storage: ServiceHealth,
}

/// Answer to `GET /health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// The overall state (the worst of the services').
    pub status: HealthState,
    /// Each service's health.
    pub services: HealthServices,
    /// When the check ran.
    pub timestamp: Timestamp,
    /// The server's version.
    pub version: String,
}
