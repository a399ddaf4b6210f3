//! The replica protocol's messages: what a coordinator asks a key's replicas, and their answers.
//!
//! The envelope (a layer above) carries them in its `Replica` frames. Byte strings and strings
//! decode through [`crate::codec`], so a length claimed inside a frame is checked against the
//! bytes present before anything is allocated.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::codec::{serde_bytes, serde_str};
use crate::hlc::Version;
use crate::record::Record;

/// A request to a replica, or its answer.
///
/// Adding a variant at the end is compatible for peers that know it, and a peer that does not
/// reports a typed decode error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ReplicaMessage {
    /// Store `record` under `key` if it is newer than what the replica holds.
    Put {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Bytes,
        /// The record to apply.
        record: Record,
    },
    /// The outcome of a [`ReplicaMessage::Put`].
    PutReply {
        /// Whether the record was stored.
        applied: bool,
        /// The version the replica holds afterwards.
        current: Version,
    },
    /// Read the record stored under `key`.
    Get {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Bytes,
    },
    /// The outcome of a [`ReplicaMessage::Get`].
    GetReply {
        /// The stored record, tombstones included.
        record: Option<Record>,
    },
    /// The request could not be served.
    Error {
        /// Why, for logs.
        #[serde(with = "serde_str")]
        reason: String,
    },
}
