//! The supervisor's entity sync: operations sent in batches to the reconcile endpoint,
//! and the pull of what changed since the last known version.

use super::*;

impl Supervisor {
    /// Sends pending entity operations (a batch) or, when `pull` and none are pending,
    /// asks for the entity changes since the last pull.
    pub(super) async fn spawn_reconcile(&mut self, pull: bool) {
        if self.reconcile_in_flight || !self.machine.state().is_connected() {
            return;
        }
        let limit = if self.isolate_ops {
            1
        } else {
            self.cfg.reconcile_batch.max(1)
        };
        let now = now_wall();
        let Ok(ops) = self
            .store
            .call(move |s| {
                // One reconcile at a time: an operation still in flight now is left from
                // one whose answer could not be stored (nor the operation requeued).
                for stale in s.list(Some(ItemState::InFlight))? {
                    if stale.kind == ItemKind::Operation {
                        s.mark_failed(&stale.id, "requeued after a failed reconcile", now, now)?;
                    }
                }
                let items = due_in_lane_order(s.list(Some(ItemState::Persisted))?, now, limit);
                let mut taken = Vec::with_capacity(items.len());
                for item in &items {
                    taken.push(s.mark_in_flight(&item.id, now)?);
                }
                Ok(taken)
            })
            .await
        else {
            return;
        };
        if ops.is_empty() && !pull {
            return;
        }
        self.reconcile_in_flight = true;
        self.last_pull = Some(mono_now());
        let (store, http, tokens, io, updates) = self.task_parts();
        let client_id = self.client_id.clone();
        let isolate = self.isolate_ops;
        self.tasks.spawn(async move {
            let result =
                reconcile(&store, &http, &tokens, &updates, &client_id, ops, isolate).await;
            let _ = io.send(Io::Pulled(result));
        });
    }
}

/// Sends `ops` (items in flight) and pulls the changes since the last known version;
/// applies the answer to the store in one transaction.
pub(super) async fn reconcile(
    store: &StoreHandle,
    http: &HttpApi,
    tokens: &TokenCell,
    updates: &broadcast::Sender<Update>,
    client_id: &str,
    ops: Vec<OutboxItem>,
    isolate: bool,
) -> Result<Pulled, HttpError> {
    let now = now_wall();

    let requeue = |store: StoreHandle, ops: Vec<OutboxItem>, reason: String, dead: bool| async move {
        let wall = now_wall();
        let requeued = store
            .call(move |s| {
                for op in ops {
                    if dead {
                        s.mark_dead(&op.id, &reason, now)?;
                    } else {
                        let at = wall_later(wall, item_backoff(op.attempts));
                        s.mark_failed(&op.id, &reason, at, now)?;
                    }
                }
                Ok(())
            })
            .await;
        if let Err(e) = requeued {
            // Left in flight: the next reconcile requeues them.
            warn!(error = %e, "could not requeue entity operations");
        }
    };
    // An operation whose body does not decode can never be sent: dead, with the reason
    // (it used to be dropped from the request and requeued, again and again).
    let mut operations: Vec<Operation> = Vec::with_capacity(ops.len());
    let mut readable = Vec::with_capacity(ops.len());
    for op in ops {
        match serde_json::from_value::<Operation>(op.body.clone()) {
            Ok(operation) => {
                operations.push(operation);
                readable.push(op);
            }
            Err(e) => {
                let reason = format!("unreadable operation body: {e}");
                let id = op.id.clone();
                match store.call(move |s| s.mark_dead(&id, &reason, now)).await {
                    Ok(item) => {
                        let _ = updates.send(Update::Outbox((&item).into()));
                    }
                    // Left in flight: the next reconcile requeues it and tries again.
                    Err(e) => warn!(error = %e, "could not mark an unreadable operation dead"),
                }
            }
        }
    }
    let ops = readable;
    let token = match tokens.get().await {
        Ok(t) => t,
        Err(_) => {
            requeue(store.clone(), ops, "no token".into(), false).await;
            return Err(HttpError::Status {
                status: 401,
                body: None,
                retry_after: None,
            });
        }
    };
    let sent_any = !ops.is_empty();
    let claims = Claims::read(&token).map_err(HttpError::Protocol)?;
    let last_known_version = store
        .call(|s| s.entity_sync_version())
        .await
        .map_err(HttpError::Storage)?;
    let request = ReconciliationRequest {
        request_id: uuid::Uuid::now_v7().to_string(),
        client_id: client_id.to_owned(),
        tenant_id: claims.tenant_id,
        last_known_version,
        operations: operations.into_iter().map(std::sync::Arc::new).collect(),
        requested_at: now,
        strategy: None,
    };
    let response = match with_token(tokens, |token| {
        let request = &request;
        async move { http.reconcile(&token, request).await }
    })
    .await
    {
        Ok(r) => r,
        Err(e) => {
            let dead = e.is_permanent() && isolate && ops.len() == 1;
            requeue(store.clone(), ops, e.to_string(), dead).await;
            return Err(e);
        }
    };
    let applied_at = now_wall();
    let resp = response.clone();
    let outcome = match store
        .call(move |s| s.apply_reconcile_response(&resp, applied_at))
        .await
    {
        Ok(outcome) => outcome,
        Err(e) => {
            // Nothing of the answer was applied (one transaction): the operations go
            // back to the queue (or, if even that fails, the next reconcile requeues
            // them) and the same changes are pulled again later.
            requeue(store.clone(), ops, e.to_string(), false).await;
            return Err(HttpError::Storage(e));
        }
    };
    let changed = sent_any || !outcome.entities.is_empty() || !response.conflicts.is_empty();
    for entity in outcome.entities {
        let _ = updates.send(Update::Entity(entity));
    }
    for conflict in response.conflicts {
        let _ = updates.send(Update::Conflict(conflict));
    }
    // Every sent operation is now settled; one the answer did not mention (it should
    // not happen) goes back to the queue rather than staying in flight forever, after
    // its backoff (due at once, it would be sent again right away, again and again).
    for op in ops {
        let id = op.id.clone();
        let at = now_wall();
        let retry_at = wall_later(at, item_backoff(op.attempts));
        let item = store
            .call(move |s| match s.get(&id)? {
                Some(i) if i.state == ItemState::InFlight => s
                    .mark_failed(&id, "not settled by the server's answer", retry_at, at)
                    .map(Some),
                other => Ok(other),
            })
            .await;
        if let Ok(Some(item)) = item {
            warn!(id = %item.id, "the server's reconcile answer did not settle an operation");
            let _ = updates.send(Update::Outbox((&item).into()));
        }
    }
    // Snapshots whose checksum did not match: counted, and each fetched again at once
    // (the sync version did not move, so the next pull asks for them too).
    let bad_snapshots = outcome.bad_checksums.len();
    for key in outcome.bad_checksums {
        let Some((entity_type, entity_id)) = key.split_once('/') else {
            continue;
        };
        if let Ok(snapshot) = http.snapshot(&token, entity_type, entity_id).await {
            let at = now_wall();
            if let Ok(Some(entity)) = store.call(move |s| s.apply_snapshot(&snapshot, at)).await {
                let _ = updates.send(Update::Entity(entity));
            }
        }
    }
    Ok(Pulled {
        changed,
        bad_snapshots,
    })
}

