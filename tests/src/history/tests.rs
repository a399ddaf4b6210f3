//! Each check fires on a tiny bad history and stays quiet on the good one next to it.

use chorus::replication::Operation;
use chorus::{NodeId, Timestamp};

use super::*;
use crate::cluster::EPOCH_MS;

fn version(ms: u64, node: u64) -> Version {
    Version::new(Timestamp::new(EPOCH_MS + ms, 0), NodeId(node))
}

/// A history over one key `k` with replicas 1, 2, 3, N = 3, built op by op; each op takes the
/// next two sequence numbers and true time equal to them.
struct Builder {
    h: History,
    seq: u64,
}

impl Builder {
    fn new() -> Self {
        let mut h = History {
            n: 3,
            max_drift_ms: 500,
            ..History::default()
        };
        h.final_replicas.insert("k".into(), vec![1, 2, 3]);
        Builder { h, seq: 0 }
    }

    fn op(&mut self, node: u64, action: Action, outcome: Outcome, phase: Phase) -> usize {
        let id = self.h.ops.len();
        let invoke = Stamp {
            seq: self.seq,
            true_ms: EPOCH_MS + self.seq,
        };
        let complete = Stamp {
            seq: self.seq + 1,
            true_ms: EPOCH_MS + self.seq + 1,
        };
        self.seq += 2;
        self.h.ops.push(Op {
            id,
            client: 0,
            node,
            key: "k".into(),
            action,
            batch: 1,
            replicas: vec![1, 2, 3],
            invoke,
            complete,
            outcome,
            phase,
        });
        id
    }

    fn put(&mut self, node: u64, value: &str, w: usize, outcome: Outcome) -> usize {
        self.op(
            node,
            Action::Put {
                value: value.into(),
                w,
            },
            outcome,
            Phase::Faults,
        )
    }

    fn get(&mut self, node: u64, r: usize, got: Option<(&str, Version)>) -> usize {
        self.op(
            node,
            Action::Get { r },
            Outcome::Read(got.map(|(v, ver)| (v.to_owned(), ver))),
            Phase::Faults,
        )
    }

    fn store(&mut self, node: u64, value: &str, version: Version) {
        self.h.stored.push(StoredCopy {
            node,
            key: "k".into(),
            value: Some(value.into()),
            version,
            after_final_reads: false,
        });
    }

    fn kinds(&self) -> Vec<ViolationKind> {
        check(&self.h).iter().map(Violation::kind).collect()
    }
}

fn timeout() -> Outcome {
    Outcome::Failed(ReplicationError::Timeout {
        op: Operation::Write,
        acks: 1,
        required: 2,
        after: std::time::Duration::from_secs(1),
    })
}

/// A write acknowledged at W = 2 with version `v` (at 0 ms, by node 1), stored on 1 and 2.
fn acked_write(b: &mut Builder) -> Version {
    let v = version(0, 1);
    b.put(1, "a", 2, Outcome::Written(v));
    b.store(1, "a", v);
    b.store(2, "a", v);
    v
}

#[test]
fn a_good_history_has_no_violations() {
    let mut b = Builder::new();
    let v = acked_write(&mut b);
    b.get(2, 2, Some(("a", v)));
    b.get(3, 2, Some(("a", v)));
    assert_eq!(b.kinds(), vec![]);
}

#[test]
fn a_later_quorum_read_that_misses_an_acknowledged_write_is_a_lost_write() {
    let mut b = Builder::new();
    acked_write(&mut b);
    b.get(3, 2, None);
    assert_eq!(b.kinds(), vec![ViolationKind::LostWrite]);
}

