//! The replica side: what a node does with the records and reads its peers (and its own
//! coordinator) send it. Every record's version passes this node's clock first: one beyond
//! the drift bound would win every later write to its key, so it is refused, never stored.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::Inner;
use crate::identity::NodeId;
use crate::record::{Payload, Record};
use crate::replication::message::{Key, MAX_BATCH};
use crate::replication::{REPLICA_PROTOCOL_VERSION, Refusal, ReplicaMessage, Write, WriteOutcome};
use crate::storage::{ApplyOutcome, Storage, StorageError};

/// Most expensive healing requests (`MerkleCheck` and `Pull` scan storage, `SyncOffer` reads
/// a key per entry) a node serves at once; one more is answered [`Refusal::Busy`] and its
/// sender tries again later. Foreground `Apply` and `Read` take no permit.
pub(crate) const HEALING_SERVE_CONCURRENCY: usize = 4;

/// How the writes a replica applies enter the applied-writes log.
#[derive(Clone, Copy, Debug)]
pub(crate) enum LogAs {
    /// At once, as come from that member (`None`: from this node); never offered back to it.
    From(Option<NodeId>),
    /// Later, by the coordinator of the request that stamped them, once it knows which
    /// replicas acknowledged them (`Inner::replicate`).
    Coordinated,
    /// Never: records a joining node pulled from replicas that hold them already.
    Unlogged,
}

impl Inner {
    /// Answers one replica request from the peer at `from`.
    pub(crate) async fn serve(
        self: &Arc<Self>,
        from: &crate::identity::Address,
        message: ReplicaMessage,
    ) -> ReplicaMessage {
        match message {
            ReplicaMessage::Apply { version, writes } => {
                if let Some(refused) = self.check_version(version) {
                    return refused;
                }
                let source = self.view.load().member_at(from);
                ReplicaMessage::Applied {
                    outcomes: self.apply_writes(writes, false, LogAs::From(source)).await,
                }
            }
            ReplicaMessage::SyncOffer { version, entries } => {
                if let Some(refused) = self.check_version(version) {
                    return refused;
                }
                let Some(_permit) = self.healing_permit() else {
                    return self.busy();
                };
                let sender = self.view.load().member_at(from);
                self.answer_offer(sender, entries).await
            }
            ReplicaMessage::MerkleNodes {
                version,
                level,
                deltas,
            } => {
                if let Some(refused) = self.check_version(version) {
                    return refused;
                }
                self.answer_merkle_nodes(level, &deltas)
            }
            ReplicaMessage::MerkleCheck {
                version,
                from: claimed,
                cutoff_ms,
                leaves,
                digests,
            } => {
                if let Some(refused) = self.check_version(version) {
                    return refused;
                }
                let Some(_permit) = self.healing_permit() else {
                    return self.busy();
                };
                let sender = self.view.load().member_at(from);
                self.answer_merkle_check(sender, claimed, cutoff_ms, leaves, digests)
                    .await
            }
            ReplicaMessage::Pull {
                version,
                range,
                cursor,
                limit,
                cutoff_ms,
            } => {
                if let Some(refused) = self.check_version(version) {
                    return refused;
                }
                // A pull's page is what a node serves most of: while the healing budget is
                // owed, pulls wait (the puller tries again later) instead of adding to it.
                if self.take_healing_bandwidth(0) > 0 {
                    return self.busy();
                }
                let Some(permit) = self.healing_permit() else {
                    return self.busy();
                };
                let (reply, bytes) = self
                    .answer_pull(from, range, cursor, limit, cutoff_ms)
                    .await;
                drop(permit);
                // The page goes at once and its bytes are owed: the pulls after it are
                // answered `Busy` until the budget has refilled.
                self.take_healing_bandwidth(bytes);
                reply
            }
            ReplicaMessage::Read { version, keys } => {
                if let Some(refused) = self.check_version(version) {
                    return refused;
                }
                match self.read_keys(keys).await {
                    Ok(records) => ReplicaMessage::Records { records },
                    Err(refusal) => ReplicaMessage::Refused(refusal),
                }
            }
            _ => {
                self.stats
                    .bad_replica_requests
                    .fetch_add(1, Ordering::Relaxed);
                ReplicaMessage::Refused(Refusal::Invalid {
                    reason: "not a request".into(),
                })
            }
        }
    }

