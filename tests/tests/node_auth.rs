//! Nodes in keyring mode over the in-process network: members with listed keys form a cluster,
//! an outsider that knows every address never joins it, a key is rotated on a running
//! three-node cluster while writes and reads keep succeeding, and a node's identity lives in
//! its data directory. Virtual time (paused tokio clock); `CHORUS_SEED` replays the network.

use std::time::Duration;

use chorus::membership::MembershipConfig;
use chorus::runtime::inproc::InProcessNetwork;
use chorus::runtime::node::StartError;
use chorus::{Address, Consistency, Identity, Keyring, Node, SharedTransport, WriteOptions};
use chorus_tests::runner::seed;
use chorus_tests::views::{alive, quorum_writer, settle};

const SECOND: Duration = Duration::from_secs(1);

fn addr(i: usize) -> Address {
    Address::new(format!("node-{i}:7946"))
}

fn identity(seed: u64, i: usize) -> Identity {
    let mut secret = [0u8; 32];
    secret[..8].copy_from_slice(&seed.to_le_bytes());
    secret[8..16].copy_from_slice(&(i as u64).to_le_bytes());
    Identity::from_secret(secret)
}

async fn start(
    net: &InProcessNetwork,
    i: usize,
    identity: Identity,
    keyring: &Keyring,
    seeds: &[usize],
) -> Node {
    let transport = SharedTransport::new(net.bind(addr(i)).expect("bind"));
    let mut config = chorus::NodeConfig::default();
    // Every node but the first joins by pulling; above the request timeout plus the local
    // preset's gossip spread.
    config.join_settle = Duration::from_millis(2500);
    chorus::node()
        .config(config)
        .identity(identity)
        .keyring(keyring.clone())
        .seeds(seeds.iter().map(|&s| addr(s).to_string()))
        .transport(transport)
        .membership(MembershipConfig::local())
        .rng_seed(seed() ^ i as u64)
        .start()
        .await
        .expect("start")
}

#[tokio::test(start_paused = true)]
async fn an_outsider_knowing_every_address_never_joins_a_keyring_cluster() {
    let net = InProcessNetwork::new(seed());
    let ids: Vec<Identity> = (0..4).map(|i| identity(seed(), i)).collect();
    let keyring = Keyring::from_keys(ids[..3].iter().map(Identity::public_key)).expect("keyring");
    let a = start(&net, 0, ids[0].clone(), &keyring, &[]).await;
    let b = start(&net, 1, ids[1].clone(), &keyring, &[0]).await;
    let c = start(&net, 2, ids[2].clone(), &keyring, &[0]).await;
    let members: Vec<_> = ids[..3].iter().map(Identity::node_id).collect();
    settle(&[&a, &b, &c], &members, 10 * SECOND).await;
    assert_eq!(a.id(), ids[0].node_id(), "the id is the key's");
    // The outsider believes it may join (its own keyring lists everyone) and knows every
    // address.
    let mut wide = keyring.clone();
    wide.insert(ids[3].public_key()).expect("no collision");
    let outsider = start(&net, 3, ids[3].clone(), &wide, &[0, 1, 2]).await;
    tokio::time::sleep(10 * SECOND).await;
    settle(&[&a, &b, &c], &members, SECOND).await;
    assert_eq!(
        alive(&outsider),
        vec![ids[3].node_id()],
        "someone answered it"
    );
    for n in [&a, &b, &c] {
        let auth = n.auth_stats();
        assert!(auth.unknown_key > 0, "seed {}: {auth:?}", seed());
    }
    a.put(
        "k",
        "v",
        WriteOptions::default().consistency(Consistency::All),
    )
    .await
    .expect("the cluster still works");
    for n in [outsider, c, b, a] {
        n.shutdown().await.expect("shutdown");
    }
}

/// Rotation: the node at index 2 moves to a new key (and so a new id) while writes and
/// reads at quorum keep succeeding: add the new key everywhere, start the node under it,
/// stop the old one, remove the old key.
#[tokio::test(start_paused = true)]
async fn a_key_is_rotated_on_a_running_three_node_cluster_without_downtime() {
    let net = InProcessNetwork::new(seed());
    let ids: Vec<Identity> = (0..4).map(|i| identity(seed(), i)).collect();
    let mut keyring =
        Keyring::from_keys(ids[..3].iter().map(Identity::public_key)).expect("keyring");
    let a = start(&net, 0, ids[0].clone(), &keyring, &[]).await;
    let b = start(&net, 1, ids[1].clone(), &keyring, &[0]).await;
    let old = start(&net, 2, ids[2].clone(), &keyring, &[0]).await;
    settle(
        &[&a, &b, &old],
        &[ids[0].node_id(), ids[1].node_id(), ids[2].node_id()],
        10 * SECOND,
    )
    .await;

    let (stop_tx, writer) = quorum_writer(a.clone(), Duration::from_millis(50));

    // 1. The new key is added on the running members.
    keyring.insert(ids[3].public_key()).expect("no collision");
    for n in [&a, &b, &old] {
        n.set_keyring(keyring.clone()).await;
    }
    // 2. The node starts under its new identity, at a new address.
    let new = start(&net, 3, ids[3].clone(), &keyring, &[0, 1]).await;
    settle(
        &[&a, &b, &old, &new],
        &[
            ids[0].node_id(),
            ids[1].node_id(),
            ids[2].node_id(),
            ids[3].node_id(),
        ],
        10 * SECOND,
    )
    .await;
    tokio::time::sleep(2 * SECOND).await;
    // 3. The old life leaves; 4. its key is removed everywhere.
    old.shutdown().await.expect("shutdown");
    assert!(keyring.remove(&ids[2].public_key()));
    for n in [&a, &b, &new] {
        n.set_keyring(keyring.clone()).await;
    }
    settle(
        &[&a, &b, &new],
        &[ids[0].node_id(), ids[1].node_id(), ids[3].node_id()],
        10 * SECOND,
    )
    .await;
    for n in [&a, &b, &new] {
        assert!(
            n.members().iter().all(|m| m.id != ids[2].node_id()),
            "seed {}: the old key's member is still in a view",
            seed()
        );
    }
    tokio::time::sleep(2 * SECOND).await;
    stop_tx.send(()).expect("writer running");
    let ok = writer.await.expect("no write or read failed");
    assert!(ok > 50, "only {ok} writes");
    for n in [new, b, a] {
        n.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(start_paused = true)]
async fn a_node_keeps_its_identity_in_its_data_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = InProcessNetwork::new(seed());
    let boot = |i: usize| {
        let mut config = chorus::NodeConfig::default();
        config.storage = chorus::StorageSpec::new("file");
        config.storage.path = Some(dir.path().join("data"));
        config.membership = chorus::runtime::node::MembershipPreset::Local;
        chorus::node()
            .config(config)
            .transport(SharedTransport::new(net.bind(addr(i)).expect("bind")))
    };
    let first = boot(0).start().await.expect("start");
    let id = first.id();
    first.shutdown().await.expect("shutdown");
    let key_file = dir.path().join("data").join("identity.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file)
            .expect("created")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let again = boot(1).start().await.expect("restart");
    assert_eq!(again.id(), id, "a restart keeps the identity");
    again.shutdown().await.expect("shutdown");

    // Keyring mode without any place for an identity is refused, with a way out named.
    let transport = SharedTransport::new(net.bind(addr(2)).expect("bind"));
    let err = chorus::node()
        .transport(transport)
        .start()
        .await
        .expect_err("no identity");
    assert!(matches!(err, StartError::NoIdentity), "{err}");
    assert!(err.to_string().contains("insecure"));
}
