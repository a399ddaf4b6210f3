//! Hinted handoff's book: what a coordinator owes replicas that missed a write.
//!
//! When a replica does not acknowledge a write in time, the coordinator keeps a [`Hint`]
//! (target member, key, the record with its original version, when it was made) and replays
//! it once membership reports the target alive. The [`HintBook`] holds the hints and decides:
//!
//! - **Bounds.** Per target at most [`HintConfig::max_hints_per_target`] hints and
//!   [`HintConfig::max_bytes_per_target`] bytes (key plus encoded record); a hint that does
//!   not fit is refused and counted ([`DropReason::TargetFull`]), the ones already kept stay.
//!   A hint older than [`HintConfig::window`] (Cassandra's `max_hint_window`, 3 h by default)
//!   is dropped and counted ([`DropReason::Expired`]): past it, anti-entropy is what repairs
//!   the replica, and tombstones must outlive every hint (config validation checks that
//!   `tombstone_grace` exceeds the window).
//! - **Schedule.** Only targets believed alive are delivered to, one delivery in flight per
//!   target and at most [`HintConfig::max_concurrent`] in all, each of at most
//!   [`HintConfig::batch`] hints. A token bucket bounds the rate to
//!   [`HintConfig::rate_per_sec`] hints a second over all targets. A delivery that fails (or
//!   leaves hints to retry) backs the target off exponentially from
//!   [`HintConfig::backoff_min`] to [`HintConfig::backoff_max`]; a target coming back alive
//!   is tried at once. Every deadline (each target's next attempt, the next expiry) lives in
//!   one timer table, read by [`HintBook::poll_timeout`].
//! - **Outcomes.** An acknowledged hint ([`HintOutcome::Acked`]: applied, or the replica holds
//!   an equal or newer record) is removed; a refusal that a retry cannot fix
//!   ([`HintOutcome::Rejected`]) is removed and counted ([`DropReason::Rejected`]); anything
//!   else stays for a retry.
//!
//! The book never performs I/O: the driver persists a hint after [`HintBook::add`] returns
//! its id ([`Hint::encode`]), removes what [`HintBook::delivered`] and [`HintBook::expire`]
//! return, and restores the stored hints at start ([`HintBook::restore`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::codec::serde_bytes;
use crate::identity::NodeId;
use crate::record::Record;
use crate::storage::MAX_HINT_LEN;

/// Bounds and pacing of a [`HintBook`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HintConfig {
    /// A hint older than this is dropped (counted as [`DropReason::Expired`]).
    pub window: Duration,
    /// Most hints kept for one target.
    pub max_hints_per_target: usize,
    /// Most bytes (keys and encoded records) kept for one target.
    pub max_bytes_per_target: u64,
    /// Most hints in one delivery (one replica request).
    pub batch: usize,
    /// Most hints delivered per second, over all targets.
    pub rate_per_sec: u32,
    /// Most deliveries in flight at once.
    pub max_concurrent: usize,
    /// The first retry delay after a failed delivery.
    pub backoff_min: Duration,
    /// The longest retry delay.
    pub backoff_max: Duration,
}

impl Default for HintConfig {
    /// A 3 h window, 100,000 hints and 256 MiB per target, batches of 256, 2,000 hints a
    /// second, 2 deliveries at once, backoff from 1 s to 1 min.
    fn default() -> Self {
        HintConfig {
            window: Duration::from_secs(3 * 3600),
            max_hints_per_target: 100_000,
            max_bytes_per_target: 256 << 20,
            batch: 256,
            rate_per_sec: 2_000,
            max_concurrent: 2,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// One write a replica missed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hint {
    /// The replica that missed it.
    pub target: NodeId,
    /// When the hint was made (wall clock, ms since the Unix epoch).
    pub created_ms: u64,
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Bytes,
    /// The record, with the version its coordinator stamped.
    pub record: Record,
}

/// Why a stored hint did not decode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HintDecodeError {
    /// The blob is not an encoded hint (damaged, or from another format).
    #[error("hint does not decode: {0}")]
    Decode(String),
    /// The blob has bytes after the hint.
    #[error("hint has {0} trailing bytes")]
    Trailing(usize),
}

fn codec_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_HINT_LEN>()
}

