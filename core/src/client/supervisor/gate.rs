//! The inbound gate: inbound streams must not interleave.
//!
//! The cursor only moves forward, so an event recorded from one stream would make an
//! older event of another stream look like a replay, and it would be skipped for good.
//! While a poll, a catch-up or a resync is recording events, each holds a [`Slot`] and
//! the WebSocket's durable deliveries wait in the gate; once every slot is back they
//! go, in their order, through the same dedupe.
//!
//! A slot goes back when the supervisor handles its task's report
//! ([`Gate::release`]). Dropped any other way (the task aborted or panicked, the report
//! lost) it frees itself and tells the supervisor ([`Io::SlotDropped`]), so held
//! deliveries never wait for a slot nobody will return. The soaks found three bugs in
//! the counter this replaces, each a path that forgot to give its slot back or gave it
//! twice; a slot is now given back exactly once, by construction.
//!
//! The gate also remembers which connection's `connected` starts a catch-up (a
//! connection opened without a cursor polls from the cursor to the end of the log while
//! its deliveries wait).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use super::Io;
use crate::protocol::ServerEvent;

/// What the WebSocket's durable deliveries wait behind.
pub(super) struct Gate {
    /// Slots out: inbound tasks recording events now.
    busy: Arc<AtomicUsize>,
    /// Deliveries waiting for the gate to open, in order.
    held: Vec<ServerEvent>,
    /// Where a slot dropped without release reports.
    io: mpsc::UnboundedSender<Io>,
    /// The connection generation whose `connected` starts a catch-up.
    catch_up: Option<u64>,
    /// More held than this and the supervisor drops them with the connection (see
    /// [`Gate::overflowing`]).
    limit: usize,
}

/// How many deliveries may wait behind a catch-up: past this (a long catch-up of a
/// busy tenant), they are dropped with the connection, and the next one resumes from
/// the cursor, instead of piling up in memory.
pub(super) const MAX_HELD: usize = 10_000;

/// An inbound task's place in the gate: the gate stays shut while any slot is out.
#[must_use = "a slot keeps the gate shut until it is released or dropped"]
pub(super) struct Slot {
    busy: Arc<AtomicUsize>,
    /// `Some` until released: a drop without release tells the supervisor.
    io: Option<mpsc::UnboundedSender<Io>>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.busy.fetch_sub(1, Ordering::AcqRel);
        if let Some(io) = self.io.take() {
            // The supervisor may be gone (shutting down): nothing waits then.
            let _ = io.send(Io::SlotDropped);
        }
    }
}

impl Gate {
    /// An open gate; slots dropped without release are reported on `io`.
    pub(super) fn new(io: mpsc::UnboundedSender<Io>) -> Self {
        Self::with_limit(io, MAX_HELD)
    }

    /// An open gate that holds at most `limit` deliveries before it overflows.
    pub(super) fn with_limit(io: mpsc::UnboundedSender<Io>, limit: usize) -> Self {
        Self {
            busy: Arc::new(AtomicUsize::new(0)),
            held: Vec::new(),
            io,
            catch_up: None,
            limit,
        }
    }

    /// True when more deliveries wait than the gate's limit: the caller drops them with
    /// the connection (not recorded, so not lost: the next connection resumes from the
    /// cursor).
    pub(super) fn overflowing(&self) -> bool {
        self.held.len() > self.limit
    }

    /// A slot for a task about to record inbound events: shuts the gate until it is
    /// back.
    pub(super) fn slot(&self) -> Slot {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Slot {
            busy: Arc::clone(&self.busy),
            io: Some(self.io.clone()),
        }
    }

    /// True while some inbound task holds a slot.
    pub(super) fn is_shut(&self) -> bool {
        self.busy.load(Ordering::Acquire) > 0
    }

    /// Gives back the slot of a task whose report was handled. The caller then lets
    /// the held deliveries go ([`Gate::open`]) unless it dropped them.
    pub(super) fn release(&self, mut slot: Slot) {
        slot.io = None;
    }

