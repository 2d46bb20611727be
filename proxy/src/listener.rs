//! Accept loops and the per-connection pipeline shared by inbound, outbound and local-mode
//! listeners:
//!
//! ```text
//! accept (bounded by max_connections) → target → loop check → detection → HTTP or opaque TCP
//! ```
//!
//! Targets: inbound forwards to `127.0.0.1:<original port>` (the app in the pod); outbound
//! forwards to the original destination (until discovery lands); local mode forwards to its fixed
//! upstream. A target that is the proxy itself is refused (counted; logged once per listener).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceBuilder;
use tracing::Instrument;

use crate::config::{Config, UpstreamHttp};
use crate::detect::{self, Outcome, Protocol};
use crate::discovery::Discovery;
use crate::drain;
use crate::errors::Reason;
use crate::http::forward::{Forward, StreamContext, Upstreams};
use crate::http::{self as proxy_http, ServerConfig};
use crate::io::{Activity, MeteredIo, PrefixedIo};
use crate::layers::metrics::RequestMetricsLayer;
use crate::layers::rescue::RescueLayer;
use crate::layers::router::RouterLayer;
use crate::layers::timeout::RequestTimeoutLayer;
use crate::metrics::{Direction, DirectionMetrics};
use crate::orig_dst::OrigDst;
use crate::tcp;
use outrider_control::api::{ServiceProtocol, UnknownDestinations};

/// How long a new outbound connection waits for the control plane's first view.
const FIRST_CONFIG_WAIT: Duration = Duration::from_secs(5);

/// How a listener finds where a connection goes.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// Inbound: the app on loopback, at the original destination's port.
    Inbound,
    /// Outbound: the original destination.
    Outbound,
    /// Local mode: a fixed upstream.
    Fixed(SocketAddr),
}

/// Everything a listener's connections share.
pub struct ListenerCtx {
    /// Traffic direction (metrics and logs).
    pub direction: Direction,
    /// How targets are found.
    pub target: Target,
    /// This direction's metric handles.
    pub metrics: Arc<DirectionMetrics>,
    /// Upstream clients, shared by all listeners.
    pub upstreams: Arc<Upstreams>,
    /// The original-destination lookup.
    pub orig_dst: Arc<dyn OrigDst>,
    /// Detection, limits and timeouts.
    pub config: Arc<Config>,
    /// HTTP server limits.
    pub server: ServerConfig,
    /// The proxy's own ports (never a target).
    pub own_ports: Vec<u16>,
    /// Discovery, for outbound and local-mode listeners when a control plane is configured.
    pub discovery: Option<Discovery>,
    /// Open connections allowed (shared by a listener and its IPv6 twin).
    limit: Arc<Semaphore>,
    loop_logged: AtomicBool,
    orig_dst_logged: AtomicBool,
}

impl ListenerCtx {
    /// A context for one listener.
    pub fn new(
        direction: Direction,
        target: Target,
        metrics: Arc<DirectionMetrics>,
        upstreams: Arc<Upstreams>,
        orig_dst: Arc<dyn OrigDst>,
        config: Arc<Config>,
        discovery: Option<Discovery>,
    ) -> Self {
        let server = ServerConfig {
            max_header_bytes: config.max_header_bytes,
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.http_idle_timeout,
        };
        let own_ports = config.own_ports();
        let limit = Arc::new(Semaphore::new(config.max_connections));
        Self {
            direction,
            target,
            metrics,
            upstreams,
            orig_dst,
            config,
            server,
            own_ports,
            discovery: discovery.filter(|_| direction != Direction::Inbound),
            limit,
            loop_logged: AtomicBool::new(false),
            orig_dst_logged: AtomicBool::new(false),
        }
    }

