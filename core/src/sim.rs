//! A deterministic simulator: many [`Membership`] machines on one virtual clock.
//!
//! No tokio, no threads, no sockets: a binary heap of timed actions (message deliveries and
//! timer expiries) drives the machines directly, in virtual time, and a single seeded
//! [`ChaCha8Rng`] decides every fault. The same seed and the same calls give the same run,
//! bit for bit; a failing test prints its seed and replays from it.
//!
//! Faults: global and per-link loss, a uniform delay range, two-way partitions between groups,
//! one-way blocks, crashes (the machine is dropped with everything in flight to it), restarts
//! (a new generation at a new address, joining through the original seeds; or at the same
//! address; or with a chosen, possibly lower, generation), slow nodes (every message to them is
//! processed late, as on an overloaded machine) and pauses (a stop-the-world pause: nothing is
//! processed for a while, then everything that arrived and every timer that fell due meanwhile
//! is handled at once, in order).
//!
//! Nodes are numbered from 0; node `i` has id `NodeId(i + 1)` and address `n{i}.g{generation}:1`
//! (the generation it was started with; a restart in place keeps the address).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::auth::{Identity, Keyring};
use crate::envelope::Envelope;
use crate::identity::{Address, NodeId};
use crate::membership::{
    MemberMeta, MemberState, Membership, MembershipConfig, MembershipEvent, NodeStart, Security,
    SignedSwim, SwimFrame, SwimMessage, UnsignedFrame, UnsignedSwim, VerifiedFrame, verify_frame,
};
use crate::wire::{self, Header};

/// Counters of a simulation run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SimStats {
    /// Messages the machines asked to send.
    pub messages: u64,
    /// Bytes of those messages as encoded frames (only counted with the codec on).
    pub bytes: u64,
    /// Of `messages`, the full-state exchanges ([`SwimMessage::PushPull`]).
    pub push_pull_messages: u64,
    /// Of `bytes`, those of full-state exchanges.
    pub push_pull_bytes: u64,
    /// Messages delivered to a running machine.
    pub delivered: u64,
    /// Lost to random loss.
    pub dropped_loss: u64,
    /// Lost to a partition or block.
    pub dropped_partition: u64,
    /// Sent to an address nobody holds, or to a node that crashed before delivery.
    pub dropped_unreachable: u64,
    /// Frames the codec rejected (never expected).
    pub rejected_frames: u64,
    /// Suspect events (summed over observers) about a healthy member: one running at normal
    /// speed (not slowed by [`Simulation::set_slow`]), in the life the event is about.
    pub false_suspicions: u64,
    /// Dead events (summed over observers) about a healthy member, in the same sense.
    pub false_deaths: u64,
    /// Joined, alive or updated events about an ended life of a node that has restarted.
    pub stale_resurrections: u64,
}

/// One membership event as a node saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimEvent {
    /// Virtual time.
    pub at: Duration,
    /// The node that saw it.
    pub observer: usize,
    /// What it saw.
    pub event: MembershipEvent,
}

enum Action {
    Deliver {
        to: usize,
        epoch: u64,
        from: Address,
        /// The key of the message in [`Simulation::inflight`].
        msg: u64,
    },
    Timer {
        node: usize,
        epoch: u64,
    },
}

/// A message as a machine hands it to the simulator.
enum Outgoing {
    Plain(SwimMessage),
    Signed(SignedSwim),
    /// Left to the pool to sign.
    ToSign(UnsignedSwim),
}

enum Payload {
    Message(Box<SwimFrame>),
    Frame(Bytes),
    /// To sign with `signer`, then (with `codec`) encode, before it is decoded and verified.
    ToSign {
        unsigned: Box<UnsignedSwim>,
        signer: Arc<Identity>,
        codec: bool,
    },
    /// Decoded and, for a signed frame to a node with a keyring, verified ahead of delivery
    /// (see [`Simulation::prepare`]).
    Ready(Ready),
}

/// A message as [`Simulation::prepare`] leaves it for delivery.
enum Ready {
    /// For [`Membership::handle_frame`]: plain, insecure, or refused by [`verify_frame`]
    /// (the machine checks it again and counts the refusal).
    Frame(Box<SwimFrame>),
    /// For [`Membership::handle_verified_frame`].
    Verified(Box<VerifiedFrame>),
    /// The codec refused the frame.
    Rejected,
    /// A frame of another protocol.
    Ignored,
}

