//! Request extractors: [`Caller`] (the verified token and the tenant the request acts
//! in), [`JsonBody`] (a body decoded with core's `decode`, errors naming the field) and
//! [`QueryMap`] (query parameters, read by name).
//!
//! Tenancy (PROTOCOL.md §1, §6 "Super admin"): the tenant comes from the token. A
//! request naming another tenant (`X-Tenant-ID`, the `tenantId` query parameter, or a
//! `tenantId` field) is a `TENANT_VIOLATION` and an audit record; a `super_admin` may act
//! in another tenant with a non-blank `X-Admin-Justification` (audited, granted or not).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;
use serde_json::Value;
use webwaka_realtime::protocol::{
    ADMIN_JUSTIFICATION_HEADER, AuditResult, DecodeError, ErrorCode, TENANT_HEADER, decode_value,
};

use crate::app::App;
use crate::audit::AuditRecord;
use crate::auth::{Identity, ROLE_SUPER_ADMIN, bearer_token};
use crate::error::ApiError;

/// Who is calling and in which tenant the request acts.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// The verified token.
    pub(crate) identity: Identity,
    /// The tenant the request acts in (the token's, or the one a super admin named).
    pub(crate) tenant: String,
    /// The super admin's justification when acting in another tenant.
    pub(crate) justification: Option<String>,
}

impl Caller {
    /// The calling user.
    pub(crate) fn user(&self) -> &str {
        &self.identity.user_id
    }

    /// Refuses with `AUTHZ_FAILED` unless the caller holds one of `roles`.
    pub(crate) fn require_role(&self, roles: &[&str]) -> Result<(), ApiError> {
        if self.identity.has_any_role(roles) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this needs one of the roles {}",
                roles.join(", ")
            )))
        }
    }

    /// Checks a `tenantId` the request named somewhere (`via`, e.g. `body.tenantId`).
    pub(crate) async fn check_named(
        &self,
        app: &App,
        named: Option<&str>,
        via: &str,
        resource: &str,
    ) -> Result<(), ApiError> {
        match named {
            Some(named) if named != self.tenant => Err(app
                .tenant_violation(&self.identity.tenant_id, self.user(), named, via, resource)
                .await),
            _ => Ok(()),
        }
    }
}

/// Verifies the request's token; a failure is audited and answered `AUTH_FAILED`.
pub(crate) async fn authenticate(
    app: &App,
    authorization: Option<&str>,
    query_token: Option<&str>,
    path: &str,
) -> Result<Identity, ApiError> {
    let result = match bearer_token(authorization, query_token) {
        None => Err(crate::auth::AuthError::Missing),
        Some(token) => app.verified.verify(&app.keys, token),
    };
    // The chaos layer may have expired the tokens issued until some moment.
    let result = result.and_then(|identity| match &app.chaos {
        Some(chaos) if chaos.token_expired(identity.iat) => Err(crate::auth::AuthError::Expired),
        _ => Ok(identity),
    });
    match result {
        Ok(identity) => Ok(identity),
        Err(reason) => {
            app.metrics.auth_failures.inc();
            tracing::info!(%reason, path, "authentication failed");
            let record = AuditRecord::new(
                "unknown",
                "anonymous",
                "auth.failed",
                "token",
                AuditResult::Failure,
            )
            .meta("reason", reason.to_string())
            .meta("path", path);
            app.audit_auth_failure(record).await?;
            Err(ApiError::auth(reason.to_string()))
        }
    }
}

