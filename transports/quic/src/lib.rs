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
//! One connection per peer, kept and reused, in one map keyed by the peer's *listen* address.
//! Right after the handshake the dialler opens a unidirectional stream carrying a *hello* with
//! its own listen address (see `docs/PROTOCOL.md`); the listener files the connection under
//! that address and sends replies over it. Frames from a dialled connection carry the dialled
//! address as [`Incoming::from`], frames from an accepted one the address its hello announced.
//! The hello itself is inside the authenticated connection, but it is not bound to the
//! certificate: a trusted peer could announce another trusted peer's address.
//!
//! # Frames on streams
//!
//! Each frame travels on its own unidirectional stream, opened, written and finished by `send`.
//! Streams are independent, so a lost packet of one frame never delays another (no
//! head-of-line blocking between requests); the price is that frames from one sender may arrive
//! in a different order than they were sent. The receiver reads each stream to its end with
//! the maximum frame length as the limit, and checks the length prefix ([`wire::frame_len`])
//! and magic. A longer stream, or a stream that is not exactly one frame, closes that
//! connection (counted in [`QuicStats::rejected_connections`], logged); bytes that are not
//! QUIC at all are dropped by quinn before any connection exists.
//!
//! # Backpressure and failures
//!
//! A peer accepts at most [`QuicConfig::max_concurrent_streams`] frames in flight from one
//! connection, and a connection holds at most [`QuicConfig::send_window`] unacknowledged bytes.
//! `send` waits for both up to [`QuicConfig::send_timeout`], then fails with
//! [`TransportError::QueueFull`]. A dial that does not complete within
//! [`QuicConfig::connect_timeout`] fails with [`TransportError::Timeout`], a refused one
//! (including a failed certificate check) with [`TransportError::Unreachable`]; after a failed
//! dial, sends to that peer fail at once with `Unreachable` for a jittered, exponentially
//! growing backoff, and the first send after it dials again. A connection that is lost is
//! forgotten; the next send dials a new one. Unreliable datagrams are not used.
//!
//! # Shutdown
//!
//! [`close`](Transport::close) refuses new sends, waits (up to [`QuicConfig::close_timeout`])
//! until every sent frame is acknowledged by its receiver, then closes the endpoint and waits
//! for the connections to finish closing, which releases the port. Dropping the transport
//! without `close` closes the endpoint at once: frames not yet acknowledged may be lost.

#![deny(missing_docs)]

mod config;
pub mod tls;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_core::registry::{Registry, TransportSpec};
use chorus_core::transport::{self, Address, Incoming, SharedTransport, Transport, TransportError};
use chorus_core::wire;
use quinn::{Connection, Endpoint, VarInt};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

pub use config::QuicConfig;
pub use tls::{Identity, TrustedPeers};

/// The registry name of this transport.
pub const SCHEME: &str = "quic";

/// The ALPN protocol both ends must offer.
pub const ALPN: &[u8] = b"chorus/1";

/// The hello stream: a 4-byte big-endian length of what follows, [`HELLO_MAGIC`], then the
/// dialler's listen address in UTF-8.
pub const HELLO_MAGIC: [u8; 4] = *b"CHQ1";

/// Longest listen address a hello may carry, in bytes.
pub use chorus_core::transport::MAX_HELLO_ADDR_LEN;

/// QUIC application error codes this transport closes connections with.
mod code {
    /// The transport is closing.
    pub(crate) const CLOSING: u32 = 0;
    /// The peer sent a bad hello.
    pub(crate) const BAD_HELLO: u32 = 1;
    /// The peer sent a stream that is not one valid frame.
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
                Ok(Arc::new(transport) as SharedTransport)
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
    /// Connections closed because of a bad hello or a stream that was not one valid frame.
    pub rejected_connections: u64,
    /// Frames written to streams.
    pub frames_sent: u64,
    /// Frames received and handed to `recv`.
    pub frames_received: u64,
}

