//! Multi-process tests of the `chorus` server: real `chorus serve` processes on loopback (every
//! port chosen by the kernel and read from the ready line), driven through the `redis` crate,
//! raw sockets, the admin HTTP listener and the CLI. Every child is killed by PID on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_chorus");

/// One `chorus serve` child.
struct Server {
    child: Child,
    client: String,
    admin: String,
    cluster: String,
    log: PathBuf,
}

impl Server {
    /// Starts `chorus serve` with these `CHORUS_*` overrides (every listener on port 0 unless
    /// they say otherwise) and waits for its ready line.
    fn start(dir: &Path, name: &str, env: &[(&str, &str)]) -> Server {
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(EXE);
        cmd.arg("serve")
            .env_clear()
            .env("CHORUS_CLIENT_LISTEN", "127.0.0.1:0")
            .env("CHORUS_ADMIN_LISTEN", "127.0.0.1:0")
            .env("CHORUS_NODE_TRANSPORT_BIND", "127.0.0.1:0")
            .env("CHORUS_NODE_MEMBERSHIP", "local")
            .env("CHORUS_NODE_SECURITY_MODE", "insecure")
            .env("CHORUS_LOG_FILTER", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"));
        let mut child = cmd.spawn().expect("spawn chorus");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!(
                    "{name} did not start; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        let ready = line
            .strip_prefix("chorus ready: ")
            .unwrap_or_else(|| panic!("unexpected first line: {line}"));
        let field = |f: &str| {
            ready
                .split(' ')
                .find_map(|kv| kv.strip_prefix(&format!("{f}=")))
                .unwrap_or_else(|| panic!("no {f} in {ready}"))
                .to_string()
        };
        Server {
            client: field("client"),
            admin: field("admin"),
            cluster: field("cluster"),
            child,
            log,
        }
    }

    fn redis(&self) -> redis::Connection {
        redis::Client::open(format!("redis://{}/", self.client))
            .expect("url")
            .get_connection_with_timeout(Duration::from_secs(10))
            .expect("connect")
    }

    /// SIGTERM; the exit status and how long it took (bounded by `bound`, then SIGKILL and
    /// a failure).
    fn terminate(&mut self, bound: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status, start.elapsed());
            }
            if start.elapsed() > bound {
                let _ = self.child.kill();
                panic!(
                    "did not exit within {bound:?} of SIGTERM; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn http(&self, path: &str) -> (u16, String) {
        http_get(&self.admin, path)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A minimal HTTP/1.1 GET: the status and the body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("admin connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).expect("response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn wait_until(what: &str, bound: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {bound:?} waiting until {what}");
}

/// How many members `server` sees in `state`.
fn members_in(server: &Server, state: &str) -> usize {
    let Ok(mut con) = redis::Client::open(format!("redis://{}/", server.client))
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
    else {
        return 0;
    };
    let members: Vec<Vec<redis::Value>> = match redis::cmd("CHORUS.MEMBERS").query(&mut con) {
        Ok(m) => m,
        Err(_) => return 0,
    };
    members
        .iter()
        .filter(|m| {
            m.windows(2).any(|w| {
                matches!((&w[0], &w[1]), (redis::Value::BulkString(k), redis::Value::BulkString(v))
                    if k == b"state" && v == state.as_bytes())
            })
        })
        .count()
}

/// How many members `server`'s ring shows joining (still pulling: reads do not reach them,
/// and while the settled ring is smaller than a quorum, quorum reads are unavailable).
fn joining_in(server: &Server) -> usize {
    let Ok(mut con) = redis::Client::open(format!("redis://{}/", server.client))
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
    else {
        return usize::MAX;
    };
    let ring: Vec<Vec<redis::Value>> = match redis::cmd("CHORUS.RING").query(&mut con) {
        Ok(r) => r,
        Err(_) => return usize::MAX,
    };
    ring.iter()
        .filter(|m| {
            m.windows(2).any(|w| {
                matches!((&w[0], &w[1]), (redis::Value::BulkString(k), redis::Value::Int(1))
                    if k == b"joining")
            })
        })
        .count()
}

/// One Prometheus sample: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// Checks `text` is Prometheus exposition format: every line a comment (`# HELP`, `# TYPE`
/// with a known type) or a sample `name{labels} value` with a valid name and a number.
fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let kind = rest.split(' ').nth(1).expect("type");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').expect("closing brace")),
            None => (series, ""),
        };
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name in {line}"
        );
        let labels = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').expect("label");
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .expect("quoted label value");
                (k.to_string(), v.to_string())
            })
            .collect();
        samples.push((name.to_string(), labels, value));
    }
    samples
}

fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

fn metrics(server: &Server) -> Vec<Sample> {
    let (status, body) = server.http("/metrics");
    assert_eq!(status, 200, "{body}");
    parse_prometheus(&body)
}

#[test]
fn three_servers_replicate_and_a_killed_one_fails_only_all() {
    let dir = tempfile::tempdir().unwrap();
    let common = [
        ("CHORUS_NODE_REPLICATION_FACTOR", "3"),
        ("CHORUS_NODE_REQUEST_TIMEOUT", "1s"),
    ];
    let a = Server::start(
        dir.path(),
        "a",
        &[&common[..], &[("CHORUS_NODE_ID", "1")]].concat(),
    );
    let seeds = a.cluster.clone();
    let b = Server::start(
        dir.path(),
        "b",
        &[
            &common[..],
            &[("CHORUS_NODE_ID", "2"), ("CHORUS_NODE_SEEDS", &seeds)],
        ]
        .concat(),
    );
    let mut c = Server::start(
        dir.path(),
        "c",
        &[
            &common[..],
            &[("CHORUS_NODE_ID", "3"), ("CHORUS_NODE_SEEDS", &seeds)],
        ]
        .concat(),
    );
    for s in [&a, &b, &c] {
        wait_until(
            "every server sees three alive members, none joining",
            Duration::from_secs(40),
            || members_in(s, "alive") == 3 && joining_in(s) == 0,
        );
        assert_eq!(s.http("/health/ready").0, 200);
        assert_eq!(s.http("/health/live").0, 200);
    }
    let before = metrics(&a);
    let sets_before = sample(
        &before,
        "chorus_requests_total",
        &[("op", "set"), ("consistency", "quorum"), ("outcome", "ok")],
    );

    // Written through one server, read through the others.
    let (mut ra, mut rb, mut rc) = (a.redis(), b.redis(), c.redis());
    let () = redis::cmd("SET").arg("k").arg("v1").query(&mut ra).unwrap();
    let got: Option<String> = redis::cmd("GET").arg("k").query(&mut rb).unwrap();
    assert_eq!(got.as_deref(), Some("v1"));
    let got: Option<String> = redis::cmd("GET").arg("k").query(&mut rc).unwrap();
    assert_eq!(got.as_deref(), Some("v1"));

    // Pipelined: 300 SETs then 300 GETs in one round trip each.
    let mut pipe = redis::pipe();
    for i in 0..300 {
        pipe.cmd("SET")
            .arg(format!("p{i}"))
            .arg(format!("value-{i}"))
            .ignore();
    }
    let () = pipe.query(&mut ra).unwrap();
    let mut pipe = redis::pipe();
    for i in 0..300 {
        pipe.cmd("GET").arg(format!("p{i}"));
    }
    let values: Vec<String> = pipe.query(&mut rb).unwrap();
    assert_eq!(values.len(), 300);
    for (i, v) in values.iter().enumerate() {
        assert_eq!(v, &format!("value-{i}"));
    }
    // Concurrent clients on every server, each reading its own writes back elsewhere.
    let addrs = [a.client.clone(), b.client.clone(), c.client.clone()];
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                let open = |addr: &str| {
                    redis::Client::open(format!("redis://{addr}/"))
                        .unwrap()
                        .get_connection()
                        .unwrap()
                };
                let mut w = open(&addrs[t % 3]);
                let mut r = open(&addrs[(t + 1) % 3]);
                for i in 0..50 {
                    let key = format!("c{t}-{i}");
                    let () = redis::cmd("SET").arg(&key).arg(i).query(&mut w).unwrap();
                    let got: i64 = redis::cmd("GET").arg(&key).query(&mut r).unwrap();
                    assert_eq!(got, i);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let n: i64 = redis::cmd("EXISTS")
        .arg("k")
        .arg("p0")
        .arg("nope")
        .query(&mut rc)
        .unwrap();
    assert_eq!(n, 2);

    // /metrics parses and its counters moved with the traffic through `a`: 1 + 300 SETs and
    // the 100 of the concurrent clients that wrote through it.
    let after = metrics(&a);
    let sets_after = sample(
        &after,
        "chorus_requests_total",
        &[("op", "set"), ("consistency", "quorum"), ("outcome", "ok")],
    );
    assert_eq!(sets_after - sets_before, 401.0);
    assert!(
        sample(
            &after,
            "chorus_request_duration_seconds_count",
            &[("op", "set")]
        ) >= 401.0
    );
    assert_eq!(sample(&after, "chorus_members", &[("state", "alive")]), 3.0);
    assert!(sample(&after, "chorus_storage_records", &[]) >= 301.0);
    assert!(sample(&after, "chorus_replica_applied_total", &[]) >= 301.0);
    let (status, body) = a.http("/status");
    assert_eq!(status, 200);
    let status: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
    assert_eq!(status["node"]["id"], 1);
    assert_eq!(status["members"].as_array().map(Vec::len), Some(3));

    // One server killed: QUORUM writes still succeed, ALL fails with the documented error.
    c.child.kill().expect("SIGKILL c");
    let _ = c.child.wait();
    let () = redis::cmd("SET").arg("k").arg("v2").query(&mut ra).unwrap();
    let () = redis::cmd("CHORUS.CONSISTENCY")
        .arg("write")
        .arg("all")
        .query(&mut ra)
        .unwrap();
    let err = redis::cmd("SET")
        .arg("k")
        .arg("v3")
        .query::<()>(&mut ra)
        .expect_err("ALL cannot succeed with a replica down");
    match err.code() {
        // Not yet known to be down: the write was sent and two of three acknowledged.
        Some("TIMEOUT") => assert_eq!(
            err.detail(),
            Some("2 of 3 required replicas acknowledged; the write may have been applied")
        ),
        Some("UNAVAILABLE") => {
            assert_eq!(err.detail(), Some("2 of 3 required replicas reachable"))
        }
        // Its connection refused at once: failed before the others' acknowledgements came.
        Some("FAILED") => {
            let detail = err.detail().unwrap_or_default();
            assert!(detail.contains("of 3 required replicas acknowledged, 1 unreachable, 0 refused; the write may have been applied"), "{detail}");
        }
        _ => panic!("unexpected error: {err}"),
    }
    wait_until("a declares c dead", Duration::from_secs(20), || {
        members_in(&a, "alive") == 2
    });
    wait_until(
        "ALL is refused as unavailable",
        Duration::from_secs(20),
        || {
            let err = redis::cmd("SET")
                .arg("k")
                .arg("v3")
                .query::<()>(&mut ra)
                .expect_err("fails");
            err.code() == Some("UNAVAILABLE")
                && err.detail() == Some("2 of 3 required replicas reachable")
        },
    );
    // Reads at QUORUM are still served, by either survivor: v2, or v3 from a refused ALL
    // write that was sent before the node was known to be down (its error said it may
    // have been applied).
    let got: Option<String> = redis::cmd("GET").arg("k").query(&mut rb).unwrap();
    assert!(matches!(got.as_deref(), Some("v2" | "v3")), "{got:?}");
    let after = metrics(&a);
    // The healing and membership-refusal series are exported (their values depend on when
    // `c` was known to be down, so only their presence is checked).
    for name in [
        "chorus_hints_stored_total",
        "chorus_hints_pending",
        "chorus_hints_dropped_total",
        "chorus_sync_offers_total",
        "chorus_membership_refused_total",
        "chorus_membership_rate_limited_total",
        "chorus_replies_not_sent_total",
    ] {
        assert!(after.iter().any(|(n, _, _)| n == name), "{name} missing");
    }
    assert!(sample(&after, "chorus_quorum_failures_total", &[]) >= 2.0);
    assert!(
        sample(
            &after,
            "chorus_requests_total",
            &[
                ("op", "set"),
                ("consistency", "all"),
                ("outcome", "unavailable")
            ]
        ) >= 1.0
    );
}

#[test]
fn file_backend_keeps_its_data_across_a_sigterm_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let env = [
        ("CHORUS_NODE_REPLICATION_FACTOR", "1"),
        ("CHORUS_NODE_STORAGE_SCHEME", "file"),
        ("CHORUS_NODE_STORAGE_PATH", data),
        ("CHORUS_NODE_SHUTDOWN_TIMEOUT", "3s"),
        ("CHORUS_CLIENT_SHUTDOWN_GRACE", "1s"),
    ];
    let mut server = Server::start(dir.path(), "first", &env);
    let mut con = server.redis();
    let mut pipe = redis::pipe();
    for i in 0..200 {
        pipe.cmd("SET")
            .arg(format!("k{i}"))
            .arg(format!("v{i}"))
            .ignore();
    }
    let () = pipe.query(&mut con).unwrap();
    let () = redis::cmd("DEL")
        .arg("k0")
        .query::<i64>(&mut con)
        .map(|n| assert_eq!(n, 1))
        .unwrap();
    // SIGTERM: exit 0 within client.shutdown_grace + node.shutdown_timeout + 1 s.
    let (status, took) = server.terminate(Duration::from_secs(5));
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    drop(con);

    let server = Server::start(dir.path(), "second", &env);
    let mut con = server.redis();
    let mut pipe = redis::pipe();
    for i in 0..200 {
        pipe.cmd("GET").arg(format!("k{i}"));
    }
    let values: Vec<Option<String>> = pipe.query(&mut con).unwrap();
    assert_eq!(values[0], None, "the delete survived too");
    for (i, v) in values.iter().enumerate().skip(1) {
        assert_eq!(v.as_deref(), Some(format!("v{i}").as_str()));
    }
}

