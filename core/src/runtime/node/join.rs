//! Handoff when a member joins: a node that starts with seeds and empty storage (or whose
//! earlier join did not finish, [`JOIN_PENDING_META`]) joins as `joining`
//! ([`crate::membership::MemberMeta::joining`]) and pulls the records of the ranges it will
//! own from the members that replicate them now, before it serves reads.
//!
//! - **One joiner at a time.** Among the joining members, the one that started first (lowest
//!   generation, then id) is the active joiner, so a node that starts later never takes the
//!   turn of one already pulling; the others wait, in no ring. The view's `next` ring is the
//!   settled ring with the active joiner; every write meets its quorum in both rings
//!   (`View::write_sets`), so from the moment a coordinator hears of the join, the joiner
//!   receives the writes of the ranges it pulls, and the old replicas still hold a quorum of
//!   everything reads (which stay on the settled ring) must see.
//! - **Waiting `join_settle` first.** A coordinator that has not heard of the join yet writes
//!   to the old replicas alone; waiting lets the news spread and those writes end, so the pull
//!   finds them in storage.
//! - **The pull.** For each member of the settled ring, the ranges the joiner replicates in
//!   `next` and that member replicates now ([`crate::ring::Ring::pull_ranges`]), page by page
//!   ([`ReplicaMessage::Pull`], at most [`MAX_BATCH`] records and [`MAX_PULL_BYTES`] or half
//!   the transport's frame limit a page), metered by the anti-entropy bandwidth limit. A page
//!   is applied before the next is asked for. A failed page is retried with backoff; after
//!   [`PAGE_ATTEMPTS`] failures in a row its member is left for this round and the others
//!   pulled first. A page the member answers `Busy` (it serves as many healing requests as
//!   it allows, or its own bandwidth budget is spent) is no failure: it is asked for again
//!   after the same backoff, counted as `healing_deferred`. A record this node refuses for
//!   good (its limits, its clock) is skipped and counted (`join_refused`).
//! - **Served bounded.** A member serves a pull only to a member that replicates the whole
//!   range in one of its rings, at most [`super::replica::HEALING_SERVE_CONCURRENCY`]
//!   healing requests at once, and answers `Busy` while its healing bandwidth
//!   (`anti_entropy_bandwidth`, shared with its own anti-entropy) is owed.
//! - **Rings that change under the pull** (a death, a leave) start it over from the plan,
//!   counted (`join_repulls`).
//! - **Settling.** Once every member of the plan served every range, the node publishes
//!   `joining = false` and clears its pending mark. Coordinators then read from the ring with
//!   it, and for `join_settle` more still make writes meet a quorum in the ring from before
//!   (`view::follow`), so a coordinator that has not heard yet still reads what the others
//!   wrote.
//! - **Never on a timer without a cluster.** A joiner that has reached nobody waits (and
//!   says so every [`WAITING_LOG`]); one that knows only other joiners (a new cluster whose
//!   nodes all list seeds) settles at once if it is first, as nobody holds anything.
//! - **Bounded.** Past `join_pull_timeout` from the start of its turn, a join settles with
//!   what it has, counted (`join_incomplete`) and logged: reads may then miss what it lacks
//!   until read repair or anti-entropy brings it (Merkle exchanges with each new co-replica
//!   start at once when it settles).
//!
//! Records past the purge horizon are not pulled; pulled records are not entered in the
//! applied-writes log (their other replicas hold them already). Every range comes from each
//! of its current replicas (N times the data), which is what makes a write acknowledged by
//! any W of them reach the joiner.

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
use crate::replication::{REPLICA_PROTOCOL_VERSION, Refusal, ReplicaMessage, Write, WriteOutcome};
use crate::ring::RingMember;
use crate::storage::{ScanCursor, Storage};
use crate::transport::Transport;

