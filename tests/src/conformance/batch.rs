//! `apply_batch` against sequential applies and the model.

use bytes::Bytes;
use chorus::hash::HashRange;
use chorus::record::Record;
use chorus::storage::{ApplyOutcome, MAX_BATCH, Storage, StorageError};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Backend;
use super::support::{
    Model, check_paging, nz32, ok, older_version, random_keys, random_record, random_record_at,
    version,
};

/// Random batches this check applies.
const BATCHES: usize = 60;

/// `apply_batch` returns one outcome per write, in order, equal to what applying the writes
/// one by one returns.
///
/// An empty batch returns no outcomes and changes nothing; a batch of [`MAX_BATCH`] writes is
/// accepted; one of `MAX_BATCH + 1` is refused with [`StorageError::InvalidRequest`] and
/// applies nothing. A batch that names a key several times applies in order (a later write
/// sees an earlier one). Then seeded random batches (0 to 40 writes over a few keys, so
/// duplicates, stale copies and older versions are common) go to one store with
/// `apply_batch` and to a second store of the backend write by write with `apply`: the
/// outcomes must equal each other and the model's, and both stores must end with the model's
/// contents, scans, digests and stats.
pub async fn apply_batch(backend: &Backend, seed: u64) {
    let store = backend.open();
    let what = "an empty batch";
    assert_eq!(ok(store.apply_batch(Vec::new()).await, what), [], "{what}");
    assert_eq!(ok(store.stats().await, what).records, 0, "{what}");

    let key = |i: usize| Bytes::from(format!("batch-{i}"));
    let too_long: Vec<(Bytes, Record)> = (0..=MAX_BATCH)
        .map(|i| (key(i), Record::value("v", version(1_000, 0, 1))))
        .collect();
    match store.apply_batch(too_long).await {
        Err(StorageError::InvalidRequest(_)) => {}
        other => panic!(
            "a batch of {} writes: {other:?} instead of InvalidRequest",
            MAX_BATCH + 1
        ),
    }
    let stats = ok(store.stats().await, "stats after a refused batch");
    assert_eq!(stats.records, 0, "a refused batch applied {stats:?}");

    let longest: Vec<(Bytes, Record)> = (0..MAX_BATCH)
        .map(|i| (key(i), Record::value("v", version(1_000, 0, 1))))
        .collect();
    let outcomes = ok(
        store.apply_batch(longest).await,
        "a batch of MAX_BATCH writes",
    );
    assert_eq!(outcomes.len(), MAX_BATCH, "one outcome per write");
    assert!(
        outcomes
            .iter()
            .all(|o| *o == ApplyOutcome::Applied { previous: None }),
        "a batch of new keys applies every write"
    );
    assert_eq!(
        ok(store.stats().await, "stats").records,
        MAX_BATCH as u64,
        "every write of the batch is stored"
    );
    ok(store.close().await, "close");

    // The same key several times in one batch.
    let store = backend.open();
    let k = Bytes::from_static(b"k");
    let j = Bytes::from_static(b"j");
    let v1 = Record::value("v1", version(1_000, 0, 1));
    let v2 = Record::value("v2", version(2_000, 0, 1));
    let gone = Record::tombstone(version(3_000, 0, 1));
    let writes = vec![
        (k.clone(), v1.clone()),
        (j.clone(), v2.clone()),
        (k.clone(), v2.clone()),
        (k.clone(), v1.clone()),
        (j.clone(), gone.clone()),
        (j.clone(), v2.clone()),
    ];
    let outcomes = ok(
        store.apply_batch(writes).await,
        "a batch with duplicate keys",
    );
    assert_eq!(
        outcomes,
        [
            ApplyOutcome::Applied { previous: None },
            ApplyOutcome::Applied { previous: None },
            ApplyOutcome::Applied {
                previous: Some(v1.version)
            },
            ApplyOutcome::Stale {
                current: v2.clone()
            },
            ApplyOutcome::Applied {
                previous: Some(v2.version)
            },
            ApplyOutcome::Stale {
                current: gone.clone()
            },
        ],
        "a batch with duplicate keys applies in order"
    );
    assert_eq!(ok(store.get(&k).await, "get k"), Some(v2));
    assert_eq!(ok(store.get(&j).await, "get j"), Some(gone));
    ok(store.close().await, "close");

    // Random batches against sequential applies and the model.
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0062_6174_6368);
    let batched = backend.open();
    let sequential = backend.open();
    let mut model = Model::default();
    let keys = random_keys(&mut rng, 12, 3);
    for step in 0..BATCHES {
        let len = match rng.random_range(0..10) {
            0 => 0,
            1 => 1,
            _ => rng.random_range(2..=40),
        };
        // Drawn against a scratch model, so copies and older versions of records written
        // earlier in the same batch occur too.
        let mut scratch = Model {
            records: model.records.clone(),
        };
        let mut writes = Vec::with_capacity(len);
        for _ in 0..len {
            let key = keys.choose(&mut rng).expect("keys").clone();
            let tombstone = rng.random_bool(0.3);
            let record = match (rng.random_range(0..10), scratch.records.get(&key)) {
                (0..=1, Some(current)) => current.clone(),
                (2..=3, Some(current)) => match older_version(&mut rng, current.version) {
                    Some(older) => random_record_at(&mut rng, older, tombstone),
                    None => current.clone(),
                },
                (4, Some(current)) => random_record_at(&mut rng, current.version, tombstone),
                _ => random_record(&mut rng, tombstone),
            };
            scratch.apply(&key, &record);
            writes.push((key, record));
        }
        let what = format!("batch {step} of {len} writes");
        let outcomes = ok(batched.apply_batch(writes.clone()).await, &what);
        let mut one_by_one = Vec::with_capacity(len);
        for (key, record) in &writes {
            one_by_one.push(ok(
                sequential.apply(key.clone(), record.clone()).await,
                format!("{what}: apply {key:?} {record:?}"),
            ));
        }
        let expected: Vec<ApplyOutcome> = writes
            .iter()
            .map(|(key, record)| model.apply(key, record))
            .collect();
        assert_eq!(
            outcomes, one_by_one,
            "{what}: apply_batch and sequential applies disagree on {writes:?}"
        );
        assert_eq!(
            outcomes, expected,
            "{what}: the model disagrees on {writes:?}"
        );
        for key in &keys {
            let got = ok(batched.get(key).await, format!("{what}: get {key:?}"));
            assert_eq!(got.as_ref(), model.records.get(key), "{what}: get {key:?}");
        }
    }
    for (name, store) in [("batched", &batched), ("sequential", &sequential)] {
        let ctx = format!("{name} store at the end");
        check_paging(store, &model, HashRange::FULL, 5, &ctx).await;
        for buckets in [1, 7] {
            let digest = ok(store.digest(HashRange::FULL, nz32(buckets)).await, &ctx);
            assert_eq!(digest, model.digest(&HashRange::FULL, buckets), "{ctx}");
        }
        let stats = ok(store.stats().await, &ctx);
        assert_eq!(
            (stats.records, stats.tombstones),
            (model.records.len() as u64, model.tombstones()),
            "{ctx}: stats"
        );
        ok(store.close().await, "close");
    }
}