#[derive(Debug, Default)]
struct Counters {
    dialed: AtomicU64,
    dial_failures: AtomicU64,
    accepted: AtomicU64,
    handshake_failures: AtomicU64,
    rejected_connections: AtomicU64,
    frames_sent: AtomicU64,
    frames_received: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What is known about one peer.
#[derive(Debug, Default)]
enum SlotState {
    /// Nothing yet (or the connection was lost).
    #[default]
    Empty,
    /// A connection, dialled or accepted.
    Up(Connection),
    /// The last dial failed; sends fail until `until`.
    Down {
        until: Instant,
        backoff: Duration,
        reason: Arc<str>,
    },
}

#[derive(Debug, Default)]
struct Slot {
    /// Held across a dial, so concurrent senders share one dial.
    state: tokio::sync::Mutex<SlotState>,
}

struct Inner {
    local: Address,
    config: QuicConfig,
    max_frame_len: usize,
    endpoint: Endpoint,
    peers: Mutex<HashMap<Address, Arc<Slot>>>,
    incoming: mpsc::Sender<Incoming>,
    closed: watch::Sender<bool>,
    /// Frames sent whose streams are not yet acknowledged; `close` waits for zero.
    unacked: watch::Sender<usize>,
    rng: Mutex<ChaCha8Rng>,
    hello: Bytes,
    counters: Counters,
}

impl Inner {
    fn peers(&self) -> MutexGuard<'_, HashMap<Address, Arc<Slot>>> {
        // Every update of the map is a single insert or remove: it stays consistent.
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    fn slot(&self, addr: &Address) -> Arc<Slot> {
        Arc::clone(self.peers().entry(addr.clone()).or_default())
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

    /// The connection to `to`, dialling if there is none.
    async fn connection(self: &Arc<Self>, to: &Address) -> Result<Connection, TransportError> {
        let slot = self.slot(to);
        let mut state = slot.state.lock().await;
        let backoff = match &*state {
            SlotState::Up(conn) if conn.close_reason().is_none() => return Ok(conn.clone()),
            SlotState::Down {
                until,
                reason,
                backoff,
            } => {
                if Instant::now() < *until {
                    return Err(TransportError::Unreachable {
                        addr: to.clone(),
                        reason: reason.to_string(),
                    });
                }
                (*backoff * 2).min(self.config.backoff_max)
            }
            _ => self.config.backoff_min,
        };
        if self.is_closed() {
            return Err(TransportError::Closed);
        }
        let timeout = self.config.connect_timeout;
        let (error, reason) = match tokio::time::timeout(timeout, self.dial(to)).await {
            Ok(Ok(conn)) => {
                bump(&self.counters.dialed);
                *state = SlotState::Up(conn.clone());
                tokio::spawn(read_streams(Arc::clone(self), conn.clone(), to.clone()));
                return Ok(conn);
            }
            Ok(Err(reason)) => (
                TransportError::Unreachable {
                    addr: to.clone(),
                    reason: reason.clone(),
                },
                reason,
            ),
            Err(_) => (
                TransportError::Timeout {
                    addr: to.clone(),
                    after: timeout,
                },
                format!("no connection within {timeout:?}"),
            ),
        };
        bump(&self.counters.dial_failures);
        tracing::debug!(peer = %to, %reason, "dial failed");
        *state = SlotState::Down {
            until: Instant::now() + self.jittered(backoff),
            backoff,
            reason: Arc::from(reason.as_str()),
        };
        Err(error)
    }

    /// Handshake and hello.
    async fn dial(&self, to: &Address) -> Result<Connection, String> {
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
        Ok(conn)
    }

    /// Forgets `conn` as the connection to `to` (it failed).
    async fn forget(&self, to: &Address, conn: &Connection) {
        let slot = self.slot(to);
        let mut state = slot.state.lock().await;
        if matches!(&*state, SlotState::Up(c) if c.stable_id() == conn.stable_id()) {
            *state = SlotState::Empty;
        }
    }

    /// Counts one unacknowledged stream until `stopped` completes.
    fn track(self: &Arc<Self>, stopped: impl std::future::Future + Send + 'static) {
        self.unacked.send_modify(|n| *n += 1);
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            stopped.await;
            inner.unacked.send_modify(|n| *n = n.saturating_sub(1));
        });
    }

