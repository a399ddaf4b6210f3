//! The TCP transport for Chorus, registered as `"tcp"`.
//!
//! # Connections
//!
//! One connection per peer and direction, kept and reused. `send` to a listen address uses the
//! connection this node dialled to it, dialling when there is none; the dialler first writes a
//! *hello* announcing its own listen address (see `docs/PROTOCOL.md`). The listener does not
//! trust that announcement to route anything: it gives the accepted connection an
//! [inbound address](chorus_core::transport::inbound_address) of its own (the announced
//! address and a connection number, `10.0.0.1:7000 (inbound #3)`), which frames read from it
//! carry as [`Incoming::from`], and a send to that address goes back on that connection (and
//! fails with [`TransportError::Unreachable`] once it is closed). Frames read from a dialled
//! connection carry the dialled address. Either way, sending to `Incoming::from` reaches the
//! sender over the connection the frame came on, which is what request/response correlation
//! needs; and a peer that announces another node's address (by mistake, two nodes sharing an
//! `advertise` address, or on purpose) gets the replies to its own frames and nothing else:
//! traffic to a listen address only ever travels on a connection dialled to it.
//!
//! # TLS
//!
//! A node in keyring mode hands the transport its identity, live keyring and address book
//! ([`ChannelAuth`], in [`TransportSpec::auth`]); with [`TcpConfig::tls`] at its default
//! ([`TcpTls::Auto`]) every connection then runs TLS 1.3 (rustls on ring) before anything
//! else, the hello included. Both ends present a certificate self-signed by their Ed25519
//! identity and accept the other's only if its key is in the keyring at that moment and the
//! handshake signature verifies with it ([`chorus_core::tls`]): an identity outside the
//! keyring fails the handshake, counted in [`TcpStats::handshake_failures`]. The address in a
//! hello must belong to the key that authenticated the connection: if a live member with
//! another key owns it, the connection is refused and counted in
//! [`TcpStats::address_refusals`]; so is a dialled connection whose server is not the member
//! that owns the dialled address. A connection whose peer's key is removed from the keyring
//! is closed at its next read (counted in [`TcpStats::revoked_closed`]). [`TcpTls::Off`]
//! keeps plain TCP for trusted networks (with a warning), and insecure mode always runs
//! plain TCP, whose hello is not authenticated.
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
//! The per-peer queues, their link state and the rules below are shared with the QUIC
//! transport ([`chorus_core::transport::outbox`]). A peer's queue holds at most [`TcpConfig::queue_capacity`] frames. `send` finding it full
//! waits up to [`TcpConfig::queue_wait`] for room and then fails with
//! [`TransportError::QueueFull`]: a slow or stuck peer costs bounded memory and the caller
//! learns to slow down. On the reading side, received frames wait in a queue of at most
//! [`TcpConfig::recv_capacity`] frames and [`TcpConfig::recv_bytes`] bytes
//! ([`RecvQueue`]); when it is full, readers stop reading and TCP's flow control pushes back on
//! the senders ([`TcpStats::recv_queue_bytes`] shows how full it is).
//!
//! # Limits on inbound connections
//!
//! At most [`TcpConfig::max_inbound_connections`] accepted connections are open at once, and
//! at most [`TcpConfig::max_handshakes`] of them are still waiting for their hello; a
//! connection over either cap is closed as soon as it is accepted, before a byte is read, and
//! counted in [`TcpStats::refused_connections`] (and logged). A connection that does not send
//! its hello within [`TcpConfig::handshake_timeout`] is closed and counted in
//! [`TcpStats::rejected_connections`].
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
//! - A connection, dialled or accepted, with no traffic for [`TcpConfig::idle_timeout`] is
//!   closed in both directions (counted in [`TcpStats::idle_closed`]), whether or not the peer
//!   answers the shutdown.
//! - [`bind`](TcpTransport::bind) refuses to announce an address peers cannot dial: an
//!   unspecified `advertise` (`0.0.0.0`, `[::]`) or port 0, or a wildcard bind without one.
//!
//! # Shutdown
//!
//! [`close`](Transport::close) stops accepting and refuses new sends, lets every writer write
//! what its queue holds (up to [`TcpConfig::close_timeout`]), shuts the connections down and
//! releases the port. Dropping the transport without `close` does the same in the background.

#![deny(missing_docs)]

mod config;
#[cfg(test)]
mod tls_tests;

use std::fmt;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use chorus_core::identity::Address;
use chorus_core::peer_auth::{ChannelAuth, KeyCheck};
use chorus_core::registry::{Registry, TransportSpec};
use chorus_core::transport::inbound::{Admission, Admitted, RecvQueue};
use chorus_core::transport::outbox::{Link, Outboxes, Writer};
use chorus_core::transport::{self, Incoming, SharedTransport, Transport, TransportError};
use chorus_core::wire;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

pub use config::{TcpConfig, TcpTls};

/// The registry name of this transport.
pub const SCHEME: &str = "tcp";

