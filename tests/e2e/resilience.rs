//! Outbound resilience end to end, in process: a real control plane, a real proxy (local mode
//! towards a service's virtual address) and real HTTP backends on loopback that the tests tell to
//! answer 503, to be slow, or to hang. Balancing (P2C over peak-EWMA), budgeted retries, per-endpoint
//! breakers and the in-flight bounds are checked by what the backends receive and what the client
//! sees.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use outrider_proxy::config::{Config, ForwardSpec};
use outrider_proxy::metrics::Direction;
use outrider_proxy::transport::orig_dst::SoOriginalDst;
use outrider_proxy::{Proxy, ShutdownHandle};

/// A test backend: counts what it receives and answers as told.
#[derive(Default)]
struct Backend {
    addr: std::sync::OnceLock<SocketAddr>,
    /// Requests received, by method, and bytes of request bodies.
    requests: AtomicU64,
    posts: AtomicU64,
    big: AtomicU64,
    /// Share of requests answered 503, in percent (at random).
    fail_percent: AtomicU32,
    /// Delay before answering.
    delay_ms: AtomicU64,
    /// Hold every request until released (`release` wakes them).
    hang: AtomicBool,
    release: tokio::sync::Notify,
    /// Requests being held now, and the most held at once.
    held: AtomicU64,
    held_max: AtomicU64,
}

impl Backend {
    fn addr(&self) -> SocketAddr {
        *self.addr.get().unwrap()
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    async fn answer(self: Arc<Self>, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if req.method() == Method::POST {
            self.posts.fetch_add(1, Ordering::SeqCst);
        }
        let big = req.uri().path() == "/big";
        if big {
            self.big.fetch_add(1, Ordering::SeqCst);
        }
        let _ = req.into_body().collect().await;
        if self.hang.load(Ordering::SeqCst) {
            let now = self.held.fetch_add(1, Ordering::SeqCst) + 1;
            self.held_max.fetch_max(now, Ordering::SeqCst);
            let released = self.release.notified();
            tokio::pin!(released);
            if self.hang.load(Ordering::SeqCst) {
                released.await;
            }
            self.held.fetch_sub(1, Ordering::SeqCst);
        }
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let fail = big || fastrand::u32(..100) < self.fail_percent.load(Ordering::SeqCst);
        let mut rsp = Response::new(Full::new(Bytes::from_static(if fail {
            b"no"
        } else {
            b"ok"
        })));
        if fail {
            *rsp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        }
        rsp
    }
}

/// Starts a backend speaking HTTP/1.1 and h2c (prior knowledge), at most `streams` concurrent
/// HTTP/2 streams per connection.
async fn backend(streams: u32) -> Arc<Backend> {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = Arc::new(Backend::default());
    b.addr.set(l.local_addr().unwrap()).unwrap();
    let state = b.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(state.answer(req).await) }
                });
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder.http2().max_concurrent_streams(streams);
                let _ = builder.serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    b
}

/// Three backends (200 streams each) answering after the given delays, in milliseconds.
async fn slow_backends(delays_ms: [u64; 3]) -> [Arc<Backend>; 3] {
    let mut out = Vec::new();
    for delay in delays_ms {
        let b = backend(200).await;
        b.delay_ms.store(delay, Ordering::SeqCst);
        out.push(b);
    }
    match out.try_into() {
        Ok(three) => three,
        Err(_) => unreachable!("three delays, three backends"),
    }
}

/// `n` concurrent GETs of `path` on one new HTTP/2 connection to `proxy`: each task gives the
/// status and the `outrider-error` reason.
async fn h2_streams(
    proxy: SocketAddr,
    path: &str,
    n: usize,
) -> Vec<JoinHandle<(StatusCode, Option<String>)>> {
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let target = format!("http://{proxy}{path}");
    (0..n)
        .map(|_| {
            let mut send = send.clone();
            let req = Request::get(target.as_str())
                .version(http::Version::HTTP_2)
                .body(Full::new(Bytes::new()))
                .unwrap();
            tokio::spawn(async move {
                send.ready().await.unwrap();
                let rsp = send.send_request(req).await.unwrap();
                let reason = rsp
                    .headers()
                    .get("outrider-error")
                    .map(|v| v.to_str().unwrap().to_string());
                (rsp.status(), reason)
            })
        })
        .collect()
}

