//! SWIM membership with Lifeguard, as a deterministic sans-IO state machine.
//!
//! [`Membership`] decides who is in the cluster. It is the protocol of HashiCorp memberlist
//! (SWIM with Lifeguard's refinements) written as a state machine in the style of quinn-proto
//! and foca: it never reads a clock, never sleeps, never performs I/O, and draws randomness
//! only from a seeded [`ChaCha8Rng`]. Given the same seed and the same sequence of inputs it
//! produces the same outputs, which is what lets the simulator (`crate::sim`, feature `sim`)
//! run 1,000 nodes in one thread, deterministically, and lets the tokio driver
//! (`crate::runtime::membership`, feature `runtime`) run one node over any
//! [`crate::Transport`].
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
//! - **Failure detection**: every protocol period the node pings one member (with Lifeguard,
//!   every other period its ring successor, the live member whose id follows its own, so no
//!   crash waits long for its first probe; otherwise, and in plain SWIM always, the next of a
//!   randomised round-robin over the members); without an ack within the probe timeout it asks
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

pub mod auth;
pub mod config;
mod dissemination;
mod limits;
mod members;
pub mod message;
mod probe;
mod suspicion;
mod timers;
mod update;

use std::collections::VecDeque;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use auth::{
    AuthStats, OutFrame, Rejection, Security, SignedSwim, SwimFrame, UnsignedFrame, UnsignedSwim,
    VerifiedFrame, verify_frame,
};
pub use config::MembershipConfig;
pub use message::{
    Life, MAX_ADDR_LEN, MAX_MEMBERS_PER_MESSAGE, MAX_UPDATES_PER_MESSAGE, MAX_WEIGHT, Member,
    MemberMeta, MemberState, MetaError, SwimMessage, Update,
};

use crate::identity::Address;
use crate::identity::NodeId;

use auth::Auth;
use dissemination::Broadcasts;
use members::MemberTable;
use probe::Prober;
use timers::{Timer, Timers};

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
    /// ack nobody waits for, a nack from a helper this node did not ask).
    pub ignored_messages: u64,
    /// News of a new member refused because [`MembershipConfig::max_members`] were known.
    pub refused_members: u64,
    /// Updates refused for invalid metadata (see [`MemberMeta::validate`]).
    pub invalid_updates: u64,
    /// Updates dropped because a message carried more than
    /// [`MembershipConfig::max_updates_per_message`].
    pub dropped_updates: u64,
    /// Suspect, dead or left news about a newer life of a member than this node knows:
    /// only an alive update (with the new life's metadata) introduces a new life.
    pub newer_life_ignored: u64,
    /// Alive news about a forgotten (reaped) member in a life no newer than the one it was
    /// forgotten in.
    pub forgotten_refused: u64,
    /// Ping-reqs not relayed: from an unknown or dead requester, about a target not known
    /// alive, or past [`MembershipConfig::max_relays_per_second`].
    pub refused_relays: u64,
    /// Piggybacked updates dropped because their sender was past
    /// [`MembershipConfig::max_updates_per_peer_per_second`].
    pub rate_limited_updates: u64,
    /// Ping-reqs refused because their requester was past
    /// [`MembershipConfig::max_relays_per_peer_per_second`] (also counted in
    /// `refused_relays`).
    pub rate_limited_relays: u64,
    /// Push-pull messages refused (neither merged nor answered) because their sender was
    /// past [`MembershipConfig::max_push_pulls_per_peer_per_second`].
    pub rate_limited_push_pulls: u64,
    /// Times this node moved itself to a new generation because it was told about itself in
    /// a generation at or above its own that it could not otherwise outbid.
    pub generation_bumps: u64,
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
    /// How the node authenticates its peers. With [`Security::Keyring`] the node's id is the
    /// one its identity's key derives (`id` above is ignored, with a warning if it differs)
    /// and `meta.public_key` is its key.
    pub security: Security,
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
    members: MemberTable,
    probes: Prober,
    broadcasts: Broadcasts,
    timers: Timers,
    transmits: VecDeque<Transmit>,
    events: VecDeque<MembershipEvent>,
    stats: MembershipStats,
    auth: Option<Auth>,
    auth_stats: AuthStats,
    update_budget: limits::PeerBuckets,
    relay_budget: limits::PeerBuckets,
    push_pull_budget: limits::PeerBuckets,
}

