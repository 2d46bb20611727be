//! The watch API's types: what the control plane serves each proxy, as JSON.
//!
//! `GET /v1/watch?workload=<namespace>/<name>&version=<v>[&wait=<dur>]` answers with a
//! [`WatchResponse`] at once when `version` differs from the current one (or is absent), else
//! holds the request until the workload's view changes or `wait` (default 30 s, at most 5 min)
//! passes, and then answers `304 Not Modified`. This is a long poll: one request per change, no
//! state on the server beyond the open request. Errors are `4xx` with a plain-text reason.
//!
//! `POST /v1/certify` ([`CERTIFY_PATH`]) turns a bootstrap token and a CSR into a workload
//! certificate ([`CertifyRequest`], [`CertifyResponse`], errors as [`ApiError`]).
//!
//! Durations are integers in milliseconds (`*_ms`) so clients need no duration parser.
//!
//! Workload names and identities are typed ([`WorkloadId`], [`Identity`]): they are validated
//! once, where they enter (the mesh config, the watch query, the proxy's flags, a JSON view), and
//! cannot hold a malformed value afterwards.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::quoted::Quoted;

/// The path of the watch endpoint.
pub const WATCH_PATH: &str = "/v1/watch";

/// The largest view (JSON) a proxy accepts, in bytes (16 MiB). The control plane refuses a
/// config that would give a workload a larger one, and answers a watch whose view is larger
/// with `507` and the reason instead of sending it.
pub const MAX_VIEW_BYTES: usize = 16 * 1024 * 1024;

/// One workload's view of the mesh at one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchResponse {
    /// Opaque version; send it back to wait for the next change.
    pub version: String,
    /// The workload this view is for.
    pub workload: WorkloadId,
    /// What the workload may call.
    pub outbound: OutboundView,
    /// Who may call the workload.
    pub inbound: InboundView,
    /// The mesh's trust domain: the `TD` of every `spiffe://TD/...` identity it issues.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
}

/// The trust domain when the mesh config and the flags name none.
pub const DEFAULT_TRUST_DOMAIN: &str = "outrider.local";

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_string()
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
    pub identity: Option<Identity>,
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
    /// Retries as a share of requests, in percent (the retry budget, kept per service: retries
    /// may add this share of the service's request rate plus 10 per second, over 10 s).
    pub budget_percent: u32,
    /// HTTP statuses retried (idempotent methods only, unless `non_idempotent`).
    #[serde(default = "default_retry_statuses")]
    pub statuses: Vec<u16>,
    /// gRPC status codes retried, read from a trailers-only gRPC response (`grpc-status` in the
    /// response headers).
    #[serde(default = "default_retry_grpc_codes")]
    pub grpc_codes: Vec<u16>,
    /// Base of the jittered exponential backoff between attempts, in milliseconds.
    #[serde(default = "default_retry_backoff_ms")]
    pub backoff_ms: u64,
    /// Whether responses to non-idempotent methods (POST, PATCH, CONNECT) are retried too.
    /// Connect failures and refused streams are retried for every method: nothing was sent.
    #[serde(default)]
    pub non_idempotent: bool,
}

/// The statuses retried when a route names none: 502, 503 and 504.
pub fn default_retry_statuses() -> Vec<u16> {
    vec![502, 503, 504]
}

/// The gRPC codes retried when a route names none: `UNAVAILABLE` (14).
pub fn default_retry_grpc_codes() -> Vec<u16> {
    vec![14]
}

/// The retry backoff base when a route names none: 25 ms.
pub fn default_retry_backoff_ms() -> u64 {
    25
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
    /// Weighted round robin (skipping endpoints that are not ready).
    RoundRobin,
    /// Power of two choices over peak-EWMA load (latency × requests in flight, divided by the
    /// endpoint's weight): the default.
    #[default]
    P2cEwma,
}

/// Who may call the workload.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct InboundView {
    /// Server policies by port.
    pub servers: Vec<ServerPolicy>,
    /// What applies to a port with no entry in `servers`.
    #[serde(default)]
    pub default_policy: DefaultPolicy,
}

/// What applies to a workload's ports that have no server policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultPolicy {
    /// Any caller, meshed or plaintext (the behaviour before policies).
    #[default]
    AllowAll,
    /// Any caller with a mesh identity (mTLS); plaintext callers are refused.
    MeshOnly,
    /// Nobody.
    Deny,
}

