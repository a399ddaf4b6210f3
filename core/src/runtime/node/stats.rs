//! The node's counters.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Counters of a running node, since it started.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct NodeStats {
            $($(#[$doc])* pub $name: u64,)*
        }

        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $(pub(crate) $name: AtomicU64,)*
        }

        impl Counters {
            pub(crate) fn snapshot(&self) -> NodeStats {
                NodeStats {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters! {
    /// Keys written (puts and deletes) as coordinator, successfully.
    writes,
    /// Keys read as coordinator, successfully.
    reads,
    /// Reads at `One` served from local storage without a message.
    local_reads,
    /// Coordinated keys that failed as unavailable (nothing sent).
    unavailable,
    /// Coordinated keys whose deadline passed short of the required answers.
    timeouts,
    /// Coordinated keys that failed because too many replicas refused.
    failed,
    /// Requests refused as invalid before anything was sent.
    invalid_requests,
    /// Requests sent to other replicas as coordinator (one per replica per batch), repairs
    /// included.
    replica_requests_sent,
    /// Replica answers that arrived after their request was decided (still processed).
    late_answers,
    /// Decided requests whose remaining answers (and read repairs) the node still works
    /// on, queued or running in the deferred-work task (a gauge, not a counter; at most
    /// 16,384).
    deferred_pending,
    /// Decided requests whose remaining answers were not waited for because 16,384 were
    /// already pending (an overloaded node): a write's replicas that had not answered get
    /// hints at once, a read's late answers and its read repair are skipped.
    deferred_shed,
    /// Records sent to stale replicas by read repair.
    read_repairs,
    /// Read repairs that a replica did not acknowledge.
    read_repair_failures,
    /// Writes this node applied as a replica (from peers or itself).
    replica_applied,
    /// Writes this node kept an equal or newer record for, as a replica.
    replica_stale,
    /// Writes refused as a replica because their version was beyond the drift bound.
    drift_refusals,
    /// Writes or requests refused as a replica for breaking a limit.
    replica_invalid,
    /// Writes refused as a replica because storage failed.
    storage_failures,
    /// Replica requests that did not decode or spoke another protocol version (answered with
    /// an error).
    bad_replica_requests,
    /// Answers to replica requests that could not be sent (the coordinator's queue was full,
    /// or it was unreachable): the coordinator sees a timeout for that replica.
    replies_not_sent,
    /// Tombstones and expired values removed by the purge.
    purged,
    /// Hints kept for replicas that did not acknowledge a write (hinted handoff).
    hints_stored,
    /// Hints a replica acknowledged on replay.
    hints_delivered,
    /// Hints kept now, not yet delivered or dropped (a gauge, not a counter).
    hints_pending,
    /// Hints dropped because their replica's share (count or bytes) was full.
    hints_dropped_full,
    /// Hints dropped because the queue to the hint task was full.
    hints_dropped_overload,
    /// Hints dropped past the hint window, undelivered.
    hints_dropped_expired,
    /// Hints dropped because the replica refused them for good, or because a stored hint did
    /// not decode when restored.
    hints_dropped_rejected,
    /// Hint deliveries that failed or left hints to retry (each backs the replica off).
    hint_delivery_failures,
    /// Hints kept in memory only because storing them failed (lost if the node restarts
    /// before delivering them).
    hint_store_failures,
    /// Anti-entropy offers sent (`SyncOffer`, one per batch of digests).
    sync_offers,
    /// Records sent to a co-replica that lacked them, after an anti-entropy offer.
    sync_repairs,
    /// Times a co-replica's cursor was overtaken in the applied-writes log (each asks for a
    /// Merkle exchange with it).
    sync_overtaken,
    /// Anti-entropy rounds started before their tick because a quarter of the log was written
    /// since the last one began.
    sync_early_rounds,
    /// Anti-entropy offers refused as a replica (a bad key, or a key not replicated here).
    sync_refused,
    /// Merkle exchanges the applied-writes log asked for (a co-replica overtaken, first seen
    /// or in a new life).
    merkle_requested,
    /// Merkle exchanges asked for because a ring change made a member a new co-replica of
    /// ranges this node held (a member died, left or joined): one per such member and change.
    merkle_ring_changes,
    /// Merkle exchanges this node started that completed.
    merkle_exchanges,
    /// Merkle exchanges that failed part-way (a peer unreachable or refusing, an answer of the
    /// wrong shape, a record not acknowledged); each is retried.
    merkle_failures,
    /// Tree node digests asked of peers.
    merkle_nodes,
    /// Leaves checked against a peer at the agreed purge horizon.
    merkle_leaves_checked,
    /// Leaves that still differed after the check (their records were offered).
    merkle_leaves_differing,
    /// Records sent to a co-replica that lacked them, after a Merkle exchange.
    merkle_repairs,
    /// Bytes of requests Merkle anti-entropy sent (metered by the bandwidth limit).
    merkle_bytes_sent,
    /// Merkle requests refused as a replica (past the tree's bounds, or outside the ranges
    /// shared with the requester).
    merkle_refused,
    /// Rebuilds of the tree from storage.
    merkle_rebuilds,
    /// Leaves a rebuild found different from storage and corrected (storage changed outside
    /// the apply path: corruption, a purge, an eviction, a failed apply).
    merkle_rebuild_corrected,
    /// Records a graceful leave handed to the members taking this node's place, as they
    /// acknowledged them.
    leave_handed_off,
    /// Rounds of the cleanup of ranges this node no longer replicates (one per set of lost
    /// ranges that came due, retries included).
    cleanup_rounds,
    /// Records of lost ranges removed from this node's storage once every current replica
    /// of their key acknowledged them (and collectable ones, which need no handoff).
    cleanup_removed,
    /// Records of lost ranges a cleanup round kept: a current replica did not acknowledge
    /// them, or a newer write reached this node meanwhile. Each is tried again later.
    cleanup_kept,
    /// Records a graceful leave could not hand off by `handoff_timeout` (a new replica
    /// unreachable, not alive, or refusing): they stay on the key's other replicas.
    leave_handoff_failed,
    /// Records this node pulled from the members that held its ranges while it joined.
    join_pulled,
    /// Pull requests that failed or were refused while joining (each retried).
    join_pull_failures,
    /// Times a join started its pull over because the rings changed under it.
    join_repulls,
    /// Joins that ended at `join_pull_timeout` with some range not pulled from some member
    /// (logged; what it lacks comes from read repair and anti-entropy).
    join_incomplete,
    /// Joins this node finished (0 or 1).
    joins_completed,
    /// Pulled records this node refused to store while joining (its limits or clock): left
    /// to read repair and anti-entropy.
    join_refused,
    /// Pull requests this node answered for a joining member.
    pulls_served,
    /// Pull requests refused as a replica: from a non-member, for a range the puller does not
    /// replicate whole in any of this node's rings, with a bad cursor or a limit of zero.
    pulls_refused,
    /// Expensive healing requests (`MerkleCheck`, `Pull`, `SyncOffer`) this node refused as
    /// `Busy`: as many were being served as it allows at once, or (a `Pull`) the healing
    /// bandwidth was spent for now. The sender tries again later.
    healing_busy,
    /// Healing requests of this node's (a Merkle leaf check, an offer, a join's pull) a peer
    /// answered `Busy`: put off and tried again later, not counted as failures.
    healing_deferred,
    /// Keys read as a replica, for a coordinator (this node's own reads included).
    replica_reads,
}
