//! In-process tests of the whole proxy: real sockets on loopback, real hyper clients, and an
//! injected original destination (so no root and no iptables are needed).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use outrider::demo::ClientConn;
use outrider_proxy::config::{Config, ForwardSpec};
use outrider_proxy::metrics::Direction;
use outrider_proxy::test_util::FixedOrigDst;
use outrider_proxy::transport::orig_dst::{OrigDst, SoOriginalDst};
use outrider_proxy::{Proxy, ShutdownHandle};

const LOOPBACK_ANY: &str = "127.0.0.1:0";

async fn start_app() -> SocketAddr {
    let l = TcpListener::bind(LOOPBACK_ANY).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(outrider::demo::app::serve(l, "test-app".into()));
    addr
}

/// A TCP server; with `banner` it speaks first. Then it echoes until the client closes its side,
/// and closes its own.
async fn start_echo(banner: Option<&'static [u8]>) -> SocketAddr {
    let l = TcpListener::bind(LOOPBACK_ANY).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                if let Some(b) = banner {
                    s.write_all(b).await.unwrap();
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A loopback port with nothing listening.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind(LOOPBACK_ANY).await.unwrap();
    l.local_addr().unwrap()
}

struct Running {
    admin: SocketAddr,
    forward: Vec<SocketAddr>,
    inbound: Option<SocketAddr>,
    outbound: Option<SocketAddr>,
    registry: prometheus::Registry,
    stop: ShutdownHandle,
    task: JoinHandle<anyhow::Result<()>>,
}

async fn start(config: Config, orig_dst: Arc<dyn OrigDst>) -> Running {
    let registry = prometheus::Registry::new();
    let proxy = Proxy::bind(config, orig_dst, None, registry.clone())
        .await
        .unwrap();
    let running = Running {
        admin: proxy.admin_addr(),
        forward: proxy.listener_addrs(Direction::Forward),
        inbound: proxy.listener_addrs(Direction::Inbound).first().copied(),
        outbound: proxy.listener_addrs(Direction::Outbound).first().copied(),
        registry,
        stop: proxy.shutdown_handle(),
        task: tokio::spawn(proxy.run()),
    };
    wait_ready(running.admin).await;
    running
}

async fn wait_ready(admin: SocketAddr) {
    for _ in 0..100 {
        if let Ok(rsp) = raw(admin, b"GET /ready HTTP/1.1\r\nHost: a\r\n\r\n").await {
            if rsp.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("proxy never became ready");
}

async fn start_forward(upstream: SocketAddr, tweak: impl FnOnce(&mut Config)) -> Running {
    let mut config = Config::local(vec![ForwardSpec {
        listen: LOOPBACK_ANY.parse().unwrap(),
        upstream,
    }]);
    tweak(&mut config);
    start(config, Arc::new(SoOriginalDst)).await
}

/// Writes `req`, half-closes, and reads everything the peer sends (bounded to 5 s).
async fn raw(addr: SocketAddr, req: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(req).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no EOF in 5 s"))??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// EOF or a reset (the proxy closed with our bytes unread), and no bytes.
fn closed_without_answer(rsp: std::io::Result<String>) -> bool {
    match rsp {
        Ok(s) => s.is_empty(),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// What holds the only slot of a one-connection limit.
enum Holder {
    /// A keep-alive HTTP/1.1 connection.
    Http(ClientConn),
    /// A stream upgraded to the demo app's byte echo.
    Upgraded(TcpStream),
}

impl Holder {
    /// One exchange through the proxy on the held connection.
    async fn round_trip(&mut self) {
        match self {
            Holder::Http(c) => {
                let rsp = c.get("x", "/").await.unwrap();
                assert_eq!(rsp.status(), StatusCode::OK);
                rsp.into_body().collect().await.unwrap();
            }
            Holder::Upgraded(s) => {
                s.write_all(b"ping").await.unwrap();
                let mut back = [0u8; 4];
                tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(&back, b"ping");
            }
        }
    }
}

/// With a one-connection limit held by `holder` on `p`'s forward listener: the listener stops
/// accepting (counted), a new connection waits in the kernel's backlog without an answer while
/// the proxy goes on serving `holder`, and is served once `holder` is dropped.
async fn served_only_after_release(p: &Running, mut holder: Holder, what: &str) {
    let accepted = |p: &Running| count(p, "outrider_tcp_open_total", "direction", "forward");
    assert_eq!(accepted(p), 1, "{what} holds the only slot");
    // The event: the listener found no free slot and stopped accepting.
    wait_count(
        p,
        "outrider_connection_limit_reached_total",
        "direction",
        "forward",
        1,
    )
    .await;
    let mut next = ClientConn::connect(p.forward[0], false).await.unwrap();
    let waiting = tokio::spawn(async move { next.get("x", "/").await.map(|r| r.status()) });
    // The waiting connection is in the backlog before these exchanges start, and everything runs
    // on this test's one thread: a listener that accepted past its limit would have taken it by
    // the time the proxy has served them.
    for _ in 0..3 {
        holder.round_trip().await;
    }
    assert_eq!(
        accepted(p),
        1,
        "no connection accepted while {what} holds the only slot"
    );
    assert!(
        !waiting.is_finished(),
        "not served while {what} holds the only slot"
    );
    drop(holder);
    let status = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once the slot is free")
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(accepted(p), 2);
}

fn count(r: &Running, family: &str, label: &str, value: &str) -> u64 {
    outrider_proxy::metrics::sum(&r.registry, family, &[(label, value)]) as u64
}

/// How long an in-process wait for an event may take before the test fails.
const EVENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Polls `check` until it holds, failing the test after [`EVENT_TIMEOUT`]. Polling in-process
/// state (the registry, the admin API) with a deadline waits for an event; no sleep stands in for
/// one.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {EVENT_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until `family{label="value"}` is at least `at_least`; returns its value.
async fn wait_count(r: &Running, family: &str, label: &str, value: &str, at_least: u64) -> u64 {
    eventually(
        &format!("{family}{{{label}=\"{value}\"}} >= {at_least}"),
        || async { count(r, family, label, value) >= at_least },
    )
    .await;
    count(r, family, label, value)
}

/// Waits until the proxy says it is draining (`/ready` 503): the drain has started.
async fn wait_draining(admin: SocketAddr) {
    eventually("/ready turns 503 on drain", || async {
        raw(admin, b"GET /ready HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .is_ok_and(|r| r.starts_with("HTTP/1.1 503"))
    })
    .await;
}

/// A backend (HTTP/1.1 and h2c) that tells the test when a `/hold` request arrives and answers
/// it only once the test releases it; any other request is answered at once with 200 `ok`.
struct Gate {
    arrived: tokio::sync::mpsc::UnboundedReceiver<()>,
    release: tokio::sync::watch::Sender<bool>,
}

impl Gate {
    /// A new gate and the two ends its backend keeps.
    fn new() -> (
        Gate,
        tokio::sync::mpsc::UnboundedSender<()>,
        tokio::sync::watch::Receiver<bool>,
    ) {
        let (arrived_tx, arrived) = tokio::sync::mpsc::unbounded_channel();
        let (release, release_rx) = tokio::sync::watch::channel(false);
        (Gate { arrived, release }, arrived_tx, release_rx)
    }

    /// Waits until a held request has arrived at the backend (so it is in flight through the
    /// proxy).
    async fn arrived(&mut self) {
        tokio::time::timeout(EVENT_TIMEOUT, self.arrived.recv())
            .await
            .expect("the held request reached the backend")
            .unwrap();
    }

    /// Lets every held request, present and future, be answered.
    fn release(&self) {
        self.release.send_replace(true);
    }
}

/// The answer of a [`Gate`] backend.
fn ok_response() -> http::Response<http_body_util::Full<bytes::Bytes>> {
    http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
}

async fn start_gate() -> (SocketAddr, Gate) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let l = TcpListener::bind(LOOPBACK_ANY).await.unwrap();
    let addr = l.local_addr().unwrap();
    let (gate, arrived, release) = Gate::new();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (arrived, release) = (arrived.clone(), release.clone());
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let hold = req.uri().path() == "/hold";
                    if hold {
                        let _ = arrived.send(());
                    }
                    let mut release = release.clone();
                    async move {
                        if hold {
                            let _ = release.wait_for(|open| *open).await;
                        }
                        Ok::<_, std::convert::Infallible>(ok_response())
                    }
                });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, gate)
}

#[tokio::test]
async fn http1_is_forwarded_and_counted() {
    let app = start_app().await;
    let p = start_forward(app, |_| {}).await;
    let mut c = ClientConn::connect(p.forward[0], false).await.unwrap();
    for _ in 0..3 {
        let rsp = c.get("payments.test", "/pay").await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&body).contains("\"protocol\":\"HTTP/1.1\""),
            "{body:?}"
        );
    }
    assert_eq!(count(&p, "outrider_requests_total", "protocol", "http1"), 3);
    assert_eq!(
        count(&p, "outrider_responses_total", "status_class", "2xx"),
        3
    );
    assert_eq!(
        count(&p, "outrider_detect_total", "outcome", "http1"),
        1,
        "one connection, detected once"
    );
    assert_eq!(
        count(&p, "outrider_tcp_open_total", "direction", "forward"),
        1
    );
}

#[tokio::test]
async fn http2_keeps_authority_and_trailers() {
    let app = start_app().await;
    let p = start_forward(app, |_| {}).await;
    let mut c = ClientConn::connect(p.forward[0], true).await.unwrap();
    let rsp = c.get("payments.test", "/trailers").await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(rsp.version(), http::Version::HTTP_2);
    let collected = rsp.into_body().collect().await.unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers survive the proxy");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    assert!(String::from_utf8_lossy(&collected.to_bytes()).contains("HTTP/2.0"));
    assert_eq!(count(&p, "outrider_requests_total", "protocol", "http2"), 1);
    assert_eq!(count(&p, "outrider_detect_total", "outcome", "http2"), 1);
}

#[tokio::test]
async fn request_body_is_streamed_through() {
    let app = start_app().await;
    let p = start_forward(app, |_| {}).await;
    let rsp = raw(p.forward[0], b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello proxy")
        .await
        .unwrap();
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    assert!(rsp.ends_with("hello proxy"), "{rsp}");
}

#[tokio::test]
async fn oversized_header_gets_431() {
    let app = start_app().await;
    let p = start_forward(app, |_| {}).await;
    let mut req = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 70 * 1024));
    req.extend(b"\r\n\r\n");
    let rsp = raw(p.forward[0], &req).await.unwrap();
    assert!(rsp.starts_with("HTTP/1.1 431"), "{rsp}");
    assert_eq!(
        count(&p, "outrider_responses_total", "status_class", "4xx"),
        1,
        "hyper's own 431 is counted"
    );
    assert_eq!(
        count(&p, "outrider_errors_total", "reason", "bad-request"),
        1
    );
}

