//! Signed membership messages: what a node with a keyring sends and accepts.
//!
//! With [`Security::Keyring`] every message leaves as a [`SignedSwim`]: the encoded
//! [`SwimMessage`] (the body), the sender's id, the address it is sent to, the sender's
//! generation and a sequence number, all covered by the sender's Ed25519 signature. A
//! receiver verifies before anything else looks at the message:
//!
//! 1. the sender id is in the keyring (else [`Rejection::UnknownKey`]; a key removed from the
//!    keyring is unknown from then on);
//! 2. the signature verifies with that key over exactly the bytes received (else
//!    [`Rejection::Forged`]: a message signed by A but claiming to be from B fails here, and
//!    so does any change to a signed byte);
//! 3. the destination is this node's own address (else [`Rejection::Misdirected`]: a message
//!    A sent to B, replayed to C);
//! 4. the replay guard admits `(generation, seq)` (else [`Rejection::Replayed`]);
//! 5. the body decodes within the limits (else [`Rejection::Malformed`]);
//! 6. the body speaks for the signer: its `from` is the sender id (a relayed ack, which names
//!    the probed member, only from a helper this node asked) (else [`Rejection::IdMismatch`];
//!    a helper's relay that arrives after its probe ended is verified, dropped and counted in
//!    [`AuthStats::late_relayed_acks`], not as a rejection).
//!
//! Plain messages are [`Rejection::Unsigned`]. A rejected message changes nothing but the
//! counter of its kind ([`AuthStats`]).
//!
//! # The replay guard
//!
//! A sender numbers its messages `(generation, seq)`: `seq` counts up from 0 in each life and
//! a new life (a restart) has a higher generation. A receiver keeps, per sender, the highest
//! pair seen and which of the [`REPLAY_WINDOW`] sequence numbers below it it has seen: a pair
//! older than the window, seen before, or from an older generation is a replay. Messages that
//! overtake each other by fewer than [`REPLAY_WINDOW`] sequence numbers are all accepted. The
//! state is bounded by the keyring (one entry per sender whose message verified) and dropped
//! with the sender's key. One known gap: a receiver restarted at the same address forgets its
//! windows, so a message captured before its restart and addressed to it is accepted once,
//! until the sender's next message moves the window past it; what it says is news about
//! lives the receiver learns anew anyway, and [`super::Life`] versioning orders it.

use std::collections::HashMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::message::SwimMessage;
use crate::auth::{Identity, Keyring, PublicKey, SIGNATURE_LEN};
use crate::identity::{Address, NodeId};

/// How many sequence numbers below the highest seen a receiver still accepts (once each).
pub const REPLAY_WINDOW: u64 = 1024;

const WINDOW_WORDS: usize = (REPLAY_WINDOW / 64) as usize;

/// Domain tag prefixed to the signed bytes, so a membership signature means nothing elsewhere.
const SIGNING_DOMAIN: &[u8] = b"chorus swim v1\0";

/// How a membership machine authenticates its peers.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Security {
    /// Sign every message with `identity` and accept only messages verified against
    /// `keyring`, about members whose key it lists.
    Keyring {
        /// This node's key pair; the node's id is the one bound to its key.
        identity: Box<Identity>,
        /// The keys allowed in the cluster.
        keyring: Keyring,
    },
    /// No authentication at all: anyone who reaches the node can join, and say anything about
    /// anyone. For local experiments and tests on a trusted network only.
    Insecure,
}

impl Security {
    /// Keyring mode.
    pub fn keyring(identity: Identity, keyring: Keyring) -> Self {
        Security::Keyring {
            identity: Box::new(identity),
            keyring,
        }
    }
}

/// A signed membership message, as it travels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedSwim {
    /// The signer.
    pub from: NodeId,
    /// Where the signer sent it.
    pub to: Address,
    /// The signer's generation when it sent it.
    pub generation: u64,
    /// The signer's sequence number within the generation.
    pub seq: u64,
    /// The encoded [`SwimMessage`].
    #[serde(with = "crate::codec::serde_bytes")]
    pub body: Bytes,
    /// Ed25519 signature over the signing domain, `from`, `to`, `generation`, `seq` and
    /// `body`.
    #[serde(with = "crate::codec::serde_bytes")]
    pub signature: Bytes,
}

