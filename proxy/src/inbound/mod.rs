//! The inbound stack: traffic arriving at the pod (redirected to :15006), forwarded to the app.
//!
//! ```text
//! accept → original destination → loop check → server policy for the port
//!   → [TLS detect/terminate (peer identity) → authorization]
//!   → protocol detection
//!   → HTTP: server → request metrics → rescue → client (the app, at the original destination)
//!   → opaque TCP: connect → byte copy
//! ```
//!
//! The request stack to each app port is built once and shared by every connection.

pub mod errors;
pub mod policy;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tower::ServiceBuilder;
use tracing::Instrument;

use self::policy::Policies;
use crate::config::{Config, InboundTarget};
use crate::detect::{Detected, Protocol};
use crate::discovery::View;
use crate::errors::{reason_of, Chain, Reason};
use crate::http::client::{EndpointKey, Forward, Upstreams};
use crate::http::server::{self, ConnContext, ServerConfig};
use crate::layers::metrics::{RequestMetrics, RequestMetricsLayer};
use crate::layers::rescue::{Rescue, RescueLayer};
use crate::metrics::DirectionMetrics;
use crate::transport;
use crate::transport::connect::Connect;
use crate::transport::io::{Activity, MeteredIo, PrefixedIo};
use crate::transport::listen::{Accepted, Serve};
use crate::transport::orig_dst::{Lookup, OrigDst};

/// The HTTP stack to one app port.
pub type HttpStack = RequestMetrics<Rescue<Forward>>;

/// App ports whose stacks are kept (a pod has a handful; the bound only guards memory).
const MAX_STACKS: usize = 1024;

/// The inbound stack of a proxy.
pub struct Inbound {
    orig_dst: Arc<dyn OrigDst>,
    lookup: Lookup,
    metrics: Arc<DirectionMetrics>,
    config: Arc<Config>,
    server: ServerConfig,
    upstreams: Arc<Upstreams>,
    connect: Connect,
    policies: Policies,
    stacks: Mutex<HashMap<SocketAddr, HttpStack>>,
}

impl Inbound {
    /// The inbound stack, counting into `metrics`, reading server policies from `views`.
    pub fn new(
        orig_dst: Arc<dyn OrigDst>,
        metrics: Arc<DirectionMetrics>,
        config: Arc<Config>,
        upstreams: Arc<Upstreams>,
        views: Option<watch::Receiver<View>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            orig_dst,
            lookup: Lookup::new("inbound", config.own_ports(), metrics.clone()),
            server: ServerConfig::from(&*config),
            connect: upstreams.connect().clone(),
            metrics,
            config,
            upstreams,
            policies: Policies::new(views),
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

    /// The HTTP stack to `app`, built on first use.
    fn http_stack(&self, app: SocketAddr) -> HttpStack {
        let mut stacks = match self.stacks.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(stack) = stacks.get(&app) {
            return stack.clone();
        }
        if stacks.len() >= MAX_STACKS {
            stacks.clear();
        }
        let upstream = self.upstreams.get_or_insert(EndpointKey { addr: app });
        let stack = ServiceBuilder::new()
            .layer(RequestMetricsLayer::new(self.metrics.clone()))
            .layer(RescueLayer::new(self.metrics.clone(), errors::rescue))
            // [authorization of the peer's identity against the port's policy]
            .service(Forward::to_app(upstream, self.config.upstream_http));
        stacks.insert(app, stack.clone());
        stack
    }
}

impl Serve for Inbound {
    async fn serve(self: Arc<Self>, conn: Accepted) {
        let app = match self.app_of(&conn) {
            Ok(app) => app,
            Err(Reason::Loop) => return,
            Err(reason) => return self.metrics.error(reason),
        };
        let policy = self.policies.for_port(app.port());
        let span = tracing::debug_span!("conn", direction = "inbound", peer = %conn.peer, app = %app,
            policy = policy.as_ref().map(|p| if p.plaintext { "plaintext allowed" } else { "authenticated only" }),
            protocol = tracing::field::Empty);
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
        let activity = Activity::new();
        let mut io = MeteredIo::new(
            socket,
            m.tcp_received.clone(),
            m.tcp_sent.clone(),
            activity.clone(),
        );
        let skip = self.config.opaque_ports.contains(&app.port());
        let connect = || self.connect.connect(app);
        let bounds = self.config.detect_bounds();
        let Some(detected) = transport::detect(&mut io, skip, bounds, connect, m).await else {
            return;
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
                server::serve(io, proto, self.http_stack(app), &self.server, ctx, m).await;
            }
            Protocol::Tls | Protocol::Opaque => {
                let _held = (drain, guard);
                let copied = async {
                    let upstream = match upstream {
                        Some(u) => u,
                        None => self.connect.connect(app).await?,
                    };
                    let idle = self.config.tcp_idle_timeout;
                    Ok::<_, crate::errors::BoxError>(
                        crate::transport::tcp::copy(io, upstream, idle, &activity).await?,
                    )
                };
                match copied.await {
                    Ok((tx, rx)) => tracing::debug!(tx, rx, "TCP connection closed"),
                    Err(e) => {
                        m.error(reason_of(&*e));
                        tracing::debug!(error = %Chain(&*e), "TCP forwarding failed");
                    }
                }
            }
        }
    }
}
