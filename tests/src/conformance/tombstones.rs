//! Deletes and garbage collection, step by step.

use std::time::Duration;

use bytes::Bytes;
use chorus::hash::{HashRange, key_hash};
use chorus::hlc::Version;
use chorus::record::Record;
use chorus::storage::{ApplyOutcome, Entry, PurgeStats, RangeDigest, ScanPage, Storage};

use super::Backend;
use super::support::{nz, nz32, ok, version};

/// Deletes and garbage collection, step by step.
///
/// A tombstone shadows an older value, is returned by `get`, `scan` and `digest` like a value,
/// refuses an older value that arrives late, and yields to a newer value. `purge` removes a
/// tombstone only once its write time plus the grace period has passed, and an expiring value
/// only once its expiry plus the grace period has passed; values without expiry are never
/// purged. Stats count records and tombstones throughout.
pub async fn tombstones(backend: &Backend) {
    let store = backend.open();
    let grace = Duration::from_millis(100);
    let stats = |expected: (u64, u64), what: &'static str| {
        let store = store.clone();
        async move {
            let stats = ok(store.stats().await, what);
            assert_eq!(
                (stats.records, stats.tombstones),
                expected,
                "{what}: (records, tombstones)"
            );
        }
    };
    let apply = |key: &'static str, record: Record, expected: ApplyOutcome| {
        let store = store.clone();
        async move {
            let what = format!("apply {key:?} {record:?}");
            let outcome = ok(
                store
                    .apply(Bytes::from_static(key.as_bytes()), record)
                    .await,
                &what,
            );
            assert_eq!(outcome, expected, "{what}");
        }
    };
    let get = |key: &'static str| {
        let store = store.clone();
        async move { ok(store.get(key.as_bytes()).await, format!("get {key:?}")) }
    };
    let applied = |previous: Option<Version>| ApplyOutcome::Applied { previous };
    let stale = |current: &Record| ApplyOutcome::Stale {
        current: current.clone(),
    };

    let value = Record::value("v1", version(1_000, 0, 1));
    let delete = Record::tombstone(version(1_010, 0, 1));
    let late = Record::value("late", version(1_005, 0, 2));
    let rewrite = Record::value("v2", version(1_020, 0, 1));

    apply("k", value.clone(), applied(None)).await;
    apply("k", delete.clone(), applied(Some(value.version))).await;
    assert_eq!(
        get("k").await,
        Some(delete.clone()),
        "the tombstone is readable"
    );
    apply("k", late, stale(&delete)).await;
    apply("k", value, stale(&delete)).await;
    assert_eq!(
        get("k").await,
        Some(delete.clone()),
        "the tombstone shadows older values"
    );
    stats((1, 1), "after the delete").await;

    let page = ok(store.scan(HashRange::FULL, None, nz(10)).await, "scan");
    let expected = Entry {
        hash: key_hash(b"k"),
        key: Bytes::from_static(b"k"),
        record: delete.clone(),
    };
    assert_eq!(
        page,
        ScanPage {
            entries: vec![expected],
            next: None
        },
        "scans return tombstones"
    );
    let digest = ok(store.digest(HashRange::FULL, nz32(1)).await, "digest");
    assert_eq!(
        digest,
        [RangeDigest {
            count: 1,
            hash: delete.fingerprint(b"k")
        }],
        "digests count tombstones"
    );

    // Within the grace period the tombstone stays.
    let purged = ok(store.purge(1_010 + 99, grace).await, "purge within grace");
    assert_eq!(
        purged,
        PurgeStats::default(),
        "purge within the grace period"
    );
    assert_eq!(
        get("k").await,
        Some(delete.clone()),
        "the tombstone survives the grace period"
    );

    apply("k", rewrite.clone(), applied(Some(delete.version))).await;
    assert_eq!(
        get("k").await,
        Some(rewrite.clone()),
        "a newer value overrides the tombstone"
    );
    stats((1, 0), "after the rewrite").await;
    let purged = ok(
        store.purge(u64::MAX, Duration::ZERO).await,
        "purge of a live value",
    );
    assert_eq!(
        purged,
        PurgeStats::default(),
        "a value without expiry is never purged"
    );

    // A tombstone for a key never seen is stored too, and collected after the grace period.
    let ghost = Record::tombstone(version(1_500, 0, 3));
    apply("ghost", ghost.clone(), applied(None)).await;
    stats((2, 1), "after the ghost tombstone").await;
    let purged = ok(
        store.purge(1_599, grace).await,
        "purge 1 ms before the grace ends",
    );
    assert_eq!(
        purged,
        PurgeStats::default(),
        "purge 1 ms before the grace period ends"
    );
    assert_eq!(
        get("ghost").await,
        Some(ghost),
        "the ghost tombstone is kept until then"
    );
    let purged = ok(store.purge(1_600, grace).await, "purge when the grace ends");
    assert_eq!(
        purged,
        PurgeStats::new(1, 0),
        "purge when the grace period ends"
    );
    assert_eq!(get("ghost").await, None, "the purged tombstone is gone");
    stats((1, 0), "after purging the tombstone").await;
    // Without its tombstone the key accepts an older value again: the grace period exists to
    // make sure every replica saw the tombstone before this can happen.
    apply(
        "ghost",
        Record::value("old", version(1_400, 0, 3)),
        applied(None),
    )
    .await;

    // Expiring values go only after expiry + grace; a tombstone's grace runs from its write.
    let ttl = Record::value("ttl", version(1_000, 0, 1)).with_expiry(5_000);
    apply("ttl", ttl.clone(), applied(None)).await;
    let purged = ok(
        store.purge(5_099, grace).await,
        "purge before expiry + grace",
    );
    assert_eq!(
        purged,
        PurgeStats::default(),
        "an expired value survives its grace period"
    );
    assert_eq!(
        get("ttl").await,
        Some(ttl),
        "expired values are returned as stored"
    );
    let purged = ok(store.purge(5_100, grace).await, "purge at expiry + grace");
    assert_eq!(purged, PurgeStats::new(0, 1), "purge at expiry + grace");
    assert_eq!(get("ttl").await, None, "the expired value is gone");
    assert_eq!(
        get("k").await,
        Some(rewrite),
        "live values are untouched by purges"
    );
    stats((2, 0), "at the end").await;
}
