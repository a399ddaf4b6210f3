//! The facade's registry reflects the features this build was compiled with.
//!
//! CI runs this file twice: with default features, and with `--no-default-features`, where the
//! error for "memory" must name the feature that would compile it in.

use chorus::RegistryError;
use chorus::StorageSpec;

#[cfg(feature = "backend-memory")]
#[tokio::test]
async fn memory_is_registered_and_opens() {
    use chorus::Storage;

    let registry = chorus::registry();
    assert!(
        registry.backend_names().contains(&"memory".to_owned()),
        "{:?}",
        registry.backend_names()
    );
    let storage = registry
        .open_backend(&StorageSpec::new("memory"))
        .expect("memory opens");
    assert_eq!(storage.stats().await.expect("stats").records, 0);
}

#[cfg(not(feature = "backend-memory"))]
#[test]
fn missing_memory_names_its_feature() {
    let registry = chorus::registry();
    assert!(!registry.backend_names().contains(&"memory".to_owned()));
    let err = registry
        .open_backend(&StorageSpec::new("memory"))
        .expect_err("not compiled in");
    match &err {
        RegistryError::Unknown {
            name,
            available,
            feature,
            ..
        } => {
            assert_eq!(name, "memory");
            assert_eq!(available, &registry.backend_names());
            assert_eq!(feature.as_deref(), Some("backend-memory"));
        }
        other => panic!("unexpected error {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("`backend-memory`"), "{text}");
}

#[test]
fn unknown_name_lists_available_backends() {
    let registry = chorus::registry();
    let err = registry
        .open_backend(&StorageSpec::new("cassandra"))
        .expect_err("unknown");
    let RegistryError::Unknown {
        available, feature, ..
    } = &err
    else {
        panic!("unexpected error {err:?}")
    };
    assert_eq!(available, &registry.backend_names());
    assert_eq!(feature, &None);
    assert!(
        err.to_string()
            .contains("no crate known to this build provides it"),
        "{err}"
    );
}

#[cfg(feature = "transport-tcp")]
#[tokio::test]
async fn tcp_is_registered_and_binds() {
    use chorus::Transport;
    use chorus::TransportSpec;

    let registry = chorus::registry();
    assert!(registry.transport_names().contains(&"tcp".to_owned()));
    let transport = registry
        .bind_transport(TransportSpec::new("tcp", "127.0.0.1:0"))
        .await
        .expect("tcp binds");
    assert!(transport.local_addr().as_str().starts_with("127.0.0.1:"));
    transport.close().await;
}

#[cfg(not(feature = "transport-tcp"))]
#[tokio::test]
async fn missing_tcp_names_its_feature() {
    use chorus::TransportSpec;

    let registry = chorus::registry();
    let err = registry
        .bind_transport(TransportSpec::new("tcp", "127.0.0.1:0"))
        .await
        .expect_err("not compiled in");
    let text = err.to_string();
    assert!(text.contains("`transport-tcp`"), "{text}");
}

#[cfg(feature = "transport-quic")]
#[tokio::test]
async fn quic_says_which_key_material_it_needs() {
    use chorus::TransportSpec;
    use chorus::transport::TransportError;

    let registry = chorus::registry();
    assert!(registry.transport_names().contains(&"quic".to_owned()));
    match registry
        .bind_transport(TransportSpec::new("quic", "127.0.0.1:0"))
        .await
        .expect_err("no identity given")
    {
        RegistryError::Transport {
            source: TransportError::Config(message),
            ..
        } => assert!(message.contains("`cert`"), "{message}"),
        other => panic!("unexpected error {other:?}"),
    }
}

#[cfg(not(feature = "transport-quic"))]
#[tokio::test]
async fn missing_quic_names_its_feature() {
    use chorus::TransportSpec;

    let registry = chorus::registry();
    let err = registry
        .bind_transport(TransportSpec::new("quic", "127.0.0.1:0"))
        .await
        .expect_err("not compiled in");
    let text = err.to_string();
    assert!(text.contains("`transport-quic`"), "{text}");
}
