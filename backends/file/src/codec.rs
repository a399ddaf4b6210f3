//! The on-disk format (log format version [`FORMAT_VERSION`]) and the segment reader.
//!
//! ```text
//! segment  = header batch*
//! header   = magic "CHORUSLG" (8 bytes), format version u32 LE, CRC32C of the previous 12
//!            bytes u32 LE                                                  (16 bytes)
//! batch    = magic u32 LE (0x4843_5442), body_len u32 LE, synced u64 LE, body CRC32C u32 LE,
//!            header CRC32C u32 LE, body                                    (24 + body_len)
//! body     = frame*
//! frame    = len u32 LE, payload (len bytes)
//! payload  = flags u8          bit 0: tombstone, bit 1: has expiry, bit 2: removal;
//!                              other bits zero, and a removal has no other bit
//!            timestamp u64 LE  Version::timestamp (HLC, raw)
//!            node u64 LE       Version::node
//!            [expires u64 LE]  only with bit 1
//!            key_len u32 LE, key bytes
//!            [value_len u32 LE, value bytes]   only for values (bits 0 and 2 clear)
//! ```
//!
//! A **batch** is what the writer thread writes with one `write`: the records of a group
//! commit, each as one frame, or an empty body (a *commit marker*, written by a clean close).
//! The batch header CRC covers the segment's id and the batch's offset in it besides the
//! header's first 20 bytes, so a batch header copied to another place (inside a value, or from
//! another segment) never validates there. `synced` is the length of the segment's prefix
//! that was known durable (fsynced) when the batch was written: a later batch whose `synced`
//! reaches past a damaged one proves the damaged one was synced, so its damage cannot be a
//! write torn by a crash.
//!
//! A **removal** frame records a purge or a `remove_if_version`: the key's record, if not
//! newer than the version, is gone.
//!
//! Everything read from a file goes through bounds-checked decoding with limits
//! ([`MAX_PAYLOAD`], [`MAX_BODY`]): a damaged file yields a typed error, never a panic, an
//! allocation larger than the file, or a record whose checksum did not match.

use bytes::Bytes;
use chorus_core::hlc::{Timestamp, Version};
use chorus_core::identity::NodeId;
use chorus_core::record::{Payload, Record};

/// The log format this build writes and the only one it reads.
pub(crate) const FORMAT_VERSION: u32 = 1;

/// The first bytes of every segment.
const SEGMENT_MAGIC: [u8; 8] = *b"CHORUSLG";

/// Bytes of a segment header.
pub(crate) const SEGMENT_HEADER: usize = 16;

/// The first bytes of every batch header.
const BATCH_MAGIC: u32 = 0x4843_5442;

/// Bytes of a batch header.
pub(crate) const BATCH_HEADER: usize = 24;

/// Bytes of a frame's length field.
pub(crate) const FRAME_HEADER: usize = 4;

/// The largest payload accepted, on write and on read (keys and values together).
pub(crate) const MAX_PAYLOAD: usize = 256 << 20;

/// A batch body grows past this only to hold a single larger frame.
pub(crate) const MAX_BATCH_BODY: usize = 4 << 20;

/// The largest batch body accepted on read.
pub(crate) const MAX_BODY: usize = MAX_PAYLOAD + FRAME_HEADER;

/// The smallest well-formed payload: flags, version, key length.
const MIN_PAYLOAD: usize = 1 + 8 + 8 + 4;

const TOMBSTONE: u8 = 1;
const EXPIRES: u8 = 2;
const REMOVAL: u8 = 4;

