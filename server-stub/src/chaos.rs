//! The chaos layer (issue 7): a development-only control that makes realtime degrade on
//! purpose, so that app developers (and the SDK's own tests) can see how an app copes.
//!
//! It exists only when the server starts with `CHAOS=1` (`--chaos`), and never in
//! production mode. It is driven over HTTP (`/api/admin/chaos`, role `admin`) or from
//! Rust ([`ChaosControl`], from `RunningServer::chaos()`). The switches:
//!
//! - **refuse WebSocket upgrades** (503, as a proxy that blocks WebSockets): clients
//!   fall back to polling;
//! - **latency**: every HTTP request and every WebSocket frame received is handled
//!   `latency_ms` (plus up to `jitter_ms`) late;
//! - **HTTP failures**: a seeded fraction of `/api/*` requests answers 500, 503 or 429
//!   before doing anything;
//! - **dropped acknowledgements**: a seeded fraction of accepted messages (WebSocket
//!   `message`, `POST /api/messages`), published events and submitted transactions is
//!   stored but not acknowledged (no `message_ack`; HTTP answers 500 instead of
//!   201/202): clients must resend, and the server deduplicates;
//! - **reconcile timeouts**: reconciliation is applied, but the answer is the timeout
//!   error, after `RECONCILIATION_PROCESSING_TIMEOUT`;
//!
//! and two actions: **drop WebSocket connections** (all of a tenant's, one user's, or
//! every one), abruptly, without a close frame; **expire tokens**: every token issued
//! before the current second counts as expired from now on (requests are refused with
//! `AUTH_FAILED`, open connections close with 1008 `AUTH_EXPIRED`), so clients must
//! fetch new ones.
//!
//! Random decisions use a seeded generator per switch, reset whenever the switch is
//! set: the same requests in the same order meet the same failures.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use webwaka_realtime::protocol::ErrorCode;

use crate::cluster::{ChaosNotice, Node};
use crate::error::ApiError;
use crate::hub::{Hub, KillReason};

/// Longest latency or jitter accepted, in ms.
pub const MAX_LATENCY_MS: u64 = 60_000;

/// The switches of the chaos layer (not the actions). `Default`: everything off.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChaosSettings {
    /// Answer WebSocket upgrades with 503 (clients fall back to polling).
    #[serde(default, rename = "refuseWebSocket")]
    pub refuse_websocket: bool,
    /// Added before every HTTP request and every WebSocket frame received, in ms.
    #[serde(default)]
    pub latency_ms: u64,
    /// Up to this much more, uniformly at random, in ms.
    #[serde(default)]
    pub jitter_ms: u64,
    /// Fail a fraction of `/api/*` requests before they are handled.
    #[serde(default)]
    pub http_failures: Option<HttpFailures>,
    /// Store but do not acknowledge a fraction of messages, events and transactions.
    #[serde(default)]
    pub drop_acks: Option<DropAcks>,
    /// Apply reconciliation requests, then answer with the timeout error.
    #[serde(default)]
    pub reconcile_timeout: bool,
}

/// Which `/api/*` requests fail, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpFailures {
    /// Fraction of requests that fail, 0 to 1.
    pub fraction: f64,
    /// The answer: 500 (`INTERNAL_ERROR`), 503 (`SERVER_FULL`) or 429 (`RATE_LIMIT`).
    pub status: u16,
    /// Seed of the decisions.
    #[serde(default)]
    pub seed: u64,
}

/// Which acknowledgements are dropped after the commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DropAcks {
    /// Fraction of acknowledgements dropped, 0 to 1.
    pub fraction: f64,
    /// Seed of the decisions.
    #[serde(default)]
    pub seed: u64,
}

/// The chaos layer's state as `GET /api/admin/chaos` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChaosState {
    /// The switches.
    #[serde(flatten)]
    pub settings: ChaosSettings,
    /// Tokens issued before this time (seconds since the epoch) count as expired.
    #[serde(default)]
    pub tokens_expired_before: Option<i64>,
}

/// Which WebSocket connections to drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// Every connection of the server.
    Everyone,
    /// Every connection of a tenant.
    Tenant(&'a str),
    /// Every connection of one user of a tenant.
    User {
        /// The tenant.
        tenant: &'a str,
        /// The user.
        user: &'a str,
    },
}

