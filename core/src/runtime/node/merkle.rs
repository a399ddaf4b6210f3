//! Merkle anti-entropy's driver: the node's tree, the schedule of exchanges with each
//! co-replica, the replica's answers to a peer's exchange, and rebuilds from storage.
//!
//! - **Tree.** Built from storage when the node starts (before it serves), kept up to date by
//!   every replica apply (`replica.rs`), rebuilt every `merkle_rebuild_interval`, after a
//!   purge that removed records and after an apply whose effect on storage is unknown. The
//!   purge task runs rebuilds, so a purge never overlaps one.
//! - **Schedule.** One timer table: per alive co-replica, when its next exchange is due. A
//!   co-replica first seen or in a new life is due at once, then every
//!   `anti_entropy_interval` after an exchange completed; a failed exchange is retried after
//!   [`RETRY`] (at most the interval). The applied-writes log makes a co-replica due at once
//!   when its cursor was overtaken ([`MerkleState::request`]). At most
//!   `anti_entropy_concurrency` exchanges run at once, and every request they send waits for
//!   the node's bandwidth limit (`anti_entropy_bandwidth`, one token bucket). A peer that
//!   answers a leaf check or an offer `Busy` puts the exchange off: it is tried again after
//!   [`RETRY`], counted as `healing_deferred`, not as a failure.
//! - **Exchange.** [`crate::healing::exchange::Exchange`] decides; this file sends what it
//!   asks, scans storage for leaf checks and offers with the ring buffer's `SyncOffer`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::Inner;
use crate::envelope::Envelope;
use crate::hash::HashRange;
use crate::healing::exchange::{Coverage, Exchange, ExchangeError, RateLimit, Share, Step};
use crate::healing::merkle::{
    self, BoundsError, DEPTH, MAX_RECORDS_PER_CHECK_ACCEPTED, MerkleTree, RebuildReport,
};
use crate::hlc::Version;
use crate::identity::{Address, NodeId};
use crate::membership::MemberState;
use crate::replication::{REPLICA_PROTOCOL_VERSION, Refusal, ReplicaMessage};
use crate::storage::{RangeDigest, ScanCost, Storage, StorageError};

/// How soon a failed exchange is tried again (at most `anti_entropy_interval`).
pub(crate) const RETRY: Duration = Duration::from_secs(5);
/// How often the schedule is looked at when nothing wakes it.
const TICK: Duration = Duration::from_millis(500);

/// What Merkle anti-entropy keeps for the node.
#[derive(Debug)]
pub(crate) struct MerkleState {
    pub(crate) tree: MerkleTree,
    /// Co-replicas the log asked an exchange with.
    wanted: Mutex<HashSet<NodeId>>,
    wake: Notify,
    limiter: Mutex<RateLimit>,
}

impl MerkleState {
    pub(crate) fn new(bandwidth: u64, now_ms: u64) -> Self {
        MerkleState {
            tree: MerkleTree::new(),
            wanted: Mutex::new(HashSet::new()),
            wake: Notify::new(),
            limiter: Mutex::new(RateLimit::new(bandwidth, now_ms)),
        }
    }

    /// Schedules an exchange with `peer` at once.
    pub(crate) fn request(&self, peer: NodeId) {
        self.wanted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(peer);
        self.wake.notify_one();
    }

    /// Waits until `message` may go under the bandwidth limit, and counts its bytes.
    pub(crate) async fn meter(&self, inner: &Inner, message: &Envelope) {
        let bytes = crate::wire::encode_payload(message, usize::MAX).map_or(0, |b| b.len()) as u64;
        inner
            .stats
            .merkle_bytes_sent
            .fetch_add(bytes, Ordering::Relaxed);
        let wait = self.take_bandwidth(inner.hlc.wall_clock().now_ms(), bytes);
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }

