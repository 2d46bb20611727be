//! `RequestTimeoutLayer`: fails a request whose route set a timeout ([`RouteTimeout`], attached by
//! the router) when the response headers have not arrived in time. The client sees 504 with
//! `outrider-error: request-timeout`; the upstream request is dropped (its connection is not
//! reused). Requests without a route timeout pass through untouched.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Request;

use super::router::RouteTimeout;
use crate::errors::{ProxyError, Reason};
use crate::http::forward::BoxError;

/// Builds [`RequestTimeout`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestTimeoutLayer;

impl<S> tower::Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestTimeout { inner }
    }
}

/// Applies the route's timeout.
#[derive(Debug, Clone)]
pub struct RequestTimeout<S> {
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for RequestTimeout<S>
where
    S: tower::Service<Request<B>, Error = BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let timeout = req.extensions().get::<RouteTimeout>().copied();
        let fut = self.inner.call(req);
        match timeout {
            None => Box::pin(fut),
            Some(RouteTimeout(d)) => Box::pin(async move {
                match tokio::time::timeout(d, fut).await {
                    Ok(res) => res,
                    Err(_) => Err(ProxyError::new(
                        Reason::RequestTimeout,
                        format!(
                            "no response within the route timeout of {}",
                            outrider_control::duration::format(d)
                        ),
                    )
                    .into()),
                }
            }),
        }
    }
}
