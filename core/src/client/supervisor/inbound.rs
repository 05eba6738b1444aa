//! The supervisor's inbound side: durable deliveries recorded in order (the cursor only
//! on a recorded event), the catch-up that holds live deliveries back, polling and
//! resync, and the free functions that record events in the store.

use super::*;

impl Supervisor {
    /// A poll, catch-up or resync finished processing: its slot goes back, and when
    /// none is left out, the held WebSocket deliveries are processed, in order.
    pub(super) async fn inbound_done(&mut self, slot: Slot) {
        self.inbound.release(slot);
        self.let_held_go().await;
    }

    /// Processes the deliveries that waited, in order, once the gate is open.
    pub(super) async fn let_held_go(&mut self) {
        let mut pending = self.inbound.open().into_iter();
        while let Some(event) = pending.next() {
            Box::pin(self.on_frame(event, None)).await;
            if self.inbound.is_shut() {
                // Another inbound task started meanwhile: the rest waits again, first.
                self.inbound.hold_again(pending.collect());
                return;
            }
        }
    }

    /// Catches up a connection that was opened without a cursor (first run, after a
    /// resync that found no events, or a cursor that only appeared while the
    /// connection was opening): polls from the cursor until the end of the log, while
    /// the connection's deliveries wait (held back). Started on `connected`, which the
    /// server sends once the connection is registered for deliveries, so that the
    /// polls are answered after that point: every event is in a page or delivered
    /// live (a catch-up started when the upgrade answered could be answered before
    /// the registration, and the events in between were lost).
    pub(super) async fn catch_up(&mut self, generation: u64) {
        let slot = self.inbound.slot();
        let (store, http, tokens, io, updates) = self.task_parts();
        // Aborted with its connection (`close_ws`): the next one resumes from the
        // cursor, and this one's slot would hold that one's deliveries back.
        self.catch_up_task = Some(self.tasks.spawn(async move {
            let mut result = Ok(false);
            for _ in 0..RESYNC_MAX_PAGES {
                match poll_once(&store, &http, &tokens, &updates).await {
                    Ok(true) => continue,
                    Ok(false) => {
                        result = Ok(true);
                        break;
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            let _ = io.send(Io::CaughtUp(generation, slot, result));
        }));
    }

    pub(super) async fn on_inbound_message(&mut self, m: WebSocketMessage) {
        match (&m.event_id, m.interaction_class.is_durable()) {
            (Some(event_id), true) => {
                if self.inbound_stalled.is_some() {
                    return; // fetched again from the cursor once the store takes it
                }
                let event_id = event_id.clone();
                let result =
                    process_inbound(&self.store, event_id, m.sequence, Update::Message(m)).await;
                self.on_inbound_result(result);
            }
            // Live (Class A), or a server that did not make it durable: as it comes.
            _ => self.emit(Update::Message(m)),
        }
    }

    pub(super) async fn on_inbound_event(&mut self, e: Event) {
        if self.inbound_stalled.is_some() {
            return; // fetched again from the cursor once the store takes it
        }
        let result = process_event(&self.store, e).await;
        self.on_inbound_result(result);
    }

    /// Emits what a durable inbound item gave, or, when the store could not record it,
    /// stops taking durable deliveries from the WebSocket: the cursor stayed before
    /// it, so a catch-up from the cursor fetches it (and what follows) again, after
    /// `storage_retry`, doubling while the store keeps failing.
    pub(super) fn on_inbound_result(&mut self, result: Result<Vec<Update>, ClientError>) {
        match result {
            Ok(updates) => {
                for u in updates {
                    self.emit(u);
                }
            }
            Err(e) => self.stall_inbound(&e),
        }
    }

    pub(super) fn stall_inbound(&mut self, error: &ClientError) {
        self.storage_failures = self.storage_failures.saturating_add(1);
        // Not recorded, so not lost: the catch-up fetches them again.
        self.inbound.drop_held();
        if self.inbound_stalled.is_none() {
            warn!(error = %error, retry_in = ?self.storage_retry, "could not record an inbound event; fetching again later");
            self.inbound_stalled = Some(later(mono_now(), self.storage_retry));
            self.storage_retry = self.storage_retry.saturating_mul(2).min(STORAGE_RETRY_MAX);
        }
    }

    pub(super) async fn spawn_poll(&mut self) {
        let slot = self.inbound.slot();
        let store = self.store.clone();
        let http = self.http.clone();
        let tokens = self.tokens.clone();
        let io = self.io_tx.clone();
        let updates = self.updates.clone();
        self.tasks.spawn(async move {
            let result = poll_once(&store, &http, &tokens, &updates).await;
            let _ = io.send(Io::Poll(slot, result));
        });
    }

    pub(super) fn spawn_resync(&mut self) {
        let slot = self.inbound.slot();
        let store = self.store.clone();
        let http = self.http.clone();
        let tokens = self.tokens.clone();
        let io = self.io_tx.clone();
        let updates = self.updates.clone();
        let client_id = self.client_id.clone();
        self.tasks.spawn(async move {
            let result = resync(&store, &http, &tokens, &updates, &client_id).await;
            let _ = io.send(Io::Resync(slot, result));
        });
    }
}

/// Records one durable inbound item and returns what the app should hear (nothing when it
/// was seen before). Own messages (sent by this installation) are recorded, not repeated.
pub(super) async fn process_inbound(
    store: &StoreHandle,
    event_id: String,
    sequence: Option<u64>,
    update: Update,
) -> Result<Vec<Update>, ClientError> {
    let own_id = match &update {
        Update::Message(m) => Some(m.message_id.clone()),
        _ => None,
    };
    let now = now_wall();
    let result = store
        .call(move |s| {
            let new = s.record_inbound(&event_id, sequence, now)?;
            let own = match &own_id {
                Some(id) => s.contains(id)?,
                None => false,
            };
            Ok(new && !own)
        })
        .await;
    // Not recorded (`Err`): the cursor did not move; the caller makes sure it is
    // fetched again (resume, poll or catch-up) before anything after it.
    Ok(if result? { vec![update] } else { Vec::new() })
}

/// Records one durable bus event (a message, a transaction outcome, or an app event).
pub(super) async fn process_event(
    store: &StoreHandle,
    e: Event,
) -> Result<Vec<Update>, ClientError> {
    let event_id = e.event_id.clone();
    let sequence = e.sequence;
    if e.event_type == MESSAGE_EVENT_TYPE {
        return match e.message() {
            Some(Ok(m)) => process_inbound(store, event_id, sequence, Update::Message(m)).await,
            _ => {
                warn!(%event_id, "a message event without a readable message");
                process_inbound(store, event_id, sequence, Update::Event(e)).await
            }
        };
    }
    if matches!(
        e.event_type.as_str(),
        "transaction.confirmed" | "transaction.rejected"
    ) && let Ok(status) = serde_json::from_value::<TransactionStatus>(e.payload.clone())
    {
        let mut out = process_inbound(store, event_id, sequence, Update::Event(e)).await?;
        let transaction_id = status.transaction_id.clone();
        let item = store
            .call(move |s| s.find_by_server_ref(ItemKind::Transaction, &transaction_id))
            .await
            .ok()
            .flatten();
        if let Some(item) = item {
            out.extend(settle_transaction(store, &item.id, status).await);
        }
        return Ok(out);
    }
    process_inbound(store, event_id, sequence, Update::Event(e)).await
}

/// One poll from the cursor: records and emits the events; `Ok(more)`.
pub(super) async fn poll_once(
    store: &StoreHandle,
    http: &HttpApi,
    tokens: &TokenCell,
    updates: &broadcast::Sender<Update>,
) -> Result<bool, HttpError> {
    let cursor = store
        .call(|s| s.cursor())
        .await
        .map_err(HttpError::Storage)?
        .map(|c| c.last_event_id);
    let page = with_token(tokens, |token| {
        let cursor = cursor.as_deref();
        async move { http.poll(&token, cursor, POLL_LIMIT).await }
    })
    .await?;
    for event in page.events {
        // A failure stops the page: nothing after an unrecorded event is recorded, so
        // the cursor stays before it and the next poll fetches it again.
        for u in process_event(store, event)
            .await
            .map_err(HttpError::Storage)?
        {
            let _ = updates.send(u);
        }
    }
    Ok(page.has_more)
}

/// Continuity was lost: refresh every entity from the server, then catch up with the
/// events still retained, and tell the app.
pub(super) async fn resync(
    store: &StoreHandle,
    http: &HttpApi,
    tokens: &TokenCell,
    updates: &broadcast::Sender<Update>,
    client_id: &str,
) -> Result<(), HttpError> {
    store
        .call(|s| {
            s.reset_entity_sync_version()?;
            s.clear_cursor()
        })
        .await
        .map_err(HttpError::Storage)?;
    reconcile(store, http, tokens, updates, client_id, Vec::new(), false).await?;
    for _ in 0..RESYNC_MAX_PAGES {
        if !poll_once(store, http, tokens, updates).await? {
            break;
        }
    }
    let _ = updates.send(Update::Discontinuity {
        reason: "the server no longer had the events after this client's cursor; \
                 entities were refreshed and events resumed from the oldest retained"
            .into(),
    });
    Ok(())
}
