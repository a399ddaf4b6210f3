//! `swim-sim`: measured figures of the SWIM membership, from the deterministic simulator.
//!
//! ```text
//! cargo run --release -p chorus-benches --bin swim-sim -- [--seeds K] [--sizes 10,100,1000] [--seed S] [--signing on|off] [--only signing] [--threads N]
//! ```
//!
//! `--threads N` (default 2) decodes and verifies the messages in flight on N threads ahead
//! of delivery ([`Simulation::set_threads`]); the figures are the same for any N, only the
//! real time changes.
//!
//! `--signing on` runs every cluster in keyring mode (every message signed and verified);
//! the default is off. The last table always compares the two: for each size, from the first
//! seed, a cluster joins, converges and runs 60 s of steady state with signing off and on, and
//! the CPU time the simulation took (all of the process's threads, the helpers included,
//! from `/proc/self/task/*/schedstat`) is divided per member and per simulated second. `--only signing` prints that table alone.
//!
//! For each cluster size and seed (LAN preset, every message through the wire codec): joins the
//! cluster through three seeds, waits for convergence, lets the join news drain, measures the
//! steady-state load (messages and bytes sent per member per second), then crashes members one
//! at a time and records when each live member declares each of them dead. Then, with one
//! member whose incoming messages are processed 1.5 s late, counts false suspicions and false
//! deaths of healthy members with Lifeguard on and off, from the same seeds. Last, at N = 10
//! and 100 (those of `--sizes` up to 100), pauses one member at a time for 2 s (stop the
//! world: nothing it receives and none of its timers is processed meanwhile), five members
//! 15 s apart, and counts false suspicions and false deaths.

use std::time::Duration;

use chorus::membership::MembershipConfig;
use chorus::sim::Simulation;

const SEEDS: [usize; 3] = [0, 1, 2];
const CRASHES: usize = 5;
const LOAD_WINDOW: Duration = Duration::from_secs(60);

