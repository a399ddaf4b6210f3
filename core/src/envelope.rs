//! The envelope: one enum that multiplexes every protocol's messages on a connection.
//!
//! The layers run identity and utilities -> [`crate::wire`] (framing) -> protocols
//! ([`crate::membership`], [`crate::replication`], each owning its message types) -> this
//! envelope -> the runtime. The wire names no protocol; a protocol names no other protocol
//! and not the envelope; the envelope names each protocol's top-level message type and
//! nothing else. A new protocol adds one variant here, at the end.

use serde::{Deserialize, Serialize};

use crate::membership::{SignedSwim, SwimFrame, SwimMessage};
use crate::replication::ReplicaMessage;

/// Every message one node sends another, tagged by protocol.
///
/// Adding a variant at the end is compatible for peers that know it; a peer that does not
/// reports a typed decode error ([`crate::wire::WireError::Payload`]) for that frame only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Envelope {
    /// A replica protocol message (see [`crate::replication`]).
    Replica(ReplicaMessage),
    /// A membership protocol message, unsigned (insecure mode; see [`crate::membership`]).
    Swim(SwimMessage),
    /// A signed membership message (keyring mode; see [`crate::membership::auth`]).
    SwimSigned(SignedSwim),
}

impl From<SwimFrame> for Envelope {
    fn from(frame: SwimFrame) -> Self {
        match frame {
            SwimFrame::Plain(message) => Envelope::Swim(message),
            SwimFrame::Signed(signed) => Envelope::SwimSigned(signed),
        }
    }
}

impl Envelope {
    /// Whether this is a membership message, signed or not.
    pub fn is_swim(&self) -> bool {
        matches!(self, Envelope::Swim(_) | Envelope::SwimSigned(_))
    }

    /// The membership frame this envelope carries, if it is one; the envelope back otherwise.
    pub fn into_swim(self) -> Result<SwimFrame, Envelope> {
        match self {
            Envelope::Swim(message) => Ok(SwimFrame::Plain(message)),
            Envelope::SwimSigned(signed) => Ok(SwimFrame::Signed(signed)),
            other => Err(other),
        }
    }
}

impl From<ReplicaMessage> for Envelope {
    fn from(message: ReplicaMessage) -> Self {
        Envelope::Replica(message)
    }
}

