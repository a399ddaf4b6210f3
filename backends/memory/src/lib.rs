//! A volatile, in-memory Chorus storage backend on [`dashmap`].
//!
//! [`MemoryStorage`] keeps every record in a sharded concurrent hash map and **loses everything
//! when the process exits or the store is dropped**: it is meant for tests, simulations, caches
//! and nodes whose replicas can always be rebuilt from their peers by anti-entropy. Nothing is
//! ever written to disk, so [`Storage::flush`] is a no-op.
//!
//! It is registered in a [`Registry`] under [`SCHEME`] (`"memory"`) by [`register`]; the
//! `chorus` facade does this when its `backend-memory` feature is enabled (the default).
//!
//! # Behaviour and costs
//!
//! - [`Storage::apply`] is an atomic apply-if-newer: the compare and the store happen under the
//!   lock of the key's shard, so concurrent writers to one key always end with the
//!   [`Record::merge`] of everything they applied. Writers to keys in other shards do not block
//!   each other.
//! - Beside the map, an index orders the keys by ring position (64 ordered sets cut by the
//!   position's top bits), so [`Storage::scan`] and [`Storage::digest`] read only the range
//!   asked for: O(log n + page) per scan page, O(log n + records in range) per digest. A new
//!   key costs one index insert (under its map shard's lock); overwrites cost nothing more.
//! - [`Storage::apply_batch`] applies each write in turn; metadata
//!   ([`Storage::store_meta`]) and hints ([`Storage::store_hints`]) are maps beside the
//!   records, lost with them.
//! - [`Storage::stats`] is O(1): counters are maintained while the shard lock of each apply is
//!   held (a purge or a `remove_if_version` adjusts them just after each removal). They are
//!   exact whenever no write or removal is in flight, and a momentary approximation while one
//!   races with the read.
//!
//! ```
//! use bytes::Bytes;
//! use chorus_backend_memory::MemoryStorage;
//! use chorus_core::storage::Storage;
//! use chorus_core::{NodeId, Record, Timestamp, Version};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let store = MemoryStorage::new();
//! let v1 = Version::new(Timestamp::new(1_000, 0), NodeId(1));
//! let v2 = Version::new(Timestamp::new(2_000, 0), NodeId(1));
//! assert!(store.apply(Bytes::from("k"), Record::value("new", v2)).await?.is_applied());
//! // An older write arriving late is ignored.
//! assert!(!store.apply(Bytes::from("k"), Record::value("old", v1)).await?.is_applied());
//! assert_eq!(store.get(b"k").await?, Some(Record::value("new", v2)));
//! # Ok::<_, chorus_core::StorageError>(())
//! # }).unwrap();
//! ```

#![deny(missing_docs)]

mod index;

use std::collections::HashMap;
use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use chorus_core::hash::{HashRange, key_hash};
use chorus_core::hlc::Version;
use chorus_core::options::Options;
use chorus_core::record::Record;
use chorus_core::registry::{Registry, StorageSpec};
use chorus_core::storage::{
    ApplyOutcome, Capabilities, Durability, Entry, PurgeStats, RangeDigest, ScanCost, ScanCursor,
    ScanPage, SharedStorage, Storage, StorageError, StorageStats, check_batch_len, check_hint_ids,
    check_hints, check_meta, check_meta_name, empty_digests, footprint, purge_candidates,
};
use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;

/// Registry name of this backend.
pub const SCHEME: &str = "memory";

/// Registers the in-memory backend under [`SCHEME`].
///
/// Every open yields a fresh, empty [`MemoryStorage`]; [`StorageSpec::path`] is ignored. The
/// backend has no options yet, so any entry in [`StorageSpec::options`] is rejected with
/// [`StorageError::Config`] naming it.
///
/// # Panics
///
/// If [`SCHEME`] is already registered in `registry`: each backend crate registers itself once.
pub fn register(registry: &mut Registry) {
    registry
        .register_backend(SCHEME, open)
        .expect("the memory backend is registered once");
}

/// The registry factory: validates `spec` and opens a fresh store.
fn open(spec: &StorageSpec) -> Result<SharedStorage, StorageError> {
    // It takes no options: any is unknown.
    Options::new(format!("the {SCHEME:?} backend"), &spec.options).finish()?;
    Ok(SharedStorage::new(MemoryStorage::new()))
}

