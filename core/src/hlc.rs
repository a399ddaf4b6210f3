//! Hybrid logical clocks and record versions.
//!
//! A [`Timestamp`] packs a 48-bit physical part (milliseconds since the Unix epoch) and a 16-bit
//! logical counter into one `u64`, so timestamps compare, hash and encode as plain integers.
//! A [`Version`] adds the writer's [`NodeId`] as a tie-break, which makes versions a total
//! order: every replica that sees the same set of versions picks the same winner.
//!
//! # Guarantees of [`Hlc`]
//!
//! - [`Hlc::now`] is strictly increasing for one clock, even when the wall clock jumps back.
//! - [`Hlc::observe`] moves the clock past a remote timestamp, so anything issued afterwards
//!   dominates both the local history and what was observed.
//! - A remote timestamp more than [`Hlc::max_drift`] ahead of the local wall clock is rejected
//!   with [`ClockError::TooFarAhead`] and leaves the clock unchanged: one node with a broken clock
//!   cannot drag the cluster's versions into the future by more than that bound.
//! - **Logical overflow.** When the 16-bit logical counter is exhausted within one millisecond the
//!   increment carries into the physical part, i.e. the clock borrows one millisecond from the
//!   future. It never wraps. The carry is bounded by the rate of events: 65,536 timestamps per
//!   millisecond before the clock runs ahead of wall time at all.
//! - At the end of the representable range (physical part `2^48 - 1` ms, the year 10889) the
//!   clock saturates instead of wrapping.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::identity::NodeId;

/// Number of bits used by the logical counter inside a [`Timestamp`].
pub const LOGICAL_BITS: u32 = 16;
/// Largest physical value (milliseconds since the Unix epoch) a [`Timestamp`] can hold.
pub const MAX_PHYSICAL_MS: u64 = (1 << (64 - LOGICAL_BITS)) - 1;
/// Default maximum accepted drift of a remote timestamp ahead of the local wall clock.
pub const DEFAULT_MAX_DRIFT: Duration = Duration::from_millis(500);

const LOGICAL_MASK: u64 = (1 << LOGICAL_BITS) - 1;

/// A hybrid logical clock reading: 48 bits of milliseconds, 16 bits of logical counter.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The smallest timestamp.
    pub const ZERO: Timestamp = Timestamp(0);
    /// The largest timestamp.
    pub const MAX: Timestamp = Timestamp(u64::MAX);

    /// Builds a timestamp from its parts; `physical_ms` is clamped to [`MAX_PHYSICAL_MS`].
    pub const fn new(physical_ms: u64, logical: u16) -> Self {
        let physical = if physical_ms > MAX_PHYSICAL_MS {
            MAX_PHYSICAL_MS
        } else {
            physical_ms
        };
        Timestamp((physical << LOGICAL_BITS) | logical as u64)
    }

    /// Reinterprets a packed value (as produced by [`Timestamp::as_u64`]).
    pub const fn from_u64(raw: u64) -> Self {
        Timestamp(raw)
    }

    /// The packed representation; ordering of packed values equals ordering of timestamps.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Milliseconds since the Unix epoch.
    pub const fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    /// The logical counter.
    pub const fn logical(self) -> u16 {
        (self.0 & LOGICAL_MASK) as u16
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({}ms+{})", self.physical_ms(), self.logical())
    }
}

/// The version of a record: HLC timestamp, then the writer's node id as tie-break.
///
/// The derived ordering compares `timestamp` first and `node` second, which is a total order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Version {
    /// When the write was issued, on the writer's hybrid logical clock.
    pub timestamp: Timestamp,
    /// Who issued it.
    pub node: NodeId,
}

impl Version {
    /// A version from its parts.
    pub const fn new(timestamp: Timestamp, node: NodeId) -> Self {
        Version { timestamp, node }
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Version({:?}@{})", self.timestamp, self.node)
    }
}

