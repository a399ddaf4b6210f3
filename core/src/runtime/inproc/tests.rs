//! Tests of the in-process network: delivery, faults, determinism, binding and closing.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{Instant, timeout};

use super::*;
use crate::transport::{SharedTransport, Transport};

fn addr(s: &str) -> Address {
    Address::new(s)
}

fn frame(i: u32) -> Bytes {
    Bytes::copy_from_slice(&i.to_be_bytes())
}

fn frame_id(frame: &Bytes) -> u32 {
    let bytes: [u8; 4] = frame[..].try_into().expect("4-byte test frame");
    u32::from_be_bytes(bytes)
}

fn big_queue() -> InProcessConfig {
    InProcessConfig::default().with_queue_capacity(NonZeroUsize::new(20_000).expect("non-zero"))
}

/// Receives everything already queued, without waiting for delayed frames.
async fn drain(t: &InProcessTransport) -> Vec<Incoming> {
    let mut out = Vec::new();
    while let Ok(Ok(incoming)) = timeout(Duration::ZERO, t.recv()).await {
        out.push(incoming);
    }
    out
}

/// Whether nothing arrives at `t` within a (virtual) second.
async fn nothing_arrives(t: &InProcessTransport) -> bool {
    timeout(Duration::from_secs(1), t.recv()).await.is_err()
}

#[tokio::test]
async fn delivers_with_sender_address() {
    let net = InProcessNetwork::new(1);
    let a = net.bind("a").expect("bind a");
    let b = net.bind("b").expect("bind b");
    a.send(&addr("b"), Bytes::from_static(b"ping"))
        .await
        .expect("send");
    let got = b.recv().await.expect("recv");
    assert_eq!(got.from, addr("a"));
    assert_eq!(got.frame, Bytes::from_static(b"ping"));
    b.send(&addr("a"), Bytes::from_static(b"pong"))
        .await
        .expect("send");
    assert_eq!(a.recv().await.expect("recv").from, addr("b"));
    // Loopback works too.
    a.send(&addr("a"), frame(7)).await.expect("send to self");
    assert_eq!(frame_id(&a.recv().await.expect("recv").frame), 7);
    let stats = net.stats();
    assert_eq!((stats.sent, stats.delivered, stats.dropped()), (3, 3, 0));
    assert_eq!(a.local_addr(), addr("a"));
}

#[tokio::test]
async fn works_through_shared_transport() {
    let net = InProcessNetwork::new(1);
    let a = SharedTransport::new(net.bind("a").expect("bind"));
    let b = SharedTransport::new(net.bind("b").expect("bind"));
    a.send(&addr("b"), frame(1)).await.expect("send");
    assert_eq!(b.recv().await.expect("recv").from, addr("a"));
    assert_eq!(a.max_frame_len(), DEFAULT_MAX_FRAME_LEN);
    // Futures are Send: a receive can run on another task.
    let b2 = b.clone();
    let task = tokio::spawn(async move { b2.recv().await });
    a.send(&addr("b"), frame(2)).await.expect("send");
    let got = task.await.expect("join").expect("recv");
    assert_eq!(frame_id(&got.frame), 2);
}

#[tokio::test]
async fn unreachable_address() {
    let net = InProcessNetwork::new(1);
    let a = net.bind("a").expect("bind");
    let err = a.send(&addr("nobody"), frame(1)).await.unwrap_err();
    assert!(
        matches!(&err, TransportError::Unreachable { addr: to, .. } if *to == addr("nobody")),
        "{err:?}"
    );
    assert_eq!(net.stats(), NetworkStats::default());
}

#[tokio::test]
async fn address_in_use_and_rebind_after_drop_or_close() {
    let net = InProcessNetwork::new(1);
    let a = net.bind("a").expect("bind");
    assert!(matches!(net.bind("a"), Err(TransportError::AddressInUse(x)) if x == addr("a")));
    assert!(net.is_bound(&addr("a")));
    drop(a);
    assert!(!net.is_bound(&addr("a")));
    let a = net.bind("a").expect("re-bind after drop");
    a.close().await;
    let a2 = net.bind("a").expect("re-bind after close");
    // The stale, closed transport going away must not unbind its successor.
    drop(a);
    assert!(net.is_bound(&addr("a")));
    let c = net.bind("c").expect("bind");
    c.send(&addr("a"), frame(5)).await.expect("send");
    assert_eq!(frame_id(&a2.recv().await.expect("recv").frame), 5);
}

