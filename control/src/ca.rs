//! The control plane's certificate authority: an issuer certificate and key (an intermediate
//! under one of the trust anchors) that signs short-lived workload certificates from CSRs, and
//! the control plane's own serving certificate.
//!
//! A workload certificate names one SPIFFE identity as its only URI SAN, has no subject, is not a
//! CA, and is good for client and server authentication. The CSR it comes from must be signed by
//! an ECDSA P-256 key and ask for exactly that identity and nothing else; anything else is a
//! [`CsrError`] saying what was wrong, and nothing is issued.
//!
//! [`Ca::load`] checks what it is given before it signs anything (the key belongs to the issuer
//! certificate, the issuer is a CA, valid now, and chains to one of the anchors) and reports the
//! first problem as a [`CaError`]. No error or `Debug` output ever contains key material.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use ring::rand::SecureRandom;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivatePkcs8KeyDer, UnixTime,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::api::Identity;

/// How far back a certificate's `not_before` is set, for clocks that run a little behind.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// A certificate authority: the issuer (chain and key) and the trust anchors.
pub struct Ca {
    /// Signs with the issuer's key, as the issuer's subject.
    issuer: Issuer<'static, KeyPair>,
    /// The issuer certificate and any further intermediates, PEM, as served.
    chain_pem: String,
    /// The same, DER.
    chain: Vec<CertificateDer<'static>>,
    /// End of the issuer's validity.
    issuer_not_after: SystemTime,
    /// The trust anchors, PEM, as served.
    anchors_pem: String,
    /// The same, DER.
    anchors: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("chain_certificates", &self.chain.len())
            .field("anchors", &self.anchors.len())
            .field("issuer_not_after", &self.issuer_not_after)
            .field("issuer_key", &"<redacted>")
            .finish()
    }
}

/// Why issuer or anchor files cannot be used. Never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaError {
    /// A PEM input holds no certificate, or one that does not parse.
    #[error("the {what} {reason}")]
    Certificate {
        /// Which input: "issuer chain" or "trust anchors".
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The issuer key is not a PKCS#8 PEM ECDSA P-256 key.
    #[error("the issuer key is not a PKCS#8 PEM (BEGIN PRIVATE KEY) ECDSA P-256 key")]
    Key,
    /// The key does not belong to the issuer certificate.
    #[error("the issuer key does not belong to the issuer certificate (the first in the chain)")]
    KeyMismatch,
    /// The issuer certificate is not a CA.
    #[error("the issuer certificate is not a CA (it lacks basic constraints CA:true)")]
    NotCa,
    /// The issuer certificate is not valid now.
    #[error("the issuer certificate is not valid now: {0}")]
    Validity(String),
    /// The issuer does not chain to any of the anchors.
    #[error("the issuer certificate does not chain to any of the trust anchors: {0}")]
    NotChained(String),
    /// Generating or signing failed (a bug or an exhausted random source).
    #[error("cannot generate or sign a certificate: {0}")]
    Generate(String),
}

/// Why a CSR was refused. The message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Not a PEM `CERTIFICATE REQUEST`.
    #[error("the CSR is not PEM: expected -----BEGIN CERTIFICATE REQUEST-----")]
    NotPem,
    /// PEM, but not a certificate request.
    #[error("the CSR cannot be parsed: {0}")]
    Malformed(String),
    /// The self-signature does not verify.
    #[error(
        "the CSR's signature does not verify (altered in transit, or signed with another key)"
    )]
    BadSignature,
    /// Not an ECDSA P-256 key.
    #[error("the CSR's key is not ECDSA P-256")]
    KeyType,
    /// An extension other than SAN, key usage, extended key usage, basic constraints.
    #[error("the CSR requests an unsupported extension; only subject alternative names are used")]
    UnsupportedExtension,
    /// No URI SAN at all.
    #[error("the CSR has no URI SAN: it must name exactly one, the SPIFFE identity")]
    NoUriSan,
    /// More than one URI SAN.
    #[error("the CSR has {0} URI SANs: it must name exactly one, the SPIFFE identity")]
    SeveralUriSans(usize),
    /// A DNS, IP, email or other SAN beside the URI.
    #[error("the CSR has a {0} SAN: its only SAN must be the URI of the SPIFFE identity")]
    OtherSan(&'static str),
    /// The URI SAN is another identity than the one entitled.
    #[error("the CSR asks for {requested}, but the token entitles {entitled}")]
    WrongIdentity {
        /// What the CSR names, quoted and cut.
        requested: String,
        /// What the token entitles.
        entitled: Identity,
    },
    /// Signing failed (a bug).
    #[error("cannot issue the certificate: {0}")]
    Issue(String),
}

