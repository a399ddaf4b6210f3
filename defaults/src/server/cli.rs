//! The `chorus` command line: `serve`, `config check|default`, the client commands
//! (`get`, `put`, `del`, `members`, `ring`, `status`), `demo` and `cluster`.
//!
//! Exit codes: 0 success, 1 a runtime failure (a server error, an unreachable node, an
//! unclean shutdown), 2 a usage or configuration error.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use super::client::{Client, ClientError, Value};
use super::config::{LogFormat, ServerConfig};
use super::{Server, demo};

#[derive(Debug, Parser)]
#[command(
    name = "chorus",
    version,
    about = "Chorus: a leaderless replicated key-value cluster that speaks the Redis protocol"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a node: the Redis-protocol client API, the admin HTTP listener and the cluster
    /// transport. SIGTERM or SIGINT shut it down gracefully (exit 0); SIGHUP reloads the
    /// keyring (`security.keyring` and `security.keyring_file`).
    Serve {
        /// The configuration file (TOML; see docs/OPERATIONS.md). Without it, the defaults
        /// and the CHORUS_* environment variables.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Creates a node identity at FILE (mode 0600) unless one is there, and prints its
    /// keyring line: the public key and a label.
    Identity {
        /// The identity file (a node's default is `identity.key` in its `storage.path`).
        file: PathBuf,
    },
    /// Checks or prints configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Reads a key.
    Get {
        /// The key.
        key: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Writes a key.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Time to live, as 500ms, 30s, 5m or 2h.
        #[arg(long)]
        ttl: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Deletes keys.
    Del {
        /// The keys.
        #[arg(required = true)]
        keys: Vec<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Lists the members as one node sees them.
    Members {
        #[command(flatten)]
        conn: Conn,
    },
    /// Shows each owning member's share of the ring.
    Ring {
        #[command(flatten)]
        conn: Conn,
    },
    /// Shows one node's status: identity, members, ring, storage, counters.
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// Starts a local 3-node cluster, runs a short scripted scenario (quorum write, a node
    /// stopped and the honest error at ALL, reads still served at QUORUM, the node restarted
    /// and repaired) and exits, or keeps serving with --keep.
    Demo {
        /// Keep the cluster running after the scenario, until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Starts N local `chorus serve` processes with their configs, data and logs in DIR, until
    /// Ctrl-C; then stops them all.
    Cluster {
        /// How many nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Where the configuration files, data and logs go (kept across runs: edit the files
        /// to experiment).
        #[arg(long)]
        dir: PathBuf,
        /// Node i listens for clients on BASE+i-1, for peers on BASE+100+i-1 and for admin
        /// HTTP on BASE+200+i-1.
        #[arg(long, default_value_t = 7000)]
        base_port: u16,
        /// The storage backend of every node (`memory`, `file`, ... as compiled in).
        #[arg(long, default_value = "memory")]
        backend: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Parses and validates FILE (with the CHORUS_* environment variables applied); names
    /// the wrong field and why.
    Check {
        /// The file.
        file: PathBuf,
    },
    /// Prints every setting with its default.
    Default,
}

#[derive(Debug, Args)]
struct Conn {
    /// The node's client address.
    #[arg(long, default_value = "127.0.0.1:6379")]
    addr: String,
    /// The password, if the node requires AUTH.
    #[arg(
        long,
        env = "CHORUS_CLIENT_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    password: String,
    /// Consistency for this command (one, quorum, all or a count); the node's default
    /// otherwise.
    #[arg(long)]
    consistency: Option<String>,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs the command line; the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::Config { command } => config(command),
        Command::Identity { file } => report(identity(&file)),
        Command::Demo { keep } => report(demo::demo(keep)),
        Command::Cluster {
            nodes,
            dir,
            base_port,
            backend,
        } => report(demo::cluster(nodes, &dir, base_port, &backend)),
        other => report(client_command(other)),
    }
}

/// `chorus identity FILE`: the keyring line of the identity at `file`, created if absent.
fn identity(file: &std::path::Path) -> Result<(), String> {
    let (identity, created) =
        chorus_core::runtime::keys::load_or_create_identity(file).map_err(|e| e.to_string())?;
    if created {
        eprintln!("created {}", file.display());
    }
    println!("{} node-{}", identity.public_key(), identity.node_id());
    Ok(())
}

fn report(r: Result<(), String>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chorus: {e}");
            ExitCode::FAILURE
        }
    }
}

fn config(command: ConfigCommand) -> ExitCode {
    match command {
        ConfigCommand::Check { file } => match ServerConfig::load(Some(&file), std::env::vars()) {
            Ok(c) => {
                println!(
                    "{}: ok (node {}, clients on {}, storage {})",
                    file.display(),
                    c.node.id.0,
                    c.client.listen,
                    c.node.storage.scheme
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("chorus: {e}");
                ExitCode::from(2)
            }
        },
        ConfigCommand::Default => {
            print!("{}", ServerConfig::default().to_toml());
            ExitCode::SUCCESS
        }
    }
}

fn init_logging(config: &ServerConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        _ => builder.try_init(),
    };
}

fn serve(path: Option<PathBuf>) -> ExitCode {
    let config = match ServerConfig::load(path.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chorus: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.runtime.worker_threads > 0 {
        builder.worker_threads(config.runtime.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chorus: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bound = config.client.shutdown_grace
        + config.node.shutdown_timeout
        + config.node.handoff_timeout
        + Duration::from_secs(1);
    runtime.block_on(async move {
        let server = match Server::start(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("chorus: {e}");
                return ExitCode::FAILURE;
            }
        };
        // Installed before the ready line: a SIGHUP right after it must not kill the process.
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        // One machine-readable line on stdout, for scripts and tests (ports may be 0).
        println!(
            "chorus ready: node={} client={} admin={} cluster={}",
            server.node().id().0,
            server.client_addr(),
            server
                .admin_addr()
                .map_or_else(|| "-".to_string(), |a| a.to_string()),
            server.node().addr()
        );
        let _ = std::io::stdout().flush();
        let reloads = tokio::spawn(reload_keyring_on_sighup(server.node().clone(), hup));
        let signal = wait_for_signal().await;
        reloads.abort();
        tracing::info!(signal, ?bound, "shutting down");
        match tokio::time::timeout(bound, server.shutdown()).await {
            Ok(Ok(())) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Ok(Err(e)) => {
                eprintln!("chorus: shutdown: {e}");
                ExitCode::FAILURE
            }
            Err(_) => {
                eprintln!("chorus: shutdown did not finish within {bound:?}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Reloads the node's keyring at every SIGHUP; a keyring that does not load is logged and the
/// running one stays.
async fn reload_keyring_on_sighup(
    node: chorus_core::runtime::node::Node,
    hup: std::io::Result<tokio::signal::unix::Signal>,
) {
    let Ok(mut hup) = hup else {
        tracing::warn!("no SIGHUP handler: the keyring cannot be reloaded by signal");
        return;
    };
    while hup.recv().await.is_some() {
        match node.reload_keyring().await {
            Ok(keys) => tracing::info!(keys, "SIGHUP: keyring reloaded"),
            Err(error) => {
                tracing::error!(%error, "SIGHUP: keyring not reloaded; the running keyring stays");
            }
        }
    }
}

/// Waits for SIGTERM or SIGINT; its name.
pub(crate) async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers there is nothing to wait for but the process's end.
        std::future::pending::<()>().await;
        return "none";
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

fn connect(conn: &Conn) -> Result<Client, String> {
    let mut client = Client::connect(&conn.addr, &conn.password).map_err(|e| e.to_string())?;
    if let Some(c) = &conn.consistency {
        client
            .call(&["CHORUS.CONSISTENCY", "both", c])
            .map_err(|e| format!("--consistency {c}: {e}"))?;
    }
    Ok(client)
}

fn client_command(command: Command) -> Result<(), String> {
    let e = |e: ClientError| e.to_string();
    match command {
        Command::Get { key, conn } => {
            let value = connect(&conn)?.call(&["GET", &key]).map_err(e)?;
            if conn.json {
                println!(
                    "{}",
                    serde_json::json!({ "key": key, "value": value.to_json() })
                );
            } else {
                println!("{}", value.as_text());
            }
        }
        Command::Put {
            key,
            value,
            ttl,
            conn,
        } => {
            let mut client = connect(&conn)?;
            match ttl {
                Some(t) => {
                    let d = super::config::duration::parse(&t)
                        .ok_or_else(|| format!("--ttl {t}: write <n>ms, <n>s, <n>m or <n>h"))?;
                    let ms = d.as_millis().to_string();
                    client.call(&["SET", &key, &value, "PX", &ms]).map_err(e)?;
                }
                None => {
                    client.call(&["SET", &key, &value]).map_err(e)?;
                }
            }
            if conn.json {
                println!("{}", serde_json::json!({ "key": key, "ok": true }));
            } else {
                println!("OK");
            }
        }
        Command::Del { keys, conn } => {
            let mut args = vec!["DEL"];
            args.extend(keys.iter().map(String::as_str));
            let n = connect(&conn)?.call(&args).map_err(e)?;
            if conn.json {
                println!("{}", serde_json::json!({ "deleted": n.to_json() }));
            } else {
                println!("{}", n.as_text());
            }
        }
        Command::Members { conn } => {
            let v = connect(&conn)?.call(&["CHORUS.MEMBERS"]).map_err(e)?;
            rows(
                &v,
                &["id", "addr", "state", "generation", "incarnation", "self"],
                conn.json,
            );
        }
        Command::Ring { conn } => {
            let v = connect(&conn)?.call(&["CHORUS.RING"]).map_err(e)?;
            rows(
                &v,
                &["id", "addr", "state", "joining", "primary_share"],
                conn.json,
            );
        }
        Command::Status { conn } => {
            let v = connect(&conn)?.call(&["CHORUS.STATUS"]).map_err(e)?;
            let pairs = v.pairs();
            if conn.json {
                let map: serde_json::Map<String, serde_json::Value> = pairs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_json()))
                    .collect();
                println!("{}", serde_json::Value::Object(map));
            } else {
                let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
                for (k, v) in pairs {
                    match v {
                        Value::Array(items)
                            if items.iter().all(|i| matches!(i, Value::Array(_))) =>
                        {
                            println!("{k}:");
                            for item in items {
                                let fields: Vec<String> = item
                                    .pairs()
                                    .iter()
                                    .map(|(k, v)| format!("{k}={}", v.as_text()))
                                    .collect();
                                println!("  {}", fields.join(" "));
                            }
                        }
                        v => println!("{k:width$}  {}", v.as_text()),
                    }
                }
            }
        }
        _ => unreachable!("handled in main"),
    }
    Ok(())
}

/// Prints an array of maps as a table with `columns`, or as JSON objects.
fn rows(v: &Value, columns: &[&str], json: bool) {
    let Value::Array(items) = v else {
        println!("{}", v.as_text());
        return;
    };
    let table: Vec<Vec<(String, Value)>> = items.iter().map(Value::pairs).collect();
    if json {
        let out: Vec<serde_json::Value> = table
            .iter()
            .map(|row| {
                serde_json::Value::Object(
                    row.iter().map(|(k, v)| (k.clone(), v.to_json())).collect(),
                )
            })
            .collect();
        println!("{}", serde_json::Value::Array(out));
        return;
    }
    let cell = |row: &[(String, Value)], c: &str| {
        row.iter()
            .find(|(k, _)| k == c)
            .map(|(_, v)| v.as_text())
            .unwrap_or_default()
    };
    let widths: Vec<usize> = columns
        .iter()
        .map(|c| {
            table
                .iter()
                .map(|r| cell(r, c).len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!(
        "{}",
        line(columns.iter().map(|c| c.to_uppercase()).collect())
    );
    for row in &table {
        println!("{}", line(columns.iter().map(|c| cell(row, c)).collect()));
    }
}
