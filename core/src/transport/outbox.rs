//! Per-peer send queues for connection-oriented transports (tcp, quic).
//!
//! Both socket transports send the same way: [`Transport::send`](super::Transport::send) puts
//! the frame on the peer's bounded queue and returns; one writer task per peer owns the
//! receiving end of that queue, dials when it has to, and writes what is queued in batches.
//! This module is the part of that which touches no socket, so every transport shares one
//! behaviour:
//!
//! - [`Outboxes`] maps a peer's listen address to its queue and to the [`Link`] state its
//!   writer reports. [`Outboxes::send`] creates the entry (and has the transport start a
//!   writer) on first use, waits while the writer is [`Link::Connecting`] (up to
//!   [`OutboxConfig::connect_timeout`], then [`TransportError::Timeout`]), fails at once with
//!   [`TransportError::Unreachable`] while it is [`Link::Down`], and waits at most
//!   [`OutboxConfig::queue_wait`] for room in a full queue before failing with
//!   [`TransportError::QueueFull`]. A writer that retired between the lookup and the queueing
//!   is replaced once.
//! - A connection a peer opened gets a queue of its own with [`Outboxes::register_inbound`],
//!   filed under the connection's [inbound address](super::inbound_address), never under the
//!   listen address the peer announced: replies (sent to [`Incoming::from`]) go back on that
//!   connection, and traffic to a listen address only ever goes on a connection this node
//!   dialled, so a peer that claims another's address cannot capture its traffic.
//! - A [`Writer`] is what the transport's writer task owns: the queue, the link it reports,
//!   and a guard that removes the entry and counts the writer down when it is dropped, so an
//!   entry never outlives its writer and a finished writer never removes its successor. It
//!   also carries the redial rule both transports follow after a failed dial
//!   ([`Writer::back_off`]: a [`Backoff`] per writer, jittered by the [`Jitter`] that
//!   [`Outboxes`] seeds once per transport from [`OutboxConfig`]).
//! - [`Outboxes::shut`] refuses new sends and drops every queue's sending side, so writers see
//!   the end of their queue after the frames already in it: they write those and end, and
//!   [`Outboxes::wait_writers`] waits for that.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::{mpsc, watch};

use super::inbound::RecvQueue;
use super::{ErrorCause, Incoming, TransportError};
use crate::identity::Address;

/// What a peer's writer can do with frames right now, as `send` sees it.
#[derive(Clone, Debug)]
pub enum Link {
    /// Dialling, for the first time or again: `send` waits.
    Connecting,
    /// Connected: `send` queues.
    Up,
    /// The last dial failed with this error and a redial is scheduled: `send` fails with
    /// [`TransportError::Unreachable`], whose source it is.
    Down(ErrorCause),
}

/// The settings [`Outboxes`] needs from a transport's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxConfig {
    /// Frames queued towards one peer before `send` has to wait.
    pub queue_capacity: NonZeroUsize,
    /// How long `send` waits for room in a full queue before [`TransportError::QueueFull`].
    pub queue_wait: Duration,
    /// How long `send` waits for a writer that is still connecting before
    /// [`TransportError::Timeout`].
    pub connect_timeout: Duration,
    /// A writer whose peer saw no `send` for this long is [idle](Writer::is_idle).
    pub idle_timeout: Duration,
    /// First redial delay after a failed dial; doubled after each failure (see [`Backoff`]).
    pub backoff_min: Duration,
    /// Largest redial delay.
    pub backoff_max: Duration,
    /// Seed of the redial [`Jitter`]; `None` derives one from the clock and `jitter_salt`.
    pub jitter_seed: Option<u64>,
    /// Mixed into a clock-derived jitter seed (the local port, say), so that transports
    /// started at the same moment do not redial in step.
    pub jitter_salt: u64,
}

impl OutboxConfig {
    /// Checks the settings, naming the options tcp and quic take them from.
    pub fn validate(&self) -> Result<(), TransportError> {
        if self.backoff_min > self.backoff_max {
            return Err(TransportError::Config(format!(
                "option `backoff_min_ms` ({:?}) exceeds `backoff_max_ms` ({:?})",
                self.backoff_min, self.backoff_max
            )));
        }
        for (name, value) in [
            ("connect_timeout_ms", self.connect_timeout),
            ("idle_timeout_ms", self.idle_timeout),
        ] {
            if value.is_zero() {
                return Err(TransportError::Config(format!(
                    "option `{name}` must be positive"
                )));
            }
        }
        Ok(())
    }
}