/// The segment header of this build's format.
pub(crate) fn segment_header() -> [u8; SEGMENT_HEADER] {
    let mut header = [0u8; SEGMENT_HEADER];
    header[..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&header[..12]);
    header[12..].copy_from_slice(&crc.to_le_bytes());
    header
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn u64_at(data: &[u8], at: usize) -> Option<u64> {
    let bytes = data.get(at..at.checked_add(8)?)?;
    let mut raw = [0u8; 8];
    raw.copy_from_slice(bytes);
    Some(u64::from_le_bytes(raw))
}

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
    out.reserve(FRAME_HEADER + len);
    // Both lengths are below MAX_PAYLOAD, so they fit in u32.
    out.extend_from_slice(&(len as u32).to_le_bytes());
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
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    if let Some(value) = value {
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }
    Some(())
}

/// Appends the removal frame of `key` at `version` (a purge of the record of `key`, if it is
/// not newer than `version`). Keys of stored records are always small enough.
pub(crate) fn encode_removal(key: &[u8], version: Version, out: &mut Vec<u8>) {
    let len = MIN_PAYLOAD + key.len();
    out.reserve(FRAME_HEADER + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.push(REMOVAL);
    out.extend_from_slice(&version.timestamp.as_u64().to_le_bytes());
    out.extend_from_slice(&version.node.0.to_le_bytes());
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
}

/// Frames grouped into batches, ready to be written at the end of a segment.
///
/// Frames are appended as they come; [`BatchBuf::finish`] fills in the headers once the
/// segment, the offset the bytes will be written at and the synced length are known.
#[derive(Debug, Default)]
pub(crate) struct BatchBuf {
    buf: Vec<u8>,
    /// Where each batch header starts in `buf`.
    headers: Vec<usize>,
}

impl BatchBuf {
    /// Whether nothing was added since the last [`BatchBuf::clear`].
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes added so far, headers included.
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    fn open_batch(&mut self) {
        self.headers.push(self.buf.len());
        self.buf.extend_from_slice(&[0; BATCH_HEADER]);
    }

    /// Appends one frame (from [`encode_frame`] or [`encode_removal`], or several
    /// concatenated: they stay in one batch), in a new batch if the current one is full.
    pub(crate) fn push_frames(&mut self, frames: &[u8]) {
        let body = self
            .headers
            .last()
            .map(|&at| self.buf.len() - at - BATCH_HEADER);
        match body {
            Some(body) if body == 0 || body + frames.len() <= MAX_BATCH_BODY => {}
            _ => self.open_batch(),
        }
        self.buf.extend_from_slice(frames);
    }

    /// Appends an empty batch: a commit marker.
    pub(crate) fn push_marker(&mut self) {
        self.open_batch();
    }

    /// Fills in every header for bytes written at `offset` of segment `segment_id`, whose
    /// first `synced` bytes are durable; returns the bytes to write.
    pub(crate) fn finish(&mut self, segment_id: u64, offset: u64, synced: u64) -> &[u8] {
        for (i, &at) in self.headers.iter().enumerate() {
            let end = self.headers.get(i + 1).copied().unwrap_or(self.buf.len());
            let body_len = end - at - BATCH_HEADER;
            let body_crc = crc32c::crc32c(&self.buf[at + BATCH_HEADER..end]);
            let header = &mut self.buf[at..at + BATCH_HEADER];
            header[..4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
            // A body is at most MAX_BODY bytes, which fits in u32.
            header[4..8].copy_from_slice(&(body_len as u32).to_le_bytes());
            header[8..16].copy_from_slice(&synced.to_le_bytes());
            header[16..20].copy_from_slice(&body_crc.to_le_bytes());
            let crc = header_crc(segment_id, offset + at as u64, &header[..20]);
            header[20..24].copy_from_slice(&crc.to_le_bytes());
        }
        &self.buf
    }

    /// Forgets everything added.
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.headers.clear();
    }
}

/// The CRC of a batch header placed at `offset` of segment `segment_id`.
fn header_crc(segment_id: u64, offset: u64, first: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&segment_id.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, &offset.to_le_bytes());
    crc32c::crc32c_append(crc, first)
}

/// What one frame holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Logged {
    /// A record applied under this key.
    Record(Bytes, Record),
    /// A purge removed the key's record if it was not newer than this version.
    Removal(Bytes, Version),
}

