//! The connection state machine: which transport the client uses, and when it retries.
//!
//! Sans-IO, in the manner of `quinn-proto`: the [`Machine`] owns no socket and reads no
//! clock. The driver (the client's supervisor task) feeds it what happened (`on_*`
//! methods, hints from the host app, timer expiries through [`Machine::handle_timeout`])
//! with the current time, and carries out the [`Action`]s it returns through
//! [`Machine::poll_action`]: open the WebSocket, poll, resync, refresh the token, flush the
//! outbox, and tell the app about each [`StateChange`]. [`Machine::poll_timeout`] says
//! when to call back. Every path and every timing is therefore testable without sleeping.
//!
//! ## States
//!
//! ```text
//!                 start / retry timer / network or foreground hint
//!   Offline ───────────────────────────────────────────────▶ Connecting
//!   Suspended ─────────────────────────────────────────────▶ Connecting
//!   Connecting ── WebSocket open ──────────────────────────▶ Realtime
//!   Connecting ── WebSocket failed or slow, HTTP works ────▶ Polling
//!   Connecting ── WebSocket and HTTP failed ───────────────▶ Offline (backoff)
//!   Realtime ──── socket lost or heartbeat lost ───────────▶ Connecting
//!   Realtime ──── server going away / full ────────────────▶ Offline (backoff)
//!   Polling ───── WebSocket probe succeeded ───────────────▶ Realtime
//!   Polling ───── HTTP failing ────────────────────────────▶ Offline (backoff)
//!   Realtime, Polling ── cursor expired ───────────────────▶ Resyncing ── done ──▶ back
//!   Offline ───── offline longer than `suspend_after` ─────▶ Suspended (slow retries)
//!   any ─── fresh tokens refused 3× in a row / no token ───▶ AuthFailed (until a new token)
//!   any ───────── shutdown ────────────────────────────────▶ Closed
//! ```
//!
//! `docs/client.md` has the full transition table.
//!
//! ## Choices worth knowing
//!
//! - One WebSocket attempt at a time, one poll at a time, one token refresh at a time:
//!   the machine never asks for a second while the first is outstanding, so a client has
//!   exactly one reconnect loop.
//! - Falling down is fast: a refused WebSocket, or one slower than `slow_connect`, makes
//!   the machine try HTTP at once; HTTP working means Polling.
//! - Climbing up is careful: while Polling, the WebSocket is probed on its own backoff,
//!   which is only reset after Realtime has held for `stable_after` (hysteresis: a
//!   flapping network does not bounce between transports).
//! - Retry delays use full jitter, so that many clients losing one server do not come
//!   back at the same instant; a network-available or foreground hint from the host app
//!   retries at once with a fresh schedule.

// Time and counters here are fed from outside (the server, the app): no operator that
// can overflow or panic.
#![warn(clippy::arithmetic_side_effects)]

mod backoff;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use backoff::Backoff;
pub(crate) use backoff::item_delay;

/// Fresh tokens refused one after the other, with no request accepted in between,
/// before the client gives up with [`ConnectionState::AuthFailed`].
pub const MAX_UNPROVEN_REFRESHES: u32 = 3;

/// The longest wait taken from a server's hint (`Retry-After`, `retryAfterMs`,
/// `pingInterval`): a longer one is a broken or hostile server, not a plan.
pub const MAX_SERVER_DELAY: Duration = Duration::from_secs(3600);

/// The shortest wait taken from a server's retry hint: `0` would make a retry loop hot.
pub const MIN_SERVER_DELAY: Duration = Duration::from_millis(500);

/// The shortest heartbeat interval taken from the server (`connected.pingInterval`).
pub const MIN_SERVER_PING_INTERVAL: Duration = Duration::from_secs(1);

/// The least time a request of the app's in the background keeps the client up (to
/// connect and hand the work over), whatever `background_linger` says: with a linger
/// of zero the client would park again before its connection opened.
pub const APP_REQUEST_MIN_LINGER: Duration = Duration::from_secs(5);

/// A server's retry hint kept within [`MIN_SERVER_DELAY`]..=[`MAX_SERVER_DELAY`]: never
/// so long that the client gives up for good, never zero.
pub fn clamp_retry_hint(hint: Duration) -> Duration {
    hint.clamp(MIN_SERVER_DELAY, MAX_SERVER_DELAY)
}

/// `now + wait` without overflow: a wait too long for [`Instant`] is cut to
/// [`MAX_SERVER_DELAY`] (configured and server-given waits are far below either).
fn later(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait)
        .or_else(|| now.checked_add(MAX_SERVER_DELAY))
        .unwrap_or(now)
}

/// Where the client stands. Observable by the app through [`StateChange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConnectionState {
    /// Not connected; waiting to retry (see [`StateChange::next_retry_at`]).
    Offline,
    /// Opening the WebSocket (and, if it is slow or refused, trying HTTP).
    Connecting,
    /// The WebSocket is up: everything flows in real time.
    Realtime,
    /// The WebSocket is unavailable but HTTP works: receiving by polling, sending over
    /// HTTP; the WebSocket is probed now and then.
    Polling,
    /// Continuity was lost (the cursor expired): refreshing from snapshots and deltas.
    Resyncing,
    /// Offline for long: retrying slowly to spare the battery.
    Suspended,
    /// Shut down by the app.
    Closed,
    /// The server refused the credentials and no fresh token could be had; only a new
    /// token leaves this state.
    AuthFailed,
}

