//! TLS between sidecars: the rustls configurations (TLS 1.3 only, ring), the verifiers that
//! check a peer's SPIFFE identity, and the ALPN markers that say what a mesh connection carries.
//!
//! - A client (outbound) accepts a server only if its chain leads to a trust anchor *and* its
//!   certificate's only URI SAN is exactly the identity discovery named for that endpoint: any
//!   other mesh certificate is refused. One client configuration per (identity, ALPN) pair, so
//!   session resumption is per peer.
//! - A server (inbound) requires a client certificate that chains to a trust anchor and names one
//!   SPIFFE identity, which authorization then reads.
//! - Mesh connections offer exactly one ALPN marker ([`Alpn`]); a TLS ClientHello without one of
//!   them is the app's own TLS and is passed through untouched.

use std::sync::{Arc, OnceLock};

use outrider_control::api::Identity;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, OtherError,
    RootCertStore, SignatureScheme,
};

/// What a mesh connection carries, named in its ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alpn {
    /// HTTP/2: every HTTP request between two sidecars, multiplexed, whatever the app spoke.
    H2,
    /// HTTP/1.1: requests that upgrade the connection (WebSocket) or `CONNECT`.
    Http1,
    /// Opaque TCP: one TLS stream per connection.
    Opaque,
}

impl Alpn {
    /// Every marker, in the server's order of preference.
    pub const ALL: [Alpn; 3] = [Alpn::H2, Alpn::Http1, Alpn::Opaque];

    /// Its position in [`Alpn::ALL`].
    pub fn index(self) -> usize {
        match self {
            Alpn::H2 => 0,
            Alpn::Http1 => 1,
            Alpn::Opaque => 2,
        }
    }

    /// The ALPN protocol id on the wire.
    pub fn id(self) -> &'static [u8] {
        match self {
            Alpn::H2 => b"outrider.h2",
            Alpn::Http1 => b"outrider.http1",
            Alpn::Opaque => b"outrider.opaque",
        }
    }

    /// The marker named by `id`, if it is one of ours.
    pub fn from_id(id: &[u8]) -> Option<Alpn> {
        Alpn::ALL.into_iter().find(|a| a.id() == id)
    }

    /// A bounded label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Alpn::H2 => "h2",
            Alpn::Http1 => "http1",
            Alpn::Opaque => "opaque",
        }
    }
}

/// The crypto provider: rustls on ring, preferring TLS_AES_128_GCM_SHA256 (both ends of a mesh
/// connection are ours, and its SHA-256 key schedule runs on the CPU's SHA extensions, where
/// ring's SHA-384 does not: a benchmark found SHA-512 at 4.5% of a full handshake's CPU).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::ring::cipher_suite::{
                TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
            };
            let mut provider = rustls::crypto::ring::default_provider();
            provider.cipher_suites = vec![
                TLS13_AES_128_GCM_SHA256,
                TLS13_CHACHA20_POLY1305_SHA256,
                TLS13_AES_256_GCM_SHA384,
            ];
            Arc::new(provider)
        })
        .clone()
}

/// Why a peer's certificate names no usable identity.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The DER could not be parsed.
    #[error("the certificate cannot be parsed: {0}")]
    Unparsable(String),
    /// No URI SAN.
    #[error("the certificate has no URI SAN (no SPIFFE identity)")]
    NoUriSan,
    /// More than one URI SAN.
    #[error("the certificate has {0} URI SANs; a mesh certificate has exactly one")]
    SeveralUriSans(usize),
    /// The URI SAN is not a mesh identity.
    #[error("{0}")]
    Invalid(String),
    /// Another identity than the one expected.
    #[error("the peer is {presented}, not {expected}")]
    Unexpected {
        /// What the certificate names.
        presented: String,
        /// What discovery named for the endpoint.
        expected: String,
    },
}

// rustls shows a verifier's error with `Debug`: make that the readable sentence.
impl std::fmt::Debug for IdentityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The SPIFFE identity a certificate names: its one URI SAN.
pub fn identity_of(der: &[u8]) -> Result<Identity, IdentityError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(IdentityError::NoUriSan),
        [one] => one
            .parse()
            .map_err(|e: outrider_control::api::InvalidIdentity| {
                IdentityError::Invalid(e.to_string())
            }),
        many => Err(IdentityError::SeveralUriSans(many.len())),
    }
}

