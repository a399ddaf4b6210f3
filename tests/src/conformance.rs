//! The conformance suite every storage backend must pass.
//!
//! The [`Storage`] contract is written once in `chorus_core::storage`; this module checks it
//! against any backend, so every backend (memory, file, sled, moka) is held to the same
//! behaviour by the same code. A backend is described by a [`Backend`]: a name for
//! reports and a factory that opens a fresh, empty store. [`Backend::from_registry`] builds one
//! from a registry name, which is how `tests/backend_conformance.rs` runs every check against
//! every backend `chorus::registry()` lists.
//!
//! The checks are plain async functions ([`model`], [`concurrent_writers`], [`tombstones`],
//! [`ranges`], [`expiry`], [`closed`]) that panic on the first violation. [`run_check`] runs one
//! of the [`ALL`] descriptors in its own task and turns a panic or a hang into a [`Failure`] that
//! names the backend, the check and the seed. [`backends_agree`] compares backends with each
//! other: the same records applied in different orders must give every backend the same scans
//! and digests.
//!
//! # Seeds
//!
//! Randomised checks draw everything from a [`ChaCha8Rng`] seeded with one `u64`. [`seed`] reads
//! it from the `CHORUS_SEED` environment variable ([`SEED_ENV`]; decimal or `0x` hex) and
//! otherwise uses [`DEFAULT_SEED`], so every run checks the same histories and a failure never
//! depends on luck. A failure report says `rerun with CHORUS_SEED=<seed>`; set the variable to
//! other values to explore further histories.
//!
//! # Requirements on the runtime
//!
//! [`run_check`] spawns onto the current Tokio runtime and uses its timer; run it inside a
//! multi-threaded runtime with time enabled (`#[tokio::test(flavor = "multi_thread")]`) so that
//! [`concurrent_writers`] really writes from several threads at once.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chorus::hash::{HashRange, key_hash};
use chorus::hlc::{NodeId, Timestamp, Version};
use chorus::record::Record;
use chorus::storage::{
    ApplyOutcome, Entry, MAX_DIGEST_BUCKETS, PurgeStats, RangeDigest, ScanCursor, ScanPage,
    SharedStorage, Storage, StorageError, after_cursor, scan_order,
};
use chorus::util::BoxFuture;
use chorus::{Registry, StorageSpec};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Environment variable that fixes the seed of the randomised checks.
pub const SEED_ENV: &str = "CHORUS_SEED";

/// How long one check may run before it counts as hung.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// Operations the [`MODEL`] check performs.
pub const MODEL_OPS: usize = 3_000;

/// Opens a fresh, empty store.
type Opener = Arc<dyn Fn() -> SharedStorage + Send + Sync>;

/// A backend under test: a name for reports and a factory of fresh stores.
#[derive(Clone)]
pub struct Backend {
    name: String,
    open: Opener,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// A backend named `name` whose stores come from `open`.
    ///
    /// Every call of `open` must return a new, empty store that shares nothing with the stores
    /// returned before (for a persistent backend: a fresh directory each time). Failing to open
    /// should panic with a message; the panic is reported as a failure of the running check.
    pub fn new(
        name: impl Into<String>,
        open: impl Fn() -> SharedStorage + Send + Sync + 'static,
    ) -> Self {
        Backend {
            name: name.into(),
            open: Arc::new(open),
        }
    }

    /// The backend registered as `name` in `registry`, opened with no options and a fresh
    /// temporary directory as [`StorageSpec::path`] for every store (volatile backends ignore
    /// it; the directories are removed when the last clone of the `Backend` is dropped).
    pub fn from_registry(registry: Arc<Registry>, name: &str) -> Self {
        Backend::from_registry_with(registry, name, BTreeMap::new())
    }

    /// Like [`Backend::from_registry`], with `options` as [`StorageSpec::options`].
    pub fn from_registry_with(
        registry: Arc<Registry>,
        name: &str,
        options: BTreeMap<String, String>,
    ) -> Self {
        let scheme = name.to_owned();
        let dirs: Mutex<Vec<tempfile::TempDir>> = Mutex::new(Vec::new());
        Backend::new(name, move || {
            let dir = tempfile::Builder::new()
                .prefix("chorus-conformance-")
                .tempdir()
                .unwrap_or_else(|err| panic!("a temporary directory for {scheme:?}: {err}"));
            let mut spec = StorageSpec::new(scheme.as_str());
            spec.path = Some(dir.path().to_owned());
            spec.options = options.clone();
            dirs.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(dir);
            registry
                .open_backend(&spec)
                .unwrap_or_else(|err| panic!("opening backend {scheme:?}: {err}"))
        })
    }

    /// The name used in reports.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A fresh, empty store.
    pub fn open(&self) -> SharedStorage {
        (self.open)()
    }
}