    /// Takes `bytes` from the bandwidth limit; how many milliseconds to wait before sending
    /// them.
    pub(crate) fn take_bandwidth(&self, now_ms: u64, bytes: u64) -> u64 {
        self.limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(now_ms, bytes)
    }
}

/// Recomputes the tree from storage (see `healing::merkle`); counts it.
pub(crate) async fn rebuild(inner: &Inner) -> Result<RebuildReport, StorageError> {
    let Some(state) = &inner.merkle else {
        return Ok(RebuildReport::default());
    };
    let mut fresh = state.tree.start_rebuild();
    let page = scan_page(&inner.storage);
    let mut cursor = None;
    loop {
        let p = inner.storage.scan(HashRange::FULL, cursor, page).await?;
        for e in &p.entries {
            fresh.add(e.hash, &e.record.version);
        }
        match p.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let report = state.tree.finish_rebuild(fresh);
    inner.stats.merkle_rebuilds.fetch_add(1, Ordering::Relaxed);
    inner
        .stats
        .merkle_rebuild_corrected
        .fetch_add(u64::from(report.corrected), Ordering::Relaxed);
    if report.corrected > 0 {
        tracing::info!(
            corrected = report.corrected,
            "Merkle rebuild corrected leaves that differed from storage"
        );
    }
    Ok(report)
}

/// Records per scan page: large for backends that visit everything on each page.
fn scan_page(storage: &impl Storage) -> std::num::NonZeroUsize {
    let n = match storage.capabilities().scans {
        ScanCost::FullScan => 65_536,
        ScanCost::Ordered => 4096,
    };
    std::num::NonZeroUsize::new(n).expect("non-zero")
}

/// Per leaf of `leaves` (ascending), the digest of the records in it that `shares` and that
/// are not past `cutoff_ms`, and with `keep` those records' keys and versions.
type LeafScan = (Vec<RangeDigest>, Vec<Vec<(Bytes, Version)>>);

async fn scan_leaves(
    inner: &Inner,
    leaves: &[u32],
    cutoff_ms: u64,
    shares: &(dyn Fn(&[u8]) -> bool + Sync),
    keep: bool,
) -> Result<LeafScan, StorageError> {
    let mut digests = vec![RangeDigest::default(); leaves.len()];
    let mut kept = vec![Vec::new(); if keep { leaves.len() } else { 0 }];
    let (Some(&first), Some(&last)) = (leaves.first(), leaves.last()) else {
        return Ok((digests, kept));
    };
    let span = merkle::leaf_span(first, last);
    let page = scan_page(&inner.storage);
    let mut cursor = None;
    loop {
        let p = inner.storage.scan(span, cursor, page).await?;
        for e in p.entries {
            let Ok(i) = leaves.binary_search(&merkle::leaf_of(e.hash)) else {
                continue;
            };
            if merkle::past_horizon(&e.record, cutoff_ms) || !shares(&e.key) {
                continue;
            }
            digests[i].add(merkle::entry_hash(e.hash, &e.record.version));
            if keep {
                kept[i].push((e.key, e.record.version));
            }
        }
        match p.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Ok((digests, kept))
}

fn coverage(view: &super::view::View, a: NodeId, b: NodeId) -> Coverage {
    let shared = view.ring.shared_ranges(a, b, view.n);
    if shared == [HashRange::FULL] {
        Coverage::full()
    } else {
        Coverage::new(&shared)
    }
}

impl Inner {
    /// A ring change made `peers` co-replicas of ranges this node already held: each gets an
    /// exchange at once instead of within `anti_entropy_interval`, so a dead member's ranges
    /// are re-replicated (and a joining member's ranges streamed to it) by the survivors.
    pub(crate) fn co_replicas_gained(&self, peers: &[NodeId]) {
        let Some(state) = &self.merkle else { return };
        for &peer in peers {
            state.request(peer);
        }
        self.stats
            .merkle_ring_changes
            .fetch_add(peers.len() as u64, Ordering::Relaxed);
        tracing::debug!(?peers, "ring change: new co-replicas compared at once");
    }

    fn merkle_refusal(&self, e: &BoundsError) -> ReplicaMessage {
        self.stats.merkle_refused.fetch_add(1, Ordering::Relaxed);
        ReplicaMessage::Refused(Refusal::Invalid {
            reason: e.to_string(),
        })
    }

    /// Answers `MerkleNodes`: the digests of those nodes of this node's tree.
    pub(crate) fn answer_merkle_nodes(&self, level: u8, deltas: &[u32]) -> ReplicaMessage {
        let Some(state) = &self.merkle else {
            return off();
        };
        let Some(indices) = crate::replication::message::delta_decode(deltas) else {
            self.stats.merkle_refused.fetch_add(1, Ordering::Relaxed);
            return ReplicaMessage::Refused(Refusal::Invalid {
                reason: "node indices past u32".into(),
            });
        };
        match state.tree.nodes(level, &indices) {
            Ok(digests) => ReplicaMessage::MerkleDigests { digests },
            Err(e) => self.merkle_refusal(&e),
        }
    }

    /// Answers `MerkleCheck`: the leaves whose digests (from storage, over what the two share,
    /// at the peer's horizon) differ from the peer's. `sender` is the member the request came
    /// from ([`super::view::View::member_at`]), `claimed` the id the check names: what is
    /// shared is computed with the sender, and a check from a non-member, or naming another
    /// member than its sender, is refused as `Invalid` (counted, `merkle_refused`). In
    /// keyring mode the transport authenticated the sender's address against its key; in
    /// insecure mode the address is a claim too.
    pub(crate) async fn answer_merkle_check(
        &self,
        sender: Option<NodeId>,
        claimed: NodeId,
        cutoff_ms: u64,
        leaves: Vec<u32>,
        digests: Vec<RangeDigest>,
    ) -> ReplicaMessage {
        let Some(state) = &self.merkle else {
            return off();
        };
        let from = match sender {
            Some(sender) if sender == claimed => sender,
            Some(sender) => {
                self.stats.merkle_refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%sender, %claimed, "Merkle check naming another member refused");
                return ReplicaMessage::Refused(Refusal::Invalid {
                    reason: format!("check names {claimed}, sent by {sender}"),
                });
            }
            None => {
                self.stats.merkle_refused.fetch_add(1, Ordering::Relaxed);
                return ReplicaMessage::Refused(Refusal::Invalid {
                    reason: "Merkle check from a non-member".into(),
                });
            }
        };
        if let Err(e) = merkle::check_leaves(&leaves, digests.len()) {
            return self.merkle_refusal(&e);
        }
        let (Some(&first), Some(&last)) = (leaves.first(), leaves.last()) else {
            return ReplicaMessage::MerkleDiffer { leaves };
        };
        let records = state.tree.records_between(first, last);
        if records > MAX_RECORDS_PER_CHECK_ACCEPTED {
            return self.merkle_refusal(&BoundsError::Span {
                records,
                max: MAX_RECORDS_PER_CHECK_ACCEPTED,
            });
        }
        let view = self.view.load_full();
        let cover = coverage(&view, self.id, from);
        if let Some(&leaf) = leaves.iter().find(|&&l| cover.of(DEPTH, l) == Share::None) {
            self.stats.merkle_refused.fetch_add(1, Ordering::Relaxed);
            return ReplicaMessage::Refused(Refusal::OutOfRange {
                key_hash: merkle::node_range(DEPTH, leaf).map_or(0, |r| r.start),
            });
        }
        let me = self.id;
        let shares = |key: &[u8]| {
            super::view::is_replica(&view, key, me) && super::view::is_replica(&view, key, from)
        };
        match scan_leaves(self, &leaves, cutoff_ms, &shares, false).await {
            Ok((own, _)) => ReplicaMessage::MerkleDiffer {
                leaves: leaves
                    .iter()
                    .zip(own.iter().zip(&digests))
                    .filter(|(_, (a, b))| a != b)
                    .map(|(l, _)| *l)
                    .collect(),
            },
            Err(e) => {
                self.stats.storage_failures.fetch_add(1, Ordering::Relaxed);
                ReplicaMessage::Refused(super::replica::storage_refusal(&e))
            }
        }
    }
}

fn off() -> ReplicaMessage {
    ReplicaMessage::Refused(Refusal::Invalid {
        reason: "anti-entropy is off on this node".into(),
    })
}

/// Why an exchange stopped short.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("the peer answered {0}")]
    Answer(String),
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("records offered were not all acknowledged")]
    Offer,
    /// The peer answered `Busy` (counted as `healing_deferred` where it did): not a failure,
    /// the exchange is tried again after [`RETRY`].
    #[error("the peer is busy with other healing requests")]
    Busy,
}

