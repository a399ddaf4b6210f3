//! The conformance suite every transport must pass.
//!
//! The [`Transport`] contract is written once in `chorus_core::transport`; this module checks it
//! against any transport: the in-process one, tcp and quic (see
//! `tests/transport_conformance.rs`). A transport under test is a [`Kit`]: a name, a way to bind
//! a fresh transport or re-bind a given address, an address where nothing listens, the
//! configured connect timeout, and which raw socket can reach it ([`Raw`]) for the garbage
//! check.
//!
//! The checks ([`ALL`]) are async functions that panic on the first violation; [`run_check`]
//! runs one in its own task with [`CHECK_TIMEOUT`] and reports the transport, the check and the
//! seed. Every loop and every wait in them is bounded. Random frame sizes and contents come from
//! a [`ChaCha8Rng`] seeded by [`crate::conformance::seed`] (`CHORUS_SEED`).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use chorus::identity::Address;
use chorus::replication::Refusal;
use chorus::replication::ReplicaMessage;
use chorus::runtime::rpc::{RpcConfig, RpcEndpoint};
use chorus::transport::{Incoming, SharedTransport, Transport, TransportError};
use chorus::util::BoxFuture;
use chorus::wire::{HEADER_LEN, MAGIC, PREFIX_LEN, WIRE_VERSION};
use chorus::{Registry, TransportSpec};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::runner::{self, Subject};
pub use crate::runner::{CHECK_TIMEOUT, Failure, Ran};

/// How long a check waits for one expected frame.
pub const FRAME_WAIT: Duration = Duration::from_secs(10);

/// Binds a transport at the given bind string, announcing the given address instead of its own
/// when there is one (the `advertise` option).
type Binder = Arc<
    dyn Fn(String, Option<Address>) -> BoxFuture<'static, Result<SharedTransport, TransportError>>
        + Send
        + Sync,
>;

/// Which raw socket can talk to the transport, for [`garbage`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Raw {
    /// No sockets: the in-process transport carries no bytes a stranger could forge.
    None,
    /// A TCP listener that expects the tcp transport's hello.
    Tcp,
    /// A UDP socket (QUIC).
    Udp,
}

/// A transport under test. See the [module documentation](self).
#[derive(Clone)]
pub struct Kit {
    name: String,
    bind: Binder,
    fresh: Arc<dyn Fn() -> String + Send + Sync>,
    /// The configured maximum frame length.
    pub max_frame_len: usize,
    /// The configured connect timeout: an unreachable peer must be reported within it (plus
    /// slack for a loaded machine).
    pub connect_timeout: Duration,
    /// The raw socket kind that reaches this transport.
    pub raw: Raw,
}

impl fmt::Debug for Kit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kit")
            .field("name", &self.name)
            .field("max_frame_len", &self.max_frame_len)
            .field("raw", &self.raw)
            .finish_non_exhaustive()
    }
}

impl Kit {
    /// The in-process transport on a network whose frames may be `max_frame_len` long.
    pub fn inproc(max_frame_len: usize) -> Self {
        let config =
            chorus::runtime::inproc::InProcessConfig::default().with_max_frame_len(max_frame_len);
        let net = chorus::runtime::inproc::InProcessNetwork::with_config(0, config);
        let counter = Arc::new(AtomicU64::new(0));
        Kit {
            name: "inproc".to_owned(),
            // In process, an address belongs to one transport: nothing can claim another's.
            bind: Arc::new(move |addr: String, _advertise: Option<Address>| {
                let net = net.clone();
                Box::pin(async move { Ok(SharedTransport::new(net.bind(addr)?)) })
            }),
            fresh: Arc::new(move || format!("node-{}", counter.fetch_add(1, Ordering::Relaxed))),
            max_frame_len,
            connect_timeout: Duration::from_millis(1),
            raw: Raw::None,
        }
    }

