//! Handoff when ownership changes, the cleanup: once a ring change took key ranges away from
//! this node (a member joined and took them over), and the ring had `ownership_settle` to
//! settle, the node hands its records of those ranges to the keys' current replicas and
//! removes its own copies, so each key ends on exactly its N replicas (tombstones and
//! expired values stay until the purge).
//!
//! - **What is cleaned, promptly.** The ranges a ring change took away
//!   ([`Ring::lost_ranges`]), recorded when the view follower sees the change and due
//!   `ownership_settle` later. Inside a lost range, a record whose key this node holds again
//!   by the time the round runs
//!   ([`View::holds`], the one place ownership is decided: any write set of the view, so the
//!   ring with an active joiner and every ring from before a join that ended within
//!   `join_settle` count) is left alone; one held only through such a transition is counted
//!   kept and retried. Nothing is lost while this node itself joins.
//! - **What is cleaned, by state.** Events alone miss copies: a restart forgets the pending
//!   ranges, a node down while a member joined never sees its loss, and records keep arriving
//!   after a round (hints to the old replica, late frames, a stale coordinator's repair). So
//!   every `anti_entropy_interval`, and first `ownership_settle` after the start, a sweep
//!   runs over every range this node does not replicate in the settled ring
//!   ([`Ring::unreplicated_ranges`]), by the same rules. It waits until the settled ring has
//!   not changed for `ownership_settle` and no join is under way or just ended, and it never
//!   runs while this node joins or is not in its own ring. A record a leaving member streams
//!   here in the moment before its departure shows may be handed back to it and removed by
//!   a sweep that happens to run then; the ring change that follows starts the Merkle
//!   exchanges that bring it back (with anti-entropy on).
//! - **Tombstones stay until the purge.** A tombstone (or expired value) not yet collectable
//!   is handed off but not removed (kept for a retry if a replica did not acknowledge it): while it is here, an older write arriving late (a hint, a repair) is stale
//!   on arrival instead of stored as a copy nobody would delete.
//!
//! - **Never losing a write.** A record is sent, with its original version, to every member
//!   of every write set of its key ([`View::write_targets`]), in `Apply` batches of at most
//!   [`MAX_BATCH`] records and [`APPLY_BATCH_BYTES`], metered by the anti-entropy bandwidth
//!   limit. It is removed only
//!   once every one of them in the view of the moment of the removal acknowledged it
//!   ([`WriteOutcome::is_ack`]: stored, or an equal or newer record kept), and only while it
//!   is unchanged ([`Storage::remove_if_version`]): a write that reached this node meanwhile
//!   stays, and goes in a later round. Collectable records (tombstones and expired values
//!   past `tombstone_grace`) are removed without a handoff, as the purge would.
//! - **Retries.** A round that kept anything (a replica unreachable or refusing, a storage
//!   error, a newer write) leaves its ranges pending, due again after twice the previous
//!   wait (at most ten times `ownership_settle`). A node shutting down starts no round and
//!   removes nothing more. Pending ranges live in memory: after a restart, the sweep finds
//!   what they held.
//! - **The Merkle tree** loses each removed record's fingerprint as storage loses the record
//!   (begun before the removal like a write, so a rebuild running meanwhile keeps the leaf).
//!
//! [`Ring::lost_ranges`]: crate::ring::Ring::lost_ranges
//! [`Ring::unreplicated_ranges`]: crate::ring::Ring::unreplicated_ranges

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::Inner;
use super::handoff::APPLY_BATCH_BYTES;
use super::replica::PendingGuard;
use super::view::View;
use crate::envelope::Envelope;
use crate::hash::{HashRange, key_hash};
use crate::healing::exchange::RateLimit;
use crate::hlc::Version;
use crate::identity::NodeId;
use crate::record::Record;
use crate::replication::{REPLICA_PROTOCOL_VERSION, ReplicaMessage, Write, WriteOutcome};
use crate::storage::{MAX_BATCH, ScanCost, Storage, StorageError};
use crate::transport::Transport;

