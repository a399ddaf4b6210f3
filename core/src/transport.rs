//! The transport contract: moving whole frames between node addresses.
//!
//! A transport is deliberately dumb. It carries opaque, already length-prefixed frames (see
//! [`crate::wire`]) from one [`Address`] to another and hands received frames to whoever calls
//! [`Transport::recv`]. Everything with meaning (encoding, correlation of requests and
//! responses, authentication) belongs to core, so each transport is small and all of them
//! behave alike. Stream transports use [`crate::wire::frame_len`] to cut frames out of a byte
//! stream, which enforces the maximum frame size before anything is buffered.
//!
//! As with [`crate::storage`], [`Transport`] is the generic trait and [`DynTransport`] its
//! object-safe twin for the runtime-selected edge ([`SharedTransport`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::identity::Address;
use crate::util::BoxFuture;
use bytes::Bytes;

#[cfg(feature = "runtime")]
pub mod inbound;
#[cfg(feature = "runtime")]
pub mod outbox;

/// A transport chosen at run time: a cheap-to-clone handle to any [`Transport`], as the
/// registry hands out.
///
/// A struct, not a bare `Arc<dyn DynTransport>`: futures over `Arc<dyn DynTransport>`, such as
/// an `RpcEndpoint`'s `request` (`runtime::rpc`), could not be passed to
/// `tokio::spawn`, because the compiler must then prove `Transport` for the `dyn` object at
/// every lifetime and the impl exists only for `'static` ("implementation of `Transport` is not
/// general enough"). A named type has no lifetime to generalise over.
#[derive(Clone)]
pub struct SharedTransport(Arc<dyn DynTransport>);

impl SharedTransport {
    /// Wraps `transport`.
    pub fn new(transport: impl Transport) -> Self {
        SharedTransport(Arc::new(transport))
    }
}

impl<T: Transport> From<Arc<T>> for SharedTransport {
    fn from(transport: Arc<T>) -> Self {
        SharedTransport(transport)
    }
}

impl std::fmt::Debug for SharedTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedTransport({})", self.0.local_addr_dyn())
    }
}

/// A frame received from a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    /// An address that reaches the sender over the way this frame came: a frame sent to it
    /// arrives at the transport this frame came from.
    ///
    /// For a frame read from a connection this node dialled, it is the dialled address. For a
    /// frame read from a connection the peer opened, connection-oriented transports (tcp,
    /// quic) give that connection's [inbound address](inbound_address): sending to it travels
    /// back on that connection and fails with [`TransportError::Unreachable`] once the
    /// connection is gone; it is never dialled. The listen address a peer announces is not
    /// trusted to route anything: traffic to a listen address only ever travels on a
    /// connection this node dialled to it, so a peer claiming another's address receives the
    /// replies to its own frames and nothing else.
    pub from: Address,
    /// The whole frame, length prefix included.
    pub frame: Bytes,
}