#[test]
fn reads_that_need_not_see_the_write_are_not_lost_writes() {
    // R + W <= N: a read at One may miss a write at Two.
    let mut b = Builder::new();
    acked_write(&mut b);
    b.get(3, 1, None);
    assert_eq!(b.kinds(), vec![]);
    // A read concurrent with the write (invoked before the acknowledgement) may miss it.
    let mut b = Builder::new();
    b.get(3, 2, None);
    let v = acked_write(&mut b);
    b.get(2, 2, Some(("a", v)));
    assert_eq!(b.kinds(), vec![]);
    // An indeterminate write may be missed.
    let mut b = Builder::new();
    b.put(1, "a", 2, timeout());
    b.get(3, 3, None);
    assert_eq!(b.kinds(), vec![]);
}

#[test]
fn a_failed_final_read_is_reported() {
    let mut b = Builder::new();
    let v = acked_write(&mut b);
    b.op(
        2,
        Action::Get { r: 2 },
        Outcome::Failed(ReplicationError::Timeout {
            op: Operation::Read,
            acks: 1,
            required: 2,
            after: std::time::Duration::from_secs(1),
        }),
        Phase::Final,
    );
    b.op(
        2,
        Action::Get { r: 2 },
        Outcome::Read(Some(("a".into(), v))),
        Phase::Final,
    );
    assert_eq!(b.kinds(), vec![ViolationKind::FinalReadFailed]);
}

#[test]
fn a_value_nobody_wrote_is_caught_in_reads_and_in_storage() {
    let mut b = Builder::new();
    acked_write(&mut b);
    b.get(2, 2, Some(("b", version(1, 2))));
    assert_eq!(
        b.kinds(),
        vec![ViolationKind::LostWrite, ViolationKind::NeverWritten]
    );
    let mut b = Builder::new();
    acked_write(&mut b);
    b.store(3, "b", version(1, 2));
    assert_eq!(b.kinds(), vec![ViolationKind::NeverWritten]);
    // A write that failed before sending anything must not be seen either.
    let mut b = Builder::new();
    b.put(
        1,
        "a",
        2,
        Outcome::Failed(ReplicationError::Unavailable {
            required: 2,
            alive: 1,
        }),
    );
    b.get(2, 1, Some(("a", version(0, 1))));
    assert_eq!(b.kinds(), vec![ViolationKind::NeverWritten]);
}

#[test]
fn a_read_of_a_write_invoked_after_it_completed_is_from_the_future() {
    let mut b = Builder::new();
    let r = b.get(2, 1, Some(("a", version(5, 1))));
    b.put(1, "a", 1, Outcome::Written(version(5, 1)));
    b.store(1, "a", version(5, 1));
    assert_eq!(r, 0);
    assert_eq!(b.kinds(), vec![ViolationKind::ReadFromFuture]);
}

#[test]
fn a_value_with_another_version_than_its_write_got_is_a_mismatch() {
    // Acknowledged: read with a restamped version.
    let mut b = Builder::new();
    acked_write(&mut b);
    b.get(2, 2, Some(("a", version(40, 2))));
    assert_eq!(b.kinds(), vec![ViolationKind::VersionMismatch]);
    // Acknowledged: stored with a restamped version.
    let mut b = Builder::new();
    acked_write(&mut b);
    b.store(3, "a", version(40, 3));
    assert_eq!(b.kinds(), vec![ViolationKind::VersionMismatch]);
    // Outcome unknown: two versions of one value.
    let mut b = Builder::new();
    b.put(1, "a", 2, timeout());
    b.store(1, "a", version(0, 1));
    b.store(2, "a", version(7, 1));
    assert_eq!(b.kinds(), vec![ViolationKind::VersionMismatch]);
    // Outcome unknown: a version another node stamped.
    let mut b = Builder::new();
    b.put(1, "a", 2, timeout());
    b.get(2, 2, Some(("a", version(0, 2))));
    assert_eq!(b.kinds(), vec![ViolationKind::VersionMismatch]);
    // Outcome unknown, one version by its coordinator everywhere: fine.
    let mut b = Builder::new();
    b.put(1, "a", 2, timeout());
    b.store(1, "a", version(0, 1));
    b.get(2, 2, Some(("a", version(0, 1))));
    assert_eq!(b.kinds(), vec![]);
}