/// A setting the chaos layer refuses, naming the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid {field}: {message}")]
pub struct ChaosError {
    /// The field, e.g. `httpFailures.status`.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

impl ChaosSettings {
    /// Checks ranges: latency and jitter at most [`MAX_LATENCY_MS`], fractions in 0..=1,
    /// a failure status of 500, 503 or 429.
    pub fn validate(&self) -> Result<(), ChaosError> {
        let error = |field, message: &str| {
            Err(ChaosError {
                field,
                message: message.to_owned(),
            })
        };
        if self.latency_ms > MAX_LATENCY_MS {
            return error("latencyMs", "at most 60000");
        }
        if self.jitter_ms > MAX_LATENCY_MS {
            return error("jitterMs", "at most 60000");
        }
        if let Some(f) = &self.http_failures {
            if !(0.0..=1.0).contains(&f.fraction) {
                return error("httpFailures.fraction", "must be from 0 to 1");
            }
            if !matches!(f.status, 500 | 503 | 429) {
                return error("httpFailures.status", "must be 500, 503 or 429");
            }
        }
        if let Some(d) = &self.drop_acks
            && !(0.0..=1.0).contains(&d.fraction)
        {
            return error("dropAcks.fraction", "must be from 0 to 1");
        }
        Ok(())
    }
}

/// The live state, shared by the hooks in the request and connection paths.
pub(crate) struct Chaos {
    settings: RwLock<ChaosSettings>,
    /// True when any switch is on (the hooks' fast path).
    active: AtomicBool,
    http_rng: Mutex<StdRng>,
    ack_rng: Mutex<StdRng>,
    /// Seconds since the epoch; tokens issued before are expired (0: none).
    tokens_before: AtomicI64,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Chaos {
    /// Everything off.
    pub(crate) fn new() -> Self {
        Self {
            settings: RwLock::new(ChaosSettings::default()),
            active: AtomicBool::new(false),
            http_rng: Mutex::new(StdRng::seed_from_u64(0)),
            ack_rng: Mutex::new(StdRng::seed_from_u64(0)),
            tokens_before: AtomicI64::new(0),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, ChaosSettings> {
        self.settings.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The current settings and token cutoff.
    pub(crate) fn state(&self) -> ChaosState {
        let cutoff = self.tokens_before.load(Ordering::Acquire);
        ChaosState {
            settings: self.read().clone(),
            tokens_expired_before: (cutoff > 0).then_some(cutoff),
        }
    }

    /// Replaces the switches (validated); the random decisions restart from the seeds.
    pub(crate) fn set(&self, settings: ChaosSettings) -> Result<(), ChaosError> {
        settings.validate()?;
        let mut current = self.settings.write().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = &settings.http_failures {
            *lock(&self.http_rng) = StdRng::seed_from_u64(f.seed);
        }
        if let Some(d) = &settings.drop_acks {
            *lock(&self.ack_rng) = StdRng::seed_from_u64(d.seed);
        }
        let active = settings != ChaosSettings::default();
        *current = settings;
        self.active.store(active, Ordering::Release);
        tracing::warn!(settings = ?*current, "chaos settings changed");
        Ok(())
    }

    /// Everything off, and no token expired early any more.
    pub(crate) fn reset(&self) {
        let _ = self.set(ChaosSettings::default());
        self.tokens_before.store(0, Ordering::Release);
    }

    fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// True when WebSocket upgrades are refused.
    pub(crate) fn refuses_websocket(&self) -> bool {
        self.active() && self.read().refuse_websocket
    }

    /// The delay to add now (latency plus a random part of the jitter), if any.
    pub(crate) fn delay(&self) -> Option<Duration> {
        if !self.active() {
            return None;
        }
        let (latency, jitter) = {
            let s = self.read();
            (s.latency_ms, s.jitter_ms)
        };
        if latency == 0 && jitter == 0 {
            return None;
        }
        let extra = if jitter > 0 {
            rand::rng().random_range(0..=jitter)
        } else {
            0
        };
        Some(Duration::from_millis(latency + extra))
    }

    /// Waits the added latency, if any.
    pub(crate) async fn wait(&self) {
        if let Some(delay) = self.delay() {
            tokio::time::sleep(delay).await;
        }
    }

    /// The failure this HTTP request meets, if it is one of the unlucky fraction.
    pub(crate) fn http_failure(&self) -> Option<ApiError> {
        if !self.active() {
            return None;
        }
        let failures = self.read().http_failures.clone()?;
        if !lock(&self.http_rng).random_bool(failures.fraction) {
            return None;
        }
        let error = match failures.status {
            429 => ApiError::rate_limited(1000),
            503 => {
                let mut error = ApiError::new(ErrorCode::ServerFull, "chaos: service unavailable");
                error.retry_after_secs = Some(1);
                error
            }
            _ => ApiError::new(ErrorCode::InternalError, "chaos: internal error"),
        };
        Some(error.with_detail("chaos", "HTTP_FAILURE"))
    }

    /// True when this acknowledgement is to be dropped (the fraction, seeded).
    pub(crate) fn drops_ack(&self) -> bool {
        if !self.active() {
            return false;
        }
        let Some(drop) = self.read().drop_acks.clone() else {
            return false;
        };
        lock(&self.ack_rng).random_bool(drop.fraction)
    }

    /// True when reconciliation answers with the timeout error.
    pub(crate) fn reconcile_times_out(&self) -> bool {
        self.active() && self.read().reconcile_timeout
    }

    /// True when a token issued at `iat` (seconds; `None`: unknown, counts as old) is
    /// expired by [`Chaos::expire_tokens`].
    pub(crate) fn token_expired(&self, iat: Option<i64>) -> bool {
        let cutoff = self.tokens_before.load(Ordering::Acquire);
        cutoff > 0 && iat.is_none_or(|iat| iat < cutoff)
    }

    /// From now on, tokens issued before the current second count as expired. Returns
    /// the cutoff (seconds since the epoch).
    pub(crate) fn expire_tokens(&self) -> i64 {
        let cutoff = chrono::Utc::now().timestamp();
        self.expire_tokens_before(cutoff);
        cutoff
    }

    /// From now on, tokens issued before `cutoff` (seconds) count as expired.
    pub(crate) fn expire_tokens_before(&self, cutoff: i64) {
        self.tokens_before.fetch_max(cutoff, Ordering::AcqRel);
        tracing::warn!(cutoff, "chaos: tokens issued before the cutoff are expired");
    }
}

/// True when the chaos layer (if enabled) drops this acknowledgement.
pub(crate) fn drops_ack(chaos: Option<&Arc<Chaos>>) -> bool {
    chaos.is_some_and(|c| c.drops_ack())
}

/// The answer a chaos-dropped HTTP acknowledgement gets instead of its 201/202: the
/// work is stored, the client cannot know, and must resend.
pub(crate) fn ack_dropped() -> ApiError {
    ApiError::new(
        ErrorCode::InternalError,
        "chaos: the acknowledgement was dropped (the request may have been applied: resend it)",
    )
    .with_detail("chaos", "ACK_DROPPED")
}

/// The Rust handle on a server's chaos layer (`RunningServer::chaos()`), for tests that
/// drive it without HTTP. Cheap to clone. Nothing here is audited (the HTTP endpoint
/// is).
#[derive(Clone)]
pub struct ChaosControl {
    hub: Arc<Hub>,
    chaos: Arc<Chaos>,
    node: Arc<Node>,
}

impl std::fmt::Debug for ChaosControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChaosControl")
            .field("state", &self.chaos.state())
            .finish()
    }
}

impl ChaosControl {
    /// The handle on `chaos` (when the layer is enabled), the connections of `hub`, and
    /// the other instances (every change applies to all of them).
    pub(crate) fn of(chaos: Option<&Arc<Chaos>>, hub: &Arc<Hub>, node: &Arc<Node>) -> Option<Self> {
        Some(Self {
            chaos: Arc::clone(chaos?),
            hub: Arc::clone(hub),
            node: Arc::clone(node),
        })
    }

    /// The current state.
    pub fn state(&self) -> ChaosState {
        self.chaos.state()
    }

    /// Replaces every switch at once (on every instance).
    pub fn set(&self, settings: ChaosSettings) -> Result<(), ChaosError> {
        self.chaos.set(settings.clone())?;
        self.node.chaos(ChaosNotice::Set { settings });
        Ok(())
    }

    /// Everything off, and tokens no longer expire early (on every instance).
    pub fn reset(&self) {
        self.chaos.reset();
        self.node.chaos(ChaosNotice::Reset);
    }

    /// Changes some switches, keeping the others.
    pub fn update(&self, change: impl FnOnce(&mut ChaosSettings)) -> Result<(), ChaosError> {
        let mut settings = self.chaos.state().settings;
        change(&mut settings);
        self.set(settings)
    }

    /// Refuses (or accepts again) WebSocket upgrades.
    pub fn refuse_websocket(&self, on: bool) {
        let _ = self.update(|s| s.refuse_websocket = on);
    }

    /// Adds `latency` (plus up to `jitter`) before every HTTP request and every
    /// WebSocket frame received; both at most 60 s.
    pub fn set_latency(&self, latency: Duration, jitter: Duration) -> Result<(), ChaosError> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.update(|s| {
            s.latency_ms = ms(latency);
            s.jitter_ms = ms(jitter);
        })
    }

    /// Fails `fraction` of `/api/*` requests with `status` (500, 503 or 429), decided
    /// by a generator seeded with `seed`; `None` stops it.
    pub fn fail_http(&self, failures: Option<HttpFailures>) -> Result<(), ChaosError> {
        self.update(|s| s.http_failures = failures)
    }

    /// Drops `fraction` of the acknowledgements after the commit (seeded); `None` stops
    /// it.
    pub fn drop_acks(&self, drop: Option<DropAcks>) -> Result<(), ChaosError> {
        self.update(|s| s.drop_acks = drop)
    }

    /// Makes reconciliation answer with the timeout error (after applying it).
    pub fn reconcile_timeout(&self, on: bool) {
        let _ = self.update(|s| s.reconcile_timeout = on);
    }

    /// Drops the WebSocket connections of `target` abruptly (no close frame), on every
    /// instance. Returns how many were dropped on this one.
    pub fn drop_connections(&self, target: Target<'_>) -> usize {
        let (tenant, user) = match target {
            Target::Everyone => (None, None),
            Target::Tenant(tenant) => (Some(tenant.to_owned()), None),
            Target::User { tenant, user } => (Some(tenant.to_owned()), Some(user.to_owned())),
        };
        self.node.chaos(ChaosNotice::Drop { tenant, user });
        self.hub.kill(target, KillReason::Dropped, None)
    }

    /// Expires every token issued before the current second: later requests with them
    /// are refused, open connections using them close with 1008 `AUTH_EXPIRED`.
    /// Returns how many connections were closed.
    pub fn expire_tokens(&self) -> usize {
        self.expire_tokens_at().0
    }

    /// [`ChaosControl::expire_tokens`], with the cutoff (seconds since the epoch).
    pub fn expire_tokens_at(&self) -> (usize, i64) {
        let cutoff = self.chaos.expire_tokens();
        self.node.chaos(ChaosNotice::Expire { cutoff });
        let closed = self
            .hub
            .kill(Target::Everyone, KillReason::AuthExpired, Some(cutoff));
        (closed, cutoff)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn decisions_are_seeded_and_fractions_hold() {
        let chaos = Chaos::new();
        let failures = |seed| ChaosSettings {
            http_failures: Some(HttpFailures {
                fraction: 0.3,
                status: 503,
                seed,
            }),
            ..ChaosSettings::default()
        };
        chaos.set(failures(7)).unwrap();
        let first: Vec<bool> = (0..200).map(|_| chaos.http_failure().is_some()).collect();
        chaos.set(failures(7)).unwrap();
        let again: Vec<bool> = (0..200).map(|_| chaos.http_failure().is_some()).collect();
        assert_eq!(first, again, "same seed, same decisions");
        let failed = first.iter().filter(|f| **f).count();
        assert!((30..=90).contains(&failed), "{failed} of 200 at 0.3");
        chaos.reset();
        assert!(chaos.http_failure().is_none());
        assert!(!chaos.drops_ack());
    }

    #[test]
    fn settings_are_checked() {
        let mut settings = ChaosSettings {
            latency_ms: 60_001,
            ..ChaosSettings::default()
        };
        assert_eq!(settings.validate().unwrap_err().field, "latencyMs");
        settings.latency_ms = 10;
        settings.http_failures = Some(HttpFailures {
            fraction: 0.5,
            status: 404,
            seed: 0,
        });
        assert_eq!(
            settings.validate().unwrap_err().field,
            "httpFailures.status"
        );
        settings.http_failures = None;
        settings.drop_acks = Some(DropAcks {
            fraction: 1.5,
            seed: 0,
        });
        assert_eq!(settings.validate().unwrap_err().field, "dropAcks.fraction");
        let chaos = Chaos::new();
        assert!(chaos.set(settings).is_err());
        assert_eq!(chaos.state().settings, ChaosSettings::default());
    }

    #[test]
    fn expired_tokens_are_those_issued_before_the_cutoff() {
        let chaos = Chaos::new();
        assert!(!chaos.token_expired(Some(1)));
        let cutoff = chaos.expire_tokens();
        assert!(chaos.token_expired(Some(cutoff - 1)));
        assert!(chaos.token_expired(None));
        assert!(!chaos.token_expired(Some(cutoff)));
        chaos.reset();
        assert!(!chaos.token_expired(Some(cutoff - 1)));
    }
}
