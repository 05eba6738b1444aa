//! Sending a message (PROTOCOL.md §3 `message`, §4 `POST /api/messages`): the part the
//! WebSocket and HTTP share, after each has checked the shape and the class.
//!
//! Room messages need membership; the per-user budget is shared by both transports and
//! is only spent on a message that is otherwise acceptable. `CLASS_A` goes live only;
//! `CLASS_B`/`CLASS_C` are appended to the log (idempotent by `messageId`) before the
//! ack, then fanned out.

use std::time::Instant;

use webwaka_realtime::protocol::{InteractionClass, MessageAck, SendMessage, WebSocketMessage};

use crate::cluster::Node;
use crate::error::ApiError;
use crate::hub::{Audience, Delivery};
use crate::log::{Draft, Log};
use crate::ratelimit::Limits;

/// Who sends: the user of a tenant, over which transport, from which connection (the
/// sending connection gets an ack instead of the delivery).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin<'a> {
    pub(crate) tenant: &'a str,
    pub(crate) user: &'a str,
    pub(crate) connection: Option<u64>,
    /// `ws` or `http`, for the metrics.
    pub(crate) transport: &'static str,
}

/// Accepts `message` from `origin`. A live message reaches the audience's connections
/// on every instance (through `node`); a durable one is appended to the log, whose
/// feed does the same.
pub(crate) async fn send(
    log: &Log,
    node: &Node,
    limits: &Limits,
    origin: Origin<'_>,
    message: SendMessage,
) -> Result<MessageAck, ApiError> {
    let Origin {
        tenant,
        user: sender,
        connection: exclude,
        transport,
    } = origin;
    let started = Instant::now();
    let (hub, metrics) = (&log.hub, &log.metrics);
    if let Some(room) = &message.room_id
        && !hub.is_member(tenant, room, sender)
    {
        return Err(
            ApiError::forbidden(format!("not a member of room {room:?}: join it first"))
                .with_detail("roomId", room.as_str()),
        );
    }
    limits.messages.check(metrics, tenant, sender)?;
    let class = message.interaction_class;
    // A resent live message is acknowledged again and not delivered twice (durable
    // ones are deduplicated by the log).
    if class == InteractionClass::ClassA
        && let Some(id) = &message.message_id
        && hub.live_resend(tenant, sender, id)
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
    metrics.message_in(transport);
    log.watch.message_in(tenant);
    let message_id = delivered.message_id.clone();
    let ack = if class == InteractionClass::ClassA {
        // Live only: never stored, never replayed.
        let audience = Audience {
            everyone: false,
            room: delivered.room_id.clone(),
            users: match &delivered.recipient_id {
                Some(r) => vec![r.clone(), sender.to_owned()],
                None => vec![sender.to_owned()],
            },
        };
        let text = crate::frames::message_frame(&delivered);
        if log.watch.watching() {
            log.watch.live(tenant, hub, &audience, &text);
        }
        // The other instances' connections too (several instances on one database).
        if node.clustered() {
            node.live(tenant, &audience, &text);
        }
        hub.deliver(tenant, &audience, &Delivery::text(text, None), exclude);
        MessageAck {
            message_id,
            event_id: None,
            sequence: None,
        }
    } else {
        let draft = Draft::Message {
            message: delivered,
            exclude,
        };
        let appended = log.append(tenant, draft).await?;
        MessageAck {
            message_id,
            event_id: Some(appended.event_id),
            sequence: Some(appended.seq),
        }
    };
    metrics
        .message_latency
        .observe(started.elapsed().as_secs_f64());
    Ok(ack)
}
