//! The proxy's side of the control plane's API: the watch (one long-poll request at a time, and a
//! jittered exponential backoff for when the control plane is unreachable) and the certify
//! request ([`Certifier`]). The caller keeps the last good view; a failed or malformed answer
//! never replaces it.
//!
//! Both speak `https://` (TLS 1.3, the control plane's certificate verified against the trust
//! anchors given to [`client_tls`], by the URL's host name or IP) or, for local development only,
//! `http://`; the scheme must agree with whether a TLS config is given.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use crate::api::{
    ApiError, CertifyRequest, CertifyResponse, WatchResponse, WorkloadId, CERTIFY_PATH, WATCH_PATH,
};
use crate::duration;
use crate::quoted::Quoted;
use crate::runtime::Chain;

/// Largest watch response accepted.
const MAX_BODY: usize = crate::api::MAX_VIEW_BYTES;
/// Largest error explanation kept (it is logged and shown on `/config`).
const MAX_ERROR_BODY: usize = 1024;

/// Why a watch request failed.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The control plane could not be reached or the connection broke.
    #[error("control plane unreachable: {0}")]
    Unreachable(String),
    /// It answered, but not with a view (4xx/5xx).
    #[error("control plane answered {status}: {body}")]
    Status {
        /// The status.
        status: StatusCode,
        /// Its explanation.
        body: String,
    },
    /// The answer was not a valid view.
    #[error("control plane sent an invalid view: {0}")]
    Invalid(String),
}

/// Why a control-plane URL was refused. The messages name no flag: the caller adds it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlUrlError {
    /// Not a URL at all.
    #[error("{url} is not a URL ({reason}): expected https://HOST:PORT (or http:// for local development)")]
    Malformed {
        /// The input, quoted and cut to a readable length.
        url: String,
        /// What the URL parser said.
        reason: String,
    },
    /// Not `http://` or `https://` with a host and port.
    #[error("{url}: expected https://HOST:PORT (or http:// for local development)")]
    NotHttp {
        /// The input, quoted and cut to a readable length.
        url: String,
    },
    /// `https://` without trust anchors to verify the control plane with.
    #[error("{url}: https needs trust anchors to verify the control plane's certificate")]
    HttpsWithoutTls {
        /// The input, quoted and cut to a readable length.
        url: String,
    },
    /// `http://` with trust anchors: plaintext would ignore them.
    #[error("{url}: trust anchors are given but the URL is plaintext http://; use https://")]
    TlsWithoutHttps {
        /// The input, quoted and cut to a readable length.
        url: String,
    },
    /// User and password in the URL (not quoted here, so the password is not echoed).
    #[error("credentials in the URL are not supported (they would show on /config)")]
    Credentials,
    /// A path or query: the watch API's path is fixed, and a query (a token, say) would show on
    /// `/config`.
    #[error("{url}: a path or query is not supported: expected https://HOST:PORT")]
    PathOrQuery {
        /// The input, quoted and cut to a readable length.
        url: String,
    },
}

/// A watch client for one workload.
#[derive(Debug, Clone)]
pub struct Watcher {
    client: Client<Connector, Empty<Bytes>>,
    base: Uri,
    workload: WorkloadId,
    wait: Duration,
}

/// Checks a control-plane URL: `https://HOST:PORT` with `tls`, `http://HOST:PORT` without.
fn parse_base(base: &str, tls: bool) -> Result<Uri, ControlUrlError> {
    let shown = || Quoted(base).to_string();
    let uri: Uri = base.parse().map_err(|e: http::uri::InvalidUri| {
        if base.contains('@') {
            ControlUrlError::Credentials
        } else {
            ControlUrlError::Malformed {
                url: shown(),
                reason: e.to_string(),
            }
        }
    })?;
    let Some(authority) = uri.authority() else {
        return Err(ControlUrlError::NotHttp { url: shown() });
    };
    if authority.as_str().contains('@') {
        return Err(ControlUrlError::Credentials);
    }
    if !matches!(uri.scheme_str(), Some("http" | "https")) || authority.host().is_empty() {
        return Err(ControlUrlError::NotHttp { url: shown() });
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(ControlUrlError::PathOrQuery { url: shown() });
    }
    match (uri.scheme_str(), tls) {
        (Some("https"), false) => Err(ControlUrlError::HttpsWithoutTls { url: shown() }),
        (Some("http"), true) => Err(ControlUrlError::TlsWithoutHttps { url: shown() }),
        _ => Ok(uri),
    }
}

