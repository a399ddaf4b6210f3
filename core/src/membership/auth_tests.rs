//! Authentication tests: every way a membership message can be unsigned, forged, tampered
//! with, replayed or sent by a key the receiver does not admit is refused, counted by kind,
//! and changes nothing else in the receiver.
//!
//! The receiver `A` knows `B` and `D` alive (both admitted). `C` was admitted and revoked,
//! `O` never was. Messages are generated over every [`SwimMessage`] variant. The seed of the
//! identities comes from `CHORUS_SEED` (decimal or `0x` hex) when set; proptest prints the
//! failing case and persists it.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::auth::{Identity, Keyring};
use crate::envelope::Envelope;
use crate::wire::{self, Header};

fn seed() -> u64 {
    std::env::var("CHORUS_SEED")
        .ok()
        .and_then(|s| {
            let s = s.trim().to_owned();
            match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => s.parse().ok(),
            }
        })
        .unwrap_or(0xA117)
}

struct World {
    now: Instant,
    a: Membership,
    b: Membership,
    /// Another admitted member, to sign as someone else.
    d: Membership,
    /// Revoked.
    c: Membership,
    /// Never admitted.
    o: Membership,
    /// Deliver signed frames as a driver that verifies off the machine's loop does:
    /// [`verify_frame`] with this keyring (the one from before C's revocation, so stale),
    /// then [`Membership::handle_verified_frame`], or [`Membership::handle_frame`] for a
    /// frame it refuses.
    pre_verify: Option<Keyring>,
}

fn addr(name: &str) -> Address {
    Address::new(format!("{name}:1"))
}

fn machine(identity: &Identity, name: &str, keyring: &Keyring, now: Instant) -> Membership {
    let mut config = MembershipConfig::lan();
    // Nothing fires on its own during a case.
    config.probe_interval = Duration::from_secs(365 * 24 * 3600);
    config.push_pull_interval = config.probe_interval;
    config.reannounce_interval = config.probe_interval;
    Membership::new(
        config,
        NodeStart {
            id: identity.node_id(),
            generation: 1,
            meta: MemberMeta::new(addr(name)),
            seeds: Vec::new(),
            rng_seed: 1,
            security: Security::keyring(identity.clone(), keyring.clone()),
        },
        now,
    )
}

/// Seals `message` from `from` to `to`'s address, as `from` would send it.
fn seal(from: &mut Membership, to: &Membership, message: SwimMessage) -> SignedSwim {
    from.transmits.push_back(Transmit {
        to: to.local.meta.addr.clone(),
        message,
    });
    match from.poll_frame().expect("a frame").frame {
        SwimFrame::Signed(s) => s,
        SwimFrame::Plain(_) => panic!("keyring mode sends signed frames"),
    }
}

impl World {
    fn new() -> World {
        let mut rng = ChaCha8Rng::seed_from_u64(seed());
        let ids: Vec<Identity> = (0..5).map(|_| Identity::from_rng(&mut rng)).collect();
        let all = Keyring::from_keys(ids.iter().map(Identity::public_key)).expect("keyring");
        let now = Instant::now();
        let mut w = World {
            now,
            a: machine(&ids[0], "a", &all, now),
            b: machine(&ids[1], "b", &all, now),
            c: machine(&ids[2], "c", &all, now),
            d: machine(&ids[3], "d", &all, now),
            o: machine(&ids[4], "o", &all, now),
            pre_verify: None,
        };
        // A learns B, C and D from their own push-pulls, then C's key is revoked.
        for i in 0..3 {
            let (sender, a) = match i {
                0 => (&mut w.b, &mut w.a),
                1 => (&mut w.c, &mut w.a),
                _ => (&mut w.d, &mut w.a),
            };
            let me = sender.local.clone();
            let message = SwimMessage::PushPull {
                from: me.id,
                join: false,
                reply: true,
                part: 0,
                members: vec![me],
            };
            let frame = seal(sender, a, message);
            a.handle_frame(
                now,
                sender.local.meta.addr.clone(),
                SwimFrame::Signed(frame),
            );
        }
        assert_eq!(w.a.auth_stats().verified, 3);
        assert_eq!(w.a.live_count(), 4);
        let mut kept = all.clone();
        assert!(kept.remove(&ids[2].public_key()));
        assert!(kept.remove(&ids[4].public_key()));
        w.a.set_keyring(now, kept);
        assert_eq!(w.a.live_count(), 3, "the revoked member is gone");
        assert_eq!(w.a.auth_stats().revoked_members, 1);
        while w.a.poll_event().is_some() {}
        while w.a.poll_transmit().is_some() {}
        w
    }

