//! Framing of the Redis protocol: splitting a connection's bytes into commands within the
//! configured limits, and encoding replies as RESP2 or RESP3. The frames themselves are
//! decoded and encoded by the `redis-protocol` crate; this module only guards it (a declared
//! length is checked before anything waits for or allocates that much) and maps replies.

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame as Frame2;
use redis_protocol::resp3::types::{BytesFrame as Frame3, FrameMap, VerbatimStringFormat};

/// Limits on one command.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Bytes of the whole command on the wire.
    pub(crate) max_request_bytes: usize,
    /// Bytes of one argument.
    pub(crate) max_bulk_bytes: usize,
    /// Arguments, the command's name included.
    pub(crate) max_args: usize,
}

/// Longest inline command (a line typed by hand, as Redis's `PROTO_INLINE_MAX_SIZE`).
const MAX_INLINE: usize = 64 * 1024;
/// Longest `*<n>` or `$<n>` header line.
const MAX_HEADER: usize = 32;

/// Why a connection's input was refused; the connection is answered with
/// `-ERR Protocol error: <reason>` and closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Protocol error: {0}")]
pub(crate) struct ProtocolError(pub(crate) String);

fn protocol(reason: impl Into<String>) -> ProtocolError {
    ProtocolError(reason.into())
}

/// Takes the next complete command off the front of `buf`: `Ok(None)` if more bytes are
/// needed, `Ok(Some(args))` (empty for a blank line or an empty array, which are skipped), or
/// an error for input that breaks the protocol or a limit.
pub(crate) fn next_command(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != b'*' {
        return inline(buf, limits);
    }
    let Some(len) = scan_array(buf, limits)? else {
        return Ok(None);
    };
    let mut frame = buf.split_to(len);
    let decoded = redis_protocol::resp2::decode::decode_bytes_mut(&mut frame)
        .map_err(|e| protocol(e.details().to_string()))?;
    match decoded {
        Some((Frame2::Array(items), _, _)) => items
            .into_iter()
            .map(|f| match f {
                Frame2::BulkString(b) => Ok(b),
                _ => Err(protocol("expected a bulk string")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some((Frame2::Null, _, _)) => Ok(Some(Vec::new())),
        // The scan found a complete array of bulk strings; the decoder agrees or refuses.
        _ => Err(protocol("malformed multibulk request")),
    }
}

/// Checks the headers of the array at the front of `buf` against the limits without
/// decoding it: the array's length on the wire once it is all there.
fn scan_array(buf: &[u8], limits: &Limits) -> Result<Option<usize>, ProtocolError> {
    let Some((count, mut pos)) = header(buf, 0, "multibulk count")? else {
        return Ok(None);
    };
    if count > limits.max_args as i64 {
        return Err(protocol(format!(
            "invalid multibulk length ({count} arguments; the limit is {})",
            limits.max_args
        )));
    }
    for _ in 0..count.max(0) {
        let Some(&kind) = buf.get(pos) else {
            return Ok(None);
        };
        if kind != b'$' {
            return Err(protocol(format!(
                "expected '$', got '{}'",
                kind.escape_ascii()
            )));
        }
        let Some((len, start)) = header(buf, pos, "bulk length")? else {
            return Ok(None);
        };
        if len < 0 || len > limits.max_bulk_bytes as i64 {
            return Err(protocol(format!(
                "invalid bulk length ({len} bytes; the limit is {})",
                limits.max_bulk_bytes
            )));
        }
        let end = start + len as usize + 2;
        if end > limits.max_request_bytes {
            return Err(protocol(format!(
                "request larger than {} bytes",
                limits.max_request_bytes
            )));
        }
        if buf.len() < end {
            return Ok(None);
        }
        if &buf[end - 2..end] != b"\r\n" {
            return Err(protocol("bulk string not terminated by CRLF"));
        }
        pos = end;
    }
    Ok(Some(pos))
}

/// Reads the `<type><integer>\r\n` header at `pos`: the integer and where the header ends.
fn header(buf: &[u8], pos: usize, what: &str) -> Result<Option<(i64, usize)>, ProtocolError> {
    let rest = &buf[pos + 1..];
    let window = &rest[..rest.len().min(MAX_HEADER)];
    let Some(nl) = window.iter().position(|&b| b == b'\n') else {
        if rest.len() >= MAX_HEADER {
            return Err(protocol(format!("too big {what} string")));
        }
        return Ok(None);
    };
    let line = window[..nl].strip_suffix(b"\r").unwrap_or(&window[..nl]);
    let n = std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| protocol(format!("invalid {what}")))?;
    Ok(Some((n, pos + 1 + nl + 1)))
}

/// An inline command: one line of text, split at spaces (what `telnet` users type).
fn inline(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    let window = &buf[..buf.len().min(MAX_INLINE)];
    let Some(nl) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() >= MAX_INLINE {
            return Err(protocol("too big inline request"));
        }
        return Ok(None);
    };
    let line = buf.split_to(nl + 1).freeze();
    let text = line[..nl].strip_suffix(b"\r").unwrap_or(&line[..nl]);
    if text
        .iter()
        .any(|&b| b != b'\t' && (b.is_ascii_control() || !b.is_ascii()))
    {
        return Err(protocol("invalid inline request (not text)"));
    }
    let args: Vec<Bytes> = text
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|a| !a.is_empty())
        .map(|a| line.slice_ref(a))
        .collect();
    if args.len() > limits.max_args {
        return Err(protocol("too many arguments in inline request"));
    }
    Ok(Some(args))
}

