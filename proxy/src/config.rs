//! The proxy's static configuration: command-line flags (each also read from `OUTRIDER_<FLAG>`),
//! parsed into real types in one step. Bad values are reported with the flag that carries them and
//! end the process with exit code 2 before anything is bound.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use outrider_iptables_init::ports;

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

/// Which HTTP version the proxy speaks to upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpstreamHttp {
    /// The client's own version (transparent; right for sidecars).
    Same,
    /// Always HTTP/1.1 (an upstream that only speaks HTTP/1.1 behind h2c clients).
    Http1,
    /// Always HTTP/2 prior knowledge (an h2c-only upstream behind HTTP/1.1 clients).
    Http2,
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
    /// The control plane's watch API, e.g. http://127.0.0.1:15012. Needs --workload.
    #[arg(long, env = "OUTRIDER_CONTROL", value_name = "URL")]
    pub control: Option<String>,
    /// This proxy's workload, `namespace/name` (in Kubernetes, from the downward API).
    #[arg(long, env = "OUTRIDER_WORKLOAD", value_name = "NAMESPACE/NAME")]
    pub workload: Option<String>,
    /// Worker threads. Default: the CPU quota of this process's cgroup, else the available cores.
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
    /// Destination ports that skip protocol detection (server-speaks-first protocols).
    #[arg(long, env = "OUTRIDER_OPAQUE_PORTS", value_name = "P,...", value_delimiter = ',',
          default_values_t = DEFAULT_OPAQUE_PORTS.to_vec(), value_parser = parse_port)]
    pub opaque_ports: Vec<u16>,
    /// HTTP version towards upstreams: `same` as the client, or always `http1` / `http2`.
    #[arg(
        long,
        env = "OUTRIDER_UPSTREAM_HTTP",
        value_enum,
        default_value = "same"
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
    /// After shutdown starts, how long outbound traffic keeps being served (the app may still be
    /// finishing its own work).
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
    /// This proxy's workload.
    pub workload: Option<String>,
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
    /// HTTP version towards upstreams.
    pub upstream_http: UpstreamHttp,
    /// Largest request header block, bytes.
    pub max_header_bytes: u32,
    /// HTTP/1 header read timeout.
    pub header_read_timeout: Duration,
    /// HTTP connection idle timeout.
    pub http_idle_timeout: Duration,
    /// Opaque TCP idle timeout.
    pub tcp_idle_timeout: Duration,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Open connections per listener.
    pub max_connections: usize,
    /// Outbound drain window after shutdown starts.
    pub drain_window: Duration,
    /// Hard shutdown deadline.
    pub shutdown_grace: Duration,
}

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
    pub fn from_args(args: ProxyArgs) -> Result<Self, ConfigError> {
        let local_mode = !args.forwards.is_empty();
        let inbound = args
            .inbound
            .or((!local_mode).then(|| SocketAddr::from(([0, 0, 0, 0], ports::INBOUND))));
        let outbound = args
            .outbound
            .or((!local_mode).then(|| SocketAddr::from(([127, 0, 0, 1], ports::OUTBOUND))));
        let config = Config {
            inbound,
            outbound,
            admin: args.admin,
            forwards: args.forwards,
            control: args.control,
            workload: args.workload,
            workers: args
                .workers
                .map(usize::from)
                .unwrap_or_else(default_workers),
            log_format: args.log_format,
            detect_timeout: args.detect_timeout,
            detect_max_bytes: 8 * 1024,
            opaque_ports: args.opaque_ports,
            upstream_http: args.upstream_http,
            max_header_bytes: args.max_header_bytes,
            header_read_timeout: args.header_read_timeout,
            http_idle_timeout: args.http_idle_timeout,
            tcp_idle_timeout: args.tcp_idle_timeout,
            connect_timeout: args.connect_timeout,
            max_connections: args.max_connections as usize,
            drain_window: args.drain_window,
            shutdown_grace: args.shutdown_grace,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut listeners: Vec<(&'static str, SocketAddr)> = vec![("--admin", self.admin)];
        listeners.extend(self.inbound.map(|a| ("--inbound", a)));
        listeners.extend(self.outbound.map(|a| ("--outbound", a)));
        listeners.extend(self.forwards.iter().map(|f| ("--forward", f.listen)));
        for (i, (flag, addr)) in listeners.iter().enumerate() {
            if addr.port() == 0 {
                continue;
            }
            if let Some((other, _)) = listeners[..i].iter().find(|(_, a)| a == addr) {
                return Err(ConfigError {
                    flag,
                    reason: format!("{addr} is already used by {other}"),
                });
            }
        }
        for f in &self.forwards {
            if f.listen == f.upstream {
                return Err(ConfigError {
                    flag: "--forward",
                    reason: format!(
                        "{}={}: the upstream is the listener itself",
                        f.listen, f.upstream
                    ),
                });
            }
        }
        match (&self.control, &self.workload) {
            (Some(_), None) => {
                return Err(ConfigError {
                    flag: "--workload",
                    reason: "--control needs --workload NAMESPACE/NAME".into(),
                })
            }
            (None, Some(_)) => {
                return Err(ConfigError {
                    flag: "--control",
                    reason: "--workload needs --control URL".into(),
                })
            }
            (Some(url), Some(workload)) => {
                let workload: outrider_control::api::WorkloadId =
                    workload
                        .parse()
                        .map_err(|e: outrider_control::api::InvalidWorkloadId| ConfigError {
                            flag: "--workload",
                            reason: e.to_string(),
                        })?;
                outrider_control::client::Watcher::new(url, workload, Duration::from_secs(1))
                    .map_err(|e| ConfigError {
                        flag: "--control",
                        reason: e.to_string(),
                    })?;
            }
            (None, None) => {}
        }
        if self.drain_window > self.shutdown_grace {
            return Err(ConfigError {
                flag: "--drain-window",
                reason: format!(
                    "{} is longer than --shutdown-grace {}",
                    fmt_duration(self.drain_window),
                    fmt_duration(self.shutdown_grace)
                ),
            });
        }
        Ok(())
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
            "workload": self.workload,
            "detect_timeout": fmt_duration(self.detect_timeout),
            "detect_max_bytes": self.detect_max_bytes,
            "opaque_ports": self.opaque_ports,
            "upstream_http": format!("{:?}", self.upstream_http).to_lowercase(),
            "max_header_bytes": self.max_header_bytes,
            "header_read_timeout": fmt_duration(self.header_read_timeout),
            "http_idle_timeout": fmt_duration(self.http_idle_timeout),
            "tcp_idle_timeout": fmt_duration(self.tcp_idle_timeout),
            "connect_timeout": fmt_duration(self.connect_timeout),
            "max_connections": self.max_connections,
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
            workload: None,
            workers: 1,
            log_format: LogFormat::Plain,
            detect_timeout: Duration::from_secs(1),
            detect_max_bytes: 8 * 1024,
            opaque_ports: DEFAULT_OPAQUE_PORTS.to_vec(),
            upstream_http: UpstreamHttp::Same,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(300),
            tcp_idle_timeout: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(3),
            max_connections: 10_000,
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

fn resolve(s: &str) -> Option<SocketAddr> {
    if let Ok(addr) = s.parse() {
        return Some(addr);
    }
    s.to_socket_addrs().ok()?.next()
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

/// Worker threads from the CPU quota this process really has: the smallest cgroup v2 `cpu.max`
/// on the path from its own cgroup (read from `/proc/self/cgroup`) up to the root, else the
/// cgroup v1 `cpu.cfs_quota_us`, capped by the cores the scheduler lets it use.
pub fn default_workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let v2 = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| cgroup_v2_path(&s))
        .and_then(|path| {
            cgroup_ancestors(&path)
                .filter_map(|dir| {
                    std::fs::read_to_string(format!("/sys/fs/cgroup{dir}/cpu.max")).ok()
                })
                .filter_map(|s| cpu_quota_v2(&s))
                .min()
        });
    let quota = v2.or_else(|| {
        let q = std::fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").ok()?;
        let p = std::fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_period_us").ok()?;
        cpu_quota_v1(&q, &p)
    });
    quota.map_or(cores, |q| q.min(cores)).max(1)
}

/// The cgroup v2 path of this process from `/proc/self/cgroup` (the `0::/path` line).
pub fn cgroup_v2_path(proc_self_cgroup: &str) -> Option<String> {
    proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

/// `/a/b/c`, `/a/b`, `/a`, `` (the root): the cgroup and each of its ancestors.
fn cgroup_ancestors(path: &str) -> impl Iterator<Item = String> + '_ {
    let path = path.trim_end_matches('/');
    std::iter::successors(Some(path.to_string()), |p| {
        (!p.is_empty()).then(|| {
            p.rsplit_once('/')
                .map_or(String::new(), |(parent, _)| parent.to_string())
        })
    })
}

/// Cores granted by a cgroup v2 `cpu.max` line (`"max 100000"` is unlimited), rounded up.
pub fn cpu_quota_v2(cpu_max: &str) -> Option<usize> {
    let mut parts = cpu_max.split_whitespace();
    let quota = parts.next()?;
    let period: u64 = parts.next()?.parse().ok()?;
    if quota == "max" || period == 0 {
        return None;
    }
    let quota: u64 = quota.parse().ok()?;
    Some(quota.div_ceil(period).max(1) as usize)
}

/// Cores granted by cgroup v1 quota and period (`-1` is unlimited), rounded up.
pub fn cpu_quota_v1(quota: &str, period: &str) -> Option<usize> {
    let quota: i64 = quota.trim().parse().ok()?;
    let period: i64 = period.trim().parse().ok()?;
    if quota <= 0 || period <= 0 {
        return None;
    }
    Some((quota as u64).div_ceil(period as u64).max(1) as usize)
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
    fn cgroup_quotas() {
        assert_eq!(cpu_quota_v2("max 100000\n"), None);
        assert_eq!(cpu_quota_v2("150000 100000\n"), Some(2));
        assert_eq!(cpu_quota_v2("50000 100000"), Some(1));
        assert_eq!(cpu_quota_v2("garbage"), None);
        assert_eq!(cpu_quota_v1("-1", "100000"), None);
        assert_eq!(cpu_quota_v1("400000\n", "100000\n"), Some(4));
        assert_eq!(
            cgroup_v2_path("0::/kubepods/pod1/c1\n").as_deref(),
            Some("/kubepods/pod1/c1")
        );
        assert_eq!(cgroup_v2_path("12:cpu:/x\n"), None);
        let up: Vec<String> = cgroup_ancestors("/kubepods/pod1/c1").collect();
        assert_eq!(up, ["/kubepods/pod1/c1", "/kubepods/pod1", "/kubepods", ""]);
        assert_eq!(cgroup_ancestors("/").collect::<Vec<_>>(), [""]);
        assert!(default_workers() >= 1);
    }

    #[test]
    fn validation_names_the_flag() {
        let mut c = Config::local(vec![ForwardSpec {
            listen: "127.0.0.1:9000".parse().unwrap(),
            upstream: "127.0.0.1:9000".parse().unwrap(),
        }]);
        assert_eq!(c.validate().unwrap_err().flag, "--forward");
        c.forwards.clear();
        c.admin = "127.0.0.1:9001".parse().unwrap();
        c.inbound = Some("127.0.0.1:9001".parse().unwrap());
        let e = c.validate().unwrap_err();
        assert_eq!(e.flag, "--inbound");
        assert!(e.to_string().contains("--admin"));
        c.inbound = None;
        c.drain_window = Duration::from_secs(60);
        assert_eq!(c.validate().unwrap_err().flag, "--drain-window");
    }
}
