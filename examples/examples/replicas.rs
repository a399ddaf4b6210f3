//! Three nodes in one process: quorum writes and reads on the real `chorus::Node`.
//!
//! The nodes run over the in-process network (with the `local` membership preset, so the
//! demo takes a second). A key is written at W = 2 and read back at R = 2; then node 3 is cut
//! off: a write at W = 2 still succeeds, and one at W = 3 fails with an honest error that
//! says how many replicas acknowledged and that the write may still have been applied (it
//! was, on two). After healing, a quorum read through the stale node 3 returns the newest
//! version, and blocking read repair brings node 3 up to date with the write's original
//! version before the read returns.
//!
//! Run: `cargo run -p chorus-examples --example replicas`

use std::sync::Arc;
use std::time::Duration;

use chorus::hlc::WallClock;
use chorus::membership::MembershipConfig;
use chorus::runtime::inproc::InProcessNetwork;
use chorus::{
    Address, Consistency, Node, ReadOptions, ReadRepair, SharedTransport, Storage, WriteOptions,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let network = InProcessNetwork::new(7);
    let addr = |i: u64| Address::new(format!("node-{i}:7946"));
    // Each node has an Ed25519 identity (in memory here; a node with a data directory keeps
    // it there) and the keyring lists all three: nobody else can join.
    let identities: Vec<chorus::Identity> = (1..=3u8)
        .map(|i| chorus::Identity::from_secret([i; 32]))
        .collect();
    let keyring = chorus::Keyring::from_keys(identities.iter().map(|id| id.public_key()))?;
    let mut nodes = Vec::new();
    for i in 1..=3u64 {
        let transport = SharedTransport::new(network.bind(addr(i))?);
        let seeds: Vec<String> = if i == 1 {
            Vec::new()
        } else {
            vec![addr(1).to_string()]
        };
        let node = chorus::node()
            .identity(identities[i as usize - 1].clone())
            .keyring(keyring.clone())
            .seeds(seeds)
            .transport(transport)
            .membership(MembershipConfig::local())
            .start()
            .await?;
        nodes.push(node);
    }
    wait_for_members(&nodes, 3).await;
    println!("three nodes joined: {:?}", ids(&nodes[0]));

    let key = "greeting";
    let coordinator = &nodes[0];
    let replicas = coordinator.replicas_of(key.as_bytes());
    println!("key {key:?} lives on {replicas:?}");

    let quorum = WriteOptions::default().consistency(Consistency::Quorum);
    let v1 = coordinator.put(key, "hello", quorum).await?;
    println!("write v1 at W = 2: acknowledged, version {v1:?}");
    let read = coordinator.get(key, ReadOptions::default()).await?;
    println!(
        "read at R = 2: {:?}",
        read.as_deref().map(String::from_utf8_lossy)
    );

    // Cut node 3 off from the other two.
    let (n1, n2, n3) = (nodes[0].addr(), nodes[1].addr(), nodes[2].addr());
    network.partition(std::slice::from_ref(&n3), &[n1, n2]);
    let v2 = coordinator.put(key, "hello again", quorum).await?;
    println!(
        "write v2 at W = 2 with node 3 cut off: acknowledged by nodes 1 and 2, version {v2:?}"
    );
    let all = WriteOptions::default()
        .consistency(Consistency::All)
        .timeout(Duration::from_millis(300));
    match coordinator.put(key, "hello, all of you", all).await {
        Ok(v) => println!("write v3 at W = 3: acknowledged?! {v:?}"),
        Err(e) => println!("write v3 at W = 3 with node 3 cut off: {e}"),
    }
    show(&nodes, key, "during the partition").await?;

    network.heal();
    // A quorum read through the stale node returns the newest version and, with blocking
    // repair, only once that version is on two replicas: node 3 itself is repaired.
    let read = nodes[2]
        .get_versioned(key, ReadOptions::default().repair(ReadRepair::Blocking))
        .await?;
    if let Some(v) = &read {
        println!(
            "read at R = 2 through node 3 after healing: {:?} (version {:?}; the unacknowledged v3 landed on two replicas and, being newest, wins)",
            String::from_utf8_lossy(&v.value),
            v.version
        );
    }
    show(
        &nodes,
        key,
        "after the read (repair keeps the original version)",
    )
    .await?;
    println!("stats of node 1: {:?}", coordinator.stats());
    for node in &nodes {
        node.shutdown().await?;
    }
    Ok(())
}

/// What each node stores for `key`, read from its storage directly.
async fn show(nodes: &[Node], key: &str, when: &str) -> Result<(), Box<dyn std::error::Error>> {
    println!("  {when}:");
    let now = chorus::hlc::SystemClock.now_ms();
    for node in nodes {
        let record = node.storage().get(key.as_bytes()).await?;
        println!(
            "    node {} stores {:?} at {:?}",
            node.id().0,
            record
                .as_ref()
                .and_then(|r| r.live_value(now))
                .map(|v| String::from_utf8_lossy(v).into_owned()),
            record.map(|r| r.version)
        );
    }
    Ok(())
}

fn ids(node: &Node) -> Vec<u64> {
    node.members().iter().map(|m| m.id.0).collect()
}

async fn wait_for_members(nodes: &[Node], n: usize) {
    let nodes: Vec<Node> = nodes.to_vec();
    let all = Arc::new(nodes);
    for _ in 0..200 {
        if all.iter().all(|node| node.ring().len() == n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("warning: the nodes did not see each other within 4 s");
}
