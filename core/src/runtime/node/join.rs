//! Handoff when a member joins: a node that starts with seeds and empty storage joins as
//! `joining` ([`crate::membership::MemberMeta::joining`]) and pulls the records of the
//! ranges it will own from the members that replicate them now, before it serves reads.
//!
//! - **One joiner at a time.** Among the joining members, the one with the lowest id is the
//!   active joiner; the others wait, in no ring. The view's `next` ring is the settled ring
//!   with the active joiner; every write meets its quorum in both rings
//!   (`View::write_sets`), so from the moment a coordinator hears of the join, the joiner
//!   receives the writes of the ranges it pulls, and the old replicas still hold a quorum of
//!   everything reads (which stay on the settled ring) must see.
//! - **Waiting `join_settle` first.** A coordinator that has not heard of the join yet writes
//!   to the old replicas alone; waiting lets the news spread and those writes end, so the pull
//!   finds them in storage.
//! - **The pull.** For each member of the settled ring, the ranges the joiner replicates in
//!   `next` and that member replicates now ([`crate::ring::Ring::pull_ranges`]), page by page
//!   ([`ReplicaMessage::Pull`], at most [`MAX_BATCH`] records and [`MAX_PULL_BYTES`] a page),
//!   metered by the anti-entropy bandwidth limit. A page is applied before the next is asked
//!   for, so a pull that stops resumes at its cursor. A failed page is retried with backoff;
//!   a member no longer alive is dropped from the plan (the rings changed).
//! - **Rings that change under the pull** (a death, a leave, a lower-id joiner) start it
//!   over, counted (`join_repulls`).
//! - **Settling.** Once every member of the plan served every range, the node publishes
//!   `joining = false`. Coordinators then read from the ring with it, and for `join_settle`
//!   more still make writes meet a quorum in the ring from before (`view::follow`), so a
//!   coordinator that has not heard yet still reads what the others wrote.
//! - **Bounded.** Past `handoff_timeout` from the start of its turn, a join settles with what
//!   it has, counted (`join_incomplete`) and logged: reads may then miss what it lacks until
//!   read repair or anti-entropy brings it (Merkle exchanges with each new co-replica start at
//!   once when it settles).
//!
//! Records past the purge horizon are not pulled; pulled records are not entered in the
//! applied-writes log (their other replicas hold them already).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::Inner;
use super::replica::LogAs;
use crate::envelope::Envelope;
use crate::hash::{HashRange, key_hash};
use crate::healing::exchange::RateLimit;
use crate::identity::{Address, NodeId};
use crate::replication::message::{MAX_BATCH, MAX_PULL_BYTES};
use crate::replication::{REPLICA_PROTOCOL_VERSION, Refusal, ReplicaMessage, Write};
use crate::ring::RingMember;
use crate::storage::{ScanCursor, Storage};

/// The first retry's wait after a failed page; it doubles up to [`MAX_BACKOFF`].
const BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often a waiting joiner looks at the view again.
const POLL: Duration = Duration::from_millis(50);

/// Whether a node starting with `seeds` and storage holding `records` records joins by
/// pulling: only an empty node that joins an existing cluster has anything to pull, and a
/// node restarting with its data must not be taken out of the read ring.
pub(crate) fn starts_joining(enabled: bool, has_seeds: bool, records: u64) -> bool {
    enabled && has_seeds && records == 0
}

/// The rings a pull was planned against; a change to either restarts it.
#[derive(PartialEq, Eq)]
struct Rings {
    settled: Vec<RingMember>,
    next: Vec<RingMember>,
}

impl Rings {
    fn of(view: &super::view::View) -> Rings {
        Rings {
            settled: view.ring.members().to_vec(),
            next: view
                .next
                .as_ref()
                .map(|r| r.members().to_vec())
                .unwrap_or_default(),
        }
    }
}

/// How a pull ended.
enum Pulled {
    /// Every range from every member of the plan.
    Complete,
    /// Something is missing: a member failed, died or the deadline came.
    Incomplete,
    /// The rings changed under it.
    Changed,
}

