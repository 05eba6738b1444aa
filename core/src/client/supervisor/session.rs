//! The supervisor's WebSocket session: opening it, sending frames and pings, and what
//! the server sends on it (acks, deliveries, presence, rooms, errors).

use super::*;

impl Supervisor {
    pub(super) async fn open_ws(&mut self) {
        self.ws_gen = self.ws_gen.wrapping_add(1);
        self.rooms_joined.clear();
        let generation = self.ws_gen;
        let cursor = self
            .store
            .call(|s| s.cursor())
            .await
            .ok()
            .flatten()
            .map(|c| c.last_event_id);
        let mut url = format!("{}?clientId={}", self.ws_url, self.client_id);
        self.ws_carried_cursor = cursor.is_some();
        if let Some(cursor) = cursor {
            url.push_str(&format!("&lastEventId={cursor}"));
        }
        let tokens = self.tokens.clone();
        let io = self.io_tx.clone();
        let report = self.ws_tx.clone();
        let timeout = self.cfg.machine.connect_timeout;
        let max_frame = crate::protocol::envelope::DEFAULT_MAX_FRAME_BYTES;
        let tls = self.tls.clone();
        self.tasks.spawn(async move {
            let open = |token: String| {
                let (url, tls, report) = (&url, tls.clone(), report.clone());
                async move {
                    let params = ws::Params {
                        url,
                        token: &token,
                        max_frame,
                        timeout,
                        tls,
                    };
                    ws::open(params, generation, report).await
                }
            };
            let result = match tokens.get_tagged().await {
                Err(e) => Err(ConnectError::Failed(Failure::Auth, e.to_string())),
                // A token replaced while the upgrade was refused: once more with the
                // current one (as `with_token` does for HTTP).
                Ok((token, used)) => match open(token).await {
                    Err(ConnectError::Failed(Failure::Auth, why)) => {
                        match tokens.replaced_since(used).await {
                            Some(current) => open(current).await,
                            None => Err(ConnectError::Failed(Failure::Auth, why)),
                        }
                    }
                    other => other,
                },
            };
            if let Err(e) = result {
                let _ = io.send(Io::WsFailed(generation, e));
            }
        });
    }

    pub(super) fn close_ws(&mut self) {
        // Abandons an attempt too: its reports carry an old generation.
        self.ws_gen = self.ws_gen.wrapping_add(1);
        self.rooms_joined.clear();
        // Not recorded, so not lost: the next connection resumes from the cursor.
        self.inbound.drop_held();
        if let Some(task) = self.catch_up_task.take() {
            task.abort();
        }
        // Sent on this socket and not acknowledged: `persisted` in the store all along,
        // so due again on the next transport (the server dedupes a resend), rather than
        // holding their lanes until the ack timeout.
        self.ws_in_flight.clear();
        if let Some(ws) = self.ws.take() {
            ws.close();
        }
        self.pings.clear();
    }

    pub(super) fn send_frame(&mut self, event: &ClientEvent, reference: Option<&str>) -> bool {
        match &self.ws {
            Some(ws) => ws.send(event.encode(reference)),
            None => false,
        }
    }

    /// Sends `join_room` for `room_id` unless it was sent on this connection already.
    pub(super) fn join_once(&mut self, room_id: String) {
        if self.rooms_joined.contains_key(&room_id) {
            return;
        }
        let event = ClientEvent::JoinRoom {
            room_id: room_id.clone(),
        };
        if self.send_frame(&event, None) {
            self.rooms_joined.insert(room_id, false);
        }
    }

    /// On a new socket: joins the user's rooms again (membership is the user's on the
    /// server; joining again is harmless and makes intents made offline take effect),
    /// then sends the leaves the server may not have heard of (a room in both was left
    /// last).
    async fn restore_rooms(&mut self) {
        if let Ok(rooms) = self.store.call(load_rooms).await {
            for room_id in rooms {
                self.join_once(room_id);
            }
        }
        if let Ok(left) = self.store.call(load_rooms_left).await {
            for room_id in left {
                self.send_frame(&ClientEvent::LeaveRoom { room_id }, None);
            }
        }
    }

