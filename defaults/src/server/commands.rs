//! The Redis commands Chorus answers, with Redis's reply shapes and error prefixes, and the
//! `CHORUS.*` commands. Options that last-writer-wins replication cannot honour truthfully
//! (conditional sets, counters, transactions) are refused with a reason.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::metrics::Op;
use super::resp::{Proto, Reply};
use super::{Shared, state_name};
use crate::membership::MemberState;
use crate::{Consistency, ReadOptions, ReplicationError, Storage, WriteOptions};

/// What one connection remembers between commands.
#[derive(Debug)]
pub(crate) struct Session {
    /// `CLIENT ID`.
    pub(crate) id: u64,
    /// `CLIENT SETNAME`.
    pub(crate) name: Option<Bytes>,
    /// The reply protocol (`HELLO`).
    pub(crate) proto: Proto,
    /// Whether `AUTH` succeeded (or no password is configured).
    pub(crate) authenticated: bool,
    /// `CHORUS.CONSISTENCY read`; the node's default when unset.
    pub(crate) read: Option<Consistency>,
    /// `CHORUS.CONSISTENCY write`; the node's default when unset.
    pub(crate) write: Option<Consistency>,
    /// `QUIT` was sent: reply, then close.
    pub(crate) quit: bool,
    /// The peer's address.
    pub(crate) peer: String,
}

impl Session {
    pub(crate) fn new(id: u64, authenticated: bool, peer: String) -> Session {
        Session {
            id,
            name: None,
            proto: Proto::Resp2,
            authenticated,
            read: None,
            write: None,
            quit: false,
            peer,
        }
    }
}

/// Why a command is refused because of last-writer-wins.
const NO_RMW: &str =
    "Chorus replicates by last-writer-wins with no read-modify-write across replicas";

/// Every command, for `COMMAND`: name, arity (negative: at least), flags, first key, last
/// key, key step, group, summary.
pub(crate) const COMMANDS: &[CommandRow] = &[
    (
        "get",
        2,
        &["readonly", "fast"],
        1,
        1,
        1,
        "string",
        "Returns the value of a key.",
    ),
    (
        "set",
        -3,
        &["write", "denyoom"],
        1,
        1,
        1,
        "string",
        "Sets a key's value, optionally with EX or PX.",
    ),
    (
        "setex",
        4,
        &["write", "denyoom"],
        1,
        1,
        1,
        "string",
        "Sets a key's value and expiry in seconds.",
    ),
    (
        "psetex",
        4,
        &["write", "denyoom"],
        1,
        1,
        1,
        "string",
        "Sets a key's value and expiry in milliseconds.",
    ),
    (
        "del",
        -2,
        &["write"],
        1,
        -1,
        1,
        "keyspace",
        "Deletes keys; the count of those that were live when read first.",
    ),
    (
        "unlink",
        -2,
        &["write", "fast"],
        1,
        -1,
        1,
        "keyspace",
        "DEL.",
    ),
    (
        "exists",
        -2,
        &["readonly", "fast"],
        1,
        -1,
        1,
        "keyspace",
        "Counts the given keys that hold a live value.",
    ),
    (
        "mget",
        -2,
        &["readonly", "fast"],
        1,
        -1,
        1,
        "string",
        "Returns the values of keys.",
    ),
    (
        "mset",
        -3,
        &["write", "denyoom"],
        1,
        -1,
        2,
        "string",
        "Sets many keys.",
    ),
    (
        "ping",
        -1,
        &["fast"],
        0,
        0,
        0,
        "connection",
        "Answers PONG or its argument.",
    ),
    (
        "echo",
        2,
        &["fast"],
        0,
        0,
        0,
        "connection",
        "Returns its argument.",
    ),
    (
        "quit",
        -1,
        &["fast"],
        0,
        0,
        0,
        "connection",
        "Closes the connection.",
    ),
    (
        "hello",
        -1,
        &["fast", "no-auth"],
        0,
        0,
        0,
        "connection",
        "Picks the protocol, authenticates, names the connection.",
    ),
    (
        "auth",
        -2,
        &["fast", "no-auth"],
        0,
        0,
        0,
        "connection",
        "Authenticates the connection.",
    ),
    (
        "select",
        2,
        &["fast"],
        0,
        0,
        0,
        "connection",
        "Only database 0 exists.",
    ),
    (
        "client",
        -2,
        &["fast"],
        0,
        0,
        0,
        "connection",
        "CLIENT ID, SETNAME, GETNAME, SETINFO.",
    ),
    (
        "info",
        -1,
        &[],
        0,
        0,
        0,
        "server",
        "Server, clients, stats, cluster and keyspace sections.",
    ),
    (
        "command",
        -1,
        &[],
        0,
        0,
        0,
        "server",
        "COMMAND, COMMAND COUNT, COMMAND DOCS.",
    ),
    (
        "config",
        -2,
        &[],
        0,
        0,
        0,
        "server",
        "CONFIG GET answers nothing; settings live in the file.",
    ),
    (
        "dbsize",
        1,
        &["readonly", "fast"],
        0,
        0,
        0,
        "server",
        "Approximate number of keys.",
    ),
    (
        "chorus.consistency",
        -1,
        &["fast"],
        0,
        0,
        0,
        "chorus",
        "This connection's read and write consistency.",
    ),
    (
        "chorus.members",
        1,
        &[],
        0,
        0,
        0,
        "chorus",
        "Members as this node sees them.",
    ),
    (
        "chorus.ring",
        1,
        &[],
        0,
        0,
        0,
        "chorus",
        "Each owning member's share of the ring.",
    ),
    (
        "chorus.status",
        1,
        &[],
        0,
        0,
        0,
        "chorus",
        "This node, its counters and storage.",
    ),
];

