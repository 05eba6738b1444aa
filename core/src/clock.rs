//! Vector clocks: which edits of an entity saw which.
//!
//! A [`VectorClock`] maps a replica id (the SDK's persistent `clientId`) to the number
//! of edits that replica has made to one entity. Each edit increments its own entry;
//! receiving another replica's state merges clocks entry by entry (maximum). Two clocks
//! then compare as [`ClockOrdering::Before`], [`ClockOrdering::After`],
//! [`ClockOrdering::Equal`] or [`ClockOrdering::Concurrent`] (neither saw the other:
//! a conflict). A missing entry counts as 0, so `{}` and `{"a": 0}` are the same clock;
//! the map never stores zeros, which keeps equality, hashing and the wire form canonical.
//!
//! ```
//! use webwaka_realtime::{ClockOrdering, VectorClock};
//!
//! let mut phone = VectorClock::new();
//! phone.increment("phone"); // an offline edit on the phone
//! let mut laptop = VectorClock::new();
//! laptop.increment("laptop"); // and one on the laptop
//! assert_eq!(phone.compare(&laptop), ClockOrdering::Concurrent);
//!
//! let mut merged = phone.merged(&laptop);
//! merged.increment("laptop"); // the laptop saw both, then edited again
//! assert_eq!(merged.compare(&phone), ClockOrdering::After);
//! ```
//!
//! On the wire a clock is a JSON object of non-negative integers:
//! `{"client-a": 3, "client-b": 1}`. A negative, fractional or non-numeric counter is a
//! decoding error that names the offending entry.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// How two vector clocks relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClockOrdering {
    /// `self` happened before `other`: every entry ≤, at least one <.
    Before,
    /// `self` happened after `other`: every entry ≥, at least one >.
    After,
    /// Both clocks are the same history.
    Equal,
    /// Neither saw the other: concurrent edits.
    Concurrent,
}

/// A vector clock: replica id → number of edits seen from that replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct VectorClock(BTreeMap<String, u64>);

impl VectorClock {
    /// The empty clock (every entry 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a clock from `(replica, counter)` pairs; zero counters are dropped and a
    /// repeated replica keeps its greatest counter.
    pub fn from_entries<I, S>(entries: I) -> Self
    where
        I: IntoIterator<Item = (S, u64)>,
        S: Into<String>,
    {
        let mut clock = Self::new();
        for (replica, counter) in entries {
            clock.observe(replica.into(), counter);
        }
        clock
    }

    /// The counter of `replica` (0 when absent).
    pub fn get(&self, replica: &str) -> u64 {
        self.0.get(replica).copied().unwrap_or(0)
    }

    /// Records one more edit by `replica` and returns its new counter.
    ///
    /// The counter saturates at `u64::MAX` rather than wrapping (2^64 edits by one
    /// replica cannot happen in practice; wrapping would reorder history).
    pub fn increment(&mut self, replica: &str) -> u64 {
        let counter = self.0.entry(replica.to_owned()).or_insert(0);
        *counter = counter.saturating_add(1);
        *counter
    }

    /// Merges `other` into `self`: each entry becomes the maximum of both.
    pub fn merge(&mut self, other: &VectorClock) {
        for (replica, &counter) in &other.0 {
            self.observe(replica.clone(), counter);
        }
    }

    /// The entry-wise maximum of two clocks.
    pub fn merged(&self, other: &VectorClock) -> VectorClock {
        let mut out = self.clone();
        out.merge(other);
        out
    }

