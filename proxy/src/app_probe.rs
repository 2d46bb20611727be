//! The app's probes and lifecycle hooks, answered through the admin port:
//! `GET /app-probe/<container>/<kind>`.
//!
//! In Kubernetes, the kubelet probes the pod's address from outside the mesh; the inbound
//! listener would accept a TCP probe for a dead app (the proxy is listening) and, under strict
//! mTLS, refuse an HTTP or gRPC one. `outrider inject` rewrites each liveness, readiness and
//! startup probe and each `postStart`/`preStop` hook of the app (`httpGet` over HTTP or HTTPS,
//! `tcpSocket`, `grpc`) to `GET :15020/app-probe/<container>/<kind>` and hands the proxy the
//! original targets as JSON in `OUTRIDER_APP_PROBES` (an [`AppProbes`] table keyed
//! `<container>/<kind>`). The admin server performs the original check against
//! `127.0.0.1:<port>` within [`PROBE_TIMEOUT`], as the kubelet would:
//!
//! - HTTP and HTTPS: a GET of the path with the probe's headers, which replace the forwarder's
//!   own `Host`, `User-Agent` and `Accept` (exactly one of each reaches the app); HTTPS without
//!   certificate verification, as the kubelet does. The answer carries the app's status.
//! - TCP: a connection is opened and closed: 200 if the app accepted it.
//! - gRPC: `grpc.health.v1.Health/Check` over HTTP/2 without TLS: 200 if the app answers
//!   `SERVING`.
//!
//! An unknown probe is 404; an app that cannot be reached, fails the check or does not answer in
//! time is 503, so the kubelet counts a failure, never a success.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf as _, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use outrider_control::runtime::text;

use crate::identity::tls::{CheckedBy, ServerCertCheck};

/// The environment variable that carries the probe table (JSON).
pub const ENV: &str = "OUTRIDER_APP_PROBES";

/// How long one forwarded probe may take, connect included. The kubelet's own timeout (1 s by
/// default) usually ends it first.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The forwarder's `User-Agent` unless the probe sets one.
pub const USER_AGENT: &str = "kube-probe (via outrider)";

/// Probe targets by `<container>/<kind>` (`app/liveness`, `app/readiness`, `app/startup`,
/// `app/post-start`, `app/pre-stop`).
pub type AppProbes = BTreeMap<String, AppProbe>;

/// What a probe checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// `httpGet` over plain HTTP/1.1.
    #[default]
    Http,
    /// `httpGet` with `scheme: HTTPS`: TLS, the certificate not verified (as the kubelet).
    Https,
    /// `tcpSocket`: the app accepts a connection.
    Tcp,
    /// `grpc`: the gRPC health service answers `SERVING`.
    Grpc,
}

impl ProbeKind {
    fn is_http(&self) -> bool {
        *self == ProbeKind::Http
    }
}

/// One probe of the app, as its pod spec wrote it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppProbe {
    /// What it checks (absent: HTTP).
    #[serde(default, skip_serializing_if = "ProbeKind::is_http")]
    pub kind: ProbeKind,
    /// The app's port on loopback.
    pub port: u16,
    /// HTTP(S): path and query, starting with `/`; empty for TCP and gRPC.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// gRPC: the service name asked about (absent: the server as a whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// HTTP(S): request headers (`Host`, `User-Agent` and `Accept` replace the forwarder's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ProbeHeader>,
}

/// A request header of a probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeHeader {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: String,
}

/// Parses the table (the value of [`ENV`]); every probe needs a port, HTTP(S) ones an absolute
/// path and valid headers.
pub fn parse(json: &str) -> Result<AppProbes, String> {
    let table: AppProbes =
        serde_json::from_str(json).map_err(|e| format!("not a probe table: {e}"))?;
    for (key, probe) in &table {
        if probe.port == 0 {
            return Err(format!("probe {key}: needs a port"));
        }
        if matches!(probe.kind, ProbeKind::Http | ProbeKind::Https) {
            if !probe.path.starts_with('/') {
                return Err(format!("probe {key}: needs a path starting with `/`"));
            }
            headers(probe).map_err(|e| format!("probe {key}: {e}"))?;
        }
    }
    Ok(table)
}

