//! The model check: random operations compared with a `BTreeMap` model, step by step.

use std::time::Duration;

use bytes::Bytes;
use chorus::hash::{HashRange, key_hash};
use chorus::storage::{ApplyOutcome, SharedStorage, Storage};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Backend;
use super::support::{
    Model, check_paging, nz, nz32, ok, older_version, random_bytes, random_cursor, random_keys,
    random_range, random_record, random_record_at,
};

/// Runs `ops` random operations against a fresh store and a [`BTreeMap`](std::collections::BTreeMap) model side by side.
///
/// Operations: apply a value, a tombstone, a strictly older version of a stored key (must be
/// `Stale`), a same-version rival (the merge's tie-breaks decide) or an identical copy (must be
/// `Stale`); get; one scan page with a random range, cursor and limit; digest with a random
/// range and bucket count; purge; stats; flush. Every result is compared with the model. Every
/// 40 operations and at the end, the whole store is compared: a get of every key (stored or
/// not), complete paged scans with small limits through the full ring and through random
/// (often wrapping) ranges, and digests with 1, 7 and 256 buckets.
pub async fn model(backend: &Backend, seed: u64, ops: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let store = backend.open();
    let mut model = Model::default();
    let keys = random_keys(&mut rng, 48, 6);

    for step in 0..ops {
        let roll = rng.random_range(0..100);
        match roll {
            // Apply a value, a tombstone, an older version, a rival or a copy.
            0..=56 => {
                let key = keys.choose(&mut rng).expect("keys").clone();
                let current = model.records.get(&key).cloned();
                let tombstone = rng.random_bool(0.3);
                // The record to apply, and the outcome the operation forces if any.
                let planned = match (roll, current) {
                    (0..=29, _) => Some((random_record(&mut rng, false), None)),
                    (30..=41, _) => Some((random_record(&mut rng, true), None)),
                    (42..=49, Some(current)) => {
                        older_version(&mut rng, current.version).map(|older| {
                            let record = random_record_at(&mut rng, older, tombstone);
                            (
                                record,
                                Some(ApplyOutcome::Stale {
                                    current: current.clone(),
                                }),
                            )
                        })
                    }
                    (50..=53, Some(current)) => {
                        Some((random_record_at(&mut rng, current.version, tombstone), None))
                    }
                    (_, Some(current)) => {
                        let outcome = ApplyOutcome::Stale {
                            current: current.clone(),
                        };
                        Some((current, Some(outcome)))
                    }
                    (_, None) => None,
                };
                if let Some((record, forced)) = planned {
                    let what = format!("step {step}: apply {key:?} {record:?}");
                    let outcome = ok(store.apply(key.clone(), record.clone()).await, &what);
                    let expected = model.apply(&key, &record);
                    assert_eq!(outcome, expected, "{what}");
                    if let Some(forced) = forced {
                        assert_eq!(outcome, forced, "{what}");
                    }
                }
            }
            57..=69 => {
                let key = if rng.random_bool(0.9) {
                    keys.choose(&mut rng).expect("keys").clone()
                } else {
                    random_bytes(&mut rng, b"abc\x00\xff", 7..9) // never stored
                };
                let what = format!("step {step}: get {key:?}");
                let got = ok(store.get(&key).await, &what);
                assert_eq!(got.as_ref(), model.records.get(&key), "{what}");
            }
            70..=79 => {
                let range = random_range(&mut rng, &keys);
                let cursor = random_cursor(&mut rng, &keys, &model);
                let limit = rng.random_range(1..=12);
                let what = format!("step {step}: scan {range:?} after {cursor:?} limit {limit}");
                let page = ok(store.scan(range, cursor.clone(), nz(limit)).await, &what);
                assert_eq!(page, model.page(&range, cursor.as_ref(), limit), "{what}");
            }
            80..=87 => {
                let range = random_range(&mut rng, &keys);
                let buckets = rng.random_range(1..=16);
                let what = format!("step {step}: digest {range:?} into {buckets} buckets");
                let digest = ok(store.digest(range, nz32(buckets)).await, &what);
                assert_eq!(digest, model.digest(&range, buckets), "{what}");
            }
            88..=90 => {
                let now_ms = rng.random_range(0..2_600);
                let grace = Duration::from_millis(rng.random_range(0..300));
                let what = format!("step {step}: purge at {now_ms} ms with grace {grace:?}");
                let purged = ok(store.purge(now_ms, grace).await, &what);
                assert_eq!(purged, model.purge(now_ms, grace), "{what}");
            }
            91..=96 => {
                let what = format!("step {step}: stats");
                let stats = ok(store.stats().await, &what);
                let expected = (model.records.len() as u64, model.tombstones());
                assert_eq!(
                    (stats.records, stats.tombstones),
                    expected,
                    "{what}: (records, tombstones)"
                );
                assert!(
                    stats.records == 0 || stats.bytes > 0,
                    "{what}: records but no bytes: {stats:?}"
                );
            }
            _ => ok(store.flush().await, format!("step {step}: flush")),
        }
        if step % 40 == 39 {
            verify_everything(
                &store,
                &model,
                &keys,
                &mut rng,
                &format!("after step {step}"),
            )
            .await;
        }
    }
    verify_everything(&store, &model, &keys, &mut rng, "at the end").await;
}

/// Compares the whole store with the model.
async fn verify_everything(
    store: &SharedStorage,
    model: &Model,
    keys: &[Bytes],
    rng: &mut ChaCha8Rng,
    ctx: &str,
) {
    for key in keys.iter().chain([&Bytes::from_static(b"never-stored")]) {
        let got = ok(store.get(key).await, format!("{ctx}: get {key:?}"));
        assert_eq!(got.as_ref(), model.records.get(key), "{ctx}: get {key:?}");
    }
    let mut ranges = vec![HashRange::FULL];
    // A wrapping range from random ends, and one bounded by two key hashes.
    let (a, b): (u64, u64) = (rng.random(), rng.random());
    ranges.push(HashRange::new(a.max(b), a.min(b)));
    let (a, b) = (key_hash(&keys[0]), key_hash(&keys[1]));
    ranges.push(HashRange::new(a.max(b), a.min(b)));
    ranges.push(random_range(rng, keys));
    for range in ranges {
        let limit = rng.random_range(1..=5);
        check_paging(store, model, range, limit, ctx).await;
        for buckets in [1, 7, 256] {
            let what = format!("{ctx}: digest {range:?} into {buckets} buckets");
            let digest = ok(store.digest(range, nz32(buckets)).await, &what);
            assert_eq!(digest, model.digest(&range, buckets), "{what}");
        }
    }
    let stats = ok(store.stats().await, format!("{ctx}: stats"));
    assert_eq!(
        (stats.records, stats.tombstones),
        (model.records.len() as u64, model.tombstones()),
        "{ctx}: stats (records, tombstones)"
    );
}