    /// Everything about A that a message could change, except the authentication counters.
    fn state(&self) -> String {
        let a = &self.a;
        let windows: std::collections::BTreeMap<_, _> = a
            .auth
            .as_ref()
            .map(|x| {
                x.windows
                    .iter()
                    .map(|(k, v)| (*k, format!("{v:?}")))
                    .collect()
            })
            .unwrap_or_default();
        format!(
            "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{}|{windows:?}",
            a.local,
            a.members,
            a.probes,
            a.broadcasts,
            a.timers,
            a.transmits,
            a.events,
            a.stats,
            a.joined,
            a.rng.get_word_pos(),
        )
    }

    fn deliver(&mut self, from: &str, frame: SwimFrame) {
        if let (Some(keyring), SwimFrame::Signed(signed)) = (&self.pre_verify, &frame) {
            let max = self.a.config.max_message_len.get();
            if let Ok(verified) = verify_frame(keyring, signed, max) {
                return self.a.handle_verified_frame(self.now, addr(from), verified);
            }
        }
        self.a.handle_frame(self.now, addr(from), frame);
    }
}

/// Sets every sender field of `message` to `id`, so that it speaks for its signer.
fn speaking_for(mut message: SwimMessage, id: NodeId) -> SwimMessage {
    match &mut message {
        SwimMessage::Ping { from, .. }
        | SwimMessage::Ack { from, .. }
        | SwimMessage::PingReq { from, .. }
        | SwimMessage::Nack { from, .. }
        | SwimMessage::Gossip { from, .. }
        | SwimMessage::PushPull { from, .. } => *from = id,
    }
    message
}

fn arb_message(ids: Vec<NodeId>, keys: Vec<[u8; 32]>) -> impl Strategy<Value = SwimMessage> {
    let id = prop::sample::select(ids);
    let life = (1u64..4, 0u64..4).prop_map(|(generation, incarnation)| Life {
        generation,
        incarnation,
    });
    let meta = (
        prop::sample::select(vec!["a:1", "b:1", "c:1", "d:1", "o:1", "x:1"]),
        prop::sample::select(keys),
    )
        .prop_map(|(a, public_key)| MemberMeta {
            addr: Address::new(a),
            weight: NonZeroU32::MIN,
            public_key,
            joining: false,
        });
    let update = prop_oneof![
        (id.clone(), life.clone(), meta.clone()).prop_map(|(id, life, meta)| Update::Alive {
            id,
            life,
            meta
        }),
        (id.clone(), life.clone(), id.clone()).prop_map(|(id, life, from)| Update::Suspect {
            id,
            life,
            from
        }),
        (id.clone(), life.clone(), id.clone()).prop_map(|(id, life, from)| Update::Dead {
            id,
            life,
            from
        }),
        (id.clone(), life.clone()).prop_map(|(id, life)| Update::Left { id, life }),
    ];
    let updates = prop::collection::vec(update, 0..4);
    let state = prop_oneof![
        Just(MemberState::Alive),
        Just(MemberState::Suspect),
        Just(MemberState::Dead),
        Just(MemberState::Left),
    ];
    let member = (id.clone(), life, state, meta).prop_map(|(id, life, state, meta)| Member {
        id,
        life,
        state,
        meta,
    });
    let seq = 0u32..8;
    prop_oneof![
        (seq.clone(), id.clone(), id.clone(), updates.clone()).prop_map(
            |(seq, from, target, updates)| SwimMessage::Ping {
                seq,
                from,
                target,
                updates
            }
        ),
        (seq.clone(), id.clone(), updates.clone())
            .prop_map(|(seq, from, updates)| { SwimMessage::Ack { seq, from, updates } }),
        (seq.clone(), id.clone(), id.clone(), updates.clone()).prop_map(
            |(seq, from, target, updates)| SwimMessage::PingReq {
                seq,
                from,
                target,
                target_addr: Address::new("b:1"),
                updates
            }
        ),
        (seq, id.clone()).prop_map(|(seq, from)| SwimMessage::Nack { seq, from }),
        (id.clone(), updates).prop_map(|(from, updates)| SwimMessage::Gossip { from, updates }),
        (
            id,
            any::<bool>(),
            any::<bool>(),
            0u32..2,
            prop::collection::vec(member, 0..4)
        )
            .prop_map(|(from, join, reply, part, members)| SwimMessage::PushPull {
                from,
                join,
                reply,
                part,
                members
            }),
    ]
}

