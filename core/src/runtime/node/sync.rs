//! Ring-buffer anti-entropy's driver: the log of writes this node applied as a replica, the
//! periodic offers to each co-replica, and the replica's answer to an offer.
//!
//! Every `sync_interval` the task walks the members in the ring. For each peer it offers the
//! log entries after the peer's cursor whose keys the peer replicates (by this node's ring)
//! and that did not come from that peer, as `SyncOffer` digests of at most [`OFFER_LIMIT`],
//! until the peer has been offered everything up to the log's head (at most enough offers
//! for a whole log per round); the peer answers `SyncWant` with what it lacks; the records
//! go with an ordinary `Apply` (so the peer's drift check applies), and only then does the
//! cursor move.
//! A failed step leaves the cursor where it was: the next round offers the same entries
//! again, so nothing is lost. A cursor overtaken by the writer, a peer first seen and a peer
//! in a new life (restarted or wiped) are handed to Merkle anti-entropy instead
//! ([`super::merkle`]): an exchange with that peer is scheduled at once, which compares every
//! range the two share, and the log resumes where it stood when the peer was handed over.
//! Records past the purge horizon (`Record::is_collectable` with `tombstone_grace`) are never
//! offered.
//!
//! Under a write rate that would fill the log within one interval the round does not wait
//! for its tick: once a quarter of the log's capacity was written since the last round
//! began, the writer wakes the task. Otherwise a writer faster than the log's capacity per
//! interval overtakes every cursor, and every round hands its peers to a Merkle exchange
//! instead (the rounds were also capped at 8,192 offered entries a peer, so any rate above
//! that overtook them).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

use bytes::Bytes;

use super::Inner;
use crate::envelope::Envelope;
use crate::hash::key_hash;
use crate::healing::sync::{AppliedLog, PeerSync, Since, SyncCursors};
use crate::hlc::Version;
use crate::identity::{Address, NodeId};
use crate::membership::MemberState;
use crate::replication::{REPLICA_PROTOCOL_VERSION, Refusal, ReplicaMessage, SyncEntry, Write};
use crate::storage::{ApplyOutcome, Storage};

/// Most digests in one offer.
pub(crate) const OFFER_LIMIT: usize = 1024;

/// The applied-writes log (`None` with anti-entropy off).
pub(crate) type SyncLog = Option<SyncState>;

/// The applied-writes log, and what wakes the task early.
#[derive(Debug)]
pub(crate) struct SyncState {
    log: Mutex<AppliedLog>,
    capacity: usize,
    /// The log head at which the next round is due before its tick.
    early_at: AtomicU64,
    wake: Notify,
}

impl SyncState {
    pub(crate) fn new(capacity: usize) -> Self {
        SyncState {
            log: Mutex::new(AppliedLog::new(capacity)),
            capacity,
            early_at: AtomicU64::new(early_step(capacity)),
            wake: Notify::new(),
        }
    }

    pub(crate) fn log(&self) -> std::sync::MutexGuard<'_, AppliedLog> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Most offers to one peer in one round: enough for every entry the log holds.
    fn offers_per_round(&self) -> usize {
        self.capacity.div_ceil(OFFER_LIMIT) + 1
    }
}

/// How many entries written since a round began make the next one due at once.
fn early_step(capacity: usize) -> u64 {
    (capacity / 4).max(1) as u64
}

impl Inner {
    /// Notes the writes of a batch that storage applied (`logged[i]` went with `results[i]`),
    /// all of them from `source` (`None`: originated here).
    pub(crate) fn log_applied(
        &self,
        logged: Vec<(Bytes, Version)>,
        results: &[ApplyOutcome],
        source: Option<NodeId>,
    ) {
        self.log_entries(
            logged
                .into_iter()
                .zip(results)
                .filter(|(_, outcome)| outcome.is_applied())
                .map(|(entry, _)| entry),
            source,
        );
    }

    /// Enters applied writes, all from `source`, into the log.
    pub(crate) fn log_entries(
        &self,
        entries: impl IntoIterator<Item = (Bytes, Version)>,
        source: Option<NodeId>,
    ) {
        let Some(sync) = &self.sync else {
            return;
        };
        let head = {
            let mut log = sync.log();
            for (key, version) in entries {
                log.push(key, version, source);
            }
            log.head()
        };
        if head >= sync.early_at.load(Ordering::Relaxed) {
            sync.wake.notify_one();
        }
    }