/// Records read from storage per page of a round; each page is handed off and cleaned
/// before the next is read.
const PAGE: usize = 1024;
/// Records per page on a backend whose every scan reads everything
/// ([`ScanCost::FullScan`]).
const FULL_SCAN_PAGE: usize = 65_536;
/// The longest wait before a retry, in multiples of `ownership_settle`.
const MAX_BACKOFF: u32 = 10;

/// Lost ranges waiting for their round, and the bandwidth limit used when anti-entropy (and
/// its limiter) is off.
#[derive(Debug)]
pub(crate) struct CleanupState {
    pending: Mutex<Vec<Due>>,
    /// When the settled ring last changed (the node's start, at first).
    ring_changed_at: Mutex<Instant>,
    wake: Notify,
    limiter: Mutex<RateLimit>,
}

/// One lost range: when its next round is due, and the wait before the one after.
#[derive(Clone, Copy, Debug)]
struct Due {
    range: HashRange,
    at: Instant,
    backoff: Duration,
}

impl CleanupState {
    pub(crate) fn new(bandwidth: u64, now_ms: u64) -> Self {
        CleanupState {
            pending: Mutex::new(Vec::new()),
            ring_changed_at: Mutex::new(Instant::now()),
            wake: Notify::new(),
            limiter: Mutex::new(RateLimit::new(bandwidth, now_ms)),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<Due>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `ranges`, due `settle` from now.
    fn lost(&self, ranges: Vec<HashRange>, settle: Duration) {
        let now = Instant::now();
        let at = super::later(now, settle);
        self.pending().extend(ranges.into_iter().map(|range| Due {
            range,
            at,
            backoff: settle,
        }));
        self.wake.notify_one();
    }

    /// The settled ring changed: the next sweep waits `ownership_settle` from now.
    pub(crate) fn ring_changed(&self) {
        *self
            .ring_changed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    /// When the settled ring will have been unchanged for `settle`.
    fn quiet_at(&self, settle: Duration) -> Instant {
        let changed = *self
            .ring_changed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        super::later(changed, settle)
    }

    /// When the earliest pending range is due.
    fn next_due(&self) -> Option<Instant> {
        self.pending().iter().map(|d| d.at).min()
    }

    /// Takes every range due by `now`.
    fn take_due(&self, now: Instant) -> Vec<Due> {
        let mut pending = self.pending();
        let (due, later): (Vec<Due>, Vec<Due>) = pending.drain(..).partition(|d| d.at <= now);
        *pending = later;
        due
    }

    /// Puts `due` back for a retry after twice its last wait, at most `cap`.
    fn retry(&self, due: Vec<Due>, cap: Duration) {
        let now = Instant::now();
        self.pending().extend(due.into_iter().map(|d| {
            let backoff = d.backoff.saturating_mul(2).min(cap);
            Due {
                range: d.range,
                at: super::later(now, backoff),
                backoff,
            }
        }));
    }
}

impl Inner {
    /// A ring change took `ranges` from this node: they are cleaned once the ring settled.
    pub(crate) fn ranges_lost(&self, ranges: Vec<HashRange>) {
        tracing::debug!(
            ranges = ranges.len(),
            settle = ?self.config.ownership_settle,
            "ring change: ranges no longer replicated here are cleaned after the settle delay"
        );
        self.cleanup.lost(ranges, self.config.ownership_settle);
    }

    /// Takes `bytes` from the node's healing bandwidth (`anti_entropy_bandwidth`): Merkle
    /// anti-entropy's bucket when it runs, so everything that heals shares the budget; the
    /// cleanup's own otherwise. How many milliseconds to wait before sending them (0 for
    /// `bytes == 0` unless the budget is owed).
    pub(crate) fn take_healing_bandwidth(&self, bytes: u64) -> u64 {
        let now_ms = self.hlc.wall_clock().now_ms();
        match &self.merkle {
            Some(m) => m.take_bandwidth(now_ms, bytes),
            None => self
                .cleanup
                .limiter
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(now_ms, bytes),
        }
    }

    /// Waits until `bytes` may go under the anti-entropy bandwidth limit
    /// ([`Inner::take_healing_bandwidth`]).
    async fn throttle_cleanup(&self, bytes: u64) {
        let wait = self.take_healing_bandwidth(bytes);
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }
}

/// What one round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Report {
    removed: u64,
    kept: u64,
}

/// The cleanup task: runs each set of lost ranges when it is due, until the node stops.
pub(crate) async fn run(inner: Arc<Inner>) {
    let state = &inner.cleanup;
    let settle = inner.config.ownership_settle;
    let cap = settle.saturating_mul(MAX_BACKOFF);
    let start = Instant::now();
    let mut sweep_at = super::later(start, settle);
    loop {
        let woken = state.wake.notified();
        let next = state.next_due().map_or(sweep_at, |at| at.min(sweep_at));
        if next > Instant::now() {
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = woken => {}
            }
            continue;
        }
        if inner.stopping.load(Ordering::SeqCst) {
            return;
        }
        if sweep_at <= Instant::now() {
            match sweep_unreplicated(&inner).await {
                Ok(Some(again)) => sweep_at = again,
                Ok(None) => {
                    let now = Instant::now();
                    let interval = inner.config.anti_entropy_interval;
                    sweep_at = super::later(now, interval);
                }
                Err(StorageError::Closed) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cleanup sweep: storage failed; retried later");
                    let now = Instant::now();
                    sweep_at = super::later(now, settle);
                }
            }
            continue;
        }
        let due = state.take_due(Instant::now());
        let ranges: Vec<HashRange> = due.iter().map(|d| d.range).collect();
        inner.stats.cleanup_rounds.fetch_add(1, Ordering::Relaxed);
        let result = round(&inner, &ranges).await;
        let report = match result {
            Ok(report) => report,
            Err(StorageError::Closed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cleanup: storage failed; the round is retried");
                state.retry(due, cap);
                continue;
            }
        };
        count(&inner, report);
        if report.kept > 0 || inner.stopping.load(Ordering::SeqCst) {
            tracing::info!(
                removed = report.removed,
                kept = report.kept,
                "cleanup: records of ranges no longer replicated here were kept (not every \
                 current replica acknowledged them); retried later"
            );
            state.retry(due, cap);
        } else if report.removed > 0 {
            tracing::info!(
                removed = report.removed,
                "cleanup: records of ranges no longer replicated here handed off and removed"
            );
        }
    }
}

