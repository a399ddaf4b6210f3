//! Names to factories: how a backend or transport picked at run time is found.
//!
//! Each backend or transport crate exports `SCHEME` and `register(&mut Registry)`. The `chorus`
//! facade's `registry()` calls the `register` of every crate its features compiled in, and
//! records the feature that would enable each one that was not, so that asking for a missing
//! name says exactly what to change. There is no global state and no life-before-main: the
//! registry is a plain value built once at start-up.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::storage::{SharedStorage, StorageError};
use crate::transport::{SharedTransport, TransportError};
use crate::util::BoxFuture;

/// What to open: a backend name plus its settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct StorageSpec {
    /// Registry name of the backend (`"memory"`, `"file"`, ...).
    pub scheme: String,
    /// Data directory, for persistent backends.
    pub path: Option<PathBuf>,
    /// Backend-specific options, as written in the configuration file (read them with
    /// [`Options`](crate::options::Options)).
    pub options: BTreeMap<String, String>,
}

impl StorageSpec {
    /// A spec for `scheme` with no path and no options.
    pub fn new(scheme: impl Into<String>) -> Self {
        StorageSpec {
            scheme: scheme.into(),
            ..StorageSpec::default()
        }
    }
}

/// What to bind: a transport name, the local address and its settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct TransportSpec {
    /// Registry name of the transport (`"tcp"`, `"quic"`, ...).
    pub scheme: String,
    /// Local address to listen on.
    pub bind: String,
    /// Transport-specific options, as written in the configuration file (read them with
    /// [`Options`](crate::options::Options)).
    pub options: BTreeMap<String, String>,
    /// The node's identity, live keyring and address book, for transports that authenticate
    /// their connections (TLS over TCP, QUIC). A node in keyring mode sets it; it is never
    /// read from or written to a configuration file.
    #[serde(skip)]
    pub auth: Option<crate::peer_auth::ChannelAuth>,
}

impl TransportSpec {
    /// A spec for `scheme` bound to `bind`, with no options.
    pub fn new(scheme: impl Into<String>, bind: impl Into<String>) -> Self {
        TransportSpec {
            scheme: scheme.into(),
            bind: bind.into(),
            options: BTreeMap::new(),
            auth: None,
        }
    }
}

/// Opens a storage backend from its spec.
pub type BackendFactory =
    Arc<dyn Fn(&StorageSpec) -> Result<SharedStorage, StorageError> + Send + Sync>;

/// Binds a transport from its spec.
pub type TransportFactory = Arc<
    dyn Fn(TransportSpec) -> BoxFuture<'static, Result<SharedTransport, TransportError>>
        + Send
        + Sync,
>;

/// The kinds of pluggable component.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum ComponentKind {
    /// A storage backend.
    Backend,
    /// A transport.
    Transport,
}

impl fmt::Display for ComponentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ComponentKind::Backend => "storage backend",
            ComponentKind::Transport => "transport",
        })
    }
}

/// Why the registry could not produce a component.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// No factory is registered under that name.
    #[error("{}", unknown_message(.kind, .name, .available, .feature.as_deref()))]
    Unknown {
        /// Backend or transport.
        kind: ComponentKind,
        /// The name asked for.
        name: String,
        /// The names that are registered.
        available: Vec<String>,
        /// The `chorus` feature that would compile it in, if the name is a known one.
        feature: Option<String>,
    },
    /// A factory was registered twice under one name.
    #[error("{kind} {name:?} is registered twice")]
    Duplicate {
        /// Backend or transport.
        kind: ComponentKind,
        /// The name.
        name: String,
    },
    /// The backend's factory failed.
    #[error("opening storage backend {name:?}: {source}")]
    Storage {
        /// The backend.
        name: String,
        /// Its error.
        source: StorageError,
    },
    /// The transport's factory failed.
    #[error("binding transport {name:?}: {source}")]
    Transport {
        /// The transport.
        name: String,
        /// Its error.
        source: TransportError,
    },
}

fn unknown_message(
    kind: &ComponentKind,
    name: &str,
    available: &[String],
    feature: Option<&str>,
) -> String {
    let list = if available.is_empty() {
        "none".to_owned()
    } else {
        available.join(", ")
    };
    let hint = match feature {
        Some(feature) => {
            format!("enable the `{feature}` feature of the `chorus` crate to compile it in")
        }
        None => "no crate known to this build provides it".to_owned(),
    };
    format!("unknown {kind} {name:?} (available: {list}); {hint}")
}

