//! Node identities and the cluster keyring: who may be a member.
//!
//! Every node has an Ed25519 key pair, its [`Identity`]. Its [`NodeId`] is derived from the
//! public key ([`PublicKey::node_id`]: the first 8 bytes of SHA-256 over a domain tag and the
//! key), so the binding between the id a node claims and the key that signs its messages
//! needs no table and no first-use trust: whoever signs as id `x` must hold the key whose
//! derived id is `x`, and membership metadata, which carries the key, is refused when the two
//! disagree. The id is derived rather than chosen for the reason Garage uses the key itself
//! as the node id: a member admitted to the cluster can otherwise publish itself under another
//! member's id (and so take over its place on the ring) or under any number of invented ids.
//!
//! The [`Keyring`] lists the public keys allowed in the cluster. It is plain data: the
//! membership machine ([`crate::membership`]) checks every signed message and every member
//! record against the keyring it was given, and replacing the keyring (rotation) removes
//! members whose key it no longer lists. Reading key files is the runtime's business
//! (`runtime::keys`, feature `runtime`); this module performs no I/O.
//!
//! Secret keys never appear in `Debug` output.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::identity::NodeId;

/// Domain tag hashed with a public key to derive its node id.
const NODE_ID_DOMAIN: &[u8] = b"chorus node id v1\0";

/// Length of a signature in bytes.
pub const SIGNATURE_LEN: usize = 64;

/// Most keys a keyring holds: every check against it is a map lookup, and a membership machine
/// keeps replay state for at most this many senders.
pub const MAX_KEYS: usize = 64 * 1024;

/// An Ed25519 public key: what the keyring lists and member metadata carries.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// The node id bound to this key.
    pub fn node_id(&self) -> NodeId {
        let digest = Sha256::new()
            .chain_update(NODE_ID_DOMAIN)
            .chain_update(self.0)
            .finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        NodeId(u64::from_be_bytes(id))
    }

    /// Whether `signature` is this key's signature of `message` (strict verification: weak
    /// keys and non-canonical signatures are refused). False for bytes that are not a valid
    /// key or signature; never panics.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(signature) = <[u8; SIGNATURE_LEN]>::try_from(signature) else {
            return false;
        };
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        key.verify_strict(message, &Signature::from_bytes(&signature))
            .is_ok()
    }

    /// The key as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_hex())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    /// Reads 64 hex digits (either case) and checks that they are a valid Ed25519 point.
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let bytes = unhex32(s.trim())?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::NotAPoint)?;
        Ok(PublicKey(bytes))
    }
}

/// Why a key or identity could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Not 64 hex digits.
    #[error("not 64 hex digits")]
    NotHex,
    /// The bytes are not a valid Ed25519 public key.
    #[error("not a valid Ed25519 public key")]
    NotAPoint,
    /// An identity's text is not `chorus-ed25519-secret-v1 <64 hex digits>`.
    #[error("not a Chorus identity (expected `{IDENTITY_TAG} <64 hex digits>`)")]
    NotAnIdentity,
}

/// The first word of an identity's text form ([`Identity::to_text`]).
pub const IDENTITY_TAG: &str = "chorus-ed25519-secret-v1";

/// A node's Ed25519 key pair. Generated once per node and kept (the runtime stores it in the
/// node's data directory); an in-memory one serves tests and embedded use.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
    public: PublicKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.node_id())
            .field("public_key", &self.public)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.public == other.public
    }
}

impl Eq for Identity {}