#[tokio::test]
async fn garbage_is_forwarded_as_opaque_bytes() {
    let echo = start_echo(None).await;
    let p = start_forward(echo, |_| {}).await;
    let garbage: Vec<u8> = (0..=255u8).rev().cycle().take(3000).collect();
    let mut s = TcpStream::connect(p.forward[0]).await.unwrap();
    s.write_all(&garbage).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, garbage);
    assert_eq!(count(&p, "outrider_detect_total", "outcome", "opaque"), 1);
    assert!(
        count(
            &p,
            "outrider_tcp_received_bytes_total",
            "direction",
            "forward"
        ) >= 3000
    );
}

#[tokio::test]
async fn half_closed_client_gets_its_answer() {
    let echo = start_echo(None).await;
    let p = start_forward(echo, |_| {}).await;
    let rsp = raw(p.forward[0], b"GET /par").await.unwrap();
    assert_eq!(rsp, "GET /par");
}

#[tokio::test]
async fn silent_client_times_out_into_opaque_and_server_speaks_first() {
    let banner = start_echo(Some(b"220 payments-smtp ready\r\n")).await;
    let p = start_forward(banner, |c| c.detect_timeout = Duration::from_millis(200)).await;
    let mut s = TcpStream::connect(p.forward[0]).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"220 payments-smtp ready\r\n");
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "detection waited"
    );
    assert_eq!(count(&p, "outrider_detect_total", "outcome", "timeout"), 1);
}

#[tokio::test]
async fn opaque_ports_skip_detection() {
    let banner = start_echo(Some(b"+OK\r\n")).await;
    let p = start_forward(banner, |c| {
        c.detect_timeout = Duration::from_secs(30);
        c.opaque_ports = vec![banner.port()];
    })
    .await;
    let mut s = TcpStream::connect(p.forward[0]).await.unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("no detection delay")
        .unwrap();
    assert_eq!(&buf[..n], b"+OK\r\n");
    assert_eq!(count(&p, "outrider_detect_total", "outcome", "skipped"), 1);
}

