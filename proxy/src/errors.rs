//! Errors on the request path: leaf errors named as nouns, each with the [`Reason`] it is answered
//! with, the [`Side`] that caused it and whether the request may be sent again; and the local
//! response a [`Reason`] becomes.
//!
//! Layers fail with a [`BoxError`]; the rescue layer of each direction walks the error's cause
//! chain ([`reason_of`]), so a leaf wrapped by hyper, hyper-util or tower is still recognised:
//! a tower timeout or load-shed error, a request body the client broke or aborted, a connect
//! failure. Every locally generated response carries `outrider-error: <reason>`, and a gRPC
//! request gets a trailers-only gRPC answer (`grpc-status`, `grpc-message`) instead of a bare HTTP
//! error.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

/// A boxed error, the error type inside the request stacks.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;

/// Why the proxy answered instead of the upstream: the `outrider-error` value and the label of
/// `outrider_errors_total`. The discriminant indexes the metric handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The upstream refused the connection or did not accept it in time.
    ConnectFailed = 0,
    /// The upstream connection broke or answered nonsense before a response arrived.
    UpstreamFailed = 1,
    /// The request is malformed or cannot be forwarded as received.
    BadRequest = 2,
    /// The target is the proxy itself.
    Loop = 3,
    /// The original destination could not be read.
    NoOrigDst = 4,
    /// The destination is not a known service and unknown destinations are refused.
    NoRoute = 5,
    /// The service has no endpoints.
    NoEndpoints = 6,
    /// The route's timeout passed before the response headers.
    RequestTimeout = 7,
    /// No config from the control plane yet.
    NoConfig = 8,
    /// The client went away (or stopped its upload) before the exchange finished.
    ClientAborted = 9,
    /// The stack could not take the request now (load shed).
    Overloaded = 10,
    /// The upstream does not speak the HTTP version the request needs (gRPC to HTTP/1).
    UpstreamProtocol = 11,
    /// The request uses a transfer coding other than `chunked`.
    UnsupportedTransferCoding = 12,
    /// The client did not finish its request headers within the header-read timeout.
    HeaderTimeout = 13,
    /// The mutual TLS handshake with the upstream failed (or the proxy has no certificate yet).
    TlsFailed = 14,
    /// The port's policy does not allow the caller.
    Denied = 15,
    /// Every endpoint of the service has its circuit breaker open.
    CircuitOpen = 16,
}

/// Which side a failure is blamed on (for logs, and so that later layers such as a breaker only
/// count the upstream's own failures).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The downstream client.
    Client,
    /// The proxy or the mesh configuration.
    Proxy,
    /// The upstream endpoint.
    Upstream,
}

impl Reason {
    /// Every reason, in discriminant order.
    pub const ALL: [Reason; 17] = [
        Reason::ConnectFailed,
        Reason::UpstreamFailed,
        Reason::BadRequest,
        Reason::Loop,
        Reason::NoOrigDst,
        Reason::NoRoute,
        Reason::NoEndpoints,
        Reason::RequestTimeout,
        Reason::NoConfig,
        Reason::ClientAborted,
        Reason::Overloaded,
        Reason::UpstreamProtocol,
        Reason::UnsupportedTransferCoding,
        Reason::HeaderTimeout,
        Reason::TlsFailed,
        Reason::Denied,
        Reason::CircuitOpen,
    ];

