//! The server's metrics, through the `metrics` facade (the admin listener renders them with
//! the Prometheus exporter). Request counters and latency histograms are resolved once, at
//! start, so a command only bumps atomics; the node's own counters, membership and storage
//! figures are copied in when `/metrics` is scraped.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use crate::membership::{MemberState, MembershipEvent};
use crate::{Consistency, Node, ReplicationError, Storage};

/// Latency buckets, in seconds: 50 us to 5 s.
pub(crate) const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

/// A data operation, as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Get,
    Set,
    Del,
    Exists,
    Mget,
    Mset,
}

const OPS: [(Op, &str); 6] = [
    (Op::Get, "get"),
    (Op::Set, "set"),
    (Op::Del, "del"),
    (Op::Exists, "exists"),
    (Op::Mget, "mget"),
    (Op::Mset, "mset"),
];
const LEVELS: [&str; 4] = ["one", "quorum", "all", "count"];
const OUTCOMES: [&str; 6] = [
    "ok",
    "unavailable",
    "timeout",
    "failed",
    "invalid",
    "shutting_down",
];

fn level(c: Consistency) -> usize {
    match c {
        Consistency::One => 0,
        Consistency::Quorum => 1,
        Consistency::All => 2,
        _ => 3,
    }
}

fn outcome(r: Option<&ReplicationError>) -> usize {
    match r {
        None => 0,
        Some(ReplicationError::Unavailable { .. }) => 1,
        Some(ReplicationError::Timeout { .. }) => 2,
        Some(ReplicationError::Invalid(_)) => 4,
        Some(ReplicationError::ShuttingDown) => 5,
        Some(_) => 3,
    }
}

/// Handles of every metric a command touches.
pub(crate) struct Metrics {
    requests: Vec<Counter>,
    latency: Vec<Histogram>,
    quorum_failures: [Counter; 3],
    pub(crate) connections: Gauge,
    pub(crate) accepted: Counter,
    pub(crate) rejected: Counter,
    pub(crate) protocol_errors: Counter,
    pub(crate) commands: Counter,
    pub(crate) auth_failures: Counter,
    pub(crate) bytes_in: Counter,
    pub(crate) bytes_out: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Resolves every handle against the installed recorder.
    pub(crate) fn new() -> Metrics {
        let mut requests = Vec::new();
        let mut latency = Vec::new();
        for (_, op) in OPS {
            for level in LEVELS {
                for outcome in OUTCOMES {
                    requests.push(counter!(
                        "chorus_requests_total",
                        "op" => op, "consistency" => level, "outcome" => outcome
                    ));
                }
            }
            latency.push(histogram!("chorus_request_duration_seconds", "op" => op));
        }
        let failure = |kind: &'static str| counter!("chorus_quorum_failures_total", "kind" => kind);
        Metrics {
            requests,
            latency,
            quorum_failures: [
                failure("unavailable"),
                failure("timeout"),
                failure("failed"),
            ],
            connections: gauge!("chorus_client_connections"),
            accepted: counter!("chorus_client_connections_accepted_total"),
            rejected: counter!("chorus_client_connections_rejected_total"),
            protocol_errors: counter!("chorus_client_protocol_errors_total"),
            commands: counter!("chorus_client_commands_total"),
            auth_failures: counter!("chorus_client_auth_failures_total"),
            bytes_in: counter!("chorus_client_bytes_received_total"),
            bytes_out: counter!("chorus_client_bytes_sent_total"),
        }
    }

    /// Counts one data command and its latency.
    pub(crate) fn request(
        &self,
        op: Op,
        consistency: Consistency,
        error: Option<&ReplicationError>,
        elapsed: Duration,
    ) {
        let o = OPS.iter().position(|(x, _)| *x == op).unwrap_or(0);
        let outcome = outcome(error);
        let i = (o * LEVELS.len() + level(consistency)) * OUTCOMES.len() + outcome;
        if let Some(c) = self.requests.get(i) {
            c.increment(1);
        }
        if let Some(h) = self.latency.get(o) {
            h.record(elapsed.as_secs_f64());
        }
        if (1..=3).contains(&outcome) {
            self.quorum_failures[outcome - 1].increment(1);
        }
    }
}

