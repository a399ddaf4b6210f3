//! Unit tests: options, recovery, compaction, torn tails and damage, and the failure paths
//! (through fault-injecting file hooks).

use std::fs;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Condvar, Mutex};
use std::task::{Context, Poll, Waker};

use chorus_core::hlc::{Timestamp, Version};
use chorus_core::identity::NodeId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::fs::{Fault, Fs, Hooks, Op};

fn version(ms: u64, node: u64) -> Version {
    Version::new(Timestamp::new(ms, 0), NodeId(node))
}

fn key(k: &str) -> Bytes {
    Bytes::copy_from_slice(k.as_bytes())
}

fn seed() -> u64 {
    match std::env::var("CHORUS_SEED") {
        Ok(text) => text.trim().parse().expect("CHORUS_SEED is a decimal u64"),
        Err(_) => 0x5eed_f11e,
    }
}

/// Segment files of `dir`, oldest first.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    paths.sort();
    paths
}

/// Every record of a store, by key.
async fn contents(store: &FileStorage) -> BTreeMap<Bytes, Record> {
    let page = store
        .scan(
            HashRange::FULL,
            None,
            NonZeroUsize::new(1 << 20).expect("nz"),
        )
        .await
        .expect("scan");
    page.entries
        .into_iter()
        .map(|e| (e.key, e.record))
        .collect()
}

#[test]
fn options_parse_and_name_the_bad_field() {
    let mut options = BTreeMap::new();
    assert_eq!(
        FileOptions::from_options(&options).expect("defaults"),
        FileOptions::default()
    );
    options.insert("fsync".into(), "interval:50ms".into());
    options.insert("segment_bytes".into(), "4096".into());
    let parsed = FileOptions::from_options(&options).expect("valid");
    assert_eq!(
        parsed.fsync,
        FsyncPolicy::Interval(Duration::from_millis(50))
    );
    assert_eq!(parsed.segment_bytes.get(), 4096);
    for (name, value) in [
        ("fsync", "sometimes"),
        ("fsync", "interval:0ms"),
        ("fsync", "interval:5m"),
        ("segment_bytes", "0"),
        ("compact_min_bytes", "-1"),
        ("cache", "1"),
    ] {
        let mut options = BTreeMap::new();
        options.insert(name.to_owned(), value.to_owned());
        let text = FileOptions::from_options(&options)
            .expect_err("invalid")
            .to_string();
        assert!(text.contains(&format!("`{name}`")), "{text}");
    }
    assert_eq!("never".parse(), Ok(FsyncPolicy::Never));
    assert_eq!("always".parse(), Ok(FsyncPolicy::Always));
    assert_eq!(
        "interval:2s".parse(),
        Ok(FsyncPolicy::Interval(Duration::from_secs(2)))
    );
}

#[test]
fn the_registry_factory_needs_a_path() {
    let mut registry = Registry::new();
    register(&mut registry);
    let err = registry
        .open_backend(&StorageSpec::new(SCHEME))
        .expect_err("no path");
    assert!(err.to_string().contains("StorageSpec::path"), "{err}");
}

#[tokio::test]
async fn reopen_recovers_the_merge_and_the_directory_is_locked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = FileOptions::default().with_fsync(FsyncPolicy::Never);
    let store = FileStorage::open(dir.path(), options.clone()).expect("open");
    let err = FileStorage::open(dir.path(), options.clone()).expect_err("locked");
    assert!(matches!(err, StorageError::Config(_)), "{err}");
    store
        .apply(key("a"), Record::value("new", version(20, 1)))
        .await
        .expect("apply");
    let stale = store
        .apply(key("a"), Record::value("old", version(10, 1)))
        .await
        .expect("apply");
    assert!(!stale.is_applied());
    store
        .apply(key("b"), Record::tombstone(version(5, 1)))
        .await
        .expect("apply");
    store
        .apply(key("c"), Record::value("x", version(5, 1)).with_expiry(99))
        .await
        .expect("apply");
    let before = contents(&store).await;
    let stats = store.stats().await.expect("stats");
    store.close().await.expect("close");

    let store = FileStorage::open(dir.path(), options).expect("reopen");
    assert_eq!(contents(&store).await, before);
    assert_eq!(store.stats().await.expect("stats"), stats);
    assert_eq!(
        store.get(b"a").await.expect("get"),
        Some(Record::value("new", version(20, 1)))
    );
    store.close().await.expect("close");
}

#[tokio::test]
async fn dropping_without_close_releases_the_directory_with_the_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    // `never` acknowledges before the writer has written anything, so the drop has a queue
    // to write out; several rounds give a writer that outlives the drop every chance to show.
    let options = FileOptions::default().with_fsync(FsyncPolicy::Never);
    let mut expected = BTreeMap::new();
    for round in 0..5u64 {
        let store = FileStorage::open(dir.path(), options.clone())
            .unwrap_or_else(|err| panic!("round {round}: open right after the drop: {err}"));
        assert_eq!(contents(&store).await, expected, "round {round}: recovered");
        for i in 0..2_000u64 {
            let k = key(&format!("r{round}-{i}"));
            let record = Record::value(vec![b'v'; 512], version(round * 10_000 + i + 1, 1));
            store.apply(k.clone(), record.clone()).await.expect("apply");
            expected.insert(k, record);
        }
        drop(store);
    }
    let store = FileStorage::open(dir.path(), options).expect("final open");
    assert_eq!(contents(&store).await, expected);
    store.close().await.expect("close");
}

