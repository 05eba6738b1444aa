//! The supervisor's outbound side: the outbox pumped over the WebSocket or HTTP, one in
//! flight per lane; Class D transactions submitted and their status checked.

use super::*;

impl Supervisor {
    /// Sends what can be sent now: messages over the WebSocket in Realtime (socket open),
    /// over HTTP otherwise; transactions always over HTTP; operations in batches
    /// elsewhere ([`Self::spawn_reconcile`]).
    pub(super) async fn pump(&mut self) {
        if !self.machine.state().is_connected() {
            return;
        }
        let window = self.cfg.send_window.max(1);
        let now = now_wall();
        let heads = match self
            .store
            .call(move |s| s.next_sendable(now, window.saturating_mul(4)))
            .await
        {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, "outbox read failed");
                return;
            }
        };
        // Seqs grow in commit order: a read that returned an item saw every item
        // committed before it.
        if let Some(last) = heads.iter().map(|item| item.seq).max() {
            self.pumped_through = self.pumped_through.max(last);
        }
        self.send_heads(heads).await;
    }

    /// A new item that heads its lane, handed over by the store as soon as it was
    /// written: sent as a pump sends its heads, without reading the outbox again. One a
    /// pump has read already (it may be on the wire, even acknowledged) is left to the
    /// pumps. (Hand-overs come in commit order, so each has a greater `seq` than the
    /// one before.)
    pub(super) async fn send_new(&mut self, item: OutboxItem) {
        if item.seq <= self.pumped_through {
            self.pump().await;
            return;
        }
        self.pumped_through = item.seq;
        self.send_heads(vec![item]).await;
    }

    /// Sends lane heads, oldest first, as far as the windows allow: the shared part of
    /// [`Self::pump`] and [`Self::send_new`].
    async fn send_heads(&mut self, heads: Vec<OutboxItem>) {
        let state = self.machine.state();
        if !state.is_connected() {
            return;
        }
        let realtime = state == ConnectionState::Realtime && self.ws.is_some();
        let window = self.cfg.send_window.max(1);
        for item in heads {
            match item.kind {
                ItemKind::Message if realtime => {
                    // A head already on the wire keeps its lane waiting for the ack.
                    if self.ws_in_flight.contains_key(&item.id) || self.ws_in_flight.len() >= window
                    {
                        continue;
                    }
                    self.send_over_ws(item).await;
                }
                ItemKind::Message => {
                    if self.http_in_flight.len() < HTTP_SEND_WINDOW {
                        self.send_over_http(item).await;
                    }
                }
                ItemKind::Transaction => {
                    if self.http_in_flight.len() < HTTP_SEND_WINDOW {
                        self.submit_transaction(item).await;
                    }
                }
                // Operations go in batches to the reconcile endpoint (on an edit, and
                // on the tick), not one by one.
                ItemKind::Operation => {}
            }
        }
    }

    /// Reads a message item's body and marks it in flight; `None` when it cannot be
    /// sent (an unreadable body makes it dead; a refused transition leaves it).
    pub(super) async fn start_message(
        &mut self,
        item: &OutboxItem,
    ) -> Option<(SendMessage, OutboxItem)> {
        let message: SendMessage = match serde_json::from_value(item.body.clone()) {
            Ok(m) => m,
            Err(e) => {
                self.kill(&item.id, format!("unreadable message body: {e}"))
                    .await;
                return None;
            }
        };
        let id = item.id.clone();
        let now = now_wall();
        let sent = self
            .store
            .call(move |s| s.mark_in_flight(&id, now))
            .await
            .ok()?;
        Some((message, sent))
    }

    /// Sends a message over the WebSocket. Its "in flight" state is kept in memory only
    /// (the store still says `persisted`): a crash resends it with the same id, which
    /// is what recovering `in_flight` at open would do anyway, and the send costs no
    /// commit (no fsync). The ack commits `accepted`.
    pub(super) async fn send_over_ws(&mut self, item: OutboxItem) {
        let message: SendMessage = match serde_json::from_value(item.body.clone()) {
            Ok(m) => m,
            Err(e) => {
                self.kill(&item.id, format!("unreadable message body: {e}"))
                    .await;
                return;
            }
        };
        if self.send_frame(&ClientEvent::Message(message), Some(&item.id)) {
            self.ws_in_flight.insert(item.id.clone(), mono_now());
            let mut update = OutboxUpdate::from(&item);
            update.state = ItemState::InFlight;
            self.emit(Update::Outbox(update));
        }
    }

    pub(super) async fn kill(&mut self, id: &str, reason: String) {
        let id = id.to_owned();
        let now = now_wall();
        if let Ok(item) = self
            .store
            .call(move |s| s.mark_dead(&id, &reason, now))
            .await
        {
            self.emit(Update::Outbox((&item).into()));
        }
    }

    pub(super) async fn send_over_http(&mut self, item: OutboxItem) {
        let Some((message, sent)) = self.start_message(&item).await else {
            return;
        };
        self.emit(Update::Outbox((&sent).into()));
        self.http_in_flight.insert(item.id.clone());
        let (store, http, tokens, io, updates) = self.task_parts();
        self.tasks.spawn(async move {
            let result = with_token(&tokens, |token| {
                let (http, message) = (&http, &message);
                async move { http.post_message(&token, message).await }
            })
            .await;
            let protocol_error = matches!(result, Err(HttpError::Protocol(_)));
            let (failure, retry_at) = settle_http(
                &store,
                &updates,
                &sent,
                result.map(|a| a.sequence.to_string()),
            )
            .await;
            let _ = io.send(Io::HttpDone {
                id: Some(sent.id.clone()),
                failure,
                retry_at,
                protocol_error,
            });
        });
    }

    pub(super) async fn submit_transaction(&mut self, item: OutboxItem) {
        let request: TransactionRequest = match serde_json::from_value(item.body.clone()) {
            Ok(r) => r,
            Err(e) => {
                self.kill(&item.id, format!("unreadable transaction body: {e}"))
                    .await;
                return;
            }
        };
        let id = item.id.clone();
        let now = now_wall();
        let Ok(sent) = self.store.call(move |s| s.mark_in_flight(&id, now)).await else {
            return;
        };
        self.http_in_flight.insert(item.id.clone());
        // Its decision is checked for until it comes.
        self.tx_pending = true;
        let (store, http, tokens, io, updates) = self.task_parts();
        self.tasks.spawn(async move {
            let result = with_token(&tokens, |token| {
                let (http, id, request) = (&http, &sent.id, &request);
                async move { http.submit_transaction(&token, id, request).await }
            })
            .await;
            let accepted = result.as_ref().ok().map(|a| a.transaction_id.clone());
            let protocol_error = matches!(result, Err(HttpError::Protocol(_)));
            let (failure, retry_at) =
                settle_http(&store, &updates, &sent, result.map(|a| a.transaction_id)).await;
            if let Some(transaction_id) = accepted {
                let _ = updates.send(Update::Transaction(TransactionUpdate {
                    id: sent.id.clone(),
                    transaction_id: Some(transaction_id),
                    status: TransactionState::Pending,
                    reason: None,
                }));
            }
            let _ = io.send(Io::HttpDone {
                id: Some(sent.id.clone()),
                failure,
                retry_at,
                protocol_error,
            });
        });
    }

    /// Checks the status of accepted, undecided transactions (events may have been
    /// missed while offline; the status endpoint is the truth).
    pub(super) async fn check_transactions(&mut self) {
        let Ok(undecided) = self.store.call(|s| s.undecided_transactions()).await else {
            return;
        };
        if undecided.is_empty() && self.http_in_flight.is_empty() {
            // Nothing to wait for: no more checks until a transaction is submitted. Not
            // while HTTP work is out: a submission in flight is not accepted yet, and
            // once accepted (its answer may even have been lost and resent) its
            // decision is checked for like any other.
            self.tx_pending = false;
        }
        for item in undecided {
            let Some(transaction_id) = item.server_ref.clone() else {
                continue;
            };
            let key = format!("check:{}", item.id);
            if self.http_in_flight.contains(&key) || self.http_in_flight.len() >= HTTP_SEND_WINDOW {
                continue;
            }
            self.http_in_flight.insert(key.clone());
            let (store, http, tokens, io, updates) = self.task_parts();
            self.tasks.spawn(async move {
                let mut failure = None;
                let mut protocol_error = false;
                let status = with_token(&tokens, |token| {
                    let (http, transaction_id) = (&http, &transaction_id);
                    async move { http.transaction_status(&token, transaction_id).await }
                })
                .await;
                match status {
                    Ok(status) => {
                        for u in settle_transaction(&store, &item.id, status).await {
                            let _ = updates.send(u);
                        }
                    }
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => {
                        protocol_error = matches!(e, HttpError::Protocol(_));
                        failure = Some(e.failure());
                    }
                }
                let _ = io.send(Io::HttpDone {
                    id: Some(key),
                    failure,
                    retry_at: None,
                    protocol_error,
                });
            });
        }
    }

    pub(super) fn task_parts(
        &self,
    ) -> (
        StoreHandle,
        HttpApi,
        Arc<TokenCell>,
        mpsc::UnboundedSender<Io>,
        broadcast::Sender<Update>,
    ) {
        (
            self.store.clone(),
            self.http.clone(),
            self.tokens.clone(),
            self.io_tx.clone(),
            self.updates.clone(),
        )
    }
}

