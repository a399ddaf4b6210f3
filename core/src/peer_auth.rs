//! What a transport needs to authenticate its connections: the node's identity, the live
//! keyring and which member owns which address.
//!
//! A node in keyring mode hands a [`ChannelAuth`] to its transport in
//! [`TransportSpec::auth`](crate::registry::TransportSpec::auth). The transport presents a
//! certificate derived from the [`Identity`] (see `chorus_core::tls`, feature `tls`), accepts a
//! peer only if the peer's certificate key is in the [`SharedKeyring`] *at handshake time*
//! (so a key added or revoked on the running node counts for the next connection), and checks
//! the address a peer announces against the [`AddressBook`]: an address that a live member
//! owns belongs to that member's key and to no other.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::auth::{Identity, Keyring, PublicKey};
use crate::identity::{Address, NodeId};

/// A keyring shared between the membership (which replaces it on reload) and the transport
/// (which reads it at every handshake, and checks [`generation`](Self::generation) on
/// established connections so that a revoked key loses them too).
#[derive(Clone, Default)]
pub struct SharedKeyring(Arc<KeyringSlot>);

#[derive(Default)]
struct KeyringSlot {
    keyring: RwLock<Arc<Keyring>>,
    generation: AtomicU64,
}

impl SharedKeyring {
    /// A handle holding `keyring`.
    pub fn new(keyring: Keyring) -> Self {
        SharedKeyring(Arc::new(KeyringSlot {
            keyring: RwLock::new(Arc::new(keyring)),
            generation: AtomicU64::new(0),
        }))
    }

    /// The keyring in force now.
    pub fn current(&self) -> Arc<Keyring> {
        Arc::clone(
            &self
                .0
                .keyring
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Replaces the keyring: later handshakes check against `keyring`, and the generation
    /// moves on.
    pub fn replace(&self, keyring: Keyring) {
        *self
            .0
            .keyring
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(keyring);
        self.0.generation.fetch_add(1, Ordering::Release);
    }

    /// How many times the keyring was replaced: a connection that checked its peer's key at
    /// one generation need not check again until this changes (one atomic load per check).
    pub fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Acquire)
    }

    /// Whether the keyring in force lists `key`.
    pub fn contains(&self, key: &PublicKey) -> bool {
        self.0
            .keyring
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(key)
    }

    fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Re-checks one connection's peer key against the keyring when the keyring changes. Clones
/// check independently (one per reader or writer of a connection).
#[derive(Clone, Debug)]
pub struct KeyCheck {
    keyring: SharedKeyring,
    key: PublicKey,
    checked: u64,
}

impl KeyCheck {
    /// A check of `key` if the keyring admits it now. The generation is read *before* the
    /// key is looked up, so a keyring replaced at any moment after this call is seen by the
    /// next [`still_admitted`](Self::still_admitted).
    pub fn admit(keyring: &SharedKeyring, key: PublicKey) -> Option<Self> {
        let checked = keyring.generation();
        keyring.contains(&key).then(|| KeyCheck {
            keyring: keyring.clone(),
            key,
            checked,
        })
    }

    /// The peer's key.
    pub fn key(&self) -> PublicKey {
        self.key
    }

    /// Whether the key is still admitted: one atomic load unless the keyring changed since
    /// the last call.
    pub fn still_admitted(&mut self) -> bool {
        let now = self.keyring.generation();
        if now == self.checked {
            return true;
        }
        if self.keyring.contains(&self.key) {
            self.checked = now;
            true
        } else {
            false
        }
    }
}

impl fmt::Debug for SharedKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedKeyring")
            .field("keys", &self.current().len())
            .finish()
    }
}

/// Which live member owns which address, as the membership view says. The node keeps it in
/// step with its view; transports consult it to refuse a connection whose announced (or
/// dialled) address belongs to another member's key.
#[derive(Clone, Default)]
pub struct AddressBook(Arc<RwLock<HashMap<Address, NodeId>>>);

impl AddressBook {
    /// An empty book: every address is free.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the book with these `(address, owner)` pairs (the live members of a view).
    /// If two live members claim one address, the first listed keeps it.
    pub fn replace(&self, owners: impl IntoIterator<Item = (Address, NodeId)>) {
        let mut next = HashMap::new();
        for (addr, id) in owners {
            next.entry(addr).or_insert(id);
        }
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = next;
    }