/// Copies the node's counters, membership and storage figures into the recorder.
pub(crate) async fn refresh(node: &Node) {
    let s = node.stats();
    for (name, v) in [
        ("chorus_node_writes_total", s.writes),
        ("chorus_node_reads_total", s.reads),
        ("chorus_node_local_reads_total", s.local_reads),
        ("chorus_node_unavailable_total", s.unavailable),
        ("chorus_node_timeouts_total", s.timeouts),
        ("chorus_node_failed_total", s.failed),
        ("chorus_node_invalid_requests_total", s.invalid_requests),
        (
            "chorus_node_replica_requests_sent_total",
            s.replica_requests_sent,
        ),
        ("chorus_node_late_answers_total", s.late_answers),
        ("chorus_read_repairs_total", s.read_repairs),
        ("chorus_read_repair_failures_total", s.read_repair_failures),
        ("chorus_replica_applied_total", s.replica_applied),
        ("chorus_replica_stale_total", s.replica_stale),
        ("chorus_replica_drift_refusals_total", s.drift_refusals),
        ("chorus_replica_invalid_total", s.replica_invalid),
        ("chorus_storage_failures_total", s.storage_failures),
        ("chorus_bad_replica_requests_total", s.bad_replica_requests),
        ("chorus_purged_total", s.purged),
        ("chorus_replies_not_sent_total", s.replies_not_sent),
        ("chorus_hints_stored_total", s.hints_stored),
        ("chorus_hints_delivered_total", s.hints_delivered),
        (
            "chorus_hint_delivery_failures_total",
            s.hint_delivery_failures,
        ),
        ("chorus_hint_store_failures_total", s.hint_store_failures),
        ("chorus_sync_offers_total", s.sync_offers),
        ("chorus_sync_repairs_total", s.sync_repairs),
        ("chorus_sync_overtaken_total", s.sync_overtaken),
        ("chorus_sync_early_rounds_total", s.sync_early_rounds),
        ("chorus_merkle_ring_changes_total", s.merkle_ring_changes),
        ("chorus_leave_handed_off_total", s.leave_handed_off),
        ("chorus_leave_handoff_failed_total", s.leave_handoff_failed),
        ("chorus_cleanup_rounds_total", s.cleanup_rounds),
        ("chorus_cleanup_removed_total", s.cleanup_removed),
        ("chorus_cleanup_kept_total", s.cleanup_kept),
        ("chorus_join_pulled_total", s.join_pulled),
        ("chorus_join_pull_failures_total", s.join_pull_failures),
        ("chorus_join_repulls_total", s.join_repulls),
        ("chorus_join_incomplete_total", s.join_incomplete),
        ("chorus_joins_completed_total", s.joins_completed),
        ("chorus_join_refused_total", s.join_refused),
        ("chorus_pulls_served_total", s.pulls_served),
        ("chorus_pulls_refused_total", s.pulls_refused),
        ("chorus_healing_busy_total", s.healing_busy),
        ("chorus_healing_deferred_total", s.healing_deferred),
        ("chorus_replica_reads_total", s.replica_reads),
        ("chorus_sync_refused_total", s.sync_refused),
        ("chorus_merkle_requested_total", s.merkle_requested),
        ("chorus_merkle_exchanges_total", s.merkle_exchanges),
        ("chorus_merkle_failures_total", s.merkle_failures),
        ("chorus_merkle_nodes_total", s.merkle_nodes),
        (
            "chorus_merkle_leaves_checked_total",
            s.merkle_leaves_checked,
        ),
        (
            "chorus_merkle_leaves_differing_total",
            s.merkle_leaves_differing,
        ),
        ("chorus_merkle_repairs_total", s.merkle_repairs),
        ("chorus_merkle_bytes_sent_total", s.merkle_bytes_sent),
        ("chorus_merkle_refused_total", s.merkle_refused),
        ("chorus_merkle_rebuilds_total", s.merkle_rebuilds),
        (
            "chorus_merkle_rebuild_corrected_total",
            s.merkle_rebuild_corrected,
        ),
    ] {
        counter!(name).absolute(v);
    }
    for (reason, v) in [
        ("full", s.hints_dropped_full),
        ("overload", s.hints_dropped_overload),
        ("expired", s.hints_dropped_expired),
        ("rejected", s.hints_dropped_rejected),
    ] {
        counter!("chorus_hints_dropped_total", "reason" => reason).absolute(v);
    }
    gauge!("chorus_hints_pending").set(s.hints_pending as f64);
    gauge!("chorus_deferred_pending").set(s.deferred_pending as f64);
    counter!("chorus_deferred_shed_total").absolute(s.deferred_shed);
    let a = node.auth_stats();
    counter!("chorus_membership_verified_total").absolute(a.verified);
    counter!("chorus_membership_signed_total").absolute(a.signed);
    for (kind, v) in [
        ("unsigned", a.unsigned),
        ("unknown_key", a.unknown_key),
        ("forged", a.forged),
        ("misdirected", a.misdirected),
        ("replayed", a.replayed),
        ("malformed", a.malformed),
        ("id_mismatch", a.id_mismatch),
    ] {
        counter!("chorus_membership_refused_total", "kind" => kind).absolute(v);
    }
    counter!("chorus_membership_late_relayed_acks_total").absolute(a.late_relayed_acks);
    counter!("chorus_membership_unadmitted_members_total").absolute(a.unadmitted_members);
    counter!("chorus_membership_revoked_members_total").absolute(a.revoked_members);
    counter!("chorus_membership_address_conflicts_total").absolute(a.address_conflicts);
    let t = node.transport_refusals();
    for (reason, v) in [
        ("rejected", t.rejected),
        ("over_limit", t.over_limit),
        ("handshake", t.handshake_failures),
        ("address", t.address_refusals),
        ("revoked", t.revoked),
    ] {
        counter!("chorus_transport_refused_connections_total", "reason" => reason).absolute(v);
    }
    let m = node.membership_stats();
    counter!("chorus_membership_refused_relays_total").absolute(m.refused_relays);
    // What one admitted member could make this node do past its per-peer budgets.
    for (kind, v) in [
        ("updates", m.rate_limited_updates),
        ("relays", m.rate_limited_relays),
        ("push_pulls", m.rate_limited_push_pulls),
    ] {
        counter!("chorus_membership_rate_limited_total", "kind" => kind).absolute(v);
    }
    let members = node.members();
    for (state, label) in [
        (MemberState::Alive, "alive"),
        (MemberState::Suspect, "suspect"),
        (MemberState::Dead, "dead"),
        (MemberState::Left, "left"),
    ] {
        let n = members.iter().filter(|m| m.state == state).count();
        gauge!("chorus_members", "state" => label).set(n as f64);
    }
    if let Ok(st) = node.storage().stats().await {
        gauge!("chorus_storage_records").set(st.records as f64);
        gauge!("chorus_storage_tombstones").set(st.tombstones as f64);
        gauge!("chorus_storage_bytes").set(st.bytes as f64);
    }
}

/// Counts membership events (suspicions, deaths, joins, departures) until the node stops.
pub(crate) async fn count_membership_events(node: Node) {
    let mut events = node.events();
    loop {
        let label = match events.recv().await {
            Ok(MembershipEvent::Suspect(_)) => "suspect",
            Ok(MembershipEvent::Dead(_)) => "dead",
            Ok(MembershipEvent::Joined(_)) => "joined",
            Ok(MembershipEvent::Left(_)) => "left",
            Ok(MembershipEvent::Alive(_)) => "refuted",
            Ok(MembershipEvent::Updated(_)) => "updated",
            Ok(_) => "other",
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                counter!("chorus_membership_events_lagged_total").increment(n);
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        counter!("chorus_membership_events_total", "event" => label).increment(1);
        if label == "suspect" {
            counter!("chorus_membership_suspicions_total").increment(1);
        }
    }
}
