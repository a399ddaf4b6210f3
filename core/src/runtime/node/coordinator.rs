//! The coordinator: any node coordinates any key, without a forwarding hop. A request goes to
//! the key's replicas from the current ring snapshot in parallel (the local replica applied
//! directly, without a message), returns as soon as the required number answered, and leaves
//! the late answers to a background task that still processes them. Batches are grouped per
//! replica: k keys cost about one message per replica, not k.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::time::Instant;

use super::Inner;
use super::view::View;
use crate::envelope::Envelope;
use crate::identity::NodeId;
use crate::record::Record;
use crate::replication::message::Key;
use crate::replication::{
    AckTracker, Answer, Operation, Progress, REPLICA_PROTOCOL_VERSION, ReadMerge, Refusal,
    ReplicaMessage, ReplicationError, SetsTracker, Write, WriteOutcome,
};

type Pending<T> = Pin<Box<dyn Future<Output = (NodeId, Vec<usize>, T)> + Send>>;

/// What one replica answered for the writes it was sent.
enum ApplyAnswer {
    /// One outcome per write.
    Outcomes(Vec<WriteOutcome>),
    /// The whole request was refused.
    Refused(Refusal),
    /// No usable answer (unreachable, garbled): outcome unknown.
    Failed,
}

/// Who holds each write of a request so far, for the applied-writes log: the coordinator
/// logs a write it applied itself only once every replica answered, and only if one of them
/// did not acknowledge it (one every replica holds has nothing left to offer anyone).
struct Holders {
    /// Replicas of each write.
    expected: Vec<usize>,
    /// Acknowledgements of each write so far.
    acked: Vec<usize>,
    /// Whether this node's own replica applied it (a stale or refused one is not logged).
    applied_here: Vec<bool>,
}

impl Holders {
    fn new(len: usize) -> Self {
        Holders {
            expected: vec![0; len],
            acked: vec![0; len],
            applied_here: vec![false; len],
        }
    }

    fn note(&mut self, me: NodeId, node: NodeId, idx: &[usize], answer: &ApplyAnswer) {
        let ApplyAnswer::Outcomes(outcomes) = answer else {
            return;
        };
        for (&i, o) in idx.iter().zip(outcomes) {
            if o.is_ack() {
                self.acked[i] += 1;
            }
            if node == me && matches!(o, WriteOutcome::Applied) {
                self.applied_here[i] = true;
            }
        }
    }

    /// The writes to log: applied here and not acknowledged by every replica.
    fn to_log(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.expected.len())
            .filter(|&i| self.applied_here[i] && self.acked[i] < self.expected[i])
    }
}

impl ApplyAnswer {
    /// The writes (indices out of `idx`, in order) this answer leaves the replica owing:
    /// not acknowledged, for a reason a later replay may overcome.
    fn missed(&self, idx: &[usize]) -> Vec<usize> {
        match self {
            ApplyAnswer::Outcomes(outcomes) => idx
                .iter()
                .zip(outcomes)
                .filter(|(_, o)| match o {
                    WriteOutcome::Refused(r) => super::hints::worth_a_hint(Some(r)),
                    o => !o.is_ack(),
                })
                .map(|(&i, _)| i)
                .collect(),
            ApplyAnswer::Refused(r) if !super::hints::worth_a_hint(Some(r)) => Vec::new(),
            ApplyAnswer::Refused(_) | ApplyAnswer::Failed => idx.to_vec(),
        }
    }
}

/// What one replica answered for the keys it was asked.
enum ReadAnswer {
    Records(Vec<Option<Record>>),
    Refused(Refusal),
    Failed,
}

/// Spends a unit of the task's cooperative budget, yielding to the scheduler once it is
/// used up. A request can end without ever waiting (too few replicas alive, a replica's
/// address refusing at once, a read at `One` served from local storage); a client
/// repeating such a request in a loop would otherwise never give its worker thread back,
/// and the tasks that would see the cluster recover (membership, the receive loops, the
/// deferred work) would never run.
pub(crate) async fn cooperate() {
    tokio::task::consume_budget().await;
}

