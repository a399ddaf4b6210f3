//! Helpers the checks share: the reference model, paging and digest references, and seeded
//! random keys, records, ranges and cursors.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use bytes::Bytes;
use chorus::hash::{HashRange, key_hash};
use chorus::hlc::{Timestamp, Version};
use chorus::identity::NodeId;
use chorus::record::Record;
use chorus::storage::{
    ApplyOutcome, Entry, PurgeStats, RangeDigest, ScanCursor, ScanPage, SharedStorage, Storage,
    StorageError, after_cursor, scan_order,
};
use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand_chacha::ChaCha8Rng;

pub(super) fn version(ms: u64, logical: u16, node: u64) -> Version {
    Version::new(Timestamp::new(ms, logical), NodeId(node))
}

pub(super) fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).expect("a page holds at least one entry")
}

pub(super) fn nz32(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("at least one bucket")
}

pub(super) fn cursor_of(entry: &Entry) -> ScanCursor {
    ScanCursor {
        hash: entry.hash,
        key: entry.key.clone(),
    }
}

/// Unwraps a storage result, naming the operation on failure.
pub(super) fn ok<T>(result: Result<T, StorageError>, what: impl fmt::Display) -> T {
    result.unwrap_or_else(|err| panic!("{what}: unexpected error {err}"))
}

/// The reference model: a sorted map whose records are combined with [`Record::merge`].
#[derive(Default)]
pub(super) struct Model {
    pub(super) records: BTreeMap<Bytes, Record>,
}

impl Model {
    /// Applies like a backend must, returning the outcome a backend must report.
    pub(super) fn apply(&mut self, key: &Bytes, record: &Record) -> ApplyOutcome {
        match self.records.get_mut(key) {
            None => {
                self.records.insert(key.clone(), record.clone());
                ApplyOutcome::Applied { previous: None }
            }
            Some(current) => {
                let outcome = if record.supersedes(current) {
                    ApplyOutcome::Applied {
                        previous: Some(current.version),
                    }
                } else {
                    ApplyOutcome::Stale {
                        current: current.clone(),
                    }
                };
                *current = current.clone().merge(record.clone());
                outcome
            }
        }
    }

    /// Every entry of `range`, in scan order.
    pub(super) fn entries(&self, range: &HashRange) -> Vec<Entry> {
        entries_in(
            range,
            self.records.iter().map(|(k, r)| (k.clone(), r.clone())),
        )
    }

    pub(super) fn page(
        &self,
        range: &HashRange,
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> ScanPage {
        let mut entries: Vec<Entry> = self
            .entries(range)
            .into_iter()
            .filter(|e| cursor.is_none_or(|c| after_cursor(range, e.hash, &e.key, c)))
            .collect();
        let more = entries.len() > limit;
        entries.truncate(limit);
        let next = if more {
            entries.last().map(cursor_of)
        } else {
            None
        };
        ScanPage { entries, next }
    }

    pub(super) fn digest(&self, range: &HashRange, buckets: u32) -> Vec<RangeDigest> {
        digest_of(range, buckets, self.records.iter())
    }

    pub(super) fn purge(&mut self, now_ms: u64, grace: Duration) -> PurgeStats {
        let mut stats = PurgeStats::default();
        self.records.retain(|_, record| {
            if !record.is_collectable(now_ms, grace) {
                return true;
            }
            stats.count(record);
            false
        });
        stats
    }

    pub(super) fn tombstones(&self) -> u64 {
        self.records.values().filter(|r| r.is_tombstone()).count() as u64
    }
}

/// The entries among `records` whose key hash lies in `range`, in scan order.
pub(super) fn entries_in(
    range: &HashRange,
    records: impl Iterator<Item = (Bytes, Record)>,
) -> Vec<Entry> {
    let mut entries: Vec<Entry> = records
        .map(|(key, record)| Entry {
            hash: key_hash(&key),
            key,
            record,
        })
        .filter(|e| range.contains(e.hash))
        .collect();
    entries.sort_by(|a, b| scan_order(range, a, b));
    entries
}

/// The digest every backend must compute: fingerprints summed into [`HashRange::bucket_of`].
pub(super) fn digest_of<'a>(
    range: &HashRange,
    buckets: u32,
    records: impl Iterator<Item = (&'a Bytes, &'a Record)>,
) -> Vec<RangeDigest> {
    let mut digests = vec![RangeDigest::default(); buckets as usize];
    for (key, record) in records {
        let hash = key_hash(key);
        if range.contains(hash) {
            digests[range.bucket_of(hash, nz32(buckets)) as usize].add(record.fingerprint(key));
        }
    }
    digests
}

