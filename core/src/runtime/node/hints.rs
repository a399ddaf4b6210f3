//! Hinted handoff's driver: feeds the [`HintBook`] the writes replicas missed, the wall clock
//! and membership, sends the deliveries it asks for, and keeps the hints in storage so they
//! survive a restart when the backend is durable.
//!
//! The coordinator's hook ([`Inner::note_missed`]) only queues: a replica that did not
//! acknowledge a write (no answer by the deadline, unreachable, or a refusal a retry may
//! fix) gets a hint with the record exactly as stamped. One task owns the book; every
//! deadline it waits for comes from [`HintBook::poll_timeout`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;

use super::Inner;
use crate::envelope::Envelope;
use crate::healing::{Delivery, Hint, HintBook, HintConfig, HintOutcome};
use crate::identity::NodeId;
use crate::membership::{Member, MemberState};
use crate::replication::{REPLICA_PROTOCOL_VERSION, Refusal, ReplicaMessage, Write, WriteOutcome};
use crate::storage::{MAX_BATCH, Storage, StorageError};

/// Batches of missed writes queued for the hint task; past it, hints are dropped (counted).
pub(crate) const HINT_QUEUE: usize = 4096;

/// Missed writes of one request for one replica.
pub(crate) struct Missed {
    target: NodeId,
    writes: Vec<Write>,
    created_ms: u64,
}

/// The coordinator's end of the hint queue.
pub(crate) type HintQueue = Option<mpsc::Sender<Missed>>;

/// Whether a replica's answer to one write leaves it owing that write: no answer at all, or a
/// refusal that a later attempt may not meet (a limit or a bad record would be refused again).
pub(crate) fn worth_a_hint(refusal: Option<&Refusal>) -> bool {
    match refusal {
        None => true,
        Some(Refusal::Invalid { .. } | Refusal::Undecodable { .. }) => false,
        Some(_) => true,
    }
}

impl Inner {
    /// Queues hints for `target`, which did not acknowledge `writes[i]` for each `i` in `idx`.
    pub(crate) fn note_missed(&self, target: NodeId, idx: &[usize], writes: &[Write]) {
        let Some(queue) = &self.hints else {
            return;
        };
        if idx.is_empty() || target == self.id {
            return;
        }
        let missed = Missed {
            target,
            writes: idx.iter().filter_map(|&i| writes.get(i).cloned()).collect(),
            created_ms: self.hlc.wall_clock().now_ms(),
        };
        let n = missed.writes.len() as u64;
        if queue.try_send(missed).is_err() {
            self.stats
                .hints_dropped_overload
                .fetch_add(n, Ordering::Relaxed);
        }
    }

    fn hint_config(&self) -> HintConfig {
        let c = &self.config;
        let mut h = HintConfig::default();
        h.window = c.hint_window;
        h.max_hints_per_target = c.max_hints_per_target.get();
        h.max_bytes_per_target = c.max_hint_bytes_per_target;
        h.rate_per_sec = c.hint_delivery_rate;
        h.batch = h.batch.min(MAX_BATCH);
        h
    }

    fn publish(&self, book: &HintBook) {
        let c = book.counters();
        let s = &self.stats;
        s.hints_stored.store(c.stored, Ordering::Relaxed);
        s.hints_delivered.store(c.delivered, Ordering::Relaxed);
        s.hints_dropped_full
            .store(c.dropped_full, Ordering::Relaxed);
        s.hints_dropped_expired
            .store(c.dropped_expired, Ordering::Relaxed);
        s.hints_dropped_rejected.store(
            c.dropped_rejected + c.dropped_undecodable,
            Ordering::Relaxed,
        );
        s.hint_delivery_failures
            .store(c.failed_deliveries, Ordering::Relaxed);
        s.hints_pending.store(book.len() as u64, Ordering::Relaxed);
    }
}

