//! `RequestTimeoutLayer`: fails a request whose response headers have not arrived within the
//! [`RequestTimeout`] attached to it (by the outbound route layer, from the route's config), with
//! a [`RouteTimeout`] error (504 `request-timeout`). The upstream request is dropped (its
//! connection is not reused). Requests without a timeout pass through untouched, without a box.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::Request;
use pin_project_lite::pin_project;

use crate::errors::{BoxError, RouteTimeout};

/// The time a request's response headers may take, as a request extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestTimeout(pub Duration);

/// Builds [`Timeout`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RequestTimeoutLayer;

impl<S> tower::Layer<S> for RequestTimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Timeout { inner }
    }
}

/// Applies each request's [`RequestTimeout`].
#[derive(Debug, Clone)]
pub(crate) struct Timeout<S> {
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for Timeout<S>
where
    S: tower::Service<Request<B>, Error = BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let timeout = req.extensions().get::<RequestTimeout>().map(|t| t.0);
        ResponseFuture {
            sleep: timeout.map(|after| (Box::pin(tokio::time::sleep(after)), after)),
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The response future of [`Timeout`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        sleep: Option<(Pin<Box<tokio::time::Sleep>>, Duration)>,
    }
}

impl<F, T> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, BoxError>>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(res) = this.inner.poll(cx) {
            return Poll::Ready(res);
        }
        if let Some((sleep, after)) = this.sleep {
            ready!(sleep.as_mut().poll(cx));
            return Poll::Ready(Err(RouteTimeout { after: *after }.into()));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::errors::{reason_of, Reason};
    use tower::{Layer, Service, ServiceExt};

    #[tokio::test(start_paused = true)]
    async fn a_request_times_out_only_with_a_timeout_attached() {
        let (mock, mut handle) = tower_test::mock::pair::<Request<()>, &'static str>();
        let mut svc = RequestTimeoutLayer.layer(tower::util::MapErr::new(mock, |e: BoxError| e));
        handle.allow(2);

        let mut req = Request::new(());
        req.extensions_mut()
            .insert(RequestTimeout(Duration::from_secs(2)));
        let start = tokio::time::Instant::now();
        let timed = svc.ready().await.unwrap().call(req);
        let (_, _pending) = handle.next_request().await.unwrap();
        let err = timed.await.unwrap_err();
        assert_eq!(reason_of(&*err), Reason::RequestTimeout);
        assert_eq!(start.elapsed(), Duration::from_secs(2));

        // Without a timeout the response may take as long as it takes.
        let untimed = svc.ready().await.unwrap().call(Request::new(()));
        let (_, send) = handle.next_request().await.unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        send.send_response("late");
        assert_eq!(untimed.await.unwrap(), "late");
    }
}
