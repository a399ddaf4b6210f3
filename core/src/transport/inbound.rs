//! The receiving side shared by connection-oriented transports (tcp, quic): the bounded queue
//! received frames wait in for [`Transport::recv`](super::Transport::recv), and the limits on
//! connections peers open.
//!
//! - [`RecvQueue`] holds at most a number of frames *and* a number of bytes. A reader that
//!   finds it full waits ([`RecvQueue::push`]), so it stops reading and the protocol's flow
//!   control pushes back on the sender; a datagram that finds it full is dropped
//!   ([`RecvQueue::try_push`]). A frame larger than the whole byte budget still passes once
//!   the queue is empty, so no frame the transport accepts can wedge it.
//! - [`Admission`] caps the connections peers have open at once and, among them, those still
//!   in their handshake (the TLS handshake and the hello): [`Admission::admit`] refuses a
//!   connection over either cap at once, before any work is spent on it.

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc};

use super::{Incoming, TransportError};

/// The most bytes a [`RecvQueue`] may be configured to hold (its budget is counted in `u32`
/// permits).
pub const MAX_RECV_BYTES: usize = u32::MAX as usize;

/// The checks tcp and quic make on their inbound settings: a positive `handshake_timeout_ms`,
/// `recv_bytes` within [`MAX_RECV_BYTES`], and a dialable `advertise` address
/// ([`check_advertise`](super::check_advertise)). Each refusal is a
/// [`TransportError::Config`] naming the option.
pub fn check_inbound_limits(
    handshake_timeout: std::time::Duration,
    recv_bytes: NonZeroUsize,
    advertise: Option<&crate::identity::Address>,
) -> Result<(), TransportError> {
    if handshake_timeout.is_zero() {
        return Err(TransportError::Config(
            "option `handshake_timeout_ms` must be positive".to_owned(),
        ));
    }
    if recv_bytes.get() > MAX_RECV_BYTES {
        return Err(TransportError::Config(format!(
            "option `recv_bytes`: {recv_bytes} exceeds the maximum of {MAX_RECV_BYTES}"
        )));
    }
    if let Some(advertise) = advertise {
        super::check_advertise(advertise)?;
    }
    Ok(())
}

/// A frame in the queue, holding its share of the byte budget until `recv` takes it.
struct Queued {
    incoming: Incoming,
    _bytes: OwnedSemaphorePermit,
}

/// The queue between a transport's readers and `recv`, bounded in frames and in bytes. See
/// the [module documentation](self).
pub struct RecvQueue {
    tx: mpsc::Sender<Queued>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Queued>>,
    bytes: Arc<Semaphore>,
    max_bytes: u32,
}

impl fmt::Debug for RecvQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvQueue")
            .field("queued_bytes", &self.queued_bytes())
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

impl RecvQueue {
    /// A queue of at most `frames` frames and `bytes` bytes. `bytes` above
    /// [`MAX_RECV_BYTES`] is a [`TransportError::Config`] naming `option`.
    pub fn new(
        frames: NonZeroUsize,
        bytes: NonZeroUsize,
        option: &str,
    ) -> Result<Self, TransportError> {
        let max_bytes = u32::try_from(bytes.get()).map_err(|_| {
            TransportError::Config(format!(
                "option `{option}`: {bytes} exceeds the maximum of {MAX_RECV_BYTES} bytes"
            ))
        })?;
        let (tx, rx) = mpsc::channel(frames.get());
        Ok(RecvQueue {
            tx,
            rx: tokio::sync::Mutex::new(rx),
            bytes: Arc::new(Semaphore::new(max_bytes as usize)),
            max_bytes,
        })
    }

    /// The share of the byte budget `len` bytes take: all of it at most, so that a frame
    /// larger than the budget waits for an empty queue instead of forever.
    fn cost(&self, len: usize) -> u32 {
        u32::try_from(len).unwrap_or(u32::MAX).min(self.max_bytes)
    }

    /// Bytes of frames waiting for `recv` now.
    pub fn queued_bytes(&self) -> usize {
        (self.max_bytes as usize).saturating_sub(self.bytes.available_permits())
    }

    /// Queues `incoming`, waiting while the queue is full (in frames or in bytes). Cancel-safe:
    /// dropped while waiting, nothing is queued.
    pub async fn push(&self, incoming: Incoming) {
        let cost = self.cost(incoming.frame.len());
        // The semaphore is never closed, and the receiver lives as long as `self`.
        let Ok(bytes) = Arc::clone(&self.bytes).acquire_many_owned(cost).await else {
            return;
        };
        if let Ok(slot) = self.tx.reserve().await {
            slot.send(Queued {
                incoming,
                _bytes: bytes,
            });
        }
    }

    /// Queues `incoming` if there is room for it now; otherwise hands it back.
    pub fn try_push(&self, incoming: Incoming) -> Result<(), Incoming> {
        let cost = self.cost(incoming.frame.len());
        let bytes = match Arc::clone(&self.bytes).try_acquire_many_owned(cost) {
            Ok(bytes) => bytes,
            Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => return Err(incoming),
        };
        match self.tx.try_reserve() {
            Ok(slot) => {
                slot.send(Queued {
                    incoming,
                    _bytes: bytes,
                });
                Ok(())
            }
            Err(_) => Err(incoming),
        }
    }

    /// The next frame, waiting for one; its bytes leave the budget as it is taken. `None`
    /// never happens while the queue exists (it holds its own sender).
    pub(super) async fn pop(&self) -> Option<Incoming> {
        let mut rx = self.rx.lock().await;
        rx.recv().await.map(|queued| queued.incoming)
    }
}

/// Limits on the connections peers open. See the [module documentation](self).
#[derive(Debug)]
pub struct Admission {
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    max_connections: usize,
    max_handshakes: usize,
}

