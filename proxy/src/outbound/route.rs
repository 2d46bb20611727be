//! Routes: the first of a service's routes that matches a request (path, path prefix, method,
//! headers) attaches its timeout ([`RequestTimeout`], applied by the timeout layer below), its
//! retry policy ([`RetryRoute`], applied by the retry layer) and its name (for logs). Routes come from discovery and are read per request, so an update applies to
//! the next request of every open connection; a destination that is not a service has no routes.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::request::Parts;
use http::Request;
use outrider_control::api::RouteMatch;

use super::destination::{Destination, Profile};
use crate::layers::retry::{RetryParams, RetryRoute};
use crate::layers::timeout::RequestTimeout;

/// A compiled route.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// Route name (shared: requests carry it without copying).
    pub name: Arc<str>,
    matches: RouteMatch,
    /// Timeout until the response headers arrive.
    pub timeout: Option<Duration>,
    /// Retry policy.
    pub retry: Option<Arc<RetryParams>>,
}

impl Route {
    /// Compiles a route from the view.
    pub(crate) fn new(route: &outrider_control::api::Route) -> Self {
        Self {
            name: Arc::from(route.name.as_str()),
            matches: route.matches.clone(),
            timeout: route.timeout_ms.map(Duration::from_millis),
            retry: route
                .retry
                .as_ref()
                .filter(|r| r.attempts > 0)
                .map(|r| Arc::new(RetryParams::from(r))),
        }
    }

    /// Whether the request matches (every condition given holds).
    pub(crate) fn matches(&self, req: &Parts) -> bool {
        let m = &self.matches;
        let path = req.uri.path();
        m.path.as_ref().is_none_or(|p| p == path)
            && m.path_prefix
                .as_ref()
                .is_none_or(|p| path.starts_with(p.as_str()))
            && m.method
                .as_ref()
                .is_none_or(|meth| meth == req.method.as_str())
            && m.headers.iter().all(|(k, v)| {
                req.headers
                    .get(k)
                    .is_some_and(|h| h.as_bytes() == v.as_bytes())
            })
    }
}

/// The name of the request's route, as a request extension (for logs and, later, per-route
/// metrics).
#[derive(Debug, Clone)]
pub(crate) struct RouteName(pub Arc<str>);

/// Builds [`Router`].
#[derive(Debug, Clone)]
pub(crate) struct RouterLayer {
    dest: Arc<Destination>,
    default_timeout: Option<Duration>,
}

impl RouterLayer {
    /// Routes requests to `dest`; a request no route gives a timeout gets `default_timeout`.
    pub(crate) fn new(dest: Arc<Destination>, default_timeout: Option<Duration>) -> Self {
        Self {
            dest,
            default_timeout,
        }
    }
}

impl<S> tower::Layer<S> for RouterLayer {
    type Service = Router<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Router {
            inner,
            dest: self.dest.clone(),
            default_timeout: self.default_timeout,
        }
    }
}

/// Attaches the matching route's parameters to each request.
#[derive(Debug, Clone)]
pub(crate) struct Router<S> {
    inner: S,
    dest: Arc<Destination>,
    default_timeout: Option<Duration>,
}

impl<S, B> tower::Service<Request<B>> for Router<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let resolved = self.dest.resolved();
        let route = match &resolved.profile {
            Profile::Service(service) => {
                let (parts, body) = req.into_parts();
                let route = service.routes.iter().find(|r| r.matches(&parts));
                req = Request::from_parts(parts, body);
                route
            }
            _ => None,
        };
        let timeout = route.and_then(|r| r.timeout).or(self.default_timeout);
        if let Some(t) = timeout {
            req.extensions_mut().insert(RequestTimeout(t));
        }
        if let Some(route) = route {
            req.extensions_mut().insert(RouteName(route.name.clone()));
            if let Some(retry) = &route.retry {
                req.extensions_mut().insert(RetryRoute(retry.clone()));
            }
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn route(name: &str, m: RouteMatch, timeout_ms: Option<u64>) -> Route {
        Route::new(&outrider_control::api::Route {
            name: name.into(),
            matches: m,
            timeout_ms,
            retry: None,
        })
    }

    #[test]
    fn every_condition_must_hold_and_the_first_match_wins() {
        let mut headers = BTreeMap::new();
        headers.insert("x-canary".to_string(), "1".to_string());
        let routes = [
            route(
                "canary-post",
                RouteMatch {
                    path_prefix: Some("/pay".into()),
                    method: Some("POST".into()),
                    headers,
                    ..Default::default()
                },
                Some(100),
            ),
            route(
                "pay",
                RouteMatch {
                    path_prefix: Some("/pay".into()),
                    ..Default::default()
                },
                Some(2000),
            ),
            route(
                "exact",
                RouteMatch {
                    path: Some("/health".into()),
                    ..Default::default()
                },
                None,
            ),
        ];
        let first = |req: Request<()>| {
            let (parts, _) = req.into_parts();
            routes
                .iter()
                .find(|r| r.matches(&parts))
                .map(|r| r.name.to_string())
        };
        let post = || Request::post("http://x/payments/1");
        assert_eq!(
            first(post().header("x-canary", "1").body(()).unwrap()).as_deref(),
            Some("canary-post")
        );
        assert_eq!(
            first(post().header("x-canary", "2").body(()).unwrap()).as_deref(),
            Some("pay"),
            "a header value that differs does not match"
        );
        assert_eq!(
            first(
                Request::get("http://x/payments")
                    .header("x-canary", "1")
                    .body(())
                    .unwrap()
            )
            .as_deref(),
            Some("pay"),
            "the method must match too"
        );
        assert_eq!(
            first(Request::get("http://x/health").body(()).unwrap()).as_deref(),
            Some("exact")
        );
        assert_eq!(
            first(Request::get("http://x/healthz").body(()).unwrap()),
            None
        );
    }
}