/// Names to backend and transport factories.
#[derive(Default)]
pub struct Registry {
    backends: BTreeMap<String, BackendFactory>,
    transports: BTreeMap<String, TransportFactory>,
    /// Known names that this build did not compile in, with the feature that would.
    missing: BTreeMap<(ComponentKind, String), String>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("backends", &self.backend_names())
            .field("transports", &self.transport_names())
            .field("missing", &self.missing)
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Registers a backend factory under `scheme`.
    pub fn register_backend(
        &mut self,
        scheme: &str,
        factory: impl Fn(&StorageSpec) -> Result<SharedStorage, StorageError> + Send + Sync + 'static,
    ) -> Result<(), RegistryError> {
        if self.backends.contains_key(scheme) {
            return Err(RegistryError::Duplicate {
                kind: ComponentKind::Backend,
                name: scheme.to_owned(),
            });
        }
        self.backends.insert(scheme.to_owned(), Arc::new(factory));
        Ok(())
    }

    /// Registers a transport factory under `scheme`.
    pub fn register_transport(
        &mut self,
        scheme: &str,
        factory: impl Fn(TransportSpec) -> BoxFuture<'static, Result<SharedTransport, TransportError>>
        + Send
        + Sync
        + 'static,
    ) -> Result<(), RegistryError> {
        if self.transports.contains_key(scheme) {
            return Err(RegistryError::Duplicate {
                kind: ComponentKind::Transport,
                name: scheme.to_owned(),
            });
        }
        self.transports.insert(scheme.to_owned(), Arc::new(factory));
        Ok(())
    }

    /// Records that `scheme` exists but this build left it out; `feature` would compile it in.
    pub fn note_missing(&mut self, kind: ComponentKind, scheme: &str, feature: &str) {
        self.missing
            .insert((kind, scheme.to_owned()), feature.to_owned());
    }

    /// Registered backend names, sorted.
    pub fn backend_names(&self) -> Vec<String> {
        self.backends.keys().cloned().collect()
    }

    /// Registered transport names, sorted.
    pub fn transport_names(&self) -> Vec<String> {
        self.transports.keys().cloned().collect()
    }

    /// Opens the backend `spec.scheme` names.
    pub fn open_backend(&self, spec: &StorageSpec) -> Result<SharedStorage, RegistryError> {
        let factory = self.backends.get(&spec.scheme).ok_or_else(|| {
            self.unknown(ComponentKind::Backend, &spec.scheme, self.backend_names())
        })?;
        factory(spec).map_err(|source| RegistryError::Storage {
            name: spec.scheme.clone(),
            source,
        })
    }

    /// Binds the transport `spec.scheme` names.
    pub async fn bind_transport(
        &self,
        spec: TransportSpec,
    ) -> Result<SharedTransport, RegistryError> {
        let factory = self
            .transports
            .get(&spec.scheme)
            .ok_or_else(|| {
                self.unknown(
                    ComponentKind::Transport,
                    &spec.scheme,
                    self.transport_names(),
                )
            })?
            .clone();
        let name = spec.scheme.clone();
        factory(spec)
            .await
            .map_err(|source| RegistryError::Transport { name, source })
    }

    fn unknown(&self, kind: ComponentKind, name: &str, available: Vec<String>) -> RegistryError {
        let feature = self.missing.get(&(kind, name.to_owned())).cloned();
        RegistryError::Unknown {
            kind,
            name: name.to_owned(),
            available,
            feature,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_names_list_what_is_available_and_the_feature() {
        let mut registry = Registry::new();
        registry
            .register_backend("alpha", |_| {
                Err(StorageError::Config("test factory".into()))
            })
            .expect("first registration");
        registry.note_missing(ComponentKind::Backend, "beta", "backend-beta");

        let err = registry
            .open_backend(&StorageSpec::new("beta"))
            .expect_err("beta is missing");
        match &err {
            RegistryError::Unknown {
                available, feature, ..
            } => {
                assert_eq!(available, &["alpha".to_owned()]);
                assert_eq!(feature.as_deref(), Some("backend-beta"));
            }
            other => panic!("unexpected {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains("available: alpha") && text.contains("`backend-beta`"),
            "{text}"
        );

        let text = registry
            .open_backend(&StorageSpec::new("gamma"))
            .expect_err("missing")
            .to_string();
        assert!(text.contains("no crate known"), "{text}");

        // The factory's own error is reported with the backend's name.
        let text = registry
            .open_backend(&StorageSpec::new("alpha"))
            .expect_err("fails")
            .to_string();
        assert!(
            text.contains("\"alpha\"") && text.contains("test factory"),
            "{text}"
        );
    }

    #[test]
    fn duplicate_registration_is_an_error() {
        let mut registry = Registry::new();
        registry
            .register_backend("x", |_| Err(StorageError::Closed))
            .expect("first");
        assert!(matches!(
            registry.register_backend("x", |_| Err(StorageError::Closed)),
            Err(RegistryError::Duplicate {
                kind: ComponentKind::Backend,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn unknown_transport_lists_none_available() {
        let registry = Registry::new();
        let text = registry
            .bind_transport(TransportSpec::new("tcp", "127.0.0.1:0"))
            .await
            .expect_err("missing")
            .to_string();
        assert!(
            text.contains("unknown transport \"tcp\" (available: none)"),
            "{text}"
        );
    }
}