/// The sweep by state: once the settled ring has been quiet for `ownership_settle`, no join
/// is under way or just ended and this node is settled in its own ring, one round over every
/// range it does not replicate. `Some(at)`: not yet, try again at `at`; `None`: done (or
/// nothing to do), next one in `anti_entropy_interval`.
async fn sweep_unreplicated(inner: &Inner) -> Result<Option<Instant>, StorageError> {
    let settle = inner.config.ownership_settle;
    let now = Instant::now();
    // The view first: the follower notes a ring change before it publishes the view, so a
    // view loaded here whose ring just changed always finds the quiet time moved on.
    let view = inner.view.load_full();
    let quiet_at = inner.cleanup.quiet_at(settle);
    if quiet_at > now {
        return Ok(Some(quiet_at));
    }
    let me = inner.id;
    if view.in_transition()
        || view.is_joining(me)
        || !view.ring.members().iter().any(|m| m.node == me)
    {
        return Ok(Some(super::later(now, settle)));
    }
    let ranges = view.ring.unreplicated_ranges(me, view.n);
    if ranges.is_empty() {
        return Ok(None);
    }
    inner.stats.cleanup_rounds.fetch_add(1, Ordering::Relaxed);
    let report = round(inner, &ranges).await?;
    count(inner, report);
    if report.kept > 0 || report.removed > 0 {
        tracing::info!(
            removed = report.removed,
            kept = report.kept,
            "cleanup sweep: records of ranges not replicated here handed off and removed \
             (kept: not every current replica acknowledged them, or held by a transition)"
        );
    }
    Ok(None)
}

