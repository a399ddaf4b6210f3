//! The conformance suite every storage backend must pass.
//!
//! The [`Storage`] contract is written once in
//! `chorus_core::storage`; this module checks it against any backend, so every backend
//! (memory, file, sled, moka) is held to the same behaviour by the same code. A backend is
//! described by a [`Backend`]: a name for reports and a factory that opens a fresh, empty
//! store. [`Backend::from_registry`] builds one from a registry name, which is how
//! `tests/backend_conformance.rs` runs every check against every backend `chorus::registry()`
//! lists.
//!
//! The checks are plain async functions that panic on the first violation, one file per
//! group: [`model`], [`concurrent_writers`], [`tombstones`], [`ranges`], [`expiry`],
//! [`stale_outcomes`], [`apply_batch`], [`metadata`], [`hints`], [`remove_if_version`],
//! [`capabilities`], [`closed`]. [`run_check`] runs one of the [`ALL`] descriptors through the
//! shared [`runner`] and turns a panic or a hang into a [`Failure`] that names
//! the backend, the check and the seed. [`backends_agree`] compares backends with each other:
//! the same records applied in different orders must give every backend the same scans and
//! digests.
//!
//! # What applies to which backend
//!
//! Checks decide by the backend's [`Capabilities`], never by its name. Most compare the store
//! with an exact model, so they need a store that keeps everything it is given
//! ([`Backend::keeps_everything`]: it never evicts, or evicts only above a capacity larger than
//! [`MAX_CHECK_BYTES`] and never expires records on its own); on other backends they are
//! skipped ([`Ran::Skipped`]), and [`capabilities`] checks what such a backend does promise.
//! [`metadata`], [`hints`] and [`remove_if_version`] check persistence across a reopen only where the durability is persistent
//! and the [`Backend`] knows how to reopen its stores ([`Backend::open_reopenable`]).
//!
//! # Seeds
//!
//! Randomised checks draw everything from a `ChaCha8Rng` seeded with one `u64` ([`seed`], from
//! `CHORUS_SEED`, [`SEED_ENV`]); see the [`runner`].
//!
//! # Requirements on the runtime
//!
//! [`run_check`] spawns onto the current Tokio runtime and uses its timer; run it inside a
//! multi-threaded runtime with time enabled (`#[tokio::test(flavor = "multi_thread")]`) so that
//! [`concurrent_writers`] really writes from several threads at once.

mod agreement;
mod batch;
mod capabilities;
mod close;
mod concurrency;
mod expiry;
mod hints;
mod meta;
mod model;
mod ranges;
mod remove;
mod stale;
mod support;
mod tombstones;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use chorus::storage::{Capabilities, SharedStorage, Storage};
use chorus::{Registry, StorageSpec};

use crate::runner::{self, Subject};
pub use crate::runner::{CHECK_TIMEOUT, DEFAULT_SEED, Failure, Ran, SEED_ENV, seed};
pub use agreement::backends_agree;
pub use batch::apply_batch;
pub use capabilities::capabilities;
pub use close::closed;
pub use concurrency::concurrent_writers;
pub use expiry::expiry;
pub use hints::hints;
pub use meta::metadata;
pub use model::model;
pub use ranges::ranges;
pub use remove::remove_if_version;
pub use stale::stale_outcomes;
pub use tombstones::tombstones;

/// Operations the [`MODEL`] check performs.
pub const MODEL_OPS: usize = 3_000;

/// More than any one check stores (in [`StorageStats::bytes`](chorus::storage::StorageStats)):
/// a backend that keeps everything up to this keeps everything the checks write.
pub const MAX_CHECK_BYTES: u64 = 16 << 20;

/// Opens the store [`Backend::open_reopenable`] returned it with again, once that one is
/// closed: same directory, same options.
pub type Reopen = Arc<dyn Fn() -> SharedStorage + Send + Sync>;

/// Opens a fresh, empty store, and says how to reopen it if the backend can.
type Opener = Arc<dyn Fn() -> (SharedStorage, Option<Reopen>) + Send + Sync>;

