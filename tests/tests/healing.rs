//! Healing across the cluster: hinted handoff over the in-process network, with a partitioned
//! replica, a restarted coordinator (hints on a durable backend) and the hint store's bounds.
//! Virtual time (paused tokio clock), seeded network: set `CHORUS_SEED` to replay.

use std::num::NonZeroUsize;
use std::time::Duration;

use bytes::Bytes;
use chorus::hlc::WallClock;
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
    // Anti-entropy alone heals here; tests/tests/handoff.rs has the join's pull.
    spec.config.join_handoff = false;
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
    let repairs: u64 = (0..2)
        .map(|i| cluster.node(i).stats())
        .map(|s| s.sync_repairs + s.merkle_repairs)
        .sum();
    assert!(repairs >= 50, "{repairs} records sent by anti-entropy");
    for i in 0..3 {
        assert_eq!(cluster.node(i).stats().reads, 0, "no read was needed");
    }
    cluster.stop().await;
}

/// Twenty values of almost 1 MiB do not fit in one 16 MiB frame: the records an offer's
/// answer asks for go in several `Apply` batches (one batch failed every retry before).
#[tokio::test(start_paused = true)]
async fn anti_entropy_ships_large_values_in_batches_that_fit_a_frame() {
    let cluster = Cluster::start(sync_only(3)).await;
    partition_node_2(&cluster);
    let mut written = Vec::new();
    for k in 0..20u8 {
        let key = Bytes::from(format!("large-{k}"));
        let value = Bytes::from(vec![k; 1_000_000]);
        let version = cluster
            .node(0)
            .put(key.clone(), value, quorum())
            .await
            .expect("a quorum without node 2");
        written.push((key, version));
    }
    cluster.net.heal();
    wait_stored(&cluster, 2, &written, Duration::from_secs(60)).await;
    cluster.stop().await;
}

/// Offers go only where a copy may be missing: the coordinator offers none of the writes
/// every replica acknowledged, and a replica never offers a write back to the coordinator
/// that sent it, so in a healthy 3-node cluster each replica offers only to the third.
#[tokio::test(start_paused = true)]
async fn offers_skip_the_coordinator_and_writes_every_replica_acknowledged() {
    let mut spec = sync_only(3);
    spec.config.merkle_rebuild_interval = Duration::from_secs(24 * 3600);
    let cluster = Cluster::start(spec).await;
    // Every peer's first round (a Merkle comparison of empty stores) is over.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let offers = |i: usize| cluster.node(i).stats().sync_offers;
    let before: Vec<u64> = (0..3).map(offers).collect();
    let entries: Vec<(Bytes, Bytes)> = (0..100)
        .map(|k| (Bytes::from(format!("key-{k}")), Bytes::from("v")))
        .collect();
    let all = WriteOptions::default().consistency(Consistency::All);
    for r in cluster
        .node(0)
        .put_many(entries, all)
        .await
        .expect("a batch")
    {
        r.expect("every replica acknowledged");
    }
    // Several rounds (sync_interval is 1 s).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sent: Vec<u64> = (0..3).map(|i| offers(i) - before[i]).collect();
    assert_eq!(
        sent,
        vec![0, 1, 1],
        "seed {}: the coordinator offers nothing; each replica one offer, to the third replica",
        seed()
    );
    cluster.stop().await;
}