/// Performs one probe against the app on loopback and answers the kubelet.
pub async fn forward(probe: &AppProbe) -> Response<Full<Bytes>> {
    match tokio::time::timeout(PROBE_TIMEOUT, check(probe)).await {
        Ok(Ok((status, message))) => text(status, message),
        Ok(Err(e)) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("app probe failed: {e}\n"),
        ),
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("app probe timed out after {PROBE_TIMEOUT:?}\n"),
        ),
    }
}

async fn check(probe: &AppProbe) -> Result<(StatusCode, String), String> {
    let addr = ("127.0.0.1", probe.port);
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect to 127.0.0.1:{}: {e}", probe.port))?;
    let answered = |status: StatusCode| (status, format!("app answered {}\n", status.as_u16()));
    match probe.kind {
        ProbeKind::Tcp => {
            drop(stream);
            Ok((
                StatusCode::OK,
                format!("app accepted a connection on port {}\n", probe.port),
            ))
        }
        ProbeKind::Http => http_get(stream, probe).await.map(answered),
        ProbeKind::Https => {
            let config = rustls::ClientConfig::builder_with_provider(no_verify_provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(CheckedBy::with(
                    Arc::new(AnyCertificate),
                    no_verify_provider(),
                )))
                .with_no_client_auth();
            let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            http_get(tls, probe).await.map(answered)
        }
        ProbeKind::Grpc => grpc_health(stream, probe).await,
    }
}

/// The request headers: the probe's own, then `Host`, `User-Agent` and `Accept` where it set
/// none (the kubelet's rule: the probe's win, and only one of each is sent).
fn headers(probe: &AppProbe) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for h in &probe.headers {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("bad header name {:?}", h.name))?;
        let value = HeaderValue::from_str(&h.value)
            .map_err(|_| format!("bad value for header {}", h.name))?;
        if name == http::header::HOST && map.contains_key(&name) {
            continue; // one Host only: the first, as Go's client sends
        }
        map.append(name, value);
    }
    let defaults = [
        (http::header::HOST, format!("127.0.0.1:{}", probe.port)),
        (http::header::USER_AGENT, USER_AGENT.to_owned()),
        (http::header::ACCEPT, "*/*".to_owned()),
    ];
    for (name, value) in defaults {
        if !map.contains_key(&name) {
            let value = HeaderValue::from_str(&value).map_err(|e| e.to_string())?;
            map.insert(name, value);
        }
    }
    Ok(map)
}

async fn http_get<S>(io: S, probe: &AppProbe) -> Result<StatusCode, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let mut req = Request::get(probe.path.as_str())
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad probe request: {e}"))?;
    *req.headers_mut() = headers(probe)?;
    let rsp = send
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    conn.abort();
    Ok(rsp.status())
}