/// Applies a transaction's status to its outbox item; the update when it changed.
pub(super) async fn settle_transaction(
    store: &StoreHandle,
    id: &str,
    status: TransactionStatus,
) -> Vec<Update> {
    let id = id.to_owned();
    let now = now_wall();
    let state = status.status;
    let reason = status.reason.clone();
    let item_id = id.clone();
    let changed = store
        .call(move |s| {
            let before = s.get(&item_id)?;
            let after = match state {
                TransactionState::Confirmed => s.mark_confirmed(&item_id, now)?,
                TransactionState::Rejected => {
                    s.mark_rejected(&item_id, reason.as_deref().unwrap_or("rejected"), now)?
                }
                TransactionState::Pending => return Ok(None),
            };
            Ok((before.map(|b| b.state) != Some(after.state)).then_some(after))
        })
        .await;
    match changed {
        Ok(Some(item)) => vec![
            Update::Outbox((&item).into()),
            Update::Transaction(TransactionUpdate {
                id,
                transaction_id: Some(status.transaction_id),
                status: state,
                reason: status.reason,
            }),
        ],
        Ok(None) => Vec::new(),
        Err(e) => {
            debug!(error = %e, "transaction status not applied");
            Vec::new()
        }
    }
}

/// Records the outcome of an HTTP send; the failure for the state machine, if the
/// network or server failed it, and when the item is due again.
pub(super) async fn settle_http(
    store: &StoreHandle,
    updates: &broadcast::Sender<Update>,
    item: &OutboxItem,
    result: Result<String, HttpError>,
) -> (Option<Failure>, Option<chrono::DateTime<chrono::Utc>>) {
    let id = item.id.clone();
    let now = now_wall();
    let attempts = item.attempts;
    let mut retry_at = None;
    let (outcome, failure) = match result {
        Ok(server_ref) => (
            store
                // Unflushed, as a WebSocket ack (the server dedupes a resend).
                .call(move |s| s.unflushed(|s| s.mark_accepted(&id, Some(&server_ref), now)))
                .await,
            None,
        ),
        Err(e) if e.is_permanent() => {
            let reason = e.to_string();
            (
                store.call(move |s| s.mark_dead(&id, &reason, now)).await,
                None,
            )
        }
        Err(e) => {
            let wait = e
                .retry_after()
                .map(clamp_retry_hint)
                .unwrap_or_else(|| item_backoff(attempts));
            let at = wall_later(now, wait);
            retry_at = Some(at);
            let reason = e.to_string();
            debug!(id = %item.id, attempts, error = %reason, ?wait, "send failed; due again later");
            let failure = e.failure();
            // No answer from the server: the item waits for the network as well as for
            // its time (a working transport makes it due at once).
            let on_network = matches!(failure, Failure::Network | Failure::Unreachable);
            (
                store
                    .call(move |s| {
                        if on_network {
                            s.mark_failed_on_network(&id, &reason, at, now)
                        } else {
                            s.mark_failed(&id, &reason, at, now)
                        }
                    })
                    .await,
                Some(failure),
            )
        }
    };
    if let Ok(item) = outcome {
        let _ = updates.send(Update::Outbox(OutboxUpdate::from(&item)));
    }
    (failure, retry_at)
}

