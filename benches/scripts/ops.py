#!/usr/bin/env python3
"""Run a criterion bench several times; print each benchmark's median throughput in ops/s.

Usage: python3 benches/scripts/ops.py RUNS GROUP[,GROUP...] -- cargo bench -p chorus-benches --bench storage -- --noplot

Like medians.py, but for benchmarks that declare Throughput::Elements: reads the median time
per iteration from <target>/criterion/<id>/new/estimates.json after every run (target is
$CARGO_TARGET_DIR or ./target), converts it to operations per second (elements per iteration
/ time), keeps only the named criterion groups, and prints the median of the runs and every
run's figure.
"""
import json, os, statistics, subprocess, sys

def collect(groups):
    root = os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "criterion")
    out = {}
    for dirpath, _, files in os.walk(root):
        if dirpath.endswith(os.sep + "new") and "estimates.json" in files:
            with open(os.path.join(dirpath, "benchmark.json")) as f:
                bench = json.load(f)
            if bench["group_id"] not in groups:
                continue
            with open(os.path.join(dirpath, "estimates.json")) as f:
                ns = json.load(f)["median"]["point_estimate"]
            elements = (bench.get("throughput") or {}).get("Elements", 1)
            out[bench["full_id"]] = elements * 1e9 / ns
    return out

def fmt(ops):
    return f"{ops / 1e6:.2f}M" if ops >= 1e6 else f"{ops / 1e3:.1f}K"

def main():
    runs = int(sys.argv[1])
    groups = set(sys.argv[2].split(","))
    cmd = sys.argv[sys.argv.index("--") + 1:]
    per_run = []
    for i in range(runs):
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        per_run.append(collect(groups))
        print(f"run {i + 1}/{runs} done", file=sys.stderr)
    print(f"| benchmark | ops/s, median of {runs} runs | per run |")
    print("|---|---|---|")
    for name in sorted(set().union(*per_run)):
        vals = [r[name] for r in per_run if name in r]
        print(f"| `{name}` | {fmt(statistics.median(vals))} | {', '.join(fmt(v) for v in vals)} |")

if __name__ == "__main__":
    main()
