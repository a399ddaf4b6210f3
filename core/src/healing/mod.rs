//! Healing: the pure parts of repairing what reads do not touch.
//!
//! Today that is hinted handoff ([`hints`]: the book of writes a coordinator still owes
//! replicas that did not acknowledge them, with its bounds, its delivery schedule and the
//! encoding hints are stored in) and ring-buffer anti-entropy ([`sync`]: the bounded log of
//! applied writes and each co-replica's cursor in it), and Merkle anti-entropy ([`merkle`]: the
//! hash tree kept up to date on every apply; [`exchange`]: one comparison of two replicas'
//! trees, descending only into differing subtrees). The node's runtime drives both with the
//! wall clock and membership, sends what they ask to send and stores what they ask to store
//! (`runtime::node`, feature `runtime`).
//!
//! Like every protocol machine here it is sans-IO: time comes in as `now_ms`, effects come
//! out as values, and `cargo check -p chorus-core --no-default-features` builds it.

pub mod exchange;
pub mod hints;
pub mod merkle;
pub mod sync;

pub use hints::{
    Delivery, DropReason, Hint, HintBook, HintConfig, HintCounters, HintDecodeError, HintOutcome,
};
