//! Mutual TLS and authorization between two proxies, in process: a client-side proxy (workload
//! `demo/web`) and a server-side proxy (workload `demo/api`) in front of an app, a control plane
//! serving their views, and real certificates from a CA minted per test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use outrider::demo::ClientConn;
use outrider_proxy::app::IdentitySource;
use outrider_proxy::config::Config;
use outrider_proxy::identity::certify::TokenSource;
use outrider_proxy::identity::testing::{token_for, SigningCa, TestCa};
use outrider_proxy::metrics::Direction;
use outrider_proxy::test_util::FixedOrigDst;
use outrider_proxy::Proxy;

pub(crate) const WEB: &str = "spiffe://outrider.local/ns/demo/sa/web";
pub(crate) const API: &str = "spiffe://outrider.local/ns/demo/sa/api";
/// The service's virtual address (never dialled: the client proxy's original destination).
const VIRTUAL: &str = "198.18.0.10:80";
/// An opaque service on the same endpoint, reached through the client proxy's forward listener.
const RAW: &str = "198.18.0.11:7000";

pub(crate) struct Node {
    pub(crate) registry: prometheus::Registry,
    pub(crate) admin: SocketAddr,
    pub(crate) inbound: Option<SocketAddr>,
    pub(crate) outbound: Option<SocketAddr>,
    pub(crate) forward: Option<SocketAddr>,
    pub(crate) stop: outrider_proxy::ShutdownHandle,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.trigger("test over");
    }
}

impl Node {
    pub(crate) fn sum(&self, family: &str, labels: &[(&str, &str)]) -> f64 {
        outrider_proxy::metrics::sum(&self.registry, family, labels)
    }
}

pub(crate) struct Mesh {
    pub(crate) control: Arc<outrider_control::ControlPlane>,
    pub(crate) control_addr: SocketAddr,
    pub(crate) ca: Arc<SigningCa>,
    pub(crate) app: SocketAddr,
    pub(crate) server: Node,
    pub(crate) client: Node,
}

/// The mesh config: `api` (protocol `protocol`) served by the server proxy's inbound listener,
/// presenting `endpoint_id`; the `demo/api` workload's policy lines are `servers`.
pub(crate) fn mesh_yaml(
    inbound: SocketAddr,
    protocol: &str,
    endpoint_id: &str,
    servers: &str,
) -> String {
    format!(
        "services:\n  - name: api\n    namespace: demo\n    addresses: [{VIRTUAL}]\n    protocol: {protocol}\n    endpoints:\n      - address: {inbound}\n        identity: {endpoint_id}\n  - name: raw\n    namespace: demo\n    addresses: [{RAW}]\n    protocol: opaque\n    endpoints:\n      - address: {inbound}\n        identity: {endpoint_id}\nworkloads:\n  - name: demo/web\n  - name: demo/api\n{servers}"
    )
}

/// A proxy with a certificate for `identity` from `ca`, running, not yet waited for.
pub(crate) async fn spawn_node(
    config: Config,
    orig: SocketAddr,
    ca: &Arc<SigningCa>,
    identity: &str,
) -> (Node, outrider_proxy::readiness::Readiness) {
    let registry = prometheus::Registry::new();
    let source = IdentitySource {
        ca: ca.clone(),
        token: TokenSource::Fixed(token_for(identity).into()),
    };
    let proxy = Proxy::bind_with_identity(
        config,
        Arc::new(FixedOrigDst(orig)),
        None,
        registry.clone(),
        Some(source),
    )
    .await
    .unwrap();
    let node = Node {
        registry,
        admin: proxy.admin_addr(),
        inbound: proxy.listener_addrs(Direction::Inbound).first().copied(),
        outbound: proxy.listener_addrs(Direction::Outbound).first().copied(),
        forward: proxy.listener_addrs(Direction::Forward).first().copied(),
        stop: proxy.shutdown_handle(),
    };
    let readiness = proxy.readiness();
    tokio::spawn(proxy.run());
    (node, readiness)
}

