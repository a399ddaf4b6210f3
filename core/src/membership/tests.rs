//! Transition tests: two or three machines on a virtual clock, driven one input at a time.
//! The test hands every message to its target itself and asserts everything each input
//! produces: the messages sent, the events, the next timeout.
//!
//! Node 0 (`A`) runs the LAN preset and does the probing. The others are quiet: their own
//! protocol period is a year, so they only answer, relay and gossip, and a script never has
//! to interleave their probes. Periodic push-pull and re-announce are a year away for every
//! node. Randomness comes from a seed: `CHORUS_SEED` (decimal or `0x` hex) when set,
//! otherwise a fixed default; a failing test prints it.

use std::time::{Duration, Instant};

use std::num::{NonZeroU32, NonZeroUsize};

use super::*;

const DEFAULT_SEED: u64 = 0x7E_57;
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

fn seed() -> u64 {
    match std::env::var("CHORUS_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("CHORUS_SEED={s} is not a u64"))
        }
        Err(_) => DEFAULT_SEED,
    }
}

fn prober_config() -> MembershipConfig {
    let mut config = MembershipConfig::lan();
    config.push_pull_interval = YEAR;
    config.reannounce_interval = YEAR;
    config
}

fn quiet_config() -> MembershipConfig {
    let mut config = prober_config();
    config.probe_interval = YEAR;
    config
}

const LAN: MembershipConfig = MembershipConfig::lan();

/// Everything one input produced.
#[derive(Debug, Default, PartialEq, Eq)]
struct Out {
    sent: Vec<Transmit>,
    events: Vec<MembershipEvent>,
    timeout: Option<Instant>,
}

/// The nodes and the virtual clock.
struct Net {
    seed: u64,
    start: Instant,
    now: Instant,
    nodes: Vec<Membership>,
    addrs: Vec<Address>,
    /// Each node's first deadline: its first probe (a year away for the quiet ones).
    idle: Vec<Instant>,
}

impl Net {
    /// `n` nodes that know each other alive, as after their join news has spread: nothing is
    /// left to disseminate.
    fn new(n: usize) -> Net {
        let seed = seed();
        let start = Instant::now();
        let mut net = Net {
            seed,
            start,
            now: start,
            nodes: Vec::new(),
            addrs: Vec::new(),
            idle: Vec::new(),
        };
        for i in 0..n {
            let addr = Address::new(format!("n{}:1", i + 1));
            let config = if i == A {
                prober_config()
            } else {
                quiet_config()
            };
            let start = NodeStart {
                id: id(i),
                generation: 1,
                meta: MemberMeta::new(addr.clone()),
                seeds: Vec::new(),
                rng_seed: seed ^ i as u64,
                security: crate::membership::Security::Insecure,
            };
            net.nodes.push(Membership::new(config, start, net.now));
            net.addrs.push(addr);
        }
        for i in 0..n {
            for j in (0..n).filter(|&j| j != i) {
                let known = net.nodes[j].local().clone();
                let out = net.deliver_from(j, i, push_pull_reply(j, vec![known.clone()]));
                assert_eq!(out.events, [MembershipEvent::Joined(known)]);
            }
            net.nodes[i].broadcasts = Broadcasts::default();
        }
        for i in 0..n {
            let idle = net.nodes[i].poll_timeout().expect("a deadline");
            let limit = start + net.nodes[i].config.probe_interval;
            assert!(idle <= limit, "node {i} first probes at {idle:?}");
            for timer in [Timer::PushPull, Timer::Reannounce] {
                let at = net.nodes[i].timers.deadline(timer).expect("set");
                // A seed that staggers these into the script's hours is too unlikely to
                // design around; report it rather than fail obscurely.
                assert!(
                    at > start + 24 * Duration::from_secs(3600),
                    "{timer:?} soon"
                );
            }
            net.idle.push(idle);
        }
        net
    }

    fn node(&self, i: usize) -> &Membership {
        &self.nodes[i]
    }

    fn node_mut(&mut self, i: usize) -> &mut Membership {
        &mut self.nodes[i]
    }

    fn addr(&self, i: usize) -> Address {
        self.addrs[i].clone()
    }

    fn index(&self, addr: &Address) -> usize {
        self.addrs
            .iter()
            .position(|a| a == addr)
            .unwrap_or_else(|| panic!("nobody at {addr}"))
    }

    fn idle(&self, i: usize) -> Option<Instant> {
        Some(self.idle[i])
    }

    /// The current virtual time plus `d`.
    fn at(&self, d: Duration) -> Instant {
        self.now + d
    }

    fn advance_to(&mut self, at: Instant) {
        assert!(at >= self.now, "time goes forward only");
        self.now = at;
    }

    fn out(&mut self, i: usize) -> Out {
        let node = &mut self.nodes[i];
        Out {
            sent: std::iter::from_fn(|| node.poll_transmit()).collect(),
            events: std::iter::from_fn(|| node.poll_event()).collect(),
            timeout: node.poll_timeout(),
        }
    }

    fn leave(&mut self, i: usize) {
        self.nodes[i].leave(self.now);
    }

    /// Advances to node `i`'s deadline and fires it.
    fn step(&mut self, i: usize) -> Out {
        let at = self.nodes[i].poll_timeout().expect("a deadline");
        self.advance_to(at.max(self.now));
        self.fire(i)
    }

    /// Node `i`'s timers at the current time.
    fn fire(&mut self, i: usize) -> Out {
        self.nodes[i].handle_timeout(self.now);
        self.out(i)
    }

    /// Hands `t` (sent by node `from`) to the node at its address.
    fn deliver(&mut self, from: usize, t: &Transmit) -> Out {
        let to = self.index(&t.to);
        self.deliver_from(from, to, t.message.clone())
    }

    fn deliver_from(&mut self, from: usize, to: usize, message: SwimMessage) -> Out {
        let from = self.addr(from);
        self.nodes[to].handle_message(self.now, from, message);
        self.out(to)
    }