/// Adds a round's report to the stats.
fn count(inner: &Inner, report: Report) {
    inner
        .stats
        .cleanup_removed
        .fetch_add(report.removed, Ordering::Relaxed);
    inner
        .stats
        .cleanup_kept
        .fetch_add(report.kept, Ordering::Relaxed);
}

/// One round over `ranges`: range by range on a backend with ordered scans, one pass over
/// everything (filtered) on one whose every scan reads everything anyway.
async fn round(inner: &Inner, ranges: &[HashRange]) -> Result<Report, StorageError> {
    let scope = Scope::new(ranges);
    let mut report = Report::default();
    match inner.storage.capabilities().scans {
        ScanCost::Ordered => {
            for range in scope.ranges() {
                sweep(inner, range, None, &mut report).await?;
            }
        }
        ScanCost::FullScan => sweep(inner, HashRange::FULL, Some(&scope), &mut report).await?,
    }
    Ok(report)
}

/// Hands off and cleans the records of `range` (those `filter` contains, if given), page by
/// page.
async fn sweep(
    inner: &Inner,
    range: HashRange,
    filter: Option<&Scope>,
    report: &mut Report,
) -> Result<(), StorageError> {
    // A backend whose every scan visits everything gets large pages, as the Merkle rebuild
    // does: a round of 1,024-record pages over 1M records would be 1,000 full passes.
    let page = match inner.storage.capabilities().scans {
        ScanCost::Ordered => PAGE,
        ScanCost::FullScan => FULL_SCAN_PAGE,
    };
    let page = std::num::NonZeroUsize::new(page).expect("non-zero");
    let me = inner.id;
    let mut cursor = None;
    loop {
        if inner.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        let p = inner.storage.scan(range, cursor, page).await?;
        let view = inner.view.load_full();
        let now_ms = inner.hlc.wall_clock().now_ms();
        let mut plan = Plan::default();
        for e in p.entries {
            if filter.is_some_and(|s| !s.contains(e.hash)) {
                continue;
            }
            if view.holds(&e.key, me) {
                // Held only through a join under way or just ended (a write set besides the
                // read ring's): kept, and the range is retried once that is over.
                if !super::view::is_replica(&view, &e.key, me) {
                    report.kept += 1;
                }
                continue;
            }
            if e.record
                .is_collectable(now_ms, inner.config.tombstone_grace)
            {
                plan.add_collectable(e.key, e.record);
            } else if e.record.is_tombstone() || e.record.is_expired(now_ms) {
                let targets = view.write_targets(&e.key);
                plan.add_tombstone(e.key, e.record, targets);
            } else {
                let targets = view.write_targets(&e.key);
                plan.add(e.key, e.record, targets);
            }
        }
        hand_off(inner, &view, &mut plan).await;
        // Decided in the view of this moment: a ring change during the handoff may have made
        // a key this node's again, or given it a replica that was not sent the record.
        let now = inner.view.load_full();
        let decision = plan.decide(|key| now.holds(key, me), |key| now.write_targets(key));
        report.kept += decision.kept;
        if inner.stopping.load(Ordering::SeqCst) {
            report.kept += decision.remove.len() as u64;
            return Ok(());
        }
        let (removed, changed) = remove(inner, decision.remove).await?;
        report.removed += removed;
        report.kept += changed;
        match p.next {
            Some(next) => cursor = Some(next),
            None => return Ok(()),
        }
    }
}

