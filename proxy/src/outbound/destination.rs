//! Destinations: where outbound connections go (an original destination, or a local-mode
//! upstream), each resolved against discovery and cached with its request stack.
//!
//! [`Destinations`] builds a destination's stack once, on its first connection, and shares it with
//! every later connection and worker, so balancer positions and endpoint connections outlive any
//! one connection; a destination unused for [`IDLE`] is evicted. When discovery publishes a view,
//! every cached destination is resolved again: its [`Profile`] is replaced and its endpoints are
//! updated by [`Change`](tower::discover::Change)s, so unchanged endpoints keep their state.
//! Without a control plane a destination is a passthrough to its own address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use outrider_control::api::{Balancer, ServiceProtocol, UnknownDestinations, WatchResponse};
use prometheus::{IntCounter, IntGauge};
use tokio::sync::watch;
use tokio::time::Instant;

use super::backend::{diff, EndpointMeta, EndpointSet};
use super::endpoint::{BreakerParams, Endpoint, ServiceLoad};
use super::metrics::{ResilienceMetrics, ServiceMetrics};
use super::route::Route;
use crate::discovery::View;
use crate::http::client::{EndpointKey, Upstreams, VersionHint};
use crate::layers::retry::{Budget, RetryStats, Skipped};

/// A destination with no connection for this long is evicted (checked every [`IDLE`] / 2).
pub(crate) const IDLE: Duration = Duration::from_secs(300);

/// Destinations cached per stack at most: past it, the least recently used that no connection
/// holds make room (an app that fans out to many addresses cannot grow the cache without bound).
pub(crate) const MAX_DESTINATIONS: usize = 10_000;

/// What discovery says a destination is.
#[derive(Debug, Clone, Default)]
pub(crate) enum Profile {
    /// No view from the control plane yet.
    #[default]
    NoConfig,
    /// Not a known service: its own address is its only endpoint.
    Passthrough,
    /// Not a known service, and the view refuses unknown destinations.
    Refused,
    /// A service of the mesh.
    Service(ServiceProfile),
}

/// A service's routing data.
#[derive(Debug, Clone)]
pub(crate) struct ServiceProfile {
    /// `namespace/name`.
    pub id: Arc<str>,
    /// Protocol hint.
    pub protocol: ServiceProtocol,
    /// Routes, first match wins.
    pub routes: Vec<Route>,
    /// The balancing rule.
    pub balancer: Balancer,
    /// The endpoints' breaker settings, if any.
    pub breaker: Option<BreakerParams>,
}

impl ServiceProfile {
    /// The HTTP version the service declares for its endpoints.
    pub(crate) fn version_hint(&self) -> VersionHint {
        match self.protocol {
            ServiceProtocol::Http1 => VersionHint::Http1,
            ServiceProtocol::Http2 | ServiceProtocol::Grpc => VersionHint::Http2,
            ServiceProtocol::Detect | ServiceProtocol::Opaque => VersionHint::None,
        }
    }
}

/// A destination as resolved by the latest view.
#[derive(Debug, Default)]
pub(crate) struct Resolved {
    /// What it is.
    pub profile: Profile,
    /// Its endpoints.
    pub endpoints: EndpointSet,
    /// The endpoints' breaker settings (a service's), if any.
    pub breaker: Option<BreakerParams>,
    /// The service's resilience metrics (none for a passthrough).
    pub metrics: Option<Arc<ServiceMetrics>>,
}

/// One destination: its address and its latest resolution.
#[derive(Debug)]
pub(crate) struct Destination {
    addr: SocketAddr,
    state: RwLock<Arc<Resolved>>,
    /// Requests in flight to it, bounded per service.
    load: Arc<ServiceLoad>,
    /// Its retry budget (kept across view updates).
    budget: Arc<Budget>,
}