/// One conformance check: a name, what it covers, and how to run it.
#[derive(Clone, Copy)]
pub struct Check {
    /// Short name used in reports.
    pub name: &'static str,
    /// What the check verifies.
    pub description: &'static str,
    run: fn(Backend, u64) -> BoxFuture<'static, ()>,
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Check")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// [`model`] as a [`Check`].
pub const MODEL: Check = Check {
    name: "model",
    description: "random operations agree with a BTreeMap model merged with Record::merge",
    run: |backend, seed| Box::pin(async move { model(&backend, seed, MODEL_OPS).await }),
};

/// [`concurrent_writers`] as a [`Check`].
pub const CONCURRENT_WRITERS: Check = Check {
    name: "concurrent_writers",
    description: "concurrent writers to few keys end with the last-writer-wins winner",
    run: |backend, seed| Box::pin(async move { concurrent_writers(&backend, seed).await }),
};

/// [`tombstones`] as a [`Check`].
pub const TOMBSTONES: Check = Check {
    name: "tombstones",
    description: "tombstones shadow older values and are purged only after the grace period",
    run: |backend, _| Box::pin(async move { tombstones(&backend).await }),
};

/// [`ranges`] as a [`Check`].
pub const RANGES: Check = Check {
    name: "ranges",
    description: "scans and digests of wrapping ranges: exact membership, order, paging, buckets",
    run: |backend, seed| Box::pin(async move { ranges(&backend, seed).await }),
};

/// [`closed`] as a [`Check`].
pub const CLOSED: Check = Check {
    name: "closed",
    description: "after close every operation fails with StorageError::Closed",
    run: |backend, _| Box::pin(async move { closed(&backend).await }),
};

/// [`expiry`] as a [`Check`].
pub const EXPIRY: Check = Check {
    name: "expiry",
    description: "expired values are stored and read as written, and purged only after expiry plus grace",
    run: |backend, _| Box::pin(async move { expiry(&backend).await }),
};

/// Every check, in the order [`run_all`] runs them.
pub const ALL: [Check; 6] = [
    MODEL,
    CONCURRENT_WRITERS,
    TOMBSTONES,
    RANGES,
    EXPIRY,
    CLOSED,
];

/// A check that failed on a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Name of the backend.
    pub backend: String,
    /// Name of the check.
    pub check: &'static str,
    /// Seed the check ran with.
    pub seed: u64,
    /// The panic message, or why the check did not finish.
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "backend {:?} failed conformance check {:?} (seed {}; rerun with {SEED_ENV}={}): {}",
            self.backend, self.check, self.seed, self.seed, self.message
        )
    }
}

/// The seed used when [`SEED_ENV`] is not set, so every run (CI included) checks the same
/// histories. Set [`SEED_ENV`] to explore others.
pub const DEFAULT_SEED: u64 = 0xC0FF_EE00_2026_1122;

/// The seed for randomised checks: [`SEED_ENV`] if set, otherwise [`DEFAULT_SEED`].
///
/// # Panics
///
/// If [`SEED_ENV`] is set but is not a decimal or `0x`-prefixed hexadecimal `u64`.
pub fn seed() -> u64 {
    match std::env::var(SEED_ENV) {
        Ok(text) => parse_seed(&text)
            .unwrap_or_else(|| panic!("{SEED_ENV}={text:?} is not a decimal or 0x-hex u64")),
        Err(_) => DEFAULT_SEED,
    }
}

fn parse_seed(text: &str) -> Option<u64> {
    let text = text.trim();
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Runs `check` against `backend` in its own Tokio task, with [`CHECK_TIMEOUT`].
///
/// The check's panic (its assertion message) or its hang becomes a [`Failure`].
pub async fn run_check(backend: &Backend, check: &Check, seed: u64) -> Result<(), Failure> {
    let task = tokio::spawn((check.run)(backend.clone(), seed));
    let message = match tokio::time::timeout(CHECK_TIMEOUT, task).await {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(join)) => match join.try_into_panic() {
            Ok(payload) => panic_message(payload.as_ref()),
            Err(join) => format!("the check's task failed: {join}"),
        },
        Err(_) => format!("did not finish within {CHECK_TIMEOUT:?}"),
    };
    Err(Failure {
        backend: backend.name.clone(),
        check: check.name,
        seed,
        message,
    })
}

/// Runs every check in [`ALL`] against `backend`; returns the failures.
pub async fn run_all(backend: &Backend, seed: u64) -> Vec<Failure> {
    let mut failures = Vec::new();
    for check in &ALL {
        if let Err(failure) = run_check(backend, check, seed).await {
            failures.push(failure);
        }
    }
    failures
}

pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else if let Some(text) = payload.downcast_ref::<&'static str>() {
        (*text).to_owned()
    } else {
        "the check panicked with a non-text payload".to_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers shared by the checks.

fn version(ms: u64, logical: u16, node: u64) -> Version {
    Version::new(Timestamp::new(ms, logical), NodeId(node))
}

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).expect("a page holds at least one entry")
}

fn nz32(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("at least one bucket")
}

fn cursor_of(entry: &Entry) -> ScanCursor {
    ScanCursor {
        hash: entry.hash,
        key: entry.key.clone(),
    }
}

/// Unwraps a storage result, naming the operation on failure.
fn ok<T>(result: Result<T, StorageError>, what: impl fmt::Display) -> T {
    result.unwrap_or_else(|err| panic!("{what}: unexpected error {err}"))
}

/// The reference model: a sorted map whose records are combined with [`Record::merge`].
#[derive(Default)]
struct Model {
    records: BTreeMap<Bytes, Record>,
}

impl Model {
    /// Applies like a backend must, returning the outcome a backend must report.
    fn apply(&mut self, key: &Bytes, record: &Record) -> ApplyOutcome {
        match self.records.get_mut(key) {
            None => {
                self.records.insert(key.clone(), record.clone());
                ApplyOutcome::Applied { previous: None }
            }
            Some(current) => {
                let outcome = if record.supersedes(current) {
                    ApplyOutcome::Applied {
                        previous: Some(current.version),
                    }
                } else {
                    ApplyOutcome::Stale {
                        current: current.version,
                    }
                };
                *current = current.clone().merge(record.clone());
                outcome
            }
        }
    }

