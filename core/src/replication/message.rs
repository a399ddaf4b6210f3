//! The replica protocol's messages: what a coordinator asks a key's replicas, and their answers.
//!
//! The envelope (a layer above) carries them in its `Replica` frames. Byte strings and strings
//! decode through [`crate::codec`] and every list through [`crate::codec::bounded_vec`], so a
//! length claimed inside a frame is checked against the bytes present (and a bound) before
//! anything is allocated.
//!
//! Requests carry the sender's protocol version ([`REPLICA_PROTOCOL_VERSION`]); a replica that
//! does not speak it answers [`Refusal::UnsupportedVersion`] instead of guessing. Writes and
//! reads are lists, so a batch of keys for one replica is one message.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::codec::{serde_bytes, serde_str};
use crate::hlc::Version;
use crate::identity::NodeId;
use crate::record::Record;
use crate::storage::RangeDigest;

/// The replica protocol version this build speaks.
pub const REPLICA_PROTOCOL_VERSION: u16 = 1;

/// Most writes or keys in one request (and outcomes or records in one answer).
pub const MAX_BATCH: usize = 4096;

/// A request to a replica, or its answer.
///
/// Adding a variant at the end is compatible for peers that know it, and a peer that does not
/// reports a typed decode error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ReplicaMessage {
    /// Store each record under its key if it is newer than what the replica holds: a write, a
    /// batch of writes, or a repair (records keep the version they were written with).
    Apply {
        /// The sender's [`REPLICA_PROTOCOL_VERSION`].
        version: u16,
        /// The records, in order.
        #[serde(deserialize_with = "crate::codec::bounded_vec::<_, _, MAX_BATCH>")]
        writes: Vec<Write>,
    },
    /// The outcome of each write of an [`ReplicaMessage::Apply`], in its order.
    Applied {
        /// One per write.
        #[serde(deserialize_with = "crate::codec::bounded_vec::<_, _, MAX_BATCH>")]
        outcomes: Vec<WriteOutcome>,
    },
    /// Read the records stored under `keys`.
    Read {
        /// The sender's [`REPLICA_PROTOCOL_VERSION`].
        version: u16,
        /// The keys, in order.
        #[serde(deserialize_with = "crate::codec::bounded_vec::<_, _, MAX_BATCH>")]
        keys: Vec<Key>,
    },
    /// The answer to a [`ReplicaMessage::Read`]: one entry per key, in its order.
    Records {
        /// The stored record of each key (tombstones and expired values included), or `None`.
        #[serde(deserialize_with = "crate::codec::bounded_vec::<_, _, MAX_BATCH>")]
        records: Vec<Option<Record>>,
    },
    /// The request was refused as a whole; nothing was stored.
    Refused(Refusal),
    /// Anti-entropy: the sender applied these writes as a replica of keys it believes the
    /// receiver replicates too; the receiver answers [`ReplicaMessage::SyncWant`] with the
    /// ones it lacks (holds an older version of, or nothing), or refuses the whole offer
    /// ([`Refusal::OutOfRange`] if a key is not one it replicates, [`Refusal::Invalid`] for a
    /// bad key).
    SyncOffer {
        /// The sender's [`REPLICA_PROTOCOL_VERSION`].
        version: u16,
        /// `(key, version)` digests, at most [`MAX_BATCH`].
        #[serde(deserialize_with = "crate::codec::bounded_vec::<_, _, MAX_BATCH>")]
        entries: Vec<SyncEntry>,
    },
    /// The answer to a [`ReplicaMessage::SyncOffer`]: indices (into its entries, ascending)
    /// of the records the receiver lacks; the offerer sends them with an ordinary
    /// [`ReplicaMessage::Apply`].
    SyncWant {
        /// Indices into the offer's entries.
        #[serde(deserialize_with = "crate::codec::bounded_vec::<_, _, MAX_BATCH>")]
        wanted: Vec<u32>,
    },
    /// Merkle anti-entropy: the digests of these nodes of `level` of the receiver's tree
    /// (`healing::merkle`); answered with [`ReplicaMessage::MerkleDigests`], or refused as
    /// [`Refusal::Invalid`] past the tree's depth, its width or the request bound.
    MerkleNodes {
        /// The sender's [`REPLICA_PROTOCOL_VERSION`].
        version: u16,
        /// The level (0: the root).
        level: u8,
        /// Node indices on that level, ascending, at most [`MAX_BATCH`], as differences: the
        /// first index, then each one minus the one before ([`delta_encode`]), so that runs of
        /// siblings cost a byte each.
        #[serde(deserialize_with = "crate::codec::bounded_vec::<_, _, MAX_BATCH>")]
        deltas: Vec<u32>,
    },
    /// The answer to a [`ReplicaMessage::MerkleNodes`]: one digest per node, in its order.
    MerkleDigests {
        /// The digests.
        #[serde(deserialize_with = "crate::codec::bounded_vec::<_, _, MAX_BATCH>")]
        digests: Vec<RangeDigest>,
    },
    /// Merkle anti-entropy: the sender's digests of these leaves, over the records the two
    /// share and not past `cutoff_ms` (the agreed purge horizon); the receiver computes its
    /// own from storage and answers [`ReplicaMessage::MerkleDiffer`]. Leaves outside the
    /// ranges the two share are refused as [`Refusal::OutOfRange`], too many leaves or too
    /// wide a span as [`Refusal::Invalid`].
    MerkleCheck {
        /// The sender's [`REPLICA_PROTOCOL_VERSION`].
        version: u16,
        /// The sender's id: the digests cover the keys both replicate.
        from: NodeId,
        /// Records collectable at or before this time are left out.
        cutoff_ms: u64,
        /// Leaf indices, strictly ascending.
        #[serde(deserialize_with = "crate::codec::bounded_vec::<_, _, MAX_BATCH>")]
        leaves: Vec<u32>,
        /// One digest per leaf.
        #[serde(deserialize_with = "crate::codec::bounded_vec::<_, _, MAX_BATCH>")]
        digests: Vec<RangeDigest>,
    },
    /// The answer to a [`ReplicaMessage::MerkleCheck`]: the leaves whose digests differ.
    MerkleDiffer {
        /// Leaf indices, a subset of the check's.
        #[serde(deserialize_with = "crate::codec::bounded_vec::<_, _, MAX_BATCH>")]
        leaves: Vec<u32>,
    },
    /// A joining member pulls the records of a range it will own: the next page of `range`
    /// after `cursor`, at most `limit` records (capped at [`MAX_BATCH`]) and
    /// [`MAX_PULL_BYTES`] of keys and values. Answered with
    /// [`ReplicaMessage::PulledRecords`]. Records collectable at or before `cutoff_ms` (the
    /// puller's purge horizon) are left out.
    Pull {
        /// The sender's [`REPLICA_PROTOCOL_VERSION`].
        version: u16,
        /// The range.
        range: crate::hash::HashRange,
        /// Where the last page ended (`None`: from the start).
        cursor: Option<crate::storage::ScanCursor>,
        /// Most records wanted.
        limit: u32,
        /// Records collectable at or before this time are left out.
        cutoff_ms: u64,
    },
    /// The answer to a [`ReplicaMessage::Pull`]: records in `(position, key)` order, and where
    /// the next page starts (`None`: the range is done).
    PulledRecords {
        /// The records.
        #[serde(deserialize_with = "crate::codec::bounded_vec::<_, _, MAX_BATCH>")]
        records: Vec<Write>,
        /// The cursor to send next, if more remain.
        next: Option<crate::storage::ScanCursor>,
    },
}