impl SignedSwim {
    /// The bytes the signature covers.
    fn signed_bytes(from: NodeId, to: &Address, generation: u64, seq: u64, body: &[u8]) -> Vec<u8> {
        let to = to.as_str().as_bytes();
        let mut out = Vec::with_capacity(SIGNING_DOMAIN.len() + 26 + to.len() + body.len());
        out.extend_from_slice(SIGNING_DOMAIN);
        out.extend_from_slice(&from.0.to_be_bytes());
        out.extend_from_slice(&generation.to_be_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
        // The address is at most MAX_ADDR_LEN bytes; a longer one is refused before this.
        out.extend_from_slice(&(to.len().min(u16::MAX as usize) as u16).to_be_bytes());
        out.extend_from_slice(to);
        out.extend_from_slice(body);
        out
    }
}

/// A membership message encoded, numbered and addressed, but not signed yet: what
/// [`super::Membership::poll_unsigned_frame`] hands out so that a driver can sign off the
/// machine's loop ([`UnsignedSwim::sign`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsignedSwim {
    from: NodeId,
    to: Address,
    generation: u64,
    seq: u64,
    body: Bytes,
}

impl UnsignedSwim {
    /// The encoded [`SwimMessage`].
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// Signs it with `identity`, which must be the sending node's (the one its machine was
    /// started with): a frame signed by another key is refused as [`Rejection::Forged`].
    /// Pure; may run on any thread.
    pub fn sign(self, identity: &Identity) -> SignedSwim {
        let signed =
            SignedSwim::signed_bytes(self.from, &self.to, self.generation, self.seq, &self.body);
        SignedSwim {
            from: self.from,
            to: self.to,
            generation: self.generation,
            seq: self.seq,
            body: self.body,
            signature: Bytes::copy_from_slice(&identity.sign(&signed)),
        }
    }

    /// The frame with an all-zero signature: the same size as the signed one once encoded
    /// (for counting bytes before signing); it verifies nowhere.
    pub fn unsigned_placeholder(&self) -> SignedSwim {
        SignedSwim {
            from: self.from,
            to: self.to.clone(),
            generation: self.generation,
            seq: self.seq,
            body: self.body.clone(),
            signature: Bytes::from_static(&[0; SIGNATURE_LEN]),
        }
    }
}

/// [`super::Membership::poll_unsigned_frame`]'s answer: a frame to sign (keyring mode) or a
/// plain one (insecure mode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnsignedFrame {
    /// Unsigned by design (insecure mode): send as it is.
    Plain(SwimMessage),
    /// To sign with the node's identity before sending.
    ToSign(UnsignedSwim),
}

/// A membership message as it travels: signed, or plain (insecure mode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwimFrame {
    /// Unsigned.
    Plain(SwimMessage),
    /// Signed.
    Signed(SignedSwim),
}

/// A frame the owner must send (see [`super::Membership::poll_frame`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutFrame {
    /// Where to.
    pub to: Address,
    /// What.
    pub frame: SwimFrame,
}

/// Why a received membership message was dropped before it was acted on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rejection {
    /// A plain message to a node with a keyring.
    Unsigned,
    /// The sender id is not bound to any key in the keyring (never listed, or revoked).
    UnknownKey,
    /// The signature does not verify with the key of the claimed sender: signed by someone
    /// else, or any signed byte changed.
    Forged,
    /// Sent to another address than this node's.
    Misdirected,
    /// Seen before, older than the replay window, or from an older generation of the sender.
    Replayed,
    /// The signed body does not decode within the limits.
    Malformed,
    /// The body claims another sender than the signer.
    IdMismatch,
}

/// Counters of refused membership input, per kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuthStats {
    /// Messages that verified and were handed to the protocol.
    pub verified: u64,
    /// [`Rejection::Unsigned`].
    pub unsigned: u64,
    /// [`Rejection::UnknownKey`].
    pub unknown_key: u64,
    /// [`Rejection::Forged`].
    pub forged: u64,
    /// [`Rejection::Misdirected`].
    pub misdirected: u64,
    /// [`Rejection::Replayed`].
    pub replayed: u64,
    /// [`Rejection::Malformed`].
    pub malformed: u64,
    /// [`Rejection::IdMismatch`].
    pub id_mismatch: u64,
    /// Member records (alive updates, push-pull entries) refused because the keyring does
    /// not list the member's key, or the key does not derive the member's id.
    pub unadmitted_members: u64,
    /// Members removed from the view because a new keyring no longer lists their key.
    pub revoked_members: u64,
    /// Member records refused because they claim the address of this node or of another live
    /// member (with another key): an address belongs to one key while its member lives.
    pub address_conflicts: u64,
    /// Messages this node signed.
    pub signed: u64,
    /// Acks relayed by a helper this node asked, for a probe of this node that had already
    /// ended: verified, then dropped without effect (not a rejection).
    pub late_relayed_acks: u64,
}

