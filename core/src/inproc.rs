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
//! use chorus_core::inproc::InProcessNetwork;
//! use chorus_core::transport::{Address, Transport};
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

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::{mpsc, watch};

use crate::transport::{Address, Incoming, Transport, TransportError};
use crate::wire::{DEFAULT_MAX_FRAME_LEN, MAX_FRAME_LEN_CEILING};

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

/// Counters of what happened to frames, for the whole network. See [`InProcessNetwork::stats`].
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
    /// [`TransportError::QueueFull`], or silently at delayed delivery).
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
type Link = (Address, Address);

/// An inclusive-exclusive delay range `[min, max)`; `min == max` means exactly `min`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct DelayRange {
    min: Duration,
    max: Duration,
}

impl DelayRange {
    fn new(min: Duration, max: Duration) -> Result<Self, FaultError> {
        if min > max {
            return Err(FaultError::InvalidDelayRange { min, max });
        }
        Ok(DelayRange { min, max })
    }

    /// Maps a uniform 64-bit draw onto the range without floating point, so no input can
    /// overflow: the span is capped at `u64::MAX` nanoseconds (about 584 years).
    fn pick(&self, draw: u64) -> Duration {
        let span = self.max.saturating_sub(self.min);
        let span_nanos = u64::try_from(span.as_nanos()).unwrap_or(u64::MAX);
        let offset = (u128::from(span_nanos) * u128::from(draw)) >> 64;
        let offset = u64::try_from(offset).unwrap_or(u64::MAX);
        self.min
            .checked_add(Duration::from_nanos(offset))
            .unwrap_or(self.max)
    }
}

fn check_probability(p: f64) -> Result<f64, FaultError> {
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(FaultError::InvalidProbability(p))
    }
}

/// The fault settings in force.
#[derive(Debug, Default)]
struct Faults {
    drop_probability: f64,
    delay: DelayRange,
    link_drop_probability: HashMap<Link, f64>,
    link_delay: HashMap<Link, DelayRange>,
    blocked: HashSet<Link>,
}

/// What the network decided for one frame.
enum Fate {
    Partitioned,
    Lost,
    Deliver(Duration),
}

