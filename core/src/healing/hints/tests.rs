use super::*;
use crate::hlc::{Timestamp, Version};

const T0: u64 = 1_767_225_600_000;
const A: NodeId = NodeId(2);
const B: NodeId = NodeId(3);
const C: NodeId = NodeId(4);

fn hint(target: NodeId, key: &str, created_ms: u64) -> Hint {
    Hint {
        target,
        created_ms,
        key: Bytes::copy_from_slice(key.as_bytes()),
        record: Record::value(
            format!("v-{key}"),
            Version::new(Timestamp::new(created_ms, 0), NodeId(1)),
        ),
    }
}

fn config() -> HintConfig {
    HintConfig {
        window: Duration::from_secs(60),
        max_hints_per_target: 3,
        max_bytes_per_target: 1 << 20,
        batch: 10,
        rate_per_sec: 1_000,
        max_concurrent: 2,
        backoff_min: Duration::from_secs(1),
        backoff_max: Duration::from_secs(4),
    }
}

fn ids(d: &Delivery) -> Vec<u64> {
    d.hints.iter().map(|(id, _, _)| *id).collect()
}

fn acked(d: &Delivery) -> Vec<(u64, HintOutcome)> {
    d.hints
        .iter()
        .map(|(id, _, _)| (*id, HintOutcome::Acked))
        .collect()
}

#[test]
fn a_hint_waits_for_its_target_to_be_alive_then_is_delivered_once_and_removed() {
    let mut book = HintBook::new(config(), T0);
    let id = book.add(hint(A, "k", T0), T0).expect("kept");
    assert_eq!(book.poll_delivery(T0), None, "target not known alive");
    // Only the expiry is pending.
    assert_eq!(book.poll_timeout(), Some(T0 + 60_000));
    book.set_alive(A, true, T0 + 5);
    assert_eq!(book.poll_timeout(), Some(T0 + 5));
    let d = book.poll_delivery(T0 + 5).expect("due");
    assert_eq!(d.target, A);
    assert_eq!(ids(&d), vec![id]);
    assert_eq!(
        d.hints[0].2,
        hint(A, "k", T0).record,
        "the original version"
    );
    assert_eq!(
        book.poll_delivery(T0 + 5),
        None,
        "one delivery in flight per target"
    );
    assert_eq!(book.delivered(A, &acked(&d), T0 + 6), vec![id]);
    assert!(book.is_empty());
    assert_eq!(book.pending(A), (0, 0));
    assert_eq!(book.poll_delivery(T0 + 6), None);
    assert_eq!(book.poll_timeout(), None);
    let c = book.counters();
    assert_eq!((c.stored, c.delivered), (1, 1));
}

#[test]
fn each_target_is_bounded_in_count_and_bytes_and_every_drop_is_counted() {
    let mut book = HintBook::new(config(), T0);
    for k in ["a", "b", "c"] {
        book.add(hint(A, k, T0), T0).expect("fits");
    }
    assert_eq!(book.add(hint(A, "d", T0), T0), Err(DropReason::TargetFull));
    // Another target has its own share.
    book.add(hint(B, "d", T0), T0).expect("B has room");
    let mut small = config();
    let one = hint(A, "a", T0).size();
    small.max_bytes_per_target = one * 2;
    small.max_hints_per_target = 100;
    let mut bytes = HintBook::new(small, T0);
    bytes.add(hint(A, "a", T0), T0).expect("fits");
    bytes.add(hint(A, "b", T0), T0).expect("fits");
    assert_eq!(bytes.add(hint(A, "c", T0), T0), Err(DropReason::TargetFull));
    assert_eq!(bytes.pending(A), (2, one * 2));
    assert_eq!(book.counters().dropped_full, 1);
    assert_eq!(bytes.counters().dropped_full, 1);
}

