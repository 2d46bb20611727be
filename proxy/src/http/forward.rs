//! The innermost HTTP service: forwards a request to one upstream address and returns its
//! response.
//!
//! The proxy keeps one [`Upstream`] per upstream address, shared by every connection and worker:
//!
//! - HTTP/1.1 goes through a hyper-util pooled client whose connector always dials that address.
//!   Every request's URI authority is set to the address itself, so the pool has exactly one key
//!   per upstream whatever `Host` clients send (a client cannot make the proxy fan out
//!   connections); the request keeps its own `Host` header, as a transparent proxy must.
//! - HTTP/2 goes over one multiplexed connection per address (hyper's `client::conn::http2`),
//!   re-established when it closes; the request keeps its own `:authority`.
//!
//! HTTP/1.1 `Upgrade` (WebSocket) and `CONNECT` tunnels become byte streams once the upstream
//! agrees (101, or 2xx to `CONNECT`). The spliced stream keeps the downstream connection's guard
//! (connection limit and gauges) and is closed after the TCP idle timeout without traffic.
//!
//! Failures are returned as [`ProxyError`]s (connect vs. upstream) for the rescue layer to answer.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntCounter;
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::drain;
use crate::errors::{ProxyError, Reason, RspBody};
use crate::http::headers::{is_upgrade, strip_hop_by_hop};
use crate::io::Activity;
use crate::layers::router::{Dispatch, RouteName};

/// A boxed error, the error type inside the request stack.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Something kept alive for as long as a downstream connection's streams live.
pub type Held = Arc<dyn Any + Send + Sync>;

/// Upstream addresses kept before unused ones are forgotten. Bounds memory when outbound traffic
/// fans out widely; upstreams still in use are never dropped.
const MAX_UPSTREAMS: usize = 4096;

/// How long pooled idle HTTP/1 connections are kept.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// The table of upstreams, keyed by address.
#[derive(Debug)]
pub struct Upstreams {
    by_addr: Mutex<HashMap<SocketAddr, Arc<Upstream>>>,
    connect_timeout: Duration,
    connects: IntCounter,
}

impl Upstreams {
    /// An empty table whose connections use `connect_timeout`; every connection it opens is
    /// counted in `connects`.
    pub fn new(connect_timeout: Duration, connects: IntCounter) -> Self {
        Self {
            by_addr: Mutex::new(HashMap::new()),
            connect_timeout,
            connects,
        }
    }

    /// Counts a connection opened outside the pools (an opaque TCP stream).
    pub fn count_connect(&self) {
        self.connects.inc();
    }

    /// The upstream at `addr`. Called once per downstream connection (and per endpoint when a
    /// discovery update arrives), never per request.
    pub fn get(&self, addr: SocketAddr) -> Arc<Upstream> {
        let mut map = match self.by_addr.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if map.len() >= MAX_UPSTREAMS && !map.contains_key(&addr) {
            // Forget upstreams nobody holds (no table entry, no open connection); those in use
            // keep their pools.
            map.retain(|_, u| Arc::strong_count(u) > 1);
        }
        map.entry(addr)
            .or_insert_with(|| {
                Arc::new(Upstream::new(
                    addr,
                    self.connect_timeout,
                    self.connects.clone(),
                ))
            })
            .clone()
    }
}

/// One upstream address: its HTTP/1 pool and its HTTP/2 connection.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    authority: Authority,
    h1: Client<Connector, Incoming>,
    h2: H2Conn,
}

impl Upstream {
    fn new(addr: SocketAddr, connect_timeout: Duration, connects: IntCounter) -> Self {
        let connector = Connector {
            target: addr,
            timeout: connect_timeout,
            connects: connects.clone(),
        };
        let h1 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector);
        // `SocketAddr`'s display form is always a valid authority.
        let authority = Authority::try_from(addr.to_string())
            .unwrap_or_else(|_| Authority::from_static("upstream"));
        Self {
            addr,
            authority,
            h1,
            h2: H2Conn {
                target: addr,
                connect_timeout,
                connects,
                current: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                failed: Mutex::new(None),
            },
        }
    }

    /// The address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn send(
        &self,
        req: Request<Incoming>,
        h2: bool,
    ) -> Result<Response<Incoming>, ProxyError> {
        if h2 {
            return self.h2.send(req).await;
        }
        self.h1.request(req).await.map_err(|e| {
            let reason = if e.is_connect() {
                Reason::ConnectFailed
            } else {
                Reason::UpstreamFailed
            };
            ProxyError::new(reason, e)
        })
    }
}

/// One multiplexed HTTP/2 connection, dialled on first use and again after it closes; concurrent
/// requests that find it missing wait for a single dial.
struct H2Conn {
    target: SocketAddr,
    connect_timeout: Duration,
    connects: IntCounter,
    current: Mutex<Option<http2::SendRequest<Incoming>>>,
    connecting: tokio::sync::Mutex<()>,
    /// The last failed dial: requests that waited for it fail with it instead of dialling again.
    failed: Mutex<Option<(tokio::time::Instant, String)>>,
}

