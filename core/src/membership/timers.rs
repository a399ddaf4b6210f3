//! The timer table: every deadline of a [`Membership`](super::Membership) in one place.
//!
//! `poll_timeout` is the table's [`Timers::next`] over the timers that can fire now, so a new
//! kind of deadline cannot be left out of it; which can fire is one exhaustive `match` in
//! `poll_timeout` (two are held back: the end of the protocol period while the direct ping's
//! ack deadline is pending, which always comes first, and a gossip round with nothing to
//! send). `handle_timeout` takes what is due from the same table.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use crate::identity::NodeId;

/// One deadline of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Timer {
    /// The direct ping of the current probe waits for its ack until then; then ping-reqs go
    /// out. Set only while that wait lasts.
    ProbeAck,
    /// The end of the protocol period: the current probe (if any) has failed and the next
    /// one starts.
    ProbePeriod,
    /// The next gossip round.
    Gossip,
    /// The next join attempt to the seeds. Set only until a seed answers.
    Join,
    /// The next periodic full-state exchange with a random member.
    PushPull,
    /// The next re-announcement to a seed not known alive or a member believed dead.
    Reannounce,
    /// A ping relayed for a ping-req with this (own) sequence number gets no ack after then.
    Relay(u32),
    /// The suspicion of this member runs out.
    Suspicion(NodeId),
    /// This dead or left member may be forgotten.
    Reap(NodeId),
}

/// Pending deadlines, earliest first.
#[derive(Debug, Default)]
pub(super) struct Timers {
    queue: BTreeSet<(Instant, Timer)>,
    /// The latest deadline of each timer in `queue`.
    latest: HashMap<Timer, Instant>,
}

impl Timers {
    /// Sets `timer` to `at`, replacing its deadline if it had one.
    pub(super) fn set(&mut self, timer: Timer, at: Instant) {
        if let Some(old) = self.latest.insert(timer, at) {
            self.queue.remove(&(old, timer));
        }
        self.queue.insert((at, timer));
    }

    /// Adds a deadline for `timer` and keeps the earlier ones: each fires on its own, and
    /// whoever handles it checks whether it still applies.
    pub(super) fn add(&mut self, timer: Timer, at: Instant) {
        self.queue.insert((at, timer));
        let latest = self.latest.entry(timer).or_insert(at);
        *latest = (*latest).max(at);
    }

    /// Removes `timer`'s (latest) deadline.
    pub(super) fn cancel(&mut self, timer: Timer) {
        if let Some(at) = self.latest.remove(&timer) {
            self.queue.remove(&(at, timer));
        }
    }

    /// `timer`'s (latest) deadline.
    pub(super) fn deadline(&self, timer: Timer) -> Option<Instant> {
        self.latest.get(&timer).copied()
    }

    /// Whether `timer` has a deadline at or before `now`.
    pub(super) fn is_due(&self, timer: Timer, now: Instant) -> bool {
        self.deadline(timer).is_some_and(|at| at <= now)
    }

    /// Removes `timer` if it is due; true if it was.
    pub(super) fn fire(&mut self, timer: Timer, now: Instant) -> bool {
        let due = self.is_due(timer, now);
        if due {
            self.cancel(timer);
        }
        due
    }

    /// Removes and returns the earliest deadline at or before `now` whose timer `pick` maps
    /// to `Some`, with what it mapped to.
    pub(super) fn pop_due<T>(
        &mut self,
        now: Instant,
        pick: impl Fn(Timer) -> Option<T>,
    ) -> Option<(Instant, T)> {
        let (at, timer, picked) = self
            .queue
            .iter()
            .take_while(|(at, _)| *at <= now)
            .find_map(|&(at, timer)| Some((at, timer, pick(timer)?)))?;
        self.queue.remove(&(at, timer));
        if self.latest.get(&timer) == Some(&at) {
            self.latest.remove(&timer);
        }
        Some((at, picked))
    }

    /// The earliest deadline among the timers `active` accepts.
    pub(super) fn next(&self, active: impl Fn(Timer) -> bool) -> Option<Instant> {
        self.queue
            .iter()
            .find(|(_, timer)| active(*timer))
            .map(|(at, _)| *at)
    }

    /// Every pending deadline, earliest first.
    pub(super) fn iter(&self) -> impl Iterator<Item = (Instant, Timer)> + '_ {
        self.queue.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn set_replaces_add_keeps_and_next_skips_inactive_timers() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut timers = Timers::default();
        timers.set(Timer::Gossip, at(10));
        timers.set(Timer::Gossip, at(30));
        timers.add(Timer::Reap(NodeId(2)), at(20));
        timers.add(Timer::Reap(NodeId(2)), at(40));
        assert_eq!(timers.next(|_| true), Some(at(20)));
        assert_eq!(timers.next(|t| t != Timer::Reap(NodeId(2))), Some(at(30)));
        assert_eq!(timers.deadline(Timer::Reap(NodeId(2))), Some(at(40)));

        let reap = |t| matches!(t, Timer::Reap(id) if id == NodeId(2)).then_some(());
        assert_eq!(timers.pop_due(at(35), reap), Some((at(20), ())));
        assert_eq!(timers.pop_due(at(35), reap), None);
        assert!(timers.fire(Timer::Gossip, at(35)));
        assert!(!timers.fire(Timer::Gossip, at(35)));
        assert_eq!(
            timers.iter().collect::<Vec<_>>(),
            [(at(40), Timer::Reap(NodeId(2)))]
        );
        timers.cancel(Timer::Reap(NodeId(2)));
        assert_eq!(timers.next(|_| true), None);
    }
}
