//! The control plane as a certificate authority: `POST /v1/certify` (see [`crate::api`]), the
//! issuer and trust-anchor files followed on disk, and the control plane's own serving
//! certificate.
//!
//! A certify request is granted only when its bearer token verifies ([`crate::token`]; with
//! `--kubernetes`, a projected ServiceAccount token reviewed by the API server,
//! the Kubernetes module's TokenReview) and its CSR asks for exactly the token's identity
//! ([`Ca::certify`]). Every refusal is answered with a
//! JSON `{"error": ...}`, counted by reason in `outrider_control_certify_refused_total`, and
//! logged once with the reason and the identity the token claims (if it parses) — never the
//! token.
//!
//! The issuer files are polled every 2 s: a change that loads ([`Ca::load`]'s checks) replaces
//! the CA at once and reissues the serving certificate; one that does not is logged (once per
//! distinct problem) and the old CA stays in force. So roots rotate without a restart.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use bytes::Bytes;
use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::api::{ApiError, CertifyRequest, CertifyResponse, Identity};
use crate::ca::{Ca, CaError, CsrError};
use crate::token::{claimed_identity, TokenError, TokenKey};

/// The largest certify request body accepted, in bytes.
pub const MAX_CERTIFY_BODY: usize = 16 * 1024;
/// How long a certify request may take to send its body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the issuer files are checked.
const POLL: Duration = Duration::from_secs(2);

/// Why a certify request was refused: a metric label, bounded.
const REASONS: &[&str] = &[
    "no_token",
    "malformed_token",
    "bad_signature",
    "expired",
    "bad_identity",
    "bad_body",
    "bad_csr",
    "wrong_identity",
    "wrong_trust_domain",
    "review_rejected",
    "not_service_account",
    "pod_mismatch",
    "review_failed",
    "internal",
];

/// Where the CA comes from on disk: followed by [`Authority::follow`].
#[derive(Debug, Clone)]
pub struct CaPaths {
    /// The issuer certificate, optionally followed by more intermediates (PEM).
    pub issuer_cert: PathBuf,
    /// The issuer's key (PKCS#8 PEM).
    pub issuer_key: PathBuf,
    /// The trust anchors (PEM bundle).
    pub trust_anchors: PathBuf,
}

/// The certificate authority of a running control plane.
#[derive(Debug)]
pub struct Authority {
    ca: RwLock<Arc<Ca>>,
    tokens: TokenKey,
    lifetime: Duration,
    trust_domain: String,
    /// With `--kubernetes`: checks projected ServiceAccount tokens (set once, at start).
    reviewer: std::sync::OnceLock<Arc<dyn TokenReview>>,
    pub(crate) issued: IntCounter,
    pub(crate) refused: IntCounterVec,
    refusal_log: LogBudget,
}

/// Refusal lines logged per [`LogBudget::WINDOW`] at most: anyone who can reach the API can
/// make it refuse, and must not be able to flood the log (the count is in the metric).
#[derive(Debug, Default)]
pub(crate) struct LogBudget(std::sync::Mutex<Option<(std::time::Instant, u32, u64)>>);

impl LogBudget {
    /// The window.
    pub(crate) const WINDOW: Duration = Duration::from_secs(60);
    /// Lines per window.
    pub(crate) const LINES: u32 = 10;

    /// Whether a line may be logged at `now`, and how many were left out in the window that
    /// just ended (to be said once).
    pub(crate) fn take(&self, now: std::time::Instant) -> (bool, u64) {
        let mut state = match self.0.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let (start, logged, dropped) = state.get_or_insert((now, 0, 0));
        let mut missed = 0;
        if now.duration_since(*start) >= Self::WINDOW {
            missed = *dropped;
            (*start, *logged, *dropped) = (now, 0, 0);
        }
        if *logged < Self::LINES {
            *logged += 1;
            (true, missed)
        } else {
            *dropped += 1;
            (false, missed)
        }
    }
}

/// A refused certify request.
struct Refusal {
    status: StatusCode,
    reason: &'static str,
    message: String,
}

fn refusal(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason,
        message: message.into(),
    }
}

/// A JSON response.
pub(crate) fn json_response(
    status: StatusCode,
    body: &impl serde::Serialize,
) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(body).unwrap_or_else(|_| b"{\"error\":\"internal\"}".to_vec());
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    rsp
}

