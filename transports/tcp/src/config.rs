//! Settings of the TCP transport and their parsing from [`TransportSpec`] options.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::time::Duration;

use chorus_core::identity::Address;
use chorus_core::options::Options;
use chorus_core::transport::TransportError;
use chorus_core::transport::inbound;
use chorus_core::transport::outbox::OutboxConfig;
use chorus_core::wire::{DEFAULT_MAX_FRAME_LEN, MAX_FRAME_LEN_CEILING};

#[cfg(doc)]
use chorus_core::registry::TransportSpec;

/// Settings of a [`TcpTransport`](crate::TcpTransport). Start from a preset ([`TcpConfig::lan`],
/// the default, or [`TcpConfig::local`]) and change fields.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TcpConfig {
    /// Largest frame, length prefix included, sent or accepted. Capped at
    /// [`MAX_FRAME_LEN_CEILING`]. A peer announcing a longer frame has its connection closed.
    pub max_frame_len: usize,
    /// Frames queued towards one peer before `send` has to wait (the bound on memory a slow peer
    /// can make this node hold: `queue_capacity` frames per peer).
    pub queue_capacity: NonZeroUsize,
    /// How long `send` waits for room in a full peer queue before failing with
    /// [`TransportError::QueueFull`].
    pub queue_wait: Duration,
    /// Received frames buffered for [`recv`](chorus_core::Transport::recv); when full, readers
    /// stop reading and TCP flow control slows the senders.
    pub recv_capacity: NonZeroUsize,
    /// Bytes of received frames buffered for `recv`, at most [`MAX_RECV_BYTES`](inbound::MAX_RECV_BYTES); like
    /// `recv_capacity`, when full, readers stop reading. A frame larger than this still passes
    /// once the queue is empty.
    pub recv_bytes: NonZeroUsize,
    /// Connections peers may have open to this node at once (hellos still awaited included);
    /// one more is closed as soon as it is accepted, and counted in
    /// [`TcpStats::refused_connections`](crate::TcpStats::refused_connections).
    pub max_inbound_connections: NonZeroUsize,
    /// Accepted connections that may be waiting for their hello at once; one more is closed at
    /// once and counted like a connection over `max_inbound_connections`.
    pub max_handshakes: NonZeroUsize,
    /// Time an accepted connection has to send its hello; then it is closed and counted in
    /// [`TcpStats::rejected_connections`](crate::TcpStats::rejected_connections).
    pub handshake_timeout: Duration,
    /// Most frames written with one `writev` call (at most 1024, the kernel's `IOV_MAX`).
    pub max_batch: NonZeroUsize,
    /// Time allowed to connect and send the hello; `send` to a peer still connecting waits at
    /// most this long and then fails with [`TransportError::Timeout`].
    pub connect_timeout: Duration,
    /// First delay before redialling a peer whose dial failed; doubled after each failure.
    pub backoff_min: Duration,
    /// Largest redial delay. Each delay is drawn uniformly from `[d/2, d]` (jitter).
    pub backoff_max: Duration,
    /// A connection, dialled or accepted, with no bytes read or written for this long is
    /// closed (and counted in [`TcpStats::idle_closed`](crate::TcpStats::idle_closed)).
    pub idle_timeout: Duration,
    /// TCP keepalive idle time and probe interval; `None` leaves keepalive off.
    pub keepalive: Option<Duration>,
    /// How long [`close`](chorus_core::Transport::close) waits for queued frames to be written.
    pub close_timeout: Duration,
    /// The address announced to peers (and returned by `local_addr`); `None` uses the bound
    /// socket address. An unspecified address (`0.0.0.0`, `[::]`) or port 0 is refused, and
    /// so is `None` with a wildcard bind such as `0.0.0.0:7000`: peers could not dial it.
    pub advertise: Option<Address>,
    /// Seed of the reconnect jitter; `None` derives one from the clock and the local address.
    pub jitter_seed: Option<u64>,
    /// Whether connections run TLS 1.3 keyed by the node identity and pinned to the keyring
    /// (see the [crate documentation](crate#tls)).
    pub tls: TcpTls,
}

/// Whether a [`TcpTransport`](crate::TcpTransport) runs TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum TcpTls {
    /// TLS when the node is in keyring mode (it hands the transport its identity), plain
    /// TCP in insecure mode. The default.
    #[default]
    Auto,
    /// TLS always: binding fails without an identity and keyring.
    On,
    /// Plain TCP even in keyring mode: membership stays signed, but data travels in the
    /// clear and unauthenticated. Only for trusted networks; logged as a warning.
    Off,
}

