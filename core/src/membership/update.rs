//! Applying news: which [`Update`] supersedes what this node knows (lives compare by
//! generation, then incarnation; a death is final for its life; only an alive update, which
//! carries the new life's metadata, introduces a new generation), and the events it causes.

use std::time::Instant;

use super::members::Entry;
use super::message::{Life, Member, MemberMeta, MemberState, Update};
use super::timers::Timer;
use super::{Membership, MembershipEvent};
use crate::identity::{Address, NodeId};

impl Membership {
    /// Applies the news of one received message, at most
    /// [`MembershipConfig::max_updates_per_message`](super::MembershipConfig) of it.
    pub(super) fn apply_all(&mut self, now: Instant, updates: Vec<Update>) {
        let max = self.max_updates_per_message();
        if updates.len() > max {
            let dropped = (updates.len() - max) as u64;
            self.stats.dropped_updates += dropped;
            tracing::debug!(dropped, "membership message with too many updates");
        }
        for u in updates.into_iter().take(max) {
            self.apply(now, u);
        }
    }

    pub(super) fn apply(&mut self, now: Instant, update: Update) {
        if update.life().generation >= super::message::MAX_GENERATION {
            self.stats.invalid_updates += 1;
            tracing::debug!(?update, "update at an impossible generation refused");
            return;
        }
        match update {
            Update::Alive { id, life, meta } => self.alive(now, id, life, meta),
            Update::Suspect { id, life, from } => self.suspect(now, id, life, from),
            Update::Dead { id, life, from } => {
                if id == self.local.id {
                    self.refute(life);
                    return;
                }
                if self.bury(now, id, life, MemberState::Dead) {
                    self.broadcasts.push(Update::Dead { id, life, from });
                }
            }
            Update::Left { id, life } => {
                if id == self.local.id {
                    self.refute(life);
                    return;
                }
                if self.bury(now, id, life, MemberState::Left) {
                    self.broadcasts.push(Update::Left { id, life });
                }
            }
        }
    }

    /// Whether `addr` belongs to this node or to a live member other than `id` (keyring
    /// mode: an address is bound to one key while its member is alive). Costs a scan only
    /// when a member arrives at, or moves to, an address that is in use.
    fn address_taken(&self, id: NodeId, addr: &Address) -> bool {
        if *addr == self.local.meta.addr {
            return true;
        }
        if self.members.is_live(id) && self.members.addr(id).as_ref() == Some(addr) {
            return false;
        }
        self.members.addr_is_live(addr)
            && self.members.entries().any(|e| {
                e.member.id != id
                    && e.member.meta.addr == *addr
                    && matches!(e.member.state, MemberState::Alive | MemberState::Suspect)
            })
    }

    fn alive(&mut self, now: Instant, id: NodeId, life: Life, meta: MemberMeta) {
        if id == self.local.id {
            if life > self.local.life {
                self.refute(life);
            }
            return;
        }
        if let Err(error) = meta.validate() {
            self.stats.invalid_updates += 1;
            tracing::debug!(%id, %error, "alive update with invalid metadata refused");
            return;
        }
        if let Some(auth) = &self.auth
            && !auth.keyring.admits(id, &meta.public_key)
        {
            self.auth_stats.unadmitted_members += 1;
            tracing::debug!(%id, "alive update about a member the keyring does not admit");
            return;
        }
        if self.auth.is_some() && self.address_taken(id, &meta.addr) {
            self.auth_stats.address_conflicts += 1;
            tracing::debug!(%id, addr = %meta.addr, "alive update claiming another live member's address");
            return;
        }
        let event = match self.members.get_mut(id) {
            None => {
                if let Some(last) = self.members.forgotten(id)
                    && life <= last
                {
                    self.stats.forgotten_refused += 1;
                    return;
                }
                if !self.room_for_one_more(now) {
                    self.stats.refused_members += 1;
                    tracing::debug!(%id, max = self.config.max_members, "member table full");
                    return;
                }
                let member = Member {
                    id,
                    life,
                    state: MemberState::Alive,
                    meta,
                };
                self.members.insert(Entry {
                    member: member.clone(),
                    since: now,
                    suspicion: None,
                });
                MembershipEvent::Joined(member)
            }
            Some(e) => {
                if life <= e.member.life {
                    return;
                }
                let old_state = e.member.state;
                let changed = e.member.life.generation != life.generation || e.member.meta != meta;
                let moved = (e.member.meta.addr != meta.addr
                    && matches!(old_state, MemberState::Alive | MemberState::Suspect))
                .then(|| (e.member.meta.addr.clone(), meta.addr.clone()));
                e.member.life = life;
                e.member.meta = meta;
                e.member.state = MemberState::Alive;
                e.since = now;
                let member = e.member.clone();
                self.clear_suspicion(id);
                if let Some((old, new)) = moved {
                    self.members.move_addr(&old, &new);
                }
                match old_state {
                    MemberState::Dead | MemberState::Left => MembershipEvent::Joined(member),
                    _ if changed => MembershipEvent::Updated(member),
                    MemberState::Suspect => MembershipEvent::Alive(member),
                    MemberState::Alive => {
                        // A newer incarnation, nothing visible changed: pass it on.
                        self.broadcasts.push(Update::Alive {
                            id,
                            life,
                            meta: member.meta,
                        });
                        return;
                    }
                }
            }
        };
        if self.members.add_live(id) {
            self.probes.add_newcomer(&mut self.rng, id);
        }
        let m = event.member();
        self.broadcasts.push(Update::Alive {
            id,
            life: m.life,
            meta: m.meta.clone(),
        });
        self.events.push_back(event);
    }

