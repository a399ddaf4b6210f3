//! Settings of the QUIC transport and their parsing from [`TransportSpec`] options.

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::Path;
use std::time::Duration;

use chorus_core::identity::Address;
use chorus_core::options::Options;
use chorus_core::transport::TransportError;
use chorus_core::transport::inbound;
use chorus_core::transport::outbox::OutboxConfig;
use chorus_core::wire::{DEFAULT_MAX_FRAME_LEN, MAX_FRAME_LEN_CEILING};

use crate::tls::{Identity, TrustedPeers};

#[cfg(doc)]
use chorus_core::registry::TransportSpec;

/// Settings of a [`QuicTransport`](crate::QuicTransport). Start from a preset
/// ([`QuicConfig::lan`], the default, or [`QuicConfig::local`]) and change fields.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuicConfig {
    /// Largest frame, length prefix included, sent or accepted. Capped at
    /// [`MAX_FRAME_LEN_CEILING`]. A peer sending a longer one has its connection closed.
    pub max_frame_len: usize,
    /// Frames queued towards one peer before `send` has to wait (the bound on memory a slow peer
    /// can make this node hold on the sending side: `queue_capacity` frames per peer).
    pub queue_capacity: NonZeroUsize,
    /// How long `send` waits for room in a full peer queue before failing with
    /// [`TransportError::QueueFull`].
    pub queue_wait: Duration,
    /// Most frames a peer's writer puts on one stream. The writer takes what is queued (up to
    /// this many frames or about 256 KiB) and sends it as one stream, so under load frames
    /// share streams and packets; a lone frame gets a stream of its own at once.
    pub max_batch: NonZeroUsize,
    /// Streams one peer may have open towards this node at once (QUIC's limit on concurrently
    /// open unidirectional streams); a sender at the limit waits for one to finish. Each open
    /// stream may hold one partial frame here, so this times `max_frame_len` bounds the
    /// memory a peer can tie up per connection.
    pub max_concurrent_streams: NonZeroU32,
    /// Bytes a connection may have sent but not yet acknowledged (QUIC's send window).
    pub send_window: NonZeroUsize,
    /// Bytes a peer may send on one connection beyond what this node has read (QUIC's
    /// connection flow-control window). Keep it within the UDP socket's receive buffer (see
    /// [`socket_buffer`](Self::socket_buffer)): a sender that outruns the receiver then waits
    /// for credit instead of overflowing the buffer and losing packets.
    pub receive_window: NonZeroUsize,
    /// Largest UDP payload this endpoint sends and accepts, 1200 to 65527. Path MTU discovery
    /// probes up to it (packets start at 1200 bytes and grow to what the path carries).
    /// `lan()` uses 1452, which fits Ethernet's 1500-byte MTU over IPv4 and IPv6; `local()`
    /// uses 65527 for loopback, whose MTU is 64 KiB. Above 6553 bytes, UDP segmentation
    /// offload (GSO) is turned off: quinn hands the kernel up to 10 packets per call, and the
    /// kernel refuses a GSO batch of more than 64 KiB.
    pub max_udp_payload: u16,
    /// Bytes requested for the UDP socket's receive and send buffers. The kernel caps the
    /// request at `net.core.rmem_max` / `wmem_max`; a cap below the request is logged.
    pub socket_buffer: NonZeroUsize,
    /// Received frames buffered for `recv`; when full, stream readers wait and QUIC flow
    /// control slows the senders (datagrams that find it full are dropped).
    pub recv_capacity: NonZeroUsize,
    /// Bytes of received frames buffered for `recv`, at most [`MAX_RECV_BYTES`](inbound::MAX_RECV_BYTES); full, it
    /// acts like `recv_capacity`. A frame larger than this still passes once the queue is
    /// empty.
    pub recv_bytes: NonZeroUsize,
    /// Connections peers may have open to this node at once (handshakes in progress
    /// included); one more is refused before its handshake (QUIC `CONNECTION_REFUSED`) and
    /// counted in [`QuicStats::refused_connections`](crate::QuicStats::refused_connections).
    pub max_inbound_connections: NonZeroUsize,
    /// Incoming handshakes (TLS and the hello) in progress at once; one more is refused and
    /// counted like a connection over `max_inbound_connections`.
    pub max_handshakes: NonZeroUsize,
    /// Time an incoming connection has to complete its handshake and send its hello; then it
    /// is dropped and counted in [`QuicStats::handshake_failures`](crate::QuicStats::handshake_failures)
    /// (handshake) or [`QuicStats::rejected_connections`](crate::QuicStats::rejected_connections)
    /// (hello).
    pub handshake_timeout: Duration,
    /// Whether frames given to `send_unreliable` that fit one packet travel as QUIC datagrams
    /// (RFC 9221): no stream, no retransmission, no head-of-line blocking; they may be lost.
    /// Off, or towards a peer that does not accept datagrams, they go on streams like `send`.
    pub datagrams: bool,
    /// Time allowed for a dial (handshake and hello); `send` to a peer still connecting waits
    /// at most this long and then fails with [`TransportError::Timeout`].
    pub connect_timeout: Duration,
    /// First delay before redialling a peer whose dial failed; doubled after each failure.
    /// While a redial is pending, sends to that peer fail at once with
    /// [`TransportError::Unreachable`].
    pub backoff_min: Duration,
    /// Largest redial delay. Each delay is drawn uniformly from `[d/2, d]` (jitter).
    pub backoff_max: Duration,
    /// The round-trip time assumed until one is measured. Handshake retransmissions and the
    /// closing period of a connection that never measured one (a dial to a node that is gone,
    /// say) scale with it, and so does how long `close` waits for such connections. RFC 9002's
    /// 333 ms suits the internet; `lan()` assumes 10 ms, `local()` 1 ms.
    pub initial_rtt: Duration,
    /// A connection without any packet for this long is closed (QUIC idle timeout; no
    /// keep-alives are sent, so unused connections go away). Redials after a failed dial stop
    /// once nothing was sent to the peer for this long.
    pub idle_timeout: Duration,
    /// How long [`close`](chorus_core::Transport::close) takes at most: it waits for queued
    /// frames to be sent and for each peer to confirm it has read them (by closing the
    /// connection after the goodbye), then for the connections to finish closing.
    pub close_timeout: Duration,
    /// The address announced to peers (and returned by `local_addr`); `None` uses the bound
    /// socket address. An unspecified address (`0.0.0.0`, `[::]`) or port 0 is refused, and
    /// so is `None` with a wildcard bind: peers could not dial it.
    pub advertise: Option<Address>,
    /// Seed of the backoff jitter; `None` derives one from the clock and the local port.
    pub jitter_seed: Option<u64>,
}

