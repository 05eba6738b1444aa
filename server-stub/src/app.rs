//! The server's wiring ([`App`]): configuration, keys, storage, the live directory, the
//! log's tail and feed, limits, the reconciliation engine, the transaction processor,
//! and the shutdown signal. Handlers get an `Arc<App>`; the domain modules they call
//! take only the pieces they use.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use webwaka_realtime::protocol::AuditResult;
use webwaka_realtime::reconcile::{CounterMerge, Reconciler};

use crate::audit::AuditRecord;
use crate::auth::{Keys, SecretError, SecretSource, resolve_secret};
use crate::cluster::Node;
use crate::config::{Config, ConfigError, RoomPolicy};
use crate::error::{ApiError, MAX_ID_LEN, StoreError};
use crate::feed::Feed;
use crate::hub::Hub;
use crate::log::Log;
use crate::metrics::Metrics;
use crate::ratelimit::Limits;
use crate::store::Storage;
use crate::tail::Tail;
use crate::transactions::{TransactionProcessor, Transactions};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No JWT secret.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The database could not be opened.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        error: std::io::Error,
    },
}

/// Everything the handlers share.
pub(crate) struct App {
    pub(crate) config: Config,
    pub(crate) keys: Keys,
    /// Tokens verified before (a lookup instead of a signature check).
    pub(crate) verified: crate::auth::VerifiedTokens,
    pub(crate) store: Arc<dyn Storage>,
    /// Reading and appending to the durable log.
    pub(crate) log: Log,
    pub(crate) hub: Arc<Hub>,
    /// The recent end of each tenant's log, for polls and resumes.
    pub(crate) tail: Arc<Tail>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) limits: Limits,
    pub(crate) policy: RoomPolicy,
    pub(crate) reconciler: Arc<Reconciler>,
    /// Class D: storage and the processor.
    pub(crate) transactions: Transactions,
    /// Cancelled when the server shuts down.
    pub(crate) shutdown: CancellationToken,
    /// WebSocket connection tasks (awaited on shutdown).
    pub(crate) ws_tasks: TaskTracker,
    /// Background tasks: transaction processing, maintenance.
    pub(crate) background: TaskTracker,
    /// WebSocket slots taken (reserved before the upgrade).
    pub(crate) slots: AtomicUsize,
    /// Connections that are not WebSockets: their count and the limits.
    pub(crate) connections: crate::listener::Connections,
    /// Where the JWT secret came from.
    pub(crate) secret_source: SecretSource,
    /// The chaos layer, when enabled (`CHAOS=1`).
    pub(crate) chaos: Option<Arc<crate::chaos::Chaos>>,
    /// This instance among the others sharing its database.
    pub(crate) node: Arc<Node>,
    /// This instance's name (unique per process start).
    pub(crate) instance: Arc<str>,
    /// What the dashboards see live (nothing captured while none is open).
    pub(crate) watch: Arc<crate::dashboard::Watch>,
    /// Failed authentications audited one by one, up to a burst (see
    /// [`App::audit_auth_failure`]).
    auth_audits: governor::DefaultDirectRateLimiter,
    /// Failed authentications not audited since the last one that was.
    auth_audits_skipped: AtomicU64,
}

/// Failed authentications audited one by one: a burst of this many, then one a second.
/// Anyone can fail to authenticate, as fast as the connection limits let them: each
/// record is a write every tenant's messages wait behind (and, on PostgreSQL, the audit
/// chain's lock), and the log is append-only. Past the burst the rest are counted (the
/// `auth_failures` metric has them all) and the next record says how many it stands for.
const AUTH_AUDIT_BURST: u32 = 50;

impl App {
    /// An error answered to a caller (of `tenant` when known; an HTTP answer does not
    /// say whose): counted in `/metrics` and, by code, for a watching dashboard. Every
    /// transport answers its errors through here.
    pub(crate) fn error_answered(
        &self,
        tenant: Option<&str>,
        code: webwaka_realtime::protocol::ErrorCode,
    ) {
        self.metrics.errors.inc();
        self.watch.error(tenant, code.as_str());
    }

