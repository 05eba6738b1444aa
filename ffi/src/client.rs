//! [`RealtimeClient`]: the client as Kotlin and Swift see it. Each method mirrors one of
//! core's `Client` methods: it converts the arguments (JSON text parsed, errors naming
//! the field), runs the call on the SDK's runtime and converts the result.
//!
//! Async methods are `suspend` functions in Kotlin and `async throws` in Swift; the
//! hints (`networkAvailable()`, `foreground()`, ...) and `connectionState()` return at
//! once. Dropping the object (Kotlin `close()`, Swift release) shuts the client down.

use std::sync::Arc;
use std::time::Duration;

use webwaka_realtime::client::Client;

use crate::diagnostics::{self, Live};
use crate::error::RealtimeError;
use crate::options::ClientOptions;
use crate::runtime::{self, run};
use crate::subscription::{self, ClientListener, QUEUE_CAPACITY, SubscriptionHandle};
use crate::token::{ForeignTokens, TokenProvider};
use crate::types::{
    CachedEntity, ClientMetrics, ConflictChoice, ConnectionState, EntityConflict, OutboxItem,
    OutboxItemState, OutgoingMessage, PresenceStatus, parse_json, parse_object,
};

/// Longest wait `waitSettled` accepts (one hour).
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// The offline-first realtime client: one per signed-in user and store file.
#[derive(uniffi::Object)]
pub struct RealtimeClient {
    pub(crate) client: Client,
    client_id: String,
    _live: Live,
}

impl RealtimeClient {
    /// Wraps an open core client (for Rust callers and tests).
    pub fn from_client(client: Client) -> Self {
        Self {
            client_id: client.client_id().to_owned(),
            client,
            _live: Live::new(&diagnostics::CLIENTS),
        }
    }

    /// Runs `call` with a clone of the core client on the SDK's runtime.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T, RealtimeError>
    where
        T: Send + 'static,
        F: FnOnce(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, RealtimeError>> + Send + 'static,
    {
        run(call(self.client.clone())).await
    }
}

impl Drop for RealtimeClient {
    /// The app let go of the client: close its connection and stop its tasks. What is
    /// in the outbox stays for the next run.
    fn drop(&mut self) {
        let client = self.client.clone();
        if let Ok(runtime) = runtime::handle() {
            runtime.spawn(async move { client.shutdown().await });
        }
    }
}

#[uniffi::export(async_runtime = "tokio")]
impl RealtimeClient {
    /// Opens the store at `options.storePath` (creating it) and starts connecting.
    /// Items left in the outbox by an earlier run are sent as soon as a transport works.
    #[uniffi::constructor]
    pub async fn open(
        options: ClientOptions,
        tokens: Arc<dyn TokenProvider>,
    ) -> Result<Arc<Self>, RealtimeError> {
        let config = options.into_config()?;
        let provider = Arc::new(ForeignTokens::new(tokens, config.token_timeout));
        // Wrapped on the runtime: if the app stops waiting, the client it would have
        // got is dropped there, which shuts it down.
        run(async move {
            let client = Client::open(config, provider).await?;
            Ok(Arc::new(Self::from_client(client)))
        })
        .await
    }

    /// This installation's id (kept in the store).
    pub fn client_id(&self) -> String {
        self.client_id.clone()
    }

    /// The connection state now.
    pub fn connection_state(&self) -> ConnectionState {
        self.client.connection_state().into()
    }

    /// The server's time by the client's estimate (ms since the epoch).
    pub fn server_time_ms(&self) -> i64 {
        crate::types::epoch_ms(self.client.server_time())
    }

    /// Subscribes `listener` to every update from now on; its first update is the
    /// current state. Keep the handle: cancelling or dropping it unsubscribes.
    pub fn subscribe(
        &self,
        listener: Arc<dyn ClientListener>,
    ) -> Result<Arc<SubscriptionHandle>, RealtimeError> {
        subscription::subscribe(&self.client, listener, QUEUE_CAPACITY).map(Arc::new)
    }

    /// Sends a durable message (Class B or C): committed on the device before this
    /// returns, then delivered whenever a transport works, in order per target.
    /// Follow it with `item(id)` or the `OutboxChanged` updates.
    pub async fn send_message(
        &self,
        message: OutgoingMessage,
    ) -> Result<OutboxItem, RealtimeError> {
        let message = message.into_core()?;
        self.call(|c| async move { Ok(c.send_message(message).await?.into()) })
            .await
    }

