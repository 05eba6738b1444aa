//! [`ClientOptions`]: how the app sets a client up. Only the server URL and the store
//! path are required; every other field is optional and falls back to the SDK's
//! defaults (core's `ClientConfig::new`, `MachineConfig::default`).

use std::time::Duration;

use webwaka_realtime::client::ClientConfig;
use webwaka_realtime::store;

use crate::error::RealtimeError;

/// How hard a store commit tries to reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum Durability {
    /// Each commit is on the disk when the call returns (the default).
    Full,
    /// Survives an app crash, not always a power cut; faster.
    Normal,
}

/// How a client is set up. Times are in milliseconds; an absent field keeps the SDK's
/// default.
#[derive(Clone, PartialEq, Eq, uniffi::Record)]
pub struct ClientOptions {
    /// The server's base URL, e.g. `https://realtime.example.com`.
    pub server_url: String,
    /// The SQLite file of this installation (in the app's private storage).
    pub store_path: String,
    /// The WebSocket path (default `/ws`).
    #[uniffi(default)]
    pub ws_path: Option<String>,
    /// Commit durability (default `FULL`).
    #[uniffi(default)]
    pub durability: Option<Durability>,
    /// The outbox refuses new items past this many pending ones.
    #[uniffi(default)]
    pub max_outbox_items: Option<u64>,
    /// The outbox refuses new items past this many pending bytes.
    #[uniffi(default)]
    pub max_outbox_bytes: Option<u64>,
    /// Largest payload accepted, in bytes of JSON.
    #[uniffi(default)]
    pub max_payload_bytes: Option<u64>,
    /// Bound of each HTTP request.
    #[uniffi(default)]
    pub request_timeout_ms: Option<u64>,
    /// Bound of each call of the token provider (default 30 s): one that takes longer
    /// (an interactive sign-in) counts as no token.
    #[uniffi(default)]
    pub token_timeout_ms: Option<u64>,
    /// Smallest retry delay.
    #[uniffi(default)]
    pub backoff_min_ms: Option<u64>,
    /// Largest retry delay while Offline.
    #[uniffi(default)]
    pub backoff_max_ms: Option<u64>,
    /// Offline this long becomes Suspended (slow retries).
    #[uniffi(default)]
    pub suspend_after_ms: Option<u64>,
    /// A WebSocket attempt slower than this makes the client try HTTP meanwhile.
    #[uniffi(default)]
    pub slow_connect_ms: Option<u64>,
    /// A WebSocket attempt is abandoned after this.
    #[uniffi(default)]
    pub connect_timeout_ms: Option<u64>,
    /// Ping the server after this long (the server's setting replaces it).
    #[uniffi(default)]
    pub ping_interval_ms: Option<u64>,
    /// A ping unanswered for this long means the socket is dead.
    #[uniffi(default)]
    pub pong_timeout_ms: Option<u64>,
    /// Time between polls while Polling.
    #[uniffi(default)]
    pub poll_interval_ms: Option<u64>,
    /// First delay between WebSocket probes while Polling.
    #[uniffi(default)]
    pub probe_min_ms: Option<u64>,
    /// Largest delay between WebSocket probes while Polling.
    #[uniffi(default)]
    pub probe_max_ms: Option<u64>,
    /// Realtime held this long resets the probe schedule.
    #[uniffi(default)]
    pub stable_after_ms: Option<u64>,
    /// An unacknowledged message is sent again after this.
    #[uniffi(default)]
    pub ack_timeout_ms: Option<u64>,
    /// How often entity changes are pulled while connected.
    #[uniffi(default)]
    pub entity_pull_interval_ms: Option<u64>,
    /// The longest wait between entity pulls while nothing changes (default 15
    /// minutes): each empty pull doubles the wait up to this; a change, a local edit, a
    /// new connection or the app coming to the foreground starts again from the short
    /// one.
    #[uniffi(default)]
    pub entity_pull_idle_max_ms: Option<u64>,
    /// How often pending transactions' status is checked while connected.
    #[uniffi(default)]
    pub transaction_check_interval_ms: Option<u64>,
    /// After `background()`, how long the client goes on as usual before it closes its
    /// connection and stops every timer of its own until `foreground()` or a send, edit
    /// or sync of the app's (default 10 s; `0`: at once).
    #[uniffi(default)]
    pub background_linger_ms: Option<u64>,
    /// Extra trusted root certificates (PEM texts) for an `https://` server under a
    /// private CA; the bundled public roots stay trusted.
    #[uniffi(default)]
    pub tls_root_certificates: Option<Vec<String>>,
    /// How long settled outbox items stay readable before they are deleted (default
    /// 24 h); `0` keeps them forever.
    #[uniffi(default)]
    pub settled_retention_ms: Option<u64>,
    /// Encrypts the store with this key: 32 random bytes (AES-256) the app makes once
    /// and keeps in the Keychain or the Keystore. A plaintext store is encrypted at the
    /// first open with a key. Opening an encrypted store with another key, or none,
    /// fails with `WrongKey` and leaves the file as it is. `rekey` changes it.
    #[uniffi(default)]
    pub encryption_key: Option<Vec<u8>>,
}

