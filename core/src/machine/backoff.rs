//! Retry delays: an exponential schedule (from `backon`) with full jitter.
//!
//! `backon` gives the exponential envelope (min, ×2, capped at max). Its own jitter adds
//! up to one more delay on top ("delay + random(0, delay)"); we want *full* jitter
//! (AWS's "exponential backoff and jitter": a uniform pick below the envelope), which
//! spreads the reconnects of many clients that lost the same server evenly over the
//! whole window, from the very first retry. So the pick is made here, with a seedable
//! RNG so that tests are deterministic: the delay is `min + uniform(0, envelope)`,
//! capped at `max`. The floor keeps a client out of hot loops.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// An exponential backoff schedule with full jitter.
#[derive(Debug)]
pub(crate) struct Backoff {
    builder: ExponentialBuilder,
    schedule: ExponentialBackoff,
    min: Duration,
    max: Duration,
    rng: StdRng,
    attempts: u32,
}

impl Backoff {
    /// Delays between `min` and an envelope doubling from `min` up to `max`.
    pub(crate) fn new(min: Duration, max: Duration, seed: u64) -> Self {
        let max = max.max(min);
        let builder = ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times();
        Self {
            schedule: builder.build(),
            builder,
            min,
            max,
            rng: StdRng::seed_from_u64(seed),
            attempts: 0,
        }
    }

    /// The next delay: `min + uniform(0, envelope)`, at most `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.attempts = self.attempts.saturating_add(1);
        let envelope = self.schedule.next().unwrap_or(self.min).max(self.min);
        self.min
            .saturating_add(self.jitter(Duration::ZERO, envelope))
            .min(self.max)
    }

    /// A uniform pick in `[low, high]` from this schedule's RNG.
    pub(crate) fn jitter(&mut self, low: Duration, high: Duration) -> Duration {
        if high <= low {
            return low;
        }
        let span = u64::try_from(high.saturating_sub(low).as_millis()).unwrap_or(u64::MAX);
        low.saturating_add(Duration::from_millis(self.rng.random_range(0..=span)))
    }

    /// Starts the schedule again from `min`.
    pub(crate) fn reset(&mut self) {
        self.schedule = self.builder.build();
        self.attempts = 0;
    }

    /// Delays handed out since the last reset.
    pub(crate) fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// The delay before an item's `attempt`-th try (1-based; the first retry is 2): the
/// same schedule as [`Backoff`] (backon's envelope doubling from `min` to `max`, full
/// jitter), for outbox items, which each keep their attempt count in the store rather
/// than a schedule in memory.
pub(crate) fn item_delay(min: Duration, max: Duration, attempt: u32) -> Duration {
    let mut backoff = Backoff::new(min, max, rand::random());
    // The envelope stops growing at `max` long before 64 doublings.
    for _ in 2..attempt.min(64) {
        let _ = backoff.schedule.next();
    }
    backoff.next_delay()
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_the_doubling_envelope_and_reset() {
        let min = Duration::from_millis(500);
        let max = Duration::from_secs(30);
        let mut b = Backoff::new(min, max, 7);
        let first: Vec<Duration> = (0..50u64)
            .map(|seed| Backoff::new(min, max, seed).next_delay())
            .collect();
        assert!(
            *first.iter().max().unwrap() - *first.iter().min().unwrap() > min / 2,
            "even the first retries of many clients are spread: {first:?}"
        );
        let mut envelope = min;
        for _ in 0..20 {
            let d = b.next_delay();
            let high = (min + envelope).min(max);
            assert!(d >= min && d <= high, "{d:?} outside [{min:?}, {high:?}]");
            envelope = (envelope * 2).min(max);
        }
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert!(b.next_delay() <= min * 2, "the schedule starts again");
    }

    #[test]
    fn item_delays_follow_the_envelope_with_jitter() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
        for attempt in 0..40u32 {
            let envelope = (min * 2u32.pow(attempt.saturating_sub(2).min(10))).min(max);
            let high = (min + envelope).min(max);
            for _ in 0..20 {
                let d = item_delay(min, max, attempt);
                assert!(d >= min && d <= high, "attempt {attempt}: {d:?} > {high:?}");
            }
        }
        let spread: std::collections::BTreeSet<Duration> =
            (0..20).map(|_| item_delay(min, max, 5)).collect();
        assert!(spread.len() > 1, "jittered: {spread:?}");
        assert_eq!(item_delay(min, max, u32::MAX).max(max), max);
    }

    #[test]
    fn the_same_seed_gives_the_same_delays() {
        let mk = || Backoff::new(Duration::from_millis(100), Duration::from_secs(10), 42);
        let (mut a, mut b) = (mk(), mk());
        for _ in 0..10 {
            assert_eq!(a.next_delay(), b.next_delay());
        }
    }
}
