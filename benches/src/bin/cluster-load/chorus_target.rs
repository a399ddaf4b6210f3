//! The Chorus targets: three nodes, N = 3, W = R = 2 (quorum), either all in this process on an
//! in-process network, or over TCP on loopback with node 1 embedded here (the embedded-use
//! model: the load calls `Node::put`/`get` directly) and nodes 2 and 3 each their own process.

use std::process::ChildStdin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus::membership::{MemberState, MembershipConfig};
use chorus::runtime::inproc::InProcessNetwork;
use chorus::runtime::node::MembershipPreset;
use chorus::{
    Consistency, Node, NodeConfig, NodeId, ReadOptions, ReadRepair, SharedTransport, Storage,
    StorageSpec, TransportSpec, WriteOptions,
};

use crate::load::{LoadSpec, Worker};
use crate::procs::{self, Children};

/// Runs `$op` (an expression of `$key`, giving `Result<bool, String>`) on the keys in turn on
/// one task until the window closes; evaluates to `Result<calls per second, String>`. A macro,
/// so the loop calls the node or storage it owns without cloning a handle per call.
macro_rules! tight_loop {
    ($spec:expr, $keys:expr, |$key:ident| $op:expr) => {
        tight_loop!($spec, $keys, 1, |$key| $op)
    };
    ($spec:expr, $keys:expr, $per_call:expr, |$key:ident| $op:expr) => {{
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let keys: Arc<[Bytes]> = $keys;
        let task = {
            let (stop, count) = (stop.clone(), count.clone());
            tokio::spawn(async move {
                let (mut i, mut misses) = (0usize, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..256 {
                        i += 1;
                        if i == keys.len() {
                            i = 0;
                        }
                        let $key = keys[i].clone();
                        if !$op? {
                            misses += 1;
                        }
                    }
                    count.fetch_add(256 * $per_call, Ordering::Relaxed);
                    // Let the window's timer (and anything else on this worker) run.
                    tokio::task::yield_now().await;
                }
                Ok::<u64, String>(misses)
            })
        };
        tokio::time::sleep($spec.warm_up).await;
        let (c0, t0) = (count.load(Ordering::Relaxed), Instant::now());
        tokio::time::sleep($spec.window).await;
        let (c1, t1) = (count.load(Ordering::Relaxed), Instant::now());
        stop.store(true, Ordering::Relaxed);
        match task.await {
            Err(e) => Err(format!("tight loop task: {e}")),
            Ok(Err(e)) => Err(e),
            Ok(Ok(0)) => Ok((c1 - c0) as f64 / (t1 - t0).as_secs_f64()),
            Ok(Ok(misses)) => Err(format!("{misses} local reads found nothing")),
        }
    }};
}

/// The storage backends of the TCP cluster, by the name used in `--targets tcp-<name>`.
pub(crate) const BACKENDS: [&str; 5] = ["memory", "file-always", "file-interval", "sled", "moka"];

/// The storage spec of `backend` (persistent ones under `dir`).
pub(crate) fn storage_spec(backend: &str, dir: &std::path::Path) -> Result<StorageSpec, String> {
    let (scheme, fsync) = match backend {
        "memory" => ("memory", None),
        "moka" => ("moka", None),
        "sled" => ("sled", None),
        "file-always" => ("file", Some("always")),
        "file-interval" => ("file", Some("interval:50ms")),
        other => return Err(format!("unknown backend {other:?}; known: {BACKENDS:?}")),
    };
    let mut spec = StorageSpec::new(scheme);
    if matches!(scheme, "file" | "sled") {
        spec.path = Some(dir.to_path_buf());
    }
    if let Some(f) = fsync {
        spec.options.insert("fsync".into(), f.into());
    }
    Ok(spec)
}

/// The configuration every node of the benchmark shares: N = 3, quorum reads and writes.
fn base_config(id: u64) -> NodeConfig {
    let mut config = NodeConfig::default();
    // The data path's load, comparable with the earlier runs; membership signing costs about
    // 55 us per membership message (docs/BENCHMARKS.md), a few per node per second.
    config.security = chorus::SecurityConfig::insecure();
    config.id = NodeId(id);
    config.membership = MembershipPreset::Local;
    config.read_consistency = Consistency::Quorum;
    config.write_consistency = Consistency::Quorum;
    config.request_timeout = Duration::from_secs(2);
    config.shutdown_timeout = Duration::from_secs(3);
    config
}

/// Whether `node`'s ring holds exactly `n` members, all alive.
fn settled(node: &Node, n: usize) -> bool {
    let ring = node.ring();
    // Joins (each node after the first pulls, in turn) and their grace must be over, or the
    // load would measure writes to two rings.
    ring.len() == n
        && ring
            .iter()
            .all(|o| o.state == MemberState::Alive && !o.joining)
        && node.ownership_settled()
}

