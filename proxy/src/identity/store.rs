//! The proxy's own identity: its current certificate and key, the trust anchors, and the TLS
//! configurations built from them.
//!
//! The certificate is read at every handshake (a resolver), so a renewal takes effect for the
//! next handshake without touching open connections. The configurations depend only on the trust
//! anchors and are rebuilt when those change (a root rotation), never per connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use outrider_control::api::Identity;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};

use super::tls::{provider, Alpn, ClientIdVerifier, ServerIdVerifier};

/// Sessions each server remembers for resumption.
const SERVER_SESSIONS: usize = 4096;

/// A certificate the proxy holds, and what `/identity` shows of it.
#[derive(Debug)]
pub struct Leaf {
    /// The SPIFFE identity.
    pub identity: Identity,
    /// For rustls.
    pub key: Arc<CertifiedKey>,
    /// Subject and issuer of each certificate of the chain, leaf first.
    pub chain: Vec<(String, String)>,
    /// Valid from.
    pub not_before: SystemTime,
    /// Valid until.
    pub not_after: SystemTime,
}

/// A bad certificate, key or bundle.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

impl Leaf {
    /// A leaf from a PEM chain (leaf first) and the PKCS#8 DER of its key. Checks that the key
    /// matches the certificate and that the certificate names one SPIFFE identity.
    pub fn from_pem(chain_pem: &str, key_pkcs8: Vec<u8>) -> Result<Self, LoadError> {
        use rustls::pki_types::pem::PemObject;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| LoadError(format!("the certificate chain is not PEM: {e}")))?;
        let Some(first) = chain.first() else {
            return Err(LoadError("the certificate chain is empty".into()));
        };
        let identity = super::tls::identity_of(first).map_err(|e| LoadError(e.to_string()))?;
        let mut shown = Vec::new();
        let mut validity = None;
        for der in &chain {
            let (_, cert) = x509_parser::parse_x509_certificate(der)
                .map_err(|e| LoadError(format!("a certificate cannot be parsed: {e}")))?;
            shown.push((cert.subject().to_string(), cert.issuer().to_string()));
            if validity.is_none() {
                let v = cert.validity();
                validity = Some((to_system(v.not_before), to_system(v.not_after)));
            }
        }
        let (not_before, not_after) =
            validity.unwrap_or((SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH));
        let signer = provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(key_pkcs8.into()))
            .map_err(|e| LoadError(format!("the private key cannot be used: {e}")))?;
        let key = CertifiedKey::new(chain, signer);
        key.keys_match()
            .map_err(|e| LoadError(format!("the key does not match the certificate: {e}")))?;
        Ok(Self {
            identity,
            key: Arc::new(key),
            chain: shown,
            not_before,
            not_after,
        })
    }
}

fn to_system(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

/// The trust anchors and every configuration built from them.
struct Trust {
    pem: String,
    roots: Arc<RootCertStore>,
    server: Arc<ServerConfig>,
    /// By peer, then by ALPN marker (indexed like [`Alpn::ALL`]).
    clients: Mutex<HashMap<Identity, [Option<Arc<ClientConfig>>; 3]>>,
}

/// The proxy's identity: shared by the stacks (TLS), the renewal task and the admin server.
#[derive(Default)]
pub struct IdentityStore {
    current: RwLock<Option<Arc<Leaf>>>,
    trust: RwLock<Option<Arc<Trust>>>,
    resolver: Arc<Resolver>,
    /// Bumped at every change of the trust bundle.
    bundles: tokio::sync::watch::Sender<u64>,
    /// Bumped at every new certificate.
    leaves: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for IdentityStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityStore")
            .field("identity", &self.leaf().map(|l| l.identity.to_string()))
            .finish_non_exhaustive()
    }
}

/// Hands rustls the current certificate at each handshake.
#[derive(Debug, Default)]
struct Resolver(RwLock<Option<Arc<CertifiedKey>>>);

