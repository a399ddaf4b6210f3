//! The node: a member of the cluster that stores its share of the keys and coordinates reads
//! and writes of any key at the consistency each request picks.
//!
//! [`Node::builder`] (or [`NodeBuilder::config`] with a [`NodeConfig`]) opens the storage and
//! binds the transport by registry name (or takes instances, as tests do), starts membership
//! on the same endpoint, and joins the seeds or forms a cluster. The handle is cheap to clone
//! and `Send + Sync`.
//!
//! What a request promises is in `docs/CONSISTENCY.md`. In short: a key's replicas are the
//! first N members of its preference list in the current ring (alive and suspect members;
//! not dead or left ones); a write is stamped once by this node's HLC and succeeds only once
//! W of those replicas acknowledged it; a read returns after R answers, resolved by version,
//! and repairs stale replicas with the winning record's original version.
//!
//! One transport endpoint carries both membership and data: the receive task hands
//! membership messages to the membership driver without waiting, and serves each replica
//! request on its own task, so a slow disk never holds up probes.

mod cleanup;
mod config;
mod coordinator;
mod floor;
mod handoff;
mod hints;
mod join;
mod merkle;
mod replica;
mod stats;
mod sync;
mod view;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, broadcast, mpsc};

pub use config::{
    ConfigError, DEFAULT_HINT_WINDOW, DEFAULT_TOMBSTONE_GRACE, MembershipPreset, NodeConfig,
    ReadRepair, SecurityConfig, SecurityMode,
};
pub use stats::NodeStats;

use crate::auth::{Identity, Keyring};
use crate::envelope::Envelope;
use crate::hlc::{Hlc, Version, WallClock};
use crate::identity::{Address, NodeId};
use crate::membership::{
    AuthStats, Member, MemberMeta, MemberState, Membership, MembershipConfig, MembershipEvent,
    NodeStart, Security,
};
use crate::peer_auth::{ChannelAuth, SharedKeyring};
use crate::record::Record;
use crate::registry::{Registry, RegistryError};
use crate::replication::message::MAX_BATCH;
use crate::replication::{
    Consistency, InvalidRequest, Operation, Refusal, ReplicaMessage, ReplicationError, Write,
};
use crate::ring::RingConfig;
use crate::runtime::membership::{self as driver, MembershipHandle, SwimInbox};
use crate::runtime::rpc::{Inbound, RpcConfig, RpcEndpoint};
use crate::storage::{SharedStorage, Storage, StorageError};
use crate::transport::{SharedTransport, Transport, TransportError};
use floor::Floor;
use stats::Counters;
use view::View;

/// Options of one write (`put`, `delete` and their batch forms); unset fields take the
/// node's defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteOptions {
    /// Replicas that must acknowledge (W).
    pub consistency: Option<Consistency>,
    /// Deadline of the whole request.
    pub timeout: Option<Duration>,
    /// Time to live of the value (ignored by deletes).
    pub ttl: Option<Duration>,
}

impl WriteOptions {
    /// With consistency `c`.
    pub fn consistency(mut self, c: Consistency) -> Self {
        self.consistency = Some(c);
        self
    }

    /// With timeout `t`.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// With time to live `ttl`.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

/// Options of one read (`get` and `get_many`); unset fields take the node's defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReadOptions {
    /// Replicas that must answer (R).
    pub consistency: Option<Consistency>,
    /// Deadline of the whole request.
    pub timeout: Option<Duration>,
    /// Read repair mode.
    pub repair: Option<ReadRepair>,
}

impl ReadOptions {
    /// With consistency `c`.
    pub fn consistency(mut self, c: Consistency) -> Self {
        self.consistency = Some(c);
        self
    }

    /// With timeout `t`.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// With read repair mode `r`.
    pub fn repair(mut self, r: ReadRepair) -> Self {
        self.repair = Some(r);
        self
    }
}

/// A live value with the version it was written with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    /// The value.
    pub value: Bytes,
    /// Its version.
    pub version: Version,
}

/// One member's share of the ring.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Ownership {
    /// The member.
    pub id: NodeId,
    /// Where it is reached.
    pub addr: Address,
    /// Alive or suspect (dead and left members own nothing).
    pub state: MemberState,
    /// Fraction of the key space for which it is the first replica (0.0 while it joins).
    pub primary_share: f64,
    /// Still joining: written to, not read from, until it has pulled its ranges.
    pub joining: bool,
}

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is wrong; nothing was opened.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// The storage or transport could not be opened by name.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The storage failed while the node read its metadata; the transport was not bound.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The identity file could not be read or created.
    #[error("identity: {0}")]
    Identity(#[from] crate::runtime::keys::KeyFileError),
    /// Keyring mode without any way to an identity: no `security.identity_file`, no
    /// `storage.path` and no [`NodeBuilder::identity`].
    #[error(
        "keyring mode needs an identity: set `security.identity_file` or `storage.path`, give \
         one with NodeBuilder::identity, or set `security.mode = \"insecure\"`"
    )]
    NoIdentity,
}

