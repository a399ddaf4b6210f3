//! The ring snapshot requests are routed by: rebuilt from the membership view on every change
//! and swapped atomically, so a request never waits for a lock and always sees one
//! consistent ring.

use std::collections::HashMap;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;

use crate::identity::{Address, NodeId};
use crate::membership::{Member, MemberState};
use crate::ring::{Ring, RingConfig, RingMember};

/// One immutable routing snapshot.
///
/// A member that is still joining ([`crate::membership::MemberMeta::joining`]) is in no ring
/// reads use: reads go to `ring`, the settled members. While members join, the one that
/// started first (lowest generation, then lowest id: a node that starts later never takes the
/// turn of one already pulling) is the active joiner; `next` is the ring with it, and writes
/// must meet their quorum in both rings ([`crate::replication::SetsTracker`]), so the joiner
/// receives every write of the ranges it pulls while it pulls them. Other joiners wait their
/// turn, in no ring at all. After a join finishes, `previous` keeps the ring from before it
/// for `join_settle` (one ring per join that ended within it): writes still meet a quorum
/// there too, so a coordinator that has not heard of the end of the join yet (and reads from
/// the old ring) still sees them.
#[derive(Debug)]
pub(crate) struct View {
    /// The settled members: reads, and the first set every write must meet a quorum in.
    pub(crate) ring: Ring,
    /// The settled members and the active joiner, while one joins.
    pub(crate) next: Option<Ring>,
    /// The settled rings before each join that finished within `join_settle`.
    pub(crate) previous: Vec<Ring>,
    /// Members that are joining, in turn order (the first is the active one).
    pub(crate) joiners: Vec<NodeId>,
    /// Where each member believed alive is reached (joiners included), and its state.
    pub(crate) members: HashMap<NodeId, (Address, MemberState)>,
    /// The member at each address.
    by_addr: HashMap<Address, NodeId>,
    pub(crate) n: NonZeroUsize,
}

/// A ring of `members`, routing with unit weights if their weights do not make one (weights
/// are validated on receipt, so that is a bug: route rather than stop routing).
fn ring_of(members: Vec<RingMember>, config: RingConfig) -> Ring {
    let ids: Vec<NodeId> = members.iter().map(|m| m.node).collect();
    match Ring::new(members, config) {
        Ok(ring) => ring,
        Err(e) => {
            tracing::error!(error = %e, "ring rebuild failed; using unit weights");
            let unit = ids
                .into_iter()
                .map(|id| RingMember::weighted(id, NonZeroU32::MIN));
            Ring::new(unit, config).unwrap_or_else(|_| Ring::new([], config).expect("empty ring"))
        }
    }
}

impl View {
    /// The rings of the members believed alive: alive and suspect ones (a suspect still counts
    /// as a replica until it is declared dead), never dead or left ones.
    pub(crate) fn build(members: &[Member], n: NonZeroUsize, ring: RingConfig) -> View {
        let mut map = HashMap::new();
        let mut settled = Vec::new();
        let mut joiners: Vec<(u64, NodeId, NonZeroU32)> = Vec::new();
        for m in members {
            if matches!(m.state, MemberState::Alive | MemberState::Suspect)
                && map.insert(m.id, (m.meta.addr.clone(), m.state)).is_none()
            {
                if m.meta.joining {
                    joiners.push((m.life.generation, m.id, m.meta.weight));
                } else {
                    settled.push(RingMember::weighted(m.id, m.meta.weight));
                }
            }
        }
        joiners.sort_unstable_by_key(|&(generation, id, _)| (generation, id));
        let next = joiners.first().map(|&(_, id, weight)| {
            let mut with = settled.clone();
            with.push(RingMember::weighted(id, weight));
            ring_of(with, ring)
        });
        let by_addr = map.iter().map(|(&id, (a, _))| (a.clone(), id)).collect();
        View {
            ring: ring_of(settled, ring),
            next,
            previous: Vec::new(),
            joiners: joiners.into_iter().map(|(_, id, _)| id).collect(),
            members: map,
            by_addr,
            n,
        }
    }

    /// This view, with writes also meeting a quorum in each of `previous` (the settled rings
    /// before joins that finished).
    pub(crate) fn with_previous(mut self, previous: Vec<Ring>) -> View {
        self.previous = previous;
        self
    }

