//! The receiving side: accepting connections, reading hellos, streams and datagrams, and
//! handing frames to `recv`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use chorus_core::identity::Address;
use chorus_core::peer_auth::KeyCheck;
use chorus_core::transport::inbound::Admitted;
use chorus_core::transport::{self, Incoming};
use chorus_core::wire::{self, FrameCutter};
use futures::stream::{FuturesUnordered, StreamExt};
use quinn::{Connection, VarInt};

use crate::io_task::lock;
use crate::outbound::inbound_writer;
use crate::stats::bump;
use crate::{HELLO_ACK, HELLO_MAGIC, Inner, MAX_HELLO_ADDR_LEN, code};

impl Inner {
    fn reject(&self, conn: &Connection, code: u32, why: &str) {
        bump(&self.counters.rejected_connections, 1);
        tracing::warn!(remote = %conn.remote_address(), why, "closing connection");
        conn.close(VarInt::from_u32(code), why.as_bytes());
    }
}

pub(crate) async fn accept_loop(inner: Arc<Inner>) {
    let mut closed = inner.outboxes.closed();
    loop {
        let incoming = tokio::select! {
            _ = closed.wait_for(|c| *c) => return,
            incoming = inner.endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { return };
        match inner.admission.admit() {
            Ok(admitted) => inner
                .io
                .spawn(inbound(Arc::clone(&inner), incoming, admitted)),
            Err(refused) => {
                bump(&inner.counters.refused_connections, 1);
                tracing::warn!(remote = %incoming.remote_address(), %refused, "refusing connection");
                incoming.refuse();
            }
        }
    }
}

/// An incoming connection: handshake and hello (within the handshake timeout), a writer for
/// replies, then its streams. It holds its place among the admitted connections until its
/// streams are read to the end.
async fn inbound(inner: Arc<Inner>, incoming: quinn::Incoming, mut admitted: Admitted) {
    let remote = incoming.remote_address();
    let timeout = inner.config.handshake_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let conn = match tokio::time::timeout_at(deadline, async { incoming.accept()?.await }).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(error)) => {
            bump(&inner.counters.handshake_failures, 1);
            tracing::warn!(%remote, %error, "handshake failed");
            return;
        }
        Err(_) => {
            bump(&inner.counters.handshake_failures, 1);
            tracing::warn!(%remote, "handshake timed out");
            return;
        }
    };
    bump(&inner.counters.accepted, 1);
    let Ok(check) = inner.admitted(&conn) else {
        bump(&inner.counters.handshake_failures, 1);
        tracing::warn!(%remote, "closing connection: the peer's key is not admitted");
        conn.close(VarInt::from_u32(code::REVOKED), b"key not admitted");
        return;
    };
    // One deadline for the handshake and the hello.
    let announced = match tokio::time::timeout_at(deadline, read_hello(&conn)).await {
        Ok(Ok(announced)) => announced,
        Ok(Err(why)) => return inner.reject(&conn, code::BAD_HELLO, &why),
        Err(_) => return inner.reject(&conn, code::BAD_HELLO, "no hello in time"),
    };
    // In keyring mode the hello's address must belong to the key that signed the handshake.
    if let (Some(auth), Some(check)) = (&inner.auth, &check)
        && let Err(taken) = auth.book.may_use(&announced, &check.key())
    {
        bump(&inner.counters.address_refusals, 1);
        tracing::warn!(%remote, %taken, "closing connection: hello address belongs to another member");
        conn.close(VarInt::from_u32(code::ADDRESS_TAKEN), b"address taken");
        return;
    }
    // The connection gets a queue under its own inbound address, never under the announced
    // one: the certificate proves the peer is trusted, not that it is the node at
    // `announced`, so this connection must not carry traffic meant for that address.
    let Some(writer) = inner.outboxes.register_inbound(&announced) else {
        // The transport is closing.
        conn.close(VarInt::from_u32(code::CLOSING), b"closing");
        return;
    };
    // Acknowledge the hello (see `HELLO_ACK`), within what is left of the handshake time.
    let ack = async {
        let mut stream = conn.open_uni().await.map_err(|e| e.to_string())?;
        stream
            .write_all(&HELLO_ACK)
            .await
            .map_err(|e| e.to_string())?;
        stream.finish().map_err(|e| e.to_string())
    };
    match tokio::time::timeout_at(deadline, ack).await {
        Ok(Ok(())) => {}
        Ok(Err(why)) => {
            tracing::debug!(%remote, %why, "connection gone before its acknowledgement");
            return;
        }
        Err(_) => return inner.reject(&conn, code::BAD_HELLO, "acknowledgement not sent in time"),
    }
    admitted.handshake_done();
    let from = writer.addr().clone();
    inner.io.spawn(inbound_writer(
        Arc::clone(&inner),
        conn.clone(),
        writer,
        check.clone(),
    ));
    read_streams(inner, conn, from, check).await;
    drop(admitted);
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

