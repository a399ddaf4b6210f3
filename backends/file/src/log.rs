//! Segment files: recovery, the writer thread (group commit) and compaction.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;
use chorus_core::hash::key_hash;
use chorus_core::record::Record;
use chorus_core::storage::StorageError;
use tokio::sync::oneshot;

use crate::FsyncPolicy;
use crate::codec::{self, SegmentEnd};

/// Extension of sealed and active segment files.
const SEGMENT_EXT: &str = "seg";
/// Extension of a compaction output before its rename.
const TMP_EXT: &str = "tmp";
/// The file whose lock marks the directory as in use by one store.
pub(crate) const LOCK_FILE: &str = "LOCK";
/// Commands the writer takes from the channel at once, at most.
const MAX_BATCH: usize = 4096;

/// A one-shot reply.
pub(crate) type Ack<T> = oneshot::Sender<Result<T, StorageError>>;

/// What the writer thread is asked to do, in log order.
pub(crate) enum Cmd {
    /// Append a frame; acknowledge once it is written (and synced, under `always`).
    Write {
        frame: Vec<u8>,
        ack: Option<Ack<()>>,
    },
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

    pub(crate) fn count_out(&mut self, key_len: usize, record: &Record) {
        self.tombstones -= u64::from(record.is_tombstone());
        self.bytes -= (key_len + record.encoded_len()) as u64;
    }
}

/// State shared by the store handle, the writer thread and compactions.
pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) index: RwLock<Index>,
    /// Set by the first failed write, sync or compaction; the store refuses work from then on.
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
}

impl Shared {
    pub(crate) fn index_read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn index_write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the store failed (never undone: a failed fsync may have dropped dirty pages, so
    /// retrying it could report success for data that is gone).
    fn fail(&self, what: &str, err: &io::Error) -> StorageError {
        let message = format!("{what} in {}: {err}", self.dir.display());
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

/// Fsyncs a directory, making creations, renames and removals in it durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Segment ids in `dir`, sorted; leftover compaction outputs are removed.
fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    let mut removed_tmp = false;
    for entry in fs::read_dir(dir)? {
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
                fs::remove_file(entry.path())?;
                removed_tmp = true;
            }
            _ => {}
        }
    }
    if removed_tmp {
        sync_dir(dir)?;
    }
    ids.sort_unstable();
    Ok(ids)
}

/// What [`recover`] found and set up.
pub(crate) struct Recovered {
    pub(crate) index: Index,
    pub(crate) log_bytes: u64,
    pub(crate) writer: WriterState,
}

/// Rebuilds the index from every segment and opens a fresh active segment.
///
/// Records are merged with [`Record::merge`], not replayed in log order: a compaction's output
/// and the segments it replaces may both be present after a crash, and whichever order they
/// are read in, the winner of each key is the same. A torn tail of the newest segment (a write
/// cut short by a crash) is truncated away; any other invalid frame is
/// [`StorageError::Corruption`] naming the file and offset.
pub(crate) fn recover(
    dir: &Path,
    policy: FsyncPolicy,
    segment_bytes: u64,
) -> Result<Recovered, StorageError> {
    fs::create_dir_all(dir)?;
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
    let ids = list_segments(dir)?;
    let mut index = Index::default();
    let mut log_bytes = 0u64;
    let last = ids.last().copied();
    for &id in &ids {
        let path = segment_path(dir, id);
        let data = fs::read(&path)?;
        let newest = Some(id) == last;
        let end = codec::read_segment(&data, newest, |key, record| {
            index.merge_in(key_hash(&key), key, record);
        })
        .map_err(|damage| {
            StorageError::Corruption(format!(
                "segment {} at offset {}: {}",
                path.display(),
                damage.offset,
                damage.why
            ))
        })?;
        let mut len = data.len() as u64;
        if let SegmentEnd::Torn { valid_len, .. } = end {
            let file = OpenOptions::new().write(true).open(&path)?;
            file.set_len(valid_len as u64)?;
            file.sync_all()?;
            len = valid_len as u64;
        }
        log_bytes += len;
    }
    // Never append to a recovered segment: start a new one above every existing id.
    let active_id = last.map_or(1, |id| id + 1);
    let active = create_segment(dir, active_id)?;
    Ok(Recovered {
        index,
        log_bytes,
        writer: WriterState {
            dir: dir.to_owned(),
            policy,
            segment_bytes,
            active,
            active_id,
            active_len: 0,
            next_id: active_id + 1,
            dirty: false,
            last_sync: Instant::now(),
            _lock: lock,
        },
    })
}

