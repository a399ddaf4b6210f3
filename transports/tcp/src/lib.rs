//! The TCP transport for Chorus, registered as `"tcp"`.
//!
//! # Connections
//!
//! One connection per peer, kept and reused, in one map keyed by the peer's *listen* address.
//! `send` to an address without a connection dials it; the dialer first writes a *hello*
//! announcing its own listen address (see `docs/PROTOCOL.md`), so the listener files the
//! accepted connection under that address and sends its replies back over it. Frames read from
//! a dialed connection carry the dialed address as [`Incoming::from`]; frames read from an
//! accepted connection carry the address its hello announced. Either way, sending to
//! `Incoming::from` reaches the sender, which is what request/response correlation needs. The
//! hello is not authenticated: on an untrusted network use the QUIC transport, whose mutual
//! TLS does that.
//!
//! # Writing
//!
//! Each connection has one writer task draining a bounded queue of frames. It takes every frame
//! that is already queued (up to [`TcpConfig::max_batch`]) and writes them with one vectored
//! write, so under load many frames share a syscall; when the queue is empty it waits, so a
//! lone frame goes out at once (`TCP_NODELAY` is set). Sockets also get keepalive.
//!
//! # Backpressure
//!
//! A peer's queue holds at most [`TcpConfig::queue_capacity`] frames. `send` finding it full
//! waits up to [`TcpConfig::queue_wait`] for room and then fails with
//! [`TransportError::QueueFull`]: a slow or stuck peer costs bounded memory and the caller
//! learns to slow down. On the reading side, received frames wait in a queue of
//! [`TcpConfig::recv_capacity`]; when it is full, readers stop reading and TCP's flow control
//! pushes back on the senders.
//!
//! # Failures
//!
//! - `send` to a peer that is still being dialled waits up to [`TcpConfig::connect_timeout`],
//!   then fails with [`TransportError::Timeout`]; if the dial fails it fails with
//!   [`TransportError::Unreachable`], and so do further sends until a redial succeeds. Redials
//!   happen in the background with exponential backoff between [`TcpConfig::backoff_min`] and
//!   [`TcpConfig::backoff_max`], jittered, as long as sends keep coming; frames queued when a
//!   dial fails are dropped (and counted).
//! - A connection that breaks while frames are queued is redialled at once; the frames of the
//!   batch being written when it broke are lost, as on any network (`Ok` from `send` means
//!   accepted, not delivered).
//! - On read, every length prefix goes through [`wire::frame_len`], which refuses a frame
//!   longer than the maximum before anything is buffered, and the header's magic is checked. A
//!   bad hello, an oversized or malformed frame closes *that* connection only; it is counted in
//!   [`TcpStats::rejected_connections`] and logged.
//! - A connection with no traffic for [`TcpConfig::idle_timeout`] is closed.
//!
//! # Shutdown
//!
//! [`close`](Transport::close) stops accepting and refuses new sends, lets every writer write
//! what its queue holds (up to [`TcpConfig::close_timeout`]), shuts the connections down and
//! releases the port. Dropping the transport without `close` does the same in the background.

#![deny(missing_docs)]

mod config;

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use chorus_core::registry::{Registry, TransportSpec};
use chorus_core::transport::{self, Address, Incoming, SharedTransport, Transport, TransportError};
use chorus_core::wire;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

pub use config::TcpConfig;

/// The registry name of this transport.
pub const SCHEME: &str = "tcp";

/// Registers the `"tcp"` factory: binds [`TransportSpec::bind`] with the
/// [`TcpConfig::from_options`] of the spec's options.
pub fn register(registry: &mut Registry) {
    registry
        .register_transport(SCHEME, |spec: TransportSpec| {
            Box::pin(async move {
                let config = TcpConfig::from_options(&spec.options)?;
                let transport = TcpTransport::bind(&spec.bind, config).await?;
                Ok(Arc::new(transport) as SharedTransport)
            })
        })
        .expect("the tcp transport is registered once");
}