    /// The `outrider-error` header value and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ConnectFailed => "connect-failed",
            Reason::UpstreamFailed => "upstream-failed",
            Reason::BadRequest => "bad-request",
            Reason::Loop => "loop",
            Reason::NoOrigDst => "no-orig-dst",
            Reason::NoRoute => "no-route",
            Reason::NoEndpoints => "no-endpoints",
            Reason::RequestTimeout => "request-timeout",
            Reason::NoConfig => "no-config",
            Reason::ClientAborted => "client-aborted",
            Reason::Overloaded => "overloaded",
            Reason::UpstreamProtocol => "upstream-protocol",
            Reason::UnsupportedTransferCoding => "unsupported-transfer-coding",
            Reason::HeaderTimeout => "header-timeout",
            Reason::TlsFailed => "tls-failed",
            Reason::Denied => "denied",
            Reason::CircuitOpen => "circuit-open",
        }
    }

    /// The HTTP status the client sees.
    pub fn status(self) -> StatusCode {
        match self {
            Reason::ConnectFailed
            | Reason::UpstreamFailed
            | Reason::NoOrigDst
            | Reason::NoRoute
            | Reason::UpstreamProtocol
            | Reason::TlsFailed => StatusCode::BAD_GATEWAY,
            Reason::Denied => StatusCode::FORBIDDEN,
            Reason::NoEndpoints | Reason::NoConfig | Reason::Overloaded | Reason::CircuitOpen => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Reason::RequestTimeout => StatusCode::GATEWAY_TIMEOUT,
            Reason::BadRequest | Reason::ClientAborted => StatusCode::BAD_REQUEST,
            Reason::Loop => StatusCode::LOOP_DETECTED,
            Reason::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
            Reason::HeaderTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The side the failure is blamed on.
    pub fn side(self) -> Side {
        match self {
            Reason::ConnectFailed
            | Reason::UpstreamFailed
            | Reason::UpstreamProtocol
            | Reason::TlsFailed => Side::Upstream,
            Reason::BadRequest
            | Reason::Denied
            | Reason::ClientAborted
            | Reason::UnsupportedTransferCoding
            | Reason::HeaderTimeout => Side::Client,
            Reason::Loop
            | Reason::NoOrigDst
            | Reason::NoRoute
            | Reason::NoEndpoints
            | Reason::RequestTimeout
            | Reason::NoConfig
            | Reason::Overloaded
            | Reason::CircuitOpen => Side::Proxy,
        }
    }

    /// The gRPC status code a gRPC client gets for this reason.
    pub fn grpc_status(self) -> u16 {
        match self {
            // UNAVAILABLE: the caller may try again.
            Reason::ConnectFailed
            | Reason::UpstreamFailed
            | Reason::NoEndpoints
            | Reason::NoConfig
            | Reason::Overloaded
            | Reason::CircuitOpen
            | Reason::Loop
            | Reason::NoOrigDst
            | Reason::TlsFailed => 14,
            Reason::Denied => 7, // PERMISSION_DENIED
            Reason::RequestTimeout | Reason::HeaderTimeout => 4, // DEADLINE_EXCEEDED
            Reason::NoRoute => 12, // UNIMPLEMENTED
            Reason::ClientAborted => 1, // CANCELLED
            Reason::UnsupportedTransferCoding => 12, // UNIMPLEMENTED
            Reason::BadRequest | Reason::UpstreamProtocol => 13, // INTERNAL
        }
    }
}

macro_rules! leaf {
    ($name:ident, $reason:expr) => {
        impl Leaf for $name {
            fn reason(&self) -> Reason {
                $reason
            }
        }
    };
}

/// A leaf error: knows its reason.
trait Leaf {
    fn reason(&self) -> Reason;
}

/// The upstream refused the connection (or the dial failed locally). Nothing was sent, so the
/// request may be sent elsewhere.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {addr}")]
pub(crate) struct ConnectError {
    /// The address dialled.
    pub addr: SocketAddr,
    /// What the kernel said.
    #[source]
    pub source: std::io::Error,
}
leaf!(ConnectError, Reason::ConnectFailed);

/// The per-upstream connection bound is reached.
#[derive(Debug, thiserror::Error)]
#[error("{max} connections to {addr} are open already (the per-upstream bound)")]
pub(crate) struct UpstreamBusy {
    /// The upstream.
    pub addr: SocketAddr,
    /// The bound.
    pub max: usize,
}
leaf!(UpstreamBusy, Reason::Overloaded);

/// The upstream did not accept the connection within the connect timeout.
#[derive(Debug, thiserror::Error)]
#[error("connecting to {addr} timed out after {}", outrider_control::duration::format(*.after))]
pub(crate) struct ConnectTimeout {
    /// The address dialled.
    pub addr: SocketAddr,
    /// The connect timeout.
    pub after: Duration,
}
leaf!(ConnectTimeout, Reason::ConnectFailed);

/// The upstream connection failed after it was established, before a whole response head.
#[derive(Debug, thiserror::Error)]
#[error("the upstream {addr} failed")]
pub(crate) struct UpstreamFailed {
    /// The endpoint.
    pub addr: SocketAddr,
    /// What hyper saw.
    #[source]
    pub source: BoxError,
}
leaf!(UpstreamFailed, Reason::UpstreamFailed);

/// The upstream answered an HTTP/2 connection preface with HTTP/1.
#[derive(Debug, thiserror::Error)]
#[error("the upstream {addr} does not speak HTTP/2 (it answered the HTTP/2 preface with something else than SETTINGS, e.g. HTTP/1)")]
pub(crate) struct NotHttp2 {
    /// The endpoint.
    pub addr: SocketAddr,
}
leaf!(NotHttp2, Reason::UpstreamProtocol);

/// The request cannot be forwarded as received.
#[derive(Debug, thiserror::Error)]
#[error("bad request: {0}")]
pub(crate) struct BadRequest(pub BoxError);
leaf!(BadRequest, Reason::BadRequest);

/// Reading the client's request body failed: a malformed body (a bad chunk size) is the
/// client's fault; an aborted upload is the client going away. Never the upstream's.
#[derive(Debug, thiserror::Error)]
#[error("reading the request body failed")]
pub(crate) struct RequestBodyError(#[source] pub hyper::Error);
impl Leaf for RequestBodyError {
    fn reason(&self) -> Reason {
        if self.0.is_incomplete_message() || self.0.is_canceled() || is_abort(&self.0) {
            Reason::ClientAborted
        } else {
            Reason::BadRequest
        }
    }
}

/// Whether a body error says the client went away: the connection closed or was reset mid-body
/// (HTTP/1), or the client cancelled its stream (HTTP/2 `CANCEL`), rather than sent bad framing.
fn is_abort(error: &(dyn StdError + 'static)) -> bool {
    use std::io::ErrorKind;
    let mut next: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::UnexpectedEof
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe
            );
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::CANCEL) || h2.is_io();
        }
        next = e.source();
    }
    false
}

