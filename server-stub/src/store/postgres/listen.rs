//! What an instance hears from the others: one dedicated connection `LISTEN`ing on the
//! log's channel and the cluster channel, and a periodic look at every tenant's head.
//!
//! - A log notice with its rows is handed to the feed as it is; one without (too large)
//!   tells the feed how far the tenant's log reached, and the feed reads the rest back.
//!   Notices are delivered in commit order, this instance's own included: when its own
//!   notice arrives and an earlier sequence is still missing, that one's notice is lost
//!   and the feed reads it back at once.
//! - A membership notice updates the hub (other instances' joins and leaves).
//! - On every (re)connection, after `LISTEN` and before anything else: the memberships
//!   are read again and every tenant's head is compared with what was delivered, so
//!   whatever happened while disconnected is caught up. The first connection sets the
//!   feed's baseline instead: what was committed before this instance started is not
//!   delivered live.
//! - [`catch_up`] compares every tenant's head with what was delivered every
//!   `CLUSTER_CATCH_UP_MS`, and reads back what the feed is missing: a lost notification
//!   delays an event by at most that, and never loses it.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::append::{LOG_CHANNEL, LogNotice};
use super::{events_after, heads, memberships, pg_error, pool_error};
use crate::cluster::{ClusterNotice, Node};
use crate::error::StoreError;
use crate::feed::{Feed, ReadBack};
use crate::store::Membership;
use crate::tail::TailEvent;

/// The channel of everything between instances that is not the log.
pub(crate) const CLUSTER_CHANNEL: &str = "webwaka_cluster";
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long a gap may be in flight (an own commit handed to the feed a moment after
/// its notice arrived) before it is read back.
const GAP_GRACE: Duration = Duration::from_millis(20);

/// The notice of a membership change.
pub(crate) fn membership_notice(instance: &str, m: &Membership, joined: bool) -> String {
    serde_json::to_string(&ClusterNotice::Member {
        i: instance.to_owned(),
        t: m.tenant.clone(),
        u: m.user.clone(),
        r: m.room.clone(),
        joined,
    })
    .unwrap_or_default()
}

/// The listener's parts.
pub(super) struct Listener {
    pub(super) config: tokio_postgres::Config,
    pub(super) feed: Arc<Feed>,
    pub(super) node: Arc<Node>,
    pub(super) instance: Arc<str>,
    pub(super) stop: CancellationToken,
    /// Told once the first connection listens (or could not).
    pub(super) ready: Option<oneshot::Sender<Result<(), StoreError>>>,
}

/// Listens until stopped, reconnecting with backoff.
pub(super) async fn run(mut listener: Listener) {
    let mut backoff = Duration::from_millis(50);
    let mut first = true;
    loop {
        let result = listen_once(&mut listener, first).await;
        if listener.stop.is_cancelled() {
            return;
        }
        match result {
            Ok(()) => {}
            Err(error) => {
                if let Some(ready) = listener.ready.take() {
                    let _ = ready.send(Err(error));
                    return;
                }
                tracing::warn!(%error, "listening to the other instances failed; reconnecting");
            }
        }
        if !first {
            listener.feed.metrics().cluster_reconnects.inc();
        }
        first = false;
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = listener.stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection: `LISTEN`, catch up (or set the baseline), then notices until the
/// connection ends or the store stops.
async fn listen_once(listener: &mut Listener, first: bool) -> Result<(), StoreError> {
    let (client, mut connection) = listener.config.connect(NoTls).await.map_err(pg_error)?;
    let (notices, mut inbox) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if notices.send(n).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "the listening connection failed");
                    return;
                }
            }
        }
    });
    let result = async {
        client
            .batch_execute(&format!("LISTEN {LOG_CHANNEL}; LISTEN {CLUSTER_CHANNEL}"))
            .await
            .map_err(pg_error)?;
        let feed = &listener.feed;
        feed.sync_memberships(memberships(&client).await?);
        let heads = heads(&client).await?;
        if first {
            feed.set_baseline(heads);
        } else {
            for (tenant, head) in heads {
                feed.reached(&tenant, head);
            }
        }
        listener.node.joined();
        if let Some(ready) = listener.ready.take() {
            let _ = ready.send(Ok(()));
        }
        loop {
            tokio::select! {
                () = listener.stop.cancelled() => return Ok(()),
                notice = inbox.recv() => match notice {
                    Some(n) => handle(feed, &listener.node, &listener.instance, n.channel(), n.payload()),
                    None => return Err(StoreError::Unavailable("the listening connection closed".into())),
                },
            }
        }
    }
    .await;
    drop(client);
    driver.abort();
    result
}

