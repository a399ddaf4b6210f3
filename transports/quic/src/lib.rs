//! The QUIC transport for Chorus, registered as `"quic"`.
//!
//! # Security
//!
//! QUIC with TLS 1.3 (quinn on rustls, ring crypto). Every node has an [`Identity`] (a
//! certificate and key; [`Identity::generate`] makes a self-signed one with rcgen) and a set of
//! [`TrustedPeers`]. Authentication is mutual: the dialler checks the listener's certificate and
//! the listener requires and checks the dialler's; a certificate not in the set fails the
//! handshake, so an untrusted peer can neither send frames nor receive them. See [`tls`].
//!
//! # Connections and addressing
//!
//! One connection per peer, kept and reused, filed under the peer's *listen* address. Right
//! after the handshake the dialler opens a unidirectional stream carrying a *hello* with its
//! own listen address (see `docs/PROTOCOL.md`); the listener files the connection under that
//! address and sends replies over it. Frames from a dialled connection carry the dialled
//! address as [`Incoming::from`], frames from an accepted one the address its hello announced.
//! The hello itself is inside the authenticated connection, but it is not bound to the
//! certificate: a trusted peer could announce another trusted peer's address.
//!
//! # Sending: a writer per peer, a stream per batch
//!
//! `send` puts the frame on the peer's bounded queue ([`QuicConfig::queue_capacity`]) and
//! returns, as the TCP transport does (the queueing, backpressure and redial rules are shared:
//! see [`chorus_core::transport::outbox`]). One writer per peer, on the peer's connection, takes
//! every frame already queued, up to [`QuicConfig::max_batch`] frames or about 256 KiB, and sends them on
//! one fresh unidirectional stream, which it finishes at once. A lone frame therefore travels
//! alone on its own stream, and frames sent at different moments never share one; under load,
//! frames queued together share a stream, its packets and its per-stream costs.
//!
//! Streams are independent: a lost packet delays only the frames of its own stream, never
//! those of another (no head-of-line blocking between batches), at the price that frames from
//! one sender may arrive in a different order than they were sent. Within a stream, frames
//! arrive in order.
//!
//! # Receiving
//!
//! Each stream is read as it arrives and cut into frames with [`wire::FrameCutter`]: every
//! length prefix is checked against the maximum frame length before anything is buffered, and
//! every magic as soon as it arrives; a frame that arrives within one packet is handed to
//! `recv` without a copy. A stream that is not a sequence of whole frames (an oversized or
//! malformed frame, a stream that ends mid-frame) or that the peer resets closes that
//! connection (counted in [`QuicStats::rejected_connections`], logged); bytes that are not
//! QUIC at all are dropped by quinn before any connection exists. An empty stream is the
//! peer's goodbye (see *Shutdown*).
//!
//! Complete frames wait in the queue for `recv` ([`QuicConfig::recv_capacity`]); while it is
//! full, readers stop reading, and QUIC flow control ([`QuicConfig::receive_window`]) stops the
//! sender. A frame still arriving is held by its stream's reader: at most
//! [`QuicConfig::max_concurrent_streams`] streams of a connection are read at once, each
//! holding at most one partial frame of up to [`QuicConfig::max_frame_len`] bytes (sized from
//! the bytes that arrived, see [`wire::FrameCutter`]). That product (16 GiB with the defaults)
//! is what a misbehaving *trusted* peer could make a node hold; lower either setting where
//! peers are not trusted that far.
//!
//! # Failures
//!
//! A dial that does not complete within [`QuicConfig::connect_timeout`] makes `send` fail with
//! [`TransportError::Timeout`], a refused one (including a failed certificate check) with
//! [`TransportError::Unreachable`]; frames queued for that peer are dropped and counted, sends
//! fail at once with `Unreachable` while a redial is pending, and redials follow a jittered,
//! exponentially growing backoff as long as sends keep coming. A connection that is lost (the
//! peer closed it, or it was idle for [`QuicConfig::idle_timeout`]) retires its writer; frames
//! that raced into the queue are sent over a new dial, and the next `send` dials afresh.
//!
//! # Packets
//!
//! Path MTU discovery grows packets from 1200 bytes up to [`QuicConfig::max_udp_payload`]:
//! Ethernet-sized on a LAN, 64 KiB on loopback. The UDP socket's buffers are raised to
//! [`QuicConfig::socket_buffer`].
//!
//! # Unreliable frames
//!
//! [`Transport::send_unreliable`] sends a frame that fits one packet as a QUIC datagram on the
//! peer's connection (when [`QuicConfig::datagrams`] is on and the peer accepts them): no
//! stream, no retransmission, no waiting behind lost packets; membership messages go this
//! way. A frame too large for a datagram, or one for a peer without a connection yet, goes
//! through `send` (and the dial it starts). A received datagram must be exactly one frame;
//! anything else, or one that finds the `recv` queue full, is dropped and counted
//! ([`QuicStats::datagrams_rejected`], [`QuicStats::datagrams_dropped`]): datagrams are
//! unreliable, so neither closes the connection or makes the reader wait.
//!
//! # Shutdown
//!
//! [`close`](Transport::close) refuses new sends and lets every writer send what its queue
//! holds. Then each writer opens an empty stream, the goodbye, and waits (up to
//! [`QuicConfig::close_timeout`]) for the peer to close the connection, which the peer does
//! once it has read every earlier stream (QUIC acknowledgements are not enough: a peer drops
//! acknowledged but unread stream data when a connection closes). A closing transport keeps
//! reading its connections, dropping the frames, so that two peers closing at once answer
//! each other's goodbye; a dial in progress is abandoned. Then `close` closes the endpoint and
//! waits for the connections to finish closing, which releases the port; all of it within
//! the close timeout (a connection still closing then frees the port a little later).
//! Dropping the transport without `close` closes the endpoint at once: frames not yet read by
//! the peer may be lost.

#![deny(missing_docs)]

mod config;
mod io_task;
pub mod tls;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chorus_core::registry::{Registry, TransportSpec};
use chorus_core::transport::outbox::{Backoff, Jitter, Link, OutboxConfig, Outboxes, Writer};
use chorus_core::transport::{self, Address, Incoming, SharedTransport, Transport, TransportError};
use chorus_core::wire::{self, FrameCutter};
use futures::stream::{FuturesUnordered, StreamExt};
use io_task::{IoTask, lock};
use quinn::{Connection, Endpoint, VarInt};
use tokio::sync::mpsc;

pub use config::{MAX_UDP_PAYLOAD, MIN_UDP_PAYLOAD, QuicConfig};
pub use tls::{Identity, TrustedPeers};

/// The registry name of this transport.
pub const SCHEME: &str = "quic";

