//! Healing: the pure parts of repairing what reads do not touch.
//!
//! Today that is hinted handoff ([`hints`]): the book of writes a coordinator still owes
//! replicas that did not acknowledge them, with its bounds, its delivery schedule (backoff and
//! a delivery rate, deadlines in one timer table) and the encoding hints are stored in. The
//! node's runtime drives it with the wall clock and membership changes, sends what it asks to
//! send and stores what it asks to store (`runtime::node`, feature `runtime`).
//!
//! Like every protocol machine here it is sans-IO: time comes in as `now_ms`, effects come
//! out as values, and `cargo check -p chorus-core --no-default-features` builds it.

pub mod hints;

pub use hints::{
    Delivery, DropReason, Hint, HintBook, HintConfig, HintCounters, HintDecodeError, HintOutcome,
};
