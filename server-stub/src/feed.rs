//! The feed: committed events reach the log's recent tail and the live connections of
//! this instance once each, in each tenant's sequence order.
//!
//! Events arrive from two directions. This instance's own appends are handed over by
//! its storage engine right after their commit ([`Feed::committed`]), with the frame
//! already written. With several instances on one database (PostgreSQL), the other
//! instances' appends arrive as notifications or are read back from the log
//! ([`Feed::remote`]). Either way the feed keeps, per tenant, the last sequence it
//! delivered: the next one in order goes out at once; one that arrives early (a later
//! sequence of this instance committed while another instance's earlier one is still
//! on its way) waits in `pending` until the gap closes. When the engine learns that a
//! tenant's log reached a sequence the feed has not delivered ([`Feed::reached`]), the
//! gap is read back from storage by [`Feed::catch_up`], so a lost or oversized
//! notification delays an event and never loses it.
//!
//! With one writer (SQLite) events always arrive in order and nothing waits.
//!
//! Room memberships go through here too, so that the hub learns of them in the same
//! order as of the events.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::hub::{Delivery, Hub};
use crate::log::{audience_of, delivery_of};
use crate::metrics::Metrics;
use crate::store::Membership;
use crate::tail::{Tail, TailEvent};

/// Events read back per catch-up query.
const CATCH_UP_PAGE: u32 = 512;
/// Catch-up queries per tenant in one round (a tenant far behind yields to others).
const CATCH_UP_PAGES: usize = 64;

/// Where the feed reads back what it missed.
#[async_trait::async_trait]
pub(crate) trait ReadBack: Send + Sync {
    /// Up to `limit` events of `tenant` after `after`, in order.
    async fn events_after(
        &self,
        tenant: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<TailEvent>, crate::error::StoreError>;
}

/// One committed event, ready to deliver.
#[derive(Debug, Clone)]
pub(crate) struct Committed {
    /// The row, as the tail keeps it.
    pub(crate) event: TailEvent,
    /// The frame that delivers it.
    pub(crate) delivery: Arc<Delivery>,
    /// The connection that sent it (it gets an ack instead).
    pub(crate) exclude: Option<u64>,
}

impl Committed {
    /// A stored row read back (another instance's event): its frame rebuilt from the
    /// stored JSON.
    pub(crate) fn from_row(event: TailEvent) -> Self {
        Self {
            delivery: delivery_of(&event),
            event,
            exclude: None,
        }
    }
}

#[derive(Debug, Default)]
struct TenantFeed {
    /// Every event up to here was delivered.
    delivered: u64,
    /// Events after a gap, waiting for it to close.
    pending: BTreeMap<u64, Committed>,
    /// This instance's appends whose commit is under way: if their rows are read back
    /// before the appender hands them over, these versions are delivered instead (they
    /// know the sending connection, which gets an ack and not the delivery). Matched by
    /// event id, so an entry of an attempt that was rolled back is never used.
    expected: BTreeMap<u64, Committed>,
}

/// The ordered hand-over from storage to the tail and the hub.
pub(crate) struct Feed {
    hub: Arc<Hub>,
    tail: Arc<Tail>,
    metrics: Arc<Metrics>,
    /// True with a single writer (SQLite): a tenant first seen starts at its first
    /// event. False with several instances: a tenant not in the baseline had no event
    /// when it was taken.
    single_writer: bool,
    tenants: Mutex<HashMap<String, TenantFeed>>,
    /// Tenants whose log is known to reach further than was delivered.
    behind: Mutex<HashMap<String, u64>>,
    wake: Notify,
    /// The dashboards (each delivery is shown while one is open).
    watch: Arc<crate::dashboard::Watch>,
}

impl Feed {
    /// A feed delivering to `hub` and `tail`.
    pub(crate) fn new(
        hub: Arc<Hub>,
        tail: Arc<Tail>,
        metrics: Arc<Metrics>,
        single_writer: bool,
        watch: Arc<crate::dashboard::Watch>,
    ) -> Self {
        Self {
            watch,
            hub,
            tail,
            metrics,
            single_writer,
            tenants: Mutex::new(HashMap::new()),
            behind: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        }
    }

