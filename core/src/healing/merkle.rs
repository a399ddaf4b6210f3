//! Merkle anti-entropy's tree: a fixed-shape hash tree over the ring, kept up to date on
//! every replica apply.
//!
//! # Shape
//!
//! The hash space is cut into [`LEAVES`] equal leaves by the top [`LEAF_BITS`] bits of a key's
//! ring position ([`leaf_of`]); inner nodes have [`FANOUT`] children and the tree has
//! [`DEPTH`] levels below the root, so a node is named by `(level, index)` with level 0 the
//! root and level [`DEPTH`] the leaves. The shape is the same on every node and independent
//! of the ring, so a membership change needs no rebuild; the exchange
//! ([`super::exchange`]) restricts a comparison to the ranges two members share.
//!
//! # Leaves
//!
//! A leaf is a [`RangeDigest`] of the records stored in it: their count and the wrapping sum
//! of [`entry_hash`]`(key position, version)`. A version names one write (the HLC stamp and the
//! writer's id), so the digest sums exactly what repair can move. Addition and subtraction
//! make it incremental: an apply that replaced version `p` by `v` subtracts `h(key, p)` and
//! adds `h(key, v)`, both known from the storage's [`ApplyOutcome`](crate::storage::ApplyOutcome)
//! without reading first. Inner nodes are not stored: a node's digest is the sum of its leaves,
//! computed when asked ([`MerkleTree::node`]), which costs at most one pass over the leaves
//! per request.
//!
//! # Write path and rebuilds
//!
//! Leaves live in [`SHARDS`] mutex-guarded shards, so writers to different parts of the ring
//! do not contend. An apply calls [`MerkleTree::begin`] before it reaches storage (one atomic
//! increment of its shard's in-flight count) and [`MerkleTree::finish`] after (one short
//! uncontended lock hold, one 24-byte hash per version), or [`MerkleTree::abandon`] when
//! storage failed and what it stored is unknown. `finish` marks the leaf dirty.
//!
//! A rebuild ([`MerkleTree::start_rebuild`], [`Rebuild::add`] for every stored record, then
//! [`MerkleTree::finish_rebuild`]) recomputes the leaves from storage, catching whatever
//! changed a store without going through the apply path (silent corruption, a purge, an
//! eviction, a failed batch). A leaf written to while the rebuild ran (dirty) keeps its
//! incrementally maintained value: the scan may have seen the write or not, the incremental
//! value saw it exactly once. A shard with applies in flight is merged only once they are
//! done (an apply that begins after the check began after the scan, so the scan did not see
//! it and its delta applies to the rebuilt value); `finish_rebuild` yields the thread while
//! it waits, and leaves a shard as maintained if that takes too long. Rebuilds must not overlap each
//! other or a purge; the node runs both from one task.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::hash::HashRange;
use crate::hlc::Version;
use crate::record::Record;
use crate::storage::RangeDigest;

/// Children per inner node, as a power of two.
pub const FANOUT_BITS: u32 = 6;
/// Children per inner node.
pub const FANOUT: u32 = 1 << FANOUT_BITS;
/// Levels below the root; the leaves are level `DEPTH`.
pub const DEPTH: u8 = 3;
/// Bits of a ring position that pick its leaf.
pub const LEAF_BITS: u32 = FANOUT_BITS * DEPTH as u32;
/// Leaves in the tree.
pub const LEAVES: u32 = 1 << LEAF_BITS;
/// Shards the leaves are locked in.
pub const SHARDS: u32 = 256;
const SHARD_LEAVES: u32 = LEAVES / SHARDS;

/// Most nodes one digest request may name (the answer carries one digest each).
pub const MAX_NODES_PER_REQUEST: usize = 4096;
/// Most leaves one leaf check may name.
pub const MAX_LEAVES_PER_CHECK: usize = 1024;
/// Most stored records (by the tree's counts) the leaves of one check may span: a leaf check
/// costs a storage scan of the span on both sides.
pub const MAX_RECORDS_PER_CHECK: u64 = 16_384;
/// The span a responder accepts: a peer's counts may be lower than its own.
pub const MAX_RECORDS_PER_CHECK_ACCEPTED: u64 = 4 * MAX_RECORDS_PER_CHECK;

