//! The local WebWaka Realtime server (axum) that the SDK talks to: the whole v1
//! protocol (`../shared/design/PROTOCOL.md`, described as built in `docs/protocol.md`)
//! on an embedded SQLite database.
//!
//! It links core's wire types and reconciliation engine (`webwaka-realtime` without
//! default features), so the server and the SDK cannot disagree on a message's shape
//! or on how concurrent edits resolve.
//!
//! # Starting a server in-process
//!
//! ```no_run
//! # async fn demo() -> Result<(), webwaka_server_stub::StartError> {
//! use webwaka_server_stub::{Config, Server};
//! let mut config = Config::new("/tmp/webwaka-demo");
//! config.port = 0; // any free port
//! let server = Server::start(config).await?;
//! let token = server.token("tenant-a", "alice", &[]);
//! println!("ws: {}  http: {}  token: {token}", server.ws_url(), server.http_url());
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Map
//!
//! | module | what |
//! |---|---|
//! | `config` | settings, env names, defaults |
//! | `auth` | JWT verify/mint, dev secret |
//! | `db` | SQLite: one writer thread (group commit), read pool, schema |
//! | `log` | the durable per-tenant log: append, fan-out, cursors, polls |
//! | `tail` | each tenant's most recent events in memory, for polls and resumes |
//! | `hub` | live connections, room membership cache, presence |
//! | `ws` | the WebSocket endpoint and connection loop |
//! | `messaging`, `rooms` | what WS and HTTP share for messages and rooms |
//! | `bus` | consumer groups, leases, DLQ |
//! | `reconcile` | core's engine on stored entities, snapshots |
//! | `transactions` | Class D: idempotency, processor, status |
//! | `audit` | the hash-chained audit log |
//! | `chaos` | the development-only chaos layer (`CHAOS=1`) |
//! | `http` | routes, extractors (token, tenancy, JSON), health, metrics |
//! | `ratelimit`, `metrics`, `telemetry` | governor limits, Prometheus, tracing |

mod app;
pub mod audit;
pub mod auth;
mod bus;
pub mod chaos;
pub mod config;
mod db;
mod error;
mod frames;
mod http;
mod hub;
mod log;
mod messaging;
mod metrics;
mod ratelimit;
mod reconcile;
mod rooms;
mod tail;
pub mod telemetry;
pub mod transactions;
mod ws;
mod wsframe;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use app::StartError;
pub use auth::{Keys, SecretSource};
pub use chaos::{ChaosControl, ChaosSettings, ChaosState, DropAcks, HttpFailures};
pub use config::Config;
pub use error::ApiError;
pub use transactions::{Decision, DelayProcessor, PendingTransaction, TransactionProcessor};
pub use webwaka_realtime::protocol;

use app::App;

/// Optional parts of a server (defaults: the [`DelayProcessor`] from the config).
#[derive(Default, Clone)]
pub struct Options {
    /// Decides Class D transactions.
    pub processor: Option<Arc<dyn TransactionProcessor>>,
}

/// A server that is listening, before it serves.
pub struct Server {
    app: Arc<App>,
    listener: TcpListener,
    addr: SocketAddr,
}

impl Server {
    /// Opens the database and binds `config.host:config.port` (port 0: any free port).
    pub async fn bind(config: Config, options: Options) -> Result<Self, StartError> {
        let addr = config.listen_addr();
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|error| StartError::Bind { addr, error })?;
        Self::with_listener(config, options, listener)
    }

    /// Uses an already bound `listener`.
    pub fn with_listener(
        config: Config,
        options: Options,
        listener: TcpListener,
    ) -> Result<Self, StartError> {
        let addr = listener.local_addr().map_err(|error| StartError::Bind {
            addr: config.listen_addr(),
            error,
        })?;
        let app = Arc::new(App::new(config, options.processor)?);
        Ok(Self {
            app,
            listener,
            addr,
        })
    }

    /// Binds and starts serving in the background with the default options.
    pub async fn start(config: Config) -> Result<RunningServer, StartError> {
        Ok(Self::bind(config, Options::default()).await?.spawn())
    }

    /// Binds and starts serving in the background.
    pub async fn start_with(config: Config, options: Options) -> Result<RunningServer, StartError> {
        Ok(Self::bind(config, options).await?.spawn())
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the JWT secret came from (dev mode prints it).
    pub fn secret_source(&self) -> SecretSource {
        self.app.secret_source
    }

    /// The token keys (to mint development tokens).
    pub fn keys(&self) -> &Keys {
        &self.app.keys
    }

    /// Serves until `shutdown` completes (or the server is stopped otherwise), then
    /// shuts down gracefully: stops accepting, closes WebSockets with 1001, lets
    /// requests finish, flushes storage.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let Server {
            app,
            listener,
            addr,
        } = self;
        serve(app, listener, addr, shutdown).await;
    }

    /// Serves on a background task; the handle stops it.
    pub fn spawn(self) -> RunningServer {
        let app = Arc::clone(&self.app);
        let addr = self.addr;
        let stop = app.shutdown.clone();
        let task = tokio::spawn(self.run(async move { stop.cancelled().await }));
        RunningServer { app, addr, task }
    }
}

