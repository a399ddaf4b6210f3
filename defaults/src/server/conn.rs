//! The client listener: accepting within the connection limit, and serving one connection:
//! every complete command in the buffer runs in order and their replies go out in one write
//! (pipelining); input that breaks the protocol or a limit closes that connection only.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use super::Shared;
use super::commands::{Session, batchable, execute, execute_batch};
use super::resp::{Limits, Proto, Reply, next_command};
use super::socket::ClientSocket;

/// Accepts connections until `stop` turns true, then gives those open
/// `client.shutdown_grace` to finish the commands they are running.
pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(shared.max_connections));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a moment, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    shared.rejected.fetch_add(1, Ordering::Relaxed);
                    shared.metrics.rejected.increment(1);
                    connections.spawn(refuse(stream));
                    continue;
                };
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                shared.metrics.accepted.increment(1);
                let shared = shared.clone();
                let stop = stop.clone();
                connections.spawn(async move {
                    let _slot = slot;
                    shared.metrics.connections.increment(1.0);
                    shared.open.fetch_add(1, Ordering::Relaxed);
                    serve(&shared, stream, peer.to_string(), stop).await;
                    shared.open.fetch_sub(1, Ordering::Relaxed);
                    shared.metrics.connections.decrement(1.0);
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    let grace = shared.shutdown_grace;
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            ?grace,
            "connections still busy at the end of the shutdown grace; closed"
        );
        connections.abort_all();
    }
}

async fn refuse(mut stream: TcpStream) {
    let _ = stream
        .write_all(b"-ERR max number of clients reached\r\n")
        .await;
    let _ = stream.shutdown().await;
}

/// Serves one connection until it closes, breaks the protocol, idles too long or the server
/// stops (after the commands already received are answered).
async fn serve(
    shared: &Arc<Shared>,
    stream: TcpStream,
    peer: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut stream = match ClientSocket::new(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "connection not taken over");
            return;
        }
    };
    let id = shared.next_client_id.fetch_add(1, Ordering::Relaxed);
    let mut session = Session::new(id, shared.password.is_empty(), peer);
    let limits = Limits {
        max_request_bytes: shared.limits.max_request_bytes,
        max_bulk_bytes: shared.limits.max_bulk_bytes,
        max_args: shared.limits.max_args,
    };
    let idle = shared.idle_timeout;
    let mut input = BytesMut::with_capacity(16 * 1024);
    let mut output = BytesMut::with_capacity(16 * 1024);
    let mut protocol_error = None;
    // One idle timer for the connection's life, moved on only when it fires early: a timer
    // registered and cancelled around every read was a measurable cost per request.
    // When this connection started waiting for input (as the old per-read timeout measured).
    let mut waiting_since = tokio::time::Instant::now();
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    loop {
        let n = tokio::select! {
            biased;
            // First: a client that pipelines without pause must not hold up a shutdown.
            _ = stop.changed() => break,
            r = stream.read_buf(&mut input) => r,
            () = &mut idle_timer, if !idle.is_zero() => {
                let deadline = waiting_since + idle;
                if tokio::time::Instant::now() < deadline {
                    idle_timer.as_mut().reset(deadline);
                    continue;
                }
                tracing::debug!(peer = %session.peer, "idle timeout; closing");
                let mut out = BytesMut::new();
                Reply::err("idle timeout").encode(session.proto, &mut out);
                let _ = stream.write_all(&out).await;
                break;
            }
        };
        let n = match n {
            Err(e) => {
                tracing::debug!(peer = %session.peer, error = %e, "read failed");
                break;
            }
            Ok(0) => break,
            Ok(n) => n,
        };
        shared.metrics.bytes_in.increment(n as u64);
        let mut close = false;
        let mut commands = Vec::new();
        loop {
            match next_command(&mut input, &limits) {
                Ok(None) => break,
                Ok(Some(args)) if args.is_empty() => continue,
                Ok(Some(args)) => commands.push(args),
                Err(e) => {
                    shared.metrics.protocol_errors.increment(1);
                    tracing::debug!(peer = %session.peer, error = %e, "protocol error; closing");
                    protocol_error = Some(e);
                    break;
                }
            }
        }
        let mut i = 0;
        while i < commands.len() {
            // A run of plain SETs (or quorum GETs) goes to the batcher at once.
            if let Some(kind) = batchable(shared, &session, &commands[i]) {
                let len = commands[i..]
                    .iter()
                    .take_while(|c| batchable(shared, &session, c) == Some(kind))
                    .count();
                for reply in execute_batch(shared, &session, kind, &commands[i..i + len]).await {
                    reply.encode(session.proto, &mut output);
                }
                i += len;
                continue;
            }
            let reply = execute(shared, &mut session, &commands[i]).await;
            reply.encode(session.proto, &mut output);
            i += 1;
            if session.quit {
                close = true;
                break;
            }
        }
        if let Some(e) = protocol_error.take() {
            if !close {
                Reply::err(e.to_string()).encode(Proto::Resp2, &mut output);
            }
            close = true;
        }
        if !output.is_empty() {
            shared.metrics.bytes_out.increment(output.len() as u64);
            // A client that stops reading its replies gets the idle timeout for them too.
            let written = if idle.is_zero() {
                stream.write_all(&output).await
            } else {
                tokio::time::timeout(idle, stream.write_all(&output))
                    .await
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
            };
            if let Err(e) = written {
                tracing::debug!(peer = %session.peer, error = %e, "write failed; closing");
                break;
            }
            output.clear();
        }
        if close {
            break;
        }
        // A buffer that grew for a large command shrinks back once it is consumed.
        if input.is_empty() && input.capacity() > 1024 * 1024 {
            input = BytesMut::with_capacity(16 * 1024);
        }
        waiting_since = tokio::time::Instant::now();
    }
    stream.shutdown();
}
