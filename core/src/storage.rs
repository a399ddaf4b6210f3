//! The storage contract every backend implements.
//!
//! Two traits, as in OpenDAL: [`Storage`] is the generic trait backends implement and generic
//! code calls without boxing; [`DynStorage`] is its object-safe twin, implemented for every
//! `Storage` by a blanket impl, used only at the runtime-selected edge (the registry hands out
//! [`SharedStorage`]). `SharedStorage` implements `Storage` again, so code written against
//! `S: Storage` accepts either.
//!
//! # Contract
//!
//! - [`Storage::apply`] is an atomic *apply-if-newer*: under any number of concurrent writers to
//!   one key the stored record ends as the [`Record::merge`] of everything applied, and the
//!   outcome says whether this record won.
//! - Tombstones are stored like values; they disappear only through [`Storage::purge`] or
//!   [`Storage::remove_if_version`].
//! - [`Storage::remove_if_version`] is an atomic *remove-if-unchanged*: it removes a key only
//!   while the stored record still has the version the caller saw, so a write applied in the
//!   meantime is never lost to it (a node drops records it no longer replicates this way,
//!   once their new replicas acknowledged them).
//! - Records are addressed by key and by ring position ([`key_hash`](crate::hash::key_hash)):
//!   [`Storage::scan`] pages through a [`HashRange`] in `(position, key)` order and
//!   [`Storage::digest`] summarises equal-width buckets of a range, identically on every backend
//!   for identical contents.
//! - Reads return records as stored, including tombstones and expired values; interpreting
//!   them at a point in time is the caller's job ([`Record::live_value`]).
//! - A [`Stale`](ApplyOutcome::Stale) outcome carries the record that was kept, tombstone or
//!   value, so a coordinator doing read repair, or a replica answering a write, needs no
//!   second read.
//! - [`Storage::apply_batch`] applies up to [`MAX_BATCH`] writes in order, each with the
//!   meaning and durability promise of one [`Storage::apply`], for the cost of one durable
//!   write of the backend (one group commit, one flush). It is not atomic across writes.
//! - A small **metadata namespace** ([`Storage::load_meta`], [`Storage::store_meta`]) keeps
//!   named values (the HLC floor, a generation) beside the records, as durable as records
//!   ([`Capabilities::durability`]). Names are 1 to [`MAX_META_NAME_LEN`] bytes of
//!   `[a-z0-9._-]`, values at most [`MAX_META_LEN`] bytes ([`check_meta_name`],
//!   [`check_meta`]). Metadata never appears in scans, digests, stats or purges, and survives
//!   closing and reopening a store whose durability [is persistent](Durability::is_persistent).
//! - A **hint namespace** ([`Storage::store_hints`], [`Storage::load_hints`],
//!   [`Storage::remove_hints`]) keeps opaque blobs by a `u64` id for hinted handoff: writes a
//!   coordinator still owes a replica. Blobs are at most [`MAX_HINT_LEN`] bytes, at most
//!   [`MAX_BATCH`] per call ([`check_hints`]). Like metadata, hints are as durable as records,
//!   never appear in scans, digests, stats or purges, are never evicted, and survive closing
//!   and reopening a persistent store.

use std::future::Future;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::hash::HashRange;
use crate::hlc::Version;
use crate::record::Record;
use crate::util::BoxFuture;

/// The most buckets one [`Storage::digest`] call may ask for (16 bytes each).
pub const MAX_DIGEST_BUCKETS: u32 = 1 << 16;

/// The most writes one [`Storage::apply_batch`] call may carry; a longer batch is refused with
/// [`StorageError::InvalidRequest`] ([`check_batch_len`]).
pub const MAX_BATCH: usize = 4096;

/// The longest metadata name, in bytes ([`Storage::store_meta`]).
pub const MAX_META_NAME_LEN: usize = 64;

/// The largest metadata value, in bytes ([`Storage::store_meta`]).
pub const MAX_META_LEN: usize = 4096;

/// [`StorageError::InvalidRequest`] for a batch of more than [`MAX_BATCH`] writes (the length
/// may come from a peer); backends call it before applying anything.
pub fn check_batch_len(len: usize) -> Result<(), StorageError> {
    if len > MAX_BATCH {
        return Err(StorageError::InvalidRequest(format!(
            "a batch of {len} writes; at most {MAX_BATCH} are allowed"
        )));
    }
    Ok(())
}

/// [`StorageError::InvalidRequest`] unless `name` is a valid metadata name: 1 to
/// [`MAX_META_NAME_LEN`] bytes, each one of `a-z`, `0-9`, `.`, `_` and `-`.
pub fn check_meta_name(name: &str) -> Result<(), StorageError> {
    let valid_byte = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b);
    if name.is_empty() || name.len() > MAX_META_NAME_LEN {
        return Err(StorageError::InvalidRequest(format!(
            "a metadata name of {} bytes; names have 1 to {MAX_META_NAME_LEN}",
            name.len()
        )));
    }
    if !name.bytes().all(valid_byte) {
        return Err(StorageError::InvalidRequest(format!(
            "metadata name {name:?} has a byte outside [a-z0-9._-]"
        )));
    }
    Ok(())
}