impl Destination {
    /// The destination's address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A destination at `addr` with nothing resolved yet.
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            state: RwLock::new(Arc::default()),
            load: Arc::default(),
            budget: Arc::new(Budget::new()),
        }
    }

    /// Requests in flight to it.
    pub(crate) fn load(&self) -> &Arc<ServiceLoad> {
        &self.load
    }

    /// Its retry budget.
    pub(crate) fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// The latest resolution (a cheap clone, read per request).
    pub(crate) fn resolved(&self) -> Arc<Resolved> {
        match self.state.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether it is a service whose protocol is declared HTTP (`http1`, `http2`, `grpc`).
    pub(crate) fn is_declared_http(&self) -> bool {
        matches!(&self.resolved().profile, Profile::Service(s) if s.version_hint() != VersionHint::None)
    }

    /// Whether connections to it skip protocol detection (an opaque service).
    pub(crate) fn is_opaque(&self) -> bool {
        matches!(&self.resolved().profile, Profile::Service(s) if s.protocol == ServiceProtocol::Opaque)
    }

    /// Resolves the destination again: against `view` when there is a control plane (`Some`),
    /// else as a passthrough.
    fn update(
        &self,
        view: Option<Option<&Index<'_>>>,
        upstreams: &Upstreams,
        resilience: &ResilienceMetrics,
    ) {
        let (profile, wanted) = match view {
            Some(view) => resolve(self.addr, view),
            None => (Profile::Passthrough, vec![(self.addr, passthrough_meta())]),
        };
        let (balancer, breaker, metrics) = match &profile {
            Profile::Service(s) => (s.balancer, s.breaker, Some(resilience.service(&s.id))),
            _ => (Balancer::P2cEwma, None, None),
        };
        let current = self.resolved();
        let changes = diff(&current.endpoints, &wanted);
        let endpoints = current.endpoints.apply(changes, balancer, |addr, meta| {
            let upstream = upstreams.get_or_insert(EndpointKey {
                addr,
                identity: meta.identity.clone(),
            });
            Arc::new(Endpoint::new(
                addr,
                upstream,
                metrics.as_ref().map(|m| m.endpoint(addr)),
            ))
        });
        let next = Arc::new(Resolved {
            profile,
            endpoints,
            breaker,
            metrics,
        });
        match self.state.write() {
            Ok(mut s) => *s = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }
}

/// Retries are counted in the service's metrics (a passthrough has none).
impl RetryStats for Destination {
    fn retried(&self) {
        if let Some(m) = &self.resolved().metrics {
            m.retried();
        }
    }

    fn skipped(&self, why: Skipped) {
        if let Some(m) = &self.resolved().metrics {
            m.skipped(why);
        }
    }
}

/// The profile and endpoints `view` gives `addr`.
fn resolve(
    addr: SocketAddr,
    view: Option<&Index<'_>>,
) -> (Profile, Vec<(SocketAddr, EndpointMeta)>) {
    let Some(index) = view else {
        return (Profile::NoConfig, Vec::new());
    };
    let view = index.view;
    match index.by_addr.get(&addr).copied() {
        Some(s) => {
            let mut endpoints: Vec<(SocketAddr, EndpointMeta)> =
                Vec::with_capacity(s.endpoints.len());
            for e in &s.endpoints {
                // An address listed twice counts once (the first), so updates do not flip-flop.
                if endpoints.iter().any(|(a, _)| *a == e.address) {
                    continue;
                }
                let meta = EndpointMeta {
                    identity: e.identity.clone(),
                    weight: e.weight,
                };
                endpoints.push((e.address, meta));
            }
            let profile = Profile::Service(ServiceProfile {
                id: Arc::from(s.id()),
                protocol: s.protocol,
                routes: s.routes.iter().map(Route::new).collect(),
                balancer: s.balancer,
                breaker: s.breaker.as_ref().map(BreakerParams::from),
            });
            (profile, endpoints)
        }
        None if view.outbound.unknown_destinations == UnknownDestinations::Refuse => {
            (Profile::Refused, Vec::new())
        }
        None => (Profile::Passthrough, vec![(addr, passthrough_meta())]),
    }
}

fn passthrough_meta() -> EndpointMeta {
    EndpointMeta {
        identity: None,
        weight: 1,
    }
}

/// A view with its services indexed by virtual address (built once per view, not per
/// destination).
struct Index<'a> {
    view: &'a WatchResponse,
    by_addr: HashMap<SocketAddr, &'a outrider_control::api::Service>,
}

impl<'a> Index<'a> {
    fn new(view: &'a WatchResponse) -> Self {
        let mut by_addr = HashMap::new();
        for s in &view.outbound.services {
            for a in &s.addresses {
                by_addr.entry(*a).or_insert(s);
            }
        }
        Self { view, by_addr }
    }
}

/// A cached destination with the stack built for it.
#[derive(Debug)]
pub(crate) struct Entry<S> {
    /// The destination.
    pub dest: Arc<Destination>,
    /// Its HTTP request stack (cloned per connection).
    pub http: S,
    last_used: Mutex<Instant>,
}