    pub(super) fn send_ping(&mut self) {
        let reference = uuid::Uuid::now_v7().to_string();
        if self.send_frame(&ClientEvent::Ping, Some(&reference)) {
            self.pings.insert(reference, (mono_now(), now_wall()));
        }
    }

    pub(super) async fn on_ws(&mut self, generation: u64, event: WsEvent) {
        let now = mono_now();
        if let WsEvent::Opened(handle) = event {
            if generation != self.ws_gen {
                handle.close(); // an abandoned attempt: close what it opened
                return;
            }
            self.ws = Some(handle);
            // Before anything the opening flushes: a message to a room joined offline
            // would reach the server before the join, and be refused.
            self.restore_rooms().await;
            self.machine.on_ws_open(now);
            self.inbound
                .catch_up_on_connected((!self.ws_carried_cursor).then_some(generation));
            return;
        }
        if generation != self.ws_gen || self.ws.is_none() {
            return;
        }
        match event {
            WsEvent::Opened(_) => {}
            WsEvent::Activity => self.machine.on_ws_activity(now),
            WsEvent::Undecodable(e) => {
                self.protocol_errors = self.protocol_errors.saturating_add(1);
                self.machine.on_ws_activity(now);
                warn!(error = %e, "undecodable frame ignored");
            }
            WsEvent::Closed(kind, reason) => {
                info!(%reason, "WebSocket closed");
                self.ws = None;
                self.inbound.drop_held();
                self.requeue_ws_in_flight("the connection closed before the ack")
                    .await;
                self.machine.on_ws_closed(now, kind);
            }
            WsEvent::Frame(event, reference) => {
                self.machine.on_ws_activity(now);
                self.on_frame(*event, reference).await;
            }
        }
    }

    pub(super) async fn on_frame(&mut self, event: ServerEvent, reference: Option<String>) {
        let event = if matches!(event, ServerEvent::Message(_) | ServerEvent::Event(_)) {
            match self.inbound.hold(event) {
                Some(event) => event,
                None => {
                    // Waits behind a poll, catch-up or resync; too many, and they go
                    // with the connection: the next one resumes from the cursor.
                    if self.inbound.overflowing() {
                        warn!("too many deliveries waiting behind a catch-up; reconnecting");
                        self.close_ws();
                        self.machine
                            .on_ws_closed(mono_now(), crate::machine::CloseKind::Lost);
                    }
                    return;
                }
            }
        } else {
            event
        };
        match event {
            ServerEvent::Connected(c) => {
                if self.inbound.take_catch_up(self.ws_gen) {
                    self.catch_up(self.ws_gen).await;
                }
                // Clamped by the machine: a hostile interval neither floods nor stops
                // the heartbeat.
                self.machine
                    .set_ping_interval(Duration::from_millis(c.ping_interval));
                if let Ok(mut clock) = self.clock.lock() {
                    clock.sample_connected(now_wall(), c.server_time);
                }
            }
            ServerEvent::Message(m) => self.on_inbound_message(m).await,
            ServerEvent::Event(e) => self.on_inbound_event(e).await,
            ServerEvent::Presence(p) => self.emit(Update::Presence(p)),
            ServerEvent::MessageAck(ack) => {
                self.ws_in_flight.remove(&ack.message_id);
                let id = ack.message_id.clone();
                let server_ref = ack.sequence.map(|s| s.to_string());
                let now = now_wall();
                match self
                    .store
                    // Unflushed: lost to a power cut, the message is sent again with
                    // its id and the server answers the same ack.
                    .call(move |s| {
                        s.unflushed(|s| s.mark_accepted(&id, server_ref.as_deref(), now))
                    })
                    .await
                {
                    Ok(item) => self.emit(Update::Outbox((&item).into())),
                    Err(e) => debug!(error = %e, "ack for an item not in the outbox"),
                }
                self.pump().await;
            }
            ServerEvent::RoomJoined { room_id } => {
                if let Some(answered) = self.rooms_joined.get_mut(&room_id) {
                    *answered = true;
                }
                self.emit(Update::Room {
                    room_id,
                    joined: true,
                    error: None,
                });
            }
            ServerEvent::RoomLeft { room_id } => {
                let room = room_id.clone();
                if let Err(e) = self.store.call(move |s| forget_room(s, &room, false)).await {
                    // Kept: the leave is sent again on the next connection (harmless).
                    debug!(error = %e, "could not record a confirmed leave");
                }
                self.emit(Update::Room {
                    room_id,
                    joined: false,
                    error: None,
                });
            }
            ServerEvent::Resumed {
                last_event_id,
                replayed,
            } => debug!(?last_event_id, replayed, "resumed"),
            ServerEvent::Pong { server_time } => {
                if let Some((sent_at, sent_wall)) =
                    reference.as_ref().and_then(|r| self.pings.remove(r))
                    && let Ok(mut clock) = self.clock.lock()
                {
                    clock.sample(
                        sent_wall,
                        mono_now().saturating_duration_since(sent_at),
                        server_time,
                    );
                }
            }
            ServerEvent::Error(body) => self.on_ws_error(body, reference).await,
            ServerEvent::Unknown { event, .. } => debug!(%event, "unknown event ignored"),
        }
    }

