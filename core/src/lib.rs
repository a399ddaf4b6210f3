//! Chorus core: the parts every node shares, independent of any concrete backend or transport.
//!
//! - [`hlc`]: hybrid logical clocks and the [`Version`] that orders writes;
//! - [`hash`] and [`ring`]: where keys live (consistent hashing with virtual nodes);
//! - [`record`]: values, tombstones and the last-writer-wins merge;
//! - [`storage`] and [`transport`]: the traits backends and transports implement;
//! - [`wire`]: the frame format and the one place bincode is used;
//! - [`rpc`]: request/response correlation over any transport;
//! - [`registry`]: names to backend and transport factories, and [`options`], the typed
//!   reader of their options;
//! - [`membership`]: SWIM membership with Lifeguard as a sans-IO state machine, its tokio
//!   driver and a deterministic simulator;
//! - [`inproc`]: an in-process transport with seeded fault injection, for whole-cluster tests.
//!
//! Users normally depend on the `chorus` facade crate, which re-exports this crate and
//! registers the backends and transports its features compiled in.

#![deny(missing_docs)]

pub mod hash;
pub mod hlc;
pub mod inproc;
pub mod membership;
pub mod options;
pub mod record;
pub mod registry;
pub mod ring;
pub mod rpc;
pub mod storage;
pub mod transport;
pub mod wire;

pub use hash::{HashRange, key_hash};
pub use hlc::{ClockError, Hlc, NodeId, Timestamp, Version};
pub use record::{Payload, Record};
pub use registry::{Registry, RegistryError};
pub use ring::{Ring, RingConfig, RingMember};
pub use storage::{SharedStorage, Storage, StorageError};
pub use transport::{Address, SharedTransport, Transport, TransportError};