/// The first bytes a dialer writes: a 4-byte big-endian length of what follows, then
/// [`HELLO_MAGIC`], then the dialer's listen address in UTF-8.
pub const HELLO_MAGIC: [u8; 4] = *b"CHT1";

/// Longest listen address a hello may carry, in bytes.
pub use chorus_core::transport::MAX_HELLO_ADDR_LEN;

/// Bytes read from a socket at a time when no larger frame is pending.
const READ_CHUNK: usize = 64 * 1024;

/// Most bytes gathered into one vectored write.
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Counters of a [`TcpTransport`]. See [`TcpTransport::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TcpStats {
    /// Connections this transport dialled successfully.
    pub dialed: u64,
    /// Dials that failed.
    pub dial_failures: u64,
    /// Connections accepted from peers.
    pub accepted: u64,
    /// Connections closed because of a bad hello, an oversized or malformed frame.
    pub rejected_connections: u64,
    /// Connections closed because they were idle.
    pub idle_closed: u64,
    /// Frames written to sockets.
    pub frames_sent: u64,
    /// Vectored writes issued (`frames_sent / writes` is the mean batch).
    pub writes: u64,
    /// Frames read from sockets and handed to `recv`.
    pub frames_received: u64,
    /// Accepted frames that were never written: queued when a dial failed, in a batch whose
    /// write failed, or still queued when `close` gave up.
    pub frames_dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    dialed: AtomicU64,
    dial_failures: AtomicU64,
    accepted: AtomicU64,
    rejected_connections: AtomicU64,
    idle_closed: AtomicU64,
    frames_sent: AtomicU64,
    writes: AtomicU64,
    frames_received: AtomicU64,
    frames_dropped: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Whether a peer's writer can take frames.
#[derive(Clone, Debug)]
enum Link {
    /// Dialling (first time or again).
    Connecting,
    /// Connected.
    Up,
    /// The last dial failed; a redial is scheduled.
    Down(Arc<str>),
}

/// A peer in the connection map.
#[derive(Debug)]
struct Peer {
    /// Which registration this is, so a finished writer never removes its successor.
    id: u64,
    tx: mpsc::Sender<Bytes>,
    link: watch::Receiver<Link>,
    /// Milliseconds since the transport started at the last `send` to this peer.
    last_send: Arc<AtomicU64>,
}

/// Traffic on one connection, shared by its reader and writer.
#[derive(Debug)]
struct Activity {
    /// Milliseconds since the transport started at the last read or write.
    last: AtomicU64,
    /// Signalled when the reader ends because the peer closed or the connection broke.
    reader_done: Notify,
}

impl Activity {
    fn new(now: u64) -> Arc<Self> {
        Arc::new(Activity {
            last: AtomicU64::new(now),
            reader_done: Notify::new(),
        })
    }
}

struct Inner {
    local: Address,
    config: TcpConfig,
    max_frame_len: usize,
    started: Instant,
    peers: Mutex<HashMap<Address, Peer>>,
    next_peer_id: AtomicU64,
    incoming: mpsc::Sender<Incoming>,
    closed: watch::Sender<bool>,
    /// Number of running writer tasks; `close` waits for zero.
    writers: watch::Sender<usize>,
    rng: Mutex<ChaCha8Rng>,
    hello: Bytes,
    counters: Counters,
}

impl Inner {
    fn peers(&self) -> MutexGuard<'_, HashMap<Address, Peer>> {
        // Every update of the map is a single insert or remove: it stays consistent.
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    fn idle_for(&self, last: &AtomicU64) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(last.load(Ordering::Relaxed)))
    }

    /// Signals every task to stop and drops every queue sender, so writers drain and exit.
    fn shut(&self) -> bool {
        let was = self.closed.send_replace(true);
        let peers = std::mem::take(&mut *self.peers());
        drop(peers);
        was
    }

    fn remove_peer(&self, addr: &Address, id: u64) {
        let mut peers = self.peers();
        if peers.get(addr).is_some_and(|p| p.id == id) {
            peers.remove(addr);
        }
    }

    fn jittered(&self, delay: Duration) -> Duration {
        let half = delay / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let extra = self
            .rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .random_range(0..=nanos);
        half + Duration::from_nanos(extra)
    }

    fn configure(&self, stream: &TcpStream) {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        if let Some(every) = self.config.keepalive {
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(every)
                .with_interval(every);
            if let Err(error) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
                tracing::debug!(%error, "cannot set TCP keepalive");
            }
        }
    }

    /// Connects to `addr` and writes the hello, all within the connect timeout.
    async fn dial(&self, addr: &Address) -> Result<TcpStream, String> {
        let timeout = self.config.connect_timeout;
        let attempt = async {
            let mut stream = TcpStream::connect(addr.as_str())
                .await
                .map_err(|e| e.to_string())?;
            self.configure(&stream);
            stream
                .write_all(&self.hello)
                .await
                .map_err(|e| format!("writing the hello: {e}"))?;
            Ok::<_, String>(stream)
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(format!("no connection within {timeout:?}")),
        }
    }

    /// The peer's entry, creating it (and its writer, which dials) if there is none or the
    /// previous writer has finished.
    fn peer(self: &Arc<Self>, to: &Address) -> (mpsc::Sender<Bytes>, watch::Receiver<Link>) {
        let mut peers = self.peers();
        if let Some(peer) = peers.get(to).filter(|p| !p.tx.is_closed()) {
            peer.last_send.store(self.now_ms(), Ordering::Relaxed);
            return (peer.tx.clone(), peer.link.clone());
        }
        let id = self.next_peer_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.config.queue_capacity.get());
        let (link_tx, link_rx) = watch::channel(Link::Connecting);
        let last_send = Arc::new(AtomicU64::new(self.now_ms()));
        peers.insert(
            to.clone(),
            Peer {
                id,
                tx: tx.clone(),
                link: link_rx.clone(),
                last_send: Arc::clone(&last_send),
            },
        );
        drop(peers);
        let guard = WriterGuard::new(self, to.clone(), id);
        tokio::spawn(outbound(guard, rx, link_tx, last_send));
        (tx, link_rx)
    }
}

/// Counts a running writer and removes its peer entry when it ends.
struct WriterGuard {
    inner: Arc<Inner>,
    addr: Address,
    id: u64,
}

impl WriterGuard {
    fn new(inner: &Arc<Inner>, addr: Address, id: u64) -> Self {
        inner.writers.send_modify(|n| *n += 1);
        WriterGuard {
            inner: Arc::clone(inner),
            addr,
            id,
        }
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.inner.remove_peer(&self.addr, self.id);
        self.inner.writers.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A TCP [`Transport`]. See the [crate documentation](crate).
pub struct TcpTransport {
    inner: Arc<Inner>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Incoming>>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpTransport")
            .field("local", &self.inner.local)
            .field("closed", &self.inner.is_closed())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl TcpTransport {
    /// Binds a listener at `bind` (`host:port`; port 0 picks a free one) and starts accepting.
    /// Fails with [`TransportError::AddressInUse`] if the port is taken.
    pub async fn bind(bind: &str, config: TcpConfig) -> Result<Self, TransportError> {
        config.validate()?;
        let listener = TcpListener::bind(bind).await.map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                TransportError::AddressInUse(Address::new(bind))
            } else {
                TransportError::Io(e)
            }
        })?;
        let bound: SocketAddr = listener.local_addr()?;
        let local = config
            .advertise
            .clone()
            .unwrap_or_else(|| Address::new(bound.to_string()));
        let hello = transport::encode_hello(HELLO_MAGIC, &local)?;
        let seed = config.jitter_seed.unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            nanos ^ u64::from(bound.port()).rotate_left(48)
        });
        let (incoming, rx) = mpsc::channel(config.recv_capacity.get());
        let inner = Arc::new(Inner {
            local,
            max_frame_len: config.effective_max_frame_len(),
            config,
            started: Instant::now(),
            peers: Mutex::new(HashMap::new()),
            next_peer_id: AtomicU64::new(0),
            incoming,
            closed: watch::channel(false).0,
            writers: watch::channel(0).0,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            hello,
            counters: Counters::default(),
        });
        let accept = tokio::spawn(accept_loop(Arc::clone(&inner), listener));
        Ok(TcpTransport {
            inner,
            rx: tokio::sync::Mutex::new(rx),
            accept: Mutex::new(Some(accept)),
        })
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> TcpStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TcpStats {
            dialed: get(&c.dialed),
            dial_failures: get(&c.dial_failures),
            accepted: get(&c.accepted),
            rejected_connections: get(&c.rejected_connections),
            idle_closed: get(&c.idle_closed),
            frames_sent: get(&c.frames_sent),
            writes: get(&c.writes),
            frames_received: get(&c.frames_received),
            frames_dropped: get(&c.frames_dropped),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &TcpConfig {
        &self.inner.config
    }

    /// Peers with a connection (or a writer dialling one) right now.
    pub fn connected_peers(&self) -> Vec<Address> {
        let mut peers: Vec<Address> = self.inner.peers().keys().cloned().collect();
        peers.sort();
        peers
    }

    /// One attempt of `send` after the checks: wait for the link, then queue.
    async fn try_send(&self, to: &Address, frame: Bytes) -> Result<(), Retry> {
        let inner = &self.inner;
        let (tx, mut link) = inner.peer(to);
        let timeout = inner.config.connect_timeout;
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
            Some(Link::Down(reason)) => {
                return Err(Retry::Fail(TransportError::Unreachable {
                    addr: to.clone(),
                    reason: reason.to_string(),
                }));
            }
            Some(Link::Connecting) | None if inner.is_closed() => {
                return Err(Retry::Fail(TransportError::Closed));
            }
            Some(Link::Connecting) | None => return Err(Retry::Again(frame)),
        }
        let frame = match tx.try_send(frame) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(frame)) => frame,
            Err(mpsc::error::TrySendError::Closed(frame)) => return Err(Retry::Again(frame)),
        };
        match tokio::time::timeout(inner.config.queue_wait, tx.send(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(mpsc::error::SendError(frame))) => Err(Retry::Again(frame)),
            Err(_) => Err(Retry::Fail(TransportError::QueueFull { addr: to.clone() })),
        }
    }
}

/// Why one attempt of `send` did not queue the frame.
enum Retry {
    /// The peer's writer retired; a new one may take the frame.
    Again(Bytes),
    /// A final error.
    Fail(TransportError),
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.inner.shut();
    }
}

impl Transport for TcpTransport {
    fn local_addr(&self) -> Address {
        self.inner.local.clone()
    }

    fn max_frame_len(&self) -> usize {
        self.inner.max_frame_len
    }

    async fn send(&self, to: &Address, frame: Bytes) -> Result<(), TransportError> {
        let inner = &self.inner;
        if inner.is_closed() {
            return Err(TransportError::Closed);
        }
        if frame.len() > inner.max_frame_len {
            return Err(TransportError::FrameTooLarge {
                len: frame.len(),
                max: inner.max_frame_len,
            });
        }
        // A frame whose prefix disagrees with its length would desynchronise the stream.
        wire::split(&frame, inner.max_frame_len).map_err(TransportError::InvalidFrame)?;
        // A writer may retire (idle, or the peer closed the connection) between looking it up
        // and queueing; the second attempt then starts a fresh one.
        let mut frame = frame;
        for attempt in 0..2 {
            match self.try_send(to, frame).await {
                Err(Retry::Again(back)) if attempt == 0 => frame = back,
                Err(Retry::Again(_)) => {
                    return Err(TransportError::Unreachable {
                        addr: to.clone(),
                        reason: "the connection closed".to_owned(),
                    });
                }
                Err(Retry::Fail(error)) => return Err(error),
                Ok(()) => return Ok(()),
            }
        }
        Err(TransportError::Closed)
    }

    async fn recv(&self) -> Result<Incoming, TransportError> {
        let mut closed = self.inner.closed.subscribe();
        if *closed.borrow_and_update() {
            return Err(TransportError::Closed);
        }
        let mut rx = tokio::select! {
            rx = self.rx.lock() => rx,
            _ = closed.wait_for(|c| *c) => return Err(TransportError::Closed),
        };
        tokio::select! {
            biased;
            _ = closed.wait_for(|c| *c) => Err(TransportError::Closed),
            got = rx.recv() => got.ok_or(TransportError::Closed),
        }
    }

    async fn close(&self) {
        self.inner.shut();
        let accept = self
            .accept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(accept) = accept {
            // The loop ends as soon as it sees `closed`; awaiting it releases the port.
            let _ = accept.await;
        }
        let mut writers = self.inner.writers.subscribe();
        let limit = self.inner.config.close_timeout;
        if tokio::time::timeout(limit, writers.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            tracing::warn!(local = %self.inner.local, ?limit, "close gave up waiting for writers");
        }
    }
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    let mut closed = inner.closed.subscribe();
    loop {
        let accepted = tokio::select! {
            _ = closed.wait_for(|c| *c) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                bump(&inner.counters.accepted, 1);
                inner.configure(&stream);
                tokio::spawn(inbound(Arc::clone(&inner), stream, peer));
            }
            Err(error) => {
                // Usually out of file descriptors: pause rather than spin.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Why a hello was refused.
#[derive(Debug, thiserror::Error)]
enum HelloError {
    #[error("no hello within {0:?}")]
    Timeout(Duration),
    #[error("reading the hello: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Invalid(#[from] transport::HelloError),
}

async fn read_hello(r: &mut OwnedReadHalf, timeout: Duration) -> Result<Address, HelloError> {
    let read = async {
        let mut prefix = [0u8; 4];
        r.read_exact(&mut prefix).await?;
        let len = transport::hello_body_len(prefix)?;
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await?;
        Ok(transport::decode_hello_body(HELLO_MAGIC, &body)?)
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| HelloError::Timeout(timeout))?
}

/// An accepted connection: read the hello, file the connection under the announced address
/// (unless a live connection to that peer exists), then read frames.
async fn inbound(inner: Arc<Inner>, stream: TcpStream, peer: SocketAddr) {
    let (mut r, w) = stream.into_split();
    let from = match read_hello(&mut r, inner.config.connect_timeout).await {
        Ok(from) => from,
        Err(error) => {
            bump(&inner.counters.rejected_connections, 1);
            tracing::warn!(%peer, %error, "closing connection: bad hello");
            return;
        }
    };
    let activity = Activity::new(inner.now_ms());
    let registered = {
        let mut peers = inner.peers();
        let live = peers.get(&from).is_some_and(|p| !p.tx.is_closed());
        if live || inner.is_closed() {
            None
        } else {
            let id = inner.next_peer_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::channel(inner.config.queue_capacity.get());
            let (_link_tx, link) = watch::channel(Link::Up);
            peers.insert(
                from.clone(),
                Peer {
                    id,
                    tx,
                    link,
                    last_send: Arc::new(AtomicU64::new(inner.now_ms())),
                },
            );
            Some((id, rx))
        }
    };
    // Keep the write half open even when it is not used for replies: dropping it would shut
    // the peer's reading direction.
    let _unused_write_half = match registered {
        Some((id, rx)) => {
            let guard = WriterGuard::new(&inner, from.clone(), id);
            tokio::spawn(inbound_writer(guard, rx, w, Arc::clone(&activity)));
            None
        }
        None => Some(w),
    };
    read_loop(&inner, r, &from, &activity).await;
}

async fn inbound_writer(
    guard: WriterGuard,
    mut rx: mpsc::Receiver<Bytes>,
    mut w: OwnedWriteHalf,
    activity: Arc<Activity>,
) {
    let inner = Arc::clone(&guard.inner);
    let end = write_loop(&inner, &mut w, &mut rx, &activity).await;
    if let End::Broken(error) = &end {
        tracing::debug!(peer = %guard.addr, %error, "inbound connection broke");
    }
    drop_queued(&inner, &mut rx);
}

/// The writer of a dialled connection: dial (with backoff), write, redial when it breaks.
async fn outbound(
    guard: WriterGuard,
    mut rx: mpsc::Receiver<Bytes>,
    link: watch::Sender<Link>,
    last_send: Arc<AtomicU64>,
) {
    let inner = Arc::clone(&guard.inner);
    let addr = guard.addr.clone();
    let mut closed = inner.closed.subscribe();
    let mut backoff = inner.config.backoff_min;
    loop {
        link.send_replace(Link::Connecting);
        match inner.dial(&addr).await {
            Ok(stream) => {
                bump(&inner.counters.dialed, 1);
                backoff = inner.config.backoff_min;
                link.send_replace(Link::Up);
                let (r, mut w) = stream.into_split();
                let activity = Activity::new(inner.now_ms());
                let reader = tokio::spawn({
                    let (inner, addr, activity) =
                        (Arc::clone(&inner), addr.clone(), Arc::clone(&activity));
                    async move { read_loop(&inner, r, &addr, &activity).await }
                });
                let end = write_loop(&inner, &mut w, &mut rx, &activity).await;
                reader.abort();
                match end {
                    End::Drained => break,
                    End::Idle | End::PeerClosed => {
                        // Retire this writer: new sends start a fresh one. Frames that raced
                        // in before the queue closed are still delivered, over a new dial.
                        rx.close();
                        if rx.is_empty() {
                            break;
                        }
                    }
                    End::Broken(error) => {
                        tracing::debug!(peer = %addr, %error, "connection broke; redialling");
                    }
                }
            }
            Err(reason) => {
                bump(&inner.counters.dial_failures, 1);
                tracing::debug!(peer = %addr, %reason, "dial failed");
                link.send_replace(Link::Down(Arc::from(reason.as_str())));
                drop_queued(&inner, &mut rx);
                if inner.is_closed()
                    || rx.is_closed()
                    || inner.idle_for(&last_send) >= inner.config.idle_timeout
                {
                    break;
                }
                let delay = inner.jittered(backoff);
                backoff = (backoff * 2).min(inner.config.backoff_max);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = closed.wait_for(|c| *c) => break,
                }
            }
        }
    }
    // Refuse further frames before the entry goes, then count what is left.
    rx.close();
    drop_queued(&inner, &mut rx);
}

fn drop_queued(inner: &Inner, rx: &mut mpsc::Receiver<Bytes>) {
    let mut dropped = 0;
    while rx.try_recv().is_ok() {
        dropped += 1;
    }
    if dropped > 0 {
        bump(&inner.counters.frames_dropped, dropped);
        tracing::debug!(dropped, "dropped queued frames");
    }
}

/// How a writer's loop over one connection ended.
enum End {
    /// The queue closed (the transport is closing) and everything in it was written.
    Drained,
    /// No traffic for the idle timeout.
    Idle,
    /// The reader saw the peer close the connection.
    PeerClosed,
    /// A write failed.
    Broken(io::Error),
}

async fn write_loop(
    inner: &Inner,
    w: &mut OwnedWriteHalf,
    rx: &mut mpsc::Receiver<Bytes>,
    activity: &Activity,
) -> End {
    let max_batch = inner.config.effective_max_batch();
    let mut batch: Vec<Bytes> = Vec::with_capacity(max_batch);
    loop {
        let idle_left = inner
            .config
            .idle_timeout
            .saturating_sub(inner.idle_for(&activity.last));
        let first = tokio::select! {
            biased;
            frame = rx.recv() => match frame {
                Some(frame) => frame,
                None => {
                    let _ = w.shutdown().await;
                    return End::Drained;
                }
            },
            _ = activity.reader_done.notified() => return End::PeerClosed,
            _ = tokio::time::sleep(idle_left) => {
                if inner.idle_for(&activity.last) >= inner.config.idle_timeout {
                    bump(&inner.counters.idle_closed, 1);
                    let _ = w.shutdown().await;
                    return End::Idle;
                }
                continue;
            }
        };
        let mut bytes = first.len();
        batch.push(first);
        while batch.len() < max_batch && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(frame) => {
                    bytes += frame.len();
                    batch.push(frame);
                }
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let result = write_frames(w, &batch).await;
        batch.clear();
        if let Err(error) = result {
            bump(&inner.counters.frames_dropped, n);
            return End::Broken(error);
        }
        bump(&inner.counters.frames_sent, n);
        bump(&inner.counters.writes, 1);
        activity.last.store(inner.now_ms(), Ordering::Relaxed);
    }
}

/// Writes every frame, with as few vectored writes as the socket allows.
async fn write_frames(w: &mut OwnedWriteHalf, frames: &[Bytes]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
    let mut rest = &mut slices[..];
    IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// Reads frames until the connection ends, the transport closes, or the peer misbehaves. In
/// every case but the transport closing, the writer is told to stop using the connection, so
/// a connection refused here is closed in both directions.
async fn read_loop(inner: &Inner, r: OwnedReadHalf, from: &Address, activity: &Activity) {
    let mut closed = inner.closed.subscribe();
    read_frames(inner, r, from, activity, &mut closed).await;
    if !*closed.borrow() {
        activity.reader_done.notify_one();
    }
}

async fn read_frames(
    inner: &Inner,
    mut r: OwnedReadHalf,
    from: &Address,
    activity: &Activity,
    closed: &mut watch::Receiver<bool>,
) {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        // Cut out every complete frame in the buffer.
        loop {
            match wire::frame_len(&buf, inner.max_frame_len) {
                Ok(Some(total)) if buf.len() >= total => {
                    if buf[wire::PREFIX_LEN..wire::PREFIX_LEN + 2] != wire::MAGIC {
                        reject(inner, from, "frame without the Chorus magic");
                        return;
                    }
                    let frame = buf.split_to(total).freeze();
                    let incoming = Incoming {
                        from: from.clone(),
                        frame,
                    };
                    tokio::select! {
                        sent = inner.incoming.send(incoming) => if sent.is_err() { return },
                        _ = closed.wait_for(|c| *c) => return,
                    }
                    bump(&inner.counters.frames_received, 1);
                }
                Ok(Some(total)) => {
                    // Grow with the bytes that actually arrive, not with the claim: a peer
                    // that announces a maximum-size frame and sends nothing pins little.
                    buf.reserve((total - buf.len()).min(READ_CHUNK));
                    break;
                }
                Ok(None) => break,
                Err(error) => {
                    reject(inner, from, &error.to_string());
                    return;
                }
            }
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 8 {
            buf.reserve(READ_CHUNK);
        }
        let read = tokio::select! {
            read = r.read_buf(&mut buf) => read,
            _ = closed.wait_for(|c| *c) => return,
        };
        match read {
            Ok(0) => {
                if !buf.is_empty() {
                    tracing::debug!(peer = %from, pending = buf.len(), "connection closed mid-frame");
                }
                return;
            }
            Ok(_) => activity.last.store(inner.now_ms(), Ordering::Relaxed),
            Err(error) => {
                tracing::debug!(peer = %from, %error, "read failed");
                return;
            }
        }
    }
}

fn reject(inner: &Inner, from: &Address, why: &str) {
    bump(&inner.counters.rejected_connections, 1);
    tracing::warn!(peer = %from, why, "closing connection: malformed stream");
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use super::*;
    use chorus_core::wire::{Header, Message};

    fn frame(text: &str) -> Bytes {
        let message = Message::Error {
            reason: text.to_owned(),
        };
        wire::encode(Header::message(), &message, 1 << 20).expect("encodes")
    }

    async fn pair() -> (TcpTransport, TcpTransport) {
        let a = TcpTransport::bind("127.0.0.1:0", TcpConfig::local())
            .await
            .expect("bind a");
        let b = TcpTransport::bind("127.0.0.1:0", TcpConfig::local())
            .await
            .expect("bind b");
        (a, b)
    }

    async fn recv(t: &TcpTransport) -> Incoming {
        tokio::time::timeout(Duration::from_secs(10), t.recv())
            .await
            .expect("a frame within 10 s")
            .expect("recv")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replies_reuse_the_dialled_connection() {
        let (a, b) = pair().await;
        a.send(&b.local_addr(), frame("ping")).await.expect("send");
        let got = recv(&b).await;
        assert_eq!(
            got.from,
            a.local_addr(),
            "the hello names a's listen address"
        );
        b.send(&got.from, frame("pong")).await.expect("reply");
        let back = recv(&a).await;
        assert_eq!(back.from, b.local_addr());
        assert_eq!(back.frame, frame("pong"));
        // One connection carried both directions: b never dialled.
        assert_eq!(a.stats().dialed, 1);
        assert_eq!(b.stats().dialed, 0);
        assert_eq!(b.stats().accepted, 1);
        a.close().await;
        b.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_frames_are_written_in_batches() {
        let (a, b) = pair().await;
        let to = b.local_addr();
        a.send(&to, frame("warm-up")).await.expect("send");
        recv(&b).await;
        let n = 2_000u64;
        let a = Arc::new(a);
        let mut sends = tokio::task::JoinSet::new();
        for i in 0..n {
            let (a, to) = (Arc::clone(&a), to.clone());
            sends.spawn(async move { a.send(&to, frame(&format!("frame {i}"))).await });
        }
        while let Some(result) = sends.join_next().await {
            result.expect("task").expect("send");
        }
        for _ in 0..n {
            recv(&b).await;
        }
        let stats = a.stats();
        assert_eq!(stats.frames_sent, n + 1);
        assert!(
            stats.writes < stats.frames_sent,
            "queued frames share writes: {stats:?}"
        );
        a.close().await;
        b.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_are_closed_and_redialled_on_demand() {
        let mut config = TcpConfig::local();
        config.idle_timeout = Duration::from_millis(200);
        let a = TcpTransport::bind("127.0.0.1:0", config.clone())
            .await
            .expect("bind a");
        let b = TcpTransport::bind("127.0.0.1:0", config)
            .await
            .expect("bind b");
        a.send(&b.local_addr(), frame("one")).await.expect("send");
        recv(&b).await;
        assert_eq!(a.connected_peers(), vec![b.local_addr()]);
        // Bounded wait: 100 polls of 50 ms for both sides to drop the idle connection.
        let mut gone = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if a.connected_peers().is_empty() && b.connected_peers().is_empty() {
                gone = true;
                break;
            }
        }
        assert!(gone, "idle connection still open: {:?}", a.stats());
        assert!(a.stats().idle_closed + b.stats().idle_closed >= 1);
        a.send(&b.local_addr(), frame("two")).await.expect("send");
        assert_eq!(recv(&b).await.frame, frame("two"));
        assert_eq!(a.stats().dialed, 2);
        a.close().await;
        b.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_fails_with_queue_full() {
        // A listener that accepts and never reads: the kernel buffers fill, then the queue.
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let silent_addr = Address::new(silent.local_addr().expect("addr").to_string());
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let mut config = TcpConfig::local();
        config.queue_capacity = NonZeroUsize::new(4).expect("non-zero");
        config.queue_wait = Duration::from_millis(20);
        config.close_timeout = Duration::from_millis(100);
        let a = TcpTransport::bind("127.0.0.1:0", config)
            .await
            .expect("bind");
        let big = {
            let message = Message::Error {
                reason: "x".repeat(512 * 1024),
            };
            wire::encode(Header::message(), &message, 1 << 20).expect("encodes")
        };
        let mut full = None;
        for i in 0..1_000 {
            match a.send(&silent_addr, big.clone()).await {
                Ok(()) => {}
                Err(e) => {
                    full = Some((i, e));
                    break;
                }
            }
        }
        let (i, err) = full.expect("the queue fills within 1000 frames of 512 KiB");
        assert!(
            matches!(err, TransportError::QueueFull { .. }),
            "frame {i}: {err}"
        );
        a.close().await;
        hold.abort();
    }
}
