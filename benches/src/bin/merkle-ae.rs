//! `merkle-ae`: measured figures of Merkle anti-entropy, two in-memory replicas driven
//! directly (no network, no node), every message encoded with the wire codec.
//!
//! ```text
//! cargo run --release -p chorus-benches --bin merkle-ae -- [--keys 1000000] [--missing-every 100] [--value-len 100] [--runs 5]
//! ```
//!
//! 1. **Bytes to repair.** Replica A holds `keys` records; replica B lacks every
//!    `missing-every`-th one (1 % by default). A runs one exchange with B exactly as a node
//!    does (`healing::exchange::Exchange`: root first, then only differing subtrees, leaf
//!    checks at the purge horizon, `SyncOffer`/`SyncWant`, `Apply` of what B lacks) and every
//!    request and answer is encoded as the `Envelope` a node would send. The figure is their
//!    bytes as a fraction of a full copy: every record of A in `Apply` messages of 1024.
//! 2. **Write-path cost.** `keys` puts into an empty memory backend with `apply_batch` (1024
//!    per batch), with and without keeping a tree up to date (`begin` before the batch,
//!    `finish` after, as the replica path does), alternating, `runs` times; the median of
//!    the ratios of the two throughputs.

use std::time::Instant;

use bytes::Bytes;
use chorus::backend_memory::MemoryStorage;
use chorus::envelope::Envelope;
use chorus::healing::exchange::{Coverage, Exchange, Step};
use chorus::healing::merkle::{self, MerkleTree};
use chorus::replication::{REPLICA_PROTOCOL_VERSION, ReplicaMessage, SyncEntry, Write};
use chorus::storage::{ApplyOutcome, RangeDigest};
use chorus::{HashRange, NodeId, Record, Storage, Timestamp, Version, key_hash};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    keys: usize,
    missing_every: usize,
    value_len: usize,
    runs: usize,
}