/// A server serving on a background task.
pub struct RunningServer {
    app: Arc<App>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl RunningServer {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `ws://addr{WS_PATH}`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}{}", self.addr, self.app.config.ws_path)
    }

    /// A token for `user` of `tenant` with `roles`, valid for a day.
    pub fn token(&self, tenant: &str, user: &str, roles: &[&str]) -> String {
        let roles: Vec<String> = roles.iter().map(|r| (*r).to_owned()).collect();
        self.app.keys.mint(tenant, user, &roles, 86_400)
    }

    /// The token keys (to sign odd tokens in tests).
    pub fn keys(&self) -> &Keys {
        &self.app.keys
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.app.config
    }

    /// The chaos layer's controls, when the server runs with `config.chaos` (`CHAOS=1`).
    pub fn chaos(&self) -> Option<ChaosControl> {
        ChaosControl::of(&self.app)
    }

    /// Stops it gracefully and waits until storage is flushed.
    pub async fn shutdown(self) {
        self.app.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// Serves `app` on `listener` until `shutdown`, then shuts down gracefully.
async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    tracing::info!(%addr, data_dir = %app.config.data_dir.display(), "serving");
    resume_pending_transactions(&app);
    spawn_maintenance(&app);
    let stop = app.shutdown.clone();
    let router = http::router(Arc::clone(&app));
    // Small frames must leave at once: no Nagle delay on accepted connections.
    let listener =
        axum::serve::ListenerExt::tap_io(listener, |stream: &mut tokio::net::TcpStream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
        });
    let server = axum::serve(listener, router)
        .with_graceful_shutdown(stop.clone().cancelled_owned())
        .into_future();
    let mut server = tokio::spawn(server);
    tokio::select! {
        () = shutdown => {}
        () = stop.cancelled() => {}
        result = &mut server => {
            if let Ok(Err(error)) = result {
                tracing::error!(%error, "the HTTP server failed");
            }
        }
    }
    tracing::info!("shutting down");
    // Stop accepting; WebSocket tasks see the same signal and close with 1001.
    stop.cancel();
    let grace = Duration::from_millis(app.config.shutdown_grace_ms);
    if !server.is_finished() && tokio::time::timeout(grace, &mut server).await.is_err() {
        tracing::warn!("requests still running after the grace period; dropping them");
        server.abort();
    }
    app.ws_tasks.close();
    if tokio::time::timeout(grace, app.ws_tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("WebSocket connections still open after the grace period");
    }
    app.background.close();
    let _ = tokio::time::timeout(grace, app.background.wait()).await;
    // Flush: the writer finishes its queue and checkpoints the WAL.
    let flush = Arc::clone(&app);
    let _ = tokio::task::spawn_blocking(move || flush.db.shutdown()).await;
    tracing::info!("stopped");
}

/// Hands the transactions left pending by the last run to the processor.
fn resume_pending_transactions(app: &Arc<App>) {
    match app.db.read(transactions::pending) {
        Ok(pending) => {
            if !pending.is_empty() {
                tracing::info!(count = pending.len(), "resuming pending transactions");
            }
            for transaction in pending {
                transactions::spawn_processing(app, transaction);
            }
        }
        Err(error) => tracing::error!(%error, "cannot read pending transactions"),
    }
}

/// Retention, lease expiry and limiter clean-up, every `MAINTENANCE_INTERVAL_MS`.
fn spawn_maintenance(app: &Arc<App>) {
    let app2 = Arc::clone(app);
    app.background.spawn(async move {
        let period = Duration::from_millis(app2.config.maintenance_interval_ms);
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = app2.shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let cutoff = log::retention_cutoff(app2.config.event_bus_retention_period_ms);
            let max_retries = app2.config.event_bus_max_retries;
            let result = app2
                .db
                .write(move |w| {
                    let purged = log::purge(w, cutoff)?;
                    let dead = bus::expire_leases(w, None, db::now_ms(), max_retries)?;
                    Ok((purged, dead))
                })
                .await;
            match result {
                Ok((purged, dead)) if purged > 0 || dead > 0 => {
                    tracing::debug!(purged, dead, "maintenance");
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "maintenance failed"),
            }
            app2.limits.retain_recent();
            app2.tail.expire(cutoff);
        }
    });
}
