//! The inbound stack: traffic arriving at the pod (redirected to :15006), forwarded to the app.
//!
//! ```text
//! accept → original destination → loop check → protocol detection
//!   → a mesh ClientHello (our ALPN marker): mTLS termination (the client's identity); the ALPN
//!     says what the connection carries, so nothing is detected twice
//!   → HTTP: server → request metrics → rescue → authorization (per request) → client (the app)
//!   → opaque TCP (also the app's own TLS, passed through untouched): authorization (per
//!     connection) → connect → byte copy
//! ```
//!
//! Authorization reads the port's policy from the latest view each time (see [`policy`]): a
//! refused HTTP request is answered 403 `outrider-error: denied`, a refused TCP connection is
//! closed, and in both cases nothing reaches the app.

pub(crate) mod errors;
pub(crate) mod policy;
pub(crate) mod revoke;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tower::ServiceBuilder;
use tracing::Instrument;

use self::policy::Policies;
use self::revoke::{Cut, PeerCert, Revocable, Watched};
use crate::config::{Config, InboundTarget};
use crate::detect::{Detected, Protocol};
use crate::discovery::View;
use crate::errors::{reason_of, Chain, Reason};
use crate::http::client::{EndpointKey, Forward, Upstreams, ORIG_PROTO};
use crate::http::server::{self, ConnContext, ServerConfig};
use crate::identity::tls::{identity_of, offered_alpn};
use crate::identity::{Alpn, IdentityStore};
use crate::layers::metrics::{RequestMetrics, RequestMetricsLayer};
use crate::layers::rescue::{Rescue, RescueLayer};
use crate::metrics::DirectionMetrics;
use crate::transport;
use crate::transport::connect::Connect;
use crate::transport::io::{MeteredIo, PrefixedIo};
use crate::transport::listen::{Accepted, Serve};
use crate::transport::orig_dst::{Lookup, OrigDst};

/// The HTTP stack to one app port, for one connection (its caller's identity).
pub(crate) type HttpStack = RequestMetrics<Rescue<Authorize>>;

/// Most bytes read to see a whole ClientHello.
const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// App ports whose stacks are kept (a pod has a handful; the bound only guards memory).
const MAX_STACKS: usize = 1024;

/// The inbound stack of a proxy.
pub(crate) struct Inbound {
    orig_dst: Arc<dyn OrigDst>,
    lookup: Lookup,
    metrics: Arc<DirectionMetrics>,
    config: Arc<Config>,
    server: ServerConfig,
    upstreams: Arc<Upstreams>,
    connect: Connect,
    policies: Policies,
    identity: Option<Arc<IdentityStore>>,
    peers: crate::metrics::PeerMetrics,
    stacks: Mutex<HashMap<SocketAddr, Forward>>,
}

/// Authorization of each request against the port's current policy; the caller's identity is
/// the connection's.
#[derive(Debug, Clone)]
pub(crate) struct Authorize {
    inner: Forward,
    policies: Policies,
    port: u16,
    peer: Option<Arc<outrider_control::api::Identity>>,
}

impl tower::Service<http::Request<crate::http::Body>> for Authorize {
    type Response = <Forward as tower::Service<http::Request<crate::http::Body>>>::Response;
    type Error = crate::errors::BoxError;
    type Future = futures_util::future::Either<
        <Forward as tower::Service<http::Request<crate::http::Body>>>::Future,
        std::future::Ready<Result<Self::Response, Self::Error>>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<crate::http::Body>) -> Self::Future {
        use futures_util::future::Either;
        if self.peer.is_none() {
            // The proxies' own hop headers are honoured only from an authenticated mesh peer.
            req.headers_mut().remove(ORIG_PROTO);
        }
        match self.policies.check(self.port, self.peer.as_deref()) {
            Ok(()) => Either::Left(self.inner.call(req)),
            Err(denied) => Either::Right(std::future::ready(Err(denied.into()))),
        }
    }
}