#[test]
fn hints_past_the_window_are_dropped_counted_and_returned_for_removal() {
    let mut book = HintBook::new(config(), T0);
    let old = book.add(hint(A, "old", T0), T0).expect("kept");
    let new = book
        .add(hint(A, "new", T0 + 30_000), T0 + 30_000)
        .expect("kept");
    assert_eq!(book.expire(T0 + 59_999), Vec::<u64>::new());
    assert_eq!(book.poll_timeout(), Some(T0 + 60_000));
    assert_eq!(book.expire(T0 + 60_000), vec![old]);
    assert_eq!(book.poll_timeout(), Some(T0 + 90_000));
    assert_eq!(book.pending(A).0, 1);
    assert_eq!(book.expire(T0 + 90_000), vec![new]);
    assert_eq!(book.counters().dropped_expired, 2);
    // A hint already past the window is not kept at all.
    assert_eq!(
        book.add(hint(A, "late", T0), T0 + 60_000),
        Err(DropReason::Expired)
    );
    assert_eq!(book.counters().dropped_expired, 3);
}

#[test]
fn failures_back_off_exponentially_up_to_the_cap_and_a_comeback_resets_it() {
    let mut book = HintBook::new(config(), T0);
    book.set_alive(A, true, T0);
    let id = book.add(hint(A, "k", T0), T0).expect("kept");
    let mut now = T0;
    for delay in [1_000, 2_000, 4_000, 4_000] {
        let d = book.poll_delivery(now).expect("due");
        book.failed(d.target, now);
        assert_eq!(book.poll_delivery(now + delay - 1), None, "backing off");
        assert_eq!(book.poll_timeout(), Some(now + delay));
        now += delay;
    }
    // A retry outcome backs off like a failure and keeps the hint.
    let d = book.poll_delivery(now).expect("due");
    assert_eq!(
        book.delivered(A, &[(id, HintOutcome::Retry)], now),
        Vec::<u64>::new()
    );
    assert_eq!(book.poll_timeout(), Some(now + 4_000));
    assert_eq!(ids(&d), vec![id]);
    // Dead, then alive again: tried at once.
    book.set_alive(A, false, now + 10);
    assert_eq!(book.poll_timeout(), Some(T0 + 60_000), "only the expiry");
    book.set_alive(A, true, now + 20);
    let d = book.poll_delivery(now + 20).expect("due at once");
    book.failed(A, now + 20);
    assert_eq!(
        book.poll_timeout(),
        Some(now + 20 + 1_000),
        "the backoff starts over"
    );
    assert_eq!(ids(&d), vec![id]);
    assert_eq!(book.counters().failed_deliveries, 6);
}

#[test]
fn rejected_hints_are_dropped_and_counted_and_the_rest_continue() {
    let mut book = HintBook::new(config(), T0);
    book.set_alive(A, true, T0);
    let a = book.add(hint(A, "a", T0), T0).expect("kept");
    let b = book.add(hint(A, "b", T0), T0).expect("kept");
    let d = book.poll_delivery(T0).expect("due");
    assert_eq!(ids(&d), vec![a, b]);
    let done = book.delivered(
        A,
        &[(a, HintOutcome::Rejected), (b, HintOutcome::Acked)],
        T0,
    );
    assert_eq!(done, vec![a, b]);
    let c = book.counters();
    assert_eq!((c.delivered, c.dropped_rejected), (1, 1));
}

#[test]
fn the_delivery_rate_and_batch_are_bounded() {
    let mut cfg = config();
    cfg.batch = 5;
    cfg.rate_per_sec = 10;
    cfg.max_hints_per_target = 100;
    let mut book = HintBook::new(cfg, T0);
    book.set_alive(A, true, T0);
    for i in 0..12 {
        book.add(hint(A, &format!("k{i}"), T0), T0).expect("kept");
    }
    let d = book.poll_delivery(T0).expect("due");
    assert_eq!(d.hints.len(), 5, "one batch");
    book.delivered(A, &acked(&d), T0);
    assert_eq!(book.poll_delivery(T0), None, "the bucket is empty");
    assert_eq!(book.poll_timeout(), Some(T0 + 100), "one token in 100 ms");
    let d = book.poll_delivery(T0 + 100).expect("a token");
    assert_eq!(d.hints.len(), 1);
    book.delivered(A, &acked(&d), T0 + 100);
    // Over one second, at most 10 more (plus what the bucket held).
    let mut sent = 0;
    let mut now = T0 + 100;
    while now <= T0 + 1_100 {
        if let Some(d) = book.poll_delivery(now) {
            sent += d.hints.len();
            book.delivered(A, &acked(&d), now);
        }
        now += 10;
    }
    assert_eq!(sent, 6, "the rest, at the rate");
    assert!(book.is_empty());
}

