//! Trust for the connection to the control plane, which must follow a root rotation: the roots
//! that may sign the control plane's serving certificate are those of the `--trust-anchors` file
//! (re-read when it changes) together with the mesh's trust bundle as the control plane last
//! served it with a certificate (authenticated by the TLS channel it came over). So step 1 of a
//! rotation (a new root joins the bundle) reaches running proxies with their next certificate,
//! before step 2 makes the control plane's own certificate chain to the new root.
//!
//! The TLS client configuration is built once (the watch and certify clients keep it); its
//! certificate verifier reads the roots in force at each handshake.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::client::danger::ServerCertVerifier as _;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::RootCertStore;

use super::tls::{CheckedBy, ServerCertCheck};

/// The roots in force, and where they came from.
#[derive(Debug)]
struct Roots {
    file_pem: String,
    bundle_pem: String,
    verifier: Arc<WebPkiServerVerifier>,
}

/// The control plane's trust: a verifier whose roots can change.
#[derive(Debug)]
pub struct ControlTrust {
    file: Option<PathBuf>,
    roots: RwLock<Arc<Roots>>,
}

/// Roots that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TrustError(String);

fn verifier(file_pem: &str, bundle_pem: &str) -> Result<Arc<WebPkiServerVerifier>, TrustError> {
    let mut roots = RootCertStore::empty();
    for (what, pem) in [
        ("--trust-anchors", file_pem),
        ("the served bundle", bundle_pem),
    ] {
        for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let der = der.map_err(|e| TrustError(format!("{what} is not PEM: {e}")))?;
            roots
                .add(der)
                .map_err(|e| TrustError(format!("a root of {what} cannot be used: {e}")))?;
        }
    }
    if roots.is_empty() {
        return Err(TrustError(
            "no PEM certificate (-----BEGIN CERTIFICATE-----) found".into(),
        ));
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), super::tls::provider())
        .build()
        .map_err(|e| TrustError(e.to_string()))
}

impl ControlTrust {
    /// Trust in the roots of `file_pem` (read from `file`, followed by [`Self::reload`]).
    pub fn new(file: Option<PathBuf>, file_pem: &str) -> Result<Arc<Self>, TrustError> {
        let roots = Roots {
            verifier: verifier(file_pem, "")?,
            file_pem: file_pem.to_string(),
            bundle_pem: String::new(),
        };
        Ok(Arc::new(Self {
            file,
            roots: RwLock::new(Arc::new(roots)),
        }))
    }

    /// The TLS 1.3 client configuration towards the control plane, verifying with the roots in
    /// force at each handshake.
    pub fn client_config(self: &Arc<Self>) -> Result<Arc<rustls::ClientConfig>, TrustError> {
        let config = rustls::ClientConfig::builder_with_provider(super::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TrustError(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(CheckedBy::with(
                self.clone(),
                super::tls::provider(),
            )))
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    fn current(&self) -> Arc<Roots> {
        match self.roots.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, file_pem: &str, bundle_pem: &str) -> Result<bool, TrustError> {
        let current = self.current();
        if current.file_pem == file_pem && current.bundle_pem == bundle_pem {
            return Ok(false);
        }
        let roots = Arc::new(Roots {
            verifier: verifier(file_pem, bundle_pem)?,
            file_pem: file_pem.to_string(),
            bundle_pem: bundle_pem.to_string(),
        });
        match self.roots.write() {
            Ok(mut r) => *r = roots,
            Err(poisoned) => *poisoned.into_inner() = roots,
        }
        Ok(true)
    }

    /// Trusts the mesh's bundle `pem` as the control plane served it (besides the file's roots).
    pub fn set_bundle(&self, pem: &str) -> Result<bool, TrustError> {
        let file_pem = self.current().file_pem.clone();
        self.replace(&file_pem, pem)
    }

    /// Reads the `--trust-anchors` file again; `Ok(true)` when its roots changed. A file that
    /// cannot be read or used leaves the roots in force.
    pub async fn reload(&self) -> Result<bool, TrustError> {
        let Some(file) = &self.file else {
            return Ok(false);
        };
        let pem = tokio::fs::read_to_string(file)
            .await
            .map_err(|e| TrustError(format!("{}: {e}", file.display())))?;
        let bundle_pem = self.current().bundle_pem.clone();
        self.replace(&pem, &bundle_pem)
    }

    /// Follows the `--trust-anchors` file (checked every `every`) and `bundles` (the mesh
    /// bundle of each certificate), forever.
    pub async fn follow(
        self: Arc<Self>,
        store: Option<Arc<super::IdentityStore>>,
        every: std::time::Duration,
    ) {
        let mut bundles = store.as_ref().map(|s| s.bundles());
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => match self.reload().await {
                    Ok(true) => tracing::info!("--trust-anchors changed: the control plane's certificate is verified against the new roots"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot use the --trust-anchors file; keeping the roots in force"),
                },
                changed = async {
                    match bundles.as_mut() {
                        Some(b) => b.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    if !changed {
                        // The store is gone: the proxy is shutting down.
                        return;
                    }
                    if let Some(pem) = store.as_ref().and_then(|s| s.anchors_pem()) {
                        match self.set_bundle(&pem) {
                            Ok(true) => tracing::info!("the mesh's trust bundle changed: the control plane's certificate is verified against it too"),
                            Ok(false) => {}
                            Err(e) => tracing::warn!(error = %e, "cannot use the served trust bundle for the control plane"),
                        }
                    }
                }
            }
        }
    }
}

impl ServerCertCheck for ControlTrust {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        self.current()
            .verifier
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::testing::TestCa;

    /// What `trust` says of a server certificate for 127.0.0.1 from `ca`.
    fn verifies(trust: &ControlTrust, ca: &TestCa) -> bool {
        use rcgen::{CertificateParams, KeyPair, SanType};
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())];
        let key = KeyPair::generate().unwrap();
        let pem = ca.sign_server(params, &key).unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        trust.check(&der, &[], &name, &[], UnixTime::now()).is_ok()
    }

    #[tokio::test]
    async fn the_roots_follow_the_file_and_the_served_bundle() {
        let (old, next) = (TestCa::new("old").unwrap(), TestCa::new("next").unwrap());
        let dir = std::env::temp_dir().join(format!("outrider-ct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("anchors.pem");
        std::fs::write(&file, old.root_pem()).unwrap();
        let trust = ControlTrust::new(Some(file.clone()), &old.root_pem()).unwrap();
        let _config = trust.client_config().unwrap();
        assert!(verifies(&trust, &old));
        assert!(!verifies(&trust, &next));
        // Step 1 of a rotation reaches the proxy through the served bundle.
        assert!(trust
            .set_bundle(&format!("{}{}", old.root_pem(), next.root_pem()))
            .unwrap());
        assert!(verifies(&trust, &next));
        // Or through the file.
        assert!(trust.set_bundle("").unwrap());
        assert!(!verifies(&trust, &next));
        std::fs::write(&file, next.root_pem()).unwrap();
        assert!(trust.reload().await.unwrap());
        assert!(verifies(&trust, &next));
        assert!(!verifies(&trust, &old), "the old root left the file");
        // A broken file keeps the roots in force.
        std::fs::write(&file, "not pem").unwrap();
        assert!(trust.reload().await.is_err());
        assert!(verifies(&trust, &next));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
