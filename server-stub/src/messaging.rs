//! Sending a message (PROTOCOL.md §3 `message`, §4 `POST /api/messages`): the part the
//! WebSocket and HTTP share, after each has checked the shape and the class.
//!
//! Room messages need membership; the per-user budget is shared by both transports and
//! is only spent on a message that is otherwise acceptable. `CLASS_A` goes live only;
//! `CLASS_B`/`CLASS_C` are appended to the log (idempotent by `messageId`) before the
//! ack, then fanned out.

use std::sync::Arc;
use std::time::Instant;

use webwaka_realtime::protocol::{InteractionClass, MessageAck, SendMessage, WebSocketMessage};

use crate::app::App;
use crate::error::ApiError;
use crate::hub::{Audience, Delivery};
use crate::log::{self, Fanout};

/// Accepts `message` from `sender` of `tenant`; `exclude` is the sending connection.
pub(crate) async fn send(
    app: &Arc<App>,
    tenant: &str,
    sender: &str,
    message: SendMessage,
    exclude: Option<u64>,
    transport: &'static str,
) -> Result<MessageAck, ApiError> {
    let started = Instant::now();
    if let Some(room) = &message.room_id
        && !app.hub.is_member(tenant, room, sender)
    {
        return Err(
            ApiError::forbidden(format!("not a member of room {room:?}: join it first"))
                .with_detail("roomId", room.as_str()),
        );
    }
    app.limits.messages.check(&app.metrics, tenant, sender)?;
    let class = message.interaction_class;
    // A resent live message is acknowledged again and not delivered twice (durable
    // ones are deduplicated by the log).
    if class == InteractionClass::ClassA
        && let Some(id) = &message.message_id
        && app.hub.live_resend(tenant, sender, id)
    {
        return Ok(MessageAck {
            message_id: id.clone(),
            event_id: None,
            sequence: None,
        });
    }
    let delivered = WebSocketMessage {
        message_id: message
            .message_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        message_type: message.message_type,
        interaction_class: class,
        tenant_id: tenant.to_owned(),
        sender_id: sender.to_owned(),
        recipient_id: message.recipient_id,
        room_id: message.room_id,
        payload: message.payload,
        timestamp: chrono::Utc::now(),
        metadata: message.metadata,
        event_id: None,
        sequence: None,
    };
    app.metrics.message_in(transport);
    let ack = if class == InteractionClass::ClassA {
        // Live only: never stored, never replayed.
        let message_id = delivered.message_id.clone();
        let audience = Audience {
            everyone: false,
            room: delivered.room_id.clone(),
            users: match &delivered.recipient_id {
                Some(r) => vec![r.clone(), sender.to_owned()],
                None => vec![sender.to_owned()],
            },
        };
        let frame = Delivery::text(crate::frames::message_frame(&delivered), None);
        app.hub.deliver(tenant, &audience, &frame, exclude);
        MessageAck {
            message_id,
            event_id: None,
            sequence: None,
        }
    } else {
        let fanout = Fanout {
            hub: Arc::clone(&app.hub),
            tail: Arc::clone(&app.tail),
            metrics: Arc::clone(&app.metrics),
            exclude,
        };
        let message_id = delivered.message_id.clone();
        let appended = app
            .db
            .write_one(move |w| log::append_message(w, fanout, delivered))
            .await?;
        MessageAck {
            message_id,
            event_id: Some(appended.event_id),
            sequence: Some(appended.seq),
        }
    };
    app.metrics
        .message_latency
        .observe(started.elapsed().as_secs_f64());
    Ok(ack)
}
