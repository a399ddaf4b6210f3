//! The wire format: length-prefixed frames with a versioned header and a bincode payload.
//!
//! ```text
//! offset  size  field
//! 0       4     length of everything after this field (header + payload), big-endian u32
//! 4       2     magic 0xC4 0x05
//! 6       1     wire version (WIRE_VERSION)
//! 7       1     frame kind: 0 one-way message, 1 request, 2 response
//! 8       8     correlation id, big-endian (0 for one-way messages)
//! 16      ...   payload: bincode 2.0.1, standard configuration, via serde
//! ```
//!
//! This module is the only place that knows bincode. Every decode is bounded: the length prefix
//! is checked against the caller's maximum before anything is buffered or allocated; the payload
//! decoder runs under a byte limit (the frame ceiling, as a backstop) and decodes every byte
//! string and string by borrowing from the input, so a length claimed inside the payload is
//! checked against the bytes actually present before anything is allocated; and a payload that
//! does not consume its frame exactly is rejected. Malformed input of any kind yields a
//! [`WireError`], never a panic.
//!
//! The wire knows framing only: it encodes and decodes any serde message type and names none.
//! Each protocol owns its message types ([`crate::membership::message`],
//! [`crate::replication::message`]), and [`crate::envelope::Envelope`] multiplexes them on one
//! connection, above the protocols.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// First two bytes after the length prefix.
pub const MAGIC: [u8; 2] = [0xC4, 0x05];
/// The wire version this build speaks.
pub const WIRE_VERSION: u8 = 3;
/// Size of the length prefix.
pub const PREFIX_LEN: usize = 4;
/// Size of the header after the length prefix.
pub const HEADER_LEN: usize = 12;
/// Default largest frame, prefix included.
pub const DEFAULT_MAX_FRAME_LEN: usize = 16 * 1024 * 1024;
/// Absolute ceiling on any frame, whatever a configuration says.
pub const MAX_FRAME_LEN_CEILING: usize = 256 * 1024 * 1024;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// A message that expects no reply.
    Message,
    /// A request; the reply carries the same correlation id.
    Request,
    /// A response to the request with the same correlation id.
    Response,
}

impl FrameKind {
    fn to_byte(self) -> u8 {
        match self {
            FrameKind::Message => 0,
            FrameKind::Request => 1,
            FrameKind::Response => 2,
        }
    }

    fn from_byte(b: u8) -> Result<Self, WireError> {
        match b {
            0 => Ok(FrameKind::Message),
            1 => Ok(FrameKind::Request),
            2 => Ok(FrameKind::Response),
            other => Err(WireError::UnknownKind(other)),
        }
    }
}

/// The fixed part of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    /// What the frame carries.
    pub kind: FrameKind,
    /// Matches responses to requests.
    pub correlation: u64,
}

impl Header {
    /// A one-way message header.
    pub const fn message() -> Self {
        Header {
            kind: FrameKind::Message,
            correlation: 0,
        }
    }

    /// A request header.
    pub const fn request(correlation: u64) -> Self {
        Header {
            kind: FrameKind::Request,
            correlation,
        }
    }

    /// A response header.
    pub const fn response(correlation: u64) -> Self {
        Header {
            kind: FrameKind::Response,
            correlation,
        }
    }
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Fewer bytes than the frame needs.
    #[error("truncated frame: need {needed} bytes, have {have}")]
    Truncated {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes present.
        have: usize,
    },
    /// The length prefix exceeds the maximum frame size.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Claimed or actual frame length, prefix included.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The length prefix is too small to hold a header.
    #[error("frame length {len} is shorter than the {HEADER_LEN}-byte header")]
    TooShort {
        /// Claimed length after the prefix.
        len: usize,
    },
    /// The magic bytes are wrong: not a Chorus frame.
    #[error("bad magic {0:02x?}: not a Chorus frame")]
    BadMagic([u8; 2]),
    /// The peer speaks a wire version this build does not.
    #[error("unsupported wire version {got} (this build speaks {WIRE_VERSION})")]
    UnsupportedVersion {
        /// The version in the frame.
        got: u8,
    },
    /// The frame kind byte is not known.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Bytes follow the frame the prefix describes.
    #[error("{extra} trailing bytes after the frame")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// The payload did not decode.
    #[error("malformed payload: {0}")]
    Payload(String),
    /// The payload could not be encoded.
    #[error("cannot encode payload: {0}")]
    Encode(String),
}