impl ConnectionState {
    /// Every state, for tables and metrics.
    pub const ALL: [ConnectionState; 8] = [
        ConnectionState::Offline,
        ConnectionState::Connecting,
        ConnectionState::Realtime,
        ConnectionState::Polling,
        ConnectionState::Resyncing,
        ConnectionState::Suspended,
        ConnectionState::Closed,
        ConnectionState::AuthFailed,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// True when some transport to the server works (Realtime, Polling, Resyncing).
    pub fn is_connected(self) -> bool {
        matches!(
            self,
            ConnectionState::Realtime | ConnectionState::Polling | ConnectionState::Resyncing
        )
    }
}

/// Why the state changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The app opened the client.
    Start,
    /// The WebSocket opened.
    WebSocketOpened,
    /// Opening the WebSocket failed.
    WebSocketFailed,
    /// The open WebSocket closed or broke.
    WebSocketLost,
    /// No pong (or any frame) within `pong_timeout` of a ping.
    HeartbeatLost,
    /// The server closed the socket because it is shutting down or full.
    ServerGoingAway,
    /// An HTTP request succeeded.
    HttpWorks,
    /// HTTP requests failed.
    HttpFailed,
    /// The retry timer fired.
    RetryTimer,
    /// The host app said the network is available.
    NetworkAvailable,
    /// The host app said the network is gone.
    NetworkLost,
    /// The host app came to the foreground.
    Foreground,
    /// Offline for longer than `suspend_after`.
    LongOffline,
    /// The server no longer has the events after the client's cursor.
    CursorExpired,
    /// The resync finished.
    ResyncDone,
    /// The server refused the token and refreshing it did not help.
    AuthRejected,
    /// A new token arrived.
    NewToken,
    /// The app shut the client down.
    Shutdown,
    /// The app has been in the background for `background_linger`: the client closed
    /// its connection and does nothing on its own until the app comes back or asks for
    /// something.
    Background,
    /// The app asked for something while in the background (a send, an edit, a sync):
    /// the client connects for it.
    AppRequest,
}

/// A transition, as the app sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateChange {
    /// The state before.
    pub from: ConnectionState,
    /// The state now.
    pub to: ConnectionState,
    /// Why.
    pub reason: Reason,
    /// When the next connection attempt is due (Offline, Suspended), or the next
    /// WebSocket probe (Polling).
    pub next_retry_at: Option<Instant>,
    /// When it happened.
    pub at: Instant,
}

/// How a transport attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No answer, reset, timed out, DNS: the network or the server is away.
    Network,
    /// Nothing took the connection: refused (nothing listens on the port) or no route
    /// to the host. HTTP goes to the same host and port, so a WebSocket attempt that
    /// fails so is not followed by an HTTP one: one attempt per retry, not two (what a
    /// Suspended phone pays for each retry). Elsewhere the same as `Network`.
    Unreachable,
    /// The server answered with a server error (5xx other than 503 full).
    Server,
    /// The server is full (503 `SERVER_FULL`); retry no sooner than `retry_after`.
    ServerFull {
        /// The server's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// The server refused the token (401 `AUTH_FAILED`, close 1008 `AUTH_EXPIRED`).
    Auth,
}

/// How a WebSocket that was open ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    /// Reset, EOF, protocol error, or a close code that does not say more.
    Lost,
    /// Close 1001 (server shutting down) or 1013 (server full): come back later.
    GoingAway,
    /// Close 1008 with `AUTH_EXPIRED`: the token expired mid-session.
    AuthExpired,
}

/// Where queued outbound items should go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Over the open WebSocket.
    WebSocket,
    /// Over HTTP (`POST /api/messages`, reconcile, transactions).
    Http,
}

/// What the driver must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Open the WebSocket (with the cursor, so that the server replays what was missed);
    /// report [`Machine::on_ws_open`] or [`Machine::on_ws_failed`].
    OpenWebSocket,
    /// Close the WebSocket, or abandon the attempt to open it. No report is expected.
    CloseWebSocket,
    /// Send a `ping` frame.
    SendPing,
    /// Make one poll request; report [`Machine::on_poll_ok`], [`Machine::on_poll_failed`]
    /// or [`Machine::on_poll_cursor_expired`].
    Poll,
    /// Refresh state from snapshots and deltas; report [`Machine::on_resync_done`] or
    /// [`Machine::on_resync_failed`].
    Resync,
    /// Ask the token provider for a fresh token; report [`Machine::on_token`] or
    /// [`Machine::on_token_unavailable`].
    RefreshToken,
    /// Send what the outbox holds, by this route (Class D and reconciliation always go
    /// over HTTP, whatever the route).
    Flush(Route),
    /// Tell the app.
    StateChanged(StateChange),
}

