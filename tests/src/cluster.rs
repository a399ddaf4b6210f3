//! In-process clusters of real [`Node`]s for whole-cluster tests: the in-process network with
//! its seeded faults, one skewable clock per node that follows tokio's (pausable) clock, and
//! storage that outlives a node so a killed node restarts with its data, as after a crash of
//! its process on a durable disk.
//!
//! With the `memory` backend a node's store is one memory store
//! kept for the whole cluster; each life of the node gets a [`KeptStorage`] handle to it that
//! a kill closes (the dead life can no longer read or write) while the records and metadata
//! stay for the next life. The handle reports [`Durability::PowerLoss`], as a durable disk
//! would, so nodes persist their clock floor and generation in it.
//!
//! Run the tests on a current-thread runtime with paused time (`#[tokio::test(start_paused =
//! true)]`): timers then fire in virtual time, so seconds of membership and timeouts cost
//! milliseconds, and a run replays closely from its seed (tokio's own scheduling is the one
//! source of variation left).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use chorus::hlc::WallClock;
use chorus::membership::{MemberState, MembershipConfig};
use chorus::runtime::inproc::InProcessNetwork;
use chorus::runtime::node::{NodeConfig, PlantedBugs};
use chorus::storage::{
    ApplyOutcome, Capabilities, Durability, PurgeStats, RangeDigest, ScanCursor, ScanPage,
    StorageStats,
};
use chorus::{
    Address, HashRange, Node, Record, SharedStorage, SharedTransport, Storage, StorageError,
    StorageSpec,
};
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::AtomicBool;

/// One life's handle to a store that outlives the life: [`Storage::close`] closes the handle
/// (every later call fails with [`StorageError::Closed`]) and leaves the store and its data
/// alone, like a process crash on a durable disk. Reports [`Durability::PowerLoss`].
#[derive(Debug)]
pub struct KeptStorage {
    inner: SharedStorage,
    closed: AtomicBool,
    /// Milliseconds (virtual time) each scan waits before it runs.
    scan_delay_ms: Arc<AtomicU64>,
}

impl KeptStorage {
    /// A new life's handle to `inner`.
    pub fn life(inner: SharedStorage) -> SharedStorage {
        Self::life_with_scan_delay(inner, Arc::default())
    }

    /// A new life's handle to `inner` whose scans each wait `scan_delay_ms` first (read at
    /// every scan, so the test can change it), as a slow disk's would.
    pub fn life_with_scan_delay(
        inner: SharedStorage,
        scan_delay_ms: Arc<AtomicU64>,
    ) -> SharedStorage {
        SharedStorage::new(KeptStorage {
            inner,
            closed: AtomicBool::new(false),
            scan_delay_ms,
        })
    }

    fn open(&self) -> Result<&SharedStorage, StorageError> {
        if self.closed.load(Ordering::Acquire) {
            Err(StorageError::Closed)
        } else {
            Ok(&self.inner)
        }
    }
}