async fn wait_settled(node: &Node, n: usize, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !settled(node, n) {
        if Instant::now() > deadline {
            return Err(format!(
                "node {} did not see {n} alive members within {limit:?}: {:?}",
                node.id().0,
                node.ring()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// One load worker: a handle on the node the load goes through.
pub(crate) struct ChorusWorker {
    node: Node,
    read: ReadOptions,
}

impl Worker for ChorusWorker {
    async fn put(&mut self, key: &Bytes, value: &Bytes) -> Result<(), String> {
        self.node
            .put(
                key.clone(),
                value.clone(),
                WriteOptions::default().consistency(Consistency::Quorum),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn get(&mut self, key: &Bytes) -> Result<bool, String> {
        self.node
            .get(key.clone(), self.read)
            .await
            .map(|v| v.is_some())
            .map_err(|e| e.to_string())
    }
}

/// A running Chorus cluster; the load goes through `nodes[0]`.
pub(crate) struct ChorusCluster {
    /// Nodes in this process (all three in-process, node 1 alone over TCP).
    nodes: Vec<Node>,
    /// Nodes 2 and 3 of the TCP cluster: closing their stdin stops them, and the guard kills
    /// them by PID in any case.
    _stdins: Vec<ChildStdin>,
    children: Children,
    _dir: tempfile::TempDir,
}

impl ChorusCluster {
    /// Three nodes on an in-process network, memory storage.
    pub(crate) async fn start_inproc(seed: u64) -> Result<ChorusCluster, String> {
        let net = InProcessNetwork::new(seed);
        let addr = |i: u64| format!("node-{i}:7946");
        let mut nodes = Vec::new();
        for id in 1..=3u64 {
            let transport = SharedTransport::new(
                net.bind(addr(id))
                    .map_err(|e| format!("bind {}: {e}", addr(id)))?,
            );
            let seeds: Vec<String> = if id == 1 { vec![] } else { vec![addr(1)] };
            let node = chorus::node()
                .config(base_config(id))
                .seeds(seeds)
                .transport(transport)
                .membership(MembershipConfig::local())
                .rng_seed(seed ^ (id << 32))
                .start()
                .await
                .map_err(|e| format!("node {id} start: {e}"))?;
            nodes.push(node);
        }
        for node in &nodes {
            wait_settled(node, 3, Duration::from_secs(60)).await?;
        }
        Ok(ChorusCluster {
            nodes,
            _stdins: Vec::new(),
            children: Children::default(),
            _dir: tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?,
        })
    }

    /// Node 1 here, nodes 2 and 3 as child processes, TCP on loopback, `backend` storage.
    pub(crate) async fn start_tcp(backend: &str) -> Result<ChorusCluster, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let ports = [procs::free_port(), procs::free_port(), procs::free_port()];
        let listen = |i: usize| format!("127.0.0.1:{}", ports[i]);
        let node_dir = |i: usize| dir.path().join(format!("node-{}", i + 1));
        let mut config = base_config(1);
        config.transport = TransportSpec::new("tcp", listen(0));
        std::fs::create_dir_all(node_dir(0)).map_err(|e| format!("data dir: {e}"))?;
        config.storage = storage_spec(backend, &node_dir(0))?;
        let node1 = chorus::node()
            .config(config)
            .start()
            .await
            .map_err(|e| format!("node 1 start: {e}"))?;
        let mut children = Children::default();
        let mut stdins = Vec::new();
        let mut ready = Vec::new();
        for i in 1..3 {
            let args: Vec<String> = [
                "node",
                "--id",
                &(i + 1).to_string(),
                "--listen",
                &listen(i),
                "--seeds",
                &listen(0),
                "--backend",
                backend,
                "--data-dir",
                &node_dir(i).display().to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let (child, stdin, lines) = procs::spawn_self(&args)?;
            children.push(child);
            stdins.push(stdin);
            ready.push(lines);
        }
        for lines in ready {
            procs::wait_for_line(lines, "ready", Duration::from_secs(30)).await?;
        }
        wait_settled(&node1, 3, Duration::from_secs(60)).await?;
        eprintln!(
            "chorus tcp-{backend}: node 1 here on {}, nodes 2 and 3 pids {:?}",
            listen(0),
            children.pids()
        );
        Ok(ChorusCluster {
            nodes: vec![node1],
            _stdins: stdins,
            children,
            _dir: dir,
        })
    }

    /// PIDs of the child processes.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.children.pids()
    }

    pub(crate) fn workers(&self, n: usize, repair: Option<ReadRepair>) -> Vec<ChorusWorker> {
        let mut read = ReadOptions::default().consistency(Consistency::Quorum);
        if let Some(r) = repair {
            read = read.repair(r);
        }
        (0..n)
            .map(|_| ChorusWorker {
                node: self.nodes[0].clone(),
                read,
            })
            .collect()
    }

    /// Gets at `One` of keys node 1 replicates, one task in a tight loop (so one thread at a
    /// time), for `window` after `warm_up`: gets per second through the node, then the same
    /// loop calling the node's storage directly (what the node adds is the difference).
    pub(crate) async fn local_reads(
        &self,
        spec: &LoadSpec,
    ) -> Result<Vec<(&'static str, f64)>, String> {
        let node = self.nodes[0].clone();
        // Static keys: cloning them costs nothing, so the loop measures the node alone.
        let keys: Vec<Bytes> = (0..spec.keys)
            .map(LoadSpec::key)
            .filter(|k| node.replicas_of(k).contains(&node.id()))
            .map(|k| Bytes::from_static(Vec::leak(k.to_vec())))
            .collect();
        if keys.is_empty() {
            return Err("node 1 replicates none of the keys".into());
        }
        let keys: Arc<[Bytes]> = keys.into();
        let before = node.stats();
        let through_node = {
            let node = node.clone();
            let options = ReadOptions::default().consistency(Consistency::One);
            tight_loop!(spec, keys.clone(), |key| node
                .get(key, options)
                .await
                .map(|v| v.is_some())
                .map_err(|e| e.to_string()))?
        };
        let after = node.stats();
        let storage_alone = {
            let storage = node.storage().clone();
            tight_loop!(spec, keys.clone(), |key| storage
                .get(&key)
                .await
                .map(|r| r.is_some())
                .map_err(|e| e.to_string()))?
        };
        // Where the node's time goes: the replica-set lookup alone (ring snapshot, preference
        // list), and a get_many of 16 keys per call (the per-call costs shared by 16 keys).
        let replicas_of = {
            let node = node.clone();
            let id = node.id();
            tight_loop!(spec, keys.clone(), |key| Ok::<bool, String>(
                node.replicas_of(&key).contains(&id)
            ))?
        };
        let batched = {
            let node = node.clone();
            let options = ReadOptions::default().consistency(Consistency::One);
            let all = keys.clone();
            tight_loop!(spec, keys, 16, |key| {
                let start = (key.as_ptr() as usize / 7) % (all.len() - 16);
                let batch: Vec<Bytes> = all[start..start + 16].to_vec();
                node.get_many(batch, options)
                    .await
                    .map_err(|e| e.to_string())
                    .map(|rs| rs.iter().all(|r| matches!(r, Ok(Some(_)))))
            })?
        };
        eprintln!(
            "  local reads at One: {}/s (storage.get alone {}/s, replicas_of alone {}/s, get_many of 16 {} keys/s); served locally {}, replica requests sent {}",
            crate::report::fmt_ops(through_node),
            crate::report::fmt_ops(storage_alone),
            crate::report::fmt_ops(replicas_of),
            crate::report::fmt_ops(batched),
            after.local_reads - before.local_reads,
            after.replica_requests_sent - before.replica_requests_sent
        );
        Ok(vec![
            ("", through_node),
            (" (storage.get alone)", storage_alone),
            (" (replicas_of alone)", replicas_of),
            (" (get_many of 16, per key)", batched),
        ])
    }

    /// Stops the nodes in this process, then the child processes.
    pub(crate) async fn stop(self) {
        for node in &self.nodes {
            let _ = node.shutdown().await;
        }
        drop(self.children);
    }
}

/// `cluster-load node ...`: one node of the TCP cluster, started by the benchmark. Prints
/// `ready` once its ring holds three alive members; exits when its stdin closes.
pub(crate) fn node_main(mut args: impl Iterator<Item = String>) -> Result<(), String> {
    let (mut id, mut listen, mut seeds, mut backend, mut data_dir) =
        (None, None, Vec::new(), None, None);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--id" => id = Some(value.parse::<u64>().map_err(|e| format!("--id: {e}"))?),
            "--listen" => listen = Some(value),
            "--seeds" => seeds = value.split(',').map(str::to_string).collect(),
            "--backend" => backend = Some(value),
            "--data-dir" => data_dir = Some(std::path::PathBuf::from(value)),
            other => return Err(format!("node: unknown flag {other}")),
        }
    }
    let id = id.ok_or("node: --id is required")?;
    let listen = listen.ok_or("node: --listen is required")?;
    let backend = backend.unwrap_or_else(|| "memory".into());
    let data_dir = data_dir.ok_or("node: --data-dir is required")?;
    std::fs::create_dir_all(&data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    let mut config = base_config(id);
    config.transport = TransportSpec::new("tcp", listen);
    config.seeds = seeds;
    config.storage = storage_spec(&backend, &data_dir)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(async move {
        let node = chorus::node()
            .config(config)
            .start()
            .await
            .map_err(|e| format!("node {id} start: {e}"))?;
        wait_settled(&node, 3, Duration::from_secs(60)).await?;
        println!("ready {id}");
        // Until the benchmark closes our stdin (or dies).
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        })
        .await;
        let _ = tokio::time::timeout(Duration::from_secs(5), node.shutdown()).await;
        Ok(())
    })
}
