//! The control plane as a certificate authority: `POST /v1/certify` (see [`crate::api`]), the
//! issuer and trust-anchor files followed on disk, and the control plane's own serving
//! certificate.
//!
//! A certify request is granted only when its bearer token verifies ([`crate::token`]) and its
//! CSR asks for exactly the token's identity ([`Ca::certify`]). Every refusal is answered with a
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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
    pub(crate) issued: IntCounter,
    pub(crate) refused: IntCounterVec,
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
            issued,
            refused,
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
                if r.status.is_server_error() {
                    tracing::error!(%peer, reason = r.reason, %claimed, "certify failed: {}", r.message);
                } else {
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
        *claimed = claimed_identity(token);
        let identity = self.tokens.verify(token, SystemTime::now()).map_err(|e| {
            let reason = match e {
                TokenError::Malformed(_) => "malformed_token",
                TokenError::BadSignature => "bad_signature",
                TokenError::Expired(_) => "expired",
                TokenError::BadIdentity => "bad_identity",
            };
            refusal(StatusCode::UNAUTHORIZED, reason, e.to_string())
        })?;
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
            renew_at: Mutex::new(Instant::now() + lifetime / 2),
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
            *at = Instant::now() + self.lifetime / 2;
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
}

impl rustls::server::ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(match self.current.read() {
            Ok(key) => key.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        })
    }
}