#[tokio::test]
async fn compaction_drops_superseded_and_purged_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = FileOptions::default()
        .with_fsync(FsyncPolicy::Never)
        .with_segment_bytes(NonZeroU64::new(512).expect("nz"));
    let store = FileStorage::open(dir.path(), options.clone()).expect("open");
    for round in 1..=20u64 {
        for k in 0..10 {
            let record = Record::value(format!("value {round}"), version(round, 1));
            store
                .apply(key(&format!("k{k}")), record)
                .await
                .expect("apply");
        }
    }
    store
        .apply(key("gone"), Record::tombstone(version(1_000, 1)))
        .await
        .expect("apply");
    store.flush().await.expect("flush");
    let log_before: u64 = segments(dir.path())
        .iter()
        .map(|p| fs::metadata(p).expect("meta").len())
        .sum();
    let purged = store
        .purge(5_000, Duration::from_millis(100))
        .await
        .expect("purge");
    assert_eq!(purged.tombstones, 1);
    store.compact().await.expect("compact");
    let log_after: u64 = segments(dir.path())
        .iter()
        .map(|p| fs::metadata(p).expect("meta").len())
        .sum();
    assert!(
        log_after * 10 < log_before,
        "compaction shrinks the log: {log_before} -> {log_after}"
    );
    let before = contents(&store).await;
    assert_eq!(before.len(), 10);
    store.close().await.expect("close");

    let store = FileStorage::open(dir.path(), options).expect("reopen");
    assert_eq!(
        contents(&store).await,
        before,
        "the purge survives reopening"
    );
    assert_eq!(store.get(b"gone").await.expect("get"), None);
    store.close().await.expect("close");
}

/// Which operations a [`Rule`] fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Write,
    SyncData,
    SyncAll,
    Create,
}

/// Fails the next `times` operations of `kind` on files whose name ends in `suffix`.
#[derive(Debug)]
struct Rule {
    kind: Kind,
    suffix: &'static str,
    error: io::ErrorKind,
    /// Bytes a failed write really writes first (a short write).
    written: usize,
    times: usize,
}

/// File hooks for the tests: count fsyncs of segments, hold one open, fail operations by
/// rule, and report finished compactions.
#[derive(Default)]
struct TestHooks {
    /// `fdatasync` calls on segment files.
    segment_syncs: AtomicU64,
    /// While set, the next `fdatasync` of a segment waits (after announcing itself).
    hold: Mutex<bool>,
    released: Condvar,
    entered: Mutex<Option<tokio::sync::mpsc::UnboundedSender<()>>>,
    rules: Mutex<Vec<Rule>>,
    /// Told the target of every rename to a segment (a compaction's output going live).
    renamed: Mutex<Option<std::sync::mpsc::Sender<PathBuf>>>,
    /// Every operation on the metadata directory or its files, in order.
    meta_ops: Mutex<Vec<String>>,
}

impl TestHooks {
    fn fail(&self, kind: Kind, suffix: &'static str, error: io::ErrorKind, times: usize) {
        self.fail_short(kind, suffix, error, 0, times);
    }

    fn fail_short(
        &self,
        kind: Kind,
        suffix: &'static str,
        error: io::ErrorKind,
        written: usize,
        times: usize,
    ) {
        self.rules.lock().expect("rules").push(Rule {
            kind,
            suffix,
            error,
            written,
            times,
        });
    }

    fn clear_faults(&self) {
        self.rules.lock().expect("rules").clear();
    }

    /// Holds the next segment fsync open; `entered` hears when it starts.
    fn hold_next_sync(&self) -> tokio::sync::mpsc::UnboundedReceiver<()> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.entered.lock().expect("entered") = Some(tx);
        *self.hold.lock().expect("hold") = true;
        rx
    }

    fn release(&self) {
        *self.hold.lock().expect("hold") = false;
        self.released.notify_all();
    }

    fn syncs(&self) -> u64 {
        self.segment_syncs.load(Ordering::SeqCst)
    }
}

fn is_segment(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "seg")
}

/// The file name of `path`.
fn file_name(path: &Path) -> String {
    path.file_name()
        .map_or_else(String::new, |name| name.to_string_lossy().into_owned())
}

impl Hooks for TestHooks {
    fn before(&self, op: &Op<'_>) -> Result<(), Fault> {
        let in_meta = |path: &Path| {
            path.ends_with(meta::META_DIR)
                || path.parent().is_some_and(|p| p.ends_with(meta::META_DIR))
        };
        let logged = match *op {
            Op::Write { path, len } if in_meta(path) => {
                Some(format!("write {} {len}", file_name(path)))
            }
            Op::SyncData(path) | Op::SyncAll(path) if in_meta(path) => {
                Some(format!("sync {}", file_name(path)))
            }
            Op::SyncDir(path) if in_meta(path) => Some(format!("sync_dir {}", file_name(path))),
            Op::Create(path) if in_meta(path) => Some(format!("create {}", file_name(path))),
            Op::Rename { from, to } if in_meta(to) => {
                Some(format!("rename {} {}", file_name(from), file_name(to)))
            }
            Op::Remove(path) if in_meta(path) => Some(format!("remove {}", file_name(path))),
            _ => None,
        };
        if let Some(logged) = logged {
            self.meta_ops.lock().expect("meta ops").push(logged);
        }
        let (kind, path) = match *op {
            Op::Write { path, .. } => (Some(Kind::Write), path),
            Op::SyncData(path) => (Some(Kind::SyncData), path),
            Op::SyncAll(path) => (Some(Kind::SyncAll), path),
            Op::Create(path) => (Some(Kind::Create), path),
            Op::Rename { to, .. } => {
                if is_segment(to)
                    && let Some(tx) = &*self.renamed.lock().expect("renamed")
                {
                    let _ = tx.send(to.to_owned());
                }
                (None, to)
            }
            Op::SyncDir(path) | Op::Remove(path) | Op::Truncate { path, .. } => (None, path),
        };
        if kind == Some(Kind::SyncData) && is_segment(path) {
            self.segment_syncs.fetch_add(1, Ordering::SeqCst);
            let mut hold = self.hold.lock().expect("hold");
            if *hold && let Some(entered) = self.entered.lock().expect("entered").take() {
                let _ = entered.send(());
            }
            while *hold {
                hold = self.released.wait(hold).expect("hold");
            }
        }
        let name = path.to_string_lossy();
        let mut rules = self.rules.lock().expect("rules");
        for rule in rules.iter_mut() {
            if Some(rule.kind) == kind && rule.times > 0 && name.ends_with(rule.suffix) {
                rule.times -= 1;
                return Err(Fault {
                    error: io::Error::new(rule.error, "injected fault"),
                    written: rule.written,
                });
            }
        }
        Ok(())
    }
}

