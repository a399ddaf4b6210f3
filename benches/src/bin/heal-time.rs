//! `heal-time`: measured figures of healing and handoff in a real in-process cluster of
//! `chorus::Node`s (memory backend, the in-process transport with its fault injection, the
//! real clock, the `local` membership preset, insecure mode), on a two-worker tokio runtime.
//!
//! ```text
//! cargo run --release -p chorus-benches --bin heal-time -- --scenario partition|handoff|tree|tree-cpu [--runs K] [flags]
//! ```
//!
//! - **`partition`**: 3 nodes, N = 3. `--keys` records (`--value-len` bytes) are loaded into
//!   every replica's storage before the nodes start (identical replicas). Node 3 is then cut
//!   off from nodes 1 and 2 for `--partition-secs` while both sides write overwrites of
//!   random loaded keys at `--rate` puts/s each: the majority through nodes 1 and 2 at W = 2
//!   (quorum), the minority through node 3 at W = 1 (a quorum cannot be met there; W = 1 is
//!   what lets both sides accept writes). The writers stop, the records that differ between
//!   the replicas are counted (full scans), the network heals, and the figure is the time
//!   until the three storages hold identical records (a one-bucket digest of the whole ring
//!   of every storage, read directly every `--poll-ms`: no client read, so no read repair),
//!   confirmed by a full scan of every storage. Hinted handoff, the applied-writes log and
//!   Merkle anti-entropy are all on (node defaults), with `--ae-interval-secs` (default 600,
//!   the node default). A run that has not converged after `--max-converge-secs` is reported
//!   as such, with the records still differing.
//! - **`handoff`**: 3 nodes loaded as above with `--keys` records; an open-loop client load
//!   of `--load-rate` ops/s (half quorum puts, half quorum gets, random loaded keys, through
//!   the three nodes in turn) runs for `--secs` without a join (the baseline), then a 4th
//!   node with empty storage joins (join handoff pulls its ranges from their current
//!   replicas) while the load goes on. The pull's throughput is the `join_pulled` records
//!   (and the bytes the joiner's transport received) after the first applied page was seen
//!   (polled every 5 ms) up to the end of the join (`joins_completed`), over that time; the
//!   load's latencies (from each op's scheduled start, so a stall counts in full) of the ops
//!   due in that time are compared with the baseline's. Each run does this
//!   twice, on fresh clusters: with the default `anti_entropy_bandwidth` and with
//!   `--high-bandwidth-mib`.
//! - **`tree`**: put throughput of a 3-node cluster (N = 3, W = 2) with `anti_entropy` off,
//!   with the applied-writes log only (`merkle_anti_entropy = false`) and with the log and
//!   the Merkle trees (the default), all three in the same run (the order rotates every
//!   run), fresh cluster each time: `--concurrency` closed-loop clients put random keys of a
//!   1M-key space through the three nodes in turn, 1 s of warm-up, then `--secs` measured.
//!   The trees' cost is the ratio of the last two.
//! - **`tree-cpu`**: the same three variants, but an open-loop load at a fixed `--put-rate`
//!   puts/s (below saturation, so no queue overflows and no timeouts skew the variants)
//!   for `--secs` after 1 s of warm-up; the figure is the process's CPU time (user and
//!   system, all threads, from `/proc/self/stat`) per acknowledged put. The cluster is the
//!   only thing in the process, so that is the three nodes' CPU per replicated put; the
//!   trees' cost is the CPU per put with them over the CPU per put with the log only.
//!
//! `--only off|log|both` runs one variant of `tree` or `tree-cpu` alone, with no ratios (for
//! a profiler). `--queue` sets the frames each node's in-process receive queue holds (default
//! 1,024, the transport's default); a full queue drops the frame, as a congested network
//! would.

use std::collections::HashMap;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus::membership::{MemberState, MembershipConfig};
use chorus::runtime::inproc::{
    DEFAULT_QUEUE_CAPACITY, InProcessConfig, InProcessNetwork, InProcessTransport,
};
use chorus::storage::ScanCursor;
use chorus::transport::{Incoming, TransportError};
use chorus::{
    Address, Consistency, HashRange, Node, NodeConfig, NodeId, NodeStats, ReadOptions, Record,
    SecurityConfig, SharedStorage, SharedTransport, Storage, StorageSpec, Timestamp, Transport,
    Version, WriteOptions,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Debug)]
struct Args {
    scenario: String,
    runs: usize,
    keys: usize,
    value_len: usize,
    partition_secs: u64,
    rate: u64,
    ae_interval_secs: u64,
    max_converge_secs: u64,
    poll_ms: u64,
    load_rate: u64,
    put_rate: u64,
    queue: usize,
    only: Option<Healing>,
    secs: u64,
    high_bandwidth_mib: u64,
    concurrency: usize,
    seed: u64,
}