impl DefaultPolicy {
    /// The mesh config's spelling: `allow-all`, `mesh-only` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AllowAll => "allow-all",
            Self::MeshOnly => "mesh-only",
            Self::Deny => "deny",
        }
    }
}

impl FromStr for DefaultPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "allow-all" => Ok(Self::AllowAll),
            "mesh-only" => Ok(Self::MeshOnly),
            "deny" => Ok(Self::Deny),
            other => Err(format!(
                "unknown default policy {}: expected allow-all, mesh-only or deny",
                Quoted(other)
            )),
        }
    }
}

/// The policy of one port of the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerPolicy {
    /// The port.
    pub port: u16,
    /// Who may call it: exact identities or whole namespaces (empty: any authenticated
    /// identity).
    pub allow: Vec<IdentityMatch>,
    /// Whether plaintext (unauthenticated) callers are allowed.
    pub plaintext: bool,
}

impl Service {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Whether `s` is a DNS-1123 label: 1 to 63 of `a-z`, `0-9`, `-`, starting and ending with a
/// letter or digit.
pub(crate) fn is_dns_label(s: &str) -> bool {
    label_problem(s, 63, false).is_none()
}

/// Whether `s` is a DNS-1123 subdomain (a service account's name): 1 to 253 of `a-z`, `0-9`,
/// `-`, `.`, starting and ending with a letter or digit.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    label_problem(s, 253, true).is_none()
}

/// What is wrong with `s` as a label of at most `max` bytes of `a-z`, `0-9`, `-` (and `.` when
/// `dots`), starting and ending with a letter or digit; `None` if nothing.
fn label_problem(s: &str, max: usize, dots: bool) -> Option<&'static str> {
    let ok_byte =
        |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.');
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if s.is_empty() {
        Some("is empty")
    } else if s.len() > max {
        Some(if max == 63 {
            "is longer than 63 characters"
        } else {
            "is longer than 253 characters"
        })
    } else if !s.bytes().all(ok_byte) {
        Some(if dots {
            "has a character other than a-z, 0-9, '-' and '.'"
        } else {
            "has a character other than a-z, 0-9 and '-'"
        })
    } else if !s.as_bytes().first().is_some_and(alnum) || !s.as_bytes().last().is_some_and(alnum) {
        Some("does not start and end with a letter or digit")
    } else {
        None
    }
}

/// A workload: `namespace/name`, each a DNS-1123 label (1 to 63 of `a-z`, `0-9`, `-`, starting
/// and ending with a letter or digit). What a proxy passes as `--workload` and what the mesh
/// config's `workloads[].name` holds.
///
/// Parsed with [`FromStr`]; shown (and serialized) as `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WorkloadId {
    /// `namespace/name`, valid.
    full: String,
    /// Where the `/` is in `full`.
    slash: usize,
}

/// A string that is not a valid [`WorkloadId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid workload {input}: {reason}; expected NAMESPACE/NAME, each 1-63 lower-case letters, \
     digits or '-', starting and ending with a letter or digit"
)]
pub struct InvalidWorkloadId {
    /// The input, quoted and cut to a readable length.
    input: String,
    /// What is wrong with it.
    reason: String,
}

impl WorkloadId {
    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.full[..self.slash]
    }

    /// The name within the namespace.
    pub fn name(&self) -> &str {
        &self.full[self.slash + 1..]
    }

    /// `namespace/name`.
    pub fn as_str(&self) -> &str {
        &self.full
    }
}

impl FromStr for WorkloadId {
    type Err = InvalidWorkloadId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| InvalidWorkloadId {
            input: Quoted(s).to_string(),
            reason,
        };
        let (ns, name) = s
            .split_once('/')
            .ok_or_else(|| err("there is no '/'".into()))?;
        if let Some(problem) = label_problem(ns, 63, false) {
            return Err(err(format!("the namespace {problem}")));
        }
        if let Some(problem) = label_problem(name, 63, false) {
            return Err(err(format!("the name {problem}")));
        }
        Ok(Self {
            full: s.to_string(),
            slash: ns.len(),
        })
    }
}