impl Identity {
    /// The identity whose secret key is `secret`.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&secret);
        let public = PublicKey(key.verifying_key().to_bytes());
        Identity { key, public }
    }

    /// A new identity drawn from `rng` (seeded in tests and simulations; the runtime draws
    /// from the operating system).
    pub fn from_rng<R: RngCore + ?Sized>(rng: &mut R) -> Self {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Self::from_secret(secret)
    }

    /// The public key.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// The node id bound to the public key.
    pub fn node_id(&self) -> NodeId {
        self.public.node_id()
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.key.sign(message).to_bytes()
    }

    /// The secret key's bytes (for storing the identity; keep them secret).
    pub fn secret(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The text form stored in an identity file: `chorus-ed25519-secret-v1 <64 hex digits>`
    /// and a newline.
    pub fn to_text(&self) -> String {
        format!("{IDENTITY_TAG} {}\n", hex(&self.key.to_bytes()))
    }

    /// Reads [`Identity::to_text`]'s form (surrounding whitespace allowed).
    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        let mut words = text.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some(IDENTITY_TAG), Some(secret), None) => Ok(Self::from_secret(
                unhex32(secret).map_err(|_| KeyError::NotAnIdentity)?,
            )),
            _ => Err(KeyError::NotAnIdentity),
        }
    }
}

/// The public keys allowed in the cluster, by the node id each is bound to. Each key is kept
/// decompressed too, so verifying a signature does not decompress it again.
#[derive(Clone, Default)]
pub struct Keyring {
    keys: HashMap<NodeId, PublicKey>,
    verifiers: HashMap<NodeId, VerifyingKey>,
}

impl PartialEq for Keyring {
    fn eq(&self, other: &Self) -> bool {
        self.keys == other.keys
    }
}

impl Eq for Keyring {}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.sorted().map(|(_, k)| k))
            .finish()
    }
}

/// Why a keyring was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringError {
    /// A line of a keyring text is not a key.
    #[error("line {line}: {error}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// Why.
        error: KeyError,
    },
    /// Two different keys derive the same node id (a 64-bit collision: generate one again).
    #[error("keys {a} and {b} derive the same node id {id}")]
    IdCollision {
        /// The id.
        id: NodeId,
        /// One key.
        a: PublicKey,
        /// The other.
        b: PublicKey,
    },
    /// A weak key: a point of small order, for which anyone can forge signatures.
    #[error("weak key {0}")]
    WeakKey(PublicKey),
    /// More than [`MAX_KEYS`] keys.
    #[error("more than {MAX_KEYS} keys")]
    TooMany,
}

impl Keyring {
    /// An empty keyring: a node with it accepts nobody but can run alone.
    pub fn new() -> Self {
        Self::default()
    }

    /// A keyring of these keys (duplicates are fine).
    pub fn from_keys(keys: impl IntoIterator<Item = PublicKey>) -> Result<Self, KeyringError> {
        let mut ring = Keyring::new();
        for key in keys {
            ring.insert(key)?;
        }
        Ok(ring)
    }

