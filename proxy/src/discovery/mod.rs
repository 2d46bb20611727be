//! Discovery: the proxy's copy of what the control plane says about its workload.
//!
//! A background task long-polls the control plane ([`outrider_control::client::Watcher`]) and
//! publishes every new view through a `watch` channel ([`Discovery::views`]). It only syncs: the
//! outbound stack turns views into per-destination endpoint changes and routes, the inbound stack
//! reads its server policies. A view that did not change for this workload (only the version moved)
//! is not republished.
//!
//! If the control plane is unreachable or answers nonsense, the last good view stays in force and
//! the task retries with jittered exponential backoff (100 ms to 5 s). Sync state is exported as
//! metrics and on the admin `/config`; readiness waits for the first view.
//!
//! Over TLS, a proxy with an identity presents its mesh certificate to the watch API (the
//! control plane serves a workload's view only to that workload's identity): it certifies
//! first, then watches. Two refusals are not an outage and show on `/ready` until a view comes
//! again, the last good view still in force: `507` (the view is larger than the proxy's limit)
//! and `403` (this identity may not watch this workload).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use outrider_control::api::WatchResponse;
use outrider_control::client::{Backoff, WatchError, Watcher};
use prometheus::{IntCounter, IntGauge, Registry};
use tokio::sync::watch;

use crate::identity::IdentityStore;
use crate::readiness::{BlockReady, Readiness};

/// What `/ready` waits for before the first view.
const FIRST_VIEW: &str = "the first config from the control plane";
/// What `/ready` waits for while the control plane answers `507`.
const VIEW_TOO_LARGE: &str =
    "a view within the proxy's size limit (the control plane says its view is too large; see /config)";
/// What `/ready` waits for while the control plane answers `403`.
const WATCH_REFUSED: &str =
    "the control plane's consent to serve this workload's view (refused; see /config)";

/// The latest view (`None` before the first one).
pub type View = Option<Arc<WatchResponse>>;

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

/// The discovery state a proxy holds: the latest view and the sync status.
#[derive(Debug, Clone)]
pub struct Discovery {
    views: watch::Receiver<View>,
    /// Sync status.
    pub status: Arc<SyncStatus>,
}

impl Discovery {
    /// Starts following `workload` on the control plane at `url` (over TLS with `tls`, else
    /// plaintext with a warning); returns at once. Over TLS with an `identity`, the watch
    /// presents the proxy's certificate and starts once the first one is in. `readiness` waits
    /// for the first view (and while the control plane refuses the view, see the module docs).
    pub fn spawn(
        url: &str,
        workload: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        identity: Option<Arc<IdentityStore>>,
        registry: &Registry,
        readiness: Readiness,
    ) -> anyhow::Result<Self> {
        let ready = readiness.block(FIRST_VIEW);
        if tls.is_none() {
            tracing::warn!(%url, "control-plane traffic is plaintext http: for local development only; use https:// and --trust-anchors");
        }
        let (tls, identity) = match (tls, identity) {
            (Some(tls), Some(store)) => {
                let mut config = (*tls).clone();
                config.client_auth_cert_resolver = store.client_cert_resolver();
                // A session resumed from a connection made without the certificate (the
                // certify client shares the session store) would present none.
                config.resumption = rustls::client::Resumption::disabled();
                (Some(Arc::new(config)), Some(store))
            }
            (tls, _) => (tls, None),
        };
        let watcher = Watcher::new(url, workload.parse()?, Duration::from_secs(30), tls)?;
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
        let (tx, views) = watch::channel(None);
        let status_task = status.clone();
        tokio::spawn(async move {
            if let Some(store) = identity {
                first_certificate(&store).await;
            }
            sync(watcher, tx, status_task, metrics, readiness, ready).await
        });
        Ok(Self { views, status })
    }

    /// A receiver of every new view.
    pub fn views(&self) -> watch::Receiver<View> {
        self.views.clone()
    }

    /// The latest view.
    pub fn latest(&self) -> View {
        self.views.borrow().clone()
    }
}

/// Waits until `store` holds a certificate (the watch API refuses a proxy without one).
async fn first_certificate(store: &IdentityStore) {
    let mut bundles = store.bundles();
    let mut logged = false;
    while store.leaf().is_none() {
        if !logged {
            tracing::info!("waiting for the first certificate before watching the control plane");
            logged = true;
        }
        // The bundle changes just before the first certificate is installed: check again
        // shortly after each change, and now and then in any case.
        let _ = tokio::time::timeout(Duration::from_millis(200), bundles.changed()).await;
        tokio::task::yield_now().await;
    }
}

