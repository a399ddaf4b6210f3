//! The Redis reference: a primary and two replicas on loopback (the distribution's
//! `redis-server`), driven by a tiny RESP client with one connection per worker.
//!
//! A put is `SET key value` followed by `WAIT 1 <timeout>` in the same write (WAIT blocks the
//! client until the writes it made before reached that many replicas: Redis's closest
//! equivalent of a W = 2 write with N = 3); a WAIT reply below 1 counts as a failure. A get is
//! `GET key`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::load::Worker;
use crate::procs::{Children, free_port};

/// A running primary and two replicas.
#[derive(Debug)]
pub(crate) struct RedisCluster {
    pub(crate) primary_port: u16,
    children: Children,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts the three servers and waits (at most 20 s) until both replicas are online.
    pub(crate) async fn start() -> Result<RedisCluster, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let primary_port = free_port();
        let mut children = Children::default();
        for (i, replica_of) in [None, Some(primary_port), Some(primary_port)]
            .into_iter()
            .enumerate()
        {
            let port = if i == 0 { primary_port } else { free_port() };
            children.push(spawn_server(dir.path(), i, port, replica_of)?);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(info) = info_replication(primary_port).await
                && info.contains("connected_slaves:2")
                && info.matches("state=online").count() == 2
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the Redis replicas did not come online within 20 s (logs in {})",
                    dir.path().display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "redis: primary on 127.0.0.1:{primary_port}, two replicas online (pids {:?})",
            children.pids()
        );
        Ok(RedisCluster {
            primary_port,
            children,
            _dir: dir,
        })
    }

    /// PIDs of the child processes.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.children.pids()
    }

    /// `n` workers, one connection each.
    pub(crate) async fn workers(
        &self,
        n: usize,
        wait_timeout: Duration,
    ) -> Result<Vec<RedisWorker>, String> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(RedisWorker::connect(self.primary_port, wait_timeout).await?);
        }
        Ok(out)
    }
}

fn spawn_server(
    dir: &Path,
    index: usize,
    port: u16,
    replica_of: Option<u16>,
) -> Result<Child, String> {
    let sub = dir.join(format!("redis-{index}"));
    std::fs::create_dir_all(&sub).map_err(|e| format!("{}: {e}", sub.display()))?;
    let log = std::fs::File::create(sub.join("log")).map_err(|e| format!("log: {e}"))?;
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--daemonize", "no"])
        .args(["--protected-mode", "no"])
        .arg("--dir")
        .arg(&sub);
    if let Some(primary) = replica_of {
        cmd.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| format!("log: {e}"))?)
        .stderr(log)
        .spawn()
        .map_err(|e| {
            format!("cannot start redis-server ({e}); install it: apt-get install redis-server")
        })
}

async fn info_replication(port: u16) -> Result<String, String> {
    let mut conn = Resp::connect(port).await?;
    conn.send(&command(&[b"INFO", b"replication"])).await?;
    match conn.reply().await? {
        Reply::Bulk(Some(b)) => Ok(String::from_utf8_lossy(&b).into_owned()),
        other => Err(format!("INFO: unexpected reply {other:?}")),
    }
}