/// A write rate that would overtake the cursors before the next tick wakes the round early:
/// with a tick of an hour and a log of 64 entries, a replica cut off during 10 writes is
/// repaired within seconds of the 40 writes after them (the early round hands the peers it
/// has not offered to yet to a Merkle comparison, then offers), and no cursor is overtaken.
/// Without the early round nothing would heal it for an hour.
#[tokio::test(start_paused = true)]
async fn a_filling_log_starts_a_round_before_its_tick() {
    let mut spec = sync_only(3);
    spec.config.sync_interval = Duration::from_secs(3600);
    spec.config.anti_entropy_interval = Duration::from_secs(7200);
    spec.config.tombstone_grace = Duration::from_secs(2 * 24 * 3600);
    spec.config.merkle_rebuild_interval = Duration::from_secs(24 * 3600);
    spec.config.sync_log_capacity = NonZeroUsize::new(64).expect("non-zero");
    let cluster = Cluster::start(spec).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    partition_node_2(&cluster);
    let missed = write_around(&cluster, 10).await;
    cluster.net.heal();
    // Writes every replica gets fill the logs of nodes 0 (coordinator of the missed ones)
    // and 1 (which logged the missed ones as a replica): 16 entries start a round.
    for k in 0..40 {
        cluster
            .node(k % 2)
            .put(
                Bytes::from(format!("after-{k}")),
                Bytes::from("v"),
                quorum(),
            )
            .await
            .expect("a quorum");
    }
    wait_stored(&cluster, 2, &missed, Duration::from_secs(10)).await;
    let early: u64 = (0..2)
        .map(|i| cluster.node(i).stats().sync_early_rounds)
        .sum();
    let overtaken: u64 = (0..3).map(|i| cluster.node(i).stats().sync_overtaken).sum();
    assert!(early >= 1, "seed {}: no round started early", seed());
    assert_eq!(overtaken, 0, "seed {}: a cursor was overtaken", seed());
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
    let merkle: u64 = (0..2).map(|i| cluster.node(i).stats().merkle_repairs).sum();
    assert!(
        overtaken >= 1,
        "the log of 16 entries overflowed with 400 writes: overtaken {overtaken}"
    );
    assert!(
        merkle > 0,
        "the span the log lost was healed by a Merkle exchange: {merkle} records"
    );
    cluster.stop().await;
}

/// Kills node `i` and binds a probe at its address: requests from the probe come from a
/// member (`NodeId(i + 1)`, still alive or suspect in every view for the seconds a test takes;
/// the probe answers no ping). Also a probe at an address no member has.
fn impersonate(
    cluster: &Cluster,
    i: usize,
) -> (
    chorus::runtime::rpc::RpcEndpoint<chorus::SharedTransport, chorus::envelope::Envelope>,
    chorus::runtime::rpc::RpcEndpoint<chorus::SharedTransport, chorus::envelope::Envelope>,
) {
    use chorus::envelope::Envelope;
    use chorus::runtime::rpc::{RpcConfig, RpcEndpoint};
    assert!(!cluster.is_running(i), "kill node {i} first");
    let bind = |addr: chorus::Address| {
        let probe = chorus::SharedTransport::new(cluster.net.bind(addr).expect("bind"));
        // The inbound side is dropped: the probe answers nothing.
        RpcEndpoint::<_, Envelope>::start(probe, RpcConfig::default()).0
    };
    (
        bind(Cluster::addr(i)),
        bind(chorus::Address::new("stranger:1")),
    )
}

