//! Healing across the cluster: hinted handoff over the in-process network, with a partitioned
//! replica, a restarted coordinator (hints on a durable backend) and the hint store's bounds.
//! Virtual time (paused tokio clock), seeded network: set `CHORUS_SEED` to replay.

use std::num::NonZeroUsize;
use std::time::Duration;

use bytes::Bytes;
use chorus::runtime::node::NodeConfig;
use chorus::{Consistency, NodeId, Record, Storage, StorageSpec, Version, WriteOptions};
use chorus_tests::cluster::{Cluster, ClusterSpec};
use chorus_tests::runner::seed;

fn quorum() -> WriteOptions {
    WriteOptions::default().consistency(Consistency::Quorum)
}

async fn stored(cluster: &Cluster, i: usize, key: &[u8]) -> Option<Record> {
    cluster.storage(i).get(key).await.expect("storage get")
}

/// Waits (virtual time) until node `i` stores each `(key, version)`, without reading through
/// any node; panics with what is missing after `limit`.
async fn wait_stored(cluster: &Cluster, i: usize, expected: &[(Bytes, Version)], limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut missing = Vec::new();
        for (key, version) in expected {
            if stored(cluster, i, key).await.map(|r| r.version) != Some(*version) {
                missing.push(key.clone());
            }
        }
        if missing.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "seed {}: node {i} still misses {} of {} keys after {limit:?}: {:?}",
            seed(),
            missing.len(),
            expected.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `cond` holds for node `i`'s stats; panics after `limit`.
async fn wait_stats(
    cluster: &Cluster,
    i: usize,
    what: &str,
    limit: Duration,
    cond: impl Fn(&chorus::runtime::node::NodeStats) -> bool,
) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond(&cluster.node(i).stats()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "seed {}: node {i}: {what} not reached within {limit:?}: {:?}",
            seed(),
            cluster.node(i).stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `count` keys through node 0 at quorum while node 2 is cut off from the others.
async fn write_around(cluster: &Cluster, count: usize) -> Vec<(Bytes, Version)> {
    let mut written = Vec::new();
    for k in 0..count {
        let key = Bytes::from(format!("key-{k}"));
        let version = cluster
            .node(0)
            .put(key.clone(), format!("v{k}"), quorum())
            .await
            .expect("a quorum without node 2");
        written.push((key, version));
    }
    written
}

/// `nodes` nodes with anti-entropy off, so that only hints heal.
fn hints_only(nodes: usize) -> ClusterSpec {
    let mut spec = ClusterSpec::new(nodes, seed());
    spec.config.anti_entropy = false;
    spec
}

/// `nodes` nodes with hinted handoff off, so that only anti-entropy heals.
fn sync_only(nodes: usize) -> ClusterSpec {
    let mut spec = ClusterSpec::new(nodes, seed());
    spec.config.hinted_handoff = false;
    spec
}

fn partition_node_2(cluster: &Cluster) {
    cluster
        .net
        .partition(&[Cluster::addr(2)], &[Cluster::addr(0), Cluster::addr(1)]);
}

#[tokio::test(start_paused = true)]
async fn a_write_that_missed_a_partitioned_replica_reaches_it_after_heal_without_a_read() {
    let cluster = Cluster::start(hints_only(3)).await;
    partition_node_2(&cluster);
    let written = write_around(&cluster, 20).await;
    for (key, _) in &written {
        assert_eq!(stored(&cluster, 2, key).await, None, "cut off");
    }
    wait_stats(
        &cluster,
        0,
        "20 hints for node 3",
        Duration::from_secs(5),
        |s| s.hints_pending == 20,
    )
    .await;
    // Long enough for node 2 to be declared dead and come back when the network heals.
    tokio::time::sleep(Duration::from_secs(15)).await;
    cluster.net.heal();
    wait_stored(&cluster, 2, &written, Duration::from_secs(60)).await;
    let stats = cluster.node(0).stats();
    assert_eq!(stats.hints_delivered, 20, "{stats:?}");
    assert_eq!(stats.hints_pending, 0, "{stats:?}");
    assert_eq!(stats.reads, 0, "no read was needed");
    assert_eq!(
        stats.hints_dropped_full + stats.hints_dropped_expired + stats.hints_dropped_rejected,
        0
    );
    cluster.stop().await;
}

// Real time: the file backend fsyncs on its own thread, which a paused clock would not wait
// for (it would jump to the request deadline while the disk works).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_survive_a_restart_of_their_coordinator_on_a_durable_backend() {
    let mut spec = hints_only(3);
    spec.storage = StorageSpec::new("file");
    let mut cluster = Cluster::start(spec).await;
    partition_node_2(&cluster);
    let written = write_around(&cluster, 10).await;
    wait_stats(
        &cluster,
        0,
        "10 stored hints",
        Duration::from_secs(5),
        |s| s.hints_pending == 10,
    )
    .await;
    // The coordinator crashes with its hints undelivered; the network heals while it is down.
    cluster.kill(0).await;
    cluster.net.heal();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (key, _) in &written {
        assert_eq!(
            stored(&cluster, 2, key).await,
            None,
            "nothing healed it yet"
        );
    }
    cluster.restart(0).await;
    wait_stored(&cluster, 2, &written, Duration::from_secs(60)).await;
    wait_stats(
        &cluster,
        0,
        "every hint delivered",
        Duration::from_secs(5),
        |s| s.hints_delivered == 10 && s.hints_pending == 0,
    )
    .await;
    // Delivered hints are gone from storage too: another restart replays nothing.
    cluster.kill(0).await;
    cluster.restart(0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(cluster.node(0).stats().hints_stored, 0);
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_hint_store_is_bounded_per_replica_and_counts_what_it_drops() {
    let mut spec = hints_only(3);
    spec.config.max_hints_per_target = NonZeroUsize::new(5).expect("non-zero");
    let cluster = Cluster::start(spec).await;
    partition_node_2(&cluster);
    let written = write_around(&cluster, 12).await;
    wait_stats(
        &cluster,
        0,
        "12 hints kept or dropped",
        Duration::from_secs(5),
        |s| s.hints_stored + s.hints_dropped_full == 12,
    )
    .await;
    let stats = cluster.node(0).stats();
    assert_eq!(
        (stats.hints_stored, stats.hints_dropped_full),
        (5, 7),
        "{stats:?}"
    );
    cluster.net.heal();
    // The five oldest are delivered; the rest wait for anti-entropy or a read.
    wait_stored(&cluster, 2, &written[..5], Duration::from_secs(60)).await;
    wait_stats(&cluster, 0, "5 delivered", Duration::from_secs(5), |s| {
        s.hints_delivered == 5 && s.hints_pending == 0
    })
    .await;
    for (key, _) in &written[5..] {
        assert_eq!(
            stored(&cluster, 2, key).await,
            None,
            "dropped, not delivered"
        );
    }
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn hints_past_the_window_are_dropped_and_never_replayed() {
    let mut spec = hints_only(3);
    spec.config.hint_window = Duration::from_secs(10);
    let cluster = Cluster::start(spec).await;
    partition_node_2(&cluster);
    let written = write_around(&cluster, 3).await;
    wait_stats(&cluster, 0, "3 hints", Duration::from_secs(5), |s| {
        s.hints_pending == 3
    })
    .await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let stats = cluster.node(0).stats();
    assert_eq!(
        (stats.hints_dropped_expired, stats.hints_pending),
        (3, 0),
        "{stats:?}"
    );
    cluster.net.heal();
    cluster.wait_for_ring(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (key, _) in &written {
        assert_eq!(
            stored(&cluster, 2, key).await,
            None,
            "expired hints are not replayed"
        );
    }
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn without_hinted_handoff_nothing_is_kept() {
    let mut spec = hints_only(3);
    spec.config.hinted_handoff = false;
    let cluster = Cluster::start(spec).await;
    partition_node_2(&cluster);
    let written = write_around(&cluster, 3).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.net.heal();
    cluster.wait_for_ring(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(cluster.node(0).stats().hints_stored, 0);
    for (key, _) in &written {
        assert_eq!(stored(&cluster, 2, key).await, None);
    }
    cluster.stop().await;
}

#[test]
fn the_tombstone_grace_must_exceed_the_hint_window_and_the_sync_interval() {
    let mut config = NodeConfig::default();
    config.validate().expect("the defaults are consistent");
    config.tombstone_grace = config.hint_window;
    let err = config.validate().expect_err("a grace equal to the window");
    assert!(err.to_string().contains("tombstone_grace"), "{err}");
    config.hinted_handoff = false;
    config.validate().expect("no hints, no constraint");
    config.hinted_handoff = true;
    config.hint_window = Duration::from_secs(60);
    config.validate().expect("a shorter window");
    config.hint_delivery_rate = 0;
    assert!(config.validate().is_err(), "a zero delivery rate");
    let mut config = NodeConfig::default();
    config.hinted_handoff = false;
    config.tombstone_grace = config.sync_interval;
    let err = config
        .validate()
        .expect_err("a grace equal to the sync interval");
    assert!(err.to_string().contains("sync_interval"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn hints_for_a_replica_that_leaves_are_handed_to_the_key_s_new_replicas() {
    let mut cluster = Cluster::start(hints_only(4)).await;
    // A key on nodes 0, 1 and 2, not 3.
    let key = (0..10_000)
        .map(|k| Bytes::from(format!("key-{k}")))
        .find(|key| {
            let r = cluster.node(0).replicas_of(key);
            [1, 2, 3].iter().all(|&id| r.contains(&NodeId(id))) && !r.contains(&NodeId(4))
        })
        .expect("a key placed on nodes 0 to 2");
    // Node 0 cannot reach node 2; everyone else can, so node 2 stays alive.
    cluster.net.block(&Cluster::addr(0), &Cluster::addr(2));
    let version = cluster
        .node(0)
        .put(key.clone(), "v", quorum())
        .await
        .expect("a quorum of nodes 0 and 1");
    wait_stats(
        &cluster,
        0,
        "a hint for node 2",
        Duration::from_secs(5),
        |s| s.hints_pending == 1,
    )
    .await;
    assert_eq!(stored(&cluster, 3, &key).await, None, "not a replica yet");
    // Node 2 leaves for good before its hint could be delivered.
    cluster.shutdown(2).await;
    wait_stored(&cluster, 3, &[(key, version)], Duration::from_secs(60)).await;
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn anti_entropy_alone_brings_a_replica_that_missed_writes_up_to_date() {
    let cluster = Cluster::start(sync_only(3)).await;
    partition_node_2(&cluster);
    let written = write_around(&cluster, 50).await;
    cluster.net.heal();
    wait_stored(&cluster, 2, &written, Duration::from_secs(30)).await;
    let repairs: u64 = (0..2).map(|i| cluster.node(i).stats().sync_repairs).sum();
    assert!(repairs >= 50, "{repairs} records sent by anti-entropy");
    for i in 0..3 {
        assert_eq!(cluster.node(i).stats().reads, 0, "no read was needed");
    }
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_overflowing_log_still_converges_with_nothing_missing() {
    let mut spec = sync_only(3);
    spec.config.sync_log_capacity = NonZeroUsize::new(16).expect("non-zero");
    let cluster = Cluster::start(spec).await;
    // Let every peer's first scan (of empty stores) finish, so the log is what offers.
    tokio::time::sleep(Duration::from_secs(3)).await;
    partition_node_2(&cluster);
    let mut written = Vec::new();
    for batch in 0..10 {
        let entries: Vec<(Bytes, Bytes)> = (0..40)
            .map(|k| {
                (
                    Bytes::from(format!("key-{batch}-{k}")),
                    Bytes::from(format!("v{k}")),
                )
            })
            .collect();
        let keys: Vec<Bytes> = entries.iter().map(|(k, _)| k.clone()).collect();
        let results = cluster
            .node(batch % 2)
            .put_many(entries, quorum())
            .await
            .expect("a batch");
        for (key, r) in keys.into_iter().zip(results) {
            written.push((key, r.expect("a quorum without node 2")));
        }
    }
    cluster.net.heal();
    wait_stored(&cluster, 2, &written, Duration::from_secs(60)).await;
    let overtaken: u64 = (0..2).map(|i| cluster.node(i).stats().sync_overtaken).sum();
    let scans: u64 = (0..2).map(|i| cluster.node(i).stats().sync_scans).sum();
    assert!(
        overtaken >= 1 || scans >= 2,
        "the log of 16 entries overflowed with 400 writes: overtaken {overtaken}, scans {scans}"
    );
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn anti_entropy_offers_out_of_range_or_oversized_are_refused_with_typed_errors() {
    use chorus::envelope::Envelope;
    use chorus::replication::{REPLICA_PROTOCOL_VERSION, Refusal, ReplicaMessage, SyncEntry};
    use chorus::runtime::rpc::{RpcConfig, RpcEndpoint};
    let cluster = Cluster::start(ClusterSpec::new(4, seed())).await;
    let probe = chorus::SharedTransport::new(cluster.net.bind("probe:1").expect("bind"));
    let (client, _inbound) = RpcEndpoint::<_, Envelope>::start(probe, RpcConfig::default());
    let version = Version::new(
        chorus::Timestamp::new(chorus_tests::cluster::EPOCH_MS, 0),
        NodeId(9),
    );
    let entry = |key: &Bytes| SyncEntry {
        key: key.clone(),
        version,
    };
    let placed = |on: bool| {
        (0..10_000)
            .map(|k| Bytes::from(format!("key-{k}")))
            .find(|key| cluster.node(0).replicas_of(key).contains(&NodeId(1)) == on)
            .expect("a key")
    };
    let (mine, not_mine) = (placed(true), placed(false));
    let offer = |entries| {
        Envelope::Replica(ReplicaMessage::SyncOffer {
            version: REPLICA_PROTOCOL_VERSION,
            entries,
        })
    };
    let to = Cluster::addr(0);
    let second = Duration::from_secs(1);
    let reply = client
        .request(&to, &offer(vec![entry(&mine)]), second)
        .await
        .expect("an answer");
    assert_eq!(
        reply,
        Envelope::Replica(ReplicaMessage::SyncWant { wanted: vec![0] }),
        "a key it replicates and lacks is wanted"
    );
    let reply = client
        .request(&to, &offer(vec![entry(&mine), entry(&not_mine)]), second)
        .await
        .expect("an answer");
    assert!(
        matches!(
            reply,
            Envelope::Replica(ReplicaMessage::Refused(Refusal::OutOfRange { key_hash }))
                if key_hash == chorus::key_hash(&not_mine)
        ),
        "{reply:?}"
    );
    let too_many = vec![entry(&mine); chorus::replication::message::MAX_BATCH + 1];
    let reply = client
        .request(&to, &offer(too_many), second)
        .await
        .expect("an answer");
    assert!(
        matches!(
            reply,
            Envelope::Replica(ReplicaMessage::Refused(Refusal::Undecodable { .. }))
        ),
        "{reply:?}"
    );
    let reply = client
        .request(&to, &offer(vec![entry(&Bytes::new())]), second)
        .await
        .expect("an answer");
    assert!(
        matches!(
            reply,
            Envelope::Replica(ReplicaMessage::Refused(Refusal::Invalid { .. }))
        ),
        "{reply:?}"
    );
    assert_eq!(cluster.node(0).stats().sync_refused, 2);
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_wiped_replica_returns_to_full_replication_without_a_read() {
    let mut cluster = Cluster::start(sync_only(3)).await;
    let all = WriteOptions::default().consistency(Consistency::All);
    let mut written = Vec::new();
    for k in 0..100 {
        let key = Bytes::from(format!("key-{k}"));
        let version = cluster
            .node(k % 3)
            .put(key.clone(), format!("v{k}"), all)
            .await
            .expect("put at All");
        written.push((key, version));
    }
    // Every offer of these writes is answered (nothing wanted) before the wipe, so the log
    // alone has nothing left to offer: only the scan of a peer in a new life brings them.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let offers: u64 = (0..3).map(|i| cluster.node(i).stats().sync_offers).sum();
    assert!(offers > 0, "the writes were offered");
    cluster.kill(2).await;
    cluster.wipe(2);
    cluster.restart(2).await;
    assert_eq!(stored(&cluster, 2, b"key-0").await, None, "an empty store");
    wait_stored(&cluster, 2, &written, Duration::from_secs(60)).await;
    for i in 0..3 {
        assert_eq!(cluster.node(i).stats().reads, 0, "no read was needed");
    }
    cluster.stop().await;
}
