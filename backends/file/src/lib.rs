//! A durable Chorus storage backend on its own append-only log, with no database underneath.
//!
//! [`FileStorage`] keeps every record in an in-memory index (a `BTreeMap` ordered by
//! `(ring position, key)`, so scans and digests walk only the range asked for) and makes it
//! durable in a directory of append-only **segment files**. Values are kept in memory, not read
//! back from the files: the data set must fit in RAM, and the log exists for durability and
//! recovery. It is registered under [`SCHEME`] (`"file"`) by [`register`]; the `chorus` facade
//! does this with its `backend-file` feature.
//!
//! # On disk
//!
//! Each segment starts with a header naming the log format version (a segment of another
//! version is refused with [`StorageError::Config`]) and holds **batches**: a header (length,
//! the segment's synced length when the batch was written, a CRC32C of the body and one of
//! the header itself, bound to the segment and offset) and a body of frames, one per record
//! or logged purge removal (see the `codec` module source for the layout). One dedicated
//! **writer thread** owns the active segment: [`Storage::apply`] decides the
//! last-writer-wins winner under the index lock, sends the frame to the writer through a
//! channel in that same order, and the writer takes everything queued, writes it as one
//! batch with one `write`, and (under [`FsyncPolicy::Always`]) calls `fdatasync` once for the
//! whole batch before acknowledging every write in it: concurrent writers share fsyncs (group
//! commit), and no fsync ever runs on a Tokio worker thread.
//!
//! - [`FsyncPolicy::Always`] (the default): `apply` returns only after a record at least as
//!   new as the one applied is synced. An `Applied` answer waits for its own record; a
//!   `Stale` answer waits until the equal or newer record it reports is synced (another
//!   writer's apply may still be waiting for that fsync), without an fsync of its own if it
//!   already is.
//! - [`FsyncPolicy::Interval`]: the writer syncs at most that long after a write. `apply`
//!   returns once the record is queued; it survives a process crash once the writer wrote it
//!   (normally within microseconds) and a machine crash once the next sync ran.
//! - [`FsyncPolicy::Never`]: synced only by [`Storage::flush`], [`Storage::close`] and segment
//!   rotation; a machine crash can lose any write since.
//!
//! [`Storage::apply_batch`] decides every write of the batch in order under one hold of the
//! index lock and sends the winners' frames to the writer as one command: the batch costs one
//! `write` and, under [`FsyncPolicy::Always`], one `fdatasync` (shared with concurrent
//! writers), not one per record.
//!
//! A record is visible to reads as soon as `apply` decided it won, which may be before it is
//! durable. New files are made durable by an fsync of the directory. **A failed write or fsync
//! of the log is fatal**: it is never retried (the kernel may already have dropped the dirty
//! pages, and a failed write may have left part of a batch behind), the batch's writers get
//! [`StorageError::Io`] and every later call [`StorageError::Closed`]. A new segment that
//! cannot be created (a full disk) is not: writing goes on in the current one.
//!
//! # Recovery
//!
//! Opening replays every segment in log order with the rules the live index follows: a record
//! is kept if it supersedes the stored one ([`Record::merge`]), a logged removal drops the
//! stored record unless it is newer. Only the newest segment may end in a **torn tail**, and
//! only where no later batch header says the damaged bytes had been synced: a write torn by a
//! crash cannot be followed by a batch written after it was synced. Recovery cuts such a
//! tail exactly after the last complete batch and moves the cut bytes aside into
//! `<segment>.seg.<offset>.damaged` (never read again; [`FileStorage::recovery`] and a
//! warning in the log report it). Damage anywhere else (an older segment, a batch a later
//! one vouches for, a bad segment header) fails the open with [`StorageError::Corruption`]
//! naming the file and offset: it is never skipped and never returned as data. A clean close
//! ends the log with a commit marker that vouches for the last batch, so after a clean close
//! even damage in the last record is reported; after a crash the last batch is ambiguous (a
//! torn write and a damaged synced batch look alike) and is cut and kept aside. Everything
//! read is synced before the store opens. Writing always starts in a new segment. The
//! directory is locked (a `LOCK` file) while a store has it open.
//!
//! # Metadata
//!
//! [`Storage::store_meta`] keeps each metadata value in its own small file,
//! `meta/<name>.meta` (magic, metadata format version, length, a CRC32C bound to the name, the
//! value), outside the segments: the log format is unchanged, a directory written before
//! metadata existed opens as before, and compaction never touches it. The writer thread
//! replaces a value by writing `<name>.tmp`, syncing it, renaming it over the old file and
//! syncing the directory, **under every fsync policy** (metadata is small and rarely written,
//! and a crash must leave the old or the new value, never a torn or empty one), and
//! `store_meta` returns after that. Opening reads every value into memory (where
//! [`Storage::load_meta`] reads it), removes leftover `.tmp` files, and fails with
//! [`StorageError::Corruption`] naming the file if one is damaged. A failed metadata write is
//! not fatal to the store: the old value stays unless the rename happened.
//!
//! # Hints
//!
//! [`Storage::store_hints`] keeps each hint in its own file, `hints/<id>.hint` (magic, format
//! version, length, a CRC32C bound to the id, the blob), written the same way as metadata
//! (temporary file, fsync, rename) with one directory fsync per batch, under every fsync
//! policy; [`Storage::remove_hints`] unlinks and syncs the directory. Hints are read from disk
//! by [`Storage::load_hints`] (a node does so once, when it starts), which removes leftover
//! `.tmp` files and fails with [`StorageError::Corruption`] naming a damaged file.
//!
//! # Purge and compaction
//!
//! [`Storage::purge`] walks the index in batches of 1,024 entries, releasing the index lock
//! between them, and logs a removal for each record it removes; it rewrites nothing.
//! [`Storage::remove_if_version`] logs the same removal frame for the one record it removes,
//! written and (under [`FsyncPolicy::Always`]) synced before it returns. Segments
//! are sealed at `segment_bytes`. A compaction seals the active segment, snapshots the index,
//! writes the snapshot as one new segment (synced, renamed into place, directory synced) and
//! then deletes the sealed segments, oldest first: superseded records, purged records and
//! removals are dropped. It runs in the background when the log exceeds both
//! `compact_min_bytes` and twice the live data (checked after each segment rotation and
//! each purge that removed something), or when [`FileStorage::compact`] asks. A failed
//! compaction (a full disk, a failed fsync of its output) removes its temporary file, leaves
//! the log as it was and the store working, and is retried by a later trigger after a
//! back-off (1 s, doubling up to 5 min).
//!
//! ```
//! use bytes::Bytes;
//! use chorus_backend_file::{FileOptions, FileStorage};
//! use chorus_core::storage::Storage;
//! use chorus_core::{NodeId, Record, Timestamp, Version};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let dir = tempfile::tempdir()?;
//! let v1 = Version::new(Timestamp::new(1_000, 0), NodeId(1));
//! let store = FileStorage::open(dir.path(), FileOptions::default())?;
//! store.apply(Bytes::from("k"), Record::value("v", v1)).await?;
//! store.close().await?;
//! // Reopening recovers what was written.
//! let store = FileStorage::open(dir.path(), FileOptions::default())?;
//! assert_eq!(store.get(b"k").await?, Some(Record::value("v", v1)));
//! # store.close().await?;
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