    /// The transport `scheme` of `registry`, bound on fresh loopback ports with `options`.
    /// `max_frame_len` and `connect_timeout` must be what the options configure.
    pub fn from_registry(
        registry: Arc<Registry>,
        scheme: &str,
        options: BTreeMap<String, String>,
        max_frame_len: usize,
        connect_timeout: Duration,
        raw: Raw,
    ) -> Self {
        let scheme_owned = scheme.to_owned();
        Kit {
            name: scheme.to_owned(),
            bind: Arc::new(move |bind: String, advertise: Option<Address>| {
                let mut spec = TransportSpec::new(scheme_owned.as_str(), bind);
                spec.options = options.clone();
                if let Some(advertise) = advertise {
                    spec.options
                        .insert("advertise".to_owned(), advertise.to_string());
                }
                let registry = Arc::clone(&registry);
                Box::pin(async move {
                    registry.bind_transport(spec).await.map_err(|e| match e {
                        chorus::RegistryError::Transport { source, .. } => source,
                        other => TransportError::Config(other.to_string()),
                    })
                })
            }),
            fresh: Arc::new(|| "127.0.0.1:0".to_owned()),
            max_frame_len,
            connect_timeout,
            raw,
        }
    }

    /// The name used in reports.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A fresh transport.
    pub async fn bind(&self) -> SharedTransport {
        let bind = (self.fresh)();
        (self.bind)(bind.clone(), None)
            .await
            .unwrap_or_else(|e| panic!("{}: binding {bind}: {e}", self.name))
    }

    /// A fresh transport that announces `claimed` as its listen address (an impostor, or a
    /// node misconfigured with another's `advertise` address); `None` for a transport where
    /// no one can claim another's address (in process).
    pub async fn bind_claiming(&self, claimed: &Address) -> Option<SharedTransport> {
        if self.raw == Raw::None {
            return None;
        }
        let bind = (self.fresh)();
        let t = (self.bind)(bind.clone(), Some(claimed.clone()))
            .await
            .unwrap_or_else(|e| panic!("{}: binding {bind} claiming {claimed}: {e}", self.name));
        Some(t)
    }