/// One exchange with `peer` at `addr`, as initiator.
async fn exchange(inner: &Inner, peer: NodeId, addr: &Address) -> Result<(), Failure> {
    let Some(state) = &inner.merkle else {
        return Ok(());
    };
    let view = inner.view.load_full();
    let mut x = Exchange::new(coverage(&view, inner.id, peer));
    let cutoff_ms = merkle::cutoff(
        inner.hlc.wall_clock().now_ms(),
        inner.config.tombstone_grace,
    );
    let me = inner.id;
    let shares = |key: &[u8]| {
        super::view::is_replica(&view, key, me) && super::view::is_replica(&view, key, peer)
    };
    let timeout = inner.config.request_timeout;
    let result = loop {
        match x.poll(&state.tree) {
            Step::Nodes { level, indices } => {
                let message = Envelope::Replica(ReplicaMessage::MerkleNodes {
                    version: REPLICA_PROTOCOL_VERSION,
                    level,
                    deltas: crate::replication::message::delta_encode(&indices),
                });
                state.meter(inner, &message).await;
                match inner.rpc.request(addr, &message, timeout).await {
                    Ok(Envelope::Replica(ReplicaMessage::MerkleDigests { digests })) => {
                        x.handle_digests(&state.tree, &digests)?;
                    }
                    Ok(other) => break Err(Failure::Answer(format!("{other:?}"))),
                    Err(e) => break Err(Failure::Answer(e.to_string())),
                }
            }
            Step::Check(leaves) => {
                let (digests, mut kept) =
                    scan_leaves(inner, &leaves, cutoff_ms, &shares, true).await?;
                let message = Envelope::Replica(ReplicaMessage::MerkleCheck {
                    version: REPLICA_PROTOCOL_VERSION,
                    from: inner.id,
                    cutoff_ms,
                    leaves: leaves.clone(),
                    digests,
                });
                state.meter(inner, &message).await;
                let differing = match inner.rpc.request(addr, &message, timeout).await {
                    Ok(Envelope::Replica(ReplicaMessage::MerkleDiffer { leaves })) => leaves,
                    Ok(Envelope::Replica(ReplicaMessage::Refused(Refusal::Busy))) => {
                        inner.stats.healing_deferred.fetch_add(1, Ordering::Relaxed);
                        break Err(Failure::Busy);
                    }
                    Ok(other) => break Err(Failure::Answer(format!("{other:?}"))),
                    Err(e) => break Err(Failure::Answer(e.to_string())),
                };
                let mut offer: Vec<(Bytes, Version)> = Vec::new();
                for leaf in &differing {
                    let Ok(i) = leaves.binary_search(leaf) else {
                        break;
                    };
                    offer.append(&mut kept[i]);
                }
                x.handle_checked(&differing)?;
                for chunk in offer.chunks(super::sync::OFFER_LIMIT) {
                    match super::sync::offer_to(inner, addr, chunk.to_vec(), Some(state)).await {
                        Ok(sent) => {
                            inner
                                .stats
                                .merkle_repairs
                                .fetch_add(sent, Ordering::Relaxed);
                        }
                        Err(super::sync::OfferFailed::Busy) => return Err(Failure::Busy),
                        Err(super::sync::OfferFailed::Failed) => return Err(Failure::Offer),
                    }
                }
            }
            Step::Wait => break Err(Failure::Exchange(ExchangeError::Unexpected)),
            Step::Done => break Ok(()),
        }
    };
    let stats = x.stats();
    inner
        .stats
        .merkle_nodes
        .fetch_add(stats.nodes, Ordering::Relaxed);
    inner
        .stats
        .merkle_leaves_checked
        .fetch_add(stats.leaves_checked, Ordering::Relaxed);
    inner
        .stats
        .merkle_leaves_differing
        .fetch_add(stats.leaves_differing, Ordering::Relaxed);
    result
}