impl Inner {
    /// Replicates `writes` (records already stamped) to each key's replicas; one result per
    /// write, in order. Success means `required` of the key's own replicas acknowledged.
    pub(crate) async fn replicate(
        self: &Arc<Self>,
        writes: Vec<Write>,
        required: usize,
        timeout: Duration,
    ) -> Vec<Result<(), ReplicationError>> {
        let deadline = Instant::now() + timeout;
        let view = self.view.load_full();
        let mut results: Vec<Option<Result<(), ReplicationError>>> =
            (0..writes.len()).map(|_| None).collect();
        let mut trackers = Vec::with_capacity(writes.len());
        let mut holders = Holders::new(writes.len());
        let mut groups: Vec<(NodeId, Vec<usize>)> = Vec::new();
        for (i, w) in writes.iter().enumerate() {
            // Outside a join, one set: the key's replicas. During one, a quorum in each of
            // the rings a write must reach (`View::write_sets`).
            let mut sets = if view.in_transition() {
                view.write_sets(&w.key)
            } else {
                vec![view.replicas(&w.key)]
            };
            if self.bugs.count_coordinator_as_replica && !sets[0].contains(&self.id) {
                // Planted bug: the coordinator stands in for a replica and counts itself.
                sets[0].push(self.id);
            }
            let tracker = SetsTracker::new(required, sets);
            let targets = tracker.targets();
            holders.expected[i] = targets.len();
            if let Some(alive) = tracker.unavailable(required) {
                results[i] = Some(Err(ReplicationError::Unavailable { required, alive }));
                trackers.push(tracker);
                continue;
            }
            trackers.push(tracker);
            for r in targets {
                match groups.iter_mut().find(|(n, _)| *n == r) {
                    Some((_, idx)) => idx.push(i),
                    None => groups.push((r, vec![i])),
                }
            }
        }
        // Who has not answered yet, for hinted handoff (empty when it is off).
        let mut unanswered: Vec<(NodeId, Vec<usize>)> = match self.hints {
            Some(_) => groups.clone(),
            None => Vec::new(),
        };
        let mut pending: FuturesUnordered<Pending<ApplyAnswer>> = FuturesUnordered::new();
        for (node, idx) in groups {
            let batch: Vec<Write> = idx.iter().map(|&i| writes[i].clone()).collect();
            pending.push(self.apply_on(&view, node, (idx, batch), true));
        }
        let mut undecided = results.iter().filter(|r| r.is_none()).count();
        // One timer for the whole request, not one per answer or per replica; the late
        // answers below run out on it too.
        let mut expiry = Box::pin(tokio::time::sleep_until(deadline));
        while undecided > 0 {
            let next = tokio::select! {
                next = pending.next() => next,
                () = expiry.as_mut() => None,
            };
            let Some((node, idx, answer)) = next else {
                break;
            };
            unanswered.retain(|(n, _)| *n != node);
            self.note_missed(node, &answer.missed(&idx), &writes);
            holders.note(self.id, node, &idx, &answer);
            for (k, &i) in idx.iter().enumerate() {
                let progress = match &answer {
                    ApplyAnswer::Outcomes(outcomes) => match outcomes.get(k) {
                        Some(o) if o.is_ack() => trackers[i].answer(node, Answer::Ack),
                        Some(WriteOutcome::Refused(why)) => {
                            trackers[i].answer(node, Answer::Refused(why.clone()))
                        }
                        _ => trackers[i].answer(node, Answer::Failed),
                    },
                    ApplyAnswer::Refused(why) => {
                        trackers[i].answer(node, Answer::Refused(why.clone()))
                    }
                    ApplyAnswer::Failed if self.bugs.count_failures_as_acks => {
                        trackers[i].answer(node, Answer::Ack)
                    }
                    ApplyAnswer::Failed => trackers[i].answer(node, Answer::Failed),
                };
                if results[i].is_some() {
                    continue;
                }
                match progress {
                    Progress::Pending => {}
                    Progress::Met => {
                        results[i] = Some(Ok(()));
                        undecided -= 1;
                    }
                    Progress::Impossible => {
                        results[i] = Some(Err(ReplicationError::Failed {
                            op: Operation::Write,
                            acks: trackers[i].acks(),
                            required,
                            refusals: trackers[i].take_refusals(),
                            unreachable: trackers[i].failures(),
                        }));
                        undecided -= 1;
                    }
                }
            }
        }
        let room = match pending.is_empty() {
            true => None,
            false => self.deferred_room(),
        };
        if let Some(room) = room {
            // Late answers are still processed: counted, and a replica that did not
            // acknowledge gets a hint.
            let inner = self.clone();
            self.defer(room, async move {
                loop {
                    let next = tokio::select! {
                        next = pending.next() => next,
                        () = expiry.as_mut() => None,
                    };
                    let Some((node, idx, answer)) = next else {
                        break;
                    };
                    unanswered.retain(|(n, _)| *n != node);
                    inner
                        .stats
                        .late_answers
                        .fetch_add(idx.len() as u64, Ordering::Relaxed);
                    inner.note_missed(node, &answer.missed(&idx), &writes);
                    holders.note(inner.id, node, &idx, &answer);
                }
                // No answer by the deadline: those replicas owe every write they were sent.
                for (node, idx) in unanswered {
                    inner.note_missed(node, &idx, &writes);
                }
                inner.log_coordinated(&writes, &holders);
            });
        } else {
            // Every answer is in, or no room to wait for the rest (shed, counted): the
            // replicas that have not answered owe every write they were sent.
            for (node, idx) in unanswered {
                self.note_missed(node, &idx, &writes);
            }
            self.log_coordinated(&writes, &holders);
        }
        results
            .into_iter()
            .zip(trackers)
            .map(|(r, t)| {
                r.unwrap_or(Err(ReplicationError::Timeout {
                    op: Operation::Write,
                    acks: t.acks(),
                    required,
                    after: timeout,
                }))
            })
            .collect()
    }

