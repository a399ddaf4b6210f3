//! The on-disk record format and the segment reader.
//!
//! A segment is a sequence of frames `[len: u32 LE][crc: u32 LE][payload: len bytes]`, where
//! `crc` is the CRC32C of the payload. A payload is
//!
//! ```text
//! flags u8          bit 0: tombstone, bit 1: has expiry; other bits must be zero
//! timestamp u64 LE  Version::timestamp (HLC, raw)
//! node u64 LE       Version::node
//! [expires u64 LE]  only with bit 1
//! key_len u32 LE, key bytes
//! [value_len u32 LE, value bytes]   only for values (bit 0 clear)
//! ```
//!
//! and must be consumed exactly. Everything read from a file goes through bounds-checked
//! decoding: a damaged file yields a typed error, never a panic and never a record whose
//! checksum did not match.

use bytes::Bytes;
use chorus_core::hlc::{NodeId, Timestamp, Version};
use chorus_core::record::{Payload, Record};

/// Bytes of a frame header: length and checksum.
pub(crate) const HEADER: usize = 8;

/// The largest payload accepted, on write and on read (keys and values together).
pub(crate) const MAX_PAYLOAD: usize = 256 << 20;

/// The smallest well-formed payload: flags, version, key length.
const MIN_PAYLOAD: usize = 1 + 8 + 8 + 4;

const TOMBSTONE: u8 = 1;
const EXPIRES: u8 = 2;

/// Appends the frame of `key` and `record` to `out`; `None` if it exceeds [`MAX_PAYLOAD`].
pub(crate) fn encode_frame(key: &[u8], record: &Record, out: &mut Vec<u8>) -> Option<()> {
    let value = match &record.payload {
        Payload::Value(value) => Some(value),
        Payload::Tombstone => None,
    };
    let len = MIN_PAYLOAD
        + key.len()
        + record.expires_at_ms.map_or(0, |_| 8)
        + value.map_or(0, |v| 4 + v.len());
    if len > MAX_PAYLOAD {
        return None;
    }
    let start = out.len();
    out.reserve(HEADER + len);
    out.extend_from_slice(&[0; HEADER]);
    let mut flags = 0;
    if value.is_none() {
        flags |= TOMBSTONE;
    }
    if record.expires_at_ms.is_some() {
        flags |= EXPIRES;
    }
    out.push(flags);
    out.extend_from_slice(&record.version.timestamp.as_u64().to_le_bytes());
    out.extend_from_slice(&record.version.node.0.to_le_bytes());
    if let Some(at) = record.expires_at_ms {
        out.extend_from_slice(&at.to_le_bytes());
    }
    // Both lengths are below MAX_PAYLOAD, so they fit in u32.
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    if let Some(value) = value {
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }
    let crc = crc32c::crc32c(&out[start + HEADER..]);
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len() - start, HEADER + len);
    Some(())
}

/// Why the bytes at an offset are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BadFrame {
    /// The frame (header or payload) runs past the end of the file.
    Incomplete,
    /// The length field is out of bounds.
    Length(u32),
    /// The checksum does not match the payload.
    Checksum,
    /// The checksum matched but the payload does not decode.
    Payload(&'static str),
}

impl std::fmt::Display for BadFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadFrame::Incomplete => f.write_str("frame runs past the end of the segment"),
            BadFrame::Length(len) => write!(f, "invalid frame length {len}"),
            BadFrame::Checksum => f.write_str("checksum mismatch"),
            BadFrame::Payload(why) => write!(f, "undecodable payload ({why})"),
        }
    }
}

/// Decodes the frame at `offset` of `data`: the key, the record and the offset after it.
pub(crate) fn decode_frame(data: &[u8], offset: usize) -> Result<(Bytes, Record, usize), BadFrame> {
    let rest = data.get(offset..).ok_or(BadFrame::Incomplete)?;
    let header: [u8; HEADER] = rest
        .get(..HEADER)
        .and_then(|h| h.try_into().ok())
        .ok_or(BadFrame::Incomplete)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let len_usize = len as usize;
    if !(MIN_PAYLOAD..=MAX_PAYLOAD).contains(&len_usize) {
        return Err(BadFrame::Length(len));
    }
    let payload = rest
        .get(HEADER..HEADER + len_usize)
        .ok_or(BadFrame::Incomplete)?;
    if crc32c::crc32c(payload) != crc {
        return Err(BadFrame::Checksum);
    }
    let (key, record) = decode_payload(payload).map_err(BadFrame::Payload)?;
    Ok((key, record, offset + HEADER + len_usize))
}

/// A bounds-checked little-endian reader.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("truncated field");
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        let b = self.take(8)?;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(b);
        Ok(u64::from_le_bytes(raw))
    }

    fn bytes(&mut self) -> Result<Bytes, &'static str> {
        let len = self.u32()? as usize;
        Ok(Bytes::copy_from_slice(self.take(len)?))
    }
}

fn decode_payload(payload: &[u8]) -> Result<(Bytes, Record), &'static str> {
    let mut r = Reader(payload);
    let flags = r.u8()?;
    if flags & !(TOMBSTONE | EXPIRES) != 0 {
        return Err("unknown flags");
    }
    let timestamp = Timestamp::from_u64(r.u64()?);
    let node = NodeId(r.u64()?);
    let expires_at_ms = if flags & EXPIRES != 0 {
        Some(r.u64()?)
    } else {
        None
    };
    let key = r.bytes()?;
    let payload = if flags & TOMBSTONE != 0 {
        Payload::Tombstone
    } else {
        Payload::Value(r.bytes()?)
    };
    if !r.0.is_empty() {
        return Err("trailing bytes");
    }
    Ok((
        key,
        Record {
            payload,
            version: Version::new(timestamp, node),
            expires_at_ms,
        },
    ))
}

