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

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::storage::BoxFuture;

/// A transport chosen at run time.
pub type SharedTransport = Arc<dyn DynTransport>;

/// Where a node can be reached: `host:port` for network transports, a name in process.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Address(Arc<str>);

impl<'de> Deserialize<'de> for Address {
    // Through the borrowed string path: addresses travel in peers' messages, and the owned
    // path would allocate whatever length a frame claims.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        crate::wire::serde_str::deserialize(deserializer).map(Address::from)
    }
}

impl Address {
    /// An address from its textual form.
    pub fn new(addr: impl AsRef<str>) -> Self {
        Address(Arc::from(addr.as_ref()))
    }

    /// The textual form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({})", self.0)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Address {
    fn from(s: &str) -> Self {
        Address::new(s)
    }
}

impl From<String> for Address {
    fn from(s: String) -> Self {
        Address(Arc::from(s))
    }
}

/// A frame received from a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    /// An address that reaches the sender: a frame sent to it arrives at the transport this
    /// frame came from. Stream transports may use the connection's peer address and send
    /// replies back over that connection.
    pub from: Address,
    /// The whole frame, length prefix included.
    pub frame: Bytes,
}

/// What went wrong moving a frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Nothing is listening at the address, or the connection could not be made.
    #[error("peer {addr} is unreachable: {reason}")]
    Unreachable {
        /// The peer.
        addr: Address,
        /// Why.
        reason: String,
    },
    /// The peer did not accept the frame within the configured time.
    #[error("sending to {addr} timed out after {after:?}")]
    Timeout {
        /// The peer.
        addr: Address,
        /// The configured timeout.
        after: Duration,
    },
    /// The frame is larger than the transport's maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The queue towards the peer is full; the caller should slow down or drop.
    #[error("send queue to {addr} is full")]
    QueueFull {
        /// The peer.
        addr: Address,
    },
    /// The local address is already bound.
    #[error("address {0} is already in use")]
    AddressInUse(Address),
    /// The transport was closed.
    #[error("transport is closed")]
    Closed,
    /// The bytes handed to `send` are not one whole frame (the length prefix disagrees with
    /// the length, or the header is not a Chorus header); stream transports refuse them rather
    /// than desynchronise the stream.
    #[error("not a whole frame: {0}")]
    InvalidFrame(crate::wire::WireError),
    /// The transport's configuration (its options or key material) is invalid; the message
    /// names the field.
    #[error("invalid transport configuration: {0}")]
    Config(String),
    /// An I/O error.
    #[error("transport I/O error: {0}")]
    Io(#[from] std::io::Error),
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

    /// The next received frame; [`TransportError::Closed`] once the transport is closed.
    fn recv(&self) -> impl Future<Output = Result<Incoming, TransportError>> + Send;

    /// Stops accepting frames, delivers what was accepted where possible, and releases the
    /// address.
    fn close(&self) -> impl Future<Output = ()> + Send;
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
    fn recv_dyn(&self) -> BoxFuture<'_, Result<Incoming, TransportError>>;
    fn close_dyn(&self) -> BoxFuture<'_, ()>;
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
    fn recv_dyn(&self) -> BoxFuture<'_, Result<Incoming, TransportError>> {
        Box::pin(self.recv())
    }
    fn close_dyn(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.close())
    }
}

impl Transport for SharedTransport {
    fn local_addr(&self) -> Address {
        (**self).local_addr_dyn()
    }
    fn max_frame_len(&self) -> usize {
        (**self).max_frame_len_dyn()
    }
    // `async fn` lets the future capture both elided lifetimes.
    async fn send(&self, to: &Address, frame: Bytes) -> Result<(), TransportError> {
        (**self).send_dyn(to, frame).await
    }
    fn recv(&self) -> impl Future<Output = Result<Incoming, TransportError>> + Send {
        (**self).recv_dyn()
    }
    fn close(&self) -> impl Future<Output = ()> + Send {
        (**self).close_dyn()
    }
}
