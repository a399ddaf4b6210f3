//! Scans and digests over many ranges, most of them wrapping.

use std::num::NonZeroU32;

use bytes::Bytes;
use chorus::hash::{HashRange, key_hash};
use chorus::record::Record;
use chorus::storage::{
    ApplyOutcome, Entry, MAX_DIGEST_BUCKETS, RangeDigest, ScanCursor, ScanPage, Storage,
    StorageError,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Backend;
use super::support::{cursor_of, entries_in, nz, nz32, ok, random_keys, random_record};

/// Scans and digests over a few hundred keys and many ranges, most of them wrapping.
///
/// For every range: a scan returns exactly the keys whose [`key_hash`] lies in it, in
/// `(offset, key)` order, and paging with limits from 1 to past the end neither skips nor
/// repeats (every page but the last is full, `next` is the last entry's cursor exactly when
/// more remain). Digests have the requested number of buckets, each bucket holds the keys
/// [`HashRange::bucket_of`] assigns to it, the buckets [`RangeDigest::combine`] to the
/// one-bucket digest of the range, and bucket `i` equals the digest of
/// [`HashRange::bucket`]`(i)`.
pub async fn ranges(backend: &Backend, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7261_6e67);
    let store = backend.open();

    // A digest may not ask for more buckets than the contract allows (counts come from peers).
    let too_many = NonZeroU32::new(MAX_DIGEST_BUCKETS + 1).expect("non-zero");
    match store.digest(HashRange::FULL, too_many).await {
        Err(err @ StorageError::InvalidRequest(_)) => assert!(
            !err.is_retryable(),
            "an invalid request is not retryable: {err}"
        ),
        other => {
            panic!("a digest of more than MAX_DIGEST_BUCKETS buckets must be refused: {other:?}")
        }
    }

    // An empty store has nothing in any range.
    let page = ok(
        store.scan(HashRange::FULL, None, nz(3)).await,
        "scan of an empty store",
    );
    assert_eq!(page, ScanPage::default(), "scan of an empty store");
    let digest = ok(
        store.digest(HashRange::FULL, nz32(3)).await,
        "digest of an empty store",
    );
    assert_eq!(
        digest,
        [RangeDigest::default(); 3],
        "digest of an empty store"
    );

    let keys = random_keys(&mut rng, 300, 12);
    let mut stored: Vec<(Bytes, Record)> = Vec::new();
    for key in &keys {
        let tombstone = rng.random_bool(0.2);
        let record = random_record(&mut rng, tombstone);
        let outcome = ok(
            store.apply(key.clone(), record.clone()).await,
            format!("apply {key:?}"),
        );
        assert_eq!(
            outcome,
            ApplyOutcome::Applied { previous: None },
            "first write of {key:?}"
        );
        stored.push((key.clone(), record));
    }
    let mut by_hash: Vec<u64> = keys.iter().map(|k| key_hash(k)).collect();
    by_hash.sort_unstable();
    let (lowest, highest) = (by_hash[0], by_hash[by_hash.len() - 1]);
    let (a, b) = (by_hash[by_hash.len() / 3], by_hash[by_hash.len() * 2 / 3]);
    let mut ranges = vec![
        HashRange::FULL,
        // The full ring starting at a key.
        HashRange::new(a, a),
        // Wrapping ranges that start and end exactly on key hashes: the start is inside, the
        // end outside.
        HashRange::new(b, a),
        HashRange::new(highest, lowest),
        HashRange::new(highest, lowest.wrapping_add(1)),
        // Just one key; and wrapping around zero.
        HashRange::new(a, a.wrapping_add(1)),
        HashRange::new(u64::MAX - (1 << 62), 1 << 62),
        // Not wrapping.
        HashRange::new(a, b),
    ];
    for _ in 0..6 {
        let (x, y): (u64, u64) = (rng.random(), rng.random());
        ranges.push(HashRange::new(x.max(y), x.min(y)));
    }

    for range in ranges {
        let expected = entries_in(&range, stored.iter().cloned());
        let inside = stored
            .iter()
            .filter(|(k, _)| range.contains(key_hash(k)))
            .count();
        assert_eq!(expected.len(), inside, "the reference scan of {range:?}");
        if range.start == a {
            let first = expected.first().map(|e| e.hash);
            assert_eq!(
                first,
                Some(a),
                "{range:?}: the key at the start comes first"
            );
        }
        if !range.is_full() {
            assert!(
                expected.iter().all(|e| e.hash != range.end),
                "{range:?} excludes its end"
            );
        }

        let mut limits = vec![1, 2, 3, 7, 64, expected.len() + 1];
        limits.extend((!expected.is_empty()).then_some(expected.len()));
        for limit in limits {
            let mut seen: Vec<Entry> = Vec::new();
            let mut cursor: Option<ScanCursor> = None;
            loop {
                let what = format!("scan {range:?} limit {limit} after {cursor:?}");
                let page = ok(store.scan(range, cursor.clone(), nz(limit)).await, &what);
                assert!(
                    page.entries.len() <= limit,
                    "{what}: page longer than the limit"
                );
                seen.extend(page.entries.iter().cloned());
                assert!(
                    seen.len() <= expected.len(),
                    "{what}: more entries than the range holds"
                );
                match page.next {
                    Some(next) => {
                        assert_eq!(
                            page.entries.len(),
                            limit,
                            "{what}: a short page must be the last"
                        );
                        let last = page.entries.last().expect("a full page");
                        assert_eq!(next, cursor_of(last), "{what}: next is the last entry");
                        cursor = Some(next);
                    }
                    None => break,
                }
            }
            assert_eq!(
                seen, expected,
                "scan {range:?} with limit {limit}: paging skipped, repeated or misordered"
            );
        }

        let whole = ok(
            store.digest(range, nz32(1)).await,
            format!("digest {range:?}"),
        );
        let fingerprints = expected.iter().fold(0u64, |sum, e| {
            sum.wrapping_add(e.record.fingerprint(&e.key))
        });
        assert_eq!(
            whole,
            [RangeDigest {
                count: expected.len() as u64,
                hash: fingerprints
            }],
            "one-bucket digest of {range:?}"
        );
        for buckets in [2, 3, 7, 64, 1_000] {
            let what = format!("digest {range:?} into {buckets} buckets");
            let digest = ok(store.digest(range, nz32(buckets)).await, &what);
            assert_eq!(digest.len(), buckets as usize, "{what}: bucket count");
            let combined = digest
                .iter()
                .fold(RangeDigest::default(), |acc, d| acc.combine(*d));
            assert_eq!(combined, whole[0], "{what}: buckets combine to the whole");
            for (i, bucket) in digest.iter().enumerate() {
                let members = expected
                    .iter()
                    .filter(|e| range.bucket_of(e.hash, nz32(buckets)) as usize == i);
                assert_eq!(
                    bucket.count,
                    members.count() as u64,
                    "{what}: bucket {i} count"
                );
            }
            // Each bucket is the digest of its sub-range; an empty sub-range has no positions,
            // so its bucket must be empty.
            if buckets <= 7 {
                for (i, bucket) in digest.iter().enumerate() {
                    let Some(sub) = range.bucket(i as u32, nz32(buckets)) else {
                        assert_eq!(*bucket, RangeDigest::default(), "{what}: empty bucket {i}");
                        continue;
                    };
                    let alone = ok(
                        store.digest(sub, nz32(1)).await,
                        format!("{what}: bucket {i}"),
                    );
                    assert_eq!(alone, [*bucket], "{what}: bucket {i} = digest of {sub:?}");
                }
            }
        }
    }
}