    fn shut(&self) {
        self.closed.send_replace(true);
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

/// A QUIC [`Transport`]. See the [crate documentation](crate).
pub struct QuicTransport {
    inner: Arc<Inner>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Incoming>>,
    accept: Mutex<Option<JoinHandle<()>>>,
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

        let transport_config = Arc::new(transport_config(&config)?);
        let server_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)
            .map_err(|e| TransportError::Config(format!("QUIC TLS: {e}")))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(Arc::clone(&transport_config));
        let client_crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)
            .map_err(|e| TransportError::Config(format!("QUIC TLS: {e}")))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport_config);

        let mut endpoint = Endpoint::server(server, bind_addr).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                TransportError::AddressInUse(Address::new(bind))
            } else {
                TransportError::Io(e)
            }
        })?;
        endpoint.set_default_client_config(client);
        let bound = endpoint.local_addr()?;
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
            endpoint,
            peers: Mutex::new(HashMap::new()),
            incoming,
            closed: watch::channel(false).0,
            unacked: watch::channel(0).0,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            hello,
            counters: Counters::default(),
        });
        let accept = tokio::spawn(accept_loop(Arc::clone(&inner)));
        Ok(QuicTransport {
            inner,
            rx: tokio::sync::Mutex::new(rx),
            accept: Mutex::new(Some(accept)),
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
            frames_received: get(&c.frames_received),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &QuicConfig {
        &self.inner.config
    }
}

fn transport_config(config: &QuicConfig) -> Result<quinn::TransportConfig, TransportError> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(VarInt::from_u32(config.max_concurrent_streams.get()));
    t.max_concurrent_bidi_streams(VarInt::from_u32(0));
    let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
        .map_err(|_| TransportError::Config("option `idle_timeout_ms` is too large".to_owned()))?;
    t.max_idle_timeout(Some(idle));
    t.keep_alive_interval(None);
    t.send_window(config.send_window.get() as u64);
    t.datagram_receive_buffer_size(None);
    Ok(t)
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        self.inner.shut();
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
        wire::split(&frame, inner.max_frame_len).map_err(TransportError::InvalidFrame)?;
        let conn = inner.connection(to).await?;
        let write = async {
            let mut stream = conn.open_uni().await.map_err(|e| e.to_string())?;
            stream.write_all(&frame).await.map_err(|e| e.to_string())?;
            stream.finish().map_err(|e| e.to_string())?;
            Ok::<_, String>(stream.stopped())
        };
        match tokio::time::timeout(inner.config.send_timeout, write).await {
            Ok(Ok(stopped)) => {
                bump(&inner.counters.frames_sent);
                inner.track(stopped);
                Ok(())
            }
            Ok(Err(reason)) => {
                inner.forget(to, &conn).await;
                Err(TransportError::Unreachable {
                    addr: to.clone(),
                    reason,
                })
            }
            Err(_) => Err(TransportError::QueueFull { addr: to.clone() }),
        }
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
        let inner = &self.inner;
        inner.shut();
        let limit = inner.config.close_timeout;
        let mut unacked = inner.unacked.subscribe();
        if tokio::time::timeout(limit, unacked.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            tracing::warn!(local = %inner.local, ?limit, "close gave up waiting for acknowledgements");
        }
        inner.peers().clear();
        inner
            .endpoint
            .close(VarInt::from_u32(code::CLOSING), b"closing");
        if tokio::time::timeout(limit, inner.endpoint.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!(local = %inner.local, "connections did not finish closing");
        }
        let accept = self
            .accept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(accept) = accept {
            let _ = accept.await;
        }
    }
}