/// A pooled HTTP/1.1 client over [`Connector`].
fn http_client<B>(tls: Option<Arc<rustls::ClientConfig>>) -> Client<Connector, B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(2)));
    http.set_nodelay(true);
    http.enforce_http(false);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .build(Connector {
            http,
            tls: tls.map(tokio_rustls::TlsConnector::from),
        })
}

impl Watcher {
    /// A watcher of `workload` against the control plane at `base` (`https://HOST:PORT` with
    /// `tls`, e.g. from [`client_tls`]; `http://HOST:PORT` without, for local development),
    /// asking it to hold each request up to `wait`.
    pub fn new(
        base: &str,
        workload: WorkloadId,
        wait: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, ControlUrlError> {
        let base = parse_base(base, tls.is_some())?;
        let client = http_client(tls);
        Ok(Self {
            client,
            base,
            workload,
            wait,
        })
    }

    /// The workload watched.
    pub fn workload(&self) -> &WorkloadId {
        &self.workload
    }

    /// One long poll: `Ok(Some(view))` for a new view, `Ok(None)` when nothing changed within the
    /// wait.
    pub async fn poll(&self, version: Option<&str>) -> Result<Option<WatchResponse>, WatchError> {
        let authority = self
            .base
            .authority()
            .map(|a| a.as_str())
            .unwrap_or_default();
        let scheme = self.base.scheme_str().unwrap_or("http");
        let uri = format!(
            "{scheme}://{authority}{WATCH_PATH}?workload={}&version={}&wait={}",
            self.workload,
            version.unwrap_or(""),
            duration::format(self.wait)
        );
        let uri: Uri = uri
            .parse()
            .map_err(|e| WatchError::Invalid(format!("{e}")))?;
        // One deadline for the whole exchange, head and body: a peer that stalls mid-body must
        // not freeze the watch.
        let exchange = async {
            let rsp = self
                .client
                .get(uri)
                .await
                .map_err(|e| WatchError::Unreachable(Chain(&e).to_string()))?;
            let status = rsp.status();
            let limit = if status == StatusCode::OK {
                MAX_BODY
            } else {
                MAX_ERROR_BODY
            };
            let body = match Limited::new(rsp.into_body(), limit).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) if status == StatusCode::OK => {
                    return Err(WatchError::Unreachable(e.to_string()))
                }
                Err(_) => Bytes::from_static(b"(long error body cut)"),
            };
            Ok((status, body))
        };
        let (status, body) = tokio::time::timeout(self.wait + Duration::from_secs(10), exchange)
            .await
            .map_err(|_| WatchError::Unreachable("no complete answer in time".into()))??;
        match status {
            StatusCode::NOT_MODIFIED => Ok(None),
            StatusCode::OK => {
                let view: WatchResponse = serde_json::from_slice(&body)
                    .map_err(|e| WatchError::Invalid(e.to_string()))?;
                if view.workload != self.workload {
                    return Err(WatchError::Invalid(format!(
                        "a view for {} instead of {}",
                        view.workload, self.workload
                    )));
                }
                // The version goes back into the next URL: it must be what the API promises.
                let v = &view.version;
                if v.is_empty()
                    || v.len() > 64
                    || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                {
                    return Err(WatchError::Invalid(format!("malformed version {v:?}")));
                }
                Ok(Some(view))
            }
            status => Err(WatchError::Status {
                status,
                body: String::from_utf8_lossy(&body).trim().to_string(),
            }),
        }
    }
}

/// Why a certify request failed. No variant contains the token.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    /// The control plane answered with a refusal (4xx) or failed (5xx).
    #[error("the control plane refused the certificate request ({status}): {message}")]
    Refused {
        /// The status: 400 bad CSR, 401 bad token, 403 another identity, 5xx its failure.
        status: StatusCode,
        /// Its explanation.
        message: String,
    },
    /// The control plane could not be reached, or the connection broke.
    #[error("control plane unreachable: {0}")]
    Unreachable(String),
    /// The answer was not a valid certify response.
    #[error("the control plane sent an invalid certify response: {0}")]
    Invalid(String),
}

/// Why trust anchors cannot verify the control plane.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("trust anchors: {0}")]
pub struct TrustAnchorsError(String);

