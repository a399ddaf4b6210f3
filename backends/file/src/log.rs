//! Segment files: recovery, the writer thread (group commit) and compaction.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_core::hash::key_hash;
use chorus_core::hlc::Version;
use chorus_core::record::Record;
use chorus_core::storage::StorageError;
use tokio::sync::oneshot;

use crate::codec::{self, BatchBuf, Logged, SegmentEnd, SegmentError};
use crate::fs::Fs;
use crate::{FsyncPolicy, Recovery};

/// Extension of sealed and active segment files.
const SEGMENT_EXT: &str = "seg";
/// Extension of a compaction output before its rename.
const TMP_EXT: &str = "tmp";
/// Extension of the torn tails recovery moves aside.
pub(crate) const DAMAGED_EXT: &str = "damaged";
/// The file whose lock marks the directory as in use by one store.
pub(crate) const LOCK_FILE: &str = "LOCK";
/// Commands the writer takes from the channel at once, at most.
const MAX_BATCH: usize = 4096;
/// Bytes a compaction buffers before each write to its output.
const COMPACT_CHUNK: usize = 1 << 20;
/// How long size-triggered rotation waits after a segment could not be created.
const ROTATE_RETRY: Duration = Duration::from_secs(1);
/// The longest a failed background compaction waits before the next attempt.
const MAX_COMPACT_BACKOFF: Duration = Duration::from_secs(300);

/// A job on the hint files, run on the writer thread.
pub(crate) type HintJob = Box<dyn FnOnce(&Shared) + Send>;

/// A one-shot reply.
pub(crate) type Ack<T> = oneshot::Sender<Result<T, StorageError>>;

/// What the writer thread is asked to do, in log order.
pub(crate) enum Cmd {
    /// Append frames (one batch); acknowledge once written (and synced, under `always`).
    Write {
        frame: Vec<u8>,
        ack: Option<Ack<()>>,
    },
    /// Append the frames of an `apply_batch`, each on its own (they may fill several log
    /// batches), in the same write and the same fsync; acknowledge once written (and synced,
    /// under `always`).
    WriteMany {
        frames: Vec<Vec<u8>>,
        ack: Option<Ack<()>>,
    },
    /// Replace a metadata value atomically and durably (see the `meta` module), then
    /// acknowledge.
    StoreMeta {
        name: String,
        value: Bytes,
        ack: Ack<()>,
    },
    /// Run a job on the hint files (see the `hints` module); it answers through its own
    /// channel, and dropping it unrun (a failed or closed store) answers `Closed`.
    Hints(HintJob),
    /// Acknowledge once everything sent before is as durable as a write acknowledged now
    /// would be: synced, under `always` (without an fsync if it already is).
    Barrier(Ack<()>),
    /// Write and sync everything before this command.
    Flush(Ack<()>),
    /// Seal the active segment and start a new one (the first step of a compaction).
    Rotate(Ack<Rotated>),
    /// Sync, release the directory and stop.
    Close(Option<Ack<()>>),
}

/// What a rotation reports to the compaction that asked for it.
pub(crate) struct Rotated {
    /// The id the compacted segment takes: above every sealed one, below the new active one.
    compact_id: u64,
}

/// The in-memory index: every live record, ordered by `(ring position, key)`.
#[derive(Default)]
pub(crate) struct Index {
    pub(crate) map: BTreeMap<(u64, Bytes), Record>,
    pub(crate) tombstones: u64,
    pub(crate) bytes: u64,
}

impl Index {
    /// Keeps the [`Record::merge`] of what is stored and `record`; true if `record` won.
    pub(crate) fn merge_in(&mut self, hash: u64, key: Bytes, record: Record) -> bool {
        let key_len = key.len();
        let replaced = match self.map.entry((hash, key)) {
            std::collections::btree_map::Entry::Occupied(mut slot) => {
                if !record.supersedes(slot.get()) {
                    return false;
                }
                let new_len = record.encoded_len();
                let new_tombstone = record.is_tombstone();
                let old = slot.insert(record);
                (Some(old), new_len, new_tombstone)
            }
            std::collections::btree_map::Entry::Vacant(slot) => {
                let new_len = record.encoded_len();
                let new_tombstone = record.is_tombstone();
                slot.insert(record);
                (None, new_len, new_tombstone)
            }
        };
        let (old, new_len, new_tombstone) = replaced;
        if let Some(old) = old {
            self.count_out(key_len, &old);
        }
        self.tombstones += u64::from(new_tombstone);
        self.bytes += (key_len + new_len) as u64;
        true
    }

