//! The clients that speak to upstream endpoints, shared by every connection, worker and
//! destination that names the same endpoint.
//!
//! [`Upstreams`] keeps one [`Upstream`] per [`EndpointKey`] (today the address; with mTLS also the
//! identity and ALPN, whatever makes a connection distinct):
//!
//! - HTTP/1.1 goes through a hyper-util pooled client whose connector always dials that address.
//!   Every request's URI authority is set to the address itself, so the pool has exactly one key
//!   per upstream whatever `Host` clients send (a client cannot make the proxy fan out
//!   connections); the request keeps its own `Host` header, as a transparent proxy must.
//! - HTTP/2 goes over one multiplexed connection per endpoint, re-established when it closes (and,
//!   to a mesh endpoint, once this proxy's certificate is renewed: the old connection finishes
//!   its requests and closes before the peer would close it at the old certificate's expiry);
//!   the request keeps its own `:authority`. A new connection is used only once the upstream has
//!   spoken: an upstream that answers the HTTP/2 preface with HTTP/1 is remembered as HTTP/1-only
//!   (logged once) and, unless the request is gRPC, gets it as HTTP/1.1 instead.
//!
//! [`Forward`] is the innermost service of both directions: hop-by-hop handling, request shaping,
//! the version choice, and HTTP/1.1 `Upgrade` (WebSocket) and `CONNECT` tunnels, which become
//! byte streams once the upstream agrees (101, or 2xx to `CONNECT`). An upgraded stream keeps the
//! downstream connection's [`ConnContext`] and closes after the TCP idle timeout without traffic.
//!
//! Failures are leaf errors of [`crate::errors`]; upstream failures are logged at warn, at most
//! once per upstream every 30 s, with the cause.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Either};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use super::server::ConnContext;
use super::Body;
use crate::errors::{
    reason_of, BadRequest, BoxError, Chain, NotHttp2, Reason, ResponseBody, Side, StreamRefused,
    UpstreamFailed,
};
use crate::http::headers::{check_request, is_upgrade, strip_hop_by_hop};
use crate::identity::Alpn;
use crate::transport::connect::Connect;
use outrider_control::api::Identity;

/// Upstreams kept before unused ones are forgotten. Bounds memory when outbound traffic fans out
/// widely; upstreams still in use are never dropped.
const MAX_UPSTREAMS: usize = 4096;

/// How long pooled idle HTTP/1 connections are kept.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// At most one warning per upstream in this interval.
const WARN_INTERVAL: Duration = Duration::from_secs(30);

/// What makes an upstream connection distinct.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct EndpointKey {
    /// Where to connect.
    pub addr: SocketAddr,
    /// The identity the endpoint must present: with one (and an identity of this proxy's own),
    /// connections are mutual TLS and HTTP goes over one multiplexed HTTP/2 connection.
    pub identity: Option<Identity>,
}

impl EndpointKey {
    /// A plaintext endpoint.
    pub(crate) fn plain(addr: SocketAddr) -> Self {
        Self {
            addr,
            identity: None,
        }
    }
}

/// The request header that carries the HTTP/1 version an app spoke across a multiplexed
/// HTTP/2 mesh connection, so the inbound proxy gives the app back what it sent (Linkerd's
/// `l5d-orig-proto`). Never forwarded to an app.
pub(crate) const ORIG_PROTO: &str = "outrider-orig-proto";

pub(crate) use crate::config::UpstreamHttp;

/// The table of upstreams, keyed by [`EndpointKey`].
#[derive(Debug)]
pub(crate) struct Upstreams {
    by_key: Mutex<HashMap<EndpointKey, Arc<Upstream>>>,
    connect: Connect,
    hop: HeaderValue,
}

impl Upstreams {
    /// An empty table whose upstreams dial with `connect`. Requests sent through it carry a hop
    /// marker of its own (one table per proxy).
    pub(crate) fn new(connect: Connect) -> Self {
        Self {
            by_key: Mutex::new(HashMap::new()),
            connect,
            hop: crate::http::headers::hop_token(),
        }
    }

