//! Merkle anti-entropy's exchange: one comparison of this node's tree with a co-replica's,
//! seen from the node that starts it, as a sans-IO machine.
//!
//! # Protocol
//!
//! The initiator pushes: it finds the leaves where it may hold records the peer lacks, and
//! offers them. Both replicas initiate exchanges with each other, so each direction is
//! covered by one side's exchange.
//!
//! 1. **Descent.** The initiator asks for the digests of nodes of the peer's tree, the root
//!    first, then level by level only the children of nodes that differ
//!    ([`Step::Nodes`], answered with [`Exchange::handle_digests`]). A node is skipped when
//!    the two digests agree and the node lies wholly inside the ranges the two share
//!    ([`Coverage`]), when it lies wholly outside them, or when the initiator holds nothing
//!    under it (it has nothing to push there).
//! 2. **Leaf checks.** The leaves that remain are grouped into batches of at most
//!    [`MAX_LEAVES_PER_CHECK`] leaves spanning at most [`MAX_RECORDS_PER_CHECK`] of the
//!    initiator's records ([`Step::Check`]). For each batch the driver scans its storage over
//!    the batch's span and computes, per leaf, the digest of the records the two share that
//!    are not past the agreed purge horizon ([`super::merkle::cutoff`]); the peer computes the
//!    same from its storage and answers which leaves differ. That re-check is what makes
//!    replicas that purge at different moments agree: the maintained trees may differ by a
//!    record one side already purged, the digests at the agreed horizon do not.
//! 3. **Offers.** For the leaves that still differ, the driver offers the peer the
//!    `(key, version)` of its records there (the ring buffer's `SyncOffer`), the peer answers
//!    which it lacks, and the records go in an ordinary `Apply`; then it reports the batch
//!    done ([`Exchange::handle_checked`]).
//!
//! # Driving contract
//!
//! Call [`Exchange::poll`] with the local tree; perform the [`Step`] it returns and feed the
//! answer back with the matching `handle_*` call before polling again ([`Step::Wait`] until
//! then). [`Step::Done`] ends the exchange. Any error (a transport failure, a refusal, an
//! answer of the wrong shape) abandons it: nothing is half-applied, since every record the
//! peer acknowledged is stored whole and the rest is offered again by the next exchange,
//! which the driver schedules as a retry. The machine has no clock; bandwidth is metered by
//! the driver with a [`RateLimit`].

use std::collections::VecDeque;

use super::merkle::{
    self, DEPTH, FANOUT, LEAF_BITS, LEAVES, MAX_LEAVES_PER_CHECK, MAX_NODES_PER_REQUEST,
    MAX_RECORDS_PER_CHECK, MerkleTree,
};
use crate::hash::HashRange;
use crate::storage::RangeDigest;

/// How much of a node's range two members share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Share {
    /// None of it.
    None,
    /// Some of it.
    Partial,
    /// All of it.
    Full,
}

/// Which nodes of the tree lie inside the ranges two members share.
#[derive(Clone, Debug)]
pub struct Coverage {
    /// `levels[l][i]`: the share of node `(l, i)`.
    levels: Vec<Vec<Share>>,
}

impl Coverage {
    /// Everything shared (N at least the cluster's size).
    pub fn full() -> Self {
        Coverage {
            levels: (0..=DEPTH)
                .map(|l| vec![Share::Full; merkle::width(l).unwrap_or(1) as usize])
                .collect(),
        }
    }

    /// The coverage of `shared` (ranges that may wrap, in any order, not overlapping).
    pub fn new(shared: &[HashRange]) -> Self {
        let mut leaves = vec![Share::None; LEAVES as usize];
        let shift = 64 - LEAF_BITS;
        let mut mark = |start: u64, end_inclusive: u64| {
            let (first, last) = ((start >> shift) as usize, (end_inclusive >> shift) as usize);
            for (leaf, share) in leaves.iter_mut().enumerate().take(last + 1).skip(first) {
                let range = merkle::node_range(DEPTH, leaf as u32).expect("a leaf");
                let lo = range.start;
                let hi = range.end.wrapping_sub(1);
                if start <= lo && end_inclusive >= hi {
                    *share = Share::Full;
                } else if *share == Share::None {
                    *share = Share::Partial;
                }
            }
        };
        for r in shared {
            if r.is_full() {
                mark(0, u64::MAX);
                continue;
            }
            let last = r.end.wrapping_sub(1);
            if r.start <= last {
                mark(r.start, last);
            } else {
                mark(r.start, u64::MAX);
                mark(0, last);
            }
        }
        let mut levels = vec![leaves];
        for _ in 0..DEPTH {
            let below = levels.last().expect("a level");
            let up = below
                .chunks(FANOUT as usize)
                .map(|children| {
                    if children.iter().all(|s| *s == Share::Full) {
                        Share::Full
                    } else if children.iter().all(|s| *s == Share::None) {
                        Share::None
                    } else {
                        Share::Partial
                    }
                })
                .collect();
            levels.push(up);
        }
        levels.reverse();
        Coverage { levels }
    }