#[tokio::test]
async fn oversized_frame_refused() {
    let net = InProcessNetwork::with_config(1, InProcessConfig::default().with_max_frame_len(8));
    let a = net.bind("a").expect("bind");
    let b = net.bind("b").expect("bind");
    assert_eq!(a.max_frame_len(), 8);
    let err = a
        .send(&addr("b"), Bytes::from(vec![0u8; 9]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::FrameTooLarge { len: 9, max: 8 }),
        "{err:?}"
    );
    a.send(&addr("b"), Bytes::from(vec![0u8; 8]))
        .await
        .expect("exactly the maximum");
    assert_eq!(b.recv().await.expect("recv").frame.len(), 8);
    assert_eq!(net.stats().sent, 1);
    // A configured maximum above the ceiling is capped.
    let net =
        InProcessNetwork::with_config(1, InProcessConfig::default().with_max_frame_len(usize::MAX));
    assert_eq!(
        net.bind("x").expect("bind").max_frame_len(),
        MAX_FRAME_LEN_CEILING
    );
}

#[tokio::test]
async fn drop_probability_one_drops_everything() {
    let net = InProcessNetwork::new(3);
    let a = net.bind("a").expect("bind");
    let b = net.bind("b").expect("bind");
    net.set_drop_probability(1.0).expect("valid");
    for i in 0..1000 {
        a.send(&addr("b"), frame(i))
            .await
            .expect("lost frames still send Ok");
    }
    assert!(drain(&b).await.is_empty());
    let stats = net.stats();
    assert_eq!(
        (stats.sent, stats.dropped_loss, stats.delivered),
        (1000, 1000, 0)
    );
}

/// Sends frames 0..n from a to b with drop probability `p` and returns which arrived.
async fn surviving_frames(seed: u64, p: f64, n: u32) -> Vec<u32> {
    let net = InProcessNetwork::with_config(seed, big_queue());
    let a = net.bind("a").expect("bind");
    let b = net.bind("b").expect("bind");
    net.set_drop_probability(p).expect("valid");
    for i in 0..n {
        a.send(&addr("b"), frame(i)).await.expect("send");
    }
    let stats = net.stats();
    assert_eq!(stats.sent, u64::from(n));
    assert_eq!(stats.delivered + stats.dropped_loss, u64::from(n));
    let got: Vec<u32> = drain(&b).await.iter().map(|m| frame_id(&m.frame)).collect();
    assert_eq!(got.len() as u64, stats.delivered);
    got
}

#[tokio::test]
async fn drop_probability_is_roughly_honoured() {
    let n = 10_000;
    let got = surviving_frames(7, 0.3, n).await;
    let dropped = n as usize - got.len();
    // Binomial(10_000, 0.3): mean 3000, standard deviation about 46.
    assert!((2700..=3300).contains(&dropped), "dropped {dropped} of {n}");
}

#[tokio::test]
async fn same_seed_same_decisions_different_seed_differs() {
    let first = surviving_frames(11, 0.3, 2000).await;
    let again = surviving_frames(11, 0.3, 2000).await;
    let other = surviving_frames(12, 0.3, 2000).await;
    assert_eq!(first, again);
    assert_ne!(first, other);
}

#[tokio::test(start_paused = true)]
async fn same_seed_same_delays() {
    async fn arrival_times(seed: u64) -> Vec<(u32, Duration)> {
        let net = InProcessNetwork::new(seed);
        let a = net.bind("a").expect("bind");
        let b = net.bind("b").expect("bind");
        net.set_delay(Duration::from_millis(1), Duration::from_millis(500))
            .expect("valid");
        let start = Instant::now();
        for i in 0..50 {
            a.send(&addr("b"), frame(i)).await.expect("send");
        }
        let mut out = Vec::new();
        for _ in 0..50 {
            let m = b.recv().await.expect("recv");
            out.push((frame_id(&m.frame), start.elapsed()));
        }
        out
    }
    // Random delays reorder frames.
    let first = arrival_times(5).await;
    assert!(first.windows(2).any(|w| w[0].0 > w[1].0));
    // Frames due in the same timer tick may arrive in either order, so compare as sets.
    let sorted = |mut v: Vec<(u32, Duration)>| {
        v.sort();
        v
    };
    let first = sorted(first);
    assert_eq!(first, sorted(arrival_times(5).await));
    assert_ne!(first, sorted(arrival_times(6).await));
}

