//! The outbound stack: the app's own outbound traffic (redirected to :15001), and local mode's
//! `--forward` listeners, which are the same stack with a fixed destination.
//!
//! ```text
//! accept → original destination (or the fixed one) → loop check → destination (cached, resolved
//!   by discovery) → protocol detection
//!   → HTTP: server → request metrics → rescue → load shed → route → request timeout → retry
//!           (budgeted, replayable bodies) → balancer (P2C over peak-EWMA, picked in poll_ready
//!           among ready endpoints; every attempt picks again) → endpoint (in-flight bound,
//!           breaker, load: [`endpoint::Track`]) → client (pooled HTTP/1.1 or multiplexed
//!           HTTP/2) → connect → mutual TLS (endpoints with an identity; their HTTP multiplexed
//!           over one HTTP/2 connection)
//!   → opaque TCP: balancer pick per connection (same rule; breaker) → connect → byte copy
//! ```
//!
//! Everything right of "destination" is built once per destination ([`Destinations`]) and shared
//! by every connection and worker; a connection only clones handles.

pub(crate) mod backend;
pub(crate) mod destination;
pub(crate) mod endpoint;
pub(crate) mod errors;
pub(crate) mod metrics;
pub(crate) mod opaque;
pub(crate) mod route;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tower::load_shed::{LoadShed, LoadShedLayer};
use tower::ServiceBuilder;
use tracing::Instrument;

use self::backend::Balance;
use self::destination::{Destination, Destinations};
use self::route::{Router, RouterLayer};
use crate::config::Config;
use crate::detect::{Detected, Protocol};
use crate::discovery::View;
use crate::errors::{reason_of, Chain, Reason};
use crate::http::client::Upstreams;
use crate::http::server::{self, ConnContext, ServerConfig};
use crate::layers::metrics::{RequestMetrics, RequestMetricsLayer};
use crate::layers::rescue::{Rescue, RescueLayer};
use crate::layers::retry::{Retry, RetryLayer};
use crate::layers::timeout::{RequestTimeoutLayer, Timeout};
use crate::metrics::{DirectionMetrics, Metrics};
use crate::transport::connect::Connect;
use crate::transport::io::{MeteredIo, PrefixedIo};
use crate::transport::listen::{Accepted, Serve};
use crate::transport::orig_dst::{Lookup, OrigDst};
use crate::transport::{self, Ended};

/// How long a new connection waits for the control plane's first view.
const FIRST_VIEW_WAIT: Duration = Duration::from_secs(5);

/// The HTTP stack of one destination (see the module docs).
pub(crate) type HttpStack = RequestMetrics<Rescue<LoadShed<Router<Timeout<Retry<Balance>>>>>>;

/// How the outbound stack finds each connection's destination.
#[derive(Clone)]
pub(crate) enum Mode {
    /// The original destination of each redirected connection (sidecar mode).
    OrigDst(Arc<dyn OrigDst>),
    /// A fixed destination (local mode's `--forward LISTEN=UPSTREAM`).
    Fixed(SocketAddr),
}

/// One outbound stack: a listener's connections, its destinations and their request stacks.
pub(crate) struct Outbound {
    mode: Mode,
    lookup: Lookup,
    metrics: Arc<DirectionMetrics>,
    config: Arc<Config>,
    server: ServerConfig,
    connect: Connect,
    destinations: Arc<Destinations<HttpStack>>,
    views: Option<watch::Receiver<View>>,
}

impl Outbound {
    /// An outbound stack in `mode`, counting into `metrics` (the outbound or forward handles),
    /// with endpoints from `upstreams` and, with a control plane, destinations resolved by `views`.
    pub(crate) fn new(
        mode: Mode,
        metrics: Arc<DirectionMetrics>,
        all: &Metrics,
        resilience: &metrics::ResilienceMetrics,
        config: Arc<Config>,
        upstreams: Arc<Upstreams>,
        views: Option<watch::Receiver<View>>,
    ) -> Arc<Self> {
        let policy = config.upstream_http;
        let default_timeout = config.request_timeout;
        let limits = config.in_flight;
        let stack_metrics = metrics.clone();
        let destinations = Destinations::new(
            upstreams.clone(),
            views.clone(),
            move |dest| http_stack(dest, stack_metrics.clone(), policy, default_timeout, limits),
            all,
            resilience.clone(),
        );
        Arc::new(Self {
            lookup: Lookup::new("outbound", config.own_ports(), metrics.clone()),
            mode,
            server: ServerConfig::from(&*config),
            connect: upstreams.connect().clone(),
            metrics,
            config,
            destinations,
            views,
        })
    }

