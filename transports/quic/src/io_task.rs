//! One Tokio task that runs all of a transport's QUIC work: quinn's endpoint and connection
//! drivers (through [`IoRuntime`], the [`quinn::Runtime`] the endpoint is built with) and the
//! transport's own writers and stream readers.
//!
//! # Why
//!
//! With quinn's own runtime every driver is a task of its own, so one arriving packet wakes
//! the endpoint driver, which wakes the connection driver, which wakes the stream reader, which
//! wakes whoever calls `recv`. Tokio runs at most three tasks woken one after the other on the
//! same worker (its LIFO slot); the fourth is queued and a sleeping worker is woken to steal it.
//! On a request/response path that hand-off between threads happens on every message and costs
//! more than the QUIC processing itself. Inside this task, the drivers and readers wake one
//! another without going through Tokio at all: a packet wakes this task, and the frame it
//! carries wakes the `recv` caller, as with a TCP socket.
//!
//! # Contract
//!
//! [`IoTask::spawn`] queues a future; [`IoTask::run`] (spawned once on Tokio) polls queued
//! futures until none is left, then waits to be woken. A future woken from any thread is
//! queued again, and the task is woken only if it is not already polling (a wake that arrives
//! while it polls is picked up before it sleeps). After [`BUDGET`] polls in a row, or once
//! Tokio's cooperative budget is spent, the task yields to Tokio, so it never starves others. A future that panics is dropped, counted
//! and logged; the others keep running. `run` completes once no future is left and every
//! [`IoTask`] handle is gone. Dropping `run` before that (the runtime shutting down, say)
//! drops every unfinished future, which releases the sockets and connections they hold;
//! futures spawned afterwards are dropped at once.
//!
//! The price: the QUIC work of one transport runs on one core at a time. Encryption of bulk
//! transfers to several peers does not spread over cores; the benchmarks in
//! `docs/BENCHMARKS.md` show what one core carries.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures::task::{ArcWake, AtomicWaker, waker_ref};

/// Futures polled before the task yields to Tokio.
const BUDGET: usize = 128;

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A handle that queues futures on one I/O task. Cloning it is cheap.
pub(crate) struct IoTask {
    shared: Arc<Shared>,
}

struct Shared {
    /// Jobs woken and not yet polled.
    ready: Mutex<VecDeque<Arc<Job>>>,
    /// Every unfinished job, so that dropping `run` can drop their futures: the futures and
    /// the wakers they leave with quinn, timers and sockets form reference cycles that only
    /// that breaks.
    jobs: Mutex<HashMap<u64, Arc<Job>>>,
    next_id: AtomicU64,
    /// Whether `run` is polling jobs right now (a wake then needs no Tokio wake-up).
    polling: AtomicBool,
    /// Set when `run` is dropped: nothing will poll again, so new futures are dropped.
    dead: AtomicBool,
    /// The Tokio task running `run`.
    outer: AtomicWaker,
    /// [`IoTask`] handles alive; `run` ends when this and the job count are both zero.
    handles: AtomicUsize,
    /// Jobs that panicked.
    panicked: AtomicU64,
}

struct Job {
    id: u64,
    future: Mutex<Option<BoxFuture>>,
    /// Whether the job is in `ready` (so a burst of wakes queues it once).
    queued: AtomicBool,
    shared: Arc<Shared>,
}

impl ArcWake for Job {
    fn wake_by_ref(job: &Arc<Self>) {
        let shared = &job.shared;
        if shared.dead.load(Ordering::Acquire) || job.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        lock(&shared.ready).push_back(Arc::clone(job));
        // Paired with `run` clearing `polling` before it looks at `ready` one last time:
        // either this sees `polling` cleared and wakes the task, or `run` sees the job.
        if !shared.polling.load(Ordering::SeqCst) {
            shared.outer.wake();
        }
    }
}