#[tokio::test]
async fn unreachable_upstream_is_a_502_with_a_reason() {
    let p = start_forward(closed_port().await, |_| {}).await;
    let mut c = ClientConn::connect(p.forward[0], false).await.unwrap();
    let rsp = c.get("x", "/").await.unwrap();
    assert_eq!(rsp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        rsp.headers().get("outrider-error").unwrap(),
        "connect-failed"
    );
    assert_eq!(
        count(&p, "outrider_errors_total", "reason", "connect-failed"),
        1
    );
    assert_eq!(
        count(&p, "outrider_responses_total", "status_class", "5xx"),
        1
    );
}

#[tokio::test]
async fn inbound_goes_to_the_app_on_loopback_at_the_original_port() {
    let app = start_app().await;
    let mut config = Config::local(vec![]);
    config.inbound = Some(LOOPBACK_ANY.parse().unwrap());
    config.inbound_target = outrider_proxy::config::InboundTarget::Loopback;
    // The pod's address with the app's port, as iptables would have left it.
    let orig = SocketAddr::from(([198, 18, 0, 9], app.port()));
    let p = start(config, Arc::new(FixedOrigDst(orig))).await;
    let mut c = ClientConn::connect(p.inbound.unwrap(), false)
        .await
        .unwrap();
    let rsp = c.get("payments", "/").await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(
        count(&p, "outrider_requests_total", "direction", "inbound"),
        1
    );
}

#[tokio::test]
async fn targets_that_are_the_proxy_itself_are_refused() {
    let mut config = Config::local(vec![]);
    config.inbound = Some(LOOPBACK_ANY.parse().unwrap());
    let own = SocketAddr::from(([198, 18, 0, 9], outrider_iptables_init::ports::ADMIN));
    let p = start(config, Arc::new(FixedOrigDst(own))).await;
    for _ in 0..3 {
        let rsp = raw(p.inbound.unwrap(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(closed_without_answer(rsp), "closed without an answer");
    }
    assert_eq!(
        count(&p, "outrider_loop_refused_total", "direction", "inbound"),
        3
    );

    let mut config = Config::local(vec![]);
    config.outbound = Some(LOOPBACK_ANY.parse().unwrap());
    let own = SocketAddr::from(([127, 0, 0, 1], outrider_iptables_init::ports::OUTBOUND));
    let p = start(config, Arc::new(FixedOrigDst(own))).await;
    assert!(closed_without_answer(
        raw(p.outbound.unwrap(), b"GET / HTTP/1.1\r\n\r\n").await
    ));
    assert_eq!(
        count(&p, "outrider_loop_refused_total", "direction", "outbound"),
        1
    );
}

#[tokio::test]
async fn upgrade_becomes_a_byte_stream() {
    let app = start_app().await;
    let p = start_forward(app, |_| {}).await;
    let mut s = TcpStream::connect(p.forward[0]).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"ping"[..], b"\x81\x05hello"] {
        crate::support::echoes(&mut s, msg).await;
    }
}

#[tokio::test]
async fn connections_beyond_the_limit_wait() {
    let app = start_app().await;
    let p = start_forward(app, |c| c.max_connections = 1).await;
    let mut first = Holder::Http(ClientConn::connect(p.forward[0], false).await.unwrap());
    first.round_trip().await;
    served_only_after_release(&p, first, "the first connection").await;
}

#[tokio::test]
async fn slow_headers_and_idle_connections_are_closed() {
    let app = start_app().await;
    // Each half runs with one timeout short (300 ms) and the other far beyond the 5 s the test
    // waits (60 s), so only the short one can close its connection. Lower bounds on elapsed time
    // show it was not closed at once for another reason.
    let short = Duration::from_millis(300);
    let long = Duration::from_secs(60);

    // A client that starts a request and never finishes its headers: the header-read timeout.
    let p = start_forward(app, |c| {
        c.header_read_timeout = short;
        c.http_idle_timeout = long;
    })
    .await;
    let mut slow = TcpStream::connect(p.forward[0]).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf))
        .await
        .expect("closed by the header-read timeout")
        .unwrap();
    assert!(started.elapsed() >= short - Duration::from_millis(50));
    let rsp = String::from_utf8_lossy(&buf);
    assert!(
        rsp.starts_with("HTTP/1.1 408") && rsp.contains("outrider-error: header-timeout"),
        "{rsp:?}"
    );
    wait_count(&p, "outrider_tcp_close_total", "direction", "forward", 1).await;
    assert_eq!(
        count(&p, "outrider_requests_total", "direction", "forward"),
        0,
        "the unfinished request was not forwarded"
    );
    assert_eq!(single(&p, "outrider_upstream_connects_total"), 0.0);

    // A keep-alive connection left idle after one request: the idle timeout.
    let p = start_forward(app, |c| {
        c.header_read_timeout = long;
        c.http_idle_timeout = short;
    })
    .await;
    let mut idle = TcpStream::connect(p.forward[0]).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut idle).await;
    let answered = std::time::Instant::now();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "kept alive: {head}");
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut body))
        .await
        .expect("closed by the idle timeout")
        .unwrap();
    // The body of the one response, and no 408: an idle connection had no request started.
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("\"path\":\"/\"") && !body.contains("408"),
        "{body}"
    );
    assert!(answered.elapsed() >= short - Duration::from_millis(50));
    wait_count(&p, "outrider_tcp_close_total", "direction", "forward", 1).await;
    assert_eq!(
        count(&p, "outrider_errors_total", "reason", "header-timeout"),
        0
    );
}

