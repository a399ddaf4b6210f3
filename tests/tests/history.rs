//! The history checker over a seed sweep, and its ability to fail: bugs planted in the node
//! are caught. See `chorus_tests::history` for what is checked and its scope.
//!
//! `CHORUS_SEED=<n>` runs exactly seed `n` (in `sweep_0`, printing its counts);
//! `CHORUS_SEEDS=<count>` widens the sweep from the default [`SEEDS`] seeds.

use std::collections::BTreeSet;

use chorus::runtime::node::PlantedBugs;
use chorus_tests::history::ViolationKind;
use chorus_tests::history::driver::{Run, RunConfig, run_seed};
use chorus_tests::runner::SEED_ENV;

/// Seeds in the default sweep.
const SEEDS: u64 = 200;
/// Test functions the sweep is split over, so the cores share it.
const SHARDS: u64 = 4;
/// Seeds tried per planted bug before it counts as uncaught.
const BUG_SEEDS: u64 = 30;

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim();
    Some(
        match text.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => text.parse(),
        }
        .unwrap_or_else(|_| panic!("{name}={text:?} is not a u64")),
    )
}

fn sweep(shard: u64) {
    let seeds: Vec<u64> = match env_u64(SEED_ENV) {
        Some(seed) if shard == 0 => vec![seed],
        Some(_) => return,
        None => (0..env_u64("CHORUS_SEEDS").unwrap_or(SEEDS))
            .filter(|s| s % SHARDS == shard)
            .collect(),
    };
    let single = seeds.len() == 1;
    let mut failed: Vec<Run> = Vec::new();
    for seed in seeds {
        let run = run_seed(RunConfig::for_seed(seed));
        if single {
            let (acked, writes, reads) = run.counts();
            eprintln!(
                "seed {seed}: {} ops, {acked} of {writes} writes acknowledged, {reads} reads \
                 answered, {} violation(s)",
                run.history.ops.len(),
                run.violations.len()
            );
            eprintln!("outcomes: {:?}", run.outcome_counts());
            for (at, fault) in &run.history.faults {
                eprintln!("  fault at seq {}: {fault}", at.seq);
            }
        }
        if !run.violations.is_empty() {
            eprintln!("{}", run.report());
            failed.push(run);
        }
    }
    if !failed.is_empty() {
        let seeds: Vec<u64> = failed.iter().map(|r| r.config.seed).collect();
        panic!(
            "the history checker found violations with seeds {seeds:?}; the first:\n{}",
            failed[0].report()
        );
    }
}

#[test]
fn sweep_0() {
    sweep(0);
}

#[test]
fn sweep_1() {
    sweep(1);
}

#[test]
fn sweep_2() {
    sweep(2);
}

#[test]
fn sweep_3() {
    sweep(3);
}

/// Runs seeds (at W = R = 2) with `bugs` planted until the checker reports one of
/// `expected`; the seed that caught it and its run. With `CHORUS_BUG_SURVEY` set, runs all
/// [`BUG_SEEDS`] seeds and prints how many caught it.
fn catch(bugs: PlantedBugs, expected: &[ViolationKind]) -> Result<(u64, Run), Vec<String>> {
    let survey = std::env::var_os("CHORUS_BUG_SURVEY").is_some();
    let mut tried = Vec::new();
    let mut first = None;
    let mut caught = 0;
    for seed in 0..BUG_SEEDS {
        let mut config = RunConfig::for_seed(seed).with_bugs(bugs);
        config.w = 2;
        config.r = 2;
        let run = run_seed(config);
        let kinds: BTreeSet<ViolationKind> = run.violations.iter().map(|v| v.kind()).collect();
        if expected.iter().any(|k| kinds.contains(k)) {
            caught += 1;
            if first.is_none() {
                first = Some((seed, run));
            }
            if !survey {
                break;
            }
        } else {
            tried.push(format!("seed {seed}: {kinds:?}"));
        }
    }
    if survey {
        eprintln!("{bugs:?}: caught by {caught} of {BUG_SEEDS} seeds; missed by {tried:?}");
    }
    first.ok_or(tried)
}

#[test]
fn history_checker_catches_planted_bugs() {
    use ViolationKind::*;
    let cases: [(&str, PlantedBugs, &[ViolationKind]); 4] = [
        (
            "count_coordinator_as_replica",
            PlantedBugs {
                count_coordinator_as_replica: true,
                ..PlantedBugs::default()
            },
            &[UnderReplicated, LostWrite],
        ),
        (
            "count_failures_as_acks",
            PlantedBugs {
                count_failures_as_acks: true,
                ..PlantedBugs::default()
            },
            &[UnderReplicated, LostWrite],
        ),
        (
            "repair_with_new_version",
            PlantedBugs {
                repair_with_new_version: true,
                ..PlantedBugs::default()
            },
            &[VersionMismatch],
        ),
        (
            "skip_drift_check",
            PlantedBugs {
                skip_drift_check: true,
                ..PlantedBugs::default()
            },
            &[AheadOfTime],
        ),
    ];
    let mut uncaught = Vec::new();
    for (name, bugs, expected) in cases {
        match catch(bugs, expected) {
            Ok((seed, run)) => {
                let kinds: BTreeSet<ViolationKind> =
                    run.violations.iter().map(|v| v.kind()).collect();
                eprintln!("{name}: caught by seed {seed} as {kinds:?}");
                let first = run
                    .violations
                    .iter()
                    .find(|v| expected.contains(&v.kind()))
                    .expect("an expected violation");
                eprintln!("  {first}");
            }
            Err(tried) => uncaught.push(format!("{name} (expected {expected:?}): {tried:?}")),
        }
    }
    assert!(
        uncaught.is_empty(),
        "planted bugs the history checker missed within {BUG_SEEDS} seeds: {uncaught:#?}"
    );
}