#[test]
fn auth_is_required_and_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        "auth",
        &[
            ("CHORUS_NODE_REPLICATION_FACTOR", "1"),
            ("CHORUS_CLIENT_PASSWORD", "s3cret"),
        ],
    );
    let mut raw = Raw::connect(&server.client);
    assert_eq!(
        raw.call("*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
        "-NOAUTH Authentication required.\r\n"
    );
    assert_eq!(
        raw.call("*1\r\n$4\r\nPING\r\n"),
        "-NOAUTH Authentication required.\r\n"
    );
    assert!(
        raw.call("*2\r\n$4\r\nAUTH\r\n$5\r\nwrong\r\n")
            .starts_with("-WRONGPASS ")
    );
    assert!(
        raw.call("*3\r\n$4\r\nAUTH\r\n$5\r\nadmin\r\n$6\r\ns3cret\r\n")
            .starts_with("-WRONGPASS ")
    );
    assert_eq!(
        raw.call("*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
        "-NOAUTH Authentication required.\r\n"
    );
    assert_eq!(raw.call("*2\r\n$4\r\nAUTH\r\n$6\r\ns3cret\r\n"), "+OK\r\n");
    assert_eq!(raw.call("*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"), "$-1\r\n");

    // A client library with the password in its URL.
    let mut con = redis::Client::open(format!("redis://:s3cret@{}/", server.client))
        .unwrap()
        .get_connection()
        .unwrap();
    let () = redis::cmd("SET").arg("k").arg("v").query(&mut con).unwrap();
    let wrong = redis::Client::open(format!("redis://:nope@{}/", server.client))
        .unwrap()
        .get_connection();
    assert!(wrong.is_err(), "a wrong password is refused");
    // The CLI, with the password from the environment.
    let out = Command::new(EXE)
        .args(["get", "k", "--addr", &server.client])
        .env("CHORUS_CLIENT_PASSWORD", "s3cret")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "v\n");
    let out = Command::new(EXE)
        .args(["get", "k", "--addr", &server.client])
        .env_remove("CHORUS_CLIENT_PASSWORD")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOAUTH"));
}

