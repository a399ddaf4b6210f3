//! Transport load generator: one-way frames/s and request/response round trips/s over loopback,
//! for tcp, tcp-tls (TLS 1.3 pinned to a keyring) and quic, 100 B and 64 KiB payloads, 1, 64 and 256 in flight.
//!
//! Run (prints a Markdown table of medians; see docs/BENCHMARKS.md):
//!
//! ```text
//! cargo bench -p chorus-benches --bench transport -- [--runs 3] [--secs 2] [FILTER...]
//! ```
//!
//! A filter keeps the cases whose name (`tcp/one-way/100B/64`) contains it.
//!
//! - **one-way**: `N` tasks call `send` in a loop on node A; node B counts what `recv` returns.
//!   The rate is frames received per second over the measuring window.
//! - **round trips**: `N` tasks on A each issue `RpcEndpoint::request` and wait for its
//!   response before the next (so `N` requests in flight); B's endpoint answers each request
//!   with a message of the same size. The rate is completed requests per second.
//!
//! Both nodes run in this process on one multi-threaded Tokio runtime with 2 workers, so they
//! share the machine's 2 cores. Each case binds fresh transports, warms up for 0.5 s, then
//! measures for `--secs`. With `--runs R`, all cases run once, then again, R times; the table
//! shows the median and every run's figure.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus::Transport;
use chorus::identity::Address;
use chorus::replication::ReplicaMessage;
use chorus::runtime::rpc::{RpcConfig, RpcEndpoint};
use chorus::transport_quic::{Identity, QuicConfig, QuicTransport, TrustedPeers};
use chorus::transport_tcp::{TcpConfig, TcpTransport};
use chorus::wire::{self, Header};

const WARM_UP: Duration = Duration::from_millis(500);
const MAX_FRAME: usize = 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Tcp,
    /// TCP with TLS 1.3, keyed by Ed25519 identities and pinned to a keyring.
    TcpTls,
    Quic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    OneWay,
    RoundTrip,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    kind: Kind,
    mode: Mode,
    payload: usize,
    in_flight: usize,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            match self.kind {
                Kind::Tcp => "tcp",
                Kind::TcpTls => "tcp-tls",
                Kind::Quic => "quic",
            },
            match self.mode {
                Mode::OneWay => "one-way",
                Mode::RoundTrip => "round-trip",
            },
            if self.payload >= 1024 {
                format!("{}KiB", self.payload / 1024)
            } else {
                format!("{}B", self.payload)
            },
            self.in_flight
        )
    }
}

fn tcp_config() -> TcpConfig {
    let mut config = TcpConfig::local().with_max_frame_len(MAX_FRAME);
    config.close_timeout = Duration::from_millis(200);
    config.queue_capacity = NonZeroUsize::new(4096).expect("non-zero");
    config
}

fn quic_config() -> QuicConfig {
    let mut config = QuicConfig::local();
    config.max_frame_len = MAX_FRAME;
    config.close_timeout = Duration::from_millis(200);
    config.queue_wait = Duration::from_secs(2);
    config
}

async fn tcp_pair() -> (TcpTransport, TcpTransport) {
    let a = TcpTransport::bind("127.0.0.1:0", tcp_config())
        .await
        .expect("bind");
    let b = TcpTransport::bind("127.0.0.1:0", tcp_config())
        .await
        .expect("bind");
    (a, b)
}

async fn tcp_tls_pair() -> (TcpTransport, TcpTransport) {
    let (ia, ib) = (
        chorus::Identity::from_secret([1; 32]),
        chorus::Identity::from_secret([2; 32]),
    );
    let keyring = chorus::peer_auth::SharedKeyring::new(
        chorus::Keyring::from_keys([ia.public_key(), ib.public_key()]).expect("keyring"),
    );
    let bind = |id: chorus::Identity| {
        let auth = chorus::peer_auth::ChannelAuth::new(id, keyring.clone());
        async move {
            TcpTransport::bind_authenticated("127.0.0.1:0", tcp_config(), auth)
                .await
                .expect("bind")
        }
    };
    let (a, b) = (bind(ia).await, bind(ib).await);
    assert!(a.is_tls() && b.is_tls());
    (a, b)
}

async fn quic_pair() -> (QuicTransport, QuicTransport) {
    let (ia, ib) = (
        Identity::generate(&[]).expect("identity"),
        Identity::generate(&[]).expect("identity"),
    );
    let trust = |peer: &Identity| {
        let mut t = TrustedPeers::new();
        t.add(peer.certificate());
        t
    };
    let a = QuicTransport::bind("127.0.0.1:0", quic_config(), ia.clone(), trust(&ib))
        .await
        .expect("bind");
    let b = QuicTransport::bind("127.0.0.1:0", quic_config(), ib, trust(&ia))
        .await
        .expect("bind");
    (a, b)
}

fn message(payload: usize) -> ReplicaMessage {
    ReplicaMessage::read_one(Bytes::from(vec![0xA5u8; payload]))
}

