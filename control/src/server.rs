//! `outrider control`: serves the mesh config over the watch API (see [`crate::api`]) and follows
//! the config file.
//!
//! The file is polled every 250 ms. A changed file that validates becomes the new version at
//! once; one that does not is rejected with every error and its key path in the log, counted in
//! `outrider_control_config_rejected_total`, and the last good config stays in force.
//!
//! Each watch is one long-poll request; a slow or dead watcher holds only its own connection
//! and task until its wait ends.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus::{Encoder, IntCounter, IntGauge, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::WATCH_PATH;
use crate::duration;
use crate::mesh::{Mesh, DEMO_MESH};
use crate::runtime::{block_on, serve_http1, shutdown_signal, text};

/// Longest wait a watcher may ask for.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Wait when the watcher names none.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// How often the config file is checked.
const POLL: Duration = Duration::from_millis(250);

/// One version of the mesh.
#[derive(Debug)]
pub struct Snapshot {
    /// `<epoch>-<n>`: unique across restarts of the control plane.
    pub version: String,
    /// The validated mesh.
    pub mesh: Mesh,
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
    epoch: String,
    registry: Registry,
    metrics: Metrics,
}

impl ControlPlane {
    /// A control plane serving `mesh` as its first version.
    pub fn new(mesh: Mesh) -> anyhow::Result<Arc<Self>> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let epoch = format!("{:x}", nanos ^ u128::from(std::process::id()));
        let registry = Registry::new();
        let metrics = Metrics::register(&registry)?;
        metrics.applied.inc();
        tracing::info!(version = %format!("{epoch}-1"), "serving {}", mesh.summary());
        let first = Arc::new(Snapshot {
            version: format!("{epoch}-1"),
            mesh,
        });
        let (snapshots, _) = watch::channel(first);
        Ok(Arc::new(Self {
            snapshots,
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
    pub fn apply(&self, yaml: &str) -> Result<String, Vec<crate::mesh::ConfigError>> {
        match Mesh::parse(yaml) {
            Ok(mesh) => {
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
                    tracing::info!(%version, "config applied: {}", mesh.summary());
                    *snap = Arc::new(Snapshot {
                        version: version.clone(),
                        mesh,
                    });
                });
                self.metrics.applied.inc();
                Ok(version)
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

    /// Follows `path`: every change is applied or rejected (see the module docs).
    pub async fn follow(self: Arc<Self>, path: PathBuf, mut last: String) {
        loop {
            tokio::time::sleep(POLL).await;
            let text = match tokio::fs::read_to_string(&path).await {
                Ok(t) => t,
                Err(e) => {
                    if last != "\0unreadable" {
                        tracing::warn!(path = %path.display(), error = %e, "cannot read the config file; keeping the last good config");
                        last = "\0unreadable".into();
                    }
                    continue;
                }
            };
            if text != last {
                let _ = self.apply(&text);
                last = text;
            }
        }
    }

    /// Serves the API on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        serve_http1(listener, move |req, _peer| {
            let cp = self.clone();
            async move { cp.route(req).await }
        })
        .await
    }

    async fn route(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, WATCH_PATH) => self.watch(req.uri().query().unwrap_or("")).await,
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

    async fn watch(&self, query: &str) -> Response<Full<Bytes>> {
        let q = match WatchQuery::parse(query) {
            Ok(q) => q,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        };
        let mut rx = self.snapshots.subscribe();
        let snap = rx.borrow_and_update().clone();
        let Some(mut view) = snap.mesh.view(&q.workload, &snap.version) else {
            return text(
                StatusCode::NOT_FOUND,
                format!(
                    "unknown workload \"{}\": it is not in the mesh config's workloads\n",
                    q.workload
                ),
            );
        };
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
                    let Some(next) = snap.mesh.view(&q.workload, &snap.version) else {
                        return text(
                            StatusCode::NOT_FOUND,
                            format!(
                                "workload \"{}\" was removed from the mesh config\n",
                                q.workload
                            ),
                        );
                    };
                    // Wake the watcher only when its own view changed.
                    if next.outbound != view.outbound || next.inbound != view.inbound {
                        return self.json(&next);
                    }
                    view = next;
                }
            }
        }
    }

    fn json(&self, view: &crate::api::WatchResponse) -> Response<Full<Bytes>> {
        self.metrics.responses.inc();
        match serde_json::to_vec(view) {
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

struct Dec(IntGauge);
impl Drop for Dec {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The watch request's parameters.
#[derive(Debug, PartialEq, Eq)]
struct WatchQuery {
    workload: String,
    version: Option<String>,
    wait: Duration,
}

impl WatchQuery {
    fn parse(query: &str) -> Result<Self, String> {
        let (mut workload, mut version, mut wait) = (None, None, DEFAULT_WAIT);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = &percent_decode(v).ok_or_else(|| format!("bad escape in \"{v}\""))?;
            match k {
                "workload" => {
                    let ok = v
                        .split_once('/')
                        .is_some_and(|(ns, n)| !ns.is_empty() && !n.is_empty())
                        && v.len() <= 253
                        && v.bytes().all(|b| {
                            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'/'
                        });
                    if !ok {
                        return Err(format!("bad workload \"{v}\": expected namespace/name"));
                    }
                    workload = Some(v.to_string());
                }
                "version" => {
                    if v.len() > 64 || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                        return Err(format!(
                            "bad version \"{v}\": send back the version you received"
                        ));
                    }
                    version = Some(v.to_string()).filter(|v| !v.is_empty());
                }
                "wait" => {
                    wait = duration::parse(v).map_err(|e| format!("bad wait: {e}"))?;
                    if wait > MAX_WAIT {
                        return Err(format!(
                            "bad wait \"{v}\": at most {}",
                            duration::format(MAX_WAIT)
                        ));
                    }
                }
                other => return Err(format!("unknown parameter \"{other}\"")),
            }
        }
        let workload = workload.ok_or("missing workload=NAMESPACE/NAME")?;
        Ok(Self {
            workload,
            version,
            wait,
        })
    }
}

/// Decodes `%XX` escapes (and `+` as space) in a query value; `None` for a broken escape or
/// bytes that are not UTF-8.
fn percent_decode(v: &str) -> Option<String> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn not_modified() -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::new()));
    *rsp.status_mut() = StatusCode::NOT_MODIFIED;
    rsp
}

