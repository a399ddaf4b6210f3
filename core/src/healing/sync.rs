//! Ring-buffer anti-entropy's pure parts: the bounded log of writes a node applied as a
//! replica, and each co-replica's place in it.
//!
//! Every write a node applies as a replica goes into an [`AppliedLog`] of `(key, version)`
//! with a sequence number; the log keeps the newest `capacity` entries and never drains on
//! reading. [`SyncCursors`] keeps, per peer, the sequence number up to which that peer has
//! been offered everything: each round the node offers the peer the entries after its cursor
//! ([`AppliedLog::since`]), the peer answers which it lacks, and the cursor moves only once
//! those records were delivered. A peer whose cursor fell behind the oldest entry kept
//! (overtaken by the writer) has missed offers that the log no longer holds: the span is not
//! lost, the peer is marked for a **Merkle comparison** ([`PeerSync::Compare`]) of the ranges
//! the two share ([`super::exchange`]), and the log resumes from its head at that moment. A
//! peer first seen, or seen in a new life (restarted, maybe wiped), is marked the same way.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use crate::hlc::Version;
use crate::identity::NodeId;

/// One applied write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Its place in the log.
    pub seq: u64,
    /// The key.
    pub key: Bytes,
    /// The version applied.
    pub version: Version,
    /// The member the write came from (its coordinator, or the peer whose repair or hint
    /// delivered it), which holds that version or a newer one: never offered back to it.
    /// `None` for writes this node originated.
    pub source: Option<NodeId>,
}

/// A bounded ring buffer of applied writes; see the [module documentation](self).
#[derive(Debug)]
pub struct AppliedLog {
    capacity: usize,
    entries: VecDeque<Applied>,
    next_seq: u64,
}

/// What [`AppliedLog::since`] found after a cursor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Since {
    /// The entries after the cursor (at most the limit), oldest first.
    Entries(Vec<Applied>),
    /// Entries after the cursor were overwritten before they were offered.
    Overtaken,
}

impl AppliedLog {
    /// An empty log keeping at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Self {
        AppliedLog {
            capacity: capacity.max(1),
            entries: VecDeque::with_capacity(capacity.clamp(1, 1 << 16)),
            next_seq: 0,
        }
    }

    /// Appends one applied write, overwriting the oldest entry when full.
    pub fn push(&mut self, key: Bytes, version: Version, source: Option<NodeId>) {
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back(Applied {
            seq: self.next_seq,
            key,
            version,
            source,
        });
        self.next_seq += 1;
    }

    /// The sequence number the next entry gets: a cursor there has seen everything.
    pub fn head(&self) -> u64 {
        self.next_seq
    }

    /// Up to `limit` entries from sequence number `from` on, or [`Since::Overtaken`] if some
    /// of them are gone.
    pub fn since(&self, from: u64, limit: usize) -> Since {
        let first = self.entries.front().map_or(self.next_seq, |e| e.seq);
        if from < first {
            return Since::Overtaken;
        }
        let skip = (from - first) as usize;
        Since::Entries(
            self.entries
                .iter()
                .skip(skip)
                .take(limit)
                .cloned()
                .collect(),
        )
    }
}

/// Where one peer stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerSync {
    /// Offered every log entry before this sequence number.
    Log(u64),
    /// Owed a Merkle comparison of everything the two share (the log cannot say what the peer
    /// missed); once it is asked for, the log resumes at `resume` (the log's head when the
    /// peer was marked).
    Compare {
        /// The log position to resume at.
        resume: u64,
    },
}

/// Per-peer positions; see the [module documentation](self).
#[derive(Debug, Default)]
pub struct SyncCursors {
    peers: HashMap<NodeId, (u64, PeerSync)>,
}

impl SyncCursors {
    /// The peer `id` in its life `generation`: a peer not seen before, or seen in another
    /// life, starts owed a comparison. Returns where it stands.
    pub fn peer(&mut self, id: NodeId, generation: u64, log: &AppliedLog) -> PeerSync {
        let entry = self
            .peers
            .entry(id)
            .or_insert_with(|| (generation, PeerSync::Compare { resume: log.head() }));
        if entry.0 != generation {
            *entry = (generation, PeerSync::Compare { resume: log.head() });
        }
        entry.1.clone()
    }

    /// Sets where `id` stands (after a delivered offer, or to ask for a comparison).
    pub fn set(&mut self, id: NodeId, state: PeerSync) {
        if let Some(entry) = self.peers.get_mut(&id) {
            entry.1 = state;
        }
    }

    /// Forgets peers not in `alive`.
    pub fn retain(&mut self, alive: impl Fn(NodeId) -> bool) {
        self.peers.retain(|id, _| alive(*id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Timestamp;

    fn v(n: u64) -> Version {
        Version::new(Timestamp::new(n, 0), NodeId(1))
    }

    fn keys(s: &Since) -> Vec<u64> {
        match s {
            Since::Entries(e) => e.iter().map(|a| a.seq).collect(),
            Since::Overtaken => panic!("overtaken"),
        }
    }

    #[test]
    fn reading_never_drains_and_an_overwritten_span_is_reported() {
        let mut log = AppliedLog::new(4);
        assert_eq!(log.since(0, 10), Since::Entries(vec![]));
        for n in 0..3 {
            log.push(Bytes::from(format!("k{n}")), v(n), None);
        }
        assert_eq!(keys(&log.since(0, 10)), vec![0, 1, 2]);
        assert_eq!(keys(&log.since(0, 10)), vec![0, 1, 2], "still there");
        assert_eq!(keys(&log.since(1, 1)), vec![1]);
        assert_eq!(keys(&log.since(3, 10)), Vec::<u64>::new());
        for n in 3..6 {
            log.push(Bytes::from(format!("k{n}")), v(n), None);
        }
        // Entries 0 and 1 are gone: a cursor before 2 was overtaken.
        assert_eq!(log.since(1, 10), Since::Overtaken);
        assert_eq!(keys(&log.since(2, 10)), vec![2, 3, 4, 5]);
        assert_eq!(log.head(), 6);
    }

    #[test]
    fn new_peers_and_new_lives_are_owed_a_comparison_and_cursors_are_per_peer() {
        let mut log = AppliedLog::new(8);
        log.push(Bytes::from_static(b"a"), v(1), None);
        let mut cursors = SyncCursors::default();
        let scan = PeerSync::Compare { resume: 1 };
        assert_eq!(cursors.peer(NodeId(2), 7, &log), scan);
        cursors.set(NodeId(2), PeerSync::Log(1));
        assert_eq!(cursors.peer(NodeId(2), 7, &log), PeerSync::Log(1));
        assert_eq!(cursors.peer(NodeId(3), 1, &log), scan, "each peer its own");
        log.push(Bytes::from_static(b"b"), v(2), None);
        assert_eq!(
            cursors.peer(NodeId(2), 8, &log),
            PeerSync::Compare { resume: 2 },
            "a restarted peer is compared again"
        );
        cursors.retain(|id| id == NodeId(3));
        assert_eq!(
            cursors.peer(NodeId(2), 8, &log),
            PeerSync::Compare { resume: 2 }
        );
    }
}
