//! A Chorus storage backend on the [`sled`] embedded database (0.34).
//!
//! [`SledStorage`] stores each record in one sled tree under the key
//! `ring position (u64, big-endian) ++ user key`, so sled's byte order is exactly the scan
//! order `(position, key)`: [`Storage::scan`] and [`Storage::digest`] read only the range asked
//! for. It is registered under [`SCHEME`] (`"sled"`) by [`register`]; the `chorus` facade does
//! this with its `backend-sled` feature.
//!
//! # Atomicity
//!
//! [`Storage::apply`] is a compare-and-swap loop: read the stored record, decide with
//! [`Record::supersedes`], and swap only if the stored bytes are still the ones decided
//! against; a concurrent writer that got in first makes the swap fail and the loop decides
//! again against its record. Purge and [`Storage::remove_if_version`] remove with the same
//! compare-and-swap, so a record replaced in the meantime is kept.
//!
//! # Durability window
//!
//! sled keeps recent writes in its in-process log buffers and writes them out on a flush.
//! The `flush` option picks when ([`FlushPolicy`]):
//!
//! - `always`: every `apply` waits for a flush before returning, so an acknowledged write
//!   survives a process or machine crash. That includes an apply answered `Stale`: the equal
//!   or newer record it reports may come from another writer whose flush has not completed,
//!   so the answer waits for a flush too and then means "a record at least this new is
//!   durable" (retries, hint replays and read repair rely on it). Flushes run on a dedicated
//!   flusher thread (never on a Tokio worker), which flushes once for every request queued at
//!   that moment: concurrent writers share flushes (group commit). A failed flush is fatal:
//!   that call gets the error, every later call [`StorageError::Closed`].
//! - `interval:<d>` (default `interval:500ms`, sled's own default): sled's background thread
//!   flushes every `d`; **a crash, even just of the process, loses up to `d` of acknowledged
//!   writes**.
//! - `never`: only [`Storage::flush`] and [`Storage::close`] flush; a crash loses everything
//!   since.
//!
//! [`Storage::apply_batch`] runs one compare-and-swap loop per write and then, under
//! `always`, waits for one flush for the whole batch. Metadata ([`Storage::store_meta`])
//! lives in a separate sled tree (`chorus-meta`) that scans, digests, stats and purges never
//! read; it is flushed like the records (under `always`, before `store_meta` returns). Hints
//! ([`Storage::store_hints`]) live the same way in their own tree (`chorus-hints`, keyed by
//! the id in big-endian order, so a load returns them in id order).
//!
//! sled is beta software and its on-disk format is not stable across its versions; the
//! dependency is pinned to 0.34.7.
//!
//! ```
//! use bytes::Bytes;
//! use chorus_backend_sled::{SledOptions, SledStorage};
//! use chorus_core::storage::Storage;
//! use chorus_core::{NodeId, Record, Timestamp, Version};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let dir = tempfile::tempdir()?;
//! let v1 = Version::new(Timestamp::new(1_000, 0), NodeId(1));
//! let store = SledStorage::open(dir.path(), SledOptions::default())?;
//! store.apply(Bytes::from("k"), Record::value("v", v1)).await?;
//! store.close().await?;
//! let store = SledStorage::open(dir.path(), SledOptions::default())?;
//! assert_eq!(store.get(b"k").await?, Some(Record::value("v", v1)));
//! # store.close().await?;
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::ops::Bound;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, mpsc};
use std::time::Duration;

use bytes::Bytes;
use chorus_core::hash::{HashRange, key_hash};
use chorus_core::hlc::{Timestamp, Version};
use chorus_core::identity::NodeId;
use chorus_core::options::DurationUnit::{Millis, Secs};
use chorus_core::options::Options;
use chorus_core::options::SyncPolicy;
use chorus_core::record::{Payload, Record};
use chorus_core::registry::{Registry, StorageSpec};
use chorus_core::storage::{
    ApplyOutcome, Capabilities, Durability, Entry, PurgeStats, RangeDigest, ScanCost, ScanCursor,
    ScanPage, SharedStorage, Storage, StorageError, StorageStats, check_batch_len, check_hint_ids,
    check_hints, check_meta, check_meta_name, empty_digests,
};
use tokio::sync::oneshot;

/// Registry name of this backend.
pub const SCHEME: &str = "sled";

/// Registers the sled backend under [`SCHEME`].
///
/// The spec needs a [`StorageSpec::path`] (the database directory) and takes the options of
/// [`SledOptions::from_options`].
///
/// # Panics
///
/// If [`SCHEME`] is already registered in `registry`: each backend crate registers itself once.
pub fn register(registry: &mut Registry) {
    registry
        .register_backend(SCHEME, open)
        .expect("the sled backend is registered once");
}