/// Granularity of the purge horizon two replicas agree on ([`cutoff`]).
pub const HORIZON_EPOCH_MS: u64 = 60_000;

/// Seed of [`entry_hash`]. Part of the wire contract: never change it.
const ENTRY_SEED: u64 = 0x6d65_726b_6c65_6368; // "merklech"

/// The unit of leaf digests: a 64-bit hash of a key's ring position
/// ([`key_hash`](crate::hash::key_hash)) and the `version` stored under it. Two keys with the
/// same 64-bit position are as unlikely as any other 64-bit collision.
pub fn entry_hash(key_hash: u64, version: &Version) -> u64 {
    let mut buf = [0u8; 24];
    buf[..8].copy_from_slice(&key_hash.to_le_bytes());
    buf[8..16].copy_from_slice(&version.timestamp.as_u64().to_le_bytes());
    buf[16..].copy_from_slice(&version.node.0.to_le_bytes());
    xxh3_64_with_seed(&buf, ENTRY_SEED)
}

/// The leaf holding ring position `hash`.
pub fn leaf_of(hash: u64) -> u32 {
    (hash >> (64 - LEAF_BITS)) as u32
}

/// How many nodes `level` has (`None` past the leaves).
pub fn width(level: u8) -> Option<u32> {
    (level <= DEPTH).then(|| 1 << (FANOUT_BITS * u32::from(level)))
}

/// The leaves under node `(level, index)`, or `None` for no such node.
pub fn leaves_under(level: u8, index: u32) -> Option<std::ops::Range<u32>> {
    if index >= width(level)? {
        return None;
    }
    let shift = FANOUT_BITS * u32::from(DEPTH - level);
    Some(index << shift..(index + 1) << shift)
}

/// The ring positions under node `(level, index)`, or `None` for no such node.
pub fn node_range(level: u8, index: u32) -> Option<HashRange> {
    let leaves = leaves_under(level, index)?;
    let start = |leaf: u32| (u64::from(leaf)) << (64 - LEAF_BITS);
    let end = if leaves.end == LEAVES {
        0
    } else {
        start(leaves.end)
    };
    Some(HashRange::new(start(leaves.start), end))
}

/// The range of ring positions from the start of leaf `first` to the end of leaf `last`.
pub fn leaf_span(first: u32, last: u32) -> HashRange {
    let start = node_range(DEPTH, first).map_or(0, |r| r.start);
    let end = node_range(DEPTH, last).map_or(0, |r| r.end);
    HashRange::new(start, end)
}

/// The purge horizon an exchange agrees on: `now_ms - grace`, rounded down to
/// [`HORIZON_EPOCH_MS`]. Records collectable by then ([`past_horizon`]) are left out of the
/// digests both sides compare and are never offered.
pub fn cutoff(now_ms: u64, grace: Duration) -> u64 {
    let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
    let at = now_ms.saturating_sub(grace_ms);
    at - at % HORIZON_EPOCH_MS
}

/// Whether `record` is past the horizon `cutoff_ms`: a tombstone written, or a value expired,
/// at or before it ([`Record::is_collectable`] with the grace already subtracted).
pub fn past_horizon(record: &Record, cutoff_ms: u64) -> bool {
    record.is_collectable(cutoff_ms, Duration::ZERO)
}

/// Why a digest request or a leaf check was refused; see the limits above.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BoundsError {
    /// More nodes than [`MAX_NODES_PER_REQUEST`] or leaves than [`MAX_LEAVES_PER_CHECK`].
    #[error("{got} entries in one request; at most {max} are allowed")]
    TooMany {
        /// Entries asked for.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// A level below the leaves.
    #[error("level {0} is below the leaves (depth {DEPTH})")]
    Level(u8),
    /// A node index past its level's width.
    #[error("node {index} does not exist on level {level}")]
    Index {
        /// The level.
        level: u8,
        /// The index.
        index: u32,
    },
    /// Nodes of a request or leaves of a check not in strictly ascending order.
    #[error("nodes or leaves not in strictly ascending order")]
    Order,
    /// A check whose leaves span more stored records than a responder scans for one.
    #[error("the leaves span {records} stored records; at most {max} are scanned per check")]
    Span {
        /// Records in the span, by the responder's tree.
        records: u64,
        /// The limit.
        max: u64,
    },
    /// A check with a different number of digests than leaves.
    #[error("{digests} digests for {leaves} leaves")]
    Mismatch {
        /// Leaves named.
        leaves: usize,
        /// Digests sent.
        digests: usize,
    },
}

