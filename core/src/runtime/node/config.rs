//! A node's settings: what [`super::NodeBuilder`] and a configuration file set.

use std::num::{NonZeroU64, NonZeroUsize};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::identity::NodeId;
use crate::membership::MembershipConfig;
use crate::registry::{StorageSpec, TransportSpec};
use crate::replication::Consistency;

/// Which [`MembershipConfig`] preset a node starts from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MembershipPreset {
    /// [`MembershipConfig::lan`]: a local network (the default).
    #[default]
    Lan,
    /// [`MembershipConfig::wan`]: a wide-area network.
    Wan,
    /// [`MembershipConfig::local`]: one machine (loopback, tests).
    Local,
}

impl MembershipPreset {
    /// The preset's configuration.
    pub fn config(self) -> MembershipConfig {
        match self {
            MembershipPreset::Lan => MembershipConfig::lan(),
            MembershipPreset::Wan => MembershipConfig::wan(),
            MembershipPreset::Local => MembershipConfig::local(),
        }
    }
}

/// When a read repairs the replicas that answered with an older record, or none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadRepair {
    /// After the reply, in the background (the default): the read is as fast as its R-th
    /// answer.
    #[default]
    Async,
    /// Before the reply: a read returns only once the winning record is on R replicas, so a
    /// later read at R sees it too (monotonic quorum reads, as Cassandra's blocking repair).
    Blocking,
    /// Never (reads only; anti-entropy and hints still heal).
    Off,
}

/// How a node authenticates the cluster's members: [`SecurityConfig::mode`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum SecurityMode {
    /// The default: the node has an Ed25519 identity, signs its membership messages and
    /// accepts only members whose key the keyring lists. Its id is the one bound to its key.
    #[default]
    Keyring,
    /// No authentication: anyone who can reach the node's port can join the cluster, claim to
    /// be any member and say anything about any member. Logged as a warning at start. For
    /// local experiments and tests only.
    Insecure,
}

/// Identity and keyring settings (`[security]` in a configuration file).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SecurityConfig {
    /// Keyring (the default) or insecure.
    pub mode: SecurityMode,
    /// The identity file; created with mode 0600 on first start. Default:
    /// `identity.key` in the storage's data directory (`storage.path`); a node without
    /// either needs [`super::NodeBuilder::identity`].
    pub identity_file: Option<std::path::PathBuf>,
    /// Public keys allowed in the cluster, 64 hex digits each.
    pub keyring: Vec<String>,
    /// A file of allowed public keys, one per line (`#` comments), read at start and by
    /// [`super::Node::reload_keyring`]. Its keys and `keyring`'s are all allowed.
    pub keyring_file: Option<std::path::PathBuf>,
}

impl SecurityConfig {
    /// Insecure mode, for tests and local experiments.
    pub fn insecure() -> Self {
        SecurityConfig {
            mode: SecurityMode::Insecure,
            ..SecurityConfig::default()
        }
    }

    /// The keyring these settings list (inline keys and the keyring file's).
    pub fn load_keyring(&self) -> Result<crate::auth::Keyring, ConfigError> {
        let mut ring = match &self.keyring_file {
            Some(path) => {
                crate::runtime::keys::read_keyring(path).map_err(|e| ConfigError::Invalid {
                    field: "security.keyring_file",
                    reason: e.to_string(),
                })?
            }
            None => crate::auth::Keyring::new(),
        };
        for (i, key) in self.keyring.iter().enumerate() {
            let key = key.parse().map_err(|e| ConfigError::Invalid {
                field: "security.keyring",
                reason: format!("entry {}: {e}", i + 1),
            })?;
            ring.insert(key).map_err(|e| ConfigError::Invalid {
                field: "security.keyring",
                reason: e.to_string(),
            })?;
        }
        Ok(ring)
    }
}

