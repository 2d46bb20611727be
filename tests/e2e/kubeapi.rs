//! A stand-in Kubernetes API server for the tests: HTTPS (a certificate from a CA made per
//! server), bearer-token authentication, and the list/watch protocol the `kube` client speaks,
//! for Services, EndpointSlices and Pods:
//!
//! - lists carry the store's `resourceVersion` (one counter for every object, as etcd's);
//! - `?watch=true&resourceVersion=N` streams, chunked, one JSON event a line (`ADDED`,
//!   `MODIFIED`, `DELETED`) for every change after `N`, then waits for more; [`KubeApi::bookmark`]
//!   sends a `BOOKMARK` on every open watch;
//! - a watch from a version older than the history kept ([`KubeApi::compact`]) gets the API's
//!   `ERROR` event with a `410 Gone` Status, so the client must list again;
//! - [`KubeApi::forbid`] answers `403` with the API's Status for one verb on one resource;
//! - [`KubeApi::set_down`] answers `503` to everything and ends the open watches (an API server
//!   that is unreachable for a while);
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews` answers from the tokens registered with
//!   [`KubeApi::review`];
//! - `GET` of one object by its path (a pod, a namespace) answers it or `404`; `PUT` replaces
//!   it (`409` unless it carries the stored `resourceVersion`); `PATCH` (server-side apply)
//!   stores the applied object; lists honour an equality `labelSelector`.
//!
//! Every request is recorded ([`KubeApi::requests`]) so tests can see the client's protocol
//! (relists, watch versions). [`KubeApi::kubeconfig`] writes the kubeconfig file that reaches
//! it: `server`, `certificate-authority-data` and a bearer `token`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

/// The resources served: (plural, path prefix, kind, apiVersion).
const RESOURCES: [(&str, &str, &str, &str); 6] = [
    ("services", "/api/v1", "Service", "v1"),
    (
        "endpointslices",
        "/apis/discovery.k8s.io/v1",
        "EndpointSlice",
        "discovery.k8s.io/v1",
    ),
    ("pods", "/api/v1", "Pod", "v1"),
    ("namespaces", "/api/v1", "Namespace", "v1"),
    ("configmaps", "/api/v1", "ConfigMap", "v1"),
    (
        "mutatingwebhookconfigurations",
        "/apis/admissionregistration.k8s.io/v1",
        "MutatingWebhookConfiguration",
        "admissionregistration.k8s.io/v1",
    ),
];

/// The cluster-scoped ones among them.
const CLUSTER_SCOPED: [&str; 2] = ["namespaces", "mutatingwebhookconfigurations"];

/// The API server's own audience, the one a review asking for none checks.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc";

/// One recorded request: method, path and query.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `GET`, `POST`.
    pub method: String,
    /// The path.
    pub path: String,
    /// The query parameters.
    pub query: HashMap<String, String>,
}

impl Recorded {
    /// Whether this is a list (not a watch) of `resource`.
    pub fn is_list_of(&self, resource: &str) -> bool {
        self.method == "GET"
            && self.path.ends_with(&format!("/{resource}"))
            && !self.query.contains_key("watch")
    }

    /// Whether this is a watch of `resource`.
    pub fn is_watch_of(&self, resource: &str) -> bool {
        self.path.ends_with(&format!("/{resource}")) && self.query.contains_key("watch")
    }
}

/// What a token review answers for a token.
#[derive(Debug, Clone)]
pub struct Reviewed {
    /// The namespace of the service account.
    pub namespace: String,
    /// The service account.
    pub service_account: String,
    /// The pod the token was issued for, if bound to one.
    pub pod: Option<String>,
    /// The token's audiences.
    pub audiences: Vec<String>,
}

#[derive(Default)]
struct State {
    /// The last resourceVersion given out.
    rv: u64,
    /// (resource, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    /// The changes kept: (resourceVersion, resource, event line).
    history: Vec<(u64, String, String)>,
    /// Watches from a version at or below this one get 410.
    compacted: u64,
    /// (verb, resource) answered 403.
    forbidden: HashSet<(String, String)>,
    /// Everything answers 503.
    down: bool,
    /// Tokens the TokenReview API accepts.
    reviews: HashMap<String, Reviewed>,
    requests: Vec<Recorded>,
}

/// The stand-in API server; stops when dropped.
pub struct KubeApi {
    state: Arc<Mutex<State>>,
    /// Ticks on every change of the state (watches wake on it); a new generation ends them.
    tick: watch::Sender<(u64, u64)>,
    addr: SocketAddr,
    ca_pem: String,
    token: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl KubeApi {
    /// Starts a stand-in on a loopback port of its own (port 0).
    pub fn start() -> KubeApi {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let ca = outrider_control::ca::Ca::generate("kube.test").unwrap();
        let serving = outrider_control::authority::ServingCert::new(
            &ca,
            vec!["localhost".into()],
            vec![[127, 0, 0, 1].into()],
            Duration::from_secs(3600),
        )
        .unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(serving.server_config().unwrap());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let token = format!("stand-in-admin-{}", crate::support::unique());
        let state = Arc::new(Mutex::new(State::default()));
        let (tick, _) = watch::channel((0, 0));
        let server = Server {
            state: state.clone(),
            tick: tick.clone(),
            token: token.clone(),
        };
        runtime.spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let (tls, server) = (tls.clone(), server.clone());
                tokio::spawn(async move {
                    let Ok(stream) = tls.accept(socket).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        KubeApi {
            state,
            tick,
            addr,
            ca_pem: ca.trust_anchors_pem().to_string(),
            token,
            runtime: Some(runtime),
        }
    }

    /// Writes a kubeconfig that reaches this server (CA data, server, bearer token) into `dir`;
    /// returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        use base64::Engine;
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    \
             server: https://{}\n    certificate-authority-data: {ca}\nusers:\n- name: control\n  \
             user:\n    token: {}\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    \
             user: control\ncurrent-context: stand-in\n",
            self.addr, self.token
        );
        let path = dir.join("kubeconfig");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.state.lock().unwrap());
        self.tick.send_modify(|(n, _)| *n += 1);
        out
    }

    /// Creates or replaces an object of `resource` (`services`, `endpointslices`, `pods`),
    /// stamping its `apiVersion`, `kind` and a new `resourceVersion`; watches see `ADDED` or
    /// `MODIFIED`.
    pub fn apply(&self, resource: &str, object: Value) {
        self.with(|s| store(s, resource, object));
    }

    /// The object stored as `resource` `namespace`/`name` (`""` for a cluster-scoped one).
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (
            resource.to_string(),
            namespace.to_string(),
            name.to_string(),
        );
        self.state.lock().unwrap().objects.get(&key).cloned()
    }

    /// Deletes an object; watches see `DELETED`.
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) {
        self.with(|s| {
            let key = (resource.to_string(), namespace.into(), name.into());
            let Some(mut object) = s.objects.remove(&key) else {
                return;
            };
            s.rv += 1;
            object["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            let line = json!({"type": "DELETED", "object": object}).to_string();
            s.history.push((s.rv, resource.to_string(), line));
        });
    }

    /// Forgets the history up to now: a watch from an older version gets `410 Gone`.
    pub fn compact(&self) {
        self.with(|s| {
            s.compacted = s.rv;
            s.history.clear();
        });
    }

    /// Sends a `BOOKMARK` with the current resourceVersion on every open watch.
    pub fn bookmark(&self) {
        self.with(|s| {
            for (resource, _, kind, api_version) in RESOURCES {
                let line = json!({"type": "BOOKMARK", "object": {
                    "kind": kind, "apiVersion": api_version,
                    "metadata": {"resourceVersion": s.rv.to_string()}}})
                .to_string();
                // A bookmark is not a change: it rides on the history at the current version.
                s.history.push((s.rv, format!("{resource}#bookmark"), line));
            }
        });
    }

    /// Ends every open watch (as an API server does at its watch timeout); clients watch again.
    pub fn end_watches(&self) {
        self.tick.send_modify(|(_, generation)| *generation += 1);
    }

    /// Answers `403 Forbidden` to `verb` (`list`, `watch`) on `resource`, or stops doing so.
    pub fn forbid(&self, verb: &str, resource: &str, forbidden: bool) {
        self.with(|s| {
            let key = (verb.to_string(), resource.to_string());
            if forbidden {
                s.forbidden.insert(key);
            } else {
                s.forbidden.remove(&key);
            }
        });
        self.end_watches();
    }

    /// Answers `503` to everything (and ends the open watches), or serves again.
    pub fn set_down(&self, down: bool) {
        self.with(|s| s.down = down);
        self.end_watches();
    }

    /// Makes the TokenReview API accept `token` for `reviewed`.
    pub fn review(&self, token: &str, reviewed: Reviewed) {
        self.with(|s| {
            s.reviews.insert(token.to_string(), reviewed);
        });
    }

    /// Makes the TokenReview API reject `token` again (as it does an expired one).
    pub fn forget_review(&self, token: &str) {
        self.with(|s| {
            s.reviews.remove(token);
        });
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The resourceVersion of the last change.
    pub fn version(&self) -> u64 {
        self.state.lock().unwrap().rv
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Stores `object` as a new version (see [`KubeApi::apply`]); returns it as stored.
fn store(s: &mut State, resource: &str, mut object: Value) -> Value {
    let (_, _, kind, api_version) = resource_of(resource);
    // Cluster-scoped objects (namespaces, webhook configurations) have none.
    let ns = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or("")
        .to_string();
    s.rv += 1;
    object["apiVersion"] = json!(api_version);
    object["kind"] = json!(kind);
    object["metadata"]["resourceVersion"] = json!(s.rv.to_string());
    let key = (resource.to_string(), ns, name);
    let event = if s.objects.contains_key(&key) {
        "MODIFIED"
    } else {
        "ADDED"
    };
    let line = json!({"type": event, "object": object}).to_string();
    s.objects.insert(key, object.clone());
    s.history.push((s.rv, resource.to_string(), line));
    object
}

/// A query value with its `%XX` escapes decoded.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn resource_of(resource: &str) -> (&'static str, &'static str, &'static str, &'static str) {
    RESOURCES
        .into_iter()
        .find(|r| r.0 == resource)
        .unwrap_or_else(|| panic!("the stand-in serves no {resource}"))
}

#[derive(Clone)]
struct Server {
    state: Arc<Mutex<State>>,
    tick: watch::Sender<(u64, u64)>,
    token: String,
}

/// A response body: whole, or a watch's lines as they come.
enum Body {
    Full(Full<Bytes>),
    Lines(mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(b) => Pin::new(b).poll_frame(cx),
            Body::Lines(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                      "status": "Failure", "message": message, "reason": reason, "code": code});
    let mut rsp = Response::new(Body::Full(Full::new(Bytes::from(body.to_string()))));
    *rsp.status_mut() = StatusCode::from_u16(code).unwrap();
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().unwrap(),
    );
    rsp
}

fn ok_json(body: Value) -> Response<Body> {
    let mut rsp = Response::new(Body::Full(Full::new(Bytes::from(body.to_string()))));
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().unwrap(),
    );
    rsp
}

impl Server {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_string(), v.to_string())
            })
            .collect();
        let method = req.method().clone();
        let authorized = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some(format!("Bearer {}", self.token).as_str());
        let down = {
            let mut s = self.state.lock().unwrap();
            s.requests.push(Recorded {
                method: method.to_string(),
                path: path.clone(),
                query: query.clone(),
            });
            s.down
        };
        if down {
            return status(503, "ServiceUnavailable", "the stand-in is down");
        }
        if !authorized {
            return status(401, "Unauthorized", "Unauthorized");
        }
        if method == Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
            let body = req.into_body().collect().await.map(|b| b.to_bytes());
            return self.token_review(body.ok());
        }
        if let Ok(answered) = self.one(req).await {
            return answered;
        }
        let Some((resource, _, kind, api_version)) = RESOURCES
            .into_iter()
            .find(|(r, prefix, _, _)| path == format!("{prefix}/{r}"))
        else {
            return status(404, "NotFound", &format!("the stand-in serves no {path}"));
        };
        if method != Method::GET {
            return status(405, "MethodNotAllowed", "GET only");
        }
        let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
        let verb = if watching { "watch" } else { "list" };
        if self
            .state
            .lock()
            .unwrap()
            .forbidden
            .contains(&(verb.to_string(), resource.to_string()))
        {
            return status(
                403,
                "Forbidden",
                &format!(
                    "{resource} is forbidden: User \"system:serviceaccount:outrider-system:outrider-control\" \
                     cannot {verb} resource \"{resource}\" in API group \"{}\" at the cluster scope",
                    if api_version == "v1" { "" } else { "discovery.k8s.io" }
                ),
            );
        }
        if !watching {
            let s = self.state.lock().unwrap();
            // `labelSelector=k=v,k2=v2` (equality only).
            let selector: Vec<(String, String)> = query
                .get("labelSelector")
                .map(|s| decode(s))
                .unwrap_or_default()
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let items: Vec<&Value> = s
                .objects
                .iter()
                .filter(|((r, _, _), _)| r == resource)
                .map(|(_, o)| o)
                .filter(|o| {
                    selector
                        .iter()
                        .all(|(k, v)| o["metadata"]["labels"][k].as_str() == Some(v.as_str()))
                })
                .collect();
            return ok_json(
                json!({"kind": format!("{kind}List"), "apiVersion": api_version,
                                  "metadata": {"resourceVersion": s.rv.to_string()},
                                  "items": items}),
            );
        }
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = mpsc::channel(64);
        let mut ticks = self.tick.subscribe();
        let state = self.state.clone();
        let bookmarks = query
            .get("allowWatchBookmarks")
            .is_some_and(|b| b == "true");
        tokio::spawn(async move {
            let generation = ticks.borrow_and_update().1;
            let mut sent = from;
            // Bookmarks are sent once each: how many of the history's were there at the start.
            let (gone, mut bookmarks_sent) = {
                let s = state.lock().unwrap();
                let gone = (from < s.compacted).then(|| {
                    json!({"type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "reason": "Expired", "code": 410,
                        "message": format!("too old resource version: {from} ({})", s.compacted)}})
                });
                let marks = s
                    .history
                    .iter()
                    .filter(|(_, r, _)| *r == format!("{resource}#bookmark"))
                    .count();
                (gone, marks)
            };
            if let Some(line) = gone {
                let _ = tx.send(Bytes::from(format!("{line}\n"))).await;
                return;
            }
            loop {
                let lines: Vec<String> = {
                    let s = state.lock().unwrap();
                    let mut out: Vec<String> = s
                        .history
                        .iter()
                        .filter(|(rv, r, _)| *rv > sent && r == resource)
                        .map(|(_, _, l)| l.clone())
                        .collect();
                    sent = s.rv.max(sent);
                    let marks: Vec<&String> = s
                        .history
                        .iter()
                        .filter(|(_, r, _)| *r == format!("{resource}#bookmark"))
                        .map(|(_, _, l)| l)
                        .collect();
                    if bookmarks {
                        out.extend(marks.iter().skip(bookmarks_sent).map(|l| (*l).clone()));
                    }
                    bookmarks_sent = marks.len();
                    out
                };
                for line in lines {
                    if tx.send(Bytes::from(format!("{line}\n"))).await.is_err() {
                        return;
                    }
                }
                if ticks.changed().await.is_err() || ticks.borrow_and_update().1 != generation {
                    return;
                }
            }
        });
        let mut rsp = Response::new(Body::Lines(rx));
        rsp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            "application/json".parse().unwrap(),
        );
        rsp
    }

    /// `GET` of one object by its path (`/api/v1/namespaces/NS/pods/NAME`,
    /// `/api/v1/namespaces/NAME`, ...) and `PUT` of one (a replace, which must carry the
    /// stored `resourceVersion`: else `409 Conflict`); `None` for another path.
    async fn one(&self, req: Request<Incoming>) -> Result<Response<Body>, Request<Incoming>> {
        let path = req.uri().path().to_string();
        let namespaced = RESOURCES.into_iter().find_map(|(r, prefix, _, _)| {
            let rest = path.strip_prefix(prefix)?.strip_prefix("/namespaces/")?;
            let (ns, rest) = rest.split_once('/')?;
            let name = rest.strip_prefix(r)?.strip_prefix('/')?;
            Some((r, ns.to_string(), name.to_string()))
        });
        let cluster = || {
            RESOURCES.into_iter().find_map(|(r, prefix, _, _)| {
                let name = path
                    .strip_prefix(prefix)?
                    .strip_prefix('/')?
                    .strip_prefix(r)?;
                let name = name.strip_prefix('/')?;
                (CLUSTER_SCOPED.contains(&r) && !name.is_empty() && !name.contains('/'))
                    .then(|| (r, String::new(), name.to_string()))
            })
        };
        let Some((resource, ns, name)) = namespaced.or_else(cluster) else {
            return Err(req);
        };
        let key = (resource.to_string(), ns, name.clone());
        match *req.method() {
            Method::GET => {
                let s = self.state.lock().unwrap();
                Ok(match s.objects.get(&key) {
                    Some(o) => ok_json(o.clone()),
                    None => status(404, "NotFound", &format!("{resource} \"{name}\" not found")),
                })
            }
            // Server-side apply, as far as the tests need it: the applied object is stored whole.
            Method::PATCH => {
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                let Some(mut object) = body
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                else {
                    return Ok(status(400, "BadRequest", "not JSON"));
                };
                object["metadata"]["name"] = json!(key.2);
                if !key.1.is_empty() {
                    object["metadata"]["namespace"] = json!(key.1);
                }
                let stored = store(&mut self.state.lock().unwrap(), resource, object);
                self.tick.send_modify(|(n, _)| *n += 1);
                Ok(ok_json(stored))
            }
            Method::PUT => {
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                let Some(object) = body
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                else {
                    return Ok(status(400, "BadRequest", "not JSON"));
                };
                let mut s = self.state.lock().unwrap();
                let stored = s
                    .objects
                    .get(&key)
                    .map(|o| o["metadata"]["resourceVersion"].clone());
                if stored.as_ref() != Some(&object["metadata"]["resourceVersion"]) {
                    return Ok(status(409, "Conflict", "the object has been modified"));
                }
                let stored = store(&mut s, resource, object);
                drop(s);
                self.tick.send_modify(|(n, _)| *n += 1);
                Ok(ok_json(stored))
            }
            _ => Ok(status(405, "MethodNotAllowed", "GET, PUT and PATCH only")),
        }
    }

    fn token_review(&self, body: Option<Bytes>) -> Response<Body> {
        let Some(review) = body.and_then(|b| serde_json::from_slice::<Value>(&b).ok()) else {
            return status(400, "BadRequest", "not a TokenReview");
        };
        let token = review["spec"]["token"].as_str().unwrap_or("");
        let mut wanted: Vec<String> = review["spec"]["audiences"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        // As the API server: no audiences asked for means its own.
        if wanted.is_empty() {
            wanted.push(API_AUDIENCE.to_string());
        }
        let found = self.state.lock().unwrap().reviews.get(token).cloned();
        let status = match found {
            Some(r) if wanted.iter().all(|a| r.audiences.contains(a)) => {
                let mut extra = json!({});
                if let Some(pod) = &r.pod {
                    extra = json!({
                        "authentication.kubernetes.io/pod-name": [pod],
                        "authentication.kubernetes.io/pod-uid": ["0000"],
                    });
                }
                json!({"authenticated": true, "audiences": wanted, "user": {
                    "username": format!("system:serviceaccount:{}:{}", r.namespace, r.service_account),
                    "uid": "1111",
                    "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", r.namespace)],
                    "extra": extra}})
            }
            Some(_) => json!({"authenticated": false, "error": "token audiences are invalid"}),
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        };
        ok_json(
            json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                       "metadata": {"creationTimestamp": null}, "spec": review["spec"], "status": status}),
        )
    }
}
