//! The proxy's identity and mutual TLS between sidecars.
//!
//! - [`store`]: the current certificate and key, the trust anchors, and the rustls
//!   configurations built from them.
//! - [`certify`]: key, CSR, certificate from the control plane, renewal.
//! - [`token`]: the bootstrap token (an Outrider token or a projected ServiceAccount token) and
//!   the identity it claims.
//! - [`tls`]: the verifiers (a peer's exact SPIFFE identity) and the ALPN markers of mesh
//!   connections.

pub mod certify;
pub mod control_trust;
pub mod store;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod tls;
pub mod token;

use std::time::SystemTime;

pub use self::store::IdentityStore;
pub use self::tls::Alpn;

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// What `/identity` shows: the SPIFFE id, the chain's subjects and issuers, the validity and the
/// next renewal (JSON). Nothing secret: no key, no token.
pub fn describe(store: &IdentityStore, next_renewal: Option<SystemTime>) -> serde_json::Value {
    let Some(leaf) = store.leaf() else {
        return serde_json::json!({ "identity": null, "state": "waiting for the first certificate" });
    };
    let now = SystemTime::now();
    serde_json::json!({
        "identity": leaf.identity.as_str(),
        "chain": leaf.chain.iter().map(|(subject, issuer)| serde_json::json!({
            "subject": subject, "issuer": issuer,
        })).collect::<Vec<_>>(),
        "not_before": unix(leaf.not_before),
        "not_after": unix(leaf.not_after),
        "expires_in_seconds": leaf.not_after.duration_since(now).map(|d| d.as_secs()).unwrap_or(0),
        "next_renewal": next_renewal.map(unix),
        "trust_anchors": store.anchors_pem().map(|p| p.matches("BEGIN CERTIFICATE").count()),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::testing::TestCa;
    use super::tls::{identity_of, ServerIdVerifier};
    use super::*;

    const WEB: &str = "spiffe://outrider.local/ns/demo/sa/web";
    const API: &str = "spiffe://outrider.local/ns/demo/sa/api";

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
    }

    fn roots(ca: &TestCa) -> Arc<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(&ca.root_pem())).unwrap();
        Arc::new(roots)
    }

    /// What the outbound verifier says of `leaf_pem` when it expects `WEB` and trusts `ca`.
    fn verify(ca: &TestCa, leaf_pem: &str) -> Result<(), String> {
        let verifier = ServerIdVerifier::new(roots(ca), WEB.parse().unwrap());
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        verifier
            .verify_server_cert(&der(leaf_pem), &[], &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_verifier_accepts_exactly_the_expected_identity() {
        let ca = TestCa::new("mesh root").unwrap();
        let day = Duration::from_secs(86_400);
        let now = SystemTime::now();
        let ok = ca.leaf(WEB, day).unwrap();
        assert_eq!(verify(&ca, &ok.chain_pem), Ok(()));

        let wrong_id = ca.leaf(API, day).unwrap();
        let e = verify(&ca, &wrong_id.chain_pem).unwrap_err();
        assert!(
            e.contains("sa/api") && e.contains("not spiffe://outrider.local/ns/demo/sa/web"),
            "{e}"
        );

        let other_domain = ca
            .leaf("spiffe://other.example/ns/demo/sa/web", day)
            .unwrap();
        assert!(verify(&ca, &other_domain.chain_pem)
            .unwrap_err()
            .contains("other.example"));

        let expired = ca.leaf_with(&[WEB], now - 2 * day, now - day).unwrap();
        assert!(verify(&ca, &expired.chain_pem)
            .unwrap_err()
            .to_lowercase()
            .contains("expired"));

        let not_yet = ca.leaf_with(&[WEB], now + day, now + 2 * day).unwrap();
        assert!(verify(&ca, &not_yet.chain_pem)
            .unwrap_err()
            .to_lowercase()
            .contains("not valid yet"));

        let foreign = TestCa::new("someone else").unwrap().leaf(WEB, day).unwrap();
        let e = verify(&ca, &foreign.chain_pem).unwrap_err();
        assert!(e.contains("UnknownIssuer"), "{e}");

        let no_uri = ca.leaf_with(&[], now - day, now + day).unwrap();
        assert!(verify(&ca, &no_uri.chain_pem)
            .unwrap_err()
            .contains("no URI SAN"));

        let two = ca.leaf_with(&[WEB, API], now - day, now + day).unwrap();
        assert!(verify(&ca, &two.chain_pem)
            .unwrap_err()
            .contains("2 URI SANs"));
    }

    #[test]
    fn a_certificate_names_its_one_spiffe_identity() {
        let ca = TestCa::new("root").unwrap();
        let leaf = ca.leaf(WEB, Duration::from_secs(60)).unwrap();
        assert_eq!(identity_of(&der(&leaf.chain_pem)).unwrap().as_str(), WEB);
        assert!(identity_of(b"garbage").is_err());
    }

    fn store(ca: &TestCa, id: &str) -> Arc<IdentityStore> {
        let store = IdentityStore::new();
        assert!(!store.is_ready());
        let leaf = ca.leaf(id, Duration::from_secs(3600)).unwrap();
        store.set_leaf(store::Leaf::from_pem(&leaf.chain_pem, leaf.key_der).unwrap());
        store.set_anchors(&ca.root_pem()).unwrap();
        assert!(store.is_ready());
        store
    }

    /// A real TLS 1.3 handshake over an in-memory pipe: client `web` expecting `expect` against
    /// server `api`; the server's view of the client's identity, and the ALPN agreed.
    async fn handshake(
        client: &IdentityStore,
        server: &IdentityStore,
        expect: &str,
    ) -> Result<(String, Vec<u8>), String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(
            client
                .client_config(&expect.parse().unwrap(), Alpn::Opaque)
                .unwrap(),
        );
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config().unwrap());
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let (c, s) = tokio::join!(connector.connect(name, a), acceptor.accept(b));
        let (mut c, mut s) = (c.map_err(|e| e.to_string())?, s.map_err(|e| e.to_string())?);
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        let (_, conn) = s.get_ref();
        let peer = identity_of(&conn.peer_certificates().unwrap()[0]).unwrap();
        assert_eq!(
            conn.negotiated_cipher_suite().map(|c| c.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
            "the mesh prefers AES-128-GCM with SHA-256"
        );
        Ok((peer.to_string(), conn.alpn_protocol().unwrap().to_vec()))
    }

    #[tokio::test]
    async fn two_stores_do_mutual_tls_and_see_each_others_identity() {
        let ca = TestCa::new("root").unwrap();
        let (web, api) = (store(&ca, WEB), store(&ca, API));
        let (peer, alpn) = handshake(&web, &api, API).await.unwrap();
        assert_eq!(peer, WEB);
        assert_eq!(Alpn::from_id(&alpn), Some(Alpn::Opaque));
        // Expecting anyone else fails the handshake.
        let e = handshake(&web, &api, WEB).await.unwrap_err();
        assert!(
            e.contains("not spiffe://outrider.local/ns/demo/sa/web"),
            "{e}"
        );
        // A client from another root is refused by the server.
        let stranger = store(&TestCa::new("other").unwrap(), WEB);
        stranger.set_anchors(&ca.root_pem()).unwrap();
        assert!(handshake(&stranger, &api, API).await.is_err());
    }

    #[test]
    fn a_client_hello_shows_its_mesh_alpn_without_being_consumed() {
        let ca = TestCa::new("root").unwrap();
        let web = store(&ca, WEB);
        let config = web.client_config(&API.parse().unwrap(), Alpn::H2).unwrap();
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let mut conn = rustls::ClientConnection::new(config, name).unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        assert_eq!(tls::offered_alpn(&hello).unwrap(), Some(vec![Alpn::H2]));
        assert_eq!(tls::offered_alpn(&hello[..20]).unwrap(), None, "incomplete");
        assert!(tls::offered_alpn(b"\x16\x03\x01\x00\x05hello").is_err());
    }

    #[tokio::test]
    async fn a_resumed_session_whose_peer_certificate_expired_is_noticed() {
        let ca = TestCa::new("root").unwrap();
        let web = store(&ca, WEB);
        // The server's certificate expires in about two seconds (X.509 counts whole seconds).
        let api = IdentityStore::new();
        let now = std::time::SystemTime::now();
        let leaf = ca
            .leaf_with(
                &[API],
                now - Duration::from_secs(60),
                now + Duration::from_secs(2),
            )
            .unwrap();
        api.set_leaf(store::Leaf::from_pem(&leaf.chain_pem, leaf.key_der).unwrap());
        api.set_anchors(&ca.root_pem()).unwrap();
        let not_after = api.leaf().unwrap().not_after;
        let connect = || async {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let connector = tokio_rustls::TlsConnector::from(
                web.client_config(&API.parse().unwrap(), Alpn::Opaque)
                    .unwrap(),
            );
            let acceptor = tokio_rustls::TlsAcceptor::from(api.server_config().unwrap());
            let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
            let (c, s) = tokio::join!(connector.connect(name, a), async {
                let mut s = acceptor.accept(b).await.unwrap();
                // Let the session ticket reach the client.
                s.write_all(b"x").await.unwrap();
                s.flush().await.unwrap();
                s
            });
            let mut c = c.unwrap();
            let mut one = [0u8; 1];
            c.read_exact(&mut one).await.unwrap();
            (c, s)
        };
        let (c, _s) = connect().await;
        assert_eq!(
            c.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        assert!(!tls::resumed_with_expired_peer(c.get_ref().1));
        let (c, _s) = connect().await;
        assert_eq!(
            c.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
        assert!(
            !tls::resumed_with_expired_peer(c.get_ref().1),
            "still valid"
        );
        // A renewal of the client's own certificate drops its cached sessions (they would
        // present the old certificate again).
        let renewed = ca.leaf(WEB, Duration::from_secs(3600)).unwrap();
        web.set_leaf(store::Leaf::from_pem(&renewed.chain_pem, renewed.key_der).unwrap());
        let (c, _s) = connect().await;
        assert_eq!(
            c.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        // Wait (bounded) for the certificate to expire, then resume again.
        for _ in 0..100 {
            if std::time::SystemTime::now() > not_after + Duration::from_secs(1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (c, _s) = connect().await;
        assert_eq!(
            c.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
        assert!(tls::resumed_with_expired_peer(c.get_ref().1));
    }

    #[tokio::test]
    async fn a_client_certificate_stops_being_trusted_when_its_root_leaves_the_bundle() {
        let (old, next) = (TestCa::new("old").unwrap(), TestCa::new("next").unwrap());
        let leaf = old.leaf(WEB, Duration::from_secs(3600)).unwrap();
        let chain = vec![der(&leaf.chain_pem)];
        let store = IdentityStore::new();
        store.set_anchors(&old.root_pem()).unwrap();
        assert!(store.trusts_client(&chain));
        let watcher = {
            let (store, chain) = (store.clone(), chain.clone());
            tokio::spawn(async move { store.until_untrusted(&chain).await })
        };
        // Both roots: still trusted, the watcher waits on.
        store
            .set_anchors(&format!("{}{}", old.root_pem(), next.root_pem()))
            .unwrap();
        tokio::task::yield_now().await;
        assert!(store.trusts_client(&chain));
        assert!(!watcher.is_finished());
        // The old root leaves: the watcher resolves.
        store.set_anchors(&next.root_pem()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), watcher)
            .await
            .unwrap()
            .unwrap();
        assert!(!store.trusts_client(&chain));
    }
}
