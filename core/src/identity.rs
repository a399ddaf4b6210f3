//! Who a node is and where it can be reached: [`NodeId`] and [`Address`].
//!
//! These sit at the bottom of the crate's layers: the clock, the ring, the wire's protocols and
//! the transports all name nodes, and none of them may depend on another for it.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Identifier of a node. It names the node on the ring and breaks ties between record versions
/// with equal timestamps.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct NodeId(pub u64);

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({:016x})", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Where a node can be reached: `host:port` for network transports, a name in process.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Address(Arc<str>);

impl<'de> Deserialize<'de> for Address {
    // Through the borrowed string path: addresses travel in peers' messages, and the owned
    // path would allocate whatever length a frame claims.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        crate::codec::serde_str::deserialize(deserializer).map(Address::from)
    }
}

impl Address {
    /// An address from its textual form.
    pub fn new(addr: impl AsRef<str>) -> Self {
        Address(Arc::from(addr.as_ref()))
    }

    /// The textual form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({})", self.0)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Address {
    fn from(s: &str) -> Self {
        Address::new(s)
    }
}

impl From<String> for Address {
    fn from(s: String) -> Self {
        Address(Arc::from(s))
    }
}
