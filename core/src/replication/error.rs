//! What a coordinated request can come to, besides success. Each variant says what happened to
//! state: nothing sent, refused, or sent with an unknown outcome.

use std::time::Duration;

use super::message::Refusal;
use crate::identity::NodeId;

/// A request that breaks a rule; nothing was sent or stored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidRequest {
    /// Keys are at least one byte.
    #[error("empty key")]
    EmptyKey,
    /// The key is longer than the configured maximum.
    #[error("key of {len} bytes, longer than the maximum of {max}")]
    KeyTooLong {
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The value is larger than the configured maximum.
    #[error("value of {len} bytes, larger than the maximum of {max}")]
    ValueTooLarge {
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A consistency count above the replication factor can never be met.
    #[error("consistency of {requested} replicas, but keys have only {replicas}")]
    ConsistencyAboveReplicas {
        /// The count asked for.
        requested: usize,
        /// The replication factor N.
        replicas: usize,
    },
    /// A zero timeout could only ever time out.
    #[error("zero timeout")]
    ZeroTimeout,
    /// The TTL is zero, or too large for an expiry time in milliseconds.
    #[error("TTL of {0:?} is zero or overflows the expiry time")]
    BadTtl(Duration),
    /// The batch holds more entries than one request may.
    #[error("batch of {len} entries, more than the maximum of {max}")]
    BatchTooLarge {
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
}

/// Reads or writes, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// A read.
    Read,
    /// A write (or delete).
    Write,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operation::Read => "read",
            Operation::Write => "write",
        })
    }
}

/// Why a coordinated read or write did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicationError {
    /// The request breaks a rule; nothing was sent or stored.
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    /// Fewer of the key's replicas are believed alive (alive or suspect) than required;
    /// nothing was sent.
    #[error("unavailable: {alive} of {required} required replicas reachable; nothing was sent")]
    Unavailable {
        /// Replicas required.
        required: usize,
        /// Replicas believed alive.
        alive: usize,
    },
    /// The deadline passed with fewer answers than required. A write may still be applied on
    /// some replicas (it was sent): its outcome is indeterminate.
    #[error(
        "timeout: {acks} of {required} required replicas answered the {op} within {after:?}{}",
        if *op == Operation::Write { "; the write may have been applied" } else { "" }
    )]
    Timeout {
        /// Read or write.
        op: Operation,
        /// Acknowledgements (or answers) received in time.
        acks: usize,
        /// Required.
        required: usize,
        /// The timeout.
        after: Duration,
    },
    /// Enough replicas refused or failed that the required number can no longer answer. A
    /// write may still have been applied on the replicas that acknowledged or failed: its
    /// outcome is indeterminate, but it is not acknowledged.
    #[error(
        "{op} failed: {acks} of {required} required replicas {}, {} refused{}, {unreachable} unreachable or failed{}",
        if *op == Operation::Write { "acknowledged" } else { "answered" },
        refusals.len(),
        refusals.first().map(|(n, r)| format!(" ({n:?}: {r})")).unwrap_or_default(),
        if *op == Operation::Write { "; the write may have been applied on some replicas" } else { "" }
    )]
    Failed {
        /// Read or write.
        op: Operation,
        /// Acknowledgements received.
        acks: usize,
        /// Required.
        required: usize,
        /// Who refused and why.
        refusals: Vec<(NodeId, Refusal)>,
        /// Replicas that could not be reached or gave no usable answer (outcome unknown).
        unreachable: usize,
    },
    /// The node is shutting down and takes no new requests; nothing was sent.
    #[error("node shutting down; nothing was sent")]
    ShuttingDown,
}

impl ReplicationError {
    /// Whether a write that failed this way may nevertheless have been stored somewhere (the
    /// request was sent): retry it with the same value if it must land.
    pub fn is_indeterminate(&self) -> bool {
        matches!(
            self,
            ReplicationError::Timeout {
                op: Operation::Write,
                ..
            } | ReplicationError::Failed {
                op: Operation::Write,
                ..
            }
        )
    }
}
