//! Waiting for membership views: which members a node sees alive, and a bounded wait until
//! every node of a set sees exactly the expected ones (real or paused tokio time alike).

use std::time::Duration;

use chorus::membership::MemberState;
use chorus::{Consistency, Node, NodeId, ReadOptions, WriteOptions};

use crate::runner::seed;

/// The ids `node` sees alive, sorted.
pub fn alive(node: &Node) -> Vec<NodeId> {
    let mut ids: Vec<_> = node
        .members()
        .iter()
        .filter(|m| m.state == MemberState::Alive)
        .map(|m| m.id)
        .collect();
    ids.sort();
    ids
}

/// Waits (polling every 50 ms of tokio time) until every node in `nodes` sees exactly
/// `expect` alive, and no join under way or just ended ([`Node::ownership_settled`]);
/// panics with the seed and the views after `limit`.
pub async fn settle(nodes: &[&Node], expect: &[NodeId], limit: Duration) {
    let mut expect = expect.to_vec();
    expect.sort();
    let end = tokio::time::Instant::now() + limit;
    loop {
        if nodes
            .iter()
            .all(|n| alive(n) == expect && n.ownership_settled())
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "seed {}: views did not settle on {expect:?}: {:?}",
            seed(),
            nodes.iter().map(|n| alive(n)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A task writing and reading back keys `k0`..`k49` through `node` at quorum, one pair every
/// `pace`, panicking (with the seed) at the first failure; it stops when the sender is used
/// or dropped and returns how many pairs succeeded.
pub fn quorum_writer(
    node: Node,
    pace: Duration,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<u64>,
) {
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        let mut ok = 0u64;
        // Bounded, like every test loop; the caller stops it long before.
        for k in 0u64..1_000_000 {
            if !matches!(
                stop_rx.try_recv(),
                Err(tokio::sync::oneshot::error::TryRecvError::Empty)
            ) {
                break;
            }
            let key = format!("k{}", k % 50);
            node.put(
                key.clone(),
                format!("v{k}"),
                WriteOptions::default().consistency(Consistency::Quorum),
            )
            .await
            .unwrap_or_else(|e| panic!("seed {}: write {k} failed: {e}", seed()));
            let got = node
                .get(key, ReadOptions::default().consistency(Consistency::Quorum))
                .await
                .unwrap_or_else(|e| panic!("seed {}: read {k} failed: {e}", seed()));
            assert_eq!(got.as_deref(), Some(format!("v{k}").as_bytes()));
            ok += 1;
            tokio::time::sleep(pace).await;
        }
        ok
    });
    (stop_tx, writer)
}