/// Checks a digest request: a valid level, at most [`MAX_NODES_PER_REQUEST`] existing nodes
/// in strictly ascending order. (Repeats are refused: each costs the responder a node's sum,
/// so a request repeating the root would cost 4,096 passes over every leaf.)
pub fn check_nodes(level: u8, indices: &[u32]) -> Result<(), BoundsError> {
    if indices.len() > MAX_NODES_PER_REQUEST {
        return Err(BoundsError::TooMany {
            got: indices.len(),
            max: MAX_NODES_PER_REQUEST,
        });
    }
    let width = width(level).ok_or(BoundsError::Level(level))?;
    if let Some(&index) = indices.iter().find(|&&i| i >= width) {
        return Err(BoundsError::Index { level, index });
    }
    if indices.windows(2).any(|w| w[0] >= w[1]) {
        return Err(BoundsError::Order);
    }
    Ok(())
}

/// Checks the leaves of a leaf check: at most [`MAX_LEAVES_PER_CHECK`], existing, strictly
/// ascending, one digest each.
pub fn check_leaves(leaves: &[u32], digests: usize) -> Result<(), BoundsError> {
    if leaves.len() > MAX_LEAVES_PER_CHECK {
        return Err(BoundsError::TooMany {
            got: leaves.len(),
            max: MAX_LEAVES_PER_CHECK,
        });
    }
    if digests != leaves.len() {
        return Err(BoundsError::Mismatch {
            leaves: leaves.len(),
            digests,
        });
    }
    check_nodes(DEPTH, leaves)?;
    if leaves.windows(2).any(|w| w[0] >= w[1]) {
        return Err(BoundsError::Order);
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, Default)]
struct Leaf {
    digest: RangeDigest,
    dirty: bool,
}

/// A shard's applies between `begin` and `finish`, on its own cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct InFlight(AtomicU32);

/// The tree; see the [module documentation](self).
#[derive(Debug)]
pub struct MerkleTree {
    shards: Box<[Mutex<Box<[Leaf]>>]>,
    in_flight: Box<[InFlight]>,
    /// Set when an apply's effect on storage is unknown: the next rebuild should not wait.
    needs_rebuild: AtomicBool,
}

/// An apply between [`MerkleTree::begin`] and [`MerkleTree::finish`].
#[derive(Debug)]
#[must_use = "finish or abandon it, or the leaf stays in flight"]
pub struct Pending {
    key_hash: u64,
}

impl Default for MerkleTree {
    fn default() -> Self {
        Self::new()
    }
}

