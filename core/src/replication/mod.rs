//! Quorum replication: the messages a coordinator and a key's replicas exchange, and the
//! coordinator's pure decisions (consistency levels, quorum tracking, the winning version,
//! repair targets). The node's runtime ([`crate::runtime::node`], feature `runtime`) drives
//! them over a transport and storage.
//!
//! Semantics (see `docs/CONSISTENCY.md`): a key lives on the first N members of its
//! preference list in the current ring; a write is stamped once by the coordinator's HLC and
//! succeeds only when W of those replicas acknowledged it (strict quorum: nothing else
//! counts); a read merges R answers by version (last writer wins); repair moves records with
//! their original versions.

pub mod error;
pub mod message;
pub mod quorum;

pub use error::{InvalidRequest, Operation, ReplicationError};
pub use message::{
    REPLICA_PROTOCOL_VERSION, Refusal, ReplicaMessage, SyncEntry, Write, WriteOutcome,
};
pub use quorum::{AckTracker, Answer, Consistency, Progress, ReadMerge, SetsTracker};