fn open(spec: &StorageSpec) -> Result<SharedStorage, StorageError> {
    let options = SledOptions::from_options(&spec.options)?;
    let path = spec.path.as_deref().ok_or_else(|| {
        StorageError::Config(format!(
            "the {SCHEME:?} backend needs a database directory (StorageSpec::path)"
        ))
    })?;
    Ok(SharedStorage::new(SledStorage::open(path, options)?))
}

/// When sled's buffered writes are flushed to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlushPolicy {
    /// Only on [`Storage::flush`] and [`Storage::close`].
    Never,
    /// By sled's background thread, this often (`flush_every_ms`).
    Interval(Duration),
    /// Before each `apply` returns (`Stale` answers included).
    Always,
}

impl FromStr for FlushPolicy {
    type Err = String;

    /// `never`, `always`, or `interval:<n><ms|s>` such as `interval:500ms`
    /// ([`SyncPolicy::parse`]; sled flushes on a whole number of milliseconds).
    fn from_str(text: &str) -> Result<Self, String> {
        Ok(match SyncPolicy::parse(text, &[Millis, Secs])? {
            SyncPolicy::Never => FlushPolicy::Never,
            SyncPolicy::Interval(every) => FlushPolicy::Interval(every),
            // `SyncPolicy` is non-exhaustive; `Always` and anything stricter flush every write.
            _ => FlushPolicy::Always,
        })
    }
}

/// Settings of a [`SledStorage`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SledOptions {
    /// When writes are flushed (option `flush`; default `interval:500ms`).
    pub flush: FlushPolicy,
    /// sled's page cache size in bytes (option `cache_bytes`; default 256 MiB).
    pub cache_bytes: u64,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            flush: FlushPolicy::Interval(Duration::from_millis(500)),
            cache_bytes: 256 << 20,
        }
    }
}

impl SledOptions {
    /// The same options with another flush policy.
    pub fn with_flush(mut self, flush: FlushPolicy) -> Self {
        self.flush = flush;
        self
    }

    /// Parses [`StorageSpec::options`]: `flush` (`never`, `always`, `interval:500ms`) and
    /// `cache_bytes` (an integer). Anything else, or a value that does not parse, is a
    /// [`StorageError::Config`] naming the option.
    pub fn from_options(options: &BTreeMap<String, String>) -> Result<Self, StorageError> {
        let mut o = Options::new(format!("the {SCHEME:?} backend"), options);
        let default = SledOptions::default();
        let parsed = SledOptions {
            flush: o.parse("flush")?.unwrap_or(default.flush),
            cache_bytes: o.parse("cache_bytes")?.unwrap_or(default.cache_bytes),
        };
        o.finish()?;
        Ok(parsed)
    }
}

/// A reply from the flusher thread.
type FlushAck = oneshot::Sender<Result<(), StorageError>>;

/// The sled tree that holds the metadata namespace, apart from the records (which live in the
/// default tree, so scans, digests, stats and purges never see metadata).
const META_TREE: &[u8] = b"chorus-meta";

/// The sled tree that holds the hint namespace, keyed by the big-endian id.
const HINT_TREE: &[u8] = b"chorus-hints";

/// The open database and the channel to its flusher thread.
#[derive(Clone)]
struct Open {
    db: sled::Db,
    /// The [`META_TREE`].
    meta: sled::Tree,
    /// The [`HINT_TREE`].
    hints: sled::Tree,
    flusher: mpsc::Sender<FlushAck>,
}

/// Called by the flusher thread before each flush (tests hold or count flushes with it).
type BeforeFlush = Arc<dyn Fn() + Send + Sync>;

/// The flusher thread: takes every waiting request, flushes once for all of them (group
/// commit), answers them all. A failed flush marks the store failed. It stops, dropping its
/// handle on the database, when every sender is gone, and then reports on `exited`.
fn run_flusher(
    db: sled::Db,
    requests: mpsc::Receiver<FlushAck>,
    failed: Arc<AtomicBool>,
    exited: oneshot::Sender<()>,
    before_flush: Option<BeforeFlush>,
) {
    while let Ok(first) = requests.recv() {
        if let Some(hook) = &before_flush {
            hook();
        }
        let mut waiters = vec![first];
        while let Ok(more) = requests.try_recv() {
            waiters.push(more);
        }
        // One failure answers every waiter, so it is shared rather than flattened to text.
        let result: Result<(), Option<Arc<sled::Error>>> = if failed.load(Ordering::Acquire) {
            Err(None)
        } else {
            db.flush().map(drop).map_err(|err| {
                failed.store(true, Ordering::Release);
                Some(Arc::new(err))
            })
        };
        for waiter in waiters {
            let reply = match &result {
                Ok(()) => Ok(()),
                Err(None) => Err(StorageError::Closed),
                Err(Some(err)) => Err(shared_sled_error(err)),
            };
            let _ = waiter.send(reply);
        }
    }
    drop(db);
    let _ = exited.send(());
}

