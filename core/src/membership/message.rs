//! What membership nodes say to each other, and the member records they say it about.
//!
//! The envelope (a layer above) carries them in its `Swim` frames, on the same transport and
//! frame format as the data plane. Every string goes through the bounded decode path.

use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};

use crate::identity::Address;
use crate::identity::NodeId;

/// Most updates one decoded message may carry; a message claiming more does not decode.
/// Senders put at most [`MembershipConfig::max_updates_per_message`] on a message (capped at
/// this), and receivers apply at most that many.
///
/// [`MembershipConfig::max_updates_per_message`]: super::MembershipConfig::max_updates_per_message
pub const MAX_UPDATES_PER_MESSAGE: usize = 256;

/// Most member records one decoded push-pull message may carry; a message claiming more does
/// not decode. A larger state travels as several push-pull messages.
pub const MAX_MEMBERS_PER_MESSAGE: usize = 4096;

/// Longest member address accepted from a peer, in bytes (the transports' hello carries at
/// most as much: [`crate::transport::MAX_HELLO_ADDR_LEN`]).
pub const MAX_ADDR_LEN: usize = crate::transport::MAX_HELLO_ADDR_LEN;

/// Largest ring weight accepted from a peer: a member of this weight places
/// `256 * vnodes_per_weight` tokens on the ring (524,288 with the default 2,048).
pub const MAX_WEIGHT: u32 = 256;

/// Generations from here up are refused in every update as forged: no restart counter or
/// clock-derived generation gets there, and a claim about a member at the top of the range
/// would leave it no generation to refute from (a forged claim about this node at
/// `u64::MAX - 1` would otherwise push it to `u64::MAX` in one step, after which it could
/// never refute again).
pub const MAX_GENERATION: u64 = 1 << 62;

/// What a member publishes about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberMeta {
    /// Where the member's membership endpoint is reached.
    pub addr: Address,
    /// Relative ring weight.
    pub weight: NonZeroU32,
    /// The member's Ed25519 public key, carried as opaque metadata (not checked here).
    pub public_key: [u8; 32],
    /// The member is joining: it is still pulling the records of the ranges it will own from
    /// their current replicas. Writes reach it, reads do not, until it publishes this as
    /// `false` (the node layer's join handoff; membership itself treats it as opaque).
    pub joining: bool,
}

/// Why a peer's [`MemberMeta`] was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    /// The address is empty.
    #[error("empty address")]
    EmptyAddress,
    /// The address is longer than [`MAX_ADDR_LEN`].
    #[error("address of {0} bytes, longer than {MAX_ADDR_LEN}")]
    AddressTooLong(usize),
    /// The address holds a byte that is not printable ASCII (space and controls included).
    #[error("address holds a byte that is not printable ASCII")]
    AddressNotPrintable,
    /// The address is not `host:port` (a port from 1 to 65535).
    #[error("address is not host:port with a port from 1 to 65535")]
    NotHostPort,
    /// The weight is above [`MAX_WEIGHT`].
    #[error("weight {0} above {MAX_WEIGHT}")]
    WeightTooLarge(u32),
}

impl MemberMeta {
    /// Checks metadata that came from a peer: an address of 1 to [`MAX_ADDR_LEN`] printable
    /// ASCII bytes in `host:port` form (`10.0.0.1:7946`, `db-3.example:7946`, `[::1]:7946`;
    /// a port from 1 to 65535; the simulator's and in-process tests' names follow it too,
    /// `n3.g1:1`) and a weight of at most [`MAX_WEIGHT`]. The rest is fixed-size, so the
    /// address bounds the whole record.
    pub fn validate(&self) -> Result<(), MetaError> {
        let addr = self.addr.as_str().as_bytes();
        if addr.is_empty() {
            return Err(MetaError::EmptyAddress);
        }
        if addr.len() > MAX_ADDR_LEN {
            return Err(MetaError::AddressTooLong(addr.len()));
        }
        if !addr.iter().all(|b| b.is_ascii_graphic()) {
            return Err(MetaError::AddressNotPrintable);
        }
        if !is_host_port(self.addr.as_str()) {
            return Err(MetaError::NotHostPort);
        }
        if self.weight.get() > MAX_WEIGHT {
            return Err(MetaError::WeightTooLarge(self.weight.get()));
        }
        Ok(())
    }

    /// Metadata with weight 1 and an all-zero key.
    pub fn new(addr: impl Into<Address>) -> Self {
        MemberMeta {
            addr: addr.into(),
            weight: NonZeroU32::MIN,
            public_key: [0; 32],
            joining: false,
        }
    }
}

/// Whether `addr` is `host:port`: a non-empty host (a name or IPv4 address without `:`, or an
/// IPv6 address in brackets) and a port from 1 to 65535.
fn is_host_port(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0) && !port.starts_with('+');
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.contains(':') && v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => !host.is_empty() && !host.contains(':') && !host.contains(['[', ']']),
    };
    port_ok && host_ok
}

