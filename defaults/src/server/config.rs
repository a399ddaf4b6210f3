//! The server's configuration file: the node's settings plus the client listener, the admin
//! listener and logging; environment variables override fields.
//!
//! A file names only what it changes; every field has a default (`chorus config default`
//! prints them all). Every field can also be set by an environment variable named
//! `CHORUS_` followed by its dotted path in upper case with `_` for the dots:
//! `client.listen` is `CHORUS_CLIENT_LISTEN`, `node.transport.bind` is
//! `CHORUS_NODE_TRANSPORT_BIND`, a transport option `node.transport.options.advertise` is
//! `CHORUS_NODE_TRANSPORT_OPTIONS_ADVERTISE`, and a list (`node.seeds`) is written with commas.
//! The variable wins over the file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::NodeConfig;

/// Prefix of the environment variables that override fields.
pub const ENV_PREFIX: &str = "CHORUS_";

/// Everything `chorus serve` runs with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The node: id, cluster transport and its addresses, seeds, storage, replication,
    /// timeouts, membership preset ([`NodeConfig`]).
    pub node: NodeConfig,
    /// The Redis-protocol client listener and its limits.
    pub client: ClientConfig,
    /// The admin HTTP listener (metrics, status, health).
    pub admin: AdminConfig,
    /// Logging.
    pub log: LogConfig,
    /// The async runtime the server runs on.
    pub runtime: RuntimeConfig,
}

/// The async runtime (tokio's multi-threaded scheduler).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RuntimeConfig {
    /// Worker threads; 0: one per core. Nodes that share a machine's cores with each other
    /// (a local cluster) waste less time handing tasks between threads with one each.
    pub worker_threads: usize,
}

/// The client listener (the Redis protocol) and its limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ClientConfig {
    /// `ip:port` the Redis-protocol listener binds (port 0: any free port).
    pub listen: String,
    /// Password `AUTH` must give; empty: no authentication.
    pub password: String,
    /// Connections served at once; more are answered with an error and closed.
    pub max_connections: usize,
    /// Bytes one command may take on the wire (all its arguments and framing).
    pub max_request_bytes: usize,
    /// Bytes of one argument (a bulk string).
    pub max_bulk_bytes: usize,
    /// Arguments of one command, its name included.
    pub max_args: usize,
    /// A connection that sends nothing for this long is closed; `0s`: never.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// On shutdown, how long connections may take to finish the commands they are running
    /// before they are closed (the node's own `node.shutdown_timeout` follows).
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            listen: "127.0.0.1:6379".into(),
            password: String::new(),
            max_connections: 10_000,
            max_request_bytes: 64 * 1024 * 1024,
            max_bulk_bytes: 16 * 1024 * 1024,
            max_args: 16 * 1024,
            idle_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(2),
        }
    }
}

/// The admin HTTP listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AdminConfig {
    /// `ip:port` for `/metrics`, `/status`, `/health/live`, `/health/ready`; empty: no admin
    /// listener.
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9090".into(),
        }
    }
}

/// Log output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct LogConfig {
    /// `text` or `json` lines, on standard error.
    pub format: LogFormat,
    /// A `tracing` filter (`info`, `chorus=debug,warn`); `RUST_LOG` wins when set.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Why a configuration was refused. The message names the field and says why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message, with the line.
        message: String,
    },
    /// A field is unknown or holds a value of the wrong type or form.
    #[error("`{field}`: {reason}{}", origin.as_ref().map(|o| format!(" (set by {o})")).unwrap_or_default())]
    Field {
        /// The dotted path of the field.
        field: String,
        /// Why.
        reason: String,
        /// The environment variable that set it, if one did.
        origin: Option<String>,
    },
    /// An environment variable names no field or holds a value of the wrong type.
    #[error("{var}: {reason}")]
    Env {
        /// The variable.
        var: String,
        /// Why.
        reason: String,
    },
}

fn field(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.into(),
        reason: reason.into(),
        origin: None,
    }
}