impl Membership {
    /// The node described by `start`, started at `now`.
    pub fn new(config: MembershipConfig, start: NodeStart, now: Instant) -> Self {
        let NodeStart {
            mut id,
            generation,
            mut meta,
            seeds,
            rng_seed,
            security,
        } = start;
        let auth = match security {
            Security::Insecure => None,
            Security::Keyring { identity, keyring } => {
                if id != identity.node_id() {
                    tracing::warn!(
                        configured = %id,
                        bound = %identity.node_id(),
                        "keyring mode: the node id is the one bound to the identity's key"
                    );
                    id = identity.node_id();
                }
                meta.public_key = identity.public_key().0;
                Some(Auth::new(*identity, keyring))
            }
        };
        let seeds: Vec<Address> = seeds.into_iter().filter(|s| *s != meta.addr).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(rng_seed);
        let mut timers = Timers::default();
        // Spread the first probe over one period so nodes started together do not probe in
        // lockstep.
        timers.set(
            Timer::ProbePeriod,
            now + config.probe_interval.mul_f64(rng.random::<f64>()),
        );
        // Likewise the first push-pull and re-announce (memberlist staggers them too).
        timers.set(
            Timer::PushPull,
            now + config.push_pull_interval.mul_f64(rng.random::<f64>()),
        );
        timers.set(
            Timer::Reannounce,
            now + config.reannounce_interval.mul_f64(rng.random::<f64>()),
        );
        timers.set(Timer::Gossip, now + config.gossip_interval);
        let joined = seeds.is_empty();
        if !joined {
            timers.set(Timer::Join, now);
        }
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
            joined,
            seeds,
            rng,
            members: MemberTable::default(),
            probes: Prober::default(),
            broadcasts: Broadcasts::default(),
            timers,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: MembershipStats::default(),
            auth,
            auth_stats: AuthStats::default(),
            update_budget: limits::PeerBuckets::default(),
            relay_budget: limits::PeerBuckets::default(),
            push_pull_budget: limits::PeerBuckets::default(),
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

    /// Lowers [`MembershipConfig::max_message_len`] to `max_frame_len`, the largest frame the
    /// transport carries, if it is larger: a full state split for a larger limit would never
    /// encode, and push-pull would stop without a word. The drivers call it with their
    /// transport's limit.
    pub fn limit_message_len(&mut self, max_frame_len: usize) {
        if let Some(max) = std::num::NonZeroUsize::new(max_frame_len)
            && max < self.config.max_message_len
        {
            self.config.max_message_len = max;
        }
    }

    /// Whether a seed has answered (always true for a node started without seeds).
    pub fn is_joined(&self) -> bool {
        self.joined
    }

    /// Every other member this node knows, alive, suspect, dead or left, ordered by id.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.entries().map(|e| &e.member)
    }

    /// What this node knows about `id` (its own record for its own id).
    pub fn member(&self, id: NodeId) -> Option<&Member> {
        if id == self.local.id {
            return Some(&self.local);
        }
        self.members.get(id).map(|e| &e.member)
    }

    /// Alive and suspect members, this node included.
    pub fn live_count(&self) -> usize {
        self.members.live().len() + 1
    }

    /// The local health score (0 = healthy); probe interval and timeout are multiplied by
    /// `score + 1`.
    pub fn health_score(&self) -> u32 {
        self.probes.health.score()
    }

    /// Counters.
    pub fn stats(&self) -> MembershipStats {
        self.stats
    }

    /// Counters of authentication: messages verified and refused, per kind.
    pub fn auth_stats(&self) -> AuthStats {
        self.auth_stats
    }

    /// The keyring, in keyring mode (`None`: insecure).
    pub fn keyring(&self) -> Option<&crate::auth::Keyring> {
        self.auth.as_ref().map(|a| &a.keyring)
    }

    /// Starts a graceful leave: the node announces that it left (disseminated by the next
    /// gossip rounds) and stops probing. The owner keeps driving it for a few gossip intervals
    /// so the news gets out, then drops it.
    pub fn leave(&mut self, now: Instant) {
        if self.leaving {
            return;
        }
        self.leaving = true;
        // At the largest incarnation the leave goes out at the same life, which still
        // supersedes an alive, suspect or dead record of it.
        self.local.life.incarnation = self.local.life.incarnation.saturating_add(1);
        self.local.state = MemberState::Left;
        self.cancel_probe();
        self.timers.cancel(Timer::ProbePeriod);
        self.broadcasts.push(Update::Left {
            id: self.local.id,
            life: self.local.life,
        });
        // Tell a few members right away rather than waiting for the gossip tick.
        self.timers.set(Timer::Gossip, now);
    }