/// Why the bytes at an offset are not a valid batch (or segment header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BadBatch {
    /// The segment header is missing, or not one of this format.
    SegmentHeader,
    /// The batch (header or body) runs past the end of the file.
    Incomplete,
    /// The batch header is not one: wrong magic or checksum.
    Header,
    /// The body length field is out of bounds.
    Length(u32),
    /// The body checksum does not match.
    Checksum,
    /// The checksums matched but a frame does not decode.
    Payload(&'static str),
}

impl std::fmt::Display for BadBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadBatch::SegmentHeader => f.write_str("invalid segment header"),
            BadBatch::Incomplete => f.write_str("batch runs past the end of the segment"),
            BadBatch::Header => f.write_str("invalid batch header"),
            BadBatch::Length(len) => write!(f, "invalid batch length {len}"),
            BadBatch::Checksum => f.write_str("batch checksum mismatch"),
            BadBatch::Payload(why) => write!(f, "undecodable frame ({why})"),
        }
    }
}

/// A batch header that validated at its offset.
#[derive(Debug, Clone, Copy)]
struct Header {
    body_len: usize,
    synced: u64,
    body_crc: u32,
}

/// The batch header at `offset`, if one validates there.
fn decode_header(data: &[u8], segment_id: u64, offset: usize) -> Result<Header, BadBatch> {
    let raw = data
        .get(offset..offset + BATCH_HEADER)
        .ok_or(BadBatch::Incomplete)?;
    let field = |at| u32_at(raw, at).ok_or(BadBatch::Incomplete);
    if field(0)? != BATCH_MAGIC || field(20)? != header_crc(segment_id, offset as u64, &raw[..20]) {
        return Err(BadBatch::Header);
    }
    let len = field(4)?;
    if len as usize > MAX_BODY {
        return Err(BadBatch::Length(len));
    }
    Ok(Header {
        body_len: len as usize,
        synced: u64_at(raw, 8).ok_or(BadBatch::Incomplete)?,
        body_crc: field(16)?,
    })
}

/// Decodes the batch at `offset`: its frames and the offset after it.
fn decode_batch(
    data: &[u8],
    segment_id: u64,
    offset: usize,
) -> Result<(Vec<Logged>, usize), BadBatch> {
    let header = decode_header(data, segment_id, offset)?;
    let start = offset + BATCH_HEADER;
    let body = data
        .get(start..start + header.body_len)
        .ok_or(BadBatch::Incomplete)?;
    if crc32c::crc32c(body) != header.body_crc {
        return Err(BadBatch::Checksum);
    }
    let mut frames = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let len = u32_at(body, at).ok_or(BadBatch::Payload("truncated frame length"))? as usize;
        if !(MIN_PAYLOAD..=MAX_PAYLOAD).contains(&len) {
            return Err(BadBatch::Payload("frame length out of bounds"));
        }
        let payload = body
            .get(at + FRAME_HEADER..at + FRAME_HEADER + len)
            .ok_or(BadBatch::Payload("frame runs past its batch"))?;
        frames.push(decode_payload(payload).map_err(BadBatch::Payload)?);
        at += FRAME_HEADER + len;
    }
    Ok((frames, start + header.body_len))
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

fn decode_payload(payload: &[u8]) -> Result<Logged, &'static str> {
    let mut r = Reader(payload);
    let flags = r.u8()?;
    if flags & !(TOMBSTONE | EXPIRES | REMOVAL) != 0 {
        return Err("unknown flags");
    }
    if flags & REMOVAL != 0 && flags != REMOVAL {
        return Err("a removal with other flags");
    }
    let timestamp = Timestamp::from_u64(r.u64()?);
    let version = Version::new(timestamp, NodeId(r.u64()?));
    let expires_at_ms = if flags & EXPIRES != 0 {
        Some(r.u64()?)
    } else {
        None
    };
    let key = r.bytes()?;
    let logged = if flags & REMOVAL != 0 {
        Logged::Removal(key, version)
    } else {
        let payload = if flags & TOMBSTONE != 0 {
            Payload::Tombstone
        } else {
            Payload::Value(r.bytes()?)
        };
        Logged::Record(
            key,
            Record {
                payload,
                version,
                expires_at_ms,
            },
        )
    };
    if !r.0.is_empty() {
        return Err("trailing bytes");
    }
    Ok(logged)
}