async fn sync(
    watcher: Watcher,
    tx: watch::Sender<View>,
    status: Arc<SyncStatus>,
    metrics: SyncMetrics,
    readiness: Readiness,
    ready: BlockReady,
) {
    let mut ready = Some(ready);
    // Held while the control plane refuses this proxy's view (507 or 403).
    let mut refused: Option<BlockReady> = None;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut version: Option<String> = None;
    let mut failing = false;
    loop {
        match watcher.poll(version.as_deref()).await {
            Ok(update) => {
                refused = None;
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
                    let same = tx.borrow().as_ref().is_some_and(|old| {
                        old.outbound == view.outbound && old.inbound == view.inbound
                    });
                    // Only the version moved (another workload's part of the mesh changed):
                    // nothing to republish.
                    if !same {
                        tx.send_replace(Some(Arc::new(view)));
                    }
                    version = Some(v.clone());
                    let now = SystemTime::now();
                    if let Ok(mut last) = status.last_update.lock() {
                        *last = Some((now, v.clone()));
                    }
                    status.received.store(true, Ordering::Release);
                    drop(ready.take());
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
                let block = match &e {
                    WatchError::Status { status, .. }
                        if *status == http::StatusCode::INSUFFICIENT_STORAGE =>
                    {
                        Some(VIEW_TOO_LARGE)
                    }
                    WatchError::Status { status, .. } if *status == http::StatusCode::FORBIDDEN => {
                        Some(WATCH_REFUSED)
                    }
                    _ => None,
                };
                match block {
                    Some(name) if refused.as_ref().is_none_or(|b| b.name() != name) => {
                        tracing::error!(error = %e, "the control plane refuses this proxy's view; not ready until it sends one (the last view stays in force)");
                        refused = Some(readiness.block(name));
                    }
                    // Another failure (an outage) does not lift the refusal: only a view does.
                    _ => {}
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
    use outrider_control::mesh::{Mesh, DEMO_MESH};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Reads a request's head (up to the blank line, or the end).
    async fn read_head(s: &mut tokio::net::TcpStream) {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.unwrap_or(0) == 0 {
                break;
            }
            head.push(byte[0]);
        }
    }

    /// Follows `demo/loadgen` on the plaintext control plane at `addr`.
    fn follow(addr: std::net::SocketAddr) -> (Registry, crate::readiness::Readiness, Discovery) {
        let registry = Registry::new();
        let readiness = crate::readiness::Readiness::new();
        let discovery = Discovery::spawn(
            &format!("http://{addr}"),
            "demo/loadgen",
            None,
            None,
            &registry,
            readiness.clone(),
        )
        .unwrap();
        (registry, readiness, discovery)
    }

    /// A control plane that answers each watch request with the next of `bodies` (status 200),
    /// then holds further requests open.
    async fn scripted(bodies: Vec<String>) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut bodies = bodies.into_iter();
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                read_head(&mut s).await;
                match bodies.next() {
                    Some(body) => {
                        let rsp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = s.write_all(rsp.as_bytes()).await;
                    }
                    None => {
                        tokio::spawn(async move {
                            let _held = s;
                            std::future::pending::<()>().await;
                        });
                    }
                }
            }
        });
        addr
    }

    /// A control plane that answers each watch request with the next (status, body) the test
    /// sends, waiting for it.
    async fn controlled() -> (
        std::net::SocketAddr,
        tokio::sync::mpsc::UnboundedSender<(u16, String)>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u16, String)>();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                read_head(&mut s).await;
                let Some((status, body)) = rx.recv().await else {
                    return;
                };
                let rsp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(rsp.as_bytes()).await;
            }
        });
        (addr, tx)
    }

    #[tokio::test]
    async fn a_view_too_large_or_refused_shows_on_ready_until_a_view_comes() {
        let mesh = Mesh::parse(DEMO_MESH).unwrap();
        let view = |v: &str| {
            serde_json::to_string(&mesh.view(&"demo/loadgen".parse().unwrap(), v).unwrap()).unwrap()
        };
        let (addr, answers) = controlled().await;
        let (_registry, readiness, discovery) = follow(addr);
        let mut views = discovery.views();
        answers.send((200, view("v1"))).unwrap();
        views.wait_for(|v| v.is_some()).await.unwrap();
        assert_eq!(readiness.check(), Ok(()));
        let until = |want: &'static str| {
            let readiness = readiness.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    while !readiness.check().err().unwrap_or_default().contains(want) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
                .await
                .unwrap_or_else(|_| panic!("/ready never said {want:?}: {:?}", readiness.check()))
            }
        };
        // The mesh grew past the limit: not ready, saying why; the last view stays in force.
        answers
            .send((507, "view too large: 20000000 bytes".into()))
            .unwrap();
        until("size limit").await;
        assert_eq!(discovery.latest().unwrap().version, "v1");
        assert!(
            discovery.status.to_json()["last_error"]
                .as_str()
                .unwrap()
                .contains("view too large"),
            "{}",
            discovery.status.to_json()
        );
        // An outage after that does not make it ready again.
        answers.send((503, "down".into())).unwrap();
        answers.send((403, "may not watch".into())).unwrap();
        until("refused").await;
        assert!(readiness.check().is_err());
        // A view again (the same content at a new version): ready.
        answers.send((200, view("v2"))).unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while readiness.check().is_err() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("ready again once a view came");
    }

    #[tokio::test]
    async fn a_bad_view_never_replaces_the_last_good_one() {
        let mesh = Mesh::parse(DEMO_MESH).unwrap();
        let good = mesh.view(&"demo/loadgen".parse().unwrap(), "v1").unwrap();
        let mut other = good.clone();
        other.version = "v2".into();
        other.outbound.services.clear();
        let mut wrong_workload = serde_json::to_value(&other).unwrap();
        wrong_workload["workload"] = "demo/someone-else".into();
        let addr = scripted(vec![
            serde_json::to_string(&good).unwrap(),
            "{not json".into(),
            wrong_workload.to_string(),
        ])
        .await;
        let (registry, readiness, discovery) = follow(addr);
        let mut views = discovery.views();
        views.wait_for(|v| v.is_some()).await.unwrap();
        assert_eq!(
            readiness.check(),
            Ok(()),
            "the first view releases readiness"
        );
        // Wait (bounded) until both bad answers were seen and refused.
        let errors = || {
            registry
                .gather()
                .iter()
                .find(|f| f.name() == "outrider_control_errors_total")
                .map_or(0.0, |f| f.get_metric()[0].get_counter().get_value())
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            while errors() < 2.0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("both bad answers counted");
        let kept = discovery.latest().unwrap();
        assert_eq!(kept.version, "v1");
        assert_eq!(kept.outbound, good.outbound, "the last good view stays");
        let status = discovery.status.to_json();
        assert!(
            status["last_error"]
                .as_str()
                .unwrap()
                .contains("invalid view"),
            "{status}"
        );
    }
}