    /// Replays a logged removal: drops the key's record unless it is newer than `version`.
    fn remove_up_to(&mut self, hash: u64, key: Bytes, version: Version) -> bool {
        let slot = (hash, key);
        match self.map.get(&slot) {
            Some(stored) if stored.version <= version => {
                if let Some(record) = self.map.remove(&slot) {
                    self.count_out(slot.1.len(), &record);
                }
                true
            }
            _ => false,
        }
    }

    pub(crate) fn count_out(&mut self, key_len: usize, record: &Record) {
        self.tombstones -= u64::from(record.is_tombstone());
        self.bytes -= (key_len + record.encoded_len()) as u64;
    }
}

/// Crate-internal settings that are not user options: the file layer (tests inject faults
/// through it) and the first back-off after a failed background compaction.
#[derive(Clone, Debug)]
pub(crate) struct Tuning {
    pub(crate) fs: Fs,
    pub(crate) compact_backoff: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            fs: Fs::default(),
            compact_backoff: Duration::from_secs(1),
        }
    }
}

/// When the next background compaction may run after failures.
#[derive(Debug)]
struct Backoff {
    first: Duration,
    next: Duration,
    not_before: Option<Instant>,
}

/// State shared by the store handle, the writer thread and compactions.
pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) fs: Fs,
    pub(crate) index: RwLock<Index>,
    /// The metadata namespace, as on disk (updated by the writer thread once a value is in
    /// place).
    pub(crate) meta: RwLock<HashMap<String, Bytes>>,
    /// Set by the first failed write or sync of the log; the store refuses work from then on.
    pub(crate) failed: AtomicBool,
    /// Why the store failed, for the log and for `Debug`.
    pub(crate) failure: Mutex<Option<String>>,
    /// Frame bytes sent to the writer and not yet written.
    pub(crate) queued: AtomicU64,
    /// Bytes in segment files (approximate while a compaction runs).
    pub(crate) log_bytes: AtomicU64,
    /// Serialises compactions.
    compact_lock: Mutex<()>,
    /// Whether a size-triggered compaction is running or queued.
    compacting: AtomicBool,
    /// Compaction threads, joined by the writer when the store closes.
    compactions: Mutex<Vec<JoinHandle<()>>>,
    /// Log size above which a compaction may run.
    pub(crate) compact_min_bytes: u64,
    /// Back-off of background compactions after failures.
    backoff: Mutex<Backoff>,
    /// Compactions that failed (and left the store working).
    pub(crate) compactions_failed: AtomicU64,
}

impl Shared {
    pub(crate) fn new(
        dir: PathBuf,
        index: Index,
        meta: HashMap<String, Bytes>,
        log_bytes: u64,
        compact_min_bytes: u64,
        tuning: &Tuning,
    ) -> Self {
        Shared {
            dir,
            fs: tuning.fs.clone(),
            index: RwLock::new(index),
            meta: RwLock::new(meta),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            queued: AtomicU64::new(0),
            log_bytes: AtomicU64::new(log_bytes),
            compact_lock: Mutex::new(()),
            compacting: AtomicBool::new(false),
            compactions: Mutex::new(Vec::new()),
            compact_min_bytes,
            backoff: Mutex::new(Backoff {
                first: tuning.compact_backoff,
                next: tuning.compact_backoff,
                not_before: None,
            }),
            compactions_failed: AtomicU64::new(0),
        }
    }