#![deny(missing_docs)]

mod codec;
mod fs;
mod hints;
mod log;
mod meta;

use std::collections::BTreeMap;
use std::fmt;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use chorus_core::hash::{HashRange, key_hash};
use chorus_core::hlc::Version;
use chorus_core::options::DurationUnit::{Micros, Millis, Secs};
use chorus_core::options::Options;
use chorus_core::options::SyncPolicy;
use chorus_core::record::Record;
use chorus_core::registry::{Registry, StorageSpec};
use chorus_core::storage::{
    ApplyOutcome, Capabilities, Durability, Entry, PurgeStats, RangeDigest, ScanCost, ScanCursor,
    ScanPage, SharedStorage, Storage, StorageError, StorageStats, check_batch_len, check_hint_ids,
    check_hints, check_meta, check_meta_name, empty_digests,
};
use tokio::sync::oneshot;

use crate::log::{Cmd, MAX_QUEUED_BYTES, Shared, Tuning};

/// Index entries a purge examines under one hold of the index lock; the lock is released
/// between batches, so writers wait at most for one batch.
const PURGE_BATCH: usize = 1024;

/// What opening a store found in its directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Recovery {
    /// Segment files read.
    pub segments: u64,
    /// Records replayed (superseded ones included).
    pub records: u64,
    /// Logged purge removals replayed.
    pub removals: u64,
    /// Bytes of torn tails cut from the newest segment.
    pub torn_bytes: u64,
    /// Where the torn tails were moved (`<segment>.seg.<offset>.damaged`): kept for
    /// inspection, never read again; remove them when done.
    pub damaged: Vec<PathBuf>,
}