    /// Fires node `i` at each of its deadlines up to `until`; every output, merged.
    fn run(&mut self, i: usize, until: Instant) -> Out {
        let mut all = Out::default();
        while let Some(at) = self.nodes[i].poll_timeout()
            && at <= until
        {
            let out = self.step(i);
            all.sent.extend(out.sent);
            all.events.extend(out.events);
        }
        self.advance_to(until);
        all.timeout = self.nodes[i].poll_timeout();
        all
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("seed {0}; rerun with CHORUS_SEED={0}", self.seed);
        }
    }
}

fn id(i: usize) -> NodeId {
    NodeId(i as u64 + 1)
}

fn to(net: &Net, i: usize, message: SwimMessage) -> Transmit {
    Transmit {
        to: net.addr(i),
        message,
    }
}

fn ping(seq: u32, from: usize, target: usize, updates: Vec<Update>) -> SwimMessage {
    SwimMessage::Ping {
        seq,
        from: id(from),
        target: id(target),
        updates,
    }
}

fn ack(seq: u32, from: usize, updates: Vec<Update>) -> SwimMessage {
    SwimMessage::Ack {
        seq,
        from: id(from),
        updates,
    }
}

fn gossip(from: usize, updates: Vec<Update>) -> SwimMessage {
    SwimMessage::Gossip {
        from: id(from),
        updates,
    }
}

fn push_pull_reply(from: usize, members: Vec<Member>) -> SwimMessage {
    SwimMessage::PushPull {
        from: id(from),
        join: false,
        reply: true,
        part: 0,
        members,
    }
}

fn life(generation: u64, incarnation: u64) -> Life {
    Life {
        generation,
        incarnation,
    }
}

fn suspect(i: usize, life: Life, from: usize) -> Update {
    Update::Suspect {
        id: id(i),
        life,
        from: id(from),
    }
}

/// `i` as node `A` records it in `state` and `life`.
fn member(net: &Net, i: usize, state: MemberState, life: Life) -> Member {
    Member {
        id: id(i),
        life,
        state,
        meta: MemberMeta::new(net.addr(i)),
    }
}

/// Messages of one gossip round, whose targets come in random order, by address.
fn by_address(mut sent: Vec<Transmit>) -> Vec<Transmit> {
    sent.sort_by(|a, b| a.to.cmp(&b.to));
    sent
}

/// Node `A`'s first probe: fires it and returns the probe's target and when it started.
fn first_probe(net: &mut Net) -> (usize, Instant) {
    let out = net.step(A);
    let t = net.now;
    let [
        Transmit {
            message: SwimMessage::Ping { target, .. },
            ..
        },
    ] = out.sent[..]
    else {
        panic!("not one ping: {out:?}");
    };
    let target = target.0 as usize - 1;
    assert_eq!(
        out,
        Out {
            sent: vec![to(net, target, ping(1, A, target, vec![]))],
            events: vec![],
            timeout: Some(t + LAN.probe_timeout),
        }
    );
    (target, t)
}

#[test]
fn a_ping_is_answered_by_an_ack_and_the_period_runs_on() {
    let mut net = Net::new(2);
    let (target, t) = first_probe(&mut net);
    assert_eq!(target, B);

    let first = to(&net, B, ping(1, A, B, vec![]));
    let out = net.deliver(A, &first);
    assert_eq!(
        out,
        Out {
            sent: vec![to(&net, A, ack(1, B, vec![]))],
            events: vec![],
            timeout: net.idle(B),
        }
    );

    let out = net.deliver(B, &out.sent[0]);
    // The ack ends the wait: next comes the end of the protocol period.
    assert_eq!(
        out,
        Out {
            sent: vec![],
            events: vec![],
            timeout: Some(t + LAN.probe_interval),
        }
    );

    let out = net.step(A);
    assert_eq!(out.sent, [to(&net, B, ping(2, A, B, vec![]))]);
    assert_eq!(out.events, []);
    assert_eq!(net.node(A).stats().failed_probes, 0);
    assert_eq!(net.node(A).health_score(), 0);
}

#[test]
fn a_probe_timeout_sends_a_ping_req_and_the_helper_relays_the_ack() {
    let mut net = Net::new(3);
    let (target, t) = first_probe(&mut net);
    let helper = B + C - target;

    // The direct ping is lost.
    net.advance_to(t + LAN.probe_timeout);
    let out = net.fire(A);
    let ping_req = SwimMessage::PingReq {
        seq: 1,
        from: id(A),
        target: id(target),
        target_addr: net.addr(target),
        updates: vec![],
    };
    assert_eq!(
        out,
        Out {
            sent: vec![to(&net, helper, ping_req)],
            events: vec![],
            timeout: Some(t + LAN.probe_interval),
        }
    );

    let relay_deadline = net.at(LAN.probe_timeout);
    let out = net.deliver(A, &out.sent[0]);
    assert_eq!(
        out,
        Out {
            sent: vec![to(&net, target, ping(1, helper, target, vec![]))],
            events: vec![],
            timeout: Some(relay_deadline),
        }
    );

    let out = net.deliver(helper, &out.sent[0]);
    assert_eq!(out.sent, [to(&net, helper, ack(1, target, vec![]))]);

    let out = net.deliver(target, &out.sent[0]);
    // The relayed ack carries the requester's sequence number and the target's id. The
    // answered relay's deadline stays in the table and fires to no effect.
    assert_eq!(
        out,
        Out {
            sent: vec![to(&net, A, ack(1, target, vec![]))],
            events: vec![],
            timeout: Some(relay_deadline),
        }
    );

    let out = net.deliver(helper, &out.sent[0]);
    assert_eq!(
        out,
        Out {
            sent: vec![],
            events: vec![],
            timeout: Some(t + LAN.probe_interval),
        }
    );

    // No nack for an answered relay; no suspicion at the end of the period.
    net.advance_to(relay_deadline);
    let out = net.fire(helper);
    assert_eq!(out.sent, []);
    assert_eq!(out.timeout, net.idle(helper));
    let out = net.step(A);
    assert_eq!(out.events, []);
    assert_eq!(net.node(A).stats().failed_probes, 0);
}