    /// The share of node `(level, index)` (`None` for no such node).
    pub fn of(&self, level: u8, index: u32) -> Share {
        self.levels
            .get(usize::from(level))
            .and_then(|l| l.get(index as usize))
            .copied()
            .unwrap_or(Share::None)
    }
}

/// What the driver does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Ask the peer for the digests of these nodes of `level`; answer with
    /// [`Exchange::handle_digests`].
    Nodes {
        /// The level.
        level: u8,
        /// Node indices, ascending, at most [`MAX_NODES_PER_REQUEST`].
        indices: Vec<u32>,
    },
    /// Check these leaves (ascending) against the peer at the horizon and offer what differs;
    /// report with [`Exchange::handle_checked`].
    Check(Vec<u32>),
    /// An answer is awaited.
    Wait,
    /// The exchange is over.
    Done,
}

/// Why an exchange was abandoned by the machine.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExchangeError {
    /// An answer came that no request awaited.
    #[error("an answer no request awaited")]
    Unexpected,
    /// The peer answered a digest request with the wrong number of digests.
    #[error("{got} digests for {asked} nodes")]
    WrongCount {
        /// Nodes asked for.
        asked: usize,
        /// Digests received.
        got: usize,
    },
    /// The peer named a leaf the check did not carry.
    #[error("leaf {0} was not in the check")]
    UnknownLeaf(u32),
}

/// What an exchange did, for the node's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExchangeStats {
    /// Node digests asked for.
    pub nodes: u64,
    /// Leaves checked at the horizon.
    pub leaves_checked: u64,
    /// Leaves that still differed after the check (their records were offered).
    pub leaves_differing: u64,
}

#[derive(Debug)]
enum Awaiting {
    Nothing,
    Nodes { level: u8, indices: Vec<u32> },
    Check(Vec<u32>),
}

/// One exchange with one peer; see the [module documentation](self).
#[derive(Debug)]
pub struct Exchange {
    coverage: Coverage,
    /// Nodes of `level` whose peer digests are still to be asked for.
    frontier: VecDeque<u32>,
    level: u8,
    /// Children to ask for on the next level.
    next: Vec<u32>,
    /// Leaves to check, ascending.
    leaves: VecDeque<u32>,
    awaiting: Awaiting,
    stats: ExchangeStats,
}

impl Exchange {
    /// An exchange over the ranges `coverage` says the two share.
    pub fn new(coverage: Coverage) -> Self {
        Exchange {
            coverage,
            frontier: VecDeque::from([0]),
            level: 0,
            next: Vec::new(),
            leaves: VecDeque::new(),
            awaiting: Awaiting::Nothing,
            stats: ExchangeStats::default(),
        }
    }

    /// What it did so far.
    pub fn stats(&self) -> ExchangeStats {
        self.stats
    }