/// Every field but the key, which is never printed.
impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("server_url", &self.server_url)
            .field("store_path", &self.store_path)
            .field(
                "encryption_key",
                &self.encryption_key.as_ref().map(|_| "(set)"),
            )
            .finish_non_exhaustive()
    }
}

/// Sets `target` to `value` ms when given; zero is refused (it would spin).
fn set_ms(target: &mut Duration, field: &str, value: Option<u64>) -> Result<(), RealtimeError> {
    match value {
        None => Ok(()),
        Some(0) => Err(RealtimeError::invalid(field, "must be at least 1 ms")),
        Some(ms) => {
            *target = Duration::from_millis(ms);
            Ok(())
        }
    }
}

/// A store key from the app's bytes; a wrong length is `InvalidInput` naming `field`.
pub(crate) fn store_key(field: &str, bytes: &[u8]) -> Result<store::StoreKey, RealtimeError> {
    store::StoreKey::from_bytes(bytes).map_err(|e| match e {
        store::StoreError::Invalid { message, .. } => RealtimeError::invalid(field, message),
        other => RealtimeError::invalid(field, other.to_string()),
    })
}

/// A count or size given by the app, checked to fit this platform.
fn set_count<T: TryFrom<u64>>(
    target: &mut T,
    field: &str,
    value: Option<u64>,
) -> Result<(), RealtimeError> {
    match value {
        None => Ok(()),
        Some(0) => Err(RealtimeError::invalid(field, "must be at least 1")),
        Some(v) => {
            *target = T::try_from(v).map_err(|_| RealtimeError::invalid(field, "is too large"))?;
            Ok(())
        }
    }
}

impl ClientOptions {
    /// Options with only the required fields (for Rust callers and tests; Kotlin and
    /// Swift get the same from the record's default arguments).
    pub fn new(server_url: impl Into<String>, store_path: impl Into<String>) -> Self {
        Self {
            server_url: server_url.into(),
            store_path: store_path.into(),
            ws_path: None,
            durability: None,
            max_outbox_items: None,
            max_outbox_bytes: None,
            max_payload_bytes: None,
            request_timeout_ms: None,
            token_timeout_ms: None,
            backoff_min_ms: None,
            backoff_max_ms: None,
            suspend_after_ms: None,
            slow_connect_ms: None,
            connect_timeout_ms: None,
            ping_interval_ms: None,
            pong_timeout_ms: None,
            poll_interval_ms: None,
            probe_min_ms: None,
            probe_max_ms: None,
            stable_after_ms: None,
            ack_timeout_ms: None,
            entity_pull_interval_ms: None,
            transaction_check_interval_ms: None,
            tls_root_certificates: None,
            settled_retention_ms: None,
            entity_pull_idle_max_ms: None,
            background_linger_ms: None,
            encryption_key: None,
        }
    }

