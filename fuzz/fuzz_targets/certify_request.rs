//! A certify request body (`{"csr": "<PEM>"}`) as the control plane reads it, then the CA's CSR
//! checks and issuance for a fixed identity: no panic, bounded errors, and a certificate issued
//! only for that identity (one URI SAN, the token's), never for what the CSR asks beyond it.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use outrider_control::api::{CertifyRequest, Identity};
use outrider_control::ca::Ca;

const ID: &str = "spiffe://outrider.local/ns/demo/sa/web";

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| Ca::generate("outrider.local").expect("a throwaway CA"))
}

fuzz_target!(|data: &[u8]| {
    // The body as JSON, or the bytes as the CSR itself (to reach the PEM and DER parsers).
    let csr = match serde_json::from_slice::<CertifyRequest>(data) {
        Ok(req) => req.csr,
        Err(e) => {
            assert!(e.to_string().len() <= 4096);
            match std::str::from_utf8(data) {
                Ok(text) => text.to_string(),
                Err(_) => return,
            }
        }
    };
    let identity: Identity = ID.parse().expect("a valid identity");
    match ca().certify(&csr, &identity, Duration::from_secs(3600)) {
        Ok(issued) => {
            let leaf = issued
                .chain_pem
                .split_inclusive("-----END CERTIFICATE-----")
                .next()
                .expect("a leaf");
            let der = rustls_pki_der(leaf);
            let named = outrider_proxy::identity::tls::identity_of(&der)
                .expect("the issued leaf names one identity");
            assert_eq!(named.as_str(), ID, "issued for another identity");
        }
        Err(e) => assert!(
            e.to_string().len() <= 4096,
            "error of {} bytes",
            e.to_string().len()
        ),
    }
});

/// The DER of the first PEM certificate in `pem`.
fn rustls_pki_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("the issued chain is PEM")
        .to_vec()
}
