//! The assembly: bind every listener, build the inbound and outbound stacks once, serve the admin
//! API, and drain on shutdown.
//!
//! Shutdown (SIGTERM, SIGINT or `POST /shutdown`):
//! 1. `/ready` turns 503; inbound and local-mode connections drain (HTTP/1 answers its next
//!    requests with `Connection: close`, HTTP/2 gets GOAWAY), but their listeners keep accepting
//!    for `drain_window`; the outbound listener keeps serving the app as usual.
//! 2. At the end of the window every listener stops accepting; outbound connections drain the
//!    same way, and idle HTTP/1 connections are closed one more `drain_window` later.
//! 3. At `shutdown_grace` after the start, whatever is still open is dropped and the process exits.

use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context as _;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::discovery::Discovery;
use crate::drain::{self, ShutdownHandle};
use crate::http::client::Upstreams;
use crate::identity::certify::{Certify, IdentityMetrics, Renewal, TokenSource};
use crate::identity::IdentityStore;
use crate::inbound::Inbound;
use crate::log::LogHandle;
use crate::metrics::{Direction, DirectionMetrics, Metrics};
use crate::outbound::{self, Outbound};
use crate::readiness::{BlockReady, Readiness};
use crate::transport::connect::Connect;
use crate::transport::listen::{accept_loop, Limit};
use crate::transport::orig_dst::OrigDst;

/// How often the `--trust-anchors` file is checked for a change.
const CONTROL_TRUST_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// One bound listener and the stack that serves it.
enum Stack {
    Inbound(Arc<Inbound>),
    Outbound(Arc<Outbound>),
}

struct Listener {
    socket: TcpListener,
    direction: Direction,
    stack: Stack,
    limit: Arc<Limit>,
    metrics: Arc<DirectionMetrics>,
}

/// A proxy with its listeners bound, ready to [`run`](Proxy::run).
pub struct Proxy {
    config: Arc<Config>,
    registry: Registry,
    admin: TcpListener,
    /// The admin listener's IPv6 twin, where the namespace has IPv6 (IPv6-only clusters probe
    /// `[podIP]:15020`).
    admin_v6: Option<TcpListener>,
    listeners: Vec<Listener>,
    log: Option<Arc<LogHandle>>,
    shutdown: ShutdownHandle,
    shutdown_rx: watch::Receiver<bool>,
    readiness: Readiness,
    listening: BlockReady,
    discovery: Option<Discovery>,
    identity: Option<Arc<IdentityStore>>,
    next_renewal: crate::identity::certify::NextRenewal,
}

/// Where a proxy's certificate comes from: who signs its CSRs, and with which token.
pub struct IdentitySource {
    /// The signer: the control plane's certify API, or a CA in process (the demo).
    pub ca: Arc<dyn Certify>,
    /// The bootstrap token.
    pub token: TokenSource,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind the {what} listener on {addr}"))
}

/// The IPv6 counterpart of an IPv4 wildcard or loopback listener address.
fn ipv6_twin(addr: SocketAddr) -> Option<SocketAddr> {
    match addr {
        SocketAddr::V4(v4) if v4.ip().is_unspecified() && v4.port() != 0 => {
            Some(SocketAddr::from((Ipv6Addr::UNSPECIFIED, v4.port())))
        }
        SocketAddr::V4(v4) if v4.ip().is_loopback() && v4.port() != 0 => {
            Some(SocketAddr::from((Ipv6Addr::LOCALHOST, v4.port())))
        }
        _ => None,
    }
}

