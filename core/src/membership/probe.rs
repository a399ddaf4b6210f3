//! Failure detection: the probe of one member per protocol period (direct ping, then
//! ping-reqs through helpers), the pings this node relays for others (and their nacks), and
//! Lifeguard's local health score that paces probing.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::members::{MemberTable, shuffle};
use super::message::{MemberState, SwimMessage, Update};
use super::timers::Timer;
use super::{Membership, MembershipConfig};
use crate::identity::Address;
use crate::identity::NodeId;

/// Probing state: whom to probe next, the probe in progress, the relays in progress.
#[derive(Debug)]
pub(super) struct Prober {
    /// This round's randomised order of members to probe, and the next place in it.
    order: Vec<NodeId>,
    index: usize,
    /// Whether the next period probes this node's ring successor (see [`Prober::next_target`]).
    successor_turn: bool,
    /// A member [`Prober::probe_next`] asked to probe first, whatever the turn.
    urgent: Option<NodeId>,
    current: Option<Probe>,
    /// The last [`ENDED_PROBES`] probes that ended, to tell a helper's late relay of one of
    /// them from an ack that speaks for someone else.
    ended: VecDeque<EndedProbe>,
    next_seq: u32,
    /// Pings relayed for ping-reqs, by the sequence number of the relayed ping.
    relays: HashMap<u32, Relay>,
    /// The token bucket of relays ([`MembershipConfig::max_relays_per_second`]).
    relay_budget: RelayBudget,
    pub(super) health: Health,
}

/// A token bucket holding one second's worth of relays, refilled continuously by `now`.
#[derive(Debug, Default)]
struct RelayBudget {
    tokens: f64,
    last: Option<Instant>,
}

