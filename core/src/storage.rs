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
//! - Tombstones are stored like values; they disappear only through [`Storage::purge`].
//! - Records are addressed by key and by ring position ([`key_hash`](crate::hash::key_hash)):
//!   [`Storage::scan`] pages through a [`HashRange`] in `(position, key)` order and
//!   [`Storage::digest`] summarises equal-width buckets of a range, identically on every backend
//!   for identical contents.
//! - Reads return records as stored, including tombstones and expired values; interpreting
//!   them at a point in time is the caller's job ([`Record::live_value`]).

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
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// An I/O error from the underlying files or database.
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Stored data failed validation (checksum, framing, decoding).
    #[error("storage corruption: {0}")]
    Corruption(String),
    /// The store was closed, or failed fatally earlier and refuses further work.
    #[error("storage is closed")]
    Closed,
    /// The backend's configuration is invalid.
    #[error("invalid storage configuration: {0}")]
    Config(String),
    /// The request is outside what the contract allows (for example too many digest buckets).
    #[error("invalid storage request: {0}")]
    InvalidRequest(String),
    /// The backend's own error, described.
    #[error("storage backend error: {0}")]
    Backend(String),
}

/// The result of an apply-if-newer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The record was stored; `previous` is the version it replaced, if any.
    Applied {
        /// Version of the record that was replaced.
        previous: Option<Version>,
    },
    /// An equal or newer record was already stored and was kept.
    Stale {
        /// Version of the record that was kept.
        current: Version,
    },
}

impl ApplyOutcome {
    /// Whether the record was stored.
    pub fn is_applied(&self) -> bool {
        matches!(self, ApplyOutcome::Applied { .. })
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
pub struct StorageStats {
    /// Stored records, tombstones included.
    pub records: u64,
    /// Stored tombstones.
    pub tombstones: u64,
    /// Approximate bytes of keys and records.
    pub bytes: u64,
}

/// What a [`Storage::purge`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PurgeStats {
    /// Tombstones removed after their grace period.
    pub tombstones: u64,
    /// Expired values removed after their grace period.
    pub expired: u64,
}

/// A storage backend. See the [module documentation](self) for the contract.
pub trait Storage: Send + Sync + 'static {
    /// The record stored under `key`, tombstones and expired values included.
    fn get(&self, key: &[u8]) -> impl Future<Output = Result<Option<Record>, StorageError>> + Send;

    /// Atomically stores `record` under `key` unless an equal or newer record is stored.
    fn apply(
        &self,
        key: Bytes,
        record: Record,
    ) -> impl Future<Output = Result<ApplyOutcome, StorageError>> + Send;

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
#[allow(missing_docs)] // Each method mirrors the `Storage` method of the same name.
pub trait DynStorage: Send + Sync + 'static {
    fn get_dyn<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<Option<Record>, StorageError>>;
    fn apply_dyn(
        &self,
        key: Bytes,
        record: Record,
    ) -> BoxFuture<'_, Result<ApplyOutcome, StorageError>>;
    fn scan_dyn(
        &self,
        range: HashRange,
        cursor: Option<ScanCursor>,
        limit: NonZeroUsize,
    ) -> BoxFuture<'_, Result<ScanPage, StorageError>>;
    fn digest_dyn(
        &self,
        range: HashRange,
        buckets: NonZeroU32,
    ) -> BoxFuture<'_, Result<Vec<RangeDigest>, StorageError>>;
    fn purge_dyn(
        &self,
        now_ms: u64,
        grace: Duration,
    ) -> BoxFuture<'_, Result<PurgeStats, StorageError>>;
    fn stats_dyn(&self) -> BoxFuture<'_, Result<StorageStats, StorageError>>;
    fn flush_dyn(&self) -> BoxFuture<'_, Result<(), StorageError>>;
    fn close_dyn(&self) -> BoxFuture<'_, Result<(), StorageError>>;
}

impl<S: Storage> DynStorage for S {
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
