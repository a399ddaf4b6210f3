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

/// One write's acknowledgements when it must meet a quorum in each of several replica sets:
/// while a member joins, the key's replicas in the ring before it and in the ring with it
/// (as Garage requires a quorum in every live layout version), and for a while after, the
/// ring before the join finished. Each set needs `required` of its members, or all of them
/// if it has fewer (a ring that small serves no read at `required`, so nothing is promised
/// there beyond holding the write), and at least one set must have `required` members.
///
/// An answer counts in every set that holds its sender. [`SetsTracker::acks`],
/// [`SetsTracker::failures`] and the refusals count distinct senders.
#[derive(Clone, Debug)]
pub struct SetsTracker {
    sets: Vec<(Vec<NodeId>, AckTracker)>,
    acks: usize,
    failures: usize,
    refusals: Vec<(NodeId, Refusal)>,
}

/// What one member answered, for [`SetsTracker::answer`].
#[derive(Clone, Debug)]
pub enum Answer {
    /// It acknowledged.
    Ack,
    /// It refused, for this reason.
    Refused(Refusal),
    /// No usable answer (outcome unknown).
    Failed,
}

impl SetsTracker {
    /// A write to `sets` (the first is the ring reads use), needing `required` in each.
    pub fn new(required: usize, sets: Vec<Vec<NodeId>>) -> Self {
        let sets = sets
            .into_iter()
            .map(|set| {
                let need = required.min(set.len());
                let len = set.len();
                (set, AckTracker::new(need, len))
            })
            .collect();
        SetsTracker {
            sets,
            acks: 0,
            failures: 0,
            refusals: Vec::new(),
        }
    }

    /// Whether no set has `required` members: the write cannot be made as durable as asked
    /// (the members alive, for the error, are the largest set's).
    pub fn unavailable(&self, required: usize) -> Option<usize> {
        let largest = self.sets.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
        (largest < required || self.sets.iter().any(|(s, _)| s.is_empty())).then_some(largest)
    }

    /// The members to send the write to: every set's, each once, in order of first
    /// appearance.
    pub fn targets(&self) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = Vec::new();
        for (set, _) in &self.sets {
            for &n in set {
                if !out.contains(&n) {
                    out.push(n);
                }
            }
        }
        out
    }

    /// Records `node`'s answer; answers from members of no set are ignored.
    pub fn answer(&mut self, node: NodeId, answer: Answer) -> Progress {
        let mut counted = false;
        for (set, tracker) in &mut self.sets {
            if !set.contains(&node) {
                continue;
            }
            counted = true;
            match &answer {
                Answer::Ack => tracker.ack(),
                Answer::Refused(why) => tracker.refuse(node, why.clone()),
                Answer::Failed => tracker.fail(),
            };
        }
        if counted {
            match answer {
                Answer::Ack => self.acks += 1,
                Answer::Refused(why) => self.refusals.push((node, why)),
                Answer::Failed => self.failures += 1,
            }
        }
        self.progress()
    }

    /// Met once every set is; impossible once any set is.
    pub fn progress(&self) -> Progress {
        let mut all_met = true;
        for (_, t) in &self.sets {
            match t.progress() {
                Progress::Impossible => return Progress::Impossible,
                Progress::Pending => all_met = false,
                Progress::Met => {}
            }
        }
        if all_met {
            Progress::Met
        } else {
            Progress::Pending
        }
    }

    /// Distinct members that acknowledged.
    pub fn acks(&self) -> usize {
        self.acks
    }

    /// Distinct members that failed without a refusal.
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

    fn ids(v: &[u64]) -> Vec<NodeId> {
        v.iter().map(|&i| NodeId(i)).collect()
    }

    #[test]
    fn a_write_during_a_join_needs_a_quorum_in_both_rings() {
        // Old replicas 1,2,3; with joiner 4: 4,1,2. W = 2.
        let mut t = SetsTracker::new(2, vec![ids(&[1, 2, 3]), ids(&[4, 1, 2])]);
        assert_eq!(t.targets(), ids(&[1, 2, 3, 4]));
        assert_eq!(t.unavailable(2), None);
        // 4 and 3 acknowledge: a quorum in neither ring.
        assert_eq!(t.answer(NodeId(4), Answer::Ack), Progress::Pending);
        assert_eq!(t.answer(NodeId(3), Answer::Ack), Progress::Pending);
        // 1 makes two in each.
        assert_eq!(t.answer(NodeId(1), Answer::Ack), Progress::Met);
        assert_eq!(t.acks(), 3);

        // 1 and 2 are in both: two acknowledgements meet both quorums.
        let mut t = SetsTracker::new(2, vec![ids(&[1, 2, 3]), ids(&[4, 1, 2])]);
        assert_eq!(t.answer(NodeId(1), Answer::Ack), Progress::Pending);
        assert_eq!(t.answer(NodeId(2), Answer::Ack), Progress::Met);

        // 4 and 3 acknowledge, 1 and 2 fail: the old ring's quorum can no longer be met.
        let mut t = SetsTracker::new(2, vec![ids(&[1, 2, 3]), ids(&[4, 1, 2])]);
        t.answer(NodeId(4), Answer::Ack);
        t.answer(NodeId(3), Answer::Ack);
        assert_eq!(t.answer(NodeId(1), Answer::Failed), Progress::Pending);
        assert_eq!(t.answer(NodeId(2), Answer::Failed), Progress::Impossible);
        assert_eq!(t.failures(), 2);

        // A member of no set is not counted.
        let mut t = SetsTracker::new(1, vec![ids(&[1])]);
        assert_eq!(t.answer(NodeId(9), Answer::Ack), Progress::Pending);
        assert_eq!(t.acks(), 0);
    }

    #[test]
    fn a_ring_smaller_than_the_quorum_needs_all_its_members() {
        // One settled member, a second joining, W = 2: the old ring needs its one member.
        let mut t = SetsTracker::new(2, vec![ids(&[1]), ids(&[1, 2])]);
        assert_eq!(t.unavailable(2), None);
        assert_eq!(t.answer(NodeId(2), Answer::Ack), Progress::Pending);
        assert_eq!(t.answer(NodeId(1), Answer::Ack), Progress::Met);
        // No set as large as asked: unavailable, as without a join.
        let t = SetsTracker::new(3, vec![ids(&[1]), ids(&[1, 2])]);
        assert_eq!(t.unavailable(3), Some(2));
        // No settled member at all: unavailable.
        let t = SetsTracker::new(1, vec![ids(&[]), ids(&[2])]);
        assert_eq!(t.unavailable(1), Some(1));
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
