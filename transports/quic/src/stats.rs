//! The transport's counters and connection figures.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chorus_core::identity::Address;

use crate::QuicTransport;
use crate::io_task::lock;

/// Counters of a [`QuicTransport`]. See [`QuicTransport::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuicStats {
    /// Connections this transport dialled successfully.
    pub dialed: u64,
    /// Dials that failed or timed out (an untrusted certificate included).
    pub dial_failures: u64,
    /// Connections accepted from peers.
    pub accepted: u64,
    /// Incoming handshakes that failed (an untrusted certificate included).
    pub handshake_failures: u64,
    /// Authenticated connections refused because the address announced in the hello (or the
    /// dialled address) belongs to a live member with another key (keyring mode).
    pub address_refusals: u64,
    /// Connections closed because the peer's key was removed from the keyring.
    pub revoked_closed: u64,
    /// Connections closed because of a bad hello (none within
    /// [`QuicConfig::handshake_timeout`](crate::QuicConfig::handshake_timeout) included) or a
    /// stream that was not whole, valid frames.
    pub rejected_connections: u64,
    /// Incoming connections refused before their handshake:
    /// [`QuicConfig::max_inbound_connections`](crate::QuicConfig::max_inbound_connections) were
    /// open, or [`QuicConfig::max_handshakes`](crate::QuicConfig::max_handshakes) in progress.
    /// Counted per Initial packet refused: a client that retransmits its Initial before the
    /// refusal reaches it is counted again.
    pub refused_connections: u64,
    /// Frames written to streams.
    pub frames_sent: u64,
    /// Streams sent (`frames_sent / streams_sent` is the mean batch).
    pub streams_sent: u64,
    /// Frames received and handed to `recv`, those that came as datagrams included.
    pub frames_received: u64,
    /// Bytes of received frames waiting for `recv` now (at most
    /// [`QuicConfig::recv_bytes`](crate::QuicConfig::recv_bytes)).
    pub recv_queue_bytes: u64,
    /// Accepted frames that were never written: queued when a dial failed, in a batch whose
    /// stream failed, or still queued when the connection or the transport went away.
    pub frames_dropped: u64,
    /// Frames sent as datagrams (by `send_unreliable`).
    pub datagrams_sent: u64,
    /// Datagrams received and handed to `recv`.
    pub datagrams_received: u64,
    /// Datagrams dropped on arrival because the queue for `recv` was full.
    pub datagrams_dropped: u64,
    /// Datagrams dropped because they were not exactly one frame (a peer's bug).
    pub datagrams_rejected: u64,
    /// Futures of the transport's I/O task that panicked (each was dropped and logged; a
    /// non-zero count is a bug).
    pub task_panics: u64,
}

/// One live connection as QUIC sees it. See [`QuicTransport::connections`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ConnectionInfo {
    /// The peer's listen address (dialled, or announced by its hello).
    pub peer: Address,
    /// The UDP address packets go to.
    pub remote: SocketAddr,
    /// The smoothed round-trip time.
    pub rtt: Duration,
    /// The largest UDP payload in use, as found by path MTU discovery.
    pub mtu: u16,
    /// The congestion window, in bytes.
    pub congestion_window: u64,
    /// Packets sent on the connection.
    pub sent_packets: u64,
    /// Packets declared lost (and resent).
    pub lost_packets: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) dialed: AtomicU64,
    pub(crate) dial_failures: AtomicU64,
    pub(crate) accepted: AtomicU64,
    pub(crate) handshake_failures: AtomicU64,
    pub(crate) rejected_connections: AtomicU64,
    pub(crate) address_refusals: AtomicU64,
    pub(crate) revoked_closed: AtomicU64,
    pub(crate) refused_connections: AtomicU64,
    pub(crate) frames_sent: AtomicU64,
    pub(crate) streams_sent: AtomicU64,
    pub(crate) frames_received: AtomicU64,
    pub(crate) frames_dropped: AtomicU64,
    pub(crate) datagrams_sent: AtomicU64,
    pub(crate) datagrams_received: AtomicU64,
    pub(crate) datagrams_dropped: AtomicU64,
    pub(crate) datagrams_rejected: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl QuicTransport {
    /// A snapshot of the counters.
    pub fn stats(&self) -> QuicStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        QuicStats {
            dialed: get(&c.dialed),
            dial_failures: get(&c.dial_failures),
            accepted: get(&c.accepted),
            handshake_failures: get(&c.handshake_failures),
            rejected_connections: get(&c.rejected_connections),
            address_refusals: get(&c.address_refusals),
            revoked_closed: get(&c.revoked_closed),
            refused_connections: get(&c.refused_connections),
            frames_sent: get(&c.frames_sent),
            streams_sent: get(&c.streams_sent),
            frames_received: get(&c.frames_received),
            recv_queue_bytes: self.inner.recv.queued_bytes() as u64,
            frames_dropped: get(&c.frames_dropped),
            datagrams_sent: get(&c.datagrams_sent),
            datagrams_received: get(&c.datagrams_received),
            datagrams_dropped: get(&c.datagrams_dropped),
            datagrams_rejected: get(&c.datagrams_rejected),
            task_panics: self.inner.io.panicked(),
        }
    }

    /// Every live connection with its path figures, sorted by peer.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let connections = lock(&self.inner.connections);
        let mut infos: Vec<ConnectionInfo> = connections
            .values()
            .map(|(peer, conn)| {
                let path = conn.stats().path;
                ConnectionInfo {
                    peer: peer.clone(),
                    remote: conn.remote_address(),
                    rtt: path.rtt,
                    mtu: path.current_mtu,
                    congestion_window: path.cwnd,
                    sent_packets: path.sent_packets,
                    lost_packets: path.lost_packets,
                }
            })
            .collect();
        infos.sort_by(|a, b| a.peer.cmp(&b.peer));
        infos
    }
}