/// A raw connection for bytes no client library would send.
struct Raw(TcpStream);

impl Raw {
    fn connect(addr: &str) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw(s)
    }

    /// Sends `request` and reads one chunk of reply.
    fn call(&mut self, request: &str) -> String {
        self.0.write_all(request.as_bytes()).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let n = self.0.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Sends `bytes` (ignoring a reset: the server may close before reading them all) and
    /// reads until the server closes: everything it answered.
    fn send_until_closed(mut self, bytes: &[u8]) -> String {
        let _ = self.0.write_all(bytes);
        let mut out = Vec::new();
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match self.0.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("server did not close the connection: {e}"),
            }
        }
        assert!(start.elapsed() < Duration::from_secs(10));
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[test]
fn malformed_input_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        "malformed",
        &[
            ("CHORUS_NODE_REPLICATION_FACTOR", "1"),
            ("CHORUS_CLIENT_IDLE_TIMEOUT", "2s"),
            ("CHORUS_CLIENT_MAX_CONNECTIONS", "3"),
        ],
    );
    let mut healthy = server.redis();
    let () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query(&mut healthy)
        .unwrap();
    let check_healthy = |con: &mut redis::Connection| {
        let got: String = redis::cmd("GET").arg("k").query(con).unwrap();
        assert_eq!(got, "v");
    };

    let garbage: Vec<u8> = (0u32..2000)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let reply = Raw::connect(&server.client)
        .send_until_closed(&[b"\x00\xff".as_slice(), &garbage].concat());
    assert!(reply.starts_with("-ERR Protocol error"), "{reply}");
    check_healthy(&mut healthy);

    let reply = Raw::connect(&server.client).send_until_closed(b"*1\r\n$1099511627776\r\n");
    assert!(
        reply.starts_with("-ERR Protocol error: invalid bulk length"),
        "{reply}"
    );
    check_healthy(&mut healthy);

    let mut million = b"*1000000\r\n".to_vec();
    for _ in 0..10_000 {
        million.extend_from_slice(b"$1\r\na\r\n");
    }
    let reply = Raw::connect(&server.client).send_until_closed(&million);
    assert!(
        reply.starts_with("-ERR Protocol error: invalid multibulk length"),
        "{reply}"
    );
    check_healthy(&mut healthy);

    // Half a command, then silence: answered up to what was complete, closed at the idle
    // timeout; meanwhile the healthy connection, kept busy, is served.
    let addr = server.client.clone();
    let half = std::thread::spawn(move || {
        Raw::connect(&addr).send_until_closed(b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$5\r\nab")
    });
    while !half.is_finished() {
        check_healthy(&mut healthy);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(half.join().unwrap(), "+PONG\r\n-ERR idle timeout\r\n");
    check_healthy(&mut healthy);

    // A half-sent command whose sender closes its side: closed without a reply.
    let mut raw = Raw::connect(&server.client);
    raw.0.write_all(b"*2\r\n$3\r\nGET\r\n$5\r\nab").ok();
    raw.0.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(raw.send_until_closed(b""), "");
    check_healthy(&mut healthy);

    // The connection limit: `healthy` and two more are served, the next is refused.
    let mut extra: Vec<Raw> = Vec::new();
    wait_until(
        "two more connections are served",
        Duration::from_secs(5),
        || {
            extra.retain_mut(|r| r.call("*1\r\n$4\r\nPING\r\n") == "+PONG\r\n");
            if extra.len() < 2 {
                extra.push(Raw::connect(&server.client));
            }
            extra.len() == 2
                && extra
                    .iter_mut()
                    .all(|r| r.call("*1\r\n$4\r\nPING\r\n") == "+PONG\r\n")
        },
    );
    let reply = Raw::connect(&server.client).send_until_closed(b"");
    assert_eq!(reply, "-ERR max number of clients reached\r\n");
    check_healthy(&mut healthy);
    drop(extra);

    // A client that stops reading its replies is closed at the idle timeout too, once the
    // server cannot write them.
    let big = "x".repeat(1 << 20);
    let () = redis::cmd("SET")
        .arg("big")
        .arg(&big)
        .query(&mut healthy)
        .unwrap();
    let mut stuck = Raw::connect(&server.client);
    let gets = "*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n".repeat(64);
    stuck.0.write_all(gets.as_bytes()).unwrap();
    wait_until(
        "only the healthy connection is left",
        Duration::from_secs(10),
        || {
            let info: String = redis::cmd("INFO")
                .arg("clients")
                .query(&mut healthy)
                .unwrap();
            info.contains("connected_clients:1\r\n")
        },
    );
    drop(stuck);

    let samples = metrics(&server);
    assert!(sample(&samples, "chorus_client_protocol_errors_total", &[]) >= 3.0);
    assert!(sample(&samples, "chorus_client_connections_rejected_total", &[]) >= 1.0);
}

#[test]
fn protocol_shapes_refusals_and_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        "shapes",
        &[("CHORUS_NODE_REPLICATION_FACTOR", "1")],
    );
    let mut raw = Raw::connect(&server.client);
    // Inline commands, as typed into telnet, and pipelined ones answered in order.
    assert_eq!(raw.call("PING\r\n"), "+PONG\r\n");
    let mut replies = raw.call("*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\n1\r\n*2\r\n$3\r\nGET\r\n$1\r\na\r\n*2\r\n$3\r\nGET\r\n$1\r\nb\r\n");
    while replies.matches("\r\n").count() < 4 {
        let mut more = [0u8; 1024];
        let n = raw.0.read(&mut more).unwrap();
        replies.push_str(&String::from_utf8_lossy(&more[..n]));
    }
    assert_eq!(replies, "+OK\r\n$1\r\n1\r\n$-1\r\n");
    for (request, prefix) in [
        (
            "*4\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\n2\r\n$2\r\nNX\r\n",
            "-ERR SET NX is not supported",
        ),
        (
            "*4\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\n2\r\n$3\r\nGET\r\n",
            "-ERR SET GET is not supported",
        ),
        (
            "*2\r\n$4\r\nINCR\r\n$1\r\na\r\n",
            "-ERR INCR is not supported",
        ),
        (
            "*1\r\n$5\r\nMULTI\r\n",
            "-ERR transactions (MULTI) are not supported",
        ),
        (
            "*2\r\n$6\r\nSELECT\r\n$1\r\n1\r\n",
            "-ERR DB index is out of range",
        ),
        (
            "*1\r\n$3\r\nGET\r\n",
            "-ERR wrong number of arguments for 'get' command",
        ),
        ("*1\r\n$4\r\nNOPE\r\n", "-ERR unknown command 'NOPE'"),
        (
            "*3\r\n$18\r\nCHORUS.CONSISTENCY\r\n$4\r\nread\r\n$1\r\n2\r\n",
            "-ERR consistency of 2 replicas, but keys have only 1",
        ),
        (
            "*5\r\n$3\r\nSET\r\n$1\r\nt\r\n$1\r\nx\r\n$2\r\nPX\r\n$1\r\n0\r\n",
            "-ERR invalid expire time in 'set' command",
        ),
    ] {
        let reply = raw.call(request);
        assert!(reply.starts_with(prefix), "{request:?}: {reply}");
    }
    // The value was not changed by the refused SETs.
    assert_eq!(raw.call("*2\r\n$3\r\nGET\r\n$1\r\na\r\n"), "$1\r\n1\r\n");
    // RESP3 after HELLO 3: a map, and `_` for no value.
    let hello = raw.call("*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n");
    assert!(hello.starts_with('%'), "{hello}");
    assert!(hello.contains("proto\r\n:3\r\n"), "{hello}");
    assert_eq!(raw.call("*2\r\n$3\r\nGET\r\n$1\r\nb\r\n"), "_\r\n");
    assert_eq!(raw.call("*1\r\n$6\r\nDBSIZE\r\n"), ":1\r\n");
    assert_eq!(
        raw.call("*2\r\n$5\r\nHELLO\r\n$1\r\n4\r\n"),
        "-NOPROTO unsupported protocol version\r\n"
    );

    // The redis crate (as any client library) with the commands it uses.
    let mut con = server.redis();
    // A pipeline of writes to one key, batched together, leaves the last one.
    let mut pipe = redis::pipe();
    for i in 0..200 {
        pipe.cmd("SET").arg("same").arg(i).ignore();
    }
    pipe.cmd("GET").arg("same");
    let (last,): (i64,) = pipe.query(&mut con).unwrap();
    assert_eq!(last, 199);
    let () = redis::cmd("SET")
        .arg("ttl")
        .arg("x")
        .arg("EX")
        .arg(100)
        .query(&mut con)
        .unwrap();
    let () = redis::cmd("MSET")
        .arg("m1")
        .arg("1")
        .arg("m2")
        .arg("2")
        .query(&mut con)
        .unwrap();
    let got: Vec<Option<String>> = redis::cmd("MGET")
        .arg("m1")
        .arg("m2")
        .arg("m3")
        .query(&mut con)
        .unwrap();
    assert_eq!(got, vec![Some("1".into()), Some("2".into()), None]);
    let n: i64 = redis::cmd("DEL")
        .arg("m1")
        .arg("m2")
        .arg("m3")
        .query(&mut con)
        .unwrap();
    assert_eq!(n, 2);
    let () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("tester")
        .query(&mut con)
        .unwrap();
    let name: String = redis::cmd("CLIENT").arg("GETNAME").query(&mut con).unwrap();
    assert_eq!(name, "tester");
    let info: String = redis::cmd("INFO").query(&mut con).unwrap();
    for section in [
        "# Server",
        "# Clients",
        "# Stats",
        "# Cluster",
        "# Keyspace",
    ] {
        assert!(info.contains(section), "{info}");
    }
    let docs: redis::Value = redis::cmd("COMMAND").arg("DOCS").query(&mut con).unwrap();
    assert!(
        matches!(docs, redis::Value::Array(ref a) if !a.is_empty()),
        "{docs:?}"
    );

    // The CLI, tables and JSON.
    let cli = |args: &[&str]| {
        let out = Command::new(EXE)
            .args(args)
            .args(["--addr", &server.client])
            .env_remove("CHORUS_CLIENT_PASSWORD")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(cli(&["put", "cli", "hello"]), "OK\n");
    assert_eq!(cli(&["get", "cli"]), "hello\n");
    let json: serde_json::Value = serde_json::from_str(&cli(&["get", "cli", "--json"])).unwrap();
    assert_eq!(json["value"], "hello");
    assert_eq!(cli(&["del", "cli", "nope"]), "1\n");
    let members = cli(&["members"]);
    assert!(members.starts_with("ID  ADDR"), "{members}");
    assert!(members.contains("alive"), "{members}");
    let json: serde_json::Value = serde_json::from_str(&cli(&["ring", "--json"])).unwrap();
    assert_eq!(json[0]["primary_share"], "1");
    let json: serde_json::Value = serde_json::from_str(&cli(&["status", "--json"])).unwrap();
    assert_eq!(json["node.id"], 1);
}