/// One row of [`COMMANDS`].
pub(crate) type CommandRow = (
    &'static str,
    i64,
    &'static [&'static str],
    i64,
    i64,
    i64,
    &'static str,
    &'static str,
);

/// Commands Chorus knows but refuses, with the reason.
fn refused(name: &str) -> Option<String> {
    let why = match name {
        "incr" | "decr" | "incrby" | "decrby" | "incrbyfloat" | "append" | "setrange"
        | "getset" | "getdel" | "getex" | "setnx" | "msetnx" => format!(
            "{} is not supported: {NO_RMW}, so it could not be applied atomically",
            name.to_uppercase()
        ),
        "multi" | "exec" | "discard" | "watch" | "unwatch" => format!(
            "transactions ({}) are not supported: {NO_RMW} and no transactions",
            name.to_uppercase()
        ),
        _ => return None,
    };
    Some(why)
}

fn wrong_args(name: &str) -> Reply {
    Reply::err(format!("wrong number of arguments for '{name}' command"))
}

fn syntax() -> Reply {
    Reply::err("syntax error")
}

fn not_integer() -> Reply {
    Reply::err("value is not an integer or out of range")
}

fn lower(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_lowercase()
}

fn int(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// The reply for a failed replication, in words a person can read.
pub(crate) fn replication_error(e: &ReplicationError) -> Reply {
    match e {
        ReplicationError::Unavailable { required, alive } => Reply::error(
            "UNAVAILABLE",
            format!("{alive} of {required} required replicas reachable"),
        ),
        ReplicationError::Timeout {
            op,
            acks,
            required,
            after,
        } => {
            if *op == crate::replication::Operation::Write {
                Reply::error(
                    "TIMEOUT",
                    format!(
                        "{acks} of {required} required replicas acknowledged; the write may have been applied"
                    ),
                )
            } else {
                Reply::error(
                    "TIMEOUT",
                    format!("{acks} of {required} required replicas answered within {after:?}"),
                )
            }
        }
        ReplicationError::Invalid(i) => Reply::err(i.to_string()),
        ReplicationError::ShuttingDown => {
            Reply::error("SHUTDOWN", "the node is shutting down; nothing was sent")
        }
        ReplicationError::Failed {
            op,
            acks,
            required,
            refusals,
            unreachable,
        } => {
            let write = *op == crate::replication::Operation::Write;
            let first = refusals
                .first()
                .map(|(n, r)| format!(" (node {}: {r})", n.0))
                .unwrap_or_default();
            Reply::error(
                "FAILED",
                format!(
                    "{acks} of {required} required replicas {}, {unreachable} unreachable, {} refused{first}{}",
                    if write { "acknowledged" } else { "answered" },
                    refusals.len(),
                    if write {
                        "; the write may have been applied"
                    } else {
                        ""
                    },
                ),
            )
        }
        other => Reply::error("FAILED", other.to_string()),
    }
}

/// Runs one command.
pub(crate) async fn execute(shared: &Arc<Shared>, s: &mut Session, args: &[Bytes]) -> Reply {
    shared.metrics.commands.increment(1);
    shared
        .commands_seen
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let Some(first) = args.first() else {
        return Reply::err("empty command");
    };
    let name = lower(first);
    if !s.authenticated && !matches!(name.as_str(), "auth" | "hello" | "quit") {
        return Reply::error("NOAUTH", "Authentication required.");
    }
    let n = args.len();
    match name.as_str() {
        "get" if n == 2 => get(shared, s, &args[1]).await,
        "set" if n >= 3 => set(shared, s, args).await,
        "setex" | "psetex" if n == 4 => {
            let Some(t) = int(&args[2]).filter(|t| *t > 0) else {
                return Reply::err(format!("invalid expire time in '{name}' command"));
            };
            let ttl = if name == "setex" {
                Duration::from_secs(t as u64)
            } else {
                Duration::from_millis(t as u64)
            };
            put(shared, s, args[1].clone(), args[3].clone(), Some(ttl)).await
        }
        "del" | "unlink" if n >= 2 => del(shared, s, &args[1..]).await,
        "exists" if n >= 2 => exists(shared, s, &args[1..]).await,
        "mget" if n >= 2 => mget(shared, s, &args[1..]).await,
        "mset" if n >= 3 && n % 2 == 1 => mset(shared, s, &args[1..]).await,
        "mset" => wrong_args("mset"),
        "ping" if n == 1 => Reply::Simple("PONG".into()),
        "ping" if n == 2 => Reply::Bulk(args[1].clone()),
        "echo" if n == 2 => Reply::Bulk(args[1].clone()),
        "quit" => {
            s.quit = true;
            Reply::Ok
        }
        "hello" => hello(shared, s, &args[1..]),
        "auth" if n == 2 || n == 3 => auth(shared, s, &args[1..]),
        "select" if n == 2 => match int(&args[1]) {
            Some(0) => Reply::Ok,
            Some(_) => Reply::err("DB index is out of range"),
            None => not_integer(),
        },
        "client" if n >= 2 => client(s, &args[1..]),
        "info" => Reply::Verbatim(info(shared, s, &args[1..]).await),
        "command" => command(&args[1..]),
        "config" if n >= 2 => match lower(&args[1]).as_str() {
            "get" if n >= 3 => config_get(&args[2..]),
            "resetstat" => Reply::Ok,
            _ => Reply::err(
                "CONFIG SET is not supported: settings live in the configuration file (docs/OPERATIONS.md)",
            ),
        },
        "dbsize" if n == 1 => Reply::Int(dbsize(shared).await),
        "chorus.consistency" => consistency(shared, s, &args[1..]),
        "chorus.members" if n == 1 => members(shared),
        "chorus.ring" if n == 1 => ring(shared),
        "chorus.status" if n == 1 => status(shared).await,
        _ => {
            if let Some(why) = refused(&name) {
                return Reply::err(why);
            }
            if COMMANDS.iter().any(|c| c.0 == name) {
                return wrong_args(&name);
            }
            let mut message = format!(
                "unknown command '{}', with args beginning with: ",
                String::from_utf8_lossy(first)
            );
            for a in args[1..].iter().take(8) {
                let _ = write!(
                    message,
                    "'{}' ",
                    String::from_utf8_lossy(&a[..a.len().min(64)])
                );
            }
            Reply::err(message)
        }
    }
}

/// `CONFIG GET`: the few Redis parameters tools ask for (`redis-benchmark` reads `save` and
/// `appendonly`), with the values that describe Chorus; nothing else matches.
fn config_get(patterns: &[Bytes]) -> Reply {
    const PARAMS: &[(&str, &str)] = &[("save", ""), ("appendonly", "no"), ("databases", "1")];
    let mut out = Vec::new();
    for (name, value) in PARAMS {
        if patterns.iter().any(|p| {
            let p = lower(p);
            p == *name || p == "*"
        }) {
            out.push(Reply::text(*name));
            out.push(Reply::text(*value));
        }
    }
    Reply::Array(out)
}

/// What a run of pipelined commands can be handed to the batcher as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Batchable {
    /// `SET key value`, no options.
    Set,
    /// `GET key` at a level above One (reads at One are served locally, unbatched).
    Get,
}

