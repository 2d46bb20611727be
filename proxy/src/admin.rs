//! The admin server (default 127.0.0.1:15020), for probes, operators and Prometheus:
//!
//! | path | method | what |
//! | --- | --- | --- |
//! | `/live` | GET | 200 while the process serves |
//! | `/ready` | GET | 200 once nothing holds readiness back (listeners bound, with `--control` the first config); 503 naming what is missing, and while draining |
//! | `/metrics` | GET | Prometheus text format |
//! | `/config` | GET | the effective configuration and the mesh view, JSON (loopback peers only; the configuration holds no secrets: credentials and queries in `--control` are refused) |
//! | `/endpoints` | GET | every outbound destination in use: its service, balancer and endpoints with their weight, requests in flight, latency estimate and breaker state, JSON (loopback peers only) |
//! | `/identity` | GET | the proxy's SPIFFE identity, its chain's subjects and issuers, validity and next renewal, JSON (no key, no token) |
//! | `/log-level` | GET, PUT | read or replace the log filter (loopback peers only) |
//! | `/shutdown` | POST | start a graceful shutdown (loopback peers only) |
//! | `/app-probe/<container>/<kind>` | GET | the app's own HTTP probe, forwarded to it on loopback (Kubernetes: `outrider inject` points the kubelet's probes here; see `app_probe`) |

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;

use outrider_control::runtime::{serve_http1, text};

use crate::app_probe::{self, AppProbes};
use crate::discovery::Discovery;
use crate::drain::ShutdownHandle;
use crate::log::LogHandle;
use crate::readiness::Readiness;

/// What the admin endpoints read and act on.
pub(crate) struct AdminState {
    /// The proxy's metric registry.
    pub registry: Registry,
    /// What readiness waits for.
    pub readiness: Readiness,
    /// The static part of `/config`.
    pub config: serde_json::Value,
    /// The app's probes served at `/app-probe/<container>/<kind>`.
    pub app_probes: AppProbes,
    /// Discovery, when a control plane is configured: shown on `/config`.
    pub discovery: Option<Discovery>,
    /// Log filter control, if this process installed the logger.
    pub log: Option<Arc<LogHandle>>,
    /// Starts a graceful shutdown.
    pub shutdown: ShutdownHandle,
    /// The proxy's identity and its next renewal, when it has one: shown on `/identity`.
    pub identity: Option<(
        Arc<crate::identity::IdentityStore>,
        crate::identity::certify::NextRenewal,
    )>,
    /// The outbound stacks, shown on `/endpoints`.
    pub outbounds: Vec<Arc<crate::outbound::Outbound>>,
}

/// A JSON response for people (500 if it cannot be encoded, never an empty 200).
fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    outrider_control::runtime::json(value, true)
}

/// Serves the admin API on `listener` until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    serve_http1(listener, move |req, peer| {
        let state = state.clone();
        async move { route(req, peer, &state).await }
    })
    .await
}

async fn route(
    req: Request<Incoming>,
    peer: SocketAddr,
    state: &AdminState,
) -> Response<Full<Bytes>> {
    let local_only =
        |peer: SocketAddr| peer.ip().is_loopback() || peer.ip().to_canonical().is_loopback();
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (Method::GET, "/ready") => match state.readiness.check() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(missing) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {missing}\n"),
            ),
        },
        (Method::GET, "/metrics") => {
            let mut buf = Vec::with_capacity(16 * 1024);
            match TextEncoder::new().encode(&state.registry.gather(), &mut buf) {
                Ok(()) => {
                    let mut rsp = text(StatusCode::OK, buf);
                    rsp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(
                            "text/plain; version=0.0.4; charset=utf-8",
                        ),
                    );
                    rsp
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot encode metrics: {e}\n"),
                ),
            }
        }
        (Method::GET, path) if path.starts_with("/app-probe/") => {
            match state.app_probes.get(&path["/app-probe/".len()..]) {
                Some(probe) => app_probe::forward(probe).await,
                None => text(StatusCode::NOT_FOUND, "no such app probe\n"),
            }
        }
        (_, "/config" | "/endpoints" | "/log-level" | "/shutdown") if !local_only(peer) => text(
            StatusCode::FORBIDDEN,
            "only loopback peers may use this endpoint\n",
        ),
        (Method::GET, "/endpoints") => {
            let stacks: Vec<serde_json::Value> =
                state.outbounds.iter().map(|o| o.endpoints_json()).collect();
            json(&serde_json::json!({ "outbound": stacks }))
        }
        (Method::GET, "/config") => {
            let mut config = state.config.clone();
            if let (Some(d), Some(obj)) = (&state.discovery, config.as_object_mut()) {
                obj.insert("control".into(), d.status.to_json());
                let view = d
                    .latest()
                    .map(|v| serde_json::json!({"outbound": v.outbound, "inbound": v.inbound}));
                obj.insert("view".into(), view.unwrap_or(serde_json::Value::Null));
            }
            json(&config)
        }

        (Method::GET, "/identity") => {
            let body = match &state.identity {
                Some((store, next)) => {
                    let next = next.lock().ok().and_then(|n| *n);
                    crate::identity::describe(store, next)
                }
                None => serde_json::json!({
                    "identity": null,
                    "state": "no identity configured (--identity-token-file): plaintext only",
                }),
            };
            json(&body)
        }
        (Method::GET, "/log-level") => match &state.log {
            Some(log) => text(StatusCode::OK, format!("{}\n", log.current())),
            None => text(
                StatusCode::NOT_FOUND,
                "this process does not own its logger\n",
            ),
        },
        (Method::PUT, "/log-level") => {
            let Some(log) = &state.log else {
                return text(
                    StatusCode::NOT_FOUND,
                    "this process does not own its logger\n",
                );
            };
            let body = match Limited::new(req.into_body(), 4096).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("cannot read the body: {e}\n"),
                    )
                }
            };
            let Ok(spec) = std::str::from_utf8(&body) else {
                return text(StatusCode::BAD_REQUEST, "the filter is not UTF-8\n");
            };
            if spec.trim().is_empty() {
                // An empty filter would silence every line, the warnings included.
                return text(
                    StatusCode::BAD_REQUEST,
                    "an empty filter would turn logging off; send e.g. `info` or `outrider_proxy=debug,info`\n",
                );
            }
            // Said before it applies, so the change shows even when the new filter hides warn.
            tracing::warn!(from = %log.current(), to = %spec.trim(), "log filter change requested through the admin API");
            match log.set(spec) {
                Ok(()) => text(StatusCode::OK, format!("{}\n", spec.trim())),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        (Method::POST, "/shutdown") => {
            state.shutdown.trigger("admin /shutdown");
            text(StatusCode::OK, "shutting down\n")
        }
        (
            _,
            "/live" | "/ready" | "/metrics" | "/config" | "/identity" | "/log-level" | "/shutdown",
        ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live /ready /metrics /config /identity /log-level /shutdown\n",
        ),
    }
}