/// A JSON `{"error": ...}` response.
pub(crate) fn json_error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    json_response(
        status,
        &ApiError {
            error: message.into(),
        },
    )
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The bearer token of a request.
fn bearer(headers: &HeaderMap) -> Result<&str, Refusal> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(refusal(
            StatusCode::UNAUTHORIZED,
            "no_token",
            "missing authorization: Bearer TOKEN",
        ));
    };
    if values.next().is_some() {
        return Err(refusal(
            StatusCode::UNAUTHORIZED,
            "malformed_token",
            "more than one authorization header",
        ));
    }
    let value = value.to_str().unwrap_or("");
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(refusal(
            StatusCode::UNAUTHORIZED,
            "malformed_token",
            "the authorization header is not Bearer TOKEN",
        )),
    }
}

impl Authority {
    /// An authority issuing with `ca` for the identities of `trust_domain`, to holders of tokens
    /// from `tokens`, certificates valid for `lifetime`.
    pub fn new(
        ca: Ca,
        tokens: TokenKey,
        lifetime: Duration,
        trust_domain: String,
    ) -> anyhow::Result<Arc<Self>> {
        let issued = IntCounter::new(
            "outrider_control_certificates_issued_total",
            "Workload certificates issued",
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "outrider_control_certify_refused_total",
                "Certify requests refused, by reason",
            ),
            &["reason"],
        )?;
        for reason in REASONS {
            refused.with_label_values(&[reason]);
        }
        Ok(Arc::new(Self {
            ca: RwLock::new(Arc::new(ca)),
            tokens,
            lifetime,
            trust_domain,
            reviewer: std::sync::OnceLock::new(),
            issued,
            refused,
            refusal_log: LogBudget::default(),
        }))
    }

    /// Registers the certify metrics.
    pub(crate) fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.issued.clone()))?;
        registry.register(Box::new(self.refused.clone()))
    }

    /// The CA in force.
    pub fn ca(&self) -> Arc<Ca> {
        match self.ca.read() {
            Ok(ca) => ca.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Puts `ca` in force for the next request.
    pub fn replace_ca(&self, ca: Ca) {
        match self.ca.write() {
            Ok(mut current) => *current = Arc::new(ca),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(ca),
        }
    }

    /// The trust domain of the identities issued.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// A bootstrap token for `identity`, valid for `ttl`, minted with this authority's token key
    /// (for in-process callers such as the demo; others use `outrider control token`).
    pub fn mint_token(&self, identity: &Identity, ttl: Duration) -> String {
        self.tokens.mint(identity, ttl)
    }

    /// From now on, tokens that are not Outrider bootstrap tokens (`v1.`) are projected
    /// ServiceAccount tokens, checked with `reviewer` (see the Kubernetes module's TokenReview). Set
    /// once; a second call changes nothing.
    pub fn set_reviewer(&self, reviewer: Arc<dyn TokenReview>) {
        let _ = self.reviewer.set(reviewer);
    }

    /// The lifetime of the certificates issued.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Answers `POST /v1/certify` from `peer`.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let mut claimed = None;
        match self.certify(req, &mut claimed).await {
            Ok(rsp) => {
                self.issued.inc();
                tracing::info!(%peer, identity = %rsp.identity, not_after = rsp.not_after, "certificate issued");
                json_response(StatusCode::OK, &rsp)
            }
            Err(r) => {
                self.refused.with_label_values(&[r.reason]).inc();
                let claimed = claimed
                    .as_ref()
                    .map_or("-".to_string(), Identity::to_string);
                let (log, missed) = self.refusal_log.take(std::time::Instant::now());
                if missed > 0 {
                    tracing::warn!(
                        missed,
                        "certify refusals not logged in the last minute (at most {} lines a minute; all are counted in outrider_control_certify_refused_total)",
                        LogBudget::LINES
                    );
                }
                if log && r.status.is_server_error() {
                    tracing::error!(%peer, reason = r.reason, %claimed, "certify failed: {}", r.message);
                } else if log {
                    tracing::warn!(%peer, reason = r.reason, %claimed, "certify refused: {}", r.message);
                }
                json_error(r.status, r.message)
            }
        }
    }

    async fn certify(
        &self,
        req: Request<Incoming>,
        claimed: &mut Option<Identity>,
    ) -> Result<CertifyResponse, Refusal> {
        let token = bearer(req.headers())?;
        let identity = match self.reviewer.get() {
            Some(reviewer) if !crate::token::is_bootstrap_token(token) => {
                let identity = self.reviewed_identity(&**reviewer, token).await?;
                *claimed = Some(identity.clone());
                identity
            }
            _ => {
                *claimed = claimed_identity(token);
                self.tokens.verify(token, SystemTime::now()).map_err(|e| {
                    let reason = match e {
                        TokenError::Malformed(_) => "malformed_token",
                        TokenError::BadSignature => "bad_signature",
                        TokenError::Expired(_) => "expired",
                        TokenError::BadIdentity => "bad_identity",
                    };
                    refusal(StatusCode::UNAUTHORIZED, reason, e.to_string())
                })?
            }
        };
        if identity.trust_domain() != self.trust_domain {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                "wrong_trust_domain",
                format!(
                    "the token's identity {identity} is not in this control plane's trust domain \"{}\"",
                    self.trust_domain
                ),
            ));
        }
        let body = tokio::time::timeout(
            BODY_TIMEOUT,
            Limited::new(req.into_body(), MAX_CERTIFY_BODY).collect(),
        )
        .await
        .map_err(|_| {
            refusal(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "the body took too long",
            )
        })?
        .map_err(|e| {
            refusal(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("cannot read the body (at most {MAX_CERTIFY_BODY} bytes): {e}"),
            )
        })?
        .to_bytes();
        let request: CertifyRequest = serde_json::from_slice(&body).map_err(|e| {
            refusal(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!(
                    "the body is not {{\"csr\": \"<PEM>\"}}: {}",
                    shorten(&e.to_string())
                ),
            )
        })?;
        let ca = self.ca();
        let issued = ca
            .certify(&request.csr, &identity, self.lifetime)
            .map_err(|e| match e {
                CsrError::WrongIdentity { .. } => {
                    refusal(StatusCode::FORBIDDEN, "wrong_identity", e.to_string())
                }
                CsrError::Issue(_) => {
                    refusal(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                }
                _ => refusal(StatusCode::BAD_REQUEST, "bad_csr", e.to_string()),
            })?;
        Ok(CertifyResponse {
            identity,
            chain: issued.chain_pem,
            trust_anchors: ca.trust_anchors_pem().to_string(),
            not_before: unix(issued.not_before),
            not_after: unix(issued.not_after),
        })
    }

    /// The identity a projected ServiceAccount token is reviewed for.
    async fn reviewed_identity(
        &self,
        reviewer: &dyn TokenReview,
        token: &str,
    ) -> Result<Identity, Refusal> {
        let reviewed = reviewer.review(token).await.map_err(|e| match &e {
            ReviewError::Rejected(_) => {
                refusal(StatusCode::UNAUTHORIZED, "review_rejected", e.to_string())
            }
            ReviewError::NotServiceAccount(_) => {
                refusal(StatusCode::FORBIDDEN, "not_service_account", e.to_string())
            }
            ReviewError::Pod(_) => refusal(StatusCode::FORBIDDEN, "pod_mismatch", e.to_string()),
            ReviewError::Unavailable(_) => refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "review_failed",
                e.to_string(),
            ),
        })?;
        Identity::new(
            &self.trust_domain,
            &reviewed.namespace,
            &reviewed.service_account,
        )
        .map_err(|e| refusal(StatusCode::FORBIDDEN, "bad_identity", e.to_string()))
    }

    /// Follows the CA files (see the module docs); `texts` are the files' contents in force, and
    /// `serving` (if the control plane serves TLS) is reissued on every change and renewed
    /// before it expires.
    pub async fn follow(
        self: Arc<Self>,
        paths: Option<CaPaths>,
        mut texts: [String; 3],
        serving: Option<Arc<ServingCert>>,
    ) {
        let mut problem: Option<String> = None;
        loop {
            tokio::time::sleep(POLL).await;
            if let Some(paths) = paths.clone() {
                let previous = texts.clone();
                let read = tokio::task::spawn_blocking(
                    move || -> Result<Option<([String; 3], Ca)>, String> {
                        let read = |p: &PathBuf| {
                            std::fs::read_to_string(p)
                                .map_err(|e| format!("cannot read {}: {e}", p.display()))
                        };
                        let now = [
                            read(&paths.issuer_cert)?,
                            read(&paths.issuer_key)?,
                            read(&paths.trust_anchors)?,
                        ];
                        if now == previous {
                            return Ok(None);
                        }
                        let ca = Ca::load(&now[0], &now[1], &now[2])
                            .map_err(|e: CaError| e.to_string())?;
                        Ok(Some((now, ca)))
                    },
                )
                .await;
                match read {
                    Ok(Ok(None)) => problem = None,
                    Ok(Ok(Some((now, ca)))) => {
                        problem = None;
                        texts = now;
                        tracing::info!(
                            anchors = ca.trust_anchors().len(),
                            "issuer and trust anchors reloaded"
                        );
                        self.replace_ca(ca);
                        if let Some(serving) = &serving {
                            if let Err(e) = serving.reissue(&self.ca()) {
                                tracing::error!(error = %e, "cannot reissue the serving certificate");
                            }
                        }
                    }
                    Ok(Err(e)) => {
                        if problem.as_ref() != Some(&e) {
                            tracing::warn!(error = %e, "the issuer files changed but cannot be used; keeping the CA in force");
                            problem = Some(e);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "reading the issuer files failed"),
                }
            }
            if let Some(serving) = &serving {
                if serving.needs_renewal() {
                    match serving.reissue(&self.ca()) {
                        Ok(()) => tracing::info!("serving certificate renewed"),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot renew the serving certificate")
                        }
                    }
                }
            }
        }
    }
}