/// Whether `args` is a command the batcher takes for this session.
pub(crate) fn batchable(shared: &Shared, s: &Session, args: &[Bytes]) -> Option<Batchable> {
    if !s.authenticated {
        return None;
    }
    let name = args.first()?;
    if args.len() == 3 && name.eq_ignore_ascii_case(b"set") {
        return Some(Batchable::Set);
    }
    if args.len() == 2 && name.eq_ignore_ascii_case(b"get") {
        let c = read_level(shared, s);
        if c != Consistency::One && c != Consistency::Count(std::num::NonZeroUsize::MIN) {
            return Some(Batchable::Get);
        }
    }
    None
}

/// Runs `run` (commands of one [`Batchable`] kind, in order) through the batcher: all are
/// submitted before any is awaited; the replies in order.
pub(crate) async fn execute_batch(
    shared: &Shared,
    s: &Session,
    kind: Batchable,
    run: &[Vec<Bytes>],
) -> Vec<Reply> {
    shared.metrics.commands.increment(run.len() as u64);
    shared
        .commands_seen
        .fetch_add(run.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let start = Instant::now();
    let mut replies = Vec::with_capacity(run.len());
    match kind {
        Batchable::Set => {
            let c = write_level(shared, s);
            let pending: Vec<_> = run
                .iter()
                .map(|a| shared.batcher.put(a[1].clone(), a[2].clone(), c))
                .collect();
            for rx in pending {
                let r = rx.await.unwrap_or(Err(ReplicationError::ShuttingDown));
                shared
                    .metrics
                    .request(Op::Set, c, r.as_ref().err(), start.elapsed());
                replies.push(match r {
                    Ok(()) => Reply::Ok,
                    Err(e) => replication_error(&e),
                });
            }
        }
        Batchable::Get => {
            let c = read_level(shared, s);
            let pending: Vec<_> = run
                .iter()
                .map(|a| shared.batcher.get(a[1].clone(), c))
                .collect();
            for rx in pending {
                let r = rx.await.unwrap_or(Err(ReplicationError::ShuttingDown));
                shared
                    .metrics
                    .request(Op::Get, c, r.as_ref().err(), start.elapsed());
                replies.push(match r {
                    Ok(Some(v)) => Reply::Bulk(v),
                    Ok(None) => Reply::Null,
                    Err(e) => replication_error(&e),
                });
            }
        }
    }
    replies
}

fn read_level(shared: &Shared, s: &Session) -> Consistency {
    s.read.unwrap_or(shared.node.config().read_consistency)
}

fn write_level(shared: &Shared, s: &Session) -> Consistency {
    s.write.unwrap_or(shared.node.config().write_consistency)
}

async fn get(shared: &Shared, s: &Session, key: &Bytes) -> Reply {
    let c = read_level(shared, s);
    let start = Instant::now();
    let r = shared
        .node
        .get(key.clone(), ReadOptions::default().consistency(c))
        .await;
    shared
        .metrics
        .request(Op::Get, c, r.as_ref().err(), start.elapsed());
    match r {
        Ok(Some(v)) => Reply::Bulk(v),
        Ok(None) => Reply::Null,
        Err(e) => replication_error(&e),
    }
}

async fn set(shared: &Shared, s: &Session, args: &[Bytes]) -> Reply {
    let mut ttl = None;
    let mut i = 3;
    while i < args.len() {
        let opt = lower(&args[i]);
        match opt.as_str() {
            "ex" | "px" | "exat" | "pxat" if ttl.is_none() => {
                let Some(v) = args.get(i + 1) else {
                    return syntax();
                };
                let Some(v) = int(v) else {
                    return not_integer();
                };
                if v <= 0 {
                    return Reply::err("invalid expire time in 'set' command");
                }
                let v = v as u64;
                let now_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                ttl = Some(match opt.as_str() {
                    "ex" => Duration::from_secs(v),
                    "px" => Duration::from_millis(v),
                    "exat" => Duration::from_millis(v.saturating_mul(1000).saturating_sub(now_ms)),
                    _ => Duration::from_millis(v.saturating_sub(now_ms)),
                });
                if ttl == Some(Duration::ZERO) {
                    // Already past: Redis deletes the key.
                    return match del_keys(shared, s, &args[1..2], false).await {
                        Ok(_) => Reply::Ok,
                        Err(e) => e,
                    };
                }
                i += 2;
            }
            "nx" | "xx" | "get" | "keepttl" => {
                return Reply::err(format!(
                    "SET {} is not supported: {NO_RMW}, so the condition could not be checked atomically; use a plain SET",
                    opt.to_uppercase()
                ));
            }
            _ => return syntax(),
        }
    }
    put(shared, s, args[1].clone(), args[2].clone(), ttl).await
}

async fn put(
    shared: &Shared,
    s: &Session,
    key: Bytes,
    value: Bytes,
    ttl: Option<Duration>,
) -> Reply {
    let c = write_level(shared, s);
    let mut options = WriteOptions::default().consistency(c);
    if let Some(ttl) = ttl {
        options = options.ttl(ttl);
    }
    let start = Instant::now();
    let r = shared.node.put(key, value, options).await;
    shared
        .metrics
        .request(Op::Set, c, r.as_ref().err(), start.elapsed());
    match r {
        Ok(_) => Reply::Ok,
        Err(e) => replication_error(&e),
    }
}

/// Reads `keys` at the session's read consistency: whether each holds a live value.
async fn live(shared: &Shared, s: &Session, keys: &[Bytes], op: Op) -> Result<Vec<bool>, Reply> {
    let c = read_level(shared, s);
    let start = Instant::now();
    let r = shared
        .node
        .get_many(keys.to_vec(), ReadOptions::default().consistency(c))
        .await;
    let results = match r {
        Ok(results) => results,
        Err(e) => {
            shared.metrics.request(op, c, Some(&e), start.elapsed());
            return Err(replication_error(&e));
        }
    };
    let first_error = results.iter().find_map(|r| r.as_ref().err());
    shared.metrics.request(op, c, first_error, start.elapsed());
    if let Some(e) = first_error {
        return Err(replication_error(e));
    }
    Ok(results
        .into_iter()
        .map(|r| matches!(r, Ok(Some(_))))
        .collect())
}

async fn exists(shared: &Shared, s: &Session, keys: &[Bytes]) -> Reply {
    match live(shared, s, keys, Op::Exists).await {
        Ok(found) => Reply::Int(found.iter().filter(|f| **f).count() as i64),
        Err(e) => e,
    }
}

async fn del(shared: &Shared, s: &Session, keys: &[Bytes]) -> Reply {
    match del_keys(shared, s, keys, true).await {
        Ok(n) => Reply::Int(n),
        Err(e) => e,
    }
}

/// Deletes `keys`; with `count`, first reads them, to answer how many were live (Redis's
/// reply), which the tombstones alone cannot tell.
async fn del_keys(shared: &Shared, s: &Session, keys: &[Bytes], count: bool) -> Result<i64, Reply> {
    let mut unique: Vec<Bytes> = keys.to_vec();
    unique.sort();
    unique.dedup();
    let found = if count {
        live(shared, s, &unique, Op::Exists)
            .await?
            .iter()
            .filter(|f| **f)
            .count() as i64
    } else {
        0
    };
    let c = write_level(shared, s);
    let start = Instant::now();
    let r = shared
        .node
        .delete_many(unique, WriteOptions::default().consistency(c))
        .await;
    let error = match &r {
        Err(e) => Some(e),
        Ok(results) => results.iter().find_map(|r| r.as_ref().err()),
    };
    shared.metrics.request(Op::Del, c, error, start.elapsed());
    match error {
        Some(e) => Err(replication_error(e)),
        None => Ok(found),
    }
}

async fn mget(shared: &Shared, s: &Session, keys: &[Bytes]) -> Reply {
    let c = read_level(shared, s);
    let start = Instant::now();
    let r = shared
        .node
        .get_many(keys.to_vec(), ReadOptions::default().consistency(c))
        .await;
    let results = match r {
        Ok(results) => results,
        Err(e) => {
            shared
                .metrics
                .request(Op::Mget, c, Some(&e), start.elapsed());
            return replication_error(&e);
        }
    };
    let first_error = results.iter().find_map(|r| r.as_ref().err());
    shared
        .metrics
        .request(Op::Mget, c, first_error, start.elapsed());
    if let Some(e) = first_error {
        return replication_error(e);
    }
    Reply::Array(
        results
            .into_iter()
            .map(|r| match r {
                Ok(Some(v)) => Reply::Bulk(v.value),
                _ => Reply::Null,
            })
            .collect(),
    )
}

async fn mset(shared: &Shared, s: &Session, pairs: &[Bytes]) -> Reply {
    let c = write_level(shared, s);
    let entries = pairs
        .chunks_exact(2)
        .map(|p| (p[0].clone(), p[1].clone()))
        .collect();
    let start = Instant::now();
    let r = shared
        .node
        .put_many(entries, WriteOptions::default().consistency(c))
        .await;
    let error = match &r {
        Err(e) => Some(e),
        Ok(results) => results.iter().find_map(|r| r.as_ref().err()),
    };
    shared.metrics.request(Op::Mset, c, error, start.elapsed());
    match error {
        // Other keys of the batch may have been written: MSET is not atomic here.
        Some(e) => replication_error(e),
        None => Reply::Ok,
    }
}

fn hello(shared: &Shared, s: &mut Session, args: &[Bytes]) -> Reply {
    let mut proto = s.proto;
    let mut rest = args;
    if let Some(v) = args.first() {
        match int(v) {
            Some(2) => proto = Proto::Resp2,
            Some(3) => proto = Proto::Resp3,
            Some(_) => return Reply::error("NOPROTO", "unsupported protocol version"),
            None => {
                return Reply::err("Protocol version is not an integer or out of range");
            }
        }
        rest = &args[1..];
    }
    let mut name = None;
    while let Some(opt) = rest.first() {
        match lower(opt).as_str() {
            "auth" if rest.len() >= 3 => {
                if let Reply::Error(e) = auth(shared, s, &rest[1..3]) {
                    return Reply::Error(e);
                }
                rest = &rest[3..];
            }
            "setname" if rest.len() >= 2 => {
                name = Some(rest[1].clone());
                rest = &rest[2..];
            }
            _ => return Reply::err(format!("Syntax error in HELLO option '{}'", lower(opt))),
        }
    }
    if !s.authenticated {
        return Reply::error(
            "NOAUTH",
            "HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
        );
    }
    if name.is_some() {
        s.name = name;
    }
    s.proto = proto;
    Reply::map([
        ("server", Reply::text("chorus")),
        ("version", Reply::text(super::REDIS_VERSION)),
        ("chorus_version", Reply::text(env!("CARGO_PKG_VERSION"))),
        (
            "proto",
            Reply::Int(if proto == Proto::Resp3 { 3 } else { 2 }),
        ),
        ("id", Reply::Int(s.id as i64)),
        ("mode", Reply::text("cluster")),
        ("role", Reply::text("master")),
        ("modules", Reply::Array(Vec::new())),
    ])
}

fn auth(shared: &Shared, s: &mut Session, args: &[Bytes]) -> Reply {
    let expected = shared.password.as_bytes();
    if expected.is_empty() {
        return Reply::err(
            "AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
        );
    }
    let (user, password) = match args {
        [p] => (None, p),
        [u, p] => (Some(u), p),
        _ => return syntax(),
    };
    let user_ok = user.is_none_or(|u| &u[..] == b"default");
    if user_ok & constant_time_eq(password, expected) {
        s.authenticated = true;
        Reply::Ok
    } else {
        shared.metrics.auth_failures.increment(1);
        Reply::error(
            "WRONGPASS",
            "invalid username-password pair or user is disabled.",
        )
    }
}

/// Compares without an early exit on the first differing byte (the length still shows).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(x ^ y);
    }
    diff == 0
}

