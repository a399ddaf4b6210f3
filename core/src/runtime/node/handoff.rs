//! Handoff when ownership changes, the graceful leave: before a node leaves, it streams every
//! record it replicates to the members that take its place in the key's replica set (the
//! first N of the ring without it that are not replicas now), and waits for their
//! acknowledgements within `handoff_timeout`.
//!
//! - **Targets.** A key's new replicas are the members of its preference list in the ring
//!   without this node that are not in its current list: with more than N members, exactly
//!   the one member that moves up. The key's other replicas already hold it (or get it by
//!   hints and anti-entropy, as before the leave), so nothing is sent twice.
//! - **Two passes.** The first streams what storage holds while the node is still a member
//!   (its replica sets unchanged, so reads still find it). Writes can still reach it as a
//!   replica until the cluster has heard of its departure, so after the leave the second pass
//!   streams what the applied-writes log took in since the first began (all of storage again
//!   if the log was overtaken; nothing with anti-entropy off, which keeps no log).
//! - **Bounds.** One `Apply` at a time, of at most [`MAX_BATCH`] records and
//!   [`APPLY_BATCH_BYTES`], metered by the anti-entropy bandwidth limit. A batch a target did
//!   not acknowledge is retried with backoff; a target not alive in the view, or one that
//!   fails [`ATTEMPTS`] times, is given up for this leave. Every record not acknowledged by
//!   the deadline is counted (`NodeStats::leave_handoff_failed`) and logged, never dropped
//!   silently: it stays on the key's other replicas, and in this node's storage.
//! - Hints this node holds for others are not streamed: they were made for writes that
//!   reached W replicas without their target, and anti-entropy repairs what they would have.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::Inner;
use super::view::View;
use crate::envelope::Envelope;
use crate::hash::{HashRange, key_hash};
use crate::healing::exchange::RateLimit;
use crate::healing::sync::Since;
use crate::identity::NodeId;
use crate::membership::MemberState;
use crate::record::Record;
use crate::replication::{REPLICA_PROTOCOL_VERSION, ReplicaMessage, Write};
use crate::ring::{Ring, RingMember};
use crate::storage::{MAX_BATCH, Storage, StorageError};

/// Most key and record bytes in one handoff `Apply` (as anti-entropy's batches).
pub(crate) const APPLY_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Attempts at one batch before its target is given up for this leave.
const ATTEMPTS: u32 = 3;
/// The first retry's wait; it doubles per attempt.
const BACKOFF: Duration = Duration::from_millis(200);
/// Log entries read per step of the second pass.
const LOG_STEP: usize = 1024;

/// What one leave handed off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct LeaveReport {
    /// Records a new replica acknowledged.
    pub(crate) handed: u64,
    /// Records with a new replica that did not acknowledge them by the deadline.
    pub(crate) failed: u64,
}

/// The new replicas of the key at ring position `hash` if `me` leaves: the members of its
/// preference list in `without` (the ring without `me`) that are not in `current` (its list
/// now). When `me` does not replicate it, a copy it holds for nobody (the cleanup had not
/// removed it yet: some replica had not acknowledged it), all of them: this copy may be the
/// one they lack. Pure: the leave's routing decision.
pub(crate) fn new_replicas(
    current: &[NodeId],
    without: &Ring,
    me: NodeId,
    hash: u64,
    n: NonZeroUsize,
    out: &mut Vec<NodeId>,
) {
    out.clear();
    without.preference_list_for_hash(hash, n, out);
    if current.contains(&me) {
        out.retain(|id| !current.contains(id));
    }
}

/// One graceful leave's handoff: the view it leaves from, the ring without this node, the
/// batches queued per new replica and what was handed off so far.
pub(crate) struct Leave {
    me: NodeId,
    view: Arc<View>,
    without: Ring,
    deadline: Instant,
    limiter: RateLimit,
    batches: HashMap<NodeId, (Vec<Write>, usize)>,
    given_up: Vec<NodeId>,
    report: LeaveReport,
    list: Vec<NodeId>,
    next: Vec<NodeId>,
}