    pub(crate) fn index_read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn index_write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the store failed (never undone: a failed fsync may have dropped dirty pages, so
    /// retrying it could report success for data that is gone, and a failed write may have
    /// left part of a batch that later batches must not follow).
    fn fail(&self, what: &str, err: &io::Error) -> StorageError {
        let message = format!("{what} in {}: {err}", self.dir.display());
        tracing::error!(dir = %self.dir.display(), "file store failed: {what}: {err}");
        let mut failure = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        failure.get_or_insert(message);
        self.failed.store(true, Ordering::Release);
        StorageError::Io(io::Error::new(err.kind(), format!("{what}: {err}")))
    }

    pub(crate) fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.{SEGMENT_EXT}"))
}

fn tmp_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.{TMP_EXT}"))
}

/// Where recovery keeps the torn tail cut from segment `id` at `offset`.
pub(crate) fn damaged_path(dir: &Path, id: u64, offset: usize) -> PathBuf {
    dir.join(format!("{id:020}.{SEGMENT_EXT}.{offset}.{DAMAGED_EXT}"))
}

/// Removes `path` if it exists.
fn remove_if_present(fs: &Fs, path: &Path) -> io::Result<()> {
    match fs.remove_file(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Segment ids in `dir`, sorted; leftover compaction outputs are removed.
fn list_segments(fs: &Fs, dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    let mut removed_tmp = false;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((stem, ext)) = name.split_once('.') else {
            continue;
        };
        let Ok(id) = stem.parse::<u64>() else {
            continue;
        };
        match ext {
            SEGMENT_EXT => ids.push(id),
            // A compaction that did not finish: its inputs are all still there.
            TMP_EXT => {
                fs.remove_file(&entry.path())?;
                removed_tmp = true;
            }
            _ => {}
        }
    }
    if removed_tmp {
        fs.sync_dir(dir)?;
    }
    ids.sort_unstable();
    Ok(ids)
}

/// What [`recover`] found and set up.
pub(crate) struct Recovered {
    pub(crate) index: Index,
    pub(crate) meta: HashMap<String, Bytes>,
    pub(crate) log_bytes: u64,
    pub(crate) writer: WriterState,
    pub(crate) report: Recovery,
}

/// Rebuilds the index from every segment and opens a fresh active segment.
///
/// Segments are replayed in id order, which is log order (a compaction's output takes an id
/// between the segments it replaces and the ones written after it), with the rules the live
/// index follows: a record is kept if it supersedes the stored one ([`Record::merge`]), a
/// removal drops the stored record unless it is newer. A torn tail of the newest segment is
/// moved aside into a `.damaged` file and cut off; any other damage is
/// [`StorageError::Corruption`] naming the file and offset; a segment of another format
/// version is [`StorageError::Config`]. Every segment is synced before the store opens, so
/// whatever recovery read is durable.
pub(crate) fn recover(
    dir: &Path,
    policy: FsyncPolicy,
    segment_bytes: u64,
    fs: &Fs,
) -> Result<Recovered, StorageError> {
    std::fs::create_dir_all(dir)?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            return Err(StorageError::Config(format!(
                "{} is in use by another open store (close it first)",
                dir.display()
            )));
        }
        Err(fs::TryLockError::Error(err)) => return Err(err.into()),
    }
    let ids = list_segments(fs, dir)?;
    let mut index = Index::default();
    let mut report = Recovery::default();
    let mut log_bytes = 0u64;
    let last = ids.last().copied();
    for &id in &ids {
        let path = segment_path(dir, id);
        let data = std::fs::read(&path)?;
        let newest = Some(id) == last;
        let end = codec::read_segment(&data, id, newest, |logged| match logged {
            Logged::Record(key, record) => {
                report.records += 1;
                index.merge_in(key_hash(&key), key, record);
            }
            Logged::Removal(key, version) => {
                report.removals += 1;
                index.remove_up_to(key_hash(&key), key, version);
            }
        })
        .map_err(|err| match err {
            SegmentError::Damage { offset, why } => StorageError::Corruption(format!(
                "segment {} at offset {offset}: {why}",
                path.display()
            )),
            SegmentError::Version(version) => StorageError::Config(format!(
                "segment {} is in log format version {version}; this build reads only \
                 version {} (written by a newer Chorus?)",
                path.display(),
                codec::FORMAT_VERSION
            )),
        })?;
        report.segments += 1;
        let mut len = data.len() as u64;
        match end {
            SegmentEnd::Clean => {
                // What was read may still be only in the page cache (a crash of a process that
                // did not sync): sync it before anything relies on it.
                let file = File::open(&path)?;
                fs.sync_all(&file, &path)?;
            }
            SegmentEnd::Torn { valid_len, why } => {
                let tail = &data[valid_len..];
                if !tail.is_empty() {
                    let aside = damaged_path(dir, id, valid_len);
                    remove_if_present(fs, &aside)?;
                    let file = fs.create_new(&aside)?;
                    fs.write_all(&file, &aside, tail)?;
                    fs.sync_all(&file, &aside)?;
                    fs.sync_dir(dir)?;
                    tracing::warn!(
                        segment = %path.display(),
                        offset = valid_len,
                        bytes = tail.len(),
                        moved_to = %aside.display(),
                        "file store recovery: cut a torn tail ({why})"
                    );
                    report.torn_bytes += tail.len() as u64;
                    report.damaged.push(aside);
                }
                if valid_len == 0 {
                    // Not even a segment header: created just before a crash.
                    fs.remove_file(&path)?;
                    fs.sync_dir(dir)?;
                } else {
                    fs.truncate(&path, valid_len as u64)?;
                }
                len = valid_len as u64;
            }
        }
        log_bytes += len;
    }
    let meta = crate::meta::load_all(fs, dir)?;
    // Never append to a recovered segment: start a new one above every existing id.
    let active_id = last.map_or(1, |id| id + 1);
    let active = create_segment(fs, dir, active_id)?;
    Ok(Recovered {
        index,
        meta,
        log_bytes: log_bytes + codec::SEGMENT_HEADER as u64,
        writer: WriterState {
            dir: dir.to_owned(),
            fs: fs.clone(),
            policy,
            segment_bytes,
            active_path: segment_path(dir, active_id),
            active,
            active_id,
            active_len: codec::SEGMENT_HEADER as u64,
            synced_len: codec::SEGMENT_HEADER as u64,
            next_id: active_id + 1,
            dirty: false,
            last_sync: Instant::now(),
            batches: BatchBuf::default(),
            rotate_not_before: None,
            _lock: lock,
        },
        report,
    })
}

