//! `chorus::Node` over the in-process network: quorum outcomes under partitions, one-way
//! partitions, loss and delay; read-your-writes; read repair; deletes and TTL; batches; bad
//! requests; the replica's limits and clock check; graceful shutdown; restart with the file
//! backend. Virtual time (paused tokio clock), seeded network: set `CHORUS_SEED` to replay.

use std::num::NonZeroUsize;
use std::time::Duration;

use bytes::Bytes;
use chorus::envelope::Envelope;
use chorus::replication::message::Key;
use chorus::replication::{
    InvalidRequest, Operation, REPLICA_PROTOCOL_VERSION, Refusal, ReplicaMessage, Write,
};
use chorus::runtime::rpc::{RpcConfig, RpcEndpoint};
use chorus::{
    Consistency, ReadOptions, ReadRepair, Record, ReplicationError, Storage, StorageSpec,
    WriteOptions,
};
use chorus_tests::cluster::{Cluster, ClusterSpec};
use chorus_tests::runner::seed;

const SECOND: Duration = Duration::from_secs(1);

fn quorum() -> WriteOptions {
    WriteOptions::default().consistency(Consistency::Quorum)
}

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap()
}

/// A key whose replicas (N = 3 of `cluster`'s nodes) include node `on` and exclude `off`.
fn key_placed(cluster: &Cluster, on: &[usize], off: &[usize]) -> Bytes {
    for k in 0..10_000 {
        let key = Bytes::from(format!("key-{k}"));
        let replicas = cluster.node(on[0]).replicas_of(&key);
        let has = |i: usize| replicas.contains(&chorus::NodeId(i as u64 + 1));
        if on.iter().all(|&i| has(i)) && off.iter().all(|&i| !has(i)) {
            return key;
        }
    }
    panic!("no key placed on {on:?} and off {off:?}");
}

async fn stored(cluster: &Cluster, i: usize, key: &[u8]) -> Option<Record> {
    cluster.storage(i).get(key).await.expect("storage get")
}