    /// A transport at `addr` again (after the previous one closed). The port may take a moment
    /// to be released: `AddressInUse` is retried for up to 5 s.
    pub async fn rebind(&self, addr: &Address) -> SharedTransport {
        for _ in 0..100 {
            match (self.bind)(addr.to_string(), None).await {
                Ok(t) => return t,
                Err(TransportError::AddressInUse(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("{}: re-binding {addr}: {e}", self.name),
            }
        }
        panic!("{}: {addr} still in use after 5 s", self.name)
    }

    /// An address where nothing listens.
    pub fn unused_addr(&self) -> Address {
        match self.raw {
            Raw::None => Address::new("nobody-listens-here"),
            Raw::Tcp => {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe port");
                Address::new(l.local_addr().expect("addr").to_string())
            }
            Raw::Udp => {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("probe port");
                Address::new(s.local_addr().expect("addr").to_string())
            }
        }
    }
}

/// One conformance check of a transport.
pub type Check = runner::Check<Kit>;

impl Subject for Kit {
    const KIND: &'static str = "transport";

    fn name(&self) -> &str {
        &self.name
    }
}

/// [`frames_intact`] as a [`Check`].
pub const FRAMES_INTACT: Check = Check::new(
    "frames_intact",
    "frames of seeded sizes up to the maximum arrive intact, from the sender",
    |kit, seed| Box::pin(async move { frames_intact(&kit, seed).await }),
);

/// [`oversized`] as a [`Check`].
pub const OVERSIZED: Check = Check::new(
    "oversized",
    "a frame over the maximum is refused with FrameTooLarge; other frames flow",
    |kit, seed| Box::pin(async move { oversized(&kit, seed).await }),
);

/// [`restart`] as a [`Check`].
pub const RESTART: Check = Check::new(
    "restart",
    "a peer that closes and binds again is reached without intervention",
    |kit, seed| Box::pin(async move { restart(&kit, seed).await }),
);

/// [`unreachable()`] as a [`Check`].
pub const UNREACHABLE: Check = Check::new(
    "unreachable",
    "sending where nothing listens fails with Unreachable or Timeout in time",
    |kit, seed| Box::pin(async move { unreachable(&kit, seed).await }),
);

/// [`garbage`] as a [`Check`].
pub const GARBAGE: Check = Check::new(
    "garbage",
    "garbage from a raw socket closes that connection; other peers are served",
    |kit, seed| Box::pin(async move { garbage(&kit, seed).await }),
);

/// [`shutdown`] as a [`Check`].
pub const SHUTDOWN: Check = Check::new(
    "shutdown",
    "close delivers every frame send accepted, then sends fail with Closed",
    |kit, seed| Box::pin(async move { shutdown(&kit, seed).await }),
);

/// [`rpc`] as a [`Check`].
pub const RPC: Check = Check::new(
    "rpc",
    "request/response over the transport in both directions",
    |kit, seed| Box::pin(async move { rpc(&kit, seed).await }),
);

/// [`hijack`] as a [`Check`].
pub const HIJACK: Check = Check::new(
    "hijack",
    "a peer claiming another's address gets replies to its own frames, not traffic for that address",
    |kit, seed| Box::pin(async move { hijack(&kit, seed).await }),
);

/// [`unreliable`] as a [`Check`].
pub const UNRELIABLE: Check = Check::new(
    "unreliable",
    "send_unreliable: small and maximum-size frames arrive intact on a quiet link",
    |kit, seed| Box::pin(async move { unreliable(&kit, seed).await }),
);

/// Every check.
pub const ALL: [Check; 9] = [
    FRAMES_INTACT,
    OVERSIZED,
    RESTART,
    UNREACHABLE,
    GARBAGE,
    SHUTDOWN,
    RPC,
    HIJACK,
    UNRELIABLE,
];

/// Runs `check` against `kit` in its own Tokio task, with [`CHECK_TIMEOUT`].
pub async fn run_check(kit: &Kit, check: &Check, seed: u64) -> Result<Ran, Failure> {
    runner::run_check(kit, check, seed).await
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// A well-formed frame of exactly `len` bytes (at least the prefix and header): a one-way
/// message header and seeded payload bytes. Transports do not decode payloads.
pub fn frame(len: usize, rng: &mut impl RngCore) -> Bytes {
    assert!(
        len >= PREFIX_LEN + HEADER_LEN,
        "a frame holds at least a header"
    );
    let mut buf = BytesMut::with_capacity(len);
    buf.put_u32(u32::try_from(len - PREFIX_LEN).expect("fits the prefix"));
    buf.put_slice(&MAGIC);
    buf.put_u8(WIRE_VERSION);
    buf.put_u8(0); // one-way message
    buf.put_u64(rng.next_u64());
    let mut payload = vec![0u8; len - PREFIX_LEN - HEADER_LEN];
    rng.fill_bytes(&mut payload);
    buf.put_slice(&payload);
    buf.freeze()
}

async fn recv_one(kit: &Kit, t: &SharedTransport, what: &str) -> Incoming {
    match tokio::time::timeout(FRAME_WAIT, t.recv()).await {
        Ok(Ok(incoming)) => incoming,
        Ok(Err(e)) => panic!("{}: recv of {what} failed: {e}", kit.name),
        Err(_) => panic!("{}: {what} did not arrive within {FRAME_WAIT:?}", kit.name),
    }
}

/// Whether `from`, an [`Incoming::from`], names the transport listening at `sender`: either
/// `sender` itself (a connection the receiver dialled, or a transport without connections) or
/// the [inbound address](chorus::transport::inbound_address) of a connection whose hello
/// announced `sender`.
pub fn names(from: &Address, sender: &Address) -> bool {
    from == sender || chorus::transport::inbound_peer(from).as_ref() == Some(sender)
}

/// Receives `expected.len()` frames and checks they are exactly `expected` (in any order: QUIC
/// streams are independent) and all come from `from` (see [`names`]).
async fn expect_frames(kit: &Kit, t: &SharedTransport, from: &Address, expected: &[Bytes]) {
    let mut got = Vec::with_capacity(expected.len());
    for i in 0..expected.len() {
        let incoming = recv_one(kit, t, &format!("frame {i} of {}", expected.len())).await;
        assert!(
            names(&incoming.from, from),
            "{}: frame {i} says it is from {}, not {from}",
            kit.name,
            incoming.from
        );
        got.push(incoming.frame);
    }
    let mut want = expected.to_vec();
    want.sort();
    got.sort();
    assert!(
        want == got,
        "{}: received frames differ from those sent ({} frames)",
        kit.name,
        expected.len()
    );
}

async fn send_ok(kit: &Kit, from: &SharedTransport, to: &Address, frame: Bytes) {
    if let Err(e) = from.send(to, frame).await {
        panic!("{}: send to {to} failed: {e}", kit.name);
    }
}

// ---------------------------------------------------------------------------------------------
// The checks.

/// Frames of seeded sizes, including the smallest, 64 KiB and exactly the maximum, arrive
/// byte for byte, with `from` set to the sender's address.
pub async fn frames_intact(kit: &Kit, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (a, b) = (kit.bind().await, kit.bind().await);
    let smallest = PREFIX_LEN + HEADER_LEN;
    let mut sizes = vec![smallest, 100, 64 * 1024, kit.max_frame_len];
    for _ in 0..40 {
        sizes.push(rng.random_range(smallest..=kit.max_frame_len.min(256 * 1024)));
    }
    let frames: Vec<Bytes> = sizes.iter().map(|&n| frame(n, &mut rng)).collect();
    for f in &frames {
        send_ok(kit, &a, &b.local_addr(), f.clone()).await;
    }
    expect_frames(kit, &b, &a.local_addr(), &frames).await;
    a.close().await;
    b.close().await;
}

/// A frame one byte over the maximum is refused at `send` with `FrameTooLarge`; the frames
/// around it arrive.
pub async fn oversized(kit: &Kit, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (a, b) = (kit.bind().await, kit.bind().await);
    let to = b.local_addr();
    let before = frame(200, &mut rng);
    send_ok(kit, &a, &to, before.clone()).await;
    let big = frame(kit.max_frame_len + 1, &mut rng);
    match a.send(&to, big).await {
        Err(TransportError::FrameTooLarge { len, max }) => {
            assert_eq!(
                (len, max),
                (kit.max_frame_len + 1, kit.max_frame_len),
                "{}",
                kit.name
            );
        }
        other => panic!("{}: oversized frame gave {other:?}", kit.name),
    }
    let after = frame(300, &mut rng);
    send_ok(kit, &a, &to, after.clone()).await;
    expect_frames(kit, &b, &a.local_addr(), &[before, after]).await;
    a.close().await;
    b.close().await;
}

/// After the peer closes and binds the same address again, sends reach the new instance
/// without anyone telling the sender (within 200 attempts, 50 ms apart).
pub async fn restart(kit: &Kit, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (a, b) = (kit.bind().await, kit.bind().await);
    let to = b.local_addr();
    let first = frame(100, &mut rng);
    send_ok(kit, &a, &to, first.clone()).await;
    expect_frames(kit, &b, &a.local_addr(), &[first]).await;
    b.close().await;
    drop(b);
    let b = kit.rebind(&to).await;
    let mut reached = None;
    for attempt in 0..200 {
        // Early sends may fail (the old connection is still being torn down) or be lost with
        // it; both are allowed. What matters is that a later one gets through.
        let f = frame(100, &mut rng);
        let _ = a.send(&to, f.clone()).await;
        if let Ok(Ok(incoming)) = tokio::time::timeout(Duration::from_millis(50), b.recv()).await {
            assert!(
                names(&incoming.from, &a.local_addr()),
                "{}: {}",
                kit.name,
                incoming.from
            );
            reached = Some(attempt);
            break;
        }
    }
    assert!(
        reached.is_some(),
        "{}: the restarted peer was never reached",
        kit.name
    );
    a.close().await;
    b.close().await;
}

/// Sending where nothing listens fails with `Unreachable` or `Timeout` within the configured
/// connect timeout (plus 2 s of slack for a loaded machine), and the transport stays usable.
pub async fn unreachable(kit: &Kit, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (a, b) = (kit.bind().await, kit.bind().await);
    let nowhere = kit.unused_addr();
    let limit = kit.connect_timeout * 2 + Duration::from_secs(2);
    let started = Instant::now();
    let result = tokio::time::timeout(limit, a.send(&nowhere, frame(100, &mut rng))).await;
    match result {
        Ok(Err(TransportError::Unreachable { addr, .. }))
        | Ok(Err(TransportError::Timeout { addr, .. })) => {
            assert_eq!(addr, nowhere, "{}", kit.name);
        }
        Ok(other) => panic!("{}: send to {nowhere} gave {other:?}", kit.name),
        Err(_) => panic!(
            "{}: send to {nowhere} neither failed nor succeeded within {limit:?}",
            kit.name
        ),
    }
    assert!(started.elapsed() <= limit, "{}", kit.name);
    let ok = frame(100, &mut rng);
    send_ok(kit, &a, &b.local_addr(), ok.clone()).await;
    expect_frames(kit, &b, &a.local_addr(), &[ok]).await;
    a.close().await;
    b.close().await;
}

/// Raw sockets send garbage; the transport closes those connections (TCP: the raw socket sees
/// end of stream) and keeps serving a peer connected before and a peer connecting after.
pub async fn garbage(kit: &Kit, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (a, b) = (kit.bind().await, kit.bind().await);
    let to = b.local_addr();
    let first = frame(100, &mut rng);
    send_ok(kit, &a, &to, first.clone()).await;
    expect_frames(kit, &b, &a.local_addr(), &[first]).await;
    match kit.raw {
        Raw::None => {}
        Raw::Tcp => tcp_garbage(kit, &to, &mut rng).await,
        Raw::Udp => {
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("udp socket");
            for len in [1usize, 40, 1200, 1500] {
                let mut junk = vec![0u8; len];
                rng.fill_bytes(&mut junk);
                // A QUIC long header with an unknown version, then junk.
                if len >= 5 {
                    junk[0] = 0xC0;
                    junk[1..5].copy_from_slice(&0x1a2a_3a4au32.to_be_bytes());
                }
                socket.send_to(&junk, to.as_str()).await.expect("udp send");
            }
        }
    }
    let second = frame(100, &mut rng);
    send_ok(kit, &a, &to, second.clone()).await;
    expect_frames(kit, &b, &a.local_addr(), &[second]).await;
    let c = kit.bind().await;
    let third = frame(100, &mut rng);
    send_ok(kit, &c, &to, third.clone()).await;
    expect_frames(kit, &b, &c.local_addr(), &[third]).await;
    a.close().await;
    b.close().await;
    c.close().await;
}

async fn tcp_garbage(kit: &Kit, to: &Address, rng: &mut ChaCha8Rng) {
    let hello = {
        let addr = b"127.0.0.1:1";
        let magic = chorus::transport_tcp::HELLO_MAGIC;
        let mut h = Vec::new();
        h.extend_from_slice(
            &u32::try_from(magic.len() + addr.len())
                .unwrap_or(0)
                .to_be_bytes(),
        );
        h.extend_from_slice(&magic);
        h.extend_from_slice(addr);
        h
    };
    let mut junk = vec![0u8; 64];
    rng.fill_bytes(&mut junk);
    let mut oversized = hello.clone();
    oversized.extend_from_slice(&u32::MAX.to_be_bytes());
    let mut bad_magic = hello.clone();
    let mut f = frame(64, rng).to_vec();
    f[PREFIX_LEN] ^= 0xFF;
    bad_magic.extend_from_slice(&f);
    for (what, bytes) in [
        ("random bytes", junk),
        ("an oversized length prefix", oversized),
        ("a frame without the magic", bad_magic),
    ] {
        let mut raw = tokio::net::TcpStream::connect(to.as_str())
            .await
            .expect("raw connect");
        raw.write_all(&bytes).await.expect("raw write");
        let mut sink = [0u8; 64];
        let closed = tokio::time::timeout(FRAME_WAIT, async {
            loop {
                match raw.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "{}: a connection sending {what} was not closed within {FRAME_WAIT:?}",
            kit.name
        );
    }
}

/// Frames accepted by `send` right before `close` all arrive; after `close`, `send` fails with
/// `Closed`.
pub async fn shutdown(kit: &Kit, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (a, b) = (kit.bind().await, kit.bind().await);
    let to = b.local_addr();
    let frames: Vec<Bytes> = (0..500)
        .map(|_| {
            let n = rng.random_range(PREFIX_LEN + HEADER_LEN..4096);
            frame(n, &mut rng)
        })
        .collect();
    for f in &frames {
        send_ok(kit, &a, &to, f.clone()).await;
    }
    let from = a.local_addr();
    a.close().await;
    match a.send(&to, frame(100, &mut rng)).await {
        Err(TransportError::Closed) => {}
        other => panic!("{}: send after close gave {other:?}", kit.name),
    }
    expect_frames(kit, &b, &from, &frames).await;
    b.close().await;
}

/// Requests in both directions over [`RpcEndpoint`]: `a` asks `b` (over `a`'s connection),
/// then `b` asks `a` back, both at the address `a`'s requests came from (over the same
/// connection) and at `a`'s listen address.
pub async fn rpc(kit: &Kit, _seed: u64) {
    let (a, b) = (kit.bind().await, kit.bind().await);
    let b_addr = b.local_addr();
    let (ea, inbound_a) = RpcEndpoint::start(a, RpcConfig::default());
    let (eb, inbound_b) = RpcEndpoint::start(b, RpcConfig::default());
    // Each server records where its requests came from, as it sees them.
    let serve = |endpoint: RpcEndpoint<SharedTransport, ReplicaMessage>,
                 mut inbound: tokio::sync::mpsc::Receiver<
        chorus::runtime::rpc::Inbound<ReplicaMessage>,
    >| {
        let callers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&callers);
        tokio::spawn(async move {
            while let Some(request) = inbound.recv().await {
                let reply = match &request.message {
                    ReplicaMessage::Read { keys, .. } if keys.len() == 1 => {
                        ReplicaMessage::Refused(Refusal::Invalid {
                            reason: format!("echo {}", String::from_utf8_lossy(&keys[0].0)),
                        })
                    }
                    _ => ReplicaMessage::Refused(Refusal::Invalid {
                        reason: "unexpected".to_owned(),
                    }),
                };
                seen.lock().expect("callers").push(request.from.clone());
                let _ = endpoint.respond(&request, &reply).await;
            }
        });
        callers
    };
    let timeout = Duration::from_secs(10);
    // a -> b, 32 requests in flight at once.
    let callers_b = serve(eb.clone(), inbound_b);
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..32 {
        let (ea, to) = (ea.clone(), b_addr.clone());
        requests.spawn(async move {
            let key = Bytes::from(format!("k{i}"));
            (
                i,
                ea.request(&to, &ReplicaMessage::read_one(key), timeout)
                    .await,
            )
        });
    }
    while let Some(done) = requests.join_next().await {
        let (i, reply) = done.expect("request task");
        match reply {
            Ok(ReplicaMessage::Refused(Refusal::Invalid { reason })) => {
                assert_eq!(reason, format!("echo k{i}"), "{}", kit.name)
            }
            other => panic!("{}: request {i} to b gave {other:?}", kit.name),
        }
    }
    let a_addr = ea.local_addr();
    let callers: Vec<Address> = callers_b.lock().expect("callers").clone();
    assert_eq!(callers.len(), 32, "{}", kit.name);
    assert!(
        callers.iter().all(|c| names(c, &a_addr)),
        "{}: b saw requests from {callers:?}, not only {a_addr}",
        kit.name
    );
    // b -> a: at the address a's requests came from (back over a's connection), then at a's
    // listen address (over whatever connection b uses for it).
    let _callers_a = serve(ea.clone(), inbound_a);
    for (what, to) in [
        ("the address a's requests came from", callers[0].clone()),
        ("a's listen address", a_addr.clone()),
    ] {
        let reply = eb
            .request(
                &to,
                &ReplicaMessage::read_one(Bytes::from_static(b"back")),
                timeout,
            )
            .await;
        match reply {
            Ok(ReplicaMessage::Refused(Refusal::Invalid { reason })) => {
                assert_eq!(reason, "echo back", "{}: {what}", kit.name)
            }
            other => panic!(
                "{}: request from b to {what} ({to}) gave {other:?}",
                kit.name
            ),
        }
    }
    ea.close().await;
    eb.close().await;
}

/// A third transport announces `b`'s address as its own (an impostor, or a second node
/// configured with the same `advertise` address) and sends `a` a frame. `a` answers it at the
/// address it came from, which reaches the impostor; then `a` sends to `b`'s address, and that
/// frame reaches the real `b` (over a connection `a` dials), not the impostor. Skipped where
/// no one can claim another's address (in process).
pub async fn hijack(kit: &Kit, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (a, b) = (kit.bind().await, kit.bind().await);
    let b_addr = b.local_addr();
    let Some(impostor) = kit.bind_claiming(&b_addr).await else {
        a.close().await;
        b.close().await;
        return;
    };
    assert_eq!(impostor.local_addr(), b_addr, "{}", kit.name);
    let claim = frame(100, &mut rng);
    send_ok(kit, &impostor, &a.local_addr(), claim.clone()).await;
    let got = recv_one(kit, &a, "the impostor's frame").await;
    assert_eq!(got.frame, claim, "{}", kit.name);
    // The reply to the impostor's frame goes back to the impostor.
    let reply = frame(120, &mut rng);
    send_ok(kit, &a, &got.from, reply.clone()).await;
    let back = recv_one(kit, &impostor, "a's reply to the impostor").await;
    assert_eq!(back.frame, reply, "{}", kit.name);
    // Traffic for b's address goes to b. Had the impostor's connection become a's route to
    // b, this frame would have gone to the impostor and never reached b.
    let for_b = frame(140, &mut rng);
    send_ok(kit, &a, &b_addr, for_b.clone()).await;
    let at_b = recv_one(kit, &b, "a's frame for b").await;
    assert_eq!(at_b.frame, for_b, "{}", kit.name);
    assert!(names(&at_b.from, &a.local_addr()), "{}", kit.name);
    a.close().await;
    b.close().await;
    impostor.close().await;
}

/// `send_unreliable` on a quiet loopback: small frames (datagrams where the transport has
/// them) and one of the maximum size (too large for a datagram) arrive intact and from the
/// sender. A transport may lose such frames on a real network; nothing here loses packets.
pub async fn unreliable(kit: &Kit, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (a, b) = (kit.bind().await, kit.bind().await);
    let to = b.local_addr();
    // The first one connects (a transport without a connection sends it reliably).
    let first = frame(100, &mut rng);
    if let Err(e) = a.send_unreliable(&to, first.clone()).await {
        panic!("{}: send_unreliable to {to} failed: {e}", kit.name);
    }
    expect_frames(kit, &b, &a.local_addr(), &[first]).await;
    let mut frames: Vec<Bytes> = (0..20)
        .map(|_| {
            let n = rng.random_range(PREFIX_LEN + HEADER_LEN..512);
            frame(n, &mut rng)
        })
        .collect();
    frames.push(frame(kit.max_frame_len, &mut rng));
    for f in &frames {
        if let Err(e) = a.send_unreliable(&to, f.clone()).await {
            panic!("{}: send_unreliable to {to} failed: {e}", kit.name);
        }
    }
    expect_frames(kit, &b, &a.local_addr(), &frames).await;
    a.close().await;
    b.close().await;
}
