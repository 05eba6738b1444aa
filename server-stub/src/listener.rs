//! The accept loop, and each HTTP/1.1 connection until it ends or becomes a WebSocket
//! (in place of `axum::serve`, which gives a connection that never finishes its
//! request all the time it likes):
//!
//! - **The cap** (`HTTP_MAX_CONNECTIONS`, on top of `WS_MAX_CONNECTIONS`): a connection
//!   accepted while that many non-WebSocket connections are open is closed at once and
//!   counted (`shed`), so none waits in the kernel's backlog; the start of a run of them
//!   is logged. A connection leaves the count when it closes or is upgraded.
//! - **The header timeout** (`HTTP_HEADER_TIMEOUT`): a request's headers must be
//!   complete within it, counted from the accept (the first request) or from the first
//!   byte of a later request on a keep-alive connection. An upgrade request is a request
//!   like any other until its headers are in.
//! - **The idle timeout** (`HTTP_IDLE_TIMEOUT`): a keep-alive connection is closed when
//!   no byte of a next request came within it of the end of its last response.
//! - **The body timeout** (`HTTP_BODY_TIMEOUT`): while a handler waits for a request's
//!   body, a byte must come within it of the last one (or of the wait's start); past it
//!   the body fails, and the connection is closed once the handler has answered. A
//!   slow body that keeps coming is not cut.
//! - Otherwise nothing is timed while a request is in flight (its headers read, its
//!   response not yet sent in full): a handler may take its time. An upgraded WebSocket
//!   belongs to its own task (with its own ping timeout) from the upgrade on.
//!
//! hyper's own `header_read_timeout` is not used: on a keep-alive connection its timer
//! starts as soon as the previous response is written, so one value would bound the
//! idle wait and the header reading together and the two settings could not differ.
//! Instead [`Phase`], a pure state machine (events and the time in, a deadline out),
//! decides; the driver ([`drive`]) reads the deadline again each time hyper's
//! connection future returns `Pending`, since every event (bytes read, a request's
//! headers parsed, a response sent) happens inside that poll.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::Config;
use crate::metrics::Closed;

/// Descriptors kept for the process itself when the cap is derived: the listener, the
/// SQLite files of the writer, the checkpointer and each pooled reader (about 20), the
/// runtime's epoll and wake-up descriptors, the standard streams, log files.
const RESERVED_DESCRIPTORS: u64 = 64;
/// The derived cap is this share of the descriptors left: the rest is for WebSockets.
const HTTP_SHARE_DIVISOR: u64 = 4;
/// The smallest derived cap (a tiny descriptor limit still serves a few requests).
const MIN_DERIVED_HTTP_MAX: usize = 16;
/// The cap when the platform has no descriptor limit to derive it from.
const FALLBACK_HTTP_MAX: usize = 1024;
/// A log line about shedding or failing accepts is written at most this often.
const LOG_QUIET: Duration = Duration::from_secs(60);
/// Connections the system queues before the accept loop takes them (capped by the
/// system, on Linux at `net.core.somaxconn`). tokio's default is 128: a burst past it
/// (clients reconnecting after a restart) has its handshakes dropped, and each client
/// retries only a second later.
const LISTEN_BACKLOG: u32 = 1024;
/// Pause after an accept failed for want of resources (descriptors, memory): the
/// listener stays readable, so accepting again at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------
// The pure part: when a connection must be closed
// ---------------------------------------------------------------------------------

/// `HTTP_HEADER_TIMEOUT` and `HTTP_IDLE_TIMEOUT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timeouts {
    /// Time to send a request's complete headers.
    pub(crate) header: Duration,
    /// Time between the end of a response and the first byte of the next request.
    pub(crate) idle: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request's headers, since `since` (the accept, or the first byte after
    /// an idle wait).
    Headers { since: Instant },
    /// No request in flight since `since` (the end of the last response), nothing read
    /// since.
    Idle { since: Instant },
    /// Requests whose headers are in and whose responses are not yet sent in full.
    Busy { requests: u32 },
}