/// Sends every batch of `plan` to its target and notes what each acknowledged.
async fn hand_off(inner: &Inner, view: &View, plan: &mut Plan) {
    // Half the frame limit leaves room for the encoding's overhead, as the join's pages do:
    // with a smaller frame limit than the default, a 4 MiB batch would fail every retry.
    let max_bytes = APPLY_BATCH_BYTES.min(inner.transport.max_frame_len() / 2);
    for (target, items) in plan.batches(MAX_BATCH, max_bytes) {
        let Some(addr) = view.addr(target).cloned() else {
            continue;
        };
        let message = Envelope::Replica(ReplicaMessage::Apply {
            version: REPLICA_PROTOCOL_VERSION,
            writes: plan.writes(&items),
        });
        let bytes = crate::wire::encode_payload(&message, usize::MAX).map_or(0, |b| b.len());
        inner.throttle_cleanup(bytes as u64).await;
        let timeout = inner.config.request_timeout;
        match inner.rpc.request(&addr, &message, timeout).await {
            Ok(Envelope::Replica(ReplicaMessage::Applied { outcomes })) => {
                plan.acknowledged(target, &items, &outcomes);
            }
            Ok(other) => tracing::debug!(%target, ?other, "cleanup batch refused"),
            Err(e) => tracing::debug!(%target, error = %e, "cleanup batch failed"),
        }
    }
}

/// Removes each `(key, version)` while unchanged, keeping the Merkle tree in step; returns
/// how many were removed and how many had changed meanwhile. Concurrent, so a durable
/// backend shares its syncs between them (group commit).
async fn remove(
    inner: &Inner,
    removals: Vec<(Bytes, Version)>,
) -> Result<(u64, u64), StorageError> {
    let tree = inner.merkle.as_ref().map(|m| &m.tree);
    let results =
        futures::future::join_all(removals.into_iter().map(|(key, version)| async move {
            let mut guard = tree.map(|tree| PendingGuard {
                tree,
                pending: vec![tree.begin(key_hash(&key))],
            });
            let result = inner.storage.remove_if_version(&key, version).await;
            if let Some(pending) = guard.as_mut().and_then(|g| g.pending.pop()) {
                let tree = tree.expect("a guard has a tree");
                match &result {
                    Ok(removed) => tree.finish_removal(pending, removed.then_some(&version)),
                    Err(_) => tree.abandon(pending),
                }
            }
            result
        }))
        .await;
    let (mut removed, mut changed) = (0, 0);
    let mut failure = None;
    for result in results {
        match result {
            Ok(true) => removed += 1,
            Ok(false) => changed += 1,
            Err(e) => {
                changed += 1;
                failure.get_or_insert(e);
            }
        }
    }
    match failure {
        // What was removed before the failure is counted by the next round's scan (it
        // finds less); the round itself is retried.
        Some(e) => Err(e),
        None => Ok((removed, changed)),
    }
}

/// The positions of a set of ranges, as sorted, disjoint, non-touching intervals
/// (inclusive), so a position is looked up by binary search.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Scope {
    intervals: Vec<(u64, u64)>,
}

impl Scope {
    fn new(ranges: &[HashRange]) -> Scope {
        let mut raw: Vec<(u64, u64)> = Vec::with_capacity(ranges.len() + 1);
        for r in ranges {
            if r.is_full() {
                raw.push((0, u64::MAX));
            } else if r.start < r.end {
                raw.push((r.start, r.end - 1));
            } else {
                raw.push((r.start, u64::MAX));
                if r.end > 0 {
                    raw.push((0, r.end - 1));
                }
            }
        }
        raw.sort_unstable();
        let mut intervals: Vec<(u64, u64)> = Vec::with_capacity(raw.len());
        for (lo, hi) in raw {
            match intervals.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => intervals.push((lo, hi)),
            }
        }
        Scope { intervals }
    }

    fn contains(&self, hash: u64) -> bool {
        let at = self.intervals.partition_point(|&(lo, _)| lo <= hash);
        at > 0 && self.intervals[at - 1].1 >= hash
    }

    /// The intervals as ranges (the full ring as [`HashRange::FULL`]).
    fn ranges(&self) -> impl Iterator<Item = HashRange> + '_ {
        self.intervals
            .iter()
            .map(|&(lo, hi)| HashRange::new(lo, hi.wrapping_add(1)))
    }
}

/// One page's cleanup decision, without I/O: the records to hand off, the current replicas
/// each must reach, and which of them acknowledged it.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    items: Vec<Item>,
}

#[derive(Debug)]
struct Item {
    key: Bytes,
    record: Record,
    /// The replicas it is sent to (none for a collectable record, which is not sent).
    targets: Vec<NodeId>,
    acked: Vec<NodeId>,
    collectable: bool,
    /// Handed off but never removed here: a tombstone (or expired value) not yet collectable,
    /// left to the purge.
    stays: bool,
}

