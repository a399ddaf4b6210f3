//! Bounded serde helpers for every type that travels between nodes or lives in a file.
//!
//! Wire and storage types decode their byte strings and strings through these helpers, which
//! borrow from the input instead of allocating a length the input merely claims. They sit at
//! the bottom of the crate's layers, beside [`crate::identity`], because identity types such as
//! [`Address`](crate::identity::Address) decode through them too; [`crate::wire`] uses them,
//! it does not own them.

/// Serde helpers for `Bytes` fields of wire types: `#[serde(with = "crate::codec::serde_bytes")]`.
///
/// Deserializing through `deserialize_bytes` makes bincode hand out a slice of the input after
/// checking the claimed length against what is actually there, so a peer cannot make us allocate
/// more than it sent. The owned path (`deserialize_byte_buf`, which `Bytes` uses by default)
/// allocates the claimed length first.
pub mod serde_bytes {
    use std::fmt;

    use bytes::Bytes;
    use serde::{Deserializer, Serializer};

    /// Serializes as a byte string.
    pub fn serialize<S: Serializer>(bytes: &Bytes, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    /// Deserializes from a borrowed byte string, copying exactly what is present.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
        deserializer.deserialize_bytes(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> serde::de::Visitor<'de> for BytesVisitor {
        type Value = Bytes;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
            Ok(Bytes::copy_from_slice(v))
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
            Ok(Bytes::from(v))
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
            // Self-describing formats (JSON in tools and tests) write bytes as a sequence;
            // growth follows the elements actually present.
            let mut out = Vec::new();
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(Bytes::from(out))
        }
    }
}

/// Serde helpers for `String` fields of wire types, for the same reason as [`serde_bytes`].
pub mod serde_str {
    use std::fmt;

    use serde::{Deserializer, Serializer};

    /// Serializes as a string.
    pub fn serialize<S: Serializer>(s: &str, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(s)
    }

    /// Deserializes from a borrowed string, copying exactly what is present.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
        deserializer.deserialize_str(StrVisitor)
    }

    struct StrVisitor;

    impl serde::de::Visitor<'_> for StrVisitor {
        type Value = String;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }

        fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
    }
}