    /// Every entry of `range`, in scan order.
    fn entries(&self, range: &HashRange) -> Vec<Entry> {
        entries_in(
            range,
            self.records.iter().map(|(k, r)| (k.clone(), r.clone())),
        )
    }

    fn page(&self, range: &HashRange, cursor: Option<&ScanCursor>, limit: usize) -> ScanPage {
        let mut entries: Vec<Entry> = self
            .entries(range)
            .into_iter()
            .filter(|e| cursor.is_none_or(|c| after_cursor(range, e.hash, &e.key, c)))
            .collect();
        let more = entries.len() > limit;
        entries.truncate(limit);
        let next = if more {
            entries.last().map(cursor_of)
        } else {
            None
        };
        ScanPage { entries, next }
    }

    fn digest(&self, range: &HashRange, buckets: u32) -> Vec<RangeDigest> {
        digest_of(range, buckets, self.records.iter())
    }

    fn purge(&mut self, now_ms: u64, grace: Duration) -> PurgeStats {
        let mut stats = PurgeStats::default();
        self.records.retain(|_, record| {
            if !record.is_collectable(now_ms, grace) {
                return true;
            }
            if record.is_tombstone() {
                stats.tombstones += 1;
            } else {
                stats.expired += 1;
            }
            false
        });
        stats
    }

    fn tombstones(&self) -> u64 {
        self.records.values().filter(|r| r.is_tombstone()).count() as u64
    }
}

/// The entries among `records` whose key hash lies in `range`, in scan order.
fn entries_in(range: &HashRange, records: impl Iterator<Item = (Bytes, Record)>) -> Vec<Entry> {
    let mut entries: Vec<Entry> = records
        .map(|(key, record)| Entry {
            hash: key_hash(&key),
            key,
            record,
        })
        .filter(|e| range.contains(e.hash))
        .collect();
    entries.sort_by(|a, b| scan_order(range, a, b));
    entries
}

/// The digest every backend must compute: fingerprints summed into [`HashRange::bucket_of`].
fn digest_of<'a>(
    range: &HashRange,
    buckets: u32,
    records: impl Iterator<Item = (&'a Bytes, &'a Record)>,
) -> Vec<RangeDigest> {
    let mut digests = vec![RangeDigest::default(); buckets as usize];
    for (key, record) in records {
        let hash = key_hash(key);
        if range.contains(hash) {
            digests[range.bucket_of(hash, nz32(buckets)) as usize].add(record.fingerprint(key));
        }
    }
    digests
}