/// The bincode configuration of the payload. Changing it is a wire-version change.
///
/// The limit is a backstop; the real bound is that every byte string and string field decodes
/// through [`crate::codec::serde_bytes`] / [`crate::codec::serde_str`], which borrow from the input instead of allocating
/// a claimed length.
fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME_LEN_CEILING>,
> {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN_CEILING>()
}

/// Given at least the first [`PREFIX_LEN`] bytes of a stream, the length of the whole frame,
/// prefix included, after checking it against `max_frame_len`.
///
/// Returns `Ok(None)` when fewer than [`PREFIX_LEN`] bytes are available. Stream transports call
/// this before buffering a frame, so an oversized claim is refused without allocating.
pub fn frame_len(buf: &[u8], max_frame_len: usize) -> Result<Option<usize>, WireError> {
    let Some(prefix) = buf.first_chunk::<PREFIX_LEN>() else {
        return Ok(None);
    };
    let body = u32::from_be_bytes(*prefix) as usize;
    // Checked for 32-bit targets, where a u32 body plus the prefix can overflow usize.
    let total = body.saturating_add(PREFIX_LEN);
    let max = max_frame_len.min(MAX_FRAME_LEN_CEILING);
    if total > max {
        return Err(WireError::TooLarge { len: total, max });
    }
    if body < HEADER_LEN {
        return Err(WireError::TooShort { len: body });
    }
    Ok(Some(total))
}

/// Frames up to this long get their whole buffer at once, provided at least half of the
/// frame has arrived (or the frame is small); see [`FrameCutter`].
const PREALLOCATE_UP_TO: usize = 1024 * 1024;

/// Frames this short get their whole buffer at once whatever has arrived.
const SMALL_FRAME: usize = 16 * 1024;

/// Cuts whole frames out of a byte stream that arrives in chunks of any size, such as the
/// chunks a QUIC stream read yields.
///
/// Every length prefix goes through [`frame_len`], so a claim over the maximum is refused
/// before anything is buffered, and a frame's magic is checked as soon as its first
/// [`PREFIX_LEN`] + 2 bytes are in. A frame that lies within one chunk is handed out as a slice
/// of that chunk, without copying; only a frame split across chunks is copied together. Its
/// buffer is sized from the bytes that arrived, not from what the prefix claims: the whole
/// frame at once when at least half of it is in (or it is at most 16 KiB, and at most 1 MiB in
/// either case), so that a 64 KiB frame split over two packets does not land in a buffer that
/// doubled to 128 KiB; otherwise a buffer that grows with the bytes. A peer therefore makes the
/// cutter hold at most about twice what it actually sent, plus 16 KiB.
#[derive(Debug)]
pub struct FrameCutter {
    max_frame_len: usize,
    /// The start of a frame whose end has not arrived yet.
    pending: BytesMut,
}

impl FrameCutter {
    /// A cutter for frames of at most `max_frame_len` bytes, prefix included.
    pub fn new(max_frame_len: usize) -> Self {
        FrameCutter {
            max_frame_len,
            pending: BytesMut::new(),
        }
    }

