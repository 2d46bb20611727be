//! `outrider analyze --status FILE --admin URL`: what the Outrider proxy says about itself.
//!
//! Reads the proxy's admin endpoints over plain HTTP/1.1 (`kubectl port-forward POD 15020`
//! first): `/ready` (200, or 503 naming what readiness waits for: the first certificate, the
//! first config from the control plane, the listeners) and `/identity` (the SPIFFE identity and
//! its validity, or that it still waits for the first certificate). Each request is bounded by
//! [`TIMEOUT`] and each body by [`MAX_BODY`]; an admin server that cannot be reached is itself a
//! finding, never a failure of the command.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;

use super::{Finding, Severity};

/// How long one request to the admin server may take (connect and answer).
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// The largest admin answer read, in bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// Findings from the admin server at `url`; `before` are the status findings (the proxy
/// finding is worded for the pod they name).
pub fn findings(url: &http::Uri, before: &[Finding]) -> Vec<Finding> {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return vec![unreachable(url, &format!("no runtime: {e}"))],
    };
    let object = before
        .iter()
        .find(|f| f.object.starts_with("Pod "))
        .map_or_else(|| format!("proxy {url}"), |f| f.object.clone());
    runtime.block_on(async {
        let ready = get(url, "/ready").await;
        let identity = get(url, "/identity").await;
        let mut out = Vec::new();
        match ready {
            Err(e) => out.push(unreachable(url, &e)),
            Ok((200, _)) => out.push(finding(
                Severity::Info,
                "proxy-ready",
                &object,
                url,
                "/ready",
                [
                    "the proxy is ready (/ready answers 200)".into(),
                    "it has its certificate and the control plane's view".into(),
                    "if the pod still waits, the app or another container holds it (see \
                        above)"
                        .into(),
                ],
            )),
            Ok((status, body)) => {
                let body = body.trim();
                let what = body.strip_prefix("not ready: ").unwrap_or(body);
                let why = if what.contains("certificate") {
                    "no certificate yet: the control plane has not signed the proxy's CSR \
                        (unreachable, or it refused the bootstrap token)"
                } else if what.contains("control plane") {
                    "no view yet: the control plane is unreachable from the pod, or has not \
                        answered the first watch"
                } else if what.contains("draining") {
                    "the proxy is shutting down (SIGTERM or /shutdown)"
                } else {
                    "the proxy holds readiness back until everything named is in place"
                };
                out.push(finding(
                    Severity::Error,
                    "proxy-not-ready",
                    &object,
                    url,
                    "/ready",
                    [
                        format!("the proxy's /ready answers {status}: {what}"),
                        why.into(),
                        "check the control plane: `kubectl -n outrider-system get pods,svc \
                            outrider-control`, then the proxy's log (`kubectl logs POD -c \
                            outrider-proxy`)"
                            .into(),
                    ],
                ));
            }
        }
        if let Ok((200, body)) = identity {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let id = json.get("identity").and_then(serde_json::Value::as_str);
            let state = json.get("state").and_then(serde_json::Value::as_str);
            let message = match (id, state) {
                (Some(id), _) => {
                    let left = json
                        .get("expires_in_seconds")
                        .and_then(serde_json::Value::as_u64)
                        .map_or(String::new(), |s| format!(", expires in {s}s"));
                    format!("the proxy's identity is {id}{left}")
                }
                (None, Some(state)) => format!("the proxy has no identity: {state}"),
                (None, None) => "the proxy's /identity answer is not what Outrider writes".into(),
            };
            out.push(finding(
                if id.is_some() {
                    Severity::Info
                } else {
                    Severity::Warning
                },
                "proxy-identity",
                &object,
                url,
                "/identity",
                [
                    message,
                    "without a certificate the proxy cannot originate or accept mTLS: meshed \
                        peers refuse it"
                        .into(),
                    "an identity is issued by the control plane for the pod's service \
                        account; see the control plane's log"
                        .into(),
                ],
            ));
        }
        out
    })
}

fn finding(
    severity: Severity,
    check: &'static str,
    object: &str,
    url: &http::Uri,
    path: &str,
    texts: [String; 3],
) -> Finding {
    let [message, why, fix] = texts;
    Finding {
        severity,
        check,
        object: object.to_owned(),
        document: format!("admin {url}"),
        path: path.to_owned(),
        message,
        why,
        fix,
    }
}

fn unreachable(url: &http::Uri, e: &str) -> Finding {
    finding(
        Severity::Error,
        "proxy-unreachable",
        &format!("proxy {url}"),
        url,
        "/ready",
        [
            format!("the proxy's admin server does not answer: {e}"),
            "either the proxy is not running (see its container above), or the \
                port-forward is not up"
                .into(),
            "`kubectl port-forward pod/POD 15020 -n NS`, then run again with `--admin \
                http://127.0.0.1:15020`"
                .into(),
        ],
    )
}

/// `GET path` on the admin server: the status and the body (as text, at most [`MAX_BODY`]).
async fn get(url: &http::Uri, path: &str) -> Result<(u16, String), String> {
    let host = url.host().unwrap_or_default().trim_matches(['[', ']']);
    let port = url.port_u16().unwrap_or(80);
    let work = async {
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("connect to {host}:{port}: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let conn = tokio::spawn(conn);
        let authority = url.authority().map_or("", |a| a.as_str());
        let req = http::Request::get(path)
            .header(http::header::HOST, authority)
            .header(http::header::USER_AGENT, "outrider-analyze")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("HTTP: {e}"))?;
        let rsp = send
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let status = rsp.status().as_u16();
        let body = Limited::new(rsp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        conn.abort();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| format!("no answer within {}s", TIMEOUT.as_secs()))?
}
