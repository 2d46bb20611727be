//! The proxy's static configuration: command-line flags (each also read from `OUTRIDER_<FLAG>`),
//! parsed into real types in one step. Bad values are reported with the flag that carries them and
//! end the process with exit code 2 before anything is bound.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use outrider_control::api::DefaultPolicy;
use outrider_iptables_init::ports;

/// Descriptors kept free of proxied connections (admin server, control plane, files).
pub const FD_RESERVE: u64 = 128;

/// How long an inbound connection that arrives before the first view is held for it.
pub const FIRST_VIEW_WAIT: Duration = Duration::from_secs(5);

/// Ports that skip protocol detection by default: server-speaks-first and binary protocols
/// (SMTP, submission, MySQL, Galera, PostgreSQL, Redis, Elasticsearch transport, memcached).
pub const DEFAULT_OPAQUE_PORTS: &[u16] = &[25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Which HTTP version the proxy speaks to upstreams (`--upstream-http`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpstreamHttp {
    /// The client's own version; an HTTP/2 request to an upstream that does not speak HTTP/2 is
    /// sent as HTTP/1.1 (remembered per upstream), except gRPC, which needs HTTP/2.
    Auto,
    /// The client's own version, strictly.
    Same,
    /// Always HTTP/1.1.
    Http1,
    /// Always HTTP/2 prior knowledge.
    Http2,
}

/// Where inbound traffic is forwarded in the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InboundTarget {
    /// The original destination (the pod's own address and port), so a service listening only
    /// on loopback inside the pod is not exposed to other pods (as Istio does since 1.10).
    OrigDst,
    /// Loopback at the original port (the older behaviour: reaches loopback-only listeners).
    Loopback,
}

/// Flags of `outrider proxy` (DESIGN.md section 8).
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Inbound listener (sidecar mode). Defaults to 0.0.0.0:15006 unless --forward is given.
    #[arg(long, env = "OUTRIDER_INBOUND", value_name = "ADDR")]
    pub inbound: Option<SocketAddr>,
    /// Outbound listener (sidecar mode). Defaults to 127.0.0.1:15001 unless --forward is given.
    #[arg(long, env = "OUTRIDER_OUTBOUND", value_name = "ADDR")]
    pub outbound: Option<SocketAddr>,
    /// Admin server (/live, /ready, /metrics, /config, /log-level, /shutdown).
    #[arg(
        long,
        env = "OUTRIDER_ADMIN",
        value_name = "ADDR",
        default_value = "127.0.0.1:15020"
    )]
    pub admin: SocketAddr,
    /// Local mode: a fixed listener and upstream, e.g. 127.0.0.1:8080=127.0.0.1:3000. Repeatable.
    #[arg(long = "forward", env = "OUTRIDER_FORWARD", value_name = "LISTEN=UPSTREAM",
          value_delimiter = ',', value_parser = parse_forward)]
    pub forwards: Vec<ForwardSpec>,
    /// The control plane, e.g. https://outrider-control:15012 (with --trust-anchors), or
    /// http://127.0.0.1:15012 for local development (plaintext, with a warning). Needs --workload.
    #[arg(long, env = "OUTRIDER_CONTROL", value_name = "URL")]
    pub control: Option<String>,
    /// The mesh's trust anchors (PEM roots) that the control plane's certificate must chain to;
    /// required when --control is https://.
    #[arg(long, env = "OUTRIDER_TRUST_ANCHORS", value_name = "FILE")]
    pub trust_anchors: Option<std::path::PathBuf>,
    /// This proxy's workload, `namespace/name` (in Kubernetes, from the downward API).
    #[arg(long, env = "OUTRIDER_WORKLOAD", value_name = "NAMESPACE/NAME")]
    pub workload: Option<String>,
    /// The bootstrap token (from `outrider control token`) that entitles this proxy to one
    /// identity. With it, the proxy gets a certificate from --control and speaks mutual TLS to
    /// meshed endpoints; /ready waits for the first certificate. Read again at every renewal.
    #[arg(long, env = "OUTRIDER_IDENTITY_TOKEN_FILE", value_name = "FILE")]
    pub identity_token_file: Option<std::path::PathBuf>,
    /// The mesh's trust domain, for a projected ServiceAccount token in --identity-token-file
    /// (it names only the namespace and account; an Outrider token names its whole identity).
    #[arg(long, env = "OUTRIDER_TRUST_DOMAIN", value_name = "TD",
          default_value = crate::identity::token::DEFAULT_TRUST_DOMAIN,
          value_parser = |s: &str| outrider_control::api::check_trust_domain(s).map(|()| s.to_string()))]
    pub trust_domain: String,
    /// Who may call the inbound ports before the first view from the control plane arrives (a
    /// connection is first held up to 5 s for it): `deny` (fail closed), `mesh-only` (any mesh
    /// identity, no plaintext caller) or `allow-all`. App probes on the admin port are not
    /// affected.
    #[arg(long, env = "OUTRIDER_DEFAULT_INBOUND_POLICY", value_name = "POLICY",
          default_value = "deny", value_parser = parse_default_policy)]
    pub default_inbound_policy: DefaultPolicy,
    /// How long an inbound mutual TLS handshake may take.
    #[arg(long, env = "OUTRIDER_TLS_HANDSHAKE_TIMEOUT", value_name = "DUR", default_value = "5s",
          value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,
    /// Worker threads. Default: the cores this process may use (its CPU affinity and cgroup quota).
    #[arg(long, env = "OUTRIDER_WORKERS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,
    /// Log format.
    #[arg(long, env = "OUTRIDER_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,
    /// How long protocol detection waits for the client's first bytes before treating the
    /// connection as opaque TCP.
    #[arg(long, env = "OUTRIDER_DETECT_TIMEOUT", value_name = "DUR", default_value = "1s",
          value_parser = parse_duration)]
    pub detect_timeout: Duration,
    /// Where inbound traffic goes: the original destination (`orig-dst`, the pod's address, so
    /// loopback-only listeners stay private) or `loopback` at the original port.
    #[arg(
        long,
        env = "OUTRIDER_INBOUND_TARGET",
        value_enum,
        default_value = "orig-dst"
    )]
    pub inbound_target: InboundTarget,
    /// Destination ports that skip protocol detection (server-speaks-first protocols).
    #[arg(long, env = "OUTRIDER_OPAQUE_PORTS", value_name = "P,...", value_delimiter = ',',
          default_values_t = DEFAULT_OPAQUE_PORTS.to_vec(), value_parser = parse_port)]
    pub opaque_ports: Vec<u16>,
    /// The app's HTTP probes answered on the admin port at `/app-probe/<container>/<kind>`
    /// (JSON written by `outrider inject`; see `app_probe`).
    #[arg(long, env = crate::app_probe::ENV, value_name = "JSON", value_parser = crate::app_probe::parse)]
    pub app_probes: Option<crate::app_probe::AppProbes>,
    /// HTTP version towards upstreams: `auto` (the client's, falling back to HTTP/1.1 for an
    /// upstream that does not speak HTTP/2, except gRPC), `same` (strictly the client's), or always
    /// `http1` / `http2`.
    #[arg(
        long,
        env = "OUTRIDER_UPSTREAM_HTTP",
        value_enum,
        default_value = "auto"
    )]
    pub upstream_http: UpstreamHttp,
    /// Largest HTTP request header block accepted (bytes); larger requests get 431.
    #[arg(long, env = "OUTRIDER_MAX_HEADER_BYTES", default_value_t = 64 * 1024,
          value_parser = clap::value_parser!(u32).range(8192..=16 * 1024 * 1024))]
    pub max_header_bytes: u32,
    /// How long an HTTP/1 client may take to send a request's headers.
    #[arg(long, env = "OUTRIDER_HEADER_READ_TIMEOUT", value_name = "DUR", default_value = "10s",
          value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// An HTTP connection with no request in flight and no bytes moving is closed after this.
    #[arg(long, env = "OUTRIDER_HTTP_IDLE_TIMEOUT", value_name = "DUR", default_value = "5m",
          value_parser = parse_duration)]
    pub http_idle_timeout: Duration,
    /// An HTTP connection with requests in flight but no byte moving either way on it (a hung
    /// upstream, a stalled upload) is closed after this.
    #[arg(long, env = "OUTRIDER_STREAM_IDLE_TIMEOUT", value_name = "DUR", default_value = "5m",
          value_parser = parse_duration)]
    pub stream_idle_timeout: Duration,
    /// Local mode: the time every request's response headers may take (504 request-timeout
    /// after it). A route's own timeout wins. Default: none.
    #[arg(long, env = "OUTRIDER_REQUEST_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
    pub request_timeout: Option<Duration>,
    /// An opaque TCP connection with no bytes moving either way is closed after this.
    #[arg(long, env = "OUTRIDER_TCP_IDLE_TIMEOUT", value_name = "DUR", default_value = "1h",
          value_parser = parse_duration)]
    pub tcp_idle_timeout: Duration,
    /// Timeout for connecting to an upstream; longer than TCP's 1 s initial SYN retransmission, so
    /// one lost SYN does not fail the connection.
    #[arg(long, env = "OUTRIDER_CONNECT_TIMEOUT", value_name = "DUR", default_value = "3s",
          value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Open connections per listener; beyond it the listener stops accepting until one closes.
    #[arg(long, env = "OUTRIDER_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Connections open at once to one upstream address (HTTP pools and opaque TCP together);
    /// past it new ones fail at once with 503 `overloaded`.
    #[arg(long, env = "OUTRIDER_MAX_UPSTREAM_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_upstream_connections: u32,
    /// Outbound requests in flight to one endpoint (an HTTP/2 connection's queue included);
    /// at the bound the endpoint is not ready and the balancer picks another, or, when none is
    /// ready, the request is answered at once with 503 `overloaded`.
    #[arg(long, env = "OUTRIDER_MAX_IN_FLIGHT_PER_ENDPOINT", default_value_t = 1_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight_per_endpoint: u32,
    /// Outbound requests in flight to one service (all its endpoints); past it, 503
    /// `overloaded` at once.
    #[arg(long, env = "OUTRIDER_MAX_IN_FLIGHT_PER_SERVICE", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight_per_service: u32,
    /// After shutdown starts, how long every listener keeps accepting and serving (Kubernetes
    /// keeps sending for a while after a pod starts terminating; the app may still be finishing
    /// its own work). Inbound and local-mode connections answer with `Connection: close` or
    /// GOAWAY meanwhile.
    #[arg(long, env = "OUTRIDER_DRAIN_WINDOW", value_name = "DUR", default_value = "5s",
          value_parser = parse_duration)]
    pub drain_window: Duration,
    /// Hard deadline after shutdown starts: connections still open then are dropped.
    #[arg(long, env = "OUTRIDER_SHUTDOWN_GRACE", value_name = "DUR", default_value = "30s",
          value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

