//! The mesh config: the control plane's source of truth, a YAML file (see the README for the full
//! schema and an example). Parsing happens in two steps: serde reads the YAML into loose "raw"
//! structs (unknown keys are errors), then validation turns them into typed [`Mesh`] values and
//! collects *every* problem, each with its key path (`services[2].routes[0].timeout: ...`).
//!
//! Before serde sees the text, three cheap checks refuse what would be slow or is nearly always a
//! mistake: a text over [`MAX_MESH_BYTES`], collections nested deeper than
//! [`nesting::MAX_DEPTH`](crate::nesting::MAX_DEPTH) (the YAML parser's time grows with the square
//! of the depth), and an empty document (nearly always a truncated write). Values quoted in error
//! messages are cut to a readable length ([`Quoted`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;

use serde::Deserialize;

use crate::api::{
    check_trust_domain, is_dns_label, Balancer, Breaker, DefaultPolicy, Endpoint, Identity,
    IdentityMatch, InboundView, OutboundView, RetryPolicy, Route, RouteMatch, ServerPolicy,
    Service, ServiceProtocol, UnknownDestinations, WatchResponse, WorkloadId, DEFAULT_TRUST_DOMAIN,
    MAX_VIEW_BYTES,
};
use crate::duration;
use crate::nesting;
use crate::quoted::{short_key, shorten_message, Quoted};

/// The largest mesh config accepted, in bytes (16 MiB): about 100 times the size of a mesh with
/// a thousand services. A larger file is refused before it is parsed.
pub const MAX_MESH_BYTES: usize = 16 * 1024 * 1024;

/// The longest message kept from the YAML library's errors, in bytes.
const MAX_LIBRARY_MESSAGE: usize = 400;

/// The demo mesh, served when `outrider control` runs without `--config`.
pub const DEMO_MESH: &str = include_str!("../demo-mesh.yaml");

/// One problem in a mesh config, with the key path that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where: `services[2].routes[0].timeout`, or `<yaml>` for syntax errors.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A validated mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    /// The trust domain of every identity (`trust_domain:`, default `outrider.local`).
    pub trust_domain: String,
    /// Default policy for unknown outbound destinations.
    pub unknown_destinations: UnknownDestinations,
    /// Every service.
    pub services: Vec<Service>,
    /// Every workload.
    pub workloads: BTreeMap<WorkloadId, Workload>,
}

/// A workload: what it may call and who may call it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// The service account its pods run under (in the workload's namespace): the proxies whose
    /// certificate names `spiffe://TD/ns/NS/sa/THIS` may watch its view. `None`: the workload's
    /// own name.
    pub service_account: Option<String>,
    /// Services it may call (`namespace/name`); `None` means all.
    pub calls: Option<Vec<String>>,
    /// Overrides the mesh-wide unknown-destination policy.
    pub unknown_destinations: Option<UnknownDestinations>,
    /// Its server policies.
    pub servers: Vec<ServerPolicy>,
    /// What applies to its ports without a server policy.
    pub default_policy: DefaultPolicy,
}

#[derive(Debug, Deserialize)]
struct RawMesh {
    /// Keys the schema does not know, each reported as an error.
    #[serde(flatten)]
    unknown: BTreeMap<String, serde_norway::Value>,
    trust_domain: Option<String>,
    unknown_destinations: Option<String>,
    #[serde(default)]
    services: Vec<RawService>,
    #[serde(default)]
    workloads: Vec<RawWorkload>,
}

