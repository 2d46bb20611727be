//! Where the mesh must fail closed, in process: a meshed inbound before its first view, a silent
//! plaintext caller of a strict port, the proxies' internal headers from outside the mesh, and
//! HTTP-looking first lines that are not HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use outrider::demo::ClientConn;
use outrider_control::api::DefaultPolicy;
use outrider_proxy::config::Config;
use outrider_proxy::identity::testing::{SigningCa, TestCa};
use outrider_proxy::metrics::Direction;
use outrider_proxy::Proxy;

use crate::mesh::{
    admin_get, allow_only, body, sidecar_config, spawn_node, start_app, start_echo, start_tweaked,
    tls_with_leaf, Node, API, WEB,
};

/// A meshed server proxy (`demo/api`, with a certificate) whose control plane accepts
/// connections but never answers: it never gets a view. Not waited for (it never gets ready).
async fn server_without_view(
    app: SocketAddr,
    tweak: impl FnOnce(&mut Config),
) -> (Node, TcpListener) {
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = sidecar_config(silent.local_addr().unwrap(), "demo/api");
    config.inbound = Some("127.0.0.1:0".parse().unwrap());
    config.first_view_wait = Duration::from_millis(300);
    tweak(&mut config);
    let ca = Arc::new(SigningCa::new(
        TestCa::new("test mesh root").unwrap(),
        Duration::from_secs(3600),
    ));
    let (node, _) = spawn_node(config, app, &ca, API).await;
    (node, silent)
}