/// Registry name of this backend.
pub const SCHEME: &str = "file";

/// Registers the file backend under [`SCHEME`].
///
/// The spec needs a [`StorageSpec::path`] (the data directory, created if missing) and takes
/// the options of [`FileOptions::from_options`].
///
/// # Panics
///
/// If [`SCHEME`] is already registered in `registry`: each backend crate registers itself once.
pub fn register(registry: &mut Registry) {
    registry
        .register_backend(SCHEME, open)
        .expect("the file backend is registered once");
}

fn open(spec: &StorageSpec) -> Result<SharedStorage, StorageError> {
    let options = FileOptions::from_options(&spec.options)?;
    let path = spec.path.as_deref().ok_or_else(|| {
        StorageError::Config(format!(
            "the {SCHEME:?} backend needs a data directory (StorageSpec::path)"
        ))
    })?;
    Ok(SharedStorage::new(FileStorage::open(path, options)?))
}

/// When the writer thread makes written records durable with `fdatasync`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FsyncPolicy {
    /// Only on flush, close and segment rotation.
    Never,
    /// At most this long after a write.
    Interval(Duration),
    /// Before acknowledging each write (batched: group commit).
    Always,
}

impl FromStr for FsyncPolicy {
    type Err = String;

    /// `never`, `always`, or `interval:<n><us|ms|s>` such as `interval:50ms`
    /// ([`SyncPolicy::parse`]).
    fn from_str(text: &str) -> Result<Self, String> {
        Ok(match SyncPolicy::parse(text, &[Micros, Millis, Secs])? {
            SyncPolicy::Never => FsyncPolicy::Never,
            SyncPolicy::Interval(every) => FsyncPolicy::Interval(every),
            // `SyncPolicy` is non-exhaustive; `Always` and anything stricter sync every write.
            _ => FsyncPolicy::Always,
        })
    }
}

/// Settings of a [`FileStorage`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileOptions {
    /// When writes are synced (option `fsync`; default `always`).
    pub fsync: FsyncPolicy,
    /// Size at which the active segment is sealed (option `segment_bytes`; default 64 MiB).
    pub segment_bytes: NonZeroU64,
    /// Log size below which no background compaction runs (option `compact_min_bytes`;
    /// default 64 MiB).
    pub compact_min_bytes: u64,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            fsync: FsyncPolicy::Always,
            segment_bytes: NonZeroU64::new(64 << 20).expect("non-zero"),
            compact_min_bytes: 64 << 20,
        }
    }
}

impl FileOptions {
    /// The same options with another fsync policy.
    pub fn with_fsync(mut self, fsync: FsyncPolicy) -> Self {
        self.fsync = fsync;
        self
    }

    /// The same options with another segment size.
    pub fn with_segment_bytes(mut self, segment_bytes: NonZeroU64) -> Self {
        self.segment_bytes = segment_bytes;
        self
    }

    /// Parses [`StorageSpec::options`]: `fsync` (`never`, `always`, `interval:50ms`),
    /// `segment_bytes` and `compact_min_bytes` (integers). Anything else, or a value that does
    /// not parse, is a [`StorageError::Config`] naming the option.
    pub fn from_options(options: &BTreeMap<String, String>) -> Result<Self, StorageError> {
        let mut o = Options::new(format!("the {SCHEME:?} backend"), options);
        let default = FileOptions::default();
        let parsed = FileOptions {
            fsync: o.parse("fsync")?.unwrap_or(default.fsync),
            segment_bytes: o.parse("segment_bytes")?.unwrap_or(default.segment_bytes),
            compact_min_bytes: o
                .parse("compact_min_bytes")?
                .unwrap_or(default.compact_min_bytes),
        };
        o.finish()?;
        Ok(parsed)
    }
}

/// Where an apply waits for its write to be acknowledged.
type Reply = oneshot::Receiver<Result<(), StorageError>>;

/// A durable store on an append-only log; see the [crate documentation](crate).
pub struct FileStorage {
    shared: Arc<Shared>,
    tx: Sender<Cmd>,
    /// The writer thread, joined on drop: it holds the directory lock until it stops.
    writer: Option<JoinHandle<()>>,
    fsync: FsyncPolicy,
    closed: AtomicBool,
    recovery: Recovery,
}