/// The first retry's wait after a failed page; it doubles up to [`MAX_BACKOFF`].
const BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Failed requests in a row for one page before its member is left for this round (the other
/// members go first; the next round comes back to it).
const PAGE_ATTEMPTS: u32 = 5;
/// How often a waiting joiner looks at the view again.
const POLL: Duration = Duration::from_millis(50);
/// How often a joiner that knows no settled member says so.
const WAITING_LOG: Duration = Duration::from_secs(10);
/// The storage metadata that marks a join not yet finished: set before the node announces
/// itself joining, cleared when it settles, so a joiner that restarts (with some records by
/// then) joins again instead of serving reads with half its ranges.
pub(crate) const JOIN_PENDING_META: &str = "join_pending";

/// Whether a node joins by pulling: only with seeds (a node without any forms a cluster), and
/// only an empty node (one that restarts with its data must not leave the read ring) or one
/// whose earlier join did not finish (`pending`).
pub(crate) fn starts_joining(enabled: bool, has_seeds: bool, records: u64, pending: bool) -> bool {
    enabled && has_seeds && (records == 0 || pending)
}

/// Decides whether this start joins ([`starts_joining`]) and, if so, marks it pending in
/// storage before anyone hears of it.
pub(crate) async fn prepare(
    storage: &crate::storage::SharedStorage,
    enabled: bool,
    has_seeds: bool,
) -> Result<bool, crate::storage::StorageError> {
    if !enabled || !has_seeds {
        return Ok(false);
    }
    let records = storage.stats().await?.records;
    let pending = storage
        .load_meta(JOIN_PENDING_META)
        .await?
        .is_some_and(|v| v.as_ref() == b"1");
    let joining = starts_joining(enabled, has_seeds, records, pending);
    if joining {
        storage
            .store_meta(JOIN_PENDING_META, bytes::Bytes::from_static(b"1"))
            .await?;
    }
    Ok(joining)
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
    /// Something is missing: a member kept failing, or the deadline came.
    Incomplete,
    /// The rings changed under it.
    Changed,
}

/// Drives this node's join until it settles, the node stops, or its own membership changes
/// it (a leave). Started only for a node that [`prepare`] found joining.
pub(crate) async fn run(inner: Arc<Inner>) {
    let me = inner.id;
    // Set at the start of each turn: a joiner that loses its turn starts afresh.
    let mut deadline: Option<Instant> = None;
    let mut logged_waiting: Option<Instant> = None;
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
            deadline = None;
            tokio::time::sleep(POLL).await;
            continue;
        }
        if view.ring.is_empty() {
            if view.members.len() >= 2 {
                // Every member known is joining (a new cluster whose nodes all list seeds):
                // nobody holds anything, and the first to have started goes first.
                settle(&inner, "every member known is joining").await;
                return;
            }
            // Nobody reached yet: wait for the cluster, never settle on a timer (a node that
            // served reads before it found its cluster would serve them without its data).
            if logged_waiting.is_none_or(|at| at.elapsed() >= WAITING_LOG) {
                tracing::warn!(seeds = ?inner.config.seeds, "joining: no member reached yet");
                logged_waiting = Some(Instant::now());
            }
            tokio::time::sleep(POLL).await;
            continue;
        }
        let deadline =
            *deadline.get_or_insert_with(|| Instant::now() + inner.config.join_pull_timeout);
        tokio::time::sleep(inner.config.join_settle).await;
        let view = inner.view.load_full();
        if view.active_joiner() != Some(me) {
            continue;
        }
        let rings = Rings::of(&view);
        let Some(next) = view.next.as_ref() else {
            continue;
        };
        if inner.bugs.skip_join_pull {
            settle(&inner, "planted bug: no pull").await;
            return;
        }
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
                    timeout = ?inner.config.join_pull_timeout,
                    "joining: some ranges were not pulled by join_pull_timeout; serving reads \
                     anyway (read repair and anti-entropy bring the rest)"
                );
                settle(&inner, "join_pull_timeout").await;
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

/// Publishes `joining = false` and clears the pending mark.
async fn settle(inner: &Inner, why: &str) {
    let Some(mut meta) = local_meta(inner) else {
        return;
    };
    meta.joining = false;
    if inner.membership.set_meta(meta).await {
        inner.stats.joins_completed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(why, "joined: serving reads");
        if let Err(e) = inner
            .storage
            .store_meta(JOIN_PENDING_META, bytes::Bytes::from_static(b"0"))
            .await
        {
            tracing::warn!(error = %e, "joined, but the pending mark stays: a restart pulls again");
        }
    }
}

