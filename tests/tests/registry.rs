//! The facade's registry: what the default build registers and how missing names are reported.

use chorus::RegistryError;
use chorus::registry::{Kind, StorageSpec};
use chorus::storage::StorageError;

#[test]
fn default_build_registers_memory() {
    let registry = chorus::registry();
    assert!(
        registry.backend_names().contains(&"memory".to_owned()),
        "{registry:?}"
    );
    assert_eq!(chorus::backend_memory::SCHEME, "memory");
    assert!(registry.open_backend(&StorageSpec::new("memory")).is_ok());
}

#[test]
fn unknown_backend_lists_the_available_ones() {
    let registry = chorus::registry();
    let err = registry
        .open_backend(&StorageSpec::new("no-such-backend"))
        .err()
        .expect("unknown");
    let text = err.to_string();
    match err {
        RegistryError::Unknown {
            kind,
            name,
            available,
            feature,
        } => {
            assert_eq!(kind, Kind::Backend);
            assert_eq!(name, "no-such-backend");
            assert!(available.contains(&"memory".to_owned()), "{available:?}");
            assert_eq!(feature, None, "no feature provides an invented name");
        }
        other => panic!("expected RegistryError::Unknown, got {other:?}"),
    }
    assert!(text.contains("\"no-such-backend\""), "{text}");
    assert!(
        text.contains("available: ") && text.contains("memory"),
        "{text}"
    );
}

#[test]
fn memory_rejects_unknown_options_by_name() {
    let registry = chorus::registry();
    let mut spec = StorageSpec::new("memory");
    spec.options
        .insert("max_bytes".to_owned(), "1GiB".to_owned());
    match registry.open_backend(&spec).err().expect("unknown option") {
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
