//! A bounded, evicting cache backend for Chorus on [`moka`].
//!
//! **This backend drops data.** [`MokaStorage`] holds at most `capacity_bytes` of keys and
//! records (weighed by key length plus [`Record::encoded_len`]); when it is full, moka's
//! TinyLFU policy decides which entries to evict, and may refuse to admit a new entry at all.
//! Records past their expiry (plus `expiry_grace`) are evicted on their own. Nothing is ever
//! written to disk.
//!
//! What that means for replication: a replica on this backend that evicted a key answers
//! "not found" for it, exactly like a replica that never received the write. Quorum reads
//! still see the record on the other replicas, and read repair and anti-entropy copy it back
//! (until the next eviction). A tombstone evicted before the grace period is over can let an
//! older value come back from a replica that missed the delete. So **never run a key's only
//! replica, or a majority of its replicas, on this backend** unless losing data is acceptable:
//! it is meant for caches and for extra, read-mostly replicas in front of durable ones.
//!
//! It is registered under [`SCHEME`] (`"moka"`) by [`register`]; the `chorus` facade does
//! this with its `backend-moka` feature.
//!
//! # Behaviour and costs
//!
//! - [`Storage::apply`] is an atomic apply-if-newer: moka's `and_compute_with` runs the compare
//!   and the store under a per-key lock. `Applied` means the record was accepted; the cache may
//!   still evict it (or not admit it) at any time after.
//! - Expiry: a value with `expires_at_ms`, or a tombstone (from its write time), is evicted
//!   once `expiry_grace` has passed after it took effect on the wall clock, the same moment
//!   [`Storage::purge`] with that grace would collect it ([`Record::is_collectable`]). With
//!   `expiry_grace = "off"` nothing expires on its own and only `purge` removes such records.
//! - [`Storage::apply_batch`] applies each write in turn. Metadata ([`Storage::store_meta`]) and
//!   hints ([`Storage::store_hints`]) are kept in maps outside the cache: never evicted, lost
//!   when the store is closed or dropped.
//! - The cache is unordered: [`Storage::scan`], [`Storage::digest`], [`Storage::purge`] and
//!   [`Storage::stats`] visit every cached entry (O(n)); a scan page also sorts its matches.
//!
//! ```
//! use bytes::Bytes;
//! use chorus_backend_moka::{MokaOptions, MokaStorage};
//! use chorus_core::storage::Storage;
//! use chorus_core::{NodeId, Record, Timestamp, Version};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let store = MokaStorage::new(MokaOptions::default());
//! let v1 = Version::new(Timestamp::new(1_000, 0), NodeId(1));
//! store.apply(Bytes::from("k"), Record::value("v", v1)).await?;
//! assert_eq!(store.get(b"k").await?, Some(Record::value("v", v1)));
//! # Ok::<_, chorus_core::StorageError>(())
//! # }).unwrap();
//! ```

#![deny(missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chorus_core::hash::{HashRange, key_hash};
use chorus_core::hlc::Version;
use chorus_core::options::{DurationUnit, Options};
use chorus_core::record::{Payload, Record};
use chorus_core::registry::{Registry, StorageSpec};
use chorus_core::storage::{
    ApplyOutcome, Capabilities, Durability, Entry, Eviction, PurgeStats, RangeDigest, ScanCost,
    ScanCursor, ScanPage, SharedStorage, Storage, StorageError, StorageStats, after_cursor,
    check_batch_len, check_hint_ids, check_hints, check_meta, check_meta_name, empty_digests,
    footprint, purge_candidates, scan_order,
};
use moka::ops::compute::Op;
use moka::sync::Cache;

/// Registry name of this backend.
pub const SCHEME: &str = "moka";

/// Registers the moka backend under [`SCHEME`].
///
/// Every open yields a fresh, empty cache; [`StorageSpec::path`] is ignored. Options are those
/// of [`MokaOptions::from_options`].
///
/// # Panics
///
/// If [`SCHEME`] is already registered in `registry`: each backend crate registers itself once.
pub fn register(registry: &mut Registry) {
    registry
        .register_backend(SCHEME, open)
        .expect("the moka backend is registered once");
}

