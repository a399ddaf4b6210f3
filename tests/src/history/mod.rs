//! The history checker: a recorded history of client operations against a cluster, and a pure
//! check of what `docs/CONSISTENCY.md` promises about it. [`driver`] produces histories by
//! running a seeded schedule of faults against an in-process cluster.
//!
//! # What is recorded
//!
//! Every operation of every client: which client, through which coordinator, on which key, the
//! value written (values are unique across the history, keys are written at most once), the
//! consistency it asked for, when it was invoked and when it completed (a global sequence
//! number that orders events exactly, and true, unskewed virtual time), the key's replicas as
//! the coordinator saw them when it was invoked, and the outcome: the version of an
//! acknowledged write, the value and version a read returned, or the typed error. Besides
//! operations: every record the nodes' storages held for the history's keys at the end (read
//! directly, not through a coordinator), the key's replicas in the final ring, every clock skew
//! the schedule set, and every ring that did not hold every member.
//!
//! # What is checked ([`check`])
//!
//! 1. **No lost acknowledged write** ([`ViolationKind::LostWrite`]): a read that succeeded at
//!    R and was invoked after a write of its key was acknowledged at W, with R + W > N,
//!    returns that write's value. Final reads, made once every fault is cleared and every
//!    node runs, must also succeed ([`ViolationKind::FinalReadFailed`]).
//! 2. **Only written values, with their own versions**: a read or a stored record never holds
//!    a value nobody attempted to write for that key ([`ViolationKind::NeverWritten`]) or one
//!    whose write began only after the read completed ([`ViolationKind::ReadFromFuture`]);
//!    and a value always comes with the version its write got: the acknowledged version, or
//!    for a write whose outcome is unknown one version stamped by its coordinator, the same
//!    everywhere ([`ViolationKind::VersionMismatch`]; a repair that restamps is caught here).
//! 3. **No acknowledged write on fewer than W replicas** ([`ViolationKind::UnderReplicated`]):
//!    at the end, an acknowledged write is stored with its version on at least W of the key's
//!    replicas in the final ring. Copies are only ever added (read repair, late applies) and
//!    never lost (keys are written once, storage outlives kills), so the count at the end is
//!    at least the count at the acknowledgement.
//! 4. **Bounded clock influence** ([`ViolationKind::AheadOfTime`]): an acknowledged write's
//!    version is no further ahead of true time at its completion than the drift bound plus
//!    the largest skew any node other than its coordinator had until then (plus
//!    [`CLOCK_SLACK_MS`]). Applies when some acknowledgement came from a replica other than
//!    the coordinator (W ≥ 2, or the coordinator is not a replica of the key): a replica
//!    accepts only versions within the drift bound of its own clock, and the coordinator's
//!    own replica does not check its own versions.
//!
//! A write that failed with an indeterminate error (`Timeout`, `Failed`) may or may not have
//! landed: it never fails check 1 or 3, but reads may return it and check 2 applies to it.
//! A write that failed with a determinate error (`Unavailable`, `ShuttingDown`) sent nothing,
//! so a read returning its value fails check 2.
//!
//! # Scope: the replica sets must not change
//!
//! These promises hold while each key's replica set stays the same. Hinted handoff does not
//! exist yet: when a member is declared dead the ring shrinks and its keys move to members
//! that do not have their data, so a later quorum read can miss an acknowledged write. The
//! driver therefore uses a membership configuration under which a member cut off or killed
//! during the faults is only ever *suspected* (suspects keep their place in the ring), never
//! declared dead, and a restarted node serves clients only once its ring holds every member.
//! The checker does not assume this: an operation whose coordinator saw other replicas than
//! the final ring's, and every ring that lacked a member, is reported
//! ([`ViolationKind::ReplicaSetChanged`], [`ViolationKind::RingChanged`]) rather than skipped.
//!
//! Ownership changes are checked by their own schedule
//! ([`driver::RunConfig::with_ownership_changes`]): two nodes join (pulling their ranges), one
//! leaves gracefully (streaming its records first) and, at W >= 2, one is wiped, among the
//! other faults. Replica sets change there on purpose, so the two scope checks are off
//! ([`History::ownership_changes`]) and checks 1 to 4 must hold across the changes. Deaths
//! stay out of scope in both.

