//! Request/response correlation over any [`Transport`].
//!
//! Transports only move frames; this module gives them meaning. An [`RpcEndpoint`] owns a
//! transport and one receive task that decodes every incoming frame:
//!
//! - a [`FrameKind::Response`] completes the pending [`RpcEndpoint::request`] with the same
//!   correlation id (or is counted as unmatched when that request already timed out);
//! - requests and one-way messages go to the [`Inbound`] channel returned by
//!   [`RpcEndpoint::start`], whose consumer answers with [`RpcEndpoint::respond`];
//! - a frame that does not decode is dropped, counted in [`RpcStats::rejected_frames`] and
//!   logged; it never takes the endpoint down.
//!
//! Replies go to [`Incoming::from`](crate::transport::Incoming), which every transport
//! guarantees reaches the sender. A request that gets no response within its timeout fails
//! with [`RpcError::Timeout`]; the timeout counts from the call, so time spent in the
//! transport's `send` (dialling, waiting for queue room) is part of it. One whose endpoint
//! closes fails with [`RpcError::Closed`].

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::envelope::Envelope;
use crate::identity::Address;
use crate::transport::{Transport, TransportError};
use crate::wire::{self, FrameKind, Header, WireError};

/// Settings of an [`RpcEndpoint`].
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct RpcConfig {
    /// Requests and messages buffered for the consumer; more are shed (and counted).
    pub inbound_capacity: NonZeroUsize,
    /// The first correlation id. `None` derives one from the wall clock and the local address,
    /// so that a restarted endpoint does not reuse the ids of its previous life (a late
    /// response to the old request would otherwise complete a new one).
    pub first_correlation: Option<u64>,
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            inbound_capacity: NonZeroUsize::new(1024).expect("non-zero"),
            first_correlation: None,
        }
    }
}

impl RpcConfig {
    /// This configuration with another inbound queue capacity.
    pub fn with_inbound_capacity(mut self, capacity: NonZeroUsize) -> Self {
        self.inbound_capacity = capacity;
        self
    }

    /// This configuration with a fixed first correlation id (for reproducible tests).
    pub fn with_first_correlation(mut self, first: u64) -> Self {
        self.first_correlation = Some(first);
        self
    }
}

/// How long the receive task pauses after a transport error other than `Closed`, so a
/// transport that keeps failing cannot make it spin.
const RECV_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Why a request or send failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// No response arrived within the request's timeout, which counts from the call (sending
    /// included). The request may or may not have been sent, and if sent, processed.
    #[error("no response from {to} within {after:?}")]
    Timeout {
        /// The peer.
        to: Address,
        /// The timeout.
        after: Duration,
    },
    /// The transport refused the frame.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The message could not be encoded.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The endpoint was closed before a response arrived.
    #[error("endpoint closed")]
    Closed,
}

/// Counters of an [`RpcEndpoint`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RpcStats {
    /// Frames that failed to decode and were dropped.
    pub rejected_frames: u64,
    /// Responses whose request was no longer pending (timed out, or never sent), or that came
    /// from a different peer than the request went to.
    pub unmatched_responses: u64,
    /// Requests and messages handed to the consumer.
    pub inbound: u64,
    /// Requests and messages dropped because the consumer's queue was full or gone.
    pub shed_inbound: u64,
}

/// What an [`RpcEndpoint`] carries: any serde message type (the node uses [`Envelope`]).
pub trait RpcMessage: Serialize + DeserializeOwned + Send + 'static {}

impl<M: Serialize + DeserializeOwned + Send + 'static> RpcMessage for M {}

/// A request or one-way message received from a peer.
#[derive(Debug)]
pub struct Inbound<M = Envelope> {
    /// Where replies go.
    pub from: Address,
    /// Kind and correlation id.
    pub header: Header,
    /// The decoded message.
    pub message: M,
}

impl<M> Inbound<M> {
    /// Whether the sender waits for a response.
    pub fn expects_response(&self) -> bool {
        self.header.kind == FrameKind::Request
    }
}

/// A request waiting for its response: who it went to, and where to deliver the answer.
struct Pending<M> {
    to: Address,
    reply: oneshot::Sender<M>,
}

struct Shared<T, M> {
    transport: T,
    pending: Mutex<HashMap<u64, Pending<M>>>,
    next_correlation: AtomicU64,
    rejected_frames: AtomicU64,
    unmatched_responses: AtomicU64,
    inbound: AtomicU64,
    shed_inbound: AtomicU64,
    /// Builds the answer to a request that did not decode, if the endpoint gives one.
    answer_undecodable: Option<fn(&WireError) -> M>,
}