    /// Takes the next `chunk` of the stream and appends every frame it completes to `frames`.
    ///
    /// An error means the stream is not a sequence of Chorus frames (an oversized or too
    /// short length prefix, or a bad magic); the frames appended before it are whole and valid,
    /// and the rest of the stream should not be read.
    pub fn push(&mut self, mut chunk: Bytes, frames: &mut Vec<Bytes>) -> Result<(), WireError> {
        if !self.pending.is_empty() {
            // Complete the frame begun in earlier chunks first.
            loop {
                let have = self.pending.len();
                let want = match self.check(&self.pending)? {
                    None => PREFIX_LEN,
                    Some(total) => total,
                };
                let take = (want - have).min(chunk.len());
                if want > PREFIX_LEN {
                    self.make_room(want, have + take);
                }
                self.pending.extend_from_slice(&chunk.split_to(take));
                if self.pending.len() < want {
                    // Check what just arrived (the magic, say) rather than at the next chunk.
                    self.check(&self.pending)?;
                    return Ok(());
                }
                if want == PREFIX_LEN {
                    continue; // the prefix is complete: learn the frame's length
                }
                let frame = self.pending.split().freeze();
                self.check(&frame)?;
                frames.push(frame);
                break;
            }
        }
        loop {
            match self.check(&chunk)? {
                Some(total) if chunk.len() >= total => frames.push(chunk.split_to(total)),
                claimed => {
                    if let Some(total) = claimed {
                        self.make_room(total, chunk.len());
                    }
                    self.pending.extend_from_slice(&chunk);
                    return Ok(());
                }
            }
        }
    }

    /// Gives the pending frame (of `total` bytes, `arrived` of which will be in after this
    /// chunk) its whole buffer when the rules in the type's documentation allow.
    fn make_room(&mut self, total: usize, arrived: usize) {
        let whole = total <= SMALL_FRAME || (total <= PREALLOCATE_UP_TO && arrived * 2 >= total);
        if whole && self.pending.capacity() < total {
            let mut room = BytesMut::with_capacity(total);
            room.extend_from_slice(&self.pending);
            self.pending = room;
        }
    }

    /// The frame length announced at the start of `buf`, after checking it and, if enough
    /// bytes are present, the magic.
    fn check(&self, buf: &[u8]) -> Result<Option<usize>, WireError> {
        let total = frame_len(buf, self.max_frame_len)?;
        if let Some(magic) = buf.get(PREFIX_LEN..PREFIX_LEN + MAGIC.len())
            && magic != MAGIC
        {
            return Err(WireError::BadMagic([magic[0], magic[1]]));
        }
        Ok(total)
    }

    /// Bytes of a frame that has begun but not ended: non-zero at the end of a stream means
    /// the stream stopped mid-frame.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

/// Encodes `payload` into a complete frame.
pub fn encode<M: Serialize>(
    header: Header,
    payload: &M,
    max_frame_len: usize,
) -> Result<Bytes, WireError> {
    // Room for the header and a typical small message without regrowing.
    let mut buf = BytesMut::with_capacity(256);
    buf.put_bytes(0, PREFIX_LEN); // patched below
    buf.put_slice(&MAGIC);
    buf.put_u8(WIRE_VERSION);
    buf.put_u8(header.kind.to_byte());
    buf.put_u64(header.correlation);
    bincode::serde::encode_into_writer(payload, FrameWriter(&mut buf), config())
        .map_err(|e| WireError::Encode(e.to_string()))?;
    let max = max_frame_len.min(MAX_FRAME_LEN_CEILING);
    if buf.len() > max {
        return Err(WireError::TooLarge {
            len: buf.len(),
            max,
        });
    }
    let body = u32::try_from(buf.len() - PREFIX_LEN).map_err(|_| WireError::TooLarge {
        len: buf.len(),
        max,
    })?;
    buf[..PREFIX_LEN].copy_from_slice(&body.to_be_bytes());
    Ok(buf.freeze())
}

/// Appends bincode's output straight to the frame buffer (cheaper than going through
/// `std::io::Write`).
struct FrameWriter<'a>(&'a mut BytesMut);

impl bincode::enc::write::Writer for FrameWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Decodes exactly one complete frame (prefix included) into its header and payload.
pub fn decode<M: DeserializeOwned>(
    frame: &[u8],
    max_frame_len: usize,
) -> Result<(Header, M), WireError> {
    let (header, payload) = split(frame, max_frame_len)?;
    // Borrowing decode: byte strings are validated against the remaining input before they
    // are copied, so a lying length inside the payload cannot trigger a large allocation.
    let (value, read): (M, usize) = bincode::serde::borrow_decode_from_slice(payload, config())
        .map_err(|e| WireError::Payload(e.to_string()))?;
    if read != payload.len() {
        return Err(WireError::TrailingBytes {
            extra: payload.len() - read,
        });
    }
    Ok((header, value))
}