#[test]
fn at_most_max_concurrent_deliveries_are_in_flight() {
    let mut book = HintBook::new(config(), T0);
    for t in [A, B, C] {
        book.set_alive(t, true, T0);
        book.add(hint(t, "k", T0), T0).expect("kept");
    }
    let first = book.poll_delivery(T0).expect("one");
    let second = book.poll_delivery(T0).expect("two");
    assert_eq!(book.poll_delivery(T0), None, "two in flight");
    assert_eq!(
        book.poll_timeout(),
        Some(T0 + 60_000),
        "waits for an answer"
    );
    book.delivered(first.target, &acked(&first), T0 + 1);
    let third = book.poll_delivery(T0 + 1).expect("three");
    let mut targets = vec![first.target, second.target, third.target];
    targets.sort();
    assert_eq!(targets, vec![A, B, C]);
}

#[test]
fn hints_restore_from_storage_with_bounds_window_and_fresh_ids() {
    let stored = vec![
        (4, hint(A, "a", T0).encode().expect("encodes")),
        (9, hint(B, "b", T0 - 61_000).encode().expect("encodes")),
        (12, Bytes::from_static(b"\x01not a hint")),
        (15, hint(A, "c", T0).encode().expect("encodes")),
    ];
    let mut book = HintBook::new(config(), T0);
    let removed = book.restore(stored, T0);
    assert_eq!(removed, vec![9, 12], "expired and undecodable");
    assert_eq!(book.len(), 2);
    let c = book.counters();
    assert_eq!((c.dropped_expired, c.dropped_undecodable), (1, 1));
    let next = book.add(hint(A, "d", T0), T0).expect("kept");
    assert_eq!(next, 16, "ids continue above the restored ones");
    book.set_alive(A, true, T0);
    let d = book.poll_delivery(T0).expect("due");
    assert_eq!(ids(&d), vec![4, 15, 16], "oldest first");
}

#[test]
fn decoding_never_panics_on_damaged_blobs() {
    let blob = hint(A, "key", T0).encode().expect("encodes");
    assert_eq!(Hint::decode(&blob).expect("round trip"), hint(A, "key", T0));
    for cut in 0..blob.len() {
        assert!(Hint::decode(&blob[..cut]).is_err(), "cut at {cut}");
    }
    let mut longer = blob.to_vec();
    longer.push(0);
    assert!(matches!(
        Hint::decode(&longer),
        Err(HintDecodeError::Trailing(1))
    ));
    for at in 0..blob.len() {
        let mut bad = blob.to_vec();
        bad[at] ^= 0xff;
        let _ = Hint::decode(&bad);
    }
    // A length prefix claiming far more than is present.
    assert!(Hint::decode(&[2, 0xfc, 0xff, 0xff, 0xff, 0xff]).is_err());
}

#[test]
fn a_departed_target_s_hints_are_taken_whole() {
    let mut book = HintBook::new(config(), T0);
    book.set_alive(A, true, T0);
    book.add(hint(A, "a", T0), T0).expect("kept");
    book.add(hint(A, "b", T0), T0).expect("kept");
    book.add(hint(B, "c", T0), T0).expect("kept");
    let d = book.poll_delivery(T0).expect("due");
    let taken = book.take_target(A);
    assert_eq!(taken.len(), 2);
    assert_eq!(book.len(), 1);
    // The in-flight answer for it is ignored, and its slot is free again.
    assert_eq!(book.delivered(A, &acked(&d), T0), Vec::<u64>::new());
    book.set_alive(B, true, T0);
    assert!(book.poll_delivery(T0).is_some());
    assert_eq!(book.poll_timeout(), Some(T0 + 60_000));
}