/// The ALPN protocol both ends must offer. Version 2 carries several frames per stream and
/// the goodbye stream (`docs/PROTOCOL.md`); a node speaking version 1 fails the handshake
/// rather than misreading streams.
pub const ALPN: &[u8] = b"chorus/2";

/// The hello stream: a 4-byte big-endian length of what follows, [`HELLO_MAGIC`], then the
/// dialler's listen address in UTF-8.
pub const HELLO_MAGIC: [u8; 4] = *b"CHQ1";

/// Longest listen address a hello may carry, in bytes.
pub use chorus_core::transport::MAX_HELLO_ADDR_LEN;

/// Bytes of datagrams buffered per connection, each way; beyond it the oldest are dropped.
const DATAGRAM_BUFFER: usize = 1024 * 1024;

/// Most bytes a writer gathers onto one stream (a single larger frame still gets its own).
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// QUIC application error codes this transport closes connections with.
mod code {
    /// The transport is closing.
    pub(crate) const CLOSING: u32 = 0;
    /// The peer sent a bad hello.
    pub(crate) const BAD_HELLO: u32 = 1;
    /// The peer sent a stream that is not a sequence of valid frames.
    pub(crate) const BAD_FRAME: u32 = 2;
}

/// Registers the `"quic"` factory: binds [`TransportSpec::bind`] with the settings, identity
/// and trusted peers of [`QuicConfig::from_options`] (the `cert`, `key` and `trust` options
/// are required).
pub fn register(registry: &mut Registry) {
    registry
        .register_transport(SCHEME, |spec: TransportSpec| {
            Box::pin(async move {
                let (config, identity, trusted) = QuicConfig::from_options(&spec.options)?;
                let transport = QuicTransport::bind(&spec.bind, config, identity, trusted).await?;
                Ok(SharedTransport::new(transport))
            })
        })
        .expect("the quic transport is registered once");
}

/// Counters of a [`QuicTransport`]. See [`QuicTransport::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuicStats {
    /// Connections this transport dialled successfully.
    pub dialed: u64,
    /// Dials that failed or timed out (an untrusted certificate included).
    pub dial_failures: u64,
    /// Connections accepted from peers.
    pub accepted: u64,
    /// Incoming handshakes that failed (an untrusted certificate included).
    pub handshake_failures: u64,
    /// Connections closed because of a bad hello or a stream that was not whole, valid frames.
    pub rejected_connections: u64,
    /// Frames written to streams.
    pub frames_sent: u64,
    /// Streams sent (`frames_sent / streams_sent` is the mean batch).
    pub streams_sent: u64,
    /// Frames received and handed to `recv`, those that came as datagrams included.
    pub frames_received: u64,
    /// Accepted frames that were never written: queued when a dial failed, in a batch whose
    /// stream failed, or still queued when the connection or the transport went away.
    pub frames_dropped: u64,
    /// Frames sent as datagrams (by `send_unreliable`).
    pub datagrams_sent: u64,
    /// Datagrams received and handed to `recv`.
    pub datagrams_received: u64,
    /// Datagrams dropped on arrival because the queue for `recv` was full.
    pub datagrams_dropped: u64,
    /// Datagrams dropped because they were not exactly one frame (a peer's bug).
    pub datagrams_rejected: u64,
    /// Futures of the transport's I/O task that panicked (each was dropped and logged; a
    /// non-zero count is a bug).
    pub task_panics: u64,
}

/// One live connection as QUIC sees it. See [`QuicTransport::connections`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ConnectionInfo {
    /// The peer's listen address (dialled, or announced by its hello).
    pub peer: Address,
    /// The UDP address packets go to.
    pub remote: SocketAddr,
    /// The smoothed round-trip time.
    pub rtt: Duration,
    /// The largest UDP payload in use, as found by path MTU discovery.
    pub mtu: u16,
    /// The congestion window, in bytes.
    pub congestion_window: u64,
    /// Packets sent on the connection.
    pub sent_packets: u64,
    /// Packets declared lost (and resent).
    pub lost_packets: u64,
}

#[derive(Debug, Default)]
struct Counters {
    dialed: AtomicU64,
    dial_failures: AtomicU64,
    accepted: AtomicU64,
    handshake_failures: AtomicU64,
    rejected_connections: AtomicU64,
    frames_sent: AtomicU64,
    streams_sent: AtomicU64,
    frames_received: AtomicU64,
    frames_dropped: AtomicU64,
    datagrams_sent: AtomicU64,
    datagrams_received: AtomicU64,
    datagrams_dropped: AtomicU64,
    datagrams_rejected: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

struct Inner {
    local: Address,
    config: QuicConfig,
    max_frame_len: usize,
    /// Runs quinn's drivers and every future below (see [`io_task`]).
    io: IoTask,
    endpoint: Endpoint,
    outboxes: Arc<Outboxes>,
    /// Live connections by quinn's stable id, for [`QuicTransport::connections`].
    connections: Mutex<HashMap<usize, (Address, Connection)>>,
    /// The connection each peer's writer uses, for datagrams.
    routes: Mutex<HashMap<Address, Connection>>,
    incoming: mpsc::Sender<Incoming>,
    jitter: Jitter,
    hello: Bytes,
    counters: Counters,
}

impl Inner {
    fn is_closed(&self) -> bool {
        self.outboxes.is_closed()
    }

    /// Handshake and hello, within the connect timeout.
    async fn dial(&self, to: &Address) -> Result<Connection, String> {
        let timeout = self.config.connect_timeout;
        let attempt = async {
            let addr = resolve(to).await?;
            let connecting = self
                .endpoint
                .connect(addr, tls::SERVER_NAME)
                .map_err(|e| e.to_string())?;
            let conn = connecting.await.map_err(|e| e.to_string())?;
            let mut hello = conn.open_uni().await.map_err(|e| e.to_string())?;
            hello
                .write_all(&self.hello)
                .await
                .map_err(|e| format!("writing the hello: {e}"))?;
            hello.finish().map_err(|e| e.to_string())?;
            Ok::<_, String>(conn)
        };
        let mut closed = self.outboxes.closed();
        tokio::select! {
            attempt = tokio::time::timeout(timeout, attempt) => match attempt {
                Ok(result) => result,
                Err(_) => Err(format!("no connection within {timeout:?}")),
            },
            // `close` need not wait out a dial to a node that is gone.
            _ = closed.wait_for(|c| *c) => Err("the transport is closing".to_owned()),
        }
    }

    /// The checks every outgoing frame passes: an open transport, then
    /// [`transport::check_frame`] (frames share streams, so one whose prefix disagreed with its
    /// length would make the receiver reject the whole stream).
    fn check_frame(&self, frame: &[u8]) -> Result<(), TransportError> {
        if self.is_closed() {
            return Err(TransportError::Closed);
        }
        transport::check_frame(frame, self.max_frame_len)
    }