/// The error a [`TransportError`] keeps as its source. Shared, because one failed dial is
/// reported to every `send` that finds the peer down.
pub type ErrorCause = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong moving a frame. Each variant says what became of the frame handed to
/// `send`; [`is_retryable`](Self::is_retryable) says whether sending it again may succeed.
/// (A frame that was queued is never reported by an error: `Ok` means accepted, not
/// delivered, and its fate is unknown until a response arrives.)
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Not sent: the peer could not be reached (nothing is listening, the connection could not
    /// be made, or the last dial failed and a redial is pending). Retryable: the peer may be
    /// back later.
    #[error("peer {addr} is unreachable: {source}")]
    Unreachable {
        /// The peer.
        addr: Address,
        /// Why: the dial's own error (an [`std::io::Error`], a TLS or QUIC error, ...); downcast
        /// it through this field, as the error chain yields the `Arc` around it.
        source: ErrorCause,
    },
    /// Not sent: no connection to the peer was ready within the configured time, and the frame
    /// was not queued. Retryable.
    #[error("sending to {addr} timed out after {after:?}")]
    Timeout {
        /// The peer.
        addr: Address,
        /// The configured timeout.
        after: Duration,
    },
    /// Refused: the frame is larger than the transport's maximum. Not retryable.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// Not sent: the queue towards the peer stayed full. Retryable once the caller has slowed
    /// down (or it may drop the frame).
    #[error("send queue to {addr} is full")]
    QueueFull {
        /// The peer.
        addr: Address,
    },
    /// The local address is already bound (from binding; no frame is involved). Not
    /// retryable as such: another address, or stopping the other process, is needed.
    #[error("address {0} is already in use")]
    AddressInUse(Address),
    /// Refused: the transport was closed. Not retryable on this transport.
    #[error("transport is closed")]
    Closed,
    /// Refused: the bytes handed to `send` are not one whole frame (the length prefix
    /// disagrees with the length, or the header is not a Chorus header); stream transports
    /// refuse them rather than desynchronise the stream. Not retryable.
    #[error("not a whole frame: {0}")]
    InvalidFrame(#[source] crate::wire::WireError),
    /// The transport's configuration (its options or key material) is invalid; the message
    /// names the field. From binding; not retryable.
    #[error("invalid transport configuration: {0}")]
    Config(String),
    /// An I/O error of the transport itself (binding its socket, say); from `send`, the frame
    /// was not sent. Retryable only for transient kinds (interrupted, would block, timed out).
    #[error("transport I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<crate::options::OptionsError> for TransportError {
    fn from(error: crate::options::OptionsError) -> Self {
        TransportError::Config(error.to_string())
    }
}

impl TransportError {
    /// [`TransportError::Unreachable`] for `addr`, caused by `cause`.
    pub fn unreachable(
        addr: &Address,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        TransportError::Unreachable {
            addr: addr.clone(),
            source: Arc::from(cause.into()),
        }
    }

    /// Whether the same call, made again later without changing anything, may succeed: the
    /// peer may come back, the queue drain or the connection come up. `false` for errors
    /// that only a change of frame, configuration or transport can fix. See each variant.
    pub fn is_retryable(&self) -> bool {
        match self {
            TransportError::Unreachable { .. }
            | TransportError::Timeout { .. }
            | TransportError::QueueFull { .. } => true,
            TransportError::Io(error) => matches!(
                error.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
            ),
            TransportError::FrameTooLarge { .. }
            | TransportError::AddressInUse(_)
            | TransportError::Closed
            | TransportError::InvalidFrame(_)
            | TransportError::Config(_) => false,
        }
    }
}

/// A transport. See the [module documentation](self).
pub trait Transport: Send + Sync + 'static {
    /// The address peers use to reach this transport.
    fn local_addr(&self) -> Address;

    /// The largest frame, length prefix included, this transport sends or accepts.
    fn max_frame_len(&self) -> usize;

    /// Queues `frame` for `to`. `Ok` means accepted for delivery, not delivered: a network may
    /// still lose it, and only a response proves arrival.
    fn send(
        &self,
        to: &Address,
        frame: Bytes,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Like [`send`](Self::send), but the transport may carry `frame` unreliably: it may be
    /// lost or reordered and is never retransmitted. Meant for small messages of protocols
    /// that tolerate loss (membership probes, as SWIM does over UDP). A transport without
    /// unreliable delivery, or a frame too large for it, goes through `send` (the default).
    fn send_unreliable(
        &self,
        to: &Address,
        frame: Bytes,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.send(to, frame)
    }

    /// The next received frame; [`TransportError::Closed`] once the transport is closed.
    fn recv(&self) -> impl Future<Output = Result<Incoming, TransportError>> + Send;

    /// Stops accepting frames, delivers what was accepted where possible, and releases the
    /// address.
    fn close(&self) -> impl Future<Output = ()> + Send;

    /// Connections this transport refused, by reason, since it was bound (all zero for a
    /// transport that does not count them, the default).
    fn refusals(&self) -> ConnectionRefusals {
        ConnectionRefusals::default()
    }
}

/// Connections a transport refused, by reason: what an operator's metrics show.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionRefusals {
    /// Closed for a bad hello or malformed input.
    pub rejected: u64,
    /// Refused at once: too many connections or handshakes.
    pub over_limit: u64,
    /// TLS handshakes that failed (a key outside the keyring included).
    pub handshake_failures: u64,
    /// Authenticated connections whose hello (or dialled) address belongs to another member.
    pub address_refusals: u64,
    /// Closed because the peer's key left the keyring.
    pub revoked: u64,
}