    /// A permit to serve one expensive healing request, if one of the
    /// [`HEALING_SERVE_CONCURRENCY`] is free; held while the request reads storage.
    fn healing_permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.healing.try_acquire().ok()
    }

    /// The answer to a healing request this node cannot take now, counted.
    fn busy(&self) -> ReplicaMessage {
        self.stats.healing_busy.fetch_add(1, Ordering::Relaxed);
        ReplicaMessage::Refused(Refusal::Busy)
    }

    fn check_version(&self, version: u16) -> Option<ReplicaMessage> {
        (version != REPLICA_PROTOCOL_VERSION).then(|| {
            self.stats
                .bad_replica_requests
                .fetch_add(1, Ordering::Relaxed);
            ReplicaMessage::Refused(Refusal::UnsupportedVersion {
                got: version,
                supported: REPLICA_PROTOCOL_VERSION,
            })
        })
    }

    /// Applies `writes` to local storage (apply-if-newer), each checked first: limits, then
    /// the clock-drift bound (unless `own`: records this node's clock just stamped, whose
    /// versions the HLC already covers even when the wall clock went back across a restart).
    /// One outcome per write, in order. `log`: how the applied ones enter the applied-writes
    /// log.
    pub(crate) async fn apply_writes(
        &self,
        writes: Vec<Write>,
        own: bool,
        log: LogAs,
    ) -> Vec<WriteOutcome> {
        let mut outcomes: Vec<Option<WriteOutcome>> = Vec::with_capacity(writes.len());
        let mut accepted: Vec<(usize, Bytes, Record)> = Vec::with_capacity(writes.len());
        for (i, w) in writes.into_iter().enumerate() {
            match self.admit(&w, own) {
                Ok(()) => {
                    outcomes.push(None);
                    accepted.push((i, w.key, w.record));
                }
                Err(refusal) => outcomes.push(Some(WriteOutcome::Refused(refusal))),
            }
        }
        if let Err(e) = self.floor.cover(&self.hlc, &self.storage).await {
            let refusal = storage_refusal(&e);
            for (i, _, _) in &accepted {
                outcomes[*i] = Some(WriteOutcome::Refused(refusal.clone()));
            }
            accepted.clear();
        }
        if !accepted.is_empty() {
            let (idx, batch): (Vec<usize>, Vec<(Bytes, Record)>) =
                accepted.into_iter().map(|(i, k, r)| (i, (k, r))).unzip();
            let logged: Vec<_> = match (&self.sync, &self.merkle) {
                (None, None) => Vec::new(),
                _ => batch.iter().map(|(k, r)| (k.clone(), r.version)).collect(),
            };
            // The tree learns of each write before storage sees it (see `healing::merkle`).
            // The guard abandons them if this future is dropped while storage works (a
            // deferred local apply cancelled at its deadline), so no shard stays in flight.
            let mut guard = self.merkle.as_ref().map(|m| PendingGuard {
                tree: &m.tree,
                pending: batch
                    .iter()
                    .map(|(k, _)| m.tree.begin(crate::hash::key_hash(k)))
                    .collect(),
            });
            let result = self.storage.apply_batch(batch).await;
            let pending = guard
                .as_mut()
                .map(|g| std::mem::take(&mut g.pending))
                .unwrap_or_default();
            drop(guard);
            if let Some(m) = &self.merkle {
                match &result {
                    Ok(results) if results.len() == pending.len() => {
                        for ((p, (_, version)), outcome) in
                            pending.into_iter().zip(&logged).zip(results)
                        {
                            match outcome {
                                ApplyOutcome::Applied { previous } => {
                                    m.tree.finish(p, previous.as_ref(), Some(version));
                                }
                                ApplyOutcome::Stale { .. } => m.tree.finish(p, None, None),
                            }
                        }
                    }
                    // Storage may have applied any part of the batch: the next rebuild says.
                    _ => pending.into_iter().for_each(|p| m.tree.abandon(p)),
                }
            }
            match result {
                Ok(results) if results.len() == idx.len() => {
                    if let LogAs::From(source) = log {
                        self.log_applied(logged, &results, source);
                    }
                    for (i, outcome) in idx.into_iter().zip(results) {
                        outcomes[i] = Some(self.count_outcome(outcome));
                    }
                }
                Ok(_) => {
                    tracing::error!("storage answered a batch with the wrong number of outcomes");
                }
                Err(e) => {
                    self.stats
                        .storage_failures
                        .fetch_add(idx.len() as u64, Ordering::Relaxed);
                    tracing::warn!(error = %e, "replica apply failed");
                    let refusal = storage_refusal(&e);
                    for i in idx {
                        outcomes[i] = Some(WriteOutcome::Refused(refusal.clone()));
                    }
                }
            }
        }
        outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or(WriteOutcome::Refused(Refusal::Invalid {
                    reason: "write not processed".into(),
                }))
            })
            .collect()
    }

    fn count_outcome(&self, outcome: ApplyOutcome) -> WriteOutcome {
        match outcome {
            ApplyOutcome::Applied { .. } => {
                self.stats.replica_applied.fetch_add(1, Ordering::Relaxed);
                WriteOutcome::Applied
            }
            ApplyOutcome::Stale { current } => {
                self.stats.replica_stale.fetch_add(1, Ordering::Relaxed);
                WriteOutcome::Stale {
                    current: current.version,
                }
            }
        }
    }

    /// Limits, then the clock: a refused write leaves the clock as it was.
    fn admit(&self, w: &Write, own: bool) -> Result<(), Refusal> {
        if w.key.is_empty() || w.key.len() > self.config.max_key_len.get() {
            self.stats.replica_invalid.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::Invalid {
                reason: format!("key of {} bytes", w.key.len()),
            });
        }
        if let Payload::Value(v) = &w.record.payload
            && v.len() > self.config.max_value_len.get()
        {
            self.stats.replica_invalid.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::Invalid {
                reason: format!("value of {} bytes", v.len()),
            });
        }
        if own || self.bugs.skip_drift_check {
            return Ok(());
        }
        match self.hlc.observe(w.record.version.timestamp) {
            Ok(_) => Ok(()),
            Err(crate::hlc::ClockError::TooFarAhead { ahead, .. }) => {
                self.stats.drift_refusals.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(?ahead, "write refused: version beyond the drift bound");
                Err(Refusal::ClockDrift {
                    ahead_ms: ahead.as_millis().min(u128::from(u64::MAX)) as u64,
                })
            }
        }
    }

    /// The stored record of each key, in order.
    pub(crate) async fn read_keys(&self, keys: Vec<Key>) -> Result<Vec<Option<Record>>, Refusal> {
        self.stats
            .replica_reads
            .fetch_add(keys.len() as u64, Ordering::Relaxed);
        if keys.len() > MAX_BATCH {
            return Err(Refusal::Invalid {
                reason: format!("{} keys in one read", keys.len()),
            });
        }
        let mut records = Vec::with_capacity(keys.len());
        for Key(key) in keys {
            if key.is_empty() || key.len() > self.config.max_key_len.get() {
                self.stats.replica_invalid.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::Invalid {
                    reason: format!("key of {} bytes", key.len()),
                });
            }
            match self.storage.get(&key).await {
                Ok(record) => records.push(record),
                Err(e) => {
                    self.stats.storage_failures.fetch_add(1, Ordering::Relaxed);
                    return Err(storage_refusal(&e));
                }
            }
        }
        Ok(records)
    }
}