/// The smallest UDP payload QUIC allows a path to carry.
pub const MIN_UDP_PAYLOAD: u16 = 1200;

/// The largest UDP payload (over IPv6; IPv4 carries up to 65507).
pub const MAX_UDP_PAYLOAD: u16 = 65527;

/// Packets quinn hands the kernel in one GSO call (quinn's `MAX_TRANSMIT_SEGMENTS`).
const GSO_BATCH: usize = 10;

/// The most bytes the kernel accepts in one GSO call.
const GSO_MAX_BYTES: usize = 65_535;

impl Default for QuicConfig {
    /// [`QuicConfig::lan`].
    fn default() -> Self {
        QuicConfig::lan()
    }
}

const fn nz32(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => NonZeroU32::MIN,
    }
}

const fn nz(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(n) => n,
        None => NonZeroUsize::MIN,
    }
}

impl QuicConfig {
    /// For a data-centre network: 2 s to connect and for an incoming handshake, backoff 50 ms
    /// to 5 s, idle after 60 s, Ethernet-sized UDP payloads, 10 ms assumed round trip before
    /// one is measured; at most 1024 inbound connections (64 in their handshake) and 64 MiB of
    /// received frames waiting for `recv`.
    pub fn lan() -> Self {
        QuicConfig {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            queue_capacity: nz(4096),
            queue_wait: Duration::from_secs(1),
            max_batch: nz(256),
            max_concurrent_streams: nz32(1024),
            send_window: nz(8 * 1024 * 1024),
            receive_window: nz(4 * 1024 * 1024),
            max_udp_payload: 1452,
            socket_buffer: nz(4 * 1024 * 1024),
            recv_capacity: nz(8192),
            recv_bytes: nz(64 * 1024 * 1024),
            max_inbound_connections: nz(1024),
            max_handshakes: nz(64),
            handshake_timeout: Duration::from_secs(2),
            datagrams: true,
            initial_rtt: Duration::from_millis(10),
            connect_timeout: Duration::from_secs(2),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            close_timeout: Duration::from_secs(5),
            advertise: None,
            jitter_seed: None,
        }
    }