/// A backend under test: a name for reports and a factory of fresh stores.
#[derive(Clone)]
pub struct Backend {
    name: String,
    open: Opener,
    /// Read from the first store opened for it.
    capabilities: Arc<OnceLock<Capabilities>>,
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
            open: Arc::new(move || (open(), None)),
            capabilities: Arc::new(OnceLock::new()),
        }
    }

    /// The backend registered as `name` in `registry`, opened with no options and a fresh
    /// temporary directory as [`StorageSpec::path`] for every store (volatile backends ignore
    /// it; the directories are removed when the last clone of the `Backend` is dropped). Its
    /// stores can be reopened ([`Backend::open_reopenable`]) from the same directory.
    pub fn from_registry(registry: Arc<Registry>, name: &str) -> Self {
        Backend::from_registry_with(registry, name, BTreeMap::new())
    }

    /// Like [`Backend::from_registry`], with `options` as [`StorageSpec::options`]. The
    /// backend is named `name`, followed by the options if there are any.
    pub fn from_registry_with(
        registry: Arc<Registry>,
        name: &str,
        options: BTreeMap<String, String>,
    ) -> Self {
        let scheme = name.to_owned();
        let label = if options.is_empty() {
            scheme.clone()
        } else {
            let pairs: Vec<String> = options.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{scheme}{{{}}}", pairs.join(","))
        };
        let dirs: Mutex<Vec<tempfile::TempDir>> = Mutex::new(Vec::new());
        let open = move || {
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
            let store = registry
                .open_backend(&spec)
                .unwrap_or_else(|err| panic!("opening backend {scheme:?}: {err}"));
            let registry = Arc::clone(&registry);
            let scheme = scheme.clone();
            let reopen: Reopen = Arc::new(move || {
                registry
                    .open_backend(&spec)
                    .unwrap_or_else(|err| panic!("reopening backend {scheme:?}: {err}"))
            });
            (store, Some(reopen))
        };
        Backend {
            name: label,
            open: Arc::new(open),
            capabilities: Arc::new(OnceLock::new()),
        }
    }

    /// The name used in reports.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A fresh, empty store.
    pub fn open(&self) -> SharedStorage {
        (self.open)().0
    }

    /// A fresh, empty store, and how to open it again after closing it (`None` if the
    /// backend was built without a way to: [`Backend::new`]). What the reopened store holds
    /// is what the backend's durability keeps across a close.
    pub fn open_reopenable(&self) -> (SharedStorage, Option<Reopen>) {
        (self.open)()
    }

    /// What the backend's stores report (read from a store opened for the purpose, the first
    /// time).
    pub fn capabilities(&self) -> Capabilities {
        *self.capabilities.get_or_init(|| self.open().capabilities())
    }

    /// Whether the backend keeps everything a check writes ([`MAX_CHECK_BYTES`]) until it is
    /// purged, so exact checks apply.
    pub fn keeps_everything(&self) -> bool {
        self.capabilities().keeps_everything_within(MAX_CHECK_BYTES)
    }
}

impl Subject for Backend {
    const KIND: &'static str = "backend";

    fn name(&self) -> &str {
        &self.name
    }
}

/// One conformance check of a storage backend.
pub type Check = runner::Check<Backend>;

/// Skips exact checks on a backend that may drop what they write.
fn unless_keeps_everything(backend: &Backend) -> Option<String> {
    (!backend.keeps_everything()).then(|| {
        format!(
            "{:?} may evict records the check writes (up to {MAX_CHECK_BYTES} bytes)",
            backend.capabilities().eviction
        )
    })
}

/// [`model`] as a [`Check`].
pub const MODEL: Check = Check::new(
    "model",
    "random operations agree with a BTreeMap model merged with Record::merge",
    |backend, seed| Box::pin(async move { model(&backend, seed, MODEL_OPS).await }),
)
.skip_when(unless_keeps_everything);

/// [`concurrent_writers`] as a [`Check`].
pub const CONCURRENT_WRITERS: Check = Check::new(
    "concurrent_writers",
    "concurrent writers to few keys end with the last-writer-wins winner",
    |backend, seed| Box::pin(async move { concurrent_writers(&backend, seed).await }),
)
.skip_when(unless_keeps_everything);