    fn reject(&self, conn: &Connection, code: u32, why: &str) {
        bump(&self.counters.rejected_connections, 1);
        tracing::warn!(remote = %conn.remote_address(), why, "closing connection");
        conn.close(VarInt::from_u32(code), why.as_bytes());
    }
}

async fn resolve(to: &Address) -> Result<SocketAddr, String> {
    if let Ok(addr) = to.as_str().parse::<SocketAddr>() {
        return Ok(addr);
    }
    tokio::net::lookup_host(to.as_str())
        .await
        .map_err(|e| format!("resolving {to}: {e}"))?
        .next()
        .ok_or_else(|| format!("{to} resolves to no address"))
}

/// quinn's runtime for one transport: Tokio's timers and sockets, with every driver future on
/// the transport's [`IoTask`].
#[derive(Debug)]
struct IoRuntime(IoTask);

impl quinn::Runtime for IoRuntime {
    fn new_timer(&self, at: std::time::Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        quinn::TokioRuntime.new_timer(at)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.0.spawn(future);
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        quinn::TokioRuntime.wrap_udp_socket(socket)
    }

    fn now(&self) -> std::time::Instant {
        quinn::TokioRuntime.now()
    }
}

/// A QUIC [`Transport`]. See the [crate documentation](crate).
pub struct QuicTransport {
    inner: Arc<Inner>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Incoming>>,
}

impl fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicTransport")
            .field("local", &self.inner.local)
            .field("closed", &self.inner.is_closed())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn tls_error(e: rustls::Error) -> TransportError {
    TransportError::Config(format!("TLS configuration: {e}"))
}

/// The server and client sides of an endpoint: TLS 1.3 only, this node's certificate, the
/// pinned peers, ALPN, and the transport settings.
fn endpoint_configs(
    config: &QuicConfig,
    identity: &Identity,
    trusted: TrustedPeers,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TransportError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = tls::PinnedVerifier::new(trusted, &provider);
    let chain = vec![identity.certificate().clone()];

    let mut server_tls = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain.clone(), identity.key())
        .map_err(tls_error)?;
    server_tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut client_tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, identity.key())
        .map_err(tls_error)?;
    client_tls.alpn_protocols = vec![ALPN.to_vec()];

    let transport_config = Arc::new(transport_config(config)?);
    let server_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)
        .map_err(|e| TransportError::Config(format!("QUIC TLS: {e}")))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(Arc::clone(&transport_config));
    let client_crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)
        .map_err(|e| TransportError::Config(format!("QUIC TLS: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(transport_config);
    Ok((server, client))
}

impl QuicTransport {
    /// Binds a UDP socket at `bind` (`ip:port`; port 0 picks a free one) and starts accepting
    /// connections from peers whose certificate is in `trusted` (this node's own certificate
    /// is added). Fails with [`TransportError::AddressInUse`] if the port is taken.
    pub async fn bind(
        bind: &str,
        config: QuicConfig,
        identity: Identity,
        mut trusted: TrustedPeers,
    ) -> Result<Self, TransportError> {
        config.validate()?;
        trusted.add(identity.certificate());
        let bind_addr = resolve(&Address::new(bind))
            .await
            .map_err(|e| TransportError::Config(format!("bind address: {e}")))?;

        let (server, client) = endpoint_configs(&config, &identity, trusted)?;
        let socket = std::net::UdpSocket::bind(bind_addr).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                TransportError::AddressInUse(Address::new(bind))
            } else {
                TransportError::Io(e)
            }
        })?;
        size_socket_buffers(&socket, config.socket_buffer.get());
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config
            .max_udp_payload_size(config.max_udp_payload)
            .map_err(|e| TransportError::Config(format!("option `max_udp_payload`: {e}")))?;
        let io = IoTask::new();
        tokio::spawn(io.clone().run());
        let runtime = Arc::new(IoRuntime(io.clone()));
        let mut endpoint = Endpoint::new(endpoint_config, Some(server), socket, runtime)?;
        endpoint.set_default_client_config(client);
        let bound = endpoint.local_addr()?;
        let local = config
            .advertise
            .clone()
            .unwrap_or_else(|| Address::new(bound.to_string()));
        let hello = transport::encode_hello(HELLO_MAGIC, &local)?;
        let outboxes = Outboxes::new(OutboxConfig {
            queue_capacity: config.queue_capacity,
            queue_wait: config.queue_wait,
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
        });
        let (incoming, rx) = mpsc::channel(config.recv_capacity.get());
        let inner = Arc::new(Inner {
            local,
            max_frame_len: config.effective_max_frame_len(),
            jitter: Jitter::new(config.jitter_seed, u64::from(bound.port())),
            config,
            io,
            endpoint,
            outboxes,
            connections: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            incoming,
            hello,
            counters: Counters::default(),
        });
        inner.io.spawn(accept_loop(Arc::clone(&inner)));
        Ok(QuicTransport {
            inner,
            rx: tokio::sync::Mutex::new(rx),
        })
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> QuicStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        QuicStats {
            dialed: get(&c.dialed),
            dial_failures: get(&c.dial_failures),
            accepted: get(&c.accepted),
            handshake_failures: get(&c.handshake_failures),
            rejected_connections: get(&c.rejected_connections),
            frames_sent: get(&c.frames_sent),
            streams_sent: get(&c.streams_sent),
            frames_received: get(&c.frames_received),
            frames_dropped: get(&c.frames_dropped),
            datagrams_sent: get(&c.datagrams_sent),
            datagrams_received: get(&c.datagrams_received),
            datagrams_dropped: get(&c.datagrams_dropped),
            datagrams_rejected: get(&c.datagrams_rejected),
            task_panics: self.inner.io.panicked(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &QuicConfig {
        &self.inner.config
    }

    /// Queues a checked frame for `to` (see [`chorus_core::transport::outbox`]).
    async fn queue(&self, to: &Address, frame: Bytes) -> Result<(), TransportError> {
        let inner = &self.inner;
        inner
            .outboxes
            .send(to, frame, |writer| {
                inner.io.spawn(outbound(Arc::clone(inner), writer));
            })
            .await
    }

    /// Peers with a connection (or a writer dialling one) right now.
    pub fn connected_peers(&self) -> Vec<Address> {
        self.inner.outboxes.addresses()
    }

    /// Every live connection with its path figures, sorted by peer.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let connections = lock(&self.inner.connections);
        let mut infos: Vec<ConnectionInfo> = connections
            .values()
            .map(|(peer, conn)| {
                let path = conn.stats().path;
                ConnectionInfo {
                    peer: peer.clone(),
                    remote: conn.remote_address(),
                    rtt: path.rtt,
                    mtu: path.current_mtu,
                    congestion_window: path.cwnd,
                    sent_packets: path.sent_packets,
                    lost_packets: path.lost_packets,
                }
            })
            .collect();
        infos.sort_by(|a, b| a.peer.cmp(&b.peer));
        infos
    }
}

/// Raises the socket's buffers towards `bytes`; the kernel may cap the request.
fn size_socket_buffers(socket: &std::net::UdpSocket, bytes: usize) {
    let sock = socket2::SockRef::from(socket);
    let results = [
        (
            "receive",
            sock.set_recv_buffer_size(bytes)
                .and_then(|()| sock.recv_buffer_size()),
        ),
        (
            "send",
            sock.set_send_buffer_size(bytes)
                .and_then(|()| sock.send_buffer_size()),
        ),
    ];
    for (which, result) in results {
        match result {
            // Linux reports twice what was asked for (half is its bookkeeping), or less if
            // net.core.rmem_max / wmem_max capped it.
            Ok(granted) if granted >= bytes => {}
            Ok(granted) => tracing::warn!(
                which,
                requested = bytes,
                granted,
                "the kernel capped the UDP socket buffer (raise net.core.rmem_max / wmem_max)"
            ),
            Err(error) => tracing::warn!(which, bytes, %error, "cannot size the UDP socket buffer"),
        }
    }
}

fn transport_config(config: &QuicConfig) -> Result<quinn::TransportConfig, TransportError> {
    let varint = |name: &str, value: usize| {
        VarInt::try_from(value as u64)
            .map_err(|_| TransportError::Config(format!("option `{name}` is too large")))
    };
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(VarInt::from_u32(config.max_concurrent_streams.get()));
    t.max_concurrent_bidi_streams(VarInt::from_u32(0));
    let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
        .map_err(|_| TransportError::Config("option `idle_timeout_ms` is too large".to_owned()))?;
    t.max_idle_timeout(Some(idle));
    t.keep_alive_interval(None);
    t.initial_rtt(config.initial_rtt);
    t.send_window(config.send_window.get() as u64);
    let window = varint("receive_window", config.receive_window.get())?;
    t.receive_window(window);
    // One stream may use the whole connection window: a batch is at most 256 KiB, but a
    // single frame may be as long as the maximum frame.
    t.stream_receive_window(window);
    t.datagram_receive_buffer_size(config.datagrams.then_some(DATAGRAM_BUFFER));
    t.datagram_send_buffer_size(DATAGRAM_BUFFER);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(config.max_udp_payload);
    t.mtu_discovery_config(Some(mtu));
    t.enable_segmentation_offload(config.segmentation_offload());
    Ok(t)
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        self.inner.outboxes.shut();
        self.inner
            .endpoint
            .close(VarInt::from_u32(code::CLOSING), b"closing");
    }
}

