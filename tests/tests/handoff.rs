//! Data handoff when ownership changes: a dead member's ranges re-replicated by the
//! survivors at once, and a graceful leave that streams the leaving node's data to the new
//! owners first. Replicas' storage is read directly (a read through a node would repair).
//! Virtual time (paused tokio clock), seeded network: set `CHORUS_SEED` to replay.

use std::time::Duration;

use bytes::Bytes;
use chorus::{Consistency, NodeId, Storage, Version, WriteOptions};
use chorus_tests::cluster::{Cluster, ClusterSpec};
use chorus_tests::runner::seed;

/// Writes `count` keys at `All`, coordinated by each running node in turn.
async fn write_all(cluster: &Cluster, count: usize) -> Vec<(Bytes, Version)> {
    let all = WriteOptions::default().consistency(Consistency::All);
    let running: Vec<usize> = (0..cluster.len())
        .filter(|&i| cluster.is_running(i))
        .collect();
    let mut written = Vec::new();
    for k in 0..count {
        let key = Bytes::from(format!("key-{k}"));
        let version = cluster
            .node(running[k % running.len()])
            .put(key.clone(), format!("v{k}"), all)
            .await
            .unwrap_or_else(|e| panic!("seed {}: put at All: {e}", seed()));
        written.push((key, version));
    }
    written
}

/// The keys (of `written`) that node `i` (0-based) does not store at their version.
async fn missing_on(cluster: &Cluster, i: usize, written: &[(Bytes, Version)]) -> Vec<Bytes> {
    let mut missing = Vec::new();
    for (key, version) in written {
        let got = cluster.storage(i).get(key).await.expect("storage get");
        if got.map(|r| r.version) != Some(*version) {
            missing.push(key.clone());
        }
    }
    missing
}

