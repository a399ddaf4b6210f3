//! The metadata namespace: round trips, validation, separation from records, persistence.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chorus::hash::HashRange;
use chorus::record::Record;
use chorus::storage::{
    MAX_META_LEN, MAX_META_NAME_LEN, PurgeStats, SharedStorage, Storage, StorageError,
};

use super::Backend;
use super::support::{Model, nz, nz32, ok, version};

/// Metadata values round-trip by name and are replaced by a later store; names are
/// independent of each other and of record keys; invalid names (empty, too long, a byte
/// outside `[a-z0-9._-]`) and values over [`MAX_META_LEN`] are refused with
/// [`StorageError::InvalidRequest`] and change nothing; the longest name and value are
/// accepted. Metadata never shows in scans, digests or stats and survives a purge that removes
/// every collectable record. On a backend whose durability is persistent and whose stores can
/// be reopened ([`Backend::open_reopenable`]), every value survives close and reopen, twice,
/// beside the records.
pub async fn metadata(backend: &Backend) {
    let (store, reopen) = backend.open_reopenable();
    let mut expected: BTreeMap<String, Bytes> = BTreeMap::new();
    let longest_name = "z".repeat(MAX_META_NAME_LEN);
    for name in ["hlc.floor", "generation", longest_name.as_str()] {
        assert_eq!(
            ok(store.load_meta(name).await, format!("load {name:?}")),
            None,
            "a fresh store has no metadata {name:?}"
        );
    }
    for (name, value) in [
        ("hlc.floor", Bytes::from_static(b"\x00\x01floor")),
        ("generation", Bytes::from_static(b"1")),
        ("generation", Bytes::from_static(b"2")),
        ("empty", Bytes::new()),
        (longest_name.as_str(), Bytes::from(vec![0xa5; MAX_META_LEN])),
        ("0-9_.", Bytes::from_static(b"odd but valid")),
    ] {
        put(&store, &mut expected, name, value).await;
    }
    check_values(&store, &expected, "after storing").await;

    // Refused requests change nothing.
    let too_long = "a".repeat(MAX_META_NAME_LEN + 1);
    for name in [
        "",
        "Generation",
        "a/b",
        "a b",
        "caf\u{e9}",
        "nul\0",
        &too_long,
    ] {
        let refused = store.store_meta(name, Bytes::from_static(b"x")).await;
        assert!(
            matches!(refused, Err(StorageError::InvalidRequest(_))),
            "store_meta({name:?}): {refused:?} instead of InvalidRequest"
        );
        let refused = store.load_meta(name).await;
        assert!(
            matches!(refused, Err(StorageError::InvalidRequest(_))),
            "load_meta({name:?}): {refused:?} instead of InvalidRequest"
        );
    }
    let oversized = store
        .store_meta("generation", Bytes::from(vec![1; MAX_META_LEN + 1]))
        .await;
    assert!(
        matches!(oversized, Err(StorageError::InvalidRequest(_))),
        "a value of {} bytes: {oversized:?} instead of InvalidRequest",
        MAX_META_LEN + 1
    );
    check_values(&store, &expected, "after refused requests").await;

    // Records and metadata are separate namespaces.
    let mut model = Model::default();
    let records = [
        (
            "generation",
            Record::value("a record", version(1_000, 0, 1)),
        ),
        ("hlc.floor", Record::tombstone(version(1_000, 0, 1))),
        ("other", Record::value("v", version(1_000, 0, 1))),
    ];
    for (key, record) in &records {
        assert_eq!(
            ok(store.get(key.as_bytes()).await, format!("get {key:?}")),
            None,
            "metadata {key:?} shows as a record"
        );
        let key = Bytes::from_static(key.as_bytes());
        ok(store.apply(key.clone(), record.clone()).await, "apply");
        model.apply(&key, record);
    }
    check_values(&store, &expected, "after records of the same names").await;
    // Exact record checks need a store that keeps every record; metadata is never evicted.
    let exact = backend.keeps_everything();
    if exact {
        check_records(&store, &model, "beside metadata").await;
    }
    // Everything collectable goes (the tombstone), metadata stays.
    let purged = ok(store.purge(u64::MAX, Duration::ZERO).await, "purge");
    if exact {
        assert_eq!(purged, PurgeStats::new(1, 0), "purge counts only records");
    }
    model.purge(u64::MAX, Duration::ZERO);
    check_values(&store, &expected, "after a purge").await;
    if exact {
        check_records(&store, &model, "after a purge").await;
    }

    let persistent = store.capabilities().durability.is_persistent();
    let Some(reopen) = reopen.filter(|_| persistent) else {
        ok(store.close().await, "close");
        return;
    };
    ok(store.close().await, "close");
    let store = reopen();
    check_values(&store, &expected, "after reopening").await;
    if exact {
        check_records(&store, &model, "after reopening").await;
    }
    for (name, value) in [("generation", &b"3"[..]), ("new.after-reopen", b"n")] {
        put(&store, &mut expected, name, Bytes::copy_from_slice(value)).await;
    }
    ok(store.close().await, "close");
    let store = reopen();
    check_values(&store, &expected, "after reopening twice").await;
    ok(store.close().await, "close");
}

/// Stores `value` under `name` and notes it in `expected`.
async fn put(
    store: &SharedStorage,
    expected: &mut BTreeMap<String, Bytes>,
    name: &str,
    value: Bytes,
) {
    ok(
        store.store_meta(name, value.clone()).await,
        format!("store {name:?}"),
    );
    expected.insert(name.to_owned(), value);
}

/// Every name in `expected` loads its value.
async fn check_values(store: &SharedStorage, expected: &BTreeMap<String, Bytes>, ctx: &str) {
    for (name, value) in expected {
        let got = ok(store.load_meta(name).await, format!("{ctx}: load {name:?}"));
        assert_eq!(got.as_ref(), Some(value), "{ctx}: metadata {name:?}");
    }
}

/// Scans, digests and stats see the model's records and nothing else.
async fn check_records(store: &SharedStorage, model: &Model, ctx: &str) {
    let page = ok(store.scan(HashRange::FULL, None, nz(100)).await, ctx);
    assert_eq!(
        page.entries,
        model.entries(&HashRange::FULL),
        "{ctx}: a scan shows metadata or loses records"
    );
    for buckets in [1, 16] {
        let digest = ok(store.digest(HashRange::FULL, nz32(buckets)).await, ctx);
        assert_eq!(
            digest,
            model.digest(&HashRange::FULL, buckets),
            "{ctx}: a digest counts metadata or loses records"
        );
    }
    let stats = ok(store.stats().await, ctx);
    assert_eq!(
        (stats.records, stats.tombstones),
        (model.records.len() as u64, model.tombstones()),
        "{ctx}: stats count metadata or lose records"
    );
}