impl TryFrom<String> for WorkloadId {
    type Error = InvalidWorkloadId;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<WorkloadId> for String {
    fn from(id: WorkloadId) -> String {
        id.full
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

/// A workload identity: the SPIFFE id `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`
/// that a workload's certificate carries.
///
/// - The trust domain is 1 to 255 of `a-z`, `0-9`, `.`, `-`, `_` (the SPIFFE rule).
/// - The namespace is a DNS-1123 label (1 to 63 of `a-z`, `0-9`, `-`, starting and ending with a
///   letter or digit).
/// - The service account is like a Kubernetes name: 1 to 253 of `a-z`, `0-9`, `-`, `.`, starting
///   and ending with a letter or digit.
///
/// Other SPIFFE paths are refused: every identity in the mesh names a namespace and a service
/// account. Parsed with [`FromStr`]; shown (and serialized) as the full `spiffe://` URI.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Identity {
    /// The URI, valid.
    full: String,
    /// Where the trust domain ends in `full`.
    domain_end: usize,
    /// Where the namespace starts and ends in `full`.
    ns: (usize, usize),
    /// Where the service account starts in `full`.
    sa_start: usize,
}

/// A string that is not a valid [`Identity`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid identity {input}: {reason}; expected \
     spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE-ACCOUNT"
)]
pub struct InvalidIdentity {
    /// The input, quoted and cut to a readable length.
    input: String,
    /// What is wrong with it.
    reason: String,
}

const SPIFFE: &str = "spiffe://";

impl Identity {
    /// The trust domain, e.g. `outrider.local`.
    pub fn trust_domain(&self) -> &str {
        &self.full[SPIFFE.len()..self.domain_end]
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.full[self.ns.0..self.ns.1]
    }

    /// The service account.
    pub fn service_account(&self) -> &str {
        &self.full[self.sa_start..]
    }

    /// The whole URI.
    pub fn as_str(&self) -> &str {
        &self.full
    }
}

impl FromStr for Identity {
    type Err = InvalidIdentity;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| InvalidIdentity {
            input: Quoted(s).to_string(),
            reason,
        };
        let rest = s
            .strip_prefix(SPIFFE)
            .ok_or_else(|| err("it does not start with spiffe://".into()))?;
        let (domain, path) = rest
            .split_once('/')
            .ok_or_else(|| err("there is no path after the trust domain".into()))?;
        if let Some(problem) = trust_domain_problem(domain) {
            return Err(err(problem.into()));
        }
        let mut segments = path.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return Err(err(
                "the path is not /ns/NAMESPACE/sa/SERVICE-ACCOUNT".into()
            ));
        };
        if let Some(problem) = label_problem(ns, 63, false) {
            return Err(err(format!("the namespace {problem}")));
        }
        if let Some(problem) = label_problem(sa, 253, true) {
            return Err(err(format!("the service account {problem}")));
        }
        let domain_end = SPIFFE.len() + domain.len();
        let ns_start = domain_end + "/ns/".len();
        let ns_end = ns_start + ns.len();
        Ok(Self {
            full: s.to_string(),
            domain_end,
            ns: (ns_start, ns_end),
            sa_start: ns_end + "/sa/".len(),
        })
    }
}