    /// For one machine (tests, loopback clusters): 500 ms to connect and for an incoming
    /// handshake, backoff 10 to 250 ms, idle after 30 s, UDP payloads up to loopback's 64 KiB,
    /// 1 ms assumed round trip; at most 256 inbound connections (64 in their handshake).
    pub fn local() -> Self {
        QuicConfig {
            handshake_timeout: Duration::from_millis(500),
            max_inbound_connections: nz(256),
            queue_wait: Duration::from_millis(250),
            max_udp_payload: MAX_UDP_PAYLOAD,
            initial_rtt: Duration::from_millis(1),
            connect_timeout: Duration::from_millis(500),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(250),
            idle_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(2),
            ..QuicConfig::lan()
        }
    }

    pub(crate) fn effective_max_frame_len(&self) -> usize {
        self.max_frame_len.min(MAX_FRAME_LEN_CEILING)
    }

    /// Whether UDP segmentation offload can be used with [`max_udp_payload`](Self::max_udp_payload).
    pub(crate) fn segmentation_offload(&self) -> bool {
        usize::from(self.max_udp_payload) * GSO_BATCH <= GSO_MAX_BYTES
    }

    /// Parses [`TransportSpec::options`] into the settings, the node's identity and its
    /// trusted peers:
    ///
    /// | key | meaning |
    /// |-----|---------|
    /// | `cert`, `key` | **required**: PEM files of this node's certificate and private key ([`Identity::cert_pem`], [`Identity::key_pem`]) |
    /// | `trust` | **required**: comma-separated PEM files holding the certificates of every peer (this node's own is always trusted) |
    /// | `preset` | `lan` (default) or `local`, applied before the other keys |
    /// | `max_frame_len` | bytes |
    /// | `queue_capacity`, `max_batch`, `recv_capacity` | frames, non-zero |
    /// | `recv_bytes` | bytes, non-zero, at most 4 GiB - 1 |
    /// | `max_inbound_connections`, `max_handshakes` | connections, non-zero |
    /// | `max_concurrent_streams` | streams open per peer, non-zero |
    /// | `send_window`, `receive_window`, `socket_buffer` | bytes, non-zero |
    /// | `max_udp_payload` | bytes, 1200 to 65527 |
    /// | `datagrams` | `true` (default) or `false` |
    /// | `initial_rtt_ms`, `queue_wait_ms`, `connect_timeout_ms`, `handshake_timeout_ms`, `backoff_min_ms`, `backoff_max_ms`, `idle_timeout_ms`, `close_timeout_ms` | milliseconds |
    /// | `advertise` | `host:port` announced to peers; not `0.0.0.0`, `[::]` or port 0 |
    /// | `jitter_seed` | integer |
    ///
    /// A missing required key, an unknown key or a bad value is a [`TransportError::Config`]
    /// naming the key.
    ///
    /// This is the insecure-mode form; in keyring mode the node's identity and keyring secure
    /// the transport instead (see [`from_options_authenticated`](Self::from_options_authenticated)).
    pub fn from_options(
        options: &BTreeMap<String, String>,
    ) -> Result<(Self, Identity, TrustedPeers), TransportError> {
        let mut o = Options::new("the quic transport", options);
        let config = Self::settings(&mut o)?;
        let cert = o.path("cert");
        let key = o.path("key");
        let trust = o.list("trust");
        o.finish()?;
        config.validate()?;
        // Checked after the other options, so that a misspelt key is reported as such.
        let why = "(the quic transport authenticates every peer by certificate)";
        let cert = cert.ok_or_else(|| {
            o.missing(
                "cert",
                &format!("a PEM file with this node's certificate {why}"),
            )
        })?;
        let key = key.ok_or_else(|| {
            o.missing(
                "key",
                &format!("a PEM file with this node's private key {why}"),
            )
        })?;
        let trust = trust.ok_or_else(|| {
            o.missing(
                "trust",
                &format!("comma-separated PEM files of the trusted peers {why}"),
            )
        })?;
        let identity = Identity::from_pem_files(&cert, &key)?;
        let mut trusted = TrustedPeers::new();
        for path in trust {
            trusted.add_pem_file(Path::new(path))?;
        }
        Ok((config, identity, trusted))
    }