/// Timings and limits of the machine.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// Smallest retry delay.
    pub backoff_min: Duration,
    /// Largest retry delay while Offline.
    pub backoff_max: Duration,
    /// Offline this long becomes Suspended.
    pub suspend_after: Duration,
    /// Retry delay while Suspended (jittered between half and all of it).
    pub suspended_retry: Duration,
    /// A WebSocket attempt slower than this makes the client try HTTP meanwhile.
    pub slow_connect: Duration,
    /// A WebSocket attempt is abandoned after this.
    pub connect_timeout: Duration,
    /// Ping the server after this long (the server's `pingInterval` replaces it).
    pub ping_interval: Duration,
    /// A ping unanswered (no frame at all) for this long means the socket is dead.
    pub pong_timeout: Duration,
    /// After coming to the foreground, a ping must be answered within this.
    pub foreground_check: Duration,
    /// Time between polls while Polling (a page with more waiting is fetched at once).
    pub poll_interval: Duration,
    /// First and largest delay between WebSocket probes while Polling.
    pub probe_min: Duration,
    /// Largest delay between WebSocket probes while Polling.
    pub probe_max: Duration,
    /// Realtime held this long resets the retry and probe schedules (hysteresis); a
    /// socket lost sooner is retried on the growing schedule, not at once.
    pub stable_after: Duration,
    /// Consecutive HTTP failures that make Polling give up for Offline.
    pub http_failures_to_offline: u32,
    /// How long the client goes on as usual after the app went to the background
    /// (finishing sends, hearing replies) before it closes its connection and stops
    /// every timer of its own. Zero: at once.
    pub background_linger: Duration,
    /// Seed of the jitter (a fixed seed makes tests deterministic).
    pub jitter_seed: u64,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            suspend_after: Duration::from_secs(300),
            suspended_retry: Duration::from_secs(300),
            slow_connect: Duration::from_millis(1500),
            connect_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
            foreground_check: Duration::from_secs(3),
            poll_interval: Duration::from_secs(1),
            probe_min: Duration::from_secs(2),
            probe_max: Duration::from_secs(60),
            stable_after: Duration::from_secs(30),
            http_failures_to_offline: 2,
            background_linger: Duration::from_secs(10),
            jitter_seed: rand::random(),
        }
    }
}

/// Where the app is, as its lifecycle hints said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    /// In front of the user (or never said otherwise).
    Foreground,
    /// In the background since a moment: as usual until `until`.
    Lingering { until: Instant },
    /// In the background: no connection, no timers, until the app comes back or asks.
    Parked,
}

/// The WebSocket as the machine knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ws {
    Closed,
    Opening { since: Instant },
    Open { since: Instant },
}

/// The connection state machine. See the module docs.
#[derive(Debug)]
pub struct Machine {
    cfg: MachineConfig,
    state: ConnectionState,
    entered_at: Instant,
    time_in: [Duration; 8],
    ws: Ws,
    /// Deadline for any frame after a ping.
    pong_due: Option<Instant>,
    next_ping: Option<Instant>,
    poll_in_flight: bool,
    next_poll: Option<Instant>,
    /// The HTTP poll made while Connecting answered OK.
    http_works: bool,
    /// This connection attempt already tried HTTP because the WebSocket was slow.
    slow_checked: bool,
    /// The WebSocket attempt of this connection attempt failed.
    ws_failed: bool,
    http_failures: u32,
    /// Offline/Suspended: next attempt. Polling: next WebSocket probe.
    retry_at: Option<Instant>,
    offline_since: Option<Instant>,
    backoff: Backoff,
    probe_backoff: Backoff,
    /// Earliest retry the server asked for (503 `Retry-After`).
    not_before: Option<Instant>,
    refreshing_token: bool,
    /// Fresh tokens obtained since the last request that the server accepted. A
    /// refusal when [`MAX_UNPROVEN_REFRESHES`] of them went unproven is final.
    unproven_refreshes: u32,
    resync_in_flight: bool,
    needs_resync: bool,
    lifecycle: Lifecycle,
    actions: VecDeque<Action>,
}

