//! Crash tests: a child process writes with fsync on every write and reports each
//! acknowledged write; it is killed with SIGKILL at a seeded random moment, the store is
//! reopened, and every acknowledged write must be there (or a newer write of the same key).
//!
//! Set `CHORUS_SEED` to replay a failing run; failures print the seed, backend and cycle.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::num::NonZeroUsize;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use chorus::StorageSpec;
use chorus::hash::HashRange;
use chorus::hlc::{Timestamp, Version};
use chorus::identity::NodeId;
use chorus::record::{Payload, Record};
use chorus::storage::{Durability, Storage};
use chorus_tests::{conformance, crash};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Kill-and-recover cycles per backend.
const CYCLES: u64 = 20;

/// The child is killed after between 1 and this many acknowledged writes.
const MAX_ACKS_BEFORE_KILL: usize = 400;

/// How long the parent waits for the next acknowledgement before it declares the writer hung.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// Parses `ACK <key> <timestamp> <node>`.
fn parse_ack(line: &str) -> (String, Version) {
    let parts: Vec<&str> = line.split(' ').collect();
    match parts[..] {
        ["ACK", key, ts, node] => (
            key.to_owned(),
            Version::new(
                Timestamp::from_u64(ts.parse().expect("timestamp")),
                NodeId(node.parse().expect("node")),
            ),
        ),
        _ => panic!("unexpected line from the child: {line:?}"),
    }
}

/// Opens the store in `dir` and checks it against the acknowledged writes.
async fn verify(backend: &str, dir: &Path, acked: &BTreeMap<String, Version>, ctx: &str) {
    let mut spec = StorageSpec::new(backend);
    spec.path = Some(dir.to_owned());
    spec.options = crash::options(backend);
    let store = chorus::registry()
        .open_backend(&spec)
        .unwrap_or_else(|err| panic!("{ctx}: reopening: {err}"));
    // The test holds a backend to what it promises; it must promise enough for a SIGKILL.
    let durability = store.capabilities().durability;
    assert!(
        durability >= Durability::ProcessCrash,
        "{ctx}: the crash options give {durability:?}, which a SIGKILL may undo"
    );
    for (key, version) in acked {
        let record = store
            .get(key.as_bytes())
            .await
            .unwrap_or_else(|err| panic!("{ctx}: get {key}: {err}"))
            .unwrap_or_else(|| panic!("{ctx}: acknowledged {key} at {version:?} is missing"));
        assert!(
            record.version >= *version,
            "{ctx}: {key} went back from acknowledged {version:?} to {:?}",
            record.version
        );
    }
    // Everything stored, acknowledged or not, is a record the child really wrote.
    let page = store
        .scan(
            HashRange::FULL,
            None,
            NonZeroUsize::new(1 << 20).expect("nz"),
        )
        .await
        .unwrap_or_else(|err| panic!("{ctx}: scan: {err}"));
    for entry in &page.entries {
        let key = std::str::from_utf8(&entry.key).expect("utf-8 key");
        let expected = Record::value(
            Bytes::from(crash::value_of(key, entry.record.version)),
            entry.record.version,
        );
        assert_eq!(
            entry.record, expected,
            "{ctx}: {key} holds a foreign record"
        );
        assert!(matches!(entry.record.payload, Payload::Value(_)));
    }
    store
        .close()
        .await
        .unwrap_or_else(|err| panic!("{ctx}: close: {err}"));
}

fn crash_cycles(backend: &str) {
    let seed = conformance::seed();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ backend.len() as u64);
    let dir = tempfile::Builder::new()
        .prefix("chorus-crash-")
        .tempdir()
        .expect("tempdir");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut acked: BTreeMap<String, Version> = BTreeMap::new();
    let mut total = 0usize;
    for cycle in 0..CYCLES {
        let ctx = format!(
            "backend {backend:?}, cycle {cycle} (seed {seed}; rerun with {}={seed})",
            conformance::SEED_ENV
        );
        let kill_after = rng.random_range(1..=MAX_ACKS_BEFORE_KILL);
        let mut child = Command::new(env!("CARGO_BIN_EXE_chorus-crash-writer"))
            .arg(backend)
            .arg(dir.path())
            .arg(cycle.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("{ctx}: spawning the writer: {err}"));
        // Lines arrive through a thread, so that a writer that hangs fails the test instead of
        // blocking it.
        let stdout = child.stdout.take().expect("stdout");
        let (lines_tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut record = |line: String| {
            let (key, version) = parse_ack(&line);
            let slot = acked.entry(key).or_insert(version);
            *slot = (*slot).max(version);
        };
        let mut seen = 0;
        while seen < kill_after {
            match lines.recv_timeout(ACK_TIMEOUT) {
                Ok(line) => {
                    record(line);
                    seen += 1;
                }
                Err(stopped) => {
                    let _ = child.kill();
                    let status = child.wait();
                    let mut stderr = String::new();
                    let _ = child
                        .stderr
                        .take()
                        .expect("stderr")
                        .read_to_string(&mut stderr);
                    panic!(
                        "{ctx}: no acknowledgement ({stopped:?}) after {seen}; the writer \
                         exited with {status:?}: {stderr}"
                    );
                }
            }
        }
        // `Child::kill` sends SIGKILL on Unix.
        child
            .kill()
            .unwrap_or_else(|err| panic!("{ctx}: kill: {err}"));
        let _ = child.wait();
        reader.join().expect("the reader thread");
        // Lines printed before the kill were acknowledged too.
        for line in lines.try_iter() {
            // Each line is one write(2) of less than PIPE_BUF bytes, so a kill cannot cut one;
            // an incomplete line would be ignored (its write may or may not be durable).
            let parts: Vec<&str> = line.split(' ').collect();
            if parts.len() == 4 && parts.iter().all(|p| !p.is_empty()) {
                record(line);
                seen += 1;
            }
        }
        total += seen;
        runtime.block_on(verify(backend, dir.path(), &acked, &ctx));
    }
    assert!(
        total >= CYCLES as usize,
        "the writer acknowledged only {total} writes"
    );
    eprintln!(
        "{backend}: {CYCLES} SIGKILL cycles, {total} acknowledged writes, {} keys checked",
        acked.len()
    );
}

#[test]
fn file_survives_sigkill() {
    crash_cycles("file");
}

#[test]
fn sled_survives_sigkill() {
    crash_cycles("sled");
}