/// The destination cache of one outbound stack.
pub(crate) struct Destinations<S> {
    map: Mutex<HashMap<SocketAddr, Arc<Entry<S>>>>,
    upstreams: Arc<Upstreams>,
    views: Option<watch::Receiver<View>>,
    resilience: ResilienceMetrics,
    build: Box<dyn Fn(Arc<Destination>) -> S + Send + Sync>,
    alive: IntGauge,
    builds: IntCounter,
}

impl<S> std::fmt::Debug for Destinations<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destinations").finish_non_exhaustive()
    }
}

impl<S: Send + Sync + 'static> Destinations<S> {
    /// A cache whose destinations resolve against `views` (none: passthrough) and get their
    /// stack from `build`. With views, a task follows them and re-resolves every destination;
    /// another evicts idle ones.
    pub(crate) fn new(
        upstreams: Arc<Upstreams>,
        views: Option<watch::Receiver<View>>,
        build: impl Fn(Arc<Destination>) -> S + Send + Sync + 'static,
        metrics: &crate::metrics::Metrics,
        resilience: ResilienceMetrics,
    ) -> Arc<Self> {
        let (alive, builds) = (
            metrics.destinations.clone(),
            metrics.destination_builds.clone(),
        );
        let this = Arc::new(Self {
            map: Mutex::new(HashMap::new()),
            upstreams,
            views,
            resilience,
            build: Box::new(build),
            alive,
            builds,
        });
        if let Some(views) = this.views.clone() {
            tokio::spawn(follow(Arc::downgrade(&this), views));
        }
        tokio::spawn(evict(Arc::downgrade(&this)));
        this
    }

    /// The destination at `addr` with its stack, built on first use.
    pub(crate) fn get(&self, addr: SocketAddr) -> Arc<Entry<S>> {
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(entry) = map.get(&addr) {
            if let Ok(mut t) = entry.last_used.lock() {
                *t = Instant::now();
            }
            return entry.clone();
        }
        let dest = Arc::new(Destination::new(addr));
        let view = self.views.as_ref().map(|v| v.borrow().clone());
        let index = view.as_ref().map(|v| v.as_deref().map(Index::new));
        dest.update(
            index.as_ref().map(Option::as_ref),
            &self.upstreams,
            &self.resilience,
        );
        if map.len() >= MAX_DESTINATIONS {
            let before = map.len();
            let mut unheld: Vec<(SocketAddr, Instant)> = map
                .iter()
                .filter(|(_, e)| Arc::strong_count(e) == 1)
                .map(|(a, e)| {
                    (
                        *a,
                        e.last_used.lock().map_or_else(|_| Instant::now(), |t| *t),
                    )
                })
                .collect();
            unheld.sort_unstable_by_key(|(_, t)| *t);
            for (a, _) in unheld.iter().take((MAX_DESTINATIONS / 10).max(1)) {
                map.remove(a);
            }
            self.alive.sub((before - map.len()) as i64);
        }
        let entry = Arc::new(Entry {
            http: (self.build)(dest.clone()),
            dest,
            last_used: Mutex::new(Instant::now()),
        });
        map.insert(addr, entry.clone());
        self.builds.inc();
        self.alive.inc();
        entry
    }

    /// Every cached destination.
    pub(crate) fn entries(&self) -> Vec<Arc<Entry<S>>> {
        self.map
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Drops destinations that no connection holds and that were not used for `idle`.
    fn evict_idle(&self, idle: Duration) {
        if let Ok(mut map) = self.map.lock() {
            let before = map.len();
            map.retain(|_, e| {
                Arc::strong_count(e) > 1 || e.last_used.lock().is_ok_and(|t| t.elapsed() < idle)
            });
            // One gauge counts the destinations of every outbound stack: add and subtract.
            self.alive.sub((before - map.len()) as i64);
        }
    }
}

/// Re-resolves every cached destination on each new view, until the cache is dropped.
async fn follow<S: Send + Sync + 'static>(
    cache: std::sync::Weak<Destinations<S>>,
    mut views: watch::Receiver<View>,
) {
    while views.changed().await.is_ok() {
        let Some(cache) = cache.upgrade() else { return };
        let view = views.borrow_and_update().clone();
        let index = view.as_deref().map(Index::new);
        for entry in cache.entries() {
            entry
                .dest
                .update(Some(index.as_ref()), &cache.upstreams, &cache.resilience);
        }
    }
}

async fn evict<S: Send + Sync + 'static>(cache: std::sync::Weak<Destinations<S>>) {
    loop {
        tokio::time::sleep(IDLE / 2).await;
        let Some(cache) = cache.upgrade() else { return };
        cache.evict_idle(IDLE);
    }
}
