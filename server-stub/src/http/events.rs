//! `GET /api/events/poll`, `POST /api/events` (publish) and `POST /api/messages`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use webwaka_realtime::protocol::event::{DEFAULT_POLL_LIMIT, MAX_POLL_LIMIT, MESSAGE_EVENT_TYPE};
use webwaka_realtime::protocol::{
    EventMetadata, InteractionClass, MessageAccepted, PublishEvent, Published, SendMessage,
    decode_value,
};

use crate::app::App;
use crate::auth::{ROLE_ADMIN, ROLE_SERVICE};
use crate::error::ApiError;
use crate::http::extract::{Caller, JsonBody, QueryMap};
use crate::log::{self, Draft, NewEvent};

/// `GET /api/events/poll?lastEventId=&limit=`: the durable events after the cursor
/// that the caller may see, as a `PollResponse`.
///
/// The cursor and the page come from the log's recent tail in memory when the cursor
/// is in it, from storage otherwise (`Log::page`), and the answer is written around
/// the stored event JSON as it is (each row holds the `Event` exactly as this server
/// serialised it), without decoding and re-encoding every event.
pub(crate) async fn poll(
    State(app): State<Arc<App>>,
    caller: Caller,
    query: QueryMap,
) -> Result<Response, ApiError> {
    let limit = query.int(
        "limit",
        1,
        u64::from(MAX_POLL_LIMIT),
        u64::from(DEFAULT_POLL_LIMIT),
    )? as u32;
    let cursor = query
        .get("lastEventId")
        .map(str::trim)
        .filter(|c| !c.is_empty());
    // A super admin acting in another tenant (justified, audited) reads all of it.
    let viewer = if caller.justification.is_some() {
        log::Viewer::Everything
    } else {
        log::Viewer::User(caller.user())
    };
    let rows = app
        .log
        .page(&caller.tenant, viewer, cursor, limit + 1)
        .await?;
    // Checked once the request is known to be good: a refused one spends no budget.
    app.limits
        .poll
        .check(&app.metrics, &caller.tenant, caller.user())?;
    app.metrics.polls.inc();
    app.watch.polled(&caller.tenant, caller.user());
    let has_more = rows.len() > limit as usize;
    let page = &rows[..rows.len().min(limit as usize)];
    app.metrics.delivered("poll", page.len() as u64);
    let next_event_id = page.last().map(|e| &*e.event_id).or(cursor);
    Ok(poll_json(page, has_more, next_event_id))
}

/// The `PollResponse` JSON around stored event bodies.
fn poll_json(page: &[log::Stored], has_more: bool, next_event_id: Option<&str>) -> Response {
    let size = page.iter().map(|e| e.body.len() + 1).sum::<usize>() + 96;
    let mut out = String::with_capacity(size);
    out.push_str("{\"events\":[");
    for (i, event) in page.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&event.body);
    }
    out.push_str("],\"hasMore\":");
    out.push_str(if has_more { "true" } else { "false" });
    out.push_str(",\"nextEventId\":");
    // A string (or null) always serialises.
    out.push_str(&serde_json::to_string(&next_event_id).unwrap_or_else(|_| "null".into()));
    out.push('}');
    ([(header::CONTENT_TYPE, "application/json")], out).into_response()
}

/// `POST /api/events` (roles `service`, `admin`): appends an event to the tenant's log.
pub(crate) async fn publish(
    State(app): State<Arc<App>>,
    caller: Caller,
    body: JsonBody<PublishEvent>,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    let publish = body.value;
    caller
        .check_named(&app, body.tenant_field.as_deref(), "body.tenantId", "event")
        .await?;
    caller.require_role(&[ROLE_SERVICE, ROLE_ADMIN])?;
    // Shape and id lengths (core's checks).
    publish.validate()?;
    if publish.event_type == MESSAGE_EVENT_TYPE {
        return Err(ApiError::invalid(
            "eventType",
            "\"message\" is reserved for messages: use POST /api/messages",
        ));
    }
    if let Some(id) = &publish.event_id
        && id.trim().is_empty()
    {
        return Err(ApiError::invalid(
            "eventId",
            "must not be empty when present",
        ));
    }
    for (field, value) in [
        ("recipientId", &publish.recipient_id),
        ("roomId", &publish.room_id),
    ] {
        if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
            return Err(ApiError::invalid(field, "must not be empty when present"));
        }
    }
    let mut metadata = publish.metadata.unwrap_or_default();
    metadata
        .entry("source")
        .or_insert_with(|| Value::String(caller.user().to_owned()));
    let metadata: EventMetadata = decode_value(Value::Object(metadata)).map_err(|e| {
        let path = if e.path == "input" {
            "metadata".to_owned()
        } else {
            format!("metadata.{}", e.path)
        };
        ApiError::invalid(path, e.message)
    })?;
    app.limits
        .publish
        .check(&app.metrics, &caller.tenant, caller.user())?;
    let new = NewEvent {
        event_id: publish.event_id,
        event_type: publish.event_type,
        payload: publish.payload,
        metadata,
        schema_version: publish.schema_version,
        recipient_id: publish.recipient_id,
        room_id: publish.room_id,
        sender_id: Some(caller.user().to_owned()),
    };
    let appended = app.log.append(&caller.tenant, Draft::Event(new)).await?;
    if crate::chaos::drops_ack(app.chaos.as_ref()) {
        return Err(crate::chaos::ack_dropped());
    }
    Ok((
        StatusCode::CREATED,
        Json(Published {
            event_id: appended.event_id,
            sequence: appended.seq,
        }),
    ))
}