impl std::fmt::Debug for H2Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Conn")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl H2Conn {
    fn open(&self) -> Option<http2::SendRequest<Incoming>> {
        let current = match self.current.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        current.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    async fn sender(&self) -> Result<http2::SendRequest<Incoming>, ProxyError> {
        if let Some(s) = self.open() {
            return Ok(s);
        }
        let waiting_since = tokio::time::Instant::now();
        let _dialing = self.connecting.lock().await;
        if let Some(s) = self.open() {
            return Ok(s);
        }
        // A dial that failed while this request waited fails it too: failures do not queue up
        // one connect timeout after another.
        let failed = self.failed.lock().ok().and_then(|f| f.clone());
        if let Some((_, why)) = failed.filter(|(at, _)| *at >= waiting_since) {
            return Err(ProxyError::new(Reason::ConnectFailed, why));
        }
        match self.dial().await {
            Ok(send) => Ok(send),
            Err(e) => {
                if let Ok(mut f) = self.failed.lock() {
                    *f = Some((tokio::time::Instant::now(), e.to_string()));
                }
                Err(e)
            }
        }
    }

    async fn dial(&self) -> Result<http2::SendRequest<Incoming>, ProxyError> {
        self.connects.inc();
        let stream = crate::tcp::connect(self.target, self.connect_timeout)
            .await
            .map_err(|e| ProxyError::new(Reason::ConnectFailed, e))?;
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Ping idle connections too: a silently dead peer is found before a request uses it.
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProxyError::new(Reason::ConnectFailed, e))?;
        let target = self.target;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%target, error = %e, "HTTP/2 upstream connection ended");
            }
        });
        match self.current.lock() {
            Ok(mut guard) => *guard = Some(send.clone()),
            Err(poisoned) => *poisoned.into_inner() = Some(send.clone()),
        }
        Ok(send)
    }

    /// Drops the current connection when `all`, else only if it is closed.
    fn forget(&self, all: bool) {
        if let Ok(mut current) = self.current.lock() {
            if all || current.as_ref().is_some_and(|c| c.is_closed()) {
                *current = None;
            }
        }
    }

    async fn send(&self, req: Request<Incoming>) -> Result<Response<Incoming>, ProxyError> {
        let mut req = req;
        // One retry, only for a request the connection handed back unsent (it was going away,
        // e.g. after the upstream's GOAWAY): resending it cannot duplicate anything.
        for attempt in 0..2 {
            let mut sender = self.sender().await?;
            if sender.ready().await.is_err() {
                self.forget(false);
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(rsp) => return Ok(rsp),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if attempt == 0 => {
                        tracing::debug!(error = %e.error(), "HTTP/2 upstream refused the request unsent; redialling");
                        self.forget(true);
                        req = unsent;
                    }
                    _ => return Err(ProxyError::new(Reason::UpstreamFailed, e.into_error())),
                },
            }
        }
        Err(ProxyError::new(
            Reason::UpstreamFailed,
            "the HTTP/2 upstream connection keeps closing",
        ))
    }
}

/// Dials one fixed upstream address, whatever the URI says.
#[derive(Debug, Clone)]
pub struct Connector {
    target: SocketAddr,
    timeout: Duration,
    connects: IntCounter,
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
        self.connects.inc();
        Box::pin(async move { crate::tcp::connect(target, timeout).await.map(TokioIo::new) })
    }
}

/// What an upgraded stream needs from its downstream connection.
pub struct StreamContext {
    /// Drains wait for upgraded streams too.
    pub drain: drain::Watch,
    /// The downstream connection's guard (connection limit, gauges).
    pub held: Held,
    /// The downstream connection's activity clock.
    pub activity: Activity,
    /// Idle timeout of an upgraded stream (the TCP idle timeout).
    pub idle_timeout: Duration,
}

/// Forwards requests to one upstream (or the endpoint the router chose).
#[derive(Clone)]
pub struct Forward {
    inner: Arc<Inner>,
}

struct Inner {
    upstream: Arc<Upstream>,
    /// Speak HTTP/2 to the default upstream.
    h2: bool,
    stream: StreamContext,
}