#[tokio::test(start_paused = true)]
async fn delay_holds_delivery_until_virtual_time_passes() {
    let net = InProcessNetwork::new(1);
    let a = net.bind("a").expect("bind");
    let b = net.bind("b").expect("bind");
    net.set_delay(Duration::from_millis(100), Duration::from_millis(100))
        .expect("valid");
    let start = Instant::now();
    a.send(&addr("b"), frame(1)).await.expect("send");
    assert_eq!(net.stats().in_flight(), 1);
    assert!(timeout(Duration::from_millis(99), b.recv()).await.is_err());
    assert_eq!(net.stats().delivered, 0);
    let got = b.recv().await.expect("recv");
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    assert_eq!(got.from, addr("a"));
    let stats = net.stats();
    assert_eq!((stats.delivered, stats.in_flight()), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn random_delays_stay_in_range_and_links_override() {
    let net = InProcessNetwork::new(9);
    let a = net.bind("a").expect("bind");
    let b = net.bind("b").expect("bind");
    let c = net.bind("c").expect("bind");
    let (min, max) = (Duration::from_millis(10), Duration::from_millis(50));
    net.set_delay(min, max).expect("valid");
    net.set_link_delay(
        &addr("a"),
        &addr("c"),
        Duration::from_secs(5),
        Duration::from_secs(5),
    )
    .expect("valid");
    let start = Instant::now();
    for i in 0..100 {
        a.send(&addr("b"), frame(i)).await.expect("send");
    }
    a.send(&addr("c"), frame(0)).await.expect("send");
    for _ in 0..100 {
        b.recv().await.expect("recv");
        let t = start.elapsed();
        assert!(t >= min && t <= max, "arrived after {t:?}");
    }
    c.recv().await.expect("recv");
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    // Clearing the link setting brings back the global delay.
    net.clear_link_faults(&addr("a"), &addr("c"));
    let start = Instant::now();
    a.send(&addr("c"), frame(1)).await.expect("send");
    c.recv().await.expect("recv");
    assert!(start.elapsed() <= max);
}

#[tokio::test(start_paused = true)]
async fn two_way_partition_and_heal() {
    let net = InProcessNetwork::new(1);
    let a = net.bind("a").expect("bind");
    let b = net.bind("b").expect("bind");
    let c = net.bind("c").expect("bind");
    net.partition(&[addr("a")], &[addr("b"), addr("c")]);
    a.send(&addr("b"), frame(1))
        .await
        .expect("partitioned send is Ok");
    a.send(&addr("c"), frame(2)).await.expect("send");
    b.send(&addr("a"), frame(3)).await.expect("send");
    c.send(&addr("a"), frame(4)).await.expect("send");
    b.send(&addr("c"), frame(5)).await.expect("send");
    assert!(nothing_arrives(&a).await);
    assert!(nothing_arrives(&b).await);
    assert_eq!(frame_id(&c.recv().await.expect("b -> c flows").frame), 5);
    assert_eq!(net.stats().dropped_partition, 4);
    assert!(net.is_blocked(&addr("c"), &addr("a")));
    net.heal();
    assert!(!net.is_blocked(&addr("c"), &addr("a")));
    a.send(&addr("b"), frame(6)).await.expect("send");
    b.send(&addr("a"), frame(7)).await.expect("send");
    assert_eq!(frame_id(&b.recv().await.expect("recv").frame), 6);
    assert_eq!(frame_id(&a.recv().await.expect("recv").frame), 7);
}

#[tokio::test(start_paused = true)]
async fn one_way_block() {
    let net = InProcessNetwork::new(1);
    let a = net.bind("a").expect("bind");
    let b = net.bind("b").expect("bind");
    net.block(&addr("a"), &addr("b"));
    a.send(&addr("b"), frame(1)).await.expect("send");
    b.send(&addr("a"), frame(2)).await.expect("send");
    assert!(nothing_arrives(&b).await);
    assert_eq!(frame_id(&a.recv().await.expect("b -> a flows").frame), 2);
    net.unblock(&addr("a"), &addr("b"));
    a.send(&addr("b"), frame(3)).await.expect("send");
    assert_eq!(frame_id(&b.recv().await.expect("recv").frame), 3);
    assert_eq!(net.stats().dropped_partition, 1);
}

#[tokio::test]
async fn link_drop_probability_overrides_global() {
    let net = InProcessNetwork::new(1);
    let a = net.bind("a").expect("bind");
    let b = net.bind("b").expect("bind");
    let c = net.bind("c").expect("bind");
    net.set_link_drop_probability(&addr("a"), &addr("b"), 1.0)
        .expect("valid");
    for i in 0..20 {
        a.send(&addr("b"), frame(i)).await.expect("send");
        a.send(&addr("c"), frame(i)).await.expect("send");
        b.send(&addr("a"), frame(i)).await.expect("send");
    }
    assert_eq!(drain(&b).await.len(), 0);
    assert_eq!(drain(&c).await.len(), 20);
    assert_eq!(drain(&a).await.len(), 20);
    // A reliable link in a lossy network.
    net.set_drop_probability(1.0).expect("valid");
    net.set_link_drop_probability(&addr("a"), &addr("b"), 0.0)
        .expect("valid");
    for i in 0..20 {
        a.send(&addr("b"), frame(i)).await.expect("send");
        a.send(&addr("c"), frame(i)).await.expect("send");
    }
    assert_eq!(drain(&b).await.len(), 20);
    assert_eq!(drain(&c).await.len(), 0);
    net.clear_faults();
    a.send(&addr("c"), frame(0)).await.expect("send");
    assert_eq!(drain(&c).await.len(), 1);
}

#[tokio::test]
async fn invalid_fault_settings_are_refused() {
    let net = InProcessNetwork::new(1);
    for p in [-0.1, 1.1, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            net.set_drop_probability(p),
            Err(FaultError::InvalidProbability(_))
        ));
        assert!(
            net.set_link_drop_probability(&addr("a"), &addr("b"), p)
                .is_err()
        );
    }
    let (short, long) = (Duration::from_millis(1), Duration::from_millis(2));
    assert_eq!(
        net.set_delay(long, short),
        Err(FaultError::InvalidDelayRange {
            min: long,
            max: short
        })
    );
    assert!(
        net.set_link_delay(&addr("a"), &addr("b"), long, short)
            .is_err()
    );
    // Extreme but valid settings do not panic.
    net.set_delay(Duration::ZERO, Duration::MAX).expect("valid");
    net.set_delay(Duration::MAX, Duration::MAX).expect("valid");
    let widest = DelayRange::new(Duration::ZERO, Duration::MAX).expect("valid");
    assert!(widest.pick(u64::MAX) < Duration::MAX);
    assert_eq!(
        DelayRange::new(Duration::MAX, Duration::MAX)
            .expect("valid")
            .pick(u64::MAX),
        Duration::MAX
    );
}