/// Everything a node is started with. Serde, so a configuration file can hold it; every
/// field has a default ([`NodeConfig::default`]), so a file names only what it changes.
///
/// Durations are written as `"<n>ms"`, `"<n>s"`, `"<n>m"` or `"<n>h"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct NodeConfig {
    /// This node's id in insecure mode; unique in the cluster and the same across restarts.
    /// In keyring mode (the default) the id is the one bound to the node's key, and this
    /// field is ignored.
    pub id: NodeId,
    /// Identity and keyring.
    pub security: SecurityConfig,
    /// The transport (registry name), the address it listens on and its options (the TCP
    /// transport's `advertise` among them: the address peers use, if not the listen one).
    pub transport: TransportSpec,
    /// Members to join through (`host:port`); empty to form a new cluster.
    pub seeds: Vec<String>,
    /// The storage backend (registry name), its data directory and options.
    pub storage: StorageSpec,
    /// The membership preset.
    pub membership: MembershipPreset,
    /// Replicas per key (N).
    pub replication_factor: NonZeroUsize,
    /// Reads' consistency when a request does not say.
    pub read_consistency: Consistency,
    /// Writes' consistency when a request does not say.
    pub write_consistency: Consistency,
    /// A request's deadline when it does not give one.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// Read repair's default mode.
    pub read_repair: ReadRepair,
    /// Longest key, in bytes.
    pub max_key_len: NonZeroUsize,
    /// Largest value, in bytes (it must also fit the transport's frame limit).
    pub max_value_len: NonZeroUsize,
    /// How long tombstones and expired values are kept before the purge removes them. It
    /// must exceed the longest time a replica may be unreachable and still come back with
    /// its data: a replica that missed a delete and returns after the tombstone is gone
    /// would bring the deleted value back through repair.
    #[serde(with = "duration")]
    pub tombstone_grace: Duration,
    /// How often the purge runs.
    #[serde(with = "duration")]
    pub purge_interval: Duration,
    /// How far ahead of this node's clock a record's version may be; further is refused.
    #[serde(with = "duration")]
    pub max_clock_drift: Duration,
    /// How long [`super::NodeBuilder::start`] waits, when there are seeds, until it knows at
    /// least one other member; past it the node starts anyway and keeps trying the seeds
    /// (a whole cluster restarting in any order must come up), with a warning.
    #[serde(with = "duration")]
    pub join_timeout: Duration,
    /// How long [`super::Node::shutdown`] may take in all, besides the handoff.
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
    /// How long a graceful leave ([`super::Node::shutdown`]) may spend handing the records
    /// it replicates to the members that take its place and waiting for their
    /// acknowledgements; what is not acknowledged by then is counted and logged.
    #[serde(with = "duration")]
    pub handoff_timeout: Duration,
    /// How long after a ring change took key ranges away from this node (a member joined and
    /// took them over) it waits before handing the records of those ranges to the keys'
    /// current replicas and removing its own copies, once every one of them acknowledged.
    /// The wait lets every member's view of the ring settle and anti-entropy stream the
    /// ranges to their new replicas first; a round that leaves records (a replica did not
    /// acknowledge) is retried after twice the previous wait, up to ten times this one.
    /// Besides, every `anti_entropy_interval` (first this long after the start), a sweep
    /// cleans every range the node does not replicate by the same rules, once the ring has
    /// been unchanged this long: copies a restart or a late write left behind.
    #[serde(with = "duration")]
    pub ownership_settle: Duration,
    /// Whether a node that starts with seeds and empty storage joins by pulling the records of
    /// the ranges it will own from their current replicas before it serves reads (see
    /// `docs/ARCHITECTURE.md`, "Handoff when ownership changes"). Off, it serves reads at once
    /// and anti-entropy fills it in meanwhile, so a read at R can miss a write until then.
    pub join_handoff: bool,
    /// How long a joining node waits, once it is the joiner whose turn it is, before it pulls;
    /// and how long after a join ends writes still reach the ring from before it. It must
    /// exceed the time membership news takes to reach every member plus `request_timeout`
    /// (writes a coordinator started before it heard of the join end within that).
    #[serde(with = "duration")]
    pub join_settle: Duration,
    /// How long a join may pull, from the start of its turn; past it the node serves reads
    /// with what it has, counted (`join_incomplete`) and logged. Pulls are metered by
    /// `anti_entropy_bandwidth`, and every range comes from each of its current replicas.
    #[serde(with = "duration")]
    pub join_pull_timeout: Duration,
    /// Whether a coordinator keeps hints for replicas that did not acknowledge a write and
    /// replays them when the replica is alive again (hinted handoff).
    pub hinted_handoff: bool,
    /// How long a hint is kept (Cassandra's `max_hint_window`); older ones are dropped and
    /// counted. `tombstone_grace` must exceed it.
    #[serde(with = "duration")]
    pub hint_window: Duration,
    /// Most hints kept for one replica; more are dropped and counted.
    pub max_hints_per_target: NonZeroUsize,
    /// Most bytes of hints (keys and encoded records) kept for one replica.
    pub max_hint_bytes_per_target: u64,
    /// Most hints replayed per second, over all replicas.
    pub hint_delivery_rate: u32,
    /// Whether the node heals its co-replicas by anti-entropy: it offers them the writes it
    /// applied as a replica (ring-buffer anti-entropy) and compares Merkle trees of the
    /// ranges it shares with each (Merkle anti-entropy).
    pub anti_entropy: bool,
    /// Whether anti-entropy keeps Merkle trees (with `anti_entropy` on): off, only the
    /// applied-writes log's offers heal, so divergence the log did not see (a co-replica
    /// overtaken in the log, a restart, silent damage) waits for reads and hints, and no
    /// tree is kept up to date on the write path. On unless measuring what the trees cost.
    pub merkle_anti_entropy: bool,
    /// How often every range shared with a co-replica is compared by Merkle anti-entropy (at
    /// least once per interval per co-replica, and at once for a co-replica first seen, in a
    /// new life, or overtaken in the applied-writes log). `tombstone_grace` must exceed it.
    /// The cleanup's sweep of ranges the node does not replicate runs as often.
    #[serde(with = "duration")]
    pub anti_entropy_interval: Duration,
    /// Most bytes a second Merkle anti-entropy sends (digest requests, offers and records),
    /// over all co-replicas.
    pub anti_entropy_bandwidth: NonZeroU64,
    /// Most Merkle exchanges in progress at once (each with a different co-replica).
    pub anti_entropy_concurrency: NonZeroUsize,
    /// How often the Merkle tree is rebuilt from storage (besides at start and after a purge
    /// that removed records), to catch changes that bypassed it: silent corruption, eviction.
    #[serde(with = "duration")]
    pub merkle_rebuild_interval: Duration,
    /// How often the anti-entropy offers go out. `tombstone_grace` must exceed it.
    #[serde(with = "duration")]
    pub sync_interval: Duration,
    /// Writes kept in the applied-writes log; a co-replica that falls further behind is
    /// compared by a scan of the shared records instead.
    pub sync_log_capacity: NonZeroUsize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: NodeId(1),
            security: SecurityConfig::default(),
            transport: TransportSpec::new("tcp", "127.0.0.1:7946"),
            seeds: Vec::new(),
            storage: StorageSpec::new("memory"),
            membership: MembershipPreset::Lan,
            replication_factor: NonZeroUsize::new(3).expect("non-zero"),
            read_consistency: Consistency::Quorum,
            write_consistency: Consistency::Quorum,
            request_timeout: Duration::from_secs(2),
            read_repair: ReadRepair::Async,
            max_key_len: NonZeroUsize::new(16 * 1024).expect("non-zero"),
            max_value_len: NonZeroUsize::new(1024 * 1024).expect("non-zero"),
            tombstone_grace: DEFAULT_TOMBSTONE_GRACE,
            purge_interval: Duration::from_secs(3600),
            max_clock_drift: crate::hlc::DEFAULT_MAX_DRIFT,
            join_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(10),
            handoff_timeout: Duration::from_secs(60),
            ownership_settle: Duration::from_secs(30),
            join_handoff: true,
            join_settle: Duration::from_secs(5),
            join_pull_timeout: Duration::from_secs(3600),
            hinted_handoff: true,
            hint_window: DEFAULT_HINT_WINDOW,
            max_hints_per_target: NonZeroUsize::new(100_000).expect("non-zero"),
            max_hint_bytes_per_target: 256 << 20,
            hint_delivery_rate: 2_000,
            anti_entropy: true,
            merkle_anti_entropy: true,
            anti_entropy_interval: Duration::from_secs(600),
            anti_entropy_bandwidth: NonZeroU64::new(8 << 20).expect("non-zero"),
            anti_entropy_concurrency: NonZeroUsize::new(2).expect("non-zero"),
            merkle_rebuild_interval: Duration::from_secs(7 * 24 * 3600),
            sync_interval: Duration::from_secs(1),
            sync_log_capacity: NonZeroUsize::new(65_536).expect("non-zero"),
        }
    }
}