/// The entity operations of `persisted` (in outbox order) that may go now, at most
/// `limit`: in each lane (one per entity) the operations due from its head on, up to
/// the first that is not due. One that waits out a backoff holds back the later edits
/// of its entity, as a message holds back its lane: sent ahead of it, a later edit
/// could reach the server first.
pub(super) fn due_in_lane_order(
    persisted: Vec<OutboxItem>,
    now: chrono::DateTime<chrono::Utc>,
    limit: usize,
) -> Vec<OutboxItem> {
    let mut held: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    for item in persisted {
        if out.len() >= limit {
            break;
        }
        if item.kind != ItemKind::Operation || held.contains(&item.lane) {
            continue;
        }
        if crate::store::outbox::is_due(item.next_attempt_at, now) {
            out.push(item);
        } else {
            held.insert(item.lane.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::store::{NewItem, OutboxClass, Store, StoreConfig};
    use serde_json::json;

    #[test]
    fn a_waiting_operation_holds_back_the_later_edits_of_its_entity_only() {
        let mut store = Store::open_in_memory(StoreConfig::default()).unwrap();
        let t0 = chrono::Utc::now();
        let op = |store: &mut Store, lane: &str| {
            let item = NewItem::new(OutboxClass::C, ItemKind::Operation, lane, json!({}));
            store.enqueue(item, t0).unwrap().id
        };
        let e1_first = op(&mut store, "entity:note/1");
        let e2_first = op(&mut store, "entity:note/2");
        let e1_second = op(&mut store, "entity:note/1");
        let e2_second = op(&mut store, "entity:note/2");
        let _message = store
            .enqueue(
                NewItem::new(OutboxClass::C, ItemKind::Message, "user:b", json!({})),
                t0,
            )
            .unwrap()
            .id;
        // The first edit of note 1 failed and waits a minute.
        store.mark_in_flight(&e1_first, t0).unwrap();
        let later = t0 + chrono::Duration::seconds(60);
        store.mark_failed(&e1_first, "503", later, t0).unwrap();

        let ids = |items: Vec<OutboxItem>| items.into_iter().map(|i| i.id).collect::<Vec<_>>();
        let persisted = || store.list(Some(ItemState::Persisted)).unwrap();
        assert_eq!(
            ids(due_in_lane_order(persisted(), t0, 10)),
            vec![e2_first.clone(), e2_second.clone()],
            "note 1's second edit waits for its first; the message is not an operation"
        );
        assert_eq!(
            ids(due_in_lane_order(persisted(), t0, 1)),
            vec![e2_first.clone()]
        );
        assert_eq!(
            ids(due_in_lane_order(persisted(), later, 10)),
            vec![e1_first, e2_first, e1_second, e2_second],
            "in outbox order once due"
        );
    }
}