/// Creates segment `id` with its header, synced, and makes its directory entry durable. On
/// failure a partial file may be left behind.
fn create_segment(fs: &Fs, dir: &Path, id: u64) -> io::Result<File> {
    let path = segment_path(dir, id);
    let file = fs.create_new(&path)?;
    fs.write_all(&file, &path, &codec::segment_header())?;
    fs.sync_data(&file, &path)?;
    fs.sync_dir(dir)?;
    Ok(file)
}

/// The writer thread's own state: the active segment and the directory lock.
pub(crate) struct WriterState {
    dir: PathBuf,
    fs: Fs,
    policy: FsyncPolicy,
    segment_bytes: u64,
    active: File,
    active_path: PathBuf,
    active_id: u64,
    /// Bytes in the active segment, header included.
    active_len: u64,
    /// Bytes of the active segment known durable.
    synced_len: u64,
    next_id: u64,
    /// Written but not yet synced.
    dirty: bool,
    last_sync: Instant,
    /// Frames taken from the channel and not yet written.
    batches: BatchBuf,
    /// After a segment could not be created, the next size-triggered attempt waits until then.
    rotate_not_before: Option<Instant>,
    /// Held for the life of the writer: released when it stops.
    _lock: File,
}

/// Starts the writer thread.
pub(crate) fn spawn_writer(
    state: WriterState,
    shared: Arc<Shared>,
    rx: Receiver<Cmd>,
    tx: Sender<Cmd>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("chorus-file-writer".into())
        .spawn(move || {
            let close_ack = run_writer(state, &shared, &rx, &tx);
            // Dropping the receiver refuses queued commands (their acks see the store closed),
            // so a compaction waiting for a rotation stops; then wait for every compaction.
            drop(rx);
            drop(tx);
            let handles: Vec<_> = std::mem::take(
                &mut *shared
                    .compactions
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            );
            for handle in handles {
                let _ = handle.join();
            }
            if let Some(ack) = close_ack {
                let result = if shared.is_failed() {
                    Err(StorageError::Closed)
                } else {
                    Ok(())
                };
                let _ = ack.send(result);
            }
        })
}

