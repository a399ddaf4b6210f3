//! Node identities and mutual certificate pinning for TLS 1.3.
//!
//! Every node has an [`Identity`]: a certificate and its private key, typically self-signed and
//! generated once with [`Identity::generate`]. A node trusts a fixed set of peer certificates,
//! [`TrustedPeers`]. Both ends of every connection present their certificate and both check the
//! other's against their trusted set: a certificate that is not in the set, byte for byte, fails
//! the handshake. There is no certificate authority and no name check; the set *is* the trust.
//! The handshake signature is still verified with the peer's public key (ring), so presenting
//! someone else's certificate without its key fails too.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use chorus_core::transport::TransportError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// The name every node's certificate carries and every client asks for. Names are not what
/// is checked (the pinned certificate is), but TLS needs one.
pub const SERVER_NAME: &str = "chorus";

/// A node's certificate and private key.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("cert_len", &self.cert.len())
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// A fresh self-signed certificate (ECDSA P-256, via rcgen on ring) for the name
    /// [`SERVER_NAME`] and `extra_names`.
    pub fn generate(extra_names: &[&str]) -> Result<Self, TransportError> {
        let mut names = vec![SERVER_NAME.to_owned()];
        names.extend(extra_names.iter().map(|n| (*n).to_owned()));
        let certified = rcgen::generate_simple_self_signed(names)
            .map_err(|e| TransportError::Config(format!("generating a certificate: {e}")))?;
        let key = PrivateKeyDer::try_from(certified.key_pair.serialize_der())
            .map_err(|e| TransportError::Config(format!("generated key: {e}")))?;
        Ok(Identity {
            cert: certified.cert.der().clone(),
            key,
        })
    }

    /// An identity from PEM text: one certificate and one private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TransportError> {
        let cert = CertificateDer::from_pem_slice(cert_pem)
            .map_err(|e| TransportError::Config(format!("option `cert`: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| TransportError::Config(format!("option `key`: {e}")))?;
        Ok(Identity { cert, key })
    }

    /// Reads [`Identity::from_pem`] from two files.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TransportError> {
        let cert_pem = read("cert", cert)?;
        let key_pem = read("key", key)?;
        Identity::from_pem(&cert_pem, &key_pem)
    }

    /// The certificate, DER-encoded.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The certificate as PEM, for peers' trust files.
    pub fn cert_pem(&self) -> String {
        pem("CERTIFICATE", &self.cert)
    }

    /// The private key as PEM. Keep it secret.
    pub fn key_pem(&self) -> String {
        let label = match &self.key {
            PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
            PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
            _ => "PRIVATE KEY",
        };
        pem(label, self.key.secret_der())
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

fn read(option: &str, path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|e| {
        TransportError::Config(format!(
            "option `{option}`: reading {}: {e}",
            path.display()
        ))
    })
}

/// Minimal PEM encoding (RFC 7468): base64 in 64-column lines.
fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk.len();
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        let sextets = [(v >> 18) & 63, (v >> 12) & 63, (v >> 6) & 63, v & 63];
        for (i, s) in sextets.iter().enumerate() {
            b64.push(if i <= n { ALPHABET[*s as usize] } else { b'=' });
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The certificates a node accepts from its peers (its own included, so it can reach itself).
#[derive(Clone, Default)]
pub struct TrustedPeers {
    certs: HashSet<Vec<u8>>,
}

impl fmt::Debug for TrustedPeers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustedPeers")
            .field("certificates", &self.certs.len())
            .finish()
    }
}

impl TrustedPeers {
    /// An empty set: nothing is trusted.
    pub fn new() -> Self {
        TrustedPeers::default()
    }

    /// Trusts `cert`.
    pub fn add(&mut self, cert: &CertificateDer<'_>) -> &mut Self {
        self.certs.insert(cert.to_vec());
        self
    }

    /// Trusts every certificate in PEM text (one or more `CERTIFICATE` blocks); returns how
    /// many were added.
    pub fn add_pem(&mut self, pem: &[u8]) -> Result<usize, TransportError> {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| TransportError::Config(format!("option `trust`: {e}")))?;
            self.add(&cert);
            added += 1;
        }
        if added == 0 {
            return Err(TransportError::Config(
                "option `trust`: no certificate in the PEM text".to_owned(),
            ));
        }
        Ok(added)
    }

    /// Trusts every certificate in the PEM file at `path`.
    pub fn add_pem_file(&mut self, path: &Path) -> Result<usize, TransportError> {
        self.add_pem(&read("trust", path)?)
    }

    /// How many certificates are trusted.
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// Whether nothing is trusted.
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if self.certs.contains(cert.as_ref()) {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
}

/// Checks a peer's certificate against the pinned set, in either role.
#[derive(Debug)]
pub(crate) struct PinnedVerifier {
    trusted: TrustedPeers,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedVerifier {
    pub(crate) fn new(trusted: TrustedPeers, provider: &CryptoProvider) -> Arc<Self> {
        Arc::new(PinnedVerifier {
            trusted,
            algorithms: provider.signature_verification_algorithms,
        })
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.trusted.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered (QUIC requires it).
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
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for PinnedVerifier {
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
        self.trusted.check(end_entity)?;
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
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips() {
        let id = Identity::generate(&["node-a"]).expect("generate");
        let back =
            Identity::from_pem(id.cert_pem().as_bytes(), id.key_pem().as_bytes()).expect("parse");
        assert_eq!(back.certificate(), id.certificate());
        assert_eq!(back.key.secret_der(), id.key.secret_der());
        let mut trusted = TrustedPeers::new();
        let two = format!(
            "{}{}",
            id.cert_pem(),
            Identity::generate(&[]).expect("gen").cert_pem()
        );
        assert_eq!(trusted.add_pem(two.as_bytes()).expect("two certs"), 2);
        assert!(trusted.check(id.certificate()).is_ok());
        assert!(
            trusted
                .check(Identity::generate(&[]).expect("gen").certificate())
                .is_err()
        );
    }

    #[test]
    fn bad_pem_names_the_option() {
        let err = Identity::from_pem(b"not pem", b"not pem").expect_err("bad");
        assert!(
            matches!(&err, TransportError::Config(m) if m.contains("`cert`")),
            "{err}"
        );
        let err = TrustedPeers::new()
            .add_pem(b"nothing here")
            .expect_err("empty");
        assert!(
            matches!(&err, TransportError::Config(m) if m.contains("`trust`")),
            "{err}"
        );
    }
}