impl Transport for QuicTransport {
    fn local_addr(&self) -> Address {
        self.inner.local.clone()
    }

    fn max_frame_len(&self) -> usize {
        self.inner.max_frame_len
    }

    async fn send(&self, to: &Address, frame: Bytes) -> Result<(), TransportError> {
        self.inner.check_frame(&frame)?;
        self.queue(to, frame).await
    }

    async fn send_unreliable(&self, to: &Address, frame: Bytes) -> Result<(), TransportError> {
        let inner = &self.inner;
        inner.check_frame(&frame)?;
        if inner.config.datagrams {
            let route = lock(&inner.routes).get(to).cloned();
            if let Some(conn) = route
                && conn
                    .max_datagram_size()
                    .is_some_and(|max| frame.len() <= max)
                && conn.send_datagram(frame.clone()).is_ok()
            {
                bump(&inner.counters.datagrams_sent, 1);
                return Ok(());
            }
        }
        self.queue(to, frame).await
    }

    async fn recv(&self) -> Result<Incoming, TransportError> {
        let mut closed = self.inner.outboxes.closed();
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
        let inner = &self.inner;
        inner.outboxes.shut();
        // One deadline for both waits: `close` returns within the close timeout.
        let limit = inner.config.close_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        if !inner.outboxes.wait_writers(limit).await {
            tracing::warn!(local = %inner.local, ?limit, "close gave up waiting for peers to read");
        }
        inner
            .endpoint
            .close(VarInt::from_u32(code::CLOSING), b"closing");
        if tokio::time::timeout_at(deadline, inner.endpoint.wait_idle())
            .await
            .is_err()
        {
            tracing::debug!(local = %inner.local, "connections still closing; the port is freed when they are");
        }
    }
}

/// The writer of a dialled connection: dial (with backoff), write, redial when frames are left
/// after the connection went away.
async fn outbound(inner: Arc<Inner>, mut writer: Writer) {
    let mut backoff = Backoff::new(inner.config.backoff_min, inner.config.backoff_max);
    loop {
        writer.set_link(Link::Connecting);
        match inner.dial(writer.addr()).await {
            Ok(conn) => {
                bump(&inner.counters.dialed, 1);
                backoff.reset();
                writer.set_link(Link::Up);
                inner.io.spawn(read_streams(
                    Arc::clone(&inner),
                    conn.clone(),
                    writer.addr().clone(),
                ));
                match write_loop(&inner, &conn, &mut writer).await {
                    End::Drained => return,
                    End::Lost(reason) => {
                        tracing::debug!(peer = %writer.addr(), %reason, "connection lost");
                        // Retire this writer: new sends start a fresh one. Frames that raced
                        // in before the queue closed are still delivered, over a new dial.
                        if writer.retire().await {
                            return;
                        }
                    }
                }
            }
            Err(reason) => {
                bump(&inner.counters.dial_failures, 1);
                tracing::debug!(peer = %writer.addr(), %reason, "dial failed");
                let (dropped, again) = writer.back_off(&reason, &mut backoff, &inner.jitter).await;
                bump(&inner.counters.frames_dropped, dropped);
                if !again {
                    break;
                }
            }
        }
    }
    bump(&inner.counters.frames_dropped, writer.discard().await);
}

/// How a writer's loop over one connection ended.
enum End {
    /// The queue ended (the transport is closing) and everything in it was sent; the peer has
    /// read it all (or the close timeout passed).
    Drained,
    /// The connection went away.
    Lost(String),
}