    /// The connect path (opaque TCP dials through it too).
    pub(crate) fn connect(&self) -> &Connect {
        &self.connect
    }

    /// The upstream for `key`, created on first use. Called when a destination learns an
    /// endpoint, never per request.
    pub(crate) fn get_or_insert(&self, key: EndpointKey) -> Arc<Upstream> {
        let mut map = match self.by_key.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if map.len() >= MAX_UPSTREAMS && !map.contains_key(&key) {
            // Forget upstreams nobody holds (no destination names them); those in use keep
            // their pools.
            map.retain(|_, u| Arc::strong_count(u) > 1);
        }
        map.entry(key.clone())
            .or_insert_with(|| Arc::new(Upstream::new(key, self.connect.clone(), self.hop.clone())))
            .clone()
    }

    /// How many upstreams the table holds.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_key.lock().map_or(0, |m| m.len())
    }
}

/// One upstream endpoint: its HTTP/1 pool and its HTTP/2 connection.
#[derive(Debug)]
pub(crate) struct Upstream {
    key: EndpointKey,
    authority: Authority,
    h1: Client<FixedConnector, Body>,
    h2: H2Conn,
    /// The upstream answered the HTTP/2 preface with HTTP/1.
    http1_only: AtomicBool,
    /// Milliseconds since `born` of the last warning (0: never).
    warned_at: AtomicU64,
    born: tokio::time::Instant,
    /// The proxy's hop marker.
    hop: HeaderValue,
    /// Connections are mutual TLS (HTTP multiplexed over HTTP/2).
    meshed: bool,
}

impl Upstream {
    fn new(key: EndpointKey, connect: Connect, hop: HeaderValue) -> Self {
        let connector = FixedConnector {
            addr: key.addr,
            peer: key.identity.clone(),
            connect: connect.clone(),
        };
        let meshed = key.identity.is_some() && connect.is_meshed();
        let h1 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            // No hidden retries: a request the pool could not send fails, and the retry layer
            // decides (within the service's budget).
            .retry_canceled_requests(false)
            .build(connector);
        // `SocketAddr`'s display form is always a valid authority.
        let authority = Authority::try_from(key.addr.to_string())
            .unwrap_or_else(|_| Authority::from_static("upstream"));
        Self {
            authority,
            h1,
            h2: H2Conn {
                addr: key.addr,
                peer: key.identity.clone(),
                connect,
                current: Mutex::new(None),
                generation: AtomicU64::new(0),
                resends: crate::budget::Budget::new(),
                connecting: tokio::sync::Mutex::new(()),
                failed: Mutex::new(None),
            },
            http1_only: AtomicBool::new(false),
            warned_at: AtomicU64::new(0),
            born: tokio::time::Instant::now(),
            hop,
            meshed,
            key,
        }
    }

    /// The endpoint's address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.key.addr
    }

    /// The identity the endpoint must present, if meshed.
    pub(crate) fn identity(&self) -> Option<&Identity> {
        self.key.identity.as_ref()
    }

    /// Whether the upstream was found not to speak HTTP/2.
    pub(crate) fn is_http1_only(&self) -> bool {
        self.http1_only.load(Ordering::Relaxed)
    }

    /// Sends over HTTP/1.1 through the pool.
    async fn send_h1(&self, req: Request<Body>) -> Result<Response<Incoming>, BoxError> {
        let addr = self.key.addr;
        self.h1.request(req).await.map_err(|e| {
            // Connect errors are ours (ConnectError / ConnectTimeout), found in the chain; a
            // request body error is the client's; the rest is the upstream failing.
            let e: BoxError = Box::new(e);
            if reason_of(&*e) == Reason::UpstreamFailed {
                UpstreamFailed { addr, source: e }.into()
            } else {
                e
            }
        })
    }

    /// Logs an upstream failure at warn, at most once per upstream every [`WARN_INTERVAL`].
    fn warn(&self, error: &(dyn std::error::Error + 'static)) {
        let now = self.born.elapsed().as_millis() as u64 + 1;
        let last = self.warned_at.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < WARN_INTERVAL.as_millis() as u64 {
            return;
        }
        if self
            .warned_at
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::warn!(upstream = %self.key.addr, error = %Chain(crate::errors::leaf(error)),
                "upstream failed (logged at most every 30 s per upstream)");
        }
    }
}