#[test]
fn a_ping_req_to_an_unreachable_target_is_nacked_and_spares_the_requesters_health() {
    let mut net = Net::new(3);
    let (target, t) = first_probe(&mut net);
    let helper = B + C - target;
    net.advance_to(t + LAN.probe_timeout);
    let out = net.fire(A);
    let out = net.deliver(A, &out.sent[0]);
    assert_eq!(
        out.sent,
        [to(&net, target, ping(1, helper, target, vec![]))]
    );

    // The target is down: the relayed ping is lost.
    net.advance_to(net.at(LAN.probe_timeout));
    let out = net.fire(helper);
    let nack = SwimMessage::Nack {
        seq: 1,
        from: id(helper),
    };
    assert_eq!(
        out,
        Out {
            sent: vec![to(&net, A, nack)],
            events: vec![],
            timeout: net.idle(helper),
        }
    );
    let out = net.deliver(helper, &out.sent[0]);
    assert_eq!(out.sent, []);
    assert_eq!(out.timeout, Some(t + LAN.probe_interval));

    // The period ends: the target is suspected, and the helper's nack shows this node is not
    // the one at fault, so its health is unchanged.
    assert_eq!(net.now, t + LAN.probe_interval);
    let out = net.fire(A);
    let suspicion = suspect(target, life(1, 0), A);
    assert_eq!(
        out.events,
        [MembershipEvent::Suspect(member(
            &net,
            target,
            MemberState::Suspect,
            life(1, 0)
        ))]
    );
    assert_eq!(net.node(A).health_score(), 0);
    assert_eq!(net.node(A).stats().failed_probes, 1);
    // Then: the next probe (a suspected target also hears of it from the ping itself, the
    // buddy system) and a gossip round with the news.
    let (next, updates) = match &out.sent[0].message {
        SwimMessage::Ping { target: t2, .. } if *t2 == id(target) => {
            (target, vec![suspicion.clone(), suspicion.clone()])
        }
        _ => (helper, vec![suspicion.clone()]),
    };
    assert_eq!(out.sent[0], to(&net, next, ping(2, A, next, updates)));
    assert_eq!(
        by_address(out.sent[1..].to_vec()),
        by_address(vec![
            to(&net, helper, gossip(A, vec![suspicion.clone()])),
            to(&net, target, gossip(A, vec![suspicion])),
        ])
    );
}

/// Node `A` probes `B`, which does not answer, until it suspects `B`; returns when the
/// probe started.
fn suspect_b(net: &mut Net) -> Instant {
    let (_, t) = first_probe(net);
    // No helper to ask with two nodes.
    let out = net.step(A);
    assert_eq!(
        out,
        Out {
            sent: vec![],
            events: vec![],
            timeout: Some(t + LAN.probe_interval),
        }
    );
    let out = net.step(A);
    let suspicion = suspect(B, life(1, 0), A);
    // The next probe carries the suspicion twice: once for the buddy system, once from the
    // broadcast queue. The gossip deadline passed while there was nothing to say, so a
    // gossip round goes out too.
    assert_eq!(
        out,
        Out {
            sent: vec![
                to(
                    net,
                    B,
                    ping(2, A, B, vec![suspicion.clone(), suspicion.clone()])
                ),
                to(net, B, gossip(A, vec![suspicion])),
            ],
            events: vec![MembershipEvent::Suspect(member(
                net,
                B,
                MemberState::Suspect,
                life(1, 0)
            ))],
            timeout: Some(net.at(LAN.gossip_interval)),
        }
    );
    // A probe that failed without a helper's nack counts against this node's health.
    assert_eq!(net.node(A).health_score(), 1);
    t
}

#[test]
fn a_suspected_member_refutes_with_a_higher_incarnation() {
    let mut net = Net::new(2);
    suspect_b(&mut net);
    let gossip_at = net.at(LAN.gossip_interval);
    let probe = to(&net, B, ping(2, A, B, vec![suspect(B, life(1, 0), A); 2]));
    let out = net.deliver(A, &probe);
    let refuted = Update::Alive {
        id: id(B),
        life: life(1, 1),
        meta: MemberMeta::new(net.addr(B)),
    };
    // B's own gossip deadline passed long ago: it gossips the refutation at once.
    assert_eq!(
        out,
        Out {
            sent: vec![to(&net, A, ack(2, B, vec![refuted]))],
            events: vec![],
            timeout: Some(net.start + LAN.gossip_interval),
        }
    );
    assert_eq!(net.node(B).local().life, life(1, 1));
    assert_eq!(net.node(B).stats().refutations, 1);

    let out = net.deliver(B, &out.sent[0]);
    assert_eq!(
        out,
        Out {
            sent: vec![],
            events: vec![MembershipEvent::Alive(member(
                &net,
                B,
                MemberState::Alive,
                life(1, 1)
            ))],
            timeout: Some(gossip_at),
        }
    );
    // The direct ack also restored this node's health, and the suspicion timer is gone.
    assert_eq!(net.node(A).health_score(), 0);
    assert_eq!(net.node(A).timers.deadline(Timer::Suspicion(id(B))), None);
}

#[test]
fn a_suspicion_that_runs_out_declares_the_member_dead() {
    let mut net = Net::new(2);
    let t = suspect_b(&mut net);
    let suspected_at = t + LAN.probe_interval;
    // With two live members the timeout is the minimum: suspicion_mult * probe_interval.
    let timeout = LAN.probe_interval * LAN.suspicion_mult.get();

    // Two more gossip rounds use up the news's four transmissions (ping, first round, these).
    let out = net.run(A, suspected_at + timeout - Duration::from_nanos(1));
    let suspicion = suspect(B, life(1, 0), A);
    assert_eq!(
        out,
        Out {
            sent: vec![
                to(&net, B, gossip(A, vec![suspicion.clone()])),
                to(&net, B, gossip(A, vec![suspicion])),
            ],
            events: vec![],
            timeout: Some(suspected_at + timeout),
        }
    );

    let out = net.step(A);
    assert_eq!(net.now, suspected_at + timeout);
    // Dead, and nobody is left to tell: the news waits and gossip keeps waking the node.
    assert_eq!(
        out,
        Out {
            sent: vec![],
            events: vec![MembershipEvent::Dead(member(
                &net,
                B,
                MemberState::Dead,
                life(1, 0)
            ))],
            timeout: Some(net.at(LAN.gossip_interval)),
        }
    );
    assert_eq!(net.node(A).live_count(), 1);
    assert_eq!(net.node(A).stats().suspicions_raised, 1);
}

