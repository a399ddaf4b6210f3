//! The conformance suite must be able to fail: a deliberately simple reference backend passes
//! every check, and each bug planted in it is caught by the checks meant to catch it.

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use chorus::hash::{HashRange, key_hash};
use chorus::record::Record;
use chorus::storage::{
    ApplyOutcome, Capabilities, Durability, Entry, PurgeStats, RangeDigest, ScanCost, ScanCursor,
    ScanPage, SharedStorage, Storage, StorageError, StorageStats, after_cursor, check_batch_len,
    check_hint_ids, check_hints, check_meta, check_meta_name, scan_order,
};
use chorus_tests::conformance::{self, Backend, Check};

/// A planted bug.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    None,
    /// `apply` always claims it stored the record over nothing.
    BlindOutcome,
    /// `get` hides tombstones.
    HideTombstones,
    /// A scan page after a cursor drops its first entry.
    SkipAfterCursor,
    /// A full page never says that more remain.
    EarlyEnd,
    /// Digest buckets come back in reverse order.
    SwappedBuckets,
    /// `purge` ignores the grace period.
    NoGrace,
    /// `close` does nothing.
    CloseIgnored,
    /// `stats` never counts tombstones.
    NoTombstoneStats,
    /// `apply` reads, yields, then writes: concurrent writers lose updates.
    RacyApply,
    /// Claims never to evict, but drops records collectable by the wall clock.
    SilentEviction,
    /// A `Stale` outcome reports the refused (incoming) record instead of the kept one.
    StaleReturnsIncoming,
    /// `apply_batch` reports an outcome for its last write but never stores it.
    BatchSkipsWrite,
    /// `apply_batch` accepts batches of any length.
    BatchUnbounded,
    /// Metadata is kept as records (under `meta/<name>`), so scans and stats see it.
    MetaAsRecords,
    /// Names and values are not validated.
    MetaUnchecked,
    /// `purge` drops the metadata too.
    MetaPurged,
    /// `remove_hints` removes nothing.
    HintsNotRemoved,
    /// `purge` drops the hints too.
    HintsPurged,
    /// Hint blobs and batches are not bounded.
    HintsUnchecked,
    /// `remove_if_version` removes whatever is stored, whatever its version.
    RemoveIgnoresVersion,
    /// `remove_if_version` removes the record but answers `false`.
    RemoveUnreported,
}

/// A mutex around a sorted map; correct unless a bug is planted.
#[derive(Debug)]
struct Reference {
    bug: Bug,
    map: Mutex<BTreeMap<Bytes, Record>>,
    meta: Mutex<BTreeMap<String, Bytes>>,
    hints: Mutex<BTreeMap<u64, Bytes>>,
    closed: AtomicBool,
}

impl Reference {
    fn backend(bug: Bug) -> Backend {
        Backend::new(format!("reference({bug:?})"), move || {
            SharedStorage::new(Reference {
                bug,
                map: Mutex::default(),
                meta: Mutex::default(),
                hints: Mutex::default(),
                closed: AtomicBool::new(false),
            })
        })
    }

    fn map(&self) -> Result<MutexGuard<'_, BTreeMap<Bytes, Record>>, StorageError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        Ok(self.map.lock().expect("not poisoned"))
    }

    fn meta(&self) -> Result<MutexGuard<'_, BTreeMap<String, Bytes>>, StorageError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        Ok(self.meta.lock().expect("not poisoned"))
    }

    fn hints(&self) -> Result<MutexGuard<'_, BTreeMap<u64, Bytes>>, StorageError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        Ok(self.hints.lock().expect("not poisoned"))
    }

    fn meta_key(name: &str) -> Bytes {
        Bytes::from(format!("meta/{name}"))
    }

    /// The outcome of applying `record` over `stored`, and whether to store it.
    fn decide(&self, stored: Option<&Record>, record: &Record) -> (ApplyOutcome, bool) {
        match stored {
            None => (ApplyOutcome::Applied { previous: None }, true),
            Some(current) if record.supersedes(current) => (
                ApplyOutcome::Applied {
                    previous: Some(current.version),
                },
                true,
            ),
            Some(current) => {
                let current = if self.bug == Bug::StaleReturnsIncoming {
                    record.clone()
                } else {
                    current.clone()
                };
                (ApplyOutcome::Stale { current }, false)
            }
        }
    }
}

impl Storage for Reference {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(Durability::Volatile, ScanCost::FullScan)
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Record>, StorageError> {
        if self.bug == Bug::SilentEviction {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            self.map()?
                .retain(|_, record| !record.is_collectable(now_ms, Duration::ZERO));
        }
        let record = self.map()?.get(key).cloned();
        Ok(record.filter(|r| !(self.bug == Bug::HideTombstones && r.is_tombstone())))
    }