    /// Sends a live-only message (Class A: typing, cursors): only when the WebSocket is
    /// up, else `NotConnected` at once. Never stored.
    pub async fn send_live(
        &self,
        target: crate::types::MessageTarget,
        message_type: String,
        payload_json: String,
    ) -> Result<(), RealtimeError> {
        let payload = parse_json("payloadJson", &payload_json)?;
        self.call(|c| async move { Ok(c.send_live(target.into(), message_type, payload).await?) })
            .await
    }

    /// Announces this user's presence to the users sharing a room (Class A).
    pub async fn set_presence(
        &self,
        status: PresenceStatus,
        metadata_json: Option<String>,
    ) -> Result<(), RealtimeError> {
        let metadata = parse_object("metadataJson", metadata_json.as_deref())?;
        self.call(|c| async move { Ok(c.set_presence(status.into(), metadata).await?) })
            .await
    }

    /// Joins a room; remembered and re-joined after every reconnect. The server's
    /// answer arrives as `RoomChanged`.
    pub async fn join_room(&self, room_id: String) -> Result<(), RealtimeError> {
        self.call(|c| async move { Ok(c.join_room(room_id).await?) })
            .await
    }

    /// Leaves a room (and stops re-joining it).
    pub async fn leave_room(&self, room_id: String) -> Result<(), RealtimeError> {
        self.call(|c| async move { Ok(c.leave_room(room_id).await?) })
            .await
    }

    /// The rooms this client is (or will be, once connected) a member of.
    pub async fn rooms(&self) -> Result<Vec<String>, RealtimeError> {
        self.call(|c| async move { Ok(c.rooms().await?) }).await
    }

    /// Submits a Class D transaction (payment, order): committed with its idempotency
    /// key (the item's id) before this returns, sent over HTTP only, retried with the
    /// same key until the server answers; its decision arrives as `TransactionChanged`
    /// and in the item's state (`CONFIRMED` or `REJECTED`).
    pub async fn submit_transaction(
        &self,
        transaction_type: String,
        payload_json: String,
        metadata_json: Option<String>,
    ) -> Result<OutboxItem, RealtimeError> {
        let payload = parse_json("payloadJson", &payload_json)?;
        let metadata = parse_object("metadataJson", metadata_json.as_deref())?;
        self.call(|c| async move {
            Ok(c.submit_transaction(transaction_type, payload, metadata)
                .await?
                .into())
        })
        .await
    }

    /// Creates (or replaces) an entity with `valueJson` (a JSON object): applied on the
    /// device at once, reconciled with the server whenever it is reachable.
    pub async fn create_entity(
        &self,
        entity_type: String,
        entity_id: String,
        value_json: String,
    ) -> Result<CachedEntity, RealtimeError> {
        let value = parse_json("valueJson", &value_json)?;
        let me = self.client_id.clone();
        self.call(|c| async move {
            let e = c.create_entity(entity_type, entity_id, value).await?;
            Ok(CachedEntity::new(&e, &me))
        })
        .await
    }

    /// Updates an entity with a JSON merge patch (fields set; `null` removes a field).
    pub async fn update_entity(
        &self,
        entity_type: String,
        entity_id: String,
        patch_json: String,
    ) -> Result<CachedEntity, RealtimeError> {
        let patch = parse_json("patchJson", &patch_json)?;
        let me = self.client_id.clone();
        self.call(|c| async move {
            let e = c.update_entity(entity_type, entity_id, patch).await?;
            Ok(CachedEntity::new(&e, &me))
        })
        .await
    }

    /// Deletes an entity (a tombstone remains).
    pub async fn delete_entity(
        &self,
        entity_type: String,
        entity_id: String,
    ) -> Result<CachedEntity, RealtimeError> {
        let me = self.client_id.clone();
        self.call(|c| async move {
            let e = c.delete_entity(entity_type, entity_id).await?;
            Ok(CachedEntity::new(&e, &me))
        })
        .await
    }

    /// The cached entity (local edits included), if known.
    pub async fn entity(
        &self,
        entity_type: String,
        entity_id: String,
    ) -> Result<Option<CachedEntity>, RealtimeError> {
        let me = self.client_id.clone();
        self.call(|c| async move {
            let e = c.entity(entity_type, entity_id).await?;
            Ok(e.map(|e| CachedEntity::new(&e, &me)))
        })
        .await
    }

    /// The ids of the cached entities of a type.
    pub async fn entity_ids(&self, entity_type: String) -> Result<Vec<String>, RealtimeError> {
        self.call(|c| async move { Ok(c.entity_ids(entity_type).await?) })
            .await
    }

    /// Asks for the server's entity changes now (they are also pulled periodically).
    pub fn sync_entities(&self) -> Result<(), RealtimeError> {
        Ok(self.client.sync_entities()?)
    }

