//! Opening backends through the facade's registry with options they do not understand.
//!
//! What the registry lists, and how it reports names that are not compiled in, is tested by
//! the facade itself (`defaults/tests/registry.rs`).

use chorus::RegistryError;
use chorus::StorageSpec;
use chorus::storage::StorageError;

#[test]
fn memory_rejects_unknown_options_by_name() {
    let registry = chorus::registry();
    let mut spec = StorageSpec::new("memory");
    spec.options
        .insert("max_bytes".to_owned(), "1GiB".to_owned());
    match registry.open_backend(&spec).expect_err("unknown option") {
        RegistryError::Storage {
            name,
            source: StorageError::Config(message),
        } => {
            assert_eq!(name, "memory");
            assert!(message.contains("max_bytes"), "{message}");
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

#[tokio::test]
async fn tcp_rejects_unknown_options_by_name() {
    use chorus::TransportSpec;
    use chorus::transport::TransportError;

    let registry = chorus::registry();
    let mut spec = TransportSpec::new("tcp", "127.0.0.1:0");
    spec.options.insert("nagle".to_owned(), "please".to_owned());
    match registry
        .bind_transport(spec)
        .await
        .expect_err("unknown option")
    {
        RegistryError::Transport {
            name,
            source: TransportError::Config(message),
        } => {
            assert_eq!(name, "tcp");
            assert!(message.contains("nagle"), "{message}");
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
}
