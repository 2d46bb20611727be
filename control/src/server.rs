//! `outrider control`: serves the mesh config over the watch API (see [`crate::api`]) and follows
//! the config file.
//!
//! The file is polled every 250 ms. A changed file that validates whole becomes the new version
//! at once; one that does not (an empty or truncated file included) is rejected with every error
//! and its key path in the log, counted in `outrider_control_config_rejected_total`, and the last
//! good config stays in force. Reading and parsing run on a blocking thread, never on the
//! runtime's thread, so a large or hostile file cannot stall `/live` or the watches.
//!
//! Each watch is one long-poll request; a slow or dead watcher holds only its own connection
//! and task until its wait ends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use prometheus::{Encoder, IntCounter, IntGauge, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{WorkloadId, CERTIFY_PATH, WATCH_PATH};
use crate::authority::{json_error, Authority, CaPaths, ServingCert};
use crate::ca::Ca;
use crate::duration;
use crate::kubernetes::webhook::{Injector, Webhook, INJECT_PATH, MAX_REVIEW_BYTES};
use crate::mesh::{ConfigError, Mesh, DEMO_MESH, MAX_MESH_BYTES};
use crate::peer::Caller;
use crate::quoted::Quoted;
use crate::runtime::{serve_http1_over, text};
use crate::token::TokenKey;

/// Longest wait a watcher may ask for.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Wait when the watcher names none.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// How often the config file is checked.
const POLL: Duration = Duration::from_millis(250);
/// How long a webhook request may take to send its body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// One version of the mesh.
#[derive(Debug)]
pub struct Snapshot {
    /// `<epoch>-<n>`: unique across restarts of the control plane.
    pub version: String,
    /// The validated mesh.
    pub mesh: Mesh,
    /// Why the default view (of workloads the mesh file does not name) is not served: it would
    /// be larger than the proxies' limit. Those workloads get `507` with this reason; the others
    /// are served.
    pub default_too_large: Option<String>,
}

/// Control-plane metrics.
#[derive(Debug, Clone)]
struct Metrics {
    applied: IntCounter,
    rejected: IntCounter,
    watchers: IntGauge,
    responses: IntCounter,
}

impl Metrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let applied = IntCounter::new(
            "outrider_control_config_applied_total",
            "Config versions applied (the first load included)",
        )?;
        let rejected = IntCounter::new(
            "outrider_control_config_rejected_total",
            "Config file changes rejected as invalid",
        )?;
        let watchers = IntGauge::new("outrider_control_watchers", "Watch requests waiting now")?;
        let responses = IntCounter::new(
            "outrider_control_watch_responses_total",
            "Watch responses carrying a config",
        )?;
        registry.register(Box::new(applied.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(watchers.clone()))?;
        registry.register(Box::new(responses.clone()))?;
        Ok(Self {
            applied,
            rejected,
            watchers,
            responses,
        })
    }
}

/// A running control plane's shared state.
pub struct ControlPlane {
    snapshots: watch::Sender<Arc<Snapshot>>,
    /// The sources of the view: the mesh file's last good config, and the services the
    /// Kubernetes API describes (`None` until it has been listed, or without `--kubernetes`).
    sources: std::sync::Mutex<Sources>,
    /// Whether the Kubernetes API has been listed (then unnamed workloads get the default view);
    /// read by every watch, so not behind the sources' lock.
    open: std::sync::atomic::AtomicBool,
    /// `POST /v1/inject`, when the binary hands in the inject code (set once, at start).
    webhook: std::sync::OnceLock<crate::kubernetes::webhook::Webhook>,
    authority: Option<Arc<Authority>>,
    epoch: String,
    registry: Registry,
    metrics: Metrics,
}

impl ControlPlane {
    /// A control plane serving `mesh` as its first version, issuing no certificates
    /// (`/v1/certify` answers 404).
    pub fn new(mesh: Mesh) -> anyhow::Result<Arc<Self>> {
        Self::with_authority(mesh, None)
    }

    /// A control plane serving `mesh` as its first version and, with an `authority`, issuing
    /// certificates on `/v1/certify`; views then carry the authority's trust domain.
    pub fn with_authority(
        mesh: Mesh,
        authority: Option<Arc<Authority>>,
    ) -> anyhow::Result<Arc<Self>> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let epoch = format!("{:x}", nanos ^ u128::from(std::process::id()));
        let registry = Registry::new();
        let metrics = Metrics::register(&registry)?;
        if let Some(authority) = &authority {
            authority.register(&registry)?;
        }
        metrics.applied.inc();
        tracing::info!(version = %format!("{epoch}-1"), "serving {}", mesh.summary());
        let first = Arc::new(Snapshot {
            version: format!("{epoch}-1"),
            mesh,
            default_too_large: None,
        });
        let sources = std::sync::Mutex::new(Sources {
            file: first.mesh.clone(),
            discovered: None,
        });
        let (snapshots, _) = watch::channel(first);
        Ok(Arc::new(Self {
            snapshots,
            sources,
            open: std::sync::atomic::AtomicBool::new(false),
            webhook: std::sync::OnceLock::new(),
            authority,
            epoch,
            registry,
            metrics,
        }))
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    /// Validates `yaml` and makes it the new version, or returns every error and keeps the old.
    /// This parses on the calling thread: async code uses [`ControlPlane::follow`], which does
    /// not.
    pub fn apply(&self, yaml: &str) -> Result<String, Vec<ConfigError>> {
        self.install(Mesh::parse(yaml))
    }