#[tokio::test]
async fn queue_full_gives_queue_full() {
    let config =
        InProcessConfig::default().with_queue_capacity(NonZeroUsize::new(2).expect("non-zero"));
    let net = InProcessNetwork::with_config(1, config);
    let a = net.bind("a").expect("bind");
    let b = net.bind("b").expect("bind");
    a.send(&addr("b"), frame(1)).await.expect("send");
    a.send(&addr("b"), frame(2)).await.expect("send");
    let err = a.send(&addr("b"), frame(3)).await.unwrap_err();
    assert!(
        matches!(&err, TransportError::QueueFull { addr: to } if *to == addr("b")),
        "{err:?}"
    );
    let stats = net.stats();
    assert_eq!(
        (stats.sent, stats.delivered, stats.dropped_queue_full),
        (3, 2, 1)
    );
    // Draining makes room again.
    b.recv().await.expect("recv");
    a.send(&addr("b"), frame(4)).await.expect("send");
}

#[tokio::test(start_paused = true)]
async fn delayed_frames_to_a_full_queue_are_dropped_and_counted() {
    let config = InProcessConfig::default().with_queue_capacity(NonZeroUsize::MIN);
    let net = InProcessNetwork::with_config(1, config);
    let a = net.bind("a").expect("bind");
    let b = net.bind("b").expect("bind");
    net.set_delay(Duration::from_millis(10), Duration::from_millis(10))
        .expect("valid");
    a.send(&addr("b"), frame(1)).await.expect("send");
    a.send(&addr("b"), frame(2))
        .await
        .expect("delayed sends accept");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let stats = net.stats();
    assert_eq!(
        (stats.delivered, stats.dropped_queue_full, stats.in_flight()),
        (1, 1, 0)
    );
    assert_eq!(drain(&b).await.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn delayed_frames_die_with_their_receiver() {
    let net = InProcessNetwork::new(1);
    let a = net.bind("a").expect("bind");
    let b = net.bind("b").expect("bind");
    net.set_delay(Duration::from_millis(50), Duration::from_millis(50))
        .expect("valid");
    a.send(&addr("b"), frame(1)).await.expect("send");
    // b crashes and restarts before the frame arrives.
    drop(b);
    let b = net.bind("b").expect("re-bind");
    assert!(nothing_arrives(&b).await);
    let stats = net.stats();
    assert_eq!(
        (stats.dropped_unbound, stats.delivered, stats.in_flight()),
        (1, 0, 0)
    );
    // Likewise for a receiver that is closed but not dropped.
    a.send(&addr("b"), frame(2)).await.expect("send");
    b.close().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(net.stats().dropped_unbound, 2);
}

#[tokio::test(start_paused = true)]
async fn close_wakes_receivers_and_refuses_sends() {
    let net = InProcessNetwork::new(1);
    let a = Arc::new(net.bind("a").expect("bind"));
    let _b = net.bind("b").expect("bind");
    let waiting = {
        let a = Arc::clone(&a);
        tokio::spawn(async move { a.recv().await })
    };
    let also_waiting = {
        let a = Arc::clone(&a);
        tokio::spawn(async move { a.recv().await })
    };
    tokio::task::yield_now().await;
    a.close().await;
    assert!(a.is_closed());
    assert!(matches!(
        waiting.await.expect("join"),
        Err(TransportError::Closed)
    ));
    assert!(matches!(
        also_waiting.await.expect("join"),
        Err(TransportError::Closed)
    ));
    assert!(matches!(a.recv().await, Err(TransportError::Closed)));
    assert!(matches!(
        a.send(&addr("b"), frame(1)).await,
        Err(TransportError::Closed)
    ));
    assert!(!net.is_bound(&addr("a")));
    // Closing twice is harmless.
    a.close().await;
}

#[tokio::test]
async fn close_discards_queued_frames() {
    let net = InProcessNetwork::new(1);
    let a = net.bind("a").expect("bind");
    let b = net.bind("b").expect("bind");
    a.send(&addr("b"), frame(1)).await.expect("send");
    b.close().await;
    assert!(matches!(b.recv().await, Err(TransportError::Closed)));
    let err = a.send(&addr("b"), frame(2)).await.unwrap_err();
    assert!(matches!(err, TransportError::Unreachable { .. }), "{err:?}");
}

#[tokio::test]
async fn changing_faults_does_not_shift_the_random_stream() {
    // Frames 0..100 under loss, then the same with a partition interleaved in the middle:
    // the frames after the partition meet the same fate.
    async fn run(partition_midway: bool) -> BTreeSet<u32> {
        let net = InProcessNetwork::new(21);
        let a = net.bind("a").expect("bind");
        let b = net.bind("b").expect("bind");
        net.set_drop_probability(0.5).expect("valid");
        for i in 0..100 {
            let cut = partition_midway && (40..60).contains(&i);
            if cut {
                net.block(&addr("a"), &addr("b"));
            }
            a.send(&addr("b"), frame(i)).await.expect("send");
            net.heal();
        }
        drain(&b)
            .await
            .iter()
            .map(|m| frame_id(&m.frame))
            .filter(|i| !(40..60).contains(i))
            .collect()
    }
    assert_eq!(run(false).await, run(true).await);
}

#[test]
fn debug_output_is_useful() {
    let net = InProcessNetwork::new(99);
    assert!(format!("{net:?}").contains("seed: 99"));
    let t = net.bind("node-1").expect("bind");
    assert!(format!("{t:?}").contains("node-1"));
    assert_eq!(t.network().seed(), 99);
    assert_eq!(net.config(), InProcessConfig::default());
}