    fn tenants(&self) -> MutexGuard<'_, HashMap<String, TenantFeed>> {
        self.tenants.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn behind(&self) -> MutexGuard<'_, HashMap<String, u64>> {
        self.behind.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts from where each tenant's log is now (several instances: taken before
    /// anything is delivered). Events at or before a tenant's head are never
    /// delivered live by this instance.
    pub(crate) fn set_baseline(&self, heads: Vec<(String, u64)>) {
        let mut tenants = self.tenants();
        for (tenant, head) in heads {
            let t = tenants.entry(tenant).or_default();
            if head > t.delivered {
                t.delivered = head;
                t.pending = t.pending.split_off(&(head + 1));
            }
        }
    }

    /// This instance's own appends to `tenant`, right after their commit, in the
    /// order of their sequences.
    pub(crate) fn committed(&self, tenant: &str, events: Vec<Committed>) {
        self.metrics.events_published.inc_by(events.len() as u64);
        self.accept(tenant, events);
    }

    /// This instance's appends about to be committed (see [`TenantFeed::expected`]).
    pub(crate) fn expect(&self, tenant: &str, events: &[Committed]) {
        let mut tenants = self.tenants();
        let t = tenants.entry(tenant.to_owned()).or_default();
        for committed in events {
            t.expected.insert(committed.event.seq, committed.clone());
        }
    }

    /// The appends [`Feed::expect`]ed for `tenant` were not committed.
    pub(crate) fn unexpect(&self, tenant: &str) {
        if let Some(t) = self.tenants().get_mut(tenant) {
            t.expected.clear();
        }
    }

    /// Another instance's appends (from a notification or read back), in order.
    pub(crate) fn remote(&self, tenant: &str, rows: Vec<TailEvent>) {
        self.accept(tenant, rows.into_iter().map(Committed::from_row).collect());
    }

    fn accept(&self, tenant: &str, events: Vec<Committed>) {
        let first = events.first().map(|e| e.event.seq);
        let mut tenants = self.tenants();
        if !tenants.contains_key(tenant) {
            let Some(first) = first else {
                return;
            };
            let delivered = if self.single_writer {
                first.saturating_sub(1)
            } else {
                0
            };
            tenants.insert(
                tenant.to_owned(),
                TenantFeed {
                    delivered,
                    pending: BTreeMap::new(),
                    expected: BTreeMap::new(),
                },
            );
        }
        let Some(t) = tenants.get_mut(tenant) else {
            return;
        };
        for mut committed in events {
            let seq = committed.event.seq;
            // Read back, but appended here: the version that knows its sender (the
            // same event: a stale entry of a rolled-back attempt never matches).
            if let Some(local) = t.expected.remove(&seq)
                && local.event.event_id == committed.event.event_id
                && committed.exclude.is_none()
            {
                committed = local;
            }
            if seq <= t.delivered {
                continue;
            }
            if seq == t.delivered + 1 {
                self.deliver(tenant, committed);
                t.delivered = seq;
            } else {
                // Keep what this instance knows best (its own frame, its sender).
                match t.pending.entry(seq) {
                    std::collections::btree_map::Entry::Vacant(slot) => {
                        slot.insert(committed);
                    }
                    std::collections::btree_map::Entry::Occupied(mut slot) => {
                        if slot.get().exclude.is_none() && committed.exclude.is_some() {
                            slot.insert(committed);
                        }
                    }
                }
            }
        }
        // The gap may have closed.
        while let Some(entry) = t.pending.first_entry() {
            let seq = *entry.key();
            if seq <= t.delivered {
                entry.remove();
            } else if seq == t.delivered + 1 {
                let committed = entry.remove();
                self.deliver(tenant, committed);
                t.delivered = seq;
            } else {
                break;
            }
        }
    }

    /// Tells the feed that `tenant`'s log reached `head` (a notification was
    /// processed, or the periodic look at every tenant's head): if that is past what
    /// was delivered, the gap is read back from storage soon.
    pub(crate) fn reached(&self, tenant: &str, head: u64) {
        let delivered = self.tenants().get(tenant).map_or(0, |t| t.delivered);
        if head > delivered {
            let mut behind = self.behind();
            let want = behind.entry(tenant.to_owned()).or_insert(0);
            *want = (*want).max(head);
            drop(behind);
            self.wake.notify_one();
        }
    }

    /// Waits until some tenant is behind.
    pub(crate) async fn wait_behind(&self) {
        if self.behind().is_empty() {
            self.wake.notified().await;
        }
    }