/// One multiplexed HTTP/2 connection, dialled on first use and again after it closes; concurrent
/// requests that find it missing wait for a single dial.
struct H2Conn {
    addr: SocketAddr,
    peer: Option<Identity>,
    connect: Connect,
    /// The open connection, its generation (a count of dials) and the generation of this
    /// proxy's certificate it was dialled with (mesh connections; see [`H2Conn::open`]).
    current: Mutex<Option<(u64, http2::SendRequest<Body>, u64)>>,
    generation: AtomicU64,
    /// Budget for sending a request again that a going-away connection handed back unsent.
    resends: crate::budget::Budget,
    connecting: tokio::sync::Mutex<()>,
    /// The last failed dial: requests that waited for it fail with it instead of dialling again
    /// (when, what, and the reason it was answered with).
    failed: Mutex<Option<(tokio::time::Instant, Arc<str>, Reason)>>,
}

impl std::fmt::Debug for H2Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Conn")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// A dial that failed while another request waited for it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SharedDialError(Arc<str>);

impl H2Conn {
    /// The open connection, if any. A mesh connection dialled before this proxy's certificate
    /// was renewed is not used for new requests: the server closes it when the certificate it
    /// presented expires, and a request that raced that close would be lost. Its requests in
    /// flight finish on it, and it closes once the last of them is done.
    fn open(&self) -> Option<(u64, http2::SendRequest<Body>)> {
        let current = match self.current.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let leaf = self.leaf_generation();
        current
            .as_ref()
            .filter(|(_, s, dialled_with)| !s.is_closed() && *dialled_with == leaf)
            .map(|(g, s, _)| (*g, s.clone()))
    }

    /// The generation of the certificate a new connection presents (0 when it presents none).
    fn leaf_generation(&self) -> u64 {
        if self.peer.is_some() {
            self.connect.leaf_generation()
        } else {
            0
        }
    }

    /// The open connection (with its generation), dialled if there is none.
    async fn sender(&self) -> Result<(u64, http2::SendRequest<Body>), BoxError> {
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
        if let Some((_, why, reason)) = failed.filter(|(at, _, _)| *at >= waiting_since) {
            // The same kind of failure as the dial's, so it is answered and logged the same way.
            let addr = self.addr;
            let source = std::io::Error::other(SharedDialError(why));
            return Err(match reason {
                Reason::UpstreamProtocol => NotHttp2 { addr }.into(),
                Reason::ConnectFailed => crate::errors::ConnectError { addr, source }.into(),
                Reason::Overloaded => crate::errors::UpstreamBusy {
                    addr,
                    max: self.connect.max_per_upstream(),
                }
                .into(),
                _ => UpstreamFailed {
                    addr,
                    source: source.into(),
                }
                .into(),
            });
        }
        match self.dial().await {
            Ok(send) => Ok(send),
            Err(e) => {
                if let Ok(mut f) = self.failed.lock() {
                    let reason = reason_of(&*e);
                    *f = Some((tokio::time::Instant::now(), e.to_string().into(), reason));
                }
                Err(e)
            }
        }
    }