/// Releases a held fsync when dropped, so a failing assertion fails the test instead of
/// leaving the writer thread held (and the store's drop waiting for it forever).
struct ReleaseOnDrop(Arc<TestHooks>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Opens a store in `dir` whose file operations go through `hooks`.
fn open_hooked(
    dir: &Path,
    options: FileOptions,
    hooks: &Arc<TestHooks>,
) -> Result<FileStorage, StorageError> {
    let tuning = Tuning {
        fs: Fs::with_hooks(Arc::clone(hooks) as Arc<dyn Hooks>),
        compact_backoff: Duration::ZERO,
    };
    FileStorage::open_tuned(dir, options, tuning)
}

/// An apply in flight, polled by hand.
type PendingApply<'a> =
    Pin<Box<dyn Future<Output = Result<ApplyOutcome, StorageError>> + Send + 'a>>;

/// Polls `future` once, with nothing to wake it.
fn poll_once<F: Future + ?Sized>(future: Pin<&mut F>) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(Waker::noop()))
}

/// Files in `dir` whose name ends in `suffix`.
fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    paths.sort();
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_durable_writers_share_fsyncs() {
    const WRITERS: u64 = 64;
    const ROUNDS: u64 = 10;
    let dir = tempfile::tempdir().expect("tempdir");
    let hooks = Arc::new(TestHooks::default());
    let store = open_hooked(dir.path(), FileOptions::default(), &hooks).expect("open");
    let _release = ReleaseOnDrop(Arc::clone(&hooks));
    let before = hooks.syncs();
    for round in 0..ROUNDS {
        // Every writer's apply is issued while the writer thread is held in (at most) the
        // round's first fsync, as 64 concurrent requests arrive on a busy store: all of them
        // are queued before any but the first batch is synced.
        let mut entered = hooks.hold_next_sync();
        let mut applies: Vec<PendingApply<'_>> = (0..WRITERS)
            .map(|writer| {
                let record = Record::value(format!("{writer}/{round}"), version(round + 1, writer));
                Box::pin(store.apply(key(&format!("w{writer}")), record)) as PendingApply<'_>
            })
            .collect();
        for apply in &mut applies {
            assert!(
                poll_once(apply.as_mut()).is_pending(),
                "acknowledged unsynced"
            );
        }
        entered
            .recv()
            .await
            .expect("the round's first fsync starts");
        hooks.release();
        for apply in applies {
            assert!(apply.await.expect("apply").is_applied());
        }
    }
    let syncs = hooks.syncs() - before;
    let writes = WRITERS * ROUNDS;
    eprintln!("{writes} durable writes, {syncs} fsyncs");
    assert!(
        syncs <= 2 * ROUNDS,
        "{writes} writes from {WRITERS} concurrent writers took {syncs} fsyncs: not shared"
    );
    store.close().await.expect("close");
    let store = FileStorage::open(dir.path(), FileOptions::default()).expect("reopen");
    for writer in 0..WRITERS {
        assert_eq!(
            store
                .get(format!("w{writer}").as_bytes())
                .await
                .expect("get"),
            Some(Record::value(
                format!("{writer}/{}", ROUNDS - 1),
                version(ROUNDS, writer)
            ))
        );
    }
    store.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_apply_returns_only_after_the_record_it_reports_is_synced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hooks = Arc::new(TestHooks::default());
    let store = Arc::new(open_hooked(dir.path(), FileOptions::default(), &hooks).expect("open"));
    let _release = ReleaseOnDrop(Arc::clone(&hooks));
    let record = Record::value("v", version(7, 1));
    let mut entered = hooks.hold_next_sync();
    let first = tokio::spawn({
        let store = Arc::clone(&store);
        let record = record.clone();
        async move { store.apply(key("k"), record).await }
    });
    // The first writer's record is in the index and written; its fsync is held open.
    entered.recv().await.expect("the first fsync starts");
    for retry in [record.clone(), Record::value("older", version(3, 1))] {
        let apply = store.apply(key("k"), retry);
        let mut apply = std::pin::pin!(apply);
        assert!(
            poll_once(apply.as_mut()).is_pending(),
            "a Stale apply returned while the record it reports was not synced"
        );
    }
    let retry = store.apply(key("k"), record.clone());
    let mut retry = std::pin::pin!(retry);
    assert!(poll_once(retry.as_mut()).is_pending());
    hooks.release();
    assert_eq!(
        first.await.expect("first").expect("apply"),
        ApplyOutcome::Applied { previous: None }
    );
    assert_eq!(
        retry.await.expect("retry"),
        ApplyOutcome::Stale {
            current: record.clone()
        }
    );
    // Once the record is durable, a Stale answer costs no fsync.
    let syncs = hooks.syncs();
    let stale = store.apply(key("k"), record.clone()).await.expect("apply");
    assert!(!stale.is_applied());
    assert_eq!(
        hooks.syncs(),
        syncs,
        "an fsync for an already durable record"
    );
    store.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_if_unchanged_is_synced_before_it_returns_and_survives_a_crash_and_compaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hooks = Arc::new(TestHooks::default());
    let store = open_hooked(dir.path(), FileOptions::default(), &hooks).expect("open");
    let _release = ReleaseOnDrop(Arc::clone(&hooks));
    for (k, ms) in [("gone", 5), ("kept", 5), ("newer", 5)] {
        store
            .apply(key(k), Record::value(k, version(ms, 1)))
            .await
            .expect("apply");
    }
    store
        .apply(key("newer"), Record::value("newer", version(9, 1)))
        .await
        .expect("apply");
    let mut entered = hooks.hold_next_sync();
    {
        let remove = store.remove_if_version(b"gone", version(5, 1));
        let mut remove = std::pin::pin!(remove);
        assert!(poll_once(remove.as_mut()).is_pending());
        entered.recv().await.expect("the removal's fsync starts");
        assert!(
            poll_once(remove.as_mut()).is_pending(),
            "a removal returned before its frame was synced"
        );
        hooks.release();
        assert!(remove.await.expect("remove"));
    }
    assert!(
        !store
            .remove_if_version(b"newer", version(5, 1))
            .await
            .expect("remove"),
        "a newer record stays"
    );
    assert_eq!(store.get(b"gone").await.expect("get"), None);
    // Dropped without a close: the log ends without a commit marker, as after a crash.
    drop(store);
    let store = FileStorage::open(dir.path(), FileOptions::default()).expect("reopen");
    let recovered = |store: &FileStorage| {
        let index = store.shared.index_read();
        index.map.keys().map(|(_, k)| k.clone()).collect::<Vec<_>>()
    };
    let mut keys = recovered(&store);
    keys.sort();
    assert_eq!(keys, [key("kept"), key("newer")]);
    assert_eq!(store.stats().await.expect("stats").records, 2);
    store.compact().await.expect("compact");
    drop(store);
    let store = FileStorage::open(dir.path(), FileOptions::default()).expect("reopen");
    assert_eq!(store.get(b"gone").await.expect("get"), None);
    assert_eq!(
        store.get(b"newer").await.expect("get"),
        Some(Record::value("newer", version(9, 1)))
    );
    store.close().await.expect("close");
}