async fn accept_loop(inner: Arc<Inner>) {
    let mut closed = inner.closed.subscribe();
    loop {
        let incoming = tokio::select! {
            _ = closed.wait_for(|c| *c) => return,
            incoming = inner.endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { return };
        tokio::spawn(inbound(Arc::clone(&inner), incoming));
    }
}

/// An incoming connection: handshake, hello, then its streams.
async fn inbound(inner: Arc<Inner>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let timeout = inner.config.connect_timeout;
    let conn = match tokio::time::timeout(timeout, async { incoming.accept()?.await }).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(error)) => {
            bump(&inner.counters.handshake_failures);
            tracing::warn!(%remote, %error, "handshake failed");
            return;
        }
        Err(_) => {
            bump(&inner.counters.handshake_failures);
            tracing::warn!(%remote, "handshake timed out");
            return;
        }
    };
    bump(&inner.counters.accepted);
    let from = match tokio::time::timeout(timeout, read_hello(&conn)).await {
        Ok(Ok(from)) => from,
        Ok(Err(why)) => return reject(&inner, &conn, code::BAD_HELLO, &why),
        Err(_) => return reject(&inner, &conn, code::BAD_HELLO, "no hello in time"),
    };
    {
        let slot = inner.slot(&from);
        let mut state = slot.state.lock().await;
        let live = matches!(&*state, SlotState::Up(c) if c.close_reason().is_none());
        if !live && !inner.is_closed() {
            *state = SlotState::Up(conn.clone());
        }
    }
    read_streams(inner, conn, from).await;
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

fn reject(inner: &Inner, conn: &Connection, code: u32, why: &str) {
    bump(&inner.counters.rejected_connections);
    tracing::warn!(remote = %conn.remote_address(), why, "closing connection");
    conn.close(VarInt::from_u32(code), why.as_bytes());
}

/// Accepts the peer's streams (one frame each) until the connection or the transport closes.
async fn read_streams(inner: Arc<Inner>, conn: Connection, from: Address) {
    let mut closed = inner.closed.subscribe();
    // quinn hands a stream's credit back once it is read to the end, so its stream limit does
    // not bound frames read but not yet taken by `recv`; this does, per connection.
    let in_flight = Arc::new(Semaphore::new(
        inner.config.max_concurrent_streams.get() as usize
    ));
    loop {
        let permit = tokio::select! {
            _ = closed.wait_for(|c| *c) => return,
            permit = Arc::clone(&in_flight).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let stream = tokio::select! {
            _ = closed.wait_for(|c| *c) => return,
            stream = conn.accept_uni() => stream,
        };
        match stream {
            Ok(stream) => {
                tokio::spawn(read_frame(
                    Arc::clone(&inner),
                    conn.clone(),
                    stream,
                    from.clone(),
                    permit,
                ));
            }
            Err(error) => {
                tracing::debug!(peer = %from, %error, "connection ended");
                let slot = inner.slot(&from);
                let mut state = slot.state.lock().await;
                if matches!(&*state, SlotState::Up(c) if c.stable_id() == conn.stable_id()) {
                    *state = SlotState::Empty;
                }
                return;
            }
        }
    }
}

async fn read_frame(
    inner: Arc<Inner>,
    conn: Connection,
    mut stream: quinn::RecvStream,
    from: Address,
    // Held until the frame is handed over (or dropped): see `read_streams`.
    _permit: OwnedSemaphorePermit,
) {
    let data = match stream.read_to_end(inner.max_frame_len).await {
        Ok(data) => data,
        Err(quinn::ReadToEndError::TooLong) => {
            return reject(
                &inner,
                &conn,
                code::BAD_FRAME,
                "stream longer than the maximum frame",
            );
        }
        Err(error) => {
            tracing::debug!(peer = %from, %error, "stream ended early");
            return;
        }
    };
    match wire::frame_len(&data, inner.max_frame_len) {
        Ok(Some(total)) if total == data.len() => {}
        Ok(_) => {
            return reject(
                &inner,
                &conn,
                code::BAD_FRAME,
                "stream is not one whole frame",
            );
        }
        Err(error) => return reject(&inner, &conn, code::BAD_FRAME, &error.to_string()),
    }
    if data[wire::PREFIX_LEN..wire::PREFIX_LEN + 2] != wire::MAGIC {
        return reject(
            &inner,
            &conn,
            code::BAD_FRAME,
            "frame without the Chorus magic",
        );
    }
    let incoming = Incoming {
        from,
        frame: Bytes::from(data),
    };
    let mut closed = inner.closed.subscribe();
    tokio::select! {
        sent = inner.incoming.send(incoming) => if sent.is_ok() {
            bump(&inner.counters.frames_received);
        },
        _ = closed.wait_for(|c| *c) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_core::wire::{Header, Message};

    fn frame(text: &str) -> Bytes {
        let message = Message::Error {
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
}
