//! The runtime: tokio code that connects the sans-IO machines to storage and transports.
//!
//! Everything here sits above the [`envelope`](crate::envelope) in the crate's layers and is
//! compiled only with the `runtime` feature (on by default), so `cargo check -p chorus-core
//! --no-default-features` proves the rest free of tokio.
//!
//! - [`membership`]: the driver that runs one [`Membership`](crate::membership::Membership)
//!   machine over any transport;
//! - [`rpc`]: request/response correlation over any transport;
//! - [`node`]: the node: quorum reads and writes over the ring, read repair, the replica
//!   side, membership on the same endpoint;
//! - [`keys`]: the node's identity file and keyring files;
//! - [`inproc`]: an in-process network of transports with seeded fault injection, for
//!   whole-cluster tests.
//!
//! The transports' shared outbox ([`crate::transport::outbox`]) also needs tokio and is gated
//! the same way; it stays beside the transport contract it serves.

pub mod inproc;
pub mod keys;
pub mod membership;
pub mod node;
pub mod rpc;
