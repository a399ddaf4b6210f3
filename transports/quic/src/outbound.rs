//! The sending side: a writer per peer that dials, sends a stream per batch, says goodbye
//! on close, and redials with backoff.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chorus_core::identity::Address;
use chorus_core::peer_auth::KeyCheck;
use chorus_core::transport::outbox::{Link, Writer};
use quinn::{Connection, VarInt};

use crate::inbound::read_streams;
use crate::io_task::lock;
use crate::stats::bump;
use crate::{HELLO_ACK, Inner, ResolveError, code, resolve, tls};

/// Most bytes a writer gathers onto one stream (a single larger frame still gets its own).
const MAX_BATCH_BYTES: usize = 256 * 1024;

impl Inner {
    /// Handshake and hello, within the connect timeout.
    async fn dial(&self, to: &Address) -> Result<(Connection, Option<KeyCheck>), DialError> {
        let timeout = self.config.connect_timeout;
        let attempt = async {
            let addr = resolve(to).await?;
            let connecting = self.endpoint.connect(addr, tls::SERVER_NAME)?;
            let conn = connecting.await?;
            let check = self.admitted(&conn).map_err(|()| {
                conn.close(VarInt::from_u32(code::REVOKED), b"key not admitted");
                DialError::NotAdmitted
            })?;
            if let (Some(auth), Some(check)) = (&self.auth, &check)
                && let Err(taken) = auth.book.may_use(to, &check.key())
            {
                bump(&self.counters.address_refusals, 1);
                conn.close(VarInt::from_u32(code::ADDRESS_TAKEN), b"address taken");
                return Err(DialError::WrongPeer(taken));
            }
            let mut hello = conn.open_uni().await?;
            hello
                .write_all(&self.hello)
                .await
                .map_err(DialError::Hello)?;
            hello.finish().map_err(|_| DialError::HelloClosed)?;
            // The listener's acknowledgement: its refusal (a key it does not admit, an
            // address another member owns) closes the connection instead, and fails here.
            let mut ack = conn.accept_uni().await?;
            let got = ack
                .read_to_end(HELLO_ACK.len())
                .await
                .map_err(|e| DialError::NoAck(e.to_string()))?;
            if got != HELLO_ACK {
                return Err(DialError::NoAck("not a hello acknowledgement".to_owned()));
            }
            Ok((conn, check))
        };
        let mut closed = self.outboxes.closed();
        tokio::select! {
            attempt = tokio::time::timeout(timeout, attempt) => match attempt {
                Ok(result) => result,
                Err(_) => Err(DialError::TimedOut(timeout)),
            },
            // `close` need not wait out a dial to a node that is gone.
            _ = closed.wait_for(|c| *c) => Err(DialError::Closing),
        }
    }
}