#[tokio::test]
async fn drain_finishes_in_flight_and_keeps_outbound_for_the_window() {
    let (backend, mut gate) = start_gate().await;
    let mut config = Config::local(vec![ForwardSpec {
        listen: LOOPBACK_ANY.parse().unwrap(),
        upstream: backend,
    }]);
    config.outbound = Some(LOOPBACK_ANY.parse().unwrap());
    // Room for the checks below on a loaded machine; the drain then waits it out.
    config.drain_window = Duration::from_secs(3);
    let p = start(config, Arc::new(FixedOrigDst(backend))).await;

    // A request in flight through the forward listener (held at the backend) when the drain
    // starts.
    let mut inflight = ClientConn::connect(p.forward[0], false).await.unwrap();
    let held = tokio::spawn(async move {
        let rsp = inflight.get("x", "/hold").await.unwrap();
        (rsp.status(), rsp.headers().get("connection").cloned())
    });
    gate.arrived().await;
    let mut outbound = ClientConn::connect(p.outbound.unwrap(), false)
        .await
        .unwrap();
    // An idle keep-alive client of the forward listener.
    let mut idle = ClientConn::connect(p.forward[0], false).await.unwrap();
    assert_eq!(idle.get("x", "/").await.unwrap().status(), StatusCode::OK);
    p.stop.trigger("test");

    // Not ready any more; inbound-side listeners keep accepting for the window, and their
    // answers say `Connection: close`: the idle keep-alive client gets an answer, not an EOF.
    wait_draining(p.admin).await;
    let rsp = idle.get("x", "/").await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(rsp.headers()["connection"], "close");
    let mut late = ClientConn::connect(p.forward[0], false).await.unwrap();
    let rsp = late.get("x", "/").await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(rsp.headers()["connection"], "close");
    // Outbound keeps serving during the window, on old and new connections.
    assert_eq!(
        outbound.get("x", "/").await.unwrap().status(),
        StatusCode::OK
    );
    let mut fresh = ClientConn::connect(p.outbound.unwrap(), false)
        .await
        .unwrap();
    assert_eq!(fresh.get("x", "/").await.unwrap().status(), StatusCode::OK);
    drop((outbound, fresh));

    // The drain waits for the in-flight request, which completes once the backend answers.
    assert!(!held.is_finished(), "held until released");
    gate.release();
    let (status, connection) = tokio::time::timeout(EVENT_TIMEOUT, held)
        .await
        .expect("the in-flight request completed")
        .unwrap();
    assert_eq!(status, StatusCode::OK, "the in-flight request completed");
    assert_eq!(
        connection.unwrap(),
        "close",
        "HTTP/1 clients are told to close"
    );
    // After the window, the listeners close.
    let forward = p.forward[0];
    eventually("the forward listener closes", || async move {
        TcpStream::connect(forward).await.is_err()
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), p.task)
        .await
        .expect("drained in time")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn admin_endpoints() {
    let app = start_app().await;
    let p = start_forward(app, |_| {}).await;
    let live = raw(p.admin, b"GET /live HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");
    let metrics = raw(p.admin, b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    for family in [
        "outrider_requests_total",
        "outrider_tcp_open_connections",
        "outrider_request_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(family), "{family} missing");
    }
    let config = raw(p.admin, b"GET /config HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let json = config.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["mode"], "local");
    assert_eq!(v["forwards"][0], format!("127.0.0.1:0={app}"));
    let nope = raw(p.admin, b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert!(nope.starts_with("HTTP/1.1 404"));
    let wrong = raw(p.admin, b"DELETE /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert!(wrong.starts_with("HTTP/1.1 405"));
    let bye = raw(
        p.admin,
        b"POST /shutdown HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(bye.starts_with("HTTP/1.1 200"), "{bye}");
    tokio::time::timeout(Duration::from_secs(5), p.task)
        .await
        .expect("shut down")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn upstream_http_version_can_be_forced() {
    use outrider_proxy::config::UpstreamHttp;
    let app = start_app().await;
    for (client_h2, upstream, expect) in [
        (true, UpstreamHttp::Http1, "HTTP/1.1"),
        (false, UpstreamHttp::Http2, "HTTP/2.0"),
        (true, UpstreamHttp::Same, "HTTP/2.0"),
    ] {
        let p = start_forward(app, |c| c.upstream_http = upstream).await;
        let mut c = ClientConn::connect(p.forward[0], client_h2).await.unwrap();
        let rsp = c.get("payments.test", "/v").await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK, "{upstream:?}");
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains(expect), "{upstream:?}: {body}");
    }
}

#[tokio::test]
async fn idle_opaque_connections_are_closed() {
    let echo = start_echo(None).await;
    let p = start_forward(echo, |c| c.tcp_idle_timeout = Duration::from_millis(300)).await;
    let mut s = TcpStream::connect(p.forward[0]).await.unwrap();
    s.write_all(b"\x00hello").await.unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).await.unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed when idle")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
}

/// Reads a response head (through the blank line) from `s`.
use crate::support::read_head;

#[tokio::test]
async fn a_request_detected_after_the_drain_started_is_still_answered() {
    let app = start_app().await;
    // Detection decides on the rest of the request line, not on a deadline, within the test.
    let p = start_forward(app, |c| c.detect_timeout = Duration::from_secs(60)).await;
    let mut s = TcpStream::connect(p.forward[0]).await.unwrap();
    let partial = b"GET /late HT";
    s.write_all(partial).await.unwrap();
    // The proxy has read the partial line and is still detecting when the drain starts.
    wait_count(
        &p,
        "outrider_tcp_received_bytes_total",
        "direction",
        "forward",
        partial.len() as u64,
    )
    .await;
    p.stop.trigger("test");
    wait_draining(p.admin).await;
    assert_eq!(
        count(&p, "outrider_detect_total", "direction", "forward"),
        0,
        "still undecided when the drain started"
    );
    s.write_all(b"TP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(count(&p, "outrider_detect_total", "outcome", "http1"), 1);
}

#[tokio::test]
async fn upgraded_streams_keep_their_connection_slot() {
    let app = start_app().await;
    let p = start_forward(app, |c| c.max_connections = 1).await;
    let mut ws = TcpStream::connect(p.forward[0]).await.unwrap();
    ws.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(read_head(&mut ws).await.starts_with("http/1.1 101"));
    let mut ws = Holder::Upgraded(ws);
    // The upgraded stream works, and still counts as the open connection.
    ws.round_trip().await;
    assert_eq!(
        count(&p, "outrider_tcp_close_total", "direction", "forward"),
        0
    );
    let gauge = raw(p.admin, b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        crate::support::sample(
            &gauge,
            "outrider_tcp_open_connections",
            &[("direction", "forward")]
        ),
        1.0
    );
    served_only_after_release(&p, ws, "the upgraded stream").await;
}

#[tokio::test]
async fn upstream_pools_are_keyed_by_address_not_by_client_authority() {
    let app = start_app().await;
    // HTTP/2: six authorities on one client connection share one upstream connection.
    let p = start_forward(app, |_| {}).await;
    let mut c = ClientConn::connect(p.forward[0], true).await.unwrap();
    for i in 0..6 {
        let rsp = c.get(&format!("host-{i}.test"), "/").await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        assert!(!body.is_empty());
    }
    let connects = |r: &Running| single(r, "outrider_upstream_connects_total");
    assert_eq!(connects(&p), 1.0);
    // HTTP/1.1: six client connections with six Host values, one after another, reuse one.
    let p = start_forward(app, |_| {}).await;
    for i in 0..6 {
        let mut c = ClientConn::connect(p.forward[0], false).await.unwrap();
        let rsp = c.get(&format!("host-{i}.test"), "/").await.unwrap();
        rsp.into_body().collect().await.unwrap();
    }
    assert_eq!(connects(&p), 1.0);
}

#[tokio::test]
async fn connect_tunnels_become_byte_streams() {
    let app = start_app().await;
    let p = start_forward(app, |_| {}).await;
    let mut s = TcpStream::connect(p.forward[0]).await.unwrap();
    s.write_all(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    s.write_all(b"tunnelled bytes").await.unwrap();
    let mut back = [0u8; 15];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"tunnelled bytes");
}

#[tokio::test]
async fn http2_drain_sends_goaway_and_finishes_in_flight() {
    let (backend, mut gate) = start_gate().await;
    let p = start_forward(backend, |_| {}).await;
    let mut c = ClientConn::connect(p.forward[0], true).await.unwrap();
    let ClientConn::Http2(send) = &c else {
        unreachable!()
    };
    let mut held = ClientConn::Http2(send.clone());
    let in_flight = tokio::spawn(async move {
        let rsp = held.get("payments.test", "/hold").await.unwrap();
        let status = rsp.status();
        rsp.into_body().collect().await.unwrap();
        status
    });
    // The stream is in flight through the proxy (the backend holds it) before the drain starts.
    gate.arrived().await;
    p.stop.trigger("test");
    wait_draining(p.admin).await;
    // Once the GOAWAY reaches the client, the connection takes no new streams. One opened before
    // it arrived is still served.
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let next = tokio::time::timeout(EVENT_TIMEOUT, c.get("payments.test", "/new"))
            .await
            .expect("a new stream is answered or refused");
        let Ok(rsp) = next else { break };
        assert_eq!(rsp.status(), StatusCode::OK);
        assert!(
            tokio::time::Instant::now() < deadline,
            "new streams still taken {EVENT_TIMEOUT:?} after the drain started: no GOAWAY"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!in_flight.is_finished(), "held until released");
    gate.release();
    assert_eq!(
        tokio::time::timeout(EVENT_TIMEOUT, in_flight)
            .await
            .expect("the in-flight stream completes")
            .unwrap(),
        StatusCode::OK,
        "the in-flight stream completes"
    );
    tokio::time::timeout(Duration::from_secs(5), p.task)
        .await
        .expect("drained")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn version_translation_joins_cookies_and_absolute_form_sets_host() {
    use outrider_proxy::config::UpstreamHttp;
    let app = start_app().await;
    // HTTP/2 client with a split cookie, HTTP/1.1 upstream: one joined cookie field arrives.
    let p = start_forward(app, |c| c.upstream_http = UpstreamHttp::Http1).await;
    let c = ClientConn::connect(p.forward[0], true).await.unwrap();
    let ClientConn::Http2(mut send) = c else {
        unreachable!()
    };
    let req = http::Request::get("http://payments.test/headers")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(http_body_util::Empty::new())
        .unwrap();
    let rsp = send.send_request(req).await.unwrap();
    let body =
        String::from_utf8_lossy(&rsp.into_body().collect().await.unwrap().to_bytes()).into_owned();
    assert!(body.starts_with("HTTP/1.1"), "{body}");
    assert_eq!(body.matches("cookie:").count(), 1, "{body}");
    assert!(body.contains("cookie: a=1; b=2\n"), "{body}");
    assert!(body.contains("host: payments.test\n"), "{body}");
    // Absolute form: the request target's authority wins over a conflicting Host.
    let p = start_forward(app, |_| {}).await;
    let rsp = raw(
        p.forward[0],
        b"GET http://a.example/headers HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(rsp.contains("host: a.example\n"), "{rsp}");
    assert!(!rsp.contains("b.example"), "{rsp}");
}

/// An HTTP/2 upstream that says GOAWAY on each connection as soon as its first request arrives
/// (as a server that is draining or restarting does), and closes once idle. A `/hold` request
/// is held (keeping its connection open) until the gate is released; others are answered at once.
async fn start_goaway_upstream() -> (SocketAddr, Gate) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let l = TcpListener::bind(LOOPBACK_ANY).await.unwrap();
    let addr = l.local_addr().unwrap();
    let (gate, arrived, release) = Gate::new();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let (arrived, release) = (arrived.clone(), release.clone());
            tokio::spawn(async move {
                let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
                let done_tx = std::sync::Mutex::new(Some(done_tx));
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        if let Some(tx) = done_tx.lock().unwrap().take() {
                            let _ = tx.send(());
                        }
                        let hold = req.uri().path() == "/hold";
                        if hold {
                            let _ = arrived.send(());
                        }
                        let mut release = release.clone();
                        async move {
                            if hold {
                                let _ = release.wait_for(|open| *open).await;
                            }
                            Ok::<_, std::convert::Infallible>(ok_response())
                        }
                    });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = &mut conn => return,
                    _ = done_rx => conn.as_mut().graceful_shutdown(),
                }
                let _ = conn.await;
            });
        }
    });
    (addr, gate)
}

