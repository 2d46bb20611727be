//! Discovery: the proxy's copy of what the control plane says about its outbound traffic.
//!
//! A background task long-polls the control plane ([`outrider_control::client::Watcher`]) and, for
//! every new view, builds an [`OutboundTable`] (virtual address → service, with endpoint clients
//! and compiled routes) and publishes it through a `watch` channel. Connections and requests read
//! the latest table without locks on the request path; an update never touches open connections,
//! it only changes where the next request goes.
//!
//! If the control plane is unreachable or answers nonsense, the last good table stays in force and
//! the task retries with jittered exponential backoff (100 ms to 5 s). Sync state is exported as
//! metrics and on the admin `/config`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::request::Parts;
use outrider_control::api::{RouteMatch, ServiceProtocol, UnknownDestinations, WatchResponse};
use outrider_control::client::{Backoff, Watcher};
use prometheus::{IntCounter, IntGauge, Registry};
use tokio::sync::watch;

use crate::http::forward::{Upstream, Upstreams};

/// One endpoint, with its connections (shared with every other table that names it).
#[derive(Debug)]
pub struct EndpointEntry {
    /// Where to connect.
    pub addr: SocketAddr,
    /// The identity it must present (used by mTLS, later).
    pub identity: Option<String>,
    /// Its connections (shared with every table that names the same address).
    pub upstream: Arc<Upstream>,
}

/// A compiled route.
#[derive(Debug)]
pub struct RouteEntry {
    /// Route name (shared: requests carry it without copying).
    pub name: Arc<str>,
    matches: RouteMatch,
    /// Timeout until the response headers arrive.
    pub timeout: Option<Duration>,
}

impl RouteEntry {
    fn matches(&self, req: &Parts) -> bool {
        let m = &self.matches;
        let path = req.uri.path();
        m.path.as_ref().is_none_or(|p| p == path)
            && m.path_prefix
                .as_ref()
                .is_none_or(|p| path.starts_with(p.as_str()))
            && m.method
                .as_ref()
                .is_none_or(|meth| meth == req.method.as_str())
            && m.headers.iter().all(|(k, v)| {
                req.headers
                    .get(k)
                    .is_some_and(|h| h.as_bytes() == v.as_bytes())
            })
    }
}

/// A service as the data plane uses it.
#[derive(Debug)]
pub struct ServiceEntry {
    /// `namespace/name`.
    pub id: String,
    /// Protocol hint.
    pub protocol: ServiceProtocol,
    /// Endpoints.
    pub endpoints: Vec<Arc<EndpointEntry>>,
    /// Weighted round-robin order: endpoint indexes, each repeated by its weight.
    schedule: Schedule,
    next: AtomicUsize,
    /// Routes, first match wins.
    pub routes: Vec<RouteEntry>,
}

impl ServiceEntry {
    /// The next endpoint in weighted round-robin order; `None` if the service has none.
    pub fn pick(&self) -> Option<&Arc<EndpointEntry>> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) as u64;
        self.endpoints.get(self.schedule.index(n)?)
    }

    /// The first route matching the request.
    pub fn route(&self, req: &Parts) -> Option<&RouteEntry> {
        self.routes.iter().find(|r| r.matches(req))
    }
}

/// The outbound table: one version of the workload's view, ready for the data plane.
#[derive(Debug, Default)]
pub struct OutboundTable {
    /// The view's version (`None` before the first view).
    pub version: Option<String>,
    /// Policy for destinations not in the table.
    pub unknown: UnknownDestinations,
    /// Services by virtual address.
    pub by_addr: HashMap<SocketAddr, Arc<ServiceEntry>>,
    /// The view itself (for `/config`).
    pub view: Option<Arc<WatchResponse>>,
}

