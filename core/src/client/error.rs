//! The client's error type: each variant tells the app what to do about it.

use crate::store::{StorageFailure, StoreError};

/// Why a client call failed. Nothing the app handed over before is lost by any of these.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// The input is wrong; fix it (the field is named). Nothing was stored.
    #[error("invalid {field}: {message}")]
    InvalidInput {
        /// The offending field, e.g. `payload` or `roomId`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// Class A (presence, typing) is live only and there is no live connection now: the
    /// item was dropped, as Class A items are, and not stored.
    #[error("dropped: not connected (live-only items are never queued)")]
    NotConnected,
    /// The outbox is full; nothing was dropped, this item was refused. Retry when items
    /// drain, or discard dead ones.
    #[error("the outbox is full ({limit}); this item was refused")]
    QueueFull {
        /// The limit reached, e.g. `10000 items`.
        limit: String,
    },
    /// The credentials were refused and could not be refreshed: give the client a new
    /// token (the state is `AuthFailed`).
    #[error("authentication failed: a new token is needed")]
    Reauthenticate,
    /// The server refused the request for this user (room policy, roles).
    #[error("not allowed: {0}")]
    NotAllowed(String),
    /// No such item (outbox id, entity, conflict, transaction).
    #[error("not found: {0}")]
    NotFound(String),
    /// The item is not in a state that allows this (e.g. retrying an accepted item).
    #[error("{0}")]
    InvalidState(String),
    /// A temporary condition (the server is unreachable, a timeout); retry later.
    #[error("temporarily unavailable: {0}")]
    RetryLater(String),
    /// The device's storage is full (or the store reached `max_file_bytes`): this was
    /// not stored. Free space and try again; what was committed before is safe. Not a
    /// network failure: the connection is unaffected.
    #[error("storage full: {0}")]
    StorageFull(String),
    /// The store's file is damaged. What was committed before may be kept in the file
    /// moved aside (see `StoreError::Corrupt`).
    #[error("storage corrupt: {0}")]
    StorageCorrupt(String),
    /// The local store failed otherwise (I/O error, locked, read-only). What was
    /// committed before is safe.
    #[error("storage error: {0}")]
    StorageIo(String),
    /// The store is encrypted and the key given (or none) does not open it. Nothing
    /// was changed and the file is kept: open the client again with the store's key.
    #[error("wrong store key: {0}")]
    WrongKey(String),
    /// The client was shut down.
    #[error("the client is shut down")]
    Closed,
}

impl From<StoreError> for ClientError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::QueueFull { limit } => ClientError::QueueFull { limit },
            StoreError::NotFound(id) => ClientError::NotFound(id),
            StoreError::InvalidState { .. } => ClientError::InvalidState(e.to_string()),
            // The store's thread is stopped when the client shuts down.
            StoreError::WriterClosed => ClientError::Closed,
            StoreError::Invalid { field, message } => ClientError::InvalidInput {
                field: field.to_owned(),
                message,
            },
            other => {
                let text = other.to_string();
                match other.storage_failure() {
                    Some(StorageFailure::Full) => ClientError::StorageFull(text),
                    Some(StorageFailure::Corrupt) => ClientError::StorageCorrupt(text),
                    Some(StorageFailure::WrongKey) => ClientError::WrongKey(text),
                    Some(StorageFailure::Io) | None => ClientError::StorageIo(text),
                }
            }
        }
    }
}

impl ClientError {
    /// True for a failure of the local store (full, corrupt, I/O), as opposed to the
    /// network, the server or the request.
    pub fn is_storage(&self) -> bool {
        matches!(
            self,
            ClientError::StorageFull(_)
                | ClientError::StorageCorrupt(_)
                | ClientError::StorageIo(_)
        )
    }
}

impl From<crate::protocol::DecodeError> for ClientError {
    fn from(e: crate::protocol::DecodeError) -> Self {
        ClientError::InvalidInput {
            field: e.path,
            message: e.message,
        }
    }
}