/// Sends the queue's frames on `conn`, a stream per batch, until the queue ends or the
/// connection goes away. When the queue ends because the transport is closing, says goodbye
/// (see [`say_goodbye`]); a retired writer that has delivered the frames it held just ends,
/// leaving the connection to the idle timeout.
async fn write_loop(inner: &Inner, conn: &Connection, writer: &mut Writer) -> End {
    // A retired writer only delivers leftovers: datagrams keep the live writer's connection.
    let mut route = (!writer.is_retired()).then(|| Route::new(inner, writer.addr(), conn));
    let max_batch = inner.config.max_batch.get();
    let mut batch: Vec<Bytes> = Vec::with_capacity(max_batch);
    let lost = conn.closed();
    tokio::pin!(lost);
    loop {
        let first = tokio::select! {
            biased;
            frame = writer.next() => match frame {
                Some(frame) => frame,
                None => {
                    drop(route.take());
                    if writer.transport_closed() {
                        say_goodbye(inner, conn, lost, writer.addr()).await;
                    }
                    return End::Drained;
                }
            },
            error = &mut lost => return End::Lost(error.to_string()),
        };
        writer.fill_batch(first, &mut batch, max_batch, MAX_BATCH_BYTES);
        let frames = batch.len() as u64;
        match write_stream(conn, &mut batch).await {
            Ok(()) => {
                bump(&inner.counters.frames_sent, frames);
                bump(&inner.counters.streams_sent, 1);
                batch.clear();
            }
            Err(Unsent::Untouched(reason)) => {
                // Not a byte went out: the frames go first on the next connection.
                writer.put_back(batch.drain(..));
                return End::Lost(reason);
            }
            Err(Unsent::Lost(reason)) => {
                bump(&inner.counters.frames_dropped, frames);
                batch.clear();
                return End::Lost(reason);
            }
        }
    }
}

/// Why a batch was not sent.
enum Unsent {
    /// No stream could be opened: nothing of the batch was written.
    Untouched(String),
    /// Writing failed part-way: the peer may have some of it, but not as whole frames.
    Lost(String),
}

/// Sends `batch` on a new stream and finishes it.
async fn write_stream(conn: &Connection, batch: &mut [Bytes]) -> Result<(), Unsent> {
    let mut stream = conn
        .open_uni()
        .await
        .map_err(|e| Unsent::Untouched(e.to_string()))?;
    stream
        .write_all_chunks(batch)
        .await
        .map_err(|e| Unsent::Lost(e.to_string()))?;
    stream.finish().map_err(|e| Unsent::Lost(e.to_string()))
}

/// The graceful end of a connection whose writer has sent everything: an empty stream tells
/// the peer that no stream follows; the peer reads every stream it has, hands their frames to
/// `recv`, and then closes the connection, which this waits for (up to the close timeout).
///
/// Waiting for QUIC's acknowledgements would not be enough: a peer discards stream data it
/// has acknowledged but not yet read once the connection is closed.
async fn say_goodbye(
    inner: &Inner,
    conn: &Connection,
    closed_by_peer: Pin<&mut impl Future<Output = quinn::ConnectionError>>,
    peer: &Address,
) {
    let limit = inner.config.close_timeout;
    let goodbye = async {
        let mut stream = conn.open_uni().await.map_err(|e| e.to_string())?;
        stream.finish().map_err(|e| e.to_string())?;
        Ok::<_, String>(closed_by_peer.await)
    };
    match tokio::time::timeout(limit, goodbye).await {
        Ok(Ok(_)) => {}
        Ok(Err(reason)) => tracing::debug!(%peer, %reason, "connection gone before goodbye"),
        Err(_) => {
            tracing::warn!(%peer, ?limit, "the peer did not finish reading before the close timeout");
            conn.close(VarInt::from_u32(code::CLOSING), b"goodbye unanswered");
        }
    }
}

async fn accept_loop(inner: Arc<Inner>) {
    let mut closed = inner.outboxes.closed();
    loop {
        let incoming = tokio::select! {
            _ = closed.wait_for(|c| *c) => return,
            incoming = inner.endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { return };
        inner.io.spawn(inbound(Arc::clone(&inner), incoming));
    }
}

/// An incoming connection: handshake, hello, a writer for replies, then its streams.
async fn inbound(inner: Arc<Inner>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let timeout = inner.config.connect_timeout;
    let conn = match tokio::time::timeout(timeout, async { incoming.accept()?.await }).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(error)) => {
            bump(&inner.counters.handshake_failures, 1);
            tracing::warn!(%remote, %error, "handshake failed");
            return;
        }
        Err(_) => {
            bump(&inner.counters.handshake_failures, 1);
            tracing::warn!(%remote, "handshake timed out");
            return;
        }
    };
    bump(&inner.counters.accepted, 1);
    let from = match tokio::time::timeout(timeout, read_hello(&conn)).await {
        Ok(Ok(from)) => from,
        Ok(Err(why)) => return inner.reject(&conn, code::BAD_HELLO, &why),
        Err(_) => return inner.reject(&conn, code::BAD_HELLO, "no hello in time"),
    };
    if let Some(writer) = inner.outboxes.register_inbound(&from) {
        inner
            .io
            .spawn(inbound_writer(Arc::clone(&inner), conn.clone(), writer));
    }
    read_streams(inner, conn, from).await;
}

/// Sends replies over an accepted connection until it or the transport goes away.
async fn inbound_writer(inner: Arc<Inner>, conn: Connection, mut writer: Writer) {
    if let End::Lost(reason) = write_loop(&inner, &conn, &mut writer).await {
        tracing::debug!(peer = %writer.addr(), %reason, "inbound connection lost");
    }
    bump(&inner.counters.frames_dropped, writer.discard().await);
}

async fn read_hello(conn: &Connection) -> Result<Address, String> {
    let mut stream = conn.accept_uni().await.map_err(|e| e.to_string())?;
    let body = stream
        .read_to_end(4 + HELLO_MAGIC.len() + MAX_HELLO_ADDR_LEN)
        .await
        .map_err(|e| e.to_string())?;
    let (prefix, rest) = body.split_first_chunk::<4>().ok_or("hello too short")?;
    if u32::from_be_bytes(*prefix) as usize != rest.len() {
        return Err("hello length disagrees".to_owned());
    }
    transport::decode_hello_body(HELLO_MAGIC, rest).map_err(|e| e.to_string())
}

/// Accepts the peer's streams and reads them, until the connection or the transport closes.
/// The streams of a connection are read concurrently inside this one future (a stream usually
/// arrives whole in one packet), at most [`QuicConfig::max_concurrent_streams`] at once.
///
/// An empty stream is the peer's goodbye (see [`say_goodbye`]): no stream follows it, so once
/// every stream before it is read, this closes the connection.
async fn read_streams(inner: Arc<Inner>, conn: Connection, from: Address) {
    let _listed = Listed::new(&inner, &conn, &from);
    let max_readers = inner.config.max_concurrent_streams.get() as usize;
    let mut readers = FuturesUnordered::new();
    let mut goodbye = false;
    // Kept across iterations, so each stays registered with quinn instead of re-registering
    // every time another branch completes.
    let mut accept = std::pin::pin!(conn.accept_uni());
    let mut datagram = std::pin::pin!(conn.read_datagram());
    loop {
        tokio::select! {
            stream = &mut accept, if !goodbye && readers.len() < max_readers => match stream {
                Ok(stream) => {
                    accept.set(conn.accept_uni());
                    readers.push(read_stream(&inner, &conn, stream, &from));
                }
                Err(error) => {
                    tracing::debug!(peer = %from, %error, "connection ended");
                    return;
                }
            },
            Some(read) = readers.next(), if !readers.is_empty() => match read {
                Read::Frames => {}
                Read::Goodbye => goodbye = true,
                Read::Failed => return,
            },
            got = &mut datagram, if inner.config.datagrams => match got {
                Ok(frame) => {
                    datagram.set(conn.read_datagram());
                    take_datagram(&inner, &from, frame);
                }
                Err(error) => {
                    tracing::debug!(peer = %from, %error, "connection ended");
                    return;
                }
            },
        }
        // The peer is closing and has sent everything: nothing more to read, and what this
        // side would still send it would drop.
        if goodbye && readers.is_empty() {
            conn.close(VarInt::from_u32(code::CLOSING), b"goodbye");
            return;
        }
    }
}

