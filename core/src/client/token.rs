//! Tokens: where the client gets them ([`TokenProvider`]) and what it reads in them.
//!
//! The client asks the provider for a token when it connects and again when the server
//! refuses or expires the one it has; one request at a time. The client reads the
//! token's claims (tenant, user, expiry) without verifying the signature: that is the
//! server's job; the client only needs to know who it is.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use base64::Engine;
use serde::Deserialize;

use super::ClientError;

/// Why the client asks for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRequest {
    /// The client is connecting and has no token yet (or wants the current one).
    Initial,
    /// The server refused or expired the last token: a fresh one is needed.
    Refresh,
}

/// The provider could not give a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no token: {0}")]
pub struct TokenError(pub String);

/// The future a [`TokenProvider`] returns.
pub type TokenFuture<'a> = Pin<Box<dyn Future<Output = Result<String, TokenError>> + Send + 'a>>;

/// Gives the client its bearer tokens (JWT, PROTOCOL.md §1).
pub trait TokenProvider: Send + Sync + 'static {
    /// A token for `request`. A `Refresh` must not return the token just refused.
    fn token(&self, request: TokenRequest) -> TokenFuture<'_>;
}

/// A fixed token (tests, tools, development tokens).
#[derive(Debug, Clone)]
pub struct StaticToken(pub String);

impl TokenProvider for StaticToken {
    fn token(&self, _request: TokenRequest) -> TokenFuture<'_> {
        let token = self.0.clone();
        Box::pin(async move { Ok(token) })
    }
}

/// Any `Fn(TokenRequest) -> Future<Output = Result<String, TokenError>>` is a provider.
impl<F, Fut> TokenProvider for F
where
    F: Fn(TokenRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, TokenError>> + Send + 'static,
{
    fn token(&self, request: TokenRequest) -> TokenFuture<'_> {
        Box::pin(self(request))
    }
}

/// A shared provider.
pub type SharedTokenProvider = Arc<dyn TokenProvider>;

/// What the client reads from a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The tenant.
    pub tenant_id: String,
    /// The user.
    pub user_id: String,
    /// Expiry, seconds since the epoch.
    pub exp: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawClaims {
    tenant_id: Option<String>,
    user_id: Option<String>,
    sub: Option<String>,
    exp: Option<i64>,
}

impl Claims {
    /// Reads the claims of a JWT (not verified). The error says what is missing.
    pub fn read(token: &str) -> Result<Claims, String> {
        let payload = token
            .split('.')
            .nth(1)
            .ok_or_else(|| "the token is not a JWT (no payload part)".to_owned())?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .map_err(|e| format!("the token's payload is not base64url: {e}"))?;
        let raw: RawClaims = serde_json::from_slice(&bytes)
            .map_err(|e| format!("the token's payload is not JSON claims: {e}"))?;
        let tenant_id = raw
            .tenant_id
            .filter(|t| !t.is_empty())
            .ok_or_else(|| "the token has no tenantId claim".to_owned())?;
        let user_id = raw
            .user_id
            .or(raw.sub)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| "the token has no userId (or sub) claim".to_owned())?;
        Ok(Claims {
            tenant_id,
            user_id,
            exp: raw.exp,
        })
    }
}

/// The current token, shared by the tasks; fetched from the provider when missing.
pub(crate) struct TokenCell {
    provider: SharedTokenProvider,
    /// How long one request to the provider may take: one that never answers would
    /// otherwise hold every request of the client (they wait for the token) for good.
    timeout: std::time::Duration,
    current: std::sync::Mutex<Option<(String, Claims)>>,
    /// Held while the provider is asked, so that there is one request at a time. The
    /// current token stays readable meanwhile.
    fetching: tokio::sync::Mutex<()>,
    /// Bumped at every new token: a refusal of an older generation is not a refusal
    /// of the current token.
    generation: std::sync::atomic::AtomicU64,
}

