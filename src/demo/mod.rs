//! `outrider demo`: the whole data path on loopback, without root.
//!
//! ```text
//! load (HTTP/1.1 + h2c) → client-side proxy ─(discovery: 198.18.100.1:80 = 3 endpoints)─→
//!   server-side proxy (127.0.0.1:18181-18183) → payments-api ×3 (built-in app)
//! ```
//!
//! The control plane serves its embedded demo mesh; the client-side proxy watches it as workload
//! `demo/loadgen` and spreads requests over the service's endpoints. Everything runs in this
//! process; the load runs for `--duration` (or until Ctrl-C), then the demo prints a summary and
//! stops everything it started.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use outrider_control::mesh::{Mesh, DEMO_MESH};
use outrider_control::ControlPlane;
use outrider_proxy::config::{parse_duration, Config, ForwardSpec, LogFormat};
use outrider_proxy::metrics::Direction;
use outrider_proxy::transport::orig_dst::SoOriginalDst;
use outrider_proxy::Proxy;

pub mod app;

/// Flags of `outrider demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// How long to drive traffic (at most 1h).
    #[arg(long, env = "OUTRIDER_DURATION", value_name = "DUR", default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Concurrent client connections (half HTTP/1.1, half h2c).
    #[arg(long, env = "OUTRIDER_CONNECTIONS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub connections: u16,
    /// Inject faults: payments-api-0 fails half its requests for the first half of the run, then
    /// recovers; payments-api-2 answers 20 ms late. The summary shows retries, the breaker
    /// opening and closing, and load moving away from the slow copy; the client must see no
    /// failure.
    #[arg(long, env = "OUTRIDER_FAULTS")]
    pub faults: bool,
}

/// The demo mesh for `--faults`: the embedded one with a breaker that reopens in 500 ms (so a
/// short run shows it open and close) and two retries on the payments route.
fn faults_mesh() -> String {
    DEMO_MESH.replace("open_for: 10s", "open_for: 500ms")
}

/// A keep-alive client connection, HTTP/1.1 or h2c prior knowledge.
pub enum ClientConn {
    /// HTTP/1.1.
    Http1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    /// HTTP/2 over cleartext.
    Http2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl ClientConn {
    /// Connects to `addr`, speaking HTTP/2 when `h2`.
    pub async fn connect(addr: SocketAddr, h2: bool) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        let io = TokioIo::new(stream);
        if h2 {
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Ok(ClientConn::Http2(send))
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn.with_upgrades());
            Ok(ClientConn::Http1(send))
        }
    }

    /// Sends `GET path` with `host` as the authority.
    pub async fn get(&mut self, host: &str, path: &str) -> anyhow::Result<Response<Incoming>> {
        match self {
            ClientConn::Http1(send) => {
                send.ready().await?;
                let req = Request::get(path)
                    .header(http::header::HOST, host)
                    .body(Empty::new())?;
                Ok(send.send_request(req).await?)
            }
            ClientConn::Http2(send) => {
                send.ready().await?;
                let req = Request::get(format!("http://{host}{path}"))
                    .version(http::Version::HTTP_2)
                    .body(Empty::new())?;
                Ok(send.send_request(req).await?)
            }
        }
    }
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    statuses: BTreeMap<u16, u64>,
    instances: BTreeMap<String, u64>,
    errors: u64,
    http1: u64,
    http2: u64,
}

impl Tally {
    fn merge(&mut self, t: Tally) {
        self.latencies.extend(t.latencies);
        for (s, n) in t.statuses {
            *self.statuses.entry(s).or_default() += n;
        }
        for (i, n) in t.instances {
            *self.instances.entry(i).or_default() += n;
        }
        self.errors += t.errors;
        self.http1 += t.http1;
        self.http2 += t.http2;
    }
}