    /// The next step; `tree` is this node's tree.
    pub fn poll(&mut self, tree: &MerkleTree) -> Step {
        if !matches!(self.awaiting, Awaiting::Nothing) {
            return Step::Wait;
        }
        loop {
            // Nodes where this node holds nothing, or shares nothing, are never asked for.
            let (level, coverage) = (self.level, &self.coverage);
            self.frontier.retain(|&i| {
                coverage.of(level, i) != Share::None
                    && tree.node(level, i).is_some_and(|own| own.count > 0)
            });
            if !self.frontier.is_empty() {
                let take = self.frontier.len().min(MAX_NODES_PER_REQUEST);
                let indices: Vec<u32> = self.frontier.drain(..take).collect();
                self.stats.nodes += indices.len() as u64;
                self.awaiting = Awaiting::Nodes {
                    level: self.level,
                    indices: indices.clone(),
                };
                return Step::Nodes {
                    level: self.level,
                    indices,
                };
            }
            if self.level < DEPTH && !self.next.is_empty() {
                self.level += 1;
                self.frontier = std::mem::take(&mut self.next).into();
                continue;
            }
            break;
        }
        let Some(&first) = self.leaves.front() else {
            return Step::Done;
        };
        let mut batch: Vec<u32> = Vec::new();
        // Records in the leaves `first..=` the last one taken, by this tree's counts: summed
        // as the batch grows, so a batch costs one pass over its span (summing the whole
        // span again for every leaf made a check of many leaves quadratic).
        let mut span = 0u64;
        while let Some(&leaf) = self.leaves.front() {
            if batch.len() == MAX_LEAVES_PER_CHECK {
                break;
            }
            let after = match batch.last() {
                None => tree.records_between(first, leaf),
                Some(&last) => span.saturating_add(tree.records_between(last + 1, leaf)),
            };
            if !batch.is_empty() && after > MAX_RECORDS_PER_CHECK {
                break;
            }
            span = after;
            batch.push(leaf);
            self.leaves.pop_front();
        }
        self.stats.leaves_checked += batch.len() as u64;
        self.awaiting = Awaiting::Check(batch.clone());
        Step::Check(batch)
    }

    /// The peer's digests of the nodes the last [`Step::Nodes`] named, in its order.
    pub fn handle_digests(
        &mut self,
        tree: &MerkleTree,
        digests: &[RangeDigest],
    ) -> Result<(), ExchangeError> {
        let Awaiting::Nodes { level, indices } =
            std::mem::replace(&mut self.awaiting, Awaiting::Nothing)
        else {
            return Err(ExchangeError::Unexpected);
        };
        if digests.len() != indices.len() {
            return Err(ExchangeError::WrongCount {
                asked: indices.len(),
                got: digests.len(),
            });
        }
        for (&i, theirs) in indices.iter().zip(digests) {
            let own = tree.node(level, i).unwrap_or_default();
            if own == *theirs && self.coverage.of(level, i) == Share::Full {
                continue;
            }
            if level == DEPTH {
                self.leaves.push_back(i);
            } else {
                let children =
                    merkle::leaves_under(level, i).map_or(0..0, |_| i * FANOUT..(i + 1) * FANOUT);
                self.next.extend(children);
            }
        }
        Ok(())
    }

    /// The last [`Step::Check`] is done: `differing` are the leaves the peer found different
    /// (whose records the driver offered, and the peer acknowledged).
    pub fn handle_checked(&mut self, differing: &[u32]) -> Result<(), ExchangeError> {
        let Awaiting::Check(batch) = std::mem::replace(&mut self.awaiting, Awaiting::Nothing)
        else {
            return Err(ExchangeError::Unexpected);
        };
        if let Some(&leaf) = differing.iter().find(|l| batch.binary_search(l).is_err()) {
            return Err(ExchangeError::UnknownLeaf(leaf));
        }
        self.stats.leaves_differing += differing.len() as u64;
        Ok(())
    }
}

/// A token bucket for the bytes anti-entropy sends: `rate` bytes a second, bursts up to one
/// second's worth. Sans-IO: the caller passes the time and waits as told.
#[derive(Clone, Debug)]
pub struct RateLimit {
    rate: u64,
    /// Bytes that may go now (negative: owed).
    tokens: i128,
    last_ms: u64,
}

impl RateLimit {
    /// A full bucket of `rate` bytes a second (at least one).
    pub fn new(rate: u64, now_ms: u64) -> Self {
        let rate = rate.max(1);
        RateLimit {
            rate,
            tokens: i128::from(rate),
            last_ms: now_ms,
        }
    }

