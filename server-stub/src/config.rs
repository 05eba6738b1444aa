//! Configuration: every setting, its environment variable (the original's names), its
//! command-line flag and its default. Durations are milliseconds, as in the original.
//!
//! [`Config`] is a `clap` argument group, so the binary reads it from flags and the
//! environment; tests build one with [`Config::new`] (the defaults, no environment) and
//! change the fields they care about.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use webwaka_realtime::protocol::ResolutionStrategy;

/// The defaults, shared by the flags and by [`Config::new`].
pub mod defaults {
    /// `WS_PORT`.
    pub const PORT: u16 = 3000;
    /// `WS_PATH` (PROTOCOL.md §3; the original's `/socket.io` was Socket.IO's).
    pub const WS_PATH: &str = "/ws";
    /// `SOCKETIO_PATH`: the socket.io endpoint (the original's `WS_PATH`).
    pub const SOCKETIO_PATH: &str = "/socket.io";
    /// `WS_PING_INTERVAL`, ms.
    pub const PING_INTERVAL_MS: u64 = 30_000;
    /// `WS_PING_TIMEOUT`, ms.
    pub const PING_TIMEOUT_MS: u64 = 60_000;
    /// `WS_MAX_CONNECTIONS`.
    pub const MAX_CONNECTIONS: usize = 50_000;
    /// `WS_MESSAGE_RATE_LIMIT`, messages per minute per user.
    pub const MESSAGE_RATE_LIMIT: u32 = 100;
    /// `WS_MAX_FRAME_BYTES`.
    pub const MAX_FRAME_BYTES: usize = 1024 * 1024;
    /// `WS_READ_BUFFER_BYTES`: tungstenite's read buffer, allocated per connection.
    pub const WS_READ_BUFFER_BYTES: usize = 2048;
    /// `WS_WRITE_BUFFER_BYTES`: frames buffered per connection before a write (every
    /// batch is flushed anyway); 0 writes each frame at once.
    pub const WS_WRITE_BUFFER_BYTES: usize = 4096;
    /// `WS_SEND_QUEUE`: deliveries queued per connection before it counts as too slow.
    pub const WS_SEND_QUEUE: usize = 1024;
    /// `JWT_LEEWAY_MS`: clock skew allowed on `exp` (at most 60 s).
    pub const JWT_LEEWAY_MS: u64 = 30_000;
    /// `DATA_DIR`.
    pub const DATA_DIR: &str = "webwaka-data";
    /// `EVENT_BUS_STREAM_NAME` (informational: the log is per tenant in SQLite).
    pub const EVENT_BUS_STREAM_NAME: &str = "webwaka:events";
    /// `EVENT_BUS_CONSUMER_GROUP`.
    pub const EVENT_BUS_CONSUMER_GROUP: &str = "webwaka-consumers";
    /// `EVENT_BUS_MAX_RETRIES`.
    pub const EVENT_BUS_MAX_RETRIES: u32 = 3;
    /// `EVENT_BUS_RETENTION_PERIOD`, ms (7 days).
    pub const EVENT_BUS_RETENTION_PERIOD_MS: u64 = 604_800_000;
    /// `EVENT_BUS_BATCH_SIZE`: the largest `max` a claim is granted.
    pub const EVENT_BUS_BATCH_SIZE: u32 = 100;
    /// `EVENT_BUS_TAIL_BYTES`: memory for the most recent events of all tenants (64 MiB).
    pub const EVENT_BUS_TAIL_BYTES: usize = 64 << 20;
    /// `RECONCILIATION_MAX_QUEUE_SIZE`: most operations in one request.
    pub const RECONCILIATION_MAX_QUEUE_SIZE: usize = 10_000;
    /// `RECONCILIATION_PROCESSING_TIMEOUT`, ms.
    pub const RECONCILIATION_PROCESSING_TIMEOUT_MS: u64 = 30_000;
    /// `POLL_RATE_LIMIT`, requests per minute per user.
    pub const POLL_RATE_LIMIT: u32 = 60;
    /// `RECONCILIATION_RATE_LIMIT`, requests per minute per user.
    pub const RECONCILIATION_RATE_LIMIT: u32 = 10;
    /// `PUBLISH_RATE_LIMIT`, events per second per user.
    pub const PUBLISH_RATE_LIMIT: u32 = 1000;
    /// `MAX_ROOMS_PER_USER`: rooms a user may be a member of at once.
    pub const MAX_ROOMS_PER_USER: usize = 1000;
    /// `TRANSACTION_CONFIRM_DELAY_MS`.
    pub const TRANSACTION_CONFIRM_DELAY_MS: u64 = 2000;
    /// `HTTP_MAX_BODY_BYTES`.
    pub const HTTP_MAX_BODY_BYTES: usize = 1024 * 1024;
    /// `HTTP_HEADER_TIMEOUT`, ms: a request's headers must be complete within this.
    pub const HTTP_HEADER_TIMEOUT_MS: u64 = 10_000;
    /// `HTTP_IDLE_TIMEOUT`, ms: a keep-alive connection with no request is closed after this.
    pub const HTTP_IDLE_TIMEOUT_MS: u64 = 60_000;
    /// `HTTP_BODY_TIMEOUT`, ms: a request body that sends nothing for this long ends.
    pub const HTTP_BODY_TIMEOUT_MS: u64 = 30_000;
    /// `SHUTDOWN_GRACE_MS`.
    pub const SHUTDOWN_GRACE_MS: u64 = 10_000;
    /// `MAINTENANCE_INTERVAL_MS`: retention, lease expiry, limiter clean-up.
    pub const MAINTENANCE_INTERVAL_MS: u64 = 10_000;
    /// `DATABASE_POOL_SIZE`: PostgreSQL connections per instance.
    pub const DATABASE_POOL_SIZE: usize = 16;
    /// `DATABASE_STATEMENT_TIMEOUT_MS`: the longest a PostgreSQL statement may run.
    pub const DATABASE_STATEMENT_TIMEOUT_MS: u64 = 10_000;
    /// `DATABASE_CONNECT_TIMEOUT_MS`: the longest a PostgreSQL connection may take.
    pub const DATABASE_CONNECT_TIMEOUT_MS: u64 = 5_000;
    /// `CLUSTER_CATCH_UP_MS`: how often an instance compares every tenant's log head
    /// with what it delivered (the safety net under notifications).
    pub const CLUSTER_CATCH_UP_MS: u64 = 1_000;
}