/// A local-mode listener and its fixed upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardSpec {
    /// Where the proxy listens.
    pub listen: SocketAddr,
    /// Where it forwards every connection.
    pub upstream: SocketAddr,
}

/// The effective proxy configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Inbound listener, if bound.
    pub inbound: Option<SocketAddr>,
    /// Outbound listener, if bound.
    pub outbound: Option<SocketAddr>,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Local-mode listeners.
    pub forwards: Vec<ForwardSpec>,
    /// The control plane's URL.
    pub control: Option<String>,
    /// The trust anchors file (`--trust-anchors`).
    pub trust_anchors: Option<std::path::PathBuf>,
    /// TLS towards the control plane, verified against the roots of `control_trust`.
    pub control_tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// The roots the control plane's certificate may chain to (they follow the trust anchors
    /// file and the served bundle).
    pub control_trust: Option<std::sync::Arc<crate::identity::control_trust::ControlTrust>>,
    /// This proxy's workload.
    pub workload: Option<String>,
    /// The identity bootstrap token's file.
    pub identity_token_file: Option<std::path::PathBuf>,
    /// The trust domain of a projected token's identity.
    pub trust_domain: String,
    /// Who may call the inbound ports before the first view.
    pub default_inbound_policy: DefaultPolicy,
    /// How long an inbound connection is held for the first view before that default applies.
    pub first_view_wait: Duration,
    /// Inbound mutual TLS handshake timeout.
    pub tls_handshake_timeout: Duration,
    /// Worker threads.
    pub workers: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// Protocol detection bounds.
    pub detect_timeout: Duration,
    /// Most bytes read while detecting the protocol.
    pub detect_max_bytes: usize,
    /// Ports that skip detection.
    pub opaque_ports: Vec<u16>,
    /// The app's probes served at `/app-probe/...` (empty: none).
    pub app_probes: crate::app_probe::AppProbes,
    /// Where inbound traffic goes.
    pub inbound_target: InboundTarget,
    /// HTTP version towards upstreams.
    pub upstream_http: UpstreamHttp,
    /// Largest request header block, bytes.
    pub max_header_bytes: u32,
    /// HTTP/1 header read timeout.
    pub header_read_timeout: Duration,
    /// HTTP connection idle timeout.
    pub http_idle_timeout: Duration,
    /// No bytes either way with requests in flight: close.
    pub stream_idle_timeout: Duration,
    /// Default time to response headers (a route's timeout wins).
    pub request_timeout: Option<Duration>,
    /// Opaque TCP idle timeout.
    pub tcp_idle_timeout: Duration,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Open connections per listener.
    pub max_connections: usize,
    /// Open connections per upstream address.
    pub max_upstream_connections: usize,
    /// Outbound requests in flight per endpoint and per service.
    pub in_flight: Limits,
    /// Outbound drain window after shutdown starts.
    pub drain_window: Duration,
    /// Hard shutdown deadline.
    pub shutdown_grace: Duration,
}