/// One notice.
fn handle(feed: &Feed, node: &Node, instance: &str, channel: &str, payload: &str) {
    feed.metrics().cluster_notices.inc();
    if channel == LOG_CHANNEL {
        let notice: LogNotice = match serde_json::from_str(payload) {
            Ok(notice) => notice,
            Err(error) => {
                tracing::warn!(%error, "an unreadable log notice");
                return;
            }
        };
        if notice.i != instance && !notice.e.is_empty() {
            let rows = notice.e.into_iter().map(|r| r.event()).collect();
            feed.remote(&notice.t, rows);
        }
        feed.reached(&notice.t, notice.h);
    } else if channel == CLUSTER_CHANNEL {
        match serde_json::from_str::<ClusterNotice>(payload) {
            Ok(ClusterNotice::Member { i, t, u, r, joined }) => {
                if i != instance {
                    let m = Membership {
                        tenant: t,
                        user: u,
                        room: r,
                    };
                    feed.membership(&m, joined);
                    node.receive(ClusterNotice::Alive { i });
                }
            }
            Ok(other) => node.receive(other),
            Err(error) => tracing::warn!(%error, "an unreadable cluster notice"),
        }
    }
}

/// Every `every`, compares each tenant's head with what the feed delivered; whenever
/// the feed is behind (a notice said so, or this look did), reads the gap back.
pub(super) async fn catch_up(
    pool: Pool,
    feed: Arc<Feed>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {
                match look(&pool).await {
                    Ok(heads) => {
                        for (tenant, head) in heads {
                            feed.reached(&tenant, head);
                        }
                    }
                    Err(error) => tracing::debug!(%error, "reading the tenants' heads failed"),
                }
            }
            () = feed.wait_behind() => {
                // A gap often closes by itself a moment later (this instance's own
                // commit reaches the feed just after its notice): give it that moment.
                tokio::time::sleep(GAP_GRACE).await;
            }
        }
        let still = feed.catch_up(&PoolReader(pool.clone())).await;
        if !still.is_empty() {
            // Storage is failing: wait a little before the next round.
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
}

/// The log read back through the pool.
struct PoolReader(Pool);

#[async_trait::async_trait]
impl ReadBack for PoolReader {
    async fn events_after(
        &self,
        tenant: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<TailEvent>, StoreError> {
        events_after(&self.0, tenant, after, limit).await
    }
}

/// Sends the cluster notices this instance makes (presence, live messages, chaos),
/// one `NOTIFY` each, in order. A notice that cannot be sent (the database is down) is
/// dropped: each instance sends its whole presence again when its listener reconnects.
pub(super) async fn send(
    pool: Pool,
    mut outbox: mpsc::UnboundedReceiver<String>,
    stop: CancellationToken,
) {
    loop {
        let notice = tokio::select! {
            () = stop.cancelled() => return,
            notice = outbox.recv() => match notice {
                Some(notice) => notice,
                None => return,
            },
        };
        let sent = async {
            let client = pool.get().await.map_err(pool_error)?;
            let stmt = client
                .prepare_cached("SELECT pg_notify($1, $2)")
                .await
                .map_err(pg_error)?;
            client
                .execute(&stmt, &[&CLUSTER_CHANNEL, &notice])
                .await
                .map_err(pg_error)
        };
        if let Err(error) = sent.await {
            tracing::debug!(%error, "a cluster notice was not sent");
        }
    }
}

/// Every tenant's head.
async fn look(pool: &Pool) -> Result<Vec<(String, u64)>, StoreError> {
    let client = pool.get().await.map_err(pool_error)?;
    heads(&client).await
}
