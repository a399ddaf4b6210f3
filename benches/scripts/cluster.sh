#!/usr/bin/env bash
# The cluster benchmark: Chorus (3 nodes, N = 3, W = R = 2; in-process and TCP on every backend)
# and Redis (a primary and two replicas, SET + WAIT 1) driven by the same load generator in the
# same run, with medians over runs and Chorus/Redis ratios. See docs/BENCHMARKS.md.
#
# Usage: bash benches/scripts/cluster.sh [cluster-load flags, e.g. --runs 3 --secs 2]
# Installs redis-server from the distribution's packages if it is missing (needs root).
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v redis-server >/dev/null 2>&1; then
    echo "redis-server not found: installing the distribution's package" >&2
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server redis-tools
fi
redis-server --version >&2

timeout 1800 cargo build --release --locked -p chorus-benches --bin cluster-load
# Bounded: a full run (7 targets x 9 cases, 3 runs, 2 s windows) takes about 12 minutes.
exec timeout 3600 "${CARGO_TARGET_DIR:-target}/release/cluster-load" "$@"