    async fn dial(&self) -> Result<(u64, http2::SendRequest<Body>), BoxError> {
        // Read before the handshake: a renewal during it costs at most one more dial.
        let leaf = self.leaf_generation();
        let stream = self
            .connect
            .connect_to(self.addr, self.peer.as_ref(), Alpn::H2)
            .await?;
        let (first, spoke) = oneshot::channel();
        let io = FirstBytes {
            io: stream,
            first: Some(first),
        };
        let addr = self.addr;
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Ping idle connections too: a silently dead peer is found before a request uses it.
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamFailed {
                addr,
                source: e.into(),
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "HTTP/2 upstream connection ended");
            }
        });
        // Use the connection once the upstream has spoken (an HTTP/2 server sends SETTINGS at
        // once): a request is never lost to an upstream that turns out to speak HTTP/1.
        match tokio::time::timeout(Duration::from_secs(10), spoke).await {
            Ok(Ok(FirstWords::Http2)) => {}
            Ok(Ok(FirstWords::Other)) => return Err(NotHttp2 { addr }.into()),
            Ok(Ok(FirstWords::Closed)) => {
                return Err(UpstreamFailed {
                    addr,
                    source: "the upstream closed the connection after the HTTP/2 preface".into(),
                }
                .into())
            }
            Ok(Err(_)) => {
                return Err(UpstreamFailed {
                    addr,
                    source: "the HTTP/2 connection ended before the upstream spoke".into(),
                }
                .into())
            }
            Err(_) => {
                return Err(UpstreamFailed {
                    addr,
                    source: "the upstream sent no HTTP/2 SETTINGS within 10 s".into(),
                }
                .into())
            }
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        match self.current.lock() {
            Ok(mut guard) => *guard = Some((generation, send.clone(), leaf)),
            Err(poisoned) => *poisoned.into_inner() = Some((generation, send.clone(), leaf)),
        }
        Ok((generation, send))
    }

    /// Drops the connection of `generation`, if it is still the current one (a request that
    /// saw a connection go away never drops the one another request has just dialled).
    fn forget(&self, generation: u64) {
        if let Ok(mut current) = self.current.lock() {
            if current.as_ref().is_some_and(|(g, _, _)| *g == generation) {
                *current = None;
            }
        }
    }

    /// Sends `req` over the current connection (`sender`, from [`H2Conn::sender`]). A request
    /// the connection hands back unsent (it received the upstream's GOAWAY) is sent once more on
    /// a new connection if this endpoint's resend budget allows (20% of its requests plus 10 a
    /// second, as the retry layer's); otherwise, and for a refused stream (`REFUSED_STREAM`, or
    /// above the last stream a graceful GOAWAY says was processed), it fails with
    /// [`StreamRefused`], which the retry layer may retry within the service's budget.
    async fn send(
        &self,
        (mut generation, mut sender): (u64, http2::SendRequest<Body>),
        req: Request<Body>,
    ) -> Result<Response<Incoming>, BoxError> {
        self.resends.deposit(tokio::time::Instant::now());
        // hyper's HTTP/2 client resets the stream on a request body error and reports a failed
        // exchange without the body's error: remember it, so the client's fault stays the client's.
        let body_failed = Arc::new(AtomicU8::new(0));
        let watched = body_failed.clone();
        let mut req = req.map(move |inner| {
            Watched {
                inner,
                failed: watched,
            }
            .boxed_unsync()
        });
        for attempt in 0..2 {
            if sender.ready().await.is_err() {
                // Going away before this request was given to it: nothing was sent.
                self.forget(generation);
                (generation, sender) = self.sender().await?;
                if sender.ready().await.is_err() {
                    return Err(StreamRefused { addr: self.addr }.into());
                }
            }
            match sender.try_send_request(req).await {
                Ok(rsp) => return Ok(rsp),
                Err(mut e) => {
                    if let Some(unsent) = e.take_message() {
                        // Only this connection: another request may have dialled a new one.
                        self.forget(generation);
                        let budget = tokio::time::Instant::now();
                        if attempt == 0 && self.resends.try_withdraw(budget, 20) {
                            tracing::debug!(error = %e.error(), "HTTP/2 upstream handed the request back unsent; sending it once more");
                            req = unsent;
                            (generation, sender) = self.sender().await?;
                            continue;
                        }
                        return Err(StreamRefused { addr: self.addr }.into());
                    }
                    let recorded = body_failed.load(Ordering::Relaxed);
                    if let Some(reason) = recorded
                        .checked_sub(1)
                        .and_then(|i| Reason::ALL.get(usize::from(i)))
                    {
                        return Err(crate::errors::BodyFailed(*reason).into());
                    }
                    if refused_by_go_away(e.error()) {
                        // Sent, but above the last stream the upstream's GOAWAY says it
                        // processed: nothing of it was, so it is refused like a handed-back one
                        // (the retry layer may send it again). The connection takes no more.
                        self.forget(generation);
                        return Err(StreamRefused { addr: self.addr }.into());
                    }
                    let source: BoxError = Box::new(e.into_error());
                    if reason_of(&*source) != Reason::UpstreamFailed {
                        return Err(source);
                    }
                    return Err(UpstreamFailed {
                        addr: self.addr,
                        source,
                    }
                    .into());
                }
            }
        }
        Err(StreamRefused { addr: self.addr }.into())
    }
}