impl Faults {
    fn decide(&self, link: &Link, loss_draw: f64, delay_draw: u64) -> Fate {
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

/// A bound address: the sending half of its queue, and which binding it is.
#[derive(Debug)]
struct Endpoint {
    id: u64,
    tx: mpsc::Sender<Incoming>,
}

/// Everything behind the network's one lock.
#[derive(Debug)]
struct State {
    rng: ChaCha8Rng,
    endpoints: HashMap<Address, Endpoint>,
    next_endpoint_id: u64,
    faults: Faults,
    stats: NetworkStats,
}

#[derive(Debug)]
struct Shared {
    seed: u64,
    config: InProcessConfig,
    state: Mutex<State>,
}

impl Shared {
    /// Locks the state. Poisoning is ignored: no code holding the lock can panic midway through
    /// an update, so the state is consistent even if a panic elsewhere poisoned the mutex.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Releases `addr` if it is still held by binding `id`.
    fn unbind(&self, addr: &Address, id: u64) {
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

/// One endpoint of an [`InProcessNetwork`], bound by [`InProcessNetwork::bind`].
///
/// Closing it (or dropping it) releases its address at once. Frames already waiting in its
/// queue are discarded by [`close`](Transport::close), frames it sent earlier are unaffected.
pub struct InProcessTransport {
    shared: Arc<Shared>,
    addr: Address,
    /// Which binding of `addr` this is, so a stale transport never unbinds its successor.
    id: u64,
    max_frame_len: usize,
    rx: tokio::sync::Mutex<mpsc::Receiver<Incoming>>,
    /// `true` once closed; receivers waiting in `recv` watch it.
    closed: watch::Sender<bool>,
}

impl fmt::Debug for InProcessTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InProcessTransport")
            .field("addr", &self.addr)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl InProcessTransport {
    /// The network this transport belongs to.
    pub fn network(&self) -> InProcessNetwork {
        InProcessNetwork {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Whether [`close`](Transport::close) has been called.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// The whole of `send`; it never waits.
    fn send_now(&self, to: &Address, frame: Bytes) -> Result<(), TransportError> {
        if self.is_closed() {
            return Err(TransportError::Closed);
        }
        if frame.len() > self.max_frame_len {
            return Err(TransportError::FrameTooLarge {
                len: frame.len(),
                max: self.max_frame_len,
            });
        }
        let mut state = self.shared.lock();
        let Some(endpoint) = state.endpoints.get(to) else {
            let refused = std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "no in-process transport is bound there",
            );
            return Err(TransportError::unreachable(to, refused));
        };
        let (tx, to_id) = (endpoint.tx.clone(), endpoint.id);
        // Always exactly two draws per frame entering the network; see the module docs.
        let loss_draw: f64 = state.rng.random();
        let delay_draw: u64 = state.rng.random();
        let link = (self.addr.clone(), to.clone());
        let fate = state.faults.decide(&link, loss_draw, delay_draw);
        let incoming = Incoming {
            from: self.addr.clone(),
            frame,
        };
        match fate {
            Fate::Partitioned => {
                state.stats.sent += 1;
                state.stats.dropped_partition += 1;
                tracing::trace!(from = %self.addr, %to, "in-process frame dropped by partition");
                Ok(())
            }
            Fate::Lost => {
                state.stats.sent += 1;
                state.stats.dropped_loss += 1;
                tracing::trace!(from = %self.addr, %to, "in-process frame lost");
                Ok(())
            }
            Fate::Deliver(Duration::ZERO) => {
                state.stats.sent += 1;
                deliver(&mut state, &tx, incoming).map_err(|fail| match fail {
                    DeliveryFailure::Full => TransportError::QueueFull { addr: to.clone() },
                    DeliveryFailure::Gone => TransportError::unreachable(
                        to,
                        std::io::Error::new(
                            std::io::ErrorKind::ConnectionRefused,
                            "the in-process transport there has closed",
                        ),
                    ),
                })
            }
            Fate::Deliver(delay) => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return Err(TransportError::Io(std::io::Error::other(
                        "delayed in-process delivery needs a Tokio runtime",
                    )));
                };
                state.stats.sent += 1;
                drop(state);
                let shared = Arc::clone(&self.shared);
                let to = to.clone();
                runtime.spawn(async move {
                    tokio::time::sleep(delay).await;
                    let mut state = shared.lock();
                    // Deliver only to the binding the frame was sent to: a node that crashed
                    // (and maybe restarted) in the meantime loses frames in flight to it.
                    if state.endpoints.get(&to).is_some_and(|e| e.id == to_id) {
                        // A failure here is already counted; nobody is left to tell.
                        let _ = deliver(&mut state, &tx, incoming);
                    } else {
                        state.stats.dropped_unbound += 1;
                        tracing::trace!(%to, "delayed in-process frame found its receiver gone");
                    }
                });
                Ok(())
            }
        }
    }
}

enum DeliveryFailure {
    Full,
    Gone,
}

/// Puts `incoming` into a receiver's queue and counts the outcome. Called with the lock held,
/// so a frame taken out of a queue is always already counted.
fn deliver(
    state: &mut State,
    tx: &mpsc::Sender<Incoming>,
    incoming: Incoming,
) -> Result<(), DeliveryFailure> {
    match tx.try_send(incoming) {
        Ok(()) => {
            state.stats.delivered += 1;
            Ok(())
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            state.stats.dropped_queue_full += 1;
            Err(DeliveryFailure::Full)
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            state.stats.dropped_unbound += 1;
            Err(DeliveryFailure::Gone)
        }
    }
}

/// Resolves once `closed` holds `true` (or its sender, the transport itself, is gone).
async fn wait_closed(closed: &mut watch::Receiver<bool>) {
    // An error means the sender was dropped, which counts as closed as well.
    let _ = closed.wait_for(|closed| *closed).await;
}

impl Transport for InProcessTransport {
    fn local_addr(&self) -> Address {
        self.addr.clone()
    }

    fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    async fn send(&self, to: &Address, frame: Bytes) -> Result<(), TransportError> {
        self.send_now(to, frame)
    }

    async fn recv(&self) -> Result<Incoming, TransportError> {
        let mut closed = self.closed.subscribe();
        if *closed.borrow_and_update() {
            return Err(TransportError::Closed);
        }
        tokio::select! {
            biased;
            () = wait_closed(&mut closed) => Err(TransportError::Closed),
            // Both the lock and `mpsc::Receiver::recv` are cancel-safe: losing the race to
            // `close` loses no frame.
            incoming = async { self.rx.lock().await.recv().await } => {
                incoming.ok_or(TransportError::Closed)
            }
        }
    }

    async fn close(&self) {
        self.closed.send_replace(true);
        self.shared.unbind(&self.addr, self.id);
        // Free the queued frames now if no `recv` holds the queue; one that does is being woken
        // by the flag above, and the frames go when the transport is dropped. Never waiting
        // here means a forgotten, unpolled `recv` future cannot hang `close`.
        if let Ok(mut rx) = self.rx.try_lock() {
            rx.close();
            while rx.try_recv().is_ok() {}
        }
    }
}

impl Drop for InProcessTransport {
    fn drop(&mut self) {
        self.shared.unbind(&self.addr, self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use tokio::time::{Instant, timeout};

    use super::*;
    use crate::transport::SharedTransport;

    fn addr(s: &str) -> Address {
        Address::new(s)
    }

    fn frame(i: u32) -> Bytes {
        Bytes::copy_from_slice(&i.to_be_bytes())
    }

    fn frame_id(frame: &Bytes) -> u32 {
        let bytes: [u8; 4] = frame[..].try_into().expect("4-byte test frame");
        u32::from_be_bytes(bytes)
    }

    fn big_queue() -> InProcessConfig {
        InProcessConfig::default().with_queue_capacity(NonZeroUsize::new(20_000).expect("non-zero"))
    }

    /// Receives everything already queued, without waiting for delayed frames.
    async fn drain(t: &InProcessTransport) -> Vec<Incoming> {
        let mut out = Vec::new();
        while let Ok(Ok(incoming)) = timeout(Duration::ZERO, t.recv()).await {
            out.push(incoming);
        }
        out
    }

    /// Whether nothing arrives at `t` within a (virtual) second.
    async fn nothing_arrives(t: &InProcessTransport) -> bool {
        timeout(Duration::from_secs(1), t.recv()).await.is_err()
    }

    #[tokio::test]
    async fn delivers_with_sender_address() {
        let net = InProcessNetwork::new(1);
        let a = net.bind("a").expect("bind a");
        let b = net.bind("b").expect("bind b");
        a.send(&addr("b"), Bytes::from_static(b"ping"))
            .await
            .expect("send");
        let got = b.recv().await.expect("recv");
        assert_eq!(got.from, addr("a"));
        assert_eq!(got.frame, Bytes::from_static(b"ping"));
        b.send(&addr("a"), Bytes::from_static(b"pong"))
            .await
            .expect("send");
        assert_eq!(a.recv().await.expect("recv").from, addr("b"));
        // Loopback works too.
        a.send(&addr("a"), frame(7)).await.expect("send to self");
        assert_eq!(frame_id(&a.recv().await.expect("recv").frame), 7);
        let stats = net.stats();
        assert_eq!((stats.sent, stats.delivered, stats.dropped()), (3, 3, 0));
        assert_eq!(a.local_addr(), addr("a"));
    }

    #[tokio::test]
    async fn works_through_shared_transport() {
        let net = InProcessNetwork::new(1);
        let a: SharedTransport = Arc::new(net.bind("a").expect("bind"));
        let b: SharedTransport = Arc::new(net.bind("b").expect("bind"));
        a.send(&addr("b"), frame(1)).await.expect("send");
        assert_eq!(b.recv().await.expect("recv").from, addr("a"));
        assert_eq!(a.max_frame_len(), DEFAULT_MAX_FRAME_LEN);
        // Futures are Send: a receive can run on another task.
        let b2 = Arc::clone(&b);
        let task = tokio::spawn(async move { b2.recv().await });
        a.send(&addr("b"), frame(2)).await.expect("send");
        let got = task.await.expect("join").expect("recv");
        assert_eq!(frame_id(&got.frame), 2);
    }

    #[tokio::test]
    async fn unreachable_address() {
        let net = InProcessNetwork::new(1);
        let a = net.bind("a").expect("bind");
        let err = a.send(&addr("nobody"), frame(1)).await.unwrap_err();
        assert!(
            matches!(&err, TransportError::Unreachable { addr: to, .. } if *to == addr("nobody")),
            "{err:?}"
        );
        assert_eq!(net.stats(), NetworkStats::default());
    }

    #[tokio::test]
    async fn address_in_use_and_rebind_after_drop_or_close() {
        let net = InProcessNetwork::new(1);
        let a = net.bind("a").expect("bind");
        assert!(matches!(net.bind("a"), Err(TransportError::AddressInUse(x)) if x == addr("a")));
        assert!(net.is_bound(&addr("a")));
        drop(a);
        assert!(!net.is_bound(&addr("a")));
        let a = net.bind("a").expect("re-bind after drop");
        a.close().await;
        let a2 = net.bind("a").expect("re-bind after close");
        // The stale, closed transport going away must not unbind its successor.
        drop(a);
        assert!(net.is_bound(&addr("a")));
        let c = net.bind("c").expect("bind");
        c.send(&addr("a"), frame(5)).await.expect("send");
        assert_eq!(frame_id(&a2.recv().await.expect("recv").frame), 5);
    }

    #[tokio::test]
    async fn oversized_frame_refused() {
        let net =
            InProcessNetwork::with_config(1, InProcessConfig::default().with_max_frame_len(8));
        let a = net.bind("a").expect("bind");
        let b = net.bind("b").expect("bind");
        assert_eq!(a.max_frame_len(), 8);
        let err = a
            .send(&addr("b"), Bytes::from(vec![0u8; 9]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransportError::FrameTooLarge { len: 9, max: 8 }),
            "{err:?}"
        );
        a.send(&addr("b"), Bytes::from(vec![0u8; 8]))
            .await
            .expect("exactly the maximum");
        assert_eq!(b.recv().await.expect("recv").frame.len(), 8);
        assert_eq!(net.stats().sent, 1);
        // A configured maximum above the ceiling is capped.
        let net = InProcessNetwork::with_config(
            1,
            InProcessConfig::default().with_max_frame_len(usize::MAX),
        );
        assert_eq!(
            net.bind("x").expect("bind").max_frame_len(),
            MAX_FRAME_LEN_CEILING
        );
    }

    #[tokio::test]
    async fn drop_probability_one_drops_everything() {
        let net = InProcessNetwork::new(3);
        let a = net.bind("a").expect("bind");
        let b = net.bind("b").expect("bind");
        net.set_drop_probability(1.0).expect("valid");
        for i in 0..1000 {
            a.send(&addr("b"), frame(i))
                .await
                .expect("lost frames still send Ok");
        }
        assert!(drain(&b).await.is_empty());
        let stats = net.stats();
        assert_eq!(
            (stats.sent, stats.dropped_loss, stats.delivered),
            (1000, 1000, 0)
        );
    }

    /// Sends frames 0..n from a to b with drop probability `p` and returns which arrived.
    async fn surviving_frames(seed: u64, p: f64, n: u32) -> Vec<u32> {
        let net = InProcessNetwork::with_config(seed, big_queue());
        let a = net.bind("a").expect("bind");
        let b = net.bind("b").expect("bind");
        net.set_drop_probability(p).expect("valid");
        for i in 0..n {
            a.send(&addr("b"), frame(i)).await.expect("send");
        }
        let stats = net.stats();
        assert_eq!(stats.sent, u64::from(n));
        assert_eq!(stats.delivered + stats.dropped_loss, u64::from(n));
        let got: Vec<u32> = drain(&b).await.iter().map(|m| frame_id(&m.frame)).collect();
        assert_eq!(got.len() as u64, stats.delivered);
        got
    }

    #[tokio::test]
    async fn drop_probability_is_roughly_honoured() {
        let n = 10_000;
        let got = surviving_frames(7, 0.3, n).await;
        let dropped = n as usize - got.len();
        // Binomial(10_000, 0.3): mean 3000, standard deviation about 46.
        assert!((2700..=3300).contains(&dropped), "dropped {dropped} of {n}");
    }

    #[tokio::test]
    async fn same_seed_same_decisions_different_seed_differs() {
        let first = surviving_frames(11, 0.3, 2000).await;
        let again = surviving_frames(11, 0.3, 2000).await;
        let other = surviving_frames(12, 0.3, 2000).await;
        assert_eq!(first, again);
        assert_ne!(first, other);
    }

    #[tokio::test(start_paused = true)]
    async fn same_seed_same_delays() {
        async fn arrival_times(seed: u64) -> Vec<(u32, Duration)> {
            let net = InProcessNetwork::new(seed);
            let a = net.bind("a").expect("bind");
            let b = net.bind("b").expect("bind");
            net.set_delay(Duration::from_millis(1), Duration::from_millis(500))
                .expect("valid");
            let start = Instant::now();
            for i in 0..50 {
                a.send(&addr("b"), frame(i)).await.expect("send");
            }
            let mut out = Vec::new();
            for _ in 0..50 {
                let m = b.recv().await.expect("recv");
                out.push((frame_id(&m.frame), start.elapsed()));
            }
            out
        }
        // Random delays reorder frames.
        let first = arrival_times(5).await;
        assert!(first.windows(2).any(|w| w[0].0 > w[1].0));
        // Frames due in the same timer tick may arrive in either order, so compare as sets.
        let sorted = |mut v: Vec<(u32, Duration)>| {
            v.sort();
            v
        };
        let first = sorted(first);
        assert_eq!(first, sorted(arrival_times(5).await));
        assert_ne!(first, sorted(arrival_times(6).await));
    }

    #[tokio::test(start_paused = true)]
    async fn delay_holds_delivery_until_virtual_time_passes() {
        let net = InProcessNetwork::new(1);
        let a = net.bind("a").expect("bind");
        let b = net.bind("b").expect("bind");
        net.set_delay(Duration::from_millis(100), Duration::from_millis(100))
            .expect("valid");
        let start = Instant::now();
        a.send(&addr("b"), frame(1)).await.expect("send");
        assert_eq!(net.stats().in_flight(), 1);
        assert!(timeout(Duration::from_millis(99), b.recv()).await.is_err());
        assert_eq!(net.stats().delivered, 0);
        let got = b.recv().await.expect("recv");
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        assert_eq!(got.from, addr("a"));
        let stats = net.stats();
        assert_eq!((stats.delivered, stats.in_flight()), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn random_delays_stay_in_range_and_links_override() {
        let net = InProcessNetwork::new(9);
        let a = net.bind("a").expect("bind");
        let b = net.bind("b").expect("bind");
        let c = net.bind("c").expect("bind");
        let (min, max) = (Duration::from_millis(10), Duration::from_millis(50));
        net.set_delay(min, max).expect("valid");
        net.set_link_delay(
            &addr("a"),
            &addr("c"),
            Duration::from_secs(5),
            Duration::from_secs(5),
        )
        .expect("valid");
        let start = Instant::now();
        for i in 0..100 {
            a.send(&addr("b"), frame(i)).await.expect("send");
        }
        a.send(&addr("c"), frame(0)).await.expect("send");
        for _ in 0..100 {
            b.recv().await.expect("recv");
            let t = start.elapsed();
            assert!(t >= min && t <= max, "arrived after {t:?}");
        }
        c.recv().await.expect("recv");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        // Clearing the link setting brings back the global delay.
        net.clear_link_faults(&addr("a"), &addr("c"));
        let start = Instant::now();
        a.send(&addr("c"), frame(1)).await.expect("send");
        c.recv().await.expect("recv");
        assert!(start.elapsed() <= max);
    }

    #[tokio::test(start_paused = true)]
    async fn two_way_partition_and_heal() {
        let net = InProcessNetwork::new(1);
        let a = net.bind("a").expect("bind");
        let b = net.bind("b").expect("bind");
        let c = net.bind("c").expect("bind");
        net.partition(&[addr("a")], &[addr("b"), addr("c")]);
        a.send(&addr("b"), frame(1))
            .await
            .expect("partitioned send is Ok");
        a.send(&addr("c"), frame(2)).await.expect("send");
        b.send(&addr("a"), frame(3)).await.expect("send");
        c.send(&addr("a"), frame(4)).await.expect("send");
        b.send(&addr("c"), frame(5)).await.expect("send");
        assert!(nothing_arrives(&a).await);
        assert!(nothing_arrives(&b).await);
        assert_eq!(frame_id(&c.recv().await.expect("b -> c flows").frame), 5);
        assert_eq!(net.stats().dropped_partition, 4);
        assert!(net.is_blocked(&addr("c"), &addr("a")));
        net.heal();
        assert!(!net.is_blocked(&addr("c"), &addr("a")));
        a.send(&addr("b"), frame(6)).await.expect("send");
        b.send(&addr("a"), frame(7)).await.expect("send");
        assert_eq!(frame_id(&b.recv().await.expect("recv").frame), 6);
        assert_eq!(frame_id(&a.recv().await.expect("recv").frame), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn one_way_block() {
        let net = InProcessNetwork::new(1);
        let a = net.bind("a").expect("bind");
        let b = net.bind("b").expect("bind");
        net.block(&addr("a"), &addr("b"));
        a.send(&addr("b"), frame(1)).await.expect("send");
        b.send(&addr("a"), frame(2)).await.expect("send");
        assert!(nothing_arrives(&b).await);
        assert_eq!(frame_id(&a.recv().await.expect("b -> a flows").frame), 2);
        net.unblock(&addr("a"), &addr("b"));
        a.send(&addr("b"), frame(3)).await.expect("send");
        assert_eq!(frame_id(&b.recv().await.expect("recv").frame), 3);
        assert_eq!(net.stats().dropped_partition, 1);
    }

    #[tokio::test]
    async fn link_drop_probability_overrides_global() {
        let net = InProcessNetwork::new(1);
        let a = net.bind("a").expect("bind");
        let b = net.bind("b").expect("bind");
        let c = net.bind("c").expect("bind");
        net.set_link_drop_probability(&addr("a"), &addr("b"), 1.0)
            .expect("valid");
        for i in 0..20 {
            a.send(&addr("b"), frame(i)).await.expect("send");
            a.send(&addr("c"), frame(i)).await.expect("send");
            b.send(&addr("a"), frame(i)).await.expect("send");
        }
        assert_eq!(drain(&b).await.len(), 0);
        assert_eq!(drain(&c).await.len(), 20);
        assert_eq!(drain(&a).await.len(), 20);
        // A reliable link in a lossy network.
        net.set_drop_probability(1.0).expect("valid");
        net.set_link_drop_probability(&addr("a"), &addr("b"), 0.0)
            .expect("valid");
        for i in 0..20 {
            a.send(&addr("b"), frame(i)).await.expect("send");
            a.send(&addr("c"), frame(i)).await.expect("send");
        }
        assert_eq!(drain(&b).await.len(), 20);
        assert_eq!(drain(&c).await.len(), 0);
        net.clear_faults();
        a.send(&addr("c"), frame(0)).await.expect("send");
        assert_eq!(drain(&c).await.len(), 1);
    }

    #[tokio::test]
    async fn invalid_fault_settings_are_refused() {
        let net = InProcessNetwork::new(1);
        for p in [-0.1, 1.1, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                net.set_drop_probability(p),
                Err(FaultError::InvalidProbability(_))
            ));
            assert!(
                net.set_link_drop_probability(&addr("a"), &addr("b"), p)
                    .is_err()
            );
        }
        let (short, long) = (Duration::from_millis(1), Duration::from_millis(2));
        assert_eq!(
            net.set_delay(long, short),
            Err(FaultError::InvalidDelayRange {
                min: long,
                max: short
            })
        );
        assert!(
            net.set_link_delay(&addr("a"), &addr("b"), long, short)
                .is_err()
        );
        // Extreme but valid settings do not panic.
        net.set_delay(Duration::ZERO, Duration::MAX).expect("valid");
        net.set_delay(Duration::MAX, Duration::MAX).expect("valid");
        let widest = DelayRange::new(Duration::ZERO, Duration::MAX).expect("valid");
        assert!(widest.pick(u64::MAX) < Duration::MAX);
        assert_eq!(
            DelayRange::new(Duration::MAX, Duration::MAX)
                .expect("valid")
                .pick(u64::MAX),
            Duration::MAX
        );
    }

    #[tokio::test]
    async fn queue_full_gives_queue_full() {
        let config =
            InProcessConfig::default().with_queue_capacity(NonZeroUsize::new(2).expect("non-zero"));
        let net = InProcessNetwork::with_config(1, config);
        let a = net.bind("a").expect("bind");
        let b = net.bind("b").expect("bind");
        a.send(&addr("b"), frame(1)).await.expect("send");
        a.send(&addr("b"), frame(2)).await.expect("send");
        let err = a.send(&addr("b"), frame(3)).await.unwrap_err();
        assert!(
            matches!(&err, TransportError::QueueFull { addr: to } if *to == addr("b")),
            "{err:?}"
        );
        let stats = net.stats();
        assert_eq!(
            (stats.sent, stats.delivered, stats.dropped_queue_full),
            (3, 2, 1)
        );
        // Draining makes room again.
        b.recv().await.expect("recv");
        a.send(&addr("b"), frame(4)).await.expect("send");
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_frames_to_a_full_queue_are_dropped_and_counted() {
        let config = InProcessConfig::default().with_queue_capacity(NonZeroUsize::MIN);
        let net = InProcessNetwork::with_config(1, config);
        let a = net.bind("a").expect("bind");
        let b = net.bind("b").expect("bind");
        net.set_delay(Duration::from_millis(10), Duration::from_millis(10))
            .expect("valid");
        a.send(&addr("b"), frame(1)).await.expect("send");
        a.send(&addr("b"), frame(2))
            .await
            .expect("delayed sends accept");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let stats = net.stats();
        assert_eq!(
            (stats.delivered, stats.dropped_queue_full, stats.in_flight()),
            (1, 1, 0)
        );
        assert_eq!(drain(&b).await.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_frames_die_with_their_receiver() {
        let net = InProcessNetwork::new(1);
        let a = net.bind("a").expect("bind");
        let b = net.bind("b").expect("bind");
        net.set_delay(Duration::from_millis(50), Duration::from_millis(50))
            .expect("valid");
        a.send(&addr("b"), frame(1)).await.expect("send");
        // b crashes and restarts before the frame arrives.
        drop(b);
        let b = net.bind("b").expect("re-bind");
        assert!(nothing_arrives(&b).await);
        let stats = net.stats();
        assert_eq!(
            (stats.dropped_unbound, stats.delivered, stats.in_flight()),
            (1, 0, 0)
        );
        // Likewise for a receiver that is closed but not dropped.
        a.send(&addr("b"), frame(2)).await.expect("send");
        b.close().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(net.stats().dropped_unbound, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn close_wakes_receivers_and_refuses_sends() {
        let net = InProcessNetwork::new(1);
        let a = Arc::new(net.bind("a").expect("bind"));
        let _b = net.bind("b").expect("bind");
        let waiting = {
            let a = Arc::clone(&a);
            tokio::spawn(async move { a.recv().await })
        };
        let also_waiting = {
            let a = Arc::clone(&a);
            tokio::spawn(async move { a.recv().await })
        };
        tokio::task::yield_now().await;
        a.close().await;
        assert!(a.is_closed());
        assert!(matches!(
            waiting.await.expect("join"),
            Err(TransportError::Closed)
        ));
        assert!(matches!(
            also_waiting.await.expect("join"),
            Err(TransportError::Closed)
        ));
        assert!(matches!(a.recv().await, Err(TransportError::Closed)));
        assert!(matches!(
            a.send(&addr("b"), frame(1)).await,
            Err(TransportError::Closed)
        ));
        assert!(!net.is_bound(&addr("a")));
        // Closing twice is harmless.
        a.close().await;
    }

    #[tokio::test]
    async fn close_discards_queued_frames() {
        let net = InProcessNetwork::new(1);
        let a = net.bind("a").expect("bind");
        let b = net.bind("b").expect("bind");
        a.send(&addr("b"), frame(1)).await.expect("send");
        b.close().await;
        assert!(matches!(b.recv().await, Err(TransportError::Closed)));
        let err = a.send(&addr("b"), frame(2)).await.unwrap_err();
        assert!(matches!(err, TransportError::Unreachable { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn changing_faults_does_not_shift_the_random_stream() {
        // Frames 0..100 under loss, then the same with a partition interleaved in the middle:
        // the frames after the partition meet the same fate.
        async fn run(partition_midway: bool) -> BTreeSet<u32> {
            let net = InProcessNetwork::new(21);
            let a = net.bind("a").expect("bind");
            let b = net.bind("b").expect("bind");
            net.set_drop_probability(0.5).expect("valid");
            for i in 0..100 {
                let cut = partition_midway && (40..60).contains(&i);
                if cut {
                    net.block(&addr("a"), &addr("b"));
                }
                a.send(&addr("b"), frame(i)).await.expect("send");
                net.heal();
            }
            drain(&b)
                .await
                .iter()
                .map(|m| frame_id(&m.frame))
                .filter(|i| !(40..60).contains(i))
                .collect()
        }
        assert_eq!(run(false).await, run(true).await);
    }

    #[test]
    fn debug_output_is_useful() {
        let net = InProcessNetwork::new(99);
        assert!(format!("{net:?}").contains("seed: 99"));
        let t = net.bind("node-1").expect("bind");
        assert!(format!("{t:?}").contains("node-1"));
        assert_eq!(t.network().seed(), 99);
        assert_eq!(net.config(), InProcessConfig::default());
    }
}