/// Decides the tenant a request acts in, from the token and the tenant it names.
pub(crate) async fn resolve_tenant(
    app: &App,
    identity: Identity,
    named: Option<&str>,
    via: &str,
    justification: Option<&str>,
    resource: &str,
) -> Result<Caller, ApiError> {
    let named = named.map(str::trim).filter(|n| !n.is_empty());
    let Some(named) = named.filter(|n| *n != identity.tenant_id) else {
        return Ok(Caller {
            tenant: identity.tenant_id.clone(),
            identity,
            justification: None,
        });
    };
    if !identity.has_role(ROLE_SUPER_ADMIN) {
        return Err(app
            .tenant_violation(&identity.tenant_id, &identity.user_id, named, via, resource)
            .await);
    }
    // A super admin acts in the tenant named: it must be a tenant id one could act in
    // (and an audit record can carry), refused by name otherwise.
    crate::error::check_id(via, Some(named))?;
    let justification = justification.map(str::trim).filter(|j| !j.is_empty());
    let record = AuditRecord::new(
        &identity.tenant_id,
        &identity.user_id,
        "admin.cross_tenant_access",
        resource,
        if justification.is_some() {
            AuditResult::Success
        } else {
            AuditResult::Failure
        },
    )
    .super_admin(justification)
    .target(named);
    app.audit(record).await?;
    match justification {
        None => Err(ApiError::forbidden(format!(
            "acting in another tenant needs a non-blank {ADMIN_JUSTIFICATION_HEADER} header"
        ))),
        Some(justification) => {
            tracing::info!(
                admin = %identity.user_id,
                target = named,
                justification,
                "super admin acts in another tenant"
            );
            Ok(Caller {
                tenant: named.to_owned(),
                identity,
                justification: Some(justification.to_owned()),
            })
        }
    }
}

/// A header's value as text, if present and readable.
pub(crate) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        let query = QueryMap::from_parts(parts)?;
        let path = parts.uri.path().to_owned();
        let identity = authenticate(
            app,
            header_str(&parts.headers, header::AUTHORIZATION.as_str()),
            query.get("token"),
            &path,
        )
        .await?;
        let (named, via) = match (
            header_str(&parts.headers, TENANT_HEADER),
            query.get("tenantId"),
        ) {
            (Some(h), _) => (Some(h), TENANT_HEADER),
            (None, Some(q)) => (Some(q), "query.tenantId"),
            (None, None) => (None, TENANT_HEADER),
        };
        resolve_tenant(
            app,
            identity,
            named,
            via,
            header_str(&parts.headers, ADMIN_JUSTIFICATION_HEADER),
            &path,
        )
        .await
    }
}

/// The query parameters, by name.
#[derive(Debug, Default, Clone)]
pub(crate) struct QueryMap(HashMap<String, String>);

impl QueryMap {
    fn from_parts(parts: &Parts) -> Result<Self, ApiError> {
        Self::from_uri(&parts.uri)
    }

    /// The query parameters of `uri`.
    pub(crate) fn from_uri(uri: &axum::http::Uri) -> Result<Self, ApiError> {
        if uri.query().is_none() {
            return Ok(Self::default());
        }
        let Query(map) = Query::<HashMap<String, String>>::try_from_uri(uri)
            .map_err(|e| ApiError::invalid("query", e.body_text()))?;
        for (name, value) in &map {
            webwaka_realtime::protocol::check_printable(name, value)?;
        }
        Ok(Self(map))
    }

    /// The parameter `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// The parameter `name` as an integer in `min..=max`, else `default`.
    pub(crate) fn int(
        &self,
        name: &str,
        min: u64,
        max: u64,
        default: u64,
    ) -> Result<u64, ApiError> {
        match self.get(name) {
            None | Some("") => Ok(default),
            Some(text) => match text.parse::<u64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(ApiError::invalid(
                    name,
                    format!("must be an integer from {min} to {max}, got {text:?}"),
                )),
            },
        }
    }
}

impl FromRequestParts<Arc<App>> for QueryMap {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &Arc<App>) -> Result<Self, ApiError> {
        Self::from_parts(parts)
    }
}

/// A JSON body decoded into `T`, plus the top-level `tenantId` it named (if any).
pub(crate) struct JsonBody<T> {
    pub(crate) value: T,
    /// The raw JSON, for checks beyond `T` (e.g. an idempotency hash).
    pub(crate) raw: Value,
    /// A top-level `tenantId` string, when the body has one.
    pub(crate) tenant_field: Option<String>,
}

impl<T: DeserializeOwned> FromRequest<Arc<App>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &Arc<App>) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, app).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("the body is over {} bytes", app.config.http_max_body_bytes),
                )
            } else {
                ApiError::invalid("input", rejection.body_text())
            }
        })?;
        let raw: Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::from(DecodeError::new("input", format!("malformed JSON: {e}")))
        })?;
        let tenant_field = match raw.get("tenantId") {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) => Some(t.clone()),
            Some(_) => return Err(ApiError::invalid("tenantId", "must be a string")),
        };
        // Core's decoder names a missing field in the path (`operations[0].entityId`).
        let value = decode_value::<T>(raw.clone())?;
        Ok(Self {
            value,
            raw,
            tenant_field,
        })
    }
}