impl Hint {
    /// Bytes the hint counts for against [`HintConfig::max_bytes_per_target`].
    pub fn size(&self) -> u64 {
        (self.key.len() + self.record.encoded_len()) as u64
    }

    /// The bytes stored for this hint ([`crate::storage::Storage::store_hints`]); `None` if
    /// they would exceed [`MAX_HINT_LEN`].
    pub fn encode(&self) -> Option<Bytes> {
        bincode::serde::encode_to_vec(self, codec_config())
            .ok()
            .map(Bytes::from)
    }

    /// The hint stored as `blob`; never panics, whatever the bytes.
    pub fn decode(blob: &[u8]) -> Result<Hint, HintDecodeError> {
        let (hint, read): (Hint, usize) = bincode::serde::decode_from_slice(blob, codec_config())
            .map_err(|e| HintDecodeError::Decode(e.to_string()))?;
        if read != blob.len() {
            return Err(HintDecodeError::Trailing(blob.len() - read));
        }
        Ok(hint)
    }
}

/// Why a hint was dropped without being delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// The target already has as many hints, or bytes of hints, as allowed.
    TargetFull,
    /// Older than the hint window.
    Expired,
    /// The target refused it for good (a limit, a bad record).
    Rejected,
    /// Stored, but unreadable when restored.
    Undecodable,
}

/// What a target did with one delivered hint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HintOutcome {
    /// It holds the record or a newer one: the hint is done.
    Acked,
    /// Not stored, and a retry may succeed (storage, clock drift, no answer).
    Retry,
    /// Refused for good; the hint is dropped.
    Rejected,
}

/// Hints to send to one target in one request; answer with [`HintBook::delivered`] or
/// [`HintBook::failed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The target.
    pub target: NodeId,
    /// `(id, key, record)` of each hint, oldest first.
    pub hints: Vec<(u64, Bytes, Record)>,
}

/// Counters of a [`HintBook`], since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HintCounters {
    /// Hints kept.
    pub stored: u64,
    /// Hints the target acknowledged.
    pub delivered: u64,
    /// Dropped because the target's share was full.
    pub dropped_full: u64,
    /// Dropped past the window.
    pub dropped_expired: u64,
    /// Dropped because the target refused them for good.
    pub dropped_rejected: u64,
    /// Dropped because they did not decode on restore.
    pub dropped_undecodable: u64,
    /// Deliveries that failed as a whole or left hints to retry.
    pub failed_deliveries: u64,
}

/// A deadline of the book.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Timer {
    /// The target may be delivered to again.
    Deliver(NodeId),
    /// The oldest hint leaves the window.
    Expire,
}

/// Every deadline of the book, earliest first; at most one per timer.
#[derive(Debug, Default)]
struct Timers {
    queue: BTreeSet<(u64, Timer)>,
    at: HashMap<Timer, u64>,
}

impl Timers {
    fn set(&mut self, timer: Timer, at_ms: u64) {
        if let Some(old) = self.at.insert(timer, at_ms) {
            self.queue.remove(&(old, timer));
        }
        self.queue.insert((at_ms, timer));
    }

    fn clear(&mut self, timer: Timer) {
        if let Some(old) = self.at.remove(&timer) {
            self.queue.remove(&(old, timer));
        }
    }

    fn get(&self, timer: Timer) -> Option<u64> {
        self.at.get(&timer).copied()
    }
}

#[derive(Debug, Default)]
struct Target {
    /// Hints by id (ids grow with time, so oldest first).
    hints: BTreeMap<u64, Hint>,
    bytes: u64,
    alive: bool,
    in_flight: bool,
    /// The current retry delay, once a delivery failed.
    backoff: Option<Duration>,
}