struct Mesh {
    control: Arc<outrider_control::ControlPlane>,
    served: JoinHandle<()>,
    /// The forward listener towards the service (and any others the test added).
    proxy: SocketAddr,
    forwards: Vec<SocketAddr>,
    admin: SocketAddr,
    registry: prometheus::Registry,
    stop: ShutdownHandle,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.stop.trigger("test done");
        self.served.abort();
    }
}

/// The mesh file of one service at 198.18.77.1:80 served by `backends`.
fn mesh_yaml(backends: &[&Arc<Backend>], service_extra: &str) -> String {
    let endpoints: String = backends
        .iter()
        .map(|b| format!("      - address: {}\n", b.addr()))
        .collect();
    format!(
        "services:\n  - name: api\n    namespace: t\n    addresses: [198.18.77.1:80]\n    endpoints:\n{endpoints}{service_extra}workloads:\n  - name: t/client\n"
    )
}

/// A control plane serving `yaml` and a proxy whose forward listener targets the service.
async fn start(yaml: &str, tweak: impl FnOnce(&mut Config)) -> Mesh {
    let mesh = outrider_control::mesh::Mesh::parse(yaml).unwrap();
    let control = outrider_control::ControlPlane::new(mesh).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control_addr = l.local_addr().unwrap();
    let served = tokio::spawn(control.clone().serve(l));
    let mut config = Config::local(vec![ForwardSpec {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: "198.18.77.1:80".parse().unwrap(),
    }]);
    config.control = Some(format!("http://{control_addr}"));
    config.workload = Some("t/client".into());
    config.workers = 2;
    tweak(&mut config);
    let registry = prometheus::Registry::new();
    let proxy = Proxy::bind(config, Arc::new(SoOriginalDst), None, registry.clone())
        .await
        .unwrap();
    let mesh = Mesh {
        control,
        served,
        proxy: proxy.listener_addrs(Direction::Forward)[0],
        forwards: proxy.listener_addrs(Direction::Forward),
        admin: proxy.admin_addr(),
        registry,
        stop: proxy.shutdown_handle(),
    };
    tokio::spawn(proxy.run());
    let ready = || async {
        let c = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let uri = format!("http://{}/ready", mesh.admin);
        matches!(c.get(uri.parse().unwrap()).await, Ok(r) if r.status() == StatusCode::OK)
    };
    for _ in 0..500 {
        if ready().await {
            return mesh;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("proxy never became ready");
}

impl Mesh {
    fn metric(&self, family: &str, labels: &[(&str, &str)]) -> f64 {
        outrider_proxy::metrics::sum(&self.registry, family, labels)
    }

    fn client(&self) -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
        Client::builder(TokioExecutor::new()).build_http()
    }

    /// Makes `GET path` requests to the service, as often as asked.
    fn getter(
        &self,
        path: &str,
    ) -> impl Fn() -> Request<Full<Bytes>> + Clone + Send + Sync + 'static {
        let target = format!("http://{}{path}", self.proxy);
        move || {
            Request::get(target.as_str())
                .body(Full::new(Bytes::new()))
                .unwrap()
        }
    }

    fn request(&self, method: Method, path: &str, body: Bytes) -> Request<Full<Bytes>> {
        Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.proxy))
            .header("host", "api.t")
            .body(Full::new(body))
            .unwrap()
    }
}

