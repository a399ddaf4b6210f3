//! Coalescing of plain `SET`s and quorum `GET`s across connections: every request waiting
//! when the batcher wakes goes to the node in one `put_many` / `get_many` per consistency
//! level, which sends one message per replica for the whole batch instead of one per key.
//! Each key keeps its own outcome; nothing waits for a batch to fill (a lone request is a
//! batch of one), so batches grow only with the load.
//!
//! Batches grow through a small bound on the batches in flight ([`IN_FLIGHT`] per task): while
//! that many await their replicas, new requests queue and go together in the next one, which
//! waits for a batch to finish for at most [`HOLD`] (so a slow batch, such as one at `All`
//! with a replica down, delays the others by at most that). Without the bound every wake-up
//! sent what had arrived since the last, often a single request, and each paid a message per
//! replica (see `docs/BENCHMARKS.md`).
//!
//! Writes are stamped in the order they were submitted: the batcher stamps a batch (the
//! first poll of `put_many`, which issues the versions before it awaits anything) before it
//! takes the next one, so a pipeline's `SET a 1`, `SET a 2` leaves `2`.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;

use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::replication::message::MAX_BATCH;
use crate::{Consistency, Node, ReadOptions, ReplicationError, WriteOptions};

/// A write's outcome.
pub(crate) type PutResult = Result<(), ReplicationError>;
/// A read's outcome.
pub(crate) type GetResult = Result<Option<Bytes>, ReplicationError>;

struct Put {
    key: Bytes,
    value: Bytes,
    consistency: Consistency,
    done: oneshot::Sender<PutResult>,
}

struct Get {
    key: Bytes,
    consistency: Consistency,
    done: oneshot::Sender<GetResult>,
}

/// Where connections hand their requests.
#[derive(Clone, Debug)]
pub(crate) struct Batcher {
    puts: mpsc::UnboundedSender<Put>,
    gets: mpsc::UnboundedSender<Get>,
}

impl std::fmt::Debug for Put {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Put")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Get {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Get")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Batcher {
    /// Starts the two batching tasks for `node`.
    pub(crate) fn start(node: &Node) -> (Batcher, [tokio::task::JoinHandle<()>; 2]) {
        let (puts, put_rx) = mpsc::unbounded_channel();
        let (gets, get_rx) = mpsc::unbounded_channel();
        let tasks = [
            tokio::spawn(run_puts(node.clone(), put_rx)),
            tokio::spawn(run_gets(node.clone(), get_rx)),
        ];
        (Batcher { puts, gets }, tasks)
    }

    /// Submits a write; its outcome arrives on the receiver.
    pub(crate) fn put(
        &self,
        key: Bytes,
        value: Bytes,
        consistency: Consistency,
    ) -> oneshot::Receiver<PutResult> {
        let (done, rx) = oneshot::channel();
        // If the batcher has stopped, `done` is dropped and the receiver reports it.
        let _ = self.puts.send(Put {
            key,
            value,
            consistency,
            done,
        });
        rx
    }

    /// Submits a read; its outcome arrives on the receiver.
    pub(crate) fn get(&self, key: Bytes, consistency: Consistency) -> oneshot::Receiver<GetResult> {
        let (done, rx) = oneshot::channel();
        let _ = self.gets.send(Get {
            key,
            consistency,
            done,
        });
        rx
    }
}

/// How many batches of one task may await their replicas before the next waits.
pub(crate) const IN_FLIGHT: usize = 2;
/// How long the next batch waits for one of those to finish before it goes anyway.
pub(crate) const HOLD: Duration = Duration::from_millis(1);

/// Waits until fewer than [`IN_FLIGHT`] batches are out, or [`HOLD`] has passed (then the
/// batch goes without a permit).
async fn slot(slots: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = slots.clone().try_acquire_owned() {
        return Some(permit);
    }
    tokio::time::timeout(HOLD, slots.clone().acquire_owned())
        .await
        .ok()
        .and_then(Result::ok)
}