#[tokio::test]
async fn before_the_first_view_the_inbound_fails_closed_unless_the_flag_opens_it() {
    let app = start_app().await;
    let probes = format!(
        "{{\"app/readiness\": {{\"port\": {}, \"path\": \"/ready\"}}}}",
        app.port()
    );
    let probes = outrider_proxy::app_probe::parse(&probes).unwrap();
    let (server, _silent) = server_without_view(app, |c| c.app_probes = probes).await;
    let inbound = server.inbound.unwrap();
    // A plaintext HTTP caller: held for the first view, then refused; the app never hears it.
    let mut c = ClientConn::connect(inbound, false).await.unwrap();
    let rsp = c.get("api.demo", "/").await.unwrap();
    assert_eq!(rsp.status(), StatusCode::FORBIDDEN);
    assert_eq!(rsp.headers()["outrider-error"], "denied");
    // An opaque caller (a server-speaks-first port) is closed.
    let mut s = TcpStream::connect(inbound).await.unwrap();
    s.write_all(b"\x00\x01binary").await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    assert_eq!(
        server.sum("outrider_authz_denied_total", &[("rule", "no-config")]),
        2.0
    );
    assert_eq!(
        server.sum("outrider_upstream_connects_total", &[]),
        0.0,
        "nothing reached the app"
    );
    // The app's probes through the admin port still work.
    let probe = admin_get(server.admin, "/app-probe/app/readiness").await;
    assert!(probe.starts_with("HTTP/1.1 200"), "{probe}");
    assert!(admin_get(server.admin, "/ready")
        .await
        .starts_with("HTTP/1.1 503"));

    // `--default-inbound-policy allow-all` opens the window (the operator's choice).
    let (open, _silent) =
        server_without_view(app, |c| c.default_inbound_policy = DefaultPolicy::AllowAll).await;
    let mut c = ClientConn::connect(open.inbound.unwrap(), false)
        .await
        .unwrap();
    let rsp = c.get("api.demo", "/").await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    // `mesh-only` refuses the plaintext caller.
    let (mesh_only, _silent) =
        server_without_view(app, |c| c.default_inbound_policy = DefaultPolicy::MeshOnly).await;
    let mut c = ClientConn::connect(mesh_only.inbound.unwrap(), false)
        .await
        .unwrap();
    let rsp = c.get("api.demo", "/").await.unwrap();
    assert_eq!(rsp.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_silent_plaintext_caller_of_a_strict_port_never_makes_the_inbound_dial_the_app() {
    let (echo, accepted) = start_echo().await;
    let strict = allow_only(echo.port(), WEB);
    let mesh = start_tweaked(echo, "opaque", &strict, Duration::from_secs(3600), |c| {
        c.detect_timeout = Duration::from_millis(100);
        c.header_read_timeout = Duration::from_millis(500);
    })
    .await;
    let inbound = mesh.server.inbound.unwrap();
    // Five silent callers: each is closed at the silence limit, and the app sees none of them.
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(TcpStream::connect(inbound).await.unwrap());
    }
    for mut s in silent {
        let mut one = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut one)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(
        mesh.server.sum("outrider_upstream_connects_total", &[]),
        0.0
    );
    // The meshed client still reaches it.
    let mut s = TcpStream::connect(mesh.client.forward.unwrap())
        .await
        .unwrap();
    crate::support::echoes(&mut s, b"meshed").await;
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Sends `POST /x` over plaintext HTTP/2 to `addr` with `outrider-orig-proto: HTTP/1.0` and a
/// streamed body; the app's answer.
async fn h2_with_orig_proto(addr: SocketAddr) -> (StatusCode, String) {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("http://api.demo/x")
        .header("outrider-orig-proto", "HTTP/1.0")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let rsp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    (rsp.status(), body(rsp).await)
}

#[tokio::test]
async fn internal_headers_from_outside_the_mesh_are_removed() {
    let app = start_app().await;
    let open = format!(
        "    servers:\n      - port: {}\n        plaintext: true\n",
        app.port()
    );
    let mesh = start_tweaked(app, "http1", &open, Duration::from_secs(3600), |_| {}).await;
    // Straight to the inbound over plaintext h2c: the marker is not the caller's to set.
    let (status, text) = h2_with_orig_proto(mesh.server.inbound.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(
        text.contains("\"protocol\":\"HTTP/2.0\""),
        "the app hears the caller's own version: {text}"
    );
}

/// A local-mode proxy forwarding to `upstream`, with its configuration changed by `tweak`: its
/// listener, metrics and shutdown handle.
async fn forward_proxy(
    upstream: SocketAddr,
    tweak: impl FnOnce(&mut Config),
) -> (
    SocketAddr,
    prometheus::Registry,
    outrider_proxy::ShutdownHandle,
) {
    let mut config = Config::local(vec![outrider_proxy::config::ForwardSpec {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream,
    }]);
    tweak(&mut config);
    let registry = prometheus::Registry::new();
    let proxy = Proxy::bind(
        config,
        Arc::new(outrider_proxy::transport::orig_dst::SoOriginalDst),
        None,
        registry.clone(),
    )
    .await
    .unwrap();
    let listen = proxy.listener_addrs(Direction::Forward)[0];
    let stop = proxy.shutdown_handle();
    tokio::spawn(proxy.run());
    (listen, registry, stop)
}

/// Writes `req`, half-closes, and reads the answer (bounded).
async fn exchange(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "no answer in 10 s");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn malformed_http_request_lines_are_answered_400_never_tunnelled() {
    let (echo, accepted) = start_echo().await;
    let (listen, registry, stop) = forward_proxy(echo, |c| {
        c.detect_timeout = Duration::from_secs(5);
    })
    .await;
    let http1 = || {
        outrider_proxy::metrics::sum(&registry, "outrider_detect_total", &[("outcome", "http1")])
    };
    for line in [
        &b"GET\t/a\tHTTP/1.1\r\nHost: a\r\n\r\n"[..],
        b"GET /nine\r\nHost: a\r\n\r\n",
        b"GET / SPDY/3\r\nHost: a\r\n\r\n",
    ] {
        let before = http1();
        let rsp = exchange(listen, line).await;
        assert!(
            rsp.starts_with("HTTP/1.1 400"),
            "{:?}: {rsp:?}",
            String::from_utf8_lossy(line)
        );
        assert_eq!(http1(), before + 1.0, "{:?}", String::from_utf8_lossy(line));
    }
    // An unknown method with a request line longer than detection reads is HTTP too.
    let before = http1();
    let long = format!("FOO /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(9000));
    let _ = exchange(listen, long.as_bytes()).await;
    assert_eq!(http1(), before + 1.0);
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the well-formed request reached the upstream"
    );
    // Other protocols' inline commands stay opaque.
    let mut s = TcpStream::connect(listen).await.unwrap();
    crate::support::echoes(&mut s, b"get key\r\n").await;
    stop.trigger("test over");
}

/// Waits (bounded: 10 s) until the peer closes `s` (EOF or a reset); how long it took.
async fn closed_within(s: &mut TcpStream) -> Duration {
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("still open 10 s later"),
        }
    }
}

/// Waits (bounded: 10 s) until an HTTP client connection is closed by the proxy.
async fn http_closed_within(c: &ClientConn) -> Duration {
    let started = std::time::Instant::now();
    let closed = || match c {
        ClientConn::Http1(s) => s.is_closed(),
        ClientConn::Http2(s) => s.is_closed(),
    };
    // Bounded: 1,000 looks, 10 ms apart.
    for _ in 0..1000 {
        if closed() {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("still open 10 s later");
}

/// An upgraded (`Upgrade: echo`) stream to the demo app through `addr`, checked to echo.
async fn upgraded(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /up HTTP/1.1\r\nHost: api.demo\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let head = crate::support::read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    crate::support::echoes(&mut s, b"upgraded").await;
    s
}

#[tokio::test]
async fn open_http_and_upgraded_connections_of_a_revoked_caller_are_closed() {
    let app = start_app().await;
    let open = format!(
        "    servers:\n      - port: {}\n        plaintext: true\n",
        app.port()
    );
    let mesh = start_tweaked(app, "http1", &open, Duration::from_secs(3600), |_| {}).await;
    let inbound = mesh.server.inbound.unwrap();
    // Plaintext callers, straight to the inbound: HTTP/1.1, HTTP/2 and an upgraded stream.
    let mut h1 = ClientConn::connect(inbound, false).await.unwrap();
    let mut h2 = ClientConn::connect(inbound, true).await.unwrap();
    for c in [&mut h1, &mut h2] {
        assert_eq!(
            c.get("api.demo", "/").await.unwrap().status(),
            StatusCode::OK
        );
    }
    let mut up = upgraded(inbound).await;
    // And a meshed caller that stays allowed.
    let mut meshed = ClientConn::connect(mesh.client.outbound.unwrap(), true)
        .await
        .unwrap();
    assert_eq!(
        meshed.get("api.demo", "/").await.unwrap().status(),
        StatusCode::OK
    );
    // The port now admits `web` only, over mTLS.
    mesh.apply("http1", API, &allow_only(app.port(), WEB));
    let t1 = http_closed_within(&h1).await;
    let t2 = http_closed_within(&h2).await;
    let tu = closed_within(&mut up).await;
    eprintln!("closed after the change: HTTP/1.1 {t1:?}, HTTP/2 {t2:?}, upgraded {tu:?}");
    assert!(
        mesh.server.sum(
            "outrider_authz_denied_total",
            &[("rule", "plaintext-not-allowed")]
        ) >= 3.0
    );
    // A new plaintext connection gets 403; the meshed caller is untouched.
    let mut again = ClientConn::connect(inbound, false).await.unwrap();
    assert_eq!(
        again.get("api.demo", "/").await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    for _ in 0..5 {
        assert_eq!(
            meshed.get("api.demo", "/").await.unwrap().status(),
            StatusCode::OK
        );
    }
}

#[tokio::test]
async fn open_tcp_connections_of_a_revoked_caller_are_closed_meshed_or_not() {
    let (echo, _) = start_echo().await;
    let both = format!(
        "    servers:\n      - port: {}\n        plaintext: true\n",
        echo.port()
    );
    let mesh = start_tweaked(echo, "opaque", &both, Duration::from_secs(3600), |_| {}).await;
    // A meshed TCP connection (mTLS, opaque ALPN) and a plaintext one.
    let mut meshed = TcpStream::connect(mesh.client.forward.unwrap())
        .await
        .unwrap();
    crate::support::echoes(&mut meshed, b"meshed").await;
    let mut plain = TcpStream::connect(mesh.server.inbound.unwrap())
        .await
        .unwrap();
    crate::support::echoes(&mut plain, b"\x00plain").await;
    // Plaintext callers lose the port: the plaintext connection closes, the meshed one stays.
    mesh.apply("opaque", API, &allow_only(echo.port(), WEB));
    let tp = closed_within(&mut plain).await;
    crate::support::echoes(&mut meshed, b"still allowed").await;
    // Then `web` loses it too.
    mesh.apply(
        "opaque",
        API,
        &allow_only(echo.port(), "spiffe://outrider.local/ns/demo/sa/other"),
    );
    let tm = closed_within(&mut meshed).await;
    eprintln!("closed after the change: plaintext {tp:?}, meshed {tm:?}");
    assert!(
        mesh.server.sum(
            "outrider_authz_denied_total",
            &[("rule", "identity-not-allowed")]
        ) >= 1.0
    );
}

#[tokio::test]
async fn an_open_mesh_connection_ends_when_the_callers_certificate_expires() {
    let (echo, _) = start_echo().await;
    let mesh = start_tweaked(echo, "opaque", "", Duration::from_secs(2), |_| {}).await;
    let mut s = TcpStream::connect(mesh.client.forward.unwrap())
        .await
        .unwrap();
    crate::support::echoes(&mut s, b"before expiry").await;
    let t = closed_within(&mut s).await;
    eprintln!("closed {t:?} after the first echo (certificates live 2 s)");
    // The client proxy has renewed: a new connection works.
    let mut s = TcpStream::connect(mesh.client.forward.unwrap())
        .await
        .unwrap();
    crate::support::echoes(&mut s, b"after renewal").await;
}

/// An HTTP/1.1 or HTTP/2 (`h2`) client over a mutual TLS connection to the inbound `server`
/// presenting `leaf`, checked to be served.
async fn mesh_http(
    server: SocketAddr,
    leaf: outrider_proxy::identity::testing::TestLeaf,
    anchors: &str,
    h2: bool,
) -> ClientConn {
    use outrider_proxy::identity::Alpn;
    let alpn = if h2 { Alpn::H2 } else { Alpn::Http1 };
    let io = TokioIo::new(tls_with_leaf(server, leaf, anchors, alpn).await.unwrap());
    let mut c = if h2 {
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        ClientConn::Http2(send)
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        ClientConn::Http1(send)
    };
    assert_eq!(
        c.get("api.demo", "/").await.unwrap().status(),
        StatusCode::OK
    );
    c
}

/// When (bounded: 10 s) the proxy closes an HTTP client connection.
async fn closed_at(c: &ClientConn) -> std::time::SystemTime {
    http_closed_within(c).await;
    std::time::SystemTime::now()
}

/// Waits (bounded) until `node` trusts `roots` roots.
async fn trusts_roots(node: &Node, roots: usize) {
    let want = format!("\"trust_anchors\": {roots}");
    for _ in 0..1000 {
        if admin_get(node.admin, "/identity").await.contains(&want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never {want}");
}

#[tokio::test]
async fn open_mesh_http_connections_end_when_the_callers_certificate_expires_or_loses_its_root() {
    use std::time::{SystemTime, UNIX_EPOCH};
    let app = start_app().await;
    // The server proxy renews every second or so, and so learns a new bundle quickly.
    let mesh = start_tweaked(app, "http1", "", Duration::from_secs(2), |_| {}).await;
    let inbound = mesh.server.inbound.unwrap();
    let root = mesh.ca.anchors.lock().unwrap().clone();
    let now = SystemTime::now();
    let (long_ago, in_an_hour) = (
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    );
    // A caller whose certificate stays valid and trusted throughout: never closed.
    let valid = mesh.ca.leaf_with(&[WEB], long_ago, in_an_hour).unwrap();
    let mut kept = mesh_http(inbound, valid, &root, true).await;
    // 1. Expiry: certificates ending on a whole second (X.509 counts seconds), 3 s from now.
    let secs = now.duration_since(UNIX_EPOCH).unwrap().as_secs() + 3;
    let until = UNIX_EPOCH + Duration::from_secs(secs);
    let mut expiring = Vec::new();
    for h2 in [false, true] {
        let leaf = mesh.ca.leaf_with(&[WEB], long_ago, until).unwrap();
        expiring.push(mesh_http(inbound, leaf, &root, h2).await);
    }
    let closed = tokio::join!(closed_at(&expiring[0]), closed_at(&expiring[1]));
    for (at, version) in [closed.0, closed.1].into_iter().zip(["HTTP/1.1", "HTTP/2"]) {
        let after = at.duration_since(until).unwrap_or_else(|early| {
            panic!("{version} closed {:?} before expiry", early.duration())
        });
        eprintln!("{version} closed {after:?} after the caller's certificate expired");
        assert!(after < Duration::from_secs(1), "{version}: {after:?}");
    }
    // 2. Root removal: a second root joins the bundle, a caller connects with a certificate
    // from it, then the root leaves the bundle (step 3 of a rotation).
    let second = TestCa::new("second mesh root").unwrap();
    mesh.ca.set_anchors(format!("{root}{}", second.root_pem()));
    trusts_roots(&mesh.server, 2).await;
    let mut orphaned = Vec::new();
    for h2 in [false, true] {
        let leaf = second.leaf_with(&[WEB], long_ago, in_an_hour).unwrap();
        orphaned.push(mesh_http(inbound, leaf, &root, h2).await);
    }
    mesh.ca.set_anchors(root.clone());
    trusts_roots(&mesh.server, 1).await;
    let removed = SystemTime::now();
    let closed = tokio::join!(closed_at(&orphaned[0]), closed_at(&orphaned[1]));
    for (at, version) in [closed.0, closed.1].into_iter().zip(["HTTP/1.1", "HTTP/2"]) {
        let after = at.duration_since(removed).unwrap_or_default();
        eprintln!("{version} closed {after:?} after the server proxy dropped its root");
        assert!(after < Duration::from_secs(1), "{version}: {after:?}");
    }
    // The valid caller's connection was never touched.
    for _ in 0..3 {
        let rsp = kept.get("api.demo", "/").await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
    }
    assert!(
        mesh.server.sum(
            "outrider_errors_total",
            &[("direction", "inbound"), ("reason", "denied")]
        ) >= 4.0
    );
}

/// A body that sends one chunk, then nothing, ever.
struct Stalls(bool);

impl hyper::body::Body for Stalls {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if self.0 {
            return std::task::Poll::Pending;
        }
        self.0 = true;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
            b"first chunk",
        )))))
    }
}