/// A store in a sled database; see the [crate documentation](crate).
pub struct SledStorage {
    /// `None` once closed; the database is dropped (and its directory released) then.
    open: RwLock<Option<Open>>,
    /// Reports that the flusher thread stopped.
    flusher_exited: std::sync::Mutex<Option<oneshot::Receiver<()>>>,
    /// Set by a failed flush: the store refuses work from then on (never retried).
    failed: Arc<AtomicBool>,
    flush: FlushPolicy,
    /// Counters, adjusted after each successful swap (approximate while writes race a read).
    records: AtomicI64,
    tombstones: AtomicI64,
    bytes: AtomicI64,
}

impl fmt::Debug for SledStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledStorage")
            .field("flush", &self.flush)
            .field("records", &self.records.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn sled_error(err: sled::Error) -> StorageError {
    match err {
        sled::Error::Io(err) => StorageError::Io(err),
        sled::Error::Corruption { at, .. } => corruption_at(&at),
        other => StorageError::backend(other),
    }
}

fn corruption_at(at: &impl fmt::Debug) -> StorageError {
    StorageError::Corruption(format!("sled reports corruption at {at:?}"))
}

/// [`sled_error`] for one error reported to several callers: each gets the same source.
fn shared_sled_error(err: &Arc<sled::Error>) -> StorageError {
    match &**err {
        sled::Error::Io(io) => StorageError::Io(std::io::Error::new(io.kind(), Arc::clone(err))),
        sled::Error::Corruption { at, .. } => corruption_at(at),
        _ => StorageError::backend(Arc::clone(err)),
    }
}

/// The sled key of `key`: its ring position, big-endian, then the key.
fn db_key(hash: u64, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&hash.to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// Splits a sled key into ring position and user key.
fn split_key(raw: &[u8]) -> Result<(u64, Bytes), StorageError> {
    if raw.len() < 8 {
        return Err(StorageError::Corruption(format!(
            "sled key of {} bytes is shorter than its 8-byte position",
            raw.len()
        )));
    }
    let (hash, key) = raw.split_at(8);
    let mut be = [0u8; 8];
    be.copy_from_slice(hash);
    Ok((u64::from_be_bytes(be), Bytes::copy_from_slice(key)))
}

const TOMBSTONE: u8 = 1;
const EXPIRES: u8 = 2;

/// `flags u8, timestamp u64 LE, node u64 LE, [expiry u64 LE], [value bytes to the end]`.
fn encode_record(record: &Record) -> Vec<u8> {
    let value = match &record.payload {
        Payload::Value(value) => Some(value),
        Payload::Tombstone => None,
    };
    let mut out = Vec::with_capacity(25 + value.map_or(0, |v| v.len()));
    let mut flags = 0;
    if value.is_none() {
        flags |= TOMBSTONE;
    }
    if record.expires_at_ms.is_some() {
        flags |= EXPIRES;
    }
    out.push(flags);
    out.extend_from_slice(&record.version.timestamp.as_u64().to_le_bytes());
    out.extend_from_slice(&record.version.node.0.to_le_bytes());
    if let Some(at) = record.expires_at_ms {
        out.extend_from_slice(&at.to_le_bytes());
    }
    if let Some(value) = value {
        out.extend_from_slice(value);
    }
    out
}

fn decode_record(raw: &[u8]) -> Result<Record, StorageError> {
    let bad = |why: &str| StorageError::Corruption(format!("sled value: {why}"));
    let (&flags, rest) = raw.split_first().ok_or_else(|| bad("empty"))?;
    if flags & !(TOMBSTONE | EXPIRES) != 0 {
        return Err(bad("unknown flags"));
    }
    let u64_at = |bytes: &[u8], at: usize| -> Result<u64, StorageError> {
        let field = bytes.get(at..at + 8).ok_or_else(|| bad("truncated"))?;
        let mut le = [0u8; 8];
        le.copy_from_slice(field);
        Ok(u64::from_le_bytes(le))
    };
    let timestamp = Timestamp::from_u64(u64_at(rest, 0)?);
    let node = NodeId(u64_at(rest, 8)?);
    let (expires_at_ms, value_at) = if flags & EXPIRES != 0 {
        (Some(u64_at(rest, 16)?), 24)
    } else {
        (None, 16)
    };
    let value = &rest[value_at..];
    let payload = if flags & TOMBSTONE != 0 {
        if !value.is_empty() {
            return Err(bad("a tombstone with a value"));
        }
        Payload::Tombstone
    } else {
        Payload::Value(Bytes::copy_from_slice(value))
    };
    Ok(Record {
        payload,
        version: Version::new(timestamp, node),
        expires_at_ms,
    })
}

/// The hash intervals (inclusive) that make up `range`, in scan order.
fn intervals(range: &HashRange) -> [Option<(u64, u64)>; 2] {
    let (start, end) = (range.start, range.end);
    if start < end {
        [Some((start, end - 1)), None]
    } else {
        [
            Some((start, u64::MAX)),
            end.checked_sub(1).map(|hi| (0, hi)),
        ]
    }
}

fn upper(hi: u64) -> Bound<Vec<u8>> {
    match hi.checked_add(1) {
        Some(next) => Bound::Excluded(next.to_be_bytes().to_vec()),
        None => Bound::Unbounded,
    }
}

fn footprint(key_len: usize, record: &Record) -> i64 {
    (key_len + record.encoded_len()) as i64
}

/// How long an open waits for the directory's lock: sled's own background threads of a
/// database closed a moment ago (in this process) let go of it only at their next tick.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Opens `config`, retrying while another handle still holds the directory's lock, for up to
/// [`LOCK_WAIT`]; then the lock error is returned (another process uses the directory).
fn open_when_unlocked(config: &sled::Config) -> Result<sled::Db, StorageError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            // sled 0.34.7 reports the lock as `Other` with this text (config.rs).
            Err(sled::Error::Io(e))
                if e.to_string().starts_with("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(sled_error(e)),
        }
    }
}