/// A certificate issued by [`Ca::certify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// PEM: the leaf, then the issuer chain.
    pub chain_pem: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// A new root and issuer with their keys, as PEM: what `outrider control ca init` writes.
pub struct CaFiles {
    /// The self-signed root certificate (the trust anchor).
    pub root_pem: String,
    /// The root's key (PKCS#8); keep it offline.
    pub root_key_pem: String,
    /// The issuer (intermediate) certificate, signed by the root.
    pub issuer_pem: String,
    /// The issuer's key (PKCS#8).
    pub issuer_key_pem: String,
}

impl fmt::Debug for CaFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaFiles")
            .field("root_pem", &self.root_pem)
            .field("root_key_pem", &"<redacted>")
            .field("issuer_pem", &self.issuer_pem)
            .field("issuer_key_pem", &"<redacted>")
            .finish()
    }
}

fn generate_error(e: impl fmt::Display) -> CaError {
    CaError::Generate(e.to_string())
}

/// Sixteen random bytes with the top bit clear: a positive serial number.
fn random_serial() -> Result<SerialNumber, String> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "the system random source failed".to_string())?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn ca_params(
    common_name: String,
    constraint: BasicConstraints,
    lifetime: Duration,
) -> Result<CertificateParams, CaError> {
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Outrider");
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(constraint);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial().map_err(CaError::Generate)?);
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + lifetime).into();
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

impl CaFiles {
    /// A new self-signed ECDSA P-256 root valid for `root_lifetime` and an issuer under it
    /// (CA:true, path length 0) valid for `issuer_lifetime` (cut to the root's).
    pub fn generate(
        trust_domain: &str,
        root_lifetime: Duration,
        issuer_lifetime: Duration,
    ) -> Result<CaFiles, CaError> {
        // A random tag tells roots (and issuers) of one trust domain apart in logs and tools.
        let mut tag = [0u8; 4];
        ring::rand::SystemRandom::new()
            .fill(&mut tag)
            .map_err(|_| CaError::Generate("the system random source failed".into()))?;
        let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        let root_key = KeyPair::generate().map_err(generate_error)?;
        let root_params = ca_params(
            format!("Outrider root CA {trust_domain} {tag}"),
            BasicConstraints::Unconstrained,
            root_lifetime,
        )?;
        let root = root_params.self_signed(&root_key).map_err(generate_error)?;
        let root_issuer = Issuer::new(root_params, &root_key);
        let issuer_key = KeyPair::generate().map_err(generate_error)?;
        let issuer_params = ca_params(
            format!("Outrider issuer {trust_domain} {tag}"),
            BasicConstraints::Constrained(0),
            issuer_lifetime.min(root_lifetime),
        )?;
        let issuer = issuer_params
            .signed_by(&issuer_key, &root_issuer)
            .map_err(generate_error)?;
        Ok(CaFiles {
            root_pem: root.pem(),
            root_key_pem: root_key.serialize_pem(),
            issuer_pem: issuer.pem(),
            issuer_key_pem: issuer_key.serialize_pem(),
        })
    }
}

