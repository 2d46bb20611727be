//! `outrider wait`: the dependency-wait init container. Every target is tried at once, each
//! attempt in two steps so the failure says which: resolve the name (a name that does not resolve
//! is the common mistake: a Service in another namespace, a typo), then connect (`--tcp`) or
//! `GET` and expect a 2xx, or the `--http-status` range (`--http`, plain `http://` only); a TCP
//! connection must stay open for `--settle` (a sidecar proxy accepts every connection, and
//! closes it when it cannot reach the target). Failed attempts are retried with jittered
//! exponential backoff (100 ms doubling up to 5 s), one progress line per target per attempt
//! on stderr, each with the time since the start. Exit 0 when every target answered, 1
//! at `--timeout` with the targets still unreachable and why, 2 on bad usage; on SIGTERM or
//! Ctrl-C one line names what was still pending (exit 143 or 130).
//!
//! What is echoed is safe to log: credentials in a URL (`http://user:pass@host/`) are never
//! printed, and control characters (terminal escapes) are shown escaped.

use std::fmt;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use outrider_control::client::Backoff;
use tokio::net::TcpStream;

/// Flags of `outrider wait`.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// A TCP dependency, `HOST:PORT` (repeatable), e.g. `postgres-service:5432`.
    #[arg(long = "tcp", value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub tcp: Vec<HostPort>,
    /// An HTTP dependency that must answer `GET` with a 2xx, `http://HOST[:PORT]/PATH`
    /// (repeatable; plain HTTP only).
    #[arg(long = "http", value_name = "URL", value_parser = parse_http_url)]
    pub http: Vec<http::Uri>,
    /// The HTTP statuses that count as up, `LOW-HIGH` (e.g. `200-399` to accept redirects).
    #[arg(long, value_name = "LOW-HIGH", default_value = "200-299", value_parser = parse_status_range)]
    pub http_status: StatusRange,
    /// Give up after this long (e.g. 30s, 5m).
    #[arg(long, value_name = "DUR", default_value = "5m", value_parser = outrider_control::duration::parse)]
    pub timeout: Duration,
    /// How long one attempt (DNS, connect, the HTTP answer) may take.
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = outrider_control::duration::parse)]
    pub attempt_timeout: Duration,
    /// After a `--tcp` connect, how long the connection must stay open (0 to skip): in a
    /// meshed pod the sidecar accepts every connection and resets it (within about 25 ms) when
    /// the target refuses it, so a bare connect would always succeed.
    #[arg(long, value_name = "DUR", default_value = "500ms", value_parser = outrider_control::duration::parse)]
    pub settle: Duration,
}

/// The HTTP statuses an `--http` target may answer, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    /// Lowest accepted status.
    pub low: u16,
    /// Highest accepted status.
    pub high: u16,
}

impl StatusRange {
    /// 2xx.
    pub const SUCCESS: StatusRange = StatusRange {
        low: 200,
        high: 299,
    };