impl OutboundTable {
    /// Compiles `view`; endpoint clients come from `upstreams`, so pools survive updates.
    pub fn build(view: WatchResponse, upstreams: &Upstreams) -> Self {
        let mut by_addr = HashMap::new();
        for svc in &view.outbound.services {
            let endpoints: Vec<Arc<EndpointEntry>> = svc
                .endpoints
                .iter()
                .map(|e| {
                    Arc::new(EndpointEntry {
                        addr: e.address,
                        identity: e.identity.as_ref().map(ToString::to_string),
                        upstream: upstreams.get(e.address),
                    })
                })
                .collect();
            let weights: Vec<u32> = svc.endpoints.iter().map(|e| e.weight).collect();
            let schedule = Schedule::new(&weights);
            let entry = Arc::new(ServiceEntry {
                id: svc.id(),
                protocol: svc.protocol,
                endpoints,
                schedule,
                // A random start, so proxies (and rebuilt tables) do not all begin at endpoint 0.
                next: AtomicUsize::new(random_start()),
                routes: svc
                    .routes
                    .iter()
                    .map(|r| RouteEntry {
                        name: Arc::from(r.name.as_str()),
                        matches: r.matches.clone(),
                        timeout: r.timeout_ms.map(Duration::from_millis),
                    })
                    .collect(),
            });
            for addr in &svc.addresses {
                by_addr.insert(*addr, entry.clone());
            }
        }
        OutboundTable {
            version: Some(view.version.clone()),
            unknown: view.outbound.unknown_destinations,
            by_addr,
            view: Some(Arc::new(view)),
        }
    }

    /// The same table (services shared, not rebuilt).
    fn clone_shallow(t: &OutboundTable) -> OutboundTable {
        OutboundTable {
            version: t.version.clone(),
            unknown: t.unknown,
            by_addr: t.by_addr.clone(),
            view: t.view.clone(),
        }
    }

    /// The service at `addr`.
    pub fn service(&self, addr: &SocketAddr) -> Option<&Arc<ServiceEntry>> {
        self.by_addr.get(addr)
    }
}

/// Longest weighted round-robin cycle kept per service; beyond it, weighted random.
const MAX_CYCLE: u64 = 65_536;

/// How a service's endpoints take turns.
#[derive(Debug)]
enum Schedule {
    /// Exact weighted round robin: endpoint indexes, each spread over the cycle.
    Cycle(Vec<u32>),
    /// Weights too large for a cycle: a weighted pick from running weight totals, driven by a
    /// hash of the request counter (no lock, no shared random state).
    Weighted(Vec<u64>),
}

impl Schedule {
    /// Weights are divided by their greatest common divisor first; the cycle is exact when the
    /// reduced total fits in [`MAX_CYCLE`] slots, so memory stays bounded whatever the weights.
    fn new(weights: &[u32]) -> Self {
        fn gcd(a: u64, b: u64) -> u64 {
            if b == 0 {
                a
            } else {
                gcd(b, a % b)
            }
        }
        let weights: Vec<u64> = weights.iter().map(|w| u64::from((*w).max(1))).collect();
        let g = weights.iter().copied().fold(0, gcd).max(1);
        let reduced: Vec<u64> = weights.iter().map(|w| w / g).collect();
        if reduced.iter().sum::<u64>() > MAX_CYCLE {
            let totals = reduced.iter().scan(0u64, |acc, w| {
                *acc += w;
                Some(*acc)
            });
            return Schedule::Weighted(totals.collect());
        }
        let mut keyed: Vec<(u128, u32)> = Vec::new();
        for (i, n) in reduced.iter().enumerate() {
            for k in 0..*n {
                // Slot k of n sits at (2k + 1) / 2n of the cycle.
                keyed.push(((u128::from(2 * k + 1) << 32) / u128::from(2 * n), i as u32));
            }
        }
        keyed.sort_unstable();
        Schedule::Cycle(keyed.into_iter().map(|(_, i)| i).collect())
    }

