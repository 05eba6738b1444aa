//! The supervisor's reports: what the spawned tasks (WebSocket attempts, polls, HTTP
//! sends, pulls, the token provider) tell it when they end.

use super::*;

impl Supervisor {
    pub(super) async fn on_io(&mut self, io: Io) {
        let now = mono_now();
        if io.protocol_error() {
            self.protocol_errors = self.protocol_errors.saturating_add(1);
        }
        match io {
            Io::WsFailed(generation, error) => {
                if generation != self.ws_gen {
                    return; // an abandoned attempt
                }
                match error {
                    ConnectError::CursorExpired => {
                        // The poll that follows gets the same answer and starts the resync.
                        self.machine.on_ws_failed(now, Failure::Server);
                    }
                    ConnectError::Failed(failure, reason) => {
                        debug!(%reason, "WebSocket attempt failed");
                        self.machine.on_ws_failed(now, failure);
                    }
                }
            }
            Io::Token(Ok(())) => self.machine.on_token(now),
            Io::Token(Err(e)) => {
                warn!(error = %e, "the token provider gave no token");
                self.machine.on_token_unavailable(now);
            }
            Io::Poll(slot, Ok(more)) => {
                self.inbound_done(slot).await;
                self.machine.on_poll_ok(now, more);
            }
            Io::Poll(slot, Err(HttpError::Storage(e))) => {
                // The server answered; the store could not take the page. The cursor did
                // not move: the next poll fetches it again.
                warn!(error = %e, "could not record polled events");
                self.storage_failures = self.storage_failures.saturating_add(1);
                self.inbound_done(slot).await;
                self.machine.on_poll_ok(now, false);
            }
            Io::Poll(slot, Err(e)) if e.code() == Some(ErrorCode::CursorExpired) => {
                self.inbound_done(slot).await;
                self.machine.on_poll_cursor_expired(now);
            }
            Io::Poll(slot, Err(e)) => {
                debug!(error = %e, "poll failed");
                self.inbound_done(slot).await;
                self.machine.on_poll_failed(now, e.failure());
            }
            Io::Resync(slot, Ok(())) => {
                self.inbound_done(slot).await;
                self.machine.on_resync_done(now);
            }
            Io::Resync(slot, Err(e)) => {
                warn!(error = %e, "resync failed");
                self.inbound_done(slot).await;
                self.machine.on_resync_failed(now, e.failure());
            }
            Io::HttpDone {
                id,
                failure,
                retry_at,
                protocol_error,
            } => {
                if protocol_error {
                    self.protocol_errors = self.protocol_errors.saturating_add(1);
                }
                if let Some(id) = id {
                    self.http_in_flight.remove(&id);
                }
                if let Some(at) = retry_at {
                    self.note_outbox_due(at);
                }
                match failure {
                    Some(f) => self.machine.on_http_failed(now, f),
                    None => self.machine.on_http_ok(now),
                }
                // A slot is free: what waited for it goes now (a refused item's lane
                // goes on too).
                self.pump().await;
            }
            Io::CaughtUp(generation, slot, Err(HttpError::Storage(e))) => {
                // The connection is fine; the store is not: try again later, keeping it.
                if generation == self.ws_gen {
                    self.inbound.release(slot);
                    self.stall_inbound(&e);
                } else {
                    self.inbound_done(slot).await;
                }
            }
            Io::CaughtUp(generation, slot, result) => match result {
                Err(_) | Ok(false) if generation == self.ws_gen => {
                    // Without the whole catch-up the held deliveries could skip
                    // events: drop them and the connection; the next one resumes from
                    // the cursor (or catches up again).
                    match result {
                        Err(e) => warn!(error = %e, "catch-up failed; reconnecting"),
                        Ok(_) => warn!("catch-up did not reach the end; reconnecting"),
                    }
                    self.inbound.release(slot);
                    self.close_ws();
                    self.machine
                        .on_ws_closed(now, crate::machine::CloseKind::Lost);
                }
                _ => {
                    if generation == self.ws_gen && matches!(result, Ok(true)) {
                        self.storage_retry = STORAGE_RETRY_MIN;
                    }
                    self.inbound_done(slot).await;
                }
            },
            Io::SlotDropped => self.let_held_go().await,
            Io::Pulled(result) => {
                self.reconcile_in_flight = false;
                let bad_snapshots = result.as_ref().map_or(0, |p| p.bad_snapshots);
                if bad_snapshots > 0 {
                    warn!(
                        bad_snapshots,
                        "the server sent snapshots whose checksum does not match their data"
                    );
                    self.protocol_errors = self
                        .protocol_errors
                        .saturating_add(u64::try_from(bad_snapshots).unwrap_or(u64::MAX));
                }
                match result {
                    Ok(Pulled { changed, .. }) => {
                        self.isolate_ops = false;
                        self.pull_interval = if changed {
                            self.cfg.entity_pull_interval
                        } else {
                            // Nothing new: pull less often while idle.
                            self.pull_interval
                                .saturating_mul(2)
                                .min(self.cfg.entity_pull_idle_max)
                                .max(self.cfg.entity_pull_interval)
                        };
                        self.machine.on_http_ok(now);
                        self.spawn_reconcile(false).await;
                    }
                    Err(e) => {
                        if let HttpError::Storage(error) = &e {
                            // Not the server's fault: the connection state stays.
                            warn!(%error, "could not store a reconcile answer");
                            self.storage_failures = self.storage_failures.saturating_add(1);
                        } else if e.is_permanent() {
                            // One bad operation must not hold back the others: isolate it.
                            self.isolate_ops = true;
                        } else {
                            self.machine.on_http_failed(now, e.failure());
                        }
                        // The operations went back to the queue, due a little later.
                        // (at the earliest; the store says when the next one is due)
                        self.note_outbox_due(wall_later(now_wall(), ITEM_RETRY_MIN));
                    }
                }
            }
        }
    }
}
