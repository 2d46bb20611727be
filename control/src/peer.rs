//! Who calls the control plane over TLS: proxies authenticate to the watch API with their mesh
//! certificate.
//!
//! The listener asks every client for a certificate but does not require one: a proxy must be
//! able to reach `POST /v1/certify` before it has a certificate, and the API server's webhook
//! calls present none. A certificate that is presented must chain to the CA's trust anchors in
//! force at the handshake (a root rotation is followed) or the handshake fails. What a request
//! may do with the identity is decided per request ([`caller`]): the watch API serves a
//! workload's view only to that workload's identity.

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::api::Identity;
use crate::ca::Ca;

/// Where the CA in force comes from (the authority, which follows its issuer files).
pub(crate) trait CurrentCa: std::fmt::Debug + Send + Sync {
    /// The CA in force now.
    fn current_ca(&self) -> Arc<Ca>;
}

/// Verifies client certificates against the authority's trust anchors in force, optionally.
#[derive(Debug)]
pub(crate) struct ClientVerifier {
    authority: Arc<dyn CurrentCa>,
    provider: Arc<CryptoProvider>,
    /// The verifier for the CA it was built from (compared by address).
    cached: RwLock<Option<(usize, Arc<dyn ClientCertVerifier>)>>,
}

impl ClientVerifier {
    /// A verifier following `authority`'s CA.
    pub(crate) fn new(authority: Arc<dyn CurrentCa>) -> Self {
        Self {
            authority,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            cached: RwLock::new(None),
        }
    }

    /// The WebPKI verifier for the CA in force (rebuilt when the CA changes).
    fn current(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let ca: Arc<Ca> = self.authority.current_ca();
        let key = Arc::as_ptr(&ca) as usize;
        let cached = match self.cached.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        if let Some((k, verifier)) = cached {
            if k == key {
                return Ok(verifier);
            }
        }
        let mut roots = RootCertStore::empty();
        for anchor in ca.trust_anchors() {
            roots
                .add(anchor.clone())
                .map_err(|e| rustls::Error::General(format!("a trust anchor: {e}")))?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        match self.cached.write() {
            Ok(mut c) => *c = Some((key, verifier.clone())),
            Err(poisoned) => *poisoned.into_inner() = Some((key, verifier.clone())),
        }
        Ok(verifier)
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()?
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Who made a request, as far as the watch API cares.
#[derive(Debug)]
pub(crate) enum Caller {
    /// Over plain HTTP (`--plaintext`, local development): anyone.
    Anyone,
    /// Over TLS without a client certificate.
    Anonymous,
    /// Over TLS with a certificate that chained to the trust anchors at the handshake and
    /// names `identity`, valid until `not_after`.
    Proxy {
        /// The SPIFFE identity of the certificate's one URI SAN.
        identity: Identity,
        /// The end of the certificate's validity.
        not_after: SystemTime,
    },
    /// Over TLS with a certificate that names no single mesh identity (the reason).
    Unusable(String),
}

/// The caller of a request served over `tls` (the client's chain, leaf first, if any; `None`
/// outside TLS).
pub(crate) fn caller(tls: Option<&crate::runtime::TlsPeer>) -> Caller {
    let Some(peer) = tls else {
        return Caller::Anyone;
    };
    let Some(leaf) = peer.0.as_ref().and_then(|chain| chain.first()) else {
        return Caller::Anonymous;
    };
    match leaf_identity(leaf) {
        Ok((identity, not_after)) => Caller::Proxy {
            identity,
            not_after,
        },
        Err(e) => Caller::Unusable(e),
    }
}

/// The SPIFFE identity a certificate names (its one URI SAN) and the end of its validity.
fn leaf_identity(der: &[u8]) -> Result<(Identity, SystemTime), String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("unparsable: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("unparsable subject alternative names: {e}"))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let identity = match uris.as_slice() {
        [one] => one.parse::<Identity>().map_err(|e| e.to_string())?,
        [] => return Err("it names no SPIFFE identity (no URI SAN)".into()),
        many => return Err(format!("it has {} URI SANs, not one", many.len())),
    };
    let not_after = u64::try_from(cert.validity().not_after.timestamp())
        .map(|s| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Ok((identity, not_after))
}
