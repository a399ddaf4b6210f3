//! Chorus core: the parts every node shares, independent of any concrete backend or transport.
//!
//! The modules form layers; each uses only the layers below it (see `docs/ARCHITECTURE.md`):
//!
//! 1. identity and utilities: [`identity`] ([`NodeId`], [`Address`]), [`auth`] (Ed25519
//!    identities and the cluster keyring), [`util`], [`codec`]
//!    (bounded serde helpers), [`options`] (the typed reader of backends' and transports'
//!    options), [`hash`], [`hlc`], [`record`], [`ring`];
//! 2. [`wire`]: framing and bounded decoding of any message type, naming none;
//! 3. the contracts and the registry: [`storage`], [`transport`], [`registry`];
//! 4. protocols, each owning its messages: [`membership`] (SWIM with Lifeguard as a sans-IO
//!    state machine), [`replication`] (the replica protocol's messages today), [`healing`]
//!    (hinted handoff's book);
//! 5. [`envelope`]: the enum that multiplexes the protocols on one connection;
//! 6. the runtime (feature `runtime`, on by default): `runtime::membership` (the membership
//!    driver), `runtime::rpc` (request/response correlation), `runtime::inproc` (an
//!    in-process transport with seeded fault injection) and the transports' shared outbox;
//!    and the simulator (feature `sim`).
//!
//! `cargo check -p chorus-core --no-default-features` builds everything but the runtime, which
//! proves the protocol machines and decision types free of tokio. The feature `sim` adds the
//! deterministic membership simulator (`sim`).
//!
//! Users normally depend on the `chorus` facade crate, which re-exports this crate and
//! registers the backends and transports its features compiled in.

#![deny(missing_docs)]

pub mod auth;
pub mod codec;
pub mod envelope;
pub mod hash;
pub mod healing;
pub mod hlc;
pub mod identity;
pub mod membership;
pub mod options;
pub mod peer_auth;
pub mod record;
pub mod registry;
pub mod replication;
pub mod ring;
#[cfg(feature = "runtime")]
pub mod runtime;
#[cfg(feature = "sim")]
pub mod sim;
pub mod storage;
#[cfg(feature = "tls")]
pub mod tls;
pub mod transport;
pub mod util;
pub mod wire;

pub use envelope::Envelope;
pub use hash::{HashRange, key_hash};
pub use hlc::{ClockError, Hlc, Timestamp, Version};
pub use identity::{Address, NodeId};
pub use record::{Payload, Record};
pub use registry::{ComponentKind, Registry, RegistryError, StorageSpec, TransportSpec};
pub use ring::{Ring, RingConfig, RingMember};
pub use storage::{SharedStorage, Storage, StorageError};
pub use transport::{SharedTransport, Transport, TransportError};