#[derive(Debug, Deserialize)]
struct RawService {
    /// Keys the schema does not know, each reported as an error.
    #[serde(flatten)]
    unknown: BTreeMap<String, serde_norway::Value>,
    name: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    addresses: Vec<String>,
    protocol: Option<String>,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    breaker: Option<RawBreaker>,
    balancer: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawEndpoint {
    /// Keys the schema does not know, each reported as an error.
    #[serde(flatten)]
    unknown: BTreeMap<String, serde_norway::Value>,
    address: Option<String>,
    identity: Option<String>,
    weight: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct RawRoute {
    /// Keys the schema does not know, each reported as an error.
    #[serde(flatten)]
    unknown: BTreeMap<String, serde_norway::Value>,
    name: Option<String>,
    #[serde(rename = "match", default)]
    matches: RawMatch,
    timeout: Option<String>,
    retry: Option<RawRetry>,
}

#[derive(Debug, Default, Deserialize)]
struct RawMatch {
    /// Keys the schema does not know, each reported as an error.
    #[serde(flatten)]
    unknown: BTreeMap<String, serde_norway::Value>,
    path_prefix: Option<String>,
    path: Option<String>,
    method: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct RawRetry {
    /// Keys the schema does not know, each reported as an error.
    #[serde(flatten)]
    unknown: BTreeMap<String, serde_norway::Value>,
    attempts: Option<u32>,
    budget: Option<String>,
    on: Option<Vec<u16>>,
    grpc_on: Option<Vec<String>>,
    backoff: Option<String>,
    non_idempotent: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct RawBreaker {
    /// Keys the schema does not know, each reported as an error.
    #[serde(flatten)]
    unknown: BTreeMap<String, serde_norway::Value>,
    consecutive_failures: Option<u32>,
    open_for: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawWorkload {
    /// Keys the schema does not know, each reported as an error.
    #[serde(flatten)]
    unknown: BTreeMap<String, serde_norway::Value>,
    name: Option<String>,
    service_account: Option<String>,
    calls: Option<Vec<String>>,
    unknown_destinations: Option<String>,
    default_policy: Option<String>,
    #[serde(default)]
    servers: Vec<RawServer>,
}

#[derive(Debug, Deserialize)]
struct RawServer {
    /// Keys the schema does not know, each reported as an error.
    #[serde(flatten)]
    unknown: BTreeMap<String, serde_norway::Value>,
    port: Option<u32>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    plaintext: bool,
}

/// Collects errors under a growing key path.
struct Errors(Vec<ConfigError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Whether `id` (`namespace/name`) names `s`, without building `s`'s id (every watcher's view
/// is filtered through this at every change).
fn names(id: &str, s: &Service) -> bool {
    id.split_once('/')
        .is_some_and(|(ns, name)| ns == s.namespace && name == s.name)
}

/// Reports every key of `unknown` as an error under `at`.
fn unknown_keys(
    errors: &mut Errors,
    at: &str,
    unknown: &BTreeMap<String, serde_norway::Value>,
    known: &[&str],
) {
    for key in unknown.keys() {
        let path = if at.is_empty() {
            key.clone()
        } else {
            format!("{at}.{key}")
        };
        errors.push(
            short_key(&path),
            format!("unknown key; expected one of: {}", known.join(", ")),
        );
    }
}

/// The value of a required key, or an error.
fn required<T>(errors: &mut Errors, at: &str, key: &str, value: Option<T>) -> Option<T> {
    if value.is_none() {
        errors.push(format!("{at}.{key}"), "missing key");
    }
    value
}

fn parse_identity(errors: &mut Errors, path: String, id: &str) -> Option<Identity> {
    id.parse()
        .map_err(|e: crate::api::InvalidIdentity| errors.push(path, e.to_string()))
        .ok()
}

fn parse_addr(errors: &mut Errors, path: String, s: &str) -> Option<SocketAddr> {
    match s.trim().parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => Some(a),
        Ok(_) => {
            errors.push(path, format!("address {} has port 0", Quoted(s)));
            None
        }
        Err(_) => {
            errors.push(
                path,
                format!(
                    "invalid address {}: expected IP:PORT, e.g. 10.0.0.1:80",
                    Quoted(s)
                ),
            );
            None
        }
    }
}

fn parse_unknown(
    errors: &mut Errors,
    path: &str,
    s: &Option<String>,
) -> Option<UnknownDestinations> {
    match s.as_deref()? {
        "passthrough" => Some(UnknownDestinations::Passthrough),
        "refuse" => Some(UnknownDestinations::Refuse),
        other => {
            errors.push(
                path,
                format!(
                    "unknown policy {}: expected passthrough or refuse",
                    Quoted(other)
                ),
            );
            None
        }
    }
}

impl Mesh {
    /// Parses and validates a mesh config; on failure returns every problem found.
    ///
    /// Its time is linear in the size of `yaml` (at most [`MAX_MESH_BYTES`]) but can reach
    /// seconds for a large file: async callers run it on a blocking thread.
    pub fn parse(yaml: &str) -> Result<Mesh, Vec<ConfigError>> {
        precheck(yaml).map_err(|e| vec![e])?;
        let de = serde_norway::Deserializer::from_str(yaml);
        let raw: RawMesh = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." || path.is_empty() {
                "<yaml>".to_string()
            } else {
                short_key(&path)
            };
            let message = e.into_inner().to_string();
            // The YAML error may already start with its own location; keep one.
            let message = message
                .split_once(": ")
                .filter(|(loc, _)| !loc.contains(' '))
                .map_or(message.clone(), |(_, m)| m.to_string());
            let message = shorten_message(&message, MAX_LIBRARY_MESSAGE);
            vec![ConfigError { path, message }]
        })?;
        let mut errors = Errors(Vec::new());
        let mesh = validate(raw, &mut errors);
        if errors.0.is_empty() {
            if let Some(e) = mesh.oversize_view(false) {
                errors.0.push(e);
            }
        }
        if errors.0.is_empty() {
            Ok(mesh)
        } else {
            Err(errors.0)
        }
    }

    /// Whether the proxy whose certificate names `identity` may watch `workload`'s view: the
    /// identity's namespace is the workload's, and its service account is the one the workload
    /// runs under (`service_account`, else the workload's name). With `open`, a workload the
    /// config does not name runs under the account of its own name too. The error says why not.
    pub fn may_watch(
        &self,
        workload: &WorkloadId,
        identity: &Identity,
        open: bool,
    ) -> Result<(), String> {
        let account = match self.workloads.get(workload) {
            Some(w) => w.service_account.as_deref().unwrap_or(workload.name()),
            None if open => workload.name(),
            None => {
                return Err(format!(
                    "unknown workload \"{workload}\": it is not in the mesh config's workloads"
                ))
            }
        };
        if identity.namespace() == workload.namespace() && identity.service_account() == account {
            Ok(())
        } else {
            Err(format!(
                "{identity} may not watch workload \"{workload}\": its view is for \
                 spiffe://{}/ns/{}/sa/{account}",
                identity.trust_domain(),
                workload.namespace()
            ))
        }
    }

    /// The view of `workload` at `version`; `None` if the workload is unknown.
    pub fn view(&self, workload: &WorkloadId, version: &str) -> Option<WatchResponse> {
        self.view_or_default(workload, version, false)
    }

    /// [`Mesh::view`]; with `open`, a workload the config does not name gets the view of a
    /// workload with no entry: it may call every service, its ports have the default policy.
    pub fn view_or_default(
        &self,
        workload: &WorkloadId,
        version: &str,
        open: bool,
    ) -> Option<WatchResponse> {
        let fallback = Workload {
            service_account: None,
            calls: None,
            unknown_destinations: None,
            servers: Vec::new(),
            default_policy: DefaultPolicy::default(),
        };
        let w = match self.workloads.get(workload) {
            Some(w) => w,
            None if open => &fallback,
            None => return None,
        };
        let services = self
            .services
            .iter()
            .filter(|s| {
                w.calls
                    .as_ref()
                    .is_none_or(|calls| calls.iter().any(|c| names(c, s)))
            })
            .cloned()
            .collect();
        Some(WatchResponse {
            version: version.to_string(),
            workload: workload.clone(),
            outbound: OutboundView {
                unknown_destinations: w.unknown_destinations.unwrap_or(self.unknown_destinations),
                services,
            },
            inbound: InboundView {
                servers: w.servers.clone(),
                default_policy: w.default_policy,
            },
            trust_domain: self.trust_domain.clone(),
        })
    }

    /// The first workload whose view would be larger than [`MAX_VIEW_BYTES`] (with `open`,
    /// the default view of a workload the config does not name too), as an error naming it.
    /// Each view is measured by serializing it into a counter, never held whole.
    pub fn oversize_view(&self, open: bool) -> Option<ConfigError> {
        let named = self
            .workloads
            .keys()
            .enumerate()
            .find_map(|(i, id)| self.oversize(Some(i), id, false));
        match named {
            Some(e) => Some(e),
            None if open => self.oversize_default_view(),
            None => None,
        }
    }

    /// Whether the default view (of a workload the config does not name, with `--kubernetes`:
    /// every service) would be larger than [`MAX_VIEW_BYTES`], as an error saying so.
    pub fn oversize_default_view(&self) -> Option<ConfigError> {
        let unnamed: WorkloadId = "default/unnamed".parse().ok()?;
        self.oversize(None, &unnamed, true)
    }

    /// The error for the view of workload `id` (at `index` in the config, `None` for the
    /// default view), if larger than [`MAX_VIEW_BYTES`].
    fn oversize(&self, index: Option<usize>, id: &WorkloadId, open: bool) -> Option<ConfigError> {
        let view = self.view_or_default(id, "0", open)?;
        let size = json_size(&view);
        if size <= MAX_VIEW_BYTES {
            return None;
        }
        let (path, who) = match index {
            Some(i) => (format!("workloads[{i}]"), format!("workload \"{id}\"")),
            None => (
                "workloads".to_string(),
                "a workload the config does not name (it may call every service)".to_string(),
            ),
        };
        Some(ConfigError {
            path,
            message: format!(
                "the view of {who} would be {size} bytes, more than the proxies' limit of \
                 {MAX_VIEW_BYTES} bytes (16 MiB): narrow its `calls` to the services it uses"
            ),
        })
    }

    /// A one-line summary for logs and `--check`.
    pub fn summary(&self) -> String {
        let endpoints: usize = self.services.iter().map(|s| s.endpoints.len()).sum();
        let routes: usize = self.services.iter().map(|s| s.routes.len()).sum();
        format!(
            "{} services, {} endpoints, {} routes, {} workloads",
            self.services.len(),
            endpoints,
            routes,
            self.workloads.len()
        )
    }
}

/// The size of `value` as JSON, counted without holding the text.
pub fn json_size(value: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Serializing these types cannot fail; a failure counts as too large.
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

/// The checks that run before the YAML parser: size, nesting depth, an empty document.
fn precheck(yaml: &str) -> Result<(), ConfigError> {
    let err = |message: String| ConfigError {
        path: "<yaml>".into(),
        message,
    };
    if yaml.len() > MAX_MESH_BYTES {
        return Err(err(format!(
            "the mesh config is {} bytes, more than the limit of {} bytes (16 MiB)",
            yaml.len(),
            MAX_MESH_BYTES
        )));
    }
    let deepest = nesting::scan(yaml, nesting::MAX_DEPTH);
    if deepest.depth > nesting::MAX_DEPTH {
        return Err(err(format!(
            "line {}: collections nested more than {} levels deep (indentation, [ and {{); \
             a mesh config needs about 8",
            deepest.line,
            nesting::MAX_DEPTH
        )));
    }
    let empty = yaml.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
    });
    if empty {
        return Err(err(
            "empty mesh file: nearly always a truncated write; an intentionally empty mesh is `{}`"
                .into(),
        ));
    }
    Ok(())
}

fn validate(raw: RawMesh, errors: &mut Errors) -> Mesh {
    unknown_keys(
        errors,
        "",
        &raw.unknown,
        &[
            "trust_domain",
            "unknown_destinations",
            "services",
            "workloads",
        ],
    );
    let trust_domain = match raw.trust_domain {
        None => DEFAULT_TRUST_DOMAIN.to_string(),
        Some(td) => {
            if let Err(e) = check_trust_domain(&td) {
                errors.push("trust_domain", e);
            }
            td
        }
    };
    let unknown_destinations =
        parse_unknown(errors, "unknown_destinations", &raw.unknown_destinations)
            .unwrap_or_default();
    let mut services = Vec::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut vips: HashMap<SocketAddr, String> = HashMap::new();
    for (i, s) in raw.services.into_iter().enumerate() {
        let at = format!("services[{i}]");
        // Known even when invalid, so workloads that call it get no second, misleading error.
        let id = format!(
            "{}/{}",
            s.namespace.as_deref().unwrap_or("default"),
            s.name.as_deref().unwrap_or_default()
        );
        if let Some(prev) = ids.insert(id.clone(), i) {
            errors.push(
                format!("{at}.name"),
                format!("duplicate service {} (also services[{prev}])", Quoted(&id)),
            );
        }
        if let Some(svc) = validate_service(errors, &at, s) {
            for (j, a) in svc.addresses.iter().enumerate() {
                if let Some(other) = vips.insert(*a, svc.id()) {
                    errors.push(
                        format!("{at}.addresses[{j}]"),
                        format!("{a} is already an address of service \"{other}\""),
                    );
                }
            }
            services.push(svc);
        }
    }
    let mut workloads = BTreeMap::new();
    for (i, w) in raw.workloads.into_iter().enumerate() {
        let at = format!("workloads[{i}]");
        unknown_keys(
            errors,
            &at,
            &w.unknown,
            &[
                "name",
                "service_account",
                "calls",
                "unknown_destinations",
                "default_policy",
                "servers",
            ],
        );
        let default_policy = match w.default_policy.as_deref().map(str::parse::<DefaultPolicy>) {
            None => DefaultPolicy::default(),
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                errors.push(format!("{at}.default_policy"), e);
                DefaultPolicy::default()
            }
        };
        let Some(wname) = required(errors, &at, "name", w.name.clone()) else {
            continue;
        };
        let id = match wname.parse::<WorkloadId>() {
            Ok(id) => id,
            Err(e) => {
                errors.push(format!("{at}.name"), e.to_string());
                continue;
            }
        };
        let service_account = w.service_account.filter(|sa| {
            let bad = !crate::api::is_dns_subdomain(sa);
            if bad {
                errors.push(
                    format!("{at}.service_account"),
                    format!(
                        "invalid service account {}: expected a DNS-1123 name (a-z, 0-9, '-', '.')",
                        Quoted(sa)
                    ),
                );
            }
            !bad
        });
        let ns = id.namespace();
        let calls = w.calls.map(|calls| {
            calls
                .iter()
                .enumerate()
                .filter_map(|(j, c)| {
                    let id = if c.contains('/') {
                        c.clone()
                    } else {
                        format!("{ns}/{c}")
                    };
                    if ids.contains_key(&id) {
                        Some(id)
                    } else {
                        errors.push(
                            format!("{at}.calls[{j}]"),
                            format!("unknown service {}", Quoted(c)),
                        );
                        None
                    }
                })
                .collect()
        });
        let unknown = parse_unknown(
            errors,
            &format!("{at}.unknown_destinations"),
            &w.unknown_destinations,
        );
        let mut ports = HashSet::new();
        let mut servers = Vec::new();
        for (j, srv) in w.servers.into_iter().enumerate() {
            let sat = format!("{at}.servers[{j}]");
            unknown_keys(errors, &sat, &srv.unknown, &["port", "allow", "plaintext"]);
            let Some(raw_port) = required(errors, &sat, "port", srv.port) else {
                continue;
            };
            let Some(port) = u16::try_from(raw_port).ok().filter(|p| *p != 0) else {
                errors.push(
                    format!("{sat}.port"),
                    format!("invalid port {raw_port}: expected 1-65535"),
                );
                continue;
            };
            if !ports.insert(port) {
                errors.push(
                    format!("{sat}.port"),
                    format!("port {port} has two policies"),
                );
            }
            let allow = srv
                .allow
                .iter()
                .enumerate()
                .filter_map(|(k, id)| {
                    id.parse::<IdentityMatch>()
                        .map_err(|e| errors.push(format!("{sat}.allow[{k}]"), e.to_string()))
                        .ok()
                })
                .collect();
            servers.push(ServerPolicy {
                port,
                allow,
                plaintext: srv.plaintext,
            });
        }
        if workloads.contains_key(&id) {
            errors.push(format!("{at}.name"), format!("duplicate workload \"{id}\""));
        }
        workloads.insert(
            id,
            Workload {
                service_account,
                calls,
                unknown_destinations: unknown,
                servers,
                default_policy,
            },
        );
    }
    Mesh {
        trust_domain,
        unknown_destinations,
        services,
        workloads,
    }
}

