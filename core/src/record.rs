//! Records and their last-writer-wins merge.
//!
//! A [`Record`] is a value or a tombstone, the [`Version`] that wrote it, and an optional expiry.
//! Replicas converge because [`Record::merge`] is a pure function that is commutative,
//! associative and idempotent: it picks the record with the highest [`Record::precedence`],
//! which orders by version first. Versions are unique per write (HLC timestamp plus writer id),
//! so the content tie-breaks only matter for malformed input, where they still keep every
//! replica on the same winner.

use std::cmp::Ordering;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::hlc::Version;

/// What a record holds.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum Payload {
    /// A live value.
    Value(#[serde(with = "crate::codec::serde_bytes")] Bytes),
    /// A delete marker; it shadows older values until it is collected after the grace period.
    Tombstone,
}

/// A versioned value or tombstone.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Record {
    /// The value or tombstone.
    pub payload: Payload,
    /// Who wrote it and when; decides the last-writer-wins merge.
    pub version: Version,
    /// Wall time (ms since the Unix epoch) after which the value reads as absent.
    pub expires_at_ms: Option<u64>,
}

impl Record {
    /// A live value without expiry.
    pub fn value(value: impl Into<Bytes>, version: Version) -> Self {
        Record {
            payload: Payload::Value(value.into()),
            version,
            expires_at_ms: None,
        }
    }

    /// A tombstone.
    pub fn tombstone(version: Version) -> Self {
        Record {
            payload: Payload::Tombstone,
            version,
            expires_at_ms: None,
        }
    }

    /// The same record with an expiry time.
    pub fn with_expiry(mut self, expires_at_ms: u64) -> Self {
        self.expires_at_ms = Some(expires_at_ms);
        self
    }

    /// Whether this is a tombstone.
    pub fn is_tombstone(&self) -> bool {
        matches!(self.payload, Payload::Tombstone)
    }

    /// The value, if this is a live value that has not expired at `now_ms`.
    pub fn live_value(&self, now_ms: u64) -> Option<&Bytes> {
        match &self.payload {
            Payload::Value(v) if !self.is_expired(now_ms) => Some(v),
            _ => None,
        }
    }