    fn contains(self, status: u16) -> bool {
        (self.low..=self.high).contains(&status)
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == StatusRange::SUCCESS {
            f.write_str("2xx")
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

/// Parses `200-399` (or one status, `204`).
pub fn parse_status_range(s: &str) -> Result<StatusRange, String> {
    let bad = || {
        format!(
            "`{}` is not a status range LOW-HIGH (e.g. 200-399)",
            safe(s)
        )
    };
    let (low, high) = s.split_once('-').unwrap_or((s, s));
    let status = |t: &str| {
        t.trim()
            .parse::<u16>()
            .ok()
            .filter(|c| (100..=599).contains(c))
    };
    match (status(low), status(high)) {
        (Some(low), Some(high)) if low <= high => Ok(StatusRange { low, high }),
        _ => Err(bad()),
    }
}

/// A `HOST:PORT` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// Name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port, 1-65535.
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = safe(&self.host);
        if self.host.contains(':') {
            write!(f, "[{host}]:{}", self.port)
        } else {
            write!(f, "{host}:{}", self.port)
        }
    }
}

/// `s` with control characters escaped (`\u{1b}`), so no input reaches the terminal raw.
pub fn safe(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// A URL as it may be logged: without its credentials (`user:password@`), escaped.
pub fn redacted(uri: &http::Uri) -> String {
    let host = uri.host().unwrap_or_default();
    let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let scheme = uri.scheme_str().unwrap_or("http");
    let user = if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        "***@"
    } else {
        ""
    };
    safe(&format!("{scheme}://{user}{host}{port}{path}"))
}

/// Parses `HOST:PORT` (`[::1]:80` for IPv6).
pub fn parse_host_port(s: &str) -> Result<HostPort, String> {
    let bad = || {
        format!(
            "`{}` is not HOST:PORT (e.g. postgres-service:5432)",
            safe(s)
        )
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
    if host.is_empty() || host.contains(char::is_whitespace) || host.contains('/') {
        return Err(bad());
    }
    Ok(HostPort {
        host: host.into(),
        port,
    })
}

/// Parses an `http://` URL with a host.
pub fn parse_http_url(s: &str) -> Result<http::Uri, String> {
    // Errors name the URL without what could be a password.
    let shown = match s.split_once('@') {
        Some((before, after)) => match before.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://***@{after}"),
            None => format!("***@{after}"),
        },
        None => s.to_owned(),
    };
    let shown = safe(&shown);
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("`{shown}` is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "`{shown}`: only http:// URLs are supported (https is not)"
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{shown}`: no host"));
    }
    Ok(uri)
}

/// What one wait is for.
#[derive(Debug, Clone)]
pub enum Target {
    /// A TCP connect.
    Tcp(HostPort),
    /// An HTTP GET answered with a 2xx.
    Http(http::Uri),
}

impl Target {
    fn host_port(&self) -> HostPort {
        match self {
            Target::Tcp(hp) => hp.clone(),
            Target::Http(uri) => HostPort {
                host: uri
                    .host()
                    .unwrap_or_default()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .into(),
                port: uri.port_u16().unwrap_or(80),
            },
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(hp) => write!(f, "tcp {hp}"),
            Target::Http(uri) => write!(f, "http {}", redacted(uri)),
        }
    }
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The name does not resolve (or resolves to nothing).
    Dns(String),
    /// No DNS answer at all: the server is unreachable or failing (not "no such name").
    DnsUnavailable(String),
    /// Every address refused the connection.
    Refused(SocketAddr),
    /// A step did not finish in time: which (`connect to 10.0.0.7:5432`), and the limit.
    TimedOut(String, Duration),
    /// Another connect or HTTP error.
    Io(String),
    /// The HTTP answer was not in the accepted range.
    Status(u16, StatusRange),
    /// The connection was closed right after it opened (a sidecar proxy that could not reach
    /// the target does this).
    ClosedAtOnce(SocketAddr),
    /// The connection was reset right after it opened (Outrider's sidecar resets a connection
    /// whose target refused it).
    ResetAtOnce(SocketAddr),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Dns(e) => write!(f, "DNS: {e}"),
            Failure::DnsUnavailable(e) => write!(f, "DNS server unreachable or failing: {e}"),
            Failure::Refused(a) => write!(f, "connection refused by {a}"),
            Failure::TimedOut(what, after) => write!(
                f,
                "timed out after {} ({what})",
                outrider_control::duration::format(*after)
            ),
            Failure::Io(e) => write!(f, "{e}"),
            Failure::Status(s, ok) => write!(f, "HTTP status {s} ({ok} expected)"),
            Failure::ClosedAtOnce(a) => write!(
                f,
                "connected to {a} but it closed at once (a proxy in front could not reach the target?)"
            ),
            Failure::ResetAtOnce(a) => write!(
                f,
                "connected to {a} but it was reset at once (nothing listens there: the sidecar proxy resets what the target refused)"
            ),
        }
    }
}

/// One attempt at `target`, each step bounded by `timeout`; a TCP connection must then stay
/// open for `settle`, an HTTP answer must be in `ok`. `Ok` with the address that answered.
pub async fn attempt(
    target: &Target,
    timeout: Duration,
    settle: Duration,
    ok: StatusRange,
) -> Result<SocketAddr, Failure> {
    let hp = target.host_port();
    let addrs: Vec<SocketAddr> = tokio::time::timeout(
        timeout,
        tokio::net::lookup_host((hp.host.as_str(), hp.port)),
    )
    .await
    .map_err(|_| Failure::TimedOut(format!("DNS lookup of {}", safe(&hp.host)), timeout))?
    .map_err(|e| dns_failure(&hp.host, &e))?
    .collect();
    if addrs.is_empty() {
        return Err(Failure::Dns(format!(
            "`{}` resolves to no address",
            hp.host
        )));
    }
    let mut last = Failure::Dns(format!("`{}` resolves to no address", hp.host));
    for addr in addrs {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Err(_) => {
                last = Failure::TimedOut(format!("connect to {addr}"), timeout);
                continue;
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                last = Failure::Refused(addr);
                continue;
            }
            Ok(Err(e)) => {
                last = Failure::Io(format!("connect to {addr}: {e}"));
                continue;
            }
            Ok(Ok(s)) => s,
        };
        return match target {
            Target::Tcp(_) => settled(&stream, addr, settle).await,
            Target::Http(uri) => match tokio::time::timeout(timeout, get(stream, uri)).await {
                Err(_) => Err(Failure::TimedOut(
                    format!("HTTP answer from {addr}"),
                    timeout,
                )),
                Ok(Err(e)) => Err(e),
                Ok(Ok(status)) if ok.contains(status) => Ok(addr),
                Ok(Ok(status)) => Err(Failure::Status(status, ok)),
            },
        };
    }
    Err(last)
}

/// A failed lookup: "no such name" (with the namespace hint for a bare name) told apart from a
/// resolver that could not get an answer (`EAI_AGAIN`: the DNS server is down or unreachable).
fn dns_failure(host: &str, e: &std::io::Error) -> Failure {
    let text = e.to_string();
    let host = safe(host);
    if text.contains("Temporary failure")
        || text.contains("try again")
        || text.contains("Try again")
    {
        return Failure::DnsUnavailable(format!("no answer for `{host}` ({text})"));
    }
    // The usual mistake: a Service of another namespace named without its namespace.
    let hint = if host.contains('.') || host.parse::<std::net::IpAddr>().is_ok() {
        ""
    } else {
        "; a Service in another namespace is NAME.NAMESPACE"
    };
    Failure::Dns(format!("`{host}` does not resolve ({text}){hint}"))
}

/// `Ok` unless the peer closes or resets the connection within `settle` (data, or silence,
/// is an open connection).
async fn settled(
    stream: &TcpStream,
    addr: SocketAddr,
    settle: Duration,
) -> Result<SocketAddr, Failure> {
    if settle.is_zero() {
        return Ok(addr);
    }
    let mut byte = [0u8; 1];
    match tokio::time::timeout(settle, stream.peek(&mut byte)).await {
        Err(_) | Ok(Ok(1..)) => Ok(addr),
        Ok(Ok(0)) => Err(Failure::ClosedAtOnce(addr)),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            Err(Failure::ResetAtOnce(addr))
        }
        Ok(Err(_)) => Err(Failure::ClosedAtOnce(addr)),
    }
}

async fn get(stream: TcpStream, uri: &http::Uri) -> Result<u16, Failure> {
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Failure::Io(format!("HTTP: {e}")))?;
    let conn = tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    // The Host header never carries the URL's credentials.
    let host = uri.authority().map_or("", |a| a.as_str());
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let req = http::Request::get(path)
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "outrider-wait")
        .body(Empty::<Bytes>::new())
        .map_err(|e| Failure::Io(format!("HTTP: {e}")))?;
    let rsp = send
        .send_request(req)
        .await
        .map_err(|e| Failure::Io(format!("HTTP: {e}")));
    conn.abort();
    Ok(rsp?.status().as_u16())
}

/// Waits for every target at once; `Err` lists the ones not reached before `args.timeout`,
/// with their last failure. Progress goes to `log`, one line per target per attempt.
pub async fn wait_all(
    targets: Vec<Target>,
    args: &WaitArgs,
    log: impl Fn(String) + Send + Sync + 'static,
) -> Result<(), Vec<(Target, Failure)>> {
    wait_until(targets, args, log, std::future::pending())
        .await
        .map_err(|e| e.pending)
}

/// How a wait ended without every target reached.
#[derive(Debug)]
pub struct Unreached {
    /// `stop` ended it (a signal), not `--timeout`.
    pub stopped: bool,
    /// The targets not reached, each with its last failure.
    pub pending: Vec<(Target, Failure)>,
}

/// [`wait_all`], ended early when `stop` completes (SIGTERM).
pub async fn wait_until(
    targets: Vec<Target>,
    args: &WaitArgs,
    log: impl Fn(String) + Send + Sync + 'static,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), Unreached> {
    let log = Arc::new(log);
    // Per target: None until an attempt ends, then its outcome.
    type Outcomes = Vec<Option<Result<(), Failure>>>;
    let last: Arc<Mutex<Outcomes>> = Arc::new(Mutex::new(vec![None; targets.len()]));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, target) in targets.iter().cloned().enumerate() {
        let (log, last) = (log.clone(), last.clone());
        let (per, settle, ok) = (args.attempt_timeout, args.settle, args.http_status);
        tasks.spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            for n in 1u64.. {
                match attempt(&target, per, settle, ok).await {
                    Ok(addr) => {
                        if let Ok(mut last) = last.lock() {
                            last[i] = Some(Ok(()));
                        }
                        log(format!("{target}: reachable at {addr} (attempt {n})"));
                        return;
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        log(format!(
                            "{target}: attempt {n} failed: {e}; retrying in {}ms",
                            delay.as_millis()
                        ));
                        if let Ok(mut last) = last.lock() {
                            last[i] = Some(Err(e));
                        }
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        });
    }
    let all = async { while tasks.join_next().await.is_some() {} };
    let stopped = tokio::select! {
        done = tokio::time::timeout(args.timeout, all) => {
            if done.is_ok() {
                return Ok(());
            }
            false
        }
        () = stop => true,
    };
    tasks.abort_all();
    let last = last.lock().map(|l| l.clone()).unwrap_or_default();
    let mut unreachable = Vec::new();
    for (target, outcome) in targets.into_iter().zip(last) {
        match outcome {
            Some(Ok(())) => {}
            Some(Err(f)) => unreachable.push((target, f)),
            None if stopped => {
                unreachable.push((target, Failure::Io("no attempt has finished yet".into())));
            }
            None => unreachable.push((
                target,
                Failure::TimedOut("the first attempt".into(), args.timeout),
            )),
        }
    }
    Err(Unreached {
        stopped,
        pending: unreachable,
    })
}

/// `outrider wait`.
pub fn main(args: WaitArgs) -> ExitCode {
    let mut targets: Vec<Target> = args.tcp.iter().cloned().map(Target::Tcp).collect();
    targets.extend(args.http.iter().cloned().map(Target::Http));
    if targets.is_empty() {
        eprintln!("outrider wait: nothing to wait for: give --tcp HOST:PORT or --http URL");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outrider wait: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let start = std::time::Instant::now();
    let stamp = move || format!("[{:6.1}s]", start.elapsed().as_secs_f64());
    // 143 for SIGTERM, 130 for Ctrl-C, as a shell reports them.
    let signal = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let stop = {
        let signal = signal.clone();
        async move {
            let code = terminated().await;
            signal.store(code, std::sync::atomic::Ordering::SeqCst);
        }
    };
    let result = runtime.block_on(wait_until(
        targets,
        &args,
        move |line| eprintln!("outrider wait: {} {line}", stamp()),
        stop,
    ));
    // A DNS lookup still running in a blocking thread must not hold the exit up.
    runtime.shutdown_timeout(Duration::from_millis(100));
    let elapsed = outrider_control::duration::format(Duration::from_millis(
        u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
    ));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Unreached { stopped, pending }) => {
            if stopped {
                let what: Vec<String> = pending.iter().map(|(t, f)| format!("{t} ({f})")).collect();
                eprintln!(
                    "outrider wait: stopped by a signal after {elapsed}; still waiting for: {}",
                    what.join("; ")
                );
                return ExitCode::from(signal.load(std::sync::atomic::Ordering::SeqCst).max(1));
            }
            eprintln!(
                "outrider wait: gave up after {}; not reachable:",
                outrider_control::duration::format(args.timeout)
            );
            for (target, why) in pending {
                eprintln!("  {target}: {why}");
            }
            ExitCode::from(1)
        }
    }
}

/// Completes on SIGTERM (143) or Ctrl-C (130), with the exit code a shell would give.
async fn terminated() -> u8 {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        return tokio::select! {
            _ = term.recv() => 143,
            _ = tokio::signal::ctrl_c() => 130,
        };
    }
    match tokio::signal::ctrl_c().await {
        Ok(()) => 130,
        Err(_) => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn what_is_echoed_has_no_credentials_nor_escapes() {
        let uri = parse_http_url("http://admin:hunter2@config:8080/ready?x=1").unwrap();
        let shown = Target::Http(uri).to_string();
        assert_eq!(shown, "http http://***@config:8080/ready?x=1");
        let e = parse_http_url("https://admin:hunter2@config/").unwrap_err();
        assert!(
            !e.contains("hunter2") && e.contains("https://***@config/"),
            "{e}"
        );
        let e = parse_host_port("db\u{1b}[31m").unwrap_err();
        assert!(!e.contains('\u{1b}') && e.contains("\\u{1b}"), "{e}");
        let hp = HostPort {
            host: "a\u{1b}]0;x\u{7}".into(),
            port: 1,
        };
        assert!(!hp.to_string().chars().any(char::is_control), "{hp}");
    }

    #[test]
    fn status_ranges_parse_and_say_what_was_expected() {
        assert_eq!(
            parse_status_range("200-399"),
            Ok(StatusRange {
                low: 200,
                high: 399
            })
        );
        assert_eq!(
            parse_status_range("204"),
            Ok(StatusRange {
                low: 204,
                high: 204
            })
        );
        for bad in ["", "300-200", "99-200", "200-600", "2xx", "200-"] {
            assert!(parse_status_range(bad).is_err(), "{bad}");
        }
        let range = StatusRange {
            low: 200,
            high: 399,
        };
        assert!(range.contains(302) && !range.contains(404));
        assert_eq!(
            Failure::Status(503, StatusRange::SUCCESS).to_string(),
            "HTTP status 503 (2xx expected)"
        );
        assert_eq!(
            Failure::Status(404, range).to_string(),
            "HTTP status 404 (200-399 expected)"
        );
    }

    #[test]
    fn failures_say_where_how_long_and_which_dns_trouble() {
        let t = Failure::TimedOut("connect to 10.0.0.7:5432".into(), Duration::from_secs(2));
        assert_eq!(
            t.to_string(),
            "timed out after 2s (connect to 10.0.0.7:5432)"
        );
        let again = std::io::Error::other(
            "failed to lookup address information: Temporary failure in name resolution",
        );
        let f = dns_failure("postgres", &again);
        assert!(matches!(f, Failure::DnsUnavailable(_)), "{f}");
        assert!(
            f.to_string()
                .starts_with("DNS server unreachable or failing"),
            "{f}"
        );
        assert!(!f.to_string().contains("NAME.NAMESPACE"), "{f}");
        let none = std::io::Error::other(
            "failed to lookup address information: Name or service not known",
        );
        let f = dns_failure("postgres", &none);
        assert!(matches!(f, Failure::Dns(_)), "{f}");
        assert!(f.to_string().contains("NAME.NAMESPACE"), "{f}");
    }

    #[test]
    fn targets_parse_or_say_why_not() {
        let hp = parse_host_port("postgres-service:5432").unwrap();
        assert_eq!((hp.host.as_str(), hp.port), ("postgres-service", 5432));
        let v6 = parse_host_port("[::1]:80").unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.to_string()),
            ("::1", "[::1]:80".to_owned())
        );
        for bad in [
            "postgres-service",
            ":5432",
            "db:0",
            "db:65536",
            "db:x",
            "a b:1",
            "h/p:1",
        ] {
            assert!(parse_host_port(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Target::Http(parse_http_url("http://config:8080/ready?x=1").unwrap()).host_port(),
            HostPort {
                host: "config".into(),
                port: 8080
            }
        );
        assert_eq!(
            parse_http_url("http://config/").map(|u| Target::Http(u).host_port().port),
            Ok(80)
        );
        assert!(parse_http_url("https://config/")
            .unwrap_err()
            .contains("only http://"));
        assert!(parse_http_url("config:80").is_err());
    }
}