#[derive(Clone, Copy, Debug)]
enum Attack {
    Unsigned,
    UnknownKey,
    RevokedKey,
    /// Flip one byte of the envelope's payload (the header is framing, not signed).
    Tamper {
        at: usize,
        xor: u8,
    },
    ReplaySame,
    /// A message older than the replay window.
    ReplayOld,
    /// A message from the sender's previous generation.
    ReplayOldGeneration,
    /// Signed by D, with B as the frame's sender.
    ClaimOtherSigner,
    /// Signed by D, whose body says it is from B.
    ClaimOtherBody,
    /// B's message to another node, replayed to A.
    Misdirected,
}

fn arb_attack() -> impl Strategy<Value = Attack> {
    prop_oneof![
        Just(Attack::Unsigned),
        Just(Attack::UnknownKey),
        Just(Attack::RevokedKey),
        (any::<usize>(), 1u8..=255).prop_map(|(at, xor)| Attack::Tamper { at, xor }),
        Just(Attack::ReplaySame),
        Just(Attack::ReplayOld),
        Just(Attack::ReplayOldGeneration),
        Just(Attack::ClaimOtherSigner),
        Just(Attack::ClaimOtherBody),
        Just(Attack::Misdirected),
    ]
}

/// Runs one attack with `message` (whose senders are rewritten as the attack needs) and
/// checks it is refused, counted and changes nothing. Returns the rejection counted.
fn attack(w: &mut World, message: SwimMessage, attack: Attack) -> Result<(), TestCaseError> {
    let b_id = w.b.local.id;
    let before_stats = w.a.auth_stats();
    let frame = match attack {
        Attack::Unsigned => SwimFrame::Plain(speaking_for(message, b_id)),
        Attack::UnknownKey => {
            let o_id = w.o.local.id;
            SwimFrame::Signed(seal(&mut w.o, &w.a, speaking_for(message, o_id)))
        }
        Attack::RevokedKey => {
            let c_id = w.c.local.id;
            SwimFrame::Signed(seal(&mut w.c, &w.a, speaking_for(message, c_id)))
        }
        Attack::Tamper { at, xor } => {
            let signed = seal(&mut w.b, &w.a, speaking_for(message, b_id));
            let frame = wire::encode(
                Header::message(),
                &Envelope::SwimSigned(signed),
                wire::DEFAULT_MAX_FRAME_LEN,
            )
            .expect("encodes");
            let mut bytes = frame.to_vec();
            let skip = wire::PREFIX_LEN + wire::HEADER_LEN;
            let at = skip + at % (bytes.len() - skip);
            bytes[at] ^= xor;
            match wire::decode::<Envelope>(&bytes, wire::DEFAULT_MAX_FRAME_LEN) {
                // Refused by the codec: the machine never sees it.
                Err(_) => return Ok(()),
                Ok((_, envelope)) => match envelope.into_swim() {
                    Ok(frame) => frame,
                    // Not a membership frame: the drivers drop it.
                    Err(_) => return Ok(()),
                },
            }
        }
        Attack::ReplaySame => {
            let signed = seal(&mut w.b, &w.a, speaking_for(message, b_id));
            w.deliver("b", SwimFrame::Signed(signed.clone()));
            prop_assert_eq!(w.a.auth_stats().verified, before_stats.verified + 1);
            return replayed(w, SwimFrame::Signed(signed));
        }
        Attack::ReplayOld => {
            let signed = seal(&mut w.b, &w.a, speaking_for(message.clone(), b_id));
            // B moves on by more than the window; A hears a later message.
            w.b.auth.as_mut().expect("keyring").next_seq += auth::REPLAY_WINDOW;
            let later = seal(&mut w.b, &w.a, SwimMessage::Nack { seq: 0, from: b_id });
            w.deliver("b", SwimFrame::Signed(later));
            return replayed(w, SwimFrame::Signed(signed));
        }
        Attack::ReplayOldGeneration => {
            let old = seal(&mut w.b, &w.a, speaking_for(message.clone(), b_id));
            w.b.local.life.generation += 1;
            let newer = seal(&mut w.b, &w.a, SwimMessage::Nack { seq: 0, from: b_id });
            w.deliver("b", SwimFrame::Signed(newer));
            return replayed(w, SwimFrame::Signed(old));
        }
        Attack::ClaimOtherSigner => {
            let mut signed = seal(&mut w.d, &w.a, speaking_for(message, b_id));
            signed.from = b_id;
            SwimFrame::Signed(signed)
        }
        Attack::ClaimOtherBody => {
            let message = speaking_for(message, b_id);
            SwimFrame::Signed(seal(&mut w.d, &w.a, message))
        }
        Attack::Misdirected => SwimFrame::Signed(seal(&mut w.b, &w.d, speaking_for(message, b_id))),
    };
    let state = w.state();
    w.deliver("x", frame);
    let after = w.a.auth_stats();
    prop_assert_eq!(
        after.verified,
        before_stats.verified,
        "{:?} was accepted",
        attack
    );
    prop_assert_eq!(after.rejected(), before_stats.rejected() + 1);
    let expected = match attack {
        Attack::Unsigned => Some(after.unsigned - before_stats.unsigned),
        Attack::UnknownKey | Attack::RevokedKey => {
            Some(after.unknown_key - before_stats.unknown_key)
        }
        Attack::ClaimOtherSigner => Some(after.forged - before_stats.forged),
        Attack::ClaimOtherBody => Some(after.id_mismatch - before_stats.id_mismatch),
        Attack::Misdirected => Some(after.misdirected - before_stats.misdirected),
        _ => None,
    };
    if let Some(counted) = expected {
        prop_assert_eq!(
            counted,
            1,
            "{:?} counted under another kind: {:?}",
            attack,
            after
        );
    }
    prop_assert_eq!(w.state(), state, "{:?} changed the receiver", attack);
    Ok(())
}