/// The request body failed while an HTTP/2 upstream was reading it (its client swallows the
/// body's own error): the reason the body's error had.
#[derive(Debug, thiserror::Error)]
#[error("the request body failed ({})", .0.as_str())]
pub(crate) struct BodyFailed(pub Reason);
impl Leaf for BodyFailed {
    fn reason(&self) -> Reason {
        self.0
    }
}

/// The request uses a transfer coding other than `chunked` (RFC 9112 6.1: 501).
#[derive(Debug, thiserror::Error)]
#[error("a transfer coding other than chunked is not supported")]
pub(crate) struct UnsupportedTransferCoding;
leaf!(UnsupportedTransferCoding, Reason::UnsupportedTransferCoding);

/// No view from the control plane has arrived yet.
#[derive(Debug, thiserror::Error)]
#[error("no config from the control plane yet")]
pub(crate) struct NoConfig;
leaf!(NoConfig, Reason::NoConfig);

/// The destination is not a known service, and the view refuses unknown destinations.
#[derive(Debug, thiserror::Error)]
#[error("{dest} is not a known service address (unknown destinations are refused)")]
pub(crate) struct NoRoute {
    /// The original destination.
    pub dest: SocketAddr,
}
leaf!(NoRoute, Reason::NoRoute);

/// The service has no endpoints.
#[derive(Debug, thiserror::Error)]
#[error("service {service} has no endpoints")]
pub(crate) struct NoEndpoints {
    /// `namespace/name` of the service.
    pub service: Arc<str>,
}
leaf!(NoEndpoints, Reason::NoEndpoints);

/// Every endpoint of the service has its circuit breaker open.
#[derive(Debug, thiserror::Error)]
#[error("every endpoint of {service} has its circuit breaker open")]
pub(crate) struct CircuitOpen {
    /// `namespace/name` of the service (or the destination address).
    pub service: Arc<str>,
}
leaf!(CircuitOpen, Reason::CircuitOpen);

/// Every ready endpoint of the service (or the service itself) has as many requests in flight
/// as it may: the request is shed instead of queued.
#[derive(Debug, thiserror::Error)]
#[error("{service} has as many requests in flight as it may (--max-in-flight-per-endpoint, --max-in-flight-per-service)")]
pub(crate) struct EndpointsBusy {
    /// `namespace/name` of the service (or the destination address).
    pub service: Arc<str>,
}
leaf!(EndpointsBusy, Reason::Overloaded);

/// An HTTP/2 upstream connection handed the request back unsent (it was going away), or the
/// upstream refused the stream (`REFUSED_STREAM`): nothing was processed, so it may be retried.
#[derive(Debug, thiserror::Error)]
#[error("the HTTP/2 upstream {addr} refused the stream")]
pub(crate) struct StreamRefused {
    /// The endpoint.
    pub addr: SocketAddr,
}
leaf!(StreamRefused, Reason::UpstreamFailed);

