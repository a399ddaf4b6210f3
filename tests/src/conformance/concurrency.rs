//! Concurrent writers to a few keys through one shared store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use chorus::hash::HashRange;
use chorus::record::Record;
use chorus::storage::{ApplyOutcome, Storage};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Backend;
use super::support::{Model, check_paging, nz32, ok, random_keys, random_record_at, version};

/// Four tasks write hundreds of versions each to four keys through one shared store: two in
/// random order, two climbing through versions in locally shuffled order (so they race for new
/// maxima); every writer also applies the same twenty records, so identical copies race. Then
/// a hundred rounds in which all writers, released together by a barrier, apply to one fresh
/// key each round.
///
/// Requires: reading a key back right after applying to it returns that record or a newer one,
/// and a writer's successive reads of a key never go backwards; every `Stale` carries a version
/// at least that of the record it refused; every `Applied` that names a previous version
/// replaced a strictly older one; each key ends with the maximum of its records by [`Record::precedence`] (equal to their [`Record::merge`]); that
/// winner was reported `Applied` at least once; scans, digests and stats match the winners.
/// It does not require every outcome to be exact under concurrency (that `Applied` is reported
/// for exactly the records that were new maxima when applied).
pub async fn concurrent_writers(backend: &Backend, seed: u64) {
    const WRITERS: u64 = 4;
    const PER_WRITER: u64 = 300;
    const SHARED: usize = 20;
    const ROUNDS: usize = 100;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xc0c0_c0c0);
    let keys = random_keys(&mut rng, 4, 4);
    let store = backend.open();

    // Versions are unique per write: writer `w` uses node `w` and distinct timestamps. The
    // shared records use node 99 and are identical in every writer's list.
    let mut shared_ms = BTreeSet::new();
    while shared_ms.len() < SHARED {
        shared_ms.insert(rng.random_range(0..PER_WRITER * 4));
    }
    let shared: Vec<(Bytes, Record)> = shared_ms
        .into_iter()
        .map(|ms| {
            let key = keys.choose(&mut rng).expect("keys").clone();
            let version = version(ms, 0, 99);
            let tombstone = rng.random_bool(0.2);
            (key, random_record_at(&mut rng, version, tombstone))
        })
        .collect();
    // Then rounds in which every writer applies to the same fresh key at the same moment.
    let round_keys: Vec<Bytes> = (0..ROUNDS)
        .map(|r| Bytes::from(format!("round/{r}")))
        .collect();
    let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS as usize));
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let rounds: Vec<(Bytes, Record)> = round_keys
            .iter()
            .map(|key| {
                let version = version(rng.random_range(0..1_000), 0, writer);
                let tombstone = rng.random_bool(0.15);
                (key.clone(), random_record_at(&mut rng, version, tombstone))
            })
            .collect();
        let barrier = Arc::clone(&barrier);
        let mut writes: Vec<(Bytes, Record)> = (0..PER_WRITER)
            .map(|i| {
                let key = keys.choose(&mut rng).expect("keys").clone();
                let version = version(i * 4 + rng.random_range(0..4), 0, writer);
                let tombstone = rng.random_bool(0.15);
                (key, random_record_at(&mut rng, version, tombstone))
            })
            .collect();
        writes.extend(shared.iter().cloned());
        if writer % 2 == 0 {
            // Climbing, shuffled only locally: these writers keep racing each other for new
            // maxima, which is where a non-atomic apply loses updates.
            writes.sort_by_key(|(_, record)| record.version);
            for window in writes.chunks_mut(8) {
                window.shuffle(&mut rng);
            }
        } else {
            writes.shuffle(&mut rng);
        }
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut log = Vec::with_capacity(writes.len());
            let mut last_read: BTreeMap<Bytes, Record> = BTreeMap::new();
            for (i, (key, record)) in writes.into_iter().enumerate() {
                let what = format!("writer {writer}: apply {key:?} {record:?}");
                let outcome = ok(store.apply(key.clone(), record.clone()).await, &what);
                // The stored record only ever moves forward: reading back right after an apply
                // sees the record or something newer, and never less than read before.
                let read = ok(store.get(&key).await, format!("{what}: read back"))
                    .unwrap_or_else(|| panic!("{what}: the key is missing right after the apply"));
                assert!(
                    read.precedence(&record).is_ge(),
                    "{what}: read back an older {read:?}"
                );
                if let Some(before) = last_read.insert(key.clone(), read.clone()) {
                    assert!(
                        read.precedence(&before).is_ge(),
                        "{what}: read {read:?} after {before:?}"
                    );
                }
                match &outcome {
                    ApplyOutcome::Stale { current } => assert!(
                        current.precedence(&record).is_ge(),
                        "{what}: Stale with an older current record {current:?}"
                    ),
                    ApplyOutcome::Applied {
                        previous: Some(previous),
                    } => assert!(
                        *previous < record.version,
                        "{what}: Applied over a version {previous:?} that is not older"
                    ),
                    ApplyOutcome::Applied { previous: None } => {}
                }
                log.push((key, record, outcome.is_applied()));
                if i % 8 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            for (key, record) in rounds {
                barrier.wait().await;
                let what = format!("writer {writer}: apply {key:?} {record:?} in a round");
                let outcome = ok(store.apply(key.clone(), record.clone()).await, &what);
                if let ApplyOutcome::Stale { current } = &outcome {
                    assert!(
                        current.precedence(&record).is_ge(),
                        "{what}: Stale with an older {current:?}"
                    );
                }
                log.push((key, record, outcome.is_applied()));
            }
            log
        }));
    }
    let mut log = Vec::new();
    for task in tasks {
        match task.await {
            Ok(part) => log.extend(part),
            Err(err) => match err.try_into_panic() {
                Ok(payload) => std::panic::resume_unwind(payload),
                Err(err) => panic!("writer task failed: {err}"),
            },
        }
    }

    let mut model = Model::default();
    for key in keys.iter().chain(&round_keys) {
        let records: Vec<&Record> = log
            .iter()
            .filter(|(k, ..)| k == key)
            .map(|(_, r, _)| r)
            .collect();
        let Some(winner) = records
            .iter()
            .copied()
            .max_by(|a, b| a.precedence(b))
            .cloned()
        else {
            continue;
        };
        let merged = records.iter().copied().cloned().reduce(Record::merge);
        assert_eq!(
            merged.as_ref(),
            Some(&winner),
            "the merge picks the maximum"
        );
        let got = ok(store.get(key).await, format!("get {key:?}"));
        assert_eq!(
            got.as_ref(),
            Some(&winner),
            "key {key:?} must end with the LWW winner"
        );
        // Nothing stored can supersede the winner, so at least one of its applies reports that
        // it won. (That every outcome is exact under concurrency is not required here.)
        let wins = log
            .iter()
            .filter(|(k, r, applied)| k == key && *r == winner && *applied)
            .count();
        assert!(
            wins >= 1,
            "key {key:?}: the winner {winner:?} was never reported Applied"
        );
        model.records.insert(key.clone(), winner);
    }
    check_paging(&store, &model, HashRange::FULL, 2, "after the writers").await;
    let digest = ok(
        store.digest(HashRange::FULL, nz32(4)).await,
        "digest after the writers",
    );
    assert_eq!(
        digest,
        model.digest(&HashRange::FULL, 4),
        "digest after the writers"
    );
    let stats = ok(store.stats().await, "stats after the writers");
    assert_eq!(
        (stats.records, stats.tombstones),
        (model.records.len() as u64, model.tombstones()),
        "stats (records, tombstones) after the writers"
    );
}
