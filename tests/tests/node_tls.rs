//! Nodes in keyring mode over the real transports on loopback: TCP (TLS by default in keyring
//! mode) and QUIC, both keyed by the node identities and pinned to the keyring. An outsider
//! that knows every address is refused in the TLS handshake (membership never sees a byte of
//! it), a key is rotated on a running three-node TLS cluster while quorum writes and reads keep
//! succeeding, and the revoked identity cannot come back. Wall-clock time (real sockets);
//! `CHORUS_SEED` picks the identities.

use std::time::Duration;

use chorus::membership::{MemberState, MembershipConfig};
use chorus::{
    Consistency, Identity, Keyring, Node, NodeConfig, ReadOptions, TransportSpec, WriteOptions,
};
use chorus_tests::runner::seed;
use chorus_tests::views::{alive, quorum_writer, settle};

fn identity(seed: u64, i: usize) -> Identity {
    let mut secret = [0u8; 32];
    secret[..8].copy_from_slice(&seed.to_le_bytes());
    secret[8..16].copy_from_slice(&(i as u64).to_le_bytes());
    secret[16] = 0x75;
    Identity::from_secret(secret)
}

fn config(scheme: &str, seeds: &[&Node]) -> NodeConfig {
    let mut spec = TransportSpec::new(scheme, "127.0.0.1:0");
    spec.options.insert("preset".into(), "local".into());
    let mut config = NodeConfig::default();
    config.transport = spec;
    config.seeds = seeds.iter().map(|n| n.addr().to_string()).collect();
    config.join_timeout = Duration::from_secs(2);
    // Above the request timeout plus the local preset's gossip spread, and short: every
    // node but the first joins by pulling.
    config.join_settle = Duration::from_millis(2500);
    config
}

async fn start(scheme: &str, identity: &Identity, keyring: &Keyring, seeds: &[&Node]) -> Node {
    chorus::node()
        .config(config(scheme, seeds))
        .identity(identity.clone())
        .keyring(keyring.clone())
        .membership(MembershipConfig::local())
        .rng_seed(seed())
        .start()
        .await
        .expect("start")
}