fn shorten(s: &str) -> String {
    crate::quoted::shorten_message(s, 200)
}

/// The control plane's own serving certificate, reissued by the CA before it expires (and when
/// the CA changes); handed to rustls per handshake.
#[derive(Debug)]
pub struct ServingCert {
    dns_names: Vec<String>,
    ips: Vec<IpAddr>,
    lifetime: Duration,
    current: RwLock<Arc<CertifiedKey>>,
    renew_at: Mutex<Instant>,
}

fn certified_key(
    ca: &Ca,
    names: &[String],
    ips: &[IpAddr],
    lifetime: Duration,
) -> Result<CertifiedKey, CaError> {
    let (chain_pem, key_pem) = ca.serving_cert(names, ips, lifetime)?;
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::Generate(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|_| CaError::Generate("the new serving key does not parse".into()))?;
    CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
        .map_err(|e| CaError::Generate(e.to_string()))
}

/// Half-way through a certificate from `ca` for `lifetime` (which the issuer's end may cut).
fn renew_at(ca: &Ca, lifetime: Duration) -> Instant {
    let left = ca
        .issuer_not_after()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    Instant::now() + lifetime.min(left) / 2
}

impl ServingCert {
    /// A serving certificate from `ca` for `dns_names` and `ips`, valid for `lifetime` and
    /// renewed at half of it.
    pub fn new(
        ca: &Ca,
        dns_names: Vec<String>,
        ips: Vec<IpAddr>,
        lifetime: Duration,
    ) -> Result<Arc<Self>, CaError> {
        let key = certified_key(ca, &dns_names, &ips, lifetime)?;
        Ok(Arc::new(Self {
            dns_names,
            ips,
            lifetime,
            current: RwLock::new(Arc::new(key)),
            renew_at: Mutex::new(renew_at(ca, lifetime)),
        }))
    }

