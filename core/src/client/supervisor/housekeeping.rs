//! The supervisor's timers: the one deadline it sleeps until (no fixed tick), what is
//! due then, and the pruning of settled outbox items.

use super::*;

impl Supervisor {
    /// The earliest time something is due: the machine's timers, an unacknowledged
    /// WebSocket send, pruning, and, while connected, an outbox item due again, the next
    /// entity pull and (only while one is undecided) the next transaction check. `None`:
    /// nothing until an event.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let mut deadlines = vec![self.machine.poll_timeout()];
        deadlines.push(
            self.ws_in_flight
                .values()
                .min()
                .map(|sent| later(*sent, self.cfg.ack_timeout)),
        );
        // Parked in the background: only what the app asks for (no pruning either).
        if !self.machine.is_parked() {
            let interval = self.prune_every();
            deadlines.push(Some(
                self.last_prune
                    .map_or_else(mono_now, |t| later(t, interval)),
            ));
        }
        if self.machine.state().is_connected() {
            deadlines.push(self.inbound_stalled);
            deadlines.push(self.outbox_due);
            if !self.reconcile_in_flight {
                deadlines.push(Some(
                    self.last_pull
                        .map_or_else(mono_now, |t| later(t, self.pull_interval)),
                ));
            }
            if self.tx_pending {
                deadlines.push(Some(self.last_tx_check.map_or_else(mono_now, |t| {
                    later(t, self.cfg.transaction_check_interval)
                })));
            }
        }
        deadlines.into_iter().flatten().min()
    }

    /// Does what is due at a deadline (see [`Self::next_deadline`]).
    pub(super) async fn on_deadline(&mut self) {
        let now = mono_now();
        if self.machine.poll_timeout().is_some_and(|t| t <= now) {
            self.machine.handle_timeout(now);
        }
        // Unacknowledged WebSocket sends: try again (same id; the server dedupes).
        let stale: Vec<String> = self
            .ws_in_flight
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) >= self.cfg.ack_timeout)
            .map(|(id, _)| id.clone())
            .collect();
        let resend = !stale.is_empty();
        if resend {
            for id in &stale {
                self.ws_in_flight.remove(id);
            }
            let wall = now_wall();
            let requeued = self
                .store
                .call(move |s| {
                    for id in stale {
                        // Already accepted through another path: nothing to do.
                        let _ = s.mark_failed(&id, "no ack in time", wall, wall);
                    }
                    Ok(())
                })
                .await;
            if let Err(e) = requeued {
                warn!(error = %e, "could not requeue unacknowledged sends");
            }
        }
        self.prune_settled(now).await;
        if !self.machine.state().is_connected() {
            return;
        }
        if self.inbound_stalled.is_some_and(|t| t <= now) {
            self.inbound_stalled = None;
            // Fetch what the store could not take, from the cursor (a connection that
            // polls does so anyway).
            if self.ws.is_some() && self.machine.state() == ConnectionState::Realtime {
                self.catch_up(self.ws_gen).await;
            }
        }
        let outbox_due = self.outbox_due.is_some_and(|t| t <= now);
        if outbox_due {
            self.outbox_due = None;
        }
        if resend || outbox_due {
            self.pump().await;
        }
        if self
            .last_pull
            .is_none_or(|t| now.saturating_duration_since(t) >= self.pull_interval)
        {
            // Set here too: a pull that could not start is not tried again at once.
            self.last_pull = Some(now);
            self.spawn_reconcile(true).await;
        } else if outbox_due {
            self.spawn_reconcile(false).await;
        }
        if outbox_due {
            self.find_outbox_due().await;
        }
        if self.tx_pending
            && self.last_tx_check.is_none_or(|t| {
                now.saturating_duration_since(t) >= self.cfg.transaction_check_interval
            })
        {
            self.last_tx_check = Some(now);
            self.check_transactions().await;
        }
    }

    /// An outbox item is due again at `at`: wake up then (if nothing else sends it).
    pub(super) fn note_outbox_due(&mut self, at: chrono::DateTime<chrono::Utc>) {
        let at = instant_of(at);
        self.outbox_due = Some(self.outbox_due.map_or(at, |t| t.min(at)));
    }

    /// Looks in the store for the next item due later than now (left by an earlier run,
    /// or failed while another was due), so that it is not waited for in vain.
    pub(super) async fn find_outbox_due(&mut self) {
        let wall = now_wall();
        match self.store.call(move |s| s.next_attempt_after(wall)).await {
            Ok(Some(at)) => self.note_outbox_due(at),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "outbox read failed"),
        }
    }

    /// The network is back (a hint from the app, or a transport works again): items
    /// that failed on the network (marked so in the store, by this run or an earlier
    /// one) are due now rather than at the end of their backoff, and are sent.
    pub(super) async fn retry_network_waits(&mut self) {
        let wall = now_wall();
        match self.store.call(move |s| s.network_back(wall)).await {
            Ok(0) => {}
            Ok(n) => {
                debug!(items = n, "network back: items waiting for it are due now");
                self.pump().await;
            }
            Err(e) => warn!(error = %e, "outbox write failed"),
        }
    }

    /// A new HTTP connection pool (see [`HttpApi::fresh`]); the old one if that fails.
    pub(super) fn renew_http_pool(&mut self) {
        match self.http.fresh() {
            Ok(http) => self.http = http,
            Err(e) => warn!(error = %e, "could not renew the HTTP connection pool"),
        }
    }

    /// How often the store is pruned (see [`Self::prune_settled`]).
    fn prune_every(&self) -> Duration {
        self.cfg
            .settled_retention
            .map_or(PRUNE_INTERVAL, prune_interval)
    }

    /// Deletes outbox items settled longer ago than `settled_retention` (accepted
    /// messages and operations, decided transactions), every `PRUNE_INTERVAL`, so that
    /// the outbox holds what is still to do plus a recent history, not everything ever
    /// sent. Dead items and undecided transactions are never pruned. The ids of events
    /// received long ago go too.
    pub(super) async fn prune_settled(&mut self, now: Instant) {
        if self.machine.is_parked() {
            return;
        }
        let interval = self.prune_every();
        if self
            .last_prune
            .is_some_and(|t| now.saturating_duration_since(t) < interval)
        {
            return;
        }
        self.last_prune = Some(now);
        // `None` (no retention, or one beyond the calendar): kept forever.
        if let Some(before) = self
            .cfg
            .settled_retention
            .and_then(|retention| prune_before(now_wall(), retention))
        {
            match self.store.call(move |s| s.prune_settled(before)).await {
                Ok(0) => {}
                Ok(n) => debug!(pruned = n, "settled outbox items pruned"),
                Err(e) => warn!(error = %e, "pruning settled outbox items failed"),
            }
        }
        // The ids of events received, kept to refuse a redelivery: an event at or
        // below the cursor is refused by its sequence anyway, and one older than the
        // server keeps (7 days by default) is not delivered again. Without this the
        // table grew by a row per event, for good.
        let Some(seen_before) = prune_before(now_wall(), SEEN_RETENTION) else {
            return;
        };
        match self
            .store
            .call(move |s| s.prune_seen(seen_before, SEEN_KEEP))
            .await
        {
            Ok(0) => {}
            Ok(n) => debug!(pruned = n, "ids of events received long ago pruned"),
            Err(e) => warn!(error = %e, "pruning the ids of received events failed"),
        }
    }
}

/// How often settled items are pruned: every [`PRUNE_INTERVAL`], and a short retention
/// is kept short (pruned at least once per retention period, at most once a second).
pub(super) fn prune_interval(retention: Duration) -> Duration {
    PRUNE_INTERVAL.min(retention.max(Duration::from_secs(1)))
}