    /// Compares two clocks; missing entries are 0.
    pub fn compare(&self, other: &VectorClock) -> ClockOrdering {
        let mut self_greater = false;
        let mut other_greater = false;
        // Both maps are sorted: walk them together once.
        let mut a = self.0.iter().peekable();
        let mut b = other.0.iter().peekable();
        loop {
            let step = match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
            };
            match step {
                // Key only in `self` (counters are never 0): self is greater there.
                Ordering::Less => {
                    self_greater = true;
                    a.next();
                }
                Ordering::Greater => {
                    other_greater = true;
                    b.next();
                }
                Ordering::Equal => {
                    if let (Some((_, va)), Some((_, vb))) = (a.next(), b.next()) {
                        match va.cmp(vb) {
                            Ordering::Greater => self_greater = true,
                            Ordering::Less => other_greater = true,
                            Ordering::Equal => {}
                        }
                    }
                }
            }
            if self_greater && other_greater {
                return ClockOrdering::Concurrent;
            }
        }
        match (self_greater, other_greater) {
            (false, false) => ClockOrdering::Equal,
            (true, false) => ClockOrdering::After,
            (false, true) => ClockOrdering::Before,
            (true, true) => ClockOrdering::Concurrent,
        }
    }

    /// True when `self` saw everything `other` saw (`After` or `Equal`).
    pub fn descends_from(&self, other: &VectorClock) -> bool {
        matches!(
            self.compare(other),
            ClockOrdering::After | ClockOrdering::Equal
        )
    }

    /// True when neither clock saw the other.
    pub fn is_concurrent_with(&self, other: &VectorClock) -> bool {
        self.compare(other) == ClockOrdering::Concurrent
    }

    /// The causal depth: the sum of all counters, i.e. how many edits this clock saw.
    ///
    /// It grows strictly along causality (`a` before `b` implies `depth(a) < depth(b)`),
    /// which makes it a Lamport timestamp usable to order operations totally.
    pub fn depth(&self) -> u64 {
        self.0.values().fold(0u64, |sum, c| sum.saturating_add(*c))
    }

    /// True when every entry is 0.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The non-zero entries, sorted by replica id.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// Raises `replica`'s entry to at least `counter`.
    fn observe(&mut self, replica: String, counter: u64) {
        if counter == 0 {
            return;
        }
        let entry = self.0.entry(replica).or_insert(0);
        if *entry < counter {
            *entry = counter;
        }
    }
}

impl fmt::Display for VectorClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (replica, counter)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{replica}: {counter}")?;
        }
        f.write_str("}")
    }
}

impl<'de> Deserialize<'de> for VectorClock {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ClockVisitor;

        impl<'de> Visitor<'de> for ClockVisitor {
            type Value = VectorClock;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a vector clock: an object of non-negative integer counters")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<VectorClock, M::Error> {
                let mut clock = VectorClock::new();
                while let Some(replica) = map.next_key::<String>()? {
                    let counter: Counter = map.next_value()?;
                    if replica.is_empty() {
                        return Err(de::Error::custom(
                            "vector clock replica id must not be empty",
                        ));
                    }
                    clock.observe(replica, counter.0);
                }
                Ok(clock)
            }
        }

        deserializer.deserialize_map(ClockVisitor)
    }
}

/// One counter of a clock, with an error that says what a counter must be.
struct Counter(u64);

impl<'de> Deserialize<'de> for Counter {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CounterVisitor;