/// A peer in the map.
#[derive(Debug)]
struct Entry {
    /// Which registration this is, so a finished writer never removes its successor.
    id: u64,
    tx: mpsc::Sender<Bytes>,
    link: watch::Receiver<Link>,
    /// Milliseconds since [`Outboxes`] was created at the last `send` to this peer.
    last_send: Arc<AtomicU64>,
}

/// The per-peer queues of one transport. See the [module documentation](self).
pub struct Outboxes {
    config: OutboxConfig,
    jitter: Jitter,
    started: Instant,
    peers: Mutex<HashMap<Address, Entry>>,
    next_id: AtomicU64,
    /// Running writers; [`Outboxes::wait_writers`] waits for zero.
    writers: watch::Sender<usize>,
    closed: watch::Sender<bool>,
    /// The same flag as `closed`, for the check on every send: reading a `watch` takes its
    /// lock, which every thread sending shares.
    shut: AtomicBool,
}

impl fmt::Debug for Outboxes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outboxes")
            .field("peers", &self.peers().len())
            .field("writers", &*self.writers.borrow())
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// Why one attempt of `send` did not queue the frame.
enum Retry {
    /// The peer's writer retired; a new one may take the frame.
    Again(Bytes),
    /// A final error.
    Fail(TransportError),
}

impl Outboxes {
    /// No peers yet.
    pub fn new(config: OutboxConfig) -> Arc<Self> {
        Arc::new(Outboxes {
            jitter: Jitter::new(config.jitter_seed, config.jitter_salt),
            config,
            started: Instant::now(),
            peers: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            writers: watch::channel(0).0,
            closed: watch::channel(false).0,
            shut: AtomicBool::new(false),
        })
    }

    fn peers(&self) -> MutexGuard<'_, HashMap<Address, Entry>> {
        // Every update of the map is a single insert or remove: it stays consistent.
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether [`shut`](Self::shut) was called.
    pub fn is_closed(&self) -> bool {
        self.shut.load(Ordering::Acquire)
    }

    /// A receiver that turns `true` when [`shut`](Self::shut) is called, for the transport's
    /// own tasks (accept loops, readers) to stop on.
    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// Refuses further sends and drops the sending side of every queue, so each writer sees
    /// its queue end after the frames already in it. Returns whether it was already shut.
    pub fn shut(&self) -> bool {
        // Set before the map is emptied (under its lock): see `entry`.
        self.shut.store(true, Ordering::Release);
        let was = self.closed.send_replace(true);
        let peers = std::mem::take(&mut *self.peers());
        drop(peers);
        was
    }

    /// The transport's `recv`: the next frame its readers put in `queue`, or
    /// [`TransportError::Closed`] once [`shut`](Self::shut) was called (also while waiting,
    /// and ahead of frames still buffered).
    pub async fn recv(&self, queue: &RecvQueue) -> Result<Incoming, TransportError> {
        let mut closed = self.closed();
        if *closed.borrow_and_update() {
            return Err(TransportError::Closed);
        }
        tokio::select! {
            biased;
            _ = closed.wait_for(|c| *c) => Err(TransportError::Closed),
            got = queue.pop() => got.ok_or(TransportError::Closed),
        }
    }

    /// Waits up to `limit` for every writer to end; `false` if some were still running.
    pub async fn wait_writers(&self, limit: Duration) -> bool {
        let mut writers = self.writers.subscribe();
        tokio::time::timeout(limit, writers.wait_for(|n| *n == 0))
            .await
            .is_ok()
    }

    /// Peers with a queue (and a writer) right now, sorted.
    pub fn addresses(&self) -> Vec<Address> {
        let mut peers: Vec<Address> = self.peers().keys().cloned().collect();
        peers.sort();
        peers
    }

    /// Queues `frame` for `to`, creating the peer's queue on first use and calling `start`
    /// with its [`Writer`] (`start` spawns the transport's writer task, which dials). The frame
    /// must already have passed the transport's own checks (size, framing). See the
    /// [module documentation](self) for the errors.
    pub async fn send(
        self: &Arc<Self>,
        to: &Address,
        frame: Bytes,
        start: impl Fn(Writer) + Send + Sync,
    ) -> Result<(), TransportError> {
        if self.is_closed() {
            return Err(TransportError::Closed);
        }
        // A writer may retire (idle, or the peer closed the connection) between looking it up
        // and queueing; the second attempt then starts a fresh one.
        let mut frame = frame;
        for attempt in 0..2 {
            match self.try_send(to, frame, &start).await {
                Ok(()) => return Ok(()),
                Err(Retry::Again(back)) if attempt == 0 => frame = back,
                Err(Retry::Again(_)) => {
                    let closed =
                        io::Error::new(io::ErrorKind::ConnectionAborted, "the connection closed");
                    return Err(TransportError::unreachable(to, closed));
                }
                Err(Retry::Fail(error)) => return Err(error),
            }
        }
        Err(TransportError::Closed)
    }