    async fn apply(&self, key: Bytes, record: Record) -> Result<ApplyOutcome, StorageError> {
        if self.bug == Bug::RacyApply {
            let current = self.map()?.get(&key).cloned();
            tokio::task::yield_now().await;
            return Ok(match current {
                Some(current) if !record.supersedes(&current) => ApplyOutcome::Stale { current },
                current => {
                    self.map()?.insert(key, record);
                    ApplyOutcome::Applied {
                        previous: current.map(|c| c.version),
                    }
                }
            });
        }
        let mut map = self.map()?;
        let (outcome, store) = self.decide(map.get(&key), &record);
        if store {
            map.insert(key, record);
        }
        Ok(if self.bug == Bug::BlindOutcome {
            ApplyOutcome::Applied { previous: None }
        } else {
            outcome
        })
    }

    async fn apply_batch(
        &self,
        writes: Vec<(Bytes, Record)>,
    ) -> Result<Vec<ApplyOutcome>, StorageError> {
        if self.bug != Bug::BatchUnbounded {
            check_batch_len(writes.len())?;
        }
        let mut map = self.map()?;
        let last = writes.len().saturating_sub(1);
        let mut outcomes = Vec::with_capacity(writes.len());
        for (i, (key, record)) in writes.into_iter().enumerate() {
            let (outcome, store) = self.decide(map.get(&key), &record);
            if store && !(self.bug == Bug::BatchSkipsWrite && i == last) {
                map.insert(key, record);
            }
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    async fn load_meta(&self, name: &str) -> Result<Option<Bytes>, StorageError> {
        if self.bug != Bug::MetaUnchecked {
            check_meta_name(name)?;
        }
        if self.bug == Bug::MetaAsRecords {
            let record = self.map()?.get(&Self::meta_key(name)).cloned();
            return Ok(record.and_then(|r| r.live_value(0).cloned()));
        }
        Ok(self.meta()?.get(name).cloned())
    }

    async fn store_meta(&self, name: &str, value: Bytes) -> Result<(), StorageError> {
        if self.bug != Bug::MetaUnchecked {
            check_meta(name, &value)?;
        }
        if self.bug == Bug::MetaAsRecords {
            let version = chorus::hlc::Version::new(
                chorus::hlc::Timestamp::new(u64::MAX >> 20, 0),
                chorus::identity::NodeId(0),
            );
            self.map()?
                .insert(Self::meta_key(name), Record::value(value, version));
            return Ok(());
        }
        self.meta()?.insert(name.to_owned(), value);
        Ok(())
    }

    async fn store_hints(&self, hints: Vec<(u64, Bytes)>) -> Result<(), StorageError> {
        if self.bug != Bug::HintsUnchecked {
            check_hints(&hints)?;
        }
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
        if self.bug != Bug::HintsUnchecked {
            check_hint_ids(&ids)?;
        }
        let mut hints = self.hints()?;
        if self.bug != Bug::HintsNotRemoved {
            for id in ids {
                hints.remove(&id);
            }
        }
        Ok(())
    }

    async fn remove_if_version(
        &self,
        key: &[u8],
        version: chorus::hlc::Version,
    ) -> Result<bool, StorageError> {
        let mut map = self.map()?;
        let matches = map
            .get(key)
            .is_some_and(|r| r.version == version || self.bug == Bug::RemoveIgnoresVersion);
        if matches {
            map.remove(key);
        }
        Ok(matches && self.bug != Bug::RemoveUnreported)
    }

    async fn scan(
        &self,
        range: HashRange,
        cursor: Option<ScanCursor>,
        limit: NonZeroUsize,
    ) -> Result<ScanPage, StorageError> {
        let mut entries: Vec<Entry> = self
            .map()?
            .iter()
            .map(|(key, record)| Entry {
                hash: key_hash(key),
                key: key.clone(),
                record: record.clone(),
            })
            .filter(|e| range.contains(e.hash))
            .filter(|e| {
                cursor
                    .as_ref()
                    .is_none_or(|c| after_cursor(&range, e.hash, &e.key, c))
            })
            .collect();
        entries.sort_by(|a, b| scan_order(&range, a, b));
        if self.bug == Bug::SkipAfterCursor && cursor.is_some() && !entries.is_empty() {
            entries.remove(0);
        }
        let more = entries.len() > limit.get() && self.bug != Bug::EarlyEnd;
        entries.truncate(limit.get());
        let next = more.then(|| {
            entries.last().map(|e| ScanCursor {
                hash: e.hash,
                key: e.key.clone(),
            })
        });
        Ok(ScanPage {
            entries,
            next: next.flatten(),
        })
    }

    async fn digest(
        &self,
        range: HashRange,
        buckets: NonZeroU32,
    ) -> Result<Vec<RangeDigest>, StorageError> {
        if buckets.get() > chorus::storage::MAX_DIGEST_BUCKETS {
            return Err(StorageError::InvalidRequest("too many buckets".into()));
        }
        let mut digests = vec![RangeDigest::default(); buckets.get() as usize];
        for (key, record) in self.map()?.iter() {
            let hash = key_hash(key);
            if range.contains(hash) {
                digests[range.bucket_of(hash, buckets) as usize].add(record.fingerprint(key));
            }
        }
        if self.bug == Bug::SwappedBuckets {
            digests.reverse();
        }
        Ok(digests)
    }

    async fn purge(&self, now_ms: u64, grace: Duration) -> Result<PurgeStats, StorageError> {
        let grace = if self.bug == Bug::NoGrace {
            Duration::ZERO
        } else {
            grace
        };
        if self.bug == Bug::MetaPurged {
            self.meta()?.clear();
        }
        if self.bug == Bug::HintsPurged {
            self.hints()?.clear();
        }
        let mut stats = PurgeStats::default();
        self.map()?.retain(|_, record| {
            let collect = record.is_collectable(now_ms, grace);
            if collect {
                stats.count(record);
            }
            !collect
        });
        Ok(stats)
    }

    async fn stats(&self) -> Result<StorageStats, StorageError> {
        let map = self.map()?;
        let mut stats = StorageStats::default();
        for (key, record) in map.iter() {
            stats.add(key, record);
            if record.is_tombstone() && self.bug == Bug::NoTombstoneStats {
                stats.tombstones -= 1;
            }
        }
        Ok(stats)
    }

    async fn flush(&self) -> Result<(), StorageError> {
        self.map().map(drop)
    }

    async fn close(&self) -> Result<(), StorageError> {
        if self.bug == Bug::CloseIgnored {
            return Ok(());
        }
        if self.closed.swap(true, Ordering::AcqRel) {
            return Err(StorageError::Closed);
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reference_backend_passes_every_check() {
    let seed = conformance::seed();
    let failures = conformance::run_all(&Reference::backend(Bug::None), seed).await;
    let report: Vec<String> = failures.iter().map(ToString::to_string).collect();
    assert!(failures.is_empty(), "{}", report.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_planted_bug_is_caught() {
    use conformance::{
        BATCH, CAPABILITIES, CLOSED, EXPIRY, HINTS, META, MODEL, RANGES, REMOVE, STALE, TOMBSTONES,
    };
    let cases: [(Bug, &[Check]); 20] = [
        (Bug::BlindOutcome, &[MODEL, TOMBSTONES]),
        (Bug::HideTombstones, &[MODEL, TOMBSTONES]),
        (Bug::SkipAfterCursor, &[MODEL, RANGES]),
        (Bug::EarlyEnd, &[MODEL, RANGES]),
        (Bug::SwappedBuckets, &[MODEL, RANGES]),
        (Bug::NoGrace, &[TOMBSTONES, EXPIRY]),
        (Bug::CloseIgnored, &[CLOSED]),
        (Bug::NoTombstoneStats, &[MODEL, TOMBSTONES]),
        (Bug::SilentEviction, &[CAPABILITIES]),
        (
            Bug::StaleReturnsIncoming,
            &[STALE, MODEL, BATCH, TOMBSTONES],
        ),
        (Bug::BatchSkipsWrite, &[BATCH]),
        (Bug::BatchUnbounded, &[BATCH]),
        (Bug::MetaAsRecords, &[META]),
        (Bug::MetaUnchecked, &[META]),
        (Bug::MetaPurged, &[META]),
        (Bug::HintsNotRemoved, &[HINTS]),
        (Bug::HintsPurged, &[HINTS]),
        (Bug::HintsUnchecked, &[HINTS]),
        (Bug::RemoveIgnoresVersion, &[REMOVE]),
        (Bug::RemoveUnreported, &[REMOVE]),
    ];
    let seed = conformance::seed();
    let mut missed = Vec::new();
    for (bug, checks) in cases {
        let backend = Reference::backend(bug);
        for check in checks {
            // A skipped check caught nothing either.
            if conformance::run_check(&backend, check, seed).await.is_ok() {
                missed.push(format!("{bug:?} passed {:?}", check.name));
            }
        }
    }
    assert!(
        missed.is_empty(),
        "bugs not caught (seed {seed}): {missed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disagreeing_backends_are_caught() {
    let seed = conformance::seed();
    let agreeing = [Reference::backend(Bug::None), Reference::backend(Bug::None)];
    let task = tokio::spawn(async move { conformance::backends_agree(&agreeing, seed).await });
    task.await.expect("two correct backends agree");
    for bug in [
        Bug::SwappedBuckets,
        Bug::SkipAfterCursor,
        Bug::HideTombstones,
    ] {
        let pair = [Reference::backend(Bug::None), Reference::backend(bug)];
        let task = tokio::spawn(async move { conformance::backends_agree(&pair, seed).await });
        assert!(task.await.is_err(), "{bug:?} agreed (seed {seed})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_updates_are_caught() {
    // Losing an update needs an unlucky interleaving; the barrier rounds of the check make it
    // all but certain within one seed, and a few seeds leave no doubt.
    let backend = Reference::backend(Bug::RacyApply);
    let first = conformance::seed();
    for seed in first..first.wrapping_add(5) {
        if conformance::run_check(&backend, &conformance::CONCURRENT_WRITERS, seed)
            .await
            .is_err()
        {
            return;
        }
    }
    panic!(
        "a racy apply passed concurrent_writers with seeds {first} to {}",
        first.wrapping_add(4)
    );
}