/// The checks a network transport makes on a frame handed to `send` before taking it: at most
/// `max_frame_len` bytes ([`TransportError::FrameTooLarge`]) and one whole frame whose length
/// prefix matches its length ([`TransportError::InvalidFrame`]): on a stream, a frame that
/// lied about its length would desynchronise everything after it.
pub fn check_frame(frame: &[u8], max_frame_len: usize) -> Result<(), TransportError> {
    if frame.len() > max_frame_len {
        return Err(TransportError::FrameTooLarge {
            len: frame.len(),
            max: max_frame_len,
        });
    }
    crate::wire::split(frame, max_frame_len).map_err(TransportError::InvalidFrame)?;
    Ok(())
}

/// What [`inbound_address`] puts between the announced address and the connection number.
const INBOUND_MARK: &str = " (inbound #";

/// The address that names connection number `connection`, which a peer opened announcing the
/// listen address `announced`: `"{announced} (inbound #{connection})"`. It is what
/// [`Incoming::from`] says for frames read from that connection, and a transport routes a
/// frame sent to it onto that connection only.
///
/// It contains a space, which no [hello](decode_hello_body) and no advertised address may
/// contain, so it never equals an address a node listens on: sending to a listen address can
/// never pick an accepted connection.
pub fn inbound_address(announced: &Address, connection: u64) -> Address {
    Address::new(format!("{announced}{INBOUND_MARK}{connection})"))
}

/// The listen address the peer announced when it opened the connection `addr` names, if `addr`
/// is an [`inbound_address`]; `None` for any other address. The announcement is the peer's
/// claim (authenticated by nothing but the transport's own handshake): good for logs and for
/// matching a reply to a request, not for routing.
pub fn inbound_peer(addr: &Address) -> Option<Address> {
    let (announced, rest) = addr.as_str().rsplit_once(INBOUND_MARK)?;
    let number = rest.strip_suffix(')')?;
    (!number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()))
        .then(|| Address::new(announced))
}

/// Refuses an `advertise` address peers could not reach: an unspecified IP (`0.0.0.0`,
/// `[::]`), port 0, or no port at all. The error is a [`TransportError::Config`] naming the
/// `advertise` option. Host names are accepted with a non-zero port (they are resolved when
/// dialled).
pub fn check_advertise(addr: &Address) -> Result<(), TransportError> {
    let refuse = |why: &str| {
        Err(TransportError::Config(format!(
            "option `advertise`: {addr} {why}; give the address peers dial to reach this node"
        )))
    };
    if let Ok(socket) = addr.as_str().parse::<std::net::SocketAddr>() {
        if socket.ip().is_unspecified() {
            return refuse("is an unspecified (wildcard) address");
        }
        if socket.port() == 0 {
            return refuse("has port 0");
        }
        return Ok(());
    }
    match addr
        .as_str()
        .rsplit_once(':')
        .map(|(_, port)| port.parse::<u16>())
    {
        Some(Ok(0)) => refuse("has port 0"),
        Some(Ok(_)) => Ok(()),
        _ => refuse("is not host:port"),
    }
}

/// The address a transport bound at `bound` announces: `advertise` if set (checked with
/// [`check_advertise`]), else the bound address, which must then be one peers can dial (a
/// wildcard bind such as `0.0.0.0:7000` needs `advertise`).
pub fn advertised(
    advertise: Option<&Address>,
    bound: std::net::SocketAddr,
) -> Result<Address, TransportError> {
    match advertise {
        Some(addr) => check_advertise(addr).map(|()| addr.clone()),
        None if bound.ip().is_unspecified() => Err(TransportError::Config(format!(
            "option `advertise` is required: the transport is bound to the wildcard address \
             {bound}, which peers cannot dial"
        ))),
        None => Ok(Address::new(bound.to_string())),
    }
}

