//! Prometheus metrics (`GET /metrics`), with `prometheus-client`: one registry per
//! server, so that several servers in one process (tests) never share counters.
//!
//! Counters are bumped where things happen; figures that live in the database
//! (consumer lag, DLQ size, log length) are read when scraped.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A metric's labels.
pub(crate) type Labels = Vec<(String, String)>;

/// Every metric of the server.
pub(crate) struct Metrics {
    registry: Mutex<Registry>,
    /// Open WebSocket connections.
    pub(crate) active_connections: Gauge,
    /// Messages accepted, by transport (`ws`, `http`).
    pub(crate) messages_in: Family<Labels, Counter>,
    /// Frames queued to connections (messages, events, presence).
    pub(crate) messages_out: Counter,
    /// Time to accept a message (decode, store, fan out, ack), seconds.
    pub(crate) message_latency: Histogram,
    /// Events appended to the log (messages included).
    pub(crate) events_published: Counter,
    /// Events handed out, by path (`ws`, `resume`, `poll`, `claim`).
    pub(crate) events_delivered: Family<Labels, Counter>,
    /// Events not yet acked per consumer group (read at scrape).
    pub(crate) consumer_lag: Family<Labels, Gauge>,
    /// Entries in the dead-letter queue (read at scrape).
    pub(crate) dlq_size: Gauge,
    /// Events in the log (read at scrape).
    pub(crate) log_length: Gauge,
    /// Reconciliation requests handled.
    pub(crate) reconciliation_requests: Counter,
    /// Conflicts detected by reconciliation.
    pub(crate) reconciliation_conflicts: Counter,
    /// Requests refused by a rate limit, by limit.
    pub(crate) rate_limit_refusals: Family<Labels, Counter>,
    /// Requests refused with TENANT_VIOLATION.
    pub(crate) tenant_violations: Counter,
    /// Requests refused with AUTH_FAILED.
    pub(crate) auth_failures: Counter,
    /// WebSocket upgrades refused with SERVER_FULL.
    pub(crate) server_full: Counter,
    /// Polls answered (`GET /api/events`).
    pub(crate) polls: Counter,
    /// Errors answered, whatever their code (HTTP, WebSocket and socket.io).
    pub(crate) errors: Counter,
    /// Class D transactions, by outcome (`submitted`, `confirmed`, `rejected`).
    pub(crate) transactions: Family<Labels, Counter>,
    /// Pages of the log read for polls and resumes, by source (`tail`: memory,
    /// `storage`).
    pub(crate) log_reads: Family<Labels, Counter>,
    /// Reads of the log by the feed to fill a gap in what it delivered live (another
    /// instance's events whose notification was lost or too large).
    pub(crate) feed_catch_up_reads: Counter,
    /// Notifications heard from the database (PostgreSQL: every instance's appends and
    /// membership changes).
    pub(crate) cluster_notices: Counter,
    /// Times the connection listening to the other instances was made again.
    pub(crate) cluster_reconnects: Counter,
    /// The database connection pool (PostgreSQL), read at scrape: `size`, `idle`,
    /// `waiting`.
    pub(crate) db_pool: Family<Labels, Gauge>,
    /// Open connections that are not WebSockets (yet): HTTP requests, keep-alive
    /// connections, handshakes, and connections that never sent a request.
    pub(crate) http_connections: Gauge,
    /// Connections the server closed, by reason: `header_timeout`
    /// (`HTTP_HEADER_TIMEOUT`), `idle_timeout` (`HTTP_IDLE_TIMEOUT`), `body_timeout`
    /// (`HTTP_BODY_TIMEOUT`), `shed` (`HTTP_MAX_CONNECTIONS` reached: closed at accept).
    pub(crate) http_connections_closed: Family<Labels, Counter>,
    /// The hot label sets, resolved once (a family lookup per message hashes and
    /// allocates its labels): `messages_in` for `ws` and `http`, `events_delivered` for
    /// `ws`, `resume`, `poll`, `claim`.
    hot: Hot,
}

/// Handles on the counters bumped for every message (they share the family's values).
struct Hot {
    in_ws: Counter,
    in_http: Counter,
    delivered_ws: Counter,
    delivered_resume: Counter,
    delivered_poll: Counter,
    delivered_claim: Counter,
    read_tail: Counter,
    read_sqlite: Counter,
    closed_header_timeout: Counter,
    closed_idle_timeout: Counter,
    closed_body_timeout: Counter,
    closed_shed: Counter,
}