/// Accepts the peer's streams and reads them, until the connection or the transport closes.
/// The streams of a connection are read concurrently inside this one future (a stream usually
/// arrives whole in one packet), at most [`QuicConfig::max_concurrent_streams`](crate::QuicConfig::max_concurrent_streams) at once.
///
/// An empty stream is the peer's goodbye (see [`say_goodbye`](crate::outbound::say_goodbye)): no stream follows it, so once
/// every stream before it is read, this closes the connection.
///
/// In keyring mode `check` closes the connection at the first stream or datagram after the
/// peer's key left the keyring.
pub(crate) async fn read_streams(
    inner: Arc<Inner>,
    conn: Connection,
    from: Address,
    mut check: Option<KeyCheck>,
) {
    let _listed = Listed::new(&inner, &conn, &from);
    let max_readers = inner.config.max_concurrent_streams.get() as usize;
    let mut readers = FuturesUnordered::new();
    let mut goodbye = false;
    // Kept across iterations, so each stays registered with quinn instead of re-registering
    // every time another branch completes.
    let mut accept = std::pin::pin!(conn.accept_uni());
    let mut datagram = std::pin::pin!(conn.read_datagram());
    loop {
        if let Some(check) = &mut check
            && !check.still_admitted()
        {
            bump(&inner.counters.revoked_closed, 1);
            tracing::warn!(peer = %from, key = %check.key(), "closing connection: key revoked");
            conn.close(VarInt::from_u32(code::REVOKED), b"key revoked");
            return;
        }
        tokio::select! {
            stream = &mut accept, if !goodbye && readers.len() < max_readers => match stream {
                Ok(stream) => {
                    accept.set(conn.accept_uni());
                    readers.push(read_stream(&inner, &conn, stream, &from, check.clone()));
                }
                Err(error) => {
                    tracing::debug!(peer = %from, %error, "connection ended");
                    return;
                }
            },
            Some(read) = readers.next(), if !readers.is_empty() => match read {
                Read::Frames => {}
                Read::Goodbye => goodbye = true,
                Read::Failed => return,
            },
            got = &mut datagram, if inner.config.datagrams => match got {
                Ok(frame) => {
                    datagram.set(conn.read_datagram());
                    // Checked again here: the loop may have waited since its last check.
                    if check.as_mut().is_some_and(|c| !c.still_admitted()) {
                        continue;
                    }
                    take_datagram(&inner, &from, frame);
                }
                Err(error) => {
                    tracing::debug!(peer = %from, %error, "connection ended");
                    return;
                }
            },
        }
        // The peer is closing and has sent everything: nothing more to read, and what this
        // side would still send it would drop.
        if goodbye && readers.is_empty() {
            conn.close(VarInt::from_u32(code::CLOSING), b"goodbye");
            return;
        }
    }
}

/// A received datagram: exactly one frame (length and magic checked, as on streams) goes to
/// `recv` if its queue has room; anything else is dropped and counted. Datagrams are
/// unreliable, so neither case closes the connection or waits.
fn take_datagram(inner: &Inner, from: &Address, frame: Bytes) {
    let whole = matches!(wire::frame_len(&frame, inner.max_frame_len), Ok(Some(n)) if n == frame.len())
        && frame[wire::PREFIX_LEN..wire::PREFIX_LEN + wire::MAGIC.len()] == wire::MAGIC;
    if !whole {
        bump(&inner.counters.datagrams_rejected, 1);
        tracing::warn!(peer = %from, len = frame.len(), "dropped a datagram that is not one frame");
        return;
    }
    if inner.outboxes.is_closed() {
        return;
    }
    let incoming = Incoming {
        from: from.clone(),
        frame,
    };
    // Counted first, so stats never lag what `recv` can see; taken back if it did not fit.
    bump(&inner.counters.frames_received, 1);
    bump(&inner.counters.datagrams_received, 1);
    if inner.recv.try_push(incoming).is_err() {
        inner
            .counters
            .frames_received
            .fetch_sub(1, Ordering::Relaxed);
        inner
            .counters
            .datagrams_received
            .fetch_sub(1, Ordering::Relaxed);
        bump(&inner.counters.datagrams_dropped, 1);
        tracing::debug!(peer = %from, "dropped a datagram: the recv queue is full");
    }
}