/// PostgreSQL's `synchronous_commit` for the server's sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SynchronousCommit {
    /// Every commit waits for its WAL to be flushed (PostgreSQL's default).
    On,
    /// Commits return before the flush: a crash of PostgreSQL can lose the last
    /// fraction of a second of commits (never corrupts).
    Off,
}

/// Development or production: decides what a missing `JWT_SECRET` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// A missing `JWT_SECRET` is generated (kept in the data directory) and printed.
    Dev,
    /// A missing `JWT_SECRET` is an error.
    Production,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// SQLite durability (`PRAGMA synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Durability {
    /// Survives a crash of the process (WAL, `synchronous=NORMAL`): the default.
    Normal,
    /// Also survives a power cut (`synchronous=FULL`): slower commits.
    Full,
}

/// Every setting of the server.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "WS_HOST", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub host: IpAddr,
    /// Port to listen on (0: any free port).
    #[arg(long, env = "WS_PORT", default_value_t = defaults::PORT)]
    pub port: u16,
    /// Path of the WebSocket endpoint.
    #[arg(long, env = "WS_PATH", default_value = defaults::WS_PATH)]
    pub ws_path: String,
    /// Path of the socket.io v4 endpoint (the original's clients, npm
    /// `socket.io-client`); `off` (or empty) turns it off. Must not share a path with
    /// `WS_PATH`.
    #[arg(long, env = "SOCKETIO_PATH", default_value = defaults::SOCKETIO_PATH)]
    pub socketio_path: String,
    /// Interval between server pings, in ms.
    #[arg(long = "ping-interval", env = "WS_PING_INTERVAL", default_value_t = defaults::PING_INTERVAL_MS)]
    pub ping_interval_ms: u64,
    /// Silence after which a connection is closed, in ms.
    #[arg(long = "ping-timeout", env = "WS_PING_TIMEOUT", default_value_t = defaults::PING_TIMEOUT_MS)]
    pub ping_timeout_ms: u64,
    /// Most WebSocket connections held at once; more are refused with SERVER_FULL.
    #[arg(long, env = "WS_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// `message` frames (and `POST /api/messages`) per minute per user; 0: no limit.
    #[arg(long, env = "WS_MESSAGE_RATE_LIMIT", default_value_t = defaults::MESSAGE_RATE_LIMIT)]
    pub message_rate_limit: u32,
    /// Largest WebSocket frame accepted, in bytes (larger: close 1009).
    #[arg(long, env = "WS_MAX_FRAME_BYTES", default_value_t = defaults::MAX_FRAME_BYTES)]
    pub max_frame_bytes: usize,
    /// Read buffer allocated per WebSocket connection, in bytes.
    #[arg(long, env = "WS_READ_BUFFER_BYTES", default_value_t = defaults::WS_READ_BUFFER_BYTES)]
    pub ws_read_buffer_bytes: usize,
    /// Output buffered per WebSocket connection before it is written, in bytes (each
    /// batch of frames is flushed anyway; 0: every frame is written at once).
    #[arg(long, env = "WS_WRITE_BUFFER_BYTES", default_value_t = defaults::WS_WRITE_BUFFER_BYTES)]
    pub ws_write_buffer_bytes: usize,
    /// Deliveries queued per connection; a connection that falls further behind is
    /// closed (1013) and catches up with `resume`.
    #[arg(long, env = "WS_SEND_QUEUE", default_value_t = defaults::WS_SEND_QUEUE)]
    pub ws_send_queue: usize,
    /// HS256 secret of the JWTs. Missing in dev mode: generated, kept in the data
    /// directory and printed.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, global = true)]
    pub jwt_secret: Option<String>,
    /// Clock skew allowed on a token's `exp`, in ms (at most 60000).
    #[arg(long = "jwt-leeway", env = "JWT_LEEWAY_MS", default_value_t = defaults::JWT_LEEWAY_MS)]
    pub jwt_leeway_ms: u64,
    /// `dev` or `production`.
    #[arg(long, env = "WEBWAKA_MODE", value_enum, default_value_t = Mode::Dev, global = true)]
    pub mode: Mode,
    /// Directory of the SQLite database (created on first run).
    #[arg(long, env = "DATA_DIR", default_value = defaults::DATA_DIR, global = true)]
    pub data_dir: PathBuf,
    /// SQLite durability: `normal` (process crash) or `full` (power cut).
    #[arg(long, env = "SQLITE_SYNCHRONOUS", value_enum, default_value_t = Durability::Normal)]
    pub durability: Durability,
    /// `postgres://user:password@host:port/database`: keep every piece of state in
    /// PostgreSQL (several instances may share it) instead of the SQLite file in the
    /// data directory.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,
    /// PostgreSQL connections per instance.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = defaults::DATABASE_POOL_SIZE)]
    pub database_pool_size: usize,
    /// The longest a PostgreSQL statement may run, in ms (`statement_timeout`).
    #[arg(long = "database-statement-timeout", env = "DATABASE_STATEMENT_TIMEOUT_MS", default_value_t = defaults::DATABASE_STATEMENT_TIMEOUT_MS)]
    pub database_statement_timeout_ms: u64,
    /// The longest connecting to PostgreSQL may take, in ms.
    #[arg(long = "database-connect-timeout", env = "DATABASE_CONNECT_TIMEOUT_MS", default_value_t = defaults::DATABASE_CONNECT_TIMEOUT_MS)]
    pub database_connect_timeout_ms: u64,
    /// PostgreSQL `synchronous_commit` for the server's sessions (`on`, `off`); unset:
    /// the database's own setting.
    #[arg(long, env = "DATABASE_SYNCHRONOUS_COMMIT", value_enum)]
    pub database_synchronous_commit: Option<SynchronousCommit>,
    /// How often an instance on PostgreSQL compares every tenant's log head with what
    /// it delivered live, in ms (notifications wake it sooner).
    #[arg(long = "cluster-catch-up", env = "CLUSTER_CATCH_UP_MS", default_value_t = defaults::CLUSTER_CATCH_UP_MS)]
    pub cluster_catch_up_ms: u64,
    /// Name of the event stream (informational: one log per tenant in SQLite).
    #[arg(long, env = "EVENT_BUS_STREAM_NAME", default_value = defaults::EVENT_BUS_STREAM_NAME)]
    pub event_bus_stream_name: String,
    /// Default consumer group, for consumers that name none (`/api/eventbus/groups/default/...`).
    #[arg(long, env = "EVENT_BUS_CONSUMER_GROUP", default_value = defaults::EVENT_BUS_CONSUMER_GROUP)]
    pub event_bus_consumer_group: String,
    /// Redeliveries after the first delivery before an event goes to the DLQ.
    #[arg(long, env = "EVENT_BUS_MAX_RETRIES", default_value_t = defaults::EVENT_BUS_MAX_RETRIES)]
    pub event_bus_max_retries: u32,
    /// How long events are kept, in ms.
    #[arg(long = "event-bus-retention-period", env = "EVENT_BUS_RETENTION_PERIOD", default_value_t = defaults::EVENT_BUS_RETENTION_PERIOD_MS)]
    pub event_bus_retention_period_ms: u64,
    /// Largest `max` granted to one claim.
    #[arg(long, env = "EVENT_BUS_BATCH_SIZE", default_value_t = defaults::EVENT_BUS_BATCH_SIZE)]
    pub event_bus_batch_size: u32,
    /// Bytes of the most recent events (of all tenants together; the oldest leave
    /// first) kept in memory, so that polls and resumes from a recent cursor do not
    /// read SQLite (0: always read SQLite).
    #[arg(long, env = "EVENT_BUS_TAIL_BYTES", default_value_t = defaults::EVENT_BUS_TAIL_BYTES)]
    pub event_bus_tail_bytes: usize,
    /// Strategy when neither the request nor the entity type names one.
    #[arg(long, env = "RECONCILIATION_DEFAULT_STRATEGY", value_parser = parse_strategy, default_value = "LAST_WRITE_WINS")]
    pub reconciliation_default_strategy: ResolutionStrategy,
    /// Most operations in one reconciliation request.
    #[arg(long, env = "RECONCILIATION_MAX_QUEUE_SIZE", default_value_t = defaults::RECONCILIATION_MAX_QUEUE_SIZE)]
    pub reconciliation_max_queue_size: usize,
    /// Time allowed to one reconciliation request, in ms.
    #[arg(long = "reconciliation-processing-timeout", env = "RECONCILIATION_PROCESSING_TIMEOUT", default_value_t = defaults::RECONCILIATION_PROCESSING_TIMEOUT_MS)]
    pub reconciliation_processing_timeout_ms: u64,
    /// Strategies per entity type, e.g. `task=FIELD_LEVEL_MERGE;note=MANUAL`.
    #[arg(long, env = "RECONCILIATION_TYPE_STRATEGIES", default_value = "")]
    pub reconciliation_type_strategies: String,
    /// Apply reconciliation requests beside the storage's lock, in parallel (`true`),
    /// or every one under it, one after another (`false`). The results are the same.
    #[arg(
        long,
        env = "RECONCILIATION_PARALLEL",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub reconciliation_parallel: bool,
    /// Entity types merged as counters (CUSTOM_MERGE with core's `CounterMerge`),
    /// comma-separated.
    #[arg(long, env = "RECONCILIATION_COUNTER_TYPES", default_value = "")]
    pub reconciliation_counter_types: String,
    /// Poll (and snapshot) requests per minute per user; 0: no limit.
    #[arg(long, env = "POLL_RATE_LIMIT", default_value_t = defaults::POLL_RATE_LIMIT)]
    pub poll_rate_limit: u32,
    /// Reconciliation requests per minute per user; 0: no limit.
    #[arg(long, env = "RECONCILIATION_RATE_LIMIT", default_value_t = defaults::RECONCILIATION_RATE_LIMIT)]
    pub reconciliation_rate_limit: u32,
    /// Published events per second per user; 0: no limit.
    #[arg(long, env = "PUBLISH_RATE_LIMIT", default_value_t = defaults::PUBLISH_RATE_LIMIT)]
    pub publish_rate_limit: u32,
    /// Room-id prefixes reserved for roles, e.g. `admin:=admin;ops:=admin|ops`.
    #[arg(long, env = "ROOM_POLICY", default_value = "")]
    pub room_policy: String,
    /// Rooms a user may be a member of at once; a join past it is refused.
    #[arg(long, env = "MAX_ROOMS_PER_USER", default_value_t = defaults::MAX_ROOMS_PER_USER)]
    pub max_rooms_per_user: usize,
    /// Delay before the default processor decides a transaction, in ms.
    #[arg(long = "transaction-confirm-delay", env = "TRANSACTION_CONFIRM_DELAY_MS", default_value_t = defaults::TRANSACTION_CONFIRM_DELAY_MS)]
    pub transaction_confirm_delay_ms: u64,
    /// Transaction types the default processor rejects, comma-separated.
    #[arg(long, env = "TRANSACTION_REJECT_TYPES", default_value = "")]
    pub transaction_reject_types: String,
    /// Largest HTTP request body, in bytes.
    #[arg(long, env = "HTTP_MAX_BODY_BYTES", default_value_t = defaults::HTTP_MAX_BODY_BYTES)]
    pub http_max_body_bytes: usize,
    /// Time a connection has to send a request's complete headers, in ms: from its
    /// accept, or from the first byte of a later request on a keep-alive connection.
    #[arg(long = "http-header-timeout", env = "HTTP_HEADER_TIMEOUT", default_value_t = defaults::HTTP_HEADER_TIMEOUT_MS)]
    pub http_header_timeout_ms: u64,
    /// Time a keep-alive connection may wait between requests, in ms (from the end of
    /// its last response to the first byte of the next request).
    #[arg(long = "http-idle-timeout", env = "HTTP_IDLE_TIMEOUT", default_value_t = defaults::HTTP_IDLE_TIMEOUT_MS)]
    pub http_idle_timeout_ms: u64,
    /// Time a request's body may go without a byte while the server waits for it, in
    /// ms; past it the request fails and its connection is closed.
    #[arg(long = "http-body-timeout", env = "HTTP_BODY_TIMEOUT", default_value_t = defaults::HTTP_BODY_TIMEOUT_MS)]
    pub http_body_timeout_ms: u64,
    /// Most connections held at once that are not WebSockets (yet), on top of
    /// `WS_MAX_CONNECTIONS`; more are closed as soon as they are accepted. Unset: a
    /// quarter of the descriptors the process may open (found at start-up).
    #[arg(long, env = "HTTP_MAX_CONNECTIONS")]
    pub http_max_connections: Option<usize>,
    /// Time given to connections and requests to finish on shutdown, in ms.
    #[arg(long = "shutdown-grace", env = "SHUTDOWN_GRACE_MS", default_value_t = defaults::SHUTDOWN_GRACE_MS)]
    pub shutdown_grace_ms: u64,
    /// Interval of the maintenance task (retention, lease expiry), in ms.
    #[arg(long = "maintenance-interval", env = "MAINTENANCE_INTERVAL_MS", default_value_t = defaults::MAINTENANCE_INTERVAL_MS)]
    pub maintenance_interval_ms: u64,
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// `text` or `json`.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Enables the chaos layer (`/api/admin/chaos`): development only, refused in
    /// production mode. See docs/server.md "Chaos".
    #[arg(
        long,
        env = "CHAOS",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub chaos: bool,
    /// Accepted for compatibility with the original's `.env`; not used (no Redis here).
    #[arg(long, env = "REDIS_URL", hide = true)]
    pub redis_url: Option<String>,
}

