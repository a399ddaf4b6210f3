//! The QUIC transport for Chorus, registered as `"quic"`.
//!
//! # Security
//!
//! QUIC with TLS 1.3 (quinn on rustls, ring crypto). Authentication is mutual: the dialler
//! checks the listener's certificate and the listener requires and checks the dialler's, so
//! an untrusted peer can neither send frames nor receive them. Two ways to say whom to trust:
//!
//! - **Keyring mode** ([`QuicTransport::bind_authenticated`], what a node in keyring mode
//!   uses): the certificate is self-signed by the node's Ed25519 identity and peers are
//!   checked against the live keyring ([`chorus_core::tls`]). The hello's address must be
//!   free or owned by the handshake's key (else the connection is closed and counted in
//!   [`QuicStats::address_refusals`]), a dialler refuses a server that is not the owner of
//!   the dialled address, and a connection whose peer's key leaves the keyring is closed at
//!   its next stream or datagram ([`QuicStats::revoked_closed`]).
//! - **Pinned certificates** ([`QuicTransport::bind`], insecure-mode nodes): an [`Identity`]
//!   (a certificate and key; [`Identity::generate`] makes a self-signed one with rcgen) and a
//!   set of [`TrustedPeers`]; a certificate not in the set fails the handshake. See [`tls`].
//!
//! # Connections and addressing
//!
//! One connection per peer and direction, kept and reused. `send` to a listen address uses the
//! connection this node dialled to it, dialling when there is none. Right after the handshake
//! the dialler opens a unidirectional stream carrying a *hello* with its own listen address
//! (see `docs/PROTOCOL.md`). The hello is inside the authenticated connection; with pinned
//! certificates it is not bound to the certificate, and in either mode the listener does not
//! let it route anything:
//! it gives the accepted connection an
//! [inbound address](chorus_core::transport::inbound_address) of its own
//! (`10.0.0.1:7000 (inbound #3)`), which frames read from it carry as [`Incoming::from`] and
//! which sends (and datagrams) go back on; once the connection is closed, sending to it fails
//! with [`TransportError::Unreachable`]. Frames from a dialled connection carry the dialled
//! address. So replies travel on the connection the request came on, and a trusted peer that
//! announces another's address gets the replies to its own frames and nothing else.
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
//! Complete frames wait in the queue for `recv`, at most [`QuicConfig::recv_capacity`] frames
//! and [`QuicConfig::recv_bytes`] bytes; while it is full, readers stop reading, and QUIC flow
//! control ([`QuicConfig::receive_window`]) stops the sender (a datagram that finds it full is
//! dropped and counted).
//!
//! # Limits on inbound connections
//!
//! At most [`QuicConfig::max_inbound_connections`] incoming connections are open at once and at
//! most [`QuicConfig::max_handshakes`] of them in their handshake; one over either cap is
//! refused before its handshake (QUIC `CONNECTION_REFUSED`), counted in
//! [`QuicStats::refused_connections`] and logged. The handshake and the hello together must
//! complete within [`QuicConfig::handshake_timeout`], or the connection is dropped (counted in
//! [`QuicStats::handshake_failures`] or [`QuicStats::rejected_connections`]). Idle connections
//! are closed by QUIC's idle timeout ([`QuicConfig::idle_timeout`]), in both directions. A frame still arriving is held by its stream's reader: at most
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
mod inbound;
mod io_task;
#[cfg(test)]
mod keyring_tests;
mod outbound;
mod stats;
#[cfg(test)]
mod tests;
pub mod tls;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chorus_core::auth::PublicKey;
use chorus_core::identity::Address;
use chorus_core::peer_auth::{ChannelAuth, KeyCheck};
use chorus_core::registry::{Registry, TransportSpec};
use chorus_core::transport::inbound::{Admission, RecvQueue};
use chorus_core::transport::outbox::Outboxes;
use chorus_core::transport::{self, Incoming, SharedTransport, Transport, TransportError};
#[cfg(doc)]
use chorus_core::wire;
use io_task::{IoTask, lock};
use quinn::{Connection, Endpoint, VarInt};

