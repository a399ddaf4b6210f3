//! `chorus demo` and `chorus cluster`: local clusters of real `chorus serve` processes,
//! started from this same executable and stopped by PID.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::client::{Client, ClientError};

/// How long a node may take to print its ready line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One `chorus serve` child.
#[derive(Debug)]
struct Node {
    id: u64,
    child: Child,
    client: String,
    admin: String,
    cluster: String,
    log: PathBuf,
}

/// Starts `chorus serve` with `env` (CHORUS_* overrides) and optional config file; returns
/// once it printed its ready line.
fn start(
    id: u64,
    config: Option<&Path>,
    env: &[(String, String)],
    log: &Path,
) -> Result<Node, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let log_file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve");
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start node {id}: {e}"))?;
    let stdout = child.stdout.take();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let Some(out) = stdout else { return };
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(ready) = line.strip_prefix("chorus ready: ") {
                    let field = |name: &str| {
                        ready
                            .split(' ')
                            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                            .unwrap_or_default()
                            .to_string()
                    };
                    return Ok(Node {
                        id,
                        client: field("client"),
                        admin: field("admin"),
                        cluster: field("cluster"),
                        child,
                        log: log.to_path_buf(),
                    });
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let tail = std::fs::read_to_string(log).unwrap_or_default();
                return Err(format!(
                    "node {id} did not become ready within {START_TIMEOUT:?}; its log ({}):\n{tail}",
                    log.display()
                ));
            }
        }
    }
}

