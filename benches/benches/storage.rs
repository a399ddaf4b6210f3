//! Storage backend benchmarks: one criterion group per backend.
//!
//! Run: `cargo bench -p chorus-benches --bench storage`. Figures go to docs/BENCHMARKS.md.
//!
//! Every benchmark reports operations per second over all threads (criterion's
//! "thrpt", elements/s). Per backend: `get`, `put` and `mixed` (90% get, 10% put) with
//! 100-byte and 4 KiB values, on one and two OS threads; each thread drives the store from
//! its own single-threaded Tokio runtime, awaiting one operation at a time. Gets read keys of
//! a preloaded set of 10,000; puts write the same keys with ever newer versions, so every put
//! replaces a record. The file backend also runs durable puts (`fsync = always`) from 1 and
//! 64 concurrent writers on a 2-worker runtime, where group commit shares each fsync.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus::Storage;
use chorus::backend_file::{FileOptions, FileStorage, FsyncPolicy};
use chorus::backend_memory::MemoryStorage;
use chorus::backend_moka::{MokaOptions, MokaStorage};
use chorus::backend_sled::{SledOptions, SledStorage};
use chorus::{NodeId, Record, Timestamp, Version};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// Keys preloaded and then read and written.
const KEYS: usize = 10_000;

/// Value sizes measured.
const SIZES: [(usize, &str); 2] = [(100, "100B"), (4096, "4KiB")];

/// A source of ever newer versions shared by all threads.
static CLOCK: AtomicU64 = AtomicU64::new(1);

fn next_version() -> Version {
    let tick = CLOCK.fetch_add(1, Ordering::Relaxed);
    Version::new(Timestamp::from_u64(tick << 16), NodeId(1))
}

fn keys() -> Arc<Vec<Bytes>> {
    Arc::new(
        (0..KEYS)
            .map(|i| Bytes::from(format!("user:{i:08}")))
            .collect(),
    )
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[derive(Clone, Copy)]
enum Op {
    Get,
    Put,
    Mixed,
}

/// Runs `iters` operations on each of `threads` threads; returns the wall time.
fn run_threads<S: Storage>(
    store: &Arc<S>,
    keys: &Arc<Vec<Bytes>>,
    value: &Bytes,
    op: Op,
    threads: usize,
    iters: u64,
) -> Duration {
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let store = Arc::clone(store);
            let keys = Arc::clone(keys);
            let value = value.clone();
            scope.spawn(move || {
                current_thread().block_on(async move {
                    // Threads start at different keys so they do not walk in lockstep.
                    let mut i = t * 7_919;
                    for n in 0..iters {
                        i = (i + 1) % KEYS;
                        let put = match op {
                            Op::Get => false,
                            Op::Put => true,
                            Op::Mixed => n % 10 == 0,
                        };
                        if put {
                            let record = Record::value(value.clone(), next_version());
                            black_box(store.apply(keys[i].clone(), record).await.expect("put"));
                        } else {
                            black_box(store.get(&keys[i]).await.expect("get"));
                        }
                    }
                });
            });
        }
    });
    start.elapsed()
}

fn preload<S: Storage>(store: &S, keys: &[Bytes], value: &Bytes) {
    current_thread().block_on(async {
        for key in keys {
            let record = Record::value(value.clone(), next_version());
            store.apply(key.clone(), record).await.expect("preload");
        }
        store.flush().await.expect("flush");
    });
}

fn close<S: Storage>(store: &S) {
    current_thread().block_on(async { store.close().await.expect("close") });
}

/// The get/put/mixed benchmarks of one backend; `open` makes a fresh store.
fn backend_group<S: Storage>(c: &mut Criterion, name: &str, open: impl Fn() -> S) {
    let keys = keys();
    let mut group = c.benchmark_group(name);
    for (size, size_name) in SIZES {
        let value = Bytes::from(vec![0xab; size]);
        let store = Arc::new(open());
        preload(&*store, &keys, &value);
        for threads in [1usize, 2] {
            group.throughput(Throughput::Elements(threads as u64));
            for (op, op_name) in [
                (Op::Get, "get"),
                (Op::Put, "put"),
                (Op::Mixed, "mixed90_10"),
            ] {
                let id = BenchmarkId::new(format!("{op_name}/{size_name}"), format!("{threads}t"));
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| run_threads(&store, &keys, &value, op, threads, iters))
                });
            }
        }
        close(&*store);
    }
    group.finish();
}

fn memory(c: &mut Criterion) {
    backend_group(c, "memory", MemoryStorage::new);
}

fn file(c: &mut Criterion) {
    let dirs = std::sync::Mutex::new(Vec::new());
    backend_group(c, "file", || {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = FileOptions::default().with_fsync(FsyncPolicy::Never);
        let store = FileStorage::open(dir.path(), options).expect("open");
        dirs.lock().expect("dirs").push(dir);
        store
    });
}

/// Durable puts (fsync = always) from `writers` concurrent tasks on a 2-worker runtime.
fn file_durable(c: &mut Criterion) {
    let keys = keys();
    let value = Bytes::from(vec![0xab; 100]);
    let mut group = c.benchmark_group("file_durable");
    group.throughput(Throughput::Elements(1));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(FileStorage::open(dir.path(), FileOptions::default()).expect("open"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    for writers in [1u64, 64] {
        group.bench_function(
            BenchmarkId::new("put/100B", format!("{writers}_writers")),
            |b| {
                b.iter_custom(|iters| {
                    let per_writer = iters.div_ceil(writers);
                    runtime.block_on(async {
                        let start = Instant::now();
                        let mut tasks = Vec::new();
                        for w in 0..writers {
                            let store = Arc::clone(&store);
                            let keys = Arc::clone(&keys);
                            let value = value.clone();
                            tasks.push(tokio::spawn(async move {
                                for n in 0..per_writer {
                                    let key = keys[((w * 131 + n) as usize) % KEYS].clone();
                                    let record = Record::value(value.clone(), next_version());
                                    store.apply(key, record).await.expect("put");
                                }
                            }));
                        }
                        for task in tasks {
                            task.await.expect("writer");
                        }
                        // Scale to the requested count (the last round may overshoot).
                        start
                            .elapsed()
                            .mul_f64(iters as f64 / (per_writer * writers) as f64)
                    })
                })
            },
        );
    }
    group.finish();
    close(&*store);
}

fn sled(c: &mut Criterion) {
    let dirs = std::sync::Mutex::new(Vec::new());
    backend_group(c, "sled", || {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStorage::open(dir.path(), SledOptions::default()).expect("open");
        dirs.lock().expect("dirs").push(dir);
        store
    });
}

fn moka(c: &mut Criterion) {
    backend_group(c, "moka", || MokaStorage::new(MokaOptions::default()));
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(20);
    targets = memory, file, file_durable, sled, moka
}
criterion_main!(benches);