impl ServerConfig {
    /// Reads `path` (or only the defaults without one), applies the `CHORUS_*` variables of
    /// `env` and validates the result.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<ServerConfig, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.display().to_string(),
                source,
            })?,
            None => String::new(),
        };
        let name = path.map_or("<defaults>".to_string(), |p| p.display().to_string());
        Self::parse(&name, &text, env)
    }

    /// Parses `text` (the contents of the file `name`), applies the `CHORUS_*` variables of
    /// `env` and validates the result.
    pub fn parse(
        name: &str,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<ServerConfig, ConfigError> {
        let file: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: name.to_string(),
                message: e.to_string().trim_end().to_string(),
            })?;
        // The file over the defaults, table by table: `[node.storage] path = ...` keeps the
        // default scheme.
        let mut table = match toml::Value::try_from(ServerConfig::default()) {
            Ok(toml::Value::Table(t)) => t,
            _ => toml::Table::new(),
        };
        merge(&mut table, file);
        let origins = apply_env(&mut table, env)?;
        let config: ServerConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let path = e.path().to_string();
                let origin = origins.get(&path).cloned();
                ConfigError::Field {
                    field: path,
                    reason: e.into_inner().message().to_string(),
                    origin,
                }
            })?;
        config.validate().map_err(|e| match e {
            ConfigError::Field { field, reason, .. } => {
                let origin = origins.get(&field).cloned();
                ConfigError::Field {
                    field,
                    reason,
                    origin,
                }
            }
            other => other,
        })?;
        Ok(config)
    }

    /// Checks values and relations between fields that their types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.node.validate().map_err(|e| {
            let crate::runtime::node::ConfigError::Invalid { field: f, reason } = e else {
                return field("node", e.to_string());
            };
            field(format!("node.{f}"), reason)
        })?;
        let registry = crate::registry();
        let backends = registry.backend_names();
        if !backends.contains(&self.node.storage.scheme) {
            return Err(field(
                "node.storage.scheme",
                format!(
                    "no backend `{}` in this build; available: {}",
                    self.node.storage.scheme,
                    backends.join(", ")
                ),
            ));
        }
        let transports = registry.transport_names();
        if !transports.contains(&self.node.transport.scheme) {
            return Err(field(
                "node.transport.scheme",
                format!(
                    "no transport `{}` in this build; available: {}",
                    self.node.transport.scheme,
                    transports.join(", ")
                ),
            ));
        }
        socket_addr("node.transport.bind", &self.node.transport.bind)?;
        socket_addr("client.listen", &self.client.listen)?;
        if !self.admin.listen.is_empty() {
            socket_addr("admin.listen", &self.admin.listen)?;
        }
        let c = &self.client;
        for (name, v) in [
            ("client.max_connections", c.max_connections),
            ("client.max_request_bytes", c.max_request_bytes),
            ("client.max_bulk_bytes", c.max_bulk_bytes),
        ] {
            if v == 0 {
                return Err(field(name, "must not be zero"));
            }
        }
        if c.max_args < 3 {
            return Err(field(
                "client.max_args",
                "must be at least 3 (`SET key value`)",
            ));
        }
        if c.max_bulk_bytes > c.max_request_bytes {
            return Err(field(
                "client.max_bulk_bytes",
                format!(
                    "{} exceeds client.max_request_bytes ({})",
                    c.max_bulk_bytes, c.max_request_bytes
                ),
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.filter).is_err() {
            return Err(field(
                "log.filter",
                format!("`{}` is not a tracing filter", self.log.filter),
            ));
        }
        Ok(())
    }

    /// The whole configuration as TOML, defaults included.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# not representable as TOML: {e}\n"))
    }
}

/// Copies `over` onto `base`; tables merge key by key, anything else replaces.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn socket_addr(name: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        field(
            name,
            format!("`{value}` is not an `ip:port` address (for example 127.0.0.1:6379)"),
        )
    })
}

/// Applies every `CHORUS_*` variable to `table`; the fields they set, by dotted path, with the
/// variable's name.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let schema = schema();
    let mut origins = BTreeMap::new();
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (var, value) in vars {
        let rest = var[ENV_PREFIX.len()..].to_ascii_lowercase();
        let section = rest.split('_').next().unwrap_or_default();
        // Variables of other tools or tests (`CHORUS_SEED`) are not settings; only those that
        // start with a section's name are.
        if !schema.contains_key(section) {
            continue;
        }
        let Some((path, kind)) = resolve(&schema, &rest) else {
            return Err(ConfigError::Env {
                var,
                reason: "names no setting (see `chorus config default` for them all)".into(),
            });
        };
        let parsed = convert(&kind, &value).ok_or_else(|| ConfigError::Env {
            var: var.clone(),
            reason: format!("`{value}` is not {}", kind_name(&kind)),
        })?;
        set(table, &path, parsed).map_err(|reason| ConfigError::Env {
            var: var.clone(),
            reason,
        })?;
        origins.insert(path.join("."), var);
    }
    Ok(origins)
}

