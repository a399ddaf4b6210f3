//! The membership driver over real QUIC transports on loopback: three nodes join through one
//! seed, and their SWIM messages travel as QUIC datagrams (`Transport::send_unreliable`).

use std::sync::Arc;
use std::time::Duration;

use chorus::NodeId;
use chorus::identity::Address;
use chorus::membership::{MemberMeta, MemberState, Membership, MembershipConfig, NodeStart};
use chorus::runtime::membership::{self as driver, MembershipHandle};
use chorus::transport::{SharedTransport, Transport};
use chorus::transport_quic::{Identity, QuicConfig, QuicTransport, TrustedPeers};

const SEED: u64 = 0x51_4D_D6;

async fn quic(identity: &Identity) -> Arc<QuicTransport> {
    let mut trusted = TrustedPeers::new();
    trusted.add(identity.certificate());
    let mut config = QuicConfig::local();
    // Long enough that waiting it out at shutdown would show (see the end of the test).
    config.close_timeout = Duration::from_secs(10);
    let transport = QuicTransport::bind("127.0.0.1:0", config, identity.clone(), trusted)
        .await
        .expect("bind");
    Arc::new(transport)
}

fn member(transport: &Arc<QuicTransport>, id: u64, seeds: &[Address]) -> MembershipHandle {
    let addr = transport.local_addr();
    let machine = Membership::new(
        MembershipConfig::local(),
        NodeStart {
            id: NodeId(id),
            generation: 1,
            meta: MemberMeta::new(addr.as_str()),
            seeds: seeds.to_vec(),
            rng_seed: SEED ^ id,
            security: chorus::membership::Security::Insecure,
        },
        tokio::time::Instant::now().into_std(),
    );
    driver::start(SharedTransport::from(Arc::clone(transport)), machine)
}

fn all_alive(handle: &MembershipHandle, n: usize) -> bool {
    let members = handle.members();
    members.len() == n && members.iter().all(|m| m.state == MemberState::Alive)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_over_quic_and_probe_with_datagrams() {
    let identity = Identity::generate(&[]).expect("identity");
    let transports = [
        quic(&identity).await,
        quic(&identity).await,
        quic(&identity).await,
    ];
    let seed = transports[0].local_addr();
    let handles: Vec<MembershipHandle> = transports
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let seeds = if i == 0 { vec![] } else { vec![seed.clone()] };
            member(t, i as u64 + 1, &seeds)
        })
        .collect();
    // Bounded wait: 200 polls of 50 ms for every node to see all three alive.
    let mut joined = false;
    for _ in 0..200 {
        if handles.iter().all(|h| all_alive(h, 3)) {
            joined = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        joined,
        "{:?}",
        handles.iter().map(|h| h.members()).collect::<Vec<_>>()
    );
    // Let a few probe rounds pass on the established connections.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (i, (t, h)) in transports.iter().zip(&handles).enumerate() {
        let (stats, driver) = (t.stats(), h.stats());
        assert!(stats.datagrams_sent > 0, "node {i}: {stats:?}");
        assert!(stats.datagrams_received > 0, "node {i}: {stats:?}");
        assert_eq!(stats.rejected_connections, 0, "node {i}: {stats:?}");
        assert_eq!(driver.rejected_frames, 0, "node {i}: {driver:?}");
    }
    // Shutting down closes each transport. The last ones still probe the nodes already gone,
    // so their dials to dead addresses are in flight: closing must not wait out such
    // connections for the whole close timeout (2 s in `local()`).
    for (i, h) in handles.iter().enumerate() {
        let started = std::time::Instant::now();
        h.shutdown().await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(1500),
            "node {i} took {took:?} to shut down"
        );
    }
}
