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
use crate::error::{ApiError, JobError, StoreError};
use crate::hub::{Audience, Delivery};
use crate::log::{Draft, Log};
use crate::metrics::Metrics;
use crate::ratelimit::Limits;
use crate::store::PendingAppend;

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

/// A message [`submit`] accepted.
pub(crate) enum Accepted {
    /// Live: delivered and acknowledged.
    Acked(MessageAck),
    /// Durable: queued for the log, acknowledged once stored.
    Queued(Queued),
}

/// A durable message queued for the log; [`Queued::stored`] is its ack.
pub(crate) struct Queued {
    message_id: String,
    answer: PendingAppend,
    started: Instant,
}

impl Queued {
    /// The message's ack once the log has stored it (or why it did not). Cancel-safe:
    /// a dropped call loses nothing, and the next one waits on. Not to be called again
    /// once it returned.
    pub(crate) async fn stored(&mut self, metrics: &Metrics) -> Result<MessageAck, ApiError> {
        let appended = (&mut self.answer)
            .await
            .map_err(|_| JobError::Store(StoreError::WriterGone))??;
        metrics
            .message_latency
            .observe(self.started.elapsed().as_secs_f64());
        Ok(MessageAck {
            message_id: std::mem::take(&mut self.message_id),
            event_id: Some(appended.event_id),
            sequence: Some(appended.seq),
        })
    }
}

/// Accepts `message` from `origin` and returns its ack. A live message reaches the
/// audience's connections on every instance (through `node`); a durable one is
/// appended to the log, whose feed does the same.
pub(crate) async fn send(
    log: &Log,
    node: &Node,
    limits: &Limits,
    origin: Origin<'_>,
    message: SendMessage,
) -> Result<MessageAck, ApiError> {
    match submit(log, node, limits, origin, message).await? {
        Accepted::Acked(ack) => Ok(ack),
        Accepted::Queued(mut queued) => queued.stored(&log.metrics).await,
    }
}

/// [`send`] up to the point where a durable message is queued for the log: a
/// connection queues the next message before the last is stored (the log keeps them,
/// and answers them, in the order queued), so one commit carries several of its
/// messages instead of one each.
pub(crate) async fn submit(
    log: &Log,
    node: &Node,
    limits: &Limits,
    origin: Origin<'_>,
    message: SendMessage,
) -> Result<Accepted, ApiError> {
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
        return Ok(Accepted::Acked(MessageAck {
            message_id: id.clone(),
            event_id: None,
            sequence: None,
        }));
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
    if class == InteractionClass::ClassA {
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
        metrics
            .message_latency
            .observe(started.elapsed().as_secs_f64());
        return Ok(Accepted::Acked(MessageAck {
            message_id,
            event_id: None,
            sequence: None,
        }));
    }
    let draft = Draft::Message {
        message: delivered,
        exclude,
    };
    let answer = log.queue_append(tenant, draft).await?;
    Ok(Accepted::Queued(Queued {
        message_id,
        answer,
        started,
    }))
}