/// Where one connection stands between its requests, and so when it must be closed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Phase {
    state: State,
    timeouts: Timeouts,
}

impl Phase {
    /// A connection accepted at `now`: its first request's headers are due.
    pub(crate) fn accepted(now: Instant, timeouts: Timeouts) -> Self {
        Self {
            state: State::Headers { since: now },
            timeouts,
        }
    }

    /// Bytes arrived at `now`. After an idle wait they begin the next request, whose
    /// headers are due from now; otherwise they change nothing (more of the headers
    /// being read, which does not extend their time, or a request's body).
    pub(crate) fn bytes_read(&mut self, now: Instant) {
        if let State::Idle { .. } = self.state {
            self.state = State::Headers { since: now };
        }
    }

    /// A request's headers are complete (hyper hands it to the service).
    pub(crate) fn request_started(&mut self) {
        self.state = match self.state {
            State::Busy { requests } => State::Busy {
                requests: requests.saturating_add(1),
            },
            State::Headers { .. } | State::Idle { .. } => State::Busy { requests: 1 },
        };
    }

    /// A response was sent in full (or dropped) at `now`; with no other request in
    /// flight, the connection is idle from now.
    pub(crate) fn response_finished(&mut self, now: Instant) {
        if let State::Busy { requests } = self.state {
            self.state = if requests > 1 {
                State::Busy {
                    requests: requests - 1,
                }
            } else {
                State::Idle { since: now }
            };
        }
    }

    /// True while a request is in flight.
    pub(crate) fn is_busy(&self) -> bool {
        matches!(self.state, State::Busy { .. })
    }

    /// True while waiting for a next request (no byte of it yet).
    pub(crate) fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle { .. })
    }

    /// When the connection must be closed if nothing happens before, and why; `None`
    /// while a request is in flight.
    pub(crate) fn deadline(&self) -> Option<(Instant, Closed)> {
        match self.state {
            State::Headers { since } => Some((since + self.timeouts.header, Closed::HeaderTimeout)),
            State::Idle { since } => Some((since + self.timeouts.idle, Closed::IdleTimeout)),
            State::Busy { .. } => None,
        }
    }
}

/// When to log that connections are being shed: at the start of a run of them, and
/// not again within [`LOG_QUIET`], so that a flood (or a cap that fills and frees by
/// turns) writes a line, not one per connection.
#[derive(Debug, Default)]
struct ShedLog {
    shedding: bool,
    last_logged: Option<Instant>,
}

impl ShedLog {
    /// A connection was shed at `now`: whether to log it.
    fn shed(&mut self, now: Instant) -> bool {
        let starts = !std::mem::replace(&mut self.shedding, true);
        starts && quiet_over(&mut self.last_logged, now)
    }

    /// A connection was admitted: the run of shed ones is over.
    fn admitted(&mut self) {
        self.shedding = false;
    }
}

/// True (and `now` noted) when nothing was logged within [`LOG_QUIET`] before `now`.
fn quiet_over(last_logged: &mut Option<Instant>, now: Instant) -> bool {
    let over = last_logged.is_none_or(|at| now.saturating_duration_since(at) >= LOG_QUIET);
    if over {
        *last_logged = Some(now);
    }
    over
}

// ---------------------------------------------------------------------------------
// The limits and the count of open connections
// ---------------------------------------------------------------------------------

/// The limits on connections, fixed at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// The process's open-file limit (soft) at start-up, when the platform has one.
    pub descriptor_limit: Option<u64>,
    /// `HTTP_MAX_CONNECTIONS`: most connections open at once that are not WebSockets.
    pub http_max_connections: usize,
    /// True when `http_max_connections` was derived from `descriptor_limit` (the
    /// setting was not given).
    pub http_max_derived: bool,
    /// `WS_MAX_CONNECTIONS`.
    pub ws_max_connections: usize,
}

