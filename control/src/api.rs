//! The watch API's types: what the control plane serves each proxy, as JSON.
//!
//! `GET /v1/watch?workload=<namespace>/<name>&version=<v>[&wait=<dur>]` answers with a
//! [`WatchResponse`] at once when `version` differs from the current one (or is absent), else
//! holds the request until the workload's view changes or `wait` (default 30 s, at most 5 min)
//! passes, and then answers `304 Not Modified`. This is a long poll: one request per change, no
//! state on the server beyond the open request. Errors are `4xx` with a plain-text reason.
//!
//! Durations are integers in milliseconds (`*_ms`) so clients need no duration parser.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The path of the watch endpoint.
pub const WATCH_PATH: &str = "/v1/watch";

/// One workload's view of the mesh at one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchResponse {
    /// Opaque version; send it back to wait for the next change.
    pub version: String,
    /// `namespace/name` of the workload this view is for.
    pub workload: String,
    /// What the workload may call.
    pub outbound: OutboundView,
    /// Who may call the workload.
    pub inbound: InboundView,
}

/// What happens to outbound traffic whose destination is not a known service address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownDestinations {
    /// Forward it to the original destination unchanged.
    #[default]
    Passthrough,
    /// Refuse it (`outrider-error: no-route` for HTTP; closed for TCP).
    Refuse,
}

/// The services a workload may call.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OutboundView {
    /// Policy for destinations not listed in `services`.
    pub unknown_destinations: UnknownDestinations,
    /// The services, with endpoints and routes.
    pub services: Vec<Service>,
}

/// The protocol hint of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceProtocol {
    /// Detect per connection.
    #[default]
    Detect,
    /// HTTP/1.1 towards the endpoints.
    Http1,
    /// HTTP/2 (prior knowledge) towards the endpoints.
    Http2,
    /// gRPC: HTTP/2 towards the endpoints.
    Grpc,
    /// Opaque TCP: no detection, no HTTP handling.
    Opaque,
}

/// A service: virtual addresses, endpoints, routes and traffic settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Name, unique within the namespace.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Virtual addresses (address:port) that select this service.
    pub addresses: Vec<SocketAddr>,
    /// Protocol hint.
    pub protocol: ServiceProtocol,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Routes, first match wins; a request no route matches uses no route settings.
    pub routes: Vec<Route>,
    /// Circuit-breaker settings (applied by the proxy's breaker layer).
    pub breaker: Option<Breaker>,
    /// Load-balancer settings.
    pub balancer: Balancer,
}

/// One endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Where to connect.
    pub address: SocketAddr,
    /// The SPIFFE identity the endpoint must present (mTLS), if meshed.
    pub identity: Option<String>,
    /// Relative share of traffic, 1..=1000.
    pub weight: u32,
}

/// A route: a request match and what applies to matching requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Name (metrics label; bounded by the config).
    pub name: String,
    /// What requests it matches; every present condition must hold.
    pub matches: RouteMatch,
    /// Timeout until the response headers arrive.
    pub timeout_ms: Option<u64>,
    /// Retry policy.
    pub retry: Option<RetryPolicy>,
}

/// Request conditions of a route.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RouteMatch {
    /// The path starts with this.
    pub path_prefix: Option<String>,
    /// The path is exactly this.
    pub path: Option<String>,
    /// The method is this (upper case).
    pub method: Option<String>,
    /// Each header has exactly this value (names lower case).
    pub headers: BTreeMap<String, String>,
}

/// When and how often to retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts after the first, 0..=10.
    pub attempts: u32,
    /// Retries as a share of requests, in percent (the retry budget).
    pub budget_percent: u32,
}

/// Circuit-breaker settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Breaker {
    /// Consecutive failures that open the breaker of an endpoint.
    pub consecutive_failures: u32,
    /// How long an open breaker rejects before probing.
    pub open_ms: u64,
}

/// The balancing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balancer {
    /// Weighted round robin.
    #[default]
    RoundRobin,
    /// Power of two choices over peak-EWMA latency.
    P2cEwma,
}

/// Who may call the workload.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct InboundView {
    /// Server policies by port.
    pub servers: Vec<ServerPolicy>,
}

/// The policy of one port of the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerPolicy {
    /// The port.
    pub port: u16,
    /// SPIFFE identities allowed to call it (empty: any authenticated identity).
    pub allow: Vec<String>,
    /// Whether plaintext (unauthenticated) callers are allowed.
    pub plaintext: bool,
}

impl Service {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