    /// Makes a parsed mesh file the new version (merged with the discovered services), or
    /// counts and logs the rejection.
    fn install(&self, parsed: Result<Mesh, Vec<ConfigError>>) -> Result<String, Vec<ConfigError>> {
        match parsed {
            Ok(mesh) => {
                let mut sources = self.lock_sources();
                let merged = sources.merged_with(&mesh);
                let mut default_too_large = None;
                if sources.discovered.is_some() {
                    if let Some(e) = merged.oversize_view(false) {
                        self.metrics.rejected.inc();
                        tracing::warn!("config rejected, last good version stays: {e}");
                        return Err(vec![e]);
                    }
                    default_too_large = self.default_view_problem(&merged);
                }
                sources.file = mesh;
                Ok(self.publish(merged, default_too_large, "config applied"))
            }
            Err(errors) => {
                self.metrics.rejected.inc();
                for e in &errors {
                    tracing::warn!("config rejected, last good version stays: {e}");
                }
                Err(errors)
            }
        }
    }

    /// The sources, even if a thread panicked while holding them (they are replaced whole).
    fn lock_sources(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Why `mesh`'s default view cannot be served, if it cannot (logged when that changes).
    /// Named workloads are served whatever the size of the default view: one proxy's view
    /// too large must not freeze the others.
    fn default_view_problem(&self, mesh: &Mesh) -> Option<String> {
        let problem = mesh.oversize_default_view().map(|e| {
            format!(
                "view too large: {}; give the workload an entry in the mesh file with its `calls`",
                e.message
            )
        });
        let before = self.current().default_too_large.is_some();
        match (&problem, before) {
            (Some(p), false) => tracing::error!("{p}"),
            (None, true) => tracing::info!("the default view is within the proxies' limit again"),
            _ => {}
        }
        problem
    }

    /// Serves `mesh` as the next version; returns the version.
    fn publish(&self, mesh: Mesh, default_too_large: Option<String>, what: &str) -> String {
        let mut version = String::new();
        self.snapshots.send_modify(|snap| {
            let n = snap
                .version
                .rsplit('-')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
                + 1;
            version = format!("{}-{n}", self.epoch);
            tracing::info!(%version, "{what}: {}", mesh.summary());
            *snap = Arc::new(Snapshot {
                version: version.clone(),
                mesh,
                default_too_large,
            });
        });
        self.metrics.applied.inc();
        version
    }

    /// Whether a workload the mesh file does not name gets the default view (with
    /// `--kubernetes`, once the API has been listed: injected workloads need no entry).
    fn open_workloads(&self) -> bool {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Follows `path`, whose text `last` is in force: every change is applied or rejected (see
    /// the module docs). Reading and parsing run on a blocking thread.
    pub async fn follow(self: Arc<Self>, path: PathBuf, mut last: String) {
        // The last read problem logged, so that it is logged once, not every poll.
        let mut problem: Option<ReadError> = None;
        loop {
            tokio::time::sleep(POLL).await;
            let path_for_read = path.clone();
            let previous = std::mem::take(&mut last);
            let read = tokio::task::spawn_blocking(move || match read_mesh_file(&path_for_read) {
                Err(e) => (previous, Err(e)),
                Ok(text) if text == previous => (previous, Ok(None)),
                Ok(text) => {
                    #[cfg(test)]
                    if let Ok(mut t) = LAST_PARSE_THREAD.lock() {
                        t.push((path_for_read.clone(), std::thread::current().id()));
                    }
                    let parsed = Mesh::parse(&text);
                    (text, Ok(Some(parsed)))
                }
            })
            .await;
            let outcome = match read {
                Ok((text, outcome)) => {
                    last = text;
                    outcome
                }
                Err(e) => {
                    tracing::error!(error = %e, "reading the config file failed; keeping the last good config");
                    continue;
                }
            };
            match outcome {
                Err(e) => {
                    if problem.as_ref() != Some(&e) {
                        tracing::warn!(path = %path.display(), error = %e, "cannot read the config file; keeping the last good config");
                        if e == ReadError::TooLarge {
                            self.metrics.rejected.inc();
                        }
                        problem = Some(e);
                    }
                }
                Ok(None) => problem = None,
                Ok(Some(parsed)) => {
                    problem = None;
                    // Merging and measuring the views cost as much as parsing: off the runtime.
                    let cp = self.clone();
                    if let Err(e) = tokio::task::spawn_blocking(move || cp.install(parsed)).await {
                        tracing::error!(error = %e, "applying the config file failed; keeping the last good config");
                    }
                }
            }
        }
    }

    /// Serves the API in plain HTTP on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        self.serve_over(listener, None).await
    }

    /// Serves the API on `listener`, over TLS with `tls`, until the task is dropped.
    pub async fn serve_over(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) {
        let tls = tls.map(tokio_rustls::TlsAcceptor::from);
        serve_http1_over(listener, tls, move |req, peer| {
            let cp = self.clone();
            async move { cp.route(req, peer).await }
        })
        .await
    }

    /// Serves `POST /v1/inject` with `webhook` from now on (set once; a second call changes
    /// nothing).
    pub fn set_webhook(&self, webhook: crate::kubernetes::webhook::Webhook) {
        let _ = self.webhook.set(webhook);
    }

    /// The certificate authority, if this control plane is one.
    pub fn authority(&self) -> Option<&Arc<Authority>> {
        self.authority.as_ref()
    }

    async fn route(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::POST, CERTIFY_PATH) => match &self.authority {
                Some(authority) => authority.handle(req, peer).await,
                None => json_error(
                    StatusCode::NOT_FOUND,
                    "this control plane issues no certificates",
                ),
            },
            (_, CERTIFY_PATH) => json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed: POST a {\"csr\": \"<PEM>\"} with authorization: Bearer TOKEN",
            ),
            (&Method::POST, INJECT_PATH) => match self.webhook.get() {
                Some(webhook) => {
                    let body = tokio::time::timeout(
                        BODY_TIMEOUT,
                        Limited::new(req.into_body(), MAX_REVIEW_BYTES).collect(),
                    )
                    .await;
                    match body {
                        Ok(Ok(body)) => webhook.handle(&body.to_bytes()).await,
                        Ok(Err(e)) => text(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            format!("cannot read the AdmissionReview (at most {MAX_REVIEW_BYTES} bytes): {e}\n"),
                        ),
                        Err(_) => text(StatusCode::REQUEST_TIMEOUT, "the body took too long\n"),
                    }
                }
                None => text(
                    StatusCode::NOT_FOUND,
                    "this control plane serves no injection webhook\n",
                ),
            },
            (_, INJECT_PATH) => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed: POST an AdmissionReview\n",
            ),
            (&Method::GET, WATCH_PATH) => {
                let caller = crate::peer::caller(req.extensions().get());
                self.watch_as(req.uri().query().unwrap_or(""), caller).await
            }
            (&Method::GET, "/live" | "/ready") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/metrics") => {
                let mut buf = Vec::new();
                match TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
                    Ok(()) => text(StatusCode::OK, buf),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                }
            }
            (&Method::GET, "/v1/version") => {
                text(StatusCode::OK, format!("{}\n", self.current().version))
            }
            (_, WATCH_PATH | "/live" | "/ready" | "/metrics" | "/v1/version") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; the API is GET /v1/watch?workload=NAMESPACE/NAME&version=V\n",
            ),
        }
    }

    /// A watch by anyone (as over `--plaintext`).
    #[cfg(test)]
    async fn watch(&self, query: &str) -> Response<Full<Bytes>> {
        self.watch_as(query, Caller::Anyone).await
    }

    /// `GET /v1/watch` by `caller`: over TLS, only the workload's own identity gets its view.
    async fn watch_as(&self, query: &str, caller: Caller) -> Response<Full<Bytes>> {
        // A long query is refused by hyper before this (414); the parse is linear in any case.
        let q = match WatchQuery::parse(query) {
            Ok(q) => q,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        };
        let mut rx = self.snapshots.subscribe();
        let snap = rx.borrow_and_update().clone();
        let open = self.open_workloads();
        if let Some(refused) = self.authorize(&caller, &snap.mesh, &q.workload, open) {
            return refused;
        }
        if let Some(too_large) = default_too_large(&snap, &q.workload) {
            return too_large;
        }
        let Some(mut view) = snap.mesh.view_or_default(&q.workload, &snap.version, open) else {
            return text(
                StatusCode::NOT_FOUND,
                format!(
                    "unknown workload \"{}\": it is not in the mesh config's workloads\n",
                    q.workload
                ),
            );
        };
        self.stamp(&mut view);
        if q.version.as_deref() != Some(snap.version.as_str()) {
            return self.json(&view);
        }
        self.metrics.watchers.inc();
        let _gauge = Dec(self.metrics.watchers.clone());
        let deadline = tokio::time::Instant::now() + q.wait;
        loop {
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Err(_) | Ok(Err(_)) => return not_modified(),
                Ok(Ok(())) => {
                    let snap = rx.borrow_and_update().clone();
                    let open = self.open_workloads();
                    // The config may have moved the workload to another account.
                    if let Some(refused) = self.authorize(&caller, &snap.mesh, &q.workload, open) {
                        return refused;
                    }
                    if let Some(too_large) = default_too_large(&snap, &q.workload) {
                        return too_large;
                    }
                    let Some(next) = snap.mesh.view_or_default(&q.workload, &snap.version, open)
                    else {
                        return text(
                            StatusCode::NOT_FOUND,
                            format!(
                                "workload \"{}\" was removed from the mesh config\n",
                                q.workload
                            ),
                        );
                    };
                    // Wake the watcher only when its own view changed.
                    let mut next = next;
                    self.stamp(&mut next);
                    if next.outbound != view.outbound
                        || next.inbound != view.inbound
                        || next.trust_domain != view.trust_domain
                    {
                        return self.json(&next);
                    }
                    view = next;
                }
            }
        }
    }

    /// The refusal, if `caller` may not watch `workload` in `mesh`: over TLS, only with a certificate of the
    /// workload's own identity (see [`Mesh::may_watch`]) that has not expired (a connection
    /// outlives its certificate: the proxy must connect again with the renewed one). A refusal
    /// closes the connection, so that the next attempt makes a new handshake.
    fn authorize(
        &self,
        caller: &Caller,
        mesh: &Mesh,
        workload: &WorkloadId,
        open: bool,
    ) -> Option<Response<Full<Bytes>>> {
        let refused = |status, message: String| {
            let mut rsp = text(status, format!("{message}\n"));
            rsp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            rsp
        };
        match caller {
            Caller::Anyone => None,
            Caller::Anonymous => Some(refused(
                StatusCode::UNAUTHORIZED,
                "the watch API needs the proxy's mesh certificate as its TLS client certificate: \
                 certify first (POST /v1/certify), then watch with it"
                    .into(),
            )),
            Caller::Unusable(why) => Some(refused(
                StatusCode::UNAUTHORIZED,
                format!("the client certificate cannot be used: {why}"),
            )),
            Caller::Proxy {
                identity,
                not_after,
            } => {
                if *not_after <= SystemTime::now() {
                    return Some(refused(
                        StatusCode::UNAUTHORIZED,
                        format!(
                            "the client certificate of {identity} has expired: connect again \
                             with the renewed one"
                        ),
                    ));
                }
                let domain = self
                    .authority
                    .as_ref()
                    .map_or(mesh.trust_domain.as_str(), |a| a.trust_domain());
                if identity.trust_domain() != domain {
                    return Some(refused(
                        StatusCode::FORBIDDEN,
                        format!("{identity} is not of this mesh's trust domain \"{domain}\""),
                    ));
                }
                mesh.may_watch(workload, identity, open)
                    .err()
                    .map(|e| refused(StatusCode::FORBIDDEN, e))
            }
        }
    }

    /// The authority's trust domain wins over the mesh config's.
    fn stamp(&self, view: &mut crate::api::WatchResponse) {
        if let Some(authority) = &self.authority {
            view.trust_domain = authority.trust_domain().to_string();
        }
    }

    fn json(&self, view: &crate::api::WatchResponse) -> Response<Full<Bytes>> {
        self.metrics.responses.inc();
        match serde_json::to_vec(view) {
            Ok(body) if body.len() > crate::api::MAX_VIEW_BYTES => text(
                StatusCode::INSUFFICIENT_STORAGE,
                format!(
                    "view too large: the view of workload \"{}\" is {} bytes, more than the \
                     proxies' limit of {} bytes (16 MiB); narrow its `calls`\n",
                    view.workload,
                    body.len(),
                    crate::api::MAX_VIEW_BYTES
                ),
            ),
            Ok(body) => {
                let mut rsp = text(StatusCode::OK, body);
                rsp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                rsp
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        }
    }
}

