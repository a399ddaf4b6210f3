//! Shared definitions of the crash test (`tests/crash.rs`) and its child process
//! (`src/bin/chorus-crash-writer.rs`): what the child writes, so the parent can check it.
//!
//! The child runs [`WRITERS`] concurrent writers. Writer `node` writes, for `seq = 0, 1, ...`,
//! the key [`key_of`]`(node, seq)` at version `(`[`timestamp_ms`]`(cycle, seq), node)` with the
//! value [`value_of`]`(key, version)`. Keys are shared between writers, so the store decides
//! last-writer-wins races; versions grow from cycle to cycle, so later cycles overwrite earlier
//! ones. Any stored value can be checked against its key and version alone.

use std::collections::BTreeMap;

use chorus::hlc::Version;

/// Concurrent writers in the child.
pub const WRITERS: u64 = 8;

/// Writes per writer before the child stops by itself (it is normally killed long before).
pub const MAX_WRITES_PER_WRITER: u64 = 1_000_000;

/// Distinct keys written.
pub const KEYS: u64 = 256;

/// The key writer `node` writes at step `seq`.
pub fn key_of(node: u64, seq: u64) -> String {
    format!("k{:03}", (seq * 7 + node * 13) % KEYS)
}

/// The physical time of step `seq` of crash cycle `cycle`: later cycles write newer versions.
pub fn timestamp_ms(cycle: u64, seq: u64) -> u64 {
    1_000_000 + cycle * 10_000_000 + seq
}

/// The value written under `key` at `version`: names both, padded to a length that varies.
pub fn value_of(key: &str, version: Version) -> String {
    let raw = version.timestamp.as_u64();
    let mut value = format!("{key}/{raw}/{}/", version.node.0);
    let pad = (raw % 97 + version.node.0 * 11) as usize;
    value.extend(std::iter::repeat_n('x', pad));
    value
}

/// The options the child and the parent open `backend` with: synced on every write, small
/// segments so that rotations and compactions happen while the child is killed.
pub fn options(backend: &str) -> BTreeMap<String, String> {
    let pairs: &[(&str, &str)] = match backend {
        "file" => &[
            ("fsync", "always"),
            ("segment_bytes", "16384"),
            ("compact_min_bytes", "32768"),
        ],
        "sled" => &[("flush", "always")],
        _ => &[],
    };
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}