#[test]
fn a_dead_member_is_reaped_after_reap_after() {
    let mut net = Net::new(2);
    let t = suspect_b(&mut net);
    let dead_at = t + LAN.probe_interval + LAN.probe_interval * LAN.suspicion_mult.get();
    let out = net.run(A, dead_at);
    assert_eq!(out.events.len(), 1, "{out:?}");
    assert!(matches!(&out.events[0], MembershipEvent::Dead(m) if m.id == id(B)));

    let reap_at = dead_at + LAN.reap_after;
    let out = net.run(A, reap_at - Duration::from_nanos(1));
    assert_eq!((out.sent, out.events), (vec![], vec![]));
    assert_eq!(
        net.node(A).member(id(B)).map(|m| m.state),
        Some(MemberState::Dead)
    );
    assert!(out.timeout.is_some_and(|at| at <= reap_at));

    let out = net.run(A, reap_at);
    // Forgetting is not an event.
    assert_eq!((out.sent, out.events), (vec![], vec![]));
    assert_eq!(net.node(A).member(id(B)), None);
    assert_eq!(net.node(A).members().count(), 0);
}

#[test]
fn a_leaving_node_announces_it_and_stops_probing() {
    let mut net = Net::new(3);
    net.leave(A);
    let left = Update::Left {
        id: id(A),
        life: life(1, 1),
    };
    let out = net.out(A);
    // Gossip is due at once.
    assert_eq!(
        out,
        Out {
            sent: vec![],
            events: vec![],
            timeout: Some(net.now),
        }
    );
    assert_eq!(net.node(A).local().state, MemberState::Left);

    let out = net.fire(A);
    let round = by_address(vec![
        to(&net, B, gossip(A, vec![left.clone()])),
        to(&net, C, gossip(A, vec![left.clone()])),
    ]);
    assert_eq!(by_address(out.sent), round);
    assert_eq!(out.events, []);
    assert_eq!(out.timeout, Some(net.at(LAN.gossip_interval)));

    let out = net.deliver(A, &round[0]);
    assert_eq!(
        out,
        Out {
            sent: vec![],
            events: vec![MembershipEvent::Left(member(
                &net,
                A,
                MemberState::Left,
                life(1, 1)
            ))],
            timeout: Some(net.start + LAN.gossip_interval),
        }
    );

    // A second round uses up the four transmissions; then no probe, no gossip: only the
    // year-away push-pull is left.
    let out = net.step(A);
    assert_eq!(by_address(out.sent), round);
    let idle = net.node(A).timers.deadline(Timer::PushPull);
    assert_eq!(
        out.timeout,
        idle.min(net.node(A).timers.deadline(Timer::Reannounce))
    );
    assert_eq!(net.node(A).stats().probes, 0);
}

#[test]
fn a_restart_with_a_new_generation_replaces_the_old_entry() {
    let mut net = Net::new(2);
    // B restarts: same id, next generation, new address, joining through A.
    let addr = Address::new("n2.g2:1");
    let restarted = NodeStart {
        id: id(B),
        generation: 2,
        meta: MemberMeta::new(addr.clone()),
        seeds: vec![net.addr(A)],
        rng_seed: net.seed ^ 0xB2,
        security: crate::membership::Security::Insecure,
    };
    net.nodes[B] = Membership::new(quiet_config(), restarted, net.now);
    net.addrs[B] = addr.clone();
    let new_b = Member {
        id: id(B),
        life: life(2, 0),
        state: MemberState::Alive,
        meta: MemberMeta::new(addr.clone()),
    };

    let out = net.fire(B);
    let join = SwimMessage::PushPull {
        from: id(B),
        join: true,
        reply: false,
        part: 0,
        members: vec![new_b.clone()],
    };
    assert_eq!(out.sent, [to(&net, A, join)]);
    assert_eq!(out.timeout, Some(net.at(LAN.join_retry_interval)));

    let out = net.deliver(B, &out.sent[0]);
    let a = net.node(A).local().clone();
    let reply = push_pull_reply(A, vec![a.clone(), new_b.clone()]);
    assert_eq!(
        out,
        Out {
            sent: vec![to(&net, B, reply.clone())],
            events: vec![MembershipEvent::Updated(new_b.clone())],
            // Gossip of the news is due; the deadline passed while there was nothing to say.
            timeout: net.idle(A).min(Some(net.start + LAN.gossip_interval)),
        }
    );
    // The live address moved with it.
    assert!(net.node(A).members.addr_is_live(&addr));
    assert!(!net.node(A).members.addr_is_live(&Address::new("n2:1")));

    // News about the old life, even at a higher incarnation, is ignored.
    let stale = gossip(
        B,
        vec![
            Update::Alive {
                id: id(B),
                life: life(1, 9),
                meta: MemberMeta::new("n2:1"),
            },
            suspect(B, life(1, 9), B),
        ],
    );
    let out = net.deliver_from(B, A, stale);
    assert_eq!((out.sent, out.events), (vec![], vec![]));
    assert_eq!(net.node(A).member(id(B)), Some(&new_b));

    let out = net.deliver(A, &to(&net, B, reply));
    assert_eq!(out.events, [MembershipEvent::Joined(a)]);
    assert!(net.node(B).is_joined());
    assert_eq!(net.node(B).timers.deadline(Timer::Join), None);
}

#[test]
fn messages_from_an_unknown_sender() {
    let mut net = Net::new(2);
    let stranger = Address::new("x9");
    let before = net.node(A).stats().ignored_messages;
    let idle = net.idle(A);

    // A ping is answered wherever it came from; the sender does not become a member.
    let from_stranger = SwimMessage::Ping {
        seq: 7,
        from: NodeId(9),
        target: id(A),
        updates: vec![],
    };
    net.nodes[A].handle_message(net.now, stranger.clone(), from_stranger);
    let answer = Transmit {
        to: stranger.clone(),
        message: ack(7, A, vec![]),
    };
    assert_eq!(
        net.out(A),
        Out {
            sent: vec![answer],
            events: vec![],
            timeout: idle,
        }
    );
    assert_eq!(net.node(A).member(NodeId(9)), None);

    // An ack nobody waits for, and a ping meant for someone else, are counted and dropped.
    net.nodes[A].handle_message(net.now, stranger.clone(), ack(3, 8, vec![]));
    let misdirected = SwimMessage::Ping {
        seq: 8,
        from: NodeId(9),
        target: NodeId(5),
        updates: vec![],
    };
    net.nodes[A].handle_message(net.now, stranger, misdirected);
    assert_eq!(
        net.out(A),
        Out {
            sent: vec![],
            events: vec![],
            timeout: idle,
        }
    );
    assert_eq!(net.node(A).stats().ignored_messages, before + 2);
}