impl From<SwimMessage> for Envelope {
    fn from(message: SwimMessage) -> Self {
        Envelope::Swim(message)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::hlc::{Timestamp, Version};
    use crate::identity::{Address, NodeId};
    use crate::membership::{Life, Member, MemberMeta, MemberState, Update};
    use crate::record::Record;
    use crate::replication::message::Key;
    use crate::replication::{Refusal, Write, WriteOutcome};
    use crate::wire::{self, Header};

    const MAX: usize = 64 * 1024;

    fn put(value_len: usize) -> Envelope {
        Envelope::Replica(ReplicaMessage::apply_one(
            Bytes::from_static(b"user:1234"),
            Record::value(
                vec![7u8; value_len],
                Version::new(Timestamp::new(1_700_000_000_000, 3), NodeId(42)),
            ),
        ))
    }

    fn arb_envelope() -> impl Strategy<Value = Envelope> {
        let version = (any::<u64>(), any::<u64>())
            .prop_map(|(t, n)| Version::new(Timestamp::from_u64(t), NodeId(n)));
        let record = (
            prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
            version.clone(),
            prop::option::of(any::<u64>()),
        )
            .prop_map(|(v, version, exp)| Record {
                payload: v.map_or(crate::record::Payload::Tombstone, |v| {
                    crate::record::Payload::Value(v.into())
                }),
                version,
                expires_at_ms: exp,
            });
        let key = prop::collection::vec(any::<u8>(), 0..32).prop_map(Bytes::from);
        let write = (key.clone(), record.clone()).prop_map(|(key, record)| Write { key, record });
        let outcome = prop_oneof![
            Just(WriteOutcome::Applied),
            version.prop_map(|current| WriteOutcome::Stale { current }),
            any::<u64>()
                .prop_map(|ahead_ms| WriteOutcome::Refused(Refusal::ClockDrift { ahead_ms })),
        ];
        prop_oneof![
            (any::<u16>(), prop::collection::vec(write, 0..4)).prop_map(|(version, writes)| {
                Envelope::Replica(ReplicaMessage::Apply { version, writes })
            }),
            prop::collection::vec(outcome, 0..4)
                .prop_map(|outcomes| Envelope::Replica(ReplicaMessage::Applied { outcomes })),
            (
                any::<u16>(),
                prop::collection::vec(key.clone().prop_map(Key), 0..4)
            )
                .prop_map(|(version, keys)| Envelope::Replica(ReplicaMessage::Read {
                    version,
                    keys
                })),
            prop::collection::vec(prop::option::of(record), 0..4)
                .prop_map(|records| Envelope::Replica(ReplicaMessage::Records { records })),
            ".{0,40}".prop_map(|reason| Envelope::Replica(ReplicaMessage::Refused(
                Refusal::Storage {
                    retryable: false,
                    reason
                }
            ))),
            arb_swim().prop_map(Envelope::Swim),
        ]
    }

    fn arb_swim() -> impl Strategy<Value = SwimMessage> {
        let id = any::<u64>().prop_map(NodeId);
        let life = (any::<u64>(), any::<u64>()).prop_map(|(generation, incarnation)| Life {
            generation,
            incarnation,
        });
        let addr = "[a-z0-9.:-]{0,24}".prop_map(Address::from);
        let meta = (addr.clone(), 1u32.., any::<[u8; 32]>(), any::<bool>()).prop_map(
            |(addr, w, public_key, joining)| MemberMeta {
                addr,
                weight: std::num::NonZeroU32::new(w).unwrap(),
                public_key,
                joining,
            },
        );
        let update =
            prop_oneof![
                (id.clone(), life.clone(), meta.clone())
                    .prop_map(|(id, life, meta)| Update::Alive { id, life, meta }),
                (id.clone(), life.clone(), id.clone())
                    .prop_map(|(id, life, from)| Update::Suspect { id, life, from }),
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
        prop_oneof![
            (any::<u32>(), id.clone(), id.clone(), updates.clone()).prop_map(
                |(seq, from, target, updates)| SwimMessage::Ping {
                    seq,
                    from,
                    target,
                    updates
                }
            ),
            (any::<u32>(), id.clone(), updates.clone())
                .prop_map(|(seq, from, updates)| { SwimMessage::Ack { seq, from, updates } }),
            (any::<u32>(), id.clone(), id.clone(), addr, updates.clone()).prop_map(
                |(seq, from, target, target_addr, updates)| SwimMessage::PingReq {
                    seq,
                    from,
                    target,
                    target_addr,
                    updates
                }
            ),
            (any::<u32>(), id.clone()).prop_map(|(seq, from)| SwimMessage::Nack { seq, from }),
            (id.clone(), updates).prop_map(|(from, updates)| SwimMessage::Gossip { from, updates }),
            (
                id,
                any::<bool>(),
                any::<bool>(),
                any::<u32>(),
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

    #[test]
    fn put_round_trips() {
        let frame = wire::encode(Header::request(9), &put(100), MAX).expect("encode");
        let (header, msg): (Header, Envelope) = wire::decode(&frame, MAX).expect("decode");
        assert_eq!(header, Header::request(9));
        assert_eq!(msg, put(100));
    }

    #[test]
    fn replica_key_with_a_lying_length_does_not_decode() {
        // A Get whose key claims 2^40 bytes in a tiny frame.
        let mut payload = vec![0u8, 2u8]; // variant index of Replica, then of Get
        payload.push(253); // bincode varint marker for u64
        payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(
            wire::decode::<Envelope>(&frame_of(&payload), MAX),
            Err(wire::WireError::Payload(_))
        ));
    }

    /// A request frame around `payload`, with a valid prefix and header.
    fn frame_of(payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0u8; wire::PREFIX_LEN + wire::HEADER_LEN];
        frame[4..6].copy_from_slice(&wire::MAGIC);
        frame[6] = wire::WIRE_VERSION;
        frame[7] = 1;
        frame.extend_from_slice(payload);
        let body = (frame.len() - wire::PREFIX_LEN) as u32;
        frame[..4].copy_from_slice(&body.to_be_bytes());
        frame
    }

    #[test]
    fn swim_message_with_a_lying_update_count_does_not_decode() {
        // A Gossip claiming 2^40 updates in a tiny frame.
        let mut payload = vec![1u8]; // variant index of Swim
        payload.push(4); // variant index of Gossip
        payload.push(7); // from
        payload.push(253); // bincode varint marker for u64
        payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let mut frame = vec![0u8; wire::PREFIX_LEN + wire::HEADER_LEN];
        frame[4..6].copy_from_slice(&wire::MAGIC);
        frame[6] = wire::WIRE_VERSION;
        frame.extend_from_slice(&payload);
        let body = (frame.len() - wire::PREFIX_LEN) as u32;
        frame[..4].copy_from_slice(&body.to_be_bytes());
        assert!(matches!(
            wire::decode::<Envelope>(&frame, MAX),
            Err(wire::WireError::Payload(_))
        ));
    }

    proptest! {
        #[test]
        fn every_envelope_round_trips(msg in arb_envelope(), correlation: u64) {
            let frame = wire::encode(Header::request(correlation), &msg, MAX).unwrap();
            let (h, m): (Header, Envelope) = wire::decode(&frame, MAX).unwrap();
            prop_assert_eq!(h, Header::request(correlation));
            prop_assert_eq!(m, msg);
        }

        // Random bytes behind a valid prefix and header exercise every protocol's decoder.
        #[test]
        fn arbitrary_payloads_never_panic(payload in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = wire::decode::<Envelope>(&frame_of(&payload), MAX);
        }

        // Flipping any bit of a valid frame yields a typed error or a (different) valid message.
        #[test]
        fn corrupted_frames_never_panic(msg in arb_envelope(), at: prop::sample::Index, bit in 0u8..8) {
            let mut frame = wire::encode(Header::request(1), &msg, MAX).unwrap().to_vec();
            let i = at.index(frame.len());
            frame[i] ^= 1 << bit;
            let _ = wire::decode::<Envelope>(&frame, MAX);
        }
    }
}