impl Storage for KeptStorage {
    fn capabilities(&self) -> Capabilities {
        let mut c = self.inner.capabilities();
        c.durability = Durability::PowerLoss;
        c
    }
    async fn get(&self, key: &[u8]) -> Result<Option<Record>, StorageError> {
        self.open()?.get(key).await
    }
    async fn apply(&self, key: bytes::Bytes, record: Record) -> Result<ApplyOutcome, StorageError> {
        self.open()?.apply(key, record).await
    }
    async fn apply_batch(
        &self,
        writes: Vec<(bytes::Bytes, Record)>,
    ) -> Result<Vec<ApplyOutcome>, StorageError> {
        self.open()?.apply_batch(writes).await
    }
    async fn load_meta(&self, name: &str) -> Result<Option<bytes::Bytes>, StorageError> {
        self.open()?.load_meta(name).await
    }
    async fn store_meta(&self, name: &str, value: bytes::Bytes) -> Result<(), StorageError> {
        self.open()?.store_meta(name, value).await
    }
    async fn store_hints(&self, hints: Vec<(u64, bytes::Bytes)>) -> Result<(), StorageError> {
        self.open()?.store_hints(hints).await
    }
    async fn load_hints(&self) -> Result<Vec<(u64, bytes::Bytes)>, StorageError> {
        self.open()?.load_hints().await
    }
    async fn remove_hints(&self, ids: Vec<u64>) -> Result<(), StorageError> {
        self.open()?.remove_hints(ids).await
    }
    async fn remove_if_version(
        &self,
        key: &[u8],
        version: chorus::Version,
    ) -> Result<bool, StorageError> {
        self.open()?.remove_if_version(key, version).await
    }
    async fn scan(
        &self,
        range: HashRange,
        cursor: Option<ScanCursor>,
        limit: NonZeroUsize,
    ) -> Result<ScanPage, StorageError> {
        let delay = self.scan_delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        self.open()?.scan(range, cursor, limit).await
    }
    async fn digest(
        &self,
        range: HashRange,
        buckets: NonZeroU32,
    ) -> Result<Vec<RangeDigest>, StorageError> {
        self.open()?.digest(range, buckets).await
    }
    async fn purge(&self, now_ms: u64, grace: Duration) -> Result<PurgeStats, StorageError> {
        self.open()?.purge(now_ms, grace).await
    }
    async fn stats(&self) -> Result<StorageStats, StorageError> {
        self.open()?.stats().await
    }
    async fn flush(&self) -> Result<(), StorageError> {
        self.open()?.flush().await
    }
    async fn close(&self) -> Result<(), StorageError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Err(StorageError::Closed);
        }
        Ok(())
    }
}

/// A wall clock that follows tokio's clock (virtual when paused), from a fixed epoch, plus a
/// skew the test can change at any time.
#[derive(Debug)]
pub struct TestClock {
    epoch_ms: u64,
    start: tokio::time::Instant,
    skew_ms: AtomicI64,
}

/// 2026-01-01T00:00:00Z: the clocks' start, so versions look like real ones.
pub const EPOCH_MS: u64 = 1_767_225_600_000;

impl TestClock {
    /// A clock at [`EPOCH_MS`] now, without skew.
    pub fn new() -> Arc<TestClock> {
        Arc::new(TestClock {
            epoch_ms: EPOCH_MS,
            start: tokio::time::Instant::now(),
            skew_ms: AtomicI64::new(0),
        })
    }

    /// Sets the skew (positive: ahead of true time).
    pub fn set_skew(&self, skew: i64) {
        self.skew_ms.store(skew, Ordering::Relaxed);
    }

    /// The skew.
    pub fn skew(&self) -> i64 {
        self.skew_ms.load(Ordering::Relaxed)
    }

    /// True time (without the skew), in milliseconds.
    pub fn true_ms(&self) -> u64 {
        self.epoch_ms + self.start.elapsed().as_millis() as u64
    }
}

impl WallClock for TestClock {
    fn now_ms(&self) -> u64 {
        self.true_ms().saturating_add_signed(self.skew())
    }
}

/// What a [`Cluster`] is started with.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Nodes.
    pub nodes: usize,
    /// Network and membership seed.
    pub seed: u64,
    /// The nodes' configuration, except id (1-based index), transport and seeds.
    pub config: NodeConfig,
    /// Membership timings.
    pub membership: MembershipConfig,
    /// Bugs planted in every node.
    pub bugs: PlantedBugs,
    /// Backend each node opens (its data outlives the node); `memory` keeps one instance.
    pub storage: StorageSpec,
}

impl ClusterSpec {
    /// `nodes` nodes, N = 3, quorum reads and writes, 1 s timeouts, the `local` membership
    /// preset, memory storage.
    pub fn new(nodes: usize, seed: u64) -> Self {
        let mut config = NodeConfig::default();
        // The history tests check replication, not authentication (the core's swim_auth and
        // the transports' TLS tests do): ids stay 1..=n.
        config.security = chorus::SecurityConfig::insecure();
        config.request_timeout = Duration::from_secs(1);
        config.shutdown_timeout = Duration::from_secs(5);
        // Above the request timeout plus the local preset's gossip spread.
        config.join_settle = Duration::from_millis(1500);
        ClusterSpec {
            nodes,
            seed,
            config,
            membership: MembershipConfig::local(),
            bugs: PlantedBugs::default(),
            storage: StorageSpec::new("memory"),
        }
    }
}