/// How reading a segment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SegmentEnd {
    /// Every byte belonged to a valid frame.
    Clean,
    /// The bytes from `valid_len` on are a torn tail: an invalid frame with no valid frame at
    /// any later offset.
    Torn {
        /// Length of the valid prefix.
        valid_len: usize,
        /// What was wrong at `valid_len`.
        why: BadFrame,
    },
}

/// An invalid frame followed by valid ones (or any invalid frame where no torn tail may be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Damage {
    /// Offset of the first invalid frame.
    pub(crate) offset: usize,
    /// What was wrong with it.
    pub(crate) why: BadFrame,
}

/// Decodes every frame of a segment in order, passing each to `visit`.
///
/// An invalid frame is a torn tail when `allow_torn` holds and no valid frame starts at any
/// later offset (a write cut short by a crash leaves exactly that); otherwise it is [`Damage`]:
/// valid records after a bad one mean the file was damaged, and skipping the bad one would
/// silently lose a write.
pub(crate) fn read_segment(
    data: &[u8],
    allow_torn: bool,
    mut visit: impl FnMut(Bytes, Record),
) -> Result<SegmentEnd, Damage> {
    let mut offset = 0;
    while offset < data.len() {
        match decode_frame(data, offset) {
            Ok((key, record, next)) => {
                visit(key, record);
                offset = next;
            }
            Err(why) => {
                if allow_torn && !valid_frame_after(data, offset + 1) {
                    return Ok(SegmentEnd::Torn {
                        valid_len: offset,
                        why,
                    });
                }
                return Err(Damage { offset, why });
            }
        }
    }
    Ok(SegmentEnd::Clean)
}

/// Whether a valid frame starts at any offset from `from` on.
fn valid_frame_after(data: &[u8], from: usize) -> bool {
    (from..data.len().saturating_sub(HEADER + MIN_PAYLOAD - 1))
        .any(|offset| decode_frame(data, offset).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(ms: u64, node: u64) -> Version {
        Version::new(Timestamp::new(ms, 3), NodeId(node))
    }

    fn samples() -> Vec<(Bytes, Record)> {
        vec![
            (Bytes::from("k"), Record::value("v", version(1, 2))),
            (Bytes::from(""), Record::tombstone(version(5, 1))),
            (
                Bytes::from(vec![0xff; 40]),
                Record::value(vec![0u8; 300], version(9, 9)).with_expiry(77),
            ),
            (
                Bytes::from("dead"),
                Record::tombstone(version(7, 7)).with_expiry(3),
            ),
        ]
    }

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        for (key, record) in samples() {
            encode_frame(&key, &record, &mut buf).expect("small");
        }
        let mut seen = Vec::new();
        let end = read_segment(&buf, false, |k, r| seen.push((k, r))).expect("clean");
        assert_eq!(end, SegmentEnd::Clean);
        assert_eq!(seen, samples());
    }

    #[test]
    fn oversized_records_are_refused() {
        let big = Record::value(vec![0u8; MAX_PAYLOAD], version(1, 1));
        assert!(encode_frame(b"k", &big, &mut Vec::new()).is_none());
    }

    #[test]
    fn every_truncation_is_a_torn_tail_or_clean() {
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        for (key, record) in samples() {
            encode_frame(&key, &record, &mut buf).expect("small");
            ends.push(buf.len());
        }
        for cut in 0..=buf.len() {
            let mut seen = 0;
            let end = read_segment(&buf[..cut], true, |_, _| seen += 1).expect("torn, not damage");
            let complete = ends.iter().filter(|&&e| e <= cut).count();
            assert_eq!(seen, complete, "cut at {cut}");
            match end {
                SegmentEnd::Clean => assert!(cut == 0 || ends.contains(&cut), "cut at {cut}"),
                SegmentEnd::Torn { valid_len, .. } => {
                    assert_eq!(
                        valid_len,
                        if complete == 0 { 0 } else { ends[complete - 1] }
                    )
                }
            }
            // Where no torn tail is allowed, a cut inside a frame is damage.
            let strict = read_segment(&buf[..cut], false, |_, _| ());
            assert_eq!(
                strict.is_ok(),
                cut == 0 || ends.contains(&cut),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_bad_frame_before_valid_ones_is_damage() {
        let mut buf = Vec::new();
        for (key, record) in samples() {
            encode_frame(&key, &record, &mut buf).expect("small");
        }
        buf[HEADER + 3] ^= 0x10; // inside the first payload
        let err = read_segment(&buf, true, |_, _| ()).expect_err("damage");
        assert_eq!(
            err,
            Damage {
                offset: 0,
                why: BadFrame::Checksum
            }
        );
        // Zeroes (a pre-allocated or unwritten tail) are a torn tail, not records.
        let mut zeros = Vec::new();
        encode_frame(b"k", &Record::value("v", version(1, 1)), &mut zeros).expect("small");
        let valid = zeros.len();
        zeros.extend_from_slice(&[0; 64]);
        let end = read_segment(&zeros, true, |_, _| ()).expect("torn");
        assert!(matches!(end, SegmentEnd::Torn { valid_len, .. } if valid_len == valid));
    }
}