/// Creates an empty segment and makes its directory entry durable.
fn create_segment(dir: &Path, id: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(segment_path(dir, id))?;
    sync_dir(dir)?;
    Ok(file)
}

impl Shared {
    pub(crate) fn new(dir: PathBuf, index: Index, log_bytes: u64, compact_min_bytes: u64) -> Self {
        Shared {
            dir,
            index: RwLock::new(index),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            queued: AtomicU64::new(0),
            log_bytes: AtomicU64::new(log_bytes),
            compact_lock: Mutex::new(()),
            compacting: AtomicBool::new(false),
            compactions: Mutex::new(Vec::new()),
            compact_min_bytes,
        }
    }
}

/// The writer thread's own state: the active segment and the directory lock.
pub(crate) struct WriterState {
    dir: PathBuf,
    policy: FsyncPolicy,
    segment_bytes: u64,
    active: File,
    active_id: u64,
    active_len: u64,
    next_id: u64,
    /// Written but not yet synced.
    dirty: bool,
    last_sync: Instant,
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
    let mut buf: Vec<u8> = Vec::new();
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
                    buf.extend_from_slice(&frame);
                    acks.extend(ack);
                }
                Cmd::Flush(ack) => {
                    let result = state.commit(shared, &mut buf, &mut acks, true);
                    let _ = ack.send(result);
                }
                Cmd::Rotate(ack) => {
                    let result = state
                        .commit(shared, &mut buf, &mut acks, true)
                        .and_then(|()| state.rotate(shared, true));
                    let _ = ack.send(result);
                }
                Cmd::Close(ack) => {
                    if !shared.is_failed() {
                        let _ = state.commit(shared, &mut buf, &mut acks, true);
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
            return ack;
        }
        let sync = state.policy == FsyncPolicy::Always;
        if state.commit(shared, &mut buf, &mut acks, sync).is_ok() {
            // Failures below are recorded in `shared` and refuse all later work.
            if let FsyncPolicy::Interval(every) = state.policy
                && state.dirty
                && state.last_sync.elapsed() >= every
            {
                let _ = state.sync(shared);
            }
            if state.active_len >= state.segment_bytes && state.rotate(shared, false).is_ok() {
                maybe_compact(shared, tx);
            }
        }
    }
}

/// Answers a command the store can no longer carry out.
fn refuse(cmd: Cmd) {
    match cmd {
        Cmd::Write { ack, .. } => {
            if let Some(ack) = ack {
                let _ = ack.send(Err(StorageError::Closed));
            }
        }
        Cmd::Flush(ack) => {
            let _ = ack.send(Err(StorageError::Closed));
        }
        Cmd::Rotate(ack) => {
            let _ = ack.send(Err(StorageError::Closed));
        }
        Cmd::Close(ack) => {
            if let Some(ack) = ack {
                let _ = ack.send(Err(StorageError::Closed));
            }
        }
    }
}