    /// Takes `bytes` and returns how many milliseconds to wait before sending them.
    pub fn take(&mut self, now_ms: u64, bytes: u64) -> u64 {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        let refill = i128::from(elapsed) * i128::from(self.rate) / 1000;
        self.tokens = (self.tokens + refill).min(i128::from(self.rate));
        self.tokens -= i128::from(bytes);
        if self.tokens >= 0 {
            0
        } else {
            let owed = -self.tokens;
            let rate = i128::from(self.rate);
            u64::try_from((owed * 1000 + rate - 1) / rate).unwrap_or(u64::MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::key_hash;
    use crate::hlc::{Timestamp, Version};
    use crate::identity::NodeId;

    fn v(n: u64) -> Version {
        Version::new(Timestamp::new(n, 0), NodeId(1))
    }

    fn put(tree: &MerkleTree, key: &[u8], n: u64) {
        let p = tree.begin(key_hash(key));
        tree.finish(p, None, Some(&v(n)));
    }

    /// Drives `exchange` against `peer`'s tree, answering leaf checks with `differing` (the
    /// leaves whose own and peer leaf digests differ); returns every step taken.
    fn drive(exchange: &mut Exchange, own: &MerkleTree, peer: &MerkleTree) -> Vec<Step> {
        let mut steps = Vec::new();
        for _ in 0..10_000 {
            let step = exchange.poll(own);
            steps.push(step.clone());
            match step {
                Step::Nodes { level, indices } => {
                    assert_eq!(exchange.poll(own), Step::Wait, "one request at a time");
                    let digests = peer.nodes(level, &indices).expect("bounded");
                    exchange.handle_digests(own, &digests).expect("an answer");
                }
                Step::Check(leaves) => {
                    let differing: Vec<u32> = leaves
                        .iter()
                        .copied()
                        .filter(|&l| own.leaf(l) != peer.leaf(l))
                        .collect();
                    exchange.handle_checked(&differing).expect("checked");
                }
                Step::Wait => panic!("nothing awaited"),
                Step::Done => return steps,
            }
        }
        panic!("the exchange did not end");
    }

    #[test]
    fn equal_trees_cost_one_root_digest() {
        let (a, b) = (MerkleTree::new(), MerkleTree::new());
        for k in 0..100u32 {
            put(&a, &k.to_le_bytes(), 1);
            put(&b, &k.to_le_bytes(), 1);
        }
        let mut x = Exchange::new(Coverage::full());
        let steps = drive(&mut x, &a, &b);
        assert_eq!(
            steps,
            vec![
                Step::Nodes {
                    level: 0,
                    indices: vec![0]
                },
                Step::Done
            ]
        );
    }

    #[test]
    fn an_empty_tree_asks_nothing_and_a_missing_key_is_found_by_descent() {
        let (a, b) = (MerkleTree::new(), MerkleTree::new());
        let mut x = Exchange::new(Coverage::full());
        assert_eq!(x.poll(&a), Step::Done, "nothing to push");
        for k in 0..100u32 {
            put(&a, &k.to_le_bytes(), 1);
            if k != 42 {
                put(&b, &k.to_le_bytes(), 1);
            }
        }
        let leaf = merkle::leaf_of(key_hash(&42u32.to_le_bytes()));
        let mut x = Exchange::new(Coverage::full());
        let steps = drive(&mut x, &a, &b);
        assert_eq!(steps.len(), 6, "{steps:?}");
        assert!(matches!(&steps[1], Step::Nodes { level: 1, indices } if indices.len() <= 64));
        assert!(matches!(&steps[3], Step::Nodes { level: 3, .. }));
        assert_eq!(steps[4], Step::Check(vec![leaf]));
        assert_eq!(x.stats().leaves_differing, 1);
        // The other way round, b holds nothing a lacks: nothing differs at the check.
        let mut y = Exchange::new(Coverage::full());
        drive(&mut y, &b, &a);
        assert_eq!(y.stats().leaves_differing, 0);
    }

    #[test]
    fn unshared_ranges_are_never_compared_and_partial_ones_always_are() {
        let (a, b) = (MerkleTree::new(), MerkleTree::new());
        // Keys in the first half of the ring are shared; a holds one in each half.
        let key_in = |upper: bool| {
            (0u32..)
                .map(|k| k.to_le_bytes())
                .find(|k| (key_hash(k) >> 63 == 1) == upper)
                .expect("a key")
        };
        let (low, high) = (key_in(false), key_in(true));
        put(&a, &low, 1);
        put(&b, &low, 1);
        put(&a, &high, 1);
        let half = Coverage::new(&[HashRange::new(0, 1 << 63)]);
        let mut x = Exchange::new(half);
        drive(&mut x, &a, &b);
        assert_eq!(x.stats().leaves_checked, 0, "the high key is not shared");
        // A shared range ending inside the low key's leaf: that leaf is checked even though
        // the digests agree, since they may cover keys the two do not share.
        let leaf = merkle::leaf_of(key_hash(&low));
        let inside = merkle::node_range(3, leaf).expect("leaf").start + 1;
        let mut x = Exchange::new(Coverage::new(&[HashRange::new(0, inside)]));
        let steps = drive(&mut x, &a, &b);
        assert!(
            steps.contains(&Step::Check(vec![leaf])),
            "{} steps",
            steps.len()
        );
    }

    #[test]
    fn answers_of_the_wrong_shape_abandon_the_exchange() {
        let a = MerkleTree::new();
        put(&a, b"k", 1);
        let mut x = Exchange::new(Coverage::full());
        assert_eq!(
            x.handle_digests(&a, &[]),
            Err(ExchangeError::Unexpected),
            "nothing asked yet"
        );
        assert!(matches!(x.poll(&a), Step::Nodes { .. }));
        assert_eq!(
            x.handle_digests(&a, &[]),
            Err(ExchangeError::WrongCount { asked: 1, got: 0 })
        );
        let mut x = Exchange::new(Coverage::full());
        let b = MerkleTree::new();
        let mut leaves = None;
        for _ in 0..10 {
            match x.poll(&a) {
                Step::Nodes { level, indices } => {
                    let d = b.nodes(level, &indices).expect("bounded");
                    x.handle_digests(&a, &d).expect("ok");
                }
                Step::Check(l) => {
                    leaves = Some(l);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        let leaves = leaves.expect("a check");
        let bogus = leaves[0] ^ 1;
        assert_eq!(
            x.handle_checked(&[bogus]),
            Err(ExchangeError::UnknownLeaf(bogus))
        );
    }

    #[test]
    fn checks_are_batched_by_leaves_and_by_records() {
        let (a, b) = (MerkleTree::new(), MerkleTree::new());
        // Records in every leaf of a's first 2048 leaves: 10 each, none on b.
        for leaf in 0..2048u32 {
            for extra in 0..10u64 {
                let p = a.begin((u64::from(leaf) << (64 - LEAF_BITS)) + extra);
                a.finish(p, None, Some(&v(2)));
            }
        }
        let mut x = Exchange::new(Coverage::full());
        let steps = drive(&mut x, &a, &b);
        let checks: Vec<usize> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Check(l) => Some(l.len()),
                _ => None,
            })
            .collect();
        assert_eq!(checks.iter().sum::<usize>(), 2048);
        assert!(
            checks
                .iter()
                .all(|&n| n <= MAX_LEAVES_PER_CHECK && n * 10 <= 16_384)
        );
    }

    #[test]
    fn a_check_spans_as_many_records_as_allowed_counting_the_equal_leaves_between() {
        let (a, b) = (MerkleTree::new(), MerkleTree::new());
        // 10 records in each of the first 8192 leaves on both; one more on a in every 8th.
        for leaf in 0..8192u32 {
            let base = u64::from(leaf) << (64 - LEAF_BITS);
            for extra in 0..10u64 {
                for t in [&a, &b] {
                    let p = t.begin(base + extra);
                    t.finish(p, None, Some(&v(2)));
                }
            }
            if leaf % 8 == 0 {
                let p = a.begin(base + 10);
                a.finish(p, None, Some(&v(2)));
            }
        }
        let mut x = Exchange::new(Coverage::full());
        let checks: Vec<Vec<u32>> = drive(&mut x, &a, &b)
            .into_iter()
            .filter_map(|s| match s {
                Step::Check(l) => Some(l),
                _ => None,
            })
            .collect();
        assert_eq!(checks.iter().map(Vec::len).sum::<usize>(), 1024);
        for check in &checks {
            let (first, last) = (check[0], *check.last().expect("a leaf"));
            assert!(a.records_between(first, last) <= MAX_RECORDS_PER_CHECK);
        }
        for pair in checks.windows(2) {
            let (this, next) = (&pair[0], &pair[1]);
            let first = this[0];
            assert!(
                a.records_between(first, next[0]) > MAX_RECORDS_PER_CHECK,
                "a check ends only where the next leaf would pass the bound"
            );
        }
    }

    #[test]
    fn the_rate_limit_spreads_bytes_over_time() {
        let mut r = RateLimit::new(1000, 0);
        assert_eq!(r.take(0, 1000), 0, "a full bucket");
        assert_eq!(r.take(0, 500), 500, "half a second owed");
        assert_eq!(r.take(500, 0), 0, "paid back");
        assert_eq!(
            r.take(10_000, 3000),
            2000,
            "bursts are capped at one second"
        );
    }
}
