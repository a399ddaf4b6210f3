//! Runs every conformance check against every backend in `chorus::registry()`.
//!
//! Set `CHORUS_SEED` to replay a failing seed; failures print the backend, the check and the
//! seed.

use std::collections::BTreeMap;
use std::sync::Arc;

use chorus_tests::conformance::{self, Backend, Check, Ran};

/// Configurations run besides each backend's defaults, as `(scheme, options)`. Which checks
/// apply to a configuration is decided by its capabilities alone; these only make sure that
/// every check runs on some configuration of every backend ([`every_check_runs_somewhere`]).
const TUNED: &[(&str, &[(&str, &str)])] = &[
    // A cache that does not expire records by the wall clock: the suite's timestamps are
    // logical, decades in the past, so at its defaults it would drop tombstones on arrival.
    // The capacity is pinned (256 MiB, far above what any check writes) rather than left to
    // the backend's default, so the exact checks keep running on it if the default shrinks.
    (
        "moka",
        &[("expiry_grace", "off"), ("capacity_bytes", "268435456")],
    ),
];

/// Every registered backend at its defaults, and the [`TUNED`] configurations.
fn every_backend() -> Vec<Backend> {
    let registry = Arc::new(chorus::registry());
    let names = registry.backend_names();
    for expected in ["memory", "file", "sled", "moka"] {
        assert!(
            names.contains(&expected.to_owned()),
            "this crate's build registers {expected}: {names:?}"
        );
    }
    let mut backends: Vec<Backend> = names
        .iter()
        .map(|name| Backend::from_registry(Arc::clone(&registry), name))
        .collect();
    for (name, options) in TUNED {
        let options: BTreeMap<String, String> = options
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        backends.push(Backend::from_registry_with(
            Arc::clone(&registry),
            name,
            options,
        ));
    }
    backends
}

/// Runs `check` against every backend and fails with all the failures at once.
async fn on_every_backend(check: Check) {
    let backends = every_backend();
    let seed = conformance::seed();
    let mut failures = Vec::new();
    let mut ran = 0;
    for backend in &backends {
        match conformance::run_check(backend, &check, seed).await {
            Ok(Ran::Passed) => ran += 1,
            Ok(Ran::Skipped(why)) => eprintln!("{} skips {:?}: {why}", backend.name(), check.name),
            Err(failure) => failures.push(failure.to_string()),
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
    assert!(ran > 0, "{:?} ran on no backend", check.name);
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
async fn stale_outcomes() {
    on_every_backend(conformance::STALE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apply_batch() {
    on_every_backend(conformance::BATCH).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metadata() {
    on_every_backend(conformance::META).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hints() {
    on_every_backend(conformance::HINTS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remove_if_version() {
    on_every_backend(conformance::REMOVE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capabilities() {
    on_every_backend(conformance::CAPABILITIES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backends_agree() {
    // Only backends that keep everything can be compared record for record.
    let backends: Vec<Backend> = every_backend()
        .into_iter()
        .filter(Backend::keeps_everything)
        .collect();
    let seed = conformance::seed();
    let names: Vec<String> = backends.iter().map(|b| b.name().to_owned()).collect();
    assert!(names.len() >= 4, "too few backends to compare: {names:?}");
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

/// Skipping by capabilities must not leave a backend without a check: each check applies to
/// at least one configuration of every registered backend.
#[test]
fn every_check_runs_somewhere() {
    let backends = every_backend();
    let mut missing = Vec::new();
    for scheme in chorus::registry().backend_names() {
        let configurations: Vec<&Backend> = backends
            .iter()
            .filter(|b| b.name() == scheme || b.name().starts_with(&format!("{scheme}{{")))
            .collect();
        for check in &conformance::ALL {
            if configurations
                .iter()
                .all(|b| check.skip_reason(b).is_some())
            {
                missing.push(format!("{scheme}: {}", check.name));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "checks that run on no configuration: {missing:?}"
    );
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
            "stale_outcomes",
            "apply_batch",
            "metadata",
            "hints",
            "remove_if_version",
            "capabilities",
            "closed"
        ]
    );
}