impl Node {
    /// SIGTERM, then waits up to `bound`; SIGKILL past it.
    fn stop(&mut self, bound: Duration) -> Result<ExitStatus, String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Ok(status);
        }
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32)
            .ok_or_else(|| format!("node {}: no pid", self.id))?;
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + bound;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!(
                    "node {} did not stop within {bound:?}; killed",
                    self.id
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn env(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// Waits until `f` holds, up to `bound`.
fn wait_until(bound: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn alive_members(addr: &str) -> usize {
    Client::connect(addr, "")
        .and_then(|mut c| c.call(&["CHORUS.MEMBERS"]))
        .map(|v| match v {
            super::client::Value::Array(ms) => ms
                .iter()
                .filter(|m| {
                    m.pairs()
                        .iter()
                        .any(|(k, v)| k == "state" && v.as_text() == "alive")
                })
                .count(),
            _ => 0,
        })
        .unwrap_or(0)
}

/// How many members the node at `addr` shows joining (`usize::MAX` if it does not answer).
fn joining_members(addr: &str) -> usize {
    Client::connect(addr, "")
        .and_then(|mut c| c.call(&["CHORUS.RING"]))
        .map(|v| match v {
            super::client::Value::Array(ms) => ms
                .iter()
                .filter(|m| {
                    m.pairs()
                        .iter()
                        .any(|(k, v)| k == "joining" && v.as_text() == "1")
                })
                .count(),
            _ => usize::MAX,
        })
        .unwrap_or(usize::MAX)
}

fn show(step: &str, r: &Result<super::client::Value, ClientError>) {
    match r {
        Ok(v) => println!("    {step:<52} -> {}", v.as_text()),
        Err(e) => println!("    {step:<52} -> (error) {e}"),
    }
}

fn node_env(id: u64, cluster: &str, client: &str, seeds: &str) -> Vec<(String, String)> {
    env(&[
        ("CHORUS_NODE_ID", id.to_string()),
        ("CHORUS_NODE_TRANSPORT_BIND", cluster.to_string()),
        ("CHORUS_NODE_SEEDS", seeds.to_string()),
        ("CHORUS_NODE_MEMBERSHIP", "local".into()),
        // Three processes on loopback, for a few seconds: no keyring to build (see
        // docs/SECURITY.md for keyring mode); each node logs the insecure-mode warning.
        ("CHORUS_NODE_SECURITY_MODE", "insecure".into()),
        ("CHORUS_NODE_REQUEST_TIMEOUT", "1s".into()),
        // Loopback: compare Merkle trees every few seconds rather than every 10 minutes.
        ("CHORUS_NODE_ANTI_ENTROPY_INTERVAL", "10s".into()),
        ("CHORUS_CLIENT_LISTEN", client.to_string()),
        ("CHORUS_ADMIN_LISTEN", "127.0.0.1:0".into()),
        ("CHORUS_LOG_FILTER", "warn".into()),
    ])
}

/// The scripted three-node scenario.
pub(crate) fn demo(keep: bool) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("chorus-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = run_demo(&dir, keep);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_demo(dir: &Path, keep: bool) -> Result<(), String> {
    println!("Starting three `chorus serve` processes on loopback (N = 3, W = R = quorum)...");
    let first = start(
        1,
        None,
        &node_env(1, "127.0.0.1:0", "127.0.0.1:0", ""),
        &dir.join("node1.log"),
    )?;
    let seed = first.cluster.clone();
    let mut nodes = vec![first];
    for id in 2..=3 {
        nodes.push(start(
            id,
            None,
            &node_env(id, "127.0.0.1:0", "127.0.0.1:0", &seed),
            &dir.join(format!("node{id}.log")),
        )?);
    }
    // Nodes 2 and 3 join by pulling, in turn; quorum reads need two settled members.
    if !wait_until(Duration::from_secs(40), || {
        nodes
            .iter()
            .all(|n| alive_members(&n.client) == 3 && joining_members(&n.client) == 0)
    }) {
        return Err("the three nodes did not see each other, settled, within 40 s".into());
    }
    for n in &nodes {
        let port = n.client.rsplit(':').next().unwrap_or_default();
        println!(
            "  node {}: redis-cli -p {port}    (admin http://{}/metrics, pid {})",
            n.id,
            n.admin,
            n.child.id()
        );
    }
    let (a, b) = (nodes[0].client.clone(), nodes[1].client.clone());
    let c_addr = nodes[2].client.clone();
    let c_cluster = nodes[2].cluster.clone();
    let mut ca = Client::connect(&a, "").map_err(|e| e.to_string())?;
    let mut cb = Client::connect(&b, "").map_err(|e| e.to_string())?;

    println!("\n1. A quorum write through node 1, read back through node 2:");
    show(
        "node1: SET greeting hello",
        &ca.call(&["SET", "greeting", "hello"]),
    );
    show("node2: GET greeting", &cb.call(&["GET", "greeting"]));

    println!("\n2. Node 3 stops (SIGTERM; it leaves the cluster):");
    let status = nodes[2].stop(Duration::from_secs(15))?;
    println!("    node 3 exited with {status}");
    wait_until(Duration::from_secs(10), || alive_members(&a) == 2);
    show(
        "node1: CHORUS.CONSISTENCY write all",
        &ca.call(&["CHORUS.CONSISTENCY", "write", "all"]),
    );
    show(
        "node1: SET greeting bonjour  (needs 3 of 3)",
        &ca.call(&["SET", "greeting", "bonjour"]),
    );
    show(
        "node1: CHORUS.CONSISTENCY write quorum",
        &ca.call(&["CHORUS.CONSISTENCY", "write", "quorum"]),
    );
    show(
        "node1: SET missed-by-3 yes  (needs 2 of 3)",
        &ca.call(&["SET", "missed-by-3", "yes"]),
    );
    show(
        "node2: GET greeting  (quorum read, 2 of 3 up)",
        &cb.call(&["GET", "greeting"]),
    );

    println!(
        "\n3. Node 3 restarts, empty (memory backend), and pulls its ranges before it serves reads:"
    );
    let restarted = start(
        3,
        None,
        &node_env(3, &c_cluster, &c_addr, &seed),
        &dir.join("node3-restarted.log"),
    )?;
    nodes[2] = restarted;
    let mut cc = Client::connect(&nodes[2].client, "").map_err(|e| e.to_string())?;
    if !wait_until(Duration::from_secs(30), || {
        alive_members(&nodes[2].client) == 3 && joining_members(&nodes[2].client) == 0
    }) {
        return Err("node 3 did not rejoin within 30 s".into());
    }
    show(
        "node3: CHORUS.CONSISTENCY read one",
        &cc.call(&["CHORUS.CONSISTENCY", "read", "one"]),
    );
    let pulled = matches!(cc.call(&["GET", "missed-by-3"]), Ok(super::client::Value::Text(ref t)) if t == "yes");
    show(
        "node3: GET missed-by-3  (its own copy, pulled)",
        &cc.call(&["GET", "missed-by-3"]),
    );
    println!(
        "    {}",
        if pulled {
            "node 3 holds the value it missed: its join pulled it with its original version"
        } else {
            "node 3 does not hold the value it missed"
        }
    );
    drop((ca, cb, cc));

    if keep {
        println!("\nThe cluster keeps running; Ctrl-C stops it.");
        wait_for_ctrl_c();
    }
    println!("\nStopping the nodes (SIGTERM)...");
    let mut failed = Vec::new();
    for n in &mut nodes {
        match n.stop(Duration::from_secs(15)) {
            Ok(s) if s.success() => println!("    node {} exited cleanly", n.id),
            Ok(s) => failed.push(format!(
                "node {} exited with {s} (log {})",
                n.id,
                n.log.display()
            )),
            Err(e) => failed.push(e),
        }
    }
    if !failed.is_empty() {
        return Err(failed.join("; "));
    }
    if !pulled {
        return Err("node 3 did not pull the value it missed".into());
    }
    Ok(())
}

/// Blocks until SIGINT or SIGTERM.
fn wait_for_ctrl_c() {
    if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        rt.block_on(super::cli::wait_for_signal());
    }
}

/// `chorus cluster`: N nodes from config files in `dir`, until Ctrl-C.
pub(crate) fn cluster(n: usize, dir: &Path, base_port: u16, backend: &str) -> Result<(), String> {
    if n == 0 || n > 99 {
        return Err("--nodes must be between 1 and 99".into());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let port = |offset: usize, i: usize| -> Result<u16, String> {
        u16::try_from(base_port as usize + offset + i - 1)
            .map_err(|_| format!("--base-port {base_port} leaves no room for {n} nodes"))
    };
    let seed = format!("127.0.0.1:{}", port(100, 1)?);
    let mut nodes = Vec::new();
    for i in 1..=n {
        let path = dir.join(format!("node{i}.toml"));
        if !path.exists() {
            let data = dir.join(format!("node{i}-data"));
            let text = format!(
                "# Written by `chorus cluster`; edit it to experiment (docs/OPERATIONS.md).\n\
                 [node]\nid = {i}\nseeds = [{seeds}]\nmembership = \"local\"\nreplication_factor = {rf}\n\
                 # Loopback experiments: Merkle trees compared every 10 s, not every 10 min.\n\
                 anti_entropy_interval = \"10s\"\n\n\
                 # Loopback experiments: no keyring (docs/SECURITY.md explains keyring mode).\n\
                 [node.security]\nmode = \"insecure\"\n\n\
                 [node.transport]\nscheme = \"tcp\"\nbind = \"127.0.0.1:{cport}\"\n\n\
                 [node.storage]\nscheme = \"{backend}\"\n{path}\n\
                 [client]\nlisten = \"127.0.0.1:{client}\"\n\n\
                 [admin]\nlisten = \"127.0.0.1:{admin}\"\n",
                seeds = if i == 1 {
                    String::new()
                } else {
                    format!("\"{seed}\"")
                },
                rf = n.min(3),
                cport = port(100, i)?,
                path = if matches!(backend, "memory" | "moka") {
                    String::new()
                } else {
                    format!("path = \"{}\"\n", data.display())
                },
                client = port(0, i)?,
                admin = port(200, i)?,
            );
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        nodes.push(start(
            i as u64,
            Some(&path),
            &[],
            &dir.join(format!("node{i}.log")),
        )?);
    }
    println!(
        "{:<6}{:<8}{:<22}{:<22}{:<22}LOG",
        "NODE", "PID", "CLIENT", "ADMIN", "CLUSTER"
    );
    for node in &nodes {
        println!(
            "{:<6}{:<8}{:<22}{:<22}{:<22}{}",
            node.id,
            node.child.id(),
            node.client,
            node.admin,
            node.cluster,
            node.log.display()
        );
    }
    println!("Ctrl-C stops them all.");
    wait_for_ctrl_c();
    let mut failed = Vec::new();
    for node in &mut nodes {
        match node.stop(Duration::from_secs(15)) {
            Ok(s) if s.success() => println!("node {} stopped", node.id),
            Ok(s) => failed.push(format!("node {} exited with {s}", node.id)),
            Err(e) => failed.push(e),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}
