//! Runs every conformance check against every backend in `chorus::registry()`.
//!
//! Set `CHORUS_SEED` to replay a failing seed; failures print the backend, the check and the
//! seed.

use std::collections::BTreeMap;
use std::sync::Arc;

use chorus_tests::conformance::{self, Backend, Check};

/// Every registered backend, each with the options the suite needs (see [`options_for`]).
fn every_backend() -> Vec<Backend> {
    let registry = Arc::new(chorus::registry());
    let names = registry.backend_names();
    for expected in ["memory", "file", "sled", "moka"] {
        assert!(
            names.contains(&expected.to_owned()),
            "this crate's build registers {expected}: {names:?}"
        );
    }
    names
        .iter()
        .map(|name| Backend::from_registry_with(Arc::clone(&registry), name, options_for(name)))
        .collect()
}

/// Options under which a backend can meet the whole contract in the suite's terms.
fn options_for(name: &str) -> BTreeMap<String, String> {
    let mut options = BTreeMap::new();
    if name == "moka" {
        // A cache evicts: give it room for everything the suite writes, and do not drop records
        // at wall-clock expiry (the suite's timestamps are logical, decades in the past).
        options.insert("capacity_bytes".to_owned(), (256u64 << 20).to_string());
        options.insert("expiry_grace".to_owned(), "off".to_owned());
    }
    options
}

/// Runs `check` against every registered backend and fails with all the failures at once.
async fn on_every_backend(check: Check) {
    let backends = every_backend();
    let seed = conformance::seed();
    let mut failures = Vec::new();
    for backend in &backends {
        if let Err(failure) = conformance::run_check(backend, &check, seed).await {
            failures.push(failure.to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} backends failed {:?} ({}):\n{}",
        failures.len(),
        backends.len(),
        check.name,
        check.description,
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model() {
    on_every_backend(conformance::MODEL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers() {
    on_every_backend(conformance::CONCURRENT_WRITERS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tombstones() {
    on_every_backend(conformance::TOMBSTONES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ranges() {
    on_every_backend(conformance::RANGES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expiry() {
    on_every_backend(conformance::EXPIRY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backends_agree() {
    let backends = every_backend();
    let seed = conformance::seed();
    let names: Vec<&str> = backends.iter().map(Backend::name).collect();
    let task = tokio::spawn({
        let backends = backends.clone();
        async move { conformance::backends_agree(&backends, seed).await }
    });
    if let Err(err) = task.await {
        panic!(
            "backends {names:?} disagree (seed {seed}; rerun with {}={seed}): {err}",
            conformance::SEED_ENV
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closed() {
    on_every_backend(conformance::CLOSED).await;
}

#[test]
fn every_check_has_a_test() {
    let names: Vec<&str> = conformance::ALL.iter().map(|check| check.name).collect();
    assert_eq!(
        names,
        [
            "model",
            "concurrent_writers",
            "tombstones",
            "ranges",
            "expiry",
            "closed"
        ]
    );
}