/// Whether `error` ended a stream the upstream never processed: its graceful GOAWAY
/// (`NO_ERROR`) named a last stream below this one, which RFC 9113 (6.8) says may be retried. A
/// GOAWAY with an error code fails every stream alike, processed or not, so it does not count.
fn refused_by_go_away(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        next = e.source();
    }
    false
}

pin_project_lite::pin_project! {
    /// A request body that records the reason of its error (plus one; 0: none).
    struct Watched {
        #[pin]
        inner: Body,
        failed: Arc<AtomicU8>,
    }
}

impl http_body::Body for Watched {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if let Some(Err(e)) = &frame {
            this.failed
                .store(reason_of(&**e) as u8 + 1, Ordering::Relaxed);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// What an upstream said first on a new HTTP/2 connection.
#[derive(Debug, Clone, Copy)]
enum FirstWords {
    Http2,
    Other,
    Closed,
}

pin_project_lite::pin_project! {
    /// Reports what the upstream's first bytes look like, once.
    struct FirstBytes<T> {
        #[pin]
        io: T,
        first: Option<oneshot::Sender<FirstWords>>,
    }
}

impl<T: AsyncRead> AsyncRead for FirstBytes<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let room = buf.remaining();
        let res = this.io.poll_read(cx, buf);
        if this.first.is_some() && room > 0 {
            let words = match &res {
                Poll::Ready(Ok(())) => {
                    let got = &buf.filled()[before..];
                    if got.is_empty() {
                        Some(FirstWords::Closed)
                    } else if got.len() >= 4 && got[3] != 0x04 {
                        // An HTTP/2 server's first frame is SETTINGS (type 4); an HTTP/1 server
                        // answers the preface with a status line or an error page.
                        Some(FirstWords::Other)
                    } else {
                        Some(FirstWords::Http2)
                    }
                }
                Poll::Ready(Err(_)) => Some(FirstWords::Closed),
                Poll::Pending => None,
            };
            if let Some(words) = words {
                if let Some(tx) = this.first.take() {
                    let _ = tx.send(words);
                }
            }
        }
        res
    }
}

impl<T: AsyncWrite> AsyncWrite for FirstBytes<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

/// Dials one fixed upstream address, whatever the URI says (the HTTP/1 pool's connector).
#[derive(Debug, Clone)]
pub(crate) struct FixedConnector {
    addr: SocketAddr,
    peer: Option<Identity>,
    connect: Connect,
}

impl tower::Service<Uri> for FixedConnector {
    type Response = TokioIo<crate::transport::connect::Upstream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (addr, connect, peer) = (self.addr, self.connect.clone(), self.peer.clone());
        Box::pin(async move {
            connect
                .connect_to(addr, peer.as_ref(), Alpn::Http1)
                .await
                .map(TokioIo::new)
        })
    }
}

/// The HTTP version a destination declares for its endpoints (from discovery).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum VersionHint {
    /// None: the `--upstream-http` policy decides.
    #[default]
    None,
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 (also gRPC).
    Http2,
}

