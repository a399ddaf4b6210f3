//! The member table: what this node knows about every other member, and the index of the
//! live ones (alive or suspect) that random choices draw from.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::message::{Life, Member, MemberState};
use super::suspicion::Suspicion;
use crate::identity::Address;
use crate::identity::NodeId;

/// One known member.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) member: Member,
    /// When its state or life last changed.
    pub(super) since: Instant,
    pub(super) suspicion: Option<Box<Suspicion>>,
}

/// Every other member this node knows, by id, and the live ones among them.
#[derive(Debug, Default)]
pub(super) struct MemberTable {
    entries: BTreeMap<NodeId, Entry>,
    /// Alive and suspect members, for random choices.
    live: Vec<NodeId>,
    live_pos: HashMap<NodeId, usize>,
    /// How many live members use each address (to tell which seeds are known alive).
    live_addrs: HashMap<Address, u32>,
    /// Members forgotten (reaped or evicted) and the life they were forgotten in, so a stale
    /// alive about that life cannot bring them back; oldest first in `forgotten_order`.
    forgotten: HashMap<NodeId, Life>,
    forgotten_order: VecDeque<(NodeId, Life)>,
}

impl MemberTable {
    pub(super) fn get(&self, id: NodeId) -> Option<&Entry> {
        self.entries.get(&id)
    }

    pub(super) fn get_mut(&mut self, id: NodeId) -> Option<&mut Entry> {
        self.entries.get_mut(&id)
    }

    pub(super) fn insert(&mut self, entry: Entry) {
        self.unforget(entry.member.id);
        self.entries.insert(entry.member.id, entry);
    }

    /// Forgets `id`, remembering its last life among at most `memory` forgotten members. The
    /// caller removes it from the live index first.
    pub(super) fn remove(&mut self, id: NodeId, memory: usize) {
        let Some(e) = self.entries.remove(&id) else {
            return;
        };
        let life = e.member.life;
        self.forgotten.insert(id, life);
        self.forgotten_order.push_back((id, life));
        while self.forgotten.len() > memory {
            let Some((old, old_life)) = self.forgotten_order.pop_front() else {
                break;
            };
            if self.forgotten.get(&old) == Some(&old_life) {
                self.forgotten.remove(&old);
            }
        }
        // Entries superseded by a later forget or a return stay in the order until they reach
        // its front; keep that bounded too.
        if self.forgotten_order.len() > 2 * memory.max(1) {
            let forgotten = &self.forgotten;
            self.forgotten_order
                .retain(|(id, life)| forgotten.get(id) == Some(life));
        }
    }

    /// Removes `id` without remembering its life (a revoked member). The caller removes it
    /// from the live index first.
    pub(super) fn purge(&mut self, id: NodeId) {
        self.entries.remove(&id);
        self.forgotten.remove(&id);
    }

    /// The life `id` was forgotten in, if it is remembered.
    pub(super) fn forgotten(&self, id: NodeId) -> Option<Life> {
        self.forgotten.get(&id).copied()
    }

    /// `id` is known again: no longer remembered as forgotten.
    fn unforget(&mut self, id: NodeId) {
        self.forgotten.remove(&id);
    }

    /// The dead or left member buried longest ago, to forget early when the table is full.
    pub(super) fn oldest_buried(&self) -> Option<NodeId> {
        self.entries
            .values()
            .filter(|e| matches!(e.member.state, MemberState::Dead | MemberState::Left))
            .min_by_key(|e| (e.since, e.member.id))
            .map(|e| e.member.id)
    }

    /// Every known member, by id.
    pub(super) fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Where `id` is reached, if it is known.
    pub(super) fn addr(&self, id: NodeId) -> Option<Address> {
        self.entries.get(&id).map(|e| e.member.meta.addr.clone())
    }

    /// Live members other than this node.
    pub(super) fn live(&self) -> &[NodeId] {
        &self.live
    }

    /// The first live member whose id follows `local` in id order, wrapping around; `None`
    /// when no other member is live.
    pub(super) fn live_successor(&self, local: NodeId) -> Option<NodeId> {
        use std::ops::Bound::{Excluded, Unbounded};
        self.entries
            .range((Excluded(local), Unbounded))
            .chain(self.entries.range(..local))
            .map(|(&id, _)| id)
            .find(|&id| id != local && self.is_live(id))
    }

    pub(super) fn is_live(&self, id: NodeId) -> bool {
        self.live_pos.contains_key(&id)
    }

    /// Whether some live member uses `addr`.
    pub(super) fn addr_is_live(&self, addr: &Address) -> bool {
        self.live_addrs.contains_key(addr)
    }

    /// Adds a known member to the live index; true if it was not in it.
    pub(super) fn add_live(&mut self, id: NodeId) -> bool {
        if self.live_pos.contains_key(&id) {
            return false;
        }
        if let Some(addr) = self.addr(id) {
            self.count_addr(&addr, true);
        }
        self.live_pos.insert(id, self.live.len());
        self.live.push(id);
        true
    }

    pub(super) fn remove_live(&mut self, id: NodeId) {
        if let Some(pos) = self.live_pos.remove(&id) {
            if let Some(addr) = self.addr(id) {
                self.count_addr(&addr, false);
            }
            self.live.swap_remove(pos);
            if let Some(&moved) = self.live.get(pos) {
                self.live_pos.insert(moved, pos);
            }
        }
    }

    /// A live member moved from `old` to `new`.
    pub(super) fn move_addr(&mut self, old: &Address, new: &Address) {
        self.count_addr(old, false);
        self.count_addr(new, true);
    }

    /// Up to `k` distinct random live members not in `exclude`.
    pub(super) fn sample_live(
        &self,
        rng: &mut ChaCha8Rng,
        k: usize,
        exclude: &[NodeId],
    ) -> Vec<NodeId> {
        let mut out = Vec::with_capacity(k);
        if self.live.len() <= k + exclude.len() {
            let mut all: Vec<NodeId> = self
                .live
                .iter()
                .copied()
                .filter(|id| !exclude.contains(id))
                .collect();
            shuffle(rng, &mut all);
            all.truncate(k);
            return all;
        }
        let mut attempts = 4 * k + 16;
        while out.len() < k && attempts > 0 {
            attempts -= 1;
            let id = self.live[rng.random_range(0..self.live.len())];
            if !exclude.contains(&id) && !out.contains(&id) {
                out.push(id);
            }
        }
        out
    }

    fn count_addr(&mut self, addr: &Address, up: bool) {
        if up {
            *self.live_addrs.entry(addr.clone()).or_insert(0) += 1;
        } else if let Some(n) = self.live_addrs.get_mut(addr) {
            *n -= 1;
            if *n == 0 {
                self.live_addrs.remove(addr);
            }
        }
    }
}

/// Fisher-Yates, drawing from `rng` from the back.
pub(super) fn shuffle(rng: &mut ChaCha8Rng, ids: &mut [NodeId]) {
    for i in (1..ids.len()).rev() {
        let j = rng.random_range(0..=i);
        ids.swap(i, j);
    }
}