fn alive(i: usize, life: Life, addr: &str) -> Update {
    Update::Alive {
        id: id(i),
        life,
        meta: MemberMeta::new(addr),
    }
}

fn ping_req(from: usize, target: NodeId, target_addr: &str) -> SwimMessage {
    SwimMessage::PingReq {
        seq: 1,
        from: id(from),
        target,
        target_addr: Address::new(target_addr),
        updates: vec![],
    }
}

#[test]
fn a_ping_req_is_relayed_only_for_live_members_to_their_known_address_within_budget() {
    let mut net = Net::new(3);
    // The node-wide budget, with one requester: its per-requester budget out of the way
    // (`auth_tests::a_flooding_member_is_rate_limited_per_peer` covers that one).
    net.nodes[B].config.max_relays_per_peer_per_second = net.nodes[B].config.max_relays_per_second;
    // From a stranger, or about a member not known alive: refused.
    let out = net.deliver_from(A, B, ping_req(7, id(C), "n3:1"));
    assert_eq!(out.sent, []);
    let out = net.deliver_from(A, B, ping_req(A, NodeId(8), "victim:80"));
    assert_eq!(out.sent, []);
    assert_eq!(net.node(B).stats().refused_relays, 2);
    // From a live member: relayed to the target's known address, never the one named.
    let out = net.deliver_from(A, B, ping_req(A, id(C), "victim:80"));
    assert_eq!(out.sent, [to(&net, C, ping(1, B, C, vec![]))]);
    // The budget holds one second's worth; the next ping-req in the same instant is refused,
    // and a second later there is room again.
    let budget = net.node(B).config.max_relays_per_second.get();
    for _ in 1..budget {
        assert_eq!(
            net.deliver_from(A, B, ping_req(A, id(C), "n3:1"))
                .sent
                .len(),
            1
        );
    }
    assert_eq!(net.deliver_from(A, B, ping_req(A, id(C), "n3:1")).sent, []);
    assert_eq!(net.node(B).stats().refused_relays, 3);
    net.advance_to(net.at(Duration::from_secs(1)));
    assert_eq!(
        net.deliver_from(A, B, ping_req(A, id(C), "n3:1"))
            .sent
            .len(),
        1
    );
}

#[test]
fn a_nack_counts_only_from_a_helper_asked_for_that_probe() {
    let mut net = Net::new(3);
    let (target, t) = first_probe(&mut net);
    let helper = B + C - target;
    net.advance_to(t + LAN.probe_timeout);
    let out = net.fire(A);
    assert_eq!(out.sent.len(), 1, "{out:?}");
    let before = net.node(A).stats().ignored_messages;
    // Nacks from the target, from a stranger, and for another probe: ignored.
    for (seq, from) in [(1, id(target)), (1, NodeId(9)), (2, id(helper))] {
        let nack = SwimMessage::Nack { seq, from };
        net.deliver_from(helper, A, nack);
    }
    assert_eq!(net.node(A).stats().ignored_messages, before + 3);
    // The period ends without the helper's nack: the failed probe counts against A.
    net.advance_to(t + LAN.probe_interval);
    net.fire(A);
    assert_eq!(net.node(A).health_score(), 1);
}

#[test]
fn alive_news_is_validated_capped_per_message_and_by_the_member_limit() {
    let mut net = Net::new(2);
    net.nodes[A].config.max_members = NonZeroUsize::new(3).unwrap();
    let bad_weight = Update::Alive {
        id: NodeId(20),
        life: life(1, 0),
        meta: MemberMeta {
            weight: NonZeroU32::new(MAX_WEIGHT + 1).unwrap(),
            ..MemberMeta::new("n20:1")
        },
    };
    let long = "a".repeat(MAX_ADDR_LEN + 1);
    let updates = vec![
        alive(20, life(1, 0), ""),
        alive(20, life(1, 0), "has space:1"),
        alive(20, life(1, 0), &long),
        bad_weight,
    ];
    let out = net.deliver_from(B, A, gossip(B, updates));
    assert_eq!(out.events, []);
    assert_eq!(net.node(A).stats().invalid_updates, 4);

    // Room for one more member (A and B make two of three), then the table is full.
    let out = net.deliver_from(
        B,
        A,
        gossip(B, vec![alive(4, life(1, 0), "127.0.0.1:7005")]),
    );
    assert_eq!(out.events.len(), 1, "{out:?}");
    let out = net.deliver_from(B, A, gossip(B, vec![alive(5, life(1, 0), "n6:1")]));
    assert_eq!(out.events, []);
    assert_eq!(net.node(A).stats().refused_members, 1);

    // At most max_updates_per_message are applied from one message.
    let max = LAN.max_updates_per_message.get();
    let many = (0..max + 4)
        .map(|_| suspect(B, life(1, 0), A))
        .collect::<Vec<_>>();
    net.deliver_from(B, A, gossip(B, many));
    assert_eq!(net.node(A).stats().dropped_updates, 4);
}

#[test]
fn a_full_state_too_large_for_one_message_goes_in_parts_and_only_part_0_is_answered() {
    let mut net = Net::new(3);
    // Room for one member record per message.
    net.nodes[A].config.max_message_len = NonZeroUsize::new(150).unwrap();
    let b = net.node(B).local().clone();
    let request = |part| SwimMessage::PushPull {
        from: id(B),
        join: false,
        reply: false,
        part,
        members: vec![b.clone()],
    };
    let out = net.deliver_from(B, A, request(0));
    let parts: Vec<(u32, usize)> = out
        .sent
        .iter()
        .map(|t| match &t.message {
            SwimMessage::PushPull {
                reply: true,
                part,
                members,
                ..
            } => (*part, members.len()),
            other => panic!("not a push-pull reply: {other:?}"),
        })
        .collect();
    assert_eq!(parts, [(0, 1), (1, 1), (2, 1)]);
    let out = net.deliver_from(B, A, request(1));
    assert_eq!(out.sent, []);
}

