//! The stable 64-bit hash that places keys on the ring, and ranges of that hash space.
//!
//! Key placement must agree between nodes, builds and platforms, so the hash is XXH3-64 with a
//! fixed seed over the raw key bytes; changing it is a wire-incompatible change.

use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seed for key hashes. Part of the on-disk and on-wire contract: never change it.
const KEY_SEED: u64 = 0x6368_6f72_7573_6b76; // "choruskv"

/// The ring position of a key.
#[inline]
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64_with_seed(key, KEY_SEED)
}

/// A half-open range `[start, end)` of ring positions that may wrap past `u64::MAX`.
///
/// `start == end` denotes the whole ring.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct HashRange {
    /// First position inside the range.
    pub start: u64,
    /// First position after the range (exclusive), possibly below `start` when it wraps.
    pub end: u64,
}

impl HashRange {
    /// Every position on the ring.
    pub const FULL: HashRange = HashRange { start: 0, end: 0 };

    /// The range `[start, end)`, wrapping if `end < start`; `start == end` is the full ring.
    pub const fn new(start: u64, end: u64) -> Self {
        HashRange { start, end }
    }

    /// Whether this is the full ring.
    pub const fn is_full(&self) -> bool {
        self.start == self.end
    }

    /// Number of positions in the range (`2^64` for the full ring).
    pub const fn len(&self) -> u128 {
        if self.is_full() {
            1u128 << 64
        } else {
            self.end.wrapping_sub(self.start) as u128
        }
    }

    /// A range always holds at least one position.
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// Whether `hash` lies inside the range.
    #[inline]
    pub const fn contains(&self, hash: u64) -> bool {
        (hash.wrapping_sub(self.start) as u128) < self.len()
    }

    /// Distance of `hash` from the start of the range; orders positions along a wrapping range.
    #[inline]
    pub const fn offset(&self, hash: u64) -> u64 {
        hash.wrapping_sub(self.start)
    }

    /// Index of the equal-width bucket holding `hash` when the range is cut into `buckets`.
    ///
    /// Bucket `i` covers offsets `[ceil(i*len/b), ceil((i+1)*len/b))`; every backend uses this
    /// function so digests of identical contents agree. `hash` must lie inside the range.
    #[inline]
    pub fn bucket_of(&self, hash: u64, buckets: NonZeroU32) -> u32 {
        let offset = self.offset(hash) as u128;
        // offset < len, so the quotient is < buckets and fits in u32.
        ((offset * buckets.get() as u128) / self.len()) as u32
    }

    /// The `index`-th of `buckets` equal-width sub-ranges (the inverse of [`Self::bucket_of`]),
    /// or `None` when `index` is out of bounds or that bucket holds no position (a range
    /// narrower than `buckets`), since a [`HashRange`] with `start == end` means the full ring.
    pub fn bucket(&self, index: u32, buckets: NonZeroU32) -> Option<HashRange> {
        if index >= buckets.get() {
            return None;
        }
        let len = self.len();
        let b = buckets.get() as u128;
        let lo = (index as u128 * len).div_ceil(b);
        let hi = ((index as u128 + 1) * len).div_ceil(b);
        (hi > lo).then(|| HashRange {
            start: self.start.wrapping_add(lo as u64),
            end: self.start.wrapping_add(hi as u64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("non-zero")
    }

    #[test]
    fn key_hash_is_pinned() {
        // Literal values: a change here moves every key of every existing cluster, and nodes of
        // different builds would disagree on placement. Change only with a migration plan.
        assert_eq!(key_hash(b""), 0x95ec_3edb_bf5f_d5c2);
        assert_eq!(key_hash(b"user:42"), 0x014b_0e32_3ada_ac74);
        assert_eq!(key_hash(&[0xff; 100]), 0xa442_d7a5_4336_5aa8);
    }

    #[test]
    fn wrapping_range_contains() {
        let r = HashRange::new(u64::MAX - 9, 10);
        assert!(r.contains(u64::MAX));
        assert!(r.contains(0));
        assert!(r.contains(9));
        assert!(!r.contains(10));
        assert!(!r.contains(u64::MAX - 10));
        assert_eq!(r.len(), 20);
        assert!(HashRange::FULL.contains(12345));
    }

    #[test]
    fn empty_buckets_are_none_not_the_full_ring() {
        let narrow = HashRange::new(10, 13);
        let buckets: Vec<_> = (0..8).map(|i| narrow.bucket(i, nz(8))).collect();
        assert_eq!(buckets.iter().flatten().count(), 3);
        assert!(buckets.iter().flatten().all(|b| b.len() == 1));
        let full = HashRange::FULL.bucket(0, nz(1)).expect("one bucket");
        assert!(full.is_full());
    }

    proptest! {
        #[test]
        fn buckets_partition_the_range(start: u64, end: u64, buckets in 1u32..4096, probe: u64) {
            let buckets = nz(buckets);
            let r = HashRange::new(start, end);
            let h = start.wrapping_add((probe as u128 % r.len()) as u64);
            let i = r.bucket_of(h, buckets);
            prop_assert!(i < buckets.get());
            let b = r.bucket(i, buckets).expect("the bucket holding h is not empty");
            prop_assert!(b.contains(h), "bucket {i} {b:?} misses {h}");
            prop_assert!(!b.is_full() || buckets.get() == 1 && r.is_full());
            prop_assert_eq!(r.bucket(buckets.get(), buckets), None);
            // The buckets tile the range: their widths add up to its length.
            if buckets.get() <= 64 {
                let total: u128 = (0..buckets.get()).filter_map(|j| r.bucket(j, buckets)).map(|b| b.len()).sum();
                prop_assert_eq!(total, r.len());
            }
        }
    }
}