fn client(s: &mut Session, args: &[Bytes]) -> Reply {
    match (lower(&args[0]).as_str(), args.len()) {
        ("id", 1) => Reply::Int(s.id as i64),
        ("getname", 1) => s.name.clone().map_or(Reply::Null, Reply::Bulk),
        ("setname", 2) => {
            if args[1].iter().any(|&b| b <= b' ' || b > b'~') {
                return Reply::err(
                    "Client names cannot contain spaces, newlines or special characters.",
                );
            }
            s.name = (!args[1].is_empty()).then(|| args[1].clone());
            Reply::Ok
        }
        ("setinfo", 3) => Reply::Ok,
        ("info", 1) => Reply::Verbatim(format!(
            "id={} addr={} name={} resp={}\n",
            s.id,
            s.peer,
            s.name
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default(),
            if s.proto == Proto::Resp3 { 3 } else { 2 }
        )),
        (sub, _) => Reply::err(format!(
            "unknown subcommand or wrong number of arguments for 'client|{sub}' command (Chorus answers CLIENT ID, SETNAME, GETNAME, SETINFO, INFO)"
        )),
    }
}

fn command(args: &[Bytes]) -> Reply {
    let info = |c: &CommandRow| {
        Reply::Array(vec![
            Reply::text(c.0),
            Reply::Int(c.1),
            Reply::Array(c.2.iter().map(|f| Reply::Simple((*f).into())).collect()),
            Reply::Int(c.3),
            Reply::Int(c.4),
            Reply::Int(c.5),
            Reply::Array(vec![Reply::Simple(format!("@{}", c.6))]),
            Reply::Array(Vec::new()),
            Reply::Array(Vec::new()),
            Reply::Array(Vec::new()),
        ])
    };
    let Some(sub) = args.first() else {
        return Reply::Array(COMMANDS.iter().map(info).collect());
    };
    let wanted = |c: &&CommandRow| args.len() == 1 || args[1..].iter().any(|a| lower(a) == c.0);
    match lower(sub).as_str() {
        "count" => Reply::Int(COMMANDS.len() as i64),
        "info" => Reply::Array(COMMANDS.iter().filter(wanted).map(info).collect()),
        "docs" => Reply::Map(
            COMMANDS
                .iter()
                .filter(wanted)
                .map(|c| {
                    (
                        Reply::text(c.0),
                        Reply::map([
                            ("summary", Reply::text(c.7)),
                            ("since", Reply::text("0.1.0")),
                            ("group", Reply::text(c.6)),
                        ]),
                    )
                })
                .collect(),
        ),
        "list" => Reply::Array(COMMANDS.iter().map(|c| Reply::text(c.0)).collect()),
        other => Reply::err(format!(
            "unknown subcommand '{other}'. Try COMMAND, COMMAND COUNT, COMMAND INFO, COMMAND DOCS, COMMAND LIST."
        )),
    }
}