pub mod driver;

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use chorus::{ReplicationError, Version};

/// Extra milliseconds allowed by check 4 for clock ticks and rounding.
pub const CLOCK_SLACK_MS: u64 = 10;

/// When an event happened: its place in the global order, and true (unskewed) virtual time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp {
    /// Global sequence number: every invocation and completion takes the next one.
    pub seq: u64,
    /// True time in milliseconds (the clocks' epoch plus virtual time elapsed).
    pub true_ms: u64,
}

/// What an operation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Wrote `value` at consistency `w` (a count of replicas).
    Put {
        /// The value (unique in the history).
        value: String,
        /// Replicas required (W).
        w: usize,
    },
    /// Read at consistency `r`.
    Get {
        /// Replicas required (R).
        r: usize,
    },
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The write was acknowledged with this version.
    Written(Version),
    /// The read returned this value and version, or nothing.
    Read(Option<(String, Version)>),
    /// The request failed.
    Failed(ReplicationError),
}

/// The part of the run an operation belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// While the schedule injects faults.
    Faults,
    /// After every fault was cleared, every node restarted and the rings settled.
    Final,
}

/// One operation on one key (an entry of a batch is an operation of its own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// Its index in [`History::ops`].
    pub id: usize,
    /// The client that issued it.
    pub client: usize,
    /// The coordinating node's id.
    pub node: u64,
    /// The key.
    pub key: String,
    /// What it did.
    pub action: Action,
    /// Entries of the batch it was part of (1: not a batch).
    pub batch: usize,
    /// The key's replicas as the coordinator saw them at invocation.
    pub replicas: Vec<u64>,
    /// When it was invoked.
    pub invoke: Stamp,
    /// When it completed.
    pub complete: Stamp,
    /// How it ended.
    pub outcome: Outcome,
    /// During the faults or in the final phase.
    pub phase: Phase,
}

impl Op {
    /// The value written, for writes.
    pub fn written_value(&self) -> Option<&str> {
        match &self.action {
            Action::Put { value, .. } => Some(value),
            Action::Get { .. } => None,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{:<5} [{:>6}..{:>6} seq {:>5}..{:>5}] client {} via node {} {:?} ",
            self.id,
            self.invoke.true_ms.saturating_sub(crate::cluster::EPOCH_MS),
            self.complete
                .true_ms
                .saturating_sub(crate::cluster::EPOCH_MS),
            self.invoke.seq,
            self.complete.seq,
            self.client,
            self.node,
            self.phase
        )?;
        match &self.action {
            Action::Put { value, w } => write!(f, "put {}={value} at W={w}", self.key)?,
            Action::Get { r } => write!(f, "get {} at R={r}", self.key)?,
        }
        if self.batch > 1 {
            write!(f, " (batch of {})", self.batch)?;
        }
        write!(f, " replicas {:?} -> ", self.replicas)?;
        match &self.outcome {
            Outcome::Written(v) => write!(f, "ok {}", show_version(v)),
            Outcome::Read(Some((value, v))) => write!(f, "{value} {}", show_version(v)),
            Outcome::Read(None) => write!(f, "none"),
            Outcome::Failed(e) => write!(f, "error: {e}"),
        }
    }
}

/// A version as `ms.logical@node`, the milliseconds counted from [`crate::cluster::EPOCH_MS`].
pub fn show_version(v: &Version) -> String {
    let ms = v.timestamp.physical_ms() as i128 - crate::cluster::EPOCH_MS as i128;
    format!("{ms}.{}@{}", v.timestamp.logical(), v.node.0)
}

/// A record found in a node's storage at the end of the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCopy {
    /// The node whose storage holds it.
    pub node: u64,
    /// The key.
    pub key: String,
    /// The value (`None`: a tombstone).
    pub value: Option<String>,
    /// Its version.
    pub version: Version,
    /// Read after the final reads (whose repairs add copies), not before them. Check 3
    /// counts only the copies read before.
    pub after_final_reads: bool,
}

/// A clock skew the schedule set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkewChange {
    /// When.
    pub at: Stamp,
    /// Whose clock.
    pub node: u64,
    /// The new skew in milliseconds (positive: ahead).
    pub skew_ms: i64,
}