/// The protocol a connection replies in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Proto {
    /// RESP2, the default.
    Resp2,
    /// RESP3, after `HELLO 3`.
    Resp3,
}

/// A reply, encoded as RESP2 or RESP3 by [`Reply::encode`].
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Reply {
    /// `+OK`.
    Ok,
    /// A simple string.
    Simple(String),
    /// An error; the text starts with its prefix (`ERR`, `NOAUTH`, `UNAVAILABLE`).
    Error(String),
    /// An integer.
    Int(i64),
    /// A bulk string.
    Bulk(Bytes),
    /// No value (`$-1` in RESP2, `_` in RESP3).
    Null,
    /// An array.
    Array(Vec<Reply>),
    /// A map (a flat array of pairs in RESP2).
    Map(Vec<(Reply, Reply)>),
    /// A floating-point number (a bulk string in RESP2).
    Double(f64),
    /// Text to show as is (`INFO`; a bulk string in RESP2).
    Verbatim(String),
}

impl Reply {
    /// An error with `prefix` and `message` (line breaks replaced).
    pub(crate) fn error(prefix: &str, message: impl AsRef<str>) -> Reply {
        let message = message.as_ref().replace(['\r', '\n'], " ");
        Reply::Error(format!("{prefix} {message}"))
    }

    /// `-ERR <message>`.
    pub(crate) fn err(message: impl AsRef<str>) -> Reply {
        Reply::error("ERR", message)
    }

    /// A bulk string of text.
    pub(crate) fn text(s: impl Into<String>) -> Reply {
        Reply::Bulk(Bytes::from(s.into()))
    }

    /// A map with text keys.
    pub(crate) fn map<K: Into<String>>(pairs: impl IntoIterator<Item = (K, Reply)>) -> Reply {
        Reply::Map(
            pairs
                .into_iter()
                .map(|(k, v)| (Reply::text(k), v))
                .collect(),
        )
    }

    /// Appends the encoded reply to `out`.
    pub(crate) fn encode(&self, proto: Proto, out: &mut BytesMut) {
        // Replies are built here from well-formed parts; encoding them cannot fail.
        let _ = match proto {
            Proto::Resp2 => {
                redis_protocol::resp2::encode::extend_encode(out, &self.to_resp2(), false)
            }
            Proto::Resp3 => {
                redis_protocol::resp3::encode::complete::extend_encode(out, &self.to_resp3(), false)
            }
        };
    }

    fn to_resp2(&self) -> Frame2 {
        match self {
            Reply::Ok => Frame2::SimpleString(Bytes::from_static(b"OK")),
            Reply::Simple(s) => Frame2::SimpleString(Bytes::from(s.clone())),
            Reply::Error(e) => Frame2::Error(e.clone().into()),
            Reply::Int(i) => Frame2::Integer(*i),
            Reply::Bulk(b) => Frame2::BulkString(b.clone()),
            Reply::Null => Frame2::Null,
            Reply::Array(items) => Frame2::Array(items.iter().map(Reply::to_resp2).collect()),
            Reply::Map(pairs) => Frame2::Array(
                pairs
                    .iter()
                    .flat_map(|(k, v)| [k.to_resp2(), v.to_resp2()])
                    .collect(),
            ),
            Reply::Double(d) => Frame2::BulkString(Bytes::from(d.to_string())),
            Reply::Verbatim(s) => Frame2::BulkString(Bytes::from(s.clone())),
        }
    }

