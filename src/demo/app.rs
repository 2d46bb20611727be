//! The demo's built-in application ("payments-api"): a small HTTP/1.1 + h2c server used by
//! `outrider demo`, by the end-to-end tests (as `outrider demo-app`) and by the in-process tests.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /slow?ms=N` | waits N ms (at most 60 000), then 200 |
//! | `GET /status/NNN` | status NNN |
//! | `GET /trailers` | 200 with a `grpc-status: 0` trailer (HTTP/2) |
//! | `POST /echo` | the request body, streamed back |
//! | `GET /headers` | the request line and headers as the app received them |
//! | `Upgrade: websocket` | a WebSocket (RFC 6455) echo: text and binary messages come back |
//! | `Upgrade: <anything else>` | 101, then every byte echoed until the client closes |
//! | `CONNECT host:port` | 200, then every byte echoed (a tunnel to an echo server) |
//! | anything else | 200, a JSON line naming the service, instance, protocol and path |

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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

/// Faults a copy of the app injects into its plain answers (`outrider demo --faults`): changed
/// while it runs.
#[derive(Debug, Default)]
pub struct Faults {
    /// Share of answers that are 503, in percent: of every ten answers in a row, the first
    /// `fail_percent / 10` fail. Runs rather than coin flips, so a breaker that opens after five
    /// failures in a row does open at 50%, however few requests a slow machine sends.
    pub fail_percent: AtomicU32,
    /// Answers given so far (what places an answer in its run of ten).
    pub answered: AtomicU64,
    /// Delay before every answer, in milliseconds.
    pub delay_ms: AtomicU64,
}

/// Serves the demo app on `listener` forever; `instance` names this copy in every answer.
pub async fn serve(listener: TcpListener, instance: String) {
    serve_with_faults(listener, instance, Arc::default()).await
}

/// [`serve`], answering plain requests with the `faults` of the moment.
pub async fn serve_with_faults(listener: TcpListener, instance: String, faults: Arc<Faults>) {
    let instance: Arc<str> = instance.into();
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = socket.set_nodelay(true);
        let (instance, faults) = (instance.clone(), faults.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                handle(req, instance.clone(), faults.clone())
            });
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
    faults: Arc<Faults>,
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
        let ws_accept = protocol
            .as_bytes()
            .eq_ignore_ascii_case(b"websocket")
            .then(|| {
                req.headers()
                    .get("sec-websocket-key")
                    .map(|k| websocket::accept(k.as_bytes()))
            })
            .flatten();
        let is_ws = ws_accept.is_some();
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                if is_ws {
                    let _ = websocket::echo(&mut r, &mut w).await;
                } else {
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            }
        });
        let mut rsp = Response::new(full(Bytes::new()));
        *rsp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        rsp.headers_mut().insert(header::UPGRADE, protocol);
        if let Some(accept) = ws_accept.and_then(|a| HeaderValue::from_str(&a).ok()) {
            rsp.headers_mut().insert("sec-websocket-accept", accept);
        }
        rsp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        return Ok(rsp);
    }
    let path = req.uri().path().to_string();
    if path == "/echo" {
        return Ok(Response::new(req.into_body().boxed()));
    }
    if path == "/headers" {
        let mut lines = format!("{:?} {}\n", req.version(), req.uri());
        for (name, value) in req.headers() {
            lines.push_str(&format!(
                "{name}: {}\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        return Ok(Response::new(full(lines)));
    }
    let delay = faults.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let nth = faults.answered.fetch_add(1, Ordering::Relaxed);
    if (nth % 10) * 10 < u64::from(faults.fail_percent.load(Ordering::Relaxed)) {
        let mut rsp = Response::new(full("injected failure (outrider demo --faults)\n"));
        *rsp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        if let Ok(v) = HeaderValue::from_str(&instance) {
            rsp.headers_mut().insert("x-instance", v);
        }
        return Ok(rsp);
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
    crate::runtime::block_on("outrider demo-app", 1, async move {
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
            () = crate::runtime::shutdown_signal() => {}
        }
        std::process::ExitCode::SUCCESS
    })
}

/// A minimal RFC 6455 WebSocket echo: enough of the protocol for the demo and the tests to use a
/// real WebSocket client through the proxies.
mod websocket {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    /// Largest message echoed.
    const MAX_PAYLOAD: u64 = 1 << 20;

    /// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
    pub fn accept(key: &[u8]) -> String {
        let mut sha = sha1_smol::Sha1::new();
        sha.update(key);
        sha.update(GUID.as_bytes());
        base64(&sha.digest().bytes())
    }

    fn base64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// Echoes data frames (unmasking the client's), answers pings, and returns on close.
    pub async fn echo<R, W>(r: &mut R, w: &mut W) -> std::io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            let mut head = [0u8; 2];
            r.read_exact(&mut head).await?;
            let opcode = head[0] & 0x0f;
            let masked = head[1] & 0x80 != 0;
            let len = match head[1] & 0x7f {
                126 => u64::from(r.read_u16().await?),
                127 => r.read_u64().await?,
                n => u64::from(n),
            };
            if len > MAX_PAYLOAD {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "message too large",
                ));
            }
            let mut mask = [0u8; 4];
            if masked {
                r.read_exact(&mut mask).await?;
            }
            let mut payload = vec![0u8; len as usize];
            r.read_exact(&mut payload).await?;
            if masked {
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
            }
            // Data frames (text, binary, continuation) come back as they came, fragments
            // included; ping gets pong; close gets close.
            let (fin, reply) = match opcode {
                0x8 => (0x80, 0x8),
                0x9 => (0x80, 0xA),
                0x0..=0x2 => (head[0] & 0x80, opcode),
                _ => continue,
            };
            let mut frame = vec![fin | reply];
            match payload.len() {
                n if n < 126 => frame.push(n as u8),
                n if n <= usize::from(u16::MAX) => {
                    frame.push(126);
                    frame.extend_from_slice(&(n as u16).to_be_bytes());
                }
                n => {
                    frame.push(127);
                    frame.extend_from_slice(&(n as u64).to_be_bytes());
                }
            }
            frame.extend_from_slice(&payload);
            w.write_all(&frame).await?;
            if opcode == 0x8 {
                return w.shutdown().await;
            }
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn accept_matches_rfc_6455_example() {
            // RFC 6455 section 1.3.
            assert_eq!(
                super::accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
                "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
            );
        }
    }
}
