//! SWIM membership with Lifeguard, as a deterministic sans-IO state machine.
//!
//! [`Membership`] decides who is in the cluster. It is the protocol of HashiCorp memberlist
//! (SWIM with Lifeguard's refinements) written as a state machine in the style of quinn-proto
//! and foca: it never reads a clock, never sleeps, never performs I/O, and draws randomness
//! only from a seeded [`ChaCha8Rng`]. Given the same seed and the same sequence of inputs it
//! produces the same outputs, which is what lets [`sim`] run 1,000 nodes in one thread,
//! deterministically, and lets [`driver`] run one node over any [`crate::Transport`].
//!
//! # Driving contract
//!
//! The owner (a driver or a simulator) holds the only copy of the machine and:
//!
//! 1. feeds every received message to [`Membership::handle_message`] with the current time
//!    and the address it came from (an address that reaches the sender);
//! 2. calls [`Membership::handle_timeout`] with the current time once the deadline returned by
//!    [`Membership::poll_timeout`] has passed (calling it earlier, or more often, is harmless);
//! 3. after each call to a `handle_*` method (or [`Membership::leave`]), drains
//!    [`Membership::poll_transmit`] (messages to send; losing some is fine, the protocol is
//!    built for loss) and [`Membership::poll_event`] (membership changes), then asks
//!    [`Membership::poll_timeout`] again: the answer changes with every input.
//!
//! Time must never go backwards between calls. The machine keeps no reference to the owner
//! and does nothing between calls; a node whose owner stops calling it is, to the cluster, a
//! crashed node.
//!
//! # The protocol
//!
//! - **Join**: a push-pull (full state exchange) to every seed address, repeated every
//!   [`MembershipConfig::join_retry_interval`] until one answers.
//! - **Failure detection**: every protocol period (randomised round-robin over the members)
//!   the node pings one member; without an ack within the probe timeout it asks
//!   [`MembershipConfig::indirect_checks`] others to ping it ([`SwimMessage::PingReq`]); without
//!   an ack by the end of the period it suspects the member. A suspected member that hears of
//!   it refutes by bumping its incarnation; one that does not within the suspicion timeout is
//!   declared dead. A member leaving gracefully announces it.
//! - **Dissemination**: news ([`Update`]) is piggybacked on pings, acks and gossip rounds, each
//!   update `retransmit_mult * ceil(log10(n + 1))` times, least-sent first; a full state
//!   exchange with a random member runs periodically.
//! - **Lifeguard** (when [`MembershipConfig::lifeguard`] is on): a local health score, raised
//!   when this node's probes fail without the helpers' nacks arriving or when it must refute a
//!   suspicion about itself and lowered by timely acks, stretches its probe interval and
//!   timeout up to [`MembershipConfig::awareness_max_multiplier`] times; helpers that get no
//!   ack send a nack; a suspicion starts at `suspicion_max_timeout_mult` times the minimum
//!   timeout and shrinks to it as independent confirmations arrive; a ping to a suspected
//!   member carries the suspicion (buddy system) so it refutes at once.
//! - **Healing**: every [`MembershipConfig::reannounce_interval`] the node exchanges full state
//!   with a seed it does not know alive or a member it believes dead, so partitions heal
//!   without an operator.
//! - **Reaping**: dead and left members are forgotten [`MembershipConfig::reap_after`] after
//!   they died or left.
//! - **Restarts**: each life of a node has a generation; a member's state is versioned by
//!   [`Life`] `(generation, incarnation)`, so a restarted node (same id, perhaps a new address)
//!   replaces its old self everywhere and news about the old life is ignored.

pub mod config;
pub mod driver;
pub mod message;
pub mod sim;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use config::MembershipConfig;
pub use message::{Life, Member, MemberMeta, MemberState, SwimMessage, Update};

use crate::hlc::NodeId;
use crate::transport::Address;

/// A change in the membership as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MembershipEvent {
    /// A member appeared (first seen, or back after being dead or gone).
    Joined(Member),
    /// A member's metadata or life changed (for example it restarted with a new address).
    Updated(Member),
    /// A member is suspected.
    Suspect(Member),
    /// A suspected member refuted the suspicion.
    Alive(Member),
    /// A member was declared dead.
    Dead(Member),
    /// A member left on purpose.
    Left(Member),
}

