//! Medians over runs, the Markdown tables and the Chorus/Redis ratios.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::load::{CaseResult, Workload};

/// Identifies one measured cell: target name, workload, requests in flight.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct CaseKey {
    pub(crate) target: String,
    pub(crate) workload: usize,
    pub(crate) in_flight: usize,
}

/// Every run's result of every case.
#[derive(Debug, Default)]
pub(crate) struct Results {
    pub(crate) cases: BTreeMap<CaseKey, Vec<CaseResult>>,
    /// Local reads at One: target name -> gets/s per run.
    pub(crate) local_reads: BTreeMap<String, Vec<f64>>,
    /// Order in which the targets were first measured.
    pub(crate) order: Vec<String>,
}

pub(crate) fn workload_index(w: Workload) -> usize {
    Workload::ALL.iter().position(|&x| x == w).unwrap_or(0)
}

impl Results {
    pub(crate) fn add(
        &mut self,
        target: &str,
        workload: Workload,
        in_flight: usize,
        r: CaseResult,
    ) {
        if !self.order.iter().any(|t| t == target) {
            self.order.push(target.to_string());
        }
        self.cases
            .entry(CaseKey {
                target: target.to_string(),
                workload: workload_index(workload),
                in_flight,
            })
            .or_default()
            .push(r);
    }

    fn get(&self, target: &str, workload: Workload, in_flight: usize) -> Option<&[CaseResult]> {
        self.cases
            .get(&CaseKey {
                target: target.to_string(),
                workload: workload_index(workload),
                in_flight,
            })
            .map(Vec::as_slice)
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub(crate) fn fmt_ops(ops: f64) -> String {
    if ops >= 1e6 {
        format!("{:.2}M", ops / 1e6)
    } else if ops >= 1e3 {
        format!("{:.1}K", ops / 1e3)
    } else {
        format!("{ops:.0}")
    }
}

pub(crate) fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} us")
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The main table: one row per target, workload and in-flight count.
pub(crate) fn table(results: &Results, in_flight: &[usize]) -> String {
    let mut out = String::new();
    let runs = results.cases.values().map(Vec::len).max().unwrap_or(0);
    let _ = writeln!(
        out,
        "| target | workload | in flight | ops/s (median of {runs}) | p50 | p99 | per-run ops/s | errors | misses |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for target in &results.order {
        for w in Workload::ALL {
            for &n in in_flight {
                let Some(rs) = results.get(target, w, n) else {
                    continue;
                };
                let ops = median(rs.iter().map(|r| r.ops_per_sec).collect());
                let p50 = median(rs.iter().map(|r| us(r.p50)).collect());
                let p99 = median(rs.iter().map(|r| us(r.p99)).collect());
                let per_run: Vec<String> = rs.iter().map(|r| fmt_ops(r.ops_per_sec)).collect();
                let errors: u64 = rs.iter().map(|r| r.errors).sum();
                let misses: u64 = rs.iter().map(|r| r.misses).sum();
                let _ = writeln!(
                    out,
                    "| {target} | {} | {n} | {} | {} | {} | {} | {errors} | {misses} |",
                    w.name(),
                    fmt_ops(ops),
                    fmt_dur(Duration::from_secs_f64(p50 / 1e6)),
                    fmt_dur(Duration::from_secs_f64(p99 / 1e6)),
                    per_run.join(", "),
                );
            }
        }
    }
    if !results.local_reads.is_empty() {
        let _ = writeln!(
            out,
            "\n| local read at One, 1 task | gets/s (median) | per run |\n|---|---|---|"
        );
        for (target, v) in &results.local_reads {
            let per_run: Vec<String> = v.iter().map(|&x| fmt_ops(x)).collect();
            let _ = writeln!(
                out,
                "| {target} | {} | {} |",
                fmt_ops(median(v.clone())),
                per_run.join(", ")
            );
        }
    }
    out
}

/// Ratios of each Chorus target to Redis, computed per run (same run, same conditions) and
/// then the median over runs.
pub(crate) fn ratios(results: &Results, in_flight: &[usize]) -> String {
    let mut out = String::new();
    let redis = "redis";
    let chorus: Vec<&String> = results.order.iter().filter(|t| *t != redis).collect();
    if chorus.is_empty() || !results.order.iter().any(|t| t == redis) {
        return out;
    }
    let per_run_ratio = |target: &str, w: Workload, n: usize, f: &dyn Fn(&CaseResult) -> f64| {
        let (Some(c), Some(r)) = (results.get(target, w, n), results.get(redis, w, n)) else {
            return None;
        };
        let v: Vec<f64> = c.iter().zip(r).map(|(c, r)| f(c) / f(r)).collect();
        Some(median(v))
    };
    let _ = writeln!(
        out,
        "Chorus/Redis, median of per-run ratios (ops/s: higher is better; p50, p99: lower is better)\n"
    );
    let _ = writeln!(
        out,
        "| target | workload | in flight | ops/s ratio | p50 ratio | p99 ratio |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for target in &chorus {
        for w in Workload::ALL {
            for &n in in_flight {
                let Some(ops) = per_run_ratio(target, w, n, &|r| r.ops_per_sec) else {
                    continue;
                };
                let p50 = per_run_ratio(target, w, n, &|r| us(r.p50)).unwrap_or(f64::NAN);
                let p99 = per_run_ratio(target, w, n, &|r| us(r.p99)).unwrap_or(f64::NAN);
                let _ = writeln!(
                    out,
                    "| {target} | {} | {n} | {ops:.2}x | {p50:.2}x | {p99:.2}x |",
                    w.name()
                );
            }
        }
    }

    // The targets.
    let tcp = "tcp-memory";
    let _ = writeln!(
        out,
        "\n| target (issue) | measured (median of per-run ratios) | met? |"
    );
    let _ = writeln!(out, "|---|---|---|");
    let yes = |b: bool| if b { "yes" } else { "no" };
    if let Some(r) = per_run_ratio(tcp, Workload::Put, 256, &|r| r.ops_per_sec) {
        let _ = writeln!(
            out,
            "| TCP, memory, 256 in flight: quorum puts >= 1.0x Redis SET+WAIT 1 | {r:.2}x | {} |",
            yes(r >= 1.0)
        );
    }
    if let Some(r) = per_run_ratio(tcp, Workload::Put, 256, &|r| us(r.p99)) {
        let _ = writeln!(
            out,
            "| TCP, memory, 256 in flight: put p99 <= Redis's | {r:.2}x | {} |",
            yes(r <= 1.0)
        );
    }
    if let Some(r) = per_run_ratio(tcp, Workload::Put, 1, &|r| us(r.p50)) {
        let _ = writeln!(
            out,
            "| TCP, memory, 1 in flight: put p50 <= 1.2x Redis SET+WAIT 1 p50 | {r:.2}x | {} |",
            yes(r <= 1.2)
        );
    }
    for (target, v) in results.local_reads.iter().filter(|(t, _)| !t.contains('(')) {
        let m = median(v.clone());
        let _ = writeln!(
            out,
            "| {target}: local read at One >= 3M gets/s per thread | {} | {} |",
            fmt_ops(m),
            yes(m >= 3e6)
        );
    }
    out
}