/// A TLS 1.3 client config that verifies servers against the PEM `trust_anchors_pem` (one or
/// more roots) by name: webpki's standard server verification.
pub fn client_tls(trust_anchors_pem: &str) -> Result<Arc<rustls::ClientConfig>, TrustAnchorsError> {
    let certs = CertificateDer::pem_slice_iter(trust_anchors_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrustAnchorsError(format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TrustAnchorsError(
            "no PEM certificate (-----BEGIN CERTIFICATE-----) found".into(),
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| TrustAnchorsError(format!("certificate {} is unusable: {e}", i + 1)))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| TrustAnchorsError(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Largest certify response accepted.
const MAX_CERTIFY_RESPONSE: usize = 256 * 1024;
/// How long one certify exchange may take.
const CERTIFY_TIMEOUT: Duration = Duration::from_secs(15);

/// A client of `POST /v1/certify`.
#[derive(Debug, Clone)]
pub struct Certifier {
    client: Client<Connector, Full<Bytes>>,
    uri: Uri,
}

impl Certifier {
    /// A certifier against the control plane at `base` (`https://HOST:PORT` with `tls`,
    /// `http://HOST:PORT` without).
    pub fn new(
        base: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, ControlUrlError> {
        let base = parse_base(base, tls.is_some())?;
        let uri = format!(
            "{}://{}{CERTIFY_PATH}",
            base.scheme_str().unwrap_or("http"),
            base.authority().map(|a| a.as_str()).unwrap_or_default()
        )
        .parse()
        .map_err(|e: http::uri::InvalidUri| ControlUrlError::Malformed {
            url: Quoted(&base.to_string()).to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            client: http_client(tls),
            uri,
        })
    }

    /// Sends `csr_pem` with the bearer `token`; the answer is the issued chain and the trust
    /// anchors.
    pub async fn certify(
        &self,
        token: &str,
        csr_pem: &str,
    ) -> Result<CertifyResponse, CertifyError> {
        let body = serde_json::to_vec(&CertifyRequest {
            csr: csr_pem.to_string(),
        })
        .map_err(|e| CertifyError::Invalid(e.to_string()))?;
        let mut authorization =
            header::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                CertifyError::Refused {
                    status: StatusCode::UNAUTHORIZED,
                    message: "the token has characters not allowed in a header".into(),
                }
            })?;
        authorization.set_sensitive(true);
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, authorization)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| CertifyError::Invalid(e.to_string()))?;
        let exchange = async {
            let rsp = self
                .client
                .request(req)
                .await
                .map_err(|e| CertifyError::Unreachable(Chain(&e).to_string()))?;
            let status = rsp.status();
            let body = Limited::new(rsp.into_body(), MAX_CERTIFY_RESPONSE)
                .collect()
                .await
                .map_err(|e| CertifyError::Unreachable(e.to_string()))?
                .to_bytes();
            Ok::<_, CertifyError>((status, body))
        };
        let (status, body) = tokio::time::timeout(CERTIFY_TIMEOUT, exchange)
            .await
            .map_err(|_| CertifyError::Unreachable("no complete answer in time".into()))??;
        if status != StatusCode::OK {
            let message = serde_json::from_slice::<ApiError>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_string());
            let mut message = crate::quoted::shorten_message(&message, MAX_ERROR_BODY);
            if !token.is_empty() && message.contains(token) {
                message = message.replace(token, "<token>");
            }
            return Err(CertifyError::Refused { status, message });
        }
        let rsp: CertifyResponse =
            serde_json::from_slice(&body).map_err(|e| CertifyError::Invalid(e.to_string()))?;
        if !rsp.chain.contains("-----BEGIN CERTIFICATE-----") {
            return Err(CertifyError::Invalid(
                "the chain holds no certificate".into(),
            ));
        }
        Ok(rsp)
    }
}

/// Connects to the control plane: TCP (hyper-util's connector), then TLS when configured, with
/// the URL's host (DNS name or IP) as the server name to verify.
#[derive(Clone)]
struct Connector {
    http: HttpConnector,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut http = self.http.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or("the URL has no host")?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let tcp = http.call(uri).await?;
            let Some(tls) = tls else {
                return Ok(Conn::Plain(tcp));
            };
            let name = ServerName::try_from(host)?;
            let stream = tls.connect(name, tcp.into_inner()).await?;
            Ok(Conn::Tls(Box::new(TokioIo::new(stream))))
        })
    }
}

/// A connection to the control plane, plain or TLS.
#[derive(Debug)]
enum Conn {
    /// Plain TCP (local development).
    Plain(TokioIo<TcpStream>),
    /// TLS over TCP.
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Exponential backoff with full jitter: each delay is uniform in `[min, cap]` (whole
/// milliseconds), the cap doubling from `min` up to `max` after every failure, and reset by
/// [`Backoff::reset`].
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    cap: Duration,
    rng: fastrand::Rng,
}

impl Backoff {
    /// A backoff between `min` and `max`, randomly seeded (so proxies that lost the control plane
    /// together do not retry together).
    pub fn new(min: Duration, max: Duration) -> Self {
        Self::with_rng(min, max, fastrand::Rng::new())
    }