    /// Answers a `SyncOffer` from `sender` (the member the request came from,
    /// [`super::view::View::member_at`]): the indices of the entries this node holds nothing or
    /// something older for. An offer from a non-member or with a bad key is refused as
    /// `Invalid`; one with a key this node does not replicate, or that the sender replicates
    /// in none of the key's write sets ([`super::view::View::holds`]), as `OutOfRange` (all
    /// counted, `sync_refused`).
    pub(crate) async fn answer_offer(
        &self,
        sender: Option<NodeId>,
        entries: Vec<SyncEntry>,
    ) -> ReplicaMessage {
        let view = self.view.load_full();
        let Some(sender) = sender else {
            self.stats.sync_refused.fetch_add(1, Ordering::Relaxed);
            return ReplicaMessage::Refused(Refusal::Invalid {
                reason: "offer from a non-member".into(),
            });
        };
        for e in &entries {
            if e.key.is_empty() || e.key.len() > self.config.max_key_len.get() {
                self.stats.sync_refused.fetch_add(1, Ordering::Relaxed);
                return ReplicaMessage::Refused(Refusal::Invalid {
                    reason: format!("key of {} bytes", e.key.len()),
                });
            }
            if !super::view::is_replica(&view, &e.key, self.id) || !view.holds(&e.key, sender) {
                self.stats.sync_refused.fetch_add(1, Ordering::Relaxed);
                return ReplicaMessage::Refused(Refusal::OutOfRange {
                    key_hash: key_hash(&e.key),
                });
            }
        }
        let mut wanted = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            match self.storage.get(&e.key).await {
                Ok(Some(r)) if r.version >= e.version => {}
                Ok(_) => wanted.push(i as u32),
                Err(e) => {
                    self.stats.storage_failures.fetch_add(1, Ordering::Relaxed);
                    return ReplicaMessage::Refused(super::replica::storage_refusal(&e));
                }
            }
        }
        ReplicaMessage::SyncWant { wanted }
    }
}

/// The anti-entropy task: one round every `sync_interval` until the node stops, and one at
/// once whenever a quarter of the log was written since the last began.
pub(crate) async fn run(inner: Arc<Inner>) {
    let Some(sync) = &inner.sync else { return };
    let mut cursors = SyncCursors::default();
    let mut tick = tokio::time::interval(inner.config.sync_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = sync.wake.notified() => {
                inner.stats.sync_early_rounds.fetch_add(1, Ordering::Relaxed);
            }
        }
        let head = sync.log().head();
        sync.early_at
            .store(head + early_step(sync.capacity), Ordering::Relaxed);
        round(&inner, sync, &mut cursors).await;
    }
}

async fn round(inner: &Arc<Inner>, log: &SyncState, cursors: &mut SyncCursors) {
    let view = inner.view.load_full();
    let members = inner.membership.members();
    cursors.retain(|id| view.members.contains_key(&id));
    for m in members.iter() {
        if m.id == inner.id || !matches!(m.state, MemberState::Alive | MemberState::Suspect) {
            continue;
        }
        let Some(addr) = view.addr(m.id).cloned() else {
            continue;
        };
        let shares = |key: &[u8]| {
            super::view::is_replica(&view, key, m.id)
                && super::view::is_replica(&view, key, inner.id)
        };
        for _ in 0..log.offers_per_round() {
            let state = cursors.peer(m.id, m.life.generation, &log.log());
            match state {
                PeerSync::Log(from) => {
                    let since = log.log().since(from, OFFER_LIMIT);
                    let entries = match since {
                        Since::Overtaken => {
                            inner.stats.sync_overtaken.fetch_add(1, Ordering::Relaxed);
                            let head = log.log().head();
                            cursors.set(m.id, PeerSync::Compare { resume: head });
                            continue;
                        }
                        Since::Entries(e) => e,
                    };
                    let Some(last) = entries.last().map(|a| a.seq) else {
                        break;
                    };
                    let offer: Vec<(Bytes, Version)> = entries
                        .into_iter()
                        .filter(|a| a.source != Some(m.id) && shares(&a.key))
                        .map(|a| (a.key, a.version))
                        .collect();
                    // Busy or failed: the cursor stays, the next round offers them again.
                    let Ok(sent) = offer_to(inner, &addr, offer, None).await else {
                        break;
                    };
                    inner.stats.sync_repairs.fetch_add(sent, Ordering::Relaxed);
                    cursors.set(m.id, PeerSync::Log(last + 1));
                }
                PeerSync::Compare { resume } => {
                    if let Some(merkle) = &inner.merkle {
                        merkle.request(m.id);
                        inner.stats.merkle_requested.fetch_add(1, Ordering::Relaxed);
                    }
                    cursors.set(m.id, PeerSync::Log(resume));
                }
            }
        }
    }
}

