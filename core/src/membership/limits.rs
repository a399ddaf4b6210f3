//! Per-peer token buckets: what one member may make this node do per second.

use std::collections::HashMap;
use std::time::Instant;

use crate::identity::NodeId;

/// One token bucket per peer, each holding one second's worth and refilled continuously by
/// `now`. At most `2 * max_peers` buckets are kept; past that the idle ones are dropped
/// (a dropped bucket comes back full, which only ever forgives).
#[derive(Debug, Default)]
pub(super) struct PeerBuckets {
    buckets: HashMap<NodeId, Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl PeerBuckets {
    /// Takes up to `wanted` tokens from `peer`'s bucket of `per_second`; returns how many.
    pub(super) fn take(
        &mut self,
        now: Instant,
        peer: NodeId,
        wanted: u32,
        per_second: u32,
        max_peers: usize,
    ) -> u32 {
        let cap = f64::from(per_second);
        if self.buckets.len() >= 2 * max_peers.max(1) && !self.buckets.contains_key(&peer) {
            // Full buckets are the same as no bucket.
            self.buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * cap < cap
            });
        }
        let bucket = self.buckets.entry(peer).or_insert(Bucket {
            tokens: cap,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * cap).min(cap);
        bucket.last = now;
        let granted = (bucket.tokens.floor() as u32).min(wanted);
        bucket.tokens -= f64::from(granted);
        granted
    }
}