/// Outside the scope (members declared dead, keys moving to members without their data), the
/// checker says so: with the `local` preset's suspicion multiplier of 2, a killed node is
/// declared dead within seconds, and the run reports the ring change.
#[test]
fn a_ring_change_is_reported_not_skipped() {
    for seed in 0..BUG_SEEDS {
        let mut config = RunConfig::for_seed(seed);
        config.suspicion_mult = 2;
        let run = run_seed(config);
        if run
            .violations
            .iter()
            .any(|v| v.kind() == ViolationKind::RingChanged)
        {
            eprintln!("seed {seed}: {}", run.violations[0]);
            return;
        }
    }
    panic!("no ring change reported within {BUG_SEEDS} seeds with a suspicion multiplier of 2");
}

/// Seeds of the ownership sweep (7 nodes; two join, one leaves, one is wiped).
const OWNERSHIP_SEEDS: u64 = 12;

/// Runs `configs` and panics with the first violation found; returns the records the
/// cleanup removed in all runs.
fn expect_no_violations(configs: impl Iterator<Item = RunConfig>) -> u64 {
    let mut failed: Vec<Run> = Vec::new();
    let mut cleanup_removed = 0;
    for config in configs {
        let run = run_seed(config);
        cleanup_removed += run.cleanup_removed;
        if std::env::var_os(SEED_ENV).is_some() {
            let (acked, writes, reads) = run.counts();
            eprintln!(
                "seed {}: {acked} of {writes} writes acknowledged, {reads} reads answered, {} \
                 violation(s)",
                config.seed,
                run.violations.len()
            );
            for (at, fault) in &run.history.faults {
                eprintln!("  at seq {}: {fault}", at.seq);
            }
        }
        if !run.violations.is_empty() {
            eprintln!("{}", run.report());
            failed.push(run);
        }
    }
    if !failed.is_empty() {
        let seeds: Vec<u64> = failed.iter().map(|r| r.config.seed).collect();
        panic!(
            "the history checker found violations with seeds {seeds:?}; the first:\n{}",
            failed[0].report()
        );
    }
    cleanup_removed
}

/// Joins, a graceful leave and a wipe among the faults: 0 acknowledged writes lost, every
/// read at R + W > N sees them. `CHORUS_SEED=<n>` runs exactly seed `n`;
/// `CHORUS_OWNERSHIP_SEEDS=<count>` widens the sweep.
#[test]
fn ownership_sweep() {
    let seeds: Vec<u64> = match std::env::var(SEED_ENV) {
        Ok(seed) => vec![seed.trim().parse().expect("CHORUS_SEED is a u64")],
        Err(_) => (0..env_u64("CHORUS_OWNERSHIP_SEEDS").unwrap_or(OWNERSHIP_SEEDS)).collect(),
    };
    let removed = expect_no_violations(
        seeds
            .into_iter()
            .map(|s| RunConfig::for_seed(s).with_ownership_changes()),
    );
    // The joins take ranges from the first nodes: their copies go while clients run.
    if std::env::var_os(SEED_ENV).is_none() {
        assert!(removed > 0, "the cleanup removed nothing in the sweep");
    }
}

/// The ownership schedule can fail: a joining node that settles without pulling serves reads
/// of records it never received. Background healing is off: the Merkle exchanges a settling
/// joiner starts with its co-replicas would otherwise repair it within milliseconds, so that
/// whether a read saw it first was a matter of scheduling.
#[test]
fn a_join_without_its_pull_is_caught() {
    use ViolationKind::*;
    let bugs = PlantedBugs {
        skip_join_pull: true,
        ..PlantedBugs::default()
    };
    let mut tried = Vec::new();
    for seed in 0..BUG_SEEDS {
        let mut config = RunConfig::for_seed(seed)
            .with_ownership_changes()
            .with_bugs(bugs);
        config.w = 2;
        config.r = 2;
        config.background_healing = false;
        let run = run_seed(config);
        let kinds: BTreeSet<ViolationKind> = run.violations.iter().map(|v| v.kind()).collect();
        if kinds.contains(&LostWrite) || kinds.contains(&UnderReplicated) {
            eprintln!("skip_join_pull: caught by seed {seed} as {kinds:?}");
            return;
        }
        tried.push(format!("seed {seed}: {kinds:?}"));
    }
    panic!("skip_join_pull was not caught within {BUG_SEEDS} seeds: {tried:?}");
}