/// Runs the demo and prints its summary.
pub fn main(args: DemoArgs) -> ExitCode {
    let spec = std::env::var("OUTRIDER_LOG").unwrap_or_else(|_| "warn".into());
    let _ = outrider_proxy::log::init_with(LogFormat::Plain, &spec);
    crate::runtime::block_on(
        "outrider demo",
        outrider_proxy::config::default_workers(),
        async move {
            match run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("outrider demo: {e:#}");
                    ExitCode::from(1)
                }
            }
        },
    )
}

fn local(listen: SocketAddr, upstream: SocketAddr) -> Config {
    Config::local(vec![ForwardSpec { listen, upstream }])
}

/// The endpoint ports of the embedded demo mesh (`control/demo-mesh.yaml`).
const DEMO_ENDPOINT_PORTS: [u16; 3] = [18181, 18182, 18183];
/// The virtual address of payments-api in the demo mesh.
const DEMO_VIP: &str = "198.18.100.1:80";

/// The demo's identities.
const LOADGEN_ID: &str = "spiffe://outrider.local/ns/demo/sa/loadgen";
const PAYMENTS_ID: &str = "spiffe://outrider.local/ns/demo/sa/payments-api";
const INTRUDER_ID: &str = "spiffe://outrider.local/ns/demo/sa/intruder";

/// The demo's control plane: the embedded mesh, a throwaway CA, TLS on loopback.
struct DemoControl {
    url: String,
    tls: Arc<rustls::ClientConfig>,
    authority: Arc<outrider_control::authority::Authority>,
    task: tokio::task::JoinHandle<()>,
}

impl DemoControl {
    async fn start(mesh: &str) -> anyhow::Result<Self> {
        use outrider_control::authority::{Authority, ServingCert};
        let mesh = Mesh::parse(mesh).map_err(|e| anyhow::anyhow!("embedded demo mesh: {:?}", e))?;
        let ca = outrider_control::ca::Ca::generate("outrider.local")?;
        let anchors = ca.trust_anchors_pem().to_string();
        let tokens = outrider_control::token::TokenKey::generate()?;
        let day = Duration::from_secs(24 * 3600);
        let serving = ServingCert::new(
            &ca,
            vec!["localhost".into()],
            vec![std::net::Ipv4Addr::LOCALHOST.into()],
            day,
        )?;
        let authority = Authority::new(ca, tokens, day, "outrider.local".into())?;
        let control = ControlPlane::with_authority(mesh, Some(authority.clone()))?;
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("bind the control plane")?;
        let addr = listener.local_addr()?;
        let config = serving.server_config_for_proxies(authority.clone())?;
        let task = tokio::spawn(control.serve_over(listener, Some(config)));
        Ok(Self {
            url: format!("https://{addr}"),
            tls: outrider_control::client::client_tls(&anchors)?,
            authority,
            task,
        })
    }

    /// A sidecar of `workload` with identity `id` (its token minted here), certified over TLS.
    async fn proxy(
        &self,
        mut config: Config,
        orig_dst: Arc<dyn outrider_proxy::transport::orig_dst::OrigDst>,
        workload: &str,
        id: &str,
    ) -> anyhow::Result<(Proxy, prometheus::Registry)> {
        config.control = Some(self.url.clone());
        config.control_tls = Some(self.tls.clone());
        config.workload = Some(workload.into());
        let identity: outrider_control::api::Identity = id.parse()?;
        let source = outrider_proxy::app::IdentitySource {
            ca: Arc::new(outrider_control::client::Certifier::new(
                &self.url,
                Some(self.tls.clone()),
            )?),
            token: outrider_proxy::identity::certify::TokenSource::Fixed(
                self.authority
                    .mint_token(&identity, Duration::from_secs(3600))
                    .into(),
            ),
        };
        let registry = prometheus::Registry::new();
        let proxy =
            Proxy::bind_with_identity(config, orig_dst, None, registry.clone(), Some(source))
                .await?;
        Ok((proxy, registry))
    }
}