    /// Whether writes must reach more than the read ring (a join is under way or just ended).
    pub(crate) fn in_transition(&self) -> bool {
        self.next.is_some() || !self.previous.is_empty()
    }

    /// The joining member whose turn it is, if any.
    pub(crate) fn active_joiner(&self) -> Option<NodeId> {
        self.joiners.first().copied()
    }

    /// Whether `id` is joining.
    pub(crate) fn is_joining(&self, id: NodeId) -> bool {
        self.joiners.contains(&id)
    }

    /// The replica sets a write of `key` must meet its quorum in: the read ring's first, then
    /// the ring with the active joiner's and the ring before the last join's, each where it
    /// differs from the ones before.
    pub(crate) fn write_sets(&self, key: &[u8]) -> Vec<Vec<NodeId>> {
        let mut sets = vec![self.replicas(key)];
        for ring in self.next.iter().chain(&self.previous) {
            let set = ring.preference_list(key, self.n);
            if !sets.iter().any(|s| same_members(s, &set)) {
                sets.push(set);
            }
        }
        sets
    }

    /// The ring member a frame from `from` came from: the member at that address, or, for a
    /// connection the peer opened, at the listen address it announced. In insecure mode that
    /// announcement is only a claim; it is used for sparing offers (a false one
    /// delays a repair to Merkle anti-entropy, it never loses it) and for refusing pulls from
    /// non-members (in insecure mode anyone may claim membership anyway).
    pub(crate) fn member_at(&self, from: &Address) -> Option<NodeId> {
        match crate::transport::inbound_peer(from) {
            Some(announced) => self.by_addr.get(&announced).copied(),
            None => self.by_addr.get(from).copied(),
        }
    }

    /// The key's replicas: the first N distinct members of its preference list.
    pub(crate) fn replicas(&self, key: &[u8]) -> Vec<NodeId> {
        self.ring.preference_list(key, self.n)
    }

    /// Whether `id` replicates `key` in this view: it is in any of [`View::write_sets`] (the
    /// read ring's replicas, the ones with the active joiner, or those of a ring from before a
    /// join that ended within `join_settle`). Every decision about dropping a copy goes
    /// through here, so a copy some write set still counts on is never dropped.
    pub(crate) fn holds(&self, key: &[u8], id: NodeId) -> bool {
        is_replica(self, key, id)
            || self
                .next
                .iter()
                .chain(&self.previous)
                .any(|ring| ring.preference_list(key, self.n).contains(&id))
    }

    /// Whether `id` replicates the whole of `range` in one of this view's rings (the read
    /// ring, the ring with the active joiner, or a ring from before a join that ended within
    /// `join_settle`): [`Ring::replicates_range`] in any of them.
    pub(crate) fn replicates_range(&self, range: crate::hash::HashRange, id: NodeId) -> bool {
        std::iter::once(&self.ring)
            .chain(&self.next)
            .chain(&self.previous)
            .any(|ring| ring.replicates_range(range, id, self.n))
    }

    /// Every member of any of `key`'s [`View::write_sets`], each once, the read ring's
    /// replicas first: where a copy handed off must be before this node may drop its own.
    pub(crate) fn write_targets(&self, key: &[u8]) -> Vec<NodeId> {
        let mut targets = self.replicas(key);
        for ring in self.next.iter().chain(&self.previous) {
            for id in ring.preference_list(key, self.n) {
                if !targets.contains(&id) {
                    targets.push(id);
                }
            }
        }
        targets
    }

    pub(crate) fn addr(&self, id: NodeId) -> Option<&Address> {
        self.members.get(&id).map(|(a, _)| a)
    }
}

/// Whether both lists hold the same members (in any order).
fn same_members(a: &[NodeId], b: &[NodeId]) -> bool {
    a.len() == b.len() && a.iter().all(|x| b.contains(x))
}

