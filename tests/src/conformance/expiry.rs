//! Values with an expiry: stored and read as written, purged only after expiry plus grace.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chorus::hash::HashRange;
use chorus::record::Record;
use chorus::storage::{ApplyOutcome, PurgeStats, SharedStorage, Storage};

use super::Backend;
use super::support::{digest_of, entries_in, nz, nz32, ok, version};

/// Values with an expiry are ordinary records until they are collectable: reads, scans,
/// digests and stats return them as written (interpreting the expiry is the caller's job,
/// [`Record::live_value`]); [`Storage::purge`] removes one only once `expires_at + grace` has
/// passed, and counts it as expired, not as a tombstone. Of two records with the same version
/// and value, the earlier expiry wins (the conservative choice of [`Record::precedence`]), and
/// a newer record without expiry is never purged.
pub async fn expiry(backend: &Backend) {
    let store = backend.open();
    let grace = Duration::from_millis(100);
    let soon = Record::value("soon", version(10, 0, 1)).with_expiry(1_000);
    let later = Record::value("later", version(10, 0, 1)).with_expiry(2_000);
    let renewed_old = Record::value("old", version(10, 0, 1)).with_expiry(1_000);
    let renewed = Record::value("renewed", version(20, 0, 1));
    let plain = Record::value("plain", version(10, 0, 1));
    for (key, record) in [
        ("soon", &soon),
        ("later", &later),
        ("renewed", &renewed_old),
        ("renewed", &renewed),
        ("plain", &plain),
    ] {
        ok(
            store.apply(Bytes::from(key), record.clone()).await,
            format!("apply {key}"),
        );
    }
    // Same version and value: the earlier expiry wins, the later one is stale.
    let extended = later.clone().with_expiry(3_000);
    let outcome = ok(
        store.apply(Bytes::from("later"), extended).await,
        "apply a later expiry",
    );
    assert_eq!(
        outcome,
        ApplyOutcome::Stale {
            current: later.clone()
        },
        "a later expiry of the same write is stale"
    );
    let shortened = later.clone().with_expiry(1_500);
    let outcome = ok(
        store.apply(Bytes::from("later"), shortened.clone()).await,
        "apply an earlier expiry",
    );
    assert!(
        outcome.is_applied(),
        "an earlier expiry of the same write wins"
    );
    let expected: BTreeMap<Bytes, Record> = [
        ("soon", soon.clone()),
        ("later", shortened.clone()),
        ("renewed", renewed.clone()),
        ("plain", plain.clone()),
    ]
    .into_iter()
    .map(|(k, r)| (Bytes::from(k), r))
    .collect();

    async fn check_contents(store: &SharedStorage, expected: &BTreeMap<Bytes, Record>, ctx: &str) {
        for key in ["soon", "later", "renewed", "plain"] {
            let got = ok(store.get(key.as_bytes()).await, format!("{ctx}: get {key}"));
            assert_eq!(
                got.as_ref(),
                expected.get(key.as_bytes()),
                "{ctx}: get {key}"
            );
        }
        let page = ok(
            store.scan(HashRange::FULL, None, nz(100)).await,
            format!("{ctx}: scan"),
        );
        let want = entries_in(
            &HashRange::FULL,
            expected.iter().map(|(k, r)| (k.clone(), r.clone())),
        );
        assert_eq!(
            page.entries, want,
            "{ctx}: expired values are scanned as stored"
        );
        let digest = ok(
            store.digest(HashRange::FULL, nz32(4)).await,
            format!("{ctx}: digest"),
        );
        assert_eq!(
            digest,
            digest_of(&HashRange::FULL, 4, expected.iter()),
            "{ctx}: digest"
        );
        let stats = ok(store.stats().await, format!("{ctx}: stats"));
        assert_eq!(
            (stats.records, stats.tombstones),
            (expected.len() as u64, 0),
            "{ctx}: stats"
        );
    }

    // Long after every expiry (the store's clock plays no part): still stored.
    check_contents(&store, &expected, "before any purge").await;
    assert!(soon.live_value(999).is_some() && soon.live_value(1_000).is_none());

    let mut expected = expected;
    for (now_ms, removed) in [
        (1_099, &[][..]),
        (1_100, &["soon"][..]),
        (1_599, &[][..]),
        (1_600, &["later"][..]),
        (u64::MAX, &[][..]),
    ] {
        let ctx = format!("purge at {now_ms} ms with grace {grace:?}");
        let purged = ok(store.purge(now_ms, grace).await, &ctx);
        assert_eq!(purged, PurgeStats::new(0, removed.len() as u64), "{ctx}");
        for key in removed {
            expected.remove(key.as_bytes());
        }
        check_contents(&store, &expected, &ctx).await;
    }
}