/// `507` for a workload the config does not name while the default view is too large.
fn default_too_large(snap: &Snapshot, workload: &WorkloadId) -> Option<Response<Full<Bytes>>> {
    let problem = snap.default_too_large.as_ref()?;
    if snap.mesh.workloads.contains_key(workload) {
        return None;
    }
    Some(text(
        StatusCode::INSUFFICIENT_STORAGE,
        format!("{problem} (workload \"{workload}\")\n"),
    ))
}

/// The sources of the view.
struct Sources {
    /// The mesh file's last good config.
    file: Mesh,
    /// The services the Kubernetes API describes, once listed.
    discovered: Option<Vec<crate::api::Service>>,
}

impl Sources {
    /// `file` merged with the discovered services, if any.
    fn merged_with(&self, file: &Mesh) -> Mesh {
        match &self.discovered {
            Some(d) => crate::kubernetes::view::merge(file, d),
            None => file.clone(),
        }
    }
}

/// Called on a blocking thread (merging and measuring the views grow with the cluster).
impl crate::kubernetes::watch::Sink for ControlPlane {
    fn discovered(&self, services: Vec<crate::api::Service>) {
        let mut sources = self.lock_sources();
        let merged = crate::kubernetes::view::merge(&sources.file, &services);
        if let Some(e) = merged.oversize_view(false) {
            self.metrics.rejected.inc();
            tracing::error!("Kubernetes API change not applied, the last good view stays: {e}");
            return;
        }
        let default_too_large = self.default_view_problem(&merged);
        sources.discovered = Some(services);
        self.open.store(true, std::sync::atomic::Ordering::Relaxed);
        let current = self.current();
        if merged != current.mesh || default_too_large != current.default_too_large {
            self.publish(merged, default_too_large, "Kubernetes API change applied");
        }
    }
}