impl TokenCell {
    pub(crate) fn new(provider: SharedTokenProvider, timeout: std::time::Duration) -> Self {
        Self {
            provider,
            timeout,
            current: std::sync::Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The current token and its generation (read together: `set` changes both under
    /// the same lock).
    pub(crate) async fn get_tagged(&self) -> Result<(String, u64), TokenError> {
        let token = self.get().await?;
        let tagged = self.current.lock().ok().and_then(|current| {
            current
                .as_ref()
                .map(|(token, _)| (token.clone(), self.generation()))
        });
        Ok(tagged.unwrap_or((token, 0)))
    }

    /// After the server refused the token of generation `used`: the token to try
    /// again with when it has been replaced since (a refresh in progress is waited
    /// for), or `None` when `used` is still the current one and the refusal stands.
    pub(crate) async fn replaced_since(&self, used: u64) -> Option<String> {
        let _settled = self.fetching.lock().await;
        if self.generation() == used {
            return None;
        }
        self.current().map(|(token, _)| token)
    }

    fn current(&self) -> Option<(String, Claims)> {
        self.current.lock().ok().and_then(|c| c.clone())
    }

    fn set(&self, fresh: (String, Claims)) {
        if let Ok(mut current) = self.current.lock() {
            *current = Some(fresh);
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    async fn fetch(&self, request: TokenRequest) -> Result<(String, Claims), TokenError> {
        let token = tokio::time::timeout(self.timeout, self.provider.token(request))
            .await
            .map_err(|_| {
                TokenError(format!(
                    "the token provider did not answer within {} ms",
                    self.timeout.as_millis()
                ))
            })??;
        let claims = Claims::read(&token).map_err(TokenError)?;
        Ok((token, claims))
    }

    /// The current token, asking the provider when there is none (one request at a
    /// time; no lock is held while the provider runs, except the one that keeps a
    /// second request from starting).
    pub(crate) async fn get(&self) -> Result<String, TokenError> {
        if let Some((token, _)) = self.current() {
            return Ok(token);
        }
        let _one_at_a_time = self.fetching.lock().await;
        if let Some((token, _)) = self.current() {
            return Ok(token); // fetched by whoever held the lock before us
        }
        let fresh = self.fetch(TokenRequest::Initial).await?;
        let token = fresh.0.clone();
        self.set(fresh);
        Ok(token)
    }

    /// The claims of the current token.
    pub(crate) async fn claims(&self) -> Result<Claims, ClientError> {
        self.get().await.map_err(|_| ClientError::Reauthenticate)?;
        self.current()
            .map(|(_, c)| c)
            .ok_or(ClientError::Reauthenticate)
    }

    /// Replaces the token with a fresh one from the provider.
    pub(crate) async fn refresh(&self) -> Result<(), TokenError> {
        let _one_at_a_time = self.fetching.lock().await;
        let fresh = self.fetch(TokenRequest::Refresh).await?;
        self.set(fresh);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", b(r#"{"alg":"HS256"}"#), b(claims))
    }

    #[test]
    fn claims_are_read_with_sub_as_fallback() {
        let c = Claims::read(&jwt(r#"{"tenantId":"t","sub":"u","exp":5}"#)).unwrap();
        assert_eq!(
            (c.tenant_id.as_str(), c.user_id.as_str(), c.exp),
            ("t", "u", Some(5))
        );
        let c = Claims::read(&jwt(r#"{"tenantId":"t","userId":"v","sub":"u"}"#)).unwrap();
        assert_eq!(c.user_id, "v");
    }

    #[test]
    fn bad_tokens_say_what_is_wrong() {
        assert!(Claims::read("nodots").unwrap_err().contains("not a JWT"));
        assert!(
            Claims::read(&jwt(r#"{"userId":"u"}"#))
                .unwrap_err()
                .contains("tenantId")
        );
        assert!(
            Claims::read(&jwt(r#"{"tenantId":"t"}"#))
                .unwrap_err()
                .contains("userId")
        );
        assert!(Claims::read("a.!!!.c").unwrap_err().contains("base64"));
    }
}