/// A setting that cannot be used; names the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {name}: {message}")]
pub struct ConfigError {
    /// The environment variable (or flag) at fault.
    pub name: &'static str,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    fn new(name: &'static str, message: impl Into<String>) -> Self {
        Self {
            name,
            message: message.into(),
        }
    }
}

fn parse_strategy(text: &str) -> Result<ResolutionStrategy, String> {
    match text.trim().to_ascii_uppercase().as_str() {
        "LAST_WRITE_WINS" => Ok(ResolutionStrategy::LastWriteWins),
        "FIELD_LEVEL_MERGE" => Ok(ResolutionStrategy::FieldLevelMerge),
        "CUSTOM_MERGE" => Ok(ResolutionStrategy::CustomMerge),
        "MANUAL" => Ok(ResolutionStrategy::Manual),
        other => Err(format!(
            "unknown strategy {other:?}: expected LAST_WRITE_WINS, FIELD_LEVEL_MERGE, CUSTOM_MERGE or MANUAL"
        )),
    }
}

/// One rule of `ROOM_POLICY`: rooms whose id starts with `prefix` may be joined by users
/// holding one of `roles`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRule {
    /// The reserved room-id prefix, e.g. `ops:`.
    pub prefix: String,
    /// The roles allowed to join.
    pub roles: Vec<String>,
}

