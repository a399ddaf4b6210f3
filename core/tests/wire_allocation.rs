//! Decoding hostile frames never allocates past a small multiple of the frame's own size.
//!
//! The global allocator is capped while each frame is decoded; an allocation past the cap
//! fails and aborts the test binary, naming the size it wanted. This file holds one test so
//! no other test allocates concurrently. Set `CHORUS_SEED` to replay a run.

use bytes::Bytes;
use cap::Cap;
use chorus_core::Envelope;
use chorus_core::membership::{Life, Member, MemberMeta, MemberState, SwimMessage, Update};
use chorus_core::replication::message::Key;
use chorus_core::replication::{
    REPLICA_PROTOCOL_VERSION, Refusal, ReplicaMessage, Write, WriteOutcome,
};
use chorus_core::wire::{self, HEADER_LEN, Header, PREFIX_LEN};
use chorus_core::{NodeId, Record, Timestamp, Version};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::alloc::System;

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// Budget for one decode: a fixed allowance plus four times the frame.
fn budget(frame_len: usize) -> usize {
    64 * 1024 + 4 * frame_len
}

/// A valid frame of a random message, then corrupted: a varint length marker planted at a
/// random offset followed by a huge little-endian length, plus a few random byte flips. Starting
/// from valid encodings makes the decoder reach the inner length fields of every variant:
/// replica messages and membership messages (whose update and member lists are sequences of
/// elements larger in memory than on the wire, and must be bounded).
fn hostile_frame(rng: &mut ChaCha8Rng) -> Vec<u8> {
    let version = Version::new(Timestamp::from_u64(rng.random()), NodeId(rng.random()));
    let key = Bytes::from(vec![b'k'; rng.random_range(0..16)]);
    let value = vec![b'v'; rng.random_range(0..64)];
    let life = Life {
        generation: rng.random(),
        incarnation: rng.random_range(0..4),
    };
    let node = NodeId(rng.random());
    let updates: Vec<Update> = (0..rng.random_range(0..6))
        .map(|i| match i % 3 {
            0 => Update::Suspect {
                id: node,
                life,
                from: node,
            },
            1 => Update::Alive {
                id: node,
                life,
                meta: MemberMeta::new("10.0.0.1:7000"),
            },
            _ => Update::Left { id: node, life },
        })
        .collect();
    let swim = match rng.random_range(0..4) {
        0 => SwimMessage::Ping {
            seq: rng.random(),
            from: node,
            target: node,
            updates,
        },
        1 => SwimMessage::Gossip {
            from: node,
            updates,
        },
        2 => SwimMessage::PingReq {
            seq: rng.random(),
            from: node,
            target: node,
            target_addr: "n1.g1".into(),
            updates,
        },
        _ => SwimMessage::PushPull {
            from: node,
            join: false,
            reply: true,
            part: 0,
            members: (0..rng.random_range(0..4))
                .map(|_| Member {
                    id: node,
                    life,
                    state: MemberState::Alive,
                    meta: MemberMeta::new("n2.g1"),
                })
                .collect(),
        },
    };
    if rng.random_bool(0.5) {
        return corrupt(rng, Envelope::Swim(swim));
    }
    let n = rng.random_range(1..4);
    let message = match rng.random_range(0..5) {
        0 => ReplicaMessage::Apply {
            version: REPLICA_PROTOCOL_VERSION,
            writes: (0..n)
                .map(|_| Write {
                    key: key.clone(),
                    record: Record::value(value.clone(), version),
                })
                .collect(),
        },
        1 => ReplicaMessage::Applied {
            outcomes: (0..n)
                .map(|_| WriteOutcome::Stale { current: version })
                .collect(),
        },
        2 => ReplicaMessage::Read {
            version: REPLICA_PROTOCOL_VERSION,
            keys: (0..n).map(|_| Key(key.clone())).collect(),
        },
        3 => ReplicaMessage::Records {
            records: (0..n)
                .map(|_| Some(Record::value(value.clone(), version).with_expiry(7)))
                .collect(),
        },
        _ => ReplicaMessage::Refused(Refusal::Storage {
            retryable: false,
            reason: "x".repeat(rng.random_range(0..32)),
        }),
    };
    corrupt(rng, Envelope::Replica(message))
}

fn corrupt(rng: &mut ChaCha8Rng, envelope: Envelope) -> Vec<u8> {
    let mut frame = wire::encode(
        Header::request(rng.random()),
        &envelope,
        wire::DEFAULT_MAX_FRAME_LEN,
    )
    .expect("encode")
    .to_vec();
    let payload_start = PREFIX_LEN + HEADER_LEN;
    let at = rng.random_range(payload_start..frame.len());
    let marker = [251u8, 252, 253][rng.random_range(0..3)];
    let claim: u64 = match marker {
        251 => rng.random_range(1_000..u64::from(u16::MAX)),
        252 => rng.random_range(1 << 20..u64::from(u32::MAX)),
        _ => rng.random_range(1 << 32..u64::MAX),
    };
    let width = match marker {
        251 => 2,
        252 => 4,
        _ => 8,
    };
    frame.truncate(at);
    frame.push(marker);
    frame.extend_from_slice(&claim.to_le_bytes()[..width]);
    let tail = rng.random_range(0..64);
    frame.extend((0..tail).map(|_| rng.random::<u8>()));
    for _ in 0..rng.random_range(0..3) {
        let i = rng.random_range(payload_start..frame.len());
        frame[i] ^= rng.random::<u8>();
    }
    let body = u32::try_from(frame.len() - PREFIX_LEN).expect("small frame");
    frame[..PREFIX_LEN].copy_from_slice(&body.to_be_bytes());
    frame
}

#[test]
fn hostile_frames_stay_within_allocation_budget() {
    let seed = std::env::var("CHORUS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0001_u64);
    eprintln!("seed {seed} (replay with CHORUS_SEED={seed})");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut rejected = 0usize;
    for _ in 0..20_000 {
        let frame = hostile_frame(&mut rng);
        let limit = ALLOCATOR.allocated() + budget(frame.len());
        ALLOCATOR.set_limit(limit).expect("limit above current use");
        let result = wire::decode::<Envelope>(&frame, wire::DEFAULT_MAX_FRAME_LEN);
        ALLOCATOR.set_limit(usize::MAX).expect("lift the limit");
        if result.is_err() {
            rejected += 1;
        }
    }
    // Random payloads are overwhelmingly malformed; if they all decoded, the test is not
    // exercising the decoder's error paths.
    assert!(
        rejected > 10_000,
        "only {rejected} of 20000 hostile frames were rejected"
    );
}
