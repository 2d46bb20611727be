//! The HTTP part of a connection: a hyper server (HTTP/1.1 with upgrades, or HTTP/2) in front of
//! the request stack:
//!
//! ```text
//! hyper server → RequestMetrics → Rescue → [route, timeout, retry, balance, breaker: later issues]
//!              → Forward (pooled hyper-util client per upstream)
//! ```
//!
//! The connection ends when the client closes it, when a drain starts (HTTP/1 `Connection: close`
//! on the next response, HTTP/2 GOAWAY; in-flight requests finish), or when it has been idle with no
//! request in flight for the idle timeout.

pub mod forward;
pub mod headers;

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::detect::Protocol;
use crate::drain;
use crate::errors::RspBody;
use crate::io::Activity;

/// Server-side limits of one HTTP connection.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request header block (bytes). HTTP/1 answers 431 beyond it; HTTP/2 resets the stream.
    pub max_header_bytes: u32,
    /// HTTP/1: time allowed for a request's headers to arrive.
    pub header_read_timeout: Duration,
    /// Idle time (no request in flight, no bytes moving) after which the connection is closed.
    pub idle_timeout: Duration,
}

/// Serves HTTP on `io` with `svc` until the connection ends, a drain completes it, or it idles out.
pub async fn serve<I, S>(
    io: I,
    protocol: Protocol,
    svc: S,
    config: &ServerConfig,
    mut drain: drain::Watch,
    activity: Activity,
    in_flight: Arc<AtomicUsize>,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<
            http::Request<Incoming>,
            Response = http::Response<RspBody>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let io = TokioIo::new(io);
    let svc = TowerToHyperService::new(svc);
    let idle = activity.idle(config.idle_timeout, move || {
        in_flight.load(Ordering::Relaxed) > 0
    });
    if protocol == Protocol::Http2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            // Pings find dead peers; a peer that does not answer within 10 s is dropped.
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10))
            .max_header_list_size(config.max_header_bytes);
        let conn = builder.serve_connection(io, svc);
        drive(conn, |c| c.graceful_shutdown(), &mut drain, idle).await
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            // A client may send its request and shut down its write side while it waits.
            .half_close(true)
            .max_buf_size(config.max_header_bytes.max(8192) as usize);
        let conn = builder.serve_connection(io, svc).with_upgrades();
        drive(conn, |c| c.graceful_shutdown(), &mut drain, idle).await
    }
}

/// Polls a hyper connection, asking it to shut down gracefully once on drain or idleness.
async fn drive<C>(
    conn: C,
    graceful: impl Fn(Pin<&mut C>),
    drain: &mut drain::Watch,
    idle: impl std::future::Future<Output = ()>,
) -> Result<(), hyper::Error>
where
    C: std::future::Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(conn);
    tokio::pin!(idle);
    let mut closing = false;
    loop {
        tokio::select! {
            // The connection first: a drain that is already signalled must not close a
            // connection hyper has not read yet, or the request detection already read is lost.
            biased;
            res = &mut conn => return res,
            () = drain.signaled(), if !closing => {
                tracing::debug!("draining connection");
                graceful(conn.as_mut());
                closing = true;
            }
            () = &mut idle, if !closing => {
                tracing::debug!("closing idle connection");
                graceful(conn.as_mut());
                closing = true;
            }
        }
    }
}