/// Drives this node's join until it settles, the node stops, or its own membership changes
/// it (a leave). Started only for a node that [`starts_joining`].
pub(crate) async fn run(inner: Arc<Inner>) {
    let me = inner.id;
    let mut deadline: Option<Instant> = None;
    // Until the view holds another member (or `join_timeout` passes: a cluster of one), an
    // empty settled ring says only that we have not heard of anyone yet.
    let alone_until = Instant::now() + inner.config.join_timeout;
    loop {
        if inner.stopping.load(Ordering::SeqCst) {
            return;
        }
        let view = inner.view.load_full();
        if !view.is_joining(me) {
            // The view has not caught up with our own record yet, or we settled.
            tokio::time::sleep(POLL).await;
            if !local_meta(&inner).is_some_and(|m| m.joining) {
                return;
            }
            continue;
        }
        if view.active_joiner() != Some(me) {
            tokio::time::sleep(POLL).await;
            continue;
        }
        let deadline =
            *deadline.get_or_insert_with(|| Instant::now() + inner.config.handoff_timeout);
        if view.ring.is_empty() {
            if view.members.len() < 2 && Instant::now() < alone_until {
                tokio::time::sleep(POLL).await;
                continue;
            }
            // No settled member: nobody holds anything, and nobody reads or writes yet.
            settle(&inner, "no settled member to pull from").await;
            return;
        }
        tokio::time::sleep(inner.config.join_settle).await;
        let view = inner.view.load_full();
        if view.active_joiner() != Some(me) {
            continue;
        }
        let rings = Rings::of(&view);
        let Some(next) = view.next.as_ref() else {
            continue;
        };
        let plan = next.pull_ranges(&view.ring, me, view.n);
        tracing::info!(
            members = plan.len(),
            ranges = plan.iter().map(|(_, r)| r.len()).sum::<usize>(),
            "joining: pulling the ranges this node will own"
        );
        match pull(&inner, &plan, &rings, deadline).await {
            Pulled::Complete => {
                settle(&inner, "every range pulled").await;
                return;
            }
            Pulled::Changed if Instant::now() < deadline => {
                inner.stats.join_repulls.fetch_add(1, Ordering::Relaxed);
                tracing::info!("joining: the rings changed during the pull; pulling again");
            }
            Pulled::Incomplete if Instant::now() < deadline => {
                tokio::time::sleep(MAX_BACKOFF).await;
            }
            Pulled::Changed | Pulled::Incomplete => {
                inner.stats.join_incomplete.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    timeout = ?inner.config.handoff_timeout,
                    "joining: some ranges were not pulled by handoff_timeout; serving reads \
                     anyway (read repair and anti-entropy bring the rest)"
                );
                settle(&inner, "handoff_timeout").await;
                return;
            }
        }
    }
}

/// This node's own membership record's metadata.
fn local_meta(inner: &Inner) -> Option<crate::membership::MemberMeta> {
    inner
        .membership
        .members()
        .iter()
        .find(|m| m.id == inner.id)
        .map(|m| m.meta.clone())
}

/// Publishes `joining = false`.
async fn settle(inner: &Inner, why: &str) {
    let Some(mut meta) = local_meta(inner) else {
        return;
    };
    meta.joining = false;
    if inner.membership.set_meta(meta).await {
        inner.stats.joins_completed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(why, "joined: serving reads");
    }
}

/// Pulls every range of `plan` in turn.
async fn pull(
    inner: &Inner,
    plan: &[(NodeId, Vec<HashRange>)],
    rings: &Rings,
    deadline: Instant,
) -> Pulled {
    let mut limiter = RateLimit::new(
        inner.config.anti_entropy_bandwidth.get(),
        inner.hlc.wall_clock().now_ms(),
    );
    let cutoff_ms = crate::healing::merkle::cutoff(
        inner.hlc.wall_clock().now_ms(),
        inner.config.tombstone_grace,
    );
    let mut complete = true;
    for (owner, ranges) in plan {
        for &range in ranges {
            match pull_range(
                inner,
                *owner,
                range,
                cutoff_ms,
                rings,
                deadline,
                &mut limiter,
            )
            .await
            {
                Pulled::Complete => {}
                Pulled::Changed => return Pulled::Changed,
                Pulled::Incomplete => {
                    complete = false;
                    break;
                }
            }
        }
    }
    if Rings::of(&inner.view.load()) != *rings {
        return Pulled::Changed;
    }
    if complete {
        Pulled::Complete
    } else {
        Pulled::Incomplete
    }
}

