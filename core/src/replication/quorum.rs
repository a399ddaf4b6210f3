//! The coordinator's pure decisions: how many replicas a consistency level requires, when a
//! request has met it or can no longer meet it, which record wins a read and which replicas
//! need repair. No I/O: the node's runtime feeds replies in and acts on what comes out.

use std::num::NonZeroUsize;

use serde::{Deserialize, Serialize};

use super::error::InvalidRequest;
use super::message::Refusal;
use crate::identity::NodeId;
use crate::record::Record;

/// How many of a key's replicas must answer a request.
///
/// In configuration files it is written `"one"`, `"quorum"`, `"all"` or a count (`2` or
/// `"2"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Consistency {
    /// One replica.
    One,
    /// A majority of the replication factor: `N / 2 + 1`.
    Quorum,
    /// Every replica.
    All,
    /// Exactly this many replicas (at most N).
    Count(NonZeroUsize),
}

impl Consistency {
    /// The replicas required out of a replication factor of `n`; a count above `n` is an
    /// [`InvalidRequest::ConsistencyAboveReplicas`].
    pub fn required(self, n: NonZeroUsize) -> Result<usize, InvalidRequest> {
        let n = n.get();
        match self {
            Consistency::One => Ok(1),
            Consistency::Quorum => Ok(n / 2 + 1),
            Consistency::All => Ok(n),
            Consistency::Count(c) if c.get() <= n => Ok(c.get()),
            Consistency::Count(c) => Err(InvalidRequest::ConsistencyAboveReplicas {
                requested: c.get(),
                replicas: n,
            }),
        }
    }
}

impl std::fmt::Display for Consistency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Consistency::One => f.write_str("one"),
            Consistency::Quorum => f.write_str("quorum"),
            Consistency::All => f.write_str("all"),
            Consistency::Count(n) => write!(f, "{n}"),
        }
    }
}

impl std::str::FromStr for Consistency {
    type Err = String;

    /// `one`, `quorum`, `all` (any case) or a positive count.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "one" => Ok(Consistency::One),
            "quorum" => Ok(Consistency::Quorum),
            "all" => Ok(Consistency::All),
            other => other
                .parse::<NonZeroUsize>()
                .map(Consistency::Count)
                .map_err(|_| format!("`{s}` is not one, quorum, all or a positive count")),
        }
    }
}

impl Serialize for Consistency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Consistency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Count(u64),
            Text(String),
        }
        let text = match Form::deserialize(d)? {
            Form::Count(n) => n.to_string(),
            Form::Text(t) => t,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Not decided: more answers are needed and can still come.
    Pending,
    /// Enough replicas acknowledged.
    Met,
    /// Too many replicas refused or failed for the rest to make up the difference.
    Impossible,
}

/// Counts one key's acknowledgements against the required number, among exactly the key's
/// own replicas (the caller records only answers from members of the replica set; strict
/// quorum: nothing else counts).
#[derive(Clone, Debug)]
pub struct AckTracker {
    required: usize,
    outstanding: usize,
    acks: usize,
    refusals: Vec<(NodeId, Refusal)>,
    failures: usize,
}

impl AckTracker {
    /// A request to `replicas` replicas that needs `required` acknowledgements.
    pub fn new(required: usize, replicas: usize) -> Self {
        AckTracker {
            required,
            outstanding: replicas,
            acks: 0,
            refusals: Vec::new(),
            failures: 0,
        }
    }

    /// A replica acknowledged.
    pub fn ack(&mut self) -> Progress {
        if self.outstanding > 0 {
            self.outstanding -= 1;
            self.acks += 1;
        }
        self.progress()
    }

    /// A replica refused.
    pub fn refuse(&mut self, from: NodeId, why: Refusal) -> Progress {
        if self.outstanding > 0 {
            self.outstanding -= 1;
            self.refusals.push((from, why));
        }
        self.progress()
    }

    /// A replica could not be asked or did not answer in a usable way (outcome unknown).
    pub fn fail(&mut self) -> Progress {
        if self.outstanding > 0 {
            self.outstanding -= 1;
            self.failures += 1;
        }
        self.progress()
    }

    /// Where the request stands.
    pub fn progress(&self) -> Progress {
        if self.acks >= self.required {
            Progress::Met
        } else if self.acks + self.outstanding < self.required {
            Progress::Impossible
        } else {
            Progress::Pending
        }
    }

    /// Acknowledgements so far.
    pub fn acks(&self) -> usize {
        self.acks
    }

    /// The number required.
    pub fn required(&self) -> usize {
        self.required
    }

    /// Refusals so far, with who refused.
    pub fn refusals(&self) -> &[(NodeId, Refusal)] {
        &self.refusals
    }

    /// Replicas that failed without a refusal (unreachable, timed out, garbled answer).
    pub fn failures(&self) -> usize {
        self.failures
    }

    /// The refusals, taken out.
    pub fn take_refusals(&mut self) -> Vec<(NodeId, Refusal)> {
        std::mem::take(&mut self.refusals)
    }
}

/// One key's read: the replicas' answers, the winner and who needs repair.
#[derive(Clone, Debug, Default)]
pub struct ReadMerge {
    answers: Vec<(NodeId, Option<Record>)>,
    winner: Option<Record>,
}

