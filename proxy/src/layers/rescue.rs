//! `RescueLayer`: the one place on a request path where errors become HTTP responses.
//!
//! Inner layers fail with boxed errors; the direction's mapping (a function from the error to a
//! [`Reason`], usually [`crate::errors::reason_of`] walking the cause chain) decides the answer:
//! the reason's status with an `outrider-error: <reason>` header, or a trailers-only gRPC answer
//! for a gRPC request. Each is counted in `outrider_errors_total{reason}` and logged at debug
//! (without request headers).
//!
//! Readiness is honest: an inner service that fails `poll_ready` (no endpoints, overloaded) is not
//! called; the error is answered for the request that follows, and the rescue layer is ready.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;

use crate::errors::{error_response, is_grpc, is_retryable, BoxError, Chain, Reason, ResponseBody};
use crate::metrics::DirectionMetrics;

/// Maps an error to the reason it is answered with.
pub(crate) type Mapping = fn(&(dyn StdError + 'static)) -> Reason;

/// Builds [`Rescue`].
#[derive(Debug, Clone)]
pub(crate) struct RescueLayer {
    metrics: Arc<DirectionMetrics>,
    mapping: Mapping,
}

impl RescueLayer {
    /// Answers errors as `mapping` says, counting them into `metrics`.
    pub(crate) fn new(metrics: Arc<DirectionMetrics>, mapping: Mapping) -> Self {
        Self { metrics, mapping }
    }
}

impl<S> tower::Layer<S> for RescueLayer {
    type Service = Rescue<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Rescue {
            inner,
            metrics: self.metrics.clone(),
            mapping: self.mapping,
            not_ready: None,
        }
    }
}

/// Turns `S`'s errors into responses; never fails.
#[derive(Debug)]
pub(crate) struct Rescue<S> {
    inner: S,
    metrics: Arc<DirectionMetrics>,
    mapping: Mapping,
    /// The error the inner service's readiness failed with, answered by the next call.
    not_ready: Option<BoxError>,
}

impl<S: Clone> Clone for Rescue<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            metrics: self.metrics.clone(),
            mapping: self.mapping,
            not_ready: None,
        }
    }
}

impl<S, B> tower::Service<Request<B>> for Rescue<S>
where
    S: tower::Service<Request<B>, Response = Response<ResponseBody>, Error = BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.not_ready.is_some() {
            return Poll::Ready(Ok(()));
        }
        match ready!(self.inner.poll_ready(cx)) {
            Ok(()) => {}
            Err(e) => self.not_ready = Some(e),
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let grpc = is_grpc(req.headers());
        let state = match self.not_ready.take() {
            Some(e) => State::Failed { error: Some(e) },
            None => State::Called {
                inner: self.inner.call(req),
            },
        };
        ResponseFuture {
            state,
            grpc,
            metrics: self.metrics.clone(),
            mapping: self.mapping,
        }
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        Called { #[pin] inner: F },
        Failed { error: Option<BoxError> },
    }
}

pin_project! {
    /// The response future of [`Rescue`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
        grpc: bool,
        metrics: Arc<DirectionMetrics>,
        mapping: Mapping,
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResponseBody>, BoxError>>,
{
    type Output = Result<Response<ResponseBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let error = match this.state.project() {
            StateProj::Called { inner } => match ready!(inner.poll(cx)) {
                Ok(rsp) => return Poll::Ready(Ok(rsp)),
                Err(e) => e,
            },
            StateProj::Failed { error } => match error.take() {
                Some(e) => e,
                None => "the request was already answered".into(),
            },
        };
        let reason = (this.mapping)(&*error);
        this.metrics.error(reason);
        tracing::debug!(
            reason = reason.as_str(),
            side = ?reason.side(),
            unsent = is_retryable(&*error),
            error = %Chain(error.as_ref()),
            "request failed"
        );
        Poll::Ready(Ok(error_response(reason, *this.grpc)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::errors::{reason_of, NoEndpoints};
    use http::StatusCode;
    use tower::{Layer, Service, ServiceExt};

    fn metrics() -> Arc<DirectionMetrics> {
        let registry = prometheus::Registry::new();
        let m = crate::metrics::Metrics::register(&registry).unwrap();
        Arc::new(m.outbound.clone())
    }

    #[tokio::test]
    async fn errors_become_counted_responses_and_unready_services_are_not_called() {
        let m = metrics();
        let (mock, mut handle) = tower_test::mock::pair::<Request<()>, Response<ResponseBody>>();
        let mut svc = RescueLayer::new(m.clone(), reason_of).layer(mock);

        // A failed call: the cause chain decides the answer.
        handle.allow(1);
        let call = svc.ready().await.unwrap().call(Request::new(()));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_error(NoEndpoints {
            service: "ns/svc".into(),
        });
        let rsp = call.await.unwrap();
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(rsp.headers()["outrider-error"], "no-endpoints");
        assert_eq!(m.errors[Reason::NoEndpoints as usize].get(), 1);

        // Failed readiness: rescue is ready, answers, and never calls the inner service.
        handle.send_error(tower::load_shed::error::Overloaded::new());
        let mut grpc = Request::new(());
        grpc.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        let rsp = svc.ready().await.unwrap().call(grpc).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        assert_eq!(rsp.headers()["grpc-status"], "14");
        assert_eq!(rsp.headers()["outrider-error"], "overloaded");
        assert_eq!(m.errors[Reason::Overloaded as usize].get(), 1);
        assert!(
            futures_util::FutureExt::now_or_never(handle.next_request()).is_none(),
            "the unready service was called"
        );
    }
}