/// Most bytes of keys and values one [`ReplicaMessage::PulledRecords`] carries (one record
/// larger than this goes alone).
pub const MAX_PULL_BYTES: usize = 4 * 1024 * 1024;

/// Ascending `indices` as [`ReplicaMessage::MerkleNodes`] carries them: the first, then the
/// differences.
pub fn delta_encode(indices: &[u32]) -> Vec<u32> {
    let mut prev = 0;
    indices
        .iter()
        .map(|&i| {
            let d = i.wrapping_sub(prev);
            prev = i;
            d
        })
        .collect()
}

/// The indices of [`delta_encode`]; `None` if they overflow a `u32`.
pub fn delta_decode(deltas: &[u32]) -> Option<Vec<u32>> {
    let mut at: u32 = 0;
    deltas
        .iter()
        .map(|&d| {
            at = at.checked_add(d)?;
            Some(at)
        })
        .collect()
}

/// One `(key, version)` digest of a [`ReplicaMessage::SyncOffer`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncEntry {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Bytes,
    /// The version the offerer holds.
    pub version: Version,
}

impl ReplicaMessage {
    /// A request to apply one record.
    pub fn apply_one(key: impl Into<Bytes>, record: Record) -> Self {
        ReplicaMessage::Apply {
            version: REPLICA_PROTOCOL_VERSION,
            writes: vec![Write {
                key: key.into(),
                record,
            }],
        }
    }