fn consistency(shared: &Shared, s: &mut Session, args: &[Bytes]) -> Reply {
    match args {
        [] => Reply::map([
            ("read", Reply::text(read_level(shared, s).to_string())),
            ("write", Reply::text(write_level(shared, s).to_string())),
            (
                "replication_factor",
                Reply::Int(shared.node.config().replication_factor.get() as i64),
            ),
        ]),
        [which, level] => {
            let which = lower(which);
            if !matches!(which.as_str(), "read" | "write" | "both") {
                return Reply::err("CHORUS.CONSISTENCY read|write|both one|quorum|all|<n>|default");
            }
            let level = lower(level);
            let c = if level == "default" {
                None
            } else {
                let c: Consistency = match level.parse() {
                    Ok(c) => c,
                    Err(e) => return Reply::err(e),
                };
                if let Err(e) = c.required(shared.node.config().replication_factor) {
                    return Reply::err(e.to_string());
                }
                Some(c)
            };
            if which != "write" {
                s.read = c;
            }
            if which != "read" {
                s.write = c;
            }
            Reply::Ok
        }
        _ => wrong_args("chorus.consistency"),
    }
}

fn members(shared: &Shared) -> Reply {
    Reply::Array(
        shared
            .node
            .members()
            .iter()
            .map(|m| {
                Reply::map([
                    ("id", Reply::Int(m.id.0 as i64)),
                    ("addr", Reply::text(m.meta.addr.to_string())),
                    ("state", Reply::text(state_name(m.state))),
                    ("generation", Reply::Int(m.life.generation as i64)),
                    ("incarnation", Reply::Int(m.life.incarnation as i64)),
                    ("self", Reply::Int((m.id == shared.node.id()) as i64)),
                ])
            })
            .collect(),
    )
}