    /// Reads a keyring text: one key (64 hex digits) per line, optionally followed by
    /// whitespace and a label; blank lines and lines starting with `#` are skipped.
    pub fn parse(text: &str) -> Result<Self, KeyringError> {
        let mut ring = Keyring::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let word = line.split_whitespace().next().unwrap_or_default();
            let key = word
                .parse::<PublicKey>()
                .map_err(|error| KeyringError::BadLine { line: i + 1, error })?;
            ring.insert(key)?;
        }
        Ok(ring)
    }

    /// Adds `key`. A weak key (a point of small order, which would let anyone sign for it)
    /// or bytes that are not a point are refused.
    pub fn insert(&mut self, key: PublicKey) -> Result<(), KeyringError> {
        let id = key.node_id();
        let verifier = match VerifyingKey::from_bytes(&key.0) {
            Ok(v) if !v.is_weak() => v,
            _ => return Err(KeyringError::WeakKey(key)),
        };
        match self.keys.get(&id) {
            Some(existing) if *existing != key => Err(KeyringError::IdCollision {
                id,
                a: *existing,
                b: key,
            }),
            Some(_) => Ok(()),
            None if self.keys.len() >= MAX_KEYS => Err(KeyringError::TooMany),
            None => {
                self.keys.insert(id, key);
                self.verifiers.insert(id, verifier);
                Ok(())
            }
        }
    }

    /// Removes `key`; true if it was there.
    pub fn remove(&mut self, key: &PublicKey) -> bool {
        let id = key.node_id();
        if self.keys.get(&id) == Some(key) {
            self.keys.remove(&id);
            self.verifiers.remove(&id);
            true
        } else {
            false
        }
    }

    /// The key bound to `id`, if the keyring lists one.
    pub fn get(&self, id: NodeId) -> Option<&PublicKey> {
        self.keys.get(&id)
    }

    /// Whether `signature` is the signature of `message` by the key bound to `id`: false if
    /// the keyring lists no key for `id` or the signature does not verify. Never panics.
    ///
    /// The check is Ed25519's cofactorless equation with canonical scalars; the keyring
    /// refuses weak keys when they are added, which is what the strict variant would add
    /// for the key. (Skipping the strict variant's small-order check of the signature's `R`
    /// saves a point decompression per message; a second valid signature of the same bytes
    /// is no forgery, and a replay of it is caught by the sequence number it signs.)
    pub fn verify(&self, id: NodeId, message: &[u8], signature: &[u8]) -> bool {
        let Some(key) = self.verifiers.get(&id) else {
            return false;
        };
        let Ok(signature) = <[u8; SIGNATURE_LEN]>::try_from(signature) else {
            return false;
        };
        ed25519_dalek::Verifier::verify(key, message, &Signature::from_bytes(&signature)).is_ok()
    }

    /// Whether the keyring lists `key`.
    pub fn contains(&self, key: &PublicKey) -> bool {
        self.keys.get(&key.node_id()) == Some(key)
    }

    /// Whether `id` with `key` is admitted: the keyring lists `key` and `key` derives `id`.
    pub fn admits(&self, id: NodeId, key: &[u8; 32]) -> bool {
        self.keys.get(&id).is_some_and(|k| k.0 == *key)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the keyring is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Every key, by node id, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (NodeId, &PublicKey)> {
        self.sorted()
    }

    fn sorted(&self) -> impl Iterator<Item = (NodeId, &PublicKey)> {
        let sorted: BTreeMap<NodeId, &PublicKey> = self.keys.iter().map(|(i, k)| (*i, k)).collect();
        sorted.into_iter()
    }

    /// The text form [`Keyring::parse`] reads, one key per line with its node id as label.
    pub fn to_text(&self) -> String {
        self.sorted()
            .map(|(id, k)| format!("{k} node-{id}\n"))
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex32(s: &str) -> Result<[u8; 32], KeyError> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return Err(KeyError::NotHex);
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16).ok_or(KeyError::NotHex);
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn identity_text_round_trips_and_signs_for_its_key() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let id = Identity::from_rng(&mut rng);
        let back = Identity::from_text(&id.to_text()).expect("reads back");
        assert_eq!(back.public_key(), id.public_key());
        let sig = id.sign(b"hello");
        assert!(id.public_key().verify(b"hello", &sig));
        assert!(!id.public_key().verify(b"hellO", &sig));
        assert!(!id.public_key().verify(b"hello", &sig[..63]));
        let other = Identity::from_rng(&mut rng);
        assert!(!other.public_key().verify(b"hello", &sig));
        assert!(!format!("{id:?}").contains(&hex(&id.secret())));
        assert_eq!(
            Identity::from_text("nonsense"),
            Err(KeyError::NotAnIdentity)
        );
    }

    #[test]
    fn keyring_parses_lists_and_binds_ids() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let a = Identity::from_rng(&mut rng).public_key();
        let b = Identity::from_rng(&mut rng).public_key();
        let text = format!("# cluster\n\n{a} node-a\n{}\n", b.to_hex().to_uppercase());
        let ring = Keyring::parse(&text).expect("parses");
        assert_eq!(ring.len(), 2);
        assert!(ring.contains(&a) && ring.contains(&b));
        assert!(ring.admits(a.node_id(), &a.0));
        assert!(!ring.admits(a.node_id(), &b.0), "a's id with b's key");
        assert_eq!(Keyring::parse(&ring.to_text()), Ok(ring.clone()));
        let err = Keyring::parse("# x\nzz\n").unwrap_err();
        assert_eq!(
            err,
            KeyringError::BadLine {
                line: 2,
                error: KeyError::NotHex
            }
        );
        let mut ring = ring;
        assert!(ring.remove(&a));
        assert!(!ring.contains(&a));
        assert!(!ring.remove(&a));
    }
}