/// The route's timeout passed before the response headers arrived.
#[derive(Debug, thiserror::Error)]
#[error("no response within the route timeout of {}", outrider_control::duration::format(*.after))]
pub(crate) struct RouteTimeout {
    /// The route's timeout.
    pub after: Duration,
}
leaf!(RouteTimeout, Reason::RequestTimeout);

/// The request's target is this proxy itself.
#[derive(Debug, thiserror::Error)]
#[error("the target is this proxy itself")]
pub(crate) struct Loop;
leaf!(Loop, Reason::Loop);

/// The mutual TLS handshake with an upstream failed: its certificate is not the identity
/// discovery named, does not chain to the trust anchors, or the handshake stalled; or this proxy
/// has no certificate yet. Nothing of the request was sent.
#[derive(Debug, thiserror::Error)]
#[error("mutual TLS with {addr} (expected {peer}) failed")]
pub(crate) struct TlsFailed {
    /// The endpoint.
    pub addr: SocketAddr,
    /// The identity expected.
    pub peer: String,
    /// What went wrong.
    #[source]
    pub source: BoxError,
}
leaf!(TlsFailed, Reason::TlsFailed);

/// The port's policy does not allow the caller.
#[derive(Debug, thiserror::Error)]
#[error("{peer} may not call port {port}: {why}")]
pub(crate) struct Denied {
    /// The caller's identity, or `plaintext client`.
    pub peer: String,
    /// The app port.
    pub port: u16,
    /// Which rule refused.
    pub why: &'static str,
}
leaf!(Denied, Reason::Denied);

/// Classifies one error of a chain, if it is a known leaf.
fn leaf_reason(e: &(dyn StdError + 'static)) -> Option<Reason> {
    macro_rules! try_leaf {
        ($($t:ty),*) => {
            $(if let Some(l) = e.downcast_ref::<$t>() { return Some(l.reason()); })*
        };
    }
    try_leaf!(
        RequestBodyError,
        BodyFailed,
        ConnectError,
        ConnectTimeout,
        UpstreamBusy,
        NotHttp2,
        UpstreamFailed,
        BadRequest,
        NoConfig,
        NoRoute,
        NoEndpoints,
        RouteTimeout,
        Loop,
        UnsupportedTransferCoding,
        TlsFailed,
        Denied,
        CircuitOpen,
        EndpointsBusy,
        StreamRefused
    );
    if e.is::<tower::timeout::error::Elapsed>() {
        return Some(Reason::RequestTimeout);
    }
    if e.is::<tower::load_shed::error::Overloaded>() {
        return Some(Reason::Overloaded);
    }
    None
}

/// The outermost known leaf error in `error`'s cause chain (else `error` itself): what a log
/// line should start from, without the wrappers' own prefixes.
pub(crate) fn leaf<'a>(error: &'a (dyn StdError + 'static)) -> &'a (dyn StdError + 'static) {
    let mut next: Option<&'a (dyn StdError + 'static)> = Some(error);
    while let Some(e) = next {
        if leaf_reason(e).is_some() || e.is::<RequestBodyError>() {
            return e;
        }
        next = e.source();
    }
    error
}

/// The reason `error` is answered with: the outermost known leaf in its cause chain. A request
/// body error anywhere in the chain wins (hyper reports it as a failed exchange, but the client
/// caused it); an unknown error is an upstream failure.
pub(crate) fn reason_of(error: &(dyn StdError + 'static)) -> Reason {
    let mut first = None;
    let mut next: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(b) = e.downcast_ref::<RequestBodyError>() {
            return b.reason();
        }
        if first.is_none() {
            first = leaf_reason(e);
        }
        next = e.source();
    }
    first.unwrap_or(Reason::UpstreamFailed)
}

/// The upstream endpoint a failure happened at, if its cause chain names one.
pub(crate) fn upstream_of(error: &(dyn StdError + 'static)) -> Option<SocketAddr> {
    let mut next: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = next {
        macro_rules! addr_of {
            ($($t:ty),*) => {
                $(if let Some(l) = e.downcast_ref::<$t>() { return Some(l.addr); })*
            };
        }
        addr_of!(
            ConnectError,
            ConnectTimeout,
            UpstreamBusy,
            UpstreamFailed,
            NotHttp2,
            TlsFailed,
            StreamRefused
        );
        next = e.source();
    }
    None
}

/// Whether the request that failed with `error` may be sent again (to another endpoint): only
/// when nothing of it reached an upstream (the dial failed or timed out, the per-upstream bound
/// was reached, the upstream turned out not to speak HTTP/2 before the request was written, or
/// the HTTP/2 stream was refused).
pub(crate) fn is_retryable(error: &(dyn StdError + 'static)) -> bool {
    let mut next: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = next {
        if e.is::<RequestBodyError>() {
            return false;
        }
        if e.is::<ConnectError>()
            || e.is::<ConnectTimeout>()
            || e.is::<UpstreamBusy>()
            || e.is::<NotHttp2>()
            || e.is::<TlsFailed>()
            || e.is::<StreamRefused>()
        {
            return true;
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return true;
            }
        }
        next = e.source();
    }
    false
}

/// The response body type of the proxy's HTTP servers: the upstream's body, or a local one.
pub(crate) type ResponseBody = Either<hyper::body::Incoming, Full<Bytes>>;

/// The header naming the reason of a locally generated response.
pub(crate) const ERROR_HEADER: &str = "outrider-error";

/// Whether a request is gRPC (`content-type: application/grpc[+proto|...]`).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Builds the local response for `reason`: plain text with the reason's status, or for a gRPC
/// request a trailers-only gRPC response (HTTP 200, `grpc-status`, `grpc-message`).
pub(crate) fn error_response(reason: Reason, grpc: bool) -> Response<ResponseBody> {
    let text = format!("outrider: {}", reason.as_str());
    let mut rsp = if grpc {
        let mut rsp = Response::new(Either::Right(Full::new(Bytes::new())));
        let h = rsp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(reason.grpc_status()));
        if let Ok(v) = HeaderValue::from_str(&text) {
            h.insert("grpc-message", v);
        }
        rsp
    } else {
        let mut rsp = Response::new(Either::Right(Full::new(Bytes::from(text + "\n"))));
        *rsp.status_mut() = reason.status();
        rsp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        rsp
    };
    rsp.headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(reason.as_str()));
    rsp
}

