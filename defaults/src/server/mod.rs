//! The `chorus` server (feature `server`): a [`Node`] behind the Redis protocol, with an admin
//! HTTP listener for Prometheus metrics, status and health checks.
//!
//! The binary (`chorus serve --config chorus.toml`, see [`cli`]) is a thin shell over
//! [`Server`]; `docs/OPERATIONS.md` lists every setting of [`ServerConfig`] with its default,
//! the metrics, and the commands.
//!
//! ```no_run
//! # async fn demo() -> Result<(), chorus::server::ServerError> {
//! use chorus::server::{Server, ServerConfig};
//!
//! let config = ServerConfig::load(None, std::env::vars())?;
//! let server = Server::start(config).await?;
//! println!("redis-cli -p {}", server.client_addr().port());
//! server.shutdown().await?;
//! # Ok(()) }
//! ```

mod admin;
mod batch;
pub mod cli;
pub(crate) mod client;
mod commands;
pub mod config;
mod conn;
mod demo;
mod metrics;
mod resp;
mod socket;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::{AdminConfig, ClientConfig, ConfigError, LogConfig, LogFormat, ServerConfig};

use crate::membership::MemberState;
use crate::runtime::node::StartError;
use crate::{Node, Storage, StorageError};

/// The Redis version whose protocol and replies the server follows, as `INFO` and `HELLO`
/// report it to clients that check it.
pub(crate) const REDIS_VERSION: &str = "7.2.0";

/// Why the server did not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is wrong.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// A listener could not bind.
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        /// Which listener (`client.listen`, `admin.listen`).
        what: &'static str,
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The node did not start.
    #[error("node: {0}")]
    Start(#[from] StartError),
    /// Storage failed to flush or close on shutdown.
    #[error("storage on shutdown: {0}")]
    Storage(#[from] StorageError),
}

/// What the listeners and commands share.
pub(crate) struct Shared {
    node: Node,
    batcher: batch::Batcher,
    metrics: metrics::Metrics,
    password: String,
    limits: ClientConfig,
    idle_timeout: Duration,
    shutdown_grace: Duration,
    max_connections: usize,
    next_client_id: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    open: AtomicU64,
    commands_seen: AtomicU64,
    started: Instant,
    client_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    joined: AtomicBool,
    stopping: AtomicBool,
}

impl Shared {
    fn connected(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    fn commands(&self) -> u64 {
        self.commands_seen.load(Ordering::Relaxed)
    }

    /// Ready once the node has joined a cluster (or was configured to form one alone), until
    /// it begins to shut down.
    fn readiness(&self) -> Result<(), &'static str> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err("shutting down");
        }
        if self.joined.load(Ordering::Relaxed) {
            return Ok(());
        }
        let others = self
            .node
            .members()
            .iter()
            .skip(1)
            .any(|m| m.state == MemberState::Alive);
        if others {
            self.joined.store(true, Ordering::Relaxed);
            Ok(())
        } else {
            Err("no other member known yet (joining the seeds)")
        }
    }
}

/// The Prometheus recorder of this process: installed by the first server started in it.
fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    metrics::LATENCY_BUCKETS,
                )
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            ::metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .clone()
}

/// A running server: the node, the client listener and the admin listener.
pub struct Server {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
    others: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("node", &self.shared.node)
            .field("client_addr", &self.shared.client_addr)
            .field("admin_addr", &self.shared.admin_addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Validates `config`, binds the client and admin listeners, starts the node (joining its
    /// seeds) and starts serving.
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        config.validate()?;
        let client = bind("client.listen", &config.client.listen).await?;
        let admin = if config.admin.listen.is_empty() {
            None
        } else {
            Some(bind("admin.listen", &config.admin.listen).await?)
        };
        let prometheus = prometheus();
        let client_addr = client.local_addr().map_err(|source| ServerError::Bind {
            what: "client.listen",
            addr: config.client.listen.clone(),
            source,
        })?;
        let admin_addr = admin.as_ref().and_then(|a| a.local_addr().ok());
        let seeds_empty = config.node.seeds.is_empty();
        let node = crate::node().config(config.node.clone()).start().await?;
        let (batcher, batch_tasks) = batch::Batcher::start(&node);
        let shared = Arc::new(Shared {
            node: node.clone(),
            batcher,
            metrics: metrics::Metrics::new(),
            password: config.client.password.clone(),
            idle_timeout: config.client.idle_timeout,
            shutdown_grace: config.client.shutdown_grace,
            max_connections: config.client.max_connections,
            limits: config.client.clone(),
            next_client_id: AtomicU64::new(1),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            open: AtomicU64::new(0),
            commands_seen: AtomicU64::new(0),
            started: Instant::now(),
            client_addr,
            admin_addr,
            joined: AtomicBool::new(seeds_empty),
            stopping: AtomicBool::new(false),
        });
        let (stop, stopped) = watch::channel(false);
        let accept = tokio::spawn(conn::accept_loop(shared.clone(), client, stopped.clone()));
        let mut others = vec![tokio::spawn(metrics::count_membership_events(node))];
        others.extend(batch_tasks);
        if let Some(admin) = admin {
            others.push(tokio::spawn(admin::serve(
                shared.clone(),
                prometheus,
                admin,
                stopped,
            )));
        }
        tracing::info!(
            node = shared.node.id().0,
            client = %client_addr,
            admin = ?admin_addr,
            cluster = %shared.node.addr(),
            "serving"
        );
        Ok(Server {
            shared,
            stop,
            accept,
            others,
        })
    }

    /// Where the Redis-protocol listener is bound.
    pub fn client_addr(&self) -> SocketAddr {
        self.shared.client_addr
    }

    /// Where the admin listener is bound, if there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.shared.admin_addr
    }