/// Pages through `range` with `limit` and checks every page against the model's page for the
/// same cursor: same entries, same `next`, hence no skips, repeats or early ends.
async fn check_paging(
    store: &SharedStorage,
    model: &Model,
    range: HashRange,
    limit: usize,
    ctx: &str,
) {
    let mut cursor = None;
    let mut pages = 0usize;
    loop {
        let what = format!("{ctx}: scan {range:?} limit {limit} page {pages} after {cursor:?}");
        let page = ok(store.scan(range, cursor.clone(), nz(limit)).await, &what);
        let expected = model.page(&range, cursor.as_ref(), limit);
        assert_eq!(page, expected, "{what}");
        pages += 1;
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
}

/// A range drawn from several shapes: the full ring (from 0 or from anywhere), arbitrary and
/// wrapping ranges, ranges bounded by key hashes (so boundaries hit keys exactly), and narrow
/// ranges holding about one key.
fn random_range(rng: &mut ChaCha8Rng, keys: &[Bytes]) -> HashRange {
    let some_key_hash = |rng: &mut ChaCha8Rng| key_hash(keys.choose(rng).expect("keys"));
    match rng.random_range(0..6) {
        0 => HashRange::FULL,
        1 => {
            let start = if rng.random_bool(0.5) {
                some_key_hash(rng)
            } else {
                rng.random()
            };
            HashRange::new(start, start)
        }
        2 => HashRange::new(rng.random(), rng.random()),
        3 => {
            let (a, b): (u64, u64) = (rng.random(), rng.random());
            HashRange::new(a.max(b), a.min(b))
        }
        4 => HashRange::new(some_key_hash(rng), some_key_hash(rng)),
        _ => {
            let start = some_key_hash(rng);
            HashRange::new(start, start.wrapping_add(rng.random_range(1..=1u64 << 40)))
        }
    }
}

/// A cursor for `range`: none, at a stored or unstored key, or arbitrary (possibly outside the
/// range, where nothing lies after it).
fn random_cursor(rng: &mut ChaCha8Rng, keys: &[Bytes], model: &Model) -> Option<ScanCursor> {
    match rng.random_range(0..4) {
        0 => None,
        1 if !model.records.is_empty() => {
            let index = rng.random_range(0..model.records.len());
            let key = model
                .records
                .keys()
                .nth(index)
                .expect("index in bounds")
                .clone();
            Some(ScanCursor {
                hash: key_hash(&key),
                key,
            })
        }
        1 | 2 => {
            let key = keys.choose(rng).expect("keys").clone();
            Some(ScanCursor {
                hash: key_hash(&key),
                key,
            })
        }
        _ => Some(ScanCursor {
            hash: rng.random(),
            key: random_bytes(rng, b"abc", 0..4),
        }),
    }
}

fn random_bytes(rng: &mut ChaCha8Rng, alphabet: &[u8], len: std::ops::Range<usize>) -> Bytes {
    let len = rng.random_range(len);
    (0..len)
        .map(|_| *alphabet.choose(rng).expect("alphabet"))
        .collect::<Vec<u8>>()
        .into()
}

/// `count` distinct keys from a small alphabet (shared prefixes, `0x00` and `0xff` bytes), the
/// empty key included.
fn random_keys(rng: &mut ChaCha8Rng, count: usize, max_len: usize) -> Vec<Bytes> {
    let mut keys = BTreeSet::from([Bytes::new()]);
    while keys.len() < count {
        keys.insert(random_bytes(rng, b"abc\x00\xff", 1..max_len + 1));
    }
    let mut keys: Vec<Bytes> = keys.into_iter().collect();
    keys.shuffle(rng);
    keys
}

/// A random value or tombstone from small domains, so that equal versions, equal contents and
/// expiries all occur.
fn random_record(rng: &mut ChaCha8Rng, tombstone: bool) -> Record {
    let version = version(
        rng.random_range(0..2_000),
        rng.random_range(0..2),
        rng.random_range(0..3),
    );
    random_record_at(rng, version, tombstone)
}

fn random_record_at(rng: &mut ChaCha8Rng, version: Version, tombstone: bool) -> Record {
    let record = if tombstone {
        Record::tombstone(version)
    } else if rng.random_bool(0.02) {
        Record::value(random_bytes(rng, b"0123456789", 1_000..3_000), version)
    } else {
        Record::value(random_bytes(rng, b"xyz", 0..4), version)
    };
    let expiry_odds = if tombstone { 0.05 } else { 0.2 };
    if rng.random_bool(expiry_odds) {
        let at = version.timestamp.physical_ms() + rng.random_range(0..500);
        record.with_expiry(at)
    } else {
        record
    }
}

/// A version strictly older than `current`, if there is one.
fn older_version(rng: &mut ChaCha8Rng, current: Version) -> Option<Version> {
    let raw = current.timestamp.as_u64();
    if raw > 0 {
        let timestamp = Timestamp::from_u64(rng.random_range(0..raw));
        Some(Version::new(timestamp, NodeId(rng.random_range(0..4))))
    } else if current.node.0 > 0 {
        Some(Version::new(
            current.timestamp,
            NodeId(rng.random_range(0..current.node.0)),
        ))
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------------
// The checks.

/// Runs `ops` random operations against a fresh store and a [`BTreeMap`] model side by side.
///
/// Operations: apply a value, a tombstone, a strictly older version of a stored key (must be
/// `Stale`), a same-version rival (the merge's tie-breaks decide) or an identical copy (must be
/// `Stale`); get; one scan page with a random range, cursor and limit; digest with a random
/// range and bucket count; purge; stats; flush. Every result is compared with the model. Every
/// 40 operations and at the end, the whole store is compared: a get of every key (stored or
/// not), complete paged scans with small limits through the full ring and through random
/// (often wrapping) ranges, and digests with 1, 7 and 256 buckets.
pub async fn model(backend: &Backend, seed: u64, ops: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let store = backend.open();
    let mut model = Model::default();
    let keys = random_keys(&mut rng, 48, 6);

    for step in 0..ops {
        let roll = rng.random_range(0..100);
        match roll {
            // Apply a value, a tombstone, an older version, a rival or a copy.
            0..=56 => {
                let key = keys.choose(&mut rng).expect("keys").clone();
                let current = model.records.get(&key).cloned();
                let tombstone = rng.random_bool(0.3);
                // The record to apply, and the outcome the operation forces if any.
                let planned = match (roll, current) {
                    (0..=29, _) => Some((random_record(&mut rng, false), None)),
                    (30..=41, _) => Some((random_record(&mut rng, true), None)),
                    (42..=49, Some(current)) => {
                        older_version(&mut rng, current.version).map(|older| {
                            let record = random_record_at(&mut rng, older, tombstone);
                            (
                                record,
                                Some(ApplyOutcome::Stale {
                                    current: current.version,
                                }),
                            )
                        })
                    }
                    (50..=53, Some(current)) => {
                        Some((random_record_at(&mut rng, current.version, tombstone), None))
                    }
                    (_, Some(current)) => {
                        let outcome = ApplyOutcome::Stale {
                            current: current.version,
                        };
                        Some((current, Some(outcome)))
                    }
                    (_, None) => None,
                };
                if let Some((record, forced)) = planned {
                    let what = format!("step {step}: apply {key:?} {record:?}");
                    let outcome = ok(store.apply(key.clone(), record.clone()).await, &what);
                    let expected = model.apply(&key, &record);
                    assert_eq!(outcome, expected, "{what}");
                    if let Some(forced) = forced {
                        assert_eq!(outcome, forced, "{what}");
                    }
                }
            }
            57..=69 => {
                let key = if rng.random_bool(0.9) {
                    keys.choose(&mut rng).expect("keys").clone()
                } else {
                    random_bytes(&mut rng, b"abc\x00\xff", 7..9) // never stored
                };
                let what = format!("step {step}: get {key:?}");
                let got = ok(store.get(&key).await, &what);
                assert_eq!(got.as_ref(), model.records.get(&key), "{what}");
            }
            70..=79 => {
                let range = random_range(&mut rng, &keys);
                let cursor = random_cursor(&mut rng, &keys, &model);
                let limit = rng.random_range(1..=12);
                let what = format!("step {step}: scan {range:?} after {cursor:?} limit {limit}");
                let page = ok(store.scan(range, cursor.clone(), nz(limit)).await, &what);
                assert_eq!(page, model.page(&range, cursor.as_ref(), limit), "{what}");
            }
            80..=87 => {
                let range = random_range(&mut rng, &keys);
                let buckets = rng.random_range(1..=16);
                let what = format!("step {step}: digest {range:?} into {buckets} buckets");
                let digest = ok(store.digest(range, nz32(buckets)).await, &what);
                assert_eq!(digest, model.digest(&range, buckets), "{what}");
            }
            88..=90 => {
                let now_ms = rng.random_range(0..2_600);
                let grace = Duration::from_millis(rng.random_range(0..300));
                let what = format!("step {step}: purge at {now_ms} ms with grace {grace:?}");
                let purged = ok(store.purge(now_ms, grace).await, &what);
                assert_eq!(purged, model.purge(now_ms, grace), "{what}");
            }
            91..=96 => {
                let what = format!("step {step}: stats");
                let stats = ok(store.stats().await, &what);
                let expected = (model.records.len() as u64, model.tombstones());
                assert_eq!(
                    (stats.records, stats.tombstones),
                    expected,
                    "{what}: (records, tombstones)"
                );
                assert!(
                    stats.records == 0 || stats.bytes > 0,
                    "{what}: records but no bytes: {stats:?}"
                );
            }
            _ => ok(store.flush().await, format!("step {step}: flush")),
        }
        if step % 40 == 39 {
            verify_everything(
                &store,
                &model,
                &keys,
                &mut rng,
                &format!("after step {step}"),
            )
            .await;
        }
    }
    verify_everything(&store, &model, &keys, &mut rng, "at the end").await;
}

/// Compares the whole store with the model.
async fn verify_everything(
    store: &SharedStorage,
    model: &Model,
    keys: &[Bytes],
    rng: &mut ChaCha8Rng,
    ctx: &str,
) {
    for key in keys.iter().chain([&Bytes::from_static(b"never-stored")]) {
        let got = ok(store.get(key).await, format!("{ctx}: get {key:?}"));
        assert_eq!(got.as_ref(), model.records.get(key), "{ctx}: get {key:?}");
    }
    let mut ranges = vec![HashRange::FULL];
    // A wrapping range from random ends, and one bounded by two key hashes.
    let (a, b): (u64, u64) = (rng.random(), rng.random());
    ranges.push(HashRange::new(a.max(b), a.min(b)));
    let (a, b) = (key_hash(&keys[0]), key_hash(&keys[1]));
    ranges.push(HashRange::new(a.max(b), a.min(b)));
    ranges.push(random_range(rng, keys));
    for range in ranges {
        let limit = rng.random_range(1..=5);
        check_paging(store, model, range, limit, ctx).await;
        for buckets in [1, 7, 256] {
            let what = format!("{ctx}: digest {range:?} into {buckets} buckets");
            let digest = ok(store.digest(range, nz32(buckets)).await, &what);
            assert_eq!(digest, model.digest(&range, buckets), "{what}");
        }
    }
    let stats = ok(store.stats().await, format!("{ctx}: stats"));
    assert_eq!(
        (stats.records, stats.tombstones),
        (model.records.len() as u64, model.tombstones()),
        "{ctx}: stats (records, tombstones)"
    );
}

/// Four tasks write hundreds of versions each to four keys through one shared store: two in
/// random order, two climbing through versions in locally shuffled order (so they race for new
/// maxima); every writer also applies the same twenty records, so identical copies race. Then
/// a hundred rounds in which all writers, released together by a barrier, apply to one fresh
/// key each round.
///
/// Requires: reading a key back right after applying to it returns that record or a newer one,
/// and a writer's successive reads of a key never go backwards; every `Stale` carries a version
/// at least that of the record it refused; every `Applied` that names a previous version
/// replaced a strictly older one; each key ends with the maximum of its records by [`Record::precedence`] (equal to their [`Record::merge`]); that
/// winner was reported `Applied` at least once; scans, digests and stats match the winners.
/// It does not require every outcome to be exact under concurrency (that `Applied` is reported
/// for exactly the records that were new maxima when applied).
pub async fn concurrent_writers(backend: &Backend, seed: u64) {
    const WRITERS: u64 = 4;
    const PER_WRITER: u64 = 300;
    const SHARED: usize = 20;
    const ROUNDS: usize = 100;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xc0c0_c0c0);
    let keys = random_keys(&mut rng, 4, 4);
    let store = backend.open();

    // Versions are unique per write: writer `w` uses node `w` and distinct timestamps. The
    // shared records use node 99 and are identical in every writer's list.
    let mut shared_ms = BTreeSet::new();
    while shared_ms.len() < SHARED {
        shared_ms.insert(rng.random_range(0..PER_WRITER * 4));
    }
    let shared: Vec<(Bytes, Record)> = shared_ms
        .into_iter()
        .map(|ms| {
            let key = keys.choose(&mut rng).expect("keys").clone();
            let version = version(ms, 0, 99);
            let tombstone = rng.random_bool(0.2);
            (key, random_record_at(&mut rng, version, tombstone))
        })
        .collect();
    // Then rounds in which every writer applies to the same fresh key at the same moment.
    let round_keys: Vec<Bytes> = (0..ROUNDS)
        .map(|r| Bytes::from(format!("round/{r}")))
        .collect();
    let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS as usize));
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let rounds: Vec<(Bytes, Record)> = round_keys
            .iter()
            .map(|key| {
                let version = version(rng.random_range(0..1_000), 0, writer);
                let tombstone = rng.random_bool(0.15);
                (key.clone(), random_record_at(&mut rng, version, tombstone))
            })
            .collect();
        let barrier = Arc::clone(&barrier);
        let mut writes: Vec<(Bytes, Record)> = (0..PER_WRITER)
            .map(|i| {
                let key = keys.choose(&mut rng).expect("keys").clone();
                let version = version(i * 4 + rng.random_range(0..4), 0, writer);
                let tombstone = rng.random_bool(0.15);
                (key, random_record_at(&mut rng, version, tombstone))
            })
            .collect();
        writes.extend(shared.iter().cloned());
        if writer % 2 == 0 {
            // Climbing, shuffled only locally: these writers keep racing each other for new
            // maxima, which is where a non-atomic apply loses updates.
            writes.sort_by_key(|(_, record)| record.version);
            for window in writes.chunks_mut(8) {
                window.shuffle(&mut rng);
            }
        } else {
            writes.shuffle(&mut rng);
        }
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut log = Vec::with_capacity(writes.len());
            let mut last_read: BTreeMap<Bytes, Record> = BTreeMap::new();
            for (i, (key, record)) in writes.into_iter().enumerate() {
                let what = format!("writer {writer}: apply {key:?} {record:?}");
                let outcome = ok(store.apply(key.clone(), record.clone()).await, &what);
                // The stored record only ever moves forward: reading back right after an apply
                // sees the record or something newer, and never less than read before.
                let read = ok(store.get(&key).await, format!("{what}: read back"))
                    .unwrap_or_else(|| panic!("{what}: the key is missing right after the apply"));
                assert!(
                    read.precedence(&record).is_ge(),
                    "{what}: read back an older {read:?}"
                );
                if let Some(before) = last_read.insert(key.clone(), read.clone()) {
                    assert!(
                        read.precedence(&before).is_ge(),
                        "{what}: read {read:?} after {before:?}"
                    );
                }
                match &outcome {
                    ApplyOutcome::Stale { current } => assert!(
                        *current >= record.version,
                        "{what}: Stale with an older current version {current:?}"
                    ),
                    ApplyOutcome::Applied {
                        previous: Some(previous),
                    } => assert!(
                        *previous < record.version,
                        "{what}: Applied over a version {previous:?} that is not older"
                    ),
                    ApplyOutcome::Applied { previous: None } => {}
                }
                log.push((key, record, outcome.is_applied()));
                if i % 8 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            for (key, record) in rounds {
                barrier.wait().await;
                let what = format!("writer {writer}: apply {key:?} {record:?} in a round");
                let outcome = ok(store.apply(key.clone(), record.clone()).await, &what);
                if let ApplyOutcome::Stale { current } = &outcome {
                    assert!(
                        *current >= record.version,
                        "{what}: Stale with an older {current:?}"
                    );
                }
                log.push((key, record, outcome.is_applied()));
            }
            log
        }));
    }
    let mut log = Vec::new();
    for task in tasks {
        match task.await {
            Ok(part) => log.extend(part),
            Err(err) => match err.try_into_panic() {
                Ok(payload) => std::panic::resume_unwind(payload),
                Err(err) => panic!("writer task failed: {err}"),
            },
        }
    }

    let mut model = Model::default();
    for key in keys.iter().chain(&round_keys) {
        let records: Vec<&Record> = log
            .iter()
            .filter(|(k, ..)| k == key)
            .map(|(_, r, _)| r)
            .collect();
        let Some(winner) = records
            .iter()
            .copied()
            .max_by(|a, b| a.precedence(b))
            .cloned()
        else {
            continue;
        };
        let merged = records.iter().copied().cloned().reduce(Record::merge);
        assert_eq!(
            merged.as_ref(),
            Some(&winner),
            "the merge picks the maximum"
        );
        let got = ok(store.get(key).await, format!("get {key:?}"));
        assert_eq!(
            got.as_ref(),
            Some(&winner),
            "key {key:?} must end with the LWW winner"
        );
        // Nothing stored can supersede the winner, so at least one of its applies reports that
        // it won. (That every outcome is exact under concurrency is not required here.)
        let wins = log
            .iter()
            .filter(|(k, r, applied)| k == key && *r == winner && *applied)
            .count();
        assert!(
            wins >= 1,
            "key {key:?}: the winner {winner:?} was never reported Applied"
        );
        model.records.insert(key.clone(), winner);
    }
    check_paging(&store, &model, HashRange::FULL, 2, "after the writers").await;
    let digest = ok(
        store.digest(HashRange::FULL, nz32(4)).await,
        "digest after the writers",
    );
    assert_eq!(
        digest,
        model.digest(&HashRange::FULL, 4),
        "digest after the writers"
    );
    let stats = ok(store.stats().await, "stats after the writers");
    assert_eq!(
        (stats.records, stats.tombstones),
        (model.records.len() as u64, model.tombstones()),
        "stats (records, tombstones) after the writers"
    );
}

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
    let stale = |current: Version| ApplyOutcome::Stale { current };

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
    apply("k", late, stale(delete.version)).await;
    apply("k", value, stale(delete.version)).await;
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
        PurgeStats {
            tombstones: 1,
            expired: 0
        },
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
    assert_eq!(
        purged,
        PurgeStats {
            tombstones: 0,
            expired: 1
        },
        "purge at expiry + grace"
    );
    assert_eq!(get("ttl").await, None, "the expired value is gone");
    assert_eq!(
        get("k").await,
        Some(rewrite),
        "live values are untouched by purges"
    );
    stats((2, 0), "at the end").await;
}