/// Writes `count` records into a fresh store, closes it, and returns the records and the
/// path and batch end offsets of the segment that holds them (each apply is one batch; the
/// clean close adds a commit marker after the last).
async fn written_log(dir: &Path, count: usize) -> (Vec<(Bytes, Record)>, PathBuf, Vec<usize>) {
    let store = FileStorage::open(dir, FileOptions::default()).expect("open");
    let mut records = Vec::new();
    let mut ends = Vec::new();
    let mut offset = codec::SEGMENT_HEADER;
    for i in 0..count {
        let k = key(&format!("key-{i}"));
        let record = if i % 5 == 4 {
            Record::tombstone(version(i as u64 + 1, 1))
        } else {
            Record::value(vec![i as u8; i % 37], version(i as u64 + 1, 1))
        };
        let mut frame = Vec::new();
        codec::encode_frame(&k, &record, &mut frame).expect("small");
        offset += codec::BATCH_HEADER + frame.len();
        ends.push(offset);
        store.apply(k.clone(), record.clone()).await.expect("apply");
        records.push((k, record));
    }
    store.close().await.expect("close");
    let all = segments(dir);
    assert_eq!(all.len(), 1, "{all:?}");
    let segment = all.into_iter().next().expect("a segment");
    assert_eq!(
        fs::metadata(&segment).expect("meta").len() as usize,
        offset + codec::BATCH_HEADER,
        "one segment holds every batch and the commit marker"
    );
    (records, segment, ends)
}

/// Copies the store directory, with `segment` replaced by `bytes`, into a fresh directory.
fn damaged_copy(segment: &Path, bytes: &[u8]) -> tempfile::TempDir {
    let copy = tempfile::tempdir().expect("tempdir");
    fs::write(copy.path().join(segment.file_name().expect("name")), bytes).expect("write");
    copy
}

#[tokio::test]
async fn torn_tails_are_cut_at_every_offset_of_the_last_three_records_and_kept_aside() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (records, segment, ends) = written_log(dir.path(), 30).await;
    let data = fs::read(&segment).expect("read");
    let from = ends[ends.len() - 4];
    for cut in from..=data.len() {
        let copy = damaged_copy(&segment, &data[..cut]);
        let store = FileStorage::open(copy.path(), FileOptions::default())
            .unwrap_or_else(|err| panic!("cut at {cut}: {err}"));
        let complete = ends.iter().filter(|&&end| end <= cut).count();
        let expected: BTreeMap<Bytes, Record> = records[..complete].iter().cloned().collect();
        assert_eq!(contents(&store).await, expected, "cut at {cut}");
        // The cut bytes are moved aside, not destroyed.
        // The commit marker is a batch too.
        let valid = ends
            .iter()
            .chain([&data.len()])
            .copied()
            .filter(|&end| end <= cut)
            .max()
            .unwrap_or(codec::SEGMENT_HEADER);
        let torn = &data[valid..cut];
        let recovery = store.recovery().clone();
        assert_eq!(recovery.torn_bytes, torn.len() as u64, "cut at {cut}");
        if torn.is_empty() {
            assert!(recovery.damaged.is_empty(), "cut at {cut}");
        } else {
            assert_eq!(recovery.damaged.len(), 1, "cut at {cut}");
            assert_eq!(fs::read(&recovery.damaged[0]).expect("aside"), torn);
        }
        // The torn bytes are gone from the log: the next open sees a clean log with the same
        // contents.
        store.close().await.expect("close");
        let store = FileStorage::open(copy.path(), FileOptions::default()).expect("reopen");
        assert_eq!(contents(&store).await, expected, "cut at {cut}, reopened");
        assert_eq!(store.recovery().torn_bytes, 0, "cut at {cut}, reopened");
        store.close().await.expect("close");
    }
}