/// Every certificate in a PEM text, or why not.
fn certificates(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::Certificate {
            what,
            reason: format!("is not valid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CaError::Certificate {
            what,
            reason: "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        });
    }
    for (i, der) in certs.iter().enumerate() {
        X509Certificate::from_der(der).map_err(|e| CaError::Certificate {
            what,
            reason: format!("certificate {} does not parse: {e}", i + 1),
        })?;
    }
    Ok(certs)
}

/// PEM text of DER certificates.
pub(crate) fn to_pem(certs: &[CertificateDer<'_>]) -> String {
    use base64::Engine;
    let mut pem = String::new();
    for cert in certs {
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert);
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    pem
}

/// Unix seconds of an X.509 time, as a `SystemTime` (clamped to the epoch).
fn system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
}

/// Verifies `chain` (leaf first) as a client certificate (the EKU our leaves carry) against
/// `anchors` at `now`: webpki's full path validation.
pub fn verify_chain(
    anchors: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for anchor in anchors {
        roots
            .add(anchor.clone())
            .map_err(|e| format!("a trust anchor is unusable: {e}"))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let (leaf, rest) = chain.split_first().ok_or("an empty chain")?;
    let now = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    verifier
        .verify_client_cert(leaf, rest, now)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

impl Ca {
    /// A throwaway CA: a self-signed root and an issuer under it, in memory (for demos and
    /// tests; the root's key is dropped).
    pub fn generate(trust_domain: &str) -> anyhow::Result<Ca> {
        const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
        let files = CaFiles::generate(trust_domain, 10 * YEAR, YEAR)?;
        Ok(Ca::load(
            &files.issuer_pem,
            &files.issuer_key_pem,
            &files.root_pem,
        )?)
    }

    /// A CA from PEM texts: the issuer certificate (optionally followed by more intermediates
    /// towards the anchors), its PKCS#8 ECDSA P-256 key, and one or more trust anchors.
    pub fn load(
        issuer_chain_pem: &str,
        issuer_key_pem: &str,
        trust_anchors_pem: &str,
    ) -> Result<Ca, CaError> {
        let chain = certificates("issuer chain", issuer_chain_pem)?;
        let anchors = certificates("trust anchors", trust_anchors_pem)?;
        let key = PrivatePkcs8KeyDer::from_pem_slice(issuer_key_pem.as_bytes())
            .map_err(|_| CaError::Key)
            .and_then(|der| {
                KeyPair::from_pkcs8_der_and_sign_algo(&der, &PKCS_ECDSA_P256_SHA256)
                    .map_err(|_| CaError::Key)
            })?;
        let (_, cert) = X509Certificate::from_der(&chain[0]).map_err(|e| CaError::Certificate {
            what: "issuer chain",
            reason: format!("certificate 1 does not parse: {e}"),
        })?;
        if cert
            .tbs_certificate
            .subject_pki
            .subject_public_key
            .data
            .as_ref()
            != key.public_key_raw()
        {
            return Err(CaError::KeyMismatch);
        }
        if !cert.is_ca() {
            return Err(CaError::NotCa);
        }
        let validity = cert.validity();
        if !validity.is_valid() {
            return Err(CaError::Validity(format!(
                "it is valid from {} to {}",
                validity.not_before, validity.not_after
            )));
        }
        let issuer_not_after = system_time(validity.not_after);
        let issuer =
            Issuer::from_ca_cert_der(&chain[0], key).map_err(|e| CaError::Certificate {
                what: "issuer chain",
                reason: format!("certificate 1 cannot issue: {e}"),
            })?;
        let ca = Ca {
            issuer,
            chain_pem: to_pem(&chain),
            chain,
            issuer_not_after,
            anchors_pem: to_pem(&anchors),
            anchors,
        };
        // The proof that matters: a leaf this CA issues verifies against the anchors.
        let probe_key = KeyPair::generate().map_err(generate_error)?;
        let probe = ca
            .leaf_params(
                vec![SanType::URI(
                    "spiffe://probe.invalid/ns/probe/sa/probe"
                        .try_into()
                        .map_err(generate_error)?,
                )],
                &[ExtendedKeyUsagePurpose::ClientAuth],
                Duration::from_secs(300),
            )
            .map_err(CaError::Generate)?
            .0
            .signed_by(&probe_key, &ca.issuer)
            .map_err(generate_error)?;
        let mut chain = vec![probe.der().clone()];
        chain.extend(ca.chain.iter().cloned());
        verify_chain(&ca.anchors, &chain, SystemTime::now()).map_err(CaError::NotChained)?;
        Ok(ca)
    }

    /// Reads [`Ca::load`]'s three inputs from files; the error names the file.
    pub fn load_files(
        issuer_chain: &Path,
        issuer_key: &Path,
        anchors: &Path,
    ) -> anyhow::Result<Ca> {
        use anyhow::Context;
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
        };
        let (chain, key, roots) = (read(issuer_chain)?, read(issuer_key)?, read(anchors)?);
        Ca::load(&chain, &key, &roots).with_context(|| {
            format!(
                "issuer {}, key {}, trust anchors {}",
                issuer_chain.display(),
                issuer_key.display(),
                anchors.display()
            )
        })
    }

    /// The trust anchors, PEM.
    pub fn trust_anchors_pem(&self) -> &str {
        &self.anchors_pem
    }

    /// The trust anchors, DER.
    pub fn trust_anchors(&self) -> &[CertificateDer<'static>] {
        &self.anchors
    }

    /// The issuer chain (issuer first), PEM.
    pub fn issuer_chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// End of the issuer's validity: no certificate it issues lasts longer.
    pub fn issuer_not_after(&self) -> SystemTime {
        self.issuer_not_after
    }

    /// Leaf parameters: no subject, `sans`, `ekus`, digital signature, not a CA, a random
    /// serial, valid from a minute ago for `lifetime` (cut to the issuer's end). Also returns the
    /// validity.
    fn leaf_params(
        &self,
        sans: Vec<SanType>,
        ekus: &[ExtendedKeyUsagePurpose],
        lifetime: Duration,
    ) -> Result<(CertificateParams, SystemTime, SystemTime), String> {
        let now = SystemTime::now();
        // X.509 times have whole seconds.
        let whole = |t: SystemTime| {
            UNIX_EPOCH
                + Duration::from_secs(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs())
        };
        let not_before = whole(now - BACKDATE);
        let not_after = whole((now + lifetime).min(self.issuer_not_after));
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.extended_key_usages = ekus.to_vec();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.is_ca = IsCa::ExplicitNoCa;
        params.serial_number = Some(random_serial()?);
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.use_authority_key_identifier_extension = true;
        Ok((params, not_before, not_after))
    }

    /// Issues a certificate for `identity` from `csr_pem`, valid for `lifetime` (at most until
    /// the issuer expires), after checking the CSR: PEM, its signature, an ECDSA P-256 key, and
    /// exactly one SAN, the URI `identity`.
    pub fn certify(
        &self,
        csr_pem: &str,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<Issued, CsrError> {
        let public_key = check_csr(csr_pem, identity)?;
        if self.issuer_not_after <= SystemTime::now() + BACKDATE {
            return Err(CsrError::Issue(
                "the issuer certificate has expired; load a new one".into(),
            ));
        }
        let uri = identity
            .as_str()
            .try_into()
            .map_err(|e: rcgen::Error| CsrError::Issue(e.to_string()))?;
        let (params, not_before, not_after) = self
            .leaf_params(
                vec![SanType::URI(uri)],
                &[
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
                lifetime,
            )
            .map_err(CsrError::Issue)?;
        let leaf = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|e| CsrError::Issue(e.to_string()))?;
        Ok(Issued {
            chain_pem: format!("{}{}", leaf.pem(), self.chain_pem),
            not_before,
            not_after,
        })
    }

    /// A serving certificate for the control plane itself (a new ECDSA P-256 key; server
    /// authentication; the DNS names and IPs as SANs), valid for `lifetime`: `(chain PEM, key
    /// PEM)`.
    pub fn serving_cert(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        lifetime: Duration,
    ) -> Result<(String, String), CaError> {
        let mut sans = Vec::new();
        for name in dns_names {
            sans.push(SanType::DnsName(
                name.as_str().try_into().map_err(generate_error)?,
            ));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let key = KeyPair::generate().map_err(generate_error)?;
        let (params, _, _) = self
            .leaf_params(sans, &[ExtendedKeyUsagePurpose::ServerAuth], lifetime)
            .map_err(CaError::Generate)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate_error)?;
        Ok((
            format!("{}{}", cert.pem(), self.chain_pem),
            key.serialize_pem(),
        ))
    }
}

/// The checks of [`Ca::certify`]; returns the CSR's key.
fn check_csr(csr_pem: &str, identity: &Identity) -> Result<rcgen::PublicKey, CsrError> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::der_parser::oid::Oid;
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|_| CsrError::NotPem)?;
    let (_, parsed) =
        X509CertificationRequest::from_der(&der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    let spki = &parsed.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| Oid::try_from(p).ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        return Err(CsrError::KeyType);
    }
    let params = CertificateSigningRequestParams::from_der(&der).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => CsrError::BadSignature,
        rcgen::Error::UnsupportedExtension => CsrError::UnsupportedExtension,
        rcgen::Error::UnsupportedSignatureAlgorithm => CsrError::KeyType,
        other => CsrError::Malformed(other.to_string()),
    })?;
    let mut uris = Vec::new();
    for san in &params.params.subject_alt_names {
        match san {
            SanType::URI(uri) => uris.push(uri.as_str().to_string()),
            SanType::DnsName(_) => return Err(CsrError::OtherSan("DNS")),
            SanType::IpAddress(_) => return Err(CsrError::OtherSan("IP address")),
            SanType::Rfc822Name(_) => return Err(CsrError::OtherSan("email")),
            _ => return Err(CsrError::OtherSan("other-name")),
        }
    }
    match uris.as_slice() {
        [] => Err(CsrError::NoUriSan),
        [uri] if uri == identity.as_str() => Ok(params.public_key),
        [uri] => Err(CsrError::WrongIdentity {
            requested: crate::quoted::Quoted(uri).to_string(),
            entitled: identity.clone(),
        }),
        several => Err(CsrError::SeveralUriSans(several.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PKCS_ECDSA_P384_SHA384;
    use x509_parser::extensions::GeneralName;

    const WEB: &str = "spiffe://outrider.local/ns/demo/sa/web";
    const HOUR: Duration = Duration::from_secs(3600);

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    /// A CSR for `sans` (strings: `uri:...`, `dns:...`, `ip:...`) signed by a new key of `alg`.
    fn csr_with(sans: &[&str], alg: &'static rcgen::SignatureAlgorithm) -> String {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.split_once(':').unwrap() {
                ("uri", rest) => SanType::URI(rest.try_into().unwrap()),
                ("dns", rest) => SanType::DnsName(rest.try_into().unwrap()),
                ("ip", rest) => SanType::IpAddress(rest.parse().unwrap()),
                _ => panic!("{s}"),
            })
            .collect();
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn csr(sans: &[&str]) -> String {
        csr_with(sans, &PKCS_ECDSA_P256_SHA256)
    }

    fn uri(s: &str) -> String {
        format!("uri:{s}")
    }

    #[test]
    fn a_good_csr_gets_a_leaf_naming_only_its_identity() {
        let ca = Ca::generate("outrider.local").unwrap();
        let before = SystemTime::now();
        let issued = ca.certify(&csr(&[&uri(WEB)]), &id(WEB), HOUR).unwrap();
        let chain: Vec<_> = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(chain.len(), 2, "leaf then issuer");
        let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI(WEB)],
            "exactly one SAN, the identity"
        );
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth && !eku.any && !eku.code_signing);
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        assert!(!leaf.is_ca());
        assert_eq!(leaf.subject().iter().count(), 0, "no subject");
        let nb = system_time(leaf.validity().not_before);
        let na = system_time(leaf.validity().not_after);
        assert_eq!((nb, na), (issued.not_before, issued.not_after));
        let slack = Duration::from_secs(2);
        assert!(nb <= before - BACKDATE + slack && nb + slack >= before - BACKDATE);
        assert!(na <= SystemTime::now() + HOUR && na + slack >= before + HOUR);
        // It chains to the root, as a client and as a server for its URI.
        verify_chain(ca.trust_anchors(), &chain, SystemTime::now()).unwrap();
        assert!(verify_chain(ca.trust_anchors(), &chain, na + HOUR)
            .unwrap_err()
            .contains("expired"));
        // Another CA's root does not accept it.
        let foreign = Ca::generate("outrider.local").unwrap();
        assert!(verify_chain(foreign.trust_anchors(), &chain, SystemTime::now()).is_err());
        // Serial numbers are random.
        let again = ca.certify(&csr(&[&uri(WEB)]), &id(WEB), HOUR).unwrap();
        let again_der = CertificateDer::from_pem_slice(again.chain_pem.as_bytes()).unwrap();
        let (_, again) = X509Certificate::from_der(&again_der).unwrap();
        assert_ne!(leaf.raw_serial(), again.raw_serial());
    }

    #[test]
    fn a_leaf_never_outlives_its_issuer() {
        let files = CaFiles::generate("outrider.local", 10 * HOUR, HOUR).unwrap();
        let ca = Ca::load(&files.issuer_pem, &files.issuer_key_pem, &files.root_pem).unwrap();
        let issued = ca.certify(&csr(&[&uri(WEB)]), &id(WEB), 5 * HOUR).unwrap();
        assert_eq!(
            issued.not_after,
            ca.issuer_not_after(),
            "cut to the issuer's end"
        );
        // An issuer about to end (or ended) issues nothing rather than dead certificates.
        let files = CaFiles::generate("outrider.local", HOUR, Duration::from_secs(30)).unwrap();
        let ca = Ca::load(&files.issuer_pem, &files.issuer_key_pem, &files.root_pem).unwrap();
        let e = ca.certify(&csr(&[&uri(WEB)]), &id(WEB), HOUR).unwrap_err();
        assert!(
            e.to_string().contains("issuer certificate has expired"),
            "{e}"
        );
    }

    #[test]
    fn csrs_that_ask_for_anything_else_are_refused_with_the_reason() {
        let ca = Ca::generate("outrider.local").unwrap();
        let web = id(WEB);
        let refused = |csr: &str| ca.certify(csr, &web, HOUR).unwrap_err();
        assert_eq!(
            refused(&csr(&[&uri("spiffe://outrider.local/ns/demo/sa/db")])),
            CsrError::WrongIdentity {
                requested: "\"spiffe://outrider.local/ns/demo/sa/db\"".into(),
                entitled: web.clone()
            }
        );
        assert!(matches!(
            refused(&csr(&[&uri("spiffe://other.domain/ns/demo/sa/web")])),
            CsrError::WrongIdentity { .. }
        ));
        assert_eq!(
            refused(&csr(&[&uri(WEB), "dns:web.demo.svc"])),
            CsrError::OtherSan("DNS")
        );
        assert_eq!(
            refused(&csr(&["ip:10.0.0.1", &uri(WEB)])),
            CsrError::OtherSan("IP address")
        );
        assert_eq!(refused(&csr(&[])), CsrError::NoUriSan);
        assert_eq!(
            refused(&csr(&[&uri(WEB), &uri(WEB)])),
            CsrError::SeveralUriSans(2)
        );
        assert_eq!(
            refused(&csr_with(&[&uri(WEB)], &PKCS_ECDSA_P384_SHA384)),
            CsrError::KeyType
        );
        // A flipped bit in the signature.
        let good = csr(&[&uri(WEB)]);
        let mut der = CertificateSigningRequestDer::from_pem_slice(good.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let tampered = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.encode(&der)
            }
        );
        assert_eq!(refused(&tampered), CsrError::BadSignature);
        // A flipped bit in the requested identity (spiffe -> spiffg), same length.
        let mut der = CertificateSigningRequestDer::from_pem_slice(good.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        let at = der.windows(6).position(|w| w == b"spiffe").unwrap();
        der[at + 5] = b'g';
        let altered = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.encode(&der)
            }
        );
        assert_eq!(refused(&altered), CsrError::BadSignature);
        assert_eq!(refused("hello"), CsrError::NotPem);
        assert_eq!(refused(""), CsrError::NotPem);
        assert!(matches!(
            refused("-----BEGIN CERTIFICATE REQUEST-----\naGVsbG8=\n-----END CERTIFICATE REQUEST-----\n"),
            CsrError::Malformed(_)
        ));
        // A certificate is not a CSR.
        assert_eq!(refused(ca.trust_anchors_pem()), CsrError::NotPem);
        // And the good one passes.
        assert!(ca.certify(&good, &web, HOUR).is_ok());
    }

    #[test]
    fn load_checks_the_key_the_chain_and_the_anchors() {
        let a = CaFiles::generate("outrider.local", 10 * HOUR, HOUR).unwrap();
        let b = CaFiles::generate("outrider.local", 10 * HOUR, HOUR).unwrap();
        assert!(Ca::load(&a.issuer_pem, &a.issuer_key_pem, &a.root_pem).is_ok());
        assert_eq!(
            Ca::load(&a.issuer_pem, &b.issuer_key_pem, &a.root_pem).unwrap_err(),
            CaError::KeyMismatch
        );
        let e = Ca::load(&a.issuer_pem, &a.issuer_key_pem, &b.root_pem).unwrap_err();
        assert!(matches!(e, CaError::NotChained(_)), "{e}");
        // The root's own key with the root as issuer works only if the root chains to itself,
        // which it does: a root can issue directly.
        assert!(Ca::load(&a.root_pem, &a.root_key_pem, &a.root_pem).is_ok());
        // A bundle of two roots: either issuer loads (rotation).
        let bundle = format!("{}{}", b.root_pem, a.root_pem);
        let ca = Ca::load(&a.issuer_pem, &a.issuer_key_pem, &bundle).unwrap();
        assert_eq!(ca.trust_anchors().len(), 2);
        assert!(Ca::load(&b.issuer_pem, &b.issuer_key_pem, &bundle).is_ok());
        // Not PEM, no key, a leaf as issuer.
        for (chain, key, roots, want) in [
            (
                "junk",
                a.issuer_key_pem.as_str(),
                a.root_pem.as_str(),
                "issuer chain holds no PEM",
            ),
            (&a.issuer_pem, "junk", &a.root_pem, "not a PKCS#8"),
            (
                &a.issuer_pem,
                &a.issuer_key_pem,
                "",
                "trust anchors holds no PEM",
            ),
        ] {
            let e = Ca::load(chain, key, roots).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let leaf_key = KeyPair::generate().unwrap();
        let ca = Ca::load(&a.issuer_pem, &a.issuer_key_pem, &a.root_pem).unwrap();
        let leaf = ca
            .leaf_params(vec![], &[ExtendedKeyUsagePurpose::ClientAuth], HOUR)
            .unwrap()
            .0
            .signed_by(&leaf_key, &ca.issuer)
            .unwrap();
        assert_eq!(
            Ca::load(&leaf.pem(), &leaf_key.serialize_pem(), &a.root_pem).unwrap_err(),
            CaError::NotCa
        );
        // No error and no Debug output shows key material.
        let key_body: String = a.issuer_key_pem.lines().nth(1).unwrap().into();
        let e = Ca::load(&a.issuer_pem, &b.issuer_key_pem, &a.root_pem).unwrap_err();
        assert!(!format!("{e} {e:?} {ca:?} {a:?}").contains(&key_body));
    }

    #[test]
    fn the_serving_certificate_verifies_for_its_names() {
        use rustls::client::danger::ServerCertVerifier;
        let ca = Ca::generate("outrider.local").unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let (chain_pem, key_pem) = ca
            .serving_cert(&["outrider-control".into()], &[ip], HOUR)
            .unwrap();
        assert!(PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes()).is_ok());
        let chain: Vec<_> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.trust_anchors()[0].clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let now = UnixTime::now();
        for (name, ok) in [
            ("outrider-control", true),
            ("127.0.0.1", true),
            ("other", false),
        ] {
            let name = rustls_pki_types::ServerName::try_from(name).unwrap();
            let r = verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], now);
            assert_eq!(r.is_ok(), ok, "{name:?}: {r:?}");
        }
    }
}
