//! Property tests of the connection state machine: random networks, hints and timings,
//! driven the way the client's supervisor drives it, in virtual time.
//!
//! Checked after every step: one WebSocket attempt, one poll, one resync and one token
//! refresh at most at a time (so one reconnect loop per client); reports that answer
//! nothing are ignored; the state changes the app sees form a chain; Realtime means an
//! open socket; a live machine is never stuck (a timer is set or an answer is awaited);
//! retry delays stay within the configured bounds; Closed is final and only a token
//! leaves AuthFailed; the time accounted per state adds up.

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use proptest::prelude::*;
use webwaka_realtime::machine::{
    Action, CloseKind, ConnectionState, Failure, Machine, MachineConfig,
};

#[derive(Debug, Clone)]
enum Step {
    Advance(u64),
    WsOpen,
    WsFailed(Failure),
    WsClosed(CloseKind),
    Activity,
    PollOk(bool),
    PollFailed(Failure),
    SendFailed(Failure),
    CursorExpired,
    ResyncDone,
    ResyncFailed,
    Token,
    TokenUnavailable,
    NetworkAvailable,
    NetworkLost,
    Foreground,
    Background,
    AppRequest,
    Shutdown,
}

fn failure() -> impl Strategy<Value = Failure> {
    prop_oneof![
        4 => Just(Failure::Network),
        2 => Just(Failure::Unreachable),
        2 => Just(Failure::Server),
        1 => Just(Failure::Auth),
        1 => (0u64..60).prop_map(|s| Failure::ServerFull { retry_after: Some(Duration::from_secs(s)) }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => prop_oneof![0u64..100, 0u64..5_000, 0u64..120_000].prop_map(Step::Advance),
        4 => Just(Step::WsOpen),
        3 => failure().prop_map(Step::WsFailed),
        2 => prop_oneof![Just(CloseKind::Lost), Just(CloseKind::GoingAway), Just(CloseKind::AuthExpired)].prop_map(Step::WsClosed),
        3 => Just(Step::Activity),
        4 => any::<bool>().prop_map(Step::PollOk),
        3 => failure().prop_map(Step::PollFailed),
        1 => failure().prop_map(Step::SendFailed),
        1 => Just(Step::CursorExpired),
        2 => Just(Step::ResyncDone),
        1 => Just(Step::ResyncFailed),
        2 => Just(Step::Token),
        1 => Just(Step::TokenUnavailable),
        1 => Just(Step::NetworkAvailable),
        1 => Just(Step::NetworkLost),
        1 => Just(Step::Foreground),
        1 => Just(Step::Background),
        1 => Just(Step::AppRequest),
        1 => (0u8..40).prop_map(|n| if n == 0 { Step::Shutdown } else { Step::Activity }),
    ]
}

/// What the driver has been asked to do and not yet answered.
#[derive(Debug, Default)]
struct Outstanding {
    ws_attempt: bool,
    ws_open: bool,
    poll: bool,
    resync: bool,
    refresh: bool,
}

struct Run {
    m: Machine,
    start: Instant,
    now: Instant,
    out: Outstanding,
    state: ConnectionState,
    cfg: MachineConfig,
}

impl Run {
    fn drain(&mut self) -> Result<(), TestCaseError> {
        while let Some(action) = self.m.poll_action() {
            match action {
                Action::OpenWebSocket => {
                    prop_assert!(
                        !self.out.ws_attempt && !self.out.ws_open,
                        "a second WebSocket while one is open or opening"
                    );
                    self.out.ws_attempt = true;
                }
                Action::CloseWebSocket => {
                    self.out.ws_attempt = false;
                    self.out.ws_open = false;
                }
                Action::Poll => {
                    prop_assert!(!self.out.poll, "a second poll while one is out");
                    self.out.poll = true;
                }
                Action::Resync => {
                    prop_assert!(!self.out.resync, "a second resync while one is out");
                    self.out.resync = true;
                }
                Action::RefreshToken => {
                    prop_assert!(!self.out.refresh, "a second token refresh while one is out");
                    self.out.refresh = true;
                }
                Action::StateChanged(change) => {
                    prop_assert_eq!(change.from, self.state, "the changes form a chain");
                    prop_assert_eq!(change.at, self.now);
                    prop_assert_ne!(self.state, ConnectionState::Closed, "Closed is final");
                    if let Some(at) = change.next_retry_at {
                        let bound = self
                            .cfg
                            .backoff_max
                            .max(self.cfg.suspended_retry)
                            .max(self.cfg.probe_max)
                            .max(Duration::from_secs(60)); // largest Retry-After generated
                        prop_assert!(
                            at >= self.now && at - self.now <= bound,
                            "retry delay out of bounds"
                        );
                    }
                    self.state = change.to;
                }
                Action::SendPing | Action::Flush(_) => {}
            }
        }
        prop_assert_eq!(self.m.state(), self.state);
        if self.state == ConnectionState::Realtime {
            prop_assert!(self.out.ws_open, "Realtime without an open socket");
        }
        // An open socket while Connecting is never used (nothing flushes to it) and
        // nothing takes the client out of Connecting: stuck (a chaos seed found one).
        if self.state == ConnectionState::Connecting {
            prop_assert!(!self.out.ws_open, "Connecting with an open socket");
        }
        let live = !matches!(
            self.state,
            ConnectionState::Closed | ConnectionState::AuthFailed
        );
        let waiting = self.out.ws_attempt || self.out.poll || self.out.resync || self.out.refresh;
        if live && self.m.is_parked() {
            // Parked in the background: asleep until the app comes back or asks.
            prop_assert_eq!(self.m.poll_timeout(), None, "a timer while parked");
            prop_assert!(
                !self.out.ws_open && !self.out.ws_attempt,
                "a socket while parked"
            );
            prop_assert_eq!(self.state, ConnectionState::Offline);
        } else if live {
            prop_assert!(
                self.m.poll_timeout().is_some() || waiting || self.out.ws_open,
                "stuck in {:?}: no timer and nothing awaited",
                self.state
            );
        } else if self.state == ConnectionState::Closed {
            prop_assert_eq!(self.m.poll_timeout(), None);
        }
        let total: Duration = self
            .m
            .time_in_states(self.now)
            .iter()
            .map(|(_, d)| *d)
            .sum();
        prop_assert_eq!(total, self.now - self.start);
        Ok(())
    }

    fn apply(&mut self, step: &Step) -> Result<(), TestCaseError> {
        let now = self.now;
        let before = self.state;
        match step {
            Step::Advance(ms) => {
                let end = now + Duration::from_millis(*ms);
                for _ in 0..1000 {
                    match self.m.poll_timeout() {
                        Some(t) if t <= end => {
                            self.now = self.now.max(t);
                            self.m.handle_timeout(self.now);
                            self.drain()?;
                        }
                        _ => break,
                    }
                }
                self.now = end;
            }
            // Each report is given only when it answers something, as the driver does;
            // otherwise it is given anyway and must change nothing.
            Step::WsOpen => {
                let answers = std::mem::take(&mut self.out.ws_attempt);
                self.out.ws_open = answers || self.out.ws_open;
                self.m.on_ws_open(now);
                if !answers {
                    self.drain()?;
                    prop_assert_eq!(self.state, before, "a stray open changed the state");
                }
            }
            Step::WsFailed(f) => {
                self.out.ws_attempt = false;
                self.m.on_ws_failed(now, *f);
            }
            Step::WsClosed(kind) => {
                let answers = std::mem::take(&mut self.out.ws_open);
                self.m.on_ws_closed(now, *kind);
                if !answers {
                    self.drain()?;
                    prop_assert_eq!(self.state, before, "a stray close changed the state");
                }
            }
            Step::Activity => self.m.on_ws_activity(now),
            Step::PollOk(more) => {
                if std::mem::take(&mut self.out.poll) {
                    self.m.on_poll_ok(now, *more);
                }
            }
            Step::PollFailed(f) => {
                if std::mem::take(&mut self.out.poll) {
                    self.m.on_poll_failed(now, *f);
                }
            }
            Step::SendFailed(f) => self.m.on_http_failed(now, *f),
            Step::CursorExpired => {
                if std::mem::take(&mut self.out.poll) {
                    self.m.on_poll_cursor_expired(now);
                } else if self.out.ws_open {
                    self.m.on_cursor_expired(now);
                }
            }
            Step::ResyncDone => {
                let answers = std::mem::take(&mut self.out.resync);
                self.m.on_resync_done(now);
                if !answers {
                    self.drain()?;
                    prop_assert_eq!(self.state, before, "a stray resync changed the state");
                }
            }
            Step::ResyncFailed => {
                if std::mem::take(&mut self.out.resync) {
                    self.m.on_resync_failed(now, Failure::Network);
                }
            }
            Step::Token => {
                let answers = std::mem::take(&mut self.out.refresh);
                self.m.on_token(now);
                if !answers && before != ConnectionState::AuthFailed {
                    self.drain()?;
                    prop_assert_eq!(self.state, before, "a stray token changed the state");
                }
            }
            Step::TokenUnavailable => {
                if std::mem::take(&mut self.out.refresh) {
                    self.m.on_token_unavailable(now);
                }
            }
            Step::NetworkAvailable => self.m.network_available(now),
            Step::NetworkLost => self.m.network_lost(now),
            Step::Foreground => self.m.foreground(now),
            Step::Background => self.m.background(now),
            Step::AppRequest => self.m.on_app_request(now),
            Step::Shutdown => self.m.shutdown(now),
        }
        self.drain()?;
        if before == ConnectionState::AuthFailed && self.state != ConnectionState::AuthFailed {
            prop_assert!(
                matches!(step, Step::Token | Step::Shutdown),
                "left AuthFailed on {:?}",
                step
            );
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn the_machine_keeps_its_invariants(seed in any::<u64>(), steps in prop::collection::vec(step(), 1..120)) {
        let cfg = MachineConfig { jitter_seed: seed, ..MachineConfig::default() };
        let start = Instant::now();
        let mut run = Run {
            m: Machine::new(cfg.clone(), start),
            start,
            now: start,
            out: Outstanding::default(),
            state: ConnectionState::Offline,
            cfg,
        };
        run.m.start(start);
        run.drain()?;
        for step in &steps {
            run.apply(step)?;
        }
    }
}