    /// Parses the settings of a transport secured by the node's identity and keyring (keyring
    /// mode): the keys of [`from_options`](Self::from_options) but `cert`, `key` and `trust`,
    /// which are refused with an error naming them (the certificate is derived from the
    /// identity, and the keyring is the trust).
    pub fn from_options_authenticated(
        options: &BTreeMap<String, String>,
    ) -> Result<Self, TransportError> {
        for pem in ["cert", "key", "trust"] {
            if options.contains_key(pem) {
                return Err(TransportError::Config(format!(
                    "the quic transport: option `{pem}` is not used in keyring mode (the \
                     certificate is derived from the node's identity and peers are checked \
                     against the keyring): remove it"
                )));
            }
        }
        let mut o = Options::new("the quic transport", options);
        let config = Self::settings(&mut o)?;
        o.finish()?;
        config.validate()?;
        Ok(config)
    }

    /// The keys both forms share.
    fn settings(o: &mut Options<'_>) -> Result<Self, TransportError> {
        let presets = [
            ("lan", QuicConfig::lan as fn() -> Self),
            ("local", QuicConfig::local),
        ];
        let base = o.choice("preset", &presets)?.unwrap_or(QuicConfig::lan)();
        let config = QuicConfig {
            max_frame_len: o.parse("max_frame_len")?.unwrap_or(base.max_frame_len),
            queue_capacity: o.parse("queue_capacity")?.unwrap_or(base.queue_capacity),
            queue_wait: o.millis("queue_wait_ms")?.unwrap_or(base.queue_wait),
            max_batch: o.parse("max_batch")?.unwrap_or(base.max_batch),
            max_concurrent_streams: o
                .parse("max_concurrent_streams")?
                .unwrap_or(base.max_concurrent_streams),
            send_window: o.parse("send_window")?.unwrap_or(base.send_window),
            receive_window: o.parse("receive_window")?.unwrap_or(base.receive_window),
            max_udp_payload: o.parse("max_udp_payload")?.unwrap_or(base.max_udp_payload),
            socket_buffer: o.parse("socket_buffer")?.unwrap_or(base.socket_buffer),
            recv_capacity: o.parse("recv_capacity")?.unwrap_or(base.recv_capacity),
            recv_bytes: o.parse("recv_bytes")?.unwrap_or(base.recv_bytes),
            max_inbound_connections: o
                .parse("max_inbound_connections")?
                .unwrap_or(base.max_inbound_connections),
            max_handshakes: o.parse("max_handshakes")?.unwrap_or(base.max_handshakes),
            handshake_timeout: o
                .millis("handshake_timeout_ms")?
                .unwrap_or(base.handshake_timeout),
            datagrams: o.parse("datagrams")?.unwrap_or(base.datagrams),
            connect_timeout: o
                .millis("connect_timeout_ms")?
                .unwrap_or(base.connect_timeout),
            backoff_min: o.millis("backoff_min_ms")?.unwrap_or(base.backoff_min),
            backoff_max: o.millis("backoff_max_ms")?.unwrap_or(base.backoff_max),
            initial_rtt: o.millis("initial_rtt_ms")?.unwrap_or(base.initial_rtt),
            idle_timeout: o.millis("idle_timeout_ms")?.unwrap_or(base.idle_timeout),
            close_timeout: o.millis("close_timeout_ms")?.unwrap_or(base.close_timeout),
            advertise: o.string("advertise").map(Address::new).or(base.advertise),
            jitter_seed: o.parse("jitter_seed")?.or(base.jitter_seed),
        };
        Ok(config)
    }