/// Locks `m`, ignoring poisoning: every critical section in this crate is a single insert,
/// remove, push, pop or read, so the data stays consistent even if a holder panicked.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl fmt::Debug for IoTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoTask")
            .field("jobs", &lock(&self.shared.jobs).len())
            .field("panicked", &self.shared.panicked.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Clone for IoTask {
    fn clone(&self) -> Self {
        self.shared.handles.fetch_add(1, Ordering::AcqRel);
        IoTask {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for IoTask {
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last handle going may be what `run` waits for.
            self.shared.outer.wake();
        }
    }
}

impl IoTask {
    /// A new task with nothing queued; spawn [`IoTask::run`] on Tokio to drive it.
    pub(crate) fn new() -> Self {
        IoTask {
            shared: Arc::new(Shared {
                ready: Mutex::new(VecDeque::new()),
                jobs: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                polling: AtomicBool::new(false),
                dead: AtomicBool::new(false),
                outer: AtomicWaker::new(),
                handles: AtomicUsize::new(1),
                panicked: AtomicU64::new(0),
            }),
        }
    }

    /// Queues `future` to run on this task. After `run` was dropped (the runtime is shutting
    /// down) the future is dropped instead.
    pub(crate) fn spawn(&self, future: impl Future<Output = ()> + Send + 'static) {
        self.spawn_boxed(Box::pin(future));
    }

    fn spawn_boxed(&self, future: BoxFuture) {
        let shared = &self.shared;
        let job = Arc::new(Job {
            id: shared.next_id.fetch_add(1, Ordering::Relaxed),
            future: Mutex::new(Some(future)),
            queued: AtomicBool::new(false),
            shared: Arc::clone(shared),
        });
        {
            let mut jobs = lock(&shared.jobs);
            // Checked under the lock `Run::drop` empties the registry with.
            if shared.dead.load(Ordering::Acquire) {
                drop(jobs);
                let future = lock(&job.future).take();
                drop(future);
                return;
            }
            jobs.insert(job.id, Arc::clone(&job));
        }
        ArcWake::wake_by_ref(&job);
    }

    /// Futures that panicked so far.
    pub(crate) fn panicked(&self) -> u64 {
        self.shared.panicked.load(Ordering::Relaxed)
    }

    /// Polls the queued futures; completes when none is left and no handle remains.
    pub(crate) fn run(self) -> impl Future<Output = ()> + Send + 'static {
        Run {
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The future of [`IoTask::run`]. Dropping it before it completes drops every unfinished
/// job's future.
struct Run {
    shared: Arc<Shared>,
}

impl Future for Run {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        poll_jobs(&self.shared, cx)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let shared = &self.shared;
        let jobs: Vec<Arc<Job>> = {
            let mut jobs = lock(&shared.jobs);
            shared.dead.store(true, Ordering::Release);
            jobs.drain().map(|(_, job)| job).collect()
        };
        lock(&shared.ready).clear();
        // Outside every lock: a future's destructor may wake or spawn.
        for job in jobs {
            let future = lock(&job.future).take();
            drop(future);
        }
        lock(&shared.ready).clear();
    }
}

fn poll_jobs(shared: &Arc<Shared>, cx: &mut Context<'_>) -> Poll<()> {
    shared.outer.register(cx.waker());
    shared.polling.store(true, Ordering::SeqCst);
    let mut polls = 0;
    loop {
        let next = lock(&shared.ready).pop_front();
        let Some(job) = next else {
            shared.polling.store(false, Ordering::SeqCst);
            if !lock(&shared.ready).is_empty() {
                shared.polling.store(true, Ordering::SeqCst);
                continue;
            }
            if shared.handles.load(Ordering::Acquire) == 0 && lock(&shared.jobs).is_empty() {
                return Poll::Ready(());
            }
            return Poll::Pending;
        };
        // Tokio's own budget runs out when the futures used many sockets, channels or timers:
        // they would only return `Pending` until the task yields.
        if polls == BUDGET || !tokio::task::coop::has_budget_remaining() {
            lock(&shared.ready).push_front(job);
            shared.polling.store(false, Ordering::SeqCst);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        polls += 1;
        poll_job(shared, &job);
    }
}

fn poll_job(shared: &Shared, job: &Arc<Job>) {
    // Cleared before the poll, so a wake during it queues the job again.
    job.queued.store(false, Ordering::Release);
    let mut slot = lock(&job.future);
    let Some(future) = slot.as_mut() else {
        return; // finished earlier; a stale wake
    };
    let waker = waker_ref(job);
    let mut cx = Context::from_waker(&waker);
    let done = match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(&mut cx))) {
        Ok(Poll::Pending) => false,
        Ok(Poll::Ready(())) => true,
        Err(panic) => {
            shared.panicked.fetch_add(1, Ordering::Relaxed);
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(%message, "a QUIC I/O future panicked; it was dropped");
            true
        }
    };
    if done {
        let future = slot.take();
        drop(slot);
        lock(&shared.jobs).remove(&job.id);
        // Dropped outside the lock: its destructor may wake or spawn jobs.
        drop(future);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::{mpsc, oneshot};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn futures_run_wake_each_other_and_the_task_ends_with_them() {
        let io = IoTask::new();
        let runner = tokio::spawn(io.clone().run());
        let (tx, mut rx) = mpsc::channel::<u32>(1);
        let (done_tx, done_rx) = oneshot::channel();
        io.spawn(async move {
            let mut sum = 0;
            while let Some(n) = rx.recv().await {
                sum += n;
            }
            let _ = done_tx.send(sum);
        });
        io.spawn(async move {
            for n in 1..=100 {
                // A full channel makes this future wait for the other one, inside the task.
                tx.send(n).await.expect("receiver alive");
            }
        });
        // Woken from outside the task, by a timer.
        io.spawn(async { tokio::time::sleep(Duration::from_millis(20)).await });
        let sum = tokio::time::timeout(Duration::from_secs(10), done_rx)
            .await
            .expect("in time")
            .expect("sum");
        assert_eq!(sum, 5050);
        drop(io);
        tokio::time::timeout(Duration::from_secs(10), runner)
            .await
            .expect("run ends once every future and handle is gone")
            .expect("no panic");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_future_is_dropped_and_the_others_go_on() {
        let io = IoTask::new();
        let runner = tokio::spawn(io.clone().run());
        io.spawn(async { panic!("boom") });
        let (tx, rx) = oneshot::channel();
        io.spawn(async move {
            tokio::task::yield_now().await;
            let _ = tx.send(7);
        });
        let got = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("in time")
            .expect("value");
        assert_eq!(got, 7);
        assert_eq!(io.panicked(), 1);
        drop(io);
        tokio::time::timeout(Duration::from_secs(10), runner)
            .await
            .expect("ends")
            .expect("the panic stayed inside the job");
    }

    #[test]
    fn a_busy_task_yields_to_others() {
        // On one thread, a task that never yielded would keep everything else from running;
        // the runtime runs on its own thread so that a failure is a timeout, not a hang.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_in = Arc::clone(&stop);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let io = IoTask::new();
                let runner = tokio::spawn(io.clone().run());
                // Futures that wake themselves at once, forever.
                for _ in 0..10 {
                    let stop = Arc::clone(&stop_in);
                    io.spawn(std::future::poll_fn(move |cx| {
                        if stop.load(Ordering::Relaxed) {
                            return Poll::Ready(());
                        }
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }));
                }
                let outside =
                    tokio::spawn(async { tokio::time::sleep(Duration::from_millis(10)).await });
                outside.await.expect("no panic");
                let _ = done_tx.send(());
                stop_in.store(true, Ordering::Relaxed);
                drop(io);
                runner.await.expect("no panic");
            });
        });
        let ran = done_rx.recv_timeout(Duration::from_secs(10));
        stop.store(true, Ordering::Relaxed);
        assert!(
            ran.is_ok(),
            "a task outside the I/O task did not run within 10 s"
        );
    }

    /// Sets its flag when dropped.
    struct Sentinel(Arc<AtomicBool>);

    impl Drop for Sentinel {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn dropping_the_runtime_drops_pending_futures_even_in_a_cycle() {
        let dropped = Arc::new(AtomicBool::new(false));
        let late = Arc::new(AtomicBool::new(false));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let io = rt.block_on(async {
            let io = IoTask::new();
            tokio::spawn(io.clone().run());
            // The future holds a handle to its own task, as the transport's futures do
            // (through the transport's state): without teardown, neither would ever go.
            let (sentinel, own) = (Sentinel(Arc::clone(&dropped)), io.clone());
            io.spawn(async move {
                let _keep = (sentinel, own);
                std::future::pending::<()>().await;
            });
            tokio::task::yield_now().await;
            io
        });
        assert!(
            !dropped.load(Ordering::SeqCst),
            "still pending while the runtime runs"
        );
        drop(rt);
        assert!(
            dropped.load(Ordering::SeqCst),
            "the runtime's shutdown dropped the future"
        );
        // Nothing polls any more: a future spawned now is dropped at once.
        let sentinel = Sentinel(Arc::clone(&late));
        io.spawn(async move {
            let _keep = sentinel;
        });
        assert!(late.load(Ordering::SeqCst));
    }
}