fn args() -> Args {
    let mut a = Args {
        keys: 1_000_000,
        missing_every: 100,
        value_len: 100,
        runs: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value: usize = it
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} needs a number"));
        match flag.as_str() {
            "--keys" => a.keys = value,
            "--missing-every" => a.missing_every = value,
            "--value-len" => a.value_len = value,
            "--runs" => a.runs = value,
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn bytes_of(m: ReplicaMessage) -> u64 {
    chorus::wire::encode_payload(&Envelope::Replica(m), usize::MAX)
        .expect("encodes")
        .len() as u64
}

fn record(i: usize, value_len: usize) -> (Bytes, Record) {
    let key = Bytes::from(format!("key-{i:010}"));
    let mut value = vec![b'x'; value_len];
    value[..8].copy_from_slice(&(i as u64).to_le_bytes());
    let version = Version::new(
        Timestamp::new(1_767_225_600_000 + i as u64, 0),
        NodeId(0x9e37_79b9_7f4a_7c15),
    );
    (key, Record::value(value, version))
}

/// Applies `writes` in batches, keeping `tree` (if any) up to date as the replica path does.
async fn load(storage: &MemoryStorage, tree: Option<&MerkleTree>, writes: Vec<(Bytes, Record)>) {
    let mut writes = writes.into_iter().peekable();
    while writes.peek().is_some() {
        let batch: Vec<(Bytes, Record)> = writes.by_ref().take(1024).collect();
        let pending: Vec<_> = match tree {
            Some(t) => batch.iter().map(|(k, _)| t.begin(key_hash(k))).collect(),
            None => Vec::new(),
        };
        let versions: Vec<Version> = match tree {
            Some(_) => batch.iter().map(|(_, r)| r.version).collect(),
            None => Vec::new(),
        };
        let outcomes = storage.apply_batch(batch).await.expect("apply");
        if let Some(t) = tree {
            for ((p, v), o) in pending.into_iter().zip(&versions).zip(&outcomes) {
                match o {
                    ApplyOutcome::Applied { previous } => t.finish(p, previous.as_ref(), Some(v)),
                    ApplyOutcome::Stale { .. } => t.finish(p, None, None),
                }
            }
        }
    }
}

/// Digests (and with `keep` keys and versions) of `leaves` from `storage`, as a node does.
async fn scan_leaves(
    storage: &MemoryStorage,
    leaves: &[u32],
    cutoff: u64,
) -> (Vec<RangeDigest>, Vec<Vec<(Bytes, Version)>>) {
    let mut digests = vec![RangeDigest::default(); leaves.len()];
    let mut kept = vec![Vec::new(); leaves.len()];
    let span: HashRange = merkle::leaf_span(leaves[0], *leaves.last().expect("a leaf"));
    let mut cursor = None;
    loop {
        let page = storage
            .scan(
                span,
                cursor,
                std::num::NonZeroUsize::new(65_536).expect("non-zero"),
            )
            .await
            .expect("scan");
        for e in page.entries {
            let Ok(i) = leaves.binary_search(&merkle::leaf_of(e.hash)) else {
                continue;
            };
            if merkle::past_horizon(&e.record, cutoff) {
                continue;
            }
            digests[i].add(merkle::entry_hash(e.hash, &e.record.version));
            kept[i].push((e.key, e.record.version));
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    (digests, kept)
}

struct Traffic {
    digests: u64,
    checks: u64,
    offers: u64,
    records: u64,
    repaired: u64,
}

/// One exchange, A pushing to B; the bytes of every message both ways.
async fn exchange(
    a: &MemoryStorage,
    ta: &MerkleTree,
    b: &MemoryStorage,
    tb: &MerkleTree,
) -> Traffic {
    let cutoff = 0;
    let mut t = Traffic {
        digests: 0,
        checks: 0,
        offers: 0,
        records: 0,
        repaired: 0,
    };
    let mut x = Exchange::new(Coverage::full());
    loop {
        match x.poll(ta) {
            Step::Nodes { level, indices } => {
                let digests = tb.nodes(level, &indices).expect("bounded");
                t.digests += bytes_of(ReplicaMessage::MerkleNodes {
                    version: REPLICA_PROTOCOL_VERSION,
                    level,
                    deltas: chorus::replication::message::delta_encode(&indices),
                });
                t.digests += bytes_of(ReplicaMessage::MerkleDigests {
                    digests: digests.clone(),
                });
                x.handle_digests(ta, &digests).expect("an answer");
            }
            Step::Check(leaves) => {
                let (own, mut kept) = scan_leaves(a, &leaves, cutoff).await;
                let (theirs, _) = scan_leaves(b, &leaves, cutoff).await;
                let differing: Vec<u32> = leaves
                    .iter()
                    .zip(own.iter().zip(&theirs))
                    .filter(|(_, (x, y))| x != y)
                    .map(|(l, _)| *l)
                    .collect();
                t.checks += bytes_of(ReplicaMessage::MerkleCheck {
                    version: REPLICA_PROTOCOL_VERSION,
                    from: NodeId(1),
                    cutoff_ms: cutoff,
                    leaves: leaves.clone(),
                    digests: own,
                });
                t.checks += bytes_of(ReplicaMessage::MerkleDiffer {
                    leaves: differing.clone(),
                });
                let mut offer = Vec::new();
                for leaf in &differing {
                    let i = leaves.binary_search(leaf).expect("in the batch");
                    offer.append(&mut kept[i]);
                }
                x.handle_checked(&differing).expect("checked");
                for chunk in offer.chunks(1024) {
                    let mut wanted = Vec::new();
                    for (i, (key, version)) in chunk.iter().enumerate() {
                        match b.get(key).await.expect("get") {
                            Some(r) if r.version >= *version => {}
                            _ => wanted.push(i as u32),
                        }
                    }
                    t.offers += bytes_of(ReplicaMessage::SyncOffer {
                        version: REPLICA_PROTOCOL_VERSION,
                        entries: chunk
                            .iter()
                            .map(|(key, version)| SyncEntry {
                                key: key.clone(),
                                version: *version,
                            })
                            .collect(),
                    });
                    t.offers += bytes_of(ReplicaMessage::SyncWant {
                        wanted: wanted.clone(),
                    });
                    if wanted.is_empty() {
                        continue;
                    }
                    let mut writes = Vec::new();
                    for i in wanted {
                        let key = chunk[i as usize].0.clone();
                        let record = a.get(&key).await.expect("get").expect("held");
                        writes.push(Write { key, record });
                    }
                    t.repaired += writes.len() as u64;
                    let batch: Vec<(Bytes, Record)> = writes
                        .iter()
                        .map(|w| (w.key.clone(), w.record.clone()))
                        .collect();
                    t.records += bytes_of(ReplicaMessage::Apply {
                        version: REPLICA_PROTOCOL_VERSION,
                        writes,
                    });
                    let n = batch.len();
                    load(b, Some(tb), batch).await;
                    t.records += bytes_of(ReplicaMessage::Applied {
                        outcomes: vec![chorus::replication::WriteOutcome::Applied; n],
                    });
                }
            }
            Step::Wait => panic!("nothing awaited"),
            Step::Done => return t,
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args = args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        // 1. Bytes to repair.
        let (a, b) = (MemoryStorage::new(), MemoryStorage::new());
        let (ta, tb) = (MerkleTree::new(), MerkleTree::new());
        let all: Vec<(Bytes, Record)> = (0..args.keys).map(|i| record(i, args.value_len)).collect();
        let mut full = 0u64;
        for chunk in all.chunks(1024) {
            full += bytes_of(ReplicaMessage::Apply {
                version: REPLICA_PROTOCOL_VERSION,
                writes: chunk
                    .iter()
                    .map(|(key, record)| Write {
                        key: key.clone(),
                        record: record.clone(),
                    })
                    .collect(),
            });
        }
        let on_b: Vec<_> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| i % args.missing_every != 0)
            .map(|(_, w)| w.clone())
            .collect();
        let missing = all.len() - on_b.len();
        load(&a, Some(&ta), all).await;
        load(&b, Some(&tb), on_b).await;
        let started = Instant::now();
        let t = exchange(&a, &ta, &b, &tb).await;
        let took = started.elapsed();
        assert_eq!(t.repaired as usize, missing, "every missing record was sent");
        assert_eq!(ta.node(0, 0), tb.node(0, 0), "the trees agree after");
        let again = exchange(&a, &ta, &b, &tb).await;
        let total = t.digests + t.checks + t.offers + t.records;
        println!(
            "keys {} values {} B, B lacks {} ({:.2} %); full copy {} bytes",
            args.keys,
            args.value_len,
            missing,
            100.0 * missing as f64 / args.keys as f64,
            full
        );
        println!(
            "exchange: digests {} + leaf checks {} + offers {} + records {} = {} bytes = {:.2} % of a full copy ({:.2} s, both sides' scans included)",
            t.digests,
            t.checks,
            t.offers,
            t.records,
            total,
            100.0 * total as f64 / full as f64,
            took.as_secs_f64()
        );
        println!(
            "a second exchange after the repair: {} bytes",
            again.digests + again.checks + again.offers + again.records
        );

        // 2. Write-path cost.
        let mut ratios = Vec::new();
        for run in 0..args.runs {
            let writes: Vec<(Bytes, Record)> =
                (0..args.keys).map(|i| record(i, args.value_len)).collect();
            let mut rate = [0.0f64; 2];
            for (j, with_tree) in [run % 2 == 0, run % 2 != 0].into_iter().enumerate() {
                let storage = MemoryStorage::new();
                let tree = MerkleTree::new();
                let w = writes.clone();
                let started = Instant::now();
                load(&storage, with_tree.then_some(&tree), w).await;
                let puts_per_s = args.keys as f64 / started.elapsed().as_secs_f64();
                rate[usize::from(with_tree)] = puts_per_s;
                let _ = j;
            }
            let ratio = rate[1] / rate[0];
            println!(
                "run {run}: puts/s without tree {:.0}, with tree {:.0}, ratio {:.3}",
                rate[0], rate[1], ratio
            );
            ratios.push(ratio);
        }
        let m = median(ratios);
        println!(
            "write path: median throughput with tree / without = {:.3} (cost {:.1} %)",
            m,
            100.0 * (1.0 - m)
        );
    });
}
