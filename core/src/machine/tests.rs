//! Deterministic tests of the connection state machine: virtual time, no sleeping.
//! One test per row (or group of rows) of the transition table in `docs/client.md`.

use super::*;

/// A machine driven in virtual time.
struct H {
    m: Machine,
    now: Instant,
}

fn cfg() -> MachineConfig {
    MachineConfig {
        jitter_seed: 1,
        // The tests' timings are written for these two (the defaults may change).
        poll_interval: Duration::from_secs(2),
        probe_min: Duration::from_secs(2),
        ..MachineConfig::default()
    }
}

impl H {
    fn new() -> Self {
        Self::with(cfg())
    }

    fn with(cfg: MachineConfig) -> Self {
        let now = Instant::now();
        Self {
            m: Machine::new(cfg, now),
            now,
        }
    }

    /// Moves time forward by `d`, firing each timer at its own deadline.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        for _ in 0..10_000 {
            match self.m.poll_timeout() {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    self.m.handle_timeout(self.now);
                }
                _ => break,
            }
        }
        self.now = end;
    }

    fn ms(&mut self, ms: u64) {
        self.advance(Duration::from_millis(ms));
    }

    fn actions(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.m.poll_action()).collect()
    }

    /// The actions other than state changes.
    fn work(&mut self) -> Vec<Action> {
        self.actions()
            .into_iter()
            .filter(|a| !matches!(a, Action::StateChanged(_)))
            .collect()
    }

    /// How many polls were asked for.
    fn polls(&mut self) -> usize {
        self.actions()
            .iter()
            .filter(|a| **a == Action::Poll)
            .count()
    }

    fn changes(&mut self) -> Vec<StateChange> {
        self.actions()
            .into_iter()
            .filter_map(|a| match a {
                Action::StateChanged(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    fn state(&self) -> ConnectionState {
        self.m.state()
    }

    fn realtime() -> Self {
        let mut h = Self::new();
        h.m.start(h.now);
        h.m.on_ws_open(h.now);
        h.actions();
        assert_eq!(h.state(), ConnectionState::Realtime);
        h
    }

    fn polling() -> Self {
        let mut h = Self::new();
        h.m.start(h.now);
        h.m.on_ws_failed(h.now, Failure::Network);
        h.m.on_poll_ok(h.now, false);
        h.actions();
        assert_eq!(h.state(), ConnectionState::Polling);
        h
    }
}

use ConnectionState::*;

#[test]
fn start_opens_the_websocket_and_realtime_flushes_over_it() {
    let mut h = H::new();
    assert_eq!(h.state(), Offline);
    h.m.start(h.now);
    let a = h.actions();
    assert!(matches!(
        a[0],
        Action::StateChanged(StateChange {
            from: Offline,
            to: Connecting,
            reason: Reason::Start,
            ..
        })
    ));
    assert_eq!(a[1], Action::OpenWebSocket);
    h.m.on_ws_open(h.now);
    let a = h.actions();
    assert!(matches!(
        a[0],
        Action::StateChanged(StateChange {
            to: Realtime,
            reason: Reason::WebSocketOpened,
            ..
        })
    ));
    assert_eq!(a[1], Action::Flush(Route::WebSocket));
}

#[test]
fn a_refused_websocket_with_working_http_falls_to_polling_at_once() {
    let mut h = H::new();
    h.m.start(h.now);
    h.actions();
    h.m.on_ws_failed(h.now, Failure::Network);
    assert_eq!(h.work(), vec![Action::Poll], "HTTP is tried at once");
    h.m.on_poll_ok(h.now, false);
    let a = h.actions();
    let Action::StateChanged(change) = a[0] else {
        panic!("{a:?}")
    };
    assert_eq!((change.to, change.reason), (Polling, Reason::HttpWorks));
    let probe = change.next_retry_at.unwrap();
    assert!(
        probe >= h.now + Duration::from_secs(2),
        "next WebSocket probe is shown"
    );
    assert_eq!(
        a[1..],
        [Action::Flush(Route::Http)],
        "queued items go over HTTP"
    );
    h.ms(2000);
    assert_eq!(h.polls(), 1, "then it polls on its interval");
}

#[test]
fn polling_polls_on_its_interval_and_at_once_when_more_is_waiting() {
    let mut h = H::polling();
    h.ms(2000);
    assert_eq!(h.polls(), 1);
    h.m.on_poll_ok(h.now, true);
    h.ms(0);
    assert_eq!(h.polls(), 1, "a full page: fetch the next at once");
    h.m.on_poll_ok(h.now, false);
    h.ms(1999);
    assert_eq!(h.polls(), 0, "no poll before the interval");
    h.ms(1);
    assert_eq!(h.polls(), 1);
    h.ms(10_000);
    assert_eq!(h.polls(), 0, "no second poll while one is out");
}

#[test]
fn websocket_and_http_both_failing_goes_offline_with_a_retry_time() {
    let mut h = H::new();
    h.m.start(h.now);
    h.m.on_ws_failed(h.now, Failure::Network);
    h.actions();
    h.m.on_poll_failed(h.now, Failure::Network);
    let c = h.changes();
    assert_eq!((c[0].to, c[0].reason), (Offline, Reason::HttpFailed));
    let retry = c[0].next_retry_at.unwrap();
    let delay = retry - h.now;
    assert!(delay >= Duration::from_millis(500) && delay <= Duration::from_millis(1000));
    h.advance(delay);
    let a = h.actions();
    assert!(matches!(
        a[0],
        Action::StateChanged(StateChange {
            to: Connecting,
            reason: Reason::RetryTimer,
            ..
        })
    ));
    assert_eq!(a[1], Action::OpenWebSocket);
}

#[test]
fn a_websocket_refused_at_the_door_goes_offline_without_an_http_attempt() {
    let mut h = H::new();
    h.m.start(h.now);
    h.actions();
    h.m.on_ws_failed(h.now, Failure::Unreachable);
    let a = h.actions();
    assert!(
        !a.contains(&Action::Poll),
        "an HTTP attempt to the same closed port: {a:?}"
    );
    let c: Vec<_> = a
        .iter()
        .filter_map(|a| match a {
            Action::StateChanged(c) => Some(*c),
            _ => None,
        })
        .collect();
    assert_eq!((c[0].to, c[0].reason), (Offline, Reason::WebSocketFailed));
    let retry = c[0].next_retry_at.unwrap();
    h.advance(retry - h.now);
    assert!(h.actions().contains(&Action::OpenWebSocket));
    // Any other failure still asks whether HTTP works (a proxy that refuses upgrades).
    h.m.on_ws_failed(h.now, Failure::Network);
    assert!(h.actions().contains(&Action::Poll));
}

#[test]
fn a_refused_websocket_while_an_http_check_is_out_waits_for_its_answer() {
    let mut h = H::new();
    h.m.start(h.now);
    h.advance(MachineConfig::default().slow_connect);
    assert!(
        h.actions().contains(&Action::Poll),
        "a slow attempt checks HTTP"
    );
    h.m.on_ws_failed(h.now, Failure::Unreachable);
    assert_eq!(h.state(), Connecting);
    h.m.on_poll_ok(h.now, false);
    assert_eq!(h.state(), Polling);
}

#[test]
fn retry_delays_grow_to_the_maximum_with_jitter_and_differ_between_clients() {
    let delays = |seed: u64| {
        let mut h = H::with(MachineConfig {
            jitter_seed: seed,
            suspend_after: Duration::from_secs(3600),
            ..MachineConfig::default()
        });
        h.m.start(h.now);
        let mut out = Vec::new();
        for _ in 0..12 {
            h.m.on_ws_failed(h.now, Failure::Network);
            h.m.on_poll_failed(h.now, Failure::Network);
            let retry = h.m.next_retry_at().unwrap();
            out.push(retry - h.now);
            h.advance(retry - h.now);
            h.actions();
            assert_eq!(h.state(), Connecting);
        }
        out
    };
    let a = delays(1);
    let mut envelope = Duration::from_millis(500);
    for d in &a {
        let high = (Duration::from_millis(500) + envelope).min(Duration::from_secs(30));
        assert!(
            *d >= Duration::from_millis(500) && *d <= high,
            "{d:?} > {high:?}"
        );
        envelope = (envelope * 2).min(Duration::from_secs(30));
    }
    assert!(a[11] > Duration::from_secs(1), "the schedule grew");
    let b = delays(2);
    assert_ne!(a, b, "two clients do not retry in lock step");
}

#[test]
fn a_slow_websocket_makes_the_client_poll_meanwhile_then_climb_to_realtime() {
    let mut h = H::new();
    h.m.start(h.now);
    h.actions();
    h.ms(1499);
    assert!(h.work().is_empty());
    h.ms(1);
    assert_eq!(h.work(), vec![Action::Poll], "slow connect: try HTTP");
    h.m.on_poll_ok(h.now, false);
    assert_eq!(h.state(), Polling);
    h.actions();
    h.ms(100);
    h.m.on_ws_open(h.now);
    assert_eq!(h.state(), Realtime, "the slow attempt finished");
}

#[test]
fn a_websocket_attempt_is_abandoned_after_the_connect_timeout() {
    let mut h = H::new();
    h.m.start(h.now);
    h.actions();
    h.ms(1500);
    h.actions(); // the HTTP try
    h.m.on_poll_failed(h.now, Failure::Network); // HTTP down too; the attempt goes on
    assert_eq!(h.state(), Connecting);
    h.ms(8500);
    let a = h.work();
    assert_eq!(a, vec![Action::CloseWebSocket, Action::Poll]);
    h.m.on_poll_failed(h.now, Failure::Network);
    assert_eq!(h.state(), Offline);
}

#[test]
fn a_silent_socket_is_detected_by_the_heartbeat() {
    let mut h = H::realtime();
    h.ms(25_000);
    assert_eq!(h.work(), vec![Action::SendPing]);
    h.ms(5_000);
    h.m.on_ws_activity(h.now); // a pong: the next ping after 27.5 s of silence
    h.ms(27_499);
    assert_eq!(h.work(), vec![]);
    h.ms(1);
    assert_eq!(h.work(), vec![Action::SendPing]);
    h.ms(9_999);
    assert_eq!(h.state(), Realtime);
    h.ms(1);
    let a = h.actions();
    assert_eq!(a[0], Action::CloseWebSocket);
    assert!(matches!(
        a[1],
        Action::StateChanged(StateChange {
            from: Realtime,
            to: Connecting,
            reason: Reason::HeartbeatLost,
            ..
        })
    ));
    assert_eq!(a[2], Action::OpenWebSocket);
}

#[test]
fn a_server_that_pings_spares_the_client_its_own_pings() {
    let mut h = H::realtime();
    // The server's ping (answered by the WebSocket layer) arrives every 20 s.
    for _ in 0..30 {
        h.ms(20_000);
        h.m.on_ws_activity(h.now);
        assert!(!h.work().contains(&Action::SendPing));
    }
    assert_eq!(h.state(), Realtime);
    // It stops: the client pings after a ping interval (and a tenth) of silence, and
    // gives up after the pong timeout.
    h.ms(27_500);
    assert_eq!(h.work(), vec![Action::SendPing]);
    h.ms(10_000);
    assert_eq!(h.state(), Connecting);
}

#[test]
fn coming_to_the_foreground_checks_the_socket_quickly() {
    let mut h = H::realtime();
    h.ms(1000);
    h.m.background(h.now);
    // The OS froze the app: for 20 s no timer ran and nothing arrived.
    h.now += Duration::from_secs(20);
    h.actions();
    h.m.foreground(h.now);
    assert_eq!(h.work(), vec![Action::SendPing]);
    h.ms(3000);
    assert_eq!(
        h.state(),
        Connecting,
        "dead socket found within foreground_check"
    );
}

#[test]
fn while_polling_the_websocket_is_probed_and_success_returns_to_realtime() {
    let mut h = H::polling();
    let probe = h.m.next_retry_at().unwrap();
    h.advance(probe - h.now);
    assert!(h.work().contains(&Action::OpenWebSocket));
    h.m.on_ws_failed(h.now, Failure::Network);
    assert_eq!(h.state(), Polling, "a failed probe keeps polling");
    let next = h.m.next_retry_at().unwrap();
    assert!(next > h.now);
    h.advance(next - h.now);
    assert!(h.work().contains(&Action::OpenWebSocket));
    h.m.on_ws_open(h.now);
    let a = h.actions();
    assert!(matches!(
        a[0],
        Action::StateChanged(StateChange {
            from: Polling,
            to: Realtime,
            ..
        })
    ));
    assert_eq!(a[1], Action::Flush(Route::WebSocket));
}

#[test]
fn a_flapping_websocket_backs_off_and_a_stable_one_resets_the_probe_schedule() {
    let mut h = H::polling();
    let mut probes = Vec::new();
    for _ in 0..6 {
        let probe = h.m.next_retry_at().unwrap();
        probes.push(probe - h.now);
        h.advance(probe - h.now);
        h.actions();
        h.m.on_ws_open(h.now);
        h.ms(1000); // drops after a second
        h.m.on_ws_closed(h.now, CloseKind::Lost);
        // Lost early: no new socket; the poll finds HTTP alive.
        h.m.on_poll_ok(h.now, false);
        h.actions();
        assert_eq!(h.state(), Polling);
    }
    assert!(
        probes[5] > Duration::from_secs(8),
        "probes spaced out: {probes:?}"
    );
    // Now it holds for longer than stable_after: the next fall starts the schedule anew.
    let probe = h.m.next_retry_at().unwrap();
    h.advance(probe - h.now);
    h.m.on_ws_open(h.now);
    h.ms(31_000);
    h.m.on_ws_closed(h.now, CloseKind::Lost);
    h.m.on_ws_failed(h.now, Failure::Network);
    h.m.on_poll_ok(h.now, false);
    let first = h.m.next_retry_at().unwrap() - h.now;
    assert!(first <= Duration::from_secs(4), "{first:?}");
}

#[test]
fn polling_gives_up_for_offline_when_http_keeps_failing() {
    let mut h = H::polling();
    h.ms(2000);
    h.actions();
    h.m.on_poll_failed(h.now, Failure::Server);
    assert_eq!(h.state(), Polling, "one failure is tolerated");
    h.ms(2000);
    assert!(h.work().contains(&Action::Poll));
    h.m.on_poll_failed(h.now, Failure::Network);
    assert_eq!(h.state(), Offline);
}

#[test]
fn a_long_time_offline_becomes_suspended_with_slow_retries_until_a_hint() {
    let mut h = H::new();
    h.m.start(h.now);
    for _ in 0..100 {
        h.m.on_ws_failed(h.now, Failure::Network);
        h.m.on_poll_failed(h.now, Failure::Network);
        if h.state() == Suspended {
            break;
        }
        let retry = h.m.next_retry_at().unwrap();
        h.advance(retry - h.now);
        h.actions();
    }
    assert_eq!(h.state(), Suspended);
    let wait = h.m.next_retry_at().unwrap() - h.now;
    assert!(wait >= Duration::from_secs(150), "{wait:?}");
    h.actions();
    h.m.network_available(h.now);
    let a = h.actions();
    assert!(matches!(
        a[0],
        Action::StateChanged(StateChange {
            from: Suspended,
            to: Connecting,
            reason: Reason::NetworkAvailable,
            ..
        })
    ));
    assert_eq!(a[1], Action::OpenWebSocket);
}

#[test]
fn refused_fresh_tokens_are_refreshed_up_to_the_limit_then_the_state_is_auth_failed() {
    let mut h = H::new();
    h.m.start(h.now);
    h.actions();
    h.m.on_ws_failed(h.now, Failure::Auth);
    for _ in 0..MAX_UNPROVEN_REFRESHES {
        assert_eq!(h.work(), vec![Action::RefreshToken]);
        h.m.on_token(h.now);
        assert_eq!(h.work(), vec![Action::OpenWebSocket]);
        h.m.on_ws_failed(h.now, Failure::Auth);
    }
    let a = h.actions();
    assert!(matches!(
        a[0],
        Action::StateChanged(StateChange { to: AuthFailed, .. })
    ));
    // Terminal: time and network do nothing.
    assert_eq!(h.m.poll_timeout(), None);
    h.m.network_available(h.now);
    h.ms(600_000);
    assert!(h.actions().is_empty());
    // A new token from the app leaves it.
    h.m.on_token(h.now);
    assert_eq!(h.state(), Connecting);
    assert_eq!(h.work(), vec![Action::OpenWebSocket]);
}

#[test]
fn a_token_expiring_mid_session_is_refreshed_and_the_session_resumes() {
    let mut h = H::realtime();
    h.ms(20_000);
    h.actions();
    h.m.on_ws_closed(h.now, CloseKind::AuthExpired);
    let a = h.actions();
    assert_eq!(a[0], Action::RefreshToken);
    assert!(matches!(
        a[1],
        Action::StateChanged(StateChange {
            to: Connecting,
            reason: Reason::AuthRejected,
            ..
        })
    ));
    h.m.on_token(h.now);
    assert_eq!(h.work(), vec![Action::OpenWebSocket]);
    h.m.on_ws_open(h.now);
    assert_eq!(h.state(), Realtime);
    h.actions();
    // A later expiry is again refreshed (the earlier refresh was proven good).
    h.m.on_ws_closed(h.now, CloseKind::AuthExpired);
    assert_eq!(h.work(), vec![Action::RefreshToken]);
}

#[test]
fn an_http_401_while_the_websocket_is_up_refreshes_the_token_and_stays_realtime() {
    // Found by the chaos suite (seed 8336522610656984065): a Class D transaction
    // refused 401 while the socket was up put the client in Connecting with the socket
    // open, and the fresh token never took it out: the outbox stopped.
    let mut h = H::realtime();
    h.m.on_http_failed(h.now, Failure::Auth);
    assert_eq!(h.work(), vec![Action::RefreshToken]);
    assert_eq!(h.state(), Realtime);
    h.m.on_token(h.now);
    assert_eq!(h.state(), Realtime);
    h.m.on_ws_activity(h.now);
    h.ms(10_000);
    assert_eq!(h.state(), Realtime, "nothing stuck, nothing reconnected");
}

#[test]
fn a_fresh_token_that_expires_before_it_was_ever_used_is_refreshed_again() {
    // Refreshed, then offline for longer than the token lives: when the network
    // returns the server refuses it. That is no reason to give up.
    let mut h = H::new();
    h.m.start(h.now);
    h.actions();
    h.m.on_ws_failed(h.now, Failure::Auth);
    assert_eq!(h.work(), vec![Action::RefreshToken]);
    h.m.on_token(h.now);
    assert_eq!(h.work(), vec![Action::OpenWebSocket]);
    h.m.on_ws_failed(h.now, Failure::Network);
    h.m.on_http_failed(h.now, Failure::Network);
    h.ms(3_600_000);
    h.actions();
    h.m.network_available(h.now);
    h.actions();
    h.m.on_http_failed(h.now, Failure::Auth);
    assert_eq!(h.work(), vec![Action::RefreshToken]);
    assert_ne!(h.state(), AuthFailed);
    // Once a request gets through, the count starts again.
    h.m.on_token(h.now);
    h.actions();
    h.m.on_ws_open(h.now);
    assert_eq!(h.state(), Realtime);
    h.actions();
    for _ in 0..MAX_UNPROVEN_REFRESHES {
        h.m.on_ws_closed(h.now, CloseKind::AuthExpired);
        assert_eq!(h.work(), vec![Action::RefreshToken]);
        h.m.on_token(h.now);
        h.work();
        h.m.on_ws_open(h.now);
        assert_eq!(h.state(), Realtime);
        h.actions();
    }
}

#[test]
fn no_token_from_the_provider_is_auth_failed() {
    let mut h = H::new();
    h.m.start(h.now);
    h.m.on_ws_failed(h.now, Failure::Auth);
    h.actions();
    h.m.on_token_unavailable(h.now);
    assert_eq!(h.state(), AuthFailed);
}

#[test]
fn an_expired_cursor_resyncs_then_returns_to_the_transport_that_works() {
    let mut h = H::realtime();
    h.m.on_cursor_expired(h.now);
    let a = h.actions();
    assert!(matches!(
        a[0],
        Action::StateChanged(StateChange {
            to: Resyncing,
            reason: Reason::CursorExpired,
            ..
        })
    ));
    assert_eq!(a[1], Action::Resync);
    h.m.on_resync_done(h.now);
    assert_eq!(h.state(), Realtime);

    let mut h = H::polling();
    h.m.on_cursor_expired(h.now);
    assert_eq!(h.state(), Resyncing);
    assert_eq!(h.work(), vec![Action::Resync]);
    h.m.on_resync_done(h.now);
    assert_eq!(h.state(), Polling);
    assert!(
        h.work().contains(&Action::OpenWebSocket),
        "the WebSocket is tried again at once"
    );
}

/// A resync refused for its token while the socket stays up is started again with the
/// fresh token (it stayed Resyncing, with no resync running, for as long as the socket
/// lived).
#[test]
fn a_resync_refused_for_its_token_goes_again_with_the_fresh_one() {
    let mut h = H::realtime();
    h.m.on_cursor_expired(h.now);
    assert!(h.work().contains(&Action::Resync));
    h.m.on_resync_failed(h.now, Failure::Auth);
    assert!(h.work().contains(&Action::RefreshToken));
    assert_eq!(h.state(), Resyncing);
    h.m.on_token(h.now);
    assert_eq!(h.work(), vec![Action::Resync]);
    h.m.on_resync_done(h.now);
    assert_eq!(h.state(), Realtime);
}

#[test]
fn a_failed_resync_is_done_first_on_the_next_connection() {
    let mut h = H::polling();
    h.m.on_cursor_expired(h.now);
    h.actions();
    h.m.on_resync_failed(h.now, Failure::Network);
    assert_eq!(h.state(), Offline);
    let retry = h.m.next_retry_at().unwrap();
    h.advance(retry - h.now);
    h.actions();
    h.m.on_ws_open(h.now);
    assert_eq!(h.state(), Resyncing, "continuity first");
    assert!(h.work().contains(&Action::Resync));
    h.m.on_resync_done(h.now);
    assert_eq!(h.state(), Realtime);
}

#[test]
fn a_full_server_is_not_retried_before_its_retry_after() {
    let mut h = H::new();
    h.m.start(h.now);
    h.m.on_ws_failed(
        h.now,
        Failure::ServerFull {
            retry_after: Some(Duration::from_secs(20)),
        },
    );
    h.m.on_poll_failed(
        h.now,
        Failure::ServerFull {
            retry_after: Some(Duration::from_secs(20)),
        },
    );
    assert_eq!(h.state(), Offline);
    assert!(h.m.next_retry_at().unwrap() >= h.now + Duration::from_secs(20));
}

#[test]
fn a_server_going_away_is_not_hammered_at_once() {
    let mut h = H::realtime();
    h.m.on_ws_closed(h.now, CloseKind::GoingAway);
    let c = h.changes();
    assert_eq!((c[0].to, c[0].reason), (Offline, Reason::ServerGoingAway));
    assert!(c[0].next_retry_at.unwrap() >= h.now + Duration::from_millis(500));
    assert!(h.work().is_empty(), "no immediate reconnect");
}

#[test]
fn losing_the_network_closes_the_socket_and_goes_offline() {
    let mut h = H::realtime();
    h.m.network_lost(h.now);
    let a = h.actions();
    assert_eq!(a[0], Action::CloseWebSocket);
    assert!(matches!(
        a[1],
        Action::StateChanged(StateChange {
            to: Offline,
            reason: Reason::NetworkLost,
            ..
        })
    ));
}

#[test]
fn shutdown_closes_everything_and_is_final() {
    let mut h = H::realtime();
    h.m.shutdown(h.now);
    let a = h.actions();
    assert_eq!(a[0], Action::CloseWebSocket);
    assert!(matches!(
        a[1],
        Action::StateChanged(StateChange {
            to: Closed,
            reason: Reason::Shutdown,
            ..
        })
    ));
    assert_eq!(h.m.poll_timeout(), None);
    h.m.network_available(h.now);
    h.m.on_token(h.now);
    h.m.start(h.now);
    h.ms(100_000);
    assert!(h.actions().is_empty());
    assert_eq!(h.state(), Closed);
}

#[test]
fn time_in_each_state_is_accounted() {
    let mut h = H::new();
    h.m.start(h.now);
    h.ms(300);
    h.m.on_ws_open(h.now);
    h.ms(5000);
    let t: std::collections::HashMap<_, _> = h.m.time_in_states(h.now).into_iter().collect();
    assert_eq!(t[&Connecting], Duration::from_millis(300));
    assert_eq!(t[&Realtime], Duration::from_millis(5000));
}

#[test]
fn a_huge_retry_hint_neither_panics_nor_retries_at_once() {
    // Before the clamp, `now + after` overflowed `Instant` and panicked.
    for huge in [
        Duration::MAX,
        Duration::from_millis(u64::MAX),
        Duration::from_millis(8_300_000_000_000_000),
    ] {
        let mut h = H::new();
        h.m.start(h.now);
        let full = Failure::ServerFull {
            retry_after: Some(huge),
        };
        h.m.on_ws_failed(h.now, full);
        h.m.on_poll_failed(h.now, full);
        assert_eq!(h.state(), Offline);
        let retry = h.m.next_retry_at().unwrap();
        assert!(retry > h.now, "not at once");
        assert!(
            retry <= h.now + MAX_SERVER_DELAY,
            "clamped to {MAX_SERVER_DELAY:?}"
        );
        h.advance(MAX_SERVER_DELAY);
        assert_eq!(
            h.state(),
            Connecting,
            "retried once the clamped wait passed"
        );
    }
}

#[test]
fn a_huge_ping_interval_from_the_server_is_clamped() {
    let mut h = H::realtime();
    h.m.set_ping_interval(Duration::MAX);
    h.m.on_ws_activity(h.now);
    // The next ping waits for the clamped interval (and a tenth) of silence.
    h.advance(MAX_SERVER_DELAY + MAX_SERVER_DELAY / 10 + Duration::from_secs(60));
    assert!(h.work().contains(&Action::SendPing));
}

// ---- the app in the background ----------------------------------------------------------

#[test]
fn backgrounded_the_client_lingers_then_parks_without_any_timer() {
    let mut h = H::realtime();
    let linger = cfg().background_linger;
    h.m.background(h.now);
    h.advance(linger - Duration::from_millis(1));
    assert_eq!(h.state(), Realtime, "sends finish and replies arrive first");
    h.ms(1);
    let a = h.actions();
    assert!(a.contains(&Action::CloseWebSocket), "{a:?}");
    let c: Vec<_> = a
        .iter()
        .filter_map(|a| match a {
            Action::StateChanged(c) => Some(*c),
            _ => None,
        })
        .collect();
    assert_eq!(
        (c[0].to, c[0].reason, c[0].next_retry_at),
        (Offline, Reason::Background, None)
    );
    assert!(h.m.is_parked());
    assert_eq!(
        h.m.poll_timeout(),
        None,
        "no heartbeat, retry or poll while parked"
    );
    // The network coming and going does not wake it either.
    h.m.network_available(h.now);
    h.m.network_lost(h.now);
    h.advance(Duration::from_secs(24 * 3600));
    assert_eq!(h.actions(), vec![]);
    assert_eq!(h.state(), Offline);
}

#[test]
fn an_app_request_in_the_background_connects_then_parks_again() {
    let mut h = H::realtime();
    h.m.background(h.now);
    h.advance(Duration::from_secs(3600));
    assert!(h.m.is_parked());
    h.actions();
    h.m.on_app_request(h.now);
    let c = h.changes();
    assert_eq!((c[0].to, c[0].reason), (Connecting, Reason::AppRequest));
    h.m.on_ws_open(h.now);
    assert_eq!(h.state(), Realtime);
    assert!(h.actions().contains(&Action::Flush(Route::WebSocket)));
    // Each request pushes the parking back by the linger.
    let linger = cfg().background_linger;
    h.advance(linger / 2);
    h.m.on_app_request(h.now);
    h.advance(linger - Duration::from_millis(1));
    assert_eq!(h.state(), Realtime);
    h.ms(1);
    assert_eq!(h.state(), Offline);
    assert!(h.m.is_parked());
}

#[test]
fn back_in_the_foreground_a_parked_client_connects_at_once() {
    let mut h = H::with(MachineConfig {
        background_linger: Duration::ZERO,
        ..cfg()
    });
    h.m.start(h.now);
    h.m.on_ws_open(h.now);
    h.actions();
    h.m.background(h.now);
    assert!(h.m.is_parked(), "a zero linger parks at once");
    h.actions();
    h.m.foreground(h.now);
    let a = h.actions();
    assert!(a.contains(&Action::OpenWebSocket), "{a:?}");
    assert_eq!(h.state(), Connecting);
    assert!(!h.m.is_parked());
    // Lingering, coming back changes nothing: the connection was never dropped.
    let mut h = H::realtime();
    h.m.background(h.now);
    h.ms(100);
    h.m.foreground(h.now);
    h.m.on_ws_activity(h.now); // the server answers the foreground check
    h.advance(cfg().background_linger * 2);
    assert_eq!(h.state(), Realtime);
    assert!(!h.m.is_parked());
}

#[test]
fn backgrounded_while_auth_failed_a_new_token_connects_and_parks_again() {
    let mut h = H::new();
    h.m.start(h.now);
    for _ in 0..10 {
        h.m.on_ws_failed(h.now, Failure::Auth);
        h.actions();
        if h.state() == AuthFailed {
            break;
        }
        h.m.on_token(h.now);
        h.actions();
    }
    assert_eq!(h.state(), AuthFailed);
    h.m.background(h.now);
    h.advance(Duration::from_secs(3600));
    h.m.on_token(h.now);
    assert_eq!(h.state(), Connecting, "the new token is the app's request");
    h.advance(Duration::from_millis(200));
    h.m.on_ws_open(h.now);
    assert_eq!(h.state(), Realtime);
    h.advance(cfg().background_linger.max(APP_REQUEST_MIN_LINGER));
    assert!(h.m.is_parked(), "and it parks again");
}

#[test]
fn an_app_request_while_lingering_offline_connects_at_once() {
    let mut h = H::new();
    h.m.start(h.now);
    h.m.on_ws_failed(h.now, Failure::Unreachable);
    assert_eq!(h.state(), Offline);
    h.actions();
    h.m.background(h.now);
    h.m.on_app_request(h.now);
    assert!(
        h.actions().contains(&Action::OpenWebSocket),
        "no waiting for the retry"
    );
}

#[test]
fn with_a_zero_linger_an_app_request_still_gets_its_connection() {
    let mut h = H::with(MachineConfig {
        background_linger: Duration::ZERO,
        ..cfg()
    });
    h.m.start(h.now);
    h.m.on_ws_open(h.now);
    h.m.background(h.now);
    assert!(h.m.is_parked());
    h.actions();
    h.m.on_app_request(h.now);
    h.ms(200); // the handshake
    h.m.on_ws_open(h.now);
    assert_eq!(
        h.state(),
        Realtime,
        "not parked again before the connection opened"
    );
    h.advance(APP_REQUEST_MIN_LINGER);
    assert!(h.m.is_parked());
}

#[test]
fn answers_that_arrive_after_parking_do_not_reconnect() {
    let mut h = H::polling();
    assert!(h.m.poll_timeout().is_some());
    h.advance(Duration::from_secs(2)); // a poll goes out
    h.m.background(h.now);
    h.advance(cfg().background_linger);
    assert!(h.m.is_parked());
    h.actions();
    h.m.on_poll_failed(h.now, Failure::Network);
    h.m.on_cursor_expired(h.now);
    h.m.on_http_ok(h.now);
    assert_eq!(h.actions(), vec![]);
    assert_eq!(h.state(), Offline);
    assert_eq!(h.m.poll_timeout(), None);
}

#[test]
fn a_socket_that_keeps_breaking_right_after_opening_is_not_reopened_in_a_loop() {
    let mut h = H::realtime();
    let mut opens = Vec::new();
    for _ in 0..8 {
        h.ms(200); // each socket lives 200 ms
        h.m.on_ws_closed(h.now, CloseKind::Lost);
        let work = h.work();
        assert!(
            !work.contains(&Action::OpenWebSocket),
            "not reopened at once: {work:?}"
        );
        // HTTP is tried instead (a poll asked for now, or already out).
        assert_eq!(h.state(), Connecting);
        h.m.on_poll_ok(h.now, false);
        assert_eq!(h.state(), Polling);
        // The next socket comes with the probe, later each time.
        let broke = h.now;
        let mut reopened = None;
        for _ in 0..10_000 {
            h.ms(100);
            let work = h.work();
            if work.contains(&Action::OpenWebSocket) {
                reopened = Some(h.now - broke);
                break;
            }
            if work.contains(&Action::Poll) {
                h.m.on_poll_ok(h.now, false);
            }
        }
        opens.push(reopened.expect("probed again within 1000 s"));
        h.m.on_ws_open(h.now);
        h.actions();
        assert_eq!(h.state(), Realtime);
    }
    assert!(
        opens.iter().all(|d| *d >= Duration::from_secs(1)),
        "never a tight loop: {opens:?}"
    );
    assert!(
        opens[7] > opens[0] * 2,
        "the schedule grows while sockets keep breaking: {opens:?}"
    );
    // One that held past `stable_after` is reopened at once, on a fresh schedule.
    h.ms(31_000);
    h.m.on_ws_closed(h.now, CloseKind::Lost);
    assert!(h.work().contains(&Action::OpenWebSocket));
}

#[test]
fn a_socket_gone_silent_soon_after_opening_is_not_reopened_at_once() {
    let mut c = cfg();
    c.ping_interval = Duration::from_secs(1);
    c.pong_timeout = Duration::from_secs(1);
    let mut h = H::with(c);
    h.m.start(h.now);
    h.m.on_ws_open(h.now);
    h.actions();
    h.ms(3_000); // a ping after 1.1 s of silence, no pong within 1 s
    let work = h.work();
    assert!(work.contains(&Action::CloseWebSocket), "{work:?}");
    assert!(
        !work.contains(&Action::OpenWebSocket),
        "held 2 s, under stable_after: no new socket at once: {work:?}"
    );
    assert_eq!(h.state(), Connecting);
    h.m.on_poll_ok(h.now, false);
    assert_eq!(h.state(), Polling, "HTTP answers: Polling, the probe later");
}