#[tokio::test]
async fn http2_upstream_goaway_does_not_fail_the_next_request() {
    use outrider_proxy::config::UpstreamHttp;
    let (upstream, mut gate) = start_goaway_upstream().await;
    let p = start_forward(upstream, |c| c.upstream_http = UpstreamHttp::Http2).await;
    let addr = p.forward[0];
    // Request A opens the upstream connection, which answers GOAWAY as soon as A arrives and
    // keeps A in flight; request B then meets that going-away connection and must go on a new one.
    let a = tokio::spawn(async move {
        let mut c = ClientConn::connect(addr, false).await.unwrap();
        c.get("payments.test", "/hold").await.unwrap().status()
    });
    gate.arrived().await;
    let mut c = ClientConn::connect(addr, false).await.unwrap();
    let b = c.get("payments.test", "/b").await.unwrap().status();
    assert_eq!(b, StatusCode::OK, "the request that met the GOAWAY");
    assert_eq!(
        single(&p, "outrider_upstream_connects_total"),
        2.0,
        "B went on a second upstream connection"
    );
    assert!(!a.is_finished(), "A is still held");
    gate.release();
    assert_eq!(
        tokio::time::timeout(EVENT_TIMEOUT, a)
            .await
            .expect("A completes")
            .unwrap(),
        StatusCode::OK
    );
    assert_eq!(
        count(&p, "outrider_errors_total", "reason", "upstream-failed"),
        0
    );
}