/// One RESP2 command as an array of bulk strings.
fn command(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for p in parts {
        out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[derive(Debug)]
enum Reply {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
}

/// A minimal RESP2 connection: writes whole commands, parses simple, error, integer and bulk
/// replies (all this benchmark receives) from its own buffer.
struct Resp {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
}

impl Resp {
    async fn connect(port: u16) -> Result<Resp, String> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect to redis on {port}: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("nodelay: {e}"))?;
        Ok(Resp {
            stream,
            buf: Vec::with_capacity(4096),
            start: 0,
        })
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| format!("write: {e}"))
    }

    async fn fill(&mut self) -> Result<(), String> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let len = self.buf.len();
        self.buf.resize(len + 4096, 0);
        let n = self
            .stream
            .read(&mut self.buf[len..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        self.buf.truncate(len + n);
        if n == 0 {
            return Err("redis closed the connection".into());
        }
        Ok(())
    }

    /// The next `\r\n`-terminated line from `from`, without the terminator.
    fn line_at(&self, from: usize) -> Option<(usize, usize)> {
        self.buf[from..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| (from, from + p))
    }

    /// Tries to parse one reply from the buffer.
    fn parse(&mut self) -> Result<Option<Reply>, String> {
        let Some((s, e)) = self.line_at(self.start) else {
            return Ok(None);
        };
        if e == s {
            return Err("empty RESP line".into());
        }
        let body = &self.buf[s + 1..e];
        let reply = match self.buf[s] {
            b'+' => Reply::Simple(body.to_vec()),
            b'-' => Reply::Error(body.to_vec()),
            b':' => Reply::Integer(parse_int(body)?),
            b'$' => {
                let len = parse_int(body)?;
                if len < 0 {
                    Reply::Bulk(None)
                } else {
                    let len = len as usize;
                    let data = e + 2;
                    if self.buf.len() < data + len + 2 {
                        return Ok(None);
                    }
                    let v = self.buf[data..data + len].to_vec();
                    self.start = data + len + 2;
                    return Ok(Some(Reply::Bulk(Some(v))));
                }
            }
            other => return Err(format!("unexpected RESP type byte {other:#x}")),
        };
        self.start = e + 2;
        Ok(Some(reply))
    }

    async fn reply(&mut self) -> Result<Reply, String> {
        loop {
            if let Some(r) = self.parse()? {
                return Ok(r);
            }
            self.fill().await?;
        }
    }
}

fn parse_int(b: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad RESP integer {:?}", String::from_utf8_lossy(b)))
}

/// One client connection of the benchmark.
pub(crate) struct RedisWorker {
    conn: Resp,
    port: u16,
    /// Set while a request is outstanding: if the caller dropped it (a timeout), its replies
    /// may still arrive, so the next request starts on a fresh connection.
    busy: bool,
    wait_timeout_ms: Vec<u8>,
    out: Vec<u8>,
}

impl RedisWorker {
    async fn connect(port: u16, wait_timeout: Duration) -> Result<RedisWorker, String> {
        Ok(RedisWorker {
            conn: Resp::connect(port).await?,
            port,
            busy: false,
            wait_timeout_ms: wait_timeout.as_millis().max(1).to_string().into_bytes(),
            out: Vec::with_capacity(256),
        })
    }

    async fn begin(&mut self) -> Result<(), String> {
        if self.busy {
            self.conn = Resp::connect(self.port).await?;
        }
        self.busy = true;
        Ok(())
    }
}

impl Worker for RedisWorker {
    async fn put(&mut self, key: &Bytes, value: &Bytes) -> Result<(), String> {
        self.begin().await?;
        self.out.clear();
        self.out.extend_from_slice(&command(&[b"SET", key, value]));
        self.out
            .extend_from_slice(&command(&[b"WAIT", b"1", &self.wait_timeout_ms]));
        let out = std::mem::take(&mut self.out);
        let sent = self.conn.send(&out).await;
        self.out = out;
        sent?;
        match self.conn.reply().await? {
            Reply::Simple(s) if s == b"OK" => {}
            other => return Err(format!("SET: {other:?}")),
        }
        let wait = self.conn.reply().await?;
        self.busy = false;
        match wait {
            Reply::Integer(n) if n >= 1 => Ok(()),
            Reply::Integer(n) => Err(format!("WAIT: only {n} replicas acknowledged")),
            other => Err(format!("WAIT: {other:?}")),
        }
    }

    async fn get(&mut self, key: &Bytes) -> Result<bool, String> {
        self.begin().await?;
        self.out.clear();
        self.out.extend_from_slice(&command(&[b"GET", key]));
        let out = std::mem::take(&mut self.out);
        let sent = self.conn.send(&out).await;
        self.out = out;
        sent?;
        let reply = self.conn.reply().await?;
        self.busy = false;
        match reply {
            Reply::Bulk(v) => Ok(v.is_some()),
            Reply::Error(e) => Err(format!("GET: {}", String::from_utf8_lossy(&e))),
            other => Err(format!("GET: {other:?}")),
        }
    }
}