impl AuthStats {
    /// Every message rejected, whatever the kind.
    pub fn rejected(&self) -> u64 {
        self.unsigned
            + self.unknown_key
            + self.forged
            + self.misdirected
            + self.replayed
            + self.malformed
            + self.id_mismatch
    }

    pub(super) fn count(&mut self, why: Rejection) {
        *match why {
            Rejection::Unsigned => &mut self.unsigned,
            Rejection::UnknownKey => &mut self.unknown_key,
            Rejection::Forged => &mut self.forged,
            Rejection::Misdirected => &mut self.misdirected,
            Rejection::Replayed => &mut self.replayed,
            Rejection::Malformed => &mut self.malformed,
            Rejection::IdMismatch => &mut self.id_mismatch,
        } += 1;
    }
}

/// One sender's replay state: the highest `(generation, seq)` seen and a bitmap of the
/// [`REPLAY_WINDOW`] sequence numbers at and below it (bit `i` is `top - i`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ReplayWindow {
    generation: u64,
    top: u64,
    seen: [u64; WINDOW_WORDS],
}

impl ReplayWindow {
    fn first(generation: u64, seq: u64) -> Self {
        let mut seen = [0; WINDOW_WORDS];
        seen[0] = 1;
        ReplayWindow {
            generation,
            top: seq,
            seen,
        }
    }

    /// Whether `(generation, seq)` would be accepted.
    fn admits(&self, generation: u64, seq: u64) -> bool {
        match generation.cmp(&self.generation) {
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Equal => {
                if seq > self.top {
                    return true;
                }
                let back = self.top - seq;
                back < REPLAY_WINDOW && !self.bit(back)
            }
        }
    }

    /// Records `(generation, seq)`, which [`ReplayWindow::admits`] (anything else is left
    /// as it is).
    fn record(&mut self, generation: u64, seq: u64) {
        if generation > self.generation {
            *self = ReplayWindow::first(generation, seq);
            return;
        }
        if generation < self.generation || self.top.saturating_sub(seq) >= REPLAY_WINDOW {
            return;
        }
        if seq > self.top {
            self.shift(seq - self.top);
            self.top = seq;
            self.seen[0] |= 1;
        } else {
            let back = self.top - seq;
            self.seen[(back / 64) as usize] |= 1 << (back % 64);
        }
    }

    fn bit(&self, back: u64) -> bool {
        self.seen[(back / 64) as usize] & (1 << (back % 64)) != 0
    }

    /// Moves every bit `by` places further back (older), dropping those past the window.
    fn shift(&mut self, by: u64) {
        if by >= REPLAY_WINDOW {
            self.seen = [0; WINDOW_WORDS];
            return;
        }
        let words = (by / 64) as usize;
        let bits = (by % 64) as u32;
        for i in (0..WINDOW_WORDS).rev() {
            let lo = i.checked_sub(words).map_or(0, |j| self.seen[j]);
            let carry = if bits == 0 {
                0
            } else {
                i.checked_sub(words + 1)
                    .map_or(0, |j| self.seen[j] >> (64 - bits))
            };
            self.seen[i] = (lo << bits) | carry;
        }
    }
}

/// The machine's keyring state in keyring mode.
#[derive(Debug)]
pub(super) struct Auth {
    pub(super) identity: Identity,
    pub(super) keyring: Keyring,
    pub(super) next_seq: u64,
    pub(super) windows: HashMap<NodeId, ReplayWindow>,
}

/// A signed message whose signer is in a keyring, whose signature verifies with the
/// signer's key and whose body decodes: steps 1, 2 and 5 of the [module
/// documentation](self), the checks that need no state of the receiving machine.
///
/// [`verify_frame`] makes one; [`super::Membership::handle_verified_frame`] takes it and
/// runs the remaining checks (destination, replay guard, who the body speaks for) before it
/// acts. Because verifying needs only the keyring, a driver can verify frames off the
/// machine's loop (on other threads, in batches) and hand the results to the machine in
/// the order the frames arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedFrame {
    from: NodeId,
    to: Address,
    generation: u64,
    seq: u64,
    /// The key the signature verified with: the machine acts on the frame only while its
    /// own keyring binds the signer to this key.
    key: PublicKey,
    /// The size limit the body was decoded within.
    max_len: usize,
    body: Bytes,
    message: SwimMessage,
}