    /// Issues a new certificate from `ca` and serves it from the next handshake on.
    pub fn reissue(&self, ca: &Ca) -> Result<(), CaError> {
        let key = Arc::new(certified_key(
            ca,
            &self.dns_names,
            &self.ips,
            self.lifetime,
        )?);
        match self.current.write() {
            Ok(mut current) => *current = key,
            Err(poisoned) => *poisoned.into_inner() = key,
        }
        if let Ok(mut at) = self.renew_at.lock() {
            *at = renew_at(ca, self.lifetime);
        }
        Ok(())
    }

    /// Whether half the lifetime has passed since the last issue.
    pub fn needs_renewal(&self) -> bool {
        self.renew_at
            .lock()
            .map_or(true, |at| Instant::now() >= *at)
    }

    /// A TLS 1.3 server config serving the current certificate.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(self.clone());
        Ok(Arc::new(config))
    }

    /// [`ServingCert::server_config`] that also asks clients for a certificate chaining to
    /// `authority`'s trust anchors in force (optional: a proxy certifies before it has one);
    /// each request carries what was presented (see [`crate::runtime::TlsPeer`]).
    pub fn server_config_for_proxies(
        self: &Arc<Self>,
        authority: Arc<Authority>,
    ) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(crate::peer::ClientVerifier::new(authority)))
        .with_cert_resolver(self.clone());
        Ok(Arc::new(config))
    }
}

impl ServingCert {
    /// The certificate and key served now.
    fn resolve_current(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(key) => key.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl rustls::server::ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.resolve_current())
    }
}

/// Checks a token that is not the control plane's own bootstrap token (with `--kubernetes`: a
/// projected ServiceAccount token, by the API server's TokenReview). The certificate names what
/// the review says, never what the caller claims.
pub trait TokenReview: Send + Sync + std::fmt::Debug {
    /// Reviews `token`: the service account it was issued for, or why not.
    fn review<'a>(
        &'a self,
        token: &'a str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Reviewed, ReviewError>> + Send + 'a>,
    >;
}

/// Who a reviewed token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    /// The service account's namespace.
    pub namespace: String,
    /// The service account.
    pub service_account: String,
}