/// A received datagram: exactly one frame (length and magic checked, as on streams) goes to
/// `recv` if its queue has room; anything else is dropped and counted. Datagrams are
/// unreliable, so neither case closes the connection or waits.
fn take_datagram(inner: &Inner, from: &Address, frame: Bytes) {
    let whole = matches!(wire::frame_len(&frame, inner.max_frame_len), Ok(Some(n)) if n == frame.len())
        && frame[wire::PREFIX_LEN..wire::PREFIX_LEN + wire::MAGIC.len()] == wire::MAGIC;
    if !whole {
        bump(&inner.counters.datagrams_rejected, 1);
        tracing::warn!(peer = %from, len = frame.len(), "dropped a datagram that is not one frame");
        return;
    }
    if inner.outboxes.is_closed() {
        return;
    }
    match inner.incoming.try_reserve() {
        Ok(permit) => {
            bump(&inner.counters.frames_received, 1);
            bump(&inner.counters.datagrams_received, 1);
            permit.send(Incoming {
                from: from.clone(),
                frame,
            });
        }
        Err(_) => {
            bump(&inner.counters.datagrams_dropped, 1);
            tracing::debug!(peer = %from, "dropped a datagram: the recv queue is full");
        }
    }
}

/// Makes a writer's connection the one datagrams to its peer take, while the writer uses it.
struct Route<'a> {
    inner: &'a Inner,
    peer: Address,
    id: usize,
}

impl<'a> Route<'a> {
    fn new(inner: &'a Inner, peer: &Address, conn: &Connection) -> Self {
        let mut routes = lock(&inner.routes);
        // Another writer's connection that is still open keeps the route.
        if !routes
            .get(peer)
            .is_some_and(|c| c.close_reason().is_none() && c.stable_id() != conn.stable_id())
        {
            routes.insert(peer.clone(), conn.clone());
        }
        drop(routes);
        Route {
            inner,
            peer: peer.clone(),
            id: conn.stable_id(),
        }
    }
}

impl Drop for Route<'_> {
    fn drop(&mut self) {
        let mut routes = lock(&self.inner.routes);
        if routes
            .get(&self.peer)
            .is_some_and(|c| c.stable_id() == self.id)
        {
            routes.remove(&self.peer);
        }
    }
}

/// Lists a connection in [`Inner::connections`] while its streams are read.
struct Listed<'a> {
    inner: &'a Inner,
    id: usize,
}

impl<'a> Listed<'a> {
    fn new(inner: &'a Inner, conn: &Connection, peer: &Address) -> Self {
        let id = conn.stable_id();
        lock(&inner.connections).insert(id, (peer.clone(), conn.clone()));
        Listed { inner, id }
    }
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        lock(&self.inner.connections).remove(&self.id);
    }
}

/// How reading one stream ended.
enum Read {
    /// It carried frames, all handed to `recv`.
    Frames,
    /// It was empty: the peer's goodbye.
    Goodbye,
    /// It was refused (the connection is being closed) or the connection failed.
    Failed,
}

/// Reads one stream, cutting it into frames and handing each to `recv` as it completes.
async fn read_stream(
    inner: &Inner,
    conn: &Connection,
    mut stream: quinn::RecvStream,
    from: &Address,
) -> Read {
    let mut cutter = FrameCutter::new(inner.max_frame_len);
    let mut frames = Vec::new();
    let mut any = false;
    loop {
        let cut = match stream.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => cutter.push(chunk.bytes, &mut frames),
            Ok(None) if cutter.pending_len() > 0 => {
                inner.reject(conn, code::BAD_FRAME, "stream ends mid-frame");
                return Read::Failed;
            }
            Ok(None) if any => return Read::Frames,
            Ok(None) => return Read::Goodbye,
            Err(quinn::ReadError::Reset(_)) => {
                // Nothing in this protocol resets a stream: its frames would be lost silently.
                inner.reject(conn, code::BAD_FRAME, "stream reset by the peer");
                return Read::Failed;
            }
            Err(error) => {
                tracing::debug!(peer = %from, %error, "connection ended mid-stream");
                return Read::Failed;
            }
        };
        // Frames cut before a bad one are whole and valid: deliver them, then refuse.
        any = true;
        for frame in frames.drain(..) {
            let incoming = Incoming {
                from: from.clone(),
                frame,
            };
            deliver(inner, incoming).await;
        }
        if let Err(error) = cut {
            inner.reject(conn, code::BAD_FRAME, &error.to_string());
            return Read::Failed;
        }
    }
}