impl Leave {
    /// A leave of `inner`'s node from its current view, to finish by `deadline`.
    fn new(inner: &Inner, deadline: Instant) -> Leave {
        let view = inner.view.load_full();
        let me = inner.id;
        let members: Vec<RingMember> = view
            .ring
            .members()
            .iter()
            .filter(|m| m.node != me)
            .copied()
            .collect();
        // The members were a valid ring a moment ago; one fewer is one too.
        let without = Ring::new(members, view.ring.config())
            .unwrap_or_else(|_| Ring::new([], view.ring.config()).expect("empty ring"));
        Leave {
            me,
            without,
            deadline,
            limiter: RateLimit::new(
                inner.config.anti_entropy_bandwidth.get(),
                inner.hlc.wall_clock().now_ms(),
            ),
            batches: HashMap::new(),
            given_up: Vec::new(),
            report: LeaveReport::default(),
            list: Vec::new(),
            next: Vec::new(),
            view,
        }
    }

    /// Whether there is anyone to hand off to.
    fn has_targets(&self) -> bool {
        !self.without.is_empty() && self.view.ring.contains(self.me)
    }

    /// Queues `record` of `key` for the key's new replicas, sending batches that filled.
    async fn add(&mut self, inner: &Inner, key: bytes::Bytes, record: Record) {
        let now_ms = inner.hlc.wall_clock().now_ms();
        if record.is_collectable(now_ms, inner.config.tombstone_grace) {
            return;
        }
        let hash = key_hash(&key);
        let n = self.view.n;
        self.view
            .ring
            .preference_list_for_hash(hash, n, &mut self.list);
        new_replicas(&self.list, &self.without, self.me, hash, n, &mut self.next);
        let bytes = key.len() + record.encoded_len();
        let targets = std::mem::take(&mut self.next);
        for &target in &targets {
            let (batch, size) = self.batches.entry(target).or_default();
            if !batch.is_empty() && (batch.len() >= MAX_BATCH || *size + bytes > APPLY_BATCH_BYTES)
            {
                let full = std::mem::take(batch);
                *size = 0;
                self.send(inner, target, full).await;
            }
            let (batch, size) = self.batches.entry(target).or_default();
            *size += bytes;
            batch.push(Write {
                key: key.clone(),
                record: record.clone(),
            });
        }
        self.next = targets;
    }

    /// Sends every batch still queued.
    async fn flush(&mut self, inner: &Inner) {
        let pending: Vec<(NodeId, Vec<Write>)> = self
            .batches
            .drain()
            .filter(|(_, (b, _))| !b.is_empty())
            .map(|(t, (b, _))| (t, b))
            .collect();
        for (target, batch) in pending {
            self.send(inner, target, batch).await;
        }
    }

    /// One batch to `target`, retried with backoff until acknowledged, given up or late.
    async fn send(&mut self, inner: &Inner, target: NodeId, writes: Vec<Write>) {
        let n = writes.len() as u64;
        let alive = matches!(
            self.view.members.get(&target),
            Some((_, MemberState::Alive))
        );
        let addr = match self.view.addr(target) {
            Some(addr) if alive && !self.given_up.contains(&target) => addr.clone(),
            _ => return self.fail(target, n),
        };
        let message = Envelope::Replica(ReplicaMessage::Apply {
            version: REPLICA_PROTOCOL_VERSION,
            writes,
        });
        let bytes = crate::wire::encode_payload(&message, usize::MAX).map_or(0, |b| b.len());
        let wait = self
            .limiter
            .take(inner.hlc.wall_clock().now_ms(), bytes as u64);
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        let mut backoff = BACKOFF;
        for attempt in 1..=ATTEMPTS {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let timeout = inner.config.request_timeout.min(left);
            match inner.rpc.request(&addr, &message, timeout).await {
                Ok(Envelope::Replica(ReplicaMessage::Applied { outcomes }))
                    if outcomes.len() as u64 == n && outcomes.iter().all(|o| o.is_ack()) =>
                {
                    self.report.handed += n;
                    inner.stats.leave_handed_off.fetch_add(n, Ordering::Relaxed);
                    return;
                }
                Ok(other) => tracing::debug!(%target, attempt, ?other, "handoff batch refused"),
                Err(e) => tracing::debug!(%target, attempt, error = %e, "handoff batch failed"),
            }
            if attempt < ATTEMPTS {
                let left = self.deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(backoff.min(left)).await;
                backoff *= 2;
            }
        }
        self.given_up.push(target);
        self.fail(target, n);
    }

    fn fail(&mut self, target: NodeId, n: u64) {
        tracing::debug!(%target, records = n, "records not handed off");
        self.report.failed += n;
    }