/// Faults a test may plant in a node to show that the history checker catches them. Every
/// field is `false` outside such tests; nothing sets them but the caller.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlantedBugs {
    /// The coordinator counts itself as a replica of keys it does not replicate.
    pub count_coordinator_as_replica: bool,
    /// A replica that failed or timed out counts as an acknowledgement.
    pub count_failures_as_acks: bool,
    /// Read repair stamps the winner with a fresh version.
    pub repair_with_new_version: bool,
    /// Replicas store records without the clock-drift check.
    pub skip_drift_check: bool,
    /// A joining node settles without pulling its ranges (it serves reads it cannot answer).
    pub skip_join_pull: bool,
}

/// Starts a [`Node`]. See [`Node::builder`].
#[must_use = "a builder does nothing until started"]
pub struct NodeBuilder {
    config: NodeConfig,
    registry: Registry,
    storage: Option<SharedStorage>,
    transport: Option<SharedTransport>,
    clock: Option<Arc<dyn WallClock>>,
    membership: Option<MembershipConfig>,
    rng_seed: Option<u64>,
    bugs: PlantedBugs,
    identity: Option<Identity>,
    keyring: Option<Keyring>,
}

impl std::fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl NodeBuilder {
    /// Replaces the whole configuration.
    pub fn config(mut self, config: NodeConfig) -> Self {
        self.config = config;
        self
    }

    /// The node's id.
    pub fn id(mut self, id: u64) -> Self {
        self.config.id = NodeId(id);
        self
    }

