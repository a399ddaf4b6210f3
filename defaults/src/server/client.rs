//! A small blocking Redis-protocol client for the CLI and the demo (RESP2, decoded by the
//! `redis-protocol` crate).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::BytesMut;
use redis_protocol::resp2::types::{BytesFrame, Resp2Frame};

/// What a command answered.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    /// A simple or bulk string.
    Text(String),
    /// An integer.
    Int(i64),
    /// No value.
    Nil,
    /// An array (maps arrive as flat arrays of pairs).
    Array(Vec<Value>),
}

impl Value {
    /// The text of a string, or the integer written out.
    pub(crate) fn as_text(&self) -> String {
        match self {
            Value::Text(t) => t.clone(),
            Value::Int(i) => i.to_string(),
            Value::Nil => "(nil)".into(),
            Value::Array(a) => a.iter().map(Value::as_text).collect::<Vec<_>>().join(" "),
        }
    }

    /// A flat array of pairs as `(key, value)`.
    pub(crate) fn pairs(&self) -> Vec<(String, Value)> {
        match self {
            Value::Array(a) => a
                .chunks_exact(2)
                .map(|p| (p[0].as_text(), p[1].clone()))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// As JSON (maps are not told apart from arrays; callers that know convert them).
    pub(crate) fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Text(t) => serde_json::Value::String(t.clone()),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::Nil => serde_json::Value::Null,
            Value::Array(a) => serde_json::Value::Array(a.iter().map(Value::to_json).collect()),
        }
    }
}

/// Why a command got no answer, or an error answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ClientError {
    /// The connection failed.
    #[error("{addr}: {source}")]
    Io {
        /// The server.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The server answered something that is not RESP2.
    #[error("{addr}: bad reply: {reason}")]
    Protocol {
        /// The server.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The server answered an error.
    #[error("{0}")]
    Server(String),
}

/// One connection.
#[derive(Debug)]
pub(crate) struct Client {
    addr: String,
    stream: TcpStream,
    buf: BytesMut,
}

impl Client {
    /// Connects to `addr` (`host:port`), authenticating with `password` if it is not empty.
    pub(crate) fn connect(addr: &str, password: &str) -> Result<Client, ClientError> {
        let io = |source| ClientError::Io {
            addr: addr.to_string(),
            source,
        };
        let stream = TcpStream::connect(addr).map_err(io)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io)?;
        let _ = stream.set_nodelay(true);
        let mut client = Client {
            addr: addr.to_string(),
            stream,
            buf: BytesMut::new(),
        };
        if !password.is_empty() {
            client.call(&["AUTH", password])?;
        }
        Ok(client)
    }

    /// Sends one command and waits for its reply; an error reply is [`ClientError::Server`].
    pub(crate) fn call(&mut self, args: &[&str]) -> Result<Value, ClientError> {
        let frame = BytesFrame::Array(
            args.iter()
                .map(|a| BytesFrame::BulkString(bytes::Bytes::copy_from_slice(a.as_bytes())))
                .collect(),
        );
        let mut out = BytesMut::new();
        redis_protocol::resp2::encode::extend_encode(&mut out, &frame, false).map_err(|e| {
            ClientError::Protocol {
                addr: self.addr.clone(),
                reason: e.to_string(),
            }
        })?;
        let io = |addr: &str, source| ClientError::Io {
            addr: addr.to_string(),
            source,
        };
        self.stream.write_all(&out).map_err(|e| io(&self.addr, e))?;
        loop {
            match redis_protocol::resp2::decode::decode_bytes_mut(&mut self.buf) {
                Ok(Some((frame, _, _))) => return convert(frame),
                Ok(None) => {}
                Err(e) => {
                    return Err(ClientError::Protocol {
                        addr: self.addr.clone(),
                        reason: e.to_string(),
                    });
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self
                .stream
                .read(&mut chunk)
                .map_err(|e| io(&self.addr, e))?;
            if n == 0 {
                return Err(io(
                    &self.addr,
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"),
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn convert(frame: BytesFrame) -> Result<Value, ClientError> {
    Ok(match frame {
        BytesFrame::Error(e) => return Err(ClientError::Server(e.to_string())),
        BytesFrame::Integer(i) => Value::Int(i),
        BytesFrame::Null => Value::Nil,
        BytesFrame::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|f| convert(f).unwrap_or_else(|e| Value::Text(e.to_string())))
                .collect(),
        ),
        other => Value::Text(other.as_str().map(str::to_string).unwrap_or_else(|| {
            String::from_utf8_lossy(other.as_bytes().unwrap_or_default()).into_owned()
        })),
    })
}
