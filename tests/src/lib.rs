//! Cross-crate integration and conformance tests for Chorus.
//!
//! The library part holds test machinery meant for reuse by the integration tests in `tests/`
//! and by future backend crates:
//!
//! - [`cluster`]: in-process clusters of real nodes with faults, skewable clocks and
//!   restarts, for the node tests and the history checker;
//! - [`conformance`]: the storage backend conformance suite, run against every backend the
//!   `chorus` registry lists by `tests/backend_conformance.rs`;
//! - [`transport_conformance`]: the transport conformance suite, run against the in-process,
//!   tcp and quic transports by `tests/transport_conformance.rs`.
//! - [`history`]: the history checker (recorded histories of clients against a faulty
//!   cluster, checked against `docs/CONSISTENCY.md`) and its driver;
//! - [`runner`]: the check runner, seeds and failure reports both suites share;
//! - [`crash`]: what the crash test's child process (`chorus-crash-writer`) writes, so that
//!   `tests/crash.rs` can check what survived a SIGKILL.

#![deny(missing_docs)]

pub mod cluster;
pub mod conformance;
pub mod crash;
pub mod history;
pub mod runner;
pub mod transport_conformance;
pub mod views;