/// Flags of `outrider control`.
#[derive(Debug, Clone, clap::Args)]
pub struct ControlArgs {
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
}

/// Runs `outrider control`.
pub fn main(args: ControlArgs) -> std::process::ExitCode {
    use std::process::ExitCode;
    if let Some(path) = &args.check {
        return match std::fs::read_to_string(path) {
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
        };
    }
    let spec = std::env::var("OUTRIDER_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&spec)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let text = match &args.config {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("outrider control: cannot read {}: {e}", path.display());
                return ExitCode::from(2);
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
            return ExitCode::from(2);
        }
    };
    block_on("outrider control", 1, async move {
        let cp = match ControlPlane::new(mesh) {
            Ok(cp) => cp,
            Err(e) => {
                eprintln!("outrider control: {e:#}");
                return ExitCode::from(1);
            }
        };
        let listener = match TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("outrider control: cannot bind {}: {e}", args.listen);
                return ExitCode::from(1);
            }
        };
        tracing::info!(listen = %args.listen, config = %args.config.as_ref().map_or("<embedded demo mesh>".into(), |p| p.display().to_string()), "control plane ready");
        if let Some(path) = args.config {
            tokio::spawn(cp.clone().follow(path, text));
        }
        tokio::select! {
            () = cp.serve(listener) => {}
            () = shutdown_signal() => tracing::info!("shutting down"),
        }
        ExitCode::SUCCESS
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
                workload: "demo/loadgen".into(),
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
                .workload,
            "demo/loadgen"
        );
        assert!(WatchQuery::parse("workload=demo%2")
            .unwrap_err()
            .contains("bad escape"));
        assert!(WatchQuery::parse("workload=%ff%fe/x")
            .unwrap_err()
            .contains("bad escape"));
    }
}