fn ring(shared: &Shared) -> Reply {
    Reply::Array(
        shared
            .node
            .ring()
            .iter()
            .map(|o| {
                Reply::map([
                    ("id", Reply::Int(o.id.0 as i64)),
                    ("addr", Reply::text(o.addr.to_string())),
                    ("state", Reply::text(state_name(o.state))),
                    ("primary_share", Reply::Double(o.primary_share)),
                    ("joining", Reply::Int(i64::from(o.joining))),
                ])
            })
            .collect(),
    )
}

async fn status(shared: &Shared) -> Reply {
    let st = super::status_json(shared).await;
    Reply::map(flatten("", &st))
}

/// A JSON object's leaves as `a.b` keys, for a flat RESP map.
fn flatten(prefix: &str, v: &serde_json::Value) -> Vec<(String, Reply)> {
    match v {
        serde_json::Value::Object(m) => m
            .iter()
            .flat_map(|(k, v)| {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v {
                    serde_json::Value::Object(_) => flatten(&key, v),
                    _ => vec![(key, json_reply(v))],
                }
            })
            .collect(),
        other => vec![(prefix.to_string(), json_reply(other))],
    }
}

fn json_reply(v: &serde_json::Value) -> Reply {
    match v {
        serde_json::Value::Null => Reply::Null,
        serde_json::Value::Bool(b) => Reply::Int(*b as i64),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Reply::Int(i),
            None => Reply::Double(n.as_f64().unwrap_or(0.0)),
        },
        serde_json::Value::String(s) => Reply::text(s.clone()),
        serde_json::Value::Array(a) => Reply::Array(a.iter().map(json_reply).collect()),
        serde_json::Value::Object(_) => Reply::map(flatten("", v)),
    }
}