/// An upstream that reads a POST's whole body before answering, and answers a GET with a body
/// that stalls after its first chunk.
async fn start_stalling_upstream() -> SocketAddr {
    use http_body_util::BodyExt;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let body = if req.method() == http::Method::POST {
                            let _ = req.into_body().collect().await;
                            http_body_util::Either::Left(http_body_util::Full::new(
                                Bytes::from_static(b"read"),
                            ))
                        } else {
                            http_body_util::Either::Right(Stalls(false))
                        };
                        Ok::<_, std::convert::Infallible>(http::Response::new(body))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_stalled_http2_body_ends_at_the_stream_idle_timeout() {
    use http_body_util::BodyExt;
    let upstream = start_stalling_upstream().await;
    let (listen, _, stop) = forward_proxy(upstream, |c| {
        c.stream_idle_timeout = Duration::from_millis(300);
    })
    .await;
    let io = TokioIo::new(TcpStream::connect(listen).await.unwrap());
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    // A stalled upload: the stream ends (reset or an error answer) instead of waiting forever.
    type Either = http_body_util::Either<Stalls, http_body_util::Full<Bytes>>;
    let req = http::Request::post("http://a/upload")
        .body(Either::Left(Stalls(false)))
        .unwrap();
    let upload = tokio::time::timeout(Duration::from_secs(10), send.send_request(req)).await;
    match upload {
        Ok(Ok(rsp)) => assert_ne!(rsp.status(), StatusCode::OK, "the upload never completed"),
        Ok(Err(_)) => {}
        Err(_) => panic!("a stalled upload held its stream for 10 s"),
    }
    // A stalled download: the response body fails after its first chunk.
    let req = http::Request::get("http://a/download")
        .body(Either::Right(http_body_util::Full::new(Bytes::new())))
        .unwrap();
    let rsp = send.send_request(req).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    let read = tokio::time::timeout(Duration::from_secs(10), rsp.into_body().collect()).await;
    assert!(
        matches!(read, Ok(Err(_))),
        "a stalled download held its stream: {read:?}"
    );
    // The connection still serves other streams.
    let req = http::Request::post("http://a/upload")
        .body(Either::Right(http_body_util::Full::new(
            Bytes::from_static(b"whole"),
        )))
        .unwrap();
    let rsp = send.send_request(req).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    stop.trigger("test over");
}

/// The README's root rotation, with the real binaries: a TLS control plane whose issuer files and
/// bundle change under a running proxy (certificates living 4 s), which keeps its control
/// connection and renews through every step without anyone touching its `--trust-anchors`.
#[test]
fn a_root_rotation_reaches_a_running_proxys_control_connection() {
    use crate::control::{
        ca_flags, ca_init, get, metric, start_app, start_control_with, start_proxy, wait_until,
        OUTRIDER,
    };
    let dir = crate::support::TempDir::new();
    let (old, new, live) = (
        dir.path().join("old"),
        dir.path().join("new"),
        dir.path().join("live"),
    );
    ca_init(&old);
    ca_init(&new);
    std::fs::create_dir_all(&live).unwrap();
    for f in ["root.pem", "issuer.pem", "issuer-key.pem", "token.key"] {
        std::fs::copy(old.join(f), live.join(f)).unwrap();
    }
    let proxy_anchors = dir.path().join("proxy-anchors.pem");
    std::fs::copy(old.join("root.pem"), &proxy_anchors).unwrap();
    let mut flags = ca_flags(&live);
    flags.extend(["--cert-lifetime".into(), "4s".into()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (cp, control) = start_control_with(None, None, &flags);
    let token = crate::support::run_ok(std::process::Command::new(OUTRIDER).args([
        "control",
        "token",
        "--token-key",
        &live.join("token.key").display().to_string(),
        "--namespace",
        "demo",
        "--service-account",
        "loadgen",
    ]));
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token.trim()).unwrap();
    let (app, _app) = start_app("app");
    let url = format!("https://{cp}");
    let (_proxy, addrs) = start_proxy(&[
        "--forward",
        &format!("127.0.0.1:0=127.0.0.1:{app}"),
        "--control",
        &url,
        "--trust-anchors",
        &proxy_anchors.display().to_string(),
        "--workload",
        "demo/loadgen",
        "--identity-token-file",
        &token_file.display().to_string(),
    ]);
    let admin = addrs.admin;
    let within = Duration::from_secs(30);
    wait_until("ready over TLS with a certificate", within, || {
        get(admin, "/ready").status == 200
    });
    let renewed = || {
        metric(
            admin,
            "outrider_identity_certify_total",
            &[("result", "ok")],
        )
    };
    let renew_twice = |step: &str| {
        let from = renewed();
        wait_until(&format!("{step}: two renewals"), within, || {
            renewed() >= from + 2.0
        });
        assert_eq!(get(admin, "/ready").status, 200, "{step}");
    };
    let both = format!(
        "{}{}",
        std::fs::read_to_string(old.join("root.pem")).unwrap(),
        std::fs::read_to_string(new.join("root.pem")).unwrap()
    );
    // 1. The new root joins the bundle.
    std::fs::write(live.join("root.pem"), &both).unwrap();
    renew_twice("step 1");
    // 2. The new issuer signs, the control plane's serving certificate included.
    for f in ["issuer-key.pem", "issuer.pem"] {
        std::fs::copy(new.join(f), live.join(f)).unwrap();
    }
    // The control plane restarts (as a pod does), so the proxy's pooled connections are gone
    // and it must verify the new serving certificate.
    drop(control);
    let (_, _control) = start_control_with(None, Some(cp.port()), &flags);
    renew_twice("step 2");
    // 3. The old root leaves the bundle.
    std::fs::copy(new.join("root.pem"), live.join("root.pem")).unwrap();
    renew_twice("step 3");
    let identity = get(admin, "/identity").body;
    assert!(identity.contains("\"trust_anchors\": 1"), "{identity}");
    assert_eq!(
        metric(admin, "outrider_control_connected", &[]),
        1.0,
        "the watch is connected"
    );
}

#[tokio::test]
async fn a_client_that_closes_without_a_byte_makes_no_upstream_connection() {
    let (echo, accepted) = start_echo().await;
    let (listen, _, stop) = forward_proxy(echo, |c| {
        c.detect_timeout = Duration::from_millis(200);
    })
    .await;
    for _ in 0..5 {
        let mut s = TcpStream::connect(listen).await.unwrap();
        s.shutdown().await.unwrap();
        closed_within(&mut s).await;
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a FIN-only client is closed, not forwarded (a loop through an alias would multiply it)"
    );
    // A client that speaks is still forwarded.
    let mut s = TcpStream::connect(listen).await.unwrap();
    crate::support::echoes(&mut s, b"\x00hello").await;
    stop.trigger("test over");
}

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// With a low open-file limit, idle clients fill the connection limit the proxy derives from it,
/// not every descriptor: the admin server keeps answering.
#[test]
fn with_a_low_open_file_limit_the_admin_server_keeps_answering() {
    use crate::control::{get, start_app, OUTRIDER};
    let (app, _app) = start_app("app");
    let mut proxy = crate::support::ChildGuard::spawn(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n 200 && exec {OUTRIDER} proxy --forward 127.0.0.1:0=127.0.0.1:{app} --admin 127.0.0.1:0 --detect-timeout 100ms"
            ))
            .env("OUTRIDER_LOG", "info")
            .env("OUTRIDER_LOG_FORMAT", "json"),
        "proxy",
    );
    let addrs = crate::support::proxy_addrs(&mut proxy, Duration::from_secs(10));
    assert!(
        proxy.stderr().contains("lowered it"),
        "the limit was fitted: {}",
        proxy.stderr()
    );
    // 250 clients that start a request and never finish its head: each accepted one holds a
    // descriptor until the header timeout. Those the proxy does not accept wait in the kernel's
    // backlog (or give up after 500 ms once it is full).
    let forward = addrs.forwards[0];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let clients = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..250 {
            set.spawn(async move {
                let connect = async {
                    let mut s = TcpStream::connect(forward).await?;
                    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").await?;
                    Ok::<_, std::io::Error>(s)
                };
                tokio::time::timeout(Duration::from_millis(500), connect).await
            });
        }
        let mut clients = Vec::new();
        while let Some(done) = set.join_next().await {
            if let Ok(Ok(Ok(s))) = done {
                clients.push(s);
            }
        }
        clients
    });
    assert!(clients.len() >= 100, "{} clients connected", clients.len());
    let pid = proxy.pid();
    crate::control::wait_until(
        "the proxy holds the clients it accepts",
        Duration::from_secs(10),
        || open_fds(pid) >= 36,
    );
    let live = get(addrs.admin, "/live");
    assert_eq!(live.status, 200, "{}", live.body);
    assert!(
        open_fds(pid) < 200,
        "descriptors to spare: {}",
        open_fds(pid)
    );
    drop(clients);
}