struct Args {
    seeds: u64,
    first_seed: u64,
    sizes: Vec<usize>,
    signing: bool,
    only_signing: bool,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seeds: 3,
        first_seed: 1,
        sizes: vec![10, 100, 1000],
        signing: false,
        only_signing: false,
        threads: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--seeds" => args.seeds = value.parse().map_err(|e| format!("--seeds: {e}"))?,
            "--seed" => args.first_seed = value.parse().map_err(|e| format!("--seed: {e}"))?,
            "--sizes" => {
                args.sizes = value
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("--sizes: {e}"))?;
                if args.sizes.iter().any(|&n| n < 5) {
                    return Err("--sizes: every size must be at least 5".into());
                }
            }
            "--signing" => {
                args.signing = match value.as_str() {
                    "on" => true,
                    "off" => false,
                    v => return Err(format!("--signing: `{v}` is not on or off")),
                }
            }
            "--only" if value == "signing" => args.only_signing = true,
            "--threads" => {
                args.threads = value.parse().map_err(|e| format!("--threads: {e}"))?;
                if args.threads == 0 {
                    return Err("--threads: at least 1".into());
                }
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// Whether [`cluster`] builds keyring-mode clusters (`--signing on`).
static SIGNING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Threads each simulation decodes and verifies messages on (`--threads`).
static THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(2);

fn new_sim(seed: u64) -> Simulation {
    let mut sim = Simulation::new(seed);
    sim.set_threads(THREADS.load(std::sync::atomic::Ordering::Relaxed));
    sim
}

fn cluster(seed: u64, n: usize, config: MembershipConfig) -> Simulation {
    cluster_with(
        seed,
        n,
        config,
        SIGNING.load(std::sync::atomic::Ordering::Relaxed),
    )
}

fn cluster_with(seed: u64, n: usize, config: MembershipConfig, signing: bool) -> Simulation {
    let mut sim = new_sim(seed);
    if signing {
        sim.enable_signing(n);
    }
    sim.set_codec(true);
    for i in 0..n {
        if i >= SEEDS.len() {
            sim.run_for(Duration::from_millis(2));
        }
        sim.add_node(config, &SEEDS);
    }
    sim
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct SizeResult {
    converge_s: Vec<f64>,
    detect_s: Vec<f64>,
    detect_all_s: Vec<f64>,
    undetected: usize,
    msgs_per_member_s: Vec<f64>,
    bytes_per_member_s: Vec<f64>,
    pp_bytes_per_member_s: Vec<f64>,
}

fn measure_size(n: usize, seeds: &[u64]) -> SizeResult {
    let mut r = SizeResult {
        converge_s: vec![],
        detect_s: vec![],
        detect_all_s: vec![],
        undetected: 0,
        msgs_per_member_s: vec![],
        bytes_per_member_s: vec![],
        pp_bytes_per_member_s: vec![],
    };
    for &seed in seeds {
        let mut sim = cluster(seed, n, MembershipConfig::lan());
        let start = sim.now();
        while !sim.converged() && sim.now() < start + Duration::from_secs(300) {
            sim.run_for(Duration::from_millis(500));
        }
        r.converge_s.push(sim.now().as_secs_f64());
        // Let the join news drain, then measure the steady state.
        sim.run_for(Duration::from_secs(120));
        let before = sim.stats();
        sim.run_for(LOAD_WINDOW);
        let after = sim.stats();
        let member_secs = n as f64 * LOAD_WINDOW.as_secs_f64();
        r.msgs_per_member_s
            .push((after.messages - before.messages) as f64 / member_secs);
        r.bytes_per_member_s
            .push((after.bytes - before.bytes) as f64 / member_secs);
        r.pp_bytes_per_member_s
            .push((after.push_pull_bytes - before.push_pull_bytes) as f64 / member_secs);
        // Crash non-seed members one at a time, 30 s apart.
        for c in 0..CRASHES {
            let victim = 3 + (c * (n - 3)) / CRASHES;
            let t0 = sim.now();
            sim.crash(victim);
            sim.run_for(Duration::from_secs(30));
            let id = sim.node_id(victim);
            let observers = (0..sim.nodes()).filter(|&j| sim.is_running(j)).count();
            let times: Vec<f64> = sim
                .detections(id)
                .iter()
                .filter(|(j, _)| sim.is_running(*j))
                .map(|(_, at)| (*at - t0).as_secs_f64())
                .collect();
            r.undetected += observers.saturating_sub(times.len());
            if let Some(last) = times.iter().cloned().reduce(f64::max) {
                r.detect_all_s.push(last);
            }
            r.detect_s.extend(times);
        }
    }
    r.detect_s.sort_by(f64::total_cmp);
    r.detect_all_s.sort_by(f64::total_cmp);
    r
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

fn slow_member(seed: u64, lifeguard: bool) -> (u64, u64) {
    let config = MembershipConfig::lan().with_lifeguard(lifeguard);
    let mut sim = new_sim(seed);
    if SIGNING.load(std::sync::atomic::Ordering::Relaxed) {
        sim.enable_signing(50);
    }
    for i in 0..50 {
        if i >= SEEDS.len() {
            sim.run_for(Duration::from_millis(5));
        }
        sim.add_node(config, &SEEDS);
    }
    sim.run_for(Duration::from_secs(20));
    let before = sim.stats();
    sim.set_slow(7, Duration::from_millis(1500));
    sim.run_for(Duration::from_secs(600));
    let after = sim.stats();
    (
        after.false_suspicions - before.false_suspicions,
        after.false_deaths - before.false_deaths,
    )
}

const PAUSES: usize = 5;
const PAUSE: Duration = Duration::from_secs(2);

/// False suspicions and false deaths caused by `PAUSES` pauses of `PAUSE`, one member at a
/// time, 15 s apart, in a converged cluster of `n`.
fn paused_member(seed: u64, n: usize) -> (u64, u64) {
    let mut sim = cluster(seed, n, MembershipConfig::lan());
    let start = sim.now();
    while !sim.converged() && sim.now() < start + Duration::from_secs(300) {
        sim.run_for(Duration::from_millis(500));
    }
    sim.run_for(Duration::from_secs(60));
    let before = sim.stats();
    for p in 0..PAUSES {
        let victim = 3 + (p * (n - 3)) / PAUSES;
        sim.pause(victim, PAUSE);
        sim.run_for(Duration::from_secs(15));
    }
    let after = sim.stats();
    (
        after.false_suspicions - before.false_suspicions,
        after.false_deaths - before.false_deaths,
    )
}

/// CPU time this process's threads have used, in nanoseconds (Linux; 0 elsewhere): this
/// thread and the simulation's helper threads (`--threads`), which live as long as the
/// simulation, so a difference of two readings within one simulation counts them all.
fn cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|task| {
            let path = task.ok()?.path().join("schedstat");
            std::fs::read_to_string(path)
                .ok()?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

struct SigningCost {
    /// CPU per member per simulated second in the steady window, microseconds.
    steady_us: f64,
    /// CPU of the whole run (join, convergence, 60 s steady state), seconds.
    total_cpu_s: f64,
    /// Real time of the whole run, seconds.
    wall_s: f64,
    /// Real time of joining, converging and detecting one crash (the CI simulation's
    /// workload), seconds.
    detect_wall_s: f64,
    converge_s: f64,
    msgs_per_member_s: f64,
}

fn signing_cost(seed: u64, n: usize, signing: bool) -> SigningCost {
    let wall = std::time::Instant::now();
    let cpu0 = cpu_ns();
    let mut sim = cluster_with(seed, n, MembershipConfig::lan(), signing);
    while !sim.converged() && sim.now() < Duration::from_secs(300) {
        sim.run_for(Duration::from_millis(500));
    }
    let converge_s = sim.now().as_secs_f64();
    sim.crash(n / 2);
    sim.run_for(Duration::from_secs(10));
    let detect_wall_s = wall.elapsed().as_secs_f64();
    sim.run_for(Duration::from_secs(20));
    let before = sim.stats();
    let cpu1 = cpu_ns();
    sim.run_for(LOAD_WINDOW);
    let cpu2 = cpu_ns();
    let after = sim.stats();
    let member_secs = n as f64 * LOAD_WINDOW.as_secs_f64();
    SigningCost {
        steady_us: cpu2.saturating_sub(cpu1) as f64 / 1e3 / member_secs,
        total_cpu_s: cpu2.saturating_sub(cpu0) as f64 / 1e9,
        wall_s: wall.elapsed().as_secs_f64(),
        converge_s,
        detect_wall_s,
        msgs_per_member_s: (after.messages - before.messages) as f64 / member_secs,
    }
}

fn print_signing(sizes: &[usize], seed: u64) {
    println!();
    println!(
        "# signing off/on (seed {seed}, LAN preset, codec on, {} threads): join, converge, crash one member, 30 s, then a {} s steady window (CPU: all threads)",
        THREADS.load(std::sync::atomic::Ordering::Relaxed),
        LOAD_WINDOW.as_secs()
    );
    println!();
    println!(
        "| N | signing | converged after | msgs/member/s | CPU/member/s (steady) | real time to converge + detect | run CPU | run real time |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &n in sizes {
        for signing in [false, true] {
            let c = signing_cost(seed, n, signing);
            println!(
                "| {n} | {} | {:.1} s | {:.2} | {:.1} us | {:.1} s | {:.2} s | {:.2} s |",
                if signing { "on" } else { "off" },
                c.converge_s,
                c.msgs_per_member_s,
                c.steady_us,
                c.detect_wall_s,
                c.total_cpu_s,
                c.wall_s,
            );
        }
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("swim-sim: {e}");
            eprintln!(
                "usage: swim-sim [--seeds K] [--seed FIRST] [--sizes 10,100,1000] [--signing on|off] [--only signing] [--threads N]"
            );
            std::process::exit(2);
        }
    };
    let seeds: Vec<u64> = (0..args.seeds).map(|k| args.first_seed + k).collect();
    THREADS.store(args.threads, std::sync::atomic::Ordering::Relaxed);
    let wall = std::time::Instant::now();
    if args.only_signing {
        print_signing(&args.sizes, args.first_seed);
        eprintln!(
            "swim-sim: done in {:.1} s of real time",
            wall.elapsed().as_secs_f64()
        );
        return;
    }
    SIGNING.store(args.signing, std::sync::atomic::Ordering::Relaxed);
    println!(
        "# swim-sim: LAN preset, seeds {seeds:?}, every message through the wire codec, signing {}",
        if args.signing { "on" } else { "off" }
    );
    println!();
    println!(
        "| N | converged after (median) | detection median | detection p99 | all members (median / max) | undetected | msgs/member/s | bytes/member/s | of which push-pull |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &n in &args.sizes {
        let r = measure_size(n, &seeds);
        println!(
            "| {n} | {:.1} s | {:.2} s | {:.2} s | {:.2} / {:.2} s | {} | {:.2} | {:.0} | {:.0} |",
            median(&r.converge_s),
            percentile(&r.detect_s, 50.0),
            percentile(&r.detect_s, 99.0),
            percentile(&r.detect_all_s, 50.0),
            percentile(&r.detect_all_s, 100.0),
            r.undetected,
            median(&r.msgs_per_member_s),
            median(&r.bytes_per_member_s),
            median(&r.pp_bytes_per_member_s),
        );
    }
    println!();
    println!(
        "# slow member (N = 50, one member processes its messages 1.5 s late, 600 s): false positives about healthy members"
    );
    println!();
    println!("| seed | suspicions on | suspicions off | deaths on | deaths off |");
    println!("|---|---|---|---|---|");
    let (mut s_on, mut s_off, mut d_on, mut d_off) = (0, 0, 0, 0);
    for &seed in &seeds {
        let on = slow_member(seed, true);
        let off = slow_member(seed, false);
        println!("| {seed} | {} | {} | {} | {} |", on.0, off.0, on.1, off.1);
        s_on += on.0;
        s_off += off.0;
        d_on += on.1;
        d_off += off.1;
    }
    println!("| total | {s_on} | {s_off} | {d_on} | {d_off} |");
    let ratio = |off: u64, on: u64| {
        if on == 0 {
            format!("{off} vs 0 (none with Lifeguard)")
        } else {
            format!("{:.1}x", off as f64 / on as f64)
        }
    };
    println!();
    println!(
        "Lifeguard off/on: suspicions {}, deaths {}",
        ratio(s_off, s_on),
        ratio(d_off, d_on)
    );
    let pause_sizes: Vec<usize> = args.sizes.iter().copied().filter(|&n| n <= 100).collect();
    if !pause_sizes.is_empty() {
        println!();
        println!(
            "# pause (LAN preset, {PAUSES} members paused {} s each, one at a time, 15 s apart): false positives",
            PAUSE.as_secs()
        );
        println!();
        println!("| N | seed | false suspicions | false deaths |");
        println!("|---|---|---|---|");
        for &n in &pause_sizes {
            for &seed in &seeds {
                let (s, d) = paused_member(seed, n);
                println!("| {n} | {seed} | {s} | {d} |");
            }
        }
    }
    print_signing(&args.sizes, args.first_seed);
    eprintln!(
        "swim-sim: done in {:.1} s of real time",
        wall.elapsed().as_secs_f64()
    );
}