impl RelayBudget {
    fn take(&mut self, now: Instant, per_second: u32) -> bool {
        let cap = f64::from(per_second);
        self.tokens = match self.last {
            None => cap,
            Some(last) => {
                let elapsed = now.saturating_duration_since(last).as_secs_f64();
                (self.tokens + elapsed * cap).min(cap)
            }
        };
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
struct Probe {
    seq: u32,
    target: NodeId,
    /// Helpers asked with Lifeguard on, whose nacks soften the health penalty.
    helpers: Vec<NodeId>,
    /// Every helper asked (Lifeguard on or off): the members whose relayed acks count.
    asked: Vec<NodeId>,
    /// Those of them that nacked.
    nacked: Vec<NodeId>,
}

/// How many ended probes [`Prober`] remembers (a relay can arrive up to a protocol period
/// late, so a few suffice).
const ENDED_PROBES: usize = 8;

/// What is remembered of an ended probe.
#[derive(Debug)]
struct EndedProbe {
    seq: u32,
    target: NodeId,
    asked: Vec<NodeId>,
}

#[derive(Debug)]
struct Relay {
    requester: Address,
    seq: u32,
    target: NodeId,
}

#[cfg(test)]
impl Prober {
    /// The probe in progress: its sequence number and target.
    pub(super) fn current_probe(&self) -> Option<(u32, NodeId)> {
        self.current.as_ref().map(|p| (p.seq, p.target))
    }

    /// Records `helper` as asked by the probe in progress.
    pub(super) fn ask_for_test(&mut self, helper: NodeId) {
        if let Some(p) = self.current.as_mut() {
            p.asked.push(helper);
        }
    }
}

impl Default for Prober {
    fn default() -> Self {
        Prober {
            order: Vec::new(),
            index: 0,
            successor_turn: false,
            urgent: None,
            current: None,
            ended: VecDeque::new(),
            next_seq: 1,
            relays: HashMap::new(),
            relay_budget: RelayBudget::default(),
            health: Health::default(),
        }
    }
}

impl Prober {
    /// Ends the probe in progress (remembering it among the ended ones) and returns it.
    fn end_current(&mut self) -> Option<Probe> {
        let p = self.current.take()?;
        if self.ended.len() == ENDED_PROBES {
            self.ended.pop_front();
        }
        self.ended.push_back(EndedProbe {
            seq: p.seq,
            target: p.target,
            asked: p.asked.clone(),
        });
        Some(p)
    }

    fn next_seq(&mut self) -> u32 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        seq
    }

    /// Puts a member that just became live into the current round, at a random place among
    /// those still due.
    pub(super) fn add_newcomer(&mut self, rng: &mut ChaCha8Rng, id: NodeId) {
        self.order.push(id);
        let last = self.order.len() - 1;
        let from = self.index.min(last);
        let at = rng.random_range(from..=last);
        self.order.swap(at, last);
    }

    /// Makes `id` the next member probed (Lifeguard's confirmations come from independent
    /// probes; see [`Membership::suspect`]). It is not probed again later in this round.
    pub(super) fn probe_next(&mut self, id: NodeId) {
        let from = self.index.min(self.order.len());
        if let Some(at) = self.order[from..].iter().position(|&m| m == id) {
            self.order.remove(from + at);
        }
        self.order.insert(from, id);
        self.urgent = Some(id);
    }

    /// Whom the next period probes. With Lifeguard (`successor` true), periods alternate
    /// between this node's ring successor (the first live member whose id follows `local`,
    /// wrapping) and the next member of a randomised round-robin; plain SWIM keeps the
    /// paper's round-robin alone. A member [`Prober::probe_next`] asked for goes first.
    ///
    /// Why the successor: with independent random rounds alone, the first probe of a member
    /// that just crashed is the earliest of `n - 1` uniform times within a round, an
    /// exponential wait with a mean of one probe interval and an unbounded tail (about 1% of
    /// crashes waited more than 4.6 s, which put detection past 10 s at 100 members). Every
    /// member has exactly one predecessor when views agree, so every member is probed at
    /// least every other period and the wait is at most about two periods; the random round,
    /// at half the rate, still brings every member's probe from every other member and keeps
    /// no single prober's view decisive. Traffic is unchanged: one probe per period.
    ///
    /// Why not in plain SWIM: a slow member then suspects its successor every other period,
    /// and without Lifeguard's health score and confirmations that successor was declared
    /// dead in 3 of 20 ten-minute simulator runs (`swim-sim`'s slow member, signing on).
    fn next_target(
        &mut self,
        rng: &mut ChaCha8Rng,
        local: NodeId,
        successor: bool,
        members: &MemberTable,
    ) -> Option<NodeId> {
        if let Some(id) = self.urgent.take()
            && members.is_live(id)
            && self.upcoming_first() == Some(id)
        {
            self.index += 1;
            return Some(id);
        }
        self.successor_turn = successor && !self.successor_turn;
        if self.successor_turn
            && let Some(id) = members.live_successor(local)
        {
            return Some(id);
        }
        self.next_in_round(rng, members)
    }

    fn upcoming_first(&self) -> Option<NodeId> {
        self.order.get(self.index).copied()
    }

    /// The next live member in the round; a new round (a fresh shuffle) once it is through.
    fn next_in_round(&mut self, rng: &mut ChaCha8Rng, members: &MemberTable) -> Option<NodeId> {
        for _ in 0..=self.order.len() {
            if self.index >= self.order.len() {
                self.order = members.live().to_vec();
                shuffle(rng, &mut self.order);
                self.index = 0;
                if self.order.is_empty() {
                    return None;
                }
            }
            let id = self.order[self.index];
            self.index += 1;
            if members.is_live(id) {
                return Some(id);
            }
        }
        None
    }

    /// The members still due in this round, next first.
    #[cfg(test)]
    pub(super) fn upcoming(&self) -> &[NodeId] {
        &self.order[self.index.min(self.order.len())..]
    }

    /// Whether `id` is the member being probed.
    pub(super) fn is_probing(&self, id: NodeId) -> bool {
        self.current.as_ref().is_some_and(|p| p.target == id)
    }

    pub(super) fn is_active(&self) -> bool {
        self.current.is_some()
    }
}

/// Lifeguard's local health score (0 = healthy): raised when this node's probes fail without
/// the helpers' nacks or when it must refute a suspicion about itself, lowered by timely acks.
#[derive(Debug, Default)]
pub(super) struct Health {
    score: u32,
}

impl Health {
    pub(super) fn score(&self) -> u32 {
        self.score
    }

    pub(super) fn raise(&mut self, config: &MembershipConfig, by: u32) {
        if config.lifeguard {
            self.score = (self.score + by).min(config.awareness_max_multiplier.get() - 1);
        }
    }

    fn lower(&mut self, config: &MembershipConfig) {
        if config.lifeguard {
            self.score = self.score.saturating_sub(1);
        }
    }