impl Inbound {
    /// The inbound stack, counting into `metrics`, reading server policies from `views`.
    pub(crate) fn new(
        orig_dst: Arc<dyn OrigDst>,
        metrics: Arc<DirectionMetrics>,
        config: Arc<Config>,
        upstreams: Arc<Upstreams>,
        views: Option<watch::Receiver<View>>,
        identity: Option<Arc<IdentityStore>>,
        peers: crate::metrics::PeerMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            orig_dst,
            lookup: Lookup::new("inbound", config.own_ports(), metrics.clone()),
            server: ServerConfig::from(&*config),
            connect: upstreams.connect().clone(),
            metrics,
            upstreams,
            policies: Policies::new(views, config.default_inbound_policy, peers.clone()),
            config,
            identity,
            peers,
            stacks: Mutex::new(HashMap::new()),
        })
    }

    /// The app's address for an original destination: the original destination itself (the
    /// pod's address: the proxy's uid is not captured, so this reaches the app directly), or
    /// loopback at the same port with `--inbound-target loopback`.
    fn app_of(&self, conn: &Accepted) -> Result<SocketAddr, Reason> {
        let orig = self.lookup.orig_dst(&*self.orig_dst, &conn.socket)?;
        if self.lookup.is_own_port(orig.port()) {
            return Err(self.lookup.refuse_loop(conn.peer));
        }
        if self.config.inbound_target == InboundTarget::OrigDst {
            return Ok(orig);
        }
        let app: IpAddr = if orig.is_ipv4() {
            Ipv4Addr::LOCALHOST.into()
        } else {
            Ipv6Addr::LOCALHOST.into()
        };
        Ok(SocketAddr::new(app, orig.port()))
    }

    /// The client to `app` (built on first use and shared), behind authorization of `peer`.
    fn http_stack(
        &self,
        app: SocketAddr,
        peer: Option<Arc<outrider_control::api::Identity>>,
    ) -> HttpStack {
        let forward = {
            let mut stacks = match self.stacks.lock() {
                Ok(s) => s,
                Err(poisoned) => poisoned.into_inner(),
            };
            if stacks.len() >= MAX_STACKS && !stacks.contains_key(&app) {
                stacks.clear();
            }
            stacks
                .entry(app)
                .or_insert_with(|| {
                    let upstream = self.upstreams.get_or_insert(EndpointKey::plain(app));
                    Forward::to_app(upstream, self.config.upstream_http)
                })
                .clone()
        };
        ServiceBuilder::new()
            .layer(RequestMetricsLayer::new(self.metrics.clone()))
            .layer(RescueLayer::new(self.metrics.clone(), errors::rescue))
            .service(Authorize {
                inner: forward,
                policies: self.policies.clone(),
                port: app.port(),
                peer,
            })
    }
}

impl Serve for Inbound {
    async fn serve(self: Arc<Self>, conn: Accepted) {
        let app = match self.app_of(&conn) {
            Ok(app) => app,
            Err(Reason::Loop) => return,
            Err(reason) => return self.metrics.error(reason),
        };
        // The policy's description is read only when the span is enabled (debug).
        let span = tracing::debug_span!("conn", direction = "inbound", peer = %conn.peer, app = %app,
            policy = self.policies.describe(app.port()), protocol = tracing::field::Empty,
            client_id = tracing::field::Empty);
        self.serve_app(conn, app).instrument(span).await
    }
}