struct Scheduled {
    at: Duration,
    seq: u64,
    action: Action,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    // Reversed: the heap pops the earliest action, ties in scheduling order.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct SimNode {
    config: MembershipConfig,
    seeds: Vec<usize>,
    /// The generation of the current (or, crashed, the last) life, as the machine has it: a
    /// machine may move itself to a newer one.
    generation: u64,
    /// Generations of lives that ended.
    ended: HashSet<u64>,
    /// Nothing is processed before then (a pause).
    paused_until: Duration,
    addr: Address,
    machine: Option<Membership>,
    epoch: u64,
    timer_at: Option<Duration>,
    slow: Duration,
    sent_messages: u64,
    sent_bytes: u64,
    /// The node's identity, for the pool to sign with (keyring mode, made when first needed).
    signer: Option<Arc<Identity>>,
}

/// The simulator. See the [module documentation](self).
pub struct Simulation {
    seed: u64,
    base: Instant,
    now: Duration,
    rng: ChaCha8Rng,
    queue: BinaryHeap<Scheduled>,
    next_seq: u64,
    nodes: Vec<SimNode>,
    by_addr: HashMap<Address, usize>,
    loss: f64,
    link_loss: HashMap<(usize, usize), f64>,
    delay: (Duration, Duration),
    groups: Vec<u32>,
    blocked: HashSet<(usize, usize)>,
    codec: bool,
    stats: SimStats,
    log: Option<Vec<SimEvent>>,
    detections: HashMap<NodeId, Vec<(usize, Duration)>>,
    /// Keyring mode: the keyring nodes boot with (`None`: insecure).
    keyring: Option<Keyring>,
    /// The same, shared with the pool's threads.
    keyring_shared: Option<Arc<Keyring>>,
    /// Node ids by index, and back.
    ids: Vec<NodeId>,
    index: HashMap<NodeId, usize>,
    /// Messages in flight, by message number, that the pool does not hold.
    inflight: HashMap<u64, Payload>,
    next_msg: u64,
    /// Decodes and verifies messages ahead of delivery (with more than one thread).
    pool: Option<Pool>,
    /// Messages dropped while the pool held them: their results are thrown away.
    discarded: HashSet<u64>,
}

impl std::fmt::Debug for Simulation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulation")
            .field("seed", &self.seed)
            .field("now", &self.now)
            .field("nodes", &self.nodes.len())
            .field("stats", &self.stats)
            .finish()
    }
}