/// Forwards requests to one upstream; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Forward {
    upstream: Arc<Upstream>,
    policy: UpstreamHttp,
    hint: VersionHint,
    /// Outbound: mark requests with the proxy's hop token (and refuse those that carry it).
    /// Inbound: remove every hop marker before the app.
    mark_hop: bool,
}

impl Forward {
    /// Forwards to `upstream` (outbound: requests carry the hop marker), choosing the version
    /// by `hint`, else by `policy`.
    pub(crate) fn new(upstream: Arc<Upstream>, policy: UpstreamHttp, hint: VersionHint) -> Self {
        Self {
            upstream,
            policy,
            hint,
            mark_hop: true,
        }
    }

    /// Forwards to the app in the pod: hop markers are removed, none is added.
    pub(crate) fn to_app(upstream: Arc<Upstream>, policy: UpstreamHttp) -> Self {
        Self {
            mark_hop: false,
            ..Self::new(upstream, policy, VersionHint::None)
        }
    }

    /// The upstream's address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.upstream.addr()
    }

    /// The version hint it was built with.
    pub(crate) fn hint(&self) -> VersionHint {
        self.hint
    }

    /// Whether to speak HTTP/2 for `req`.
    fn wants_h2(&self, req: &Request<Body>, grpc: bool) -> bool {
        if self.upstream.meshed {
            return true;
        }
        let h2 = match self.hint {
            VersionHint::Http1 => false,
            VersionHint::Http2 => true,
            VersionHint::None => match self.policy {
                UpstreamHttp::Http1 => false,
                UpstreamHttp::Http2 => true,
                UpstreamHttp::Same | UpstreamHttp::Auto => req.version() == Version::HTTP_2,
            },
        };
        let may_fall_back = self.policy == UpstreamHttp::Auto && self.hint == VersionHint::None;
        h2 && !(may_fall_back && !grpc && self.upstream.is_http1_only())
    }
}

impl tower::Service<Request<Body>> for Forward {
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let connect = req.method() == Method::CONNECT;
            let downstream_version = req.version();
            if !this.mark_hop {
                // Inbound: what the app spoke, carried across the mesh's HTTP/2 connection.
                restore_orig_proto(&mut req);
            } else {
                // Outbound: only this proxy sets the mesh's internal header, never the app.
                req.headers_mut().remove(ORIG_PROTO);
            }
            if connect && downstream_version == Version::HTTP_2 {
                // Extended and classic CONNECT over HTTP/2 are not tunnelled: refuse clearly
                // instead of answering 200 and resetting the stream.
                return Err(BadRequest("CONNECT over HTTP/2 is not supported".into()).into());
            }
            let upgrade = (downstream_version <= Version::HTTP_11
                && (connect || is_upgrade(req.headers())))
            .then(|| hyper::upgrade::on(&mut req));
            let ctx = upgrade
                .as_ref()
                .and_then(|_| req.extensions().get::<Arc<ConnContext>>().cloned());
            let token = this.mark_hop.then_some(&this.upstream.hop);
            check_request(req.headers_mut(), token)?;
            strip_hop_by_hop(req.headers_mut(), upgrade.is_some() && !connect);
            let grpc = crate::errors::is_grpc(req.headers());
            let h2 = this.wants_h2(&req, grpc) && upgrade.is_none();
            let upstream = &this.upstream;
            if h2 && upstream.meshed && req.version() < Version::HTTP_2 {
                let orig = if req.version() == Version::HTTP_10 {
                    "HTTP/1.0"
                } else {
                    "HTTP/1.1"
                };
                req.headers_mut()
                    .insert(ORIG_PROTO, HeaderValue::from_static(orig));
            }
            let rsp = if h2 {
                // Keep what is needed to send the request again over HTTP/1.1 if the upstream
                // turns out not to speak HTTP/2 (the connection is tried before any request is
                // written, so the body is untouched).
                prepare(&mut req, upstream, true)?;
                match upstream.h2.sender().await {
                    Err(e) if e.is::<NotHttp2>() => {
                        if !upstream.http1_only.swap(true, Ordering::Relaxed) {
                            tracing::warn!(upstream = %upstream.addr(),
                                "the upstream answered HTTP/1 to the HTTP/2 preface; it gets HTTP/1.1 from now on (except gRPC, which needs HTTP/2); set --upstream-http http1 to skip the probe");
                        }
                        if grpc
                            || this.policy != UpstreamHttp::Auto
                            || this.hint != VersionHint::None
                        {
                            upstream.warn(&*e);
                            return Err(e);
                        }
                        unprepare_h2(&mut req, downstream_version);
                        prepare(&mut req, upstream, false)?;
                        upstream.send_h1(req).await
                    }
                    Err(e) => Err(e),
                    Ok(sender) => upstream.h2.send(sender, req).await,
                }
            } else {
                prepare(&mut req, upstream, false)?;
                upstream.send_h1(req).await
            };
            let mut rsp = match rsp {
                Ok(rsp) => rsp,
                Err(e) => {
                    if reason_of(&*e).side() == Side::Upstream {
                        upstream.warn(&*e);
                    }
                    return Err(e);
                }
            };
            let switched = rsp.status() == StatusCode::SWITCHING_PROTOCOLS
                || (connect && rsp.status().is_success());
            match (upgrade, ctx) {
                (Some(downstream), Some(ctx)) if switched => {
                    let up = hyper::upgrade::on(&mut rsp);
                    tokio::spawn(splice(downstream, up, ctx));
                }
                _ => strip_hop_by_hop(rsp.headers_mut(), false),
            }
            // The client hears its own HTTP/1 version, whatever the upstream spoke.
            if downstream_version != Version::HTTP_2 {
                *rsp.version_mut() = downstream_version;
            }
            Ok(rsp.map(Either::Left))
        })
    }
}