impl fmt::Debug for FileStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let failure = self
            .shared
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        f.debug_struct("FileStorage")
            .field("dir", &self.shared.dir)
            .field("fsync", &self.fsync)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .field("failure", &failure)
            .finish_non_exhaustive()
    }
}

/// The hash intervals (inclusive) that make up `range`, in scan order.
fn intervals(range: &HashRange) -> [Option<(u64, u64)>; 2] {
    let (start, end) = (range.start, range.end);
    if start < end {
        [Some((start, end - 1)), None]
    } else {
        // Wrapping, or the full ring (start == end) starting at `start`.
        [
            Some((start, u64::MAX)),
            end.checked_sub(1).map(|hi| (0, hi)),
        ]
    }
}

fn upper(hi: u64) -> Bound<(u64, Bytes)> {
    match hi.checked_add(1) {
        Some(next) => Bound::Excluded((next, Bytes::new())),
        None => Bound::Unbounded,
    }
}

impl FileStorage {
    /// Opens (creating if needed) the store in `dir` and recovers its contents.
    ///
    /// Fails with [`StorageError::Corruption`] if a segment is damaged (see the
    /// [crate documentation](crate)), and with [`StorageError::Config`] if another open store
    /// holds the directory.
    pub fn open(dir: &Path, options: FileOptions) -> Result<Self, StorageError> {
        FileStorage::open_tuned(dir, options, Tuning::default())
    }

    /// [`FileStorage::open`] with crate-internal settings (tests inject faults through them).
    pub(crate) fn open_tuned(
        dir: &Path,
        options: FileOptions,
        tuning: Tuning,
    ) -> Result<Self, StorageError> {
        let recovered = log::recover(dir, options.fsync, options.segment_bytes.get(), &tuning.fs)?;
        let shared = Arc::new(Shared::new(
            dir.to_owned(),
            recovered.index,
            recovered.meta,
            recovered.log_bytes,
            options.compact_min_bytes,
            &tuning,
        ));
        let (tx, rx) = mpsc::channel();
        let writer = log::spawn_writer(recovered.writer, Arc::clone(&shared), rx, tx.clone())?;
        Ok(FileStorage {
            shared,
            tx,
            writer: Some(writer),
            fsync: options.fsync,
            closed: AtomicBool::new(false),
            recovery: recovered.report,
        })
    }

    /// What opening the store found: segments and records replayed, torn tails cut and where
    /// they were moved.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Compactions that failed since the store opened. A failed compaction leaves the store
    /// working (its partial output is removed, the log is untouched) and is retried later.
    pub fn failed_compactions(&self) -> u64 {
        self.shared
            .compactions_failed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn check_open(&self) -> Result<(), StorageError> {
        if self.closed.load(Ordering::Acquire) || self.shared.is_failed() {
            Err(StorageError::Closed)
        } else {
            Ok(())
        }
    }

    /// Rewrites the log without superseded and purged records (see the crate documentation);
    /// returns when the compaction finished.
    pub async fn compact(&self) -> Result<(), StorageError> {
        self.check_open()?;
        let (done, finished) = oneshot::channel();
        log::start_compaction(&self.shared, &self.tx, Some(done))?;
        finished.await.map_err(|_| StorageError::Closed)?
    }

    /// Runs `job` on the hint files on the writer thread and waits for its answer. A failure
    /// is not fatal to the store (the log is untouched).
    async fn hint_job<T: Send + 'static>(
        &self,
        job: impl FnOnce(&log::Shared) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        self.check_open()?;
        let (ack, reply) = oneshot::channel();
        self.tx
            .send(Cmd::Hints(Box::new(move |shared| {
                let _ = ack.send(job(shared));
            })))
            .map_err(|_| StorageError::Closed)?;
        reply.await.map_err(|_| StorageError::Closed)?
    }

    /// Sends a command that answers through a oneshot and waits for the answer.
    async fn request(&self, cmd: impl FnOnce(log::Ack<()>) -> Cmd) -> Result<(), StorageError> {
        let (ack, reply) = oneshot::channel();
        self.tx.send(cmd(ack)).map_err(|_| StorageError::Closed)?;
        reply.await.map_err(|_| StorageError::Closed)?
    }