/// The room policy: reserved prefixes. A room no rule covers is open to every user of
/// the tenant. When several prefixes match, the longest decides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomPolicy {
    rules: Vec<RoomRule>,
}

impl RoomPolicy {
    /// Parses `prefix=role|role;prefix=role` (e.g. `admin:=admin;ops:=admin|ops`).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut rules = Vec::new();
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            // The prefix may itself end with ':', so split at the last '='.
            let Some((prefix, roles)) = part.rsplit_once('=') else {
                return Err(ConfigError::new(
                    "ROOM_POLICY",
                    format!("rule {part:?} is not of the form prefix=role|role"),
                ));
            };
            let roles: Vec<String> = roles
                .split('|')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(str::to_owned)
                .collect();
            if prefix.is_empty() || roles.is_empty() {
                return Err(ConfigError::new(
                    "ROOM_POLICY",
                    format!("rule {part:?} needs a prefix and at least one role"),
                ));
            }
            rules.push(RoomRule {
                prefix: prefix.to_owned(),
                roles,
            });
        }
        rules.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Ok(Self { rules })
    }

    /// True when a user with `roles` may join `room_id`.
    pub fn allows(&self, room_id: &str, roles: &[String]) -> bool {
        match self.rules.iter().find(|r| room_id.starts_with(&r.prefix)) {
            None => true,
            Some(rule) => rule.roles.iter().any(|r| roles.contains(r)),
        }
    }

    /// The rules, longest prefix first.
    pub fn rules(&self) -> &[RoomRule] {
        &self.rules
    }
}

