//! TLS 1.3 for the transports, keyed by the node's Ed25519 identity and pinned to the keyring
//! (feature `tls`).
//!
//! Each node's certificate is self-signed by its own Ed25519 key ([`certificate`]): there is
//! no certificate authority and names are not checked. Both ends of every connection present
//! one, and [`KeyringVerifier`] accepts a peer's certificate only if
//!
//! - it parses as X.509 and its subject public key is an Ed25519 key,
//! - that key is in the [`SharedKeyring`](crate::peer_auth::SharedKeyring) at the time of the
//!   handshake (so rotation on a running node applies to the next connection), and
//! - the peer's TLS 1.3 `CertificateVerify` signature verifies with *that* key: the pinned key
//!   is the key that proved possession, whatever else the certificate contains.
//!
//! After the handshake, [`peer_key`] reads the authenticated key back, and the transport checks
//! the address the peer announces or was dialled at against the
//! [`AddressBook`](crate::peer_auth::AddressBook).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::auth::{Identity, PublicKey};
use crate::peer_auth::{ChannelAuth, KeyCheck};

/// The name every node's certificate carries and every dialler asks for. It is not what is
/// checked (the key is), but TLS needs one.
pub const SERVER_NAME: &str = "chorus";

/// DER of an Ed25519 `SubjectPublicKeyInfo` up to the 32 key bytes (RFC 8410).
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// DER of an Ed25519 PKCS#8 v1 private key up to the 32 secret bytes (RFC 8410).
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The certificate could not be generated from the identity.
    #[error("generating the certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A node's certificate and private key, derived from its [`Identity`].
#[derive(Debug)]
pub struct TlsIdentity {
    /// The self-signed certificate, DER.
    pub cert: CertificateDer<'static>,
    /// The identity's secret key as PKCS#8, DER.
    pub key: PrivateKeyDer<'static>,
}

/// The identity's private key as PKCS#8 v1 DER.
fn pkcs8(identity: &Identity) -> PrivatePkcs8KeyDer<'static> {
    let mut der = Vec::with_capacity(48);
    der.extend_from_slice(&ED25519_PKCS8_PREFIX);
    der.extend_from_slice(&identity.secret());
    PrivatePkcs8KeyDer::from(der)
}

/// A self-signed certificate for `identity`'s key (name [`SERVER_NAME`]).
pub fn certificate(identity: &Identity) -> Result<TlsIdentity, TlsError> {
    let key = pkcs8(identity);
    let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key, &rcgen::PKCS_ED25519)?;
    let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
    let cert = params.self_signed(&pair)?;
    Ok(TlsIdentity {
        cert: cert.der().clone(),
        key: PrivateKeyDer::Pkcs8(key),
    })
}

/// The Ed25519 key a certificate carries as its subject public key, if it parses and has
/// one.
pub fn certificate_key(cert: &CertificateDer<'_>) -> Option<PublicKey> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    let spki = parsed.subject_public_key_info();
    let key = spki.as_ref().strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    Some(PublicKey(key.try_into().ok()?))
}

/// The key the peer of an established connection authenticated with.
pub fn peer_key(connection: &rustls::CommonState) -> Option<PublicKey> {
    connection
        .peer_certificates()?
        .first()
        .and_then(certificate_key)
}

/// The peer's key, checked against the keyring now, as a [`KeyCheck`] that follows later
/// keyring changes: what a transport takes once the handshake is done (the verifier already
/// checked; this is the same check at the moment the connection is put to use, with the
/// generation taken first so no replacement is missed).
pub fn admitted_peer(auth: &ChannelAuth, connection: &rustls::CommonState) -> Option<KeyCheck> {
    KeyCheck::admit(&auth.keyring, peer_key(connection)?)
}

/// ring, with AES-128-GCM first: the same TLS 1.3 security level for our purposes and about a
/// third cheaper per byte than AES-256-GCM, which large frames feel (see BENCHMARKS.md).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// A server configuration: TLS 1.3 only, this node's certificate, client certificates
/// required and checked by [`KeyringVerifier`].
pub fn server_config(auth: &ChannelAuth, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
    let own = certificate(&auth.identity)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(KeyringVerifier::new(auth.clone())))
        .with_single_cert(vec![own.cert], own.key)?;
    // No resumption: a resumed session skips the certificate check, and with it the keyring
    // (a revoked key could come back on an old ticket).
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client configuration: TLS 1.3 only, this node's certificate as client certificate,
/// the server's checked by [`KeyringVerifier`].
pub fn client_config(auth: &ChannelAuth, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, TlsError> {
    let own = certificate(&auth.identity)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(KeyringVerifier::new(auth.clone())))
        .with_client_auth_cert(vec![own.cert], own.key)?;
    // No resumption (see `server_config`).
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The name a dialler sends (see [`SERVER_NAME`]).
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("a valid DNS name")
}

/// Checks a peer's certificate against the keyring, in either role (see the
/// [module documentation](self)).
#[derive(Debug)]
pub struct KeyringVerifier {
    auth: ChannelAuth,
}

impl KeyringVerifier {
    /// A verifier reading `auth`'s keyring at every handshake.
    pub fn new(auth: ChannelAuth) -> Self {
        KeyringVerifier { auth }
    }

    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let key = certificate_key(cert).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadEncoding,
        ))?;
        if self.auth.admits(&key) {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_signature(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(rustls::Error::PeerMisbehaved(
                rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
            ));
        }
        let key = certificate_key(cert).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadEncoding,
        ))?;
        if key.verify(message, dss.signature()) {
            Ok(HandshakeSignatureValid::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadSignature,
            ))
        }
    }
}

impl ServerCertVerifier for KeyringVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for KeyringVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Keyring;
    use crate::peer_auth::SharedKeyring;

    #[test]
    fn the_certificate_carries_the_identity_key() {
        let id = Identity::from_secret([7; 32]);
        let own = certificate(&id).expect("certificate");
        assert_eq!(certificate_key(&own.cert), Some(id.public_key()));
        // Not a certificate: no key, no panic.
        assert_eq!(
            certificate_key(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])),
            None
        );
    }

    #[test]
    fn the_verifier_admits_keyring_keys_only_and_follows_the_keyring() {
        let (a, b) = (
            Identity::from_secret([1; 32]),
            Identity::from_secret([2; 32]),
        );
        let keyring = SharedKeyring::new(Keyring::from_keys([a.public_key()]).expect("keyring"));
        let verifier = KeyringVerifier::new(ChannelAuth::new(a.clone(), keyring.clone()));
        let cert_a = certificate(&a).expect("a").cert;
        let cert_b = certificate(&b).expect("b").cert;
        assert!(verifier.check(&cert_a).is_ok());
        assert!(verifier.check(&cert_b).is_err());
        keyring.replace(Keyring::from_keys([a.public_key(), b.public_key()]).expect("two"));
        assert!(verifier.check(&cert_b).is_ok());
        keyring.replace(Keyring::from_keys([b.public_key()]).expect("b only"));
        assert!(verifier.check(&cert_a).is_err());
    }
}
