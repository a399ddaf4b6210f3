//! Removal of a record only while it is unchanged: `remove_if_version`, step by step, against
//! the model, racing writers, and across a reopen.

use bytes::Bytes;
use chorus::hash::HashRange;
use chorus::hlc::Version;
use chorus::record::Record;
use chorus::storage::{ApplyOutcome, SharedStorage, Storage};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Backend;
use super::support::{Model, nz, nz32, ok, older_version, random_keys, random_record, version};

/// Random operations of the seeded part.
const OPS: usize = 600;

/// [`Storage::remove_if_version`] removes a key only while its stored record has exactly the
/// version given, and says whether it did.
///
/// Step by step: a value and a tombstone are removed at their versions (and a second removal
/// answers `false`); a missing key, an older version, and a version a newer apply replaced
/// meanwhile all answer `false` and leave the store as it was; after a removal the key takes
/// any record again, older ones included (`Applied` over nothing). Then seeded random applies
/// and removals (at the stored version, an older one, or of a missing key) are compared with
/// the model step by step, and scans, digests and stats must agree with it. Writers racing
/// removers never lose a write: a key ends without its newest record only if a removal
/// reported removing exactly that record. On a persistent backend that can reopen its
/// stores, nothing removed comes back after close and reopen, and nothing kept is lost.
pub async fn remove_if_version(backend: &Backend, seed: u64) {
    let (store, reopen) = backend.open_reopenable();
    let mut model = Model::default();
    let remove = |key: &'static str, v: Version| {
        let store = store.clone();
        async move {
            ok(
                store.remove_if_version(key.as_bytes(), v).await,
                format!("remove_if_version {key:?} at {v:?}"),
            )
        }
    };
    let key = |k: &'static str| Bytes::from_static(k.as_bytes());

    let value = Record::value("v", version(1_000, 0, 1));
    let tombstone = Record::tombstone(version(1_000, 0, 2));
    let first = Record::value("first", version(1_000, 0, 1));
    let newer = Record::value("newer", version(1_001, 0, 1));
    for (k, record) in [
        ("value", &value),
        ("tombstone", &tombstone),
        ("replaced", &first),
    ] {
        ok(store.apply(key(k), record.clone()).await, "apply");
        model.apply(&key(k), record);
    }
    assert!(!remove("missing", value.version).await, "a missing key");
    assert!(
        !remove("value", version(999, 0, 1)).await,
        "an older version removed the record"
    );
    assert!(
        !remove("value", version(1_000, 0, 2)).await,
        "a version of another writer removed the record"
    );
    assert_eq!(
        ok(store.get(b"value").await, "get"),
        Some(value.clone()),
        "a refused removal changed the record"
    );
    assert!(remove("value", value.version).await, "the stored version");
    model.records.remove(&key("value"));
    assert_eq!(ok(store.get(b"value").await, "get"), None, "removed");
    assert!(!remove("value", value.version).await, "a second removal");
    assert!(
        remove("tombstone", tombstone.version).await,
        "a tombstone at its version"
    );
    model.records.remove(&key("tombstone"));

    // A newer write applied between the read and the removal wins.
    let seen = ok(store.get(b"replaced").await, "get").expect("stored");
    ok(store.apply(key("replaced"), newer.clone()).await, "apply");
    model.apply(&key("replaced"), &newer);
    assert!(
        !remove("replaced", seen.version).await,
        "a removal of the version read took the newer record"
    );
    assert_eq!(
        ok(store.get(b"replaced").await, "get"),
        Some(newer.clone()),
        "the newer record stays"
    );

    // Once removed, the key accepts an older record again, as after a purge.
    let older = Record::value("older", version(500, 0, 1));
    assert_eq!(
        ok(store.apply(key("value"), older.clone()).await, "apply"),
        ApplyOutcome::Applied { previous: None },
        "a removed key still refuses older records"
    );
    model.apply(&key("value"), &older);
    compare(&store, &model, "after the steps").await;

    // Seeded: applies and removals against the model.
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let keys = random_keys(&mut rng, 32, 6);
    for step in 0..OPS {
        let k = keys.choose(&mut rng).expect("keys").clone();
        let what = format!("step {step} on {k:?}");
        match (rng.random_range(0..10), model.records.get(&k).cloned()) {
            (0..=4, _) => {
                let tombstone = rng.random_bool(0.3);
                let record = random_record(&mut rng, tombstone);
                let got = ok(store.apply(k.clone(), record.clone()).await, &what);
                assert_eq!(got, model.apply(&k, &record), "{what}: apply");
            }
            (5..=7, Some(current)) => {
                let removed = ok(store.remove_if_version(&k, current.version).await, &what);
                assert!(removed, "{what}: the stored version was not removed");
                model.records.remove(&k);
            }
            (_, Some(current)) => {
                let other = older_version(&mut rng, current.version).unwrap_or(version(1, 0, 99));
                let removed = ok(store.remove_if_version(&k, other).await, &what);
                assert!(!removed, "{what}: {other:?} removed {current:?}");
            }
            (_, None) => {
                let removed = ok(store.remove_if_version(&k, version(7, 0, 7)).await, &what);
                assert!(!removed, "{what}: a missing key reported removed");
            }
        }
        if step % 100 == 99 {
            compare(&store, &model, &what).await;
        }
    }
    compare(&store, &model, "after the seeded operations").await;
    racing_writers(&store, seed).await;
    compare(&store, &model, "after the racing writers").await;

    let persistent = store.capabilities().durability.is_persistent();
    let Some(reopen) = reopen.filter(|_| persistent) else {
        ok(store.close().await, "close");
        return;
    };
    ok(store.close().await, "close");
    let store = reopen();
    compare(&store, &model, "after reopening").await;
    ok(store.close().await, "close");
}

