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
use std::sync::Arc;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

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

/// One entry of a clock: a replica id and its counter (never 0).
type Entry = (Arc<str>, u64);

/// A vector clock: replica id → number of edits seen from that replica.
///
/// Stored as an immutable, shared array of entries sorted by replica id (`None` when
/// empty): copying a clock (every copy of an operation copies one) costs a reference
/// count, comparing two walks two arrays, and merging a clock into one it dominates or
/// that dominates it shares the greater one instead of building a new one.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct VectorClock(Option<Arc<[Entry]>>);

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
        let mut map: BTreeMap<String, u64> = BTreeMap::new();
        for (replica, counter) in entries {
            if counter > 0 {
                let entry = map.entry(replica.into()).or_insert(0);
                *entry = (*entry).max(counter);
            }
        }
        Self::from_sorted(map.into_iter().map(|(k, v)| (Arc::from(k), v)).collect())
    }

    /// A clock from entries sorted by replica id, without zeros.
    fn from_sorted(entries: Vec<Entry>) -> Self {
        if entries.is_empty() {
            Self(None)
        } else {
            Self(Some(entries.into()))
        }
    }

    fn entries(&self) -> &[Entry] {
        self.0.as_deref().unwrap_or(&[])
    }

    /// The counter of `replica` (0 when absent).
    pub fn get(&self, replica: &str) -> u64 {
        let entries = self.entries();
        entries
            .binary_search_by(|(k, _)| (**k).cmp(replica))
            .map_or(0, |i| entries[i].1)
    }

    /// Records one more edit by `replica` and returns its new counter.
    ///
    /// The counter saturates at `u64::MAX` rather than wrapping (2^64 edits by one
    /// replica cannot happen in practice; wrapping would reorder history).
    pub fn increment(&mut self, replica: &str) -> u64 {
        let mut entries = self.entries().to_vec();
        let counter = match entries.binary_search_by(|(k, _)| (**k).cmp(replica)) {
            Ok(i) => {
                entries[i].1 = entries[i].1.saturating_add(1);
                entries[i].1
            }
            Err(i) => {
                entries.insert(i, (Arc::from(replica), 1));
                1
            }
        };
        *self = Self::from_sorted(entries);
        counter
    }

    /// Merges `other` into `self`: each entry becomes the maximum of both.
    pub fn merge(&mut self, other: &VectorClock) {
        match self.compare(other) {
            ClockOrdering::After | ClockOrdering::Equal => {}
            ClockOrdering::Before => *self = other.clone(),
            ClockOrdering::Concurrent => *self = self.union(other),
        }
    }

    /// The entry-wise maximum of two concurrent clocks, as a new array.
    fn union(&self, other: &VectorClock) -> VectorClock {
        let (a, b) = (self.entries(), other.entries());
        let mut out = Vec::with_capacity(a.len().max(b.len()));
        let (mut i, mut j) = (0, 0);
        while i < a.len() && j < b.len() {
            match a[i].0.cmp(&b[j].0) {
                Ordering::Less => {
                    out.push(a[i].clone());
                    i += 1;
                }
                Ordering::Greater => {
                    out.push(b[j].clone());
                    j += 1;
                }
                Ordering::Equal => {
                    out.push(if a[i].1 >= b[j].1 {
                        a[i].clone()
                    } else {
                        b[j].clone()
                    });
                    i += 1;
                    j += 1;
                }
            }
        }
        out.extend_from_slice(&a[i..]);
        out.extend_from_slice(&b[j..]);
        Self::from_sorted(out)
    }

    /// The entry-wise maximum of two clocks.
    pub fn merged(&self, other: &VectorClock) -> VectorClock {
        let mut out = self.clone();
        out.merge(other);
        out
    }

    /// Compares two clocks; missing entries are 0.
    pub fn compare(&self, other: &VectorClock) -> ClockOrdering {
        if let (Some(a), Some(b)) = (&self.0, &other.0)
            && Arc::ptr_eq(a, b)
        {
            return ClockOrdering::Equal;
        }
        let (a, b) = (self.entries(), other.entries());
        let mut self_greater = false;
        let mut other_greater = false;
        // Both arrays are sorted: walk them together once.
        let (mut i, mut j) = (0, 0);
        while i < a.len() && j < b.len() {
            let (ka, va) = &a[i];
            let (kb, vb) = &b[j];
            let step = if Arc::ptr_eq(ka, kb) {
                Ordering::Equal
            } else {
                ka.cmp(kb)
            };
            match step {
                // Key only in `self` (counters are never 0): self is greater there.
                Ordering::Less => {
                    self_greater = true;
                    i += 1;
                }
                Ordering::Greater => {
                    other_greater = true;
                    j += 1;
                }
                Ordering::Equal => {
                    match va.cmp(vb) {
                        Ordering::Greater => self_greater = true,
                        Ordering::Less => other_greater = true,
                        Ordering::Equal => {}
                    }
                    i += 1;
                    j += 1;
                }
            }
            if self_greater && other_greater {
                return ClockOrdering::Concurrent;
            }
        }
        self_greater |= i < a.len();
        other_greater |= j < b.len();
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
        self.entries()
            .iter()
            .fold(0u64, |sum, (_, c)| sum.saturating_add(*c))
    }

    /// True when every entry is 0.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// The non-zero entries, sorted by replica id.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.entries().iter().map(|(k, v)| (&**k, *v))
    }
}

impl fmt::Debug for VectorClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("VectorClock")
            .field(&DebugEntries(self.entries()))
            .finish()
    }
}

/// Prints entries as a map, `{"a": 1}`, as the clock printed when it was a map.
struct DebugEntries<'a>(&'a [Entry]);

impl fmt::Debug for DebugEntries<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| (&**k, v)))
            .finish()
    }
}

impl Serialize for VectorClock {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl fmt::Display for VectorClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (replica, counter)) in self.iter().enumerate() {
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
                let mut entries: Vec<Entry> = Vec::with_capacity(map.size_hint().unwrap_or(0));
                let mut sorted = true;
                while let Some(replica) = map.next_key::<String>()? {
                    let counter: Counter = map.next_value()?;
                    if replica.is_empty() {
                        return Err(de::Error::custom(
                            "vector clock replica id must not be empty",
                        ));
                    }
                    if counter.0 == 0 {
                        continue;
                    }
                    sorted &= entries.last().is_none_or(|(k, _)| **k < *replica);
                    entries.push((Arc::from(replica), counter.0));
                }
                if !sorted {
                    // Out of order or repeated: sort, keeping a repeated replica's
                    // greatest counter (as a map that raises entries would).
                    entries.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
                    entries.dedup_by(|later, kept| later.0 == kept.0);
                }
                Ok(VectorClock::from_sorted(entries))
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
