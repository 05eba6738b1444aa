//! The errors that cross the FFI: [`RealtimeError`], thrown by the client's methods
//! (Kotlin `RealtimeException`, Swift `RealtimeError`), and [`CallbackError`], which the
//! app's own implementations of the foreign traits (token provider, listener, logger)
//! may throw back.
//!
//! Error texts never carry tokens or payloads: they name the field and what is wrong
//! with it, the item id, or the server's reason.

use webwaka_realtime::client::ClientError;

/// Why a client call failed. One flat enum: each variant says what the app should do.
/// Nothing the app handed over before is lost by any of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, uniffi::Error)]
pub enum RealtimeError {
    /// The input is wrong: fix it (the field is named, e.g. `payloadJson`, `roomId`).
    /// Nothing was stored.
    #[error("invalid {field}: {problem}")]
    InvalidInput {
        /// The offending field.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A live-only item (presence, typing: Class A) and no live connection now: it was
    /// dropped, as live items are, and not stored. Nothing to do; try again when the
    /// state is `REALTIME` if it still matters.
    #[error("dropped: not connected (live-only items are never queued)")]
    NotConnected,
    /// The outbox is full: this item was refused, nothing was dropped. Retry once items
    /// drain (watch the outbox updates), or discard dead items.
    #[error("the outbox is full ({limit}); this item was refused")]
    QueueFull {
        /// The limit reached, e.g. `10000 items`.
        limit: String,
    },
    /// The credentials were refused and no fresh token could be had: sign the user in
    /// again, then call `reauthenticate()`.
    #[error("authentication failed: a new token is needed")]
    Reauthenticate,
    /// The server refused this for this user (room policy, roles): do not retry as is.
    #[error("not allowed: {reason}")]
    NotAllowed {
        /// The server's reason.
        reason: String,
    },
    /// No such item (outbox id, entity, conflict): refresh what the app shows.
    #[error("not found: {what}")]
    NotFound {
        /// What was looked for, e.g. `conflict 42`.
        what: String,
    },
    /// The item is not in a state that allows this (e.g. retrying an accepted item):
    /// re-read it and decide again.
    #[error("invalid state: {reason}")]
    InvalidState {
        /// What the state is and what was asked.
        reason: String,
    },
    /// A temporary condition (server unreachable, timeout): retry later.
    #[error("temporarily unavailable: {reason}")]
    RetryLater {
        /// What failed.
        reason: String,
    },
    /// The device's storage is full (or the store reached its size limit): this was
    /// not stored. Tell the user "storage full" (not "offline"), free space, try again.
    /// What was committed before is safe; the connection is unaffected.
    #[error("storage full: {reason}")]
    StorageFull {
        /// What SQLite or the file system said.
        reason: String,
    },
    /// The store's file is damaged: report it; the damaged file is kept aside.
    #[error("storage corrupt: {reason}")]
    StorageCorrupt {
        /// What SQLite said.
        reason: String,
    },
    /// The local store failed otherwise (I/O error, read-only, locked): tell the user.
    /// What was committed before is safe.
    #[error("storage error: {reason}")]
    StorageIo {
        /// What SQLite or the file system said.
        reason: String,
    },
    /// The store is encrypted and the key given (or none) does not open it: open the
    /// client with the store's key. Nothing was changed and the file is kept.
    #[error("wrong store key: {reason}")]
    WrongKey {
        /// Which store, and whether a key was given.
        reason: String,
    },
    /// The client was shut down: open a new one.
    #[error("the client is shut down")]
    Closed,
    /// A bug in the SDK (a task panicked, a runtime could not start): report it.
    #[error("internal error: {reason}")]
    Internal {
        /// What happened.
        reason: String,
    },
}

impl From<ClientError> for RealtimeError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::InvalidInput { field, message } => RealtimeError::InvalidInput {
                field,
                problem: message,
            },
            ClientError::NotConnected => RealtimeError::NotConnected,
            ClientError::QueueFull { limit } => RealtimeError::QueueFull { limit },
            ClientError::Reauthenticate => RealtimeError::Reauthenticate,
            ClientError::NotAllowed(reason) => RealtimeError::NotAllowed { reason },
            ClientError::NotFound(what) => RealtimeError::NotFound { what },
            ClientError::InvalidState(reason) => RealtimeError::InvalidState { reason },
            ClientError::RetryLater(reason) => RealtimeError::RetryLater { reason },
            ClientError::StorageFull(reason) => RealtimeError::StorageFull { reason },
            ClientError::StorageCorrupt(reason) => RealtimeError::StorageCorrupt { reason },
            ClientError::StorageIo(reason) => RealtimeError::StorageIo { reason },
            ClientError::WrongKey(reason) => RealtimeError::WrongKey { reason },
            ClientError::Closed => RealtimeError::Closed,
        }
    }
}

impl RealtimeError {
    /// An [`RealtimeError::InvalidInput`] for `field`.
    pub(crate) fn invalid(field: &str, problem: impl Into<String>) -> Self {
        RealtimeError::InvalidInput {
            field: field.to_owned(),
            problem: problem.into(),
        }
    }

    /// An [`RealtimeError::Internal`].
    pub(crate) fn internal(reason: impl Into<String>) -> Self {
        RealtimeError::Internal {
            reason: reason.into(),
        }
    }
}

/// What the app's implementation of a foreign trait (token provider, listener, logger)
/// may throw. Any other exception it throws arrives as `Failed` too,
/// with the exception's description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, uniffi::Error)]
pub enum CallbackError {
    /// The callback could not do its job.
    #[error("callback failed: {reason}")]
    Failed {
        /// Why, in the app's words.
        reason: String,
    },
}

impl From<uniffi::UnexpectedUniFFICallbackError> for CallbackError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        CallbackError::Failed { reason: e.reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_client_error_maps_to_its_variant() {
        let cases = [
            (
                ClientError::InvalidInput {
                    field: "roomId".into(),
                    message: "must not be empty".into(),
                },
                RealtimeError::invalid("roomId", "must not be empty"),
            ),
            (ClientError::NotConnected, RealtimeError::NotConnected),
            (
                ClientError::QueueFull {
                    limit: "10 items".into(),
                },
                RealtimeError::QueueFull {
                    limit: "10 items".into(),
                },
            ),
            (ClientError::Reauthenticate, RealtimeError::Reauthenticate),
            (
                ClientError::NotAllowed("policy".into()),
                RealtimeError::NotAllowed {
                    reason: "policy".into(),
                },
            ),
            (
                ClientError::NotFound("x".into()),
                RealtimeError::NotFound { what: "x".into() },
            ),
            (
                ClientError::InvalidState("s".into()),
                RealtimeError::InvalidState { reason: "s".into() },
            ),
            (
                ClientError::RetryLater("r".into()),
                RealtimeError::RetryLater { reason: "r".into() },
            ),
            (
                ClientError::StorageFull("disk".into()),
                RealtimeError::StorageFull {
                    reason: "disk".into(),
                },
            ),
            (
                ClientError::StorageCorrupt("bad page".into()),
                RealtimeError::StorageCorrupt {
                    reason: "bad page".into(),
                },
            ),
            (
                ClientError::StorageIo("eio".into()),
                RealtimeError::StorageIo {
                    reason: "eio".into(),
                },
            ),
            (ClientError::Closed, RealtimeError::Closed),
        ];
        for (from, want) in cases {
            assert_eq!(RealtimeError::from(from), want);
        }
    }
}