/// The writer loop; returns the close acknowledgement once asked to stop (or when every sender
/// is gone).
fn run_writer(
    mut state: WriterState,
    shared: &Arc<Shared>,
    rx: &Receiver<Cmd>,
    tx: &Sender<Cmd>,
) -> Option<Ack<()>> {
    let mut batch: Vec<Cmd> = Vec::new();
    let mut acks: Vec<Ack<()>> = Vec::new();
    loop {
        let first = match state.policy {
            FsyncPolicy::Interval(every) if state.dirty => {
                let wait = every.saturating_sub(state.last_sync.elapsed());
                match rx.recv_timeout(wait) {
                    Ok(cmd) => Some(cmd),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return None,
                }
            }
            _ => match rx.recv() {
                Ok(cmd) => Some(cmd),
                Err(_) => return None,
            },
        };
        let Some(first) = first else {
            // The interval elapsed with unsynced data.
            // A failure is recorded in `shared` and refuses all later work.
            let _ = state.sync(shared);
            continue;
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        let mut close = None;
        for cmd in batch.drain(..) {
            if shared.is_failed() && !matches!(cmd, Cmd::Close(_)) {
                refuse(cmd);
                continue;
            }
            match cmd {
                Cmd::Write { frame, ack } => {
                    shared
                        .queued
                        .fetch_sub(frame.len() as u64, Ordering::Relaxed);
                    state.batches.push_frames(&frame);
                    acks.extend(ack);
                }
                Cmd::WriteMany { frames, ack } => {
                    for frame in &frames {
                        shared
                            .queued
                            .fetch_sub(frame.len() as u64, Ordering::Relaxed);
                        state.batches.push_frames(frame);
                    }
                    acks.extend(ack);
                }
                Cmd::StoreMeta { name, value, ack } => {
                    let _ = ack.send(store_meta(shared, &name, value));
                }
                Cmd::Hints(job) => job(shared),
                Cmd::Barrier(ack) => acks.push(ack),
                Cmd::Flush(ack) => {
                    let result = state.commit(shared, &mut acks, true);
                    let _ = ack.send(result);
                }
                Cmd::Rotate(ack) => {
                    let result = state
                        .commit(shared, &mut acks, true)
                        .and_then(|()| state.rotate(shared, true));
                    let _ = ack.send(result);
                }
                Cmd::Close(ack) => {
                    if !shared.is_failed() && state.commit(shared, &mut acks, true).is_ok() {
                        // A clean close ends the segment with a commit marker that vouches
                        // for everything before it.
                        let _ = state.seal(shared);
                    }
                    close = Some(ack);
                    break;
                }
            }
        }
        if let Some(ack) = close {
            // Anything after the close in this batch is refused.
            for cmd in batch.drain(..) {
                refuse(cmd);
            }
            for ack in acks.drain(..) {
                let _ = ack.send(Err(StorageError::Closed));
            }
            return ack;
        }
        let sync = state.policy == FsyncPolicy::Always;
        if state.commit(shared, &mut acks, sync).is_ok() {
            // Failures below are recorded in `shared` and refuse all later work.
            if let FsyncPolicy::Interval(every) = state.policy
                && state.dirty
                && state.last_sync.elapsed() >= every
            {
                let _ = state.sync(shared);
            }
            let may_rotate = state
                .rotate_not_before
                .is_none_or(|at| Instant::now() >= at);
            if state.active_len >= state.segment_bytes
                && may_rotate
                && state.rotate(shared, false).is_ok()
            {
                maybe_compact(shared, tx);
            }
        }
    }
}

/// Replaces the metadata value of `name` on disk (see the `meta` module) and, once the new
/// file is in place, in `shared`. A failure is not fatal to the store: the log is untouched,
/// and the old value stays unless the rename happened (then the new one is readable, durable
/// or not).
fn store_meta(shared: &Shared, name: &str, value: Bytes) -> Result<(), StorageError> {
    let (renamed, result) = crate::meta::store(&shared.fs, &shared.dir, name, &value);
    if renamed {
        shared
            .meta
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), value);
    }
    result.map_err(|err| {
        tracing::warn!(dir = %shared.dir.display(), "file store: storing metadata {name:?} failed: {err}");
        StorageError::Io(io::Error::new(
            err.kind(),
            format!("storing metadata {name:?}: {err}"),
        ))
    })
}

