//! The load generator itself: N workers, each with one request in flight, over a fixed keyspace,
//! a warm-up, then a timed window with every latency recorded.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// One client of a system under test: issues one request at a time.
///
/// Redis workers each own a connection (like redis-benchmark's clients); Chorus workers share
/// the embedded node.
pub(crate) trait Worker: Send + 'static {
    /// Writes `value` under `key`; `Err` if the system did not acknowledge it as asked.
    fn put(
        &mut self,
        key: &Bytes,
        value: &Bytes,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Reads `key`; `Ok(found)`.
    fn get(&mut self, key: &Bytes) -> impl Future<Output = Result<bool, String>> + Send;
}

/// What the workers do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Workload {
    Put,
    Get,
    /// 90% gets, 10% puts.
    Mix,
}

impl Workload {
    pub(crate) const ALL: [Workload; 3] = [Workload::Put, Workload::Get, Workload::Mix];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Get => "get",
            Workload::Mix => "mix 90/10",
        }
    }
}

/// Shape of the load, shared by every target.
#[derive(Clone, Debug)]
pub(crate) struct LoadSpec {
    pub(crate) keys: u64,
    pub(crate) value_len: usize,
    pub(crate) warm_up: Duration,
    pub(crate) window: Duration,
    pub(crate) op_timeout: Duration,
    pub(crate) seed: u64,
}

impl LoadSpec {
    /// The key of index `i` (`key:00000042`, 12 bytes).
    pub(crate) fn key(i: u64) -> Bytes {
        Bytes::from(format!("key:{i:08}"))
    }

    pub(crate) fn value(&self) -> Bytes {
        (0..self.value_len).map(|i| b'a' + (i % 26) as u8).collect()
    }
}

/// What one case measured.
#[derive(Clone, Debug)]
pub(crate) struct CaseResult {
    pub(crate) ops_per_sec: f64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) p999: Duration,
    pub(crate) max: Duration,
    pub(crate) errors: u64,
    /// The first error, for the log.
    pub(crate) first_error: Option<String>,
    /// CPU time (user + system) each watched process spent in the window, per operation.
    pub(crate) cpu_per_op: Vec<Duration>,
    pub(crate) misses: u64,
}

/// SplitMix64: a tiny deterministic generator, one per worker, seeded from the run's seed.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

const WARMING: u8 = 0;
const MEASURING: u8 = 1;
const STOPPED: u8 = 2;

struct Tally {
    latencies_ns: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
    misses: u64,
}

/// Writes every key of the keyspace once (not timed), `workers.len()` at a time. A put that
/// fails is retried (up to 3 tries); the number of failed tries is returned, so the log shows
/// them.
pub(crate) async fn preload<W: Worker>(workers: Vec<W>, spec: &LoadSpec) -> Result<u64, String> {
    let n = workers.len() as u64;
    let value = spec.value();
    let mut tasks = Vec::new();
    for (w, mut worker) in workers.into_iter().enumerate() {
        let (keys, value, timeout) = (spec.keys, value.clone(), spec.op_timeout);
        tasks.push(tokio::spawn(async move {
            let mut failed = 0u64;
            let mut i = w as u64;
            while i < keys {
                let key = LoadSpec::key(i);
                let mut tries = 0;
                loop {
                    let error = match tokio::time::timeout(timeout, worker.put(&key, &value)).await
                    {
                        Ok(Ok(())) => break,
                        Ok(Err(e)) => e,
                        Err(_) => format!("no answer in {timeout:?}"),
                    };
                    failed += 1;
                    tries += 1;
                    eprintln!("  preload put of {key:?} failed (try {tries}): {error}");
                    if tries == 3 {
                        return Err(format!("preload put: {error}"));
                    }
                }
                i += n;
            }
            Ok(failed)
        }));
    }
    let mut failed = 0;
    for t in tasks {
        failed += t.await.map_err(|e| format!("preload task: {e}"))??;
    }
    Ok(failed)
}