impl<T, M> Shared<T, M> {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending<M>>> {
        // The map stays consistent even if a holder panicked: every operation is one insert
        // or remove.
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Correlates requests and responses of message type `M` over a transport. Cheap to clone.
pub struct RpcEndpoint<T: Transport, M: RpcMessage = Envelope> {
    shared: Arc<Shared<T, M>>,
}

impl<T: Transport, M: RpcMessage> Clone for RpcEndpoint<T, M> {
    fn clone(&self) -> Self {
        RpcEndpoint {
            shared: self.shared.clone(),
        }
    }
}

impl<T: Transport, M: RpcMessage> std::fmt::Debug for RpcEndpoint<T, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcEndpoint")
            .field("local_addr", &self.shared.transport.local_addr())
            .field("stats", &self.stats())
            .finish()
    }
}

impl<T: Transport, M: RpcMessage> RpcEndpoint<T, M> {
    /// Starts the receive task on the current tokio runtime and returns the endpoint and the
    /// channel of inbound requests and messages. The task ends when the transport closes.
    ///
    /// The task holds the transport: call [`RpcEndpoint::close`] to stop it and release the
    /// address; dropping the handles alone does not.
    pub fn start(transport: T, config: RpcConfig) -> (Self, mpsc::Receiver<Inbound<M>>) {
        Self::start_inner(transport, config, None)
    }

    /// Like [`RpcEndpoint::start`], but a request whose header decodes and whose payload does
    /// not (a newer message kind, damaged bytes) is answered with `answer(error)` instead of
    /// being dropped silently, so its sender learns why at once rather than timing out. It is
    /// still counted in [`RpcStats::rejected_frames`].
    pub fn start_answering_undecodable(
        transport: T,
        config: RpcConfig,
        answer: fn(&WireError) -> M,
    ) -> (Self, mpsc::Receiver<Inbound<M>>) {
        Self::start_inner(transport, config, Some(answer))
    }