impl SledStorage {
    /// Opens (creating if needed) the database in `dir`. If the directory is still locked
    /// by a database closed a moment ago, waits for it (at most 10 s).
    pub fn open(dir: &Path, options: SledOptions) -> Result<Self, StorageError> {
        SledStorage::open_hooked(dir, options, None)
    }

    /// [`SledStorage::open`] with a hook the flusher thread calls before each flush.
    fn open_hooked(
        dir: &Path,
        options: SledOptions,
        before_flush: Option<BeforeFlush>,
    ) -> Result<Self, StorageError> {
        let flush_every_ms = match options.flush {
            FlushPolicy::Interval(every) => {
                Some(u64::try_from(every.as_millis()).unwrap_or(u64::MAX))
            }
            FlushPolicy::Never | FlushPolicy::Always => None,
        };
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(options.cache_bytes)
            .flush_every_ms(flush_every_ms);
        let db = open_when_unlocked(&config)?;
        let store = SledStorage {
            open: RwLock::new(None),
            flusher_exited: std::sync::Mutex::new(None),
            failed: Arc::new(AtomicBool::new(false)),
            flush: options.flush,
            records: AtomicI64::new(0),
            tombstones: AtomicI64::new(0),
            bytes: AtomicI64::new(0),
        };
        // Counters start from one pass over what is stored (which also validates it).
        for item in db.iter() {
            let (raw_key, raw_value) = item.map_err(sled_error)?;
            let (_, key) = split_key(&raw_key)?;
            let record = decode_record(&raw_value)?;
            store.count(key.len(), &record, 1);
        }
        let meta = db.open_tree(META_TREE).map_err(sled_error)?;
        let hints = db.open_tree(HINT_TREE).map_err(sled_error)?;
        let (flusher, requests) = mpsc::channel();
        let (exited_tx, exited) = oneshot::channel();
        let thread_db = db.clone();
        let failed = Arc::clone(&store.failed);
        std::thread::Builder::new()
            .name("chorus-sled-flush".into())
            .spawn(move || run_flusher(thread_db, requests, failed, exited_tx, before_flush))?;
        *store.open.write().unwrap_or_else(PoisonError::into_inner) = Some(Open {
            db,
            meta,
            hints,
            flusher,
        });
        *store
            .flusher_exited
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(exited);
        Ok(store)
    }