#[test]
fn suspect_or_dead_news_about_a_newer_generation_does_not_replace_the_old_life() {
    let mut net = Net::new(2);
    // B restarted as generation 2 at n2.g2; A hears a suspicion and a death of the new life
    // before the new life's alive.
    let news = vec![
        suspect(B, life(2, 0), C),
        Update::Dead {
            id: id(B),
            life: life(2, 0),
            from: id(C),
        },
    ];
    let out = net.deliver_from(B, A, gossip(B, news));
    assert_eq!(out.events, []);
    assert_eq!(net.node(A).stats().newer_life_ignored, 2);
    assert_eq!(net.node(A).member(id(B)).unwrap().life, life(1, 0));
    // The alive of the new life, with its address, is taken.
    let out = net.deliver_from(B, A, gossip(B, vec![alive(B, life(2, 0), "n2.g2:1")]));
    let new_b = Member {
        id: id(B),
        life: life(2, 0),
        state: MemberState::Alive,
        meta: MemberMeta::new("n2.g2:1"),
    };
    assert_eq!(out.events, [MembershipEvent::Updated(new_b)]);
}

#[test]
fn a_reaped_member_does_not_come_back_from_a_stale_alive() {
    let mut net = Net::new(2);
    let t = suspect_b(&mut net);
    let dead_at = t + LAN.probe_interval + LAN.probe_interval * LAN.suspicion_mult.get();
    net.run(A, dead_at + LAN.reap_after);
    assert_eq!(net.node(A).member(id(B)), None, "reaped");
    // A stale alive of the life it died in (from a member with an old view) is refused.
    let stale = gossip(C, vec![alive(B, life(1, 0), "n2:1")]);
    let out = net.deliver_from(B, A, stale);
    assert_eq!(out.events, []);
    assert_eq!(net.node(A).stats().forgotten_refused, 1);
    // A newer incarnation (B was alive after all) is a return.
    let out = net.deliver_from(B, A, gossip(B, vec![alive(B, life(1, 1), "n2:1")]));
    assert!(
        matches!(&out.events[..], [MembershipEvent::Joined(m)] if m.id == id(B)),
        "{out:?}"
    );
}

#[test]
fn a_leave_at_the_largest_incarnation_does_not_overflow() {
    let mut net = Net::new(2);
    net.nodes[A].local.life.incarnation = u64::MAX;
    net.leave(A);
    assert_eq!(net.node(A).local().life, life(1, u64::MAX));
    assert_eq!(net.node(A).local().state, MemberState::Left);
    let out = net.step(A);
    let left = Update::Left {
        id: id(A),
        life: life(1, u64::MAX),
    };
    assert_eq!(out.sent, [to(&net, B, gossip(A, vec![left]))]);
}

/// A refutation is a short burst of `retransmit_mult * ceil(log10(n + 1))` messages to random
/// members; one that misses a suspecter used to be final (the suspecter declared the live
/// member dead when its suspicion ran out) because news of the refuted life was ignored
/// without an answer. Now the suspect answers the buddy system's ping with its current alive,
/// and so does a third party that knows the newer life.
#[test]
fn a_stale_suspicion_is_answered_with_the_newer_alive() {
    let mut net = Net::new(3);
    let (target, _) = first_probe(&mut net);
    let other = if target == B { C } else { B };
    // `other` is suspected and refutes (as if A's suspicion reached it through gossip)...
    let out = net.deliver_from(A, other, gossip(A, vec![suspect(other, life(1, 0), A)]));
    assert!(out.events.is_empty(), "{out:?}");
    assert_eq!(net.node(other).local().life, life(1, 1));
    assert_eq!(net.node(other).stats().refutations, 1);
    // ...and its refutation burst ends without reaching A, which still suspects life 1.0.
    net.nodes[other].broadcasts = Broadcasts::default();
    let refuted = alive(other, life(1, 1), net.addr(other).as_str());

    // A's probe of the suspect carries the stale suspicion (buddy system): the ack answers
    // it with the current life, and the suspect does not move to yet another incarnation.
    let out = net.deliver_from(
        A,
        other,
        ping(9, A, other, vec![suspect(other, life(1, 0), A)]),
    );
    assert_eq!(
        out.sent,
        [to(&net, A, ack(9, other, vec![refuted.clone()]))]
    );
    assert_eq!(net.node(other).local().life, life(1, 1));
    assert_eq!(net.node(other).stats().refutations, 1);

    // A third party that knows the newer life answers stale news the same way.
    let third = target;
    let out = net.deliver_from(other, third, gossip(other, vec![refuted.clone()]));
    assert!(out.events.is_empty(), "alive to alive is no event: {out:?}");
    net.nodes[third].broadcasts = Broadcasts::default();
    let stale = suspect(other, life(1, 0), A);
    let out = net.deliver_from(A, third, ping(10, A, third, vec![stale]));
    assert_eq!(out.sent, [to(&net, A, ack(10, third, vec![refuted]))]);
}

#[test]
fn the_message_limit_is_lowered_to_the_transports_frame_limit_never_raised() {
    let mut config = MembershipConfig::local();
    config.max_message_len = NonZeroUsize::new(1 << 20).unwrap();
    let mut machine = Membership::new(
        config,
        NodeStart {
            id: NodeId(1),
            generation: 1,
            meta: MemberMeta::new("n1:1"),
            seeds: Vec::new(),
            rng_seed: seed(),
            security: crate::membership::Security::Insecure,
        },
        Instant::now(),
    );
    machine.limit_message_len(64 * 1024);
    assert_eq!(machine.config().max_message_len.get(), 64 * 1024);
    machine.limit_message_len(1 << 30);
    assert_eq!(machine.config().max_message_len.get(), 64 * 1024);
    machine.limit_message_len(0);
    assert_eq!(machine.config().max_message_len.get(), 64 * 1024);
}