/// A member's liveness as one node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// A probe failed; it is declared dead unless it refutes in time.
    Suspect,
    /// Declared failed.
    Dead,
    /// Left the cluster on purpose.
    Left,
}

/// The version of a member's state: a restarted node bumps `generation` (so its new life
/// supersedes everything said about the old one); within a life the node alone bumps
/// `incarnation` to refute suspicions. Compared lexicographically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Life {
    /// Bumped on every restart of the node (for example its start time in milliseconds).
    pub generation: u64,
    /// Bumped by the node itself to refute a suspicion.
    pub incarnation: u64,
}

/// A member as one node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its node id.
    pub id: NodeId,
    /// Which life of the node, and which incarnation in it.
    pub life: Life,
    /// Alive, suspect, dead or left.
    pub state: MemberState,
    /// Address, weight, key.
    pub meta: MemberMeta,
}

/// One piece of disseminated news about a member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Update {
    /// The member is alive in this life and incarnation, with this metadata.
    Alive {
        /// Its node id.
        id: NodeId,
        /// Its life.
        life: Life,
        /// Its metadata.
        meta: MemberMeta,
    },
    /// `from` suspects the member.
    Suspect {
        /// The suspected member.
        id: NodeId,
        /// The life suspected.
        life: Life,
        /// Who suspects it.
        from: NodeId,
    },
    /// `from` declared the member dead.
    Dead {
        /// The dead member.
        id: NodeId,
        /// The life declared dead.
        life: Life,
        /// Who declared it.
        from: NodeId,
    },
    /// The member left on purpose.
    Left {
        /// The member.
        id: NodeId,
        /// The life that left.
        life: Life,
    },
}

impl Update {
    /// The member the update is about.
    pub fn id(&self) -> NodeId {
        match self {
            Update::Alive { id, .. }
            | Update::Suspect { id, .. }
            | Update::Dead { id, .. }
            | Update::Left { id, .. } => *id,
        }
    }

    /// The life of the member the update is about.
    pub fn life(&self) -> Life {
        match self {
            Update::Alive { life, .. }
            | Update::Suspect { life, .. }
            | Update::Dead { life, .. }
            | Update::Left { life, .. } => *life,
        }
    }
}

/// A membership protocol message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SwimMessage {
    /// Are you alive? `target` is the node the sender means to reach.
    Ping {
        /// Matches the ack.
        seq: u32,
        /// The sender.
        from: NodeId,
        /// The node probed.
        target: NodeId,
        /// Piggybacked news.
        #[serde(deserialize_with = "crate::codec::bounded_vec::<_, _, MAX_UPDATES_PER_MESSAGE>")]
        updates: Vec<Update>,
    },
    /// `from` is alive: the answer to the ping with `seq` (possibly relayed by a helper).
    Ack {
        /// The ping's sequence number.
        seq: u32,
        /// The node that answered the ping.
        from: NodeId,
        /// Piggybacked news.
        #[serde(deserialize_with = "crate::codec::bounded_vec::<_, _, MAX_UPDATES_PER_MESSAGE>")]
        updates: Vec<Update>,
    },
    /// Please probe `target` at `target_addr` for me and relay its ack.
    PingReq {
        /// The requester's sequence number, echoed in the relayed ack or nack.
        seq: u32,
        /// The requester.
        from: NodeId,
        /// The node to probe.
        target: NodeId,
        /// Where it is.
        target_addr: Address,
        /// Piggybacked news.
        #[serde(deserialize_with = "crate::codec::bounded_vec::<_, _, MAX_UPDATES_PER_MESSAGE>")]
        updates: Vec<Update>,
    },
    /// The helper asked with `seq` got no ack from the target in time (Lifeguard).
    Nack {
        /// The requester's sequence number.
        seq: u32,
        /// The helper.
        from: NodeId,
    },
    /// News only.
    Gossip {
        /// The sender.
        from: NodeId,
        /// The news.
        #[serde(deserialize_with = "crate::codec::bounded_vec::<_, _, MAX_UPDATES_PER_MESSAGE>")]
        updates: Vec<Update>,
    },
    /// A full-state exchange, split into parts numbered from 0 when the state is too large
    /// for one message; part 0 of a message with `reply == false` is answered with the
    /// receiver's state.
    PushPull {
        /// The sender.
        from: NodeId,
        /// Sent while joining.
        join: bool,
        /// This is the answer to a push-pull.
        reply: bool,
        /// Which part of the sender's state this is (0 for the first or only one).
        part: u32,
        /// Members the sender knows, itself included in part 0.
        #[serde(deserialize_with = "crate::codec::bounded_vec::<_, _, MAX_MEMBERS_PER_MESSAGE>")]
        members: Vec<Member>,
    },
}