    fn opened(&self) -> Result<Open, StorageError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        self.open
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(StorageError::Closed)
    }

    fn db(&self) -> Result<sled::Db, StorageError> {
        self.opened().map(|open| open.db)
    }

    /// Flushes on the flusher thread (sharing the flush with every request queued with it).
    async fn flush_via(flusher: &mpsc::Sender<FlushAck>) -> Result<(), StorageError> {
        let (ack, reply) = oneshot::channel();
        flusher.send(ack).map_err(|_| StorageError::Closed)?;
        reply.await.map_err(|_| StorageError::Closed)?
    }

    fn count(&self, key_len: usize, record: &Record, sign: i64) {
        self.records.fetch_add(sign, Ordering::Relaxed);
        self.tombstones
            .fetch_add(sign * i64::from(record.is_tombstone()), Ordering::Relaxed);
        self.bytes
            .fetch_add(sign * footprint(key_len, record), Ordering::Relaxed);
    }

    fn apply_now(
        &self,
        db: &sled::Db,
        key: &[u8],
        record: &Record,
    ) -> Result<ApplyOutcome, StorageError> {
        let raw_key = db_key(key_hash(key), key);
        let encoded = encode_record(record);
        let mut current = db.get(&raw_key).map_err(sled_error)?;
        loop {
            let previous = match &current {
                Some(raw) => {
                    let stored = decode_record(raw)?;
                    if !record.supersedes(&stored) {
                        return Ok(ApplyOutcome::Stale { current: stored });
                    }
                    Some(stored)
                }
                None => None,
            };
            match db
                .compare_and_swap(&raw_key, current.as_ref(), Some(encoded.as_slice()))
                .map_err(sled_error)?
            {
                Ok(()) => {
                    if let Some(previous) = &previous {
                        self.count(key.len(), previous, -1);
                    }
                    self.count(key.len(), record, 1);
                    return Ok(ApplyOutcome::Applied {
                        previous: previous.map(|p| p.version),
                    });
                }
                // Another writer got in first: decide again against what it stored.
                Err(conflict) => current = conflict.current,
            }
        }
    }

    fn scan_now(
        &self,
        range: HashRange,
        cursor: Option<ScanCursor>,
        limit: NonZeroUsize,
    ) -> Result<ScanPage, StorageError> {
        let db = self.db()?;
        let want = limit.get().saturating_add(1);
        let mut entries: Vec<Entry> = Vec::new();
        let mut started = cursor.is_none();
        'intervals: for (lo, hi) in intervals(&range).into_iter().flatten() {
            let lower = match &cursor {
                Some(c) if !started => {
                    if !(lo..=hi).contains(&c.hash) {
                        continue;
                    }
                    started = true;
                    Bound::Excluded(db_key(c.hash, &c.key))
                }
                _ => Bound::Included(lo.to_be_bytes().to_vec()),
            };
            for item in db.range::<Vec<u8>, _>((lower, upper(hi))) {
                let (raw_key, raw_value) = item.map_err(sled_error)?;
                let (hash, key) = split_key(&raw_key)?;
                entries.push(Entry {
                    hash,
                    key,
                    record: decode_record(&raw_value)?,
                });
                if entries.len() == want {
                    break 'intervals;
                }
            }
        }
        Ok(ScanPage::from_ordered(entries, limit))
    }

    fn digest_now(
        &self,
        range: HashRange,
        buckets: NonZeroU32,
    ) -> Result<Vec<RangeDigest>, StorageError> {
        let db = self.db()?;
        let mut digests = empty_digests(buckets)?;
        for (lo, hi) in intervals(&range).into_iter().flatten() {
            let lower = Bound::Included(lo.to_be_bytes().to_vec());
            for item in db.range::<Vec<u8>, _>((lower, upper(hi))) {
                let (raw_key, raw_value) = item.map_err(sled_error)?;
                let (hash, key) = split_key(&raw_key)?;
                let record = decode_record(&raw_value)?;
                digests[range.bucket_of(hash, buckets) as usize].add(record.fingerprint(&key));
            }
        }
        Ok(digests)
    }

    fn purge_now(&self, now_ms: u64, grace: Duration) -> Result<PurgeStats, StorageError> {
        let db = self.db()?;
        let mut stats = PurgeStats::default();
        for item in db.iter() {
            let (raw_key, raw_value) = item.map_err(sled_error)?;
            let record = decode_record(&raw_value)?;
            if !record.is_collectable(now_ms, grace) {
                continue;
            }
            // Removed only if unchanged: a record replaced meanwhile is kept.
            let swapped = db
                .compare_and_swap(&raw_key, Some(&raw_value), None as Option<&[u8]>)
                .map_err(sled_error)?;
            if swapped.is_ok() {
                self.count(raw_key.len() - 8, &record, -1);
                stats.count(&record);
            }
        }
        Ok(stats)
    }
}