/// [`check_meta_name`], and [`StorageError::InvalidRequest`] for a value longer than
/// [`MAX_META_LEN`] bytes.
pub fn check_meta(name: &str, value: &[u8]) -> Result<(), StorageError> {
    check_meta_name(name)?;
    if value.len() > MAX_META_LEN {
        return Err(StorageError::InvalidRequest(format!(
            "a metadata value of {} bytes for {name:?}; at most {MAX_META_LEN} are allowed",
            value.len()
        )));
    }
    Ok(())
}

/// The largest hint blob, in bytes ([`Storage::store_hints`]): a key and a record of the
/// largest sizes a node allows, encoded, with room to spare.
pub const MAX_HINT_LEN: usize = 32 << 20;

/// [`StorageError::InvalidRequest`] for more than [`MAX_BATCH`] hints in one call or a blob
/// over [`MAX_HINT_LEN`] bytes; backends call it before storing anything.
pub fn check_hints(hints: &[(u64, Bytes)]) -> Result<(), StorageError> {
    if hints.len() > MAX_BATCH {
        return Err(StorageError::InvalidRequest(format!(
            "{} hints in one call; at most {MAX_BATCH} are allowed",
            hints.len()
        )));
    }
    if let Some((id, blob)) = hints.iter().find(|(_, b)| b.len() > MAX_HINT_LEN) {
        return Err(StorageError::InvalidRequest(format!(
            "hint {id} of {} bytes; at most {MAX_HINT_LEN} are allowed",
            blob.len()
        )));
    }
    Ok(())
}

/// [`StorageError::InvalidRequest`] for more than [`MAX_BATCH`] ids in one
/// [`Storage::remove_hints`].
pub fn check_hint_ids(ids: &[u64]) -> Result<(), StorageError> {
    if ids.len() > MAX_BATCH {
        return Err(StorageError::InvalidRequest(format!(
            "{} hint ids in one call; at most {MAX_BATCH} are allowed",
            ids.len()
        )));
    }
    Ok(())
}

/// A storage backend chosen at run time: a cheap-to-clone handle to any [`Storage`], as the
/// registry hands out.
///
/// A struct, not a bare `Arc<dyn DynStorage>`, for the reason given at
/// [`SharedTransport`](crate::transport::SharedTransport): futures over the bare `dyn` type
/// cannot be passed to `tokio::spawn`.
#[derive(Clone)]
pub struct SharedStorage(Arc<dyn DynStorage>);

impl SharedStorage {
    /// Wraps `storage`.
    pub fn new(storage: impl Storage) -> Self {
        SharedStorage(Arc::new(storage))
    }
}

impl<S: Storage> From<Arc<S>> for SharedStorage {
    fn from(storage: Arc<S>) -> Self {
        SharedStorage(storage)
    }
}

impl std::fmt::Debug for SharedStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedStorage")
    }
}

/// What went wrong inside a backend.
///
/// Each variant says what the failed request did to the stored state, and
/// [`StorageError::is_retryable`] says whether sending the same request again can succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// An I/O error from the underlying files or database.
    ///
    /// State: unknown. An `apply` may have stored its record (it may be readable, and durable
    /// or not); a read changed nothing. Retryable only for transient kinds (interrupted,
    /// would block, timed out): file and sled treat any other I/O failure as fatal and answer
    /// a retry with [`Closed`](Self::Closed).
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Stored data failed validation (checksum, framing, decoding).
    ///
    /// State: the request stored nothing; what is stored is damaged. Not retryable: the same
    /// data fails the same way.
    #[error("storage corruption: {0}")]
    Corruption(String),
    /// The store was closed, or failed fatally earlier and refuses further work.
    ///
    /// State: nothing stored, except by an `apply` that raced the close or the failure: its
    /// record may have reached the store's memory without being made durable. Not retryable
    /// on this store (reopen it).
    #[error("storage is closed")]
    Closed,
    /// The backend's configuration is invalid.
    ///
    /// State: nothing opened or stored. Not retryable without another configuration.
    #[error("invalid storage configuration: {0}")]
    Config(String),
    /// The request is outside what the contract allows (for example too many digest buckets).
    ///
    /// State: nothing stored or changed. Not retryable: the same request is refused again.
    #[error("invalid storage request: {0}")]
    InvalidRequest(String),
    /// The backend's own error, kept as the source.
    ///
    /// State: unknown, as for [`Io`](Self::Io). Not retryable: backends report their transient
    /// failures as `Io` and use this for the rest (bugs, unsupported states).
    #[error("storage backend error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<crate::options::OptionsError> for StorageError {
    fn from(error: crate::options::OptionsError) -> Self {
        StorageError::Config(error.to_string())
    }
}

impl StorageError {
    /// Whether sending the same request again may succeed (see each variant). A retry should
    /// back off; an `apply` is safe to retry, since applying a record twice is idempotent.
    pub fn is_retryable(&self) -> bool {
        match self {
            StorageError::Io(error) => matches!(
                error.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
            ),
            StorageError::Corruption(_)
            | StorageError::Closed
            | StorageError::Config(_)
            | StorageError::InvalidRequest(_)
            | StorageError::Backend(_) => false,
        }
    }

