//! Quorum replication: the messages a coordinator and a key's replicas exchange.
//!
//! Today this module holds the replica protocol's messages ([`message`]); the coordinator, the
//! replica side and their pure decision types (replica sets, quorum tracking, picking the
//! winning version, choosing repair targets) arrive with the node.

pub mod message;

pub use message::ReplicaMessage;