#[tokio::test]
async fn a_failed_http2_dial_fails_all_its_waiters_at_once() {
    use outrider_proxy::config::UpstreamHttp;
    // A listener that never accepts, its backlog filled: further connects hang (SYNs dropped).
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(0).unwrap();
    let black_hole = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(black_hole)).await
        {
            fillers.push(s);
        }
    }
    let connect_timeout = Duration::from_secs(1);
    let p = start_forward(black_hole, |c| {
        c.upstream_http = UpstreamHttp::Http2;
        c.connect_timeout = connect_timeout;
    })
    .await;
    let started = std::time::Instant::now();
    let requests: Vec<_> = (0..6)
        .map(|_| {
            let addr = p.forward[0];
            tokio::spawn(async move {
                let mut c = ClientConn::connect(addr, false).await.unwrap();
                c.get("x", "/").await.unwrap().status()
            })
        })
        .collect();
    // All six are waiting for the upstream connection before its dial fails.
    wait_count(&p, "outrider_requests_total", "direction", "forward", 6).await;
    assert_eq!(
        count(&p, "outrider_errors_total", "reason", "connect-failed"),
        0,
        "the dial failed before all six requests arrived: the test proves nothing"
    );
    for r in requests {
        assert_eq!(r.await.unwrap(), StatusCode::BAD_GATEWAY);
    }
    // One dial, failed once for all six; not one dial per waiter.
    assert_eq!(single(&p, "outrider_upstream_connects_total"), 1.0);
    assert_eq!(
        count(&p, "outrider_errors_total", "reason", "connect-failed"),
        6
    );
    // A guard only: six dials in a row would take six connect timeouts.
    assert!(
        started.elapsed() < connect_timeout * 5,
        "took {:?}",
        started.elapsed()
    );
    drop(fillers);
}

/// The single value of an unlabelled metric family (counter or gauge).
fn single(r: &Running, family: &str) -> f64 {
    outrider_proxy::metrics::sum(&r.registry, family, &[])
}

#[tokio::test]
async fn sixty_four_connections_share_one_destination_stack() {
    let app = start_app().await;
    let p = start_forward(app, |_| {}).await;
    let mut conns = Vec::new();
    for i in 0..64 {
        let mut c = ClientConn::connect(p.forward[0], i % 2 == 1).await.unwrap();
        let rsp = c.get("payments.test", "/").await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        // Read to the end: an HTTP/1 upstream connection goes back to the pool only then.
        rsp.into_body().collect().await.unwrap();
        conns.push(c);
    }
    assert_eq!(
        count(&p, "outrider_tcp_open_total", "direction", "forward"),
        64
    );
    assert_eq!(
        single(&p, "outrider_outbound_destination_builds_total"),
        1.0
    );
    assert_eq!(single(&p, "outrider_outbound_destinations"), 1.0);
    // One upstream connection per HTTP version, reused by every client connection (the
    // requests are sequential, so the HTTP/1 pool never needs a second).
    assert_eq!(single(&p, "outrider_upstream_connects_total"), 2.0);
}