struct Dec(IntGauge);
impl Drop for Dec {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The thread of the follower's last parse (tests check it is not the runtime's).
#[cfg(test)]
static LAST_PARSE_THREAD: std::sync::Mutex<Vec<(PathBuf, std::thread::ThreadId)>> =
    std::sync::Mutex::new(Vec::new());

/// Why a mesh config file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum ReadError {
    /// Missing, unreadable, or not UTF-8.
    #[error("{0}")]
    Io(String),
    /// Larger than [`MAX_MESH_BYTES`]: a bad config, counted as rejected.
    #[error("the file is larger than the limit of {MAX_MESH_BYTES} bytes (16 MiB)")]
    TooLarge,
}

/// Reads a mesh config file, refusing one larger than [`MAX_MESH_BYTES`] without reading it
/// whole.
fn read_mesh_file(path: &Path) -> Result<String, ReadError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| ReadError::Io(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_MESH_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ReadError::Io(e.to_string()))?;
    if bytes.len() > MAX_MESH_BYTES {
        return Err(ReadError::TooLarge);
    }
    String::from_utf8(bytes).map_err(|e| ReadError::Io(format!("the file is not UTF-8: {e}")))
}

/// The parameters of a watch request (`GET /v1/watch?...`). Public for the fuzz tests only.
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub struct WatchQuery {
    /// `workload=`: whose view.
    pub workload: WorkloadId,
    /// `version=`: the version the watcher has, if any.
    pub version: Option<String>,
    /// `wait=`: how long to hold the request at most.
    pub wait: Duration,
}

impl WatchQuery {
    /// Parses a query string (without the `?`); the error is the reason for a 400.
    pub fn parse(query: &str) -> Result<Self, String> {
        let (mut workload, mut version, mut wait) = (None, None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = decode(k)
                .ok_or_else(|| format!("bad escape or not UTF-8 in parameter {}", Quoted(k)))?;
            let v = &decode(v).ok_or_else(|| {
                format!("bad escape or not UTF-8 in {}={}", Quoted(&k), Quoted(v))
            })?;
            let seen = match k.as_str() {
                "workload" => workload.is_some(),
                "version" => version.is_some(),
                "wait" => wait.is_some(),
                _ => false,
            };
            if seen {
                return Err(format!("duplicate parameter {}: give it once", Quoted(&k)));
            }
            match k.as_str() {
                "workload" => {
                    let id = v
                        .parse::<WorkloadId>()
                        .map_err(|e| format!("bad workload: {e}"))?;
                    workload = Some(id);
                }
                "version" => {
                    if v.len() > 64 || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                        return Err(format!(
                            "bad version {}: send back the version you received",
                            Quoted(v)
                        ));
                    }
                    version = Some(Some(v.to_string()).filter(|v| !v.is_empty()));
                }
                "wait" => {
                    let w = duration::parse(v).map_err(|e| format!("bad wait: {e}"))?;
                    if w > MAX_WAIT {
                        return Err(format!(
                            "bad wait {}: at most {}",
                            Quoted(v),
                            duration::format(MAX_WAIT)
                        ));
                    }
                    wait = Some(w);
                }
                other => return Err(format!("unknown parameter {}", Quoted(other))),
            }
        }
        let workload = workload.ok_or("missing workload=NAMESPACE/NAME")?;
        Ok(Self {
            workload,
            version: version.flatten(),
            wait: wait.unwrap_or(DEFAULT_WAIT),
        })
    }
}