impl Default for TcpConfig {
    /// [`TcpConfig::lan`].
    fn default() -> Self {
        TcpConfig::lan()
    }
}

const fn nz(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(n) => n,
        None => NonZeroUsize::MIN,
    }
}

impl TcpConfig {
    /// For a data-centre network: 1 s to connect and to send the hello, redial between 50 ms
    /// and 5 s, connections idle for 60 s closed, keepalive every 15 s; at most 1024 inbound
    /// connections (64 awaiting their hello) and 64 MiB of received frames waiting for
    /// `recv`.
    pub fn lan() -> Self {
        TcpConfig {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            queue_capacity: nz(4096),
            queue_wait: Duration::from_secs(1),
            recv_capacity: nz(8192),
            recv_bytes: nz(64 * 1024 * 1024),
            max_inbound_connections: nz(1024),
            max_handshakes: nz(64),
            handshake_timeout: Duration::from_secs(1),
            max_batch: nz(256),
            connect_timeout: Duration::from_secs(1),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            keepalive: Some(Duration::from_secs(15)),
            close_timeout: Duration::from_secs(5),
            advertise: None,
            jitter_seed: None,
            tls: TcpTls::Auto,
        }
    }

    /// For one machine (tests, loopback clusters): 250 ms to connect and to send the hello,
    /// redial between 10 ms and 250 ms, idle after 30 s, keepalive every 5 s; at most 256
    /// inbound connections (64 awaiting their hello), 64 MiB waiting for `recv`.
    pub fn local() -> Self {
        TcpConfig {
            queue_wait: Duration::from_millis(250),
            connect_timeout: Duration::from_millis(250),
            handshake_timeout: Duration::from_millis(250),
            max_inbound_connections: nz(256),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(250),
            idle_timeout: Duration::from_secs(30),
            keepalive: Some(Duration::from_secs(5)),
            close_timeout: Duration::from_secs(2),
            ..TcpConfig::lan()
        }
    }

    /// This configuration with another maximum frame length.
    pub fn with_max_frame_len(mut self, max_frame_len: usize) -> Self {
        self.max_frame_len = max_frame_len;
        self
    }

    /// The maximum frame length in force (capped at the ceiling).
    pub(crate) fn effective_max_frame_len(&self) -> usize {
        self.max_frame_len.min(MAX_FRAME_LEN_CEILING)
    }

    /// The batch size in force (capped at `IOV_MAX`).
    pub(crate) fn effective_max_batch(&self) -> usize {
        self.max_batch.get().min(1024)
    }