impl MerkleTree {
    /// An empty tree (every leaf zero).
    pub fn new() -> Self {
        MerkleTree {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(vec![Leaf::default(); SHARD_LEAVES as usize].into()))
                .collect(),
            in_flight: (0..SHARDS).map(|_| InFlight::default()).collect(),
            needs_rebuild: AtomicBool::new(false),
        }
    }

    fn with_leaf<T>(&self, leaf: u32, f: impl FnOnce(&mut Leaf) -> T) -> T {
        let mut shard = self.shards[(leaf / SHARD_LEAVES) as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        f(&mut shard[(leaf % SHARD_LEAVES) as usize])
    }

    /// Before applying a write of the key at ring position `key_hash` to storage.
    pub fn begin(&self, key_hash: u64) -> Pending {
        self.in_flight[(leaf_of(key_hash) / SHARD_LEAVES) as usize]
            .0
            .fetch_add(1, Ordering::SeqCst);
        Pending { key_hash }
    }

    fn end(&self, pending: &Pending) {
        self.in_flight[(leaf_of(pending.key_hash) / SHARD_LEAVES) as usize]
            .0
            .fetch_sub(1, Ordering::SeqCst);
    }

    /// After storage applied it: `replaced` is the version the write replaced (if any),
    /// `stored` the one it stored (`None` when storage kept what it had: nothing changes).
    pub fn finish(&self, pending: Pending, replaced: Option<&Version>, stored: Option<&Version>) {
        let mut delta = RangeDigest::default();
        let mut removed = RangeDigest::default();
        if let Some(stored) = stored {
            delta.add(entry_hash(pending.key_hash, stored));
            if let Some(replaced) = replaced {
                removed.add(entry_hash(pending.key_hash, replaced));
            }
            self.with_leaf(leaf_of(pending.key_hash), |l| {
                l.digest = subtract(l.digest.combine(delta), removed);
                l.dirty = true;
            });
        }
        self.end(&pending);
    }

    /// After storage was asked to remove the key's record: `removed` is the version it
    /// removed (`None` when it removed nothing: nothing changes). Begun with
    /// [`MerkleTree::begin`] before the removal, like a write, so a rebuild running meanwhile
    /// keeps the leaf as maintained.
    pub fn finish_removal(&self, pending: Pending, removed: Option<&Version>) {
        if let Some(removed) = removed {
            let mut gone = RangeDigest::default();
            gone.add(entry_hash(pending.key_hash, removed));
            self.with_leaf(leaf_of(pending.key_hash), |l| {
                l.digest = subtract(l.digest, gone);
                l.dirty = true;
            });
        }
        self.end(&pending);
    }

    /// After storage failed to apply it: what it stored is unknown, so the leaf may be wrong
    /// until the next rebuild, which [`MerkleTree::needs_rebuild`] asks for.
    pub fn abandon(&self, pending: Pending) {
        self.with_leaf(leaf_of(pending.key_hash), |l| l.dirty = true);
        self.needs_rebuild.store(true, Ordering::Relaxed);
        self.end(&pending);
    }

    /// Whether an abandoned apply left the tree unsure of some leaf.
    pub fn needs_rebuild(&self) -> bool {
        self.needs_rebuild.load(Ordering::Relaxed)
    }

    /// The digest of one leaf.
    pub fn leaf(&self, leaf: u32) -> RangeDigest {
        self.with_leaf(leaf % LEAVES, |l| l.digest)
    }

    /// The digest of node `(level, index)`: the sum of its leaves (`None` for no such node).
    pub fn node(&self, level: u8, index: u32) -> Option<RangeDigest> {
        let leaves = leaves_under(level, index)?;
        let mut sum = RangeDigest::default();
        let mut leaf = leaves.start;
        while leaf < leaves.end {
            let shard = leaf / SHARD_LEAVES;
            let stop = ((shard + 1) * SHARD_LEAVES).min(leaves.end);
            let guard = self.shards[shard as usize]
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for l in &guard[(leaf % SHARD_LEAVES) as usize..=((stop - 1) % SHARD_LEAVES) as usize] {
                sum = sum.combine(l.digest);
            }
            leaf = stop;
        }
        Some(sum)
    }

    /// The digests of the nodes `indices` of `level`, in order, after [`check_nodes`].
    pub fn nodes(&self, level: u8, indices: &[u32]) -> Result<Vec<RangeDigest>, BoundsError> {
        check_nodes(level, indices)?;
        Ok(indices
            .iter()
            .map(|&i| self.node(level, i).unwrap_or_default())
            .collect())
    }

    /// Records in leaves `first..=last` by this tree's counts (zero when `first > last`).
    /// Each shard is locked once, as in [`MerkleTree::node`].
    pub fn records_between(&self, first: u32, last: u32) -> u64 {
        let end = last.min(LEAVES - 1).saturating_add(1);
        let mut records = 0u64;
        let mut leaf = first;
        while leaf < end {
            let shard = leaf / SHARD_LEAVES;
            let stop = ((shard + 1) * SHARD_LEAVES).min(end);
            let guard = self.shards[shard as usize]
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for l in &guard[(leaf % SHARD_LEAVES) as usize..=((stop - 1) % SHARD_LEAVES) as usize] {
                records = records.saturating_add(l.digest.count);
            }
            leaf = stop;
        }
        records
    }

    /// Starts a rebuild: from now on, a leaf written to is kept as it is by
    /// [`MerkleTree::finish_rebuild`].
    pub fn start_rebuild(&self) -> Rebuild {
        self.needs_rebuild.store(false, Ordering::Relaxed);
        for shard in self.shards.iter() {
            let mut guard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            for l in guard.iter_mut() {
                l.dirty = false;
            }
        }
        Rebuild {
            fresh: vec![RangeDigest::default(); LEAVES as usize],
        }
    }

    /// Ends a rebuild: every leaf not written to since [`MerkleTree::start_rebuild`] takes
    /// the rebuilt value, shard by shard once the shard has no apply in flight.
    pub fn finish_rebuild(&self, rebuild: Rebuild) -> RebuildReport {
        let mut report = RebuildReport::default();
        for (s, shard) in self.shards.iter().enumerate() {
            let mut guard = None;
            for _ in 0..1_000 {
                let g = shard.lock().unwrap_or_else(PoisonError::into_inner);
                if self.in_flight[s].0.load(Ordering::SeqCst) == 0 {
                    guard = Some(g);
                    break;
                }
                drop(g);
                std::thread::yield_now();
            }
            let Some(mut guard) = guard else {
                report.kept += SHARD_LEAVES;
                continue;
            };
            for (i, l) in guard.iter_mut().enumerate() {
                let fresh = rebuild.fresh[s * SHARD_LEAVES as usize + i];
                if l.dirty {
                    report.kept += 1;
                } else if l.digest != fresh {
                    l.digest = fresh;
                    report.corrected += 1;
                }
            }
        }
        report
    }
}