/// [`NodeConfig::tombstone_grace`]'s default: one day. Deletes must outlive every outage a
/// replica can come back from with its data; a day covers a weekend-free on-call response
/// and is eight times the default hint window ([`DEFAULT_HINT_WINDOW`]).
pub const DEFAULT_TOMBSTONE_GRACE: Duration = Duration::from_secs(24 * 3600);

/// [`NodeConfig::hint_window`]'s default: 3 h, as Cassandra's `max_hint_window`.
pub const DEFAULT_HINT_WINDOW: Duration = Duration::from_secs(3 * 3600);

/// Why a [`NodeConfig`] was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A field holds a value the node cannot run with.
    #[error("`{field}`: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

impl NodeConfig {
    /// Checks relations between fields; a value of the wrong type or form is refused earlier,
    /// by the type itself (serde names the field).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = self.replication_factor;
        for (field, c) in [
            ("read_consistency", self.read_consistency),
            ("write_consistency", self.write_consistency),
        ] {
            c.required(n).map_err(|e| ConfigError::Invalid {
                field,
                reason: e.to_string(),
            })?;
        }
        for (field, d) in [
            ("request_timeout", self.request_timeout),
            ("purge_interval", self.purge_interval),
            ("shutdown_timeout", self.shutdown_timeout),
            ("handoff_timeout", self.handoff_timeout),
            ("ownership_settle", self.ownership_settle),
            ("join_settle", self.join_settle),
            ("join_pull_timeout", self.join_pull_timeout),
            ("hint_window", self.hint_window),
            ("sync_interval", self.sync_interval),
            ("anti_entropy_interval", self.anti_entropy_interval),
            ("merkle_rebuild_interval", self.merkle_rebuild_interval),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Invalid {
                    field,
                    reason: "must not be zero".into(),
                });
            }
        }
        if self.hinted_handoff {
            if self.hint_delivery_rate == 0 {
                return Err(ConfigError::Invalid {
                    field: "hint_delivery_rate",
                    reason: "must not be zero while hinted_handoff is on".into(),
                });
            }
            // A hint replayed after every replica purged the tombstone it would have lost to
            // brings a deleted value back.
            if self.tombstone_grace <= self.hint_window {
                return Err(ConfigError::Invalid {
                    field: "tombstone_grace",
                    reason: format!(
                        "{:?} must exceed hint_window ({:?}): a hint replayed after the \
                         tombstones it lost to were purged would resurrect deleted values",
                        self.tombstone_grace, self.hint_window
                    ),
                });
            }
        }
        if self.join_handoff && self.join_settle <= self.request_timeout {
            return Err(ConfigError::Invalid {
                field: "join_settle",
                reason: format!(
                    "{:?} must exceed request_timeout ({:?}): writes a coordinator started \
                     before it heard of a join must end before the joiner pulls",
                    self.join_settle, self.request_timeout
                ),
            });
        }
        // The ring from before a join stays a write set for join_settle after it ended; a
        // cleanup before then would remove copies that writes still count on.
        if self.join_handoff && self.ownership_settle <= self.join_settle {
            return Err(ConfigError::Invalid {
                field: "ownership_settle",
                reason: format!(
                    "{:?} must exceed join_settle ({:?}): the ring from before a join stays a \
                     write set for join_settle after it ended, and records it counts on must \
                     not be cleaned up before then",
                    self.ownership_settle, self.join_settle
                ),
            });
        }
        if self.anti_entropy && self.tombstone_grace <= self.sync_interval {
            return Err(ConfigError::Invalid {
                field: "tombstone_grace",
                reason: format!(
                    "{:?} must exceed sync_interval ({:?}): anti-entropy must get to offer a \
                     tombstone before it is purged",
                    self.tombstone_grace, self.sync_interval
                ),
            });
        }
        if self.anti_entropy && self.tombstone_grace <= self.anti_entropy_interval {
            return Err(ConfigError::Invalid {
                field: "tombstone_grace",
                reason: format!(
                    "{:?} must exceed anti_entropy_interval ({:?}): every shared range must be \
                     compared before its tombstones are purged",
                    self.tombstone_grace, self.anti_entropy_interval
                ),
            });
        }
        Ok(())
    }
}