impl Inbound {
    async fn serve_app(&self, conn: Accepted, app: SocketAddr) {
        let Accepted {
            socket,
            guard,
            drain,
            ..
        } = conn;
        let m = &self.metrics;
        // Before the first view the port's policy is unknown: hold the caller (bounded).
        self.policies
            .wait_first_view(self.config.first_view_wait)
            .await;
        let (io, activity) = MeteredIo::accepted(socket, m);
        let (mut io, cut) = Revocable::new(io);
        // An opaque port skips detection, except that a meshed proxy still looks for a mesh
        // ClientHello there (a meshed client always speaks first); whatever else arrives on it
        // stays opaque.
        let opaque_port = self.config.opaque_ports.contains(&app.port());
        let skip = opaque_port && self.identity.is_none();
        let connect = || self.connect.connect(app);
        let mut bounds = self.config.detect_bounds();
        // A silent client may wait for a server that speaks first, but the app is dialled for
        // it only where a plaintext caller could be admitted: nothing reaches the app, not even
        // a TCP handshake, before its caller is authorized (a mesh client speaks first).
        bounds.server_may_speak_first = self.policies.may_admit_plaintext(app.port());
        let Some(detected) = transport::detect(&mut io, skip, bounds, connect, m).await else {
            return;
        };
        let Detected {
            outcome,
            prefix,
            upstream,
        } = detected;
        let open = Open {
            drain,
            guard,
            activity,
            cut,
        };
        let server = match (outcome.protocol(), &self.identity) {
            (Protocol::Tls, Some(identity)) => identity.server_config(),
            _ => None,
        };
        let protocol = match outcome.protocol() {
            Protocol::Http1 | Protocol::Http2 if opaque_port => Protocol::Opaque,
            p => p,
        };
        let port = app.port();
        match (protocol, server) {
            (proto @ (Protocol::Http1 | Protocol::Http2), _) => {
                // A connection dialled while the client was silent is not needed for HTTP.
                drop(upstream);
                let io = PrefixedIo::new(prefix, io);
                let stack = self.http_stack(app, None);
                let ctx = self.context(open, port, None, None, revoke::GRACE);
                server::serve(io, proto, stack, &self.server, ctx, m).await;
            }
            (Protocol::Tls, Some(server)) => {
                let (prefix, alpn) = read_client_hello(&mut io, prefix, bounds.timeout).await;
                let io = PrefixedIo::new(prefix, io);
                if alpn.is_some_and(|a| !a.is_empty()) {
                    self.serve_mesh(io, server, app, open).await;
                } else {
                    // The app's own TLS: passed through, as a plaintext (unauthenticated) caller.
                    let ctx = self.context(open, port, None, None, Duration::ZERO);
                    self.serve_opaque(io, upstream, app, None, ctx).await;
                }
            }
            (Protocol::Tls | Protocol::Opaque, _) => {
                let io = PrefixedIo::new(prefix, io);
                let ctx = self.context(open, port, None, None, Duration::ZERO);
                self.serve_opaque(io, upstream, app, None, ctx).await;
            }
        }
    }

    /// The context of a connection to `port` from `peer`: with a control plane or a mesh
    /// caller, a watcher closes it once the caller is refused (see [`revoke`]), `grace` after
    /// draining it.
    fn context(
        &self,
        open: Open,
        port: u16,
        peer: Option<Arc<outrider_control::api::Identity>>,
        cert: Option<PeerCert>,
        grace: Duration,
    ) -> ConnContext {
        let Open {
            drain,
            guard,
            activity,
            cut,
        } = open;
        let idle_timeout = self.config.tcp_idle_timeout;
        if !self.policies.can_change() && cert.is_none() {
            return ConnContext {
                drain,
                held: guard,
                activity,
                idle_timeout,
            };
        }
        let watched = Watched {
            port,
            peer,
            cert,
            grace,
        };
        let (drain, watcher) = revoke::watch(
            watched,
            self.policies.clone(),
            self.identity.clone(),
            drain,
            cut,
            self.metrics.clone(),
        );
        ConnContext {
            drain,
            held: Arc::new((guard, watcher)),
            activity,
            idle_timeout,
        }
    }