    /// The frame of `record` under `key`, or [`StorageError::InvalidRequest`] if it is too
    /// large for the log.
    fn encode(key: &[u8], record: &Record) -> Result<Vec<u8>, StorageError> {
        let mut frame = Vec::new();
        codec::encode_frame(key, record, &mut frame).ok_or_else(|| {
            StorageError::InvalidRequest(format!(
                "a record of {} bytes exceeds the file backend's limit of {} bytes",
                key.len() + record.encoded_len(),
                codec::MAX_PAYLOAD
            ))
        })?;
        Ok(frame)
    }

    /// Decides one write under the index lock: `Stale` with the kept record, or `Applied`
    /// with the record merged into the index and its frame to be logged.
    fn decide(
        index: &mut log::Index,
        hash: u64,
        key: Bytes,
        record: Record,
    ) -> (ApplyOutcome, bool) {
        let previous = match index.map.get(&(hash, key.clone())) {
            Some(current) if !record.supersedes(current) => {
                let current = current.clone();
                return (ApplyOutcome::Stale { current }, false);
            }
            Some(current) => Some(current.version),
            None => None,
        };
        index.merge_in(hash, key, record);
        (ApplyOutcome::Applied { previous }, true)
    }

    /// Sends `frames` (the winners just decided, in order; possibly none) to the writer,
    /// under the index lock, and returns where to wait for an acknowledgement that covers
    /// every outcome decided: the frames' write (synced under `always`), or under `always`
    /// with nothing to write a barrier (the records reported `Stale` may still wait for their
    /// fsync). `None`: nothing to wait for.
    fn send_decided(&self, frames: Vec<Vec<u8>>) -> Result<Option<Reply>, StorageError> {
        let always = self.fsync == FsyncPolicy::Always;
        if frames.is_empty() {
            if !always {
                return Ok(None);
            }
            let (ack, reply) = oneshot::channel();
            self.tx
                .send(Cmd::Barrier(ack))
                .map_err(|_| StorageError::Closed)?;
            return Ok(Some(reply));
        }
        let wait = always || self.shared.queued.load(Ordering::Relaxed) > MAX_QUEUED_BYTES;
        let (ack, reply) = if wait {
            let (ack, reply) = oneshot::channel();
            (Some(ack), Some(reply))
        } else {
            (None, None)
        };
        let bytes: usize = frames.iter().map(Vec::len).sum();
        self.shared
            .queued
            .fetch_add(bytes as u64, Ordering::Relaxed);
        let cmd = match <[Vec<u8>; 1]>::try_from(frames) {
            Ok([frame]) => Cmd::Write { frame, ack },
            Err(frames) => Cmd::WriteMany { frames, ack },
        };
        self.tx.send(cmd).map_err(|_| StorageError::Closed)?;
        Ok(reply)
    }

    fn apply_locked(
        &self,
        key: Bytes,
        record: Record,
    ) -> Result<(ApplyOutcome, Option<Reply>), StorageError> {
        let frame = Self::encode(&key, &record)?;
        let hash = key_hash(&key);
        let mut index = self.shared.index_write();
        self.check_open()?;
        let (outcome, write) = Self::decide(&mut index, hash, key, record);
        // Sent under the index lock: the log holds the winners in the order they were decided,
        // and a barrier lies after the frame of the record a `Stale` answer reports.
        let frames = if write { vec![frame] } else { Vec::new() };
        let reply = self.send_decided(frames)?;
        drop(index);
        Ok((outcome, reply))
    }

    /// [`Self::apply_locked`] for a batch: every write decided in order under one hold of
    /// the index lock, and every winner's frame sent to the writer as one command (one write,
    /// one fsync under `always`). A record too large for the log refuses the whole batch
    /// before anything is applied.
    fn apply_batch_locked(
        &self,
        writes: Vec<(Bytes, Record)>,
    ) -> Result<(Vec<ApplyOutcome>, Option<Reply>), StorageError> {
        check_batch_len(writes.len())?;
        let encoded = writes
            .into_iter()
            .map(|(key, record)| {
                let frame = Self::encode(&key, &record)?;
                Ok((key_hash(&key), key, record, frame))
            })
            .collect::<Result<Vec<_>, StorageError>>()?;
        if encoded.is_empty() {
            self.check_open()?;
            return Ok((Vec::new(), None));
        }
        let mut outcomes = Vec::with_capacity(encoded.len());
        let mut frames = Vec::new();
        let mut index = self.shared.index_write();
        self.check_open()?;
        for (hash, key, record, frame) in encoded {
            let (outcome, write) = Self::decide(&mut index, hash, key, record);
            if write {
                frames.push(frame);
            }
            outcomes.push(outcome);
        }
        let reply = self.send_decided(frames)?;
        drop(index);
        Ok((outcomes, reply))
    }