fn validate_service(errors: &mut Errors, at: &str, s: RawService) -> Option<Service> {
    let before = errors.0.len();
    unknown_keys(
        errors,
        at,
        &s.unknown,
        &[
            "name",
            "namespace",
            "addresses",
            "protocol",
            "endpoints",
            "routes",
            "breaker",
            "balancer",
        ],
    );
    let name = required(errors, at, "name", s.name).unwrap_or_default();
    if !name.is_empty() && !is_dns_label(&name) {
        errors.push(
            format!("{at}.name"),
            format!(
                "invalid name {}: 1-63 lower-case letters, digits and '-', starting and ending \
                 with a letter or digit",
                Quoted(&name)
            ),
        );
    }
    let namespace = s.namespace.unwrap_or_else(|| "default".to_string());
    if !is_dns_label(&namespace) {
        errors.push(
            format!("{at}.namespace"),
            format!(
                "invalid namespace {}: 1-63 lower-case letters, digits and '-', starting and \
                 ending with a letter or digit",
                Quoted(&namespace)
            ),
        );
    }
    if s.addresses.is_empty() {
        errors.push(
            format!("{at}.addresses"),
            "a service needs at least one address (IP:PORT)",
        );
    }
    let addresses: Vec<SocketAddr> = s
        .addresses
        .iter()
        .enumerate()
        .filter_map(|(j, a)| parse_addr(errors, format!("{at}.addresses[{j}]"), a))
        .collect();
    let protocol = match s.protocol.as_deref().unwrap_or("detect") {
        "detect" => ServiceProtocol::Detect,
        "http1" => ServiceProtocol::Http1,
        "http2" => ServiceProtocol::Http2,
        "grpc" => ServiceProtocol::Grpc,
        "opaque" => ServiceProtocol::Opaque,
        other => {
            errors.push(
                format!("{at}.protocol"),
                format!(
                    "unknown protocol {}: expected detect, http1, http2, grpc or opaque",
                    Quoted(other)
                ),
            );
            ServiceProtocol::Detect
        }
    };
    let mut endpoints = Vec::new();
    let mut seen = HashSet::new();
    for (j, e) in s.endpoints.into_iter().enumerate() {
        let eat = format!("{at}.endpoints[{j}]");
        unknown_keys(errors, &eat, &e.unknown, &["address", "identity", "weight"]);
        let weight = e.weight.unwrap_or(1);
        if !(1..=1000).contains(&weight) {
            errors.push(
                format!("{eat}.weight"),
                format!("weight {weight} is out of range 1-1000"),
            );
        }
        let identity = e
            .identity
            .as_deref()
            .and_then(|id| parse_identity(errors, format!("{eat}.identity"), id));
        let address = required(errors, &eat, "address", e.address.as_deref())
            .and_then(|a| parse_addr(errors, format!("{eat}.address"), a));
        if let Some(address) = address {
            if !seen.insert(address) {
                errors.push(
                    format!("{eat}.address"),
                    format!("duplicate endpoint {address}"),
                );
            }
            endpoints.push(Endpoint {
                address,
                identity,
                weight,
            });
        }
    }
    let mut routes = Vec::new();
    let mut names = HashSet::new();
    for (k, r) in s.routes.into_iter().enumerate() {
        let rat = format!("{at}.routes[{k}]");
        unknown_keys(
            errors,
            &rat,
            &r.unknown,
            &["name", "match", "timeout", "retry"],
        );
        unknown_keys(
            errors,
            &format!("{rat}.match"),
            &r.matches.unknown,
            &["path_prefix", "path", "method", "headers"],
        );
        let name = r.name.unwrap_or_else(|| format!("route-{k}"));
        if !is_dns_label(&name) {
            errors.push(
                format!("{rat}.name"),
                format!(
                    "invalid route name {}: 1-63 lower-case letters, digits and '-'",
                    Quoted(&name)
                ),
            );
        } else if !names.insert(name.clone()) {
            errors.push(
                format!("{rat}.name"),
                format!("duplicate route name \"{name}\""),
            );
        }
        let m = r.matches;
        for (key, value) in [("path_prefix", &m.path_prefix), ("path", &m.path)] {
            if let Some(p) = value.as_ref().filter(|p| !p.starts_with('/')) {
                errors.push(
                    format!("{rat}.match.{key}"),
                    format!("{} must start with /", Quoted(p)),
                );
            }
        }
        if let Some(method) = m
            .method
            .as_ref()
            .filter(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()))
        {
            errors.push(
                format!("{rat}.match.method"),
                format!("invalid method {}: expected e.g. GET", Quoted(method)),
            );
        }
        let mut headers = BTreeMap::new();
        for (h, v) in m.headers {
            match http::HeaderName::from_bytes(h.as_bytes()) {
                Ok(name) if name.as_str() == h => {
                    headers.insert(h, v);
                }
                _ => errors.push(
                    format!("{rat}.match.headers.{}", short_key(&h)),
                    format!(
                        "invalid header name {}: lower case token expected",
                        Quoted(&h)
                    ),
                ),
            }
        }
        let timeout_ms = r.timeout.as_ref().and_then(|t| match duration::parse(t) {
            Ok(d) if !d.is_zero() => Some(d.as_millis() as u64),
            Ok(_) => {
                errors.push(format!("{rat}.timeout"), "a timeout must be longer than 0");
                None
            }
            Err(e) => {
                errors.push(format!("{rat}.timeout"), e);
                None
            }
        });
        let retry = r.retry.map(|rt| {
            let rtat = format!("{rat}.retry");
            unknown_keys(
                errors,
                &rtat,
                &rt.unknown,
                &[
                    "attempts",
                    "budget",
                    "on",
                    "grpc_on",
                    "backoff",
                    "non_idempotent",
                ],
            );
            let attempts = required(errors, &rtat, "attempts", rt.attempts).unwrap_or(0);
            if attempts > 10 {
                errors.push(
                    format!("{rat}.retry.attempts"),
                    format!("{attempts} attempts is more than 10"),
                );
            }
            let budget = rt.budget.as_deref().unwrap_or("20%");
            let budget_percent = match budget
                .strip_suffix('%')
                .and_then(|n| n.trim().parse::<u32>().ok())
            {
                Some(p) if (1..=100).contains(&p) => p,
                _ => {
                    errors.push(
                        format!("{rat}.retry.budget"),
                        format!(
                            "invalid budget {}: expected a percentage, e.g. 20%",
                            Quoted(budget)
                        ),
                    );
                    20
                }
            };
            let statuses = rt
                .on
                .unwrap_or_else(crate::api::default_retry_statuses);
            for status in &statuses {
                if !(500..=599).contains(status) {
                    errors.push(
                        format!("{rat}.retry.on"),
                        format!("{status} is not a 5xx status (only server errors are retried)"),
                    );
                }
            }
            let grpc_codes = match rt.grpc_on {
                None => crate::api::default_retry_grpc_codes(),
                Some(names) => names
                    .iter()
                    .filter_map(|n| match grpc_code(n) {
                        Some(c) => Some(c),
                        None => {
                            errors.push(
                                format!("{rat}.retry.grpc_on"),
                                format!(
                                    "unknown gRPC status {}: expected a name such as unavailable or resource-exhausted",
                                    Quoted(n)
                                ),
                            );
                            None
                        }
                    })
                    .collect(),
            };
            let backoff_ms = match rt.backoff.as_deref().map(duration::parse) {
                None => crate::api::default_retry_backoff_ms(),
                Some(Ok(d)) if d <= std::time::Duration::from_secs(10) => d.as_millis() as u64,
                Some(Ok(_)) => {
                    errors.push(format!("{rat}.retry.backoff"), "must be at most 10s");
                    0
                }
                Some(Err(e)) => {
                    errors.push(format!("{rat}.retry.backoff"), e);
                    0
                }
            };
            RetryPolicy {
                attempts,
                budget_percent,
                statuses,
                grpc_codes,
                backoff_ms,
                non_idempotent: rt.non_idempotent.unwrap_or(false),
            }
        });
        routes.push(Route {
            name,
            matches: RouteMatch {
                path_prefix: m.path_prefix,
                path: m.path,
                method: m.method,
                headers,
            },
            timeout_ms,
            retry,
        });
    }
    let breaker = s.breaker.map(|b| {
        let bat = format!("{at}.breaker");
        unknown_keys(
            errors,
            &bat,
            &b.unknown,
            &["consecutive_failures", "open_for"],
        );
        let consecutive_failures =
            required(errors, &bat, "consecutive_failures", b.consecutive_failures);
        let open_for =
            required(errors, &bat, "open_for", b.open_for).unwrap_or_else(|| "1s".into());
        let consecutive_failures = consecutive_failures.unwrap_or(1);
        if consecutive_failures == 0 {
            errors.push(
                format!("{at}.breaker.consecutive_failures"),
                "must be at least 1",
            );
        }
        let open_ms = match duration::parse(&open_for) {
            Ok(d) if !d.is_zero() => d.as_millis() as u64,
            Ok(_) => {
                errors.push(format!("{at}.breaker.open_for"), "must be longer than 0");
                0
            }
            Err(e) => {
                errors.push(format!("{at}.breaker.open_for"), e);
                0
            }
        };
        Breaker {
            consecutive_failures,
            open_ms,
        }
    });
    let balancer = match s.balancer.as_deref().unwrap_or("p2c-ewma") {
        "round-robin" => Balancer::RoundRobin,
        "p2c-ewma" => Balancer::P2cEwma,
        other => {
            errors.push(
                format!("{at}.balancer"),
                format!(
                    "unknown balancer {}: expected round-robin or p2c-ewma",
                    Quoted(other)
                ),
            );
            Balancer::P2cEwma
        }
    };
    (errors.0.len() == before).then_some(Service {
        name,
        namespace,
        addresses,
        protocol,
        endpoints,
        routes,
        breaker,
        balancer,
    })
}

/// The gRPC status code of a retry condition's name (`unavailable`, `resource-exhausted`, ...,
/// as the gRPC spec names them, in kebab case).
fn grpc_code(name: &str) -> Option<u16> {
    const NAMES: [&str; 17] = [
        "ok",
        "cancelled",
        "unknown",
        "invalid-argument",
        "deadline-exceeded",
        "not-found",
        "already-exists",
        "permission-denied",
        "resource-exhausted",
        "failed-precondition",
        "aborted",
        "out-of-range",
        "unimplemented",
        "internal",
        "unavailable",
        "data-loss",
        "unauthenticated",
    ];
    let name = name.trim().to_ascii_lowercase().replace('_', "-");
    NAMES.iter().position(|n| *n == name).map(|i| i as u16)
}