fn args() -> Args {
    let mut a = Args {
        scenario: String::new(),
        runs: 3,
        keys: 100_000,
        value_len: 100,
        partition_secs: 60,
        rate: 500,
        ae_interval_secs: 600,
        max_converge_secs: 120,
        poll_ms: 100,
        load_rate: 1000,
        put_rate: 20_000,
        queue: DEFAULT_QUEUE_CAPACITY.get(),
        only: None,
        secs: 5,
        high_bandwidth_mib: 256,
        concurrency: 64,
        seed: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        if flag == "--only" {
            a.only = Some(match value.as_str() {
                "off" => Healing::Off,
                "log" => Healing::LogOnly,
                "both" => Healing::LogAndTrees,
                other => panic!("--only off|log|both, not `{other}`"),
            });
            continue;
        }
        if flag == "--scenario" {
            a.scenario = value;
            continue;
        }
        let n: u64 = value
            .parse()
            .unwrap_or_else(|_| panic!("{flag} needs a number"));
        match flag.as_str() {
            "--runs" => a.runs = n as usize,
            "--keys" => a.keys = n as usize,
            "--value-len" => a.value_len = n as usize,
            "--partition-secs" => a.partition_secs = n,
            "--rate" => a.rate = n,
            "--ae-interval-secs" => a.ae_interval_secs = n,
            "--max-converge-secs" => a.max_converge_secs = n,
            "--poll-ms" => a.poll_ms = n,
            "--load-rate" => a.load_rate = n,
            "--put-rate" => a.put_rate = n,
            "--queue" => a.queue = n as usize,
            "--secs" => a.secs = n,
            "--high-bandwidth-mib" => a.high_bandwidth_mib = n,
            "--concurrency" => a.concurrency = n as usize,
            "--seed" => a.seed = n,
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

// ---------------------------------------------------------------------------------------
// The cluster.

/// An in-process transport that counts the bytes of the frames it receives.
#[derive(Debug)]
struct Counting {
    inner: InProcessTransport,
    received: Arc<AtomicU64>,
}

impl Transport for Counting {
    fn local_addr(&self) -> Address {
        self.inner.local_addr()
    }
    fn max_frame_len(&self) -> usize {
        self.inner.max_frame_len()
    }
    async fn send(&self, to: &Address, frame: Bytes) -> Result<(), TransportError> {
        self.inner.send(to, frame).await
    }
    async fn recv(&self) -> Result<Incoming, TransportError> {
        let incoming = self.inner.recv().await?;
        self.received
            .fetch_add(incoming.frame.len() as u64, Ordering::Relaxed);
        Ok(incoming)
    }
    async fn close(&self) {
        self.inner.close().await;
    }
}

fn addr(i: usize) -> Address {
    Address::new(format!("node-{}:7946", i + 1))
}

fn base_config() -> NodeConfig {
    let mut c = NodeConfig::default();
    c.security = SecurityConfig::insecure();
    c.membership = chorus::runtime::node::MembershipPreset::Local;
    c.request_timeout = Duration::from_secs(1);
    c.shutdown_timeout = Duration::from_secs(5);
    // Above the request timeout plus the local preset's gossip spread (as the tests do).
    c.join_settle = Duration::from_millis(1500);
    c
}

struct Cluster {
    net: InProcessNetwork,
    nodes: Vec<Node>,
    storages: Vec<SharedStorage>,
    received: Vec<Arc<AtomicU64>>,
}

fn memory() -> SharedStorage {
    chorus::registry()
        .open_backend(&StorageSpec::new("memory"))
        .expect("memory backend")
}

impl Cluster {
    /// An empty cluster on an in-process network whose receive queues hold `queue` frames.
    fn new(seed: u64, queue: usize) -> Cluster {
        let queue = NonZeroUsize::new(queue).expect("--queue must be positive");
        Cluster {
            net: InProcessNetwork::with_config(
                seed,
                InProcessConfig::default().with_queue_capacity(queue),
            ),
            nodes: Vec::new(),
            storages: Vec::new(),
            received: Vec::new(),
        }
    }

    /// Starts node `self.nodes.len()` on `storage` with `config`, joining through the others.
    async fn add(&mut self, config: &NodeConfig, storage: SharedStorage, seed: u64) {
        let i = self.nodes.len();
        let received = Arc::new(AtomicU64::new(0));
        let transport = SharedTransport::new(Counting {
            inner: self.net.bind(addr(i)).expect("bind"),
            received: received.clone(),
        });
        let seeds: Vec<String> = (0..i).take(3).map(|j| addr(j).to_string()).collect();
        let mut config = config.clone();
        config.id = NodeId(i as u64 + 1);
        let node = chorus::node()
            .config(config)
            .seeds(seeds)
            .storage(storage.clone())
            .transport(transport)
            .membership(MembershipConfig::local())
            .rng_seed(seed ^ ((i as u64 + 1) << 32))
            .start()
            .await
            .expect("node starts");
        self.nodes.push(node);
        self.storages.push(storage);
        self.received.push(received);
    }

    /// Every node's ring holds `n` members, all alive, none joining, ownership settled.
    fn settled(&self, n: usize) -> bool {
        self.nodes.iter().all(|node| {
            let ring = node.ring();
            node.ownership_settled()
                && ring.len() == n
                && ring
                    .iter()
                    .all(|o| o.state == MemberState::Alive && !o.joining)
        })
    }

    async fn wait_settled(&self, limit: Duration) -> Duration {
        let start = Instant::now();
        let n = self.nodes.len();
        while !self.settled(n) {
            assert!(
                start.elapsed() < limit,
                "rings did not settle on {n} members within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        start.elapsed()
    }

    async fn kill(self) {
        for node in &self.nodes {
            node.kill().await;
        }
    }

    fn stats_sum(&self) -> NodeStats {
        let mut s = NodeStats::default();
        for node in &self.nodes {
            let n = node.stats();
            s.hints_stored += n.hints_stored;
            s.hints_delivered += n.hints_delivered;
            s.hints_pending += n.hints_pending;
            s.hints_dropped_expired += n.hints_dropped_expired;
            s.hints_dropped_full += n.hints_dropped_full;
            s.hints_dropped_overload += n.hints_dropped_overload;
            s.sync_offers += n.sync_offers;
            s.sync_repairs += n.sync_repairs;
            s.sync_overtaken += n.sync_overtaken;
            s.merkle_requested += n.merkle_requested;
            s.merkle_ring_changes += n.merkle_ring_changes;
            s.merkle_exchanges += n.merkle_exchanges;
            s.merkle_failures += n.merkle_failures;
            s.merkle_repairs += n.merkle_repairs;
            s.merkle_bytes_sent += n.merkle_bytes_sent;
            s.merkle_leaves_differing += n.merkle_leaves_differing;
            s.read_repairs += n.read_repairs;
            s.reads += n.reads;
            s.writes += n.writes;
            s.timeouts += n.timeouts;
            s.unavailable += n.unavailable;
            s.failed += n.failed;
        }
        s
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

fn key(i: usize) -> Bytes {
    Bytes::from(format!("key-{i:010}"))
}

fn value(len: usize, tag: u64) -> Bytes {
    let mut v = vec![b'x'; len.max(8)];
    v[..8].copy_from_slice(&tag.to_le_bytes());
    Bytes::from(v)
}

/// `keys` records in each of `n` fresh memory stores, the same version everywhere.
async fn loaded_stores(n: usize, keys: usize, value_len: usize) -> Vec<SharedStorage> {
    let stores: Vec<SharedStorage> = (0..n).map(|_| memory()).collect();
    let version = Version::new(Timestamp::new(now_ms(), 0), NodeId(1));
    let mut i = 0;
    while i < keys {
        let end = (i + 1024).min(keys);
        let batch: Vec<(Bytes, Record)> = (i..end)
            .map(|k| (key(k), Record::value(value(value_len, k as u64), version)))
            .collect();
        for s in &stores {
            s.apply_batch(batch.clone()).await.expect("apply");
        }
        i = end;
    }
    stores
}

/// Every record of `storage`, by key.
async fn contents(storage: &SharedStorage) -> HashMap<Bytes, Record> {
    let mut out = HashMap::new();
    let mut cursor: Option<ScanCursor> = None;
    loop {
        let page = storage
            .scan(
                HashRange::FULL,
                cursor,
                NonZeroUsize::new(4096).expect("non-zero"),
            )
            .await
            .expect("scan");
        for e in page.entries {
            out.insert(e.key, e.record);
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => return out,
        }
    }
}

/// Keys whose records differ between any two of `stores` (or that some lack).
async fn differing(stores: &[SharedStorage]) -> usize {
    let mut all = Vec::new();
    for s in stores {
        all.push(contents(s).await);
    }
    let mut keys: std::collections::HashSet<&Bytes> = std::collections::HashSet::new();
    for c in &all {
        keys.extend(c.keys());
    }
    keys.into_iter()
        .filter(|k| {
            let first = all[0].get(*k);
            all.iter().any(|c| c.get(*k) != first)
        })
        .count()
}

/// Whether the one-bucket digests of the whole ring agree on every store.
async fn digests_agree(stores: &[SharedStorage]) -> bool {
    let mut first = None;
    for s in stores {
        let d = s
            .digest(HashRange::FULL, NonZeroU32::MIN)
            .await
            .expect("digest")[0];
        match first {
            None => first = Some(d),
            Some(f) if f != d => return false,
            Some(_) => {}
        }
    }
    true
}

/// A small xorshift generator: the load's keys.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if !n.is_multiple_of(2) {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn quantile_us(v: &mut [u64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i] as f64
}

// ---------------------------------------------------------------------------------------
// Scenario a: a partition with writes on both sides, then the time to converge.

struct PartitionRun {
    writes_majority: u64,
    writes_minority: u64,
    failed_writes: u64,
    differing_at_heal: usize,
    membership_healed: Option<Duration>,
    converged: Option<Duration>,
    differing_at_end: usize,
    stats: NodeStats,
}

/// Puts at `rate` per second through `nodes` in turn at `consistency` until `stop`; returns
/// (acknowledged, failed).
async fn steady_writer(
    nodes: Vec<Node>,
    rate: u64,
    consistency: Consistency,
    keys: usize,
    value_len: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> (u64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut rng = Rng(seed | 1);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let permit = in_flight.clone().acquire_owned().await.expect("open");
        let node = nodes[n as usize % nodes.len()].clone();
        let k = key(rng.below(keys));
        let v = value(value_len, n);
        let (ok, failed) = (ok.clone(), failed.clone());
        tokio::spawn(async move {
            match node
                .put(k, v, WriteOptions::default().consistency(consistency))
                .await
            {
                Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                Err(_) => failed.fetch_add(1, Ordering::Relaxed),
            };
            drop(permit);
        });
        n += 1;
    }
    // Every write in flight ends (its deadline is the request timeout).
    let _all = in_flight.acquire_many(256).await.expect("open");
    (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

async fn partition_run(a: &Args, run: usize) -> PartitionRun {
    let mut config = base_config();
    config.anti_entropy_interval = Duration::from_secs(a.ae_interval_secs);
    let stores = loaded_stores(3, a.keys, a.value_len).await;
    let mut cluster = Cluster::new(a.seed + run as u64, a.queue);
    for s in stores {
        cluster.add(&config, s, a.seed + run as u64).await;
    }
    cluster.wait_settled(Duration::from_secs(60)).await;

    cluster.net.partition(&[addr(2)], &[addr(0), addr(1)]);
    let stop = Arc::new(AtomicBool::new(false));
    let majority = tokio::spawn(steady_writer(
        cluster.nodes[..2].to_vec(),
        a.rate,
        Consistency::Quorum,
        a.keys,
        a.value_len,
        0x9e37_79b9 + run as u64,
        stop.clone(),
    ));
    let minority = tokio::spawn(steady_writer(
        cluster.nodes[2..].to_vec(),
        a.rate,
        Consistency::One,
        a.keys,
        a.value_len,
        0x7f4a_7c15 + run as u64,
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(a.partition_secs)).await;
    stop.store(true, Ordering::Relaxed);
    let (maj_ok, maj_failed) = majority.await.expect("writer");
    let (min_ok, min_failed) = minority.await.expect("writer");
    let differing_at_heal = differing(&cluster.storages).await;

    cluster.net.heal();
    let healed = Instant::now();
    let limit = Duration::from_secs(a.max_converge_secs);
    let mut membership_healed = None;
    let mut converged = None;
    while healed.elapsed() < limit {
        if membership_healed.is_none() && cluster.settled(3) {
            membership_healed = Some(healed.elapsed());
        }
        if digests_agree(&cluster.storages).await {
            converged = Some(healed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(a.poll_ms)).await;
    }
    // The membership may take longer than the data: wait for it too (within the limit).
    // `HEAL_TIME_TRACE=1` prints every change of the nodes' views meanwhile.
    let trace = std::env::var_os("HEAL_TIME_TRACE").is_some();
    let mut last = String::new();
    while membership_healed.is_none() && healed.elapsed() < limit {
        if trace {
            let views: Vec<String> = cluster
                .nodes
                .iter()
                .map(|node| {
                    let ring: Vec<_> = node
                        .ring()
                        .iter()
                        .map(|o| {
                            format!(
                                "{}:{:?}{}",
                                o.id.0,
                                o.state,
                                if o.joining { "+j" } else { "" }
                            )
                        })
                        .collect();
                    format!(
                        "n{} settled={} [{}] forgotten_refused={}",
                        node.id().0,
                        node.ownership_settled(),
                        ring.join(" "),
                        node.membership_stats().forgotten_refused
                    )
                })
                .collect();
            let now = views.join(" | ");
            if now != last {
                eprintln!("{:7.2} s  {now}", healed.elapsed().as_secs_f64());
                last = now;
            }
        }
        if cluster.settled(3) {
            membership_healed = Some(healed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(a.poll_ms)).await;
    }
    if membership_healed.is_none() {
        for node in &cluster.nodes {
            eprintln!(
                "node {}: settled {} ring {:?}",
                node.id().0,
                node.ownership_settled(),
                node.ring()
            );
        }
    }
    let differing_at_end = differing(&cluster.storages).await;
    if converged.is_some() {
        assert_eq!(
            differing_at_end, 0,
            "the digests agreed but a full scan found differing records"
        );
    }
    let stats = cluster.stats_sum();
    cluster.kill().await;
    PartitionRun {
        writes_majority: maj_ok,
        writes_minority: min_ok,
        failed_writes: maj_failed + min_failed,
        differing_at_heal,
        membership_healed,
        converged,
        differing_at_end,
        stats,
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "not yet".into(), |d| format!("{:.2}", d.as_secs_f64()))
}

async fn partition(a: &Args) {
    println!(
        "# heal-time partition: 3 nodes, N=3, {} keys x {} B loaded, node 3 cut off {} s, \
         writes {} puts/s on each side (majority W=2 via nodes 1-2, minority W=1 via node 3), \
         anti_entropy_interval {} s, hinted handoff on, poll every {} ms",
        a.keys, a.value_len, a.partition_secs, a.rate, a.ae_interval_secs, a.poll_ms
    );
    println!(
        "| run | writes acked majority / minority (failed) | keys differing at heal | \
         membership whole (s) | converged (s) | differing at end | hints stored / delivered / pending | \
         sync offers / repairs | merkle exchanges (failed) / repairs / bytes sent | read repairs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut times = Vec::new();
    for run in 0..a.runs {
        let r = partition_run(a, run).await;
        let s = r.stats;
        println!(
            "| {run} | {} / {} ({}) | {} | {} | {} | {} | {} / {} / {} | {} / {} | {} ({}) / {} / {} | {} |",
            r.writes_majority,
            r.writes_minority,
            r.failed_writes,
            r.differing_at_heal,
            secs(r.membership_healed),
            secs(r.converged),
            r.differing_at_end,
            s.hints_stored,
            s.hints_delivered,
            s.hints_pending,
            s.sync_offers,
            s.sync_repairs,
            s.merkle_exchanges,
            s.merkle_failures,
            s.merkle_repairs,
            s.merkle_bytes_sent,
            s.read_repairs,
        );
        if let Some(t) = r.converged {
            times.push(t.as_secs_f64());
        }
    }
    println!(
        "median convergence after heal: {:.2} s ({} of {} runs converged within {} s)",
        median(&mut times),
        times.len(),
        a.runs,
        a.max_converge_secs
    );
}

// ---------------------------------------------------------------------------------------
// Scenario b: a join's pull under a steady foreground load.

/// One op of the foreground load: when it was due and how long it took from then.
#[derive(Clone, Copy)]
struct Op {
    due: Instant,
    micros: u64,
    put: bool,
    ok: bool,
}

/// Ops at `rate` a second until `stop`, open loop (each op its own task, due on a fixed
/// schedule of 1 ms ticks, the timer's resolution, so a stall counts in full): puts, and
/// with `gets` every other op a quorum get, of random keys of a `keys`-key space through the
/// nodes in turn.
async fn open_loop(
    nodes: Vec<Node>,
    (rate, gets): (u64, bool),
    (keys, value_len): (usize, usize),
    stop: Arc<AtomicBool>,
    sink: Arc<Mutex<Vec<Op>>>,
) {
    let per_tick = rate as f64 / 1000.0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (mut n, mut owed) = (0u64, 0.0f64);
    let mut tasks = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let due: Instant = tick.tick().await.into_std();
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            let node = nodes[n as usize % nodes.len()].clone();
            let k = key(rng.below(keys));
            let put = !gets || n.is_multiple_of(2);
            let v = value(value_len, n);
            let sink = sink.clone();
            tasks.push(tokio::spawn(async move {
                let ok = if put {
                    node.put(k, v, WriteOptions::default()).await.is_ok()
                } else {
                    node.get(k, ReadOptions::default()).await.is_ok()
                };
                let micros = due.elapsed().as_micros() as u64;
                sink.lock().expect("sink").push(Op {
                    due,
                    micros,
                    put,
                    ok,
                });
            }));
            n += 1;
        }
        if tasks.len() >= 4096 {
            tasks.retain(|t| !t.is_finished());
        }
    }
    for t in tasks {
        let _ = t.await;
    }
}

struct Latency {
    ops: usize,
    failed: usize,
    put_p50: f64,
    put_p99: f64,
    get_p50: f64,
    get_p99: f64,
    all_p99: f64,
}

fn latency(ops: &[Op], from: Instant, to: Instant) -> Latency {
    let window: Vec<&Op> = ops.iter().filter(|o| o.due >= from && o.due < to).collect();
    let mut puts: Vec<u64> = window.iter().filter(|o| o.put).map(|o| o.micros).collect();
    let mut gets: Vec<u64> = window.iter().filter(|o| !o.put).map(|o| o.micros).collect();
    let mut all: Vec<u64> = window.iter().map(|o| o.micros).collect();
    Latency {
        ops: window.len(),
        failed: window.iter().filter(|o| !o.ok).count(),
        put_p50: quantile_us(&mut puts, 0.5),
        put_p99: quantile_us(&mut puts, 0.99),
        get_p50: quantile_us(&mut gets, 0.5),
        get_p99: quantile_us(&mut gets, 0.99),
        all_p99: quantile_us(&mut all, 0.99),
    }
}

struct HandoffRun {
    pulled: u64,
    /// Pulled after the first page was seen: what `pull_secs` timed.
    pulled_timed: u64,
    received_bytes: u64,
    pull_secs: f64,
    join_secs: f64,
    base: Latency,
    during: Latency,
    incomplete: u64,
    pull_failures: u64,
}

async fn handoff_run(a: &Args, run: usize, bandwidth: u64) -> HandoffRun {
    let mut config = base_config();
    config.anti_entropy_bandwidth = NonZeroU64::new(bandwidth).expect("non-zero");
    let stores = loaded_stores(3, a.keys, a.value_len).await;
    let seed = a.seed + run as u64;
    let mut cluster = Cluster::new(seed, a.queue);
    for s in stores {
        cluster.add(&config, s, seed).await;
    }
    cluster.wait_settled(Duration::from_secs(60)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let sink = Arc::new(Mutex::new(Vec::new()));
    let load = tokio::spawn(open_loop(
        cluster.nodes.clone(),
        (a.load_rate, true),
        (a.keys, a.value_len),
        stop.clone(),
        sink.clone(),
    ));
    // Half a second for the load to start, then the baseline window.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.secs)).await;
    let base_to = Instant::now();

    let join_start = Instant::now();
    cluster.add(&config, memory(), seed).await;
    let joiner = cluster.nodes[3].clone();
    let received = cluster.received[3].clone();
    // (when, records pulled, bytes received) at the first applied page.
    let mut pull_start: Option<(Instant, u64, u64)> = None;
    let limit = Duration::from_secs(240);
    loop {
        let s = joiner.stats();
        if pull_start.is_none() && s.join_pulled > 0 {
            pull_start = Some((
                Instant::now(),
                s.join_pulled,
                received.load(Ordering::Relaxed),
            ));
        }
        if s.joins_completed > 0 {
            break;
        }
        assert!(
            join_start.elapsed() < limit,
            "the join did not end within {limit:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let end = Instant::now();
    let end_received = received.load(Ordering::Relaxed);
    // The load goes on a moment more, so that ops due before `end` that a starved generator
    // had not issued yet are issued (late, and timed from when they were due).
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.expect("load");
    let s = joiner.stats();
    let (from, from_pulled, from_received) =
        pull_start.unwrap_or((end, s.join_pulled, end_received));
    let ops = sink.lock().expect("sink").clone();
    let r = HandoffRun {
        pulled: s.join_pulled,
        pulled_timed: s.join_pulled - from_pulled,
        received_bytes: end_received - from_received,
        pull_secs: (end - from).as_secs_f64(),
        join_secs: (end - join_start).as_secs_f64(),
        base: latency(&ops, base_from, base_to),
        during: latency(&ops, from, end),
        incomplete: s.join_incomplete,
        pull_failures: s.join_pull_failures,
    };
    cluster.kill().await;
    r
}

async fn handoff(a: &Args) {
    let default_bw = NodeConfig::default().anti_entropy_bandwidth.get();
    let high_bw = a.high_bandwidth_mib << 20;
    println!(
        "# heal-time handoff: 3 nodes loaded with {} keys x {} B, a 4th joins; foreground \
         {} ops/s (half quorum puts, half quorum gets) through nodes 1-3; baseline {} s \
         before the join; latencies in us from each op's scheduled start",
        a.keys, a.value_len, a.load_rate, a.secs
    );
    println!(
        "| run | bandwidth (MiB/s) | pulled records | pull (s) | join total (s) | records/s | \
         MB/s received | failed/incomplete pulls | baseline put p50/p99 | get p50/p99 | all p99 | \
         during pull put p50/p99 | get p50/p99 | all p99 | p99 ratio | ops failed base/pull |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    // Per bandwidth: records/s, MB/s and p99 ratios of the runs.
    type Series = (u64, Vec<f64>, Vec<f64>, Vec<f64>);
    let mut per_bw: Vec<Series> = vec![
        (default_bw, Vec::new(), Vec::new(), Vec::new()),
        (high_bw, Vec::new(), Vec::new(), Vec::new()),
    ];
    for run in 0..a.runs {
        // The order of the two settings flips every run.
        let order: [usize; 2] = if run.is_multiple_of(2) {
            [0, 1]
        } else {
            [1, 0]
        };
        for which in order {
            let bw = per_bw[which].0;
            let r = handoff_run(a, run, bw).await;
            let rps = r.pulled_timed as f64 / r.pull_secs;
            let mbps = r.received_bytes as f64 / r.pull_secs / 1e6;
            let ratio = r.during.all_p99 / r.base.all_p99;
            println!(
                "| {run} | {} | {} | {:.2} | {:.2} | {:.0} | {:.1} | {}/{} | {:.0}/{:.0} | {:.0}/{:.0} | {:.0} | {:.0}/{:.0} | {:.0}/{:.0} | {:.0} | {:.2} | {}/{} of {}/{} |",
                bw >> 20,
                r.pulled,
                r.pull_secs,
                r.join_secs,
                rps,
                mbps,
                r.pull_failures,
                r.incomplete,
                r.base.put_p50,
                r.base.put_p99,
                r.base.get_p50,
                r.base.get_p99,
                r.base.all_p99,
                r.during.put_p50,
                r.during.put_p99,
                r.during.get_p50,
                r.during.get_p99,
                r.during.all_p99,
                ratio,
                r.base.failed,
                r.during.failed,
                r.base.ops,
                r.during.ops,
            );
            per_bw[which].1.push(rps);
            per_bw[which].2.push(mbps);
            per_bw[which].3.push(ratio);
        }
    }
    for (bw, rps, mbps, ratio) in &mut per_bw {
        println!(
            "median at {} MiB/s: {:.0} records/s, {:.1} MB/s received, p99 during pull / baseline {:.2}",
            *bw >> 20,
            median(rps),
            median(mbps),
            median(ratio)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Scenario c: put throughput with anti-entropy off, with the applied-writes log only
// (`merkle_anti_entropy = false`), and with both (the default).

/// What of anti-entropy a `tree` run keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Healing {
    Off,
    LogOnly,
    LogAndTrees,
}

/// A fresh, settled 3-node cluster of empty memory nodes with `healing`'s switches.
async fn tree_cluster(a: &Args, run: usize, healing: Healing) -> Cluster {
    let mut config = base_config();
    config.anti_entropy = healing != Healing::Off;
    config.merkle_anti_entropy = healing == Healing::LogAndTrees;
    // Empty nodes: nothing to pull, and the cluster is up sooner.
    config.join_handoff = false;
    let seed = a.seed + run as u64;
    let mut cluster = Cluster::new(seed, a.queue);
    for _ in 0..3 {
        cluster.add(&config, memory(), seed).await;
    }
    cluster.wait_settled(Duration::from_secs(60)).await;
    cluster
}

async fn tree_run(a: &Args, run: usize, healing: Healing) -> (f64, u64) {
    let anti_entropy = format!("{healing:?}");
    let cluster = tree_cluster(a, run, healing).await;
    let count = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    if std::env::var_os("HEAL_TIME_WATCH").is_some() {
        tasks.push(watch(&cluster, healing, stop.clone()));
    }
    for c in 0..a.concurrency {
        let node = cluster.nodes[c % 3].clone();
        let (count, failed, stop) = (count.clone(), failed.clone(), stop.clone());
        let value_len = a.value_len;
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (c as u64 + 1));
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let k = key(rng.below(1_000_000));
                match node
                    .put(k, value(value_len, n), WriteOptions::default())
                    .await
                {
                    Ok(_) => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("{healing:?}: first failed put: {e}");
                        }
                    }
                }
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c0 = count.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.secs)).await;
    let c1 = count.load(Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let f = failed.load(Ordering::Relaxed);
    if f > 0 {
        let not_sent: u64 = cluster
            .nodes
            .iter()
            .map(|n| n.stats().replies_not_sent)
            .sum();
        eprintln!(
            "{anti_entropy}: {f} failed puts; replies not sent {not_sent}; network {:?}",
            cluster.net.stats()
        );
    }
    if healing != Healing::Off {
        // What the applied-writes log did meanwhile (the part of the cost that is not the
        // tree), summed over the nodes.
        let all: Vec<NodeStats> = cluster.nodes.iter().map(|n| n.stats()).collect();
        let sum = |f: fn(&NodeStats) -> u64| all.iter().map(f).sum::<u64>();
        eprintln!(
            "{anti_entropy}: sync offers {}, early rounds {}, sync repairs {}, merkle exchanges {}, replica applies {}",
            sum(|s| s.sync_offers),
            sum(|s| s.sync_early_rounds),
            sum(|s| s.sync_repairs),
            sum(|s| s.merkle_exchanges),
            sum(|s| s.replica_applied),
        );
    }
    cluster.kill().await;
    ((c1 - c0) as f64 / elapsed, f)
}

/// With `HEAL_TIME_WATCH` set: every second until `stop`, the process's resident memory and
/// the counters that could explain its growth (summed over the nodes) on stderr.
fn watch(
    cluster: &Cluster,
    healing: Healing,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let nodes = cluster.nodes.clone();
    let net = cluster.net.clone();
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let rss_kb = std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
                })
                .unwrap_or_default();
            let all: Vec<NodeStats> = nodes.iter().map(|n| n.stats()).collect();
            let sum = |f: fn(&NodeStats) -> u64| all.iter().map(f).sum::<u64>();
            eprintln!(
                "watch {healing:?}: rss {rss_kb} kB, late answers {} deferred {}, replies not sent {}, \
                 hints pending {} stored {} dropped {}, sync repairs {} overtaken {}, merkle \
                 exchanges {} repairs {} bytes {}, busy {} deferred {}, network {:?}",
                sum(|s| s.late_answers),
                sum(|s| s.deferred_pending),
                sum(|s| s.replies_not_sent),
                sum(|s| s.hints_pending),
                sum(|s| s.hints_stored),
                sum(|s| s.hints_dropped_full + s.hints_dropped_overload),
                sum(|s| s.sync_repairs),
                sum(|s| s.sync_overtaken),
                sum(|s| s.merkle_exchanges),
                sum(|s| s.merkle_repairs),
                sum(|s| s.merkle_bytes_sent),
                sum(|s| s.healing_busy),
                sum(|s| s.healing_deferred),
                net.stats(),
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

async fn tree(a: &Args) {
    if let Some(healing) = a.only {
        // One variant alone (for a profiler): no ratios.
        for run in 0..a.runs {
            let (puts, failed) = tree_run(a, run, healing).await;
            println!("{healing:?} run {run}: {puts:.0} puts/s, {failed} failed");
        }
        return;
    }
    println!(
        "# heal-time tree: 3 nodes, N=3, W=2, memory backend, {} closed-loop clients, puts of \
         {} B values to random keys of 1M, {} s measured after 1 s warm-up, fresh cluster each",
        a.concurrency, a.value_len, a.secs
    );
    println!(
        "| run | puts/s anti_entropy off | log only | log and trees | log / off | trees: \
         (log and trees) / log | (log and trees) / off | failed off/log/both |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let (mut log_ratios, mut tree_ratios, mut all_ratios) = (Vec::new(), Vec::new(), Vec::new());
    let modes = [Healing::Off, Healing::LogOnly, Healing::LogAndTrees];
    for run in 0..a.runs {
        // The order rotates every run, so no variant always runs first (or last).
        let mut results = [(0.0, 0); 3];
        for i in 0..3 {
            let m = (i + run) % 3;
            results[m] = tree_run(a, run, modes[m]).await;
        }
        let [off, log, both] = results;
        let (l, t, b) = (log.0 / off.0, both.0 / log.0, both.0 / off.0);
        println!(
            "| {run} | {:.0} | {:.0} | {:.0} | {l:.3} | {t:.3} | {b:.3} | {}/{}/{} |",
            off.0, log.0, both.0, off.1, log.1, both.1
        );
        log_ratios.push(l);
        tree_ratios.push(t);
        all_ratios.push(b);
    }
    println!(
        "medians: log / off {:.3}, trees (log and trees) / log {:.3}, (log and trees) / off {:.3}",
        median(&mut log_ratios),
        median(&mut tree_ratios),
        median(&mut all_ratios)
    );
}

/// The process's CPU time so far (user and system, every thread), from `/proc/self/stat`.
fn process_cpu(ticks_per_sec: f64) -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of proc(5), utime and stime; `rest` starts at field 3.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_secs_f64(ticks as f64 / ticks_per_sec)
}

/// The kernel's clock ticks per second, the unit of `/proc/self/stat`'s times.
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// One `tree-cpu` measurement.
struct CpuRun {
    /// Acknowledged puts a second in the measured window.
    puts_per_sec: f64,
    /// The process's CPU time per acknowledged put in the window, in microseconds.
    cpu_us_per_put: f64,
    /// The process's CPU use in the window, in cores.
    cores: f64,
    failed: u64,
    put_p99_us: f64,
}

async fn tree_cpu_run(a: &Args, run: usize, healing: Healing, ticks: f64) -> CpuRun {
    let cluster = tree_cluster(a, run, healing).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sink = Arc::new(Mutex::new(Vec::new()));
    let load = tokio::spawn(open_loop(
        cluster.nodes.clone(),
        (a.put_rate, false),
        (1_000_000, a.value_len),
        stop.clone(),
        sink.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (t0, cpu0) = (Instant::now(), process_cpu(ticks));
    tokio::time::sleep(Duration::from_secs(a.secs)).await;
    let (t1, cpu1) = (Instant::now(), process_cpu(ticks));
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    let ops = sink.lock().expect("sink").clone();
    // The puts due in the window; their work falls (almost all) inside it.
    let window: Vec<&Op> = ops.iter().filter(|o| o.due >= t0 && o.due < t1).collect();
    let acked = window.iter().filter(|o| o.ok).count() as f64;
    let failed = window.iter().filter(|o| !o.ok).count() as u64;
    let mut micros: Vec<u64> = window.iter().map(|o| o.micros).collect();
    let secs = (t1 - t0).as_secs_f64();
    let cpu = (cpu1 - cpu0).as_secs_f64();
    if std::env::var_os("HEAL_TIME_WATCH").is_some() {
        let all: Vec<NodeStats> = cluster.nodes.iter().map(|n| n.stats()).collect();
        let sum = |f: fn(&NodeStats) -> u64| all.iter().map(f).sum::<u64>();
        eprintln!(
            "{healing:?}: sync offers {}, sync repairs {}, merkle exchanges {}, replica applies {}, network {:?}",
            sum(|s| s.sync_offers),
            sum(|s| s.sync_repairs),
            sum(|s| s.merkle_exchanges),
            sum(|s| s.replica_applied),
            cluster.net.stats(),
        );
    }
    cluster.kill().await;
    CpuRun {
        puts_per_sec: acked / secs,
        cpu_us_per_put: cpu * 1e6 / acked.max(1.0),
        cores: cpu / secs,
        failed,
        put_p99_us: quantile_us(&mut micros, 0.99),
    }
}

async fn tree_cpu(a: &Args) {
    let ticks = clock_ticks();
    if let Some(healing) = a.only {
        for run in 0..a.runs {
            let r = tree_cpu_run(a, run, healing, ticks).await;
            println!(
                "{healing:?} run {run}: {:.2} us CPU/put, {:.0} puts/s, {:.2} cores, {} failed",
                r.cpu_us_per_put, r.puts_per_sec, r.cores, r.failed
            );
        }
        return;
    }
    println!(
        "# heal-time tree-cpu: 3 nodes, N=3, W=2, memory backend, {} puts/s open loop of {} B values to random keys of 1M, {} s measured after 1 s warm-up, fresh cluster each; process CPU ({} ticks/s) per acknowledged put",
        a.put_rate, a.value_len, a.secs, ticks
    );
    println!(
        "| run | CPU us/put off | log only | log and trees | trees: (log and trees) / log | trees: (log and trees) - log, us/put | log / off | puts/s off/log/both | cores off/log/both | failed off/log/both | put p99 ms off/log/both |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let (mut tree_ratios, mut log_ratios, mut tree_extra) = (Vec::new(), Vec::new(), Vec::new());
    let modes = [Healing::Off, Healing::LogOnly, Healing::LogAndTrees];
    for run in 0..a.runs {
        let mut results: [Option<CpuRun>; 3] = [None, None, None];
        for i in 0..3 {
            let m = (i + run) % 3;
            results[m] = Some(tree_cpu_run(a, run, modes[m], ticks).await);
        }
        let [off, log, both] = results.map(|r| r.expect("every variant ran"));
        let (t, l) = (
            both.cpu_us_per_put / log.cpu_us_per_put,
            log.cpu_us_per_put / off.cpu_us_per_put,
        );
        println!(
            "| {run} | {:.2} | {:.2} | {:.2} | {t:.3} | {:+.2} | {l:.3} | {:.0}/{:.0}/{:.0} | {:.2}/{:.2}/{:.2} | {}/{}/{} | {:.1}/{:.1}/{:.1} |",
            off.cpu_us_per_put,
            log.cpu_us_per_put,
            both.cpu_us_per_put,
            both.cpu_us_per_put - log.cpu_us_per_put,
            off.puts_per_sec,
            log.puts_per_sec,
            both.puts_per_sec,
            off.cores,
            log.cores,
            both.cores,
            off.failed,
            log.failed,
            both.failed,
            off.put_p99_us / 1000.0,
            log.put_p99_us / 1000.0,
            both.put_p99_us / 1000.0,
        );
        tree_ratios.push(t);
        log_ratios.push(l);
        tree_extra.push(both.cpu_us_per_put - log.cpu_us_per_put);
    }
    println!(
        "medians: CPU per put, trees (log and trees) / log {:.3} ({:+.2} us/put), log / off {:.3}",
        median(&mut tree_ratios),
        median(&mut tree_extra),
        median(&mut log_ratios)
    );
}

fn main() {
    let a = args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    runtime.block_on(async {
        match a.scenario.as_str() {
            "partition" => partition(&a).await,
            "handoff" => handoff(&a).await,
            "tree" => tree(&a).await,
            "tree-cpu" => tree_cpu(&a).await,
            other => panic!("--scenario partition|handoff|tree|tree-cpu, not `{other}`"),
        }
    });
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
}