/// How reading a segment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SegmentEnd {
    /// Every byte belonged to a valid batch.
    Clean,
    /// The bytes from `valid_len` on are a torn tail: damage that no later, synced batch
    /// vouches for, at the end of the newest segment.
    Torn {
        /// Length of the valid prefix: the end of the last complete batch, or 0 if not even
        /// the segment header is complete.
        valid_len: usize,
        /// What was wrong at `valid_len`.
        why: BadBatch,
    },
}

/// Why a segment cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SegmentError {
    /// Damage where no torn tail may be: in an older segment, or before a batch that was
    /// written after the damaged bytes were synced.
    Damage {
        /// Offset of the first invalid batch.
        offset: usize,
        /// What was wrong with it.
        why: BadBatch,
    },
    /// A valid header of a log format this build does not read.
    Version(u32),
}

/// Decodes every batch of segment `segment_id` in order, passing each frame to `visit`.
///
/// An invalid batch ends a torn tail when `newest` holds (only the newest segment is written
/// to when a crash strikes) and no valid batch header after it says the bytes at the damage
/// were synced; otherwise it is [`SegmentError::Damage`]. A torn write can leave anything
/// after the last complete batch, but it cannot produce a batch written after the damaged
/// bytes were fsynced: such a batch proves the damage hit data that was durable. Frames are
/// passed to `visit` only once their whole batch validated.
pub(crate) fn read_segment(
    data: &[u8],
    segment_id: u64,
    newest: bool,
    mut visit: impl FnMut(Logged),
) -> Result<SegmentEnd, SegmentError> {
    if data.len() < SEGMENT_HEADER || data[..SEGMENT_HEADER].iter().all(|&b| b == 0) {
        // A segment created just before a crash: its header was never (completely) written.
        // With anything past the header it was written to, and damage is damage.
        let blank = data.iter().all(|&b| b == 0);
        if newest && (data.len() < SEGMENT_HEADER || blank) {
            return Ok(SegmentEnd::Torn {
                valid_len: 0,
                why: BadBatch::SegmentHeader,
            });
        }
        return Err(SegmentError::Damage {
            offset: 0,
            why: BadBatch::SegmentHeader,
        });
    }
    let header = &data[..SEGMENT_HEADER];
    let crc_ok = u32_at(header, 12) == Some(crc32c::crc32c(&header[..12]));
    if header[..8] != SEGMENT_MAGIC || !crc_ok {
        return Err(SegmentError::Damage {
            offset: 0,
            why: BadBatch::SegmentHeader,
        });
    }
    if let Some(version) = u32_at(header, 8)
        && version != FORMAT_VERSION
    {
        return Err(SegmentError::Version(version));
    }
    let mut offset = SEGMENT_HEADER;
    while offset < data.len() {
        match decode_batch(data, segment_id, offset) {
            Ok((frames, next)) => {
                frames.into_iter().for_each(&mut visit);
                offset = next;
            }
            Err(why) => {
                // A checksum that matched over a frame that does not decode was written so:
                // never a torn write.
                let undecodable = matches!(why, BadBatch::Payload(_));
                if newest && !undecodable && !synced_batch_after(data, segment_id, offset) {
                    return Ok(SegmentEnd::Torn {
                        valid_len: offset,
                        why,
                    });
                }
                return Err(SegmentError::Damage { offset, why });
            }
        }
    }
    Ok(SegmentEnd::Clean)
}

