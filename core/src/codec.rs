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

/// Most bytes [`bounded_vec`] reserves up front on the strength of a claimed length.
pub const PREALLOC_BYTES: usize = 4096;

/// Deserializes a `Vec<T>` of at most `N` elements: `#[serde(deserialize_with =
/// "crate::codec::bounded_vec::<_, _, N>")]`.
///
/// A longer sequence is an error as soon as its claimed length is read (bincode gives it up
/// front) or, for formats that do not claim one, once element `N + 1` is seen. Pre-allocation
/// follows the claim only up to [`PREALLOC_BYTES`] worth of elements; past that the vector
/// grows with the elements actually decoded, so a claim costs nothing beyond what the bytes
/// present decode into, and a list never holds more than `N` elements.
pub fn bounded_vec<'de, D, T, const N: usize>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    deserializer.deserialize_seq(BoundedVecVisitor::<T, N>(std::marker::PhantomData))
}

struct BoundedVecVisitor<T, const N: usize>(std::marker::PhantomData<T>);

impl<'de, T: serde::Deserialize<'de>, const N: usize> serde::de::Visitor<'de>
    for BoundedVecVisitor<T, N>
{
    type Value = Vec<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a sequence of at most {N} elements")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let claimed = seq.size_hint().unwrap_or(0);
        if claimed > N {
            return Err(serde::de::Error::invalid_length(claimed, &self));
        }
        let mut out = Vec::with_capacity(claimed.min(PREALLOC_BYTES / size_of::<T>().max(1)));
        while let Some(element) = seq.next_element()? {
            if out.len() == N {
                return Err(serde::de::Error::invalid_length(N + 1, &self));
            }
            out.push(element);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Three {
        #[serde(deserialize_with = "super::bounded_vec::<_, _, 3>")]
        v: Vec<u8>,
    }

    #[test]
    fn bounded_vec_takes_up_to_n_elements_and_refuses_more() {
        let cfg = bincode::config::standard();
        let ok = bincode::serde::encode_to_vec((vec![1u8, 2, 3],), cfg).unwrap();
        let (three, _): (Three, usize) = bincode::serde::decode_from_slice(&ok, cfg).unwrap();
        assert_eq!(three.v, [1, 2, 3]);
        let long = bincode::serde::encode_to_vec((vec![1u8, 2, 3, 4],), cfg).unwrap();
        assert!(bincode::serde::decode_from_slice::<Three, _>(&long, cfg).is_err());
        // A claim far beyond what follows is refused before anything is allocated.
        let claim = [253u8, 0, 0, 0, 0, 0, 0, 0, 1];
        assert!(bincode::serde::decode_from_slice::<Three, _>(&claim, cfg).is_err());
    }
}