    fn destination_of(&self, conn: &Accepted) -> Result<SocketAddr, Reason> {
        match &self.mode {
            Mode::Fixed(addr) => Ok(*addr),
            Mode::OrigDst(orig_dst) => {
                let orig = self.lookup.orig_dst(&**orig_dst, &conn.socket)?;
                let local = conn.socket.local_addr().ok();
                let is_self = Some(orig) == local || self.lookup.is_own_loopback(orig);
                if is_self {
                    return Err(self.lookup.refuse_loop(conn.peer));
                }
                Ok(orig)
            }
        }
    }

    /// Every destination in use, with its endpoints' state (`/endpoints`).
    pub(crate) fn endpoints_json(&self) -> serde_json::Value {
        let now = tokio::time::Instant::now();
        let dests: Vec<serde_json::Value> = self
            .destinations
            .entries()
            .iter()
            .map(|entry| {
                let dest = &entry.dest;
                let resolved = dest.resolved();
                let (service, balancer) = match &resolved.profile {
                    destination::Profile::Service(s) => (
                        Some(s.id.to_string()),
                        Some(serde_json::to_value(s.balancer).unwrap_or_default()),
                    ),
                    _ => (None, None),
                };
                let endpoints: Vec<serde_json::Value> = resolved
                    .endpoints
                    .iter()
                    .map(|(e, meta)| {
                        serde_json::json!({
                            "address": e.addr,
                            "identity": meta.identity,
                            "weight": meta.weight,
                            "in_flight": e.pending(),
                            "latency_ms": e.rtt(now).as_secs_f64() * 1000.0,
                            "breaker": e.breaker_state().as_str(),
                        })
                    })
                    .collect();
                serde_json::json!({
                    "destination": dest.addr(),
                    "service": service,
                    "balancer": balancer,
                    "in_flight": dest.load().in_flight(),
                    "breaker": resolved.breaker.map(|b| serde_json::json!({
                        "consecutive_failures": b.consecutive_failures,
                        "open_for_ms": b.open_for.as_millis() as u64,
                    })),
                    "endpoints": endpoints,
                })
            })
            .collect();
        serde_json::json!({ "destinations": dests })
    }

    async fn wait_first_view(&self) {
        if let Some(views) = &self.views {
            // Before the first view, hold the connection (bounded) rather than bypass the mesh.
            if views.borrow().is_none() {
                let mut views = views.clone();
                let _ =
                    tokio::time::timeout(FIRST_VIEW_WAIT, views.wait_for(|v| v.is_some())).await;
            }
        }
    }
}

/// The HTTP request stack of one destination, outermost first. Built once per destination.
fn http_stack(
    dest: Arc<Destination>,
    metrics: Arc<DirectionMetrics>,
    policy: crate::http::client::UpstreamHttp,
    default_timeout: Option<Duration>,
    limits: endpoint::Limits,
) -> HttpStack {
    ServiceBuilder::new()
        // Every request and response counted, local answers included.
        .layer(RequestMetricsLayer::new(metrics.clone()))
        // Errors become responses (503/504/502, gRPC statuses), counted by reason.
        .layer(RescueLayer::new(metrics, errors::rescue))
        // Anything below that is not ready is answered at once, never queued (the balancer
        // fails readiness when no endpoint is ready, rather than waits).
        .layer(LoadShedLayer::new())
        // The matching route's timeout, retry policy and name.
        .layer(RouterLayer::new(dest.clone(), default_timeout))
        // The whole request, retries and their backoff included.
        .layer(RequestTimeoutLayer)
        // Budgeted per service; each attempt polls the balancer again, so it picks again.
        .layer(RetryLayer::new(dest.budget().clone(), dest.clone()))
        // The balancer picks a ready endpoint; the request is tracked there (load, breaker,
        // in-flight bound), then the client → connect → mutual TLS.
        .service(Balance::new(dest, policy, limits))
}

