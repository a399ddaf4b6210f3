//! Chorus: an embeddable, leaderless, replicated key-value cluster.
//!
//! This is the facade crate applications depend on. It re-exports [`chorus_core`] and builds
//! the [`Registry`] of every storage backend and transport that its Cargo features compiled in:
//!
//! | feature          | registers            | default |
//! |------------------|----------------------|---------|
//! | `backend-memory` | backend `"memory"`   | yes     |
//! | `transport-tcp`  | transport `"tcp"`    | yes     |
//! | `transport-quic` | transport `"quic"`   | no      |
//! | `backend-file`   | backend `"file"`     | no      |
//! | `backend-sled`   | backend `"sled"`     | no      |
//! | `backend-moka`   | backend `"moka"`     | no      |
//! | `sim`            | `chorus::sim`, the deterministic membership simulator | no |
//!
//! ```
//! use chorus::StorageSpec;
//!
//! let registry = chorus::registry();
//! // Every compiled-in backend is listed; volatile ones open from just their name (persistent
//! // ones also need `StorageSpec::path`).
//! if registry.backend_names().iter().any(|name| name == "memory") {
//!     registry.open_backend(&StorageSpec::new("memory")).expect("opens");
//! }
//! // Any other name is an error that lists what is available.
//! let err = registry.open_backend(&StorageSpec::new("no-such-backend")).err().unwrap();
//! assert!(err.to_string().contains("available:"));
//! ```
//!
//! `chorus::registry` names only that function; the registry's types are at the root
//! ([`Registry`], [`StorageSpec`], [`TransportSpec`], [`ComponentKind`]), so there is no
//! module of the same name to confuse it with:
//!
//! ```compile_fail
//! use chorus::registry::StorageSpec; // error: `registry` is a function, not a module
//! ```

#![deny(missing_docs)]

// Explicit rather than a glob: the core's `registry` module stays out, so `chorus::registry`
// names only the function below; its types are re-exported at the root.
pub use chorus_core::auth::{Identity, Keyring, PublicKey};
pub use chorus_core::registry::{BackendFactory, TransportFactory};
pub use chorus_core::replication::{Consistency, ReplicationError};
pub use chorus_core::runtime::node::{
    Node, NodeBuilder, NodeConfig, NodeStats, ReadOptions, ReadRepair, SecurityConfig,
    SecurityMode, Versioned, WriteOptions,
};
#[cfg(feature = "sim")]
pub use chorus_core::sim;
pub use chorus_core::{
    Address, ClockError, ComponentKind, Envelope, HashRange, Hlc, NodeId, Payload, Record,
    Registry, RegistryError, Ring, RingConfig, RingMember, SharedStorage, SharedTransport, Storage,
    StorageError, StorageSpec, Timestamp, Transport, TransportError, TransportSpec, Version,
    key_hash,
};
pub use chorus_core::{
    auth, codec, envelope, hash, healing, hlc, identity, membership, options, peer_auth, record,
    replication, ring, runtime, storage, transport, util, wire,
};

#[cfg(feature = "backend-memory")]
pub use chorus_backend_memory as backend_memory;
#[cfg(feature = "transport-quic")]
pub use chorus_transport_quic as transport_quic;
#[cfg(feature = "transport-tcp")]
pub use chorus_transport_tcp as transport_tcp;

#[cfg(feature = "backend-file")]
pub use chorus_backend_file as backend_file;

#[cfg(feature = "backend-sled")]
pub use chorus_backend_sled as backend_sled;

#[cfg(feature = "backend-moka")]
pub use chorus_backend_moka as backend_moka;

/// A [`NodeBuilder`] that opens storage and transports through [`registry()`]: the usual way
/// to start a node.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use chorus::{Consistency, ReadOptions, WriteOptions};
///
/// // The node's identity is created in its data directory on first start (mode 0600); the
/// // keyring lists the public keys of every member (see docs/SECURITY.md).
/// let mut config = chorus::NodeConfig::default();
/// config.storage = chorus::StorageSpec::new("file");
/// config.storage.path = Some("/var/lib/chorus".into());
/// config.security.keyring_file = Some("/etc/chorus/keyring".into());
/// let node = chorus::node()
///     .config(config)
///     .listen("127.0.0.1:7946")
///     .seeds(["127.0.0.1:7947"])
///     .start()
///     .await?;
/// node.put("greeting", "hello", WriteOptions::default().consistency(Consistency::Quorum))
///     .await?;
/// let value = node.get("greeting", ReadOptions::default()).await?;
/// assert_eq!(value.as_deref(), Some(&b"hello"[..]));
/// node.shutdown().await?;
/// # Ok(()) }
/// ```
pub fn node() -> NodeBuilder {
    Node::builder(registry())
}

/// A registry with every backend and transport this build compiled in.
///
/// Names this build knows of but left out are recorded with the feature that would enable
/// them, so [`Registry::open_backend`] can say what to change.
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    #[cfg(feature = "backend-memory")]
    chorus_backend_memory::register(&mut registry);
    #[cfg(not(feature = "backend-memory"))]
    registry.note_missing(ComponentKind::Backend, "memory", "backend-memory");
    #[cfg(feature = "transport-tcp")]
    chorus_transport_tcp::register(&mut registry);
    #[cfg(not(feature = "transport-tcp"))]
    registry.note_missing(ComponentKind::Transport, "tcp", "transport-tcp");
    #[cfg(feature = "transport-quic")]
    chorus_transport_quic::register(&mut registry);
    #[cfg(not(feature = "transport-quic"))]
    registry.note_missing(ComponentKind::Transport, "quic", "transport-quic");
    #[cfg(feature = "backend-file")]
    chorus_backend_file::register(&mut registry);
    #[cfg(not(feature = "backend-file"))]
    registry.note_missing(ComponentKind::Backend, "file", "backend-file");
    #[cfg(feature = "backend-sled")]
    chorus_backend_sled::register(&mut registry);
    #[cfg(not(feature = "backend-sled"))]
    registry.note_missing(ComponentKind::Backend, "sled", "backend-sled");
    #[cfg(feature = "backend-moka")]
    chorus_backend_moka::register(&mut registry);
    #[cfg(not(feature = "backend-moka"))]
    registry.note_missing(ComponentKind::Backend, "moka", "backend-moka");
    registry
}

#[cfg(feature = "server")]
pub mod server;