impl VerifiedFrame {
    /// The signer.
    pub fn from(&self) -> NodeId {
        self.from
    }

    /// The address the signer sent it to.
    pub fn to(&self) -> &Address {
        &self.to
    }

    /// The decoded body.
    pub fn message(&self) -> &SwimMessage {
        &self.message
    }

    /// The body as decoded within `max_len`: decoded again if it was decoded within
    /// another limit.
    pub(super) fn into_message(self, max_len: usize) -> Result<SwimMessage, Rejection> {
        if self.max_len == max_len {
            Ok(self.message)
        } else {
            crate::wire::decode_payload(&self.body, max_len).map_err(|_| Rejection::Malformed)
        }
    }
}

/// Verifies `frame` against `keyring` and decodes its body within `max_len` bytes: steps 1,
/// 2 and 5 of the [module documentation](self), in that order. Pure: it changes nothing,
/// reads no clock and may run on any thread. The replay guard, the destination and the
/// body's sender are the machine's to check
/// ([`super::Membership::handle_verified_frame`]).
///
/// A frame refused here is best handed to [`super::Membership::handle_frame`] (which
/// checks it again, in the machine's own order, and counts the refusal) or dropped.
pub fn verify_frame(
    keyring: &Keyring,
    frame: &SignedSwim,
    max_len: usize,
) -> Result<VerifiedFrame, Rejection> {
    let key = *keyring.get(frame.from).ok_or(Rejection::UnknownKey)?;
    if frame.signature.len() != SIGNATURE_LEN
        || frame.to.as_str().len() > super::message::MAX_ADDR_LEN
    {
        return Err(Rejection::Forged);
    }
    let signed = SignedSwim::signed_bytes(
        frame.from,
        &frame.to,
        frame.generation,
        frame.seq,
        &frame.body,
    );
    if !keyring.verify(frame.from, &signed, &frame.signature) {
        return Err(Rejection::Forged);
    }
    let message: SwimMessage =
        crate::wire::decode_payload(&frame.body, max_len).map_err(|_| Rejection::Malformed)?;
    Ok(VerifiedFrame {
        from: frame.from,
        to: frame.to.clone(),
        generation: frame.generation,
        seq: frame.seq,
        key,
        max_len,
        body: frame.body.clone(),
        message,
    })
}

/// A message that passed every check but the body's own (step 6), which needs the
/// machine's probe state.
pub(super) struct Verified {
    pub(super) from: NodeId,
    pub(super) message: SwimMessage,
    generation: u64,
    seq: u64,
}

impl Auth {
    pub(super) fn new(identity: Identity, keyring: Keyring) -> Self {
        Auth {
            identity,
            keyring,
            next_seq: 0,
            windows: HashMap::new(),
        }
    }

    /// Encodes and numbers `message` for `to`, as this node in `generation`, ready to be
    /// signed.
    pub(super) fn seal(
        &mut self,
        generation: u64,
        to: &Address,
        message: &SwimMessage,
        max_len: usize,
    ) -> Result<UnsignedSwim, crate::wire::WireError> {
        let body = crate::wire::encode_payload(message, max_len)?;
        let seq = self.next_seq;
        self.next_seq += 1;
        Ok(UnsignedSwim {
            from: self.identity.node_id(),
            to: to.clone(),
            generation,
            seq,
            body,
        })
    }

    /// Steps 3 and 4 of the [module documentation](self) for a message from `from` to
    /// `to` numbered `(generation, seq)`. Changes nothing.
    fn admit(
        &self,
        own_addr: &Address,
        from: NodeId,
        to: &Address,
        generation: u64,
        seq: u64,
    ) -> Result<(), Rejection> {
        if to != own_addr {
            return Err(Rejection::Misdirected);
        }
        if self
            .windows
            .get(&from)
            .is_some_and(|w| !w.admits(generation, seq))
        {
            return Err(Rejection::Replayed);
        }
        Ok(())
    }

    /// Steps 1 to 5 of the [module documentation](self), in that order. Changes nothing.
    pub(super) fn open(
        &self,
        own_addr: &Address,
        frame: &SignedSwim,
        max_len: usize,
    ) -> Result<Verified, Rejection> {
        match verify_frame(&self.keyring, frame, max_len) {
            Ok(v) => self.finish(own_addr, v, max_len),
            // A malformed body of a frame that is also misdirected or replayed counts as
            // the earlier step.
            Err(Rejection::Malformed) => {
                self.admit(own_addr, frame.from, &frame.to, frame.generation, frame.seq)?;
                Err(Rejection::Malformed)
            }
            Err(why) => Err(why),
        }
    }