/// Hands a frame to `recv`, waiting while its queue is full. Once the transport is closing
/// the frame is dropped instead: `recv` takes nothing more, but the streams are still read to
/// their end so that a peer's goodbye is seen and answered.
async fn deliver(inner: &Inner, incoming: Incoming) {
    let mut closed = inner.outboxes.closed();
    if *closed.borrow_and_update() {
        return;
    }
    tokio::select! {
        permit = inner.incoming.reserve() => if let Ok(permit) = permit {
            // Counted before `recv` can see it, so stats never lag what was received.
            bump(&inner.counters.frames_received, 1);
            permit.send(incoming);
        },
        _ = closed.wait_for(|c| *c) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_core::replication::ReplicaMessage;
    use chorus_core::wire::Header;

    fn frame(text: &str) -> Bytes {
        let message = ReplicaMessage::Error {
            reason: text.to_owned(),
        };
        wire::encode(Header::message(), &message, 1 << 20).expect("encodes")
    }

    async fn node(identity: &Identity, trusted: &[&Identity]) -> QuicTransport {
        let mut set = TrustedPeers::new();
        for peer in trusted {
            set.add(peer.certificate());
        }
        QuicTransport::bind("127.0.0.1:0", QuicConfig::local(), identity.clone(), set)
            .await
            .expect("bind")
    }

    async fn recv(t: &QuicTransport) -> Incoming {
        tokio::time::timeout(Duration::from_secs(10), t.recv())
            .await
            .expect("a frame within 10 s")
            .expect("recv")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn trusted_peers_talk_both_ways_over_one_connection() {
        let (ia, ib) = (
            Identity::generate(&[]).unwrap(),
            Identity::generate(&[]).unwrap(),
        );
        let a = node(&ia, &[&ib]).await;
        let b = node(&ib, &[&ia]).await;
        a.send(&b.local_addr(), frame("ping")).await.expect("send");
        let got = recv(&b).await;
        assert_eq!(got.from, a.local_addr());
        assert_eq!(got.frame, frame("ping"));
        b.send(&got.from, frame("pong")).await.expect("reply");
        let back = recv(&a).await;
        assert_eq!(back.from, b.local_addr());
        assert_eq!((a.stats().dialed, b.stats().dialed), (1, 0));
        a.close().await;
        b.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_untrusted_peer_fails_the_handshake_both_ways() {
        let (ia, ib, stranger) = (
            Identity::generate(&[]).unwrap(),
            Identity::generate(&[]).unwrap(),
            Identity::generate(&[]).unwrap(),
        );
        let a = node(&ia, &[&ib]).await;
        let b = node(&ib, &[&ia]).await;
        // The stranger trusts a, but a does not trust the stranger: a refuses it as a client.
        let s = node(&stranger, &[&ia, &ib]).await;
        match s.send(&a.local_addr(), frame("let me in")).await {
            Err(TransportError::Unreachable { reason, .. }) => {
                assert!(!reason.is_empty());
            }
            // The client may finish its side of the handshake before the server's refusal
            // arrives; then the frame is written to a connection that is already being closed.
            Ok(()) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
        // a dials the stranger: the stranger's certificate is not trusted, so a's own dial
        // fails in a's certificate check.
        match a.send(&s.local_addr(), frame("who are you")).await {
            Err(TransportError::Unreachable { reason, .. }) => {
                assert!(reason.to_lowercase().contains("certificate"), "{reason}");
            }
            other => panic!("dialling an untrusted peer gave {other:?}"),
        }
        // Nothing from the stranger ever reaches a; a still talks to b.
        a.send(&b.local_addr(), frame("hello b"))
            .await
            .expect("send");
        let got = recv(&b).await;
        assert_eq!(got.frame, frame("hello b"));
        assert!(
            tokio::time::timeout(Duration::from_millis(300), a.recv())
                .await
                .is_err(),
            "a received a frame from an untrusted peer"
        );
        assert!(a.stats().handshake_failures >= 1, "{:?}", a.stats());
        assert_eq!(a.stats().frames_received, 0);
        assert_eq!(a.stats().accepted, 0, "{:?}", a.stats());
        a.close().await;
        b.close().await;
        s.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_frames_share_streams_and_all_arrive() {
        let id = Identity::generate(&[]).unwrap();
        let a = Arc::new(node(&id, &[]).await);
        let b = node(&id, &[]).await;
        let to = b.local_addr();
        a.send(&to, frame("warm-up")).await.expect("send");
        recv(&b).await;
        let n = 2_000u64;
        let mut sends = tokio::task::JoinSet::new();
        for i in 0..n {
            let (a, to) = (Arc::clone(&a), to.clone());
            sends.spawn(async move { a.send(&to, frame(&format!("frame {i}"))).await });
        }
        while let Some(result) = sends.join_next().await {
            result.expect("task").expect("send");
        }
        let mut got = std::collections::HashSet::new();
        for _ in 0..n {
            got.insert(recv(&b).await.frame);
        }
        assert_eq!(got.len() as u64, n, "every frame arrives once");
        let stats = a.stats();
        assert_eq!(stats.frames_sent, n + 1);
        assert!(
            stats.streams_sent < stats.frames_sent,
            "queued frames share streams: {stats:?}"
        );
        a.close().await;
        b.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loopback_packets_grow_to_large_mtus_without_loss() {
        let id = Identity::generate(&[]).unwrap();
        let a = node(&id, &[]).await;
        let b = node(&id, &[]).await;
        let big = {
            let message = ReplicaMessage::Error {
                reason: "x".repeat(64 * 1024),
            };
            wire::encode(Header::message(), &message, 1 << 20).expect("encodes")
        };
        for _ in 0..50 {
            a.send(&b.local_addr(), big.clone()).await.expect("send");
            let got = recv(&b).await;
            b.send(&got.from, got.frame).await.expect("echo");
            assert_eq!(recv(&a).await.frame, big);
        }
        let infos = a.connections();
        assert_eq!(infos.len(), 1, "{infos:?}");
        let info = &infos[0];
        assert_eq!(info.peer, b.local_addr());
        // Path MTU discovery found loopback's large MTU, and packets that size are not lost
        // (UDP segmentation offload with 64 KiB packets would lose most of them).
        assert!(info.mtu > 1452, "{info:?}");
        assert!(info.lost_packets * 10 <= info.sent_packets, "{info:?}");
        a.close().await;
        b.close().await;
    }

    /// A raw quinn connection to `to` with a trusted identity, after sending `hello`.
    async fn raw_client(identity: &Identity, to: &Address, hello: &[u8]) -> (Endpoint, Connection) {
        let mut trusted = TrustedPeers::new();
        trusted.add(identity.certificate());
        let (_, client) =
            endpoint_configs(&QuicConfig::local(), identity, trusted).expect("configs");
        let mut endpoint = Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("endpoint");
        endpoint.set_default_client_config(client);
        let conn = endpoint
            .connect(to.as_str().parse().unwrap(), tls::SERVER_NAME)
            .expect("connect")
            .await
            .expect("handshake");
        let mut stream = conn.open_uni().await.expect("stream");
        stream.write_all(hello).await.expect("hello");
        stream.finish().expect("finish");
        (endpoint, conn)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_trusted_peer_sending_bad_streams_is_disconnected_and_others_are_served() {
        let id = Identity::generate(&[]).unwrap();
        let a = node(&id, &[]).await;
        let b = node(&id, &[]).await;
        let to = a.local_addr();
        let hello = transport::encode_hello(HELLO_MAGIC, &Address::new("127.0.0.1:9")).unwrap();
        let good = frame("before the garbage");
        let mut bad_magic = frame("bad magic").to_vec();
        bad_magic[wire::PREFIX_LEN] ^= 0xFF;
        let oversized = u32::MAX.to_be_bytes().to_vec();
        let cut_short = frame("cut short")[..10].to_vec();
        let cases: [(&str, Vec<u8>, bool, u32); 5] = [
            (
                "a frame with a bad magic",
                [good.to_vec(), bad_magic].concat(),
                false,
                code::BAD_FRAME,
            ),
            (
                "an oversized length prefix",
                oversized,
                false,
                code::BAD_FRAME,
            ),
            (
                "a stream that ends mid-frame",
                cut_short,
                false,
                code::BAD_FRAME,
            ),
            ("a reset stream", good[..10].to_vec(), true, code::BAD_FRAME),
            ("a bad hello", Vec::new(), false, code::BAD_HELLO),
        ];
        for (what, bytes, reset, expected) in cases {
            let hello = if expected == code::BAD_HELLO {
                &b"nonsense"[..]
            } else {
                &hello[..]
            };
            let (endpoint, conn) = raw_client(&id, &to, hello).await;
            if expected != code::BAD_HELLO {
                let mut stream = conn.open_uni().await.expect("stream");
                stream.write_all(&bytes).await.expect("write");
                if reset {
                    // Give the bytes a moment to go out before the reset overtakes them.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    stream.reset(VarInt::from_u32(7)).expect("reset");
                } else {
                    stream.finish().expect("finish");
                }
            }
            let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
                .await
                .unwrap_or_else(|_| panic!("a connection sending {what} stayed open"));
            match closed {
                quinn::ConnectionError::ApplicationClosed(close) => {
                    assert_eq!(close.error_code, VarInt::from_u32(expected), "{what}");
                }
                other => panic!("{what}: closed with {other:?}"),
            }
            endpoint.wait_idle().await;
        }
        // The valid frame ahead of the bad magic was delivered; nothing else was.
        assert_eq!(recv(&a).await.frame, good);
        assert_eq!(a.stats().rejected_connections, 5, "{:?}", a.stats());
        // a still serves a well-behaved peer.
        b.send(&to, frame("still there?")).await.expect("send");
        assert_eq!(recv(&a).await.frame, frame("still there?"));
        a.close().await;
        b.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peers_closing_at_once_answer_each_others_goodbye() {
        let id = Identity::generate(&[]).unwrap();
        let mut config = QuicConfig::local();
        config.close_timeout = Duration::from_secs(5);
        let bind = || {
            let mut trusted = TrustedPeers::new();
            trusted.add(id.certificate());
            QuicTransport::bind("127.0.0.1:0", config.clone(), id.clone(), trusted)
        };
        let (a, b) = (bind().await.expect("a"), bind().await.expect("b"));
        // a dials b and b answers over the same connection: both ends have a writer on it.
        a.send(&b.local_addr(), frame("ping")).await.expect("send");
        let got = recv(&b).await;
        b.send(&got.from, frame("pong")).await.expect("reply");
        recv(&a).await;
        let started = std::time::Instant::now();
        tokio::join!(a.close(), b.close());
        let took = started.elapsed();
        // Each side waits for the other to read its goodbye; if neither read after shutting
        // down, both would wait the whole close timeout.
        assert!(
            took < Duration::from_secs(2),
            "closing both ends took {took:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_transports_leave_no_task_and_release_their_port() {
        let metrics = tokio::runtime::Handle::current().metrics();
        let before = metrics.num_alive_tasks();
        let id = Identity::generate(&[]).unwrap();
        let a = node(&id, &[]).await;
        let b = node(&id, &[]).await;
        let port = b.local_addr();
        a.send(&b.local_addr(), frame("ping")).await.expect("send");
        let got = recv(&b).await;
        b.send(&got.from, frame("pong")).await.expect("reply");
        recv(&a).await;
        a.close().await;
        b.close().await;
        drop((a, b));
        // Bounded wait: 100 polls of 20 ms for the I/O tasks to finish.
        let mut alive = metrics.num_alive_tasks();
        for _ in 0..100 {
            if alive <= before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            alive = metrics.num_alive_tasks();
        }
        assert!(
            alive <= before,
            "{alive} tasks alive, {before} before the transports"
        );
        std::net::UdpSocket::bind(port.as_str()).expect("the port is free again");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_unreliable_frames_go_as_datagrams_and_large_ones_on_streams() {
        let id = Identity::generate(&[]).unwrap();
        let a = node(&id, &[]).await;
        let b = node(&id, &[]).await;
        let to = b.local_addr();
        // No connection yet: the first goes on a stream, and dials.
        a.send_unreliable(&to, frame("first")).await.expect("send");
        assert_eq!(recv(&b).await.frame, frame("first"));
        let small: Vec<Bytes> = (0..20).map(|i| frame(&format!("probe {i}"))).collect();
        for f in &small {
            a.send_unreliable(&to, f.clone()).await.expect("send");
        }
        let big = {
            let message = ReplicaMessage::Error {
                reason: "x".repeat(100 * 1024),
            };
            wire::encode(Header::message(), &message, 1 << 20).expect("encodes")
        };
        a.send_unreliable(&to, big.clone()).await.expect("send");
        // On a quiet loopback nothing is lost; datagrams and the stream may interleave.
        let mut got = std::collections::HashSet::new();
        for _ in 0..21 {
            let incoming = recv(&b).await;
            assert_eq!(incoming.from, a.local_addr());
            got.insert(incoming.frame);
        }
        assert!(got.contains(&big) && small.iter().all(|f| got.contains(f)));
        let (sa, sb) = (a.stats(), b.stats());
        assert_eq!(sa.datagrams_sent, 20, "{sa:?}");
        assert_eq!(sb.datagrams_received, 20, "{sb:?}");
        assert_eq!(
            sa.frames_sent, 2,
            "the first and the big one on streams: {sa:?}"
        );
        a.close().await;
        b.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_datagram_that_is_not_one_frame_is_dropped_and_counted() {
        let id = Identity::generate(&[]).unwrap();
        let a = node(&id, &[]).await;
        let hello = transport::encode_hello(HELLO_MAGIC, &Address::new("127.0.0.1:9")).unwrap();
        let (endpoint, conn) = raw_client(&id, &a.local_addr(), &hello).await;
        let two_frames = Bytes::from([frame("one").to_vec(), frame("two").to_vec()].concat());
        let mut bad_magic = frame("magic").to_vec();
        bad_magic[wire::PREFIX_LEN] ^= 0xFF;
        for bad in [two_frames, frame("cut").slice(..12), Bytes::from(bad_magic)] {
            conn.send_datagram(bad).expect("datagram");
        }
        // Datagrams are unreliable: a bad one costs nothing but itself.
        conn.send_datagram(frame("fine")).expect("datagram");
        assert_eq!(recv(&a).await.frame, frame("fine"));
        let stats = a.stats();
        assert_eq!(stats.datagrams_rejected, 3, "{stats:?}");
        assert_eq!((stats.datagrams_received, stats.frames_received), (1, 1));
        assert_eq!(stats.rejected_connections, 0, "{stats:?}");
        assert!(conn.close_reason().is_none(), "the connection stays open");
        conn.close(VarInt::from_u32(0), b"done");
        endpoint.wait_idle().await;
        a.close().await;
    }
}