impl WriterState {
    /// Writes `buf` in one call, syncs if `sync`, then acknowledges `acks`.
    fn commit(
        &mut self,
        shared: &Shared,
        buf: &mut Vec<u8>,
        acks: &mut Vec<Ack<()>>,
        sync: bool,
    ) -> Result<(), StorageError> {
        let mut result = Ok(());
        if !buf.is_empty() {
            match self.active.write_all(buf) {
                Ok(()) => {
                    self.active_len += buf.len() as u64;
                    shared
                        .log_bytes
                        .fetch_add(buf.len() as u64, Ordering::Relaxed);
                    self.dirty = true;
                }
                Err(err) => result = Err(shared.fail("write to the active segment", &err)),
            }
            buf.clear();
        }
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

    fn sync(&mut self, shared: &Shared) -> Result<(), StorageError> {
        if let Err(err) = self.active.sync_data() {
            return Err(shared.fail("fsync of the active segment", &err));
        }
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Seals the active segment (synced) and starts a new one. With `for_compaction`, an id
    /// between the two is reserved for the compaction's output, so the newest segment is
    /// always the active one (the only one that may have a torn tail).
    fn rotate(&mut self, shared: &Shared, for_compaction: bool) -> Result<Rotated, StorageError> {
        if let Err(err) = self.active.sync_all() {
            return Err(shared.fail("fsync of a sealed segment", &err));
        }
        self.dirty = false;
        self.last_sync = Instant::now();
        let compact_id = self.next_id;
        let new_id = if for_compaction {
            self.next_id + 1
        } else {
            self.next_id
        };
        let file = match create_segment(&self.dir, new_id) {
            Ok(file) => file,
            Err(err) => return Err(shared.fail("creating a segment", &err)),
        };
        self.active = file;
        self.active_id = new_id;
        self.active_len = 0;
        self.next_id = new_id + 1;
        Ok(Rotated { compact_id })
    }
}

/// Starts a compaction in the background if the log has grown well past the live data.
fn maybe_compact(shared: &Arc<Shared>, tx: &Sender<Cmd>) {
    let log = shared.log_bytes.load(Ordering::Relaxed);
    let live = shared.index_read().bytes;
    if log < shared.compact_min_bytes || log < live.saturating_mul(2) {
        return;
    }
    if shared.compacting.swap(true, Ordering::AcqRel) {
        return;
    }
    let _ = start_compaction(shared, tx, None);
}

/// Runs [`compact`] on its own thread; `done` receives the outcome.
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
            let result = compact(&thread_shared, &tx);
            thread_shared.compacting.store(false, Ordering::Release);
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
///    as new as anything sealed, or nothing if the key was purged. Superseded records and
///    purged tombstones are therefore left behind.
/// 3. The snapshot is written to a temporary file, synced, renamed into place, and the
///    directory synced; only then are the sealed segments removed (and the directory synced
///    again). A crash at any point leaves either the inputs, or inputs and output together,
///    which recovery merges to the same state.
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
    let dir = &shared.dir;
    let tmp = tmp_path(dir, compact_id);
    let written = (|| -> io::Result<u64> {
        let file = OpenOptions::new().create_new(true).write(true).open(&tmp)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut frame = Vec::new();
        let mut total = 0u64;
        for (key, record) in &snapshot {
            frame.clear();
            // Every stored record was encodable when it was applied.
            if codec::encode_frame(key, record, &mut frame).is_some() {
                out.write_all(&frame)?;
                total += frame.len() as u64;
            }
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&tmp, segment_path(dir, compact_id))?;
        sync_dir(dir)?;
        Ok(total)
    })();
    let written = written.map_err(|err| shared.fail("writing a compacted segment", &err))?;
    let mut removed = 0u64;
    let removal = (|| -> io::Result<()> {
        for id in list_segments(dir)? {
            if id >= compact_id {
                continue;
            }
            let path = segment_path(dir, id);
            removed += fs::metadata(&path)?.len();
            fs::remove_file(&path)?;
            // Oldest first, each removal durable before the next: a crash part-way leaves only
            // newer segments beside the compacted one, so no old value can outlive the (now
            // purged) tombstone that covered it.
            sync_dir(dir)?;
        }
        Ok(())
    })();
    removal.map_err(|err| shared.fail("removing compacted segments", &err))?;
    let _ = shared
        .log_bytes
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |log| {
            Some(log.saturating_sub(removed).saturating_add(written))
        });
    Ok(())
}

/// Queued, unwritten frame bytes above which `never`/`interval` writers wait for their write
/// (back-pressure instead of an unbounded queue).
pub(crate) const MAX_QUEUED_BYTES: u64 = 64 << 20;
