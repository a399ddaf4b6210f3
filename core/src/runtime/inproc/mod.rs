//! An in-process transport with seeded fault injection, for running whole clusters in one test.
//!
//! An [`InProcessNetwork`] is a switchboard of named endpoints. [`InProcessNetwork::bind`] gives
//! an [`InProcessTransport`] (a [`Transport`]) for an address; frames sent to that address land
//! in its bounded receive queue. Dropping or [closing](Transport::close) a transport releases its
//! address, so a node can "crash" and be bound again under the same name.
//!
//! Between sender and receiver the network applies faults, all changeable at run time through
//! any clone of the network handle:
//!
//! - **loss**: a global drop probability ([`InProcessNetwork::set_drop_probability`]) and
//!   per-directed-link overrides ([`InProcessNetwork::set_link_drop_probability`]);
//! - **delay**: a global uniform delay range ([`InProcessNetwork::set_delay`]) and
//!   per-directed-link overrides ([`InProcessNetwork::set_link_delay`]); delayed frames are
//!   delivered by a Tokio task sleeping on [`tokio::time::sleep`], so a paused test clock
//!   (`#[tokio::test(start_paused = true)]`) drives them without real waiting, and frames with
//!   different delays may overtake each other, as on a real network;
//! - **partitions**: [`InProcessNetwork::partition`] cuts both directions between two groups,
//!   [`InProcessNetwork::block`] cuts one direction, [`InProcessNetwork::unblock`] and
//!   [`InProcessNetwork::heal`] restore them, [`InProcessNetwork::clear_faults`] resets
//!   everything.
//!
//! Lost and partitioned frames vanish silently (`send` returns `Ok`), as they would on a real
//! network, but every outcome is counted in [`InProcessNetwork::stats`].
//!
//! # What `send` does
//!
//! In this order: a closed sender fails with [`TransportError::Closed`]; a frame longer than
//! [`Transport::max_frame_len`] fails with [`TransportError::FrameTooLarge`]; a destination with
//! nothing bound fails with [`TransportError::Unreachable`]. Otherwise the frame *enters the
//! network* (counted as [`NetworkStats::sent`]) and its fate is decided on the spot: dropped by
//! a partition or block, else dropped by loss, else delivered after the drawn delay. A frame
//! without delay goes straight into the receiver's queue, and a full queue fails the send with
//! [`TransportError::QueueFull`]. A delayed frame is delivered later; if by then the receiver's
//! queue is full or the receiver has closed or been dropped (even if the address was bound again
//! since: frames in flight to a crashed node die with it), it is dropped and counted. Decisions
//! are final when `send` returns: healing a partition does not resurrect frames, and starting
//! one does not catch frames already in flight. Outside a Tokio runtime a frame that drew a
//! non-zero delay fails with [`TransportError::Io`], as nothing could deliver it later.
//!
//! Tokio's timer counts whole milliseconds, so delays are in effect rounded up to the next
//! millisecond, and frames due in the same millisecond arrive in no promised order.
//!
//! # Determinism
//!
//! All randomness comes from one [`ChaCha8Rng`] seeded with [`InProcessNetwork::new`]'s seed,
//! behind the network's lock. Every send that enters the network takes exactly two draws from
//! it, one for loss and one for delay, whatever the faults currently are (sends refused by the
//! sender's checks take none; a delayed send refused for want of a Tokio runtime has already
//! taken its two). So the fate of the *k*-th frame to enter the network (partitioned,
//! lost, or delivered after delay *d*) is a deterministic function of the seed, *k*, and the
//! fault settings at that moment: the same seed with the same sequence of `send` calls gives
//! the same decisions, and changing a fault setting never shifts the random stream.
//!
//! What is *not* determined here: the order in which concurrently running tasks call `send`
//! (which fixes *k*), the order in which delayed frames with equal delivery times are delivered,
//! and everything that depends on how fast receivers drain their queues (`QueueFull`, and
//! whether a delayed frame still finds its receiver). Those are up to the Tokio scheduler; a
//! current-thread runtime with a paused clock usually makes them reproducible too, but this
//! module does not promise it.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use chorus_core::runtime::inproc::InProcessNetwork;
//! use chorus_core::identity::Address;
//! use chorus_core::transport::Transport;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let net = InProcessNetwork::new(42);
//! let a = net.bind("a")?;
//! let b = net.bind("b")?;
//!
//! net.set_delay(Duration::from_millis(1), Duration::from_millis(3))?;
//! a.send(&b.local_addr(), Bytes::from_static(b"hello")).await?;
//! let got = b.recv().await?;
//! assert_eq!(got.from, Address::new("a"));
//! assert_eq!(got.frame, Bytes::from_static(b"hello"));
//!
//! // Cut a -> b; the send still "succeeds", the frame is silently lost.
//! net.block(&a.local_addr(), &b.local_addr());
//! a.send(&b.local_addr(), Bytes::from_static(b"lost")).await?;
//! assert_eq!(net.stats().dropped_partition, 1);
//! net.heal();
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::sync::{mpsc, watch};