/// Why a token was not accepted. Never holds the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    /// The API server does not authenticate the token (forged, expired, another audience).
    #[error("the API server's token review rejected the token: {0}")]
    Rejected(String),
    /// Authenticated, but not as a service account.
    #[error("the token authenticates {0}, not a service account")]
    NotServiceAccount(String),
    /// The token's pod is gone or runs under another account.
    #[error("{0}")]
    Pod(String),
    /// The review could not be made (API server unreachable, RBAC).
    #[error("the token review failed: {0}")]
    Unavailable(String),
}

impl crate::peer::CurrentCa for Authority {
    fn current_ca(&self) -> Arc<Ca> {
        self.ca()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_at_a_bounded_rate_and_the_rest_summed_up() {
        let budget = LogBudget::default();
        let t0 = std::time::Instant::now();
        let logged = (0..1000).filter(|_| budget.take(t0).0).count();
        assert_eq!(logged, LogBudget::LINES as usize);
        // The next window logs again, and says how many the last one left out.
        let (log, missed) = budget.take(t0 + LogBudget::WINDOW);
        assert!(log);
        assert_eq!(missed, 1000 - u64::from(LogBudget::LINES));
        assert_eq!(budget.take(t0 + LogBudget::WINDOW).1, 0, "said once");
    }
    use crate::client::{client_tls, Certifier, CertifyError, Watcher};
    use crate::mesh::{Mesh, DEMO_MESH};
    use crate::server::ControlPlane;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const WEB: &str = "spiffe://outrider.local/ns/demo/sa/web";
    const DB: &str = "spiffe://outrider.local/ns/demo/sa/db";
    const HOUR: Duration = Duration::from_secs(3600);

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    fn csr_for(uri: &str) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    /// A control plane with a fresh CA, serving TLS on loopback: its address, authority and
    /// trust anchors.
    async fn start(tokens: TokenKey) -> (SocketAddr, Arc<Authority>, String) {
        let ca = Ca::generate("outrider.local").unwrap();
        let anchors = ca.trust_anchors_pem().to_string();
        let authority = Authority::new(ca, tokens, HOUR, "outrider.local".into()).unwrap();
        let serving = ServingCert::new(
            &authority.ca(),
            vec!["localhost".into()],
            vec![IpAddr::from([127, 0, 0, 1])],
            HOUR,
        )
        .unwrap();
        let cp =
            ControlPlane::with_authority(Mesh::parse(DEMO_MESH).unwrap(), Some(authority.clone()))
                .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = serving
            .server_config_for_proxies(authority.clone())
            .unwrap();
        tokio::spawn(cp.serve_over(listener, Some(config)));
        (addr, authority, anchors)
    }

    /// One raw HTTP/1.1 request over TLS; the status and body.
    async fn raw(addr: SocketAddr, anchors: &str, request: String) -> (u16, String) {
        let tls = tokio_rustls::TlsConnector::from(client_tls(anchors).unwrap());
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut stream = tls.connect(name, tcp).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        let _ = stream.read_to_string(&mut out).await;
        let status = out[9..12].parse().unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    fn refused(authority: &Authority, reason: &str) -> u64 {
        authority.refused.with_label_values(&[reason]).get()
    }

    #[tokio::test]
    async fn certify_over_tls_grants_exactly_the_token_identity() {
        let key = TokenKey::generate().unwrap();
        let web = key.mint(&id(WEB), HOUR);
        let db = key.mint(&id(DB), HOUR);
        let expired = key.mint_at(&id(WEB), SystemTime::now() - Duration::from_secs(5));
        let foreign_td = key.mint(&id("spiffe://elsewhere/ns/demo/sa/web"), HOUR);
        let other_key = TokenKey::generate().unwrap().mint(&id(WEB), HOUR);
        let (addr, authority, anchors) = start(key).await;
        let certifier = Certifier::new(
            &format!("https://{addr}"),
            Some(client_tls(&anchors).unwrap()),
        )
        .unwrap();

        // 200: the chain names the identity and verifies against the anchors served.
        let rsp = certifier.certify(&web, &csr_for(WEB)).await.unwrap();
        assert_eq!(rsp.identity, id(WEB));
        assert_eq!(rsp.trust_anchors, anchors);
        assert!(rsp.not_after - rsp.not_before >= 3600 && rsp.not_after - rsp.not_before <= 3661);
        let chain: Vec<_> = CertificateDer::pem_slice_iter(rsp.chain.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let anchor_ders: Vec<_> = CertificateDer::pem_slice_iter(anchors.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        crate::ca::verify_chain(&anchor_ders, &chain, SystemTime::now()).unwrap();
        assert_eq!(authority.issued.get(), 1);

        // 403: a token for db cannot get web's certificate (nor web's token db's).
        let status = |e: CertifyError| match e {
            CertifyError::Refused { status, message } => (status.as_u16(), message),
            other => panic!("{other}"),
        };
        let (code, message) = status(certifier.certify(&db, &csr_for(WEB)).await.unwrap_err());
        assert_eq!(code, 403, "{message}");
        assert!(message.contains(DB) && message.contains(WEB), "{message}");
        assert!(!message.contains(&db), "the token leaked: {message}");
        let (code, _) = status(certifier.certify(&web, &csr_for(DB)).await.unwrap_err());
        assert_eq!(code, 403);
        assert_eq!(refused(&authority, "wrong_identity"), 2);
        let (code, _) = status(
            certifier
                .certify(&foreign_td, &csr_for("spiffe://elsewhere/ns/demo/sa/web"))
                .await
                .unwrap_err(),
        );
        assert_eq!(code, 403);
        assert_eq!(refused(&authority, "wrong_trust_domain"), 1);

        // 401: expired, another key, garbage, empty.
        for (token, reason) in [
            (expired.as_str(), "expired"),
            (other_key.as_str(), "bad_signature"),
            ("v1.garbage", "malformed_token"),
            ("", "malformed_token"),
        ] {
            let (code, message) =
                status(certifier.certify(token, &csr_for(WEB)).await.unwrap_err());
            assert_eq!(code, 401, "{reason}: {message}");
            assert!(refused(&authority, reason) >= 1, "{reason}");
        }

        // 400: a CSR that is not one, with a good token.
        let (code, message) = status(certifier.certify(&web, "not a csr").await.unwrap_err());
        assert_eq!(code, 400);
        assert!(message.contains("not PEM"), "{message}");
        assert_eq!(refused(&authority, "bad_csr"), 1);
        assert_eq!(authority.issued.get(), 1, "nothing else was issued");

        // Raw: no authorization header (401), a body that is not JSON (400), one too large
        // (400), GET (405); every error is JSON.
        let post = |auth: &str, body: &str| {
            format!(
                "POST /v1/certify HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        };
        let (code, body) = raw(addr, &anchors, post("", "{}")).await;
        assert_eq!(code, 401, "{body}");
        assert!(
            body.starts_with("{\"error\":\"missing authorization"),
            "{body}"
        );
        assert_eq!(refused(&authority, "no_token"), 1);
        let bearer = format!("Authorization: Bearer {web}\r\n");
        let (code, body) = raw(addr, &anchors, post(&bearer, "csr=1")).await;
        assert_eq!(code, 400, "{body}");
        assert!(body.contains("is not {\\\"csr\\\""), "{body}");
        let big = format!("{{\"csr\": \"{}\"}}", "A".repeat(MAX_CERTIFY_BODY));
        let (code, body) = raw(addr, &anchors, post(&bearer, &big)).await;
        assert_eq!(code, 400, "{body}");
        assert_eq!(refused(&authority, "bad_body"), 2);
        let (code, body) = raw(
            addr,
            &anchors,
            "GET /v1/certify HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(),
        )
        .await;
        assert_eq!(code, 405, "{body}");
        assert!(body.starts_with("{\"error\""), "{body}");
    }

    #[tokio::test]
    async fn watch_over_tls_and_wrong_anchors_fail() {
        let (addr, authority, anchors) = start(TokenKey::generate().unwrap()).await;
        let base = format!("https://{addr}");
        let loadgen = client_with_cert(&anchors, &authority.ca(), LOADGEN);
        let watcher = Watcher::new(
            &base,
            "demo/loadgen".parse().unwrap(),
            Duration::from_secs(1),
            Some(loadgen),
        )
        .unwrap();
        let view = watcher.poll(None).await.unwrap().unwrap();
        assert_eq!(view.trust_domain, "outrider.local");
        // Another CA's roots do not accept the control plane's certificate.
        let foreign = Ca::generate("outrider.local").unwrap();
        let watcher = Watcher::new(
            &base,
            "demo/loadgen".parse().unwrap(),
            Duration::from_secs(1),
            Some(client_tls(foreign.trust_anchors_pem()).unwrap()),
        )
        .unwrap();
        let e = watcher.poll(None).await.unwrap_err().to_string();
        assert!(
            e.contains("UnknownIssuer") || e.contains("certificate"),
            "{e}"
        );
    }

    const LOADGEN: &str = "spiffe://outrider.local/ns/demo/sa/loadgen";

    /// A TLS client trusting `anchors` that presents a certificate for `identity` from `ca`.
    fn client_with_cert(anchors: &str, ca: &Ca, identity: &str) -> Arc<rustls::ClientConfig> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(identity.try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let issued = ca.certify(&csr, &id(identity), HOUR).unwrap();
        let chain = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(anchors.as_bytes()) {
            roots.add(root.unwrap()).unwrap();
        }
        let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
        Arc::new(config)
    }

    /// The status and body of one watch of `workload` with `tls`.
    async fn watch_status(base: &str, workload: &str, tls: Arc<rustls::ClientConfig>) -> String {
        let watcher = Watcher::new(
            base,
            workload.parse().unwrap(),
            Duration::from_secs(1),
            Some(tls),
        )
        .unwrap();
        match watcher.poll(None).await {
            Ok(Some(view)) => format!("200 {}", view.workload),
            Ok(None) => "304".into(),
            Err(crate::client::WatchError::Status { status, body }) => {
                format!("{} {body}", status.as_u16())
            }
            Err(e) => format!("error {e}"),
        }
    }

    #[tokio::test]
    async fn over_tls_a_proxy_watches_only_its_own_workload_with_its_mesh_certificate() {
        let (addr, authority, anchors) = start(TokenKey::generate().unwrap()).await;
        let base = format!("https://{addr}");
        let ca = authority.ca();
        let loadgen = client_with_cert(&anchors, &ca, LOADGEN);
        let payments = client_with_cert(
            &anchors,
            &ca,
            "spiffe://outrider.local/ns/demo/sa/payments-api",
        );
        // Its own view, and only its own: payments-api's policy is not loadgen's to read, nor
        // loadgen's calls payments-api's.
        assert_eq!(
            watch_status(&base, "demo/loadgen", loadgen.clone()).await,
            "200 demo/loadgen"
        );
        assert_eq!(
            watch_status(&base, "demo/payments-api", payments.clone()).await,
            "200 demo/payments-api"
        );
        let refused = watch_status(&base, "demo/payments-api", loadgen).await;
        assert!(
            refused.starts_with("403 spiffe://outrider.local/ns/demo/sa/loadgen may not watch workload \"demo/payments-api\""),
            "{refused}"
        );
        let refused = watch_status(&base, "demo/loadgen", payments).await;
        assert!(refused.starts_with("403 "), "{refused}");
        // No certificate: 401, saying to certify first.
        let anonymous = watch_status(&base, "demo/loadgen", client_tls(&anchors).unwrap()).await;
        assert!(
            anonymous.starts_with("401 ") && anonymous.contains("certify first"),
            "{anonymous}"
        );
        // A certificate from another CA for the right identity: the handshake fails.
        let foreign = Ca::generate("outrider.local").unwrap();
        let forged = client_with_cert(&anchors, &foreign, LOADGEN);
        let e = watch_status(&base, "demo/loadgen", forged).await;
        assert!(e.starts_with("error control plane unreachable"), "{e}");
        // Certify still works without a certificate (a proxy's bootstrap).
        let token = authority.mint_token(&id(LOADGEN), HOUR);
        let certifier = Certifier::new(&base, Some(client_tls(&anchors).unwrap())).unwrap();
        assert!(certifier.certify(&token, &csr_for(LOADGEN)).await.is_ok());
    }

    #[tokio::test]
    async fn a_control_plane_without_a_ca_answers_404_in_json() {
        let cp = ControlPlane::new(Mesh::parse(DEMO_MESH).unwrap()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(cp.serve(listener));
        let certifier = Certifier::new(&format!("http://{addr}"), None).unwrap();
        match certifier.certify("v1.x.y", &csr_for(WEB)).await {
            Err(CertifyError::Refused { status, message }) => {
                assert_eq!(status, StatusCode::NOT_FOUND);
                assert!(message.contains("issues no certificates"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// An authority for outrider.local with `ca` and a random token key.
    fn authority(ca: Ca) -> Arc<Authority> {
        Authority::new(
            ca,
            TokenKey::generate().unwrap(),
            HOUR,
            "outrider.local".into(),
        )
        .unwrap()
    }

    /// Certificate `i` of the serving chain (0: the leaf, 1: its issuer), DER.
    fn served(serving: &ServingCert, i: usize) -> Vec<u8> {
        let key = serving.resolve_current();
        key.cert[i].as_ref().to_vec()
    }

    fn served_issuer(serving: &ServingCert) -> Vec<u8> {
        served(serving, 1)
    }

    #[tokio::test(start_paused = true)]
    async fn follow_reloads_good_issuer_files_and_keeps_the_ca_on_bad_ones() {
        use crate::ca::CaFiles;
        let dir = std::env::temp_dir().join(format!("outrider-authority-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let paths = CaPaths {
            issuer_cert: dir.join("issuer.pem"),
            issuer_key: dir.join("issuer-key.pem"),
            trust_anchors: dir.join("roots.pem"),
        };
        let write = |files: &CaFiles, roots: &str| {
            std::fs::write(&paths.issuer_cert, &files.issuer_pem).unwrap();
            std::fs::write(&paths.issuer_key, &files.issuer_key_pem).unwrap();
            std::fs::write(&paths.trust_anchors, roots).unwrap();
        };
        let old = CaFiles::generate("outrider.local", 10 * HOUR, 5 * HOUR).unwrap();
        let new = CaFiles::generate("outrider.local", 10 * HOUR, 5 * HOUR).unwrap();
        write(&old, &old.root_pem);
        let ca = Ca::load(&old.issuer_pem, &old.issuer_key_pem, &old.root_pem).unwrap();
        let texts = [
            old.issuer_pem.clone(),
            old.issuer_key_pem.clone(),
            old.root_pem.clone(),
        ];
        let authority = authority(ca);
        let serving =
            ServingCert::new(&authority.ca(), vec!["localhost".into()], vec![], HOUR).unwrap();
        let first_issuer = served_issuer(&serving);
        let follower = tokio::spawn(authority.clone().follow(
            Some(paths.clone()),
            texts,
            Some(serving.clone()),
        ));
        let anchors = || authority.ca().trust_anchors_pem().to_string();
        // Step 1: the new root joins the bundle (the old issuer stays): reloaded.
        let bundle = format!("{}{}", old.root_pem, new.root_pem);
        write(&old, &bundle);
        for _ in 0..50 {
            if authority.ca().trust_anchors().len() == 2 {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        assert_eq!(
            authority.ca().trust_anchors().len(),
            2,
            "the bundle was not reloaded"
        );
        // A bad write (the new issuer's key with the old issuer) is refused; the CA stays.
        let before = anchors();
        std::fs::write(&paths.issuer_key, &new.issuer_key_pem).unwrap();
        tokio::time::sleep(POLL * 3).await;
        assert_eq!(anchors(), before);
        assert_eq!(served_issuer(&serving), first_issuer);
        // Step 2: switch to the new issuer: reloaded, and the serving certificate follows.
        write(&new, &bundle);
        for _ in 0..50 {
            if served_issuer(&serving) != first_issuer {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        assert!(served_issuer(&serving) != first_issuer, "not reissued");
        assert_eq!(authority.ca().issuer_chain_pem(), new.issuer_pem);
        // Step 3: the old root leaves the bundle.
        write(&new, &new.root_pem);
        for _ in 0..50 {
            if authority.ca().trust_anchors().len() == 1 {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        assert_eq!(authority.ca().trust_anchors_pem(), new.root_pem);
        follower.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(start_paused = true)]
    async fn the_serving_certificate_is_renewed_at_half_its_lifetime() {
        let ca = Ca::generate("outrider.local").unwrap();
        let authority = authority(ca);
        let serving =
            ServingCert::new(&authority.ca(), vec!["localhost".into()], vec![], 10 * POLL).unwrap();
        let first = served(&serving, 0);
        assert!(!serving.needs_renewal());
        let follower = tokio::spawn(authority.clone().follow(
            None,
            Default::default(),
            Some(serving.clone()),
        ));
        tokio::time::sleep(POLL * 7).await;
        let now = served(&serving, 0);
        assert!(
            now != first,
            "not renewed after more than half its lifetime"
        );
        follower.abort();
    }

    #[test]
    fn schemes_must_agree_with_tls() {
        let ca = Ca::generate("outrider.local").unwrap();
        let tls = client_tls(ca.trust_anchors_pem()).unwrap();
        use crate::client::ControlUrlError;
        assert!(matches!(
            Certifier::new("https://127.0.0.1:1", None),
            Err(ControlUrlError::HttpsWithoutTls { .. })
        ));
        assert!(matches!(
            Certifier::new("http://127.0.0.1:1", Some(tls.clone())),
            Err(ControlUrlError::TlsWithoutHttps { .. })
        ));
        assert!(Certifier::new("https://control:15012", Some(tls)).is_ok());
        assert!(Certifier::new("http://127.0.0.1:1", None).is_ok());
        assert!(client_tls("nothing").is_err());
        assert!(client_tls("").is_err());
    }
}