#[tokio::test]
async fn flipped_bits_are_never_returned_and_synced_damage_is_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (records, segment, ends) = written_log(dir.path(), 30).await;
    let data = fs::read(&segment).expect("read");
    // Batch starts: after the segment header, then after each batch; the last is the marker.
    let starts: Vec<usize> = std::iter::once(codec::SEGMENT_HEADER)
        .chain(ends.iter().copied())
        .collect();
    let seed = seed();
    eprintln!("seed {seed} (set CHORUS_SEED to replay)");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut corrupt, mut torn) = (0, 0);
    for case in 0..2_000 {
        let mut bytes = data.clone();
        for _ in 0..rng.random_range(1..=3) {
            let at = rng.random_range(0..bytes.len());
            bytes[at] ^= 1 << rng.random_range(0..8);
        }
        // Two flips of one bit cancel out: the bytes that really differ.
        let differs =
            |range: std::ops::Range<usize>| range.into_iter().any(|i| bytes[i] != data[i]);
        let first = (0..bytes.len()).find(|&i| bytes[i] != data[i]);
        let ctx = format!("case {case} (seed {seed}; rerun with CHORUS_SEED={seed})");
        // Every batch was synced before the next was written (and the marker vouches for
        // the last record), so damage is a torn tail only if no batch header after the first
        // damaged batch survived to say so.
        let expect_corrupt = first.is_some_and(|first| {
            first < codec::SEGMENT_HEADER || {
                let damaged = starts.iter().rposition(|&s| s <= first).expect("a batch");
                starts[damaged + 1..]
                    .iter()
                    .any(|&s| !differs(s..s + codec::BATCH_HEADER))
            }
        });
        let copy = damaged_copy(&segment, &bytes);
        match FileStorage::open(copy.path(), FileOptions::default()) {
            Ok(store) => {
                assert!(
                    !expect_corrupt,
                    "{ctx}: damage from byte {first:?} went unreported"
                );
                // The log is cut at the first damaged batch, and everything before it comes
                // back exactly.
                let got = contents(&store).await;
                let kept = first.map_or(records.len(), |first| {
                    ends.iter().filter(|&&end| end <= first).count()
                });
                let expected: BTreeMap<Bytes, Record> = records[..kept].iter().cloned().collect();
                assert_eq!(got, expected, "{ctx}: damage from byte {first:?}");
                torn += 1;
                store.close().await.expect("close");
            }
            Err(StorageError::Corruption(message)) => {
                assert!(expect_corrupt, "{ctx}: a torn tail reported as {message}");
                assert!(message.contains("offset"), "{ctx}: {message}");
                corrupt += 1;
            }
            Err(other) => panic!("{ctx}: unexpected error {other}"),
        }
    }
    assert!(
        corrupt > 1_000 && torn > 0,
        "corrupt {corrupt}, torn {torn}"
    );
}

/// The offset of `needle` in `haystack` (which holds it once).
fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("present")
}

#[tokio::test]
async fn a_flipped_bit_in_the_last_synced_record_is_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FileStorage::open(dir.path(), FileOptions::default()).expect("open");
    store
        .apply(key("first"), Record::value("first value", version(1, 1)))
        .await
        .expect("apply");
    store
        .apply(
            key("last"),
            Record::value("LAST-VALUE-MARKER", version(2, 1)),
        )
        .await
        .expect("apply");
    store.close().await.expect("close");
    let segment = segments(dir.path()).pop().expect("segment");
    let mut data = fs::read(&segment).expect("read");
    let at = find(&data, b"LAST-VALUE-MARKER");
    data[at + 3] ^= 0x04;
    fs::write(&segment, &data).expect("write");
    let err = FileStorage::open(dir.path(), FileOptions::default()).expect_err("damaged");
    assert!(matches!(err, StorageError::Corruption(_)), "{err}");
}

#[tokio::test]
async fn a_value_holding_frames_does_not_turn_a_torn_tail_into_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FileStorage::open(dir.path(), FileOptions::default()).expect("open");
    store
        .apply(key("a"), Record::value("kept", version(1, 1)))
        .await
        .expect("apply");
    store.flush().await.expect("flush");
    // A value that holds valid frames (and a copy of the store's own log so far, batch
    // headers and all), as a value that is itself a backup of a store would.
    let mut value = b"VALUE-START".to_vec();
    let segment = segments(dir.path()).pop().expect("segment");
    value.extend_from_slice(&fs::read(&segment).expect("read"));
    for i in 0..4u64 {
        codec::encode_frame(
            format!("inner-{i}").as_bytes(),
            &Record::value("x", version(i + 1, 2)),
            &mut value,
        )
        .expect("small");
    }
    value.extend_from_slice(b"VALUE-END");
    store
        .apply(key("b"), Record::value(value, version(5, 1)))
        .await
        .expect("apply");
    drop(store);
    // A crash tore the last write: its end never reached the disk, the embedded frames did.
    let data = fs::read(&segment).expect("read");
    let end = find(&data, b"VALUE-END");
    for cut in [end, end + 4] {
        let copy = damaged_copy(&segment, &data[..cut]);
        let store = FileStorage::open(copy.path(), FileOptions::default())
            .unwrap_or_else(|err| panic!("cut at {cut}: an ordinary torn tail refused: {err}"));
        let got = contents(&store).await;
        let expected: BTreeMap<Bytes, Record> =
            [(key("a"), Record::value("kept", version(1, 1)))].into();
        assert_eq!(got, expected, "cut at {cut}");
        store.close().await.expect("close");
    }
}

#[tokio::test]
async fn segments_of_another_format_version_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FileStorage::open(dir.path(), FileOptions::default()).expect("open");
    store
        .apply(key("a"), Record::value("v", version(1, 1)))
        .await
        .expect("apply");
    store.close().await.expect("close");
    let segment = segments(dir.path()).pop().expect("segment");
    let mut data = fs::read(&segment).expect("read");
    data[8..12].copy_from_slice(&(codec::FORMAT_VERSION + 1).to_le_bytes());
    let crc = crc32c::crc32c(&data[..12]);
    data[12..16].copy_from_slice(&crc.to_le_bytes());
    fs::write(&segment, &data).expect("write");
    let err = FileStorage::open(dir.path(), FileOptions::default()).expect_err("newer format");
    let text = err.to_string();
    assert!(
        matches!(err, StorageError::Config(_)) && text.contains("format version 2"),
        "{text}"
    );
    // A segment without a header (the format before versioning) is refused too.
    fs::write(
        &segment,
        b"\x2a\0\0\0\x01\x02\x03\x04 a frame of the unversioned format",
    )
    .expect("write");
    let err = FileStorage::open(dir.path(), FileOptions::default()).expect_err("no header");
    assert!(matches!(err, StorageError::Corruption(_)), "{err}");
}

#[tokio::test]
async fn damage_in_an_older_segment_is_corruption_even_at_its_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, segment, _) = written_log(dir.path(), 5).await;
    // Reopening starts a newer segment, so the written one is no longer the newest.
    let store = FileStorage::open(dir.path(), FileOptions::default()).expect("reopen");
    store
        .apply(key("later"), Record::value("v", version(99, 1)))
        .await
        .expect("apply");
    store.close().await.expect("close");
    let len = fs::metadata(&segment).expect("meta").len();
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .expect("open");
    file.set_len(len - 1).expect("truncate");
    let err = FileStorage::open(dir.path(), FileOptions::default()).expect_err("damaged");
    let text = err.to_string();
    assert!(
        matches!(err, StorageError::Corruption(_)) && text.contains("offset"),
        "{text}"
    );
}

