//! `RescueLayer`: the one place on the request path where errors become HTTP responses.
//!
//! Inner layers fail with boxed errors; a [`ProxyError`] carries its [`Reason`], anything else is an
//! upstream failure. The answer is `Reason::status()` with an `outrider-error: <reason>` header,
//! counted in `outrider_errors_total{reason}` and logged at debug (without request headers).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;

use crate::errors::{error_response, Chain, ProxyError, Reason, RspBody};
use crate::http::forward::BoxError;
use crate::metrics::DirectionMetrics;

/// Builds [`Rescue`].
#[derive(Debug, Clone)]
pub struct RescueLayer {
    metrics: Arc<DirectionMetrics>,
}

impl RescueLayer {
    /// Counts rescued errors into `metrics`.
    pub fn new(metrics: Arc<DirectionMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for RescueLayer {
    type Service = Rescue<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Rescue {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// Turns `S`'s errors into responses; never fails.
#[derive(Debug, Clone)]
pub struct Rescue<S> {
    inner: S,
    metrics: Arc<DirectionMetrics>,
}

impl<S, B> tower::Service<Request<B>> for Rescue<S>
where
    S: tower::Service<Request<B>, Response = Response<RspBody>, Error = BoxError>,
{
    type Response = Response<RspBody>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The inner stack is always ready today; an error here would be rescued per request.
        match self.inner.poll_ready(cx) {
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
            metrics: self.metrics.clone(),
        }
    }
}

/// The reason an error is answered with.
pub fn reason_of(error: &BoxError) -> Reason {
    error
        .downcast_ref::<ProxyError>()
        .map_or(Reason::UpstreamFailed, |e| e.reason)
}

pin_project! {
    /// The response future of [`Rescue`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        metrics: Arc<DirectionMetrics>,
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RspBody>, BoxError>>,
{
    type Output = Result<Response<RspBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match ready!(this.inner.poll(cx)) {
            Ok(rsp) => Poll::Ready(Ok(rsp)),
            Err(error) => {
                let reason = reason_of(&error);
                this.metrics.error(reason);
                tracing::debug!(reason = reason.as_str(), error = %Chain(error.as_ref()), "request failed");
                Poll::Ready(Ok(error_response(reason)))
            }
        }
    }
}
