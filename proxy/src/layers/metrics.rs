//! `RequestMetricsLayer`: the outermost request layer. Counts each request by protocol, each
//! response by status class (a request whose response never came, because the client cancelled
//! it, counts as `cancelled`), and observes the time to response headers.
//!
//! It sits above [`super::rescue`], so locally generated error responses are counted like any other.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::metrics::DirectionMetrics;

/// Builds [`RequestMetrics`].
#[derive(Debug, Clone)]
pub(crate) struct RequestMetricsLayer {
    metrics: Arc<DirectionMetrics>,
}

impl RequestMetricsLayer {
    /// Records into `metrics`.
    pub(crate) fn new(metrics: Arc<DirectionMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for RequestMetricsLayer {
    type Service = RequestMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// Records request and response metrics around `S`.
#[derive(Debug, Clone)]
pub(crate) struct RequestMetrics<S> {
    inner: S,
    metrics: Arc<DirectionMetrics>,
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
        ResponseFuture {
            inner: self.inner.call(req),
            answered: Answered {
                metrics: self.metrics.clone(),
                done: false,
            },
            start: Instant::now(),
        }
    }
}

/// Counts a response class once: the response's, or `cancelled` when the future is dropped first.
#[derive(Debug)]
struct Answered {
    metrics: Arc<DirectionMetrics>,
    done: bool,
}

impl Drop for Answered {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.cancelled.inc();
        }
    }
}

pin_project! {
    /// The response future of [`RequestMetrics`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        answered: Answered,
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
        let metrics = &this.answered.metrics;
        match &res {
            Ok(rsp) => metrics.response(rsp.status()),
            // Only a stack without a rescue layer fails; nothing reaches the client.
            Err(_) => metrics.cancelled.inc(),
        }
        this.answered.done = true;
        metrics.latency.observe(this.start.elapsed().as_secs_f64());
        Poll::Ready(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;
    use tower::{Layer, Service, ServiceExt};

    #[tokio::test]
    async fn counts_requests_responses_and_cancellations() {
        let registry = prometheus::Registry::new();
        let m = Arc::new(
            crate::metrics::Metrics::register(&registry)
                .unwrap()
                .inbound,
        );
        let (mock, mut handle) = tower_test::mock::pair::<Request<()>, Response<()>>();
        let mut svc = RequestMetricsLayer::new(m.clone()).layer(mock);
        handle.allow(2);

        let answered = svc.ready().await.unwrap().call(Request::new(()));
        let (_, send) = handle.next_request().await.unwrap();
        let mut rsp = Response::new(());
        *rsp.status_mut() = StatusCode::NOT_FOUND;
        send.send_response(rsp);
        answered.await.unwrap();

        let cancelled = svc.ready().await.unwrap().call(Request::new(()));
        let (_, _never) = handle.next_request().await.unwrap();
        drop(cancelled);

        assert_eq!(m.requests[0].get(), 2);
        assert_eq!(m.responses[3].get(), 1, "one 4xx");
        assert_eq!(m.cancelled.get(), 1);
        assert_eq!(m.latency.get_sample_count(), 1);
    }
}