    /// Whether one more member fits in the table, forgetting the dead or left member buried
    /// longest ago if that makes room.
    fn room_for_one_more(&mut self, now: Instant) -> bool {
        if self.members.len() + 1 < self.config.max_members.get() {
            return true;
        }
        if self.members.len() == self.members.live().len() {
            // Nobody to forget. Skipping the scan keeps a flood of new ids against a table
            // full of live members at constant cost per update.
            return false;
        }
        match self.members.oldest_buried() {
            Some(old) => {
                self.forget(now, old);
                true
            }
            None => false,
        }
    }

    /// Marks a member dead or left; true if that was news.
    fn bury(&mut self, now: Instant, id: NodeId, life: Life, state: MemberState) -> bool {
        let Some(e) = self.members.get_mut(id) else {
            return false;
        };
        if life < e.member.life {
            return false;
        }
        if life.generation > e.member.life.generation {
            self.stats.newer_life_ignored += 1;
            return false;
        }
        match e.member.state {
            MemberState::Left => return false,
            // A death is final for its life; only the member's own "left" may replace it.
            MemberState::Dead if state == MemberState::Dead || life != e.member.life => {
                return false;
            }
            _ => {}
        }
        e.member.state = state;
        e.member.life = life;
        e.since = now;
        let member = e.member.clone();
        self.clear_suspicion(id);
        // A member buried again (dead, then left) gets another reap deadline; the earlier one
        // finds it not due yet (see `reap`).
        self.timers
            .add(Timer::Reap(id), now + self.config.reap_after);
        self.members.remove_live(id);
        if self.probes.is_probing(id) {
            self.cancel_probe();
        }
        self.events.push_back(match state {
            MemberState::Left => MembershipEvent::Left(member),
            _ => MembershipEvent::Dead(member),
        });
        true
    }

    /// Removes `id`, whose key was revoked, from the view at once: a death event if it was
    /// live, and no memory of its life, so it may return once its key is listed again.
    pub(super) fn revoke(&mut self, now: Instant, id: NodeId) {
        let _ = now;
        let Some(e) = self.members.get_mut(id) else {
            return;
        };
        let was_live = matches!(e.member.state, MemberState::Alive | MemberState::Suspect);
        e.member.state = MemberState::Dead;
        let member = e.member.clone();
        self.clear_suspicion(id);
        self.members.remove_live(id);
        if self.probes.is_probing(id) {
            self.cancel_probe();
        }
        self.members.purge(id);
        self.auth_stats.revoked_members += 1;
        tracing::info!(%id, "member removed: its key is no longer in the keyring");
        if was_live {
            self.events.push_back(MembershipEvent::Dead(member));
        }
    }

    /// Forgets `id` if it has been dead or left for `reap_after`.
    pub(super) fn reap(&mut self, now: Instant, id: NodeId) {
        let due = self.members.get(id).is_some_and(|e| {
            matches!(e.member.state, MemberState::Dead | MemberState::Left)
                && e.since + self.config.reap_after <= now
        });
        if due {
            self.forget(now, id);
        }
    }

    /// Forgets `id` (dead or left), remembering its last life so a stale alive about it is
    /// refused.
    fn forget(&mut self, _now: Instant, id: NodeId) {
        self.members.remove_live(id);
        self.clear_suspicion(id);
        self.members.remove(id, self.config.max_members.get());
    }
}
