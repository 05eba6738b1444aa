//! Tokens from the app: the foreign [`TokenProvider`] trait (implemented in Kotlin or
//! Swift, async) and its adapter to core's `TokenProvider`.
//!
//! The client asks for a token when it connects and again when the server refuses or
//! expires the one it has, one request at a time. The adapter bounds each request in
//! time (`tokenTimeoutMs`, 30 s by default), so that a provider that never answers cannot hold the client forever; a
//! provider that throws, answers late or returns an empty token leaves the client in
//! `AUTH_FAILED` until `reauthenticate()`.
//!
//! The provider must not call the client from inside `token()`: entity edits wait for
//! the token being fetched, so such a call would wait for itself (until the bound).

use std::sync::Arc;
use std::time::Duration;

use webwaka_realtime::client::{self as sdk, TokenError, TokenFuture};

use crate::error::CallbackError;

/// Why the client asks for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum TokenRequest {
    /// The client is connecting and has no token yet.
    Initial,
    /// The server refused or expired the last token: return a fresh one, not the same.
    Refresh,
}

impl From<sdk::TokenRequest> for TokenRequest {
    fn from(r: sdk::TokenRequest) -> Self {
        match r {
            sdk::TokenRequest::Initial => TokenRequest::Initial,
            sdk::TokenRequest::Refresh => TokenRequest::Refresh,
        }
    }
}

/// Gives the client its bearer tokens (JWTs with `tenantId` and `userId` claims).
/// Implemented by the app, e.g. with its login session. Throw
/// `CallbackError.Failed` when no token can be had (the user must sign in again).
#[uniffi::export(foreign)]
#[async_trait::async_trait]
pub trait TokenProvider: Send + Sync {
    /// A token for `request`.
    async fn token(&self, request: TokenRequest) -> Result<String, CallbackError>;
}

/// Core's view of the app's provider.
pub(crate) struct ForeignTokens {
    provider: Arc<dyn TokenProvider>,
    timeout: Duration,
}

impl ForeignTokens {
    /// Wraps the app's provider, bounding each request by `timeout`.
    pub(crate) fn new(provider: Arc<dyn TokenProvider>, timeout: Duration) -> Self {
        Self { provider, timeout }
    }
}

impl sdk::TokenProvider for ForeignTokens {
    fn token(&self, request: sdk::TokenRequest) -> TokenFuture<'_> {
        Box::pin(async move {
            let answer = tokio::time::timeout(self.timeout, self.provider.token(request.into()));
            match answer.await {
                Err(_) => Err(TokenError(format!(
                    "the token provider did not answer within {} s",
                    self.timeout.as_secs()
                ))),
                Ok(Err(CallbackError::Failed { reason })) => Err(TokenError(reason)),
                Ok(Ok(token)) if token.trim().is_empty() => Err(TokenError(
                    "the token provider returned an empty token".into(),
                )),
                Ok(Ok(token)) => Ok(token),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdk::TokenProvider as _;

    struct Fixed(Result<String, CallbackError>);

    #[async_trait::async_trait]
    impl TokenProvider for Fixed {
        async fn token(&self, _request: TokenRequest) -> Result<String, CallbackError> {
            self.0.clone()
        }
    }

    struct Never;

    #[async_trait::async_trait]
    impl TokenProvider for Never {
        async fn token(&self, _request: TokenRequest) -> Result<String, CallbackError> {
            std::future::pending().await
        }
    }

    fn ask(
        provider: impl TokenProvider + 'static,
        timeout: Duration,
    ) -> Result<String, TokenError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let tokens = ForeignTokens::new(Arc::new(provider), timeout);
        runtime.block_on(tokens.token(sdk::TokenRequest::Refresh))
    }

    #[test]
    fn answers_failures_and_silence_become_token_results() {
        let t = Duration::from_secs(1);
        assert_eq!(ask(Fixed(Ok("a.b.c".into())), t), Ok("a.b.c".into()));
        assert_eq!(
            ask(
                Fixed(Err(CallbackError::Failed {
                    reason: "signed out".into()
                })),
                t
            ),
            Err(TokenError("signed out".into()))
        );
        assert!(
            ask(Fixed(Ok(" ".into())), t)
                .unwrap_err()
                .0
                .contains("empty")
        );
        assert!(
            ask(Never, Duration::from_millis(20))
                .unwrap_err()
                .0
                .contains("did not answer")
        );
    }
}