/// The hint task: restores stored hints, then keeps, delivers and expires them until the
/// node stops.
pub(crate) async fn run(inner: Arc<Inner>, mut queue: mpsc::Receiver<Missed>) {
    let persist = inner.storage.capabilities().durability.is_persistent();
    let now = || inner.hlc.wall_clock().now_ms();
    let mut book = HintBook::new(inner.hint_config(), now());
    if persist {
        match inner.storage.load_hints().await {
            Ok(stored) => {
                let drop = book.restore(stored, now());
                remove(&inner, drop).await;
                tracing::debug!(hints = book.len(), "hints restored");
            }
            Err(e) => tracing::warn!(error = %e, "stored hints not readable; starting without"),
        }
    }
    let mut view = inner.membership.view();
    let mut known: Vec<Member> = Vec::new();
    let members = view.borrow_and_update().clone();
    follow_membership(&inner, &mut book, &mut known, &members, now()).await;
    let mut deliveries = FuturesUnordered::new();
    loop {
        let t = now();
        let expired = book.expire(t);
        remove(&inner, expired).await;
        while let Some(d) = book.poll_delivery(t) {
            deliveries.push(deliver(inner.clone(), d));
        }
        inner.publish(&book);
        let sleep = match book.poll_timeout() {
            Some(at) => Duration::from_millis(at.saturating_sub(t).max(1)),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            missed = queue.recv() => {
                let Some(first) = missed else { return };
                let mut batch = vec![first];
                while batch.len() < 64 {
                    match queue.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                keep(&inner, &mut book, batch, persist, now()).await;
            }
            changed = view.changed() => {
                if changed.is_err() {
                    return;
                }
                let members = view.borrow_and_update().clone();
                follow_membership(&inner, &mut book, &mut known, &members, now()).await;
            }
            Some((target, outcomes)) = deliveries.next(), if !deliveries.is_empty() => {
                let t = now();
                match outcomes {
                    Some(outcomes) => {
                        let done = book.delivered(target, &outcomes, t);
                        remove(&inner, done).await;
                    }
                    None => book.failed(target, t),
                }
            }
            () = tokio::time::sleep(sleep) => {}
        }
    }
}

/// Adds the missed writes to the book and stores the ones it kept.
async fn keep(inner: &Inner, book: &mut HintBook, batch: Vec<Missed>, persist: bool, now: u64) {
    let mut stored: Vec<(u64, Bytes)> = Vec::new();
    for missed in batch {
        for w in missed.writes {
            let hint = Hint {
                target: missed.target,
                created_ms: missed.created_ms,
                key: w.key,
                record: w.record,
            };
            let blob = if persist { hint.encode() } else { None };
            if let Ok(id) = book.add(hint, now)
                && let Some(blob) = blob
            {
                stored.push((id, blob));
            }
        }
    }
    for chunk in stored.chunks(MAX_BATCH) {
        if let Err(e) = inner.storage.store_hints(chunk.to_vec()).await {
            // Kept in memory anyway: lost only if the node also restarts before delivering.
            inner
                .stats
                .hint_store_failures
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            log_storage("storing hints", &e);
        }
    }
}

async fn remove(inner: &Inner, ids: Vec<u64>) {
    if ids.is_empty() || !inner.storage.capabilities().durability.is_persistent() {
        return;
    }
    for chunk in ids.chunks(MAX_BATCH) {
        if let Err(e) = inner.storage.remove_hints(chunk.to_vec()).await {
            // A hint left behind is replayed again after a restart: harmless (idempotent).
            log_storage("removing hints", &e);
        }
    }
}

fn log_storage(what: &str, e: &StorageError) {
    if !matches!(e, StorageError::Closed) {
        tracing::warn!(error = %e, "{what} failed");
    }
}

/// Tells the book who is alive; hands the hints of members that left to their keys' current
/// replicas.
async fn follow_membership(
    inner: &Inner,
    book: &mut HintBook,
    known: &mut Vec<Member>,
    members: &[Member],
    now: u64,
) {
    for m in members.iter().filter(|m| m.id != inner.id) {
        let alive = matches!(m.state, MemberState::Alive | MemberState::Suspect);
        book.set_alive(m.id, alive, now);
        if m.state == MemberState::Left {
            hand_over(inner, book, m.id, members, now).await;
        }
    }
    // A member forgotten since the last view is not alive.
    for gone in known
        .iter()
        .filter(|k| !members.iter().any(|m| m.id == k.id))
    {
        book.set_alive(gone.id, false, now);
    }
    *known = members.to_vec();
}

/// A member left for good: its hints go to each key's current replicas (this node's own
/// replica applies them at once), keeping their creation time.
async fn hand_over(
    inner: &Inner,
    book: &mut HintBook,
    target: NodeId,
    members: &[Member],
    now: u64,
) {
    let taken = book.take_target(target);
    if taken.is_empty() {
        return;
    }
    remove(inner, taken.iter().map(|(id, _)| *id).collect()).await;
    // The ring of this membership snapshot: the node's own ring snapshot is rebuilt by
    // another task from the same change and may still hold the member that left.
    let view = super::view::View::build(
        members,
        inner.config.replication_factor,
        crate::ring::RingConfig::default(),
    );
    let mut local = Vec::new();
    let mut stored = Vec::new();
    let persist = inner.storage.capabilities().durability.is_persistent();
    for (_, hint) in taken {
        for replica in view.replicas(&hint.key) {
            if replica == target {
                continue;
            }
            if replica == inner.id {
                local.push(Write {
                    key: hint.key.clone(),
                    record: hint.record.clone(),
                });
                continue;
            }
            let moved = Hint {
                target: replica,
                ..hint.clone()
            };
            let blob = if persist { moved.encode() } else { None };
            if let Ok(id) = book.add(moved, now)
                && let Some(blob) = blob
            {
                stored.push((id, blob));
            }
        }
    }
    for chunk in local.chunks(MAX_BATCH) {
        inner
            .apply_writes(chunk.to_vec(), false, super::replica::LogAs::From(None))
            .await;
    }
    for chunk in stored.chunks(MAX_BATCH) {
        if let Err(e) = inner.storage.store_hints(chunk.to_vec()).await {
            log_storage("storing hints", &e);
        }
    }
}

/// Sends one delivery; `None` when no usable answer came back.
async fn deliver(inner: Arc<Inner>, d: Delivery) -> (NodeId, Option<Vec<(u64, HintOutcome)>>) {
    let target = d.target;
    let addr = inner.view.load().addr(target).cloned().or_else(|| {
        inner
            .membership
            .members()
            .iter()
            .find(|m| m.id == target)
            .map(|m| m.meta.addr.clone())
    });
    let Some(addr) = addr else {
        return (target, None);
    };
    let ids: Vec<u64> = d.hints.iter().map(|(id, _, _)| *id).collect();
    let writes = d
        .hints
        .into_iter()
        .map(|(_, key, record)| Write { key, record })
        .collect();
    let message = Envelope::Replica(ReplicaMessage::Apply {
        version: REPLICA_PROTOCOL_VERSION,
        writes,
    });
    inner
        .stats
        .replica_requests_sent
        .fetch_add(1, Ordering::Relaxed);
    let answer = inner
        .rpc
        .request(&addr, &message, inner.config.request_timeout)
        .await;
    let outcomes = match answer {
        Ok(Envelope::Replica(ReplicaMessage::Applied { outcomes }))
            if outcomes.len() == ids.len() =>
        {
            ids.into_iter()
                .zip(outcomes)
                .map(|(id, o)| {
                    let outcome = match &o {
                        o if o.is_ack() => HintOutcome::Acked,
                        WriteOutcome::Refused(r) if !worth_a_hint(Some(r)) => HintOutcome::Rejected,
                        _ => HintOutcome::Retry,
                    };
                    (id, outcome)
                })
                .collect()
        }
        Ok(Envelope::Replica(ReplicaMessage::Refused(r))) if !worth_a_hint(Some(&r)) => ids
            .into_iter()
            .map(|id| (id, HintOutcome::Rejected))
            .collect(),
        Ok(other) => {
            tracing::debug!(%addr, ?other, "hint delivery not acknowledged");
            return (target, None);
        }
        Err(e) => {
            tracing::trace!(%addr, error = %e, "hint delivery failed");
            return (target, None);
        }
    };
    (target, Some(outcomes))
}