    /// A [`StorageError::Backend`] with `source` as its source.
    pub fn backend(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        StorageError::Backend(source.into())
    }
}

/// The result of an apply-if-newer.
///
/// Callers that only need the winner's version should use [`ApplyOutcome::current_version`]
/// rather than matching every variant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The record was stored; `previous` is the version it replaced, if any.
    Applied {
        /// Version of the record that was replaced.
        previous: Option<Version>,
    },
    /// An equal or newer record was already stored and was kept.
    Stale {
        /// The record that was kept, exactly as stored (value or tombstone, with its expiry):
        /// what a read right after the apply would have returned. Read repair and a replica's
        /// answer can use it without reading again.
        current: Record,
    },
}

impl ApplyOutcome {
    /// Whether the record was stored.
    pub fn is_applied(&self) -> bool {
        matches!(self, ApplyOutcome::Applied { .. })
    }

    /// The version stored under the key when the apply returned: `applied` (the version of
    /// the record that was applied) for `Applied`, the kept record's version for `Stale`.
    pub fn current_version(&self, applied: &Version) -> Version {
        match self {
            ApplyOutcome::Applied { .. } => *applied,
            ApplyOutcome::Stale { current } => current.version,
        }
    }

    /// The record that was kept instead of the one applied, for `Stale`.
    pub fn kept(&self) -> Option<&Record> {
        match self {
            ApplyOutcome::Applied { .. } => None,
            ApplyOutcome::Stale { current } => Some(current),
        }
    }
}

/// One stored record with its key and ring position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Ring position of the key.
    pub hash: u64,
    /// The key.
    #[serde(with = "crate::codec::serde_bytes")]
    pub key: Bytes,
    /// The stored record.
    pub record: Record,
}

/// Where a [`Storage::scan`] resumes: strictly after this `(position, key)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanCursor {
    /// Ring position of the last returned key.
    pub hash: u64,
    /// The last returned key.
    #[serde(with = "crate::codec::serde_bytes")]
    pub key: Bytes,
}

/// One page of a scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// Entries in `(offset from range start, key)` order.
    pub entries: Vec<Entry>,
    /// Where the next page starts; `None` when the range is exhausted.
    pub next: Option<ScanCursor>,
}

impl ScanPage {
    /// The page for `entries` already in scan order, of which a backend collected up to
    /// `limit + 1`: the first `limit` are returned, and an extra one only says the range goes
    /// on, so `next` resumes after the last returned entry.
    pub fn from_ordered(mut entries: Vec<Entry>, limit: NonZeroUsize) -> ScanPage {
        let more = entries.len() > limit.get();
        entries.truncate(limit.get());
        let next = if more {
            entries.last().map(|last| ScanCursor {
                hash: last.hash,
                key: last.key.clone(),
            })
        } else {
            None
        };
        ScanPage { entries, next }
    }
}

/// Zeroed digests for a [`Storage::digest`] of `buckets` buckets, or
/// [`StorageError::InvalidRequest`] for more than [`MAX_DIGEST_BUCKETS`] (the count may come
/// from a peer, and the answer is allocated up front).
pub fn empty_digests(buckets: NonZeroU32) -> Result<Vec<RangeDigest>, StorageError> {
    if buckets.get() > MAX_DIGEST_BUCKETS {
        return Err(StorageError::InvalidRequest(format!(
            "{buckets} digest buckets requested; at most {MAX_DIGEST_BUCKETS} are allowed"
        )));
    }
    Ok(vec![RangeDigest::default(); buckets.get() as usize])
}

/// Summary of one bucket of a range; equal on two replicas iff (with overwhelming probability)
/// they hold the same records in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RangeDigest {
    /// Records in the bucket, tombstones included.
    pub count: u64,
    /// Wrapping sum of [`Record::fingerprint`]s.
    pub hash: u64,
}

impl RangeDigest {
    /// Adds one record.
    pub fn add(&mut self, fingerprint: u64) {
        self.count += 1;
        self.hash = self.hash.wrapping_add(fingerprint);
    }

    /// Combines two digests of disjoint sets (for building Merkle parents).
    pub fn combine(self, other: RangeDigest) -> RangeDigest {
        RangeDigest {
            count: self.count + other.count,
            hash: self.hash.wrapping_add(other.hash),
        }
    }
}

/// Counters a backend reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StorageStats {
    /// Stored records, tombstones included.
    pub records: u64,
    /// Stored tombstones.
    pub tombstones: u64,
    /// Approximate bytes of keys and records.
    pub bytes: u64,
}

impl StorageStats {
    /// Counters with these values.
    pub fn new(records: u64, tombstones: u64, bytes: u64) -> Self {
        StorageStats {
            records,
            tombstones,
            bytes,
        }
    }

    /// Counts one stored record (for backends that count by iterating).
    pub fn add(&mut self, key: &[u8], record: &Record) {
        self.records += 1;
        self.tombstones += u64::from(record.is_tombstone());
        self.bytes += footprint(key, record);
    }
}

/// Bytes a record stored under `key` accounts for in [`StorageStats::bytes`]: the key and
/// [`Record::encoded_len`].
pub fn footprint(key: &[u8], record: &Record) -> u64 {
    (key.len() + record.encoded_len()) as u64
}