impl SledStorage {
    /// Removes the record of `key` if its version is `version`, with the compare-and-swap
    /// apply uses: a record swapped in meanwhile makes the swap fail, and the loop decides
    /// again against it.
    fn remove_if_version_now(
        &self,
        db: &sled::Db,
        key: &[u8],
        version: Version,
    ) -> Result<bool, StorageError> {
        let raw_key = db_key(key_hash(key), key);
        let mut current = db.get(&raw_key).map_err(sled_error)?;
        loop {
            let Some(raw) = &current else {
                return Ok(false);
            };
            let stored = decode_record(raw)?;
            if stored.version != version {
                return Ok(false);
            }
            match db
                .compare_and_swap(&raw_key, Some(raw), None as Option<&[u8]>)
                .map_err(sled_error)?
            {
                Ok(()) => {
                    self.count(key.len(), &stored, -1);
                    return Ok(true);
                }
                Err(conflict) => current = conflict.current,
            }
        }
    }
}

impl Storage for SledStorage {
    /// Ordered scans, never evicts; durability by the flush policy: `always` flushes (and
    /// fsyncs) before the ack, `interval` and `never` leave acknowledged writes in sled's
    /// in-process buffers until the next flush.
    fn capabilities(&self) -> Capabilities {
        let durability = match self.flush {
            FlushPolicy::Always => Durability::PowerLoss,
            FlushPolicy::Interval(_) | FlushPolicy::Never => Durability::Deferred,
        };
        Capabilities::new(durability, ScanCost::Ordered)
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Record>, StorageError> {
        let db = self.db()?;
        match db.get(db_key(key_hash(key), key)).map_err(sled_error)? {
            Some(raw) => Ok(Some(decode_record(&raw)?)),
            None => Ok(None),
        }
    }

    /// A compare-and-swap loop; under [`FlushPolicy::Always`] also awaits a flush by the
    /// flusher thread, whatever the outcome: a `Stale` answer reports a record another
    /// writer's apply may not have flushed yet, so it too returns only once a flush that
    /// started after the decision completed.
    async fn apply(&self, key: Bytes, record: Record) -> Result<ApplyOutcome, StorageError> {
        let open = self.opened()?;
        let outcome = self.apply_now(&open.db, &key, &record)?;
        if self.flush == FlushPolicy::Always {
            Self::flush_via(&open.flusher).await?;
        }
        Ok(outcome)
    }

    /// Compare-and-swap loops, one write after the other; under [`FlushPolicy::Always`] then
    /// one flush for the whole batch (shared with concurrent writers), whatever the outcomes.
    /// A failed write stops the batch: the writes before it are applied, not yet flushed.
    async fn apply_batch(
        &self,
        writes: Vec<(Bytes, Record)>,
    ) -> Result<Vec<ApplyOutcome>, StorageError> {
        check_batch_len(writes.len())?;
        let open = self.opened()?;
        let outcomes = writes
            .iter()
            .map(|(key, record)| self.apply_now(&open.db, key, record))
            .collect::<Result<Vec<_>, _>>()?;
        if self.flush == FlushPolicy::Always && !outcomes.is_empty() {
            Self::flush_via(&open.flusher).await?;
        }
        Ok(outcomes)
    }

    async fn load_meta(&self, name: &str) -> Result<Option<Bytes>, StorageError> {
        check_meta_name(name)?;
        let open = self.opened()?;
        let value = open.meta.get(name.as_bytes()).map_err(sled_error)?;
        Ok(value.map(|raw| Bytes::copy_from_slice(&raw)))
    }

    /// Inserts into the metadata tree; under [`FlushPolicy::Always`] waits for a flush, as
    /// `apply` does; otherwise it is flushed with the records.
    async fn store_meta(&self, name: &str, value: Bytes) -> Result<(), StorageError> {
        check_meta(name, &value)?;
        let open = self.opened()?;
        open.meta
            .insert(name.as_bytes(), value.as_ref())
            .map_err(sled_error)?;
        if self.flush == FlushPolicy::Always {
            Self::flush_via(&open.flusher).await?;
        }
        Ok(())
    }

    /// Inserts into the hint tree; flushed as `store_meta` is.
    async fn store_hints(&self, hints: Vec<(u64, Bytes)>) -> Result<(), StorageError> {
        check_hints(&hints)?;
        let open = self.opened()?;
        if hints.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (id, blob) in &hints {
            batch.insert(&id.to_be_bytes(), blob.as_ref());
        }
        open.hints.apply_batch(batch).map_err(sled_error)?;
        if self.flush == FlushPolicy::Always {
            Self::flush_via(&open.flusher).await?;
        }
        Ok(())
    }

    /// Every entry of the hint tree; an entry whose key is not 8 bytes is
    /// [`StorageError::Corruption`].
    async fn load_hints(&self) -> Result<Vec<(u64, Bytes)>, StorageError> {
        let open = self.opened()?;
        let mut out = Vec::new();
        for item in open.hints.iter() {
            let (raw_key, raw_value) = item.map_err(sled_error)?;
            let id: [u8; 8] = raw_key.as_ref().try_into().map_err(|_| {
                StorageError::Corruption(format!("a hint key of {} bytes, not 8", raw_key.len()))
            })?;
            out.push((u64::from_be_bytes(id), Bytes::copy_from_slice(&raw_value)));
        }
        Ok(out)
    }

    /// Removes from the hint tree; flushed as `store_meta` is.
    async fn remove_hints(&self, ids: Vec<u64>) -> Result<(), StorageError> {
        check_hint_ids(&ids)?;
        let open = self.opened()?;
        if ids.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for id in &ids {
            batch.remove(&id.to_be_bytes());
        }
        open.hints.apply_batch(batch).map_err(sled_error)?;
        if self.flush == FlushPolicy::Always {
            Self::flush_via(&open.flusher).await?;
        }
        Ok(())
    }

    /// A compare-and-swap loop; under [`FlushPolicy::Always`] a removal then waits for a
    /// flush, as an apply does, so a reopened database does not bring the record back.
    async fn remove_if_version(&self, key: &[u8], version: Version) -> Result<bool, StorageError> {
        let open = self.opened()?;
        let removed = self.remove_if_version_now(&open.db, key, version)?;
        if removed && self.flush == FlushPolicy::Always {
            Self::flush_via(&open.flusher).await?;
        }
        Ok(removed)
    }

    /// Reads only the sled keys of the range.
    async fn scan(
        &self,
        range: HashRange,
        cursor: Option<ScanCursor>,
        limit: NonZeroUsize,
    ) -> Result<ScanPage, StorageError> {
        self.scan_now(range, cursor, limit)
    }

    /// Reads only the sled keys of the range.
    async fn digest(
        &self,
        range: HashRange,
        buckets: NonZeroU32,
    ) -> Result<Vec<RangeDigest>, StorageError> {
        self.digest_now(range, buckets)
    }

    /// One pass over the whole tree.
    async fn purge(&self, now_ms: u64, grace: Duration) -> Result<PurgeStats, StorageError> {
        self.purge_now(now_ms, grace)
    }

    async fn stats(&self) -> Result<StorageStats, StorageError> {
        self.db()?;
        let records = self.records.load(Ordering::Relaxed).max(0) as u64;
        let tombstones = self.tombstones.load(Ordering::Relaxed).max(0) as u64;
        let bytes = self.bytes.load(Ordering::Relaxed).max(0) as u64;
        Ok(StorageStats::new(records, tombstones.min(records), bytes))
    }

    /// Flushes on the flusher thread.
    async fn flush(&self) -> Result<(), StorageError> {
        let open = self.opened()?;
        Self::flush_via(&open.flusher).await
    }

    /// Flushes, stops the flusher thread and drops the database (its directory is released
    /// once no call is in flight).
    async fn close(&self) -> Result<(), StorageError> {
        let open = self
            .open
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or(StorageError::Closed)?;
        let flushed = Self::flush_via(&open.flusher).await;
        drop(open);
        let exited = self
            .flusher_exited
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(exited) = exited {
            let _ = exited.await;
        }
        flushed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(ms: u64, node: u64) -> Version {
        Version::new(Timestamp::new(ms, 0), NodeId(node))
    }

    #[test]
    fn records_round_trip_and_damage_is_corruption() {
        for record in [
            Record::value("v", version(1, 2)),
            Record::value("", version(3, 4)).with_expiry(9),
            Record::tombstone(version(5, 6)),
            Record::tombstone(version(5, 6)).with_expiry(1),
        ] {
            let raw = encode_record(&record);
            assert_eq!(decode_record(&raw).expect("decodes"), record);
            for cut in 0..17.min(raw.len()) {
                assert!(matches!(
                    decode_record(&raw[..cut]),
                    Err(StorageError::Corruption(_))
                ));
            }
        }
        assert!(decode_record(&[0x80; 20]).is_err());
        assert!(split_key(&[1, 2]).is_err());
    }

    #[test]
    fn options_parse_and_name_the_bad_field() {
        let mut options = BTreeMap::new();
        options.insert("flush".to_owned(), "interval:2s".to_owned());
        assert_eq!(
            SledOptions::from_options(&options).expect("valid").flush,
            FlushPolicy::Interval(Duration::from_secs(2))
        );
        for (name, value) in [
            ("flush", "often"),
            ("flush", "interval:0ms"),
            ("cache_bytes", "lots"),
            ("fsync", "always"),
        ] {
            let mut options = BTreeMap::new();
            options.insert(name.to_owned(), value.to_owned());
            let text = SledOptions::from_options(&options)
                .expect_err("invalid")
                .to_string();
            assert!(text.contains(&format!("`{name}`")), "{text}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_converge_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(
            SledStorage::open(
                dir.path(),
                SledOptions::default().with_flush(FlushPolicy::Never),
            )
            .expect("open"),
        );
        let mut tasks = Vec::new();
        for writer in 0..4u64 {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                for i in 0..300u64 {
                    let ms = if writer % 2 == 0 { i } else { 300 - i };
                    let record = Record::value(format!("{writer}/{i}"), version(ms, writer));
                    store
                        .apply(Bytes::from(format!("k{}", i % 3)), record)
                        .await
                        .expect("apply");
                }
            }));
        }
        for task in tasks {
            task.await.expect("writer");
        }
        let winners: Vec<Option<Record>> = futures_join(&store).await;
        store.close().await.expect("close");
        let store = SledStorage::open(
            dir.path(),
            SledOptions::default().with_flush(FlushPolicy::Never),
        )
        .expect("reopen");
        assert_eq!(futures_join(&store).await, winners);
        assert_eq!(store.stats().await.expect("stats").records, 3);
        // The highest version of each key won: 300 from the odd writers' first step.
        assert_eq!(
            winners[0].as_ref().map(|r| r.version),
            Some(version(300, 3))
        );
        store.close().await.expect("close");
    }