use crate::identity::Address;
#[cfg(doc)]
use crate::transport::Transport;
use crate::transport::{Incoming, TransportError};
use crate::wire::{DEFAULT_MAX_FRAME_LEN, MAX_FRAME_LEN_CEILING};

mod faults;
#[cfg(test)]
mod tests;
mod transport;

pub use faults::{FaultError, NetworkStats};
pub use transport::InProcessTransport;

use faults::{DelayRange, Faults, check_probability};

/// Default capacity of each endpoint's receive queue, in frames.
pub const DEFAULT_QUEUE_CAPACITY: NonZeroUsize = match NonZeroUsize::new(1024) {
    Some(n) => n,
    None => NonZeroUsize::MIN,
};

/// Settings shared by every endpoint of an [`InProcessNetwork`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct InProcessConfig {
    /// Frames each endpoint's receive queue holds; a send finding it full fails with
    /// [`TransportError::QueueFull`]. Capped at [`tokio::sync::Semaphore::MAX_PERMITS`].
    pub queue_capacity: NonZeroUsize,
    /// Largest frame, length prefix included, a transport sends. Capped at
    /// [`MAX_FRAME_LEN_CEILING`].
    pub max_frame_len: usize,
}

impl Default for InProcessConfig {
    /// [`DEFAULT_QUEUE_CAPACITY`] frames and [`DEFAULT_MAX_FRAME_LEN`] bytes.
    fn default() -> Self {
        InProcessConfig {
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
        }
    }
}

impl InProcessConfig {
    /// This configuration with another queue capacity.
    pub fn with_queue_capacity(mut self, queue_capacity: NonZeroUsize) -> Self {
        self.queue_capacity = queue_capacity;
        self
    }

    /// This configuration with another maximum frame length.
    pub fn with_max_frame_len(mut self, max_frame_len: usize) -> Self {
        self.max_frame_len = max_frame_len;
        self
    }

    fn effective_capacity(&self) -> usize {
        self.queue_capacity
            .get()
            .min(tokio::sync::Semaphore::MAX_PERMITS)
    }

    fn effective_max_frame_len(&self) -> usize {
        self.max_frame_len.min(MAX_FRAME_LEN_CEILING)
    }
}

/// A bound address: the sending half of its queue, and which binding it is.
#[derive(Debug)]
pub(super) struct Endpoint {
    id: u64,
    tx: mpsc::Sender<Incoming>,
}

/// Everything behind the network's one lock.
#[derive(Debug)]
pub(super) struct State {
    rng: ChaCha8Rng,
    endpoints: HashMap<Address, Endpoint>,
    next_endpoint_id: u64,
    faults: Faults,
    stats: NetworkStats,
}

#[derive(Debug)]
pub(super) struct Shared {
    seed: u64,
    config: InProcessConfig,
    state: Mutex<State>,
}

impl Shared {
    /// Locks the state. Poisoning is ignored: no code holding the lock can panic midway through
    /// an update, so the state is consistent even if a panic elsewhere poisoned the mutex.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Releases `addr` if it is still held by binding `id`.
    pub(super) fn unbind(&self, addr: &Address, id: u64) {
        let mut state = self.lock();
        if state.endpoints.get(addr).is_some_and(|e| e.id == id) {
            state.endpoints.remove(addr);
        }
    }
}

/// A simulated network of in-process endpoints. Cheap to clone; clones share everything.
/// See the [module documentation](self).
#[derive(Clone)]
pub struct InProcessNetwork {
    shared: Arc<Shared>,
}

impl fmt::Debug for InProcessNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("InProcessNetwork")
            .field("seed", &self.shared.seed)
            .field("config", &self.shared.config)
            .field("bound", &state.endpoints.len())
            .field("stats", &state.stats)
            .finish_non_exhaustive()
    }
}

impl InProcessNetwork {
    /// A network without faults, with the default [`InProcessConfig`], whose random decisions
    /// derive from `seed`.
    pub fn new(seed: u64) -> Self {
        Self::with_config(seed, InProcessConfig::default())
    }

    /// A network without faults with the given configuration.
    pub fn with_config(seed: u64, config: InProcessConfig) -> Self {
        let state = State {
            rng: ChaCha8Rng::seed_from_u64(seed),
            endpoints: HashMap::new(),
            next_endpoint_id: 0,
            faults: Faults::default(),
            stats: NetworkStats::default(),
        };
        InProcessNetwork {
            shared: Arc::new(Shared {
                seed,
                config,
                state: Mutex::new(state),
            }),
        }
    }

    /// The seed the network was created with, for reproducing a failing run.
    pub fn seed(&self) -> u64 {
        self.shared.seed
    }

    /// The configuration the network was created with.
    pub fn config(&self) -> InProcessConfig {
        self.shared.config
    }