        impl Visitor<'_> for CounterVisitor {
            type Value = Counter;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative integer counter")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Counter, E> {
                Ok(Counter(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Counter, E> {
                u64::try_from(v).map(Counter).map_err(|_| {
                    E::custom(format!(
                        "clock counter must be a non-negative integer, got {v}"
                    ))
                })
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Counter, E> {
                Err(E::custom(format!(
                    "clock counter must be a non-negative integer, got {v}"
                )))
            }
        }

        deserializer.deserialize_any(CounterVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vc(entries: &[(&str, u64)]) -> VectorClock {
        VectorClock::from_entries(entries.iter().map(|(k, v)| (*k, *v)))
    }

    #[test]
    fn missing_entries_are_zero() {
        assert_eq!(vc(&[("a", 0)]), VectorClock::new());
        assert_eq!(
            vc(&[("a", 1)]).compare(&vc(&[("a", 1), ("b", 0)])),
            ClockOrdering::Equal
        );
        assert_eq!(vc(&[("a", 1)]).get("zzz"), 0);
    }

    #[test]
    fn compare_covers_all_four_outcomes() {
        let a1 = vc(&[("a", 1)]);
        let a2 = vc(&[("a", 2)]);
        let b1 = vc(&[("b", 1)]);
        assert_eq!(a1.compare(&a2), ClockOrdering::Before);
        assert_eq!(a2.compare(&a1), ClockOrdering::After);
        assert_eq!(a1.compare(&a1.clone()), ClockOrdering::Equal);
        assert_eq!(a1.compare(&b1), ClockOrdering::Concurrent);
        assert_eq!(VectorClock::new().compare(&b1), ClockOrdering::Before);
    }

    #[test]
    fn decodes_and_encodes_the_wire_form() {
        let clock: VectorClock = serde_json::from_str(r#"{"b": 1, "a": 3, "c": 0}"#).unwrap();
        assert_eq!(clock, vc(&[("a", 3), ("b", 1)]));
        assert_eq!(serde_json::to_string(&clock).unwrap(), r#"{"a":3,"b":1}"#);
    }

    #[test]
    fn rejects_bad_counters_with_a_clear_message() {
        for (input, needle) in [
            (r#"{"a": -1}"#, "non-negative integer, got -1"),
            (r#"{"a": 1.5}"#, "non-negative integer, got 1.5"),
            (r#"{"a": "1"}"#, "non-negative integer"),
            (r#"{"": 1}"#, "must not be empty"),
            (r#"[1]"#, "vector clock"),
        ] {
            let err = serde_json::from_str::<VectorClock>(input).unwrap_err();
            assert!(err.to_string().contains(needle), "{input}: {err}");
        }
    }

    fn arb_clock() -> impl Strategy<Value = VectorClock> {
        prop::collection::btree_map("[a-d]", 0u64..5, 0..4).prop_map(VectorClock::from_entries)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn compare_is_antisymmetric(a in arb_clock(), b in arb_clock()) {
            let flipped = match a.compare(&b) {
                ClockOrdering::Before => ClockOrdering::After,
                ClockOrdering::After => ClockOrdering::Before,
                other => other,
            };
            prop_assert_eq!(b.compare(&a), flipped);
            prop_assert_eq!(a.compare(&b) == ClockOrdering::Equal, a == b);
        }

        #[test]
        fn descends_from_is_a_partial_order(a in arb_clock(), b in arb_clock(), c in arb_clock()) {
            // Reflexive, antisymmetric, transitive.
            prop_assert!(a.descends_from(&a));
            if a.descends_from(&b) && b.descends_from(&a) {
                prop_assert_eq!(&a, &b);
            }
            if a.descends_from(&b) && b.descends_from(&c) {
                prop_assert!(a.descends_from(&c));
            }
        }

        #[test]
        fn merge_is_the_least_upper_bound(a in arb_clock(), b in arb_clock(), c in arb_clock()) {
            let m = a.merged(&b);
            prop_assert!(m.descends_from(&a));
            prop_assert!(m.descends_from(&b));
            // Least: any clock above both is above the merge.
            if c.descends_from(&a) && c.descends_from(&b) {
                prop_assert!(c.descends_from(&m));
            }
            // Consistent with compare: merging with something you descend from is a no-op.
            if a.descends_from(&b) {
                prop_assert_eq!(&m, &a);
            }
        }

        #[test]
        fn merge_is_commutative_associative_idempotent(a in arb_clock(), b in arb_clock(), c in arb_clock()) {
            prop_assert_eq!(a.merged(&b), b.merged(&a));
            prop_assert_eq!(a.merged(&b).merged(&c), a.merged(&b.merged(&c)));
            prop_assert_eq!(a.merged(&a), a.clone());
        }

        #[test]
        fn increment_is_strictly_after(a in arb_clock(), replica in "[a-e]") {
            let mut next = a.clone();
            let counter = next.increment(&replica);
            prop_assert_eq!(counter, a.get(&replica) + 1);
            prop_assert_eq!(next.compare(&a), ClockOrdering::After);
            prop_assert!(next.depth() > a.depth());
        }

        #[test]
        fn depth_grows_along_causality(a in arb_clock(), b in arb_clock()) {
            if a.compare(&b) == ClockOrdering::Before {
                prop_assert!(a.depth() < b.depth());
            }
        }

        #[test]
        fn wire_form_round_trips(a in arb_clock()) {
            let json = serde_json::to_string(&a).unwrap();
            prop_assert_eq!(serde_json::from_str::<VectorClock>(&json).unwrap(), a);
        }
    }
}