/// A ring, seen on a node serving clients, that did not hold every member of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingAnomaly {
    /// When it was seen.
    pub at: Stamp,
    /// Whose ring.
    pub node: u64,
    /// The members it held.
    pub members: Vec<u64>,
}

/// A whole recorded run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// Replicas per key (N).
    pub n: usize,
    /// Every node's drift bound, in milliseconds.
    pub max_drift_ms: u64,
    /// Every operation, in invocation order.
    pub ops: Vec<Op>,
    /// The replicas of every key in the final ring.
    pub final_replicas: BTreeMap<String, Vec<u64>>,
    /// Every record the storages held for the history's keys at the end.
    pub stored: Vec<StoredCopy>,
    /// Every skew set, in order; clocks start without skew.
    pub skews: Vec<SkewChange>,
    /// Every ring without all members.
    pub ring_anomalies: Vec<RingAnomaly>,
    /// What the fault schedule did, in order (for reports).
    pub faults: Vec<(Stamp, String)>,
    /// Members joined, left or were wiped during the run: replica sets changed on purpose, so
    /// the scope checks ([`ViolationKind::ReplicaSetChanged`], [`ViolationKind::RingChanged`])
    /// are off and every other promise must hold across the changes.
    pub ownership_changes: bool,
    /// When a node's store was thrown away during the faults, if one was. A wipe destroys a
    /// copy, after which a read at R + W > N may miss a write until the wiped node has its
    /// data back: check 1 skips the reads of the fault phase invoked after it (the final
    /// phase's reads, and checks 2 to 4, still apply).
    pub wiped_at: Option<Stamp>,
}

/// The kind of a [`Violation`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ViolationKind {
    /// Check 1: an acknowledged write missing from a later read with R + W > N.
    LostWrite,
    /// Check 1: a final read failed although every fault was cleared.
    FinalReadFailed,
    /// Check 2: a value nobody attempted to write for the key, or whose write failed before
    /// anything was sent.
    NeverWritten,
    /// Check 2: a value whose write began after the read completed.
    ReadFromFuture,
    /// Check 2: a value with another version than its write got.
    VersionMismatch,
    /// Check 3: an acknowledged write on fewer than W replicas.
    UnderReplicated,
    /// Check 4: an acknowledged version too far ahead of true time.
    AheadOfTime,
    /// Scope: a coordinator saw other replicas for a key than the final ring has.
    ReplicaSetChanged,
    /// Scope: a ring lacked members.
    RingChanged,
}

/// A broken promise, with the operations involved (indices into [`History::ops`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// An acknowledged write that a later read at R (R + W > N) did not return.
    LostWrite {
        /// The write.
        write: usize,
        /// The read.
        read: usize,
    },
    /// A final read that failed.
    FinalReadFailed {
        /// The read.
        read: usize,
    },
    /// A value nobody attempted to write under this key, in a read or in storage.
    NeverWritten {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Where it was seen.
        seen: Seen,
    },
    /// A read returned a value whose write was invoked after the read completed.
    ReadFromFuture {
        /// The read.
        read: usize,
        /// The write.
        write: usize,
    },
    /// A value seen with another version than its write got.
    VersionMismatch {
        /// The write.
        write: usize,
        /// What it should have been: the acknowledged version, or (outcome unknown) the
        /// first version seen.
        expected: Option<Version>,
        /// The version seen.
        got: Version,
        /// Where.
        seen: Seen,
    },
    /// An acknowledged write stored on fewer than W of the key's final replicas.
    UnderReplicated {
        /// The write.
        write: usize,
        /// The replicas holding it with its version.
        holders: Vec<u64>,
        /// W.
        required: usize,
    },
    /// An acknowledged version further ahead of true time than the clocks allow.
    AheadOfTime {
        /// The write.
        write: usize,
        /// How far ahead of true time at completion, in milliseconds.
        ahead_ms: u64,
        /// How far ahead it may be.
        bound_ms: u64,
    },
    /// An operation's coordinator saw other replicas for the key than the final ring has.
    ReplicaSetChanged {
        /// The operation.
        op: usize,
        /// The final ring's replicas.
        final_replicas: Vec<u64>,
    },
    /// A ring without every member.
    RingChanged(RingAnomaly),
}