fn open(spec: &StorageSpec) -> Result<SharedStorage, StorageError> {
    let options = MokaOptions::from_options(&spec.options)?;
    Ok(SharedStorage::new(MokaStorage::new(options)))
}

/// Settings of a [`MokaStorage`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MokaOptions {
    /// Most bytes of keys and records kept (option `capacity_bytes`; default 256 MiB).
    pub capacity_bytes: NonZeroU64,
    /// How long after a record became collectable it is evicted on its own, or `None` for
    /// never (option `expiry_grace`: `<n><ms|s>` or `off`; default `0s`).
    pub expiry_grace: Option<Duration>,
}

impl Default for MokaOptions {
    fn default() -> Self {
        MokaOptions {
            capacity_bytes: NonZeroU64::new(256 << 20).expect("non-zero"),
            expiry_grace: Some(Duration::ZERO),
        }
    }
}

impl MokaOptions {
    /// The same options with another capacity.
    pub fn with_capacity_bytes(mut self, capacity_bytes: NonZeroU64) -> Self {
        self.capacity_bytes = capacity_bytes;
        self
    }

    /// The same options with another expiry grace (`None`: nothing expires on its own).
    pub fn with_expiry_grace(mut self, expiry_grace: Option<Duration>) -> Self {
        self.expiry_grace = expiry_grace;
        self
    }

    /// Parses [`StorageSpec::options`]: `capacity_bytes` (a positive integer) and
    /// `expiry_grace` (`off`, or a duration such as `500ms` or `60s`). Anything else, or a
    /// value that does not parse, is a [`StorageError::Config`] naming the option.
    pub fn from_options(options: &BTreeMap<String, String>) -> Result<Self, StorageError> {
        let mut o = Options::new(format!("the {SCHEME:?} backend"), options);
        let default = MokaOptions::default();
        let expiry_grace = match o.string("expiry_grace").map(str::trim) {
            Some("off") => None,
            Some(_) => o.duration("expiry_grace", &[DurationUnit::Millis, DurationUnit::Secs])?,
            None => default.expiry_grace,
        };
        let parsed = MokaOptions {
            capacity_bytes: o.parse("capacity_bytes")?.unwrap_or(default.capacity_bytes),
            expiry_grace,
        };
        o.finish()?;
        Ok(parsed)
    }
}

/// What the cache holds per key: the record and the key's ring position.
#[derive(Clone, Debug)]
struct Slot {
    hash: u64,
    record: Record,
}

/// Evicts records once collectable by the wall clock (see the crate documentation).
struct CollectableExpiry {
    grace: Duration,
}

impl CollectableExpiry {
    fn remaining(&self, record: &Record) -> Option<Duration> {
        let effective_ms = match (&record.payload, record.expires_at_ms) {
            (Payload::Tombstone, _) => record.version.timestamp.physical_ms(),
            (Payload::Value(_), Some(at)) => at,
            (Payload::Value(_), None) => return None,
        };
        let grace_ms = u64::try_from(self.grace.as_millis()).unwrap_or(u64::MAX);
        let due_ms = effective_ms.saturating_add(grace_ms);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Some(Duration::from_millis(due_ms.saturating_sub(now_ms)))
    }
}

impl moka::Expiry<Bytes, Slot> for CollectableExpiry {
    fn expire_after_create(&self, _key: &Bytes, slot: &Slot, _at: Instant) -> Option<Duration> {
        self.remaining(&slot.record)
    }

    fn expire_after_update(
        &self,
        _key: &Bytes,
        slot: &Slot,
        _at: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        self.remaining(&slot.record)
    }
}

/// A bounded, evicting cache store; see the [crate documentation](crate).
pub struct MokaStorage {
    cache: Cache<Bytes, Slot>,
    closed: AtomicBool,
    capabilities: Capabilities,
    /// The metadata namespace ([`Storage::store_meta`]): outside the cache, never evicted.
    meta: Mutex<HashMap<String, Bytes>>,
    /// The hint namespace ([`Storage::store_hints`]): outside the cache, never evicted.
    hints: Mutex<std::collections::BTreeMap<u64, Bytes>>,
}