impl MembershipEvent {
    /// The member the event is about, as it is now.
    pub fn member(&self) -> &Member {
        match self {
            MembershipEvent::Joined(m)
            | MembershipEvent::Updated(m)
            | MembershipEvent::Suspect(m)
            | MembershipEvent::Alive(m)
            | MembershipEvent::Dead(m)
            | MembershipEvent::Left(m) => m,
        }
    }
}

/// A message the owner must send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub to: Address,
    /// What.
    pub message: SwimMessage,
}

/// Counters of one node's protocol activity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MembershipStats {
    /// Probes started.
    pub probes: u64,
    /// Probes that ended without an ack.
    pub failed_probes: u64,
    /// Suspicions this node raised itself.
    pub suspicions_raised: u64,
    /// Times this node refuted a suspicion or death notice about itself.
    pub refutations: u64,
    /// Messages ignored because they did not fit this node (a ping for another node id, an
    /// ack nobody waits for).
    pub ignored_messages: u64,
}

#[derive(Debug)]
struct Suspicion {
    start: Instant,
    min: Duration,
    max: Duration,
    k: u32,
    confirmers: BTreeSet<NodeId>,
    deadline: Instant,
}

#[derive(Debug)]
struct Entry {
    member: Member,
    since: Instant,
    suspicion: Option<Box<Suspicion>>,
}

#[derive(Debug)]
struct Probe {
    seq: u32,
    target: NodeId,
    ack_deadline: Instant,
    end: Instant,
    indirect_sent: bool,
    expected_nacks: u32,
    nacks: u32,
}

#[derive(Debug)]
struct Relay {
    requester: Address,
    seq: u32,
    target: NodeId,
}

/// Updates waiting to be piggybacked, least-transmitted (then newest) first.
#[derive(Debug, Default)]
struct Broadcasts {
    /// (transmits, newest first, member): the order updates go out in.
    order: BTreeSet<(u32, std::cmp::Reverse<u64>, NodeId)>,
    /// The pending update about each member and its key in `order`.
    by_id: BTreeMap<NodeId, (u32, std::cmp::Reverse<u64>, Update)>,
    next: u64,
}

impl Broadcasts {
    fn push(&mut self, update: Update) {
        let id = update.id();
        let stamp = std::cmp::Reverse(self.next);
        self.next += 1;
        if let Some((t, s, _)) = self.by_id.insert(id, (0, stamp, update)) {
            self.order.remove(&(t, s, id));
        }
        self.order.insert((0, stamp, id));
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn take(&mut self, max: usize, limit: u32, out: &mut Vec<Update>) {
        let mut again = Vec::new();
        for _ in 0..max {
            let Some((transmits, stamp, id)) = self.order.pop_first() else {
                break;
            };
            let transmits = transmits + 1;
            if transmits < limit {
                if let Some(entry) = self.by_id.get_mut(&id) {
                    entry.0 = transmits;
                    out.push(entry.2.clone());
                }
                again.push((transmits, stamp, id));
            } else if let Some((_, _, update)) = self.by_id.remove(&id) {
                out.push(update);
            }
        }
        // Re-queued after the loop so one message never carries an update twice.
        self.order.extend(again);
    }
}

/// Who a node is in this life and how it joins: what [`Membership::new`] needs besides the
/// configuration and the start time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStart {
    /// The node's id, the same in every life.
    pub id: NodeId,
    /// This life of the node: bump it on every restart (for example use the start time in
    /// milliseconds), so the new life supersedes everything said about the old one.
    pub generation: u64,
    /// What the node publishes about itself, its address among it.
    pub meta: MemberMeta,
    /// Where to join: empty for the first node of a cluster; the node's own address among
    /// them is skipped.
    pub seeds: Vec<Address>,
    /// The seed of every random choice the machine makes.
    pub rng_seed: u64,
}

