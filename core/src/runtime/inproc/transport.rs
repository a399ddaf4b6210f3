//! One endpoint of the network: the [`Transport`] a node under test holds.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use tokio::sync::{mpsc, watch};

use super::faults::Fate;
use super::{InProcessNetwork, Shared, State};
use crate::identity::Address;
use crate::transport::{Incoming, Transport, TransportError};

/// One endpoint of an [`InProcessNetwork`], bound by [`InProcessNetwork::bind`].
///
/// Closing it (or dropping it) releases its address at once. Frames already waiting in its
/// queue are discarded by [`close`](Transport::close), frames it sent earlier are unaffected.
pub struct InProcessTransport {
    pub(super) shared: Arc<Shared>,
    pub(super) addr: Address,
    /// Which binding of `addr` this is, so a stale transport never unbinds its successor.
    pub(super) id: u64,
    pub(super) max_frame_len: usize,
    pub(super) rx: tokio::sync::Mutex<mpsc::Receiver<Incoming>>,
    /// `true` once closed; receivers waiting in `recv` watch it.
    pub(super) closed: watch::Sender<bool>,
}

impl fmt::Debug for InProcessTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InProcessTransport")
            .field("addr", &self.addr)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl InProcessTransport {
    /// The network this transport belongs to.
    pub fn network(&self) -> InProcessNetwork {
        InProcessNetwork {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Whether [`close`](Transport::close) has been called.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// The whole of `send`; it never waits.
    fn send_now(&self, to: &Address, frame: Bytes) -> Result<(), TransportError> {
        if self.is_closed() {
            return Err(TransportError::Closed);
        }
        if frame.len() > self.max_frame_len {
            return Err(TransportError::FrameTooLarge {
                len: frame.len(),
                max: self.max_frame_len,
            });
        }
        let mut state = self.shared.lock();
        let Some(endpoint) = state.endpoints.get(to) else {
            let refused = std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "no in-process transport is bound there",
            );
            return Err(TransportError::unreachable(to, refused));
        };
        let (tx, to_id) = (endpoint.tx.clone(), endpoint.id);
        // Always exactly two draws per frame entering the network; see the module docs.
        let loss_draw: f64 = state.rng.random();
        let delay_draw: u64 = state.rng.random();
        let link = (self.addr.clone(), to.clone());
        let fate = state.faults.decide(&link, loss_draw, delay_draw);
        let incoming = Incoming {
            from: self.addr.clone(),
            frame,
        };
        match fate {
            Fate::Partitioned => {
                state.stats.sent += 1;
                state.stats.dropped_partition += 1;
                tracing::trace!(from = %self.addr, %to, "in-process frame dropped by partition");
                Ok(())
            }
            Fate::Lost => {
                state.stats.sent += 1;
                state.stats.dropped_loss += 1;
                tracing::trace!(from = %self.addr, %to, "in-process frame lost");
                Ok(())
            }
            Fate::Deliver(Duration::ZERO) => {
                state.stats.sent += 1;
                deliver(&mut state, &tx, incoming).map_err(|fail| match fail {
                    DeliveryFailure::Full => TransportError::QueueFull { addr: to.clone() },
                    DeliveryFailure::Gone => TransportError::unreachable(
                        to,
                        std::io::Error::new(
                            std::io::ErrorKind::ConnectionRefused,
                            "the in-process transport there has closed",
                        ),
                    ),
                })
            }
            Fate::Deliver(delay) => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return Err(TransportError::Io(std::io::Error::other(
                        "delayed in-process delivery needs a Tokio runtime",
                    )));
                };
                state.stats.sent += 1;
                drop(state);
                let shared = Arc::clone(&self.shared);
                let to = to.clone();
                runtime.spawn(async move {
                    tokio::time::sleep(delay).await;
                    let mut state = shared.lock();
                    // Deliver only to the binding the frame was sent to: a node that crashed
                    // (and maybe restarted) in the meantime loses frames in flight to it.
                    if state.endpoints.get(&to).is_some_and(|e| e.id == to_id) {
                        // A failure here is already counted; nobody is left to tell.
                        let _ = deliver(&mut state, &tx, incoming);
                    } else {
                        state.stats.dropped_unbound += 1;
                        tracing::trace!(%to, "delayed in-process frame found its receiver gone");
                    }
                });
                Ok(())
            }
        }
    }
}

enum DeliveryFailure {
    Full,
    Gone,
}

/// Puts `incoming` into a receiver's queue and counts the outcome. Called with the lock held,
/// so a frame taken out of a queue is always already counted.
fn deliver(
    state: &mut State,
    tx: &mpsc::Sender<Incoming>,
    incoming: Incoming,
) -> Result<(), DeliveryFailure> {
    match tx.try_send(incoming) {
        Ok(()) => {
            state.stats.delivered += 1;
            Ok(())
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            state.stats.dropped_queue_full += 1;
            Err(DeliveryFailure::Full)
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            state.stats.dropped_unbound += 1;
            Err(DeliveryFailure::Gone)
        }
    }
}

/// Resolves once `closed` holds `true` (or its sender, the transport itself, is gone).
async fn wait_closed(closed: &mut watch::Receiver<bool>) {
    // An error means the sender was dropped, which counts as closed as well.
    let _ = closed.wait_for(|closed| *closed).await;
}

impl Transport for InProcessTransport {
    fn local_addr(&self) -> Address {
        self.addr.clone()
    }

    fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    async fn send(&self, to: &Address, frame: Bytes) -> Result<(), TransportError> {
        self.send_now(to, frame)
    }

    async fn recv(&self) -> Result<Incoming, TransportError> {
        let mut closed = self.closed.subscribe();
        if *closed.borrow_and_update() {
            return Err(TransportError::Closed);
        }
        tokio::select! {
            biased;
            () = wait_closed(&mut closed) => Err(TransportError::Closed),
            // Both the lock and `mpsc::Receiver::recv` are cancel-safe: losing the race to
            // `close` loses no frame.
            incoming = async { self.rx.lock().await.recv().await } => {
                incoming.ok_or(TransportError::Closed)
            }
        }
    }

    async fn close(&self) {
        self.closed.send_replace(true);
        self.shared.unbind(&self.addr, self.id);
        // Free the queued frames now if no `recv` holds the queue; one that does is being woken
        // by the flag above, and the frames go when the transport is dropped. Never waiting
        // here means a forgotten, unpolled `recv` future cannot hang `close`.
        if let Ok(mut rx) = self.rx.try_lock() {
            rx.close();
            while rx.try_recv().is_ok() {}
        }
    }
}

impl Drop for InProcessTransport {
    fn drop(&mut self) {
        self.shared.unbind(&self.addr, self.id);
    }
}