    /// Publishes new metadata for this node (a join finished, a new weight): it moves to the
    /// next incarnation, which supersedes every record of its old metadata, and gossips the
    /// change from the next tick on. Invalid metadata, or a node that is leaving, changes
    /// nothing; the answer says whether it was published.
    pub fn set_meta(&mut self, now: Instant, meta: MemberMeta) -> bool {
        if self.leaving || meta.validate().is_err() {
            return false;
        }
        if meta == self.local.meta {
            return true;
        }
        // At the largest incarnation a new record could not supersede the old one anywhere.
        let Some(incarnation) = self.local.life.incarnation.checked_add(1) else {
            return false;
        };
        self.local.meta = meta;
        self.local.life.incarnation = incarnation;
        self.broadcasts.push(Update::Alive {
            id: self.local.id,
            life: self.local.life,
            meta: self.local.meta.clone(),
        });
        self.timers.set(Timer::Gossip, now);
        true
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
        self.timers.next(|timer| match timer {
            // The direct ping's ack deadline comes first while it waits.
            Timer::ProbePeriod => self.timers.deadline(Timer::ProbeAck).is_none(),
            // Due with nothing to say, a gossip round would only move its own deadline.
            Timer::Gossip => !self.broadcasts.is_empty(),
            Timer::ProbeAck
            | Timer::Join
            | Timer::PushPull
            | Timer::Reannounce
            | Timer::Relay(_)
            | Timer::Suspicion(_)
            | Timer::Reap(_) => true,
        })
    }