    fn scan_now(
        &self,
        range: HashRange,
        cursor: Option<ScanCursor>,
        limit: NonZeroUsize,
    ) -> Result<ScanPage, StorageError> {
        self.check_open()?;
        let want = limit.get().saturating_add(1);
        let mut entries: Vec<Entry> = Vec::new();
        let index = self.shared.index_read();
        // With a cursor, intervals before the one holding it are skipped; a cursor outside the
        // range admits nothing (see `after_cursor`).
        let mut started = cursor.is_none();
        'intervals: for (lo, hi) in intervals(&range).into_iter().flatten() {
            let lower = match &cursor {
                Some(c) if !started => {
                    if !(lo..=hi).contains(&c.hash) {
                        continue;
                    }
                    started = true;
                    Bound::Excluded((c.hash, c.key.clone()))
                }
                _ => Bound::Included((lo, Bytes::new())),
            };
            for ((hash, key), record) in index.map.range((lower, upper(hi))) {
                entries.push(Entry {
                    hash: *hash,
                    key: key.clone(),
                    record: record.clone(),
                });
                if entries.len() == want {
                    break 'intervals;
                }
            }
        }
        drop(index);
        Ok(ScanPage::from_ordered(entries, limit))
    }

    fn digest_now(
        &self,
        range: HashRange,
        buckets: NonZeroU32,
    ) -> Result<Vec<RangeDigest>, StorageError> {
        self.check_open()?;
        let mut digests = empty_digests(buckets)?;
        let index = self.shared.index_read();
        for (lo, hi) in intervals(&range).into_iter().flatten() {
            let lower = Bound::Included((lo, Bytes::new()));
            for ((hash, key), record) in index.map.range((lower, upper(hi))) {
                let bucket = range.bucket_of(*hash, buckets) as usize;
                digests[bucket].add(record.fingerprint(key));
            }
        }
        Ok(digests)
    }

    /// Purges the index entries after `cursor` (up to [`PURGE_BATCH`] examined) under one
    /// hold of the index lock, logging a removal for each record removed; moves `cursor` on
    /// (`None` at the end) and returns where the removals' write is acknowledged.
    fn purge_batch(
        &self,
        now_ms: u64,
        grace: Duration,
        cursor: &mut Option<(u64, Bytes)>,
        stats: &mut PurgeStats,
    ) -> Result<Option<Reply>, StorageError> {
        let mut index = self.shared.index_write();
        self.check_open()?;
        let lower = match cursor.take() {
            Some(slot) => Bound::Excluded(slot),
            None => Bound::Unbounded,
        };
        let mut examined = 0;
        let mut last = None;
        let mut collectable = Vec::new();
        for (slot, record) in index.map.range((lower, Bound::Unbounded)).take(PURGE_BATCH) {
            examined += 1;
            last = Some(slot);
            if record.is_collectable(now_ms, grace) {
                collectable.push(slot.clone());
            }
        }
        // A short batch was the last one.
        *cursor = if examined < PURGE_BATCH {
            None
        } else {
            last.cloned()
        };
        let mut frames = Vec::new();
        for slot in collectable {
            if let Some(record) = index.map.remove(&slot) {
                codec::encode_removal(&slot.1, record.version, &mut frames);
                index.count_out(slot.1.len(), &record);
                stats.count(&record);
            }
        }
        if frames.is_empty() {
            return Ok(None);
        }
        let (ack, reply) = oneshot::channel();
        self.shared
            .queued
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        // Sent under the index lock: the removals lie in the log where they were decided.
        self.tx
            .send(Cmd::Write {
                frame: frames,
                ack: Some(ack),
            })
            .map_err(|_| StorageError::Closed)?;
        Ok(Some(reply))
    }
}