/// Scans and digests over a few hundred keys and many ranges, most of them wrapping.
///
/// For every range: a scan returns exactly the keys whose [`key_hash`] lies in it, in
/// `(offset, key)` order, and paging with limits from 1 to past the end neither skips nor
/// repeats (every page but the last is full, `next` is the last entry's cursor exactly when
/// more remain). Digests have the requested number of buckets, each bucket holds the keys
/// [`HashRange::bucket_of`] assigns to it, the buckets [`RangeDigest::combine`] to the
/// one-bucket digest of the range, and bucket `i` equals the digest of
/// [`HashRange::bucket`]`(i)`.
pub async fn ranges(backend: &Backend, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7261_6e67);
    let store = backend.open();

    // A digest may not ask for more buckets than the contract allows (counts come from peers).
    let too_many = NonZeroU32::new(MAX_DIGEST_BUCKETS + 1).expect("non-zero");
    assert!(
        matches!(
            store.digest(HashRange::FULL, too_many).await,
            Err(StorageError::InvalidRequest(_))
        ),
        "a digest of more than MAX_DIGEST_BUCKETS buckets must be refused"
    );

    // An empty store has nothing in any range.
    let page = ok(
        store.scan(HashRange::FULL, None, nz(3)).await,
        "scan of an empty store",
    );
    assert_eq!(page, ScanPage::default(), "scan of an empty store");
    let digest = ok(
        store.digest(HashRange::FULL, nz32(3)).await,
        "digest of an empty store",
    );
    assert_eq!(
        digest,
        [RangeDigest::default(); 3],
        "digest of an empty store"
    );

    let keys = random_keys(&mut rng, 300, 12);
    let mut stored: Vec<(Bytes, Record)> = Vec::new();
    for key in &keys {
        let tombstone = rng.random_bool(0.2);
        let record = random_record(&mut rng, tombstone);
        let outcome = ok(
            store.apply(key.clone(), record.clone()).await,
            format!("apply {key:?}"),
        );
        assert_eq!(
            outcome,
            ApplyOutcome::Applied { previous: None },
            "first write of {key:?}"
        );
        stored.push((key.clone(), record));
    }
    let mut by_hash: Vec<u64> = keys.iter().map(|k| key_hash(k)).collect();
    by_hash.sort_unstable();
    let (lowest, highest) = (by_hash[0], by_hash[by_hash.len() - 1]);
    let (a, b) = (by_hash[by_hash.len() / 3], by_hash[by_hash.len() * 2 / 3]);
    let mut ranges = vec![
        HashRange::FULL,
        // The full ring starting at a key.
        HashRange::new(a, a),
        // Wrapping ranges that start and end exactly on key hashes: the start is inside, the
        // end outside.
        HashRange::new(b, a),
        HashRange::new(highest, lowest),
        HashRange::new(highest, lowest.wrapping_add(1)),
        // Just one key; and wrapping around zero.
        HashRange::new(a, a.wrapping_add(1)),
        HashRange::new(u64::MAX - (1 << 62), 1 << 62),
        // Not wrapping.
        HashRange::new(a, b),
    ];
    for _ in 0..6 {
        let (x, y): (u64, u64) = (rng.random(), rng.random());
        ranges.push(HashRange::new(x.max(y), x.min(y)));
    }

    for range in ranges {
        let expected = entries_in(&range, stored.iter().cloned());
        let inside = stored
            .iter()
            .filter(|(k, _)| range.contains(key_hash(k)))
            .count();
        assert_eq!(expected.len(), inside, "the reference scan of {range:?}");
        if range.start == a {
            let first = expected.first().map(|e| e.hash);
            assert_eq!(
                first,
                Some(a),
                "{range:?}: the key at the start comes first"
            );
        }
        if !range.is_full() {
            assert!(
                expected.iter().all(|e| e.hash != range.end),
                "{range:?} excludes its end"
            );
        }

        let mut limits = vec![1, 2, 3, 7, 64, expected.len() + 1];
        limits.extend((!expected.is_empty()).then_some(expected.len()));
        for limit in limits {
            let mut seen: Vec<Entry> = Vec::new();
            let mut cursor: Option<ScanCursor> = None;
            loop {
                let what = format!("scan {range:?} limit {limit} after {cursor:?}");
                let page = ok(store.scan(range, cursor.clone(), nz(limit)).await, &what);
                assert!(
                    page.entries.len() <= limit,
                    "{what}: page longer than the limit"
                );
                seen.extend(page.entries.iter().cloned());
                assert!(
                    seen.len() <= expected.len(),
                    "{what}: more entries than the range holds"
                );
                match page.next {
                    Some(next) => {
                        assert_eq!(
                            page.entries.len(),
                            limit,
                            "{what}: a short page must be the last"
                        );
                        let last = page.entries.last().expect("a full page");
                        assert_eq!(next, cursor_of(last), "{what}: next is the last entry");
                        cursor = Some(next);
                    }
                    None => break,
                }
            }
            assert_eq!(
                seen, expected,
                "scan {range:?} with limit {limit}: paging skipped, repeated or misordered"
            );
        }

        let whole = ok(
            store.digest(range, nz32(1)).await,
            format!("digest {range:?}"),
        );
        let fingerprints = expected.iter().fold(0u64, |sum, e| {
            sum.wrapping_add(e.record.fingerprint(&e.key))
        });
        assert_eq!(
            whole,
            [RangeDigest {
                count: expected.len() as u64,
                hash: fingerprints
            }],
            "one-bucket digest of {range:?}"
        );
        for buckets in [2, 3, 7, 64, 1_000] {
            let what = format!("digest {range:?} into {buckets} buckets");
            let digest = ok(store.digest(range, nz32(buckets)).await, &what);
            assert_eq!(digest.len(), buckets as usize, "{what}: bucket count");
            let combined = digest
                .iter()
                .fold(RangeDigest::default(), |acc, d| acc.combine(*d));
            assert_eq!(combined, whole[0], "{what}: buckets combine to the whole");
            for (i, bucket) in digest.iter().enumerate() {
                let members = expected
                    .iter()
                    .filter(|e| range.bucket_of(e.hash, nz32(buckets)) as usize == i);
                assert_eq!(
                    bucket.count,
                    members.count() as u64,
                    "{what}: bucket {i} count"
                );
            }
            // Each bucket is the digest of its sub-range; an empty sub-range has no positions,
            // so its bucket must be empty.
            if buckets <= 7 {
                for (i, bucket) in digest.iter().enumerate() {
                    let Some(sub) = range.bucket(i as u32, nz32(buckets)) else {
                        assert_eq!(*bucket, RangeDigest::default(), "{what}: empty bucket {i}");
                        continue;
                    };
                    let alone = ok(
                        store.digest(sub, nz32(1)).await,
                        format!("{what}: bucket {i}"),
                    );
                    assert_eq!(alone, [*bucket], "{what}: bucket {i} = digest of {sub:?}");
                }
            }
        }
    }
}

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
            current: later.version
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
        assert_eq!(
            purged,
            PurgeStats {
                tombstones: 0,
                expired: removed.len() as u64
            },
            "{ctx}"
        );
        for key in removed {
            expected.remove(key.as_bytes());
        }
        check_contents(&store, &expected, &ctx).await;
    }
}

