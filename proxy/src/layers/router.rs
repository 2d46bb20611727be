//! `RouterLayer`: outbound routing by discovery. For each request it looks the connection's
//! destination (original destination, or a local-mode upstream) up in the latest
//! [`OutboundTable`]:
//!
//! - a known service: the first matching route's timeout is attached for [`super::timeout`], and
//!   an endpoint is chosen by weighted round robin ([`Dispatch`], read by the forward service);
//!   a service with no endpoints fails with `no-endpoints` (503);
//! - an unknown destination passes through to itself, or fails with `no-route` (502) when the
//!   view says `unknown_destinations: refuse`.
//!
//! Until the first view has arrived, requests fail with `no-config` (503) rather than bypass
//! the mesh (connections first wait up to 5 s for it, see [`crate::listener`]).
//!
//! The table is read per request, so an update applies to the next request of every open
//! connection; in-flight requests keep the endpoint they were given.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use outrider_control::api::{ServiceProtocol, UnknownDestinations};
use tokio::sync::watch;

use crate::discovery::{EndpointEntry, OutboundTable};
use crate::errors::{ProxyError, Reason};
use crate::http::forward::BoxError;

/// The endpoint chosen for a request, and the HTTP version to speak to it.
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// The endpoint.
    pub endpoint: Arc<EndpointEntry>,
    /// `Some(true)`: HTTP/2; `Some(false)`: HTTP/1.1; `None`: as the connection decided.
    pub h2: Option<bool>,
}

/// The name of the request's route (for logs and, later, per-route metrics).
#[derive(Debug, Clone)]
pub struct RouteName(pub Arc<str>);

/// The timeout of the request's route.
#[derive(Debug, Clone, Copy)]
pub struct RouteTimeout(pub Duration);

/// Builds [`Router`].
#[derive(Debug, Clone)]
pub struct RouterLayer {
    table: watch::Receiver<Arc<OutboundTable>>,
    dest: SocketAddr,
}

impl RouterLayer {
    /// Routes requests bound for `dest` with the tables published on `table`.
    pub fn new(table: watch::Receiver<Arc<OutboundTable>>, dest: SocketAddr) -> Self {
        Self { table, dest }
    }
}

impl<S> tower::Layer<S> for RouterLayer {
    type Service = Router<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Router {
            inner,
            table: self.table.clone(),
            dest: self.dest,
        }
    }
}

/// Routes each request (see the module docs).
#[derive(Debug, Clone)]
pub struct Router<S> {
    inner: S,
    table: watch::Receiver<Arc<OutboundTable>>,
    dest: SocketAddr,
}

impl<S, B> tower::Service<Request<B>> for Router<S>
where
    S: tower::Service<Request<B>, Error = BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = futures_util::future::Either<
        S::Future,
        futures_util::future::Ready<Result<S::Response, BoxError>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        use futures_util::future::{ready, Either};
        let table = self.table.borrow().clone();
        if table.version.is_none() {
            let e = ProxyError::new(Reason::NoConfig, "no config from the control plane yet");
            return Either::Right(ready(Err(e.into())));
        }
        let Some(service) = table.service(&self.dest) else {
            if table.unknown == UnknownDestinations::Refuse {
                let e = ProxyError::new(
                    Reason::NoRoute,
                    format!("{} is not a known service address", self.dest),
                );
                return Either::Right(ready(Err(e.into())));
            }
            return Either::Left(self.inner.call(req));
        };
        let (mut parts, body) = req.into_parts();
        if let Some(route) = service.route(&parts) {
            if let Some(t) = route.timeout {
                parts.extensions.insert(RouteTimeout(t));
            }
            parts.extensions.insert(RouteName(route.name.clone()));
        }
        let Some(endpoint) = service.pick() else {
            let e = ProxyError::new(
                Reason::NoEndpoints,
                format!("service {} has no endpoints", service.id),
            );
            return Either::Right(ready(Err(e.into())));
        };
        let h2 = match service.protocol {
            ServiceProtocol::Http1 => Some(false),
            ServiceProtocol::Http2 | ServiceProtocol::Grpc => Some(true),
            ServiceProtocol::Detect | ServiceProtocol::Opaque => None,
        };
        parts.extensions.insert(Dispatch {
            endpoint: endpoint.clone(),
            h2,
        });
        Either::Left(self.inner.call(Request::from_parts(parts, body)))
    }
}