    /// Opens the database and builds the state for `config`.
    pub(crate) async fn new(
        config: Config,
        processor: Option<Arc<dyn TransactionProcessor>>,
    ) -> Result<Self, StartError> {
        config.validate()?;
        let (secret, secret_source) = resolve_secret(&config)?;
        let keys = Keys::new(secret.as_bytes(), config.jwt_leeway_ms / 1000);
        let instance: Arc<str> = format!("{}-{}", hostname(), uuid::Uuid::new_v4().simple())
            .chars()
            .take(64)
            .collect::<String>()
            .into();
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(Arc::clone(&metrics)));
        let tail = Arc::new(Tail::new(config.event_bus_tail_bytes));
        let watch = Arc::new(crate::dashboard::Watch::new());
        let feed = Arc::new(Feed::new(
            Arc::clone(&hub),
            Arc::clone(&tail),
            Arc::clone(&metrics),
            config.database_url.is_none(),
            Arc::clone(&watch),
        ));
        // The engine hands the stored memberships to the feed before it answers.
        let chaos = config.chaos.then(|| Arc::new(crate::chaos::Chaos::new()));
        let (out, outbox) = tokio::sync::mpsc::unbounded_channel();
        let node = Arc::new(Node::new(
            Arc::clone(&instance),
            Arc::clone(&hub),
            chaos.clone(),
            config.database_url.is_some().then_some(out),
            Arc::clone(&watch),
        ));
        let store =
            crate::store::open(&config, Arc::clone(&feed), Arc::clone(&node), outbox).await?;
        let mut reconciler = Reconciler::new(config.reconciliation_default_strategy);
        for (entity_type, strategy) in config.type_strategies()? {
            reconciler = reconciler.with_strategy(entity_type, strategy);
        }
        for entity_type in config.counter_types() {
            reconciler = reconciler.with_merge(entity_type, Arc::new(CounterMerge));
        }
        let processor = processor.unwrap_or_else(|| {
            Arc::new(crate::transactions::DelayProcessor::new(
                std::time::Duration::from_millis(config.transaction_confirm_delay_ms),
                config.reject_types(),
            ))
        });
        let shutdown = CancellationToken::new();
        let background = TaskTracker::new();
        Ok(Self {
            limits: Limits::new(&config),
            policy: config.parsed_room_policy()?,
            verified: crate::auth::VerifiedTokens::new(config.jwt_leeway_ms / 1000),
            keys,
            log: Log {
                store: Arc::clone(&store),
                tail: Arc::clone(&tail),
                hub: Arc::clone(&hub),
                metrics: Arc::clone(&metrics),
                retention_ms: config.event_bus_retention_period_ms,
                watch: Arc::clone(&watch),
            },
            transactions: Transactions {
                store: Arc::clone(&store),
                processor,
                metrics: Arc::clone(&metrics),
                owner: Arc::clone(&instance),
                shutdown: shutdown.clone(),
                background: background.clone(),
            },
            store,
            hub,
            tail,
            metrics,
            reconciler: Arc::new(reconciler),
            shutdown,
            ws_tasks: TaskTracker::new(),
            background,
            slots: AtomicUsize::new(0),
            connections: crate::listener::Connections::new(&config),
            secret_source,
            chaos,
            node,
            instance,
            watch,
            config,
            auth_audits: governor::RateLimiter::direct(
                governor::Quota::per_second(std::num::NonZeroU32::MIN).allow_burst(
                    std::num::NonZeroU32::new(AUTH_AUDIT_BURST)
                        .unwrap_or(std::num::NonZeroU32::MIN),
                ),
            ),
            auth_audits_skipped: AtomicU64::new(0),
        })
    }

    /// Audits a failed authentication, or counts it when failures come faster than
    /// [`AUTH_AUDIT_BURST`] then one a second; a record written after some were
    /// counted says how many (`skippedBefore`).
    pub(crate) async fn audit_auth_failure(&self, record: AuditRecord) -> Result<(), ApiError> {
        if self.auth_audits.check().is_err() {
            self.auth_audits_skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let skipped = self.auth_audits_skipped.swap(0, Ordering::Relaxed);
        let record = if skipped > 0 {
            record.meta("skippedBefore", skipped)
        } else {
            record
        };
        self.audit(record).await
    }

    /// Appends an audit record on its own.
    pub(crate) async fn audit(&self, record: AuditRecord) -> Result<(), ApiError> {
        self.store.audit(record).await?;
        Ok(())
    }

    /// Records a refused cross-tenant attempt (audit + metric) and returns the
    /// `TENANT_VIOLATION` to answer with.
    pub(crate) async fn tenant_violation(
        &self,
        tenant: &str,
        user: &str,
        named: &str,
        via: &str,
        resource: &str,
    ) -> ApiError {
        self.metrics.tenant_violations.inc();
        // The name is the peer's: stored escaped and cut (PostgreSQL refuses NUL in text).
        let named = &printable_id(named);
        tracing::warn!(
            tenant,
            user,
            named,
            via,
            resource,
            "tenant violation refused"
        );
        let record = AuditRecord::new(
            tenant,
            user,
            "security.tenant_violation",
            resource,
            AuditResult::Failure,
        )
        .target(named)
        .resource_id(named)
        .meta("via", via);
        if let Err(error) = self.audit(record).await {
            return error;
        }
        ApiError::new(
            webwaka_realtime::protocol::ErrorCode::TenantViolation,
            format!("{via} names tenant {named:?}, not the token's tenant"),
        )
        .with_detail("via", via)
    }

    /// Takes a WebSocket slot; `None` when the server is full.
    pub(crate) fn take_slot(self: &Arc<Self>) -> Option<Slot> {
        let taken = self.slots.fetch_add(1, Ordering::AcqRel);
        if taken >= self.config.max_connections {
            self.slots.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot {
            app: Arc::clone(self),
        })
    }
}

/// An id from a peer as it may be stored and logged: control characters escaped
/// (`\u{0}`), and cut to [`MAX_ID_LEN`] bytes (`…` marks the cut).
pub(crate) fn printable_id(id: &str) -> String {
    let mut out = String::with_capacity(id.len().min(MAX_ID_LEN));
    for c in id.chars() {
        let before = out.len();
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else if c == '\\' {
            // Escaped too, so that an escape in the record is never the peer's text.
            out.push_str("\\\\");
        } else {
            out.push(c);
        }
        if out.len() > MAX_ID_LEN {
            out.truncate(before);
            out.push('…');
            break;
        }
    }
    out
}

/// The machine's name, for instance names (`HOSTNAME`, else `localhost`).
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// A taken WebSocket slot, given back when dropped.
pub(crate) struct Slot {
    app: Arc<App>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.app.slots.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_id_is_stored_escaped_and_cut() {
        assert_eq!(printable_id("tenant-b"), "tenant-b");
        assert_eq!(printable_id("a\0b\n"), "a\\u{0}b\\u{a}");
        assert_eq!(
            printable_id("a\\u{0}b"),
            "a\\\\u{0}b",
            "not taken for an escape"
        );
        let long = printable_id(&format!("{}\0", "é".repeat(200)));
        assert!(long.ends_with('…'), "{long}");
        assert!(long.len() <= MAX_ID_LEN + '…'.len_utf8(), "{}", long.len());
        assert!(!long.contains('\0'));
    }
}
