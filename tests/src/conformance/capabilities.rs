//! What a backend says about itself ([`Capabilities`]) against what it does.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chorus::hash::HashRange;
use chorus::record::Record;
use chorus::storage::{Capabilities, Storage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Backend;
use super::support::{nz, ok, random_keys, random_record, version};

/// How long a record that was collectable long ago may take to go from a backend that
/// expires collectable records with a grace of at most [`SHORT_GRACE`].
const EVICTION_WAIT: Duration = Duration::from_secs(10);

/// Expiry graces up to this are waited for; longer ones are not checked.
const SHORT_GRACE: Duration = Duration::from_secs(1);

/// The capabilities are the same for every store of the backend and do not change as it fills.
/// A backend that keeps everything it holds ([`Capabilities::keeps_everything_within`] the
/// bytes written) still holds every record, records long collectable included, when read back
/// by key and by scan. A backend that expires collectable records on its own after a short
/// grace drops one that was collectable long ago, within a bounded wait, and keeps a record
/// without expiry beside it.
pub async fn capabilities(backend: &Backend, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6361_7073);
    let store = backend.open();
    let caps = store.capabilities();
    assert_eq!(
        caps,
        backend.capabilities(),
        "two stores of one backend report different capabilities"
    );

    // Logical timestamps decades in the past: every tombstone and expiring value is long
    // collectable by the wall clock, and some values are a few KiB.
    let keys = random_keys(&mut rng, 400, 12);
    let mut written = Vec::new();
    for key in &keys {
        let tombstone = rng.random_bool(0.3);
        let record = random_record(&mut rng, tombstone);
        ok(
            store.apply(key.clone(), record.clone()).await,
            format!("apply {key:?}"),
        );
        written.push((key.clone(), record));
    }
    assert_eq!(
        store.capabilities(),
        caps,
        "the capabilities changed while the store filled"
    );
    let stats = ok(store.stats().await, "stats");

    if caps.keeps_everything_within(stats.bytes) {
        for (key, record) in &written {
            let got = ok(store.get(key).await, format!("get {key:?}"));
            assert_eq!(
                got.as_ref(),
                Some(record),
                "{caps:?} promises to keep {key:?}, collectable or not"
            );
        }
        let page = ok(
            store.scan(HashRange::FULL, None, nz(keys.len() + 1)).await,
            "scan",
        );
        assert_eq!(
            page.entries.len(),
            written.len(),
            "{caps:?}: a full scan returns everything written"
        );
        assert_eq!(
            stats.records,
            written.len() as u64,
            "{caps:?}: stats count everything written"
        );
    }

    if let Some(after) = short_expiry(&caps) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let lasting = Record::value("lasting", version(now_ms, 0, 1));
        ok(
            store
                .apply(Bytes::from_static(b"lasting"), lasting.clone())
                .await,
            "apply a lasting value",
        );
        ok(
            store
                .apply(
                    Bytes::from_static(b"gone"),
                    Record::tombstone(version(1_000, 0, 1)),
                )
                .await,
            "apply a long-collectable tombstone",
        );
        let deadline = Instant::now() + after + EVICTION_WAIT;
        while ok(store.get(b"gone").await, "get the tombstone").is_some() {
            assert!(
                Instant::now() < deadline,
                "{caps:?}: a tombstone collectable for decades was not evicted within \
                 {after:?} + {EVICTION_WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            ok(store.get(b"lasting").await, "get the lasting value"),
            Some(lasting),
            "{caps:?}: a value without expiry is not expired"
        );
    }
    ok(store.close().await, "close");
}

/// The grace after which `caps` evicts collectable records, if it does and the grace is short.
fn short_expiry(caps: &Capabilities) -> Option<Duration> {
    caps.eviction
        .and_then(|eviction| eviction.expires_after)
        .filter(|after| *after <= SHORT_GRACE)
}