#[test]
fn config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str, env: &[(&str, &str)]| {
        let path = dir.path().join("chorus.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(EXE)
            .args(["config", "check"])
            .arg(&path)
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = check(
        "[node]\nid = 3\n[client]\nlisten = \"127.0.0.1:7000\"\n",
        &[],
    );
    assert_eq!(code, Some(0), "{out}");
    for (text, env, field, why) in [
        (
            "[node]\nreplicaton_factor = 3\n",
            &[][..],
            "`node.replicaton_factor`",
            "unknown field",
        ),
        (
            "[node]\nreplication_factor = 0\n",
            &[],
            "`node.replication_factor`",
            "nonzero",
        ),
        (
            "[node]\nrequest_timeout = \"soon\"\n",
            &[],
            "`node.request_timeout`",
            "not a duration",
        ),
        (
            "[node]\nreplication_factor = 2\nread_consistency = \"all\"\nwrite_consistency = \"3\"\n",
            &[],
            "`node.write_consistency`",
            "only 2",
        ),
        (
            "[client]\nlisten = \"somewhere\"\n",
            &[],
            "`client.listen`",
            "not an `ip:port`",
        ),
        (
            "[client]\nmax_args = 1\n",
            &[],
            "`client.max_args`",
            "at least 3",
        ),
        (
            "[node.storage]\nscheme = \"nosuch\"\n",
            &[],
            "`node.storage.scheme`",
            "available:",
        ),
        ("[node]\nid = \"one\"\n", &[], "`node.id`", "invalid type"),
        ("[node\n", &[], "chorus.toml", "TOML parse error"),
        (
            "",
            &[("CHORUS_NODE_ID", "x")],
            "CHORUS_NODE_ID",
            "not an integer",
        ),
        (
            "",
            &[("CHORUS_CLIENT_LISTN", "x")],
            "CHORUS_CLIENT_LISTN",
            "names no setting",
        ),
        (
            "",
            &[("CHORUS_NODE_READ_CONSISTENCY", "most")],
            "`node.read_consistency`",
            "CHORUS_NODE_READ_CONSISTENCY",
        ),
    ] {
        let (code, out) = check(text, env);
        assert_eq!(code, Some(2), "{text:?}: {out}");
        assert!(
            out.contains(field) && out.contains(why),
            "{text:?} {env:?}: {out}"
        );
    }
    // `serve` refuses the same way, before binding anything.
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[client]\nmax_connections = 0\n").unwrap();
    let out = Command::new(EXE)
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`client.max_connections`: must not be zero")
    );
    // Every default, printed, is itself a valid file.
    let out = Command::new(EXE)
        .args(["config", "default"])
        .output()
        .unwrap();
    let (code, text) = check(&String::from_utf8_lossy(&out.stdout), &[]);
    assert_eq!(code, Some(0), "{text}");
}

