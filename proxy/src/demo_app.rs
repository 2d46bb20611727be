//! The demo's built-in application ("payments-api"): a small HTTP/1.1 + h2c server used by
//! `outrider demo`, by the end-to-end tests (as `outrider demo-app`) and by the in-process tests.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /slow?ms=N` | waits N ms (at most 60 000), then 200 |
//! | `GET /status/NNN` | status NNN |
//! | `GET /trailers` | 200 with a `grpc-status: 0` trailer (HTTP/2) |
//! | `POST /echo` | the request body, streamed back |
//! | `Upgrade: <anything>` | 101, then every byte echoed until the client closes |
//! | `CONNECT host:port` | 200, then every byte echoed (a tunnel to an echo server) |
//! | anything else | 200, a JSON line naming the service, instance, protocol and path |

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// Serves the demo app on `listener` forever; `instance` names this copy in every answer.
pub async fn serve(listener: TcpListener, instance: String) {
    let instance: Arc<str> = instance.into();
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = socket.set_nodelay(true);
        let instance = instance.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(req, instance.clone()));
            let builder = auto::Builder::new(TokioExecutor::new());
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(socket), svc)
                .await;
        });
    }
}

async fn handle(
    mut req: Request<Incoming>,
    instance: Arc<str>,
) -> Result<Response<Body>, Infallible> {
    if req.method() == http::Method::CONNECT {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        return Ok(Response::new(full(Bytes::new())));
    }
    if req.headers().contains_key(header::UPGRADE) {
        let protocol = req
            .headers()
            .get(header::UPGRADE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("echo"));
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut rsp = Response::new(full(Bytes::new()));
        *rsp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        rsp.headers_mut().insert(header::UPGRADE, protocol);
        rsp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        return Ok(rsp);
    }
    let path = req.uri().path().to_string();
    if path == "/echo" {
        return Ok(Response::new(req.into_body().boxed()));
    }
    if path == "/slow" {
        let ms = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(100)
            .min(60_000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let status = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
        let mut rsp = Response::new(full(format!("status {}\n", status.as_u16())));
        *rsp.status_mut() = status;
        return Ok(rsp);
    }
    let body = format!(
        "{{\"service\":\"payments-api\",\"instance\":\"{instance}\",\"protocol\":\"{:?}\",\"path\":{:?}}}\n",
        req.version(),
        path
    );
    let mut rsp = if path == "/trailers" {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        Response::new(
            Full::new(Bytes::from(body))
                .map_err(|never: Infallible| match never {})
                .with_trailers(async move { Some(Ok(trailers)) })
                .boxed(),
        )
    } else {
        Response::new(full(body))
    };
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    rsp.headers_mut().insert(
        "x-instance",
        HeaderValue::from_str(&instance).unwrap_or(HeaderValue::from_static("demo")),
    );
    Ok(rsp)
}

/// Runs the app alone on `listen` until SIGTERM or Ctrl-C (`outrider demo-app`).
pub fn main(listen: std::net::SocketAddr, instance: String) -> std::process::ExitCode {
    outrider_control::runtime::block_on("outrider demo-app", 1, async move {
        let listener = match TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("outrider demo-app: cannot bind {listen}: {e}");
                return std::process::ExitCode::from(1);
            }
        };
        eprintln!("outrider demo-app: listening on {listen}");
        tokio::select! {
            () = serve(listener, instance) => {}
            () = outrider_control::runtime::shutdown_signal() => {}
        }
        std::process::ExitCode::SUCCESS
    })
}
