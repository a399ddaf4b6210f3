//! Runs every conformance check against every backend in `chorus::registry()`.
//!
//! Set `CHORUS_SEED` to replay a failing seed; failures print the backend, the check and the
//! seed.

use std::sync::Arc;

use chorus_tests::conformance::{self, Backend, Check};

/// Runs `check` against every registered backend and fails with all the failures at once.
async fn on_every_backend(check: Check) {
    let registry = Arc::new(chorus::registry());
    let names = registry.backend_names();
    assert!(
        names.contains(&"memory".to_owned()),
        "the default build registers memory: {names:?}"
    );
    let seed = conformance::seed();
    let mut failures = Vec::new();
    for name in &names {
        let backend = Backend::from_registry(Arc::clone(&registry), name);
        if let Err(failure) = conformance::run_check(&backend, &check, seed).await {
            failures.push(failure.to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} backends failed {:?} ({}):\n{}",
        failures.len(),
        names.len(),
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
            "closed"
        ]
    );
}
