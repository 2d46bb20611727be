//! The transport: listening and accepting (`listen`), the original destination of a redirected
//! connection ([`orig_dst`]), the I/O wrappers every connection uses (`io`), the one path that
//! dials upstreams (`connect`) and the opaque TCP copy (`tcp`); detection of an accepted
//! connection ([`detect`]) and the reset of a client whose upstream cannot be reached
//! ([`reset_on_close`]).

pub(crate) mod connect;
pub(crate) mod io;
pub(crate) mod listen;
pub mod orig_dst;
pub(crate) mod tcp;

use crate::detect::{self, Bounds, DetectError, Detected, Outcome};
use crate::errors::{reason_of, BoxError, Chain};
use crate::metrics::DirectionMetrics;

/// How detection ended a connection it did not hand on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Nobody spoke, the client left, or reading it failed: the connection is closed.
    Closed,
    /// The upstream dialled for a silent client could not be reached (counted): a sidecar's
    /// outbound resets the client ([`reset_on_close`]), as the unreachable address would have.
    DialFailed,
}

/// Protocol detection for an accepted connection, the same in both directions: skipped when
/// `skip` (an opaque port or service), else [`detect::detect_or_wait`] with `connect` for a silent
/// client. The outcome is counted in `metrics` and recorded on the connection's span; `None`
/// means the connection is over (nobody spoke, or the dial for a silent client failed: counted).
pub(crate) async fn detect<I, F, Fut>(
    io: &mut I,
    skip: bool,
    bounds: Bounds,
    connect: F,
    metrics: &DirectionMetrics,
) -> Option<Detected<connect::Upstream>>
where
    I: tokio::io::AsyncRead + Unpin,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<connect::Upstream, BoxError>>,
{
    detect_or_end(io, skip, bounds, connect, metrics).await.ok()
}

/// [`detect`], saying how a connection it does not hand on ended.
pub(crate) async fn detect_or_end<I, F, Fut>(
    io: &mut I,
    skip: bool,
    bounds: Bounds,
    connect: F,
    metrics: &DirectionMetrics,
) -> Result<Detected<connect::Upstream>, Ended>
where
    I: tokio::io::AsyncRead + Unpin,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<connect::Upstream, BoxError>>,
{
    let detected = if skip {
        Detected {
            outcome: Outcome::Skipped,
            prefix: bytes::Bytes::new(),
            upstream: None,
        }
    } else {
        match detect::detect_or_wait(io, bounds, connect).await {
            Ok(Some(detected)) => detected,
            Ok(None) => {
                metrics.detected(Outcome::Timeout);
                tracing::debug!("closing a connection on which nobody spoke");
                return Err(Ended::Closed);
            }
            Err(DetectError::Dial(e)) => {
                metrics.error(reason_of(&*e));
                tracing::debug!(error = %Chain(&*e), "the upstream of a silent client cannot be reached");
                return Err(Ended::DialFailed);
            }
            Err(DetectError::Client(e)) => {
                metrics.error(reason_of(&e));
                tracing::debug!(error = %e, "connection failed during detection");
                return Err(Ended::Closed);
            }
        }
    };
    metrics.detected(detected.outcome);
    tracing::Span::current().record("protocol", detected.outcome.as_str());
    Ok(detected)
}

/// Makes closing `socket` a reset (`SO_LINGER` 0; the caller then drops it): the client sees its
/// connection reset at once, as it would from an address where nothing listens.
pub(crate) fn reset_on_close(socket: &tokio::net::TcpStream) {
    if let Err(e) = socket2::SockRef::from(socket).set_linger(Some(std::time::Duration::ZERO)) {
        tracing::debug!(error = %e, "cannot set SO_LINGER 0; closing without a reset");
    }
}