impl ReadMerge {
    /// An empty read.
    pub fn new() -> Self {
        ReadMerge::default()
    }

    /// `from` answered with `record` (`None`: it holds nothing for the key).
    pub fn add(&mut self, from: NodeId, record: Option<Record>) {
        if let Some(r) = &record {
            let newer = match &self.winner {
                None => true,
                Some(w) => r.supersedes(w),
            };
            if newer {
                self.winner = Some(r.clone());
            }
        }
        self.answers.push((from, record));
    }

    /// Answers so far.
    pub fn answers(&self) -> usize {
        self.answers.len()
    }

    /// The newest record among the answers (LWW by version), tombstones included.
    pub fn winner(&self) -> Option<&Record> {
        self.winner.as_ref()
    }

    /// Replicas that answered with something older than the winner, or with nothing: each
    /// should receive the winner, with its original version.
    pub fn stale(&self) -> Vec<NodeId> {
        let Some(winner) = &self.winner else {
            return Vec::new();
        };
        self.answers
            .iter()
            .filter(|(_, r)| r.as_ref().is_none_or(|r| r.version != winner.version))
            .map(|(from, _)| *from)
            .collect()
    }

    /// Replicas that answered with the winner itself.
    pub fn holders(&self) -> usize {
        let Some(winner) = &self.winner else {
            return self.answers.len();
        };
        self.answers
            .iter()
            .filter(|(_, r)| r.as_ref().is_some_and(|r| r.version == winner.version))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::{Timestamp, Version};

    fn nz(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).unwrap()
    }

    fn rec(ms: u64, node: u64) -> Record {
        Record::value(
            format!("v{ms}"),
            Version::new(Timestamp::new(ms, 0), NodeId(node)),
        )
    }

    #[test]
    fn required_counts_follow_the_replication_factor() {
        assert_eq!(Consistency::One.required(nz(3)), Ok(1));
        assert_eq!(Consistency::Quorum.required(nz(3)), Ok(2));
        assert_eq!(Consistency::Quorum.required(nz(4)), Ok(3));
        assert_eq!(Consistency::Quorum.required(nz(5)), Ok(3));
        assert_eq!(Consistency::All.required(nz(5)), Ok(5));
        assert_eq!(Consistency::Count(nz(3)).required(nz(3)), Ok(3));
        assert_eq!(
            Consistency::Count(nz(4)).required(nz(3)),
            Err(InvalidRequest::ConsistencyAboveReplicas {
                requested: 4,
                replicas: 3
            })
        );
        for s in ["one", "QUORUM", "all", "2"] {
            let c: Consistency = s.parse().unwrap();
            assert_eq!(c.to_string(), s.to_ascii_lowercase());
        }
        assert!("0".parse::<Consistency>().is_err());
        assert!("most".parse::<Consistency>().is_err());
    }

    #[test]
    fn a_tracker_is_met_at_w_and_impossible_once_w_is_out_of_reach() {
        let mut t = AckTracker::new(2, 3);
        assert_eq!(t.progress(), Progress::Pending);
        assert_eq!(t.ack(), Progress::Pending);
        assert_eq!(
            t.refuse(NodeId(2), Refusal::ClockDrift { ahead_ms: 900 }),
            Progress::Pending
        );
        assert_eq!(t.ack(), Progress::Met);
        assert_eq!(t.acks(), 2);

        let mut t = AckTracker::new(2, 3);
        assert_eq!(t.fail(), Progress::Pending);
        assert_eq!(
            t.refuse(NodeId(3), Refusal::ShuttingDown),
            Progress::Impossible
        );
        // More answers than replicas are ignored: nothing counts twice.
        let mut t = AckTracker::new(2, 1);
        assert_eq!(t.progress(), Progress::Impossible);
        assert_eq!(t.ack(), Progress::Impossible);
        assert_eq!(t.ack(), Progress::Impossible);
        assert_eq!(t.acks(), 1);
    }

    #[test]
    fn a_read_picks_the_newest_and_repairs_the_rest() {
        let mut m = ReadMerge::new();
        assert_eq!(m.winner(), None);
        m.add(NodeId(1), Some(rec(10, 1)));
        m.add(NodeId(2), None);
        m.add(NodeId(3), Some(rec(20, 3)));
        assert_eq!(m.winner(), Some(&rec(20, 3)));
        assert_eq!(m.stale(), vec![NodeId(1), NodeId(2)]);
        assert_eq!(m.holders(), 1);
        // A tombstone is a record like any other: newer wins, and it is repaired.
        let tomb = Record::tombstone(Version::new(Timestamp::new(30, 0), NodeId(2)));
        m.add(NodeId(4), Some(tomb.clone()));
        assert_eq!(m.winner(), Some(&tomb));
        assert_eq!(m.stale(), vec![NodeId(1), NodeId(2), NodeId(3)]);
        // Nobody holds anything: nothing to repair, every answer agrees.
        let mut empty = ReadMerge::new();
        empty.add(NodeId(1), None);
        empty.add(NodeId(2), None);
        assert!(empty.stale().is_empty());
        assert_eq!(empty.holders(), 2);
    }
}