/// Lists a connection in [`Inner::connections`] while its streams are read.
struct Listed<'a> {
    inner: &'a Inner,
    id: usize,
}

impl<'a> Listed<'a> {
    fn new(inner: &'a Inner, conn: &Connection, peer: &Address) -> Self {
        let id = conn.stable_id();
        lock(&inner.connections).insert(id, (peer.clone(), conn.clone()));
        Listed { inner, id }
    }
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        lock(&self.inner.connections).remove(&self.id);
    }
}

/// How reading one stream ended.
enum Read {
    /// It carried frames, all handed to `recv`.
    Frames,
    /// It was empty: the peer's goodbye.
    Goodbye,
    /// It was refused (the connection is being closed) or the connection failed.
    Failed,
}

/// Reads one stream, cutting it into frames and handing each to `recv` as it completes.
///
/// In keyring mode `check` stops delivery at the first chunk after the peer's key left the
/// keyring (the connection loop then closes the connection).
async fn read_stream(
    inner: &Inner,
    conn: &Connection,
    mut stream: quinn::RecvStream,
    from: &Address,
    mut check: Option<KeyCheck>,
) -> Read {
    let mut cutter = FrameCutter::new(inner.max_frame_len);
    let mut frames = Vec::new();
    let mut any = false;
    loop {
        let cut = match stream.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => cutter.push(chunk.bytes, &mut frames),
            Ok(None) if cutter.pending_len() > 0 => {
                inner.reject(conn, code::BAD_FRAME, "stream ends mid-frame");
                return Read::Failed;
            }
            Ok(None) if any => return Read::Frames,
            Ok(None) => return Read::Goodbye,
            Err(quinn::ReadError::Reset(_)) => {
                // Nothing in this protocol resets a stream: its frames would be lost silently.
                inner.reject(conn, code::BAD_FRAME, "stream reset by the peer");
                return Read::Failed;
            }
            Err(error) => {
                tracing::debug!(peer = %from, %error, "connection ended mid-stream");
                return Read::Failed;
            }
        };
        if let Some(check) = &mut check
            && !check.still_admitted()
        {
            bump(&inner.counters.revoked_closed, 1);
            tracing::warn!(peer = %from, key = %check.key(), "closing connection: key revoked");
            conn.close(VarInt::from_u32(code::REVOKED), b"key revoked");
            return Read::Failed;
        }
        // Frames cut before a bad one are whole and valid: deliver them, then refuse.
        any = true;
        for frame in frames.drain(..) {
            let incoming = Incoming {
                from: from.clone(),
                frame,
            };
            deliver(inner, incoming).await;
        }
        if let Err(error) = cut {
            inner.reject(conn, code::BAD_FRAME, &error.to_string());
            return Read::Failed;
        }
    }
}

/// Hands a frame to `recv`, waiting while its queue is full. Once the transport is closing
/// the frame is dropped instead: `recv` takes nothing more, but the streams are still read to
/// their end so that a peer's goodbye is seen and answered.
async fn deliver(inner: &Inner, incoming: Incoming) {
    let mut closed = inner.outboxes.closed();
    if *closed.borrow_and_update() {
        return;
    }
    // Waits while the queue is full (in frames or bytes): the stream is not read meanwhile,
    // and QUIC flow control stops the sender. Counted before `recv` can see it, so stats never
    // lag what was received; taken back if the transport closed first.
    bump(&inner.counters.frames_received, 1);
    tokio::select! {
        () = inner.recv.push(incoming) => {}
        _ = closed.wait_for(|c| *c) => {
            inner.counters.frames_received.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
