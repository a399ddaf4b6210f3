//! Settings of the membership protocol and their presets.

use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

/// How a [`Membership`](super::Membership) probes, gossips and decides.
///
/// Every node of a cluster should use the same values. Start from [`MembershipConfig::lan`],
/// [`MembershipConfig::wan`] or [`MembershipConfig::local`] and change single fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MembershipConfig {
    /// Time between two probes of this node (one protocol period), before awareness scaling.
    pub probe_interval: Duration,
    /// How long a direct ping waits for its ack before indirect probes are sent, before
    /// awareness scaling. Must be shorter than `probe_interval`.
    pub probe_timeout: Duration,
    /// Members asked to probe a target indirectly when the direct ping got no ack (k).
    pub indirect_checks: usize,
    /// The minimum suspicion timeout is
    /// `suspicion_mult * max(1, log10(n)) * probe_interval` for `n` live members.
    pub suspicion_mult: NonZeroU32,
    /// With Lifeguard, a fresh suspicion starts at `suspicion_max_timeout_mult` times the
    /// minimum and shrinks towards it as independent confirmations arrive.
    pub suspicion_max_timeout_mult: NonZeroU32,
    /// Independent confirmations (suspicions from other members) after which the suspicion
    /// timeout has shrunk to its minimum (Lifeguard's K).
    pub suspicion_confirmations: u32,
    /// An update is piggybacked `retransmit_mult * ceil(log10(n + 1))` times.
    pub retransmit_mult: NonZeroU32,
    /// Time between two gossip rounds (sent only when there is something to disseminate).
    pub gossip_interval: Duration,
    /// Members each gossip round sends to.
    pub gossip_nodes: NonZeroUsize,
    /// Most updates piggybacked on one message (keeps messages near one UDP datagram), and most
    /// applied from one received message (the rest are dropped and counted). Capped at
    /// [`MAX_UPDATES_PER_MESSAGE`](super::message::MAX_UPDATES_PER_MESSAGE).
    pub max_updates_per_message: NonZeroUsize,
    /// Time between two periodic full-state exchanges with a random member, for clusters of
    /// up to 32 members; larger clusters stretch it by `log2(n / 32) + 1`, as memberlist does.
    pub push_pull_interval: Duration,
    /// Time between join attempts to the seeds while no seed has answered.
    pub join_retry_interval: Duration,
    /// Time between two re-announcements (a full-state exchange) to a seed that is not known
    /// alive or to a member believed dead; this heals partitions without an operator.
    pub reannounce_interval: Duration,
    /// How long dead and left members are remembered before they are forgotten.
    pub reap_after: Duration,
    /// Upper bound of the local health multiplier (Lifeguard's awareness): probe interval and
    /// timeout are stretched up to this factor while this node's own probes keep failing.
    pub awareness_max_multiplier: NonZeroU32,
    /// Lifeguard on (awareness, nacks, dynamic suspicion timeout, buddy system, and this
    /// project's addition: every other probe goes to the ring successor) or off (plain SWIM
    /// with a fixed suspicion timeout equal to the minimum and random round-robin probes).
    pub lifeguard: bool,
    /// Most members this node knows, itself included. News of a new member past it is
    /// refused and counted ([`MembershipStats::refused_members`]) unless a dead or left member
    /// can be forgotten early to make room. Also bounds the memory of forgotten members.
    ///
    /// [`MembershipStats::refused_members`]: super::MembershipStats::refused_members
    pub max_members: NonZeroUsize,
    /// Largest encoded membership message this node builds, in bytes: a full state that does
    /// not fit is split into several push-pull messages. The driver lowers it to the
    /// transport's `max_frame_len` if it is larger ([`Membership::limit_message_len`]).
    ///
    /// [`Membership::limit_message_len`]: super::Membership::limit_message_len
    pub max_message_len: NonZeroUsize,
    /// Ping-reqs this node relays per second at most (a token bucket holding one second's
    /// worth); those past it are refused and counted
    /// ([`MembershipStats::refused_relays`]).
    ///
    /// [`MembershipStats::refused_relays`]: super::MembershipStats::refused_relays
    pub max_relays_per_second: NonZeroU32,
    /// Ping-reqs relayed per second for any one requester at most (a token bucket per
    /// requester), within [`MembershipConfig::max_relays_per_second`]: one member cannot use
    /// up the node's relay budget. Those past it are refused and counted
    /// ([`MembershipStats::rate_limited_relays`]).
    ///
    /// [`MembershipStats::rate_limited_relays`]: super::MembershipStats::rate_limited_relays
    pub max_relays_per_peer_per_second: NonZeroU32,
    /// Piggybacked updates (on pings, acks, ping-reqs and gossip) applied per second from any
    /// one sender at most (a token bucket per sender holding one second's worth); the rest
    /// of a message past it is dropped and counted
    /// ([`MembershipStats::rate_limited_updates`]). Full-state exchanges are bounded by
    /// [`MembershipConfig::max_members`] instead.
    ///
    /// [`MembershipStats::rate_limited_updates`]: super::MembershipStats::rate_limited_updates
    pub max_updates_per_peer_per_second: NonZeroU32,
    /// Push-pull messages (full-state exchanges: join requests, periodic and re-announce
    /// exchanges and their answers; every part of a full state split over several messages
    /// counts) accepted per second from any one sender at most (a token bucket per sender
    /// holding one second's worth). One past it is neither merged nor answered, and is
    /// counted ([`MembershipStats::rate_limited_push_pulls`]): each request makes this node
    /// send its whole state back, so an admitted member that floods them would otherwise
    /// turn every small message into up to [`MembershipConfig::max_members`] records of
    /// work and traffic. A well-behaved peer sends a few per second at most (a join retry
    /// per [`MembershipConfig::join_retry_interval`], a full state of
    /// [`DEFAULT_MAX_MEMBERS`] is five parts).
    ///
    /// [`MembershipStats::rate_limited_push_pulls`]: super::MembershipStats::rate_limited_push_pulls
    pub max_push_pulls_per_peer_per_second: NonZeroU32,
}