    /// Reads back what the tenants known to be behind are missing and delivers it.
    /// Returns the tenants still behind (a failed read, or more than one round).
    pub(crate) async fn catch_up(&self, log: &dyn ReadBack) -> HashSet<String> {
        let work: Vec<(String, u64)> = self.behind().drain().collect();
        let mut still = HashSet::new();
        for (tenant, want) in work {
            for _ in 0..CATCH_UP_PAGES {
                let delivered = self.tenants().get(&tenant).map_or(0, |t| t.delivered);
                if delivered >= want {
                    break;
                }
                match log.events_after(&tenant, delivered, CATCH_UP_PAGE).await {
                    Ok(rows) if rows.is_empty() => {
                        // Retention took them, or they were never there: start after
                        // what the log holds.
                        self.skip_to(&tenant, want);
                        break;
                    }
                    Ok(rows) => {
                        self.metrics.feed_catch_up_reads.inc();
                        // The first row may be past a gap that retention made.
                        if let Some(first) = rows.first().map(|r| r.seq)
                            && first > delivered + 1
                        {
                            self.skip_to(&tenant, first - 1);
                        }
                        self.remote(&tenant, rows);
                    }
                    Err(error) => {
                        tracing::warn!(%error, tenant, "reading the log back failed; trying again");
                        still.insert(tenant.clone());
                        self.behind().entry(tenant.clone()).or_insert(want);
                        break;
                    }
                }
            }
            let delivered = self.tenants().get(&tenant).map_or(0, |t| t.delivered);
            if delivered < want && !still.contains(&tenant) {
                self.behind().entry(tenant.clone()).or_insert(want);
                still.insert(tenant);
            }
        }
        still
    }

    /// Gives up on events up to `seq` of `tenant` (no longer in the log).
    fn skip_to(&self, tenant: &str, seq: u64) {
        let mut tenants = self.tenants();
        let t = tenants.entry(tenant.to_owned()).or_default();
        if seq > t.delivered {
            tracing::warn!(
                tenant,
                from = t.delivered,
                to = seq,
                "events gone from the log before they were delivered live"
            );
            t.delivered = seq;
        }
        drop(tenants);
        // Anything pending right after the skip can go now.
        self.accept(tenant, Vec::new());
    }

    /// True when the hub has `membership`.
    pub(crate) fn is_member(&self, membership: &Membership) -> bool {
        self.hub
            .is_member(&membership.tenant, &membership.room, &membership.user)
    }

    /// Replaces every membership the hub knows with `all` (a listener that was
    /// disconnected from the other instances may have missed changes).
    pub(crate) fn sync_memberships(&self, all: Vec<Membership>) {
        self.hub.sync_memberships(all);
    }

    /// The metrics.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A membership stored (by any instance): the hub learns of it, and a joiner's
    /// presence is told to this instance's members who could not see it before.
    pub(crate) fn membership(&self, membership: &Membership, joined: bool) {
        let before = joined.then(|| self.sharing(membership));
        self.membership_after(membership, joined, before.as_ref());
    }

    /// Who shares a room with `membership`'s user now (taken before a join).
    pub(crate) fn sharing(&self, membership: &Membership) -> HashSet<String> {
        self.hub.sharing_users(&membership.tenant, &membership.user)
    }

    /// [`Feed::membership`] with who shared a room with the user before the join.
    pub(crate) fn membership_after(
        &self,
        membership: &Membership,
        joined: bool,
        before: Option<&HashSet<String>>,
    ) {
        let Membership { tenant, user, room } = membership;
        match (joined, before) {
            (true, Some(before)) => self.hub.join_announcing(tenant, room, user, before),
            (true, None) => self.hub.add_member(tenant, room, user),
            (false, _) => self.hub.remove_member(tenant, room, user),
        }
    }

    fn deliver(&self, tenant: &str, committed: Committed) {
        let Committed {
            event,
            delivery,
            exclude,
        } = committed;
        let audience = audience_of(&event);
        if self.watch.watching() {
            self.watch.event(tenant, &self.hub, &event, &audience);
        }
        self.tail.push(tenant, event);
        let sent = self.hub.deliver(tenant, &audience, &delivery, exclude);
        self.metrics.delivered("ws", sent);
    }
}