    /// Runs every timer that is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        // The order is part of the behaviour (it decides the order of random draws and
        // messages), so it is fixed here rather than by deadline.
        while let Some((_, id)) = self.timers.pop_due(now, |t| match t {
            Timer::Suspicion(id) => Some(id),
            _ => None,
        }) {
            self.suspicion_expired(now, id);
        }
        while let Some((_, seq)) = self.timers.pop_due(now, |t| match t {
            Timer::Relay(seq) => Some(seq),
            _ => None,
        }) {
            self.relay_expired(seq);
        }
        if self.timers.fire(Timer::ProbeAck, now) {
            self.send_indirect_probes();
        }
        if self.timers.is_due(Timer::ProbePeriod, now) {
            if self.probes.is_active() {
                self.finish_probe(now);
            }
            self.start_probe(now);
        }
        if self.timers.fire(Timer::Gossip, now) {
            if !self.broadcasts.is_empty() {
                self.gossip();
            }
            self.timers
                .set(Timer::Gossip, now + self.config.gossip_interval);
        }
        if self.timers.fire(Timer::Join, now) {
            self.join_seeds();
            self.timers
                .set(Timer::Join, now + self.config.join_retry_interval);
        }
        if self.timers.fire(Timer::PushPull, now) {
            self.periodic_push_pull();
            self.timers
                .set(Timer::PushPull, now + self.push_pull_interval());
        }
        if self.timers.fire(Timer::Reannounce, now) {
            if self.joined && !self.leaving {
                self.reannounce();
            }
            self.timers
                .set(Timer::Reannounce, now + self.config.reannounce_interval);
        }
        while let Some((_, id)) = self.timers.pop_due(now, |t| match t {
            Timer::Reap(id) => Some(id),
            _ => None,
        }) {
            self.reap(now, id);
        }
    }

    /// Processes a plain (unsigned) message received from `from`. In keyring mode it is
    /// dropped and counted ([`AuthStats::unsigned`]): feed what arrives to
    /// [`Membership::handle_frame`], which takes both forms.
    pub fn handle_message(&mut self, now: Instant, from: Address, message: SwimMessage) {
        if self.auth.is_some() {
            self.reject(&from, Rejection::Unsigned);
            return;
        }
        self.dispatch(now, from, message);
    }

    /// Processes a frame received from `from`: a plain one as [`Membership::handle_message`]
    /// does; a signed one, in keyring mode, only once it verifies (see [`auth`]); in insecure
    /// mode a signed frame's body is taken as it is, unverified.
    pub fn handle_frame(&mut self, now: Instant, from: Address, frame: SwimFrame) {
        let signed = match frame {
            SwimFrame::Plain(message) => return self.handle_message(now, from, message),
            SwimFrame::Signed(signed) => signed,
        };
        let max = self.config.max_message_len.get();
        let Some(auth) = self.auth.as_ref() else {
            match crate::wire::decode_payload::<SwimMessage>(&signed.body, max) {
                Ok(message) => self.dispatch(now, from, message),
                Err(_) => self.reject(&from, Rejection::Malformed),
            }
            return;
        };
        let verified = auth.open(&self.local.meta.addr, &signed, max);
        self.act_on_verified(now, from, verified);
    }

    /// Processes a frame that [`verify_frame`] passed (with any keyring and size limit),
    /// received from `from`: the rest of [`Membership::handle_frame`]'s checks (the
    /// destination, the replay guard, who the body speaks for) and then the message, exactly
    /// as [`Membership::handle_frame`] would have processed the frame. A frame verified with
    /// a key this node's keyring no longer binds to the signer is
    /// [`Rejection::UnknownKey`]; one decoded within another size limit is decoded again
    /// within this node's. In insecure mode the message is taken as it is.
    ///
    /// This lets a driver verify signatures, the expensive part, off the machine's loop.
    pub fn handle_verified_frame(&mut self, now: Instant, from: Address, frame: VerifiedFrame) {
        let max = self.config.max_message_len.get();
        let Some(auth) = self.auth.as_ref() else {
            match frame.into_message(max) {
                Ok(message) => self.dispatch(now, from, message),
                Err(why) => self.reject(&from, why),
            }
            return;
        };
        let verified = auth.finish(&self.local.meta.addr, frame, max);
        self.act_on_verified(now, from, verified);
    }

    /// Step 6 of the [`auth`] checks, then the message.
    fn act_on_verified(
        &mut self,
        now: Instant,
        from: Address,
        verified: Result<auth::Verified, Rejection>,
    ) {
        let verified = match verified {
            Ok(v) => v,
            Err(why) => return self.reject(&from, why),
        };
        let claimed = auth::claimed_sender(&verified.message);
        if claimed != verified.from && !self.is_relayed_ack(verified.from, &verified.message) {
            if self.is_late_relayed_ack(verified.from, &verified.message) {
                // Signed by a helper this node asked, for a probe that has ended: nothing to
                // act on, and no attack (it used to be counted as `id_mismatch`).
                if let Some(auth) = self.auth.as_mut() {
                    auth.accept(&verified);
                }
                self.auth_stats.late_relayed_acks += 1;
                return;
            }
            return self.reject(&from, Rejection::IdMismatch);
        }
        if let Some(auth) = self.auth.as_mut() {
            auth.accept(&verified);
        }
        self.auth_stats.verified += 1;
        self.dispatch(now, from, verified.message);
    }

    /// Whether `message` is an ack relayed by a helper of one of this node's ended probes.
    fn is_late_relayed_ack(&self, sender: NodeId, message: &SwimMessage) -> bool {
        let SwimMessage::Ack { seq, from, .. } = message else {
            return false;
        };
        self.is_late_relayed_ack_from(sender, *seq, *from)
    }

    /// Whether `message` is an ack naming the target of this node's probe in progress, sent
    /// by one of the helpers the probe asked: the one message whose `from` is not its sender.
    fn is_relayed_ack(&self, sender: NodeId, message: &SwimMessage) -> bool {
        let SwimMessage::Ack { seq, from, .. } = message else {
            return false;
        };
        self.is_relayed_ack_from(sender, *seq, *from)
    }

    fn reject(&mut self, from: &Address, why: Rejection) {
        self.auth_stats.count(why);
        tracing::debug!(%from, ?why, "membership message rejected");
    }

    /// The next frame to send, if any: [`Membership::poll_transmit`]'s next message, signed
    /// in keyring mode (plain in insecure mode). A message that does not encode within
    /// [`MembershipConfig::max_message_len`] is dropped with a warning.
    pub fn poll_frame(&mut self) -> Option<OutFrame> {
        let (to, frame) = self.poll_unsigned_frame()?;
        let frame = match frame {
            UnsignedFrame::Plain(message) => SwimFrame::Plain(message),
            UnsignedFrame::ToSign(unsigned) => match self.auth.as_ref() {
                Some(auth) => SwimFrame::Signed(unsigned.sign(&auth.identity)),
                // Only keyring mode seals frames to sign.
                None => return None,
            },
        };
        Some(OutFrame { to, frame })
    }

    /// [`Membership::poll_frame`] without the signature: the next frame to send and where
    /// to, encoded and numbered in keyring mode but left for the owner to sign with the
    /// node's identity ([`UnsignedSwim::sign`], a pure function), so that a driver can sign
    /// off the machine's loop. Frames that overtake each other on the way are accepted
    /// within the replay window ([`auth::REPLAY_WINDOW`]).
    pub fn poll_unsigned_frame(&mut self) -> Option<(Address, UnsignedFrame)> {
        loop {
            let Transmit { to, message } = self.transmits.pop_front()?;
            let Some(auth) = self.auth.as_mut() else {
                return Some((to, UnsignedFrame::Plain(message)));
            };
            // A reply on an accepted connection is meant for the listen address the peer
            // announced on it.
            let dest = crate::transport::inbound_peer(&to).unwrap_or_else(|| to.clone());
            match auth.seal(
                self.local.life.generation,
                &dest,
                &message,
                self.config.max_message_len.get(),
            ) {
                Ok(unsigned) => {
                    self.auth_stats.signed += 1;
                    return Some((to, UnsignedFrame::ToSign(unsigned)));
                }
                Err(error) => {
                    tracing::warn!(%to, %error, "membership message does not encode");
                }
            }
        }
    }

    /// Replaces the keyring (keyring mode; ignored in insecure mode). Keys added take effect
    /// at once; a member whose key the new keyring does not list is removed from the view
    /// (a [`MembershipEvent::Dead`] event), its replay state dropped, and news of it refused
    /// from now on. It may come back, in the same life, once its key is listed again.
    pub fn set_keyring(&mut self, now: Instant, keyring: crate::auth::Keyring) {
        let Some(auth) = self.auth.as_mut() else {
            tracing::warn!("insecure mode: a keyring was given and ignored");
            return;
        };
        if !keyring.admits(self.local.id, &self.local.meta.public_key) {
            tracing::warn!(id = %self.local.id, "the new keyring does not list this node's own key");
        }
        auth.windows.retain(|id, _| keyring.get(*id).is_some());
        let revoked: Vec<NodeId> = self
            .members
            .entries()
            .filter(|e| !keyring.admits(e.member.id, &e.member.meta.public_key))
            .map(|e| e.member.id)
            .collect();
        auth.keyring = keyring;
        for id in revoked {
            self.revoke(now, id);
        }
    }

    fn dispatch(&mut self, now: Instant, from: Address, mut message: SwimMessage) {
        self.limit_updates(now, &mut message);
        match message {
            SwimMessage::Ping {
                seq,
                from: _,
                target,
                updates,
            } => self.on_ping(now, from, seq, target, updates),
            SwimMessage::Ack {
                seq,
                from: acker,
                updates,
            } => self.on_ack(now, seq, acker, updates),
            SwimMessage::PingReq {
                seq,
                from: requester,
                target,
                target_addr: _,
                updates,
            } => self.on_ping_req(now, requester, seq, target, updates),
            SwimMessage::Nack { seq, from: helper } => self.on_nack(seq, helper),
            SwimMessage::Gossip { from: _, updates } => self.apply_all(now, updates),
            SwimMessage::PushPull {
                from: sender,
                join: _,
                reply,
                part,
                members,
            } => self.on_push_pull(now, from, sender, reply, part, members),
        }
    }

    /// Drops the piggybacked updates of `message` past its sender's budget
    /// ([`MembershipConfig::max_updates_per_peer_per_second`]).
    fn limit_updates(&mut self, now: Instant, message: &mut SwimMessage) {
        let sender = auth::claimed_sender(message);
        let updates = match message {
            SwimMessage::Ping { updates, .. }
            | SwimMessage::Ack { updates, .. }
            | SwimMessage::PingReq { updates, .. }
            | SwimMessage::Gossip { updates, .. } => updates,
            SwimMessage::Nack { .. } | SwimMessage::PushPull { .. } => return,
        };
        if updates.is_empty() {
            return;
        }
        let wanted = updates.len().min(self.max_updates_per_message()) as u32;
        let granted = self.update_budget.take(
            now,
            sender,
            wanted,
            self.config.max_updates_per_peer_per_second.get(),
            self.config.max_members.get(),
        );
        if granted < wanted {
            self.stats.rate_limited_updates += u64::from(wanted - granted);
            tracing::debug!(%sender, dropped = wanted - granted, "updates over the sender's budget");
            updates.truncate(granted as usize);
        }
    }

    fn send(&mut self, to: Address, message: SwimMessage) {
        self.transmits.push_back(Transmit { to, message });
    }
}

#[cfg(test)]
mod auth_tests;
#[cfg(test)]
mod tests;