pub(crate) fn storage_refusal(e: &StorageError) -> Refusal {
    Refusal::Storage {
        retryable: e.is_retryable(),
        reason: e.to_string(),
    }
}

/// Tree updates begun for writes storage is applying; abandoned (the leaves marked for the next
/// rebuild) if dropped before they are taken out and finished.
pub(crate) struct PendingGuard<'a> {
    pub(crate) tree: &'a crate::healing::merkle::MerkleTree,
    pub(crate) pending: Vec<crate::healing::merkle::Pending>,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        for p in self.pending.drain(..) {
            self.tree.abandon(p);
        }
    }
}

#[cfg(test)]
mod pending_guard_tests {
    use super::PendingGuard;
    use crate::healing::merkle::MerkleTree;

    #[test]
    fn updates_dropped_unfinished_are_abandoned_and_ask_for_a_rebuild() {
        let tree = MerkleTree::new();
        let guard = PendingGuard {
            tree: &tree,
            pending: vec![tree.begin(7), tree.begin(u64::MAX)],
        };
        assert!(!tree.needs_rebuild());
        drop(guard);
        assert!(
            tree.needs_rebuild(),
            "a cancelled apply leaves the tree unsure"
        );
        // Nothing is left in flight: a rebuild corrects every shard.
        let rebuild = tree.start_rebuild();
        let report = tree.finish_rebuild(rebuild);
        assert_eq!(
            report.kept, 0,
            "a shard left in flight is skipped whole: {report:?}"
        );
    }
}