    /// One attempt of `send`: wait for the link, then queue.
    async fn try_send(
        self: &Arc<Self>,
        to: &Address,
        frame: Bytes,
        start: &(impl Fn(Writer) + Send + Sync),
    ) -> Result<(), Retry> {
        let (tx, mut link) = self.entry(to, start).map_err(Retry::Fail)?;
        let timeout = self.config.connect_timeout;
        let state =
            match tokio::time::timeout(timeout, link.wait_for(|l| !matches!(l, Link::Connecting)))
                .await
            {
                Err(_) => {
                    return Err(Retry::Fail(TransportError::Timeout {
                        addr: to.clone(),
                        after: timeout,
                    }));
                }
                // The writer ended while dialling: the transport is closing, or it retired.
                Ok(Err(_)) => None,
                Ok(Ok(state)) => Some(state.clone()),
            };
        match state {
            Some(Link::Up) => {}
            Some(Link::Down(cause)) => {
                return Err(Retry::Fail(TransportError::Unreachable {
                    addr: to.clone(),
                    source: cause,
                }));
            }
            Some(Link::Connecting) | None if self.is_closed() => {
                return Err(Retry::Fail(TransportError::Closed));
            }
            Some(Link::Connecting) | None => return Err(Retry::Again(frame)),
        }
        let frame = match tx.try_send(frame) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(frame)) => frame,
            Err(mpsc::error::TrySendError::Closed(frame)) => return Err(Retry::Again(frame)),
        };
        match tokio::time::timeout(self.config.queue_wait, tx.send(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(mpsc::error::SendError(frame))) => Err(Retry::Again(frame)),
            Err(_) => Err(Retry::Fail(TransportError::QueueFull { addr: to.clone() })),
        }
    }

    /// The peer's queue, creating it (and starting its writer, which dials) if there is none
    /// or the previous writer has finished. [`TransportError::Closed`] once the transport is
    /// shut; [`TransportError::Unreachable`] for an [inbound address](super::inbound_address)
    /// whose connection is gone, which is never dialled.
    fn entry(
        self: &Arc<Self>,
        to: &Address,
        start: &(impl Fn(Writer) + Send + Sync),
    ) -> Result<(mpsc::Sender<Bytes>, watch::Receiver<Link>), TransportError> {
        let mut peers = self.peers();
        // Checked under the lock: `shut` sets the flag before it empties the map, so an entry
        // made after this check is either emptied by `shut` or refused here.
        if self.is_closed() {
            return Err(TransportError::Closed);
        }
        if let Some(entry) = peers.get(to).filter(|e| !e.tx.is_closed()) {
            entry.last_send.store(self.now_ms(), Ordering::Relaxed);
            return Ok((entry.tx.clone(), entry.link.clone()));
        }
        if super::inbound_peer(to).is_some() {
            let gone = io::Error::new(
                io::ErrorKind::NotConnected,
                "the connection this address names is closed (it is never dialled)",
            );
            return Err(TransportError::unreachable(to, gone));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (writer, tx, link) = self.insert(&mut peers, id, to, Link::Connecting);
        drop(peers);
        start(writer);
        Ok((tx, link))
    }

    /// A queue for frames to a connection the peer opened, announcing `announced` as its
    /// listen address; `None` once the transport is shut. The writer starts [`Link::Up`] and
    /// its [address](Writer::addr) is the connection's own
    /// [inbound address](super::inbound_address), which the transport gives as
    /// [`Incoming::from`] for the connection's frames: sends to it go on this connection, and
    /// nowhere else. Sends to `announced` itself never use this connection; they dial.
    pub fn register_inbound(self: &Arc<Self>, announced: &Address) -> Option<Writer> {
        let mut peers = self.peers();
        if self.is_closed() {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let addr = super::inbound_address(announced, id);
        Some(self.insert(&mut peers, id, &addr, Link::Up).0)
    }

    fn insert(
        self: &Arc<Self>,
        peers: &mut HashMap<Address, Entry>,
        id: u64,
        addr: &Address,
        link: Link,
    ) -> (Writer, mpsc::Sender<Bytes>, watch::Receiver<Link>) {
        let (tx, queue) = mpsc::channel(self.config.queue_capacity.get());
        let (link_tx, link_rx) = watch::channel(link);
        let last_send = Arc::new(AtomicU64::new(self.now_ms()));
        peers.insert(
            addr.clone(),
            Entry {
                id,
                tx: tx.clone(),
                link: link_rx.clone(),
                last_send: Arc::clone(&last_send),
            },
        );
        self.writers.send_modify(|n| *n += 1);
        let writer = Writer {
            queue,
            backoff: Backoff::new(self.config.backoff_min, self.config.backoff_max),
            unread: VecDeque::new(),
            retired: false,
            link: link_tx,
            last_send,
            outboxes: Arc::clone(self),
            addr: addr.clone(),
            id,
        };
        (writer, tx, link_rx)
    }

    fn remove(&self, addr: &Address, id: u64) {
        let mut peers = self.peers();
        if peers.get(addr).is_some_and(|e| e.id == id) {
            peers.remove(addr);
        }
    }
}

/// The receiving end of one peer's queue, owned by the transport's writer task. Dropping it
/// removes the peer's entry (if it is still this writer's) and counts the writer as ended.
pub struct Writer {
    queue: mpsc::Receiver<Bytes>,
    /// Redial delays; reset by [`Writer::connected`].
    backoff: Backoff,
    /// Frames taken from the queue and handed back (they were not sent); they go first.
    unread: VecDeque<Bytes>,
    retired: bool,
    link: watch::Sender<Link>,
    last_send: Arc<AtomicU64>,
    outboxes: Arc<Outboxes>,
    addr: Address,
    id: u64,
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer")
            .field("addr", &self.addr)
            .field("id", &self.id)
            .field("link", &*self.link.borrow())
            .field("queued", &self.queue.len())
            .finish_non_exhaustive()
    }
}

