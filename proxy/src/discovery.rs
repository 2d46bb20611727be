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
    /// Route name.
    pub name: String,
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
    schedule: Vec<usize>,
    next: AtomicUsize,
    /// Routes, first match wins.
    pub routes: Vec<RouteEntry>,
}

impl ServiceEntry {
    /// The next endpoint in weighted round-robin order; `None` if the service has none.
    pub fn pick(&self) -> Option<&Arc<EndpointEntry>> {
        if self.schedule.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.schedule.len();
        self.endpoints.get(self.schedule[i])
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
                        identity: e.identity.clone(),
                        upstream: upstreams.get(e.address),
                    })
                })
                .collect();
            let weights: Vec<u32> = svc.endpoints.iter().map(|e| e.weight).collect();
            let schedule = weighted_schedule(&weights);
            let entry = Arc::new(ServiceEntry {
                id: svc.id(),
                protocol: svc.protocol,
                endpoints,
                schedule,
                next: AtomicUsize::new(0),
                routes: svc
                    .routes
                    .iter()
                    .map(|r| RouteEntry {
                        name: r.name.clone(),
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

    /// The service at `addr`.
    pub fn service(&self, addr: &SocketAddr) -> Option<&Arc<ServiceEntry>> {
        self.by_addr.get(addr)
    }
}

/// Longest weighted round-robin cycle kept per service.
const MAX_SCHEDULE: u64 = 4096;

/// A weighted round-robin cycle of endpoint indexes. Weights are divided by their greatest common
/// divisor and, if the cycle would still be longer than [`MAX_SCHEDULE`], scaled down (each
/// endpoint keeps at least one slot), so memory stays bounded whatever the weights. Each index is
/// spread over the cycle rather than repeated in a row.
fn weighted_schedule(weights: &[u32]) -> Vec<usize> {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let weights: Vec<u64> = weights.iter().map(|w| u64::from((*w).max(1))).collect();
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let total: u64 = weights.iter().map(|w| w / g).sum();
    let scale = total.div_ceil(MAX_SCHEDULE).max(1);
    let slots: Vec<u64> = weights.iter().map(|w| (w / g / scale).max(1)).collect();
    let mut keyed: Vec<(u128, usize)> = Vec::new();
    for (i, n) in slots.iter().enumerate() {
        for k in 0..*n {
            // Slot k of n sits at (2k + 1) / 2n of the cycle.
            keyed.push(((u128::from(2 * k + 1) << 32) / u128::from(2 * n), i));
        }
    }
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, i)| i).collect()
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
        let watcher =
            Watcher::new(url, workload, Duration::from_secs(30)).map_err(anyhow::Error::msg)?;
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
                        workload = watcher.workload(),
                        "control plane reachable again"
                    );
                    failing = false;
                }
                if let Some(view) = update {
                    let v = view.version.clone();
                    let services = view.outbound.services.len();
                    let table = OutboundTable::build(view, &upstreams);
                    tx.send_replace(Arc::new(table));
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
    fn weighted_schedule_is_spread_and_bounded() {
        let s = weighted_schedule(&[3, 1]);
        assert_eq!(s.iter().filter(|i| **i == 0).count(), 3);
        assert_ne!(s, vec![0, 0, 0, 1], "not three in a row then one: {s:?}");
        assert_eq!(weighted_schedule(&[1, 1, 1]).len(), 3);
        assert_eq!(
            weighted_schedule(&[500, 1000]),
            vec![1, 0, 1],
            "reduced by the gcd"
        );
        let big = weighted_schedule(&[1000; 1000]);
        assert_eq!(big.len(), 1000, "equal weights: one slot each");
        let mixed: Vec<u32> = (1..=1000).collect();
        let s = weighted_schedule(&mixed);
        assert!(
            s.len() as u64 <= MAX_SCHEDULE + 1000,
            "bounded: {}",
            s.len()
        );
        assert!(
            (0..1000).all(|i| s.contains(&i)),
            "every endpoint keeps a slot"
        );
    }
}
