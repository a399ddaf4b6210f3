//! Runs every transport conformance check against the in-process, tcp and quic transports.
//!
//! Set `CHORUS_SEED` to replay a failing seed; failures print the transport, the check and the
//! seed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chorus_tests::conformance;
use chorus_tests::transport_conformance::{self as suite, Check, Kit, Raw};

/// Largest frame the transports under test are configured for: big enough to cross several
/// socket buffers, small enough to keep debug-build tests quick.
const MAX_FRAME: usize = 1024 * 1024;

fn kits() -> Vec<Kit> {
    let registry = Arc::new(chorus::registry());
    let tcp_options: BTreeMap<String, String> = [
        ("preset", "local".to_owned()),
        ("max_frame_len", MAX_FRAME.to_string()),
        ("connect_timeout_ms", "500".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    vec![
        Kit::inproc(MAX_FRAME),
        Kit::from_registry(
            Arc::clone(&registry),
            "tcp",
            tcp_options,
            MAX_FRAME,
            Duration::from_millis(500),
            Raw::Tcp,
        ),
    ]
}

/// Runs `check` against every transport and fails with all the failures at once.
async fn on_every_transport(check: Check) {
    let seed = conformance::seed();
    let kits = kits();
    let mut failures = Vec::new();
    for kit in &kits {
        if let Err(failure) = suite::run_check(kit, &check, seed).await {
            failures.push(failure.to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} transports failed {:?} ({}):\n{}",
        failures.len(),
        kits.len(),
        check.name,
        check.description,
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_intact() {
    on_every_transport(suite::FRAMES_INTACT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized() {
    on_every_transport(suite::OVERSIZED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart() {
    on_every_transport(suite::RESTART).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable() {
    on_every_transport(suite::UNREACHABLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage() {
    on_every_transport(suite::GARBAGE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown() {
    on_every_transport(suite::SHUTDOWN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc() {
    on_every_transport(suite::RPC).await;
}

#[test]
fn the_suite_lists_every_check() {
    assert_eq!(suite::ALL.len(), 7);
}