/// Longest listen address a connection [hello](encode_hello) may carry, in bytes.
pub const MAX_HELLO_ADDR_LEN: usize = 255;

/// The hello a stream transport's dialer sends first, announcing the address it listens on:
/// a 4-byte big-endian length of what follows, the transport's 4-byte `magic`, then the
/// address in ASCII. Each transport has its own magic, so a hello meant for another transport
/// is refused.
///
/// An address longer than [`MAX_HELLO_ADDR_LEN`] or not printable ASCII is a
/// [`TransportError::Config`] naming the `advertise` option.
pub fn encode_hello(magic: [u8; 4], local: &Address) -> Result<Bytes, TransportError> {
    let addr = local.as_str().as_bytes();
    if addr.len() > MAX_HELLO_ADDR_LEN {
        return Err(TransportError::Config(format!(
            "option `advertise`: longer than {MAX_HELLO_ADDR_LEN} bytes"
        )));
    }
    if addr.is_empty() || !addr.iter().all(|b| b.is_ascii_graphic()) {
        return Err(TransportError::Config(format!(
            "option `advertise`: {local} is not a non-empty printable ASCII address"
        )));
    }
    let body = (magic.len() + addr.len()) as u32; // at most 4 + 255
    let mut hello = Vec::with_capacity(4 + body as usize);
    hello.extend_from_slice(&body.to_be_bytes());
    hello.extend_from_slice(&magic);
    hello.extend_from_slice(addr);
    Ok(Bytes::from(hello))
}

/// The length a hello's 4-byte prefix announces, if it is in range for a hello (the body is
/// then read and passed to [`decode_hello_body`]).
pub fn hello_body_len(prefix: [u8; 4]) -> Result<usize, HelloError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len <= 4 || len > 4 + MAX_HELLO_ADDR_LEN {
        // 4: the magic, which every hello carries before a non-empty address.
        return Err(HelloError::Length(len));
    }
    Ok(len)
}

/// The address announced by a hello body (what follows the length prefix), checked against the
/// transport's `magic`.
pub fn decode_hello_body(magic: [u8; 4], body: &[u8]) -> Result<Address, HelloError> {
    if body.len() <= magic.len() || body.len() > magic.len() + MAX_HELLO_ADDR_LEN {
        return Err(HelloError::Length(body.len()));
    }
    let (got, addr) = body.split_at(magic.len());
    if got != magic {
        return Err(HelloError::Magic);
    }
    if !addr.iter().all(|b| b.is_ascii_graphic()) {
        return Err(HelloError::Address);
    }
    let addr = std::str::from_utf8(addr).map_err(|_| HelloError::Address)?;
    Ok(Address::new(addr))
}

/// Why a connection hello was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HelloError {
    /// The announced length cannot be a hello.
    #[error("hello length {0} is out of range")]
    Length(usize),
    /// The magic is not this transport's.
    #[error("bad hello magic")]
    Magic,
    /// The address is not printable ASCII.
    #[error("hello address is not printable ASCII")]
    Address,
}

/// The object-safe form of [`Transport`]; implemented for every `Transport`.
#[allow(missing_docs)] // Each method mirrors the `Transport` method of the same name.
pub trait DynTransport: Send + Sync + 'static {
    fn local_addr_dyn(&self) -> Address;
    fn max_frame_len_dyn(&self) -> usize;
    fn send_dyn<'a>(
        &'a self,
        to: &'a Address,
        frame: Bytes,
    ) -> BoxFuture<'a, Result<(), TransportError>>;
    fn send_unreliable_dyn<'a>(
        &'a self,
        to: &'a Address,
        frame: Bytes,
    ) -> BoxFuture<'a, Result<(), TransportError>>;
    fn recv_dyn(&self) -> BoxFuture<'_, Result<Incoming, TransportError>>;
    fn close_dyn(&self) -> BoxFuture<'_, ()>;
    fn refusals_dyn(&self) -> ConnectionRefusals;
}

