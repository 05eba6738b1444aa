//! Tokens (PROTOCOL.md §1): verifying the JWTs clients present, minting development
//! tokens, and finding the secret.
//!
//! Only HS256 is accepted (a token whose header says `none` or any other algorithm is
//! refused before its signature is looked at); `exp` is required, with at most 60 s of
//! leeway; `tenantId` and `userId` (or `sub`) are required, `roles` defaults to none.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{Config, Mode};

/// Role that may publish events and use consumer groups.
pub const ROLE_SERVICE: &str = "service";
/// Tenant administrator.
pub const ROLE_ADMIN: &str = "admin";
/// Platform administrator: may act in another tenant with a justification.
pub const ROLE_SUPER_ADMIN: &str = "super_admin";
/// The shortest `JWT_SECRET` accepted, in bytes: by the server and by `token` alike.
pub const MIN_SECRET_BYTES: usize = 16;

/// Who a verified token says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's tenant.
    pub tenant_id: String,
    /// The user (`userId`, else `sub`).
    pub user_id: String,
    /// The roles.
    pub roles: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: i64,
    /// Issue time, seconds since the Unix epoch, when the token says.
    pub iat: Option<i64>,
}

impl Identity {
    /// True when the caller holds `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// True when the caller holds any of `roles`.
    pub fn has_any_role(&self, roles: &[&str]) -> bool {
        roles.iter().any(|r| self.has_role(r))
    }
}

/// The claims of a token this server mints (and the ones it reads).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claims {
    /// The tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// The user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Standard subject, accepted in place of `userId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Issued at, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
}

/// Why a token was refused (the text goes into the `AUTH_FAILED` body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in the header or the query.
    #[error("no token: send Authorization: Bearer <jwt> or the token query parameter")]
    Missing,
    /// The token is expired.
    #[error("token expired")]
    Expired,
    /// The header names an algorithm other than HS256 (including `none`).
    #[error("token algorithm not accepted (only HS256)")]
    Algorithm,
    /// The signature does not match the secret.
    #[error("bad token signature")]
    Signature,
    /// A required claim is missing or empty.
    #[error("token has no {0} claim")]
    MissingClaim(&'static str),
    /// Anything else that makes the token unreadable.
    #[error("malformed token: {0}")]
    Malformed(String),
}

/// The keys and rules used to check and mint tokens.
#[derive(Clone)]
pub struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").finish_non_exhaustive()
    }
}

impl Keys {
    /// Keys for `secret`, allowing `leeway_secs` of clock skew on `exp` (capped at 60).
    pub fn new(secret: &[u8], leeway_secs: u64) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = leeway_secs.min(60);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.required_spec_claims = ["exp".to_owned()].into_iter().collect();
        validation.validate_aud = false;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Checks `token` and reads who it names.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|err| match err.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::Algorithm
                }
                ErrorKind::InvalidSignature => AuthError::Signature,
                ErrorKind::MissingRequiredClaim(_) => AuthError::MissingClaim("exp"),
                _ => {
                    // `alg: none` fails while reading the header (no such algorithm).
                    let text = err.to_string();
                    if text.to_ascii_lowercase().contains("variant") {
                        AuthError::Algorithm
                    } else {
                        AuthError::Malformed(text)
                    }
                }
            })?;
        let claims = data.claims;
        let tenant_id = claims
            .tenant_id
            .filter(|t| !t.trim().is_empty())
            .ok_or(AuthError::MissingClaim("tenantId"))?;
        let user_id = claims
            .user_id
            .or(claims.sub)
            .filter(|u| !u.trim().is_empty())
            .ok_or(AuthError::MissingClaim("userId"))?;
        Ok(Identity {
            tenant_id,
            user_id,
            roles: claims.roles,
            exp: claims.exp,
            iat: claims.iat,
        })
    }

    /// Mints a token for `user` of `tenant` with `roles`, valid for `ttl_secs`.
    pub fn mint(&self, tenant: &str, user: &str, roles: &[String], ttl_secs: i64) -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            tenant_id: Some(tenant.to_owned()),
            user_id: Some(user.to_owned()),
            sub: Some(user.to_owned()),
            roles: roles.to_vec(),
            iat: Some(now),
            exp: now + ttl_secs,
        };
        self.sign(&claims)
    }

    /// Signs arbitrary `claims` with HS256 (tests use it for odd tokens).
    pub fn sign<T: Serialize>(&self, claims: &T) -> String {
        // HS256 signing of serialisable claims cannot fail with a valid HMAC key.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .unwrap_or_default()
    }
}