/// Pages through `range` with `limit` and checks every page against the model's page for the
/// same cursor: same entries, same `next`, hence no skips, repeats or early ends.
pub(super) async fn check_paging(
    store: &SharedStorage,
    model: &Model,
    range: HashRange,
    limit: usize,
    ctx: &str,
) {
    let mut cursor = None;
    let mut pages = 0usize;
    loop {
        let what = format!("{ctx}: scan {range:?} limit {limit} page {pages} after {cursor:?}");
        let page = ok(store.scan(range, cursor.clone(), nz(limit)).await, &what);
        let expected = model.page(&range, cursor.as_ref(), limit);
        assert_eq!(page, expected, "{what}");
        pages += 1;
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
}

/// A range drawn from several shapes: the full ring (from 0 or from anywhere), arbitrary and
/// wrapping ranges, ranges bounded by key hashes (so boundaries hit keys exactly), and narrow
/// ranges holding about one key.
pub(super) fn random_range(rng: &mut ChaCha8Rng, keys: &[Bytes]) -> HashRange {
    let some_key_hash = |rng: &mut ChaCha8Rng| key_hash(keys.choose(rng).expect("keys"));
    match rng.random_range(0..6) {
        0 => HashRange::FULL,
        1 => {
            let start = if rng.random_bool(0.5) {
                some_key_hash(rng)
            } else {
                rng.random()
            };
            HashRange::new(start, start)
        }
        2 => HashRange::new(rng.random(), rng.random()),
        3 => {
            let (a, b): (u64, u64) = (rng.random(), rng.random());
            HashRange::new(a.max(b), a.min(b))
        }
        4 => HashRange::new(some_key_hash(rng), some_key_hash(rng)),
        _ => {
            let start = some_key_hash(rng);
            HashRange::new(start, start.wrapping_add(rng.random_range(1..=1u64 << 40)))
        }
    }
}

/// A cursor for `range`: none, at a stored or unstored key, or arbitrary (possibly outside the
/// range, where nothing lies after it).
pub(super) fn random_cursor(
    rng: &mut ChaCha8Rng,
    keys: &[Bytes],
    model: &Model,
) -> Option<ScanCursor> {
    match rng.random_range(0..4) {
        0 => None,
        1 if !model.records.is_empty() => {
            let index = rng.random_range(0..model.records.len());
            let key = model
                .records
                .keys()
                .nth(index)
                .expect("index in bounds")
                .clone();
            Some(ScanCursor {
                hash: key_hash(&key),
                key,
            })
        }
        1 | 2 => {
            let key = keys.choose(rng).expect("keys").clone();
            Some(ScanCursor {
                hash: key_hash(&key),
                key,
            })
        }
        _ => Some(ScanCursor {
            hash: rng.random(),
            key: random_bytes(rng, b"abc", 0..4),
        }),
    }
}

pub(super) fn random_bytes(
    rng: &mut ChaCha8Rng,
    alphabet: &[u8],
    len: std::ops::Range<usize>,
) -> Bytes {
    let len = rng.random_range(len);
    (0..len)
        .map(|_| *alphabet.choose(rng).expect("alphabet"))
        .collect::<Vec<u8>>()
        .into()
}

/// `count` distinct keys from a small alphabet (shared prefixes, `0x00` and `0xff` bytes), the
/// empty key included.
pub(super) fn random_keys(rng: &mut ChaCha8Rng, count: usize, max_len: usize) -> Vec<Bytes> {
    let mut keys = BTreeSet::from([Bytes::new()]);
    while keys.len() < count {
        keys.insert(random_bytes(rng, b"abc\x00\xff", 1..max_len + 1));
    }
    let mut keys: Vec<Bytes> = keys.into_iter().collect();
    keys.shuffle(rng);
    keys
}

/// A random value or tombstone from small domains, so that equal versions, equal contents and
/// expiries all occur.
pub(super) fn random_record(rng: &mut ChaCha8Rng, tombstone: bool) -> Record {
    let version = version(
        rng.random_range(0..2_000),
        rng.random_range(0..2),
        rng.random_range(0..3),
    );
    random_record_at(rng, version, tombstone)
}

pub(super) fn random_record_at(rng: &mut ChaCha8Rng, version: Version, tombstone: bool) -> Record {
    let record = if tombstone {
        Record::tombstone(version)
    } else if rng.random_bool(0.02) {
        Record::value(random_bytes(rng, b"0123456789", 1_000..3_000), version)
    } else {
        Record::value(random_bytes(rng, b"xyz", 0..4), version)
    };
    let expiry_odds = if tombstone { 0.05 } else { 0.2 };
    if rng.random_bool(expiry_odds) {
        let at = version.timestamp.physical_ms() + rng.random_range(0..500);
        record.with_expiry(at)
    } else {
        record
    }
}

/// A version strictly older than `current`, if there is one.
pub(super) fn older_version(rng: &mut ChaCha8Rng, current: Version) -> Option<Version> {
    let raw = current.timestamp.as_u64();
    if raw > 0 {
        let timestamp = Timestamp::from_u64(rng.random_range(0..raw));
        Some(Version::new(timestamp, NodeId(rng.random_range(0..4))))
    } else if current.node.0 > 0 {
        Some(Version::new(
            current.timestamp,
            NodeId(rng.random_range(0..current.node.0)),
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_reports_outcomes_like_a_backend_must() {
        let mut model = Model::default();
        let key = Bytes::from_static(b"k");
        let old = Record::value("a", version(1, 0, 1));
        let new = Record::tombstone(version(2, 0, 1));
        assert_eq!(
            model.apply(&key, &old),
            ApplyOutcome::Applied { previous: None }
        );
        assert_eq!(
            model.apply(&key, &new),
            ApplyOutcome::Applied {
                previous: Some(old.version)
            }
        );
        assert_eq!(
            model.apply(&key, &old),
            ApplyOutcome::Stale {
                current: new.clone()
            }
        );
        assert_eq!(model.records[&key], new);
        assert_eq!(model.tombstones(), 1);
        assert_eq!(model.purge(2, Duration::ZERO), PurgeStats::new(1, 0));
        assert!(model.records.is_empty());
    }

    #[test]
    fn model_pages_cover_a_range_exactly_once() {
        let mut model = Model::default();
        for i in 0..50u32 {
            model.apply(
                &Bytes::from(i.to_string()),
                &Record::value("v", version(1, 0, 1)),
            );
        }
        let range = HashRange::new(u64::MAX / 2, u64::MAX / 4);
        let all = model.entries(&range);
        assert!(
            !all.is_empty() && all.len() < 50,
            "the range holds some keys: {}",
            all.len()
        );
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = model.page(&range, cursor.as_ref(), 3);
            seen.extend(page.entries);
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, all);
    }
}