fn replayed(w: &mut World, frame: SwimFrame) -> Result<(), TestCaseError> {
    while w.a.poll_transmit().is_some() {}
    while w.a.poll_event().is_some() {}
    let before = w.a.auth_stats();
    let state = w.state();
    w.deliver("b", frame);
    let after = w.a.auth_stats();
    prop_assert_eq!(after.replayed, before.replayed + 1, "replay not refused");
    prop_assert_eq!(after.verified, before.verified);
    prop_assert_eq!(w.state(), state, "the replay changed the receiver");
    Ok(())
}

fn world_ids() -> (Vec<NodeId>, Vec<[u8; 32]>) {
    let w = World::new();
    let ms = [&w.a, &w.b, &w.c, &w.d, &w.o];
    (
        ms.iter().map(|m| m.local.id).collect(),
        ms.iter().map(|m| m.local.meta.public_key).collect(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Every attack on every message type is refused and counted, and changes nothing.
    #[test]
    fn every_forged_tampered_replayed_or_unadmitted_message_is_refused(
        message in { let (ids, keys) = world_ids(); arb_message(ids, keys) },
        how in arb_attack(),
        pre_verified in any::<bool>(),
    ) {
        let mut w = World::new();
        if pre_verified {
            let keys = [&w.a, &w.b, &w.c, &w.d, &w.o]
                .map(|m| crate::auth::PublicKey(m.local.meta.public_key));
            let stale = Keyring::from_keys(keys).map_err(|e| TestCaseError::fail(e.to_string()))?;
            w.pre_verify = Some(stale);
        }
        attack(&mut w, message, how)?;
    }
}

/// The happy path the attacks are measured against: a valid message is accepted, and an
/// alive update about a member whose key the keyring does not list is refused inside it.
#[test]
fn valid_messages_are_accepted_and_unadmitted_members_refused() {
    let mut w = World::new();
    let b_id = w.b.local.id;
    let o = w.o.local.clone();
    let gossip = SwimMessage::Gossip {
        from: b_id,
        updates: vec![Update::Alive {
            id: o.id,
            life: o.life,
            meta: o.meta.clone(),
        }],
    };
    let frame = seal(&mut w.b, &w.a, gossip);
    w.deliver("b", SwimFrame::Signed(frame));
    assert_eq!(w.a.auth_stats().verified, 4);
    assert_eq!(w.a.auth_stats().unadmitted_members, 1);
    assert!(
        w.a.member(o.id).is_none(),
        "an outsider was admitted through gossip"
    );
    // B's id with O's key: the id is bound to B's key.
    let forged = SwimMessage::Gossip {
        from: b_id,
        updates: vec![Update::Alive {
            id: b_id,
            life: Life {
                generation: 1,
                incarnation: 9,
            },
            meta: o.meta,
        }],
    };
    let frame = seal(&mut w.b, &w.a, forged);
    w.deliver("b", SwimFrame::Signed(frame));
    assert_eq!(w.a.auth_stats().unadmitted_members, 2);
    assert_eq!(
        w.a.member(b_id).map(|m| m.meta.public_key),
        Some(w.b.local.meta.public_key)
    );
}

/// Starts A's probe now; its sequence number, its target, and the other admitted member (a
/// possible helper).
fn start_probe(w: &mut World) -> (u32, NodeId, NodeId) {
    let (b_id, d_id) = (w.b.local.id, w.d.local.id);
    w.a.timers.set(super::timers::Timer::ProbePeriod, w.now);
    w.a.handle_timeout(w.now);
    while w.a.poll_transmit().is_some() {}
    let Some((seq, target)) = w.a.probes.current_probe() else {
        panic!("a probe started");
    };
    (seq, target, if target == b_id { d_id } else { b_id })
}

/// A helper's relayed ack names the probed member, not its sender: accepted from a helper
/// the probe asked, refused from anyone else.
#[test]
fn relayed_acks_count_only_from_the_helpers_asked() {
    let mut w = World::new();
    let b_id = w.b.local.id;
    let now = w.now;
    let (seq, target, helper) = start_probe(&mut w);
    // Without asking anyone, a relayed ack is an id mismatch.
    let ack = SwimMessage::Ack {
        seq,
        from: target,
        updates: vec![],
    };
    let sender = if helper == b_id { &mut w.b } else { &mut w.d };
    let frame = seal(sender, &w.a, ack.clone());
    w.a.handle_frame(now, addr("h"), SwimFrame::Signed(frame));
    assert_eq!(w.a.auth_stats().id_mismatch, 1);
    w.a.probes.ask_for_test(helper);
    let sender = if helper == b_id { &mut w.b } else { &mut w.d };
    let frame = seal(sender, &w.a, ack);
    w.a.handle_frame(now, addr("h"), SwimFrame::Signed(frame));
    assert_eq!(w.a.auth_stats().id_mismatch, 1);
    assert!(
        w.a.probes.current_probe().is_none(),
        "the relayed ack ended the probe"
    );
}

/// A helper's relay that arrives after its probe ended is dropped without effect and counted
/// as late, not as an id mismatch; from a member the probe did not ask it still is one.
#[test]
fn a_late_relayed_ack_is_counted_apart_and_changes_nothing() {
    let mut w = World::new();
    let b_id = w.b.local.id;
    let now = w.now;
    let (seq, target, helper) = start_probe(&mut w);
    w.a.probes.ask_for_test(helper);
    w.a.finish_probe(now);
    while w.a.poll_transmit().is_some() {}
    while w.a.poll_event().is_some() {}
    assert!(w.a.probes.current_probe().is_none(), "the probe ended");
    let state = w.a.member(target).map(|m| (m.state, m.life));
    let ack = SwimMessage::Ack {
        seq,
        from: target,
        updates: vec![],
    };
    let sender = if helper == b_id { &mut w.b } else { &mut w.d };
    let late = seal(sender, &w.a, ack.clone());
    w.a.handle_frame(now, addr("h"), SwimFrame::Signed(late.clone()));
    let stats = w.a.auth_stats();
    assert_eq!(
        (stats.late_relayed_acks, stats.id_mismatch),
        (1, 0),
        "{stats:?}"
    );
    assert_eq!(w.a.poll_transmit(), None);
    assert_eq!(w.a.poll_event(), None);
    assert_eq!(w.a.member(target).map(|m| (m.state, m.life)), state);
    // The same frame again is a replay.
    w.a.handle_frame(now, addr("h"), SwimFrame::Signed(late));
    assert_eq!(w.a.auth_stats().replayed, 1);
    // For a sequence number no ended probe had, the same helper's ack naming the target
    // speaks for someone else: an id mismatch.
    let stray = SwimMessage::Ack {
        seq: seq.wrapping_add(100),
        from: target,
        updates: vec![],
    };
    let sender = if helper == b_id { &mut w.b } else { &mut w.d };
    let frame = seal(sender, &w.a, stray);
    w.a.handle_frame(now, addr("h"), SwimFrame::Signed(frame));
    assert_eq!(w.a.auth_stats().id_mismatch, 1);
    assert_eq!(w.a.auth_stats().late_relayed_acks, 1);
}

/// An admitted member that floods: its piggybacked updates and its ping-reqs are limited per
/// second (per sender), the excess counted, and the budget refills with time.
#[test]
fn a_flooding_member_is_rate_limited_per_peer() {
    let mut w = World::new();
    let (b_id, d_id) = (w.b.local.id, w.d.local.id);
    let b = w.b.local.clone();
    let per_second = w.a.config.max_updates_per_peer_per_second.get() as u64;
    let per_message = w.a.max_updates_per_message() as u64;
    let messages = 2 * per_second / per_message;
    for _ in 0..messages {
        let updates = (0..per_message)
            .map(|_| Update::Alive {
                id: b.id,
                life: b.life,
                meta: b.meta.clone(),
            })
            .collect();
        let frame = seal(
            &mut w.b,
            &w.a,
            SwimMessage::Gossip {
                from: b_id,
                updates,
            },
        );
        w.deliver("b", SwimFrame::Signed(frame));
    }
    assert_eq!(
        w.a.stats().rate_limited_updates,
        messages * per_message - per_second,
        "seed {}",
        seed()
    );
    // D has a budget of its own.
    let d = w.d.local.clone();
    let frame = seal(
        &mut w.d,
        &w.a,
        SwimMessage::Gossip {
            from: d_id,
            updates: vec![Update::Alive {
                id: d.id,
                life: d.life,
                meta: d.meta,
            }],
        },
    );
    w.deliver("d", SwimFrame::Signed(frame));
    assert_eq!(
        w.a.stats().rate_limited_updates,
        messages * per_message - per_second
    );
    // A second later B's budget is back.
    w.now += Duration::from_secs(1);
    let frame = seal(
        &mut w.b,
        &w.a,
        SwimMessage::Gossip {
            from: b_id,
            updates: vec![Update::Alive {
                id: b.id,
                life: b.life,
                meta: b.meta.clone(),
            }],
        },
    );
    w.deliver("b", SwimFrame::Signed(frame));
    assert_eq!(
        w.a.stats().rate_limited_updates,
        messages * per_message - per_second
    );

    // Ping-reqs: B asks A to probe D, far more often than its relay budget.
    let relays = w.a.config.max_relays_per_peer_per_second.get() as u64;
    for seq in 0..3 * relays {
        let frame = seal(
            &mut w.b,
            &w.a,
            SwimMessage::PingReq {
                seq: seq as u32,
                from: b_id,
                target: d_id,
                target_addr: addr("d"),
                updates: vec![],
            },
        );
        w.deliver("b", SwimFrame::Signed(frame));
    }
    assert_eq!(
        w.a.stats().rate_limited_relays,
        2 * relays,
        "seed {}",
        seed()
    );
    let pings = std::iter::from_fn(|| w.a.poll_transmit())
        .filter(|t| matches!(t.message, SwimMessage::Ping { target, .. } if target == d_id))
        .count() as u64;
    assert_eq!(pings, relays, "relayed pings");
}

/// An admitted member cannot take the address of a live member or of the receiver: the record
/// is refused (counted), the rightful owner keeps its address, and moving to a free address
/// still works.
#[test]
fn member_records_claiming_a_live_members_address_are_refused() {
    let mut w = World::new();
    let (b_id, d_id) = (w.b.local.id, w.d.local.id);
    let d = w.d.local.clone();
    let moved = |addr: Address, incarnation: u64| {
        let mut meta = d.meta.clone();
        meta.addr = addr;
        SwimMessage::Gossip {
            from: d_id,
            updates: vec![Update::Alive {
                id: d_id,
                life: Life {
                    generation: d.life.generation,
                    incarnation,
                },
                meta,
            }],
        }
    };
    // D claims B's address, then A's own.
    // (The replay window moves on: the message itself was valid; only its record is refused.)
    let view = |a: &Membership| format!("{:?}|{:?}|{:?}", a.members, a.broadcasts, a.events);
    for (claimed, incarnation, conflicts) in [(addr("b"), 5, 1), (addr("a"), 6, 2)] {
        let before = view(&w.a);
        let frame = seal(&mut w.d, &w.a, moved(claimed, incarnation));
        w.deliver("d", SwimFrame::Signed(frame));
        assert_eq!(w.a.auth_stats().address_conflicts, conflicts);
        assert_eq!(view(&w.a), before, "a refused record changed nothing");
    }
    assert_eq!(
        w.a.member(d_id).map(|m| m.meta.addr.clone()),
        Some(addr("d"))
    );
    assert_eq!(
        w.a.member(b_id).map(|m| m.meta.addr.clone()),
        Some(addr("b"))
    );
    // A free address is D's to take.
    let frame = seal(&mut w.d, &w.a, moved(addr("d2"), 7));
    w.deliver("d", SwimFrame::Signed(frame));
    assert_eq!(w.a.auth_stats().address_conflicts, 2);
    assert_eq!(
        w.a.member(d_id).map(|m| m.meta.addr.clone()),
        Some(addr("d2"))
    );
    // And D's old address is free again for D to come back to.
    let frame = seal(&mut w.d, &w.a, moved(addr("d"), 8));
    w.deliver("d", SwimFrame::Signed(frame));
    assert_eq!(
        w.a.member(d_id).map(|m| m.meta.addr.clone()),
        Some(addr("d"))
    );
    assert_eq!(w.a.auth_stats().address_conflicts, 2);
}