/// A running in-process cluster.
pub struct Cluster {
    /// The network between the nodes (faults go here).
    pub net: InProcessNetwork,
    /// Each node's clock.
    pub clocks: Vec<Arc<TestClock>>,
    spec: ClusterSpec,
    nodes: Vec<Option<Node>>,
    storages: Vec<Option<SharedStorage>>,
    data_dirs: Vec<Option<tempfile::TempDir>>,
    scan_delays: Vec<Arc<AtomicU64>>,
    restarts: u64,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("seed", &self.spec.seed)
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Starts every node (node 1 forms the cluster, the others join through it) and waits
    /// until every node's ring holds every node.
    pub async fn start(spec: ClusterSpec) -> Cluster {
        let nodes = spec.nodes;
        Cluster::start_first(spec, nodes).await
    }

    /// Starts the first `count` nodes only, as [`Cluster::start`]; the others can join later
    /// ([`Cluster::join`]).
    pub async fn start_first(spec: ClusterSpec, count: usize) -> Cluster {
        let mut cluster = Cluster {
            net: InProcessNetwork::new(spec.seed),
            clocks: (0..spec.nodes).map(|_| TestClock::new()).collect(),
            nodes: (0..spec.nodes).map(|_| None).collect(),
            storages: (0..spec.nodes).map(|_| None).collect(),
            data_dirs: (0..spec.nodes).map(|_| None).collect(),
            scan_delays: (0..spec.nodes).map(|_| Arc::default()).collect(),
            spec,
            restarts: 0,
        };
        for i in 0..count.min(cluster.spec.nodes) {
            cluster.boot(i).await;
        }
        cluster.wait_for_ring(Duration::from_secs(30)).await;
        cluster
    }

    /// The address of node `i` (0-based).
    pub fn addr(i: usize) -> Address {
        Address::new(format!("node-{}:7946", i + 1))
    }

    /// Node `i`, if running.
    pub fn node(&self, i: usize) -> &Node {
        self.nodes[i]
            .as_ref()
            .unwrap_or_else(|| panic!("node {i} is not running"))
    }

