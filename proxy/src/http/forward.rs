//! The innermost HTTP service: forwards a request to one upstream address over a pooled
//! hyper-util client and returns its response.
//!
//! Each upstream address has its own client (one for HTTP/1, one for HTTP/2), shared by every
//! connection and worker, so idle upstream connections are reused across downstream connections.
//! The client's connector ignores the URI and always dials the upstream address: the request keeps
//! its own `Host` / `:authority`, as a transparent proxy must.
//!
//! Failures are returned as [`ProxyError`]s (connect vs. upstream) for the rescue layer to answer.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, Scheme, Uri};
use http::{Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::detect::Protocol;
use crate::drain;
use crate::errors::{ProxyError, Reason, RspBody};
use crate::http::headers::{is_upgrade, strip_hop_by_hop};
use crate::layers::router::Dispatch;

/// A boxed error, the error type inside the request stack.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A pooled client for one upstream address.
pub type HttpClient = Client<Connector, Incoming>;

/// Most upstream addresses with a live client; past it the table is cleared (idle pooled
/// connections then close on their own). Bounds memory when outbound traffic fans out widely.
const MAX_UPSTREAMS: usize = 4096;

/// The table of pooled clients, keyed by upstream address and protocol.
#[derive(Debug)]
pub struct Upstreams {
    clients: Mutex<HashMap<(SocketAddr, bool), HttpClient>>,
    connect_timeout: Duration,
}

impl Upstreams {
    /// An empty table whose clients use `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            clients: Mutex::new(HashMap::new()),
            connect_timeout,
        }
    }

    /// The client for `target` speaking `protocol` (HTTP/2 when `Protocol::Http2`). Called once
    /// per downstream connection, not per request.
    pub fn client(&self, target: SocketAddr, protocol: Protocol) -> HttpClient {
        let h2 = protocol == Protocol::Http2;
        let mut clients = match self.clients.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if clients.len() >= MAX_UPSTREAMS && !clients.contains_key(&(target, h2)) {
            clients.clear();
        }
        clients
            .entry((target, h2))
            .or_insert_with(|| {
                let connector = Connector {
                    target,
                    timeout: self.connect_timeout,
                };
                Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .pool_idle_timeout(Duration::from_secs(90))
                    .http2_only(h2)
                    .build(connector)
            })
            .clone()
    }
}

/// Dials one fixed upstream address, whatever the URI says.
#[derive(Debug, Clone)]
pub struct Connector {
    target: SocketAddr,
    timeout: Duration,
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (target, timeout) = (self.target, self.timeout);
        Box::pin(async move { crate::tcp::connect(target, timeout).await.map(TokioIo::new) })
    }
}

/// Forwards requests to one upstream address.
#[derive(Clone)]
pub struct Forward {
    inner: Arc<Inner>,
}

struct Inner {
    client: HttpClient,
    /// The HTTP version spoken upstream.
    version: http::Version,
    authority: Authority,
    drain: drain::Watch,
}

impl Forward {
    /// Forwards to `target` over `client`. Upgraded (WebSocket) streams hold `drain` until closed.
    pub fn new(
        client: HttpClient,
        upstream: Protocol,
        target: SocketAddr,
        drain: drain::Watch,
    ) -> Result<Self, ProxyError> {
        let authority = Authority::try_from(target.to_string())
            .map_err(|e| ProxyError::new(Reason::BadRequest, e))?;
        let version = if upstream == Protocol::Http2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                version,
                authority,
                drain,
            }),
        })
    }
}

impl tower::Service<Request<Incoming>> for Forward {
    type Response = Response<RspBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let inner = self.inner.clone();
        // Method and version only: paths and header values may carry secrets.
        let span =
            tracing::debug_span!("request", method = %req.method(), version = ?req.version());
        let fut = async move {
            let upgrade = (req.version() <= http::Version::HTTP_11 && is_upgrade(req.headers()))
                .then(|| hyper::upgrade::on(&mut req));
            strip_hop_by_hop(req.headers_mut(), upgrade.is_some());
            set_upstream_uri(&mut req, &inner.authority)?;
            // The router's choice of endpoint (and version), else this connection's upstream.
            let dispatch = req.extensions_mut().remove::<Dispatch>();
            let (client, version) = match &dispatch {
                Some(d) => {
                    let h2 = d.h2.unwrap_or(inner.version == http::Version::HTTP_2);
                    if h2 {
                        (&d.endpoint.h2, http::Version::HTTP_2)
                    } else {
                        (&d.endpoint.h1, http::Version::HTTP_11)
                    }
                }
                None => (&inner.client, inner.version),
            };
            if req.version() != version && upgrade.is_none() {
                // Version translation (`--upstream-http`, a service's protocol): the URI carries
                // the authority, so HTTP/1 gets its Host header from it and HTTP/2 its :authority.
                if version == http::Version::HTTP_2 {
                    if let Some(host) = req.headers_mut().remove(http::header::HOST) {
                        set_authority(&mut req, &host)?;
                    }
                }
                *req.version_mut() = version;
            }
            let mut rsp = client.request(req).await.map_err(|e| {
                let reason = if e.is_connect() {
                    Reason::ConnectFailed
                } else {
                    Reason::UpstreamFailed
                };
                ProxyError::new(reason, e)
            })?;
            match upgrade {
                Some(downstream) if rsp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    let upstream = hyper::upgrade::on(&mut rsp);
                    tokio::spawn(splice(downstream, upstream, inner.drain.clone()));
                }
                _ => strip_hop_by_hop(rsp.headers_mut(), false),
            }
            Ok(rsp.map(Either::Left))
        };
        Box::pin(fut.instrument(span))
    }
}

/// Gives the request the absolute URI the pooled client needs. HTTP/1 requests arrive in origin
/// form (`/path`); the client sends them in origin form again with their own `Host` header, so the
/// authority used here is only the pool key. HTTP/2 requests keep their `:authority`.
fn set_upstream_uri(req: &mut Request<Incoming>, upstream: &Authority) -> Result<(), ProxyError> {
    if req.uri().authority().is_some() && req.uri().scheme().is_some() {
        return Ok(());
    }
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    if parts.authority.is_none() {
        parts.authority = Some(upstream.clone());
    }
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(parts).map_err(|e| ProxyError::new(Reason::BadRequest, e))?;
    Ok(())
}

/// Replaces the request URI's authority with a `Host` header value.
fn set_authority(req: &mut Request<Incoming>, host: &http::HeaderValue) -> Result<(), ProxyError> {
    let authority =
        Authority::try_from(host.as_bytes()).map_err(|e| ProxyError::new(Reason::BadRequest, e))?;
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.authority = Some(authority);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|e| ProxyError::new(Reason::BadRequest, e))?;
    Ok(())
}

/// Joins an upgraded downstream stream to the upgraded upstream one until either side closes.
async fn splice(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    _drain: drain::Watch,
) {
    let (down, up) = tokio::join!(downstream, upstream);
    match (down, up) {
        (Ok(down), Ok(up)) => {
            let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
            match tokio::io::copy_bidirectional(&mut down, &mut up).await {
                Ok((tx, rx)) => tracing::debug!(tx, rx, "upgraded stream closed"),
                Err(e) => tracing::debug!(error = %e, "upgraded stream failed"),
            }
        }
        (Err(e), _) | (_, Err(e)) => tracing::debug!(error = %e, "upgrade failed"),
    }
}
