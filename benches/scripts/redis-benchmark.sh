#!/usr/bin/env bash
# redis-benchmark against a single Redis and a 3-node Chorus cluster (N = 3, W = 2, memory
# backend; reads at One, then a second cluster with reads at Quorum), all on loopback, in one
# run: the same `redis-benchmark -t set,get -d 100 -r 100000` at -c 50 and at -c 50 -P 16,
# three runs each, medians and Chorus/Redis ratios. Every server it starts is stopped by PID.
# Each node runs with one tokio worker (`runtime.worker_threads = 1`): three nodes share two
# cores, and one thread each hands no task between threads. See docs/BENCHMARKS.md.
#
# Usage: bash benches/scripts/redis-benchmark.sh [RUNS] [REQUESTS] [PIPELINED_REQUESTS]
#        (defaults 3, 200000, 1000000)
# Installs redis-server and redis-tools from the distribution's packages if missing (root).
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNS=${1:-3}
REQUESTS=${2:-200000}
PIPELINED=${3:-1000000}

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-benchmark >/dev/null 2>&1; then
    echo "redis-server/redis-benchmark not found: installing the distribution's packages" >&2
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server redis-tools
fi
redis-server --version >&2

timeout 1800 cargo build --release --locked -p chorus --features server
CHORUS="${CARGO_TARGET_DIR:-target}/release/chorus"

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    # Chorus nodes are started in subshells, which record their PIDs in a file.
    if [ -f "$WORK/pids" ]; then
        while read -r pid; do PIDS+=("$pid"); done <"$WORK/pids"
    fi
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

# A free loopback port (asks the kernel).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# start_chorus ID READ_CONSISTENCY SEEDS: starts a node, echoes "PID CLIENT_PORT CLUSTER_ADDR".
start_chorus() {
    local id=$1 read=$2 seeds=$3 out="$WORK/chorus-$1-$2.out"
    CHORUS_NODE_ID=$id CHORUS_NODE_SEEDS=$seeds CHORUS_NODE_MEMBERSHIP=local CHORUS_NODE_SECURITY_MODE=insecure \
    CHORUS_NODE_REPLICATION_FACTOR=3 CHORUS_NODE_WRITE_CONSISTENCY=quorum \
    CHORUS_NODE_READ_CONSISTENCY=$read CHORUS_NODE_TRANSPORT_BIND=127.0.0.1:0 \
    CHORUS_CLIENT_LISTEN=127.0.0.1:0 CHORUS_ADMIN_LISTEN= CHORUS_LOG_FILTER=warn \
    CHORUS_RUNTIME_WORKER_THREADS=1 \
        "$CHORUS" serve >"$out" 2>"$WORK/chorus-$id-$read.log" &
    local pid=$!
    echo "$pid" >>"$WORK/pids"
    for _ in $(seq 300); do
        if grep -q '^chorus ready:' "$out"; then
            local line client cluster
            line=$(grep '^chorus ready:' "$out")
            client=$(sed -E 's/.* client=[^:]+:([0-9]+).*/\1/' <<<"$line")
            cluster=$(sed -E 's/.* cluster=([^ ]+).*/\1/' <<<"$line")
            echo "$pid $client $cluster"
            return
        fi
        sleep 0.1
    done
    echo "chorus node $id did not start; log:" >&2
    cat "$WORK/chorus-$id-$read.log" >&2
    exit 1
}

# start_cluster READ_CONSISTENCY: three nodes; sets CLUSTER_PORT (node 1's client port) and
# CLUSTER_PIDS.
start_cluster() {
    local level=$1 p1 p2 p3 port1 seed
    read -r p1 port1 seed <<<"$(start_chorus 1 "$level" "")"
    read -r p2 _ _ <<<"$(start_chorus 2 "$level" "$seed")"
    read -r p3 _ _ <<<"$(start_chorus 3 "$level" "$seed")"
    if [ -z "$p1" ] || [ -z "$p2" ] || [ -z "$p3" ]; then
        exit 1
    fi
    CLUSTER_PORT=$port1
    CLUSTER_PIDS="$p1 $p2 $p3"
    # Nodes 2 and 3 join by pulling, one after the other; measure only once both settled and
    # the writes' grace on the ring from before (node.join_settle, 5 s) is over.
    for _ in $(seq 600); do
        if [ "$(redis-cli -p "$port1" CHORUS.MEMBERS | grep -c '^alive$')" = 3 ] &&
            [ "$(redis-cli -p "$port1" CHORUS.RING | grep -A1 '^joining$' | grep -c '^1$')" = 0 ]; then
            sleep 6
            echo "chorus ($level reads): nodes up, pids $CLUSTER_PIDS, clients on :$port1" >&2
            return
        fi
        sleep 0.1
    done
    echo "the chorus nodes did not see each other" >&2
    exit 1
}

stop_cluster() {
    for pid in $CLUSTER_PIDS; do kill -TERM "$pid"; done
    for pid in $CLUSTER_PIDS; do
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
}

# bench PORT PIPELINE REQUESTS: prints "set_rps get_rps" of one redis-benchmark run.
bench() {
    redis-benchmark -h 127.0.0.1 -p "$1" -t set,get -d 100 -c 50 -r 100000 -P "$2" -n "$3" --csv 2>/dev/null |
        awk -F'","' '/^"SET"/ {set=$2} /^"GET"/ {get=$2} END {gsub(/"/,"",set); gsub(/"/,"",get); print set, get}'
}

median() { tr ' ' '\n' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK" --logfile "$WORK/redis.log" &
PIDS+=("$!")
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
echo "redis: pid ${PIDS[0]}, port $REDIS_PORT" >&2

declare -A RESULTS
run_all() { # NAME PORT
    for p in 1 16; do
        local n=$REQUESTS sets="" gets=""
        [ "$p" = 16 ] && n=$PIPELINED
        for r in $(seq "$RUNS"); do
            read -r s g <<<"$(bench "$2" "$p" "$n")"
            echo "  $1 -P $p run $r: SET $s/s GET $g/s" >&2
            sets="$sets $s"
            gets="$gets $g"
        done
        RESULTS["$1,$p,set"]=$(echo $sets | median)
        RESULTS["$1,$p,get"]=$(echo $gets | median)
        RESULTS["$1,$p,sets"]=$sets
        RESULTS["$1,$p,gets"]=$gets
    done
}

# Runs interleave the systems per round so that machine noise hits each alike.
run_all redis "$REDIS_PORT"
start_cluster one
run_all chorus-one "$CLUSTER_PORT"
stop_cluster
start_cluster quorum
run_all chorus-quorum "$CLUSTER_PORT"
stop_cluster

echo
echo "redis-benchmark -t set,get -d 100 -c 50 -r 100000 [-P 16], median of $RUNS runs (requests/s)"
printf '%-16s %-4s %12s %12s %8s %8s  %s\n' target P SET GET SET/redis GET/redis "runs (SET; GET)"
for target in redis chorus-one chorus-quorum; do
    for p in 1 16; do
        s=${RESULTS["$target,$p,set"]}
        g=${RESULTS["$target,$p,get"]}
        rs=${RESULTS["redis,$p,set"]}
        rg=${RESULTS["redis,$p,get"]}
        printf '%-16s %-4s %12s %12s %8.2f %8.2f  %s;%s\n' "$target" "$p" "$s" "$g" \
            "$(awk "BEGIN {print $s / $rs}")" "$(awk "BEGIN {print $g / $rg}")" \
            "${RESULTS["$target,$p,sets"]}" "${RESULTS["$target,$p,gets"]}"
    done
done
