//! `RequestMetricsLayer`: the outermost request layer. Counts each request by protocol, each
//! response by status class, observes the time to response headers, and tracks how many requests
//! are in flight on the connection (the idle timeout never closes a connection that has some).
//!
//! It sits above [`super::rescue`], so locally generated error responses are counted like any other.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::metrics::DirectionMetrics;

/// Builds [`RequestMetrics`].
#[derive(Debug, Clone)]
pub struct RequestMetricsLayer {
    metrics: Arc<DirectionMetrics>,
    in_flight: Arc<AtomicUsize>,
}

impl RequestMetricsLayer {
    /// Records into `metrics`; `in_flight` is the connection's in-flight request count.
    pub fn new(metrics: Arc<DirectionMetrics>, in_flight: Arc<AtomicUsize>) -> Self {
        Self { metrics, in_flight }
    }
}

impl<S> tower::Layer<S> for RequestMetricsLayer {
    type Service = RequestMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestMetrics {
            inner,
            metrics: self.metrics.clone(),
            in_flight: self.in_flight.clone(),
        }
    }
}

/// Records request and response metrics around `S`.
#[derive(Debug, Clone)]
pub struct RequestMetrics<S> {
    inner: S,
    metrics: Arc<DirectionMetrics>,
    in_flight: Arc<AtomicUsize>,
}

impl<S, B, RB> tower::Service<Request<B>> for RequestMetrics<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let h2 = usize::from(req.version() == http::Version::HTTP_2);
        self.metrics.requests[h2].inc();
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        ResponseFuture {
            inner: self.inner.call(req),
            guard: InFlight(self.in_flight.clone()),
            metrics: self.metrics.clone(),
            start: Instant::now(),
        }
    }
}

/// Decrements the in-flight count when the request ends, however it ends.
#[derive(Debug)]
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project! {
    /// The response future of [`RequestMetrics`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        guard: InFlight,
        metrics: Arc<DirectionMetrics>,
        start: Instant,
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.inner.poll(cx));
        if let Ok(rsp) = &res {
            this.metrics.response(rsp.status());
        }
        this.metrics
            .latency
            .observe(this.start.elapsed().as_secs_f64());
        Poll::Ready(res)
    }
}
