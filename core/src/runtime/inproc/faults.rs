//! The network's fault model: loss, delay and partitions per directed link, decided per frame
//! from draws the network makes, so that the fate of every frame follows from the seed.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::identity::Address;

/// A fault setting that was refused; the previous setting stays in force.
///
/// Invalid values are rejected rather than clamped, so a typo in a test fails loudly.
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FaultError {
    /// A drop probability outside `0.0..=1.0`, or NaN.
    #[error("drop probability {0} is not within 0.0..=1.0")]
    InvalidProbability(f64),
    /// A delay range whose minimum exceeds its maximum.
    #[error("delay range is inverted: min {min:?} exceeds max {max:?}")]
    InvalidDelayRange {
        /// The minimum given.
        min: Duration,
        /// The maximum given.
        max: Duration,
    },
}

/// Counters of what happened to frames, for the whole network. See [`InProcessNetwork::stats`](super::InProcessNetwork::stats).
///
/// Every frame counted in [`sent`](Self::sent) ends in exactly one of the other counters, so
/// `sent == delivered + dropped() + in_flight()` at every snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct NetworkStats {
    /// Frames that entered the network: passed the sender's checks (open, size, destination
    /// bound), whatever became of them afterwards.
    pub sent: u64,
    /// Frames placed in a receiver's queue.
    pub delivered: u64,
    /// Frames dropped by a drop probability.
    pub dropped_loss: u64,
    /// Frames dropped by a partition or one-way block.
    pub dropped_partition: u64,
    /// Frames refused because the receiver's queue was full (immediately, as
    /// [`TransportError::QueueFull`](crate::transport::TransportError::QueueFull), or silently at delayed delivery).
    pub dropped_queue_full: u64,
    /// Delayed frames whose receiver had closed or been dropped by the time they arrived.
    pub dropped_unbound: u64,
}

impl NetworkStats {
    /// All dropped frames, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.dropped_loss + self.dropped_partition + self.dropped_queue_full + self.dropped_unbound
    }

    /// Frames sent but not yet delivered or dropped: delayed frames still on their way (or
    /// whose delivery task died with its Tokio runtime).
    pub fn in_flight(&self) -> u64 {
        self.sent
            .saturating_sub(self.delivered)
            .saturating_sub(self.dropped())
    }
}

/// A directed link: (from, to).
pub(super) type Link = (Address, Address);

/// An inclusive-exclusive delay range `[min, max)`; `min == max` means exactly `min`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct DelayRange {
    min: Duration,
    max: Duration,
}

impl DelayRange {
    pub(super) fn new(min: Duration, max: Duration) -> Result<Self, FaultError> {
        if min > max {
            return Err(FaultError::InvalidDelayRange { min, max });
        }
        Ok(DelayRange { min, max })
    }

    /// Maps a uniform 64-bit draw onto the range without floating point, so no input can
    /// overflow: the span is capped at `u64::MAX` nanoseconds (about 584 years).
    pub(super) fn pick(&self, draw: u64) -> Duration {
        let span = self.max.saturating_sub(self.min);
        let span_nanos = u64::try_from(span.as_nanos()).unwrap_or(u64::MAX);
        let offset = (u128::from(span_nanos) * u128::from(draw)) >> 64;
        let offset = u64::try_from(offset).unwrap_or(u64::MAX);
        self.min
            .checked_add(Duration::from_nanos(offset))
            .unwrap_or(self.max)
    }
}

pub(super) fn check_probability(p: f64) -> Result<f64, FaultError> {
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(FaultError::InvalidProbability(p))
    }
}

/// The fault settings in force.
#[derive(Debug, Default)]
pub(super) struct Faults {
    pub(super) drop_probability: f64,
    pub(super) delay: DelayRange,
    pub(super) link_drop_probability: HashMap<Link, f64>,
    pub(super) link_delay: HashMap<Link, DelayRange>,
    pub(super) blocked: HashSet<Link>,
}

/// What the network decided for one frame.
pub(super) enum Fate {
    Partitioned,
    Lost,
    Deliver(Duration),
}

impl Faults {
    pub(super) fn decide(&self, link: &Link, loss_draw: f64, delay_draw: u64) -> Fate {
        if self.blocked.contains(link) {
            return Fate::Partitioned;
        }
        let p = self
            .link_drop_probability
            .get(link)
            .copied()
            .unwrap_or(self.drop_probability);
        // `loss_draw` is uniform in [0, 1): p = 0 never drops, p = 1 always does.
        if loss_draw < p {
            return Fate::Lost;
        }
        let delay = self.link_delay.get(link).unwrap_or(&self.delay);
        Fate::Deliver(delay.pick(delay_draw))
    }
}
