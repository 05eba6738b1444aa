//! `POST /api/transactions` (Class D, `Idempotency-Key` required) and
//! `GET /api/transactions/{id}`. The logic is in [`crate::transactions`].

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use webwaka_realtime::protocol::{
    IDEMPOTENCY_KEY_HEADER, TransactionAccepted, TransactionRequest, TransactionStatus,
};

use crate::app::App;
use crate::auth::{ROLE_ADMIN, ROLE_SUPER_ADMIN};
use crate::error::{ApiError, check_id};
use crate::http::extract::{Caller, JsonBody, header_str};
use crate::transactions::{self, Submission, Submitted};

/// Longest idempotency key accepted.
const MAX_KEY_LEN: usize = 255;

/// `POST /api/transactions`: `202` and `PENDING`; decided later.
pub(crate) async fn submit(
    State(app): State<Arc<App>>,
    caller: Caller,
    headers: HeaderMap,
    body: JsonBody<TransactionRequest>,
) -> Result<(StatusCode, Json<TransactionAccepted>), ApiError> {
    caller
        .check_named(
            &app,
            body.tenant_field.as_deref(),
            "body.tenantId",
            "transaction",
        )
        .await?;
    let key = header_str(&headers, IDEMPOTENCY_KEY_HEADER)
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::invalid(IDEMPOTENCY_KEY_HEADER, "the header is required"))?;
    if key.len() > MAX_KEY_LEN {
        return Err(ApiError::invalid(
            IDEMPOTENCY_KEY_HEADER,
            format!("at most {MAX_KEY_LEN} characters"),
        ));
    }
    let request = body.value;
    if request.transaction_type.trim().is_empty() {
        return Err(ApiError::invalid("transactionType", "must not be empty"));
    }
    check_id("transactionType", Some(&request.transaction_type))?;
    let submission = Submission {
        tenant: caller.tenant.clone(),
        user: caller.user().to_owned(),
        key: key.to_owned(),
        hash: transactions::body_hash(&body.raw),
        request: body.raw,
        transaction_type: request.transaction_type,
        payload: request.payload,
        metadata: request.metadata,
    };
    // Stored and handed to the processor on a task of its own: a client that goes
    // away mid-request does not stop a stored transaction from being decided.
    let submitted = app.transactions.submit(submission).await?;
    let accepted = match submitted {
        Submitted::New(accepted, _) => accepted,
        Submitted::Replay(accepted) => accepted,
        Submitted::Conflict => return Err(transactions::conflict(key)),
    };
    // Chaos: accepted (and decided later), but the client never hears of it.
    if crate::chaos::drops_ack(app.chaos.as_ref()) {
        return Err(crate::chaos::ack_dropped());
    }
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

/// `GET /api/transactions/{id}`: readable by its submitter and the tenant's admins.
pub(crate) async fn status(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(transaction_id): Path<String>,
) -> Result<Json<TransactionStatus>, ApiError> {
    check_id("transactionId", Some(&transaction_id))?;
    let is_admin = caller
        .identity
        .has_any_role(&[ROLE_ADMIN, ROLE_SUPER_ADMIN]);
    let status = app
        .transactions
        .status(&caller.tenant, caller.user(), is_admin, &transaction_id)
        .await?;
    Ok(Json(status))
}
