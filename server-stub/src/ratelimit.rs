//! Per-user rate limits (PROTOCOL.md §4, §6 "Rate limits"), with `governor`'s keyed
//! token buckets: a burst equal to the limit, refilled evenly over the period.
//!
//! A refusal is `RATE_LIMIT` with `details.retryAfterMs` (the time until one more
//! request would pass). Callers check a limit only once everything else about the
//! request is known to be fine, so refused requests use no budget.

use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::error::ApiError;
use crate::metrics::{Metrics, label};

type Keyed = RateLimiter<(String, String), DefaultKeyedStateStore<(String, String)>, DefaultClock>;

/// One named limit, keyed by (tenant, user). A limit of 0 means unlimited.
pub(crate) struct Limit {
    name: &'static str,
    limiter: Option<Keyed>,
    clock: DefaultClock,
}

impl Limit {
    /// `n` per minute, burst `n`.
    pub(crate) fn per_minute(name: &'static str, n: u32) -> Self {
        Self::with_quota(name, NonZeroU32::new(n).map(Quota::per_minute))
    }

    /// `n` per second, burst `n`.
    pub(crate) fn per_second(name: &'static str, n: u32) -> Self {
        Self::with_quota(name, NonZeroU32::new(n).map(Quota::per_second))
    }

    fn with_quota(name: &'static str, quota: Option<Quota>) -> Self {
        Self {
            name,
            limiter: quota.map(RateLimiter::keyed),
            clock: DefaultClock::default(),
        }
    }

    /// Takes one unit of `user`'s budget, or refuses with `RATE_LIMIT`.
    pub(crate) fn check(
        &self,
        metrics: &Metrics,
        tenant: &str,
        user: &str,
    ) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        match limiter.check_key(&(tenant.to_owned(), user.to_owned())) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
                metrics
                    .rate_limit_refusals
                    .get_or_create(&label("limit", self.name))
                    .inc();
                Err(ApiError::rate_limited(ms))
            }
        }
    }

    /// Forgets users whose bucket is full again (memory bound).
    pub(crate) fn retain_recent(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// The server's four limits.
pub(crate) struct Limits {
    /// WebSocket `message` frames and `POST /api/messages`, shared.
    pub(crate) messages: Limit,
    /// Polls and snapshot reads.
    pub(crate) poll: Limit,
    /// Reconciliation requests.
    pub(crate) reconcile: Limit,
    /// Published events.
    pub(crate) publish: Limit,
}

impl Limits {
    /// The limits of `config`.
    pub(crate) fn new(config: &crate::config::Config) -> Self {
        Self {
            messages: Limit::per_minute("messages", config.message_rate_limit),
            poll: Limit::per_minute("poll", config.poll_rate_limit),
            reconcile: Limit::per_minute("reconciliation", config.reconciliation_rate_limit),
            publish: Limit::per_second("publish", config.publish_rate_limit),
        }
    }

    /// Forgets idle users in every limit.
    pub(crate) fn retain_recent(&self) {
        self.messages.retain_recent();
        self.poll.retain_recent();
        self.reconcile.retain_recent();
        self.publish.retain_recent();
    }
}
