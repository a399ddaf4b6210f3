//! The ring-ordered index of stored keys, beside the hash map: scans and digests read only the
//! range asked for instead of every record.
//!
//! Keys are kept as `(ring position, key)` in [`SHARDS`] ordered sets cut by the top bits of
//! the position, so writers of new keys in different parts of the ring do not share a lock.
//! Lock order: a writer holds the map shard's lock of its key, then takes an index shard's lock;
//! readers take an index shard's lock alone and release it before they touch the map.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use chorus_core::hash::HashRange;

/// Index shards (a power of two).
const SHARDS: usize = 64;
const SHARD_BITS: u32 = SHARDS.trailing_zeros();

/// `(ring position, key)` of every stored key.
#[derive(Debug)]
pub(crate) struct RingIndex {
    shards: Vec<Mutex<BTreeSet<(u64, Bytes)>>>,
}

impl Default for RingIndex {
    fn default() -> Self {
        RingIndex {
            shards: (0..SHARDS).map(|_| Mutex::new(BTreeSet::new())).collect(),
        }
    }
}

fn shard_of(hash: u64) -> usize {
    (hash >> (64 - SHARD_BITS)) as usize
}

impl RingIndex {
    fn shard(&self, i: usize) -> MutexGuard<'_, BTreeSet<(u64, Bytes)>> {
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a key that just entered the map (called with its map shard locked).
    pub(crate) fn insert(&self, hash: u64, key: Bytes) {
        self.shard(shard_of(hash)).insert((hash, key));
    }

    /// Removes a key that just left the map (called with its map shard locked).
    pub(crate) fn remove(&self, hash: u64, key: Bytes) {
        self.shard(shard_of(hash)).remove(&(hash, key));
    }

    pub(crate) fn clear(&self) {
        for i in 0..SHARDS {
            self.shard(i).clear();
        }
    }

    /// Up to `want` keys of `range` in scan order (offset from `range.start`, then key),
    /// strictly after `after` when given (the position and key a scan page ended on).
    pub(crate) fn keys(
        &self,
        range: &HashRange,
        after: Option<(u64, &Bytes)>,
        want: usize,
    ) -> Vec<(u64, Bytes)> {
        let mut out = Vec::new();
        // The offsets still to visit, [first, len), are positions from `range.start + first`
        // on, wrapping past `u64::MAX` at most once: one or two straight intervals.
        let first = after.map_or(0, |(hash, _)| u128::from(range.offset(hash)));
        let len = range.len();
        if first >= len || want == 0 {
            return out;
        }
        let from = range.start.wrapping_add(first as u64);
        let last = u128::from(from) + (len - first) - 1;
        let mut intervals = vec![(from, last.min(u128::from(u64::MAX)) as u64)];
        if last > u128::from(u64::MAX) {
            intervals.push((0, (last - (1u128 << 64)) as u64));
        }
        for (n, (lo, hi)) in intervals.into_iter().enumerate() {
            for s in shard_of(lo)..=shard_of(hi) {
                let start = match after {
                    Some((hash, key)) if n == 0 => Bound::Excluded((hash, key.clone())),
                    _ => Bound::Included((lo, Bytes::new())),
                };
                let shard = self.shard(s);
                for (hash, key) in shard.range((start, Bound::Unbounded)) {
                    if *hash > hi {
                        break;
                    }
                    out.push((*hash, key.clone()));
                    if out.len() == want {
                        return out;
                    }
                }
            }
        }
        out
    }
}