    /// Enters the writes of a request that this node applied and some replica did not
    /// acknowledge into the applied-writes log (the replicas log what they applied).
    fn log_coordinated(&self, writes: &[Write], holders: &Holders) {
        let entries: Vec<(Bytes, crate::hlc::Version)> = holders
            .to_log()
            .map(|i| (writes[i].key.clone(), writes[i].record.version))
            .collect();
        if !entries.is_empty() {
            self.log_entries(entries, None);
        }
    }

    /// Sends `batch` to `node` (or applies it here when `node` is this node). The future has
    /// no deadline of its own: the caller races it against the request's.
    /// `own`: the records were stamped by this node's clock for this request (not repairs of
    /// someone else's versions), so the local replica skips the drift check.
    fn apply_on(
        self: &Arc<Self>,
        view: &View,
        node: NodeId,
        (idx, batch): (Vec<usize>, Vec<Write>),
        own: bool,
    ) -> Pending<ApplyAnswer> {
        let inner = self.clone();
        if node == self.id {
            return Box::pin(async move {
                let log = if own {
                    super::replica::LogAs::Coordinated
                } else {
                    super::replica::LogAs::From(None)
                };
                let outcomes = inner.apply_writes(batch, own, log).await;
                (node, idx, ApplyAnswer::Outcomes(outcomes))
            });
        }
        let addr = view.addr(node).cloned();
        Box::pin(async move {
            let Some(addr) = addr else {
                return (node, idx, ApplyAnswer::Failed);
            };
            let expected = batch.len();
            let message = Envelope::Replica(ReplicaMessage::Apply {
                version: REPLICA_PROTOCOL_VERSION,
                writes: batch,
            });
            inner
                .stats
                .replica_requests_sent
                .fetch_add(1, Ordering::Relaxed);
            // Unbounded here: every caller races these futures against the request's deadline.
            let answer = match inner.rpc.request_unbounded(&addr, &message).await {
                Ok(Envelope::Replica(ReplicaMessage::Applied { outcomes }))
                    if outcomes.len() == expected =>
                {
                    ApplyAnswer::Outcomes(outcomes)
                }
                Ok(Envelope::Replica(ReplicaMessage::Refused(why))) => ApplyAnswer::Refused(why),
                Ok(other) => {
                    tracing::debug!(%addr, ?other, "unexpected answer to an apply");
                    ApplyAnswer::Failed
                }
                Err(e) => {
                    tracing::trace!(%addr, error = %e, "apply request failed");
                    ApplyAnswer::Failed
                }
            };
            (node, idx, answer)
        })
    }