/// The URI authority of every HTTP/1.1 request (but `CONNECT`) towards an upstream: the key of
/// its pool. Each endpoint has a pool of its own, so the key tells nothing apart, and the pool
/// hashes it byte by byte (with SipHash) three times per request: one byte is the cheapest key.
/// It never reaches the wire: HTTP/1.1 requests go in origin form, with their own `Host`.
const POOL_KEY: Authority = Authority::from_static("u");

/// Shapes the request for the upstream connection: HTTP/2 gets an absolute URI with the
/// request's own authority (`:authority`, else `Host`, else the upstream address); HTTP/1.1 keeps
/// (or gains) a `Host` header and gets [`POOL_KEY`] as URI authority (the client sends origin
/// form, or authority form for `CONNECT`).
fn prepare(req: &mut Request<Body>, upstream: &Upstream, h2: bool) -> Result<(), BoxError> {
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
            parts.authority = Some(POOL_KEY);
        } else {
            // A CONNECT's URI is its (client-chosen) target and so the pool key: never pool such
            // a connection, or each target would keep one idle for the pool's lifetime.
            req.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        if req.version() != Version::HTTP_10 {
            *req.version_mut() = Version::HTTP_11;
        }
    }
    parts.scheme = Some(Scheme::HTTP);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(parts).map_err(|e| BadRequest(e.into()))?;
    Ok(())
}

/// Inbound: a request that crossed the mesh as HTTP/2 for an HTTP/1 app goes to the app in the
/// version it was sent in; the marker never reaches the app.
fn restore_orig_proto(req: &mut Request<Body>) {
    let Some(orig) = req.headers_mut().remove(ORIG_PROTO) else {
        return;
    };
    if req.version() != Version::HTTP_2 {
        return;
    }
    match orig.as_bytes() {
        b"HTTP/1.1" => *req.version_mut() = Version::HTTP_11,
        b"HTTP/1.0" => *req.version_mut() = Version::HTTP_10,
        _ => {}
    }
}

