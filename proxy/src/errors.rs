//! Errors inside the request path, and the one place per connection ("rescue") that turns them
//! into HTTP responses. Every locally generated response carries `outrider-error: <reason>` so a
//! client can tell the proxy's answer from the app's, and every one is counted.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

/// Why the proxy answered instead of the upstream. The discriminant indexes the metric handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The upstream refused or did not accept the connection in time.
    ConnectFailed = 0,
    /// The upstream connection broke before a response arrived.
    UpstreamFailed = 1,
    /// The request could not be forwarded as received (e.g. no usable authority).
    BadRequest = 2,
    /// The target is the proxy itself.
    Loop = 3,
    /// The original destination could not be read.
    NoOrigDst = 4,
    /// The destination is not a known service and unknown destinations are refused.
    NoRoute = 5,
    /// The service has no endpoints.
    NoEndpoints = 6,
    /// The route's timeout passed before the response.
    RequestTimeout = 7,
    /// No config from the control plane yet (outbound with `--control`).
    NoConfig = 8,
}

impl Reason {
    /// Every reason, in discriminant order.
    pub const ALL: [Reason; 9] = [
        Reason::ConnectFailed,
        Reason::UpstreamFailed,
        Reason::BadRequest,
        Reason::Loop,
        Reason::NoOrigDst,
        Reason::NoRoute,
        Reason::NoEndpoints,
        Reason::RequestTimeout,
        Reason::NoConfig,
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
        }
    }

    /// The status the client sees.
    pub fn status(self) -> StatusCode {
        match self {
            Reason::ConnectFailed
            | Reason::UpstreamFailed
            | Reason::NoOrigDst
            | Reason::NoRoute => StatusCode::BAD_GATEWAY,
            Reason::NoEndpoints | Reason::NoConfig => StatusCode::SERVICE_UNAVAILABLE,
            Reason::RequestTimeout => StatusCode::GATEWAY_TIMEOUT,
            Reason::BadRequest => StatusCode::BAD_REQUEST,
            Reason::Loop => StatusCode::LOOP_DETECTED,
        }
    }
}

/// An error on the request path, with the reason that classifies it.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", reason.as_str())]
pub struct ProxyError {
    /// The classification.
    pub reason: Reason,
    /// The underlying cause.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl ProxyError {
    /// Wraps `source` with a reason.
    pub fn new(
        reason: Reason,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            reason,
            source: source.into(),
        }
    }
}

/// The response body type of the proxy's HTTP server: the upstream's body, or a local one.
pub type RspBody = Either<hyper::body::Incoming, Full<Bytes>>;

/// The header naming the reason of a locally generated response.
pub const ERROR_HEADER: &str = "outrider-error";

/// Builds the local response for `reason`.
pub fn error_response(reason: Reason) -> Response<RspBody> {
    let body = Full::new(Bytes::from(format!("outrider: {}\n", reason.as_str())));
    let mut rsp = Response::new(Either::Right(body));
    *rsp.status_mut() = reason.status();
    rsp.headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(reason.as_str()));
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    rsp
}

pub use outrider_control::runtime::Chain;