/// Writers apply ever newer records to a few keys while removers remove what they just
/// read. Every key ends with its newest record, unless a removal reported removing exactly
/// that one. Cleans up after itself: the keys are removed at the end.
async fn racing_writers(store: &SharedStorage, seed: u64) {
    const KEYS: [&str; 3] = ["race/a", "race/b", "race/c"];
    const WRITES: u64 = 200;
    let mut tasks = Vec::new();
    for (w, k) in KEYS.iter().enumerate() {
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 1..=WRITES {
                    let record = Record::value(format!("{i}"), version(10_000 + i, 0, w as u64));
                    ok(
                        store.apply(Bytes::from_static(k.as_bytes()), record).await,
                        "apply",
                    );
                    if i % 8 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        };
        let remover = {
            let store = store.clone();
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ w as u64);
            tokio::spawn(async move {
                let mut removed = Vec::new();
                for _ in 0..WRITES {
                    if let Some(seen) = ok(store.get(k.as_bytes()).await, "get") {
                        if rng.random_bool(0.5) {
                            tokio::task::yield_now().await;
                        }
                        let v = seen.version;
                        if ok(store.remove_if_version(k.as_bytes(), v).await, "remove") {
                            removed.push(v);
                        }
                    }
                    tokio::task::yield_now().await;
                }
                removed
            })
        };
        tasks.push((*k, w as u64, writer, remover));
    }
    for (k, w, writer, remover) in tasks {
        writer.await.expect("writer");
        let removed = remover.await.expect("remover");
        let newest = version(10_000 + WRITES, 0, w);
        let stored = ok(store.get(k.as_bytes()).await, "get");
        match stored {
            Some(record) => assert_eq!(record.version, newest, "{k}: the newest write lost"),
            None => assert!(
                removed.contains(&newest),
                "{k}: the newest write is gone, but no removal took it: {removed:?}"
            ),
        }
        if removed.len() > 1 {
            assert!(
                removed.windows(2).all(|p| p[0] < p[1]),
                "{k}: the same record removed twice: {removed:?}"
            );
        }
        ok(
            store.remove_if_version(k.as_bytes(), newest).await,
            "remove",
        );
        assert_eq!(ok(store.get(k.as_bytes()).await, "get"), None, "{k}");
    }
}

/// Scans, digests and stats of the whole store agree with the model.
async fn compare(store: &SharedStorage, model: &Model, ctx: &str) {
    for (k, record) in &model.records {
        let got = ok(store.get(k).await, format!("{ctx}: get {k:?}"));
        assert_eq!(got.as_ref(), Some(record), "{ctx}: get {k:?}");
    }
    let mut entries = Vec::new();
    let mut cursor = None;
    loop {
        let page = ok(store.scan(HashRange::FULL, cursor, nz(7)).await, ctx);
        entries.extend(page.entries);
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(
        entries,
        model.entries(&HashRange::FULL),
        "{ctx}: a scan still shows a removed record or lost a kept one"
    );
    for buckets in [1, 16] {
        let digest = ok(store.digest(HashRange::FULL, nz32(buckets)).await, ctx);
        assert_eq!(
            digest,
            model.digest(&HashRange::FULL, buckets),
            "{ctx}: a digest still counts a removed record"
        );
    }
    let stats = ok(store.stats().await, ctx);
    assert_eq!(
        (stats.records, stats.tombstones),
        (model.records.len() as u64, model.tombstones()),
        "{ctx}: stats still count a removed record"
    );
}