impl TryFrom<String> for Identity {
    type Error = InvalidIdentity;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Identity> for String {
    fn from(id: Identity) -> String {
        id.full
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

/// What is wrong with `s` as a SPIFFE trust domain (1 to 255 of `a-z`, `0-9`, `.`, `-`, `_`);
/// `None` if nothing.
pub fn trust_domain_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() || s.len() > 255 {
        Some("the trust domain must have 1 to 255 characters")
    } else if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        Some("the trust domain has a character other than a-z, 0-9, '.', '-' and '_'")
    } else {
        None
    }
}

/// Checks a trust domain given alone (a flag, the mesh config's `trust_domain`); the error quotes
/// it.
pub fn check_trust_domain(s: &str) -> Result<(), String> {
    match trust_domain_problem(s) {
        None => Ok(()),
        Some(problem) => Err(format!("invalid trust domain {}: {problem}", Quoted(s))),
    }
}

impl Identity {
    /// The identity `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`, validated as
    /// [`FromStr`] does.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, InvalidIdentity> {
        format!("{SPIFFE}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }
}

/// Who a server policy's `allow` entry admits: one identity, or every identity of a namespace.
///
/// Written (and serialized) as `spiffe://TD/ns/NS/sa/SA` or `spiffe://TD/ns/NS/*`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum IdentityMatch {
    /// Exactly this identity.
    Exact(Identity),
    /// Every service account of one namespace in one trust domain.
    Namespace {
        /// The trust domain.
        trust_domain: String,
        /// The namespace.
        namespace: String,
    },
}

impl IdentityMatch {
    /// Whether `id` is admitted.
    pub fn matches(&self, id: &Identity) -> bool {
        match self {
            Self::Exact(exact) => exact == id,
            Self::Namespace {
                trust_domain,
                namespace,
            } => id.trust_domain() == trust_domain && id.namespace() == namespace,
        }
    }
}

impl FromStr for IdentityMatch {
    type Err = InvalidIdentity;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some(prefix) = s.strip_suffix("/*") else {
            return s.parse().map(Self::Exact);
        };
        let err = |reason: String| InvalidIdentity {
            input: Quoted(s).to_string(),
            reason,
        };
        let rest = prefix
            .strip_prefix(SPIFFE)
            .ok_or_else(|| err("it does not start with spiffe://".into()))?;
        let wildcard_path = || {
            err("a wildcard path must be /ns/NAMESPACE/* (only a whole namespace can be a wildcard)".into())
        };
        let (domain, path) = rest.split_once('/').ok_or_else(wildcard_path)?;
        if let Some(problem) = trust_domain_problem(domain) {
            return Err(err(problem.into()));
        }
        let namespace = path
            .strip_prefix("ns/")
            .filter(|ns| !ns.contains('/'))
            .ok_or_else(wildcard_path)?;
        if let Some(problem) = label_problem(namespace, 63, false) {
            return Err(err(format!("the namespace {problem}")));
        }
        Ok(Self::Namespace {
            trust_domain: domain.to_string(),
            namespace: namespace.to_string(),
        })
    }
}

impl TryFrom<String> for IdentityMatch {
    type Error = InvalidIdentity;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<IdentityMatch> for String {
    fn from(m: IdentityMatch) -> String {
        m.to_string()
    }
}

impl fmt::Display for IdentityMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => f.write_str(id.as_str()),
            Self::Namespace {
                trust_domain,
                namespace,
            } => write!(f, "{SPIFFE}{trust_domain}/ns/{namespace}/*"),
        }
    }
}

/// The path of the certify endpoint: `POST` a [`CertifyRequest`] with
/// `authorization: Bearer <token>`, get a [`CertifyResponse`].
///
/// Errors are JSON `{"error": "..."}`: 400 for a bad body or CSR, 401 for a missing, malformed,
/// expired or wrongly signed token, 403 when the CSR names another identity than the token.
pub const CERTIFY_PATH: &str = "/v1/certify";

/// The body of `POST /v1/certify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertifyRequest {
    /// A PEM certificate signing request (`-----BEGIN CERTIFICATE REQUEST-----`) for an ECDSA
    /// P-256 key, whose only subject alternative name is the URI of the token's identity.
    pub csr: String,
}

/// The answer to a granted `POST /v1/certify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertifyResponse {
    /// The identity the certificate names (its only URI SAN).
    pub identity: Identity,
    /// PEM: the leaf certificate, then the intermediates up to (not including) a trust anchor.
    pub chain: String,
    /// PEM: the trust anchors (roots) that peers' certificates must chain to.
    pub trust_anchors: String,
    /// Start of the leaf's validity, Unix seconds.
    pub not_before: u64,
    /// End of the leaf's validity, Unix seconds.
    pub not_after: u64,
}

