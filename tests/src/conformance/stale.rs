//! What a `Stale` outcome reports: the kept record itself.

use bytes::Bytes;
use chorus::record::Record;
use chorus::storage::{ApplyOutcome, Storage};

use super::Backend;
use super::support::{ok, version};

/// A `Stale` outcome carries exactly the record that was kept (what a `get` right after
/// returns), never the one that was refused: for a stored value (with and without expiry)
/// refusing an older value, an older tombstone and an identical copy; for a stored tombstone
/// refusing an older value; and for same-version rivals (different values, a value and a
/// tombstone, different expiries) applied in both orders on two keys, where the merge's
/// tie-break decides which one is kept and the other order reports it as `Applied`.
pub async fn stale_outcomes(backend: &Backend) {
    let store = backend.open();
    let apply = |key: &str, record: &Record| {
        let store = store.clone();
        let key = Bytes::copy_from_slice(key.as_bytes());
        let record = record.clone();
        async move {
            let what = format!("apply {key:?} {record:?}");
            let outcome = ok(store.apply(key.clone(), record).await, &what);
            let stored = ok(store.get(&key).await, format!("{what}: read back"));
            (outcome, stored, what)
        }
    };
    let stale = |kept: &Record| ApplyOutcome::Stale {
        current: kept.clone(),
    };

    // A stored value refuses older writes and a copy of itself, and reports itself.
    let kept = Record::value("kept", version(5_000, 1, 2));
    let expiring = Record::value("expiring", version(5_000, 0, 1)).with_expiry(9_000);
    for (key, stored) in [("value", &kept), ("expiring", &expiring)] {
        let (outcome, ..) = apply(key, stored).await;
        assert!(outcome.is_applied(), "{key}: first write");
        for refused in [
            Record::value("older", version(4_000, 0, 3)),
            Record::value("older-same-ms", version(5_000, 0, 0)),
            Record::tombstone(version(4_999, 9, 9)),
            stored.clone(),
        ] {
            let (outcome, read, what) = apply(key, &refused).await;
            assert_eq!(
                outcome,
                stale(stored),
                "{what}: Stale must carry the kept record, not the refused one"
            );
            assert_eq!(read.as_ref(), Some(stored), "{what}: the kept record stays");
        }
    }

    // A stored tombstone (with an expiry, which must come back too) reports itself.
    let tombstone = Record::tombstone(version(6_000, 0, 1)).with_expiry(7_000);
    apply("deleted", &Record::value("before", version(1_000, 0, 1))).await;
    let (outcome, ..) = apply("deleted", &tombstone).await;
    assert!(outcome.is_applied(), "the tombstone replaces the value");
    for refused in [
        Record::value("late", version(5_999, 0, 1)),
        Record::value("before", version(1_000, 0, 1)),
        tombstone.clone(),
    ] {
        let (outcome, read, what) = apply("deleted", &refused).await;
        assert_eq!(
            outcome,
            stale(&tombstone),
            "{what}: Stale must carry the kept tombstone"
        );
        assert_eq!(read.as_ref(), Some(&tombstone), "{what}");
    }

    // Same-version rivals, in both orders: whichever is kept is what `Stale` reports.
    let at = version(8_000, 3, 4);
    let rivals = [
        (Record::value("a", at), Record::value("b", at)),
        (Record::value("a", at), Record::tombstone(at)),
        (
            Record::value("a", at).with_expiry(9_000),
            Record::value("a", at).with_expiry(8_500),
        ),
        (
            Record::value("a", at),
            Record::value("a", at).with_expiry(9_000),
        ),
    ];
    for (i, (x, y)) in rivals.iter().enumerate() {
        let winner = x.clone().merge(y.clone());
        for (order, (first, second)) in [(x, y), (y, x)].into_iter().enumerate() {
            let key = format!("rival-{i}-{order}");
            apply(&key, first).await;
            let (outcome, read, what) = apply(&key, second).await;
            let expected = if second.supersedes(first) {
                ApplyOutcome::Applied {
                    previous: Some(first.version),
                }
            } else {
                stale(first)
            };
            assert_eq!(outcome, expected, "{what} over {first:?}");
            assert_eq!(read.as_ref(), Some(&winner), "{what}: the merge is kept");
        }
    }
    ok(store.close().await, "close");
}