/// A source of wall-clock time in milliseconds since the Unix epoch.
///
/// Injected into [`Hlc`] so tests control time; the wall clock may jump in either direction.
pub trait WallClock: Send + Sync + fmt::Debug {
    /// Current wall time in milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The operating system's real-time clock, read at full resolution.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_ms(&self) -> u64 {
        // A clock set before 1970 reads as the epoch; the HLC stays monotonic regardless.
        // u64 arithmetic: `Duration::as_millis` divides in u128.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| {
                d.as_secs()
                    .saturating_mul(1000)
                    .saturating_add(u64::from(d.subsec_millis()))
            })
            .unwrap_or(0)
    }
}

/// The operating system's real-time clock at kernel-tick resolution; what [`Hlc::system`] uses.
///
/// On Linux this reads `CLOCK_REALTIME_COARSE`, which the vDSO serves from memory without
/// touching the hardware clock: several times cheaper than [`SystemClock`] (see
/// docs/BENCHMARKS.md) at a resolution of one kernel tick (1 to 10 ms depending on the kernel's
/// `CONFIG_HZ`; 4 ms on the benchmark machine). The HLC's logical counter orders events within a
/// tick, so the coarser reading only widens the gap between version timestamps and true time by
/// at most one tick. If the kernel refuses the coarse clock, and on other systems, it reads
/// [`SystemClock`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CoarseSystemClock;

impl WallClock for CoarseSystemClock {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn now_ms(&self) -> u64 {
        use rustix::time::{ClockId, DynamicClockId, clock_gettime_dynamic};
        // The fallible form: a kernel without the coarse clock gets the precise one instead
        // of a panic (`rustix::time::clock_gettime` asserts success).
        match clock_gettime_dynamic(DynamicClockId::Known(ClockId::RealtimeCoarse)) {
            Ok(t) => {
                // Before 1970 reads as the epoch, like `SystemClock`.
                let secs = u64::try_from(t.tv_sec).unwrap_or(0);
                let millis = u64::try_from(t.tv_nsec).unwrap_or(0) / 1_000_000;
                secs.saturating_mul(1000).saturating_add(millis)
            }
            Err(_) => SystemClock.now_ms(),
        }
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn now_ms(&self) -> u64 {
        SystemClock.now_ms()
    }
}

/// A wall clock that only moves when told to; for tests and simulations.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A manual clock reading `ms`.
    pub fn new(ms: u64) -> Self {
        ManualClock(Arc::new(AtomicU64::new(ms)))
    }

    /// Sets the reading (backwards jumps allowed).
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::Relaxed);
    }

    /// Moves the reading forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.0.fetch_add(by, Ordering::Relaxed);
    }
}

impl WallClock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl<C: WallClock + ?Sized> WallClock for Arc<C> {
    fn now_ms(&self) -> u64 {
        (**self).now_ms()
    }
}

/// Why a remote timestamp was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClockError {
    /// The remote timestamp is further ahead of the local wall clock than allowed.
    #[error(
        "remote timestamp {remote:?} is {ahead:?} ahead of the local wall clock ({local_ms} ms), \
         more than the allowed {max_drift:?}"
    )]
    TooFarAhead {
        /// The rejected timestamp.
        remote: Timestamp,
        /// The local wall clock when it was rejected.
        local_ms: u64,
        /// How far ahead it was.
        ahead: Duration,
        /// The configured bound.
        max_drift: Duration,
    },
}

/// A hybrid logical clock; lock-free and safe to share between threads.
///
/// See the [module documentation](self) for its guarantees.
#[derive(Debug)]
pub struct Hlc<C: WallClock = CoarseSystemClock> {
    wall: C,
    last: AtomicU64,
    max_drift_ms: u64,
}

impl Hlc<CoarseSystemClock> {
    /// A clock on the operating system's wall clock (tick resolution) with the default
    /// maximum drift.
    pub fn system() -> Self {
        Hlc::new(CoarseSystemClock, DEFAULT_MAX_DRIFT)
    }
}