/// Whether every backend ends with the same contents, scans and digests after the same
/// records are applied to each in a different order.
///
/// The records: a few hundred keys, several versions each (values, tombstones, expiring values
/// and same-version rivals), shuffled independently per backend. By the merge's commutativity
/// every backend must hold the same winners; then full and partial scans (paged), digests at
/// several bucket counts, gets and stats must be equal between every pair of backends, and
/// equal to the reference computed here.
pub async fn backends_agree(backends: &[Backend], seed: u64) {
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
    }
    refused(store.get(&key).await, "get");
    refused(
        store
            .apply(key.clone(), Record::value("newer", version(2, 0, 1)))
            .await,
        "apply",
    );
    refused(store.scan(HashRange::FULL, None, nz(10)).await, "scan");
    refused(store.digest(HashRange::FULL, nz32(4)).await, "digest");
    refused(store.purge(u64::MAX, Duration::ZERO).await, "purge");
    refused(store.stats().await, "stats");
    refused(store.flush().await, "flush");
    refused(store.close().await, "close");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse_in_decimal_and_hex() {
        assert_eq!(parse_seed("42"), Some(42));
        assert_eq!(parse_seed(" 0x2A "), Some(42));
        assert_eq!(parse_seed("0Xff"), Some(255));
        assert_eq!(parse_seed("forty-two"), None);
        assert_eq!(parse_seed("-1"), None);
    }

    #[test]
    fn model_reports_outcomes_like_a_backend_must() {
        let mut model = Model::default();
        let key = Bytes::from_static(b"k");
        let old = Record::value("a", version(1, 0, 1));
        let new = Record::tombstone(version(2, 0, 1));
        assert_eq!(
            model.apply(&key, &old),
            ApplyOutcome::Applied { previous: None }
        );
        assert_eq!(
            model.apply(&key, &new),
            ApplyOutcome::Applied {
                previous: Some(old.version)
            }
        );
        assert_eq!(
            model.apply(&key, &old),
            ApplyOutcome::Stale {
                current: new.version
            }
        );
        assert_eq!(model.records[&key], new);
        assert_eq!(model.tombstones(), 1);
        assert_eq!(
            model.purge(2, Duration::ZERO),
            PurgeStats {
                tombstones: 1,
                expired: 0
            }
        );
        assert!(model.records.is_empty());
    }

    #[test]
    fn model_pages_cover_a_range_exactly_once() {
        let mut model = Model::default();
        for i in 0..50u32 {
            model.apply(
                &Bytes::from(i.to_string()),
                &Record::value("v", version(1, 0, 1)),
            );
        }
        let range = HashRange::new(u64::MAX / 2, u64::MAX / 4);
        let all = model.entries(&range);
        assert!(
            !all.is_empty() && all.len() < 50,
            "the range holds some keys: {}",
            all.len()
        );
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = model.page(&range, cursor.as_ref(), 3);
            seen.extend(page.entries);
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, all);
    }
}