    /// The address the transport listens on (`host:port`).
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.config.transport.bind = addr.into();
        self
    }

    /// Members to join through.
    pub fn seeds<S: Into<String>>(mut self, seeds: impl IntoIterator<Item = S>) -> Self {
        self.config.seeds = seeds.into_iter().map(Into::into).collect();
        self
    }

    /// Replicas per key (N).
    pub fn replication_factor(mut self, n: NonZeroUsize) -> Self {
        self.config.replication_factor = n;
        self
    }

    /// Default read and write consistency.
    pub fn consistency(mut self, read: Consistency, write: Consistency) -> Self {
        self.config.read_consistency = read;
        self.config.write_consistency = write;
        self
    }

    /// Uses this storage instead of opening `config.storage` by name.
    pub fn storage(mut self, storage: SharedStorage) -> Self {
        self.storage = Some(storage);
        self
    }

    /// Uses this transport instead of binding `config.transport` by name.
    pub fn transport(mut self, transport: SharedTransport) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Uses this wall clock for versions and expiry (tests inject skewed clocks).
    pub fn clock(mut self, clock: Arc<dyn WallClock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Uses this membership configuration instead of the preset's.
    pub fn membership(mut self, config: MembershipConfig) -> Self {
        self.membership = Some(config);
        self
    }

    /// Seeds the membership machine's randomness (for reproducible tests).
    pub fn rng_seed(mut self, seed: u64) -> Self {
        self.rng_seed = Some(seed);
        self
    }

    /// Uses this identity (in memory: tests, embedded use) instead of the identity file.
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Uses this keyring instead of the configuration's (`security.keyring` and
    /// `security.keyring_file`).
    pub fn keyring(mut self, keyring: Keyring) -> Self {
        self.keyring = Some(keyring);
        self
    }

    /// Insecure mode (see [`SecurityMode::Insecure`]).
    pub fn insecure(mut self) -> Self {
        self.config.security.mode = SecurityMode::Insecure;
        self
    }

    #[doc(hidden)]
    pub fn planted_bugs(mut self, bugs: PlantedBugs) -> Self {
        self.bugs = bugs;
        self
    }

    /// Opens storage, restores the clock floor and generation, binds the transport, starts
    /// membership and joins the seeds (or forms a cluster without them): with seeds, it
    /// returns once another member is known or after [`NodeConfig::join_timeout`].
    pub async fn start(self) -> Result<Node, StartError> {
        let config = self.config;
        config.validate()?;
        let storage = match self.storage {
            Some(s) => s,
            None => self.registry.open_backend(&config.storage)?,
        };
        let clock: Arc<dyn WallClock> = self
            .clock
            .unwrap_or_else(|| Arc::new(crate::hlc::CoarseSystemClock));
        let floor = Floor::restore(&storage, clock.now_ms()).await?;
        let hlc = Hlc::with_floor(clock.clone(), config.max_clock_drift, floor.restored());
        let generation = floor::next_generation(&storage, clock.now_ms()).await?;
        let (id, security, channel) = match config.security.mode {
            SecurityMode::Insecure => (config.id, Security::Insecure, None),
            SecurityMode::Keyring => {
                let identity = match (
                    self.identity,
                    &config.security.identity_file,
                    &config.storage.path,
                ) {
                    (Some(identity), _, _) => identity,
                    (None, Some(path), _) => crate::runtime::keys::load_or_create_identity(path)?.0,
                    (None, None, Some(dir)) => {
                        crate::runtime::keys::load_or_create_identity(
                            &dir.join(crate::runtime::keys::IDENTITY_FILE),
                        )?
                        .0
                    }
                    (None, None, None) => return Err(StartError::NoIdentity),
                };
                let keyring = match self.keyring {
                    Some(k) => k,
                    None => config.security.load_keyring()?,
                };
                if !keyring.contains(&identity.public_key()) {
                    tracing::warn!(
                        public_key = %identity.public_key(),
                        "this node's own key is not in the keyring: other members will refuse it"
                    );
                }
                // The transport authenticates connections with the same identity and reads
                // the same keyring (replaced by `set_keyring`) at every handshake.
                let channel =
                    ChannelAuth::new(identity.clone(), SharedKeyring::new(keyring.clone()));
                (
                    identity.node_id(),
                    Security::keyring(identity, keyring),
                    Some(channel),
                )
            }
        };
        let transport = match self.transport {
            Some(t) => t,
            None => {
                let mut spec = config.transport.clone();
                spec.auth = channel.clone();
                self.registry.bind_transport(spec).await?
            }
        };
        let addr = transport.local_addr();
        if matches!(security, Security::Insecure) {
            tracing::warn!(
                id = %config.id,
                "INSECURE MODE: membership is not authenticated; anyone who reaches {addr} \
                 can join the cluster and speak for any member"
            );
        }
        let membership_config = self
            .membership
            .unwrap_or_else(|| config.membership.config());
        let joining =
            join::prepare(&storage, config.join_handoff, !config.seeds.is_empty()).await?;
        let machine = Membership::new(
            membership_config,
            NodeStart {
                id,
                generation,
                meta: MemberMeta {
                    joining,
                    ..MemberMeta::new(addr.clone())
                },
                seeds: config.seeds.iter().map(Address::new).collect(),
                rng_seed: self.rng_seed.unwrap_or_else(|| clock.now_ms() ^ id.0),
                security,
            },
            tokio::time::Instant::now().into_std(),
        );
        let shared_transport = transport.clone();
        let shared = Arc::new(transport.clone());
        let (rpc, inbound) = RpcEndpoint::start_answering_undecodable(
            transport,
            RpcConfig::default()
                .with_inbound_capacity(NonZeroUsize::new(16 * 1024).expect("non-zero")),
            |e| {
                Envelope::Replica(ReplicaMessage::Refused(Refusal::Undecodable {
                    reason: e.to_string(),
                }))
            },
        );
        let (membership, swim) = driver::start_shared(shared, machine);
        let n = config.replication_factor;
        let ring_config = RingConfig::default();
        let view = Arc::new(arc_swap::ArcSwap::from_pointee(View::build(
            &membership.members(),
            n,
            ring_config,
        )));
        let (deferred, deferred_rx) = mpsc::unbounded_channel();
        let (hint_tx, hint_rx) = mpsc::channel(hints::HINT_QUEUE);
        let inner = Arc::new(Inner {
            hints: config.hinted_handoff.then_some(hint_tx),
            sync: config
                .anti_entropy
                .then(|| sync::SyncState::new(config.sync_log_capacity.get())),
            merkle: (config.anti_entropy && config.merkle_anti_entropy).then(|| {
                merkle::MerkleState::new(config.anti_entropy_bandwidth.get(), clock.now_ms())
            }),
            cleanup: cleanup::CleanupState::new(
                config.anti_entropy_bandwidth.get(),
                clock.now_ms(),
            ),
            deferred,
            deferred_room: Arc::new(tokio::sync::Semaphore::new(DEFERRED_LIMIT)),
            id,
            hlc,
            storage,
            rpc,
            membership,
            view: view.clone(),
            stats: Counters::default(),
            gate: Gate::default(),
            stopping: AtomicBool::new(false),
            floor,
            bugs: self.bugs,
            channel,
            transport: shared_transport,
            healing: tokio::sync::Semaphore::new(replica::HEALING_SERVE_CONCURRENCY),
            config,
        });
        // The tree from storage, before the node applies anything.
        merkle::rebuild(&inner).await?;
        let mut tasks = vec![
            tokio::spawn(view::follow(
                inner.membership.view(),
                view,
                n,
                ring_config,
                inner.channel.as_ref().map(|c| c.book.clone()),
                view::Me {
                    id: inner.id,
                    seeded: !inner.config.seeds.is_empty(),
                },
                inner.config.join_settle,
                RingChanges(inner.clone()),
            )),
            tokio::spawn(dispatch(inner.clone(), inbound, swim)),
            tokio::spawn(purge_loop(inner.clone())),
            tokio::spawn(cleanup::run(inner.clone())),
            tokio::spawn(run_deferred(deferred_rx)),
        ];
        if joining {
            tasks.push(tokio::spawn(join::run(inner.clone())));
        }
        if inner.config.hinted_handoff {
            tasks.push(tokio::spawn(hints::run(inner.clone(), hint_rx)));
        }
        if inner.config.anti_entropy {
            tasks.push(tokio::spawn(sync::run(inner.clone())));
        }
        if inner.merkle.is_some() {
            tasks.push(tokio::spawn(merkle::run(inner.clone())));
        }
        let node = Node {
            inner,
            tasks: Arc::new(std::sync::Mutex::new(tasks)),
        };
        node.wait_for_join().await;
        Ok(node)
    }
}

/// Counts coordinated requests in flight, so a shutdown can wait for them.
#[derive(Debug, Default)]
struct Gate {
    closed: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

struct Pass<'a>(&'a Gate);