/// `grpc.health.v1.Health/Check` for `probe.service` over HTTP/2 without TLS (the kubelet's
/// gRPC probe); 200 for `SERVING`.
async fn grpc_health(stream: TcpStream, probe: &AppProbe) -> Result<(StatusCode, String), String> {
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    // HealthCheckRequest { string service = 1; } in a gRPC frame (uncompressed, length-prefixed).
    let service = probe.service.as_deref().unwrap_or_default().as_bytes();
    let mut message = Vec::with_capacity(service.len() + 6);
    if !service.is_empty() {
        message.push(0x0a);
        push_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service);
    }
    let len = u32::try_from(message.len()).map_err(|_| "service name too long".to_owned())?;
    let mut frame = vec![0u8];
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&message);
    let req = Request::post(format!(
        "http://127.0.0.1:{}/grpc.health.v1.Health/Check",
        probe.port
    ))
    .header(http::header::CONTENT_TYPE, "application/grpc")
    .header(http::header::TE, "trailers")
    .header(http::header::USER_AGENT, USER_AGENT)
    .body(Full::new(Bytes::from(frame)))
    .map_err(|e| format!("bad probe request: {e}"))?;
    let rsp = send
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if rsp.status() != StatusCode::OK {
        conn.abort();
        return Err(format!("app answered HTTP {}", rsp.status().as_u16()));
    }
    let mut grpc_status = rsp.headers().get("grpc-status").cloned();
    let collected = rsp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("response: {e}"))?;
    conn.abort();
    if let Some(s) = collected.trailers().and_then(|t| t.get("grpc-status")) {
        grpc_status = Some(s.clone());
    }
    let code = grpc_status
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .unwrap_or("missing");
    if code != "0" {
        return Err(format!("grpc-status {code}"));
    }
    let mut body = collected.to_bytes();
    if body.len() < 5 {
        return Err("no HealthCheckResponse".into());
    }
    body.advance(5);
    match health_status(&body) {
        Some(1) => Ok((StatusCode::OK, "app is SERVING\n".into())),
        Some(s) => Err(format!("app is {}", status_name(s))),
        None => Err("HealthCheckResponse does not parse".into()),
    }
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// `HealthCheckResponse.status` (field 1, an enum): 0 when absent, as protobuf defaults it.
fn health_status(mut buf: &[u8]) -> Option<u64> {
    let mut status = 0;
    while !buf.is_empty() {
        let key = read_varint(&mut buf)?;
        match key & 7 {
            0 => {
                let v = read_varint(&mut buf)?;
                if key >> 3 == 1 {
                    status = v;
                }
            }
            1 => buf = buf.get(8..)?,
            2 => {
                let n = usize::try_from(read_varint(&mut buf)?).ok()?;
                buf = buf.get(n..)?;
            }
            5 => buf = buf.get(4..)?,
            _ => return None,
        }
    }
    Some(status)
}

fn status_name(s: u64) -> String {
    match s {
        0 => "UNKNOWN".into(),
        2 => "NOT_SERVING".into(),
        3 => "SERVICE_UNKNOWN".into(),
        other => format!("in status {other}"),
    }
}

/// The probe's TLS: every protocol version and cipher suite `ring` offers (apps are not the
/// mesh: TLS 1.2 servers are probed too).
fn no_verify_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The kubelet does not verify an HTTPS probe's certificate; neither does the forwarder. The
/// handshake's signatures are still checked (the connection is real TLS).
#[derive(Debug)]
struct AnyCertificate;