    /// Binds `addr`, failing with [`TransportError::AddressInUse`] if a live transport holds
    /// it. The address is released when the transport is closed or dropped.
    pub fn bind(&self, addr: impl Into<Address>) -> Result<InProcessTransport, TransportError> {
        let addr = addr.into();
        let config = self.shared.config;
        let mut state = self.shared.lock();
        if state.endpoints.contains_key(&addr) {
            return Err(TransportError::AddressInUse(addr));
        }
        let id = state.next_endpoint_id;
        state.next_endpoint_id += 1;
        let (tx, rx) = mpsc::channel(config.effective_capacity());
        state.endpoints.insert(addr.clone(), Endpoint { id, tx });
        drop(state);
        let (closed, _) = watch::channel(false);
        Ok(InProcessTransport {
            shared: Arc::clone(&self.shared),
            addr,
            id,
            max_frame_len: config.effective_max_frame_len(),
            rx: tokio::sync::Mutex::new(rx),
            closed,
        })
    }

    /// Whether a live transport is bound at `addr`.
    pub fn is_bound(&self, addr: &Address) -> bool {
        self.shared.lock().endpoints.contains_key(addr)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> NetworkStats {
        self.shared.lock().stats
    }

    /// Sets the probability, in `0.0..=1.0`, that a frame on a link without its own setting is
    /// lost. Out of range or NaN is refused with [`FaultError::InvalidProbability`].
    pub fn set_drop_probability(&self, p: f64) -> Result<(), FaultError> {
        let p = check_probability(p)?;
        self.shared.lock().faults.drop_probability = p;
        Ok(())
    }

    /// Sets the loss probability of the directed link `from -> to`, overriding the global one
    /// for that link (so `0.0` makes one link reliable in a lossy network). Out of range or NaN
    /// is refused with [`FaultError::InvalidProbability`].
    pub fn set_link_drop_probability(
        &self,
        from: &Address,
        to: &Address,
        p: f64,
    ) -> Result<(), FaultError> {
        let p = check_probability(p)?;
        self.shared
            .lock()
            .faults
            .link_drop_probability
            .insert((from.clone(), to.clone()), p);
        Ok(())
    }

    /// Sets the delay of frames on links without their own setting: uniform in `[min, max)`, or
    /// exactly `min` when `min == max`. `Duration::ZERO` for both (the default) delivers
    /// immediately. `min > max` is refused with [`FaultError::InvalidDelayRange`].
    pub fn set_delay(&self, min: Duration, max: Duration) -> Result<(), FaultError> {
        let range = DelayRange::new(min, max)?;
        self.shared.lock().faults.delay = range;
        Ok(())
    }

    /// Sets the delay of the directed link `from -> to`, overriding the global one for that
    /// link; otherwise as [`set_delay`](Self::set_delay).
    pub fn set_link_delay(
        &self,
        from: &Address,
        to: &Address,
        min: Duration,
        max: Duration,
    ) -> Result<(), FaultError> {
        let range = DelayRange::new(min, max)?;
        self.shared
            .lock()
            .faults
            .link_delay
            .insert((from.clone(), to.clone()), range);
        Ok(())
    }

    /// Removes the link-specific loss and delay settings of `from -> to`, so the global ones
    /// apply again. Blocks are not affected.
    pub fn clear_link_faults(&self, from: &Address, to: &Address) {
        let link = (from.clone(), to.clone());
        let mut state = self.shared.lock();
        state.faults.link_drop_probability.remove(&link);
        state.faults.link_delay.remove(&link);
    }

    /// Cuts both directions between every address in `side_a` and every address in `side_b`
    /// (an address on both sides keeps talking to itself). Adds to existing blocks.
    pub fn partition(&self, side_a: &[Address], side_b: &[Address]) {
        let mut state = self.shared.lock();
        for a in side_a {
            for b in side_b.iter().filter(|b| *b != a) {
                state.faults.blocked.insert((a.clone(), b.clone()));
                state.faults.blocked.insert((b.clone(), a.clone()));
            }
        }
    }

    /// Cuts the directed link `from -> to`; `to -> from` is unaffected.
    pub fn block(&self, from: &Address, to: &Address) {
        self.shared
            .lock()
            .faults
            .blocked
            .insert((from.clone(), to.clone()));
    }

    /// Restores the directed link `from -> to`.
    pub fn unblock(&self, from: &Address, to: &Address) {
        self.shared
            .lock()
            .faults
            .blocked
            .remove(&(from.clone(), to.clone()));
    }

    /// Whether the directed link `from -> to` is cut.
    pub fn is_blocked(&self, from: &Address, to: &Address) -> bool {
        self.shared
            .lock()
            .faults
            .blocked
            .contains(&(from.clone(), to.clone()))
    }

    /// Removes every partition and block. Loss and delay settings stay.
    pub fn heal(&self) {
        self.shared.lock().faults.blocked.clear();
    }

    /// Removes every fault: partitions, blocks, loss and delay, global and per link. Neither
    /// the random stream nor the counters are reset.
    pub fn clear_faults(&self) {
        self.shared.lock().faults = Faults::default();
    }
}
