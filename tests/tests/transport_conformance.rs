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
    let quic_options: BTreeMap<String, String> = quic_identity_options()
        .into_iter()
        .chain([
            ("preset".to_owned(), "local".to_owned()),
            ("max_frame_len".to_owned(), MAX_FRAME.to_string()),
            ("connect_timeout_ms".to_owned(), "500".to_owned()),
            ("close_timeout_ms".to_owned(), "5000".to_owned()),
        ])
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
        Kit::from_registry(
            Arc::clone(&registry),
            "quic",
            quic_options,
            MAX_FRAME,
            Duration::from_millis(500),
            Raw::Udp,
        ),
    ]
}

/// Numbers the identity directories of this test process.
static NEXT_IDENTITY_DIR: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Writes a fresh identity to PEM files and returns the `cert`, `key` and `trust` options.
/// Every quic node of the suite shares it (one certificate per cluster); mutual
/// authentication between distinct certificates is tested in the quic crate and in
/// `untrusted_quic_peer_is_refused` below.
fn quic_identity_options() -> BTreeMap<String, String> {
    // Tests run in parallel: each identity gets its own directory, or one test could read
    // another's certificate with its own key.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "quic-conformance-{}-{}",
        std::process::id(),
        NEXT_IDENTITY_DIR.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let identity = chorus::transport_quic::Identity::generate(&[]).expect("identity");
    let (cert, key) = (dir.join("node.crt"), dir.join("node.key"));
    std::fs::write(&cert, identity.cert_pem()).expect("write cert");
    std::fs::write(&key, identity.key_pem()).expect("write key");
    let cert = cert.display().to_string();
    [
        ("cert".to_owned(), cert.clone()),
        ("key".to_owned(), key.display().to_string()),
        ("trust".to_owned(), cert),
    ]
    .into_iter()
    .collect()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hijack() {
    on_every_transport(suite::HIJACK).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreliable() {
    on_every_transport(suite::UNRELIABLE).await;
}

/// Two quic nodes bound through the registry, each trusting only itself: neither reaches
/// the other, and nothing is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_quic_peer_is_refused() {
    use chorus::Transport;
    use chorus::TransportSpec;
    use chorus::transport::TransportError;

    let registry = chorus::registry();
    let bind = |options: BTreeMap<String, String>| {
        let mut spec = TransportSpec::new("quic", "127.0.0.1:0");
        spec.options = options;
        spec.options.insert("preset".to_owned(), "local".to_owned());
        registry.bind_transport(spec)
    };
    let a = bind(quic_identity_options()).await.expect("a");
    let b = bind(quic_identity_options()).await.expect("b");
    let mut rng_frame = {
        use rand::SeedableRng;
        rand_chacha::ChaCha8Rng::seed_from_u64(conformance::seed())
    };
    let f = suite::frame(64, &mut rng_frame);
    match a.send(&b.local_addr(), f.clone()).await {
        Err(TransportError::Unreachable { source, .. }) => {
            let reason = source.to_string();
            assert!(reason.to_lowercase().contains("certificate"), "{reason}")
        }
        other => panic!("a dialled an untrusted b: {other:?}"),
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), b.recv())
            .await
            .is_err(),
        "b received a frame from an untrusted peer"
    );
    a.close().await;
    b.close().await;
}

#[test]
fn the_suite_lists_every_check() {
    assert_eq!(suite::ALL.len(), 9);
}