impl<C: WallClock> Hlc<C> {
    /// A clock reading `wall`, rejecting remote timestamps more than `max_drift` ahead.
    pub fn new(wall: C, max_drift: Duration) -> Self {
        Hlc {
            wall,
            last: AtomicU64::new(0),
            max_drift_ms: u64::try_from(max_drift.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// A clock that will never issue a timestamp at or below `floor`.
    ///
    /// A node that restarts while its wall clock reads earlier than before (clock stepped back,
    /// or a fast restart within the same millisecond) could otherwise issue a version it already
    /// used for a different write. Persist [`Hlc::last`] (or a value above it) and pass it here.
    pub fn with_floor(wall: C, max_drift: Duration, floor: Timestamp) -> Self {
        let hlc = Hlc::new(wall, max_drift);
        hlc.last.store(floor.0, Ordering::Release);
        hlc
    }

    /// The configured maximum drift.
    pub fn max_drift(&self) -> Duration {
        Duration::from_millis(self.max_drift_ms)
    }

    /// The wall clock this HLC reads.
    pub fn wall_clock(&self) -> &C {
        &self.wall
    }

    /// The last timestamp issued or observed, without advancing the clock.
    pub fn last(&self) -> Timestamp {
        Timestamp(self.last.load(Ordering::Acquire))
    }

    /// Issues a timestamp greater than every timestamp issued or observed before.
    pub fn now(&self) -> Timestamp {
        let wall = Timestamp::new(self.wall.now_ms(), 0).0;
        let mut last = self.last.load(Ordering::Acquire);
        loop {
            // Carrying the logical overflow into the physical part is what `+ 1` on the
            // packed value does; saturation only happens in the year 10889.
            let next = wall.max(last.saturating_add(1));
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Timestamp(next),
                Err(current) => last = current,
            }
        }
    }

    /// Merges a timestamp received from another node and returns a local timestamp above both.
    ///
    /// A timestamp more than [`Hlc::max_drift`] ahead of the local wall clock is rejected and the
    /// clock is left unchanged.
    pub fn observe(&self, remote: Timestamp) -> Result<Timestamp, ClockError> {
        let wall_ms = self.wall.now_ms();
        let limit_ms = wall_ms.saturating_add(self.max_drift_ms);
        if remote.physical_ms() > limit_ms {
            return Err(ClockError::TooFarAhead {
                remote,
                local_ms: wall_ms,
                ahead: Duration::from_millis(remote.physical_ms() - wall_ms),
                max_drift: self.max_drift(),
            });
        }
        let wall = Timestamp::new(wall_ms, 0).0;
        let mut last = self.last.load(Ordering::Acquire);
        loop {
            let next = wall.max(last.max(remote.0).saturating_add(1));
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(Timestamp(next)),
                Err(current) => last = current,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn clock(ms: u64) -> (ManualClock, Hlc<ManualClock>) {
        let wall = ManualClock::new(ms);
        (wall.clone(), Hlc::new(wall, DEFAULT_MAX_DRIFT))
    }

    #[test]
    fn now_follows_wall_clock_and_never_goes_back() {
        let (wall, hlc) = clock(1_000);
        let a = hlc.now();
        assert_eq!(a, Timestamp::new(1_000, 0));
        let b = hlc.now();
        assert_eq!(b, Timestamp::new(1_000, 1));
        wall.set(500); // wall clock jumps backwards
        let c = hlc.now();
        assert!(c > b);
        assert_eq!(c.physical_ms(), 1_000);
        wall.set(2_000);
        assert_eq!(hlc.now(), Timestamp::new(2_000, 0));
    }

    #[test]
    fn observe_dominates_local_and_remote() {
        let (_wall, hlc) = clock(1_000);
        let local = hlc.now();
        let remote = Timestamp::new(1_400, 7);
        let merged = hlc.observe(remote).expect("within drift");
        assert!(merged > local && merged > remote);
        assert!(hlc.now() > merged);
    }

    #[test]
    fn remote_too_far_ahead_is_rejected_and_clock_unchanged() {
        let (_wall, hlc) = clock(1_000);
        let before = hlc.now();
        let err = hlc.observe(Timestamp::new(1_501, 0)).unwrap_err();
        assert!(
            matches!(
                err,
                ClockError::TooFarAhead {
                    local_ms: 1_000,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(hlc.last(), before);
        // Exactly at the bound is accepted.
        assert!(hlc.observe(Timestamp::new(1_500, 0)).is_ok());
    }

    #[test]
    fn logical_overflow_carries_into_physical() {
        let (_wall, hlc) = clock(10);
        let top = hlc
            .observe(Timestamp::new(10, u16::MAX))
            .expect("within drift");
        // observe adds one, so it already carried.
        assert_eq!(top, Timestamp::new(11, 0));
        let next = hlc.now();
        assert_eq!(next, Timestamp::new(11, 1));
    }

    #[test]
    fn saturates_at_end_of_range_instead_of_wrapping() {
        let wall = ManualClock::new(u64::MAX);
        let hlc = Hlc::new(wall, DEFAULT_MAX_DRIFT);
        hlc.observe(Timestamp::MAX)
            .expect("at the clamp, not ahead");
        assert_eq!(hlc.now(), Timestamp::MAX);
        assert_eq!(hlc.now(), Timestamp::MAX);
    }

    #[test]
    fn coarse_and_precise_system_clocks_agree() {
        // Bracketing the coarse read between two precise reads makes the bound independent of
        // how long this thread is descheduled: the coarse clock lags by at most one tick
        // (10 ms at CONFIG_HZ=100) and never leads.
        let before = SystemClock.now_ms();
        let coarse = CoarseSystemClock.now_ms();
        let after = SystemClock.now_ms();
        assert!(
            coarse + 10 >= before,
            "coarse {coarse} ms lags precise {before} ms by more than a tick"
        );
        assert!(
            coarse <= after,
            "coarse {coarse} ms leads precise {after} ms"
        );
    }

    #[test]
    fn floor_prevents_reissuing_versions_after_restart() {
        let (wall, first) = clock(5_000);
        let issued = (0..3).map(|_| first.now()).last().expect("issued");
        // Restart with the wall clock stepped back by a second.
        wall.set(4_000);
        let restarted = Hlc::with_floor(wall.clone(), DEFAULT_MAX_DRIFT, issued);
        assert!(restarted.now() > issued);
    }

    #[test]
    fn concurrent_now_is_unique() {
        let hlc = Arc::new(Hlc::new(ManualClock::new(5), DEFAULT_MAX_DRIFT));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let hlc = hlc.clone();
                std::thread::spawn(move || (0..10_000).map(|_| hlc.now()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<Timestamp> = threads
            .into_iter()
            .flat_map(|t| t.join().expect("thread"))
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "every timestamp issued once");
    }

    proptest! {
        // Arbitrary interleavings of wall-clock moves, local events and remote observations.
        #[test]
        fn monotonic_under_arbitrary_inputs(ops in proptest::collection::vec((0u8..3, 0u64..5_000, any::<u16>()), 1..200)) {
            let (wall, hlc) = clock(2_000);
            let mut prev = Timestamp::ZERO;
            for (op, ms, logical) in ops {
                match op {
                    0 => wall.set(ms),
                    1 => {
                        let t = hlc.now();
                        prop_assert!(t > prev);
                        prev = t;
                    }
                    _ => {
                        let remote = Timestamp::new(ms, logical);
                        let before = hlc.last();
                        match hlc.observe(remote) {
                            Ok(t) => {
                                prop_assert!(t > prev && t > remote);
                                prev = t;
                            }
                            Err(_) => prop_assert_eq!(hlc.last(), before),
                        }
                    }
                }
            }
        }
    }
}
