//! `cluster-load`: a load generator for a 3-node Chorus cluster (N = 3, W = R = 2) and, in the
//! same run, for Redis (a primary and two replicas, `SET` + `WAIT 1`), with Chorus/Redis ratios.
//!
//! ```text
//! cluster-load [--runs 3] [--secs 2] [--warm-up 0.5] [--keys 10000] [--value 100]
//!              [--in-flight 1,64,256] [--targets redis,inproc,tcp-memory,...] [--seed 1]
//! cluster-load node ...   (internal: one Chorus node of the TCP cluster, started by the above)
//! ```
//!
//! Targets: `redis`; `inproc` (three Chorus nodes on an in-process network, in this process);
//! `tcp-<backend>` with backend `memory`, `file-always`, `file-interval`, `sled` or `moka`
//! (node 1 embedded in this process, nodes 2 and 3 each their own process, TCP on loopback).
//! Every case (target x workload x in-flight count) warms up, then measures for `--secs`;
//! with `--runs R` every target runs R times, in the same order each time, and the tables show
//! medians; ratios are computed per run and their median shown. `--read-repair` overrides the
//! nodes' read repair mode for the gets (default: the node's, async). See `docs/BENCHMARKS.md`.

mod chorus_target;
mod load;
mod procs;
mod redis;
mod report;

use std::time::Duration;

use ::chorus::ReadRepair;
use load::{LoadSpec, Worker, Workload};
use report::Results;

/// Every process of the benchmark (the load generator with node 1, and nodes 2 and 3) uses
/// mimalloc, as a `chorus` server would: glibc's allocator serialises the two worker threads
/// on its arena locks when one thread frees what the other allocated (messages and records
/// cross threads on every request), which cost about 15% of the CPU of a put in profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    runs: usize,
    spec: LoadSpec,
    in_flight: Vec<usize>,
    targets: Vec<String>,
    wait_timeout: Duration,
    read_repair: Option<ReadRepair>,
}

const ALL_TARGETS: [&str; 7] = [
    "redis",
    "tcp-memory",
    "inproc",
    "tcp-file-always",
    "tcp-file-interval",
    "tcp-sled",
    "tcp-moka",
];

fn parse_secs(flag: &str, v: &str) -> Result<Duration, String> {
    let s: f64 = v.parse().map_err(|e| format!("{flag}: {e}"))?;
    if !(s > 0.0 && s < 3600.0) {
        return Err(format!("{flag}: must be between 0 and 3600 seconds"));
    }
    Ok(Duration::from_secs_f64(s))
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args {
        runs: 3,
        spec: LoadSpec {
            keys: 10_000,
            value_len: 100,
            warm_up: Duration::from_millis(500),
            window: Duration::from_secs(2),
            op_timeout: Duration::from_secs(2),
            seed: 1,
        },
        in_flight: vec![1, 64, 256],
        targets: ALL_TARGETS.iter().map(|s| s.to_string()).collect(),
        wait_timeout: Duration::from_secs(1),
        read_repair: None,
    };
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--runs" => args.runs = value.parse().map_err(|e| format!("--runs: {e}"))?,
            "--secs" => args.spec.window = parse_secs("--secs", &value)?,
            "--warm-up" => args.spec.warm_up = parse_secs("--warm-up", &value)?,
            "--keys" => args.spec.keys = value.parse().map_err(|e| format!("--keys: {e}"))?,
            "--value" => {
                args.spec.value_len = value.parse().map_err(|e| format!("--value: {e}"))?
            }
            "--seed" => args.spec.seed = value.parse().map_err(|e| format!("--seed: {e}"))?,
            "--in-flight" => {
                args.in_flight = value
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("--in-flight: {e}"))?
            }
            "--targets" => {
                args.targets = value.split(',').map(|s| s.trim().to_string()).collect();
                if let Some(bad) = args
                    .targets
                    .iter()
                    .find(|t| !ALL_TARGETS.contains(&t.as_str()))
                {
                    return Err(format!(
                        "--targets: unknown {bad:?}; known: {ALL_TARGETS:?}"
                    ));
                }
            }
            "--read-repair" => {
                args.read_repair = Some(match value.as_str() {
                    "async" => ReadRepair::Async,
                    "blocking" => ReadRepair::Blocking,
                    "off" => ReadRepair::Off,
                    other => {
                        return Err(format!(
                            "--read-repair: {other:?} is not async, blocking or off"
                        ));
                    }
                })
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.runs == 0 || args.spec.keys == 0 || args.in_flight.contains(&0) {
        return Err("--runs, --keys and every --in-flight must be positive".into());
    }
    Ok(args)
}

