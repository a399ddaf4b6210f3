//! Waiting for membership views: which members a node sees alive, and a bounded wait until
//! every node of a set sees exactly the expected ones (real or paused tokio time alike).

use std::time::Duration;

use chorus::membership::MemberState;
use chorus::{Node, NodeId};

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
/// `expect` alive; panics with the seed and the views after `limit`.
pub async fn settle(nodes: &[&Node], expect: &[NodeId], limit: Duration) {
    let mut expect = expect.to_vec();
    expect.sort();
    let end = tokio::time::Instant::now() + limit;
    loop {
        if nodes.iter().all(|n| alive(n) == expect) {
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