impl Resolver {
    fn get(&self) -> Option<Arc<CertifiedKey>> {
        match self.0.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

fn read<T: Clone>(lock: &RwLock<Option<T>>) -> Option<T> {
    match lock.read() {
        Ok(v) => v.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

fn write<T>(lock: &RwLock<Option<T>>, value: T) {
    match lock.write() {
        Ok(mut v) => *v = Some(value),
        Err(poisoned) => *poisoned.into_inner() = Some(value),
    }
}

impl IdentityStore {
    /// An empty store: no certificate, no anchors (no TLS until both are in).
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The current certificate, if any.
    pub fn leaf(&self) -> Option<Arc<Leaf>> {
        read(&self.current)
    }

    /// Presents the current certificate (none before the first) at each handshake as a client:
    /// for the connection to the control plane's watch API.
    pub fn client_cert_resolver(&self) -> Arc<dyn ResolvesClientCert> {
        self.resolver.clone()
    }

    /// The proxy's identity, once it has a certificate.
    pub fn identity(&self) -> Option<Identity> {
        self.leaf().map(|l| l.identity.clone())
    }

    /// The trust anchors in force (PEM).
    pub fn anchors_pem(&self) -> Option<String> {
        read(&self.trust).map(|t| t.pem.clone())
    }

    /// Installs a new certificate; the next handshake presents it. Client sessions cached so far
    /// were established with the old certificate, which a resumption would present again (a
    /// server refuses it once expired): they are dropped.
    pub fn set_leaf(&self, leaf: Leaf) {
        let leaf = Arc::new(leaf);
        write(&self.resolver.0, leaf.key.clone());
        write(&self.current, leaf);
        self.leaves
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(trust) = read(&self.trust) {
            if let Ok(mut clients) = trust.clients.lock() {
                clients.clear();
            }
        }
    }

    /// A number that changes with every new certificate: a connection made while it had
    /// another value presented an older certificate, one that expires before the current one.
    pub(crate) fn leaf_generation(&self) -> u64 {
        self.leaves.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Drops the sessions cached for `peer` over `alpn` (its client configuration is built
    /// anew), so the next connection does a full handshake.
    pub fn forget_sessions(&self, peer: &Identity, alpn: Alpn) {
        if let Some(trust) = read(&self.trust) {
            if let Ok(mut clients) = trust.clients.lock() {
                if let Some(slot) = clients.get_mut(peer) {
                    slot[alpn.index()] = None;
                }
            }
        }
    }

    /// Installs a trust bundle (one or more roots, PEM); a bundle equal to the one in force
    /// changes nothing, so sessions stay resumable.
    pub fn set_anchors(&self, pem: &str) -> Result<(), LoadError> {
        use rustls::pki_types::pem::PemObject;
        if read(&self.trust).is_some_and(|t| t.pem == pem) {
            return Ok(());
        }
        let mut roots = RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let der = der.map_err(|e| LoadError(format!("the trust bundle is not PEM: {e}")))?;
            roots
                .add(der)
                .map_err(|e| LoadError(format!("a trust anchor cannot be used: {e}")))?;
        }
        if roots.is_empty() {
            return Err(LoadError("the trust bundle holds no certificate".into()));
        }
        let roots = Arc::new(roots);
        let verifier =
            ClientIdVerifier::new(roots.clone()).map_err(|e| LoadError(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| LoadError(e.to_string()))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(self.resolver.clone());
        server.alpn_protocols = Alpn::ALL.iter().map(|a| a.id().to_vec()).collect();
        server.session_storage = ServerSessionMemoryCache::new(SERVER_SESSIONS);
        // One ticket per handshake (rustls sends two by default): a mesh client redeems one at
        // most, and each unused one holds a session, with the client's chain, in the cache.
        server.send_tls13_tickets = 1;
        write(
            &self.trust,
            Arc::new(Trust {
                pem: pem.to_string(),
                roots,
                server: Arc::new(server),
                clients: Mutex::new(HashMap::new()),
            }),
        );
        self.bundles.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// A receiver told of every change of the trust bundle.
    pub fn bundles(&self) -> tokio::sync::watch::Receiver<u64> {
        self.bundles.subscribe()
    }

    /// Whether a client certificate `chain` (leaf first) chains to the trust bundle in force and
    /// names one mesh identity, now.
    pub fn trusts_client(&self, chain: &[CertificateDer<'static>]) -> bool {
        use rustls::server::danger::ClientCertVerifier;
        let (Some(trust), Some((leaf, intermediates))) = (read(&self.trust), chain.split_first())
        else {
            return false;
        };
        ClientIdVerifier::new(trust.roots.clone()).is_ok_and(|v| {
            v.verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
                .is_ok()
        })
    }

    /// Resolves once a new trust bundle no longer trusts the client certificate `chain` (a root
    /// was removed): a connection it authenticated is then closed.
    pub async fn until_untrusted(&self, chain: &[CertificateDer<'static>]) {
        let mut bundles = self.bundles.subscribe();
        loop {
            if bundles.changed().await.is_err() {
                return std::future::pending().await;
            }
            if !self.trusts_client(chain) {
                return;
            }
        }
    }

    /// Whether the proxy can speak mTLS (it has a certificate and trust anchors).
    pub fn is_ready(&self) -> bool {
        self.leaf().is_some() && read(&self.trust).is_some()
    }

    /// The server configuration for meshed clients, once there are a certificate and anchors.
    pub fn server_config(&self) -> Option<Arc<ServerConfig>> {
        self.leaf()?;
        read(&self.trust).map(|t| t.server.clone())
    }

    /// The client configuration to reach `peer` carrying `alpn`, once there are a certificate
    /// and anchors; built once per pair and kept (session resumption lives in it).
    pub fn client_config(&self, peer: &Identity, alpn: Alpn) -> Option<Arc<ClientConfig>> {
        self.leaf()?;
        let trust = read(&self.trust)?;
        let mut clients = match trust.clients.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(c) = clients
            .get(peer)
            .and_then(|slot| slot[alpn.index()].as_ref())
        {
            return Some(c.clone());
        }
        let verifier = ServerIdVerifier::new(trust.roots.clone(), peer.clone());
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .ok()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(self.resolver.clone());
        config.alpn_protocols = vec![alpn.id().to_vec()];
        // The peer is named by the verifier, not by SNI: nothing about it goes out in clear.
        config.enable_sni = false;
        let config = Arc::new(config);
        if clients.len() >= 4096 {
            clients.clear();
        }
        clients.entry(peer.clone()).or_default()[alpn.index()] = Some(config.clone());
        Some(config)
    }
}
