//! The app's HTTP probes, answered through the admin port: `GET /app-probe/<container>/<kind>`.
//!
//! In Kubernetes, the kubelet probes the pod's address from outside the mesh; under strict mTLS
//! the inbound listener would refuse it. `outrider inject` rewrites each HTTP liveness,
//! readiness and startup probe of the app to `GET :15020/app-probe/<container>/<kind>` and
//! hands the proxy the original targets as JSON in `OUTRIDER_APP_PROBES` (an [`AppProbes`]
//! table keyed `<container>/<kind>`). The admin server forwards each such GET to
//! `127.0.0.1:<port><path>` (plain HTTP/1.1, the original headers, [`PROBE_TIMEOUT`]) and
//! answers with the app's status. An unknown probe is 404; an app that cannot be reached or
//! does not answer in time is 503, so the kubelet counts a failure, never a success.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use outrider_control::runtime::text;

/// The environment variable that carries the probe table (JSON).
pub const ENV: &str = "OUTRIDER_APP_PROBES";

/// How long one forwarded probe may take, connect included. The kubelet's own timeout (1 s by
/// default) usually ends it first.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Probe targets by `<container>/<kind>` (`app/liveness`, `app/readiness`, `app/startup`).
pub type AppProbes = BTreeMap<String, AppProbe>;

/// One HTTP probe of the app, as its pod spec wrote it (plain HTTP only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppProbe {
    /// The app's port on loopback.
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
    /// Extra request headers.
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

/// Parses the table (the value of [`ENV`]); every probe needs a port and an absolute path.
pub fn parse(json: &str) -> Result<AppProbes, String> {
    let table: AppProbes =
        serde_json::from_str(json).map_err(|e| format!("not a probe table: {e}"))?;
    for (key, probe) in &table {
        if probe.port == 0 || !probe.path.starts_with('/') {
            return Err(format!(
                "probe {key}: needs a port and a path starting with `/`"
            ));
        }
    }
    Ok(table)
}

/// Forwards one probe to the app on loopback and answers with the app's status (body dropped).
pub async fn forward(probe: &AppProbe) -> Response<Full<Bytes>> {
    match tokio::time::timeout(PROBE_TIMEOUT, status(probe)).await {
        Ok(Ok(status)) => text(status, format!("app answered {}\n", status.as_u16())),
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

async fn status(probe: &AppProbe) -> Result<StatusCode, String> {
    let stream = TcpStream::connect(("127.0.0.1", probe.port))
        .await
        .map_err(|e| format!("connect to 127.0.0.1:{}: {e}", probe.port))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let mut req = Request::get(probe.path.as_str())
        .header(http::header::HOST, format!("127.0.0.1:{}", probe.port))
        .header(http::header::USER_AGENT, "kube-probe (via outrider)");
    for h in &probe.headers {
        req = req.header(h.name.as_str(), h.value.as_str());
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad probe request: {e}"))?;
    let rsp = send
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    conn.abort();
    Ok(rsp.status())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::BodyExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    /// A one-shot app: answers `status` and hands back the request head it read.
    async fn app(status: u16) -> (u16, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                head.extend_from_slice(&buf[..n]);
            }
            let rsp = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
            s.write_all(rsp.as_bytes()).await.unwrap();
            String::from_utf8(head).unwrap()
        });
        (port, task)
    }

    #[tokio::test]
    async fn forwards_path_headers_and_status() {
        for status in [200, 500] {
            let (port, head) = app(status).await;
            let probe = AppProbe {
                port,
                path: "/healthz?full=1".into(),
                headers: vec![ProbeHeader {
                    name: "X-Probe".into(),
                    value: "yes".into(),
                }],
            };
            let rsp = forward(&probe).await;
            assert_eq!(rsp.status().as_u16(), status);
            let head = head.await.unwrap().to_ascii_lowercase();
            assert!(head.starts_with("get /healthz?full=1 http/1.1"), "{head}");
            assert!(head.contains("x-probe: yes"), "{head}");
        }
    }

    #[tokio::test]
    async fn an_app_that_is_down_fails_the_probe() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        let probe = AppProbe {
            port,
            path: "/".into(),
            headers: vec![],
        };
        let rsp = forward(&probe).await;
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("connect to 127.0.0.1"));
    }

    #[test]
    fn parse_checks_the_table() {
        let t = parse(r#"{"app/liveness":{"port":8080,"path":"/live"}}"#).unwrap();
        assert_eq!(t["app/liveness"].port, 8080);
        assert!(parse(r#"{"app/liveness":{"port":0,"path":"/"}}"#).is_err());
        assert!(parse(r#"{"app/liveness":{"port":80,"path":"x"}}"#).is_err());
        assert!(parse("[]").is_err());
    }
}