/// What a [`Storage::purge`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PurgeStats {
    /// Tombstones removed after their grace period.
    pub tombstones: u64,
    /// Expired values removed after their grace period.
    pub expired: u64,
}

impl PurgeStats {
    /// Counters with these values.
    pub fn new(tombstones: u64, expired: u64) -> Self {
        PurgeStats {
            tombstones,
            expired,
        }
    }

    /// Counts one record the purge removed.
    pub fn count(&mut self, removed: &Record) {
        if removed.is_tombstone() {
            self.tombstones += 1;
        } else {
            self.expired += 1;
        }
    }
}

/// A purge for backends whose iteration cannot remove entries (a sharded map or cache that
/// locks while it iterates): `candidates` are the keys seen collectable, collected first;
/// `remove_if` then removes each one only if it is still collectable by `collectable`,
/// checked under the key's lock (a record replaced meanwhile by one that is not collectable
/// yet stays), and returns the record it removed.
pub fn purge_candidates<K>(
    now_ms: u64,
    grace: Duration,
    candidates: Vec<K>,
    mut remove_if: impl FnMut(K, &dyn Fn(&Record) -> bool) -> Option<Record>,
) -> PurgeStats {
    let collectable = |record: &Record| record.is_collectable(now_ms, grace);
    let mut stats = PurgeStats::default();
    for key in candidates {
        if let Some(removed) = remove_if(key, &collectable) {
            stats.count(&removed);
        }
    }
    stats
}

/// What an acknowledged [`Storage::apply`] has survived by the time it returns. Ordered from
/// weakest to strongest.
///
/// Every `Ok` outcome carries the promise, for a record at least as new as the one applied:
/// `Applied` for the record itself, `Stale` for the equal or newer record it reports (which
/// another writer's apply may have stored and not yet made durable: the `Stale` answer waits
/// for it). Retries, hint replays and read repair rely on this. Reads may see a record before
/// it is as durable as this says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Durability {
    /// Kept in process memory only, and never written anywhere: lost when the store is closed
    /// or dropped, or the process exits (memory, moka).
    Volatile,
    /// Kept in process memory at the ack and written out later (in the background, at
    /// [`Storage::flush`] or [`Storage::close`]): a crash, even of the process alone, can lose
    /// recent acknowledged writes; a clean close keeps them.
    Deferred,
    /// Handed to the operating system before the ack: survives a crash of the process, not
    /// of the machine.
    ProcessCrash,
    /// Synced to stable storage (fsync) before the ack: survives a power loss.
    PowerLoss,
}

impl Durability {
    /// Whether records survive closing and reopening the store (everything but
    /// [`Durability::Volatile`]); what survives a crash is what the level says.
    pub fn is_persistent(self) -> bool {
        self >= Durability::Deferred
    }
}

/// How a backend may drop records on its own, without a [`Storage::purge`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Eviction {
    /// Records are evicted only while the stored bytes ([`StorageStats::bytes`]) exceed this;
    /// `None`: any record may be evicted at any time.
    pub capacity_bytes: Option<u64>,
    /// A record is evicted once it has been collectable ([`Record::is_collectable`]) by the
    /// wall clock for this long; `None`: collectable records stay until a purge.
    pub expires_after: Option<Duration>,
}

impl Eviction {
    /// Eviction above `capacity_bytes` and, with `expires_after`, of collectable records.
    pub fn new(capacity_bytes: Option<u64>, expires_after: Option<Duration>) -> Self {
        Eviction {
            capacity_bytes,
            expires_after,
        }
    }
}

/// What a [`Storage::scan`] or [`Storage::digest`] costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ScanCost {
    /// An ordered index: only the range asked for is read, O(log n + page) per scan page.
    Ordered,
    /// Every stored record is visited on each scan page and digest, whatever the range: O(n).
    FullScan,
}

/// What a backend promises, for callers that must decide by it rather than by backend name
/// (where hints may live, how much an acknowledgement counts, how to page anti-entropy).
///
/// It depends on the backend's configuration and does not change while a store is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Capabilities {
    /// What an acknowledged apply (`Applied` or `Stale`) has survived when it returns, for a
    /// record at least as new as the one applied.
    pub durability: Durability,
    /// How the backend drops records on its own; `None`: it never does, records leave only
    /// through [`Storage::purge`] (or by losing what [`durability`](Self::durability) allows).
    pub eviction: Option<Eviction>,
    /// What scans and digests cost.
    pub scans: ScanCost,
}

impl Capabilities {
    /// A backend with this durability and scan cost that never evicts.
    pub fn new(durability: Durability, scans: ScanCost) -> Self {
        Capabilities {
            durability,
            eviction: None,
            scans,
        }
    }

    /// The same capabilities, evicting as `eviction` says.
    pub fn with_eviction(mut self, eviction: Eviction) -> Self {
        self.eviction = Some(eviction);
        self
    }