/// [`MembershipConfig::max_members`] in every preset: four times the largest cluster the
/// simulator pins (1,000 members). A full state of that many members with 20-byte addresses
/// is about 300 KB, sent as five push-pull messages of 64 KiB.
pub const DEFAULT_MAX_MEMBERS: usize = 4096;

const fn nz32(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => NonZeroU32::MIN,
    }
}

const fn nzu(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(n) => n,
        None => NonZeroUsize::MIN,
    }
}

impl MembershipConfig {
    /// A local network: memberlist's `DefaultLANConfig` values (probe every 1 s, 500 ms probe
    /// timeout, 3 indirect checks, suspicion max multiplier 6, retransmit multiplier 4, gossip
    /// to 3 members every 200 ms, push-pull every 30 s, awareness up to 8) except the
    /// suspicion multiplier, which is 2 instead of memberlist's 4, and Lifeguard's K = 3
    /// confirmations. See `docs/ARCHITECTURE.md`: memberlist's 4 gives a minimum suspicion
    /// timeout of 12 s at 1,000 members, too slow for detection within 10 s; 1 gives 1 s at 10
    /// members, shorter than a 2 s stop-the-world pause (a false death); 2 gives 2 s at 10,
    /// 4 s at 100 and 6 s at 1,000 members and meets both targets in the simulator.
    pub const fn lan() -> Self {
        MembershipConfig {
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(500),
            indirect_checks: 3,
            suspicion_mult: nz32(2),
            suspicion_max_timeout_mult: nz32(6),
            suspicion_confirmations: 3,
            retransmit_mult: nz32(4),
            gossip_interval: Duration::from_millis(200),
            gossip_nodes: nzu(3),
            max_updates_per_message: nzu(16),
            push_pull_interval: Duration::from_secs(30),
            join_retry_interval: Duration::from_secs(1),
            reannounce_interval: Duration::from_secs(5),
            reap_after: Duration::from_secs(60),
            awareness_max_multiplier: nz32(8),
            lifeguard: true,
            max_members: nzu(DEFAULT_MAX_MEMBERS),
            max_message_len: nzu(64 * 1024),
            max_relays_per_second: nz32(64),
            max_relays_per_peer_per_second: nz32(16),
            max_updates_per_peer_per_second: nz32(1024),
            max_push_pulls_per_peer_per_second: nz32(16),
        }
    }

    /// A wide-area network: memberlist's `DefaultWANConfig` timings (probe every 5 s, 3 s
    /// probe timeout, gossip to 4 members every 500 ms, push-pull every 60 s).
    pub const fn wan() -> Self {
        MembershipConfig {
            probe_interval: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(3),
            suspicion_mult: nz32(2),
            gossip_interval: Duration::from_millis(500),
            gossip_nodes: nzu(4),
            push_pull_interval: Duration::from_secs(60),
            join_retry_interval: Duration::from_secs(5),
            reannounce_interval: Duration::from_secs(30),
            reap_after: Duration::from_secs(300),
            ..Self::lan()
        }
    }

    /// One machine or a test: everything five times faster than [`MembershipConfig::lan`]
    /// (probe every 200 ms, 100 ms timeout, gossip every 40 ms, push-pull every 6 s).
    pub const fn local() -> Self {
        MembershipConfig {
            probe_interval: Duration::from_millis(200),
            probe_timeout: Duration::from_millis(100),
            gossip_interval: Duration::from_millis(40),
            push_pull_interval: Duration::from_secs(6),
            join_retry_interval: Duration::from_millis(200),
            reannounce_interval: Duration::from_secs(1),
            reap_after: Duration::from_secs(12),
            max_relays_per_second: nz32(320),
            max_relays_per_peer_per_second: nz32(80),
            max_updates_per_peer_per_second: nz32(5120),
            max_push_pulls_per_peer_per_second: nz32(80),
            ..Self::lan()
        }
    }

    /// This configuration with Lifeguard switched on or off.
    pub const fn with_lifeguard(mut self, on: bool) -> Self {
        self.lifeguard = on;
        self
    }
}

impl Default for MembershipConfig {
    /// [`MembershipConfig::lan`].
    fn default() -> Self {
        Self::lan()
    }
}