/// An HTTP/1.0 server that answers anything, the HTTP/2 preface included, with a 200 and
/// closes: the shape of `python3 -m http.server`.
async fn start_http10() -> SocketAddr {
    let l = TcpListener::bind(LOOPBACK_ANY).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn h2c_clients_reach_an_http1_only_upstream_and_http11_clients_hear_http11() {
    let upstream = start_http10().await;
    let p = start_forward(upstream, |_| {}).await;
    // The very first HTTP/2 request is not lost to the discovery that the upstream speaks HTTP/1.
    for _ in 0..2 {
        let mut c = ClientConn::connect(p.forward[0], true).await.unwrap();
        let rsp = c.get("payments.test", "/").await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello");
    }
    // gRPC needs HTTP/2: a gRPC error, not a silent downgrade.
    let grpc = raw_h2c_grpc(p.forward[0]).await;
    assert_eq!(grpc.0, StatusCode::OK);
    assert_eq!(grpc.1.as_deref(), Some("13"), "grpc-status");
    // An HTTP/1.1 client hears HTTP/1.1, whatever the upstream spoke.
    let rsp = raw(p.forward[0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
}

/// Sends one gRPC-shaped h2c request; returns the status and `grpc-status`.
async fn raw_h2c_grpc(addr: SocketAddr) -> (StatusCode, Option<String>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{addr}/pkg.Svc/Call"))
        .version(http::Version::HTTP_2)
        .header("content-type", "application/grpc")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let rsp = send.send_request(req).await.unwrap();
    let grpc = rsp
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_string());
    (rsp.status(), grpc)
}

#[tokio::test]
async fn a_malformed_chunked_body_is_the_clients_fault() {
    let app = start_app().await;
    let p = start_forward(app, |_| {}).await;
    let rsp = raw(
        p.forward[0],
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nAAAA\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(rsp.starts_with("HTTP/1.1 400"), "{rsp}");
    assert!(rsp.contains("outrider-error: bad-request"), "{rsp}");
    assert_eq!(
        count(&p, "outrider_errors_total", "reason", "bad-request"),
        1
    );
    assert_eq!(
        count(&p, "outrider_errors_total", "reason", "upstream-failed"),
        0
    );
}

#[tokio::test]
async fn a_client_that_speaks_after_the_detection_timeout_is_still_served_as_http() {
    // A pooled client connection that stays idle past the detection timeout (hyper-util opens
    // spares) must not become an opaque tunnel that bypasses the HTTP layers and their counts.
    let l = TcpListener::bind(LOOPBACK_ANY).await.unwrap();
    let upstream = l.local_addr().unwrap();
    let p = start_forward(upstream, |c| c.detect_timeout = Duration::from_millis(100)).await;
    let mut client = TcpStream::connect(p.forward[0]).await.unwrap();
    // The event that says detection timed out: the proxy dials the upstream for a possible
    // server-speaks-first protocol.
    let (mut silent_dial, _) = l.accept().await.unwrap();
    tokio::spawn(outrider::demo::app::serve(l, "late".into()));
    client
        .write_all(b"GET /late HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut rsp = String::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_string(&mut rsp))
        .await
        .unwrap()
        .unwrap();
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    assert_eq!(
        count(&p, "outrider_requests_total", "direction", "forward"),
        1
    );
    assert_eq!(count(&p, "outrider_detect_total", "outcome", "http1"), 1);
    // The connection dialled while the client was silent is closed, not kept.
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), silent_dial.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn a_connection_on_which_nobody_speaks_is_closed_on_both_sides() {
    let l = TcpListener::bind(LOOPBACK_ANY).await.unwrap();
    let upstream = l.local_addr().unwrap();
    let p = start_forward(upstream, |c| {
        c.detect_timeout = Duration::from_millis(100);
        c.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let mut client = TcpStream::connect(p.forward[0]).await.unwrap();
    let (mut dialled, _) = l.accept().await.unwrap();
    let mut buf = [0u8; 1];
    // Both reads end (EOF or reset) well before the 1 h TCP idle timeout.
    let up = tokio::time::timeout(Duration::from_secs(5), dialled.read(&mut buf)).await;
    assert!(
        matches!(up, Ok(Ok(0)) | Ok(Err(_))),
        "upstream side still open"
    );
    let down = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await;
    assert!(
        matches!(down, Ok(Ok(0)) | Ok(Err(_))),
        "client side still open"
    );
    assert_eq!(count(&p, "outrider_detect_total", "outcome", "timeout"), 1);
}

/// An original destination decided after the proxy has started.
struct LateOrigDst(std::sync::Mutex<Option<SocketAddr>>);

impl OrigDst for LateOrigDst {
    fn orig_dst(&self, _: &TcpStream) -> std::io::Result<SocketAddr> {
        self.0
            .lock()
            .unwrap()
            .ok_or_else(|| std::io::Error::other("not yet"))
    }
}

#[tokio::test]
async fn a_request_that_comes_back_is_refused_with_508_and_does_not_multiply() {
    // Proxy A's outbound sends everything to proxy B's forward listener, whose upstream is A's
    // outbound listener: a loop no start-time check can see.
    let late = Arc::new(LateOrigDst(std::sync::Mutex::new(None)));
    let mut config = Config::local(vec![]);
    config.outbound = Some(LOOPBACK_ANY.parse().unwrap());
    let a = start(config, late.clone()).await;
    let b = start_forward(a.outbound.unwrap(), |_| {}).await;
    *late.0.lock().unwrap() = Some(b.forward[0]);
    let rsp = raw(b.forward[0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(rsp.starts_with("HTTP/1.1 508"), "{rsp}");
    assert!(rsp.contains("outrider-error: loop"), "{rsp}");
    // B forwarded once to A, A once back to B: two upstream connections, not thousands.
    assert_eq!(count(&b, "outrider_errors_total", "reason", "loop"), 1);
    assert_eq!(
        count(&a, "outrider_requests_total", "direction", "outbound"),
        1
    );
    assert_eq!(
        count(&b, "outrider_requests_total", "direction", "forward"),
        2
    );
}

/// A server that accepts, reads and never answers; hands each accepted connection to the test.
async fn start_black_hole() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<TcpStream>) {
    let l = TcpListener::bind(LOOPBACK_ANY).await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = tx.send(s);
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn an_unfinished_request_head_gets_408() {
    let app = start_app().await;
    let p = start_forward(app, |c| c.header_read_timeout = Duration::from_millis(200)).await;
    // The client keeps its side open: it is slow, not gone.
    let mut s = TcpStream::connect(p.forward[0]).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let rsp = String::from_utf8_lossy(&out);
    assert!(rsp.starts_with("HTTP/1.1 408"), "{rsp:?}");
    assert!(rsp.contains("outrider-error: header-timeout"), "{rsp}");
    assert_eq!(
        count(&p, "outrider_errors_total", "reason", "header-timeout"),
        1
    );
    assert_eq!(
        count(&p, "outrider_responses_total", "status_class", "4xx"),
        1
    );
}

#[tokio::test]
async fn a_hung_upstream_gets_504_with_a_request_timeout() {
    let (upstream, mut accepted) = start_black_hole().await;
    let p = start_forward(upstream, |c| {
        c.request_timeout = Some(Duration::from_millis(300))
    })
    .await;
    let rsp = raw(p.forward[0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(rsp.starts_with("HTTP/1.1 504"), "{rsp}");
    assert!(rsp.contains("outrider-error: request-timeout"), "{rsp}");
    drop(accepted.recv().await);
}

#[tokio::test]
async fn a_hung_upstream_is_dropped_after_the_stream_idle_timeout() {
    let (upstream, mut accepted) = start_black_hole().await;
    let p = start_forward(upstream, |c| {
        c.stream_idle_timeout = Duration::from_millis(300)
    })
    .await;
    let mut client = TcpStream::connect(p.forward[0]).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut up = accepted.recv().await.unwrap();
    let mut buf = [0u8; 4096];
    // The upstream reads the request, then both connections are closed: neither is held.
    let mut closed = false;
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_secs(5), up.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => continue,
            Err(_) => break,
        }
    }
    assert!(closed, "the upstream connection is still open");
    let down = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await;
    assert!(
        matches!(down, Ok(Ok(0)) | Ok(Err(_))),
        "client side still open"
    );
}

#[tokio::test]
async fn connections_to_one_upstream_are_bounded() {
    let (upstream, mut accepted) = start_black_hole().await;
    let p = start_forward(upstream, |c| c.max_upstream_connections = 2).await;
    let mut hung = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(p.forward[0]).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        hung.push(c);
        hung_upstream(&mut accepted).await;
    }
    // Both slots are held by requests the upstream never answers: the third fails at once.
    let rsp = raw(p.forward[0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(rsp.starts_with("HTTP/1.1 503"), "{rsp}");
    assert!(rsp.contains("outrider-error: overloaded"), "{rsp}");
    assert_eq!(single(&p, "outrider_upstream_connects_total"), 2.0);
}

/// Waits for the black hole to accept one more connection, and keeps it open.
async fn hung_upstream(accepted: &mut tokio::sync::mpsc::UnboundedReceiver<TcpStream>) {
    let s = accepted.recv().await.unwrap();
    tokio::spawn(async move {
        let _keep = s;
        std::future::pending::<()>().await;
    });
}

#[tokio::test]
async fn inbound_goes_to_the_original_destination_so_loopback_only_listeners_stay_private() {
    // The app listens on 127.0.0.1 only; traffic addressed to another of the pod's addresses
    // (127.0.0.2 stands for the pod IP here) must not reach it.
    let app = start_app().await;
    let other_addr = SocketAddr::from(([127, 0, 0, 2], app.port()));
    let mut config = Config::local(vec![]);
    config.inbound = Some(LOOPBACK_ANY.parse().unwrap());
    let p = start(config, Arc::new(FixedOrigDst(other_addr))).await;
    let rsp = raw(p.inbound.unwrap(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(rsp.starts_with("HTTP/1.1 502"), "{rsp}");
    assert!(rsp.contains("outrider-error: connect-failed"), "{rsp}");
    // Addressed to where the app listens, it is reached.
    let mut config = Config::local(vec![]);
    config.inbound = Some(LOOPBACK_ANY.parse().unwrap());
    let p = start(config, Arc::new(FixedOrigDst(app))).await;
    let rsp = raw(p.inbound.unwrap(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
}

#[tokio::test]
async fn the_app_never_sees_a_hop_marker_so_call_chains_through_apps_are_not_loops() {
    // An app that copies its incoming headers into its own outbound calls (a gateway) must not
    // make its sidecar's outbound see a marker and answer 508.
    let app = start_app().await;
    let mut config = Config::local(vec![]);
    config.inbound = Some(LOOPBACK_ANY.parse().unwrap());
    let p = start(config, Arc::new(FixedOrigDst(app))).await;
    let rsp = raw(
        p.inbound.unwrap(),
        b"GET /headers HTTP/1.1\r\nHost: x\r\noutrider-hop: 42\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    assert!(!rsp.to_lowercase().contains("outrider-hop"), "{rsp}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_outlives_the_header_timeout() {
    // hyper's own header timer also runs between keep-alive requests; ours runs only from a
    // request's first byte, so an idle pooled connection lasts the idle timeout.
    let app = start_app().await;
    let p = start_forward(app, |c| c.header_read_timeout = Duration::from_millis(200)).await;
    let mut c = ClientConn::connect(p.forward[0], false).await.unwrap();
    assert_eq!(c.get("x", "/").await.unwrap().status(), StatusCode::OK);
    // Three header timeouts with nothing sent.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let rsp = c
        .get("x", "/again")
        .await
        .expect("the connection is still open");
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(
        count(&p, "outrider_tcp_open_total", "direction", "forward"),
        1
    );
}

#[tokio::test]
async fn a_malformed_body_to_an_http2_upstream_is_still_the_clients_fault() {
    use outrider_proxy::config::UpstreamHttp;
    let app = start_app().await;
    let p = start_forward(app, |c| c.upstream_http = UpstreamHttp::Http2).await;
    let rsp = raw(
        p.forward[0],
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nAAAA\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(rsp.starts_with("HTTP/1.1 400"), "{rsp}");
    assert_eq!(
        count(&p, "outrider_errors_total", "reason", "bad-request"),
        1
    );
    assert_eq!(
        count(&p, "outrider_errors_total", "reason", "upstream-failed"),
        0
    );
}

#[tokio::test]
async fn a_client_that_abandons_its_upload_is_counted_as_aborted() {
    let app = start_app().await;
    let p = start_forward(app, |_| {}).await;
    let mut s = TcpStream::connect(p.forward[0]).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    drop(s);
    // Wait (bounded) for the proxy to see the abandoned body.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while count(&p, "outrider_errors_total", "reason", "client-aborted") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not counted as client-aborted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        count(&p, "outrider_errors_total", "reason", "upstream-failed"),
        0
    );
    assert_eq!(
        count(&p, "outrider_errors_total", "reason", "bad-request"),
        0
    );
}

#[tokio::test]
async fn a_silent_client_of_a_declared_http_service_gets_no_upstream_connection() {
    // The demo mesh declares payments-api (198.18.100.1:80) as http1: no server there speaks
    // first, so a silent client is waited for without dialling an endpoint, then closed.
    let mesh = outrider_control::mesh::Mesh::parse(outrider_control::mesh::DEMO_MESH).unwrap();
    let control = outrider_control::ControlPlane::new(mesh).unwrap();
    let l = TcpListener::bind(LOOPBACK_ANY).await.unwrap();
    let control_addr = l.local_addr().unwrap();
    let served = tokio::spawn(control.serve(l));
    let mut config = Config::local(vec![ForwardSpec {
        listen: LOOPBACK_ANY.parse().unwrap(),
        upstream: "198.18.100.1:80".parse().unwrap(),
    }]);
    config.control = Some(format!("http://{control_addr}"));
    config.workload = Some("demo/loadgen".into());
    config.detect_timeout = Duration::from_millis(100);
    config.header_read_timeout = Duration::from_millis(300);
    let p = start(config, Arc::new(SoOriginalDst)).await;
    let mut c = TcpStream::connect(p.forward[0]).await.unwrap();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "still open");
    assert_eq!(single(&p, "outrider_upstream_connects_total"), 0.0);
    assert_eq!(count(&p, "outrider_detect_total", "outcome", "timeout"), 1);
    served.abort();
}

#[tokio::test]
async fn admin_forwards_app_probes_to_the_app_on_loopback() {
    let app = start_app().await;
    let mut config = Config::local(vec![]);
    config.app_probes = outrider_proxy::app_probe::parse(&format!(
        r#"{{"app/liveness":{{"port":{},"path":"/"}},"app/readiness":{{"port":{},"path":"/"}}}}"#,
        app.port(),
        free_loopback_port().await,
    ))
    .unwrap();
    let p = start(config, Arc::new(FixedOrigDst(app))).await;
    // As the kubelet asks: one request, no half-close while the answer is on its way.
    let admin = p.admin;
    let get = |path: &'static str| async move {
        let mut s = TcpStream::connect(admin).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let live = get("/app-probe/app/liveness").await;
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");
    // The app's readiness port has nothing listening: the probe fails, it does not pass.
    let ready = get("/app-probe/app/readiness").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    let unknown = get("/app-probe/app/startup").await;
    assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
}

async fn free_loopback_port() -> u16 {
    let l = TcpListener::bind(LOOPBACK_ANY).await.unwrap();
    l.local_addr().unwrap().port()
}