#[tokio::test]
async fn a_failed_fsync_of_the_log_is_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hooks = Arc::new(TestHooks::default());
    let store = open_hooked(dir.path(), FileOptions::default(), &hooks).expect("open");
    store
        .apply(key("kept"), Record::value("v", version(1, 1)))
        .await
        .expect("apply");
    hooks.fail(Kind::SyncData, ".seg", io::ErrorKind::Other, 1);
    let err = store
        .apply(key("lost"), Record::value("v", version(2, 1)))
        .await
        .expect_err("the fsync failed");
    assert!(matches!(err, StorageError::Io(_)), "{err}");
    // The fault is gone, but the kernel may have dropped the dirty pages: never retried.
    hooks.clear_faults();
    let err = store
        .apply(key("after"), Record::value("v", version(3, 1)))
        .await
        .expect_err("refused");
    assert!(matches!(err, StorageError::Closed), "{err}");
    assert!(matches!(store.flush().await, Err(StorageError::Closed)));
    assert!(matches!(
        store.get(b"kept").await,
        Err(StorageError::Closed)
    ));
    assert!(format!("{store:?}").contains("fsync of the active segment"));
    drop(store);
    let store = FileStorage::open(dir.path(), FileOptions::default()).expect("reopen");
    assert_eq!(
        store.get(b"kept").await.expect("get"),
        Some(Record::value("v", version(1, 1)))
    );
    store.close().await.expect("close");
}

#[tokio::test]
async fn a_full_disk_under_the_log_is_fatal_and_recovery_cuts_the_partial_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hooks = Arc::new(TestHooks::default());
    let store = open_hooked(dir.path(), FileOptions::default(), &hooks).expect("open");
    for i in 0..10u64 {
        store
            .apply(key(&format!("k{i}")), Record::value("v", version(i + 1, 1)))
            .await
            .expect("apply");
    }
    // ENOSPC after part of the batch reached the file.
    hooks.fail_short(Kind::Write, ".seg", io::ErrorKind::StorageFull, 30, 1);
    let err = store
        .apply(key("big"), Record::value(vec![7u8; 200], version(50, 1)))
        .await
        .expect_err("disk full");
    assert!(matches!(err, StorageError::Io(_)), "{err}");
    hooks.clear_faults();
    let err = store
        .apply(key("k0"), Record::value("v", version(60, 1)))
        .await
        .expect_err("refused");
    assert!(matches!(err, StorageError::Closed), "{err}");
    drop(store);
    let store = FileStorage::open(dir.path(), FileOptions::default()).expect("reopen");
    assert_eq!(store.recovery().torn_bytes, 30);
    assert_eq!(store.stats().await.expect("stats").records, 10);
    assert_eq!(store.get(b"big").await.expect("get"), None);
    store.close().await.expect("close");
}

#[tokio::test]
async fn a_failed_compaction_cleans_up_and_leaves_the_store_working() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hooks = Arc::new(TestHooks::default());
    let options = FileOptions::default()
        .with_fsync(FsyncPolicy::Never)
        .with_segment_bytes(NonZeroU64::new(1024).expect("nz"));
    let store = open_hooked(dir.path(), options.clone(), &hooks).expect("open");
    for round in 1..=20u64 {
        for k in 0..10 {
            store
                .apply(
                    key(&format!("k{k}")),
                    Record::value(format!("value {round}"), version(round, 1)),
                )
                .await
                .expect("apply");
        }
    }
    store.flush().await.expect("flush");
    // The disk fills up while the snapshot is written; then the snapshot's fsync fails.
    for (kind, error) in [
        (Kind::Write, io::ErrorKind::StorageFull),
        (Kind::SyncAll, io::ErrorKind::Other),
    ] {
        hooks.fail_short(kind, ".tmp", error, 100, 1);
        let before = segments(dir.path());
        let err = store.compact().await.expect_err("compaction fails");
        assert!(matches!(err, StorageError::Io(_)), "{kind:?}: {err}");
        assert!(
            files_ending(dir.path(), ".tmp").is_empty(),
            "{kind:?}: left a temporary file"
        );
        // No data was at risk: the store goes on.
        store
            .apply(key("k0"), Record::value("later", version(100, 1)))
            .await
            .unwrap_or_else(|err| panic!("{kind:?}: the store failed with the compaction: {err}"));
        assert_eq!(
            store.get(b"k1").await.expect("get"),
            Some(Record::value("value 20", version(20, 1)))
        );
        assert!(
            segments(dir.path()).len() >= before.len(),
            "{kind:?}: inputs removed"
        );
    }
    assert_eq!(store.failed_compactions(), 2);
    // Retried once the disk has room again.
    let log_before: u64 = segments(dir.path())
        .iter()
        .map(|p| fs::metadata(p).expect("meta").len())
        .sum();
    store.compact().await.expect("compaction retried");
    let log_after: u64 = segments(dir.path())
        .iter()
        .map(|p| fs::metadata(p).expect("meta").len())
        .sum();
    assert!(log_after * 4 < log_before, "{log_before} -> {log_after}");
    let before = contents(&store).await;
    store.close().await.expect("close");
    let store = FileStorage::open(dir.path(), options).expect("reopen");
    assert_eq!(contents(&store).await, before);
    store.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_background_compaction_is_retried_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hooks = Arc::new(TestHooks::default());
    let (renamed_tx, renamed) = std::sync::mpsc::channel();
    *hooks.renamed.lock().expect("renamed") = Some(renamed_tx);
    let mut options = FileOptions::default()
        .with_fsync(FsyncPolicy::Never)
        .with_segment_bytes(NonZeroU64::new(1024).expect("nz"));
    options.compact_min_bytes = 4096;
    let store = open_hooked(dir.path(), options, &hooks).expect("open");
    hooks.fail(Kind::Write, ".tmp", io::ErrorKind::StorageFull, 1);
    // Overwrite a few keys until a size-triggered compaction has failed once and then
    // completed (each rotation may start one; the back-off is zero here).
    let mut done = None;
    for i in 0..100_000u64 {
        store
            .apply(
                key(&format!("k{}", i % 4)),
                Record::value(vec![b'v'; 100], version(i + 1, 1)),
            )
            .await
            .expect("apply");
        if let Ok(path) = renamed.try_recv() {
            done = Some(path);
            break;
        }
    }
    assert!(done.is_some(), "no compaction completed");
    assert_eq!(store.failed_compactions(), 1);
    // The hook reports a rename before it happens, and the last apply's rotation may have
    // started another compaction: close waits for both, and then the failed attempt's
    // output must be gone too.
    store.close().await.expect("close");
    assert!(files_ending(dir.path(), ".tmp").is_empty());
}