#[test]
fn the_demo_runs_its_scenario_and_exits_cleanly() {
    let start = Instant::now();
    let out = Command::new(EXE)
        .arg("demo")
        .env_clear()
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("redis-cli -p "), "{stdout}");
    assert!(
        stdout.contains("UNAVAILABLE 2 of 3 required replicas reachable")
            || stdout.contains("TIMEOUT 2 of 3 required replicas acknowledged"),
        "{stdout}"
    );
    assert!(
        stdout.contains("node 3 holds the value it missed"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("exited cleanly").count(), 3, "{stdout}");
    assert!(start.elapsed() < Duration::from_secs(60));
}

/// `chorus identity FILE`: the keyring line of the identity there (created on first use).
fn identity_line(file: &Path) -> String {
    let out = Command::new(EXE)
        .arg("identity")
        .arg(file)
        .env_clear()
        .output()
        .expect("chorus identity");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(line.lines().count(), 1, "{line}");
    line
}

fn signal(server: &Server, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(server.child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Two servers in keyring mode (the default), over TCP with TLS (the default in keyring
/// mode): a node whose key the other's keyring lacks stays out, is admitted once its key is
/// added to the keyring file and the server gets SIGHUP (no restart), replicates, and is
/// removed again when the key is taken out and the keyring reloaded.
#[test]
fn keyring_mode_admits_and_revokes_a_node_on_sighup_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (a_key, b_key) = (dir.path().join("a.key"), dir.path().join("b.key"));
    let (a_line, b_line) = (identity_line(&a_key), identity_line(&b_key));
    // The identity is created once and read back after.
    assert_eq!(identity_line(&a_key), a_line);
    let (ring_a, ring_b) = (dir.path().join("ring-a"), dir.path().join("ring-b"));
    std::fs::write(&ring_a, format!("# a only\n{a_line}")).unwrap();
    std::fs::write(&ring_b, format!("{a_line}{b_line}")).unwrap();
    let keyring_env = |key: &Path, ring: &Path| {
        vec![
            ("CHORUS_NODE_SECURITY_MODE", "keyring".to_string()),
            (
                "CHORUS_NODE_SECURITY_IDENTITY_FILE",
                key.display().to_string(),
            ),
            (
                "CHORUS_NODE_SECURITY_KEYRING_FILE",
                ring.display().to_string(),
            ),
            ("CHORUS_NODE_JOIN_TIMEOUT", "1s".to_string()),
            ("CHORUS_NODE_REPLICATION_FACTOR", "2".to_string()),
        ]
    };
    let env_a = keyring_env(&a_key, &ring_a);
    let env_a: Vec<(&str, &str)> = env_a.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = Server::start(dir.path(), "a", &env_a);
    let mut env_b = keyring_env(&b_key, &ring_b);
    env_b.push(("CHORUS_NODE_SEEDS", a.cluster.clone()));
    let env_b: Vec<(&str, &str)> = env_b.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let b = Server::start(dir.path(), "b", &env_b);

    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        members_in(&a, "alive"),
        1,
        "a admitted a key its keyring lacks"
    );
    assert_eq!(members_in(&b, "alive"), 1);
    // b's connections failed a's TLS handshake, and /metrics says so.
    let refused = sample(
        &metrics(&a),
        "chorus_transport_refused_connections_total",
        &[("reason", "handshake")],
    );
    assert!(refused >= 1.0, "handshake refusals: {refused}");

    std::fs::write(&ring_a, format!("{a_line}{b_line}")).unwrap();
    signal(&a, "HUP");
    for s in [&a, &b] {
        wait_until(
            "both servers see two alive members after the reload, none joining",
            Duration::from_secs(40),
            || members_in(s, "alive") == 2 && joining_in(s) == 0,
        );
    }
    let mut con = b.redis();
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("over tls")
        .query(&mut con)
        .expect("SET");
    let got: String = redis::cmd("GET")
        .arg("k")
        .query(&mut a.redis())
        .expect("GET");
    assert_eq!(got, "over tls");

    std::fs::write(&ring_a, &a_line).unwrap();
    signal(&a, "HUP");
    wait_until(
        "a removes b after the revocation",
        Duration::from_secs(20),
        || members_in(&a, "alive") == 1,
    );
    let log = std::fs::read_to_string(&a.log).unwrap_or_default();
    assert!(!log.contains("keyring not reloaded"), "{log}");
}
