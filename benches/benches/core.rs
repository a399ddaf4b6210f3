//! Core micro-benchmarks: ring placement, HLC, frame codec.
//!
//! Run: `cargo bench -p chorus-benches --bench core`. Figures go to docs/BENCHMARKS.md.

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::time::Duration;

use bytes::Bytes;
use chorus::Envelope;
use chorus::hlc::{DEFAULT_MAX_DRIFT, Hlc, ManualClock, SystemClock};
use chorus::replication::ReplicaMessage;
use chorus::wire::{self, Header};
use chorus::{NodeId, Record, Ring, RingConfig, RingMember, Timestamp, Version, key_hash};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const N3: NonZeroUsize = NonZeroUsize::new(3).unwrap();

fn ring_of(members: u64) -> Ring {
    Ring::new(
        (1..=members).map(|i| RingMember::new(NodeId(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))),
        RingConfig::default(),
    )
    .expect("ring")
}

/// 4096 distinct keys, cycled, so lookups do not all hit one cache line of the ring.
fn keys() -> Vec<Vec<u8>> {
    (0..4096u32)
        .map(|i| format!("user:{i:08}").into_bytes())
        .collect()
}

fn ring(c: &mut Criterion) {
    let keys = keys();
    let mut group = c.benchmark_group("ring");
    group.throughput(Throughput::Elements(1));
    for members in [10u64, 100] {
        let ring = ring_of(members);
        let mut i = 0usize;
        group.bench_function(format!("preference_list/n3/{members}_members"), |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                black_box(ring.preference_list(black_box(&keys[i]), N3))
            })
        });
        let hashes: Vec<u64> = keys.iter().map(|k| key_hash(k)).collect();
        let mut out = Vec::with_capacity(3);
        let mut j = 0usize;
        group.bench_function(
            format!("preference_list_for_hash/n3/{members}_members"),
            |b| {
                b.iter(|| {
                    j = (j + 1) & 4095;
                    ring.preference_list_for_hash(black_box(hashes[j]), N3, &mut out);
                    black_box(out.len())
                })
            },
        );
    }
    group.sample_size(10);
    group.bench_function("build/100_members", |b| b.iter(|| black_box(ring_of(100))));
    group.finish();
}

fn hlc(c: &mut Criterion) {
    let mut group = c.benchmark_group("hlc");
    group.throughput(Throughput::Elements(1));
    let coarse = Hlc::system();
    group.bench_function("now/coarse_system_clock", |b| {
        b.iter(|| black_box(coarse.now()))
    });
    let precise = Hlc::new(SystemClock, DEFAULT_MAX_DRIFT);
    group.bench_function("now/precise_system_clock", |b| {
        b.iter(|| black_box(precise.now()))
    });
    let manual = Hlc::new(ManualClock::new(1_700_000_000_000), DEFAULT_MAX_DRIFT);
    group.bench_function("now/manual_clock", |b| b.iter(|| black_box(manual.now())));
    let remote = Timestamp::new(1_700_000_000_000, 5);
    group.bench_function("observe", |b| {
        b.iter(|| black_box(manual.observe(black_box(remote))))
    });
    group.finish();
}

fn frame(c: &mut Criterion) {
    let put = Envelope::Replica(ReplicaMessage::apply_one(
        Bytes::from_static(b"user:00001234"),
        Record::value(
            vec![0xAB; 100],
            Version::new(Timestamp::new(1_700_000_000_000, 7), NodeId(42)),
        ),
    ));
    let max = wire::DEFAULT_MAX_FRAME_LEN;
    let encoded = wire::encode(Header::request(1), &put, max).expect("encode");
    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode/put_100B", |b| {
        b.iter(|| black_box(wire::encode(Header::request(1), black_box(&put), max)))
    });
    group.bench_function("decode/put_100B", |b| {
        b.iter(|| black_box(wire::decode::<Envelope>(black_box(&encoded), max)))
    });
    group.bench_function("encode_decode/put_100B", |b| {
        b.iter(|| {
            let frame = wire::encode(Header::request(1), black_box(&put), max).expect("encode");
            black_box(wire::decode::<Envelope>(&frame, max).expect("decode"))
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = ring, hlc, frame
}
criterion_main!(benches);