/// Where a value was seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// In the result of this read.
    Read(usize),
    /// In this node's storage at the end.
    Stored(u64),
}

impl fmt::Display for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Seen::Read(op) => write!(f, "read #{op}"),
            Seen::Stored(node) => write!(f, "storage of node {node}"),
        }
    }
}

impl Violation {
    /// Its kind.
    pub fn kind(&self) -> ViolationKind {
        match self {
            Violation::LostWrite { .. } => ViolationKind::LostWrite,
            Violation::FinalReadFailed { .. } => ViolationKind::FinalReadFailed,
            Violation::NeverWritten { .. } => ViolationKind::NeverWritten,
            Violation::ReadFromFuture { .. } => ViolationKind::ReadFromFuture,
            Violation::VersionMismatch { .. } => ViolationKind::VersionMismatch,
            Violation::UnderReplicated { .. } => ViolationKind::UnderReplicated,
            Violation::AheadOfTime { .. } => ViolationKind::AheadOfTime,
            Violation::ReplicaSetChanged { .. } => ViolationKind::ReplicaSetChanged,
            Violation::RingChanged(_) => ViolationKind::RingChanged,
        }
    }

    /// The operations it involves.
    pub fn ops(&self) -> Vec<usize> {
        match self {
            Violation::LostWrite { write, read } | Violation::ReadFromFuture { read, write } => {
                vec![*write, *read]
            }
            Violation::FinalReadFailed { read } => vec![*read],
            Violation::VersionMismatch { write, seen, .. } => match seen {
                Seen::Read(r) => vec![*write, *r],
                Seen::Stored(_) => vec![*write],
            },
            Violation::NeverWritten { seen, .. } => match seen {
                Seen::Read(r) => vec![*r],
                Seen::Stored(_) => vec![],
            },
            Violation::UnderReplicated { write, .. } | Violation::AheadOfTime { write, .. } => {
                vec![*write]
            }
            Violation::ReplicaSetChanged { op, .. } => vec![*op],
            Violation::RingChanged(_) => vec![],
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::LostWrite { write, read } => write!(
                f,
                "lost write: #{write} was acknowledged, read #{read} (R + W > N, invoked later) \
                 did not return it"
            ),
            Violation::FinalReadFailed { read } => {
                write!(f, "final read #{read} failed with every fault cleared")
            }
            Violation::NeverWritten { key, value, seen } => {
                write!(f, "{seen} holds {key}={value}, which nobody wrote")
            }
            Violation::ReadFromFuture { read, write } => {
                write!(
                    f,
                    "read #{read} returned the value of #{write}, invoked after it"
                )
            }
            Violation::VersionMismatch {
                write,
                expected,
                got,
                seen,
            } => write!(
                f,
                "{seen} has the value of #{write} with version {}, not {}",
                show_version(got),
                expected
                    .as_ref()
                    .map_or_else(|| "one its coordinator stamped".to_owned(), show_version)
            ),
            Violation::UnderReplicated {
                write,
                holders,
                required,
            } => write!(
                f,
                "#{write} was acknowledged at W={required} but is stored on {holders:?} only"
            ),
            Violation::AheadOfTime {
                write,
                ahead_ms,
                bound_ms,
            } => write!(
                f,
                "#{write} was acknowledged with a version {ahead_ms} ms ahead of true time \
                 (bound {bound_ms} ms)"
            ),
            Violation::ReplicaSetChanged { op, final_replicas } => write!(
                f,
                "#{op}'s coordinator saw other replicas than the final ring's {final_replicas:?} \
                 (outside the checked scope: no handoff yet)"
            ),
            Violation::RingChanged(a) => write!(
                f,
                "node {} had a ring of {:?} at {} ms (outside the checked scope)",
                a.node,
                a.members,
                a.at.true_ms.saturating_sub(crate::cluster::EPOCH_MS)
            ),
        }
    }
}

/// Checks `history` against the promises (see the [module documentation](self)); every
/// violation found, grouped by check.
pub fn check(history: &History) -> Vec<Violation> {
    let mut out = Vec::new();
    let writes = writes_by_value(history);
    lost_writes(history, &mut out);
    values_and_versions(history, &writes, &mut out);
    under_replicated(history, &mut out);
    ahead_of_time(history, &mut out);
    scope(history, &mut out);
    out
}