/// Every field with its default, as TOML values: what a variable is matched against.
fn schema() -> toml::Table {
    let mut schema = match toml::Value::try_from(ServerConfig::default()) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    };
    // Optional fields are absent from the defaults; name them.
    if let Some(toml::Value::Table(node)) = schema.get_mut("node") {
        for (section, field) in [
            ("storage", "path"),
            ("security", "identity_file"),
            ("security", "keyring_file"),
        ] {
            if let Some(toml::Value::Table(t)) = node.get_mut(section) {
                t.insert(field.into(), toml::Value::String(String::new()));
            }
        }
    }
    schema
}

/// Finds the field `rest` (lower case, `_` for both the dots and the underscores of names)
/// names: its path and its default value (for the type).
fn resolve(schema: &toml::Table, rest: &str) -> Option<(Vec<String>, toml::Value)> {
    for (key, value) in schema {
        if rest == key {
            if let toml::Value::Table(_) = value {
                return None;
            }
            return Some((vec![key.clone()], value.clone()));
        }
        let Some(tail) = rest
            .strip_prefix(key.as_str())
            .and_then(|t| t.strip_prefix('_'))
        else {
            continue;
        };
        if let toml::Value::Table(inner) = value {
            if inner.is_empty() {
                // A free-form map (a spec's options): the rest is the option's name.
                return Some((
                    vec![key.clone(), tail.to_string()],
                    toml::Value::String(String::new()),
                ));
            }
            if let Some((mut path, v)) = resolve(inner, tail) {
                path.insert(0, key.clone());
                return Some((path, v));
            }
        }
    }
    None
}

fn convert(kind: &toml::Value, value: &str) -> Option<toml::Value> {
    Some(match kind {
        toml::Value::String(_) => toml::Value::String(value.to_string()),
        toml::Value::Integer(_) => toml::Value::Integer(value.trim().parse().ok()?),
        toml::Value::Float(_) => toml::Value::Float(value.trim().parse().ok()?),
        toml::Value::Boolean(_) => toml::Value::Boolean(value.trim().parse().ok()?),
        toml::Value::Array(_) => toml::Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
        toml::Value::Datetime(_) | toml::Value::Table(_) => return None,
    })
}

fn kind_name(kind: &toml::Value) -> &'static str {
    match kind {
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "`true` or `false`",
        _ => "a valid value",
    }
}

fn set(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty path")?;
    let mut t = table;
    for p in parents {
        let entry = t
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = match entry {
            toml::Value::Table(inner) => inner,
            _ => return Err(format!("the file sets `{p}` to a value, not a table")),
        };
    }
    t.insert(last.clone(), value);
    Ok(())
}