    fn start_inner(
        transport: T,
        config: RpcConfig,
        answer_undecodable: Option<fn(&WireError) -> M>,
    ) -> (Self, mpsc::Receiver<Inbound<M>>) {
        let first = config.first_correlation.unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            xxhash_rust::xxh3::xxh3_64_with_seed(transport.local_addr().as_str().as_bytes(), nanos)
        });
        let shared = Arc::new(Shared {
            transport,
            pending: Mutex::new(HashMap::new()),
            next_correlation: AtomicU64::new(first),
            rejected_frames: AtomicU64::new(0),
            unmatched_responses: AtomicU64::new(0),
            inbound: AtomicU64::new(0),
            shed_inbound: AtomicU64::new(0),
            answer_undecodable,
        });
        let (tx, rx) = mpsc::channel(config.inbound_capacity.get());
        tokio::spawn(receive_loop(shared.clone(), tx));
        (RpcEndpoint { shared }, rx)
    }

    /// The transport's local address.
    pub fn local_addr(&self) -> Address {
        self.shared.transport.local_addr()
    }

    /// The underlying transport.
    pub fn transport(&self) -> &T {
        &self.shared.transport
    }

    /// Sends `message` as a request to `to` and waits for the response. `timeout` bounds the
    /// whole request, the transport's `send` included (which may wait for a connection or for
    /// room in a full queue): past it the request fails with [`RpcError::Timeout`], whether
    /// the frame was still being sent or already sent and unanswered.
    pub async fn request(
        &self,
        to: &Address,
        message: &M,
        timeout: Duration,
    ) -> Result<M, RpcError> {
        match tokio::time::timeout(timeout, self.request_unbounded(to, message)).await {
            Ok(result) => result,
            Err(_) => Err(RpcError::Timeout {
                to: to.clone(),
                after: timeout,
            }),
        }
    }

    /// [`request`](Self::request) without a timeout of its own, for a caller that already
    /// races it against a deadline (and so saves a timer per request): it waits until the
    /// response arrives or the transport fails. Dropping the future forgets the request (a
    /// late response is then counted as unmatched).
    pub async fn request_unbounded(&self, to: &Address, message: &M) -> Result<M, RpcError> {
        let correlation = self.shared.next_correlation.fetch_add(1, Ordering::Relaxed); // wraps
        let frame = wire::encode(
            Header::request(correlation),
            message,
            self.shared.transport.max_frame_len(),
        )?;
        let (tx, rx) = oneshot::channel();
        self.shared.pending().insert(
            correlation,
            Pending {
                to: to.clone(),
                reply: tx,
            },
        );
        // Removes the pending entry on every exit path, including cancellation of this future.
        let _guard = PendingGuard {
            shared: &self.shared,
            correlation,
        };
        // The caller's deadline covers the whole request: a send that waits for a connection
        // or for room in a full queue spends the caller's time too.
        self.shared.transport.send(to, frame).await?;
        rx.await.map_err(|_| RpcError::Closed)
    }

    /// Sends `message` to `to` without expecting a response.
    pub async fn send(&self, to: &Address, message: &M) -> Result<(), RpcError> {
        let frame = wire::encode(
            Header::message(),
            message,
            self.shared.transport.max_frame_len(),
        )?;
        self.shared.transport.send(to, frame).await?;
        Ok(())
    }

    /// Answers `request` with `response`. One-way messages expect no answer: this is a no-op
    /// for them.
    pub async fn respond(&self, request: &Inbound<M>, response: &M) -> Result<(), RpcError> {
        if !request.expects_response() {
            return Ok(());
        }
        let header = Header::response(request.header.correlation);
        let frame = wire::encode(header, response, self.shared.transport.max_frame_len())?;
        self.shared.transport.send(&request.from, frame).await?;
        Ok(())
    }

    /// Answers the request `header` came with, from `from`, with `response` (for a consumer
    /// that took the [`Inbound`] apart). One-way messages expect no answer: a no-op for them.
    pub async fn respond_to(
        &self,
        from: &Address,
        header: Header,
        response: &M,
    ) -> Result<(), RpcError> {
        if header.kind != FrameKind::Request {
            return Ok(());
        }
        let frame = wire::encode(
            Header::response(header.correlation),
            response,
            self.shared.transport.max_frame_len(),
        )?;
        self.shared.transport.send(from, frame).await?;
        Ok(())
    }

    /// Current counters.
    pub fn stats(&self) -> RpcStats {
        RpcStats {
            rejected_frames: self.shared.rejected_frames.load(Ordering::Relaxed),
            unmatched_responses: self.shared.unmatched_responses.load(Ordering::Relaxed),
            inbound: self.shared.inbound.load(Ordering::Relaxed),
            shed_inbound: self.shared.shed_inbound.load(Ordering::Relaxed),
        }
    }

    /// Closes the transport; pending requests fail with [`RpcError::Closed`].
    pub async fn close(&self) {
        self.shared.transport.close().await;
        self.shared.pending().clear();
    }
}

struct PendingGuard<'a, T, M> {
    shared: &'a Shared<T, M>,
    correlation: u64,
}

impl<T, M> Drop for PendingGuard<'_, T, M> {
    fn drop(&mut self) {
        self.shared.pending().remove(&self.correlation);
    }
}