/// Approximate number of keys in the cluster: this node's live records scaled by how much of
/// the key space it replicates. Counts values that expired but were not purged yet.
pub(crate) async fn dbsize(shared: &Shared) -> i64 {
    let Ok(st) = shared.node.storage().stats().await else {
        return 0;
    };
    let local = st.records.saturating_sub(st.tombstones) as f64;
    let owners = shared.node.ring().len().max(1) as f64;
    let n = shared.node.config().replication_factor.get() as f64;
    // Each key lives on min(N, owners) of the owners: this node holds that fraction of them.
    let fraction = (n.min(owners) / owners).max(f64::MIN_POSITIVE);
    (local / fraction).round() as i64
}

async fn info(shared: &Shared, _s: &Session, args: &[Bytes]) -> String {
    let wanted: Vec<String> = args.iter().map(|a| lower(a)).collect();
    let all = wanted.is_empty()
        || wanted
            .iter()
            .any(|w| w == "all" || w == "everything" || w == "default");
    let want = |name: &str| all || wanted.iter().any(|w| w == name);
    let node = &shared.node;
    let mut out = String::new();
    if want("server") {
        let uptime = shared.started.elapsed().as_secs();
        let _ = write!(
            out,
            "# Server\r\nredis_version:{}\r\nchorus_version:{}\r\nredis_mode:cluster\r\nos:{}\r\narch_bits:{}\r\nprocess_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{uptime}\r\nuptime_in_days:{}\r\nnode_id:{}\r\n\r\n",
            super::REDIS_VERSION,
            env!("CARGO_PKG_VERSION"),
            std::env::consts::OS,
            usize::BITS,
            std::process::id(),
            shared.client_addr.port(),
            uptime / 86_400,
            node.id().0,
        );
    }
    if want("clients") {
        let _ = write!(
            out,
            "# Clients\r\nconnected_clients:{}\r\nmaxclients:{}\r\n\r\n",
            shared.connected(),
            shared.max_connections,
        );
    }
    if want("stats") {
        let st = node.stats();
        let _ = write!(
            out,
            "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\nrejected_connections:{}\r\nkeyspace_reads:{}\r\nkeyspace_writes:{}\r\nlocal_reads:{}\r\nunavailable:{}\r\ntimeouts:{}\r\nfailed:{}\r\nread_repairs:{}\r\n\r\n",
            shared.accepted(),
            shared.commands(),
            shared.rejected(),
            st.reads,
            st.writes,
            st.local_reads,
            st.unavailable,
            st.timeouts,
            st.failed,
            st.read_repairs,
        );
    }
    if want("cluster") || want("replication") {
        let members = node.members();
        let count = |state| members.iter().filter(|m| m.state == state).count();
        let c = node.config();
        let _ = write!(
            out,
            "# Cluster\r\nrole:master\r\ncluster_enabled:0\r\nchorus_cluster:leaderless\r\nreplication_factor:{}\r\nread_consistency:{}\r\nwrite_consistency:{}\r\nmembers_alive:{}\r\nmembers_suspect:{}\r\nmembers_dead:{}\r\nmembers_left:{}\r\n",
            c.replication_factor,
            c.read_consistency,
            c.write_consistency,
            count(MemberState::Alive),
            count(MemberState::Suspect),
            count(MemberState::Dead),
            count(MemberState::Left),
        );
        for (i, m) in members.iter().filter(|m| m.id != node.id()).enumerate() {
            let _ = write!(
                out,
                "member{i}:id={},addr={},state={}\r\n",
                m.id.0,
                m.meta.addr,
                state_name(m.state)
            );
        }
        out.push_str("\r\n");
    }
    if want("keyspace") {
        let _ = write!(
            out,
            "# Keyspace\r\ndb0:keys={},expires=0,avg_ttl=0\r\n",
            dbsize(shared).await
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_contents_and_length() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn errors_read_as_documented() {
        let r = replication_error(&ReplicationError::Unavailable {
            required: 2,
            alive: 1,
        });
        assert_eq!(
            r,
            Reply::Error("UNAVAILABLE 1 of 2 required replicas reachable".into())
        );
        let r = replication_error(&ReplicationError::Timeout {
            op: crate::replication::Operation::Write,
            acks: 1,
            required: 2,
            after: Duration::from_secs(2),
        });
        assert_eq!(
            r,
            Reply::Error(
                "TIMEOUT 1 of 2 required replicas acknowledged; the write may have been applied"
                    .into()
            )
        );
    }
}