impl ServerCertCheck for AnyCertificate {
    fn check(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<(), rustls::Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    /// Reads one request head from `s` and answers `status`; hands back the head.
    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, status: u16) -> String {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before a request head");
            head.extend_from_slice(&buf[..n]);
        }
        let rsp = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
        s.write_all(rsp.as_bytes()).await.unwrap();
        s.flush().await.unwrap();
        String::from_utf8(head).unwrap()
    }

    /// A one-shot app: answers `status` and hands back the request head it read.
    async fn app(status: u16) -> (u16, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            answer(s, status).await
        });
        (port, task)
    }

    /// A port nothing listens on (bound, then released).
    async fn closed_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    }

    fn http(port: u16, path: &str, headers: &[(&str, &str)]) -> AppProbe {
        AppProbe {
            port,
            path: path.into(),
            headers: headers
                .iter()
                .map(|(n, v)| ProbeHeader {
                    name: (*n).into(),
                    value: (*v).into(),
                })
                .collect(),
            ..AppProbe::default()
        }
    }

    async fn body(rsp: Response<Full<Bytes>>) -> String {
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }

    fn header_lines<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
        head.lines()
            .filter(|l| {
                l.split_once(':')
                    .is_some_and(|(n, _)| n.eq_ignore_ascii_case(name))
            })
            .collect()
    }

    #[tokio::test]
    async fn forwards_path_headers_and_status() {
        for status in [200, 500] {
            let (port, head) = app(status).await;
            let probe = http(port, "/healthz?full=1", &[("X-Probe", "yes")]);
            let rsp = forward(&probe).await;
            assert_eq!(rsp.status().as_u16(), status);
            let head = head.await.unwrap().to_ascii_lowercase();
            assert!(head.starts_with("get /healthz?full=1 http/1.1"), "{head}");
            assert!(head.contains("x-probe: yes"), "{head}");
            assert_eq!(
                header_lines(&head, "host"),
                [format!("host: 127.0.0.1:{port}")]
            );
            assert_eq!(
                header_lines(&head, "user-agent"),
                ["user-agent: kube-probe (via outrider)"]
            );
        }
    }

    #[tokio::test]
    async fn the_probes_host_and_user_agent_replace_the_forwarders() {
        let (port, head) = app(200).await;
        let probe = http(
            port,
            "/",
            &[
                ("Host", "www.example.com"),
                ("user-agent", "my-probe"),
                ("X-A", "1"),
                ("X-A", "2"),
                ("HOST", "second.example.com"),
            ],
        );
        assert_eq!(forward(&probe).await.status(), StatusCode::OK);
        let head = head.await.unwrap();
        assert_eq!(header_lines(&head, "host").len(), 1, "{head}");
        assert!(
            header_lines(&head, "host")[0].ends_with(": www.example.com"),
            "{head}"
        );
        assert_eq!(header_lines(&head, "user-agent").len(), 1, "{head}");
        assert!(
            header_lines(&head, "user-agent")[0].ends_with(": my-probe"),
            "{head}"
        );
        assert_eq!(header_lines(&head, "x-a").len(), 2, "{head}");
    }

    #[tokio::test]
    async fn an_app_that_is_down_fails_the_probe() {
        for kind in [
            ProbeKind::Http,
            ProbeKind::Https,
            ProbeKind::Tcp,
            ProbeKind::Grpc,
        ] {
            let probe = AppProbe {
                kind,
                ..http(closed_port().await, "/", &[])
            };
            let rsp = forward(&probe).await;
            assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE, "{kind:?}");
            assert!(body(rsp).await.contains("connect to 127.0.0.1"), "{kind:?}");
        }
    }

    #[tokio::test]
    async fn a_tcp_probe_passes_only_when_the_app_accepts() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let probe = AppProbe {
            kind: ProbeKind::Tcp,
            port,
            ..AppProbe::default()
        };
        let (rsp, accepted) = tokio::join!(forward(&probe), listener.accept());
        assert_eq!(rsp.status(), StatusCode::OK);
        assert!(accepted.is_ok());
        drop(listener);
        assert_eq!(
            forward(&probe).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[tokio::test]
    async fn an_https_probe_speaks_tls_without_verifying_the_certificate() {
        // A self-signed certificate for a name that is not 127.0.0.1: the kubelet accepts it.
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["app.invalid".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let server = rustls::ServerConfig::builder_with_provider(no_verify_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(s).await.unwrap();
            answer(tls, 204).await
        });
        let probe = AppProbe {
            kind: ProbeKind::Https,
            ..http(port, "/tls", &[("Host", "app.example.com")])
        };
        let rsp = forward(&probe).await;
        assert_eq!(rsp.status(), StatusCode::NO_CONTENT);
        let head = app.await.unwrap();
        assert!(head.starts_with("GET /tls HTTP/1.1"), "{head}");
        assert_eq!(header_lines(&head, "host"), ["host: app.example.com"]);
        // A plain-HTTP app behind an HTTPS probe fails it.
        let (port, _plain) = app_plain().await;
        let probe = AppProbe {
            kind: ProbeKind::Https,
            ..http(port, "/", &[])
        };
        let rsp = forward(&probe).await;
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(body(rsp).await.contains("TLS handshake"));
    }

    async fn app_plain() -> (u16, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 400 Bad\r\ncontent-length: 0\r\n\r\n")
                .await;
        });
        (port, task)
    }

    /// A gRPC health server (HTTP/2 without TLS) answering `status` for any service; hands back
    /// the request's path and message.
    async fn grpc_app(status: u8) -> (u16, tokio::task::JoinHandle<(String, Vec<u8>)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let tx = tx.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    let message = req.into_body().collect().await.unwrap().to_bytes();
                    let _ = tx.send((path, message.to_vec()));
                    let frame = Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]);
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static("0"));
                    let body = http_body_util::StreamBody::new(futures_stream(frame, trailers));
                    let rsp = Response::builder()
                        .header("content-type", "application/grpc")
                        .body(body)
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(rsp)
                }
            });
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), service);
            // Served until the forwarder closes the connection, so the answer is not cut.
            let _ = conn.await;
            rx.recv().await.unwrap()
        });
        (port, task)
    }

    fn futures_stream(
        data: Bytes,
        trailers: HeaderMap,
    ) -> impl futures_util::Stream<Item = Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>
    {
        futures_util::stream::iter([
            Ok(hyper::body::Frame::data(data)),
            Ok(hyper::body::Frame::trailers(trailers)),
        ])
    }

    #[tokio::test]
    async fn a_grpc_probe_asks_the_health_service() {
        let (port, got) = grpc_app(1).await;
        let probe = AppProbe {
            kind: ProbeKind::Grpc,
            port,
            service: Some("payments".into()),
            ..AppProbe::default()
        };
        let rsp = forward(&probe).await;
        assert_eq!(rsp.status(), StatusCode::OK);
        let (path, message) = got.await.unwrap();
        assert_eq!(path, "/grpc.health.v1.Health/Check");
        // The frame: uncompressed, 10 bytes: field 1 (service) = "payments".
        assert_eq!(message, b"\0\0\0\0\x0a\x0a\x08payments");
        // NOT_SERVING fails the probe and says so.
        let (port, _) = grpc_app(2).await;
        let probe = AppProbe {
            kind: ProbeKind::Grpc,
            port,
            ..AppProbe::default()
        };
        let rsp = forward(&probe).await;
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(body(rsp).await.contains("NOT_SERVING"));
        // An HTTP/1 app behind a gRPC probe fails it.
        let (port, _) = app_plain().await;
        let probe = AppProbe {
            kind: ProbeKind::Grpc,
            port,
            ..AppProbe::default()
        };
        assert_eq!(
            forward(&probe).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn parse_checks_the_table() {
        let t = parse(r#"{"app/liveness":{"port":8080,"path":"/live"},"app/readiness":{"kind":"tcp","port":80},"db/startup":{"kind":"grpc","port":9,"service":"s"}}"#).unwrap();
        assert_eq!(t["app/liveness"].port, 8080);
        assert_eq!(t["app/liveness"].kind, ProbeKind::Http);
        assert_eq!(t["app/readiness"].kind, ProbeKind::Tcp);
        assert_eq!(t["db/startup"].service.as_deref(), Some("s"));
        assert!(parse(r#"{"app/liveness":{"port":0,"path":"/"}}"#).is_err());
        assert!(parse(r#"{"app/liveness":{"port":80,"path":"x"}}"#).is_err());
        assert!(parse(r#"{"app/liveness":{"kind":"https","port":80}}"#).is_err());
        assert!(parse(r#"{"app/liveness":{"kind":"udp","port":80}}"#).is_err());
        assert!(
            parse(r#"{"a/l":{"port":80,"path":"/","headers":[{"name":"a b","value":"x"}]}}"#)
                .is_err()
        );
        assert!(parse("[]").is_err());
        // What inject writes for an HTTP probe is unchanged by the new fields.
        let json = serde_json::to_string(&http(80, "/", &[])).unwrap();
        assert_eq!(json, r#"{"port":80,"path":"/"}"#);
    }
}
