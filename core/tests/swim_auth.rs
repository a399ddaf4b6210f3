//! Signed membership in the deterministic simulator: a keyring cluster behaves like an
//! insecure one, and an outsider that knows every address can neither join nor harm it until
//! its key is listed, and is removed again when the key is revoked.
//!
//! Every test draws its randomness from a seed: `CHORUS_SEED` (decimal or `0x` hex) when set,
//! otherwise a fixed default. A failure names the seed; rerun with `CHORUS_SEED=<seed>`.

use std::time::Duration;

use chorus_core::membership::{MemberState, MembershipConfig, SwimMessage, Update};
use chorus_core::sim::Simulation;

const DEFAULT_SEED: u64 = 0xA_17E;

fn base_seed() -> u64 {
    match std::env::var("CHORUS_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("CHORUS_SEED={s} is not a u64"))
        }
        Err(_) => DEFAULT_SEED,
    }
}

#[track_caller]
fn check(cond: bool, sim: &Simulation, what: &str) {
    assert!(
        cond,
        "{what} (seed {seed}; rerun with CHORUS_SEED={seed}) at {:?}, stats {:?}",
        sim.now(),
        sim.stats(),
        seed = sim.seed()
    );
}

/// Whether node `i` sees node `j` in state `state` (`None`: does not know it at all).
fn sees(sim: &Simulation, i: usize, j: usize) -> Option<MemberState> {
    let id = sim.node_id(j);
    sim.node(i)?.member(id).map(|m| m.state)
}

/// Nodes `0..n` of a keyring simulation admitting `admitted` identities, all joining through
/// node 0, with every message through the codec.
fn signed_cluster(seed: u64, n: usize, admitted: usize) -> Simulation {
    let mut sim = Simulation::new(seed);
    sim.enable_signing(admitted);
    sim.set_codec(true);
    for _ in 0..n {
        sim.add_node(MembershipConfig::lan(), &[0]);
    }
    sim
}

#[test]
fn a_signed_cluster_converges_detects_a_crash_and_refuses_nothing() {
    let seed = base_seed();
    let mut sim = signed_cluster(seed, 30, 30);
    sim.run_for(Duration::from_secs(20));
    check(sim.converged(), &sim, "30 signed nodes did not converge");
    check(sim.stats().rejected_frames == 0, &sim, "frames rejected");
    for i in 0..30 {
        let auth = sim.node(i).expect("running").auth_stats();
        check(
            auth.rejected() == 0,
            &sim,
            &format!("node {i} refused {auth:?}"),
        );
        check(auth.verified > 0, &sim, "nothing verified");
    }
    sim.crash(7);
    sim.run_for(Duration::from_secs(10));
    let dead = (0..30)
        .filter(|&i| i != 7)
        .all(|i| sees(&sim, i, 7) == Some(MemberState::Dead));
    check(dead, &sim, "the crash was not detected within 10 s");
    check(sim.stats().false_deaths == 0, &sim, "false deaths");
}