/// Runs one case: every worker loops on its own task until the window closes.
pub(crate) async fn run_case<W: Worker>(
    workers: Vec<W>,
    workload: Workload,
    spec: &LoadSpec,
    watch: &[u32],
) -> CaseResult {
    let phase = Arc::new(AtomicU8::new(WARMING));
    let value = spec.value();
    let keys: Arc<[Bytes]> = (0..spec.keys).map(LoadSpec::key).collect();
    let mut tasks = Vec::new();
    for (w, mut worker) in workers.into_iter().enumerate() {
        let (phase, value, keys) = (Arc::clone(&phase), value.clone(), Arc::clone(&keys));
        let timeout = spec.op_timeout;
        let mut rng = Rng::new(spec.seed ^ (w as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally {
                latencies_ns: Vec::with_capacity(1 << 14),
                errors: 0,
                first_error: None,
                misses: 0,
            };
            loop {
                let before = phase.load(Ordering::Relaxed);
                if before == STOPPED {
                    break;
                }
                let key = &keys[rng.below(keys.len() as u64) as usize];
                let is_put = match workload {
                    Workload::Put => true,
                    Workload::Get => false,
                    Workload::Mix => rng.below(10) == 0,
                };
                let start = Instant::now();
                let outcome = if is_put {
                    tokio::time::timeout(timeout, worker.put(key, &value))
                        .await
                        .map(|r| r.map(|()| true))
                } else {
                    tokio::time::timeout(timeout, worker.get(key)).await
                };
                let elapsed = start.elapsed();
                // Only operations that started and finished inside the window count.
                if before != MEASURING || phase.load(Ordering::Relaxed) != MEASURING {
                    continue;
                }
                match outcome {
                    Ok(Ok(found)) => {
                        tally.latencies_ns.push(elapsed.as_nanos() as u64);
                        if !found {
                            tally.misses += 1;
                        }
                    }
                    Ok(Err(e)) => {
                        tally.errors += 1;
                        tally.first_error.get_or_insert(e);
                    }
                    Err(_) => {
                        tally.errors += 1;
                        tally
                            .first_error
                            .get_or_insert(format!("no answer in {timeout:?}"));
                    }
                }
            }
            tally
        }));
    }
    tokio::time::sleep(spec.warm_up).await;
    phase.store(MEASURING, Ordering::Relaxed);
    let started = Instant::now();
    let cpu_before: Vec<Duration> = watch.iter().map(|&pid| cpu_time(pid)).collect();
    tokio::time::sleep(spec.window).await;
    phase.store(STOPPED, Ordering::Relaxed);
    let window = started.elapsed();
    let cpu_used: Vec<Duration> = watch
        .iter()
        .zip(cpu_before)
        .map(|(&pid, before)| cpu_time(pid).saturating_sub(before))
        .collect();

    let mut all = Vec::new();
    let (mut errors, mut misses, mut first_error) = (0, 0, None);
    for t in tasks {
        // A worker stops at its next request once the window closes; each request is bounded
        // by `op_timeout`.
        let tally = t.await.expect("worker task");
        all.extend_from_slice(&tally.latencies_ns);
        errors += tally.errors;
        misses += tally.misses;
        first_error = first_error.or(tally.first_error);
    }
    all.sort_unstable();
    let pct = |p: f64| -> Duration {
        if all.is_empty() {
            return Duration::ZERO;
        }
        let idx = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        Duration::from_nanos(all[idx])
    };
    CaseResult {
        ops_per_sec: all.len() as f64 / window.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
        p999: pct(0.999),
        max: pct(1.0),
        errors,
        first_error,
        cpu_per_op: cpu_used
            .iter()
            .map(|c| c.checked_div(all.len().max(1) as u32).unwrap_or_default())
            .collect(),
        misses,
    }
}

/// User + system CPU time of process `pid` so far, from `/proc/<pid>/stat` (clock ticks of
/// 10 ms, `CLK_TCK` = 100 on Linux); zero where it cannot be read.
pub(crate) fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    Duration::from_millis(ticks * 10)
}