impl Writer {
    /// The peer's listen address.
    pub fn addr(&self) -> &Address {
        &self.addr
    }

    /// Reports the link state to senders.
    pub fn set_link(&self, link: Link) {
        self.link.send_replace(link);
    }

    /// After a successful dial: the link is [`Link::Up`], and the next failed dial waits the
    /// shortest delay again.
    pub fn connected(&mut self) {
        self.backoff.reset();
        self.set_link(Link::Up);
    }

    /// The next frame to send, waiting for one; `None` once the transport is shut (or the
    /// writer [retired](Self::retire)) and every frame was taken. Cancel-safe.
    pub async fn next(&mut self) -> Option<Bytes> {
        if let Some(frame) = self.unread.pop_front() {
            return Some(frame);
        }
        self.queue.recv().await
    }

    /// Moves what is already waiting into `batch` after `first`, until `batch` holds
    /// `max_frames` frames or at least `max_bytes` bytes. Returns the bytes in `batch`.
    pub fn fill_batch(
        &mut self,
        first: Bytes,
        batch: &mut Vec<Bytes>,
        max_frames: usize,
        max_bytes: usize,
    ) -> usize {
        let mut bytes = first.len();
        batch.push(first);
        while batch.len() < max_frames && bytes < max_bytes {
            let Some(frame) = self
                .unread
                .pop_front()
                .or_else(|| self.queue.try_recv().ok())
            else {
                break;
            };
            bytes += frame.len();
            batch.push(frame);
        }
        bytes
    }

    /// Hands back frames that were taken but certainly not sent (the connection was gone
    /// before any of them was written): [`next`](Self::next) yields them again, first.
    pub fn put_back(&mut self, frames: impl IntoIterator<Item = Bytes>) {
        let mut frames: Vec<Bytes> = frames.into_iter().collect();
        frames.extend(self.unread.drain(..));
        self.unread.extend(frames);
    }

    /// Whether nothing was sent to this peer for [`OutboxConfig::idle_timeout`].
    pub fn is_idle(&self) -> bool {
        let last = self.last_send.load(Ordering::Relaxed);
        let idle = Duration::from_millis(self.outboxes.now_ms().saturating_sub(last));
        idle >= self.outboxes.config.idle_timeout
    }

    /// Whether the transport is shut.
    pub fn transport_closed(&self) -> bool {
        self.outboxes.is_closed()
    }