/// Every problem found in the flags, reported at once.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// A configuration value that cannot be used, with the flag that carries it.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {reason}")]
pub struct ConfigError {
    /// The flag, e.g. `--forward`.
    pub flag: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl Config {
    /// Validates the flags and fills in mode-dependent defaults.
    pub fn from_args(args: ProxyArgs) -> Result<Self, ConfigErrors> {
        let local_mode = !args.forwards.is_empty();
        let inbound = args
            .inbound
            .or((!local_mode).then(|| SocketAddr::from(([0, 0, 0, 0], ports::INBOUND))));
        let outbound = args
            .outbound
            .or((!local_mode).then(|| SocketAddr::from(([127, 0, 0, 1], ports::OUTBOUND))));
        let mut config = Config {
            inbound,
            outbound,
            admin: args.admin,
            forwards: args.forwards,
            control: args.control,
            control_tls: None,
            control_trust: None,
            trust_anchors: args.trust_anchors,
            workload: args.workload,
            identity_token_file: args.identity_token_file,
            trust_domain: args.trust_domain,
            default_inbound_policy: args.default_inbound_policy,
            first_view_wait: FIRST_VIEW_WAIT,
            tls_handshake_timeout: args.tls_handshake_timeout,
            workers: args
                .workers
                .map(usize::from)
                .unwrap_or_else(default_workers),
            log_format: args.log_format,
            detect_timeout: args.detect_timeout,
            detect_max_bytes: 8 * 1024,
            opaque_ports: args.opaque_ports,
            app_probes: args.app_probes.unwrap_or_default(),
            inbound_target: args.inbound_target,
            upstream_http: args.upstream_http,
            max_header_bytes: args.max_header_bytes,
            header_read_timeout: args.header_read_timeout,
            http_idle_timeout: args.http_idle_timeout,
            stream_idle_timeout: args.stream_idle_timeout,
            request_timeout: args.request_timeout,
            tcp_idle_timeout: args.tcp_idle_timeout,
            connect_timeout: args.connect_timeout,
            max_connections: args.max_connections as usize,
            max_upstream_connections: args.max_upstream_connections as usize,
            in_flight: Limits {
                per_endpoint: args.max_in_flight_per_endpoint as usize,
                per_service: args.max_in_flight_per_service as usize,
            },
            drain_window: args.drain_window,
            shutdown_grace: args.shutdown_grace,
        };
        let mut errors = Vec::new();
        if let Some(path) = &config.trust_anchors {
            use crate::identity::control_trust::ControlTrust;
            match std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|pem| {
                    // The same checks as the control plane's own client (PEM, usable roots).
                    outrider_control::client::client_tls(&pem).map_err(|e| e.to_string())?;
                    let trust =
                        ControlTrust::new(Some(path.clone()), &pem).map_err(|e| e.to_string())?;
                    let tls = trust.client_config().map_err(|e| e.to_string())?;
                    Ok((trust, tls))
                }) {
                Ok((trust, tls)) => {
                    config.control_trust = Some(trust);
                    config.control_tls = Some(tls);
                }
                Err(e) => errors.push(ConfigError {
                    flag: "--trust-anchors",
                    reason: format!("{}: {e}", path.display()),
                }),
            }
        }
        errors.extend(config.validate());
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Every problem with the flags (empty when they are usable).
    fn validate(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let mut error = |flag, reason: String| errors.push(ConfigError { flag, reason });
        let mut listeners: Vec<(&'static str, SocketAddr)> = vec![("--admin", self.admin)];
        listeners.extend(self.inbound.map(|a| ("--inbound", a)));
        listeners.extend(self.outbound.map(|a| ("--outbound", a)));
        listeners.extend(self.forwards.iter().map(|f| ("--forward", f.listen)));
        for (i, (flag, addr)) in listeners.iter().enumerate() {
            if addr.port() == 0 {
                continue;
            }
            if let Some((other, _)) = listeners[..i].iter().find(|(_, a)| a == addr) {
                error(flag, format!("{addr} is already used by {other}"));
            }
        }
        for f in &self.forwards {
            if let Some(chain) = self.loop_through(f, &listeners) {
                error("--forward", chain);
            }
        }
        if self.identity_token_file.is_some() && self.control.is_none() {
            error(
                "--identity-token-file",
                "needs --control URL (the control plane issues the certificate)".into(),
            );
        }
        if self.identity_token_file.is_some()
            && self
                .control
                .as_deref()
                .is_some_and(|url| !url.trim().to_ascii_lowercase().starts_with("https://"))
        {
            error(
                "--identity-token-file",
                "needs an https:// --control (with --trust-anchors): over plaintext http:// the token would cross the network in clear and the mesh's trust anchors would come back unauthenticated".into(),
            );
        }
        match (&self.control, &self.workload) {
            (Some(_), None) => error(
                "--workload",
                "--control needs --workload NAMESPACE/NAME".into(),
            ),
            (None, Some(_)) => error("--control", "--workload needs --control URL".into()),
            (Some(url), Some(workload)) => {
                let parsed = workload.parse::<outrider_control::api::WorkloadId>();
                if let Err(e) = &parsed {
                    error("--workload", e.to_string());
                }
                // With a bad workload, the URL is still checked (against a stand-in), so both
                // problems are reported at once.
                let workload = parsed.ok().or_else(|| "check/url".parse().ok());
                // An unreadable --trust-anchors is reported on its own.
                let anchors_failed = self.trust_anchors.is_some() && self.control_tls.is_none();
                if let Some(workload) = workload.filter(|_| !anchors_failed) {
                    use outrider_control::client::{ControlUrlError, Watcher};
                    let watcher = Watcher::new(
                        url,
                        workload,
                        Duration::from_secs(1),
                        self.control_tls.clone(),
                    );
                    match watcher {
                        Ok(_) => {}
                        Err(ControlUrlError::HttpsWithoutTls { .. }) => error(
                            "--trust-anchors",
                            "required when --control is https:// (the mesh's root certificates, PEM)"
                                .into(),
                        ),
                        Err(ControlUrlError::TlsWithoutHttps { .. }) => error(
                            "--trust-anchors",
                            "given, but --control is plaintext http://; use https://".into(),
                        ),
                        Err(e) => error("--control", e.to_string()),
                    }
                }
            }
            (None, None) => {}
        }
        for (flag, d) in [
            ("--detect-timeout", self.detect_timeout),
            ("--header-read-timeout", self.header_read_timeout),
            ("--http-idle-timeout", self.http_idle_timeout),
            ("--stream-idle-timeout", self.stream_idle_timeout),
            ("--tcp-idle-timeout", self.tcp_idle_timeout),
            ("--connect-timeout", self.connect_timeout),
        ] {
            if d.is_zero() {
                error(
                    flag,
                    "must be longer than 0 (0 would close or fail every connection at once)".into(),
                );
            }
        }
        if self.request_timeout.is_some_and(|d| d.is_zero()) {
            error(
                "--request-timeout",
                "must be longer than 0; leave it out for none".into(),
            );
        }
        // Every listener keeps accepting for the drain window.
        if self.drain_window > self.shutdown_grace {
            error(
                "--drain-window",
                format!(
                    "{} is longer than --shutdown-grace {}",
                    fmt_duration(self.drain_window),
                    fmt_duration(self.shutdown_grace)
                ),
            );
        }
        errors
    }

    /// Why forwarding by `f` would come back into this proxy, if it would: its upstream is one
    /// of the proxy's own listeners (a wildcard listener matches every local address), directly
    /// or through other forwards. One request would otherwise multiply until the process runs
    /// out of file descriptors.
    fn loop_through(
        &self,
        f: &ForwardSpec,
        listeners: &[(&'static str, SocketAddr)],
    ) -> Option<String> {
        let (flag, listen) = listeners
            .iter()
            .find(|(_, l)| l.port() != 0 && is_listener_for(*l, f.upstream))?;
        let mut chain = vec![f.to_string()];
        if *flag == "--forward" {
            let mut next = self.forwards.iter().find(|g| g.listen == *listen);
            while let Some(g) = next {
                if chain.contains(&g.to_string()) {
                    break;
                }
                chain.push(g.to_string());
                next = self
                    .forwards
                    .iter()
                    .find(|h| h.listen.port() != 0 && is_listener_for(h.listen, g.upstream));
            }
        }
        Some(format!(
            "{f}: the upstream {} is this proxy's own {flag} listener {listen}, so requests would loop back into the proxy ({})",
            f.upstream,
            chain.join(" → ")
        ))
    }

    /// Fits the connection limits into `open_files` descriptors: each proxied connection holds
    /// two (client and upstream), every data listener may fill its `--max-connections`, and
    /// [`FD_RESERVE`] stay free for the admin server (`/live`, `/ready`), the control plane and
    /// files. Returns the limit it lowered `--max-connections` from, if it did: accepts then stop
    /// at the limit instead of failing with EMFILE, and a forwarding loop between two processes
    /// costs the limit, not every descriptor.
    pub fn fit_open_files(&mut self, open_files: u64) -> Option<usize> {
        let listeners = (self.forwards.len()
            + usize::from(self.inbound.is_some())
            + usize::from(self.outbound.is_some()))
        .max(1) as u64;
        let per_listener = open_files.saturating_sub(FD_RESERVE) / 2 / listeners;
        let fit = usize::try_from(per_listener).unwrap_or(usize::MAX).max(1);
        self.max_upstream_connections = self.max_upstream_connections.min(
            usize::try_from(open_files.saturating_sub(FD_RESERVE) / 2)
                .unwrap_or(usize::MAX)
                .max(1),
        );
        if self.max_connections > fit {
            let was = self.max_connections;
            self.max_connections = fit;
            return Some(was);
        }
        None
    }

    /// Protocol detection bounds: a connection silent on both sides for the header-read timeout
    /// after the detection timeout is closed.
    pub fn detect_bounds(&self) -> crate::detect::Bounds {
        crate::detect::Bounds {
            timeout: self.detect_timeout,
            max_bytes: self.detect_max_bytes,
            silence: self.header_read_timeout,
            server_may_speak_first: true,
            early_dial: None,
        }
    }

    /// The ports of the proxy's own listeners: traffic to them is never forwarded (loop prevention).
    pub fn own_ports(&self) -> Vec<u16> {
        let mut own = vec![
            ports::INBOUND,
            ports::OUTBOUND,
            ports::ADMIN,
            self.admin.port(),
        ];
        own.extend(self.inbound.map(|a| a.port()));
        own.extend(self.outbound.map(|a| a.port()));
        own.retain(|p| *p != 0);
        own.sort_unstable();
        own.dedup();
        own
    }

    /// The effective configuration as JSON, for the admin `/config` endpoint. Nothing in the static
    /// configuration is secret today; fields that become secret must be redacted here.
    pub fn to_json(&self) -> serde_json::Value {
        let addr = |a: Option<SocketAddr>| a.map(|a| a.to_string());
        serde_json::json!({
            "mode": if self.forwards.is_empty() { "sidecar" } else { "local" },
            "inbound": addr(self.inbound),
            "outbound": addr(self.outbound),
            "admin": self.admin.to_string(),
            "forwards": self.forwards.iter().map(|f| format!("{}={}", f.listen, f.upstream)).collect::<Vec<_>>(),
            "workers": self.workers,
            "control_url": self.control,
            "trust_anchors": self.trust_anchors.as_ref().map(|p| p.display().to_string()),
            "workload": self.workload,
            // The path only: the token itself is a secret and never shown.
            "identity_token_file": self.identity_token_file.as_ref().map(|p| p.display().to_string()),
            "trust_domain": self.trust_domain,
            "default_inbound_policy": self.default_inbound_policy.as_str(),
            "tls_handshake_timeout": fmt_duration(self.tls_handshake_timeout),
            "detect_timeout": fmt_duration(self.detect_timeout),
            "detect_max_bytes": self.detect_max_bytes,
            "opaque_ports": self.opaque_ports,
            "app_probes": self.app_probes.keys().collect::<Vec<_>>(),
            "inbound_target": format!("{:?}", self.inbound_target).to_lowercase(),
            "upstream_http": format!("{:?}", self.upstream_http).to_lowercase(),
            "max_header_bytes": self.max_header_bytes,
            "header_read_timeout": fmt_duration(self.header_read_timeout),
            "http_idle_timeout": fmt_duration(self.http_idle_timeout),
            "stream_idle_timeout": fmt_duration(self.stream_idle_timeout),
            "request_timeout": self.request_timeout.map(fmt_duration),
            "tcp_idle_timeout": fmt_duration(self.tcp_idle_timeout),
            "connect_timeout": fmt_duration(self.connect_timeout),
            "max_connections": self.max_connections,
            "max_upstream_connections": self.max_upstream_connections,
            "max_in_flight_per_endpoint": self.in_flight.per_endpoint,
            "max_in_flight_per_service": self.in_flight.per_service,
            "drain_window": fmt_duration(self.drain_window),
            "shutdown_grace": fmt_duration(self.shutdown_grace),
        })
    }

    /// A configuration for tests and the demo: local mode, ephemeral admin port, short timers.
    pub fn local(forwards: Vec<ForwardSpec>) -> Self {
        Config {
            inbound: None,
            outbound: None,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            forwards,
            control: None,
            trust_anchors: None,
            control_tls: None,
            control_trust: None,
            workload: None,
            identity_token_file: None,
            trust_domain: crate::identity::token::DEFAULT_TRUST_DOMAIN.into(),
            default_inbound_policy: DefaultPolicy::Deny,
            first_view_wait: FIRST_VIEW_WAIT,
            tls_handshake_timeout: Duration::from_secs(5),
            workers: 1,
            log_format: LogFormat::Plain,
            detect_timeout: Duration::from_secs(1),
            detect_max_bytes: 8 * 1024,
            opaque_ports: DEFAULT_OPAQUE_PORTS.to_vec(),
            app_probes: Default::default(),
            inbound_target: InboundTarget::OrigDst,
            upstream_http: UpstreamHttp::Auto,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(300),
            stream_idle_timeout: Duration::from_secs(300),
            request_timeout: None,
            tcp_idle_timeout: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(3),
            max_connections: 10_000,
            max_upstream_connections: 10_000,
            in_flight: Default::default(),
            drain_window: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl fmt::Display for ForwardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.listen, self.upstream)
    }
}

/// Parses `LISTEN=UPSTREAM`; the upstream may be a host name (`localhost:3000`), resolved once.
pub fn parse_forward(s: &str) -> Result<ForwardSpec, String> {
    let usage = "expected LISTEN=UPSTREAM, e.g. 127.0.0.1:8080=127.0.0.1:3000";
    let (listen, upstream) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` has no `=`: {usage}"))?;
    let listen: SocketAddr = listen
        .trim()
        .parse()
        .map_err(|_| format!("listen address `{listen}` is not IP:PORT: {usage}"))?;
    let upstream = resolve(upstream.trim()).ok_or_else(|| {
        format!("upstream `{upstream}` is not HOST:PORT or cannot be resolved: {usage}")
    })?;
    if upstream.port() == 0 {
        return Err(format!("upstream `{upstream}` has port 0"));
    }
    Ok(ForwardSpec { listen, upstream })
}

/// Whether a listener bound to `listen` receives connections made to `upstream`: the same port,
/// and the same address, or a wildcard bind and an address of this machine. Aliases count: an
/// IPv4-mapped IPv6 address is its IPv4 address, and connecting to `0.0.0.0` or `::` reaches
/// this machine (loopback).
fn is_listener_for(listen: SocketAddr, upstream: SocketAddr) -> bool {
    if listen.port() != upstream.port() {
        return false;
    }
    let canonical = |ip: std::net::IpAddr| ip.to_canonical();
    let (listen_ip, ip) = (canonical(listen.ip()), canonical(upstream.ip()));
    if listen_ip == ip {
        return true;
    }
    if ip.is_unspecified() {
        // A connection to the unspecified address goes to loopback.
        return listen_ip.is_unspecified() || listen_ip.is_loopback();
    }
    if !listen_ip.is_unspecified() {
        return false;
    }
    // An address of this machine is one a socket can bind to.
    ip.is_loopback() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

fn resolve(s: &str) -> Option<SocketAddr> {
    if let Ok(addr) = s.parse() {
        return Some(addr);
    }
    s.to_socket_addrs().ok()?.next()
}

/// Parses `deny`, `mesh-only` or `allow-all`.
pub fn parse_default_policy(s: &str) -> Result<DefaultPolicy, String> {
    s.trim().parse()
}

/// Parses a port in 1..=65535.
pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("`{s}` is not a port (1-65535)")),
        Ok(p) => Ok(p),
    }
}

/// Parses a duration such as `250ms`, `1s`, `5m`, `1h` (one number, one unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    outrider_control::duration::parse(s)
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn fmt_duration(d: Duration) -> String {
    outrider_control::duration::format(d)
}

/// Worker threads: the cores this process may use. `std::thread::available_parallelism` already
/// honours the CPU affinity mask and the cgroup v1 and v2 quotas (rounded down, at least 1).
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs() {
        let f = parse_forward("127.0.0.1:8080=127.0.0.1:3000").unwrap();
        assert_eq!(f.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(f.upstream, "127.0.0.1:3000".parse().unwrap());
        assert!(
            parse_forward("localhost:1=localhost:2").is_err(),
            "listen must be an IP"
        );
        assert!(parse_forward("127.0.0.1:1=localhost:2").is_ok());
        assert!(parse_forward("127.0.0.1:8080")
            .unwrap_err()
            .contains("no `=`"));
        assert!(parse_forward("127.0.0.1:8080=nope")
            .unwrap_err()
            .contains("upstream"));
        assert!(parse_forward("127.0.0.1:8080=127.0.0.1:0")
            .unwrap_err()
            .contains("port 0"));
    }

    #[test]
    fn every_problem_is_reported_with_its_flag() {
        let spec = |l: &str, u: &str| ForwardSpec {
            listen: l.parse().unwrap(),
            upstream: u.parse().unwrap(),
        };
        let mut c = Config::local(vec![spec("127.0.0.1:9000", "127.0.0.1:9000")]);
        c.admin = "127.0.0.1:9001".parse().unwrap();
        c.inbound = Some("127.0.0.1:9001".parse().unwrap());
        c.outbound = Some("127.0.0.1:9002".parse().unwrap());
        c.drain_window = Duration::from_secs(60);
        let errors = c.validate();
        let flags: Vec<&str> = errors.iter().map(|e| e.flag).collect();
        assert_eq!(
            flags,
            ["--inbound", "--forward", "--drain-window"],
            "{errors:?}"
        );
        assert!(errors[0].to_string().contains("--admin"));

        // A cycle between two forwards, and a wildcard listener forwarding to itself.
        let c = Config::local(vec![
            spec("127.0.0.1:9010", "127.0.0.1:9011"),
            spec("127.0.0.1:9011", "127.0.0.1:9010"),
        ]);
        let errors = c.validate();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0]
                .reason
                .contains("127.0.0.1:9010=127.0.0.1:9011 → 127.0.0.1:9011=127.0.0.1:9010"),
            "{}",
            errors[0]
        );
        let c = Config::local(vec![spec("0.0.0.0:9020", "127.0.0.1:9020")]);
        assert_eq!(c.validate().len(), 1);
        // Aliases of a listener: the unspecified address and IPv4-mapped IPv6 forms.
        for upstream in [
            "0.0.0.0:9021",
            "[::ffff:127.0.0.1]:9021",
            "[::ffff:7f00:1]:9021",
            "[::]:9021",
        ] {
            let c = Config::local(vec![spec("127.0.0.1:9021", upstream)]);
            assert_eq!(c.validate().len(), 1, "{upstream}");
        }
        let c = Config::local(vec![spec("[::]:9022", "[::ffff:127.0.0.1]:9022")]);
        assert_eq!(c.validate().len(), 1);
        let mut c = Config::local(vec![]);
        c.stream_idle_timeout = Duration::ZERO;
        c.request_timeout = Some(Duration::ZERO);
        let flags: Vec<&str> = c.validate().iter().map(|e| e.flag).collect();
        assert_eq!(flags, ["--stream-idle-timeout", "--request-timeout"]);
        // Local-mode listeners keep accepting for the drain window too.
        let mut c = Config::local(vec![spec("127.0.0.1:9030", "127.0.0.1:9031")]);
        c.drain_window = Duration::from_secs(60);
        let flags: Vec<&str> = c.validate().iter().map(|e| e.flag).collect();
        assert_eq!(flags, ["--drain-window"]);
    }

    #[test]
    fn a_token_is_never_sent_to_a_plaintext_control_plane() {
        let with = |url: &str| {
            let mut c = Config::local(vec![]);
            c.control = Some(url.into());
            c.workload = Some("demo/web".into());
            c.identity_token_file = Some("token".into());
            c.validate()
        };
        let errors = with("http://127.0.0.1:15012");
        assert!(
            errors
                .iter()
                .any(|e| e.flag == "--identity-token-file" && e.reason.contains("https://")),
            "{errors:?}"
        );
        assert!(with("HTTP://127.0.0.1:15012")
            .iter()
            .any(|e| e.flag == "--identity-token-file"));
        // https:// is fine as far as the token goes (it then needs --trust-anchors).
        let errors = with("https://127.0.0.1:15012");
        assert!(
            errors.iter().all(|e| e.flag != "--identity-token-file"),
            "{errors:?}"
        );
    }

    #[test]
    fn connection_limits_fit_the_open_file_limit_with_a_reserve() {
        let spec = |l: &str, u: &str| ForwardSpec {
            listen: l.parse().unwrap(),
            upstream: u.parse().unwrap(),
        };
        let mut c = Config::local(vec![spec("127.0.0.1:9000", "127.0.0.1:9001")]);
        assert_eq!(c.fit_open_files(512), Some(10_000));
        assert_eq!(c.max_connections, (512 - 128) / 2);
        assert_eq!(c.max_upstream_connections, (512 - 128) / 2);
        // Two listeners share the budget; a large limit changes nothing.
        let mut c = Config::local(vec![
            spec("127.0.0.1:9000", "127.0.0.1:9001"),
            spec("127.0.0.1:9002", "127.0.0.1:9003"),
        ]);
        assert_eq!(c.fit_open_files(1024), Some(10_000));
        assert_eq!(c.max_connections, (1024 - 128) / 4);
        let mut c = Config::local(vec![spec("127.0.0.1:9000", "127.0.0.1:9001")]);
        assert_eq!(c.fit_open_files(1 << 20), None);
        assert_eq!(c.max_connections, 10_000);
        // Even a tiny limit leaves one connection.
        assert_eq!(c.fit_open_files(10), Some(10_000));
        assert_eq!(c.max_connections, 1);
    }
}

/// Bounds on requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests in flight to one endpoint (its HTTP/2 queue included) before it is not ready.
    pub per_endpoint: usize,
    /// Requests in flight to one service (all its endpoints) before requests are shed.
    pub per_service: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_endpoint: 1_000,
            per_service: 10_000,
        }
    }
}