    /// Where `socket` should be forwarded, or why not.
    fn target_of(&self, socket: &TcpStream) -> Result<SocketAddr, Reason> {
        match self.target {
            Target::Fixed(upstream) => Ok(upstream),
            Target::Inbound => {
                let orig = self
                    .orig_dst
                    .orig_dst(socket)
                    .map_err(|e| self.no_orig_dst(&e))?;
                if self.own_ports.contains(&orig.port()) {
                    return Err(Reason::Loop);
                }
                let app: IpAddr = if orig.is_ipv4() {
                    Ipv4Addr::LOCALHOST.into()
                } else {
                    Ipv6Addr::LOCALHOST.into()
                };
                Ok(SocketAddr::new(app, orig.port()))
            }
            Target::Outbound => {
                let orig = self
                    .orig_dst
                    .orig_dst(socket)
                    .map_err(|e| self.no_orig_dst(&e))?;
                let local = socket.local_addr().ok();
                let is_self = Some(orig) == local
                    || ((orig.ip().is_loopback() || orig.ip().is_unspecified())
                        && self.own_ports.contains(&orig.port()));
                if is_self {
                    return Err(Reason::Loop);
                }
                Ok(orig)
            }
        }
    }

    /// Where an opaque connection to `dest` goes: an endpoint of the service at `dest` (weighted
    /// round robin, per connection), or `dest` itself when it is not a service and unknown
    /// destinations pass through.
    fn opaque_endpoint(&self, dest: SocketAddr) -> Result<SocketAddr, Reason> {
        let Some(discovery) = &self.discovery else {
            return Ok(dest);
        };
        let table = discovery.table.borrow().clone();
        if table.version.is_none() {
            return Err(Reason::NoConfig);
        }
        match table.service(&dest) {
            Some(service) => service.pick().map(|e| e.addr).ok_or(Reason::NoEndpoints),
            None if table.unknown == UnknownDestinations::Refuse => Err(Reason::NoRoute),
            None => Ok(dest),
        }
    }

    /// Logs (once per listener at warn, then at debug) a connection without original destination:
    /// traffic that reached the listener without being redirected.
    fn no_orig_dst(&self, e: &std::io::Error) -> Reason {
        if !self.orig_dst_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(direction = self.direction.as_str(), error = %e,
                "cannot read the original destination (logged once per listener; see outrider_errors_total{{reason=\"no-orig-dst\"}})");
        } else {
            tracing::debug!(error = %e, "cannot read the original destination");
        }
        Reason::NoOrigDst
    }

    fn refuse_loop(&self, peer: SocketAddr) {
        self.metrics.loop_refused.inc();
        if !self.loop_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(direction = self.direction.as_str(), %peer,
                "refusing a connection whose target is the proxy itself (logged once per listener; see outrider_loop_refused_total)");
        }
    }
}

/// Accepts connections until the drain starts. At most `max_connections` are open at once; past
/// that the loop waits for one to close before accepting again (the kernel backlog holds the rest).
pub async fn accept_loop(listener: TcpListener, ctx: Arc<ListenerCtx>, mut drain: drain::Watch) {
    let limit = ctx.limit.clone();
    loop {
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
            () = drain.signaled() => break,
        };
        let accepted = tokio::select! {
            res = listener.accept() => res,
            () = drain.signaled() => break,
        };
        match accepted {
            Ok((socket, peer)) => {
                let ctx = ctx.clone();
                let watch = drain.clone();
                tokio::spawn(handle(ctx, socket, peer, watch, permit));
            }
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::debug!(
        direction = ctx.direction.as_str(),
        "listener closed for drain"
    );
}

/// Held for as long as a downstream connection lives, including an upgraded (WebSocket) stream
/// that outlives its HTTP connection: keeps the connection-limit permit and the open-connections
/// gauge right, and counts the close when dropped.
pub struct ConnGuard {
    metrics: Arc<DirectionMetrics>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.metrics.tcp_open_now.dec();
        self.metrics.tcp_close.inc();
    }
}

async fn handle(
    ctx: Arc<ListenerCtx>,
    socket: TcpStream,
    peer: SocketAddr,
    drain: drain::Watch,
    permit: OwnedSemaphorePermit,
) {
    let m = ctx.metrics.clone();
    m.tcp_open.inc();
    m.tcp_open_now.inc();
    let guard = Arc::new(ConnGuard {
        metrics: m.clone(),
        _permit: permit,
    });
    let _ = socket.set_nodelay(true);

    let target = match ctx.target_of(&socket) {
        Ok(target) => target,
        Err(Reason::Loop) => return ctx.refuse_loop(peer),
        Err(reason) => return m.error(reason),
    };
    let span = tracing::debug_span!("conn", direction = ctx.direction.as_str(), %peer, target = %target, protocol = tracing::field::Empty);
    serve(ctx, socket, target, drain, guard)
        .instrument(span)
        .await
}