    /// The endpoint index for the `n`th pick; `None` without endpoints.
    fn index(&self, n: u64) -> Option<usize> {
        match self {
            Schedule::Cycle(cycle) if !cycle.is_empty() => {
                Some(cycle[(n % cycle.len() as u64) as usize] as usize)
            }
            Schedule::Weighted(totals) => {
                let total = *totals.last()?;
                let r = splitmix64(n) % total;
                Some(totals.partition_point(|t| *t <= r))
            }
            Schedule::Cycle(_) => None,
        }
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn random_start() -> usize {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (splitmix64(u64::from(nanos) ^ u64::from(std::process::id())) % 1_000_003) as usize
}

/// Sync state, shared by the sync task, `/ready` and `/config`.
#[derive(Debug)]
pub struct SyncStatus {
    /// `http://host:port` of the control plane.
    pub url: String,
    /// The watched workload.
    pub workload: String,
    received: AtomicBool,
    connected: AtomicBool,
    last_update: Mutex<Option<(SystemTime, String)>>,
    last_error: Mutex<Option<String>>,
}

impl SyncStatus {
    /// Whether a first view has arrived.
    pub fn has_config(&self) -> bool {
        self.received.load(Ordering::Acquire)
    }

    /// The state as JSON, for `/config`.
    pub fn to_json(&self) -> serde_json::Value {
        let last = self
            .last_update
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        let error = self
            .last_error
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        let connected = self.connected.load(Ordering::Relaxed);
        serde_json::json!({
            "url": self.url,
            "workload": self.workload,
            "state": match (self.has_config(), connected) {
                (_, true) => "synced",
                (true, false) => "disconnected (serving the last config)",
                (false, false) => "waiting for the first config",
            },
            "version": last.as_ref().map(|(_, v)| v.clone()),
            "last_update_age_seconds": last.and_then(|(t, _)| t.elapsed().ok()).map(|d| d.as_secs_f64()),
            "last_error": error,
        })
    }
}

/// Sync metrics.
#[derive(Debug, Clone)]
struct SyncMetrics {
    connected: IntGauge,
    updates: IntCounter,
    errors: IntCounter,
    last_update: IntGauge,
}

/// The discovery state a proxy holds: the latest table and the sync status.
#[derive(Debug, Clone)]
pub struct Discovery {
    /// The latest table.
    pub table: watch::Receiver<Arc<OutboundTable>>,
    /// Sync status.
    pub status: Arc<SyncStatus>,
}

impl Discovery {
    /// Starts following `workload` on the control plane at `url`; returns at once.
    pub fn spawn(
        url: &str,
        workload: &str,
        upstreams: Arc<Upstreams>,
        registry: &Registry,
    ) -> anyhow::Result<Self> {
        let watcher = Watcher::new(url, workload.parse()?, Duration::from_secs(30))?;
        let metrics = SyncMetrics {
            connected: IntGauge::new(
                "outrider_control_connected",
                "1 when the last control-plane request succeeded",
            )?,
            updates: IntCounter::new(
                "outrider_control_updates_total",
                "Config views received and applied",
            )?,
            errors: IntCounter::new(
                "outrider_control_errors_total",
                "Failed control-plane requests (unreachable, error status, invalid view)",
            )?,
            last_update: IntGauge::new(
                "outrider_control_last_update_timestamp_seconds",
                "Unix time of the last applied view (age = time() - this)",
            )?,
        };
        registry.register(Box::new(metrics.connected.clone()))?;
        registry.register(Box::new(metrics.updates.clone()))?;
        registry.register(Box::new(metrics.errors.clone()))?;
        registry.register(Box::new(metrics.last_update.clone()))?;
        let status = Arc::new(SyncStatus {
            url: url.to_string(),
            workload: workload.to_string(),
            received: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            last_update: Mutex::new(None),
            last_error: Mutex::new(None),
        });
        let (tx, table) = watch::channel(Arc::new(OutboundTable::default()));
        tokio::spawn(sync(watcher, tx, status.clone(), upstreams, metrics));
        Ok(Self { table, status })
    }
}

async fn sync(
    watcher: Watcher,
    tx: watch::Sender<Arc<OutboundTable>>,
    status: Arc<SyncStatus>,
    upstreams: Arc<Upstreams>,
    metrics: SyncMetrics,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut version: Option<String> = None;
    let mut failing = false;
    loop {
        match watcher.poll(version.as_deref()).await {
            Ok(update) => {
                status.connected.store(true, Ordering::Relaxed);
                metrics.connected.set(1);
                if let Ok(mut last) = status.last_error.lock() {
                    *last = None;
                }
                backoff.reset();
                if failing {
                    tracing::info!(
                        workload = %watcher.workload(),
                        "control plane reachable again"
                    );
                    failing = false;
                }
                if let Some(view) = update {
                    let v = view.version.clone();
                    let services = view.outbound.services.len();
                    let same = tx.borrow().view.as_ref().is_some_and(|old| {
                        old.outbound == view.outbound && old.inbound == view.inbound
                    });
                    if same {
                        // Only the version moved (another workload's part of the mesh changed):
                        // keep the table, its balancer positions and its pools.
                        tx.send_modify(|t| {
                            let mut table = OutboundTable::clone_shallow(t);
                            table.version = Some(v.clone());
                            *t = Arc::new(table);
                        });
                    } else {
                        tx.send_replace(Arc::new(OutboundTable::build(view, &upstreams)));
                    }
                    version = Some(v.clone());
                    let now = SystemTime::now();
                    if let Ok(mut last) = status.last_update.lock() {
                        *last = Some((now, v.clone()));
                    }
                    status.received.store(true, Ordering::Release);
                    metrics.updates.inc();
                    let unix = now
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    metrics
                        .last_update
                        .set(i64::try_from(unix).unwrap_or(i64::MAX));
                    tracing::info!(version = %v, services, "config applied");
                }
            }
            Err(e) => {
                status.connected.store(false, Ordering::Relaxed);
                metrics.connected.set(0);
                metrics.errors.inc();
                if let Ok(mut last) = status.last_error.lock() {
                    *last = Some(e.to_string());
                }
                if !failing {
                    tracing::warn!(error = %e, "control plane request failed; serving the last config and retrying with backoff");
                    failing = true;
                } else {
                    tracing::debug!(error = %e, "control plane still failing");
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_schedules_are_exact_spread_and_bounded() {
        let cycle = |w: &[u32]| match Schedule::new(w) {
            Schedule::Cycle(c) => c,
            Schedule::Weighted(_) => panic!("expected a cycle"),
        };
        let s = cycle(&[3, 1]);
        assert_eq!(s.iter().filter(|i| **i == 0).count(), 3);
        assert_ne!(s, vec![0, 0, 0, 1], "not three in a row then one: {s:?}");
        assert_eq!(cycle(&[500, 1000]), vec![1, 0, 1], "reduced by the gcd");
        assert_eq!(
            cycle(&[1000; 1000]).len(),
            1000,
            "equal weights: one slot each"
        );
        // 5000 endpoints with weights 1-1000: too long for a cycle, weighted picks instead.
        let weights: Vec<u32> = (0..5000).map(|i| 1 + i % 1000).collect();
        let schedule = Schedule::new(&weights);
        assert!(matches!(schedule, Schedule::Weighted(_)));
        // One heavy endpoint against 4000 light ones gets its share (1000 / 5000 = 20%).
        let mut skewed = vec![1000u32];
        skewed.extend(std::iter::repeat_n(1, 4000));
        let s = Schedule::new(&skewed);
        let heavy = (0..100_000u64).filter(|n| s.index(*n) == Some(0)).count();
        assert!(
            (18_000..22_000).contains(&heavy),
            "heavy share {heavy} of 100000"
        );
        assert_eq!(Schedule::new(&[]).index(0), None);
    }
}