/// Binds an IPv6-only listener, so it can share its port with the IPv4 one.
fn bind_v6_only(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
    socket.set_only_v6(true)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

impl Proxy {
    /// Binds the admin server and every configured listener, and builds the stacks, with metrics
    /// registered on `registry`.
    pub async fn bind(
        config: Config,
        orig_dst: Arc<dyn OrigDst>,
        log: Option<LogHandle>,
        registry: Registry,
    ) -> anyhow::Result<Self> {
        let identity = crate::identity_source(&config)?;
        Self::bind_with_identity(config, orig_dst, log, registry, identity).await
    }

    /// [`bind`](Self::bind), with the proxy's certificate from `identity` (none: no mTLS).
    pub async fn bind_with_identity(
        config: Config,
        orig_dst: Arc<dyn OrigDst>,
        log: Option<LogHandle>,
        registry: Registry,
        identity: Option<IdentitySource>,
    ) -> anyhow::Result<Self> {
        let config = Arc::new(config);
        let metrics = Metrics::register(&registry).context("cannot register metrics")?;
        // Once per proxy: every outbound stack (sidecar and local mode) counts into them.
        let resilience = outbound::metrics::ResilienceMetrics::register(&registry)
            .context("cannot register metrics")?;
        let readiness = Readiness::new();
        let listening = readiness.block("listeners");
        let mut connect = Connect::new(
            config.connect_timeout,
            metrics.upstream_connects.clone(),
            config.max_upstream_connections,
        );
        let next_renewal = crate::identity::certify::NextRenewal::default();
        let store = match identity {
            Some(source) => {
                let store = IdentityStore::new();
                connect = connect.with_tls(store.clone(), metrics.outbound.handshakes.clone());
                let renewal = Renewal {
                    store: store.clone(),
                    ca: source.ca,
                    token: source.token,
                    metrics: IdentityMetrics::register(&registry)
                        .context("cannot register metrics")?,
                    next: next_renewal.clone(),
                    readiness: readiness.clone(),
                };
                tokio::spawn(renewal.run(readiness.block("the first certificate")));
                Some(store)
            }
            None => None,
        };
        if let Some(trust) = &config.control_trust {
            tokio::spawn(trust.clone().follow(store.clone(), CONTROL_TRUST_CHECK));
        }
        let upstreams = Arc::new(Upstreams::new(connect));
        let discovery = match (&config.control, &config.workload) {
            (Some(url), Some(workload)) => Some(Discovery::spawn(
                url,
                workload,
                config.control_tls.clone(),
                store.clone(),
                &registry,
                readiness.clone(),
            )?),
            _ => None,
        };
        let views = discovery.as_ref().map(Discovery::views);
        let admin = bind(config.admin, "admin").await?;
        let admin_v6 = ipv6_twin(config.admin).and_then(|twin| match bind_v6_only(twin) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::info!(%twin, error = %e, "no IPv6 admin listener (IPv6 unavailable?)");
                None
            }
        });

        let mut listeners = Vec::new();
        let mut add = |socket, direction: Direction, stack: &Stack, limit: &Arc<Limit>| {
            let metrics = Arc::new(metrics.direction(direction).clone());
            let stack = match stack {
                Stack::Inbound(s) => Stack::Inbound(s.clone()),
                Stack::Outbound(s) => Stack::Outbound(s.clone()),
            };
            listeners.push(Listener {
                socket,
                direction,
                stack,
                limit: limit.clone(),
                metrics,
            });
        };
        let handles = |d: Direction| Arc::new(metrics.direction(d).clone());
        let limit = |d: Direction| {
            Limit::new(
                config.max_connections,
                metrics.direction(d).limit_reached.clone(),
            )
        };
        if let Some(addr) = config.inbound {
            let stack = Stack::Inbound(Inbound::new(
                orig_dst.clone(),
                handles(Direction::Inbound),
                config.clone(),
                upstreams.clone(),
                views.clone(),
                store.clone(),
                metrics.peers.clone(),
            ));
            bind_with_twin(
                addr,
                Direction::Inbound,
                &stack,
                &limit(Direction::Inbound),
                &mut add,
            )
            .await?;
        }
        if let Some(addr) = config.outbound {
            let stack = Stack::Outbound(Outbound::new(
                outbound::Mode::OrigDst(orig_dst.clone()),
                handles(Direction::Outbound),
                &metrics,
                &resilience,
                config.clone(),
                upstreams.clone(),
                views.clone(),
            ));
            bind_with_twin(
                addr,
                Direction::Outbound,
                &stack,
                &limit(Direction::Outbound),
                &mut add,
            )
            .await?;
        }
        for f in &config.forwards {
            // Local mode: the outbound stack with a fixed destination.
            let stack = Stack::Outbound(Outbound::new(
                outbound::Mode::Fixed(f.upstream),
                handles(Direction::Forward),
                &metrics,
                &resilience,
                config.clone(),
                upstreams.clone(),
                views.clone(),
            ));
            let socket = bind(f.listen, "forward").await?;
            add(
                socket,
                Direction::Forward,
                &stack,
                &limit(Direction::Forward),
            );
        }
        let (shutdown, shutdown_rx) = ShutdownHandle::new();
        Ok(Proxy {
            config,
            registry,
            admin,
            admin_v6,
            listeners,
            log: log.map(Arc::new),
            discovery,
            identity: store,
            next_renewal,
            shutdown,
            shutdown_rx,
            readiness,
            listening,
        })
    }

    /// The admin server's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.config.admin)
    }

    /// Bound addresses of the listeners of `direction`, in configuration order (an IPv6 twin
    /// follows its IPv4 listener).
    pub fn listener_addrs(&self, direction: Direction) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter(|l| l.direction == direction)
            .filter_map(|l| l.socket.local_addr().ok())
            .collect()
    }

    /// The proxy's identity, when it has one configured.
    pub fn identity(&self) -> Option<Arc<IdentityStore>> {
        self.identity.clone()
    }

    /// The proxy's readiness.
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// A handle that starts a graceful shutdown.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Serves until shutdown is triggered, then drains (see the module docs) and returns.
    pub async fn run(self) -> anyhow::Result<()> {
        let Proxy {
            config,
            registry,
            admin,
            admin_v6,
            listeners,
            log,
            shutdown,
            mut shutdown_rx,
            readiness,
            listening,
            discovery,
            identity,
            next_renewal,
        } = self;
        // Each group has two signals: its listeners stop accepting (`*_stop`), and its
        // connections drain (`*_drain`); `finished` waits for every accept loop and connection.
        let (inbound_stop, inbound_stop_watch) = drain::channel();
        let (inbound_drain, inbound_watch) = drain::channel();
        let (outbound_stop, outbound_stop_watch) = drain::channel();
        let (outbound_drain, outbound_watch) = drain::channel();
        // The outbound stacks, for `/endpoints` (a twin listener shares its stack: once each).
        let mut outbounds: Vec<Arc<Outbound>> = Vec::new();
        for l in &listeners {
            if let Stack::Outbound(s) = &l.stack {
                if !outbounds.iter().any(|o| Arc::ptr_eq(o, s)) {
                    outbounds.push(s.clone());
                }
            }
        }
        for l in listeners {
            if let Ok(addr) = l.socket.local_addr() {
                tracing::info!(direction = l.direction.as_str(), %addr, "listening");
            }
            let (stop, watch) = if l.direction == Direction::Outbound {
                (outbound_stop_watch.clone(), outbound_watch.clone())
            } else {
                (inbound_stop_watch.clone(), inbound_watch.clone())
            };
            match l.stack {
                Stack::Inbound(s) => {
                    tokio::spawn(accept_loop(l.socket, s, l.limit, l.metrics, stop, watch))
                }
                Stack::Outbound(s) => {
                    tokio::spawn(accept_loop(l.socket, s, l.limit, l.metrics, stop, watch))
                }
            };
        }
        drop((inbound_watch, outbound_watch));
        drop((inbound_stop_watch, outbound_stop_watch));

        let admin_addr = admin
            .local_addr()
            .map_or_else(|_| config.admin.to_string(), |a| a.to_string());
        let state = Arc::new(AdminState {
            registry,
            readiness: readiness.clone(),
            config: config.to_json(),
            app_probes: config.app_probes.clone(),
            discovery,
            log,
            shutdown,
            identity: identity.map(|store| (store, next_renewal)),
            outbounds,
        });
        let admin_v6_task = admin_v6.map(|l| tokio::spawn(admin::serve(l, state.clone())));
        let admin_task = tokio::spawn(admin::serve(admin, state));
        drop(listening);
        tracing::info!(admin = %admin_addr, "proxy started");

        let _ = shutdown_rx.wait_for(|stop| *stop).await;
        let now = tokio::time::Instant::now();
        let deadline = now.checked_add(config.shutdown_grace).unwrap_or(now);
        readiness.drain();
        // Inbound and local-mode listeners keep accepting for the drain window (Kubernetes
        // keeps sending for a while after a pod starts terminating), their connections already
        // draining: HTTP/1 answers with `Connection: close`, HTTP/2 gets GOAWAY. Outbound keeps
        // serving the app as usual for the window.
        inbound_drain.start();
        tracing::info!(window = ?config.drain_window, "draining: listeners keep accepting for the drain window");
        tokio::time::sleep(config.drain_window).await;
        inbound_stop.start();
        outbound_stop.start();
        outbound_drain.start();
        let drained = tokio::time::timeout_at(deadline, async {
            inbound_stop.finished().await;
            inbound_drain.finished().await;
            outbound_stop.finished().await;
            outbound_drain.finished().await;
        })
        .await;
        match drained {
            Ok(()) => tracing::info!("drained; exiting"),
            Err(_) => tracing::warn!(
                open = inbound_drain.in_flight() + outbound_drain.in_flight(),
                "shutdown grace deadline passed; dropping the connections still open"
            ),
        }
        admin_task.abort();
        if let Some(t) = admin_v6_task {
            t.abort();
        }
        Ok(())
    }
}

/// Binds `addr` and, where the namespace has IPv6, its twin: ip6tables redirects IPv6 traffic to
/// `[::]:15006` for inbound and `[::1]:15001` for outbound. Both share one connection bound.
async fn bind_with_twin(
    addr: SocketAddr,
    direction: Direction,
    stack: &Stack,
    limit: &Arc<Limit>,
    add: &mut impl FnMut(TcpListener, Direction, &Stack, &Arc<Limit>),
) -> anyhow::Result<()> {
    add(
        bind(addr, direction.as_str()).await?,
        direction,
        stack,
        limit,
    );
    if let Some(twin) = ipv6_twin(addr) {
        match bind_v6_only(twin) {
            Ok(l) => add(l, direction, stack, limit),
            Err(e) => tracing::info!(%twin, error = %e, "no IPv6 listener (IPv6 unavailable?)"),
        }
    }
    Ok(())
}