    /// Terminates a meshed client's mutual TLS and serves what its ALPN says it carries.
    async fn serve_mesh<I>(
        &self,
        io: I,
        server: Arc<rustls::ServerConfig>,
        app: SocketAddr,
        open: Open,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let m = &self.metrics;
        let accept = tokio_rustls::TlsAcceptor::from(server).accept(io);
        let tls = match tokio::time::timeout(self.config.tls_handshake_timeout, accept).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                m.handshakes.failed.inc();
                m.error(Reason::TlsFailed);
                tracing::debug!(error = %e, "mesh TLS handshake failed");
                return;
            }
            Err(_) => {
                m.handshakes.failed.inc();
                m.error(Reason::TlsFailed);
                tracing::debug!("mesh TLS handshake timed out");
                return;
            }
        };
        let (_, session) = tls.get_ref();
        if crate::identity::tls::resumed_with_expired_peer(session) {
            m.handshakes.failed.inc();
            m.error(Reason::TlsFailed);
            tracing::debug!("a resumed mesh session whose client certificate has expired");
            return;
        }
        if session.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            m.handshakes.resumed.inc();
        } else {
            m.handshakes.full.inc();
        }
        let chain = session.peer_certificates().unwrap_or_default();
        let peer = chain.first().and_then(|c| identity_of(c).ok());
        let cert = PeerCert::new(chain);
        let alpn = session.alpn_protocol().and_then(Alpn::from_id);
        let (Some(peer), Some(alpn)) = (peer, alpn) else {
            m.error(Reason::TlsFailed);
            tracing::debug!("a mesh connection without a client identity or ALPN marker");
            return;
        };
        self.peers.client(peer.as_str());
        tracing::Span::current().record("client_id", peer.as_str());
        let peer = Arc::new(peer);
        match alpn {
            Alpn::H2 | Alpn::Http1 => {
                let proto = if alpn == Alpn::H2 {
                    Protocol::Http2
                } else {
                    Protocol::Http1
                };
                let stack = self.http_stack(app, Some(peer.clone()));
                // Closed (drained, then cut) when the certificate it was opened with expires or
                // loses its root, like the policy refusing the caller. A calling proxy that
                // renews starts its new requests on a new connection (with the new certificate),
                // so the drain finds this one idle.
                let ctx = self.context(open, app.port(), Some(peer), Some(cert), revoke::GRACE);
                server::serve(tls, proto, stack, &self.server, ctx, m).await;
            }
            Alpn::Opaque => {
                let ctx = self.context(
                    open,
                    app.port(),
                    Some(peer.clone()),
                    Some(cert),
                    Duration::ZERO,
                );
                self.serve_opaque(tls, None, app, Some(&peer), ctx).await
            }
        }
    }

    /// Authorizes the connection, then copies bytes to and from the app.
    async fn serve_opaque<I>(
        &self,
        io: I,
        upstream: Option<crate::transport::connect::Upstream>,
        app: SocketAddr,
        peer: Option<&outrider_control::api::Identity>,
        ctx: ConnContext,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let m = &self.metrics;
        if let Err(denied) = self.policies.check(app.port(), peer) {
            m.error(Reason::Denied);
            tracing::debug!(error = %denied, "closing a denied TCP connection");
            return;
        }
        let copied = async {
            let upstream = match upstream {
                Some(u) => u,
                None => self.connect.connect(app).await?,
            };
            let idle = self.config.tcp_idle_timeout;
            Ok::<_, crate::errors::BoxError>(
                crate::transport::tcp::copy(io, upstream, idle, &ctx.activity).await?,
            )
        };
        match copied.await {
            Ok((tx, rx)) => tracing::debug!(tx, rx, "TCP connection closed"),
            Err(e) => {
                m.error(reason_of(&*e));
                tracing::debug!(error = %Chain(&*e), "TCP forwarding failed");
            }
        }
        drop(ctx);
    }
}

/// What an accepted connection brings along until its caller is known.
struct Open {
    drain: crate::drain::Watch,
    guard: Arc<crate::transport::listen::ConnGuard>,
    activity: crate::transport::io::Activity,
    cut: Arc<Cut>,
}

/// Reads until `prefix` holds a whole ClientHello (within `timeout` and [`MAX_CLIENT_HELLO`]
/// bytes) and returns every byte read with the mesh ALPN markers it offers; `None` when it is
/// not a ClientHello rustls reads (the app's own TLS, or garbage), which is then passed through.
async fn read_client_hello<I: tokio::io::AsyncRead + Unpin>(
    io: &mut I,
    prefix: bytes::Bytes,
    timeout: std::time::Duration,
) -> (bytes::Bytes, Option<Vec<Alpn>>) {
    use tokio::io::AsyncReadExt;
    let mut buf = bytes::BytesMut::from(&prefix[..]);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match offered_alpn(&buf) {
            Ok(Some(alpn)) => return (buf.freeze(), Some(alpn)),
            Err(_) => return (buf.freeze(), None),
            Ok(None) if buf.len() >= MAX_CLIENT_HELLO => return (buf.freeze(), None),
            Ok(None) => {}
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return (buf.freeze(), None),
        }
    }
}