/// An outsider (its key in nobody's keyring, though it lists everyone's) that seeds from every
/// member: it never joins, and no member's membership saw one of its messages, because the
/// TLS handshake refused it first.
async fn outsider_is_refused_by_the_channel(scheme: &str, members: &[&Node], outsider: &Identity) {
    let mut everyone = Keyring::new();
    for n in members {
        let key = n
            .members()
            .iter()
            .find(|m| m.id == n.id())
            .map(|m| chorus::PublicKey(m.meta.public_key))
            .expect("own record");
        everyone.insert(key).expect("key");
    }
    everyone.insert(outsider.public_key()).expect("key");
    let o = start(scheme, outsider, &everyone, members).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        alive(&o),
        vec![o.id()],
        "seed {}: the outsider sees members",
        seed()
    );
    for n in members {
        assert!(
            n.members().iter().all(|m| m.id != o.id()),
            "seed {}: the outsider is in a view",
            seed()
        );
        assert!(
            n.transport_refusals().handshake_failures > 0,
            "seed {}: the outsider never reached the transport",
            seed()
        );
        // An outsider's message that reached membership would be refused there as signed by
        // an unknown key.
        assert_eq!(
            n.auth_stats().unknown_key,
            0,
            "seed {}: membership saw the outsider's messages ({:?}): the channel let it through",
            seed(),
            n.auth_stats()
        );
    }
    o.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_rotated_on_a_three_node_tcp_tls_cluster_without_downtime() {
    let ids: Vec<Identity> = (0..5).map(|i| identity(seed(), i)).collect();
    let mut keyring =
        Keyring::from_keys(ids[..3].iter().map(Identity::public_key)).expect("keyring");
    let a = start("tcp", &ids[0], &keyring, &[]).await;
    let b = start("tcp", &ids[1], &keyring, &[&a]).await;
    let old = start("tcp", &ids[2], &keyring, &[&a]).await;
    settle(
        &[&a, &b, &old],
        &[ids[0].node_id(), ids[1].node_id(), ids[2].node_id()],
        Duration::from_secs(20),
    )
    .await;
    outsider_is_refused_by_the_channel("tcp", &[&a, &b, &old], &ids[4]).await;

    let (stop_tx, writer) = quorum_writer(a.clone(), Duration::from_millis(10));

    // 1. The new key is added on the running members; 2. the node starts under it.
    keyring.insert(ids[3].public_key()).expect("no collision");
    for n in [&a, &b, &old] {
        n.set_keyring(keyring.clone()).await;
    }
    let new = start("tcp", &ids[3], &keyring, &[&a, &b]).await;
    settle(
        &[&a, &b, &old, &new],
        &[
            ids[0].node_id(),
            ids[1].node_id(),
            ids[2].node_id(),
            ids[3].node_id(),
        ],
        Duration::from_secs(20),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // 3. The old life leaves; 4. its key is removed everywhere.
    old.shutdown().await.expect("shutdown");
    assert!(keyring.remove(&ids[2].public_key()));
    for n in [&a, &b, &new] {
        n.set_keyring(keyring.clone()).await;
    }
    settle(
        &[&a, &b, &new],
        &[ids[0].node_id(), ids[1].node_id(), ids[3].node_id()],
        Duration::from_secs(20),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(()).expect("writer running");
    let ok = writer.await.expect("no write or read failed");
    assert!(ok > 20, "seed {}: only {ok} writes", seed());
    // 5. The revoked identity cannot come back, though it still lists every key.
    let mut old_ring = keyring.clone();
    old_ring.insert(ids[2].public_key()).expect("key");
    let back = start("tcp", &ids[2], &old_ring, &[&a, &b, &new]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        alive(&back),
        vec![back.id()],
        "seed {}: the revoked key rejoined",
        seed()
    );
    for n in [&a, &b, &new] {
        assert!(
            n.members()
                .iter()
                .all(|m| m.id != ids[2].node_id() || m.state != MemberState::Alive)
        );
    }
    back.shutdown().await.expect("shutdown");
    for n in [new, b, a] {
        n.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_cluster_in_keyring_mode_replicates_and_refuses_an_outsider() {
    let ids: Vec<Identity> = (10..14).map(|i| identity(seed(), i)).collect();
    let keyring = Keyring::from_keys(ids[..3].iter().map(Identity::public_key)).expect("keyring");
    let a = start("quic", &ids[0], &keyring, &[]).await;
    let b = start("quic", &ids[1], &keyring, &[&a]).await;
    let c = start("quic", &ids[2], &keyring, &[&a]).await;
    settle(
        &[&a, &b, &c],
        &[ids[0].node_id(), ids[1].node_id(), ids[2].node_id()],
        Duration::from_secs(20),
    )
    .await;
    let all = WriteOptions::default().consistency(Consistency::All);
    a.put("over-quic", "yes", all).await.expect("write at All");
    let got = c
        .get(
            "over-quic",
            ReadOptions::default().consistency(Consistency::All),
        )
        .await
        .expect("read at All");
    assert_eq!(got.as_deref(), Some(&b"yes"[..]));
    outsider_is_refused_by_the_channel("quic", &[&a, &b, &c], &ids[3]).await;
    for n in [c, b, a] {
        n.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healing_over_tcp_tls_is_answered_for_the_members_the_transport_authenticated() {
    // Healing requests are answered only for the member at the address they came from
    // (`View::member_at`): over TLS connections either side opened, every member's Merkle
    // exchanges, offers and join pulls must still be recognised, never refused.
    let ids: Vec<Identity> = (20..23).map(|i| identity(seed(), i)).collect();
    let keyring = Keyring::from_keys(ids.iter().map(Identity::public_key)).expect("keyring");
    let a = start("tcp", &ids[0], &keyring, &[]).await;
    let b = start("tcp", &ids[1], &keyring, &[&a]).await;
    let c = start("tcp", &ids[2], &keyring, &[&a]).await;
    let nodes = [&a, &b, &c];
    settle(
        &nodes,
        &[ids[0].node_id(), ids[1].node_id(), ids[2].node_id()],
        Duration::from_secs(20),
    )
    .await;
    let quorum = WriteOptions::default().consistency(Consistency::Quorum);
    for k in 0..50 {
        nodes[k % 3]
            .put(format!("healed-{k}"), "v", quorum)
            .await
            .expect("write");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stats: Vec<_> = nodes.iter().map(|n| n.stats()).collect();
        for s in &stats {
            assert_eq!(
                (s.merkle_refused, s.sync_refused, s.pulls_refused),
                (0, 0, 0),
                "{s:?}"
            );
        }
        if stats
            .iter()
            .all(|s| s.merkle_exchanges >= 2 && s.sync_offers > 0)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{stats:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // b and c joined by pulling from the members before them.
    assert!(b.stats().joins_completed == 1 && c.stats().joins_completed == 1);
    for n in [c, b, a] {
        n.shutdown().await.expect("shutdown");
    }
}