    /// What probe interval and timeout are multiplied by.
    fn multiplier(&self, config: &MembershipConfig) -> u32 {
        if config.lifeguard { self.score + 1 } else { 1 }
    }
}

impl Membership {
    /// The protocol period starts: probe the next member with a direct ping.
    pub(super) fn start_probe(&mut self, now: Instant) {
        let mult = self.probes.health.multiplier(&self.config);
        self.timers
            .set(Timer::ProbePeriod, now + self.config.probe_interval * mult);
        let Some(target) = self.probes.next_target(
            &mut self.rng,
            self.local.id,
            self.config.lifeguard,
            &self.members,
        ) else {
            return;
        };
        let Some(entry) = self.members.get(target) else {
            return;
        };
        // Buddy system: a suspected member learns of it from the probe itself.
        let buddy = match (&entry.suspicion, self.config.lifeguard) {
            (Some(s), true) => Some(Update::Suspect {
                id: target,
                life: entry.member.life,
                from: s.suspecter().unwrap_or(self.local.id),
            }),
            _ => None,
        };
        let addr = entry.member.meta.addr.clone();
        let seq = self.probes.next_seq();
        self.stats.probes += 1;
        self.probes.current = Some(Probe {
            seq,
            target,
            helpers: Vec::new(),
            asked: Vec::new(),
            nacked: Vec::new(),
        });
        self.timers
            .set(Timer::ProbeAck, now + self.config.probe_timeout * mult);
        let updates = self.piggyback(buddy);
        self.send(
            addr,
            SwimMessage::Ping {
                seq,
                from: self.local.id,
                target,
                updates,
            },
        );
    }

    /// The direct ping got no ack in time: ask helpers to ping the target.
    pub(super) fn send_indirect_probes(&mut self) {
        let Some(p) = &self.probes.current else {
            return;
        };
        let (seq, target) = (p.seq, p.target);
        let Some(target_addr) = self.members.addr(target) else {
            return;
        };
        let helpers =
            self.members
                .sample_live(&mut self.rng, self.config.indirect_checks, &[target]);
        if let Some(p) = &mut self.probes.current {
            p.asked = helpers.clone();
            if self.config.lifeguard {
                p.helpers = helpers.clone();
            }
        }
        for helper in helpers {
            let Some(to) = self.members.addr(helper) else {
                continue;
            };
            let updates = self.piggyback(None);
            self.send(
                to,
                SwimMessage::PingReq {
                    seq,
                    from: self.local.id,
                    target,
                    target_addr: target_addr.clone(),
                    updates,
                },
            );
        }
    }

    /// Ends the probe in progress, if any, without a verdict.
    pub(super) fn cancel_probe(&mut self) {
        self.probes.end_current();
        self.timers.cancel(Timer::ProbeAck);
    }

    /// The protocol period ended without an ack: suspect the target.
    pub(super) fn finish_probe(&mut self, now: Instant) {
        let Some(p) = self.probes.end_current() else {
            return;
        };
        self.timers.cancel(Timer::ProbeAck);
        self.stats.failed_probes += 1;
        let penalty = if !p.helpers.is_empty() {
            (p.helpers.len() - p.nacked.len()) as u32
        } else {
            1
        };
        self.probes.health.raise(&self.config, penalty);
        let life = match self.members.get(p.target) {
            Some(e) if matches!(e.member.state, MemberState::Alive | MemberState::Suspect) => {
                e.member.life
            }
            _ => return,
        };
        self.stats.suspicions_raised += 1;
        self.apply(
            now,
            Update::Suspect {
                id: p.target,
                life,
                from: self.local.id,
            },
        );
    }

    /// Whether an ack with `seq` naming `acker`, sent by `sender`, is a helper's relay of
    /// the probe in progress: the one message whose `from` is not its sender.
    pub(super) fn is_relayed_ack_from(&self, sender: NodeId, seq: u32, acker: NodeId) -> bool {
        self.probes
            .current
            .as_ref()
            .is_some_and(|p| p.seq == seq && p.target == acker && p.asked.contains(&sender))
    }

    /// Whether an ack with `seq` naming `acker`, sent by `sender`, is a helper's relay of a
    /// probe of this node that already ended (it arrived after the period): harmless, and
    /// not an ack speaking for another member.
    pub(super) fn is_late_relayed_ack_from(&self, sender: NodeId, seq: u32, acker: NodeId) -> bool {
        self.probes
            .ended
            .iter()
            .any(|p| p.seq == seq && p.target == acker && p.asked.contains(&sender))
    }