use inbound::accept_loop;
use outbound::outbound;
use stats::{Counters, bump};

pub use config::{MAX_UDP_PAYLOAD, MIN_UDP_PAYLOAD, QuicConfig};
pub use tls::{Identity, TrustedPeers};

/// The registry name of this transport.
pub const SCHEME: &str = "quic";

/// The ALPN protocol both ends must offer. Version 2 carries several frames per stream and
/// the goodbye stream (`docs/PROTOCOL.md`); a node speaking version 1 fails the handshake
/// rather than misreading streams.
pub const ALPN: &[u8] = b"chorus/3";

/// What a listener sends, on the first unidirectional stream it opens, once it has accepted a
/// connection's certificate and hello; the dialler waits for it before counting the
/// connection as up (TLS 1.3 finishes the client's side before the server has checked the
/// client's certificate, so without it a refused dial would look like a success).
pub const HELLO_ACK: [u8; 4] = *b"CHOK";

/// The hello stream: a 4-byte big-endian length of what follows, [`HELLO_MAGIC`], then the
/// dialler's listen address in UTF-8.
pub const HELLO_MAGIC: [u8; 4] = *b"CHQ1";

/// Longest listen address a hello may carry, in bytes.
pub use chorus_core::transport::MAX_HELLO_ADDR_LEN;

/// Bytes of datagrams buffered per connection, each way; beyond it the oldest are dropped.
const DATAGRAM_BUFFER: usize = 1024 * 1024;

/// QUIC application error codes this transport closes connections with.
mod code {
    /// The transport is closing.
    pub(crate) const CLOSING: u32 = 0;
    /// The peer sent a bad hello.
    pub(crate) const BAD_HELLO: u32 = 1;
    /// The peer's hello (or the dialled address) names an address another member owns.
    pub(crate) const ADDRESS_TAKEN: u32 = 3;
    /// The peer's key is no longer in the keyring.
    pub(crate) const REVOKED: u32 = 4;
    /// The peer sent a stream that is not a sequence of valid frames.
    pub(crate) const BAD_FRAME: u32 = 2;
}

/// Registers the `"quic"` factory. In keyring mode ([`TransportSpec::auth`] set) it binds
/// with [`QuicConfig::from_options_authenticated`] and the node's identity and keyring; in
/// insecure mode with the settings, identity and trusted peers of
/// [`QuicConfig::from_options`] (the `cert`, `key` and `trust` options are then required).
pub fn register(registry: &mut Registry) {
    registry
        .register_transport(SCHEME, |spec: TransportSpec| {
            Box::pin(async move {
                let transport = match spec.auth {
                    Some(auth) => {
                        let config = QuicConfig::from_options_authenticated(&spec.options)?;
                        QuicTransport::bind_authenticated(&spec.bind, config, auth).await?
                    }
                    None => {
                        let (config, identity, trusted) = QuicConfig::from_options(&spec.options)?;
                        QuicTransport::bind(&spec.bind, config, identity, trusted).await?
                    }
                };
                Ok(SharedTransport::new(transport))
            })
        })
        .expect("the quic transport is registered once");
}

pub use stats::{ConnectionInfo, QuicStats};

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
    /// Received frames waiting for `recv`.
    recv: RecvQueue,
    admission: Admission,
    hello: Bytes,
    counters: Counters,
    /// Keyring mode: the keyring and address book peers are checked against (see
    /// [Security](crate#security)); `None` with pinned certificates.
    auth: Option<ChannelAuth>,
}

impl Inner {
    /// In keyring mode, the peer's key if the keyring admits it now, and a check that follows
    /// the keyring: `Ok(None)` with pinned certificates, `Err` for a peer not admitted.
    fn admitted(&self, conn: &Connection) -> Result<Option<KeyCheck>, ()> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        connection_key(conn)
            .and_then(|key| KeyCheck::admit(&auth.keyring, key))
            .map(Some)
            .ok_or(())
    }

    fn is_closed(&self) -> bool {
        self.outboxes.is_closed()
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
}