/// The hints a node keeps, their bounds and their delivery schedule. See the [module
/// documentation](self).
#[derive(Debug)]
pub struct HintBook {
    config: HintConfig,
    targets: HashMap<NodeId, Target>,
    /// Creation time of each hint, for expiry: `(created_ms, id) -> target`.
    by_age: BTreeMap<(u64, u64), NodeId>,
    next_id: u64,
    in_flight: usize,
    /// Delivery tokens, in thousandths of a hint.
    tokens_milli: u64,
    refilled_ms: u64,
    timers: Timers,
    counters: HintCounters,
}

impl HintBook {
    /// An empty book; its rate bucket starts full at `now_ms`.
    pub fn new(config: HintConfig, now_ms: u64) -> Self {
        HintBook {
            config,
            targets: HashMap::new(),
            by_age: BTreeMap::new(),
            next_id: 1,
            in_flight: 0,
            tokens_milli: Self::bucket_cap(&config),
            refilled_ms: now_ms,
            timers: Timers::default(),
            counters: HintCounters::default(),
        }
    }

    fn bucket_cap(config: &HintConfig) -> u64 {
        config.batch.max(1) as u64 * 1000
    }

    /// The configuration.
    pub fn config(&self) -> &HintConfig {
        &self.config
    }

    /// Counters.
    pub fn counters(&self) -> HintCounters {
        self.counters
    }

    /// Hints kept now.
    pub fn len(&self) -> usize {
        self.by_age.len()
    }

    /// Whether no hint is kept.
    pub fn is_empty(&self) -> bool {
        self.by_age.is_empty()
    }

    /// Hints kept for `target`, and their bytes.
    pub fn pending(&self, target: NodeId) -> (usize, u64) {
        self.targets
            .get(&target)
            .map_or((0, 0), |t| (t.hints.len(), t.bytes))
    }

    /// Keeps `hint` (a new one, made now) and returns its id, unless the target's share is
    /// full ([`DropReason::TargetFull`], counted) or it is already past the window
    /// ([`DropReason::Expired`], counted). The caller persists it under that id.
    pub fn add(&mut self, hint: Hint, now_ms: u64) -> Result<u64, DropReason> {
        let id = self.next_id;
        self.insert(id, hint, now_ms)?;
        self.next_id += 1;
        Ok(id)
    }

    /// Takes back hints stored by an earlier life, as `(id, blob)`: decodes each, keeps the
    /// ones within the window and the bounds. Returns the ids to remove from storage (what
    /// did not decode, expired or did not fit, each counted). Ids of later hints start above
    /// every restored id.
    pub fn restore(&mut self, stored: Vec<(u64, Bytes)>, now_ms: u64) -> Vec<u64> {
        let mut remove = Vec::new();
        for (id, blob) in stored {
            self.next_id = self.next_id.max(id.saturating_add(1));
            match Hint::decode(&blob) {
                Ok(hint) => {
                    if self.insert(id, hint, now_ms).is_err() {
                        remove.push(id);
                    }
                }
                Err(e) => {
                    tracing::warn!(id, error = %e, "stored hint dropped");
                    self.counters.dropped_undecodable += 1;
                    remove.push(id);
                }
            }
        }
        remove
    }

    fn insert(&mut self, id: u64, hint: Hint, now_ms: u64) -> Result<(), DropReason> {
        if self.expired(&hint, now_ms) {
            self.counters.dropped_expired += 1;
            return Err(DropReason::Expired);
        }
        let size = hint.size();
        let config = self.config;
        let target = self.targets.entry(hint.target).or_default();
        if target.hints.len() >= config.max_hints_per_target
            || target.bytes.saturating_add(size) > config.max_bytes_per_target
        {
            self.counters.dropped_full += 1;
            return Err(DropReason::TargetFull);
        }
        target.bytes += size;
        let (who, created) = (hint.target, hint.created_ms);
        target.hints.insert(id, hint);
        let deliverable = target.alive && !target.in_flight && target.backoff.is_none();
        self.by_age.insert((created, id), who);
        self.counters.stored += 1;
        if deliverable && self.timers.get(Timer::Deliver(who)).is_none() {
            self.timers.set(Timer::Deliver(who), now_ms);
        }
        self.schedule_expiry();
        Ok(())
    }

