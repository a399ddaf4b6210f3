//! Three nodes in one process: quorum writes and reads on the real `chorus::Node`.
//!
//! The nodes run over the in-process network (with the `local` membership preset, so the
//! demo takes seconds). A key is written at W = 2 and read back at R = 2; then the network is
//! cut so the coordinator reaches none of the key's other replicas, and the same write at
//! W = 2 fails with an honest error that says how many replicas acknowledged and that the
//! write may still land; after healing, a quorum read returns the newest version and read
//! repair brings the replica that missed it up to date, with the write's original version.
//!
//! Run: `cargo run -p chorus-examples --example replicas`

use std::sync::Arc;
use std::time::Duration;

use chorus::hlc::WallClock;
use chorus::membership::MembershipConfig;
use chorus::runtime::inproc::InProcessNetwork;
use chorus::{Address, Consistency, Node, ReadOptions, SharedTransport, Storage, WriteOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let network = InProcessNetwork::new(7);
    let addr = |i: u64| Address::new(format!("node-{i}:7946"));
    let mut nodes = Vec::new();
    for i in 1..=3u64 {
        let transport = SharedTransport::new(network.bind(addr(i))?);
        let seeds: Vec<String> = if i == 1 {
            Vec::new()
        } else {
            vec![addr(1).to_string()]
        };
        let node = chorus::node()
            .id(i)
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

    // Cut the coordinator off from every other node.
    let others: Vec<Address> = nodes[1..].iter().map(Node::addr).collect();
    network.partition(&[coordinator.addr()], &others);
    let timeout = WriteOptions::default()
        .consistency(Consistency::Quorum)
        .timeout(Duration::from_millis(300));
    match coordinator.put(key, "hello again", timeout).await {
        Ok(v) => println!("write v2 during the partition: acknowledged?! {v:?}"),
        Err(e) => println!("write v2 during the partition: {e}"),
    }

    network.heal();
    // A new write after healing reaches a quorum again...
    let v3 = nodes[1].put(key, "hello, healed", quorum).await?;
    println!("write v3 after healing, coordinated by node 2: version {v3:?}");
    // ...and a quorum read with blocking repair returns it once it is on two replicas.
    let read = nodes[2]
        .get_versioned(
            key,
            ReadOptions::default().repair(chorus::ReadRepair::Blocking),
        )
        .await?;
    if let Some(v) = &read {
        println!(
            "read at R = 2 after healing: {:?} (version {:?})",
            String::from_utf8_lossy(&v.value),
            v.version
        );
    }
    // Every replica now holds the newest record with its original version.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for node in &nodes {
        if let Some(record) = node.storage().get(key.as_bytes()).await? {
            let now = chorus::hlc::SystemClock.now_ms();
            println!(
                "  node {} stores {:?} at {:?}",
                node.id().0,
                record
                    .live_value(now)
                    .map(|v| String::from_utf8_lossy(v).into_owned()),
                record.version
            );
        }
    }
    println!("stats of node 1: {:?}", coordinator.stats());
    for node in &nodes {
        node.shutdown().await?;
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
