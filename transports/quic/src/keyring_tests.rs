//! Keyring mode: certificates from the Ed25519 identity, peers checked against the keyring.

use std::time::Duration;

use bytes::Bytes;
use chorus_core::auth::{Identity, Keyring};
use chorus_core::identity::Address;
use chorus_core::peer_auth::{ChannelAuth, SharedKeyring};
use chorus_core::replication::{Refusal, ReplicaMessage};
use chorus_core::transport::{Incoming, Transport};
use chorus_core::wire::{self, Header};

use crate::{QuicConfig, QuicTransport};

fn frame(text: &str) -> Bytes {
    let message = ReplicaMessage::Refused(Refusal::Invalid {
        reason: text.to_owned(),
    });
    wire::encode(Header::message(), &message, 1 << 20).expect("encodes")
}

fn identity(seed: u8) -> Identity {
    Identity::from_secret([seed; 32])
}

fn keyring(ids: &[&Identity]) -> Keyring {
    Keyring::from_keys(ids.iter().map(|i| i.public_key())).expect("keyring")
}

async fn node(
    identity: &Identity,
    keyring: &SharedKeyring,
    config: QuicConfig,
) -> (QuicTransport, ChannelAuth) {
    let auth = ChannelAuth::new(identity.clone(), keyring.clone());
    let t = QuicTransport::bind_authenticated("127.0.0.1:0", config, auth.clone())
        .await
        .expect("bind");
    (t, auth)
}

async fn recv(t: &QuicTransport) -> Incoming {
    tokio::time::timeout(Duration::from_secs(10), t.recv())
        .await
        .expect("a frame within 10 s")
        .expect("recv")
}

/// Polls `condition` every 10 ms for up to 10 s.
async fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    for _ in 0..1000 {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}

/// Sends a frame every 20 ms for `n` rounds, ignoring the outcome.
async fn keep_sending(from: &QuicTransport, to: &Address, n: usize) {
    for _ in 0..n {
        let _ = from.send(to, frame("x")).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyring_members_talk_with_identity_certificates() {
    let (a, b) = (identity(1), identity(2));
    let ring = SharedKeyring::new(keyring(&[&a, &b]));
    let (ta, _) = node(&a, &ring, QuicConfig::local()).await;
    let (tb, _) = node(&b, &ring, QuicConfig::local()).await;
    ta.send(&tb.local_addr(), frame("ping"))
        .await
        .expect("send");
    let got = recv(&tb).await;
    assert_eq!(got.frame, frame("ping"));
    tb.send(&got.from, frame("pong")).await.expect("reply");
    assert_eq!(recv(&ta).await.frame, frame("pong"));
    assert_eq!(
        ta.stats().handshake_failures + tb.stats().handshake_failures,
        0
    );
    ta.close().await;
    tb.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_outside_the_keyring_fails_the_handshake_either_way() {
    let (a, outsider) = (identity(1), identity(9));
    let (ta, _) = node(&a, &SharedKeyring::new(keyring(&[&a])), QuicConfig::local()).await;
    let (to, _) = node(
        &outsider,
        &SharedKeyring::new(keyring(&[&a, &outsider])),
        QuicConfig::local(),
    )
    .await;
    keep_sending(&to, &ta.local_addr(), 10).await;
    assert!(
        eventually(|| ta.stats().handshake_failures >= 1).await,
        "{:?}",
        ta.stats()
    );
    // The outsider's side of the handshake completes first; the missing acknowledgement
    // still fails its dial.
    assert!(
        eventually(|| to.stats().dial_failures >= 1).await,
        "{:?}",
        to.stats()
    );
    assert_eq!(to.stats().dialed, 0, "{:?}", to.stats());
    // a dials the outsider: a's own certificate check refuses the server.
    keep_sending(&ta, &to.local_addr(), 10).await;
    assert!(
        eventually(|| ta.stats().dial_failures >= 1).await,
        "{:?}",
        ta.stats()
    );
    assert_eq!(ta.stats().frames_received, 0);
    assert_eq!(to.stats().frames_received, 0);
    ta.close().await;
    to.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_claiming_another_members_address_is_refused() {
    let (a, b, m) = (identity(1), identity(2), identity(3));
    let ring = SharedKeyring::new(keyring(&[&a, &b, &m]));
    let (ta, auth_a) = node(&a, &ring, QuicConfig::local()).await;
    let (tb, _) = node(&b, &ring, QuicConfig::local()).await;
    let mut config = QuicConfig::local();
    config.advertise = Some(tb.local_addr());
    let (tm, _) = node(&m, &ring, config).await;
    auth_a.book.replace([(tb.local_addr(), b.node_id())]);
    keep_sending(&tm, &ta.local_addr(), 10).await;
    assert!(
        eventually(|| ta.stats().address_refusals >= 1).await,
        "{:?}",
        ta.stats()
    );
    assert_eq!(ta.stats().frames_received, 0);
    tb.send(&ta.local_addr(), frame("b")).await.expect("send");
    assert_eq!(recv(&ta).await.frame, frame("b"));
    for t in [ta, tb, tm] {
        t.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_key_closes_its_connections_and_refuses_new_ones() {
    let (a, b) = (identity(1), identity(2));
    let ring_a = SharedKeyring::new(keyring(&[&a, &b]));
    let ring_b = SharedKeyring::new(keyring(&[&a, &b]));
    let (ta, _) = node(&a, &ring_a, QuicConfig::local()).await;
    let (tb, _) = node(&b, &ring_b, QuicConfig::local()).await;
    tb.send(&ta.local_addr(), frame("before"))
        .await
        .expect("send");
    assert_eq!(recv(&ta).await.frame, frame("before"));
    ring_a.replace(keyring(&[&a]));
    keep_sending(&tb, &ta.local_addr(), 10).await;
    assert!(
        eventually(|| ta.stats().revoked_closed == 1).await,
        "{:?}",
        ta.stats()
    );
    keep_sending(&tb, &ta.local_addr(), 10).await;
    assert!(
        eventually(|| ta.stats().handshake_failures >= 1).await,
        "{:?}",
        ta.stats()
    );
    assert_eq!(
        ta.stats().frames_received,
        1,
        "nothing after the revocation was delivered"
    );
    ta.close().await;
    tb.close().await;
}