    /// Keeps a delivery back while the gate is shut, or while earlier ones still wait
    /// (a slot dropped on its task's thread opens the gate before the supervisor has
    /// let those go); hands it back otherwise.
    pub(super) fn hold(&mut self, event: ServerEvent) -> Option<ServerEvent> {
        if self.is_shut() || !self.held.is_empty() {
            self.held.push(event);
            None
        } else {
            Some(event)
        }
    }

    /// What waited, once the gate is open (nothing while shut).
    pub(super) fn open(&mut self) -> Vec<ServerEvent> {
        if self.is_shut() {
            Vec::new()
        } else {
            std::mem::take(&mut self.held)
        }
    }

    /// Puts back deliveries taken with [`Gate::open`] that could not go because the
    /// gate shut again meanwhile: first, before anything held since.
    pub(super) fn hold_again(&mut self, mut rest: Vec<ServerEvent>) {
        rest.append(&mut self.held);
        self.held = rest;
    }

    /// Forgets what was held: not recorded, so not lost; fetched again from the cursor
    /// by the next catch-up or connection.
    pub(super) fn drop_held(&mut self) {
        self.held.clear();
    }

    /// The connection of `generation` starts a catch-up on its `connected`.
    pub(super) fn catch_up_on_connected(&mut self, generation: Option<u64>) {
        self.catch_up = generation;
    }

    /// True (once) when `connected` of `generation` must start a catch-up.
    pub(super) fn take_catch_up(&mut self, generation: u64) -> bool {
        self.catch_up.take() == Some(generation)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn pong() -> ServerEvent {
        ServerEvent::Pong {
            server_time: chrono::Utc::now(),
        }
    }

    #[test]
    fn deliveries_wait_while_a_slot_is_out_and_go_in_order() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut gate = Gate::new(tx);
        assert!(gate.hold(pong()).is_some(), "open: nothing waits");
        let slot = gate.slot();
        assert!(gate.hold(pong()).is_none());
        assert!(gate.hold(pong()).is_none());
        assert!(gate.open().is_empty(), "shut: nothing goes");
        gate.release(slot);
        assert_eq!(gate.open().len(), 2);
        assert!(gate.open().is_empty());
    }

    #[test]
    fn a_slot_dropped_without_release_opens_the_gate_and_says_so() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut gate = Gate::new(tx);
        let slot = gate.slot();
        assert!(gate.hold(pong()).is_none());
        // An aborted task drops its slot on another thread.
        std::thread::spawn(move || drop(slot)).join().unwrap();
        assert!(!gate.is_shut());
        // Until the supervisor lets the held one go, a new delivery waits behind it.
        assert!(
            gate.hold(pong()).is_none(),
            "it would overtake the held one"
        );
        assert!(matches!(rx.try_recv(), Ok(Io::SlotDropped)));
        assert_eq!(gate.open().len(), 2);
        assert!(gate.hold(pong()).is_some(), "open and empty: goes at once");
        // A released slot says nothing.
        let slot = gate.slot();
        gate.release(slot);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn what_could_not_go_waits_again_first() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut gate = Gate::new(tx);
        let first = gate.slot();
        let _ = gate.hold(pong());
        gate.release(first);
        let taken = gate.open();
        let again = gate.slot();
        let _ = gate.hold(pong());
        gate.hold_again(taken);
        assert_eq!(gate.held.len(), 2);
        gate.drop_held();
        gate.release(again);
        assert!(gate.open().is_empty());
    }

    #[test]
    fn too_many_held_deliveries_overflow() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut gate = Gate::with_limit(tx, 2);
        let slot = gate.slot();
        for _ in 0..2 {
            assert!(gate.hold(pong()).is_none());
            assert!(!gate.overflowing());
        }
        assert!(gate.hold(pong()).is_none());
        assert!(gate.overflowing());
        gate.drop_held();
        assert!(!gate.overflowing());
        gate.release(slot);
    }

    #[test]
    fn a_catch_up_starts_once_and_only_for_its_connection() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut gate = Gate::new(tx);
        gate.catch_up_on_connected(Some(3));
        assert!(!gate.take_catch_up(2), "another connection");
        gate.catch_up_on_connected(Some(3));
        assert!(gate.take_catch_up(3));
        assert!(!gate.take_catch_up(3), "once");
    }
}