impl FileStorage {
    /// Removes the record of `key` under the index lock if its version is `version`, and
    /// sends its removal frame to the writer in that same hold, so the log holds the removal
    /// where it was decided; returns where the write is acknowledged (`None`: nothing removed).
    fn remove_if_version_locked(
        &self,
        key: &[u8],
        version: Version,
    ) -> Result<Option<Reply>, StorageError> {
        let slot = (key_hash(key), Bytes::copy_from_slice(key));
        let mut index = self.shared.index_write();
        self.check_open()?;
        if index
            .map
            .get(&slot)
            .is_none_or(|stored| stored.version != version)
        {
            return Ok(None);
        }
        let Some(record) = index.map.remove(&slot) else {
            return Ok(None);
        };
        index.count_out(slot.1.len(), &record);
        let mut frame = Vec::new();
        codec::encode_removal(&slot.1, version, &mut frame);
        let (ack, reply) = oneshot::channel();
        self.shared
            .queued
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        self.tx
            .send(Cmd::Write {
                frame,
                ack: Some(ack),
            })
            .map_err(|_| StorageError::Closed)?;
        drop(index);
        Ok(Some(reply))
    }
}

impl Storage for FileStorage {
    /// Ordered scans, never evicts; durability by the fsync policy: `always` syncs before the
    /// ack, `interval` and `never` acknowledge once the record is queued for the writer.
    fn capabilities(&self) -> Capabilities {
        let durability = match self.fsync {
            FsyncPolicy::Always => Durability::PowerLoss,
            FsyncPolicy::Interval(_) | FsyncPolicy::Never => Durability::Deferred,
        };
        Capabilities::new(durability, ScanCost::Ordered)
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Record>, StorageError> {
        self.check_open()?;
        let slot = (key_hash(key), Bytes::copy_from_slice(key));
        Ok(self.shared.index_read().map.get(&slot).cloned())
    }

    /// Decides the winner under the index lock; under [`FsyncPolicy::Always`] waits until the
    /// record is synced (sharing the fsync with every write queued alongside), and a `Stale`
    /// answer waits until the equal or newer record it reports is synced.
    async fn apply(&self, key: Bytes, record: Record) -> Result<ApplyOutcome, StorageError> {
        let (outcome, reply) = self.apply_locked(key, record)?;
        if let Some(reply) = reply {
            reply.await.map_err(|_| StorageError::Closed)??;
        }
        Ok(outcome)
    }

    /// Decides every write in order under one hold of the index lock and logs the winners
    /// with one write: under [`FsyncPolicy::Always`] the whole batch costs one fsync (shared,
    /// like any group commit, with concurrent writers), and returns once it is synced; a batch
    /// of only `Stale` outcomes waits, like a `Stale` apply, until the records it reports are
    /// synced. Every record is checked against the log's size limit first: one too large
    /// refuses the whole batch with [`StorageError::InvalidRequest`], nothing applied. A write
    /// or fsync that fails fails the store, as for `apply`: the batch's records may be
    /// readable, and durable or not.
    async fn apply_batch(
        &self,
        writes: Vec<(Bytes, Record)>,
    ) -> Result<Vec<ApplyOutcome>, StorageError> {
        let (outcomes, reply) = self.apply_batch_locked(writes)?;
        if let Some(reply) = reply {
            reply.await.map_err(|_| StorageError::Closed)??;
        }
        Ok(outcomes)
    }

    /// Read from memory: the metadata files are read when the store opens.
    async fn load_meta(&self, name: &str) -> Result<Option<Bytes>, StorageError> {
        check_meta_name(name)?;
        self.check_open()?;
        let meta = self
            .shared
            .meta
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(meta.get(name).cloned())
    }

    /// Replaces the value's file atomically on the writer thread (write a temporary file,
    /// fsync it, rename it into place, fsync the directory) and returns once that is done:
    /// synced whatever the fsync policy, since metadata is small and rarely written and a
    /// crash must never leave a torn value. A failure (a full disk) is not fatal: the store
    /// goes on working, and the old value stays unless the rename happened.
    async fn store_meta(&self, name: &str, value: Bytes) -> Result<(), StorageError> {
        check_meta(name, &value)?;
        self.check_open()?;
        self.request(|ack| Cmd::StoreMeta {
            name: name.to_owned(),
            value,
            ack,
        })
        .await
    }

    /// Writes one file per hint (temporary file, fsync, rename) and syncs the directory once,
    /// on the writer thread, whatever the fsync policy (see the `hints` module).
    async fn store_hints(&self, hints: Vec<(u64, Bytes)>) -> Result<(), StorageError> {
        check_hints(&hints)?;
        self.hint_job(move |shared| {
            hints::store(&shared.fs, &shared.dir, &hints).map_err(|err| hint_error("storing", err))
        })
        .await
    }

    /// Reads the hint files (on the writer thread); a damaged one is
    /// [`StorageError::Corruption`] naming it.
    async fn load_hints(&self) -> Result<Vec<(u64, Bytes)>, StorageError> {
        self.hint_job(|shared| hints::load(&shared.fs, &shared.dir))
            .await
    }

    /// Unlinks the hint files and syncs the directory, on the writer thread.
    async fn remove_hints(&self, ids: Vec<u64>) -> Result<(), StorageError> {
        check_hint_ids(&ids)?;
        self.hint_job(move |shared| {
            hints::remove(&shared.fs, &shared.dir, &ids).map_err(|err| hint_error("removing", err))
        })
        .await
    }

    /// Decides under the index lock and logs a removal frame (replayed on open with the
    /// purge's rule, which at that point in the log removes exactly this record); returns
    /// once the frame is written, and under [`FsyncPolicy::Always`] synced, like an apply.
    async fn remove_if_version(&self, key: &[u8], version: Version) -> Result<bool, StorageError> {
        match self.remove_if_version_locked(key, version)? {
            Some(reply) => {
                reply.await.map_err(|_| StorageError::Closed)??;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Walks only the index entries of the range: O(log n + page).
    async fn scan(
        &self,
        range: HashRange,
        cursor: Option<ScanCursor>,
        limit: NonZeroUsize,
    ) -> Result<ScanPage, StorageError> {
        self.scan_now(range, cursor, limit)
    }

    /// Walks only the index entries of the range.
    async fn digest(
        &self,
        range: HashRange,
        buckets: NonZeroU32,
    ) -> Result<Vec<RangeDigest>, StorageError> {
        self.digest_now(range, buckets)
    }

    /// Walks the index in batches of 1,024 entries, releasing the index lock
    /// between them, and logs a removal for every record removed (each batch's removals are
    /// written, and synced under `always`, before the next batch). Then starts a background
    /// compaction if the log holds enough garbage to justify one; it does not wait for it.
    async fn purge(&self, now_ms: u64, grace: Duration) -> Result<PurgeStats, StorageError> {
        self.check_open()?;
        let mut stats = PurgeStats::default();
        let mut cursor = None;
        loop {
            if let Some(reply) = self.purge_batch(now_ms, grace, &mut cursor, &mut stats)? {
                reply.await.map_err(|_| StorageError::Closed)??;
            }
            if cursor.is_none() {
                break;
            }
            tokio::task::yield_now().await;
        }
        if stats != PurgeStats::default() {
            log::maybe_compact(&self.shared, &self.tx);
        }
        Ok(stats)
    }

    async fn stats(&self) -> Result<StorageStats, StorageError> {
        self.check_open()?;
        let index = self.shared.index_read();
        Ok(StorageStats::new(
            index.map.len() as u64,
            index.tombstones,
            index.bytes,
        ))
    }

    /// Writes and syncs everything applied before the call.
    async fn flush(&self) -> Result<(), StorageError> {
        self.check_open()?;
        self.request(Cmd::Flush).await
    }

    /// Syncs, stops the writer, waits for running compactions and releases the directory.
    async fn close(&self) -> Result<(), StorageError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Err(StorageError::Closed);
        }
        let result = self.request(|ack| Cmd::Close(Some(ack))).await;
        // Release the memory now rather than when the last handle is dropped.
        let mut index = self.shared.index_write();
        index.map.clear();
        drop(index);
        self.shared
            .meta
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        result
    }
}

fn hint_error(what: &str, err: std::io::Error) -> StorageError {
    tracing::warn!("file store: {what} hints failed: {err}");
    StorageError::Io(std::io::Error::new(
        err.kind(),
        format!("{what} hints: {err}"),
    ))
}

impl Drop for FileStorage {
    /// Stops the writer and waits for it: it writes and syncs what is queued, waits for
    /// running compactions and releases the directory, so the directory can be reopened as
    /// soon as the drop returns. Unlike [`Storage::close`], a failure is not reported.
    ///
    /// The drop blocks the calling thread for as long as that takes (a final fsync, a
    /// compaction in progress). Async code should `close().await` the store before dropping
    /// its last handle, so that wait never lands on a runtime worker.
    fn drop(&mut self) {
        if !self.closed.load(Ordering::Acquire) {
            let _ = self.tx.send(Cmd::Close(None));
        }
        if let Some(writer) = self.writer.take() {
            // A panicked writer has released the lock too; there is no one to tell.
            let _ = writer.join();
        }
    }
}

#[cfg(test)]
mod tests;