/// Counts from `counter` over the measuring window, after the warm-up.
async fn measure(counter: &AtomicU64, secs: Duration) -> f64 {
    tokio::time::sleep(WARM_UP).await;
    let (c0, t0) = (counter.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(secs).await;
    let (c1, t1) = (counter.load(Ordering::Relaxed), Instant::now());
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
}

async fn one_way<T: Transport>(a: T, b: T, case: Case, secs: Duration) -> f64 {
    let frame = wire::encode(Header::message(), &message(case.payload), MAX_FRAME).expect("frame");
    let (a, b) = (Arc::new(a), Arc::new(b));
    let to = b.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let receiver = {
        let (b, received) = (Arc::clone(&b), Arc::clone(&received));
        tokio::spawn(async move {
            while b.recv().await.is_ok() {
                received.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut senders = Vec::new();
    for _ in 0..case.in_flight {
        let (a, to, frame, stop) = (Arc::clone(&a), to.clone(), frame.clone(), Arc::clone(&stop));
        senders.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if a.send(&to, frame.clone()).await.is_err() {
                    // Backpressure (QueueFull): yield and try again.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }));
    }
    let rate = measure(&received, secs).await;
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        let _ = s.await;
    }
    b.close().await;
    a.close().await;
    receiver.abort();
    rate
}

async fn round_trips<T: Transport>(a: T, b: T, case: Case, secs: Duration) -> f64 {
    let to: Address = b.local_addr();
    let (ea, _inbound_a) = RpcEndpoint::start(a, RpcConfig::default());
    let (eb, mut inbound_b) = RpcEndpoint::<_, ReplicaMessage>::start(b, RpcConfig::default());
    let server = {
        let eb = eb.clone();
        tokio::spawn(async move {
            while let Some(request) = inbound_b.recv().await {
                let _ = eb.respond(&request, &request.message).await;
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let request = Arc::new(message(case.payload));
    let mut clients = Vec::new();
    for _ in 0..case.in_flight {
        let (ea, to, stop, done, request) = (
            ea.clone(),
            to.clone(),
            Arc::clone(&stop),
            Arc::clone(&done),
            Arc::clone(&request),
        );
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if ea
                    .request(&to, &request, Duration::from_secs(5))
                    .await
                    .is_ok()
                {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let rate = measure(&done, secs).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    ea.close().await;
    eb.close().await;
    server.abort();
    rate
}

async fn run(case: Case, secs: Duration) -> f64 {
    match (case.kind, case.mode) {
        (Kind::Tcp, Mode::OneWay) => {
            let (a, b) = tcp_pair().await;
            one_way(a, b, case, secs).await
        }
        (Kind::Tcp, Mode::RoundTrip) => {
            let (a, b) = tcp_pair().await;
            round_trips(a, b, case, secs).await
        }
        (Kind::TcpTls, Mode::OneWay) => {
            let (a, b) = tcp_tls_pair().await;
            one_way(a, b, case, secs).await
        }
        (Kind::TcpTls, Mode::RoundTrip) => {
            let (a, b) = tcp_tls_pair().await;
            round_trips(a, b, case, secs).await
        }
        (Kind::Quic, Mode::OneWay) => {
            let (a, b) = quic_pair().await;
            one_way(a, b, case, secs).await
        }
        (Kind::Quic, Mode::RoundTrip) => {
            let (a, b) = quic_pair().await;
            round_trips(a, b, case, secs).await
        }
    }
}

fn main() {
    let mut runs = 3usize;
    let mut secs = Duration::from_secs(2);
    let mut filters = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--secs" => {
                secs = Duration::from_secs_f64(
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .expect("--secs SECONDS"),
                )
            }
            "--bench" => {}
            other if other.starts_with("--") => {}
            filter => filters.push(filter.to_owned()),
        }
    }
    let mut cases = Vec::new();
    for kind in [Kind::Tcp, Kind::TcpTls, Kind::Quic] {
        for mode in [Mode::OneWay, Mode::RoundTrip] {
            for payload in [100, 64 * 1024] {
                for in_flight in [1, 64, 256] {
                    let case = Case {
                        kind,
                        mode,
                        payload,
                        in_flight,
                    };
                    if filters.is_empty() || filters.iter().any(|f| case.name().contains(f)) {
                        cases.push(case);
                    }
                }
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for run_no in 0..runs {
        for (case, rates) in cases.iter().zip(results.iter_mut()) {
            let rate = runtime.block_on(run(*case, secs));
            eprintln!("run {}/{runs} {}: {rate:.0}/s", run_no + 1, case.name());
            rates.push(rate);
        }
    }
    println!("| case | median of {runs} runs | per-run | MB/s (median) |");
    println!("|---|---|---|---|");
    for (case, rates) in cases.iter().zip(&results) {
        let mut sorted = rates.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        let per_run: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
        let mb = median * case.payload as f64 / 1e6;
        println!(
            "| `{}` | {median:.0}/s | {} | {mb:.1} |",
            case.name(),
            per_run.join(", ")
        );
    }
    // TLS against plain TCP, run by run (the same run's cases are minutes apart at most).
    let plain = |c: &Case| {
        cases
            .iter()
            .position(|p| {
                p.kind == Kind::Tcp
                    && p.mode == c.mode
                    && p.payload == c.payload
                    && p.in_flight == c.in_flight
            })
            .map(|i| &results[i])
    };
    let mut header = false;
    for (case, rates) in cases.iter().zip(&results) {
        let Some(base) = (case.kind == Kind::TcpTls).then(|| plain(case)).flatten() else {
            continue;
        };
        if !header {
            println!();
            println!("| case | tcp-tls / tcp, median of the per-run ratios | per-run |");
            println!("|---|---|---|");
            header = true;
        }
        let mut ratios: Vec<f64> = rates.iter().zip(base).map(|(t, p)| t / p).collect();
        let per_run: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        ratios.sort_by(f64::total_cmp);
        println!(
            "| `{}` | {:.2}x | {} |",
            case.name(),
            ratios[ratios.len() / 2],
            per_run.join(", ")
        );
    }
}