async fn serve(
    ctx: Arc<ListenerCtx>,
    socket: TcpStream,
    target: SocketAddr,
    drain: drain::Watch,
    guard: Arc<ConnGuard>,
) {
    let m = &ctx.metrics;
    let activity = Activity::new();
    let mut io = MeteredIo::new(
        socket,
        m.tcp_received.clone(),
        m.tcp_sent.clone(),
        activity.clone(),
    );

    if let Some(d) = &ctx.discovery {
        // Before the first view, hold the connection (bounded) rather than bypass the mesh.
        if d.table.borrow().version.is_none() {
            let mut table = d.table.clone();
            let _ =
                tokio::time::timeout(FIRST_CONFIG_WAIT, table.wait_for(|t| t.version.is_some()))
                    .await;
        }
    }
    let opaque_service = ctx.discovery.as_ref().is_some_and(|d| {
        d.table
            .borrow()
            .service(&target)
            .is_some_and(|s| s.protocol == ServiceProtocol::Opaque)
    });
    let (outcome, prefix) = if opaque_service || ctx.config.opaque_ports.contains(&target.port()) {
        (Outcome::Skipped, bytes::Bytes::new())
    } else {
        match detect::detect(
            &mut io,
            ctx.config.detect_timeout,
            ctx.config.detect_max_bytes,
        )
        .await
        {
            Ok(detected) => detected,
            Err(e) => {
                tracing::debug!(error = %e, "connection failed during detection");
                return;
            }
        }
    };
    m.detected(outcome);
    tracing::Span::current().record("protocol", outcome.as_str());
    let io = PrefixedIo::new(prefix, io);

    match outcome.protocol() {
        proto @ (Protocol::Http1 | Protocol::Http2) => {
            let upstream = match ctx.config.upstream_http {
                UpstreamHttp::Same => proto,
                UpstreamHttp::Http1 => Protocol::Http1,
                UpstreamHttp::Http2 => Protocol::Http2,
            };
            let stream = StreamContext {
                drain: drain.clone(),
                held: guard.clone(),
                activity: activity.clone(),
                idle_timeout: ctx.config.tcp_idle_timeout,
            };
            let forward = Forward::new(
                ctx.upstreams.get(target),
                upstream == Protocol::Http2,
                stream,
            );
            let in_flight = Arc::new(AtomicUsize::new(0));
            let router = ctx
                .discovery
                .as_ref()
                .map(|d| RouterLayer::new(d.table.clone(), target));
            let timeout = router.is_some().then_some(RequestTimeoutLayer);
            let stack = ServiceBuilder::new()
                .layer(RequestMetricsLayer::new(m.clone(), in_flight.clone()))
                .layer(RescueLayer::new(m.clone()))
                .option_layer(router)
                .option_layer(timeout)
                .service(forward);
            if let Err(e) =
                proxy_http::serve(io, proto, stack, &ctx.server, drain, activity, in_flight).await
            {
                // hyper answered malformed or oversized requests itself (400, 431): count them.
                if e.is_parse() || e.is_parse_too_large() {
                    m.responses[3].inc();
                    m.error(Reason::BadRequest);
                }
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        }
        Protocol::Tls | Protocol::Opaque => {
            // The drain watch stays alive until the copy ends: opaque streams cannot be asked to
            // close, so a drain waits for them up to the grace deadline.
            let _drain = drain;
            let (connect_timeout, idle) = (ctx.config.connect_timeout, ctx.config.tcp_idle_timeout);
            let endpoint = match ctx.opaque_endpoint(target) {
                Ok(endpoint) => endpoint,
                Err(reason) => {
                    m.error(reason);
                    return tracing::debug!(reason = reason.as_str(), "TCP connection refused");
                }
            };
            ctx.upstreams.count_connect();
            match tcp::forward(io, endpoint, connect_timeout, idle, activity).await {
                Ok((tx, rx)) => tracing::debug!(tx, rx, "TCP connection closed"),
                Err(e) => {
                    m.error(e.reason);
                    tracing::debug!(error = %crate::errors::Chain(&e), "TCP forwarding failed");
                }
            }
        }
    }
}