/// When each co-replica's next exchange is due (the one timer table), and its life.
#[derive(Debug, Default)]
struct Schedule {
    due: HashMap<NodeId, (u64, tokio::time::Instant)>,
}

/// The exchange task: runs due exchanges until the node stops.
pub(crate) async fn run(inner: Arc<Inner>) {
    let Some(state) = &inner.merkle else { return };
    let interval = inner.config.anti_entropy_interval;
    let retry = RETRY.min(interval);
    let limit = inner.config.anti_entropy_concurrency.get();
    let mut schedule = Schedule::default();
    let mut running: tokio::task::JoinSet<(NodeId, Result<(), Failure>)> =
        tokio::task::JoinSet::new();
    let mut busy: HashSet<NodeId> = HashSet::new();
    loop {
        let now = tokio::time::Instant::now();
        let wanted: Vec<NodeId> = state
            .wanted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect();
        let view = inner.view.load_full();
        let members = inner.membership.members();
        schedule.due.retain(|id, _| view.members.contains_key(id));
        for m in members.iter() {
            if m.id == inner.id || !matches!(m.state, MemberState::Alive | MemberState::Suspect) {
                continue;
            }
            let entry = schedule.due.entry(m.id).or_insert((m.life.generation, now));
            if entry.0 != m.life.generation {
                *entry = (m.life.generation, now);
            }
            if wanted.contains(&m.id) {
                entry.1 = now;
            }
        }
        // Asked for while an exchange with it runs: that one may have begun before what the
        // log missed, so the request stands until it ends.
        state
            .wanted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(wanted.into_iter().filter(|id| busy.contains(id)));
        let mut due: Vec<(tokio::time::Instant, NodeId)> = schedule
            .due
            .iter()
            .filter(|(id, (_, at))| *at <= now && !busy.contains(id))
            .map(|(id, (_, at))| (*at, *id))
            .collect();
        due.sort();
        for (_, peer) in due {
            if busy.len() >= limit {
                break;
            }
            let Some(addr) = view.addr(peer).cloned() else {
                continue;
            };
            busy.insert(peer);
            let inner = inner.clone();
            running.spawn(async move {
                let result = exchange(&inner, peer, &addr).await;
                if let Err(e) = &result {
                    tracing::debug!(%peer, error = %e, "Merkle exchange failed; retried");
                }
                (peer, result)
            });
        }
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            () = state.wake.notified() => {}
            Some(done) = running.join_next(), if !running.is_empty() => {
                let Ok((peer, result)) = done else { continue };
                busy.remove(&peer);
                let ok = result.is_ok();
                match result {
                    Ok(()) => inner.stats.merkle_exchanges.fetch_add(1, Ordering::Relaxed),
                    // Put off, not failed: the peer had no room for it.
                    Err(Failure::Busy) => 0,
                    Err(_) => inner.stats.merkle_failures.fetch_add(1, Ordering::Relaxed),
                };
                if let Some(entry) = schedule.due.get_mut(&peer) {
                    entry.1 = tokio::time::Instant::now() + if ok { interval } else { retry };
                }
            }
        }
    }
}