    /// The open conflicts (MANUAL strategy), oldest first, with both sides.
    pub async fn conflicts(&self) -> Result<Vec<EntityConflict>, RealtimeError> {
        let me = self.client_id.clone();
        self.call(|c| async move {
            let list = c.conflicts().await?;
            Ok(list.iter().map(|x| EntityConflict::new(x, &me)).collect())
        })
        .await
    }

    /// Settles an open conflict by writing a value that supersedes both sides.
    pub async fn resolve_conflict(
        &self,
        conflict_id: String,
        choice: ConflictChoice,
    ) -> Result<CachedEntity, RealtimeError> {
        let resolution = choice.into_core()?;
        let me = self.client_id.clone();
        self.call(|c| async move {
            let e = c.resolve_conflict(&conflict_id, resolution).await?;
            Ok(CachedEntity::new(&e, &me))
        })
        .await
    }

    /// One outbox item (the handle of a message, edit or transaction), if still known.
    pub async fn item(&self, id: String) -> Result<Option<OutboxItem>, RealtimeError> {
        self.call(|c| async move { Ok(c.item(&id).await?.map(Into::into)) })
            .await
    }

    /// The outbox, optionally in one state only.
    pub async fn outbox(
        &self,
        state: Option<OutboxItemState>,
    ) -> Result<Vec<OutboxItem>, RealtimeError> {
        self.call(|c| async move {
            let items = c.outbox(state.map(Into::into)).await?;
            Ok(items.into_iter().map(Into::into).collect())
        })
        .await
    }

    /// Sends a dead item again (the app decided the cause is fixed).
    pub async fn retry(&self, id: String) -> Result<OutboxItem, RealtimeError> {
        self.call(|c| async move { Ok(c.retry(&id).await?.into()) })
            .await
    }

    /// Gives a dead item up for good.
    pub async fn discard(&self, id: String) -> Result<OutboxItem, RealtimeError> {
        self.call(|c| async move { Ok(c.discard(&id).await?.into()) })
            .await
    }

    /// Waits until item `id` is in one of `states` or `timeoutMs` passes (at most one
    /// hour); returns the item as it then is.
    pub async fn wait_settled(
        &self,
        id: String,
        states: Vec<OutboxItemState>,
        timeout_ms: u64,
    ) -> Result<OutboxItem, RealtimeError> {
        if states.is_empty() {
            return Err(RealtimeError::invalid("states", "must not be empty"));
        }
        let timeout = Duration::from_millis(timeout_ms).min(MAX_WAIT);
        let want: Vec<_> = states.into_iter().map(Into::into).collect();
        self.call(|c| async move { Ok(c.wait_settled(&id, &want, timeout).await?.into()) })
            .await
    }

    /// Changes the key that encrypts the store to `newKey` (32 bytes): the store is
    /// rewritten under it into a checked copy that replaces the file in one rename.
    /// Until this returns the file is under the old key, after it under the new one:
    /// keep both in the Keychain or Keystore until then, and open the client with the
    /// new one from then on. Fails, changing nothing, when it cannot finish (a full
    /// disk, another process with the file open). A plaintext store is refused: open it
    /// with `encryptionKey` to encrypt it.
    pub async fn rekey(&self, new_key: Vec<u8>) -> Result<(), RealtimeError> {
        let key = crate::options::store_key("newKey", &new_key)?;
        self.call(|c| async move { Ok(c.rekey(key).await?) }).await
    }

    /// Figures for diagnostics.
    pub async fn metrics(&self) -> Result<ClientMetrics, RealtimeError> {
        self.call(|c| async move { Ok(c.metrics().await?.into()) })
            .await
    }

    /// The device's network is available again: retry at once.
    pub fn network_available(&self) {
        self.client.network_available();
    }

    /// The device lost its network.
    pub fn network_lost(&self) {
        self.client.network_lost();
    }

    /// The app came to the foreground: check the connection at once.
    pub fn foreground(&self) {
        self.client.foreground();
    }

    /// The app went to the background.
    pub fn background(&self) {
        self.client.background();
    }

    /// Asks the token provider for a fresh token and connects again (the way out of
    /// `AUTH_FAILED`).
    pub fn reauthenticate(&self) {
        self.client.reauthenticate();
    }

    /// Closes the connection and stops the client; later calls fail with `Closed`.
    /// What is in the outbox stays for the next run.
    pub async fn shutdown(&self) -> Result<(), RealtimeError> {
        self.call(|c| async move {
            c.shutdown().await;
            Ok(())
        })
        .await
    }
}