    /// Whether the record has expired at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| at <= now_ms)
    }

    /// Whether storage may drop this record at `now_ms` without risking resurrection.
    ///
    /// A tombstone or an expired value still shadows older versions that other replicas may
    /// hold, so it is kept for `grace` after it took effect (the tombstone's write time, or the
    /// expiry time); by then anti-entropy is expected to have spread it everywhere.
    pub fn is_collectable(&self, now_ms: u64, grace: Duration) -> bool {
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        let effective_ms = match (&self.payload, self.expires_at_ms) {
            (Payload::Tombstone, _) => self.version.timestamp.physical_ms(),
            (Payload::Value(_), Some(at)) => at,
            (Payload::Value(_), None) => return false,
        };
        effective_ms.saturating_add(grace_ms) <= now_ms
    }

    /// The total order used by the merge: version, then tombstone over value, then content.
    pub fn precedence(&self, other: &Record) -> Ordering {
        self.version
            .cmp(&other.version)
            .then_with(|| match (&self.payload, &other.payload) {
                (Payload::Tombstone, Payload::Tombstone) => Ordering::Equal,
                (Payload::Tombstone, Payload::Value(_)) => Ordering::Greater,
                (Payload::Value(_), Payload::Tombstone) => Ordering::Less,
                (Payload::Value(a), Payload::Value(b)) => a.cmp(b),
            })
            // An earlier expiry is the more conservative choice: `None` (never) sorts last.
            .then_with(|| match (self.expires_at_ms, other.expires_at_ms) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Less,
                (Some(_), None) => Ordering::Greater,
                (Some(a), Some(b)) => b.cmp(&a),
            })
    }

    /// Whether `self` wins over `other` in the last-writer-wins merge.
    pub fn supersedes(&self, other: &Record) -> bool {
        self.precedence(other) == Ordering::Greater
    }

    /// Last-writer-wins merge: commutative, associative and idempotent.
    pub fn merge(self, other: Record) -> Record {
        if other.supersedes(&self) { other } else { self }
    }

    /// Approximate bytes this record occupies in memory or on disk, excluding the key.
    pub fn encoded_len(&self) -> usize {
        let value = match &self.payload {
            Payload::Value(v) => v.len(),
            Payload::Tombstone => 0,
        };
        value + 16 + 1 + 9
    }

    /// A 64-bit fingerprint of `key` and this record, the unit of range digests.
    ///
    /// Backends combine fingerprints with wrapping addition, which is independent of
    /// iteration order, so identical contents give identical digests on every backend.
    pub fn fingerprint(&self, key: &[u8]) -> u64 {
        let mut h = Xxh3::new();
        h.update(&(key.len() as u64).to_le_bytes());
        h.update(key);
        h.update(&self.version.timestamp.as_u64().to_le_bytes());
        h.update(&self.version.node.0.to_le_bytes());
        match &self.payload {
            Payload::Tombstone => h.update(&[0]),
            Payload::Value(v) => {
                h.update(&[1]);
                h.update(&(v.len() as u64).to_le_bytes());
                h.update(v);
            }
        }
        match self.expires_at_ms {
            None => h.update(&[0]),
            Some(at) => {
                h.update(&[1]);
                h.update(&at.to_le_bytes());
            }
        }
        h.digest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Timestamp;
    use crate::identity::NodeId;
    use proptest::prelude::*;

    fn version(ms: u64, logical: u16, node: u64) -> Version {
        Version::new(Timestamp::new(ms, logical), NodeId(node))
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        // Small domains so that equal versions and equal contents actually occur.
        (
            0u64..4,
            0u16..3,
            0u64..3,
            prop::option::of(prop::collection::vec(0u8..3, 0..3)),
            prop::option::of(0u64..3),
        )
            .prop_map(|(ms, l, n, value, exp)| Record {
                payload: value.map_or(Payload::Tombstone, |v| Payload::Value(v.into())),
                version: version(ms, l, n),
                expires_at_ms: exp,
            })
    }

    #[test]
    fn newer_version_wins_and_node_breaks_ties() {
        let old = Record::value("a", version(1, 0, 9));
        let new = Record::value("b", version(2, 0, 1));
        assert_eq!(old.clone().merge(new.clone()), new);
        let tie_low = Record::value("x", version(5, 0, 1));
        let tie_high = Record::value("y", version(5, 0, 2));
        assert_eq!(tie_low.merge(tie_high.clone()), tie_high);
    }

    #[test]
    fn tombstone_shadows_older_value_not_newer() {
        let value = Record::value("v", version(10, 0, 1));
        let delete = Record::tombstone(version(11, 0, 1));
        assert!(delete.clone().merge(value.clone()).is_tombstone());
        let rewrite = Record::value("w", version(12, 0, 1));
        assert_eq!(delete.merge(rewrite.clone()), rewrite);
    }

    #[test]
    fn expiry_and_collection() {
        let v = Record::value("v", version(100, 0, 1)).with_expiry(200);
        assert!(v.live_value(199).is_some());
        assert!(v.live_value(200).is_none());
        assert!(!v.is_collectable(250, Duration::from_millis(100)));
        assert!(v.is_collectable(300, Duration::from_millis(100)));
        let t = Record::tombstone(version(100, 0, 1));
        assert!(!t.is_collectable(199, Duration::from_millis(100)));
        assert!(t.is_collectable(200, Duration::from_millis(100)));
        assert!(
            !Record::value("forever", version(1, 0, 1)).is_collectable(u64::MAX, Duration::ZERO)
        );
    }

    #[test]
    fn fingerprint_is_pinned() {
        // Literal values: replicas on different builds compare digests built from these.
        let value = Record::value("v", version(1_700_000_000_000, 7, 42)).with_expiry(9);
        assert_eq!(value.fingerprint(b"k"), 0xfc75_51b0_ff5b_930d);
        assert_eq!(
            Record::tombstone(version(1, 0, 1)).fingerprint(b""),
            0x928f_da53_3ab5_bca4
        );
    }

    #[test]
    fn fingerprint_covers_every_field() {
        let base = Record::value("v", version(1, 0, 1));
        let fp = base.fingerprint(b"k");
        assert_ne!(fp, base.fingerprint(b"k2"));
        assert_ne!(fp, Record::value("w", version(1, 0, 1)).fingerprint(b"k"));
        assert_ne!(fp, Record::value("v", version(1, 1, 1)).fingerprint(b"k"));
        assert_ne!(fp, Record::value("v", version(1, 0, 2)).fingerprint(b"k"));
        assert_ne!(fp, base.clone().with_expiry(5).fingerprint(b"k"));
        assert_ne!(fp, Record::tombstone(version(1, 0, 1)).fingerprint(b"k"));
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in arb_record(), b in arb_record()) {
            prop_assert_eq!(a.clone().merge(b.clone()), b.merge(a));
        }

        #[test]
        fn merge_is_associative(a in arb_record(), b in arb_record(), c in arb_record()) {
            let left = a.clone().merge(b.clone()).merge(c.clone());
            let right = a.merge(b.merge(c));
            prop_assert_eq!(left, right);
        }

        #[test]
        fn merge_is_idempotent(a in arb_record(), b in arb_record()) {
            prop_assert_eq!(a.clone().merge(a.clone()), a.clone());
            let ab = a.clone().merge(b.clone());
            prop_assert_eq!(ab.clone().merge(b), ab);
        }

        #[test]
        fn merge_keeps_the_highest_version(a in arb_record(), b in arb_record()) {
            let winner = a.clone().merge(b.clone());
            prop_assert_eq!(winner.version, a.version.max(b.version));
        }
    }
}