/// Decodes a query key or value: `%XX` escapes and `+` as a space. `None` for a `%` not followed
/// by two hex digits, or bytes that are not UTF-8.
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let well_formed = b.iter().enumerate().all(|(i, c)| {
        *c != b'%'
            || (b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|v| v.into_owned())
}

fn not_modified() -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::new()));
    *rsp.status_mut() = StatusCode::NOT_MODIFIED;
    rsp
}

/// The control plane's default `--server-name`s: what proxies in a cluster and on a laptop call it.
pub const DEFAULT_SERVER_NAMES: &[&str] = &[
    "localhost",
    "outrider-control",
    "outrider-control.outrider-system.svc",
    "outrider-control.outrider-system.svc.cluster.local",
];

/// How long the control plane's own serving certificate is valid; renewed at half of it.
const SERVING_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Flags of `outrider control`.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ControlArgs {
    /// `ca init` or `token`; without one, the control plane serves.
    #[command(subcommand)]
    pub command: Option<crate::cli::ControlCommand>,
    /// The mesh config (YAML). Without it, the embedded demo mesh is served.
    #[arg(long, env = "OUTRIDER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where the watch API listens.
    #[arg(long, env = "OUTRIDER_LISTEN", value_name = "ADDR",
          default_value_t = SocketAddr::from(([127, 0, 0, 1], outrider_iptables_init::ports::CONTROL)))]
    pub listen: SocketAddr,
    /// Validate FILE, print every error with its key path (exit 2) or a summary (exit 0), and exit.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    pub check: Option<PathBuf>,
    /// The issuer certificate (PEM), optionally followed by more intermediates. With
    /// --issuer-key and --trust-anchors; without all three, a throwaway root is generated.
    #[arg(long, env = "OUTRIDER_ISSUER_CERT", value_name = "FILE",
          requires_all = ["issuer_key", "trust_anchors"])]
    pub issuer_cert: Option<PathBuf>,
    /// The issuer's key (PKCS#8 PEM, ECDSA P-256). Never logged, never served.
    #[arg(long, env = "OUTRIDER_ISSUER_KEY", value_name = "FILE",
          requires_all = ["issuer_cert", "trust_anchors"])]
    pub issuer_key: Option<PathBuf>,
    /// The trust anchors (PEM bundle of one or more roots) the issuer chains to.
    #[arg(long, env = "OUTRIDER_TRUST_ANCHORS", value_name = "FILE",
          requires_all = ["issuer_cert", "issuer_key"])]
    pub trust_anchors: Option<PathBuf>,
    /// The key that bootstrap tokens are checked with (`outrider control ca init` writes one;
    /// `outrider control token` mints with it). Without it, a random key is used and no token
    /// can be minted outside this process.
    #[arg(long, env = "OUTRIDER_TOKEN_KEY", value_name = "FILE")]
    pub token_key: Option<PathBuf>,
    /// Lifetime of the workload certificates issued (e.g. 24h, 5m, 5s).
    #[arg(long, env = "OUTRIDER_CERT_LIFETIME", value_name = "DUR", default_value = "24h",
          value_parser = crate::cli::parse_positive_duration)]
    pub cert_lifetime: Duration,
    /// The trust domain of the identities issued. Default: the mesh config's `trust_domain`,
    /// else outrider.local.
    #[arg(long, env = "OUTRIDER_TRUST_DOMAIN", value_name = "TD",
          value_parser = |s: &str| crate::api::check_trust_domain(s).map(|()| s.to_string()))]
    pub trust_domain: Option<String>,
    /// Serve the API over plain HTTP (tokens and certificates in the clear): local development
    /// only. Otherwise it is served over TLS 1.3 with a certificate from the CA.
    #[arg(long, env = "OUTRIDER_PLAINTEXT")]
    pub plaintext: bool,
    /// DNS names in the serving certificate (repeatable). 127.0.0.1 and the listen IP (unless
    /// unspecified) are always in it.
    #[arg(long = "server-name", env = "OUTRIDER_SERVER_NAME", value_name = "NAME", value_delimiter = ',',
          default_values_t = DEFAULT_SERVER_NAMES.iter().map(|s| s.to_string()).collect::<Vec<_>>())]
    pub server_names: Vec<String>,
    /// Discover services, endpoints and identities from the Kubernetes API server (in-cluster
    /// configuration when KUBERNETES_SERVICE_HOST is set, else --kubeconfig, KUBECONFIG or
    /// ~/.kube/config); the mesh file adds routes, policy and services outside the cluster.
    #[arg(long, env = "OUTRIDER_KUBERNETES")]
    pub kubernetes: bool,
    /// The kubeconfig to reach the API server with (with --kubernetes).
    #[arg(long, value_name = "FILE", requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// The MutatingWebhookConfiguration whose caBundle the control plane keeps equal to its
    /// trust anchors (with --kubernetes; deploy/injector.yaml).
    #[arg(
        long,
        env = "OUTRIDER_WEBHOOK_CONFIGURATION",
        value_name = "NAME",
        default_value = "outrider-injector"
    )]
    pub webhook_configuration: String,
    /// How the injection webhook captures a pod's traffic unless the pod's
    /// `outrider.io/capture` annotation says: `init` (the `outrider-init` container) or `cni`
    /// (the node's outrider-cni plugin, as `outrider inject --cni`).
    #[arg(
        long,
        env = "OUTRIDER_INJECT_CAPTURE",
        value_name = "MODE",
        value_enum,
        default_value = "init"
    )]
    pub inject_capture: crate::kubernetes::webhook::Capture,
}

/// What `outrider control` does before it serves: `--check` (the exit code), or the mesh to serve.
pub enum Prepared {
    /// Nothing to serve: exit with this code.
    Exit(std::process::ExitCode),
    /// Serve this mesh (with its text, for follow mode).
    Serve(Box<(Mesh, String)>),
}