/// The body of every error answer of `POST /v1/certify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What was wrong, for people.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_ids_parse_show_and_refuse() {
        let id: WorkloadId = "demo/payments-api".parse().unwrap();
        assert_eq!(id.namespace(), "demo");
        assert_eq!(id.name(), "payments-api");
        assert_eq!(id.to_string(), "demo/payments-api");
        assert_eq!("a/b".parse::<WorkloadId>().unwrap().name(), "b");
        let long = "a".repeat(63);
        assert!(format!("{long}/{long}").parse::<WorkloadId>().is_ok());
        for (bad, why) in [
            ("web", "no '/'"),
            ("/web", "the namespace is empty"),
            ("demo/", "the name is empty"),
            ("a/b/c", "the name has a character"),
            ("Demo/web", "the namespace has a character"),
            ("demo/web_1", "the name has a character"),
            ("-demo/web", "the namespace does not start and end"),
            ("demo/web-", "the name does not start and end"),
            ("demo/wéb", "the name has a character"),
            (" demo/web", "the namespace has a character"),
        ] {
            let e = bad.parse::<WorkloadId>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(
                e.starts_with(&format!("invalid workload \"{bad}\": ")),
                "{e}"
            );
            assert!(e.contains("expected NAMESPACE/NAME"), "{e}");
        }
        let e = format!("{long}a/b").parse::<WorkloadId>().unwrap_err();
        assert!(e.to_string().contains("longer than 63"), "{e}");
        let huge = "x".repeat(1 << 20);
        let e = huge.parse::<WorkloadId>().unwrap_err().to_string();
        assert!(e.len() < 400 && e.contains("(1048576 bytes)"), "{e}");
    }

    #[test]
    fn workload_ids_are_json_strings_validated_on_the_way_in() {
        let id: WorkloadId = "demo/web".parse().unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"demo/web\"");
        let back: WorkloadId = serde_json::from_str("\"demo/web\"").unwrap();
        assert_eq!(back, id);
        let e = serde_json::from_str::<WorkloadId>("\"Demo/web\"").unwrap_err();
        assert!(e.to_string().contains("invalid workload"), "{e}");
    }

    #[test]
    fn identities_parse_show_and_refuse() {
        let s = "spiffe://outrider.local/ns/demo/sa/payments-api";
        let id: Identity = s.parse().unwrap();
        assert_eq!(id.trust_domain(), "outrider.local");
        assert_eq!(id.namespace(), "demo");
        assert_eq!(id.service_account(), "payments-api");
        assert_eq!(id.to_string(), s);
        let id: Identity = "spiffe://a_b-c.9/ns/x/sa/build.bot".parse().unwrap();
        assert_eq!(id.trust_domain(), "a_b-c.9");
        assert_eq!(id.service_account(), "build.bot");
        for (bad, why) in [
            ("alice", "does not start with spiffe://"),
            ("spiffe://td", "no path"),
            ("spiffe:///ns/a/sa/b", "1 to 255"),
            ("spiffe://TD/ns/a/sa/b", "trust domain has a character"),
            ("spiffe://td/ns/a", "the path is not"),
            ("spiffe://td/ns/a/sa/b/c", "the path is not"),
            ("spiffe://td/sa/a/ns/b", "the path is not"),
            ("spiffe://td/ns/a.b/sa/c", "the namespace has a character"),
            ("spiffe://td/ns/a/sa/", "the service account is empty"),
            ("spiffe://td/ns/a/sa/.c", "does not start and end"),
            (
                "spiffe://td/ns/a/sa/C",
                "the service account has a character",
            ),
        ] {
            let e = bad.parse::<Identity>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(
                e.starts_with(&format!("invalid identity \"{bad}\": ")),
                "{e}"
            );
        }
        let long_domain = format!("spiffe://{}/ns/a/sa/b", "d".repeat(256));
        assert!(long_domain.parse::<Identity>().is_err());
        let back: Identity = serde_json::from_str(&serde_json::to_string(&id).unwrap()).unwrap();
        assert_eq!(back, id);
        assert!(serde_json::from_str::<Identity>("\"spiffe://td/x\"").is_err());
    }

    #[test]
    fn identities_from_parts_and_matches_round_trip() {
        let id = Identity::new("outrider.local", "demo", "web").unwrap();
        assert_eq!(id.as_str(), "spiffe://outrider.local/ns/demo/sa/web");
        assert!(Identity::new("outrider.local", "demo/x", "web").is_err());
        assert!(Identity::new("Bad", "demo", "web").is_err());
        assert!(check_trust_domain("prod.example").is_ok());
        assert!(check_trust_domain("")
            .unwrap_err()
            .contains("1 to 255 characters"));
        for s in [
            "spiffe://outrider.local/ns/demo/sa/web",
            "spiffe://outrider.local/ns/demo/*",
        ] {
            let m: IdentityMatch = s.parse().unwrap();
            assert_eq!(m.to_string(), s);
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(serde_json::from_str::<IdentityMatch>(&json).unwrap(), m);
        }
        assert!(serde_json::from_str::<IdentityMatch>("\"spiffe://td/*\"").is_err());
        let ns: IdentityMatch = "spiffe://td/ns/a/*".parse().unwrap();
        assert!(ns.matches(&Identity::new("td", "a", "x").unwrap()));
        assert!(!ns.matches(&Identity::new("td", "b", "x").unwrap()));
    }
}