/// Why [`Admission::admit`] refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// As many connections as allowed are open.
    #[error("{0} inbound connections are open, the maximum")]
    Connections(usize),
    /// As many connections as allowed are in their handshake.
    #[error("{0} inbound handshakes are in progress, the maximum")]
    Handshakes(usize),
}

/// An admitted connection: holds its place among the open connections until dropped, and its
/// place among the handshakes until [`Admitted::handshake_done`].
#[derive(Debug)]
pub struct Admitted {
    _connection: OwnedSemaphorePermit,
    handshake: Option<OwnedSemaphorePermit>,
}

impl Admitted {
    /// The handshake is over (it succeeded): the connection no longer counts as one.
    pub fn handshake_done(&mut self) {
        self.handshake = None;
    }
}

impl Admission {
    /// At most `connections` open at once, `handshakes` of them in their handshake.
    pub fn new(connections: NonZeroUsize, handshakes: NonZeroUsize) -> Self {
        Admission {
            connections: Arc::new(Semaphore::new(connections.get())),
            handshakes: Arc::new(Semaphore::new(handshakes.get())),
            max_connections: connections.get(),
            max_handshakes: handshakes.get(),
        }
    }

    /// A place for a new connection, or why there is none.
    pub fn admit(&self) -> Result<Admitted, Refused> {
        let handshake = Arc::clone(&self.handshakes)
            .try_acquire_owned()
            .map_err(|_| Refused::Handshakes(self.max_handshakes))?;
        let connection = Arc::clone(&self.connections)
            .try_acquire_owned()
            .map_err(|_| Refused::Connections(self.max_connections))?;
        Ok(Admitted {
            _connection: connection,
            handshake: Some(handshake),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Address;
    use bytes::Bytes;

    fn nz(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).expect("non-zero")
    }

    fn frame(len: usize) -> Incoming {
        Incoming {
            from: Address::new("peer:1"),
            frame: Bytes::from(vec![0u8; len]),
        }
    }

    #[test]
    fn inbound_limits_name_the_option_they_refuse() {
        use std::time::Duration;
        let ok = NonZeroUsize::new(1024).unwrap();
        assert!(check_inbound_limits(Duration::from_secs(1), ok, None).is_ok());
        let cases = [
            (Duration::ZERO, ok, None, "handshake_timeout_ms"),
            (
                Duration::from_secs(1),
                NonZeroUsize::new(MAX_RECV_BYTES + 1).unwrap(),
                None,
                "recv_bytes",
            ),
            (
                Duration::from_secs(1),
                ok,
                Some(crate::identity::Address::new("0.0.0.0:7000")),
                "advertise",
            ),
        ];
        for (timeout, bytes, advertise, option) in cases {
            let err = check_inbound_limits(timeout, bytes, advertise.as_ref()).expect_err(option);
            assert!(
                matches!(&err, TransportError::Config(m) if m.contains(option)),
                "{option}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_as_well_as_frames() {
        let queue = RecvQueue::new(nz(100), nz(1000), "recv_bytes").expect("queue");
        for _ in 0..2 {
            assert!(queue.try_push(frame(400)).is_ok());
        }
        assert_eq!(queue.queued_bytes(), 800);
        // 100 frames would fit, 1200 bytes do not.
        assert!(queue.try_push(frame(400)).is_err(), "over the byte budget");
        assert!(queue.try_push(frame(200)).is_ok(), "exactly the budget");
        // A reader waits for room instead of buffering more.
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(10), queue.push(frame(1)));
        assert!(waiting.await.is_err(), "push waits while the queue is full");
        assert_eq!(queue.pop().await.map(|i| i.frame.len()), Some(400));
        assert_eq!(queue.queued_bytes(), 600);
        queue.push(frame(400)).await;
        assert_eq!(queue.queued_bytes(), 1000);
    }

    #[tokio::test]
    async fn a_frame_larger_than_the_budget_passes_an_empty_queue() {
        let queue = RecvQueue::new(nz(4), nz(100), "recv_bytes").expect("queue");
        queue.push(frame(500)).await;
        assert_eq!(queue.queued_bytes(), 100, "it takes the whole budget");
        assert!(queue.try_push(frame(1)).is_err());
        assert_eq!(queue.pop().await.map(|i| i.frame.len()), Some(500));
        assert_eq!(queue.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_frames() {
        let queue = RecvQueue::new(nz(2), nz(1 << 20), "recv_bytes").expect("queue");
        assert!(queue.try_push(frame(1)).is_ok());
        assert!(queue.try_push(frame(1)).is_ok());
        assert!(queue.try_push(frame(1)).is_err());
        // A refused datagram leaves no bytes behind.
        assert_eq!(queue.queued_bytes(), 2);
    }

    #[test]
    fn a_budget_beyond_the_counter_names_the_option() {
        let err = RecvQueue::new(nz(1), nz(MAX_RECV_BYTES + 1), "recv_bytes").expect_err("too big");
        assert!(
            matches!(&err, TransportError::Config(m) if m.contains("`recv_bytes`")),
            "{err}"
        );
    }

    #[test]
    fn admission_caps_connections_and_handshakes() {
        let admission = Admission::new(nz(2), nz(1));
        let mut first = admission.admit().expect("room");
        assert_eq!(admission.admit().err(), Some(Refused::Handshakes(1)));
        first.handshake_done();
        let mut second = admission.admit().expect("the handshake slot is free again");
        second.handshake_done();
        assert_eq!(admission.admit().err(), Some(Refused::Connections(2)));
        drop(first);
        assert!(
            admission.admit().is_ok(),
            "a closed connection frees its place"
        );
    }
}