/// Per-item retry delay after `attempts` tries: the machine's schedule (backon's
/// envelope from 0.5 s doubling to 30 s, full jitter, so that the items of many clients
/// failing together are not retried together).
pub(super) fn item_backoff(attempts: u32) -> Duration {
    item_delay(ITEM_RETRY_MIN, ITEM_RETRY_MAX, attempts.saturating_add(1))
}

/// The error of a request made without a token (the provider gave none).
pub(super) fn no_token() -> HttpError {
    HttpError::Status {
        status: 401,
        body: None,
        retry_after: None,
    }
}

/// Runs `call` with the current token. A 401 for a token that was replaced while the
/// request was out (another request's refusal brought a fresh one meanwhile) is not a
/// refusal of the current token: the call is made once more, with the current one.
/// Only a refusal of the current token reaches the state machine (which refreshes it
/// once, then gives up with `AuthFailed`).
pub(super) async fn with_token<T, F, Fut>(tokens: &TokenCell, call: F) -> Result<T, HttpError>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<T, HttpError>>,
{
    let (token, used) = tokens.get_tagged().await.map_err(|e| {
        debug!(error = %e, "no token");
        no_token()
    })?;
    let result = call(token).await;
    if matches!(&result, Err(e) if e.failure() == Failure::Auth)
        && let Some(current) = tokens.replaced_since(used).await
    {
        return call(current).await;
    }
    result
}
