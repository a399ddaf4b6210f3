//! A client connection's socket, read without the extra system call per request that
//! tokio's `TcpStream` makes.
//!
//! tokio forgets a socket's read readiness only when a read fails with `WouldBlock`, so a
//! connection that reads a request, answers it and reads again pays a second `recv` that
//! finds nothing, once per request (Redis reads once per readiness event). Here a read that
//! did not fill the space offered (the kernel had no more queued) clears the readiness
//! itself; tokio clears it only if no new event arrived since it was reported, so bytes that
//! land in between still wake the next wait.

use std::io::{self, Read, Write};
use std::net::Shutdown;

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Bytes asked of the kernel per read.
const READ_CHUNK: usize = 16 * 1024;

/// One client connection's socket.
pub(crate) struct ClientSocket {
    fd: AsyncFd<std::net::TcpStream>,
    /// Where a read lands before it is appended to the connection's input (a copy of a few
    /// bytes per request, against a system call).
    scratch: Box<[u8]>,
}

impl ClientSocket {
    /// Takes over an accepted connection.
    pub(crate) fn new(stream: tokio::net::TcpStream) -> io::Result<Self> {
        let stream = stream.into_std()?;
        stream.set_nonblocking(true)?;
        // `with_interest` is deprecated because an arbitrary `AsRawFd` may hand out a
        // descriptor it does not own or later changes; a `std::net::TcpStream` owns its
        // descriptor for its whole life, which is the condition the replacement (an `unsafe`
        // function, and this workspace forbids `unsafe`) asks its caller to uphold.
        #[allow(deprecated)]
        let fd = AsyncFd::with_interest(stream, Interest::READABLE | Interest::WRITABLE)?;
        Ok(ClientSocket {
            fd,
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
        })
    }

    /// Appends what the peer sent to `input`: the number of bytes, 0 at end of stream.
    /// Cancel-safe: nothing is read until the socket is ready, and then without waiting.
    pub(crate) async fn read_buf(&mut self, input: &mut BytesMut) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            let scratch = &mut self.scratch;
            match guard.try_io(|s| s.get_ref().read(scratch)) {
                Ok(Ok(n)) => {
                    if n > 0 && n < scratch.len() {
                        // A short read: the receive queue is empty now.
                        guard.clear_ready();
                    }
                    input.extend_from_slice(&scratch[..n]);
                    return Ok(n);
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                // WouldBlock: readiness cleared by `try_io`; wait for the next event.
                Err(_) => {}
            }
        }
    }

    /// Writes all of `data`.
    pub(crate) async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|s| s.get_ref().write(data)) {
                Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {}
            }
        }
        Ok(())
    }

    /// Closes the sending side (the peer reads end of stream after the last reply).
    pub(crate) fn shutdown(&self) {
        let _ = self.fd.get_ref().shutdown(Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (ClientSocket, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (server, _) = accepted.expect("accept");
        (
            ClientSocket::new(server).expect("socket"),
            client.expect("connect"),
        )
    }

    /// Bytes that arrive after a short read cleared the readiness still wake the next read,
    /// and every byte arrives once, in order.
    #[tokio::test]
    async fn a_short_read_never_loses_the_next_bytes() {
        let (mut socket, mut client) = pair().await;
        let mut input = BytesMut::new();
        for round in 0..200u32 {
            let message = format!("request {round}\r\n");
            client.write_all(message.as_bytes()).await.expect("send");
            let before = input.len();
            while input.len() < before + message.len() {
                let n = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    socket.read_buf(&mut input),
                )
                .await
                .expect("the read is woken")
                .expect("read");
                assert!(n > 0, "end of stream in round {round}");
            }
            assert_eq!(&input[before..], message.as_bytes());
            socket.write_all(b"+OK\r\n").await.expect("reply");
            let mut reply = [0; 5];
            client.read_exact(&mut reply).await.expect("reply read");
            assert_eq!(&reply, b"+OK\r\n");
        }
        drop(client);
        assert_eq!(socket.read_buf(&mut input).await.expect("eof"), 0);
    }

    /// A request larger than one read arrives whole, over several reads.
    #[tokio::test]
    async fn a_large_request_arrives_over_several_reads() {
        let (mut socket, mut client) = pair().await;
        let big = vec![7u8; 5 * READ_CHUNK + 3];
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("send");
            client
        });
        let mut input = BytesMut::new();
        while input.len() < big.len() {
            tokio::time::timeout(
                std::time::Duration::from_secs(10),
                socket.read_buf(&mut input),
            )
            .await
            .expect("every queued byte is read without a new event")
            .expect("read");
        }
        assert_eq!(&input[..], &big[..]);
        let mut client = writer.await.expect("writer");
        let large_reply = vec![9u8; 4 * 1024 * 1024];
        let (written, read) = tokio::join!(socket.write_all(&large_reply), async {
            let mut got = vec![0; large_reply.len()];
            client.read_exact(&mut got).await.map(|_| got)
        });
        written.expect("write");
        assert_eq!(read.expect("read"), large_reply);
    }
}