    /// Core's configuration: the SDK's defaults with the given fields replaced.
    pub(crate) fn into_config(self) -> Result<ClientConfig, RealtimeError> {
        if self.server_url.trim().is_empty() {
            return Err(RealtimeError::invalid("serverUrl", "must not be empty"));
        }
        if self.store_path.trim().is_empty() {
            return Err(RealtimeError::invalid("storePath", "must not be empty"));
        }
        let mut c = ClientConfig::new(self.server_url, self.store_path);
        if let Some(path) = self.ws_path {
            if !path.starts_with('/') {
                return Err(RealtimeError::invalid("wsPath", "must start with '/'"));
            }
            c.ws_path = path;
        }
        if let Some(d) = self.durability {
            c.store.durability = match d {
                Durability::Full => store::Durability::Full,
                Durability::Normal => store::Durability::Normal,
            };
        }
        set_count(
            &mut c.store.max_items,
            "maxOutboxItems",
            self.max_outbox_items,
        )?;
        set_count(
            &mut c.store.max_bytes,
            "maxOutboxBytes",
            self.max_outbox_bytes,
        )?;
        set_count(
            &mut c.max_payload_bytes,
            "maxPayloadBytes",
            self.max_payload_bytes,
        )?;
        set_ms(
            &mut c.request_timeout,
            "requestTimeoutMs",
            self.request_timeout_ms,
        )?;
        set_ms(
            &mut c.token_timeout,
            "tokenTimeoutMs",
            self.token_timeout_ms,
        )?;
        let m = &mut c.machine;
        set_ms(&mut m.backoff_min, "backoffMinMs", self.backoff_min_ms)?;
        set_ms(&mut m.backoff_max, "backoffMaxMs", self.backoff_max_ms)?;
        set_ms(
            &mut m.suspend_after,
            "suspendAfterMs",
            self.suspend_after_ms,
        )?;
        set_ms(&mut m.slow_connect, "slowConnectMs", self.slow_connect_ms)?;
        set_ms(
            &mut m.connect_timeout,
            "connectTimeoutMs",
            self.connect_timeout_ms,
        )?;
        set_ms(
            &mut m.ping_interval,
            "pingIntervalMs",
            self.ping_interval_ms,
        )?;
        set_ms(&mut m.pong_timeout, "pongTimeoutMs", self.pong_timeout_ms)?;
        set_ms(
            &mut m.poll_interval,
            "pollIntervalMs",
            self.poll_interval_ms,
        )?;
        set_ms(&mut m.probe_min, "probeMinMs", self.probe_min_ms)?;
        set_ms(&mut m.probe_max, "probeMaxMs", self.probe_max_ms)?;
        set_ms(&mut m.stable_after, "stableAfterMs", self.stable_after_ms)?;
        if let Some(ms) = self.background_linger_ms {
            m.background_linger = Duration::from_millis(ms); // 0: park at once
        }
        if m.backoff_min > m.backoff_max {
            return Err(RealtimeError::invalid(
                "backoffMinMs",
                "must not be above backoffMaxMs",
            ));
        }
        if m.probe_min > m.probe_max {
            return Err(RealtimeError::invalid(
                "probeMinMs",
                "must not be above probeMaxMs",
            ));
        }
        set_ms(&mut c.ack_timeout, "ackTimeoutMs", self.ack_timeout_ms)?;
        set_ms(
            &mut c.entity_pull_interval,
            "entityPullIntervalMs",
            self.entity_pull_interval_ms,
        )?;
        set_ms(
            &mut c.transaction_check_interval,
            "transactionCheckIntervalMs",
            self.transaction_check_interval_ms,
        )?;
        set_ms(
            &mut c.entity_pull_idle_max,
            "entityPullIdleMaxMs",
            self.entity_pull_idle_max_ms,
        )?;
        if let Some(key) = self.encryption_key {
            c.store.key = Some(store_key("encryptionKey", &key)?);
        }
        if let Some(roots) = self.tls_root_certificates {
            c.tls_root_certificates = roots;
        }
        match self.settled_retention_ms {
            None => {}
            Some(0) => c.settled_retention = None,
            Some(ms) => c.settled_retention = Some(Duration::from_millis(ms)),
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal(url: &str, store: &str) -> ClientOptions {
        ClientOptions::new(url, store)
    }

    #[test]
    fn absent_fields_keep_the_sdk_defaults() {
        let c = minimal("http://127.0.0.1:1", "/tmp/x.db")
            .into_config()
            .unwrap();
        let d = ClientConfig::new("http://127.0.0.1:1", "/tmp/x.db");
        assert_eq!(c.request_timeout, d.request_timeout);
        assert_eq!(c.machine.backoff_min, d.machine.backoff_min);
        assert_eq!(c.ws_path, d.ws_path);
        assert_eq!(c.store.max_items, d.store.max_items);
        assert_eq!(c.settled_retention, d.settled_retention);
    }

    #[test]
    fn settled_retention_is_given_in_ms_and_zero_keeps_items_forever() {
        let mut o = minimal("http://127.0.0.1:1", "/tmp/x.db");
        o.settled_retention_ms = Some(60_000);
        let c = o.clone().into_config().unwrap();
        assert_eq!(c.settled_retention, Some(Duration::from_secs(60)));
        o.settled_retention_ms = Some(0);
        assert_eq!(o.into_config().unwrap().settled_retention, None);
    }

    #[test]
    fn given_fields_replace_the_defaults_and_bad_ones_are_named() {
        let mut o = minimal("http://127.0.0.1:1", "/tmp/x.db");
        o.backoff_min_ms = Some(50);
        o.backoff_max_ms = Some(500);
        o.durability = Some(Durability::Normal);
        o.max_outbox_items = Some(7);
        let c = o.clone().into_config().unwrap();
        assert_eq!(c.machine.backoff_min, Duration::from_millis(50));
        assert_eq!(c.machine.backoff_max, Duration::from_millis(500));
        assert_eq!(c.store.durability, store::Durability::Normal);
        assert_eq!(c.store.max_items, 7);

        o.backoff_min_ms = Some(0);
        assert!(matches!(
            o.clone().into_config(),
            Err(RealtimeError::InvalidInput { field, .. }) if field == "backoffMinMs"
        ));
        o.backoff_min_ms = Some(5_000);
        assert!(matches!(
            o.into_config(),
            Err(RealtimeError::InvalidInput { field, .. }) if field == "backoffMinMs"
        ));
        assert!(matches!(
            minimal(" ", "/tmp/x.db").into_config(),
            Err(RealtimeError::InvalidInput { field, .. }) if field == "serverUrl"
        ));
    }
}