/// Waits (bounded: 250 checks, 20 ms apart) until a proxy has its config and certificate.
async fn wait_ready(ready: &outrider_proxy::readiness::Readiness) -> anyhow::Result<()> {
    for _ in 0..250 {
        if ready.check().is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ready
        .check()
        .map_err(|missing| anyhow::anyhow!("a demo proxy never became ready: {missing}"))
}

async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let duration = args.duration.min(Duration::from_secs(3600));
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let mesh = if args.faults {
        faults_mesh()
    } else {
        DEMO_MESH.to_string()
    };
    let control = DemoControl::start(&mesh).await?;
    let control_addr = control.url.clone();

    // Three copies of the app (127.0.0.2-4:8080, the port the mesh's policy names), each behind
    // its own server-side proxy whose inbound listener is an endpoint of the mesh.
    let mut apps = Vec::new();
    let faults: Vec<Arc<app::Faults>> = (0..3).map(|_| Arc::default()).collect();
    if args.faults {
        faults[0].fail_percent.store(50, Ordering::Relaxed);
        faults[2].delay_ms.store(20, Ordering::Relaxed);
    }
    let mut servers = Vec::new();
    let mut server_registries = Vec::new();
    for (i, port) in DEMO_ENDPOINT_PORTS.iter().enumerate() {
        let app_addr = SocketAddr::from(([127, 0, 0, 2 + i as u8], 8080));
        let app = TcpListener::bind(app_addr)
            .await
            .with_context(|| format!("bind the demo app on {app_addr}"))?;
        apps.push(tokio::spawn(app::serve_with_faults(
            app,
            format!("payments-api-{i}"),
            faults[i].clone(),
        )));
        let mut config = Config::local(Vec::new());
        config.inbound = Some(SocketAddr::from(([127, 0, 0, 1], *port)));
        let (server, registry) = control
            .proxy(
                config,
                Arc::new(outrider_proxy::transport::orig_dst::FixedOrigDst(app_addr)),
                "demo/payments-api",
                PAYMENTS_ID,
            )
            .await
            .context("the demo mesh's endpoints are 127.0.0.1:18181-18183; free those ports")?;
        servers.push(server);
        server_registries.push(registry);
    }
    let (client, client_registry) = control
        .proxy(
            local(any, DEMO_VIP.parse()?),
            Arc::new(SoOriginalDst),
            "demo/loadgen",
            LOADGEN_ID,
        )
        .await?;
    let (intruder, _) = control
        .proxy(
            local(any, DEMO_VIP.parse()?),
            Arc::new(SoOriginalDst),
            "demo/intruder",
            INTRUDER_ID,
        )
        .await?;
    let client_addr = client.listener_addrs(Direction::Forward)[0];
    let intruder_addr = intruder.listener_addrs(Direction::Forward)[0];
    let client_admin = client.admin_addr();
    let server_admin = servers[0].admin_addr();
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    let mut readiness = Vec::new();
    for p in servers.into_iter().chain([client, intruder]) {
        stops.push(p.shutdown_handle());
        readiness.push(p.readiness());
        tasks.push(tokio::spawn(p.run()));
    }
    for ready in &readiness {
        wait_ready(ready).await?;
    }

    println!("outrider demo: load → client-side proxy ═mTLS═> server-side proxies → payments-api ×3, for {duration:?}");
    println!("  control plane       {control_addr}  (embedded demo mesh, a throwaway CA; TLS)");
    println!("  client-side proxy   {client_addr} → {DEMO_VIP} (payments-api, discovered)  identity: curl http://{client_admin}/identity");
    println!("  server-side proxies 127.0.0.1:18181-18183 → 3 app instances  metrics: curl http://{server_admin}/metrics");
    println!("  (the addresses live while the demo runs; Ctrl-C ends it early)");

    let deadline = Instant::now() + duration;
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for i in 0..args.connections {
        let h2 = i % 2 == 1;
        workers.push(tokio::spawn(drive(client_addr, h2, deadline, stop.clone())));
    }
    let started = Instant::now();
    if args.faults {
        // payments-api-0 recovers halfway through the run: its breaker's next probe closes it.
        let failing = faults[0].clone();
        let recover = duration.mul_f64(0.5);
        apps.push(tokio::spawn(async move {
            tokio::time::sleep(recover).await;
            failing.fail_percent.store(0, Ordering::Relaxed);
        }));
    }
    // Ctrl-C stops the load early; the summary still covers what was sent.
    let interrupt = stop.clone();
    let watcher = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            println!("interrupted: stopping the load");
            interrupt.store(true, Ordering::Relaxed);
        }
    });
    let mut tally = Tally::default();
    for w in workers {
        if let Ok(t) = w.await {
            tally.merge(t);
        }
    }
    watcher.abort();
    let elapsed = started.elapsed();
    print_summary(&tally, elapsed, &client_registry, &server_registries);
    if args.faults {
        print_faults(&client_registry);
    }
    // One call from an identity the payments-api policy does not name.
    let denied = match ClientConn::connect(intruder_addr, false).await {
        Ok(mut c) => match c.get("payments.demo", "/payments/1").await {
            Ok(rsp) => format!(
                "{} {}",
                rsp.status().as_u16(),
                rsp.headers()
                    .get("outrider-error")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("(no outrider-error)")
            ),
            Err(e) => format!("failed: {e}"),
        },
        Err(e) => format!("failed: {e}"),
    };
    println!(
        "denied     1 call from {INTRUDER_ID}: {denied}  (port 8080 allows {LOADGEN_ID} only)"
    );

    for stop in &stops {
        stop.trigger("demo finished");
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        for t in tasks {
            let _ = t.await;
        }
    })
    .await;
    for app in apps {
        app.abort();
    }
    control.task.abort();
    if !denied.starts_with("403 denied") {
        anyhow::bail!("the intruder's call was not denied: {denied}");
    }
    if tally.errors > 0 || tally.latencies.is_empty() {
        anyhow::bail!(
            "{} requests failed, {} succeeded",
            tally.errors,
            tally.latencies.len()
        );
    }
    Ok(())
}