/// Pulls one range from `owner`, page by page, applying each before asking for the next.
async fn pull_range(
    inner: &Inner,
    owner: NodeId,
    range: HashRange,
    cutoff_ms: u64,
    rings: &Rings,
    deadline: Instant,
    limiter: &mut RateLimit,
) -> Pulled {
    let mut cursor: Option<ScanCursor> = None;
    let mut backoff = BACKOFF;
    loop {
        let view = inner.view.load_full();
        if Rings::of(&view) != *rings {
            return Pulled::Changed;
        }
        let Some(addr) = view.addr(owner).cloned() else {
            return Pulled::Changed;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || inner.stopping.load(Ordering::SeqCst) {
            return Pulled::Incomplete;
        }
        match pull_page(inner, &addr, range, cursor.clone(), cutoff_ms, left).await {
            Ok((records, next)) => {
                let bytes: u64 = records
                    .iter()
                    .map(|w| crate::storage::footprint(&w.key, &w.record))
                    .sum();
                let wait = limiter.take(inner.hlc.wall_clock().now_ms(), bytes);
                if wait > 0 {
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                let n = records.len() as u64;
                let outcomes = inner.apply_writes(records, false, LogAs::Unlogged).await;
                if outcomes.iter().all(|o| o.is_ack()) {
                    inner.stats.join_pulled.fetch_add(n, Ordering::Relaxed);
                    backoff = BACKOFF;
                    match next {
                        Some(next) => cursor = Some(next),
                        None => return Pulled::Complete,
                    }
                    continue;
                }
                // A record refused here (storage, limits): the page is asked for again.
                tracing::debug!(%owner, "joining: a pulled page was not applied whole");
            }
            Err(why) => tracing::debug!(%owner, %addr, why, "joining: pull failed"),
        }
        inner
            .stats
            .join_pull_failures
            .fetch_add(1, Ordering::Relaxed);
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(backoff.min(left)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One page of `range` from the member at `addr`.
async fn pull_page(
    inner: &Inner,
    addr: &Address,
    range: HashRange,
    cursor: Option<ScanCursor>,
    cutoff_ms: u64,
    left: Duration,
) -> Result<(Vec<Write>, Option<ScanCursor>), String> {
    let message = Envelope::Replica(ReplicaMessage::Pull {
        version: REPLICA_PROTOCOL_VERSION,
        range,
        cursor,
        limit: MAX_BATCH as u32,
        cutoff_ms,
    });
    let timeout = inner.config.request_timeout.min(left);
    match inner.rpc.request(addr, &message, timeout).await {
        Ok(Envelope::Replica(ReplicaMessage::PulledRecords { records, next })) => {
            // The page must be of the range asked for: a record outside it would be stored
            // for keys this node does not own.
            if let Some(w) = records.iter().find(|w| !range.contains(key_hash(&w.key))) {
                return Err(format!(
                    "record at {:#018x} outside the range pulled",
                    key_hash(&w.key)
                ));
            }
            Ok((records, next))
        }
        Ok(Envelope::Replica(ReplicaMessage::Refused(why))) => Err(why.to_string()),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

impl Inner {
    /// Serves one page of a joining member's pull: the records of `range` after `cursor`
    /// not past `cutoff_ms`, at most `limit` (capped at [`MAX_BATCH`]) and [`MAX_PULL_BYTES`]
    /// of keys and values (one larger record goes alone). Only members may pull.
    pub(crate) async fn answer_pull(
        &self,
        from: &Address,
        range: HashRange,
        cursor: Option<ScanCursor>,
        limit: u32,
        cutoff_ms: u64,
    ) -> ReplicaMessage {
        let refuse = |reason: String| {
            self.stats
                .bad_replica_requests
                .fetch_add(1, Ordering::Relaxed);
            ReplicaMessage::Refused(Refusal::Invalid { reason })
        };
        if self.view.load().member_at(from).is_none() {
            return refuse("pull from a non-member".into());
        }
        if let Some(c) = &cursor
            && (c.key.len() > self.config.max_key_len.get() || !range.contains(c.hash))
        {
            return refuse("pull cursor outside the range or too long".into());
        }
        let Some(limit) = std::num::NonZeroUsize::new((limit as usize).min(MAX_BATCH)) else {
            return refuse("pull of zero records".into());
        };
        self.stats.pulls_served.fetch_add(1, Ordering::Relaxed);
        let page = match self.storage.scan(range, cursor, limit).await {
            Ok(page) => page,
            Err(e) => return ReplicaMessage::Refused(super::replica::storage_refusal(&e)),
        };
        let mut records = Vec::with_capacity(page.entries.len());
        let mut bytes = 0usize;
        let mut next = page.next;
        for e in page.entries {
            let size = crate::storage::footprint(&e.key, &e.record) as usize;
            if !records.is_empty() && bytes + size > MAX_PULL_BYTES {
                // The rest of this page comes with the next one, from the last record sent.
                next = records.last().map(|w: &Write| ScanCursor {
                    hash: key_hash(&w.key),
                    key: w.key.clone(),
                });
                break;
            }
            // Left out, and `next` (the scan's, past the page's last entry) moves past it.
            if crate::healing::merkle::past_horizon(&e.record, cutoff_ms) {
                continue;
            }
            bytes += size;
            records.push(Write {
                key: e.key,
                record: e.record,
            });
        }
        ReplicaMessage::PulledRecords { records, next }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_empty_node_with_seeds_joins_by_pulling() {
        assert!(starts_joining(true, true, 0));
        assert!(
            !starts_joining(true, true, 1),
            "a restart with data stays in the ring"
        );
        assert!(
            !starts_joining(true, false, 0),
            "a new cluster has nothing to pull"
        );
        assert!(!starts_joining(false, true, 0), "off");
    }
}