    pub(super) fn on_ping(
        &mut self,
        now: Instant,
        from: Address,
        seq: u32,
        target: NodeId,
        updates: Vec<Update>,
    ) {
        self.apply_all(now, updates);
        if target != self.local.id {
            self.stats.ignored_messages += 1;
            return;
        }
        let updates = self.piggyback(None);
        self.send(
            from,
            SwimMessage::Ack {
                seq,
                from: self.local.id,
                updates,
            },
        );
    }

    pub(super) fn on_ack(&mut self, now: Instant, seq: u32, acker: NodeId, updates: Vec<Update>) {
        self.apply_all(now, updates);
        if let Some(p) = &self.probes.current
            && p.seq == seq
            && p.target == acker
        {
            // Only an ack to the direct ping shows this node is healthy.
            if self.timers.deadline(Timer::ProbeAck).is_some() {
                self.probes.health.lower(&self.config);
            }
            self.cancel_probe();
        } else if let Some(relay) = self.probes.relays.remove(&seq) {
            if relay.target != acker {
                self.probes.relays.insert(seq, relay);
                self.stats.ignored_messages += 1;
                return;
            }
            let updates = self.piggyback(None);
            self.send(
                relay.requester,
                SwimMessage::Ack {
                    seq: relay.seq,
                    from: acker,
                    updates,
                },
            );
        } else {
            self.stats.ignored_messages += 1;
        }
    }

    /// A ping-req: relayed only for a live member, only to the address this node knows for a
    /// live target (never to an address named in the message), within the relay budget.
    pub(super) fn on_ping_req(
        &mut self,
        now: Instant,
        requester: NodeId,
        seq: u32,
        target: NodeId,
        updates: Vec<Update>,
    ) {
        self.apply_all(now, updates);
        let requester_addr = self
            .members
            .is_live(requester)
            .then(|| self.members.addr(requester))
            .flatten();
        let target_addr = self
            .members
            .is_live(target)
            .then(|| self.members.addr(target))
            .flatten();
        let (Some(requester_addr), Some(target_addr)) = (requester_addr, target_addr) else {
            self.stats.refused_relays += 1;
            tracing::debug!(%requester, %target, "ping-req from or about a member not known alive");
            return;
        };
        if self.relay_budget.take(
            now,
            requester,
            1,
            self.config.max_relays_per_peer_per_second.get(),
            self.config.max_members.get(),
        ) == 0
        {
            self.stats.refused_relays += 1;
            self.stats.rate_limited_relays += 1;
            tracing::debug!(%requester, "ping-req over the requester's relay budget");
            return;
        }
        if !self
            .probes
            .relay_budget
            .take(now, self.config.max_relays_per_second.get())
        {
            self.stats.refused_relays += 1;
            tracing::debug!(%requester, "ping-req over the relay budget");
            return;
        }
        let own = self.probes.next_seq();
        self.probes.relays.insert(
            own,
            Relay {
                requester: requester_addr,
                seq,
                target,
            },
        );
        self.timers
            .set(Timer::Relay(own), now + self.config.probe_timeout);
        let updates = self.piggyback(None);
        self.send(
            target_addr,
            SwimMessage::Ping {
                seq: own,
                from: self.local.id,
                target,
                updates,
            },
        );
    }

    /// A nack counts only for the probe in progress and from a helper it asked, once.
    pub(super) fn on_nack(&mut self, seq: u32, helper: NodeId) {
        match &mut self.probes.current {
            Some(p)
                if p.seq == seq && p.helpers.contains(&helper) && !p.nacked.contains(&helper) =>
            {
                p.nacked.push(helper)
            }
            _ => self.stats.ignored_messages += 1,
        }
    }

    /// A relayed ping got no ack in time: tell the requester (Lifeguard).
    pub(super) fn relay_expired(&mut self, seq: u32) {
        if let Some(relay) = self.probes.relays.remove(&seq)
            && self.config.lifeguard
        {
            self.send(
                relay.requester,
                SwimMessage::Nack {
                    seq: relay.seq,
                    from: self.local.id,
                },
            );
        }
    }
}