/// Sends `n` requests made by `req`, `concurrency` at a time; returns the statuses.
async fn load(
    mesh: &Mesh,
    n: usize,
    concurrency: usize,
    req: impl Fn() -> Request<Full<Bytes>> + Send + Sync + 'static,
) -> Vec<(StatusCode, Option<String>)> {
    let client = mesh.client();
    let req = Arc::new(req);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, req, next) = (client.clone(), req.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, Ordering::SeqCst) < n as u64 {
                let rsp = tokio::time::timeout(Duration::from_secs(10), client.request(req()))
                    .await
                    .expect("a request took over 10 s")
                    .expect("the proxy answers");
                let reason = rsp
                    .headers()
                    .get("outrider-error")
                    .map(|v| v.to_str().unwrap().to_string());
                let status = rsp.status();
                let _ = rsp.into_body().collect().await;
                out.push((status, reason));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

fn failures(statuses: &[(StatusCode, Option<String>)]) -> usize {
    statuses.iter().filter(|(s, _)| !s.is_success()).count()
}

#[tokio::test]
async fn retries_under_a_fully_failing_upstream_stay_within_the_budget() {
    let b = backend(200).await;
    b.fail_percent.store(100, Ordering::SeqCst);
    let routes = "    routes:\n      - name: all\n        match: { path_prefix: / }\n        retry: { attempts: 3, budget: 20%, backoff: 1ms }\n";
    let mesh = start(&mesh_yaml(&[&b], routes), |_| {}).await;
    // A constant offered rate: 50 requests a second for 4 s.
    let client = mesh.client();
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let offered = 200u64;
    let mut synthetic = 0;
    for _ in 0..offered {
        tick.tick().await;
        let rsp = client
            .request(mesh.request(Method::GET, "/", Bytes::new()))
            .await
            .unwrap();
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        if rsp.headers().contains_key("outrider-error") {
            synthetic += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64().ceil();
    let upstream = b.requests() as f64;
    let bound = 1.2 * offered as f64 + 10.0 * (secs + 1.0);
    assert!(upstream > offered as f64, "retries were sent: {upstream}");
    assert!(
        upstream <= bound,
        "the upstream saw {upstream} requests for {offered} offered in {secs} s (bound {bound})"
    );
    assert_eq!(
        synthetic, 0,
        "a spent budget returns the upstream's own answer"
    );
    let budget = mesh.metric(
        "outrider_retries_skipped_total",
        &[("service", "t/api"), ("reason", "budget")],
    );
    assert!(budget > 0.0, "skipped for the budget: {budget}");
    assert_eq!(
        mesh.metric("outrider_retries_total", &[("service", "t/api")]),
        upstream - offered as f64
    );
}

#[tokio::test]
async fn retries_cut_failed_gets_five_fold_and_leave_posts_and_big_bodies_alone() {
    let b = backend(200).await;
    b.fail_percent.store(30, Ordering::SeqCst);
    let routes = "    routes:\n      - name: all\n        match: { path_prefix: / }\n        retry: { attempts: 2, budget: 50%, backoff: 1ms }\n";
    let mesh = start(&mesh_yaml(&[&b], routes), |_| {}).await;
    let (n, c) = (400, 4);
    let gets = load(&mesh, n, c, {
        let target = format!("http://{}/get", mesh.proxy);
        move || {
            Request::get(target.as_str())
                .body(Full::new(Bytes::new()))
                .unwrap()
        }
    })
    .await;
    let failed = failures(&gets);
    // Without retries 30% (120) would fail; with two retries about 2.7% (11).
    assert!(failed * 5 <= n * 30 / 100, "{failed} of {n} GETs failed");
    assert!(
        b.requests() as usize > n + n / 5,
        "the backend saw the retries"
    );
    // POSTs are not retried: the backend sees each once, and about 30% fail.
    let before = b.posts.load(Ordering::SeqCst);
    let posts = load(&mesh, 100, 2, {
        let target = format!("http://{}/post", mesh.proxy);
        move || {
            Request::post(target.as_str())
                .body(Full::new(Bytes::from_static(b"{\"pay\":1}")))
                .unwrap()
        }
    })
    .await;
    assert_eq!(b.posts.load(Ordering::SeqCst) - before, 100);
    assert!(failures(&posts) >= 10, "{} POSTs failed", failures(&posts));
    assert!(
        mesh.metric(
            "outrider_retries_skipped_total",
            &[("service", "t/api"), ("reason", "non-idempotent")]
        ) >= 10.0
    );
    // A 1 MiB body is sent once, even to an idempotent method that fails.
    let client = mesh.client();
    let big = Bytes::from(vec![b'x'; 1 << 20]);
    let rsp = client
        .request(mesh.request(Method::PUT, "/big", big))
        .await
        .unwrap();
    assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(b.big.load(Ordering::SeqCst), 1);
    assert_eq!(
        mesh.metric(
            "outrider_retries_skipped_total",
            &[("service", "t/api"), ("reason", "body-too-large")]
        ),
        1.0
    );
}

/// Requests each backend received during `f`.
async fn shares<F: std::future::Future>(backends: &[&Arc<Backend>], f: F) -> Vec<f64> {
    let before: Vec<u64> = backends.iter().map(|b| b.requests()).collect();
    f.await;
    let got: Vec<u64> = backends
        .iter()
        .zip(before)
        .map(|(b, n)| b.requests() - n)
        .collect();
    let total: u64 = got.iter().sum();
    got.iter().map(|n| *n as f64 / total as f64).collect()
}

#[tokio::test]
async fn load_moves_away_from_a_slow_endpoint_and_spreads_over_equal_ones() {
    let [a, b, c] = slow_backends([5, 5, 50]).await;
    let mesh = start(&mesh_yaml(&[&a, &b, &c], ""), |_| {}).await;
    let get = mesh.getter("/");
    let s = shares(&[&a, &b, &c], load(&mesh, 600, 12, get)).await;
    assert!(
        s[2] < 0.20,
        "the 10x slower endpoint got {:.1}%",
        s[2] * 100.0
    );
    // Three equal endpoints (a fresh service, so no history): about a third each.
    drop(mesh);
    let [d, e, f] = slow_backends([5, 5, 5]).await;
    let mesh = start(&mesh_yaml(&[&d, &e, &f], ""), |_| {}).await;
    let get = mesh.getter("/");
    let s = shares(&[&d, &e, &f], load(&mesh, 900, 12, get)).await;
    for share in &s {
        assert!((0.28..=0.38).contains(share), "equal endpoints: {s:?}");
    }
}

#[tokio::test]
async fn a_failing_endpoint_is_cut_off_by_its_breaker_probed_and_closed_again() {
    let (good, bad) = (backend(200).await, backend(200).await);
    bad.fail_percent.store(100, Ordering::SeqCst);
    let extra = "    breaker: { consecutive_failures: 3, open_for: 300ms }\n";
    let mesh = start(&mesh_yaml(&[&good, &bad], extra), |_| {}).await;
    let bad_label = bad.addr().to_string();
    let labels = |to: &'static str| [("endpoint", bad_label.clone()), ("to", to.to_string())];
    let transitions = |to: &'static str| {
        let l = labels(to);
        mesh.metric(
            "outrider_breaker_transitions_total",
            &[(l[0].0, l[0].1.as_str()), (l[1].0, l[1].1.as_str())],
        )
    };
    // Until it opens the bad endpoint gets its share; then only probes.
    let get = mesh.getter("/");
    let mut sent = 0;
    while transitions("open") < 1.0 {
        load(&mesh, 10, 1, get.clone()).await;
        sent += 10;
        assert!(sent < 200, "the breaker never opened");
    }
    let at_open = bad.requests();
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for _ in 0..150 {
        tick.tick().await;
        load(&mesh, 1, 1, get.clone()).await;
    }
    let elapsed = started.elapsed();
    let probes = bad.requests() - at_open;
    // Open 300 ms, then 600, 1200 (each up to a quarter longer): at most one probe per opening.
    let most = 1 + (elapsed.as_millis() / 300) as u64;
    assert!(
        probes <= most.min(4),
        "{probes} requests reached the open endpoint in {elapsed:?}"
    );
    assert!(transitions("half-open") >= 1.0, "it was probed");
    assert_eq!(
        mesh.metric(
            "outrider_breaker_state",
            &[("endpoint", bad_label.as_str())]
        ),
        1.0,
        "open"
    );
    // It recovers: the next probe closes the breaker and it gets traffic again.
    bad.fail_percent.store(0, Ordering::SeqCst);
    let mut waited = 0;
    while transitions("closed") < 1.0 {
        load(&mesh, 5, 1, get.clone()).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += 1;
        assert!(waited < 500, "the breaker never closed");
    }
    assert_eq!(
        mesh.metric(
            "outrider_breaker_state",
            &[("endpoint", bad_label.as_str())]
        ),
        0.0
    );
    let before = bad.requests();
    load(&mesh, 100, 4, get.clone()).await;
    assert!(bad.requests() - before >= 10, "traffic returned to it");
    // Every endpoint down: answered at once with the reason, no backend reached.
    good.fail_percent.store(100, Ordering::SeqCst);
    bad.fail_percent.store(100, Ordering::SeqCst);
    let mut open = false;
    for _ in 0..100 {
        let r = load(&mesh, 1, 1, get.clone()).await;
        if r[0].1.as_deref() == Some("circuit-open") {
            open = true;
            break;
        }
    }
    assert!(open, "never circuit-open");
    let reached = good.requests() + bad.requests();
    let started = tokio::time::Instant::now();
    let r = load(&mesh, 1, 1, get.clone()).await;
    let took = started.elapsed();
    assert_eq!(
        r[0],
        (StatusCode::SERVICE_UNAVAILABLE, Some("circuit-open".into()))
    );
    assert_eq!(
        good.requests() + bad.requests(),
        reached,
        "nothing reached a backend"
    );
    assert!(took < Duration::from_secs(1), "answered in {took:?}");
    assert!(
        mesh.metric(
            "outrider_requests_shed_total",
            &[("service", "t/api"), ("reason", "circuit-open")]
        ) >= 1.0
    );
}

#[tokio::test]
async fn the_streams_of_one_http2_connection_spread_over_every_endpoint() {
    let backends = slow_backends([20, 20, 20]).await;
    let refs: Vec<&Arc<Backend>> = backends.iter().collect();
    let mesh = start(&mesh_yaml(&refs, "    protocol: http2\n"), |_| {}).await;
    let streams = h2_streams(mesh.proxy, "/grpc-like", 100).await;
    for s in streams {
        assert_eq!(s.await.unwrap(), (StatusCode::OK, None));
    }
    for b in &backends {
        assert!(
            b.requests() >= 10,
            "each endpoint served some: {}",
            b.requests()
        );
    }
}

#[tokio::test]
async fn an_http2_endpoint_at_its_bound_sheds_at_once_and_the_proxy_stays_ready() {
    // The backend allows 200 streams and holds every request; the proxy may keep 1,000 in
    // flight to it (--max-in-flight-per-endpoint's default); 5,000 arrive at once, over 25
    // HTTP/2 connections of 200 streams each.
    let slow = backend(200).await;
    slow.hang.store(true, Ordering::SeqCst);
    let other = backend(200).await;
    let yaml = mesh_yaml(&[&slow], "    protocol: http2\n").replace(
        "workloads:",
        &format!(
            "  - name: other\n    namespace: t\n    addresses: [198.18.77.2:80]\n    endpoints:\n      - address: {}\nworkloads:",
            other.addr()
        ),
    );
    let mesh = start(&yaml, |c| {
        c.forwards.push(ForwardSpec {
            listen: "127.0.0.1:0".parse().unwrap(),
            upstream: "198.18.77.2:80".parse().unwrap(),
        })
    })
    .await;
    let shed_now = || {
        mesh.metric(
            "outrider_requests_shed_total",
            &[("service", "t/api"), ("reason", "overloaded")],
        )
    };
    let mut tasks = Vec::new();
    for _ in 0..25 {
        tasks.extend(h2_streams(mesh.proxy, "/", 200).await);
    }
    // The excess is answered while the first 1,000 are still held at the endpoint.
    let mut waited = 0;
    while shed_now() < 4_000.0 || slow.held.load(Ordering::SeqCst) < 200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += 1;
        assert!(
            waited < 1_500,
            "shed {} held {}",
            shed_now(),
            slow.held.load(Ordering::SeqCst)
        );
    }
    assert_eq!(shed_now(), 4_000.0, "all but the bound shed, counted");
    assert_eq!(
        slow.held_max.load(Ordering::SeqCst),
        200,
        "the peer's stream limit"
    );
    // Still ready, and another destination is served at once.
    let c = mesh.client();
    let ready = c
        .get(format!("http://{}/ready", mesh.admin).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let rsp = c
        .get(format!("http://{}/", mesh.forwards[1]).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    // Released, the held requests complete.
    slow.hang.store(false, Ordering::SeqCst);
    slow.release.notify_waiters();
    let (mut ok, mut overloaded) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            (StatusCode::OK, None) => ok += 1,
            (StatusCode::SERVICE_UNAVAILABLE, Some(r)) if r == "overloaded" => overloaded += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!((ok, overloaded), (1_000, 4_000));
}

#[tokio::test]
async fn endpoints_added_and_removed_under_load_fail_no_request() {
    let (a, b, c) = (backend(200).await, backend(200).await, backend(200).await);
    let mesh = start(&mesh_yaml(&[&a, &b], ""), |_| {}).await;
    let get = mesh.getter("/");
    let running = {
        let get = get.clone();
        tokio::spawn(async move {
            let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
            let mut statuses = Vec::new();
            for _ in 0..600 {
                let rsp = client.request(get()).await.unwrap();
                statuses.push(rsp.status());
                let _ = rsp.into_body().collect().await;
            }
            statuses
        })
    };
    // Add c, then remove a, then b, while the load runs; each change is seen in the traffic.
    let grows = |b: &Arc<Backend>| {
        let (b, from) = (b.clone(), b.requests());
        async move {
            for _ in 0..1_000 {
                if b.requests() >= from + 20 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            panic!("{} got no traffic", b.addr());
        }
    };
    grows(&a).await;
    mesh.control.apply(&mesh_yaml(&[&a, &b, &c], "")).unwrap();
    grows(&c).await;
    mesh.control.apply(&mesh_yaml(&[&b, &c], "")).unwrap();
    grows(&b).await;
    mesh.control.apply(&mesh_yaml(&[&c], "")).unwrap();
    let statuses = running.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    let a_final = a.requests();
    let c_final = c.requests();
    assert!(c_final >= 20 && a_final >= 20);
}

#[tokio::test]
async fn a_retry_goes_to_another_endpoint_than_the_one_that_failed() {
    // One endpoint answers every request with a fast 503 (so latency alone would favour it);
    // with one retry allowed, every GET still succeeds: the retry avoids the failed endpoint.
    let (good, bad) = (backend(200).await, backend(200).await);
    bad.fail_percent.store(100, Ordering::SeqCst);
    let routes = "    routes:\n      - name: all\n        match: { path_prefix: / }\n        retry: { attempts: 1, budget: 100%, backoff: 1ms }\n";
    let mesh = start(&mesh_yaml(&[&good, &bad], routes), |_| {}).await;
    let get = mesh.getter("/");
    let statuses = load(&mesh, 200, 2, get).await;
    assert_eq!(failures(&statuses), 0, "{statuses:?}");
    assert!(bad.requests() > 0, "the failing endpoint was tried");
}

#[tokio::test]
async fn a_thousand_endpoints_cost_no_connection_before_their_first_request() {
    // One backend on every loopback address (0.0.0.0), named by 1,000 endpoints at
    // 127.0.x.y: the first request opens one connection, not 1,000.
    let l = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let endpoints: String = (0..1_000u32)
        .map(|i| {
            format!(
                "      - address: 127.0.{}.{}:{port}\n",
                1 + i / 250,
                1 + i % 250
            )
        })
        .collect();
    let yaml = format!(
        "services:\n  - name: api\n    namespace: t\n    addresses: [198.18.77.1:80]\n    endpoints:\n{endpoints}workloads:\n  - name: t/client\n"
    );
    let mesh = start(&yaml, |_| {}).await;
    let rsp = mesh
        .client()
        .request(mesh.request(Method::GET, "/", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(mesh.metric("outrider_upstream_connects_total", &[]), 1.0);
    assert_eq!(
        mesh.metric(
            "outrider_balancer_endpoints",
            &[("service", "t/api"), ("state", "ready")]
        ),
        1_000.0
    );
}