/// When a connection accepted with a token expiring at `exp` (seconds since the epoch)
/// must end: `exp` plus the leeway the token was accepted with.
pub(crate) fn token_end(exp: i64, config: &Config) -> tokio::time::Instant {
    let leeway = i64::try_from(config.jwt_leeway_ms / 1000).unwrap_or(0);
    let remaining = (exp + leeway - chrono::Utc::now().timestamp()).max(0);
    tokio::time::Instant::now() + std::time::Duration::from_secs(remaining.unsigned_abs())
}

/// Tokens already verified, so that a client repeating its token (a poll every few
/// seconds, reconnects) costs a map lookup instead of a signature check and two JSON
/// decodes. Only tokens that verified are kept, by their full text; a hit is still
/// checked against its expiry. Bounded: when full it starts over.
pub(crate) struct VerifiedTokens {
    map: std::sync::Mutex<std::collections::HashMap<String, Identity>>,
    leeway_secs: i64,
}

/// Verified tokens remembered at most (about 400 bytes each).
const VERIFIED_TOKENS: usize = 1024;

impl VerifiedTokens {
    /// An empty cache for tokens checked with `leeway_secs` of skew on `exp`.
    pub(crate) fn new(leeway_secs: u64) -> Self {
        Self {
            map: std::sync::Mutex::new(std::collections::HashMap::new()),
            leeway_secs: i64::try_from(leeway_secs.min(60)).unwrap_or(60),
        }
    }

    /// `token` verified with `keys`, from the cache when it was verified before and has
    /// not expired since.
    pub(crate) fn verify(&self, keys: &Keys, token: &str) -> Result<Identity, AuthError> {
        let lock = || self.map.lock().unwrap_or_else(|p| p.into_inner());
        // A token that expired since it was cached goes through the full check below,
        // which refuses it (and drops it from the cache).
        if let Some(identity) = lock().get(token)
            && identity.exp + self.leeway_secs >= chrono::Utc::now().timestamp()
        {
            return Ok(identity.clone());
        }
        let result = keys.verify(token);
        let mut map = lock();
        match &result {
            Ok(identity) => {
                if map.len() >= VERIFIED_TOKENS {
                    map.clear();
                }
                map.insert(token.to_owned(), identity.clone());
            }
            Err(_) => {
                map.remove(token);
            }
        }
        result
    }
}

/// Where the secret came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretSource {
    /// `JWT_SECRET` / `--jwt-secret`.
    Configured,
    /// Dev mode: read from the data directory, made by an earlier run.
    DevFile,
    /// Dev mode: generated now and saved in the data directory.
    DevGenerated,
}

/// Why no secret could be found.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Production mode without `JWT_SECRET`.
    #[error("JWT_SECRET is required outside dev mode (WEBWAKA_MODE=production)")]
    Missing,
    /// `JWT_SECRET` is shorter than [`MIN_SECRET_BYTES`].
    #[error("invalid JWT_SECRET: must be at least {MIN_SECRET_BYTES} bytes long (it has {0})")]
    TooShort(usize),
    /// The dev secret file could not be read or written.
    #[error("dev secret file {path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        error: std::io::Error,
    },
}

/// The HS256 secret: `JWT_SECRET` (at least [`MIN_SECRET_BYTES`]), or in dev mode one
/// kept in the data directory (generated on first use, so tokens stay valid across
/// restarts). The server and the `token` subcommand both get their secret here, so
/// neither signs with a secret the other would refuse.
pub fn resolve_secret(config: &Config) -> Result<(String, SecretSource), SecretError> {
    if let Some(secret) = &config.jwt_secret {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(SecretError::TooShort(secret.len()));
        }
        return Ok((secret.clone(), SecretSource::Configured));
    }
    if config.mode == Mode::Production {
        return Err(SecretError::Missing);
    }
    let path = config.dev_secret_path();
    let io = |error: std::io::Error| SecretError::Io {
        path: path.display().to_string(),
        error,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= MIN_SECRET_BYTES => {
            return Ok((text.trim().to_owned(), SecretSource::DevFile));
        }
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(io(error)),
    }
    std::fs::create_dir_all(&config.data_dir).map_err(io)?;
    let secret = generate_secret();
    write_private(&path, &secret).map_err(io)?;
    Ok((secret, SecretSource::DevGenerated))
}

/// 32 random bytes, hex.
fn generate_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