    /// Streams every record in storage; `Err` only when storage failed.
    async fn stream_storage(&mut self, inner: &Inner) -> Result<(), StorageError> {
        let page = NonZeroUsize::new(1024).expect("non-zero");
        let mut cursor = None;
        loop {
            let p = inner.storage.scan(HashRange::FULL, cursor, page).await?;
            for e in p.entries {
                self.add(inner, e.key, e.record).await;
            }
            match p.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        self.flush(inner).await;
        Ok(())
    }

    /// Streams the records of the keys the log took in from `from` on; all of storage if
    /// the log was overtaken meanwhile.
    async fn stream_log(&mut self, inner: &Inner, mut from: u64) -> Result<(), StorageError> {
        let Some(log) = &inner.sync else {
            return Ok(());
        };
        loop {
            let since = log.log().since(from, LOG_STEP);
            let entries = match since {
                Since::Overtaken => return self.stream_storage(inner).await,
                Since::Entries(e) if e.is_empty() => break,
                Since::Entries(e) => e,
            };
            from = entries.last().map_or(from, |a| a.seq + 1);
            for a in entries {
                if let Some(record) = inner.storage.get(&a.key).await? {
                    self.add(inner, a.key, record).await;
                }
            }
        }
        self.flush(inner).await;
        Ok(())
    }
}

/// Where the applied-writes log stands (0 without one).
fn log_head(inner: &Inner) -> u64 {
    inner.sync.as_ref().map_or(0, |log| log.log().head())
}

/// The first pass, before the leave: streams all of storage. Returns the leave's state and
/// the log position the second pass starts from.
pub(crate) async fn before_leave(inner: &Inner, deadline: Instant) -> Option<(Leave, u64)> {
    let mut leave = Leave::new(inner, deadline);
    if !leave.has_targets() {
        tracing::info!("leaving as the only member: nobody to hand records to");
        return None;
    }
    let from = log_head(inner);
    if let Err(e) = leave.stream_storage(inner).await {
        tracing::warn!(error = %e, "handoff: storage failed while streaming; the rest stays");
    }
    Some((leave, from))
}

/// The second pass, after the leave: the writes applied meanwhile. Counts and logs the
/// outcome of both passes.
pub(crate) async fn after_leave(inner: &Inner, leave: Option<(Leave, u64)>) -> LeaveReport {
    let Some((mut leave, from)) = leave else {
        return LeaveReport::default();
    };
    if let Err(e) = leave.stream_log(inner, from).await {
        tracing::warn!(error = %e, "handoff: storage failed while streaming; the rest stays");
    }
    let report = leave.report;
    inner
        .stats
        .leave_handoff_failed
        .fetch_add(report.failed, Ordering::Relaxed);
    if report.failed > 0 {
        tracing::warn!(
            handed = report.handed,
            not_handed = report.failed,
            "graceful leave: some records were not acknowledged by their new replicas; they \
             remain on the key's other replicas"
        );
    } else {
        tracing::info!(handed = report.handed, "graceful leave: records handed off");
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::RingConfig;

    const N3: NonZeroUsize = NonZeroUsize::new(3).unwrap();

    fn ring_of(ids: &[u64]) -> Ring {
        Ring::new(
            ids.iter().map(|&id| RingMember::new(NodeId(id))),
            RingConfig::default(),
        )
        .expect("ring")
    }

    #[test]
    fn a_leaving_replica_hands_each_key_to_the_one_member_that_moves_up() {
        let ring = ring_of(&[1, 2, 3, 4, 5]);
        let without = ring_of(&[1, 2, 3, 5]);
        let (mut list, mut out) = (Vec::new(), Vec::new());
        let mut handed = 0;
        for k in 0..2_000u32 {
            let hash = key_hash(&k.to_be_bytes());
            ring.preference_list_for_hash(hash, N3, &mut list);
            new_replicas(&list, &without, NodeId(4), hash, N3, &mut out);
            if list.contains(&NodeId(4)) {
                handed += 1;
                assert_eq!(out.len(), 1, "{list:?} -> {out:?}");
                assert!(!list.contains(&out[0]) && out[0] != NodeId(4));
            } else {
                // A copy it holds for nobody goes to every replica of the key.
                assert_eq!(out, list, "not its key: to all its replicas");
            }
        }
        assert!(handed > 0);
        // With N members or fewer, every remaining member already holds every key.
        let small = ring_of(&[1, 2, 3]);
        let small_without = ring_of(&[1, 2]);
        small.preference_list_for_hash(7, N3, &mut list);
        new_replicas(&list, &small_without, NodeId(3), 7, N3, &mut out);
        assert!(out.is_empty());
    }
}
