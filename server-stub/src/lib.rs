//! The local WebWaka Realtime server (axum) that the SDK talks to: the whole v1
//! protocol (`../shared/design/PROTOCOL.md`, described as built in `docs/protocol.md`)
//! on an embedded SQLite database, or on PostgreSQL (`DATABASE_URL`) with several
//! instances sharing it.
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
//! | `store` | the storage interface; `store::sqlite`, `store::postgres` its engines |
//! | `log` | the durable per-tenant log: event drafts, cursors, polls (tail first) |
//! | `feed` | committed events to the tail and live connections, in sequence order |
//! | `tail` | each tenant's most recent events in memory, for polls and resumes |
//! | `hub` | live connections, room membership cache, presence |
//! | `ws` | the WebSocket endpoint and connection loop |
//! | `socketio` | the socket.io v4 endpoint beside `/ws` (socketioxide) |
//! | `session` | what both endpoints share: the checks before connecting, each event's handling, replays |
//! | `messaging`, `rooms` | what WS and HTTP share for messages and rooms |
//! | `reconcile` | core's engine on stored entities, snapshots |
//! | `transactions` | Class D: idempotency, processor, status |
//! | `audit` | the hash-chained audit log |
//! | `chaos` | the development-only chaos layer (`CHAOS=1`) |
//! | `dashboard` | the live dashboard at `/dashboard`: the embedded page, its SSE feed, what is captured while it is open |
//! | `http` | routes, extractors (token, tenancy, JSON), health, metrics |
//! | `listener` | the accept loop: `HTTP_MAX_CONNECTIONS`, header and idle timeouts |
//! | `ratelimit`, `metrics`, `telemetry` | governor limits, Prometheus, tracing |