/// Pulls every range of `plan`, member by member; a member that keeps failing is left for
/// this round and the others still pulled.
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

/// Whether a joiner's refusal of a pulled record is for good (its limits or clock), so the
/// record is skipped and counted rather than asked for again.
fn refused_for_good(outcome: &WriteOutcome) -> bool {
    matches!(
        outcome,
        WriteOutcome::Refused(Refusal::Invalid { .. } | Refusal::ClockDrift { .. })
    )
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
    let mut failures = 0;
    loop {
        let view = inner.view.load_full();
        if Rings::of(&view) != *rings {
            return Pulled::Changed;
        }
        let Some(addr) = view.addr(owner).cloned() else {
            return Pulled::Changed;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || inner.stopping.load(Ordering::SeqCst) || failures >= PAGE_ATTEMPTS {
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
                    let left = deadline.saturating_duration_since(Instant::now());
                    tokio::time::sleep(Duration::from_millis(wait).min(left)).await;
                }
                let n = records.len() as u64;
                let outcomes = inner.apply_writes(records, false, LogAs::Unlogged).await;
                if outcomes.iter().all(|o| o.is_ack() || refused_for_good(o)) {
                    let refused = outcomes.iter().filter(|o| refused_for_good(o)).count() as u64;
                    if refused > 0 {
                        inner
                            .stats
                            .join_refused
                            .fetch_add(refused, Ordering::Relaxed);
                        tracing::warn!(%owner, refused, "joining: pulled records refused here");
                    }
                    inner
                        .stats
                        .join_pulled
                        .fetch_add(n - refused, Ordering::Relaxed);
                    backoff = BACKOFF;
                    failures = 0;
                    match next {
                        Some(next) => cursor = Some(next),
                        None => return Pulled::Complete,
                    }
                    continue;
                }
                // Storage refused some record here: the page is asked for again.
                tracing::debug!(%owner, "joining: a pulled page was not applied whole");
            }
            Err(PageError::Busy) => {
                // Not a failure: the member serves as many healing requests as it allows, or
                // its bandwidth is spent for now. The same page is asked for again after the
                // backoff, for as long as the deadline allows.
                inner.stats.healing_deferred.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(%owner, "joining: the member is busy; page asked for later");
                let left = deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(backoff.min(left)).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            Err(PageError::Failed(why)) => {
                tracing::debug!(%owner, %addr, why, "joining: pull failed");
            }
        }
        failures += 1;
        inner
            .stats
            .join_pull_failures
            .fetch_add(1, Ordering::Relaxed);
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(backoff.min(left)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Why a page was not pulled.
#[derive(Debug)]
enum PageError {
    /// The member answered `Busy`: ask again later.
    Busy,
    /// Anything else: unreachable, refused, an answer that breaks the rules.
    Failed(String),
}

impl From<String> for PageError {
    fn from(why: String) -> Self {
        PageError::Failed(why)
    }
}

impl From<&str> for PageError {
    fn from(why: &str) -> Self {
        PageError::Failed(why.into())
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
) -> Result<(Vec<Write>, Option<ScanCursor>), PageError> {
    let cursor_sent = cursor.clone();
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
                )
                .into());
            }
            // The next page must start past this one's start, or a peer could keep the
            // joiner asking for the same page.
            if let Some(n) = &next
                && !range.contains(n.hash)
            {
                return Err("next cursor outside the range pulled".into());
            }
            if let (Some(n), Some(c)) = (&next, &cursor_sent)
                && (range.offset(n.hash), &n.key) <= (range.offset(c.hash), &c.key)
            {
                return Err("next cursor does not move forward".into());
            }
            Ok((records, next))
        }
        Ok(Envelope::Replica(ReplicaMessage::Refused(Refusal::Busy))) => Err(PageError::Busy),
        Ok(Envelope::Replica(ReplicaMessage::Refused(why))) => Err(why.to_string().into()),
        Ok(other) => Err(format!("unexpected answer {other:?}").into()),
        Err(e) => Err(e.to_string().into()),
    }
}