    /// Steps 3 and 4 for a frame [`verify_frame`] passed, after checking that it was
    /// verified with the key this keyring has for its signer (else
    /// [`Rejection::UnknownKey`], as step 1 would say now) and within `max_len` (else
    /// the body is decoded again). Changes nothing.
    pub(super) fn finish(
        &self,
        own_addr: &Address,
        v: VerifiedFrame,
        max_len: usize,
    ) -> Result<Verified, Rejection> {
        if self.keyring.get(v.from) != Some(&v.key) {
            return Err(Rejection::UnknownKey);
        }
        self.admit(own_addr, v.from, &v.to, v.generation, v.seq)?;
        let (from, generation, seq) = (v.from, v.generation, v.seq);
        Ok(Verified {
            from,
            message: v.into_message(max_len)?,
            generation,
            seq,
        })
    }

    /// Records a verified message in its sender's replay window.
    pub(super) fn accept(&mut self, v: &Verified) {
        match self.windows.get_mut(&v.from) {
            Some(w) => w.record(v.generation, v.seq),
            None => {
                self.windows
                    .insert(v.from, ReplayWindow::first(v.generation, v.seq));
            }
        }
    }
}

/// The sender id a message's body speaks for: its `from`. (A relayed ack names the probed
/// member instead; the machine checks those separately.)
pub(super) fn claimed_sender(message: &SwimMessage) -> NodeId {
    match message {
        SwimMessage::Ping { from, .. }
        | SwimMessage::Ack { from, .. }
        | SwimMessage::PingReq { from, .. }
        | SwimMessage::Nack { from, .. }
        | SwimMessage::Gossip { from, .. }
        | SwimMessage::PushPull { from, .. } => *from,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_window_accepts_each_number_once_within_the_window() {
        let mut w = ReplayWindow::first(5, 100);
        assert!(!w.admits(5, 100), "same number again");
        assert!(!w.admits(4, 1000), "older generation");
        assert!(w.admits(5, 99), "reordered within the window");
        w.record(5, 99);
        assert!(!w.admits(5, 99));
        assert!(w.admits(5, 100 + 3 * 64 + 7));
        w.record(5, 100 + 3 * 64 + 7);
        assert!(!w.admits(5, 100), "still remembered after a shift");
        assert!(!w.admits(5, 99), "still remembered after a shift");
        assert!(w.admits(5, 101), "a gap stays open");
        w.record(5, 101);
        assert!(!w.admits(5, 101));
        let top = 100 + 3 * 64 + 7;
        w.record(5, top + REPLAY_WINDOW - 1);
        assert!(!w.admits(5, top), "seen, at the window's far end");
        assert!(w.admits(5, top + 1), "unseen, inside the window");
        w.record(5, top + REPLAY_WINDOW);
        assert!(!w.admits(5, top), "past the window");
        let top = top + REPLAY_WINDOW;
        w.record(5, top + 5 * REPLAY_WINDOW);
        assert!(!w.admits(5, top), "the window moved past it");
        assert!(w.admits(6, 0), "a newer generation starts afresh");
        w.record(6, 0);
        assert!(!w.admits(5, top + 5 * REPLAY_WINDOW + 1));
        assert!(!w.admits(6, 0));
    }

    /// Against a set of every number seen: the bitmap agrees on every number near the top.
    #[test]
    fn replay_window_matches_a_reference_set() {
        use rand::{Rng, SeedableRng};
        let seed = 7;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut w = ReplayWindow::first(1, 0);
        let mut seen = std::collections::BTreeSet::from([0u64]);
        let mut top = 0u64;
        for _ in 0..20_000 {
            let seq = if rng.random_bool(0.7) {
                top + rng.random_range(1..200)
            } else {
                top.saturating_sub(rng.random_range(0..REPLAY_WINDOW + 50))
            };
            let expect = seq > top || (top - seq < REPLAY_WINDOW && !seen.contains(&seq));
            assert_eq!(w.admits(1, seq), expect, "seed {seed}: seq {seq} top {top}");
            if expect {
                w.record(1, seq);
                seen.insert(seq);
                top = top.max(seq);
            }
        }
    }
}
