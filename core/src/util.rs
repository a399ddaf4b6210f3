//! Small utilities every layer may use.

use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future, as returned by the object-safe traits
/// ([`DynStorage`](crate::storage::DynStorage), [`DynTransport`](crate::transport::DynTransport)).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
