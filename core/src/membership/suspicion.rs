//! Suspicion: how long a suspected member has to refute (Lifeguard's timeout that shrinks with
//! independent confirmations), what happens when it runs out, and how this node refutes a
//! suspicion about itself.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rand::Rng;

use super::message::{Life, MemberState, Update};
use super::timers::Timer;
use super::{Membership, MembershipConfig, MembershipEvent};
use crate::identity::NodeId;

/// A suspicion in progress.
#[derive(Debug)]
pub(super) struct Suspicion {
    start: Instant,
    min: Duration,
    max: Duration,
    /// Confirmations after which the timeout is `min`; 0 when it never shrinks.
    k: u32,
    /// Who suspects the member, the first suspecter first in id order.
    confirmers: BTreeSet<NodeId>,
}

impl Suspicion {
    /// A suspicion raised by `from` at `now`, with `bounds` from [`bounds`]; its timeout.
    fn new(
        now: Instant,
        (min, max, k): (Duration, Duration, u32),
        from: NodeId,
    ) -> (Self, Duration) {
        let timeout = if k == 0 { min } else { max };
        let suspicion = Suspicion {
            start: now,
            min,
            max,
            k,
            confirmers: BTreeSet::from([from]),
        };
        (suspicion, timeout)
    }

    /// A confirmation by `from`: the new deadline, or `None` if it was not news.
    fn confirm(&mut self, from: NodeId) -> Option<Instant> {
        if self.k == 0 || !self.confirmers.insert(from) {
            return None;
        }
        let c = (self.confirmers.len() - 1) as f64;
        let frac = (c + 1.0).ln() / (self.k as f64 + 1.0).ln();
        let raw = self.max.as_secs_f64() - frac * (self.max - self.min).as_secs_f64();
        let timeout = Duration::from_millis((raw * 1000.0).floor().max(0.0) as u64).max(self.min);
        Some(self.start + timeout)
    }

    /// One member that suspects it (the buddy system names it in the probe).
    pub(super) fn suspecter(&self) -> Option<NodeId> {
        self.confirmers.first().copied()
    }
}

/// (minimum timeout, maximum timeout, confirmations K) for a suspicion raised among `live`
/// live members, this node included.
fn bounds(config: &MembershipConfig, live: usize) -> (Duration, Duration, u32) {
    let scale = (live as f64).max(1.0).log10().max(1.0);
    let min = config
        .probe_interval
        .mul_f64(config.suspicion_mult.get() as f64 * scale);
    if !config.lifeguard {
        return (min, min, 0);
    }
    let max = min * config.suspicion_max_timeout_mult.get();
    let mut k = config.suspicion_confirmations;
    if live.saturating_sub(2) < k as usize {
        k = 0;
    }
    (min, max, k)
}

impl Membership {
    /// Applies `from`'s suspicion of member `id` in `life`.
    pub(super) fn suspect(&mut self, now: Instant, id: NodeId, life: Life, from: NodeId) {
        if id == self.local.id {
            self.refute(life);
            return;
        }
        let bounds = bounds(&self.config, self.live_count());
        let Some(e) = self.members.get_mut(id) else {
            return;
        };
        if life < e.member.life {
            // Someone still spreads a suspicion of an older life: the member refuted it, but
            // the refutation is a short burst and may have missed the sender. Queue the newer
            // record afresh so the next messages, the ack to a ping carrying the stale news
            // among them, carry it.
            if e.member.state == MemberState::Alive {
                self.broadcasts.push(Update::Alive {
                    id,
                    life: e.member.life,
                    meta: e.member.meta.clone(),
                });
            }
            return;
        }
        if life.generation > e.member.life.generation {
            // Only an alive update, with the new life's metadata, introduces a new life:
            // adopting it here would keep the old address and ignore the real alive (its life
            // would no longer be newer), a false death and a rejoin.
            self.stats.newer_life_ignored += 1;
            return;
        }
        match e.member.state {
            MemberState::Dead | MemberState::Left => return,
            MemberState::Suspect if life == e.member.life => {
                // A confirmation from another member shrinks the timeout.
                let Some(deadline) = e.suspicion.as_mut().and_then(|s| s.confirm(from)) else {
                    return;
                };
                if self.timers.deadline(Timer::Suspicion(id)) != Some(deadline) {
                    self.timers.set(Timer::Suspicion(id), deadline);
                }
                self.broadcasts.push(Update::Suspect { id, life, from });
                return;
            }
            _ => {}
        }
        let (suspicion, timeout) = Suspicion::new(now, bounds, from);
        let k = bounds.2;
        e.suspicion = Some(Box::new(suspicion));
        e.member.state = MemberState::Suspect;
        e.member.life = life;
        e.since = now;
        let member = e.member.clone();
        self.timers.set(Timer::Suspicion(id), now + timeout);
        self.broadcasts.push(Update::Suspect { id, life, from });
        self.events.push_back(MembershipEvent::Suspect(member));
        if k > 0 && from != self.local.id {
            self.maybe_probe_suspect_next(id, k);
        }
    }