pub(crate) use outrider_control::runtime::Chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] BoxError);

    #[test]
    fn the_cause_chain_decides_the_reason() {
        let timeout: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert_eq!(reason_of(&*timeout), Reason::RequestTimeout);
        let shed: BoxError = Box::new(tower::load_shed::error::Overloaded::new());
        assert_eq!(reason_of(&*shed), Reason::Overloaded);
        // A leaf wrapped by something unknown is still found.
        let wrapped = Outer(Box::new(NoEndpoints {
            service: "ns/svc".into(),
        }));
        assert_eq!(reason_of(&wrapped), Reason::NoEndpoints);
        let connect = Outer(Box::new(ConnectTimeout {
            addr: ([127, 0, 0, 1], 1).into(),
            after: Duration::from_secs(3),
        }));
        assert_eq!(reason_of(&connect), Reason::ConnectFailed);
        assert!(is_retryable(&connect), "nothing was sent");
        // Unknown errors are the upstream's, and not safe to send again.
        let unknown = Outer(Box::new(std::io::Error::other("boom")));
        assert_eq!(reason_of(&unknown), Reason::UpstreamFailed);
        assert!(!is_retryable(&unknown));
        assert_eq!(Reason::BadRequest.side(), Side::Client);
        assert_eq!(Reason::ConnectFailed.side(), Side::Upstream);
    }

    #[test]
    fn logs_start_at_the_leaf_and_say_each_cause_once() {
        let wrapped = Outer(Box::new(ConnectError {
            addr: ([127, 0, 0, 1], 1).into(),
            source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"),
        }));
        assert_eq!(
            Chain(leaf(&wrapped)).to_string(),
            "cannot connect to 127.0.0.1:1: refused"
        );
        let unknown = std::io::Error::other("boom");
        assert_eq!(Chain(leaf(&unknown)).to_string(), "boom");
    }

    #[test]
    fn grpc_requests_get_trailers_only_grpc_answers() {
        let rsp = error_response(Reason::NoEndpoints, true);
        assert_eq!(rsp.status(), StatusCode::OK);
        assert_eq!(rsp.headers()["grpc-status"], "14");
        assert_eq!(rsp.headers()[ERROR_HEADER], "no-endpoints");
        assert_eq!(
            error_response(Reason::RequestTimeout, true).headers()["grpc-status"],
            "4"
        );
        let plain = error_response(Reason::RequestTimeout, false);
        assert_eq!(plain.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(plain.headers().get("grpc-status").is_none());
    }
}