/// (key, value) to the write that wrote it.
fn writes_by_value(history: &History) -> HashMap<(&str, &str), &Op> {
    history
        .ops
        .iter()
        .filter_map(|op| Some(((op.key.as_str(), op.written_value()?), op)))
        .collect()
}

fn acked(op: &Op) -> Option<(&str, usize, Version)> {
    match (&op.action, &op.outcome) {
        (Action::Put { value, w }, Outcome::Written(v)) => Some((value, *w, *v)),
        _ => None,
    }
}

/// A write that failed before anything was sent (`Unavailable`, `Invalid`, `ShuttingDown`).
fn sent_nothing(write: &Op) -> bool {
    matches!(&write.outcome, Outcome::Failed(e) if !e.is_indeterminate())
}

fn lost_writes(history: &History, out: &mut Vec<Violation>) {
    let mut reads: HashMap<&str, Vec<&Op>> = HashMap::new();
    for op in &history.ops {
        if let Action::Get { .. } = op.action {
            if op.phase == Phase::Final && matches!(op.outcome, Outcome::Failed(_)) {
                out.push(Violation::FinalReadFailed { read: op.id });
            }
            reads.entry(&op.key).or_default().push(op);
        }
    }
    for write in &history.ops {
        let Some((value, w, _)) = acked(write) else {
            continue;
        };
        for read in reads.get(write.key.as_str()).into_iter().flatten() {
            let Action::Get { r } = read.action else {
                continue;
            };
            if r + w <= history.n || read.invoke.seq <= write.complete.seq {
                continue;
            }
            if read.phase == Phase::Faults
                && history.wiped_at.is_some_and(|at| read.invoke.seq >= at.seq)
            {
                continue;
            }
            match &read.outcome {
                Outcome::Read(Some((got, _))) if got == value => {}
                Outcome::Read(_) => out.push(Violation::LostWrite {
                    write: write.id,
                    read: read.id,
                }),
                Outcome::Failed(_) | Outcome::Written(_) => {}
            }
        }
    }
}

fn values_and_versions(
    history: &History,
    writes: &HashMap<(&str, &str), &Op>,
    out: &mut Vec<Violation>,
) {
    // Every sighting of each write's value, in order: reads first, then storage.
    let mut sightings: BTreeMap<usize, Vec<(Version, Seen)>> = BTreeMap::new();
    for read in &history.ops {
        let Outcome::Read(Some((value, version))) = &read.outcome else {
            continue;
        };
        match writes.get(&(read.key.as_str(), value.as_str())) {
            None => out.push(Violation::NeverWritten {
                key: read.key.clone(),
                value: value.clone(),
                seen: Seen::Read(read.id),
            }),
            Some(write) if sent_nothing(write) => out.push(Violation::NeverWritten {
                key: read.key.clone(),
                value: value.clone(),
                seen: Seen::Read(read.id),
            }),
            Some(write) => {
                if write.invoke.seq > read.complete.seq {
                    out.push(Violation::ReadFromFuture {
                        read: read.id,
                        write: write.id,
                    });
                }
                sightings
                    .entry(write.id)
                    .or_default()
                    .push((*version, Seen::Read(read.id)));
            }
        }
    }
    for copy in &history.stored {
        let Some(value) = &copy.value else {
            continue;
        };
        match writes.get(&(copy.key.as_str(), value.as_str())) {
            Some(write) if sent_nothing(write) => out.push(Violation::NeverWritten {
                key: copy.key.clone(),
                value: value.clone(),
                seen: Seen::Stored(copy.node),
            }),
            None => out.push(Violation::NeverWritten {
                key: copy.key.clone(),
                value: value.clone(),
                seen: Seen::Stored(copy.node),
            }),
            Some(write) => sightings
                .entry(write.id)
                .or_default()
                .push((copy.version, Seen::Stored(copy.node))),
        }
    }
    for (id, seen) in sightings {
        let write = &history.ops[id];
        let acked_version = acked(write).map(|(_, _, v)| v);
        let mut expected = acked_version;
        for (version, where_) in seen {
            let ok = match expected {
                Some(e) => version == e,
                None => version.node.0 == write.node,
            };
            if !ok {
                out.push(Violation::VersionMismatch {
                    write: id,
                    expected,
                    got: version,
                    seen: where_,
                });
                // One report per write is enough to see it.
                break;
            }
            expected.get_or_insert(version);
        }
    }
}