/// [`tombstones`] as a [`Check`].
pub const TOMBSTONES: Check = Check::new(
    "tombstones",
    "tombstones shadow older values and are purged only after the grace period",
    |backend, _| Box::pin(async move { tombstones(&backend).await }),
)
.skip_when(unless_keeps_everything);

/// [`ranges`] as a [`Check`].
pub const RANGES: Check = Check::new(
    "ranges",
    "scans and digests of wrapping ranges: exact membership, order, paging, buckets",
    |backend, seed| Box::pin(async move { ranges(&backend, seed).await }),
)
.skip_when(unless_keeps_everything);

/// [`expiry`] as a [`Check`].
pub const EXPIRY: Check = Check::new(
    "expiry",
    "expired values are stored and read as written, and purged only after expiry plus grace",
    |backend, _| Box::pin(async move { expiry(&backend).await }),
)
.skip_when(unless_keeps_everything);

/// [`stale_outcomes`] as a [`Check`].
pub const STALE: Check = Check::new(
    "stale_outcomes",
    "a Stale outcome carries exactly the kept record: values, tombstones, same-version rivals",
    |backend, _| Box::pin(async move { stale_outcomes(&backend).await }),
)
.skip_when(unless_keeps_everything);

/// [`apply_batch`] as a [`Check`].
pub const BATCH: Check = Check::new(
    "apply_batch",
    "apply_batch equals sequential applies and the model; duplicates, empty, MAX_BATCH",
    |backend, seed| Box::pin(async move { apply_batch(&backend, seed).await }),
)
.skip_when(unless_keeps_everything);

/// [`metadata`] as a [`Check`].
pub const META: Check = Check::new(
    "metadata",
    "metadata round-trips, is validated, stays out of records and survives reopening",
    |backend, _| Box::pin(async move { metadata(&backend).await }),
);

/// [`hints`] as a [`Check`].
pub const HINTS: Check = Check::new(
    "hints",
    "hints round-trip by id, are removed, bounded, stay out of records and survive reopening",
    |backend, _| Box::pin(async move { hints(&backend).await }),
);

/// [`remove_if_version`] as a [`Check`].
pub const REMOVE: Check = Check::new(
    "remove_if_version",
    "remove_if_version removes only the version given, never a newer write, and stays removed",
    |backend, seed| Box::pin(async move { remove_if_version(&backend, seed).await }),
)
.skip_when(unless_keeps_everything);

/// [`capabilities`] as a [`Check`].
pub const CAPABILITIES: Check = Check::new(
    "capabilities",
    "the reported capabilities are stable and match what the store keeps and evicts",
    |backend, seed| Box::pin(async move { capabilities(&backend, seed).await }),
);

/// [`closed`] as a [`Check`].
pub const CLOSED: Check = Check::new(
    "closed",
    "after close every operation fails with StorageError::Closed",
    |backend, _| Box::pin(async move { closed(&backend).await }),
);

/// Every check, in the order [`run_all`] runs them.
pub const ALL: [Check; 12] = [
    MODEL,
    CONCURRENT_WRITERS,
    TOMBSTONES,
    RANGES,
    EXPIRY,
    STALE,
    BATCH,
    META,
    HINTS,
    REMOVE,
    CAPABILITIES,
    CLOSED,
];

/// Runs `check` against `backend` in its own Tokio task, with [`CHECK_TIMEOUT`], unless the
/// backend's capabilities exempt it ([`Ran::Skipped`]).
///
/// The check's panic (its assertion message) or its hang becomes a [`Failure`].
pub async fn run_check(backend: &Backend, check: &Check, seed: u64) -> Result<Ran, Failure> {
    runner::run_check(backend, check, seed).await
}

/// Runs every check in [`ALL`] against `backend`; returns the failures.
pub async fn run_all(backend: &Backend, seed: u64) -> Vec<Failure> {
    runner::run_all(backend, &ALL, seed).await
}