    /// Whether a store holding at most `bytes` ([`StorageStats::bytes`]) keeps every record
    /// until it is purged: it never evicts, or evicts only above a capacity of at least
    /// `bytes` and never expires records on its own.
    pub fn keeps_everything_within(&self, bytes: u64) -> bool {
        match self.eviction {
            None => true,
            Some(eviction) => {
                eviction.expires_after.is_none()
                    && eviction
                        .capacity_bytes
                        .is_some_and(|capacity| bytes <= capacity)
            }
        }
    }
}

/// A storage backend. See the [module documentation](self) for the contract.
pub trait Storage: Send + Sync + 'static {
    /// What this store promises (see [`Capabilities`]); the same for the life of the store.
    fn capabilities(&self) -> Capabilities;

    /// The record stored under `key`, tombstones and expired values included.
    fn get(&self, key: &[u8]) -> impl Future<Output = Result<Option<Record>, StorageError>> + Send;

    /// Atomically stores `record` under `key` unless an equal or newer record is stored.
    ///
    /// Either outcome means a record at least this new is as durable as
    /// [`Capabilities::durability`] says: a `Stale` answer waits until the record it reports
    /// is.
    fn apply(
        &self,
        key: Bytes,
        record: Record,
    ) -> impl Future<Output = Result<ApplyOutcome, StorageError>> + Send;

    /// Applies `writes` in order, as if by one [`Storage::apply`] each, and returns one
    /// outcome per write, in the same order.
    ///
    /// Each outcome has the meaning and the durability promise of `apply`'s: when the call
    /// returns, for every write a record at least as new is as durable as
    /// [`Capabilities::durability`] says (`Stale` outcomes included). Backends make the whole
    /// batch durable at once (one group commit, one flush), not write by write.
    ///
    /// - A key may appear more than once: later writes see earlier ones, exactly as sequential
    ///   applies would.
    /// - An empty batch returns an empty vector. More than [`MAX_BATCH`] writes is refused
    ///   with [`StorageError::InvalidRequest`] before anything is applied.
    /// - The batch is **not atomic** across writes: concurrent readers may see some of its
    ///   writes before others, and on an error any subset of the writes may have been applied
    ///   (each one atomically, as for a failed `apply`: readable, and durable or not). Nothing
    ///   says which; since applying a record twice is idempotent, retrying the whole batch is
    ///   safe.
    fn apply_batch(
        &self,
        writes: Vec<(Bytes, Record)>,
    ) -> impl Future<Output = Result<Vec<ApplyOutcome>, StorageError>> + Send;

    /// The metadata value stored under `name`, if any ([module documentation](self)).
    ///
    /// An invalid name ([`check_meta_name`]) is refused with [`StorageError::InvalidRequest`].
    fn load_meta(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<Bytes>, StorageError>> + Send;

    /// Stores `value` under the metadata name `name`, replacing any earlier value.
    ///
    /// On return the value is as durable as [`Capabilities::durability`] says for records
    /// (a volatile backend keeps it in memory only). An invalid name or a value over
    /// [`MAX_META_LEN`] bytes ([`check_meta`]) is refused with
    /// [`StorageError::InvalidRequest`]. Metadata is not a record: it never appears in
    /// scans, digests, stats or purges, and is never evicted.
    fn store_meta(
        &self,
        name: &str,
        value: Bytes,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Stores each `(id, blob)` of the hint namespace ([module documentation](self)),
    /// replacing a blob stored earlier under the same id.
    ///
    /// On return every blob is as durable as [`Capabilities::durability`] says for records.
    /// More than [`MAX_BATCH`] hints or a blob over [`MAX_HINT_LEN`] bytes ([`check_hints`])
    /// is refused with [`StorageError::InvalidRequest`] before anything is stored. Not atomic
    /// across hints: after an error any subset may be stored.
    fn store_hints(
        &self,
        hints: Vec<(u64, Bytes)>,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Every stored hint, in ascending id order.
    fn load_hints(&self) -> impl Future<Output = Result<Vec<(u64, Bytes)>, StorageError>> + Send;

    /// Removes the hints with these ids (ids not stored are ignored); durable as records on
    /// return. More than [`MAX_BATCH`] ids ([`check_hint_ids`]) is refused with
    /// [`StorageError::InvalidRequest`].
    fn remove_hints(&self, ids: Vec<u64>) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Removes the record stored under `key` if, and only if, its version is `version`;
    /// returns whether it removed one.
    ///
    /// The compare and the removal are one atomic step for the key: a record applied
    /// concurrently, or any time after the caller read the one it means, has another version
    /// and stays (`false`), as does a missing key. The removal updates stats, scans and
    /// digests like a purge, and on return is as durable as [`Capabilities::durability`] says
    /// for records: a persistent store that reopens does not bring the record back.
    fn remove_if_version(
        &self,
        key: &[u8],
        version: Version,
    ) -> impl Future<Output = Result<bool, StorageError>> + Send;

    /// Up to `limit` entries of `range` after `cursor`, in `(offset, key)` order.
    fn scan(
        &self,
        range: HashRange,
        cursor: Option<ScanCursor>,
        limit: NonZeroUsize,
    ) -> impl Future<Output = Result<ScanPage, StorageError>> + Send;

    /// Digests of `range` cut into `buckets` equal-width buckets ([`HashRange::bucket_of`]).
    ///
    /// More than [`MAX_DIGEST_BUCKETS`] buckets is refused with
    /// [`StorageError::InvalidRequest`]: the count may come from a peer, and the answer is
    /// allocated up front.
    fn digest(
        &self,
        range: HashRange,
        buckets: NonZeroU32,
    ) -> impl Future<Output = Result<Vec<RangeDigest>, StorageError>> + Send;

    /// Removes tombstones and expired values whose grace period ended by `now_ms`
    /// ([`Record::is_collectable`]).
    fn purge(
        &self,
        now_ms: u64,
        grace: Duration,
    ) -> impl Future<Output = Result<PurgeStats, StorageError>> + Send;

    /// Current counters.
    fn stats(&self) -> impl Future<Output = Result<StorageStats, StorageError>> + Send;

    /// Makes everything applied so far durable (a no-op for volatile backends).
    fn flush(&self) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Flushes and releases resources; later calls fail with [`StorageError::Closed`].
    fn close(&self) -> impl Future<Output = Result<(), StorageError>> + Send;
}

/// The object-safe form of [`Storage`]; implemented for every `Storage`.
///
/// Each method mirrors the [`Storage`] method of the same name without `_dyn`, with the same
/// contract, returning a boxed future.
pub trait DynStorage: Send + Sync + 'static {
    /// [`Storage::capabilities`].
    fn capabilities_dyn(&self) -> Capabilities;
    /// [`Storage::get`].
    fn get_dyn<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<Option<Record>, StorageError>>;
    /// [`Storage::apply`].
    fn apply_dyn(
        &self,
        key: Bytes,
        record: Record,
    ) -> BoxFuture<'_, Result<ApplyOutcome, StorageError>>;
    /// [`Storage::apply_batch`]: one outcome per write, in order; at most [`MAX_BATCH`]
    /// writes; not atomic across writes.
    fn apply_batch_dyn(
        &self,
        writes: Vec<(Bytes, Record)>,
    ) -> BoxFuture<'_, Result<Vec<ApplyOutcome>, StorageError>>;
    /// [`Storage::load_meta`]: the metadata value under `name`, if any.
    fn load_meta_dyn<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StorageError>>;
    /// [`Storage::store_meta`]: stores a metadata value, as durable as records.
    fn store_meta_dyn<'a>(
        &'a self,
        name: &'a str,
        value: Bytes,
    ) -> BoxFuture<'a, Result<(), StorageError>>;
    /// [`Storage::store_hints`].
    fn store_hints_dyn(&self, hints: Vec<(u64, Bytes)>) -> BoxFuture<'_, Result<(), StorageError>>;
    /// [`Storage::load_hints`].
    fn load_hints_dyn(&self) -> BoxFuture<'_, Result<Vec<(u64, Bytes)>, StorageError>>;
    /// [`Storage::remove_hints`].
    fn remove_hints_dyn(&self, ids: Vec<u64>) -> BoxFuture<'_, Result<(), StorageError>>;
    /// [`Storage::remove_if_version`].
    fn remove_if_version_dyn<'a>(
        &'a self,
        key: &'a [u8],
        version: Version,
    ) -> BoxFuture<'a, Result<bool, StorageError>>;
    /// [`Storage::scan`].
    fn scan_dyn(
        &self,
        range: HashRange,
        cursor: Option<ScanCursor>,
        limit: NonZeroUsize,
    ) -> BoxFuture<'_, Result<ScanPage, StorageError>>;
    /// [`Storage::digest`].
    fn digest_dyn(
        &self,
        range: HashRange,
        buckets: NonZeroU32,
    ) -> BoxFuture<'_, Result<Vec<RangeDigest>, StorageError>>;
    /// [`Storage::purge`].
    fn purge_dyn(
        &self,
        now_ms: u64,
        grace: Duration,
    ) -> BoxFuture<'_, Result<PurgeStats, StorageError>>;
    /// [`Storage::stats`].
    fn stats_dyn(&self) -> BoxFuture<'_, Result<StorageStats, StorageError>>;
    /// [`Storage::flush`].
    fn flush_dyn(&self) -> BoxFuture<'_, Result<(), StorageError>>;
    /// [`Storage::close`].
    fn close_dyn(&self) -> BoxFuture<'_, Result<(), StorageError>>;
}

