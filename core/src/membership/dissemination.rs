//! Dissemination: the queue of news piggybacked on every message and sent in gossip rounds,
//! and the full-state exchanges (push-pull) that join a node, keep views in step and heal
//! partitions.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rand::Rng;

use super::Membership;
use super::message::{
    Life, MAX_MEMBERS_PER_MESSAGE, MAX_UPDATES_PER_MESSAGE, Member, MemberState, SwimMessage,
    Update,
};
use super::timers::Timer;
use crate::identity::Address;
use crate::identity::NodeId;

/// Updates waiting to be piggybacked, least-transmitted (then newest) first.
#[derive(Debug, Default)]
pub(super) struct Broadcasts {
    /// (transmits, newest first, member): the order updates go out in.
    order: BTreeSet<(u32, Reverse<u64>, NodeId)>,
    /// The pending update about each member and its key in `order`.
    by_id: BTreeMap<NodeId, (u32, Reverse<u64>, Update)>,
    next: u64,
}

impl Broadcasts {
    /// Queues `update`, replacing any pending update about the same member.
    pub(super) fn push(&mut self, update: Update) {
        let id = update.id();
        let stamp = Reverse(self.next);
        self.next += 1;
        if let Some((t, s, _)) = self.by_id.insert(id, (0, stamp, update)) {
            self.order.remove(&(t, s, id));
        }
        self.order.insert((0, stamp, id));
    }

    pub(super) fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Appends up to `max` updates to `out`; each is dropped once sent `limit` times.
    fn take(&mut self, max: usize, limit: u32, out: &mut Vec<Update>) {
        let mut again = Vec::new();
        for _ in 0..max {
            let Some((transmits, stamp, id)) = self.order.pop_first() else {
                break;
            };
            let transmits = transmits + 1;
            if transmits < limit {
                if let Some(entry) = self.by_id.get_mut(&id) {
                    entry.0 = transmits;
                    out.push(entry.2.clone());
                }
                again.push((transmits, stamp, id));
            } else if let Some((_, _, update)) = self.by_id.remove(&id) {
                out.push(update);
            }
        }
        // Re-queued after the loop so one message never carries an update twice.
        self.order.extend(again);
    }
}

impl Membership {
    /// News for one outgoing message: `first` (if any), then the least-sent pending updates.
    pub(super) fn piggyback(&mut self, first: Option<Update>) -> Vec<Update> {
        let max = self.max_updates_per_message();
        let mut out = Vec::new();
        if let Some(u) = first {
            out.push(u);
        }
        let limit = self.retransmit_limit();
        self.broadcasts
            .take(max.saturating_sub(out.len()), limit, &mut out);
        out
    }

    /// Updates sent on, and applied from, one message.
    pub(super) fn max_updates_per_message(&self) -> usize {
        self.config
            .max_updates_per_message
            .get()
            .min(MAX_UPDATES_PER_MESSAGE)
    }

    fn retransmit_limit(&self) -> u32 {
        let n = self.live_count() as f64;
        let scale = (n + 1.0).log10().ceil().max(1.0) as u32;
        self.config.retransmit_mult.get() * scale
    }

    /// A gossip round: pending news to a few random live members.
    pub(super) fn gossip(&mut self) {
        let targets = self
            .members
            .sample_live(&mut self.rng, self.config.gossip_nodes.get(), &[]);
        for id in targets {
            if self.broadcasts.is_empty() {
                break;
            }
            let Some(to) = self.members.addr(id) else {
                continue;
            };
            let updates = self.piggyback(None);
            self.send(
                to,
                SwimMessage::Gossip {
                    from: self.local.id,
                    updates,
                },
            );
        }
    }

    /// This node and every member it knows, split into parts that each encode within
    /// [`MembershipConfig::max_message_len`](super::MembershipConfig::max_message_len) and
    /// hold at most [`MAX_MEMBERS_PER_MESSAGE`]; this node is first in the first part.
    fn full_state(&self) -> Vec<Vec<Member>> {
        // Bound of a message without its members: frame prefix and header, envelope and
        // message tags, sender id, flags, part number and list length, all varints at most.
        const MESSAGE_OVERHEAD: usize = 64;
        let budget = self
            .config
            .max_message_len
            .get()
            .saturating_sub(MESSAGE_OVERHEAD);
        let mut parts = Vec::new();
        let mut part: Vec<Member> = Vec::new();
        let mut used = 0;
        for m in std::iter::once(&self.local).chain(self.members.entries().map(|e| &e.member)) {
            let len = encoded_len_bound(m);
            if !part.is_empty() && (used + len > budget || part.len() == MAX_MEMBERS_PER_MESSAGE) {
                parts.push(std::mem::take(&mut part));
                used = 0;
            }
            used += len;
            part.push(m.clone());
        }
        parts.push(part);
        parts
    }