impl<T: Transport> DynTransport for T {
    fn local_addr_dyn(&self) -> Address {
        self.local_addr()
    }
    fn max_frame_len_dyn(&self) -> usize {
        self.max_frame_len()
    }
    fn send_dyn<'a>(
        &'a self,
        to: &'a Address,
        frame: Bytes,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(self.send(to, frame))
    }
    fn send_unreliable_dyn<'a>(
        &'a self,
        to: &'a Address,
        frame: Bytes,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(self.send_unreliable(to, frame))
    }
    fn recv_dyn(&self) -> BoxFuture<'_, Result<Incoming, TransportError>> {
        Box::pin(self.recv())
    }
    fn close_dyn(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.close())
    }
    fn refusals_dyn(&self) -> ConnectionRefusals {
        self.refusals()
    }
}

impl Transport for SharedTransport {
    fn local_addr(&self) -> Address {
        self.0.local_addr_dyn()
    }
    fn max_frame_len(&self) -> usize {
        self.0.max_frame_len_dyn()
    }
    // `async fn` lets the future capture both elided lifetimes.
    async fn send(&self, to: &Address, frame: Bytes) -> Result<(), TransportError> {
        self.0.send_dyn(to, frame).await
    }
    async fn send_unreliable(&self, to: &Address, frame: Bytes) -> Result<(), TransportError> {
        self.0.send_unreliable_dyn(to, frame).await
    }
    fn recv(&self) -> impl Future<Output = Result<Incoming, TransportError>> + Send {
        self.0.recv_dyn()
    }
    fn close(&self) -> impl Future<Output = ()> + Send {
        self.0.close_dyn()
    }
    fn refusals(&self) -> ConnectionRefusals {
        self.0.refusals_dyn()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: [u8; 4] = *b"TST1";

    #[test]
    fn options_errors_become_config_errors_that_name_the_key() {
        let map = std::collections::BTreeMap::from([("colour".to_owned(), "red".to_owned())]);
        let err = TransportError::from(
            crate::options::Options::new("the test transport", &map)
                .finish()
                .expect_err("unknown"),
        );
        assert!(
            matches!(&err, TransportError::Config(m) if m.contains("`colour`")),
            "{err}"
        );
        assert!(!err.is_retryable());
    }

    #[test]
    fn hello_round_trips_and_refuses_what_is_not_a_hello() {
        let hello = encode_hello(MAGIC, &Address::new("10.0.0.1:7000")).expect("encodes");
        let prefix: [u8; 4] = hello[..4].try_into().expect("prefix");
        assert_eq!(hello_body_len(prefix), Ok(hello.len() - 4));
        assert_eq!(
            decode_hello_body(MAGIC, &hello[4..]),
            Ok(Address::new("10.0.0.1:7000"))
        );

        // Another transport's magic.
        assert_eq!(
            decode_hello_body(*b"XXXX", &hello[4..]),
            Err(HelloError::Magic)
        );
        // Lengths that cannot be a hello: no address, or longer than the limit.
        assert_eq!(
            hello_body_len(4u32.to_be_bytes()),
            Err(HelloError::Length(4))
        );
        assert_eq!(
            hello_body_len(u32::MAX.to_be_bytes()),
            Err(HelloError::Length(u32::MAX as usize))
        );
        assert_eq!(decode_hello_body(MAGIC, &MAGIC), Err(HelloError::Length(4)));
        assert_eq!(decode_hello_body(MAGIC, b"TS"), Err(HelloError::Length(2)));
        // Control characters and non-ASCII in the address.
        assert_eq!(
            decode_hello_body(MAGIC, b"TST1a\nb"),
            Err(HelloError::Address)
        );
        assert_eq!(
            decode_hello_body(MAGIC, "TST1é".as_bytes()),
            Err(HelloError::Address)
        );
    }

    #[test]
    fn errors_keep_their_source_and_say_whether_a_retry_can_help() {
        use std::error::Error as _;

        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = TransportError::unreachable(&Address::new("peer:1"), refused);
        assert_eq!(err.to_string(), "peer peer:1 is unreachable: refused");
        assert_eq!(
            err.source().map(|e| e.to_string()).as_deref(),
            Some("refused")
        );
        // The cause keeps its type: the field downcasts (the chain yields the shared `Arc`).
        let TransportError::Unreachable { source, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(
            source.downcast_ref::<std::io::Error>().map(|e| e.kind()),
            Some(std::io::ErrorKind::ConnectionRefused)
        );
        assert!(err.is_retryable());
        let addr = Address::new("peer:1");
        assert!(TransportError::QueueFull { addr: addr.clone() }.is_retryable());
        let after = Duration::from_secs(1);
        assert!(TransportError::Timeout { addr, after }.is_retryable());
        assert!(TransportError::Io(std::io::ErrorKind::Interrupted.into()).is_retryable());
        let frame = vec![0u8; 8];
        let too_large = check_frame(&frame, 4).expect_err("too large");
        assert!(!too_large.is_retryable());
        for fatal in [
            TransportError::Closed,
            TransportError::Config("bad".to_owned()),
            TransportError::AddressInUse(Address::new("127.0.0.1:1")),
            TransportError::Io(std::io::ErrorKind::PermissionDenied.into()),
        ] {
            assert!(!fatal.is_retryable(), "{fatal}");
        }
        let invalid = check_frame(&frame, 1 << 20).expect_err("not a frame");
        assert!(
            matches!(invalid, TransportError::InvalidFrame(_)),
            "{invalid}"
        );
        assert!(invalid.source().is_some() && !invalid.is_retryable());
    }

    #[test]
    fn inbound_addresses_name_the_announcement_and_never_a_listen_address() {
        let announced = Address::new("10.0.0.1:7000");
        let named = inbound_address(&announced, 17);
        assert_eq!(named.as_str(), "10.0.0.1:7000 (inbound #17)");
        assert_eq!(inbound_peer(&named), Some(announced.clone()));
        assert_eq!(inbound_peer(&announced), None);
        assert_eq!(inbound_peer(&Address::new("x (inbound #)")), None);
        assert_eq!(inbound_peer(&Address::new("x (inbound #1a)")), None);
        // No hello can announce one, so no listen address is ever one.
        let err = encode_hello(MAGIC, &named).expect_err("a space");
        assert!(matches!(err, TransportError::Config(_)), "{err}");
    }

    #[test]
    fn an_address_peers_cannot_dial_is_refused_as_advertise() {
        for bad in [
            "0.0.0.0:7000",
            "[::]:7000",
            "127.0.0.1:0",
            "node-1:0",
            "node-1",
        ] {
            let err = check_advertise(&Address::new(bad)).expect_err(bad);
            assert!(
                matches!(&err, TransportError::Config(m) if m.contains("`advertise`")),
                "{bad}: {err}"
            );
        }
        for good in ["10.0.0.1:7000", "[::1]:7000", "node-1.example:7000"] {
            check_advertise(&Address::new(good)).expect(good);
        }
        let wildcard: std::net::SocketAddr = "0.0.0.0:7000".parse().expect("addr");
        let err = advertised(None, wildcard).expect_err("wildcard");
        assert!(
            matches!(&err, TransportError::Config(m) if m.contains("`advertise`")),
            "{err}"
        );
        let public = Address::new("10.0.0.1:7000");
        assert_eq!(advertised(Some(&public), wildcard).expect("set"), public);
        let bound: std::net::SocketAddr = "127.0.0.1:7000".parse().expect("addr");
        assert_eq!(
            advertised(None, bound).expect("bound").as_str(),
            "127.0.0.1:7000"
        );
    }

    #[test]
    fn hello_refuses_to_announce_an_address_peers_would_refuse() {
        let long = "a".repeat(MAX_HELLO_ADDR_LEN + 1);
        for bad in [long.as_str(), "", "a b"] {
            let err = encode_hello(MAGIC, &Address::new(bad)).expect_err(bad);
            assert!(
                matches!(&err, TransportError::Config(m) if m.contains("`advertise`")),
                "{err}"
            );
        }
        let longest = "a".repeat(MAX_HELLO_ADDR_LEN);
        assert!(encode_hello(MAGIC, &Address::new(longest)).is_ok());
    }
}
