//! What a closed store answers.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use chorus::hash::HashRange;
use chorus::record::Record;
use chorus::storage::{Storage, StorageError};

use super::Backend;
use super::support::{nz, nz32, ok, version};

/// After [`Storage::close`] succeeds, every operation, a second close included, fails with
/// [`StorageError::Closed`].
pub async fn closed(backend: &Backend) {
    let store = backend.open();
    let key = Bytes::from_static(b"key");
    let record = Record::value("value", version(1, 0, 1));
    ok(
        store.apply(key.clone(), record.clone()).await,
        "apply before close",
    );
    ok(store.flush().await, "flush before close");
    ok(store.close().await, "close");

    fn refused<T: fmt::Debug>(result: Result<T, StorageError>, what: &str) {
        assert!(
            matches!(result, Err(StorageError::Closed)),
            "{what} after close: {result:?}"
        );
        if let Err(err) = result {
            assert!(
                !err.is_retryable(),
                "{what} after close: {err} must not say a retry can help"
            );
        }
    }
    refused(store.get(&key).await, "get");
    refused(
        store
            .apply(key.clone(), Record::value("newer", version(2, 0, 1)))
            .await,
        "apply",
    );
    refused(
        store
            .apply_batch(vec![(
                key.clone(),
                Record::value("newer", version(2, 0, 1)),
            )])
            .await,
        "apply_batch",
    );
    refused(store.apply_batch(Vec::new()).await, "an empty apply_batch");
    refused(store.load_meta("name").await, "load_meta");
    refused(
        store.store_meta("name", Bytes::from_static(b"v")).await,
        "store_meta",
    );
    refused(
        store.store_hints(vec![(1, Bytes::from_static(b"h"))]).await,
        "store_hints",
    );
    refused(store.load_hints().await, "load_hints");
    refused(store.remove_hints(vec![1]).await, "remove_hints");
    refused(
        store.remove_if_version(&key, record.version).await,
        "remove_if_version",
    );
    refused(store.scan(HashRange::FULL, None, nz(10)).await, "scan");
    refused(store.digest(HashRange::FULL, nz32(4)).await, "digest");
    refused(store.purge(u64::MAX, Duration::ZERO).await, "purge");
    refused(store.stats().await, "stats");
    refused(store.flush().await, "flush");
    refused(store.close().await, "close");
}