    /// Reads `keys` from their replicas; one result per key, in order: the winning record
    /// (tombstones and expired values included; the caller hides them).
    pub(crate) async fn read(
        self: &Arc<Self>,
        keys: Vec<Bytes>,
        required: usize,
        timeout: Duration,
        repair: super::ReadRepair,
    ) -> Vec<Result<Option<Record>, ReplicationError>> {
        let deadline = Instant::now() + timeout;
        let view = self.view.load_full();
        let mut results: Vec<Option<Result<Option<Record>, ReplicationError>>> =
            (0..keys.len()).map(|_| None).collect();
        let mut merges: Vec<ReadMerge> = (0..keys.len()).map(|_| ReadMerge::new()).collect();
        let mut trackers = Vec::with_capacity(keys.len());
        let mut replica_sets = Vec::with_capacity(keys.len());
        let mut groups: Vec<(NodeId, Vec<usize>)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            // Reads stay on the settled ring, at R, during a join too (every write meets a
            // quorum there, `SetsTracker`).
            let replicas = view.replicas(key);
            trackers.push(AckTracker::new(required, replicas.len()));
            if replicas.len() < required {
                results[i] = Some(Err(ReplicationError::Unavailable {
                    required,
                    alive: replicas.len(),
                }));
            } else {
                for &r in &replicas {
                    match groups.iter_mut().find(|(n, _)| *n == r) {
                        Some((_, idx)) => idx.push(i),
                        None => groups.push((r, vec![i])),
                    }
                }
            }
            replica_sets.push(replicas);
        }
        let mut pending: FuturesUnordered<Pending<ReadAnswer>> = FuturesUnordered::new();
        for (node, idx) in groups {
            let batch: Vec<Bytes> = idx.iter().map(|&i| keys[i].clone()).collect();
            pending.push(self.read_on(&view, node, idx, batch));
        }
        let mut undecided = results.iter().filter(|r| r.is_none()).count();
        // One timer for the whole request, not one per answer.
        let expiry = tokio::time::sleep_until(deadline);
        tokio::pin!(expiry);
        while undecided > 0 {
            let next = tokio::select! {
                next = pending.next() => next,
                () = &mut expiry => None,
            };
            let Some((node, idx, answer)) = next else {
                break;
            };
            for (k, &i) in idx.iter().enumerate() {
                let progress = match &answer {
                    ReadAnswer::Records(records) => match records.get(k) {
                        Some(r) => {
                            merges[i].add(node, r.clone());
                            trackers[i].ack()
                        }
                        None => trackers[i].fail(),
                    },
                    ReadAnswer::Refused(why) => trackers[i].refuse(node, why.clone()),
                    ReadAnswer::Failed => trackers[i].fail(),
                };
                if results[i].is_some() {
                    continue;
                }
                match progress {
                    Progress::Pending => {}
                    Progress::Met => {
                        results[i] = Some(Ok(merges[i].winner().cloned()));
                        undecided -= 1;
                    }
                    Progress::Impossible => {
                        results[i] = Some(Err(ReplicationError::Failed {
                            op: Operation::Read,
                            acks: trackers[i].acks(),
                            required,
                            refusals: trackers[i].take_refusals(),
                            unreachable: trackers[i].failures(),
                        }));
                        undecided -= 1;
                    }
                }
            }
        }
        if repair == super::ReadRepair::Blocking {
            self.repair_blocking(
                &keys,
                &mut merges,
                &mut results,
                required,
                deadline,
                timeout,
            )
            .await;
        }
        let room = match repair != super::ReadRepair::Off || !pending.is_empty() {
            true => self.deferred_room(),
            false => None,
        };
        // Without room (shed, counted) the late answers and the repair are skipped: anti-
        // entropy heals what the repair would have.
        if let Some(room) = room {
            let inner = self.clone();
            let keys = keys.clone();
            let merges = std::mem::take(&mut merges);
            let repair_late = repair != super::ReadRepair::Off;
            self.defer(room, async move {
                inner
                    .finish_read(keys, merges, pending, deadline, repair_late)
                    .await;
            });
        }
        results
            .into_iter()
            .zip(trackers)
            .map(|(r, t)| {
                r.unwrap_or(Err(ReplicationError::Timeout {
                    op: Operation::Read,
                    acks: t.acks(),
                    required,
                    after: timeout,
                }))
            })
            .collect()
    }

    /// After the reply: waits for the remaining answers (until the deadline), then sends the
    /// winner to every replica that answered with something older or nothing.
    async fn finish_read(
        self: Arc<Self>,
        keys: Vec<Bytes>,
        mut merges: Vec<ReadMerge>,
        mut pending: FuturesUnordered<Pending<ReadAnswer>>,
        deadline: Instant,
        repair: bool,
    ) {
        let expiry = tokio::time::sleep_until(deadline);
        tokio::pin!(expiry);
        loop {
            let next = tokio::select! {
                next = pending.next() => next,
                () = &mut expiry => None,
            };
            let Some((node, idx, answer)) = next else {
                break;
            };
            self.stats
                .late_answers
                .fetch_add(idx.len() as u64, Ordering::Relaxed);
            if let ReadAnswer::Records(records) = answer {
                for (k, &i) in idx.iter().enumerate() {
                    if let Some(r) = records.get(k) {
                        merges[i].add(node, r.clone());
                    }
                }
            }
        }
        if !repair {
            return;
        }
        let targets = self.repair_targets(&keys, &merges);
        if targets.is_empty() {
            return;
        }
        let view = self.view.load_full();
        let timeout = self.config.request_timeout;
        let deadline = Instant::now() + timeout;
        let mut sends: FuturesUnordered<Pending<ApplyAnswer>> = targets
            .into_iter()
            .map(|(node, writes)| {
                let idx = (0..writes.len()).collect();
                self.apply_on(&view, node, (idx, writes), false)
            })
            .collect();
        let expiry = tokio::time::sleep_until(deadline);
        tokio::pin!(expiry);
        loop {
            let answer = tokio::select! {
                next = sends.next() => match next {
                    Some((_, _, answer)) => answer,
                    None => break,
                },
                () = &mut expiry => {
                    // Unanswered repairs by the deadline count as failed.
                    for _ in 0..sends.len() {
                        self.count_repair(&ApplyAnswer::Failed);
                    }
                    break;
                }
            };
            self.count_repair(&answer);
        }
    }

    /// The repairs a read calls for, grouped per replica: each stale replica gets the winner
    /// with its original version (a planted bug restamps it, which the history checker must
    /// catch).
    fn repair_targets(&self, keys: &[Bytes], merges: &[ReadMerge]) -> Vec<(NodeId, Vec<Write>)> {
        let mut targets: HashMap<NodeId, Vec<Write>> = HashMap::new();
        for (key, merge) in keys.iter().zip(merges) {
            let Some(winner) = merge.winner() else {
                continue;
            };
            let record = if self.bugs.repair_with_new_version {
                let mut r = winner.clone();
                r.version = crate::hlc::Version::new(self.hlc.now(), self.id);
                r
            } else {
                winner.clone()
            };
            for node in merge.stale() {
                targets.entry(node).or_default().push(Write {
                    key: key.clone(),
                    record: record.clone(),
                });
            }
        }
        targets.into_iter().collect()
    }

    fn count_repair(&self, answer: &ApplyAnswer) {
        match answer {
            ApplyAnswer::Outcomes(outcomes) => {
                for o in outcomes {
                    if o.is_ack() {
                        self.stats.read_repairs.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.stats
                            .read_repair_failures
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ => {
                self.stats
                    .read_repair_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Blocking read repair: a decided key whose winner is on fewer than `required` of the
    /// replicas that answered is repaired there first; the read succeeds only once the winner
    /// is on `required` replicas.
    async fn repair_blocking(
        self: &Arc<Self>,
        keys: &[Bytes],
        merges: &mut [ReadMerge],
        results: &mut [Option<Result<Option<Record>, ReplicationError>>],
        required: usize,
        deadline: Instant,
        timeout: Duration,
    ) {
        let short: Vec<usize> = (0..keys.len())
            .filter(|&i| matches!(results[i], Some(Ok(Some(_)))) && merges[i].holders() < required)
            .collect();
        if short.is_empty() {
            return;
        }
        let view = self.view.load_full();
        let mut holders: Vec<usize> = merges.iter().map(ReadMerge::holders).collect();
        let mut per_node: HashMap<NodeId, (Vec<usize>, Vec<Write>)> = HashMap::new();
        for &i in &short {
            let Some(winner) = merges[i].winner().cloned() else {
                continue;
            };
            for node in merges[i].stale() {
                let entry = per_node.entry(node).or_default();
                entry.0.push(i);
                entry.1.push(Write {
                    key: keys[i].clone(),
                    record: winner.clone(),
                });
            }
        }
        let mut sends: FuturesUnordered<Pending<ApplyAnswer>> = per_node
            .into_iter()
            .map(|(node, batch)| self.apply_on(&view, node, batch, false))
            .collect();
        let mut open = short.len();
        let expiry = tokio::time::sleep_until(deadline);
        tokio::pin!(expiry);
        while open > 0 {
            let next = tokio::select! {
                next = sends.next() => next,
                () = &mut expiry => None,
            };
            let Some((_, idx, answer)) = next else {
                break;
            };
            self.count_repair(&answer);
            if let ApplyAnswer::Outcomes(outcomes) = &answer {
                for (k, &i) in idx.iter().enumerate() {
                    if outcomes.get(k).is_some_and(WriteOutcome::is_ack) {
                        holders[i] += 1;
                        if holders[i] == required {
                            open -= 1;
                        }
                    }
                }
            }
        }
        for &i in &short {
            if holders[i] < required {
                results[i] = Some(Err(ReplicationError::Timeout {
                    op: Operation::Read,
                    acks: holders[i],
                    required,
                    after: timeout,
                }));
            }
        }
        // Repaired replicas hold the winner now; the background repair skips them.
        for &i in &short {
            if let Some(w) = merges[i].winner().cloned() {
                let mut fresh = ReadMerge::new();
                fresh.add(self.id, Some(w));
                merges[i] = fresh;
            }
        }
    }

    /// Asks `node` for `batch` (or reads here when `node` is this node). The future has no
    /// deadline of its own: the caller races it against the request's.
    fn read_on(
        self: &Arc<Self>,
        view: &View,
        node: NodeId,
        idx: Vec<usize>,
        batch: Vec<Bytes>,
    ) -> Pending<ReadAnswer> {
        let inner = self.clone();
        let keys: Vec<Key> = batch.into_iter().map(Key).collect();
        if node == self.id {
            return Box::pin(async move {
                let answer = match inner.read_keys(keys).await {
                    Ok(records) => ReadAnswer::Records(records),
                    Err(why) => ReadAnswer::Refused(why),
                };
                (node, idx, answer)
            });
        }
        let addr = view.addr(node).cloned();
        Box::pin(async move {
            let Some(addr) = addr else {
                return (node, idx, ReadAnswer::Failed);
            };
            let expected = keys.len();
            let message = Envelope::Replica(ReplicaMessage::Read {
                version: REPLICA_PROTOCOL_VERSION,
                keys,
            });
            inner
                .stats
                .replica_requests_sent
                .fetch_add(1, Ordering::Relaxed);
            // Unbounded here: every caller races these futures against the request's deadline.
            let answer = match inner.rpc.request_unbounded(&addr, &message).await {
                Ok(Envelope::Replica(ReplicaMessage::Records { records }))
                    if records.len() == expected =>
                {
                    ReadAnswer::Records(records)
                }
                Ok(Envelope::Replica(ReplicaMessage::Refused(why))) => ReadAnswer::Refused(why),
                Ok(other) => {
                    tracing::debug!(%addr, ?other, "unexpected answer to a read");
                    ReadAnswer::Failed
                }
                Err(e) => {
                    tracing::trace!(%addr, error = %e, "read request failed");
                    ReadAnswer::Failed
                }
            };
            (node, idx, answer)
        })
    }

    /// A read at `One` of keys this node replicates: local storage, no message.
    pub(crate) fn is_local_replica(&self, view: &View, key: &[u8]) -> bool {
        super::view::is_replica(view, key, self.id)
    }
}