impl Inner {
    /// Serves one page of a joining member's pull: the records of `range` after `cursor`
    /// not past `cutoff_ms`, at most `limit` (capped at [`MAX_BATCH`]) and [`MAX_PULL_BYTES`]
    /// of keys and values (one larger record goes alone); with the page, the bytes of keys
    /// and values it carries (for the bandwidth limit).
    ///
    /// Only members may pull, and only a range they replicate whole in one of this node's
    /// rings (the read ring, the ring with the active joiner, or a ring from before a join
    /// that just ended): anything else is refused (`Invalid` for a non-member, `OutOfRange`
    /// for the range), counted as `pulls_refused`. The range is checked whole, before any
    /// scan, rather than record by record: a joiner plans its ranges with
    /// [`crate::ring::Ring::pull_ranges`] over the ring with it, every one of which that
    /// ring replicates whole for it ([`crate::ring::Ring::replicates_range`]), so a
    /// legitimate pull is refused only while this node's rings differ from the joiner's (a
    /// refusal it retries until they agree or the rings change and it plans again), never
    /// answered with a page silently missing records.
    pub(crate) async fn answer_pull(
        &self,
        from: &Address,
        range: HashRange,
        cursor: Option<ScanCursor>,
        limit: u32,
        cutoff_ms: u64,
    ) -> (ReplicaMessage, u64) {
        let refuse = |refusal: Refusal| {
            self.stats.pulls_refused.fetch_add(1, Ordering::Relaxed);
            (ReplicaMessage::Refused(refusal), 0)
        };
        let invalid = |reason: &str| {
            refuse(Refusal::Invalid {
                reason: reason.into(),
            })
        };
        let view = self.view.load_full();
        let Some(puller) = view.member_at(from) else {
            return invalid("pull from a non-member");
        };
        if !view.replicates_range(range, puller) {
            tracing::debug!(%puller, ?range, "pull of a range the puller does not replicate");
            return refuse(Refusal::OutOfRange {
                key_hash: range.start,
            });
        }
        drop(view);
        if let Some(c) = &cursor
            && (c.key.len() > self.config.max_key_len.get() || !range.contains(c.hash))
        {
            return invalid("pull cursor outside the range or too long");
        }
        let Some(limit) = std::num::NonZeroUsize::new((limit as usize).min(MAX_BATCH)) else {
            return invalid("pull of zero records");
        };
        self.stats.pulls_served.fetch_add(1, Ordering::Relaxed);
        let page = match self.storage.scan(range, cursor, limit).await {
            Ok(page) => page,
            Err(e) => {
                self.stats.storage_failures.fetch_add(1, Ordering::Relaxed);
                return (
                    ReplicaMessage::Refused(super::replica::storage_refusal(&e)),
                    0,
                );
            }
        };
        // Half the frame limit leaves room for the encoding's overhead on small frames.
        let cap = MAX_PULL_BYTES.min(self.transport.max_frame_len() / 2);
        let mut records = Vec::with_capacity(page.entries.len());
        let mut bytes = 0usize;
        let mut next = page.next;
        for e in page.entries {
            let size = crate::storage::footprint(&e.key, &e.record) as usize;
            if !records.is_empty() && bytes + size > cap {
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
        (
            ReplicaMessage::PulledRecords { records, next },
            bytes as u64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_empty_node_with_seeds_or_an_unfinished_join_joins_by_pulling() {
        assert!(starts_joining(true, true, 0, false));
        let restart = starts_joining(true, true, 1, false);
        assert!(!restart, "a restart with data stays in the ring");
        let unfinished = starts_joining(true, true, 7, true);
        assert!(unfinished, "a join that did not finish goes on");
        let alone = starts_joining(true, false, 0, false);
        assert!(!alone, "a new cluster has nothing to pull");
        assert!(!starts_joining(false, true, 0, true), "off");
    }
}