async fn receive_loop<T: Transport, M: RpcMessage>(
    shared: Arc<Shared<T, M>>,
    inbound: mpsc::Sender<Inbound<M>>,
) {
    let max = shared.transport.max_frame_len();
    loop {
        let incoming = match shared.transport.recv().await {
            Ok(incoming) => incoming,
            Err(TransportError::Closed) => break,
            Err(error) => {
                tracing::debug!(%error, "transport receive error");
                tokio::time::sleep(RECV_ERROR_BACKOFF).await;
                continue;
            }
        };
        let (header, message) = match wire::decode::<M>(&incoming.frame, max) {
            Ok(decoded) => decoded,
            Err(error) => {
                shared.rejected_frames.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(from = %incoming.from, %error, "rejected frame");
                if let Some(answer) = shared.answer_undecodable
                    && let Ok((header, _)) = wire::split(&incoming.frame, max)
                    && header.kind == FrameKind::Request
                    && let Ok(frame) =
                        wire::encode(Header::response(header.correlation), &answer(&error), max)
                {
                    // Not awaited here: this loop also completes responses and must not
                    // wait on a peer's queue.
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let _ = shared.transport.send(&incoming.from, frame).await;
                    });
                }
                continue;
            }
        };
        match header.kind {
            FrameKind::Response => {
                // Only the peer the request went to may answer it: an id alone could be
                // guessed, or belong to an earlier life of this endpoint.
                let waiter = {
                    let mut pending = shared.pending();
                    match pending.get(&header.correlation) {
                        Some(p) if p.to == incoming.from => pending.remove(&header.correlation),
                        _ => None,
                    }
                };
                match waiter {
                    // The requester may have given up between the lookup and now; fine.
                    Some(waiter) => drop(waiter.reply.send(message)),
                    None => {
                        shared.unmatched_responses.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(from = %incoming.from, correlation = header.correlation, "unmatched response");
                    }
                }
            }
            FrameKind::Request | FrameKind::Message => {
                let request = Inbound {
                    from: incoming.from,
                    header,
                    message,
                };
                // Never wait here: responses share this loop, and a consumer that is itself
                // waiting for a response would deadlock. A full queue sheds the request; its
                // sender times out, as it would with an overloaded peer.
                match inbound.try_send(request) {
                    Ok(()) => {
                        shared.inbound.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Full(request)) => {
                        shared.shed_inbound.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(from = %request.from, "inbound queue full; request shed");
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        shared.shed_inbound.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    shared.pending().clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::{Timestamp, Version};
    use crate::identity::NodeId;
    use crate::replication::ReplicaMessage as Message;
    use crate::replication::{Refusal, WriteOutcome};
    use crate::runtime::inproc::{InProcessNetwork, InProcessTransport};
    use bytes::Bytes;

    const SECOND: Duration = Duration::from_secs(1);

    /// Answers every `Get` with an empty `GetReply` and every `Put` with a `PutReply`.
    fn serve(
        endpoint: RpcEndpoint<InProcessTransport, Message>,
        mut inbound: mpsc::Receiver<Inbound<Message>>,
    ) {
        tokio::spawn(async move {
            while let Some(request) = inbound.recv().await {
                let reply = match &request.message {
                    Message::Read { keys, .. } => Message::Records {
                        records: vec![None; keys.len()],
                    },
                    Message::Apply { writes, .. } => Message::Applied {
                        outcomes: writes
                            .iter()
                            .map(|w| WriteOutcome::Stale {
                                current: w.record.version,
                            })
                            .collect(),
                    },
                    _ => Message::Refused(Refusal::Invalid {
                        reason: "unsupported".into(),
                    }),
                };
                endpoint.respond(&request, &reply).await.expect("respond");
            }
        });
    }

    fn get() -> Message {
        Message::read_one(Bytes::from_static(b"k"))
    }

    pub(super) fn none() -> Message {
        Message::Records {
            records: vec![None],
        }
    }

    fn stale(current: Version) -> Message {
        Message::Applied {
            outcomes: vec![WriteOutcome::Stale { current }],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn request_gets_its_own_response() {
        let net = InProcessNetwork::new(1);
        let (client, _client_inbound) =
            RpcEndpoint::start(net.bind("a").unwrap(), RpcConfig::default());
        let (server, server_inbound) =
            RpcEndpoint::start(net.bind("b").unwrap(), RpcConfig::default());
        serve(server, server_inbound);
        let b = Address::new("b");
        let version = Version::new(Timestamp::new(5, 0), NodeId(1));
        let put = Message::apply_one(
            Bytes::from_static(b"k"),
            crate::record::Record::value("v", version),
        );
        // Several requests in flight at once each receive the matching response.
        let get = get();
        let (r1, r2) = tokio::join!(
            client.request(&b, &get, SECOND),
            client.request(&b, &put, SECOND)
        );
        assert_eq!(r1.expect("get"), none());
        assert_eq!(r2.expect("put"), stale(version));
        assert_eq!(client.stats().unmatched_responses, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn partitioned_peer_times_out_with_typed_error() {
        let net = InProcessNetwork::new(2);
        let (client, _inbound) = RpcEndpoint::start(net.bind("a").unwrap(), RpcConfig::default());
        let (server, server_inbound) =
            RpcEndpoint::start(net.bind("b").unwrap(), RpcConfig::default());
        serve(server, server_inbound);
        net.block(&Address::new("b"), &Address::new("a")); // responses are lost
        let err = client
            .request(&Address::new("b"), &get(), SECOND)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RpcError::Timeout { after, .. } if after == SECOND),
            "{err}"
        );
        net.heal();
        assert!(
            client
                .request(&Address::new("b"), &get(), SECOND)
                .await
                .is_ok()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unreachable_peer_is_a_transport_error() {
        let net = InProcessNetwork::new(3);
        let (client, _inbound) = RpcEndpoint::start(net.bind("a").unwrap(), RpcConfig::default());
        let err = client
            .request(&Address::new("nobody"), &get(), SECOND)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RpcError::Transport(TransportError::Unreachable { .. })),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn garbage_is_counted_and_the_endpoint_keeps_serving() {
        let net = InProcessNetwork::new(4);
        let raw = net.bind("raw").unwrap();
        let (server, server_inbound) =
            RpcEndpoint::start(net.bind("b").unwrap(), RpcConfig::default());
        serve(server.clone(), server_inbound);
        raw.send(
            &Address::new("b"),
            Bytes::from_static(b"\x00\x00\x00\x02hi"),
        )
        .await
        .unwrap();
        // A well-formed response nobody asked for.
        let stray =
            wire::encode(Header::response(999), &get(), wire::DEFAULT_MAX_FRAME_LEN).unwrap();
        raw.send(&Address::new("b"), stray).await.unwrap();
        let (client, _inbound) = RpcEndpoint::start(net.bind("a").unwrap(), RpcConfig::default());
        assert!(
            client
                .request(&Address::new("b"), &get(), SECOND)
                .await
                .is_ok()
        );
        let stats = server.stats();
        assert_eq!(stats.rejected_frames, 1);
        assert_eq!(stats.unmatched_responses, 1);
        assert_eq!(stats.inbound, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn late_response_after_timeout_is_unmatched_not_misdelivered() {
        let net = InProcessNetwork::new(5);
        let (client, _inbound) = RpcEndpoint::start(net.bind("a").unwrap(), RpcConfig::default());
        let (server, server_inbound) =
            RpcEndpoint::start(net.bind("b").unwrap(), RpcConfig::default());
        serve(server, server_inbound);
        let b = Address::new("b");
        net.set_link_delay(&b, &Address::new("a"), 2 * SECOND, 2 * SECOND)
            .unwrap();
        assert!(matches!(
            client.request(&b, &get(), SECOND).await,
            Err(RpcError::Timeout { .. })
        ));
        net.clear_link_faults(&b, &Address::new("a"));
        // The next request must get its own response, not the late one.
        let put_version = Version::new(Timestamp::new(9, 0), NodeId(2));
        let put = Message::apply_one(
            Bytes::from_static(b"k"),
            crate::record::Record::tombstone(put_version),
        );
        let reply = client
            .request(&b, &put, 5 * SECOND)
            .await
            .expect("second request");
        assert_eq!(reply, stale(put_version));
        tokio::time::sleep(3 * SECOND).await;
        assert_eq!(client.stats().unmatched_responses, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn full_inbound_queue_sheds_instead_of_blocking_responses() {
        let net = InProcessNetwork::new(6);
        let config = RpcConfig::default().with_inbound_capacity(NonZeroUsize::MIN);
        // "b" never reads its inbound queue, but must still receive its own responses.
        let (b, _unread) = RpcEndpoint::start(net.bind("b").unwrap(), config);
        let (c, c_inbound) = RpcEndpoint::start(net.bind("c").unwrap(), RpcConfig::default());
        serve(c, c_inbound);
        let raw = net.bind("raw").unwrap();
        for _ in 0..3 {
            let frame =
                wire::encode(Header::message(), &get(), wire::DEFAULT_MAX_FRAME_LEN).unwrap();
            raw.send(&Address::new("b"), frame).await.unwrap();
        }
        assert!(b.request(&Address::new("c"), &get(), SECOND).await.is_ok());
        let stats = b.stats();
        assert_eq!((stats.inbound, stats.shed_inbound), (1, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_from_another_peer_does_not_complete_a_request() {
        let net = InProcessNetwork::new(8);
        let config = RpcConfig::default().with_first_correlation(77);
        let (client, _inbound) = RpcEndpoint::start(net.bind("a").unwrap(), config);
        let _silent = net.bind("b").unwrap(); // the real peer never answers
        let forger = net.bind("mallory").unwrap();
        let pending = {
            let client = client.clone();
            tokio::spawn(async move { client.request(&Address::new("b"), &get(), SECOND).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        // A response carrying the right id, from the wrong peer.
        let forged =
            wire::encode(Header::response(77), &none(), wire::DEFAULT_MAX_FRAME_LEN).unwrap();
        forger.send(&Address::new("a"), forged).await.unwrap();
        let result = pending.await.expect("task");
        assert!(
            matches!(result, Err(RpcError::Timeout { .. })),
            "{result:?}"
        );
        assert_eq!(client.stats().unmatched_responses, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn close_fails_pending_requests() {
        let net = InProcessNetwork::new(7);
        let (client, _inbound) = RpcEndpoint::start(net.bind("a").unwrap(), RpcConfig::default());
        let _silent = net.bind("b").unwrap(); // bound, never answers
        let pending = {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .request(&Address::new("b"), &get(), 10 * SECOND)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        client.close().await;
        let result = pending.await.expect("task");
        assert!(matches!(result, Err(RpcError::Closed)), "{result:?}");
        assert!(matches!(
            client.send(&Address::new("b"), &get()).await,
            Err(RpcError::Transport(TransportError::Closed))
        ));
    }
}

#[cfg(test)]
mod deadline_tests {
    use std::future::Future;

    use bytes::Bytes;
    use tokio::time::Instant;

    use super::*;
    use crate::replication::ReplicaMessage;
    use crate::runtime::inproc::{InProcessNetwork, InProcessTransport};
    use crate::transport::Incoming;

    /// An in-process transport whose `send` never completes, as a dial to a black hole or a
    /// queue that never drains would.
    struct StuckSend(InProcessTransport);

    impl Transport for StuckSend {
        fn local_addr(&self) -> Address {
            self.0.local_addr()
        }
        fn max_frame_len(&self) -> usize {
            self.0.max_frame_len()
        }
        fn send(
            &self,
            _to: &Address,
            _frame: Bytes,
        ) -> impl Future<Output = Result<(), TransportError>> + Send {
            std::future::pending()
        }
        fn recv(&self) -> impl Future<Output = Result<Incoming, TransportError>> + Send {
            self.0.recv()
        }
        fn close(&self) -> impl Future<Output = ()> + Send {
            self.0.close()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_timeout_covers_a_send_that_never_returns() {
        let net = InProcessNetwork::new(9);
        let transport = StuckSend(net.bind("a").expect("bind"));
        let (client, _inbound) =
            RpcEndpoint::<_, ReplicaMessage>::start(transport, RpcConfig::default());
        let timeout = Duration::from_secs(2);
        let started = Instant::now();
        let get = ReplicaMessage::read_one(Bytes::from_static(b"k"));
        // Bounded by the test's own limit: without the deadline covering `send`, the request
        // would wait forever.
        let result = tokio::time::timeout(
            timeout * 10,
            client.request(&Address::new("b"), &get, timeout),
        )
        .await
        .expect("the request ends by its own deadline");
        match result {
            Err(RpcError::Timeout { to, after }) => {
                assert_eq!((to, after), (Address::new("b"), timeout));
            }
            other => panic!("a stuck send gave {other:?}"),
        }
        // The paused clock moves only to the next timer: the request ended at its deadline.
        assert_eq!(started.elapsed(), timeout);
        client.close().await;
    }
}

#[cfg(test)]
mod shared_transport_tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::replication::ReplicaMessage;
    use crate::runtime::inproc::InProcessNetwork;
    use crate::transport::SharedTransport;

    /// The node serves requests from spawned tasks over a transport chosen by name; both
    /// `request` and `respond` over a `SharedTransport` must be spawnable.
    #[tokio::test(start_paused = true)]
    async fn endpoints_over_a_shared_transport_work_in_spawned_tasks() {
        let net = InProcessNetwork::new(3);
        let a = SharedTransport::new(net.bind("a").unwrap());
        let b = SharedTransport::new(net.bind("b").unwrap());
        let (client, _client_inbound) =
            RpcEndpoint::<SharedTransport, ReplicaMessage>::start(a, RpcConfig::default());
        let (server, mut server_inbound) =
            RpcEndpoint::<SharedTransport, ReplicaMessage>::start(b, RpcConfig::default());
        let serving = tokio::spawn(async move {
            let request = server_inbound.recv().await.expect("a request");
            let reply = super::tests::none();
            server.respond(&request, &reply).await.expect("respond");
        });
        let asking = tokio::spawn(async move {
            let get = ReplicaMessage::read_one(Bytes::from_static(b"k"));
            client
                .request(&Address::new("b"), &get, Duration::from_secs(1))
                .await
        });
        let reply = asking.await.expect("task").expect("reply");
        assert_eq!(reply, super::tests::none());
        serving.await.expect("task");
    }
}