    fn to_resp3(&self) -> Frame3 {
        match self {
            Reply::Ok => Frame3::SimpleString {
                data: Bytes::from_static(b"OK"),
                attributes: None,
            },
            Reply::Simple(s) => Frame3::SimpleString {
                data: Bytes::from(s.clone()),
                attributes: None,
            },
            Reply::Error(e) => Frame3::SimpleError {
                data: e.clone().into(),
                attributes: None,
            },
            Reply::Int(i) => Frame3::Number {
                data: *i,
                attributes: None,
            },
            Reply::Bulk(b) => Frame3::BlobString {
                data: b.clone(),
                attributes: None,
            },
            Reply::Null => Frame3::Null,
            Reply::Array(items) => Frame3::Array {
                data: items.iter().map(Reply::to_resp3).collect(),
                attributes: None,
            },
            Reply::Map(pairs) => {
                let mut map = FrameMap::with_capacity(pairs.len());
                for (k, v) in pairs {
                    map.insert(k.to_resp3(), v.to_resp3());
                }
                Frame3::Map {
                    data: map,
                    attributes: None,
                }
            }
            Reply::Double(d) => Frame3::Double {
                data: *d,
                attributes: None,
            },
            Reply::Verbatim(s) => Frame3::VerbatimString {
                data: Bytes::from(s.clone()),
                format: VerbatimStringFormat::Text,
                attributes: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_request_bytes: 1024,
        max_bulk_bytes: 100,
        max_args: 8,
    };

    fn take(input: &[u8]) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        next_command(&mut BytesMut::from(input), &LIMITS)
    }

    #[test]
    fn complete_commands_are_taken_one_at_a_time() {
        let mut buf =
            BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n*1\r\n$2"[..]);
        assert_eq!(
            next_command(&mut buf, &LIMITS).unwrap(),
            Some(vec![Bytes::from("GET"), Bytes::from("k")])
        );
        assert_eq!(
            next_command(&mut buf, &LIMITS).unwrap(),
            Some(vec![Bytes::from("PING")])
        );
        assert_eq!(next_command(&mut buf, &LIMITS).unwrap(), None);
        assert_eq!(&buf[..], b"*1\r\n$2");
    }

    #[test]
    fn declared_lengths_beyond_the_limits_are_refused_before_waiting() {
        assert!(
            take(b"*1\r\n$1099511627776\r\n")
                .unwrap_err()
                .0
                .contains("bulk length")
        );
        assert!(
            take(b"*1000000\r\n")
                .unwrap_err()
                .0
                .contains("multibulk length")
        );
        assert!(take(b"*1\r\n$-5\r\n").is_err());
        assert!(
            take(b"*1\r\n:5\r\n")
                .unwrap_err()
                .0
                .contains("expected '$'")
        );
        assert!(take(b"*1\r\n$3\r\nabcde\r\n").is_err());
        assert!(take(b"*x\r\n").is_err());
        assert!(take(&[b'*'; 100]).is_err());
        let big = format!("*2\r\n$100\r\n{}\r\n$100\r\n", "a".repeat(100));
        assert_eq!(take(big.as_bytes()).unwrap(), None, "waits for the rest");
    }

    #[test]
    fn inline_commands_are_split_at_spaces_and_garbage_is_refused() {
        assert_eq!(
            take(b"SET  k v\r\n").unwrap(),
            Some(vec![Bytes::from("SET"), Bytes::from("k"), Bytes::from("v")])
        );
        assert_eq!(take(b"\r\n").unwrap(), Some(vec![]));
        assert!(take(b"\x00\xff\xfe garbage\n").is_err());
        assert_eq!(take(b"PIN").unwrap(), None);
    }

    #[test]
    fn replies_take_each_protocol_s_shape() {
        let mut out = BytesMut::new();
        Reply::Null.encode(Proto::Resp2, &mut out);
        Reply::Null.encode(Proto::Resp3, &mut out);
        Reply::map([("a", Reply::Int(1))]).encode(Proto::Resp2, &mut out);
        Reply::map([("a", Reply::Int(1))]).encode(Proto::Resp3, &mut out);
        Reply::err("no").encode(Proto::Resp2, &mut out);
        assert_eq!(
            &out[..],
            &b"$-1\r\n_\r\n*2\r\n$1\r\na\r\n:1\r\n%1\r\n$1\r\na\r\n:1\r\n-ERR no\r\n"[..]
        );
    }
}