/// The membership state machine of one node. See the [module documentation](self).
#[derive(Debug)]
pub struct Membership {
    config: MembershipConfig,
    local: Member,
    leaving: bool,
    seeds: Vec<Address>,
    joined: bool,
    rng: ChaCha8Rng,
    members: BTreeMap<NodeId, Entry>,
    /// Alive and suspect members other than this node, for random choices.
    live: Vec<NodeId>,
    live_pos: HashMap<NodeId, usize>,
    /// How many live members use each address (to tell which seeds are known alive).
    live_addrs: HashMap<Address, u32>,
    probe_order: Vec<NodeId>,
    probe_index: usize,
    probe: Option<Probe>,
    next_probe: Instant,
    next_seq: u32,
    relays: HashMap<u32, Relay>,
    relay_deadlines: VecDeque<(Instant, u32)>,
    awareness: u32,
    broadcasts: Broadcasts,
    suspicion_deadlines: BTreeSet<(Instant, NodeId)>,
    reap_deadlines: BTreeSet<(Instant, NodeId)>,
    next_gossip: Instant,
    next_push_pull: Instant,
    next_join: Instant,
    next_reannounce: Instant,
    transmits: VecDeque<Transmit>,
    events: VecDeque<MembershipEvent>,
    stats: MembershipStats,
}

impl Membership {
    /// The node described by `start`, started at `now`.
    pub fn new(config: MembershipConfig, start: NodeStart, now: Instant) -> Self {
        let NodeStart {
            id,
            generation,
            meta,
            seeds,
            rng_seed,
        } = start;
        let seeds: Vec<Address> = seeds.into_iter().filter(|s| *s != meta.addr).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(rng_seed);
        // Spread the first probe over one period so nodes started together do not probe in
        // lockstep.
        let jitter = config.probe_interval.mul_f64(rng.random::<f64>());
        // Likewise the first push-pull and re-announce (memberlist staggers them too).
        let push_pull_at = now + config.push_pull_interval.mul_f64(rng.random::<f64>());
        let reannounce_at = now + config.reannounce_interval.mul_f64(rng.random::<f64>());
        Membership {
            config,
            local: Member {
                id,
                life: Life {
                    generation,
                    incarnation: 0,
                },
                state: MemberState::Alive,
                meta,
            },
            leaving: false,
            joined: seeds.is_empty(),
            seeds,
            rng,
            members: BTreeMap::new(),
            live: Vec::new(),
            live_pos: HashMap::new(),
            live_addrs: HashMap::new(),
            probe_order: Vec::new(),
            probe_index: 0,
            probe: None,
            next_probe: now + jitter,
            next_seq: 1,
            relays: HashMap::new(),
            relay_deadlines: VecDeque::new(),
            awareness: 0,
            broadcasts: Broadcasts::default(),
            suspicion_deadlines: BTreeSet::new(),
            reap_deadlines: BTreeSet::new(),
            next_gossip: now + config.gossip_interval,
            next_push_pull: push_pull_at,
            next_join: now,
            next_reannounce: reannounce_at,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: MembershipStats::default(),
        }
    }

    /// This node's own record.
    pub fn local(&self) -> &Member {
        &self.local
    }

    /// The configuration.
    pub fn config(&self) -> &MembershipConfig {
        &self.config
    }

    /// Whether a seed has answered (always true for a node started without seeds).
    pub fn is_joined(&self) -> bool {
        self.joined
    }

