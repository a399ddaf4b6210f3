//! Backends compared with each other: the same records in different orders, the same answers.

use bytes::Bytes;
use chorus::hash::HashRange;
use chorus::record::Record;
use chorus::storage::Storage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Backend;
use super::support::{Model, check_paging, nz32, ok, random_keys, random_range, random_record};

/// Whether every backend ends with the same contents, scans and digests after the same
/// records are applied to each in a different order.
///
/// The records: a few hundred keys, several versions each (values, tombstones, expiring values
/// and same-version rivals), shuffled independently per backend. By the merge's commutativity
/// every backend must hold the same winners; then full and partial scans (paged), digests at
/// several bucket counts, gets and stats must be equal between every pair of backends, and
/// equal to the reference computed here. Every backend must keep everything it is given
/// ([`Backend::keeps_everything`]).
pub async fn backends_agree(backends: &[Backend], seed: u64) {
    for backend in backends {
        assert!(
            backend.keeps_everything(),
            "backend {:?} may evict ({:?}): compare only backends that keep everything",
            backend.name(),
            backend.capabilities()
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x61_6772_6565);
    let keys = random_keys(&mut rng, 200, 10);
    let mut writes: Vec<(Bytes, Record)> = Vec::new();
    for key in &keys {
        for _ in 0..rng.random_range(1..=4) {
            let tombstone = rng.random_bool(0.2);
            writes.push((key.clone(), random_record(&mut rng, tombstone)));
        }
    }
    let mut model = Model::default();
    for (key, record) in &writes {
        model.apply(key, record);
    }
    let mut ranges = vec![HashRange::FULL];
    for _ in 0..4 {
        ranges.push(random_range(&mut rng, &keys));
    }

    let mut stores = Vec::new();
    for backend in backends {
        let store = backend.open();
        let mut order = writes.clone();
        order.shuffle(&mut rng);
        for (key, record) in order {
            ok(
                store.apply(key.clone(), record.clone()).await,
                format!("{}: apply {key:?}", backend.name()),
            );
        }
        stores.push((backend.name().to_owned(), store));
    }
    for (name, store) in &stores {
        for key in &keys {
            let got = ok(
                store.get(key).await,
                format!("backend {name:?}: get {key:?}"),
            );
            assert_eq!(
                got.as_ref(),
                model.records.get(key),
                "backend {name:?}: get {key:?}"
            );
        }
        for range in &ranges {
            let limit = rng.random_range(1..=17);
            check_paging(store, &model, *range, limit, &format!("backend {name:?}")).await;
            for buckets in [1, 16, 1_024] {
                let what = format!("backend {name:?}: digest {range:?} into {buckets} buckets");
                let digest = ok(store.digest(*range, nz32(buckets)).await, &what);
                assert_eq!(digest, model.digest(range, buckets), "{what}");
            }
        }
        let stats = ok(store.stats().await, format!("backend {name:?}: stats"));
        assert_eq!(
            (stats.records, stats.tombstones),
            (model.records.len() as u64, model.tombstones()),
            "backend {name:?}: stats"
        );
    }
    for (name, store) in &stores {
        ok(store.close().await, format!("backend {name:?}: close"));
    }
}