    /// The live member that owns `addr`, if any.
    pub fn owner(&self, addr: &Address) -> Option<NodeId> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(addr)
            .copied()
    }

    /// Whether the peer with `key` may use `addr`: it is free or that key's member owns it.
    pub fn may_use(&self, addr: &Address, key: &PublicKey) -> Result<(), AddressTaken> {
        match self.owner(addr) {
            Some(owner) if owner != key.node_id() => Err(AddressTaken {
                addr: addr.clone(),
                owner,
                claimed_by: key.node_id(),
            }),
            _ => Ok(()),
        }
    }

    fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for AddressBook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.read().unwrap_or_else(PoisonError::into_inner).len();
        f.debug_struct("AddressBook")
            .field("addresses", &n)
            .finish()
    }
}

/// A peer used an address that a live member with another key owns: the connection is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("address {addr} belongs to member {owner}, not to {claimed_by} (the handshake's key)")]
pub struct AddressTaken {
    /// The address.
    pub addr: Address,
    /// The live member that owns it.
    pub owner: NodeId,
    /// The node id of the key that authenticated the connection.
    pub claimed_by: NodeId,
}

/// The node's identity, the live keyring and the address book: what an authenticating
/// transport is given (see the [module documentation](self)).
#[derive(Clone)]
pub struct ChannelAuth {
    /// This node's key pair; the transport's certificate is derived from it.
    pub identity: Identity,
    /// The keys peers may present.
    pub keyring: SharedKeyring,
    /// Who owns which address.
    pub book: AddressBook,
}

impl ChannelAuth {
    /// Channel authentication for `identity` against `keyring`, with an empty address book.
    pub fn new(identity: Identity, keyring: SharedKeyring) -> Self {
        ChannelAuth {
            identity,
            keyring,
            book: AddressBook::new(),
        }
    }

    /// Whether a peer presenting `key` may connect: its key is in the keyring now.
    pub fn admits(&self, key: &PublicKey) -> bool {
        self.keyring.contains(key)
    }
}

impl fmt::Debug for ChannelAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelAuth")
            .field("identity", &self.identity)
            .field("keyring", &self.keyring)
            .field("book", &self.book)
            .finish()
    }
}

/// Equal when they hold the same identity and share the same keyring and book handles.
impl PartialEq for ChannelAuth {
    fn eq(&self, other: &Self) -> bool {
        self.identity == other.identity
            && self.keyring.same(&other.keyring)
            && self.book.same(&other.book)
    }
}

impl Eq for ChannelAuth {}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(seed: u8) -> Identity {
        Identity::from_secret([seed; 32])
    }

    #[test]
    fn the_shared_keyring_is_read_live() {
        let a = identity(1);
        let shared = SharedKeyring::new(Keyring::new());
        let auth = ChannelAuth::new(a.clone(), shared.clone());
        assert!(!auth.admits(&a.public_key()));
        shared.replace(Keyring::from_keys([a.public_key()]).expect("keyring"));
        assert!(auth.admits(&a.public_key()));
        let mut check = KeyCheck::admit(&shared, a.public_key()).expect("admitted");
        assert!(check.still_admitted());
        shared.replace(Keyring::new());
        assert!(!auth.admits(&a.public_key()));
        assert!(
            !check.still_admitted(),
            "a revoked key loses its connections"
        );
        assert!(KeyCheck::admit(&shared, a.public_key()).is_none());
    }

    /// A keyring replaced between the admission and the first use is still seen.
    #[test]
    fn a_replacement_right_after_admission_is_seen() {
        let a = identity(1);
        let shared = SharedKeyring::new(Keyring::from_keys([a.public_key()]).expect("keyring"));
        let mut check = KeyCheck::admit(&shared, a.public_key()).expect("admitted");
        shared.replace(Keyring::new());
        assert!(!check.still_admitted());
    }

    #[test]
    fn an_owned_address_belongs_to_its_key_only() {
        let (a, b) = (identity(1), identity(2));
        let book = AddressBook::new();
        let addr = Address::new("10.0.0.1:7000");
        // Free: anyone admitted may use it.
        assert_eq!(book.may_use(&addr, &b.public_key()), Ok(()));
        book.replace([(addr.clone(), a.node_id())]);
        assert_eq!(book.may_use(&addr, &a.public_key()), Ok(()));
        let taken = book.may_use(&addr, &b.public_key()).expect_err("a owns it");
        assert_eq!(taken.owner, a.node_id());
        assert_eq!(taken.claimed_by, b.node_id());
        // Once a is gone from the view, the address is free again.
        book.replace([]);
        assert_eq!(book.may_use(&addr, &b.public_key()), Ok(()));
    }
}
