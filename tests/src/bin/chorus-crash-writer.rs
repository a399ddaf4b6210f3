//! Child process of `tests/crash.rs`: writes durably to a store and reports every
//! acknowledged write on stdout, until it is killed.
//!
//! Usage: `chorus-crash-writer <backend> <dir> <cycle>`. Options for the backend come from
//! `chorus_tests::crash::options`. Each line `ACK <key> <timestamp> <node>` is printed only
//! after `apply` returned for that record; the parent kills this process with SIGKILL at a
//! random moment and checks that every acknowledged record survived.

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use chorus::StorageSpec;
use chorus::hlc::{Timestamp, Version};
use chorus::identity::NodeId;
use chorus::record::Record;
use chorus::storage::Storage;
use chorus_tests::crash;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, backend, dir, cycle] = &args[..] else {
        eprintln!("usage: chorus-crash-writer <backend> <dir> <cycle>");
        std::process::exit(2);
    };
    let cycle: u64 = cycle.parse().expect("cycle is a number");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let mut spec = StorageSpec::new(backend.as_str());
        spec.path = Some(dir.into());
        spec.options = crash::options(backend);
        let store = chorus::registry()
            .open_backend(&spec)
            .unwrap_or_else(|err| panic!("opening {backend}: {err}"));
        let stdout = Arc::new(std::sync::Mutex::new(std::io::stdout()));
        let mut writers = Vec::new();
        for node in 0..crash::WRITERS {
            let store = store.clone();
            let stdout = Arc::clone(&stdout);
            writers.push(tokio::spawn(async move {
                for seq in 0..crash::MAX_WRITES_PER_WRITER {
                    let key = crash::key_of(node, seq);
                    let timestamp = Timestamp::new(crash::timestamp_ms(cycle, seq), 0);
                    let version = Version::new(timestamp, NodeId(node));
                    let record = Record::value(crash::value_of(&key, version), version);
                    store
                        .apply(Bytes::from(key.clone()), record)
                        .await
                        .unwrap_or_else(|err| panic!("apply {key}: {err}"));
                    let mut out = stdout.lock().unwrap_or_else(|e| e.into_inner());
                    writeln!(out, "ACK {key} {} {node}", timestamp.as_u64()).expect("stdout");
                    out.flush().expect("stdout");
                }
            }));
        }
        for writer in writers {
            writer.await.expect("writer");
        }
    });
}