fn mix(mut x: u64) -> u64 {
    // splitmix64
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Simulation {
    /// An empty simulation whose every random choice follows from `seed`. Messages take
    /// between 1 and 5 ms by default; nothing is lost.
    pub fn new(seed: u64) -> Self {
        Simulation {
            seed,
            base: Instant::now(),
            now: Duration::ZERO,
            rng: ChaCha8Rng::seed_from_u64(seed),
            queue: BinaryHeap::new(),
            next_seq: 0,
            nodes: Vec::new(),
            by_addr: HashMap::new(),
            loss: 0.0,
            link_loss: HashMap::new(),
            delay: (Duration::from_millis(1), Duration::from_millis(5)),
            groups: Vec::new(),
            blocked: HashSet::new(),
            codec: false,
            stats: SimStats::default(),
            log: None,
            detections: HashMap::new(),
            keyring: None,
            keyring_shared: None,
            ids: Vec::new(),
            index: HashMap::new(),
            inflight: HashMap::new(),
            next_msg: 0,
            pool: None,
            discarded: HashSet::new(),
        }
    }

    /// Decodes and verifies messages on `threads` threads in all (at least 1, the default:
    /// everything on the caller's thread). Call it before sending anything.
    ///
    /// Signing a frame needs only the sender's identity, decoding and verifying it only the
    /// receiver's keyring, so with more than one thread the simulator polls the machines'
    /// frames unsigned ([`Membership::poll_unsigned_frame`]) and hands every message of a
    /// keyring simulation to `threads - 1` helper threads as it is sent (an insecure one's
    /// are only decoded, on delivery); they sign, encode, decode and verify it
    /// while the machines run, and the calling thread helps when a message it must deliver
    /// is not ready. Signatures are deterministic, so the frames are the same bytes. The machines still
    /// receive every message one at a time, in the same order, a verified one through
    /// [`Membership::handle_verified_frame`]. The run is the same, bit for bit, whatever the
    /// number of threads.
    pub fn set_threads(&mut self, threads: usize) {
        if let Some(pool) = self.pool.take() {
            // What the old pool holds is prepared on delivery, on this thread.
            let (jobs, results) = pool.stop();
            for job in jobs {
                self.inflight.insert(job.msg, job.payload);
            }
            for (msg, ready) in results {
                if !self.discarded.remove(&msg) {
                    self.inflight.insert(msg, Payload::Ready(ready));
                }
            }
            self.discarded.clear();
        }
        self.pool = (threads > 1).then(|| Pool::new(threads - 1));
    }

    /// Switches to keyring mode (before any node is added): every node signs its messages
    /// with its own identity ([`Simulation::identity`]) and boots with a keyring listing the
    /// identities of nodes `0..admitted`; nodes added beyond those are outsiders until a
    /// keyring lists them ([`Simulation::set_keyring`]). Node ids are then the identities'.
    pub fn enable_signing(&mut self, admitted: usize) {
        assert!(self.nodes.is_empty(), "enable_signing before adding nodes");
        let keys = (0..admitted).map(|i| self.identity(i).public_key());
        let keyring = Keyring::from_keys(keys).expect("64-bit ids of distinct keys");
        self.keyring_shared = Some(Arc::new(keyring.clone()));
        self.keyring = Some(keyring);
    }

    /// The identity node `i` has in keyring mode, derived from the simulation's seed.
    pub fn identity(&self, i: usize) -> Identity {
        let mut secret = [0u8; 32];
        for (k, chunk) in secret.chunks_exact_mut(8).enumerate() {
            chunk
                .copy_from_slice(&mix(self.seed ^ mix(i as u64 + 1) ^ mix(k as u64)).to_le_bytes());
        }
        Identity::from_secret(secret)
    }

    /// The keyring nodes boot with, in keyring mode.
    pub fn keyring(&self) -> Option<&Keyring> {
        self.keyring.as_ref()
    }

    /// Gives every running node `keyring` now (rotation), and nodes booted later too.
    pub fn set_keyring(&mut self, keyring: Keyring) {
        self.keyring_shared = Some(Arc::new(keyring.clone()));
        let now = self.base + self.now;
        for i in 0..self.nodes.len() {
            if let Some(m) = self.nodes[i].machine.as_mut() {
                m.set_keyring(now, keyring.clone());
                self.after(i);
            }
        }
        self.keyring = Some(keyring);
    }

    /// The id of node `i` in this simulation: [`Simulation::id`] in insecure mode, its
    /// identity's in keyring mode.
    pub fn node_id(&self, i: usize) -> NodeId {
        self.ids.get(i).copied().unwrap_or_else(|| Self::id(i))
    }

    /// The index of the node with id `id`.
    pub fn index_of(&self, id: NodeId) -> Option<usize> {
        self.index.get(&id).copied()
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Virtual time since the start.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Counters so far.
    pub fn stats(&self) -> SimStats {
        self.stats
    }

    /// Sends every message through the wire codec (encode to a frame, decode on delivery) and
    /// counts its bytes. Slower; off by default.
    pub fn set_codec(&mut self, on: bool) {
        self.codec = on;
    }

    /// Keeps every membership event from now on (see [`Simulation::events`]).
    pub fn record_events(&mut self) {
        self.log.get_or_insert_with(Vec::new);
    }

    /// The events recorded since [`Simulation::record_events`].
    pub fn events(&self) -> &[SimEvent] {
        self.log.as_deref().unwrap_or(&[])
    }

    /// Adds node `nodes()` joining through the given seed nodes, started now.
    pub fn add_node(&mut self, config: MembershipConfig, seeds: &[usize]) -> usize {
        let i = self.nodes.len();
        let id = if self.keyring.is_some() {
            self.identity(i).node_id()
        } else {
            Self::id(i)
        };
        self.ids.push(id);
        self.index.insert(id, i);
        self.nodes.push(SimNode {
            config,
            seeds: seeds.to_vec(),
            generation: 1,
            ended: HashSet::new(),
            paused_until: Duration::ZERO,
            addr: Self::addr_of(i, 1),
            machine: None,
            epoch: 0,
            timer_at: None,
            slow: Duration::ZERO,
            sent_messages: 0,
            sent_bytes: 0,
            signer: None,
        });
        self.groups.push(0);
        self.boot(i, Self::addr_of(i, 1));
        i
    }

    fn boot(&mut self, i: usize, addr: Address) {
        let now = self.base + self.now;
        let node = &self.nodes[i];
        let seeds = node
            .seeds
            .iter()
            .map(|&s| {
                // A seed not added yet will be, in its first life.
                let generation = self.nodes.get(s).map_or(1, |n| n.generation);
                Self::addr_of(s, generation)
            })
            .collect();
        let rng_seed = mix(self.seed ^ mix(i as u64) ^ mix(node.generation << 32));
        let security = match &self.keyring {
            Some(keyring) => Security::keyring(self.identity(i), keyring.clone()),
            None => Security::Insecure,
        };
        let machine = Membership::new(
            node.config,
            NodeStart {
                id: self.node_id(i),
                generation: node.generation,
                meta: MemberMeta::new(addr.clone()),
                seeds,
                rng_seed,
                security,
            },
            now,
        );
        let node = &mut self.nodes[i];
        node.addr = addr.clone();
        node.machine = Some(machine);
        node.epoch += 1;
        node.timer_at = None;
        self.by_addr.insert(addr, i);
        self.after(i);
    }

    /// The address of node `i` in its life `generation`.
    fn addr_of(i: usize, generation: u64) -> Address {
        Address::new(format!("n{i}.g{generation}:1"))
    }

    /// The id of node `i` in an insecure simulation (see [`Simulation::node_id`]).
    pub fn id(i: usize) -> NodeId {
        NodeId(i as u64 + 1)
    }

    /// Number of nodes ever added.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Node `i`'s machine, unless it is crashed.
    pub fn node(&self, i: usize) -> Option<&Membership> {
        self.nodes[i].machine.as_ref()
    }

    /// Whether node `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].machine.is_some()
    }

    /// Node `i`'s current generation (crashed: its last), as its machine has it.
    pub fn generation(&self, i: usize) -> u64 {
        self.nodes[i]
            .machine
            .as_ref()
            .map_or(self.nodes[i].generation, |m| m.local().life.generation)
    }

    /// Node `i`'s current address.
    pub fn address(&self, i: usize) -> &Address {
        &self.nodes[i].addr
    }

    /// Messages and bytes node `i` sent, over all its lives.
    pub fn sent_by(&self, i: usize) -> (u64, u64) {
        (self.nodes[i].sent_messages, self.nodes[i].sent_bytes)
    }

    /// For a crashed node's id: which observers declared it dead, and when.
    pub fn detections(&self, id: NodeId) -> &[(usize, Duration)] {
        self.detections.get(&id).map_or(&[], |v| v.as_slice())
    }

    /// Random loss on every link without its own setting (0.0 to 1.0).
    pub fn set_loss(&mut self, p: f64) {
        self.loss = p.clamp(0.0, 1.0);
    }

    /// Random loss on the directed link `from -> to`.
    pub fn set_link_loss(&mut self, from: usize, to: usize, p: f64) {
        self.link_loss.insert((from, to), p.clamp(0.0, 1.0));
    }

    /// Every message takes a uniform delay in `[min, max]`.
    pub fn set_delay(&mut self, min: Duration, max: Duration) {
        self.delay = (min, max.max(min));
    }

    /// Node `i` processes every message `lag` after it arrives (zero: on time).
    pub fn set_slow(&mut self, i: usize, lag: Duration) {
        self.nodes[i].slow = lag;
    }

    /// Cuts both directions between the two sides.
    pub fn partition(&mut self, side_a: &[usize], side_b: &[usize]) {
        for &i in side_a {
            self.groups[i] = 1;
        }
        for &i in side_b {
            self.groups[i] = 2;
        }
    }

    /// Cuts the direction `from -> to` only.
    pub fn block(&mut self, from: usize, to: usize) {
        self.blocked.insert((from, to));
    }

    /// Removes every partition and block.
    pub fn heal(&mut self) {
        self.groups.iter_mut().for_each(|g| *g = 0);
        self.blocked.clear();
    }

    /// Crashes node `i`: its machine and everything in flight to it are gone.
    pub fn crash(&mut self, i: usize) {
        let generation = self.generation(i);
        let node = &mut self.nodes[i];
        if node.machine.is_some() {
            node.ended.insert(generation);
        }
        node.generation = generation;
        node.machine = None;
        node.epoch += 1;
        node.timer_at = None;
        let addr = node.addr.clone();
        self.by_addr.remove(&addr);
    }

    /// Restarts node `i` in a new generation at a new address (crashing it first if it runs).
    pub fn restart(&mut self, i: usize) {
        let generation = self.generation(i) + 1;
        self.restart_as(i, generation, false);
    }

    /// Restarts node `i` in a new generation at the address it had (crashing it first if it
    /// runs), as a process restarted on the same host and port does.
    pub fn restart_in_place(&mut self, i: usize) {
        let generation = self.generation(i) + 1;
        self.restart_as(i, generation, true);
    }

    /// Restarts node `i` with the given generation, which may be lower than the last one (a
    /// node whose clock went back), at the address of that generation.
    pub fn restart_with_generation(&mut self, i: usize, generation: u64) {
        self.restart_as(i, generation, false);
    }

    fn restart_as(&mut self, i: usize, generation: u64, keep_address: bool) {
        if self.is_running(i) {
            self.crash(i);
        }
        self.nodes[i].generation = generation;
        let addr = if keep_address {
            self.nodes[i].addr.clone()
        } else {
            Self::addr_of(i, generation)
        };
        self.boot(i, addr);
    }

    /// Pauses node `i` for `d` from now (stop the world): nothing it receives and none of its
    /// timers is processed until then; then all of it is, in the order it fell due.
    pub fn pause(&mut self, i: usize, d: Duration) {
        self.nodes[i].paused_until = self.now + d;
    }

    /// Hands `message` to node `to` now, as if node `from` (at its current address) had sent
    /// it: a delayed or duplicated message arriving late, say. It passes every fault (loss,
    /// partitions, delay) and the codec, but a paused node still gets it only when it resumes,
    /// and a crashed one never.
    pub fn inject(&mut self, from: usize, to: usize, message: SwimMessage) {
        self.inject_frame(from, to, SwimFrame::Plain(message));
    }

    /// [`Simulation::inject`] for any frame (a signed one, a replayed or forged one).
    pub fn inject_frame(&mut self, from: usize, to: usize, frame: SwimFrame) {
        let msg = self.park(to, Payload::Message(Box::new(frame)));
        let action = Action::Deliver {
            to,
            epoch: self.nodes[to].epoch,
            from: self.nodes[from].addr.clone(),
            msg,
        };
        self.schedule(self.now, action);
    }

    /// Starts a graceful leave of node `i` (it keeps running until crashed).
    pub fn leave(&mut self, i: usize) {
        let now = self.base + self.now;
        if let Some(m) = self.nodes[i].machine.as_mut() {
            m.leave(now);
            self.after(i);
        }
    }

    /// Runs until virtual time `until`.
    pub fn run_until(&mut self, until: Duration) {
        while let Some(next) = self.queue.peek() {
            if next.at > until {
                break;
            }
            let Some(item) = self.queue.pop() else { break };
            self.now = item.at.max(self.now);
            match item.action {
                Action::Timer { node, epoch } => {
                    let n = &mut self.nodes[node];
                    if n.epoch != epoch || n.timer_at != Some(item.at) {
                        continue;
                    }
                    if n.paused_until > item.at {
                        let at = n.paused_until;
                        n.timer_at = Some(at);
                        self.schedule(at, Action::Timer { node, epoch });
                        continue;
                    }
                    n.timer_at = None;
                    let now = self.base + self.now;
                    if let Some(m) = n.machine.as_mut() {
                        m.handle_timeout(now);
                        self.after(node);
                    }
                }
                Action::Deliver {
                    to,
                    epoch,
                    from,
                    msg,
                } => {
                    if self.nodes[to].epoch != epoch || self.nodes[to].machine.is_none() {
                        if self.inflight.remove(&msg).is_none() && self.pool.is_some() {
                            self.discarded.insert(msg);
                        }
                        self.stats.dropped_unreachable += 1;
                        continue;
                    }
                    if self.nodes[to].paused_until > item.at {
                        let at = self.nodes[to].paused_until;
                        let action = Action::Deliver {
                            to,
                            epoch,
                            from,
                            msg,
                        };
                        self.schedule(at, action);
                        continue;
                    }
                    let ready = match self.inflight.remove(&msg) {
                        Some(Payload::Ready(ready)) => ready,
                        Some(payload) => {
                            let machine = self.nodes[to].machine.as_ref();
                            let check = machine.and_then(|m| {
                                Some((m.keyring()?, m.config().max_message_len.get()))
                            });
                            prepare(check, payload)
                        }
                        None => match self.wait_ready(msg) {
                            Some(ready) => ready,
                            None => continue,
                        },
                    };
                    let frame = match ready {
                        Ready::Rejected => {
                            self.stats.rejected_frames += 1;
                            continue;
                        }
                        Ready::Ignored => continue,
                        Ready::Frame(frame) => Ok(frame),
                        Ready::Verified(verified) => Err(verified),
                    };
                    self.stats.delivered += 1;
                    let now = self.base + self.now;
                    if let Some(m) = self.nodes[to].machine.as_mut() {
                        match frame {
                            Ok(frame) => m.handle_frame(now, from, *frame),
                            Err(verified) => m.handle_verified_frame(now, from, *verified),
                        }
                        self.after(to);
                    }
                }
            }
        }
        self.now = self.now.max(until);
    }

    /// Keeps `payload`, on its way to node `to`, until its delivery (handing it to the pool
    /// to prepare, if there is one); returns its number.
    fn park(&mut self, to: usize, payload: Payload) -> u64 {
        let msg = self.next_msg;
        self.next_msg += 1;
        // Plain frames to insecure nodes only need decoding, cheaper here than a hand-off.
        let crypto = self.keyring_shared.is_some() || matches!(payload, Payload::ToSign { .. });
        match &self.pool {
            Some(pool) if crypto => {
                // Every machine has the simulation's keyring (see `boot` and `set_keyring`);
                // should one not, `handle_verified_frame` checks the key again.
                let check = self.keyring_shared.clone().map(|keyring| {
                    let max_len = self.nodes[to].config.max_message_len.get();
                    (keyring, max_len)
                });
                pool.submit(Job {
                    msg,
                    payload,
                    check,
                });
            }
            _ => {
                self.inflight.insert(msg, payload);
            }
        }
        msg
    }

    /// `unsigned`, from node `from`, for the pool to sign (and encode, with `codec`).
    fn for_signing(&mut self, from: usize, unsigned: UnsignedSwim, codec: bool) -> Payload {
        let signer = match &self.nodes[from].signer {
            Some(signer) => Arc::clone(signer),
            None => {
                let signer = Arc::new(self.identity(from));
                self.nodes[from].signer = Some(Arc::clone(&signer));
                signer
            }
        };
        Payload::ToSign {
            unsigned: Box::new(unsigned),
            signer,
            codec,
        }
    }

    /// The pool's result for `msg`, helping with the pool's queue until it is there.
    fn wait_ready(&mut self, msg: u64) -> Option<Ready> {
        let pool = self.pool.as_ref()?;
        let mut found = None;
        pool.until(msg, |m, ready| {
            if m == msg {
                found = Some(ready);
            } else if !self.discarded.remove(&m) {
                self.inflight.insert(m, Payload::Ready(ready));
            }
        });
        found
    }

    /// Runs for `d` more virtual time.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(self.now + d);
    }

    /// Whether every running node sees every other running node alive, in its current life,
    /// and nothing else alive.
    pub fn converged(&self) -> bool {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.is_running(i))
            .collect();
        running.iter().all(|&i| {
            let Some(m) = self.node(i) else { return false };
            let mut alive = 0;
            for member in m.members() {
                if member.state == MemberState::Alive {
                    let Some(j) = self.index_of(member.id) else {
                        return false;
                    };
                    if !self.is_running(j) || self.generation(j) != member.life.generation {
                        return false;
                    }
                    alive += 1;
                }
            }
            alive + 1 == running.len()
        })
    }

    fn schedule(&mut self, at: Duration, action: Action) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push(Scheduled { at, seq, action });
    }

    /// Collects a machine's output after an input: routes its messages, records its events
    /// and arms its timer.
    fn after(&mut self, i: usize) {
        let Some(m) = self.nodes[i].machine.as_mut() else {
            return;
        };
        let mut out = Vec::new();
        if self.pool.is_some() {
            // Signed by the pool's threads, on their way.
            while let Some((to, frame)) = m.poll_unsigned_frame() {
                let frame = match frame {
                    UnsignedFrame::Plain(message) => Outgoing::Plain(message),
                    UnsignedFrame::ToSign(unsigned) => Outgoing::ToSign(unsigned),
                };
                out.push((to, frame));
            }
        } else {
            while let Some(t) = m.poll_frame() {
                let frame = match t.frame {
                    SwimFrame::Plain(message) => Outgoing::Plain(message),
                    SwimFrame::Signed(signed) => Outgoing::Signed(signed),
                };
                out.push((t.to, frame));
            }
        }
        let mut events = Vec::new();
        while let Some(e) = m.poll_event() {
            events.push(e);
        }
        let deadline = m.poll_timeout();
        for (to, frame) in out {
            self.route(i, to, frame);
        }
        for e in events {
            self.observe(i, e);
        }
        if let Some(deadline) = deadline {
            let at = deadline
                .checked_duration_since(self.base)
                .unwrap_or_default()
                .max(self.now);
            let node = &mut self.nodes[i];
            if node.timer_at.is_none_or(|t| at < t) {
                node.timer_at = Some(at);
                let epoch = node.epoch;
                self.schedule(at, Action::Timer { node: i, epoch });
            }
        }
    }

    fn observe(&mut self, observer: usize, event: MembershipEvent) {
        let member = event.member();
        let j = self.index_of(member.id).unwrap_or(usize::MAX);
        // A healthy subject: running at normal speed, in the life the event is about.
        let subject_running_same_life = j < self.nodes.len()
            && self.is_running(j)
            && self.nodes[j].slow.is_zero()
            && self.generation(j) == member.life.generation;
        // An ended life of a node that has moved on to another.
        let subject_newer = j < self.nodes.len()
            && self.generation(j) != member.life.generation
            && self.nodes[j].ended.contains(&member.life.generation);
        match &event {
            MembershipEvent::Suspect(_) if subject_running_same_life => {
                self.stats.false_suspicions += 1
            }
            MembershipEvent::Dead(_) if subject_running_same_life => self.stats.false_deaths += 1,
            MembershipEvent::Dead(m) => self
                .detections
                .entry(m.id)
                .or_default()
                .push((observer, self.now)),
            MembershipEvent::Joined(_)
            | MembershipEvent::Alive(_)
            | MembershipEvent::Updated(_)
                if subject_newer =>
            {
                self.stats.stale_resurrections += 1
            }
            _ => {}
        }
        if let Some(log) = self.log.as_mut() {
            log.push(SimEvent {
                at: self.now,
                observer,
                event,
            });
        }
    }

    fn route(&mut self, from: usize, to: Address, message: Outgoing) {
        self.stats.messages += 1;
        self.nodes[from].sent_messages += 1;
        let push_pull = match &message {
            Outgoing::Plain(m) => matches!(m, SwimMessage::PushPull { .. }),
            // The body's variant tag is its first byte: PushPull is the sixth variant.
            Outgoing::Signed(s) => s.body.first() == Some(&5),
            Outgoing::ToSign(u) => u.body().first() == Some(&5),
        };
        if push_pull {
            self.stats.push_pull_messages += 1;
        }
        let payload = if self.codec {
            // A frame still to sign is counted at the size it will have: a placeholder
            // signature is as long as the real one.
            let encoded = match &message {
                Outgoing::Plain(m) => wire::encode(
                    Header::message(),
                    &Envelope::Swim(m.clone()),
                    wire::DEFAULT_MAX_FRAME_LEN,
                ),
                Outgoing::Signed(s) => wire::encode(
                    Header::message(),
                    &Envelope::SwimSigned(s.clone()),
                    wire::DEFAULT_MAX_FRAME_LEN,
                ),
                Outgoing::ToSign(u) => wire::encode(
                    Header::message(),
                    &Envelope::SwimSigned(u.unsigned_placeholder()),
                    wire::DEFAULT_MAX_FRAME_LEN,
                ),
            };
            match encoded {
                Ok(frame) => {
                    self.stats.bytes += frame.len() as u64;
                    if push_pull {
                        self.stats.push_pull_bytes += frame.len() as u64;
                    }
                    self.nodes[from].sent_bytes += frame.len() as u64;
                    match message {
                        Outgoing::ToSign(unsigned) => self.for_signing(from, unsigned, true),
                        _ => Payload::Frame(frame),
                    }
                }
                Err(_) => {
                    self.stats.rejected_frames += 1;
                    return;
                }
            }
        } else {
            match message {
                Outgoing::Plain(m) => Payload::Message(Box::new(SwimFrame::Plain(m))),
                Outgoing::Signed(s) => Payload::Message(Box::new(SwimFrame::Signed(s))),
                Outgoing::ToSign(unsigned) => self.for_signing(from, unsigned, false),
            }
        };
        // Two draws per message whatever the faults, so changing a fault never shifts the
        // random stream of later messages.
        let loss_draw: f64 = self.rng.random();
        let delay_draw: f64 = self.rng.random();
        let Some(&dest) = self.by_addr.get(&to) else {
            self.stats.dropped_unreachable += 1;
            return;
        };
        let (ga, gb) = (self.groups[from], self.groups[dest]);
        if (ga != 0 && gb != 0 && ga != gb) || self.blocked.contains(&(from, dest)) {
            self.stats.dropped_partition += 1;
            return;
        }
        let p = self
            .link_loss
            .get(&(from, dest))
            .copied()
            .unwrap_or(self.loss);
        if loss_draw < p {
            self.stats.dropped_loss += 1;
            return;
        }
        let (min, max) = self.delay;
        let delay = min + (max - min).mul_f64(delay_draw) + self.nodes[dest].slow;
        let from_addr = self.nodes[from].addr.clone();
        let epoch = self.nodes[dest].epoch;
        let msg = self.park(dest, payload);
        self.schedule(
            self.now + delay,
            Action::Deliver {
                to: dest,
                epoch,
                from: from_addr,
                msg,
            },
        );
    }
}