mod app;
pub mod audit;
pub mod auth;
pub mod chaos;
mod cluster;
pub mod config;
mod dashboard;
mod error;
mod feed;
mod frames;
mod http;
mod hub;
mod listener;
mod log;
mod messaging;
mod metrics;
mod ratelimit;
mod reconcile;
mod rooms;
mod session;
mod socketio;
mod store;
mod tail;
pub mod telemetry;
pub mod testing;
mod time;
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
pub use listener::{ConnectionLimits, descriptor_limit, raise_descriptor_limit};
pub use store::Engine;
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
        let listener = listener::bind(addr).map_err(|error| StartError::Bind { addr, error })?;
        Self::with_listener(config, options, listener).await
    }

    /// Uses an already bound `listener`.
    pub async fn with_listener(
        config: Config,
        options: Options,
        listener: TcpListener,
    ) -> Result<Self, StartError> {
        let addr = listener.local_addr().map_err(|error| StartError::Bind {
            addr: config.listen_addr(),
            error,
        })?;
        let app = Arc::new(App::new(config, options.processor).await?);
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

    /// This instance's name (unique per start; several instances share a database).
    pub fn instance(&self) -> &str {
        &self.app.instance
    }

    /// The descriptor limit found at start-up and the connection caps.
    pub fn connection_limits(&self) -> ConnectionLimits {
        self.app.connections.limits()
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

    /// The descriptor limit found at start-up and the connection caps.
    pub fn connection_limits(&self) -> ConnectionLimits {
        self.app.connections.limits()
    }

    /// The chaos layer's controls, when the server runs with `config.chaos` (`CHAOS=1`).
    pub fn chaos(&self) -> Option<ChaosControl> {
        ChaosControl::of(self.app.chaos.as_ref(), &self.app.hub, &self.app.node)
    }

    /// The storage engine it runs on.
    pub fn engine(&self) -> Engine {
        self.app.store.engine()
    }

    /// This instance's name (unique per start; several instances share a database).
    pub fn instance(&self) -> &str {
        &self.app.instance
    }

    /// Stops it gracefully and waits until storage is flushed.
    pub async fn shutdown(self) {
        self.app.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// Verifies the audit chain in the configured database (the `verify-audit` command):
/// the SQLite file in the data directory, or PostgreSQL with `DATABASE_URL`.
pub async fn verify_audit(config: &Config) -> Result<audit::ChainCheck, StartError> {
    match &config.database_url {
        None => {
            let path = config.database_path();
            if !path.exists() {
                return Err(StartError::Store(error::StoreError::Io(
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("no database at {}", path.display()),
                    ),
                )));
            }
            Ok(store::sqlite::audit::verify_file(&path)?)
        }
        Some(url) => Ok(store::postgres::verify_audit(url, config).await?),
    }
}

/// Serves `app` on `listener` until `shutdown`, then shuts down gracefully.
async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let limits = app.connections.limits();
    tracing::info!(
        %addr,
        engine = app.store.engine().name(),
        instance = %app.instance,
        descriptor_limit = ?limits.descriptor_limit,
        http_max_connections = limits.http_max_connections,
        "serving"
    );
    if let Err(error) = app.transactions.sweep().await {
        tracing::error!(%error, "cannot read pending transactions");
    }
    spawn_maintenance(&app);
    spawn_chart_sampler(&app);
    spawn_heartbeat(&app);
    let stop = app.shutdown.clone();
    let (router, socketio) = http::router(Arc::clone(&app));
    // Our own accept loop: axum::serve has no cap and no header or idle timeout.
    let mut server = tokio::spawn(listener::serve(Arc::clone(&app), listener, router));
    tokio::select! {
        () = shutdown => {}
        () = stop.cancelled() => {}
        result = &mut server => {
            if let Err(error) = result {
                tracing::error!(%error, "the HTTP server failed");
            }
        }
    }
    tracing::info!("shutting down");
    // Stop accepting (idle connections close, requests finish); WebSocket tasks see
    // the same signal and close with 1001.
    stop.cancel();
    let grace = Duration::from_millis(app.config.shutdown_grace_ms);
    // socket.io's transports close (its clients reconnect by themselves, to another
    // instance or to this one restarted).
    if let Some(io) = socketio
        && tokio::time::timeout(grace, io.close()).await.is_err()
    {
        tracing::warn!("socket.io connections still open after the grace period");
    }
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
    // The other instances forget this one's users at once.
    app.node.bye();
    // What this instance was still processing is taken by the next one to look.
    if let Err(error) = app.store.release(&app.instance).await {
        tracing::warn!(%error, "cannot let go of pending transactions");
    }
    // Flush: SQLite's writer finishes its queue and checkpoints the WAL; PostgreSQL's
    // pool closes.
    app.store.shutdown().await;
    tracing::info!("stopped");
}

/// With several instances: says this one is alive and forgets silent ones, every
/// `cluster::ALIVE_EVERY`.
fn spawn_heartbeat(app: &Arc<App>) {
    if !app.node.clustered() {
        return;
    }
    let app2 = Arc::clone(app);
    app.background.spawn(async move {
        let mut ticker = tokio::time::interval(cluster::ALIVE_EVERY);
        loop {
            tokio::select! {
                _ = app2.shutdown.cancelled() => return,
                _ = ticker.tick() => app2.node.tick(),
            }
        }
    });
}

/// The dashboard charts' totals, every `CHART_SAMPLE_EVERY`, so that a page that opens
/// shows the last minutes.
fn spawn_chart_sampler(app: &Arc<App>) {
    let app2 = Arc::clone(app);
    app.background.spawn(async move {
        let mut ticker = tokio::time::interval(dashboard::CHART_SAMPLE_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = app2.shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let (connections, messages, polls, errors) = app2.metrics.chart_totals();
            app2.watch.sample(dashboard::ChartSample {
                at: time::now_ms(),
                connections,
                messages,
                polls,
                errors,
            });
        }
    });
}

/// Retention, lease expiry, transactions whose holder is gone, and limiter clean-up,
/// every `MAINTENANCE_INTERVAL_MS`.
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
            let result = async {
                let purged = app2.store.purge(cutoff).await?;
                let dead = app2
                    .store
                    .expire_leases(time::now_ms(), max_retries)
                    .await?;
                app2.transactions.sweep().await?;
                Ok::<_, error::StoreError>((purged, dead))
            }
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