impl ConnectionLimits {
    /// The limits for `config` in a process that may open `descriptor_limit` files.
    pub fn new(config: &Config, descriptor_limit: Option<u64>) -> Self {
        let (http_max_connections, http_max_derived) = match config.http_max_connections {
            Some(max) => (max, false),
            None => (derived_http_max(descriptor_limit), true),
        };
        Self {
            descriptor_limit,
            http_max_connections,
            http_max_derived,
            ws_max_connections: config.max_connections,
        }
    }

    /// True when both caps together allow more connections than the process may open
    /// descriptors (past that, accepts fail until connections close).
    pub fn exceed_descriptors(&self) -> bool {
        self.descriptor_limit.is_some_and(|limit| {
            let caps = self
                .http_max_connections
                .saturating_add(self.ws_max_connections);
            u64::try_from(caps).unwrap_or(u64::MAX) > limit.saturating_sub(RESERVED_DESCRIPTORS)
        })
    }
}

/// The default `HTTP_MAX_CONNECTIONS`: a quarter of the descriptors left after
/// [`RESERVED_DESCRIPTORS`] (the other three quarters are for WebSockets), at least
/// [`MIN_DERIVED_HTTP_MAX`].
fn derived_http_max(descriptor_limit: Option<u64>) -> usize {
    match descriptor_limit {
        None => FALLBACK_HTTP_MAX,
        Some(limit) => {
            let share = limit.saturating_sub(RESERVED_DESCRIPTORS) / HTTP_SHARE_DIVISOR;
            usize::try_from(share)
                .unwrap_or(usize::MAX)
                .max(MIN_DERIVED_HTTP_MAX)
        }
    }
}

/// The process's open-file limit (the soft one), when the platform has one.
pub fn descriptor_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        rlimit::getrlimit(rlimit::Resource::NOFILE)
            .ok()
            .map(|(soft, _hard)| soft)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Raises the process's soft open-file limit to its hard limit (as Go's runtime does at
/// start), so that the caps derived from it are not those of a shell's default of 1024.
/// Returns the limit before and after; `None` where the platform has none.
pub fn raise_descriptor_limit() -> Option<io::Result<(u64, u64)>> {
    let before = descriptor_limit()?;
    Some(rlimit::increase_nofile_limit(u64::MAX).map(|after| (before, after)))
}

/// The non-WebSocket connections: how many are open, the limits, the shedding log.
pub(crate) struct Connections {
    open: AtomicUsize,
    limits: ConnectionLimits,
    timeouts: Timeouts,
    /// `HTTP_BODY_TIMEOUT`.
    body_timeout: Duration,
    shed_log: Mutex<ShedLog>,
}

impl Connections {
    /// The limits for `config`, with the descriptor limit the process has now.
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            open: AtomicUsize::new(0),
            limits: ConnectionLimits::new(config, descriptor_limit()),
            timeouts: Timeouts {
                header: config.http_header_timeout(),
                idle: config.http_idle_timeout(),
            },
            body_timeout: config.http_body_timeout(),
            shed_log: Mutex::new(ShedLog::default()),
        }
    }

    /// The limits, fixed at start-up.
    pub(crate) fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    /// Non-WebSocket connections open now.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// A place among the open connections, given back when dropped.
struct Admitted {
    app: Arc<App>,
}