    /// A flush the test holds open: the flusher thread announces each flush on `entered` and
    /// waits until the test releases it.
    struct Gate {
        held: std::sync::Mutex<bool>,
        released: std::sync::Condvar,
        entered: tokio::sync::mpsc::UnboundedSender<()>,
    }

    impl Gate {
        fn pass(&self) {
            let _ = self.entered.send(());
            let mut held = self.held.lock().expect("gate");
            while *held {
                held = self.released.wait(held).expect("gate");
            }
        }

        fn release(&self) {
            *self.held.lock().expect("gate") = false;
            self.released.notify_all();
        }
    }

    /// Polls `future` once, without a runtime waking it.
    fn poll_once<F: std::future::Future>(
        future: std::pin::Pin<&mut F>,
    ) -> std::task::Poll<F::Output> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        future.poll(&mut cx)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_apply_returns_only_after_the_record_it_reports_is_flushed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (entered, mut flushes) = tokio::sync::mpsc::unbounded_channel();
        let gate = Arc::new(Gate {
            held: std::sync::Mutex::new(true),
            released: std::sync::Condvar::new(),
            entered,
        });
        let hook: BeforeFlush = {
            let gate = Arc::clone(&gate);
            Arc::new(move || gate.pass())
        };
        let store = Arc::new(
            SledStorage::open_hooked(
                dir.path(),
                SledOptions::default().with_flush(FlushPolicy::Always),
                Some(hook),
            )
            .expect("open"),
        );
        let record = Record::value("v", version(7, 1));
        let first = tokio::spawn({
            let store = Arc::clone(&store);
            let record = record.clone();
            async move { store.apply(Bytes::from("k"), record).await }
        });
        // The first writer's record is stored; its flush is held open.
        flushes.recv().await.expect("the first flush starts");
        let retry = store.apply(Bytes::from("k"), record.clone());
        let mut retry = std::pin::pin!(retry);
        assert!(
            poll_once(retry.as_mut()).is_pending(),
            "a Stale apply returned while the record it reports was not flushed"
        );
        gate.release();
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
        store.close().await.expect("close");
    }

    async fn futures_join(store: &SledStorage) -> Vec<Option<Record>> {
        let mut out = Vec::new();
        for k in 0..3 {
            out.push(store.get(format!("k{k}").as_bytes()).await.expect("get"));
        }
        out
    }
}