/// Encodes `payload` alone, without prefix or header: the bytes a frame would carry after its
/// header. For messages nested in others (a signed message carries its body this way, so the
/// signature covers exactly the bytes that travel).
pub fn encode_payload<M: Serialize>(payload: &M, max_len: usize) -> Result<Bytes, WireError> {
    let mut buf = BytesMut::with_capacity(256);
    bincode::serde::encode_into_writer(payload, FrameWriter(&mut buf), config())
        .map_err(|e| WireError::Encode(e.to_string()))?;
    let max = max_len.min(MAX_FRAME_LEN_CEILING);
    if buf.len() > max {
        return Err(WireError::TooLarge {
            len: buf.len(),
            max,
        });
    }
    Ok(buf.freeze())
}

/// Decodes exactly one payload encoded by [`encode_payload`], refusing more than `max_len`
/// bytes and trailing bytes, with the same bounded decoding as [`decode`].
pub fn decode_payload<M: DeserializeOwned>(payload: &[u8], max_len: usize) -> Result<M, WireError> {
    let max = max_len.min(MAX_FRAME_LEN_CEILING);
    if payload.len() > max {
        return Err(WireError::TooLarge {
            len: payload.len(),
            max,
        });
    }
    let (value, read): (M, usize) = bincode::serde::borrow_decode_from_slice(payload, config())
        .map_err(|e| WireError::Payload(e.to_string()))?;
    if read != payload.len() {
        return Err(WireError::TrailingBytes {
            extra: payload.len() - read,
        });
    }
    Ok(value)
}

