//! The tokio membership driver over the in-process transport: join, failure detection, leave
//! and the event stream, on a paused tokio clock (virtual time, no real waiting).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_core::Envelope;
use chorus_core::NodeId;
use chorus_core::identity::Address;
use chorus_core::membership::{
    MemberMeta, MemberState, Membership, MembershipConfig, MembershipEvent, NodeStart,
};
use chorus_core::replication::ReplicaMessage;
use chorus_core::runtime::inproc::{InProcessNetwork, InProcessTransport};
use chorus_core::runtime::membership::{self as driver, MembershipHandle};
use chorus_core::transport::{Incoming, Transport, TransportError};
use chorus_core::wire::{self, Header};

const SEED: u64 = 0xD_41_7E;

fn node(net: &InProcessNetwork, i: u64, seeds: &[&str]) -> MembershipHandle {
    let addr = format!("node-{i}:1");
    let transport = net.bind(addr.as_str()).expect("bind");
    let machine = Membership::new(
        MembershipConfig::local(),
        NodeStart {
            id: NodeId(i),
            generation: 1,
            meta: MemberMeta::new(addr.as_str()),
            seeds: seeds.iter().map(|s| Address::new(*s)).collect(),
            rng_seed: SEED ^ i,
            security: chorus_core::membership::Security::Insecure,
        },
        tokio::time::Instant::now().into_std(),
    );
    driver::start(transport, machine)
}

fn state_of(handle: &MembershipHandle, id: u64) -> Option<MemberState> {
    handle
        .members()
        .iter()
        .find(|m| m.id == NodeId(id))
        .map(|m| m.state)
}

fn alive_count(handle: &MembershipHandle) -> usize {
    handle
        .members()
        .iter()
        .filter(|m| m.state == MemberState::Alive)
        .count()
}