/// `outrider control`, up to serving: runs `--check`, sets up logging, reads and validates the
/// mesh (exit code 2 with every error on a bad one). Needs no runtime.
pub fn prepare(args: &ControlArgs) -> Prepared {
    use std::process::ExitCode;
    if let Some(path) = &args.check {
        return Prepared::Exit(match read_mesh_file(path) {
            Err(e) => {
                eprintln!("outrider control: cannot read {}: {e}", path.display());
                ExitCode::from(2)
            }
            Ok(text) => match Mesh::parse(&text) {
                Ok(mesh) => {
                    println!("{}: ok: {}", path.display(), mesh.summary());
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    for e in &errors {
                        eprintln!("{}: {e}", path.display());
                    }
                    eprintln!("{}: {} error(s)", path.display(), errors.len());
                    ExitCode::from(2)
                }
            },
        });
    }
    let spec = std::env::var("OUTRIDER_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&spec)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(crate::runtime::log_colours())
        .try_init();
    let text = match &args.config {
        Some(path) => match read_mesh_file(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("outrider control: cannot read {}: {e}", path.display());
                return Prepared::Exit(ExitCode::from(2));
            }
        },
        None => DEMO_MESH.to_string(),
    };
    let mesh = match Mesh::parse(&text) {
        Ok(m) => m,
        Err(errors) => {
            for e in &errors {
                eprintln!("outrider control: {e}");
            }
            return Prepared::Exit(ExitCode::from(2));
        }
    };
    Prepared::Serve(Box::new((mesh, text)))
}