/// Takes `first` and everything else already queued, up to a batch's limit.
fn drain<T>(first: T, rx: &mut mpsc::UnboundedReceiver<T>) -> Vec<T> {
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(r) => batch.push(r),
            Err(_) => break,
        }
    }
    batch
}

/// Splits `batch` by consistency level, keeping the order within each.
fn by_level<T>(batch: Vec<T>, level: impl Fn(&T) -> Consistency) -> Vec<(Consistency, Vec<T>)> {
    let mut groups: Vec<(Consistency, Vec<T>)> = Vec::new();
    for r in batch {
        let c = level(&r);
        match groups.iter_mut().find(|(g, _)| *g == c) {
            Some((_, v)) => v.push(r),
            None => groups.push((c, vec![r])),
        }
    }
    groups
}

/// Polls `work` once here (so whatever it does before its first await, such as stamping
/// versions, happens now, in order) and spawns the rest.
fn start_now(work: impl Future<Output = ()> + Send + 'static) {
    let mut work = Box::pin(work);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    if Pin::new(&mut work).poll(&mut cx).is_pending() {
        tokio::spawn(work);
    }
}

async fn run_puts(node: Node, mut rx: mpsc::UnboundedReceiver<Put>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let permit = slot(&slots).await.map(Arc::new);
        let batch = drain(first, &mut rx);
        for (level, group) in by_level(batch, |p| p.consistency) {
            let node = node.clone();
            let mut entries = Vec::with_capacity(group.len());
            let mut waiters = Vec::with_capacity(group.len());
            for p in group {
                entries.push((p.key, p.value));
                waiters.push(p.done);
            }
            let permit = permit.clone();
            start_now(async move {
                let _permit = permit;
                let results = node
                    .put_many(entries, WriteOptions::default().consistency(level))
                    .await;
                match results {
                    Ok(results) => {
                        for (done, r) in waiters.into_iter().zip(results) {
                            let _ = done.send(r.map(|_| ()));
                        }
                    }
                    Err(e) => {
                        for done in waiters {
                            let _ = done.send(Err(e.clone()));
                        }
                    }
                }
            });
        }
    }
}

async fn run_gets(node: Node, mut rx: mpsc::UnboundedReceiver<Get>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let permit = slot(&slots).await.map(Arc::new);
        let batch = drain(first, &mut rx);
        for (level, group) in by_level(batch, |g| g.consistency) {
            let node = node.clone();
            let mut keys = Vec::with_capacity(group.len());
            let mut waiters = Vec::with_capacity(group.len());
            for g in group {
                keys.push(g.key);
                waiters.push(g.done);
            }
            let permit = permit.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let results = node
                    .get_many(keys, ReadOptions::default().consistency(level))
                    .await;
                match results {
                    Ok(results) => {
                        for (done, r) in waiters.into_iter().zip(results) {
                            let _ = done.send(r.map(|v| v.map(|v| v.value)));
                        }
                    }
                    Err(e) => {
                        for done in waiters {
                            let _ = done.send(Err(e.clone()));
                        }
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The next batch waits for one in flight to finish, but never longer than the hold.
    #[tokio::test(start_paused = true)]
    async fn a_batch_waits_for_a_slot_at_most_the_hold() {
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        let held: Vec<_> = (0..IN_FLIGHT)
            .map(|_| slots.clone().try_acquire_owned().expect("a free slot"))
            .collect();
        let start = tokio::time::Instant::now();
        assert!(slot(&slots).await.is_none(), "goes without a slot");
        assert_eq!(start.elapsed(), HOLD);

        let waiting = tokio::spawn({
            let slots = slots.clone();
            async move { slot(&slots).await.is_some() }
        });
        tokio::time::sleep(HOLD / 2).await;
        drop(held);
        assert!(
            waiting.await.expect("task"),
            "takes the slot freed within the hold"
        );
        assert!(slot(&slots).await.is_some(), "a free slot is taken at once");
    }
}
