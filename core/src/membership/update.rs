//! Applying news: which [`Update`] supersedes what this node knows (lives compare by
//! generation, then incarnation; a death is final for its life), and the events it causes.

use std::time::Instant;

use super::members::Entry;
use super::message::{Life, Member, MemberMeta, MemberState, Update};
use super::timers::Timer;
use super::{Membership, MembershipEvent};
use crate::hlc::NodeId;

impl Membership {
    pub(super) fn apply_all(&mut self, now: Instant, updates: Vec<Update>) {
        for u in updates {
            self.apply(now, u);
        }
    }

    pub(super) fn apply(&mut self, now: Instant, update: Update) {
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

    fn alive(&mut self, now: Instant, id: NodeId, life: Life, meta: MemberMeta) {
        if id == self.local.id {
            if life.generation == self.local.life.generation
                && life.incarnation > self.local.life.incarnation
            {
                self.refute(life);
            }
            return;
        }
        let event = match self.members.get_mut(id) {
            None => {
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

    /// Marks a member dead or left; true if that was news.
    fn bury(&mut self, now: Instant, id: NodeId, life: Life, state: MemberState) -> bool {
        let Some(e) = self.members.get_mut(id) else {
            return false;
        };
        if life < e.member.life {
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

    /// Forgets `id` if it has been dead or left for `reap_after`.
    pub(super) fn reap(&mut self, now: Instant, id: NodeId) {
        let due = self.members.get(id).is_some_and(|e| {
            matches!(e.member.state, MemberState::Dead | MemberState::Left)
                && e.since + self.config.reap_after <= now
        });
        if due {
            self.members.remove(id);
        }
    }
}