#[test]
fn the_answer_to_a_forgotten_member_keeps_every_part_within_the_message_limit() {
    let mut net = Net::new(2);
    let t = suspect_b(&mut net);
    let dead_at = t + LAN.probe_interval + LAN.probe_interval * LAN.suspicion_mult.get();
    net.run(A, dead_at + LAN.reap_after);
    assert_eq!(net.node(A).member(id(B)), None, "reaped");
    // Room for one member record per frame (each is about 40 bytes, the frame around it about
    // 20): A's own record fills part 0.
    let limit = 80;
    net.nodes[A].config.max_message_len = NonZeroUsize::new(limit).unwrap();
    // B comes back in the life A forgot it in and asks for the state.
    let b = Member {
        id: id(B),
        life: life(1, 0),
        state: MemberState::Alive,
        meta: MemberMeta::new("n2:1"),
    };
    let request = SwimMessage::PushPull {
        from: id(B),
        join: false,
        reply: false,
        part: 0,
        members: vec![b],
    };
    let out = net.deliver_from(B, A, request);
    let mut told_dead = false;
    for t in &out.sent {
        let SwimMessage::PushPull { members, .. } = &t.message else {
            panic!("not a push-pull: {t:?}");
        };
        let frame = crate::wire::encode(
            crate::wire::Header::message(),
            &crate::envelope::Envelope::Swim(t.message.clone()),
            crate::wire::DEFAULT_MAX_FRAME_LEN,
        )
        .expect("encodes");
        assert!(
            frame.len() <= limit,
            "a part of {} bytes: {t:?}",
            frame.len()
        );
        told_dead |= members
            .iter()
            .any(|m| m.id == id(B) && m.state == MemberState::Dead && m.life == life(1, 0));
    }
    assert!(
        told_dead,
        "B was not told the life it was forgotten in: {out:?}"
    );
}

#[test]
fn a_member_that_hears_a_fresh_suspicion_probes_the_suspect_next() {
    // Six live members: K = 3 confirmations apply and 2K / live = 1, so the early probe is
    // certain (at N = 1,000 it is 0.6%, about six members).
    let mut net = Net::new(6);
    let (first, t) = first_probe(&mut net);
    let out = net.deliver_from(first, A, ack(1, first, vec![]));
    assert_eq!(out.timeout, Some(t + LAN.probe_interval));
    // The first period probed A's ring successor, which leaves the round untouched.
    assert_eq!(first, B);
    let upcoming = net.node(A).probes.upcoming().to_vec();
    assert_eq!(upcoming.len(), 5, "{upcoming:?}");
    // A member due last in A's round is suspected by another member.
    let suspected = upcoming[4].0 as usize - 1;
    let sender = upcoming[0].0 as usize - 1;
    let out = net.deliver_from(
        sender,
        A,
        gossip(sender, vec![suspect(suspected, life(1, 0), sender)]),
    );
    assert_eq!(
        out.events,
        [MembershipEvent::Suspect(member(
            &net,
            suspected,
            MemberState::Suspect,
            life(1, 0)
        ))]
    );
    // A's next probe goes to the suspect (with the buddy-system news), not to `sender`...
    net.advance_to(t + LAN.probe_interval);
    let out = net.step(A);
    let pings: Vec<_> = out
        .sent
        .iter()
        .filter_map(|t| match &t.message {
            SwimMessage::Ping { target, .. } => Some((t.to.clone(), *target)),
            _ => None,
        })
        .collect();
    assert_eq!(pings, [(net.addr(suspected), id(suspected))]);
    // ...and the suspect is not probed a second time in this round.
    let rest = net.node(A).probes.upcoming().to_vec();
    assert_eq!(rest, upcoming[..4], "the rest of the round, in order");
}

/// The targets of A's next `periods` probes, each acked at once by its target (gossip
/// rounds between them are fired and ignored).
fn probe_targets(net: &mut Net, periods: usize) -> Vec<usize> {
    let mut targets = Vec::new();
    for period in 0..periods {
        let ping = (0..8).find_map(|_| {
            let out = net.step(A);
            let pings: Vec<(u32, NodeId)> = out
                .sent
                .iter()
                .filter_map(|t| match t.message {
                    SwimMessage::Ping { seq, target, .. } => Some((seq, target)),
                    _ => None,
                })
                .collect();
            assert!(pings.len() <= 1, "period {period}: {out:?}");
            pings.first().copied()
        });
        let Some((seq, target)) = ping else {
            panic!("period {period}: no ping in 8 steps");
        };
        let target = target.0 as usize - 1;
        targets.push(target);
        net.deliver_from(target, A, ack(seq, target, vec![]));
    }
    targets
}

#[test]
fn every_other_period_probes_the_ring_successor_and_the_rest_go_round_robin() {
    let mut net = Net::new(6);
    let targets = probe_targets(&mut net, 10);
    let successor: Vec<usize> = targets.iter().step_by(2).copied().collect();
    assert_eq!(successor, [B; 5], "{targets:?}");
    // The five periods between cover the whole round, the successor included, once each.
    let mut round: Vec<usize> = targets.iter().skip(1).step_by(2).copied().collect();
    round.sort();
    assert_eq!(round, [B, C, 3, 4, 5], "{targets:?}");
}

#[test]
fn the_ring_successor_skips_dead_members_and_wraps_around() {
    let mut net = Net::new(4);
    // B is dead in A's view: C (the next id) is A's successor.
    net.deliver_from(
        C,
        A,
        gossip(
            C,
            vec![Update::Dead {
                id: id(B),
                life: life(1, 0),
                from: id(C),
            }],
        ),
    );
    let targets = probe_targets(&mut net, 6);
    let successor: Vec<usize> = targets.iter().step_by(2).copied().collect();
    assert_eq!(successor, [C; 3], "{targets:?}");
    assert!(
        !targets.contains(&B),
        "a dead member was probed: {targets:?}"
    );
    // The last member's successor wraps around to the first.
    let members = &net.node(3).members;
    assert_eq!(members.live_successor(id(3)), Some(id(A)));
}