    fn expired(&self, hint: &Hint, now_ms: u64) -> bool {
        let window = self.config.window.as_millis() as u64;
        now_ms.saturating_sub(hint.created_ms) >= window
    }

    fn schedule_expiry(&mut self) {
        match self.by_age.first_key_value() {
            Some((&(created, _), _)) => {
                let at = created.saturating_add(self.config.window.as_millis() as u64);
                self.timers.set(Timer::Expire, at);
            }
            None => self.timers.clear(Timer::Expire),
        }
    }

    /// Membership says `target` is alive (`true`: alive or suspect) or not (dead, left,
    /// unknown). A target that comes back alive is tried at once, its backoff forgotten.
    pub fn set_alive(&mut self, target: NodeId, alive: bool, now_ms: u64) {
        let t = self.targets.entry(target).or_default();
        let was = t.alive;
        t.alive = alive;
        if !alive {
            self.timers.clear(Timer::Deliver(target));
        } else if !was {
            t.backoff = None;
            if !t.hints.is_empty() && !t.in_flight {
                self.timers.set(Timer::Deliver(target), now_ms);
            }
        }
    }

    /// Removes and returns every hint for `target` (for one that left the cluster: the driver
    /// hands them to the keys' new replicas). An in-flight delivery's answer is then ignored.
    pub fn take_target(&mut self, target: NodeId) -> Vec<(u64, Hint)> {
        let Some(t) = self.targets.remove(&target) else {
            return Vec::new();
        };
        if t.in_flight {
            self.in_flight -= 1;
        }
        self.timers.clear(Timer::Deliver(target));
        let taken: Vec<(u64, Hint)> = t.hints.into_iter().collect();
        for (id, h) in &taken {
            self.by_age.remove(&(h.created_ms, *id));
        }
        self.schedule_expiry();
        taken
    }