/// Answers a command the store can no longer carry out.
fn refuse(cmd: Cmd) {
    match cmd {
        Cmd::Write { ack, .. } | Cmd::WriteMany { ack, .. } => {
            if let Some(ack) = ack {
                let _ = ack.send(Err(StorageError::Closed));
            }
        }
        Cmd::Barrier(ack) | Cmd::Flush(ack) | Cmd::StoreMeta { ack, .. } => {
            let _ = ack.send(Err(StorageError::Closed));
        }
        Cmd::Rotate(ack) => {
            let _ = ack.send(Err(StorageError::Closed));
        }
        Cmd::Hints(job) => drop(job),
        Cmd::Close(ack) => {
            if let Some(ack) = ack {
                let _ = ack.send(Err(StorageError::Closed));
            }
        }
    }
}

impl WriterState {
    /// Writes the pending batches in one call, syncs if `sync`, then acknowledges `acks`.
    fn commit(
        &mut self,
        shared: &Shared,
        acks: &mut Vec<Ack<()>>,
        sync: bool,
    ) -> Result<(), StorageError> {
        let mut result = self.write_pending(shared);
        if result.is_ok() && sync && self.dirty {
            result = self.sync(shared);
        }
        for ack in acks.drain(..) {
            let reply = match &result {
                Ok(()) => Ok(()),
                Err(StorageError::Io(err)) => Err(StorageError::Io(io::Error::new(
                    err.kind(),
                    err.to_string(),
                ))),
                Err(_) => Err(StorageError::Closed),
            };
            let _ = ack.send(reply);
        }
        result
    }

    /// Writes the pending batches (a failed write is fatal: part of it may be in the file).
    fn write_pending(&mut self, shared: &Shared) -> Result<(), StorageError> {
        if self.batches.is_empty() {
            return Ok(());
        }
        let bytes = self
            .batches
            .finish(self.active_id, self.active_len, self.synced_len);
        let len = bytes.len() as u64;
        let written = self.fs.write_all(&self.active, &self.active_path, bytes);
        self.batches.clear();
        match written {
            Ok(()) => {
                self.active_len += len;
                shared.log_bytes.fetch_add(len, Ordering::Relaxed);
                self.dirty = true;
                Ok(())
            }
            Err(err) => Err(shared.fail("write to the active segment", &err)),
        }
    }