/// Preloads the keyspace, then runs every workload at every in-flight count.
async fn run_all<W, F, Fut>(
    target: &str,
    args: &Args,
    results: &mut Results,
    watch: &[u32],
    mut workers: F,
) -> Result<(), String>
where
    W: Worker,
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<W>, String>>,
{
    let failed = load::preload(workers(64).await?, &args.spec).await?;
    if failed > 0 {
        eprintln!("  {target}: {failed} preload puts failed and were retried");
    }
    for w in Workload::ALL {
        for &n in &args.in_flight {
            let r = load::run_case(workers(n).await?, w, &args.spec, watch).await;
            eprintln!(
                "  {target} {} {n}: {}/s p50 {} p99 {} p99.9 {} max {} errors {} misses {}{}",
                w.name(),
                report::fmt_ops(r.ops_per_sec),
                report::fmt_dur(r.p50),
                report::fmt_dur(r.p99),
                report::fmt_dur(r.p999),
                report::fmt_dur(r.max),
                r.errors,
                r.misses,
                r.first_error
                    .as_deref()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default()
            );
            let cpu: Vec<String> = r
                .cpu_per_op
                .iter()
                .map(|c| format!("{:.1}", c.as_secs_f64() * 1e6))
                .collect();
            eprintln!(
                "    CPU us per op of pids {watch:?} (this process first): {}",
                cpu.join(", ")
            );
            results.add(target, w, n, r);
        }
    }
    Ok(())
}

async fn run_target(target: &str, args: &Args, results: &mut Results) -> Result<(), String> {
    match target {
        "redis" => {
            let cluster = redis::RedisCluster::start().await?;
            let wait = args.wait_timeout;
            let mut watch = vec![std::process::id()];
            watch.extend(cluster.pids());
            run_all(target, args, results, &watch, |n| cluster.workers(n, wait)).await
        }
        "inproc" => {
            let cluster = chorus_target::ChorusCluster::start_inproc(args.spec.seed).await?;
            let outcome = run_chorus(target, &cluster, args, results).await;
            cluster.stop().await;
            outcome
        }
        other => {
            let backend = other
                .strip_prefix("tcp-")
                .ok_or(format!("unknown target {other}"))?;
            let cluster = chorus_target::ChorusCluster::start_tcp(backend).await?;
            let outcome = run_chorus(target, &cluster, args, results).await;
            cluster.stop().await;
            outcome
        }
    }
}

async fn run_chorus(
    target: &str,
    cluster: &chorus_target::ChorusCluster,
    args: &Args,
    results: &mut Results,
) -> Result<(), String> {
    let mut watch = vec![std::process::id()];
    watch.extend(cluster.pids());
    run_all(target, args, results, &watch, |n| {
        std::future::ready(Ok(cluster.workers(n, args.read_repair)))
    })
    .await?;
    if target == "inproc" || target == "tcp-memory" {
        for (what, rate) in cluster.local_reads(&args.spec).await? {
            results
                .local_reads
                .entry(format!("{target}{what}"))
                .or_default()
                .push(rate);
        }
    }
    Ok(())
}

fn main() {
    let mut argv = std::env::args().skip(1).peekable();
    if argv.peek().map(String::as_str) == Some("node") {
        argv.next();
        if let Err(e) = chorus_target::node_main(argv) {
            eprintln!("cluster-load node: {e}");
            std::process::exit(1);
        }
        return;
    }
    let args = match parse_args(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cluster-load: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut results = Results::default();
    runtime.block_on(async {
        for run in 1..=args.runs {
            for target in &args.targets {
                eprintln!("run {run}/{}: {target}", args.runs);
                if let Err(e) = run_target(target, &args, &mut results).await {
                    eprintln!("cluster-load: {target}: {e}");
                    std::process::exit(1);
                }
            }
        }
    });
    println!(
        "# cluster-load: 3 nodes, N = 3, W = R = 2, {} keys, {} B values, {} s windows after {} s warm-up, {} runs\n",
        args.spec.keys,
        args.spec.value_len,
        args.spec.window.as_secs_f64(),
        args.spec.warm_up.as_secs_f64(),
        args.runs
    );
    println!("{}", report::table(&results, &args.in_flight));
    println!("{}", report::ratios(&results, &args.in_flight));
}