    /// Every other member this node knows, alive, suspect, dead or left, ordered by id.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values().map(|e| &e.member)
    }

    /// What this node knows about `id` (its own record for its own id).
    pub fn member(&self, id: NodeId) -> Option<&Member> {
        if id == self.local.id {
            return Some(&self.local);
        }
        self.members.get(&id).map(|e| &e.member)
    }

    /// Alive and suspect members, this node included.
    pub fn live_count(&self) -> usize {
        self.live.len() + 1
    }

    /// The local health score (0 = healthy); probe interval and timeout are multiplied by
    /// `score + 1`.
    pub fn health_score(&self) -> u32 {
        self.awareness
    }

    /// Counters.
    pub fn stats(&self) -> MembershipStats {
        self.stats
    }

    /// Starts a graceful leave: the node announces that it left (disseminated by the next
    /// gossip rounds) and stops probing. The owner keeps driving it for a few gossip intervals
    /// so the news gets out, then drops it.
    pub fn leave(&mut self, now: Instant) {
        if self.leaving {
            return;
        }
        self.leaving = true;
        self.local.life.incarnation += 1;
        self.local.state = MemberState::Left;
        self.probe = None;
        self.broadcasts.push(Update::Left {
            id: self.local.id,
            life: self.local.life,
        });
        // Tell a few members right away rather than waiting for the gossip tick.
        self.next_gossip = now;
    }

    /// The next message to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next membership change, if any.
    pub fn poll_event(&mut self) -> Option<MembershipEvent> {
        self.events.pop_front()
    }

    /// When [`Membership::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.next_reannounce.min(self.next_push_pull);
        match &self.probe {
            Some(p) if !p.indirect_sent => next = next.min(p.ack_deadline),
            Some(p) => next = next.min(p.end),
            None if !self.leaving => next = next.min(self.next_probe),
            None => {}
        }
        if !self.broadcasts.is_empty() {
            next = next.min(self.next_gossip);
        }
        if !self.joined {
            next = next.min(self.next_join);
        }
        if let Some((at, _)) = self.relay_deadlines.front() {
            next = next.min(*at);
        }
        if let Some((at, _)) = self.suspicion_deadlines.first() {
            next = next.min(*at);
        }
        if let Some((at, _)) = self.reap_deadlines.first() {
            next = next.min(*at);
        }
        Some(next)
    }

    /// Runs every timer that is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Suspicions that ran out.
        while let Some(&(at, id)) = self.suspicion_deadlines.first() {
            if at > now {
                break;
            }
            self.suspicion_deadlines.pop_first();
            let due = self.members.get(&id).and_then(|e| {
                let s = e.suspicion.as_ref()?;
                (e.member.state == MemberState::Suspect && s.deadline == at)
                    .then_some(e.member.life)
            });
            if let Some(life) = due {
                self.apply(
                    now,
                    Update::Dead {
                        id,
                        life,
                        from: self.local.id,
                    },
                );
            }
        }
        // Relayed probes that got no ack: nack (Lifeguard).
        while let Some(&(at, seq)) = self.relay_deadlines.front() {
            if at > now {
                break;
            }
            self.relay_deadlines.pop_front();
            if let Some(relay) = self.relays.remove(&seq)
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
        // The current probe.
        if let Some(p) = &self.probe
            && !p.indirect_sent
            && now >= p.ack_deadline
        {
            self.send_indirect_probes();
        }
        if let Some(p) = &self.probe
            && now >= p.end
        {
            self.finish_probe(now);
        }
        if self.probe.is_none() && !self.leaving && now >= self.next_probe {
            self.start_probe(now);
        }
        // Gossip.
        if now >= self.next_gossip {
            if !self.broadcasts.is_empty() {
                self.gossip();
            }
            self.next_gossip = now + self.config.gossip_interval;
        }
        // Join retries.
        if !self.joined && now >= self.next_join {
            let state = self.full_state();
            for seed in self.seeds.clone() {
                self.send(
                    seed,
                    SwimMessage::PushPull {
                        from: self.local.id,
                        join: true,
                        reply: false,
                        members: state.clone(),
                    },
                );
            }
            self.next_join = now + self.config.join_retry_interval;
        }
        // Periodic push-pull with a random member.
        if now >= self.next_push_pull {
            if let Some(&id) = self.sample_live(1, &[]).first() {
                self.push_pull(id_addr(&self.members, id));
            }
            self.next_push_pull = now + self.push_pull_interval();
        }
        // Re-announce to a seed not known alive or to a dead member.
        if now >= self.next_reannounce {
            if self.joined && !self.leaving {
                self.reannounce();
            }
            self.next_reannounce = now + self.config.reannounce_interval;
        }
        // Forget dead and left members.
        while let Some(&(at, id)) = self.reap_deadlines.first() {
            if at > now {
                break;
            }
            self.reap_deadlines.pop_first();
            let reap = self.members.get(&id).is_some_and(|e| {
                matches!(e.member.state, MemberState::Dead | MemberState::Left)
                    && e.since + self.config.reap_after <= now
            });
            if reap {
                self.members.remove(&id);
            }
        }
    }

    /// Processes a message received from `from`.
    pub fn handle_message(&mut self, now: Instant, from: Address, message: SwimMessage) {
        match message {
            SwimMessage::Ping {
                seq,
                from: _,
                target,
                updates,
            } => {
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
            SwimMessage::Ack {
                seq,
                from: acker,
                updates,
            } => {
                self.apply_all(now, updates);
                if let Some(p) = &self.probe
                    && p.seq == seq
                    && p.target == acker
                {
                    if !p.indirect_sent && self.config.lifeguard {
                        self.awareness = self.awareness.saturating_sub(1);
                    }
                    self.probe = None;
                } else if let Some(relay) = self.relays.remove(&seq) {
                    if relay.target != acker {
                        self.relays.insert(seq, relay);
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
            SwimMessage::PingReq {
                seq,
                from: _,
                target,
                target_addr,
                updates,
            } => {
                self.apply_all(now, updates);
                let own = self.next_seq();
                self.relays.insert(
                    own,
                    Relay {
                        requester: from,
                        seq,
                        target,
                    },
                );
                self.relay_deadlines
                    .push_back((now + self.config.probe_timeout, own));
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
            SwimMessage::Nack { seq, from: _ } => match &mut self.probe {
                Some(p) if p.seq == seq => p.nacks += 1,
                _ => self.stats.ignored_messages += 1,
            },
            SwimMessage::Gossip { from: _, updates } => self.apply_all(now, updates),
            SwimMessage::PushPull {
                from: sender,
                join: _,
                reply,
                members,
            } => {
                self.merge_state(now, sender, members);
                if reply {
                    self.joined = true;
                } else {
                    let members = self.full_state();
                    self.send(
                        from,
                        SwimMessage::PushPull {
                            from: self.local.id,
                            join: false,
                            reply: true,
                            members,
                        },
                    );
                }
            }
        }
    }

    fn next_seq(&mut self) -> u32 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        seq
    }

    fn send(&mut self, to: Address, message: SwimMessage) {
        self.transmits.push_back(Transmit { to, message });
    }

    fn multiplier(&self) -> u32 {
        if self.config.lifeguard {
            self.awareness + 1
        } else {
            1
        }
    }

    fn retransmit_limit(&self) -> u32 {
        let n = (self.live.len() + 1) as f64;
        let scale = (n + 1.0).log10().ceil().max(1.0) as u32;
        self.config.retransmit_mult.get() * scale
    }

    fn push_pull_interval(&self) -> Duration {
        let n = self.live.len() + 1;
        if n <= 32 {
            return self.config.push_pull_interval;
        }
        let scale = ((n as f64).log2() - 32f64.log2()).ceil() + 1.0;
        self.config.push_pull_interval.mul_f64(scale)
    }

    fn piggyback(&mut self, first: Option<Update>) -> Vec<Update> {
        let max = self.config.max_updates_per_message.get();
        let mut out = Vec::new();
        if let Some(u) = first {
            out.push(u);
        }
        let limit = self.retransmit_limit();
        self.broadcasts
            .take(max.saturating_sub(out.len()), limit, &mut out);
        out
    }

    fn full_state(&self) -> Vec<Member> {
        let mut out = Vec::with_capacity(self.members.len() + 1);
        out.push(self.local.clone());
        out.extend(self.members.values().map(|e| e.member.clone()));
        out
    }

    fn push_pull(&mut self, to: Address) {
        let members = self.full_state();
        self.send(
            to,
            SwimMessage::PushPull {
                from: self.local.id,
                join: false,
                reply: false,
                members,
            },
        );
    }

    /// Up to `k` distinct random live members not in `exclude`.
    fn sample_live(&mut self, k: usize, exclude: &[NodeId]) -> Vec<NodeId> {
        let mut out = Vec::with_capacity(k);
        if self.live.len() <= k + exclude.len() {
            let mut all: Vec<NodeId> = self
                .live
                .iter()
                .copied()
                .filter(|id| !exclude.contains(id))
                .collect();
            for i in (1..all.len()).rev() {
                let j = self.rng.random_range(0..=i);
                all.swap(i, j);
            }
            all.truncate(k);
            return all;
        }
        let mut attempts = 4 * k + 16;
        while out.len() < k && attempts > 0 {
            attempts -= 1;
            let id = self.live[self.rng.random_range(0..self.live.len())];
            if !exclude.contains(&id) && !out.contains(&id) {
                out.push(id);
            }
        }
        out
    }

    fn count_addr(&mut self, addr: &Address, up: bool) {
        if up {
            *self.live_addrs.entry(addr.clone()).or_insert(0) += 1;
        } else if let Some(n) = self.live_addrs.get_mut(addr) {
            *n -= 1;
            if *n == 0 {
                self.live_addrs.remove(addr);
            }
        }
    }

    fn add_live(&mut self, id: NodeId) {
        if self.live_pos.contains_key(&id) {
            return;
        }
        if let Some(addr) = self.members.get(&id).map(|e| e.member.meta.addr.clone()) {
            self.count_addr(&addr, true);
        }
        self.live_pos.insert(id, self.live.len());
        self.live.push(id);
        // Probe a newcomer in the current round, at a random place among those still due.
        self.probe_order.push(id);
        let last = self.probe_order.len() - 1;
        let from = self.probe_index.min(last);
        let at = self.rng.random_range(from..=last);
        self.probe_order.swap(at, last);
    }

    fn remove_live(&mut self, id: NodeId) {
        if let Some(pos) = self.live_pos.remove(&id) {
            if let Some(addr) = self.members.get(&id).map(|e| e.member.meta.addr.clone()) {
                self.count_addr(&addr, false);
            }
            self.live.swap_remove(pos);
            if let Some(&moved) = self.live.get(pos) {
                self.live_pos.insert(moved, pos);
            }
        }
    }

    fn start_probe(&mut self, now: Instant) {
        let mult = self.multiplier();
        self.next_probe = now + self.config.probe_interval * mult;
        let mut target = None;
        for _ in 0..=self.probe_order.len() {
            if self.probe_index >= self.probe_order.len() {
                self.probe_order = self.live.clone();
                for i in (1..self.probe_order.len()).rev() {
                    let j = self.rng.random_range(0..=i);
                    self.probe_order.swap(i, j);
                }
                self.probe_index = 0;
                if self.probe_order.is_empty() {
                    break;
                }
            }
            let id = self.probe_order[self.probe_index];
            self.probe_index += 1;
            if self.live_pos.contains_key(&id) {
                target = Some(id);
                break;
            }
        }
        let Some(target) = target else { return };
        let Some(entry) = self.members.get(&target) else {
            return;
        };
        // Buddy system: a suspected member learns of it from the probe itself.
        let buddy = match (&entry.suspicion, self.config.lifeguard) {
            (Some(s), true) => Some(Update::Suspect {
                id: target,
                life: entry.member.life,
                from: s.confirmers.first().copied().unwrap_or(self.local.id),
            }),
            _ => None,
        };
        let addr = entry.member.meta.addr.clone();
        let seq = self.next_seq();
        self.stats.probes += 1;
        self.probe = Some(Probe {
            seq,
            target,
            ack_deadline: now + self.config.probe_timeout * mult,
            end: self.next_probe,
            indirect_sent: false,
            expected_nacks: 0,
            nacks: 0,
        });
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

    fn send_indirect_probes(&mut self) {
        let Some(p) = &mut self.probe else { return };
        p.indirect_sent = true;
        let (seq, target) = (p.seq, p.target);
        let Some(addr) = self
            .members
            .get(&target)
            .map(|e| e.member.meta.addr.clone())
        else {
            return;
        };
        let helpers = self.sample_live(self.config.indirect_checks, &[target]);
        if let Some(p) = &mut self.probe
            && self.config.lifeguard
        {
            p.expected_nacks = helpers.len() as u32;
        }
        for helper in helpers {
            let updates = self.piggyback(None);
            let to = id_addr(&self.members, helper);
            self.send(
                to,
                SwimMessage::PingReq {
                    seq,
                    from: self.local.id,
                    target,
                    target_addr: addr.clone(),
                    updates,
                },
            );
        }
    }

    fn finish_probe(&mut self, now: Instant) {
        let Some(p) = self.probe.take() else { return };
        self.stats.failed_probes += 1;
        if self.config.lifeguard {
            let delta = if p.expected_nacks > 0 {
                p.expected_nacks.saturating_sub(p.nacks)
            } else {
                1
            };
            self.awareness =
                (self.awareness + delta).min(self.config.awareness_max_multiplier.get() - 1);
        }
        let life = match self.members.get(&p.target) {
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

    fn gossip(&mut self) {
        let targets = self.sample_live(self.config.gossip_nodes.get(), &[]);
        for id in targets {
            if self.broadcasts.is_empty() {
                break;
            }
            let updates = self.piggyback(None);
            let to = id_addr(&self.members, id);
            self.send(
                to,
                SwimMessage::Gossip {
                    from: self.local.id,
                    updates,
                },
            );
        }
    }

    fn reannounce(&mut self) {
        let mut candidates: Vec<Address> = self
            .seeds
            .iter()
            .filter(|seed| !self.live_addrs.contains_key(*seed))
            .cloned()
            .collect();
        candidates.extend(self.reap_deadlines.iter().filter_map(|(_, id)| {
            let e = self.members.get(id)?;
            (e.member.state == MemberState::Dead).then(|| e.member.meta.addr.clone())
        }));
        if candidates.is_empty() {
            return;
        }
        let i = self.rng.random_range(0..candidates.len());
        let to = candidates.swap_remove(i);
        self.push_pull(to);
    }

    fn merge_state(&mut self, now: Instant, sender: NodeId, members: Vec<Member>) {
        for m in members {
            let update = match m.state {
                MemberState::Alive => Update::Alive {
                    id: m.id,
                    life: m.life,
                    meta: m.meta,
                },
                // As memberlist does: another node's verdict of death is only a suspicion
                // here, so a member wrongly declared dead elsewhere gets time to refute.
                MemberState::Suspect | MemberState::Dead => Update::Suspect {
                    id: m.id,
                    life: m.life,
                    from: sender,
                },
                MemberState::Left => Update::Left {
                    id: m.id,
                    life: m.life,
                },
            };
            self.apply(now, update);
        }
    }

    fn apply_all(&mut self, now: Instant, updates: Vec<Update>) {
        for u in updates {
            self.apply(now, u);
        }
    }

    fn refute(&mut self, life: Life) {
        if self.leaving || life.generation != self.local.life.generation {
            return;
        }
        if life.incarnation < self.local.life.incarnation {
            return;
        }
        // The incarnation comes from a peer's message: one claiming u64::MAX cannot be
        // outbid, and wrapping would make every later refutation lose.
        let Some(next) = life.incarnation.checked_add(1) else {
            self.stats.ignored_messages += 1;
            tracing::warn!(
                "cannot refute a claim about this node at the largest incarnation; ignored"
            );
            return;
        };
        self.local.life.incarnation = next;
        self.stats.refutations += 1;
        if self.config.lifeguard {
            self.awareness =
                (self.awareness + 1).min(self.config.awareness_max_multiplier.get() - 1);
        }
        self.broadcasts.push(Update::Alive {
            id: self.local.id,
            life: self.local.life,
            meta: self.local.meta.clone(),
        });
    }

    fn suspicion_bounds(&self) -> (Duration, Duration, u32) {
        let n = (self.live.len() + 1) as f64;
        let scale = n.max(1.0).log10().max(1.0);
        let min = self
            .config
            .probe_interval
            .mul_f64(self.config.suspicion_mult.get() as f64 * scale);
        if !self.config.lifeguard {
            return (min, min, 0);
        }
        let max = min * self.config.suspicion_max_timeout_mult.get();
        let mut k = self.config.suspicion_confirmations;
        if (self.live.len() + 1).saturating_sub(2) < k as usize {
            k = 0;
        }
        (min, max, k)
    }

    fn apply(&mut self, now: Instant, update: Update) {
        match update {
            Update::Alive { id, life, meta } => {
                if id == self.local.id {
                    if life.generation == self.local.life.generation
                        && life.incarnation > self.local.life.incarnation
                    {
                        self.refute(life);
                    }
                    return;
                }
                let event = match self.members.get_mut(&id) {
                    None => {
                        let member = Member {
                            id,
                            life,
                            state: MemberState::Alive,
                            meta,
                        };
                        self.members.insert(
                            id,
                            Entry {
                                member: member.clone(),
                                since: now,
                                suspicion: None,
                            },
                        );
                        MembershipEvent::Joined(member)
                    }
                    Some(e) => {
                        if life <= e.member.life {
                            return;
                        }
                        let old_state = e.member.state;
                        let changed =
                            e.member.life.generation != life.generation || e.member.meta != meta;
                        let moved = (e.member.meta.addr != meta.addr
                            && matches!(old_state, MemberState::Alive | MemberState::Suspect))
                        .then(|| (e.member.meta.addr.clone(), meta.addr.clone()));
                        e.member.life = life;
                        e.member.meta = meta;
                        e.member.state = MemberState::Alive;
                        e.since = now;
                        if let Some(s) = e.suspicion.take() {
                            self.suspicion_deadlines.remove(&(s.deadline, id));
                        }
                        let member = e.member.clone();
                        if let Some((old, new)) = moved {
                            self.count_addr(&old, false);
                            self.count_addr(&new, true);
                        }
                        match old_state {
                            MemberState::Dead | MemberState::Left => {
                                MembershipEvent::Joined(member)
                            }
                            _ if changed => MembershipEvent::Updated(member),
                            MemberState::Suspect => MembershipEvent::Alive(member),
                            MemberState::Alive => {
                                // A newer incarnation, nothing visible changed: pass it on.
                                self.broadcasts.push(Update::Alive {
                                    id,
                                    life,
                                    meta: member.meta,
                                });
                                return;
                            }
                        }
                    }
                };
                self.add_live(id);
                let m = event.member();
                self.broadcasts.push(Update::Alive {
                    id,
                    life: m.life,
                    meta: m.meta.clone(),
                });
                self.events.push_back(event);
            }
            Update::Suspect { id, life, from } => {
                if id == self.local.id {
                    self.refute(life);
                    return;
                }
                let (min, max, k) = self.suspicion_bounds();
                let Some(e) = self.members.get_mut(&id) else {
                    return;
                };
                if life < e.member.life {
                    return;
                }
                match e.member.state {
                    MemberState::Dead | MemberState::Left => return,
                    MemberState::Suspect if life == e.member.life => {
                        // A confirmation from another member shrinks the timeout.
                        let Some(s) = e.suspicion.as_mut() else {
                            return;
                        };
                        if s.k == 0 || !s.confirmers.insert(from) {
                            return;
                        }
                        let c = (s.confirmers.len() - 1) as f64;
                        let frac = (c + 1.0).ln() / (s.k as f64 + 1.0).ln();
                        let raw = s.max.as_secs_f64() - frac * (s.max - s.min).as_secs_f64();
                        let timeout = Duration::from_millis((raw * 1000.0).floor().max(0.0) as u64)
                            .max(s.min);
                        let deadline = s.start + timeout;
                        if deadline != s.deadline {
                            self.suspicion_deadlines.remove(&(s.deadline, id));
                            s.deadline = deadline;
                            self.suspicion_deadlines.insert((deadline, id));
                        }
                        self.broadcasts.push(Update::Suspect { id, life, from });
                        return;
                    }
                    _ => {}
                }
                let timeout = if k == 0 { min } else { max };
                let deadline = now + timeout;
                if let Some(old) = e.suspicion.take() {
                    self.suspicion_deadlines.remove(&(old.deadline, id));
                }
                e.suspicion = Some(Box::new(Suspicion {
                    start: now,
                    min,
                    max,
                    k,
                    confirmers: BTreeSet::from([from]),
                    deadline,
                }));
                e.member.state = MemberState::Suspect;
                e.member.life = life;
                e.since = now;
                let member = e.member.clone();
                self.suspicion_deadlines.insert((deadline, id));
                self.broadcasts.push(Update::Suspect { id, life, from });
                self.events.push_back(MembershipEvent::Suspect(member));
            }
            Update::Dead { id, life, from } => {
                if id == self.local.id {
                    self.refute(life);
                    return;
                }
                if self.bury(now, id, life, MemberState::Dead) {
                    self.broadcasts.push(Update::Dead { id, life, from });
                }
            }
            Update::Left { id, life } => {
                if id == self.local.id {
                    self.refute(life);
                    return;
                }
                if self.bury(now, id, life, MemberState::Left) {
                    self.broadcasts.push(Update::Left { id, life });
                }
            }
        }
    }

    /// Marks a member dead or left; true if that was news.
    fn bury(&mut self, now: Instant, id: NodeId, life: Life, state: MemberState) -> bool {
        let Some(e) = self.members.get_mut(&id) else {
            return false;
        };
        if life < e.member.life {
            return false;
        }
        match e.member.state {
            MemberState::Left => return false,
            // A death is final for its life; only the member's own "left" may replace it.
            MemberState::Dead if state == MemberState::Dead || life != e.member.life => {
                return false;
            }
            _ => {}
        }
        if let Some(s) = e.suspicion.take() {
            self.suspicion_deadlines.remove(&(s.deadline, id));
        }
        e.member.state = state;
        e.member.life = life;
        e.since = now;
        let member = e.member.clone();
        self.reap_deadlines
            .insert((now + self.config.reap_after, id));
        self.remove_live(id);
        if self.probe.as_ref().is_some_and(|p| p.target == id) {
            self.probe = None;
        }
        self.events.push_back(match state {
            MemberState::Left => MembershipEvent::Left(member),
            _ => MembershipEvent::Dead(member),
        });
        true
    }
}

fn id_addr(members: &BTreeMap<NodeId, Entry>, id: NodeId) -> Address {
    members
        .get(&id)
        .map(|e| e.member.meta.addr.clone())
        .unwrap_or_else(|| Address::new(""))
}