/// Splits a comma-separated list, dropping blanks.
fn list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

impl Config {
    /// The defaults (no environment read), with the database in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: defaults::PORT,
            ws_path: defaults::WS_PATH.to_owned(),
            socketio_path: defaults::SOCKETIO_PATH.to_owned(),
            ping_interval_ms: defaults::PING_INTERVAL_MS,
            ping_timeout_ms: defaults::PING_TIMEOUT_MS,
            max_connections: defaults::MAX_CONNECTIONS,
            message_rate_limit: defaults::MESSAGE_RATE_LIMIT,
            max_frame_bytes: defaults::MAX_FRAME_BYTES,
            ws_read_buffer_bytes: defaults::WS_READ_BUFFER_BYTES,
            ws_write_buffer_bytes: defaults::WS_WRITE_BUFFER_BYTES,
            ws_send_queue: defaults::WS_SEND_QUEUE,
            jwt_secret: None,
            jwt_leeway_ms: defaults::JWT_LEEWAY_MS,
            mode: Mode::Dev,
            data_dir: data_dir.into(),
            durability: Durability::Normal,
            database_url: None,
            database_pool_size: defaults::DATABASE_POOL_SIZE,
            database_statement_timeout_ms: defaults::DATABASE_STATEMENT_TIMEOUT_MS,
            database_connect_timeout_ms: defaults::DATABASE_CONNECT_TIMEOUT_MS,
            database_synchronous_commit: None,
            cluster_catch_up_ms: defaults::CLUSTER_CATCH_UP_MS,
            event_bus_stream_name: defaults::EVENT_BUS_STREAM_NAME.to_owned(),
            event_bus_consumer_group: defaults::EVENT_BUS_CONSUMER_GROUP.to_owned(),
            event_bus_max_retries: defaults::EVENT_BUS_MAX_RETRIES,
            event_bus_retention_period_ms: defaults::EVENT_BUS_RETENTION_PERIOD_MS,
            event_bus_batch_size: defaults::EVENT_BUS_BATCH_SIZE,
            event_bus_tail_bytes: defaults::EVENT_BUS_TAIL_BYTES,
            reconciliation_default_strategy: ResolutionStrategy::LastWriteWins,
            reconciliation_max_queue_size: defaults::RECONCILIATION_MAX_QUEUE_SIZE,
            reconciliation_processing_timeout_ms: defaults::RECONCILIATION_PROCESSING_TIMEOUT_MS,
            reconciliation_type_strategies: String::new(),
            reconciliation_counter_types: String::new(),
            reconciliation_parallel: true,
            poll_rate_limit: defaults::POLL_RATE_LIMIT,
            reconciliation_rate_limit: defaults::RECONCILIATION_RATE_LIMIT,
            publish_rate_limit: defaults::PUBLISH_RATE_LIMIT,
            room_policy: String::new(),
            max_rooms_per_user: defaults::MAX_ROOMS_PER_USER,
            transaction_confirm_delay_ms: defaults::TRANSACTION_CONFIRM_DELAY_MS,
            transaction_reject_types: String::new(),
            http_max_body_bytes: defaults::HTTP_MAX_BODY_BYTES,
            http_header_timeout_ms: defaults::HTTP_HEADER_TIMEOUT_MS,
            http_idle_timeout_ms: defaults::HTTP_IDLE_TIMEOUT_MS,
            http_body_timeout_ms: defaults::HTTP_BODY_TIMEOUT_MS,
            http_max_connections: None,
            shutdown_grace_ms: defaults::SHUTDOWN_GRACE_MS,
            maintenance_interval_ms: defaults::MAINTENANCE_INTERVAL_MS,
            log_level: "info".to_owned(),
            log_format: LogFormat::Text,
            chaos: false,
            redis_url: None,
        }
    }

    /// The address to bind.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    /// The SQLite database file.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("webwaka.sqlite3")
    }

    /// Where dev mode keeps its generated secret.
    pub fn dev_secret_path(&self) -> PathBuf {
        self.data_dir.join("dev-jwt-secret")
    }

    /// `SOCKETIO_PATH`, without a trailing `/`; `None` when the endpoint is off.
    pub fn socketio_path(&self) -> Option<&str> {
        let path = self.socketio_path.trim();
        if path.is_empty() || path.eq_ignore_ascii_case("off") {
            return None;
        }
        Some(
            path.strip_suffix('/')
                .filter(|p| !p.is_empty())
                .unwrap_or(path),
        )
    }

    /// `WS_PING_INTERVAL` as a duration.
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }

    /// `WS_PING_TIMEOUT` as a duration.
    pub fn ping_timeout(&self) -> Duration {
        Duration::from_millis(self.ping_timeout_ms)
    }

    /// `HTTP_HEADER_TIMEOUT` as a duration.
    pub fn http_header_timeout(&self) -> Duration {
        Duration::from_millis(self.http_header_timeout_ms)
    }

    /// `HTTP_IDLE_TIMEOUT` as a duration.
    pub fn http_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.http_idle_timeout_ms)
    }

    /// `HTTP_BODY_TIMEOUT` as a duration.
    pub fn http_body_timeout(&self) -> Duration {
        Duration::from_millis(self.http_body_timeout_ms)
    }

    /// `ROOM_POLICY`, parsed.
    pub fn parsed_room_policy(&self) -> Result<RoomPolicy, ConfigError> {
        RoomPolicy::parse(&self.room_policy)
    }

    /// `TRANSACTION_REJECT_TYPES`, parsed.
    pub fn reject_types(&self) -> HashSet<String> {
        list(&self.transaction_reject_types).into_iter().collect()
    }

    /// `RECONCILIATION_COUNTER_TYPES`, parsed.
    pub fn counter_types(&self) -> Vec<String> {
        list(&self.reconciliation_counter_types)
    }

    /// `RECONCILIATION_TYPE_STRATEGIES`, parsed (`type=STRATEGY;type=STRATEGY`).
    pub fn type_strategies(&self) -> Result<Vec<(String, ResolutionStrategy)>, ConfigError> {
        let mut out = Vec::new();
        for part in self
            .reconciliation_type_strategies
            .split([';', ','])
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let Some((entity_type, strategy)) = part.split_once('=') else {
                return Err(ConfigError::new(
                    "RECONCILIATION_TYPE_STRATEGIES",
                    format!("{part:?} is not of the form type=STRATEGY"),
                ));
            };
            let strategy = parse_strategy(strategy)
                .map_err(|e| ConfigError::new("RECONCILIATION_TYPE_STRATEGIES", e))?;
            out.push((entity_type.trim().to_owned(), strategy));
        }
        Ok(out)
    }

    /// `SOCKETIO_PATH`: a path of its own. Engine.IO takes every request under its path,
    /// so neither path may be the other or lie under it: an operator who copied the
    /// original's `.env` (`WS_PATH=/socket.io`) is told what each setting means now.
    fn check_socketio_path(&self) -> Result<(), ConfigError> {
        let Some(socketio) = self.socketio_path() else {
            return Ok(());
        };
        if !socketio.starts_with('/') {
            return Err(ConfigError::new(
                "SOCKETIO_PATH",
                "must start with '/' (or be `off`)",
            ));
        }
        if socketio.starts_with("/api/")
            || socketio == "/api"
            || socketio == "/health"
            || socketio == "/metrics"
        {
            return Err(ConfigError::new(
                "SOCKETIO_PATH",
                "must not collide with the HTTP API",
            ));
        }
        let ws = self.ws_path.strip_suffix('/').unwrap_or(&self.ws_path);
        let under = |path: &str, base: &str| {
            path == base || base == "/" || path.starts_with(&format!("{base}/"))
        };
        if under(ws, socketio) || under(socketio, ws) {
            return Err(ConfigError::new(
                "WS_PATH",
                format!(
                    "WS_PATH={} and SOCKETIO_PATH={} share a path. The original's WS_PATH named its \
                     socket.io endpoint; here WS_PATH is the native WebSocket endpoint (default {}) and \
                     SOCKETIO_PATH the socket.io one (default {}). Remove WS_PATH from the environment \
                     (or set it to {}) to serve both, or set SOCKETIO_PATH to another path (or `off`)",
                    self.ws_path,
                    self.socketio_path,
                    defaults::WS_PATH,
                    defaults::SOCKETIO_PATH,
                    defaults::WS_PATH,
                ),
            ));
        }
        Ok(())
    }

    /// Checks the settings that clap cannot: every error names its variable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.ws_path.starts_with('/') {
            return Err(ConfigError::new("WS_PATH", "must start with '/'"));
        }
        if self.ws_path.starts_with("/api/") || self.ws_path == "/health" {
            return Err(ConfigError::new(
                "WS_PATH",
                "must not collide with the HTTP API",
            ));
        }
        self.check_socketio_path()?;
        if self.ping_interval_ms == 0 {
            return Err(ConfigError::new(
                "WS_PING_INTERVAL",
                "must be at least 1 ms",
            ));
        }
        if self.ping_timeout_ms < self.ping_interval_ms {
            return Err(ConfigError::new(
                "WS_PING_TIMEOUT",
                "must be at least WS_PING_INTERVAL",
            ));
        }
        if self.jwt_leeway_ms > 60_000 {
            return Err(ConfigError::new("JWT_LEEWAY_MS", "must be at most 60000"));
        }
        if self.max_frame_bytes < 1024 {
            return Err(ConfigError::new(
                "WS_MAX_FRAME_BYTES",
                "must be at least 1024",
            ));
        }
        if self.ws_read_buffer_bytes < 256 {
            return Err(ConfigError::new(
                "WS_READ_BUFFER_BYTES",
                "must be at least 256",
            ));
        }
        if self.ws_send_queue == 0 {
            return Err(ConfigError::new("WS_SEND_QUEUE", "must be at least 1"));
        }
        if self.event_bus_batch_size == 0 {
            return Err(ConfigError::new(
                "EVENT_BUS_BATCH_SIZE",
                "must be at least 1",
            ));
        }
        if self.http_header_timeout_ms == 0 {
            return Err(ConfigError::new(
                "HTTP_HEADER_TIMEOUT",
                "must be at least 1 ms",
            ));
        }
        if self.http_idle_timeout_ms == 0 {
            return Err(ConfigError::new(
                "HTTP_IDLE_TIMEOUT",
                "must be at least 1 ms",
            ));
        }
        if self.max_rooms_per_user == 0 {
            return Err(ConfigError::new("MAX_ROOMS_PER_USER", "must be at least 1"));
        }
        if self.http_body_timeout_ms == 0 {
            return Err(ConfigError::new(
                "HTTP_BODY_TIMEOUT",
                "must be at least 1 ms",
            ));
        }
        if self.http_max_connections == Some(0) {
            return Err(ConfigError::new(
                "HTTP_MAX_CONNECTIONS",
                "must be at least 1",
            ));
        }
        if self.maintenance_interval_ms == 0 {
            return Err(ConfigError::new(
                "MAINTENANCE_INTERVAL_MS",
                "must be at least 1 ms",
            ));
        }
        if let Some(url) = &self.database_url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(ConfigError::new(
                "DATABASE_URL",
                "must be a postgres:// or postgresql:// URL (unset: SQLite in DATA_DIR)",
            ));
        }
        if self.database_pool_size < 2 {
            return Err(ConfigError::new("DATABASE_POOL_SIZE", "must be at least 2"));
        }
        if self.database_statement_timeout_ms == 0 {
            return Err(ConfigError::new(
                "DATABASE_STATEMENT_TIMEOUT_MS",
                "must be at least 1 ms",
            ));
        }
        if self.cluster_catch_up_ms == 0 {
            return Err(ConfigError::new(
                "CLUSTER_CATCH_UP_MS",
                "must be at least 1 ms",
            ));
        }
        if self.chaos && self.mode == Mode::Production {
            return Err(ConfigError::new(
                "CHAOS",
                "the chaos layer is for development only: not with WEBWAKA_MODE=production",
            ));
        }
        if let Some(secret) = &self.jwt_secret
            && secret.len() < crate::auth::MIN_SECRET_BYTES
        {
            return Err(ConfigError::new(
                "JWT_SECRET",
                format!(
                    "must be at least {} bytes long",
                    crate::auth::MIN_SECRET_BYTES
                ),
            ));
        }
        self.parsed_room_policy()?;
        self.type_strategies()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn room_policy_reserves_prefixes() {
        let policy = RoomPolicy::parse("admin:=admin;ops:=admin|ops").unwrap();
        let ops = vec!["ops".to_owned()];
        assert!(policy.allows("ops:pager", &ops));
        assert!(!policy.allows("admin:keys", &ops));
        assert!(policy.allows("lobby", &[]));
        assert!(RoomPolicy::parse("nonsense").is_err());
        assert!(RoomPolicy::parse("").unwrap().rules().is_empty());
    }

    #[test]
    fn defaults_validate() {
        Config::new("x").validate().unwrap();
        let mut config = Config::new("x");
        config.reconciliation_type_strategies = "task=FIELD_LEVEL_MERGE;n=manual".into();
        assert_eq!(config.type_strategies().unwrap().len(), 2);
        config.reconciliation_type_strategies = "task=NOPE".into();
        assert_eq!(
            config.validate().unwrap_err().name,
            "RECONCILIATION_TYPE_STRATEGIES"
        );
    }

    #[test]
    fn the_socketio_path_never_shares_the_ws_path() {
        let config = Config::new("x");
        assert_eq!(config.socketio_path(), Some("/socket.io"));
        let refused = |ws: &str, socketio: &str| {
            let mut config = Config::new("x");
            config.ws_path = ws.into();
            config.socketio_path = socketio.into();
            config.validate().err()
        };
        // The original's `.env`: WS_PATH=/socket.io.
        let error = refused("/socket.io", "/socket.io").unwrap();
        assert_eq!(error.name, "WS_PATH");
        assert!(error.message.contains("SOCKETIO_PATH"), "{error}");
        assert!(refused("/socket.io/", "/socket.io").is_some());
        assert!(refused("/rt", "/rt/sio").is_some(), "one under the other");
        assert!(refused("/rt/ws", "/rt").is_some(), "one under the other");
        assert!(
            refused("/", "/socket.io").is_some(),
            "everything is under /"
        );
        assert_eq!(refused("/ws", "api/x").unwrap().name, "SOCKETIO_PATH");
        assert_eq!(refused("/ws", "/api/sio").unwrap().name, "SOCKETIO_PATH");
        // Apart: fine; `off` (or empty) turns socket.io off, and any WS_PATH goes.
        assert!(refused("/ws", "/socket.io").is_none());
        assert!(
            refused("/wsx", "/ws").is_none(),
            "a shared prefix is not a shared path"
        );
        assert!(refused("/socket.io", "off").is_none());
        assert!(refused("/socket.io", "").is_none());
        let mut config = Config::new("x");
        config.socketio_path = "/sio/".into();
        assert_eq!(config.socketio_path(), Some("/sio"));
        config.socketio_path = " OFF ".into();
        assert_eq!(config.socketio_path(), None);
    }

    #[test]
    fn connection_settings_are_checked() {
        let config = Config::new("x");
        assert_eq!(config.http_header_timeout(), Duration::from_secs(10));
        assert_eq!(config.http_idle_timeout(), Duration::from_secs(60));
        assert_eq!(config.http_body_timeout(), Duration::from_secs(30));
        assert_eq!(config.http_max_connections, None);
        let refused = |tweak: fn(&mut Config)| {
            let mut config = Config::new("x");
            tweak(&mut config);
            config.validate().unwrap_err().name
        };
        assert_eq!(
            refused(|c| c.http_header_timeout_ms = 0),
            "HTTP_HEADER_TIMEOUT"
        );
        assert_eq!(refused(|c| c.http_idle_timeout_ms = 0), "HTTP_IDLE_TIMEOUT");
        assert_eq!(refused(|c| c.http_body_timeout_ms = 0), "HTTP_BODY_TIMEOUT");
        assert_eq!(refused(|c| c.max_rooms_per_user = 0), "MAX_ROOMS_PER_USER");
        assert_eq!(
            refused(|c| c.http_max_connections = Some(0)),
            "HTTP_MAX_CONNECTIONS"
        );
        assert_eq!(
            refused(|c| c.jwt_secret = Some("fifteen-bytes!!".into())),
            "JWT_SECRET"
        );
        let mut config = Config::new("x");
        config.http_max_connections = Some(1);
        config.jwt_secret = Some("sixteen-bytes!!!".into());
        config.validate().unwrap();
    }
}