/// Whether `id` is among `key`'s replicas in `view`'s read ring, without allocating (the
/// local read's hot path).
pub(crate) fn is_replica(view: &View, key: &[u8], id: NodeId) -> bool {
    thread_local! {
        static LIST: std::cell::RefCell<Vec<NodeId>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    LIST.with_borrow_mut(|list| {
        view.ring
            .preference_list_for_hash(crate::hash::key_hash(key), view.n, list);
        list.contains(&id)
    })
}

/// What a ring change means for `me`, as [`follow`] reports it.
pub(crate) trait RingChanges: Send {
    /// Members that became co-replicas of `me` ([`Ring::gained_co_replicas`]): the ranges a
    /// dead member held, or a joining member now owns, are pushed to them at once.
    fn gained(&self, peers: Vec<NodeId>);
    /// Ranges `me` replicated and no longer does ([`Ring::lost_ranges`]): its copies are
    /// handed to their current replicas and removed once the ring settled.
    fn lost(&self, ranges: Vec<crate::hash::HashRange>);
    /// The settled ring's members changed (reported before `gained` and `lost`).
    fn changed(&self) {}
}

/// The node a view follower works for.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Me {
    pub(crate) id: NodeId,
    /// The node starts through seeds, so the ring it starts with (itself alone, or no one
    /// while it joins) is a placeholder until it hears of the cluster, not ranges it owned:
    /// nothing is lost from it. A node that forms a cluster alone did own everything, and
    /// loses what members joining it take over.
    pub(crate) seeded: bool,
}