/// Validates the prefix and header of one complete frame and returns the header and payload.
pub fn split(frame: &[u8], max_frame_len: usize) -> Result<(Header, &[u8]), WireError> {
    let total = frame_len(frame, max_frame_len)?.ok_or(WireError::Truncated {
        needed: PREFIX_LEN,
        have: frame.len(),
    })?;
    if frame.len() < total {
        return Err(WireError::Truncated {
            needed: total,
            have: frame.len(),
        });
    }
    if frame.len() > total {
        return Err(WireError::TrailingBytes {
            extra: frame.len() - total,
        });
    }
    let magic = [frame[4], frame[5]];
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if frame[6] != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion { got: frame[6] });
    }
    let kind = FrameKind::from_byte(frame[7])?;
    let mut correlation = [0u8; 8];
    correlation.copy_from_slice(&frame[8..16]);
    let header = Header {
        kind,
        correlation: u64::from_be_bytes(correlation),
    };
    Ok((header, &frame[PREFIX_LEN + HEADER_LEN..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    const MAX: usize = 64 * 1024;

    /// A stand-in payload: the wire is generic over message types and names none of the
    /// protocols' own.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    enum TestMessage {
        Blob(#[serde(with = "crate::codec::serde_bytes")] Bytes),
        Text(#[serde(with = "crate::codec::serde_str")] String),
        Numbers(Vec<u32>),
    }

    fn blob(value_len: usize) -> TestMessage {
        TestMessage::Blob(Bytes::from(vec![7u8; value_len]))
    }

    fn arb_message() -> impl Strategy<Value = TestMessage> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64)
                .prop_map(|b| TestMessage::Blob(Bytes::from(b))),
            ".{0,40}".prop_map(TestMessage::Text),
            prop::collection::vec(any::<u32>(), 0..16).prop_map(TestMessage::Numbers),
        ]
    }

    #[test]
    fn put_round_trips() {
        let frame = encode(Header::request(9), &blob(100), MAX).expect("encode");
        assert_eq!(frame_len(&frame, MAX), Ok(Some(frame.len())));
        let (header, msg): (Header, TestMessage) = decode(&frame, MAX).expect("decode");
        assert_eq!(header, Header::request(9));
        assert_eq!(msg, blob(100));
    }

    #[test]
    fn header_errors_are_typed() {
        let frame = encode(Header::message(), &blob(10), MAX)
            .expect("encode")
            .to_vec();

        let mut bad = frame.clone();
        bad[4] = 0;
        assert!(matches!(
            decode::<TestMessage>(&bad, MAX),
            Err(WireError::BadMagic(_))
        ));

        let mut bad = frame.clone();
        bad[6] = WIRE_VERSION + 1;
        assert_eq!(
            decode::<TestMessage>(&bad, MAX).unwrap_err(),
            WireError::UnsupportedVersion {
                got: WIRE_VERSION + 1
            }
        );

        let mut bad = frame.clone();
        bad[7] = 9;
        assert_eq!(
            decode::<TestMessage>(&bad, MAX).unwrap_err(),
            WireError::UnknownKind(9)
        );

        let mut bad = frame.clone();
        bad.push(0);
        assert_eq!(
            decode::<TestMessage>(&bad, MAX).unwrap_err(),
            WireError::TrailingBytes { extra: 1 }
        );

        assert!(matches!(
            decode::<TestMessage>(&frame[..frame.len() - 1], MAX),
            Err(WireError::Truncated { .. })
        ));
        assert!(matches!(
            decode::<TestMessage>(&frame[..2], MAX),
            Err(WireError::Truncated { .. })
        ));
        assert_eq!(frame_len(&frame[..3], MAX), Ok(None));
    }

    #[test]
    fn oversized_prefix_is_refused_before_buffering() {
        let claim = (u32::MAX).to_be_bytes();
        assert!(matches!(
            frame_len(&claim, MAX),
            Err(WireError::TooLarge { .. })
        ));
        let claim = ((MAX - PREFIX_LEN + 1) as u32).to_be_bytes();
        assert_eq!(
            frame_len(&claim, MAX),
            Err(WireError::TooLarge {
                len: MAX + 1,
                max: MAX
            })
        );
        let claim = 3u32.to_be_bytes();
        assert_eq!(frame_len(&claim, MAX), Err(WireError::TooShort { len: 3 }));
    }

    #[test]
    fn oversized_payload_is_refused_on_encode() {
        assert!(matches!(
            encode(Header::message(), &blob(MAX), MAX),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn payload_with_inner_trailing_bytes_is_rejected() {
        // A valid payload followed by junk inside a correctly prefixed frame.
        let mut frame = encode(
            Header::message(),
            &TestMessage::Blob(Bytes::from_static(b"k")),
            MAX,
        )
        .expect("encode")
        .to_vec();
        frame.extend_from_slice(&[1, 2, 3]);
        let body = (frame.len() - PREFIX_LEN) as u32;
        frame[..4].copy_from_slice(&body.to_be_bytes());
        assert_eq!(
            decode::<TestMessage>(&frame, MAX).unwrap_err(),
            WireError::TrailingBytes { extra: 3 }
        );
    }

    #[test]
    fn lying_inner_length_does_not_decode() {
        // A Blob whose bytes claim 2^40 bytes in a tiny frame.
        let mut payload = vec![0u8]; // variant index of Blob
        payload.push(253); // bincode varint marker for u64
        payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let mut frame = vec![0u8; PREFIX_LEN + HEADER_LEN];
        frame[4..6].copy_from_slice(&MAGIC);
        frame[6] = WIRE_VERSION;
        frame.extend_from_slice(&payload);
        let body = (frame.len() - PREFIX_LEN) as u32;
        frame[..4].copy_from_slice(&body.to_be_bytes());
        assert!(matches!(
            decode::<TestMessage>(&frame, MAX),
            Err(WireError::Payload(_))
        ));
    }

    /// Frames of the given payload lengths, each a one-way message of seeded bytes.
    fn raw_frames(lens: &[usize]) -> Vec<Bytes> {
        raw_frames_up_to(lens, MAX)
    }

    fn raw_frames_up_to(lens: &[usize], max: usize) -> Vec<Bytes> {
        lens.iter()
            .enumerate()
            .map(|(i, &len)| {
                let payload: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
                let message = TestMessage::Blob(Bytes::from(payload));
                encode(Header::message(), &message, max).unwrap()
            })
            .collect()
    }

    /// Feeds `stream` to a cutter in chunks of the given sizes (cycled).
    fn cut(stream: &[u8], chunks: &[usize]) -> (Vec<Bytes>, Result<(), WireError>, usize) {
        let mut cutter = FrameCutter::new(MAX);
        let mut frames = Vec::new();
        let stream = Bytes::copy_from_slice(stream);
        let mut at = 0;
        for &size in chunks.iter().cycle() {
            if at >= stream.len() {
                break;
            }
            let end = (at + size.max(1)).min(stream.len());
            if let Err(e) = cutter.push(stream.slice(at..end), &mut frames) {
                return (frames, Err(e), cutter.pending_len());
            }
            at = end;
        }
        (frames, Ok(()), cutter.pending_len())
    }

    #[test]
    fn cutter_hands_out_frames_within_one_chunk_without_copying() {
        let frames = raw_frames(&[10, 0, 300]);
        let stream = Bytes::from(frames.concat());
        let mut cutter = FrameCutter::new(MAX);
        let mut out = Vec::new();
        cutter.push(stream.clone(), &mut out).unwrap();
        assert_eq!(out, frames);
        assert_eq!(out[1].as_ptr(), stream[frames[0].len()..].as_ptr());
        assert_eq!(cutter.pending_len(), 0);
    }

    #[test]
    fn cutter_sizes_a_split_frame_from_what_arrived_not_from_the_claim() {
        // A claim of almost 1 MiB with 100 bytes behind it reserves about what arrived.
        let big = raw_frames_up_to(&[1000 * 1000], 1 << 20)[0].clone();
        let mut cutter = FrameCutter::new(1 << 20);
        let mut out = Vec::new();
        cutter.push(big.slice(..100), &mut out).unwrap();
        assert!(
            cutter.pending.capacity() < 16 * 1024,
            "{}",
            cutter.pending.capacity()
        );
        // Once half is in, the frame gets its exact buffer and is not copied again.
        cutter.push(big.slice(100..600_000), &mut out).unwrap();
        assert_eq!(cutter.pending.capacity(), big.len());
        let at = cutter.pending.as_ptr();
        cutter.push(big.slice(600_000..), &mut out).unwrap();
        assert_eq!(out, vec![big.clone()]);
        assert_eq!(out[0].as_ptr(), at, "completed in place");
        // A 64 KiB frame split over two packets gets its exact buffer from the first.
        let frame = raw_frames_up_to(&[64 * 1024], 1 << 20)[0].clone();
        let mut cutter = FrameCutter::new(1 << 20);
        let mut out = Vec::new();
        cutter.push(frame.slice(..65_000), &mut out).unwrap();
        assert_eq!(cutter.pending.capacity(), frame.len());
    }

    #[test]
    fn cutter_refuses_oversized_prefixes_and_bad_magic_early() {
        // The prefix alone is refused: nothing of the claimed length is buffered.
        let mut cutter = FrameCutter::new(1024);
        let mut out = Vec::new();
        let claim = Bytes::copy_from_slice(&(1u32 << 30).to_be_bytes());
        assert!(matches!(
            cutter.push(claim, &mut out),
            Err(WireError::TooLarge { .. })
        ));
        // A bad magic is refused as soon as its bytes arrive, long before the frame's end,
        // whether they come one at a time or with the prefix.
        let mut frame = raw_frames(&[4000])[0].to_vec();
        frame[PREFIX_LEN] ^= 0xFF;
        for step in [1, 3, PREFIX_LEN + MAGIC.len()] {
            let mut cutter = FrameCutter::new(MAX);
            let mut out = Vec::new();
            let mut fed = 0;
            let result = loop {
                let end = (fed + step).min(frame.len());
                let pushed = cutter.push(Bytes::copy_from_slice(&frame[fed..end]), &mut out);
                fed = end;
                if pushed.is_err() || fed == frame.len() {
                    break pushed;
                }
            };
            assert!(matches!(result, Err(WireError::BadMagic(_))), "{result:?}");
            // The push that brought the magic's last byte is the one refused.
            let magic_end = PREFIX_LEN + MAGIC.len();
            assert_eq!(fed, magic_end.div_ceil(step) * step, "step {step}");
            assert!(out.is_empty());
        }
        let (_, _, pending) = cut(&frame[..PREFIX_LEN + 1], &[3]);
        assert_eq!(
            pending,
            PREFIX_LEN + 1,
            "a frame's start waits for more bytes"
        );
    }

    proptest! {
        #[test]
        fn every_message_round_trips(msg in arb_message(), correlation: u64, kind in 0u8..3) {
            let header = Header { kind: FrameKind::from_byte(kind).unwrap(), correlation };
            let frame = encode(header, &msg, MAX).unwrap();
            let (h, m): (Header, TestMessage) = decode(&frame, MAX).unwrap();
            prop_assert_eq!(h, header);
            prop_assert_eq!(m, msg);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = frame_len(&bytes, MAX);
            let _ = decode::<TestMessage>(&bytes, MAX);
        }

        // Random bytes behind a valid prefix and header exercise the payload decoder itself.
        #[test]
        fn arbitrary_payloads_never_panic(payload in prop::collection::vec(any::<u8>(), 0..256), correlation: u64) {
            let mut frame = vec![0u8; PREFIX_LEN + HEADER_LEN];
            frame[4..6].copy_from_slice(&MAGIC);
            frame[6] = WIRE_VERSION;
            frame[7] = 1;
            frame[8..16].copy_from_slice(&correlation.to_be_bytes());
            frame.extend_from_slice(&payload);
            let body = (frame.len() - PREFIX_LEN) as u32;
            frame[..4].copy_from_slice(&body.to_be_bytes());
            if let Ok((header, _)) = decode::<TestMessage>(&frame, MAX) {
                prop_assert_eq!(header.correlation, correlation);
            }
        }

        // However a stream of frames is chunked, the cutter yields exactly those frames.
        #[test]
        fn cutter_yields_the_frames_whatever_the_chunking(
            lens in prop::collection::vec(0usize..3000, 1..20),
            chunks in prop::collection::vec(1usize..5000, 1..8),
        ) {
            let frames = raw_frames(&lens);
            let (out, result, pending) = cut(&frames.concat(), &chunks);
            prop_assert!(result.is_ok(), "{:?}", result);
            prop_assert_eq!(pending, 0);
            prop_assert_eq!(out, frames);
        }

        // A stream cut short leaves exactly the unfinished frame pending.
        #[test]
        fn cutter_reports_a_stream_that_ends_mid_frame(
            lens in prop::collection::vec(0usize..3000, 1..10),
            cut_at: prop::sample::Index,
            chunks in prop::collection::vec(1usize..5000, 1..8),
        ) {
            let frames = raw_frames(&lens);
            let stream = frames.concat();
            let end = cut_at.index(stream.len());
            let (out, result, pending) = cut(&stream[..end], &chunks);
            prop_assert!(result.is_ok(), "{:?}", result);
            let whole: usize = out.iter().map(Bytes::len).sum();
            prop_assert_eq!(&out[..], &frames[..out.len()]);
            prop_assert_eq!(whole + pending, end);
            prop_assert!(pending < frames.get(out.len()).map_or(1, Bytes::len));
        }

        // Flipping any byte of a valid frame yields a typed error or a (different) valid message.
        #[test]
        fn corrupted_frames_never_panic(msg in arb_message(), at: prop::sample::Index, bit in 0u8..8) {
            let mut frame = encode(Header::request(1), &msg, MAX).unwrap().to_vec();
            let i = at.index(frame.len());
            frame[i] ^= 1 << bit;
            let _ = decode::<TestMessage>(&frame, MAX);
        }
    }
}