/// The Ed25519 key of a connection's peer certificate.
fn connection_key(conn: &Connection) -> Option<PublicKey> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().and_then(chorus_core::tls::certificate_key)
}

async fn resolve(to: &Address) -> Result<SocketAddr, ResolveError> {
    if let Ok(addr) = to.as_str().parse::<SocketAddr>() {
        return Ok(addr);
    }
    tokio::net::lookup_host(to.as_str())
        .await
        .map_err(|source| ResolveError::Lookup {
            addr: to.clone(),
            source,
        })?
        .next()
        .ok_or_else(|| ResolveError::NoAddress(to.clone()))
}

/// Why an address did not resolve to a socket address.
#[derive(Debug, thiserror::Error)]
enum ResolveError {
    /// The lookup failed.
    #[error("resolving {addr}: {source}")]
    Lookup {
        addr: Address,
        source: std::io::Error,
    },
    /// The lookup found nothing.
    #[error("{0} resolves to no address")]
    NoAddress(Address),
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

/// Where a node's TLS configuration comes from.
enum Trust {
    /// Certificates from PEM files, pinned byte for byte.
    Pinned(Identity, TrustedPeers),
    /// The node's Ed25519 identity and the live keyring.
    Keyring(ChannelAuth),
}

/// The server and client sides of an endpoint: TLS 1.3 only, this node's certificate, the
/// pinned peers, ALPN, and the transport settings.
fn endpoint_configs(
    config: &QuicConfig,
    trust: &Trust,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TransportError> {
    let (server_tls, client_tls) = match trust {
        Trust::Pinned(identity, trusted) => pinned_tls(identity, trusted.clone())?,
        Trust::Keyring(auth) => {
            let error = |e: chorus_core::tls::TlsError| TransportError::Config(e.to_string());
            (
                chorus_core::tls::server_config(auth, &[ALPN]).map_err(error)?,
                chorus_core::tls::client_config(auth, &[ALPN]).map_err(error)?,
            )
        }
    };
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

/// TLS configurations for pinned PEM certificates.
fn pinned_tls(
    identity: &Identity,
    trusted: TrustedPeers,
) -> Result<(rustls::ServerConfig, rustls::ClientConfig), TransportError> {
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
    Ok((server_tls, client_tls))
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
        trusted.add(identity.certificate());
        Self::bind_with(bind, config, Trust::Pinned(identity, trusted)).await
    }

    /// Binds like [`bind`](Self::bind), secured by the node's Ed25519 identity and the live
    /// keyring instead of PEM files (keyring mode; see [Security](crate#security)).
    pub async fn bind_authenticated(
        bind: &str,
        config: QuicConfig,
        auth: ChannelAuth,
    ) -> Result<Self, TransportError> {
        Self::bind_with(bind, config, Trust::Keyring(auth)).await
    }

    async fn bind_with(
        bind: &str,
        config: QuicConfig,
        trust: Trust,
    ) -> Result<Self, TransportError> {
        config.validate()?;
        let bind_addr = resolve(&Address::new(bind))
            .await
            .map_err(|e| TransportError::Config(format!("bind address: {e}")))?;

        let (server, client) = endpoint_configs(&config, &trust)?;
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
        let local = transport::advertised(config.advertise.as_ref(), bound)?;
        let hello = transport::encode_hello(HELLO_MAGIC, &local)?;
        let outboxes = Outboxes::new(config.outbox(u64::from(bound.port())));
        let recv = RecvQueue::new(config.recv_capacity, config.recv_bytes, "recv_bytes")?;
        let admission = Admission::new(config.max_inbound_connections, config.max_handshakes);
        let inner = Arc::new(Inner {
            local,
            max_frame_len: config.effective_max_frame_len(),
            config,
            io,
            endpoint,
            outboxes,
            connections: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            recv,
            admission,
            hello,
            counters: Counters::default(),
            auth: match trust {
                Trust::Keyring(auth) => Some(auth),
                Trust::Pinned(..) => None,
            },
        });
        inner.io.spawn(accept_loop(Arc::clone(&inner)));
        Ok(QuicTransport { inner })
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