/// What to do with a page's records once the handoff is over.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Decision {
    /// Records every current replica acknowledged (or collectable ones), to remove while
    /// unchanged.
    pub(crate) remove: Vec<(Bytes, Version)>,
    /// Records to keep for a later round: some current replica did not acknowledge them.
    pub(crate) kept: u64,
}

impl Plan {
    /// A record to hand to `targets`, its key's current replicas.
    pub(crate) fn add(&mut self, key: Bytes, record: Record, targets: Vec<NodeId>) {
        self.push(key, record, targets, false, false);
    }

    /// A tombstone not yet collectable: handed to `targets` like any record, never removed
    /// (the purge removes it after its grace period).
    pub(crate) fn add_tombstone(&mut self, key: Bytes, record: Record, targets: Vec<NodeId>) {
        self.push(key, record, targets, false, true);
    }

    /// A record past its grace period: removed without a handoff, as the purge would.
    pub(crate) fn add_collectable(&mut self, key: Bytes, record: Record) {
        self.push(key, record, Vec::new(), true, false);
    }

    fn push(
        &mut self,
        key: Bytes,
        record: Record,
        targets: Vec<NodeId>,
        collectable: bool,
        stays: bool,
    ) {
        self.items.push(Item {
            key,
            record,
            targets,
            acked: Vec::new(),
            collectable,
            stays,
        });
    }

    /// Per target, the items to send it, in batches of at most `max_count` records and
    /// `max_bytes` of keys and records (a record larger than that goes alone).
    pub(crate) fn batches(&self, max_count: usize, max_bytes: usize) -> Vec<(NodeId, Vec<usize>)> {
        let mut open: Vec<(NodeId, Vec<usize>, usize)> = Vec::new();
        let mut full = Vec::new();
        for (i, item) in self.items.iter().enumerate() {
            let bytes = item.key.len() + item.record.encoded_len();
            for &target in &item.targets {
                let at = match open.iter().position(|(t, _, _)| *t == target) {
                    Some(at) => at,
                    None => {
                        open.push((target, Vec::new(), 0));
                        open.len() - 1
                    }
                };
                let (_, batch, size) = &mut open[at];
                if !batch.is_empty() && (batch.len() >= max_count || *size + bytes > max_bytes) {
                    full.push((target, std::mem::take(batch)));
                    *size = 0;
                }
                batch.push(i);
                *size += bytes;
            }
        }
        full.extend(
            open.into_iter()
                .filter(|(_, b, _)| !b.is_empty())
                .map(|(t, b, _)| (t, b)),
        );
        full
    }

    /// The writes of `items`, in order.
    pub(crate) fn writes(&self, items: &[usize]) -> Vec<Write> {
        items
            .iter()
            .map(|&i| Write {
                key: self.items[i].key.clone(),
                record: self.items[i].record.clone(),
            })
            .collect()
    }

    /// `target` answered a batch of `items` with `outcomes`: each acknowledged record
    /// ([`WriteOutcome::is_ack`]) counts it. An answer of the wrong length acknowledges
    /// nothing.
    pub(crate) fn acknowledged(
        &mut self,
        target: NodeId,
        items: &[usize],
        outcomes: &[WriteOutcome],
    ) {
        if items.len() != outcomes.len() {
            return;
        }
        for (&i, outcome) in items.iter().zip(outcomes) {
            let item = &mut self.items[i];
            if outcome.is_ack() && item.targets.contains(&target) && !item.acked.contains(&target) {
                item.acked.push(target);
            }
        }
    }