/// Why a dial failed: the source of the [`TransportError::Unreachable`] that sends get until
/// a redial succeeds.
///
/// [`TransportError::Unreachable`]: chorus_core::transport::TransportError::Unreachable
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    /// The peer's address did not resolve.
    #[error("{0}")]
    Resolve(#[from] ResolveError),
    /// quinn refused to start the connection.
    #[error("{0}")]
    Connect(#[from] quinn::ConnectError),
    /// The handshake failed (an untrusted certificate included), or the connection was lost
    /// before the hello stream opened.
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The connection was lost while the hello was written.
    #[error("writing the hello: {0}")]
    Hello(#[source] quinn::WriteError),
    /// The hello stream was closed before it could be finished.
    #[error("the hello stream closed before it was finished")]
    HelloClosed,
    /// The handshake and the hello took longer than the connect timeout.
    #[error("no connection within {0:?}")]
    TimedOut(Duration),
    /// The listener did not acknowledge the hello (it closed the connection, or sent
    /// something else).
    #[error("no hello acknowledgement: {0}")]
    NoAck(String),
    /// The server's key is not admitted by the keyring (it changed during the handshake).
    #[error("the server's key is not admitted")]
    NotAdmitted,
    /// The server authenticated as another member than the one owning the address.
    #[error("{0}")]
    WrongPeer(#[source] chorus_core::peer_auth::AddressTaken),
    /// The transport started closing during the dial.
    #[error("the transport is closing")]
    Closing,
}

/// The writer of a dialled connection: dial (with backoff), write, redial when frames are left
/// after the connection went away.
pub(crate) async fn outbound(inner: Arc<Inner>, mut writer: Writer) {
    loop {
        writer.set_link(Link::Connecting);
        match inner.dial(writer.addr()).await {
            Ok((conn, check)) => {
                bump(&inner.counters.dialed, 1);
                writer.connected();
                inner.io.spawn(read_streams(
                    Arc::clone(&inner),
                    conn.clone(),
                    writer.addr().clone(),
                    check.clone(),
                ));
                match write_loop(&inner, &conn, &mut writer, check).await {
                    End::Drained => return,
                    End::Lost(reason) => {
                        tracing::debug!(peer = %writer.addr(), %reason, "connection lost");
                        // Retire this writer: new sends start a fresh one. Frames that raced
                        // in before the queue closed are still delivered, over a new dial.
                        if writer.retire().await {
                            return;
                        }
                    }
                }
            }
            Err(error) => {
                bump(&inner.counters.dial_failures, 1);
                tracing::debug!(peer = %writer.addr(), %error, "dial failed");
                let (dropped, again) = writer.back_off(Arc::new(error)).await;
                bump(&inner.counters.frames_dropped, dropped);
                if !again {
                    break;
                }
            }
        }
    }
    bump(&inner.counters.frames_dropped, writer.discard().await);
}

/// How a writer's loop over one connection ended.
enum End {
    /// The queue ended (the transport is closing) and everything in it was sent; the peer has
    /// read it all (or the close timeout passed).
    Drained,
    /// The connection went away.
    Lost(String),
}

/// Sends the queue's frames on `conn`, a stream per batch, until the queue ends or the
/// connection goes away. When the queue ends because the transport is closing, says goodbye
/// (see [`say_goodbye`]); a retired writer that has delivered the frames it held just ends,
/// leaving the connection to the idle timeout.
///
/// In keyring mode `check` closes the connection before the first batch after the peer's key
/// left the keyring.
async fn write_loop(
    inner: &Inner,
    conn: &Connection,
    writer: &mut Writer,
    mut check: Option<KeyCheck>,
) -> End {
    // A retired writer only delivers leftovers: datagrams keep the live writer's connection.
    let mut route = (!writer.is_retired()).then(|| Route::new(inner, writer.addr(), conn));
    let max_batch = inner.config.max_batch.get();
    let mut batch: Vec<Bytes> = Vec::with_capacity(max_batch);
    let lost = conn.closed();
    tokio::pin!(lost);
    loop {
        let first = tokio::select! {
            biased;
            frame = writer.next() => match frame {
                Some(frame) => frame,
                None => {
                    drop(route.take());
                    if writer.transport_closed() {
                        say_goodbye(inner, conn, lost, writer.addr()).await;
                    }
                    return End::Drained;
                }
            },
            error = &mut lost => return End::Lost(error.to_string()),
        };
        writer.fill_batch(first, &mut batch, max_batch, MAX_BATCH_BYTES);
        let frames = batch.len() as u64;
        if let Some(check) = &mut check
            && !check.still_admitted()
        {
            bump(&inner.counters.frames_dropped, frames);
            bump(&inner.counters.revoked_closed, 1);
            tracing::warn!(peer = %writer.addr(), key = %check.key(), "closing connection: key revoked");
            batch.clear();
            conn.close(VarInt::from_u32(code::REVOKED), b"key revoked");
            return End::Lost("key revoked".to_owned());
        }
        match write_stream(conn, &mut batch).await {
            Ok(()) => {
                bump(&inner.counters.frames_sent, frames);
                bump(&inner.counters.streams_sent, 1);
                batch.clear();
            }
            Err(Unsent::Untouched(reason)) => {
                // Not a byte went out: the frames go first on the next connection.
                writer.put_back(batch.drain(..));
                return End::Lost(reason);
            }
            Err(Unsent::Lost(reason)) => {
                bump(&inner.counters.frames_dropped, frames);
                batch.clear();
                return End::Lost(reason);
            }
        }
    }
}

/// Why a batch was not sent.
enum Unsent {
    /// No stream could be opened: nothing of the batch was written.
    Untouched(String),
    /// Writing failed part-way: the peer may have some of it, but not as whole frames.
    Lost(String),
}

/// Sends `batch` on a new stream and finishes it.
async fn write_stream(conn: &Connection, batch: &mut [Bytes]) -> Result<(), Unsent> {
    let mut stream = conn
        .open_uni()
        .await
        .map_err(|e| Unsent::Untouched(e.to_string()))?;
    stream
        .write_all_chunks(batch)
        .await
        .map_err(|e| Unsent::Lost(e.to_string()))?;
    stream.finish().map_err(|e| Unsent::Lost(e.to_string()))
}

/// The graceful end of a connection whose writer has sent everything: an empty stream tells
/// the peer that no stream follows; the peer reads every stream it has, hands their frames to
/// `recv`, and then closes the connection, which this waits for (up to the close timeout).
///
/// Waiting for QUIC's acknowledgements would not be enough: a peer discards stream data it
/// has acknowledged but not yet read once the connection is closed.
pub(crate) async fn say_goodbye(
    inner: &Inner,
    conn: &Connection,
    closed_by_peer: Pin<&mut impl Future<Output = quinn::ConnectionError>>,
    peer: &Address,
) {
    let limit = inner.config.close_timeout;
    let goodbye = async {
        let mut stream = conn.open_uni().await.map_err(|e| e.to_string())?;
        stream.finish().map_err(|e| e.to_string())?;
        Ok::<_, String>(closed_by_peer.await)
    };
    match tokio::time::timeout(limit, goodbye).await {
        Ok(Ok(_)) => {}
        Ok(Err(reason)) => tracing::debug!(%peer, %reason, "connection gone before goodbye"),
        Err(_) => {
            tracing::warn!(%peer, ?limit, "the peer did not finish reading before the close timeout");
            conn.close(VarInt::from_u32(code::CLOSING), b"goodbye unanswered");
        }
    }
}

/// Sends replies over an accepted connection until it or the transport goes away.
pub(crate) async fn inbound_writer(
    inner: Arc<Inner>,
    conn: Connection,
    mut writer: Writer,
    check: Option<KeyCheck>,
) {
    if let End::Lost(reason) = write_loop(&inner, &conn, &mut writer, check).await {
        tracing::debug!(peer = %writer.addr(), %reason, "inbound connection lost");
    }
    bump(&inner.counters.frames_dropped, writer.discard().await);
}

/// Makes a writer's connection the one datagrams to its peer take, while the writer uses it.
struct Route<'a> {
    inner: &'a Inner,
    peer: Address,
    id: usize,
}

impl<'a> Route<'a> {
    fn new(inner: &'a Inner, peer: &Address, conn: &Connection) -> Self {
        let mut routes = lock(&inner.routes);
        // Another writer's connection that is still open keeps the route.
        if !routes
            .get(peer)
            .is_some_and(|c| c.close_reason().is_none() && c.stable_id() != conn.stable_id())
        {
            routes.insert(peer.clone(), conn.clone());
        }
        drop(routes);
        Route {
            inner,
            peer: peer.clone(),
            id: conn.stable_id(),
        }
    }
}

impl Drop for Route<'_> {
    fn drop(&mut self) {
        let mut routes = lock(&self.inner.routes);
        if routes
            .get(&self.peer)
            .is_some_and(|c| c.stable_id() == self.id)
        {
            routes.remove(&self.peer);
        }
    }
}