/// Waits (virtual time) until every key of `written` is stored at its version on each of its
/// replicas in node `via`'s ring, reading storage only; panics with what is missing after
/// `limit`.
async fn wait_on_replicas(
    cluster: &Cluster,
    via: usize,
    written: &[(Bytes, Version)],
    limit: Duration,
) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut missing = Vec::new();
        for (key, version) in written {
            for NodeId(id) in cluster.node(via).replicas_of(key) {
                let i = id as usize - 1;
                let got = cluster.storage(i).get(key).await.expect("storage get");
                if got.map(|r| r.version) != Some(*version) {
                    missing.push((key.clone(), i));
                }
            }
        }
        if missing.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "seed {}: {} (key, node) pairs still missing after {limit:?}: {:?}",
            seed(),
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `nodes` nodes whose periodic anti-entropy (Merkle exchanges and the applied-writes log's
/// offers) runs an hour apart, and without hints, so that only what a ring change triggers
/// can move data within a test's bound.
fn slow_anti_entropy(nodes: usize) -> ClusterSpec {
    let mut spec = ClusterSpec::new(nodes, seed());
    spec.config.anti_entropy_interval = Duration::from_secs(3600);
    spec.config.sync_interval = Duration::from_secs(3600);
    spec.config.hinted_handoff = false;
    spec
}

/// Waits (virtual time) until the exchanges every node starts with (each peer first seen,
/// and the retries of those that met a peer not yet aware of it) are over: each node has
/// completed one with every peer and none for longer than a failed one's retry. Only a ring
/// change can start another within the hour.
async fn wait_for_quiet_exchanges(cluster: &Cluster) {
    let quiet = Duration::from_secs(6);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let count = |c: &Cluster| -> Vec<u64> {
        (0..c.len())
            .map(|i| c.node(i).stats().merkle_exchanges)
            .collect()
    };
    loop {
        let before = count(cluster);
        tokio::time::sleep(quiet).await;
        let after = count(cluster);
        let peers = cluster.len() as u64 - 1;
        if before == after && after.iter().all(|&n| n >= peers) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "seed {}: start-up exchanges still running: {after:?}",
            seed()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_dead_member_s_ranges_reach_their_new_replicas_without_waiting_for_the_interval() {
    let mut cluster = Cluster::start(slow_anti_entropy(4)).await;
    wait_for_quiet_exchanges(&cluster).await;
    let written = write_all(&cluster, 200).await;
    // Node 4 held about three quarters of the keys; the survivors must push those to the
    // replica that takes its place.
    let held_by_4 = written.len() - missing_on(&cluster, 3, &written).await.len();
    assert!(
        held_by_4 > 0 && held_by_4 < written.len(),
        "node 4 held {held_by_4}"
    );
    let before: Vec<_> = (0..3).map(|i| cluster.node(i).stats()).collect();
    cluster.kill(3).await;
    cluster.wait_for_ring(Duration::from_secs(30)).await;
    wait_on_replicas(&cluster, 0, &written, Duration::from_secs(30)).await;
    let gained: u64 = (0..3)
        .map(|i| cluster.node(i).stats().merkle_ring_changes - before[i].merkle_ring_changes)
        .sum();
    assert!(gained > 0, "the ring change asked for exchanges");
    for i in 0..3 {
        assert_eq!(cluster.node(i).stats().reads, 0, "no read was needed");
    }
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_graceful_leave_streams_its_records_to_their_new_replicas_before_it_goes() {
    // No anti-entropy at all: only the leave's own streaming can move the records.
    let mut spec = ClusterSpec::new(4, seed());
    spec.config.anti_entropy = false;
    let mut cluster = Cluster::start(spec).await;
    let written = write_all(&cluster, 200).await;
    let leaving = cluster.node(3).clone();
    cluster.shutdown(3).await;
    // Nothing else moves records here (no anti-entropy, no hints, no reads): once the
    // survivors' rings drop node 4, every key is already on its new replicas.
    cluster.wait_for_ring(Duration::from_secs(10)).await;
    wait_on_replicas(&cluster, 0, &written, Duration::ZERO).await;
    let stats = leaving.stats();
    let held = written.len() - missing_on(&cluster, 3, &written).await.len();
    assert_eq!(stats.leave_handed_off, held as u64, "{stats:?}");
    assert_eq!(stats.leave_handoff_failed, 0, "{stats:?}");
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn records_a_leave_cannot_hand_off_are_counted_and_the_shutdown_stays_bounded() {
    let mut spec = ClusterSpec::new(4, seed());
    spec.config.anti_entropy = false;
    spec.config.handoff_timeout = Duration::from_secs(3);
    let mut cluster = Cluster::start(spec).await;
    let written = write_all(&cluster, 100).await;
    let leaving = cluster.node(3).clone();
    let held = written.len() - missing_on(&cluster, 3, &written).await.len();
    // Cut off before its peers notice: they are alive in its view, and every batch to them
    // goes unanswered.
    cluster.net.partition(
        &[Cluster::addr(3)],
        &[Cluster::addr(0), Cluster::addr(1), Cluster::addr(2)],
    );
    let started = tokio::time::Instant::now();
    cluster.shutdown(3).await;
    let took = started.elapsed();
    let bound = Duration::from_secs(3) + leaving.config().shutdown_timeout;
    assert!(took <= bound, "seed {}: shutdown took {took:?}", seed());
    let stats = leaving.stats();
    assert_eq!(stats.leave_handed_off, 0, "{stats:?}");
    assert_eq!(stats.leave_handoff_failed, held as u64, "{stats:?}");
    cluster.net.heal();
    cluster.stop().await;
}

/// The running nodes whose storage holds `key`, at any version (0-based). A node that left
/// or died keeps its store (memory) but holds nothing for the cluster.
async fn holders(cluster: &Cluster, key: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    for i in (0..cluster.len()).filter(|&i| cluster.is_running(i)) {
        if cluster
            .storage(i)
            .get(key)
            .await
            .expect("storage get")
            .is_some()
        {
            out.push(i);
        }
    }
    out
}

/// Waits (virtual time) until every key of `latest` is stored on exactly its replicas in
/// node `via`'s ring, each at the key's latest version, and nowhere else; panics with what
/// is off after `limit`.
async fn wait_exactly_on_replicas(
    cluster: &Cluster,
    via: usize,
    latest: &[(Bytes, Version)],
    limit: Duration,
) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut off = Vec::new();
        for (key, version) in latest {
            let mut replicas: Vec<usize> = cluster
                .node(via)
                .replicas_of(key)
                .into_iter()
                .map(|NodeId(id)| id as usize - 1)
                .collect();
            replicas.sort_unstable();
            let held = holders(cluster, key).await;
            let mut stale = Vec::new();
            for &i in &replicas {
                let got = cluster.storage(i).get(key).await.expect("storage get");
                if got.map(|r| r.version) != Some(*version) {
                    stale.push(i);
                }
            }
            if held != replicas || !stale.is_empty() {
                off.push((key.clone(), replicas, held, stale));
            }
        }
        if off.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "seed {}: {} keys not on exactly their replicas after {limit:?} (key, replicas, \
             holders, replicas without the latest version): {:?}",
            seed(),
            off.len(),
            &off[..off.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn after_a_join_and_the_settle_delay_every_key_is_on_exactly_its_n_replicas() {
    // N = 2 of 3 nodes, so a fourth one really takes ranges away from the others.
    let mut spec = ClusterSpec::new(3, seed());
    spec.config.replication_factor = std::num::NonZeroUsize::new(2).expect("two");
    spec.config.ownership_settle = Duration::from_secs(5);
    let mut cluster = Cluster::start(spec).await;
    let mut latest = write_all(&cluster, 300).await;
    let copies: usize = {
        let mut n = 0;
        for (key, _) in &latest {
            n += holders(&cluster, key).await.len();
        }
        n
    };
    assert_eq!(
        copies,
        2 * latest.len(),
        "two copies of each key before the join"
    );
    let before: Vec<_> = (0..3).map(|i| cluster.node(i).stats()).collect();

    // An empty node with seeds joins by pulling its ranges; the ring with it settles (and
    // the ring from before it stops being a write set) before any cleanup round is due.
    let joined = cluster.add_node().await;
    assert!(
        cluster.node(joined).is_joining(),
        "the newcomer pulls first"
    );
    cluster.wait_for_ring(Duration::from_secs(30)).await;
    let join = cluster.node(joined).stats();
    assert_eq!(join.joins_completed, 1, "{join:?}");
    assert_eq!(join.join_incomplete, 0, "{join:?}");
    assert!(join.join_pulled > 0, "{join:?}");
    assert!(
        (0..3).all(|i| cluster.node(i).stats().cleanup_removed == before[i].cleanup_removed),
        "nothing is removed before ownership_settle"
    );
    // Writes go on while the ring settles: overwrites through every node, old and new,
    // must survive the cleanup that follows.
    let quorum = WriteOptions::default().consistency(Consistency::Quorum);
    for (k, (key, version)) in latest.iter_mut().enumerate().filter(|(k, _)| k % 3 == 0) {
        *version = cluster
            .node(k % cluster.len())
            .put(key.clone(), format!("v{k}-after-the-join"), quorum)
            .await
            .unwrap_or_else(|e| panic!("seed {}: put during the settle delay: {e}", seed()));
    }
    let moved = {
        let mut n = 0;
        for (key, _) in &latest {
            n += usize::from(cluster.node(0).replicas_of(key).contains(&NodeId(4)));
        }
        n
    };
    assert!(
        moved > 0 && moved < latest.len(),
        "the newcomer took {moved} keys"
    );
    wait_exactly_on_replicas(&cluster, 0, &latest, Duration::from_secs(120)).await;

    let removed: u64 = (0..3)
        .map(|i| cluster.node(i).stats().cleanup_removed - before[i].cleanup_removed)
        .sum();
    assert_eq!(
        removed, moved as u64,
        "each key the newcomer took was removed from the one node that lost it"
    );
    assert_eq!(
        cluster.node(joined).stats().cleanup_removed,
        0,
        "the newcomer lost nothing"
    );
    let read = chorus::ReadOptions::default().consistency(Consistency::Quorum);
    for (k, (key, version)) in latest.iter().enumerate() {
        let got = cluster
            .node(k % cluster.len())
            .get_versioned(key.clone(), read)
            .await
            .unwrap_or_else(|e| panic!("seed {}: quorum read: {e}", seed()))
            .unwrap_or_else(|| panic!("seed {}: {key:?} lost", seed()));
        assert_eq!(got.version, *version, "{key:?}: not the latest write");
    }
    cluster.stop().await;
}

/// Node `i`'s records of `written` it replicates in node `via`'s read ring that it does not
/// store at their version.
async fn owned_but_missing(
    cluster: &Cluster,
    via: usize,
    i: usize,
    written: &[(Bytes, Version)],
) -> Vec<Bytes> {
    let id = NodeId(i as u64 + 1);
    let mut missing = Vec::new();
    for (key, version) in written {
        if !cluster.node(via).replicas_of(key).contains(&id) {
            continue;
        }
        let got = cluster.storage(i).get(key).await.expect("storage get");
        if got.map(|r| r.version) != Some(*version) {
            missing.push(key.clone());
        }
    }
    missing
}

#[tokio::test(start_paused = true)]
async fn a_joining_node_pulls_its_ranges_and_serves_no_read_before_it_holds_them() {
    // Only the pull can bring node 5 what was written before it joined, and only the
    // writes themselves what was written during the join: no anti-entropy (which would
    // compare trees with it once it settles), no hints. The bandwidth limit (which the pull
    // uses) stretches the pull over seconds, so that writes land in ranges already pulled.
    let mut spec = slow_anti_entropy(5);
    spec.config.anti_entropy = false;
    spec.config.anti_entropy_bandwidth = std::num::NonZeroU64::new(8 * 1024).unwrap();
    let mut cluster = Cluster::start_first(spec, 4).await;
    let mut written = write_all(&cluster, 1500).await;
    cluster.join(4).await;
    let joiner = cluster.node(4).clone();
    assert!(
        joiner.is_joining(),
        "an empty node with seeds joins by pulling"
    );
    // Writes and quorum reads go on during the join; every read sees the last write, and
    // the joiner answers none of them.
    let quorum = WriteOptions::default().consistency(Consistency::Quorum);
    let mut step = 0usize;
    while joiner.is_joining() {
        assert!(
            step < 5_000,
            "seed {}: still joining: {:?}",
            seed(),
            joiner.stats()
        );
        let k = step % written.len();
        let key = written[k].0.clone();
        let version = cluster
            .node(step % 4)
            .put(key.clone(), format!("during-{step}"), quorum)
            .await
            .unwrap_or_else(|e| panic!("seed {}: put during the join: {e}", seed()));
        written[k].1 = version;
        let got = cluster
            .node((step + 1) % 4)
            .get_versioned(key.clone(), Default::default())
            .await
            .unwrap_or_else(|e| panic!("seed {}: get during the join: {e}", seed()))
            .map(|v| v.version);
        assert_eq!(got, Some(version), "seed {}: stale read of {key:?}", seed());
        assert_eq!(joiner.stats().replica_reads, 0, "the joiner served a read");
        step += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.wait_for_ring(Duration::from_secs(30)).await;
    let stats = joiner.stats();
    assert_eq!(stats.joins_completed, 1, "{stats:?}");
    assert_eq!(stats.join_incomplete, 0, "{stats:?}");
    assert!(stats.join_pulled > 0, "{stats:?}");
    // Everything the joiner now replicates, it holds: the old records by the pull, the new
    // ones as a write target during the join.
    let missing = owned_but_missing(&cluster, 0, 4, &written).await;
    assert!(
        missing.is_empty(),
        "seed {}: node 5 lacks {} of its keys: {:?}",
        seed(),
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    for (key, version) in &written {
        let got = cluster
            .node(4)
            .get_versioned(key.clone(), Default::default())
            .await
            .expect("get after the join")
            .map(|v| v.version);
        assert_eq!(got, Some(*version), "seed {}: {key:?}", seed());
    }
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn records_a_new_replica_did_not_acknowledge_stay_until_a_retry_hands_them_off() {
    let mut spec = ClusterSpec::new(3, seed());
    spec.config.replication_factor = std::num::NonZeroUsize::new(2).expect("two");
    spec.config.ownership_settle = Duration::from_secs(5);
    let mut cluster = Cluster::start(spec).await;
    let latest = write_all(&cluster, 200).await;
    let mut held_by_1 = Vec::new();
    for (key, _) in &latest {
        if holders(&cluster, key).await.contains(&0) {
            held_by_1.push(key.clone());
        }
    }
    let joined = cluster.add_node().await;
    cluster.wait_for_ring(Duration::from_secs(30)).await;
    // Node 1's requests to the newcomer are lost; membership still sees it alive (the other
    // members relay node 1's probes), so it stays a replica node 1 must reach.
    cluster.net.block(&Cluster::addr(0), &Cluster::addr(joined));
    let lost_to_newcomer: Vec<Bytes> = held_by_1
        .iter()
        .filter(|key| {
            let replicas = cluster.node(0).replicas_of(key);
            replicas.contains(&NodeId(4)) && !replicas.contains(&NodeId(1))
        })
        .cloned()
        .collect();
    assert!(
        !lost_to_newcomer.is_empty(),
        "node 1 lost keys to the newcomer"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while cluster.node(0).stats().cleanup_kept == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "seed {}: no cleanup round kept anything: {:?}",
            seed(),
            cluster.node(0).stats()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for key in &lost_to_newcomer {
        assert!(
            holders(&cluster, key).await.contains(&0),
            "seed {}: {key:?} removed from node 1 though the newcomer never acknowledged it",
            seed()
        );
    }
    cluster
        .net
        .unblock(&Cluster::addr(0), &Cluster::addr(joined));
    wait_exactly_on_replicas(&cluster, 0, &latest, Duration::from_secs(120)).await;
    let stats = cluster.node(0).stats();
    assert!(stats.cleanup_rounds >= 2, "a retry ran: {stats:?}");
    assert!(
        stats.cleanup_removed >= lost_to_newcomer.len() as u64,
        "{stats:?}"
    );
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn copies_a_restart_forgot_to_clean_are_found_by_the_sweep() {
    // N = 2 of 3 nodes; node 1 loses ranges to a newcomer and restarts before its cleanup
    // round is due. The restarted node never sees the loss (its first ring already holds
    // the newcomer): only the sweep of the ranges it does not replicate finds the copies.
    let mut spec = ClusterSpec::new(3, seed());
    spec.config.replication_factor = std::num::NonZeroUsize::new(2).expect("two");
    spec.config.ownership_settle = Duration::from_secs(5);
    let mut cluster = Cluster::start(spec).await;
    let latest = write_all(&cluster, 300).await;
    let joined = cluster.add_node().await;
    cluster.wait_for_ring(Duration::from_secs(30)).await;
    assert_eq!(
        cluster.node(0).stats().cleanup_removed,
        0,
        "no round ran yet"
    );
    cluster.kill(0).await;
    cluster.restart(0).await;
    cluster.wait_for_ring(Duration::from_secs(30)).await;
    let orphans = {
        let mut n = 0;
        for (key, _) in &latest {
            let replicas = cluster.node(0).replicas_of(key);
            n += usize::from(
                !replicas.contains(&NodeId(1)) && holders(&cluster, key).await.contains(&0),
            );
        }
        n
    };
    assert!(orphans > 0, "node 1 kept copies of ranges it lost");
    wait_exactly_on_replicas(&cluster, 0, &latest, Duration::from_secs(120)).await;
    assert!(
        cluster.node(0).stats().cleanup_removed >= orphans as u64,
        "{:?}",
        cluster.node(0).stats()
    );
    assert_eq!(cluster.node(joined).stats().cleanup_removed, 0);
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_wiped_node_pulls_its_data_back_and_a_restart_with_data_does_not_join() {
    let mut cluster = Cluster::start(slow_anti_entropy(4)).await;
    let written = write_all(&cluster, 200).await;
    cluster.kill(3).await;
    cluster.wipe(3);
    cluster.restart(3).await;
    assert!(
        cluster.node(3).is_joining(),
        "an empty store rejoins by pulling"
    );
    cluster.wait_for_ring(Duration::from_secs(30)).await;
    let missing = owned_but_missing(&cluster, 0, 3, &written).await;
    assert!(
        missing.is_empty(),
        "seed {}: {} missing",
        seed(),
        missing.len()
    );
    assert!(cluster.node(3).stats().join_pulled > 0);
    for i in 0..4 {
        assert_eq!(cluster.node(i).stats().reads, 0, "no read was needed");
    }
    // A restart that finds its data serves reads at once.
    cluster.kill(3).await;
    cluster.restart(3).await;
    assert!(!cluster.node(3).is_joining());
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_joiner_that_restarts_mid_pull_joins_again_instead_of_serving_reads() {
    // The pull is slowed down so that the joiner holds some records when it is killed.
    let mut spec = slow_anti_entropy(5);
    spec.config.anti_entropy = false;
    spec.config.anti_entropy_bandwidth = std::num::NonZeroU64::new(8 * 1024).unwrap();
    let mut cluster = Cluster::start_first(spec, 4).await;
    let written = write_all(&cluster, 1500).await;
    cluster.join(4).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while cluster.node(4).stats().join_pulled == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "seed {}: no pull",
            seed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(cluster.node(4).is_joining());
    cluster.kill(4).await;
    assert!(
        cluster.storage(4).stats().await.unwrap().records > 0,
        "the joiner held some records when it stopped"
    );
    cluster.restart(4).await;
    assert!(
        cluster.node(4).is_joining(),
        "a join that did not finish goes on after a restart"
    );
    cluster.wait_for_ring(Duration::from_secs(120)).await;
    let missing = owned_but_missing(&cluster, 0, 4, &written).await;
    assert!(
        missing.is_empty(),
        "seed {}: {} missing",
        seed(),
        missing.len()
    );
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_joiner_whose_seeds_do_not_answer_waits_for_them_and_then_pulls() {
    let mut cluster = Cluster::start_first(slow_anti_entropy(4), 3).await;
    let written = write_all(&cluster, 200).await;
    // Node 4 reaches nobody for longer than join_timeout.
    cluster.net.partition(
        &[Cluster::addr(3)],
        &[Cluster::addr(0), Cluster::addr(1), Cluster::addr(2)],
    );
    cluster.join(3).await;
    tokio::time::sleep(cluster.node(3).config().join_timeout * 3).await;
    assert!(
        cluster.node(3).is_joining(),
        "a joiner that found no cluster does not serve reads"
    );
    cluster.net.heal();
    cluster.wait_for_ring(Duration::from_secs(60)).await;
    let missing = owned_but_missing(&cluster, 0, 3, &written).await;
    assert!(
        missing.is_empty(),
        "seed {}: {} missing",
        seed(),
        missing.len()
    );
    assert!(cluster.node(3).stats().join_pulled > 0);
    cluster.stop().await;
}

/// Overwrites `key` at `Quorum` through the running nodes in turn until a put is
/// acknowledged, and returns that put's version. A put that failed may have reached some
/// replicas; the acknowledged one after it has a newer version, so it is the key's latest.
async fn put_until_acknowledged(cluster: &Cluster, step: usize, key: &Bytes) -> Version {
    let quorum = WriteOptions::default().consistency(Consistency::Quorum);
    let running: Vec<usize> = (0..cluster.len())
        .filter(|&i| cluster.is_running(i))
        .collect();
    let mut failures = Vec::new();
    for attempt in 0..20 {
        let via = running[(step + attempt) % running.len()];
        match cluster
            .node(via)
            .put(key.clone(), format!("v{step}-{attempt}"), quorum)
            .await
        {
            Ok(version) => return version,
            Err(e) => failures.push(format!("node {}: {e}", via + 1)),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "seed {}: no put of {key:?} was acknowledged: {failures:?}",
        seed()
    );
}

/// Overwrites every third key of `latest` (from `offset`), one every 20 ms, while `busy`
/// holds, and at least `at_least` of them; keeps each key's acknowledged version.
async fn overwrite_while(
    cluster: &Cluster,
    latest: &mut [(Bytes, Version)],
    offset: &mut usize,
    at_least: usize,
    busy: impl Fn(&Cluster) -> bool,
) {
    let mut done = 0;
    while done < at_least || busy(cluster) {
        assert!(
            done < 20_000,
            "seed {}: still busy after {done} writes",
            seed()
        );
        let k = (*offset * 3) % latest.len();
        let version = put_until_acknowledged(cluster, *offset, &latest[k].0).await;
        latest[k].1 = version;
        *offset += 1;
        done += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads every key of `latest` at `Quorum` through the running nodes in turn and checks it
/// returns the key's latest acknowledged version.
async fn read_back_latest(cluster: &Cluster, latest: &[(Bytes, Version)]) {
    let read = chorus::ReadOptions::default().consistency(Consistency::Quorum);
    let running: Vec<usize> = (0..cluster.len())
        .filter(|&i| cluster.is_running(i))
        .collect();
    for (k, (key, version)) in latest.iter().enumerate() {
        let got = cluster
            .node(running[k % running.len()])
            .get_versioned(key.clone(), read)
            .await
            .unwrap_or_else(|e| panic!("seed {}: quorum read of {key:?}: {e}", seed()))
            .unwrap_or_else(|| panic!("seed {}: {key:?} lost", seed()));
        assert_eq!(
            got.version,
            *version,
            "seed {}: {key:?} is not at its latest acknowledged write",
            seed()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn two_joins_a_leave_and_a_death_lose_no_acknowledged_write_and_keys_end_on_their_replicas() {
    // The scenario: a loaded 3-node cluster (N = 3, W = R = 2) gains two nodes,
    // then one leaves gracefully and one dies, with quorum writes going on throughout.
    let mut spec = ClusterSpec::new(5, seed());
    spec.config.ownership_settle = Duration::from_secs(5);
    let mut cluster = Cluster::start_first(spec, 3).await;
    let mut latest = Vec::new();
    for k in 0..600 {
        let key = Bytes::from(format!("key-{k}"));
        let version = put_until_acknowledged(&cluster, k, &key).await;
        latest.push((key, version));
    }
    let mut offset = 0;

    // Two joins, one after the other, each pulling its ranges while writes go on.
    for joiner in [3, 4] {
        cluster.join(joiner).await;
        assert!(
            cluster.node(joiner).is_joining(),
            "node {} pulls",
            joiner + 1
        );
        overwrite_while(&cluster, &mut latest, &mut offset, 50, |c| {
            c.node(joiner).is_joining()
        })
        .await;
        cluster.wait_for_ring(Duration::from_secs(60)).await;
        let stats = cluster.node(joiner).stats();
        assert_eq!(stats.joins_completed, 1, "{stats:?}");
        assert_eq!(stats.join_incomplete, 0, "{stats:?}");
    }
    // Five nodes at N = 3: each key on exactly its three, the copies the joiners took
    // removed from the nodes that lost them once ownership settled.
    wait_exactly_on_replicas(&cluster, 0, &latest, Duration::from_secs(120)).await;
    let removed: u64 = (0..5)
        .map(|i| cluster.node(i).stats().cleanup_removed)
        .sum();
    assert!(
        removed > 0,
        "the joins took ranges from the first three nodes"
    );
    read_back_latest(&cluster, &latest).await;

    // Node 2 leaves gracefully, then node 3 crashes; writes go on after each.
    cluster.shutdown(1).await;
    overwrite_while(&cluster, &mut latest, &mut offset, 50, |_| false).await;
    cluster.wait_for_ring(Duration::from_secs(60)).await;
    cluster.kill(2).await;
    overwrite_while(&cluster, &mut latest, &mut offset, 50, |_| false).await;
    cluster.wait_for_ring(Duration::from_secs(60)).await;

    // Three survivors at N = 3: every key, at its latest acknowledged version, on all three
    // (the dead node's ranges re-replicated without a read), and read back at R = 2.
    wait_exactly_on_replicas(&cluster, 0, &latest, Duration::from_secs(120)).await;
    read_back_latest(&cluster, &latest).await;
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_joiner_answered_busy_asks_again_later_without_counting_a_failed_pull() {
    // Every scan of the members takes 10 s, ten times the request timeout: the joiner's
    // pulls time out, and the scans they started go on holding the members' healing
    // permits, until a member has none free and answers `Busy`. Then the scans are fast again.
    let mut spec = slow_anti_entropy(4);
    spec.config.anti_entropy = false;
    let mut cluster = Cluster::start_first(spec, 3).await;
    let written = write_all(&cluster, 300).await;
    for i in 0..3 {
        cluster.set_scan_delay(i, Duration::from_secs(10));
    }
    cluster.join(3).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while cluster.node(3).stats().healing_deferred == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "seed {}: never busy: {:?}",
            seed(),
            cluster.node(3).stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cluster.node(3).is_joining());
    for i in 0..3 {
        cluster.set_scan_delay(i, Duration::ZERO);
    }
    cluster.wait_for_ring(Duration::from_secs(300)).await;
    let stats = cluster.node(3).stats();
    assert_eq!(stats.joins_completed, 1, "{stats:?}");
    assert_eq!(stats.join_incomplete, 0, "{stats:?}");
    // Every `Busy` a member answered, the joiner took for "later", not for a failed pull.
    let busy: u64 = (0..3).map(|i| cluster.node(i).stats().healing_busy).sum();
    assert!(busy > 0);
    assert_eq!(stats.healing_deferred, busy, "{stats:?}");
    let missing = owned_but_missing(&cluster, 0, 3, &written).await;
    assert!(
        missing.is_empty(),
        "seed {}: {} missing",
        seed(),
        missing.len()
    );
    cluster.stop().await;
}