    /// A backoff between `min` and `max` whose delays follow from `seed` (for tests).
    pub fn with_seed(min: Duration, max: Duration, seed: u64) -> Self {
        Self::with_rng(min, max, fastrand::Rng::with_seed(seed))
    }

    fn with_rng(min: Duration, max: Duration, rng: fastrand::Rng) -> Self {
        Self {
            min,
            max: max.max(min),
            cap: min,
            rng,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let span = u64::try_from(self.cap.saturating_sub(self.min).as_millis()).unwrap_or(u64::MAX);
        let delay = self.min + Duration::from_millis(self.rng.u64(0..=span));
        self.cap = self.cap.saturating_mul(2).min(self.max);
        delay
    }

    /// Back to the shortest delay (after a success).
    pub fn reset(&mut self) {
        self.cap = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut b = Backoff::with_seed(min, max, 7);
        let delays: Vec<_> = (0..12).map(|_| b.next_delay()).collect();
        // Each delay stays under its cap: min, 2 min, 4 min, ... up to max.
        for (i, d) in delays.iter().enumerate() {
            let cap = (min * 2u32.pow(i as u32)).min(max);
            assert!(*d >= min && *d <= cap, "delay {i} = {d:?} over {cap:?}");
        }
        // The caps grow: the late delays spread over [min, max], not [min, 2 min].
        assert!(delays[6..].iter().any(|d| *d > 4 * min), "{delays:?}");
        // Jitter: not all the same once the cap is above min.
        assert!(delays[1..].windows(2).any(|w| w[0] != w[1]), "{delays:?}");
        b.reset();
        assert_eq!(b.next_delay(), min);
        // The same seed gives the same delays; another seed others.
        let again: Vec<_> = {
            let mut b = Backoff::with_seed(min, max, 7);
            (0..12).map(|_| b.next_delay()).collect()
        };
        assert_eq!(again, delays);
        let mut other = Backoff::with_seed(min, max, 8);
        let other: Vec<_> = (0..12).map(|_| other.next_delay()).collect();
        assert_ne!(other, delays);
    }

    #[test]
    fn backoff_with_equal_bounds_or_huge_max_is_sane() {
        let mut b = Backoff::with_seed(100 * MS, 100 * MS, 1);
        assert!((0..5).all(|_| b.next_delay() == 100 * MS));
        let mut b = Backoff::with_seed(MS, Duration::MAX, 1);
        for _ in 0..200 {
            let _ = b.next_delay();
        }
        let mut b = Backoff::with_seed(100 * MS, MS, 1);
        assert_eq!(b.next_delay(), 100 * MS, "max below min acts as min");
    }

    #[test]
    fn bad_urls_are_refused_without_naming_a_flag() {
        let w: WorkloadId = "a/b".parse().unwrap();
        let new =
            |url: &str| Watcher::new(url, w.clone(), Duration::from_secs(1), None).map(|_| ());
        assert!(matches!(
            new("ftp://x:1"),
            Err(ControlUrlError::NotHttp { .. })
        ));
        assert!(matches!(
            new("127.0.0.1:1"),
            Err(ControlUrlError::NotHttp { .. })
        ));
        assert!(matches!(
            new("not a url"),
            Err(ControlUrlError::Malformed { .. })
        ));
        assert_eq!(
            new("http://u:p@127.0.0.1:1"),
            Err(ControlUrlError::Credentials)
        );
        assert!(matches!(
            new("http://127.0.0.1:1/v1?token=abc"),
            Err(ControlUrlError::PathOrQuery { .. })
        ));
        assert!(matches!(
            new("http://127.0.0.1:1?token=abc"),
            Err(ControlUrlError::PathOrQuery { .. })
        ));
        for url in ["ftp://x:1", "not a url", "http://u:p@h:1", "http://h:1/x"] {
            let e = new(url).unwrap_err().to_string();
            assert!(!e.contains("--"), "{url}: {e}");
            assert!(!e.contains("u:p"), "{url}: {e}");
        }
        let e = new(&format!("ftp://{}", "h".repeat(10_000))).unwrap_err();
        assert!(e.to_string().len() < 300, "{e}");
        assert!(new("http://127.0.0.1:15012").is_ok());
        assert!(new("http://127.0.0.1:15012/").is_ok());
        let watcher = Watcher::new(
            "http://control:15012",
            w.clone(),
            Duration::from_secs(1),
            None,
        );
        assert_eq!(watcher.unwrap().workload(), &w);
    }
}