/// Serde for durations as `"<n>ms|s|m|h"` strings (integers are read as milliseconds), the
/// same forms [`NodeConfig`] reads.
pub(crate) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        let ms = d.as_millis();
        let text = if ms.is_multiple_of(1000) {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        };
        s.serialize_str(&text)
    }

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

    pub(crate) fn parse(text: &str) -> Option<Duration> {
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

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = ServerConfig::default().to_toml();
        let back = ServerConfig::parse("t", &text, env(&[])).expect("defaults parse");
        assert_eq!(back, ServerConfig::default());
    }

    #[test]
    fn unknown_field_is_named_with_its_section() {
        let err = ServerConfig::parse("t", "[node]\nreplicaton_factor = 3\n", env(&[]))
            .expect_err("refused")
            .to_string();
        assert!(err.contains("`node.replicaton_factor`"), "{err}");
        assert!(err.contains("unknown field `replicaton_factor`"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let err = ServerConfig::parse("t", "[node]\nreplication_factor = 0\n", env(&[]))
            .expect_err("refused")
            .to_string();
        assert!(err.contains("node.replication_factor"), "{err}");
        let err = ServerConfig::parse("t", "[client]\nidle_timeout = \"soon\"\n", env(&[]))
            .expect_err("refused")
            .to_string();
        assert!(err.contains("client.idle_timeout"), "{err}");
        assert!(err.contains("not a duration"), "{err}");
    }

    #[test]
    fn relations_are_checked_and_named() {
        let err = ServerConfig::parse(
            "t",
            "[node]\nreplication_factor = 2\nwrite_consistency = \"3\"\n",
            env(&[]),
        )
        .expect_err("refused")
        .to_string();
        assert!(err.contains("node.write_consistency"), "{err}");
        let err = ServerConfig::parse("t", "[client]\nlisten = \"localhost\"\n", env(&[]))
            .expect_err("refused")
            .to_string();
        assert!(err.contains("client.listen"), "{err}");
        let err = ServerConfig::parse("t", "[node.storage]\nscheme = \"nope\"\n", env(&[]))
            .expect_err("refused")
            .to_string();
        assert!(err.contains("node.storage.scheme"), "{err}");
        assert!(err.contains("available: "), "{err}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let config = ServerConfig::parse(
            "t",
            "[client]\nlisten = \"127.0.0.1:1\"\n",
            env(&[
                ("CHORUS_CLIENT_LISTEN", "127.0.0.1:2"),
                ("CHORUS_NODE_ID", "7"),
                ("CHORUS_NODE_SEEDS", "127.0.0.1:10, 127.0.0.1:11"),
                ("CHORUS_NODE_REPLICATION_FACTOR", "1"),
                ("CHORUS_NODE_WRITE_CONSISTENCY", "one"),
                ("CHORUS_NODE_READ_CONSISTENCY", "1"),
                ("CHORUS_NODE_TRANSPORT_OPTIONS_ADVERTISE", "10.0.0.1:7946"),
                ("CHORUS_NODE_STORAGE_PATH", "/tmp/x"),
                ("CHORUS_NODE_SECURITY_IDENTITY_FILE", "/tmp/x/id.key"),
                ("CHORUS_NODE_SECURITY_KEYRING_FILE", "/tmp/keyring"),
                ("CHORUS_CLIENT_IDLE_TIMEOUT", "5s"),
                ("CHORUS_SEED", "42"),
            ]),
        )
        .expect("valid");
        assert_eq!(config.client.listen, "127.0.0.1:2");
        assert_eq!(config.node.id.0, 7);
        assert_eq!(config.node.seeds, vec!["127.0.0.1:10", "127.0.0.1:11"]);
        assert_eq!(config.node.replication_factor.get(), 1);
        assert_eq!(
            config
                .node
                .transport
                .options
                .get("advertise")
                .map(String::as_str),
            Some("10.0.0.1:7946")
        );
        assert_eq!(
            config.node.storage.path.as_deref(),
            Some(Path::new("/tmp/x"))
        );
        assert_eq!(
            config.node.security.identity_file.as_deref(),
            Some(Path::new("/tmp/x/id.key"))
        );
        assert_eq!(
            config.node.security.keyring_file.as_deref(),
            Some(Path::new("/tmp/keyring"))
        );
        assert_eq!(config.client.idle_timeout, Duration::from_secs(5));
    }

    #[test]
    fn bad_environment_values_name_the_variable() {
        let err = ServerConfig::parse("t", "", env(&[("CHORUS_NODE_ID", "seven")]))
            .expect_err("refused")
            .to_string();
        assert!(err.contains("CHORUS_NODE_ID"), "{err}");
        let err = ServerConfig::parse("t", "", env(&[("CHORUS_CLIENT_LISTEN_PORT", "1")]))
            .expect_err("refused")
            .to_string();
        assert!(err.contains("CHORUS_CLIENT_LISTEN_PORT"), "{err}");
        let err = ServerConfig::parse("t", "", env(&[("CHORUS_NODE_READ_CONSISTENCY", "most")]))
            .expect_err("refused")
            .to_string();
        assert!(err.contains("node.read_consistency"), "{err}");
        assert!(err.contains("CHORUS_NODE_READ_CONSISTENCY"), "{err}");
    }
}