#[tokio::test]
async fn a_segment_that_cannot_be_created_is_not_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hooks = Arc::new(TestHooks::default());
    let options = FileOptions::default()
        .with_fsync(FsyncPolicy::Always)
        .with_segment_bytes(NonZeroU64::new(256).expect("nz"));
    let store = open_hooked(dir.path(), options.clone(), &hooks).expect("open");
    hooks.fail(Kind::Create, ".seg", io::ErrorKind::StorageFull, 1);
    let mut expected = BTreeMap::new();
    for i in 0..40u64 {
        let record = Record::value(vec![b'v'; 40], version(i + 1, 1));
        store
            .apply(key(&format!("k{i}")), record.clone())
            .await
            .expect("apply");
        expected.insert(key(&format!("k{i}")), record);
    }
    store.close().await.expect("close");
    let store = FileStorage::open(dir.path(), options).expect("reopen");
    assert_eq!(contents(&store).await, expected);
    store.close().await.expect("close");
}

#[tokio::test]
async fn purge_logs_removals_in_batches_and_rewrites_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = FileOptions::default();
    let store = FileStorage::open(dir.path(), options.clone()).expect("open");
    let count = 3 * PURGE_BATCH as u64;
    for i in 0..count {
        let record = if i % 2 == 0 {
            Record::tombstone(version(i + 1, 1))
        } else {
            Record::value("live", version(i + 1, 1))
        };
        store
            .apply(key(&format!("k{i:05}")), record)
            .await
            .expect("apply");
    }
    let files_before = segments(dir.path());
    let purge = store.purge(1_000_000, Duration::from_millis(10));
    let mut purge = std::pin::pin!(purge);
    // One batch is removed per step, with the index lock released in between: a writer
    // gets in, and most tombstones are still there.
    assert!(poll_once(purge.as_mut()).is_pending());
    store
        .apply(key("meanwhile"), Record::value("v", version(5, 2)))
        .await
        .expect("apply between purge batches");
    let tombstones = store.stats().await.expect("stats").tombstones;
    assert!(
        tombstones > count / 2 - PURGE_BATCH as u64,
        "the first step purged {} tombstones at once",
        count / 2 - tombstones
    );
    let stats = purge.await.expect("purge");
    assert_eq!(stats.tombstones, count / 2);
    assert_eq!(store.stats().await.expect("stats").tombstones, 0);
    // No compaction ran: the same segment files, only longer by the removals.
    assert_eq!(segments(dir.path()), files_before);
    store.close().await.expect("close");
    let store = FileStorage::open(dir.path(), options).expect("reopen");
    assert_eq!(store.recovery().removals, count / 2);
    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.records, stats.tombstones), (count / 2 + 1, 0));
    // A record older than a purged one, applied after the purge, survives the replay.
    store
        .apply(key("k00000"), Record::value("late", version(0, 9)))
        .await
        .expect("apply");
    store.close().await.expect("close");
    let store = FileStorage::open(dir.path(), FileOptions::default()).expect("reopen");
    assert_eq!(
        store.get(b"k00000").await.expect("get"),
        Some(Record::value("late", version(0, 9)))
    );
    store.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_batch_costs_one_fsync_and_stale_batches_wait_for_theirs() {
    const RECORDS: u64 = 64;
    let dir = tempfile::tempdir().expect("tempdir");
    let hooks = Arc::new(TestHooks::default());
    let store = Arc::new(open_hooked(dir.path(), FileOptions::default(), &hooks).expect("open"));
    let _release = ReleaseOnDrop(Arc::clone(&hooks));
    let writes: Vec<(Bytes, Record)> = (0..RECORDS)
        .map(|i| {
            (
                key(&format!("b{i}")),
                Record::value(format!("v{i}"), version(10, i)),
            )
        })
        .collect();
    let before = hooks.syncs();
    let outcomes = store.apply_batch(writes.clone()).await.expect("batch");
    assert_eq!(
        outcomes,
        vec![ApplyOutcome::Applied { previous: None }; RECORDS as usize]
    );
    let syncs = hooks.syncs() - before;
    assert_eq!(
        syncs, 1,
        "a batch of {RECORDS} durable records took {syncs} fsyncs"
    );

    // A batch of only stale writes while the records it reports wait for their fsync: it
    // returns only after that fsync, and costs none of its own once they are durable.
    let mut entered = hooks.hold_next_sync();
    let first = tokio::spawn({
        let store = Arc::clone(&store);
        async move {
            store
                .apply(key("s"), Record::value("s", version(20, 1)))
                .await
        }
    });
    entered.recv().await.expect("the fsync starts");
    let stale = store.apply_batch(vec![
        (key("s"), Record::value("older", version(5, 1))),
        (key("b0"), writes[0].1.clone()),
    ]);
    let mut stale = std::pin::pin!(stale);
    assert!(
        poll_once(stale.as_mut()).is_pending(),
        "a Stale batch returned while the record it reports was not synced"
    );
    hooks.release();
    first.await.expect("first").expect("apply");
    assert_eq!(
        stale.await.expect("stale batch"),
        [
            ApplyOutcome::Stale {
                current: Record::value("s", version(20, 1))
            },
            ApplyOutcome::Stale {
                current: writes[0].1.clone()
            },
        ]
    );
    let syncs = hooks.syncs();
    let again = store
        .apply_batch(vec![(key("b1"), writes[1].1.clone())])
        .await
        .expect("batch");
    assert!(!again[0].is_applied());
    assert_eq!(hooks.syncs(), syncs, "an fsync for already durable records");
    store.close().await.expect("close");

    let store = FileStorage::open(dir.path(), FileOptions::default()).expect("reopen");
    for (k, record) in &writes {
        assert_eq!(store.get(k).await.expect("get").as_ref(), Some(record));
    }
    store.close().await.expect("close");
}