#[test]
fn member_addresses_must_be_host_port() {
    for good in [
        "10.0.0.1:7946",
        "db-3.example:7946",
        "[::1]:7946",
        "n3.g1:1",
    ] {
        assert_eq!(MemberMeta::new(good).validate(), Ok(()), "{good}");
    }
    for bad in [
        "n3", "n3:", "n3:0", "n3:65536", ":7946", "::1:7946", "[::1]", "[nope]:1", "a:b:1", "n3:+1",
    ] {
        assert_eq!(
            MemberMeta::new(bad).validate(),
            Err(super::message::MetaError::NotHostPort),
            "{bad}"
        );
    }
    // Refused on receipt like any invalid metadata.
    let mut net = Net::new(2);
    let out = net.deliver_from(B, A, gossip(B, vec![alive(20, life(1, 0), "n20")]));
    assert_eq!(out.events, []);
    assert_eq!(net.node(A).stats().invalid_updates, 1);
}

/// A member that floods push-pulls (each one a request for this node's whole state) is
/// answered within its budget only: past
/// [`MembershipConfig::max_push_pulls_per_peer_per_second`] a request is neither answered
/// nor merged, and is counted; another member has a budget of its own; the budget refills
/// with time; a push-pull answer past the budget is not merged either.
#[test]
fn a_member_flooding_push_pulls_is_answered_within_its_budget_only() {
    let mut net = Net::new(3);
    net.nodes[A].config.max_push_pulls_per_peer_per_second = NonZeroU32::new(3).unwrap();
    let a = net.node(A).local().clone();
    let b = net.node(B).local().clone();
    let c = net.node(C).local().clone();
    let request = |from: &Member| SwimMessage::PushPull {
        from: from.id,
        join: false,
        reply: false,
        part: 0,
        members: vec![from.clone()],
    };
    let answer = |net: &Net, to_node: usize| {
        to(
            net,
            to_node,
            SwimMessage::PushPull {
                from: id(A),
                join: false,
                reply: true,
                part: 0,
                members: vec![a.clone(), b.clone(), c.clone()],
            },
        )
    };
    let answered = |net: &Net, to_node: usize| Out {
        sent: vec![answer(net, to_node)],
        events: vec![],
        timeout: net.idle(A),
    };
    let refused = |net: &Net| Out {
        sent: vec![],
        events: vec![],
        timeout: net.idle(A),
    };

    // B's first three requests are answered with A's whole state.
    for n in 1..=3 {
        let out = net.deliver_from(B, A, request(&b));
        assert_eq!(out, answered(&net, B), "request {n}");
    }
    assert_eq!(net.node(A).stats().rate_limited_push_pulls, 0);
    // The fourth and fifth, in the same instant, are refused and counted.
    let out = net.deliver_from(B, A, request(&b));
    assert_eq!(out, refused(&net));
    assert_eq!(net.node(A).stats().rate_limited_push_pulls, 1);
    let out = net.deliver_from(B, A, request(&b));
    assert_eq!(out, refused(&net));
    assert_eq!(net.node(A).stats().rate_limited_push_pulls, 2);

    // C has a budget of its own.
    let out = net.deliver_from(C, A, request(&c));
    assert_eq!(out, answered(&net, C));
    assert_eq!(net.node(A).stats().rate_limited_push_pulls, 2);

    // Past the budget, B's full state is not merged either: the news of a new member in it
    // is dropped with the message.
    let newcomer = Member {
        id: id(5),
        life: life(1, 0),
        state: MemberState::Alive,
        meta: MemberMeta::new("n6:1"),
    };
    let reply = SwimMessage::PushPull {
        from: id(B),
        join: false,
        reply: true,
        part: 0,
        members: vec![b.clone(), newcomer.clone()],
    };
    let out = net.deliver_from(B, A, reply.clone());
    assert_eq!(out, refused(&net));
    assert_eq!(net.node(A).stats().rate_limited_push_pulls, 3);
    assert!(net.node(A).member(id(5)).is_none());

    // 400 ms later B has earned 1.2 requests: one is taken, the next refused.
    let later = net.at(Duration::from_millis(400));
    net.advance_to(later);
    let out = net.deliver_from(B, A, reply);
    assert_eq!(out.sent, []);
    assert_eq!(out.events, [MembershipEvent::Joined(newcomer.clone())]);
    assert_eq!(net.node(A).stats().rate_limited_push_pulls, 3);
    let out = net.deliver_from(B, A, request(&b));
    assert_eq!(out.sent, []);
    assert_eq!(out.events, []);
    assert_eq!(net.node(A).stats().rate_limited_push_pulls, 4);
}

#[test]
fn new_metadata_goes_out_at_the_next_incarnation_and_peers_report_it_updated() {
    let mut net = Net::new(3);
    let mut meta = net.node(A).local().meta.clone();
    meta.joining = true;
    assert!({
        let now = net.now;
        net.node_mut(A).set_meta(now, meta.clone())
    });
    assert_eq!(net.node(A).local().life, life(1, 1));
    let update = Update::Alive {
        id: id(A),
        life: life(1, 1),
        meta: meta.clone(),
    };
    // Gossip is due at once, and carries the new record.
    let out = net.fire(A);
    let round = by_address(vec![
        to(&net, B, gossip(A, vec![update.clone()])),
        to(&net, C, gossip(A, vec![update.clone()])),
    ]);
    assert_eq!(by_address(out.sent), round);

    let out = net.deliver(A, &round[0]);
    let mut expected = member(&net, A, MemberState::Alive, life(1, 1));
    expected.meta = meta.clone();
    assert_eq!(out.events, vec![MembershipEvent::Updated(expected)]);

    // The same metadata again changes nothing; invalid metadata is refused.
    assert!({
        let now = net.now;
        net.node_mut(A).set_meta(now, meta.clone())
    });
    assert_eq!(net.node(A).local().life, life(1, 1));
    let mut bad = meta;
    bad.addr = Address::new("no port");
    assert!(!{
        let now = net.now;
        net.node_mut(A).set_meta(now, bad)
    });
    assert_eq!(net.node(A).local().life, life(1, 1));
}