#[tokio::test(start_paused = true)]
async fn a_quorum_write_is_read_back_from_every_coordinator() {
    let cluster = Cluster::start(ClusterSpec::new(3, seed())).await;
    let version = cluster
        .node(0)
        .put("greeting", "hello", quorum())
        .await
        .expect("put");
    for i in 0..3 {
        let got = cluster
            .node(i)
            .get_versioned("greeting", ReadOptions::default())
            .await
            .expect("get");
        let got = got.expect("present");
        assert_eq!(got.value, "hello");
        assert_eq!(got.version, version, "node {i}");
    }
    // The write reached all three replicas (W = 2 returned early; the third still applied).
    tokio::time::sleep(SECOND).await;
    for i in 0..3 {
        assert_eq!(
            stored(&cluster, i, b"greeting").await.map(|r| r.version),
            Some(version)
        );
    }
    assert!(cluster.node(0).stats().writes >= 1);
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn bad_requests_are_refused_before_anything_is_sent() {
    let cluster = Cluster::start(ClusterSpec::new(3, seed())).await;
    let node = cluster.node(0);
    let sent = node.stats().replica_requests_sent;
    let big = vec![0u8; node.config().max_value_len.get() + 1];
    let long_key = vec![b'k'; node.config().max_key_len.get() + 1];
    let cases: Vec<(ReplicationError, InvalidRequest)> = vec![
        (
            node.put("", "v", quorum()).await.unwrap_err(),
            InvalidRequest::EmptyKey,
        ),
        (
            node.put(long_key.clone(), "v", quorum()).await.unwrap_err(),
            InvalidRequest::KeyTooLong {
                len: long_key.len(),
                max: long_key.len() - 1,
            },
        ),
        (
            node.put("k", big.clone(), quorum()).await.unwrap_err(),
            InvalidRequest::ValueTooLarge {
                len: big.len(),
                max: big.len() - 1,
            },
        ),
        (
            node.put(
                "k",
                "v",
                WriteOptions::default().consistency(Consistency::Count(nz(4))),
            )
            .await
            .unwrap_err(),
            InvalidRequest::ConsistencyAboveReplicas {
                requested: 4,
                replicas: 3,
            },
        ),
        (
            node.put("k", "v", quorum().timeout(Duration::ZERO))
                .await
                .unwrap_err(),
            InvalidRequest::ZeroTimeout,
        ),
        (
            node.put("k", "v", quorum().ttl(Duration::from_secs(u64::MAX)))
                .await
                .unwrap_err(),
            InvalidRequest::BadTtl(Duration::from_secs(u64::MAX)),
        ),
        (
            node.get("", ReadOptions::default()).await.unwrap_err(),
            InvalidRequest::EmptyKey,
        ),
    ];
    for (got, want) in cases {
        assert_eq!(got, ReplicationError::Invalid(want));
    }
    assert_eq!(node.stats().replica_requests_sent, sent, "nothing was sent");
    for i in 0..3 {
        assert_eq!(stored(&cluster, i, b"k").await, None, "nothing was stored");
    }
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn fewer_live_replicas_than_required_is_unavailable_and_sends_nothing() {
    let mut cluster = Cluster::start(ClusterSpec::new(3, seed())).await;
    cluster.kill(1).await;
    cluster.kill(2).await;
    cluster.wait_for_ring(Duration::from_secs(30)).await;
    let node = cluster.node(0);
    let sent = node.stats().replica_requests_sent;
    let err = node.put("k", "v", quorum()).await.unwrap_err();
    assert_eq!(
        err,
        ReplicationError::Unavailable {
            required: 2,
            alive: 1
        }
    );
    assert!(!err.is_indeterminate());
    let err = node.get("k", ReadOptions::default()).await.unwrap_err();
    assert!(
        matches!(
            err,
            ReplicationError::Unavailable {
                required: 2,
                alive: 1
            }
        ),
        "{err}"
    );
    assert_eq!(node.stats().replica_requests_sent, sent);
    assert_eq!(stored(&cluster, 0, b"k").await, None);
    // At One the write goes ahead on the one replica left.
    node.put(
        "k",
        "v",
        WriteOptions::default().consistency(Consistency::One),
    )
    .await
    .expect("write at One");
    cluster.stop().await;
}

/// Runs `op` up to 10,000 times in a row on this (current-thread) runtime and says whether
/// a task spawned before the loop got to run meanwhile.
async fn other_tasks_run_while_looping<F, Fut>(mut op: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ran.clone();
    tokio::spawn(async move { flag.store(true, std::sync::atomic::Ordering::SeqCst) });
    for _ in 0..10_000 {
        if ran.load(std::sync::atomic::Ordering::SeqCst) {
            return true;
        }
        assert!(op().await, "the request did not end as expected");
    }
    ran.load(std::sync::atomic::Ordering::SeqCst)
}

/// A client that repeats a request in a loop must not starve the runtime: a request that
/// ends at once (a replica's address refuses, too few replicas alive, a read at One from
/// local storage) still yields to the scheduler now and then, or the loop would keep membership from ever seeing the
/// cluster recover (on two worker threads, two such clients stop every other task).
#[tokio::test(start_paused = true)]
async fn requests_that_fail_at_once_still_let_other_tasks_run() {
    // A write whose second replica's address refuses: it fails without waiting.
    let mut cluster = Cluster::start(ClusterSpec::new(2, seed())).await;
    cluster.kill(1).await;
    let node = cluster.node(0).clone();
    let refused = other_tasks_run_while_looping(|| {
        let node = node.clone();
        async move {
            matches!(
                node.put("k", "v", quorum()).await,
                Err(ReplicationError::Failed { .. })
            )
        }
    })
    .await;
    assert!(
        refused,
        "puts failing at an unreachable replica never yielded"
    );
    // Too few replicas alive: refused before anything is sent.
    cluster.wait_for_ring(Duration::from_secs(30)).await;
    let unavailable_put = other_tasks_run_while_looping(|| {
        let node = node.clone();
        async move {
            matches!(
                node.put("k", "v", quorum()).await,
                Err(ReplicationError::Unavailable { .. })
            )
        }
    })
    .await;
    assert!(unavailable_put, "unavailable puts never yielded");
    let unavailable_get = other_tasks_run_while_looping(|| {
        let node = node.clone();
        async move {
            matches!(
                node.get("k", ReadOptions::default()).await,
                Err(ReplicationError::Unavailable { .. })
            )
        }
    })
    .await;
    assert!(unavailable_get, "unavailable gets never yielded");
    // A read at One that local storage answers (no message) must yield too.
    let local_get = other_tasks_run_while_looping(|| {
        let node = node.clone();
        async move {
            node.get("k", ReadOptions::default().consistency(Consistency::One))
                .await
                .is_ok()
        }
    })
    .await;
    assert!(local_get, "reads at One from local storage never yielded");
    let local_get_many = other_tasks_run_while_looping(|| {
        let node = node.clone();
        async move {
            node.get_many(
                vec![Bytes::from("k"), Bytes::from("l")],
                ReadOptions::default().consistency(Consistency::One),
            )
            .await
            .is_ok_and(|all| all.iter().all(Result::is_ok))
        }
    })
    .await;
    assert!(
        local_get_many,
        "batched reads at One from local storage never yielded"
    );
    // Refused before anything else: an invalid request, and any request once shutdown began.
    let invalid = other_tasks_run_while_looping(|| {
        let node = node.clone();
        async move {
            matches!(
                node.put("k", "v", quorum().timeout(Duration::ZERO)).await,
                Err(ReplicationError::Invalid(_))
            )
        }
    })
    .await;
    assert!(invalid, "invalid requests never yielded");
    node.shutdown().await.expect("shutdown");
    let after_shutdown = other_tasks_run_while_looping(|| {
        let node = node.clone();
        async move {
            matches!(
                node.put("k", "v", quorum()).await,
                Err(ReplicationError::ShuttingDown)
            )
        }
    })
    .await;
    assert!(
        after_shutdown,
        "requests refused after shutdown never yielded"
    );
    cluster.stop().await;
}

/// A decided request's leftover work (waiting for a replica's late answer until the
/// deadline) is bounded per node: with a replica that never answers, requests past the bound
/// do not wait for it at all (shed, counted), and that replica gets its hints at once.
/// Requests never wait for room, so none is slower for it.
#[tokio::test(start_paused = true)]
async fn leftover_work_is_bounded_and_what_is_past_the_bound_is_hinted_at_once() {
    const BOUND: u64 = 16_384;
    const PUTS: u64 = 34 * 500;
    let cluster = Cluster::start(ClusterSpec::new(3, seed())).await;
    // Node 3 never hears from node 1: every write node 1 coordinates is acknowledged by
    // nodes 1 and 2 (W = 2) and then waits for node 3 until its 10 s deadline.
    cluster.net.block(&Cluster::addr(0), &Cluster::addr(2));
    let node = cluster.node(0).clone();
    let options = quorum().timeout(Duration::from_secs(10));
    for wave in 0..PUTS / 500 {
        let started = tokio::time::Instant::now();
        let puts: Vec<_> = (0..500u64)
            .map(|i| {
                let node = node.clone();
                tokio::spawn(async move { node.put(format!("k-{wave}-{i}"), "v", options).await })
            })
            .collect();
        for put in puts {
            put.await
                .expect("no panic")
                .expect("acknowledged by nodes 1 and 2");
        }
        let took = started.elapsed();
        assert!(took < SECOND, "wave {wave} took {took:?}");
        let pending = node.stats().deferred_pending;
        assert!(pending <= BOUND, "{pending} pieces of leftover work");
    }
    let stats = node.stats();
    assert_eq!(stats.deferred_pending, BOUND);
    assert_eq!(stats.deferred_shed, PUTS - BOUND);
    // Before any deadline: the hints are those of the shed writes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stats = node.stats();
    assert_eq!(
        stats.hints_stored + stats.hints_dropped_overload,
        PUTS - BOUND,
        "the shed writes' missing replica is hinted at once"
    );
    tokio::time::sleep(Duration::from_secs(25)).await;
    let stats = node.stats();
    assert_eq!(stats.deferred_pending, 0, "all leftover work ended");
    assert_eq!(
        stats.hints_stored + stats.hints_dropped_overload,
        PUTS,
        "every write node 3 missed is hinted (or counted as dropped)"
    );
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_coordinator_fails_honestly_and_the_write_may_land() {
    let cluster = Cluster::start(ClusterSpec::new(3, seed())).await;
    let key = key_placed(&cluster, &[0], &[]);
    let others = [Cluster::addr(1), Cluster::addr(2)];
    cluster.net.partition(&[Cluster::addr(0)], &others);
    let err = cluster
        .node(0)
        .put(key.clone(), "v", quorum().timeout(SECOND))
        .await
        .unwrap_err();
    // The local replica acknowledged; the others were unreachable.
    match &err {
        ReplicationError::Failed {
            op: Operation::Write,
            acks: 1,
            required: 2,
            unreachable: 2,
            ..
        }
        | ReplicationError::Timeout {
            op: Operation::Write,
            acks: 1,
            required: 2,
            ..
        } => {}
        other => panic!("unexpected outcome {other:?}"),
    }
    assert!(err.is_indeterminate());
    assert!(err.to_string().contains("may have been applied"), "{err}");
    // It did land on the coordinator's own replica: "not acknowledged" is not "not stored".
    assert!(stored(&cluster, 0, &key).await.is_some());
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn lost_acknowledgements_time_out_although_the_write_landed() {
    let cluster = Cluster::start(ClusterSpec::new(4, seed())).await;
    // A key node 0 does not replicate, so every ack must come over the network.
    let key = key_placed(&cluster, &[1, 2], &[0]);
    // Answers from 1 and 2 to 0 are lost; requests from 0 still arrive.
    cluster.net.block(&Cluster::addr(1), &Cluster::addr(0));
    cluster.net.block(&Cluster::addr(2), &Cluster::addr(0));
    let err = cluster
        .node(0)
        .put(
            key.clone(),
            "v",
            quorum().timeout(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ReplicationError::Timeout {
                op: Operation::Write,
                required: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_indeterminate());
    cluster.net.heal();
    tokio::time::sleep(SECOND).await;
    for i in [1, 2] {
        assert!(
            stored(&cluster, i, &key).await.is_some(),
            "the write reached replica {i}"
        );
    }
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn read_repair_brings_a_stale_replica_up_to_date_with_the_original_version() {
    let cluster = Cluster::start(ClusterSpec::new(3, seed())).await;
    cluster
        .net
        .partition(&[Cluster::addr(2)], &[Cluster::addr(0), Cluster::addr(1)]);
    let version = cluster
        .node(0)
        .put("k", "v", quorum())
        .await
        .expect("a quorum without node 2");
    assert_eq!(stored(&cluster, 2, b"k").await, None);
    cluster.net.heal();
    let got = cluster
        .node(0)
        .get_versioned("k", ReadOptions::default().consistency(Consistency::All))
        .await
        .expect("read");
    assert_eq!(got.map(|v| v.version), Some(version));
    tokio::time::sleep(SECOND).await;
    let repaired = stored(&cluster, 2, b"k").await.expect("repaired");
    assert_eq!(
        repaired.version, version,
        "repair keeps the original version"
    );
    assert_eq!(cluster.node(0).stats().read_repairs, 1);
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_blocking_read_returns_only_once_the_winner_is_on_r_replicas() {
    let cluster = Cluster::start(ClusterSpec::new(3, seed())).await;
    // A value on one replica only: written at One while its coordinator was cut off.
    cluster
        .net
        .partition(&[Cluster::addr(0)], &[Cluster::addr(1), Cluster::addr(2)]);
    let one = WriteOptions::default().consistency(Consistency::One);
    let version = cluster
        .node(0)
        .put("k", "v", one)
        .await
        .expect("put at One");
    cluster.net.heal();
    // Read through the node that holds it: its own answer and one more make R = 2, and the
    // other answer is stale.
    let got = cluster
        .node(0)
        .get_versioned("k", ReadOptions::default().repair(ReadRepair::Blocking))
        .await
        .expect("read");
    assert_eq!(got.map(|v| v.version), Some(version));
    // No await between the reply and this count: the winner is on two replicas already.
    let mut holders = 0;
    for i in 0..3 {
        if stored(&cluster, i, b"k").await.map(|r| r.version) == Some(version) {
            holders += 1;
        }
    }
    assert!(
        holders >= 2,
        "the winner is on {holders} replicas at the reply"
    );
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_delete_is_never_undone_by_repair() {
    let cluster = Cluster::start(ClusterSpec::new(3, seed())).await;
    let all = WriteOptions::default().consistency(Consistency::All);
    cluster
        .node(0)
        .put("k", "v", all)
        .await
        .expect("put at All");
    cluster
        .net
        .partition(&[Cluster::addr(2)], &[Cluster::addr(0), Cluster::addr(1)]);
    let deleted = cluster.node(0).delete("k", quorum()).await.expect("delete");
    cluster.net.heal();
    // Node 2 still holds the value; every read sees the tombstone win.
    assert!(
        stored(&cluster, 2, b"k")
            .await
            .is_some_and(|r| !r.is_tombstone())
    );
    for i in [2, 1, 0] {
        let got = cluster
            .node(i)
            .get("k", ReadOptions::default().consistency(Consistency::All))
            .await
            .expect("read");
        assert_eq!(got, None, "read from node {i}");
    }
    tokio::time::sleep(SECOND).await;
    let on_2 = stored(&cluster, 2, b"k").await.expect("record");
    assert!(
        on_2.is_tombstone(),
        "repair carried the tombstone: {on_2:?}"
    );
    assert_eq!(on_2.version, deleted);
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn values_expire_and_the_purge_removes_them_after_the_grace_period() {
    let mut spec = ClusterSpec::new(3, seed());
    spec.config.tombstone_grace = Duration::from_secs(5);
    spec.config.hint_window = Duration::from_secs(4);
    spec.config.anti_entropy_interval = Duration::from_secs(4);
    spec.config.purge_interval = SECOND;
    let cluster = Cluster::start(spec).await;
    let node = cluster.node(0);
    node.put("short", "v", quorum().ttl(Duration::from_secs(2)))
        .await
        .expect("put");
    node.put("kept", "v", quorum()).await.expect("put");
    node.delete("gone", quorum()).await.expect("delete");
    assert_eq!(
        node.get("short", ReadOptions::default())
            .await
            .unwrap()
            .as_deref(),
        Some(&b"v"[..])
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        node.get("short", ReadOptions::default()).await.unwrap(),
        None
    );
    assert!(
        stored(&cluster, 0, b"short").await.is_some(),
        "kept until the grace ends"
    );
    tokio::time::sleep(Duration::from_secs(8)).await;
    for i in 0..3 {
        assert_eq!(
            stored(&cluster, i, b"short").await,
            None,
            "expired value purged on {i}"
        );
        assert_eq!(
            stored(&cluster, i, b"gone").await,
            None,
            "tombstone purged on {i}"
        );
        assert!(stored(&cluster, i, b"kept").await.is_some());
        assert!(cluster.node(i).stats().purged >= 2);
    }
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_batch_costs_one_message_per_replica() {
    let cluster = Cluster::start(ClusterSpec::new(5, seed())).await;
    let node = cluster.node(0);
    let entries: Vec<(Bytes, Bytes)> = (0..200)
        .map(|i| (Bytes::from(format!("k{i}")), Bytes::from(format!("v{i}"))))
        .collect();
    let before = node.stats().replica_requests_sent;
    let results = node
        .put_many(entries.clone(), quorum())
        .await
        .expect("batch");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let sent = node.stats().replica_requests_sent - before;
    assert!(
        sent <= 4,
        "200 keys took {sent} messages to 4 other replicas"
    );
    let keys: Vec<Bytes> = entries.iter().map(|(k, _)| k.clone()).collect();
    let before = node.stats().replica_requests_sent;
    let got = node
        .get_many(keys.clone(), ReadOptions::default())
        .await
        .expect("batch read");
    assert!(node.stats().replica_requests_sent - before <= 4);
    for ((_, v), got) in entries.iter().zip(got) {
        assert_eq!(got.expect("read").map(|g| g.value).as_ref(), Some(v));
    }
    let deleted = node
        .delete_many(keys.clone(), quorum())
        .await
        .expect("batch delete");
    assert!(deleted.iter().all(Result::is_ok));
    let got = cluster
        .node(3)
        .get_many(keys, ReadOptions::default())
        .await
        .expect("batch read");
    assert!(got.iter().all(|r| matches!(r, Ok(None))));
    // A batch over the limit is refused whole.
    let huge: Vec<Bytes> = (0..5000).map(|i| Bytes::from(format!("k{i}"))).collect();
    assert!(matches!(
        node.get_many(huge, ReadOptions::default()).await,
        Err(ReplicationError::Invalid(
            InvalidRequest::BatchTooLarge { .. }
        ))
    ));
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn quorum_reads_see_a_coordinators_last_quorum_write_from_any_node() {
    use rand::{Rng, SeedableRng};
    let seed = seed();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let cluster = Cluster::start(ClusterSpec::new(5, seed)).await;
    let mut last: Vec<Option<Bytes>> = vec![None; 5];
    for op in 0..60 {
        let key = rng.random_range(0..5usize);
        // Each key has one writer: writes through different coordinators are ordered by
        // their clocks, and two in the same millisecond are concurrent under LWW
        // (docs/CONSISTENCY.md). One coordinator's HLC orders its own writes.
        let writer = key;
        let reader = rng.random_range(0..5);
        let value = Bytes::from(format!("v{op}"));
        cluster
            .node(writer)
            .put(format!("k{key}"), value.clone(), quorum())
            .await
            .expect("put");
        last[key] = Some(value);
        let got = cluster
            .node(reader)
            .get(format!("k{key}"), ReadOptions::default())
            .await
            .expect("get");
        assert_eq!(
            got, last[key],
            "seed {seed}: op {op}, key {key}, read on {reader}"
        );
    }
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn under_loss_and_delay_every_outcome_is_typed_and_acknowledged_writes_stay() {
    let seed = seed();
    let cluster = Cluster::start(ClusterSpec::new(5, seed)).await;
    cluster.net.set_drop_probability(0.2).expect("loss");
    cluster
        .net
        .set_delay(Duration::from_millis(1), Duration::from_millis(30))
        .expect("delay");
    let mut acknowledged = Vec::new();
    let opts = quorum().timeout(Duration::from_millis(200));
    for i in 0..100 {
        let key = format!("once-{i}");
        match cluster
            .node(i % 5)
            .put(key.clone(), format!("v{i}"), opts)
            .await
        {
            Ok(version) => acknowledged.push((key, version)),
            Err(e) => assert!(e.is_indeterminate(), "seed {seed}: write {i}: {e:?}"),
        }
    }
    assert!(!acknowledged.is_empty(), "seed {seed}: no write succeeded");
    cluster.net.clear_faults();
    for (i, (key, version)) in acknowledged.iter().enumerate() {
        let got = cluster
            .node((i + 2) % 5)
            .get_versioned(key.clone(), ReadOptions::default())
            .await
            .expect("read after the faults cleared");
        assert_eq!(got.map(|v| v.version), Some(*version), "seed {seed}: {key}");
    }
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_replica_refuses_versions_beyond_its_drift_bound() {
    let cluster = Cluster::start(ClusterSpec::new(3, seed())).await;
    cluster.clocks[0].set_skew(5_000);
    let err = cluster.node(0).put("k", "v", quorum()).await.unwrap_err();
    match &err {
        ReplicationError::Failed {
            acks: 1, refusals, ..
        } => {
            assert_eq!(refusals.len(), 2, "{refusals:?}");
            assert!(
                refusals.iter().all(
                    |(_, r)| matches!(r, Refusal::ClockDrift { ahead_ms } if *ahead_ms >= 4_500)
                )
            );
        }
        other => panic!("unexpected outcome {other:?}"),
    }
    assert!(err.to_string().contains("drift"), "{err}");
    for i in [1, 2] {
        assert_eq!(stored(&cluster, i, b"k").await, None);
        assert_eq!(cluster.node(i).stats().drift_refusals, 1);
    }
    // Back within the bound, writes go through.
    cluster.clocks[0].set_skew(100);
    tokio::time::sleep(Duration::from_secs(6)).await;
    cluster.node(0).put("k2", "v", quorum()).await.expect("put");
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_replica_answers_malformed_requests_with_typed_errors_and_keeps_serving() {
    let cluster = Cluster::start(ClusterSpec::new(3, seed())).await;
    let probe = chorus::SharedTransport::new(cluster.net.bind("probe:1").expect("bind"));
    // A second endpoint for raw frames: the rpc endpoint above consumes what `probe` receives.
    let raw = cluster.net.bind("raw:1").expect("bind");
    let (client, _inbound) = RpcEndpoint::<_, Envelope>::start(probe.clone(), RpcConfig::default());
    let to = Cluster::addr(0);
    // A request of an unknown protocol version.
    let reply = client
        .request(
            &to,
            &Envelope::Replica(ReplicaMessage::Apply {
                version: REPLICA_PROTOCOL_VERSION + 1,
                writes: vec![],
            }),
            SECOND,
        )
        .await
        .expect("an answer");
    assert_eq!(
        reply,
        Envelope::Replica(ReplicaMessage::Refused(Refusal::UnsupportedVersion {
            got: REPLICA_PROTOCOL_VERSION + 1,
            supported: REPLICA_PROTOCOL_VERSION
        }))
    );
    // Writes that break the replica's limits are refused one by one; the rest applied.
    let version = chorus::Version::new(
        chorus::Timestamp::new(chorus_tests::cluster::EPOCH_MS, 0),
        chorus::NodeId(9),
    );
    let reply = client
        .request(
            &to,
            &Envelope::Replica(ReplicaMessage::Apply {
                version: REPLICA_PROTOCOL_VERSION,
                writes: vec![
                    Write {
                        key: Bytes::new(),
                        record: Record::value("x", version),
                    },
                    Write {
                        key: Bytes::from_static(b"ok"),
                        record: Record::value("x", version),
                    },
                ],
            }),
            SECOND,
        )
        .await
        .expect("an answer");
    let Envelope::Replica(ReplicaMessage::Applied { outcomes }) = reply else {
        panic!("{reply:?}");
    };
    assert!(matches!(
        &outcomes[0],
        chorus::replication::WriteOutcome::Refused(Refusal::Invalid { .. })
    ));
    assert_eq!(outcomes[1], chorus::replication::WriteOutcome::Applied);
    let reply = client
        .request(
            &to,
            &Envelope::Replica(ReplicaMessage::Read {
                version: REPLICA_PROTOCOL_VERSION,
                keys: vec![Key(Bytes::new())],
            }),
            SECOND,
        )
        .await
        .expect("an answer");
    assert!(matches!(
        reply,
        Envelope::Replica(ReplicaMessage::Refused(Refusal::Invalid { .. }))
    ));
    // A request whose payload does not decode gets a typed answer, not silence.
    use chorus::Transport;
    let mut frame = chorus::wire::encode(
        chorus::wire::Header::request(77),
        &Envelope::Replica(ReplicaMessage::read_one(Bytes::from_static(b"k"))),
        1 << 20,
    )
    .expect("encode")
    .to_vec();
    // The envelope's variant tag, first byte of the payload: one no build knows.
    frame[chorus::wire::PREFIX_LEN + chorus::wire::HEADER_LEN] = 250;
    raw.send(&to, Bytes::from(frame)).await.expect("send");
    let answered = tokio::time::timeout(SECOND, async {
        loop {
            let incoming = raw.recv().await.expect("recv");
            if let Ok((header, Envelope::Replica(ReplicaMessage::Refused(r)))) =
                chorus::wire::decode::<Envelope>(&incoming.frame, 1 << 20)
                && header.correlation == 77
            {
                return r;
            }
        }
    })
    .await;
    assert!(
        matches!(answered, Ok(Refusal::Undecodable { .. })),
        "{answered:?}"
    );
    assert!(cluster.node(0).stats().bad_replica_requests >= 1);
    // And the node still serves.
    cluster
        .node(0)
        .put("after", "v", quorum())
        .await
        .expect("put");
    cluster.stop().await;
}

/// A replica whose answer cannot be delivered (the requester is gone) counts it: the
/// coordinator's side of that exchange is a timeout, and the count says why.
#[tokio::test(start_paused = true)]
async fn a_replica_counts_answers_it_could_not_send() {
    use chorus::Transport;
    let cluster = Cluster::start(ClusterSpec::new(3, seed())).await;
    let to = Cluster::addr(0);
    let before = cluster.node(0).stats().replies_not_sent;
    let gone = cluster.net.bind("gone:1").expect("bind");
    let frame = chorus::wire::encode(
        chorus::wire::Header::request(5),
        &Envelope::Replica(ReplicaMessage::read_one(Bytes::from_static(b"k"))),
        1 << 20,
    )
    .expect("encode");
    // Sent, then the endpoint closes before the node runs (this runtime has one thread and
    // neither call yields), so the answer has nowhere to go.
    gone.send(&to, frame).await.expect("send");
    drop(gone);
    let counted = tokio::time::timeout(SECOND, async {
        while cluster.node(0).stats().replies_not_sent == before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(counted.is_ok(), "{:?}", cluster.node(0).stats());
    assert_eq!(cluster.node(0).stats().replies_not_sent, before + 1);
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_finishes_in_flight_requests_leaves_and_refuses_new_ones() {
    let mut cluster = Cluster::start(ClusterSpec::new(3, seed())).await;
    let node = cluster.node(0).clone();
    let in_flight = {
        let node = node.clone();
        tokio::spawn(async move { node.put("k", "v", quorum()).await })
    };
    tokio::task::yield_now().await;
    cluster.shutdown(0).await;
    assert!(
        in_flight.await.expect("task").is_ok(),
        "the request in flight finished"
    );
    assert_eq!(
        node.put("k2", "v", quorum()).await.unwrap_err(),
        ReplicationError::ShuttingDown
    );
    tokio::time::sleep(SECOND).await;
    for i in [1, 2] {
        let view = cluster.node(i).members();
        let me = view.iter().find(|m| m.id.0 == 1).expect("known");
        assert_eq!(
            me.state,
            chorus::membership::MemberState::Left,
            "node {i} saw the leave"
        );
    }
    assert!(matches!(
        node.storage().get(b"k").await,
        Err(chorus::StorageError::Closed)
    ));
    cluster.stop().await;
}

// Real time: the file backend fsyncs on its own thread, which a paused clock would not wait
// for (it would jump to the request deadline while the disk works).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_file_node_keeps_its_data_and_never_reissues_a_version() {
    let mut spec = ClusterSpec::new(3, seed());
    spec.storage = StorageSpec::new("file");
    spec.storage.options.insert("fsync".into(), "always".into());
    let mut cluster = Cluster::start(spec).await;
    let first = cluster
        .node(0)
        .put("k", "first", quorum())
        .await
        .expect("put");
    cluster.kill(0).await;
    // The clock goes back a minute across the restart.
    cluster.clocks[0].set_skew(-60_000);
    cluster.restart(0).await;
    cluster.wait_for_ring(Duration::from_secs(30)).await;
    assert_eq!(
        stored(&cluster, 0, b"k").await.map(|r| r.version),
        Some(first),
        "the data survived"
    );
    let one = WriteOptions::default().consistency(Consistency::One);
    let second = cluster.node(0).put("k", "second", one).await.expect("put");
    assert!(second > first, "{second:?} must follow {first:?}");
    let got = cluster
        .node(1)
        .get("k", ReadOptions::default().consistency(Consistency::All))
        .await
        .expect("read");
    assert_eq!(got.as_deref(), Some(&b"second"[..]));
    cluster.stop().await;
}

#[test]
fn the_handle_is_send_sync_and_cheap_to_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<chorus::Node>();
}

#[test]
fn a_config_file_that_is_wrong_says_which_field_and_why() {
    use chorus::NodeConfig;
    let good: NodeConfig = toml::from_str(
        r#"
        id = 7
        seeds = ["10.0.0.2:7946"]
        replication_factor = 3
        read_consistency = "one"
        write_consistency = 2
        request_timeout = "1500ms"
        tombstone_grace = "48h"
        [transport]
        scheme = "tcp"
        bind = "10.0.0.1:7946"
        [storage]
        scheme = "file"
        path = "/var/lib/chorus"
        options = { fsync = "always" }
        "#,
    )
    .expect("a valid file");
    assert_eq!(good.id, chorus::NodeId(7));
    assert_eq!(good.request_timeout, Duration::from_millis(1500));
    assert_eq!(good.tombstone_grace, Duration::from_secs(48 * 3600));
    assert_eq!(good.read_consistency, Consistency::One);
    assert_eq!(good.write_consistency, Consistency::Count(nz(2)));
    assert!(good.validate().is_ok());
    // Defaults fill what a file leaves out, and survive a round trip.
    let text = toml::to_string(&good).expect("serialises");
    let back: NodeConfig = toml::from_str(&text).expect("reads back");
    assert_eq!(back, good);

    for (file, field) in [
        ("request_timeout = \"soon\"", "request_timeout"),
        ("replication_factor = 0", "replication_factor"),
        ("read_consistency = \"most\"", "read_consistency"),
        ("replicaton_factor = 3", "replicaton_factor"),
    ] {
        let err = toml::from_str::<NodeConfig>(file)
            .expect_err(file)
            .to_string();
        assert!(err.contains(field), "{file}: {err}");
    }
    let mut bad = NodeConfig::default();
    bad.write_consistency = Consistency::Count(nz(5));
    let err = bad.validate().expect_err("count above N").to_string();
    assert!(
        err.contains("write_consistency") && err.contains("5"),
        "{err}"
    );
}