#[test]
fn an_acknowledged_write_on_fewer_than_w_final_replicas_is_under_replicated() {
    let mut b = Builder::new();
    let v = version(0, 1);
    b.put(1, "a", 2, Outcome::Written(v));
    b.store(1, "a", v);
    // A copy outside the key's replicas (a stand-in) does not count.
    b.store(4, "a", v);
    assert_eq!(b.kinds(), vec![ViolationKind::UnderReplicated]);
    // At W = 1 one copy is enough.
    let mut b = Builder::new();
    b.put(1, "a", 1, Outcome::Written(v));
    b.store(1, "a", v);
    assert_eq!(b.kinds(), vec![]);
    // Copies added by the final reads' repairs do not count.
    let mut b = Builder::new();
    b.put(1, "a", 2, Outcome::Written(v));
    b.store(1, "a", v);
    b.store(2, "a", v);
    b.h.stored[1].after_final_reads = true;
    assert_eq!(b.kinds(), vec![ViolationKind::UnderReplicated]);
    // An indeterminate write may be anywhere.
    let mut b = Builder::new();
    b.put(1, "a", 2, timeout());
    b.store(1, "a", v);
    assert_eq!(b.kinds(), vec![]);
}

#[test]
fn an_acknowledged_version_far_ahead_of_true_time_is_caught() {
    let far = version(3_000, 1);
    let mut b = Builder::new();
    b.put(1, "a", 2, Outcome::Written(far));
    b.store(1, "a", far);
    b.store(2, "a", far);
    b.h.skews.push(SkewChange {
        at: Stamp::default(),
        node: 1,
        skew_ms: 3_000,
    });
    assert_eq!(b.kinds(), vec![ViolationKind::AheadOfTime]);
    // Within the drift bound plus another node's skew: fine.
    b.h.skews.push(SkewChange {
        at: Stamp::default(),
        node: 2,
        skew_ms: 2_600,
    });
    assert_eq!(b.kinds(), vec![]);
    // A skew set after the write completed does not excuse it.
    b.h.skews[1].at.seq = 100;
    assert_eq!(b.kinds(), vec![ViolationKind::AheadOfTime]);
    // At W = 1 with the coordinator a replica, its own replica was the one to acknowledge.
    let mut b = Builder::new();
    b.put(1, "a", 1, Outcome::Written(far));
    b.store(1, "a", far);
    assert_eq!(b.kinds(), vec![]);
    // But not when the coordinator is not one of the key's replicas.
    b.h.ops[0].node = 4;
    b.h.ops[0].outcome = Outcome::Written(version(3_000, 4));
    b.h.stored[0].version = version(3_000, 4);
    assert_eq!(b.kinds(), vec![ViolationKind::AheadOfTime]);
}

#[test]
fn changed_replica_sets_and_rings_are_reported_not_skipped() {
    let mut b = Builder::new();
    let v = acked_write(&mut b);
    let r = b.get(2, 2, Some(("a", v)));
    b.h.ops[r].replicas = vec![1, 2, 4];
    assert_eq!(b.kinds(), vec![ViolationKind::ReplicaSetChanged]);
    let mut b = Builder::new();
    acked_write(&mut b);
    b.h.ring_anomalies.push(RingAnomaly {
        at: Stamp::default(),
        node: 2,
        members: vec![1, 2, 3, 4],
    });
    assert_eq!(b.kinds(), vec![ViolationKind::RingChanged]);
}

#[test]
fn the_report_shows_the_violation_and_the_history_of_its_key() {
    let mut b = Builder::new();
    acked_write(&mut b);
    b.get(3, 2, None);
    let violations = check(&b.h);
    let text = report(&b.h, &violations, 10);
    assert!(text.contains("lost write: #0"), "{text}");
    assert!(text.contains("put k=a at W=2"), "{text}");
    assert!(text.contains("get k at R=2"), "{text}");
    assert!(text.contains("stored on node 2"), "{text}");
}