impl<S: Storage> DynStorage for S {
    fn capabilities_dyn(&self) -> Capabilities {
        self.capabilities()
    }
    fn get_dyn<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<Option<Record>, StorageError>> {
        Box::pin(self.get(key))
    }
    fn apply_dyn(
        &self,
        key: Bytes,
        record: Record,
    ) -> BoxFuture<'_, Result<ApplyOutcome, StorageError>> {
        Box::pin(self.apply(key, record))
    }
    fn apply_batch_dyn(
        &self,
        writes: Vec<(Bytes, Record)>,
    ) -> BoxFuture<'_, Result<Vec<ApplyOutcome>, StorageError>> {
        Box::pin(self.apply_batch(writes))
    }
    fn load_meta_dyn<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StorageError>> {
        Box::pin(self.load_meta(name))
    }
    fn store_meta_dyn<'a>(
        &'a self,
        name: &'a str,
        value: Bytes,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(self.store_meta(name, value))
    }
    fn store_hints_dyn(&self, hints: Vec<(u64, Bytes)>) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(self.store_hints(hints))
    }
    fn load_hints_dyn(&self) -> BoxFuture<'_, Result<Vec<(u64, Bytes)>, StorageError>> {
        Box::pin(self.load_hints())
    }
    fn remove_hints_dyn(&self, ids: Vec<u64>) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(self.remove_hints(ids))
    }
    fn remove_if_version_dyn<'a>(
        &'a self,
        key: &'a [u8],
        version: Version,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(self.remove_if_version(key, version))
    }
    fn scan_dyn(
        &self,
        range: HashRange,
        cursor: Option<ScanCursor>,
        limit: NonZeroUsize,
    ) -> BoxFuture<'_, Result<ScanPage, StorageError>> {
        Box::pin(self.scan(range, cursor, limit))
    }
    fn digest_dyn(
        &self,
        range: HashRange,
        buckets: NonZeroU32,
    ) -> BoxFuture<'_, Result<Vec<RangeDigest>, StorageError>> {
        Box::pin(self.digest(range, buckets))
    }
    fn purge_dyn(
        &self,
        now_ms: u64,
        grace: Duration,
    ) -> BoxFuture<'_, Result<PurgeStats, StorageError>> {
        Box::pin(self.purge(now_ms, grace))
    }
    fn stats_dyn(&self) -> BoxFuture<'_, Result<StorageStats, StorageError>> {
        Box::pin(self.stats())
    }
    fn flush_dyn(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(self.flush())
    }
    fn close_dyn(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(self.close())
    }
}

