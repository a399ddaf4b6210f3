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
#[derive(Debug)]
pub(crate) struct View {
    pub(crate) ring: Ring,
    /// Where each ring member is reached, and its state.
    pub(crate) members: HashMap<NodeId, (Address, MemberState)>,
    /// The ring member at each address.
    by_addr: HashMap<Address, NodeId>,
    pub(crate) n: NonZeroUsize,
}

impl View {
    /// The ring of the members believed alive: alive and suspect ones (a suspect still counts
    /// as a replica until it is declared dead), never dead or left ones.
    pub(crate) fn build(members: &[Member], n: NonZeroUsize, ring: RingConfig) -> View {
        let mut map = HashMap::new();
        let mut ring_members = Vec::new();
        for m in members {
            if matches!(m.state, MemberState::Alive | MemberState::Suspect)
                && map.insert(m.id, (m.meta.addr.clone(), m.state)).is_none()
            {
                ring_members.push(RingMember::weighted(m.id, m.meta.weight));
            }
        }
        let ring = match Ring::new(ring_members, ring) {
            Ok(ring) => ring,
            Err(e) => {
                // Weights are validated on receipt, so this is a bug: route with weight 1
                // rather than stop routing.
                tracing::error!(error = %e, "ring rebuild failed; using unit weights");
                let unit = map
                    .keys()
                    .map(|&id| RingMember::weighted(id, NonZeroU32::MIN));
                Ring::new(unit, ring).unwrap_or_else(|_| Ring::new([], ring).expect("empty ring"))
            }
        };
        let by_addr = map.iter().map(|(&id, (a, _))| (a.clone(), id)).collect();
        View {
            ring,
            members: map,
            by_addr,
            n,
        }
    }

    /// The ring member a frame from `from` came from: the member at that address, or, for a
    /// connection the peer opened, at the listen address it announced. In insecure mode that
    /// announcement is only a claim; it is used for nothing but sparing offers (a false one
    /// delays a repair to Merkle anti-entropy, it never loses it).
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

    /// Whether `id` replicates `key` in this view: today, membership in
    /// [`View::replicas`]. Every decision about dropping a copy goes through here, so a view
    /// that comes to span more than one ring answers for all of them at once.
    pub(crate) fn holds(&self, key: &[u8], id: NodeId) -> bool {
        is_replica(self, key, id)
    }

    pub(crate) fn addr(&self, id: NodeId) -> Option<&Address> {
        self.members.get(&id).map(|(a, _)| a)
    }
}

/// Whether `id` is among `key`'s replicas in `view`, without allocating (the local read's
/// hot path).
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
}

/// The node a view follower works for.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Me {
    pub(crate) id: NodeId,
    /// The node starts through seeds, so the ring it starts with (itself alone) is a
    /// placeholder until it hears of the cluster, not ranges it owned: nothing is lost from
    /// it. A node that forms a cluster alone did own everything, and loses what members
    /// joining it take over.
    pub(crate) joining: bool,
}

/// Keeps `slot` (and the transport's address book, in keyring mode) in step with the
/// membership view until the view's sender goes away, and tells `changes` what each ring
/// change gave `me` and took from it.
pub(crate) async fn follow(
    mut view: tokio::sync::watch::Receiver<Arc<[Member]>>,
    slot: Arc<arc_swap::ArcSwap<View>>,
    n: NonZeroUsize,
    ring: RingConfig,
    book: Option<crate::peer_auth::AddressBook>,
    me: Me,
    changes: impl RingChanges,
) {
    let Me {
        id: me,
        mut joining,
    } = me;
    loop {
        let members = view.borrow_and_update().clone();
        let next = Arc::new(View::build(&members, n, ring));
        let prev = slot.swap(next.clone());
        // Most changes (a suspicion, a refutation) leave the ring's members alone: no walk.
        if prev.ring.members() != next.ring.members() {
            let peers = next.ring.gained_co_replicas(&prev.ring, me, n);
            if !peers.is_empty() {
                changes.gained(peers);
            }
            let placeholder = joining && prev.ring.members().iter().all(|m| m.node == me);
            if !placeholder {
                let ranges = next.ring.lost_ranges(&prev.ring, me, n);
                if !ranges.is_empty() {
                    changes.lost(ranges);
                }
            }
        }
        if next.ring.members().iter().any(|m| m.node != me) {
            joining = false;
        }
        if let Some(book) = &book {
            book.replace(
                members
                    .iter()
                    .filter(|m| matches!(m.state, MemberState::Alive | MemberState::Suspect))
                    .map(|m| (m.meta.addr.clone(), m.id)),
            );
        }
        if view.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::hash::HashRange;
    use crate::membership::{Life, MemberMeta};

    fn member(id: u64) -> Member {
        Member {
            id: NodeId(id),
            life: Life {
                generation: 1,
                incarnation: 0,
            },
            state: MemberState::Alive,
            meta: MemberMeta::new(Address::new(format!("node-{id}:1"))),
        }
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
    async fn lost_along(joining: bool, rings: &[&[u64]]) -> Vec<Vec<HashRange>> {
        let n = NonZeroUsize::new(2).expect("two");
        let config = RingConfig::default();
        let members = |ids: &[u64]| -> Arc<[Member]> { ids.iter().map(|&i| member(i)).collect() };
        let (tx, rx) = tokio::sync::watch::channel(members(rings[0]));
        let slot = Arc::new(arc_swap::ArcSwap::from_pointee(View::build(
            &members(rings[0]),
            n,
            config,
        )));
        let heard = Heard::default();
        let me = Me {
            id: NodeId(1),
            joining,
        };
        let task = tokio::spawn(follow(rx, slot.clone(), n, config, None, me, heard.clone()));
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
}