#[tokio::test]
async fn a_batch_with_a_record_too_large_for_the_log_applies_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FileStorage::open(dir.path(), FileOptions::default()).expect("open");
    let huge = Record::value(vec![0u8; codec::MAX_PAYLOAD], version(1, 1));
    let err = store
        .apply_batch(vec![
            (key("small"), Record::value("v", version(1, 1))),
            (key("huge"), huge),
        ])
        .await
        .expect_err("too large");
    assert!(matches!(err, StorageError::InvalidRequest(_)), "{err}");
    assert_eq!(store.get(b"small").await.expect("get"), None);
    store.close().await.expect("close");
}

#[tokio::test]
async fn metadata_is_replaced_atomically_and_synced_under_every_policy() {
    for policy in [FsyncPolicy::Always, FsyncPolicy::Never] {
        let dir = tempfile::tempdir().expect("tempdir");
        let hooks = Arc::new(TestHooks::default());
        let options = FileOptions::default().with_fsync(policy);
        let store = open_hooked(dir.path(), options.clone(), &hooks).expect("open");
        store
            .store_meta("hlc.floor", Bytes::from_static(b"one"))
            .await
            .expect("store");
        store
            .store_meta("hlc.floor", Bytes::from_static(b"two"))
            .await
            .expect("store");
        let ops = hooks.meta_ops.lock().expect("meta ops").clone();
        let replace = [
            "create hlc.floor.tmp".to_owned(),
            format!(
                "write hlc.floor.tmp {}",
                meta::encode("hlc.floor", b"two").len()
            ),
            "sync hlc.floor.tmp".to_owned(),
            "rename hlc.floor.tmp hlc.floor.meta".to_owned(),
            "sync_dir meta".to_owned(),
        ];
        assert!(
            ops.ends_with(&replace),
            "{policy:?}: store_meta did not write, fsync, rename and fsync the directory: {ops:?}"
        );
        assert_eq!(
            ops.iter().filter(|op| op.starts_with("sync")).count(),
            4,
            "{policy:?}: two fsyncs per store_meta: {ops:?}"
        );
        assert_eq!(
            store.load_meta("hlc.floor").await.expect("load").as_deref(),
            Some(&b"two"[..])
        );
        // A crash mid-replacement leaves a temporary file: ignored and removed on open.
        drop(store);
        let leftover = meta::meta_dir(dir.path()).join("hlc.floor.tmp");
        fs::write(&leftover, b"torn").expect("write");
        let store = FileStorage::open(dir.path(), options).expect("reopen");
        assert_eq!(
            store.load_meta("hlc.floor").await.expect("load").as_deref(),
            Some(&b"two"[..]),
            "{policy:?}: the value survives reopening"
        );
        assert!(!leftover.exists(), "the leftover temporary file is removed");
        store.close().await.expect("close");
    }
}

#[tokio::test]
async fn a_failed_metadata_write_keeps_the_old_value_and_the_store_working() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hooks = Arc::new(TestHooks::default());
    let store = open_hooked(dir.path(), FileOptions::default(), &hooks).expect("open");
    store
        .store_meta("generation", Bytes::from_static(b"1"))
        .await
        .expect("store");
    hooks.fail(Kind::SyncAll, ".tmp", io::ErrorKind::StorageFull, 1);
    let err = store
        .store_meta("generation", Bytes::from_static(b"2"))
        .await
        .expect_err("the fsync fails");
    assert!(matches!(err, StorageError::Io(_)), "{err}");
    assert_eq!(
        store
            .load_meta("generation")
            .await
            .expect("load")
            .as_deref(),
        Some(&b"1"[..])
    );
    assert!(files_ending(&meta::meta_dir(dir.path()), ".tmp").is_empty());
    store
        .apply(key("k"), Record::value("v", version(1, 1)))
        .await
        .expect("the store goes on working");
    store.close().await.expect("close");
    let store = FileStorage::open(dir.path(), FileOptions::default()).expect("reopen");
    assert_eq!(
        store
            .load_meta("generation")
            .await
            .expect("load")
            .as_deref(),
        Some(&b"1"[..])
    );
    store.close().await.expect("close");
}

#[tokio::test]
async fn metadata_survives_compaction_and_damage_is_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = FileOptions::default().with_fsync(FsyncPolicy::Never);
    let store = FileStorage::open(dir.path(), options.clone()).expect("open");
    store
        .store_meta("generation", Bytes::from_static(b"7"))
        .await
        .expect("store");
    for i in 0..50u64 {
        store
            .apply(key("k"), Record::value(format!("v{i}"), version(i + 1, 1)))
            .await
            .expect("apply");
    }
    store.compact().await.expect("compact");
    store.close().await.expect("close");
    let store = FileStorage::open(dir.path(), options.clone()).expect("reopen");
    assert_eq!(
        store
            .load_meta("generation")
            .await
            .expect("load")
            .as_deref(),
        Some(&b"7"[..])
    );
    store.close().await.expect("close");

    let path = meta::meta_path(dir.path(), "generation");
    let mut data = fs::read(&path).expect("read");
    let last = data.len() - 1;
    data[last] ^= 1;
    fs::write(&path, &data).expect("write");
    let err = FileStorage::open(dir.path(), options).expect_err("damaged metadata");
    assert!(
        matches!(&err, StorageError::Corruption(m) if m.contains("generation.meta")),
        "{err}"
    );
}