/// Registers the `"tcp"` factory: binds [`TransportSpec::bind`] with the
/// [`TcpConfig::from_options`] of the spec's options, authenticated with
/// [`TransportSpec::auth`] when the spec carries it (see [TLS](crate#tls)).
pub fn register(registry: &mut Registry) {
    registry
        .register_transport(SCHEME, |spec: TransportSpec| {
            Box::pin(async move {
                let config = TcpConfig::from_options(&spec.options)?;
                let transport = match spec.auth {
                    Some(auth) => {
                        TcpTransport::bind_authenticated(&spec.bind, config, auth).await?
                    }
                    None => TcpTransport::bind(&spec.bind, config).await?,
                };
                Ok(SharedTransport::new(transport))
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

/// Largest frame whose whole size is allocated as soon as its length prefix arrives; a
/// longer claim grows with the bytes that actually arrive (a peer announcing a huge frame and
/// sending nothing pins at most this much).
const FRAME_PREALLOC_LIMIT: usize = 1024 * 1024;

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
    /// Connections closed because of a bad hello (a hello not received within
    /// [`TcpConfig::handshake_timeout`] included), an oversized or malformed frame.
    pub rejected_connections: u64,
    /// Connections closed as soon as they were accepted: [`TcpConfig::max_inbound_connections`]
    /// were open, or [`TcpConfig::max_handshakes`] were awaiting their hello.
    pub refused_connections: u64,
    /// Connections closed because they were idle.
    pub idle_closed: u64,
    /// Frames written to sockets.
    pub frames_sent: u64,
    /// Vectored writes issued (`frames_sent / writes` is the mean batch).
    pub writes: u64,
    /// Frames read from sockets and handed to `recv`.
    pub frames_received: u64,
    /// Bytes of received frames waiting for `recv` now (at most [`TcpConfig::recv_bytes`]).
    pub recv_queue_bytes: u64,
    /// Accepted frames that were never written: queued when a dial failed, in a batch whose
    /// write failed, or still queued when `close` gave up.
    pub frames_dropped: u64,
    /// TLS handshakes that failed, either role: the peer's key is not in the keyring, its
    /// certificate or signature is bad, or it does not speak TLS 1.3.
    pub handshake_failures: u64,
    /// Authenticated connections refused because the address announced in the hello (or
    /// the dialled address) belongs to a live member with another key.
    pub address_refusals: u64,
    /// Connections closed because the peer's key was removed from the keyring.
    pub revoked_closed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    dialed: AtomicU64,
    dial_failures: AtomicU64,
    accepted: AtomicU64,
    rejected_connections: AtomicU64,
    refused_connections: AtomicU64,
    idle_closed: AtomicU64,
    frames_sent: AtomicU64,
    writes: AtomicU64,
    frames_received: AtomicU64,
    frames_dropped: AtomicU64,
    handshake_failures: AtomicU64,
    address_refusals: AtomicU64,
    revoked_closed: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
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
    outboxes: Arc<Outboxes>,
    /// Received frames waiting for `recv`.
    recv: RecvQueue,
    admission: Admission,
    hello: Bytes,
    counters: Counters,
    /// TLS in force (see [TLS](crate#tls)); `None` for plain TCP.
    tls: Option<Tls>,
}

/// The TLS side of an authenticated transport.
struct Tls {
    auth: ChannelAuth,
    connector: tokio_rustls::TlsConnector,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl Tls {
    fn new(auth: ChannelAuth) -> Result<Self, TransportError> {
        let config_error = |e: chorus_core::tls::TlsError| TransportError::Config(e.to_string());
        let client = chorus_core::tls::client_config(&auth, &[ALPN]).map_err(config_error)?;
        let server = chorus_core::tls::server_config(&auth, &[ALPN]).map_err(config_error)?;
        Ok(Tls {
            auth,
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        })
    }
}

/// What a TLS server writes once it has accepted a connection's certificate and hello; the
/// dialler waits for it before sending frames.
pub const HELLO_ACK: [u8; 4] = *b"CHOK";

/// The ALPN protocol of TLS connections (so a TLS client of something else fails early).
const ALPN: &[u8] = b"chorus-tcp/1";

/// A dialled connection, hello written.
enum Dialled {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TlsSocket>>, KeyCheck),
}

/// The socket under TLS: rustls reads at most 4 KiB per call, so a buffer of
/// [`READ_CHUNK`] turns the dozen `recv` calls of a large frame into one.
type TlsSocket = tokio::io::BufReader<TcpStream>;

fn tls_socket(stream: TcpStream) -> TlsSocket {
    tokio::io::BufReader::with_capacity(READ_CHUNK, stream)
}

/// Encrypted bytes rustls may hold for the socket. Its default, 64 KiB, makes every large
/// frame a `writev` of its own; a writer's batch (many frames) fits this in one.
const TLS_SEND_BUFFER: usize = 1024 * 1024;

impl Inner {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn is_closed(&self) -> bool {
        self.outboxes.is_closed()
    }

    fn idle_for(&self, last: &AtomicU64) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(last.load(Ordering::Relaxed)))
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

    /// Connects to `addr`, runs the TLS handshake if TLS is on (checking that the server is
    /// the member owning `addr`, if one does), and writes the hello, all within the connect
    /// timeout.
    async fn dial(&self, addr: &Address) -> Result<Dialled, DialError> {
        let timeout = self.config.connect_timeout;
        let attempt = async {
            let mut stream = TcpStream::connect(addr.as_str())
                .await
                .map_err(DialError::Connect)?;
            self.configure(&stream);
            let Some(tls) = &self.tls else {
                stream
                    .write_all(&self.hello)
                    .await
                    .map_err(DialError::Hello)?;
                return Ok(Dialled::Plain(stream));
            };
            let mut stream = tls
                .connector
                .connect(chorus_core::tls::server_name(), tls_socket(stream))
                .await
                .map_err(|e| {
                    bump(&self.counters.handshake_failures, 1);
                    DialError::Handshake(e)
                })?;
            let check = chorus_core::tls::admitted_peer(&tls.auth, stream.get_ref().1)
                .ok_or(DialError::NoKey)?;
            let key = check.key();
            stream.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
            if let Err(taken) = tls.auth.book.may_use(addr, &key) {
                bump(&self.counters.address_refusals, 1);
                return Err(DialError::WrongPeer(taken));
            }
            stream
                .write_all(&self.hello)
                .await
                .map_err(DialError::Hello)?;
            stream.flush().await.map_err(DialError::Hello)?;
            // TLS 1.3 finishes the client's side of the handshake before the server has
            // checked the client's certificate: wait for the server's acceptance, so that a
            // refusal fails the dial (and backs off) instead of every later write.
            let mut ack = [0u8; 4];
            stream
                .read_exact(&mut ack)
                .await
                .map_err(DialError::Refused)?;
            if ack != HELLO_ACK {
                return Err(DialError::Refused(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "not a hello acknowledgement",
                )));
            }
            Ok(Dialled::Tls(Box::new(stream), check))
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(DialError::TimedOut(timeout)),
        }
    }
}

/// Why a dial failed: the source of the [`TransportError::Unreachable`] that sends get until
/// a redial succeeds.
#[derive(Debug, thiserror::Error)]
enum DialError {
    /// The connection could not be made.
    #[error("{0}")]
    Connect(#[source] io::Error),
    /// The connection broke while the hello was written.
    #[error("writing the hello: {0}")]
    Hello(#[source] io::Error),
    /// The TLS handshake failed (the server's key is not in the keyring, or it is no node).
    #[error("TLS handshake: {0}")]
    Handshake(#[source] io::Error),
    /// The server refused the connection after the handshake (it does not admit this
    /// node's key, or this node's address belongs to another member), or broke it.
    #[error("refused by the server: {0}")]
    Refused(#[source] io::Error),
    /// The handshake completed without a key the keyring admits (the keyring changed during
    /// the handshake).
    #[error("TLS handshake: the peer's key is not admitted")]
    NoKey,
    /// The server authenticated as another member than the one owning the address.
    #[error("{0}")]
    WrongPeer(#[source] chorus_core::peer_auth::AddressTaken),
    /// Connecting and writing the hello took longer than the connect timeout.
    #[error("no connection within {0:?}")]
    TimedOut(Duration),
}

/// A TCP [`Transport`]. See the [crate documentation](crate).
pub struct TcpTransport {
    inner: Arc<Inner>,
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
    /// Fails with [`TransportError::AddressInUse`] if the port is taken, and with
    /// [`TransportError::Config`] naming `advertise` if the address to announce is one peers
    /// cannot dial (a wildcard bind without [`TcpConfig::advertise`]).
    ///
    /// This is plain TCP: with [`TcpConfig::tls`] set to [`TcpTls::On`] it fails with
    /// [`TransportError::Config`] naming `tls` (TLS needs an identity: use
    /// [`bind_authenticated`](Self::bind_authenticated)).
    pub async fn bind(bind: &str, config: TcpConfig) -> Result<Self, TransportError> {
        if config.tls == TcpTls::On {
            return Err(TransportError::Config(
                "option `tls`: `on` needs the node's identity and keyring (keyring security \
                 mode)"
                    .to_owned(),
            ));
        }
        Self::bind_with(bind, config, None).await
    }

    /// Binds like [`bind`](Self::bind), with TLS keyed by `auth` (see [TLS](crate#tls))
    /// unless [`TcpConfig::tls`] is [`TcpTls::Off`].
    pub async fn bind_authenticated(
        bind: &str,
        config: TcpConfig,
        auth: ChannelAuth,
    ) -> Result<Self, TransportError> {
        if config.tls == TcpTls::Off {
            tracing::warn!(
                bind,
                "tcp transport with `tls = off` in keyring mode: data connections are neither \
                 encrypted nor authenticated"
            );
            return Self::bind_with(bind, config, None).await;
        }
        Self::bind_with(bind, config, Some(Tls::new(auth)?)).await
    }

    async fn bind_with(
        bind: &str,
        config: TcpConfig,
        tls: Option<Tls>,
    ) -> Result<Self, TransportError> {
        config.validate()?;
        let listener = TcpListener::bind(bind).await.map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                TransportError::AddressInUse(Address::new(bind))
            } else {
                TransportError::Io(e)
            }
        })?;
        let bound: SocketAddr = listener.local_addr()?;
        let local = transport::advertised(config.advertise.as_ref(), bound)?;
        let hello = transport::encode_hello(HELLO_MAGIC, &local)?;
        let outboxes = Outboxes::new(config.outbox(u64::from(bound.port())));
        let recv = RecvQueue::new(config.recv_capacity, config.recv_bytes, "recv_bytes")?;
        let admission = Admission::new(config.max_inbound_connections, config.max_handshakes);
        let inner = Arc::new(Inner {
            local,
            max_frame_len: config.effective_max_frame_len(),
            config,
            started: Instant::now(),
            outboxes,
            recv,
            admission,
            hello,
            counters: Counters::default(),
            tls,
        });
        let accept = tokio::spawn(accept_loop(Arc::clone(&inner), listener));
        Ok(TcpTransport {
            inner,
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
            refused_connections: get(&c.refused_connections),
            idle_closed: get(&c.idle_closed),
            frames_sent: get(&c.frames_sent),
            writes: get(&c.writes),
            frames_received: get(&c.frames_received),
            recv_queue_bytes: self.inner.recv.queued_bytes() as u64,
            frames_dropped: get(&c.frames_dropped),
            handshake_failures: get(&c.handshake_failures),
            address_refusals: get(&c.address_refusals),
            revoked_closed: get(&c.revoked_closed),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &TcpConfig {
        &self.inner.config
    }

    /// Whether connections run TLS.
    pub fn is_tls(&self) -> bool {
        self.inner.tls.is_some()
    }

    /// Peers with a connection (or a writer dialling one) right now.
    pub fn connected_peers(&self) -> Vec<Address> {
        self.inner.outboxes.addresses()
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.inner.outboxes.shut();
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
        transport::check_frame(&frame, inner.max_frame_len)?;
        inner
            .outboxes
            .send(to, frame, |writer| {
                tokio::spawn(outbound(Arc::clone(inner), writer));
            })
            .await
    }

    async fn recv(&self) -> Result<Incoming, TransportError> {
        self.inner.outboxes.recv(&self.inner.recv).await
    }

    fn refusals(&self) -> transport::ConnectionRefusals {
        let s = self.stats();
        let mut r = transport::ConnectionRefusals::default();
        r.rejected = s.rejected_connections;
        r.over_limit = s.refused_connections;
        r.handshake_failures = s.handshake_failures;
        r.address_refusals = s.address_refusals;
        r.revoked = s.revoked_closed;
        r
    }

    async fn close(&self) {
        self.inner.outboxes.shut();
        let accept = self
            .accept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(accept) = accept {
            // The loop ends as soon as it sees `closed`; awaiting it releases the port.
            let _ = accept.await;
        }
        let limit = self.inner.config.close_timeout;
        if !self.inner.outboxes.wait_writers(limit).await {
            tracing::warn!(local = %self.inner.local, ?limit, "close gave up waiting for writers");
        }
    }
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    let mut closed = inner.outboxes.closed();
    loop {
        let accepted = tokio::select! {
            _ = closed.wait_for(|c| *c) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => match inner.admission.admit() {
                Ok(admitted) => {
                    bump(&inner.counters.accepted, 1);
                    inner.configure(&stream);
                    tokio::spawn(inbound(Arc::clone(&inner), stream, peer, admitted));
                }
                Err(refused) => {
                    // Dropping the stream closes it before a byte is read.
                    bump(&inner.counters.refused_connections, 1);
                    tracing::warn!(%peer, %refused, "refusing connection");
                }
            },
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

async fn read_hello<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> Result<Address, HelloError> {
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

/// An accepted connection: run the TLS handshake if TLS is on, read the hello (all within the
/// handshake timeout), give the connection a queue of its own under its inbound address
/// (never under the announced address: see [`Incoming::from`]), then read frames, which carry
/// that inbound address. The connection ends, both directions at once, when either its reader
/// or its writer does (the writer ends when the connection is idle), and only then gives up
/// its place among the admitted ones.
async fn inbound(inner: Arc<Inner>, stream: TcpStream, peer: SocketAddr, mut admitted: Admitted) {
    let timeout = inner.config.handshake_timeout;
    let Some(tls) = &inner.tls else {
        let (mut r, w) = stream.into_split();
        let announced = match read_hello(&mut r, timeout).await {
            Ok(announced) => announced,
            Err(error) => {
                bump(&inner.counters.rejected_connections, 1);
                tracing::warn!(%peer, %error, "closing connection: bad hello");
                return;
            }
        };
        admitted.handshake_done();
        serve_inbound(&inner, r, w, &announced, None, peer).await;
        drop(admitted);
        return;
    };
    let started = tokio::time::Instant::now();
    let mut stream =
        match tokio::time::timeout(timeout, tls.acceptor.accept(tls_socket(stream))).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                bump(&inner.counters.handshake_failures, 1);
                tracing::warn!(%peer, %error, "closing connection: TLS handshake failed");
                return;
            }
            Err(_) => {
                bump(&inner.counters.handshake_failures, 1);
                tracing::warn!(%peer, ?timeout, "closing connection: no TLS handshake in time");
                return;
            }
        };
    let Some(mut check) = chorus_core::tls::admitted_peer(&tls.auth, stream.get_ref().1) else {
        bump(&inner.counters.handshake_failures, 1);
        tracing::warn!(%peer, "closing connection: TLS handshake without an admitted peer key");
        return;
    };
    stream.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
    let (mut r, w) = tokio::io::split(stream);
    let left = timeout.saturating_sub(started.elapsed());
    let announced = match read_hello(&mut r, left).await {
        Ok(announced) => announced,
        Err(error) => {
            bump(&inner.counters.rejected_connections, 1);
            tracing::warn!(%peer, %error, "closing connection: bad hello");
            return;
        }
    };
    if let Err(taken) = tls.auth.book.may_use(&announced, &check.key()) {
        bump(&inner.counters.address_refusals, 1);
        tracing::warn!(%peer, %taken, "closing connection: hello address belongs to another member");
        return;
    }
    if !check.still_admitted() {
        bump(&inner.counters.revoked_closed, 1);
        tracing::warn!(%peer, key = %check.key(), "closing connection: key revoked during the handshake");
        return;
    }
    let (r, mut w) = (r, w);
    let left = timeout.saturating_sub(started.elapsed());
    let ack = async {
        w.write_all(&HELLO_ACK).await?;
        w.flush().await
    };
    match tokio::time::timeout(left, ack).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "connection broke before its acknowledgement");
            return;
        }
        Err(_) => {
            bump(&inner.counters.rejected_connections, 1);
            tracing::warn!(%peer, "closing connection: the acknowledgement could not be written in time");
            return;
        }
    }
    admitted.handshake_done();
    serve_inbound(&inner, r, w, &announced, Some(check), peer).await;
    drop(admitted);
}

/// An accepted connection after its hello: a writer for replies, frames read until either
/// side ends.
async fn serve_inbound<R, W>(
    inner: &Arc<Inner>,
    r: R,
    w: W,
    announced: &Address,
    check: Option<KeyCheck>,
    peer: SocketAddr,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // `None`: the transport is closing.
    let Some(writer) = inner.outboxes.register_inbound(announced) else {
        return;
    };
    let from = writer.addr().clone();
    tracing::debug!(%peer, %from, "accepted a connection");
    let activity = Activity::new(inner.now_ms());
    let mut writing = tokio::spawn(inbound_writer(
        Arc::clone(inner),
        writer,
        w,
        Arc::clone(&activity),
        check.clone(),
    ));
    tokio::select! {
        // The reader told the writer (unless the transport is closing, when the writer ends
        // with its queue): wait for it to finish.
        () = read_loop(inner, r, &from, &activity, check) => {
            let _ = writing.await;
        }
        // The writer closed the connection (idle, or a write failed): dropping the reader
        // here drops the read half, so the socket closes even if the peer never answers the
        // shutdown.
        _ = &mut writing => {}
    }
}

async fn inbound_writer<W: AsyncWrite + Unpin>(
    inner: Arc<Inner>,
    mut writer: Writer,
    mut w: W,
    activity: Arc<Activity>,
    check: Option<KeyCheck>,
) {
    let end = write_loop(&inner, &mut w, &mut writer, &activity, check).await;
    if let End::Broken(error) = &end {
        tracing::debug!(peer = %writer.addr(), %error, "inbound connection broke");
    }
    let dropped = writer.discard().await;
    count_dropped(&inner, &writer, dropped);
}

/// The writer of a dialled connection: dial (with backoff), write, redial when it breaks.
async fn outbound(inner: Arc<Inner>, mut writer: Writer) {
    let addr = writer.addr().clone();
    loop {
        writer.set_link(Link::Connecting);
        match inner.dial(&addr).await {
            Ok(dialled) => {
                bump(&inner.counters.dialed, 1);
                writer.connected();
                let end = match dialled {
                    Dialled::Plain(stream) => {
                        let (r, w) = stream.into_split();
                        run_dialled(&inner, r, w, &mut writer, None).await
                    }
                    Dialled::Tls(stream, check) => {
                        let (r, w) = tokio::io::split(*stream);
                        run_dialled(&inner, r, w, &mut writer, Some(check)).await
                    }
                };
                match end {
                    End::Drained => break,
                    End::Idle | End::PeerClosed | End::Revoked => {
                        // Retire this writer: new sends start a fresh one. Frames that raced
                        // in before the queue closed are still delivered, over a new dial.
                        if writer.retire().await {
                            break;
                        }
                    }
                    End::Broken(error) => {
                        tracing::debug!(peer = %addr, %error, "connection broke; redialling");
                    }
                }
            }
            Err(error) => {
                bump(&inner.counters.dial_failures, 1);
                tracing::debug!(peer = %addr, %error, "dial failed");
                let (dropped, again) = writer.back_off(Arc::new(error)).await;
                count_dropped(&inner, &writer, dropped);
                if !again {
                    break;
                }
            }
        }
    }
    // Refuse further frames before the entry goes, then count what is left.
    let dropped = writer.discard().await;
    count_dropped(&inner, &writer, dropped);
}

/// Reads and writes one dialled connection until it ends.
async fn run_dialled<R, W>(
    inner: &Arc<Inner>,
    r: R,
    mut w: W,
    writer: &mut Writer,
    check: Option<KeyCheck>,
) -> End
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    let activity = Activity::new(inner.now_ms());
    let reader = tokio::spawn({
        let (inner, addr, activity, check) = (
            Arc::clone(inner),
            writer.addr().clone(),
            Arc::clone(&activity),
            check.clone(),
        );
        async move { read_loop(&inner, r, &addr, &activity, check).await }
    });
    let end = write_loop(inner, &mut w, writer, &activity, check).await;
    reader.abort();
    end
}

fn count_dropped(inner: &Inner, writer: &Writer, dropped: u64) {
    if dropped > 0 {
        bump(&inner.counters.frames_dropped, dropped);
        tracing::debug!(peer = %writer.addr(), dropped, "dropped queued frames");
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
    /// The peer's key left the keyring.
    Revoked,
}

///
/// With TLS, `check` closes the connection before the first write after the peer's key left
/// the keyring (so a revoked peer gets nothing more, even if it never sends).
async fn write_loop<W: AsyncWrite + Unpin>(
    inner: &Inner,
    w: &mut W,
    writer: &mut Writer,
    activity: &Activity,
    mut check: Option<KeyCheck>,
) -> End {
    let max_batch = inner.config.effective_max_batch();
    let mut batch: Vec<Bytes> = Vec::with_capacity(max_batch);
    // One idle timer and one close notification for the connection's life, not one per
    // write: at high rates, registering and dropping a timer per batch was measurable.
    let idle = tokio::time::sleep(inner.config.idle_timeout);
    tokio::pin!(idle);
    let peer_closed = activity.reader_done.notified();
    tokio::pin!(peer_closed);
    loop {
        let first = tokio::select! {
            biased;
            frame = writer.next() => match frame {
                Some(frame) => frame,
                None => {
                    let _ = w.shutdown().await;
                    return End::Drained;
                }
            },
            _ = &mut peer_closed => return End::PeerClosed,
            _ = &mut idle => {
                let idle_for = inner.idle_for(&activity.last);
                if idle_for >= inner.config.idle_timeout {
                    bump(&inner.counters.idle_closed, 1);
                    let _ = w.shutdown().await;
                    return End::Idle;
                }
                let left = inner.config.idle_timeout - idle_for;
                idle.as_mut().reset(tokio::time::Instant::now() + left);
                continue;
            }
        };
        writer.fill_batch(first, &mut batch, max_batch, MAX_BATCH_BYTES);
        let n = batch.len() as u64;
        if let Some(check) = &mut check
            && !check.still_admitted()
        {
            bump(&inner.counters.frames_dropped, n);
            bump(&inner.counters.revoked_closed, 1);
            tracing::warn!(peer = %writer.addr(), key = %check.key(), "closing connection: key revoked");
            batch.clear();
            let _ = w.shutdown().await;
            return End::Revoked;
        }
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

/// Writes every frame, with as few vectored writes as the socket allows, and flushes (a no-op
/// for plain TCP; TLS may hold the tail of a record).
async fn write_frames<W: AsyncWrite + Unpin>(w: &mut W, frames: &[Bytes]) -> io::Result<()> {
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
    w.flush().await
}

/// Reads frames until the connection ends, the transport closes, or the peer misbehaves. In
/// every case but the transport closing, the writer is told to stop using the connection, so
/// a connection refused here is closed in both directions.
///
/// With TLS, `check` closes the connection at the first read after the peer's key left the
/// keyring.
async fn read_loop<R: AsyncRead + Unpin>(
    inner: &Inner,
    r: R,
    from: &Address,
    activity: &Activity,
    check: Option<KeyCheck>,
) {
    let mut closed = inner.outboxes.closed();
    read_frames(inner, r, from, activity, check, &mut closed).await;
    if !*closed.borrow() {
        activity.reader_done.notify_one();
    }
}

/// Makes room in `buf` for the rest of a frame of `total` bytes that starts at its front.
///
/// A frame up to [`FRAME_PREALLOC_LIMIT`] gets one allocation of its size (plus a little for
/// what follows it, and at least [`READ_CHUNK`] so small frames still come a large read at a
/// time), the bytes already read copied in once. Growing the buffer
/// as bytes arrived (`reserve` in steps) reallocated and copied the partial frame several
/// times per frame and, once the doubled capacity passed the allocator's mmap threshold,
/// faulted in fresh pages for every frame: 13% of the receiver's CPU over plain TCP and
/// 19% under TLS (whose reads come a record at a time) with 64 KiB frames. A longer claim
/// grows with the bytes that actually arrive.
fn make_room(buf: &mut BytesMut, total: usize) {
    let missing = total - buf.len();
    if buf.capacity() - buf.len() >= missing {
        return;
    }
    if total > FRAME_PREALLOC_LIMIT {
        buf.reserve(missing.min(READ_CHUNK));
        return;
    }
    let mut fresh = BytesMut::with_capacity((total + READ_CHUNK / 4).max(READ_CHUNK));
    fresh.extend_from_slice(buf);
    *buf = fresh;
}

async fn read_frames<R: AsyncRead + Unpin>(
    inner: &Inner,
    mut r: R,
    from: &Address,
    activity: &Activity,
    mut check: Option<KeyCheck>,
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
                    // Waits while the queue is full (in frames or bytes): the reader stops
                    // reading, and TCP flow control slows the sender. With room, the frame
                    // goes in without building the waiting futures.
                    if let Err(incoming) = inner.recv.try_push(incoming) {
                        tokio::select! {
                            () = inner.recv.push(incoming) => {}
                            _ = closed.wait_for(|c| *c) => return,
                        }
                    }
                    bump(&inner.counters.frames_received, 1);
                }
                Ok(Some(total)) => {
                    make_room(&mut buf, total);
                    break;
                }
                Ok(None) => {
                    // Not even a length prefix: room for a read's worth.
                    if buf.capacity() - buf.len() < READ_CHUNK / 8 {
                        buf.reserve(READ_CHUNK);
                    }
                    break;
                }
                Err(error) => {
                    reject(inner, from, &error.to_string());
                    return;
                }
            }
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
            Ok(_) => {
                activity.last.store(inner.now_ms(), Ordering::Relaxed);
                if let Some(check) = &mut check
                    && !check.still_admitted()
                {
                    bump(&inner.counters.revoked_closed, 1);
                    tracing::warn!(peer = %from, key = %check.key(), "closing connection: key revoked");
                    return;
                }
            }
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
    use chorus_core::replication::ReplicaMessage;
    use chorus_core::wire::Header;

    fn frame(text: &str) -> Bytes {
        let message = ReplicaMessage::Refused(chorus_core::replication::Refusal::Invalid {
            reason: text.to_owned(),
        });
        wire::encode(Header::message(), &message, 1 << 20).expect("encodes")
    }

    #[test]
    fn a_known_frame_gets_its_whole_room_at_once_and_a_huge_claim_does_not() {
        // A 100 KiB frame whose first 1,000 bytes have arrived, in a nearly full buffer.
        let total = 100 * 1024 + 20;
        let mut buf = BytesMut::with_capacity(1_200);
        buf.extend_from_slice(&[7u8; 1_000]);
        make_room(&mut buf, total);
        assert_eq!(
            &buf[..],
            &[7u8; 1_000][..],
            "the bytes read so far are kept"
        );
        assert!(buf.capacity() >= total, "room for the whole frame");
        let before = buf.capacity();
        let start = buf.as_ptr();
        make_room(&mut buf, total);
        assert_eq!(
            (buf.capacity(), buf.as_ptr()),
            (before, start),
            "no second allocation while the frame fills"
        );
        // A claim past the limit grows with what arrives, a read's worth at a time.
        let mut buf = BytesMut::with_capacity(16);
        buf.extend_from_slice(&[1u8; 16]);
        make_room(&mut buf, FRAME_PREALLOC_LIMIT + 1);
        assert!(buf.capacity() >= 16 + READ_CHUNK);
        assert!(buf.capacity() < FRAME_PREALLOC_LIMIT, "{}", buf.capacity());
        assert_eq!(&buf[..], &[1u8; 16][..]);
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
            transport::inbound_peer(&got.from),
            Some(a.local_addr()),
            "the frame names the accepted connection, and the hello a's listen address"
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

    /// The idle timer is armed once per connection and re-armed from the last activity: a
    /// connection that carries a frame every 100 ms outlives three 1 s idle timeouts (the
    /// margin, 900 ms, absorbs scheduling stalls of a loaded machine).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_connection_is_not_closed_as_idle() {
        let mut config = TcpConfig::local();
        config.idle_timeout = Duration::from_secs(1);
        let a = TcpTransport::bind("127.0.0.1:0", config.clone())
            .await
            .expect("bind a");
        let b = TcpTransport::bind("127.0.0.1:0", config)
            .await
            .expect("bind b");
        for i in 0..30 {
            a.send(&b.local_addr(), frame(&format!("frame {i}")))
                .await
                .expect("send");
            assert_eq!(recv(&b).await.frame, frame(&format!("frame {i}")));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(a.stats().dialed, 1, "{:?}", a.stats());
        assert_eq!(a.stats().idle_closed + b.stats().idle_closed, 0);
        a.close().await;
        b.close().await;
    }

    /// A raw connection to `to` that sends a hello announcing `claimed` (or nothing).
    async fn raw(to: &Address, claimed: Option<&Address>) -> TcpStream {
        let mut stream = TcpStream::connect(to.as_str()).await.expect("connect");
        if let Some(claimed) = claimed {
            let hello = transport::encode_hello(HELLO_MAGIC, claimed).expect("hello");
            stream.write_all(&hello).await.expect("hello");
        }
        stream
    }

    /// Whether `stream` sees the end of the stream (or an error) within 10 s.
    async fn closed_within_10s(stream: &mut TcpStream) -> bool {
        let mut sink = [0u8; 64];
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    /// Polls `condition` every 10 ms for up to 10 s; whether it held.
    async fn eventually(mut condition: impl FnMut() -> bool) -> bool {
        for _ in 0..1000 {
            if condition() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        condition()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_over_the_cap_are_refused_and_counted() {
        let mut config = TcpConfig::local();
        config.max_inbound_connections = NonZeroUsize::new(2).expect("non-zero");
        let b = TcpTransport::bind("127.0.0.1:0", config)
            .await
            .expect("bind");
        let to = b.local_addr();
        let me = Address::new("127.0.0.1:9");
        let _first = raw(&to, Some(&me)).await;
        let _second = raw(&to, Some(&me)).await;
        let mut third = raw(&to, Some(&me)).await;
        assert!(
            closed_within_10s(&mut third).await,
            "the third was not closed"
        );
        let stats = b.stats();
        assert_eq!(
            (stats.accepted, stats.refused_connections),
            (2, 1),
            "{stats:?}"
        );
        b.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handshakes_over_the_cap_are_refused_and_a_silent_client_is_dropped_in_time() {
        let mut config = TcpConfig::local();
        config.max_handshakes = NonZeroUsize::MIN;
        config.handshake_timeout = Duration::from_millis(200);
        let b = TcpTransport::bind("127.0.0.1:0", config)
            .await
            .expect("bind");
        let to = b.local_addr();
        let started = Instant::now();
        // Never sends its hello: it holds the only handshake place until the timeout.
        let mut silent = raw(&to, None).await;
        let mut second = raw(&to, None).await;
        assert!(
            closed_within_10s(&mut second).await,
            "the second was not refused"
        );
        assert_eq!(b.stats().refused_connections, 1, "{:?}", b.stats());
        assert!(
            closed_within_10s(&mut silent).await,
            "the silent client stayed"
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(b.stats().rejected_connections, 1, "{:?}", b.stats());
        // The place is free again.
        let me = Address::new("127.0.0.1:9");
        let _third = raw(&to, Some(&me)).await;
        // (`accepted` counts admitted connections: the silent one and this one.)
        assert!(
            eventually(|| b.stats().accepted == 2).await,
            "{:?}",
            b.stats()
        );
        assert_eq!(b.stats().refused_connections, 1);
        b.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_inbound_connection_is_closed_and_frees_its_place() {
        let mut config = TcpConfig::local();
        config.idle_timeout = Duration::from_millis(200);
        config.max_inbound_connections = NonZeroUsize::MIN;
        let b = TcpTransport::bind("127.0.0.1:0", config)
            .await
            .expect("bind");
        let peer = TcpTransport::bind("127.0.0.1:0", TcpConfig::local())
            .await
            .expect("bind peer");
        // b has a live connection to the peer; a client then claims the peer's address.
        b.send(&peer.local_addr(), frame("hi")).await.expect("send");
        recv(&peer).await;
        let mut idle = raw(&b.local_addr(), Some(&peer.local_addr())).await;
        assert!(
            closed_within_10s(&mut idle).await,
            "the idle connection stayed open"
        );
        assert!(b.stats().idle_closed >= 1, "{:?}", b.stats());
        // Closed in both directions: its place among the admitted connections is free.
        let _next = raw(&b.local_addr(), Some(&peer.local_addr())).await;
        assert!(
            eventually(|| b.stats().accepted == 2).await,
            "{:?}",
            b.stats()
        );
        assert_eq!(b.stats().refused_connections, 0, "{:?}", b.stats());
        b.close().await;
        peer.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_over_the_byte_bound_waits_instead_of_buffering() {
        let budget = 64 * 1024;
        let mut config = TcpConfig::local();
        config.recv_bytes = NonZeroUsize::new(budget).expect("non-zero");
        let b = TcpTransport::bind("127.0.0.1:0", config)
            .await
            .expect("bind b");
        let a = TcpTransport::bind("127.0.0.1:0", TcpConfig::local())
            .await
            .expect("bind a");
        let big = frame(&"x".repeat(16 * 1024));
        let n = 64;
        for _ in 0..n {
            a.send(&b.local_addr(), big.clone()).await.expect("send");
        }
        // Far more than the budget is on its way; b's queue fills up to it and stops there
        // (frames count in full, so the queue is full once one more would not fit).
        let full = |s: TcpStats| s.recv_queue_bytes as usize + big.len() > budget;
        assert!(
            eventually(|| full(b.stats()) || b.stats().frames_received == n).await,
            "{:?}",
            b.stats()
        );
        let stats = b.stats();
        assert!(
            stats.recv_queue_bytes as usize <= budget,
            "{} bytes queued over a budget of {budget}: {stats:?}",
            stats.recv_queue_bytes
        );
        assert!(stats.frames_received < n, "{stats:?}");
        // Nothing was lost: the reader waited, and every frame arrives as recv takes them.
        for _ in 0..n {
            assert_eq!(recv(&b).await.frame, big);
        }
        assert_eq!(b.stats().recv_queue_bytes, 0);
        a.close().await;
        b.close().await;
    }

    #[tokio::test]
    async fn an_address_peers_cannot_dial_is_refused() {
        let wildcard = TcpTransport::bind("0.0.0.0:0", TcpConfig::local()).await;
        assert!(
            matches!(&wildcard, Err(TransportError::Config(m)) if m.contains("`advertise`")),
            "{wildcard:?}"
        );
        let mut config = TcpConfig::local();
        config.advertise = Some(Address::new("0.0.0.0:7000"));
        let err = TcpTransport::bind("127.0.0.1:0", config)
            .await
            .expect_err("unspecified advertise");
        assert!(
            matches!(&err, TransportError::Config(m) if m.contains("`advertise`")),
            "{err}"
        );
        let mut config = TcpConfig::local();
        config.advertise = Some(Address::new("127.0.0.1:7000"));
        let t = TcpTransport::bind("0.0.0.0:0", config)
            .await
            .expect("a wildcard bind with an advertise address");
        assert_eq!(t.local_addr(), Address::new("127.0.0.1:7000"));
        t.close().await;
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
            let message = ReplicaMessage::Refused(chorus_core::replication::Refusal::Invalid {
                reason: "x".repeat(512 * 1024),
            });
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