#[tokio::test(start_paused = true)]
async fn driver_joins_detects_a_crash_and_sees_a_leave() {
    let net = InProcessNetwork::new(SEED);
    let first = node(&net, 1, &[]);
    let mut events = first.subscribe();
    let others: Vec<MembershipHandle> = (2..=5).map(|i| node(&net, i, &["node-1:1"])).collect();

    // Join: everyone sees all five alive (itself included).
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(alive_count(&first), 5, "{:?}", first.members());
    for h in &others {
        assert_eq!(alive_count(h), 5, "{:?}", h.members());
    }

    // Crash node 3: it is declared dead everywhere.
    others[1].shutdown().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(state_of(&first, 3), Some(MemberState::Dead));
    for h in [&others[0], &others[2], &others[3]] {
        assert_eq!(state_of(h, 3), Some(MemberState::Dead));
    }

    // Node 5 leaves gracefully: seen as left, not dead.
    others[3].leave(Duration::from_millis(500)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(state_of(&first, 5), Some(MemberState::Left));

    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    let has = |f: &dyn Fn(&MembershipEvent) -> bool| seen.iter().any(f);
    for id in 2..=5 {
        assert!(
            has(&|e| matches!(e, MembershipEvent::Joined(m) if m.id == NodeId(id))),
            "no joined event for {id}: {seen:?}"
        );
    }
    assert!(has(
        &|e| matches!(e, MembershipEvent::Dead(m) if m.id == NodeId(3))
    ));
    assert!(has(
        &|e| matches!(e, MembershipEvent::Left(m) if m.id == NodeId(5))
    ));
    assert!(!has(
        &|e| matches!(e, MembershipEvent::Dead(m) if m.id != NodeId(3))
    ));
    assert!(first.stats().received > 0 && first.stats().sent > 0);
    assert_eq!(first.stats().rejected_frames, 0);
}

#[tokio::test(start_paused = true)]
async fn driver_drops_and_counts_frames_that_are_not_membership_messages() {
    let net = InProcessNetwork::new(SEED);
    let handle = node(&net, 1, &[]);
    let peer = net.bind("peer").expect("bind");
    let data = wire::encode(
        Header::message(),
        &Envelope::Replica(ReplicaMessage::read_one(bytes::Bytes::from_static(b"k"))),
        wire::DEFAULT_MAX_FRAME_LEN,
    )
    .expect("encode");
    let to = Address::new("node-1:1");
    peer.send(&to, data).await.expect("send");
    peer.send(&to, bytes::Bytes::from_static(b"garbage"))
        .await
        .expect("send");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(handle.stats().rejected_frames, 2);
    assert_eq!(alive_count(&handle), 1);
}

/// The in-process transport, except that once `hung` names an address, every send to it waits
/// `stall` (a dialling transport's connect timeout towards a crashed host that drops
/// connection attempts) and then fails.
struct Stalling {
    inner: InProcessTransport,
    hung: Arc<Mutex<Option<Address>>>,
    stall: Duration,
}

impl Stalling {
    fn is_hung(&self, to: &Address) -> bool {
        self.hung.lock().unwrap().as_ref() == Some(to)
    }
}

impl Transport for Stalling {
    fn local_addr(&self) -> Address {
        self.inner.local_addr()
    }

    fn max_frame_len(&self) -> usize {
        self.inner.max_frame_len()
    }

    async fn send(&self, to: &Address, frame: bytes::Bytes) -> Result<(), TransportError> {
        if self.is_hung(to) {
            tokio::time::sleep(self.stall).await;
            return Err(TransportError::unreachable(
                to,
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            ));
        }
        self.inner.send(to, frame).await
    }

    async fn recv(&self) -> Result<Incoming, TransportError> {
        self.inner.recv().await
    }

    async fn close(&self) {
        self.inner.close().await
    }
}

/// Issue 11: the driver used to await every send on the task that owns the machine, so one
/// destination whose sends stall (2 s, twice the LAN probe interval) stalled probing and
/// answering for everyone: healthy members were suspected and declared dead. Sends now go
/// through per-destination queues; the stalled destination's queue fills and drops.
#[tokio::test(start_paused = true)]
async fn a_destination_whose_sends_hang_stalls_nobody_else() {
    let net = InProcessNetwork::new(SEED);
    let hung = Arc::new(Mutex::new(None));
    let n = 6;
    let config = MembershipConfig::lan();
    let handles: Vec<MembershipHandle> = (1..=n)
        .map(|i| {
            let addr = format!("node-{i}:1");
            let transport = Stalling {
                inner: net.bind(addr.as_str()).expect("bind"),
                hung: hung.clone(),
                stall: Duration::from_secs(2),
            };
            let seeds = if i == 1 {
                vec![]
            } else {
                vec![Address::new("node-1:1")]
            };
            let machine = Membership::new(
                config,
                NodeStart {
                    id: NodeId(i),
                    generation: 1,
                    meta: MemberMeta::new(addr.as_str()),
                    seeds,
                    rng_seed: SEED ^ i,
                    security: chorus_core::membership::Security::Insecure,
                },
                tokio::time::Instant::now().into_std(),
            );
            driver::start(transport, machine)
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(10)).await;
    for h in &handles {
        assert_eq!(alive_count(h), n as usize, "{:?}", h.members());
    }
    let mut events: Vec<_> = handles.iter().map(|h| h.subscribe()).collect();

    // Node 4 crashes, and every send to it now stalls for 2 s before failing.
    let victim = 4;
    handles[victim as usize - 1].shutdown().await;
    *hung.lock().unwrap() = Some(Address::new(format!("node-{victim}:1")));
    let crashed = tokio::time::Instant::now();
    let live: Vec<&MembershipHandle> = handles
        .iter()
        .enumerate()
        .filter(|(k, _)| *k as u64 + 1 != victim)
        .map(|(_, h)| h)
        .collect();
    // Detected by every live member within the LAN bound of 10 s.
    while !live
        .iter()
        .all(|h| state_of(h, victim) == Some(MemberState::Dead))
    {
        assert!(
            crashed.elapsed() <= Duration::from_secs(10),
            "node {victim} not declared dead by everyone within 10 s (seed {SEED})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Keep going a while: the stalled destination must not hurt anyone else.
    tokio::time::sleep(Duration::from_secs(30)).await;
    for (k, rx) in events.iter_mut().enumerate() {
        while let Ok(e) = rx.try_recv() {
            let about = e.member().id;
            assert!(
                about == NodeId(victim)
                    || !matches!(e, MembershipEvent::Suspect(_) | MembershipEvent::Dead(_)),
                "node {} saw a healthy member suspected or dead: {e:?} (seed {SEED})",
                k + 1
            );
        }
    }
    for h in &live {
        assert_eq!(alive_count(h), n as usize - 1, "{:?}", h.members());
    }
    let stats = live[0].stats();
    assert!(stats.sent > 0, "{stats:?}");
}