/// Counts a connection in, or sheds it (counted, and logged at the start of a run)
/// when `HTTP_MAX_CONNECTIONS` are open.
fn admit(app: &Arc<App>) -> Option<Admitted> {
    let connections = &app.connections;
    let max = connections.limits.http_max_connections;
    // Only the accept loop adds, so the count cannot pass the cap between these.
    if connections.open.fetch_add(1, Ordering::AcqRel) >= max {
        connections.open.fetch_sub(1, Ordering::AcqRel);
        app.metrics.closed(Closed::Shed);
        if lock(&connections.shed_log).shed(Instant::now()) {
            tracing::warn!(
                http_max_connections = max,
                "HTTP_MAX_CONNECTIONS reached: closing new connections as they are accepted \
                 until some of the open ones end (webwaka_http_connections_closed_total \
                 {{reason=\"shed\"}} counts them; logged again at most once a minute)"
            );
        }
        return None;
    }
    lock(&connections.shed_log).admitted();
    app.metrics.http_connections.inc();
    Some(Admitted {
        app: Arc::clone(app),
    })
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.app.connections.open.fetch_sub(1, Ordering::AcqRel);
        self.app.metrics.http_connections.dec();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------
// The accept loop
// ---------------------------------------------------------------------------------

/// Binds `addr` (with `SO_REUSEADDR` where that is safe, as tokio does) and listens with
/// a backlog of [`LISTEN_BACKLOG`].
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // On Windows SO_REUSEADDR would let another process take the port over.
    #[cfg(not(windows))]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts connections until the server shuts down (`app.shutdown`), then waits for
/// the ones still open: an idle one or one still sending its headers closes at once,
/// one with a request in flight after its response. The caller bounds that wait
/// (`SHUTDOWN_GRACE_MS`) and drops this future past it, which closes every connection
/// left. Upgraded WebSockets are not among them: they close themselves (1001).
pub(crate) async fn serve(app: Arc<App>, listener: TcpListener, router: Router) {
    let mut connections = JoinSet::new();
    let mut accept_logged = None;
    loop {
        let accepted = tokio::select! {
            biased;
            () = app.shutdown.cancelled() => break,
            Some(joined) = connections.join_next() => {
                if let Err(error) = joined
                    && error.is_panic()
                {
                    tracing::error!(%error, "a connection's task panicked");
                }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) if is_connection_error(&error) => continue,
            Err(error) => {
                // Out of descriptors or memory: the connection waits in the backlog
                // until something closes.
                if quiet_over(&mut accept_logged, Instant::now()) {
                    tracing::warn!(%error, "accepting connections fails; retrying");
                }
                tokio::select! {
                    () = app.shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Some(admitted) = admit(&app) else {
            drop(stream); // closed at once: not left in the backlog
            continue;
        };
        // Small frames must leave at once: no Nagle delay on accepted connections.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        connections.spawn(connection(
            Arc::clone(&app),
            router.clone(),
            stream,
            admitted,
        ));
    }
    drop(listener); // stop accepting: new connections are refused by the system
    while connections.join_next().await.is_some() {}
}

/// Errors of one connection that came and went before it was accepted.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

// ---------------------------------------------------------------------------------
// One connection
// ---------------------------------------------------------------------------------

/// A connection's [`Phase`], shared by its socket (bytes read), its service (requests
/// and responses) and its driver (the deadline).
struct Tracker {
    phase: Mutex<Phase>,
    /// Mirrors `phase.is_idle()`, so that a read costs one atomic load unless it begins
    /// a request (an upgraded WebSocket keeps reading through this socket for its life).
    idle: AtomicBool,
    /// `HTTP_BODY_TIMEOUT`.
    body_timeout: Duration,
    /// Set when a request's body sent nothing for `body_timeout`: the connection is
    /// closed once no request is in flight.
    body_stalled: AtomicBool,
}

impl Tracker {
    fn phase(&self) -> Phase {
        *lock(&self.phase)
    }

    fn bytes_read(&self) {
        if self.idle.load(Ordering::Relaxed) {
            let mut phase = lock(&self.phase);
            phase.bytes_read(Instant::now());
            self.idle.store(phase.is_idle(), Ordering::Relaxed);
        }
    }

    fn request_started(&self) {
        let mut phase = lock(&self.phase);
        phase.request_started();
        self.idle.store(phase.is_idle(), Ordering::Relaxed);
    }

    fn response_finished(&self) {
        let mut phase = lock(&self.phase);
        phase.response_finished(Instant::now());
        self.idle.store(phase.is_idle(), Ordering::Relaxed);
    }

    fn body_stalled(&self) -> bool {
        self.body_stalled.load(Ordering::Relaxed)
    }
}

/// The connection served by hyper, upgrades included.
type Conn = http1::UpgradeableConnection<TokioIo<Watched>, Service>;

/// How a connection's driver ended.
enum End {
    /// hyper finished: the peer closed, an error, or an upgrade (the socket now belongs
    /// to the WebSocket's task).
    Done(Result<(), hyper::Error>),
    /// A timeout passed.
    Expired(Closed),
    /// The server is shutting down and no request was in flight.
    Shutdown,
}

/// Serves one accepted connection until it ends, is upgraded, or times out.
async fn connection(app: Arc<App>, router: Router, stream: TcpStream, admitted: Admitted) {
    let timeouts = app.connections.timeouts;
    let tracker = Arc::new(Tracker {
        phase: Mutex::new(Phase::accepted(Instant::now(), timeouts)),
        idle: AtomicBool::new(false),
        body_timeout: app.connections.body_timeout,
        body_stalled: AtomicBool::new(false),
    });
    let io = TokioIo::new(Watched {
        stream,
        tracker: Arc::clone(&tracker),
    });
    let service = Service {
        router,
        tracker: Arc::clone(&tracker),
    };
    let mut builder = http1::Builder::new();
    // The timeouts are this module's (see its comment), so hyper needs no timer.
    builder.header_read_timeout(None);
    let conn = builder.serve_connection(io, service).with_upgrades();
    let expired = match drive(conn, &tracker, &app.shutdown).await {
        End::Done(Ok(())) | End::Shutdown => None,
        End::Done(Err(error)) => {
            tracing::debug!(%error, "HTTP connection failed");
            None
        }
        End::Expired(why) => Some(why),
    };
    // hyper may close the connection itself after the answer to a failed body.
    let expired = expired.or(tracker.body_stalled().then_some(Closed::BodyTimeout));
    if let Some(why) = expired {
        app.metrics.closed(why);
        tracing::debug!(?why, "HTTP connection closed by a timeout");
    }
    // Dropping the connection closed the socket (unless it was upgraded).
    drop(admitted);
}

/// Polls hyper's connection, the shutdown signal and the connection's deadline.
async fn drive(conn: Conn, tracker: &Tracker, shutdown: &CancellationToken) -> End {
    let mut conn = pin!(conn);
    let mut stop = pin!(shutdown.cancelled());
    let mut timer = pin!(tokio::time::sleep_until(Instant::now()));
    let mut armed: Option<Instant> = None;
    let mut draining = false;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(result) = conn.as_mut().poll(cx) {
            return Poll::Ready(End::Done(result));
        }
        if !draining && stop.as_mut().poll(cx).is_ready() {
            draining = true;
            if !tracker.phase().is_busy() {
                return Poll::Ready(End::Shutdown);
            }
            // Let the request in flight finish; hyper closes after its response.
            conn.as_mut().graceful_shutdown();
            if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                return Poll::Ready(End::Done(result));
            }
        }
        // hyper's poll above delivered every event: the deadline is current.
        let phase = tracker.phase();
        if tracker.body_stalled() && !phase.is_busy() {
            // The handler answered the request whose body stalled: close.
            return Poll::Ready(End::Expired(Closed::BodyTimeout));
        }
        let Some((at, why)) = phase.deadline() else {
            return Poll::Pending;
        };
        if armed != Some(at) {
            timer.as_mut().reset(at);
            armed = Some(at);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(End::Expired(why)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// The accepted socket, telling its tracker when bytes arrive.
struct Watched {
    stream: TcpStream,
    tracker: Arc<Tracker>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.tracker.bytes_read();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// axum's router as hyper's service, telling the tracker when a request starts and
/// when its response is done.
#[derive(Clone)]
struct Service {
    router: Router,
    tracker: Arc<Tracker>,
}

type ServiceFuture =
    Pin<Box<dyn Future<Output = Result<Response<TrackedBody>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = ServiceFuture;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.tracker.request_started();
        let request = request.map(|body| RequestBody {
            body,
            stall: None,
            armed: false,
            tracker: Arc::clone(&self.tracker),
        });
        // Dropped with the response's body once it is sent, or with this future if the
        // connection ends first.
        let in_flight = InFlight(Arc::clone(&self.tracker));
        // A `Router` is always ready (its `poll_ready` is `Ready(Ok)`), so it is called
        // without waiting, as `axum::serve` does.
        let response = tower_service::Service::call(&mut self.router.clone(), request);
        Box::pin(async move {
            let Ok(response) = response.await;
            Ok(response.map(|body| TrackedBody {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

/// Why a request's body failed.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    /// Reading it from the connection failed.
    #[error(transparent)]
    Read(#[from] hyper::Error),
    /// Nothing came for `HTTP_BODY_TIMEOUT` while it was awaited.
    #[error("the request body sent nothing for {0:?} (HTTP_BODY_TIMEOUT)")]
    Stalled(Duration),
}

/// A request's body, failing when nothing comes for `HTTP_BODY_TIMEOUT` while it is
/// awaited (polled and pending); each frame restarts that time. A body nobody polls is
/// not timed: the server, not the peer, is then what the request waits for.
struct RequestBody {
    body: Incoming,
    /// The stall timer, allocated the first time the body is awaited.
    stall: Option<Pin<Box<Sleep>>>,
    /// True while `stall` runs for the current wait (no frame since it was set).
    armed: bool,
    tracker: Arc<Tracker>,
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let timeout = this.tracker.body_timeout;
        if this.tracker.body_stalled() {
            return Poll::Ready(Some(Err(BodyError::Stalled(timeout))));
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            this.armed = false;
            return Poll::Ready(frame.map(|result| result.map_err(BodyError::from)));
        }
        let deadline = Instant::now() + timeout;
        let stall = this
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !this.armed {
            stall.as_mut().reset(deadline);
            this.armed = true;
        }
        match stall.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.tracker.body_stalled.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(BodyError::Stalled(timeout))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Marks a request in flight until dropped.
struct InFlight(Arc<Tracker>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.response_finished();
    }
}

/// A response body that ends its request's time in flight when hyper drops it (at its
/// end, or with the connection).
struct TrackedBody {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    const TIMEOUTS: Timeouts = Timeouts {
        header: Duration::from_millis(10_000),
        idle: Duration::from_millis(60_000),
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_new_connection_has_the_header_timeout_from_its_accept() {
        let t0 = Instant::now();
        let mut phase = Phase::accepted(t0, TIMEOUTS);
        assert_eq!(
            phase.deadline(),
            Some((t0 + ms(10_000), Closed::HeaderTimeout))
        );
        // Bytes of the headers dripping in do not extend it.
        phase.bytes_read(t0 + ms(9_000));
        assert_eq!(
            phase.deadline(),
            Some((t0 + ms(10_000), Closed::HeaderTimeout))
        );
    }

    #[test]
    fn keep_alive_waits_the_idle_timeout_then_the_header_timeout() {
        let t0 = Instant::now();
        let mut phase = Phase::accepted(t0, TIMEOUTS);
        phase.request_started();
        assert_eq!(phase.deadline(), None, "no timeout while in flight");
        phase.response_finished(t0 + ms(500));
        assert!(phase.is_idle());
        assert_eq!(
            phase.deadline(),
            Some((t0 + ms(60_500), Closed::IdleTimeout))
        );
        // The first byte of the next request: its headers are due 10 s later.
        phase.bytes_read(t0 + ms(30_000));
        assert_eq!(
            phase.deadline(),
            Some((t0 + ms(40_000), Closed::HeaderTimeout))
        );
        phase.request_started();
        phase.response_finished(t0 + ms(31_000));
        assert_eq!(
            phase.deadline(),
            Some((t0 + ms(91_000), Closed::IdleTimeout))
        );
    }

    #[test]
    fn the_shed_log_writes_the_start_of_a_run_at_most_once_a_minute() {
        let t0 = Instant::now();
        let mut log = ShedLog::default();
        assert!(log.shed(t0));
        assert!(!log.shed(t0 + ms(1)), "the same run");
        log.admitted();
        assert!(!log.shed(t0 + ms(10_000)), "a new run within the minute");
        log.admitted();
        assert!(log.shed(t0 + ms(61_000)), "a new run after it");
        assert!(!log.shed(t0 + ms(200_000)), "still the same run");
    }

    #[test]
    fn the_derived_cap_is_a_quarter_of_the_descriptors_left() {
        assert_eq!(derived_http_max(Some(20_000)), 4_984);
        assert_eq!(derived_http_max(Some(1_024)), 240);
        assert_eq!(derived_http_max(Some(10)), MIN_DERIVED_HTTP_MAX);
        assert_eq!(derived_http_max(None), FALLBACK_HTTP_MAX);
        let mut config = Config::new("x");
        let limits = ConnectionLimits::new(&config, Some(20_000));
        assert!(limits.http_max_derived);
        assert!(limits.exceed_descriptors(), "50,000 WebSockets + 4,984");
        config.max_connections = 10_000;
        config.http_max_connections = Some(100);
        let limits = ConnectionLimits::new(&config, Some(20_000));
        assert_eq!(
            (limits.http_max_connections, limits.http_max_derived),
            (100, false)
        );
        assert!(!limits.exceed_descriptors());
    }

    /// One event of a connection's life, `.0` ms after the previous one.
    #[derive(Debug, Clone)]
    enum Event {
        Read(u64),
        Request(u64),
        Response(u64),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (0..20_000u64).prop_map(Event::Read),
            (0..20_000u64).prop_map(Event::Request),
            (0..20_000u64).prop_map(Event::Response),
        ]
    }

    proptest! {
        /// Whatever happens, in whatever order: no deadline while a request is in
        /// flight; otherwise one that is never further than a timeout from the last
        /// event, and that bytes of headers never push back.
        #[test]
        fn deadlines_are_bounded_and_absent_only_in_flight(
            events in proptest::collection::vec(event(), 0..60),
        ) {
            let t0 = Instant::now();
            let mut phase = Phase::accepted(t0, TIMEOUTS);
            let mut now = t0;
            let mut in_flight: u32 = 0;
            for event in events {
                let before = phase.deadline();
                match event {
                    Event::Read(dt) => {
                        now += ms(dt);
                        phase.bytes_read(now);
                        if let Some((at, Closed::HeaderTimeout)) = before {
                            prop_assert_eq!(phase.deadline(), Some((at, Closed::HeaderTimeout)));
                        }
                    }
                    Event::Request(dt) => {
                        now += ms(dt);
                        phase.request_started();
                        in_flight += 1;
                    }
                    Event::Response(dt) => {
                        now += ms(dt);
                        phase.response_finished(now);
                        in_flight = in_flight.saturating_sub(1);
                    }
                }
                prop_assert_eq!(phase.is_busy(), in_flight > 0);
                match phase.deadline() {
                    None => prop_assert!(in_flight > 0),
                    Some((at, Closed::HeaderTimeout)) => {
                        prop_assert!(at <= now + TIMEOUTS.header);
                    }
                    Some((at, Closed::IdleTimeout)) => {
                        prop_assert!(phase.is_idle());
                        prop_assert!(at <= now + TIMEOUTS.idle);
                    }
                    Some((_, Closed::Shed | Closed::BodyTimeout)) => {
                        prop_assert!(false, "never a deadline")
                    }
                }
            }
        }
    }
}