fn under_replicated(history: &History, out: &mut Vec<Violation>) {
    for write in &history.ops {
        let Some((value, w, version)) = acked(write) else {
            continue;
        };
        let Some(replicas) = history.final_replicas.get(&write.key) else {
            continue;
        };
        let mut holders: Vec<u64> = history
            .stored
            .iter()
            .filter(|c| {
                c.key == write.key
                    && c.value.as_deref() == Some(value)
                    && c.version == version
                    && !c.after_final_reads
                    && replicas.contains(&c.node)
            })
            .map(|c| c.node)
            .collect();
        holders.sort_unstable();
        holders.dedup();
        if holders.len() < w {
            out.push(Violation::UnderReplicated {
                write: write.id,
                holders,
                required: w,
            });
        }
    }
}

fn ahead_of_time(history: &History, out: &mut Vec<Violation>) {
    for write in &history.ops {
        let Some((_, w, version)) = acked(write) else {
            continue;
        };
        if w < 2 && write.replicas.contains(&write.node) {
            // The one acknowledgement may be the coordinator's own replica, which does not
            // check the versions it stamped itself.
            continue;
        }
        let others_max_skew = history
            .skews
            .iter()
            .filter(|s| s.node != write.node && s.at.seq <= write.complete.seq)
            .map(|s| s.skew_ms)
            .max()
            .unwrap_or(0)
            .max(0) as u64;
        let bound_ms = history.max_drift_ms + others_max_skew + CLOCK_SLACK_MS;
        let ahead_ms = version
            .timestamp
            .physical_ms()
            .saturating_sub(write.complete.true_ms);
        if ahead_ms > bound_ms {
            out.push(Violation::AheadOfTime {
                write: write.id,
                ahead_ms,
                bound_ms,
            });
        }
    }
}

fn scope(history: &History, out: &mut Vec<Violation>) {
    if history.ownership_changes {
        return;
    }
    for op in &history.ops {
        if let Some(replicas) = history.final_replicas.get(&op.key)
            && !op.replicas.is_empty()
            && &op.replicas != replicas
        {
            out.push(Violation::ReplicaSetChanged {
                op: op.id,
                final_replicas: replicas.clone(),
            });
        }
    }
    out.extend(
        history
            .ring_anomalies
            .iter()
            .cloned()
            .map(Violation::RingChanged),
    );
}

/// A readable account of `violations` in `history`: each violation (at most `limit`), then
/// every operation on the keys involved.
pub fn report(history: &History, violations: &[Violation], limit: usize) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let mut keys: Vec<&str> = Vec::new();
    for v in violations.iter().take(limit) {
        let _ = writeln!(s, "  {v}");
        for id in v.ops() {
            let key = history.ops[id].key.as_str();
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        if let Violation::NeverWritten { key, .. } = v
            && !keys.contains(&key.as_str())
        {
            keys.push(key);
        }
    }
    if violations.len() > limit {
        let _ = writeln!(s, "  ... and {} more", violations.len() - limit);
    }
    let _ = writeln!(s, "fault schedule:");
    for (at, fault) in &history.faults {
        let _ = writeln!(
            s,
            "    [{:>6} seq {:>5}] {fault}",
            at.true_ms.saturating_sub(crate::cluster::EPOCH_MS),
            at.seq
        );
    }
    for key in keys.into_iter().take(8) {
        let _ = writeln!(
            s,
            "history of {key} (final replicas {:?}):",
            history.final_replicas.get(key)
        );
        for op in history.ops.iter().filter(|op| op.key == key) {
            let _ = writeln!(s, "    {op}");
        }
        for c in history.stored.iter().filter(|c| c.key == key) {
            let _ = writeln!(
                s,
                "    stored on node {}: {:?} {}",
                c.node,
                c.value,
                show_version(&c.version)
            );
        }
    }
    s
}

#[cfg(test)]
mod tests;
