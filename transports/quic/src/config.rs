//! Settings of the QUIC transport and their parsing from [`TransportSpec`] options.

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::Path;
use std::time::Duration;

use chorus_core::transport::{Address, TransportError};
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
    /// Frames one peer may have in flight towards this node at once (QUIC's limit on
    /// concurrently open unidirectional streams, one per frame). A sender at the limit waits.
    pub max_concurrent_streams: NonZeroU32,
    /// Bytes a connection may have sent but not yet acknowledged (QUIC's send window): the
    /// bound on memory a slow peer can make this node hold, per connection.
    pub send_window: NonZeroUsize,
    /// How long `send` waits for stream credit and send-window room before failing with
    /// [`TransportError::QueueFull`].
    pub send_timeout: Duration,
    /// Received frames buffered for `recv`; when full, stream readers wait and QUIC flow
    /// control slows the senders.
    pub recv_capacity: NonZeroUsize,
    /// Time allowed for the handshake and the hello; a dial that takes longer fails with
    /// [`TransportError::Timeout`].
    pub connect_timeout: Duration,
    /// After a failed dial, sends to that peer fail at once with
    /// [`TransportError::Unreachable`] for a delay starting here and doubling per failure...
    pub backoff_min: Duration,
    /// ...up to this; each delay is drawn uniformly from `[d/2, d]` (jitter).
    pub backoff_max: Duration,
    /// A connection without any packet for this long is closed (QUIC idle timeout; no
    /// keep-alives are sent, so unused connections go away).
    pub idle_timeout: Duration,
    /// How long [`close`](chorus_core::Transport::close) waits for sent frames to be
    /// acknowledged before closing the connections.
    pub close_timeout: Duration,
    /// The address announced to peers (and returned by `local_addr`); `None` uses the bound
    /// socket address.
    pub advertise: Option<Address>,
    /// Seed of the backoff jitter; `None` derives one from the clock and the local port.
    pub jitter_seed: Option<u64>,
}

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
    /// For a data-centre network: 2 s to connect, backoff 50 ms to 5 s, idle after 60 s.
    pub fn lan() -> Self {
        QuicConfig {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            max_concurrent_streams: nz32(1024),
            send_window: nz(32 * 1024 * 1024),
            send_timeout: Duration::from_secs(1),
            recv_capacity: nz(8192),
            connect_timeout: Duration::from_secs(2),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            close_timeout: Duration::from_secs(5),
            advertise: None,
            jitter_seed: None,
        }
    }

    /// For one machine: 500 ms to connect, backoff 10 to 250 ms, idle after 30 s.
    pub fn local() -> Self {
        QuicConfig {
            send_timeout: Duration::from_millis(250),
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

    /// Parses [`TransportSpec::options`] into the settings, the node's identity and its
    /// trusted peers:
    ///
    /// | key | meaning |
    /// |-----|---------|
    /// | `cert`, `key` | **required**: PEM files of this node's certificate and private key ([`Identity::cert_pem`], [`Identity::key_pem`]) |
    /// | `trust` | **required**: comma-separated PEM files holding the certificates of every peer (this node's own is always trusted) |
    /// | `preset` | `lan` (default) or `local`, applied before the other keys |
    /// | `max_frame_len` | bytes |
    /// | `max_concurrent_streams` | frames in flight per peer, non-zero |
    /// | `send_window`, `recv_capacity` | bytes / frames, non-zero |
    /// | `send_timeout_ms`, `connect_timeout_ms`, `backoff_min_ms`, `backoff_max_ms`, `idle_timeout_ms`, `close_timeout_ms` | milliseconds |
    /// | `advertise` | `host:port` announced to peers |
    /// | `jitter_seed` | integer |
    ///
    /// A missing required key, an unknown key or a bad value is a [`TransportError::Config`]
    /// naming the key.
    pub fn from_options(
        options: &BTreeMap<String, String>,
    ) -> Result<(Self, Identity, TrustedPeers), TransportError> {
        let mut config = match options.get("preset").map(String::as_str) {
            None | Some("lan") => QuicConfig::lan(),
            Some("local") => QuicConfig::local(),
            Some(other) => {
                return Err(TransportError::Config(format!(
                    "option `preset`: {other:?} is not one of `lan`, `local`"
                )));
            }
        };
        for (key, value) in options {
            match key.as_str() {
                "preset" | "cert" | "key" | "trust" => {}
                "max_frame_len" => config.max_frame_len = parse(key, value)?,
                "max_concurrent_streams" => config.max_concurrent_streams = parse(key, value)?,
                "send_window" => config.send_window = parse(key, value)?,
                "recv_capacity" => config.recv_capacity = parse(key, value)?,
                "send_timeout_ms" => config.send_timeout = millis(key, value)?,
                "connect_timeout_ms" => config.connect_timeout = millis(key, value)?,
                "backoff_min_ms" => config.backoff_min = millis(key, value)?,
                "backoff_max_ms" => config.backoff_max = millis(key, value)?,
                "idle_timeout_ms" => config.idle_timeout = millis(key, value)?,
                "close_timeout_ms" => config.close_timeout = millis(key, value)?,
                "advertise" => config.advertise = Some(Address::new(value)),
                "jitter_seed" => config.jitter_seed = Some(parse(key, value)?),
                _ => {
                    return Err(TransportError::Config(format!(
                        "unknown option `{key}` for the quic transport"
                    )));
                }
            }
        }
        config.validate()?;
        let required = |key: &str, what: &str| {
            options.get(key).ok_or_else(|| {
                TransportError::Config(format!(
                    "option `{key}` is required: {what} (the quic transport authenticates \
                     every peer by certificate)"
                ))
            })
        };
        let cert = required("cert", "a PEM file with this node's certificate")?;
        let key = required("key", "a PEM file with this node's private key")?;
        let trust = required("trust", "comma-separated PEM files of the trusted peers")?;
        let identity = Identity::from_pem_files(Path::new(cert), Path::new(key))?;
        let mut trusted = TrustedPeers::new();
        for path in trust.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            trusted.add_pem_file(Path::new(path))?;
        }
        Ok((config, identity, trusted))
    }

    /// Checks relations between fields.
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
            ("send_timeout_ms", self.send_timeout),
        ] {
            if value.is_zero() {
                return Err(TransportError::Config(format!(
                    "option `{name}` must be positive"
                )));
            }
        }
        if self.idle_timeout.as_millis() >= 1 << 62 {
            return Err(TransportError::Config(
                "option `idle_timeout_ms` is too large for QUIC".to_owned(),
            ));
        }
        Ok(())
    }
}

fn parse<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, TransportError>
where
    T::Err: std::fmt::Display,
{
    value
        .trim()
        .parse()
        .map_err(|e| TransportError::Config(format!("option `{key}`: {value:?}: {e}")))
}

fn millis(key: &str, value: &str) -> Result<Duration, TransportError> {
    parse::<u64>(key, value).map(Duration::from_millis)
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
            (&[("send_timeout_ms", "0")][..], "send_timeout_ms"),
            (&[("colour", "blue")][..], "colour"),
        ] {
            let err = QuicConfig::from_options(&options(pairs)).expect_err("invalid");
            assert!(
                matches!(&err, TransportError::Config(m) if m.contains(field)),
                "{pairs:?}: {err}"
            );
        }
    }
}