/// Serde for durations as `"<n>ms|s|m|h"` strings (integers are read as milliseconds).
pub(crate) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the shortest exact form (`"1500ms"`, `"2s"`).
    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        let ms = d.as_millis();
        let text = if ms.is_multiple_of(3_600_000) && ms > 0 {
            format!("{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms > 0 {
            format!("{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        };
        s.serialize_str(&text)
    }

    /// Reads `"<n>ms"`, `"<n>s"`, `"<n>m"`, `"<n>h"` or an integer number of milliseconds.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Ms(u64),
            Text(String),
        }
        match Form::deserialize(d)? {
            Form::Ms(ms) => Ok(Duration::from_millis(ms)),
            Form::Text(t) => parse(&t).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "`{t}` is not a duration: write <n>ms, <n>s, <n>m or <n>h"
                ))
            }),
        }
    }

    fn parse(text: &str) -> Option<Duration> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit())?;
        let (n, unit) = text.split_at(split);
        let n: u64 = n.parse().ok()?;
        let ms = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return None,
        };
        Some(Duration::from_millis(n.checked_mul(ms)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_settle_defaults_to_thirty_seconds_and_must_not_be_zero() {
        let config = NodeConfig::default();
        assert_eq!(config.ownership_settle, Duration::from_secs(30));
        assert!(config.validate().is_ok());
        let zero = NodeConfig {
            ownership_settle: Duration::ZERO,
            ..NodeConfig::default()
        };
        let err = zero.validate().expect_err("zero settle refused");
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    field: "ownership_settle",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn ownership_settle_must_exceed_join_settle_while_joins_pull() {
        let config = NodeConfig {
            join_settle: Duration::from_secs(30),
            ownership_settle: Duration::from_secs(30),
            ..NodeConfig::default()
        };
        let err = config
            .validate()
            .expect_err("a cleanup within join_settle refused");
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    field: "ownership_settle",
                    ..
                }
            ),
            "{err}"
        );
        let off = NodeConfig {
            join_handoff: false,
            ..config
        };
        assert!(
            off.validate().is_ok(),
            "no pull, no ring from before a join"
        );
    }
}