/// Undoes the HTTP/2 shaping of [`prepare`] before the request goes out as HTTP/1.1: the
/// authority becomes the `Host` header again.
fn unprepare_h2(req: &mut Request<Body>, downstream: Version) {
    if let Some(authority) = req.uri().authority() {
        if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
            req.headers_mut().insert(HOST, v);
        }
    }
    *req.version_mut() = downstream;
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
/// nothing moves for the idle timeout. The connection's context (drain watch, guard) is released
/// when the splice ends.
async fn splice(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    ctx: Arc<ConnContext>,
) {
    let (down, up) = tokio::join!(downstream, upstream);
    match (down, up) {
        (Ok(down), Ok(up)) => {
            let (down, up) = (TokioIo::new(down), TokioIo::new(up));
            match crate::transport::tcp::copy(down, up, ctx.idle_timeout, &ctx.activity).await {
                Ok((tx, rx)) => tracing::debug!(tx, rx, "upgraded stream closed"),
                Err(e) => tracing::debug!(error = %e, "upgraded stream failed"),
            }
        }
        (Err(e), _) | (_, Err(e)) => tracing::debug!(error = %e, "upgrade failed"),
    }
    drop(ctx);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP/2 server in raw frames: it reads the client's first request (stream 1), then
    /// says GOAWAY (`NO_ERROR`) with 0 as the last stream it processed, and stays open.
    async fn goaway_server() -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut preface = [0u8; 24];
            s.read_exact(&mut preface).await.unwrap();
            // An empty SETTINGS frame.
            s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
            loop {
                let mut head = [0u8; 9];
                s.read_exact(&mut head).await.unwrap();
                let len =
                    usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
                let mut payload = vec![0u8; len];
                s.read_exact(&mut payload).await.unwrap();
                if head[3] == 1 {
                    break; // HEADERS
                }
            }
            let goaway = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            s.write_all(&goaway).await.unwrap();
            // Open until the client closes.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        });
        addr
    }

    #[tokio::test]
    async fn a_stream_above_a_graceful_goaways_last_stream_is_a_refused_stream() {
        let registry = prometheus::Registry::new();
        let metrics = crate::metrics::Metrics::register(&registry).unwrap();
        let connect = Connect::new(Duration::from_secs(5), metrics.upstream_connects, 10);
        let table = Upstreams::new(connect);
        let upstream = table.get_or_insert(EndpointKey::plain(goaway_server().await));
        let mut forward = Forward::new(upstream, UpstreamHttp::Http2, VersionHint::Http2);
        let req = Request::get("http://api/")
            .body(
                http_body_util::Empty::new()
                    .map_err(|e| match e {})
                    .boxed_unsync(),
            )
            .unwrap();
        let e = tower::Service::call(&mut forward, req).await.unwrap_err();
        // Nothing of it was processed: the retry layer may send it again.
        assert!(crate::errors::is_retryable(&*e), "{}", Chain(&*e));
        assert!(e.is::<StreamRefused>(), "{}", Chain(&*e));
    }

    #[tokio::test]
    async fn unused_upstreams_are_forgotten_when_the_table_is_full_and_used_ones_kept() {
        let registry = prometheus::Registry::new();
        let metrics = crate::metrics::Metrics::register(&registry).unwrap();
        let table = Upstreams::new(Connect::new(
            Duration::from_secs(1),
            metrics.upstream_connects,
            10,
        ));
        let key = |i: u32| {
            EndpointKey::plain(SocketAddr::from((
                [10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
                80,
            )))
        };
        let held = table.get_or_insert(key(0));
        for i in 1..MAX_UPSTREAMS as u32 {
            drop(table.get_or_insert(key(i)));
        }
        assert_eq!(table.len(), MAX_UPSTREAMS);
        // Full: a new upstream makes room by forgetting those nobody holds.
        drop(table.get_or_insert(key(MAX_UPSTREAMS as u32)));
        assert_eq!(table.len(), 2);
        assert!(
            Arc::ptr_eq(&held, &table.get_or_insert(key(0))),
            "the held upstream keeps its pools"
        );
    }
}