impl Machine {
    /// A machine in `Offline`, not yet started.
    pub fn new(cfg: MachineConfig, now: Instant) -> Self {
        let backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max, cfg.jitter_seed);
        let probe_backoff = Backoff::new(
            cfg.probe_min,
            cfg.probe_max,
            cfg.jitter_seed.wrapping_add(1),
        );
        Self {
            cfg,
            state: ConnectionState::Offline,
            entered_at: now,
            time_in: [Duration::ZERO; 8],
            ws: Ws::Closed,
            pong_due: None,
            next_ping: None,
            poll_in_flight: false,
            next_poll: None,
            http_works: false,
            slow_checked: false,
            ws_failed: false,
            http_failures: 0,
            retry_at: None,
            offline_since: None,
            backoff,
            probe_backoff,
            not_before: None,
            refreshing_token: false,
            unproven_refreshes: 0,
            resync_in_flight: false,
            needs_resync: false,
            lifecycle: Lifecycle::Foreground,
            actions: VecDeque::new(),
        }
    }

    /// The current state.
    pub fn state(&self) -> ConnectionState {
        self.state
    }

    /// The next connection attempt (Offline, Suspended) or WebSocket probe (Polling).
    pub fn next_retry_at(&self) -> Option<Instant> {
        match self.state {
            ConnectionState::Offline | ConnectionState::Suspended | ConnectionState::Polling => {
                self.retry_at
            }
            _ => None,
        }
    }

    /// The app is in the background and the client has stopped: no connection, no
    /// timers (see [`Machine::background`]).
    pub fn is_parked(&self) -> bool {
        self.lifecycle == Lifecycle::Parked
    }

    /// Connection attempts since the schedule last started afresh (the position in the
    /// backoff schedule): after a socket that held for `stable_after`, a hint, or
    /// Polling; a socket that breaks soon after opening does not reset it.
    pub fn retry_attempts(&self) -> u32 {
        self.backoff.attempts()
    }

    /// Time spent in each state (in [`ConnectionState::ALL`] order) up to `now`.
    pub fn time_in_states(&self, now: Instant) -> [(ConnectionState, Duration); 8] {
        let mut out = ConnectionState::ALL.map(|s| (s, self.time_in[s.index()]));
        let current = &mut out[self.state.index()].1;
        *current = current.saturating_add(now.saturating_duration_since(self.entered_at));
        out
    }

    /// Uses the server's heartbeat interval (from `connected.pingInterval`).
    /// A zero interval is ignored; others are kept within
    /// [`MIN_SERVER_PING_INTERVAL`]..=[`MAX_SERVER_DELAY`] (the server is not trusted to
    /// keep the client awake, or to never check the connection).
    pub fn set_ping_interval(&mut self, interval: Duration) {
        if !interval.is_zero() {
            self.cfg.ping_interval = interval.clamp(MIN_SERVER_PING_INTERVAL, MAX_SERVER_DELAY);
        }
    }

    /// The next action for the driver, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Machine::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let ws_deadline = match self.ws {
            Ws::Opening { since } => Some(later(
                since,
                if self.state == ConnectionState::Connecting && !self.slow_checked {
                    self.cfg.slow_connect.min(self.cfg.connect_timeout)
                } else {
                    self.cfg.connect_timeout
                },
            )),
            _ => None,
        };
        let linger = match self.lifecycle {
            Lifecycle::Lingering { until } if !self.is_final() => Some(until),
            _ => None,
        };
        [
            ws_deadline,
            linger,
            self.pong_due,
            self.next_ping,
            self.next_poll,
            self.retry_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    // ---- inputs -----------------------------------------------------------------------

    /// The app opened the client: start connecting.
    pub fn start(&mut self, now: Instant) {
        if self.state == ConnectionState::Offline && self.retry_at.is_none() {
            self.connect(now, Reason::Start);
        }
    }

    /// The WebSocket opened.
    pub fn on_ws_open(&mut self, now: Instant) {
        if !matches!(self.ws, Ws::Opening { .. }) || self.is_final() {
            return;
        }
        self.ws = Ws::Open { since: now };
        self.auth_ok();
        self.http_failures = 0;
        self.next_ping = Some(later(now, self.cfg.ping_interval));
        self.pong_due = None;
        self.next_poll = None;
        if self.needs_resync || self.state == ConnectionState::Resyncing {
            self.enter(ConnectionState::Resyncing, Reason::WebSocketOpened, now);
            self.start_resync();
        } else {
            self.enter(ConnectionState::Realtime, Reason::WebSocketOpened, now);
        }
        // The retry schedule is not reset here but once the socket has held for
        // `stable_after` (see `note_flap`): a socket that opens and breaks at once, again
        // and again (a broken proxy, a hostile server), is retried on a growing
        // schedule, not in a tight loop.
        self.offline_since = None;
        self.actions.push_back(Action::Flush(Route::WebSocket));
    }

    /// Opening the WebSocket failed.
    pub fn on_ws_failed(&mut self, now: Instant, failure: Failure) {
        if !matches!(self.ws, Ws::Opening { .. }) || self.is_final() {
            return;
        }
        self.ws = Ws::Closed;
        self.ws_failed = true;
        self.note_retry_after(now, failure);
        if failure == Failure::Auth {
            self.auth_refused(now);
            return;
        }
        match self.state {
            // HTTP would knock on the same closed door; unless an HTTP check is already
            // out (a slow attempt), wait for the next retry.
            ConnectionState::Connecting
                if failure == Failure::Unreachable && !self.poll_in_flight =>
            {
                self.go_offline(now, Reason::WebSocketFailed)
            }
            ConnectionState::Connecting => self.try_http(),
            ConnectionState::Polling => self.schedule_probe(now),
            _ => {}
        }
    }

    /// The open WebSocket closed or broke.
    pub fn on_ws_closed(&mut self, now: Instant, how: CloseKind) {
        let Ws::Open { since } = self.ws else {
            return;
        };
        if self.is_final() {
            return;
        }
        self.ws = Ws::Closed;
        self.pong_due = None;
        self.next_ping = None;
        let stable = self.note_flap(now, since);
        match how {
            CloseKind::AuthExpired => self.auth_refused(now),
            CloseKind::GoingAway => self.go_offline(now, Reason::ServerGoingAway),
            CloseKind::Lost => self.enter_connecting(now, Reason::WebSocketLost, stable),
        }
    }

    /// A frame (any, pongs and the server's own pings included) arrived on the
    /// WebSocket: the connection is alive, so the next ping waits for `ping_interval`
    /// and a tenth more of silence. A server that pings at the interval it announced
    /// (`connected.pingInterval`) is then always heard first and the client sends no
    /// pings of its own (half the heartbeat wake-ups); a dead socket is still found
    /// within 1.1 × `ping_interval` + `pong_timeout` of the last sign of life.
    pub fn on_ws_activity(&mut self, now: Instant) {
        self.pong_due = None;
        if matches!(self.ws, Ws::Open { .. }) && self.next_ping.is_some() {
            let grace = self.cfg.ping_interval.checked_div(10).unwrap_or_default();
            let silence = self.cfg.ping_interval.saturating_add(grace);
            self.next_ping = Some(later(now, silence));
        }
    }

    /// A poll succeeded; `more` when the server has more waiting.
    pub fn on_poll_ok(&mut self, now: Instant, more: bool) {
        if !self.poll_in_flight {
            return;
        }
        self.poll_in_flight = false;
        self.on_http_ok(now);
        if self.state == ConnectionState::Polling {
            self.next_poll = Some(if more {
                now
            } else {
                later(now, self.cfg.poll_interval)
            });
        }
    }

    /// Some HTTP request (a poll, a send) succeeded.
    pub fn on_http_ok(&mut self, now: Instant) {
        if self.is_final() {
            return;
        }
        self.auth_ok();
        self.http_failures = 0;
        self.http_works = true;
        // HTTP works and the WebSocket failed, or is slow: poll (while a slow attempt
        // keeps trying). A WebSocket attempt just begun is given its chance first.
        let ws_struggles = match self.ws {
            Ws::Closed => self.ws_failed,
            Ws::Opening { .. } => self.slow_checked,
            Ws::Open { .. } => false,
        };
        if self.state == ConnectionState::Connecting && ws_struggles {
            if self.needs_resync {
                self.enter(ConnectionState::Resyncing, Reason::HttpWorks, now);
                self.start_resync();
            } else {
                self.enter_polling(now, Reason::HttpWorks);
            }
        }
    }

    /// The poll failed.
    pub fn on_poll_failed(&mut self, now: Instant, failure: Failure) {
        if !self.poll_in_flight {
            return;
        }
        self.poll_in_flight = false;
        self.on_http_failed(now, failure);
    }

    /// The poll was answered with `CURSOR_EXPIRED`.
    pub fn on_poll_cursor_expired(&mut self, now: Instant) {
        if !self.poll_in_flight {
            return;
        }
        self.poll_in_flight = false;
        self.on_cursor_expired(now);
    }

    /// Some other HTTP request (a send, a reconcile) failed.
    pub fn on_http_failed(&mut self, now: Instant, failure: Failure) {
        if self.is_final() {
            return;
        }
        self.note_retry_after(now, failure);
        if failure == Failure::Auth {
            self.auth_refused(now);
            return;
        }
        self.http_failures = self.http_failures.saturating_add(1);
        self.http_works = false;
        match self.state {
            ConnectionState::Connecting if !matches!(self.ws, Ws::Opening { .. }) => {
                self.go_offline(now, Reason::HttpFailed);
            }
            ConnectionState::Polling | ConnectionState::Resyncing
                if !matches!(self.ws, Ws::Open { .. }) =>
            {
                if self.http_failures >= self.cfg.http_failures_to_offline {
                    self.go_offline(now, Reason::HttpFailed);
                } else if self.state == ConnectionState::Polling {
                    self.next_poll = Some(later(now, self.cfg.poll_interval));
                }
            }
            _ => {}
        }
    }

    /// The server no longer has the events after the cursor (`CURSOR_EXPIRED`).
    pub fn on_cursor_expired(&mut self, now: Instant) {
        if self.is_final() {
            return;
        }
        self.needs_resync = true;
        if self.is_parked() {
            return; // Resynced on the next connection.
        }
        // The server answered, so some transport works: resync now.
        self.http_works = true;
        if self.state != ConnectionState::Resyncing {
            self.enter(ConnectionState::Resyncing, Reason::CursorExpired, now);
        }
        self.start_resync();
    }

    /// The resync finished: the cache is fresh and the cursor reset.
    pub fn on_resync_done(&mut self, now: Instant) {
        if !self.resync_in_flight {
            return;
        }
        self.resync_in_flight = false;
        self.needs_resync = false;
        if self.state != ConnectionState::Resyncing {
            return;
        }
        if matches!(self.ws, Ws::Open { .. }) {
            self.enter(ConnectionState::Realtime, Reason::ResyncDone, now);
            self.actions.push_back(Action::Flush(Route::WebSocket));
        } else {
            // Poll, and try the WebSocket again at once: its last attempt may have been
            // refused only for the expired cursor.
            self.enter_polling(now, Reason::ResyncDone);
            self.open_ws(now);
        }
    }

    /// The resync failed; it is tried again on the next connection.
    pub fn on_resync_failed(&mut self, now: Instant, failure: Failure) {
        if !self.resync_in_flight {
            return;
        }
        self.resync_in_flight = false;
        if failure == Failure::Auth {
            self.auth_refused(now);
            return;
        }
        if self.state == ConnectionState::Resyncing {
            if matches!(self.ws, Ws::Open { .. }) {
                self.actions.push_back(Action::CloseWebSocket);
                self.ws = Ws::Closed;
                self.next_ping = None;
                self.pong_due = None;
            }
            self.go_offline(now, Reason::HttpFailed);
        }
    }

    /// A fresh token is available (after [`Action::RefreshToken`], or given by the app).
    pub fn on_token(&mut self, now: Instant) {
        if self.state == ConnectionState::Closed {
            return;
        }
        let was_failed = self.state == ConnectionState::AuthFailed;
        let was_refreshing = std::mem::replace(&mut self.refreshing_token, false);
        if was_failed {
            self.unproven_refreshes = 0;
            self.backoff.reset();
            if self.lifecycle != Lifecycle::Foreground {
                // The app's new token is its request to connect, background or not.
                self.lifecycle = Lifecycle::Lingering {
                    until: later(now, self.cfg.background_linger.max(APP_REQUEST_MIN_LINGER)),
                };
            }
            self.connect(now, Reason::NewToken);
        } else if was_refreshing {
            self.unproven_refreshes = self.unproven_refreshes.saturating_add(1);
            if !matches!(self.ws, Ws::Opening { .. } | Ws::Open { .. }) {
                self.connect(now, Reason::NewToken);
            } else if self.state == ConnectionState::Resyncing {
                // The resync was refused for the old token while the socket stayed up:
                // nothing else starts it again (the socket is not reconnected).
                self.start_resync();
            }
        }
    }

    /// The token provider could not give a token.
    pub fn on_token_unavailable(&mut self, now: Instant) {
        if !self.refreshing_token {
            return;
        }
        self.refreshing_token = false;
        self.auth_failed(now);
    }

    /// The host app says the network is available again.
    pub fn network_available(&mut self, now: Instant) {
        self.retry_now(now, Reason::NetworkAvailable);
    }

    /// The host app says the network is gone.
    pub fn network_lost(&mut self, now: Instant) {
        if self.is_final() || self.is_parked() {
            return;
        }
        if !matches!(self.ws, Ws::Closed) {
            self.actions.push_back(Action::CloseWebSocket);
            self.ws = Ws::Closed;
        }
        self.next_ping = None;
        self.pong_due = None;
        self.go_offline(now, Reason::NetworkLost);
    }

    /// The host app came to the foreground: check the socket at once (it may have died
    /// while the app was suspended) or retry at once when offline.
    pub fn foreground(&mut self, now: Instant) {
        let was_parked = self.is_parked();
        self.lifecycle = Lifecycle::Foreground;
        if was_parked && !self.is_final() {
            self.backoff.reset();
            self.connect(now, Reason::Foreground);
        } else if matches!(self.ws, Ws::Open { .. }) {
            self.actions.push_back(Action::SendPing);
            let due = later(now, self.cfg.foreground_check.min(self.cfg.pong_timeout));
            self.pong_due = Some(self.pong_due.map_or(due, |d| d.min(due)));
        } else {
            self.retry_now(now, Reason::Foreground);
        }
    }

    /// The host app went to the background. For `background_linger` nothing changes
    /// (sends finish, replies arrive; the OS may freeze the process meanwhile, and
    /// [`Machine::foreground`] checks the socket when it comes back). Then the client
    /// parks: it closes its connection (others see it go offline) and has no timer of
    /// its own (no heartbeat, retry, poll) until [`Machine::foreground`] or
    /// [`Machine::on_app_request`]. A phone in a pocket wakes only for what the app does.
    pub fn background(&mut self, now: Instant) {
        if self.state == ConnectionState::Closed || self.lifecycle != Lifecycle::Foreground {
            return;
        }
        if self.is_final() {
            // AuthFailed: nothing runs to park, but the app is in the background: a
            // new token connects as an app request would, and parks again.
            self.lifecycle = Lifecycle::Parked;
        } else if self.cfg.background_linger.is_zero() {
            self.park(now);
        } else {
            self.lifecycle = Lifecycle::Lingering {
                until: later(now, self.cfg.background_linger),
            };
        }
    }

    /// The app asked for something that needs the server (a send, an edit, a sync).
    /// Parked, the client connects for it and parks again `background_linger` (at
    /// least [`APP_REQUEST_MIN_LINGER`]) after the app's last request; lingering, that
    /// time is pushed back. In the foreground this changes nothing (the machine is
    /// already on it). Work not done by then stays queued for the next connection.
    pub fn on_app_request(&mut self, now: Instant) {
        if self.is_final() {
            return;
        }
        let until = later(now, self.cfg.background_linger.max(APP_REQUEST_MIN_LINGER));
        match self.lifecycle {
            Lifecycle::Foreground => {}
            Lifecycle::Lingering { until: before } => {
                self.lifecycle = Lifecycle::Lingering {
                    until: until.max(before),
                };
                // Waiting for a retry minutes away would let the linger run out first.
                if matches!(
                    self.state,
                    ConnectionState::Offline | ConnectionState::Suspended
                ) {
                    self.backoff.reset();
                    self.connect(now, Reason::AppRequest);
                }
            }
            Lifecycle::Parked => {
                self.lifecycle = Lifecycle::Lingering { until };
                self.backoff.reset();
                self.connect(now, Reason::AppRequest);
            }
        }
    }

    /// The app shuts the client down.
    pub fn shutdown(&mut self, now: Instant) {
        if self.state == ConnectionState::Closed {
            return;
        }
        if !matches!(self.ws, Ws::Closed) {
            self.actions.push_back(Action::CloseWebSocket);
        }
        self.ws = Ws::Closed;
        self.clear_timers();
        self.enter(ConnectionState::Closed, Reason::Shutdown, now);
    }

    /// Fires the timers that are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_final() {
            return;
        }
        if let Lifecycle::Lingering { until } = self.lifecycle
            && now >= until
        {
            self.park(now);
            return;
        }
        if let Ws::Opening { since } = self.ws {
            let elapsed = now.saturating_duration_since(since);
            if elapsed >= self.cfg.connect_timeout {
                self.actions.push_back(Action::CloseWebSocket);
                self.on_ws_failed(now, Failure::Network);
            } else if elapsed >= self.cfg.slow_connect
                && self.state == ConnectionState::Connecting
                && !self.slow_checked
            {
                // Slow: try HTTP meanwhile (once); the WebSocket attempt goes on.
                self.slow_checked = true;
                self.try_http();
            }
        }
        if self.pong_due.is_some_and(|d| now >= d) {
            self.pong_due = None;
            if let Ws::Open { since } = self.ws {
                self.actions.push_back(Action::CloseWebSocket);
                self.ws = Ws::Closed;
                self.next_ping = None;
                // Silent soon after opening (a server that accepts sockets and then
                // says nothing) is treated as a socket lost early.
                let stable = self.note_flap(now, since);
                self.enter_connecting(now, Reason::HeartbeatLost, stable);
            }
        }
        if self.next_ping.is_some_and(|d| now >= d) {
            if matches!(self.ws, Ws::Open { .. }) {
                self.actions.push_back(Action::SendPing);
                self.next_ping = Some(later(now, self.cfg.ping_interval));
                if self.pong_due.is_none() {
                    self.pong_due = Some(later(now, self.cfg.pong_timeout));
                }
            } else {
                self.next_ping = None;
            }
        }
        if self.next_poll.is_some_and(|d| now >= d) {
            self.next_poll = None;
            if self.state == ConnectionState::Polling && !self.poll_in_flight {
                self.poll_in_flight = true;
                self.actions.push_back(Action::Poll);
            }
        }
        if self.retry_at.is_some_and(|d| now >= d) {
            self.retry_at = None;
            match self.state {
                ConnectionState::Offline | ConnectionState::Suspended => {
                    self.connect(now, Reason::RetryTimer);
                }
                ConnectionState::Polling if matches!(self.ws, Ws::Closed) => {
                    self.open_ws(now);
                }
                _ => {}
            }
        }
    }

    // ---- internals --------------------------------------------------------------------

    fn is_final(&self) -> bool {
        matches!(
            self.state,
            ConnectionState::Closed | ConnectionState::AuthFailed
        )
    }

    fn enter(&mut self, to: ConnectionState, reason: Reason, now: Instant) {
        let from = self.state;
        if from == to && to == ConnectionState::Connecting {
            return; // Already trying: nothing new to tell.
        }
        if let Some(spent) = self.time_in.get_mut(from.index()) {
            *spent = spent.saturating_add(now.saturating_duration_since(self.entered_at));
        }
        self.entered_at = now;
        self.state = to;
        if to != ConnectionState::Polling {
            self.next_poll = None;
        }
        if !matches!(
            to,
            ConnectionState::Offline | ConnectionState::Suspended | ConnectionState::Polling
        ) {
            self.retry_at = None;
        }
        self.actions.push_back(Action::StateChanged(StateChange {
            from,
            to,
            reason,
            next_retry_at: self.next_retry_at(),
            at: now,
        }));
    }

    /// Enters a state whose retry time is part of the change the app sees.
    fn enter_with_retry(
        &mut self,
        to: ConnectionState,
        reason: Reason,
        now: Instant,
        retry_at: Instant,
    ) {
        self.retry_at = Some(retry_at);
        self.enter(to, reason, now);
    }

    fn open_ws(&mut self, now: Instant) {
        if matches!(self.ws, Ws::Closed) && !self.refreshing_token {
            self.ws = Ws::Opening { since: now };
            self.actions.push_back(Action::OpenWebSocket);
        }
    }

    /// Parks (see [`Machine::background`]): closes the socket, drops every timer and
    /// enters Offline without a retry time. Answers still out (a poll, a resync, a token)
    /// change nothing but their own bookkeeping.
    fn park(&mut self, now: Instant) {
        self.lifecycle = Lifecycle::Parked;
        if !matches!(self.ws, Ws::Closed) {
            self.actions.push_back(Action::CloseWebSocket);
            self.ws = Ws::Closed;
        }
        self.next_ping = None;
        self.pong_due = None;
        self.next_poll = None;
        self.retry_at = None;
        self.http_works = false;
        // Time in the background is not time offline: no Suspended on return.
        self.offline_since = None;
        self.enter(ConnectionState::Offline, Reason::Background, now);
    }

    /// Enters Connecting and opens the WebSocket (parked: nothing; the app's return or
    /// request connects).
    fn connect(&mut self, now: Instant, reason: Reason) {
        self.enter_connecting(now, reason, true);
    }

    /// Connecting: with a new socket, or (`socket` false) with a poll, as if the socket
    /// had just been refused. Parked: nothing; a server's `Retry-After` still running:
    /// Offline until it ends.
    ///
    /// A socket lost soon after it opened (before `stable_after`) comes here without a
    /// new socket: opening another at once would loop as fast as the network allows
    /// against a server or proxy that keeps breaking them. HTTP working then means
    /// Polling, with the WebSocket probed on a schedule that keeps growing while sockets
    /// keep breaking; else Offline, on the retry schedule.
    fn enter_connecting(&mut self, now: Instant, reason: Reason, socket: bool) {
        if self.is_parked() {
            return;
        }
        if let Some(nb) = self.not_before.filter(|nb| *nb > now) {
            // The server asked for patience (503 Retry-After).
            self.enter_with_retry(ConnectionState::Offline, reason, now, nb);
            return;
        }
        self.http_works = false;
        self.slow_checked = false;
        self.ws_failed = !socket;
        self.enter(ConnectionState::Connecting, reason, now);
        if socket {
            self.open_ws(now);
        } else {
            self.try_http();
        }
    }

    /// The WebSocket is refused or slow: find out whether HTTP works.
    fn try_http(&mut self) {
        if !self.poll_in_flight {
            self.poll_in_flight = true;
            self.actions.push_back(Action::Poll);
        }
    }

    fn enter_polling(&mut self, now: Instant, reason: Reason) {
        let probe_at = later(now, self.probe_backoff.next_delay());
        let probe_at = self.not_before.map_or(probe_at, |nb| probe_at.max(nb));
        // A slow WebSocket attempt may still be going on: the probe timer only acts once
        // it has ended.
        self.enter_with_retry(ConnectionState::Polling, reason, now, probe_at);
        self.backoff.reset();
        self.offline_since = None;
        self.next_poll = Some(now);
        self.actions.push_back(Action::Flush(Route::Http));
    }

    fn schedule_probe(&mut self, now: Instant) {
        let at = later(now, self.probe_backoff.next_delay());
        self.retry_at = Some(self.not_before.map_or(at, |nb| at.max(nb)));
    }

    fn go_offline(&mut self, now: Instant, reason: Reason) {
        if matches!(self.ws, Ws::Opening { .. }) {
            self.actions.push_back(Action::CloseWebSocket);
            self.ws = Ws::Closed;
        }
        if self.is_parked() {
            return; // Already Offline, and no retry while parked.
        }
        self.http_works = false;
        let since = *self.offline_since.get_or_insert(now);
        let (to, delay, reason) = if now.saturating_duration_since(since) >= self.cfg.suspend_after
        {
            let full = self.cfg.suspended_retry;
            let delay = self
                .backoff
                .jitter(full.checked_div(2).unwrap_or_default(), full);
            (ConnectionState::Suspended, delay, Reason::LongOffline)
        } else {
            (ConnectionState::Offline, self.backoff.next_delay(), reason)
        };
        let at = later(now, delay);
        let at = self.not_before.map_or(at, |nb| at.max(nb));
        self.enter_with_retry(to, reason, now, at);
    }

    fn retry_now(&mut self, now: Instant, reason: Reason) {
        if self.is_final() || self.is_parked() {
            return;
        }
        self.backoff.reset();
        self.offline_since = None;
        match self.state {
            ConnectionState::Offline | ConnectionState::Suspended => self.connect(now, reason),
            ConnectionState::Polling if matches!(self.ws, Ws::Closed) => {
                self.probe_backoff.reset();
                self.open_ws(now);
            }
            _ => {}
        }
    }

    fn note_retry_after(&mut self, now: Instant, failure: Failure) {
        if let Failure::ServerFull {
            retry_after: Some(after),
        } = failure
        {
            self.not_before = Some(later(now, clamp_retry_hint(after)));
        }
    }

    /// A socket opened at `opened` ended: when it held for `stable_after`, both retry
    /// schedules start afresh (and `true`); otherwise they keep growing (hysteresis).
    fn note_flap(&mut self, now: Instant, opened: Instant) -> bool {
        let stable = now.saturating_duration_since(opened) >= self.cfg.stable_after;
        if stable {
            self.probe_backoff.reset();
            self.backoff.reset();
        }
        stable
    }

    fn auth_ok(&mut self) {
        self.unproven_refreshes = 0;
    }

    /// The server refused the current token: refresh it, unless the last fresh ones
    /// were all refused before any request got through (the provider's tokens are not
    /// accepted: only the app can help, `AuthFailed`). A token refused long after it was
    /// obtained (expired while offline, revoked) is simply refreshed again.
    fn auth_refused(&mut self, now: Instant) {
        if self.is_parked() {
            return; // A late answer: the next connection finds out about the token.
        }
        if self.unproven_refreshes >= MAX_UNPROVEN_REFRESHES {
            self.auth_failed(now);
            return;
        }
        if !self.refreshing_token {
            self.refreshing_token = true;
            self.actions.push_back(Action::RefreshToken);
        }
        if matches!(self.ws, Ws::Open { .. }) {
            // An HTTP request refused while the socket is up (its session outlives the
            // token): the socket goes on; the request is made again with the fresh
            // token. Entering Connecting here left the client there for good: the
            // fresh token does not reconnect an open socket.
            return;
        }
        if self.state != ConnectionState::Connecting {
            self.http_works = false;
            self.enter(ConnectionState::Connecting, Reason::AuthRejected, now);
        }
    }

    fn auth_failed(&mut self, now: Instant) {
        if !matches!(self.ws, Ws::Closed) {
            self.actions.push_back(Action::CloseWebSocket);
            self.ws = Ws::Closed;
        }
        self.clear_timers();
        self.enter(ConnectionState::AuthFailed, Reason::AuthRejected, now);
    }

    fn start_resync(&mut self) {
        if !self.resync_in_flight {
            self.resync_in_flight = true;
            self.actions.push_back(Action::Resync);
        }
    }

    /// Stops every timer. Requests still out (a poll, a resync) stay marked as such
    /// until answered, so that none is ever asked for twice.
    fn clear_timers(&mut self) {
        self.pong_due = None;
        self.next_ping = None;
        self.next_poll = None;
        self.retry_at = None;
        self.refreshing_token = false;
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests;