impl Storage for SharedStorage {
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities_dyn()
    }
    // `async fn` lets the future capture both elided lifetimes.
    async fn get(&self, key: &[u8]) -> Result<Option<Record>, StorageError> {
        self.0.get_dyn(key).await
    }
    fn apply(
        &self,
        key: Bytes,
        record: Record,
    ) -> impl Future<Output = Result<ApplyOutcome, StorageError>> + Send {
        self.0.apply_dyn(key, record)
    }
    fn apply_batch(
        &self,
        writes: Vec<(Bytes, Record)>,
    ) -> impl Future<Output = Result<Vec<ApplyOutcome>, StorageError>> + Send {
        self.0.apply_batch_dyn(writes)
    }
    async fn load_meta(&self, name: &str) -> Result<Option<Bytes>, StorageError> {
        self.0.load_meta_dyn(name).await
    }
    async fn store_meta(&self, name: &str, value: Bytes) -> Result<(), StorageError> {
        self.0.store_meta_dyn(name, value).await
    }
    fn store_hints(
        &self,
        hints: Vec<(u64, Bytes)>,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.0.store_hints_dyn(hints)
    }
    fn load_hints(&self) -> impl Future<Output = Result<Vec<(u64, Bytes)>, StorageError>> + Send {
        self.0.load_hints_dyn()
    }
    fn remove_hints(&self, ids: Vec<u64>) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.0.remove_hints_dyn(ids)
    }
    async fn remove_if_version(&self, key: &[u8], version: Version) -> Result<bool, StorageError> {
        self.0.remove_if_version_dyn(key, version).await
    }
    fn scan(
        &self,
        range: HashRange,
        cursor: Option<ScanCursor>,
        limit: NonZeroUsize,
    ) -> impl Future<Output = Result<ScanPage, StorageError>> + Send {
        self.0.scan_dyn(range, cursor, limit)
    }
    fn digest(
        &self,
        range: HashRange,
        buckets: NonZeroU32,
    ) -> impl Future<Output = Result<Vec<RangeDigest>, StorageError>> + Send {
        self.0.digest_dyn(range, buckets)
    }
    fn purge(
        &self,
        now_ms: u64,
        grace: Duration,
    ) -> impl Future<Output = Result<PurgeStats, StorageError>> + Send {
        self.0.purge_dyn(now_ms, grace)
    }
    fn stats(&self) -> impl Future<Output = Result<StorageStats, StorageError>> + Send {
        self.0.stats_dyn()
    }
    fn flush(&self) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.0.flush_dyn()
    }
    fn close(&self) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.0.close_dyn()
    }
}

/// Orders entries the way [`Storage::scan`] returns them: by offset from `range.start`, then key.
///
/// Backends without a native ordered index (such as a hash map) can collect matching entries
/// and sort with this.
pub fn scan_order(range: &HashRange, a: &Entry, b: &Entry) -> std::cmp::Ordering {
    range
        .offset(a.hash)
        .cmp(&range.offset(b.hash))
        .then_with(|| a.key.cmp(&b.key))
}