    /// Whether node `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].is_some()
    }

    /// Nodes in the cluster, running or not.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s storage (kept across kills; with `memory`, the store itself, readable while
    /// the node is down).
    pub fn storage(&self, i: usize) -> &SharedStorage {
        self.storages[i].as_ref().expect("storage opened")
    }

    /// Makes every storage scan of node `i` wait `delay` (virtual time) first, from now on
    /// and across restarts, as a slow disk would: with the `memory` backend only.
    pub fn set_scan_delay(&self, i: usize, delay: Duration) {
        assert_eq!(
            self.spec.storage.scheme, "memory",
            "scan delays need `memory`"
        );
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.scan_delays[i].store(ms, Ordering::Relaxed);
    }

    /// Node `i`'s storage, if it was ever opened (a node that never ran has none).
    pub fn storage_if_opened(&self, i: usize) -> Option<&SharedStorage> {
        self.storages[i].as_ref()
    }

    async fn boot(&mut self, i: usize) {
        let memory = self.spec.storage.scheme == "memory";
        let storage = match &self.storages[i] {
            Some(s) if memory => s.clone(),
            _ => {
                let mut spec = self.spec.storage.clone();
                if spec.scheme != "memory" && spec.scheme != "moka" {
                    if self.data_dirs[i].is_none() {
                        self.data_dirs[i] = Some(tempfile::tempdir().expect("temp dir"));
                    }
                    spec.path = Some(self.data_dirs[i].as_ref().expect("dir").path().into());
                }
                chorus::registry()
                    .open_backend(&spec)
                    .expect("storage opens")
            }
        };
        self.storages[i] = Some(storage.clone());
        let storage = if memory {
            KeptStorage::life_with_scan_delay(storage, self.scan_delays[i].clone())
        } else {
            storage
        };
        let transport = SharedTransport::new(self.net.bind(Self::addr(i)).expect("bind"));
        let seeds: Vec<String> = (0..self.nodes.len())
            .filter(|&j| j != i && (self.nodes[j].is_some() || j == 0))
            .take(3)
            .map(|j| Self::addr(j).to_string())
            .collect();
        let mut config = self.spec.config.clone();
        config.id = chorus::NodeId(i as u64 + 1);
        let node = chorus::node()
            .config(config)
            .seeds(seeds)
            .storage(storage)
            .transport(transport)
            .clock(self.clocks[i].clone())
            .membership(self.spec.membership)
            .rng_seed(self.spec.seed ^ ((i as u64 + 1) << 32) ^ self.restarts)
            .planted_bugs(self.spec.bugs)
            .start()
            .await
            .expect("node starts");
        self.nodes[i] = Some(node);
    }

    /// Stops node `i` at once, as a crash: no leave, requests in flight abandoned. Its storage
    /// is kept (reopened on restart for persistent backends).
    pub async fn kill(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            node.kill().await;
            if self.spec.storage.scheme != "memory" {
                self.storages[i] = None;
            }
        }
    }

    /// Starts node `i`, which never ran, with empty storage: it joins the running nodes.
    pub async fn join(&mut self, i: usize) {
        assert!(
            self.nodes[i].is_none() && self.storages[i].is_none(),
            "node {i} ran before"
        );
        self.boot(i).await;
    }

    /// Starts node `i` again with its storage.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "node {i} is running");
        self.restarts += 1;
        self.boot(i).await;
    }

    /// Starts one more node, with an empty store, joining through the running ones; returns
    /// its index. Wait for the rings with [`Cluster::wait_for_ring`].
    pub async fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        // In step with the others' true time, as a real machine's clock would be.
        let now_ms = self.clocks.first().map_or(EPOCH_MS, |c| c.true_ms());
        self.clocks.push(Arc::new(TestClock {
            epoch_ms: now_ms,
            start: tokio::time::Instant::now(),
            skew_ms: AtomicI64::new(0),
        }));
        self.nodes.push(None);
        self.storages.push(None);
        self.data_dirs.push(None);
        self.scan_delays.push(Arc::default());
        self.boot(i).await;
        i
    }

    /// Throws away stopped node `i`'s data (records, metadata, hints): its next restart
    /// opens an empty store, as after a disk replacement. The node keeps its id.
    pub fn wipe(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "node {i} is running");
        self.storages[i] = None;
        self.data_dirs[i] = None;
    }

    /// Shuts node `i` down gracefully.
    pub async fn shutdown(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            node.shutdown().await.expect("shutdown");
            if self.spec.storage.scheme != "memory" {
                self.storages[i] = None;
            }
        }
    }

    /// Waits (virtual time) until every running node's ring holds exactly the running nodes,
    /// all alive and none joining, and no join ended within `join_settle`
    /// ([`Node::ownership_settled`]); panics with the views after `limit`.
    pub async fn wait_for_ring(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        let running: Vec<u64> = (0..self.nodes.len())
            .filter(|&i| self.is_running(i))
            .map(|i| i as u64 + 1)
            .collect();
        loop {
            let settled = (0..self.nodes.len())
                .filter(|&i| self.is_running(i))
                .all(|i| {
                    let ring = self.node(i).ring();
                    self.node(i).ownership_settled()
                        && ring.len() == running.len()
                        && ring.iter().all(|o| {
                            o.state == MemberState::Alive && !o.joining && running.contains(&o.id.0)
                        })
                });
            if settled {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let views: Vec<_> = (0..self.nodes.len())
                    .filter(|&i| self.is_running(i))
                    .map(|i| (i, self.node(i).ring()))
                    .collect();
                panic!(
                    "seed {}: rings did not settle on {running:?} within {limit:?}: {views:#?}",
                    self.spec.seed
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Shuts every running node down.
    pub async fn stop(mut self) {
        for i in 0..self.nodes.len() {
            self.shutdown(i).await;
        }
    }
}