    /// Lifeguard's timeout falls to its minimum only after K independent confirmations, and
    /// those come from members whose own probes of the suspect fail. Members probe every
    /// other member once per round, so the suspect is probed about once per probe interval
    /// whatever the cluster size, and the K-th confirmation arrives as a Gamma(K) variable:
    /// at N = 1,000 (minimum timeout 6 s) it came after the minimum often enough to push the
    /// slowest detection past 10 s. So a member that hears of a fresh suspicion probes the
    /// suspect next with probability `2K / live`: about 2K extra probes cluster-wide, a
    /// handful of messages, and the confirmations (or the refutation an ack brings) arrive
    /// within a probe interval or two of the news spreading.
    fn maybe_probe_suspect_next(&mut self, id: NodeId, k: u32) {
        let live = self.live_count().max(1) as f64;
        let p = (2.0 * f64::from(k) / live).min(1.0);
        if self.rng.random_bool(p) {
            self.probes.probe_next(id);
        }
    }

    /// Drops the suspicion of `id`, if any (it was refuted or overtaken).
    pub(super) fn clear_suspicion(&mut self, id: NodeId) {
        if let Some(e) = self.members.get_mut(id)
            && e.suspicion.take().is_some()
        {
            self.timers.cancel(Timer::Suspicion(id));
        }
    }

    /// The suspicion of `id` ran out: it is dead.
    pub(super) fn suspicion_expired(&mut self, now: Instant, id: NodeId) {
        let due = self.members.get(id).and_then(|e| {
            e.suspicion.as_ref()?;
            (e.member.state == MemberState::Suspect).then_some(e.member.life)
        });
        if let Some(life) = due {
            self.apply(
                now,
                Update::Dead {
                    id,
                    life,
                    from: self.local.id,
                },
            );
        }
    }

    /// Answers a claim that this node, in `life`, is suspect, dead or gone (or alive in a
    /// newer life than its own): it moves to a newer life than the claim's. Within its own
    /// generation that is the next incarnation; a claim about a newer generation (this node
    /// restarted with a lower one, or the cluster remembers a later life) or at the largest
    /// incarnation moves it to the generation after the claim's, so it is never left
    /// excluded by news it cannot outbid.
    pub(super) fn refute(&mut self, life: Life) {
        if self.leaving {
            return;
        }
        if life < self.local.life {
            // A claim about a life already refuted: whoever sent it missed the refutation
            // (the buddy system's ping says so directly). Send it again, without a new
            // incarnation, first in the next messages (the ack among them).
            self.broadcasts.push(Update::Alive {
                id: self.local.id,
                life: self.local.life,
                meta: self.local.meta.clone(),
            });
            return;
        }
        let same_generation = life.generation == self.local.life.generation;
        match life.incarnation.checked_add(1) {
            Some(next) if same_generation => self.local.life.incarnation = next,
            _ => {
                let Some(generation) = life.generation.checked_add(1) else {
                    self.stats.ignored_messages += 1;
                    tracing::warn!(
                        "cannot refute a claim about this node at the largest generation; ignored"
                    );
                    return;
                };
                self.local.life = Life {
                    generation,
                    incarnation: 0,
                };
                self.stats.generation_bumps += 1;
                tracing::info!(generation, "moved to a new generation to refute a claim");
            }
        }
        self.stats.refutations += 1;
        self.probes.health.raise(&self.config, 1);
        self.broadcasts.push(Update::Alive {
            id: self.local.id,
            life: self.local.life,
            meta: self.local.meta.clone(),
        });
    }
}
