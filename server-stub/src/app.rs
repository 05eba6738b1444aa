//! The server's shared state ([`App`]): configuration, keys, database, live directory,
//! limits, reconciliation engine, transaction processor, and the shutdown signal.
//! Every handler gets an `Arc<App>`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use webwaka_realtime::protocol::{AuditLogEntry, AuditResult};
use webwaka_realtime::reconcile::{CounterMerge, Reconciler};

use crate::audit::{self, AuditRecord};
use crate::auth::{Keys, SecretError, SecretSource, resolve_secret};
use crate::config::{Config, ConfigError, RoomPolicy};
use crate::db::Db;
use crate::error::{ApiError, StoreError};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::ratelimit::Limits;
use crate::transactions::TransactionProcessor;

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
    pub(crate) db: Db,
    pub(crate) hub: Arc<Hub>,
    /// The recent end of each tenant's log, for polls and resumes.
    pub(crate) tail: Arc<crate::tail::Tail>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) limits: Limits,
    pub(crate) policy: RoomPolicy,
    pub(crate) reconciler: Reconciler,
    pub(crate) processor: Arc<dyn TransactionProcessor>,
    /// Cancelled when the server shuts down.
    pub(crate) shutdown: CancellationToken,
    /// WebSocket connection tasks (awaited on shutdown).
    pub(crate) ws_tasks: TaskTracker,
    /// Background tasks: transaction processing, maintenance.
    pub(crate) background: TaskTracker,
    /// WebSocket slots taken (reserved before the upgrade).
    pub(crate) slots: AtomicUsize,
    /// Where the JWT secret came from.
    pub(crate) secret_source: SecretSource,
    /// The chaos layer, when enabled (`CHAOS=1`).
    pub(crate) chaos: Option<Arc<crate::chaos::Chaos>>,
}

impl App {
    /// Opens the database and builds the state for `config`.
    pub(crate) fn new(
        config: Config,
        processor: Option<Arc<dyn TransactionProcessor>>,
    ) -> Result<Self, StartError> {
        config.validate()?;
        let (secret, secret_source) = resolve_secret(&config)?;
        let keys = Keys::new(secret.as_bytes(), config.jwt_leeway_ms / 1000);
        let db = Db::open(&config.database_path(), config.durability)?;
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(Arc::clone(&metrics)));
        hub.load_memberships(crate::rooms::load_all(&db)?);
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
        Ok(Self {
            limits: Limits::new(&config),
            policy: config.parsed_room_policy()?,
            verified: crate::auth::VerifiedTokens::new(config.jwt_leeway_ms / 1000),
            keys,
            db,
            hub,
            tail: Arc::new(crate::tail::Tail::new(config.event_bus_tail_bytes)),
            metrics,
            reconciler,
            processor,
            shutdown: CancellationToken::new(),
            ws_tasks: TaskTracker::new(),
            background: TaskTracker::new(),
            slots: AtomicUsize::new(0),
            secret_source,
            chaos: config.chaos.then(|| Arc::new(crate::chaos::Chaos::new())),
            config,
        })
    }

    /// Appends an audit record on its own.
    pub(crate) async fn audit(&self, record: AuditRecord) -> Result<AuditLogEntry, ApiError> {
        Ok(self.db.write(move |w| audit::append(w, record)).await?)
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

/// A taken WebSocket slot, given back when dropped.
pub(crate) struct Slot {
    app: Arc<App>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.app.slots.fetch_sub(1, Ordering::AcqRel);
    }
}
