//! TLS mode: handshakes pinned to the keyring, address ownership, revocation.

use std::time::Duration;

use bytes::Bytes;
use chorus_core::auth::{Identity, Keyring};
use chorus_core::identity::Address;
use chorus_core::peer_auth::{ChannelAuth, SharedKeyring};
use chorus_core::replication::{Refusal, ReplicaMessage};
use chorus_core::transport::{Transport, TransportError};
use chorus_core::wire::{self, Header};

use crate::{TcpConfig, TcpTls, TcpTransport};

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

async fn bind(
    identity: &Identity,
    keyring: &SharedKeyring,
    config: TcpConfig,
) -> (TcpTransport, ChannelAuth) {
    let auth = ChannelAuth::new(identity.clone(), keyring.clone());
    let t = TcpTransport::bind_authenticated("127.0.0.1:0", config, auth.clone())
        .await
        .expect("bind");
    (t, auth)
}

async fn recv(t: &TcpTransport) -> chorus_core::transport::Incoming {
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

/// Sends until one fails or 10 s pass; the error.
async fn first_failure(from: &TcpTransport, to: &Address) -> Option<TransportError> {
    for _ in 0..200 {
        if let Err(e) = from.send(to, frame("x")).await {
            return Some(e);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_the_keyring_talk_over_tls_both_ways() {
    let (a, b) = (identity(1), identity(2));
    let ring = SharedKeyring::new(keyring(&[&a, &b]));
    let (ta, _) = bind(&a, &ring, TcpConfig::local()).await;
    let (tb, _) = bind(&b, &ring, TcpConfig::local()).await;
    assert!(ta.is_tls() && tb.is_tls());
    for i in 0..100 {
        ta.send(&tb.local_addr(), frame(&format!("ping {i}")))
            .await
            .expect("send");
    }
    let mut last = None;
    for _ in 0..100 {
        last = Some(recv(&tb).await);
    }
    let last = last.expect("frames");
    assert_eq!(last.frame, frame("ping 99"));
    // The reply goes back over the accepted connection.
    tb.send(&last.from, frame("pong")).await.expect("reply");
    assert_eq!(recv(&ta).await.frame, frame("pong"));
    assert_eq!(
        ta.stats().handshake_failures + tb.stats().handshake_failures,
        0
    );
    assert_eq!(ta.stats().dialed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_outside_the_keyring_fails_the_handshake_either_way() {
    let (a, outsider) = (identity(1), identity(9));
    // The outsider trusts a (it knows every key); a does not list the outsider.
    let (ta, _) = bind(&a, &SharedKeyring::new(keyring(&[&a])), TcpConfig::local()).await;
    let outsiders_ring = SharedKeyring::new(keyring(&[&a, &outsider]));
    let (to, _) = bind(&outsider, &outsiders_ring, TcpConfig::local()).await;
    // The outsider dials a: a refuses its certificate.
    let err = first_failure(&to, &ta.local_addr())
        .await
        .expect("sends fail");
    assert!(matches!(err, TransportError::Unreachable { .. }), "{err}");
    assert!(eventually(|| ta.stats().handshake_failures >= 1).await);
    // a dials the outsider: a refuses the server's certificate.
    let err = first_failure(&ta, &to.local_addr())
        .await
        .expect("sends fail");
    assert!(matches!(err, TransportError::Unreachable { .. }), "{err}");
    assert!(ta.stats().handshake_failures >= 2, "{:?}", ta.stats());
    assert_eq!(ta.stats().frames_received, 0);
    assert_eq!(to.stats().frames_received, 0);
    // A plain TCP client gets nowhere either (it is not TLS).
    let plain = TcpTransport::bind("127.0.0.1:0", TcpConfig::local())
        .await
        .expect("plain");
    first_failure(&plain, &ta.local_addr()).await;
    assert_eq!(ta.stats().frames_received, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_claiming_another_members_address_is_refused() {
    let (a, b, m) = (identity(1), identity(2), identity(3));
    let ring = SharedKeyring::new(keyring(&[&a, &b, &m]));
    let (ta, auth_a) = bind(&a, &ring, TcpConfig::local()).await;
    let (tb, _) = bind(&b, &ring, TcpConfig::local()).await;
    // m is admitted but announces b's address as its own.
    let mut config = TcpConfig::local();
    config.advertise = Some(tb.local_addr());
    let (tm, _) = bind(&m, &ring, config).await;
    // a's view: b owns its address.
    auth_a.book.replace([(tb.local_addr(), b.node_id())]);
    for _ in 0..20 {
        let _ = tm.send(&ta.local_addr(), frame("i am b")).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        eventually(|| ta.stats().address_refusals >= 1).await,
        "{:?}",
        ta.stats()
    );
    assert_eq!(ta.stats().frames_received, 0);
    // b itself, announcing its own address, is accepted.
    tb.send(&ta.local_addr(), frame("b")).await.expect("send");
    let got = recv(&ta).await;
    assert_eq!(got.frame, frame("b"));
    // And a dialling b's address reaches b, not someone else: if the book says the address
    // belongs to m, the server's key (b's) does not match and the dial is refused.
    auth_a.book.replace([(tb.local_addr(), m.node_id())]);
    let refusals = ta.stats().address_refusals;
    let err = first_failure(&ta, &tb.local_addr()).await.expect("refused");
    assert!(matches!(err, TransportError::Unreachable { .. }), "{err}");
    assert!(ta.stats().address_refusals > refusals);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_key_closes_its_connections_and_refuses_new_ones() {
    let (a, b) = (identity(1), identity(2));
    let ring_a = SharedKeyring::new(keyring(&[&a, &b]));
    let ring_b = SharedKeyring::new(keyring(&[&a, &b]));
    let (ta, _) = bind(&a, &ring_a, TcpConfig::local()).await;
    let (tb, _) = bind(&b, &ring_b, TcpConfig::local()).await;
    tb.send(&ta.local_addr(), frame("before"))
        .await
        .expect("send");
    assert_eq!(recv(&ta).await.frame, frame("before"));
    ring_a.replace(keyring(&[&a]));
    // b's next frame on the open connection closes it; redials fail the handshake.
    let _ = tb.send(&ta.local_addr(), frame("after")).await;
    assert!(
        eventually(|| ta.stats().revoked_closed == 1).await,
        "{:?}",
        ta.stats()
    );
    first_failure(&tb, &ta.local_addr())
        .await
        .expect("refused after revocation");
    // Counted by a's side once its handshake ends, which b may see fail first.
    assert!(
        eventually(|| ta.stats().handshake_failures >= 1).await,
        "{:?}",
        ta.stats()
    );
    let received = ta.stats().frames_received;
    assert_eq!(received, 1, "nothing after the revocation was delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_peer_that_never_sends_gets_nothing_more() {
    let (a, b) = (identity(1), identity(2));
    let ring_a = SharedKeyring::new(keyring(&[&a, &b]));
    let ring_b = SharedKeyring::new(keyring(&[&a, &b]));
    let (ta, _) = bind(&a, &ring_a, TcpConfig::local()).await;
    let (tb, _) = bind(&b, &ring_b, TcpConfig::local()).await;
    ta.send(&tb.local_addr(), frame("before"))
        .await
        .expect("send");
    assert_eq!(recv(&tb).await.frame, frame("before"));
    ring_a.replace(keyring(&[&a]));
    // a's open connection to b (b never writes on it) is closed before a's next frame.
    let _ = ta.send(&tb.local_addr(), frame("after")).await;
    assert!(
        eventually(|| ta.stats().revoked_closed == 1).await,
        "{:?}",
        ta.stats()
    );
    first_failure(&ta, &tb.local_addr())
        .await
        .expect("redials refuse b's certificate");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), tb.recv())
            .await
            .is_err(),
        "b received a frame after its key was revoked"
    );
    assert_eq!(tb.stats().frames_received, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_off_is_plain_and_tls_on_needs_an_identity() {
    let a = identity(1);
    let ring = SharedKeyring::new(keyring(&[&a]));
    let mut config = TcpConfig::local();
    config.tls = TcpTls::Off;
    let (t, _) = bind(&a, &ring, config).await;
    assert!(!t.is_tls());
    let plain = TcpTransport::bind("127.0.0.1:0", TcpConfig::local())
        .await
        .expect("plain");
    assert!(!plain.is_tls());
    plain
        .send(&t.local_addr(), frame("hi"))
        .await
        .expect("plain send");
    assert_eq!(recv(&t).await.frame, frame("hi"));
    let mut config = TcpConfig::local();
    config.tls = TcpTls::On;
    let err = TcpTransport::bind("127.0.0.1:0", config)
        .await
        .expect_err("no identity");
    assert!(
        matches!(&err, TransportError::Config(m) if m.contains("`tls`")),
        "{err}"
    );
}

/// A server that presents an admitted member's certificate (certificates are public) without
/// holding that member's key: its handshake signature is made with its own key.
#[derive(Debug)]
struct StolenCertificate(std::sync::Arc<tokio_rustls::rustls::sign::CertifiedKey>);

impl tokio_rustls::rustls::server::ResolvesServerCert for StolenCertificate {
    fn resolve(
        &self,
        _hello: tokio_rustls::rustls::server::ClientHello<'_>,
    ) -> Option<std::sync::Arc<tokio_rustls::rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_certificate_without_its_key_fails_the_handshake() {
    use std::sync::Arc;
    use tokio_rustls::rustls;
    let (a, b, thief) = (identity(1), identity(2), identity(7));
    // a admits b; the thief shows b's certificate but signs with its own key.
    let (ta, _) = bind(
        &a,
        &SharedKeyring::new(keyring(&[&a, &b])),
        TcpConfig::local(),
    )
    .await;
    let b_cert = chorus_core::tls::certificate(&b)
        .expect("b's certificate")
        .cert;
    let thief_key = chorus_core::tls::certificate(&thief)
        .expect("thief's key")
        .key;
    let signer = rustls::crypto::ring::sign::any_supported_type(&thief_key).expect("eddsa key");
    let stolen = rustls::sign::CertifiedKey::new(vec![b_cert], signer);
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls 1.3")
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(StolenCertificate(Arc::new(stolen))));
    server.alpn_protocols = vec![b"chorus-tcp/1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = Address::new(listener.local_addr().expect("addr").to_string());
    let served = tokio::spawn(async move {
        let mut completed = 0;
        // Bounded: the dials below make a handful of attempts.
        for _ in 0..3 {
            let Ok(Ok((stream, _))) =
                tokio::time::timeout(Duration::from_millis(1500), listener.accept()).await
            else {
                break;
            };
            if acceptor.accept(stream).await.is_ok() {
                completed += 1;
            }
        }
        completed
    });
    let err = first_failure(&ta, &addr).await.expect("the dial fails");
    assert!(matches!(err, TransportError::Unreachable { .. }), "{err}");
    assert!(ta.stats().handshake_failures >= 1, "{:?}", ta.stats());
    assert_eq!(ta.stats().dialed, 0, "{:?}", ta.stats());
    drop(ta);
    assert_eq!(
        served.await.expect("server task"),
        0,
        "a handshake completed"
    );
}