    /// Decides each record by the view of now: one this node `holds` again is left alone;
    /// one whose every current `replicas` (at least one) acknowledged it is removed, as is a
    /// collectable one, unless it stays (a tombstone not yet collectable: never removed
    /// here, kept for a retry only if a replica has not acknowledged it); every other is
    /// kept.
    pub(crate) fn decide(
        self,
        holds: impl Fn(&[u8]) -> bool,
        replicas: impl Fn(&[u8]) -> Vec<NodeId>,
    ) -> Decision {
        let mut decision = Decision::default();
        for item in self.items {
            if holds(&item.key) {
                continue;
            }
            let acked = item.collectable || {
                let now = replicas(&item.key);
                !now.is_empty() && now.iter().all(|r| item.acked.contains(r))
            };
            if item.stays {
                // Never removed here; one a replica has not acknowledged is sent again.
                decision.kept += u64::from(!acked);
            } else if acked {
                decision.remove.push((item.key, item.record.version));
            } else {
                decision.kept += 1;
            }
        }
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Timestamp;
    use crate::replication::Refusal;

    fn v(ms: u64) -> Version {
        Version::new(Timestamp::new(ms, 0), NodeId(1))
    }

    fn key(k: &str) -> Bytes {
        Bytes::copy_from_slice(k.as_bytes())
    }

    fn ids(list: &[u64]) -> Vec<NodeId> {
        list.iter().map(|&i| NodeId(i)).collect()
    }

    /// Three records for replicas 2 and 3, and one collectable.
    fn plan() -> Plan {
        let mut plan = Plan::default();
        for (k, ms) in [("a", 1), ("b", 2), ("c", 3)] {
            plan.add(key(k), Record::value(k, v(ms)), ids(&[2, 3]));
        }
        plan.add_collectable(key("dead"), Record::tombstone(v(4)));
        plan
    }

    #[test]
    fn a_record_is_removed_only_when_every_current_replica_acknowledged_it() {
        let mut plan = plan();
        let batches = plan.batches(MAX_BATCH, APPLY_BATCH_BYTES);
        assert_eq!(
            batches,
            vec![(NodeId(2), vec![0, 1, 2]), (NodeId(3), vec![0, 1, 2])],
            "the collectable record is not sent"
        );
        let stale = WriteOutcome::Stale { current: v(9) };
        let refused = WriteOutcome::Refused(Refusal::Invalid {
            reason: "no".into(),
        });
        // Replica 2 takes all three (a Stale answer is an acknowledgement: it holds as new).
        plan.acknowledged(
            NodeId(2),
            &[0, 1, 2],
            &[WriteOutcome::Applied, stale.clone(), WriteOutcome::Applied],
        );
        // Replica 3 refuses "b" and never answers for "c".
        plan.acknowledged(NodeId(3), &[0, 1], &[WriteOutcome::Applied, refused]);
        // A member that was not a target acknowledges nothing that counts.
        plan.acknowledged(NodeId(7), &[2], &[WriteOutcome::Applied]);
        let decision = plan.decide(|_| false, |_| ids(&[2, 3]));
        assert_eq!(
            decision,
            Decision {
                remove: vec![(key("a"), v(1)), (key("dead"), v(4))],
                kept: 2,
            }
        );
    }

    #[test]
    fn a_tombstone_not_yet_collectable_is_handed_off_and_stays_for_the_purge() {
        let mut plan = Plan::default();
        plan.add(key("a"), Record::value("a", v(1)), ids(&[2]));
        plan.add_tombstone(key("gone"), Record::tombstone(v(2)), ids(&[2]));
        plan.add_tombstone(key("unsent"), Record::tombstone(v(3)), ids(&[2]));
        assert_eq!(
            plan.batches(MAX_BATCH, APPLY_BATCH_BYTES),
            vec![(NodeId(2), vec![0, 1, 2])],
            "the tombstones go to the replicas"
        );
        plan.acknowledged(
            NodeId(2),
            &[0, 1],
            &[WriteOutcome::Applied, WriteOutcome::Applied],
        );
        // Here they keep rejecting older writes that arrive late; the purge removes them.
        // The one the replica did not acknowledge is kept for a retry.
        assert_eq!(
            plan.decide(|_| false, |_| ids(&[2])),
            Decision {
                remove: vec![(key("a"), v(1))],
                kept: 1,
            }
        );
    }

    #[test]
    fn the_view_at_the_decision_wins_over_the_one_the_records_were_sent_by() {
        let mut plan = plan();
        for target in [2, 3] {
            plan.acknowledged(
                NodeId(target),
                &[0, 1, 2],
                &[
                    WriteOutcome::Applied,
                    WriteOutcome::Applied,
                    WriteOutcome::Applied,
                ],
            );
        }
        // "a" is this node's again; "b" gained replica 4, which was never sent it; "c" has
        // no replica left to hold it.
        let decision = plan.decide(
            |k| k == b"a",
            |k| match k {
                b"b" => ids(&[2, 4]),
                b"c" => Vec::new(),
                _ => ids(&[2, 3]),
            },
        );
        assert_eq!(
            decision,
            Decision {
                remove: vec![(key("dead"), v(4))],
                kept: 2,
            },
            "the key held again is neither removed nor counted as kept"
        );
    }

    #[test]
    fn an_answer_of_the_wrong_length_acknowledges_nothing() {
        let mut plan = plan();
        plan.acknowledged(NodeId(2), &[0, 1, 2], &[WriteOutcome::Applied]);
        plan.acknowledged(
            NodeId(3),
            &[0, 1, 2],
            &[
                WriteOutcome::Applied,
                WriteOutcome::Applied,
                WriteOutcome::Applied,
            ],
        );
        let decision = plan.decide(|_| false, |_| ids(&[2, 3]));
        assert_eq!(decision.kept, 3);
        assert_eq!(decision.remove, vec![(key("dead"), v(4))]);
    }

    #[test]
    fn batches_are_bounded_by_count_and_bytes() {
        let mut plan = Plan::default();
        for i in 0..10u64 {
            plan.add(
                key(&format!("k{i}")),
                Record::value("x".repeat(100), v(i)),
                ids(&[2]),
            );
        }
        let by_count = plan.batches(4, usize::MAX);
        let sizes: Vec<usize> = by_count.iter().map(|(_, b)| b.len()).collect();
        assert_eq!(sizes, [4, 4, 2]);
        let one = plan.items[0].key.len() + plan.items[0].record.encoded_len();
        let by_bytes = plan.batches(MAX_BATCH, 3 * one);
        let sizes: Vec<usize> = by_bytes.iter().map(|(_, b)| b.len()).collect();
        assert_eq!(sizes, [3, 3, 3, 1]);
        let all: Vec<usize> = by_bytes.into_iter().flat_map(|(_, b)| b).collect();
        assert_eq!(
            all,
            (0..10).collect::<Vec<_>>(),
            "each record once, in order"
        );
        // A record over the byte bound still goes, alone.
        assert_eq!(plan.batches(MAX_BATCH, 1).len(), 10);
    }

    #[test]
    fn a_scope_holds_exactly_the_positions_of_its_ranges() {
        let scope = Scope::new(&[
            HashRange::new(100, 200),
            HashRange::new(150, 300),
            HashRange::new(300, 310),
            HashRange::new(u64::MAX - 5, 10),
        ]);
        assert_eq!(
            scope.intervals,
            vec![(0, 9), (100, 309), (u64::MAX - 5, u64::MAX)]
        );
        for (hash, inside) in [
            (0, true),
            (9, true),
            (10, false),
            (99, false),
            (100, true),
            (309, true),
            (310, false),
            (u64::MAX - 6, false),
            (u64::MAX, true),
        ] {
            assert_eq!(scope.contains(hash), inside, "{hash}");
        }
        let ranges: Vec<HashRange> = scope.ranges().collect();
        assert_eq!(ranges[1], HashRange::new(100, 310));
        assert_eq!(ranges[2], HashRange::new(u64::MAX - 5, 0));
        let full = Scope::new(&[HashRange::FULL, HashRange::new(5, 6)]);
        assert_eq!(full.ranges().collect::<Vec<_>>(), vec![HashRange::FULL]);
        assert!(full.contains(0) && full.contains(u64::MAX));
        assert!(!Scope::new(&[]).contains(0));
    }
}