impl Serve for Outbound {
    async fn serve(self: Arc<Self>, conn: Accepted) {
        let dest = match self.destination_of(&conn) {
            Ok(dest) => dest,
            Err(Reason::Loop) => return,
            Err(reason) => return self.metrics.error(reason),
        };
        let span = tracing::debug_span!("conn", direction = "outbound", peer = %conn.peer, dest = %dest, protocol = tracing::field::Empty);
        self.serve_dest(conn, dest).instrument(span).await
    }
}

impl Outbound {
    async fn serve_dest(&self, conn: Accepted, dest: SocketAddr) {
        let Accepted {
            socket,
            guard,
            drain,
            ..
        } = conn;
        let m = &self.metrics;
        self.wait_first_view().await;
        let entry = self.destinations.get(dest);
        let (mut io, activity) = MeteredIo::accepted(socket, m);
        let skip = entry.dest.is_opaque() || self.config.opaque_ports.contains(&dest.port());
        let connect = || opaque::connect(&entry.dest, &self.connect, self.config.in_flight);
        let mut bounds = self.config.detect_bounds();
        // A service declared HTTP has no server that speaks first: no upstream connection is
        // kept for a silent client.
        bounds.server_may_speak_first = !entry.dest.is_declared_http();
        // A sidecar is transparent: a client silent for a moment gets its upstream dialled, so
        // that an address where nothing listens refuses it at once (a reset), as it would
        // without the mesh. Local mode is an explicit proxy: it answers 502 instead.
        let sidecar = matches!(self.mode, Mode::OrigDst(_));
        if sidecar {
            bounds.early_dial = Some(crate::detect::EARLY_DIAL_GRACE);
        }
        let detected = transport::detect_or_end(&mut io, skip, bounds, connect, m).await;
        let detected = match detected {
            Ok(detected) => detected,
            Err(Ended::DialFailed) if sidecar => {
                return transport::reset_on_close(io.get_ref());
            }
            Err(_) => return,
        };
        let Detected {
            outcome,
            prefix,
            upstream,
        } = detected;
        let io = PrefixedIo::new(prefix, io);
        match outcome.protocol() {
            proto @ (Protocol::Http1 | Protocol::Http2) => {
                // A connection dialled while the client was silent is not needed for HTTP.
                drop(upstream);
                let ctx = ConnContext {
                    drain,
                    held: guard,
                    activity,
                    idle_timeout: self.config.tcp_idle_timeout,
                };
                server::serve(io, proto, entry.http.clone(), &self.server, ctx, m).await;
            }
            Protocol::Tls | Protocol::Opaque => {
                // The drain watch and the guard live until the copy ends: opaque streams cannot
                // be asked to close, so a drain waits for them up to the grace deadline.
                let _held = (drain, guard);
                let limits = self.config.in_flight;
                let upstream = match upstream {
                    Some(u) => u,
                    None => match opaque::connect(&entry.dest, &self.connect, limits).await {
                        Ok(u) => u,
                        Err(e) => {
                            m.error(reason_of(&*e));
                            tracing::debug!(error = %Chain(&*e), "cannot reach the upstream");
                            if sidecar {
                                // Refused stays refused (see above).
                                transport::reset_on_close(io.get_ref().get_ref());
                            }
                            return;
                        }
                    },
                };
                let idle = self.config.tcp_idle_timeout;
                match transport::tcp::copy(io, upstream, idle, &activity).await {
                    Ok((tx, rx)) => tracing::debug!(tx, rx, "TCP connection closed"),
                    Err(e) => {
                        m.error(reason_of(&e));
                        tracing::debug!(error = %e, "TCP forwarding failed");
                    }
                }
            }
        }
    }
}