/// Why the server closed a connection that was not a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    /// Its request headers were not complete within `HTTP_HEADER_TIMEOUT`.
    HeaderTimeout,
    /// It sent no request within `HTTP_IDLE_TIMEOUT` of its last response.
    IdleTimeout,
    /// Its request's body sent nothing for `HTTP_BODY_TIMEOUT` while it was awaited.
    BodyTimeout,
    /// `HTTP_MAX_CONNECTIONS` were open when it was accepted.
    Shed,
}

/// One label pair.
pub(crate) fn label(key: &str, value: &str) -> Labels {
    vec![(key.to_owned(), value.to_owned())]
}

impl Metrics {
    /// A registry with every metric at zero.
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("webwaka");
        let messages_in: Family<Labels, Counter> = Family::default();
        let events_delivered: Family<Labels, Counter> = Family::default();
        let log_reads: Family<Labels, Counter> = Family::default();
        let http_connections_closed: Family<Labels, Counter> = Family::default();
        let resolve = |family: &Family<Labels, Counter>, key, value| {
            family.get_or_create(&label(key, value)).clone()
        };
        let hot = Hot {
            in_ws: resolve(&messages_in, "transport", "ws"),
            in_http: resolve(&messages_in, "transport", "http"),
            delivered_ws: resolve(&events_delivered, "via", "ws"),
            delivered_resume: resolve(&events_delivered, "via", "resume"),
            delivered_poll: resolve(&events_delivered, "via", "poll"),
            delivered_claim: resolve(&events_delivered, "via", "claim"),
            read_tail: resolve(&log_reads, "source", "tail"),
            read_sqlite: resolve(&log_reads, "source", "storage"),
            closed_header_timeout: resolve(&http_connections_closed, "reason", "header_timeout"),
            closed_idle_timeout: resolve(&http_connections_closed, "reason", "idle_timeout"),
            closed_body_timeout: resolve(&http_connections_closed, "reason", "body_timeout"),
            closed_shed: resolve(&http_connections_closed, "reason", "shed"),
        };
        let m = Self {
            registry: Mutex::new(Registry::default()),
            active_connections: Gauge::default(),
            messages_in,
            messages_out: Counter::default(),
            message_latency: Histogram::new(exponential_buckets(0.000_025, 2.0, 18)),
            events_published: Counter::default(),
            events_delivered,
            consumer_lag: Family::default(),
            dlq_size: Gauge::default(),
            log_length: Gauge::default(),
            reconciliation_requests: Counter::default(),
            reconciliation_conflicts: Counter::default(),
            rate_limit_refusals: Family::default(),
            tenant_violations: Counter::default(),
            auth_failures: Counter::default(),
            server_full: Counter::default(),
            polls: Counter::default(),
            errors: Counter::default(),
            transactions: Family::default(),
            log_reads,
            feed_catch_up_reads: Counter::default(),
            cluster_notices: Counter::default(),
            cluster_reconnects: Counter::default(),
            db_pool: Family::default(),
            http_connections: Gauge::default(),
            http_connections_closed,
            hot,
        };
        registry.register(
            "ws_active_connections",
            "Open WebSocket connections",
            m.active_connections.clone(),
        );
        registry.register(
            "messages_in",
            "Messages accepted, by transport",
            m.messages_in.clone(),
        );
        registry.register(
            "log_reads",
            "Pages of the log read for polls and resumes, by source (tail: memory, storage)",
            m.log_reads.clone(),
        );
        registry.register(
            "cluster_notices",
            "Notifications heard from the database (other instances' appends and changes)",
            m.cluster_notices.clone(),
        );
        registry.register(
            "cluster_reconnects",
            "Times the connection listening to the other instances was made again",
            m.cluster_reconnects.clone(),
        );
        registry.register(
            "db_pool_connections",
            "Database connections of the pool, by state (size, idle, waiting)",
            m.db_pool.clone(),
        );
        registry.register(
            "feed_catch_up_reads",
            "Reads of the log to fill a gap in what was delivered live",
            m.feed_catch_up_reads.clone(),
        );
        registry.register(
            "messages_out",
            "Frames queued to WebSocket connections",
            m.messages_out.clone(),
        );
        registry.register(
            "message_latency_seconds",
            "Time to accept a message: decode, store, fan out, acknowledge",
            m.message_latency.clone(),
        );
        registry.register(
            "events_published",
            "Events appended to the durable log",
            m.events_published.clone(),
        );
        registry.register(
            "events_delivered",
            "Durable events handed out, by path",
            m.events_delivered.clone(),
        );
        registry.register(
            "consumer_lag",
            "Events not yet acknowledged, per consumer group",
            m.consumer_lag.clone(),
        );
        registry.register("dlq_size", "Dead-letter queue entries", m.dlq_size.clone());
        registry.register(
            "log_length",
            "Events in the durable log",
            m.log_length.clone(),
        );
        registry.register(
            "reconciliation_requests",
            "Reconciliation requests handled",
            m.reconciliation_requests.clone(),
        );
        registry.register(
            "reconciliation_conflicts",
            "Conflicts detected by reconciliation",
            m.reconciliation_conflicts.clone(),
        );
        registry.register(
            "rate_limit_refusals",
            "Requests refused by a rate limit",
            m.rate_limit_refusals.clone(),
        );
        registry.register(
            "tenant_violations",
            "Requests refused for naming another tenant",
            m.tenant_violations.clone(),
        );
        registry.register(
            "auth_failures",
            "Requests refused for a bad or missing token",
            m.auth_failures.clone(),
        );
        registry.register(
            "server_full",
            "WebSocket upgrades refused because the server was full",
            m.server_full.clone(),
        );
        registry.register("polls", "Polls answered", m.polls.clone());
        registry.register("errors", "Errors answered, of any code", m.errors.clone());
        registry.register(
            "transactions",
            "Class D transactions by outcome",
            m.transactions.clone(),
        );
        registry.register(
            "http_connections",
            "Open connections that are not WebSockets (yet)",
            m.http_connections.clone(),
        );
        registry.register(
            "http_connections_closed",
            "Connections closed by the server: header_timeout, idle_timeout, body_timeout, shed (HTTP_MAX_CONNECTIONS reached)",
            m.http_connections_closed.clone(),
        );
        // Families appear in the exposition once a label set exists: create the known
        // ones so that every metric is visible from the start.
        for transport in ["ws", "http"] {
            let _ = m.messages_in.get_or_create(&label("transport", transport));
        }
        for via in ["ws", "resume", "poll", "claim"] {
            let _ = m.events_delivered.get_or_create(&label("via", via));
        }
        for limit in ["messages", "poll", "reconciliation", "publish"] {
            let _ = m.rate_limit_refusals.get_or_create(&label("limit", limit));
        }
        for outcome in ["submitted", "confirmed", "rejected"] {
            let _ = m.transactions.get_or_create(&label("outcome", outcome));
        }
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = registry;
        m
    }

    /// Counts a message accepted over `transport` (`ws`, `http`).
    pub(crate) fn message_in(&self, transport: &str) {
        match transport {
            "ws" => self.hot.in_ws.inc(),
            "http" => self.hot.in_http.inc(),
            other => self
                .messages_in
                .get_or_create(&label("transport", other))
                .inc(),
        };
    }

    /// The totals the dashboard's charts are drawn from when a page opens: open
    /// WebSockets, messages accepted (every transport), polls, errors.
    pub(crate) fn chart_totals(&self) -> (i64, u64, u64, u64) {
        let socketio = self
            .messages_in
            .get_or_create(&label("transport", crate::socketio::TRANSPORT))
            .get();
        (
            self.active_connections.get(),
            self.hot.in_ws.get() + self.hot.in_http.get() + socketio,
            self.polls.get(),
            self.errors.get(),
        )
    }

    /// Counts `n` durable events handed out `via` (`ws`, `resume`, `poll`, `claim`).
    pub(crate) fn delivered(&self, via: &str, n: u64) {
        match via {
            "ws" => self.hot.delivered_ws.inc_by(n),
            "resume" => self.hot.delivered_resume.inc_by(n),
            "poll" => self.hot.delivered_poll.inc_by(n),
            "claim" => self.hot.delivered_claim.inc_by(n),
            other => self
                .events_delivered
                .get_or_create(&label("via", other))
                .inc_by(n),
        };
    }

    /// Counts a page of the log read from the recent tail (`true`) or from SQLite.
    pub(crate) fn log_read(&self, from_tail: bool) {
        if from_tail {
            self.hot.read_tail.inc();
        } else {
            self.hot.read_sqlite.inc();
        }
    }

    /// Counts a connection the server closed, and why.
    pub(crate) fn closed(&self, why: Closed) {
        match why {
            Closed::HeaderTimeout => self.hot.closed_header_timeout.inc(),
            Closed::IdleTimeout => self.hot.closed_idle_timeout.inc(),
            Closed::BodyTimeout => self.hot.closed_body_timeout.inc(),
            Closed::Shed => self.hot.closed_shed.inc(),
        };
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn encode(&self) -> String {
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        if let Err(error) = encode(&mut out, &registry) {
            tracing::warn!(%error, "encoding metrics failed");
        }
        out
    }
}