    pub(super) async fn on_ws_error(&mut self, body: ErrorBody, reference: Option<String>) {
        let reference = reference.or_else(|| body.reference.clone());
        warn!(code = ?body.code, error = %body.error, ?reference, "server refused a frame");
        if body.code == ErrorCode::CursorExpired {
            self.machine.on_cursor_expired(mono_now());
            return;
        }
        // A refusal of a message sent over this socket carries its id; a refused join
        // (sent without one) names its room in the details.
        let sent = reference.filter(|id| self.ws_in_flight.remove(id).is_some());
        if let Some(id) = sent {
            let retry_after = retry_after_detail(&body);
            let permanent = matches!(
                body.code,
                ErrorCode::InvalidRequest
                    | ErrorCode::AuthzFailed
                    | ErrorCode::TenantViolation
                    | ErrorCode::PayloadTooLarge
                    | ErrorCode::RealtimeNotAllowed
                    | ErrorCode::NotFound
            );
            let reason = format!("{}: {}", body.code, body.error);
            let now = now_wall();
            let result = if permanent {
                self.store
                    .call(move |s| s.mark_dead(&id, &reason, now))
                    .await
            } else {
                let wait = retry_after.unwrap_or_else(|| item_backoff(1));
                let at = wall_later(now, wait);
                self.note_outbox_due(at);
                self.store
                    .call(move |s| s.mark_failed(&id, &reason, at, now))
                    .await
            };
            if let Ok(item) = result {
                self.emit(Update::Outbox((&item).into()));
            }
        } else if matches!(body.code, ErrorCode::AuthzFailed) {
            // A refused join (room policy, too many rooms): tell the app and stop
            // re-joining it. Only a join still unanswered: a live message to a room
            // not joined yet is refused naming the room too.
            if let Some(room_id) = body
                .details
                .as_ref()
                .and_then(|d| d.get("roomId"))
                .and_then(|v| v.as_str())
                .filter(|room| {
                    let unanswered = self.rooms_joined.get_mut(*room).filter(|a| !**a);
                    unanswered.map(|answered| *answered = true).is_some()
                })
                .map(str::to_owned)
            {
                let room = room_id.clone();
                if let Err(e) = self.store.call(move |s| forget_room(s, &room, true)).await {
                    // Kept: joined again (and refused again) on the next connection.
                    debug!(error = %e, "could not forget a refused room");
                }
                self.emit(Update::Room {
                    room_id,
                    joined: false,
                    error: Some(body.error),
                });
            }
        }
    }

    pub(super) async fn requeue_ws_in_flight(&mut self, reason: &str) {
        let ids: Vec<String> = self.ws_in_flight.drain().map(|(id, _)| id).collect();
        if ids.is_empty() {
            return;
        }
        let reason = reason.to_owned();
        let now = now_wall();
        let requeued = self
            .store
            .call(move |s| {
                for id in ids {
                    // Already accepted through another path (or still `persisted`:
                    // WebSocket sends are in flight in memory only): nothing to do.
                    let _ = s.mark_failed(&id, &reason, now, now);
                }
                Ok(())
            })
            .await;
        if let Err(e) = requeued {
            // They are `persisted` in the store anyway and go again on the next flush.
            warn!(error = %e, "could not requeue unacknowledged sends");
        }
    }
}