    /// The node.
    pub fn node(&self) -> &Node {
        &self.shared.node
    }

    /// Stops accepting connections, lets open ones finish the commands they are running
    /// (within `client.shutdown_grace`), then shuts the node down: it finishes requests in
    /// flight, leaves the cluster, flushes and closes storage (within
    /// `node.shutdown_timeout`).
    pub async fn shutdown(self) -> Result<(), ServerError> {
        self.shared.stopping.store(true, Ordering::Relaxed);
        let _ = self.stop.send(true);
        let grace = self.shared.shutdown_grace + Duration::from_millis(500);
        let mut accept = self.accept;
        if tokio::time::timeout(grace, &mut accept).await.is_err() {
            accept.abort();
        }
        let result = self.shared.node.shutdown().await;
        for t in self.others {
            t.abort();
        }
        result.map_err(ServerError::from)
    }
}

async fn bind(what: &'static str, addr: &str) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind {
            what,
            addr: addr.to_string(),
            source,
        })
}

pub(crate) fn state_name(state: MemberState) -> &'static str {
    match state {
        MemberState::Alive => "alive",
        MemberState::Suspect => "suspect",
        MemberState::Dead => "dead",
        MemberState::Left => "left",
    }
}

/// `/status` and `CHORUS.STATUS`: this node, its members and their states, ring ownership,
/// storage and counters.
pub(crate) async fn status_json(shared: &Shared) -> serde_json::Value {
    use serde_json::json;
    let node = &shared.node;
    let config = node.config();
    let members: Vec<_> = node
        .members()
        .iter()
        .map(|m| {
            json!({
                "id": m.id.0,
                "addr": m.meta.addr.to_string(),
                "state": state_name(m.state),
                "generation": m.life.generation,
                "incarnation": m.life.incarnation,
            })
        })
        .collect();
    let ring: Vec<_> = node
        .ring()
        .iter()
        .map(|o| {
            json!({
                "id": o.id.0,
                "addr": o.addr.to_string(),
                "state": state_name(o.state),
                "primary_share": o.primary_share,
                "joining": o.joining,
            })
        })
        .collect();
    let storage = match node.storage().stats().await {
        Ok(s) => json!({
            "backend": config.storage.scheme,
            "records": s.records,
            "tombstones": s.tombstones,
            "bytes": s.bytes,
        }),
        Err(e) => json!({ "backend": config.storage.scheme, "error": e.to_string() }),
    };
    let s = node.stats();
    json!({
        "node": {
            "id": node.id().0,
            "cluster_addr": node.addr().to_string(),
            "client_addr": shared.client_addr.to_string(),
            "admin_addr": shared.admin_addr.map(|a| a.to_string()),
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": shared.started.elapsed().as_secs(),
            "ready": shared.readiness().is_ok(),
            "replication_factor": config.replication_factor.get(),
            "read_consistency": config.read_consistency.to_string(),
            "write_consistency": config.write_consistency.to_string(),
        },
        "members": members,
        "ring": ring,
        "storage": storage,
        "clients": {
            "connected": shared.connected(),
            "accepted": shared.accepted(),
            "rejected": shared.rejected(),
        },
        "stats": {
            "writes": s.writes,
            "reads": s.reads,
            "local_reads": s.local_reads,
            "unavailable": s.unavailable,
            "timeouts": s.timeouts,
            "failed": s.failed,
            "invalid_requests": s.invalid_requests,
            "replica_requests_sent": s.replica_requests_sent,
            "late_answers": s.late_answers,
            "deferred_pending": s.deferred_pending,
            "deferred_shed": s.deferred_shed,
            "read_repairs": s.read_repairs,
            "read_repair_failures": s.read_repair_failures,
            "replica_applied": s.replica_applied,
            "replica_stale": s.replica_stale,
            "drift_refusals": s.drift_refusals,
            "storage_failures": s.storage_failures,
            "purged": s.purged,
        },
    })
}