impl fmt::Debug for MokaStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MokaStorage")
            .field("entries", &self.cache.entry_count())
            .field("weighted_bytes", &self.cache.weighted_size())
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn weight(key: &Bytes, slot: &Slot) -> u32 {
    u32::try_from(footprint(key, &slot.record)).unwrap_or(u32::MAX)
}

impl MokaStorage {
    /// An empty cache.
    pub fn new(options: MokaOptions) -> Self {
        let builder = Cache::builder()
            .max_capacity(options.capacity_bytes.get())
            .weigher(weight);
        let cache = match options.expiry_grace {
            Some(grace) => builder.expire_after(CollectableExpiry { grace }).build(),
            None => builder.build(),
        };
        let eviction = Eviction::new(Some(options.capacity_bytes.get()), options.expiry_grace);
        MokaStorage {
            cache,
            closed: AtomicBool::new(false),
            capabilities: Capabilities::new(Durability::Volatile, ScanCost::FullScan)
                .with_eviction(eviction),
            meta: Mutex::new(HashMap::new()),
            hints: Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    fn check_open(&self) -> Result<(), StorageError> {
        if self.closed.load(Ordering::Acquire) {
            Err(StorageError::Closed)
        } else {
            Ok(())
        }
    }

    fn apply_now(&self, key: Bytes, record: Record) -> Result<ApplyOutcome, StorageError> {
        self.check_open()?;
        let hash = key_hash(&key);
        let mut outcome = None;
        // The closure runs under moka's lock for this key: compare and store are one step.
        self.cache.entry(key).and_compute_with(|current| {
            match current {
                Some(entry) if !record.supersedes(&entry.value().record) => {
                    outcome = Some(ApplyOutcome::Stale {
                        current: entry.value().record.clone(),
                    });
                    return Op::Nop;
                }
                Some(entry) => {
                    outcome = Some(ApplyOutcome::Applied {
                        previous: Some(entry.value().record.version),
                    });
                }
                None => outcome = Some(ApplyOutcome::Applied { previous: None }),
            }
            Op::Put(Slot {
                hash,
                record: record.clone(),
            })
        });
        outcome.ok_or_else(|| StorageError::backend("moka did not run the compute step"))
    }

    fn meta(&self) -> Result<MutexGuard<'_, HashMap<String, Bytes>>, StorageError> {
        self.check_open()?;
        Ok(self.meta.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn hints(
        &self,
    ) -> Result<MutexGuard<'_, std::collections::BTreeMap<u64, Bytes>>, StorageError> {
        self.check_open()?;
        Ok(self.hints.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn scan_now(
        &self,
        range: HashRange,
        cursor: Option<ScanCursor>,
        limit: NonZeroUsize,
    ) -> Result<ScanPage, StorageError> {
        self.check_open()?;
        let mut entries: Vec<Entry> = self
            .cache
            .iter()
            .filter(|(key, slot)| {
                range.contains(slot.hash)
                    && cursor
                        .as_ref()
                        .is_none_or(|c| after_cursor(&range, slot.hash, key, c))
            })
            .map(|(key, slot)| Entry {
                hash: slot.hash,
                key: (*key).clone(),
                record: slot.record,
            })
            .collect();
        entries.sort_unstable_by(|a, b| scan_order(&range, a, b));
        Ok(ScanPage::from_ordered(entries, limit))
    }

    fn digest_now(
        &self,
        range: HashRange,
        buckets: NonZeroU32,
    ) -> Result<Vec<RangeDigest>, StorageError> {
        self.check_open()?;
        let mut digests = empty_digests(buckets)?;
        for (key, slot) in self.cache.iter() {
            if range.contains(slot.hash) {
                digests[range.bucket_of(slot.hash, buckets) as usize]
                    .add(slot.record.fingerprint(&key));
            }
        }
        Ok(digests)
    }

    fn purge_now(&self, now_ms: u64, grace: Duration) -> Result<PurgeStats, StorageError> {
        self.check_open()?;
        let candidates: Vec<Bytes> = self
            .cache
            .iter()
            .filter(|(_, slot)| slot.record.is_collectable(now_ms, grace))
            .map(|(key, _)| (*key).clone())
            .collect();
        Ok(purge_candidates(
            now_ms,
            grace,
            candidates,
            |key, collectable| {
                let mut removed = None;
                // Re-checked under the key's lock: a record replaced meanwhile stays.
                self.cache
                    .entry(key)
                    .and_compute_with(|current| match current {
                        Some(entry) if collectable(&entry.value().record) => {
                            removed = Some(entry.into_value().record);
                            Op::Remove
                        }
                        _ => Op::Nop,
                    });
                removed
            },
        ))
    }

    fn remove_if_version_now(&self, key: &[u8], version: Version) -> Result<bool, StorageError> {
        self.check_open()?;
        let mut removed = false;
        // Decided under moka's lock for the key, like an apply: a record applied meanwhile
        // has another version and stays.
        self.cache
            .entry(Bytes::copy_from_slice(key))
            .and_compute_with(|current| match current {
                Some(entry) if entry.value().record.version == version => {
                    removed = true;
                    Op::Remove
                }
                _ => Op::Nop,
            });
        Ok(removed)
    }

    fn stats_now(&self) -> Result<StorageStats, StorageError> {
        self.check_open()?;
        let mut stats = StorageStats::default();
        for (key, slot) in self.cache.iter() {
            stats.add(&key, &slot.record);
        }
        Ok(stats)
    }
}

impl Storage for MokaStorage {
    /// Volatile, evicting above `capacity_bytes` and (unless `expiry_grace = "off"`) once
    /// records are collectable, full scans.
    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    /// The cached record; `None` if it was never stored, or evicted.
    async fn get(&self, key: &[u8]) -> Result<Option<Record>, StorageError> {
        self.check_open()?;
        Ok(self.cache.get(key).map(|slot| slot.record))
    }

    async fn apply(&self, key: Bytes, record: Record) -> Result<ApplyOutcome, StorageError> {
        self.apply_now(key, record)
    }

    /// Applies each write in turn (each one atomic, the batch as a whole not); the cache may
    /// evict any of them afterwards, as after `apply`.
    async fn apply_batch(
        &self,
        writes: Vec<(Bytes, Record)>,
    ) -> Result<Vec<ApplyOutcome>, StorageError> {
        check_batch_len(writes.len())?;
        self.check_open()?;
        writes
            .into_iter()
            .map(|(key, record)| self.apply_now(key, record))
            .collect()
    }

    async fn load_meta(&self, name: &str) -> Result<Option<Bytes>, StorageError> {
        check_meta_name(name)?;
        Ok(self.meta()?.get(name).cloned())
    }

    /// Kept in memory only, outside the cache (never evicted): lost when the store is closed
    /// or dropped.
    async fn store_meta(&self, name: &str, value: Bytes) -> Result<(), StorageError> {
        check_meta(name, &value)?;
        self.meta()?.insert(name.to_owned(), value);
        Ok(())
    }

    /// Kept in memory, outside the cache: never evicted.
    async fn store_hints(&self, hints: Vec<(u64, Bytes)>) -> Result<(), StorageError> {
        check_hints(&hints)?;
        self.hints()?.extend(hints);
        Ok(())
    }

    async fn load_hints(&self) -> Result<Vec<(u64, Bytes)>, StorageError> {
        Ok(self
            .hints()?
            .iter()
            .map(|(id, blob)| (*id, blob.clone()))
            .collect())
    }

    async fn remove_hints(&self, ids: Vec<u64>) -> Result<(), StorageError> {
        check_hint_ids(&ids)?;
        let mut hints = self.hints()?;
        for id in ids {
            hints.remove(&id);
        }
        Ok(())
    }

    /// Under moka's lock for the key; a record the cache evicted meanwhile is not there to
    /// remove (`false`).
    async fn remove_if_version(&self, key: &[u8], version: Version) -> Result<bool, StorageError> {
        self.remove_if_version_now(key, version)
    }

    /// A full pass over the cache and a sort of the matches: O(n log n) per page.
    async fn scan(
        &self,
        range: HashRange,
        cursor: Option<ScanCursor>,
        limit: NonZeroUsize,
    ) -> Result<ScanPage, StorageError> {
        self.scan_now(range, cursor, limit)
    }

    /// A full pass over the cache: O(n).
    async fn digest(
        &self,
        range: HashRange,
        buckets: NonZeroU32,
    ) -> Result<Vec<RangeDigest>, StorageError> {
        self.digest_now(range, buckets)
    }

    async fn purge(&self, now_ms: u64, grace: Duration) -> Result<PurgeStats, StorageError> {
        self.purge_now(now_ms, grace)
    }

    /// Counts the cached entries: O(n), exact for what is cached at that moment.
    async fn stats(&self) -> Result<StorageStats, StorageError> {
        self.stats_now()
    }

    /// Nothing is durable: a no-op that only checks the store is open.
    async fn flush(&self) -> Result<(), StorageError> {
        self.check_open()
    }

    /// Marks the store closed and drops its contents.
    async fn close(&self) -> Result<(), StorageError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Err(StorageError::Closed);
        }
        self.cache.invalidate_all();
        self.meta
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.hints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_core::hlc::{Timestamp, Version};
    use chorus_core::identity::NodeId;

    fn now_ms() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64
    }

    fn version(ms: u64, node: u64) -> Version {
        Version::new(Timestamp::new(ms, 0), NodeId(node))
    }

    #[test]
    fn options_parse_and_name_the_bad_field() {
        let mut options = BTreeMap::new();
        options.insert("capacity_bytes".to_owned(), "1024".to_owned());
        options.insert("expiry_grace".to_owned(), "off".to_owned());
        let parsed = MokaOptions::from_options(&options).expect("valid");
        assert_eq!(parsed.capacity_bytes.get(), 1024);
        assert_eq!(parsed.expiry_grace, None);
        options.insert("expiry_grace".to_owned(), "250ms".to_owned());
        let parsed = MokaOptions::from_options(&options).expect("valid");
        assert_eq!(parsed.expiry_grace, Some(Duration::from_millis(250)));
        for (name, value) in [
            ("capacity_bytes", "0"),
            ("expiry_grace", "soon"),
            ("path", "/tmp"),
        ] {
            let mut options = BTreeMap::new();
            options.insert(name.to_owned(), value.to_owned());
            let text = MokaOptions::from_options(&options)
                .expect_err("invalid")
                .to_string();
            assert!(text.contains(&format!("`{name}`")), "{text}");
        }
    }

    #[tokio::test]
    async fn records_expire_on_the_wall_clock_after_the_grace() {
        let store = MokaStorage::new(
            MokaOptions::default().with_expiry_grace(Some(Duration::from_millis(50))),
        );
        let now = now_ms();
        let lasting = Record::value("lasting", version(now, 1));
        let short = Record::value("short", version(now, 1)).with_expiry(now + 100);
        let far = Record::value("far", version(now, 1)).with_expiry(now + 3_600_000);
        let old_delete = Record::tombstone(version(now - 60_000, 1));
        for (key, record) in [
            ("lasting", &lasting),
            ("short", &short),
            ("far", &far),
            ("deleted", &old_delete),
        ] {
            store
                .apply(Bytes::from(key), record.clone())
                .await
                .expect("apply");
        }
        // The old tombstone was collectable on arrival; the short value expires after
        // 100 ms + 50 ms of grace. Wait for it (bounded), without asserting any speed.
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.get(b"short").await.expect("get").is_some() {
            assert!(
                Instant::now() < deadline,
                "the short-lived value never expired"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(now_ms() >= now + 150, "evicted before expiry plus grace");
        assert_eq!(store.get(b"deleted").await.expect("get"), None);
        assert_eq!(store.get(b"lasting").await.expect("get"), Some(lasting));
        assert_eq!(store.get(b"far").await.expect("get"), Some(far));
    }

    #[tokio::test]
    async fn capacity_bounds_the_cached_bytes() {
        let capacity = 64 * 1024;
        let store = MokaStorage::new(
            MokaOptions::default().with_capacity_bytes(NonZeroU64::new(capacity).expect("nz")),
        );
        for i in 0..1_000u64 {
            let record = Record::value(vec![0u8; 1_000], version(i + 1, 1));
            store
                .apply(Bytes::from(format!("key-{i}")), record)
                .await
                .expect("apply");
        }
        store.cache.run_pending_tasks();
        let stats = store.stats().await.expect("stats");
        assert!(
            stats.bytes <= capacity && stats.records < 1_000,
            "the cache keeps within its capacity: {stats:?}"
        );
    }
}