    /// Whether [`retire`](Self::retire) was called: the writer only delivers what it holds.
    pub fn is_retired(&self) -> bool {
        self.retired
    }

    /// Stops taking frames: senders start a fresh writer from now on. Returns `true` if
    /// nothing is left, so the writer may end; otherwise frames that raced in (or were handed
    /// back) are still the writer's to deliver, and [`next`](Self::next) yields them.
    ///
    /// Waits for senders that already hold room in the queue to put their frame in, so a
    /// frame whose `send` returned `Ok` is not dropped unseen. `send` puts its frame in as soon
    /// as it has room; only a `send` future that got room and was then never polled again
    /// could hold this up, so the wait is bounded by [`OutboxConfig::queue_wait`].
    pub async fn retire(&mut self) -> bool {
        self.retired = true;
        self.queue.close();
        if !self.unread.is_empty() {
            return false;
        }
        match self.last_frames().await {
            Some(frame) => {
                self.unread.push_back(frame);
                false
            }
            None => true,
        }
    }

    /// The next frame of a closed queue, waiting a bounded time for senders holding room.
    async fn last_frames(&mut self) -> Option<Bytes> {
        let limit = self.outboxes.config.queue_wait;
        match tokio::time::timeout(limit, self.queue.recv()).await {
            Ok(frame) => frame,
            Err(_) => {
                tracing::warn!(peer = %self.addr, ?limit, "a sender held queue room without sending");
                None
            }
        }
    }

    /// Discards every frame waiting now (the queue stays open) and returns how many.
    pub fn drop_queued(&mut self) -> u64 {
        let mut dropped = self.unread.len() as u64;
        self.unread.clear();
        while self.queue.try_recv().is_ok() {
            dropped += 1;
        }
        dropped
    }

    /// Retires the writer and discards everything left, including frames from senders that
    /// hold room in the queue; returns how many. For a writer that is about to end.
    pub async fn discard(&mut self) -> u64 {
        self.retired = true;
        self.queue.close();
        let mut dropped = self.unread.len() as u64;
        self.unread.clear();
        while self.last_frames().await.is_some() {
            dropped += 1;
        }
        dropped
    }

    /// After a failed dial: tells senders the peer is down (they fail with
    /// [`TransportError::Unreachable`] at once), discards what is queued (returned), and waits
    /// out the next jittered backoff delay. The `bool` says whether to dial again: not if the
    /// writer retired, the transport shut (also while waiting), or nothing was sent to the
    /// peer for the idle timeout.
    pub async fn back_off(&mut self, cause: ErrorCause) -> (u64, bool) {
        self.set_link(Link::Down(cause));
        let dropped = self.drop_queued();
        if self.transport_closed() || self.is_retired() || self.is_idle() {
            return (dropped, false);
        }
        let delay = self.outboxes.jitter.jittered(self.backoff.next_delay());
        let mut closed = self.outboxes.closed();
        let again = tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = closed.wait_for(|c| *c) => false,
        };
        (dropped, again)
    }
}

/// Exponential redial delays between a floor and a ceiling: each failure doubles the delay,
/// a success resets it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starting at `min`, doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next attempt (before jitter); the one after is twice as long.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// After a success: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.outboxes.remove(&self.addr, self.id);
        self.outboxes
            .writers
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Redial delays with jitter: each delay `d` becomes a draw from `[d/2, d]`, so peers that
/// lost a node at the same moment do not redial it in step.
pub struct Jitter(Mutex<ChaCha8Rng>);

impl fmt::Debug for Jitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jitter").finish_non_exhaustive()
    }
}