/// Why [`offer_to`] stopped short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OfferFailed {
    /// The peer answered the offer `Busy` (counted as `healing_deferred`): try again later.
    Busy,
    /// A step failed: unreachable, refused, a bad answer, a record not acknowledged.
    Failed,
}

/// Offers `entries` to the peer at `addr` and sends what it lacks; the number of records
/// sent if every step succeeded (the peer now holds each record or a newer one). With
/// `meter`, every message waits for Merkle anti-entropy's bandwidth limit.
pub(crate) async fn offer_to(
    inner: &Inner,
    addr: &Address,
    entries: Vec<(Bytes, Version)>,
    meter: Option<&super::merkle::MerkleState>,
) -> Result<u64, OfferFailed> {
    use OfferFailed::Failed;
    if entries.is_empty() {
        return Ok(0);
    }
    let timeout = inner.config.request_timeout;
    let message = Envelope::Replica(ReplicaMessage::SyncOffer {
        version: REPLICA_PROTOCOL_VERSION,
        entries: entries
            .iter()
            .map(|(key, version)| SyncEntry {
                key: key.clone(),
                version: *version,
            })
            .collect(),
    });
    inner.stats.sync_offers.fetch_add(1, Ordering::Relaxed);
    if let Some(meter) = meter {
        meter.meter(inner, &message).await;
    }
    let wanted = match inner.rpc.request(addr, &message, timeout).await {
        Ok(Envelope::Replica(ReplicaMessage::SyncWant { wanted })) => wanted,
        Ok(Envelope::Replica(ReplicaMessage::Refused(Refusal::Busy))) => {
            inner.stats.healing_deferred.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(%addr, "anti-entropy offer put off: the peer is busy");
            return Err(OfferFailed::Busy);
        }
        Ok(other) => {
            tracing::debug!(%addr, ?other, "anti-entropy offer not answered");
            return Err(Failed);
        }
        Err(e) => {
            tracing::trace!(%addr, error = %e, "anti-entropy offer failed");
            return Err(Failed);
        }
    };
    // Strictly ascending, as `answer_offer` builds it: a repeated index would make this node
    // read and ship one record many times over.
    if wanted.windows(2).any(|w| w[0] >= w[1]) {
        tracing::debug!(%addr, "anti-entropy answer not strictly ascending");
        return Err(Failed);
    }
    let now_ms = inner.hlc.wall_clock().now_ms();
    // The records go in `Apply` batches of at most APPLY_BATCH_BYTES (1,024 large values
    // would not fit in one frame, and a batch that cannot be encoded would fail every retry).
    let mut batches: Vec<Vec<Write>> = vec![Vec::new()];
    let mut batch_bytes = 0;
    for i in wanted {
        let Some((key, _)) = entries.get(i as usize) else {
            tracing::debug!(%addr, i, "anti-entropy answer names no offered entry");
            return Err(Failed);
        };
        match inner.storage.get(key).await {
            // Never ship a record past the purge horizon; purged meanwhile: nothing to send.
            Ok(Some(record)) if !record.is_collectable(now_ms, inner.config.tombstone_grace) => {
                let bytes = key.len() + record.encoded_len();
                if batch_bytes + bytes > APPLY_BATCH_BYTES
                    && batches.last().is_some_and(|b| !b.is_empty())
                {
                    batches.push(Vec::new());
                    batch_bytes = 0;
                }
                batch_bytes += bytes;
                if let Some(batch) = batches.last_mut() {
                    batch.push(Write {
                        key: key.clone(),
                        record,
                    });
                }
            }
            Ok(_) => {}
            Err(_) => return Err(Failed),
        }
    }
    let mut sent = 0;
    for writes in batches.into_iter().filter(|b| !b.is_empty()) {
        let n = writes.len() as u64;
        let message = Envelope::Replica(ReplicaMessage::Apply {
            version: REPLICA_PROTOCOL_VERSION,
            writes,
        });
        if let Some(meter) = meter {
            meter.meter(inner, &message).await;
        }
        match inner.rpc.request(addr, &message, timeout).await {
            Ok(Envelope::Replica(ReplicaMessage::Applied { outcomes }))
                if outcomes.len() as u64 == n && outcomes.iter().all(|o| o.is_ack()) =>
            {
                sent += n;
            }
            _ => return Err(Failed),
        }
    }
    Ok(sent)
}

/// Most key and record bytes in one anti-entropy `Apply` (well under the 16 MiB frame limit
/// with one maximum-size value in it).
const APPLY_BATCH_BYTES: usize = 4 * 1024 * 1024;