    /// A request to read one key.
    pub fn read_one(key: impl Into<Bytes>) -> Self {
        ReplicaMessage::Read {
            version: REPLICA_PROTOCOL_VERSION,
            keys: vec![Key(key.into())],
        }
    }
}

/// One record to store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Write {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Bytes,
    /// The record, with the version its coordinator stamped.
    pub record: Record,
}

/// A key of a [`ReplicaMessage::Read`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key(#[serde(with = "serde_bytes")] pub Bytes);

/// What a replica did with one write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum WriteOutcome {
    /// Stored (durable as the replica's backend promises).
    Applied,
    /// An equal or newer record is stored (and durable as promised) and was kept.
    Stale {
        /// Its version.
        current: Version,
    },
    /// Not stored.
    Refused(Refusal),
}

impl WriteOutcome {
    /// Whether the replica now holds this record or a newer one: an acknowledgement.
    pub fn is_ack(&self) -> bool {
        matches!(self, WriteOutcome::Applied | WriteOutcome::Stale { .. })
    }
}

/// Why a replica refused a write or a whole request. A refused write is not acknowledged:
/// nothing was stored, except after a storage failure in the middle of a batch, which may
/// have stored some of its writes (as any unacknowledged write may still land).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The record's version is further ahead of the replica's clock than its drift bound.
    #[error("version {ahead_ms} ms ahead of the replica's clock, beyond its drift bound")]
    ClockDrift {
        /// How far ahead, in milliseconds.
        ahead_ms: u64,
    },
    /// The replica's storage failed.
    #[error("storage failed: {reason}")]
    Storage {
        /// Whether trying again may succeed.
        retryable: bool,
        /// What the backend said.
        #[serde(with = "serde_str")]
        reason: String,
    },
    /// The request breaks a limit or a rule (an empty or oversized key or value, too many
    /// entries).
    #[error("invalid request: {reason}")]
    Invalid {
        /// Which rule.
        #[serde(with = "serde_str")]
        reason: String,
    },
    /// The request's protocol version is not one the replica speaks.
    #[error("replica protocol version {got} not supported (this replica speaks {supported})")]
    UnsupportedVersion {
        /// The version the request carried.
        got: u16,
        /// The version the replica speaks.
        supported: u16,
    },
    /// The request did not decode (a newer message kind, or damaged bytes).
    #[error("request did not decode: {reason}")]
    Undecodable {
        /// The decoder's error.
        #[serde(with = "serde_str")]
        reason: String,
    },
    /// The replica is shutting down and takes no new requests.
    #[error("replica shutting down")]
    ShuttingDown,
    /// An anti-entropy request named a key this replica does not replicate (by its ring).
    #[error("key at ring position {key_hash:#018x} is not replicated here")]
    OutOfRange {
        /// The key's ring position.
        key_hash: u64,
    },
    /// The replica is serving as many expensive healing requests (`MerkleCheck`, `Pull`,
    /// `SyncOffer`) as it allows at once, or its healing bandwidth is spent for now: nothing
    /// was done, and the same request may succeed later. Never an answer to `Apply` or
    /// `Read`.
    #[error("replica busy with other healing requests; try again later")]
    Busy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_indices_travel_as_differences() {
        let indices = [0, 1, 2, 64, 262_143];
        let deltas = delta_encode(&indices);
        assert_eq!(deltas, vec![0, 1, 1, 62, 262_079]);
        assert_eq!(delta_decode(&deltas), Some(indices.to_vec()));
        assert_eq!(delta_decode(&[u32::MAX, 1]), None, "overflow is refused");
    }
}
