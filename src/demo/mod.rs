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

async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let duration = args.duration.min(Duration::from_secs(3600));
    let any = SocketAddr::from(([127, 0, 0, 1], 0));

    // The control plane, on its embedded demo mesh.
    let mesh =
        Mesh::parse(DEMO_MESH).map_err(|e| anyhow::anyhow!("embedded demo mesh: {:?}", e))?;
    let control = ControlPlane::new(mesh)?;
    let control_listener = TcpListener::bind(any)
        .await
        .context("bind the control plane")?;
    let control_addr = control_listener.local_addr()?;
    let control_task = tokio::spawn(control.serve(control_listener));

    // Three copies of the app, each behind the server-side proxy at an endpoint of the mesh.
    let mut apps = Vec::new();
    let mut forwards = Vec::new();
    for (i, port) in DEMO_ENDPOINT_PORTS.iter().enumerate() {
        let app = TcpListener::bind(any).await.context("bind the demo app")?;
        forwards.push(ForwardSpec {
            listen: SocketAddr::from(([127, 0, 0, 1], *port)),
            upstream: app.local_addr()?,
        });
        apps.push(tokio::spawn(app::serve(app, format!("payments-api-{i}"))));
    }
    let server_registry = prometheus::Registry::new();
    let server = Proxy::bind(
        Config::local(forwards),
        Arc::new(SoOriginalDst),
        None,
        server_registry.clone(),
    )
    .await
    .context("the demo mesh's endpoints are 127.0.0.1:18181-18183; free those ports")?;

    let mut config = local(any, DEMO_VIP.parse()?);
    config.control = Some(format!("http://{control_addr}"));
    config.workload = Some("demo/loadgen".into());
    let client_registry = prometheus::Registry::new();
    let client = Proxy::bind(
        config,
        Arc::new(SoOriginalDst),
        None,
        client_registry.clone(),
    )
    .await?;
    let client_addr = client.listener_addrs(Direction::Forward)[0];
    let (server_admin, client_admin) = (server.admin_addr(), client.admin_addr());
    let (server_stop, client_stop) = (server.shutdown_handle(), client.shutdown_handle());
    let client_ready = client.readiness();
    let server_task = tokio::spawn(server.run());
    let client_task = tokio::spawn(client.run());
    // Bounded wait for the first config: 100 checks, 20 ms apart.
    for _ in 0..100 {
        if client_ready.check().is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    println!("outrider demo: load → client-side proxy → server-side proxy → payments-api ×3, for {duration:?}");
    println!("  control plane       http://{control_addr}  (embedded demo mesh; try curl 'http://{control_addr}/v1/watch?workload=demo/loadgen')");
    println!("  client-side proxy   {client_addr} → {DEMO_VIP} (payments-api, discovered)  metrics: curl http://{client_admin}/metrics");
    println!("  server-side proxy   127.0.0.1:18181-18183 → 3 app instances  metrics: curl http://{server_admin}/metrics");
    println!("  (the addresses live while the demo runs; Ctrl-C ends it early)");

    let deadline = Instant::now() + duration;
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for i in 0..args.connections {
        let h2 = i % 2 == 1;
        workers.push(tokio::spawn(drive(client_addr, h2, deadline, stop.clone())));
    }
    let started = Instant::now();
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
    print_summary(&tally, elapsed, &client_registry, &server_registry);

    server_stop.trigger("demo finished");
    client_stop.trigger("demo finished");
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = client_task.await;
        let _ = server_task.await;
    })
    .await;
    for app in apps {
        app.abort();
    }
    control_task.abort();
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

fn print_summary(
    t: &Tally,
    elapsed: Duration,
    client: &prometheus::Registry,
    server: &prometheus::Registry,
) {
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
        "endpoints  {}  (weighted round robin over the control plane's endpoints)",
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
        outrider_proxy::metrics::sum(
            server,
            "outrider_requests_total",
            &[("direction", "forward")]
        ),
    );
}
