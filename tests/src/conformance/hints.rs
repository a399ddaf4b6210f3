//! The hint namespace: round trips by id, removal, bounds, separation from records and
//! metadata, persistence.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chorus::hash::HashRange;
use chorus::record::Record;
use chorus::storage::{MAX_BATCH, MAX_HINT_LEN, SharedStorage, Storage, StorageError};

use super::Backend;
use super::support::{nz, ok, version};

/// Hints round-trip by id in ascending id order and a later store under the same id replaces
/// the blob; removing ids (stored or not) removes exactly those; more than [`MAX_BATCH`] hints
/// or ids in one call, or a blob over [`MAX_HINT_LEN`] bytes, is refused with
/// [`StorageError::InvalidRequest`] and changes nothing; the largest blob is accepted. Hints
/// never show as records or metadata and survive a purge. On a backend whose durability is
/// persistent and whose stores can be reopened, the hints survive close and reopen, twice,
/// and removals made before a close stay made.
pub async fn hints(backend: &Backend) {
    let (store, reopen) = backend.open_reopenable();
    let mut expected: BTreeMap<u64, Bytes> = BTreeMap::new();
    assert_eq!(
        ok(store.load_hints().await, "load"),
        vec![],
        "a fresh store has hints"
    );
    ok(store.store_hints(Vec::new()).await, "store no hints");
    ok(store.remove_hints(Vec::new()).await, "remove no hints");
    let largest = Bytes::from(vec![0x5a; MAX_HINT_LEN]);
    let batch = vec![
        (7, Bytes::from_static(b"seven")),
        (u64::MAX, Bytes::from_static(b"last")),
        (0, Bytes::new()),
        (3, Bytes::from_static(b"three")),
    ];
    put(&store, &mut expected, batch).await;
    put(
        &store,
        &mut expected,
        vec![(3, Bytes::from_static(b"three again"))],
    )
    .await;
    put(&store, &mut expected, vec![(1 << 40, largest)]).await;
    check(&store, &expected, "after storing").await;

    // Refused requests change nothing.
    let oversized = store
        .store_hints(vec![
            (11, Bytes::from_static(b"fits")),
            (12, Bytes::from(vec![1; MAX_HINT_LEN + 1])),
        ])
        .await;
    assert!(
        matches!(oversized, Err(StorageError::InvalidRequest(_))),
        "a blob of {} bytes: {oversized:?} instead of InvalidRequest",
        MAX_HINT_LEN + 1
    );
    let too_many: Vec<(u64, Bytes)> = (0..=MAX_BATCH as u64)
        .map(|id| (100 + id, Bytes::from_static(b"x")))
        .collect();
    let refused = store.store_hints(too_many).await;
    assert!(
        matches!(refused, Err(StorageError::InvalidRequest(_))),
        "{} hints in one call: {refused:?} instead of InvalidRequest",
        MAX_BATCH + 1
    );
    let refused = store.remove_hints((0..=MAX_BATCH as u64).collect()).await;
    assert!(
        matches!(refused, Err(StorageError::InvalidRequest(_))),
        "{} ids in one removal: {refused:?} instead of InvalidRequest",
        MAX_BATCH + 1
    );
    check(&store, &expected, "after refused requests").await;

    // Removal: exactly the ids named, absent ones ignored.
    ok(store.remove_hints(vec![7, 999, 0]).await, "remove");
    expected.remove(&7);
    expected.remove(&0);
    check(&store, &expected, "after a removal").await;

    // Hints are neither records nor metadata, and a purge leaves them.
    let key = Bytes::from_static(b"3");
    ok(
        store
            .apply(key.clone(), Record::tombstone(version(1_000, 0, 1)))
            .await,
        "apply",
    );
    assert_eq!(
        ok(store.load_meta("3").await, "load_meta"),
        None,
        "a hint shows as metadata"
    );
    ok(store.purge(u64::MAX, Duration::ZERO).await, "purge");
    check(&store, &expected, "after a purge").await;
    let page = ok(store.scan(HashRange::FULL, None, nz(10)).await, "scan");
    assert!(
        page.entries.is_empty(),
        "hints show in a scan: {:?}",
        page.entries.iter().map(|e| &e.key).collect::<Vec<_>>()
    );

    let persistent = store.capabilities().durability.is_persistent();
    let Some(reopen) = reopen.filter(|_| persistent) else {
        ok(store.close().await, "close");
        return;
    };
    ok(store.close().await, "close");
    let store = reopen();
    check(&store, &expected, "after reopening").await;
    ok(
        store.remove_hints(vec![u64::MAX]).await,
        "remove after reopen",
    );
    expected.remove(&u64::MAX);
    put(
        &store,
        &mut expected,
        vec![(5, Bytes::from_static(b"after reopen"))],
    )
    .await;
    ok(store.close().await, "close");
    let store = reopen();
    check(&store, &expected, "after reopening twice").await;
    ok(store.close().await, "close");
}

async fn put(store: &SharedStorage, expected: &mut BTreeMap<u64, Bytes>, hints: Vec<(u64, Bytes)>) {
    ok(store.store_hints(hints.clone()).await, "store hints");
    expected.extend(hints);
}

async fn check(store: &SharedStorage, expected: &BTreeMap<u64, Bytes>, ctx: &str) {
    let got = ok(store.load_hints().await, format!("{ctx}: load"));
    let want: Vec<(u64, Bytes)> = expected.iter().map(|(i, b)| (*i, b.clone())).collect();
    if got != want {
        let ids = |v: &[(u64, Bytes)]| v.iter().map(|(i, b)| (*i, b.len())).collect::<Vec<_>>();
        panic!(
            "{ctx}: hints (id, length) {:?}, expected {:?}",
            ids(&got),
            ids(&want)
        );
    }
}