impl Gate {
    fn enter(&self) -> Result<Pass<'_>, ReplicationError> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            self.leave();
            return Err(ReplicationError::ShuttingDown);
        }
        Ok(Pass(self))
    }

    fn leave(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    async fn close_and_drain(&self) {
        self.closed.store(true, Ordering::SeqCst);
        loop {
            let idle = self.idle.notified();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// What every task of a node shares.
pub(crate) struct Inner {
    id: NodeId,
    config: NodeConfig,
    hlc: Hlc<Arc<dyn WallClock>>,
    storage: SharedStorage,
    rpc: RpcEndpoint<SharedTransport>,
    membership: MembershipHandle,
    view: Arc<arc_swap::ArcSwap<View>>,
    stats: Counters,
    gate: Gate,
    /// Set by the first shutdown or kill: a later one does not hand off again.
    stopping: AtomicBool,
    floor: Floor,
    bugs: PlantedBugs,
    /// Work left after a request returned (late answers, read repair), run by one task.
    deferred: mpsc::UnboundedSender<Deferred>,
    /// Room for deferred work: one permit per piece queued or running ([`DEFERRED_LIMIT`]).
    deferred_room: Arc<tokio::sync::Semaphore>,
    /// Missed writes to the hint task (`None` with hinted handoff off).
    hints: hints::HintQueue,
    /// Writes applied as a replica, for anti-entropy offers (`None` with it off).
    sync: sync::SyncLog,
    /// The Merkle tree and exchange schedule (`None` with anti-entropy off).
    merkle: Option<merkle::MerkleState>,
    /// Ranges a ring change took from this node, waiting to be handed off and removed.
    cleanup: cleanup::CleanupState,
    /// What the transport authenticates connections with (`None` in insecure mode).
    channel: Option<ChannelAuth>,
    /// The transport, for its counters.
    transport: SharedTransport,
    /// Permits for the expensive healing requests served at once
    /// ([`replica::HEALING_SERVE_CONCURRENCY`]); one not free is answered `Busy`.
    healing: tokio::sync::Semaphore,
}

/// What the view follower reports of each ring change, to the tasks that act on it.
struct RingChanges(Arc<Inner>);

impl view::RingChanges for RingChanges {
    fn gained(&self, peers: Vec<NodeId>) {
        self.0.co_replicas_gained(&peers);
    }

    fn lost(&self, ranges: Vec<crate::hash::HashRange>) {
        self.0.ranges_lost(ranges);
    }

    fn changed(&self) {
        self.0.cleanup.ring_changed();
    }
}

/// A piece of work that outlives the request that started it.
type Deferred = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Pieces of deferred work a node keeps at most, queued or running. Each ends by its
/// request's deadline (a read repair's by the request timeout after that), so in a healthy
/// node far fewer are outstanding (the request rate times the time a request's last
/// answers take); the bound holds when the deferred-work task falls behind, which would
/// otherwise queue work (a request's writes, its pending answers) without limit.
pub(crate) const DEFERRED_LIMIT: usize = 16_384;

/// A place for one piece of deferred work ([`Inner::deferred_room`]); giving it back (when
/// the piece ends or is dropped) keeps `deferred_pending` right.
pub(crate) struct Room {
    _permit: tokio::sync::OwnedSemaphorePermit,
    inner: Arc<Inner>,
}

impl Drop for Room {
    fn drop(&mut self) {
        self.inner
            .stats
            .deferred_pending
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Inner {
    /// Room for a piece of deferred work, or `None` with [`DEFERRED_LIMIT`] pieces
    /// outstanding: the caller then sheds the work (never waits, so a request's latency and
    /// its cancellation never depend on other requests' leftovers) and counts it in
    /// `deferred_shed`.
    pub(crate) fn deferred_room(self: &Arc<Self>) -> Option<Room> {
        match self.deferred_room.clone().try_acquire_owned() {
            Ok(permit) => {
                self.stats.deferred_pending.fetch_add(1, Ordering::Relaxed);
                Some(Room {
                    _permit: permit,
                    inner: self.clone(),
                })
            }
            Err(_) => {
                self.stats.deferred_shed.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Hands `work` to the node's deferred-work task, in `room`: one task drives every
    /// request's leftover work, which costs a channel send instead of a task per request.
    pub(crate) fn defer(
        &self,
        room: Room,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        // The channel closes only while the node stops, when leftover work is abandoned
        // anyway (the piece, and its room, are dropped).
        let _ = self.deferred.send(Box::pin(async move {
            work.await;
            drop(room);
        }));
    }
}

/// Drives deferred work until the node stops.
async fn run_deferred(mut work: mpsc::UnboundedReceiver<Deferred>) {
    use futures::StreamExt;
    let mut running = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            next = work.recv() => match next {
                Some(w) => running.push(w),
                None => break,
            },
            Some(()) = running.next(), if !running.is_empty() => {}
        }
    }
}

/// A running node. Cheap to clone; every clone is the same node.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.inner.id)
            .field("addr", &self.inner.rpc.local_addr())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// A builder with the default configuration, opening storage and transports through
    /// `registry` (the facade's `chorus::node()` passes `chorus::registry()`).
    pub fn builder(registry: Registry) -> NodeBuilder {
        NodeBuilder {
            config: NodeConfig::default(),
            registry,
            storage: None,
            transport: None,
            clock: None,
            membership: None,
            rng_seed: None,
            bugs: PlantedBugs::default(),
            identity: None,
            keyring: None,
        }
    }

    /// With seeds: waits until this node knows another live member, up to `join_timeout`.
    async fn wait_for_join(&self) {
        let config = &self.inner.config;
        if config.seeds.is_empty() {
            return;
        }
        let mut view = self.inner.membership.view();
        let joined = tokio::time::timeout(config.join_timeout, async {
            loop {
                let others = view
                    .borrow_and_update()
                    .iter()
                    .skip(1)
                    .any(|m| m.state == MemberState::Alive);
                if others || view.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if joined.is_err() {
            tracing::warn!(
                seeds = ?config.seeds,
                timeout = ?config.join_timeout,
                "no seed answered yet; starting alone and still trying them"
            );
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// Whether ownership is steady in this node's view: no member is joining, and no join
    /// ended within the last `join_settle` (during which writes still reach the ring from
    /// before it, so an `All` write there needs the departed replica too).
    pub fn ownership_settled(&self) -> bool {
        !self.inner.view.load().in_transition()
    }

    /// Whether this node is still joining: pulling the records of the ranges it will own, in
    /// no ring reads use (`NodeConfig::join_handoff`).
    pub fn is_joining(&self) -> bool {
        self.inner
            .membership
            .members()
            .iter()
            .any(|m| m.id == self.inner.id && m.meta.joining)
    }

    /// The address peers reach this node at.
    pub fn addr(&self) -> Address {
        self.inner.rpc.local_addr()
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    /// Connections the node's transport refused, by reason (TLS handshakes with keys outside
    /// the keyring, addresses of other members, revoked keys, malformed input, limits).
    pub fn transport_refusals(&self) -> crate::transport::ConnectionRefusals {
        self.inner.transport.refusals()
    }

    /// Counters of membership authentication: messages verified, and refused per kind.
    pub fn auth_stats(&self) -> AuthStats {
        self.inner.membership.auth_stats()
    }

    /// Counters of the membership protocol: probes, suspicions, and what it refused (relays,
    /// and what it dropped past the per-peer rate limits).
    pub fn membership_stats(&self) -> crate::membership::MembershipStats {
        self.inner.membership.membership_stats()
    }

    /// Replaces the keyring on the running node (keyring mode; a warning and nothing else in
    /// insecure mode): added keys are admitted at once, members whose key is gone are removed
    /// from the view and refused from then on.
    pub async fn set_keyring(&self, keyring: Keyring) {
        if let Some(channel) = &self.inner.channel {
            // Membership first, so a revoked member leaves the view (and the address book)
            // before its connections are refused.
            self.inner.membership.set_keyring(keyring.clone()).await;
            channel.keyring.replace(keyring);
        } else {
            self.inner.membership.set_keyring(keyring).await;
        }
    }

    /// Reads the configured keyring again (`security.keyring` and `security.keyring_file`)
    /// and applies it with [`Node::set_keyring`]. On an error the running keyring stays.
    pub async fn reload_keyring(&self) -> Result<usize, ConfigError> {
        let keyring = self.inner.config.security.load_keyring()?;
        let n = keyring.len();
        self.set_keyring(keyring).await;
        tracing::info!(keys = n, "keyring reloaded");
        Ok(n)
    }

    /// Stores `value` under `key` at the requested consistency; the version it was written
    /// with.
    pub async fn put(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        options: WriteOptions,
    ) -> Result<Version, ReplicationError> {
        one(self
            .put_many(vec![(key.into(), value.into())], options)
            .await)
    }

    /// Deletes `key` (writes a tombstone) at the requested consistency.
    pub async fn delete(
        &self,
        key: impl Into<Bytes>,
        options: WriteOptions,
    ) -> Result<Version, ReplicationError> {
        one(self.delete_many(vec![key.into()], options).await)
    }

    /// The live value of `key`, or `None` (never written, deleted or expired).
    pub async fn get(
        &self,
        key: impl Into<Bytes>,
        options: ReadOptions,
    ) -> Result<Option<Bytes>, ReplicationError> {
        Ok(self.get_versioned(key, options).await?.map(|v| v.value))
    }

    /// Like [`Node::get`], with the version of the value.
    pub async fn get_versioned(
        &self,
        key: impl Into<Bytes>,
        options: ReadOptions,
    ) -> Result<Option<Versioned>, ReplicationError> {
        coordinator::cooperate().await;
        let key = key.into();
        if let Some(local) = self.read_locally(&key, &options).await {
            return local;
        }
        one(self.get_many(vec![key], options).await)
    }

    /// The fast path of a single read at `One` of a key this node replicates: local storage,
    /// no message, no allocation beyond the value. `None` when it does not apply.
    async fn read_locally(
        &self,
        key: &Bytes,
        options: &ReadOptions,
    ) -> Option<Result<Option<Versioned>, ReplicationError>> {
        let inner = &self.inner;
        let consistency = options.consistency.unwrap_or(inner.config.read_consistency);
        if consistency != Consistency::One && consistency != Consistency::Count(NonZeroUsize::MIN) {
            return None;
        }
        if options.timeout.is_some_and(|t| t.is_zero()) || self.check_key(key).is_err() {
            return None;
        }
        if !view::is_replica(&inner.view.load(), key, inner.id) {
            return None;
        }
        let _pass = match inner.gate.enter() {
            Ok(pass) => pass,
            Err(e) => return Some(Err(e)),
        };
        let now_ms = inner.hlc.wall_clock().now_ms();
        Some(match inner.storage.get(key).await {
            Ok(record) => {
                inner.stats.local_reads.fetch_add(1, Ordering::Relaxed);
                inner.stats.reads.fetch_add(1, Ordering::Relaxed);
                Ok(live(record, now_ms))
            }
            Err(e) => Err(ReplicationError::Failed {
                op: Operation::Read,
                acks: 0,
                required: 1,
                refusals: vec![(inner.id, replica::storage_refusal(&e))],
                unreachable: 0,
            }),
        })
    }

    /// Stores each `(key, value)`; one result per entry, in order. Entries for the same
    /// replica travel in one message.
    pub async fn put_many(
        &self,
        entries: Vec<(Bytes, Bytes)>,
        options: WriteOptions,
    ) -> Result<Vec<Result<Version, ReplicationError>>, ReplicationError> {
        coordinator::cooperate().await;
        let expiry = match options.ttl {
            None => None,
            Some(ttl) => Some(self.expiry(ttl)?),
        };
        let records = entries
            .into_iter()
            .map(|(key, value)| {
                (key, move |version| {
                    let r = Record::value(value, version);
                    match expiry {
                        Some(at) => r.with_expiry(at),
                        None => r,
                    }
                })
            })
            .collect();
        self.write(records, options).await
    }

    /// Deletes each key; one result per key, in order.
    pub async fn delete_many(
        &self,
        keys: Vec<Bytes>,
        options: WriteOptions,
    ) -> Result<Vec<Result<Version, ReplicationError>>, ReplicationError> {
        coordinator::cooperate().await;
        let records = keys
            .into_iter()
            .map(|key| (key, Record::tombstone))
            .collect();
        self.write(records, options).await
    }

    /// Reads each key; one result per key, in order.
    pub async fn get_many(
        &self,
        keys: Vec<Bytes>,
        options: ReadOptions,
    ) -> Result<Vec<Result<Option<Versioned>, ReplicationError>>, ReplicationError> {
        coordinator::cooperate().await;
        let inner = &self.inner;
        let config = &inner.config;
        let required = options
            .consistency
            .unwrap_or(config.read_consistency)
            .required(config.replication_factor)
            .map_err(|e| self.invalid(e))?;
        let timeout = self.timeout(options.timeout)?;
        if keys.len() > MAX_BATCH {
            return Err(self.invalid(InvalidRequest::BatchTooLarge {
                len: keys.len(),
                max: MAX_BATCH,
            }));
        }
        let _pass = inner.gate.enter()?;
        let mut results: Vec<Option<Result<Option<Versioned>, ReplicationError>>> =
            (0..keys.len()).map(|_| None).collect();
        let mut remote = Vec::new();
        let mut remote_idx = Vec::new();
        let view = inner.view.load();
        let now_ms = inner.hlc.wall_clock().now_ms();
        for (i, key) in keys.into_iter().enumerate() {
            if let Err(e) = self.check_key(&key) {
                results[i] = Some(Err(self.invalid(e)));
                continue;
            }
            // A read at One of a key this node replicates: local storage, no message.
            if required == 1 && inner.is_local_replica(&view, &key) {
                let r = match inner.storage.get(&key).await {
                    Ok(record) => {
                        inner.stats.local_reads.fetch_add(1, Ordering::Relaxed);
                        inner.stats.reads.fetch_add(1, Ordering::Relaxed);
                        Ok(live(record, now_ms))
                    }
                    Err(e) => Err(ReplicationError::Failed {
                        op: Operation::Read,
                        acks: 0,
                        required,
                        refusals: vec![(inner.id, replica::storage_refusal(&e))],
                        unreachable: 0,
                    }),
                };
                results[i] = Some(r);
                continue;
            }
            remote.push(key);
            remote_idx.push(i);
        }
        drop(view);
        if !remote.is_empty() {
            let repair = options.repair.unwrap_or(config.read_repair);
            let answers = inner.read(remote, required, timeout, repair).await;
            for (i, r) in remote_idx.into_iter().zip(answers) {
                self.count(Operation::Read, &r);
                results[i] = Some(r.map(|record| live(record, now_ms)));
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every key answered"))
            .collect())
    }

    /// Stamps each record once with this node's clock and replicates it.
    async fn write<F: FnOnce(Version) -> Record>(
        &self,
        records: Vec<(Bytes, F)>,
        options: WriteOptions,
    ) -> Result<Vec<Result<Version, ReplicationError>>, ReplicationError> {
        let inner = &self.inner;
        let config = &inner.config;
        let required = options
            .consistency
            .unwrap_or(config.write_consistency)
            .required(config.replication_factor)
            .map_err(|e| self.invalid(e))?;
        let timeout = self.timeout(options.timeout)?;
        if records.len() > MAX_BATCH {
            return Err(self.invalid(InvalidRequest::BatchTooLarge {
                len: records.len(),
                max: MAX_BATCH,
            }));
        }
        let _pass = inner.gate.enter()?;
        let mut results: Vec<Option<Result<Version, ReplicationError>>> =
            (0..records.len()).map(|_| None).collect();
        let mut writes = Vec::with_capacity(records.len());
        let mut idx = Vec::with_capacity(records.len());
        for (i, (key, make)) in records.into_iter().enumerate() {
            if let Err(e) = self.check_key(&key) {
                results[i] = Some(Err(self.invalid(e)));
                continue;
            }
            let record = make(Version::new(inner.hlc.now(), inner.id));
            if let crate::record::Payload::Value(v) = &record.payload
                && v.len() > config.max_value_len.get()
            {
                results[i] = Some(Err(self.invalid(InvalidRequest::ValueTooLarge {
                    len: v.len(),
                    max: config.max_value_len.get(),
                })));
                continue;
            }
            idx.push((i, record.version));
            writes.push(Write { key, record });
        }
        if !writes.is_empty() {
            // The clock floor covers every version issued, before any leaves this node.
            if let Err(e) = inner.floor.cover(&inner.hlc, &inner.storage).await {
                return Err(ReplicationError::Failed {
                    op: Operation::Write,
                    acks: 0,
                    required,
                    refusals: vec![(inner.id, replica::storage_refusal(&e))],
                    unreachable: 0,
                });
            }
            let outcomes = inner.replicate(writes, required, timeout).await;
            for ((i, version), r) in idx.into_iter().zip(outcomes) {
                self.count(Operation::Write, &r);
                results[i] = Some(r.map(|()| version));
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every key answered"))
            .collect())
    }

    fn count<T>(&self, op: Operation, r: &Result<T, ReplicationError>) {
        let s = &self.inner.stats;
        let c = match r {
            Ok(_) if op == Operation::Read => &s.reads,
            Ok(_) => &s.writes,
            Err(ReplicationError::Unavailable { .. }) => &s.unavailable,
            Err(ReplicationError::Timeout { .. }) => &s.timeouts,
            Err(_) => &s.failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn check_key(&self, key: &[u8]) -> Result<(), InvalidRequest> {
        let max = self.inner.config.max_key_len.get();
        if key.is_empty() {
            Err(InvalidRequest::EmptyKey)
        } else if key.len() > max {
            Err(InvalidRequest::KeyTooLong {
                len: key.len(),
                max,
            })
        } else {
            Ok(())
        }
    }

    fn invalid(&self, e: InvalidRequest) -> ReplicationError {
        self.inner
            .stats
            .invalid_requests
            .fetch_add(1, Ordering::Relaxed);
        ReplicationError::Invalid(e)
    }

    fn timeout(&self, t: Option<Duration>) -> Result<Duration, ReplicationError> {
        let t = t.unwrap_or(self.inner.config.request_timeout);
        if t.is_zero() {
            return Err(self.invalid(InvalidRequest::ZeroTimeout));
        }
        Ok(t)
    }

    fn expiry(&self, ttl: Duration) -> Result<u64, ReplicationError> {
        let now = self.inner.hlc.wall_clock().now_ms();
        let ms = u64::try_from(ttl.as_millis()).ok();
        match ms.and_then(|ms| now.checked_add(ms)) {
            Some(at) if !ttl.is_zero() && at <= crate::hlc::MAX_PHYSICAL_MS => Ok(at),
            _ => Err(self.invalid(InvalidRequest::BadTtl(ttl))),
        }
    }

    /// The membership as this node sees it: itself first, then every member it knows.
    pub fn members(&self) -> Arc<[Member]> {
        self.inner.membership.members()
    }

    /// Every membership change from now on.
    pub fn events(&self) -> broadcast::Receiver<MembershipEvent> {
        self.inner.membership.subscribe()
    }

    /// The ring requests are routed by: each owning member's share.
    pub fn ring(&self) -> Vec<Ownership> {
        let view = self.inner.view.load();
        let mut out: Vec<Ownership> = view
            .members
            .iter()
            .map(|(&id, (addr, state))| Ownership {
                id,
                addr: addr.clone(),
                state: *state,
                primary_share: view.ring.primary_share(id),
                joining: view.is_joining(id),
            })
            .collect();
        out.sort_by_key(|o| o.id);
        out
    }

    /// The replicas of `key` in the current ring, first replica first.
    pub fn replicas_of(&self, key: &[u8]) -> Vec<NodeId> {
        self.inner.view.load().replicas(key)
    }

    /// Counters.
    pub fn stats(&self) -> NodeStats {
        self.inner.stats.snapshot()
    }

    /// The storage this node's replica data lives in.
    pub fn storage(&self) -> &SharedStorage {
        &self.inner.storage
    }

    /// Stops taking requests (new ones fail with [`ReplicationError::ShuttingDown`]),
    /// finishes those in flight, hands the records it replicates to the members that take
    /// its place (within [`NodeConfig::handoff_timeout`]; what they did not acknowledge is
    /// counted in [`NodeStats::leave_handoff_failed`] and logged), leaves the cluster (the
    /// departure is gossiped for a moment), hands off what it applied meanwhile, flushes and
    /// closes storage, and closes the transport. Besides the handoff, all within
    /// [`NodeConfig::shutdown_timeout`] (past it, what is left is abandoned and storage is
    /// still closed). Later calls return at once.
    pub async fn shutdown(&self) -> Result<(), StorageError> {
        let inner = &self.inner;
        let bound = inner.config.shutdown_timeout;
        let start = tokio::time::Instant::now();
        if tokio::time::timeout(bound, inner.gate.close_and_drain())
            .await
            .is_err()
        {
            tracing::warn!("shutdown: requests still in flight at the deadline; abandoned");
        }
        let drained = start.elapsed();
        let handoff_deadline = tokio::time::Instant::now() + inner.config.handoff_timeout;
        // Only the first shutdown hands off (a later call, or one after a kill, returns).
        let leave = if inner.stopping.swap(true, Ordering::SeqCst) {
            None
        } else {
            handoff::before_leave(inner, handoff_deadline).await
        };
        let grace = (bound / 4).min(Duration::from_secs(1));
        let left = bound.saturating_sub(drained);
        let _ = tokio::time::timeout(left, inner.membership.leave(grace)).await;
        handoff::after_leave(inner, leave).await;
        self.stop_tasks();
        let result = inner.storage.close().await;
        inner.rpc.close().await;
        match result {
            Err(StorageError::Closed) => Ok(()),
            other => other,
        }
    }

    /// Stops at once without leaving (to the cluster it looks like a crash) and closes the
    /// transport; storage is closed without waiting for requests in flight. For tests of
    /// failure; [`Node::shutdown`] is the orderly way.
    pub async fn kill(&self) {
        self.inner.gate.closed.store(true, Ordering::SeqCst);
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.membership.shutdown().await;
        self.stop_tasks();
        self.inner.rpc.close().await;
        let _ = self.inner.storage.close().await;
    }

    fn stop_tasks(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            t.abort();
        }
    }
}

/// `now + d`, or about thirty years from now where that does not fit an `Instant`: a
/// configured delay too long to represent means "not in this process's life", never "at
/// once".
pub(crate) fn later(now: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
    now.checked_add(d)
        .or_else(|| now.checked_add(FAR))
        .unwrap_or(now)
}

fn one<T>(
    results: Result<Vec<Result<T, ReplicationError>>, ReplicationError>,
) -> Result<T, ReplicationError> {
    results?
        .pop()
        .unwrap_or(Err(ReplicationError::ShuttingDown))
}

/// The value a reader sees: none for tombstones and expired values.
fn live(record: Option<Record>, now_ms: u64) -> Option<Versioned> {
    let record = record?;
    let value = record.live_value(now_ms)?.clone();
    Some(Versioned {
        value,
        version: record.version,
    })
}

/// The receive side of the node's endpoint: membership messages to the driver (never
/// waiting), each replica request served on its own task.
async fn dispatch(
    inner: Arc<Inner>,
    mut inbound: mpsc::Receiver<Inbound<Envelope>>,
    swim: SwimInbox,
) {
    while let Some(request) = inbound.recv().await {
        let Inbound {
            from,
            header,
            message,
        } = request;
        match message {
            Envelope::Swim(m) => swim.deliver(from, crate::membership::SwimFrame::Plain(m)),
            Envelope::SwimSigned(m) => swim.deliver(from, crate::membership::SwimFrame::Signed(m)),
            Envelope::Replica(m) => {
                let inner = inner.clone();
                let mut serving = Box::pin(async move {
                    let reply = Envelope::Replica(inner.serve(&from, m).await);
                    if let Err(e) = inner.rpc.respond_to(&from, header, &reply).await {
                        inner.stats.replies_not_sent.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%from, error = %e, "replica reply not sent");
                    }
                });
                // Most requests complete at once (a memory backend, a transport queue with
                // room): finish those here and spawn a task only for one that has to wait
                // (a disk, a full queue), so this loop never waits on either.
                if futures::FutureExt::now_or_never(&mut serving).is_none() {
                    tokio::spawn(serving);
                }
            }
        }
    }
}

/// Removes tombstones and expired values once their grace period is over, and rebuilds the
/// Merkle tree from storage: after a purge that removed records, after an apply whose effect
/// was unknown, and every `merkle_rebuild_interval`. One task, so the two never overlap.
async fn purge_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.config.purge_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut rebuild_tick = tokio::time::interval(inner.config.merkle_rebuild_interval);
    rebuild_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    rebuild_tick.tick().await;
    let mut check = tokio::time::interval(merkle::RETRY);
    check.tick().await;
    loop {
        let rebuild = tokio::select! {
            _ = tick.tick() => match purge(&inner).await {
                Some(removed) => removed,
                None => return,
            },
            _ = rebuild_tick.tick() => true,
            _ = check.tick() => inner.merkle.as_ref().is_some_and(|m| m.tree.needs_rebuild()),
        };
        if rebuild && inner.merkle.is_some() {
            match merkle::rebuild(&inner).await {
                Ok(_) => {}
                Err(StorageError::Closed) => return,
                Err(e) => tracing::warn!(error = %e, "Merkle rebuild failed; retried later"),
            }
        }
    }
}

/// One purge; whether it removed anything (`None`: storage is closed).
async fn purge(inner: &Inner) -> Option<bool> {
    let now_ms = inner.hlc.wall_clock().now_ms();
    match inner
        .storage
        .purge(now_ms, inner.config.tombstone_grace)
        .await
    {
        Ok(stats) => {
            let removed = stats.tombstones + stats.expired;
            inner.stats.purged.fetch_add(removed, Ordering::Relaxed);
            Some(removed > 0)
        }
        Err(StorageError::Closed) => None,
        Err(e) => {
            tracing::warn!(error = %e, "purge failed; retried next interval");
            Some(false)
        }
    }
}