    /// Sends `state` to `to` as push-pull parts.
    fn send_state(&mut self, to: Address, join: bool, reply: bool, state: Vec<Vec<Member>>) {
        for (part, members) in state.into_iter().enumerate() {
            self.send(
                to.clone(),
                SwimMessage::PushPull {
                    from: self.local.id,
                    join,
                    reply,
                    part: part as u32,
                    members,
                },
            );
        }
    }

    fn push_pull(&mut self, to: Address) {
        let state = self.full_state();
        self.send_state(to, false, false, state);
    }

    /// A join attempt: this node's state to every seed.
    pub(super) fn join_seeds(&mut self) {
        let state = self.full_state();
        for seed in self.seeds.clone() {
            self.send_state(seed, true, false, state.clone());
        }
    }

    /// The periodic full-state exchange with a random live member.
    pub(super) fn periodic_push_pull(&mut self) {
        if let Some(&id) = self.members.sample_live(&mut self.rng, 1, &[]).first()
            && let Some(to) = self.members.addr(id)
        {
            self.push_pull(to);
        }
    }

    /// How often [`Membership::periodic_push_pull`] runs: stretched beyond 32 members, as
    /// memberlist does.
    pub(super) fn push_pull_interval(&self) -> Duration {
        let n = self.live_count();
        if n <= 32 {
            return self.config.push_pull_interval;
        }
        let scale = ((n as f64).log2() - 32f64.log2()).ceil() + 1.0;
        self.config.push_pull_interval.mul_f64(scale)
    }

    /// A full-state exchange with a seed not known alive or a member believed dead.
    pub(super) fn reannounce(&mut self) {
        let mut candidates: Vec<Address> = self
            .seeds
            .iter()
            .filter(|seed| !self.members.addr_is_live(seed))
            .cloned()
            .collect();
        // Each burial of a member left a reap deadline; a member buried twice within
        // `reap_after` counts twice (kept as it was before the split).
        candidates.extend(self.timers.iter().filter_map(|(_, timer)| {
            let Timer::Reap(id) = timer else { return None };
            let e = self.members.get(id)?;
            (e.member.state == MemberState::Dead).then(|| e.member.meta.addr.clone())
        }));
        if candidates.is_empty() {
            return;
        }
        let i = self.rng.random_range(0..candidates.len());
        let to = candidates.swap_remove(i);
        self.push_pull(to);
    }

    pub(super) fn on_push_pull(
        &mut self,
        now: Instant,
        from: Address,
        sender: NodeId,
        reply: bool,
        part: u32,
        members: Vec<Member>,
    ) {
        if self.push_pull_budget.take(
            now,
            sender,
            1,
            self.config.max_push_pulls_per_peer_per_second.get(),
            self.config.max_members.get(),
        ) == 0
        {
            self.stats.rate_limited_push_pulls += 1;
            tracing::debug!(%sender, "push-pull over the sender's budget");
            return;
        }
        // A sender this node forgot in a life at least as new as the one it now claims (it
        // restarted with a lower generation, say) would be refused everywhere and never hear
        // why: the answer tells it the life it was forgotten in, so it moves past it.
        let forgotten = (!reply && part == 0)
            .then(|| self.forgotten_record(sender, &members))
            .flatten();
        self.merge_state(now, sender, members);
        if reply {
            self.joined = true;
            self.timers.cancel(Timer::Join);
        } else if part == 0 {
            let mut state = self.full_state();
            if let Some(record) = forgotten {
                // A part of its own: added to a part that is already full, it could push that
                // part past the member cap or the message limit, and the answer would fail.
                state.push(vec![record]);
            }
            self.send_state(from, false, true, state);
        }
    }

    /// A dead record of `sender` in the life it was forgotten in, if that is at least as new as
    /// the life it claims in `members`.
    fn forgotten_record(&self, sender: NodeId, members: &[Member]) -> Option<Member> {
        let claimed = members.iter().find(|m| m.id == sender)?;
        let life: Life = self.members.forgotten(sender)?;
        (claimed.life <= life).then(|| Member {
            id: sender,
            life,
            state: MemberState::Dead,
            meta: claimed.meta.clone(),
        })
    }

    fn merge_state(&mut self, now: Instant, sender: NodeId, members: Vec<Member>) {
        for m in members {
            let update = match m.state {
                MemberState::Alive => Update::Alive {
                    id: m.id,
                    life: m.life,
                    meta: m.meta,
                },
                // As memberlist does: another node's verdict of death is only a suspicion
                // here, so a member wrongly declared dead elsewhere gets time to refute.
                MemberState::Suspect | MemberState::Dead => Update::Suspect {
                    id: m.id,
                    life: m.life,
                    from: sender,
                },
                MemberState::Left => Update::Left {
                    id: m.id,
                    life: m.life,
                },
            };
            self.apply(now, update);
        }
    }
}

/// An upper bound of `m`'s encoded length: varints at their widest, the address as it is.
fn encoded_len_bound(m: &Member) -> usize {
    // id 9, two life varints 10 each, state 1, address length 3, weight 5, key 32.
    70 + m.meta.addr.as_str().len()
}