/// `a` minus the records of `b` (a subset of `a`'s).
fn subtract(a: RangeDigest, b: RangeDigest) -> RangeDigest {
    RangeDigest {
        count: a.count.wrapping_sub(b.count),
        hash: a.hash.wrapping_sub(b.hash),
    }
}

/// Leaves being recomputed from storage; see [`MerkleTree::start_rebuild`].
#[derive(Debug)]
pub struct Rebuild {
    fresh: Vec<RangeDigest>,
}

impl Rebuild {
    /// Counts one stored record.
    pub fn add(&mut self, key_hash: u64, version: &Version) {
        self.fresh[leaf_of(key_hash) as usize].add(entry_hash(key_hash, version));
    }
}

/// What a rebuild found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RebuildReport {
    /// Leaves whose maintained digest differed from storage and were replaced: storage changed
    /// outside the apply path (corruption, a purge, an eviction, an abandoned apply).
    pub corrected: u32,
    /// Leaves written to during the rebuild, left as maintained.
    pub kept: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::key_hash;
    use crate::hlc::Timestamp;
    use crate::identity::NodeId;

    fn v(n: u64) -> Version {
        Version::new(Timestamp::new(n, 0), NodeId(1))
    }

    fn put(tree: &MerkleTree, key: &[u8], replaced: Option<u64>, stored: u64) {
        let p = tree.begin(key_hash(key));
        tree.finish(p, replaced.map(v).as_ref(), Some(&v(stored)));
    }

    #[test]
    fn the_shape_covers_the_ring_exactly() {
        assert_eq!(LEAVES, 262_144);
        assert_eq!(node_range(0, 0), Some(HashRange::FULL));
        assert_eq!(width(DEPTH), Some(LEAVES));
        assert_eq!(width(DEPTH + 1), None);
        assert_eq!(leaves_under(1, 1), Some(4096..8192));
        assert_eq!(leaves_under(1, 64), None);
        let last = node_range(DEPTH, LEAVES - 1).expect("the last leaf");
        assert_eq!(last.end, 0, "wraps to the start");
        assert!(last.contains(u64::MAX));
        for hash in [0, 1, u64::MAX / 3, u64::MAX] {
            let leaf = leaf_of(hash);
            assert!(node_range(DEPTH, leaf).expect("a leaf").contains(hash));
        }
        assert_eq!(leaf_span(0, LEAVES - 1), HashRange::FULL);
    }

    #[test]
    fn records_between_counts_every_leaf_of_the_span_across_shards() {
        let tree = MerkleTree::new();
        // 1 + leaf % 3 records in leaves around the first shard boundaries and at the end.
        let leaves: Vec<u32> = (0..2 * SHARD_LEAVES + 5)
            .chain(LEAVES - 3..LEAVES)
            .collect();
        for &leaf in &leaves {
            for extra in 0..=u64::from(leaf % 3) {
                let p = tree.begin((u64::from(leaf) << (64 - LEAF_BITS)) + extra);
                tree.finish(p, None, Some(&v(1)));
            }
        }
        let one_by_one = |first: u32, last: u32| -> u64 {
            (first..=last.min(LEAVES - 1))
                .map(|l| tree.leaf(l).count)
                .sum()
        };
        for (first, last) in [
            (0, 0),
            (0, SHARD_LEAVES - 1),
            (SHARD_LEAVES - 1, SHARD_LEAVES),
            (3, 2 * SHARD_LEAVES + 2),
            (5, LEAVES - 1),
            (LEAVES - 2, LEAVES + 7),
        ] {
            assert_eq!(
                tree.records_between(first, last),
                one_by_one(first, last),
                "{first}..={last}"
            );
        }
        assert_eq!(tree.records_between(9, 8), 0, "an empty span");
        assert_eq!(
            tree.records_between(LEAVES, LEAVES + 1),
            0,
            "past the last leaf"
        );
    }

    #[test]
    fn leaves_follow_applies_and_order_does_not_matter() {
        let (a, b) = (MerkleTree::new(), MerkleTree::new());
        put(&a, b"x", None, 1);
        put(&a, b"x", Some(1), 2);
        put(&a, b"y", None, 3);
        put(&b, b"y", None, 3);
        put(&b, b"x", None, 2);
        assert_eq!(a.node(0, 0), b.node(0, 0));
        assert_eq!(a.node(0, 0).expect("root").count, 2);
        // A stale apply changes nothing.
        let p = a.begin(key_hash(b"x"));
        a.finish(p, None, None);
        assert_eq!(a.node(0, 0), b.node(0, 0));
        put(&b, b"x", Some(2), 4);
        assert_ne!(a.node(0, 0), b.node(0, 0));
        let leaf = leaf_of(key_hash(b"x"));
        assert_ne!(a.leaf(leaf), b.leaf(leaf));
        let sum: RangeDigest = (0..FANOUT)
            .filter_map(|i| a.node(1, i))
            .fold(RangeDigest::default(), RangeDigest::combine);
        assert_eq!(
            Some(sum),
            a.node(0, 0),
            "a parent is the sum of its children"
        );
    }

    #[test]
    fn a_removal_takes_exactly_the_removed_record_out_of_its_leaf() {
        let (tree, expected) = (MerkleTree::new(), MerkleTree::new());
        put(&tree, b"x", None, 1);
        put(&tree, b"x", Some(1), 2);
        put(&tree, b"y", None, 3);
        put(&expected, b"y", None, 3);
        let p = tree.begin(key_hash(b"x"));
        tree.finish_removal(p, Some(&v(2)));
        assert_eq!(tree.node(0, 0), expected.node(0, 0));
        let leaf = leaf_of(key_hash(b"x"));
        assert_eq!(tree.leaf(leaf), expected.leaf(leaf));
        // A removal that removed nothing changes nothing.
        let p = tree.begin(key_hash(b"y"));
        tree.finish_removal(p, None);
        assert_eq!(tree.node(0, 0), expected.node(0, 0));
        // A removal during a rebuild whose scan still saw the record: the leaf is kept as
        // maintained, not put back.
        let mut rebuild = tree.start_rebuild();
        rebuild.add(key_hash(b"y"), &v(3));
        let p = tree.begin(key_hash(b"y"));
        tree.finish_removal(p, Some(&v(3)));
        let report = tree.finish_rebuild(rebuild);
        assert_eq!(report.corrected, 0, "{report:?}");
        assert_eq!(tree.node(0, 0), MerkleTree::new().node(0, 0));
    }

    #[test]
    fn a_rebuild_corrects_leaves_changed_behind_its_back_and_keeps_written_ones() {
        let tree = MerkleTree::new();
        put(&tree, b"x", None, 1);
        put(&tree, b"y", None, 1);
        // Storage holds x@1 and y@5 (y changed behind the tree's back).
        let mut rebuild = tree.start_rebuild();
        rebuild.add(key_hash(b"x"), &v(1));
        rebuild.add(key_hash(b"y"), &v(5));
        let report = tree.finish_rebuild(rebuild);
        assert_eq!(report.corrected, 1);
        let expected = MerkleTree::new();
        put(&expected, b"x", None, 1);
        put(&expected, b"y", None, 5);
        assert_eq!(tree.node(0, 0), expected.node(0, 0));

        // A write during the rebuild (the scan missed it): its leaf keeps the maintained value.
        let mut rebuild = tree.start_rebuild();
        rebuild.add(key_hash(b"x"), &v(1));
        rebuild.add(key_hash(b"y"), &v(5));
        put(&tree, b"z", None, 7);
        assert_eq!(tree.finish_rebuild(rebuild).corrected, 0);
        put(&expected, b"z", None, 7);
        assert_eq!(tree.node(0, 0), expected.node(0, 0));

        // An apply that begins after the merge: its delta applies to the rebuilt value.
        let rebuild = tree.start_rebuild();
        let mut fresh = rebuild;
        for (k, n) in [(&b"x"[..], 1), (b"y", 5), (b"z", 7)] {
            fresh.add(key_hash(k), &v(n));
        }
        assert_eq!(tree.finish_rebuild(fresh).corrected, 0);
        put(&tree, b"w", None, 8);
        put(&expected, b"w", None, 8);
        assert_eq!(tree.node(0, 0), expected.node(0, 0));
    }

    #[test]
    fn an_abandoned_apply_asks_for_a_rebuild() {
        let tree = MerkleTree::new();
        assert!(!tree.needs_rebuild());
        let p = tree.begin(7);
        tree.abandon(p);
        assert!(tree.needs_rebuild());
        let _ = tree.start_rebuild();
        assert!(!tree.needs_rebuild());
    }

    #[test]
    fn requests_are_bounded() {
        let tree = MerkleTree::new();
        assert_eq!(tree.nodes(0, &[0]).expect("the root").len(), 1);
        assert_eq!(tree.nodes(4, &[0]), Err(BoundsError::Level(4)));
        assert_eq!(
            tree.nodes(1, &[64]),
            Err(BoundsError::Index {
                level: 1,
                index: 64
            })
        );
        let many = vec![0; MAX_NODES_PER_REQUEST + 1];
        assert!(matches!(
            tree.nodes(3, &many),
            Err(BoundsError::TooMany { .. })
        ));
        // Repeats (a cheap request for expensive answers) and disorder are refused.
        assert_eq!(tree.nodes(0, &[0, 0]), Err(BoundsError::Order));
        assert_eq!(tree.nodes(2, &[5, 3]), Err(BoundsError::Order));
        assert_eq!(tree.nodes(2, &[3, 5]).map(|d| d.len()), Ok(2));
        assert_eq!(check_leaves(&[1, 1], 2), Err(BoundsError::Order));
        assert!(matches!(
            check_leaves(&[1], 2),
            Err(BoundsError::Mismatch { .. })
        ));
        assert_eq!(check_leaves(&[1, 5], 2), Ok(()));
    }

    #[test]
    fn the_horizon_is_coarse_and_tombstones_past_it_are_excluded() {
        let grace = Duration::from_secs(60);
        assert_eq!(cutoff(10 * 60_000 + 59_999, grace), 9 * 60_000);
        assert_eq!(cutoff(10, grace), 0);
        let t = Record::tombstone(v(9 * 60_000));
        assert!(past_horizon(&t, 9 * 60_000));
        assert!(!past_horizon(&t, 9 * 60_000 - 1));
        assert!(!past_horizon(&Record::value("v", v(1)), u64::MAX));
    }

    #[test]
    fn entry_hash_covers_the_position_and_the_version() {
        let h = |k: &[u8], n| entry_hash(key_hash(k), &v(n));
        assert_eq!(h(b"k", 1), h(b"k", 1));
        assert_ne!(h(b"k", 1), h(b"k", 2));
        assert_ne!(h(b"k", 1), h(b"j", 1));
        let other_writer = Version::new(Timestamp::new(1, 0), NodeId(2));
        assert_ne!(h(b"k", 1), entry_hash(key_hash(b"k"), &other_writer));
    }
}
