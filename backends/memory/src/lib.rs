//! In-memory storage backend (being written).
#![deny(missing_docs)]
use chorus_core::Registry;
/// Registry name.
pub const SCHEME: &str = "memory";
/// Registers the backend.
pub fn register(_registry: &mut Registry) {}