/// Writes `text` to `path`, readable by the owner only where the platform allows.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// The bearer token of a request: `Authorization: Bearer …`, else the `token` query
/// parameter.
pub fn bearer_token<'a>(
    authorization: Option<&'a str>,
    query_token: Option<&'a str>,
) -> Option<&'a str> {
    if let Some(value) = authorization {
        let value = value.trim();
        let token = match value.get(..6) {
            Some(scheme) if scheme.eq_ignore_ascii_case("bearer") => value[6..].trim(),
            _ => value,
        };
        if !token.is_empty() {
            return Some(token);
        }
    }
    query_token.map(str::trim).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn minted_tokens_verify() {
        let keys = Keys::new(SECRET, 30);
        let token = keys.mint("t1", "u1", &["admin".into()], 60);
        let id = keys.verify(&token).unwrap();
        assert_eq!(id.tenant_id, "t1");
        assert_eq!(id.user_id, "u1");
        assert!(id.has_role("admin"));
    }

    #[test]
    fn the_verified_cache_answers_like_the_keys() {
        let keys = Keys::new(SECRET, 0);
        let cache = VerifiedTokens::new(0);
        let token = keys.mint("t1", "u1", &[], 60);
        assert_eq!(cache.verify(&keys, &token), keys.verify(&token));
        assert_eq!(cache.verify(&keys, &token).unwrap().user_id, "u1");
        // A token that expired is refused even after a cached success.
        let expired = keys.sign(&serde_json::json!({
            "tenantId": "t", "userId": "u", "exp": chrono::Utc::now().timestamp() - 5,
        }));
        cache.map.lock().unwrap().insert(
            expired.clone(),
            Identity {
                tenant_id: "t".into(),
                user_id: "u".into(),
                roles: vec![],
                exp: chrono::Utc::now().timestamp() - 5,
                iat: None,
            },
        );
        assert_eq!(
            cache.verify(&keys, &expired).unwrap_err(),
            AuthError::Expired
        );
        assert!(!cache.map.lock().unwrap().contains_key(&expired));
        // Another secret's token never verifies, cached or not.
        let other = Keys::new(b"another-secret-of-32-bytes-long!", 0);
        let foreign = other.mint("t", "u", &[], 60);
        assert_eq!(
            cache.verify(&keys, &foreign).unwrap_err(),
            AuthError::Signature
        );
    }

    #[test]
    fn bad_tokens_are_refused_with_a_reason() {
        let keys = Keys::new(SECRET, 0);
        let other = Keys::new(b"another-secret-of-32-bytes-long!", 0);
        assert_eq!(
            keys.verify(&other.mint("t", "u", &[], 60)).unwrap_err(),
            AuthError::Signature
        );
        assert_eq!(
            keys.verify(&keys.mint("t", "u", &[], -120)).unwrap_err(),
            AuthError::Expired
        );
        // alg: none, unsigned.
        let header = hex_b64(r#"{"alg":"none","typ":"JWT"}"#);
        let body = hex_b64(r#"{"tenantId":"t","userId":"u","exp":9999999999}"#);
        let none = format!("{header}.{body}.");
        assert_eq!(keys.verify(&none).unwrap_err(), AuthError::Algorithm);
        let no_tenant = keys.sign(&serde_json::json!({"userId": "u", "exp": 9_999_999_999i64}));
        assert_eq!(
            keys.verify(&no_tenant).unwrap_err(),
            AuthError::MissingClaim("tenantId")
        );
        let sub_only =
            keys.sign(&serde_json::json!({"tenantId": "t", "sub": "s", "exp": 9_999_999_999i64}));
        assert_eq!(keys.verify(&sub_only).unwrap().user_id, "s");
        let no_exp = keys.sign(&serde_json::json!({"tenantId": "t", "userId": "u"}));
        assert!(keys.verify(&no_exp).is_err());
    }

    #[test]
    fn a_short_configured_secret_is_refused() {
        let mut config = Config::new("unused-dir");
        config.jwt_secret = Some("x".repeat(MIN_SECRET_BYTES - 1));
        let error = resolve_secret(&config).unwrap_err();
        assert!(matches!(error, SecretError::TooShort(15)), "{error}");
        assert!(error.to_string().contains("JWT_SECRET"), "{error}");
        config.jwt_secret = Some("x".repeat(MIN_SECRET_BYTES));
        let (secret, source) = resolve_secret(&config).unwrap();
        assert_eq!((secret.len(), source), (16, SecretSource::Configured));
    }

    fn hex_b64(text: &str) -> String {
        // base64url without padding, enough for the test.
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = text.as_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
            let chars = chunk.len() + 1;
            for i in 0..chars {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}