    /// Parses [`TransportSpec::options`]. Every key is optional:
    ///
    /// | key | meaning |
    /// |-----|---------|
    /// | `preset` | `lan` (default) or `local`, applied before the other keys |
    /// | `max_frame_len` | bytes |
    /// | `queue_capacity`, `recv_capacity`, `max_batch` | frames, non-zero |
    /// | `recv_bytes` | bytes, non-zero, at most 4 GiB - 1 |
    /// | `max_inbound_connections`, `max_handshakes` | connections, non-zero |
    /// | `queue_wait_ms`, `connect_timeout_ms`, `handshake_timeout_ms`, `backoff_min_ms`, `backoff_max_ms`, `idle_timeout_ms`, `close_timeout_ms` | milliseconds |
    /// | `keepalive_ms` | milliseconds, `0` turns keepalive off |
    /// | `advertise` | `host:port` announced to peers; not `0.0.0.0`, `[::]` or port 0 |
    /// | `jitter_seed` | integer |
    /// | `tls` | `auto` (default: TLS in keyring mode), `on` or `off` ([`TcpTls`]) |
    ///
    /// An unknown key or a bad value is a [`TransportError::Config`] naming the key.
    pub fn from_options(options: &BTreeMap<String, String>) -> Result<Self, TransportError> {
        let mut o = Options::new("the tcp transport", options);
        let presets = [
            ("lan", TcpConfig::lan as fn() -> Self),
            ("local", TcpConfig::local),
        ];
        let base = o.choice("preset", &presets)?.unwrap_or(TcpConfig::lan)();
        let config = TcpConfig {
            max_frame_len: o.parse("max_frame_len")?.unwrap_or(base.max_frame_len),
            queue_capacity: o.parse("queue_capacity")?.unwrap_or(base.queue_capacity),
            recv_capacity: o.parse("recv_capacity")?.unwrap_or(base.recv_capacity),
            recv_bytes: o.parse("recv_bytes")?.unwrap_or(base.recv_bytes),
            max_inbound_connections: o
                .parse("max_inbound_connections")?
                .unwrap_or(base.max_inbound_connections),
            max_handshakes: o.parse("max_handshakes")?.unwrap_or(base.max_handshakes),
            handshake_timeout: o
                .millis("handshake_timeout_ms")?
                .unwrap_or(base.handshake_timeout),
            max_batch: o.parse("max_batch")?.unwrap_or(base.max_batch),
            queue_wait: o.millis("queue_wait_ms")?.unwrap_or(base.queue_wait),
            connect_timeout: o
                .millis("connect_timeout_ms")?
                .unwrap_or(base.connect_timeout),
            backoff_min: o.millis("backoff_min_ms")?.unwrap_or(base.backoff_min),
            backoff_max: o.millis("backoff_max_ms")?.unwrap_or(base.backoff_max),
            idle_timeout: o.millis("idle_timeout_ms")?.unwrap_or(base.idle_timeout),
            close_timeout: o.millis("close_timeout_ms")?.unwrap_or(base.close_timeout),
            // 0 turns keepalive off.
            keepalive: match o.millis("keepalive_ms")? {
                Some(every) => (!every.is_zero()).then_some(every),
                None => base.keepalive,
            },
            advertise: o.string("advertise").map(Address::new).or(base.advertise),
            jitter_seed: o.parse("jitter_seed")?.or(base.jitter_seed),
            tls: o
                .choice(
                    "tls",
                    &[
                        ("auto", TcpTls::Auto),
                        ("on", TcpTls::On),
                        ("off", TcpTls::Off),
                    ],
                )?
                .unwrap_or(base.tls),
        };
        o.finish()?;
        config.validate()?;
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
    fn options_override_the_preset() {
        let config = TcpConfig::from_options(&options(&[
            ("preset", "local"),
            ("connect_timeout_ms", "75"),
            ("keepalive_ms", "0"),
            ("queue_capacity", "8"),
            ("recv_bytes", "65536"),
            ("max_inbound_connections", "3"),
            ("max_handshakes", "2"),
            ("handshake_timeout_ms", "40"),
            ("advertise", "10.0.0.1:7000"),
            ("tls", "off"),
        ]))
        .expect("valid");
        assert_eq!(config.tls, TcpTls::Off);
        assert_eq!(config.recv_bytes.get(), 65536);
        assert_eq!(
            (
                config.max_inbound_connections.get(),
                config.max_handshakes.get()
            ),
            (3, 2)
        );
        assert_eq!(config.handshake_timeout, Duration::from_millis(40));
        assert_eq!(config.advertise, Some(Address::new("10.0.0.1:7000")));
        assert_eq!(config.connect_timeout, Duration::from_millis(75));
        assert_eq!(config.keepalive, None);
        assert_eq!(config.queue_capacity.get(), 8);
        assert_eq!(config.backoff_min, TcpConfig::local().backoff_min);
    }

    #[test]
    fn errors_name_the_field() {
        for (pairs, field) in [
            (&[("queue_capacity", "0")][..], "queue_capacity"),
            (&[("connect_timeout_ms", "soon")][..], "connect_timeout_ms"),
            (&[("colour", "blue")][..], "colour"),
            (&[("preset", "moon")][..], "preset"),
            (&[("tls", "yes")][..], "tls"),
            (&[("advertise", "0.0.0.0:7000")][..], "advertise"),
            (&[("advertise", "[::]:7000")][..], "advertise"),
            (&[("advertise", "10.0.0.1:0")][..], "advertise"),
            (
                &[("max_inbound_connections", "0")][..],
                "max_inbound_connections",
            ),
            (&[("max_handshakes", "none")][..], "max_handshakes"),
            (&[("handshake_timeout_ms", "0")][..], "handshake_timeout_ms"),
            (&[("recv_bytes", "0")][..], "recv_bytes"),
            (&[("recv_bytes", "4294967296")][..], "recv_bytes"),
            (
                &[("backoff_min_ms", "10"), ("backoff_max_ms", "5")][..],
                "backoff_min_ms",
            ),
        ] {
            let err = TcpConfig::from_options(&options(pairs)).expect_err("invalid");
            assert!(
                matches!(&err, TransportError::Config(m) if m.contains(field)),
                "{err}"
            );
        }
    }
}