    fn sync(&mut self, shared: &Shared) -> Result<(), StorageError> {
        if let Err(err) = self.fs.sync_data(&self.active, &self.active_path) {
            return Err(shared.fail("fsync of the active segment", &err));
        }
        self.dirty = false;
        self.synced_len = self.active_len;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Syncs the active segment, then appends a commit marker (which vouches for every byte
    /// before it) and syncs again.
    fn seal(&mut self, shared: &Shared) -> Result<(), StorageError> {
        for step in 0..2 {
            if step == 1 {
                self.batches.push_marker();
                self.write_pending(shared)?;
            }
            if let Err(err) = self.fs.sync_all(&self.active, &self.active_path) {
                return Err(shared.fail("fsync of a sealed segment", &err));
            }
            self.dirty = false;
            self.synced_len = self.active_len;
            self.last_sync = Instant::now();
        }
        Ok(())
    }

    /// Seals the active segment and starts a new one. With `for_compaction`, an id between
    /// the two is reserved for the compaction's output, so the newest segment is always the
    /// active one (the only one that may have a torn tail).
    ///
    /// A new segment that cannot be created (a full disk) is not fatal: it is removed again
    /// and writing goes on in the sealed segment; only if it cannot be removed (it would
    /// pass for the newest segment on recovery) does the store fail.
    fn rotate(&mut self, shared: &Shared, for_compaction: bool) -> Result<Rotated, StorageError> {
        self.seal(shared)?;
        let compact_id = self.next_id;
        let new_id = if for_compaction {
            self.next_id + 1
        } else {
            self.next_id
        };
        // Ids are never reused, whatever happens below.
        self.next_id = new_id + 1;
        let path = segment_path(&self.dir, new_id);
        let file = match create_segment(&self.fs, &self.dir, new_id) {
            Ok(file) => file,
            Err(err) => {
                let undone =
                    remove_if_present(&self.fs, &path).and_then(|()| self.fs.sync_dir(&self.dir));
                if let Err(undo) = undone {
                    return Err(shared.fail(
                        "creating a segment",
                        &io::Error::new(
                            err.kind(),
                            format!("{err}; removing the partial segment failed too: {undo}"),
                        ),
                    ));
                }
                tracing::warn!(
                    segment = %path.display(),
                    "file store: could not start a new segment, writing on in the old one: {err}"
                );
                self.rotate_not_before = Some(Instant::now() + ROTATE_RETRY);
                return Err(StorageError::Io(err));
            }
        };
        self.active = file;
        self.active_path = path;
        self.active_id = new_id;
        self.active_len = codec::SEGMENT_HEADER as u64;
        self.synced_len = self.active_len;
        self.rotate_not_before = None;
        shared
            .log_bytes
            .fetch_add(self.active_len, Ordering::Relaxed);
        Ok(Rotated { compact_id })
    }
}

/// Starts a compaction in the background if the log has grown well past the live data (and
/// no failed compaction asked to wait).
pub(crate) fn maybe_compact(shared: &Arc<Shared>, tx: &Sender<Cmd>) {
    let log = shared.log_bytes.load(Ordering::Relaxed);
    let live = shared.index_read().bytes;
    if log < shared.compact_min_bytes || log < live.saturating_mul(2) {
        return;
    }
    let waiting = shared
        .backoff
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .not_before
        .is_some_and(|at| Instant::now() < at);
    if waiting || shared.compacting.swap(true, Ordering::AcqRel) {
        return;
    }
    let _ = start_compaction(shared, tx, None);
}

/// Runs [`compact`] on its own thread; `done` receives the outcome.
///
/// A failure leaves the store working (nothing of the log was touched, see [`compact`]); it
/// is logged, counted, and delays the next background compaction (doubling up to
/// [`MAX_COMPACT_BACKOFF`]).
pub(crate) fn start_compaction(
    shared: &Arc<Shared>,
    tx: &Sender<Cmd>,
    done: Option<Ack<()>>,
) -> Result<(), StorageError> {
    let thread_shared = Arc::clone(shared);
    let tx = tx.clone();
    let handle = std::thread::Builder::new()
        .name("chorus-file-compact".into())
        .spawn(move || {
            let shared = thread_shared;
            let result = compact(&shared, &tx);
            {
                let mut backoff = shared
                    .backoff
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                match &result {
                    Ok(()) => {
                        backoff.next = backoff.first;
                        backoff.not_before = None;
                    }
                    Err(err) => {
                        shared.compactions_failed.fetch_add(1, Ordering::Relaxed);
                        let wait = backoff.next;
                        backoff.not_before = Some(Instant::now() + wait);
                        backoff.next = (wait * 2).min(MAX_COMPACT_BACKOFF);
                        if !matches!(err, StorageError::Closed) {
                            tracing::warn!(
                                dir = %shared.dir.display(),
                                "file store: compaction failed, next attempt in {wait:?} or \
                                 later: {err}"
                            );
                        }
                    }
                }
            }
            shared.compacting.store(false, Ordering::Release);
            if let Some(done) = done {
                let _ = done.send(result);
            }
        })?;
    let mut handles = shared
        .compactions
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    handles.retain(|h| !h.is_finished());
    handles.push(handle);
    Ok(())
}

/// Rewrites every sealed segment as one segment holding only the live records.
///
/// 1. The writer seals the active segment and reserves an id for the output (in log order:
///    every record written before lies in a sealed segment).
/// 2. A snapshot of the index, taken after that point, holds for every key a record at least
///    as new as anything sealed, or nothing if the key was purged (its removal is logged
///    after the sealed segments). Superseded records, purged records and removals are
///    therefore left behind.
/// 3. The snapshot is written to a temporary file, synced, renamed into place, and the
///    directory synced; only then are the sealed segments removed, oldest first (and the
///    directory synced after each). A crash at any point leaves either the inputs, or the
///    newest inputs and the output together, which recovery replays to the same state.
///
/// A failure (a full disk, a failed fsync of the output) changes nothing the log relies on:
/// the temporary file is removed, the inputs stay, and the error is returned; the store goes
/// on working.
fn compact(shared: &Shared, tx: &Sender<Cmd>) -> Result<(), StorageError> {
    let _serial = shared
        .compact_lock
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let (ack, rotated) = oneshot::channel();
    tx.send(Cmd::Rotate(ack))
        .map_err(|_| StorageError::Closed)?;
    let Rotated { compact_id } = rotated
        .blocking_recv()
        .map_err(|_| StorageError::Closed)??;
    let snapshot: Vec<(Bytes, Record)> = shared
        .index_read()
        .map
        .iter()
        .map(|((_, key), record)| (key.clone(), record.clone()))
        .collect();
    let fs = &shared.fs;
    let dir = &shared.dir;
    let tmp = tmp_path(dir, compact_id);
    let target = segment_path(dir, compact_id);
    let mut renamed = false;
    let written = (|| -> io::Result<u64> {
        let file = fs.create_new(&tmp)?;
        fs.write_all(&file, &tmp, &codec::segment_header())?;
        let mut total = codec::SEGMENT_HEADER as u64;
        let mut batches = BatchBuf::default();
        let mut frame = Vec::new();
        for (i, (key, record)) in snapshot.iter().enumerate() {
            frame.clear();
            // Every stored record was encodable when it was applied.
            if codec::encode_frame(key, record, &mut frame).is_some() {
                batches.push_frames(&frame);
            }
            if batches.len() >= COMPACT_CHUNK || i + 1 == snapshot.len() {
                let bytes = batches.finish(compact_id, total, 0);
                fs.write_all(&file, &tmp, bytes)?;
                total += bytes.len() as u64;
                batches.clear();
            }
        }
        batches.push_marker();
        let bytes = batches.finish(compact_id, total, 0);
        fs.write_all(&file, &tmp, bytes)?;
        total += bytes.len() as u64;
        fs.sync_all(&file, &tmp)?;
        fs.rename(&tmp, &target)?;
        renamed = true;
        fs.sync_dir(dir)?;
        Ok(total)
    })();
    let written = match written {
        Ok(written) => written,
        Err(err) => {
            // Nothing refers to the output yet: remove it. A renamed output that may not be
            // durable is a valid segment and stays (recovery replays it like any other).
            if !renamed && let Err(undo) = remove_if_present(fs, &tmp) {
                tracing::warn!(
                    file = %tmp.display(),
                    "file store: could not remove a failed compaction's output: {undo}"
                );
            }
            return Err(StorageError::Io(io::Error::new(
                err.kind(),
                format!("writing a compacted segment: {err}"),
            )));
        }
    };
    let mut removed = 0u64;
    let removal = (|| -> io::Result<()> {
        for id in list_segments(fs, dir)? {
            if id >= compact_id {
                continue;
            }
            let path = segment_path(dir, id);
            let len = std::fs::metadata(&path)?.len();
            fs.remove_file(&path)?;
            removed += len;
            // Oldest first, each removal durable before the next: a crash part-way leaves only
            // newer segments beside the compacted one, so no old value can outlive the (now
            // purged) tombstone that covered it.
            fs.sync_dir(dir)?;
        }
        Ok(())
    })();
    let _ = shared
        .log_bytes
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |log| {
            Some(log.saturating_sub(removed).saturating_add(written))
        });
    removal.map_err(|err| {
        StorageError::Io(io::Error::new(
            err.kind(),
            format!("removing compacted segments: {err}"),
        ))
    })
}

/// Queued, unwritten frame bytes above which `never`/`interval` writers wait for their write
/// (back-pressure instead of an unbounded queue).
pub(crate) const MAX_QUEUED_BYTES: u64 = 64 << 20;