    /// The settings of the per-peer queues and redials; `jitter_salt` goes into a jitter seed
    /// derived from the clock.
    pub(crate) fn outbox(&self, jitter_salt: u64) -> OutboxConfig {
        OutboxConfig {
            queue_capacity: self.queue_capacity,
            queue_wait: self.queue_wait,
            connect_timeout: self.connect_timeout,
            idle_timeout: self.idle_timeout,
            backoff_min: self.backoff_min,
            backoff_max: self.backoff_max,
            jitter_seed: self.jitter_seed,
            jitter_salt,
        }
    }

    /// Checks relations between fields, and the `advertise` address.
    pub fn validate(&self) -> Result<(), TransportError> {
        self.outbox(0).validate()?;
        inbound::check_inbound_limits(
            self.handshake_timeout,
            self.recv_bytes,
            self.advertise.as_ref(),
        )?;
        if self.initial_rtt.is_zero() {
            return Err(TransportError::Config(
                "option `initial_rtt_ms` must be positive".to_owned(),
            ));
        }
        if !(MIN_UDP_PAYLOAD..=MAX_UDP_PAYLOAD).contains(&self.max_udp_payload) {
            return Err(TransportError::Config(format!(
                "option `max_udp_payload`: {} is not between {MIN_UDP_PAYLOAD} and {MAX_UDP_PAYLOAD}",
                self.max_udp_payload
            )));
        }
        if self.idle_timeout.as_millis() >= 1 << 62 {
            return Err(TransportError::Config(
                "option `idle_timeout_ms` is too large for QUIC".to_owned(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn errors_name_the_field() {
        for (pairs, field) in [
            (&[][..], "cert"),
            (&[("cert", "/nonexistent/c.pem")][..], "key"),
            (
                &[
                    ("cert", "/nonexistent/c.pem"),
                    ("key", "/nonexistent/k.pem"),
                ][..],
                "trust",
            ),
            (
                &[
                    ("cert", "/nonexistent/c.pem"),
                    ("key", "/nonexistent/k.pem"),
                    ("trust", "/nonexistent/t.pem"),
                ][..],
                "cert",
            ),
            (
                &[("max_concurrent_streams", "0")][..],
                "max_concurrent_streams",
            ),
            (&[("connect_timeout_ms", "0")][..], "connect_timeout_ms"),
            (&[("max_udp_payload", "1000")][..], "max_udp_payload"),
            (&[("max_udp_payload", "70000")][..], "max_udp_payload"),
            (&[("queue_capacity", "0")][..], "queue_capacity"),
            (&[("colour", "blue")][..], "colour"),
            (&[("advertise", "0.0.0.0:7000")][..], "advertise"),
            (&[("advertise", "[::]:0")][..], "advertise"),
            (
                &[("max_inbound_connections", "0")][..],
                "max_inbound_connections",
            ),
            (&[("max_handshakes", "0")][..], "max_handshakes"),
            (&[("handshake_timeout_ms", "0")][..], "handshake_timeout_ms"),
            (&[("recv_bytes", "4294967296")][..], "recv_bytes"),
        ] {
            let err = QuicConfig::from_options(&options(pairs)).expect_err("invalid");
            assert!(
                matches!(&err, TransportError::Config(m) if m.contains(field)),
                "{pairs:?}: {err}"
            );
        }
    }

    #[test]
    fn segmentation_offload_only_where_a_batch_fits_the_kernel_limit() {
        assert!(QuicConfig::lan().segmentation_offload());
        assert!(!QuicConfig::local().segmentation_offload());
        let mut jumbo = QuicConfig::lan();
        jumbo.max_udp_payload = 8952;
        assert!(
            !jumbo.segmentation_offload(),
            "10 x 8952 bytes exceed 64 KiB"
        );
        let config = QuicConfig::from_options(&options(&[("max_udp_payload", "1200")]));
        // Parsing stops at the missing certificate, after the value was accepted.
        assert!(matches!(config, Err(TransportError::Config(m)) if m.contains("cert")));
    }
}
