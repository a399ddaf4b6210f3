#!/usr/bin/env python3
"""Run a criterion bench several times and print the median of the per-run medians.

Usage: python3 benches/scripts/medians.py RUNS -- cargo bench -p chorus-benches --bench core -- --noplot

Criterion writes each benchmark's statistics to target/criterion/<id>/new/estimates.json;
this reads the median point estimate (ns per iteration) after every run.
"""
import json, os, statistics, subprocess, sys

def collect(root="target/criterion"):
    out = {}
    for dirpath, _, files in os.walk(root):
        if dirpath.endswith(os.sep + "new") and "estimates.json" in files:
            with open(os.path.join(dirpath, "estimates.json")) as f:
                est = json.load(f)
            with open(os.path.join(dirpath, "benchmark.json")) as f:
                bid = json.load(f)["full_id"]
            out[bid] = est["median"]["point_estimate"]
    return out

def main():
    runs = int(sys.argv[1])
    cmd = sys.argv[sys.argv.index("--") + 1:]
    per_run = []
    for i in range(runs):
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        per_run.append(collect())
        print(f"run {i + 1}/{runs} done", file=sys.stderr)
    names = sorted(set().union(*per_run))
    print(f"| benchmark | median of {runs} runs | per-run medians |")
    print("|---|---|---|")
    for name in names:
        vals = [r[name] for r in per_run if name in r]
        med = statistics.median(vals)
        fmt = lambda v: f"{v/1e6:.2f} ms" if v >= 1e6 else (f"{v/1e3:.2f} µs" if v >= 1e3 else f"{v:.1f} ns")
        print(f"| {name} | {fmt(med)} | {', '.join(fmt(v) for v in vals)} |")

if __name__ == "__main__":
    main()