#[tokio::test(start_paused = true)]
async fn anti_entropy_offers_out_of_range_or_oversized_are_refused_with_typed_errors() {
    use chorus::envelope::Envelope;
    use chorus::replication::{REPLICA_PROTOCOL_VERSION, Refusal, ReplicaMessage, SyncEntry};
    let mut cluster = Cluster::start(ClusterSpec::new(4, seed())).await;
    // Offers to node 1 come from node 4's address (a member), or from a stranger.
    cluster.kill(3).await;
    let (client, stranger) = impersonate(&cluster, 3);
    let version = Version::new(
        chorus::Timestamp::new(chorus_tests::cluster::EPOCH_MS, 0),
        NodeId(9),
    );
    let entry = |key: &Bytes| SyncEntry {
        key: key.clone(),
        version,
    };
    let placed = |on_1: bool, on_4: bool| {
        (0..10_000)
            .map(|k| Bytes::from(format!("key-{k}")))
            .find(|key| {
                let replicas = cluster.node(0).replicas_of(key);
                replicas.contains(&NodeId(1)) == on_1 && replicas.contains(&NodeId(4)) == on_4
            })
            .expect("a key")
    };
    let (shared, not_senders, not_mine) =
        (placed(true, true), placed(true, false), placed(false, true));
    let offer = |entries| {
        Envelope::Replica(ReplicaMessage::SyncOffer {
            version: REPLICA_PROTOCOL_VERSION,
            entries,
        })
    };
    let to = Cluster::addr(0);
    let second = Duration::from_secs(1);
    let reply = client
        .request(&to, &offer(vec![entry(&shared)]), second)
        .await
        .expect("an answer");
    assert_eq!(
        reply,
        Envelope::Replica(ReplicaMessage::SyncWant { wanted: vec![0] }),
        "a key both replicate, which it lacks, is wanted"
    );
    let out_of_range = |reply: &Envelope, key: &Bytes| {
        matches!(
            reply,
            Envelope::Replica(ReplicaMessage::Refused(Refusal::OutOfRange { key_hash }))
                if *key_hash == chorus::key_hash(key)
        )
    };
    let reply = client
        .request(&to, &offer(vec![entry(&shared), entry(&not_mine)]), second)
        .await
        .expect("an answer");
    assert!(
        out_of_range(&reply, &not_mine),
        "not replicated here: {reply:?}"
    );
    // A key node 1 replicates but the sender does not: no sender of it would offer it.
    let reply = client
        .request(
            &to,
            &offer(vec![entry(&shared), entry(&not_senders)]),
            second,
        )
        .await
        .expect("an answer");
    assert!(
        out_of_range(&reply, &not_senders),
        "not replicated by the sender: {reply:?}"
    );
    let reply = stranger
        .request(&to, &offer(vec![entry(&shared)]), second)
        .await
        .expect("an answer");
    assert!(
        matches!(
            reply,
            Envelope::Replica(ReplicaMessage::Refused(Refusal::Invalid { .. }))
        ),
        "an offer from a non-member: {reply:?}"
    );
    let too_many = vec![entry(&shared); chorus::replication::message::MAX_BATCH + 1];
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
    assert_eq!(cluster.node(0).stats().sync_refused, 4);
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_wiped_replica_returns_to_full_replication_without_a_read() {
    // Without the join's pull (`sync_only`; tests/tests/handoff.rs has the wipe with it):
    // anti-entropy alone must bring the records back.
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
    // The writes are on every replica and every exchange before the wipe found the trees
    // equal, so nothing is pending: only the Merkle exchange with a peer in a new life brings
    // them back.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let exchanges: u64 = (0..3)
        .map(|i| cluster.node(i).stats().merkle_exchanges)
        .sum();
    assert!(exchanges > 0, "the trees were compared");
    cluster.kill(2).await;
    cluster.wipe(2);
    cluster.restart(2).await;
    assert_eq!(stored(&cluster, 2, b"key-0").await, None, "an empty store");
    wait_stored(&cluster, 2, &written, Duration::from_secs(60)).await;
    for i in 0..3 {
        assert_eq!(cluster.node(i).stats().reads, 0, "no read was needed");
    }
    let merkle: u64 = (0..2).map(|i| cluster.node(i).stats().merkle_repairs).sum();
    assert!(merkle >= 100, "{merkle} records sent by Merkle exchanges");
    cluster.stop().await;
}

/// [`sync_only`] with the applied-writes log silenced (its rounds an hour apart) and Merkle
/// exchanges every 2 s, so that only Merkle anti-entropy heals.
fn merkle_only(nodes: usize) -> ClusterSpec {
    let mut spec = sync_only(nodes);
    spec.config.sync_interval = Duration::from_secs(3600);
    spec.config.anti_entropy_interval = Duration::from_secs(2);
    spec
}

#[tokio::test(start_paused = true)]
async fn merkle_anti_entropy_alone_heals_a_write_that_missed_a_partitioned_replica() {
    let cluster = Cluster::start(merkle_only(3)).await;
    partition_node_2(&cluster);
    let written = write_around(&cluster, 50).await;
    cluster.net.heal();
    // Two intervals, plus the retry of an exchange the partition failed.
    wait_stored(&cluster, 2, &written, Duration::from_secs(15)).await;
    let stats: Vec<_> = (0..3).map(|i| cluster.node(i).stats()).collect();
    let merkle: u64 = stats.iter().map(|s| s.merkle_repairs).sum();
    assert!(merkle >= 50, "{merkle} records sent by Merkle exchanges");
    for s in &stats {
        assert_eq!(s.sync_repairs, 0, "the log sent nothing");
        assert_eq!(s.reads, 0, "no read was needed");
    }
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_record_changed_behind_the_tree_is_found_by_a_rebuild_and_healed() {
    let mut spec = merkle_only(3);
    spec.config.merkle_rebuild_interval = Duration::from_secs(10);
    let cluster = Cluster::start(spec).await;
    let all = WriteOptions::default().consistency(Consistency::All);
    for k in 0..20 {
        cluster
            .node(0)
            .put(format!("key-{k}"), "v", all)
            .await
            .expect("put at All");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Node 1's store gains a newer record its tree never saw (as a bit flip in a version, or
    // a write that bypassed the apply path, would): the trees still agree.
    let version = Version::new(
        chorus::Timestamp::new(cluster.clocks[1].now_ms(), 0),
        NodeId(2),
    );
    let record = Record::value("changed", version);
    cluster
        .storage(1)
        .apply(Bytes::from_static(b"key-3"), record.clone())
        .await
        .expect("apply");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_ne!(
        stored(&cluster, 0, b"key-3").await,
        Some(record.clone()),
        "seed {}: before a rebuild the trees agree",
        seed()
    );
    wait_stats(
        &cluster,
        1,
        "a corrected leaf",
        Duration::from_secs(30),
        |s| s.merkle_rebuild_corrected >= 1,
    )
    .await;
    wait_stored(
        &cluster,
        0,
        &[(Bytes::from_static(b"key-3"), version)],
        Duration::from_secs(10),
    )
    .await;
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn replicas_that_purge_at_different_moments_agree_and_nothing_comes_back() {
    let mut spec = merkle_only(3);
    spec.config.tombstone_grace = Duration::from_secs(120);
    spec.config.sync_interval = Duration::from_secs(60);
    spec.config.merkle_rebuild_interval = Duration::from_secs(5);
    let cluster = Cluster::start(spec).await;
    let all = WriteOptions::default().consistency(Consistency::All);
    for k in 0..40 {
        cluster
            .node(0)
            .put(format!("key-{k}"), "v", all)
            .await
            .expect("put at All");
    }
    for k in 0..20 {
        cluster
            .node(0)
            .delete(format!("key-{k}"), all)
            .await
            .expect("delete at All");
    }
    // Past the grace and the horizon's rounding, node 0 alone purges its tombstones (its
    // own purge runs hourly; this one bypasses the tree, as any purge does).
    tokio::time::sleep(Duration::from_secs(200)).await;
    let before: Vec<_> = (0..3).map(|i| cluster.node(i).stats()).collect();
    let purged = cluster
        .storage(0)
        .purge(cluster.clocks[0].now_ms(), Duration::from_secs(120))
        .await
        .expect("purge");
    assert_eq!(purged.tombstones, 20);
    // Node 0's next rebuild (every 5 s) takes the tombstones out of its tree; for several
    // exchange intervals the trees differ, the digests at the agreed horizon do not.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let after: Vec<_> = (0..3).map(|i| cluster.node(i).stats()).collect();
    assert!(
        after[0].merkle_rebuild_corrected > before[0].merkle_rebuild_corrected,
        "seed {}: node 0's tree lost the purged tombstones",
        seed()
    );
    let checked = |s: &[chorus::runtime::node::NodeStats]| -> u64 {
        s.iter().map(|s| s.merkle_leaves_checked).sum()
    };
    assert!(
        checked(&after) > checked(&before),
        "seed {}: the differing leaves were checked at the horizon",
        seed()
    );
    for i in 0..3 {
        assert!(
            after[i].merkle_exchanges > before[i].merkle_exchanges,
            "seed {}: node {i} kept comparing",
            seed()
        );
        assert_eq!(
            after[i].merkle_leaves_differing,
            before[i].merkle_leaves_differing,
            "seed {}: node {i} found no leaf differing at the horizon",
            seed()
        );
        assert_eq!(after[i].merkle_repairs, before[i].merkle_repairs);
    }
    for k in 0..20 {
        let key = format!("key-{k}");
        assert_eq!(
            stored(&cluster, 0, key.as_bytes()).await,
            None,
            "stays purged"
        );
    }
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn merkle_requests_past_the_bounds_or_outside_shared_ranges_are_refused_and_counted() {
    use chorus::envelope::Envelope;
    use chorus::replication::{REPLICA_PROTOCOL_VERSION, Refusal, ReplicaMessage};
    let mut cluster = Cluster::start(ClusterSpec::new(5, seed())).await;
    // Requests to node 1 come from node 4's address (a member), or from a stranger.
    cluster.kill(3).await;
    let (client, stranger) = impersonate(&cluster, 3);
    let to = Cluster::addr(0);
    let second = Duration::from_secs(1);
    let ask = |m| Envelope::Replica(m);
    let nodes = |level, indices: Vec<u32>| {
        ask(ReplicaMessage::MerkleNodes {
            version: REPLICA_PROTOCOL_VERSION,
            level,
            deltas: chorus::replication::message::delta_encode(&indices),
        })
    };
    let reply = client
        .request(&to, &nodes(0, vec![0]), second)
        .await
        .expect("an answer");
    assert!(
        matches!(&reply, Envelope::Replica(ReplicaMessage::MerkleDigests { digests }) if digests.len() == 1),
        "the root's digest"
    );
    let invalid = |reply: &Envelope| {
        matches!(
            reply,
            Envelope::Replica(ReplicaMessage::Refused(Refusal::Invalid { .. }))
        )
    };
    let short = |reply: &Envelope| format!("{reply:?}").chars().take(200).collect::<String>();
    let overflow = ask(ReplicaMessage::MerkleNodes {
        version: REPLICA_PROTOCOL_VERSION,
        level: 3,
        deltas: vec![u32::MAX, 1],
    });
    for bad in [nodes(4, vec![0]), nodes(1, vec![64]), overflow] {
        let reply = client.request(&to, &bad, second).await.expect("an answer");
        assert!(invalid(&reply), "{}", short(&reply));
    }
    let reply = client
        .request(&to, &nodes(3, vec![0; 4097]), second)
        .await
        .expect("an answer");
    assert!(
        matches!(
            reply,
            Envelope::Replica(ReplicaMessage::Refused(Refusal::Undecodable { .. }))
        ),
        "more than the decoder's bound: {}",
        short(&reply)
    );
    let check = |from, leaves: Vec<u32>| {
        let digests = vec![chorus::storage::RangeDigest::default(); leaves.len()];
        ask(ReplicaMessage::MerkleCheck {
            version: REPLICA_PROTOCOL_VERSION,
            from,
            cutoff_ms: 0,
            leaves,
            digests,
        })
    };
    let reply = client
        .request(&to, &check(NodeId(4), vec![5, 3]), second)
        .await
        .expect("an answer");
    assert!(invalid(&reply), "unordered leaves: {}", short(&reply));
    let reply = client
        .request(&to, &check(NodeId(4), (0..1025).collect()), second)
        .await
        .expect("an answer");
    assert!(invalid(&reply), "too many leaves: {}", short(&reply));
    // In five nodes with N = 3, node 1 and node 4 share only part of the ring: a leaf
    // wholly outside it is refused.
    use chorus::healing::exchange::{Coverage, Share};
    let ring = chorus::Ring::new(
        (1..=5).map(|id| chorus::RingMember::new(NodeId(id))),
        chorus::RingConfig::default(),
    )
    .expect("a ring");
    let n = NonZeroUsize::new(3).expect("non-zero");
    let coverage = Coverage::new(&ring.shared_ranges(NodeId(1), NodeId(4), n));
    let outside = (0..chorus::healing::merkle::LEAVES)
        .find(|&leaf| coverage.of(3, leaf) == Share::None)
        .expect("a leaf outside");
    let reply = client
        .request(&to, &check(NodeId(4), vec![outside]), second)
        .await
        .expect("an answer");
    assert!(
        matches!(
            reply,
            Envelope::Replica(ReplicaMessage::Refused(Refusal::OutOfRange { .. }))
        ),
        "{}",
        short(&reply)
    );
    // What is shared is the sender's, never the `from` a check names: node 4 naming node 2,
    // for a leaf node 1 shares with node 2 and not with node 4, is refused, not compared.
    let with_2 = Coverage::new(&ring.shared_ranges(NodeId(1), NodeId(2), n));
    let only_with_2 = (0..chorus::healing::merkle::LEAVES)
        .find(|&leaf| coverage.of(3, leaf) == Share::None && with_2.of(3, leaf) != Share::None)
        .expect("a leaf shared with node 2 only");
    let reply = client
        .request(&to, &check(NodeId(2), vec![only_with_2]), second)
        .await
        .expect("an answer");
    assert!(
        invalid(&reply),
        "a check naming another member: {}",
        short(&reply)
    );
    let reply = stranger
        .request(&to, &check(NodeId(2), vec![only_with_2]), second)
        .await
        .expect("an answer");
    assert!(
        invalid(&reply),
        "a check from a non-member: {}",
        short(&reply)
    );
    // Its own id, for a leaf the two share: compared.
    let inside = (0..chorus::healing::merkle::LEAVES)
        .find(|&leaf| coverage.of(3, leaf) == Share::Full)
        .expect("a leaf shared with node 4");
    let reply = client
        .request(&to, &check(NodeId(4), vec![inside]), second)
        .await
        .expect("an answer");
    assert!(
        matches!(
            &reply,
            Envelope::Replica(ReplicaMessage::MerkleDiffer { .. })
        ),
        "{}",
        short(&reply)
    );
    assert_eq!(cluster.node(0).stats().merkle_refused, 8);
    cluster.stop().await;
}

/// The ranges `id` replicates in a ring of members `1..=members` (what every node's view
/// holds once the cluster settled), N = 3.
fn ranges_of(members: u64, id: u64) -> Vec<chorus::HashRange> {
    let ring = chorus::Ring::new(
        (1..=members).map(|m| chorus::RingMember::new(NodeId(m))),
        chorus::RingConfig::default(),
    )
    .expect("a ring");
    let n = NonZeroUsize::new(3).expect("non-zero");
    ring.shared_ranges(NodeId(id), NodeId(id), n)
}

fn pull(range: chorus::HashRange) -> chorus::envelope::Envelope {
    chorus::envelope::Envelope::Replica(chorus::replication::ReplicaMessage::Pull {
        version: chorus::replication::REPLICA_PROTOCOL_VERSION,
        range,
        cursor: None,
        limit: 4096,
        cutoff_ms: 0,
    })
}

/// Writes `count` keys of `value_len` bytes through node 0 at quorum.
async fn write_values(cluster: &Cluster, count: usize, value_len: usize) {
    for k in 0..count {
        cluster
            .node(0)
            .put(format!("key-{k}"), vec![b'v'; value_len], quorum())
            .await
            .expect("put");
    }
}

#[tokio::test(start_paused = true)]
async fn pulls_of_ranges_the_puller_will_not_replicate_or_from_strangers_are_refused() {
    use chorus::envelope::Envelope;
    use chorus::replication::{Refusal, ReplicaMessage};
    let mut cluster = Cluster::start(ClusterSpec::new(4, seed())).await;
    write_values(&cluster, 200, 16).await;
    cluster.kill(3).await;
    let (client, stranger) = impersonate(&cluster, 3);
    let to = Cluster::addr(0);
    let second = Duration::from_secs(1);
    let mine = ranges_of(4, 4);
    let mut pulled = 0;
    for &range in &mine {
        match client.request(&to, &pull(range), second).await {
            Ok(Envelope::Replica(ReplicaMessage::PulledRecords { records, .. })) => {
                assert!(
                    records
                        .iter()
                        .all(|w| range.contains(chorus::key_hash(&w.key))),
                    "records of the range"
                );
                pulled += records.len();
            }
            other => panic!("seed {}: a range node 4 replicates: {other:?}", seed()),
        }
    }
    assert!(pulled > 0, "node 1 holds some of what node 4 replicates");
    // With four members and N = 3 nobody replicates the whole ring: a member asking for it
    // (or for any range reaching past its own) is refused before anything is read.
    let reply = client
        .request(&to, &pull(chorus::HashRange::FULL), second)
        .await
        .expect("an answer");
    assert!(
        matches!(
            reply,
            Envelope::Replica(ReplicaMessage::Refused(Refusal::OutOfRange { .. }))
        ),
        "the whole ring: {}",
        format!("{reply:?}").chars().take(200).collect::<String>()
    );
    let reply = stranger
        .request(&to, &pull(mine[0]), second)
        .await
        .expect("an answer");
    assert!(
        matches!(
            reply,
            Envelope::Replica(ReplicaMessage::Refused(Refusal::Invalid { .. }))
        ),
        "a pull from a non-member: {reply:?}"
    );
    let stats = cluster.node(0).stats();
    assert_eq!(stats.pulls_refused, 2, "{stats:?}");
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn healing_requests_past_the_concurrency_bound_are_answered_busy_and_reads_are_not() {
    use chorus::envelope::Envelope;
    use chorus::replication::{Refusal, ReplicaMessage};
    // No anti-entropy or hints of the nodes' own: the probe's requests are all node 1 serves.
    let mut spec = ClusterSpec::new(4, seed());
    spec.config.anti_entropy = false;
    spec.config.hinted_handoff = false;
    let mut cluster = Cluster::start(spec).await;
    write_values(&cluster, 50, 16).await;
    cluster.kill(3).await;
    let (client, _stranger) = impersonate(&cluster, 3);
    let to = Cluster::addr(0);
    let timeout = Duration::from_secs(10);
    let range = ranges_of(4, 4)[0];
    // Each scan takes half a second: six pulls at once overlap.
    cluster.set_scan_delay(0, Duration::from_millis(500));
    let read = Envelope::Replica(ReplicaMessage::read_one("key-0"));
    let p = pull(range);
    let ask = || client.request(&to, &p, timeout);
    let (a, b, c, d, e, f, read_answer) = tokio::join!(
        ask(),
        ask(),
        ask(),
        ask(),
        ask(),
        ask(),
        client.request(&to, &read, timeout)
    );
    let answers = [a, b, c, d, e, f];
    let served = answers
        .iter()
        .filter(|a| {
            matches!(
                a,
                Ok(Envelope::Replica(ReplicaMessage::PulledRecords { .. }))
            )
        })
        .count();
    let busy = answers
        .iter()
        .filter(|a| {
            matches!(
                a,
                Ok(Envelope::Replica(ReplicaMessage::Refused(Refusal::Busy)))
            )
        })
        .count();
    assert_eq!((served, busy), (4, 2), "seed {}: {answers:?}", seed());
    assert!(
        matches!(
            read_answer,
            Ok(Envelope::Replica(ReplicaMessage::Records { .. }))
        ),
        "a read is never refused as busy: {read_answer:?}"
    );
    assert_eq!(cluster.node(0).stats().healing_busy, 2);
    // The permits came back with the answers.
    let again = client.request(&to, &pull(range), timeout).await;
    assert!(
        matches!(
            again,
            Ok(Envelope::Replica(ReplicaMessage::PulledRecords { .. }))
        ),
        "{again:?}"
    );
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn pull_pages_served_come_out_of_the_healing_bandwidth() {
    use chorus::envelope::Envelope;
    use chorus::replication::{Refusal, ReplicaMessage};
    let mut spec = ClusterSpec::new(4, seed());
    spec.config.anti_entropy = false;
    spec.config.hinted_handoff = false;
    // One second's budget is 8 KiB; node 1 holds about 75 KiB of what node 4 replicates.
    spec.config.anti_entropy_bandwidth = std::num::NonZeroU64::new(8 * 1024).expect("non-zero");
    let mut cluster = Cluster::start(spec).await;
    write_values(&cluster, 100, 1024).await;
    cluster.kill(3).await;
    let (client, _stranger) = impersonate(&cluster, 3);
    let to = Cluster::addr(0);
    let second = Duration::from_secs(1);
    let mut bytes = 0u64;
    let mut refused = None;
    for range in ranges_of(4, 4) {
        match client.request(&to, &pull(range), second).await {
            Ok(Envelope::Replica(ReplicaMessage::PulledRecords { records, .. })) => {
                bytes += records
                    .iter()
                    .map(|w| chorus::storage::footprint(&w.key, &w.record))
                    .sum::<u64>();
            }
            Ok(Envelope::Replica(ReplicaMessage::Refused(Refusal::Busy))) => {
                refused = Some(range);
                break;
            }
            other => panic!("seed {}: {other:?}", seed()),
        }
    }
    let range =
        refused.unwrap_or_else(|| panic!("seed {}: {bytes} bytes served, never busy", seed()));
    assert!(
        bytes > 8 * 1024,
        "busy only once the budget was spent: {bytes} bytes served"
    );
    assert_eq!(cluster.node(0).stats().healing_busy, 1);
    // The budget refills (8 bytes a millisecond): the same pull is served once the debt is
    // paid (soon enough that the members still count node 4 in).
    tokio::time::sleep(Duration::from_millis(
        (bytes - 8 * 1024) * 1000 / (8 * 1024) + 50,
    ))
    .await;
    let again = client.request(&to, &pull(range), second).await;
    assert!(
        matches!(
            again,
            Ok(Envelope::Replica(ReplicaMessage::PulledRecords { .. }))
        ),
        "{again:?}"
    );
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_merkle_exchange_answered_busy_is_put_off_not_failed_and_heals_later() {
    // Node 1 misses writes, then its scans take 10 s (ten request timeouts): the leaf checks
    // its co-replicas send it time out, and the scans they started hold its healing permits
    // until it has none free and answers `Busy`. Then its scans are fast again.
    let cluster = Cluster::start(merkle_only(5)).await;
    let others: Vec<_> = (1..5).map(Cluster::addr).collect();
    cluster.net.partition(&[Cluster::addr(0)], &others);
    let mut written = Vec::new();
    for k in 0..100 {
        let key = Bytes::from(format!("key-{k}"));
        let version = cluster
            .node(1)
            .put(key.clone(), format!("v{k}"), quorum())
            .await
            .expect("a quorum without node 1");
        if cluster.node(1).replicas_of(&key).contains(&NodeId(1)) {
            written.push((key, version));
        }
    }
    cluster.set_scan_delay(0, Duration::from_secs(10));
    cluster.net.heal();
    let deferred = |c: &Cluster| {
        (1..5)
            .map(|i| c.node(i).stats().healing_deferred)
            .sum::<u64>()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while deferred(&cluster) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "seed {}: never busy: {:?}",
            seed(),
            cluster.node(0).stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.set_scan_delay(0, Duration::ZERO);
    wait_stored(&cluster, 0, &written, Duration::from_secs(120)).await;
    // Every `Busy` node 1 answered, its co-replicas took for "later".
    let busy = cluster.node(0).stats().healing_busy;
    assert!(busy > 0);
    assert_eq!(deferred(&cluster), busy);
    cluster.stop().await;
}