/// Serves `mesh` (prepared by [`prepare`]) until `shutdown` resolves; exit code 2 when the CA
/// files, token key or server names cannot be used, 1 when it cannot bind or start.
pub async fn serve(
    args: ControlArgs,
    mesh: Mesh,
    text: String,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::process::ExitCode {
    serve_with(args, mesh, text, None, shutdown).await
}

/// [`serve`], also serving the injection webhook `POST /v1/inject` with `injector` (the
/// binary's `outrider inject` code) when given.
pub async fn serve_with(
    args: ControlArgs,
    mesh: Mesh,
    text: String,
    injector: Option<Arc<dyn Injector>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    let trust_domain = args
        .trust_domain
        .clone()
        .unwrap_or_else(|| mesh.trust_domain.clone());
    let started = match start_authority(&args, trust_domain) {
        Ok(started) => started,
        Err(e) => {
            eprintln!("outrider control: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cp = match ControlPlane::with_authority(mesh, Some(started.authority.clone())) {
        Ok(cp) => cp,
        Err(e) => {
            eprintln!("outrider control: {e:#}");
            return ExitCode::from(1);
        }
    };
    let listener = match crate::runtime::bind_listener(args.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("outrider control: cannot bind {}: {e}", args.listen);
            return ExitCode::from(1);
        }
    };
    let tls = if args.plaintext {
        tracing::warn!("--plaintext: the API is served over plain HTTP, tokens and certificates cross the network in the clear; for local development only");
        None
    } else {
        let mut ips = vec![std::net::IpAddr::from([127, 0, 0, 1])];
        if !args.listen.ip().is_unspecified() && !ips.contains(&args.listen.ip()) {
            ips.push(args.listen.ip());
        }
        let serving = ServingCert::new(
            &started.authority.ca(),
            args.server_names.clone(),
            ips,
            SERVING_LIFETIME,
        )
        .map_err(|e| format!("cannot issue the serving certificate (check --server-name): {e}"))
        .and_then(|serving| {
            let config = serving
                .server_config_for_proxies(started.authority.clone())
                .map_err(|e| e.to_string())?;
            Ok((serving, config))
        });
        match serving {
            Ok(pair) => Some(pair),
            Err(e) => {
                eprintln!("outrider control: {e}");
                return ExitCode::from(2);
            }
        }
    };
    tracing::info!(
        listen = %args.listen,
        tls = tls.is_some(),
        trust_domain = %started.authority.trust_domain(),
        cert_lifetime = %duration::format(args.cert_lifetime),
        config = %args.config.as_ref().map_or("<embedded demo mesh>".into(), |p| p.display().to_string()),
        "control plane ready"
    );
    if let Some(path) = args.config.clone() {
        tokio::spawn(cp.clone().follow(path, text));
    }
    let mut client = None;
    if args.kubernetes {
        match crate::kubernetes::client(args.kubeconfig.as_deref()).await {
            Ok(c) => {
                client = Some(c.clone());
                let client = c;
                started
                    .authority
                    .set_reviewer(Arc::new(crate::kubernetes::review::Reviewer::new(
                        client.clone(),
                    )));
                tokio::spawn(crate::kubernetes::anchors::publish(
                    client.clone(),
                    started.authority.clone(),
                ));
                crate::kubernetes::watch::spawn(
                    client,
                    started.authority.trust_domain().to_string(),
                    cp.clone(),
                );
            }
            Err(e) => {
                eprintln!("outrider control: --kubernetes: {e:#}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(injector) = injector {
        if let Some(client) = &client {
            tokio::spawn(crate::kubernetes::ca_bundle::keep(
                client.clone(),
                args.webhook_configuration.clone(),
                started.authority.clone(),
            ));
        }
        cp.set_webhook(Webhook::new(injector, client));
    }
    let (serving, config) = match tls {
        Some((serving, config)) => (Some(serving), Some(config)),
        None => (None, None),
    };
    tokio::spawn(
        started
            .authority
            .clone()
            .follow(started.paths, started.texts, serving),
    );
    tokio::select! {
        () = cp.serve_over(listener, config) => {}
        () = shutdown => tracing::info!("shutting down"),
    }
    ExitCode::SUCCESS
}

/// The authority `outrider control` starts with, and what to follow.
struct Started {
    authority: Arc<Authority>,
    paths: Option<CaPaths>,
    texts: [String; 3],
}

/// Loads (or generates) the CA and the token key named by the flags.
fn start_authority(args: &ControlArgs, trust_domain: String) -> anyhow::Result<Started> {
    use anyhow::Context;
    let (ca, paths, texts) = match (&args.issuer_cert, &args.issuer_key, &args.trust_anchors) {
        (Some(cert), Some(key), Some(anchors)) => {
            let read = |p: &Path| {
                std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
            };
            let texts = [read(cert)?, read(key)?, read(anchors)?];
            let ca = Ca::load(&texts[0], &texts[1], &texts[2]).with_context(|| {
                format!(
                    "--issuer-cert {}, --issuer-key {}, --trust-anchors {}",
                    cert.display(),
                    key.display(),
                    anchors.display()
                )
            })?;
            tracing::info!(issuer = %cert.display(), trust_anchors = %anchors.display(), anchors = ca.trust_anchors().len(), "certificate authority loaded; following its files");
            let paths = CaPaths {
                issuer_cert: cert.clone(),
                issuer_key: key.clone(),
                trust_anchors: anchors.clone(),
            };
            (ca, Some(paths), texts)
        }
        (None, None, None) => {
            let ca = Ca::generate(&trust_domain)?;
            tracing::warn!("no --issuer-cert/--issuer-key/--trust-anchors: generated a throwaway self-signed root and issuer, gone at exit; fine for demos and tests only (see `outrider control ca init`)");
            (ca, None, Default::default())
        }
        _ => anyhow::bail!("give all of --issuer-cert, --issuer-key and --trust-anchors, or none"),
    };
    let tokens = match &args.token_key {
        Some(path) => TokenKey::from_file(path).context("--token-key")?,
        None => {
            tracing::warn!("no --token-key: a random token key was generated, so no token can be minted outside this process and no proxy can get a certificate; mint tokens with `outrider control token --token-key FILE` and pass the same FILE here");
            TokenKey::generate()?
        }
    };
    let authority = Authority::new(ca, tokens, args.cert_lifetime, trust_domain)?;
    Ok(Started {
        authority,
        paths,
        texts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_queries() {
        let q = WatchQuery::parse("workload=demo/loadgen&version=ab-3&wait=5s").unwrap();
        assert_eq!(
            q,
            WatchQuery {
                workload: "demo/loadgen".parse().unwrap(),
                version: Some("ab-3".into()),
                wait: Duration::from_secs(5)
            }
        );
        assert!(WatchQuery::parse("")
            .unwrap_err()
            .contains("missing workload"));
        assert!(WatchQuery::parse("workload=nope")
            .unwrap_err()
            .contains("bad workload"));
        assert!(WatchQuery::parse("workload=a/b&version=%00")
            .unwrap_err()
            .contains("bad version"));
        assert!(WatchQuery::parse("workload=a/b&wait=10m")
            .unwrap_err()
            .contains("at most"));
        assert!(WatchQuery::parse("workload=a/b&wait=x")
            .unwrap_err()
            .contains("bad wait"));
        assert!(WatchQuery::parse("workload=a/b&color=red")
            .unwrap_err()
            .contains("unknown parameter"));
        assert_eq!(
            WatchQuery::parse("workload=demo%2Floadgen")
                .unwrap()
                .workload
                .to_string(),
            "demo/loadgen"
        );
        assert_eq!(
            WatchQuery::parse("%77orkload=a/b").unwrap().workload.name(),
            "b",
            "keys are decoded too"
        );
        for bad in [
            "workload=demo%2",
            "workload=%ff%fe/x",
            "workload=a/b%zz",
            "wor%kload=a/b",
        ] {
            let e = WatchQuery::parse(bad).unwrap_err();
            assert!(e.contains("bad escape"), "{bad}: {e}");
        }
        // `+` is a space (and so not a valid version); `%2B` is a plus.
        assert!(WatchQuery::parse("workload=a/b&version=a+b")
            .unwrap_err()
            .contains("bad version \"a b\""));
        assert!(WatchQuery::parse("workload=a/b&version=a%2Bb")
            .unwrap_err()
            .contains("bad version \"a+b\""));
        let q = WatchQuery::parse("workload=a/b&version=&wait=3").unwrap();
        assert_eq!((q.version, q.wait), (None, Duration::from_secs(3)));
        assert_eq!(
            WatchQuery::parse("workload=a/b").unwrap().wait,
            DEFAULT_WAIT
        );
    }

    #[test]
    fn a_duplicate_parameter_is_refused_by_name() {
        for (query, name) in [
            ("workload=a/b&workload=c/d", "workload"),
            ("workload=a/b&workload=a/b", "workload"),
            ("workload=a/b&version=&version=x-1", "version"),
            ("wait=1s&workload=a/b&wait=2s", "wait"),
        ] {
            let e = WatchQuery::parse(query).unwrap_err();
            assert_eq!(
                e,
                format!("duplicate parameter \"{name}\": give it once"),
                "{query}"
            );
        }
    }

    #[test]
    fn query_errors_cut_long_values() {
        let long = "x".repeat(100_000);
        for query in [
            format!("workload={long}"),
            format!("workload=a/b&version={long}"),
            format!("workload=a/b&wait={long}"),
            format!("workload=a/b&{long}=1"),
            format!("workload=a/b&version={long}%"),
            // Found by the watch_query fuzz target: a long key quoted whole beside a bad value.
            format!("{long}=%"),
            format!("{long}=1&{long}=1"),
        ] {
            let e = WatchQuery::parse(&query).unwrap_err();
            assert!(e.len() < 400, "{} bytes: {}", e.len(), &e[..200]);
            assert!(e.contains("(100"), "{e}");
        }
    }

    /// A unique scratch file for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("outrider-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    const GOOD: &str =
        "services:\n  - name: a\n    addresses: [198.18.0.1:80]\nworkloads:\n  - name: default/w\n";

    /// Polls (in paused time) until `done`, at most 100 file polls.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..100 {
            if done() {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn a_view_over_the_proxies_limit_is_refused_by_name_and_never_sent() {
        use crate::api::MAX_VIEW_BYTES;
        let mut mesh = Mesh::parse(
            "services:\n  - name: s\n    addresses: [198.18.0.1:80]\n    endpoints: \
             [{address: 198.18.1.1:80}]\nworkloads:\n  - name: default/big\n  - name: \
             default/small\n    calls: [s]\n",
        )
        .unwrap();
        let one = mesh.services[0].clone();
        let copies = MAX_VIEW_BYTES / crate::mesh::json_size(&one) + 10;
        mesh.services.extend((0..copies).map(|i| {
            let mut s = one.clone();
            s.name = format!("s{i}");
            s
        }));
        let e = mesh.oversize_view(false).expect("the big view is found");
        assert_eq!(e.path, "workloads[0]");
        assert!(
            e.message.contains("\"default/big\"") && e.message.contains("narrow its `calls`"),
            "{e}"
        );
        // The watch answers 507 with the reason instead of the view; a small view is served.
        let cp = ControlPlane::new(mesh).unwrap();
        let rsp = cp.watch("workload=default/big").await;
        assert_eq!(rsp.status(), StatusCode::INSUFFICIENT_STORAGE);
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.starts_with("view too large") && body.len() < 400,
            "{body}"
        );
        assert_eq!(
            cp.watch("workload=default/small").await.status(),
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn a_default_view_over_the_limit_gets_507_and_the_named_workloads_are_still_served() {
        use crate::kubernetes::watch::Sink as _;
        let mesh = Mesh::parse(
            "services:\n  - name: s\n    addresses: [198.18.0.1:80]\nworkloads:\n  - name: \
             default/small\n    calls: [s]\n",
        )
        .unwrap();
        let one = mesh.services[0].clone();
        let cp = ControlPlane::new(mesh).unwrap();
        // The API describes more than one proxy may hold: the change is applied (no freeze),
        // a workload the file does not name gets 507 saying why, the named one its view.
        let mut big = crate::mesh::Mesh::parse(
            "services:\n  - name: k\n    addresses: [198.18.0.2:80]\n    endpoints: \
             [{address: 198.18.1.1:80}]\n",
        )
        .unwrap()
        .services;
        let template = big[0].clone();
        let copies = crate::api::MAX_VIEW_BYTES / crate::mesh::json_size(&template) + 10;
        big.extend((0..copies).map(|i| {
            let mut s = template.clone();
            s.name = format!("k{i}");
            s
        }));
        let before = cp.current().version.clone();
        cp.discovered(big);
        assert_ne!(cp.current().version, before, "the change was not applied");
        let rsp = cp.watch("workload=default/unnamed").await;
        assert_eq!(rsp.status(), StatusCode::INSUFFICIENT_STORAGE);
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.starts_with("view too large") && body.contains("default/unnamed"),
            "{body}"
        );
        let rsp = cp.watch("workload=default/small").await;
        assert_eq!(rsp.status(), StatusCode::OK);
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        let view: crate::api::WatchResponse = serde_json::from_slice(&body).unwrap();
        assert_eq!(view.outbound.services, vec![one]);
    }

    #[tokio::test(start_paused = true)]
    async fn follow_applies_only_whole_valid_files_and_keeps_the_last_good() {
        let path = scratch("follow.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let cp = ControlPlane::new(Mesh::parse(GOOD).unwrap()).unwrap();
        let first = cp.current().version.clone();
        let follower = tokio::spawn(cp.clone().follow(path.clone(), GOOD.to_string()));
        // A truncated write (empty), whitespace and comments only, a half-written file: each
        // rejected, the first version stays.
        let mut rejected = 0;
        for bad in [
            "",
            "  \n\n",
            "# mesh\n---\n",
            "services:\n  - name: a\n    addresses: [198.18",
        ] {
            std::fs::write(&path, bad).unwrap();
            rejected += 1;
            until("the rejection", || cp.metrics.rejected.get() == rejected).await;
            assert_eq!(cp.current().version, first, "{bad:?} was applied");
        }
        // A file too large is refused without being parsed.
        let big = vec![b'#'; MAX_MESH_BYTES + 1];
        std::fs::write(&path, &big).unwrap();
        until("the size rejection", || {
            cp.metrics.rejected.get() == rejected + 1
        })
        .await;
        assert_eq!(cp.current().version, first);
        // A valid change applies.
        let next = GOOD.replace("198.18.0.1", "198.18.0.2");
        std::fs::write(&path, &next).unwrap();
        until("the new version", || cp.current().version != first).await;
        assert_eq!(
            cp.current().mesh.services[0].addresses[0].to_string(),
            "198.18.0.2:80"
        );
        follower.abort();
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test(start_paused = true)]
    async fn follow_parses_off_the_runtime_thread() {
        let path = scratch("blocking.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let cp = ControlPlane::new(Mesh::parse(GOOD).unwrap()).unwrap();
        let follower = tokio::spawn(cp.clone().follow(path.clone(), GOOD.to_string()));
        // A hostile file: 100,000 nested `[` (the parser alone took 34 s on this). The runtime's
        // thread keeps running other tasks while it is refused.
        let deep = format!("services: {}", "[".repeat(100_000));
        std::fs::write(&path, &deep).unwrap();
        let started = std::time::Instant::now();
        until("the rejection", || cp.metrics.rejected.get() == 1).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let runtime_thread = std::thread::current().id();
        let parses: Vec<_> = LAST_PARSE_THREAD
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| *p == path)
            .map(|(_, t)| *t)
            .collect();
        assert!(!parses.is_empty(), "the follower parsed nothing");
        assert!(
            !parses.contains(&runtime_thread),
            "parsed on the runtime thread"
        );
        follower.abort();
        let _ = std::fs::remove_file(&path);
    }
}