/// Whether a valid batch header after `damaged` says the bytes at `damaged` were synced.
///
/// Headers validate only at the offset and in the segment they were written for, so a value
/// that happens to contain header-shaped bytes is not mistaken for one.
fn synced_batch_after(data: &[u8], segment_id: u64, damaged: usize) -> bool {
    let magic = BATCH_MAGIC.to_le_bytes();
    let last = data.len().saturating_sub(BATCH_HEADER);
    (damaged + 1..=last)
        .filter(|&at| data[at..at + 4] == magic)
        .filter_map(|at| decode_header(data, segment_id, at).ok())
        .any(|header| header.synced > damaged as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(ms: u64, node: u64) -> Version {
        Version::new(Timestamp::new(ms, 3), NodeId(node))
    }

    fn samples() -> Vec<Logged> {
        vec![
            Logged::Record(Bytes::from("k"), Record::value("v", version(1, 2))),
            Logged::Record(Bytes::from(""), Record::tombstone(version(5, 1))),
            Logged::Record(
                Bytes::from(vec![0xff; 40]),
                Record::value(vec![0u8; 300], version(9, 9)).with_expiry(77),
            ),
            Logged::Removal(Bytes::from("gone"), version(8, 8)),
            Logged::Record(
                Bytes::from("dead"),
                Record::tombstone(version(7, 7)).with_expiry(3),
            ),
        ]
    }

    fn frame(logged: &Logged) -> Vec<u8> {
        let mut out = Vec::new();
        match logged {
            Logged::Record(key, record) => encode_frame(key, record, &mut out).expect("small"),
            Logged::Removal(key, version) => encode_removal(key, *version, &mut out),
        }
        out
    }

    /// A segment with one batch per sample, each synced before the next (as `always` writes
    /// them), ending in a commit marker; and the end offset of every batch.
    fn segment(id: u64) -> (Vec<u8>, Vec<usize>) {
        let mut data = segment_header().to_vec();
        let mut ends = Vec::new();
        let mut batches = BatchBuf::default();
        for logged in samples() {
            batches.push_frames(&frame(&logged));
            let synced = data.len() as u64;
            data.extend_from_slice(batches.finish(id, synced, synced));
            batches.clear();
            ends.push(data.len());
        }
        batches.push_marker();
        let synced = data.len() as u64;
        data.extend_from_slice(batches.finish(id, synced, synced));
        ends.push(data.len());
        (data, ends)
    }

    #[test]
    fn batches_round_trip_and_only_where_they_were_written() {
        let (data, _) = segment(7);
        let mut seen = Vec::new();
        let end = read_segment(&data, 7, false, |l| seen.push(l)).expect("clean");
        assert_eq!(end, SegmentEnd::Clean);
        assert_eq!(seen, samples());
        // The same bytes under another segment id do not validate.
        let err = read_segment(&data, 8, false, |_| ()).expect_err("foreign");
        assert_eq!(
            err,
            SegmentError::Damage {
                offset: SEGMENT_HEADER,
                why: BadBatch::Header
            }
        );
    }

    #[test]
    fn frames_share_a_batch_until_it_is_full() {
        let mut batches = BatchBuf::default();
        let small = frame(&samples()[0]);
        for _ in 0..3 {
            batches.push_frames(&small);
        }
        assert_eq!(batches.len(), BATCH_HEADER + 3 * small.len());
        let big = vec![0u8; MAX_BATCH_BODY];
        batches.push_frames(&big);
        assert_eq!(batches.headers.len(), 2, "a full batch starts another");
    }

    #[test]
    fn oversized_records_are_refused() {
        let big = Record::value(vec![0u8; MAX_PAYLOAD], version(1, 1));
        assert!(encode_frame(b"k", &big, &mut Vec::new()).is_none());
    }

    #[test]
    fn unknown_versions_and_foreign_files_are_refused() {
        let (mut data, _) = segment(1);
        data[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32c::crc32c(&data[..12]);
        data[12..16].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            read_segment(&data, 1, true, |_| ()),
            Err(SegmentError::Version(2))
        );
        let foreign = b"not a chorus segment at all".to_vec();
        assert!(matches!(
            read_segment(&foreign, 1, true, |_| ()),
            Err(SegmentError::Damage { offset: 0, .. })
        ));
    }

    #[test]
    fn every_truncation_is_a_torn_tail_or_clean() {
        let (data, ends) = segment(3);
        for cut in 0..=data.len() {
            let mut seen = 0;
            let end = read_segment(&data[..cut], 3, true, |_| seen += 1)
                .unwrap_or_else(|err| panic!("cut at {cut}: {err:?}"));
            // Record batches are all but the last (the marker).
            let complete = ends[..ends.len() - 1].iter().filter(|&&e| e <= cut).count();
            assert_eq!(seen, complete, "cut at {cut}");
            match end {
                SegmentEnd::Clean => assert!(cut == SEGMENT_HEADER || ends.contains(&cut)),
                SegmentEnd::Torn { valid_len, .. } => {
                    let expected = match ends.iter().rev().find(|&&e| e <= cut) {
                        Some(&e) => e,
                        None if cut >= SEGMENT_HEADER => SEGMENT_HEADER,
                        None => 0,
                    };
                    assert_eq!(valid_len, expected, "cut at {cut}");
                }
            }
            // Where no torn tail is allowed, a cut inside a batch is damage.
            let strict = read_segment(&data[..cut], 3, false, |_| ());
            assert_eq!(
                strict.is_ok(),
                cut == SEGMENT_HEADER || ends.contains(&cut),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn damage_before_a_synced_batch_is_corruption_even_in_the_last_record() {
        let (data, ends) = segment(5);
        // Inside the last record's body: the commit marker after it was written once the
        // record was synced.
        let mut bytes = data.clone();
        let last_record = ends[ends.len() - 3];
        bytes[last_record + BATCH_HEADER + 3] ^= 0x10;
        assert_eq!(
            read_segment(&bytes, 5, true, |_| ()),
            Err(SegmentError::Damage {
                offset: last_record,
                why: BadBatch::Checksum
            })
        );
        // In a batch header: found again by its successors.
        let mut bytes = data.clone();
        bytes[SEGMENT_HEADER + 5] ^= 0x01;
        assert!(matches!(
            read_segment(&bytes, 5, true, |_| ()),
            Err(SegmentError::Damage { offset, why: BadBatch::Header }) if offset == SEGMENT_HEADER
        ));
        // Zeroes (a pre-allocated or unwritten tail) are a torn tail, not records.
        let mut zeros = data[..ends[1]].to_vec();
        zeros.extend_from_slice(&[0; 64]);
        let end = read_segment(&zeros, 5, true, |_| ()).expect("torn");
        assert!(matches!(end, SegmentEnd::Torn { valid_len, .. } if valid_len == ends[1]));
    }

    #[test]
    fn batches_inside_values_do_not_confuse_recovery() {
        // A value holding a whole valid segment (a backup stored in the store), written
        // without a sync after it, then torn: still a torn tail.
        let (inner, _) = segment(9);
        let mut data = segment_header().to_vec();
        let mut batches = BatchBuf::default();
        let mut body = Vec::new();
        encode_frame(b"backup", &Record::value(inner, version(1, 1)), &mut body).expect("ok");
        batches.push_frames(&body);
        data.extend_from_slice(batches.finish(9, SEGMENT_HEADER as u64, SEGMENT_HEADER as u64));
        for cut in SEGMENT_HEADER + 1..data.len() {
            let end = read_segment(&data[..cut], 9, true, |_| ())
                .unwrap_or_else(|err| panic!("cut at {cut}: {err:?}"));
            assert_eq!(
                end,
                SegmentEnd::Torn {
                    valid_len: SEGMENT_HEADER,
                    why: BadBatch::Incomplete
                },
                "cut at {cut}"
            );
        }
    }
}