/// Keeps `slot` (and the transport's address book, in keyring mode) in step with the
/// membership view until the view's sender goes away, and tells `changes` what each change of
/// the settled ring gave `me` ([`RingChanges::gained`]) and took from it
/// ([`RingChanges::lost`]; never while `me` itself is joining: it owned nothing yet).
///
/// When a joining member settles, the read ring from before is added to the view's
/// `previous` for `join_grace` (its members that are still alive): long enough for the news
/// to reach every coordinator, and for the writes they started before to end.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn follow(
    mut view: tokio::sync::watch::Receiver<Arc<[Member]>>,
    slot: Arc<arc_swap::ArcSwap<View>>,
    n: NonZeroUsize,
    ring: RingConfig,
    book: Option<crate::peer_auth::AddressBook>,
    me: Me,
    join_grace: std::time::Duration,
    changes: impl RingChanges,
) {
    let Me {
        id: me,
        seeded: mut placeholder_start,
    } = me;
    // The settled rings' members before each join that finished, and until when writes
    // still meet a quorum among them.
    let mut previous: Vec<(Vec<RingMember>, tokio::time::Instant)> = Vec::new();
    let mut changed = true;
    loop {
        let members = view.borrow_and_update().clone();
        let mut next = View::build(&members, n, ring);
        let prev = slot.load_full();
        let now = tokio::time::Instant::now();
        if next.ring.members().iter().any(|m| prev.is_joining(m.node)) {
            let until = super::later(now, join_grace);
            previous.push((prev.ring.members().to_vec(), until));
        }
        previous.retain(|(_, until)| *until > now);
        let rings: Vec<Ring> = previous
            .iter()
            .filter_map(|(before, _)| {
                let alive: Vec<RingMember> = before
                    .iter()
                    .filter(|m| next.members.contains_key(&m.node) && !next.is_joining(m.node))
                    .copied()
                    .collect();
                (!alive.is_empty() && alive.as_slice() != next.ring.members())
                    .then(|| ring_of(alive, ring))
            })
            .collect();
        next = next.with_previous(rings);
        let next = Arc::new(next);
        // Most changes (a suspicion, a refutation) leave the ring's members alone: no walk.
        let ring_changed = prev.ring.members() != next.ring.members();
        // Before the new view is visible: a cleanup sweep that loads it must also see that
        // the ring just changed.
        if ring_changed {
            changes.changed();
        }
        slot.store(next.clone());
        if ring_changed {
            let peers = next.ring.gained_co_replicas(&prev.ring, me, n);
            if !peers.is_empty() {
                changes.gained(peers);
            }
            // A placeholder start ring, or `me` joining (in neither settled ring, or just
            // settled into the new one), is no ownership lost.
            let placeholder = placeholder_start && prev.ring.members().iter().all(|m| m.node == me);
            let joining = prev.is_joining(me) || next.is_joining(me);
            if !placeholder && !joining {
                let ranges = next.ring.lost_ranges(&prev.ring, me, n);
                if !ranges.is_empty() {
                    changes.lost(ranges);
                }
            }
        }
        if next.ring.members().iter().any(|m| m.node != me) {
            placeholder_start = false;
        }
        if changed && let Some(book) = &book {
            book.replace(
                members
                    .iter()
                    .filter(|m| matches!(m.state, MemberState::Alive | MemberState::Suspect))
                    .map(|m| (m.meta.addr.clone(), m.id)),
            );
        }
        let expiry = previous.iter().map(|(_, until)| *until).min();
        changed = tokio::select! {
            c = view.changed() => {
                if c.is_err() {
                    return;
                }
                true
            }
            () = sleep_until_some(expiry) => false,
        };
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::hash::HashRange;
    use crate::membership::{Life, MemberMeta};

    const N3: NonZeroUsize = NonZeroUsize::new(3).unwrap();

    fn member(id: u64, joining: bool) -> Member {
        Member {
            id: NodeId(id),
            life: Life {
                generation: 1,
                incarnation: 0,
            },
            state: MemberState::Alive,
            meta: MemberMeta {
                joining,
                ..MemberMeta::new(format!("n{id}:1"))
            },
        }
    }

    fn view(members: &[(u64, bool)]) -> View {
        let members: Vec<Member> = members.iter().map(|&(i, j)| member(i, j)).collect();
        View::build(&members, N3, RingConfig::default())
    }

    /// A key whose replicas with member 5 joining include it.
    fn key_owned_by(view: &View, id: NodeId) -> Vec<u8> {
        (0u32..)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| {
                view.next
                    .as_ref()
                    .unwrap()
                    .preference_list(k, N3)
                    .contains(&id)
            })
            .unwrap()
    }

    #[test]
    fn a_joiner_is_written_to_and_not_read_from() {
        let v = view(&[(1, false), (2, false), (3, false), (4, false), (5, true)]);
        assert_eq!(v.ring.len(), 4, "reads: the settled members");
        assert_eq!(v.next.as_ref().unwrap().len(), 5);
        assert!(v.in_transition());
        let key = key_owned_by(&v, NodeId(5));
        assert!(!v.replicas(&key).contains(&NodeId(5)));
        assert!(!is_replica(&v, &key, NodeId(5)));
        let sets = v.write_sets(&key);
        assert_eq!(
            sets.len(),
            2,
            "the old replicas and the ones with the joiner"
        );
        assert_eq!(sets[0], v.replicas(&key));
        assert!(sets[1].contains(&NodeId(5)));
        assert!(v.addr(NodeId(5)).is_some(), "a joiner is reachable");
        // A copy a write set counts on is held: the joiner's, and the old replicas'.
        assert!(v.holds(&key, NodeId(5)), "the joiner is in a write set");
        for id in &sets[0] {
            assert!(v.holds(&key, *id));
        }
        let targets = v.write_targets(&key);
        assert!(targets.contains(&NodeId(5)));
        assert!(sets.iter().flatten().all(|id| targets.contains(id)));
    }

    #[test]
    fn joiners_take_turns_in_the_order_they_started() {
        let v = view(&[(1, false), (2, false), (3, false), (7, true), (5, true)]);
        assert_eq!(
            v.joiners,
            vec![NodeId(5), NodeId(7)],
            "same generation: by id"
        );
        assert_eq!(v.active_joiner(), Some(NodeId(5)));
        let next = v.next.as_ref().unwrap();
        assert!(next.contains(NodeId(5)) && !next.contains(NodeId(7)));
        // A node that started later (a higher generation) waits behind one already joining,
        // whatever their ids: it never takes the turn of a joiner that may be pulling.
        let mut members: Vec<Member> = [(1, false), (2, false), (3, false), (7, true)]
            .iter()
            .map(|&(i, j)| member(i, j))
            .collect();
        let mut late = member(4, true);
        late.life.generation = 2;
        members.push(late);
        let v = View::build(&members, N3, RingConfig::default());
        assert_eq!(v.joiners, vec![NodeId(7), NodeId(4)]);
        // Without joiners, one ring and one set.
        let v = view(&[(1, false), (2, false), (3, false)]);
        assert!(!v.in_transition());
        assert_eq!(v.write_sets(b"k").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn two_joins_ending_within_join_settle_keep_both_rings_from_before() {
        let grace = std::time::Duration::from_secs(5);
        let state = |settled: &[u64], joining: &[u64]| -> Arc<[Member]> {
            settled
                .iter()
                .map(|&i| member(i, false))
                .chain(joining.iter().map(|&i| member(i, true)))
                .collect()
        };
        let first = state(&[1, 2, 3, 4], &[5, 6]);
        let (tx, rx) = tokio::sync::watch::channel(first.clone());
        let slot = Arc::new(arc_swap::ArcSwap::from_pointee(View::build(
            &first,
            N3,
            RingConfig::default(),
        )));
        let task = tokio::spawn(follow(
            rx,
            slot.clone(),
            N3,
            RingConfig::default(),
            None,
            Me {
                id: NodeId(1),
                seeded: false,
            },
            grace,
            Heard::default(),
        ));
        let step = std::time::Duration::from_millis(10);
        tokio::time::sleep(step).await;
        tx.send(state(&[1, 2, 3, 4, 5], &[6])).unwrap();
        tokio::time::sleep(step).await;
        tx.send(state(&[1, 2, 3, 4, 5, 6], &[])).unwrap();
        tokio::time::sleep(step).await;
        let v = slot.load_full();
        let mut sizes: Vec<usize> = v.previous.iter().map(Ring::len).collect();
        sizes.sort_unstable();
        assert_eq!(sizes, vec![4, 5], "the rings before each join");
        tokio::time::sleep(grace).await;
        assert!(slot.load().previous.is_empty());
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn writes_reach_the_ring_from_before_a_join_for_join_settle_after_it() {
        let grace = std::time::Duration::from_secs(5);
        let joining: Arc<[Member]> = [(1, false), (2, false), (3, false), (4, false), (5, true)]
            .iter()
            .map(|&(i, j)| member(i, j))
            .collect();
        let (tx, rx) = tokio::sync::watch::channel(joining.clone());
        let slot = Arc::new(arc_swap::ArcSwap::from_pointee(View::build(
            &joining,
            N3,
            RingConfig::default(),
        )));
        let task = tokio::spawn(follow(
            rx,
            slot.clone(),
            N3,
            RingConfig::default(),
            None,
            Me {
                id: NodeId(1),
                seeded: false,
            },
            grace,
            Heard::default(),
        ));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        assert!(slot.load().previous.is_empty());
        // 5 settles.
        let settled: Arc<[Member]> = (1..=5).map(|i| member(i, false)).collect();
        tx.send(settled).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        let v = slot.load_full();
        assert_eq!(v.ring.len(), 5);
        let previous = v.previous.first().expect("the ring from before the join");
        assert_eq!(previous.len(), 4);
        assert!(!previous.contains(NodeId(5)));
        let key = (0u32..)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| v.ring.preference_list(k, N3).contains(&NodeId(5)))
            .unwrap();
        assert_eq!(v.write_sets(&key).len(), 2);
        // Whoever replicated the key in the ring from before still holds it until the grace
        // ends: a cleanup must not drop it meanwhile.
        let before = previous.preference_list(&key, N3);
        let dropped: Vec<NodeId> = before
            .iter()
            .copied()
            .filter(|id| !v.ring.preference_list(&key, N3).contains(id))
            .collect();
        assert!(!dropped.is_empty(), "5 took the key over from someone");
        for id in &dropped {
            assert!(
                v.holds(&key, *id),
                "in the write set of the ring from before"
            );
        }
        // After the grace, one ring again.
        tokio::time::sleep(grace).await;
        assert!(slot.load().previous.is_empty());
        assert!(!slot.load().in_transition());
        for id in &dropped {
            assert!(!slot.load().holds(&key, *id), "no write set left with it");
        }
        task.abort();
    }

    #[derive(Clone, Default)]
    struct Heard(Arc<Mutex<Vec<Vec<HashRange>>>>);

    impl RingChanges for Heard {
        fn gained(&self, _: Vec<NodeId>) {}
        fn lost(&self, ranges: Vec<HashRange>) {
            self.0.lock().expect("not poisoned").push(ranges);
        }
    }

    /// Runs a follower for node 1 through `rings` (member ids, node 1 first) and returns what
    /// it heard was lost.
    async fn lost_along(seeded: bool, rings: &[&[u64]]) -> Vec<Vec<HashRange>> {
        let n = NonZeroUsize::new(2).expect("two");
        let config = RingConfig::default();
        let members =
            |ids: &[u64]| -> Arc<[Member]> { ids.iter().map(|&i| member(i, false)).collect() };
        let (tx, rx) = tokio::sync::watch::channel(members(rings[0]));
        let slot = Arc::new(arc_swap::ArcSwap::from_pointee(View::build(
            &members(rings[0]),
            n,
            config,
        )));
        let heard = Heard::default();
        let me = Me {
            id: NodeId(1),
            seeded,
        };
        let grace = std::time::Duration::from_secs(5);
        let task = tokio::spawn(follow(
            rx,
            slot.clone(),
            n,
            config,
            None,
            me,
            grace,
            heard.clone(),
        ));
        for ring in &rings[1..] {
            tx.send(members(ring)).expect("follower listens");
            let want = ring.len();
            while slot.load().ring.len() != want {
                tokio::task::yield_now().await;
            }
        }
        drop(tx);
        task.await.expect("follower ends with the sender");
        heard.0.lock().expect("not poisoned").clone()
    }

    #[tokio::test]
    async fn a_joining_node_s_solitary_start_is_not_ownership_it_loses() {
        // Through seeds: alone, then the cluster: nothing lost; then a fourth member joins and
        // takes ranges: those are lost.
        let heard = lost_along(true, &[&[1], &[1, 2, 3], &[1, 2, 3, 4]]).await;
        assert_eq!(heard.len(), 1, "{heard:?}");
        let expected = ring_of(&[1, 2, 3, 4]).lost_ranges(&ring_of(&[1, 2, 3]), NodeId(1), N2);
        assert_eq!(heard[0], expected);
        // Forming the cluster alone, node 1 owned everything, and loses what joiners take.
        let heard = lost_along(false, &[&[1], &[1, 2, 3]]).await;
        assert_eq!(heard.len(), 1, "{heard:?}");
        assert!(!heard[0].is_empty());
    }

    const N2: NonZeroUsize = NonZeroUsize::new(2).unwrap();

    fn ring_of(ids: &[u64]) -> Ring {
        Ring::new(
            ids.iter().map(|&id| RingMember::new(NodeId(id))),
            RingConfig::default(),
        )
        .expect("ring")
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_loses_nothing_while_it_joins() {
        let grace = std::time::Duration::from_secs(5);
        let state = |settled: &[u64], joining: &[u64]| -> Arc<[Member]> {
            settled
                .iter()
                .map(|&i| member(i, false))
                .chain(joining.iter().map(|&i| member(i, true)))
                .collect()
        };
        // Node 5 joins through seeds: it starts as a joiner alone, hears of the cluster, a
        // ring change without it happens meanwhile (4 dies), and it settles.
        let first = state(&[], &[5]);
        let (tx, rx) = tokio::sync::watch::channel(first.clone());
        let slot = Arc::new(arc_swap::ArcSwap::from_pointee(View::build(
            &first,
            N3,
            RingConfig::default(),
        )));
        let heard = Heard::default();
        let me = Me {
            id: NodeId(5),
            seeded: true,
        };
        let task = tokio::spawn(follow(
            rx,
            slot.clone(),
            N3,
            RingConfig::default(),
            None,
            me,
            grace,
            heard.clone(),
        ));
        let step = std::time::Duration::from_millis(10);
        for members in [
            state(&[1, 2, 3, 4], &[5]),
            state(&[1, 2, 3], &[5]),
            state(&[1, 2, 3, 5], &[]),
        ] {
            tokio::time::sleep(step).await;
            tx.send(members).unwrap();
        }
        tokio::time::sleep(step).await;
        assert!(
            heard.0.lock().unwrap().is_empty(),
            "{:?}",
            heard.0.lock().unwrap()
        );
        // Settled, a later join takes ranges from it.
        tx.send(state(&[1, 2, 3, 5, 6], &[])).unwrap();
        tokio::time::sleep(step).await;
        assert_eq!(heard.0.lock().unwrap().len(), 1);
        task.abort();
    }
}