/// What the map stores per key: the record and the key's ring position, cached for scans and
/// digests.
#[derive(Clone, Debug)]
struct Slot {
    hash: u64,
    record: Record,
}

/// Index keys fetched at a time by a scan or digest (each fetch holds one index shard's lock).
const WALK_CHUNK: usize = 1024;

/// A volatile in-memory store; see the [crate documentation](crate).
pub struct MemoryStorage {
    map: DashMap<Bytes, Slot>,
    /// Every key of `map` by ring position, for scans and digests.
    index: index::RingIndex,
    closed: AtomicBool,
    /// Stored records, tombstones included.
    records: AtomicU64,
    /// Stored tombstones.
    tombstones: AtomicU64,
    /// Sum of key lengths and [`Record::encoded_len`]s.
    bytes: AtomicU64,
    /// The metadata namespace ([`Storage::store_meta`]), apart from the records.
    meta: Mutex<HashMap<String, Bytes>>,
    /// The hint namespace ([`Storage::store_hints`]), apart from the records.
    hints: Mutex<std::collections::BTreeMap<u64, Bytes>>,
}

impl fmt::Debug for MemoryStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStorage")
            .field("records", &self.records.load(Ordering::Relaxed))
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Default for MemoryStorage {
    fn default() -> Self {
        MemoryStorage::new()
    }
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStorage {
            map: DashMap::new(),
            index: index::RingIndex::default(),
            closed: AtomicBool::new(false),
            records: AtomicU64::new(0),
            tombstones: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
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

    /// Accounts for `record` stored under `key`. Called with the key's shard lock held, so a
    /// record is always counted before it can be uncounted and the counters never underflow.
    fn count_in(&self, key: &[u8], record: &Record) {
        self.records.fetch_add(1, Ordering::Relaxed);
        if record.is_tombstone() {
            self.tombstones.fetch_add(1, Ordering::Relaxed);
        }
        self.bytes
            .fetch_add(footprint(key, record), Ordering::Relaxed);
    }

    /// Reverses [`Self::count_in`] for a record that left the map.
    fn count_out(&self, key: &[u8], record: &Record) {
        self.records.fetch_sub(1, Ordering::Relaxed);
        if record.is_tombstone() {
            self.tombstones.fetch_sub(1, Ordering::Relaxed);
        }
        self.bytes
            .fetch_sub(footprint(key, record), Ordering::Relaxed);
    }

    fn apply_now(&self, key: Bytes, record: Record) -> Result<ApplyOutcome, StorageError> {
        self.check_open()?;
        // The entry holds the shard's write lock until the end of the match: the compare, the
        // store and the counter updates are one atomic step for this key.
        match self.map.entry(key) {
            MapEntry::Occupied(mut occupied) => {
                let current = &occupied.get().record;
                if !record.supersedes(current) {
                    return Ok(ApplyOutcome::Stale {
                        current: current.clone(),
                    });
                }
                let hash = occupied.get().hash;
                self.count_in(occupied.key(), &record);
                let old = occupied.insert(Slot { hash, record });
                self.count_out(occupied.key(), &old.record);
                Ok(ApplyOutcome::Applied {
                    previous: Some(old.record.version),
                })
            }
            MapEntry::Vacant(vacant) => {
                let hash = key_hash(vacant.key());
                self.count_in(vacant.key(), &record);
                self.index.insert(hash, vacant.key().clone());
                let _locked = vacant.insert(Slot { hash, record });
                Ok(ApplyOutcome::Applied { previous: None })
            }
        }
    }

    fn apply_batch_now(
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

    fn meta(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, Bytes>>, StorageError> {
        self.check_open()?;
        Ok(self.meta.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn hints(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, Bytes>>, StorageError>
    {
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
        // One more than the page, to know whether anything remains after it.
        let keep = limit.get().saturating_add(1);
        let mut entries = Vec::new();
        self.walk(
            range,
            cursor.map(|c| (c.hash, c.key)),
            keep,
            |hash, key, slot| {
                entries.push(Entry {
                    hash,
                    key: key.clone(),
                    record: slot.record.clone(),
                });
            },
        )?;
        Ok(ScanPage::from_ordered(entries, limit))
    }

    /// Calls `f` on up to `want` stored records of `range` in scan order, after `after`.
    /// Keys the index lists but a purge removed from the map meanwhile are skipped.
    fn walk(
        &self,
        range: HashRange,
        mut after: Option<(u64, Bytes)>,
        want: usize,
        mut f: impl FnMut(u64, &Bytes, &Slot),
    ) -> Result<(), StorageError> {
        let mut seen = 0;
        while seen < want {
            let asked = (want - seen).min(WALK_CHUNK);
            let keys = self
                .index
                .keys(&range, after.as_ref().map(|(h, k)| (*h, k)), asked);
            let exhausted = keys.len() < asked;
            for (hash, key) in keys {
                if let Some(slot) = self.map.get(&key) {
                    f(hash, &key, &slot);
                    seen += 1;
                }
                after = Some((hash, key));
            }
            if exhausted {
                break;
            }
        }
        self.check_open()
    }

    fn digest_now(
        &self,
        range: HashRange,
        buckets: NonZeroU32,
    ) -> Result<Vec<RangeDigest>, StorageError> {
        self.check_open()?;
        let mut digests = empty_digests(buckets)?;
        self.walk(range, None, usize::MAX, |hash, key, slot| {
            let bucket = range.bucket_of(hash, buckets) as usize;
            digests[bucket].add(slot.record.fingerprint(key));
        })?;
        Ok(digests)
    }

    fn purge_now(&self, now_ms: u64, grace: Duration) -> Result<PurgeStats, StorageError> {
        self.check_open()?;
        // Collect candidates under read locks first: removing while iterating would deadlock on
        // the shard lock the iterator holds.
        let candidates: Vec<Bytes> = self
            .map
            .iter()
            .filter(|item| item.value().record.is_collectable(now_ms, grace))
            .map(|item| item.key().clone())
            .collect();
        Ok(purge_candidates(
            now_ms,
            grace,
            candidates,
            |key, collectable| {
                let (key, slot) = self.map.remove_if(&key, |key, slot| {
                    // Under the map shard's lock, like the insert: index and map agree.
                    let gone = collectable(&slot.record);
                    if gone {
                        self.index.remove(slot.hash, key.clone());
                    }
                    gone
                })?;
                self.count_out(&key, &slot.record);
                Some(slot.record)
            },
        ))
    }

    fn remove_if_version_now(&self, key: &[u8], version: Version) -> Result<bool, StorageError> {
        self.check_open()?;
        // Decided under the map shard's lock, like an apply: a record applied meanwhile has
        // another version and stays, and index and map agree.
        let removed = self.map.remove_if(key, |key, slot| {
            let gone = slot.record.version == version;
            if gone {
                self.index.remove(slot.hash, key.clone());
            }
            gone
        });
        Ok(match removed {
            Some((key, slot)) => {
                self.count_out(&key, &slot.record);
                true
            }
            None => false,
        })
    }

    fn stats_now(&self) -> Result<StorageStats, StorageError> {
        self.check_open()?;
        let records = self.records.load(Ordering::Relaxed);
        let tombstones = self.tombstones.load(Ordering::Relaxed);
        let bytes = self.bytes.load(Ordering::Relaxed);
        // Racing writers can make the separately read counters disagree for a moment.
        Ok(StorageStats::new(records, tombstones.min(records), bytes))
    }

    fn close_now(&self) -> Result<(), StorageError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Err(StorageError::Closed);
        }
        // Release the memory now rather than when the last handle is dropped. The counters are
        // left as they are: nothing can read them any more.
        self.map.clear();
        self.index.clear();
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

impl Storage for MemoryStorage {
    /// Volatile, never evicts, ordered scans.
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(Durability::Volatile, ScanCost::Ordered)
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Record>, StorageError> {
        self.check_open()?;
        Ok(self.map.get(key).map(|slot| slot.record.clone()))
    }

    async fn apply(&self, key: Bytes, record: Record) -> Result<ApplyOutcome, StorageError> {
        self.apply_now(key, record)
    }

    /// Applies each write in turn (each one atomic, the batch as a whole not).
    async fn apply_batch(
        &self,
        writes: Vec<(Bytes, Record)>,
    ) -> Result<Vec<ApplyOutcome>, StorageError> {
        self.apply_batch_now(writes)
    }

    async fn load_meta(&self, name: &str) -> Result<Option<Bytes>, StorageError> {
        check_meta_name(name)?;
        Ok(self.meta()?.get(name).cloned())
    }

    /// Kept in memory only, like the records: lost when the store is closed or dropped.
    async fn store_meta(&self, name: &str, value: Bytes) -> Result<(), StorageError> {
        check_meta(name, &value)?;
        self.meta()?.insert(name.to_owned(), value);
        Ok(())
    }

    /// Kept in memory only, like the records.
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

    async fn remove_if_version(&self, key: &[u8], version: Version) -> Result<bool, StorageError> {
        self.remove_if_version_now(key, version)
    }

    /// A full scan of the map: O(n) in the number of stored records per page.
    async fn scan(
        &self,
        range: HashRange,
        cursor: Option<ScanCursor>,
        limit: NonZeroUsize,
    ) -> Result<ScanPage, StorageError> {
        self.scan_now(range, cursor, limit)
    }

    /// One pass over the map: O(n) in the number of stored records.
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

    async fn stats(&self) -> Result<StorageStats, StorageError> {
        self.stats_now()
    }

    /// Nothing to make durable: a no-op that only checks the store is open.
    async fn flush(&self) -> Result<(), StorageError> {
        self.check_open()
    }

    /// Marks the store closed and drops its contents.
    async fn close(&self) -> Result<(), StorageError> {
        self.close_now()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use chorus_core::hlc::Timestamp;
    use chorus_core::identity::NodeId;

    fn version(ms: u64, node: u64) -> Version {
        Version::new(Timestamp::new(ms, 0), NodeId(node))
    }

    fn key(k: &str) -> Bytes {
        Bytes::copy_from_slice(k.as_bytes())
    }

    /// Stats recomputed by iterating the map, to check the maintained counters.
    fn counted(store: &MemoryStorage) -> StorageStats {
        let mut stats = StorageStats::default();
        for item in store.map.iter() {
            stats.add(item.key(), &item.record);
        }
        stats
    }

    #[tokio::test]
    async fn apply_keeps_the_newer_record() {
        let store = MemoryStorage::new();
        let v10 = Record::value("a", version(10, 1));
        let v20 = Record::value("b", version(20, 1));

        assert_eq!(
            store.apply(key("k"), v10.clone()).await.unwrap(),
            ApplyOutcome::Applied { previous: None }
        );
        assert_eq!(
            store.apply(key("k"), v20.clone()).await.unwrap(),
            ApplyOutcome::Applied {
                previous: Some(v10.version)
            }
        );
        // Older and identical records are stale and report what is kept.
        for record in [v10.clone(), v20.clone()] {
            assert_eq!(
                store.apply(key("k"), record).await.unwrap(),
                ApplyOutcome::Stale {
                    current: v20.clone()
                }
            );
        }
        assert_eq!(store.get(b"k").await.unwrap(), Some(v20.clone()));
        assert_eq!(store.get(b"other").await.unwrap(), None);

        // Same version, different content: the merge's tie-break decides, on every backend.
        let rival = Record::value("c", version(20, 1));
        assert!(rival.supersedes(&v20));
        assert!(
            store
                .apply(key("k"), rival.clone())
                .await
                .unwrap()
                .is_applied()
        );
        assert_eq!(store.get(b"k").await.unwrap(), Some(rival));
    }

    #[tokio::test]
    async fn tombstones_are_stored_and_counted() {
        let store = MemoryStorage::new();
        store
            .apply(key("k"), Record::value("v", version(1, 1)))
            .await
            .unwrap();
        store
            .apply(key("j"), Record::value("w", version(1, 1)))
            .await
            .unwrap();
        let delete = Record::tombstone(version(2, 1));
        assert!(
            store
                .apply(key("k"), delete.clone())
                .await
                .unwrap()
                .is_applied()
        );
        assert_eq!(store.get(b"k").await.unwrap(), Some(delete));

        let stats = store.stats().await.unwrap();
        assert_eq!((stats.records, stats.tombstones), (2, 1));
        assert_eq!(stats, counted(&store));
        assert_eq!(
            stats.bytes,
            2 + 2 * Record::tombstone(version(0, 0)).encoded_len() as u64 + 1
        );
    }

    #[tokio::test]
    async fn purge_removes_only_collectable_records() {
        let store = MemoryStorage::new();
        let grace = Duration::from_millis(100);
        store
            .apply(key("dead"), Record::tombstone(version(1_000, 1)))
            .await
            .unwrap();
        store
            .apply(
                key("ttl"),
                Record::value("v", version(10, 1)).with_expiry(2_000),
            )
            .await
            .unwrap();
        store
            .apply(key("live"), Record::value("v", version(10, 1)))
            .await
            .unwrap();

        assert_eq!(
            store.purge(1_099, grace).await.unwrap(),
            PurgeStats::default()
        );
        assert_eq!(
            store.purge(1_100, grace).await.unwrap(),
            PurgeStats::new(1, 0)
        );
        assert_eq!(
            store.purge(2_100, grace).await.unwrap(),
            PurgeStats::new(0, 1)
        );
        assert_eq!(store.get(b"dead").await.unwrap(), None);
        assert_eq!(store.get(b"ttl").await.unwrap(), None);
        assert!(store.get(b"live").await.unwrap().is_some());
        assert_eq!(store.stats().await.unwrap(), counted(&store));
        assert_eq!(store.stats().await.unwrap().records, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_converge_to_the_merge() {
        let store = Arc::new(MemoryStorage::new());
        let keys = ["a", "b", "c"];
        let mut tasks = Vec::new();
        for writer in 0..4u64 {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                let mut applied = Vec::new();
                for i in 0..500u64 {
                    // Writers interleave their version ranges and walk them in different
                    // directions, so stale and winning writes mix.
                    let ms = if writer % 2 == 0 { i } else { 500 - i };
                    let record = if i % 7 == 0 {
                        Record::tombstone(version(ms, writer))
                    } else {
                        Record::value(format!("{writer}/{i}"), version(ms, writer))
                    };
                    let k = keys[(i as usize + writer as usize) % keys.len()];
                    let outcome = store.apply(key(k), record.clone()).await.unwrap();
                    if let ApplyOutcome::Stale { current } = &outcome {
                        assert!(current.precedence(&record).is_ge());
                    }
                    applied.push((k, record, outcome));
                    if i % 16 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                applied
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        for k in keys {
            let expected = all
                .iter()
                .filter(|(key, ..)| *key == k)
                .map(|(_, record, _)| record.clone())
                .reduce(Record::merge);
            assert_eq!(store.get(k.as_bytes()).await.unwrap(), expected, "key {k}");

            // Outcomes are exact, not just safe: the applied records of a key, in precedence
            // order, form one chain in which each replaced the one before it.
            let mut chain: Vec<(&Record, Option<Version>)> = all
                .iter()
                .filter_map(|(key, record, outcome)| match outcome {
                    ApplyOutcome::Applied { previous } if *key == k => Some((record, *previous)),
                    _ => None,
                })
                .collect();
            chain.sort_by(|a, b| a.0.precedence(b.0));
            let mut before = None;
            for (record, previous) in chain {
                assert_eq!(
                    previous, before,
                    "key {k}: {record:?} replaced the wrong record"
                );
                before = Some(record.version);
            }
            assert_eq!(
                before,
                expected.map(|r| r.version),
                "key {k}: the chain ends with the winner"
            );
        }
        assert_eq!(store.stats().await.unwrap(), counted(&store));
    }

    #[tokio::test]
    async fn closed_store_refuses_work() {
        let store = MemoryStorage::new();
        store
            .apply(key("k"), Record::value("v", version(1, 1)))
            .await
            .unwrap();
        store.flush().await.unwrap();
        store.close().await.unwrap();
        assert!(matches!(store.get(b"k").await, Err(StorageError::Closed)));
        assert!(matches!(
            store
                .apply(key("k"), Record::value("w", version(2, 1)))
                .await,
            Err(StorageError::Closed)
        ));
        assert!(matches!(store.stats().await, Err(StorageError::Closed)));
        assert!(matches!(store.flush().await, Err(StorageError::Closed)));
        assert!(matches!(store.close().await, Err(StorageError::Closed)));
        assert!(store.map.is_empty(), "close releases the records");
    }

    #[test]
    fn registry_factory_rejects_options() {
        let mut registry = Registry::new();
        register(&mut registry);
        assert_eq!(registry.backend_names(), [SCHEME]);
        assert!(registry.open_backend(&StorageSpec::new(SCHEME)).is_ok());

        let mut spec = StorageSpec::new(SCHEME);
        spec.options.insert("capacity".into(), "10".into());
        let err = registry.open_backend(&spec).expect_err("unknown option");
        let text = err.to_string();
        assert!(
            text.contains("`capacity`") && text.contains("takes none"),
            "{text}"
        );
    }
}