impl Jitter {
    /// Draws from `seed` (for tests that replay), or when it is `None` from the clock mixed
    /// with `salt` (say, the local port, so transports started together differ).
    pub fn new(seed: Option<u64>, salt: u64) -> Self {
        let seed = seed.unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            nanos ^ salt.rotate_left(48)
        });
        Jitter(Mutex::new(ChaCha8Rng::seed_from_u64(seed)))
    }

    /// `delay` with jitter: uniformly in `[delay/2, delay]`.
    pub fn jittered(&self, delay: Duration) -> Duration {
        let half = delay / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let extra = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .random_range(0..=nanos);
        half + Duration::from_nanos(extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OutboxConfig {
        OutboxConfig {
            queue_capacity: NonZeroUsize::new(2).expect("non-zero"),
            queue_wait: Duration::from_millis(20),
            connect_timeout: Duration::from_millis(50),
            idle_timeout: Duration::from_secs(60),
            backoff_min: Duration::from_millis(1),
            backoff_max: Duration::from_millis(4),
            jitter_seed: Some(1),
            jitter_salt: 0,
        }
    }

    fn refused() -> ErrorCause {
        Arc::new(io::Error::new(io::ErrorKind::ConnectionRefused, "refused"))
    }

    /// A `start` that keeps the writer in `slot` and reports `link`.
    fn keep(slot: &Arc<Mutex<Option<Writer>>>, link: Link) -> impl Fn(Writer) + Send + Sync {
        let slot = Arc::clone(slot);
        move |w: Writer| {
            w.set_link(link.clone());
            *slot.lock().expect("slot") = Some(w);
        }
    }

    /// Queues `frames` for `to` on a live link and returns the writer that got them.
    async fn writer_with(
        outboxes: &Arc<Outboxes>,
        to: &Address,
        slot: &Arc<Mutex<Option<Writer>>>,
        frames: &[&'static [u8]],
    ) -> Writer {
        for frame in frames {
            outboxes
                .send(to, Bytes::from_static(frame), keep(slot, Link::Up))
                .await
                .expect("room in the queue");
        }
        slot.lock().expect("slot").take().expect("a writer started")
    }

    #[tokio::test]
    async fn a_live_peer_queues_until_full_then_reports_queue_full() {
        let outboxes = Outboxes::new(config());
        let to = Address::new("peer:1");
        let slot = Arc::new(Mutex::new(None));
        for i in 0..2u8 {
            outboxes
                .send(&to, Bytes::from(vec![i]), keep(&slot, Link::Up))
                .await
                .expect("room in the queue");
        }
        match outboxes
            .send(&to, Bytes::from_static(b"x"), keep(&slot, Link::Up))
            .await
        {
            Err(TransportError::QueueFull { addr }) => assert_eq!(addr, to),
            other => panic!("a full queue gave {other:?}"),
        }
        let mut writer = slot
            .lock()
            .expect("slot")
            .take()
            .expect("one writer started");
        let mut batch = Vec::new();
        let first = writer.next().await.expect("a frame");
        assert_eq!(writer.fill_batch(first, &mut batch, 16, 1 << 20), 2);
        assert_eq!(batch, vec![Bytes::from(vec![0]), Bytes::from(vec![1])]);
        assert_eq!(outboxes.addresses(), vec![to.clone()]);
        drop(writer);
        assert!(
            outboxes.addresses().is_empty(),
            "the entry goes with its writer"
        );
        assert!(outboxes.wait_writers(Duration::from_millis(10)).await);
    }

    #[tokio::test]
    async fn down_fails_at_once_and_connecting_times_out() {
        let outboxes = Outboxes::new(config());
        let slot = Arc::new(Mutex::new(None));
        let down = Address::new("down:1");
        match outboxes
            .send(
                &down,
                Bytes::from_static(b"x"),
                keep(&slot, Link::Down(refused())),
            )
            .await
        {
            Err(TransportError::Unreachable { addr, source }) => {
                assert_eq!((addr, source.to_string()), (down, "refused".to_owned()));
            }
            other => panic!("a down link gave {other:?}"),
        }
        let slow = Address::new("slow:1");
        let started = Instant::now();
        match outboxes
            .send(
                &slow,
                Bytes::from_static(b"x"),
                keep(&slot, Link::Connecting),
            )
            .await
        {
            Err(TransportError::Timeout { addr, after }) => {
                assert_eq!((addr, after), (slow, config().connect_timeout));
            }
            other => panic!("a link stuck connecting gave {other:?}"),
        }
        assert!(started.elapsed() >= config().connect_timeout);
    }

    #[tokio::test]
    async fn a_retired_writer_is_replaced_and_shut_ends_the_queue() {
        let outboxes = Outboxes::new(config());
        let to = Address::new("peer:1");
        let slot = Arc::new(Mutex::new(None));
        outboxes
            .send(&to, Bytes::from_static(b"one"), keep(&slot, Link::Up))
            .await
            .expect("send");
        let mut first = slot.lock().expect("slot").take().expect("writer");
        assert!(!first.retire().await, "a frame is still queued");
        assert!(first.is_retired());
        assert_eq!(first.discard().await, 1);
        outboxes
            .send(&to, Bytes::from_static(b"two"), keep(&slot, Link::Up))
            .await
            .expect("a fresh writer takes the frame");
        let mut second = slot.lock().expect("slot").take().expect("a second writer");
        // The old writer ending must not remove the new one's entry.
        drop(first);
        assert_eq!(outboxes.addresses(), vec![to.clone()]);
        assert!(!outboxes.shut());
        assert_eq!(second.next().await, Some(Bytes::from_static(b"two")));
        assert_eq!(second.next().await, None, "shut ends the queue");
        assert!(matches!(
            outboxes
                .send(&to, Bytes::from_static(b"late"), keep(&slot, Link::Up))
                .await,
            Err(TransportError::Closed)
        ));
        assert!(!outboxes.wait_writers(Duration::from_millis(10)).await);
        drop(second);
        assert!(outboxes.wait_writers(Duration::from_millis(10)).await);
    }

    #[tokio::test]
    async fn handed_back_frames_come_first_and_retiring_waits_for_them() {
        let outboxes = Outboxes::new(config());
        let to = Address::new("peer:1");
        let slot = Arc::new(Mutex::new(None));
        let mut writer = writer_with(&outboxes, &to, &slot, &[b"a", b"b"]).await;
        let mut batch = Vec::new();
        let first = writer.next().await.expect("a frame");
        writer.fill_batch(first, &mut batch, 16, 1 << 20);
        assert_eq!(batch.len(), 2);
        // The connection was gone before the batch was written: it goes out again, first.
        writer.put_back(batch.drain(..));
        assert!(
            !writer.retire().await,
            "handed-back frames are still to deliver"
        );
        assert_eq!(writer.next().await, Some(Bytes::from_static(b"a")));
        assert_eq!(writer.next().await, Some(Bytes::from_static(b"b")));
        assert!(writer.retire().await, "nothing is left");
    }

    #[tokio::test]
    async fn a_retired_writer_does_not_redial_and_a_shut_transport_refuses_new_peers() {
        let outboxes = Outboxes::new(config());
        let slot = Arc::new(Mutex::new(None));
        let to = Address::new("peer:1");
        outboxes
            .send(&to, Bytes::from_static(b"x"), keep(&slot, Link::Up))
            .await
            .expect("send");
        let mut writer = slot.lock().expect("slot").take().expect("writer");
        let (dropped, again) = writer.back_off(refused()).await;
        assert_eq!((dropped, again), (1, true), "a live writer redials");
        assert!(writer.retire().await, "the failed dial dropped the frame");
        let (_, again) = writer.back_off(refused()).await;
        assert!(!again, "a retired writer ends instead of redialling");
        outboxes.shut();
        let other = Address::new("peer:2");
        assert!(matches!(
            outboxes
                .send(&other, Bytes::from_static(b"y"), keep(&slot, Link::Up))
                .await,
            Err(TransportError::Closed)
        ));
        assert!(
            slot.lock().expect("slot").is_none(),
            "no writer starts after shut"
        );
    }

    #[tokio::test]
    async fn a_sender_waiting_for_room_when_the_writer_retires_loses_nothing() {
        let outboxes = Outboxes::new(config());
        let to = Address::new("peer:1");
        let slot = Arc::new(Mutex::new(None));
        let mut writer = writer_with(&outboxes, &to, &slot, &[b"a", b"b"]).await;
        // A third sender waits for room in the full queue.
        let sender = {
            let (outboxes, to, slot) = (Arc::clone(&outboxes), to.clone(), Arc::clone(&slot));
            tokio::spawn(async move {
                outboxes
                    .send(&to, Bytes::from_static(b"c"), keep(&slot, Link::Up))
                    .await
            })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // Room frees up and the writer retires before the sender (on this one thread) ran.
        assert_eq!(writer.next().await, Some(Bytes::from_static(b"a")));
        assert!(!writer.retire().await, "b is still to deliver");
        sender
            .await
            .expect("task")
            .expect("the third send was accepted");
        // The accepted frame is in this writer's queue or in its successor's: nowhere else.
        let mut delivered = Vec::new();
        while let Some(frame) = writer.next().await {
            delivered.push(frame);
        }
        let successor = slot.lock().expect("slot").take();
        if let Some(mut successor) = successor {
            successor.retire().await;
            while let Some(frame) = successor.next().await {
                delivered.push(frame);
            }
        }
        assert_eq!(
            delivered,
            vec![Bytes::from_static(b"b"), Bytes::from_static(b"c")]
        );
    }

    #[tokio::test]
    async fn no_writer_starts_once_shut_even_past_the_first_check() {
        let outboxes = Outboxes::new(config());
        let slot = Arc::new(Mutex::new(None));
        outboxes.shut();
        // What a `send` that passed its first check just before `shut` does next.
        assert!(matches!(
            outboxes.entry(&Address::new("peer:1"), &keep(&slot, Link::Up)),
            Err(TransportError::Closed)
        ));
        assert!(slot.lock().expect("slot").is_none());
        assert!(outboxes.addresses().is_empty());
    }

    #[test]
    fn backoff_doubles_up_to_the_ceiling_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(35));
        let delays: Vec<u128> = (0..4).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, vec![10, 20, 35, 35]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(10));
    }

    #[test]
    fn validation_names_the_option_at_fault() {
        let mut inverted = config();
        inverted.backoff_min = inverted.backoff_max * 2;
        let mut no_connect = config();
        no_connect.connect_timeout = Duration::ZERO;
        for (bad, option) in [
            (inverted, "`backoff_min_ms`"),
            (no_connect, "`connect_timeout_ms`"),
        ] {
            let err = bad.validate().expect_err("invalid");
            assert!(
                matches!(&err, TransportError::Config(m) if m.contains(option)),
                "{err}"
            );
        }
        config().validate().expect("valid");
    }

    #[test]
    fn jitter_stays_in_range_and_replays_from_a_seed() {
        let (a, b) = (Jitter::new(Some(7), 0), Jitter::new(Some(7), 0));
        let delay = Duration::from_millis(100);
        let draws: Vec<Duration> = (0..100).map(|_| a.jittered(delay)).collect();
        assert!(
            draws.iter().all(|d| *d >= delay / 2 && *d <= delay),
            "{draws:?}"
        );
        assert!(draws.iter().any(|d| *d != draws[0]), "the draws vary");
        let replay: Vec<Duration> = (0..100).map(|_| b.jittered(delay)).collect();
        assert_eq!(draws, replay);
    }

    #[tokio::test]
    async fn recv_yields_frames_until_shut_then_closed() {
        let outboxes = Outboxes::new(config());
        let n = NonZeroUsize::new(4).expect("non-zero");
        let queue = RecvQueue::new(n, n, "recv_bytes").expect("queue");
        let incoming = Incoming {
            from: Address::new("peer:1"),
            frame: Bytes::from_static(b"x"),
        };
        queue.push(incoming.clone()).await;
        assert_eq!(outboxes.recv(&queue).await.expect("a frame"), incoming);
        queue.push(incoming).await;
        outboxes.shut();
        assert!(
            matches!(outboxes.recv(&queue).await, Err(TransportError::Closed)),
            "shut wins over buffered frames"
        );
    }

    #[tokio::test]
    async fn an_accepted_connection_never_carries_traffic_to_the_address_it_claims() {
        let outboxes = Outboxes::new(config());
        let claimed = Address::new("peer:1");
        let mut inbound = outboxes.register_inbound(&claimed).expect("open");
        let named = inbound.addr().clone();
        assert_eq!(super::super::inbound_peer(&named), Some(claimed.clone()));
        // A second connection claiming the same address gets a name of its own.
        let other = outboxes.register_inbound(&claimed).expect("open");
        assert_ne!(other.addr(), &named);
        // Traffic to the claimed address dials (a fresh writer), it does not take the
        // accepted connection.
        let slot = Arc::new(Mutex::new(None));
        outboxes
            .send(&claimed, Bytes::from_static(b"new"), keep(&slot, Link::Up))
            .await
            .expect("queued for a dial");
        let mut dialler = slot
            .lock()
            .expect("slot")
            .take()
            .expect("a dialling writer");
        assert_eq!(dialler.addr(), &claimed);
        assert_eq!(dialler.next().await, Some(Bytes::from_static(b"new")));
        // Replies to the connection's name go on it.
        outboxes
            .send(&named, Bytes::from_static(b"reply"), keep(&slot, Link::Up))
            .await
            .expect("the connection is open");
        assert!(slot.lock().expect("slot").is_none(), "no writer started");
        assert_eq!(inbound.next().await, Some(Bytes::from_static(b"reply")));
        // Once the connection is gone its name is unreachable, never dialled.
        drop(inbound);
        match outboxes
            .send(&named, Bytes::from_static(b"late"), keep(&slot, Link::Up))
            .await
        {
            Err(TransportError::Unreachable { addr, .. }) => assert_eq!(addr, named),
            other => panic!("a closed inbound connection gave {other:?}"),
        }
        assert!(slot.lock().expect("slot").is_none(), "nothing was dialled");
    }
}