/// Whether `(hash, key)` comes strictly after `cursor` in scan order over `range`.
///
/// A cursor whose position lies outside `range` orders by its offset like any other, so a
/// cursor from before the range's start (offsets wrap to large values) admits nothing: pass
/// cursors only back to the range that produced them.
pub fn after_cursor(range: &HashRange, hash: u64, key: &[u8], cursor: &ScanCursor) -> bool {
    range
        .offset(hash)
        .cmp(&range.offset(cursor.hash))
        .then_with(|| key.cmp(&cursor.key[..]))
        .is_gt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Timestamp;
    use crate::identity::NodeId;

    fn version(ms: u64) -> Version {
        Version::new(Timestamp::new(ms, 0), NodeId(1))
    }

    #[test]
    fn options_errors_become_config_errors_that_name_the_key() {
        let map = std::collections::BTreeMap::new();
        let options = crate::options::Options::new("the test backend", &map);
        let err = StorageError::from(options.missing("path", "a directory"));
        assert!(
            matches!(&err, StorageError::Config(m)
                if m == "option `path` of the test backend is required: a directory"),
            "{err}"
        );
    }

    #[test]
    fn only_transient_io_errors_are_retryable_and_backend_errors_keep_their_source() {
        let busy = StorageError::from(std::io::Error::from(std::io::ErrorKind::Interrupted));
        assert!(busy.is_retryable());
        for err in [
            StorageError::from(std::io::Error::other("disk failed")),
            StorageError::from(std::io::Error::from(std::io::ErrorKind::StorageFull)),
            StorageError::Corruption("bad".into()),
            StorageError::Closed,
            StorageError::Config("bad".into()),
            StorageError::InvalidRequest("bad".into()),
        ] {
            assert!(!err.is_retryable(), "{err}");
        }
        let backend = StorageError::backend(std::io::Error::other("inner"));
        assert!(!backend.is_retryable());
        let source = std::error::Error::source(&backend).expect("kept");
        assert_eq!(source.to_string(), "inner");
    }

    #[test]
    fn batch_lengths_and_metadata_names_and_values_are_bounded() {
        assert!(check_batch_len(0).is_ok());
        assert!(check_batch_len(MAX_BATCH).is_ok());
        assert!(matches!(
            check_batch_len(MAX_BATCH + 1),
            Err(StorageError::InvalidRequest(_))
        ));
        let longest = "a".repeat(MAX_META_NAME_LEN);
        for name in [
            "hlc.floor",
            "generation",
            "a",
            "0-9_.",
            "..",
            longest.as_str(),
        ] {
            assert!(check_meta_name(name).is_ok(), "{name:?}");
        }
        let too_long = "a".repeat(MAX_META_NAME_LEN + 1);
        for name in [
            "",
            "Upper",
            "a/b",
            "a b",
            "caf\u{e9}",
            "x\0",
            too_long.as_str(),
        ] {
            assert!(
                matches!(check_meta_name(name), Err(StorageError::InvalidRequest(_))),
                "{name:?}"
            );
        }
        assert!(check_meta("n", &[0; MAX_META_LEN]).is_ok());
        assert!(matches!(
            check_meta("n", &[0; MAX_META_LEN + 1]),
            Err(StorageError::InvalidRequest(_))
        ));
        assert!(matches!(
            check_meta("N", b""),
            Err(StorageError::InvalidRequest(_))
        ));
    }

    #[test]
    fn outcomes_report_the_current_version_and_the_kept_record() {
        let kept = Record::tombstone(version(9));
        let stale = ApplyOutcome::Stale {
            current: kept.clone(),
        };
        assert_eq!(stale.current_version(&version(3)), version(9));
        assert_eq!(stale.kept(), Some(&kept));
        let applied = ApplyOutcome::Applied { previous: None };
        assert_eq!(applied.current_version(&version(3)), version(3));
        assert_eq!(applied.kept(), None);
    }

    #[test]
    fn durability_is_ordered_and_persistence_starts_at_deferred() {
        assert!(Durability::Volatile < Durability::Deferred);
        assert!(Durability::ProcessCrash < Durability::PowerLoss);
        assert!(!Durability::Volatile.is_persistent());
        assert!(Durability::Deferred.is_persistent());
    }

    #[test]
    fn what_a_store_keeps_follows_its_eviction() {
        let never = Capabilities::new(Durability::Volatile, ScanCost::FullScan);
        assert!(never.keeps_everything_within(u64::MAX));
        let bounded = never.with_eviction(Eviction::new(Some(100), None));
        assert!(bounded.keeps_everything_within(100));
        assert!(!bounded.keeps_everything_within(101));
        let expiring = never.with_eviction(Eviction::new(Some(100), Some(Duration::ZERO)));
        assert!(!expiring.keeps_everything_within(1));
        let anytime = never.with_eviction(Eviction::new(None, None));
        assert!(!anytime.keeps_everything_within(1));
    }

    #[test]
    fn purge_candidates_counts_only_what_is_still_collectable() {
        let grace = Duration::from_millis(10);
        let mut stored = [
            Some(Record::tombstone(version(1))),
            Some(Record::value("v", version(1)).with_expiry(5)),
            // Replaced after it was seen collectable: stays.
            Some(Record::value("new", version(2))),
        ];
        let stats = purge_candidates(100, grace, vec![0, 1, 2], |i, collectable| {
            stored[i].take_if(|record| collectable(record))
        });
        assert_eq!(stats, PurgeStats::new(1, 1));
        assert!(stored[2].is_some());
        let mut counted = StorageStats::default();
        counted.add(b"k", &Record::tombstone(version(1)));
        assert_eq!(
            counted,
            StorageStats::new(1, 1, footprint(b"k", &Record::tombstone(version(1))))
        );
    }
}