fn refuse(e: IdentityError) -> TlsError {
    TlsError::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// What differs between the proxy's server certificate verifiers: whether to accept the
/// certificate the server presented. [`CheckedBy`] adds what they share.
pub trait ServerCertCheck: std::fmt::Debug + Send + Sync {
    /// Accepts (`Ok`) or refuses the server's certificate.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<(), TlsError>;
}

/// A rustls server certificate verifier: a [`ServerCertCheck`] for the certificate, and the
/// handshake's signatures checked with a crypto provider's algorithms.
#[derive(Debug)]
pub struct CheckedBy<C: ?Sized> {
    check: Arc<C>,
    provider: Arc<CryptoProvider>,
}

impl<C: ?Sized> CheckedBy<C> {
    /// Accepts what `check` accepts; signatures by `provider`'s algorithms.
    pub fn with(check: Arc<C>, provider: Arc<CryptoProvider>) -> Self {
        Self { check, provider }
    }
}

impl<C: ServerCertCheck + ?Sized> ServerCertVerifier for CheckedBy<C> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        self.check
            .check(end_entity, intermediates, server_name, ocsp_response, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A mesh server's certificate: its chain leads to `roots` and it names exactly `expected`.
#[derive(Debug)]
pub struct ExpectedId {
    roots: Arc<RootCertStore>,
    expected: Identity,
}

impl ServerCertCheck for ExpectedId {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<(), TlsError> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            provider().signature_verification_algorithms.all,
        )?;
        let presented = identity_of(end_entity).map_err(refuse)?;
        if presented != self.expected {
            return Err(refuse(IdentityError::Unexpected {
                presented: presented.to_string(),
                expected: self.expected.to_string(),
            }));
        }
        Ok(())
    }
}

/// Verifies a mesh server: its chain leads to the roots and it names exactly the expected
/// identity.
pub type ServerIdVerifier = CheckedBy<ExpectedId>;

impl ServerIdVerifier {
    /// Accepts only `expected`, chained to `roots`.
    pub fn new(roots: Arc<RootCertStore>, expected: Identity) -> Self {
        Self::with(Arc::new(ExpectedId { roots, expected }), provider())
    }
}

/// Verifies a client: its chain leads to the trust anchors (client-auth usage) and it names one
/// SPIFFE identity.
#[derive(Debug)]
pub struct ClientIdVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientIdVerifier {
    /// Chains to `roots`.
    pub fn new(roots: Arc<RootCertStore>) -> Result<Self, TlsError> {
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::General(e.to_string()))?;
        Ok(Self { inner })
    }
}

impl ClientCertVerifier for ClientIdVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a mesh client has one certificate and sends it.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        identity_of(end_entity).map_err(refuse)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Whether `conn` resumed a session whose peer certificate has expired since the session began.
/// A TLS 1.3 resumption does not verify the certificate again, so without this check a session
/// ticket would outlive the short-lived certificate it was issued with; such a connection is
/// refused like a failed handshake.
pub fn resumed_with_expired_peer(conn: &rustls::CommonState) -> bool {
    if conn.handshake_kind() != Some(rustls::HandshakeKind::Resumed) {
        return false;
    }
    let valid_now = |der: &CertificateDer<'_>| {
        x509_parser::parse_x509_certificate(der).is_ok_and(|(_, cert)| cert.validity().is_valid())
    };
    !conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .is_some_and(valid_now)
}

/// The mesh markers a ClientHello offers, read from the bytes of a TLS connection's start
/// without consuming them: `Ok(None)` means more bytes are needed; `Err` means the bytes are not
/// a ClientHello rustls understands (the connection is then not a mesh connection).
pub fn offered_alpn(start: &[u8]) -> Result<Option<Vec<Alpn>>, TlsError> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = start;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(TlsError::General(e.to_string())),
        }
    }
    match acceptor.accept() {
        Ok(None) => Ok(None),
        Ok(Some(accepted)) => Ok(Some(
            accepted
                .client_hello()
                .alpn()
                .into_iter()
                .flatten()
                .filter_map(Alpn::from_id)
                .collect(),
        )),
        Err((e, _alert)) => Err(e),
    }
}
