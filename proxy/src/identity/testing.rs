//! A small certificate authority for tests: real ECDSA P-256 certificates minted per test,
//! including the bad ones the real CA never issues (expired, not yet valid, without a URI SAN).

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use super::certify::{Certified, Certify};
use crate::errors::BoxError;

/// A root that signs leaves directly.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestCa")
    }
}

/// A leaf as tests need it.
#[derive(Debug, Clone)]
pub struct TestLeaf {
    /// Leaf then nothing else (the root is the anchor).
    pub chain_pem: String,
    /// PKCS#8 DER.
    pub key_der: Vec<u8>,
}

impl TestCa {
    /// A fresh self-signed root named `name`.
    pub fn new(name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Self { issuer })
    }

    /// The root, PEM.
    pub fn root_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf with these URI SANs, valid between `from` and `until`.
    pub fn leaf_with(
        &self,
        uris: &[&str],
        from: SystemTime,
        until: SystemTime,
    ) -> Result<TestLeaf, rcgen::Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::string::Ia5String::try_from(*u).map(SanType::URI))
            .collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = from.into();
        params.not_after = until.into();
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(TestLeaf {
            chain_pem: cert.pem(),
            key_der: key.serialize_der(),
        })
    }

    /// A leaf for `identity`, valid from a minute ago for `lifetime`.
    pub fn leaf(&self, identity: &str, lifetime: Duration) -> Result<TestLeaf, rcgen::Error> {
        let now = SystemTime::now();
        self.leaf_with(&[identity], now - Duration::from_secs(60), now + lifetime)
    }

    /// Signs a server certificate with `params` for `key` (PEM).
    pub fn sign_server(
        &self,
        mut params: CertificateParams,
        key: &KeyPair,
    ) -> Result<String, rcgen::Error> {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        Ok(params.signed_by(key, &self.issuer)?.pem())
    }

    /// Signs `csr_pem` for its own URI SAN, valid for `lifetime` from now.
    pub fn sign_csr(&self, csr_pem: &str, lifetime: Duration) -> Result<String, rcgen::Error> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let now = SystemTime::now();
        csr.params.not_before = now.into();
        csr.params.not_after = (now + lifetime).into();
        csr.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        Ok(csr.signed_by(&self.issuer)?.pem())
    }
}

/// A [`TestCa`] that signs every CSR for `lifetime` (no token check: that is the control plane's).
#[derive(Debug)]
pub struct SigningCa {
    /// The CA that signs now.
    ca: std::sync::Mutex<TestCa>,
    /// Lifetime of what it issues.
    pub lifetime: Duration,
    /// The bundle it hands out.
    pub anchors: std::sync::Mutex<String>,
    /// While set, every request fails (an unreachable control plane).
    pub failing: std::sync::atomic::AtomicBool,
}

impl SigningCa {
    /// Issues for `lifetime`, handing out its own root as the bundle.
    pub fn new(ca: TestCa, lifetime: Duration) -> Self {
        let anchors = std::sync::Mutex::new(ca.root_pem());
        Self {
            ca: std::sync::Mutex::new(ca),
            lifetime,
            anchors,
            failing: Default::default(),
        }
    }

    /// Signs with `ca` from now on (the bundle handed out is unchanged: see `anchors`).
    pub fn switch_to(&self, ca: TestCa) {
        if let Ok(mut current) = self.ca.lock() {
            *current = ca;
        }
    }

    /// A leaf from the CA that signs now, with these URI SANs and validity (good or bad).
    pub fn leaf_with(
        &self,
        uris: &[&str],
        from: SystemTime,
        until: SystemTime,
    ) -> Result<TestLeaf, BoxError> {
        match self.ca.lock() {
            Ok(ca) => Ok(ca.leaf_with(uris, from, until)?),
            Err(_) => Err("the test CA lock is poisoned".into()),
        }
    }

    /// Hands out `pem` as the trust bundle from now on.
    pub fn set_anchors(&self, pem: String) {
        if let Ok(mut anchors) = self.anchors.lock() {
            *anchors = pem;
        }
    }
}

impl Certify for SigningCa {
    fn certify<'a>(
        &'a self,
        _token: &'a str,
        csr_pem: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Certified, BoxError>> + Send + 'a>> {
        Box::pin(async move {
            if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
                return Err("the control plane is unreachable (test)".into());
            }
            let chain_pem = match self.ca.lock() {
                Ok(ca) => ca.sign_csr(csr_pem, self.lifetime)?,
                Err(_) => return Err("the test CA lock is poisoned".into()),
            };
            let trust_anchors_pem = self.anchors.lock().map(|a| a.clone()).unwrap_or_default();
            Ok(Certified {
                chain_pem,
                trust_anchors_pem,
            })
        })
    }
}

/// An unsigned token in the control plane's format claiming `identity` (the proxy reads only its
/// claim; signature checks are the control plane's).
pub fn token_for(identity: &str) -> String {
    use base64::Engine as _;
    let payload = serde_json::json!({ "sub": identity, "exp": 4_000_000_000u64 }).to_string();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!("v1.{}.{}", b64.encode(payload), b64.encode(b"unsigned"))
}