impl Forward {
    /// Forwards to `upstream`, speaking HTTP/2 when `h2`, unless the router chose an endpoint.
    pub fn new(upstream: Arc<Upstream>, h2: bool, stream: StreamContext) -> Self {
        Self {
            inner: Arc::new(Inner {
                upstream,
                h2,
                stream,
            }),
        }
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
        // Method, version, route and endpoint; never the path or header values (secrets).
        // Field expressions are evaluated only when the span is enabled: no lookups otherwise.
        let span = tracing::debug_span!(
            "request",
            method = %req.method(),
            version = ?req.version(),
            route = req.extensions().get::<RouteName>().map(|r| &*r.0),
            endpoint = req.extensions().get::<Dispatch>().map(|d| tracing::field::display(d.endpoint.addr)),
        );
        let fut = async move {
            let connect = req.method() == Method::CONNECT;
            if connect && req.version() == Version::HTTP_2 {
                // Extended and classic CONNECT over HTTP/2 are not tunnelled (yet): refuse clearly
                // instead of answering 200 and resetting the stream.
                return Err(ProxyError::new(
                    Reason::BadRequest,
                    "CONNECT over HTTP/2 is not supported",
                )
                .into());
            }
            let upgrade = (req.version() <= Version::HTTP_11
                && (connect || is_upgrade(req.headers())))
            .then(|| hyper::upgrade::on(&mut req));
            strip_hop_by_hop(req.headers_mut(), upgrade.is_some() && !connect);
            // The router's choice of endpoint (and version), else this connection's upstream.
            let dispatch = req.extensions_mut().remove::<Dispatch>();
            let (upstream, h2) = match &dispatch {
                Some(d) => (&d.endpoint.upstream, d.h2.unwrap_or(inner.h2)),
                None => (&inner.upstream, inner.h2),
            };
            let h2 = h2 && upgrade.is_none();
            prepare(&mut req, upstream, h2)?;
            let mut rsp = upstream.send(req, h2).await?;
            let switched = rsp.status() == StatusCode::SWITCHING_PROTOCOLS
                || (connect && rsp.status().is_success());
            match upgrade {
                Some(downstream) if switched => {
                    let up = hyper::upgrade::on(&mut rsp);
                    tokio::spawn(splice(downstream, up, inner.clone()));
                }
                _ => strip_hop_by_hop(rsp.headers_mut(), false),
            }
            Ok(rsp.map(Either::Left))
        };
        Box::pin(fut.instrument(span))
    }
}

/// Shapes the request for the upstream connection: HTTP/2 gets an absolute URI with the
/// request's own authority (`:authority`, else `Host`, else the upstream address); HTTP/1.1 keeps
/// (or gains) a `Host` header and gets the upstream address as URI authority, which is the pool
/// key (the client sends origin form, or authority form for `CONNECT`).
fn prepare(req: &mut Request<Incoming>, upstream: &Upstream, h2: bool) -> Result<(), ProxyError> {
    let bad = |e: http::Error| ProxyError::new(Reason::BadRequest, e);
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    if h2 {
        if parts.authority.is_none() {
            let host = req.headers_mut().remove(HOST);
            let from_host = host.and_then(|h| Authority::try_from(h.as_bytes()).ok());
            parts.authority = Some(from_host.unwrap_or_else(|| upstream.authority.clone()));
        } else {
            req.headers_mut().remove(HOST);
        }
        *req.version_mut() = Version::HTTP_2;
    } else {
        // RFC 9112 3.2.2: the request target's authority (absolute form, or HTTP/2's
        // :authority) wins over any Host header; without either, the upstream address.
        if let Some(authority) = &parts.authority {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                req.headers_mut().insert(HOST, v);
            }
        } else if !req.headers().contains_key(HOST) {
            if let Ok(v) = HeaderValue::from_str(upstream.authority.as_str()) {
                req.headers_mut().insert(HOST, v);
            }
        }
        if req.version() == Version::HTTP_2 {
            join_cookies(req.headers_mut());
        }
        if req.method() != Method::CONNECT {
            parts.authority = Some(upstream.authority.clone());
        }
        if req.version() != Version::HTTP_10 {
            *req.version_mut() = Version::HTTP_11;
        }
    }
    parts.scheme = Some(Scheme::HTTP);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(parts).map_err(|e| bad(e.into()))?;
    Ok(())
}

/// RFC 9113 8.2.3: HTTP/2 may split `cookie` into several fields; HTTP/1.1 needs one, joined
/// with "; ".
fn join_cookies(headers: &mut http::HeaderMap) {
    if headers
        .get_all(http::header::COOKIE)
        .iter()
        .nth(1)
        .is_none()
    {
        return;
    }
    let joined = {
        let parts: Vec<&[u8]> = headers
            .get_all(http::header::COOKIE)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        parts.join(&b"; "[..])
    };
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(http::header::COOKIE, v);
    }
}

/// Joins an upgraded downstream stream to the upgraded upstream one until either side closes or
/// nothing moves for the idle timeout.
async fn splice(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    inner: Arc<Inner>,
) {
    let (down, up) = tokio::join!(downstream, upstream);
    match (down, up) {
        (Ok(down), Ok(up)) => {
            let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
            let ctx = &inner.stream;
            tokio::select! {
                res = tokio::io::copy_bidirectional(&mut down, &mut up) => match res {
                    Ok((tx, rx)) => tracing::debug!(tx, rx, "upgraded stream closed"),
                    Err(e) => tracing::debug!(error = %e, "upgraded stream failed"),
                },
                () = ctx.activity.idle(ctx.idle_timeout, || false) => tracing::debug!("closing idle upgraded stream"),
            }
        }
        (Err(e), _) | (_, Err(e)) => tracing::debug!(error = %e, "upgrade failed"),
    }
    // The drain watch and the connection guard are released here, with `inner`.
    let _ = (&inner.stream.drain, &inner.stream.held);
}