/// `POST /api/messages`: the HTTP twin of the WebSocket `message` (always durable).
pub(crate) async fn send_message(
    State(app): State<Arc<App>>,
    caller: Caller,
    body: JsonBody<SendMessage>,
) -> Result<(StatusCode, Json<MessageAccepted>), ApiError> {
    caller
        .check_named(
            &app,
            body.tenant_field.as_deref(),
            "body.tenantId",
            "message",
        )
        .await?;
    let message = body.value;
    // Shape, target and id lengths (core's checks).
    message.validate()?;
    match message.interaction_class {
        InteractionClass::ClassA => {
            return Err(ApiError::invalid(
                "interactionClass",
                "CLASS_A is live only: send it over the WebSocket or not at all",
            ));
        }
        InteractionClass::ClassD => {
            return Err(ApiError::invalid(
                "interactionClass",
                "CLASS_D goes through POST /api/transactions",
            ));
        }
        InteractionClass::ClassB | InteractionClass::ClassC => {}
    }
    let origin = crate::messaging::Origin {
        tenant: &caller.tenant,
        user: caller.user(),
        connection: None,
        transport: "http",
    };
    let ack = crate::messaging::send(&app.log, &app.node, &app.limits, origin, message).await?;
    // Chaos: stored and delivered, but the 201 is lost; the resend is deduplicated.
    if crate::chaos::drops_ack(app.chaos.as_ref()) {
        return Err(crate::chaos::ack_dropped());
    }
    let (Some(event_id), Some(sequence)) = (ack.event_id, ack.sequence) else {
        return Err(ApiError::internal());
    };
    Ok((
        StatusCode::CREATED,
        Json(MessageAccepted {
            message_id: ack.message_id,
            event_id,
            sequence,
        }),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use webwaka_realtime::protocol::{Event, PollResponse};

    /// The spliced answer is a `PollResponse` holding the stored events.
    #[test]
    fn poll_json_is_a_poll_response() {
        let event = |id: &str, seq: u64| Event {
            event_id: id.into(),
            event_type: "order.placed".into(),
            tenant_id: "t".into(),
            timestamp: chrono::Utc::now(),
            payload: serde_json::json!({"n": seq, "s": "a \"quoted\" text"}),
            metadata: EventMetadata::from_source("svc"),
            schema_version: "1.0".into(),
            sequence: Some(seq),
        };
        let events = [event("e1", 1), event("e2", 2)];
        let page: Vec<log::Stored> = events
            .iter()
            .map(|e| log::Stored {
                seq: e.sequence.unwrap(),
                event_id: e.event_id.as_str().into(),
                body: std::sync::Arc::new(serde_json::to_string(e).unwrap()),
            })
            .collect();
        for (page, has_more, next) in [
            (&page[..], true, Some("e2")),
            (&page[..0], false, Some("c\"1")),
            (&page[..0], false, None),
        ] {
            let response = poll_json(page, has_more, next);
            let bytes = futures_util::FutureExt::now_or_never(axum::body::to_bytes(
                response.into_body(),
                usize::MAX,
            ))
            .unwrap()
            .unwrap();
            let decoded: PollResponse = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(decoded.events, events[..page.len()].to_vec());
            assert_eq!(decoded.has_more, has_more);
            assert_eq!(decoded.next_event_id.as_deref(), next);
        }
    }
}