/// One client connection sending requests back to back until `deadline` or `stop` (at most 1M
/// requests).
async fn drive(addr: SocketAddr, h2: bool, deadline: Instant, stop: Arc<AtomicBool>) -> Tally {
    let mut tally = Tally::default();
    let mut conn = None;
    for n in 0..1_000_000u32 {
        if Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
            break;
        }
        if conn.is_none() {
            match ClientConn::connect(addr, h2).await {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    tally.errors += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let start = Instant::now();
        let path = format!("/payments/{}", n % 100);
        match c.get("payments.demo", &path).await {
            Ok(rsp) => {
                let status = rsp.status();
                if let Some(instance) = rsp
                    .headers()
                    .get("x-instance")
                    .and_then(|v| v.to_str().ok())
                {
                    *tally.instances.entry(instance.to_string()).or_default() += 1;
                }
                let ok = rsp.into_body().collect().await.is_ok();
                tally.latencies.push(start.elapsed());
                *tally.statuses.entry(status.as_u16()).or_default() += 1;
                if h2 {
                    tally.http2 += 1
                } else {
                    tally.http1 += 1
                }
                if !ok || status != StatusCode::OK {
                    tally.errors += 1;
                }
            }
            Err(_) => {
                tally.errors += 1;
                conn = None;
            }
        }
    }
    tally
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The resilience part of the summary (`--faults`): retries, breakers, shedding, from the
/// client-side proxy's metrics.
fn print_faults(client: &prometheus::Registry) {
    let sum = |family: &str, labels: &[(&str, &str)]| {
        outrider_proxy::metrics::sum(client, family, labels)
    };
    let service = ("service", "demo/payments-api");
    println!(
        "retries    {} sent; skipped: {} budget, {} non-idempotent, {} body too large, {} out of attempts  (outrider_retries_total)",
        sum("outrider_retries_total", &[service]),
        sum("outrider_retries_skipped_total", &[service, ("reason", "budget")]),
        sum("outrider_retries_skipped_total", &[service, ("reason", "non-idempotent")]),
        sum("outrider_retries_skipped_total", &[service, ("reason", "body-too-large")]),
        sum("outrider_retries_skipped_total", &[service, ("reason", "attempts")]),
    );
    for port in DEMO_ENDPOINT_PORTS {
        let endpoint = format!("127.0.0.1:{port}");
        let to = |state: &str| {
            sum(
                "outrider_breaker_transitions_total",
                &[("endpoint", endpoint.as_str()), ("to", state)],
            )
        };
        let now = match sum("outrider_breaker_state", &[("endpoint", endpoint.as_str())]) as i64 {
            0 => "closed",
            1 => "open",
            _ => "half-open",
        };
        println!(
            "breaker    {endpoint}: opened {} times, probed {}, closed {}; now {now}",
            to("open"),
            to("half-open"),
            to("closed"),
        );
    }
    println!(
        "shed       {} overloaded, {} circuit-open  (outrider_requests_shed_total)",
        sum(
            "outrider_requests_shed_total",
            &[service, ("reason", "overloaded")]
        ),
        sum(
            "outrider_requests_shed_total",
            &[service, ("reason", "circuit-open")]
        ),
    );
    println!("faults     payments-api-0 failed 50% of its answers for the first half of the run; payments-api-2 answered 20 ms late (P2C over peak-EWMA sends it less)");
}

fn print_summary(
    t: &Tally,
    elapsed: Duration,
    client: &prometheus::Registry,
    servers: &[prometheus::Registry],
) {
    let server_sum = |family: &str, labels: &[(&str, &str)]| -> f64 {
        servers
            .iter()
            .map(|r| outrider_proxy::metrics::sum(r, family, labels))
            .sum()
    };
    let mut lat = t.latencies.clone();
    lat.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let total = lat.len() as u64;
    let rps = total as f64 / elapsed.as_secs_f64().max(0.001);
    println!();
    println!(
        "requests   {total} in {:.1} s ({rps:.0} req/s): HTTP/1.1 {}, HTTP/2 {}",
        elapsed.as_secs_f64(),
        t.http1,
        t.http2
    );
    let statuses: Vec<String> = t
        .statuses
        .iter()
        .map(|(s, n)| format!("{s}: {n}"))
        .collect();
    println!(
        "statuses   {}",
        if statuses.is_empty() {
            "none".into()
        } else {
            statuses.join(", ")
        }
    );
    println!("errors     {}", t.errors);
    let spread: Vec<String> = t
        .instances
        .iter()
        .map(|(i, n)| format!("{i}: {n}"))
        .collect();
    println!(
        "endpoints  {}  (power of two choices over peak-EWMA latency)",
        spread.join(", ")
    );
    println!(
        "latency    p50 {:.2} ms   p90 {:.2} ms   p99 {:.2} ms   max {:.2} ms   (client → 2 proxies → app)",
        ms(percentile(&lat, 0.50)),
        ms(percentile(&lat, 0.90)),
        ms(percentile(&lat, 0.99)),
        ms(percentile(&lat, 1.0))
    );
    println!(
        "proxies    client-side counted {} requests, server-side {} (outrider_requests_total)",
        outrider_proxy::metrics::sum(
            client,
            "outrider_requests_total",
            &[("direction", "forward")]
        ),
        server_sum("outrider_requests_total", &[("direction", "inbound")]),
    );
    println!(
        "mTLS       {LOADGEN_ID} → {PAYMENTS_ID}: {} connections seen by the server side",
        server_sum(
            "outrider_inbound_mesh_connections_total",
            &[("client_id", LOADGEN_ID)]
        ),
    );
    let hs = |result: &str| {
        outrider_proxy::metrics::sum(
            client,
            "outrider_tls_handshakes_total",
            &[("direction", "outbound"), ("result", result)],
        )
    };
    println!(
        "handshakes {} full, {} resumed, {} failed (client side; connections are pooled, so not one per request)",
        hs("full"),
        hs("resumed"),
        hs("failed")
    );
}