/// Decodes a message and, for a signed frame to a node with a keyring (`check`: the keyring
/// and the node's size limit), verifies it. Pure: the result depends on the message and
/// `check` alone.
fn prepare(check: Option<(&Keyring, usize)>, payload: Payload) -> Ready {
    let frame = match payload {
        Payload::Ready(ready) => return ready,
        Payload::ToSign {
            unsigned,
            signer,
            codec,
        } => {
            let signed = unsigned.sign(&signer);
            let payload = if codec {
                match wire::encode(
                    Header::message(),
                    &Envelope::SwimSigned(signed),
                    wire::DEFAULT_MAX_FRAME_LEN,
                ) {
                    Ok(bytes) => Payload::Frame(bytes),
                    Err(_) => return Ready::Rejected,
                }
            } else {
                Payload::Message(Box::new(SwimFrame::Signed(signed)))
            };
            return prepare(check, payload);
        }
        Payload::Message(frame) => *frame,
        Payload::Frame(bytes) => {
            match wire::decode::<Envelope>(&bytes, wire::DEFAULT_MAX_FRAME_LEN) {
                Ok((_, envelope)) if envelope.is_swim() => match envelope.into_swim() {
                    Ok(frame) => frame,
                    Err(_) => return Ready::Ignored,
                },
                _ => return Ready::Rejected,
            }
        }
    };
    let (Some((keyring, max_len)), SwimFrame::Signed(signed)) = (check, &frame) else {
        return Ready::Frame(Box::new(frame));
    };
    match verify_frame(keyring, signed, max_len) {
        Ok(verified) => Ready::Verified(Box::new(verified)),
        Err(_) => Ready::Frame(Box::new(frame)),
    }
}

