//! The transport: listening and accepting (`listen`), the original destination of a redirected
//! connection ([`orig_dst`]), the I/O wrappers every connection uses (`io`), the one path that
//! dials upstreams (`connect`) and the opaque TCP copy (`tcp`).

pub(crate) mod connect;
pub(crate) mod io;
pub(crate) mod listen;
pub mod orig_dst;
pub(crate) mod tcp;

use crate::detect::{self, Bounds, Detected, Outcome};
use crate::errors::{reason_of, BoxError, Chain};
use crate::metrics::DirectionMetrics;

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
                return None;
            }
            Err(e) => {
                metrics.error(reason_of(&*e));
                tracing::debug!(error = %Chain(&*e), "connection failed during detection");
                return None;
            }
        }
    };
    metrics.detected(detected.outcome);
    tracing::Span::current().record("protocol", detected.outcome.as_str());
    Some(detected)
}