#[test]
fn an_outsider_knowing_every_address_cannot_join_or_harm_until_admitted_and_is_removed_when_revoked()
 {
    let seed = base_seed();
    let n = 10;
    // Ten admitted nodes; node 10 holds a key nobody lists.
    let mut sim = signed_cluster(seed, n, n);
    sim.run_for(Duration::from_secs(10));
    check(sim.converged(), &sim, "the cluster did not form");
    let all: Vec<usize> = (0..n).collect();
    let outsider = sim.add_node(MembershipConfig::lan(), &all);
    sim.record_events();
    // The outsider also tells everyone that node 3 is dead and node 4 suspect, unsigned and
    // signed with its own key, again and again.
    for round in 0..20 {
        for to in 0..n {
            let lie = SwimMessage::Gossip {
                from: sim.node_id(3),
                updates: vec![
                    Update::Dead {
                        id: sim.node_id(3),
                        life: sim.node(3).expect("running").local().life,
                        from: sim.node_id(outsider),
                    },
                    Update::Suspect {
                        id: sim.node_id(4),
                        life: sim.node(4).expect("running").local().life,
                        from: sim.node_id(outsider),
                    },
                ],
            };
            sim.inject(outsider, to, lie);
        }
        sim.run_for(Duration::from_millis(500 + round));
    }
    sim.run_for(Duration::from_secs(20));
    for i in 0..n {
        check(
            sees(&sim, i, outsider).is_none(),
            &sim,
            &format!("node {i} admitted the outsider"),
        );
        let auth = sim.node(i).expect("running").auth_stats();
        check(auth.unsigned >= 20, &sim, &format!("node {i}: {auth:?}"));
        check(auth.unknown_key > 0, &sim, &format!("node {i}: {auth:?}"));
    }
    check(
        sim.node(outsider)
            .expect("running")
            .members()
            .next()
            .is_none(),
        &sim,
        "someone answered the outsider",
    );
    let suspicions = sim
        .events()
        .iter()
        .filter(|e| e.observer < n)
        .filter(|e| {
            !matches!(
                e.event,
                chorus_core::membership::MembershipEvent::Joined(_)
                    | chorus_core::membership::MembershipEvent::Updated(_)
            )
        })
        .count();
    check(
        suspicions == 0,
        &sim,
        "the outsider caused a suspicion or death",
    );
    check(
        sim.stats().false_suspicions == 0 && sim.stats().false_deaths == 0,
        &sim,
        "false suspicions or deaths",
    );

    // Admitted: it joins.
    let mut keyring = sim.keyring().expect("keyring mode").clone();
    keyring
        .insert(sim.identity(outsider).public_key())
        .expect("no collision");
    sim.set_keyring(keyring.clone());
    sim.run_for(Duration::from_secs(20));
    check(
        sim.converged(),
        &sim,
        "the admitted node did not join everywhere",
    );

    // Revoked: it is removed at once and stays out, whatever it says.
    check(
        keyring.remove(&sim.identity(outsider).public_key()),
        &sim,
        "key listed",
    );
    sim.set_keyring(keyring);
    for i in 0..n {
        check(
            sees(&sim, i, outsider).is_none(),
            &sim,
            &format!("node {i} kept the revoked member"),
        );
    }
    sim.run_for(Duration::from_secs(30));
    for i in 0..n {
        check(
            sees(&sim, i, outsider).is_none(),
            &sim,
            &format!("the revoked member came back at node {i}"),
        );
        check(
            sim.node(i)
                .expect("running")
                .members()
                .filter(|m| m.state == MemberState::Alive)
                .count()
                == n - 1,
            &sim,
            &format!("node {i} lost a member"),
        );
    }
    // The revoked node, cut off, suspects everyone (those are its own events, and the sim
    // counts its removal as a death of a running node); nobody admitted suspects anyone.
    let outsider_id = sim.node_id(outsider);
    let harm = sim
        .events()
        .iter()
        .filter(|e| e.observer < n && e.event.member().id != outsider_id)
        .filter(|e| {
            matches!(
                e.event,
                chorus_core::membership::MembershipEvent::Suspect(_)
                    | chorus_core::membership::MembershipEvent::Dead(_)
            )
        })
        .count();
    check(harm == 0, &sim, "an admitted node suspected another");
}

#[test]
fn a_signed_run_replays_from_its_seed() {
    let seed = base_seed();
    let run = || {
        let mut sim = signed_cluster(seed, 12, 12);
        sim.run_for(Duration::from_secs(5));
        sim.crash(3);
        sim.run_for(Duration::from_secs(10));
        (
            sim.stats(),
            (0..12)
                .filter(|&i| i != 3)
                .map(|i| sim.node(i).expect("running").auth_stats())
                .collect::<Vec<_>>(),
        )
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b, "seed {seed}: two runs differ");
}

/// Verifying ahead of delivery on helper threads ([`Simulation::set_threads`]) changes
/// nothing: with 1, 2 and 3 threads the same seed gives the same events, counters and views,
/// through joins, loss, a crash, a restart, an outsider admitted and revoked again (so some
/// frames verified ahead were verified with a keyring that changed before delivery)
/// and the outsider's refused frames; with the codec on and off.
#[test]
fn verifying_on_helper_threads_gives_the_same_run() {
    let seed = base_seed();
    let run = |threads: usize, codec: bool| {
        let (n, outsider) = (16, 16);
        let mut sim = Simulation::new(seed);
        sim.set_threads(threads);
        sim.enable_signing(n);
        sim.set_codec(codec);
        sim.set_loss(0.05);
        sim.record_events();
        for _ in 0..=n {
            sim.add_node(MembershipConfig::lan(), &[0, 1]);
            sim.run_for(Duration::from_millis(3));
        }
        sim.run_for(Duration::from_secs(10));
        sim.crash(5);
        sim.run_for(Duration::from_secs(3));
        sim.restart(7);
        sim.run_for(Duration::from_secs(10));
        let mut keyring = sim.keyring().expect("keyring mode").clone();
        let key = sim.identity(outsider).public_key();
        keyring.insert(key).expect("no collision");
        sim.set_keyring(keyring.clone());
        sim.run_for(Duration::from_secs(10));
        keyring.remove(&key);
        sim.set_keyring(keyring);
        sim.run_for(Duration::from_secs(10));
        let views: Vec<_> = (0..sim.nodes())
            .map(|i| {
                sim.node(i).map(|m| {
                    (
                        m.stats(),
                        m.auth_stats(),
                        m.members().cloned().collect::<Vec<_>>(),
                    )
                })
            })
            .collect();
        (sim.stats(), sim.events().to_vec(), views)
    };
    for codec in [false, true] {
        let one = run(1, codec);
        assert!(
            one.2.iter().flatten().any(|(_, auth, _)| auth.verified > 0),
            "seed {seed}: nothing verified"
        );
        for threads in [2, 3] {
            let other = run(threads, codec);
            assert!(
                one == other,
                "seed {seed}, codec {codec}: {threads} threads differ from 1 (stats {:?} vs {:?})",
                one.0,
                other.0
            );
        }
    }
}