/// A message for the pool to prepare.
struct Job {
    msg: u64,
    payload: Payload,
    check: Option<(Arc<Keyring>, usize)>,
}

impl Job {
    fn run(self) -> (u64, Ready) {
        let check = self.check.as_ref().map(|(k, max)| (&**k, *max));
        (self.msg, prepare(check, self.payload))
    }
}

#[derive(Default)]
struct PoolState {
    /// Jobs in the order they were submitted.
    jobs: VecDeque<Job>,
    /// Results not collected yet.
    results: Vec<(u64, Ready)>,
    /// Helpers waiting for a job.
    idle: usize,
    /// Whether the owner waits for a result.
    waiting: bool,
    stop: bool,
}

#[derive(Default)]
struct PoolShared {
    state: Mutex<PoolState>,
    /// A job arrived (or stop).
    work: Condvar,
    /// A result arrived.
    done: Condvar,
}

impl PoolShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // A helper never panics while holding the lock; if one did, the state is still
        // consistent (every change is a single push or pop).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Helper threads that prepare messages while the simulation runs.
struct Pool {
    shared: Arc<PoolShared>,
    helpers: Vec<std::thread::JoinHandle<()>>,
}

impl Pool {
    fn new(helpers: usize) -> Self {
        let shared = Arc::new(PoolShared::default());
        let helpers = (0..helpers)
            .map(|_| {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || Self::help(&shared))
            })
            .collect();
        Pool { shared, helpers }
    }

    fn help(shared: &PoolShared) {
        let mut state = shared.lock();
        loop {
            if state.stop {
                return;
            }
            let Some(job) = state.jobs.pop_front() else {
                state.idle += 1;
                state = shared
                    .work
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                state.idle -= 1;
                continue;
            };
            drop(state);
            let result = job.run();
            state = shared.lock();
            state.results.push(result);
            if state.waiting {
                shared.done.notify_one();
            }
        }
    }

    fn submit(&self, job: Job) {
        let mut state = self.shared.lock();
        state.jobs.push_back(job);
        if state.idle > 0 {
            self.shared.work.notify_one();
        }
    }

    /// Hands every result to `take` until `msg`'s has been handed over, preparing queued
    /// messages on this thread meanwhile rather than waiting for the helpers.
    fn until(&self, msg: u64, mut take: impl FnMut(u64, Ready)) {
        let mut state = self.shared.lock();
        loop {
            let results = std::mem::take(&mut state.results);
            let mut found = false;
            for (m, ready) in results {
                found |= m == msg;
                take(m, ready);
            }
            if found {
                return;
            }
            if let Some(job) = state.jobs.pop_front() {
                drop(state);
                let (m, ready) = job.run();
                let found = m == msg;
                take(m, ready);
                if found {
                    return;
                }
                state = self.shared.lock();
                continue;
            }
            if self.helpers.is_empty() {
                // Never submitted, or already collected: nothing will come.
                return;
            }
            state.waiting = true;
            state = self
                .shared
                .done
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.waiting = false;
        }
    }
}

impl Pool {
    /// Stops the helpers; returns the jobs not started and the results not collected.
    fn stop(mut self) -> (VecDeque<Job>, Vec<(u64, Ready)>) {
        self.join();
        let mut state = self.shared.lock();
        (
            std::mem::take(&mut state.jobs),
            std::mem::take(&mut state.results),
        )
    }

    fn join(&mut self) {
        self.shared.lock().stop = true;
        self.shared.work.notify_all();
        for helper in self.helpers.drain(..) {
            // A helper that panicked has nothing to hand back.
            let _ = helper.join();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.join();
    }
}