    /// Drops every hint past the window (counted) and returns their ids, for the caller to
    /// remove from storage.
    pub fn expire(&mut self, now_ms: u64) -> Vec<u64> {
        let window = self.config.window.as_millis() as u64;
        let mut removed = Vec::new();
        while let Some((&(created, id), &target)) = self.by_age.first_key_value() {
            if now_ms.saturating_sub(created) < window {
                break;
            }
            self.by_age.pop_first();
            if let Some(t) = self.targets.get_mut(&target)
                && let Some(h) = t.hints.remove(&id)
            {
                t.bytes -= h.size();
            }
            self.counters.dropped_expired += 1;
            removed.push(id);
        }
        self.schedule_expiry();
        removed
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.refilled_ms);
        self.refilled_ms = self.refilled_ms.max(now_ms);
        let add = elapsed.saturating_mul(u64::from(self.config.rate_per_sec));
        self.tokens_milli = self
            .tokens_milli
            .saturating_add(add)
            .min(Self::bucket_cap(&self.config));
    }

    /// The next delivery due at `now_ms`, if any: marks the target in flight and takes the
    /// rate tokens. Call until `None`, then sleep until [`HintBook::poll_timeout`].
    pub fn poll_delivery(&mut self, now_ms: u64) -> Option<Delivery> {
        if self.in_flight >= self.config.max_concurrent {
            return None;
        }
        self.refill(now_ms);
        let allowed = (self.tokens_milli / 1000) as usize;
        if allowed == 0 {
            return None;
        }
        let due: Vec<NodeId> = self
            .timers
            .queue
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .filter_map(|(_, t)| match t {
                Timer::Deliver(n) => Some(*n),
                Timer::Expire => None,
            })
            .collect();
        for target in due {
            self.timers.clear(Timer::Deliver(target));
            let Some(t) = self.targets.get_mut(&target) else {
                continue;
            };
            if !t.alive || t.in_flight || t.hints.is_empty() {
                continue;
            }
            let take = self.config.batch.max(1).min(allowed);
            let hints: Vec<(u64, Bytes, Record)> = t
                .hints
                .iter()
                .take(take)
                .map(|(id, h)| (*id, h.key.clone(), h.record.clone()))
                .collect();
            t.in_flight = true;
            self.in_flight += 1;
            self.tokens_milli -= hints.len() as u64 * 1000;
            return Some(Delivery { target, hints });
        }
        None
    }

    /// The earliest deadline: a target's next attempt or the next expiry. While the rate
    /// bucket is empty a due delivery waits for its next token, and while
    /// [`HintConfig::max_concurrent`] deliveries are in flight only the expiry counts (the
    /// next delivery waits for an answer).
    pub fn poll_timeout(&self) -> Option<u64> {
        let expiry = self.timers.get(Timer::Expire);
        let deliver = self
            .timers
            .queue
            .iter()
            .find(|(_, t)| matches!(t, Timer::Deliver(_)))
            .map(|(at, _)| *at);
        let deliver = match deliver {
            Some(_) if self.in_flight >= self.config.max_concurrent => None,
            Some(_) if self.config.rate_per_sec == 0 => None,
            Some(at) if self.tokens_milli < 1000 => {
                let rate = u64::from(self.config.rate_per_sec);
                let wait = (1000 - self.tokens_milli).div_ceil(rate);
                Some(at.max(self.refilled_ms + wait))
            }
            other => other,
        };
        match (expiry, deliver) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The answer to a [`Delivery`] for `target`: one outcome per hint id. Returns the ids
    /// that are done (acknowledged or rejected for good), for the caller to remove from
    /// storage. If anything is left to retry, the target backs off; otherwise its next
    /// batch is due at once.
    pub fn delivered(
        &mut self,
        target: NodeId,
        outcomes: &[(u64, HintOutcome)],
        now_ms: u64,
    ) -> Vec<u64> {
        let Some(t) = self.targets.get_mut(&target) else {
            return Vec::new();
        };
        if !t.in_flight {
            return Vec::new();
        }
        t.in_flight = false;
        self.in_flight -= 1;
        let mut done = Vec::new();
        let mut retry = false;
        for &(id, outcome) in outcomes {
            match outcome {
                HintOutcome::Retry => retry = true,
                HintOutcome::Acked | HintOutcome::Rejected => {
                    if let Some(h) = t.hints.remove(&id) {
                        t.bytes -= h.size();
                        self.by_age.remove(&(h.created_ms, id));
                        if outcome == HintOutcome::Acked {
                            self.counters.delivered += 1;
                        } else {
                            self.counters.dropped_rejected += 1;
                        }
                        done.push(id);
                    }
                }
            }
        }
        if retry {
            self.back_off(target, now_ms);
        } else {
            let t = self.targets.get_mut(&target).expect("looked up above");
            t.backoff = None;
            if t.alive && !t.hints.is_empty() {
                self.timers.set(Timer::Deliver(target), now_ms);
            }
        }
        self.schedule_expiry();
        done
    }

    /// A [`Delivery`] for `target` got no usable answer: every hint stays and the target
    /// backs off.
    pub fn failed(&mut self, target: NodeId, now_ms: u64) {
        let Some(t) = self.targets.get_mut(&target) else {
            return;
        };
        if !t.in_flight {
            return;
        }
        t.in_flight = false;
        self.in_flight -= 1;
        self.back_off(target, now_ms);
    }

    fn back_off(&mut self, target: NodeId, now_ms: u64) {
        self.counters.failed_deliveries += 1;
        let (min, max) = (self.config.backoff_min, self.config.backoff_max);
        let Some(t) = self.targets.get_mut(&target) else {
            return;
        };
        let delay = match t.backoff {
            None => min,
            Some(d) => (d * 2).min(max),
        };
        t.backoff = Some(delay);
        if t.alive && !t.hints.is_empty() {
            let at = now_ms.saturating_add(delay.as_millis() as u64);
            self.timers.set(Timer::Deliver(target), at);
        }
    }
}

#[cfg(test)]
mod tests;
