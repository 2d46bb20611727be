//! Assembly and lifecycle: bind every listener, serve, and drain on shutdown.
//!
//! Shutdown (SIGTERM, SIGINT or `POST /shutdown`):
//! 1. `/ready` turns 503; inbound and local-mode listeners stop accepting; their HTTP connections
//!    get `Connection: close` / GOAWAY and finish their in-flight requests.
//! 2. The outbound listener keeps serving the app for `drain_window`, then drains the same way.
//! 3. At `shutdown_grace` after the start, whatever is still open is dropped and the process exits.

use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::discovery::Discovery;
use crate::drain;
use crate::http::forward::Upstreams;
use crate::listener::{accept_loop, ListenerCtx, Target};
use crate::log::LogHandle;
use crate::metrics::{Direction, Metrics};
use crate::orig_dst::OrigDst;

/// Starts a graceful shutdown of a running [`Proxy`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    /// Starts the shutdown (idempotent). `why` is logged.
    pub fn trigger(&self, why: &str) {
        if !self.0.send_replace(true) {
            tracing::info!(reason = why, "shutdown requested");
        }
    }
}

/// A proxy with its listeners bound, ready to [`run`](Proxy::run).
pub struct Proxy {
    config: Arc<Config>,
    registry: Registry,
    admin: TcpListener,
    listeners: Vec<(TcpListener, Arc<ListenerCtx>)>,
    log: Option<Arc<LogHandle>>,
    shutdown: ShutdownHandle,
    shutdown_rx: watch::Receiver<bool>,
    ready: Arc<AtomicBool>,
    discovery: Option<Discovery>,
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
    /// Binds the admin server and every configured listener.
    pub async fn bind(
        config: Config,
        orig_dst: Arc<dyn OrigDst>,
        log: Option<LogHandle>,
    ) -> anyhow::Result<Self> {
        let config = Arc::new(config);
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).context("cannot register metrics")?;
        let upstreams = Arc::new(Upstreams::new(
            config.connect_timeout,
            metrics.upstream_connects.clone(),
        ));
        let discovery = match (&config.control, &config.workload) {
            (Some(url), Some(workload)) => Some(Discovery::spawn(
                url,
                workload,
                upstreams.clone(),
                &registry,
            )?),
            _ => None,
        };
        let admin = bind(config.admin, "admin").await?;

        let ctx = |direction: Direction, target: Target| {
            Arc::new(ListenerCtx::new(
                direction,
                target,
                Arc::new(metrics.direction(direction).clone()),
                upstreams.clone(),
                orig_dst.clone(),
                config.clone(),
                discovery.clone(),
            ))
        };
        let mut listeners = Vec::new();
        for (addr, direction, target) in [
            (config.inbound, Direction::Inbound, Target::Inbound),
            (config.outbound, Direction::Outbound, Target::Outbound),
        ] {
            let Some(addr) = addr else { continue };
            let ctx = ctx(direction, target);
            listeners.push((bind(addr, direction.as_str()).await?, ctx.clone()));
            // ip6tables redirects IPv6 traffic to the IPv6 twin of the listener: [::]:15006 for
            // inbound, [::1]:15001 for outbound. Bound when the namespace has IPv6.
            if let Some(twin) = ipv6_twin(addr) {
                match bind_v6_only(twin) {
                    Ok(l) => listeners.push((l, ctx)),
                    Err(e) => {
                        tracing::info!(%twin, error = %e, "no IPv6 listener (IPv6 unavailable?)")
                    }
                }
            }
        }
        for f in &config.forwards {
            let listener = bind(f.listen, "forward").await?;
            listeners.push((listener, ctx(Direction::Forward, Target::Fixed(f.upstream))));
        }
        let (tx, shutdown_rx) = watch::channel(false);
        Ok(Proxy {
            config,
            registry,
            admin,
            listeners,
            log: log.map(Arc::new),
            discovery,
            shutdown: ShutdownHandle(Arc::new(tx)),
            shutdown_rx,
            ready: Arc::new(AtomicBool::new(false)),
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
            .filter(|(_, ctx)| ctx.direction == direction)
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect()
    }

    /// The metric registry (for in-process readers such as the demo).
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    /// The control-plane sync status, when `--control` is set.
    pub fn discovery_status(&self) -> Option<Arc<crate::discovery::SyncStatus>> {
        self.discovery.as_ref().map(|d| d.status.clone())
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
            listeners,
            log,
            shutdown,
            mut shutdown_rx,
            ready,
            discovery,
        } = self;
        let (inbound_drain, inbound_watch) = drain::channel();
        let (outbound_drain, outbound_watch) = drain::channel();
        let mut has_outbound = false;
        for (listener, ctx) in listeners {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(direction = ctx.direction.as_str(), %addr, "listening");
            }
            let watch = if ctx.direction == Direction::Outbound {
                has_outbound = true;
                outbound_watch.clone()
            } else {
                inbound_watch.clone()
            };
            tokio::spawn(accept_loop(listener, ctx, watch));
        }
        drop((inbound_watch, outbound_watch));

        let admin_addr = admin
            .local_addr()
            .map_or_else(|_| config.admin.to_string(), |a| a.to_string());
        let state = Arc::new(AdminState {
            registry,
            ready: ready.clone(),
            config: config.to_json(),
            discovery,
            log,
            shutdown,
        });
        let admin_task = tokio::spawn(admin::serve(admin, state));
        ready.store(true, Ordering::Release);
        tracing::info!(admin = %admin_addr, "proxy ready");

        let _ = shutdown_rx.wait_for(|stop| *stop).await;
        let now = tokio::time::Instant::now();
        let deadline = now.checked_add(config.shutdown_grace).unwrap_or(now);
        ready.store(false, Ordering::Release);
        inbound_drain.start();
        if has_outbound {
            tracing::info!(window = ?config.drain_window, "draining inbound; outbound keeps serving for the drain window");
            tokio::time::sleep(config.drain_window).await;
        }
        outbound_drain.start();
        let drained = tokio::time::timeout_at(deadline, async {
            inbound_drain.finished().await;
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
        Ok(())
    }
}