/// [`spawn_node`], waiting (bounded) until the proxy is ready.
async fn node(config: Config, orig: SocketAddr, ca: &Arc<SigningCa>, identity: &str) -> Node {
    let (node, readiness) = spawn_node(config, orig, ca, identity).await;
    for _ in 0..500 {
        if readiness.check().is_ok() {
            return node;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("proxy never became ready: {:?}", readiness.check());
}

pub(crate) fn sidecar_config(control: SocketAddr, workload: &str) -> Config {
    let mut config = Config::local(Vec::new());
    config.control = Some(format!("http://{control}"));
    config.workload = Some(workload.into());
    config
}

/// Starts the app, the control plane and both proxies; `servers` is the `demo/api` workload's
/// policy (YAML lines under it), `protocol` the service's.
pub(crate) async fn start(app: SocketAddr, protocol: &str, servers: &str) -> Mesh {
    start_with(app, protocol, servers, Duration::from_secs(3600)).await
}

/// [`start`] with certificates valid for `lifetime`.
pub(crate) async fn start_with(
    app: SocketAddr,
    protocol: &str,
    servers: &str,
    lifetime: Duration,
) -> Mesh {
    start_tweaked(app, protocol, servers, lifetime, |_| {}).await
}

/// [`start_with`], with the server proxy's configuration changed by `tweak`.
pub(crate) async fn start_tweaked(
    app: SocketAddr,
    protocol: &str,
    servers: &str,
    lifetime: Duration,
    tweak: impl FnOnce(&mut Config),
) -> Mesh {
    let empty = outrider_control::mesh::Mesh::parse("workloads:\n  - name: demo/api\n").unwrap();
    let control = outrider_control::ControlPlane::new(empty).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control_addr = l.local_addr().unwrap();
    tokio::spawn(control.clone().serve(l));
    let ca = Arc::new(SigningCa::new(
        TestCa::new("test mesh root").unwrap(),
        lifetime,
    ));
    let mut config = sidecar_config(control_addr, "demo/api");
    config.inbound = Some("127.0.0.1:0".parse().unwrap());
    tweak(&mut config);
    let server = node(config, app, &ca, API).await;
    let inbound = server.inbound.unwrap();
    control
        .apply(&mesh_yaml(inbound, protocol, API, servers))
        .unwrap();
    let mut config = sidecar_config(control_addr, "demo/web");
    config.outbound = Some("127.0.0.1:0".parse().unwrap());
    config.forwards = vec![outrider_proxy::config::ForwardSpec {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: RAW.parse().unwrap(),
    }];
    let client = node(config, VIRTUAL.parse().unwrap(), &ca, WEB).await;
    // The client's view names the endpoint before the first request.
    let mesh = Mesh {
        control,
        control_addr,
        ca,
        app,
        server,
        client,
    };
    mesh.wait_view().await;
    mesh
}

impl Mesh {
    async fn wait_view(&self) {
        for _ in 0..500 {
            let rsp = admin_get(self.client.admin, "/config").await;
            if rsp.contains(&self.server.inbound.unwrap().to_string()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the client proxy never saw the endpoint");
    }

    pub(crate) fn apply(&self, protocol: &str, endpoint_id: &str, servers: &str) {
        let yaml = mesh_yaml(self.server.inbound.unwrap(), protocol, endpoint_id, servers);
        self.control.apply(&yaml).unwrap();
    }
}

/// The `demo/api` workload's policy: `port` allows `who` only (mesh callers only).
pub(crate) fn allow_only(port: u16, who: &str) -> String {
    format!("    servers:\n      - port: {port}\n        allow: [{who}]\n")
}

pub(crate) async fn admin_get(admin: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

pub(crate) async fn start_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(outrider::demo::app::serve(l, "api-0".into()));
    addr
}

pub(crate) async fn body(rsp: http::Response<hyper::body::Incoming>) -> String {
    String::from_utf8_lossy(&rsp.into_body().collect().await.unwrap().to_bytes()).into_owned()
}

#[tokio::test]
async fn http_crosses_the_mesh_in_mutual_tls_over_one_connection_and_the_app_hears_its_version() {
    let app = start_app().await;
    let servers = allow_only(app.port(), WEB);
    let mesh = start(app, "http1", &servers).await;
    let outbound = mesh.client.outbound.unwrap();
    let mut h1 = ClientConn::connect(outbound, false).await.unwrap();
    let mut h2 = ClientConn::connect(outbound, true).await.unwrap();
    for _ in 0..5 {
        let rsp = h1.get("api.demo", "/hello").await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        assert_eq!(rsp.version(), http::Version::HTTP_11);
        let text = body(rsp).await;
        assert!(
            text.contains("\"protocol\":\"HTTP/1.1\""),
            "the app hears HTTP/1.1: {text}"
        );
        let rsp = h2.get("api.demo", "/hello").await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        assert!(body(rsp).await.contains("\"protocol\":\"HTTP/2.0\""));
    }
    // Ten requests in two HTTP versions: one mTLS connection, one full handshake.
    let c = &mesh.client;
    assert_eq!(c.sum("outrider_upstream_connects_total", &[]), 1.0);
    let hs = |n: &Node, d: &str, r: &str| {
        n.sum(
            "outrider_tls_handshakes_total",
            &[("direction", d), ("result", r)],
        )
    };
    assert_eq!(hs(c, "outbound", "full"), 1.0);
    assert_eq!(hs(&mesh.server, "inbound", "full"), 1.0);
    assert_eq!(
        mesh.server.sum(
            "outrider_inbound_mesh_connections_total",
            &[("client_id", WEB)]
        ),
        1.0,
        "the server side knows who called"
    );
    // /identity shows each side's own identity, and nothing secret.
    let id = admin_get(mesh.server.admin, "/identity").await;
    assert!(
        id.contains(API) && id.contains("not_after") && id.contains("next_renewal"),
        "{id}"
    );
    assert!(!id.contains("PRIVATE") && !id.contains("v1."), "{id}");
    assert!(admin_get(mesh.client.admin, "/identity")
        .await
        .contains(WEB));
    assert!(mesh
        .ca
        .anchors
        .lock()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    let _ = (mesh.app, mesh.control_addr);
}

#[tokio::test]
async fn a_caller_the_policy_does_not_allow_gets_403_and_a_policy_change_applies_live() {
    let app = start_app().await;
    let deny_web = allow_only(app.port(), "spiffe://outrider.local/ns/demo/sa/other");
    let mesh = start(app, "http1", &deny_web).await;
    let mut c = ClientConn::connect(mesh.client.outbound.unwrap(), false)
        .await
        .unwrap();
    let rsp = c.get("api.demo", "/").await.unwrap();
    assert_eq!(rsp.status(), StatusCode::FORBIDDEN);
    assert_eq!(rsp.headers()["outrider-error"], "denied");
    assert_eq!(
        mesh.server.sum(
            "outrider_authz_denied_total",
            &[("rule", "identity-not-allowed")]
        ),
        1.0
    );
    // Allow the namespace: the next request on the same connection passes.
    let allow_ns = allow_only(app.port(), "'spiffe://outrider.local/ns/demo/*'");
    mesh.apply("http1", API, &allow_ns);
    let mut status = StatusCode::FORBIDDEN;
    for _ in 0..500 {
        status = c.get("api.demo", "/").await.unwrap().status();
        if status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_plaintext_client_of_a_strict_port_is_refused_before_the_app() {
    let app = start_app().await;
    let strict = allow_only(app.port(), WEB);
    let mesh = start(app, "http1", &strict).await;
    // Straight to the server proxy's inbound listener, without TLS.
    let mut c = ClientConn::connect(mesh.server.inbound.unwrap(), false)
        .await
        .unwrap();
    let rsp = c.get("api.demo", "/").await.unwrap();
    assert_eq!(rsp.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        mesh.server.sum(
            "outrider_authz_denied_total",
            &[("rule", "plaintext-not-allowed")]
        ),
        1.0
    );
    assert_eq!(
        mesh.server.sum("outrider_upstream_connects_total", &[]),
        0.0,
        "nothing reached the app"
    );
}

#[tokio::test]
async fn an_endpoint_that_is_not_the_identity_discovery_names_is_refused() {
    let app = start_app().await;
    let mesh = start(app, "http1", "").await;
    mesh.apply("http1", "spiffe://outrider.local/ns/demo/sa/impostor", "");
    let mut status = StatusCode::OK;
    for _ in 0..500 {
        let mut c = ClientConn::connect(mesh.client.outbound.unwrap(), false)
            .await
            .unwrap();
        let rsp = c.get("api.demo", "/").await.unwrap();
        status = rsp.status();
        if status != StatusCode::OK {
            assert_eq!(rsp.headers()["outrider-error"], "tls-failed");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(
        mesh.client.sum(
            "outrider_tls_handshakes_total",
            &[("direction", "outbound"), ("result", "failed")]
        ) >= 1.0
    );
}

/// An echo server that counts its connections.
pub(crate) async fn start_echo() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn opaque_tcp_rides_its_own_tls_stream_and_a_denied_connection_is_closed() {
    let (echo, accepted) = start_echo().await;
    let mesh = start(echo, "opaque", "").await;
    let mut s = TcpStream::connect(mesh.client.outbound.unwrap())
        .await
        .unwrap();
    s.write_all(b"ping over mtls").await.unwrap();
    let mut buf = [0u8; 14];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping over mtls");
    assert_eq!(
        mesh.server.sum(
            "outrider_inbound_mesh_connections_total",
            &[("client_id", WEB)]
        ),
        1.0
    );
    drop(s);
    // Deny everyone on unlisted ports: the next connection is closed, the app never sees it.
    mesh.apply("opaque", API, "    default_policy: deny\n");
    let refused = || async {
        let mut s = TcpStream::connect(mesh.client.outbound.unwrap())
            .await
            .unwrap();
        let _ = s.write_all(b"x").await;
        let mut one = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut one)).await;
        matches!(read, Ok(Ok(0)) | Ok(Err(_)))
    };
    let mut closed = false;
    for _ in 0..500 {
        if refused().await {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(closed, "a denied connection is closed");
    let before = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(refused().await);
    assert!(
        mesh.server
            .sum("outrider_authz_denied_total", &[("rule", "default-deny")])
            >= 1.0
    );
    let after = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(after, before, "the app saw no denied connection");
}

/// Load until `stop`: HTTP/1.1 and HTTP/2 requests through the client proxy (one pooled mesh
/// connection), and raw HTTP on a new connection each time through the opaque service (one mesh
/// TLS stream, so one handshake, per connection). Counts (successes, failures).
async fn load(
    mesh: &Mesh,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(u64, Vec<String>)>> {
    use std::sync::atomic::Ordering;
    let outbound = mesh.client.outbound.unwrap();
    let forward = mesh.client.forward.unwrap();
    let mut tasks = Vec::new();
    for h2 in [false, true] {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0, Vec::new());
            let mut c = ClientConn::connect(outbound, h2).await.unwrap();
            // Bounded: at most 100k requests.
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match c.get("api.demo", "/").await {
                    Ok(rsp) if rsp.status() == StatusCode::OK => {
                        ok += 1;
                        let _ = rsp.into_body().collect().await;
                    }
                    Ok(rsp) => failed.push(format!(
                        "{:?} {:?}",
                        rsp.status(),
                        rsp.headers().get("outrider-error")
                    )),
                    Err(e) => {
                        failed.push(format!("h2 {h2}: {e:#}"));
                        match ClientConn::connect(outbound, h2).await {
                            Ok(again) => c = again,
                            Err(_) => break,
                        }
                    }
                }
            }
            (ok, failed)
        }));
    }
    let stop = stop.clone();
    tasks.push(tokio::spawn(async move {
        let (mut ok, mut failed) = (0, Vec::new());
        for _ in 0..100_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let rsp = async {
                let mut s = TcpStream::connect(forward).await?;
                s.write_all(b"GET /raw HTTP/1.1\r\nHost: raw\r\nConnection: close\r\n\r\n")
                    .await?;
                let mut out = Vec::new();
                s.read_to_end(&mut out).await?;
                Ok::<_, std::io::Error>(out)
            };
            match tokio::time::timeout(Duration::from_secs(10), rsp).await {
                Ok(Ok(out)) if out.starts_with(b"HTTP/1.1 200") => ok += 1,
                Ok(Ok(out)) => failed.push(format!(
                    "raw: {:?}",
                    String::from_utf8_lossy(&out[..out.len().min(60)])
                )),
                Ok(Err(e)) => failed.push(format!("raw: {e}")),
                Err(_) => failed.push("raw: timed out".into()),
            }
        }
        (ok, failed)
    }));
    tasks
}

async fn finish(tasks: Vec<tokio::task::JoinHandle<(u64, Vec<String>)>>) -> u64 {
    let mut total = 0;
    for t in tasks {
        let (ok, failed) = t.await.unwrap();
        assert!(
            failed.is_empty(),
            "{} failed requests, e.g. {:?}",
            failed.len(),
            &failed[..failed.len().min(3)]
        );
        assert!(ok > 0, "every load task made progress");
        total += ok;
    }
    total
}

fn renewals(node: &Node) -> f64 {
    node.sum("outrider_identity_certify_total", &[("result", "ok")])
}

/// Waits until `node` has renewed `more` more times than `from` (bounded).
async fn renewed(node: &Node, from: f64, more: f64) {
    for _ in 0..2000 {
        if renewals(node) >= from + more {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no renewal: {} after {from}", renewals(node));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_certificates_renew_under_load_without_a_failed_request() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let app = start_app().await;
    let lifetime = Duration::from_secs(2);
    let mesh = start_with(app, "http1", "", lifetime).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&mesh, stop.clone()).await;
    // At least three lifetimes under load, each side renewing (at 65-75% of what is left) at
    // least three times.
    let (c0, s0) = (renewals(&mesh.client), renewals(&mesh.server));
    let started = std::time::Instant::now();
    renewed(&mesh.client, c0, 3.0).await;
    renewed(&mesh.server, s0, 3.0).await;
    if let Some(rest) = (3 * lifetime).checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    stop.store(true, Ordering::Relaxed);
    let total = finish(tasks).await;
    let full = mesh.client.sum(
        "outrider_tls_handshakes_total",
        &[("direction", "outbound"), ("result", "full")],
    );
    let resumed = mesh.client.sum(
        "outrider_tls_handshakes_total",
        &[("direction", "outbound"), ("result", "resumed")],
    );
    assert!(
        full + resumed >= 10.0,
        "new mesh connections throughout: {full} full, {resumed} resumed"
    );
    assert!(total > 50, "{total} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_is_rotated_under_load_without_a_failed_request() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let app = start_app().await;
    let lifetime = Duration::from_secs(2);
    let mesh = start_with(app, "http1", "", lifetime).await;
    let old_root = mesh.ca.anchors.lock().unwrap().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&mesh, stop.clone()).await;
    let step = |mesh: &Mesh| (renewals(&mesh.client), renewals(&mesh.server));
    // 1. The new root joins the bundle; every proxy renews and so learns it.
    let next = TestCa::new("next mesh root").unwrap();
    mesh.ca
        .set_anchors(format!("{old_root}{}", next.root_pem()));
    let (c, s) = step(&mesh);
    renewed(&mesh.client, c, 1.0).await;
    renewed(&mesh.server, s, 1.0).await;
    // 2. The new root issues; every certificate is replaced by one chained to it.
    mesh.ca.switch_to(next);
    let (c, s) = step(&mesh);
    renewed(&mesh.client, c, 1.0).await;
    renewed(&mesh.server, s, 1.0).await;
    // 3. The old root leaves the bundle; every proxy renews again and trusts only the new one.
    let new_only = mesh.ca.anchors.lock().unwrap().replace(&old_root, "");
    mesh.ca.set_anchors(new_only.clone());
    let (c, s) = step(&mesh);
    renewed(&mesh.client, c, 1.0).await;
    renewed(&mesh.server, s, 1.0).await;
    stop.store(true, Ordering::Relaxed);
    finish(tasks).await;
    let id = admin_get(mesh.server.admin, "/identity").await;
    assert!(
        id.contains("next mesh root"),
        "issued by the new root: {id}"
    );
    assert!(id.contains("\"trust_anchors\": 1"), "one root left: {id}");
}

/// A mutual TLS connection to `server` presenting `leaf` (trusting `anchors`, expecting `API`),
/// offering `alpn`. Built by hand (not from an IdentityStore), so a certificate the proxy would
/// never load itself can be presented.
pub(crate) async fn tls_with_leaf(
    server: SocketAddr,
    leaf: outrider_proxy::identity::testing::TestLeaf,
    anchors: &str,
    alpn: outrider_proxy::identity::Alpn,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(anchors.as_bytes()) {
        roots.add(der.unwrap()).unwrap();
    }
    let verifier =
        outrider_proxy::identity::tls::ServerIdVerifier::new(Arc::new(roots), API.parse().unwrap());
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::Pkcs8(leaf.key_der.into());
    let mut config =
        rustls::ClientConfig::builder_with_provider(outrider_proxy::identity::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(chain, key)
            .unwrap();
    config.alpn_protocols = vec![alpn.id().to_vec()];
    let tcp = TcpStream::connect(server).await?;
    let name = rustls::pki_types::ServerName::IpAddress(server.ip().into());
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Connects to `server` presenting `leaf` (trusting `anchors`), expecting `API`, sends a request
/// and reads: `Ok(response bytes)` or the error that ended it.
pub(crate) async fn call_with_leaf(
    server: SocketAddr,
    leaf: outrider_proxy::identity::testing::TestLeaf,
    anchors: &str,
) -> Result<Vec<u8>, String> {
    let exchange = async {
        let alpn = outrider_proxy::identity::Alpn::Http1;
        let mut tls = tls_with_leaf(server, leaf, anchors, alpn).await?;
        tls.write_all(b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
            .await?;
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Ok(out)) if out.is_empty() => Err("closed without an answer".into()),
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[tokio::test]
async fn bad_certificates_stalled_handshakes_and_garbage_are_refused_and_counted() {
    let app = start_app().await;
    let strict = allow_only(app.port(), WEB);
    let mesh = start_tweaked(app, "http1", &strict, Duration::from_secs(3600), |c| {
        c.tls_handshake_timeout = Duration::from_millis(300);
    })
    .await;
    let server = mesh.server.inbound.unwrap();
    let anchors = mesh.ca.anchors.lock().unwrap().clone();
    let failed = || {
        mesh.server.sum(
            "outrider_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "failed")],
        )
    };
    let now = std::time::SystemTime::now();
    let day = Duration::from_secs(86_400);
    // The right identity and CA, properly valid: served (the control for the cases below).
    let good = mesh.ca.leaf_with(&[WEB], now - day, now + day).unwrap();
    let ok = call_with_leaf(server, good, &anchors).await.unwrap();
    assert!(
        ok.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&ok)
    );
    assert_eq!(failed(), 0.0);
    // Expired.
    let expired = mesh.ca.leaf_with(&[WEB], now - 2 * day, now - day).unwrap();
    let e = call_with_leaf(server, expired, &anchors).await.unwrap_err();
    assert!(
        e.to_lowercase().contains("expired") || e.contains("closed"),
        "{e}"
    );
    assert_eq!(failed(), 1.0);
    // From a foreign CA.
    let foreign = TestCa::new("not the mesh").unwrap().leaf(WEB, day).unwrap();
    assert!(call_with_leaf(server, foreign, &anchors).await.is_err());
    assert_eq!(failed(), 2.0);
    // Without a SPIFFE identity.
    let anonymous = mesh.ca.leaf_with(&[], now - day, now + day).unwrap();
    assert!(call_with_leaf(server, anonymous, &anchors).await.is_err());
    assert_eq!(failed(), 3.0);
    // A ClientHello, then nothing: closed after the handshake timeout.
    let hello = {
        let store = outrider_proxy::identity::IdentityStore::new();
        let leaf = mesh.ca.leaf_with(&[WEB], now - day, now + day).unwrap();
        store.set_leaf(
            outrider_proxy::identity::store::Leaf::from_pem(&leaf.chain_pem, leaf.key_der).unwrap(),
        );
        store.set_anchors(&anchors).unwrap();
        let config = store
            .client_config(&API.parse().unwrap(), outrider_proxy::identity::Alpn::H2)
            .unwrap();
        let name = rustls::pki_types::ServerName::IpAddress(server.ip().into());
        let mut conn = rustls::ClientConnection::new(config, name).unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        hello
    };
    let mut stalled = TcpStream::connect(server).await.unwrap();
    stalled.write_all(&hello).await.unwrap();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "a stalled handshake is closed");
    assert_eq!(failed(), 4.0);
    // Garbage that starts like a TLS record: not a mesh connection, so a plaintext caller of a
    // strict port: closed, counted, nothing reaches the app.
    let before = mesh.server.sum("outrider_upstream_connects_total", &[]);
    let mut garbage = TcpStream::connect(server).await.unwrap();
    garbage
        .write_all(b"\x16\x03\x01\x00\x20not a client hello at all, really")
        .await
        .unwrap();
    garbage.shutdown().await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), garbage.read_to_end(&mut sink)).await;
    assert!(sink.is_empty());
    assert!(
        mesh.server.sum(
            "outrider_authz_denied_total",
            &[("rule", "plaintext-not-allowed")]
        ) >= 1.0
    );
    assert_eq!(
        mesh.server.sum("outrider_upstream_connects_total", &[]),
        before
    );
    // And the proxy still serves the mesh.
    let mut c = ClientConn::connect(mesh.client.outbound.unwrap(), false)
        .await
        .unwrap();
    assert_eq!(
        c.get("api.demo", "/").await.unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn websocket_upgrades_and_connect_tunnels_cross_two_meshed_sidecars() {
    let app = start_app().await;
    let servers = allow_only(app.port(), WEB);
    let mesh = start(app, "http1", &servers).await;
    let outbound = mesh.client.outbound.unwrap();
    let mut s = TcpStream::connect(outbound).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let head = crate::support::read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    crate::support::echoes(&mut s, b"\x81\x05hello").await;
    let mut t = TcpStream::connect(outbound).await.unwrap();
    t.write_all(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n")
        .await
        .unwrap();
    let head = crate::support::read_head(&mut t).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    crate::support::echoes(&mut t, b"tunnelled bytes").await;
    // Both crossed in mutual TLS (HTTP/1.1 connections: upgrades are not multiplexed), and the
    // server side knew who called.
    assert!(
        mesh.client.sum(
            "outrider_tls_handshakes_total",
            &[("direction", "outbound"), ("result", "failed")]
        ) == 0.0
    );
    assert!(
        mesh.server.sum(
            "outrider_inbound_mesh_connections_total",
            &[("client_id", WEB)]
        ) >= 2.0
    );
}
